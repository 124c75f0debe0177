//! The GEMM crate choice: `gemm` (what host/src/ops/matmul.rs uses) against `matrixmultiply`
//! (threading feature) on the shapes of a ViT-B/16 training step at batch 2 (M = 2·197 tokens):
//! forward qkv and MLP products (A·Bᵀ, weights stored [out, in] as open_clip stores them) and the
//! weight gradient (dYᵀ·X). Both on all rayon/thread-tree threads.
//!   cargo bench --bench matmul

use clip_pgs_host::ops::matmul::{Mat, MatRef, cpu_matmul};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// (name, m, k, n, a transposed, b transposed)
const SHAPES: [(&str, usize, usize, usize, bool, bool); 4] = [
    ("qkv_fwd_394x768x2304", 394, 768, 2304, false, true),
    ("fc_fwd_394x768x3072", 394, 768, 3072, false, true),
    ("proj_fwd_394x3072x768", 394, 3072, 768, false, true),
    ("fc_wgrad_3072x394x768", 3072, 394, 768, true, false),
];

fn matmul_crates(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul_f32");
    for (name, m, k, n, at, bt) in SHAPES {
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut out = vec![0.0f32; m * n];
        // A is stored [k, m] when transposed, B [n, k] when transposed.
        let a_view = if at { MatRef::new(&a, k, m).t() } else { MatRef::new(&a, m, k) };
        let b_view = if bt { MatRef::new(&b, n, k).t() } else { MatRef::new(&b, k, n) };
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_function(format!("gemm/{name}"), |bench| {
            bench.iter(|| cpu_matmul(Mat::new(&mut out[..], m, n), a_view, b_view, false));
        });
        group.bench_function(format!("matrixmultiply/{name}"), |bench| {
            // SAFETY: the strides describe a and b exactly as the views above do; out holds m×n.
            bench.iter(|| unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    a_view.row_stride as isize,
                    a_view.col_stride as isize,
                    b.as_ptr(),
                    b_view.row_stride as isize,
                    b_view.col_stride as isize,
                    0.0,
                    out.as_mut_ptr(),
                    n as isize,
                    1,
                )
            });
        });
    }
    group.finish();
}

criterion_group!(benches, matmul_crates);
criterion_main!(benches);
