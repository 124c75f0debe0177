//! Matrix multiplies as cuBLASLt describes them: column-major matrix layouts (element type, rows,
//! columns, leading dimension, strided batches), op(A) and op(B), D = α·op(A)·op(B) + β·C with
//! C = D (in place), and the training epilogues BIAS, GELU_AUX_BIAS, DGELU and BGRADB.
//!
//! Element types: compute and scale (α, β) are f32 (CUBLAS_COMPUTE_32F, CUDA_R_32F); the matrices
//! are f32 or bf16 in the combinations cuBLASLt's table for CUBLAS_COMPUTE_32F lists: A and B
//! f32 with C = D f32, or A and B bf16 with C = D bf16 or f32 (a weight gradient accumulates bf16
//! products into an f32 gradient with β = 1). The epilogue's vector (bias, bias gradient) and
//! the GELU aux have D's type, cuBLASLt's default for CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE and
//! CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE.
//!
//! On `cuda` the call goes to cuBLASLt (`cuda.rs`: descriptors, layouts and the heuristic's
//! algorithm cached per shape and types, one workspace). On `emu` it goes to `emulated.rs`, a
//! host interpreter of the same descriptor written from cuBLASLt's documentation, not from the
//! model's row-major view (`ops/matmul.rs` translates that view into descriptors): a transposed
//! or mis-strided descriptor gives wrong numbers in the emulator tests, as it would on a GPU.

mod cuda;
mod emulated;

pub use cuda::CublasLt;

use crate::device::Device;
use crate::emu::GemmRecord;
use crate::error::{Error, Result};
use crate::ops::dtype::Float;
use crate::view::{View, ViewMut};

/// The element type of a matrix layout (`cudaDataType_t`): CUDA_R_32F or CUDA_R_16BF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    F32,
    Bf16,
}

/// CUBLASLT_MATMUL_DESC_TRANSA / TRANSB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    N,
    T,
}

/// A column-major matrix layout (`cublasLtMatrixLayout_t`): element (i, j) of matrix b of the
/// batch is at `b·stride + i + j·ld`, ld ≥ rows; elements of type `dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub dtype: DataType,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    /// CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT and STRIDED_BATCH_OFFSET.
    pub batch: usize,
    pub stride: usize,
}

impl Layout {
    /// `cublasLtMatrixLayoutCreate(type, rows, cols, ld)`, one matrix.
    pub fn new(dtype: DataType, rows: usize, cols: usize, ld: usize) -> Layout {
        Layout { dtype, rows, cols, ld, batch: 1, stride: 0 }
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

/// One matmul: D = α·op(A)·op(B) + β·D, with op(A) m×k, op(B) k×n and D m×n; the layouts give
/// the data types of A, B and D.
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

/// CUBLASLT_MATMUL_DESC_EPILOGUE with the vectors it reads or writes, of D's element type E.
pub enum Epilogue<'a, E> {
    Default,
    /// D += bias, bias[i] for row i of D (length m).
    Bias(View<'a, E>),
    /// aux = α·op(A)·op(B) + β·C + bias (kept for backward), D = gelu_tanh(aux); aux has D's
    /// shape with leading dimension `ld`.
    GeluAuxBias {
        bias: View<'a, E>,
        aux: ViewMut<'a, E>,
        ld: usize,
    },
    /// D = (α·op(A)·op(B) + β·C)·gelu_tanh'(aux).
    DGelu {
        aux: View<'a, E>,
        ld: usize,
    },
    /// bias[j] = Σ_p op(B)[p, j] (length n), written: the bias gradient of the layer whose output
    /// gradient is op(B).
    BGradB(ViewMut<'a, E>),
}

impl<E> Epilogue<'_, E> {
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
        let (a, b, d) = (self.a.dtype, self.b.dtype, self.d.dtype);
        let supported = a == b && (a == DataType::Bf16 || d == DataType::F32);
        if !supported {
            return invalid(format!(
                "A is {a:?}, B {b:?}, D {d:?}; with f32 compute cuBLASLt multiplies F32·F32 into F32 and \
                 Bf16·Bf16 into Bf16 or F32"
            ));
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

/// Runs `mm` on `device` (cuda or emu): a, b and d must hold their layouts' spans, in the
/// layouts' element types (A and B of type `AB`, D and the epilogue's vectors of type `D`).
pub fn matmul<AB: Float, D: Float>(
    device: &Device,
    mm: &Matmul,
    a: View<AB>,
    b: View<AB>,
    d: ViewMut<D>,
    epilogue: Epilogue<D>,
) -> Result<()> {
    let (m, n, _) = mm.shape()?;
    for (name, layout, view) in
        [("A", mm.a.dtype, AB::DATA_TYPE), ("B", mm.b.dtype, AB::DATA_TYPE), ("D", mm.d.dtype, D::DATA_TYPE)]
    {
        if layout != view {
            return Err(Error::InvalidArgument(format!(
                "cuBLASLt matmul: {name}'s layout is {layout:?}, its view holds {view:?} values"
            )));
        }
    }
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
        Device::Emu(rt) => {
            let (k, batch) = (mm.shape()?.2, mm.d.batch);
            let vectors = match &epilogue {
                Epilogue::Default => 0,
                Epilogue::Bias(_) => m,
                Epilogue::BGradB(_) => n,
                Epilogue::GeluAuxBias { .. } => m + m * n,
                Epilogue::DGelu { .. } => m * n,
            };
            let reads_d = if mm.beta != 0.0 { 2 } else { 1 };
            // A and B in their element type, D and the epilogue's vectors in D's.
            let (ab_bytes, d_bytes) = (size_of::<AB>(), size_of::<D>());
            let bytes = batch * (m * k + k * n) * ab_bytes + (batch * reads_d * m * n + vectors) * d_bytes;
            let record = GemmRecord {
                epilogue: epilogue.name(),
                flops: 2 * (m * n * k * batch) as u64,
                min_bytes: bytes as u64,
            };
            let mut work = emulated::matmul(mm, a, b, d, epilogue)?;
            rt.run_or_record(Box::new(move |rt| {
                rt.record_gemm(record);
                work(rt)
            }))
        }
        Device::Cuda(rt) => rt.cublaslt()?.matmul(mm, a, b, d, epilogue),
    }
}
