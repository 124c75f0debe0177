//! Masked flash attention on tensor cores (FlashAttention-2's online softmax), bf16 in and out,
//! f32 accumulation: the attention core of both towers without the [B, H, S, S] scores.
//!
//! Input: the model's fused projection qkv [B, S, 3W] (q, k, v, head h in columns h·D..(h+1)·D of
//! each, W = H·D), read in place: a head's Q, K or V tile is 64 rows of D contiguous bf16 at row
//! stride 3W, so no transpose runs before or after. Sequence b has `lengths[b]` valid tokens
//! (PGS keeps a different number per image; null: all S) and the text tower is causal.
//!
//! One block of 4 warps per (64-query tile, head, sequence); warp w owns queries 16w … 16w + 15.
//! The block loads its Q tile (cp.async) once, then walks the key tiles 0 … ⌈k_end / 64⌉ − 1, k_end = the sequence's length, or
//! for a causal query tile min(length, last query + 1):
//! 1. K and V tiles into shared memory by cp.async, in two commit groups, so that V is still in
//!    flight while the scores are computed;
//! 2. S = Q·Kᵀ (16 × 64 per warp: 8 n-tiles of `mma.m16n8k16`, Q and K read by `ldmatrix`: Q's
//!    fragments are re-read from shared memory per key tile, not held, which leaves the registers
//!    to O — 64 per thread at D = 128 — and S), scaled by
//!    1/√D·log₂e and masked (key ≥ length, or after the query when causal) to −∞;
//! 3. online softmax per row, base 2: m' = max(m, rowmax S), P = 2^(S − m'), ℓ ← ℓ·2^(m − m') +
//!    Σ P, O ← O·2^(m − m') (the lane keeps its partial ℓ; the 4 lanes of a row add theirs at the
//!    end);
//! 4. O += P·V, P taken from the scores' accumulator registers as bf16 A fragments (the m16n8
//!    accumulator layout of two adjacent n-tiles is the A layout of one k-step), V by
//!    `ldmatrix.trans`.
//!
//! At the end O/ℓ is staged in the warp's rows of the Q tile and written with 16-byte stores, and
//! the log-sum-exp of the scaled scores, (m + log₂ ℓ)·ln 2, is written to lse [B, H, S] (f32) for
//! the backward pass. Query tiles at or past a sequence's length do no attention: they write
//! zeros to their rows of out and lse (the padding rows of the following GEMMs must be finite);
//! key tiles past k_end are never loaded; the rows of a partial tile past the length are zero-filled in
//! shared memory instead of read.
//!
//! Shared memory: the Q, K and V tiles, 64 × D bf16 each (3·128·D bytes: 12, 24, 48 KiB for D =
//! 32, 64, 128). Registers (ptxas, sm_80 / sm_90): 126 / 130, 151 / 150, 192 / 204 for D = 32,
//! 64, 128, no spills: O is D/2 f32 per thread, S 32. Each row's 16-byte chunks are swizzled (chunk c of row r at c ⊕ (r mod 8), for
//! D = 32 at c ⊕ (⌊r/2⌋ mod 4)) so that the 8 rows an `ldmatrix` phase reads, and the 8 chunks
//! of a cp.async phase, fall on distinct banks.
//!
//! Memory traffic, analytic minimum of a query tile with q valid queries visiting key tiles of k_i
//! valid keys: 2·D·(q + 2·Σ k_i) bytes read (Q once, K and V once per query tile), 2·D·q + 4·64
//! written (O and lse); qkv rows are whole sectors (2·D bytes at 64-byte-aligned columns), so
//! every access uses all of its sectors. On the emulator's counters (`tests/flash_attention_gpu.rs`,
//! D = 64): 1.008× the minimum at S = 197 with PGS lengths 197, 99, 1; 1.009× for the text
//! tower's causal 77 (the rest: the lengths' sector per block, lse rows across sectors). Work: 4·D per visible (query, key) pair, plus the masked
//! part of the diagonal and last tiles.

use crate::element::Bf16;
use crate::hw::{
    Global, GlobalMut, Shared, block_stride, block_x, block_y, block_z, cp_async_16, cp_async_commit, cp_async_wait,
    dynamic_shared, ex2_approx, lane, lane_here, ldmatrix, lg2_approx, mma_bf16_m16n8k16, shfl_xor, sync_threads,
    sync_warp, unrolled, warp,
};
use crate::kernel;

/// Threads per block (4 warps of 16 queries).
pub const THREADS: u32 = 128;

/// Queries per block, keys per tile.
pub const TILE: usize = 64;

/// 16-key steps of a key tile (mma k-steps of P·V).
const KT: usize = TILE / 16;

/// Dynamic shared memory of a launch for head dim `d`: the Q, K and V tiles.
pub const fn shared_bytes(d: usize) -> u32 {
    (3 * TILE * d * 2) as u32
}

/// 8 bf16: one 16-byte chunk of a tile row (a cp.async, a vector store).
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Chunk([u32; 4]);

/// Two bf16 as one fragment register, the first in the low half.
#[inline(always)]
fn bf16x2(lo: f32, hi: f32) -> u32 {
    Bf16::from_f32(lo).0 as u32 | (Bf16::from_f32(hi).0 as u32) << 16
}

/// A [64, D = 16·DK] bf16 tile in shared memory, 16-byte chunks swizzled per row. The fragment
/// loads take the lane from `lane_here`, so that each swizzled address is computed where it is
/// used: hoisted out of the key loop, one per (fragment, k-step) held 80 registers at D = 128 and
/// spilled on sm_90.
#[derive(Clone, Copy)]
struct Tile<const DK: usize> {
    s: Shared<Bf16>,
}

impl<const DK: usize> Tile<DK> {
    /// 16-byte chunks per row.
    const CHUNKS: usize = 2 * DK;

    /// Tile `n` of the block's shared memory.
    unsafe fn nth(all: Shared<Bf16>, n: usize) -> Self {
        Tile { s: unsafe { all.offset(n * TILE * 16 * DK) } }
    }

    /// Element index of chunk `c` of row `r`.
    #[inline(always)]
    fn at(r: usize, c: usize) -> usize {
        let group = if Self::CHUNKS < 8 { Self::CHUNKS } else { 8 };
        r * 16 * DK + 8 * (c ^ (r / (8 / group) % group))
    }

    /// Rows 0 … `valid` − 1 from `src` (row i at element i·`stride`) by cp.async; rows past
    /// `valid` zero-filled. The caller commits and waits.
    #[inline(always)]
    unsafe fn load(self, src: Global<Bf16>, stride: usize, valid: usize) {
        block_stride(TILE * Self::CHUNKS, |i| {
            let (r, c) = (i / Self::CHUNKS, i % Self::CHUNKS);
            // SAFETY: rows below `valid` are inside qkv (the caller's contract); the tile holds
            // TILE rows.
            unsafe {
                if r < valid {
                    cp_async_16(self.s, Self::at(r, c), src, r * stride + 8 * c);
                } else {
                    self.s.cast::<Chunk>().store(Self::at(r, c) / 8, Chunk([0; 4]));
                }
            }
        });
    }

    /// The A fragment (16 × 16) of rows r0 …, k-step kk (columns 16kk …).
    #[inline(always)]
    unsafe fn a(self, r0: usize, kk: usize) -> [u32; 4] {
        let (i, r) = (lane_here() / 8, lane_here() % 8);
        ldmatrix::<4, false>(unsafe { self.s.offset(Self::at(r0 + r + 8 * (i % 2), 2 * kk + i / 2)) })
    }

    /// Rows r0 … r0 + 15 as the B fragments (k = columns 16kk …, n = rows) of the two n-tiles
    /// r0 … and r0 + 8 …: [b0, b1] of each. Scores: B = Kᵀ.
    #[inline(always)]
    unsafe fn b_rows(self, r0: usize, kk: usize) -> [u32; 4] {
        let (i, r) = (lane_here() / 8, lane_here() % 8);
        ldmatrix::<4, false>(unsafe { self.s.offset(Self::at(r0 + r + 8 * (i / 2), 2 * kk + i % 2)) })
    }

    /// Rows r0 … r0 + 15 as the B fragments (k = rows, n = columns) of the two n-tiles of
    /// columns 16dp …: [b0, b1] of each, transposed by `ldmatrix.trans`. P·V: B = V.
    #[inline(always)]
    unsafe fn b_cols(self, r0: usize, dp: usize) -> [u32; 4] {
        let (i, r) = (lane_here() / 8, lane_here() % 8);
        ldmatrix::<4, true>(unsafe { self.s.offset(Self::at(r0 + r + 8 * (i % 2), 2 * dp + i / 2)) })
    }
}

/// Where a block's sequence and head lie in qkv, out and lse.
#[derive(Clone, Copy)]
struct Head {
    seq: usize,
    /// The sequence's valid tokens.
    len: usize,
    /// Its first row in qkv and out.
    row0: usize,
    /// W = H·D.
    width: usize,
    /// The head's first column in each of q, k, v and out: h·D.
    col: usize,
    /// Its first row in lse: (b·H + h)·S.
    lse0: usize,
}

impl Head {
    /// Part p (0 q, 1 k, 2 v) from row `row` on.
    unsafe fn qkv(self, qkv: Global<Bf16>, p: usize, row: usize) -> Global<Bf16> {
        unsafe { qkv.offset((self.row0 + row) * 3 * self.width + p * self.width + self.col) }
    }

    /// Valid rows of the tile from `row`.
    fn valid(self, row: usize) -> usize {
        self.len.saturating_sub(row).min(TILE)
    }
}

/// The forward pass of one block, head dim 16·DK.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn forward<const DK: usize>(
    out: GlobalMut<Bf16>,
    lse: GlobalMut<f32>,
    qkv: Global<Bf16>,
    lengths: Global<u32>,
    seq: u32,
    heads: u32,
    causal: u32,
    scale: f32,
) {
    let (seq, heads, causal) = (seq as usize, heads as usize, causal != 0);
    let (q0, h, b) = (TILE * block_x(), block_y(), block_z());
    // SAFETY: the caller's contract (buffer sizes, grid, shared memory).
    unsafe {
        let len = if lengths.is_null() { seq } else { (lengths.load(b) as usize).clamp(1, seq) };
        let d = 16 * DK;
        let head = Head { seq, len, row0: b * seq, width: heads * d, col: h * d, lse0: (b * heads + h) * seq };
        let tiles = dynamic_shared::<Bf16>();
        let (q_s, k_s, v_s) = (Tile::<DK>::nth(tiles, 0), Tile::<DK>::nth(tiles, 1), Tile::<DK>::nth(tiles, 2));
        if q0 >= len {
            write_padding::<DK>(out, lse, head, q0);
            return;
        }
        q_s.load(head.qkv(qkv, 0, q0), 3 * head.width, head.valid(q0));
        cp_async_commit();
        cp_async_wait::<0>();
        sync_threads();
        let rows0 = 16 * warp();

        let (g, t) = (lane() / 4, lane() % 4);
        let query = |i: usize| q0 + rows0 + g + 8 * (i / 2);
        let k_end = if causal { len.min(q0 + TILE) } else { len };
        let scale2 = scale * core::f32::consts::LOG2_E;
        let mut o = [[[0.0f32; 4]; 2]; DK];
        let (mut m, mut l) = ([f32::NEG_INFINITY; 2], [0.0f32; 2]);
        let mut k0 = 0;
        while k0 < k_end {
            sync_threads(); // every warp is done with the previous K and V tiles
            let valid = head.valid(k0);
            k_s.load(head.qkv(qkv, 1, k0), 3 * head.width, valid);
            cp_async_commit();
            v_s.load(head.qkv(qkv, 2, k0), 3 * head.width, valid);
            cp_async_commit();
            cp_async_wait::<1>();
            sync_threads();

            // S = Q·Kᵀ, s[kk][n]: keys 16kk + 8n …, scaled to base 2 and masked.
            let mut s = [[[0.0f32; 4]; 2]; KT];
            unrolled::<DK>(|dk| {
                let q = q_s.a(rows0, dk);
                unrolled::<KT>(|kk| {
                    let kf = k_s.b_rows(16 * kk, dk);
                    s[kk][0] = mma_bf16_m16n8k16(q, [kf[0], kf[1]], s[kk][0]);
                    s[kk][1] = mma_bf16_m16n8k16(q, [kf[2], kf[3]], s[kk][1]);
                })
            });
            let mut max = m;
            each_score::<KT>(|kk, n, i| {
                let key = k0 + 16 * kk + 8 * n + 2 * t + i % 2;
                let visible = key < len && (!causal || key <= query(i));
                let x = &mut s[kk][n][i];
                *x = if visible { *x * scale2 } else { f32::NEG_INFINITY };
                max[i / 2] = max[i / 2].max(*x);
            });
            // Online softmax: the row's 4 lanes agree on the new maximum, rescale ℓ and O.
            let mut factor = [1.0f32; 2];
            unrolled::<2>(|r| {
                max[r] = max[r].max(shfl_xor(u32::MAX, max[r], 1));
                max[r] = max[r].max(shfl_xor(u32::MAX, max[r], 2));
                if max[r] != m[r] {
                    factor[r] = ex2_approx(m[r] - max[r]);
                }
                l[r] *= factor[r];
            });
            m = max;
            each_score::<KT>(|kk, n, i| {
                s[kk][n][i] = ex2_approx(s[kk][n][i] - m[i / 2]);
                l[i / 2] += s[kk][n][i];
            });
            each_score::<DK>(|dp, n, i| o[dp][n][i] *= factor[i / 2]);

            // O += P·V: P's k-step kk is the accumulator pair s[kk] as bf16.
            cp_async_wait::<0>();
            sync_threads();
            unrolled::<KT>(|kk| {
                let [lo, hi] = s[kk];
                let p = [bf16x2(lo[0], lo[1]), bf16x2(lo[2], lo[3]), bf16x2(hi[0], hi[1]), bf16x2(hi[2], hi[3])];
                unrolled::<DK>(|dp| {
                    let vf = v_s.b_cols(16 * kk, dp);
                    o[dp][0] = mma_bf16_m16n8k16(p, [vf[0], vf[1]], o[dp][0]);
                    o[dp][1] = mma_bf16_m16n8k16(p, [vf[2], vf[3]], o[dp][1]);
                })
            });
            k0 += TILE;
        }

        // ℓ of the whole row, then O/ℓ into this warp's rows of the Q tile (only it read them)
        // and out with 16-byte stores; the lse by the lanes of column pair 0.
        unrolled::<2>(|r| {
            l[r] += shfl_xor(u32::MAX, l[r], 1);
            l[r] += shfl_xor(u32::MAX, l[r], 2);
        });
        let staged = q_s.s.cast::<u32>();
        sync_warp(u32::MAX); // the warp's lanes are done reading its Q rows
        unrolled::<DK>(|dp| {
            unrolled::<2>(|n| {
                unrolled::<2>(|r| {
                    let (row, v) = (rows0 + g + 8 * r, o[dp][n]);
                    let at = Tile::<DK>::at(row, 2 * dp + n) + 2 * t;
                    staged.store(at / 2, bf16x2(v[2 * r] / l[r], v[2 * r + 1] / l[r]));
                })
            })
        });
        sync_warp(u32::MAX);
        let (chunks, out_chunks) = (Tile::<DK>::CHUNKS, out.cast::<Chunk>());
        let mut c = lane();
        while c < 16 * chunks {
            let (row, chunk) = (rows0 + c / chunks, c % chunks);
            let i = q0 + row;
            if i < seq {
                let at = ((head.row0 + i) * head.width + head.col) / 8 + chunk;
                if i < len {
                    out_chunks.store(at, staged.cast::<Chunk>().load(Tile::<DK>::at(row, chunk) / 8));
                } else {
                    out_chunks.store(at, Chunk([0; 4]));
                }
            }
            c += 32;
        }
        if t == 0 {
            unrolled::<2>(|r| {
                let i = query(2 * r);
                if i < seq {
                    let v = if i < len { (m[r] + lg2_approx(l[r])) * core::f32::consts::LN_2 } else { 0.0 };
                    lse.store(head.lse0 + i, v);
                }
            });
        }
    }
}

/// Calls `f(k, n, i)` for every element of an accumulator array [[[f32; 4]; 2]; K] (pairs of
/// m16n8 tiles).
#[inline(always)]
fn each_score<const K: usize>(mut f: impl FnMut(usize, usize, usize)) {
    unrolled::<K>(|k| unrolled::<2>(|n| unrolled::<4>(|i| f(k, n, i))));
}

/// A query tile past the sequence's length: zeros in its rows of out and lse.
#[inline(always)]
unsafe fn write_padding<const DK: usize>(out: GlobalMut<Bf16>, lse: GlobalMut<f32>, head: Head, q0: usize) {
    let rows = head.seq.min(q0 + TILE) - q0;
    let chunks = Tile::<DK>::CHUNKS;
    block_stride(rows * chunks, |c| {
        let (i, chunk) = (q0 + c / chunks, c % chunks);
        // SAFETY: row i < S of this sequence and head (the caller's contract).
        unsafe { out.cast::<Chunk>().store(((head.row0 + i) * head.width + head.col) / 8 + chunk, Chunk([0; 4])) };
    });
    // SAFETY: as above.
    block_stride(rows, |i| unsafe { lse.store(head.lse0 + q0 + i, 0.0) });
}

macro_rules! forward_entries {
    ($($name:ident: $dk:literal),*) => {$(
        kernel! {
            /// out [B, S, H·D] and lse [B, H, S] from qkv [B, S, 3·H·D] (bf16), D = 16·DK:
            /// softmax(scale·QKᵀ masked)·V per sequence and head. `lengths[b]` (clamped to
            /// 1..=S; null: S) valid tokens of sequence b; `causal` != 0 masks keys after the
            /// query.
            ///
            /// # Safety
            /// The buffers hold B·S·3·H·D, B·S·H·D, B·H·S and B elements; qkv and out 16-byte
            /// aligned; grid (⌈S/64⌉, H, B) of `THREADS` threads with `shared_bytes(D)` bytes of
            /// dynamic shared memory.
            pub fn $name(
                out: GlobalMut<Bf16>,
                lse: GlobalMut<f32>,
                qkv: Global<Bf16>,
                lengths: Global<u32>,
                seq: u32,
                heads: u32,
                causal: u32,
                scale: f32,
            ) {
                // SAFETY: the caller's contract.
                unsafe { forward::<$dk>(out, lse, qkv, lengths, seq, heads, causal, scale) }
            }
        }
    )*};
}

forward_entries!(flash_attention_forward_d32: 2, flash_attention_forward_d64: 4, flash_attention_forward_d128: 8);
