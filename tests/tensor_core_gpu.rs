//! The tensor-core path (cp.async → ldmatrix → mma.sync, `kernels/src/mma_tile.rs`) against a
//! CPU matrix product: on the emulator in `cargo test` bit for bit (it accumulates in k order as
//! the reference does), on a CUDA GPU (`CLIP_PGS_TEST_DEVICE=cuda`) within a tolerance (how
//! tensor cores round inside an mma is not documented).

mod common;

use clip_pgs_host::{Device, bf16};
use clip_pgs_kernels::mma_tile::{THREADS, mma_tile_bf16};
use clip_pgs_kernels::philox::Philox;
use cudarc::driver::LaunchConfig;

fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<bf16> {
    let rng = Philox::new(seed, 0, 0);
    (0..(rows * cols) as u32).map(|i| bf16::from_f32(rng.uniform(i) * 2.0 - 1.0)).collect()
}

#[test]
fn tensor_core_tiles_multiply_as_the_cpu_does() {
    let gpu = common::gpu();
    for (m, n, k) in [(16, 8, 16), (32, 24, 48), (64, 64, 128)] {
        let (a, b) = (matrix(m, k, 1), matrix(k, n, 2));
        let mut want = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for kk in 0..k {
                    acc += a[i * k + kk].to_f32() * b[kk * n + j].to_f32();
                }
                want[i * n + j] = acc;
            }
        }
        let (a_dev, b_dev) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
        let mut c = gpu.alloc_zeros::<f32>(m * n, "C").unwrap();
        let cfg = LaunchConfig {
            grid_dim: ((n / 8) as u32, (m / 16) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the buffers hold m·k, k·n and m·n elements; sizes are multiples of the tiles.
        unsafe { gpu.launch(&mma_tile_bf16, cfg, (&a_dev, &b_dev, &mut c, n as u32, k as u32)) }.unwrap();
        let got = c.to_vec().unwrap();
        if matches!(gpu, Device::Emu(_)) {
            assert_eq!(got, want, "{m}×{n}×{k}: the emulated mma differs from the k-ordered CPU product");
        } else {
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-3 * k as f32, "{m}×{n}×{k}: max abs error {worst}");
        }
    }
}
