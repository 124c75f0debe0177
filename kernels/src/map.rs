//! The loop of the memory-bound elementwise kernels (GELU, casts, fill, clamp): out[i] =
//! f(in₀[i], …) for i < n, each kernel stating only f.
//!
//! A thread takes a pack of LANES consecutive elements per grid-stride step: one 16-byte vector
//! (4 f32, 8 bf16; a cast's narrow side 8 bytes) per view, loaded and stored with one 128-bit
//! (64-bit) instruction where a scalar loop issues LANES. A warp's request then covers 512
//! consecutive bytes, 16 whole sectors: the same sectors as the scalar loop's, in 1/LANES of
//! its requests. Packs need every view to start on a pack boundary; the last n mod LANES
//! elements, and all of them when a view does not (a sub-view at an odd offset), go one per
//! thread. f runs on the same f32 values either way: the results do not depend on the path.

use crate::element::{Element, MAX_LANES, Pack};
use crate::hw::{Global, GlobalMut, grid_stride, unrolled};

/// The threads that give every pack of n elements its own: ⌈n / lanes⌉.
pub const fn threads(n: usize, lanes: usize) -> usize {
    n.div_ceil(lanes)
}

/// Whether a view whose element 0 lies `sector_offset` elements into its 32-byte sector starts on
/// a boundary of P (an aligned vector access).
#[inline(always)]
pub fn starts_pack<P: Pack>(sector_offset: usize) -> bool {
    (sector_offset * size_of::<P::Element>()).is_multiple_of(size_of::<P>())
}

/// out[i] = f([inputs[0][i], …]) for i < n, over the grid: in packs I, O (as many lanes each)
/// when every view starts on a pack boundary, then one element a thread.
///
/// # Safety
/// `out` and `inputs` hold n elements.
#[inline(always)]
pub unsafe fn map<I: Pack, O: Pack, const K: usize>(
    out: GlobalMut<O::Element>,
    inputs: [Global<I::Element>; K],
    n: usize,
    f: impl Fn([I::Element; K]) -> O::Element,
) {
    const { assert!(I::LANES == O::LANES) };
    let aligned = starts_pack::<O>(out.sector_offset()) && inputs.iter().all(|x| starts_pack::<I>(x.sector_offset()));
    let packs = if aligned { n / O::LANES } else { 0 };
    let (out_packs, in_packs) = (out.cast::<O>(), inputs.map(|x| x.cast::<I>()));
    grid_stride(packs, |j| {
        // SAFETY: j < n / LANES, whole packs inside the views.
        let loaded = in_packs.map(|x| unsafe { x.load(j) });
        let mut result = O::splat(<O::Element as Element>::ZERO);
        unrolled::<MAX_LANES>(|k| {
            if k < O::LANES {
                result.set_lane(k, f(loaded.map(|p| p.lane(k))));
            }
        });
        // SAFETY: as the loads.
        unsafe { out_packs.store(j, result) };
    });
    let rest = packs * O::LANES;
    // SAFETY: rest + i < n.
    grid_stride(n - rest, |i| unsafe { out.store(rest + i, f(inputs.map(|x| x.load(rest + i)))) });
}

#[cfg(test)]
mod tests {
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::element::{Bf16, Bf16x8};
    use crate::hw::emu::{LaunchConfig, Options, Order, SM90, launch};
    use crate::kernel;

    kernel! {
        /// y[i] = 2·x[i] + 1 for the elements from `shift` on of both.
        fn affine(y: GlobalMut<Bf16>, x: Global<Bf16>, n: u32, shift: u32) {
            let (n, shift) = (n as usize, shift as usize);
            // SAFETY: y and x hold n elements, shift ≤ n.
            unsafe {
                map::<Bf16x8, Bf16x8, 1>(y.offset(shift), [x.offset(shift)], n - shift, |[v]| {
                    Bf16::from_f32(2.0 * v.to_f32() + 1.0)
                })
            }
        }
    }

    #[test]
    fn vectors_a_tail_and_a_misaligned_start_compute_alike_in_the_requests_counted() {
        let n = 300_001;
        let x: Vec<Bf16> = (0..n).map(|i| Bf16::from_f32((i % 1000) as f32 / 7.0 - 50.0)).collect();
        // From element 0 (vectors and a tail of 1), 1 (2 bytes in: per element) and 8 (16 bytes
        // in: vectors again).
        for shift in [0, 1, 8] {
            let mut y = vec![Bf16(0); n];
            // SAFETY: the views cover the two vectors, alive for the launch.
            let params = unsafe {
                (GlobalMut::new(y.as_mut_ptr(), n, 0), Global::new(x.as_ptr(), n, 1), n as u32, shift as u32)
            };
            let blocks = threads(n, 8).div_ceil(256) as u32;
            let cfg = LaunchConfig { grid: [blocks, 1, 1], block: [256, 1, 1], shared_bytes: 0 };
            let options = Options { counters: true, order: Order::Forward };
            // SAFETY: the parameters' lengths, as `affine` needs.
            let traffic = unsafe { launch(&affine, cfg, params, &[2 * n, 2 * n], SM90, options) }.unwrap().traffic;
            let want = |i: usize| if i < shift { Bf16(0) } else { Bf16::from_f32(2.0 * x[i].to_f32() + 1.0) };
            assert!((0..n).all(|i| y[i] == want(i)), "shift {shift}: a value differs");
            // One warp request per view for 32 vectors, or 32 elements of the rest; each view's
            // sectors once, but for a request starting inside a sector, which touches one more.
            let m = n - shift;
            let (vectors, rest) = if shift % 8 == 0 { (m / 8, m % 8) } else { (0, m) };
            let requests = 2 * (vectors.div_ceil(32) + rest.div_ceil(32)) as u64;
            assert_eq!(traffic.global_requests(), requests, "shift {shift}");
            let sectors = 2 * (2 * m).div_ceil(32) as u64 + if shift == 0 { 2 } else { requests };
            assert!(traffic.sectors() <= sectors, "shift {shift}: {} sectors", traffic.sectors());
        }
    }
}
