//! AdamW over a span of the flat model state (`host/src/ops/adamw.rs` holds the CPU reference and
//! the scalar settings): one thread per parameter, grid-stride. The global gradient norm is read
//! from device memory, so no host round trip decides the clipping or the skip of a non-finite
//! step. The same operation sequence as the CPU (Rust fuses nothing into FMAs, `math::sqrt` is
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
use crate::math::sqrt;
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

kernel! {
    /// One AdamW step over n parameters; `norm[0]` is the global gradient norm: not finite, the
    /// kernel changes nothing; above `max_norm`, the gradients are scaled by max_norm / norm.
    /// Unless `copy` is null, copy[i] = bf16(p[i]) after the update.
    ///
    /// # Safety
    /// `p`, `g`, `m`, `v` and `copy` (unless null) hold n values, `norm` one.
    pub fn adamw_f32(
        p: GlobalMut<f32>,
        g: GlobalMut<f32>,
        m: GlobalMut<f32>,
        v: GlobalMut<f32>,
        copy: GlobalMut<Bf16>,
        norm: Global<f32>,
        n: u32,
        max_norm: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        step_size: f32,
        bias2_sqrt: f32,
        decay: f32,
    ) {
        // SAFETY: norm holds one float; i < n, the length of the others.
        unsafe {
            let norm = norm.load(0);
            if !norm.is_finite() {
                return;
            }
            let clip = norm > max_norm;
            let scale = max_norm / norm;
            let with_copy = !copy.is_null();
            grid_stride(n as usize, |i| {
                let grad = g.load(i);
                g.store(i, 0.0);
                let grad = if clip { grad * scale } else { grad };
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
