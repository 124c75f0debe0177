//! The model's ops on a GPU device against the CPU reference (emulator in `cargo test`, CUDA with
//! `CLIP_PGS_TEST_DEVICE=cuda`). Bit for bit where the arithmetic is the same: the elementwise
//! ops (`kernels/src/elementwise.rs`), GELU forward and backward (`kernels/src/gelu.rs`; it uses
//! `fast_exp`, PTX `ex2.approx` on a GPU: on CUDA it agrees to 2e-6 relative) and the AdamW
//! update (`kernels/src/adamw.rs`). Within a stated tolerance where the GPU sums in another
//! order: the GEMMs (cuBLASLt, or its interpreter on emu), linear layers with their epilogues,
//! attention, the contrastive loss and the gradient norm.

mod common;

use clip_pgs_host::ops::adamw::{AdamW, AdamWStep, adamw_update, grad_norm};
use clip_pgs_host::ops::attention::{AttentionShape, attention_backward, attention_forward};
use clip_pgs_host::ops::clip_loss::{ClipLossOut, clip_loss, clip_loss_workspace};
use clip_pgs_host::ops::elementwise::{add, add_assign, clamp, fill};
use clip_pgs_host::ops::gelu::{gelu_backward, gelu_forward};
use clip_pgs_host::ops::linear::{Epilogue, LinearGrads, LinearShape, linear_backward_gelu, linear_forward};
use clip_pgs_host::ops::matmul::{Mat, matmul};
use clip_pgs_host::{Buffer, Device};
use clip_pgs_kernels::philox::Philox;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let rng = Philox::new(seed, 7, 0);
    (0..n as u32).map(|i| rng.uniform(i) * 8.0 - 4.0).collect()
}

/// An op under test: on a device, over x (written) and b (read).
type Op<'a> = Box<dyn Fn(&Device, &mut Buffer<f32>, &Buffer<f32>) + 'a>;

/// Runs `op` on `device` over copies of `x` and `b`; returns x.
fn run(device: &Device, x: &[f32], b: &[f32], op: &Op) -> Vec<f32> {
    let (mut xb, bb) = (device.upload(x).unwrap(), device.upload(b).unwrap());
    op(device, &mut xb, &bb);
    xb.to_vec().unwrap()
}

#[test]
fn elementwise_ops_equal_the_cpu_bit_for_bit() {
    let gpu = common::gpu();
    // Sizes around a block and beyond the grid's cap (grid-stride loops), and broadcast rows.
    for (n, period) in [(1, 1), (255, 255), (257, 1), (4096, 64), (96 * 700, 96), (70_001 * 20, 20)] {
        let (x, b, a) = (values(n, 1), values(period, 2), values(n, 3));
        let ops: [(&str, Op); 4] = [
            (
                "add",
                Box::new(|d, x, b| {
                    let a = d.upload(&a).unwrap();
                    add(d, x.view_mut(), a.view(), b.view()).unwrap()
                }),
            ),
            ("add_assign", Box::new(|d, x, b| add_assign(d, x.view_mut(), b.view()).unwrap())),
            ("fill", Box::new(|d, x, _| fill(d, x.view_mut(), -0.5).unwrap())),
            ("clamp", Box::new(|d, x, _| clamp(d, x.view_mut(), -1.0, 2.5).unwrap())),
        ];
        for (name, op) in &ops {
            let (want, got) = (run(&Device::Cpu, &x, &b, op), run(&gpu, &x, &b, op));
            let differ = want.iter().zip(&got).filter(|(w, g)| w.to_bits() != g.to_bits()).count();
            assert_eq!(differ, 0, "{name}: {differ} of {n} values differ (period {period})");
        }
    }
}

#[test]
fn a_tensor_on_another_device_is_named() {
    let gpu = common::gpu();
    let (mut x, b) = (gpu.upload(&[1.0f32; 4]).unwrap(), Buffer::Cpu(vec![1.0f32; 2]));
    let e = add_assign(&gpu, x.view_mut(), b.view()).unwrap_err().to_string();
    assert!(e.contains("add_assign: b is on the cpu device, the op runs on"), "{e}");
}

/// (p, g, m, v) after one AdamW update on `device` from the same state, with the norm given.
fn adamw(device: &Device, state: &[Vec<f32>; 4], norm: f32, at: AdamWStep) -> Vec<Vec<f32>> {
    let hyper = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.98, eps: 1e-6 };
    let [mut p, mut g, mut m, mut v] = state.clone().map(|s| device.upload(&s).unwrap());
    let norm = device.upload(&[norm]).unwrap();
    adamw_update(device, p.view_mut(), g.view_mut(), m.view_mut(), v.view_mut(), norm.view(), &hyper, at).unwrap();
    [p, g, m, v].iter().map(|b| b.to_vec().unwrap()).collect()
}

#[test]
fn adamw_equals_the_cpu_bit_for_bit_with_and_without_clipping() {
    let gpu = common::gpu();
    let n = 300_001;
    let v: Vec<f32> = values(n, 7).iter().map(|x| x * x * 1e-3).collect();
    let state = [values(n, 4), values(n, 5), values(n, 6).iter().map(|x| x * 1e-2).collect(), v];
    for (norm, max_norm) in
        [(3.0, None), (3.0, Some(1.0)), (0.5, Some(1.0)), (f32::NAN, None), (f32::INFINITY, Some(1.0))]
    {
        let at = AdamWStep { step: 7, weight_decay: 0.1, max_norm };
        let (want, got) = (adamw(&Device::Cpu, &state, norm, at), adamw(&gpu, &state, norm, at));
        for (name, (w, g)) in ["params", "grads", "m", "v"].iter().zip(want.iter().zip(&got)) {
            let differ = w.iter().zip(g).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "{name}: {differ} of {n} differ (norm {norm}, max {max_norm:?})");
        }
        // A non-finite norm changes nothing; otherwise the gradients are consumed.
        let untouched = want[0] == state[0] && want[1] == state[1];
        assert_eq!(untouched, !norm.is_finite(), "norm {norm}");
        assert_eq!(want[1].iter().all(|&g| g == 0.0), norm.is_finite());
    }
}

#[test]
fn gelu_forward_and_backward_equal_the_cpu() {
    let gpu = common::gpu();
    let exact = !gpu.is_cuda();
    let n = 100_003;
    let (x, dy) = (values(n, 8), values(n, 9));
    let forward: Op = Box::new(|d, y, x| gelu_forward(d, y.view_mut(), x.view()).unwrap());
    let backward: Op = Box::new(|d, dx, x| {
        let dy = d.upload(&dy).unwrap();
        gelu_backward(d, dx.view_mut(), dy.view(), x.view()).unwrap()
    });
    for (name, op) in [("gelu_forward", &forward), ("gelu_backward", &backward)] {
        let (want, got) = (run(&Device::Cpu, &vec![0.0; n], &x, op), run(&gpu, &vec![0.0; n], &x, op));
        let worst = want.iter().zip(&got).map(|(w, g)| (w - g).abs() / w.abs().max(1e-3)).fold(0.0f32, f32::max);
        let differ = want.iter().zip(&got).filter(|(w, g)| w.to_bits() != g.to_bits()).count();
        assert!(if exact { differ == 0 } else { worst <= 2e-6 }, "{name}: {differ} of {n} differ, worst {worst}");
    }
}

/// max |got − want| ≤ tol·max |want|.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
    assert!(worst <= tol * scale, "{what}: max difference {worst} = {:.2e} of the scale {scale}", worst / scale);
}

/// Runs `f` on the CPU and on the GPU device over uploads of `inputs`; returns each device's
/// buffers back on the host.
fn both(inputs: &[Vec<f32>], f: impl Fn(&Device, &mut [Buffer<f32>])) -> [Vec<Vec<f32>>; 2] {
    [Device::Cpu, common::gpu()].map(|device| {
        let mut buffers: Vec<Buffer<f32>> = inputs.iter().map(|v| device.upload(v).unwrap()).collect();
        f(&device, &mut buffers);
        buffers.iter().map(|b| b.to_vec().unwrap()).collect()
    })
}

// GEMMs sum k products in another order than the CPU's gemm crate (f32): differences of a few
// ulps of the largest terms, far below 1e-5 of the output's scale for k ≤ 1000.
const GEMM_TOL: f32 = 1e-5;

#[test]
fn matmul_with_transposes_row_strides_and_accumulation_matches_the_cpu() {
    let (m, k, n) = (37, 29, 45);
    for (transpose_a, transpose_b, accumulate) in
        [(false, false, false), (true, false, true), (false, true, false), (true, true, true)]
    {
        // a [m, k] (stored [k, m] when transposed), b [k, n] likewise; c every other row of [2m, n].
        let inputs = [values(m * k, 1), values(k * n, 2), values(2 * m * n, 3)];
        let [cpu, gpu] = both(&inputs, |d, bufs| {
            let [a, b, c] = bufs else { unreachable!() };
            let am = if transpose_a { Mat::new(a.view(), k, m).t() } else { Mat::new(a.view(), m, k) };
            let bm = if transpose_b { Mat::new(b.view(), n, k).t() } else { Mat::new(b.view(), k, n) };
            matmul(d, Mat::new(c.view_mut(), m, n).row_stride(2 * n), am, bm, accumulate).unwrap();
        });
        assert_close(&format!("matmul a{transpose_a} b{transpose_b} acc {accumulate}"), &gpu[2], &cpu[2], GEMM_TOL);
    }
}

#[test]
fn linear_forward_and_backward_match_the_cpu_with_every_epilogue() {
    let s = LinearShape { rows: 34, inputs: 48, outputs: 80 };
    let (r, i, o) = (s.rows, s.inputs, s.outputs);
    for gelu in [false, true] {
        // x, w, b, y, pre, dy, dx, dw (nonzero: accumulated), db (likewise), pre of the input
        let inputs = [
            values(r * i, 1),
            values(o * i, 2),
            values(o, 3),
            vec![0.0; r * o],
            vec![0.0; r * o],
            values(r * o, 4),
            vec![0.0; r * i],
            values(o * i, 5),
            values(o, 6),
            values(r * i, 7),
        ];
        let [cpu, gpu] = both(&inputs, |d, bufs| {
            let [x, w, b, y, pre, dy, dx, dw, db, x_pre] = bufs else { unreachable!() };
            let epilogue = if gelu {
                Epilogue::BiasGelu { bias: b.view(), pre: pre.view_mut() }
            } else {
                Epilogue::Bias(b.view())
            };
            linear_forward(d, y.view_mut(), x.view(), w.view(), epilogue, s).unwrap();
            let grads = LinearGrads { dx: Some(dx.view_mut()), dw: dw.view_mut(), db: Some(db.view_mut()) };
            let x_pre = gelu.then(|| x_pre.view());
            linear_backward_gelu(d, grads, dy.view(), x.view(), w.view(), x_pre, s).unwrap();
        });
        for (index, name) in [(3, "y"), (4, "pre"), (6, "dx"), (7, "dw"), (8, "db")] {
            // GELU's erf and exp are the same code on both devices; the GEMMs set the tolerance.
            assert_close(&format!("linear {name} (gelu {gelu})"), &gpu[index], &cpu[index], GEMM_TOL);
        }
    }
}

#[test]
fn attention_forward_and_backward_match_the_cpu_causal_and_with_lengths() {
    let gpu_device = common::gpu();
    for (causal, lengths, seq) in [(true, None, 16), (false, Some(vec![17u32, 5, 1]), 17), (false, None, 33)] {
        let s = AttentionShape { batch: 3, seq, heads: 2, head_dim: 16, causal };
        let d = s.heads * s.head_dim;
        let (n, probs) = (s.batch * seq * d, s.probs_len());
        // qkv, out, probs, dout, dqkv, scratch
        let inputs =
            [values(3 * n, 1), vec![0.0; n], vec![0.0; probs], values(n, 2), vec![0.0; 3 * n], vec![0.0; probs]];
        let [cpu, gpu] = both(&inputs, |dev, bufs| {
            let [qkv, out, p, dout, dqkv, scratch] = bufs else { unreachable!() };
            let lengths = lengths.as_ref().map(|l| dev.upload(l).unwrap());
            attention_forward(dev, out.view_mut(), p.view_mut(), qkv.view(), lengths.as_ref().map(|l| l.view()), s)
                .unwrap();
            attention_backward(dev, dqkv.view_mut(), scratch.view_mut(), dout.view(), qkv.view(), p.view(), s).unwrap();
        });
        // Softmax sums in another order and exp differs by an ulp: 1e-5 of each tensor's scale.
        for (index, name) in [(1, "out"), (2, "probs"), (4, "dqkv")] {
            assert_close(
                &format!("attention {name} (causal {causal}, lengths {lengths:?})"),
                &gpu[index],
                &cpu[index],
                1e-5,
            );
        }
        if lengths.is_some() {
            // Sequence 2 has one valid key: every query puts all its weight on it.
            let p = &gpu[2][2 * s.heads * seq * seq..];
            assert!(p.chunks(seq).all(|row| row[0] == 1.0 && row[1..].iter().all(|&v| v == 0.0)));
        }
    }
    let _ = gpu_device;
}

#[test]
fn contrastive_loss_and_gradient_norm_match_the_cpu() {
    let (b, e) = (19, 24);
    // image, text, logit scale, loss, logits, d_image, d_text, d_logit_scale, workspace, norm
    let inputs = [
        values(b * e, 1),
        values(b * e, 2),
        vec![2.3],
        vec![0.0],
        vec![0.0; b * b],
        vec![0.0; b * e],
        vec![0.0; b * e],
        vec![0.0],
        vec![0.0; clip_loss_workspace(b, e)],
        vec![0.0],
    ];
    let [cpu, gpu] = both(&inputs, |d, bufs| {
        let [image, text, scale, loss, logits, di, dt, ds, ws, norm] = bufs else { unreachable!() };
        let out = ClipLossOut {
            loss: loss.view_mut(),
            logits: logits.view_mut(),
            d_image: di.view_mut(),
            d_text: dt.view_mut(),
            d_logit_scale: ds.view_mut(),
        };
        clip_loss(d, out, image.view(), text.view(), scale.view(), ws.view_mut(), b, e).unwrap();
        grad_norm(d, norm.view_mut(), di.view()).unwrap();
    });
    // Reductions over B and E in another order, exp/ln an ulp apart: 1e-5 of each tensor's scale.
    for (index, name) in
        [(3, "loss"), (4, "logits"), (5, "d_image"), (6, "d_text"), (7, "d_logit_scale"), (9, "grad_norm")]
    {
        assert_close(name, &gpu[index], &cpu[index], 1e-5);
    }
    assert!(cpu[3][0] > 0.0 && cpu[9][0] > 0.0, "a loss and a norm that could not be zero");
}
