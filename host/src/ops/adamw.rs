//! AdamW over a flat parameter state, as `torch.optim.AdamW` with open_clip's gradient clipping:
//! the gradients' global L2 norm (`grad_norm`) and, for norms above `max_norm`, the gradients
//! scaled by max_norm/norm inside the update. Decoupled weight decay p ← p·(1 − lr·wd), then
//! m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g², p ← p − lr/(1 − β1ᵗ) · m / (√v/√(1 − β2ᵗ) + ε).
//! The norm stays on the device: an update whose norm is not finite changes nothing. The state is
//! f32 (master weights, gradients, moments); a bf16 training step's update also writes the bf16
//! copy of the weights that its ops read (GPU devices).

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use clip_pgs_kernels::adamw as kernel;

use super::check::OpCheck;
use crate::device::Device;
use crate::error::Result;
use crate::launch::grid_stride_config;
use crate::view::{View, ViewMut};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

/// One update's step-dependent settings.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// Counts from 1.
    pub step: u32,
    pub weight_decay: f32,
    /// Clip the gradients to this global norm (open_clip's `--grad-clip-norm`).
    pub max_norm: Option<f32>,
}

/// out[0] = ‖grads‖₂ in a fixed order (the same on any thread count): on the CPU 64 parts, each
/// a sum in f64 of blocks of 256 squares summed in f32 over eight interleaved lanes
/// (vectorized); on a GPU `kernels/src/adamw.rs`'s 64 block sums (f32, another order).
pub fn grad_norm(device: &Device, out: ViewMut<f32>, grads: View<f32>) -> Result<()> {
    const PARTS: usize = 64;
    let op = OpCheck::new("grad_norm", device);
    op.size("out", out.len(), 1, || "[1]".into())?;
    if !matches!(device, Device::Cpu) {
        let (out, grads) = (op.gpu_mut("out", out)?, op.gpu("grads", grads)?);
        let n = u32::try_from(grads.len())
            .map_err(|_| op.invalid(format!("{} gradients, more than a kernel indexes", grads.len())))?;
        let parts = kernel::NORM_PARTS;
        let config = |blocks: u32| LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (kernel::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        return device.with_scratch(parts as usize, |mut scratch| {
            // SAFETY: grads holds n floats, scratch one per block, out one.
            unsafe {
                device.launch(&kernel::grad_norm_parts_f32, config(parts), (scratch.reborrow(), grads, n))?;
                device.launch(&kernel::grad_norm_finish_f32, config(1), (out, scratch.as_view(), parts))
            }
        });
    }
    let (out, grads) = (op.cpu_mut("out", out)?, op.cpu("grads", grads)?);
    let mut partials = [0.0f64; PARTS];
    let part = grads.len().div_ceil(PARTS).max(1);
    partials.par_iter_mut().zip(grads.par_chunks(part)).for_each(|(sum, part)| {
        *sum = part
            .chunks(256)
            .map(|block| {
                let mut lanes = [0.0f32; 8];
                for eight in block.chunks(8) {
                    lanes.iter_mut().zip(eight).for_each(|(l, &g)| *l += g * g);
                }
                lanes.iter().sum::<f32>() as f64
            })
            .sum();
    });
    out[0] = partials.iter().sum::<f64>().sqrt() as f32;
    Ok(())
}

/// One AdamW step over `params` with `grads` and the moments `m`, `v` (all the same length);
/// `norm` [1] is the global gradient norm from `grad_norm`. The gradients are consumed: each is
/// zeroed once read, ready for the next step's accumulation (no separate pass to clear them).
/// With `params_bf16` (GPU devices), each updated parameter is also written rounded to bf16
/// there, in the same pass. With a non-finite norm nothing changes, the gradients included.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    device: &Device,
    params: ViewMut<f32>,
    grads: ViewMut<f32>,
    m: ViewMut<f32>,
    v: ViewMut<f32>,
    params_bf16: Option<ViewMut<half::bf16>>,
    norm: View<f32>,
    hyper: &AdamW,
    at: AdamWStep,
) -> Result<()> {
    let op = OpCheck::new("adamw_update", device);
    let n = params.len();
    let copy_len = params_bf16.as_ref().map(|c| c.len());
    for (name, len) in [("grads", grads.len()), ("m", m.len()), ("v", v.len())]
        .into_iter()
        .chain(copy_len.map(|len| ("params_bf16", len)))
    {
        op.size(name, len, n, || "params' size".into())?;
    }
    op.size("norm", norm.len(), 1, || "[1]".into())?;
    if at.step == 0 {
        return Err(op.invalid("step counts from 1"));
    }
    if n > u32::MAX as usize {
        return Err(op.invalid(format!("{n} parameters, more than a kernel indexes (2³² − 1)")));
    }
    let bias1 = 1.0 - hyper.beta1.powi(at.step as i32);
    let bias2_sqrt = (1.0 - hyper.beta2.powi(at.step as i32)).sqrt();
    let step_size = hyper.lr / bias1;
    let decay = 1.0 - hyper.lr * at.weight_decay;
    let AdamW { beta1, beta2, eps, .. } = *hyper;
    if !matches!(device, Device::Cpu) {
        let (p, g) = (op.gpu_mut("params", params)?, op.gpu_mut("grads", grads)?);
        let (m, v, norm) = (op.gpu_mut("m", m)?, op.gpu_mut("v", v)?, op.gpu("norm", norm)?);
        let copy = params_bf16.map(|c| op.gpu_mut("params_bf16", c)).transpose()?;
        let max_norm = at.max_norm.unwrap_or(f32::INFINITY);
        let args = (p, g, m, v, copy, norm, n as u32, max_norm, beta1, beta2, eps, step_size, bias2_sqrt, decay);
        let cfg = grid_stride_config(n, kernel::THREADS);
        // SAFETY: the four buffers and the copy (unless None, a null pointer the kernel does not
        // write) hold n values and norm one (checked above).
        return unsafe { device.launch(&kernel::adamw_f32, cfg, args) };
    }
    // The cpu device computes in f32 and keeps no bf16 copy: `cpu_f32_mut` refuses it, before
    // anything is written.
    if let Some(copy) = params_bf16 {
        op.cpu_f32_mut("params_bf16", copy)?;
    }
    let (p, g, m, v) =
        (op.cpu_mut("params", params)?, op.cpu_mut("grads", grads)?, op.cpu_mut("m", m)?, op.cpu_mut("v", v)?);
    let norm = op.cpu("norm", norm)?[0];
    if !norm.is_finite() {
        return Ok(());
    }
    let clip = at.max_norm.filter(|&max| norm > max).map(|max| max / norm);
    // Chunks of plain loops: rayon's element-wise zip of four slices compiles to a loop 4× slower.
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks_mut(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let g = std::mem::take(&mut g[i]);
                let g = clip.map_or(g, |c| g * c);
                p[i] *= decay;
                m[i] = beta1 * m[i] + (1.0 - beta1) * g;
                v[i] = beta2 * v[i] + (1.0 - beta2) * g * g;
                p[i] -= step_size * m[i] / (v[i].sqrt() / bias2_sqrt + eps);
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;

    fn step(p: &[f32], g: &[f32], wd: f32, max_norm: Option<f32>) -> Vec<f32> {
        let opt = AdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let dev = Device::Cpu;
        let (mut pb, mut gb, mut m, mut v, mut norm) = (
            Buffer::Cpu(p.to_vec()),
            Buffer::Cpu(g.to_vec()),
            Buffer::Cpu(vec![0.0; p.len()]),
            Buffer::Cpu(vec![0.0; p.len()]),
            Buffer::Cpu(vec![0.0f32]),
        );
        grad_norm(&dev, norm.view_mut(), gb.view()).unwrap();
        let at = AdamWStep { step: 1, weight_decay: wd, max_norm };
        let (pv, gv) = (pb.view_mut(), gb.view_mut());
        adamw_update(&dev, pv, gv, m.view_mut(), v.view_mut(), None, norm.view(), &opt, at).unwrap();
        let finite = g.iter().all(|g| g.is_finite());
        assert_eq!(gb.to_vec().unwrap().iter().all(|&g| g == 0.0), finite, "gradients consumed only by an update");
        pb.to_vec().unwrap()
    }

    #[test]
    fn first_step_moves_each_weight_by_about_lr() {
        // With bias correction the first step is lr·g/(|g| + ε′): about lr against the gradient.
        let p = step(&[1.0, -2.0], &[0.5, -3.0], 0.0, None);
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 1.9).abs() < 1e-6, "{p:?}");
        assert!((step(&[1.0], &[0.0], 0.5, None)[0] - 0.95).abs() < 1e-7, "decay only");
        // Clipping scales g, and Adam's first step is invariant to the scale of g.
        let clipped = step(&[1.0, -2.0], &[0.5, -3.0], 0.0, Some(0.01));
        assert!(clipped.iter().zip(&p).all(|(a, b)| (a - b).abs() < 1e-5), "{clipped:?} vs {p:?}");
        // A non-finite norm leaves the parameters alone.
        assert_eq!(step(&[1.0, -2.0], &[f32::NAN, 1.0], 0.0, None), vec![1.0, -2.0]);
    }
}
