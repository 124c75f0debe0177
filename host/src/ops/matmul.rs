//! Matrix multiply C = A·B (or C += A·B) over strided views, f32 on the CPU through the `gemm`
//! crate (SIMD microkernels, rayon threads; the kernel family candle and faer use). Strides let
//! every caller pass transposes and row subsets without copies (cuBLASLt's leading dimensions).
//! On a GPU device A and B may be bf16 with C bf16 or f32 (a weight gradient accumulated in f32),
//! products accumulated in f32 (cuBLASLt's CUBLAS_COMPUTE_32F).

use gemm::Parallelism;

use super::check::OpCheck;
use super::dtype::Float;
use crate::cublaslt::{self, DataType, Epilogue, Layout, Matmul, Op};
use crate::device::Device;
use crate::error::Result;
use crate::view::{View, ViewMut};

/// A matrix in memory: element (i, j) is `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
pub struct Mat<D> {
    pub data: D,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// A host matrix, read-only.
pub type MatRef<'a> = Mat<&'a [f32]>;
/// A host matrix, written.
pub type MatMut<'a> = Mat<&'a mut [f32]>;

impl<D> Mat<D> {
    /// A row-major [rows, cols] matrix.
    pub fn new(data: D, rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        Mat { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// Rows `stride` apart (every `stride`-th row of a row-major matrix of the same width).
    pub fn row_stride(self, stride: usize) -> Self {
        Mat { row_stride: stride, ..self }
    }

    fn last_index(&self) -> usize {
        (self.rows.max(1) - 1) * self.row_stride + (self.cols.max(1) - 1) * self.col_stride
    }

    fn with<E>(&self, data: E) -> Mat<E> {
        Mat { data, rows: self.rows, cols: self.cols, row_stride: self.row_stride, col_stride: self.col_stride }
    }
}

/// c = a·b, or c += a·b with `accumulate`, on the device: all f32, or (GPU devices) a and b bf16
/// with c bf16 or f32.
pub fn matmul<T: Float, C: Float>(
    device: &Device,
    c: Mat<ViewMut<C>>,
    a: Mat<View<T>>,
    b: Mat<View<T>>,
    accumulate: bool,
) -> Result<()> {
    let op = OpCheck::new("matmul", device);
    if a.cols != b.rows || c.rows != a.rows || c.cols != b.cols {
        return Err(
            op.invalid(format!("[{}, {}]·[{}, {}] into [{}, {}]", a.rows, a.cols, b.rows, b.cols, c.rows, c.cols))
        );
    }
    for (name, last, len) in
        [("a", a.last_index(), a.data.len()), ("b", b.last_index(), b.data.len()), ("c", c.last_index(), c.data.len())]
    {
        if last >= len && a.rows * a.cols * b.cols > 0 {
            return Err(op.invalid(format!("{name} reaches element {last} of a view of {len}")));
        }
    }
    if !matches!(device, Device::Cpu) {
        let (cm, am, bm) = (c.with(()), a.with(()), b.with(()));
        let (c, a, b) =
            (cm.with(op.gpu_mut("c", c.data)?), am.with(op.gpu("a", a.data)?), bm.with(op.gpu("b", b.data)?));
        return gpu_matmul(device, c, a, b, accumulate, Batch::ONE, Epilogue::Default);
    }
    let (am, bm) = (a.with(()), b.with(()));
    let cm = c.with(());
    let (a, b, c) = (op.cpu_f32("a", a.data)?, op.cpu_f32("b", b.data)?, op.cpu_f32_mut("c", c.data)?);
    cpu_matmul(cm.with(c), am.with(a), bm.with(b), accumulate);
    Ok(())
}

/// `count` products, the i-th reading a and b and writing c `i·stride` elements further on
/// (cuBLASLt's strided batch).
#[derive(Clone, Copy, Debug)]
pub struct Batch {
    pub count: usize,
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

impl Batch {
    pub const ONE: Batch = Batch { count: 1, a: 0, b: 0, c: 0 };
}

/// The column-major layout and op of a strided view m of `dtype` elements, op(layout) = m: with
/// unit row stride m is stored column-major (op N); with unit column stride the memory holds mᵀ
/// column-major (op T).
fn stored(m: &Mat<()>, dtype: DataType, what: &str) -> Result<(Op, Layout)> {
    let ld = |ld: usize, rows: usize, cols: usize| if cols <= 1 { ld.max(rows) } else { ld };
    if m.col_stride == 1 {
        Ok((Op::T, Layout::new(dtype, m.cols, m.rows, ld(m.row_stride, m.cols, m.rows))))
    } else if m.row_stride == 1 {
        Ok((Op::N, Layout::new(dtype, m.rows, m.cols, ld(m.col_stride, m.rows, m.cols))))
    } else {
        Err(crate::error::Error::InvalidArgument(format!(
            "matmul: {what} has strides ({}, {}); a GPU matmul needs one of them 1",
            m.row_stride, m.col_stride
        )))
    }
}

/// c = a·b (c += a·b with `accumulate`) on a GPU device through cuBLASLt, over `batch`. cuBLASLt
/// is column-major: it computes cᵀ = bᵀ·aᵀ, with D = cᵀ (c's rows contiguous), A = bᵀ and B = aᵀ.
/// A row-major matrix is the column-major layout of its transpose, so a row-major operand of
/// the model is op = N of cuBLASLt's, a transposed view (`.t()`) op = T. In the model's terms
/// the epilogues act on c's columns: BIAS adds bias[j] to column j, BGRADB writes the row sums
/// of a (bias[i] = Σ_p a[i, p], the bias gradient when a = dyᵀ). a and b are T, c and the
/// epilogue's vectors C (cuBLASLt refuses f32 operands into a bf16 c).
pub(crate) fn gpu_matmul<T: Float, C: Float>(
    device: &Device,
    c: Mat<ViewMut<C>>,
    a: Mat<View<T>>,
    b: Mat<View<T>>,
    accumulate: bool,
    batch: Batch,
    epilogue: Epilogue<C>,
) -> Result<()> {
    if c.col_stride != 1 && c.rows > 1 && c.cols > 1 {
        return Err(crate::error::Error::InvalidArgument(format!(
            "matmul: the output has column stride {}; a GPU matmul writes rows of unit stride",
            c.col_stride
        )));
    }
    let (op_a, la) = stored(&b.with(()).t(), T::DATA_TYPE, "b")?;
    let (op_b, lb) = stored(&a.with(()).t(), T::DATA_TYPE, "a")?;
    let ld = if c.rows <= 1 { c.row_stride.max(c.cols) } else { c.row_stride };
    let d = Layout::new(C::DATA_TYPE, c.cols, c.rows, ld);
    let mm = Matmul {
        op_a,
        op_b,
        a: la.batched(batch.count, batch.b),
        b: lb.batched(batch.count, batch.a),
        d: d.batched(batch.count, batch.c),
        alpha: 1.0,
        beta: if accumulate { 1.0 } else { 0.0 },
    };
    cublaslt::matmul(device, &mm, b.data, a.data, c.data, epilogue)
}

/// The CPU matrix multiply (the views must fit their data).
pub fn cpu_matmul(c: MatMut, a: MatRef, b: MatRef, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner sizes {k} and {} differ", b.rows);
    assert!(c.rows == m && c.cols == n, "matmul: output is [{}, {}], not [{m}, {n}]", c.rows, c.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.last_index() < c.data.len(), "matmul: the output view runs past its data");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                (0..n).for_each(|j| c.data[i * c.row_stride + j * c.col_stride] = 0.0);
            }
        }
        return;
    }
    assert!(a.last_index() < a.data.len() && b.last_index() < b.data.len(), "matmul: a view runs past its data");
    // Below ~4M multiply-adds splitting over threads costs more than it saves (test-tiny's step:
    // 13.1 ms at 2^18, 12.2 ms at 2^22; ViT-B/16's GEMMs are all far above).
    let parallelism = if m * n * k >= 1 << 22 { Parallelism::Rayon(0) } else { Parallelism::None };
    // SAFETY: every index the views reach is inside their slices (checked above), and c does not
    // alias a or b (a &mut and two & borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            c.col_stride as isize,
            c.row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_product_with_transposes_strides_and_accumulation() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // stored [n, k]
        // c: every other row of a [2m, n] buffer.
        let mut c = vec![1.0f32; 2 * m * n];
        cpu_matmul(
            Mat::new(&mut c[..], m, n).row_stride(2 * n),
            Mat::new(&a[..], m, k),
            Mat::new(&bt[..], n, k).t(),
            true,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f32>();
                assert!((c[2 * i * n + j] - want).abs() < 1e-5, "({i},{j}) {} vs {want}", c[2 * i * n + j]);
                assert_eq!(c[(2 * i + 1) * n + j], 1.0, "a row between the strided rows was written");
            }
        }
    }

    #[test]
    fn mismatched_shapes_and_devices_are_named() {
        let (a, b, mut c) = (Buffer::Cpu(vec![0.0f32; 6]), Buffer::Cpu(vec![0.0f32; 6]), Buffer::Cpu(vec![0.0f32; 4]));
        let err = matmul(
            &Device::Cpu,
            Mat::new(c.view_mut(), 2, 2),
            Mat::new(a.view(), 2, 3),
            Mat::new(b.view(), 2, 3),
            false,
        );
        assert!(err.unwrap_err().to_string().contains("matmul: [2, 3]·[2, 3] into [2, 2]"));
        let e = Buffer::Emu(vec![0.0f32; 6]);
        let err = matmul(
            &Device::Cpu,
            Mat::new(c.view_mut(), 2, 2),
            Mat::new(e.view(), 2, 3),
            Mat::new(b.view(), 3, 2),
            false,
        );
        assert!(err.unwrap_err().to_string().contains("matmul: a is on the emu device, the op runs on cpu"));
    }

    use crate::buffer::Buffer;
}
