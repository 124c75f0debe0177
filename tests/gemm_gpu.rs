//! cuBLASLt's documented semantics, checked on a GPU device (the emulator's host interpreter in
//! `cargo test`, cuBLASLt itself with `CLIP_PGS_TEST_DEVICE=cuda`) against a naive column-major
//! product written here from the documentation: op(A) and op(B), leading dimensions larger than
//! the rows, strided batches, α and β (C not read when β = 0), and the epilogues BIAS,
//! GELU_AUX_BIAS, DGELU and BGRADB; and the element types cuBLASLt allows with f32 compute: A
//! and B f32 into f32, A and B bf16 into bf16 or f32 (the epilogue's vectors and the GELU aux of
//! D's type), rounded once when stored in bf16.

mod common;

use clip_pgs_host::cublaslt::{self, DataType, Epilogue, Layout, Matmul, Op};
use clip_pgs_host::ops::dtype::Float;
use clip_pgs_host::{Buffer, Device, bf16};
use clip_pgs_kernels::gelu::{gelu_tanh, gelu_tanh_grad};
use clip_pgs_kernels::philox::Philox;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let rng = Philox::new(seed, 11, 0);
    (0..n as u32).map(|i| rng.uniform(i) * 2.0 - 1.0).collect()
}

/// op(X)(i, j) of matrix `batch` of a column-major layout.
fn at(x: &[f32], l: Layout, op: Op, batch: usize, i: usize, j: usize) -> f32 {
    let (r, c) = if op == Op::N { (i, j) } else { (j, i) };
    x[batch * l.stride + r + c * l.ld]
}

/// α·op(A)·op(B) + β·D (D's old values not read when β = 0), summed in f64.
fn naive(mm: &Matmul, a: &[f32], b: &[f32], d: &[f32]) -> Vec<f32> {
    let (m, n, k) = mm.shape().unwrap();
    let mut out = d.to_vec();
    for batch in 0..mm.d.batch {
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| at(a, mm.a, mm.op_a, batch, i, p) as f64 * at(b, mm.b, mm.op_b, batch, p, j) as f64)
                    .sum();
                let idx = batch * mm.d.stride + i + j * mm.d.ld;
                let old = if mm.beta == 0.0 { 0.0 } else { mm.beta * d[idx] };
                out[idx] = mm.alpha * dot as f32 + old;
            }
        }
    }
    out
}

/// A descriptor for op(A) m×k, op(B) k×n with padded leading dimensions and a batch, all f32.
fn descriptor(op_a: Op, op_b: Op, shape: (usize, usize, usize), batch: usize, alpha: f32, beta: f32) -> Matmul {
    typed_descriptor(op_a, op_b, shape, batch, alpha, beta, (DataType::F32, DataType::F32))
}

/// `descriptor` with A and B of type `types.0`, D of `types.1`.
fn typed_descriptor(
    op_a: Op,
    op_b: Op,
    (m, n, k): (usize, usize, usize),
    batch: usize,
    alpha: f32,
    beta: f32,
    (ab, d): (DataType, DataType),
) -> Matmul {
    let layout = |dtype: DataType, rows: usize, cols: usize, pad: usize| {
        let l = Layout::new(dtype, rows, cols, rows + pad);
        l.batched(batch, l.span() + 5)
    };
    let (ar, ac) = if op_a == Op::N { (m, k) } else { (k, m) };
    let (br, bc) = if op_b == Op::N { (k, n) } else { (n, k) };
    Matmul { op_a, op_b, a: layout(ab, ar, ac, 3), b: layout(ab, br, bc, 1), d: layout(d, m, n, 2), alpha, beta }
}

/// f32 GEMMs sum k products in another order than the naive f64 sum: 1e-5 of the scale.
const F32_TOL: f32 = 1e-5;

/// A D stored in bf16 adds its rounding (≤ 2⁻⁸ of each value) to the f32 tolerance.
const BF16_TOL: f32 = common::BF16_ROUNDING + F32_TOL;

/// The tolerance of a D (or of an epilogue vector) of element type T.
fn tol<T: Float>() -> f32 {
    if T::DATA_TYPE == DataType::Bf16 { BF16_TOL } else { F32_TOL }
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_close_to(what, got, want, F32_TOL);
}

fn assert_close_to(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
    assert!(worst <= tol * scale, "{what}: max difference {worst} (scale {scale}, tolerance {tol:e})");
    eprintln!("{what}: max difference {:.2e} of the scale (tolerance {tol:.2e})", worst / scale);
}

#[test]
fn transposes_leading_dimensions_batches_alpha_and_beta_follow_the_documentation() {
    let gpu = common::gpu();
    for op_a in [Op::N, Op::T] {
        for op_b in [Op::N, Op::T] {
            for (batch, alpha, beta) in [(1, 1.0, 0.0), (3, 0.5, 1.5)] {
                let mm = descriptor(op_a, op_b, (5, 7, 3), batch, alpha, beta);
                let (a, b) = (values(mm.a.span(), 1), values(mm.b.span(), 2));
                // With β = 0 the old D must not be read: NaN there would show.
                let d: Vec<f32> = if beta == 0.0 { vec![f32::NAN; mm.d.span()] } else { values(mm.d.span(), 3) };
                let (ab, bb, mut db) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap(), gpu.upload(&d).unwrap());
                cublaslt::matmul(&gpu, &mm, ab.view(), bb.view(), db.view_mut(), Epilogue::Default).unwrap();
                let (got, want) = (db.to_vec().unwrap(), naive(&mm, &a, &b, &d));
                // Padding between columns and batches is left alone (NaN stays NaN).
                let padding_kept = got.iter().zip(&want).all(|(g, w)| g.is_nan() == w.is_nan());
                assert!(padding_kept, "{op_a:?}{op_b:?} batch {batch}: the padding was written");
                let finite = |v: &[f32]| v.iter().map(|x| if x.is_nan() { 0.0 } else { *x }).collect::<Vec<_>>();
                assert_close(
                    &format!("{op_a:?}{op_b:?} batch {batch} α {alpha} β {beta}"),
                    &finite(&got),
                    &finite(&want),
                );
            }
        }
    }
}

#[test]
fn epilogues_follow_the_documentation() {
    epilogues::<f32, f32>();
}

#[test]
fn epilogues_over_bf16_follow_the_documentation_into_bf16_and_f32() {
    epilogues::<bf16, bf16>();
    // The weight gradient's case: bf16 operands, f32 D and an f32 bias gradient (BGRADB).
    epilogues::<bf16, f32>();
}

/// Every epilogue with A and B of type AB, D and the epilogue's vectors of type D, against the
/// naive product of the values they hold; D's rounding sets the tolerance.
fn epilogues<AB: Float, D: Float>() {
    let gpu = common::gpu();
    let (m, n, k) = (6, 4, 9);
    let mm = typed_descriptor(Op::T, Op::N, (m, n, k), 1, 1.0, 0.0, (AB::DATA_TYPE, D::DATA_TYPE));
    let (a, b, bias) = (
        common::held::<AB>(&values(mm.a.span(), 4)),
        common::held::<AB>(&values(mm.b.span(), 5)),
        common::held::<D>(&values(m, 6)),
    );
    let product = naive(&mm, &a, &b, &vec![0.0; mm.d.span()]);
    let (ab, bb) = (common::upload_as::<AB>(&gpu, &a), common::upload_as::<AB>(&gpu, &b));
    let ld = m + 2;
    let idx = |i: usize, j: usize| i + j * mm.d.ld;
    let fresh = || common::upload_as::<D>(&gpu, &vec![0.0f32; mm.d.span()]);
    let types = format!("{}·{} → {}", AB::NAME, AB::NAME, D::NAME);
    let check =
        |what: &str, got: &[f32], want: &[f32]| assert_close_to(&format!("{what} ({types})"), got, want, tol::<D>());

    // BIAS: bias[i] added to row i of D.
    let (mut d, bias_b) = (fresh(), common::upload_as::<D>(&gpu, &bias));
    cublaslt::matmul(&gpu, &mm, ab.view(), bb.view(), d.view_mut(), Epilogue::Bias(bias_b.view())).unwrap();
    let mut want = vec![0.0; mm.d.span()];
    (0..n).for_each(|j| (0..m).for_each(|i| want[idx(i, j)] = product[idx(i, j)] + bias[i]));
    check("BIAS", &common::download(&d), &want);

    // GELU_AUX_BIAS: aux keeps the biased product (leading dimension ld), D its tanh-GELU.
    let mut aux = common::upload_as::<D>(&gpu, &vec![0.0f32; ld * n]);
    let mut d = fresh();
    let epilogue = Epilogue::GeluAuxBias { bias: bias_b.view(), aux: aux.view_mut(), ld };
    cublaslt::matmul(&gpu, &mm, ab.view(), bb.view(), d.view_mut(), epilogue).unwrap();
    let aux = common::download(&aux);
    let (mut want_aux, mut want) = (vec![0.0; ld * n], vec![0.0; mm.d.span()]);
    for j in 0..n {
        for i in 0..m {
            want_aux[i + j * ld] = product[idx(i, j)] + bias[i];
            want[idx(i, j)] = gelu_tanh(want_aux[i + j * ld]);
        }
    }
    check("GELU_AUX_BIAS aux", &aux, &want_aux);
    check("GELU_AUX_BIAS", &common::download(&d), &want);

    // DGELU: the product times gelu_tanh'(aux).
    let (mut d, aux_b) = (fresh(), common::upload_as::<D>(&gpu, &aux));
    cublaslt::matmul(&gpu, &mm, ab.view(), bb.view(), d.view_mut(), Epilogue::DGelu { aux: aux_b.view(), ld }).unwrap();
    (0..n).for_each(|j| (0..m).for_each(|i| want[idx(i, j)] = gelu_tanh_grad(product[idx(i, j)], aux[i + j * ld])));
    check("DGELU", &common::download(&d), &want);

    // BGRADB: bias[j] = Σ_p op(B)(p, j), D the plain product.
    let mut grad = common::upload_as::<D>(&gpu, &[7.0f32; 4][..n]);
    let mut d = fresh();
    cublaslt::matmul(&gpu, &mm, ab.view(), bb.view(), d.view_mut(), Epilogue::BGradB(grad.view_mut())).unwrap();
    check("BGRADB's D", &common::download(&d), &product);
    let want: Vec<f32> = (0..n).map(|j| (0..k).map(|p| at(&b, mm.b, mm.op_b, 0, p, j)).sum()).collect();
    check("BGRADB", &common::download(&grad), &want);
}

/// D = α·op(A)·op(B) + β·D on the GPU with A and B of type AB and D of type D; D's values back.
fn run_typed<AB: Float, D: Float>(gpu: &Device, mm: &Matmul, a: &[f32], b: &[f32], d: &[f32]) -> Vec<f32> {
    let (ab, bb, mut db) =
        (common::upload_as::<AB>(gpu, a), common::upload_as::<AB>(gpu, b), common::upload_as::<D>(gpu, d));
    cublaslt::matmul(gpu, mm, ab.view(), bb.view(), db.view_mut(), Epilogue::Default).unwrap();
    common::download(&db)
}

#[test]
fn bf16_operands_into_f32_and_bf16_follow_the_documentation() {
    let gpu = common::gpu();
    for d_type in [DataType::F32, DataType::Bf16] {
        for op_a in [Op::N, Op::T] {
            for op_b in [Op::N, Op::T] {
                for (batch, alpha, beta) in [(1, 1.0, 0.0), (3, 0.5, 1.5)] {
                    let mm = typed_descriptor(op_a, op_b, (5, 7, 3), batch, alpha, beta, (DataType::Bf16, d_type));
                    let (a, b) = (common::rounded(&values(mm.a.span(), 1)), common::rounded(&values(mm.b.span(), 2)));
                    // With β = 0 the old D must not be read: NaN there would show.
                    let d = if beta == 0.0 {
                        vec![f32::NAN; mm.d.span()]
                    } else {
                        common::rounded(&values(mm.d.span(), 3))
                    };
                    let (got, tol) = match d_type {
                        DataType::F32 => (run_typed::<bf16, f32>(&gpu, &mm, &a, &b, &d), F32_TOL),
                        DataType::Bf16 => (run_typed::<bf16, bf16>(&gpu, &mm, &a, &b, &d), BF16_TOL),
                    };
                    let want = naive(&mm, &a, &b, &d);
                    let what = format!("bf16 {op_a:?}{op_b:?} into {d_type:?}, batch {batch} α {alpha} β {beta}");
                    let padding_kept = got.iter().zip(&want).all(|(g, w)| g.is_nan() == w.is_nan());
                    assert!(padding_kept, "{what}: the padding was written");
                    let finite = |v: &[f32]| v.iter().map(|x| if x.is_nan() { 0.0 } else { *x }).collect::<Vec<_>>();
                    assert_close_to(&what, &finite(&got), &finite(&want), tol);
                }
            }
        }
    }
}

#[test]
fn unsupported_types_and_views_of_another_type_are_refused() {
    let gpu = common::gpu();
    // f32 operands into a bf16 D: not in cuBLASLt's table for f32 compute.
    let mm = typed_descriptor(Op::N, Op::N, (4, 4, 4), 1, 1.0, 0.0, (DataType::F32, DataType::Bf16));
    let (a, b) = (gpu.upload(&[0.0f32; 64]).unwrap(), gpu.upload(&[0.0f32; 64]).unwrap());
    let mut d = gpu.upload(&[bf16::ZERO; 64]).unwrap();
    let e = cublaslt::matmul(&gpu, &mm, a.view(), b.view(), d.view_mut(), Epilogue::Default).unwrap_err();
    assert!(e.to_string().contains("A is F32, B F32, D Bf16"), "{e}");
    // Mixed A and B.
    let mm = Matmul { a: Layout { dtype: DataType::Bf16, ..mm.a }, d: Layout { dtype: DataType::F32, ..mm.d }, ..mm };
    let mut df = gpu.upload(&[0.0f32; 64]).unwrap();
    let e = cublaslt::matmul(&gpu, &mm, a.view(), b.view(), df.view_mut(), Epilogue::Default).unwrap_err();
    assert!(e.to_string().contains("A is Bf16, B F32"), "{e}");
    // A descriptor of bf16 operands handed f32 views.
    let mm = typed_descriptor(Op::N, Op::N, (4, 4, 4), 1, 1.0, 0.0, (DataType::Bf16, DataType::F32));
    let e = cublaslt::matmul(&gpu, &mm, a.view(), b.view(), df.view_mut(), Epilogue::Default).unwrap_err();
    assert!(e.to_string().contains("A's layout is Bf16, its view holds F32 values"), "{e}");
}

#[test]
fn inconsistent_descriptors_are_refused() {
    let gpu = common::gpu();
    let mut mm = descriptor(Op::N, Op::N, (4, 4, 4), 1, 1.0, 0.0);
    let (a, b, mut d) =
        (gpu.upload(&[0.0f32; 64]).unwrap(), gpu.upload(&[0.0f32; 64]).unwrap(), gpu.upload(&[0.0f32; 64]).unwrap());
    mm.a.ld = 3;
    let e = cublaslt::matmul(&gpu, &mm, a.view(), b.view(), d.view_mut(), Epilogue::Default).unwrap_err();
    assert!(e.to_string().contains("A's leading dimension 3 is below its 4 rows"), "{e}");
    let mm = descriptor(Op::N, Op::T, (4, 5, 4), 1, 1.0, 0.0);
    let mm = Matmul { b: Layout::new(DataType::F32, 4, 5, 4), ..mm };
    let e = cublaslt::matmul(&gpu, &mm, a.view(), b.view(), d.view_mut(), Epilogue::Default).unwrap_err();
    assert!(e.to_string().contains("op(B) 5×4"), "{e}");
    let mm = descriptor(Op::N, Op::N, (4, 4, 4), 1, 1.0, 0.0);
    let (a, b, mut d) = (Buffer::Cpu(vec![0.0f32; 64]), Buffer::Cpu(vec![0.0f32; 64]), Buffer::Cpu(vec![0.0f32; 64]));
    let e = cublaslt::matmul(&Device::Cpu, &mm, a.view(), b.view(), d.view_mut(), Epilogue::Default).unwrap_err();
    assert!(e.to_string().contains("cuBLASLt runs on the GPU devices"), "{e}");
}
