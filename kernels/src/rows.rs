//! Pooling rows by index (`host/src/ops/rows.rs` holds the CPU reference): each caption's EOT
//! row (the first position of its largest id, as `torch.argmax`), gathering rows and scattering
//! their gradients back. The kernels stay in bounds for any index: a row outside the matrix
//! gathers a NaN row and scatters nowhere (the CPU reference refuses it).
//!
//! - `eot_rows_u32`: one warp per caption. Each lane keeps the first largest id of its positions
//!   (lane, lane + 32, …), then a butterfly over (id, position) keeps the larger id, on a tie the
//!   earlier position: the first maximum, whatever the butterfly's order. Reads ids once,
//!   coalesced; writes one word per caption.
//! - `gather_rows_*`: a grid-stride loop over the n·W outputs, coalesced along W. Traffic: the
//!   gathered rows read once, out written once, the indices read once per W outputs (cache): the
//!   analytic minimum.
//! - `scatter_rows_*`: one warp per row q of dx, which finds the last i with rows[i] = q
//!   (lanes scan the index list, a butterfly keeps the largest match; the last wins, as in the
//!   CPU's sequential copies) and writes the whole row: d_out[i] or zeros. Every element of dx
//!   is written exactly once by one thread, in one launch, with no race whatever the indices.
//!   Traffic: dx written once, d_out's rows read once: the minimum; the n indices are read by
//!   every warp (n·4 bytes each, from cache).
//!
//! The gathered and scattered rows have the activations' element type (`_f32` and `_bf16` entry
//! points of one body each); both kernels copy elements without converting them, s bytes each
//! (4 f32, 2 bf16).

use crate::element::{Bf16, Element};
use crate::hw::{Global, GlobalMut, grid_stride, lane, lane_stride, shfl_xor, warp_rows};
use crate::kernel;

/// Threads per block of every rows kernel (8 warps).
pub const THREADS: u32 = 256;

kernel! {
    /// rows[b] = b·T + the first position of the largest id of ids[b·T..(b+1)·T], b < captions.
    /// Blocks of whole warps.
    ///
    /// # Safety
    /// `ids` holds captions·context words (< 2³²), `rows` captions; context ≥ 1.
    pub fn eot_rows_u32(rows: GlobalMut<u32>, ids: Global<u32>, captions: u32, context: u32) {
        let context = context as usize;
        warp_rows(captions as usize, |b| {
            // A lane without positions (context < 32) holds (0, MAX): it never wins against a
            // position of lane 0, which every caption has.
            let (mut best, mut at) = (0u32, u32::MAX);
            lane_stride(context, |i| {
                // SAFETY: b < captions and i < context: inside ids.
                let id = unsafe { ids.load(b * context + i) };
                if at == u32::MAX || id > best {
                    (best, at) = (id, i as u32);
                }
            });
            let mut mask = 16;
            while mask > 0 {
                let (id, i) = (shfl_xor(u32::MAX, best, mask), shfl_xor(u32::MAX, at, mask));
                if id > best || (id == best && i < at) {
                    (best, at) = (id, i);
                }
                mask /= 2;
            }
            if lane() == 0 {
                // SAFETY: b < captions, the length of rows.
                unsafe { rows.store(b, (b * context) as u32 + at) };
            }
        });
    }
}

/// out[i·W + c] = x[rows[i]·W + c] for i·W + c < n; NaN where rows[i] ≥ x_rows.
///
/// # Safety
/// `out` holds n < 2³² elements, `rows` n / width, `x` x_rows·width; width ≥ 1.
#[inline(always)]
unsafe fn gather_rows<T: Element>(out: GlobalMut<T>, x: Global<T>, rows: Global<u32>, n: u32, width: u32, x_rows: u32) {
    grid_stride(n as usize, |e| {
        let (i, c) = (e as u32 / width, e as u32 % width);
        // SAFETY: e < n, i < n / width: inside out and rows; row < x_rows and c < width: inside x.
        unsafe {
            let row = rows.load(i as usize);
            let v =
                if row < x_rows { x.load(row as usize * width as usize + c as usize) } else { T::from_f32(f32::NAN) };
            out.store(e, v);
        }
    });
}

/// dx[q·W + c] = d_out[i·W + c] for the last i < n with rows[i] = q, else 0, for every element of
/// dx (dx_len of them; its last row may be partial). Blocks of whole warps.
///
/// # Safety
/// `dx` holds dx_len elements, `d_out` n·width, `rows` n; width ≥ 1.
#[inline(always)]
unsafe fn scatter_rows<T: Element>(
    dx: GlobalMut<T>,
    d_out: Global<T>,
    rows: Global<u32>,
    n: u32,
    width: u32,
    dx_len: u32,
) {
    let (n, width, dx_len) = (n as usize, width as usize, dx_len as usize);
    // Rows wholly inside dx; a partial last row only gets zeros.
    let whole = dx_len / width;
    warp_rows(dx_len.div_ceil(width), |q| {
        // 1 + the last i with rows[i] = q seen by this lane, 0 for none.
        let mut last = 0u32;
        if q < whole {
            lane_stride(n, |i| {
                // SAFETY: i < n, the length of rows.
                if unsafe { rows.load(i) } as usize == q {
                    last = i as u32 + 1;
                }
            });
        }
        let mut mask = 16;
        while mask > 0 {
            last = last.max(shfl_xor(u32::MAX, last, mask));
            mask /= 2;
        }
        let dst = q * width;
        lane_stride(width.min(dx_len - dst), |c| {
            // SAFETY: dst + c < dx_len; last − 1 < n and c < width: inside d_out.
            unsafe {
                let v = if last > 0 { d_out.load((last as usize - 1) * width + c) } else { T::ZERO };
                dx.store(dst + c, v);
            }
        });
    });
}

macro_rules! rows_entries {
    ($t:ty, $gather:ident, $scatter:ident) => {
        kernel! {
            /// out[i·W + c] = x[rows[i]·W + c] for i·W + c < n; NaN where rows[i] ≥ x_rows.
            ///
            /// # Safety
            /// `out` holds n < 2³² elements, `rows` n / width, `x` x_rows·width; width ≥ 1.
            pub fn $gather(out: GlobalMut<$t>, x: Global<$t>, rows: Global<u32>, n: u32, width: u32, x_rows: u32) {
                // SAFETY: the caller's contract, the same as gather_rows'.
                unsafe { gather_rows(out, x, rows, n, width, x_rows) }
            }
        }

        kernel! {
            /// dx[q·W + c] = d_out[i·W + c] for the last i < n with rows[i] = q, else 0, for
            /// every element of dx (dx_len of them). Blocks of whole warps.
            ///
            /// # Safety
            /// `dx` holds dx_len elements, `d_out` n·width, `rows` n; width ≥ 1.
            pub fn $scatter(dx: GlobalMut<$t>, d_out: Global<$t>, rows: Global<u32>, n: u32, width: u32, dx_len: u32) {
                // SAFETY: the caller's contract, the same as scatter_rows'.
                unsafe { scatter_rows(dx, d_out, rows, n, width, dx_len) }
            }
        }
    };
}
rows_entries!(f32, gather_rows_f32, scatter_rows_f32);
rows_entries!(Bf16, gather_rows_bf16, scatter_rows_bf16);
