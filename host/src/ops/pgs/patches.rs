//! Per-image patch statistics for PGS: standardized pixel patches, token norms, the cosine
//! similarity S (pgs-spec.md step 3) and the `reference` mode's patch-grid "edge map".
//! Sequential reductions through `clip_pgs_kernels::patch_stats`, as the GPU kernels do.

use clip_pgs_kernels::patch_stats::{cosine, fuse, mean_std, norm, patch_pixel_index, standardize, sum};
use clip_pgs_kernels::sobel::{min_max_normalize, sobel_magnitude};

use super::super::edge_map::PatchGrid;

/// One image's pixels [3, H, W] as L standardized patches P̂ [L, 3p²].
pub struct StandardizedPatches {
    grid: PatchGrid,
    /// P̂_i[k] = (P_i[k] − mean P_i) / (std P_i + 1e-6), flattened (row, col, channel).
    values: Vec<f32>,
    /// ‖P̂_i‖.
    norm: Vec<f32>,
}

impl StandardizedPatches {
    pub fn new(image: &[f32], height: usize, width: usize, grid: PatchGrid) -> Self {
        let n = 3 * grid.patch * grid.patch;
        let mut values = Vec::with_capacity(grid.len() * n);
        for i in 0..grid.len() {
            let raw = |k: usize| image[patch_pixel_index(k, i, grid.cols, grid.patch, height, width)];
            let (mean, std) = mean_std(n, raw);
            values.extend((0..n).map(|k| standardize(raw(k), mean, std)));
        }
        let norm = values.chunks(n).map(|p| norm(n, |k| p[k])).collect();
        StandardizedPatches { grid, values, norm }
    }

    /// 3p², the length of a patch vector.
    pub fn values(&self) -> usize {
        3 * self.grid.patch * self.grid.patch
    }

    /// P̂_i[k].
    pub fn value(&self, i: usize, k: usize) -> f32 {
        self.values[i * self.values() + k]
    }

    /// cos(P̂_i, P̂_j).
    pub fn cosine(&self, i: usize, j: usize) -> f32 {
        let n = self.values();
        let (a, b) = (&self.values[i * n..(i + 1) * n], &self.values[j * n..(j + 1) * n]);
        cosine(n, |k| a[k], |k| b[k], self.norm[i], self.norm[j])
    }

    /// The `reference` mode's edge map: Sobel with zero padding over the grid of per-patch means
    /// of P̂ (≈ 0 by construction: reproduced, not fixed), magnitude, min–max normalized.
    pub fn reference_edge_grid(&self) -> Vec<f32> {
        let (rows, cols) = (self.grid.rows, self.grid.cols);
        let n = self.values();
        let means: Vec<f32> = (0..self.grid.len()).map(|i| sum(n, |k| self.value(i, k)) / n as f32).collect();
        let at = |r: isize, c: isize| {
            if r < 0 || c < 0 || r >= rows as isize || c >= cols as isize {
                0.0
            } else {
                means[r as usize * cols + c as usize]
            }
        };
        let magnitude: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = ((i / cols) as isize, (i % cols) as isize);
                sobel_magnitude([-1, 0, 1].map(|dr| [-1, 0, 1].map(|dc| at(r + dr, c + dc))))
            })
            .collect();
        let min = magnitude.iter().copied().fold(f32::INFINITY, f32::min);
        let max = magnitude.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        magnitude.iter().map(|&m| min_max_normalize(m, min, max)).collect()
    }
}

/// One image's patch tokens [L, D] and their norms.
pub struct Tokens<'a> {
    tokens: &'a [f32],
    dim: usize,
    norm: Vec<f32>,
}

impl<'a> Tokens<'a> {
    pub fn new(tokens: &'a [f32], dim: usize) -> Self {
        let norm = tokens.chunks(dim).map(|t| norm(dim, |k| t[k])).collect();
        Tokens { tokens, dim, norm }
    }

    /// cos(T_i, T_j).
    pub fn cosine(&self, i: usize, j: usize) -> f32 {
        let (a, b) = (&self.tokens[i * self.dim..], &self.tokens[j * self.dim..]);
        cosine(self.dim, |k| a[k], |k| b[k], self.norm[i], self.norm[j])
    }
}

/// S [rows.len(), L]: S[r, j] = α·cos(T_rows[r], T_j) + (1 − α)·cos(P̂_rows[r], P̂_j). Without
/// tokens α must be 0 (checked by the caller) and S is the pixel similarity alone.
pub fn similarity(patches: &StandardizedPatches, tokens: Option<&Tokens>, rows: &[usize], alpha: f32) -> Vec<f32> {
    let len = patches.grid.len();
    let mut s = Vec::with_capacity(rows.len() * len);
    for &i in rows {
        for j in 0..len {
            let s_tok = tokens.map_or(0.0, |t| t.cosine(i, j));
            s.push(fuse(alpha, s_tok, patches.cosine(i, j)));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarity_of_a_patch_with_itself_is_one_and_with_its_negative_minus_one() {
        // 4×4 image, patch 2: patch 1 is patch 0 negated, patch 2 is patch 0 scaled and shifted.
        let (h, w) = (4, 4);
        let grid = PatchGrid::new(h, w, 2).unwrap();
        let mut image = vec![0.0f32; 3 * h * w];
        for c in 0..3 {
            for y in 0..2 {
                for x in 0..2 {
                    let v = (c * 4 + y * 2 + x) as f32 * 0.1 - 0.3;
                    image[c * 16 + y * 4 + x] = v;
                    image[c * 16 + y * 4 + x + 2] = -v;
                    image[c * 16 + (y + 2) * 4 + x] = 3.0 * v + 1.0;
                    image[c * 16 + (y + 2) * 4 + x + 2] = ((c * 7 + y * 3 + x * 5) % 4) as f32;
                }
            }
        }
        let patches = StandardizedPatches::new(&image, h, w, grid);
        let s = similarity(&patches, None, &[0], 0.0);
        assert!((s[0] - 1.0).abs() < 1e-5, "{s:?}");
        assert!((s[1] + 1.0).abs() < 1e-5, "{s:?}");
        assert!((s[2] - 1.0).abs() < 1e-5, "{s:?}");
        assert!(s[3].abs() < 1.0);
        // Standardized patch means are zero up to rounding: the reference edge grid is noise
        // within [0, 1].
        assert!(patches.reference_edge_grid().iter().all(|e| (0.0..=1.0).contains(e)));
    }

    #[test]
    fn fused_similarity_weights_tokens_by_alpha() {
        let grid = PatchGrid::new(2, 4, 2).unwrap();
        let image: Vec<f32> = (0..24).map(|i| (i * 7 % 5) as f32).collect();
        let patches = StandardizedPatches::new(&image, 2, 4, grid);
        let tokens = [1.0f32, 0.0, 0.0, 1.0]; // orthogonal: S_tok = 1 on the diagonal, 0 off it
        let tokens = Tokens::new(&tokens, 2);
        let s_pix = similarity(&patches, None, &[0], 0.0);
        let s = similarity(&patches, Some(&tokens), &[0], 0.25);
        assert!((s[1] - 0.75 * s_pix[1]).abs() < 1e-6);
        assert!((s[0] - (0.25 + 0.75 * s_pix[0])).abs() < 1e-6);
    }
}
