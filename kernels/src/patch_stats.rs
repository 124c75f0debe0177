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
    cosine_of_dot(sum(n, |k| a(k) * b(k)), norm_a, norm_b)
}

/// a·b / ((‖a‖ + 1e-6)(‖b‖ + 1e-6)) from the dot product.
#[inline(always)]
pub fn cosine_of_dot(dot: f32, norm_a: f32, norm_b: f32) -> f32 {
    dot / ((norm_a + NORM_EPS) * (norm_b + NORM_EPS))
}

/// S = α·S_tok + (1 − α)·S_pix.
#[inline(always)]
pub fn fuse(alpha: f32, s_tok: f32, s_pix: f32) -> f32 {
    alpha * s_tok + (1.0 - alpha) * s_pix
}

/// Threads per block of the patch-statistics kernels.
pub const THREADS: u32 = 256;

// Kernels. Every reduction stays sequential in k, as in the functions above, so both devices
// get the same bits; what changes from one thread per output reading its own vectors (v1:
// uncoalesced, 20–80× the minimum traffic) is that blocks stage the vectors in shared memory
// with coalesced reads first.
// - `pgs_standardize_patches`: a block per patch row of an image reads the p pixel rows of the
//   three planes once (coalesced along W) into shared memory, one thread per patch then takes
//   mean, std and ‖P̂‖ sequentially, and the block writes P̂ coalesced. Traffic: the image once,
//   P̂ once (the minimum).
// - `pgs_token_norms`: a block per THREADS rows stages [rows × 32] tiles; each thread sums its
//   row's squares tile by tile. Traffic: the tokens once.
// - `pgs_similarity`: a block per (THREADS columns, ROWS rows, image) stages [ROWS × 32] and
//   [THREADS × 32] tiles of P̂ (then of the tokens); each thread accumulates ROWS dot products
//   of its column. Traffic: P̂ and the tokens of an image once per ROWS rows, S written once.
// Shared tiles have an odd row stride (TILE + 1), so a thread per row reads them without bank
// conflicts.

use crate::element::{Bf16, Element};
use crate::hw::{
    Global, GlobalMut, Shared, block_dim_x, block_stride, block_x, block_y, block_z, dynamic_shared, sync_threads,
    thread_x,
};
use crate::kernel;
use crate::mask_clock::MaskClock;
use crate::math::sqrt;

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

/// Values per tile row.
const TILE: usize = 32;
/// Shared row stride of a tile (odd: conflict-free reads by a thread per row).
const TILE_STRIDE: usize = TILE + 1;
/// Similarity rows per block (accumulators per thread).
pub const ROWS: usize = 16;

/// Dynamic shared memory of `pgs_standardize_patches` for images `width` wide, patch `p`.
pub const fn standardize_shared_bytes(width: usize, p: usize) -> usize {
    4 * (p * (width / p) * (3 * p + 1) + 2 * (width / p))
}

/// Of `pgs_token_norms`.
pub const fn token_norms_shared_bytes() -> usize {
    4 * THREADS as usize * TILE_STRIDE
}

/// Of `pgs_similarity`.
pub const fn similarity_shared_bytes() -> usize {
    4 * (THREADS as usize + ROWS) * TILE_STRIDE
}

/// tile[r][kk] = src[row(r)·n + k0 + kk] for r < rows, kk < width: a warp per row segment of
/// TILE values (coalesced). Every thread of the block calls it.
#[inline(always)]
unsafe fn load_tile<E: Element>(
    src: Global<E>,
    row: impl Fn(usize) -> usize,
    rows: usize,
    n: usize,
    k0: usize,
    width: usize,
    tile: Shared<f32>,
) {
    block_stride(rows * TILE, |i| {
        let (r, kk) = (i / TILE, i % TILE);
        if kk < width {
            // SAFETY: the caller's rows and k range lie inside `src`.
            unsafe { tile.store(r * TILE_STRIDE + kk, src.load(row(r) * n + k0 + kk).to_f32()) };
        }
    });
}

/// # Safety
/// `images` [N, 3, h, w]; `hat` [N, L, 3p²]; `norms`, `nonfinite` [N, L] (nonfinite set to 1
/// where a patch has a NaN or ±∞ pixel); h, w multiples of p; grid (h/p, N);
/// `standardize_shared_bytes(w, p)` of shared memory.
#[inline(always)]
unsafe fn standardize_patches<T: Element>(
    images: Global<T>,
    hat: GlobalMut<f32>,
    norms: GlobalMut<f32>,
    nonfinite: GlobalMut<u32>,
    h: usize,
    w: usize,
    p: usize,
) {
    let (pr, image) = (block_x(), block_y());
    let (cols, n, segment) = (w / p, 3 * p * p, 3 * p + 1);
    let first = (image * (h / p) + pr) * cols; // the band's first patch among all N·L
    // SAFETY: indices inside the buffers and the shared layout the caller provides.
    unsafe {
        // band[(y·cols + pc)·segment + x·3 + c]: each patch row segment in P̂'s (col, channel) order.
        let band = dynamic_shared::<f32>();
        let (mean, std) = (band.offset(p * cols * segment), band.offset(p * cols * segment + cols));
        let pixels = images.offset(image * 3 * h * w + pr * p * w);
        block_stride(3 * p * w, |i| {
            let (c, y, x) = (i / (p * w), i / w % p, i % w);
            band.store((y * cols + x / p) * segment + (x % p) * 3 + c, pixels.load(c * h * w + y * w + x).to_f32());
        });
        sync_threads();
        // Element k of patch pc, (row, col, channel) flattened.
        let raw = |pc: usize, k: usize| band.load((k / (3 * p) * cols + pc) * segment + k % (3 * p));
        let pc = thread_x();
        if pc < cols {
            let (m, s) = mean_std(n, |k| raw(pc, k));
            let nrm = norm(n, |k| standardize(raw(pc, k), m, s));
            mean.store(pc, m);
            std.store(pc, s);
            norms.store(first + pc, nrm);
            nonfinite.store(first + pc, (!(m.is_finite() && s.is_finite())) as u32);
        }
        sync_threads();
        let out = hat.offset(first * n);
        block_stride(cols * n, |i| {
            let (pc, k) = (i / n, i % n);
            out.store(i, standardize(raw(pc, k), mean.load(pc), std.load(pc)));
        });
    }
}

macro_rules! standardize_entry {
    ($name:ident, $t:ty) => {
        kernel! {
            /// P̂, ‖P̂‖ and a non-finite flag per patch. Grid (h/p, N), `THREADS` threads.
            pub fn $name(images: Global<$t>, hat: GlobalMut<f32>, norms: GlobalMut<f32>, nonfinite: GlobalMut<u32>, h: u32, w: u32, p: u32) {
                unsafe { standardize_patches(images, hat, norms, nonfinite, h as usize, w as usize, p as usize) }
            }
        }
    };
}
standardize_entry!(pgs_standardize_patches_f32, f32);
standardize_entry!(pgs_standardize_patches_bf16, Bf16);

/// # Safety
/// `tokens` [rows, dim]; `norms`, `nonfinite` [rows]; ⌈rows / THREADS⌉ blocks of THREADS;
/// `token_norms_shared_bytes()` of shared memory.
#[inline(always)]
unsafe fn token_norms<T: Element>(
    tokens: Global<T>,
    norms: GlobalMut<f32>,
    nonfinite: GlobalMut<u32>,
    rows: usize,
    dim: usize,
) {
    let first = block_x() * block_dim_x();
    let here = block_dim_x().min(rows - first);
    let tile = dynamic_shared::<f32>();
    let t = thread_x();
    let mut squares = 0.0f32;
    let mut k0 = 0;
    // SAFETY: rows first.. first + here of `tokens`, and the tile's THREADS × TILE_STRIDE floats.
    unsafe {
        while k0 < dim {
            let width = TILE.min(dim - k0);
            load_tile(tokens, |r| first + r, here, dim, k0, width, tile);
            sync_threads();
            if t < here {
                for kk in 0..width {
                    let v = tile.load(t * TILE_STRIDE + kk);
                    squares += v * v;
                }
            }
            sync_threads();
            k0 += TILE;
        }
        if t < here {
            let nrm = sqrt(squares); // = norm(dim, …): the same sequential sum
            norms.store(first + t, nrm);
            nonfinite.store(first + t, (!nrm.is_finite()) as u32);
        }
    }
}

macro_rules! token_norms_entry {
    ($name:ident, $t:ty) => {
        kernel! {
            /// ‖T_r‖ for `rows` tokens of `dim` values, and a non-finite flag per row.
            pub fn $name(tokens: Global<$t>, norms: GlobalMut<f32>, nonfinite: GlobalMut<u32>, rows: u32, dim: u32) {
                unsafe { token_norms(tokens, norms, nonfinite, rows as usize, dim as usize) }
            }
        }
    };
}
token_norms_entry!(pgs_token_norms_f32, f32);
token_norms_entry!(pgs_token_norms_bf16, Bf16);

/// The dot products of ROWS rows (`row(r)`, r < rows) with this thread's column (j0 + thread,
/// below j0 + cols) of the [·, n] matrix `src`, each sequential in k; every thread calls it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dots<E: Element>(
    src: Global<E>,
    row: impl Fn(usize) -> usize + Copy,
    rows: usize,
    j0: usize,
    cols: usize,
    n: usize,
    a: Shared<f32>,
    b: Shared<f32>,
) -> [f32; ROWS] {
    let t = thread_x();
    let mut acc = [0.0f32; ROWS];
    let mut k0 = 0;
    // SAFETY: the caller's rows and columns lie inside `src`; the tiles are ROWS and THREADS
    // rows of TILE_STRIDE floats.
    unsafe {
        while k0 < n {
            let width = TILE.min(n - k0);
            load_tile(src, row, rows, n, k0, width, a);
            load_tile(src, |c| j0 + c, cols, n, k0, width, b);
            sync_threads();
            if t < cols {
                for kk in 0..width {
                    let bk = b.load(t * TILE_STRIDE + kk);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        if r < rows {
                            *acc += a.load(r * TILE_STRIDE + kk) * bk;
                        }
                    }
                }
            }
            sync_threads();
            k0 += TILE;
        }
    }
    acc
}

/// # Safety
/// `hat` [N, L, n], `hat_norms` [N, L]; `tokens` [N, L, dim] and `token_norms` [N, L], or both
/// null (S_tok = 0); `rows` [N, R] patch indices, or null for R = L rows 0..L; `out` [N, R, L];
/// grid (⌈L / THREADS⌉, ⌈R / ROWS⌉, N) of THREADS; `similarity_shared_bytes()` of shared memory.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn similarity<T: Element>(
    hat: Global<f32>,
    hat_norms: Global<f32>,
    tokens: Global<T>,
    token_norms: Global<f32>,
    rows: Global<u32>,
    out: GlobalMut<f32>,
    r_count: usize,
    patches: usize,
    n: usize,
    dim: usize,
    alpha: f32,
) {
    let (image, r0, j0) = (block_z(), block_y() * ROWS, block_x() * block_dim_x());
    let (here_rows, here_cols) = (ROWS.min(r_count - r0), block_dim_x().min(patches - j0));
    let first = image * patches; // the image's first patch among all N·L
    // SAFETY: indices inside the buffers and the shared layout the caller provides.
    unsafe {
        let a = dynamic_shared::<f32>();
        let b = a.offset(ROWS * TILE_STRIDE);
        let patch_of = |r: usize| if rows.is_null() { r0 + r } else { rows.load(image * r_count + r0 + r) as usize };
        let pix = dots(hat, |r| first + patch_of(r), here_rows, first + j0, here_cols, n, a, b);
        let tok = if tokens.is_null() {
            [0.0; ROWS]
        } else {
            dots(tokens, |r| first + patch_of(r), here_rows, first + j0, here_cols, dim, a, b)
        };
        let (t, j) = (thread_x(), j0 + thread_x());
        if t < here_cols {
            // The accumulators go to local memory once here (128 bytes a thread, see ptx-build),
            // not in the k loop above, where they stay in registers.
            for (r, (&pix, &tok)) in pix.iter().zip(&tok).enumerate() {
                if r < here_rows {
                    let i = patch_of(r);
                    let s_pix = cosine_of_dot(pix, hat_norms.load(first + i), hat_norms.load(first + j));
                    let s_tok = if tokens.is_null() {
                        0.0
                    } else {
                        cosine_of_dot(tok, token_norms.load(first + i), token_norms.load(first + j))
                    };
                    out.store((image * r_count + r0 + r) * patches + j, fuse(alpha, s_tok, s_pix));
                }
            }
        }
    }
}

macro_rules! similarity_entry {
    ($name:ident, $t:ty) => {
        kernel! {
            /// S [N, R, L] = α·cos(T) + (1 − α)·cos(P̂) of the given rows against every patch, α from
            /// the mask clock (`clock`, mask_clock::LEN words).
            pub fn $name(
                hat: Global<f32>,
                hat_norms: Global<f32>,
                tokens: Global<$t>,
                token_norms: Global<f32>,
                rows: Global<u32>,
                out: GlobalMut<f32>,
                r_count: u32,
                patches: u32,
                n: u32,
                dim: u32,
                clock: Global<u32>,
            ) {
                // SAFETY: the clock holds mask_clock::LEN words; the rest as `similarity`.
                unsafe {
                    let alpha = MaskClock::load(clock).alpha;
                    similarity(
                        hat,
                        hat_norms,
                        tokens,
                        token_norms,
                        rows,
                        out,
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
