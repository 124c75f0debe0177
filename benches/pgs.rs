//! The CPU PGS pipeline (the reference) on a batch of 64 images at 224×224, patch 16 (ViT-B/16),
//! pixel similarity only (epoch 0), real photos from tests/data cycled:
//!   cargo bench --bench pgs

use std::path::Path;

use clip_pgs_host::ops::edge_map::ImageBatchShape;
use clip_pgs_host::ops::pgs::{MaskRatio, MaskRequest, MaskStep, Masking, PgsConfig, PgsMode, mask_cpu};
use criterion::{Criterion, criterion_group, criterion_main};

fn photos(n: usize) -> Vec<f32> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let photos: Vec<Vec<f32>> = ["astronaut", "coffee", "chelsea"]
        .iter()
        .map(|name| {
            clip_pgs_model::preprocess::load_image(&root.join(format!("{name}_224.png")), 224).unwrap().normalized
        })
        .collect();
    (0..n).flat_map(|i| photos[i % photos.len()].clone()).collect()
}

fn pgs_batch_64(c: &mut Criterion) {
    let shape = ImageBatchShape { n: 64, height: 224, width: 224 };
    let images = photos(shape.n);
    let at = MaskStep { seed: 0, step: 0, first: 0, epoch: 0, epochs: 32 };
    let pgs = |mode, ratio| Masking::Pgs(PgsConfig { mode, ratio, use_ed: true, use_otn: true });
    let mut group = c.benchmark_group("pgs_cpu_64x224x224_patch16");
    group.sample_size(10);
    for (name, masking) in [
        ("flip_0.5", Masking::Flip { ratio: 0.5 }),
        ("paper_0.5", pgs(PgsMode::Paper, MaskRatio::Fixed(0.5))),
        ("paper_dynamic", pgs(PgsMode::Paper, MaskRatio::Dynamic { min: 0.3, max: 0.5 })),
        ("reference_0.5", pgs(PgsMode::Reference, MaskRatio::Fixed(0.5))),
    ] {
        let request = MaskRequest { shape, patch: 16, masking, at };
        group.bench_function(name, |b| b.iter(|| mask_cpu(&request, &images, None).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, pgs_batch_64);
criterion_main!(benches);
