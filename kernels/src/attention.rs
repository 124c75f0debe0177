//! The softmax of the unfused attention (the fallback beside the flash kernel, and its test
//! oracle on the GPU path): the scores Q·Kᵀ and the products P·V, dP = dO·Vᵀ, dQ, dK, dV are
//! cuBLASLt's strided-batched GEMMs (`host/src/ops/attention.rs`, which also holds the CPU
//! reference); these kernels work on the [B, H, S, S] matrix in between, one warp per row, over
//! elements of type T (`_f32` and `_bf16` entry points of one body each; sums and exponentials
//! in f32, each stored value rounded once).
//!
//! Forward, in place on the scores: p_ij = exp(s·x_ij − max) / Σ over the visible keys, visible
//! meaning j below the sequence's length (PGS's padding) and, when causal, j ≤ i; 0 elsewhere.
//! Three passes over the row: the max, the sum of the exponentials, then each exponential
//! recomputed and divided by the sum (stored once: in bf16 an exponential rounded before the
//! division would be rounded twice).
//! Backward, in place on dP: dS_ij = p_ij·(dP_ij − Σ_k p_ik·dP_ik)·s.
//!
//! Memory traffic, s = bytes per element (4 f32, 2 bf16): forward reads the row three times and
//! writes it once; the second and third reads hit L1/L2 for rows up to a few KB (S ≤ 1024), so
//! DRAM sees one read and one write of s·S bytes per row, the minimum for an in-place pass.
//! Backward reads p and dP twice each and writes dP once (again one DRAM read of each from the
//! second pass on). Lanes take consecutive keys: every warp access is 32 consecutive elements.

use crate::element::{Bf16, Element};
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

/// probs [rows = B·H·S, S]: scores in, probabilities out. `lengths[b]` (clamped to 1..=S; null:
/// S) valid keys of sequence b; `causal` != 0 masks keys after the query.
///
/// # Safety
/// `probs` holds rows·seq elements with rows = batch·heads·seq; `lengths` (unless null) holds
/// `batch` values.
#[inline(always)]
unsafe fn softmax<T: Element>(
    probs: GlobalMut<T>,
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
        let score = |j: usize| unsafe { probs.load(row * seq + j) }.to_f32() * scale;
        let mut max = f32::NEG_INFINITY;
        let mut j = lane();
        while j < end {
            max = max.max(score(j));
            j += WARP;
        }
        let max = warp_reduce(max, f32::max);
        let mut total = 0.0f32;
        let mut j = lane();
        while j < end {
            total += exp(score(j) - max);
            j += WARP;
        }
        let total = warp_reduce(total, |a, b| a + b);
        let mut j = lane();
        while j < seq {
            let p = if j < end { exp(score(j) - max) / total } else { 0.0 };
            // SAFETY: as above; only this lane reads element j.
            unsafe { probs.store(row * seq + j, T::from_f32(p)) };
            j += WARP;
        }
    });
}

/// d [rows, S]: dP in, dS out, with p the forward's probabilities.
///
/// # Safety
/// `d` and `probs` hold rows·seq elements.
#[inline(always)]
unsafe fn softmax_backward<T: Element>(d: GlobalMut<T>, probs: Global<T>, rows: u32, seq: u32, scale: f32) {
    let seq = seq as usize;
    warp_rows(rows as usize, |row| {
        // SAFETY: j < seq on row < rows.
        let (p, dp) =
            unsafe { (|j: usize| probs.load(row * seq + j).to_f32(), |j: usize| d.load(row * seq + j).to_f32()) };
        let mut dot = 0.0f32;
        let mut j = lane();
        while j < seq {
            dot += p(j) * dp(j);
            j += WARP;
        }
        let dot = warp_reduce(dot, |a, b| a + b);
        let mut j = lane();
        while j < seq {
            // SAFETY: as above; only this lane reads element j.
            unsafe { d.store(row * seq + j, T::from_f32(p(j) * (dp(j) - dot) * scale)) };
            j += WARP;
        }
    });
}

macro_rules! softmax_entries {
    ($t:ty, $forward:ident, $backward:ident) => {
        kernel! {
            /// probs [rows = B·H·S, S]: scores in, probabilities out. `lengths[b]` (clamped to
            /// 1..=S; null: S) valid keys of sequence b; `causal` != 0 masks keys after the query.
            ///
            /// # Safety
            /// `probs` holds rows·seq elements with rows = batch·heads·seq; `lengths` (unless
            /// null) holds `batch` values.
            pub fn $forward(
                probs: GlobalMut<$t>,
                lengths: Global<u32>,
                batch: u32,
                heads: u32,
                seq: u32,
                causal: u32,
                scale: f32,
            ) {
                // SAFETY: the caller's contract, the same as softmax's.
                unsafe { softmax(probs, lengths, batch, heads, seq, causal, scale) }
            }
        }

        kernel! {
            /// d [rows, S]: dP in, dS out, with p the forward's probabilities.
            ///
            /// # Safety
            /// `d` and `probs` hold rows·seq elements.
            pub fn $backward(d: GlobalMut<$t>, probs: Global<$t>, rows: u32, seq: u32, scale: f32) {
                // SAFETY: the caller's contract, the same as softmax_backward's.
                unsafe { softmax_backward(d, probs, rows, seq, scale) }
            }
        }
    };
}
softmax_entries!(f32, attention_softmax_f32, attention_softmax_backward_f32);
softmax_entries!(Bf16, attention_softmax_bf16, attention_softmax_backward_bf16);
