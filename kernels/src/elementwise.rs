//! Elementwise kernels of the model's ops (`host/src/ops/elementwise.rs` holds their CPU
//! reference): a broadcast add (positional embeddings, the residual stream), fill, clamp. One
//! body each over an element type T (`_f32` and `_bf16` entry points): load, compute in f32,
//! store rounded to T.
//!
//! Grid-stride loops over n elements, one element per thread per iteration: consecutive threads
//! touch consecutive elements (coalesced). Memory traffic, s = 4 bytes per f32 element, 2 per
//! bf16: add reads a and b (b from cache when it repeats) and writes out, n·s bytes each;
//! add_assign reads and writes x; fill writes x; clamp reads and writes x: the analytic minimum.

use crate::element::{Bf16, Element};
use crate::hw::{Global, GlobalMut, grid_stride};
use crate::kernel;

/// Threads per block of every elementwise kernel.
pub const THREADS: u32 = 256;

/// # Safety
/// `out` and `a` hold n elements, `b` holds period ≥ 1.
#[inline(always)]
unsafe fn add<T: Element>(out: GlobalMut<T>, a: Global<T>, b: Global<T>, n: u32, period: u32) {
    // SAFETY: i < n and i mod period < period, the lengths the caller gives (n < 2³², so the
    // 32-bit remainder, much cheaper than a 64-bit one on the GPU, is exact).
    grid_stride(n as usize, |i| unsafe {
        let sum = a.load(i).to_f32() + b.load((i as u32 % period) as usize).to_f32();
        out.store(i, T::from_f32(sum))
    });
}

/// # Safety
/// `x` holds n elements, `b` holds period ≥ 1.
#[inline(always)]
unsafe fn add_assign<T: Element>(x: GlobalMut<T>, b: Global<T>, n: u32, period: u32) {
    // SAFETY: as in `add`.
    grid_stride(n as usize, |i| unsafe {
        let sum = x.load(i).to_f32() + b.load((i as u32 % period) as usize).to_f32();
        x.store(i, T::from_f32(sum))
    });
}

/// # Safety
/// `x` holds n elements.
#[inline(always)]
unsafe fn fill<T: Element>(x: GlobalMut<T>, n: u32, value: f32) {
    let value = T::from_f32(value);
    // SAFETY: i < n.
    grid_stride(n as usize, |i| unsafe { x.store(i, value) });
}

/// # Safety
/// `x` holds n elements.
#[inline(always)]
unsafe fn clamp<T: Element>(x: GlobalMut<T>, n: u32, lo: f32, hi: f32) {
    // SAFETY: i < n.
    grid_stride(n as usize, |i| unsafe { x.store(i, T::from_f32(x.load(i).to_f32().clamp(lo, hi))) });
}

macro_rules! elementwise_entries {
    ($t:ty, $add:ident, $add_assign:ident, $fill:ident, $clamp:ident) => {
        kernel! {
            /// out[i] = a[i] + b[i mod period] for i < n.
            ///
            /// # Safety
            /// `out` and `a` hold n elements, `b` holds period ≥ 1.
            pub fn $add(out: GlobalMut<$t>, a: Global<$t>, b: Global<$t>, n: u32, period: u32) {
                // SAFETY: the caller's contract, the same as add's.
                unsafe { add(out, a, b, n, period) }
            }
        }

        kernel! {
            /// x[i] += b[i mod period] for i < n.
            ///
            /// # Safety
            /// `x` holds n elements, `b` holds period ≥ 1.
            pub fn $add_assign(x: GlobalMut<$t>, b: Global<$t>, n: u32, period: u32) {
                // SAFETY: the caller's contract, the same as add_assign's.
                unsafe { add_assign(x, b, n, period) }
            }
        }

        kernel! {
            /// x[i] = value for i < n.
            ///
            /// # Safety
            /// `x` holds n elements.
            pub fn $fill(x: GlobalMut<$t>, n: u32, value: f32) {
                // SAFETY: the caller's contract, the same as fill's.
                unsafe { fill(x, n, value) }
            }
        }

        kernel! {
            /// x[i] = min(max(x[i], lo), hi) for i < n.
            ///
            /// # Safety
            /// `x` holds n elements.
            pub fn $clamp(x: GlobalMut<$t>, n: u32, lo: f32, hi: f32) {
                // SAFETY: the caller's contract, the same as clamp's.
                unsafe { clamp(x, n, lo, hi) }
            }
        }
    };
}
elementwise_entries!(f32, add_f32, add_assign_f32, fill_f32, clamp_f32);
elementwise_entries!(Bf16, add_bf16, add_assign_bf16, fill_bf16, clamp_bf16);
