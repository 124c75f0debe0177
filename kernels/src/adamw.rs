//! AdamW over a span of the flat model state (`host/src/ops/adamw.rs` holds the CPU reference and
//! the scalar settings): one thread per parameter, grid-stride. The global gradient norm is read
//! from device memory, so no host round trip decides the clipping or the skip of a non-finite
//! step. The same operation sequence as the CPU (Rust fuses nothing into FMAs, `math::sqrt` is
//! correctly rounded): the same bits on every device.
//!
//! Memory traffic: reads p, g, m, v and writes p, m, v and a zero into g: 32 bytes per
//! parameter, the minimum for an update that also clears the gradients for the next step.

use crate::hw::{Global, GlobalMut, grid_stride};
use crate::kernel;
use crate::math::sqrt;

/// Threads per block of `adamw_f32`.
pub const THREADS: u32 = 256;

kernel! {
    /// One AdamW step over n parameters; `norm[0]` is the global gradient norm: not finite, the
    /// kernel changes nothing; above `max_norm`, the gradients are scaled by max_norm / norm.
    ///
    /// # Safety
    /// `p`, `g`, `m`, `v` hold n floats, `norm` one.
    pub fn adamw_f32(
        p: GlobalMut<f32>,
        g: GlobalMut<f32>,
        m: GlobalMut<f32>,
        v: GlobalMut<f32>,
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
            grid_stride(n as usize, |i| {
                let grad = g.load(i);
                g.store(i, 0.0);
                let grad = if clip { grad * scale } else { grad };
                let (mi, vi) = (beta1 * m.load(i) + (1.0 - beta1) * grad, beta2 * v.load(i) + (1.0 - beta2) * grad * grad);
                m.store(i, mi);
                v.store(i, vi);
                let pi = p.load(i) * decay;
                p.store(i, pi - step_size * mi / (sqrt(vi) / bias2_sqrt + eps));
            });
        }
    }
}
