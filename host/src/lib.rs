//! The clip-pgs runtime: device selection (CPU always, CUDA when a GPU answers, the SIMT
//! emulator on request), buffers that every device provides, one typed launch for every kernel of
//! `clip-pgs-kernels` on CUDA and on the emulator (`launch.rs`), and the CPU reference of every
//! op.
//!
//! Each op lives in one file under `ops/`: its checked arguments, its CPU reference and its CUDA
//! launcher, so a reader sees the two devices' versions side by side.

pub mod buffer;
pub mod cublaslt;
pub mod cuda;
pub mod device;
pub mod emu;
pub mod error;
pub mod graph;
pub mod launch;
pub mod ops;
pub mod view;

pub use buffer::{Buffer, device_reads};
pub use device::{Device, DevicePreference, DeviceSelection};
pub use error::{Error, Result};
pub use graph::Graph;
pub use half::bf16;
pub use view::{Span, View, ViewMut};
