//! The clip-pgs runtime: device selection (CPU always, CUDA when a GPU answers), buffers that
//! both devices provide, the PTX module of `clip-pgs-kernels` with one typed launcher per kernel,
//! and the CPU reference of every op.
//!
//! Each op lives in one file under `ops/`: its checked arguments, its CPU reference and its CUDA
//! launcher, so a reader sees the two devices' versions side by side.

pub mod buffer;
pub mod cuda;
pub mod device;
pub mod error;
pub mod ops;

pub use buffer::Buffer;
pub use device::{Device, DevicePreference, DeviceSelection};
pub use error::{Error, Result};
pub use half::bf16;
