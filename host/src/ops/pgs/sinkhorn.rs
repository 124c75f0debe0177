//! Sinkhorn on the CPU (pgs-spec.md step 4): the `paper` mode's log-domain entropic OT and the
//! `reference` mode's scaling of the signed matrix. Helpers and constants are those of
//! `clip_pgs_kernels::sinkhorn`, shared with the GPU kernel.

use clip_pgs_kernels::math::ln;
use clip_pgs_kernels::sinkhorn::{SK_MAX_ITERATIONS, log_sum_exp, plan, sk_converged, sk_scale};

/// The result of [`sinkhorn_log`].
pub struct Transport {
    /// Π [rows, cols].
    pub plan: Vec<f32>,
    /// Iterations run (one = a column then a row update).
    pub iterations: usize,
    /// Column-marginal L1 error Σ_j |Σ_c Π[c,j] − 1/cols| after the last iteration.
    pub error: f32,
}

/// Entropic OT between `rows` sources of mass 1/rows and `cols` targets of mass 1/cols with
/// kernel exp(S/ε), log domain, POT's `sinkhorn_log` recursion (columns first). Stops after
/// `max_iterations` or once the column-marginal L1 error is below `tolerance`.
pub fn sinkhorn_log(
    s: &[f32],
    rows: usize,
    cols: usize,
    epsilon: f32,
    max_iterations: usize,
    tolerance: f32,
) -> Transport {
    let m: Vec<f32> = s.iter().map(|&v| v / epsilon).collect();
    let (log_a, log_b) = (-ln(rows as f32), -ln(cols as f32));
    let mut f = vec![0.0f32; rows];
    let mut g = vec![0.0f32; cols];
    let mut iterations = 0;
    let mut error = f32::INFINITY;
    while iterations < max_iterations {
        for j in 0..cols {
            g[j] = log_b - log_sum_exp(rows, |c| m[c * cols + j] + f[c]);
        }
        for c in 0..rows {
            f[c] = log_a - log_sum_exp(cols, |j| m[c * cols + j] + g[j]);
        }
        iterations += 1;
        error = column_error(&m, &f, &g, rows, cols);
        if error < tolerance {
            break;
        }
    }
    let plan = (0..rows * cols).map(|i| plan(m[i], f[i / cols], g[i % cols])).collect();
    Transport { plan, iterations, error }
}

/// Σ_j |Σ_c Π[c,j] − 1/cols|, sequential.
fn column_error(m: &[f32], f: &[f32], g: &[f32], rows: usize, cols: usize) -> f32 {
    let b = 1.0 / cols as f32;
    let mut error = 0.0f32;
    for j in 0..cols {
        let mut mass = 0.0f32;
        for c in 0..rows {
            mass += plan(m[c * cols + j], f[c], g[j]);
        }
        error += (mass - b).abs();
    }
    error
}

/// The `reference` mode's SK(S) for a square n×n matrix: up to 50 rounds of dividing columns by
/// (column sum + 1e-3) then rows by (row sum + 1e-3), both sums taken before the round; stops when
/// every sum is within 1e-3 of 1. The matrix is signed and SK may blow up: reproduced, not fixed.
pub fn sinkhorn_knopp_signed(s: &[f32], n: usize) -> Vec<f32> {
    let mut x = s.to_vec();
    let (mut col, mut row) = (vec![0.0f32; n], vec![0.0f32; n]);
    for _ in 0..SK_MAX_ITERATIONS {
        for j in 0..n {
            col[j] = (0..n).fold(0.0f32, |acc, i| acc + x[i * n + j]);
        }
        for i in 0..n {
            row[i] = (0..n).fold(0.0f32, |acc, j| acc + x[i * n + j]);
        }
        if sk_converged(n, |k| col[k], |k| row[k]) {
            break;
        }
        for (idx, v) in x.iter_mut().enumerate() {
            *v = sk_scale(*v, col[idx % n], row[idx / n]);
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converged_plan_has_the_uniform_marginals() {
        let (rows, cols) = (3, 7);
        let s: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 11) as f32 / 5.0) - 1.0).collect();
        let t = sinkhorn_log(&s, rows, cols, 0.05, 1000, 1e-6);
        assert!(t.error < 1e-6 && t.iterations < 1000, "error {} after {}", t.error, t.iterations);
        for c in 0..rows {
            let mass: f32 = t.plan[c * cols..(c + 1) * cols].iter().sum();
            assert!((mass - 1.0 / rows as f32).abs() < 1e-6, "row {c}: {mass}");
        }
        for j in 0..cols {
            let mass: f32 = (0..rows).map(|c| t.plan[c * cols + j]).sum();
            assert!((mass - 1.0 / cols as f32).abs() < 1e-6, "column {j}: {mass}");
        }
    }

    #[test]
    fn signed_knopp_leaves_a_balanced_matrix_alone() {
        let n = 4;
        let s = vec![0.25f32; n * n];
        assert_eq!(sinkhorn_knopp_signed(&s, n), s);
    }

    #[test]
    fn signed_knopp_with_stale_row_sums_settles_off_the_unit_marginals() {
        // The public code divides rows by sums taken before the column step; on this positive
        // matrix that settles where every sum is 1.4836 (NumPy gives the same), not 1.
        let n = 4;
        let s: Vec<f32> = (0..n * n).map(|i| 0.2 + (i % 5) as f32 * 0.1).collect();
        let x = sinkhorn_knopp_signed(&s, n);
        for i in 0..n {
            let row: f32 = x[i * n..(i + 1) * n].iter().sum();
            let col: f32 = (0..n).map(|r| x[r * n + i]).sum();
            assert!((row - 1.48362).abs() < 1e-4 && (col - 1.48362).abs() < 1e-4, "{row} {col}");
        }
    }
}
