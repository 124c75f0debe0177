//! The training-step workload that `benches/train_step.rs` (criterion) and `clip-pgs bench step`
//! (one process per measurement, interleaved with PyTorch's by `tools/bench_train_step.sh`)
//! time: the masks (none, FLIP or PGS), forward, contrastive loss, backward and AdamW on random
//! images and real captions, on any device. [`train_step_flops`] is the model FLOP count the GPU
//! benchmarks' MFU divides by (tools/bench_open_clip.py has the same formula for open_clip's step).

use clip_pgs_host::Device;
use clip_pgs_host::ops::adamw::AdamW;
use clip_pgs_host::ops::edge_map::ImageBatchShape;
use clip_pgs_host::ops::pgs::{MaskRequest, MaskStep, Masking};
use clip_pgs_kernels::philox::Philox;

use crate::config::ClipConfig;
use crate::init::standard_normal;
use crate::optimizer::Optimizer;
use crate::params::Params;
use crate::precision::Precision;
use crate::step::{StepMasks, TrainStep};
use crate::tokenizer::ClipTokenizer;

const CAPTIONS: [&str; 4] =
    ["a photo of a cat", "a red circle left of a blue square", "an astronaut on the moon", "a cup of coffee"];

/// A model, its optimizer and one batch, ready to take steps, with activations in T.
pub struct StepWorkload<T = f32> {
    pub cfg: ClipConfig,
    pub batch: usize,
    pub step: TrainStep<T>,
    masking: Masking,
    steps: u32,
    images: Vec<f32>,
    text: Vec<u32>,
}

impl<T: Precision> StepWorkload<T> {
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
        let adamw = AdamW { beta1: 0.9, beta2: 0.98, eps: 1e-6 };
        let params = Params::init(&cfg, 0, &device)?;
        let optimizer = Optimizer::new(&params.layout, &device, adamw, 0.2)?;
        let step: TrainStep<T> = TrainStep::new(device, &cfg, params, optimizer, batch, 1, false)?;
        Ok(StepWorkload { cfg, batch, step, masking, steps: 0, images, text })
    }

    /// One training step (the trainer's: on a GPU device captured into a graph at the second
    /// step and replayed from the third), with no host read.
    pub fn step(&mut self) -> Result<(), String> {
        let v = &self.cfg.vision_cfg;
        let masks = match self.masking {
            Masking::None => StepMasks::All,
            masking => StepMasks::Make(MaskRequest {
                shape: ImageBatchShape { n: self.batch, height: v.image_size, width: v.image_size },
                patch: v.patch_size,
                masking,
                at: MaskStep { seed: 0, step: self.steps, first: 0, epoch: 1, epochs: 32 },
            }),
        };
        self.steps += 1;
        self.step.step(&self.images, &self.text, masks, 5e-4, None)
    }

    /// The last step's loss (a host read: waits for the device).
    pub fn loss(&self) -> Result<f32, String> {
        self.step.loss()
    }
}

/// Model FLOPs of one training step (forward, backward) of `cfg` at `batch` images and captions,
/// with `kept` patches of the L per image left by the masks (L when unmasked): what the step must
/// compute, not what an implementation happens to run. 2 FLOPs per multiply-add; the backward of a
/// matrix product is two products of its size (input and weight gradients), so a step is
/// 3 × the forward:
///
/// - every linear layer, 6 × its multiply-adds: the patch embedding (3·p² → width, on all L
///   patches: PGS and open_clip's patch dropout embed every patch, then drop), per block of each
///   tower q/k/v (w → 3w), the attention output (w → w) and the MLP (w → m → w) on each token of the
///   sequence (image: 1 + `kept` with the class token; text: the context length), and the two
///   projections to `embed_dim` (one pooled token per image and per caption);
/// - attention's score and value products, per block 2 · s² · w multiply-adds forward (all heads;
///   the text tower's causal mask does not shrink the dense products), 3× that for the step.
///
/// Left out: the embeddings (lookups), layer norms, softmax, GELU, biases, the optimizer and the
/// logits (batch² · embed_dim: 3·10⁻⁶ of a ViT-B/16 step at batch 256).
pub fn train_step_flops(cfg: &ClipConfig, batch: usize, kept: usize) -> u64 {
    let (v, t) = (&cfg.vision_cfg, &cfg.text_cfg);
    let block = |width: usize, mlp: usize| 4 * width * width + 2 * width * mlp;
    let attention = |tokens: usize, width: usize| 2 * tokens * tokens * width;
    let image_tokens = 1 + kept;
    let image = cfg.patches() * 3 * v.patch_size * v.patch_size * v.width
        + v.layers * (image_tokens * block(v.width, cfg.vision_mlp_width()) + attention(image_tokens, v.width))
        + v.width * cfg.embed_dim;
    let ctx = t.context_length;
    let text =
        t.layers * (ctx * block(t.width, cfg.text_mlp_width()) + attention(ctx, t.width)) + t.width * cfg.embed_dim;
    6 * batch as u64 * (image + text) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_step_flops_of_test_tiny_by_hand() {
        // test-tiny: images 32×32, patch 8 (L = 16), width 48, 2 layers, MLP 192; text: context
        // 16, width 32, 2 layers, MLP 128; embed_dim 32. Multiply-adds of one sample, forward:
        let cfg = ClipConfig::load("test-tiny").unwrap();
        let patch_embed = 16 * (3 * 8 * 8) * 48; // L patches, 192 → 48
        let image_block = 48 * 3 * 48 + 48 * 48 + 48 * 192 + 192 * 48; // qkv, out, fc, proj per token
        let text_block = 32 * 3 * 32 + 32 * 32 + 32 * 128 + 128 * 32;
        let projections = 48 * 32 + 32 * 32;
        let text = 2 * 16 * text_block + 2 * (16 * 16 * 32 + 16 * 16 * 32); // 2 layers, QKᵀ and AV
        let unmasked = patch_embed + 2 * 17 * image_block + 2 * (17 * 17 * 48 * 2) + text + projections;
        assert_eq!(unmasked, 1_571_520);
        assert_eq!(train_step_flops(&cfg, 1, 16), 6 * 1_571_520);
        assert_eq!(train_step_flops(&cfg, 4, 16), 4 * 6 * 1_571_520);
        // Half the patches masked: 1 + 8 image tokens through the blocks, all 16 embedded.
        let masked = patch_embed + 2 * 9 * image_block + 2 * (9 * 9 * 48 * 2) + text + projections;
        assert_eq!(masked, 1_089_216);
        assert_eq!(train_step_flops(&cfg, 4, 8), 4 * 6 * 1_089_216);
    }

    #[test]
    fn train_step_flops_of_vit_b16_agree_with_torch_flop_counter() {
        // torch's FlopCounterMode over open_clip's ViT-B-16 step (forward, ClipLoss, backward; torch
        // 2.15, open_clip 3.3, batch 2) counted 247_632_654_336 FLOPs unmasked and 140_264_042_496
        // with patch dropout 0.5 (98 patches kept). It counts what runs, not model FLOPs: no input
        // gradient for the patch embedding (the images need none), SDPA's backward as 5 products
        // (the scores recomputed) instead of 4, and the two logits products.
        let cfg = ClipConfig::load("ViT-B-16").unwrap();
        for (kept, counted) in [(196, 247_632_654_336u64), (98, 140_264_042_496)] {
            let (b, s) = (2, 1 + kept as u64);
            let ours = train_step_flops(&cfg, 2, kept);
            let patch_input_grad = 2 * b * 196 * (3 * 16 * 16) * 768;
            let attention_forward = 2 * b * (12 * 2 * s * s * 768 + 12 * 2 * 77 * 77 * 512);
            let logits = 3 * 2 * (2 * b * b * 512);
            let as_torch_counts = ours - patch_input_grad + attention_forward / 2 + logits;
            let off = as_torch_counts.abs_diff(counted) as f64 / counted as f64;
            assert!(off < 1e-6, "kept {kept}: {as_torch_counts} vs torch's {counted}");
            // Unmasked: 6 × 20.54 G multiply-adds per sample (17.56 G image, 2.98 G text).
            assert!(kept != 196 || ours == 246_518_685_696, "{ours}");
        }
    }
}
