//! A flat buffer that any device provides.

use cudarc::driver::{CudaSlice, DeviceRepr};

use crate::error::{CudaContextExt, Result};

pub enum Buffer<T> {
    Cpu(Vec<T>),
    Cuda(CudaSlice<T>),
    /// Host memory that emulated kernels read and write (the `emu` device).
    Emu(Vec<T>),
}

impl<T: DeviceRepr + Clone + Default> Buffer<T> {
    pub fn len(&self) -> usize {
        match self {
            Buffer::Cpu(v) | Buffer::Emu(v) => v.len(),
            Buffer::Cuda(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The contents, copied to the host (waits for the GPU's queued work on it).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        match self {
            Buffer::Cpu(v) | Buffer::Emu(v) => Ok(v.clone()),
            Buffer::Cuda(s) => s.stream().clone_dtoh(s).during("copying a buffer to the host"),
        }
    }
}

impl<T> Buffer<T> {
    /// "cpu", "cuda" or "emu", for messages.
    pub fn device_name(&self) -> &'static str {
        match self {
            Buffer::Cpu(_) => "cpu",
            Buffer::Cuda(_) => "cuda",
            Buffer::Emu(_) => "emu",
        }
    }
}
