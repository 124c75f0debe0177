//! Matrix multiplies as cuBLASLt describes them: column-major matrix layouts (rows, columns,
//! leading dimension, strided batches), op(A) and op(B), D = α·op(A)·op(B) + β·C with C = D (in
//! place), and the training epilogues BIAS, GELU_AUX_BIAS, DGELU and BGRADB.
//!
//! On `cuda` the call goes to cuBLASLt (`cuda.rs`: descriptors, layouts and the heuristic's
//! algorithm cached per shape, one workspace). On `emu` it goes to `emulated.rs`, a host
//! interpreter of the same descriptor written from cuBLASLt's documentation, not from the
//! model's row-major view (`ops/matmul.rs` translates that view into descriptors): a transposed
//! or mis-strided descriptor gives wrong numbers in the emulator tests, as it would on a GPU.

mod cuda;
mod emulated;

pub use cuda::CublasLt;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::view::{View, ViewMut};

/// CUBLASLT_MATMUL_DESC_TRANSA / TRANSB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    N,
    T,
}

/// A column-major matrix layout (`cublasLtMatrixLayout_t`): element (i, j) of matrix b of the
/// batch is at `b·stride + i + j·ld`, ld ≥ rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    /// CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT and STRIDED_BATCH_OFFSET.
    pub batch: usize,
    pub stride: usize,
}

impl Layout {
    pub fn new(rows: usize, cols: usize, ld: usize) -> Layout {
        Layout { rows, cols, ld, batch: 1, stride: 0 }
    }

    pub fn batched(self, batch: usize, stride: usize) -> Layout {
        Layout { batch, stride, ..self }
    }

    /// Elements a buffer needs to hold every matrix of the batch.
    pub fn span(&self) -> usize {
        if self.rows == 0 || self.cols == 0 || self.batch == 0 {
            return 0;
        }
        (self.batch - 1) * self.stride + (self.cols - 1) * self.ld + self.rows
    }
}

/// One matmul: D = α·op(A)·op(B) + β·D, with op(A) m×k, op(B) k×n and D m×n.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Matmul {
    pub op_a: Op,
    pub op_b: Op,
    pub a: Layout,
    pub b: Layout,
    pub d: Layout,
    pub alpha: f32,
    pub beta: f32,
}

/// CUBLASLT_MATMUL_DESC_EPILOGUE with the vectors it reads or writes.
pub enum Epilogue<'a> {
    Default,
    /// D += bias, bias[i] for row i of D (length m).
    Bias(View<'a, f32>),
    /// aux = α·op(A)·op(B) + β·C + bias (kept for backward), D = gelu_tanh(aux); aux has D's
    /// shape with leading dimension `ld`.
    GeluAuxBias {
        bias: View<'a, f32>,
        aux: ViewMut<'a, f32>,
        ld: usize,
    },
    /// D = (α·op(A)·op(B) + β·C)·gelu_tanh'(aux).
    DGelu {
        aux: View<'a, f32>,
        ld: usize,
    },
    /// bias[j] = Σ_p op(B)[p, j] (length n), written: the bias gradient of the layer whose output
    /// gradient is op(B).
    BGradB(ViewMut<'a, f32>),
}

impl Epilogue<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Epilogue::Default => "DEFAULT",
            Epilogue::Bias(_) => "BIAS",
            Epilogue::GeluAuxBias { .. } => "GELU_AUX_BIAS",
            Epilogue::DGelu { .. } => "DGELU",
            Epilogue::BGradB(_) => "BGRADB",
        }
    }
}

impl Matmul {
    /// (m, n, k), after checking that the layouts agree as cuBLASLt requires (it answers
    /// CUBLAS_STATUS_INVALID_VALUE otherwise).
    pub fn shape(&self) -> Result<(usize, usize, usize)> {
        let invalid = |what: String| Err(Error::InvalidArgument(format!("cuBLASLt matmul {self:?}: {what}")));
        let (m, k) = match self.op_a {
            Op::N => (self.a.rows, self.a.cols),
            Op::T => (self.a.cols, self.a.rows),
        };
        let (kb, n) = match self.op_b {
            Op::N => (self.b.rows, self.b.cols),
            Op::T => (self.b.cols, self.b.rows),
        };
        if k != kb || self.d.rows != m || self.d.cols != n {
            return invalid(format!("op(A) is {m}×{k}, op(B) {kb}×{n}, D {}×{}", self.d.rows, self.d.cols));
        }
        for (name, l) in [("A", self.a), ("B", self.b), ("D", self.d)] {
            if l.ld < l.rows.max(1) {
                return invalid(format!("{name}'s leading dimension {} is below its {} rows", l.ld, l.rows));
            }
            if l.batch != self.d.batch {
                return invalid(format!("{name} has a batch of {}, D of {}", l.batch, self.d.batch));
            }
        }
        Ok((m, n, k))
    }
}

/// Runs `mm` on `device` (cuda or emu): a, b and d must hold their layouts' spans.
pub fn matmul(
    device: &Device,
    mm: &Matmul,
    a: View<f32>,
    b: View<f32>,
    d: ViewMut<f32>,
    epilogue: Epilogue,
) -> Result<()> {
    let (m, n, _) = mm.shape()?;
    for (name, len, l) in [("A", a.len(), mm.a), ("B", b.len(), mm.b), ("D", d.len(), mm.d)] {
        if len < l.span() {
            return Err(Error::InvalidArgument(format!(
                "cuBLASLt matmul: {name} has {len} elements, its layout {l:?} reaches {}",
                l.span()
            )));
        }
    }
    let vector = match &epilogue {
        Epilogue::Default => None,
        Epilogue::Bias(bias) => Some(("bias", bias.len(), m)),
        Epilogue::GeluAuxBias { bias, .. } => Some(("bias", bias.len(), m)),
        Epilogue::BGradB(bias) => Some(("bias gradient", bias.len(), n)),
        Epilogue::DGelu { .. } => None,
    };
    if let Some((name, len, want)) = vector
        && len < want
    {
        return Err(Error::InvalidArgument(format!(
            "cuBLASLt matmul: the {} epilogue's {name} has {len} elements, needs {want}",
            epilogue.name()
        )));
    }
    if !matches!(epilogue, Epilogue::Default) && mm.d.batch != 1 {
        return Err(Error::InvalidArgument(format!(
            "cuBLASLt matmul: the {} epilogue on a batch of {} (batched epilogues are not used)",
            epilogue.name(),
            mm.d.batch
        )));
    }
    let aux = match &epilogue {
        Epilogue::GeluAuxBias { aux, ld, .. } => Some((aux.len(), *ld)),
        Epilogue::DGelu { aux, ld } => Some((aux.len(), *ld)),
        _ => None,
    };
    if let Some((len, ld)) = aux {
        let layout = Layout { ld, ..mm.d };
        if ld < m.max(1) || len < layout.span() {
            return Err(Error::InvalidArgument(format!(
                "cuBLASLt matmul: the {} epilogue's aux ({len} elements, ld {ld}) does not hold D's {m}×{n}",
                epilogue.name()
            )));
        }
    }
    match device {
        Device::Cpu => Err(Error::InvalidArgument(
            "cuBLASLt runs on the GPU devices; the cpu device multiplies through ops::matmul".into(),
        )),
        Device::Emu(_) => emulated::matmul(mm, a, b, d, epilogue),
        Device::Cuda(rt) => rt.cublaslt()?.matmul(mm, a, b, d, epilogue),
    }
}
