//! A bf16 GEMM on tensor cores, C [M, N] = A [M, K] · B [K, N] (row major, f32 out): the
//! tensor-core path that the attention kernel builds on — `cp.async` → `ldmatrix` → `mma.sync` —
//! as one small kernel, so that ptxas assembles it and the emulator checks it against a CPU
//! matrix product in every `cargo test`.
//!
//! One warp per 16×8 output tile, grid (N/8, M/16). Per k step of 16: the 16×16 A tile (one
//! 16-byte `cp.async` per lane) and the 16×8 B tile (lanes 0–15) into shared memory, then
//! `ldmatrix.x4` gives A's four fragment registers and `ldmatrix.x2.trans` B's two (B is stored
//! k-major; the fragment wants n-major pairs), and one `mma.m16n8k16` accumulates in f32.
//! Traffic: every A tile is read N/8 times and every B tile M/16 times (no reuse across warps:
//! a check of the instructions, not a fast GEMM). M, N multiples of 16 and 8, K of 16.

use crate::element::Bf16;
use crate::hw::{
    Global, GlobalMut, cp_async_16, cp_async_commit, cp_async_wait, lane, ldmatrix, mma_bf16_m16n8k16, sync_threads,
};
use crate::kernel;

/// Threads per block: one warp.
pub const THREADS: u32 = 32;

crate::shared_array!(fn a_tile() -> [Bf16; 16 * 16]);
crate::shared_array!(fn b_tile() -> [Bf16; 16 * 8]);

kernel! {
    /// C = A·B for bf16 A [m, k], B [k, n]; f32 C [m, n].
    ///
    /// # Safety
    /// The buffers hold m·k, k·n and m·n elements; m, n, k multiples of 16, 8, 16; grid
    /// (n/8, m/16) of `THREADS` threads.
    pub fn mma_tile_bf16(a: Global<Bf16>, b: Global<Bf16>, c: GlobalMut<f32>, n: u32, k: u32) {
        let (n, k) = (n as usize, k as usize);
        let (m0, n0) = (16 * crate::hw::block_y(), 8 * crate::hw::block_x());
        let (l, g, t) = (lane(), lane() / 4, lane() % 4);
        let (a_s, b_s) = (a_tile(), b_tile());
        let mut acc = [0.0f32; 4];
        // SAFETY: tiles inside A, B and C by the grid and the size contract; shared tiles sized above.
        unsafe {
            let mut k0 = 0;
            while k0 < k {
                // Lane l copies half l % 2 of A's row l / 2, and lanes 0–15 copy B's row l.
                let (row, half) = (l / 2, 8 * (l % 2));
                cp_async_16(a_s, row * 16 + half, a, (m0 + row) * k + k0 + half);
                if l < 16 {
                    cp_async_16(b_s, l * 8, b, (k0 + l) * n + n0);
                }
                cp_async_commit();
                cp_async_wait::<0>();
                sync_threads();
                // Matrix i of A's ldmatrix: rows 8(i % 2) …, columns 8(i / 2) …: a0 … a3 in order.
                let (i, r) = (l / 8, l % 8);
                let a_frag = ldmatrix::<4, false>(a_s.offset((r + 8 * (i % 2)) * 16 + 8 * (i / 2)));
                let b_frag = ldmatrix::<2, true>(b_s.offset((l % 16) * 8));
                acc = mma_bf16_m16n8k16(a_frag, b_frag, acc);
                sync_threads(); // the next copies overwrite the tiles
                k0 += 16;
            }
            for (i, &v) in acc.iter().enumerate() {
                c.store((m0 + g + 8 * (i / 2)) * n + n0 + 2 * t + i % 2, v);
            }
        }
    }
}
