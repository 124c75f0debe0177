//! The edge-map kernels on a GPU device against the CPU reference: on the emulator in
//! `cargo test`, on a CUDA GPU with `CLIP_PGS_TEST_DEVICE=cuda` (see README).

mod common;

use clip_pgs_host::ops::edge_map::{ImageBatchShape, edge_map};
use clip_pgs_host::{Buffer, Device, bf16};
use common::{noise_batch, photo_batch};

/// The bound: 1e-5 relative (E ∈ [0, 1], so relative to max(1, |E|)).
const TOLERANCE: f32 = 1e-5;

/// Runs the edge map on the GPU and on the CPU for the same pixels (f32, then bf16) and compares.
fn compare(gpu: &Device, images: &[f32], shape: ImageBatchShape, patch: usize, what: &str) {
    let bf: Vec<bf16> = images.iter().map(|&v| bf16::from_f32(v)).collect();
    let widened: Vec<f32> = bf.iter().map(|v| v.to_f32()).collect();
    for (dtype, cpu_input, gpu_result) in [
        ("f32", images, edge_map(gpu, &gpu.upload(images).unwrap(), shape, patch)),
        ("bf16", &widened[..], edge_map(gpu, &gpu.upload(&bf).unwrap(), shape, patch)),
    ] {
        let got = gpu_result.unwrap_or_else(|e| panic!("{what} {dtype}: {e}")).to_vec().unwrap();
        let want = edge_map(&Device::Cpu, &Buffer::Cpu(cpu_input.to_vec()), shape, patch).unwrap().to_vec().unwrap();
        assert_eq!(got.len(), want.len());
        let worst = got.iter().zip(&want).map(|(g, c)| (g - c).abs() / c.abs().max(1.0)).fold(0.0f32, f32::max);
        let identical = got.iter().zip(&want).filter(|(g, c)| g.to_bits() == c.to_bits()).count();
        println!("{what} {dtype}: max rel error {worst:.2e}, {identical}/{} values bit-identical", got.len());
        assert!(worst <= TOLERANCE, "{what} {dtype}: GPU differs from the CPU reference by {worst}");
    }
}

#[test]
fn gpu_edge_map_matches_cpu_on_real_photos() {
    let gpu = common::gpu();
    println!("device: {gpu}");
    for size in common::SIZES {
        let (images, shape) = photo_batch(size);
        compare(&gpu, &images, shape, 16, &format!("photos {size}×{size}/16"));
    }
}

#[test]
fn gpu_edge_map_matches_cpu_on_many_shapes() {
    let gpu = common::gpu();
    for (n, height, width, patch) in
        [(64, 224, 224, 16), (3, 48, 80, 8), (2, 36, 36, 4), (5, 20, 30, 1), (1, 224, 224, 14)]
    {
        let shape = ImageBatchShape { n, height, width };
        let images = noise_batch(shape, n as u64);
        compare(&gpu, &images, shape, patch, &format!("noise {n}×{height}×{width}/{patch}"));
    }
}

#[test]
fn gpu_rejects_bad_arguments_with_clear_errors() {
    let gpu = common::gpu();
    let shape = ImageBatchShape { n: 1, height: 30, width: 32 };
    let images = gpu.upload(&vec![0.0f32; shape.len()]).unwrap();
    let error = |r: clip_pgs_host::Result<Buffer<f32>>| r.err().expect("should fail").to_string();
    assert!(error(edge_map(&gpu, &images, shape, 16)).contains("does not divide"));
    // Too wide for one block's shared memory: refused before launch.
    let wide = ImageBatchShape { n: 1, height: 2, width: 1 << 16 };
    let wide_images = gpu.upload(&vec![0.0f32; wide.len()]).unwrap();
    assert!(error(edge_map(&gpu, &wide_images, wide, 2)).contains("shared memory"));
    // Host memory handed to the GPU device.
    let host = Buffer::Cpu(vec![0.0f32; shape.len()]);
    assert!(error(edge_map(&gpu, &host, shape, 2)).contains("wrong device"));
}
