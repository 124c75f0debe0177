//! A data-parallel step on a GPU device computes the contrastive loss on the device
//! (`model/src/distributed/device_loss.rs`): no host read of the features (the host path reads
//! them back, counted by `clip_pgs_host::device_reads`), and in a world of one rank the loss and
//! gradients of the one-process step, with and without `--gather-with-grad`. The 2-rank runs
//! are `tests/distributed.rs`'s. One test in its own binary: the counter is per process.

mod common;

use std::sync::Arc;

use clip_pgs_host::device_reads;
use clip_pgs_host::ops::adamw::AdamW;
use clip_pgs_kernels::philox::Philox;
use clip_pgs_model::config::ClipConfig;
use clip_pgs_model::distributed::{DataParallel, Solo};
use clip_pgs_model::optimizer::Optimizer;
use clip_pgs_model::params::Params;
use clip_pgs_model::step::{StepMasks, TrainStep};

#[test]
fn a_data_parallel_step_computes_the_loss_on_the_device() {
    let cfg = ClipConfig::load("test-tiny").unwrap();
    let device = common::gpu();
    let (n, ctx, size) = (8, cfg.text_cfg.context_length, cfg.vision_cfg.image_size);
    let rng = Philox::new(5, 0, 0);
    let images: Vec<f32> = (0..(n * 3 * size * size) as u32).map(|i| rng.uniform(i) - 0.5).collect();
    let text: Vec<u32> = (0..(n * ctx) as u32).map(|i| if i as usize % ctx < 6 { 1 + i % 200 } else { 0 }).collect();
    // (loss, gradients, host reads) of one step of the same model, in a world of one rank or none.
    let step = |data_parallel: Option<DataParallel>| {
        let params = Params::init(&cfg, 1, &device).unwrap();
        let adamw = AdamW { beta1: 0.9, beta2: 0.98, eps: 1e-6 };
        let optimizer = Optimizer::new(&params.layout, &device, adamw, 0.1).unwrap();
        let mut step: TrainStep<f32> = TrainStep::new(device.clone(), &cfg, params, optimizer, n, 1, false).unwrap();
        step.data_parallel = data_parallel;
        let before = device_reads();
        step.forward_backward(&images, &text, StepMasks::All).unwrap();
        let reads = device_reads() - before;
        (step.loss().unwrap(), step.grads.data.to_vec().unwrap(), reads)
    };
    let (loss, grads, _) = step(None);
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    for gather_with_grad in [false, true] {
        let dp = DataParallel::new(Arc::new(Solo), gather_with_grad, false);
        let (dp_loss, dp_grads, reads) = step(Some(dp));
        assert_eq!(reads, 0, "--gather-with-grad {gather_with_grad}: host reads of device memory in the step");
        assert_eq!(dp_loss.to_bits(), loss.to_bits(), "--gather-with-grad {gather_with_grad}: {dp_loss} vs {loss}");
        let worst = common::max_abs_diff(&dp_grads, &grads);
        assert!(worst == 0.0, "--gather-with-grad {gather_with_grad}: gradients {worst} apart");
    }
    // The host path (--local-loss) reads the features back: the count above can tell them apart.
    let (local_loss, _, reads) = step(Some(DataParallel::new(Arc::new(Solo), true, true)));
    assert!(reads > 0, "the host path's step made no host read");
    assert!((local_loss - loss).abs() <= 1e-5 * loss, "--local-loss: {local_loss} vs {loss}");
}
