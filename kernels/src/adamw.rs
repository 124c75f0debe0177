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
//! for the next step.
//!
//! The global gradient norm before it: `grad_norm_parts_f32` (NORM_PARTS blocks, each a
//! grid-stride sum of squares reduced over the block; each gradient loaded once and squared in a
//! register: 4 bytes read per gradient, the minimum)
//! and `grad_norm_finish_f32` (one block: √Σ parts). A fixed grid: the same sum order on every
//! run.

use crate::element::Bf16;
use crate::hw::{Global, GlobalMut, block_stride, block_x, grid_stride, thread_x};
use crate::kernel;
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
        let mut sum = 0.0f32;
        grid_stride(n as usize, |i| {
            // SAFETY: i < n.
            let v = unsafe { g.load(i) };
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
    pub const LEN: usize = 4;
}

kernel! {
    /// Decides one step on the device (one thread): it updates when the loss and the gradient
    /// norm are finite; then steps[0] (the updates applied) grows by one and `out` gets the
    /// clipping factor and the bias corrections of that count (see [`settings`]). No host reads
    /// the loss or the norm to decide.
    ///
    /// # Safety
    /// `out` holds settings::LEN floats, `steps`, `norm` and `loss` one value each.
    pub fn adamw_settings_f32(
        out: GlobalMut<f32>,
        steps: GlobalMut<u32>,
        norm: Global<f32>,
        loss: Global<f32>,
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
        }
    }
}

kernel! {
    /// One AdamW step over n parameters with the step's `settings` (`adamw_settings_f32`): when
    /// it does not apply, only the gradients are cleared. Unless `copy` is null, copy[i] =
    /// bf16(p[i]) after the update.
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
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        decay: f32,
    ) {
        // SAFETY: settings holds LEN floats; i < n, the length of the others.
        unsafe {
            if settings.load(settings::APPLY) == 0.0 {
                grid_stride(n as usize, |i| g.store(i, 0.0));
                return;
            }
            let scale = settings.load(settings::CLIP);
            let step_size = lr / settings.load(settings::BIAS1);
            let bias2_sqrt = settings.load(settings::BIAS2_SQRT);
            let with_copy = !copy.is_null();
            grid_stride(n as usize, |i| {
                let grad = g.load(i) * scale;
                g.store(i, 0.0);
                let (mi, vi) = (beta1 * m.load(i) + (1.0 - beta1) * grad, beta2 * v.load(i) + (1.0 - beta2) * grad * grad);
                m.store(i, mi);
                v.store(i, vi);
                let pi = p.load(i) * decay;
                let pi = pi - step_size * mi / (sqrt(vi) / bias2_sqrt + eps);
                p.store(i, pi);
                if with_copy {
                    copy.store(i, Bf16::from_f32(pi));
                }
            });
        }
    }
}
