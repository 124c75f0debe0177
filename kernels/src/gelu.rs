//! Exact (erf) GELU, as open_clip's `nn.GELU()`, forward and backward: the math shared with the
//! CPU reference (`host/src/ops/gelu.rs`), and the kernels for activations no linear layer's
//! epilogue produces. gelu(x) = x·Φ(x), Φ(x) = (1 + erf(x/√2))/2; gelu'(x) = Φ(x) + x·φ(x).
//!
//! Grid-stride, one element per thread per iteration. Memory traffic: forward reads x and writes
//! y, backward reads dy and x and writes dx, 4 bytes each per element: the analytic minimum.

use core::f32::consts::{FRAC_1_SQRT_2, PI};

use crate::hw::{Global, GlobalMut, grid_stride};
use crate::kernel;
use crate::math::{erf, fast_exp, sqrt};

/// Threads per block of the GELU kernels.
pub const THREADS: u32 = 256;

/// Φ(x), the standard normal CDF.
#[inline(always)]
pub fn cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// gelu(x) = x·Φ(x).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    x * cdf(x)
}

/// dy·gelu'(x) = dy·(Φ(x) + x·φ(x)).
#[inline(always)]
pub fn gelu_grad(dy: f32, x: f32) -> f32 {
    let inv_sqrt_2pi = 1.0 / sqrt(2.0 * PI);
    dy * (cdf(x) + x * fast_exp(-0.5 * x * x) * inv_sqrt_2pi)
}

kernel! {
    /// y[i] = gelu(x[i]) for i < n.
    ///
    /// # Safety
    /// `y` and `x` hold n floats.
    pub fn gelu_f32(y: GlobalMut<f32>, x: Global<f32>, n: u32) {
        // SAFETY: i < n.
        grid_stride(n as usize, |i| unsafe { y.store(i, gelu(x.load(i))) });
    }
}

kernel! {
    /// dx[i] = dy[i]·gelu'(x[i]) for i < n.
    ///
    /// # Safety
    /// `dx`, `dy` and `x` hold n floats.
    pub fn gelu_backward_f32(dx: GlobalMut<f32>, dy: Global<f32>, x: Global<f32>, n: u32) {
        // SAFETY: i < n.
        grid_stride(n as usize, |i| unsafe { dx.store(i, gelu_grad(dy.load(i), x.load(i))) });
    }
}
