//! cuBLASLt on the `emu` device: the descriptor interpreted on the host as the cuBLASLt
//! documentation defines it. Element (i, j) of a column-major layout is `i + j·ld` (plus
//! `b·stride` for matrix b of a batch); op(X) = Xᵀ reads element (j, i). bf16 operands are read
//! as f32 (exactly); the product is the `gemm` crate's f32 microkernel over those strides (f32
//! accumulation, as CUBLAS_COMPUTE_32F); α, β and the epilogue are applied in f32 in cuBLASLt's
//! order: x = α·op(A)·op(B) + β·C (C not read when β = 0), then the epilogue, and each value is
//! rounded once to the type it is stored in (D, the GELU aux, the bias gradient).

use std::borrow::Cow;

use clip_pgs_kernels::gelu::{gelu_tanh, gelu_tanh_grad};

use super::{Epilogue, Layout, Matmul, Op};
use crate::error::{Error, Result};
use crate::graph::{Address, Recorded};
use crate::ops::dtype::Float;
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

fn host<'a, T>(v: View<'a, T>, what: &str) -> Result<&'a [T]> {
    match v {
        View::Emu(s) => Ok(s),
        other => Err(Error::WrongDevice(format!("cuBLASLt on emu: {what} is on the {} device", other.place().name()))),
    }
}

fn host_mut<'a, T>(v: ViewMut<'a, T>, what: &str) -> Result<&'a mut [T]> {
    match v {
        ViewMut::Emu(s) => Ok(s),
        other => Err(Error::WrongDevice(format!("cuBLASLt on emu: {what} is on the {} device", other.place().name()))),
    }
}

/// An operand as f32 values: f32 itself, bf16 widened (exactly) into a copy.
fn widened<T: Float>(data: &[T]) -> Cow<'_, [f32]> {
    match T::as_f32(data) {
        Some(values) => Cow::Borrowed(values),
        None => Cow::Owned(data.iter().map(|v| v.to_f32()).collect()),
    }
}

/// The epilogue's vectors, as addresses of emu memory.
enum Vectors<E> {
    None,
    Bias(Address<E>),
    GeluAuxBias { bias: Address<E>, aux: Address<E>, ld: usize },
    DGelu { aux: Address<E>, ld: usize },
    BGradB(Address<E>),
}

/// `mm` over emu memory, as work to run now or to record into a graph.
pub(super) fn matmul<AB: Float, D: Float>(
    mm: &Matmul,
    a: View<AB>,
    b: View<AB>,
    d: ViewMut<D>,
    epilogue: Epilogue<D>,
) -> Result<Recorded> {
    let (a, b, d) = (Address::of(host(a, "A")?), Address::of(host(b, "B")?), Address::of_mut(host_mut(d, "D")?));
    let vectors = match epilogue {
        Epilogue::Default => Vectors::None,
        Epilogue::Bias(v) => Vectors::Bias(Address::of(host(v, "the bias")?)),
        Epilogue::GeluAuxBias { bias, aux, ld } => Vectors::GeluAuxBias {
            bias: Address::of(host(bias, "the bias")?),
            aux: Address::of_mut(host_mut(aux, "the GELU aux")?),
            ld,
        },
        Epilogue::DGelu { aux, ld } => Vectors::DGelu { aux: Address::of(host(aux, "the GELU aux")?), ld },
        Epilogue::BGradB(v) => Vectors::BGradB(Address::of_mut(host_mut(v, "the bias gradient")?)),
    };
    let mm = *mm;
    // SAFETY: run now, or replayed from a graph whose caller keeps the buffers where they were;
    // D and the written vector are distinct from the rest (borrowed mutably above).
    Ok(Box::new(move |_| unsafe { run(&mm, a.slice(), b.slice(), d.slice_mut(), &vectors) }))
}

/// # Safety
/// The vectors' memory is live and distinct from `d` and each other.
unsafe fn run<AB: Float, D: Float>(mm: &Matmul, a: &[AB], b: &[AB], d: &mut [D], vectors: &Vectors<D>) -> Result<()> {
    let (m, n, k) = mm.shape()?;
    let (a, b) = (widened(a), widened(b));
    // SAFETY: the caller's contract.
    let (mut bias, mut aux_in, mut aux_out, mut bias_grad) = (None, None, None, None);
    unsafe {
        match *vectors {
            Vectors::None => {}
            Vectors::Bias(v) => bias = Some(v.slice()),
            Vectors::GeluAuxBias { bias: v, aux, ld } => {
                bias = Some(v.slice());
                aux_out = Some((aux.slice_mut(), ld));
            }
            Vectors::DGelu { aux, ld } => aux_in = Some((aux.slice(), ld)),
            Vectors::BGradB(v) => bias_grad = Some(v.slice_mut()),
        }
    }
    let mut product = vec![0.0f32; m * n];
    for batch in 0..mm.d.batch {
        cpu_matmul(
            Mat { data: &mut product[..], rows: m, cols: n, row_stride: 1, col_stride: m.max(1) },
            op_view(&a, mm.a, mm.op_a, batch),
            op_view(&b, mm.b, mm.op_b, batch),
            false,
        );
        for j in 0..n {
            for i in 0..m {
                let at = batch * mm.d.stride + i + j * mm.d.ld;
                let x = mm.alpha * product[i + j * m];
                let mut x = if mm.beta == 0.0 { x } else { x + mm.beta * d[at].to_f32() };
                if let Some(bias) = bias {
                    x += bias[i].to_f32();
                }
                if let Some((aux, ld)) = &mut aux_out {
                    aux[i + j * *ld] = D::from_f32(x);
                    x = gelu_tanh(x);
                }
                if let Some((aux, ld)) = aux_in {
                    x = gelu_tanh_grad(x, aux[i + j * ld].to_f32());
                }
                d[at] = D::from_f32(x);
            }
        }
    }
    if let Some(out) = bias_grad {
        let ob = op_view(&b, mm.b, mm.op_b, 0);
        for (j, o) in out[..n].iter_mut().enumerate() {
            *o = D::from_f32((0..k).map(|p| ob.data[p * ob.row_stride + j * ob.col_stride]).sum());
        }
    }
    Ok(())
}
