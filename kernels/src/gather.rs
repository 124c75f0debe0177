//! Gather (pgs-spec.md step 6): CLS and the kept patch tokens packed into [N, rows, D], rows =
//! K_max + 1, zero padding, and each sequence's length (kept + 1) for attention. The tokens are
//! the patch embedding [N, L, D] that PGS's token similarity also reads; CLS is one row [D].
//!
//! Grid (⌈rows / ROWS⌉, N): a block packs ROWS output rows of one image. Its first ROWS threads
//! read the block's source row numbers into shared memory (one coalesced read of the kept
//! indices), then the block copies the rows, coalesced along D.
//! Memory traffic: the kept rows and CLS read once (Σ (K_n + 1)·D elements), the kept indices
//! once, every output element written once: the analytic minimum.

use crate::element::{Bf16, Element};
use crate::hw::{Global, GlobalMut, block_stride, block_x, block_y, sync_threads, thread_x};
use crate::kernel;

/// Threads per block of `pgs_gather`.
pub const THREADS: u32 = 256;
/// Output rows per block.
pub const ROWS: usize = 32;

/// The analytic minimum of global traffic: `kept` kept rows over all images plus N CLS rows read,
/// their indices and N counts read, N·rows·D elements and N lengths written.
pub const fn min_bytes(kept: usize, n: usize, rows: usize, dim: usize, element_bytes: usize) -> usize {
    (kept + n) * dim * element_bytes + 4 * (kept + n) + n * rows * dim * element_bytes + 4 * n
}

crate::shared_array!(fn source_rows() -> [u32; ROWS]);

/// The source row of an output row past the image's kept patches (written as zeros).
const PADDING: u32 = u32::MAX;
/// The source row of CLS.
const CLS: u32 = u32::MAX - 1;

/// # Safety
/// `x` [N, L, D]; `cls` [D]; `kept` [N, L] (the first kept_len[n] valid); `out` [N, rows, D]
/// with rows ≥ max kept_len + 1; `lengths` [N]; grid (⌈rows / ROWS⌉, N), ≥ ROWS threads.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gather<T: Element>(
    x: Global<T>,
    cls: Global<T>,
    kept: Global<u32>,
    kept_len: Global<u32>,
    out: GlobalMut<T>,
    lengths: GlobalMut<u32>,
    patches: usize,
    dim: usize,
    rows: usize,
) {
    let (image, first) = (block_y(), block_x() * ROWS);
    let block_rows = ROWS.min(rows - first);
    let source = source_rows();
    // SAFETY: indices inside the buffers the caller describes.
    unsafe {
        if thread_x() < block_rows {
            let r = first + thread_x();
            let len = kept_len.load(image) as usize;
            let row = if r == 0 {
                lengths.store(image, len as u32 + 1);
                CLS
            } else if r - 1 < len {
                kept.load(image * patches + r - 1)
            } else {
                PADDING
            };
            source.store(thread_x(), row);
        }
        sync_threads();
        let src = x.offset(image * patches * dim);
        let dst = out.offset((image * rows + first) * dim);
        block_stride(block_rows * dim, |t| {
            let (r, d) = (t / dim, t % dim);
            let value = match source.load(r) {
                PADDING => T::ZERO,
                CLS => cls.load(d),
                row => src.load(row as usize * dim + d),
            };
            dst.store(t, value);
        });
    }
}

macro_rules! gather_entry {
    ($name:ident, $t:ty) => {
        kernel! {
            /// Packs CLS and the kept tokens of each image.
            pub fn $name(
                x: Global<$t>,
                cls: Global<$t>,
                kept: Global<u32>,
                kept_len: Global<u32>,
                out: GlobalMut<$t>,
                lengths: GlobalMut<u32>,
                patches: u32,
                dim: u32,
                rows: u32,
            ) {
                unsafe { gather(x, cls, kept, kept_len, out, lengths, patches as usize, dim as usize, rows as usize) }
            }
        }
    };
}
gather_entry!(pgs_gather_f32, f32);
gather_entry!(pgs_gather_bf16, Bf16);
