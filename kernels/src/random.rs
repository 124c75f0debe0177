//! Uniform random numbers from Philox, one per thread: the device half of the RNG that the CPU
//! reference shares (`philox.rs`), so both draw the same numbers for the same (seed, stream).
//!
//! Memory traffic: 4 bytes written per draw, nothing read.

use crate::hw::{GlobalMut, block_dim_x, block_x, thread_x};
use crate::kernel;
use crate::philox::Philox;

/// Threads per block of `philox_uniform`.
pub const THREADS: u32 = 256;

kernel! {
    /// out[i] = Philox::new(seed, a, b).uniform(i) for i < n. Grid: ⌈n / THREADS⌉ blocks.
    ///
    /// # Safety
    /// `out` holds `n` floats.
    pub fn philox_uniform(out: GlobalMut<f32>, n: u32, seed: u64, a: u32, b: u32) {
        let i = block_x() * block_dim_x() + thread_x();
        if i < n as usize {
            // SAFETY: i < n, the length of `out`.
            unsafe { out.store(i, Philox::new(seed, a, b).uniform(i as u32)) };
        }
    }
}
