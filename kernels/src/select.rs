//! PGS candidate generation and selection (pgs-spec.md steps 2 and 5), pure helpers shared by the
//! CPU reference and the GPU kernels.
//!
//! Random draws come from Philox keyed by the seed, with stream (step, image): draws 0..L are the
//! per-patch uniforms of the first decision (Gumbel noise in `paper`, candidate noise in
//! `reference`, FLIP's order in `flip`), draws L..2L the second (tie-breaking jitter in `paper`,
//! priorities in `reference`).

use crate::math::ln;

/// Candidate fraction ρ.
pub const CANDIDATE_FRACTION: f32 = 0.05;
/// Added to the sampling weight 1 − E (spec: (1 − E) + 1e-3).
pub const WEIGHT_EPS: f32 = 1e-3;
/// Similarity threshold τ (dynamic ratio in `paper`, the masked set in `reference`).
pub const SIMILARITY_THRESHOLD: f32 = 0.5;
/// The `reference` mode's edge weight in the candidate score u + 1e6·E.
pub const REFERENCE_EDGE_WEIGHT: f32 = 1e6;

/// `paper`: n_c = max(1, round(ρ·L)).
pub fn paper_candidate_count(patches: usize) -> usize {
    let n = (CANDIDATE_FRACTION as f64 * patches as f64).round() as usize;
    n.max(1)
}

/// `reference`: n_c = L − floor(L·(1 − ρ)), as the public code.
pub fn reference_candidate_count(patches: usize) -> usize {
    patches - (patches as f64 * (1.0 - CANDIDATE_FRACTION as f64)).floor() as usize
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
        r += ((fj < fi) || (fj == fi && (pj < pi || (pj == pi && j < i)))) as usize;
    }
    r
}

/// floor(x) for x ≥ 0 as an integer (truncation; both devices).
#[inline(always)]
pub fn floor_nonnegative(x: f32) -> usize {
    x as usize
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
