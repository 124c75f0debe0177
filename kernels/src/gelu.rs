//! Exact (erf) GELU, as open_clip's `nn.GELU()`, forward and backward: the math shared with the
//! CPU reference (`host/src/ops/gelu.rs`), and the kernels for activations no linear layer's
//! epilogue produces. gelu(x) = x·Φ(x), Φ(x) = (1 + erf(x/√2))/2; gelu'(x) = Φ(x) + x·φ(x).
//!
//! The elementwise loop of `map.rs`: grid-stride, a 16-byte vector per view per thread and step
//! (4 f32 or 8 bf16 elements, one 128-bit access each); one body per kernel over the element type
//! (`_f32` and `_bf16` entry points), computing in f32. Memory traffic: forward reads x and
//! writes y, backward reads dy and x and writes dx, s bytes each per element (s = 4 for f32, 2
//! for bf16): the analytic minimum, in whole sectors, with one warp request per 512 bytes.

use core::f32::consts::{FRAC_1_SQRT_2, PI};

use crate::element::{Bf16, Element};
use crate::hw::{Global, GlobalMut};
use crate::kernel;
use crate::map::map;
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

/// cuBLASLt's GELU (its GELU_AUX_BIAS and DGELU epilogues): the tanh approximation
/// gelu(x) ≈ x·σ(2u), u = √(2/π)·(x + 0.044715·x³), written with the logistic σ(2u) =
/// (1 + tanh u)/2. Within 1e-3 of the exact GELU; open_clip trains with the exact one.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    x * logistic(2.0 * tanh_arg(x))
}

/// dy·d/dx of `gelu_tanh`: σ(2u) + x·σ(2u)(1 − σ(2u))·2u'(x).
#[inline(always)]
pub fn gelu_tanh_grad(dy: f32, x: f32) -> f32 {
    let s = logistic(2.0 * tanh_arg(x));
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
    dy * (s + x * s * (1.0 - s) * 2.0 * du)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

#[inline(always)]
fn tanh_arg(x: f32) -> f32 {
    SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
}

#[inline(always)]
fn logistic(z: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-z))
}

/// # Safety
/// `y` and `x` hold n elements.
#[inline(always)]
unsafe fn forward<T: Element>(y: GlobalMut<T>, x: Global<T>, n: u32) {
    // SAFETY: the caller's contract.
    unsafe { map::<T::Vector, T::Vector, 1>(y, [x], n as usize, |[x]| T::from_f32(gelu(x.to_f32()))) }
}

/// # Safety
/// `dx`, `dy` (unless null) and `x` hold n elements.
#[inline(always)]
unsafe fn backward<T: Element>(dx: GlobalMut<T>, dy: Global<T>, x: Global<T>, n: u32) {
    let dy = if dy.is_null() { dx.read_only() } else { dy };
    // SAFETY: the caller's contract; in place, each element is read before it is overwritten.
    unsafe {
        map::<T::Vector, T::Vector, 2>(dx, [dy, x], n as usize, |[dy, x]| {
            T::from_f32(gelu_grad(dy.to_f32(), x.to_f32()))
        })
    }
}

macro_rules! gelu_entries {
    ($t:ty, $forward:ident, $backward:ident) => {
        kernel! {
            /// y[i] = gelu(x[i]) for i < n.
            ///
            /// # Safety
            /// `y` and `x` hold n elements.
            pub fn $forward(y: GlobalMut<$t>, x: Global<$t>, n: u32) {
                // SAFETY: the caller's contract, the same as forward's.
                unsafe { forward(y, x, n) }
            }
        }

        kernel! {
            /// dx[i] = dy[i]·gelu'(x[i]) for i < n; with a null `dy`, in place: dx[i] =
            /// dx[i]·gelu'(x[i]).
            ///
            /// # Safety
            /// `dx`, `dy` (unless null) and `x` hold n elements.
            pub fn $backward(dx: GlobalMut<$t>, dy: Global<$t>, x: Global<$t>, n: u32) {
                // SAFETY: the caller's contract, the same as backward's.
                unsafe { backward(dx, dy, x, n) }
            }
        }
    };
}
gelu_entries!(f32, gelu_f32, gelu_backward_f32);
gelu_entries!(Bf16, gelu_bf16, gelu_backward_bf16);
