//! One CPU training step (forward, backward, AdamW) of the CLIP model, for a small config and for
//! ViT-B/16 at batch 2; random images and real captions. Threads: rayon's default (RAYON_NUM_THREADS).
//!   cargo bench --bench train_step
//! tools/bench_train_step.sh runs this and the same step in PyTorch (tools/bench_step_torch.py)
//! with the same thread count and writes benches/results/train_step_cpu.md.

use clip_pgs_host::ops::adamw::AdamW;
use clip_pgs_kernels::philox::Philox;
use clip_pgs_model::clip::{Batch, Clip};
use clip_pgs_model::config::ClipConfig;
use clip_pgs_model::init::standard_normal;
use clip_pgs_model::optimizer::Optimizer;
use clip_pgs_model::params::Params;
use clip_pgs_model::tokenizer::ClipTokenizer;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const CAPTIONS: [&str; 4] =
    ["a photo of a cat", "a red circle left of a blue square", "an astronaut on the moon", "a cup of coffee"];

fn step(c: &mut Criterion, config: &str, batch: usize) {
    let cfg = ClipConfig::load(config).unwrap();
    let tokenizer = ClipTokenizer::new().unwrap();
    let ctx = cfg.text_cfg.context_length;
    let text: Vec<u32> = (0..batch).flat_map(|i| tokenizer.tokenize(CAPTIONS[i % 4], ctx).unwrap()).collect();
    let size = cfg.vision_cfg.image_size;
    let rng = Philox::new(1, 0, 0);
    let images: Vec<f32> = (0..batch * 3 * size * size).map(|i| standard_normal(&rng, i as u32)).collect();
    let mut params = Params::init(&cfg, 0);
    let adamw = AdamW { lr: 5e-4, beta1: 0.9, beta2: 0.98, eps: 1e-6 };
    let mut opt = Optimizer::new(&cfg, adamw, 0.2);
    let mut grads = Params::zeros(&cfg);
    let clip = Clip { cfg: &cfg, grad_checkpointing: false };
    let batch_data = Batch { images: &images, text: &text, keep: None };
    let mut group = c.benchmark_group("train_step_cpu");
    group.sample_size(10).throughput(Throughput::Elements(batch as u64));
    group.bench_function(format!("{config}_batch{batch}"), |b| {
        b.iter(|| {
            let (out, cache) = clip.forward(&params, &batch_data);
            clip.backward(&params, &batch_data, &cache, &mut grads);
            opt.step(&mut params, &grads);
            out.loss
        })
    });
    group.finish();
}

fn train_step(c: &mut Criterion) {
    step(c, "test-tiny", 32);
    step(c, "ViT-B-16", 2);
}

criterion_group!(benches, train_step);
criterion_main!(benches);
