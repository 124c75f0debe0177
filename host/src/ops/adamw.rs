//! AdamW over a flat parameter state, as `torch.optim.AdamW` with open_clip's gradient clipping:
//! the gradients' global L2 norm (`grad_norm`) and, for norms above `max_norm`, the gradients
//! scaled by max_norm/norm inside the update. Decoupled weight decay p ← p·(1 − lr·wd), then
//! m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g², p ← p − lr/(1 − β1ᵗ) · m / (√v/√(1 − β2ᵗ) + ε).
//! The norm, the loss and the count of applied updates stay on the device, where a one-thread
//! kernel decides the step (`adamw_settings`): an update whose loss or norm is not finite changes
//! nothing but the gradients, which it clears. The state is
//! f32 (master weights, gradients, moments); a bf16 training step's update also writes the bf16
//! copy of the weights that its ops read (GPU devices).

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use clip_pgs_kernels::adamw::{self as kernel, settings};
use clip_pgs_kernels::math::powi;

use super::check::OpCheck;
use crate::device::Device;
use crate::error::Result;
use crate::launch::grid_stride_config;
use crate::view::{View, ViewMut};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
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

/// Decides one step (`kernels/src/adamw.rs`'s `adamw_settings_f32`): it updates when `loss`
/// [1] and `norm` [1] (from `grad_norm`) are finite, and then `steps` [1], the updates applied,
/// grows by one; `out` [settings::LEN] gets the decision, the clipping factor (gradients above
/// `max_norm` are scaled to it), the bias corrections for that count and the learning rate `lr`
/// [1]. On the device, so that no host read sits inside a training step, and the host's values
/// (`lr`) are read from device memory, so that a captured step replays with the current ones.
#[allow(clippy::too_many_arguments)]
pub fn adamw_settings(
    device: &Device,
    out: ViewMut<f32>,
    steps: ViewMut<u32>,
    norm: View<f32>,
    loss: View<f32>,
    lr: View<f32>,
    max_norm: Option<f32>,
    hyper: &AdamW,
) -> Result<()> {
    let op = OpCheck::new("adamw_settings", device);
    op.size("out", out.len(), settings::LEN, || format!("[{}]", settings::LEN))?;
    for (name, len) in [("steps", steps.len()), ("norm", norm.len()), ("loss", loss.len()), ("lr", lr.len())] {
        op.size(name, len, 1, || "[1]".into())?;
    }
    let (max_norm, beta1, beta2) = (max_norm.unwrap_or(f32::INFINITY), hyper.beta1, hyper.beta2);
    if !matches!(device, Device::Cpu) {
        let (out, steps) = (op.gpu_mut("out", out)?, op.gpu_mut("steps", steps)?);
        let (norm, loss, lr) = (op.gpu("norm", norm)?, op.gpu("loss", loss)?, op.gpu("lr", lr)?);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: out holds LEN floats, steps, norm, loss and lr one value each (checked above).
        return unsafe {
            device.launch(&kernel::adamw_settings_f32, cfg, (out, steps, norm, loss, lr, max_norm, beta1, beta2))
        };
    }
    let (out, steps) = (op.cpu_mut("out", out)?, op.cpu_mut("steps", steps)?);
    let (norm, loss, lr) = (op.cpu("norm", norm)?[0], op.cpu("loss", loss)?[0], op.cpu("lr", lr)?[0]);
    let apply = norm.is_finite() && loss.is_finite();
    steps[0] += apply as u32;
    out[settings::APPLY] = apply as u32 as f32;
    out[settings::CLIP] = if norm > max_norm { max_norm / norm } else { 1.0 };
    out[settings::BIAS1] = 1.0 - powi(beta1, steps[0]);
    out[settings::BIAS2_SQRT] = (1.0 - powi(beta2, steps[0])).sqrt();
    out[settings::LR] = lr;
    Ok(())
}

/// One AdamW step over `params` with `grads` and the moments `m`, `v` (all the same length), as
/// `settings` (from `adamw_settings`) decided. The gradients are consumed: each is zeroed once
/// read, ready for the next step's accumulation (no separate pass to clear them), also when the
/// step does not apply (then nothing else changes). With `params_bf16` (GPU devices), each
/// updated parameter is also written rounded to bf16 there, in the same pass.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    device: &Device,
    params: ViewMut<f32>,
    grads: ViewMut<f32>,
    m: ViewMut<f32>,
    v: ViewMut<f32>,
    params_bf16: Option<ViewMut<half::bf16>>,
    step: View<f32>,
    hyper: &AdamW,
    weight_decay: f32,
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
    op.size("settings", step.len(), settings::LEN, || format!("[{}]", settings::LEN))?;
    if n > u32::MAX as usize {
        return Err(op.invalid(format!("{n} parameters, more than a kernel indexes (2³² − 1)")));
    }
    let AdamW { beta1, beta2, eps } = *hyper;
    if !matches!(device, Device::Cpu) {
        let (p, g) = (op.gpu_mut("params", params)?, op.gpu_mut("grads", grads)?);
        let (m, v, step) = (op.gpu_mut("m", m)?, op.gpu_mut("v", v)?, op.gpu("settings", step)?);
        let copy = params_bf16.map(|c| op.gpu_mut("params_bf16", c)).transpose()?;
        let args = (p, g, m, v, copy, step, n as u32, beta1, beta2, eps, weight_decay);
        let cfg = grid_stride_config(n, kernel::THREADS);
        // SAFETY: the four buffers and the copy (unless None, a null pointer the kernel does not
        // write) hold n values and settings LEN (checked above).
        return unsafe { device.launch(&kernel::adamw_f32, cfg, args) };
    }
    // The cpu device computes in f32 and keeps no bf16 copy: `cpu_f32_mut` refuses it, before
    // anything is written.
    if let Some(copy) = params_bf16 {
        op.cpu_f32_mut("params_bf16", copy)?;
    }
    let (p, g, m, v) =
        (op.cpu_mut("params", params)?, op.cpu_mut("grads", grads)?, op.cpu_mut("m", m)?, op.cpu_mut("v", v)?);
    let step = op.cpu("settings", step)?;
    if step[settings::APPLY] == 0.0 {
        g.fill(0.0);
        return Ok(());
    }
    let (scale, bias2_sqrt, lr) = (step[settings::CLIP], step[settings::BIAS2_SQRT], step[settings::LR]);
    let decay = 1.0 - lr * weight_decay;
    let step_size = lr / step[settings::BIAS1];
    // Chunks of plain loops: rayon's element-wise zip of four slices compiles to a loop 4× slower.
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks_mut(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let g = std::mem::take(&mut g[i]) * scale;
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
        let opt = AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let dev = Device::Cpu;
        let (mut pb, mut gb, mut m, mut v, mut norm) = (
            Buffer::Cpu(p.to_vec()),
            Buffer::Cpu(g.to_vec()),
            Buffer::Cpu(vec![0.0; p.len()]),
            Buffer::Cpu(vec![0.0; p.len()]),
            Buffer::Cpu(vec![0.0f32]),
        );
        let (mut settings, mut steps, loss, lr) = (
            Buffer::Cpu(vec![0.0f32; settings::LEN]),
            Buffer::Cpu(vec![0u32]),
            Buffer::Cpu(vec![1.0f32]),
            Buffer::Cpu(vec![0.1f32]),
        );
        grad_norm(&dev, norm.view_mut(), gb.view()).unwrap();
        let (out, steps_view) = (settings.view_mut(), steps.view_mut());
        adamw_settings(&dev, out, steps_view, norm.view(), loss.view(), lr.view(), max_norm, &opt).unwrap();
        let finite = g.iter().all(|g| g.is_finite());
        assert_eq!(steps.to_vec().unwrap(), vec![finite as u32], "an update counts only when it applies");
        let (pv, gv) = (pb.view_mut(), gb.view_mut());
        adamw_update(&dev, pv, gv, m.view_mut(), v.view_mut(), None, settings.view(), &opt, wd).unwrap();
        assert!(gb.to_vec().unwrap().iter().all(|&g| g == 0.0), "gradients consumed by every update");
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
