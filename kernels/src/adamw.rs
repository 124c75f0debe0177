//! AdamW over a span of the flat model state (`host/src/ops/adamw.rs` holds the CPU reference):
//! one thread per parameter, grid-stride. Whether the step updates at all (a finite loss and
//! gradient norm), the clipping factor and the bias corrections are decided on the device by a
//! one-thread kernel from the loss, the norm and the device's count of applied updates, so no
//! host round trip sits inside a training step. The same operation sequence as the CPU (Rust fuses nothing into FMAs, `math::sqrt` is
//! correctly rounded): the same bits on every device. The parameters, gradients and moments are
//! f32 (the master weights); with a bf16 training step the update also writes each new
//! parameter rounded to bf16 (to nearest even) into the bf16 copy the ops read, in the same pass.
//!
//! Memory traffic: reads p, g, m, v and writes p, m, v and a zero into g: 32 bytes per
//! parameter, 34 with the bf16 copy, the minimum for an update that also clears the gradients
//! for the next step; in 128-bit accesses (four parameters a thread), so that a warp's request
//! covers 16 whole sectors and the kernel issues a quarter of the memory instructions.
//!
//! The global gradient norm before it: `grad_norm_parts_f32` (NORM_PARTS blocks, each a
//! grid-stride sum of squares reduced over the block; each gradient loaded once, four per
//! 128-bit load, and squared in a register: 4 bytes read per gradient, the minimum)
//! and `grad_norm_finish_f32` (one block: √Σ parts). A fixed grid: the same sum order on every
//! run.

use crate::element::{Bf16, Bf16x4, F32x4};
use crate::hw::{Global, GlobalMut, block_stride, block_x, grid_stride, thread_x};
use crate::kernel;
use crate::map::starts_pack;
use crate::math::{powi, sqrt};
use crate::reduce::block_reduce;

/// Threads per block of `adamw_f32` and the norm's kernels.
pub const THREADS: u32 = 256;

/// Blocks (partial sums) of `grad_norm_parts_f32`.
pub const NORM_PARTS: u32 = 64;

kernel! {
    /// parts[block] = Σ g² over the block's grid-stride share of n gradients.
    ///
    /// # Safety
    /// `g` holds n floats, `parts` one per block.
    pub fn grad_norm_parts_f32(parts: GlobalMut<f32>, g: Global<f32>, n: u32) {
        let n = n as usize;
        // Four gradients per 128-bit load when g is 16-byte aligned, then the last n mod 4.
        let groups = if starts_pack::<F32x4>(g.sector_offset()) { n / 4 } else { 0 };
        let g4 = g.cast::<F32x4>();
        let mut sum = 0.0f32;
        grid_stride(groups, |j| {
            // SAFETY: j < n / 4.
            let [a, b, c, d] = unsafe { g4.load(j) }.0;
            sum += (a * a + b * b) + (c * c + d * d);
        });
        let rest = 4 * groups;
        grid_stride(n - rest, |i| {
            // SAFETY: rest + i < n.
            let v = unsafe { g.load(rest + i) };
            sum += v * v;
        });
        let sum = block_reduce(sum, 0.0, |a, b| a + b);
        if thread_x() == 0 {
            // SAFETY: one part per block.
            unsafe { parts.store(block_x(), sum) };
        }
    }
}

kernel! {
    /// norm[0] = √Σ parts (one block).
    ///
    /// # Safety
    /// `parts` holds `count` floats, `norm` one.
    pub fn grad_norm_finish_f32(norm: GlobalMut<f32>, parts: Global<f32>, count: u32) {
        let mut sum = 0.0f32;
        // SAFETY: i < count.
        block_stride(count as usize, |i| sum += unsafe { parts.load(i) });
        let sum = block_reduce(sum, 0.0, |a, b| a + b);
        if thread_x() == 0 {
            // SAFETY: norm holds one float.
            unsafe { norm.store(0, sqrt(sum)) };
        }
    }
}

/// The step's settings `adamw_settings_f32` writes for `adamw_f32`, by index.
pub mod settings {
    /// 1 when the step updates (loss and gradient norm finite), else 0.
    pub const APPLY: usize = 0;
    /// What the gradients are multiplied by: max_norm / norm above max_norm, else 1.
    pub const CLIP: usize = 1;
    /// 1 − β1ᵗ and √(1 − β2ᵗ), t = the updates applied so far, this one included.
    pub const BIAS1: usize = 2;
    pub const BIAS2_SQRT: usize = 3;
    /// The learning rate, copied from device memory the host writes before the step (a captured
    /// step replays with the current rate).
    pub const LR: usize = 4;
    pub const LEN: usize = 5;
}

kernel! {
    /// Decides one step on the device (one thread): it updates when the loss and the gradient
    /// norm are finite; then steps[0] (the updates applied) grows by one and `out` gets the
    /// clipping factor and the bias corrections of that count and the learning rate `lr` (see
    /// [`settings`]). No host reads the loss or the norm to decide.
    ///
    /// # Safety
    /// `out` holds settings::LEN floats, `steps`, `norm`, `loss` and `lr` one value each.
    pub fn adamw_settings_f32(
        out: GlobalMut<f32>,
        steps: GlobalMut<u32>,
        norm: Global<f32>,
        loss: Global<f32>,
        lr: Global<f32>,
        max_norm: f32,
        beta1: f32,
        beta2: f32,
    ) {
        if thread_x() + block_x() > 0 {
            return;
        }
        // SAFETY: the lengths above.
        unsafe {
            let norm = norm.load(0);
            let apply = norm.is_finite() && loss.load(0).is_finite();
            let t = steps.load(0) + apply as u32;
            steps.store(0, t);
            out.store(settings::APPLY, apply as u32 as f32);
            out.store(settings::CLIP, if norm > max_norm { max_norm / norm } else { 1.0 });
            out.store(settings::BIAS1, 1.0 - powi(beta1, t));
            out.store(settings::BIAS2_SQRT, sqrt(1.0 - powi(beta2, t)));
            out.store(settings::LR, lr.load(0));
        }
    }
}

/// The step's factors, as `adamw_f32` reads them from the settings.
#[derive(Clone, Copy)]
struct Factors {
    scale: f32,
    decay: f32,
    step_size: f32,
    bias2_sqrt: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
}

impl Factors {
    /// One parameter's update from its gradient: (p, m, v) after the step. The CPU reference
    /// (`host/src/ops/adamw.rs`) does the same operations in the same order.
    #[inline(always)]
    fn update(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let Factors { scale, decay, step_size, bias2_sqrt, beta1, beta2, eps } = *self;
        let grad = g * scale;
        let (m, v) = (beta1 * m + (1.0 - beta1) * grad, beta2 * v + (1.0 - beta2) * grad * grad);
        let p = p * decay;
        (p - step_size * m / (sqrt(v) / bias2_sqrt + eps), m, v)
    }
}

kernel! {
    /// One AdamW step over n parameters with the step's `settings` (`adamw_settings_f32`), weight
    /// decay p·(1 − lr·weight_decay): when it does not apply, only the gradients are cleared.
    /// Unless `copy` is null, copy[i] = bf16(p[i]) after the update. Four parameters per thread
    /// and 128-bit accesses (64-bit for the copy) when the five arrays are aligned alike, as
    /// spans of one flat state are; one per thread otherwise, and for the last n mod 4.
    ///
    /// # Safety
    /// `p`, `g`, `m`, `v` and `copy` (unless null) hold n values, `settings` settings::LEN.
    pub fn adamw_f32(
        p: GlobalMut<f32>,
        g: GlobalMut<f32>,
        m: GlobalMut<f32>,
        v: GlobalMut<f32>,
        copy: GlobalMut<Bf16>,
        settings: Global<f32>,
        n: u32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    ) {
        let n = n as usize;
        // SAFETY: settings holds LEN floats; every index below is under n, the others' length.
        unsafe {
            if settings.load(settings::APPLY) == 0.0 {
                grid_stride(n, |i| g.store(i, 0.0));
                return;
            }
            let lr = settings.load(settings::LR);
            let factors = Factors {
                scale: settings.load(settings::CLIP),
                decay: 1.0 - lr * weight_decay,
                step_size: lr / settings.load(settings::BIAS1),
                bias2_sqrt: settings.load(settings::BIAS2_SQRT),
                beta1,
                beta2,
                eps,
            };
            let with_copy = !copy.is_null();
            let one = |i: usize| {
                let (pi, mi, vi) = factors.update(p.load(i), g.load(i), m.load(i), v.load(i));
                g.store(i, 0.0);
                m.store(i, mi);
                v.store(i, vi);
                p.store(i, pi);
                if with_copy {
                    copy.store(i, Bf16::from_f32(pi));
                }
            };
            // The f32 arrays at a 16-byte boundary, the copy at an 8-byte one.
            let aligned = [g.sector_offset(), m.sector_offset(), v.sector_offset(), p.sector_offset()]
                .iter()
                .all(|&o| starts_pack::<F32x4>(o))
                && (!with_copy || starts_pack::<Bf16x4>(copy.sector_offset()));
            let groups = if aligned { n / 4 } else { 0 };
            let (p4, g4, m4, v4) = (p.cast::<F32x4>(), g.cast::<F32x4>(), m.cast::<F32x4>(), v.cast::<F32x4>());
            let copy4 = copy.cast::<Bf16x4>();
            grid_stride(groups, |j| {
                let (ps, gs, ms, vs) = (p4.load(j).0, g4.load(j).0, m4.load(j).0, v4.load(j).0);
                let (mut p_new, mut m_new, mut v_new) = ([0.0f32; 4], [0.0f32; 4], [0.0f32; 4]);
                for k in 0..4 {
                    (p_new[k], m_new[k], v_new[k]) = factors.update(ps[k], gs[k], ms[k], vs[k]);
                }
                g4.store(j, F32x4([0.0; 4]));
                m4.store(j, F32x4(m_new));
                v4.store(j, F32x4(v_new));
                p4.store(j, F32x4(p_new));
                if with_copy {
                    copy4.store(j, Bf16x4(p_new.map(Bf16::from_f32)));
                }
            });
            // The rest, one per thread: the last n mod 4, or everything when misaligned.
            let rest = 4 * groups;
            grid_stride(n - rest, |i| one(rest + i));
        }
    }
}
