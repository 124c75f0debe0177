//! CPU edge map (the f32 reference) on a batch of 64 images at 224×224, patch 16 (ViT-B/16).
//!   cargo bench --bench edge_map
//! GPU kernels are to be timed with CUDA events (not criterion) once a GPU run is possible.

use clip_pgs_host::ops::edge_map::{ImageBatchShape, PatchGrid, edge_map_cpu};
use clip_pgs_kernels::philox::Philox;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn edge_map_batch_64(c: &mut Criterion) {
    let shape = ImageBatchShape { n: 64, height: 224, width: 224 };
    let rng = Philox::new(0, 0, 0);
    let images: Vec<f32> = (0..shape.len() as u32).map(|i| rng.uniform(i) * 4.0 - 2.0).collect();
    let grid = PatchGrid::new(224, 224, 16).unwrap();
    let mut group = c.benchmark_group("edge_map_cpu");
    group.throughput(Throughput::Bytes((shape.len() * 4) as u64));
    group.sample_size(10);
    group.bench_function("64x3x224x224_f32_patch16", |b| b.iter(|| edge_map_cpu(&images, shape, grid)));
    group.finish();
}

criterion_group!(benches, edge_map_batch_64);
criterion_main!(benches);
