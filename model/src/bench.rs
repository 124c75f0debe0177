//! The training-step workload that `benches/train_step.rs` (criterion) and `clip-pgs bench step`
//! (one process per measurement, interleaved with PyTorch's by `tools/bench_train_step.sh`)
//! time: forward, contrastive loss, backward and AdamW on random images and real captions.

use clip_pgs_host::ops::adamw::AdamW;
use clip_pgs_kernels::philox::Philox;

use crate::clip::{Batch, Clip};
use crate::config::ClipConfig;
use crate::init::standard_normal;
use crate::optimizer::Optimizer;
use crate::params::Params;
use crate::tokenizer::ClipTokenizer;

const CAPTIONS: [&str; 4] =
    ["a photo of a cat", "a red circle left of a blue square", "an astronaut on the moon", "a cup of coffee"];

/// A model, its optimizer and one batch, ready to take steps.
pub struct StepWorkload {
    pub cfg: ClipConfig,
    pub batch: usize,
    params: Params,
    grads: Params,
    optimizer: Optimizer,
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
        let optimizer = Optimizer::new(&cfg, adamw, 0.2);
        let (params, grads) = (Params::init(&cfg, 0), Params::zeros(&cfg));
        Ok(StepWorkload { cfg, batch, params, grads, optimizer, images, text })
    }

    /// One training step; returns the loss.
    pub fn step(&mut self) -> f32 {
        let clip = Clip { cfg: &self.cfg, grad_checkpointing: false };
        let batch = Batch { images: &self.images, text: &self.text, keep: None };
        let (out, cache) = clip.forward(&self.params, &batch);
        clip.backward(&self.params, &batch, &cache, &mut self.grads);
        self.optimizer.step(&mut self.params, &self.grads);
        out.loss
    }
}
