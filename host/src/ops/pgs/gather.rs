//! Gather (pgs-spec.md step 6): CLS and the kept patch tokens packed into [N, K_max + 1, D] with
//! per-image lengths; padding rows are zero (attention masks them as keys).

use super::Masks;

/// Packed tokens and the length (CLS included) of each image's row.
pub struct Packed {
    pub tokens: Vec<f32>,
    pub lengths: Vec<u32>,
    /// K_max + 1.
    pub rows: usize,
}

/// `x` is [N, L + 1, D] with CLS at row 0 of each image.
pub fn gather_kept(x: &[f32], dim: usize, masks: &Masks) -> Packed {
    let (n, l) = (masks.images.len(), masks.patches);
    assert_eq!(x.len(), n * (l + 1) * dim, "gather_kept: tokens [N, L + 1, D] expected");
    let rows = masks.max_kept() + 1;
    let mut tokens = vec![0.0f32; n * rows * dim];
    let mut lengths = Vec::with_capacity(n);
    for (i, mask) in masks.images.iter().enumerate() {
        let src = &x[i * (l + 1) * dim..(i + 1) * (l + 1) * dim];
        let dst = &mut tokens[i * rows * dim..(i + 1) * rows * dim];
        dst[..dim].copy_from_slice(&src[..dim]);
        for (r, &p) in mask.kept.iter().enumerate() {
            let from = (1 + p as usize) * dim;
            dst[(1 + r) * dim..(2 + r) * dim].copy_from_slice(&src[from..from + dim]);
        }
        lengths.push(mask.kept.len() as u32 + 1);
    }
    Packed { tokens, lengths, rows }
}

#[cfg(test)]
mod tests {
    use super::super::ImageMask;
    use super::*;

    #[test]
    fn packs_cls_then_kept_rows_and_pads_with_zeros() {
        // 2 images, L = 3, D = 2; token value = 10·image + row.
        let x: Vec<f32> = (0..2).flat_map(|i| (0..4).flat_map(move |r| [(10 * i + r) as f32; 2])).collect();
        let masks = Masks {
            patches: 3,
            images: vec![
                ImageMask { kept: vec![0, 2], candidates: vec![1] },
                ImageMask { kept: vec![1], candidates: vec![0] },
            ],
        };
        let p = gather_kept(&x, 2, &masks);
        assert_eq!(p.rows, 3);
        assert_eq!(p.lengths, vec![3, 2]);
        assert_eq!(p.tokens, vec![0.0, 0.0, 1.0, 1.0, 3.0, 3.0, 10.0, 10.0, 12.0, 12.0, 0.0, 0.0]);
    }
}
