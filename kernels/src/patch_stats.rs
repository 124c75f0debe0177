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

/// Threads per block of the patch-statistics kernels.
pub const THREADS: u32 = 256;

// Kernels: one thread per output, the reductions of the functions above. Memory traffic
// (per image, L patches of n = 3p² values, D-dim tokens):
// - `pgs_standardize_patches`: reads the image 3 times (mean, variance, write pass; the patch's
//   pixels stay in L1/L2), writes P̂ (4·L·n bytes) and ‖P̂‖, reads P̂ once more for the norm;
// - `pgs_token_norms`: reads the tokens once;
// - `pgs_similarity`: R rows × L columns, each a dot of n pixels and D token values read from
//   L2 (P̂ and the tokens of one image fit there); writes 4·R·L bytes.
//
// Version 1: sequential per thread (same bits as the CPU); a faster order would change both.

use crate::element::{Bf16, Element};
use crate::hw::{Global, GlobalMut, grid_stride};

/// Analytic minimum of global traffic of `pgs_standardize_patches`: the images read once, P̂
/// written once, a norm and a flag per patch.
pub const fn standardize_min_bytes(n: usize, height: usize, width: usize, patch: usize, element_bytes: usize) -> usize {
    let patches = (height / patch) * (width / patch);
    n * (3 * height * width * element_bytes + 4 * patches * 3 * patch * patch + 8 * patches)
}

/// Of `pgs_token_norms`: the tokens read once, a norm and a flag per row.
pub const fn token_norms_min_bytes(rows: usize, dim: usize, element_bytes: usize) -> usize {
    rows * (dim * element_bytes + 8)
}

/// Of `pgs_similarity`: P̂ (and the tokens) of every image read once, S written once.
pub const fn similarity_min_bytes(n: usize, rows: usize, patches: usize, values: usize, token_bytes: usize) -> usize {
    n * (patches * (4 * values + token_bytes + 4) + 4 * rows * patches)
}
use crate::kernel;

/// # Safety
/// `images` [N, 3, h, w]; `hat` [N, L, 3p²]; `norms`, `nonfinite` [N, L] (nonfinite set to 1
/// where a patch has a NaN or ±∞ pixel); h, w multiples of p.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn standardize_patches<T: Element>(
    images: Global<T>,
    hat: GlobalMut<f32>,
    norms: GlobalMut<f32>,
    nonfinite: GlobalMut<u32>,
    n_images: usize,
    h: usize,
    w: usize,
    p: usize,
) {
    let (cols, patches, n) = (w / p, (h / p) * (w / p), 3 * p * p);
    grid_stride(n_images * patches, |t| {
        let (image, i) = (t / patches, t % patches);
        // SAFETY: indices within the buffers the caller describes.
        unsafe {
            let base = images.offset(image * 3 * h * w);
            let raw = |k: usize| base.load(patch_pixel_index(k, i, cols, p, h, w)).to_f32();
            let (mean, std) = mean_std(n, raw);
            let out = hat.offset(t * n);
            for k in 0..n {
                out.store(k, standardize(raw(k), mean, std));
            }
            let nrm = norm(n, |k| out.load(k));
            norms.store(t, nrm);
            nonfinite.store(t, (!(mean.is_finite() && std.is_finite())) as u32);
        }
    });
}

macro_rules! standardize_entry {
    ($name:ident, $t:ty) => {
        kernel! {
            /// P̂, ‖P̂‖ and a non-finite flag per patch. Grid-stride over N·L threads.
            pub fn $name(
                images: Global<$t>,
                hat: GlobalMut<f32>,
                norms: GlobalMut<f32>,
                nonfinite: GlobalMut<u32>,
                n_images: u32,
                h: u32,
                w: u32,
                p: u32,
            ) {
                unsafe {
                    standardize_patches(images, hat, norms, nonfinite, n_images as usize, h as usize, w as usize, p as usize)
                }
            }
        }
    };
}
standardize_entry!(pgs_standardize_patches_f32, f32);
standardize_entry!(pgs_standardize_patches_bf16, Bf16);

macro_rules! token_norms_entry {
    ($name:ident, $t:ty) => {
        kernel! {
            /// ‖T_r‖ for `rows` tokens of `dim` values, and a non-finite flag per row.
            pub fn $name(tokens: Global<$t>, norms: GlobalMut<f32>, nonfinite: GlobalMut<u32>, rows: u32, dim: u32) {
                let dim = dim as usize;
                grid_stride(rows as usize, |r| unsafe {
                    let t = tokens.offset(r * dim);
                    let nrm = norm(dim, |k| t.load(k).to_f32());
                    norms.store(r, nrm);
                    nonfinite.store(r, (!nrm.is_finite()) as u32);
                });
            }
        }
    };
}
token_norms_entry!(pgs_token_norms_f32, f32);
token_norms_entry!(pgs_token_norms_bf16, Bf16);

/// # Safety
/// `hat` [N, L, n], `hat_norms` [N, L]; `tokens` [N, L, dim] and `token_norms` [N, L], or both
/// null (S_tok = 0); `rows` [N, R] patch indices, or null for R = L rows 0..L; `out` [N, R, L].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn similarity<T: Element>(
    hat: Global<f32>,
    hat_norms: Global<f32>,
    tokens: Global<T>,
    token_norms: Global<f32>,
    rows: Global<u32>,
    out: GlobalMut<f32>,
    n_images: usize,
    r_count: usize,
    patches: usize,
    n: usize,
    dim: usize,
    alpha: f32,
) {
    grid_stride(n_images * r_count * patches, |t| unsafe {
        let (image, r, j) = (t / (r_count * patches), t / patches % r_count, t % patches);
        let i = if rows.is_null() { r } else { rows.load(image * r_count + r) as usize };
        let (a, b) = (hat.offset((image * patches + i) * n), hat.offset((image * patches + j) * n));
        let norms = hat_norms.offset(image * patches);
        let s_pix = cosine(n, |k| a.load(k), |k| b.load(k), norms.load(i), norms.load(j));
        let s_tok = if tokens.is_null() {
            0.0
        } else {
            let (a, b) = (tokens.offset((image * patches + i) * dim), tokens.offset((image * patches + j) * dim));
            let norms = token_norms.offset(image * patches);
            cosine(dim, |k| a.load(k).to_f32(), |k| b.load(k).to_f32(), norms.load(i), norms.load(j))
        };
        out.store(t, fuse(alpha, s_tok, s_pix));
    });
}

macro_rules! similarity_entry {
    ($name:ident, $t:ty) => {
        kernel! {
            /// S [N, R, L] = α·cos(T) + (1 − α)·cos(P̂) of the given rows against every patch.
            pub fn $name(
                hat: Global<f32>,
                hat_norms: Global<f32>,
                tokens: Global<$t>,
                token_norms: Global<f32>,
                rows: Global<u32>,
                out: GlobalMut<f32>,
                n_images: u32,
                r_count: u32,
                patches: u32,
                n: u32,
                dim: u32,
                alpha: f32,
            ) {
                unsafe {
                    similarity(
                        hat,
                        hat_norms,
                        tokens,
                        token_norms,
                        rows,
                        out,
                        n_images as usize,
                        r_count as usize,
                        patches as usize,
                        n as usize,
                        dim as usize,
                        alpha,
                    )
                }
            }
        }
    };
}
similarity_entry!(pgs_similarity_f32, f32);
similarity_entry!(pgs_similarity_bf16, Bf16);

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
