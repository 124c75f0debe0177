//! Elementwise kernels of the model's ops (`host/src/ops/elementwise.rs` holds their CPU
//! reference): a broadcast add (positional embeddings, the residual stream, bias gradients), fill,
//! clamp. One body each over an element type T (`_f32` and `_bf16` entry points): load, compute
//! in f32, store rounded to T.
//!
//! Fill and clamp: grid-stride loops over n elements, one element per thread per iteration:
//! consecutive threads touch consecutive elements (coalesced).
//!
//! The broadcast adds (out = a + b, x += b, b repeating every `period` elements: one row added to
//! every row, or a same-sized add when period = n) keep b's element in a register: thread (e,
//! chunk) loads b[e] once and adds it to element e of up to [`REPEATS`] consecutive repeats
//! (their loads issued together), the threads of a warp taking consecutive e (coalesced). A
//! thread per element, as for fill, would read b once per repeat: the positional embedding added
//! to 8 images' tokens moved 1.4× its minimum (b re-read 7 times; from L2 on a GPU).
//!
//! Memory traffic, s = 4 bytes per f32 element, 2 per bf16: add reads a, writes out (n·s each)
//! and reads b ⌈repeats / REPEATS⌉ times (once up to 8 repeats); add_assign reads and writes x
//! and reads b likewise; fill writes x; clamp reads and writes x: the analytic minimum, b's
//! re-reads aside (1/16 of the traffic at most).

use crate::element::{Bf16, Element};
use crate::hw::{Global, GlobalMut, grid_stride, unrolled};
use crate::kernel;

/// Threads per block of every elementwise kernel.
pub const THREADS: u32 = 256;

/// Repeats of b one thread of a broadcast add covers.
pub const REPEATS: usize = 8;

/// The threads a broadcast add over n elements with b of `period` (dividing n) runs:
/// period × ⌈(n / period) / REPEATS⌉.
pub const fn broadcast_threads(n: usize, period: usize) -> usize {
    period * (n / period).div_ceil(REPEATS)
}

/// Calls `f(i, v)` for the elements i = r·period + e of this thread's repeats r and b's element
/// v = b[e] (loaded once), grid-strided over broadcast_threads(n, period) threads.
///
/// # Safety
/// `b` holds period ≥ 1 elements; period divides n < 2³².
#[inline(always)]
unsafe fn broadcast<T: Element>(b: Global<T>, n: u32, period: u32, mut f: impl FnMut([Option<usize>; REPEATS], f32)) {
    let repeats = n / period;
    grid_stride(broadcast_threads(n as usize, period as usize), |t| {
        // 32-bit remainder and quotient (n < 2³²), much cheaper than 64-bit ones on the GPU.
        let (e, first) = (t as u32 % period, t as u32 / period * REPEATS as u32);
        // SAFETY: e < period, b's length.
        let v = unsafe { b.load(e as usize) }.to_f32();
        let mut at = [None; REPEATS];
        unrolled::<REPEATS>(|k| {
            if first + (k as u32) < repeats {
                at[k] = Some(((first + k as u32) * period + e) as usize);
            }
        });
        f(at, v);
    });
}

/// out[i] = value(i) + b[i mod period] over the broadcast, the REPEATS loads of value issued
/// before the stores.
///
/// # Safety
/// `out` holds n elements, `value` reads elements below n, `b` holds period ≥ 1, period divides n.
#[inline(always)]
unsafe fn broadcast_add<T: Element>(out: GlobalMut<T>, value: impl Fn(usize) -> T, b: Global<T>, n: u32, period: u32) {
    // SAFETY: b holds period ≥ 1, period divides n; every i < n (r < n / period, e < period).
    unsafe {
        broadcast(b, n, period, |at, v| {
            let mut values = [T::ZERO; REPEATS];
            unrolled::<REPEATS>(|k| {
                if let Some(i) = at[k] {
                    values[k] = value(i);
                }
            });
            unrolled::<REPEATS>(|k| {
                if let Some(i) = at[k] {
                    out.store(i, T::from_f32(values[k].to_f32() + v));
                }
            });
        })
    }
}

/// # Safety
/// `out` and `a` hold n elements, `b` holds period ≥ 1, period divides n.
#[inline(always)]
unsafe fn add<T: Element>(out: GlobalMut<T>, a: Global<T>, b: Global<T>, n: u32, period: u32) {
    // SAFETY: the caller's contract; i < n.
    unsafe { broadcast_add(out, |i| a.load(i), b, n, period) }
}

/// # Safety
/// `x` holds n elements, `b` holds period ≥ 1, period divides n.
#[inline(always)]
unsafe fn add_assign<T: Element>(x: GlobalMut<T>, b: Global<T>, n: u32, period: u32) {
    // SAFETY: the caller's contract; i < n.
    unsafe { broadcast_add(x, |i| x.load(i), b, n, period) }
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
            /// out[i] = a[i] + b[i mod period] for i < n; broadcast_threads(n, period) threads.
            ///
            /// # Safety
            /// `out` and `a` hold n elements, `b` holds period ≥ 1, period divides n.
            pub fn $add(out: GlobalMut<$t>, a: Global<$t>, b: Global<$t>, n: u32, period: u32) {
                // SAFETY: the caller's contract, the same as add's.
                unsafe { add(out, a, b, n, period) }
            }
        }

        kernel! {
            /// x[i] += b[i mod period] for i < n; broadcast_threads(n, period) threads.
            ///
            /// # Safety
            /// `x` holds n elements, `b` holds period ≥ 1, period divides n.
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
