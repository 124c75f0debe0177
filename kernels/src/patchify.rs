//! The patch embedding's input packing (`host/src/ops/patchify.rs` holds the CPU reference):
//! images [N, 3, S, S] → patches [N·L, 3p²], L = (S/p)², each row flattened (channel, row, col)
//! as conv1's weight [width, 3, p, p].
//!
//! A grid-stride loop over the output elements, one element per thread per iteration: the
//! thread splits its index into (image, patch, channel, row, col) with 32-bit divisions and
//! copies one pixel, of the activations' element type (`_f32` and `_bf16` entry points of one
//! body: a copy, no rounding). Memory traffic: every pixel read once and written once, 2s bytes
//! per pixel (s = 4 f32, 2 bf16): the analytic minimum. Writes are coalesced (consecutive
//! threads, consecutive elements); a warp's reads are runs of p consecutive elements (p·s bytes:
//! whole 32-byte sectors in f32 when p is a multiple of 8, as 8, 16 and 32 are, in bf16 when it
//! is a multiple of 16; p = 14 straddles sectors).

use crate::element::Bf16;
use crate::hw::{Global, GlobalMut, grid_stride};
use crate::kernel;

/// Threads per block of `patchify_*`.
pub const THREADS: u32 = 256;

/// patches[i] for i < n = N·L·3p²: pixel (channel, row, col) of patch j of image b.
///
/// # Safety
/// `images` holds N·3·size² elements and `patches` n = N·(size/patch)²·3·patch² elements,
/// n < 2³²; `patch` ≥ 1 divides `size`.
#[inline(always)]
unsafe fn patchify<T: Copy>(patches: GlobalMut<T>, images: Global<T>, n: u32, size: u32, patch: u32) {
    let cols = size / patch;
    let (per_patch, per_image) = (3 * patch * patch, cols * cols);
    grid_stride(n as usize, |i| {
        let i = i as u32;
        let (row, k) = (i / per_patch, i % per_patch);
        let (b, j) = (row / per_image, row % per_image);
        let (cr, x) = (k / patch, k % patch); // cr = channel·p + row within the patch
        let (c, y) = (cr / patch, cr % patch);
        let (y0, x0) = ((j / cols) * patch, (j % cols) * patch);
        let src =
            ((b as usize * 3 + c as usize) * size as usize + (y0 + y) as usize) * size as usize + (x0 + x) as usize;
        // SAFETY: i < n; b < N, c < 3, y0 + y < size and x0 + x < size, so src < N·3·size².
        unsafe { patches.store(i as usize, images.load(src)) };
    });
}

macro_rules! patchify_entry {
    ($t:ty, $name:ident) => {
        kernel! {
            /// patches[i] for i < n = N·L·3p²: pixel (channel, row, col) of patch j of image b.
            ///
            /// # Safety
            /// `images` holds N·3·size² elements and `patches` n = N·(size/patch)²·3·patch²
            /// elements, n < 2³²; `patch` ≥ 1 divides `size`.
            pub fn $name(patches: GlobalMut<$t>, images: Global<$t>, n: u32, size: u32, patch: u32) {
                // SAFETY: the caller's contract, the same as patchify's.
                unsafe { patchify(patches, images, n, size, patch) }
            }
        }
    };
}
patchify_entry!(f32, patchify_f32);
patchify_entry!(Bf16, patchify_bf16);
