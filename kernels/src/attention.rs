//! The softmax of the unfused attention (the fallback beside the flash kernel, and its test
//! oracle on the GPU path): the scores Q·Kᵀ and the products P·V, dP = dO·Vᵀ, dQ, dK, dV are
//! cuBLASLt's strided-batched GEMMs (`host/src/ops/attention.rs`, which also holds the CPU
//! reference); these kernels work on the [B, H, S, S] matrix in between, one warp per row.
//!
//! Forward, in place on the scores: p_ij = exp(s·x_ij − max) / Σ over the visible keys, visible
//! meaning j below the sequence's length (PGS's padding) and, when causal, j ≤ i; 0 elsewhere.
//! Backward, in place on dP: dS_ij = p_ij·(dP_ij − Σ_k p_ik·dP_ik)·s.
//!
//! Memory traffic: forward reads the row three times (max, sum, normalize) and writes it twice;
//! the second and third reads hit L1/L2 for rows up to a few KB (S ≤ 1024), so DRAM sees one
//! read and one write of 4·S bytes per row, the minimum for an in-place pass. Backward reads p
//! and dP twice each and writes dP once (again one DRAM read of each from the second pass on).
//! Lanes take consecutive keys: every warp access is one 128-byte line.

use crate::hw::{Global, GlobalMut, WARP, block_dim_x, block_x, grid_dim_x, lane, warp};
use crate::kernel;
use crate::math::exp;
use crate::reduce::warp_reduce;

/// Threads per block (4 rows).
pub const THREADS: u32 = 128;

/// Calls `f(row)` for rows r = global warp, + total warps, … < rows.
#[inline(always)]
fn warp_rows(rows: usize, mut f: impl FnMut(usize)) {
    let warps = block_dim_x() / WARP;
    let mut row = block_x() * warps + warp();
    while row < rows {
        f(row);
        row += grid_dim_x() * warps;
    }
}

kernel! {
    /// probs [rows = B·H·S, S]: scores in, probabilities out. `lengths[b]` (clamped to 1..=S;
    /// null: S) valid keys of sequence b; `causal` != 0 masks keys after the query.
    ///
    /// # Safety
    /// `probs` holds rows·seq floats with rows = batch·heads·seq; `lengths` (unless null) holds
    /// `batch` values.
    pub fn attention_softmax_f32(
        probs: GlobalMut<f32>,
        lengths: Global<u32>,
        batch: u32,
        heads: u32,
        seq: u32,
        causal: u32,
        scale: f32,
    ) {
        let (seq, rows) = (seq as usize, (batch * heads * seq) as usize);
        warp_rows(rows, |row| {
            let (b, i) = (row / (heads as usize * seq), row % seq);
            // SAFETY: b < batch.
            let valid = if lengths.is_null() { seq } else { (unsafe { lengths.load(b) } as usize).clamp(1, seq) };
            let end = if causal != 0 { valid.min(i + 1) } else { valid };
            // SAFETY: j < seq on this row of probs (row < rows).
            let at = |j: usize| row * seq + j;
            let mut max = f32::NEG_INFINITY;
            let mut j = lane();
            while j < end {
                max = max.max(unsafe { probs.load(at(j)) } * scale);
                j += WARP;
            }
            let max = warp_reduce(max, f32::max);
            let mut total = 0.0f32;
            let mut j = lane();
            while j < seq {
                // SAFETY: as above.
                let e = if j < end { exp(unsafe { probs.load(at(j)) } * scale - max) } else { 0.0 };
                unsafe { probs.store(at(j), e) };
                total += e;
                j += WARP;
            }
            let total = warp_reduce(total, |a, b| a + b);
            let mut j = lane();
            while j < end {
                // SAFETY: as above; this lane wrote element j.
                unsafe { probs.store(at(j), probs.load(at(j)) / total) };
                j += WARP;
            }
        });
    }
}

kernel! {
    /// d [rows, S]: dP in, dS out, with p the forward's probabilities.
    ///
    /// # Safety
    /// `d` and `probs` hold rows·seq floats.
    pub fn attention_softmax_backward_f32(d: GlobalMut<f32>, probs: Global<f32>, rows: u32, seq: u32, scale: f32) {
        let seq = seq as usize;
        warp_rows(rows as usize, |row| {
            let at = |j: usize| row * seq + j;
            let mut dot = 0.0f32;
            let mut j = lane();
            while j < seq {
                // SAFETY: j < seq on row < rows.
                dot += unsafe { probs.load(at(j)) * d.load(at(j)) };
                j += WARP;
            }
            let dot = warp_reduce(dot, |a, b| a + b);
            let mut j = lane();
            while j < seq {
                // SAFETY: as above; this lane read element j.
                unsafe { d.store(at(j), probs.load(at(j)) * (d.load(at(j)) - dot) * scale) };
                j += WARP;
            }
        });
    }
}
