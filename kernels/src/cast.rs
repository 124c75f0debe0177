//! Element type conversion f32 ↔ bf16 (`host/src/ops/cast.rs`): the bf16 copy of the f32 master
//! weights at the start of a bf16 run (AdamW keeps it current afterwards), and the tests'
//! conversions on the device. One body over the source and destination types: widen to f32
//! (exact), round to the destination (to nearest even for bf16).
//!
//! A grid-stride loop, one element per thread per iteration, coalesced. Memory traffic: every
//! element read once and written once, 6 bytes per element: the analytic minimum.

use crate::element::{Bf16, Element};
use crate::hw::{Global, GlobalMut, grid_stride};
use crate::kernel;

/// Threads per block of the cast kernels.
pub const THREADS: u32 = 256;

/// dst[i] = src[i] converted, i < n.
///
/// # Safety
/// `dst` and `src` hold n elements.
#[inline(always)]
unsafe fn cast<S: Element, D: Element>(dst: GlobalMut<D>, src: Global<S>, n: u32) {
    // SAFETY: i < n.
    grid_stride(n as usize, |i| unsafe { dst.store(i, D::from_f32(src.load(i).to_f32())) });
}

macro_rules! cast_entry {
    ($name:ident, $s:ty, $d:ty) => {
        kernel! {
            /// dst[i] = src[i] converted, i < n.
            ///
            /// # Safety
            /// `dst` and `src` hold n elements.
            pub fn $name(dst: GlobalMut<$d>, src: Global<$s>, n: u32) {
                // SAFETY: the caller's contract, the same as cast's.
                unsafe { cast(dst, src, n) }
            }
        }
    };
}
cast_entry!(cast_f32_bf16, f32, Bf16);
cast_entry!(cast_bf16_f32, Bf16, f32);
