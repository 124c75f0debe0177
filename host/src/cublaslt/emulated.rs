//! cuBLASLt on the `emu` device: the descriptor interpreted on the host as the cuBLASLt
//! documentation defines it. Element (i, j) of a column-major layout is `i + j·ld` (plus
//! `b·stride` for matrix b of a batch); op(X) = Xᵀ reads element (j, i). The product itself is
//! the `gemm` crate's f32 microkernel over those strides; α, β and the epilogue are applied here
//! in cuBLASLt's order: x = α·op(A)·op(B) + β·C (C not read when β = 0), then the epilogue.

use clip_pgs_kernels::gelu::{gelu_tanh, gelu_tanh_grad};

use super::{Epilogue, Layout, Matmul, Op};
use crate::error::{Error, Result};
use crate::ops::matmul::{Mat, cpu_matmul};
use crate::view::{View, ViewMut};

/// op(X) of matrix `batch` of a layout as a strided view: (i, j) of op(X).
fn op_view(data: &[f32], l: Layout, op: Op, batch: usize) -> Mat<&[f32]> {
    let data = &data[batch * l.stride..];
    let stored = Mat { data, rows: l.rows, cols: l.cols, row_stride: 1, col_stride: l.ld };
    match op {
        Op::N => stored,
        Op::T => stored.t(),
    }
}

fn host<'a>(v: View<'a, f32>, what: &str) -> Result<&'a [f32]> {
    match v {
        View::Emu(s) => Ok(s),
        other => Err(Error::WrongDevice(format!("cuBLASLt on emu: {what} is on the {} device", other.place().name()))),
    }
}

fn host_mut<'a>(v: ViewMut<'a, f32>, what: &str) -> Result<&'a mut [f32]> {
    match v {
        ViewMut::Emu(s) => Ok(s),
        other => Err(Error::WrongDevice(format!("cuBLASLt on emu: {what} is on the {} device", other.place().name()))),
    }
}

pub(super) fn matmul(mm: &Matmul, a: View<f32>, b: View<f32>, d: ViewMut<f32>, epilogue: Epilogue) -> Result<()> {
    let (m, n, k) = mm.shape()?;
    let (a, b, d) = (host(a, "A")?, host(b, "B")?, host_mut(d, "D")?);
    let mut product = vec![0.0f32; m * n];
    for batch in 0..mm.d.batch {
        cpu_matmul(
            Mat { data: &mut product[..], rows: m, cols: n, row_stride: 1, col_stride: m.max(1) },
            op_view(a, mm.a, mm.op_a, batch),
            op_view(b, mm.b, mm.op_b, batch),
            false,
        );
        let at = |i: usize, j: usize| batch * mm.d.stride + i + j * mm.d.ld;
        for j in 0..n {
            for i in 0..m {
                let x = mm.alpha * product[i + j * m];
                d[at(i, j)] = if mm.beta == 0.0 { x } else { x + mm.beta * d[at(i, j)] };
            }
        }
    }
    match epilogue {
        Epilogue::Default => {}
        Epilogue::Bias(bias) => {
            let bias = host(bias, "the bias")?;
            for_each(mm.d, |i, _, at| d[at] += bias[i]);
        }
        Epilogue::GeluAuxBias { bias, aux, ld } => {
            let (bias, aux) = (host(bias, "the bias")?, host_mut(aux, "the GELU aux")?);
            for_each(mm.d, |i, j, at| {
                let pre = d[at] + bias[i];
                aux[i + j * ld] = pre;
                d[at] = gelu_tanh(pre);
            });
        }
        Epilogue::DGelu { aux, ld } => {
            let aux = host(aux, "the GELU aux")?;
            for_each(mm.d, |i, j, at| d[at] = gelu_tanh_grad(d[at], aux[i + j * ld]));
        }
        Epilogue::BGradB(out) => {
            let out = host_mut(out, "the bias gradient")?;
            let ob = op_view(b, mm.b, mm.op_b, 0);
            for (j, o) in out[..n].iter_mut().enumerate() {
                *o = (0..k).map(|p| ob.data[p * ob.row_stride + j * ob.col_stride]).sum();
            }
        }
    }
    Ok(())
}

/// f(i, j, index of D(i, j)) for every element of a single (unbatched) D.
fn for_each(d: Layout, mut f: impl FnMut(usize, usize, usize)) {
    for j in 0..d.cols {
        for i in 0..d.rows {
            f(i, j, i + j * d.ld);
        }
    }
}
