//! PGS edge map, mode `paper` (pgs-spec.md step 1): one fused kernel from normalized images to E.
//!
//! Input [N, 3, H, W] (f32 or bf16, CLIP-normalized), output E [N, L] f32, L = (H/p)·(W/p).
//! One block per image, walking the image one band of p pixel rows (one patch row) at a time:
//!   1. luminance of the band's rows plus one halo row above and below (replicate border) into
//!      shared memory, reading the three channel planes coalesced along W, then a halo column left
//!      and right copied from the border columns;
//!   2. one thread per (patch column, pixel row): the p Sobel magnitudes of that row segment,
//!      summed left to right with a sliding 3×3 window;
//!   3. one thread per patch column: the p row sums, top to bottom, divided by p².
//!
//! Then the block's min and max over the L patch means and E = (e − min)/(max − min + 1e-6).
//! Summation orders are those of the CPU reference, so both agree bit for bit.
//!
//! Memory traffic per image: 3·H·W elements read once from DRAM (the 2 halo rows per band are
//! re-read, mostly from L2: (p+2)/p of the image), 4·L bytes written. Memory bound: for
//! 224×224 f32 that is 602 KB in, 784 B out.
//! Shared memory: 4·((p+2)·S + (W/p)·p + L) bytes, S = (W+2) | 1. The odd row stride S keeps
//! step 2 (pixel row fastest across threads) free of bank conflicts, the halo columns spare it the
//! border clamps that would make two lanes meet in one bank, and the row sums are stored pixel
//! row major so that step 2's writes and step 3's reads are conflict free too.

/// Threads per block of the edge-map kernels (a multiple of 32, as the block reductions need).
pub const THREADS: u32 = 256;

/// Row stride of the luminance band: the W + 2 columns with the border, made odd.
const fn band_stride(width: usize) -> usize {
    (width + 2) | 1
}

/// Dynamic shared memory, in bytes, for images `width` pixels wide cut into `patch`-sized
/// patches, `patches` of them.
pub const fn shared_bytes(width: usize, patch: usize, patches: usize) -> usize {
    4 * ((patch + 2) * band_stride(width) + (width / patch) * patch + patches)
}

/// Dynamic shared memory of `pgs_reference_edge_grid` for L patches.
pub const fn reference_grid_shared_bytes(patches: usize) -> usize {
    4 * 2 * patches
}

/// The analytic minimum of global traffic for N images: every pixel read once, E written once.
pub const fn min_bytes(n: usize, height: usize, width: usize, patch: usize, element_bytes: usize) -> usize {
    n * (3 * height * width * element_bytes + 4 * (height / patch) * (width / patch))
}

use crate::element::{Bf16, Element};
use crate::hw::{Global, GlobalMut, block_stride, block_x, dynamic_shared, sync_threads};
use crate::kernel;
use crate::reduce::{block_max, block_min};
use crate::sobel::{luminance, min_max_normalize, patch_mean, replicate, sobel_magnitude};

/// (a / b, a % b) in 32 bits: the launcher keeps sizes below 2³², and 64-bit division is slow.
#[inline(always)]
fn div_rem(a: usize, b: usize) -> (usize, usize) {
    let (a, b) = (a as u32, b as u32);
    ((a / b) as usize, (a % b) as usize)
}

/// # Safety
/// `images` holds gridDim.x images of 3·h·w elements, `edges` gridDim.x·L floats; h and w are
/// multiples of `p`; the launch has `shared_bytes(w, p, L)` bytes of dynamic shared memory.
#[inline(always)]
unsafe fn edge_map<T: Element>(images: Global<T>, edges: GlobalMut<f32>, h: usize, w: usize, p: usize) {
    let (gh, gw) = (h / p, w / p);
    let patches = gh * gw;
    let stride = band_stride(w);
    // SAFETY (all view offsets and indices below): inside the regions the caller guarantees: the
    // image of this block, its L outputs, and the shared layout of `shared_bytes`.
    unsafe {
        let band = dynamic_shared::<f32>();
        // [r][pc]: step 2 writes and step 3 reads it without bank conflicts.
        let row_sums = band.offset((p + 2) * stride);
        let means = row_sums.offset(gw * p);
        let image = images.offset(block_x() * 3 * h * w);
        let plane = h * w;
        for pr in 0..gh {
            let y0 = pr * p;
            // 1. Luminance of pixel rows y0-1 ..= y0+p (replicate border) into band columns
            //    1 ..= w, coalesced along W; then the halo columns 0 and w+1 copied from
            //    columns 1 and w (replicate border).
            block_stride((p + 2) * w, |i| {
                let (r, x) = div_rem(i, w);
                let px = replicate(y0, r as isize - 1, h) * w + x;
                let rgb =
                    [image.load(px).to_f32(), image.load(plane + px).to_f32(), image.load(2 * plane + px).to_f32()];
                band.store(r * stride + x + 1, luminance(rgb));
            });
            sync_threads();
            block_stride(2 * (p + 2), |i| {
                let (r, right) = (i / 2, i % 2 == 1);
                let (to, from) = if right { (w + 1, w) } else { (0, 1) };
                band.store(r * stride + to, band.load(r * stride + from));
            });
            sync_threads();

            // 2. Row segment sums of the magnitude, pixel row fastest across threads.
            block_stride(gw * p, |j| {
                let (pc, r) = div_rem(j, p);
                let x0 = pc * p;
                // Band column xx holds image column xx − 1.
                let column = |xx: usize| {
                    [band.load(r * stride + xx), band.load((r + 1) * stride + xx), band.load((r + 2) * stride + xx)]
                };
                let mut left = column(x0);
                let mut centre = column(x0 + 1);
                let mut sum = 0.0f32;
                for c in 0..p {
                    let right = column(x0 + c + 2);
                    sum += sobel_magnitude([
                        [left[0], centre[0], right[0]],
                        [left[1], centre[1], right[1]],
                        [left[2], centre[2], right[2]],
                    ]);
                    left = centre;
                    centre = right;
                }
                row_sums.store(r * gw + pc, sum);
            });
            sync_threads();

            // 3. Patch means; the next band's step 1 does not touch row_sums.
            block_stride(gw, |pc| {
                let mut sum = 0.0f32;
                for r in 0..p {
                    sum += row_sums.load(r * gw + pc);
                }
                means.store(pr * gw + pc, patch_mean(sum, p));
            });
        }
        sync_threads();

        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        block_stride(patches, |i| {
            lo = lo.min(means.load(i));
            hi = hi.max(means.load(i));
        });
        let (lo, hi) = (block_min(lo), block_max(hi));
        let out = edges.offset(block_x() * patches);
        block_stride(patches, |i| out.store(i, min_max_normalize(means.load(i), lo, hi)));
    }
}

kernel! {
    /// The `reference` mode's edge map (pgs-spec.md): Sobel with zero padding over the grid of
    /// per-patch means of the standardized patches P̂, magnitude, min–max. One block per image;
    /// reads P̂ once (4·L·3p² bytes), writes 4·L.
    ///
    /// # Safety
    /// `hat` [N, L, n] (n = 3p²); `edges` [N, L]; `reference_grid_shared_bytes(L)` of shared memory.
    pub fn pgs_reference_edge_grid(hat: Global<f32>, edges: GlobalMut<f32>, rows: u32, cols: u32, n: u32) {
        use crate::patch_stats::sum;
        let (rows, cols, n) = (rows as usize, cols as usize, n as usize);
        let patches = rows * cols;
        unsafe {
            let means = dynamic_shared::<f32>();
            let magnitude = means.offset(patches);
            let hat = hat.offset(block_x() * patches * n);
            block_stride(patches, |i| means.store(i, sum(n, |k| hat.load(i * n + k)) / n as f32));
            sync_threads();
            block_stride(patches, |i| {
                let (r, c) = ((i / cols) as isize, (i % cols) as isize);
                let at = |dr: isize, dc: isize| {
                    let (y, x) = (r + dr, c + dc);
                    if y < 0 || x < 0 || y >= rows as isize || x >= cols as isize {
                        0.0
                    } else {
                        means.load(y as usize * cols + x as usize)
                    }
                };
                magnitude.store(i, sobel_magnitude([-1, 0, 1].map(|dr| [-1, 0, 1].map(|dc| at(dr, dc)))));
            });
            sync_threads();
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            block_stride(patches, |i| {
                lo = lo.min(magnitude.load(i));
                hi = hi.max(magnitude.load(i));
            });
            let (lo, hi) = (block_min(lo), block_max(hi));
            let out = edges.offset(block_x() * patches);
            block_stride(patches, |i| out.store(i, min_max_normalize(magnitude.load(i), lo, hi)));
        }
    }
}

kernel! {
    /// E of f32 images. Grid: one block per image, `THREADS` threads.
    pub fn pgs_edge_map_f32(images: Global<f32>, edges: GlobalMut<f32>, height: u32, width: u32, patch: u32) {
        unsafe { edge_map(images, edges, height as usize, width as usize, patch as usize) }
    }
}

kernel! {
    /// E of bf16 images. Grid: one block per image, `THREADS` threads.
    pub fn pgs_edge_map_bf16(images: Global<Bf16>, edges: GlobalMut<f32>, height: u32, width: u32, patch: u32) {
        unsafe { edge_map(images, edges, height as usize, width as usize, patch as usize) }
    }
}
