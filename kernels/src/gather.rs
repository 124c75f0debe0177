//! Gather (pgs-spec.md step 6): CLS and the kept patch tokens packed into [N, rows, D], rows =
//! K_max + 1, zero padding, and each sequence's length (kept + 1) for attention. The tokens are
//! the patch embedding [N, L, D] that PGS's token similarity also reads; CLS is one row [D].
//!
//! Grid (⌈rows / ROWS⌉, N): a block packs ROWS output rows of one image. Its first ROWS threads
//! read the block's source row numbers into shared memory (one coalesced read of the kept
//! indices), then the block copies the rows, coalesced along D.
//! Memory traffic: the kept rows and CLS read once (Σ (K_n + 1)·D elements), the kept indices
//! once, every output element written once: the analytic minimum.
//!
//! Backward (`pgs_gather_backward_{f32,bf16}`, with the positional embedding's gradient; one
//! body, d_tokens and d_packed of the activations' element type, d_pos and d_cls f32): d_tokens
//! [N, L, D] is overwritten (d_packed's row of a kept patch, zeros for a dropped one); d_pos
//! [L + 1, D] and d_cls [D] accumulate over the images in order, without atomics. Grid L + 1:
//! block p owns position p (0 = CLS, 1 + j = patch j) and all D columns. Per tile of
//! BACKWARD_TILE images, the block's threads find where each image of the tile packed patch j (a
//! binary search of its ascending kept indices) into shared memory; then each thread takes
//! columns c = thread, thread + BACKWARD_THREADS, … and for each walks the tile's images in
//! order, GROUP at a time (their loads issued together): it adds the packed row to its running
//! d_pos (and d_cls) sum in f32, the CPU's order, so the same bits, and copies it into d_tokens.
//! Parallelism: L + 1 blocks of 4 warps (197 at ViT-B/16), each thread ⌈D / 128⌉ columns of
//! every image.
//! Memory traffic: the CLS and kept rows of d_packed read once (padding rows not at all),
//! d_tokens written once, d_pos and d_cls read and written once per tile (once up to 1024
//! images): the analytic minimum, coalesced along D; plus the searches, log₂(L) + 1 scattered
//! words of the kept indices and one count per (image, patch), one 32-byte sector each, once per
//! position for all D columns: 1.05× the minimum, 96% of each sector used, at ViT-B/16, batch 8,
//! f32 (with a block per column strip, each strip searched again: 1.28× and 81%). Any index data
//! stays in bounds: a count is capped at rows − 1, and a patch whose index the search does not
//! find (indices not ascending, or ≥ L) counts as dropped.

use crate::element::{Bf16, Element};
use crate::hw::{Global, GlobalMut, block_stride, block_x, block_y, sync_threads, thread_x, unrolled};
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
                // SAFETY: the caller's contract, the same as gather's.
                unsafe { gather(x, cls, kept, kept_len, out, lengths, patches as usize, dim as usize, rows as usize) }
            }
        }
    };
}
gather_entry!(pgs_gather_f32, f32);
gather_entry!(pgs_gather_bf16, Bf16);

/// Threads per block of `pgs_gather_backward_*`, which stride over the columns.
pub const BACKWARD_THREADS: u32 = 128;

/// Images whose packed rows one tile of `pgs_gather_backward_*` finds and keeps in shared memory.
pub const BACKWARD_TILE: usize = 1024;

/// Images whose d_packed loads a thread issues together.
const GROUP: usize = 8;

crate::shared_array!(fn packed_rows() -> [u32; BACKWARD_TILE]);

/// The packed row (1 + r) of patch `j` in the first `len` of an image's ascending kept
/// indices, or PADDING when it is not among them.
///
/// # Safety
/// `kept` holds at least `len` indices.
#[inline(always)]
unsafe fn packed_row(kept: Global<u32>, len: usize, j: u32) -> u32 {
    let (mut lo, mut hi) = (0, len);
    while lo < hi {
        let mid = (lo + hi) / 2;
        // SAFETY: mid < hi ≤ len.
        if unsafe { kept.load(mid) } < j {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    // SAFETY: lo < len.
    if lo < len && unsafe { kept.load(lo) } == j { lo as u32 + 1 } else { PADDING }
}

/// The backward of the gather and of the positional embedding added before it: d_tokens
/// overwritten, d_cls and d_pos accumulated. Grid L + 1, BACKWARD_THREADS threads.
///
/// # Safety
/// `d_tokens` [N, L, D]; `d_cls` [D]; `d_pos` [L + 1, D]; `d_packed` [N, rows, D] with
/// 1 ≤ rows ≤ L + 1; `kept` [N, L]; `kept_len` [N].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gather_backward<T: Element>(
    d_tokens: GlobalMut<T>,
    d_cls: GlobalMut<f32>,
    d_pos: GlobalMut<f32>,
    d_packed: Global<T>,
    kept: Global<u32>,
    kept_len: Global<u32>,
    images: usize,
    patches: usize,
    dim: usize,
    rows: usize,
) {
    let p = block_x();
    let slots = packed_rows();
    // SAFETY: p ≤ L and c < dim: inside d_pos and d_cls; image b < N, packed row < rows (the
    // count is capped at rows − 1) and the patch p − 1 < L: inside d_packed and d_tokens; the
    // slots read are those written this tile, between barriers.
    unsafe {
        let mut b0 = 0;
        while b0 < images {
            let tile = BACKWARD_TILE.min(images - b0);
            block_stride(tile, |k| {
                let b = b0 + k;
                let row = if p == 0 {
                    0
                } else {
                    let len = (kept_len.load(b) as usize).min(rows - 1);
                    packed_row(kept.offset(b * patches), len, p as u32 - 1)
                };
                slots.store(k, row);
            });
            sync_threads();
            let mut c = thread_x();
            while c < dim {
                let mut pos = d_pos.load(p * dim + c);
                let mut cls = if p == 0 { d_cls.load(c) } else { 0.0 };
                let mut k0 = 0;
                while k0 < tile {
                    // The group's rows (the same in every thread), then its loads together.
                    let mut row = [PADDING; GROUP];
                    let mut v = [T::ZERO; GROUP];
                    unrolled::<GROUP>(|j| {
                        if k0 + j < tile {
                            row[j] = slots.load(k0 + j);
                        }
                    });
                    unrolled::<GROUP>(|j| {
                        if row[j] != PADDING {
                            v[j] = d_packed.load(((b0 + k0 + j) * rows + row[j] as usize) * dim + c);
                        }
                    });
                    unrolled::<GROUP>(|j| {
                        if k0 + j < tile {
                            if row[j] != PADDING {
                                pos += v[j].to_f32();
                            }
                            if p == 0 {
                                cls += v[j].to_f32();
                            } else {
                                d_tokens.store(((b0 + k0 + j) * patches + p - 1) * dim + c, v[j]);
                            }
                        }
                    });
                    k0 += GROUP;
                }
                d_pos.store(p * dim + c, pos);
                if p == 0 {
                    d_cls.store(c, cls);
                }
                c += BACKWARD_THREADS as usize;
            }
            sync_threads(); // the next tile overwrites the slots
            b0 += BACKWARD_TILE;
        }
    }
}

macro_rules! gather_backward_entry {
    ($name:ident, $t:ty) => {
        kernel! {
            /// The backward of the gather and of the positional embedding added before it:
            /// d_tokens overwritten, d_cls and d_pos (f32) accumulated. Grid L + 1,
            /// BACKWARD_THREADS threads.
            ///
            /// # Safety
            /// `d_tokens` [N, L, D]; `d_cls` [D]; `d_pos` [L + 1, D]; `d_packed` [N, rows, D]
            /// with 1 ≤ rows ≤ L + 1; `kept` [N, L]; `kept_len` [N].
            pub fn $name(
                d_tokens: GlobalMut<$t>,
                d_cls: GlobalMut<f32>,
                d_pos: GlobalMut<f32>,
                d_packed: Global<$t>,
                kept: Global<u32>,
                kept_len: Global<u32>,
                images: u32,
                patches: u32,
                dim: u32,
                rows: u32,
            ) {
                let (images, patches, dim, rows) = (images as usize, patches as usize, dim as usize, rows as usize);
                // SAFETY: the caller's contract, the same as gather_backward's.
                unsafe { gather_backward(d_tokens, d_cls, d_pos, d_packed, kept, kept_len, images, patches, dim, rows) }
            }
        }
    };
}
gather_backward_entry!(pgs_gather_backward_f32, f32);
gather_backward_entry!(pgs_gather_backward_bf16, Bf16);
