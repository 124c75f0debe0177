//! Patch statistics and cosine similarity for PGS (pgs-spec.md step 3 and the `reference` mode's
//! step 0), as pure functions over element accessors, shared by the CPU reference and the GPU
//! kernels. Every reduction is sequential in index order, so both devices get the same bits.
//!
//! A pixel patch is flattened (row, col, channel), as the public code's `patchify`.

/// Added to the standard deviation before dividing (spec: std + 1e-6).
pub const STD_EPS: f32 = 1e-6;
/// Added to each norm of a cosine (spec: ‖·‖ + 1e-6).
pub const NORM_EPS: f32 = 1e-6;

/// Index in an [3, H, W] image of element `k` of patch `patch` (flattened row, col, channel) on a
/// grid `cols` patches wide with patch size `p`.
#[inline(always)]
pub fn patch_pixel_index(k: usize, patch: usize, cols: usize, p: usize, height: usize, width: usize) -> usize {
    let (row, rest) = (k / (3 * p), k % (3 * p));
    let (col, channel) = (rest / 3, rest % 3);
    let (y, x) = ((patch / cols) * p + row, (patch % cols) * p + col);
    channel * height * width + y * width + x
}

/// Sequential sum of `n` values.
#[inline(always)]
pub fn sum(n: usize, x: impl Fn(usize) -> f32) -> f32 {
    let mut s = 0.0f32;
    for k in 0..n {
        s += x(k);
    }
    s
}

/// Mean and unbiased standard deviation (torch's `std()`) of `n ≥ 2` values, two passes.
#[inline(always)]
pub fn mean_std(n: usize, x: impl Fn(usize) -> f32) -> (f32, f32) {
    let mean = sum(n, &x) / n as f32;
    let var = sum(n, |k| {
        let d = x(k) - mean;
        d * d
    }) / (n - 1) as f32;
    (mean, crate::math::sqrt(var))
}

/// (x − mean) / (std + 1e-6).
#[inline(always)]
pub fn standardize(x: f32, mean: f32, std: f32) -> f32 {
    (x - mean) / (std + STD_EPS)
}

/// Euclidean norm, sequential.
#[inline(always)]
pub fn norm(n: usize, x: impl Fn(usize) -> f32) -> f32 {
    crate::math::sqrt(sum(n, |k| {
        let v = x(k);
        v * v
    }))
}

/// cos(a, b) = a·b / ((‖a‖ + 1e-6)(‖b‖ + 1e-6)) with the norms given.
#[inline(always)]
pub fn cosine(n: usize, a: impl Fn(usize) -> f32, b: impl Fn(usize) -> f32, norm_a: f32, norm_b: f32) -> f32 {
    sum(n, |k| a(k) * b(k)) / ((norm_a + NORM_EPS) * (norm_b + NORM_EPS))
}

/// S = α·S_tok + (1 − α)·S_pix.
#[inline(always)]
pub fn fuse(alpha: f32, s_tok: f32, s_pix: f32) -> f32 {
    alpha * s_tok + (1.0 - alpha) * s_pix
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_layout_is_row_col_channel() {
        // 4×4 image, patch 2, grid 2×2: patch 3 is the bottom-right one.
        let (h, w, p, cols) = (4, 4, 2, 2);
        assert_eq!(patch_pixel_index(0, 3, cols, p, h, w), 2 * 4 + 2); // (y 2, x 2, red)
        assert_eq!(patch_pixel_index(1, 3, cols, p, h, w), 16 + 2 * 4 + 2); // green
        assert_eq!(patch_pixel_index(3, 3, cols, p, h, w), 2 * 4 + 3); // (y 2, x 3, red)
        assert_eq!(patch_pixel_index(6, 3, cols, p, h, w), 3 * 4 + 2); // (y 3, x 2, red)
    }

    #[test]
    fn moments_and_cosine() {
        let v = [1.0f32, 2.0, 3.0, 4.0];
        let (mean, std) = mean_std(4, |k| v[k]);
        assert_eq!(mean, 2.5);
        assert!((std - (5.0f32 / 3.0).sqrt()).abs() < 1e-7);
        let c = cosine(4, |k| v[k], |k| 2.0 * v[k], norm(4, |k| v[k]), norm(4, |k| 2.0 * v[k]));
        assert!((c - 1.0).abs() < 1e-6);
        let c = cosine(2, |k| [1.0, 0.0][k], |k| [0.0, 1.0][k], 1.0, 1.0);
        assert_eq!(c, 0.0);
    }
}
