//! Ranking and selection for PGS on the CPU (pgs-spec.md steps 2 and 5): top-k with the shared
//! total order of `clip_pgs_kernels::select::ranks_before`, the candidate rules of both modes, and
//! the number of patches to mask.

use clip_pgs_kernels::select::{SIMILARITY_THRESHOLD, masked_count, ranks_before};

use super::MaskRatio;

/// The `k` indices that rank first by (key desc, tie desc, index asc), in that order.
pub fn top_k(keys: &[f32], ties: Option<&[u32]>, k: usize) -> Vec<usize> {
    let tie = |i: usize| ties.map_or(0, |t| t[i]);
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| {
        if a == b {
            std::cmp::Ordering::Equal
        } else if ranks_before(keys[a], tie(a), a, keys[b], tie(b), b) {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Greater
        }
    });
    order.truncate(k);
    order
}

/// `reference` candidates: the `k` largest scores, ties to the higher index (the public code
/// takes the last k of a stable ascending argsort).
pub fn top_k_ties_to_higher_index(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(b.cmp(&a)));
    order.truncate(k);
    order
}

/// `paper`: how many patches to mask. Fixed: floor(r·L). Dynamic: the number of patches whose
/// best raw similarity to a candidate exceeds τ, clamped to [floor(min·L), floor(max·L)]. Never
/// fewer than the candidates, which are always masked.
pub fn paper_mask_count(ratio: MaskRatio, s: &[f32], candidates: usize, patches: usize) -> usize {
    let floor = |r: f32| masked_count(r, patches);
    let count = match ratio {
        MaskRatio::Fixed(r) => floor(r),
        MaskRatio::Dynamic { min, max } => {
            let similar =
                (0..patches).filter(|&j| (0..candidates).any(|c| s[c * patches + j] > SIMILARITY_THRESHOLD)).count();
            similar.clamp(floor(min), floor(max))
        }
    };
    count.max(candidates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_key_then_tie_then_index() {
        let keys = [1.0, 3.0, 3.0, 2.0, 3.0];
        assert_eq!(top_k(&keys, None, 3), vec![1, 2, 4]);
        assert_eq!(top_k(&keys, Some(&[0, 0, 5, 0, 9]), 3), vec![4, 2, 1]);
        assert_eq!(top_k_ties_to_higher_index(&keys, 3), vec![4, 2, 1]);
    }

    #[test]
    fn dynamic_count_is_clamped() {
        // 2 candidates, 10 patches; patches 0..6 similar to candidate 0.
        let mut s = vec![0.0f32; 20];
        (0..6).for_each(|j| s[j] = 0.9);
        let dynamic = MaskRatio::Dynamic { min: 0.3, max: 0.5 };
        assert_eq!(paper_mask_count(dynamic, &s, 2, 10), 5);
        assert_eq!(paper_mask_count(dynamic, &[0.0; 20], 2, 10), 3);
        assert_eq!(paper_mask_count(MaskRatio::Fixed(0.5), &s, 2, 10), 5);
        assert_eq!(paper_mask_count(MaskRatio::Fixed(0.05), &s, 2, 10), 2, "candidates are always masked");
    }
}
