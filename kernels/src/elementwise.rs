//! Elementwise kernels of the model's ops (`host/src/ops/elementwise.rs` holds their CPU
//! reference): a broadcast add (positional embeddings, the residual stream, bias gradients), fill,
//! clamp. One body each over an element type T (`_f32` and `_bf16` entry points): load, compute
//! in f32, store rounded to T.
//!
//! Fill and clamp: the elementwise loop of `map.rs` (grid-stride, a 16-byte vector of 4 f32 or 8
//! bf16 elements per thread and step, one 128-bit access).
//!
//! The broadcast adds (out = a + b, x += b, b repeating every `period` elements: one row added to
//! every row, or a same-sized add when period = n) keep b's element in a register: thread (e,
//! chunk) loads b[e] once and adds it to element e of up to [`REPEATS`] consecutive repeats
//! (their loads issued together), the threads of a warp taking consecutive e (coalesced). A
//! thread per element, as for fill, would read b once per repeat: the positional embedding added
//! to 8 images' tokens moved 1.4× its minimum (b re-read 7 times; from L2 on a GPU). An "element"
//! here is a 16-byte vector when the period is a whole number of them and the views start on
//! vector boundaries (the model's widths), so each access is 128 bits; else a single element.
//!
//! Memory traffic, s = 4 bytes per f32 element, 2 per bf16: add reads a, writes out (n·s each)
//! and reads b ⌈repeats / REPEATS⌉ times (once up to 8 repeats); add_assign reads and writes x
//! and reads b likewise; fill writes x; clamp reads and writes x: the analytic minimum, b's
//! re-reads aside (1/16 of the traffic at most), with vectors in 1/4 (f32) or 1/8 (bf16) of the
//! scalar loop's warp requests.

use crate::element::{Bf16, Element, Pack};
use crate::hw::{Global, GlobalMut, grid_stride, unrolled};
use crate::kernel;
use crate::map::{map, starts_pack};

/// Threads per block of every elementwise kernel.
pub const THREADS: u32 = 256;

/// Repeats of b one thread of a broadcast add covers.
pub const REPEATS: usize = 8;

/// The lanes of a broadcast add's packs with b of `period` elements of `lanes` a vector: the
/// vector's when they divide the period, else 1.
const fn broadcast_lanes(period: usize, lanes: usize) -> usize {
    if period.is_multiple_of(lanes) { lanes } else { 1 }
}

/// The threads a broadcast add over n elements with b of `period` (dividing n) runs, `lanes` the
/// elements of a 16-byte vector: (period / L) × ⌈(n / period) / REPEATS⌉, L = the pack's lanes.
pub const fn broadcast_threads(n: usize, period: usize, lanes: usize) -> usize {
    period / broadcast_lanes(period, lanes) * (n / period).div_ceil(REPEATS)
}

/// out[i] = a[i] + b[i mod period] for i < n in packs P: thread (e, chunk) loads b's pack e once
/// and adds it to pack e of up to REPEATS consecutive repeats (n and period in packs), the loads
/// of a issued before the stores.
///
/// # Safety
/// `out` and `a` hold n packs, `b` holds period ≥ 1, period divides n < 2³².
#[inline(always)]
unsafe fn broadcast_add_packs<P: Pack>(out: GlobalMut<P>, a: Global<P>, b: Global<P>, n: u32, period: u32) {
    let repeats = n / period;
    // Inlined by force: bf16 vectors (64 values a thread) are past LLVM's own threshold, and a
    // call would keep the values in local memory.
    grid_stride(
        broadcast_threads(n as usize, period as usize, 1),
        #[inline(always)]
        |t| {
            // 32-bit remainder and quotient (n < 2³²), much cheaper than 64-bit ones on the GPU.
            let (e, first) = (t as u32 % period, t as u32 / period * REPEATS as u32);
            // SAFETY: e < period, b's length; every i below is under n (r < n / period, e < period).
            unsafe {
                let v = b.load(e as usize);
                let mut values = [v; REPEATS];
                unrolled::<REPEATS>(|k| {
                    if first + (k as u32) < repeats {
                        values[k] = a.load(((first + k as u32) * period + e) as usize);
                    }
                });
                unrolled::<REPEATS>(|k| {
                    if first + (k as u32) < repeats {
                        let mut sum = values[k];
                        unrolled::<{ crate::element::MAX_LANES }>(|l| {
                            if l < P::LANES {
                                sum.set_lane(l, Element::from_f32(values[k].lane(l).to_f32() + v.lane(l).to_f32()));
                            }
                        });
                        out.store(((first + k as u32) * period + e) as usize, sum);
                    }
                });
            }
        },
    );
}

/// out[i] = a[i] + b[i mod period]: in 16-byte vectors when the period divides into them and the
/// views start on vector boundaries, else per element.
///
/// # Safety
/// `out` and `a` hold n elements, `b` holds period ≥ 1, period divides n.
#[inline(always)]
unsafe fn broadcast_add<T: Element>(out: GlobalMut<T>, a: Global<T>, b: Global<T>, n: u32, period: u32) {
    let lanes = <T::Vector as Pack>::LANES;
    let starts = |offset| starts_pack::<T::Vector>(offset);
    let vectors = broadcast_lanes(period as usize, lanes) == lanes
        && starts(out.sector_offset())
        && starts(a.sector_offset())
        && starts(b.sector_offset());
    // SAFETY: the caller's contract, in vectors when lanes divide period (and so n).
    unsafe {
        if vectors {
            let (n, period) = (n / lanes as u32, period / lanes as u32);
            broadcast_add_packs::<T::Vector>(out.cast(), a.cast(), b.cast(), n, period)
        } else {
            broadcast_add_packs::<T>(out, a, b, n, period)
        }
    }
}

/// # Safety
/// `out` and `a` hold n elements, `b` holds period ≥ 1, period divides n.
#[inline(always)]
unsafe fn add<T: Element>(out: GlobalMut<T>, a: Global<T>, b: Global<T>, n: u32, period: u32) {
    // SAFETY: the caller's contract.
    unsafe { broadcast_add(out, a, b, n, period) }
}

/// # Safety
/// `x` holds n elements, `b` holds period ≥ 1, period divides n.
#[inline(always)]
unsafe fn add_assign<T: Element>(x: GlobalMut<T>, b: Global<T>, n: u32, period: u32) {
    // SAFETY: the caller's contract; each element is read before it is overwritten.
    unsafe { broadcast_add(x, x.read_only(), b, n, period) }
}

/// # Safety
/// `x` holds n elements.
#[inline(always)]
unsafe fn fill<T: Element>(x: GlobalMut<T>, n: u32, value: f32) {
    let value = T::from_f32(value);
    // SAFETY: the caller's contract.
    unsafe { map::<T::Vector, T::Vector, 0>(x, [], n as usize, |[]| value) }
}

/// # Safety
/// `x` holds n elements.
#[inline(always)]
unsafe fn clamp<T: Element>(x: GlobalMut<T>, n: u32, lo: f32, hi: f32) {
    // SAFETY: the caller's contract; each element is read before it is overwritten.
    unsafe {
        map::<T::Vector, T::Vector, 1>(x, [x.read_only()], n as usize, |[v]| T::from_f32(v.to_f32().clamp(lo, hi)))
    }
}

macro_rules! elementwise_entries {
    ($t:ty, $add:ident, $add_assign:ident, $fill:ident, $clamp:ident) => {
        kernel! {
            /// out[i] = a[i] + b[i mod period] for i < n; broadcast_threads(n, period, vector lanes) threads.
            ///
            /// # Safety
            /// `out` and `a` hold n elements, `b` holds period ≥ 1, period divides n.
            pub fn $add(out: GlobalMut<$t>, a: Global<$t>, b: Global<$t>, n: u32, period: u32) {
                // SAFETY: the caller's contract, the same as add's.
                unsafe { add(out, a, b, n, period) }
            }
        }

        kernel! {
            /// x[i] += b[i mod period] for i < n; broadcast_threads(n, period, vector lanes) threads.
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
