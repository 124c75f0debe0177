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
