//! LayerNorm forward (plain and with the fused residual add) and backward on a GPU device
//! (`kernels/src/layernorm.rs`; the emulator in `cargo test`, CUDA with
//! `CLIP_PGS_TEST_DEVICE=cuda`) against the CPU reference, on awkward shapes: one row, a few,
//! two images' worth of ViT tokens (2·197), and dims below, at and off a multiple of the warp,
//! up to the longest row the kernels keep in registers (1024) and past it (1100: their
//! multi-pass path).
//!
//! The kernels sum a row as 32 lane partials joined by a butterfly, and a column of dγ/dβ as 8·L
//! strided partials (L = 4 f32 or 8 bf16 lanes of a 16-byte vector, 1 off it), where the CPU sums sequentially: the results agree to rounding, not to the
//! bit. Tolerances are on the max |GPU − CPU| relative to a scale of the tensor, and argued where
//! they are set. The residual sum a + b has no reduction: it must agree to the bit.
//!
//! bf16: the same kernels over bf16 x, y, γ, β and activation gradients (statistics, dγ and dβ
//! f32) against the CPU given the same values widened to f32; the tolerances add the bf16
//! storage of the outputs (and of the fused residual sum) to the f32 ones.

mod common;

use clip_pgs_host::ops::dtype::Activation;
use clip_pgs_host::ops::layernorm::{NormOut, NormSaved, add_layernorm_forward, layernorm_backward, layernorm_forward};
use clip_pgs_host::{Buffer, Device, bf16};
use clip_pgs_kernels::philox::Philox;

const ROWS: [usize; 3] = [1, 3, 197 * 2];
const DIMS: [usize; 7] = [32, 48, 96, 768, 769, 1024, 1100];

/// Forward outputs (y, activations' mean and rstd) and the fused add's sum: relative to the max
/// |value| of the tensor. Both devices sum ≤ 1100 f32 terms of one sign pattern; rounding errors
/// of such sums grow like √n·u on random data (u = 6e-8: about 2e-6 at dim 1100) and by at most
/// (n − 1)·u in the worst case. The mean and variance inherit that relative error, rstd half of
/// it, and y = (x − mean)·rstd·γ + β both (the mean's error enters scaled by rstd, and x's offset
/// is of the order of its spread, so it is not amplified). 1e-5 is 5× the typical error, while a
/// wrong formula (unbiased variance: 1.6% at dim 32; a missing row or column; a swapped γ/β)
/// misses it by orders of magnitude.
const FORWARD_TOL: f32 = 1e-5;

/// dx, relative to max |dx| (with `accumulate`, of the sum): mean(g) and mean(g·x̂) are row sums
/// as above, entering dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with weights ≤ rstd·|x̂|, the same
/// order as dx's own terms; 1e-5 for the same reasons.
const DX_TOL: f32 = 1e-5;

/// dγ and dβ, relative to their scale: per column |start| + Σ_rows |term| (terms dy·x̂ or dy),
/// the quantity that bounds the rounding error of any summation order ((n − 1)·u times it, n =
/// rows + 1 ≤ 395; √n·u ≈ 1.2e-6 typically). The max |value| would be the wrong scale: dβ = Σ dy
/// of zero-mean dy cancels to √rows of its terms. 1e-5 of the scale still catches a lost start
/// value (dγ overwritten, not accumulated), a lost row-lane or a double-counted one.
const PARAM_TOL: f32 = 1e-5;

/// Uniform in [offset − 4, offset + 4), from Philox.
fn values(n: usize, seed: u64, offset: f32) -> Vec<f32> {
    let rng = Philox::new(seed, 11, 0);
    (0..n as u32).map(|i| rng.uniform(i) * 8.0 - 4.0 + offset).collect()
}

/// max |a − b| / scale, with the scale max |want|.
fn relative(name: &str, want: &[f32], got: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0 && scale.is_finite(), "{name}: scale {scale}");
    assert!(got.iter().all(|v| v.is_finite()), "{name}: non-finite GPU values");
    common::max_abs_diff(want, got) / scale
}

/// Forward on `device`: y, mean, rstd and (with `residual`) the sum a + b.
fn forward(
    device: &Device,
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    dim: usize,
) -> [Vec<f32>; 4] {
    forward_as::<f32>(device, x, residual, gamma, beta, dim)
}

/// `forward` with x, y, γ, β and the sum of element type T (widened back to f32).
fn forward_as<T: Activation>(
    device: &Device,
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    dim: usize,
) -> [Vec<f32>; 4] {
    let rows = x.len() / dim;
    let (mut y, mut mean, mut rstd, mut sum) = (
        common::upload_as::<T>(device, &vec![0.0f32; x.len()]),
        device.upload(&vec![0.0f32; rows]).unwrap(),
        device.upload(&vec![0.0f32; rows]).unwrap(),
        common::upload_as::<T>(device, &vec![0.0f32; x.len()]),
    );
    let up = |v: &[f32]| common::upload_as::<T>(device, v);
    let (xb, gb, bb) = (up(x), up(gamma), up(beta));
    let out = NormOut { y: y.view_mut(), mean: mean.view_mut(), rstd: rstd.view_mut() };
    match residual {
        None => layernorm_forward(device, out, xb.view(), gb.view(), bb.view(), dim).unwrap(),
        Some(r) => {
            let rb = up(r);
            add_layernorm_forward(device, sum.view_mut(), out, xb.view(), rb.view(), gb.view(), bb.view(), dim).unwrap()
        }
    }
    [common::download(&y), mean.to_vec().unwrap(), rstd.to_vec().unwrap(), common::download(&sum)]
}

/// The largest relative difference per quantity, for the report.
#[derive(Default, Debug)]
struct Worst {
    y: f32,
    mean: f32,
    rstd: f32,
    dx: f32,
    dgamma: f32,
    dbeta: f32,
}

fn check(name: &str, worst: &mut f32, got: f32, tol: f32) {
    assert!(got <= tol, "{name}: max difference {got:e} of the scale, tolerance {tol:e}");
    *worst = worst.max(got);
}

#[test]
fn forward_and_fused_add_forward_match_the_cpu() {
    let gpu = common::gpu();
    let mut worst = Worst::default();
    for (rows, dim) in ROWS.iter().flat_map(|&r| DIMS.map(|d| (r, d))) {
        let n = rows * dim;
        // A mean offset of the order of the spread: the variance pass must subtract the mean.
        let (x, residual) = (values(n, 1, 3.0), values(n, 2, -0.5));
        let (gamma, beta) = (values(dim, 3, 1.0), values(dim, 4, 0.0));
        for fused in [false, true] {
            let residual = fused.then_some(&residual[..]);
            let want = forward(&Device::Cpu, &x, residual, &gamma, &beta, dim);
            let got = forward(&gpu, &x, residual, &gamma, &beta, dim);
            let at = format!("rows {rows}, dim {dim}, fused {fused}");
            check(&format!("y ({at})"), &mut worst.y, relative("y", &want[0], &got[0]), FORWARD_TOL);
            check(&format!("mean ({at})"), &mut worst.mean, relative("mean", &want[1], &got[1]), FORWARD_TOL);
            check(&format!("rstd ({at})"), &mut worst.rstd, relative("rstd", &want[2], &got[2]), FORWARD_TOL);
            let differ = want[3].iter().zip(&got[3]).filter(|(w, g)| w.to_bits() != g.to_bits()).count();
            assert_eq!(differ, 0, "sum ({at}): {differ} of {n} differ");
            if fused {
                assert_ne!(want[3], vec![0.0; n], "sum ({at}) was written");
            }
        }
    }
    eprintln!("forward, worst relative differences: {worst:?}");
}

/// dx, dγ, dβ after one backward on `device` from the given starting values.
#[allow(clippy::too_many_arguments)]
fn backward(
    device: &Device,
    start: [&[f32]; 3],
    dy: &[f32],
    saved: [&[f32]; 3],
    gamma: &[f32],
    dim: usize,
    accumulate: bool,
) -> [Vec<f32>; 3] {
    backward_as::<f32>(device, start, dy, saved, gamma, dim, accumulate)
}

/// `backward` with dx, dy, x and γ of element type T (widened back to f32).
#[allow(clippy::too_many_arguments)]
fn backward_as<T: Activation>(
    device: &Device,
    start: [&[f32]; 3],
    dy: &[f32],
    saved: [&[f32]; 3],
    gamma: &[f32],
    dim: usize,
    accumulate: bool,
) -> [Vec<f32>; 3] {
    let [dx0, dg0, db0] = start;
    let mut dx = common::upload_as::<T>(device, dx0);
    let (mut dg, mut db) = (device.upload(dg0).unwrap(), device.upload(db0).unwrap());
    let [x, mean, rstd] = saved;
    let x = common::upload_as::<T>(device, x);
    let (mean, rstd) = (device.upload(mean).unwrap(), device.upload(rstd).unwrap());
    let (dyb, gb) = (common::upload_as::<T>(device, dy), common::upload_as::<T>(device, gamma));
    let saved = NormSaved { x: x.view(), mean: mean.view(), rstd: rstd.view() };
    layernorm_backward(
        device,
        dx.view_mut(),
        dg.view_mut(),
        db.view_mut(),
        dyb.view(),
        saved,
        gb.view(),
        dim,
        accumulate,
    )
    .unwrap();
    [common::download(&dx), dg.to_vec().unwrap(), db.to_vec().unwrap()]
}

/// max over columns of |start| + Σ_rows |term(row, column)|: the scale of a column sum's error.
fn column_scale(start: &[f32], rows: usize, term: impl Fn(usize, usize) -> f32) -> f32 {
    let dim = start.len();
    (0..dim).map(|i| start[i].abs() + (0..rows).map(|r| term(r, i).abs()).sum::<f32>()).fold(0.0, f32::max)
}

#[test]
fn backward_matches_the_cpu_overwriting_and_accumulating() {
    let gpu = common::gpu();
    let mut worst = Worst::default();
    for (rows, dim) in ROWS.iter().flat_map(|&r| DIMS.map(|d| (r, d))) {
        let n = rows * dim;
        let (x, gamma, beta) = (values(n, 5, 3.0), values(dim, 6, 1.0), values(dim, 7, 0.0));
        // The statistics the forward pass saves, the same input for both devices.
        let [_, mean, rstd, _] = forward(&Device::Cpu, &x, None, &gamma, &beta, dim);
        let dy = values(n, 8, 0.0);
        // Nonzero starting values: dx with `accumulate` adds to them, dγ and dβ always do.
        let (dx0, dg0, db0) = (values(n, 9, 0.5), values(dim, 10, 1.0), values(dim, 11, -1.0));
        let xhat = |r: usize, i: usize| (x[r * dim + i] - mean[r]) * rstd[r];
        let g_scale = column_scale(&dg0, rows, |r, i| dy[r * dim + i] * xhat(r, i));
        let b_scale = column_scale(&db0, rows, |r, i| dy[r * dim + i]);
        for accumulate in [false, true] {
            let start = [&dx0[..], &dg0[..], &db0[..]];
            let saved = [&x[..], &mean[..], &rstd[..]];
            let want = backward(&Device::Cpu, start, &dy, saved, &gamma, dim, accumulate);
            let got = backward(&gpu, start, &dy, saved, &gamma, dim, accumulate);
            let at = format!("rows {rows}, dim {dim}, accumulate {accumulate}");
            check(&format!("dx ({at})"), &mut worst.dx, relative("dx", &want[0], &got[0]), DX_TOL);
            let dg = common::max_abs_diff(&want[1], &got[1]) / g_scale;
            check(&format!("dgamma ({at})"), &mut worst.dgamma, dg, PARAM_TOL);
            let db = common::max_abs_diff(&want[2], &got[2]) / b_scale;
            check(&format!("dbeta ({at})"), &mut worst.dbeta, db, PARAM_TOL);
        }
    }
    eprintln!("backward, worst relative differences: {worst:?}");
}

#[test]
fn a_tensor_on_another_device_is_named() {
    let gpu = common::gpu();
    let (rows, dim) = (2, 32);
    let on_gpu = |n: usize| gpu.upload(&vec![1.0f32; n]).unwrap();
    let (mut y, mut mean, mut rstd, mut sum) = (on_gpu(rows * dim), on_gpu(rows), on_gpu(rows), on_gpu(rows * dim));
    let (x, gamma) = (on_gpu(rows * dim), on_gpu(dim));
    let beta = Buffer::Cpu(vec![0.0f32; dim]);
    let out = NormOut { y: y.view_mut(), mean: mean.view_mut(), rstd: rstd.view_mut() };
    let e = layernorm_forward(&gpu, out, x.view(), gamma.view(), beta.view(), dim).unwrap_err().to_string();
    assert!(e.contains("layernorm_forward: beta is on the cpu device, the op runs on"), "{e}");

    let b = Buffer::Cpu(vec![0.0f32; rows * dim]);
    let out = NormOut { y: y.view_mut(), mean: mean.view_mut(), rstd: rstd.view_mut() };
    let e = add_layernorm_forward(&gpu, sum.view_mut(), out, x.view(), b.view(), gamma.view(), gamma.view(), dim)
        .unwrap_err()
        .to_string();
    assert!(e.contains("add_layernorm_forward: b is on the cpu device, the op runs on"), "{e}");

    let (mut dx, mut dgamma) = (on_gpu(rows * dim), on_gpu(dim));
    let mut dbeta = Buffer::Cpu(vec![0.0f32; dim]);
    let saved = NormSaved { x: x.view(), mean: mean.view(), rstd: rstd.view() };
    let e = layernorm_backward(
        &gpu,
        dx.view_mut(),
        dgamma.view_mut(),
        dbeta.view_mut(),
        x.view(),
        saved,
        gamma.view(),
        dim,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("layernorm_backward: dbeta is on the cpu device, the op runs on"), "{e}");
}

/// y of a bf16 forward: the f32 tolerance plus y's storage (≤ 2⁻⁸ of each value).
const BF16_Y_TOL: f32 = FORWARD_TOL + common::BF16_ROUNDING;

/// The fused forward over bf16 normalizes the residual sum as stored (the stream the next layer
/// reads), where the CPU normalizes the exact a + b: the sum's rounding (≤ 2⁻⁸ of |x|, and |x|
/// reaches 1.3× the largest |x − mean| with these offsets) enters x̂ and the statistics, and y's
/// storage adds one more rounding: 3·2⁻⁸ of y's scale; the statistics, averages of the rounding
/// errors, stay within 2⁻⁸ of their scale.
const BF16_FUSED_TOL: f32 = 3.0 * common::BF16_ROUNDING;

#[test]
fn forward_and_fused_add_forward_in_bf16_match_the_cpu() {
    let gpu = common::gpu();
    let mut worst = Worst::default();
    for (rows, dim) in ROWS.iter().flat_map(|&r| DIMS.map(|d| (r, d))) {
        let n = rows * dim;
        let held = |v: Vec<f32>| common::rounded(&v);
        let (x, residual) = (held(values(n, 1, 3.0)), held(values(n, 2, -0.5)));
        let (gamma, beta) = (held(values(dim, 3, 1.0)), held(values(dim, 4, 0.0)));
        for fused in [false, true] {
            let residual = fused.then_some(&residual[..]);
            let want = forward(&Device::Cpu, &x, residual, &gamma, &beta, dim);
            let got = forward_as::<bf16>(&gpu, &x, residual, &gamma, &beta, dim);
            let at = format!("bf16, rows {rows}, dim {dim}, fused {fused}");
            let (y_tol, stats_tol) =
                if fused { (BF16_FUSED_TOL, common::BF16_ROUNDING) } else { (BF16_Y_TOL, FORWARD_TOL) };
            check(&format!("y ({at})"), &mut worst.y, relative("y", &want[0], &got[0]), y_tol);
            check(&format!("mean ({at})"), &mut worst.mean, relative("mean", &want[1], &got[1]), stats_tol);
            check(&format!("rstd ({at})"), &mut worst.rstd, relative("rstd", &want[2], &got[2]), stats_tol);
            if fused {
                // a + b in f32, rounded once: the CPU's sum rounded.
                let differ =
                    common::rounded(&want[3]).iter().zip(&got[3]).filter(|(w, g)| w.to_bits() != g.to_bits()).count();
                assert_eq!(differ, 0, "sum ({at}): {differ} of {n} are not the CPU's rounded");
            }
        }
    }
    eprintln!("bf16 forward, worst relative differences: {worst:?}");
}

#[test]
fn backward_in_bf16_matches_the_cpu_overwriting_and_accumulating() {
    let gpu = common::gpu();
    let mut worst = Worst::default();
    for (rows, dim) in ROWS.iter().flat_map(|&r| DIMS.map(|d| (r, d))) {
        let n = rows * dim;
        let held = |v: Vec<f32>| common::rounded(&v);
        let (x, gamma, beta) = (held(values(n, 5, 3.0)), held(values(dim, 6, 1.0)), held(values(dim, 7, 0.0)));
        let [_, mean, rstd, _] = forward(&Device::Cpu, &x, None, &gamma, &beta, dim);
        let dy = held(values(n, 8, 0.0));
        let (dx0, dg0, db0) = (held(values(n, 9, 0.5)), values(dim, 10, 1.0), values(dim, 11, -1.0));
        let xhat = |r: usize, i: usize| (x[r * dim + i] - mean[r]) * rstd[r];
        let g_scale = column_scale(&dg0, rows, |r, i| dy[r * dim + i] * xhat(r, i));
        let b_scale = column_scale(&db0, rows, |r, i| dy[r * dim + i]);
        for accumulate in [false, true] {
            let start = [&dx0[..], &dg0[..], &db0[..]];
            let saved = [&x[..], &mean[..], &rstd[..]];
            let want = backward(&Device::Cpu, start, &dy, saved, &gamma, dim, accumulate);
            let got = backward_as::<bf16>(&gpu, start, &dy, saved, &gamma, dim, accumulate);
            let at = format!("bf16, rows {rows}, dim {dim}, accumulate {accumulate}");
            // dx is computed in f32 from the same values and stored once in bf16.
            let dx = relative("dx", &want[0], &got[0]);
            check(&format!("dx ({at})"), &mut worst.dx, dx, DX_TOL + common::BF16_ROUNDING);
            // dγ and dβ are f32 sums of the same f32 terms: the f32 tolerance.
            let dg = common::max_abs_diff(&want[1], &got[1]) / g_scale;
            check(&format!("dgamma ({at})"), &mut worst.dgamma, dg, PARAM_TOL);
            let db = common::max_abs_diff(&want[2], &got[2]) / b_scale;
            check(&format!("dbeta ({at})"), &mut worst.dbeta, db, PARAM_TOL);
        }
    }
    eprintln!("bf16 backward, worst relative differences: {worst:?}");
}

/// dγ, dβ of one backward at ViT-B's width on the emulator with counters: the column reduction
/// reads dy and x in 16-byte vectors (a warp request: L rows' 32 columns, L = 4 f32 or 8 bf16),
/// the same sectors as one element a thread in 1/L of its requests, and still matches the CPU.
fn param_grads_in_vectors<T: Activation>() {
    use clip_pgs_host::emu::EmuRuntime;
    use clip_pgs_kernels::hw::emu::Options;
    let emu = EmuRuntime::new(Options { counters: true, ..Options::default() });
    let device = Device::Emu(emu.clone());
    let (rows, dim) = (197 * 2, 768);
    let n = rows * dim;
    let held = |v: Vec<f32>| common::held::<T>(&v);
    let (x, gamma, beta) = (held(values(n, 5, 3.0)), held(values(dim, 6, 1.0)), held(values(dim, 7, 0.0)));
    let [_, mean, rstd, _] = forward(&Device::Cpu, &x, None, &gamma, &beta, dim);
    let dy = held(values(n, 8, 0.0));
    let (dx0, dg0, db0) = (held(values(n, 9, 0.5)), values(dim, 10, 1.0), values(dim, 11, -1.0));
    let xhat = |r: usize, i: usize| (x[r * dim + i] - mean[r]) * rstd[r];
    let g_scale = column_scale(&dg0, rows, |r, i| dy[r * dim + i] * xhat(r, i));
    let b_scale = column_scale(&db0, rows, |r, i| dy[r * dim + i]);
    let start = [&dx0[..], &dg0[..], &db0[..]];
    let saved = [&x[..], &mean[..], &rstd[..]];
    let want = backward(&Device::Cpu, start, &dy, saved, &gamma, dim, false);
    emu.keep_reports();
    let got = backward_as::<T>(&device, start, &dy, saved, &gamma, dim, false);
    let reports = emu.take_reports();
    let dg = common::max_abs_diff(&want[1], &got[1]) / g_scale;
    check(&format!("dgamma ({})", T::NAME), &mut 0.0, dg, PARAM_TOL);
    let db = common::max_abs_diff(&want[2], &got[2]) / b_scale;
    check(&format!("dbeta ({})", T::NAME), &mut 0.0, db, PARAM_TOL);
    let report = reports.iter().find(|r| r.kernel.starts_with("layernorm_param_grads")).expect("a dγ/dβ launch");
    let t = &report.traffic;
    // Per block of 32 columns: per chunk of 256 rows, mean and rstd (one request per warp of
    // rows) and, for each of dy and x, warp w's row-lanes wL … wL + L − 1 step by 8L rows; then
    // dγ and dβ read and written.
    let blocks = dim.div_ceil(32) as u64;
    let chunks: Vec<usize> = (0..rows).step_by(256).map(|c| (rows - c).min(256)).collect();
    let requests = |lanes: usize| {
        let stats: usize = chunks.iter().map(|c| 2 * c.div_ceil(32)).sum();
        let rows: usize = chunks
            .iter()
            .map(|&c| (0..8).map(|w| c.saturating_sub(w * lanes).div_ceil(8 * lanes)).sum::<usize>())
            .sum();
        blocks * (stats + 2 * rows + 4) as u64
    };
    let (vector, scalar) = (requests(T::LANES), requests(1));
    // dy and x once, mean and rstd once per block, dγ and dβ read and written once.
    let size = std::mem::size_of::<T>();
    let sectors = (2 * n * size / 32 + blocks as usize * 2 * rows.div_ceil(8) + 4 * dim / 8) as u64;
    println!(
        "layernorm_param_grads {}: {} requests (one element a thread: {scalar}), {} sector bytes, at most {}",
        T::NAME,
        t.global_requests(),
        t.sector_bytes(),
        32 * sectors
    );
    assert_eq!(t.global_requests(), vector, "{}: {} requests", T::NAME, t.global_requests());
    assert!(t.sectors() <= sectors, "{}: {} sectors, at most {sectors}", T::NAME, t.sectors());
}

#[test]
fn param_grads_read_rows_in_16_byte_vectors() {
    param_grads_in_vectors::<f32>();
    param_grads_in_vectors::<bf16>();
}
