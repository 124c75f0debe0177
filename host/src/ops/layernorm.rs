//! LayerNorm over the last dimension on the CPU (PyTorch, eps 1e-5):
//! y = (x − mean)·rstd·γ + β, rstd = 1/sqrt(var + eps) (biased variance).

use rayon::prelude::*;

pub const EPS: f32 = 1e-5;

/// Writes y and, for the backward pass, each row's mean and rstd.
pub fn layernorm_forward(
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dim: usize,
) {
    y.par_chunks_mut(dim).zip(x.par_chunks(dim)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(
        |((y, x), (m, r))| {
            let mu = x.iter().sum::<f32>() / dim as f32;
            let var = x.iter().map(|v| (v - mu) * (v - mu)).sum::<f32>() / dim as f32;
            let s = 1.0 / (var + EPS).sqrt();
            for i in 0..dim {
                y[i] = (x[i] - mu) * s * gamma[i] + beta[i];
            }
            (*m, *r) = (mu, s);
        },
    );
}

/// dx is overwritten; dγ and dβ accumulate.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    dim: usize,
) {
    for (row, (dy, x)) in dy.chunks(dim).zip(x.chunks(dim)).enumerate() {
        for i in 0..dim {
            let xhat = (x[i] - mean[row]) * rstd[row];
            dgamma[i] += dy[i] * xhat;
            dbeta[i] += dy[i];
        }
    }
    dx.par_chunks_mut(dim).zip(dy.par_chunks(dim).zip(x.par_chunks(dim))).enumerate().for_each(
        |(row, (dx, (dy, x)))| {
            let (mu, s) = (mean[row], rstd[row]);
            let (mut mean_g, mut mean_gx) = (0.0f32, 0.0f32);
            for i in 0..dim {
                let g = dy[i] * gamma[i];
                mean_g += g;
                mean_gx += g * (x[i] - mu) * s;
            }
            (mean_g, mean_gx) = (mean_g / dim as f32, mean_gx / dim as f32);
            for i in 0..dim {
                let xhat = (x[i] - mu) * s;
                dx[i] = s * (dy[i] * gamma[i] - mean_g - xhat * mean_gx);
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gradient, values};
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, dim) = (3, 6);
        let (x, gamma, beta, dy) = (values(rows * dim, 1), values(dim, 2), values(dim, 3), values(rows * dim, 4));
        let loss = |x: &[f32], g: &[f32], b: &[f32]| {
            let (mut y, mut m, mut r) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
            layernorm_forward(&mut y, &mut m, &mut r, x, g, b, dim);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f32>()
        };
        let (mut y, mut m, mut r) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
        layernorm_forward(&mut y, &mut m, &mut r, &x, &gamma, &beta, dim);
        let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; dim], vec![0.0; dim]);
        layernorm_backward(&mut dx, &mut dg, &mut db, &dy, &x, &m, &r, &gamma, dim);
        assert_gradient("dx", &dx, &x, |x| loss(x, &gamma, &beta));
        assert_gradient("dgamma", &dg, &gamma, |g| loss(&x, g, &beta));
        assert_gradient("dbeta", &db, &beta, |b| loss(&x, &gamma, b));
    }
}
