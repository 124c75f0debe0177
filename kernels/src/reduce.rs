//! Warp and block reductions. Blocks must have a multiple of 32 threads.

use crate::hw::{WARP, block_dim_x, lane, shfl_xor, sync_threads, warp};

crate::shared_array!(fn block_reduce_scratch() -> [f32; 32]);

/// Reduces `v` over the warp with `op`; every lane gets the result. `op` must be associative
/// and commutative (the butterfly order differs from a sequential one).
#[inline(always)]
#[cfg_attr(not(target_arch = "nvptx64"), track_caller)]
pub fn warp_reduce(mut v: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut mask = 16;
    while mask > 0 {
        v = op(v, shfl_xor(u32::MAX, v, mask));
        mask /= 2;
    }
    v
}

/// Reduces `v` over the lanes l, l ± `stride`, … of the warp (those alike modulo `stride`, a
/// power of two ≤ 32: a butterfly over the lane bits from `stride` up); every such lane gets the
/// result, and `warp_reduce`'s caveat on `op` holds. Stride 32: `v` itself.
#[inline(always)]
#[cfg_attr(not(target_arch = "nvptx64"), track_caller)]
pub fn warp_reduce_strided(mut v: f32, stride: usize, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut mask = stride;
    while mask < WARP {
        v = op(v, shfl_xor(u32::MAX, v, mask as u32));
        mask *= 2;
    }
    v
}

/// Reduces `v` over the block with `op` (`identity` fills unused lanes); every thread gets the
/// result. Every thread of the block must call it (it contains barriers).
#[inline(always)]
#[cfg_attr(not(target_arch = "nvptx64"), track_caller)]
pub fn block_reduce(v: f32, identity: f32, op: impl Fn(f32, f32) -> f32 + Copy) -> f32 {
    let scratch = block_reduce_scratch();
    let v = warp_reduce(v, op);
    sync_threads(); // an earlier block_reduce may still be reading the scratch
    if lane() == 0 {
        // SAFETY: at most 32 warps per block (1024 threads), so warp() < 32.
        unsafe { scratch.store(warp(), v) };
    }
    sync_threads();
    let warps = block_dim_x().div_ceil(WARP);
    // SAFETY: lane() < 32 and only the first `warps` entries were written this round.
    let w = if lane() < warps { unsafe { scratch.load(lane()) } } else { identity };
    warp_reduce(w, op)
}

#[inline(always)]
#[cfg_attr(not(target_arch = "nvptx64"), track_caller)]
pub fn block_min(v: f32) -> f32 {
    block_reduce(v, f32::INFINITY, f32::min)
}

#[inline(always)]
#[cfg_attr(not(target_arch = "nvptx64"), track_caller)]
pub fn block_max(v: f32) -> f32 {
    block_reduce(v, f32::NEG_INFINITY, f32::max)
}
