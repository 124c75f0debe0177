//! Masked flash attention on tensor cores (FlashAttention-2's online softmax), bf16 in and out,
//! f32 accumulation: the attention core of both towers without the [B, H, S, S] scores.
//!
//! Input: the model's fused projection qkv [B, S, 3W] (q, k, v, head h in columns h·D..(h+1)·D of
//! each, W = H·D), read in place: a head's Q, K or V tile is 64 rows of D contiguous bf16 at row
//! stride 3W, so no transpose runs before or after. Sequence b has `lengths[b]` valid tokens
//! (PGS keeps a different number per image; null: all S) and the text tower is causal. Or the
//! sequences are packed (FlashAttention's varlen: `offsets`, B + 1 cumulative row offsets, each
//! sequence at most S rows, qkv [Σ lengths, 3W]): no padding rows, so neither work nor memory for
//! them; lse and δ then hold [H, length] per sequence from offsets[b]·H (padded: [B, H, S], the
//! same formula with S rows a sequence). Blocks of query or key tiles past a sequence's rows exit.
//!
//! Two grids of blocks of 4 warps, from one kernel body (`RESIDENT`, a constant); warp w owns
//! queries 16w … 16w + 15 of the block's query tile:
//! - resident (`flash_attention_forward_d32`, `_d64`): one block per (head, sequence) walks the
//!   sequence's query tiles 0 … ⌈length / 64⌉ − 1 in turn, the sequence's K and V resident in
//!   shared memory: key tile j lives in slot j, loaded the first time a query tile needs it
//!   (causal: query tile j; else all during query tile 0) and never again, so K and V are read
//!   once per (sequence, head). Each query tile starts after a barrier (every warp has written its
//!   previous O out of the Q tile) and loads its Q tile.
//! - per query tile (`flash_attention_forward_tiles_d32`, `_d64`, `_d128`), the fallback where
//!   the resident shared memory exceeds the device's per-block limit (long sequences) and at D =
//!   128 (its resident kernel spilled on sm_90): one block per (64-query tile, head, sequence),
//!   every key tile loaded into one slot, so K and V are read once per query tile.
//!
//! A query tile loads its Q tile (cp.async) once, then walks the key tiles 0 … ⌈k_end / 64⌉ − 1,
//! k_end = the sequence's length, or for a causal query tile min(length, last query + 1); a key
//! tile that is not yet in its slot goes through step 1:
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
//! Shared memory: the Q tile and the K and V slots, 64 × D bf16 each, 128·D·(1 + 2·⌈S/64⌉) bytes
//! resident (72 KiB at ViT-B/16's S = 197 and D = 64, 40 KiB at S = 77 or 99), 3·128·D per
//! query tile (12, 24, 48 KiB for D = 32, 64, 128). Registers (ptxas, sm_80 / sm_90), no spills:
//! resident 164 / 167, 182 / 226 for D = 32, 64; per query tile 128 / 122, 163 / 148, 201 / 193
//! for D = 32, 64, 128 (O is D/2 f32 per thread, S 32; the loop over query tiles holds its
//! invariants across it, which is why the per-query-tile kernels do not have one). Parallelism:
//! B·H resident blocks (ViT-B/16 at batch 256: 3072) against an H100's 132 SMs; 226 registers
//! allow 2 blocks (8 warps) an SM on sm_90, the 72 KiB of S = 197 would allow 3: about 12 waves,
//! each block's query tiles in series. The backward's: K, V, Q, dO (64 × D each), dSᵀ, lse, δ
//! and the resident path's slots (below). Each row's 16-byte chunks are swizzled
//! (chunk c of row r at c ⊕ (r mod 8), for D = 32 at c ⊕ (⌊r/2⌋ mod 4)) so that the 8 rows an
//! `ldmatrix` phase reads, and the 8 chunks of a cp.async phase, fall on distinct banks.
//!
//! Memory traffic, analytic minimum: 2·D·(q + 2·k) bytes read per (sequence, head), q = k = the
//! length when resident (Q, K and V once); per query tile, q valid queries visiting key tiles of
//! k_i valid keys, 2·D·(q + 2·Σ k_i) (K and V once per query tile); 2·D + 4 bytes written a row
//! (O and lse, padding rows included); qkv rows are whole sectors (2·D bytes at 64-byte-aligned
//! columns), so every access uses all of its sectors. On the emulator's counters
//! (`tests/flash_attention_gpu.rs`, D = 64, H = 2), resident: 1.009× its minimum at S = 197 with
//! PGS lengths 197, 99, 1 (1.011× packed), 1.009× for the text tower's causal 77 (the rest: the
//! lengths' sector per block, lse rows across sectors); per query tile: 1.008×, 1.012×, 1.009×
//! its own minimum, which is 1.94×, 2.18× and 1.43× the resident bytes. Work: 4·D per visible
//! (query, key) pair, plus the masked part of the diagonal and last tiles.
//!
//! Backward (FlashAttention-2's, probabilities recomputed from lse). A pre-pass,
//! `flash_attention_backward_dot`, computes δ_i = Σ_d dO_id·O_id (a warp per 8 rows of a head:
//! their δ one 32-byte store). O and dO go in 16-byte vectors: a row's D/8 on as many lanes,
//! 256/D rows a load (512 bytes, where two bf16 a lane read one row's 128 bytes at D = 64), each
//! lane's 8 products summed in order, then a butterfly over the row's lanes; the fallback's dQ
//! accumulator rows are zeroed in 16-byte stores likewise (D not a multiple of 8 or unaligned
//! views: two bf16 and one f32 a lane). The same sectors in fewer requests: at ViT-B/16's shape
//! below (D = 64, lengths 197, 99, 1), 610 requests where two bf16 a lane take 1 494 (1 204
//! against 3 858 with the accumulator). Both paths then share one (key tile, query tile) step, in the
//! transposed orientation so that warp w's rows are keys 16w … 16w + 15 of the key tile:
//! Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, Pᵀ = exp(scale·Sᵀ − lse) where visible, dSᵀ = Pᵀ∘(dPᵀ − δ)·scale,
//! dV += Pᵀ·dO and dK += dSᵀ·Q (P and dS as bf16 A fragments straight from the accumulators, Q
//! and dO by `ldmatrix.trans`), 32 queries at a time: Sᵀ and dPᵀ of all 64 beside dK and dV
//! spilled at D = 64, and K's and V's fragments are read from shared memory twice instead. dSᵀ
//! goes to shared memory, and dQ = dS·K (dS by `ldmatrix.trans` of dSᵀ, warp w: queries 16w …, the head dims in two halves) is
//! written as f32 to the warp's rows of a shared dQ tile. A key tile's dK and dV stay in
//! registers over the query tiles it sees (causal: from the key tile on; none past the length)
//! and are written once, by way of the K and V tiles.
//!
//! Resident (`flash_attention_backward_resident_dNN`, D = 32, 64 and 128, where its shared memory
//! fits the device's per-block limit): one block per (head, sequence) walks the sequence's key
//! tiles in turn. Query tile i has its own slot: its Q and dO tiles, its lse·log₂e and δ, and an
//! f32 dQ tile [64, D] — loaded by cp.async when key tile 0 visits it (every query tile's first
//! visit) and never again. Each step adds its dQ to the slot's: warp w computes the same query
//! rows at every step, so it is a plain read-add-write by their owner (key tile 0's step
//! stores). At the end dQ goes to dqkv's q columns as bf16 (16-byte stores). Q, dO, lse and δ
//! are read once per (sequence, head) and dQ written once: no global accumulator, no atomics, no
//! zeroing, no third launch. Shared memory: K, V, dSᵀ, then ⌈S/64⌉ slots of 264 rows of 2·D
//! bytes; an H100's 227 KiB holds S ≤ 768 at D = 32, S ≤ 384 at D = 64 (156 KiB for ViT-B/16's
//! 197, 90 KiB for the text tower's 77), S ≤ 128 at D = 128. That is one block of 4 warps
//! per SM and B·H blocks, fewer warps in flight than the fallback: whether that costs time is a
//! question for GPU timings (`clip-pgs bench attention`).
//!
//! Fallback (`flash_attention_backward_dNN`: longer sequences, GPUs with less shared
//! memory, or forced): one block per (64-key tile, head, sequence) with a single slot (41 KiB in
//! all at D = 64) reloaded for every query tile it visits, so Q, dO, lse and δ are read once per
//! key tile; the step's dQ is staged in the slot's Q and dO tiles and added to a global f32
//! accumulator (zeroed by the pre-pass) by f32 atomics whose 32 lanes take 32 consecutive
//! columns of a row (4 whole sectors an instruction); `flash_attention_backward_dq` rounds it
//! into dqkv.
//!
//! Registers (ptxas, sm_80 / sm_90), no spills: resident 172 / 168, 242 / 239, 177 / 130 for
//! D = 32, 64, 128; fallback 158 / 126, 232 / 226, 106 / 110; the pre-pass 37 / 38 (40 / 39 with two bf16 a
//! lane). (With the
//! whole 64-query Sᵀ and dPᵀ live at once: resident 250 / 246 at D = 32 and 464 spill bytes at
//! D = 64 on sm_80; fallback 242 / 242, 255 / 250.)
//!
//! Memory traffic on the emulator's counters (`tests/flash_attention_gpu.rs`, H = 2). Resident:
//! analytic minimum Q, K, V, dO of the valid rows read once, lse and δ once, dQ, dK and dV
//! written once as bf16 (padding rows included), the pre-pass's O and dO reads and δ writes;
//! ViT-B/16's S = 197 with PGS lengths 197, 99, 1 at D = 64: minimum 919 560 bytes, the two
//! launches move 930 464 (1.012×; the rest: the lengths' sector per warp, δ rows across
//! sectors), 2.6× fewer than the fallback's 2 409 632; at D = 32 1.023×; the text tower's causal
//! 77 (lengths 77, 13) at D = 128: 1.006×. Fallback, minimum
//! with Q, dO, lse, δ once per key tile, the atomics' 4·D bytes per (query, key tile), the
//! accumulator's zeroing and read-back: the ViT shape at D = 64, 2 394 408, moved 2 409 632
//! (1.006×); at D = 32, forced, 1.013×. dQ by atomics rather than a separate pass over query
//! tiles (commit e9caaf9, reverted: K and V read once per query tile again, S and dP
//! recomputed, 7 GEMMs instead of 5) stays the fallback's choice.

use crate::element::{Bf16, Bf16x8, F32x4};
use crate::hw::{
    Global, GlobalMut, Shared, WARP, block_stride, block_x, block_y, block_z, cp_async_16, cp_async_commit,
    cp_async_wait, dynamic_shared, ex2_approx, grid_stride, lane, lane_here, lane_stride, ldmatrix, lg2_approx,
    mma_bf16_m16n8k16, shfl_xor, sync_threads, sync_warp, unrolled, warp, warp_rows,
};
use crate::kernel;
use crate::map::starts_pack;
use crate::reduce::{warp_reduce, warp_reduce_strided};

/// Threads per block (4 warps of 16 queries).
pub const THREADS: u32 = 128;

/// Queries per block, keys per tile.
pub const TILE: usize = 64;

/// 16-key steps of a key tile (mma k-steps of P·V).
const KT: usize = TILE / 16;

/// 16-query steps of half a query tile (the backward computes Sᵀ and dPᵀ a half at a time).
const QP: usize = KT / 2;

/// Dynamic shared memory of a forward launch for head dim `d` holding `key_tiles` K and V tiles
/// at once (resident: ⌈S/64⌉; else 1): the Q tile and those.
pub const fn shared_bytes(d: usize, key_tiles: usize) -> u32 {
    ((1 + 2 * key_tiles) * TILE * d * 2) as u32
}

/// A backward query tile's slot, in rows of D bf16: its Q tile, its dO tile, its (lse·log₂e, δ)
/// pairs (64 × 8 bytes in 8 rows: D ≥ 32), and on the resident path its f32 dQ [64, D]. Every
/// part starts at a multiple of 8 rows, so that the tiles' swizzle is the same in every slot.
const SLOT_O: usize = TILE;
const SLOT_STATS: usize = 2 * TILE;
const SLOT_DQ: usize = 2 * TILE + 8;
const SLOT_ROWS: usize = SLOT_DQ + 2 * TILE;

/// The backward's with `slots` query slots: K and V tiles, dSᵀ (64 × 64 bf16), then the slots
/// (`dq`: with their dQ).
const fn backward_layout_bytes(d: usize, slots: usize, dq: bool) -> usize {
    2 * TILE * d * 2 + TILE * TILE * 2 + slots * (if dq { SLOT_ROWS } else { SLOT_DQ }) * d * 2
}

/// The fallback backward's (one slot, reloaded per query tile).
pub const fn backward_shared_bytes(d: usize) -> u32 {
    backward_layout_bytes(d, 1, false) as u32
}

/// The resident backward's for sequences of at most `seq` rows: ⌈S/64⌉ slots and their dQ.
pub const fn resident_backward_shared_bytes(d: usize, seq: usize) -> usize {
    backward_layout_bytes(d, seq.div_ceil(TILE), true)
}

/// 8 bf16: one 16-byte chunk of a tile row (a cp.async, a vector store).
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Chunk([u32; 4]);

/// Two f32 of an accumulator row (columns 2t, 2t + 1): one 8-byte shared store.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Pair([f32; 2]);

/// Element index of (row r, column c) in the backward's f32 dQ staging tile [64, D] (over the Q
/// and dO tiles): 16-byte chunks swizzled by 2·(r mod 4), so that the accumulator's pair stores
/// (rows g, chunks 2n + ⌊t/2⌋) and a row's 32-column reads fall on distinct banks.
#[inline(always)]
fn dq_at<const DK: usize>(r: usize, c: usize) -> usize {
    r * 16 * DK + 4 * ((c / 4) ^ (2 * (r % 4))) + c % 4
}

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

    /// The A fragment of the transposed tile: rows c0 … c0 + 15 of the transpose (columns of the
    /// tile), k-step r0 … r0 + 15 (rows of the tile). dQ: A = dS from dSᵀ.
    #[inline(always)]
    unsafe fn a_trans(self, c0: usize, r0: usize) -> [u32; 4] {
        let (i, r) = (lane_here() / 8, lane_here() % 8);
        ldmatrix::<4, true>(unsafe { self.s.offset(Self::at(r0 + 8 * (i / 2) + r, c0 / 8 + i % 2)) })
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

/// Where sequence b lies in qkv and out: rows row0 … row0 + rows − 1, the first `len` valid.
#[derive(Clone, Copy)]
struct Sequence {
    row0: usize,
    rows: usize,
    len: usize,
}

impl Sequence {
    /// Packed (`offsets` non-null, B + 1 ascending row offsets): rows offsets[b] … offsets[b + 1]
    /// − 1, all valid, at most S. Padded: rows b·S …, S of them, `lengths[b]` valid (clamped to
    /// 1..=S; null: S), the rest padding.
    /// # Safety
    /// offsets (unless null) holds B + 1 values, lengths (unless null) B.
    unsafe fn of(lengths: Global<u32>, offsets: Global<u32>, b: usize, seq: usize) -> Sequence {
        // SAFETY: the caller's contract.
        unsafe {
            if !offsets.is_null() {
                let row0 = offsets.load(b) as usize;
                let len = (offsets.load(b + 1) as usize).saturating_sub(row0).min(seq);
                Sequence { row0, rows: len, len }
            } else {
                let len = if lengths.is_null() { seq } else { (lengths.load(b) as usize).clamp(1, seq) };
                Sequence { row0: b * seq, rows: seq, len }
            }
        }
    }

    /// Head h's first value in lse and δ: the sequence's are [H, rows] from row0·H ([B, H, S]
    /// when padded).
    fn lse0(self, h: usize, heads: usize) -> usize {
        self.row0 * heads + h * self.rows
    }
}

/// Where a block's sequence and head lie in qkv, out and lse.
#[derive(Clone, Copy)]
struct Head {
    /// The sequence's rows; those from `len` on are padding.
    rows: usize,
    /// The sequence's valid tokens.
    len: usize,
    /// Its first row in qkv and out.
    row0: usize,
    /// W = H·D.
    width: usize,
    /// The head's first column in each of q, k, v and out: h·D.
    col: usize,
    /// Its first value in lse.
    lse0: usize,
}

impl Head {
    /// Head h (of `heads`, dim d) of sequence `sq`.
    fn new(sq: Sequence, h: usize, heads: usize, d: usize) -> Head {
        let (rows, len, row0) = (sq.rows, sq.len, sq.row0);
        Head { rows, len, row0, width: heads * d, col: h * d, lse0: sq.lse0(h, heads) }
    }

    /// Part p (0 q, 1 k, 2 v) from row `row` on.
    unsafe fn qkv(self, qkv: Global<Bf16>, p: usize, row: usize) -> Global<Bf16> {
        unsafe { qkv.offset((self.row0 + row) * 3 * self.width + p * self.width + self.col) }
    }

    /// Valid rows of the tile from `row`.
    fn valid(self, row: usize) -> usize {
        self.len.saturating_sub(row).min(TILE)
    }
}

/// The forward pass of one block, head dim 16·DK. RESIDENT: query tiles 0, 1, … of its sequence
/// in turn, key tile j kept in slot j once loaded; else query tile `block_x` alone, every key tile
/// in slot 0. A constant, so that the per-query-tile kernels have no loop over query tiles to hold
/// registers across (they keep the registers of a single-grid kernel).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn forward<const DK: usize, const RESIDENT: bool>(
    out: GlobalMut<Bf16>,
    lse: GlobalMut<f32>,
    qkv: Global<Bf16>,
    (lengths, offsets): (Global<u32>, Global<u32>),
    seq: u32,
    heads: u32,
    causal: u32,
    scale: f32,
) {
    let (seq, heads, causal) = (seq as usize, heads as usize, causal != 0);
    let (h, b) = (block_y(), block_z());
    // SAFETY: the caller's contract (buffer sizes, grid, shared memory).
    unsafe {
        let head = Head::new(Sequence::of(lengths, offsets, b, seq), h, heads, 16 * DK);
        let block = Forward::<DK> { out, lse, qkv, head, tiles: dynamic_shared::<Bf16>(), causal, scale };
        if RESIDENT {
            let (mut q0, mut loaded) = (0, 0);
            while q0 < head.len {
                block.query_tile::<true>(q0, &mut loaded);
                q0 += TILE;
            }
            // The query tiles past the length: zeros in their rows.
            while q0 < head.rows {
                write_padding::<DK>(out, lse, head, q0);
                q0 += TILE;
            }
        } else if TILE * block_x() < head.len {
            block.query_tile::<false>(TILE * block_x(), &mut 0);
        } else {
            write_padding::<DK>(out, lse, head, TILE * block_x());
        }
    }
}

/// What a forward block works on: its outputs, qkv, its sequence and head, its shared memory.
#[derive(Clone, Copy)]
struct Forward<const DK: usize> {
    out: GlobalMut<Bf16>,
    lse: GlobalMut<f32>,
    qkv: Global<Bf16>,
    head: Head,
    tiles: Shared<Bf16>,
    causal: bool,
    scale: f32,
}

impl<const DK: usize> Forward<DK> {
    /// Query tile q0 (below the length) against its key tiles: `loaded` of them are already in
    /// their slots when RESIDENT (key tile j in slot j, Q in slot 0 before them), the rest are
    /// loaded; else every key tile is loaded into the one slot.
    #[inline(always)]
    unsafe fn query_tile<const RESIDENT: bool>(self, q0: usize, loaded: &mut usize) {
        let Forward { out, lse, qkv, head, tiles, causal, scale } = self;
        let len = head.len;
        // SAFETY: the caller's contract (buffer sizes, grid, shared memory).
        unsafe {
            // Key tile j's K and V: slots 1 + 2j and 2 + 2j resident, else 1 and 2 for every j.
            let q_s = Tile::<DK>::nth(tiles, 0);
            let kv = |j: usize| {
                let slot = if RESIDENT { j } else { 0 };
                (Tile::<DK>::nth(tiles, 1 + 2 * slot), Tile::<DK>::nth(tiles, 2 + 2 * slot))
            };
            if RESIDENT {
                sync_threads(); // every warp is done with the previous query tile's Q rows (its O)
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
                let (k_s, v_s) = kv(k0 / TILE);
                // Resident: a key tile is loaded by the first query tile that needs it (causal: the
                // diagonal's; else query tile 0), into a slot no warp reads yet.
                let fresh = !RESIDENT || k0 / TILE >= *loaded;
                if fresh {
                    sync_threads(); // not resident: every warp is done with the previous K and V tiles
                    let valid = head.valid(k0);
                    k_s.load(head.qkv(qkv, 1, k0), 3 * head.width, valid);
                    cp_async_commit();
                    v_s.load(head.qkv(qkv, 2, k0), 3 * head.width, valid);
                    cp_async_commit();
                    cp_async_wait::<1>();
                    sync_threads();
                    *loaded = k0 / TILE + 1;
                }

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
                if fresh {
                    cp_async_wait::<0>();
                    sync_threads();
                }
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

            // ℓ of the whole row, then O/ℓ (0 in padding rows) by way of this warp's rows of the Q
            // tile; the lse by the lanes of column pair 0.
            unrolled::<2>(|r| {
                l[r] += shfl_xor(u32::MAX, l[r], 1);
                l[r] += shfl_xor(u32::MAX, l[r], 2);
            });
            let inv = [0, 1].map(|r| if query(2 * r) < len { 1.0 / l[r] } else { 0.0 });
            let first = (head.row0 + q0 + rows0) * head.width + head.col;
            store_rows(q_s, rows0, &o, inv, out, first, head.width, head.rows.saturating_sub(q0 + rows0));
            if t == 0 {
                unrolled::<2>(|r| {
                    let i = query(2 * r);
                    if i < head.rows {
                        let v = if i < len { (m[r] + lg2_approx(l[r])) * core::f32::consts::LN_2 } else { 0.0 };
                        lse.store(head.lse0 + i, v);
                    }
                });
            }
        }
    }
}

/// Writes a warp's 16 × D accumulator (the rows of its m16n8 tiles, row half r scaled by
/// `mul[r]`) as bf16: staged in the warp's rows `rows0 …` of `tile`, then 16-byte stores of its
/// first `rows` rows (≤ 16) to `dst`, row i at element `first + i·stride`. The caller's barrier
/// has ended every other warp's reads of those tile rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn store_rows<const DK: usize>(
    tile: Tile<DK>,
    rows0: usize,
    acc: &[[[f32; 4]; 2]; DK],
    mul: [f32; 2],
    dst: GlobalMut<Bf16>,
    first: usize,
    stride: usize,
    rows: usize,
) {
    let (g, t) = (lane() / 4, lane() % 4);
    let staged = tile.s.cast::<u32>();
    sync_warp(u32::MAX); // the warp's lanes are done reading these rows
    // SAFETY: tile rows of this warp; dst rows below `rows` (the caller's contract).
    unsafe {
        each_score::<DK>(|dp, n, i| {
            if i % 2 == 0 {
                let (r, v) = (i / 2, acc[dp][n]);
                let at = Tile::<DK>::at(rows0 + g + 8 * r, 2 * dp + n) + 2 * t;
                staged.store(at / 2, bf16x2(v[i] * mul[r], v[i + 1] * mul[r]));
            }
        });
        sync_warp(u32::MAX);
        let chunks = Tile::<DK>::CHUNKS;
        let mut c = lane();
        while c < rows.min(16) * chunks {
            let (row, chunk) = (c / chunks, c % chunks);
            let v = staged.cast::<Chunk>().load(Tile::<DK>::at(rows0 + row, chunk) / 8);
            dst.cast::<Chunk>().store((first + row * stride) / 8 + chunk, v);
            c += 32;
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
    let rows = head.rows.min(q0 + TILE).saturating_sub(q0);
    let chunks = Tile::<DK>::CHUNKS;
    block_stride(rows * chunks, |c| {
        let (i, chunk) = (q0 + c / chunks, c % chunks);
        // SAFETY: row i < S of this sequence and head (the caller's contract).
        unsafe { out.cast::<Chunk>().store(((head.row0 + i) * head.width + head.col) / 8 + chunk, Chunk([0; 4])) };
    });
    // SAFETY: as above.
    block_stride(rows, |i| unsafe { lse.store(head.lse0 + q0 + i, 0.0) });
}

/// Rows of one head a warp of the δ pre-pass takes: their δ are one 32-byte store, and the
/// sequence's length is loaded once for them.
pub const DOT_ROWS: usize = 8;

/// δ and the fallback's dQ accumulator, one warp per DOT_ROWS rows of a head: δ = Σ dO∘O over
/// the head's D columns into `delta` (lse's layout), and, unless dq is null (the resident
/// backward), the head's columns of the dQ accumulator dq (out's layout, f32) zeroed for the
/// fallback's atomics in [`backward`]. Padding rows get δ = 0. Sequence `block_y`. O and dO in
/// 16-byte vectors, dq zeroed in them, where D and the views allow ([`dot_rows_in_vectors`]);
/// else two bf16 (one 32-bit word) and one f32 a lane.
#[inline(always)]
unsafe fn backward_dot(
    delta: GlobalMut<f32>,
    dq: GlobalMut<f32>,
    (out, dout): (Global<Bf16>, Global<Bf16>),
    (lengths, offsets): (Global<u32>, Global<u32>),
    seq: usize,
    heads: usize,
    d: usize,
) {
    let width = heads * d;
    // SAFETY: the caller's contract.
    let sq = unsafe { Sequence::of(lengths, offsets, block_y(), seq) };
    let groups = sq.rows.div_ceil(DOT_ROWS);
    // Rows of a head are 2·D bytes at h·D of rows W = H·D wide: whole vectors when D is a
    // multiple of 8 and the views start on a vector boundary. A row's V = D/8 vectors go to V
    // lanes, 32/V rows a load: V a power of two, at most 32.
    let vectors = d / 8;
    let aligned = [out.sector_offset(), dout.sector_offset()].iter().all(|&o| starts_pack::<Bf16x8>(o))
        && (dq.is_null() || starts_pack::<F32x4>(dq.sector_offset()));
    let in_vectors = d.is_multiple_of(8) && vectors.is_power_of_two() && vectors <= WARP && aligned;
    warp_rows(groups * heads, |group| {
        let (h, i0) = (group / groups, DOT_ROWS * (group % groups));
        // The head's row i0 + r starts at element at(r) of out, dout and dq.
        let at = |r: usize| (sq.row0 + i0 + r) * width + h * d;
        // Lane r: δ of row i0 + r.
        let mine = if in_vectors {
            // SAFETY: rows i0 + r < sq.len ≤ sq.rows of the sequence, whole vectors (D a
            // multiple of 8, the views aligned); the buffers' sizes are the caller's contract.
            unsafe { dot_rows_in_vectors(out, dout, at, sq.len.saturating_sub(i0), vectors) }
        } else {
            let mut mine = 0.0;
            unrolled::<DOT_ROWS>(|r| {
                if i0 + r < sq.rows {
                    let mut sum = 0.0;
                    if i0 + r < sq.len {
                        // SAFETY: as above, D even: whole 32-bit words.
                        let (o, g) = unsafe { (out.offset(at(r)).cast::<u32>(), dout.offset(at(r)).cast::<u32>()) };
                        // SAFETY: c < D/2, inside the row.
                        lane_stride(d / 2, |c| unsafe {
                            let (o, g) = (o.load(c), g.load(c));
                            sum += Bf16(o as u16).to_f32() * Bf16(g as u16).to_f32()
                                + Bf16((o >> 16) as u16).to_f32() * Bf16((g >> 16) as u16).to_f32();
                        });
                    }
                    let sum = warp_reduce(sum, |a, b| a + b);
                    if lane() == r {
                        mine = sum;
                    }
                }
            });
            mine
        };
        let rows = sq.rows.saturating_sub(i0).min(DOT_ROWS);
        if !dq.is_null() {
            if in_vectors {
                // D/4 vectors a row, 32 consecutive vectors a store (128·D bytes per 8 rows).
                let (per_row, dq) = (d / 4, dq.cast::<F32x4>());
                // SAFETY: j / per_row < rows: a row of the sequence, whole vectors (dq aligned).
                lane_stride(rows * per_row, |j| unsafe {
                    dq.store(at(j / per_row) / 4 + j % per_row, F32x4([0.0; 4]))
                });
            } else {
                for r in 0..rows {
                    // SAFETY: row i0 + r < sq.rows of the sequence, c < D.
                    lane_stride(d, |c| unsafe { dq.store(at(r) + c, 0.0) });
                }
            }
        }
        if lane() < rows {
            // SAFETY: as above.
            unsafe { delta.store(sq.lse0(h, heads) + i0 + lane(), mine) };
        }
    });
}

/// Σ_d dO∘O of the group's rows r < min(`valid`, DOT_ROWS) (row r at element `at(r)` of `out`
/// and `dout`), 0 past them, for lane r < DOT_ROWS: 32/V rows a load of O and of dO, V =
/// `vectors` 16-byte vectors a row, row r of a load on lanes r, r + 32/V, … (vectors 0, 1, …);
/// a lane's 8 products summed in order, then a butterfly over the row's lanes, after which lane
/// r of the load that holds row r has its sum.
///
/// # Safety
/// V a power of two ≤ 32; rows r < min(valid, DOT_ROWS) lie inside out and dout, whole vectors
/// from a vector boundary. The whole warp calls it (shuffles).
#[inline(always)]
unsafe fn dot_rows_in_vectors(
    out: Global<Bf16>,
    dout: Global<Bf16>,
    at: impl Fn(usize) -> usize,
    valid: usize,
    vectors: usize,
) -> f32 {
    let (o8, g8) = (out.cast::<Bf16x8>(), dout.cast::<Bf16x8>());
    let per_load = WARP / vectors;
    let mut mine = 0.0;
    let mut pass = 0;
    while pass * per_load < DOT_ROWS {
        let r = pass * per_load + lane() % per_load;
        let mut sum = 0.0;
        if r < DOT_ROWS && r < valid {
            // SAFETY: row r is valid (the caller's contract); lane / (32/V) < V, inside the row.
            let (o, g) = unsafe {
                let at = at(r) / 8 + lane() / per_load;
                (o8.load(at), g8.load(at))
            };
            unrolled::<8>(|j| sum += o.0[j].to_f32() * g.0[j].to_f32());
        }
        let sum = warp_reduce_strided(sum, per_load, |a, b| a + b);
        if lane() / per_load == pass {
            mine = sum;
        }
        pass += 1;
    }
    mine
}

/// The backward of one block, head dim 16·DK (HALF = DK/2). Fallback (`RESIDENT` false): the
/// block owns key tile `block_x`, loads each query tile it visits into slot 0 and adds dQ to the
/// f32 accumulator `dq` by atomics. Resident: the block owns the whole (sequence, head), walks
/// its key tiles in turn, keeps query tile i's Q, dO, lse and δ in slot i from their first load
/// (key tile 0 visits every query tile) and dQ in shared memory (`dq` unused), written to dqkv's
/// q columns at the end. dK and dV are the block's own either way (no atomics).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn backward<const DK: usize, const HALF: usize, const RESIDENT: bool>(
    dqkv: GlobalMut<Bf16>,
    dq: GlobalMut<f32>,
    qkv: Global<Bf16>,
    dout: Global<Bf16>,
    lse: Global<f32>,
    delta: Global<f32>,
    (lengths, offsets): (Global<u32>, Global<u32>),
    seq: u32,
    heads: u32,
    causal: u32,
    scale: f32,
) {
    const { assert!(2 * HALF == DK) };
    let (seq, heads, causal) = (seq as usize, heads as usize, causal != 0);
    let (h, b) = (block_y(), block_z());
    // SAFETY: the caller's contract (buffer sizes, grid, shared memory).
    unsafe {
        let d = 16 * DK;
        let head = Head::new(Sequence::of(lengths, offsets, b, seq), h, heads, d);
        let len = head.len;
        let tiles = dynamic_shared::<Bf16>();
        let (k_s, v_s) = (Tile::<DK>::nth(tiles, 0), Tile::<DK>::nth(tiles, 1));
        let ds_s = Tile::<KT> { s: tiles.offset(2 * TILE * 16 * DK) };
        // Query tile i in slot i (slot 0 when not resident): rows qr = SLOT_ROWS·i … of the slots,
        // addressed from these bases.
        let slots = ds_s.s.offset(TILE * TILE);
        let (q_s, o_s) = (Tile::<DK> { s: slots }, Tile::<DK> { s: slots.offset(SLOT_O * 16 * DK) });
        let stats = slots.offset(SLOT_STATS * 16 * DK).cast::<Pair>();
        let dq_s = slots.offset(if RESIDENT { SLOT_DQ * 16 * DK } else { 0 }).cast::<f32>();
        let keys0 = 16 * warp();
        let scale2 = scale * core::f32::consts::LOG2_E;
        // Resident: every key tile of the sequence's rows (those past the length write dK = dV
        // = 0); fallback: tile `block_x` only (a loop the compiler removes).
        let key_tiles = if RESIDENT { head.rows.div_ceil(TILE) } else { 1 };
        for kt in 0..key_tiles {
            let k0 = TILE * if RESIDENT { kt } else { block_x() };
            if RESIDENT {
                sync_threads(); // every warp is done with the previous key tile's K and V rows
            }
            let (mut dk, mut dv) = ([[[0.0f32; 4]; 2]; DK], [[[0.0f32; 4]; 2]; DK]);
            if k0 < len {
                k_s.load(head.qkv(qkv, 1, k0), 3 * head.width, head.valid(k0));
                v_s.load(head.qkv(qkv, 2, k0), 3 * head.width, head.valid(k0));
                cp_async_commit();
            }
            // Causal: queries before the tile see none of its keys. A tile past the length has
            // no work: its dK and dV rows are written 0.
            let mut q0 = if k0 >= len {
                len
            } else if causal {
                k0
            } else {
                0
            };
            while q0 < len {
                let qr = if RESIDENT { q0 / TILE * SLOT_ROWS } else { 0 };
                sync_threads(); // every warp is done with the previous dSᵀ (fallback: Q, dO, statistics)
                if !RESIDENT || k0 == 0 {
                    let valid = head.valid(q0);
                    let q_tile = Tile::<DK> { s: q_s.s.offset(qr * 16 * DK) };
                    let o_tile = Tile::<DK> { s: o_s.s.offset(qr * 16 * DK) };
                    q_tile.load(head.qkv(qkv, 0, q0), 3 * head.width, valid);
                    o_tile.load(dout.offset((head.row0 + q0) * head.width + head.col), head.width, valid);
                    cp_async_commit();
                    block_stride(TILE, |i| {
                        let at = head.lse0 + q0 + i;
                        let (l, dl) = if i < valid { (lse.load(at), delta.load(at)) } else { (0.0, 0.0) };
                        stats.store(qr * 4 * DK + i, Pair([l * core::f32::consts::LOG2_E, dl]));
                    });
                }
                cp_async_wait::<0>();
                sync_threads();
                // dQ: the fallback stages this step's in the Q and dO tiles (free after the
                // step's barrier) for the atomics; resident, added to the slot's (stored by key
                // tile 0, the first to visit each query tile).
                let at = Step { k0, q0, qr, len, causal, scale, scale2 };
                let dq_slot = (dq_s, RESIDENT && k0 > 0);
                backward_step::<DK, HALF>(at, (k_s, v_s), (q_s, o_s), ds_s, stats, &mut dk, &mut dv, dq_slot);
                if !RESIDENT {
                    // Each atomic instruction adds 32 consecutive columns of a row: whole sectors.
                    sync_warp(u32::MAX);
                    let rows0 = 16 * warp();
                    let rows = len.saturating_sub(q0 + rows0).min(16);
                    let mut e = lane_here();
                    while e < rows * d {
                        let (r, col) = (rows0 + e / d, e % d);
                        let at = (head.row0 + q0 + r) * head.width + head.col + col;
                        dq.atomic_add(at, dq_s.load(dq_at::<DK>(r, col)));
                        e += 32;
                    }
                }
                q0 += TILE;
            }

            // dK and dV of the warp's 16 keys (0 for keys past the length) by way of its K and V
            // rows; every warp is done reading K and V after the barrier.
            sync_threads();
            let rows = head.rows.saturating_sub(k0 + keys0);
            let first = (head.row0 + k0 + keys0) * 3 * head.width + head.col;
            store_rows(k_s, keys0, &dk, [1.0; 2], dqkv, first + head.width, 3 * head.width, rows);
            store_rows(v_s, keys0, &dv, [1.0; 2], dqkv, first + 2 * head.width, 3 * head.width, rows);
        }
        if RESIDENT {
            // dQ as bf16 into dqkv's q columns, 16-byte stores; 0 in padding rows.
            sync_threads();
            let chunks = Tile::<DK>::CHUNKS;
            block_stride(head.rows * chunks, |i| {
                let (r, c) = (i / chunks, i % chunks);
                let mut v = [0u32; 4];
                if r < len {
                    unrolled::<4>(|j| {
                        let col = 8 * c + 2 * j;
                        let at = r / TILE * SLOT_ROWS * 8 * DK + dq_at::<DK>(r % TILE, col);
                        v[j] = bf16x2(dq_s.load(at), dq_s.load(at + 1));
                    });
                }
                dqkv.cast::<Chunk>().store(((head.row0 + r) * 3 * head.width + head.col) / 8 + c, Chunk(v));
            });
        }
    }
}

/// Where a backward step lies: key tile k0, query tile q0 (its slot: rows qr … of the slots),
/// the sequence's length, the mask and the scale (scale2 = scale·log₂e).
#[derive(Clone, Copy)]
struct Step {
    k0: usize,
    q0: usize,
    qr: usize,
    len: usize,
    causal: bool,
    scale: f32,
    scale2: f32,
}

/// One (key tile, query tile) step of the backward, shared by both paths: dK and dV of the
/// warp's 16 keys updated, and dQ of the warp's 16 queries of the tile as f32 pairs into
/// `dq_s` at the slot's rows 16·warp … (`dq_at`'s layout), added to what is there when `add`
/// (resident: the warp owns those rows at every step, so no other warp touches them before
/// the final write), stored otherwise. K, V, Q, dO and the tile's (lse·log₂e, δ) pairs are in shared memory (the
/// caller's barrier); ends after a barrier that finishes every warp's reads of Q and dO.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_step<const DK: usize, const HALF: usize>(
    at: Step,
    (k_s, v_s): (Tile<DK>, Tile<DK>),
    (q_s, o_s): (Tile<DK>, Tile<DK>),
    ds_s: Tile<KT>,
    stats: Shared<Pair>,
    dk: &mut [[[f32; 4]; 2]; DK],
    dv: &mut [[[f32; 4]; 2]; DK],
    (dq_s, add): (Shared<f32>, bool),
) {
    let Step { k0, q0, qr, len, causal, scale, scale2 } = at;
    let keys0 = 16 * warp();
    let (g, t) = (lane() / 4, lane() % 4);
    let key = |i: usize| k0 + keys0 + g + 8 * (i / 2);
    // SAFETY: tiles and statistics of the block's shared memory (the caller's contract).
    unsafe {
        // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: the warp's 16 keys × the tile's queries, 32 at a time, so
        // that Sᵀ and dPᵀ hold 16 registers a thread each beside dK and dV (all 64 queries at
        // once spilled at D = 64); K's and V's fragments are read from shared memory twice.
        let mut part = 0;
        while part < 2 {
            let (mut s, mut dp) = ([[[0.0f32; 4]; 2]; QP], [[[0.0f32; 4]; 2]; QP]);
            unrolled::<DK>(|kd| {
                let (kf, vf) = (k_s.a(keys0, kd), v_s.a(keys0, kd));
                unrolled::<QP>(|qq| {
                    let rows = qr + 16 * (QP * part + qq);
                    let qf = q_s.b_rows(rows, kd);
                    s[qq][0] = mma_bf16_m16n8k16(kf, [qf[0], qf[1]], s[qq][0]);
                    s[qq][1] = mma_bf16_m16n8k16(kf, [qf[2], qf[3]], s[qq][1]);
                    let of = o_s.b_rows(rows, kd);
                    dp[qq][0] = mma_bf16_m16n8k16(vf, [of[0], of[1]], dp[qq][0]);
                    dp[qq][1] = mma_bf16_m16n8k16(vf, [of[2], of[3]], dp[qq][1]);
                })
            });
            // Pᵀ = 2^(S·scale·log₂e − lse·log₂e) where visible, dSᵀ = Pᵀ∘(dPᵀ − δ)·scale.
            each_score::<QP>(|qq, n, i| {
                let c = 16 * (QP * part + qq) + 8 * n + 2 * t + i % 2;
                let (query, key) = (q0 + c, key(i));
                let visible = query < len && key < len && (!causal || key <= query);
                let Pair([lse, delta]) = stats.load(qr * 4 * DK + c);
                let p = if visible { ex2_approx(s[qq][n][i] * scale2 - lse) } else { 0.0 };
                s[qq][n][i] = p;
                dp[qq][n][i] = p * (dp[qq][n][i] - delta) * scale;
            });

            // dV += Pᵀ·dO and dK += dSᵀ·Q over these queries; dSᵀ to shared for dQ.
            unrolled::<QP>(|qq| {
                let q16 = QP * part + qq;
                let pack = |x: [[f32; 4]; 2]| {
                    [
                        bf16x2(x[0][0], x[0][1]),
                        bf16x2(x[0][2], x[0][3]),
                        bf16x2(x[1][0], x[1][1]),
                        bf16x2(x[1][2], x[1][3]),
                    ]
                };
                let (p, ds) = (pack(s[qq]), pack(dp[qq]));
                unrolled::<DK>(|dd| {
                    let of = o_s.b_cols(qr + 16 * q16, dd);
                    dv[dd][0] = mma_bf16_m16n8k16(p, [of[0], of[1]], dv[dd][0]);
                    dv[dd][1] = mma_bf16_m16n8k16(p, [of[2], of[3]], dv[dd][1]);
                    let qf = q_s.b_cols(qr + 16 * q16, dd);
                    dk[dd][0] = mma_bf16_m16n8k16(ds, [qf[0], qf[1]], dk[dd][0]);
                    dk[dd][1] = mma_bf16_m16n8k16(ds, [qf[2], qf[3]], dk[dd][1]);
                });
                let staged = ds_s.s.cast::<u32>();
                unrolled::<2>(|n| {
                    unrolled::<2>(|r| {
                        let at = Tile::<KT>::at(keys0 + g + 8 * r, 2 * q16 + n) + 2 * t;
                        staged.store(at / 2, ds[2 * n + r]);
                    })
                });
            });
            part += 1;
        }
        sync_threads();

        // dQ = dS·K: warp w takes queries 16w …, the head dims in two halves (registers). The
        // addresses take the lane from `lane_here`, as the tiles' loads do.
        let rows0 = 16 * warp();
        let mut half = 0;
        while half < 2 {
            let mut acc = [[[0.0f32; 4]; 2]; HALF];
            unrolled::<KT>(|kk| {
                let a = ds_s.a_trans(rows0, 16 * kk);
                unrolled::<HALF>(|dd| {
                    let kf = k_s.b_cols(16 * kk, half * HALF + dd);
                    acc[dd][0] = mma_bf16_m16n8k16(a, [kf[0], kf[1]], acc[dd][0]);
                    acc[dd][1] = mma_bf16_m16n8k16(a, [kf[2], kf[3]], acc[dd][1]);
                })
            });
            each_score::<HALF>(|dd, n, i| {
                if i % 2 == 0 {
                    let (g, t) = (lane_here() / 4, lane_here() % 4);
                    let col = 16 * (half * HALF + dd) + 8 * n + 2 * t;
                    let at = (qr * 8 * DK + dq_at::<DK>(rows0 + g + 8 * (i / 2), col)) / 2;
                    let (x, y) = (acc[dd][n][i], acc[dd][n][i + 1]);
                    let pair = if add {
                        let Pair([x0, y0]) = dq_s.cast::<Pair>().load(at);
                        Pair([x0 + x, y0 + y])
                    } else {
                        Pair([x, y])
                    };
                    dq_s.cast::<Pair>().store(at, pair);
                }
            });
            half += 1;
        }
    }
}

kernel! {
    /// The backward's pre-pass: δ (lse's layout) = Σ_d dO∘O per row and head (0 in padding
    /// rows), and the dQ accumulator dq (out's layout, f32) zeroed unless null. Sequences as the
    /// forward's.
    ///
    /// # Safety
    /// delta holds lse's values, dq (unless null), out and dout out's, lengths and offsets
    /// (unless null) B and B + 1; D even; grid (any, B) of whole warps.
    pub fn flash_attention_backward_dot(
        delta: GlobalMut<f32>,
        dq: GlobalMut<f32>,
        out: Global<Bf16>,
        dout: Global<Bf16>,
        lengths: Global<u32>,
        offsets: Global<u32>,
        seq: u32,
        heads: u32,
        head_dim: u32,
    ) {
        let (seq, heads, d) = (seq as usize, heads as usize, head_dim as usize);
        // SAFETY: the caller's contract.
        unsafe { backward_dot(delta, dq, (out, dout), (lengths, offsets), seq, heads, d) }
    }
}

kernel! {
    /// The q part of dqkv [rows, 3·W] (bf16) from the dQ accumulator dq [rows, W] (f32).
    ///
    /// # Safety
    /// dqkv holds rows·3·width values, dq rows·width.
    pub fn flash_attention_backward_dq(dqkv: GlobalMut<Bf16>, dq: Global<f32>, rows: u32, width: u32) {
        let width = width as usize;
        // SAFETY: i < rows·width.
        grid_stride(rows as usize * width, |i| unsafe {
            dqkv.store(i / width * 3 * width + i % width, Bf16::from_f32(dq.load(i)))
        });
    }
}

macro_rules! forward_entries {
    ($($name:ident: $dk:literal, $resident:literal),*) => {$(
        kernel! {
            /// out [rows, H·D] and lse from qkv [rows, 3·H·D] (bf16), D = 16·DK:
            /// softmax(scale·QKᵀ masked)·V per sequence and head. Padded (`offsets` null): B
            /// sequences of S rows, `lengths[b]` (clamped to 1..=S; null: S) valid in sequence
            /// b, lse [B, H, S]; packed: sequence b is rows offsets[b] … offsets[b + 1] − 1 (at
            /// most S), lse [H, its rows] from offsets[b]·H. `causal` != 0 masks keys after the
            /// query. Resident kernels (`flash_attention_forward_dNN`): a block per (head,
            /// sequence) keeps the sequence's K and V in shared memory; per query tile
            /// (`flash_attention_forward_tiles_dNN`): a block per (query tile, head, sequence).
            ///
            /// # Safety
            /// The buffers hold rows·3·H·D, rows·H·D, rows·H, B (lengths) and B + 1 (offsets)
            /// elements, rows = B·S padded, offsets[B] packed; qkv and out 16-byte aligned; grid
            /// (1, H, B) resident, else (⌈S/64⌉, H, B), of `THREADS` threads with
            /// `shared_bytes(D, ⌈S/64⌉)` resident, else `shared_bytes(D, 1)`, bytes of dynamic
            /// shared memory.
            pub fn $name(
                out: GlobalMut<Bf16>,
                lse: GlobalMut<f32>,
                qkv: Global<Bf16>,
                lengths: Global<u32>,
                offsets: Global<u32>,
                seq: u32,
                heads: u32,
                causal: u32,
                scale: f32,
            ) {
                // SAFETY: the caller's contract.
                unsafe { forward::<$dk, $resident>(out, lse, qkv, (lengths, offsets), seq, heads, causal, scale) }
            }
        }
    )*};
}

forward_entries!(
    flash_attention_forward_d32: 2, true,
    flash_attention_forward_d64: 4, true,
    flash_attention_forward_tiles_d32: 2, false,
    flash_attention_forward_tiles_d64: 4, false,
    flash_attention_forward_tiles_d128: 8, false
);

macro_rules! backward_entries {
    ($($name:ident: $dk:literal, $half:literal, $resident:literal),*) => {$(
        kernel! {
            /// dqkv [rows, 3·H·D] (bf16) from qkv, dout [rows, H·D], the forward's lse and the
            /// pre-pass's delta; D = 16·DK, sequences and masks as the forward's. Resident
            /// (`flash_attention_backward_resident_dNN`, a block per (head, sequence)): all of
            /// dqkv, `dq` unused (null). Key tiles (`flash_attention_backward_dNN`, a block per
            /// (key tile, head, sequence)): dK and dV, and dQ added to dq [rows, H·D] (f32,
            /// zeroed by `flash_attention_backward_dot`), which `flash_attention_backward_dq`
            /// rounds into dqkv's q part.
            ///
            /// # Safety
            /// The buffers hold those sizes; qkv, dqkv and dout 16-byte aligned; resident: grid
            /// (1, H, B) of `THREADS` threads with `resident_backward_shared_bytes(D, S)` bytes of
            /// dynamic shared memory; key tiles: grid (⌈S/64⌉, H, B), `backward_shared_bytes(D)`.
            pub fn $name(
                dqkv: GlobalMut<Bf16>,
                dq: GlobalMut<f32>,
                qkv: Global<Bf16>,
                dout: Global<Bf16>,
                lse: Global<f32>,
                delta: Global<f32>,
                lengths: Global<u32>,
                offsets: Global<u32>,
                seq: u32,
                heads: u32,
                causal: u32,
                scale: f32,
            ) {
                let sequences = (lengths, offsets);
                // SAFETY: the caller's contract.
                unsafe {
                    backward::<$dk, $half, $resident>(dqkv, dq, qkv, dout, lse, delta, sequences, seq, heads, causal, scale)
                }
            }
        }
    )*};
}

backward_entries!(
    flash_attention_backward_d32: 2, 1, false,
    flash_attention_backward_d64: 4, 2, false,
    flash_attention_backward_d128: 8, 4, false,
    flash_attention_backward_resident_d32: 2, 1, true,
    flash_attention_backward_resident_d64: 4, 2, true,
    flash_attention_backward_resident_d128: 8, 4, true
);
