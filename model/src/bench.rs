//! The training-step workload that `benches/train_step.rs` (criterion) and `clip-pgs bench step`
//! (one process per measurement, interleaved with PyTorch's by `tools/bench_train_step.sh`)
//! time: the masks (none, FLIP or PGS), forward, contrastive loss, backward and AdamW on random
//! images and real captions, on any device.

use clip_pgs_host::Device;
use clip_pgs_host::ops::adamw::AdamW;
use clip_pgs_host::ops::edge_map::ImageBatchShape;
use clip_pgs_host::ops::pgs::{MaskRequest, MaskStep, Masking};
use clip_pgs_kernels::philox::Philox;

use crate::config::ClipConfig;
use crate::init::standard_normal;
use crate::optimizer::Optimizer;
use crate::params::Params;
use crate::step::{StepMasks, TrainStep};
use crate::tokenizer::ClipTokenizer;

const CAPTIONS: [&str; 4] =
    ["a photo of a cat", "a red circle left of a blue square", "an astronaut on the moon", "a cup of coffee"];

/// A model, its optimizer and one batch, ready to take steps.
pub struct StepWorkload {
    pub cfg: ClipConfig,
    pub batch: usize,
    pub step: TrainStep,
    masking: Masking,
    steps: u32,
    images: Vec<f32>,
    text: Vec<u32>,
}

impl StepWorkload {
    /// `config` (a built-in name or a JSON file) at `batch` images on `device`, masked by
    /// `masking` (PGS in its second epoch of 32: token similarity on), open_clip's AdamW
    /// settings.
    pub fn new(config: &str, batch: usize, device: Device, masking: Masking) -> Result<Self, String> {
        let cfg = ClipConfig::load(config).map_err(|e| e.to_string())?;
        let tokenizer = ClipTokenizer::new().map_err(|e| e.to_string())?;
        let ctx = cfg.text_cfg.context_length;
        let mut text = Vec::with_capacity(batch * ctx);
        for i in 0..batch {
            text.extend(tokenizer.tokenize(CAPTIONS[i % 4], ctx).map_err(|e| e.to_string())?);
        }
        let rng = Philox::new(1, 0, 0);
        let images =
            (0..batch * 3 * cfg.vision_cfg.image_size.pow(2)).map(|i| standard_normal(&rng, i as u32)).collect();
        let adamw = AdamW { lr: 5e-4, beta1: 0.9, beta2: 0.98, eps: 1e-6 };
        let params = Params::init(&cfg, 0, &device)?;
        let optimizer = Optimizer::new(&params.layout, &device, adamw, 0.2)?;
        let step = TrainStep::new(device, &cfg, params, optimizer, batch, 1, false)?;
        Ok(StepWorkload { cfg, batch, step, masking, steps: 0, images, text })
    }

    /// One training step (the trainer's step function); returns the loss.
    pub fn step(&mut self) -> Result<f32, String> {
        let v = &self.cfg.vision_cfg;
        let masks = match self.masking {
            Masking::None => StepMasks::All,
            masking => StepMasks::Make(MaskRequest {
                shape: ImageBatchShape { n: self.batch, height: v.image_size, width: v.image_size },
                patch: v.patch_size,
                masking,
                at: MaskStep { seed: 0, step: self.steps, epoch: 1, epochs: 32 },
            }),
        };
        self.steps += 1;
        let loss = self.step.forward_backward(&self.images, &self.text, masks)?.loss;
        self.step.grad_norm()?;
        self.step.update(5e-4, None)?;
        Ok(loss)
    }
}
