//! Elementwise kernels of the model's ops (`host/src/ops/elementwise.rs` holds their CPU
//! reference): a broadcast add (positional embeddings, the residual stream), fill, clamp.
//!
//! Grid-stride loops over n elements, one element per thread per iteration: consecutive threads
//! touch consecutive words (coalesced). Memory traffic: add reads a and b (b from cache when it
//! repeats) and writes out, n·4 bytes each; add_assign reads and writes x; fill writes x; clamp
//! reads and writes x: the analytic minimum.

use crate::hw::{Global, GlobalMut, grid_stride};
use crate::kernel;

/// Threads per block of every elementwise kernel.
pub const THREADS: u32 = 256;

kernel! {
    /// out[i] = a[i] + b[i mod period] for i < n.
    ///
    /// # Safety
    /// `out` and `a` hold n floats, `b` holds period ≥ 1.
    pub fn add_f32(out: GlobalMut<f32>, a: Global<f32>, b: Global<f32>, n: u32, period: u32) {
        // SAFETY: i < n and i mod period < period, the lengths the caller gives (n < 2³², so the
        // 32-bit remainder, much cheaper than a 64-bit one on the GPU, is exact).
        grid_stride(n as usize, |i| unsafe { out.store(i, a.load(i) + b.load((i as u32 % period) as usize)) });
    }
}

kernel! {
    /// x[i] += b[i mod period] for i < n.
    ///
    /// # Safety
    /// `x` holds n floats, `b` holds period ≥ 1.
    pub fn add_assign_f32(x: GlobalMut<f32>, b: Global<f32>, n: u32, period: u32) {
        // SAFETY: as in add_f32.
        grid_stride(n as usize, |i| unsafe { x.store(i, x.load(i) + b.load((i as u32 % period) as usize)) });
    }
}

kernel! {
    /// x[i] = value for i < n.
    ///
    /// # Safety
    /// `x` holds n floats.
    pub fn fill_f32(x: GlobalMut<f32>, n: u32, value: f32) {
        // SAFETY: i < n.
        grid_stride(n as usize, |i| unsafe { x.store(i, value) });
    }
}

kernel! {
    /// x[i] = min(max(x[i], lo), hi) for i < n.
    ///
    /// # Safety
    /// `x` holds n floats.
    pub fn clamp_f32(x: GlobalMut<f32>, n: u32, lo: f32, hi: f32) {
        // SAFETY: i < n.
        grid_stride(n as usize, |i| unsafe { x.store(i, x.load(i).clamp(lo, hi)) });
    }
}
