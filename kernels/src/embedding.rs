//! The text tower's input (`host/src/ops/embedding.rs` holds the CPU reference): the forward
//! x[r] = table[ids[r]] + pos[r mod T] over rows of width W, and its backward, d_table[ids[r]] +=
//! dx[r] and d_pos[r mod T] += dx[r], deterministic and without atomics (the padding id repeats in
//! almost every caption: atomics on its row would contend and sum in a random order).
//!
//! x, the table and pos have the activations' element type T (`_f32` and `_bf16` entry points of
//! one body each; x = table + pos is added in f32 and rounded once); the gradients d_table and
//! d_pos are f32 and accumulate dx widened to f32, so every device adds the same f32 values.
//!
//! The kernels never read outside the table for an id outside the vocabulary (the CPU reference
//! refuses such ids; the model checks its batches on the host before the upload): the forward
//! writes a NaN row for it, the backward adds its row to d_pos only.
//!
//! - `embedding_forward_*`: grid (1, T, ⌈captions / CAPTIONS⌉); block (·, t, z) writes position
//!   t of captions z·CAPTIONS … (up to CAPTIONS of them). Its first threads read those captions'
//!   ids at t into shared memory (one load each); then each thread owns columns c (strided by
//!   THREADS, coalesced along W): it reads pos[t][c] once into a register and walks the captions
//!   in groups of GROUP, where the ids are the same for the whole block: it loads table[id][c]
//!   only for an id not already among the group's earlier ids or equal to the previous group's
//!   last (a repeated word, the padding id at this position in every short caption), issues the
//!   group's loads together, and writes x = table + pos (added in f32, rounded once). Traffic: x
//!   written once, pos read once per block, table rows read once per (position, group) they
//!   occur in, ids read once: s bytes per element (4 f32, 2 bf16). The analytic minimum counts
//!   each distinct table row once; what this moves above it is the same row (the padding row
//!   above all) read again at other positions and in other groups: 1.12× at ViT-B/16's text
//!   tower, batch 8 (a thread per output element, as before: 2.81×, pos re-read per caption, the
//!   table per row, the id per 32 outputs).
//! - `embedding_backward_pos_*`: one thread per element (t, c) of d_pos [T, W] walks the
//!   captions in order: d_pos[t][c] + dx[t][c] + dx[T + t][c] + …, the CPU's order, so the same
//!   bits. dx read once (s bytes per element), d_pos read and written once (4 bytes): the
//!   minimum. Coalesced along W.
//! - `embedding_backward_table_*`: grid (⌈W / (THREADS·COLUMNS)⌉, BUCKETS); block (s, k) owns
//!   the columns of strip s of every table row whose id ≡ k (mod BUCKETS). Each thread owns
//!   COLUMNS columns (strided by THREADS, coalesced along W) and walks all rows in order, adding
//!   the rows of its bucket's ids: every element of d_table sums its rows in the CPU's order, the
//!   same bits. The running sums stay in registers while consecutive rows of the bucket share an
//!   id (the padding tails of consecutive captions are one run), and go through d_table only when
//!   the id changes. The block stages the ids in shared memory, CHUNK at a time (coalesced loads,
//!   one per id per block; every thread then reads them from shared memory), and rows come in
//!   groups of GROUP whose dx loads are issued together, so the sequential sum waits for memory
//!   once per group, not once per row. Traffic: dx read once (each row by the one bucket of its
//!   id), the touched elements of d_table read and written once per run; ids read once per block:
//!   R·4 bytes × BUCKETS·⌈W / (THREADS·COLUMNS)⌉, 4·BUCKETS / (s·W) of dx (1/16 for f32 at
//!   W = 512; threads of one column each, as before, read each id once per thread: 8.6× the
//!   minimum, 23% of the sectors used). The critical path is the bucket of the padding id: about
//!   one add per padded position of the batch per column.

use crate::element::{Bf16, Element};
use crate::hw::{
    Global, GlobalMut, block_dim_x, block_stride, block_x, block_y, block_z, grid_dim_x, grid_stride, sync_threads,
    thread_x, unrolled,
};
use crate::kernel;

/// Threads per block of every embedding kernel.
pub const THREADS: u32 = 128;
/// Captions per block of `embedding_forward_*` (the grid's z size: ⌈captions / CAPTIONS⌉).
pub const CAPTIONS: u32 = 128;
/// Id buckets of `embedding_backward_table_*` (the grid's y size).
pub const BUCKETS: u32 = 32;
/// Columns per thread of `embedding_backward_table_*`.
pub const COLUMNS: u32 = 4;
/// Rows whose loads one thread issues together.
const GROUP: usize = 8;
/// Ids `embedding_backward_table_*` stages in shared memory at a time (a multiple of GROUP).
const CHUNK: usize = 1024;

/// No id (an empty slot of a group, or no run yet).
const NONE: u32 = u32::MAX;

crate::shared_array!(fn caption_ids() -> [u32; CAPTIONS as usize]);
crate::shared_array!(fn chunk_ids() -> [u32; CHUNK]);

/// x[i] = table[ids[r]·W + c] + pos[(r mod T)·W + c], i = r·W + c < n = R·W; NaN for an id ≥
/// vocab. Grid (g, T, ⌈captions / CAPTIONS⌉), THREADS threads: this block writes position
/// block_y of its captions.
///
/// # Safety
/// `x` holds n < 2³² elements, `ids` n / width, `table` vocab·width, `pos` context·width; width,
/// context ≥ 1; n a multiple of width·context.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn forward<T: Element>(
    x: GlobalMut<T>,
    ids: Global<u32>,
    table: Global<T>,
    pos: Global<T>,
    n: u32,
    width: u32,
    context: u32,
    vocab: u32,
) {
    let (width, context) = (width as usize, context as usize);
    let (t, first) = (block_y(), block_z() * CAPTIONS as usize);
    let captions = (n as usize / (width * context)).saturating_sub(first).min(CAPTIONS as usize);
    let staged = caption_ids();
    if thread_x() < captions {
        // SAFETY: caption first + thread < n / (width·context) and t < context: inside ids; the
        // thread < CAPTIONS, inside the shared array.
        unsafe { staged.store(thread_x(), ids.load((first + thread_x()) * context + t)) };
    }
    sync_threads();
    let mut c = block_x() * block_dim_x() + thread_x();
    while c < width {
        // SAFETY: t < context and c < width: inside pos.
        let p = unsafe { pos.load(t * width + c) }.to_f32();
        let (mut carry_id, mut carry) = (NONE, 0.0f32);
        let mut b0 = 0;
        while b0 < captions {
            // The group's ids, the same in every thread of the block (no divergence below).
            let mut id = [NONE; GROUP];
            unrolled::<GROUP>(|j| {
                if b0 + j < captions {
                    // SAFETY: b0 + j < captions ≤ CAPTIONS, written before the barrier.
                    id[j] = unsafe { staged.load(b0 + j) };
                }
            });
            // A table value is loaded for the first occurrence of an id in the group, unless
            // the previous group ended with it; the loads go out together.
            let repeat = |j: usize, id: &[u32; GROUP]| {
                let mut earlier = id[j] == carry_id;
                unrolled::<GROUP>(|k| earlier |= k < j && id[k] == id[j]);
                earlier
            };
            let mut v = [0.0f32; GROUP];
            unrolled::<GROUP>(|j| {
                if id[j] < vocab && !repeat(j, &id) {
                    // SAFETY: id < vocab and c < width: inside the table.
                    v[j] = unsafe { table.load(id[j] as usize * width + c) }.to_f32();
                }
            });
            unrolled::<GROUP>(|j| {
                if id[j] < vocab && repeat(j, &id) {
                    if id[j] == carry_id {
                        v[j] = carry;
                    }
                    unrolled::<GROUP>(|k| {
                        if k < j && id[k] == id[j] {
                            v[j] = v[k];
                        }
                    });
                }
            });
            unrolled::<GROUP>(|j| {
                if b0 + j < captions {
                    let value = if id[j] < vocab { v[j] + p } else { f32::NAN };
                    // SAFETY: caption first + b0 + j < n / (width·context), t < context and c <
                    // width: inside x.
                    unsafe { x.store(((first + b0 + j) * context + t) * width + c, T::from_f32(value)) };
                    if id[j] < vocab {
                        (carry_id, carry) = (id[j], v[j]);
                    }
                }
            });
            b0 += GROUP;
        }
        c += grid_dim_x() * block_dim_x();
    }
}

/// d_pos[e] += dx[b·T·W + e] for every caption b in order, e < T·W.
///
/// # Safety
/// `d_pos` holds context_width = T·W floats, `dx` captions·T·W elements, captions·T·W < 2⁶⁴.
#[inline(always)]
unsafe fn backward_pos<T: Element>(d_pos: GlobalMut<f32>, dx: Global<T>, captions: u32, context_width: u32) {
    let (captions, stride) = (captions as usize, context_width as usize);
    grid_stride(stride, |e| {
        // SAFETY: e < T·W and b < captions: inside d_pos and dx.
        unsafe {
            let mut acc = d_pos.load(e);
            let mut b0 = 0;
            while b0 < captions {
                let mut v = [0.0f32; GROUP];
                unrolled::<GROUP>(|j| {
                    if b0 + j < captions {
                        v[j] = dx.load((b0 + j) * stride + e).to_f32();
                    }
                });
                unrolled::<GROUP>(|j| {
                    if b0 + j < captions {
                        acc += v[j];
                    }
                });
                b0 += GROUP;
            }
            d_pos.store(e, acc);
        }
    });
}

/// d_table[ids[r]·W + c] += dx[r·W + c] over rows r < R in order, for the ids of this block's
/// bucket (id mod BUCKETS = block y) and its strip of columns; ids ≥ vocab are skipped.
/// Grid (⌈W / (THREADS·COLUMNS)⌉, BUCKETS), THREADS threads.
///
/// # Safety
/// `d_table` holds vocab·width floats, `dx` rows·width elements, `ids` rows.
#[inline(always)]
unsafe fn backward_table<T: Element>(
    d_table: GlobalMut<f32>,
    dx: Global<T>,
    ids: Global<u32>,
    rows: u32,
    width: u32,
    vocab: u32,
) {
    const COLS: usize = COLUMNS as usize;
    let (bucket, rows, width) = (block_y() as u32, rows as usize, width as usize);
    // This thread's columns: c0, c0 + THREADS, …; those ≥ width are skipped (the thread still
    // stages ids and meets the barriers).
    let c0 = block_x() * THREADS as usize * COLS + thread_x();
    let column = |k: usize| c0 + k * THREADS as usize;
    let staged = chunk_ids();
    let (mut run, mut acc) = (NONE, [0.0f32; COLS]);
    // SAFETY (the accesses below): r < rows and a column < width: inside ids and dx; every id used
    // is < vocab: inside d_table; i < CHUNK: inside the shared array.
    let flush = |run: u32, acc: &[f32; COLS]| {
        unrolled::<COLS>(|k| {
            if column(k) < width {
                unsafe { d_table.store(run as usize * width + column(k), acc[k]) };
            }
        })
    };
    let mut first = 0;
    while first < rows {
        let len = CHUNK.min(rows - first);
        sync_threads();
        block_stride(len, |i| unsafe { staged.store(i, ids.load(first + i)) });
        sync_threads();
        let mut g = 0;
        while g < len {
            let (mut id, mut v) = ([NONE; GROUP], [[0.0f32; COLS]; GROUP]);
            unrolled::<GROUP>(|j| {
                if g + j < len {
                    let i = unsafe { staged.load(g + j) };
                    if i < vocab && i % BUCKETS == bucket {
                        id[j] = i;
                        unrolled::<COLS>(|k| {
                            if column(k) < width {
                                v[j][k] = unsafe { dx.load((first + g + j) * width + column(k)) }.to_f32();
                            }
                        });
                    }
                }
            });
            unrolled::<GROUP>(|j| {
                if id[j] != NONE {
                    if id[j] != run {
                        if run != NONE {
                            flush(run, &acc);
                        }
                        run = id[j];
                        unrolled::<COLS>(|k| {
                            if column(k) < width {
                                acc[k] = unsafe { d_table.load(run as usize * width + column(k)) };
                            }
                        });
                    }
                    unrolled::<COLS>(|k| acc[k] += v[j][k]);
                }
            });
            g += GROUP;
        }
        first += len;
    }
    if run != NONE {
        flush(run, &acc);
    }
}

macro_rules! embedding_entries {
    ($t:ty, $forward:ident, $backward_pos:ident, $backward_table:ident) => {
        kernel! {
            /// x[i] = table[ids[r]·W + c] + pos[(r mod T)·W + c], i = r·W + c < n = R·W; NaN
            /// for an id ≥ vocab. Grid (g, T, ⌈captions / CAPTIONS⌉), THREADS threads.
            ///
            /// # Safety
            /// `x` holds n < 2³² elements, `ids` n / width, `table` vocab·width, `pos`
            /// context·width; width, context ≥ 1; n a multiple of width·context.
            pub fn $forward(
                x: GlobalMut<$t>,
                ids: Global<u32>,
                table: Global<$t>,
                pos: Global<$t>,
                n: u32,
                width: u32,
                context: u32,
                vocab: u32,
            ) {
                // SAFETY: the caller's contract, the same as forward's.
                unsafe { forward(x, ids, table, pos, n, width, context, vocab) }
            }
        }

        kernel! {
            /// d_pos[e] += dx[b·T·W + e] for every caption b in order, e < T·W.
            ///
            /// # Safety
            /// `d_pos` holds context_width = T·W floats, `dx` captions·T·W elements.
            pub fn $backward_pos(d_pos: GlobalMut<f32>, dx: Global<$t>, captions: u32, context_width: u32) {
                // SAFETY: the caller's contract, the same as backward_pos'.
                unsafe { backward_pos(d_pos, dx, captions, context_width) }
            }
        }

        kernel! {
            /// d_table[ids[r]·W + c] += dx[r·W + c] over rows r < R in order, for the ids of
            /// this block's bucket and its strip of columns; ids ≥ vocab are skipped. Grid
            /// (⌈W / (THREADS·COLUMNS)⌉, BUCKETS), THREADS threads.
            ///
            /// # Safety
            /// `d_table` holds vocab·width floats, `dx` rows·width elements, `ids` rows.
            pub fn $backward_table(
                d_table: GlobalMut<f32>,
                dx: Global<$t>,
                ids: Global<u32>,
                rows: u32,
                width: u32,
                vocab: u32,
            ) {
                // SAFETY: the caller's contract, the same as backward_table's.
                unsafe { backward_table(d_table, dx, ids, rows, width, vocab) }
            }
        }
    };
}
embedding_entries!(f32, embedding_forward_f32, embedding_backward_pos_f32, embedding_backward_table_f32);
embedding_entries!(Bf16, embedding_forward_bf16, embedding_backward_pos_bf16, embedding_backward_table_bf16);
