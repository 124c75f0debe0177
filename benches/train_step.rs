//! One CPU training step (forward, backward, AdamW) of the CLIP model, for a small config and for
//! ViT-B/16 at batch 2; random images and real captions (`clip_pgs_model::bench`). Threads:
//! rayon's default (RAYON_NUM_THREADS).
//!   cargo bench --bench train_step
//! The comparison with PyTorch runs the same workload through `clip-pgs bench step`, interleaved
//! with the peer: tools/bench_train_step.sh.

use clip_pgs_host::Device;
use clip_pgs_host::ops::pgs::Masking;
use clip_pgs_model::bench::StepWorkload;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn step(c: &mut Criterion, config: &str, batch: usize) {
    let mut workload: StepWorkload = StepWorkload::new(config, batch, Device::Cpu, Masking::None).unwrap();
    let mut group = c.benchmark_group("train_step_cpu");
    group.sample_size(10).throughput(Throughput::Elements(batch as u64));
    group.bench_function(format!("{config}_batch{batch}"), |b| b.iter(|| workload.step().unwrap()));
    group.finish();
}

fn train_step(c: &mut Criterion) {
    step(c, "test-tiny", 32);
    step(c, "ViT-B-16", 2);
}

criterion_group!(benches, train_step);
criterion_main!(benches);
