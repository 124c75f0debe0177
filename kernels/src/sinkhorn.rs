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
