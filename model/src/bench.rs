//! The training-step workload that `benches/train_step.rs` (criterion) and `clip-pgs bench step`
//! (one process per measurement, interleaved with PyTorch's by `tools/bench_train_step.sh`)
//! time: forward, contrastive loss, backward and AdamW on random images and real captions.

use clip_pgs_host::Device;
use clip_pgs_host::ops::adamw::AdamW;
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
    images: Vec<f32>,
    text: Vec<u32>,
}

impl StepWorkload {
    /// `config` (a built-in name or a JSON file) at `batch` images, open_clip's AdamW settings.
    pub fn new(config: &str, batch: usize) -> Result<Self, String> {
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
        let device = Device::Cpu;
        let params = Params::init(&cfg, 0, &device)?;
        let optimizer = Optimizer::new(&params.layout, &device, adamw, 0.2)?;
        let step = TrainStep::new(device, &cfg, params, optimizer, batch, 1, false)?;
        Ok(StepWorkload { cfg, batch, step, images, text })
    }

    /// One training step (the trainer's step function, every patch kept); returns the loss.
    pub fn step(&mut self) -> Result<f32, String> {
        let loss = self.step.forward_backward(&self.images, &self.text, StepMasks::All)?.loss;
        self.step.grad_norm()?;
        self.step.update(5e-4, None)?;
        Ok(loss)
    }
}
