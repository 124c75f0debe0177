//! Thread and block indices and barriers (device only).

use core::arch::nvptx;

#[inline(always)]
pub fn thread_x() -> usize {
    // SAFETY: reading a special register.
    unsafe { nvptx::_thread_idx_x() as usize }
}

#[inline(always)]
pub fn block_x() -> usize {
    // SAFETY: reading a special register.
    unsafe { nvptx::_block_idx_x() as usize }
}

#[inline(always)]
pub fn block_dim_x() -> usize {
    // SAFETY: reading a special register.
    unsafe { nvptx::_block_dim_x() as usize }
}

/// `__syncthreads()`. Every thread of the block must reach it.
#[inline(always)]
pub fn sync_threads() {
    // SAFETY: a barrier; callers keep it in uniform control flow.
    unsafe { nvptx::_syncthreads() }
}

/// Lane within the warp.
#[inline(always)]
pub fn lane() -> usize {
    thread_x() % 32
}

/// Warp within the block.
#[inline(always)]
pub fn warp() -> usize {
    thread_x() / 32
}

/// Calls `f(i)` for i = thread, thread + blockDim, … < n: the block's threads share 0..n.
#[inline(always)]
pub fn block_stride(n: usize, mut f: impl FnMut(usize)) {
    let mut i = thread_x();
    while i < n {
        f(i);
        i += block_dim_x();
    }
}

/// Calls `f(i)` for every i < n, spread over all threads of the grid (1-D).
#[inline(always)]
pub fn grid_stride(n: usize, mut f: impl FnMut(usize)) {
    // SAFETY: reading a special register.
    let grid = unsafe { core::arch::nvptx::_grid_dim_x() } as usize;
    let mut i = block_x() * block_dim_x() + thread_x();
    while i < n {
        f(i);
        i += grid * block_dim_x();
    }
}
