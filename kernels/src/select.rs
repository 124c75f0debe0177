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
    fn ranking_is_total() {
        assert!(ranks_before(2.0, 0, 5, 1.0, 9, 0));
        assert!(ranks_before(1.0, 9, 5, 1.0, 3, 0));
        assert!(ranks_before(1.0, 3, 0, 1.0, 3, 5));
        assert!(!ranks_before(1.0, 3, 5, 1.0, 3, 0));
    }
}
