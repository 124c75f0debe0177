//! The CLIP contrastive loss on the GPU path (`host/src/ops/clip_loss.rs` holds the CPU
//! reference and the order of the calls): features L2-normalized, cosines C = img·txtᵀ by
//! cuBLASLt, then over the B×B matrix
//! 1. rows: logits = e^s·C in place and each row's log-sum-exp (one warp per row);
//! 2. columns: each column's log-sum-exp (one thread per column: lanes read consecutive
//!    columns of a row, coalesced);
//! 3. gradient: g_ij = (softmax_row_ij + softmax_col_ij − 2δ_ij)/(2B), stored as e^s·g (the
//!    gradient of the cosines, ready for the two feature GEMMs), and per row Σ_j g_ij·l_ij (the
//!    logit scale's gradient in parts);
//! 4. one block sums the loss Σ_i (rowlse_i + collse_i − 2·l_ii)/(2B) and the scale's gradient;
//!
//! then dimg = G·txt and dtxt = Gᵀ·img (cuBLASLt) and the normalization's backward
//! d ← (d − n·(n·d))/‖x‖ per row.
//!
//! Only the features and their gradients have the activations' element type T (the
//! normalizations' `_f32` and `_bf16` entry points, one body each): the unit features, norms,
//! logits, their gradient and every sum are f32, so the loss is computed in f32 throughout.
//!
//! Memory traffic: the B×B matrix is read 4 times and written twice (B = 256: 256 KB each, from
//! L2); the features (s bytes per element: 4 f32, 2 bf16) are read once by the normalization,
//! which writes the f32 unit features; its backward reads the f32 gradient and unit features and
//! writes the T gradient once. The GEMMs dominate.

use crate::element::{Bf16, Element};
use crate::hw::{Global, GlobalMut, block_stride, block_x, grid_stride, lane, lane_stride, warp_rows};
use crate::kernel;
use crate::math::{exp, ln, sqrt};
use crate::reduce::{block_reduce, warp_reduce};

/// Threads per block of every kernel here.
pub const THREADS: u32 = 128;

/// Σ over j = lane, lane + 32, … < n of f(j), reduced over the warp.
#[inline(always)]
fn warp_sum(n: usize, mut f: impl FnMut(usize) -> f32) -> f32 {
    let mut total = 0.0f32;
    lane_stride(n, |j| total += f(j));
    warp_reduce(total, |a, b| a + b)
}

/// unit[r] = x[r]/‖x[r]‖ and norms[r] = max(‖x[r]‖, 1e-12) (F.normalize) for rows r.
///
/// # Safety
/// `unit` and `x` hold rows·dim elements, `norms` rows.
#[inline(always)]
unsafe fn l2_normalize<T: Element>(unit: GlobalMut<f32>, norms: GlobalMut<f32>, x: Global<T>, rows: u32, dim: u32) {
    let dim = dim as usize;
    warp_rows(rows as usize, |r| {
        // SAFETY: j < dim on row r < rows.
        let x = |j: usize| unsafe { x.load(r * dim + j) }.to_f32();
        let sum = warp_sum(dim, |j| x(j) * x(j));
        let norm = sqrt(sum).max(1e-12);
        // SAFETY: as above.
        lane_stride(dim, |j| unsafe { unit.store(r * dim + j, x(j) / norm) });
        if lane() == 0 {
            // SAFETY: r < rows.
            unsafe { norms.store(r, norm) };
        }
    });
}

/// dx[r] = (d[r] − n[r]·(n[r]·d[r]))/norms[r]: the gradient through `l2_normalize`, from the
/// f32 gradient d at the unit features.
///
/// # Safety
/// `dx`, `d` and `unit` hold rows·dim elements, `norms` rows.
#[inline(always)]
unsafe fn l2_normalize_backward<T: Element>(
    dx: GlobalMut<T>,
    d: Global<f32>,
    unit: Global<f32>,
    norms: Global<f32>,
    rows: u32,
    dim: u32,
) {
    let dim = dim as usize;
    warp_rows(rows as usize, |r| {
        // SAFETY: j < dim on row r < rows.
        let dot = warp_sum(dim, |j| unsafe { d.load(r * dim + j) * unit.load(r * dim + j) });
        // SAFETY: r < rows.
        let norm = unsafe { norms.load(r) };
        lane_stride(dim, |j| {
            let at = r * dim + j;
            // SAFETY: as above.
            unsafe { dx.store(at, T::from_f32((d.load(at) - unit.load(at) * dot) / norm)) };
        });
    });
}

macro_rules! normalize_entries {
    ($t:ty, $forward:ident, $backward:ident) => {
        kernel! {
            /// unit[r] = x[r]/‖x[r]‖ (f32) and norms[r] = max(‖x[r]‖, 1e-12) for rows r.
            ///
            /// # Safety
            /// `unit` and `x` hold rows·dim elements, `norms` rows.
            pub fn $forward(unit: GlobalMut<f32>, norms: GlobalMut<f32>, x: Global<$t>, rows: u32, dim: u32) {
                // SAFETY: the caller's contract, the same as l2_normalize's.
                unsafe { l2_normalize(unit, norms, x, rows, dim) }
            }
        }

        kernel! {
            /// dx[r] = (d[r] − n[r]·(n[r]·d[r]))/norms[r]: the gradient through the normalization.
            ///
            /// # Safety
            /// `dx`, `d` and `unit` hold rows·dim elements, `norms` rows.
            pub fn $backward(
                dx: GlobalMut<$t>,
                d: Global<f32>,
                unit: Global<f32>,
                norms: Global<f32>,
                rows: u32,
                dim: u32,
            ) {
                // SAFETY: the caller's contract, the same as l2_normalize_backward's.
                unsafe { l2_normalize_backward(dx, d, unit, norms, rows, dim) }
            }
        }
    };
}
normalize_entries!(f32, l2_normalize_f32, l2_normalize_backward_f32);
normalize_entries!(Bf16, l2_normalize_bf16, l2_normalize_backward_bf16);

kernel! {
    /// logits [b, b]: cosines in, e^s·cosines out; row_lse[i] = log Σ_j exp(logits_ij).
    ///
    /// # Safety
    /// `logits` holds b² floats, `row_lse` b, `logit_scale` 1.
    pub fn clip_logits_rows_f32(logits: GlobalMut<f32>, row_lse: GlobalMut<f32>, logit_scale: Global<f32>, b: u32) {
        let b = b as usize;
        // SAFETY: logit_scale holds one float.
        let scale = exp(unsafe { logit_scale.load(0) });
        warp_rows(b, |i| {
            let mut max = f32::NEG_INFINITY;
            lane_stride(b, |j| {
                // SAFETY: i, j < b.
                let l = unsafe { logits.load(i * b + j) } * scale;
                unsafe { logits.store(i * b + j, l) };
                max = max.max(l);
            });
            let max = warp_reduce(max, f32::max);
            // SAFETY: as above; this lane wrote element j.
            let total = warp_sum(b, |j| exp(unsafe { logits.load(i * b + j) } - max));
            if lane() == 0 {
                // SAFETY: i < b.
                unsafe { row_lse.store(i, max + ln(total)) };
            }
        });
    }
}

kernel! {
    /// col_lse[j] = log Σ_i exp(logits_ij), one thread per column.
    ///
    /// # Safety
    /// `logits` holds b² floats, `col_lse` b.
    pub fn clip_logits_cols_f32(col_lse: GlobalMut<f32>, logits: Global<f32>, b: u32) {
        let b = b as usize;
        grid_stride(b, |j| {
            let mut max = f32::NEG_INFINITY;
            // SAFETY: i, j < b.
            (0..b).for_each(|i| max = max.max(unsafe { logits.load(i * b + j) }));
            let mut total = 0.0f32;
            // SAFETY: as above.
            (0..b).for_each(|i| total += exp(unsafe { logits.load(i * b + j) } - max));
            // SAFETY: j < b.
            unsafe { col_lse.store(j, max + ln(total)) };
        });
    }
}

kernel! {
    /// g_ij = (exp(l_ij − row_lse_i) + exp(l_ij − col_lse_j) − 2δ_ij)/(2b): writes e^s·g into
    /// `grad` and Σ_j g_ij·l_ij into `parts[i]`.
    ///
    /// # Safety
    /// `grad` and `logits` hold b² floats, `parts`, `row_lse` and `col_lse` b, `logit_scale` 1.
    pub fn clip_loss_grad_f32(
        grad: GlobalMut<f32>,
        parts: GlobalMut<f32>,
        logits: Global<f32>,
        row_lse: Global<f32>,
        col_lse: Global<f32>,
        logit_scale: Global<f32>,
        b: u32,
    ) {
        let b = b as usize;
        // SAFETY: logit_scale holds one float.
        let scale = exp(unsafe { logit_scale.load(0) });
        let inv = 1.0 / (2 * b) as f32;
        warp_rows(b, |i| {
            // SAFETY: i < b.
            let lse_i = unsafe { row_lse.load(i) };
            let part = warp_sum(b, |j| {
                // SAFETY: i, j < b.
                let (l, lse_j) = unsafe { (logits.load(i * b + j), col_lse.load(j)) };
                let target = if i == j { 2.0 } else { 0.0 };
                let g = (exp(l - lse_i) + exp(l - lse_j) - target) * inv;
                // SAFETY: as above.
                unsafe { grad.store(i * b + j, scale * g) };
                g * l
            });
            if lane() == 0 {
                // SAFETY: i < b.
                unsafe { parts.store(i, part) };
            }
        });
    }
}

kernel! {
    /// One block: loss[0] = Σ_i (row_lse_i + col_lse_i − 2·l_ii)/(2b), d_logit_scale[0] = Σ parts.
    ///
    /// # Safety
    /// `logits` holds b² floats, `parts`, `row_lse` and `col_lse` b, `loss` and `d_logit_scale`
    /// 1; one block is launched.
    pub fn clip_loss_total_f32(
        loss: GlobalMut<f32>,
        d_logit_scale: GlobalMut<f32>,
        parts: Global<f32>,
        logits: Global<f32>,
        row_lse: Global<f32>,
        col_lse: Global<f32>,
        b: u32,
    ) {
        let b = b as usize;
        let (mut terms, mut grad) = (0.0f32, 0.0f32);
        block_stride(b, |i| {
            // SAFETY: i < b.
            unsafe {
                terms += row_lse.load(i) + col_lse.load(i) - 2.0 * logits.load(i * b + i);
                grad += parts.load(i);
            }
        });
        let terms = block_reduce(terms, 0.0, |a, b| a + b);
        let grad = block_reduce(grad, 0.0, |a, b| a + b);
        if block_x() == 0 && crate::hw::thread_x() == 0 {
            // SAFETY: both hold one float.
            unsafe {
                loss.store(0, terms / (2 * b) as f32);
                d_logit_scale.store(0, grad);
            }
        }
    }
}
