//! LayerNorm over the last dimension (PyTorch, eps [`EPS`]): forward, forward with the residual
//! add fused in front, and backward, over activations of element type T (`_f32` and `_bf16` entry
//! points of one body each). Statistics (mean, rstd), the parameter gradients dγ, dβ and every
//! sum are f32; T values are widened on load and rounded (to nearest even) on store.
//! `host/src/ops/layernorm.rs` holds the CPU reference; the kernels compute the same formulas in
//! the same operation order, and differ from it only in the order of the row and column sums
//! (lane partials, then a butterfly) and, for bf16, in the rounding of what they store.
//!
//! Algorithm:
//! - Forward (`layernorm_forward_*`, `add_layernorm_forward_*`): one warp per row, 8 warps per
//!   block, rows grid-strided over the warps ([`warp_rows`]). The block first copies γ and β,
//!   widened to f32, into shared memory (one read of each per block). Lane l holds the row's
//!   16-byte vectors l, l + 32, … (4 f32 or 8 bf16 each) in registers (an array of
//!   [`ROW_VALUES`] values, fully unrolled: rows up to [`MAX_REGISTER_DIM`] = 1024 values); each
//!   load instruction of the warp reads 32 consecutive vectors (512 bytes). γ and β are staged
//!   lane-of-vector major ([`param_slot`]), so the warp reads them without bank conflicts (the
//!   staging stores, once per block, may conflict up to L-way instead). Rows that are not a
//!   whole number of vectors, or views not on a vector boundary, take the same code with single
//!   elements: lane l holds l, l + 32, …. One read of the row (the fused
//!   variant computes sum = a + b here, rounds and writes it, and keeps the stored value: the
//!   residual stream as the next layer reads it) sums it; a warp butterfly gives the mean; the
//!   registers give Σ (x − mean)², the biased variance; rstd = 1/sqrt(var + eps), with the
//!   correctly rounded `math::sqrt`; then y = (x − mean)·rstd·γ + β is written once. Lane 0
//!   writes the row's mean and rstd for backward.
//! - Backward dx (`layernorm_backward_*`): one warp per row likewise, γ in shared memory, mean
//!   and rstd read once per row (one broadcast load each). One read of dy and x keeps g = dy·γ
//!   and x − mean in registers and sums g and g·x̂; then dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) is
//!   written, overwriting dx or adding to it (the residual stream's gradient: dx read once).
//! - Rows longer than [`MAX_REGISTER_DIM`] (no model here has them) take the same kernels'
//!   multi-pass path: the same arithmetic, the row re-read per pass (from L1/L2 on a GPU), γ and
//!   β read from global memory.
//! - dγ, dβ (`layernorm_param_grads_*`, f32 outputs): dγ_i += Σ_rows dy·x̂, dβ_i += Σ_rows dy,
//!   without atomics, so the result is deterministic: each block owns 32 columns. dy and x go
//!   in 16-byte vectors of L = 4 f32 or 8 bf16 where dim and the views allow ([`in_vectors`]):
//!   the block's 256 threads are 32/L packs of L columns × 8·L row-lanes, row-lane r takes rows
//!   r, r + 8·L, …, so a warp's load reads the 32 columns of L rows (one element a thread
//!   otherwise, L = 1: 32 columns × 8 row-lanes, a warp reads one row's 32 columns). A thread
//!   keeps L partials of each sum; a butterfly adds the warp's L row-lanes, and the 8 warps'
//!   partials per column meet in shared memory and are added in a fixed order. Rows go in
//!   chunks of 256: the block reads the chunk's mean and rstd
//!   into shared memory (one coalesced load each), so every column thread reads them there, not
//!   from global memory once per row. Parallelism is modest: ⌈dim / 32⌉ blocks (24 for ViT-B's
//!   768), each looping over all rows; a row-split with a deterministic second pass would fill
//!   the GPU, left for when the profile asks for it.
//!
//! Each lane adds its values in row order, then the same butterfly; the vector path's lanes hold
//! other elements than the single-element and multi-pass paths', so its sums round differently
//! (within the tests' tolerance of the CPU).
//!
//! Memory traffic, n = rows·dim, s = bytes per element (4 f32, 2 bf16). The analytic minimum,
//! then what the kernels move beyond it, and the ratio measured at ViT-B/16, batch 8, PGS masks,
//! f32 (`clip-pgs bench step --device emu`; bf16 within 0.03× of it; the earlier multi-pass
//! kernels in brackets). The rows move in 16-byte vectors, the same sectors in a quarter (f32)
//! or an eighth (bf16) of the warp requests single elements need:
//! - forward: x read, y written, 2sn bytes, mean and rstd written, 8·rows; plus γ and β once per
//!   block of 8 rows (2s·dim per 16s·dim): 1.13× (3.00×: x read three times, γ and β per row).
//! - fused add: a and b read, sum and y written, 4sn; plus γ, β per block: 1.07× (2.0×: the sum
//!   read back twice, γ and β per row; reported as 1.60× because the read-back sum counted in
//!   the minimum).
//! - backward: the dx kernel reads dy, x (and dx with `accumulate`) and writes dx, 3sn (4sn);
//!   plus γ per block and a 32-byte sector per row for each of mean and rstd: 1.04× (2.02×). The
//!   dγ/dβ kernel reads dy and x once more, 2sn, plus mean and rstd once per block of columns
//!   (⌈dim / 32⌉·8·rows bytes: 1/32 of its f32 traffic, 1/16 in bf16): 1.03× (bf16 1.06×), 100%
//!   of each sector used (1.25×, 83%: mean and rstd loaded by every column thread, a 32-byte
//!   sector for 4 bytes per row and warp). In vectors, a warp request of dy or x covers L rows'
//!   32 columns (512 bytes, 16 sectors) where one element a thread covers one row's (128 bytes
//!   f32, 64 bf16): the same sectors in 1/L of the requests (`tests/layernorm_gpu.rs`, 394 rows
//!   of 768: 5 472 requests in f32, 3 120 in bf16, against 19 632 one element a thread). Backward in all: 5sn (6sn) against a minimum of 3sn
//!   (4sn), the price of the separate deterministic column reduction.
//!
//! Registers (sm_90, ptxas, f32/bf16): forward 72/64, fused add 114/139, backward 158/128, dγ/dβ
//! 38/40 (sm_80 47/55; 32 one element a thread); no spills, no local memory (the row arrays are indexed by constants only).

use crate::element::{Bf16, Element, MAX_LANES, Pack};
use crate::hw::{
    Global, GlobalMut, Shared, WARP, block_stride, block_x, lane, lane_here, lane_stride, sync_threads, thread_x,
    unrolled, warp, warp_rows,
};
use crate::kernel;
use crate::map::starts_pack;
use crate::math::sqrt;
use crate::reduce::{warp_reduce, warp_reduce_strided};

/// LayerNorm's epsilon (PyTorch's default), the one definition for the CPU reference and the
/// kernels.
pub const EPS: f32 = 1e-5;

/// Threads per block of every LayerNorm kernel (8 warps).
pub const THREADS: u32 = 256;

/// Columns per block of `layernorm_param_grads_*` (one per lane).
pub const PARAM_COLUMNS: u32 = WARP as u32;

/// Values of a row each lane holds in registers (elements lane + 32·k, k < ROW_VALUES).
pub const ROW_VALUES: usize = 32;

/// The longest row the kernels keep in registers (one read of the row); longer rows take the
/// multi-pass path.
pub const MAX_REGISTER_DIM: usize = WARP * ROW_VALUES;

crate::shared_array!(fn layernorm_param_partials() -> [f32; 2 * THREADS as usize]);
crate::shared_array!(fn layernorm_row_stats() -> [f32; 2 * THREADS as usize]);
crate::shared_array!(fn layernorm_gamma_beta() -> [f32; 2 * MAX_REGISTER_DIM]);

#[inline(always)]
fn add(a: f32, b: f32) -> f32 {
    a + b
}

/// Copies γ and (if given) β, widened to f32, into the block's shared memory: γ at 0.., β at
/// MAX_REGISTER_DIM.., element i at [`param_slot`]. Every thread of the block calls it (a
/// barrier).
///
/// # Safety
/// `gamma` and `beta` hold dim ≤ MAX_REGISTER_DIM elements; `lanes` divides dim.
#[inline(always)]
unsafe fn stage_params<T: Element>(gamma: Global<T>, beta: Option<Global<T>>, dim: usize, lanes: usize) -> Shared<f32> {
    let params = layernorm_gamma_beta();
    // SAFETY: i < dim ≤ MAX_REGISTER_DIM: inside γ, β and the shared array's halves.
    block_stride(dim, |i| unsafe {
        let slot = param_slot(lanes, i, dim);
        params.store(slot, gamma.load(i).to_f32());
        if let Some(beta) = beta {
            params.store(MAX_REGISTER_DIM + slot, beta.load(i).to_f32());
        }
    });
    sync_threads();
    params
}

/// Where γ's element i lies in shared memory for rows read in packs of L = `lanes`: lane j of
/// every pack together (j·dim/L + i/L), so that the lanes of a warp, reading lane j of
/// consecutive packs, read consecutive words (no bank conflicts; the staging stores, once per
/// block, may conflict instead); i itself for L = 1.
#[inline(always)]
fn param_slot(lanes: usize, i: usize, dim: usize) -> usize {
    i % lanes * (dim / lanes) + i / lanes
}

/// Calls `f(k, i)` for this lane's elements of a row read in packs of L = `lanes` (a constant
/// dividing dim): pack p = lane + 32·q holds elements i = p·L + j < dim, held at k = q·L + j <
/// ROW_VALUES (for L = 1, i = lane + 32·k). Unrolled ([`unrolled`]) so that arrays indexed by k stay in registers. The
/// bound is tested as 32·q·L < dim − lane·L, one register against constants, with the lane read
/// afresh ([`lane_here`]): the tests are made where they are used, not held across the row loop
/// (149 registers instead of 127 in the backward kernel).
#[inline(always)]
fn lane_values(lanes: usize, dim: usize, mut f: impl FnMut(usize, usize)) {
    let lane = lane_here();
    let left = dim.saturating_sub(lane * lanes) as u32;
    unrolled::<ROW_VALUES>(|k| {
        let (q, j) = (k / lanes, k % lanes);
        if ((q * WARP * lanes) as u32) < left {
            f(k, (lane + q * WARP) * lanes + j);
        }
    });
}

/// v[k] = x[base + i] widened, for this lane's (k, i) of [`lane_values`]: one P access per pack.
///
/// # Safety
/// `x` holds base + dim elements; P's lanes divide dim and base; x starts on a P boundary.
#[inline(always)]
unsafe fn load_values<T: Element, P: Pack<Element = T>>(
    x: Global<T>,
    base: usize,
    dim: usize,
    v: &mut [f32; ROW_VALUES],
) {
    let packs = x.cast::<P>();
    lane_values(P::LANES, dim, |k, i| {
        if k % P::LANES == 0 {
            // SAFETY: base + i < base + dim, the first element of a pack.
            let pack = unsafe { packs.load((base + i) / P::LANES) };
            unrolled::<MAX_LANES>(|j| {
                if j < P::LANES {
                    v[k + j] = pack.lane(j).to_f32();
                }
            });
        }
    });
}

/// y[base + i] = value(k, i) rounded to T, for this lane's (k, i) of [`lane_values`]: one P access
/// per pack.
///
/// # Safety
/// As `load_values`, for y.
#[inline(always)]
unsafe fn store_values<T: Element, P: Pack<Element = T>>(
    y: GlobalMut<T>,
    base: usize,
    dim: usize,
    mut value: impl FnMut(usize, usize) -> f32,
) {
    let packs = y.cast::<P>();
    lane_values(P::LANES, dim, |k, i| {
        if k % P::LANES == 0 {
            let mut pack = P::splat(T::ZERO);
            unrolled::<MAX_LANES>(|j| {
                if j < P::LANES {
                    pack.set_lane(j, T::from_f32(value(k + j, i + j)));
                }
            });
            // SAFETY: base + i < base + dim, the first element of a pack.
            unsafe { packs.store((base + i) / P::LANES, pack) };
        }
    });
}

/// The rest of the forward pass over one row held in registers (`v`, this lane's values in packs
/// P; `partial`, their sum in order): the variance, rstd, y and the statistics.
///
/// # Safety
/// `y` holds rows·dim elements, `mean` and `rstd` rows; `params` holds γ and β (stage_params
/// for P); row < rows; dim ≤ MAX_REGISTER_DIM; y as `store_values` needs for P. The whole warp
/// calls it (shuffles).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn normalize_registers<T: Element, P: Pack<Element = T>>(
    y: GlobalMut<T>,
    mean: GlobalMut<f32>,
    rstd: GlobalMut<f32>,
    params: Shared<f32>,
    row: usize,
    dim: usize,
    v: &[f32; ROW_VALUES],
    partial: f32,
) {
    let mu = warp_reduce(partial, add) / dim as f32;
    let mut q = 0.0f32;
    lane_values(P::LANES, dim, |k, _| {
        let d = v[k] - mu;
        q += d * d;
    });
    let var = warp_reduce(q, add) / dim as f32;
    let s = 1.0 / sqrt(var + EPS);
    // SAFETY: the row lies inside y; slots < dim ≤ MAX_REGISTER_DIM, inside both halves of params.
    unsafe {
        store_values::<T, P>(y, row * dim, dim, |k, i| {
            let slot = param_slot(P::LANES, i, dim);
            (v[k] - mu) * s * params.load(slot) + params.load(MAX_REGISTER_DIM + slot)
        })
    };
    if lane() == 0 {
        // SAFETY: row < rows.
        unsafe {
            mean.store(row, mu);
            rstd.store(row, s);
        }
    }
}

/// The multi-pass forward over one row longer than MAX_REGISTER_DIM, `x(i)` its value i,
/// `partial` this lane's part of the row sum: the variance, rstd, y and the statistics.
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
    lane_stride(dim, |i| {
        let d = x(i) - mu;
        q += d * d;
    });
    let var = warp_reduce(q, add) / dim as f32;
    let s = 1.0 / sqrt(var + EPS);
    let base = row * dim;
    // SAFETY: base + i < rows·dim and i < dim (the caller's sizes).
    lane_stride(dim, |i| unsafe {
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

/// Whether rows of dim elements of views starting `offsets` elements into their sectors go in
/// T's 16-byte vectors: dim a whole number of them, every view on a vector boundary.
#[inline(always)]
fn in_vectors<T: Element, const N: usize>(dim: usize, offsets: [usize; N]) -> bool {
    dim.is_multiple_of(<T::Vector as Pack>::LANES) && offsets.iter().all(|&o| starts_pack::<T::Vector>(o))
}

/// `forward` over rows held in registers, read and written in packs P.
///
/// # Safety
/// `forward`'s contract; dim ≤ MAX_REGISTER_DIM; P's lanes divide dim, x and y start on a P
/// boundary.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn forward_registers<T: Element, P: Pack<Element = T>>(
    y: GlobalMut<T>,
    mean: GlobalMut<f32>,
    rstd: GlobalMut<f32>,
    x: Global<T>,
    gamma: Global<T>,
    beta: Global<T>,
    rows: u32,
    dim: usize,
) {
    // SAFETY: gamma and beta hold dim ≤ MAX_REGISTER_DIM elements, P's lanes divide dim.
    let params = unsafe { stage_params(gamma, Some(beta), dim, P::LANES) };
    warp_rows(rows as usize, |row| {
        // All loads first, then the sum (in the same order): the loads are in flight together.
        let mut v = [0.0f32; ROW_VALUES];
        // SAFETY: row < rows: the row lies inside x, the caller's sizes.
        unsafe { load_values::<T, P>(x, row * dim, dim, &mut v) };
        let mut partial = 0.0f32;
        lane_values(P::LANES, dim, |k, _| partial += v[k]);
        // SAFETY: the caller's sizes; row < rows; the whole warp takes the row.
        unsafe { normalize_registers::<T, P>(y, mean, rstd, params, row, dim, &v, partial) };
    });
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
    if dim <= MAX_REGISTER_DIM {
        // SAFETY: the caller's contract; vectors where in_vectors allows them.
        unsafe {
            if in_vectors::<T, 2>(dim, [y.sector_offset(), x.sector_offset()]) {
                forward_registers::<T, T::Vector>(y, mean, rstd, x, gamma, beta, rows, dim)
            } else {
                forward_registers::<T, T>(y, mean, rstd, x, gamma, beta, rows, dim)
            }
        }
        return;
    }
    warp_rows(rows as usize, |row| {
        let base = row * dim;
        // SAFETY: row < rows and i < dim: base + i < rows·dim, the caller's sizes.
        let x = |i: usize| unsafe { x.load(base + i) }.to_f32();
        let mut partial = 0.0f32;
        lane_stride(dim, |i| partial += x(i));
        // SAFETY: the caller's sizes; row < rows; the whole warp takes the row.
        unsafe { normalize_row(y, mean, rstd, gamma, beta, row, dim, partial, x) };
    });
}

/// `add_forward` over rows held in registers, read and written in packs P.
///
/// # Safety
/// `add_forward`'s contract; dim ≤ MAX_REGISTER_DIM; P's lanes divide dim, sum, y, a and b
/// start on a P boundary.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn add_forward_registers<T: Element, P: Pack<Element = T>>(
    sum: GlobalMut<T>,
    y: GlobalMut<T>,
    mean: GlobalMut<f32>,
    rstd: GlobalMut<f32>,
    a: Global<T>,
    b: Global<T>,
    gamma: Global<T>,
    beta: Global<T>,
    rows: u32,
    dim: usize,
) {
    // SAFETY: gamma and beta hold dim ≤ MAX_REGISTER_DIM elements, P's lanes divide dim.
    let params = unsafe { stage_params(gamma, Some(beta), dim, P::LANES) };
    warp_rows(rows as usize, |row| {
        let base = row * dim;
        // All loads first (in flight together), then the sums rounded to T (the residual stream
        // as stored) and the row sum, then the stores.
        let (mut v, mut w) = ([0.0f32; ROW_VALUES], [0.0f32; ROW_VALUES]);
        // SAFETY: row < rows: the row lies inside a, b and sum, the caller's sizes.
        unsafe {
            load_values::<T, P>(a, base, dim, &mut v);
            load_values::<T, P>(b, base, dim, &mut w);
        }
        let mut partial = 0.0f32;
        lane_values(P::LANES, dim, |k, _| {
            v[k] = T::from_f32(v[k] + w[k]).to_f32();
            partial += v[k];
        });
        // SAFETY: as above; v holds T values, stored exactly.
        unsafe { store_values::<T, P>(sum, base, dim, |k, _| v[k]) };
        // SAFETY: the caller's sizes; row < rows; the whole warp takes the row.
        unsafe { normalize_registers::<T, P>(y, mean, rstd, params, row, dim, &v, partial) };
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
    if dim <= MAX_REGISTER_DIM {
        let offsets = [sum.sector_offset(), y.sector_offset(), a.sector_offset(), b.sector_offset()];
        // SAFETY: the caller's contract; vectors where in_vectors allows them.
        unsafe {
            if in_vectors::<T, 4>(dim, offsets) {
                add_forward_registers::<T, T::Vector>(sum, y, mean, rstd, a, b, gamma, beta, rows, dim)
            } else {
                add_forward_registers::<T, T>(sum, y, mean, rstd, a, b, gamma, beta, rows, dim)
            }
        }
        return;
    }
    // sum[at] = a + b rounded to T (the sum of the loaded a and b); returns the stored value,
    // widened.
    // SAFETY: every call passes at = row·dim + i < rows·dim (row < rows, i < dim).
    let residual = |at: usize, a: f32, b: f32| unsafe {
        let v = T::from_f32(a + b);
        sum.store(at, v);
        v.to_f32()
    };
    warp_rows(rows as usize, |row| {
        let base = row * dim;
        let mut partial = 0.0f32;
        // SAFETY: base + i < rows·dim, the caller's sizes.
        lane_stride(dim, |i| {
            partial += residual(base + i, unsafe { a.load(base + i) }.to_f32(), unsafe { b.load(base + i) }.to_f32())
        });
        // SAFETY: as above; the lane reads back only the values it wrote.
        let x = |i: usize| unsafe { sum.load(base + i) }.to_f32();
        // SAFETY: the caller's sizes; row < rows; the whole warp takes the row.
        unsafe { normalize_row(y, mean, rstd, gamma, beta, row, dim, partial, x) };
    });
}

/// `backward` over rows held in registers, read and written in packs P.
///
/// # Safety
/// `backward`'s contract; dim ≤ MAX_REGISTER_DIM; P's lanes divide dim, dx, dy and x start on a
/// P boundary.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_registers<T: Element, P: Pack<Element = T>>(
    dx: GlobalMut<T>,
    dy: Global<T>,
    x: Global<T>,
    mean: Global<f32>,
    rstd: Global<f32>,
    gamma: Global<T>,
    rows: u32,
    dim: usize,
    accumulate: u32,
) {
    // SAFETY: gamma holds dim ≤ MAX_REGISTER_DIM elements, P's lanes divide dim; no β.
    let params = unsafe { stage_params(gamma, None, dim, P::LANES) };
    warp_rows(rows as usize, |row| {
        let base = row * dim;
        // SAFETY: row < rows, the length of mean and rstd.
        let (mu, s) = unsafe { (mean.load(row), rstd.load(row)) };
        // All loads first (in flight together); g = dy·γ and x − mean then replace them.
        let (mut g, mut xm) = ([0.0f32; ROW_VALUES], [0.0f32; ROW_VALUES]);
        // SAFETY: row < rows: the row lies inside dy and x, the caller's sizes.
        unsafe {
            load_values::<T, P>(dy, base, dim, &mut g);
            load_values::<T, P>(x, base, dim, &mut xm);
        }
        let (mut sum_g, mut sum_gx) = (0.0f32, 0.0f32);
        lane_values(P::LANES, dim, |k, i| {
            // SAFETY: slots < dim ≤ MAX_REGISTER_DIM, inside params' γ.
            g[k] *= unsafe { params.load(param_slot(P::LANES, i, dim)) };
            xm[k] -= mu;
            sum_g += g[k];
            sum_gx += g[k] * xm[k] * s;
        });
        let mean_g = warp_reduce(sum_g, add) / dim as f32;
        let mean_gx = warp_reduce(sum_gx, add) / dim as f32;
        // d (in xm), then with `accumulate` the old dx (in g, loads in flight together). The
        // arithmetic runs on every k (values past dim are never stored): no selects.
        unrolled::<ROW_VALUES>(|k| {
            let xhat = xm[k] * s;
            xm[k] = s * (g[k] - mean_g - xhat * mean_gx);
        });
        if accumulate != 0 {
            // SAFETY: as above, for dx.
            unsafe { load_values::<T, P>(dx.read_only(), base, dim, &mut g) };
            unrolled::<ROW_VALUES>(|k| xm[k] += g[k]);
        }
        // SAFETY: as above.
        unsafe { store_values::<T, P>(dx, base, dim, |k, _| xm[k]) };
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
    if dim <= MAX_REGISTER_DIM {
        // SAFETY: the caller's contract; vectors where in_vectors allows them.
        unsafe {
            if in_vectors::<T, 3>(dim, [dx.sector_offset(), dy.sector_offset(), x.sector_offset()]) {
                backward_registers::<T, T::Vector>(dx, dy, x, mean, rstd, gamma, rows, dim, accumulate)
            } else {
                backward_registers::<T, T>(dx, dy, x, mean, rstd, gamma, rows, dim, accumulate)
            }
        }
        return;
    }
    // The new dx from its increment d: written, or added to the old value.
    // SAFETY: every call passes at = row·dim + i < rows·dim (row < rows, i < dim).
    let write = |at: usize, d: f32| unsafe {
        dx.store(at, T::from_f32(if accumulate != 0 { dx.load(at).to_f32() + d } else { d }))
    };
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
        lane_stride(dim, |i| {
            let g = dy(i) * gamma(i);
            sum_g += g;
            sum_gx += g * (x(i) - mu) * s;
        });
        let mean_g = warp_reduce(sum_g, add) / dim as f32;
        let mean_gx = warp_reduce(sum_gx, add) / dim as f32;
        lane_stride(dim, |i| {
            let xhat = (x(i) - mu) * s;
            write(base + i, s * (dy(i) * gamma(i) - mean_g - xhat * mean_gx));
        });
    });
}

/// dγ_i += Σ_rows dy·x̂, dβ_i += Σ_rows dy, x̂ = (x − mean)·rstd; deterministic (no atomics).
/// Block b owns columns 32·b … 32·b + 31; dy and x in T's 16-byte vectors where [`in_vectors`]
/// allows them, else one element a thread.
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
    // SAFETY: the caller's contract; vectors where in_vectors allows them.
    unsafe {
        if in_vectors::<T, 2>(dim, [dy.sector_offset(), x.sector_offset()]) {
            param_grads_packs::<T, T::Vector>(dgamma, dbeta, dy, x, mean, rstd, rows, dim)
        } else {
            param_grads_packs::<T, T>(dgamma, dbeta, dy, x, mean, rstd, rows, dim)
        }
    }
}

/// `param_grads` with dy and x read in packs P of L lanes: thread t takes the pack of columns
/// 32·b + L·(t mod 32/L) … and row-lane t / (32/L) of 8·L, rows r, r + 8·L, …; its L partials of
/// each sum are added over the warp's L row-lanes by a butterfly, then over the 8 warps in shared
/// memory in a fixed order. L = 1 is the element path (a warp: one row's 32 columns).
///
/// # Safety
/// `param_grads`' contract; P's lanes divide dim, dy and x start on a P boundary.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn param_grads_packs<T: Element, P: Pack<Element = T>>(
    dgamma: GlobalMut<f32>,
    dbeta: GlobalMut<f32>,
    dy: Global<T>,
    x: Global<T>,
    mean: Global<f32>,
    rstd: Global<f32>,
    rows: usize,
    dim: usize,
) {
    const CHUNK: usize = THREADS as usize;
    const WARPS: usize = THREADS as usize / WARP;
    let per_row = WARP / P::LANES; // threads across a row's 32 columns
    let row_lanes = THREADS as usize / per_row;
    let (c, r) = (thread_x() % per_row, thread_x() / per_row);
    let col = block_x() * WARP + c * P::LANES; // the pack's first column
    let (dy_packs, x_packs) = (dy.cast::<P>(), x.cast::<P>());
    let (mut g, mut b) = ([0.0f32; MAX_LANES], [0.0f32; MAX_LANES]);
    let stats = layernorm_row_stats();
    let mut first = 0;
    while first < rows {
        // The chunk's mean and rstd, one coalesced load each; row-lane r then takes the chunk's
        // rows r, r + 8·L, …: with CHUNK a multiple of 8·L, the same rows of the whole matrix.
        let chunk = CHUNK.min(rows - first);
        if thread_x() < chunk {
            // SAFETY: first + thread < rows; thread < CHUNK, the halves of the shared array.
            unsafe {
                stats.store(thread_x(), mean.load(first + thread_x()));
                stats.store(CHUNK + thread_x(), rstd.load(first + thread_x()));
            }
        }
        sync_threads();
        if col < dim {
            let mut k = r;
            while k < chunk {
                let at = ((first + k) * dim + col) / P::LANES;
                // SAFETY: first + k < rows and col < dim, col + L ≤ dim (L divides col and dim):
                // a whole pack inside the views, the caller's sizes; k < chunk, written before
                // the barrier.
                unsafe {
                    let (d, v) = (dy_packs.load(at), x_packs.load(at));
                    let (m, s) = (stats.load(k), stats.load(CHUNK + k));
                    unrolled::<MAX_LANES>(|j| {
                        if j < P::LANES {
                            let d = d.lane(j).to_f32();
                            g[j] += d * ((v.lane(j).to_f32() - m) * s);
                            b[j] += d;
                        }
                    });
                }
                k += row_lanes;
            }
        }
        sync_threads(); // the next chunk overwrites the statistics
        first += CHUNK;
    }
    // The warp's L row-lanes of each column (lanes c, c + 32/L, …) by a butterfly; lanes below
    // 32/L then hold the warp's sums of their columns.
    unrolled::<MAX_LANES>(|j| {
        if j < P::LANES {
            g[j] = warp_reduce_strided(g[j], per_row, add);
            b[j] = warp_reduce_strided(b[j], per_row, add);
        }
    });
    let partials = layernorm_param_partials();
    if lane() < per_row {
        unrolled::<MAX_LANES>(|j| {
            if j < P::LANES {
                let at = warp() * WARP + c * P::LANES + j;
                // SAFETY: at < WARPS·32 = THREADS, the array holds 2·THREADS floats.
                unsafe {
                    partials.store(at, g[j]);
                    partials.store(THREADS as usize + at, b[j]);
                }
            }
        });
    }
    sync_threads();
    let col = block_x() * WARP + thread_x();
    if thread_x() < WARP && col < dim {
        let (mut g, mut b) = (0.0f32, 0.0f32);
        for w in 0..WARPS {
            // SAFETY: w·32 + thread < THREADS; every warp stored its partials before the barrier.
            unsafe {
                g += partials.load(w * WARP + thread_x());
                b += partials.load(THREADS as usize + w * WARP + thread_x());
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
