//! PGS candidate generation and selection (pgs-spec.md steps 2 and 5), pure helpers shared by the
//! CPU reference and the GPU kernels.
//!
//! Random draws come from Philox keyed by the seed, with stream (step, image), the image counted
//! from `first` (the batch's first image in the global batch of data-parallel ranks, so that a
//! rank draws what one process of the global batch would) — the kernels read seed, step and first
//! from the mask clock (`mask_clock.rs`) in device memory: draws 0..L are the
//! per-patch uniforms of the first decision (Gumbel noise in `paper`, candidate noise in
//! `reference`, FLIP's order in `flip`), draws L..2L the second (tie-breaking jitter in `paper`,
//! priorities in `reference`).

use crate::math::ln;

/// Candidate fraction ρ (f64, as the public code's Python float).
pub const CANDIDATE_FRACTION: f64 = 0.05;
/// Added to the sampling weight 1 − E (spec: (1 − E) + 1e-3).
pub const WEIGHT_EPS: f32 = 1e-3;
/// Similarity threshold τ (dynamic ratio in `paper`, the masked set in `reference`).
pub const SIMILARITY_THRESHOLD: f32 = 0.5;
/// The `reference` mode's edge weight in the candidate score u + 1e6·E.
pub const REFERENCE_EDGE_WEIGHT: f32 = 1e6;

/// `paper`: n_c = max(1, round(ρ·L)).
pub fn paper_candidate_count(patches: usize) -> usize {
    // round half away from zero; `as usize` truncates (no f64::round in core).
    let n = (CANDIDATE_FRACTION * patches as f64 + 0.5) as usize;
    n.max(1)
}

/// How many of `patches` patches a mask ratio masks: floor(r·L), in f64 as the public code's
/// Python float (r ∈ [0, 1], so truncation is the floor). Every device and mode counts with it.
pub fn masked_count(ratio: f32, patches: usize) -> usize {
    (ratio as f64 * patches as f64) as usize
}

/// `reference`: at most floor(L·(1 − r_min)) patches are kept.
pub fn reference_keep_cap(min_ratio: f32, patches: usize) -> usize {
    (patches as f64 * (1.0 - min_ratio as f64)) as usize
}

/// `reference`: n_c = L − floor(L·(1 − ρ)), as the public code.
pub fn reference_candidate_count(patches: usize) -> usize {
    patches - (patches as f64 * (1.0 - CANDIDATE_FRACTION)) as usize
}

/// Gumbel-top-k key of a patch: ln((1 − E) + 1e-3) + Gumbel(u) with Gumbel(u) = −ln(−ln u).
/// The n_c largest keys are a sample without replacement with probability ∝ (1 − E) + 1e-3.
#[inline(always)]
pub fn gumbel_key(edge: f32, u: f32) -> f32 {
    ln((1.0 - edge) + WEIGHT_EPS) - ln(-ln(u))
}

/// Whether patch a (key ka, tie tka, index ia) ranks before patch b in a descending order by key,
/// then by tie-breaker, then by lower index. A total order when indices differ.
#[inline(always)]
pub fn ranks_before(ka: f32, tka: u32, ia: usize, kb: f32, tkb: u32, ib: usize) -> bool {
    if ka != kb {
        return ka > kb;
    }
    if tka != tkb {
        return tka > tkb;
    }
    ia < ib
}

/// Rank of `i` among `n` entries under [`ranks_before`]: how many entries come before it. The
/// entries of rank < k are the top k; computing every rank in parallel is a block-wide select.
#[inline(always)]
pub fn rank(i: usize, n: usize, key: impl Fn(usize) -> f32, tie: impl Fn(usize) -> u32) -> usize {
    let (ki, ti) = (key(i), tie(i));
    let mut r = 0;
    for j in 0..n {
        r += ranks_before(key(j), tie(j), j, ki, ti, i) as usize;
    }
    r
}

/// Rank of `i` in the `reference` candidate order: larger score first, ties to the higher index.
#[inline(always)]
pub fn rank_ties_to_higher_index(i: usize, n: usize, score: impl Fn(usize) -> f32) -> usize {
    let si = score(i);
    let mut r = 0;
    for j in 0..n {
        let sj = score(j);
        r += (sj > si || (sj == si && j > i)) as usize;
    }
    r
}

/// Rank of `i` in the `reference` keep order: ascending (flagged, priority), ties to the lower
/// index (a stable sort of the public code's priority m·exp(u)).
#[inline(always)]
pub fn rank_reference_keep(
    i: usize,
    n: usize,
    flagged: impl Fn(usize) -> bool,
    priority: impl Fn(usize) -> f32,
) -> usize {
    let (fi, pi) = (flagged(i), priority(i));
    let mut r = 0;
    for j in 0..n {
        let (fj, pj) = (flagged(j), priority(j));
        r += ((!fj & fi) || (fj == fi && (pj < pi || (pj == pi && j < i)))) as usize;
    }
    r
}

/// floor(x) for x ≥ 0 as an integer (truncation; both devices).
#[inline(always)]
pub fn floor_nonnegative(x: f32) -> usize {
    x as usize
}

/// Threads per block of the selection kernels (one block per image).
pub const THREADS: u32 = 256;

/// Dynamic shared memory of the selection kernels for L patches: keys, ties and flags.
pub const fn shared_bytes(patches: usize) -> usize {
    4 * (3 * patches + 1)
}

// Kernels, one block per image, every rank computed by its own thread over all L entries in
// shared memory (L² comparisons, a block-wide select); kept patches are compacted in raster order
// (each kept patch's slot is the number of kept patches before it). Memory traffic is tiny: L
// scores in, ≤ L indices out, plus the n_c × L similarity rows for `pgs_select_paper`.

use crate::hw::{Global, GlobalMut, Shared, block_stride, block_x, dynamic_shared, sync_threads, thread_x};
use crate::kernel;
use crate::mask_clock::MaskClock;
use crate::philox::Philox;

/// Analytic minimum of global traffic of `pgs_candidates`: E read, the candidates written.
pub const fn candidates_min_bytes(n: usize, patches: usize, n_c: usize) -> usize {
    4 * n * (patches + n_c)
}

/// Of `pgs_select_paper`: Ŝ (and S for the dynamic ratio) and E read, the candidates read, the
/// kept patches (at most L) and their count written.
pub const fn select_paper_min_bytes(n: usize, patches: usize, n_c: usize, dynamic: bool) -> usize {
    4 * n * ((1 + dynamic as usize) * n_c * patches + patches + n_c + patches + 1)
}

/// Writes the patches not flagged in `masked` (shared, 0/1) to kept[image·L ..] in raster
/// order and their count to kept_len[image].
#[inline(always)]
unsafe fn compact_kept(masked: Shared<u32>, patches: usize, kept: GlobalMut<u32>, kept_len: GlobalMut<u32>) {
    unsafe {
        let out = kept.offset(block_x() * patches);
        block_stride(patches, |j| {
            if masked.load(j) == 0 {
                let mut slot = 0;
                for i in 0..j {
                    slot += (masked.load(i) == 0) as usize;
                }
                out.store(slot, j as u32);
            }
        });
        if thread_x() == 0 {
            let mut count = 0;
            for j in 0..patches {
                count += (masked.load(j) == 0) as u32;
            }
            kept_len.store(block_x(), count);
        }
    }
}

kernel! {
    /// Candidates in rank order. `paper` (reference = 0): Gumbel-top-k of ln((1 − E) + 1e-3).
    /// `reference` (reference = 1): the n_c largest u + 1e6·E, ties to the higher index.
    ///
    /// # Safety
    /// `edges` [N, L]; `candidates` [N, n_c]; `clock` mask_clock::LEN words; `shared_bytes(L)` bytes
    /// of dynamic shared memory.
    pub fn pgs_candidates(
        edges: Global<f32>,
        candidates: GlobalMut<u32>,
        clock: Global<u32>,
        patches: u32,
        n_c: u32,
        reference: u32,
    ) {
        let (l, n_c) = (patches as usize, n_c as usize);
        // SAFETY: the clock holds mask_clock::LEN words.
        let at = unsafe { MaskClock::load(clock) };
        let rng = Philox::new(at.seed, at.step, at.first.wrapping_add(block_x() as u32));
        unsafe {
            let key = dynamic_shared::<f32>();
            let e = edges.offset(block_x() * l);
            block_stride(l, |i| {
                let (edge, u) = (e.load(i), rng.uniform(i as u32));
                key.store(i, if reference != 0 { u + REFERENCE_EDGE_WEIGHT * edge } else { gumbel_key(edge, u) });
            });
            sync_threads();
            block_stride(l, |i| {
                let r = if reference != 0 {
                    rank_ties_to_higher_index(i, l, |j| key.load(j))
                } else {
                    rank(i, l, |j| key.load(j), |_| 0)
                };
                if r < n_c {
                    candidates.store(block_x() * n_c + r, i as u32);
                }
            });
        }
    }
}

kernel! {
    /// `paper` selection: μ_j = max_c Ŝ[c,j]·(1 − E_j), candidates forced in, the top K_mask
    /// by (μ, Philox jitter, index) masked; K_mask = k_fixed, or with `dynamic` the number of
    /// patches whose raw S exceeds τ for some candidate clamped to [k_min, k_max]; never below n_c.
    ///
    /// # Safety
    /// `s_raw`, `s_balanced` [N, n_c, L] (the same buffer without OTN); `edges` [N, L];
    /// `candidates` [N, n_c]; `kept` [N, L]; `kept_len` [N]; `clock` mask_clock::LEN words;
    /// `shared_bytes(L)` of shared memory.
    pub fn pgs_select_paper(
        s_raw: Global<f32>,
        s_balanced: Global<f32>,
        edges: Global<f32>,
        candidates: Global<u32>,
        kept: GlobalMut<u32>,
        kept_len: GlobalMut<u32>,
        clock: Global<u32>,
        patches: u32,
        n_c: u32,
        dynamic: u32,
        k_fixed: u32,
        k_min: u32,
        k_max: u32,
    ) {
        let (l, n_c) = (patches as usize, n_c as usize);
        // SAFETY: the clock holds mask_clock::LEN words.
        let at = unsafe { MaskClock::load(clock) };
        let rng = Philox::new(at.seed, at.step, at.first.wrapping_add(block_x() as u32));
        unsafe {
            let score = dynamic_shared::<f32>();
            let jitter = score.offset(l).cast::<u32>();
            let masked = jitter.offset(l);
            let similar = masked.offset(l);
            let (raw, bal) = (s_raw.offset(block_x() * n_c * l), s_balanced.offset(block_x() * n_c * l));
            let e = edges.offset(block_x() * l);
            let cand = candidates.offset(block_x() * n_c);
            block_stride(l, |j| {
                let mut best = f32::NEG_INFINITY;
                for c in 0..n_c {
                    best = best.max(bal.load(c * l + j));
                }
                score.store(j, best * (1.0 - e.load(j)));
                jitter.store(j, rng.bits((l + j) as u32));
            });
            if thread_x() == 0 {
                let mut count = 0;
                if dynamic != 0 {
                    for j in 0..l {
                        let mut any = false;
                        for c in 0..n_c {
                            any |= raw.load(c * l + j) > SIMILARITY_THRESHOLD;
                        }
                        count += any as u32;
                    }
                }
                similar.store(0, count);
            }
            sync_threads();
            block_stride(n_c, |c| score.store(cand.load(c) as usize, f32::INFINITY));
            sync_threads();
            let k_mask = if dynamic != 0 { similar.load(0).clamp(k_min, k_max) } else { k_fixed }.max(n_c as u32) as usize;
            block_stride(l, |j| masked.store(j, (rank(j, l, |i| score.load(i), |i| jitter.load(i)) < k_mask) as u32));
            sync_threads();
            compact_kept(masked, l, kept, kept_len);
        }
    }
}

kernel! {
    /// FLIP: the k_mask patches with the largest Philox uniforms (ties to the lower index) masked.
    ///
    /// # Safety
    /// `kept` [N, L]; `kept_len` [N]; `clock` mask_clock::LEN words; `shared_bytes(L)` bytes of
    /// dynamic shared memory.
    pub fn pgs_select_flip(kept: GlobalMut<u32>, kept_len: GlobalMut<u32>, clock: Global<u32>, patches: u32, k_mask: u32) {
        let l = patches as usize;
        // SAFETY: the clock holds mask_clock::LEN words.
        let at = unsafe { MaskClock::load(clock) };
        let rng = Philox::new(at.seed, at.step, at.first.wrapping_add(block_x() as u32));
        unsafe {
            let draw = dynamic_shared::<f32>();
            let masked = draw.offset(l).cast::<u32>();
            block_stride(l, |j| draw.store(j, rng.uniform(j as u32)));
            sync_threads();
            block_stride(l, |j| masked.store(j, (rank(j, l, |i| draw.load(i), |_| 0) < k_mask as usize) as u32));
            sync_threads();
            compact_kept(masked, l, kept, kept_len);
        }
    }
}

kernel! {
    /// `reference`, per image: flags m_j (S[a,j] > τ for some candidate a), their count, and the
    /// sequential sum of E.
    ///
    /// # Safety
    /// `s` [N, L, L]; `candidates` [N, n_c]; `edges` [N, L]; `flags` [N, L]; `counts`,
    /// `edge_sums` [N].
    pub fn pgs_reference_flags(
        s: Global<f32>,
        candidates: Global<u32>,
        edges: Global<f32>,
        flags: GlobalMut<u32>,
        counts: GlobalMut<u32>,
        edge_sums: GlobalMut<f32>,
        patches: u32,
        n_c: u32,
    ) {
        let (l, n_c) = (patches as usize, n_c as usize);
        unsafe {
            let s = s.offset(block_x() * l * l);
            let cand = candidates.offset(block_x() * n_c);
            let flag = flags.offset(block_x() * l);
            block_stride(l, |j| {
                let mut any = false;
                for a in 0..n_c {
                    any |= s.load(cand.load(a) as usize * l + j) > SIMILARITY_THRESHOLD;
                }
                flag.store(j, any as u32);
            });
            sync_threads();
            if thread_x() == 0 {
                let (mut count, mut sum) = (0u32, 0.0f32);
                let e = edges.offset(block_x() * l);
                for j in 0..l {
                    count += flag.load(j);
                    sum += e.load(j);
                }
                counts.store(block_x(), count);
                edge_sums.store(block_x(), sum);
            }
        }
    }
}

kernel! {
    /// `reference`, per image: K = min(cap, L − min_n count_n + floor(min_n ΣE_n)) (the E term
    /// with `use_ed`), then the first K patches in ascending (m_j, u_j) order kept.
    ///
    /// # Safety
    /// `flags` [N, L]; `counts`, `edge_sums` [N] for all `n_images`; `kept` [N, L]; `kept_len`
    /// [N]; `clock` mask_clock::LEN words; `shared_bytes(L)` bytes of dynamic shared memory.
    pub fn pgs_reference_keep(
        flags: Global<u32>,
        counts: Global<u32>,
        edge_sums: Global<f32>,
        kept: GlobalMut<u32>,
        kept_len: GlobalMut<u32>,
        clock: Global<u32>,
        n_images: u32,
        patches: u32,
        cap: u32,
        use_ed: u32,
    ) {
        let l = patches as usize;
        // SAFETY: the clock holds mask_clock::LEN words.
        let at = unsafe { MaskClock::load(clock) };
        let rng = Philox::new(at.seed, at.step, at.first.wrapping_add(block_x() as u32));
        unsafe {
            let priority = dynamic_shared::<f32>();
            let masked = priority.offset(l).cast::<u32>();
            let keep_count = masked.offset(l);
            let flag = flags.offset(block_x() * l);
            if thread_x() == 0 {
                let (mut fewest, mut least_edge) = (u32::MAX, f32::INFINITY);
                for n in 0..n_images as usize {
                    fewest = fewest.min(counts.load(n));
                    least_edge = least_edge.min(edge_sums.load(n));
                }
                let bonus = if use_ed != 0 { floor_nonnegative(least_edge) } else { 0 };
                keep_count.store(0, (cap as usize).min(l - fewest as usize + bonus) as u32);
            }
            block_stride(l, |j| priority.store(j, rng.uniform((l + j) as u32)));
            sync_threads();
            let keep = keep_count.load(0) as usize;
            block_stride(l, |j| {
                let r = rank_reference_keep(j, l, |i| flag.load(i) != 0, |i| priority.load(i));
                masked.store(j, (r >= keep) as u32);
            });
            sync_threads();
            compact_kept(masked, l, kept, kept_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_counts_for_vit_b16() {
        assert_eq!(paper_candidate_count(196), 10);
        assert_eq!(reference_candidate_count(196), 10);
        assert_eq!(paper_candidate_count(4), 1);
        assert_eq!(paper_candidate_count(49), 2);
    }

    #[test]
    fn gumbel_key_prefers_low_edge_patches() {
        assert!(gumbel_key(0.0, 0.5) > gumbel_key(1.0, 0.5));
        assert!(gumbel_key(0.5, 0.9) > gumbel_key(0.5, 0.1));
    }

    #[test]
    fn ranks_agree_with_the_orders() {
        let keys = [1.0f32, 3.0, 3.0, 2.0, 3.0];
        let ranks: [usize; 5] = core::array::from_fn(|i| rank(i, 5, |j| keys[j], |_| 0));
        assert_eq!(ranks, [4, 0, 1, 3, 2]);
        let ranks: [usize; 5] = core::array::from_fn(|i| rank_ties_to_higher_index(i, 5, |j| keys[j]));
        assert_eq!(ranks, [4, 2, 1, 3, 0]);
        let flagged = [true, false, true, false, true];
        let priority = [0.5f32, 0.9, 0.1, 0.2, 0.5];
        let ranks: [usize; 5] = core::array::from_fn(|i| rank_reference_keep(i, 5, |j| flagged[j], |j| priority[j]));
        assert_eq!(ranks, [3, 1, 2, 0, 4]);
    }

    #[test]
    fn ranking_is_total() {
        assert!(ranks_before(2.0, 0, 5, 1.0, 9, 0));
        assert!(ranks_before(1.0, 9, 5, 1.0, 3, 0));
        assert!(ranks_before(1.0, 3, 0, 1.0, 3, 5));
        assert!(!ranks_before(1.0, 3, 5, 1.0, 3, 0));
    }
}
