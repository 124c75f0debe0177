//! The model's ops that have GPU kernels, on a GPU device against the CPU reference, bit for bit
//! (emulator in `cargo test`, CUDA with `CLIP_PGS_TEST_DEVICE=cuda`). So far: the elementwise
//! ops (`kernels/src/elementwise.rs`), GELU forward and backward (`kernels/src/gelu.rs`) and the
//! AdamW update (`kernels/src/adamw.rs`). GELU uses `fast_exp` (PTX `ex2.approx` on a GPU, the
//! correctly rounded exp2 on the host and the emulator): on CUDA it agrees to 2e-6 relative, not
//! to the bit.

mod common;

use clip_pgs_host::ops::adamw::{AdamW, AdamWStep, adamw_update};
use clip_pgs_host::ops::elementwise::{add, add_assign, clamp, fill};
use clip_pgs_host::ops::gelu::{gelu_backward, gelu_forward};
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
