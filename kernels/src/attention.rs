//! The softmax of the unfused attention (the fallback beside the flash kernel, and its test
//! oracle on the GPU path): the scores Q·Kᵀ and the products P·V, dP = dO·Vᵀ, dQ, dK, dV are
//! cuBLASLt's strided-batched GEMMs (`host/src/ops/attention.rs`, which also holds the CPU
//! reference); these kernels work on the [B, H, S, S] matrix in between, over elements of type T
//! (`_f32` and `_bf16` entry points of one body each; sums and exponentials in f32, each stored
//! value rounded once).
//!
//! Forward, in place on the scores: p_ij = exp(s·x_ij − max) / Σ over the visible keys, visible
//! meaning j below the sequence's length (PGS's padding) and, when causal, j ≤ i; 0 elsewhere.
//! Backward, in place on dP: dS_ij = p_ij·(dP_ij − Σ_k p_ik·dP_ik)·s.
//!
//! One pass (S ≤ [`MAX_REGISTER_SEQ`] = 273, every model here: 197 for ViT-B/16 at 224 px, 257
//! for ViT-L/14, 99 for its PGS-masked sequences, 77 for text): a warp takes a span of
//! [`rows_per_warp`] consecutive rows (as many as fit in 273 elements, at most [`MAX_GROUP`]: 1
//! row of 197, 2 of 99, 3 of 77), loads it once into registers ([`WINDOWS`] values per lane; the
//! forward only the visible keys), reduces each row (max, then Σ exp, each exponential kept for
//! the store; backward: Σ p·dP; one butterfly per row, the lanes' partials kept per row), and
//! stores the span once. Longer rows take the multi-pass path of the same kernels: a warp per
//! row, the row re-read per pass (from L1/L2 on a GPU). The forward's blocks copy the sequences'
//! lengths into shared memory first (one load each per block, not one 32-byte sector per row).
//!
//! Sector alignment. The probabilities stay [B, H, S, S] contiguous, as the P·V and dV GEMMs read
//! them (ld = S), so a row starts anywhere in a 32-byte sector: lanes reading elements 32k …
//! 32k + 31 of a row of 197 would touch 5 sectors per 4 used (f32; 3 per 2 in bf16). The
//! one-pass path instead lines its windows up with the sectors: window w covers the 32 elements
//! from 32w − phase of the span, phase = the span start's place in its sector
//! (`GlobalMut::sector_offset`), so every full window is 4 whole sectors (2 in bf16); rows of one
//! span share their boundary sectors within the same requests, and only the span's two ends share
//! a sector with a neighbouring warp's span. Every lane takes part in every access of a window
//! the warp touches, so that no lane idles through an access of the others (and the emulator's
//! counters, which match the lanes' n-th access of a source line, see the request the GPU
//! issues): a lane whose slot falls before the span's start or past its end takes a copy of the
//! first or last element (loads it, and stores the value its owner stores: the same element, the
//! same operations); a lane whose key is masked (not read) loads the element of the window's first
//! lane with a visible key, whose sector is read anyway (a ballot finds it; a window with no
//! visible key is skipped by the whole warp); neither enters the sums. Same-address accesses of
//! one instruction touch no other sector. The backward aligns to dP (read and written), with p in
//! the same layout: in the step's arena both start wherever their spans fall, so p's sectors line
//! up when the two starts share a phase (on the emulator every buffer starts a sector). What
//! remains above the minimum: the span ends' straddle, and in the forward the visible keys of each
//! row, a prefix read on its own (the text tower's causal rows: key 0 alone is one sector for 2
//! or 4 bytes).
//!
//! The sums take a row's elements lane by lane in window order, then the butterfly: the
//! multi-pass path (lane l: elements l, l + 32, …) and the CPU (sequential) add in other orders,
//! so the results agree to rounding, not to the bit.
//!
//! Memory traffic, s = bytes per element (4 f32, 2 bf16): forward reads each row's visible keys
//! and writes the row once, at most 2·s·S bytes per row, the minimum for an in-place pass;
//! backward reads p and dP and writes dS once, 3·s·S. The multi-pass path reads the row three
//! times (forward; backward p and dP twice each), the re-reads from L1/L2 for rows of a few KB.
//! At ViT-B/16, batch 8, PGS masks (`clip-pgs bench step --device emu`), moved / minimum and the
//! bytes used of the sectors touched: f32 forward 1.05× / 96%, backward 1.03× / 97%; bf16 1.10× /
//! 92% and 1.07× / 94% (the earlier multi-pass kernels, a warp per row, unaligned, f32: 2.67× /
//! 72% and 2.27× / 73%).

use crate::element::{Bf16, Element};
use crate::hw::{
    Global, GlobalMut, WARP, ballot, block_stride, lane_here, lane_stride, sync_threads, unrolled, warp_rows,
};
use crate::kernel;
use crate::math::exp;
use crate::reduce::warp_reduce;

/// Threads per block (4 warps).
pub const THREADS: u32 = 128;

/// Windows of 32 elements each lane's registers hold in the one-pass path.
pub const WINDOWS: usize = 9;

/// The most elements a warp's windows take at once: they cover the span and up to 15 elements
/// before it (a bf16 span's phase in its sector; 7 for f32).
pub const SPAN: usize = WARP * WINDOWS - 15;

/// The longest row the one-pass path takes.
pub const MAX_REGISTER_SEQ: usize = SPAN;

/// The most consecutive rows one warp takes at once.
pub const MAX_GROUP: usize = 4;

/// Sequences whose lengths a block copies into shared memory (more: each row reads its own).
const SHARED_LENGTHS: usize = 1024;

crate::shared_array!(fn softmax_lengths() -> [u32; SHARED_LENGTHS]);

/// Rows of `seq` elements one warp takes at once: as many whole rows as fit in SPAN elements, at
/// most MAX_GROUP (1 on the multi-pass path). The host sizes the grid with it.
pub const fn rows_per_warp(seq: usize) -> usize {
    if seq == 0 || seq > SPAN {
        1
    } else if SPAN / seq < MAX_GROUP {
        SPAN / seq
    } else {
        MAX_GROUP
    }
}

#[inline(always)]
fn add(a: f32, b: f32) -> f32 {
    a + b
}

/// `values[g]`, g < MAX_GROUP, from per-row values in registers: a match on g, so that the array
/// is indexed by constants only.
#[inline(always)]
fn of_row<V: Copy>(values: [V; MAX_GROUP], g: u32) -> V {
    const _: () = assert!(MAX_GROUP == 4);
    match g {
        0 => values[0],
        1 => values[1],
        2 => values[2],
        _ => values[3],
    }
}

/// values[g] = f(values[g]), as [`of_row`].
#[inline(always)]
fn update_row(values: &mut [f32; MAX_GROUP], g: u32, f: impl Fn(f32) -> f32) {
    match g {
        0 => values[0] = f(values[0]),
        1 => values[1] = f(values[1]),
        2 => values[2] = f(values[2]),
        _ => values[3] = f(values[3]),
    }
}

/// A span of `len` consecutive elements (`rows` rows of `seq`) from element `start` of a buffer,
/// in windows of 32 lined up with the buffer's 32-byte sectors.
#[derive(Clone, Copy)]
struct Span {
    /// The span's first element in the buffer.
    start: usize,
    /// Its place in its sector, in elements: window w starts at span element 32w − phase.
    phase: u32,
    len: u32,
    seq: u32,
    /// Windows that touch the span: ⌈(phase + len) / 32⌉ ≤ WINDOWS.
    count: usize,
}

impl Span {
    /// Rows `first` … `first + rows − 1` of `seq` elements of T (rows·seq ≤ SPAN) in a buffer
    /// whose element 0 is `sector_offset` elements into its sector.
    #[inline(always)]
    fn new<T>(first: usize, rows: usize, seq: usize, sector_offset: usize) -> Self {
        let start = first * seq;
        let phase = ((sector_offset + start) % (32 / core::mem::size_of::<T>())) as u32;
        let len = (rows * seq) as u32;
        Span { start, phase, len, seq: seq as u32, count: (phase + len).div_ceil(WARP as u32) as usize }
    }

    /// The span element of `lane`'s slot in window w: its own, or (before the span's start, past
    /// its end) the span's first or last element.
    #[inline(always)]
    fn element_of(self, w: usize, lane: u32) -> u32 {
        (w as u32 * WARP as u32 + lane).clamp(self.phase, self.phase + self.len - 1) - self.phase
    }

    /// Whether this lane's slot in window w is inside the span (its element is its own).
    #[inline(always)]
    fn owns(self, w: usize) -> bool {
        (w as u32 * WARP as u32 + lane_here() as u32).wrapping_sub(self.phase) < self.len
    }

    /// The span's row (< MAX_GROUP) and key of span element e.
    #[inline(always)]
    fn row_key(self, e: u32) -> (u32, u32) {
        let mut r = 0;
        unrolled::<MAX_GROUP>(|k| {
            if k > 0 && e >= k as u32 * self.seq {
                r = k as u32;
            }
        });
        (r, e - r * self.seq)
    }

    /// Calls `f(w, e)` for the windows w < count, e = this lane's span element in w: uniform within
    /// the warp, unrolled so that arrays indexed by w stay in registers.
    #[inline(always)]
    fn each(self, mut f: impl FnMut(usize, u32)) {
        let lane = lane_here() as u32;
        unrolled::<WINDOWS>(|w| {
            if w < self.count {
                f(w, self.element_of(w, lane));
            }
        });
    }
}

/// Per-row lane partials reduced over the warp, for the span's rows g < rows.
#[inline(always)]
fn reduce_rows(partial: [f32; MAX_GROUP], rows: usize, op: impl Fn(f32, f32) -> f32 + Copy) -> [f32; MAX_GROUP] {
    let reduce = |g: usize| if g < rows { warp_reduce(partial[g], op) } else { partial[g] };
    [reduce(0), reduce(1), reduce(2), reduce(3)]
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
    let (batch, seq, rows) = (batch as usize, seq as usize, (batch * heads * seq) as usize);
    // The sequences' lengths in shared memory: one load each per block, not one per row.
    let staged = !lengths.is_null() && batch <= SHARED_LENGTHS;
    let shared = softmax_lengths();
    if staged {
        // SAFETY: b < batch ≤ SHARED_LENGTHS: inside lengths and the shared array.
        block_stride(batch, |b| unsafe { shared.store(b, lengths.load(b)) });
        sync_threads();
    }
    // The visible keys of a row: j < end.
    let end = |row: usize| {
        let (b, i) = (row / (heads as usize * seq), row % seq);
        let valid = if lengths.is_null() {
            seq
        } else {
            // SAFETY: b < batch: inside lengths, and inside the shared copy when staged.
            (unsafe { if staged { shared.load(b) } else { lengths.load(b) } } as usize).clamp(1, seq)
        };
        if causal != 0 { valid.min(i + 1) } else { valid }
    };
    if seq > MAX_REGISTER_SEQ {
        warp_rows(rows, |row| {
            let end = end(row);
            // SAFETY: j < seq on this row of probs (row < rows).
            let score = |j: usize| unsafe { probs.load(row * seq + j) }.to_f32() * scale;
            let mut max = f32::NEG_INFINITY;
            lane_stride(end, |j| max = max.max(score(j)));
            let max = warp_reduce(max, f32::max);
            let mut total = 0.0f32;
            lane_stride(end, |j| total += exp(score(j) - max));
            let total = warp_reduce(total, add);
            lane_stride(seq, |j| {
                let p = if j < end { exp(score(j) - max) / total } else { 0.0 };
                // SAFETY: as above; only this lane reads element j.
                unsafe { probs.store(row * seq + j, T::from_f32(p)) };
            });
        });
        return;
    }
    let group = rows_per_warp(seq);
    warp_rows(rows.div_ceil(group), |k| {
        let (first, count) = (k * group, group.min(rows - k * group));
        let span = Span::new::<T>(first, count, seq, probs.sector_offset());
        let mut ends = [0u32; MAX_GROUP];
        unrolled::<MAX_GROUP>(|g| {
            if g < count {
                ends[g] = end(first + g) as u32;
            }
        });
        // Which slots hold a visible key (a row is recomputed from the element where needed).
        let mut visible = 0u32;
        let row = |e: u32| span.row_key(e).0;
        // The visible keys, read once. A lane whose element is masked (and is not read) loads the
        // element of the window's first lane with a visible one instead: its sector is read anyway.
        let mut v = [0.0f32; WINDOWS];
        span.each(|w, e| {
            let (r, j) = span.row_key(e);
            let seen = j < of_row(ends, r);
            visible |= (seen as u32) << w;
            let lanes = ballot(u32::MAX, seen);
            if lanes != 0 {
                let at = if seen { e } else { span.element_of(w, lanes.trailing_zeros()) };
                // SAFETY: at < count·seq: on the span's rows of probs (first + count ≤ rows).
                v[w] = unsafe { probs.load(span.start + at as usize) }.to_f32() * scale;
            }
        });
        let seen = |w: usize| visible >> w & 1 != 0;
        let mut max = [f32::NEG_INFINITY; MAX_GROUP];
        span.each(|w, e| {
            if span.owns(w) && seen(w) {
                update_row(&mut max, row(e), |m| m.max(v[w]));
            }
        });
        let max = reduce_rows(max, count, f32::max);
        let mut total = [0.0f32; MAX_GROUP];
        span.each(|w, e| {
            if seen(w) {
                v[w] = exp(v[w] - of_row(max, row(e)));
                if span.owns(w) {
                    update_row(&mut total, row(e), |t| t + v[w]);
                }
            }
        });
        let total = reduce_rows(total, count, add);
        // A copied element (before or past the span) gets the value its owner stores: the same
        // element, so the same load, row and ops.
        span.each(|w, e| {
            let p = if seen(w) { v[w] / of_row(total, row(e)) } else { 0.0 };
            // SAFETY: e < count·seq: on the span's rows of probs.
            unsafe { probs.store(span.start + e as usize, T::from_f32(p)) };
        });
    });
}

/// d [rows, S]: dP in, dS out, with p the forward's probabilities.
///
/// # Safety
/// `d` and `probs` hold rows·seq elements.
#[inline(always)]
unsafe fn softmax_backward<T: Element>(d: GlobalMut<T>, probs: Global<T>, rows: u32, seq: u32, scale: f32) {
    let (rows, seq) = (rows as usize, seq as usize);
    if seq > MAX_REGISTER_SEQ {
        warp_rows(rows, |row| {
            // SAFETY: j < seq on row < rows.
            let (p, dp) =
                unsafe { (|j: usize| probs.load(row * seq + j).to_f32(), |j: usize| d.load(row * seq + j).to_f32()) };
            let mut dot = 0.0f32;
            lane_stride(seq, |j| dot += p(j) * dp(j));
            let dot = warp_reduce(dot, add);
            // SAFETY: as above; only this lane reads element j.
            lane_stride(seq, |j| unsafe { d.store(row * seq + j, T::from_f32(p(j) * (dp(j) - dot) * scale)) });
        });
        return;
    }
    let group = rows_per_warp(seq);
    warp_rows(rows.div_ceil(group), |k| {
        let (first, count) = (k * group, group.min(rows - k * group));
        let span = Span::new::<T>(first, count, seq, d.sector_offset());
        let (mut p, mut dp) = ([0.0f32; WINDOWS], [0.0f32; WINDOWS]);
        let row = |e: u32| span.row_key(e).0;
        span.each(|w, e| {
            let at = span.start + e as usize;
            // SAFETY: e < count·seq: on the span's rows of d and probs (first + count ≤ rows).
            unsafe { (p[w], dp[w]) = (probs.load(at).to_f32(), d.load(at).to_f32()) };
        });
        let mut dot = [0.0f32; MAX_GROUP];
        span.each(|w, e| {
            if span.owns(w) {
                update_row(&mut dot, row(e), |t| t + p[w] * dp[w]);
            }
        });
        let dot = reduce_rows(dot, count, add);
        // SAFETY: as above; a copied element gets the value its owner stores.
        span.each(|w, e| unsafe {
            let ds = p[w] * (dp[w] - of_row(dot, row(e))) * scale;
            d.store(span.start + e as usize, T::from_f32(ds))
        });
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
