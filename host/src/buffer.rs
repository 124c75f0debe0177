//! A flat buffer that any device provides.

use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::{CudaSlice, DeviceRepr};

use crate::error::{CudaContextExt, Result};
use crate::graph::refuse_while_capturing;

/// Host reads of GPU memory (cuda and emu buffers) since the process started.
static DEVICE_READS: AtomicUsize = AtomicUsize::new(0);

/// How many times the host has read a GPU device's memory (`Buffer::read`, `Buffer::to_vec` on
/// a cuda or emu buffer) in this process: each waits for the device's queued work. A training
/// step makes none (`tests/step_host_reads.rs`).
pub fn device_reads() -> usize {
    DEVICE_READS.load(Ordering::SeqCst)
}

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

    /// Elements `span` copied into `out` (of the same length) on the host, with no allocation
    /// (waits for the GPU's queued work on it).
    pub fn read(&self, span: crate::view::Span, out: &mut [T]) -> Result<()> {
        if span.end() > self.len() || out.len() != span.len {
            return Err(crate::error::Error::InvalidArgument(format!(
                "reading {:?} of a buffer of {} into {} values",
                span.range(),
                self.len(),
                out.len()
            )));
        }
        if !matches!(self, Buffer::Cpu(_)) {
            DEVICE_READS.fetch_add(1, Ordering::SeqCst);
        }
        if let Buffer::Emu(_) = self {
            refuse_while_capturing(|| format!("reading {} values back to the host", span.len))?;
        }
        match self {
            Buffer::Cpu(v) | Buffer::Emu(v) => {
                out.clone_from_slice(&v[span.range()]);
                Ok(())
            }
            Buffer::Cuda(s) => s.stream().memcpy_dtoh(&s.slice(span.range()), out).during("copying to the host"),
        }
    }

    /// `data` copied into elements `span` (of the same length), with no allocation.
    pub fn write(&mut self, span: crate::view::Span, data: &[T]) -> Result<()> {
        if span.end() > self.len() || data.len() != span.len {
            return Err(crate::error::Error::InvalidArgument(format!(
                "writing {} values into {:?} of a buffer of {}",
                data.len(),
                span.range(),
                self.len()
            )));
        }
        if let Buffer::Emu(_) = self {
            refuse_while_capturing(|| format!("writing {} values from the host", data.len()))?;
        }
        match self {
            Buffer::Cpu(v) | Buffer::Emu(v) => {
                v[span.range()].clone_from_slice(data);
                Ok(())
            }
            Buffer::Cuda(s) => {
                let stream = s.stream().clone();
                stream.memcpy_htod(data, &mut s.slice_mut(span.range())).during("copying to the GPU")
            }
        }
    }

    /// The contents, copied to the host (waits for the GPU's queued work on it).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        if !matches!(self, Buffer::Cpu(_)) {
            DEVICE_READS.fetch_add(1, Ordering::SeqCst);
        }
        if let Buffer::Emu(v) = self {
            refuse_while_capturing(|| format!("reading {} values back to the host", v.len()))?;
        }
        match self {
            Buffer::Cpu(v) | Buffer::Emu(v) => Ok(v.clone()),
            Buffer::Cuda(s) => s.stream().clone_dtoh(s).during("copying a buffer to the host"),
        }
    }
}

impl<T> Buffer<T> {
    /// Where the buffer's memory starts (a device address on cuda): what a captured graph holds.
    pub fn address(&self) -> u64 {
        match self {
            Buffer::Cpu(v) | Buffer::Emu(v) => v.as_ptr() as u64,
            Buffer::Cuda(s) => {
                use cudarc::driver::DevicePtr;
                let (address, _sync) = s.device_ptr(s.stream());
                address
            }
        }
    }

    /// "cpu", "cuda" or "emu", for messages.
    pub fn device_name(&self) -> &'static str {
        match self {
            Buffer::Cpu(_) => "cpu",
            Buffer::Cuda(_) => "cuda",
            Buffer::Emu(_) => "emu",
        }
    }
}
