//! Philox on a GPU device draws exactly what it draws on the CPU (emulator in `cargo test`,
//! CUDA with `CLIP_PGS_TEST_DEVICE=cuda`).

mod common;

use clip_pgs_host::Device;
use clip_pgs_host::ops::random::uniform;

#[test]
fn gpu_philox_uniforms_are_bit_identical_to_cpu() {
    let gpu = common::gpu();
    for (n, seed, a, b) in [(1, 0, 0, 0), (1000, 42, 3, 7), (1 << 20, u64::MAX, u32::MAX, 1)] {
        let got = uniform(&gpu, n, seed, a, b).unwrap().to_vec().unwrap();
        let want = uniform(&Device::Cpu, n, seed, a, b).unwrap().to_vec().unwrap();
        let differ = got.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
        assert_eq!(differ, 0, "{differ} of {n} draws differ for seed {seed}, stream ({a}, {b})");
    }
}
