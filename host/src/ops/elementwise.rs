//! Elementwise ops: a broadcast add (positional embeddings, the residual stream), fill, clamp,
//! over f32 or bf16 tensors (`dtype::Activation`; bf16 on the GPU devices only). CPU reference
//! here, kernels in `kernels/src/elementwise.rs` (CUDA and the emulator).

use rayon::prelude::*;

use clip_pgs_kernels::elementwise::{THREADS, broadcast_threads};
use clip_pgs_kernels::map::threads;

use super::check::OpCheck;
use super::dtype::Activation;
use crate::device::Device;
use crate::error::Result;
use crate::launch::grid_stride_config;
use crate::view::{View, ViewMut};

fn check_len(op: &OpCheck, tensor: &str, n: usize) -> Result<()> {
    if n > u32::MAX as usize {
        return Err(op.invalid(format!("{tensor} has {n} values, more than a kernel indexes (2³² − 1)")));
    }
    Ok(())
}

/// b tiles a's n values: its length divides n.
fn check_tiles(op: &OpCheck, b: usize, n: usize, what: &str) -> Result<()> {
    if b == 0 || !n.is_multiple_of(b) {
        return Err(op.invalid(format!("b has {b} values, which do not tile {what}'s {n}")));
    }
    check_len(op, what, n)
}

/// out[i] = a[i] + b[i mod len(b)] (b repeats: one row added to every row, or a same-sized add).
pub fn add<T: Activation>(device: &Device, out: ViewMut<T>, a: View<T>, b: View<T>) -> Result<()> {
    let op = OpCheck::new("add", device);
    op.size("out", out.len(), a.len(), || "a's size".into())?;
    check_tiles(&op, b.len(), a.len(), "a")?;
    let (n, period) = (a.len() as u32, b.len() as u32);
    if !matches!(device, Device::Cpu) {
        let args = (op.gpu_mut("out", out)?, op.gpu("a", a)?, op.gpu("b", b)?, n, period);
        let cfg = grid_stride_config(broadcast_threads(n as usize, period as usize, T::LANES), THREADS);
        // SAFETY: out and a hold n values, b holds period, which divides n (checked above).
        return unsafe { device.launch(&T::ADD, cfg, args) };
    }
    let (out, a, b) = (op.cpu_f32_mut("out", out)?, op.cpu_f32("a", a)?, op.cpu_f32("b", b)?);
    out.par_chunks_mut(b.len()).zip(a.par_chunks(b.len())).for_each(|(o, a)| {
        o.iter_mut().zip(a).zip(b).for_each(|((o, a), b)| *o = a + b);
    });
    Ok(())
}

/// x[i] += b[i mod len(b)].
pub fn add_assign<T: Activation>(device: &Device, x: ViewMut<T>, b: View<T>) -> Result<()> {
    let op = OpCheck::new("add_assign", device);
    check_tiles(&op, b.len(), x.len(), "x")?;
    let (n, period) = (x.len() as u32, b.len() as u32);
    if !matches!(device, Device::Cpu) {
        let args = (op.gpu_mut("x", x)?, op.gpu("b", b)?, n, period);
        let cfg = grid_stride_config(broadcast_threads(n as usize, period as usize, T::LANES), THREADS);
        // SAFETY: x holds n values, b holds period, which divides n (checked above).
        return unsafe { device.launch(&T::ADD_ASSIGN, cfg, args) };
    }
    let (x, b) = (op.cpu_f32_mut("x", x)?, op.cpu_f32("b", b)?);
    x.par_chunks_mut(b.len()).for_each(|x| x.iter_mut().zip(b).for_each(|(x, b)| *x += b));
    Ok(())
}

/// x[i] = value (rounded to x's element type).
pub fn fill<T: Activation>(device: &Device, x: ViewMut<T>, value: f32) -> Result<()> {
    let op = OpCheck::new("fill", device);
    check_len(&op, "x", x.len())?;
    if !matches!(device, Device::Cpu) {
        let n = x.len() as u32;
        // SAFETY: x holds n values.
        return unsafe {
            device.launch(
                &T::FILL,
                grid_stride_config(threads(n as usize, T::LANES), THREADS),
                (op.gpu_mut("x", x)?, n, value),
            )
        };
    }
    op.cpu_f32_mut("x", x)?.par_chunks_mut(1 << 16).for_each(|x| x.fill(value));
    Ok(())
}

/// x ← min(max(x, lo), hi), lo ≤ hi.
pub fn clamp<T: Activation>(device: &Device, x: ViewMut<T>, lo: f32, hi: f32) -> Result<()> {
    let op = OpCheck::new("clamp", device);
    check_len(&op, "x", x.len())?;
    if lo.partial_cmp(&hi).is_none_or(|o| o.is_gt()) {
        return Err(op.invalid(format!("the bounds [{lo}, {hi}] are not an interval")));
    }
    if !matches!(device, Device::Cpu) {
        let n = x.len() as u32;
        // SAFETY: x holds n values.
        return unsafe {
            device.launch(
                &T::CLAMP,
                grid_stride_config(threads(n as usize, T::LANES), THREADS),
                (op.gpu_mut("x", x)?, n, lo, hi),
            )
        };
    }
    op.cpu_f32_mut("x", x)?.iter_mut().for_each(|x| *x = x.clamp(lo, hi));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;

    #[test]
    fn add_broadcasts_a_row_and_refuses_a_row_that_does_not_tile() {
        let (a, b, mut out) =
            (Buffer::Cpu(vec![1.0f32, 2.0, 3.0, 4.0]), Buffer::Cpu(vec![10.0f32, 20.0]), Buffer::Cpu(vec![0.0f32; 4]));
        add(&Device::Cpu, out.view_mut(), a.view(), b.view()).unwrap();
        assert_eq!(out.to_vec().unwrap(), vec![11.0, 22.0, 13.0, 24.0]);
        let c = Buffer::Cpu(vec![0.0f32; 3]);
        assert!(
            add(&Device::Cpu, out.view_mut(), a.view(), c.view())
                .unwrap_err()
                .to_string()
                .contains("add: b has 3 values")
        );
        assert!(
            clamp(&Device::Cpu, out.view_mut(), 1.0, f32::NAN).unwrap_err().to_string().contains("not an interval")
        );
    }
}
