//! LayerNorm over the last dimension (PyTorch, eps 1e-5): y = (x − mean)·rstd·γ + β,
//! rstd = 1/sqrt(var + eps) (biased variance), with the residual add fused in front
//! (`add_layernorm_forward`: x = a + b is written and normalized in one pass) and behind
//! (`layernorm_backward` can add dx into the residual stream's gradient). x, y, γ, β and the
//! activation gradients are f32 or bf16 (`dtype::Activation`; bf16 on the GPU devices only);
//! mean, rstd, dγ and dβ are f32. CPU reference here, kernels in `kernels/src/layernorm.rs`
//! (CUDA and the emulator).

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

pub use clip_pgs_kernels::layernorm::EPS;
use clip_pgs_kernels::layernorm::{PARAM_COLUMNS, THREADS};

use super::check::OpCheck;
use super::dtype::Activation;
use crate::device::Device;
use crate::error::Result;
use crate::launch::grid_stride_config;
use crate::view::{View, ViewMut};

/// What the forward pass writes: y [rows, dim] and, for backward, each row's mean and rstd (f32).
pub struct NormOut<'a, T> {
    pub y: ViewMut<'a, T>,
    pub mean: ViewMut<'a, f32>,
    pub rstd: ViewMut<'a, f32>,
}

/// What backward reads of the forward pass: its input and statistics.
pub struct NormSaved<'a, T> {
    pub x: View<'a, T>,
    pub mean: View<'a, f32>,
    pub rstd: View<'a, f32>,
}

/// The checked host slices of one forward call.
type HostOut<'a> = (&'a mut [f32], &'a mut [f32], &'a mut [f32], &'a [f32], &'a [f32]);

/// The row count of x's `x_len` values; checks the sizes of the outputs, γ and β.
fn check_forward<T>(
    op: &OpCheck,
    out: &NormOut<T>,
    x_len: usize,
    gamma: &View<T>,
    beta: &View<T>,
    dim: usize,
) -> Result<usize> {
    if dim == 0 || !x_len.is_multiple_of(dim) {
        return Err(op.invalid(format!("x has {x_len} values, not a multiple of dim {dim}")));
    }
    let rows = x_len / dim;
    op.size("y", out.y.len(), x_len, || format!("[rows {rows}, dim {dim}]"))?;
    op.size("mean", out.mean.len(), rows, || format!("[rows {rows}]"))?;
    op.size("rstd", out.rstd.len(), rows, || format!("[rows {rows}]"))?;
    op.size("gamma", gamma.len(), dim, || format!("[dim {dim}]"))?;
    op.size("beta", beta.len(), dim, || format!("[dim {dim}]"))?;
    Ok(rows)
}

/// The host slices of a forward call on the CPU device (f32 only).
fn host_forward<'a, T: Activation>(
    op: &OpCheck,
    out: NormOut<'a, T>,
    gamma: View<'a, T>,
    beta: View<'a, T>,
) -> Result<HostOut<'a>> {
    Ok((
        op.cpu_f32_mut("y", out.y)?,
        op.cpu_mut("mean", out.mean)?,
        op.cpu_mut("rstd", out.rstd)?,
        op.cpu_f32("gamma", gamma)?,
        op.cpu_f32("beta", beta)?,
    ))
}

/// Rows and dim as a kernel's u32 counts: x's n = rows·dim values must be indexable with u32.
fn kernel_counts(op: &OpCheck, n: usize, dim: usize) -> Result<(u32, u32)> {
    if n > u32::MAX as usize {
        return Err(op.invalid(format!("x has {n} values, more than a kernel indexes (2³² − 1)")));
    }
    Ok(((n / dim) as u32, dim as u32))
}

/// The launch of the one-warp-per-row kernels: THREADS / 32 rows per block, grid-strided.
fn row_config(rows: u32) -> LaunchConfig {
    grid_stride_config(rows as usize * 32, THREADS)
}

fn cpu_forward((y, mean, rstd, gamma, beta): HostOut, x: &[f32], dim: usize) {
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

pub fn layernorm_forward<T: Activation>(
    device: &Device,
    out: NormOut<T>,
    x: View<T>,
    gamma: View<T>,
    beta: View<T>,
    dim: usize,
) -> Result<()> {
    let op = OpCheck::new("layernorm_forward", device);
    check_forward(&op, &out, x.len(), &gamma, &beta, dim)?;
    if !matches!(device, Device::Cpu) {
        let (rows, dim) = kernel_counts(&op, x.len(), dim)?;
        let (y, mean, rstd) = (op.gpu_mut("y", out.y)?, op.gpu_mut("mean", out.mean)?, op.gpu_mut("rstd", out.rstd)?);
        let args = (y, mean, rstd, op.gpu("x", x)?, op.gpu("gamma", gamma)?, op.gpu("beta", beta)?, rows, dim);
        // SAFETY: y and x hold rows·dim values, mean and rstd rows, gamma and beta dim ≥ 1
        // (checked above); THREADS is a multiple of 32.
        return unsafe { device.launch(&T::LAYERNORM_FORWARD, row_config(rows), args) };
    }
    let (host, x) = (host_forward(&op, out, gamma, beta)?, op.cpu_f32("x", x)?);
    cpu_forward(host, x, dim);
    Ok(())
}

/// sum = a + b (the residual stream), then `out` = LayerNorm(sum).
#[allow(clippy::too_many_arguments)]
pub fn add_layernorm_forward<T: Activation>(
    device: &Device,
    sum: ViewMut<T>,
    out: NormOut<T>,
    a: View<T>,
    b: View<T>,
    gamma: View<T>,
    beta: View<T>,
    dim: usize,
) -> Result<()> {
    let op = OpCheck::new("add_layernorm_forward", device);
    op.size("b", b.len(), a.len(), || "a's size".into())?;
    op.size("sum", sum.len(), a.len(), || "a's size".into())?;
    check_forward(&op, &out, a.len(), &gamma, &beta, dim)?;
    if !matches!(device, Device::Cpu) {
        let (rows, dim) = kernel_counts(&op, a.len(), dim)?;
        let (y, mean, rstd) = (op.gpu_mut("y", out.y)?, op.gpu_mut("mean", out.mean)?, op.gpu_mut("rstd", out.rstd)?);
        let args = (
            op.gpu_mut("sum", sum)?,
            y,
            mean,
            rstd,
            op.gpu("a", a)?,
            op.gpu("b", b)?,
            op.gpu("gamma", gamma)?,
            op.gpu("beta", beta)?,
            rows,
            dim,
        );
        // SAFETY: sum, y, a and b hold rows·dim values, mean and rstd rows, gamma and beta dim ≥
        // 1 (checked above); THREADS is a multiple of 32.
        return unsafe { device.launch(&T::ADD_LAYERNORM_FORWARD, row_config(rows), args) };
    }
    let host = host_forward(&op, out, gamma, beta)?;
    let (sum, a, b) = (op.cpu_f32_mut("sum", sum)?, op.cpu_f32("a", a)?, op.cpu_f32("b", b)?);
    sum.par_iter_mut().with_min_len(1 << 12).zip(a.par_iter().zip(b.par_iter())).for_each(|(s, (a, b))| *s = a + b);
    cpu_forward(host, sum, dim);
    Ok(())
}

/// dx is overwritten, or with `accumulate` added to (the residual stream's gradient); dγ and dβ
/// accumulate.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Activation>(
    device: &Device,
    dx: ViewMut<T>,
    dgamma: ViewMut<f32>,
    dbeta: ViewMut<f32>,
    dy: View<T>,
    saved: NormSaved<T>,
    gamma: View<T>,
    dim: usize,
    accumulate: bool,
) -> Result<()> {
    let op = OpCheck::new("layernorm_backward", device);
    let n = saved.x.len();
    if dim == 0 || !n.is_multiple_of(dim) {
        return Err(op.invalid(format!("x has {n} values, not a multiple of dim {dim}")));
    }
    let rows = n / dim;
    let shape = || format!("[rows {rows}, dim {dim}]");
    op.size("dy", dy.len(), n, shape)?;
    op.size("dx", dx.len(), n, shape)?;
    op.size("mean", saved.mean.len(), rows, || format!("[rows {rows}]"))?;
    op.size("rstd", saved.rstd.len(), rows, || format!("[rows {rows}]"))?;
    for (name, len) in [("gamma", gamma.len()), ("dgamma", dgamma.len()), ("dbeta", dbeta.len())] {
        op.size(name, len, dim, || format!("[dim {dim}]"))?;
    }
    if !matches!(device, Device::Cpu) {
        let (rows, dim) = kernel_counts(&op, n, dim)?;
        let (dy, x) = (op.gpu("dy", dy)?, op.gpu("x", saved.x)?);
        let (mean, rstd) = (op.gpu("mean", saved.mean)?, op.gpu("rstd", saved.rstd)?);
        let (dgamma, dbeta) = (op.gpu_mut("dgamma", dgamma)?, op.gpu_mut("dbeta", dbeta)?);
        let args = (op.gpu_mut("dx", dx)?, dy, x, mean, rstd, op.gpu("gamma", gamma)?, rows, dim, accumulate as u32);
        if rows == 0 {
            return Ok(()); // as on the CPU: nothing to add, dγ and dβ untouched to the bit
        }
        // SAFETY: dx, dy and x hold rows·dim values, mean and rstd rows, gamma dim ≥ 1 (checked
        // above); THREADS is a multiple of 32.
        unsafe { device.launch(&T::LAYERNORM_BACKWARD, row_config(rows), args)? };
        let blocks = dim.div_ceil(PARAM_COLUMNS);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: dy and x hold rows·dim values, mean and rstd rows, dgamma and dbeta dim (checked
        // above); THREADS threads per block and ⌈dim / 32⌉ blocks.
        return unsafe { device.launch(&T::LAYERNORM_PARAM_GRADS, cfg, (dgamma, dbeta, dy, x, mean, rstd, rows, dim)) };
    }
    let (dx, dgamma, dbeta) = (op.cpu_f32_mut("dx", dx)?, op.cpu_mut("dgamma", dgamma)?, op.cpu_mut("dbeta", dbeta)?);
    let (dy, x, gamma) = (op.cpu_f32("dy", dy)?, op.cpu_f32("x", saved.x)?, op.cpu_f32("gamma", gamma)?);
    let (mean, rstd) = (op.cpu("mean", saved.mean)?, op.cpu("rstd", saved.rstd)?);
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
                let d = s * (dy[i] * gamma[i] - mean_g - xhat * mean_gx);
                dx[i] = if accumulate { dx[i] + d } else { d };
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gradient, values};
    use super::*;
    use crate::buffer::Buffer;

    fn forward(x: &[f32], g: &[f32], b: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let rows = x.len() / dim;
        let (mut y, mut m, mut r) =
            (Buffer::Cpu(vec![0.0; x.len()]), Buffer::Cpu(vec![0.0; rows]), Buffer::Cpu(vec![0.0; rows]));
        let (xb, gb, bb) = (Buffer::Cpu(x.to_vec()), Buffer::Cpu(g.to_vec()), Buffer::Cpu(b.to_vec()));
        let out = NormOut { y: y.view_mut(), mean: m.view_mut(), rstd: r.view_mut() };
        layernorm_forward(&Device::Cpu, out, xb.view(), gb.view(), bb.view(), dim).unwrap();
        (y.to_vec().unwrap(), m.to_vec().unwrap(), r.to_vec().unwrap())
    }

    #[test]
    fn backward_matches_finite_differences_and_accumulates() {
        let (rows, dim) = (3, 6);
        let (x, gamma, beta, dy) = (values(rows * dim, 1), values(dim, 2), values(dim, 3), values(rows * dim, 4));
        let loss =
            |x: &[f32], g: &[f32], b: &[f32]| forward(x, g, b, dim).0.iter().zip(&dy).map(|(a, b)| a * b).sum::<f32>();
        let (_, m, r) = forward(&x, &gamma, &beta, dim);
        let residual = values(rows * dim, 5);
        let (mut dx, mut dg, mut db) =
            (Buffer::Cpu(residual.clone()), Buffer::Cpu(vec![0.0; dim]), Buffer::Cpu(vec![0.0; dim]));
        let (xb, mb, rb, gb, dyb) = (
            Buffer::Cpu(x.clone()),
            Buffer::Cpu(m),
            Buffer::Cpu(r),
            Buffer::Cpu(gamma.clone()),
            Buffer::Cpu(dy.clone()),
        );
        let saved = NormSaved { x: xb.view(), mean: mb.view(), rstd: rb.view() };
        layernorm_backward(
            &Device::Cpu,
            dx.view_mut(),
            dg.view_mut(),
            db.view_mut(),
            dyb.view(),
            saved,
            gb.view(),
            dim,
            true,
        )
        .unwrap();
        let dx: Vec<f32> = dx.to_vec().unwrap().iter().zip(&residual).map(|(a, r)| a - r).collect();
        assert_gradient("dx", &dx, &x, |x| loss(x, &gamma, &beta));
        assert_gradient("dgamma", &dg.to_vec().unwrap(), &gamma, |g| loss(&x, g, &beta));
        assert_gradient("dbeta", &db.to_vec().unwrap(), &beta, |b| loss(&x, &gamma, b));
    }
}
