//! A data-parallel step on a GPU device computes the contrastive loss on the device
//! (`model/src/distributed/device_loss.rs`): on the emulator no host read of the features (the
//! host path reads them back, counted by `clip_pgs_host::device_reads`), and in a world of one
//! rank the loss and gradients of the one-process step, with and without `--gather-with-grad`,
//! in f32 and bf16. The 2-rank runs are `tests/distributed.rs`'s. One test in its own binary:
//! the counter is per process.

mod common;

use std::sync::Arc;

use clip_pgs_host::device_reads;
use clip_pgs_host::ops::adamw::AdamW;
use clip_pgs_kernels::philox::Philox;
use clip_pgs_model::config::ClipConfig;
use clip_pgs_model::distributed::{DataParallel, Solo};
use clip_pgs_model::optimizer::Optimizer;
use clip_pgs_model::params::Params;
use clip_pgs_model::precision::Precision;
use clip_pgs_model::step::{StepMasks, TrainStep};

/// (loss, gradients, host reads) of one step of test-tiny in `T`, in a world of one rank or none.
fn one_step<T: Precision>(data_parallel: Option<DataParallel>) -> (f32, Vec<f32>, usize) {
    let cfg = ClipConfig::load("test-tiny").unwrap();
    let device = common::gpu();
    let (n, ctx, size) = (8, cfg.text_cfg.context_length, cfg.vision_cfg.image_size);
    let rng = Philox::new(5, 0, 0);
    let images: Vec<f32> = (0..(n * 3 * size * size) as u32).map(|i| rng.uniform(i) - 0.5).collect();
    let text: Vec<u32> = (0..(n * ctx) as u32).map(|i| if i as usize % ctx < 6 { 1 + i % 200 } else { 0 }).collect();
    let params = Params::init(&cfg, 1, &device).unwrap();
    let adamw = AdamW { beta1: 0.9, beta2: 0.98, eps: 1e-6 };
    let optimizer = Optimizer::new(&params.layout, &device, adamw, 0.1).unwrap();
    let mut step: TrainStep<T> = TrainStep::new(device, &cfg, params, optimizer, n, 1, false).unwrap();
    step.data_parallel = data_parallel;
    let before = device_reads();
    step.forward_backward(&images, &text, StepMasks::All).unwrap();
    let reads = device_reads() - before;
    (step.loss().unwrap(), step.grads.data.to_vec().unwrap(), reads)
}

/// The device path against the one-process step in `T`: the same bits in a world of one (the
/// gathered batch is the batch, and the loss runs in f32 either way).
fn device_path_is_the_one_process_step<T: Precision>() {
    let (loss, grads, _) = one_step::<T>(None);
    assert!(loss.is_finite() && loss > 0.0, "{}: loss {loss}", T::DTYPE);
    for gather_with_grad in [false, true] {
        let dp = DataParallel::new(Arc::new(Solo), gather_with_grad, false);
        let (dp_loss, dp_grads, reads) = one_step::<T>(Some(dp));
        let run = format!("{} --gather-with-grad {gather_with_grad}", T::DTYPE);
        // On cuda without NCCL (this test's world of one) the collectives go through host copies.
        if !common::gpu().is_cuda() {
            assert_eq!(reads, 0, "{run}: host reads of device memory in the step");
        }
        assert_eq!(dp_loss.to_bits(), loss.to_bits(), "{run}: {dp_loss} vs {loss}");
        let worst = common::max_abs_diff(&dp_grads, &grads);
        assert!(worst == 0.0, "{run}: gradients {worst} apart");
    }
    // The host path (--local-loss) reads the features back: the count above tells them apart.
    let (local_loss, _, reads) = one_step::<T>(Some(DataParallel::new(Arc::new(Solo), true, true)));
    assert!(reads > 0, "{}: the host path's step made no host read", T::DTYPE);
    assert!((local_loss - loss).abs() <= 1e-5 * loss, "{} --local-loss: {local_loss} vs {loss}", T::DTYPE);
}

#[test]
fn a_data_parallel_step_computes_the_loss_on_the_device() {
    device_path_is_the_one_process_step::<f32>();
    device_path_is_the_one_process_step::<clip_pgs_host::bf16>();
}
