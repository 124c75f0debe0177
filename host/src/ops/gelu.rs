//! Exact (erf) GELU, as open_clip's `nn.GELU()`: gelu(x) = x·Φ(x), Φ(x) = (1 + erf(x/√2))/2;
//! gelu'(x) = Φ(x) + x·φ(x), the math shared with the kernels (`kernels/src/gelu.rs`). erf is
//! the kernels' f32 one (|error| ≤ 1.5e-7): the f64 series it replaced cost a fifth of a ViT-B/16
//! training step. The linear layer applies both as epilogues (`linear.rs`); these ops are for
//! activations no linear layer produces, f32 or bf16 (`dtype::Activation`; bf16 on the GPU
//! devices only, computed in f32).

use rayon::prelude::*;

use clip_pgs_kernels::gelu::{THREADS, gelu, gelu_grad};

use super::check::OpCheck;
use super::dtype::Activation;
use crate::device::Device;
use crate::error::Result;
use crate::launch::grid_stride_config;
use crate::view::{View, ViewMut};

/// Elements per parallel task: plain loops inside (rayon's element-wise zips compile to slower
/// loops).
const CHUNK: usize = 1 << 12;

pub(super) fn cpu_gelu(y: &mut [f32], x: &[f32]) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = gelu(x));
    });
}

/// dx = dy·gelu'(x); `dy` and `dx` may be the same slice (pass it as `dx` with `dy` None).
pub(super) fn cpu_gelu_backward(dx: &mut [f32], dy: Option<&[f32]>, x: &[f32]) {
    match dy {
        Some(dy) => {
            dx.par_chunks_mut(CHUNK).zip(dy.par_chunks(CHUNK).zip(x.par_chunks(CHUNK))).for_each(|(dx, (dy, x))| {
                dx.iter_mut().zip(dy.iter().zip(x)).for_each(|(dx, (&dy, &x))| *dx = gelu_grad(dy, x))
            })
        }
        None => dx
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(dx, x)| dx.iter_mut().zip(x).for_each(|(d, &x)| *d = gelu_grad(*d, x))),
    }
}

/// n as a kernel's u32 count.
fn checked_len(op: &OpCheck, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| op.invalid(format!("{n} values, more than a kernel indexes (2³² − 1)")))
}

/// y = gelu(x).
pub fn gelu_forward<T: Activation>(device: &Device, y: ViewMut<T>, x: View<T>) -> Result<()> {
    let op = OpCheck::new("gelu_forward", device);
    op.size("y", y.len(), x.len(), || "x's size".into())?;
    let n = checked_len(&op, x.len())?;
    if !matches!(device, Device::Cpu) {
        // SAFETY: y and x hold n values.
        return unsafe {
            device.launch(&T::GELU, grid_stride_config(n as usize, THREADS), (op.gpu_mut("y", y)?, op.gpu("x", x)?, n))
        };
    }
    cpu_gelu(op.cpu_f32_mut("y", y)?, op.cpu_f32("x", x)?);
    Ok(())
}

/// dx = dy·gelu'(x) (overwritten).
pub fn gelu_backward<T: Activation>(device: &Device, dx: ViewMut<T>, dy: View<T>, x: View<T>) -> Result<()> {
    let op = OpCheck::new("gelu_backward", device);
    op.size("dy", dy.len(), x.len(), || "x's size".into())?;
    op.size("dx", dx.len(), x.len(), || "x's size".into())?;
    let n = checked_len(&op, x.len())?;
    if !matches!(device, Device::Cpu) {
        let args = (op.gpu_mut("dx", dx)?, op.gpu("dy", dy)?, op.gpu("x", x)?, n);
        // SAFETY: dx, dy and x hold n values.
        return unsafe { device.launch(&T::GELU_BACKWARD, grid_stride_config(n as usize, THREADS), args) };
    }
    cpu_gelu_backward(op.cpu_f32_mut("dx", dx)?, Some(op.cpu_f32("dy", dy)?), op.cpu_f32("x", x)?);
    Ok(())
}

/// dx ← dx·gelu'(x) (the gradient at a GELU's output becomes the one at its input).
pub fn gelu_backward_in_place<T: Activation>(device: &Device, dx: ViewMut<T>, x: View<T>) -> Result<()> {
    let op = OpCheck::new("gelu_backward", device);
    op.size("dx", dx.len(), x.len(), || "x's size".into())?;
    let n = checked_len(&op, x.len())?;
    if !matches!(device, Device::Cpu) {
        let args = (op.gpu_mut("dx", dx)?, None::<View<T>>, op.gpu("x", x)?, n);
        // SAFETY: dx and x hold n values; the null dy makes the kernel read dx.
        return unsafe { device.launch(&T::GELU_BACKWARD, grid_stride_config(n as usize, THREADS), args) };
    }
    cpu_gelu_backward(op.cpu_f32_mut("dx", dx)?, None, op.cpu_f32("x", x)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gradient, values};
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let x: Vec<f32> = values(20, 1).iter().map(|v| v * 4.0).collect();
        let dy = values(20, 2);
        let mut dx = vec![0.0; 20];
        cpu_gelu_backward(&mut dx, Some(&dy), &x);
        assert_gradient("dx", &dx, &x, |x| {
            let mut y = vec![0.0; 20];
            cpu_gelu(&mut y, x);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum()
        });
        let mut in_place = dy.clone();
        cpu_gelu_backward(&mut in_place, None, &x);
        assert_eq!(in_place, dx);
    }
}
