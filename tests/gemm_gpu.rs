//! cuBLASLt's documented semantics, checked on a GPU device (the emulator's host interpreter in
//! `cargo test`, cuBLASLt itself with `CLIP_PGS_TEST_DEVICE=cuda`) against a naive column-major
//! product written here from the documentation: op(A) and op(B), leading dimensions larger than
//! the rows, strided batches, α and β (C not read when β = 0), and the epilogues BIAS,
//! GELU_AUX_BIAS, DGELU and BGRADB.

mod common;

use clip_pgs_host::cublaslt::{self, Epilogue, Layout, Matmul, Op};
use clip_pgs_host::{Buffer, Device};
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

/// A descriptor for op(A) m×k, op(B) k×n with padded leading dimensions and a batch.
fn descriptor(op_a: Op, op_b: Op, (m, n, k): (usize, usize, usize), batch: usize, alpha: f32, beta: f32) -> Matmul {
    let layout = |rows: usize, cols: usize, pad: usize| {
        let l = Layout::new(rows, cols, rows + pad);
        l.batched(batch, l.span() + 5)
    };
    let (ar, ac) = if op_a == Op::N { (m, k) } else { (k, m) };
    let (br, bc) = if op_b == Op::N { (k, n) } else { (n, k) };
    Matmul { op_a, op_b, a: layout(ar, ac, 3), b: layout(br, bc, 1), d: layout(m, n, 2), alpha, beta }
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-5 * scale, "{what}: max difference {worst} (scale {scale})");
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
    let gpu = common::gpu();
    let (m, n, k) = (6, 4, 9);
    let mm = descriptor(Op::T, Op::N, (m, n, k), 1, 1.0, 0.0);
    let (a, b, bias) = (values(mm.a.span(), 4), values(mm.b.span(), 5), values(m, 6));
    let product = naive(&mm, &a, &b, &vec![0.0; mm.d.span()]);
    let (ab, bb) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
    let ld = m + 2;
    let idx = |i: usize, j: usize| i + j * mm.d.ld;
    let fresh = || gpu.upload(&vec![0.0f32; mm.d.span()]).unwrap();

    // BIAS: bias[i] added to row i of D.
    let (mut d, bias_b) = (fresh(), gpu.upload(&bias).unwrap());
    cublaslt::matmul(&gpu, &mm, ab.view(), bb.view(), d.view_mut(), Epilogue::Bias(bias_b.view())).unwrap();
    let biased = d.to_vec().unwrap();
    let mut want = vec![0.0; mm.d.span()];
    (0..n).for_each(|j| (0..m).for_each(|i| want[idx(i, j)] = product[idx(i, j)] + bias[i]));
    assert_close("BIAS", &biased, &want);

    // GELU_AUX_BIAS: aux keeps the biased product (leading dimension ld), D its tanh-GELU.
    let mut aux = gpu.upload(&vec![0.0f32; ld * n]).unwrap();
    let mut d = fresh();
    let epilogue = Epilogue::GeluAuxBias { bias: bias_b.view(), aux: aux.view_mut(), ld };
    cublaslt::matmul(&gpu, &mm, ab.view(), bb.view(), d.view_mut(), epilogue).unwrap();
    let gelu = d.to_vec().unwrap();
    let aux = aux.to_vec().unwrap();
    let (mut want_aux, mut want) = (vec![0.0; ld * n], vec![0.0; mm.d.span()]);
    for j in 0..n {
        for i in 0..m {
            want_aux[i + j * ld] = product[idx(i, j)] + bias[i];
            want[idx(i, j)] = gelu_tanh(want_aux[i + j * ld]);
        }
    }
    assert_close("GELU_AUX_BIAS aux", &aux, &want_aux);
    assert_close("GELU_AUX_BIAS", &gelu, &want);

    // DGELU: the product times gelu_tanh'(aux).
    let (mut d, aux_b) = (fresh(), gpu.upload(&aux).unwrap());
    cublaslt::matmul(&gpu, &mm, ab.view(), bb.view(), d.view_mut(), Epilogue::DGelu { aux: aux_b.view(), ld }).unwrap();
    let dgelu = d.to_vec().unwrap();
    (0..n).for_each(|j| (0..m).for_each(|i| want[idx(i, j)] = gelu_tanh_grad(product[idx(i, j)], aux[i + j * ld])));
    assert_close("DGELU", &dgelu, &want);

    // BGRADB: bias[j] = Σ_p op(B)(p, j), D the plain product.
    let mut grad = gpu.upload(&vec![7.0f32; n]).unwrap();
    let mut d = fresh();
    cublaslt::matmul(&gpu, &mm, ab.view(), bb.view(), d.view_mut(), Epilogue::BGradB(grad.view_mut())).unwrap();
    let plain = d.to_vec().unwrap();
    assert_close("BGRADB's D", &plain, &product);
    let want: Vec<f32> = (0..n).map(|j| (0..k).map(|p| at(&b, mm.b, mm.op_b, 0, p, j)).sum()).collect();
    assert_close("BGRADB", &grad.to_vec().unwrap(), &want);
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
    let mm = Matmul { b: Layout::new(4, 5, 4), ..mm };
    let e = cublaslt::matmul(&gpu, &mm, a.view(), b.view(), d.view_mut(), Epilogue::Default).unwrap_err();
    assert!(e.to_string().contains("op(B) 5×4"), "{e}");
    let mm = descriptor(Op::N, Op::N, (4, 4, 4), 1, 1.0, 0.0);
    let (a, b, mut d) = (Buffer::Cpu(vec![0.0f32; 64]), Buffer::Cpu(vec![0.0f32; 64]), Buffer::Cpu(vec![0.0f32; 64]));
    let e = cublaslt::matmul(&Device::Cpu, &mm, a.view(), b.view(), d.view_mut(), Epilogue::Default).unwrap_err();
    assert!(e.to_string().contains("cuBLASLt runs on the GPU devices"), "{e}");
}
