//! The model's ops that have GPU kernels, on a GPU device against the CPU reference, bit for bit
//! (emulator in `cargo test`, CUDA with `CLIP_PGS_TEST_DEVICE=cuda`). So far: the elementwise
//! ops (`kernels/src/elementwise.rs`).

mod common;

use clip_pgs_host::ops::elementwise::{add, add_assign, clamp, fill};
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
