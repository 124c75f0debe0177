//! A training step on a GPU device reads nothing back to the host: masks, forward, loss,
//! backward, gradient norm, AdamW (which decides on the device whether the step applies) and the
//! trainer's per-step history run without a host read, so a step never waits for the GPU; the
//! trainer reads a whole logging interval at once. Counted with `clip_pgs_host::device_reads` on
//! the GPU test device (emu in `cargo test`, cuda with `CLIP_PGS_TEST_DEVICE=cuda`), around
//! steady-state bf16 steps of test-tiny with PGS masks made on the device (epoch 1: the patch
//! tokens' similarity), two micro-batches and gradient clipping. One test in its own binary: the
//! counter is per process.

mod common;

use clip_pgs_host::device_reads;
use clip_pgs_host::ops::adamw::AdamW;
use clip_pgs_host::ops::edge_map::ImageBatchShape;
use clip_pgs_host::ops::pgs::{MaskRatio, MaskRequest, MaskStep, Masking, PgsConfig, PgsMode};
use clip_pgs_kernels::philox::Philox;
use clip_pgs_model::config::ClipConfig;
use clip_pgs_model::optimizer::Optimizer;
use clip_pgs_model::params::Params;
use clip_pgs_model::step::{StepMasks, TrainStep};
use clip_pgs_model::train::history::StepHistory;

#[test]
fn a_training_step_makes_no_host_read() {
    let cfg = ClipConfig::load("test-tiny").unwrap();
    let device = common::gpu();
    let params = Params::init(&cfg, 1, &device).unwrap();
    let adamw = AdamW { beta1: 0.9, beta2: 0.98, eps: 1e-6 };
    let optimizer = Optimizer::new(&params.layout, &device, adamw, 0.1).unwrap();
    let (n, ctx, size) = (8, cfg.text_cfg.context_length, cfg.vision_cfg.image_size);
    let mut step: TrainStep<clip_pgs_host::bf16> =
        TrainStep::new(device.clone(), &cfg, params, optimizer, n, 2, false).unwrap();
    let rng = Philox::new(2, 0, 0);
    let images: Vec<f32> = (0..(n * 3 * size * size) as u32).map(|i| rng.uniform(i) - 0.5).collect();
    let text: Vec<u32> = (0..(n * ctx) as u32).map(|i| if i as usize % ctx < 6 { 1 + i % 200 } else { 0 }).collect();
    let masking = Masking::Pgs(PgsConfig {
        mode: PgsMode::Paper,
        ratio: MaskRatio::Dynamic { min: 0.3, max: 0.5 },
        use_ed: true,
        use_otn: true,
    });
    let mut history = StepHistory::new(&device, 8).unwrap();
    let mut take_step = |number: usize| {
        let request = MaskRequest {
            shape: ImageBatchShape { n, height: size, width: size },
            patch: cfg.vision_cfg.patch_size,
            masking,
            at: MaskStep { seed: 3, step: number as u32, first: 0, epoch: 1, epochs: 4 },
        };
        step.forward_backward(&images, &text, StepMasks::Make(request)).unwrap();
        step.grad_norm().unwrap();
        step.update(1e-3, Some(1.0)).unwrap();
        history.record(&step, number).unwrap();
    };
    take_step(0);
    let before = device_reads();
    for number in 1..4 {
        take_step(number);
    }
    assert_eq!(device_reads() - before, 0, "host reads of device memory in three training steps");
    let records = history.take().unwrap();
    assert_eq!(device_reads() - before, 1, "the history comes back in one read");
    assert_eq!(records.iter().map(|r| r.step).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert!(records.iter().all(|r| r.applied() && r.loss > 0.0 && r.norm > 0.0), "{records:?}");
    assert_eq!(step.optimizer.steps().unwrap(), 4, "every step applied, counted on the device");
    // PGS-0.3 dynamic masks floor(0.3·L) to floor(0.5·L) patches per image (L = 16: 4 to 8),
    // the sequence padded on the device to the most kept.
    let masked = step.masked_fraction().unwrap();
    assert!((0.25..=0.5).contains(&masked), "masked fraction {masked}");
}
