//! EXPERIMENT (not kept): the separate dQ pass's traffic against the atomics'.
use clip_pgs_host::ops::attention::{
    AttentionShape, Sequences, flash_attention_backward, flash_attention_forward, flash_backward_scratch_len,
};
use clip_pgs_host::{Device, bf16};
use clip_pgs_kernels::philox::Philox;
use cudarc::driver::LaunchConfig;

fn qkv_values(n: usize, seed: u64) -> Vec<f32> {
    let rng = Philox::new(seed, 3, 0);
    (0..n as u32).map(|i| bf16::from_f32(rng.uniform(i) * 2.0 - 1.0).to_f32()).collect()
}

#[test]
fn dq_pass_experiment() {
    use clip_pgs_host::emu::EmuRuntime;
    use clip_pgs_kernels::hw::emu::Options;
    let emu = EmuRuntime::new(Options { counters: true, ..Options::default() });
    let device = Device::Emu(emu.clone());
    let (s, lengths) =
        (AttentionShape { batch: 3, seq: 197, heads: 2, head_dim: 64, causal: false }, vec![197u32, 99, 1]);
    let w = s.heads * s.head_dim;
    let n = s.batch * s.seq * w;
    let (qkv, mut dout) = (qkv_values(3 * n, 9), qkv_values(n, 10));
    for (row, chunk) in dout.chunks_mut(w).enumerate() {
        if row % s.seq >= lengths[row / s.seq] as usize {
            chunk.fill(0.0);
        }
    }
    let up = |x: &[f32]| device.upload(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).unwrap();
    let (qkv_b, dout_b) = (up(&qkv), up(&dout));
    let mut out = up(&vec![0.0; n]);
    let mut lse = device.upload(&vec![0.0f32; s.batch * s.heads * s.seq]).unwrap();
    let lens = device.upload(&lengths).unwrap();
    flash_attention_forward(
        &device,
        out.view_mut(),
        lse.view_mut(),
        qkv_b.view(),
        Sequences::Padded(Some(lens.view())),
        s,
    )
    .unwrap();
    let mut dqkv = device.upload(&vec![bf16::NAN; 3 * n]).unwrap();
    let mut scratch = device.upload(&vec![f32::NAN; flash_backward_scratch_len(s)]).unwrap();
    emu.keep_reports();
    flash_attention_backward(
        &device,
        dqkv.view_mut(),
        scratch.view_mut(),
        dout_b.view(),
        qkv_b.view(),
        out.view(),
        lse.view(),
        Sequences::Padded(Some(lens.view())),
        s,
    )
    .unwrap();
    let mut dq2 = device.upload(&vec![bf16::ZERO; 3 * n]).unwrap();
    let cfg = LaunchConfig {
        grid_dim: (s.seq.div_ceil(64) as u32, s.heads as u32, s.batch as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 4 * 128 * 64,
    };
    let none: Option<clip_pgs_host::View<u32>> = None;
    let args = (
        dq2.view_mut(),
        qkv_b.view(),
        dout_b.view(),
        lse.view(),
        scratch.view().skip(n),
        Some(lens.view()),
        none,
        s.seq as u32,
        s.heads as u32,
        0u32,
        0.125f32,
    );
    unsafe { device.launch(&clip_pgs_kernels::flash_attention::flash_attention_dq_pass_d64, cfg, args).unwrap() };
    let reports = emu.take_reports();
    let (a, b) = (dqkv.to_vec().unwrap(), dq2.to_vec().unwrap());
    let mut worst = 0.0f32;
    let mut big = 0.0f32;
    for r in 0..s.batch * s.seq {
        if r % s.seq >= lengths[r / s.seq] as usize {
            continue;
        }
        for c in 0..w {
            let (x, y) = (a[r * 3 * w + c].to_f32(), b[r * 3 * w + c].to_f32());
            worst = worst.max((x - y).abs());
            big = big.max(x.abs());
        }
    }
    println!("dq pass vs atomics: worst diff {worst}, largest {big}");
    let mut atomics_total = 0;
    let mut pass_total = 0;
    for r in &reports {
        let bytes = r.traffic.sector_bytes();
        let removed: u64 = r
            .traffic
            .sites
            .iter()
            .filter(|x| x.site.line() == 491 || x.site.line() == 648)
            .map(|x| 32 * x.sectors)
            .sum();
        println!("{}: {} bytes, of which zeroing/atomics {}", r.kernel, bytes, removed);
        if r.kernel == "flash_attention_dq_pass_d64" {
            pass_total += bytes;
        } else {
            atomics_total += bytes;
            if r.kernel != "flash_attention_backward_dq" {
                pass_total += bytes - removed;
            }
        }
    }
    println!(
        "atomics design: {atomics_total} bytes; separate pass design: {pass_total} bytes ({:.3}×)",
        pass_total as f64 / atomics_total as f64
    );
    assert!(worst <= 2e-2 * big);
}
