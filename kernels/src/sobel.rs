//! The PGS edge map's pure math (pgs-spec.md, step 1, mode `paper`), shared by the GPU kernel
//! (`edge_map.rs`) and the CPU reference, so that both do the same f32 operations in the same
//! order and agree bit for bit.

use crate::normalize::denormalize;

/// Added to max − min so that a flat image gives E = 0, not NaN.
pub const MIN_MAX_EPS: f32 = 1e-6;

/// Luminance (ITU-R BT.601 weights) of a CLIP-normalized pixel, de-normalized to [0, 1] first.
#[inline(always)]
pub fn luminance(normalized_rgb: [f32; 3]) -> f32 {
    let [r, g, b] = [0, 1, 2].map(|c| denormalize(normalized_rgb[c], c));
    0.299 * r + 0.587 * g + 0.114 * b
}

/// `i + d` clamped to `0..n`: the replicate border (OpenCV `BORDER_REPLICATE`).
#[inline(always)]
pub fn replicate(i: usize, d: isize, n: usize) -> usize {
    (i as isize + d).clamp(0, n as isize - 1) as usize
}

/// Gradient magnitude sqrt(gx² + gy²) of a 3×3 window `w[row][col]` under the Sobel kernels
/// Kx = [[-1,0,1],[-2,0,2],[-1,0,1]] and Ky = Kxᵀ (cross-correlation, as cv2.Sobel).
#[inline(always)]
pub fn sobel_magnitude(w: [[f32; 3]; 3]) -> f32 {
    let gx = (w[0][2] - w[0][0]) + 2.0 * (w[1][2] - w[1][0]) + (w[2][2] - w[2][0]);
    let gy = (w[2][0] - w[0][0]) + 2.0 * (w[2][1] - w[0][1]) + (w[2][2] - w[0][2]);
    crate::math::sqrt(gx * gx + gy * gy)
}

/// Mean over a p×p patch from its sum. The sum is taken row by row, each row left to right, then
/// the p row sums top to bottom; both devices use that order.
#[inline(always)]
pub fn patch_mean(sum: f32, patch: usize) -> f32 {
    sum / (patch * patch) as f32
}

/// Per-image min–max normalization of a patch mean: E ∈ [0, 1].
#[inline(always)]
pub fn min_max_normalize(e: f32, min: f32, max: f32) -> f32 {
    (e - min) / (max - min + MIN_MAX_EPS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luminance_of_normalized_white_is_one() {
        let white = [0, 1, 2].map(|c| crate::normalize::normalize_u8(255, c));
        assert!((luminance(white) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn sobel_of_a_ramp() {
        // f(x, y) = 3x + 5y: gx = 8·3, gy = 8·5 under the unnormalized Sobel kernels.
        let w = [0, 1, 2].map(|r| [0, 1, 2].map(|c| 3.0 * c as f32 + 5.0 * r as f32));
        assert_eq!(sobel_magnitude(w), (24.0f32 * 24.0 + 40.0 * 40.0).sqrt());
        assert_eq!(sobel_magnitude([[7.0; 3]; 3]), 0.0);
    }

    #[test]
    fn replicate_clamps_to_the_border() {
        assert_eq!(replicate(0, -1, 5), 0);
        assert_eq!(replicate(4, 1, 5), 4);
        assert_eq!(replicate(2, 1, 5), 3);
    }

    #[test]
    fn min_max_of_a_flat_image_is_zero() {
        assert_eq!(min_max_normalize(0.3, 0.3, 0.3), 0.0);
        assert!((min_max_normalize(1.0, 0.0, 1.0) - 1.0).abs() < 2e-6);
    }
}
