//! Element type conversion f32 ↔ bf16 on a GPU device (`kernels/src/cast.rs`): the bf16 copy of
//! the f32 master weights at the start of a bf16 run (AdamW keeps it current afterwards), and
//! conversions in tests. bf16 values round to nearest even; widening is exact.

use clip_pgs_kernels::cast::{LANES, THREADS, cast_bf16_f32, cast_f32_bf16};
use clip_pgs_kernels::hw::{Global, GlobalMut, Kernel};
use clip_pgs_kernels::map::threads;

use super::check::OpCheck;
use super::dtype::Float;
use crate::device::Device;
use crate::error::Result;
use crate::launch::{KernelElement, grid_stride_config};
use crate::view::{View, ViewMut};

/// A cast kernel's parameters: destination (element type D), source (S), count.
type CastKernel<S, D> = Kernel<(GlobalMut<D>, Global<S>, u32)>;

/// A conversion from `Self` to `D`, and its kernel: f32 → bf16 and bf16 → f32.
pub trait Cast<D: Float>: Float {
    const KERNEL: CastKernel<Self::Kernel, D::Kernel>;
}

impl Cast<half::bf16> for f32 {
    const KERNEL: CastKernel<Self::Kernel, <half::bf16 as KernelElement>::Kernel> = cast_f32_bf16;
}

impl Cast<f32> for half::bf16 {
    const KERNEL: CastKernel<Self::Kernel, f32> = cast_bf16_f32;
}

/// dst = src converted to dst's element type (the same length). One of them is bf16, so the cpu
/// device, which computes in f32, refuses it.
pub fn cast<S: Cast<D>, D: Float>(device: &Device, dst: ViewMut<D>, src: View<S>) -> Result<()> {
    let op = OpCheck::new("cast", device);
    op.size("dst", dst.len(), src.len(), || "src's size".into())?;
    let n = u32::try_from(src.len())
        .map_err(|_| op.invalid(format!("{} values, more than a kernel indexes (2³² − 1)", src.len())))?;
    if !matches!(device, Device::Cpu) {
        let args = (op.gpu_mut("dst", dst)?, op.gpu("src", src)?, n);
        // SAFETY: dst and src hold n values (checked above).
        return unsafe { device.launch(&S::KERNEL, grid_stride_config(threads(n as usize, LANES), THREADS), args) };
    }
    let (dst, src) = (op.cpu_f32_mut("dst", dst)?, op.cpu_f32("src", src)?);
    dst.copy_from_slice(src);
    Ok(())
}
