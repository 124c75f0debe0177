//! LayerNorm over the last dimension (PyTorch, eps [`EPS`]): forward, forward with the residual
//! add fused in front, and backward, over activations of element type T (`_f32` and `_bf16`
//! entry points of one body each). Statistics (mean, rstd), the parameter gradients dγ, dβ and
//! every sum are f32; T values are widened on load and rounded (to nearest even) on store.
//! `host/src/ops/layernorm.rs` holds the CPU reference; the kernels compute the same formulas in
//! the same operation order, and differ from it only in the order of the row and column sums
//! (lane partials, then a butterfly) and, for bf16, in the rounding of what they store.
//!
//! Algorithm:
//! - Forward (`layernorm_forward_*`, `add_layernorm_forward_*`): one warp per row, several warps
//!   per block, rows grid-strided over the warps. The lanes stride over the row (lane, lane + 32,
//!   …: each load instruction of the warp reads 32 consecutive elements). Pass 1 sums the row
//!   (the fused variant computes sum = a + b here and writes it; it sums and normalizes the
//!   stored, rounded value: the residual stream as the next layer reads it), a warp butterfly
//!   gives the mean; pass 2 sums (x − mean)², the biased variance; rstd = 1/sqrt(var + eps),
//!   with the correctly rounded `math::sqrt`; pass 3 writes y = (x − mean)·rstd·γ + β. Lane 0
//!   writes the row's mean and rstd for backward.
//! - Backward dx (`layernorm_backward_*`): one warp per row likewise. Pass 1 sums g = dy·γ and
//!   g·x̂ over the row; pass 2 writes dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), overwriting dx or
//!   adding to it (the residual stream's gradient).
//! - dγ, dβ (`layernorm_param_grads_*`, f32 outputs): dγ_i += Σ_rows dy·x̂, dβ_i += Σ_rows dy,
//!   without atomics, so the result is deterministic: each block owns 32 columns; its 256
//!   threads are 32 columns × 8 row-lanes, row-lane r takes rows r, r + 8, … (a warp reads 32
//!   consecutive elements of one row); the 8 partials per column meet in shared memory and are
//!   added in a fixed order. Parallelism is modest: ⌈dim / 32⌉ blocks (24 for ViT-B's 768), each
//!   looping over all rows; a row-split with a deterministic second pass would fill the GPU, left
//!   for when the profile asks for it.
//!
//! Memory traffic, n = rows·dim, s = bytes per element (4 f32, 2 bf16; the analytic minimum in
//! brackets):
//! - forward: x read, y written, 2sn bytes, plus γ, β (2s·dim, cached) and mean, rstd (8·rows)
//!   [the same]. Passes 2 and 3 re-read the warp's row, which a block's 8 rows (8·dim·s bytes,
//!   24 KiB at dim 768 in f32) keep in L1/L2: from DRAM x is read once.
//! - fused add: a and b read, sum and y written, 4sn [the same]; passes 2 and 3 re-read sum, just
//!   written by the same lane, from cache.
//! - backward: the dx kernel reads dy, x (and dx with `accumulate`) and writes dx, 3sn (4sn);
//!   pass 2 re-reads dy and x from cache. The dγ/dβ kernel reads dy and x once more, 2sn: 5sn
//!   (6sn) in all against a minimum of 3sn (4sn), the price of the separate deterministic column
//!   reduction.

use crate::element::{Bf16, Element};
use crate::hw::{Global, GlobalMut, WARP, block_dim_x, block_x, grid_dim_x, lane, sync_threads, thread_x, warp};
use crate::kernel;
use crate::math::sqrt;
use crate::reduce::warp_reduce;

/// LayerNorm's epsilon (PyTorch's default), the one definition for the CPU reference and the
/// kernels.
pub const EPS: f32 = 1e-5;

/// Threads per block of every LayerNorm kernel (8 warps).
pub const THREADS: u32 = 256;

/// Columns per block of `layernorm_param_grads_*` (one per lane).
pub const PARAM_COLUMNS: u32 = WARP as u32;

/// Row-lanes of `layernorm_param_grads_*`'s block: THREADS / PARAM_COLUMNS.
const ROW_LANES: usize = (THREADS / PARAM_COLUMNS) as usize;

crate::shared_array!(fn layernorm_param_partials() -> [f32; 2 * THREADS as usize]);

#[inline(always)]
fn add(a: f32, b: f32) -> f32 {
    a + b
}

/// Calls `f(row)` for the rows of this warp: warp w of block b takes rows b·W + w, then every
/// (grid size · W)-th after, W = warps per block. Uniform within a warp.
#[inline(always)]
fn warp_rows(rows: usize, mut f: impl FnMut(usize)) {
    let warps = block_dim_x() / WARP;
    let step = grid_dim_x() * warps;
    let mut row = block_x() * warps + warp();
    while row < rows {
        f(row);
        row += step;
    }
}

/// Calls `f(i)` for this lane's columns i = lane, lane + 32, … < dim.
#[inline(always)]
fn lane_columns(dim: usize, mut f: impl FnMut(usize)) {
    let mut i = lane();
    while i < dim {
        f(i);
        i += WARP;
    }
}

/// Passes 2 and 3 of the forward pass over one row, `x(i)` its value i, `partial` this lane's
/// part of the row sum: the variance, rstd, y and the statistics.
///
/// # Safety
/// `y` holds rows·dim elements, `mean` and `rstd` rows, `gamma` and `beta` dim; row < rows; `x`
/// reads in bounds for i < dim. The whole warp calls it (shuffles).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn normalize_row<T: Element>(
    y: GlobalMut<T>,
    mean: GlobalMut<f32>,
    rstd: GlobalMut<f32>,
    gamma: Global<T>,
    beta: Global<T>,
    row: usize,
    dim: usize,
    partial: f32,
    x: impl Fn(usize) -> f32,
) {
    let mu = warp_reduce(partial, add) / dim as f32;
    let mut q = 0.0f32;
    lane_columns(dim, |i| {
        let d = x(i) - mu;
        q += d * d;
    });
    let var = warp_reduce(q, add) / dim as f32;
    let s = 1.0 / sqrt(var + EPS);
    let base = row * dim;
    // SAFETY: base + i < rows·dim and i < dim (the caller's sizes).
    lane_columns(dim, |i| unsafe {
        let v = (x(i) - mu) * s * gamma.load(i).to_f32() + beta.load(i).to_f32();
        y.store(base + i, T::from_f32(v))
    });
    if lane() == 0 {
        // SAFETY: row < rows.
        unsafe {
            mean.store(row, mu);
            rstd.store(row, s);
        }
    }
}

/// y = LayerNorm(x)·γ + β over rows of dim values; each row's mean and rstd saved.
///
/// # Safety
/// `y` and `x` hold rows·dim elements, `mean` and `rstd` rows, `gamma` and `beta` dim; dim ≥ 1;
/// a multiple of 32 threads per block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn forward<T: Element>(
    y: GlobalMut<T>,
    mean: GlobalMut<f32>,
    rstd: GlobalMut<f32>,
    x: Global<T>,
    gamma: Global<T>,
    beta: Global<T>,
    rows: u32,
    dim: u32,
) {
    let dim = dim as usize;
    warp_rows(rows as usize, |row| {
        let base = row * dim;
        // SAFETY: row < rows and i < dim: base + i < rows·dim, the caller's sizes.
        let x = |i: usize| unsafe { x.load(base + i) }.to_f32();
        let mut partial = 0.0f32;
        lane_columns(dim, |i| partial += x(i));
        // SAFETY: the caller's sizes; row < rows; the whole warp takes the row.
        unsafe { normalize_row(y, mean, rstd, gamma, beta, row, dim, partial, x) };
    });
}

/// sum = a + b (the residual stream, rounded to T), then y = LayerNorm(sum)·γ + β, mean and
/// rstd saved.
///
/// # Safety
/// `sum`, `y`, `a` and `b` hold rows·dim elements, `mean` and `rstd` rows, `gamma` and `beta`
/// dim; dim ≥ 1; a multiple of 32 threads per block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn add_forward<T: Element>(
    sum: GlobalMut<T>,
    y: GlobalMut<T>,
    mean: GlobalMut<f32>,
    rstd: GlobalMut<f32>,
    a: Global<T>,
    b: Global<T>,
    gamma: Global<T>,
    beta: Global<T>,
    rows: u32,
    dim: u32,
) {
    let dim = dim as usize;
    warp_rows(rows as usize, |row| {
        let base = row * dim;
        let mut partial = 0.0f32;
        lane_columns(dim, |i| {
            // SAFETY: base + i < rows·dim, the caller's sizes.
            let v = T::from_f32(unsafe { a.load(base + i).to_f32() + b.load(base + i).to_f32() });
            // SAFETY: as above.
            unsafe { sum.store(base + i, v) };
            partial += v.to_f32();
        });
        // SAFETY: as above; the lane reads back only the values it wrote.
        let x = |i: usize| unsafe { sum.load(base + i) }.to_f32();
        // SAFETY: the caller's sizes; row < rows; the whole warp takes the row.
        unsafe { normalize_row(y, mean, rstd, gamma, beta, row, dim, partial, x) };
    });
}

/// dx = rstd·(dy·γ − mean(dy·γ) − x̂·mean(dy·γ·x̂)), x̂ = (x − mean)·rstd, per row; written when
/// `accumulate` is 0, else added to dx.
///
/// # Safety
/// `dx`, `dy` and `x` hold rows·dim elements, `mean` and `rstd` rows, `gamma` dim; dim ≥ 1; a
/// multiple of 32 threads per block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn backward<T: Element>(
    dx: GlobalMut<T>,
    dy: Global<T>,
    x: Global<T>,
    mean: Global<f32>,
    rstd: Global<f32>,
    gamma: Global<T>,
    rows: u32,
    dim: u32,
    accumulate: u32,
) {
    let dim = dim as usize;
    warp_rows(rows as usize, |row| {
        let base = row * dim;
        // SAFETY: row < rows, the length of mean and rstd.
        let (mu, s) = unsafe { (mean.load(row), rstd.load(row)) };
        // SAFETY: base + i < rows·dim and i < dim, the caller's sizes (here and below).
        let (dy, x, gamma) = unsafe {
            (
                |i: usize| dy.load(base + i).to_f32(),
                |i: usize| x.load(base + i).to_f32(),
                |i: usize| gamma.load(i).to_f32(),
            )
        };
        let (mut sum_g, mut sum_gx) = (0.0f32, 0.0f32);
        lane_columns(dim, |i| {
            let g = dy(i) * gamma(i);
            sum_g += g;
            sum_gx += g * (x(i) - mu) * s;
        });
        let mean_g = warp_reduce(sum_g, add) / dim as f32;
        let mean_gx = warp_reduce(sum_gx, add) / dim as f32;
        // SAFETY: as above.
        lane_columns(dim, |i| unsafe {
            let xhat = (x(i) - mu) * s;
            let d = s * (dy(i) * gamma(i) - mean_g - xhat * mean_gx);
            dx.store(base + i, T::from_f32(if accumulate != 0 { dx.load(base + i).to_f32() + d } else { d }));
        });
    });
}

/// dγ_i += Σ_rows dy·x̂, dβ_i += Σ_rows dy, x̂ = (x − mean)·rstd; deterministic (no atomics).
/// Block b owns columns 32·b … 32·b + 31.
///
/// # Safety
/// `dy` and `x` hold rows·dim elements, `mean` and `rstd` rows, `dgamma` and `dbeta` dim;
/// exactly THREADS threads per block, ⌈dim / 32⌉ blocks.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn param_grads<T: Element>(
    dgamma: GlobalMut<f32>,
    dbeta: GlobalMut<f32>,
    dy: Global<T>,
    x: Global<T>,
    mean: Global<f32>,
    rstd: Global<f32>,
    rows: u32,
    dim: u32,
) {
    let (rows, dim) = (rows as usize, dim as usize);
    let (c, r) = (thread_x() % WARP, thread_x() / WARP);
    let col = block_x() * WARP + c;
    let (mut g, mut b) = (0.0f32, 0.0f32);
    if col < dim {
        let mut row = r;
        while row < rows {
            let i = row * dim + col;
            // SAFETY: row < rows, col < dim: i < rows·dim, the caller's sizes.
            unsafe {
                let d = dy.load(i).to_f32();
                let xhat = (x.load(i).to_f32() - mean.load(row)) * rstd.load(row);
                g += d * xhat;
                b += d;
            }
            row += ROW_LANES;
        }
    }
    let partials = layernorm_param_partials();
    // SAFETY: thread_x() < THREADS, the array holds 2·THREADS floats.
    unsafe {
        partials.store(thread_x(), g);
        partials.store(THREADS as usize + thread_x(), b);
    }
    sync_threads();
    if r == 0 && col < dim {
        let (mut g, mut b) = (0.0f32, 0.0f32);
        for k in 0..ROW_LANES {
            // SAFETY: k·32 + c < THREADS; every thread stored its partials before the barrier.
            unsafe {
                g += partials.load(k * WARP + c);
                b += partials.load(THREADS as usize + k * WARP + c);
            }
        }
        // SAFETY: col < dim, their length.
        unsafe {
            dgamma.store(col, dgamma.load(col) + g);
            dbeta.store(col, dbeta.load(col) + b);
        }
    }
}

macro_rules! layernorm_entries {
    ($t:ty, $forward:ident, $add_forward:ident, $backward:ident, $param_grads:ident) => {
        kernel! {
            /// y = LayerNorm(x)·γ + β over rows of dim values; each row's mean and rstd saved.
            ///
            /// # Safety
            /// `y` and `x` hold rows·dim elements, `mean` and `rstd` rows, `gamma` and `beta`
            /// dim; dim ≥ 1; a multiple of 32 threads per block.
            pub fn $forward(
                y: GlobalMut<$t>,
                mean: GlobalMut<f32>,
                rstd: GlobalMut<f32>,
                x: Global<$t>,
                gamma: Global<$t>,
                beta: Global<$t>,
                rows: u32,
                dim: u32,
            ) {
                // SAFETY: the caller's contract, the same as forward's.
                unsafe { forward(y, mean, rstd, x, gamma, beta, rows, dim) }
            }
        }

        kernel! {
            /// sum = a + b (the residual stream), then y = LayerNorm(sum)·γ + β, mean and rstd
            /// saved.
            ///
            /// # Safety
            /// `sum`, `y`, `a` and `b` hold rows·dim elements, `mean` and `rstd` rows, `gamma`
            /// and `beta` dim; dim ≥ 1; a multiple of 32 threads per block.
            pub fn $add_forward(
                sum: GlobalMut<$t>,
                y: GlobalMut<$t>,
                mean: GlobalMut<f32>,
                rstd: GlobalMut<f32>,
                a: Global<$t>,
                b: Global<$t>,
                gamma: Global<$t>,
                beta: Global<$t>,
                rows: u32,
                dim: u32,
            ) {
                // SAFETY: the caller's contract, the same as add_forward's.
                unsafe { add_forward(sum, y, mean, rstd, a, b, gamma, beta, rows, dim) }
            }
        }

        kernel! {
            /// dx = rstd·(dy·γ − mean(dy·γ) − x̂·mean(dy·γ·x̂)) per row; written when
            /// `accumulate` is 0, else added to dx.
            ///
            /// # Safety
            /// `dx`, `dy` and `x` hold rows·dim elements, `mean` and `rstd` rows, `gamma` dim;
            /// dim ≥ 1; a multiple of 32 threads per block.
            pub fn $backward(
                dx: GlobalMut<$t>,
                dy: Global<$t>,
                x: Global<$t>,
                mean: Global<f32>,
                rstd: Global<f32>,
                gamma: Global<$t>,
                rows: u32,
                dim: u32,
                accumulate: u32,
            ) {
                // SAFETY: the caller's contract, the same as backward's.
                unsafe { backward(dx, dy, x, mean, rstd, gamma, rows, dim, accumulate) }
            }
        }

        kernel! {
            /// dγ_i += Σ_rows dy·x̂, dβ_i += Σ_rows dy (f32); deterministic (no atomics).
            ///
            /// # Safety
            /// `dy` and `x` hold rows·dim elements, `mean` and `rstd` rows, `dgamma` and `dbeta`
            /// dim; exactly THREADS threads per block, ⌈dim / 32⌉ blocks.
            pub fn $param_grads(
                dgamma: GlobalMut<f32>,
                dbeta: GlobalMut<f32>,
                dy: Global<$t>,
                x: Global<$t>,
                mean: Global<f32>,
                rstd: Global<f32>,
                rows: u32,
                dim: u32,
            ) {
                // SAFETY: the caller's contract, the same as param_grads'.
                unsafe { param_grads(dgamma, dbeta, dy, x, mean, rstd, rows, dim) }
            }
        }
    };
}
layernorm_entries!(
    f32,
    layernorm_forward_f32,
    add_layernorm_forward_f32,
    layernorm_backward_f32,
    layernorm_param_grads_f32
);
layernorm_entries!(
    Bf16,
    layernorm_forward_bf16,
    add_layernorm_forward_bf16,
    layernorm_backward_bf16,
    layernorm_param_grads_bf16
);
