//! The one error type of the runtime. Every message names what is wrong.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// An argument has the wrong size, shape or value.
    InvalidArgument(String),
    /// The CUDA device was asked for and cannot be used; the text says why.
    CudaUnavailable(String),
    /// A CUDA driver call failed.
    Cuda { during: String, error: cudarc::driver::DriverError },
    /// An op got buffers that live on another device than the one it runs on.
    WrongDevice(String),
    /// The op has no implementation on this device yet; the text names both.
    Unsupported(String),
    /// Work a captured graph cannot hold (a host read or write of device memory, an allocation)
    /// was asked for while capturing one; the text names it.
    Capture(String),
    /// An emulated kernel faulted (out of bounds, race, deadlock, …): the emulator's report.
    KernelFault(Box<clip_pgs_kernels::hw::emu::Fault>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::CudaUnavailable(m) => write!(f, "CUDA is not available: {m}"),
            Error::Cuda { during, error } => write!(f, "CUDA error while {during}: {error}"),
            Error::WrongDevice(m) => write!(f, "wrong device: {m}"),
            Error::Unsupported(m) => write!(f, "not supported: {m}"),
            Error::Capture(m) => write!(f, "not allowed while capturing a graph: {m}"),
            Error::KernelFault(fault) => write!(f, "kernel fault in emulation: {fault}"),
        }
    }
}

impl std::error::Error for Error {}

/// Adds what was being done to a driver error.
pub(crate) trait CudaContextExt<T> {
    fn during(self, what: impl Into<String>) -> Result<T>;
}

impl<T> CudaContextExt<T> for Result<T, cudarc::driver::DriverError> {
    fn during(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|error| Error::Cuda { during: what.into(), error })
    }
}
