//! Element type conversion f32 ↔ bf16 (`host/src/ops/cast.rs`): the bf16 copy of the f32 master
//! weights at the start of a bf16 run (AdamW keeps it current afterwards), and the tests'
//! conversions on the device. One body over the source and destination types: widen to f32
//! (exact), round to the destination (to nearest even for bf16).
//!
//! The elementwise loop of `map.rs`: grid-stride, [`LANES`] elements per thread and step, one
//! 128-bit access on the f32 side and one 64-bit access on the bf16 side. Memory traffic: every
//! element read once and written once, 6 bytes per element: the analytic minimum, in whole
//! sectors.

use crate::element::{Bf16, Bf16x4, Element, F32x4, Pack};
use crate::hw::{Global, GlobalMut};
use crate::kernel;
use crate::map::map;

/// Threads per block of the cast kernels.
pub const THREADS: u32 = 256;

/// Elements per thread and step: 16 bytes of f32, 8 of bf16.
pub const LANES: usize = 4;

/// dst[i] = src[i] converted, i < n; S and D are packs of [`LANES`] source and destination
/// elements.
///
/// # Safety
/// `dst` and `src` hold n elements.
#[inline(always)]
unsafe fn cast<S: Pack, D: Pack>(dst: GlobalMut<D::Element>, src: Global<S::Element>, n: u32) {
    const { assert!(S::LANES == LANES) };
    // SAFETY: the caller's contract.
    unsafe { map::<S, D, 1>(dst, [src], n as usize, |[x]| D::Element::from_f32(x.to_f32())) }
}

macro_rules! cast_entry {
    ($name:ident, $s:ty, $d:ty, $s_pack:ty, $d_pack:ty) => {
        kernel! {
            /// dst[i] = src[i] converted, i < n.
            ///
            /// # Safety
            /// `dst` and `src` hold n elements.
            pub fn $name(dst: GlobalMut<$d>, src: Global<$s>, n: u32) {
                // SAFETY: the caller's contract, the same as cast's.
                unsafe { cast::<$s_pack, $d_pack>(dst, src, n) }
            }
        }
    };
}
cast_entry!(cast_f32_bf16, f32, Bf16, F32x4, Bf16x4);
cast_entry!(cast_bf16_f32, Bf16, f32, Bf16x4, F32x4);
