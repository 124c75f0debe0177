//! f32 matrix multiply on the CPU through the `gemm` crate (SIMD microkernels, rayon threads;
//! the kernel family candle and faer use), over row-major slices seen with any strides.

use gemm::Parallelism;

/// A matrix view: element (i, j) is `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major [rows, cols] matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    fn last_index(&self) -> usize {
        (self.rows.max(1) - 1) * self.row_stride + (self.cols.max(1) - 1) * self.col_stride
    }
}

/// c [m, n] (row-major) = a·b, or c += a·b with `accumulate`.
pub fn matmul(c: &mut [f32], a: MatRef, b: MatRef, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner sizes {k} and {} differ", b.rows);
    assert!(c.len() >= m * n, "matmul: output holds {} < {m}×{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!(a.last_index() < a.data.len() && b.last_index() < b.data.len(), "matmul: a view runs past its data");
    let parallelism = if m * n * k >= 1 << 18 { Parallelism::Rayon(0) } else { Parallelism::None };
    // SAFETY: every index the views reach is inside their slices (checked above), c holds m×n,
    // and c does not alias a or b (a &mut and two & borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
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
    fn matches_a_naive_product_with_transposes_and_accumulation() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // stored [n, k]
        let mut c = vec![1.0f32; m * n];
        matmul(&mut c, MatRef::new(&a, m, k), MatRef::new(&bt, n, k).t(), true);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f32>();
                assert!((c[i * n + j] - want).abs() < 1e-5, "({i},{j}) {} vs {want}", c[i * n + j]);
            }
        }
    }
}
