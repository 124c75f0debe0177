//! A training step captured into a graph and replayed gives the same bits as the same steps run
//! launch by launch: `TrainStep::step` with `capture` against `capture = false`, from the same
//! initialisation, over steps whose learning rate, mask step and α change (PGS paper masks made on
//! the device from the patch tokens, two micro-batches, clipping; FLIP in f32). A value frozen
//! into the graph at capture (a scalar launch argument instead of device memory) makes the
//! replayed steps drift from the uncaptured ones, and the test fail. On the GPU test device (emu
//! in `cargo test`: the emulator records the launches, matmuls and copies of the captured step
//! and refuses any host access to device memory while capturing; cuda with
//! `CLIP_PGS_TEST_DEVICE=cuda`, a CUDA graph).

mod common;

use clip_pgs_host::ops::adamw::AdamW;
use clip_pgs_host::ops::edge_map::ImageBatchShape;
use clip_pgs_host::ops::pgs::{MaskRatio, MaskRequest, MaskStep, Masking, PgsConfig, PgsMode};
use clip_pgs_host::{Device, bf16};
use clip_pgs_kernels::philox::Philox;
use clip_pgs_model::config::ClipConfig;
use clip_pgs_model::optimizer::Optimizer;
use clip_pgs_model::params::Params;
use clip_pgs_model::precision::Precision;
use clip_pgs_model::step::{StepMasks, TrainStep};

/// The losses of `steps` steps of test-tiny on `device`, captured or not, and the final
/// parameters; every step's batch is the same, so the masks change only through the clock.
fn train<T: Precision>(
    device: &Device,
    capture: bool,
    masking: Masking,
    accum: usize,
    steps: usize,
) -> (Vec<f32>, Vec<f32>, Option<usize>) {
    let cfg = ClipConfig::load("test-tiny").unwrap();
    let params = Params::init(&cfg, 1, device).unwrap();
    let adamw = AdamW { beta1: 0.9, beta2: 0.98, eps: 1e-6 };
    let optimizer = Optimizer::new(&params.layout, device, adamw, 0.1).unwrap();
    let (n, ctx, size) = (8, cfg.text_cfg.context_length, cfg.vision_cfg.image_size);
    let mut step: TrainStep<T> = TrainStep::new(device.clone(), &cfg, params, optimizer, n, accum, false).unwrap();
    step.capture = capture;
    let rng = Philox::new(2, 0, 0);
    let images: Vec<f32> = (0..(n * 3 * size * size) as u32).map(|i| rng.uniform(i) - 0.5).collect();
    let text: Vec<u32> = (0..(n * ctx) as u32).map(|i| if i as usize % ctx < 6 { 1 + i % 200 } else { 0 }).collect();
    let mut losses = vec![];
    for number in 0..steps {
        let request = MaskRequest {
            shape: ImageBatchShape { n, height: size, width: size },
            patch: cfg.vision_cfg.patch_size,
            masking,
            // α = epoch / 4 grows at step 3.
            at: MaskStep { seed: 3, step: number as u32, first: 0, epoch: 1 + number / 3, epochs: 4 },
        };
        let lr = 1e-3 / (1 + number) as f32;
        step.step(&images, &text, StepMasks::Make(request), lr, Some(1.0)).unwrap();
        losses.push(step.loss().unwrap());
    }
    (losses, step.params.data.to_vec().unwrap(), step.captured_work())
}

fn check_replays_match<T: Precision>(masking: Masking, accum: usize) {
    let device = common::gpu();
    let steps = 5;
    let (want_losses, want_params, none) = train::<T>(&device, false, masking, accum, steps);
    assert_eq!(none, None, "nothing is captured without `capture`");
    let (losses, params, recorded) = train::<T>(&device, true, masking, accum, steps);
    if matches!(device, Device::Emu(_)) {
        // Masks, both towers forward and backward, the loss, the norm and AdamW: many launches.
        assert!(recorded.is_some_and(|r| r > 50), "the captured step recorded {recorded:?} pieces of work");
    }
    assert!(want_losses.windows(2).all(|w| w[0] != w[1]), "the steps differ: {want_losses:?}");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&losses), bits(&want_losses), "losses {losses:?} vs uncaptured {want_losses:?}");
    let differ = params.iter().zip(&want_params).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    assert_eq!(differ, 0, "{differ} of {} parameters differ from the uncaptured steps'", params.len());
}

#[test]
fn replayed_bf16_pgs_steps_are_the_uncaptured_steps_bit_for_bit() {
    let masking = Masking::Pgs(PgsConfig {
        mode: PgsMode::Paper,
        ratio: MaskRatio::Dynamic { min: 0.3, max: 0.5 },
        use_ed: true,
        use_otn: true,
    });
    check_replays_match::<bf16>(masking, 2);
}

#[test]
fn replayed_f32_flip_steps_are_the_uncaptured_steps_bit_for_bit() {
    check_replays_match::<f32>(Masking::Flip { ratio: 0.5 }, 1);
}
