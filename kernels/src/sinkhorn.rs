//! Sinkhorn for PGS (pgs-spec.md step 4), pure helpers shared by the CPU reference and the GPU
//! kernel, sequential in index order with the portable `exp`/`ln`, so both devices agree bit for
//! bit.
//!
//! `paper`: entropic OT between n_c candidates (mass 1/n_c) and L patches (mass 1/L) with kernel
//! exp(S/ε), in the log domain (POT's `sinkhorn_log` recursion): starting from f = g = 0,
//!   g_j = ln(1/L)   − LSE_c(S[c,j]/ε + f_c)      (columns first, as POT)
//!   f_c = ln(1/n_c) − LSE_j(S[c,j]/ε + g_j)
//! until the column-marginal L1 error Σ_j |Σ_c Π[c,j] − 1/L| < tol, Π = exp(S/ε + f + g).
//!
//! `reference`: the public code's Sinkhorn–Knopp scaling of the signed matrix (no kernel, unit
//! marginals), see [`sk_converged`].

use crate::math::{exp, ln};

/// The paper mode's defaults (spec step 4).
pub const EPSILON: f32 = 0.05;
pub const MAX_ITERATIONS: usize = 50;
pub const TOLERANCE: f32 = 1e-4;

/// The reference mode's constants: iteration cap, tolerance and denominator stabilizer.
pub const SK_MAX_ITERATIONS: usize = 50;
pub const SK_EPS: f32 = 1e-3;

/// ln Σ_k e^{x_k}, sequential, shifted by the maximum. −∞ when every x_k is −∞.
#[inline(always)]
pub fn log_sum_exp(n: usize, x: impl Fn(usize) -> f32) -> f32 {
    let mut max = f32::NEG_INFINITY;
    for k in 0..n {
        max = max.max(x(k));
    }
    if max == f32::NEG_INFINITY {
        return max;
    }
    let mut s = 0.0f32;
    for k in 0..n {
        s += exp(x(k) - max);
    }
    max + ln(s)
}

/// One plan entry Π[c,j] = exp(S[c,j]/ε + f_c + g_j).
#[inline(always)]
pub fn plan(s_over_eps: f32, f: f32, g: f32) -> f32 {
    exp(s_over_eps + f + g)
}

/// Whether the reference mode's scaling has converged: every column sum and row sum within
/// `SK_EPS` of 1.
#[inline(always)]
pub fn sk_converged(n: usize, col_sum: impl Fn(usize) -> f32, row_sum: impl Fn(usize) -> f32) -> bool {
    let mut ok = true;
    for k in 0..n {
        ok &= (col_sum(k) - 1.0).abs() <= SK_EPS && (row_sum(k) - 1.0).abs() <= SK_EPS;
    }
    ok
}

/// One reference-mode scaling of an entry: by its column sum, then by its row sum (the row sum
/// taken before the column step, as the public code does).
#[inline(always)]
pub fn sk_scale(x: f32, col_sum: f32, row_sum: f32) -> f32 {
    (x / (col_sum + SK_EPS)) / (row_sum + SK_EPS)
}

/// Threads per block of the Sinkhorn kernels (one block per image).
pub const THREADS: u32 = 256;

/// Row stride of S/ε in shared memory: odd, so that a thread per row (the f update) reads
/// without bank conflicts.
const fn log_stride(cols: usize) -> usize {
    cols | 1
}

/// Dynamic shared memory of `pgs_sinkhorn_log` for an R × C problem: S/ε, f, g, the per-column
/// errors and the stop flag.
pub const fn log_shared_bytes(rows: usize, cols: usize) -> usize {
    4 * (rows * log_stride(cols) + rows + 2 * cols + 1)
}

// Kernels, one block per image, every iteration on chip (no host round trip):
// - `pgs_sinkhorn_log`: S/ε [R, C] in shared memory (odd row stride); per iteration one thread per column (g),
//   one per row (f), one per column (its marginal error), then thread 0 sums the errors in
//   order and decides. Reads 4·R·C bytes, writes the balanced Ŝ = R·C·Π (4·R·C bytes).
// - `pgs_sinkhorn_knopp_signed`: the `reference` scaling of an L×L matrix in a global scratch
//   buffer (L² floats do not fit in shared memory for every L); per round one thread per column
//   and per row sums, thread 0 checks, every thread scales. About 3·50·4·L² bytes of L2 traffic.

use crate::hw::{Global, GlobalMut, block_stride, block_x, dynamic_shared, sync_threads, thread_x};
use crate::kernel;

/// Analytic minimum of global traffic of `pgs_sinkhorn_log`: S read once, Ŝ written once.
pub const fn log_min_bytes(n: usize, rows: usize, cols: usize) -> usize {
    n * (8 * rows * cols + 4)
}

kernel! {
    /// # Safety
    /// `s`, `balanced` [N, rows, cols]; `iterations` [N]; launch with one block per image and
    /// `log_shared_bytes(rows, cols)` bytes of dynamic shared memory.
    pub fn pgs_sinkhorn_log(
        s: Global<f32>,
        balanced: GlobalMut<f32>,
        iterations: GlobalMut<u32>,
        rows: u32,
        cols: u32,
        epsilon: f32,
        max_iterations: u32,
        tolerance: f32,
    ) {
        let (rows, cols) = (rows as usize, cols as usize);
        let (size, stride) = (rows * cols, log_stride(cols));
        unsafe {
            // m[c·stride + j] = S[c, j]/ε
            let m = dynamic_shared::<f32>();
            let f = m.offset(rows * stride);
            let g = f.offset(rows);
            let column_error = g.offset(cols);
            let stop = column_error.offset(cols).cast::<u32>();
            let s = s.offset(block_x() * size);
            block_stride(size, |i| m.store(i / cols * stride + i % cols, s.load(i) / epsilon));
            block_stride(rows, |c| f.store(c, 0.0));
            sync_threads();
            let (log_a, log_b) = (-ln(rows as f32), -ln(cols as f32));
            let b = 1.0 / cols as f32;
            let mut done = 0u32;
            while done < max_iterations {
                block_stride(cols, |j| g.store(j, log_b - log_sum_exp(rows, |c| m.load(c * stride + j) + f.load(c))));
                sync_threads();
                block_stride(rows, |c| f.store(c, log_a - log_sum_exp(cols, |j| m.load(c * stride + j) + g.load(j))));
                sync_threads();
                done += 1;
                block_stride(cols, |j| {
                    let mut mass = 0.0f32;
                    for c in 0..rows {
                        mass += plan(m.load(c * stride + j), f.load(c), g.load(j));
                    }
                    column_error.store(j, (mass - b).abs());
                });
                sync_threads();
                if thread_x() == 0 {
                    let mut error = 0.0f32;
                    for j in 0..cols {
                        error += column_error.load(j);
                    }
                    stop.store(0, (error < tolerance) as u32);
                }
                sync_threads();
                if stop.load(0) != 0 {
                    break;
                }
            }
            let scale = size as f32;
            let out = balanced.offset(block_x() * size);
            block_stride(size, |i| {
                let (c, j) = (i / cols, i % cols);
                out.store(i, scale * plan(m.load(c * stride + j), f.load(c), g.load(j)));
            });
            if thread_x() == 0 {
                iterations.store(block_x(), done);
            }
        }
    }
}

kernel! {
    /// S ← S + SK(S) for each image's n×n matrix.
    ///
    /// # Safety
    /// `s`, `scratch` [N, n, n]; `sums` [N, 2n + 1]; one block per image.
    pub fn pgs_sinkhorn_knopp_signed(s: GlobalMut<f32>, scratch: GlobalMut<f32>, sums: GlobalMut<f32>, n: u32) {
        let n = n as usize;
        unsafe {
            let s = s.offset(block_x() * n * n);
            let x = scratch.offset(block_x() * n * n);
            let col = sums.offset(block_x() * (2 * n + 1));
            let row = col.offset(n);
            let converged = row.offset(n).cast::<u32>();
            block_stride(n * n, |i| x.store(i, s.load(i)));
            sync_threads();
            for _ in 0..SK_MAX_ITERATIONS {
                block_stride(n, |j| {
                    let mut acc = 0.0f32;
                    for i in 0..n {
                        acc += x.load(i * n + j);
                    }
                    col.store(j, acc);
                });
                block_stride(n, |i| {
                    let mut acc = 0.0f32;
                    for j in 0..n {
                        acc += x.load(i * n + j);
                    }
                    row.store(i, acc);
                });
                sync_threads();
                if thread_x() == 0 {
                    converged.store(0, sk_converged(n, |k| col.load(k), |k| row.load(k)) as u32);
                }
                sync_threads();
                if converged.load(0) != 0 {
                    break;
                }
                block_stride(n * n, |i| x.store(i, sk_scale(x.load(i), col.load(i % n), row.load(i / n))));
                sync_threads();
            }
            block_stride(n * n, |i| s.store(i, s.load(i) + x.load(i)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_is_stable_and_exact_on_simple_cases() {
        assert_eq!(log_sum_exp(1, |_| 3.0), 3.0);
        let two = log_sum_exp(2, |_| 1000.0);
        assert!((two - (1000.0 + core::f32::consts::LN_2)).abs() < 1e-4, "{two}");
        assert_eq!(log_sum_exp(3, |_| f32::NEG_INFINITY), f32::NEG_INFINITY);
    }
}
