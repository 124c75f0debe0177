//! CLIP forward and backward over the device ops of `clip_pgs_host::ops`, as open_clip computes
//! it: the image tower (patch embedding as a GEMM, positional embedding, the keep-gather of
//! PGS/FLIP with CLS, ln_pre, pre-LN blocks, ln_post, projection of CLS), the text tower (token +
//! positional embedding, causal blocks, ln_final, the EOT token, projection) and the contrastive
//! loss with its learnable logit scale.
//!
//! Memory as llm.c keeps it: parameters and gradients are flat buffers (`params.rs`), and every
//! activation is a `Span` of one arena per run (`Workspace`), sized from the config, the
//! micro-batch and the longest sequence; a step allocates nothing. Each block's activations are
//! kept for backward, or with gradient checkpointing only each block's input (the rest is
//! recomputed block by block in backward, into one block's worth of arena).

use clip_pgs_host::ops::attention::{
    AttentionKernel, AttentionShape, model_attention_backward, model_attention_forward,
};
use clip_pgs_host::ops::clip_loss::{ClipLossOut, clip_loss, clip_loss_workspace};
use clip_pgs_host::ops::elementwise::{add, add_assign, fill};
use clip_pgs_host::ops::embedding::{embedding_backward, embedding_forward};
use clip_pgs_host::ops::gelu::GeluForm;
use clip_pgs_host::ops::layernorm::{NormOut, NormSaved, add_layernorm_forward, layernorm_backward, layernorm_forward};
use clip_pgs_host::ops::linear::{
    Epilogue, LinearGrads, LinearShape, linear_backward, linear_backward_gelu, linear_forward,
};
use clip_pgs_host::ops::matmul::{Mat, matmul};
use clip_pgs_host::ops::patchify::patchify;
use clip_pgs_host::ops::pgs::gather::{GatherShape, KeptIndices, gather, gather_backward};
use clip_pgs_host::ops::pgs::gpu::DeviceMasks;
use clip_pgs_host::ops::rows::{eot_rows, gather_rows, scatter_rows};
use clip_pgs_host::view::SpanAllocator;
use clip_pgs_host::{Buffer, Device, Result, Span, View, ViewMut};

use crate::config::ClipConfig;
use crate::params::{BlockWeights, Layout, NormWeights, Weights};
use crate::precision::{Dtype, Precision};

/// The model: its config, where its parameters are, and whether backward recomputes blocks.
#[derive(Clone)]
pub struct Clip {
    pub cfg: ClipConfig,
    pub weights: Weights,
    /// Recompute each block's activations in backward instead of keeping them
    /// (`--grad-checkpointing`): the same gradients, less memory, one more forward.
    pub grad_checkpointing: bool,
    /// The MLP's GELU (`--gelu`): open_clip's exact erf form, or the tanh form cuBLASLt's
    /// epilogue computes.
    pub gelu: GeluForm,
}

impl Clip {
    pub fn new(cfg: &ClipConfig, layout: &Layout, grad_checkpointing: bool) -> Clip {
        Clip { cfg: cfg.clone(), weights: Weights::new(cfg, layout), grad_checkpointing, gelu: GeluForm::Erf }
    }

    /// Checks a batch against the config: sizes, token ids below the vocabulary size, keep
    /// indices in range and strictly ascending. The ops assume a checked batch.
    pub fn check_batch(&self, images: &[f32], text: &[u32], keep: Option<&[Vec<usize>]>) -> Result<usize, String> {
        let (v, t) = (&self.cfg.vision_cfg, &self.cfg.text_cfg);
        let image_len = 3 * v.image_size * v.image_size;
        if images.is_empty() || !images.len().is_multiple_of(image_len) {
            return Err(format!(
                "images have {} values, not a positive multiple of 3×{}×{}",
                images.len(),
                v.image_size,
                v.image_size
            ));
        }
        let n = images.len() / image_len;
        if text.len() != n * t.context_length {
            return Err(format!(
                "text has {} ids, {n} captions of context {} need {}",
                text.len(),
                t.context_length,
                n * t.context_length
            ));
        }
        if let Some(i) = text.iter().position(|&id| id as usize >= t.vocab_size) {
            return Err(format!(
                "token id {} of caption {} is out of range (vocab_size {})",
                text[i],
                i / t.context_length,
                t.vocab_size
            ));
        }
        if let Some(keep) = keep {
            self.check_keep(n, keep)?;
        }
        Ok(n)
    }

    /// Checks keep indices for `n` images: one list per image, in range, strictly ascending.
    pub fn check_keep(&self, n: usize, keep: &[Vec<usize>]) -> Result<(), String> {
        if keep.len() != n {
            return Err(format!("keep indices are given for {} images, the batch has {n}", keep.len()));
        }
        let l = self.cfg.patches();
        for (b, k) in keep.iter().enumerate() {
            if let Some(&j) = k.iter().find(|&&j| j >= l) {
                return Err(format!("keep index {j} of image {b} is out of range ({l} patches)"));
            }
            if k.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!("keep indices of image {b} are not strictly ascending"));
            }
        }
        Ok(())
    }
}

/// The sequences of one micro-batch in a tower: `n` of `len` tokens.
#[derive(Clone, Copy)]
struct Seqs {
    n: usize,
    len: usize,
}

/// A layer norm's output and statistics.
#[derive(Clone, Copy)]
struct NormActs {
    y: Span,
    mean: Span,
    rstd: Span,
}

/// One block's activations (the residual stream around it lives in `TowerPlan::resid`).
#[derive(Clone, Copy)]
struct BlockActs {
    ln1: NormActs,
    qkv: Span,
    /// The unfused attention's probabilities [B, H, S, S] (empty when flash runs).
    probs: Span,
    /// The flash attention's log-sum-exp [B, H, S] (f32 arena), saved instead of probs (empty
    /// when the unfused path runs).
    lse: Span,
    attn: Span,
    mid: Span,
    ln2: NormActs,
    fc_pre: Span,
    act: Span,
}

/// Spans of one block for `rows` rows and `probs` probabilities, laid out for the largest sizes:
/// activations in the T arena, LayerNorm statistics in the f32 arena.
struct Carver {
    offset: usize,
    stats: usize,
}

impl Carver {
    /// Spans start at multiples of 8 elements, as `SpanAllocator`'s.
    fn take(&mut self, max: usize, len: usize) -> Span {
        let span = Span::new(self.offset, len);
        self.offset += max.next_multiple_of(8);
        span
    }

    fn take_stat(&mut self, max: usize, len: usize) -> Span {
        let span = Span::new(self.stats, len);
        self.stats += max;
        span
    }
}

/// Where one tower's activations live in the arena, for micro-batches of up to `batch`
/// sequences of up to `seq` tokens.
struct TowerPlan {
    width: usize,
    mlp: usize,
    heads: usize,
    causal: bool,
    /// Whether the flash kernels run the attention (`AttentionKernel::select_on`): no
    /// probabilities, nor their gradient's scratch, in the arena; the log-sum-exp instead.
    flash: bool,
    layers: usize,
    batch: usize,
    seq: usize,
    /// The residual stream entering block i, i in 0..=layers (the last: the blocks' output).
    resid: Span,
    /// Per-layer activations (one set with gradient checkpointing), each `block_size` elements
    /// of the T arena and `block_stats` of the f32 arena from `stats`.
    blocks: usize,
    block_size: usize,
    block_stats: usize,
    stats: usize,
    /// Scratch of the forward (branch outputs) and of backward.
    branch: Span,
    dx: Span,
    d_w: Span,
    d_fc: Span,
    dqkv: Span,
    d_scores: Span,
}

impl TowerPlan {
    fn new(
        (a, st): (&mut SpanAllocator, &mut SpanAllocator),
        (width, mlp, heads, layers, causal): (usize, usize, usize, usize, bool),
        (batch, seq): (usize, usize),
        flash: bool,
        checkpointing: bool,
        backward: bool,
    ) -> TowerPlan {
        let rows = batch * seq;
        let grad = |len: usize| if backward { len } else { 0 };
        let mut plan = TowerPlan {
            width,
            mlp,
            heads,
            causal,
            flash,
            layers,
            batch,
            seq,
            resid: a.take((layers + 1) * rows * width),
            blocks: if checkpointing { 1 } else { layers },
            block_size: 0,
            block_stats: 0,
            stats: 0,
            branch: Span::default(),
            dx: Span::default(),
            d_w: Span::default(),
            d_fc: Span::default(),
            dqkv: Span::default(),
            d_scores: Span::default(),
        };
        let mut sizing = Carver { offset: 0, stats: 0 };
        plan.carve(&mut sizing, batch, seq);
        (plan.block_size, plan.block_stats) = (sizing.offset, sizing.stats);
        // Right after the residual stream: `block` finds them there.
        a.take(plan.blocks * plan.block_size);
        plan.stats = st.take(plan.blocks * plan.block_stats).offset;
        plan.branch = a.take(rows * width);
        plan.dx = a.take(grad(rows * width));
        plan.d_w = a.take(grad(rows * width));
        plan.d_fc = a.take(grad(rows * mlp));
        plan.dqkv = a.take(grad(rows * 3 * width));
        plan.d_scores = a.take(grad(plan.probs_len(batch, seq)));
        plan
    }

    fn carve(&self, c: &mut Carver, batch: usize, seq: usize) -> BlockActs {
        let (w, m) = (self.width, self.mlp);
        let (rows_max, rows) = (self.batch * self.seq, batch * seq);
        let (probs_max, lse_max) = (self.probs_len(self.batch, self.seq), self.lse_len(self.batch, self.seq));
        let norm = |c: &mut Carver| NormActs {
            y: c.take(rows_max * w, rows * w),
            mean: c.take_stat(rows_max, rows),
            rstd: c.take_stat(rows_max, rows),
        };
        BlockActs {
            ln1: norm(c),
            qkv: c.take(rows_max * 3 * w, rows * 3 * w),
            probs: c.take(probs_max, self.probs_len(batch, seq)),
            lse: c.take_stat(lse_max, self.lse_len(batch, seq)),
            attn: c.take(rows_max * w, rows * w),
            mid: c.take(rows_max * w, rows * w),
            ln2: norm(c),
            fc_pre: c.take(rows_max * m, rows * m),
            act: c.take(rows_max * m, rows * m),
        }
    }

    /// The unfused attention's probabilities (and backward's scratch) for `batch` sequences of
    /// `seq` tokens: [B, H, S, S], none when flash runs.
    fn probs_len(&self, batch: usize, seq: usize) -> usize {
        if self.flash { 0 } else { batch * self.heads * seq * seq }
    }

    /// The flash attention's log-sum-exp: [B, H, S], none on the unfused path.
    fn lse_len(&self, batch: usize, seq: usize) -> usize {
        if self.flash { batch * self.heads * seq } else { 0 }
    }

    /// Block i's activations for `batch` sequences of `seq` tokens.
    fn block(&self, i: usize, batch: usize, seq: usize) -> BlockActs {
        let slot = if self.blocks == 1 { 0 } else { i };
        let mut c =
            Carver { offset: self.resid.end() + slot * self.block_size, stats: self.stats + slot * self.block_stats };
        self.carve(&mut c, batch, seq)
    }

    /// The residual stream entering block i (i = layers: the tower's output), `rows` rows.
    fn resid(&self, i: usize, rows: usize) -> Span {
        Span::new(self.resid.offset + i * self.batch * self.seq * self.width, rows * self.width)
    }

    fn attention(&self, batch: usize, seq: usize) -> AttentionShape {
        AttentionShape { batch, seq, heads: self.heads, head_dim: self.width / self.heads, causal: self.causal }
    }
}

/// Arena spans of the image tower besides its blocks.
struct ImagePlan {
    /// [N, 3, H, W], [N·L, 3p²] and [N, L, W] (positional embedding added) for the whole batch:
    /// the patch embedding is computed once per step, read by PGS's token similarity and by every
    /// micro-batch.
    images: Span,
    patches: Span,
    tokens: Span,
    cls: Span,
    packed: Span,
    ln_pre: NormActs,
    ln_post: NormActs,
    d_post: Span,
    d_packed: Span,
    d_tokens: Span,
    tower: TowerPlan,
}

struct TextPlan {
    ln_final: NormActs,
    pooled: Span,
    d_pooled: Span,
    d_ln: Span,
    tower: TowerPlan,
}

/// The batch-wide features, the loss and its gradients.
struct LossPlan {
    image: Span,
    text: Span,
    d_image: Span,
    d_text: Span,
    logits: Span,
    loss: Span,
    d_logit_scale: Span,
    workspace: Span,
}

/// Index spans (the u32 arena).
struct IndexPlan {
    kept: Span,
    kept_len: Span,
    lengths: Span,
    ids: Span,
    eot: Span,
}

/// The arenas' layout before allocation.
struct Plan {
    image: ImagePlan,
    text: TextPlan,
    loss: LossPlan,
    index: IndexPlan,
    acts: usize,
    stats: usize,
    u32s: usize,
}

/// The kept patches of a batch.
pub enum Keep<'a> {
    All,
    /// Per image its ascending indices.
    Lists(&'a [Vec<usize>]),
    /// PGS/FLIP masks as the mask ops return them.
    Masks(&'a clip_pgs_host::ops::pgs::Masks),
}

/// Buffers for one batch size: the activation arena (T: f32 or bf16), the f32 arena (LayerNorm
/// statistics, the loss and its workspace) and the index arena, with their plans.
pub struct Workspace<T = f32> {
    /// The largest batch, and the largest micro-batch.
    pub batch: usize,
    pub micro: usize,
    /// Samples loaded.
    pub n: usize,
    /// Image sequence length of the loaded batch (1 + most kept patches).
    seq: usize,
    /// The most image rows (sequences × length) a forward pass has used: evaluation sizes its
    /// passes to them, so that it touches no arena memory training did not.
    image_rows_used: usize,
    image: ImagePlan,
    text: TextPlan,
    loss: LossPlan,
    index: IndexPlan,
    acts: Buffer<T>,
    stats: Buffer<f32>,
    u32s: Buffer<u32>,
    /// Host staging of the keep indices [batch, L] and counts [batch], and of the images in T
    /// (bf16), so that a step allocates nothing.
    kept_host: Vec<u32>,
    kept_len_host: Vec<u32>,
    images_host: Vec<T>,
}

/// What the forward pass gave for the loaded batch.
pub struct Output {
    pub image_features: Vec<f32>,
    pub text_features: Vec<f32>,
    pub logits_per_image: Vec<f32>,
    pub loss: f32,
}

/// A contrastive loss computed on the host (data-parallel training: `distributed/loss.rs`): the
/// loss and the gradients of the loaded batch's features and of the log logit scale.
pub struct HostLoss {
    pub loss: f32,
    pub d_image: Vec<f32>,
    pub d_text: Vec<f32>,
    pub d_logit_scale: f32,
}

/// The loaded batch's features ([n, E] each), the log logit scale, and where their loss and
/// gradients go, for a loss computed elsewhere on the device (data-parallel training:
/// `distributed/device_loss.rs`).
pub struct LossIo<'a, T> {
    /// Image, then text.
    pub features: [View<'a, T>; 2],
    pub logit_scale: View<'a, f32>,
    pub loss: ViewMut<'a, f32>,
    /// Image, then text.
    pub d_features: [ViewMut<'a, T>; 2],
    pub d_logit_scale: ViewMut<'a, f32>,
}

/// A span of a T buffer on the host, widened to f32.
fn read_f32<T: Precision>(buffer: &Buffer<T>, span: Span) -> Result<Vec<f32>> {
    let mut values = vec![T::default(); span.len];
    buffer.read(span, &mut values)?;
    Ok(values.into_iter().map(T::to_f32).collect())
}

/// The host memory of a CPU device's view (PGS's tokens for the CPU masks; the GPU devices
/// make their masks with the GPU mask ops, `Workspace::mask_inputs`).
fn host<'a, T>(v: View<'a, T>) -> Result<&'a [T]> {
    match v {
        View::Cpu(s) => Ok(s),
        other => Err(clip_pgs_host::Error::WrongDevice(format!(
            "the patch tokens for the CPU masks are on the {} device",
            other.place().name()
        ))),
    }
}

impl<T: Precision> Workspace<T> {
    /// Arenas for training on batches of up to `batch` images and captions in micro-batches of
    /// up to `micro`.
    pub fn new(clip: &Clip, device: &Device, batch: usize, micro: usize) -> Result<Workspace<T>> {
        Self::build(clip, device, batch, micro, true)
    }

    /// Arenas for forward passes only (evaluation) on up to `batch` samples: no gradients, and
    /// one block's activations at a time.
    pub fn inference(clip: &Clip, device: &Device, batch: usize) -> Result<Workspace<T>> {
        Self::build(&Clip { grad_checkpointing: true, ..clip.clone() }, device, batch, batch, false)
    }

    /// Bytes of the arenas `new(clip, device, batch, micro)` allocates on a GPU device (nothing
    /// is allocated).
    pub fn bytes_needed(clip: &Clip, batch: usize, micro: usize) -> usize {
        let plan = Self::plan(clip, true, batch, micro, true);
        std::mem::size_of::<T>() * plan.acts + 4 * (plan.stats + plan.u32s)
    }

    fn build(clip: &Clip, device: &Device, batch: usize, micro: usize, backward: bool) -> Result<Workspace<T>> {
        let gpu = !matches!(device, Device::Cpu);
        let Plan { image, text, loss, index, acts, stats, u32s } = Self::plan(clip, gpu, batch, micro, backward);
        let l = clip.cfg.patches();
        let acts = device.alloc_zeros(acts, "the activation arena")?;
        let stats = device.alloc_zeros(stats, "the statistics arena")?;
        let u32s = device.alloc_zeros(u32s, "the index arena")?;
        // f32 images are written as given; bf16 ones are rounded into this first.
        let images_host = if T::DTYPE == Dtype::F32 { Vec::new() } else { vec![T::default(); image.images.len] };
        Ok(Workspace {
            batch,
            micro,
            n: 0,
            seq: l + 1,
            image_rows_used: 0,
            image,
            text,
            loss,
            index,
            acts,
            stats,
            u32s,
            kept_host: vec![0; batch * l],
            kept_len_host: vec![0; batch],
            images_host,
        })
    }

    /// Where everything lives in the arenas, and their lengths, on a GPU device (`gpu`) or the
    /// CPU.
    fn plan(clip: &Clip, gpu: bool, batch: usize, micro: usize, backward: bool) -> Plan {
        let cfg = &clip.cfg;
        let (v, t) = (&cfg.vision_cfg, &cfg.text_cfg);
        let (l, e, ctx) = (cfg.patches(), cfg.embed_dim, t.context_length);
        let (wv, wt) = (v.width, t.width);
        let ckpt = clip.grad_checkpointing;
        let grad = |len: usize| if backward { len } else { 0 };
        // a: the T arena, st: the f32 arena.
        let (mut a, mut st) = (SpanAllocator::default(), SpanAllocator::default());
        // An invalid CLIP_PGS_ATTENTION plans for the unfused path; the first forward reports it.
        let flash = |width: usize, heads: usize, causal: bool, seq: usize| {
            let s = AttentionShape { batch: micro, seq, heads, head_dim: width / heads, causal };
            matches!(AttentionKernel::select_on::<T>(gpu, s), Ok(AttentionKernel::Flash))
        };
        let rows = micro * (l + 1);
        let tower = TowerPlan::new(
            (&mut a, &mut st),
            (wv, cfg.vision_mlp_width(), cfg.vision_heads(), v.layers, false),
            (micro, l + 1),
            flash(wv, cfg.vision_heads(), false, l + 1),
            ckpt,
            backward,
        );
        // The images are read once, by patchify, before the tower writes its first block: they
        // share the blocks' memory when it is large enough.
        let images_len = batch * 3 * v.image_size * v.image_size;
        let blocks = Span::new(tower.resid.end(), tower.blocks * tower.block_size);
        let images = if images_len <= blocks.len { blocks.prefix(images_len) } else { a.take(images_len) };
        let image = ImagePlan {
            images,
            patches: a.take(batch * l * 3 * v.patch_size * v.patch_size),
            tokens: a.take(batch * l * wv),
            cls: a.take(wv),
            packed: a.take(rows * wv),
            ln_pre: NormActs { y: Span::default(), mean: st.take(rows), rstd: st.take(rows) },
            ln_post: NormActs { y: a.take(rows * wv), mean: st.take(rows), rstd: st.take(rows) },
            d_post: a.take(grad(rows * wv)),
            d_packed: a.take(grad(rows * wv)),
            d_tokens: a.take(grad(micro * l * wv)),
            tower,
        };
        let trows = micro * ctx;
        let text = TextPlan {
            ln_final: NormActs { y: a.take(trows * wt), mean: st.take(trows), rstd: st.take(trows) },
            pooled: a.take(micro * wt),
            d_pooled: a.take(grad(micro * wt)),
            d_ln: a.take(grad(trows * wt)),
            tower: TowerPlan::new(
                (&mut a, &mut st),
                (wt, cfg.text_mlp_width(), t.heads, t.layers, true),
                (micro, ctx),
                flash(wt, t.heads, true, ctx),
                ckpt,
                backward,
            ),
        };
        let loss = LossPlan {
            image: a.take(batch * e),
            text: a.take(batch * e),
            d_image: a.take(grad(batch * e)),
            d_text: a.take(grad(batch * e)),
            logits: st.take(grad(batch * batch)),
            loss: st.take(1),
            d_logit_scale: st.take(1),
            workspace: st.take(grad(clip_loss_workspace(batch, e))),
        };
        let mut ia = SpanAllocator::default();
        let index = IndexPlan {
            kept: ia.take(batch * l),
            kept_len: ia.take(batch),
            lengths: ia.take(micro),
            ids: ia.take(batch * ctx),
            eot: ia.take(micro),
        };
        Plan { image, text, loss, index, acts: a.len, stats: st.len, u32s: ia.len }
    }

    /// The addresses of the arenas (what a captured step holds).
    pub fn addresses(&self) -> [u64; 3] {
        [self.acts.address(), self.stats.address(), self.u32s.address()]
    }

    /// Bytes of both arenas.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<T>() * self.acts.len() + 4 * (self.stats.len() + self.u32s.len())
    }

    /// Copies a checked batch into the arenas (images, captions; every patch kept until
    /// `set_keep`). `text` may be empty (images only: evaluation).
    pub fn load(&mut self, clip: &Clip, images: &[f32], text: &[u32]) -> Result<usize, String> {
        let image_len = 3 * clip.cfg.vision_cfg.image_size.pow(2);
        let n = images.len() / image_len.max(1);
        if n == 0 || n > self.batch || images.len() != n * image_len {
            return Err(format!("{} image values are not 1 to {} images of {image_len}", images.len(), self.batch));
        }
        if !text.is_empty() {
            clip.check_batch(images, text, None)?;
        }
        let err = |e: clip_pgs_host::Error| e.to_string();
        let staged = T::stage(images, &mut self.images_host);
        self.acts.write(self.image.images.prefix(images.len()), staged).map_err(err)?;
        self.u32s.write(self.index.ids.prefix(text.len()), text).map_err(err)?;
        self.n = n;
        self.set_keep(clip, Keep::All)
    }

    /// The kept patches of the loaded batch, from the host (staged, then copied to the device).
    pub fn set_keep(&mut self, clip: &Clip, keep: Keep) -> Result<usize, String> {
        let (n, l) = (self.n, clip.cfg.patches());
        let err = |e: clip_pgs_host::Error| e.to_string();
        let count = match keep {
            Keep::All => n,
            Keep::Lists(k) => k.len(),
            Keep::Masks(m) => m.images.len(),
        };
        if count != n {
            return Err(format!("keep indices are given for {count} images, the batch has {n}"));
        }
        let (kept, kept_len) = (&mut self.kept_host[..n * l], &mut self.kept_len_host[..n]);
        // The gather op checks the indices (below L, ascending); here only that they fit a row.
        let fill = |row: &mut [u32], indices: &mut dyn ExactSizeIterator<Item = usize>| -> Result<u32, String> {
            if indices.len() > l {
                return Err(format!("{} keep indices for {l} patches", indices.len()));
            }
            let len = indices.len() as u32;
            row.iter_mut().zip(indices).for_each(|(slot, j)| *slot = j as u32);
            Ok(len)
        };
        for b in 0..n {
            let row = &mut kept[b * l..(b + 1) * l];
            kept_len[b] = match keep {
                Keep::All => fill(row, &mut (0..l))?,
                Keep::Lists(k) => fill(row, &mut k[b].iter().copied())?,
                Keep::Masks(m) => fill(row, &mut m.images[b].kept.iter().map(|&j| j as usize))?,
            };
        }
        self.u32s.write(self.index.kept.prefix(n * l), kept).map_err(err)?;
        self.u32s.write(self.index.kept_len.prefix(n), kept_len).map_err(err)?;
        self.seq = 1 + kept_len.iter().max().copied().unwrap_or(0) as usize;
        Ok(n)
    }

    /// The kept patches of the loaded batch from masks the GPU mask ops made on `device`,
    /// copied into the arena on the device, with no host read: the image sequence (a shape) is
    /// sized for `max_kept` patches, the most the masking rule keeps (`Masking::max_kept`);
    /// images that keep fewer are padded, their padding masked by the attention's lengths.
    pub fn set_keep_on_device(
        &mut self,
        clip: &Clip,
        device: &Device,
        masks: &DeviceMasks,
        max_kept: usize,
    ) -> Result<()> {
        let (n, l) = (self.n, clip.cfg.patches());
        if masks.images != n || masks.patches != l || max_kept > l {
            return Err(clip_pgs_host::Error::InvalidArgument(format!(
                "masks for {} images of {} patches (at most {max_kept} kept), the batch has {n} of {l}",
                masks.images, masks.patches
            )));
        }
        let ([], [kept, kept_len]) =
            self.u32s.split([], [self.index.kept.prefix(n * l), self.index.kept_len.prefix(n)])?;
        device.copy(kept, masks.kept.view())?;
        device.copy(kept_len, masks.kept_len.view())?;
        self.seq = 1 + max_kept;
        Ok(())
    }

    /// The fraction of the loaded batch's patches its masks drop (a host read of the kept
    /// counts: waits for the device).
    pub fn masked_fraction(&self, clip: &Clip) -> Result<f64> {
        let (n, l) = (self.n, clip.cfg.patches());
        let mut counts = vec![0u32; n];
        self.u32s.read(self.index.kept_len.prefix(n), &mut counts)?;
        Ok(1.0 - counts.iter().map(|&c| c as f64).sum::<f64>() / (n * l) as f64)
    }

    /// The images [n, 3, H, W] and patch tokens [n, L, W] of the loaded batch on the device: the
    /// GPU mask ops read them.
    pub fn mask_inputs(&self, clip: &Clip) -> Result<(View<'_, T>, View<'_, T>)> {
        let v = &clip.cfg.vision_cfg;
        let n = self.n;
        let [images, tokens] = self.acts.views([
            self.image.images.prefix(n * 3 * v.image_size * v.image_size),
            self.image.tokens.prefix(n * clip.cfg.patches() * v.width),
        ])?;
        Ok((images, tokens))
    }
}

/// The two arenas a pass writes: activations (T) and statistics (f32).
struct Arenas<'a, T> {
    acts: &'a mut Buffer<T>,
    stats: &'a mut Buffer<f32>,
}

/// One pass over the model: the device, the model, its f32 parameters (the logit scale is read
/// from them) and the weights the ops read in T (the parameters themselves in f32, their bf16
/// copy in bf16).
pub struct Pass<'a, T = f32> {
    pub device: &'a Device,
    pub clip: &'a Clip,
    pub params: &'a Buffer<f32>,
    pub weights: &'a Buffer<T>,
}

impl<T: Precision> Pass<'_, T> {
    fn norm(&self, f: &mut Arenas<T>, out: NormActs, x: Span, w: NormWeights, dim: usize) -> Result<()> {
        let ([x], [y]) = f.acts.split([x], [out.y])?;
        let ([], [mean, rstd]) = f.stats.split([], [out.mean, out.rstd])?;
        let [gamma, beta] = self.weights.views([w.weight, w.bias])?;
        layernorm_forward(self.device, NormOut { y, mean, rstd }, x, gamma, beta, dim)
    }

    fn linear(&self, f: &mut Arenas<T>, y: Span, x: Span, weight: Span, bias: Span, s: LinearShape) -> Result<()> {
        let ([x], [y]) = f.acts.split([x], [y])?;
        let [w, b] = self.weights.views([weight, bias])?;
        linear_forward(self.device, y, x, w, Epilogue::Bias(b), s)
    }

    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        f: &mut Arenas<T>,
        g: &mut Buffer<f32>,
        dx: Span,
        dy: Span,
        x: Span,
        saved: NormActs,
        w: NormWeights,
        dim: usize,
        accumulate: bool,
    ) -> Result<()> {
        let ([dy, x], [dx]) = f.acts.split([dy, x], [dx])?;
        let [mean, rstd] = f.stats.views([saved.mean, saved.rstd])?;
        let [gamma] = self.weights.views([w.weight])?;
        let ([], [dgamma, dbeta]) = g.split([], [w.weight, w.bias])?;
        layernorm_backward(self.device, dx, dgamma, dbeta, dy, NormSaved { x, mean, rstd }, gamma, dim, accumulate)
    }

    /// dx (overwritten) and the weight's and bias's gradients (accumulated) of a linear layer;
    /// `gelu_pre`: dx is taken through the GELU of the layer before (DGELU).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        f: &mut Arenas<T>,
        g: &mut Buffer<f32>,
        dx: Span,
        dy: Span,
        x: Span,
        (weight, bias): (Span, Span),
        gelu_pre: Option<Span>,
        s: LinearShape,
    ) -> Result<()> {
        let [w] = self.weights.views([weight])?;
        let ([], [dw, db]) = g.split([], [weight, bias])?;
        match gelu_pre {
            Some(pre) => {
                let ([dy, x, pre], [dx]) = f.acts.split([dy, x, pre], [dx])?;
                let grads = LinearGrads { dx: Some(dx), dw, db: Some(db) };
                linear_backward_gelu(self.device, grads, dy, x, w, Some((pre, self.clip.gelu)), s)
            }
            None => {
                let ([dy, x], [dx]) = f.acts.split([dy, x], [dx])?;
                linear_backward(self.device, LinearGrads { dx: Some(dx), dw, db: Some(db) }, dy, x, w, s)
            }
        }
    }

    /// x ← x + attn(ln_1(x)); x ← x + mlp(ln_2(x)): block i from the residual stream i to i + 1.
    fn block_forward(
        &self,
        t: &TowerPlan,
        f: &mut Arenas<T>,
        bw: &BlockWeights,
        i: usize,
        Seqs { n, len: seq }: Seqs,
        lengths: Option<View<u32>>,
    ) -> Result<()> {
        let (a, rows, w, m) = (t.block(i, n, seq), n * seq, t.width, t.mlp);
        let (input, output, branch) = (t.resid(i, rows), t.resid(i + 1, rows), t.branch.prefix(rows * w));
        self.norm(f, a.ln1, input, bw.ln_1, w)?;
        self.linear(
            f,
            a.qkv,
            a.ln1.y,
            bw.in_proj_weight,
            bw.in_proj_bias,
            LinearShape { rows, inputs: w, outputs: 3 * w },
        )?;
        {
            let ([qkv], [out, probs]) = f.acts.split([a.qkv], [a.attn, a.probs])?;
            let ([], [lse]) = f.stats.split([], [a.lse])?;
            model_attention_forward(self.device, out, probs, lse, qkv, lengths, t.attention(n, seq))?;
        }
        self.linear(
            f,
            branch,
            a.attn,
            bw.out_proj_weight,
            bw.out_proj_bias,
            LinearShape { rows, inputs: w, outputs: w },
        )?;
        {
            let ([x, attn], [mid, y]) = f.acts.split([input, branch], [a.mid, a.ln2.y])?;
            let ([], [mean, rstd]) = f.stats.split([], [a.ln2.mean, a.ln2.rstd])?;
            let [gamma, beta] = self.weights.views([bw.ln_2.weight, bw.ln_2.bias])?;
            add_layernorm_forward(self.device, mid, NormOut { y, mean, rstd }, x, attn, gamma, beta, w)?;
        }
        {
            let ([x], [act, pre]) = f.acts.split([a.ln2.y], [a.act, a.fc_pre])?;
            let [weight, bias] = self.weights.views([bw.c_fc_weight, bw.c_fc_bias])?;
            linear_forward(
                self.device,
                act,
                x,
                weight,
                Epilogue::BiasGelu { bias, pre, form: self.clip.gelu },
                LinearShape { rows, inputs: w, outputs: m },
            )?;
        }
        self.linear(f, branch, a.act, bw.c_proj_weight, bw.c_proj_bias, LinearShape { rows, inputs: m, outputs: w })?;
        let ([mid, mlp], [out]) = f.acts.split([a.mid, branch], [output])?;
        add(self.device, out, mid, mlp)
    }

    /// dx: the gradient at block i's output in, at its input out (the tower's `dx` span).
    #[allow(clippy::too_many_arguments)]
    fn block_backward(
        &self,
        t: &TowerPlan,
        f: &mut Arenas<T>,
        g: &mut Buffer<f32>,
        bw: &BlockWeights,
        i: usize,
        Seqs { n, len: seq }: Seqs,
        lengths: Option<View<u32>>,
    ) -> Result<()> {
        let (a, rows, w, m) = (t.block(i, n, seq), n * seq, t.width, t.mlp);
        let (dx, d_w, d_fc) = (t.dx.prefix(rows * w), t.d_w.prefix(rows * w), t.d_fc.prefix(rows * m));
        let dqkv = t.dqkv.prefix(rows * 3 * w);
        // MLP branch.
        let c_proj = (bw.c_proj_weight, bw.c_proj_bias);
        self.linear_backward(
            f,
            g,
            d_fc,
            dx,
            a.act,
            c_proj,
            Some(a.fc_pre),
            LinearShape { rows, inputs: m, outputs: w },
        )?;
        let c_fc = (bw.c_fc_weight, bw.c_fc_bias);
        self.linear_backward(f, g, d_w, d_fc, a.ln2.y, c_fc, None, LinearShape { rows, inputs: w, outputs: m })?;
        self.norm_backward(f, g, dx, d_w, a.mid, a.ln2, bw.ln_2, w, true)?;
        // Attention branch.
        let out_proj = (bw.out_proj_weight, bw.out_proj_bias);
        self.linear_backward(f, g, d_w, dx, a.attn, out_proj, None, LinearShape { rows, inputs: w, outputs: w })?;
        {
            let shape = t.attention(n, seq);
            let ([dout, qkv, probs, out], [dqkv, scratch]) =
                f.acts.split([d_w, a.qkv, a.probs, a.attn], [dqkv, t.d_scores.prefix(t.probs_len(n, seq))])?;
            let [lse] = f.stats.views([a.lse])?;
            let saved = (probs, out, lse);
            model_attention_backward(self.device, dqkv, scratch, dout, qkv, saved, lengths, shape)?;
        }
        let in_proj = (bw.in_proj_weight, bw.in_proj_bias);
        self.linear_backward(f, g, d_w, dqkv, a.ln1.y, in_proj, None, LinearShape { rows, inputs: w, outputs: 3 * w })?;
        self.norm_backward(f, g, dx, d_w, t.resid(i, rows), a.ln1, bw.ln_1, w, true)
    }

    fn blocks_forward(
        &self,
        t: &TowerPlan,
        f: &mut Arenas<T>,
        blocks: &[BlockWeights],
        seqs: Seqs,
        lengths: Option<View<u32>>,
    ) -> Result<()> {
        for (i, bw) in blocks.iter().enumerate() {
            self.block_forward(t, f, bw, i, seqs, lengths)?;
        }
        Ok(())
    }

    /// Backward through every block; with gradient checkpointing each block's activations are
    /// recomputed from its input first.
    fn blocks_backward(
        &self,
        t: &TowerPlan,
        f: &mut Arenas<T>,
        g: &mut Buffer<f32>,
        blocks: &[BlockWeights],
        seqs: Seqs,
        lengths: Option<View<u32>>,
    ) -> Result<()> {
        for (i, bw) in blocks.iter().enumerate().rev() {
            // The slot holds the last block's activations from forward.
            if t.blocks == 1 && i + 1 < t.layers {
                self.block_forward(t, f, bw, i, seqs, lengths)?;
            }
            self.block_backward(t, f, g, bw, i, seqs, lengths)?;
        }
        Ok(())
    }
}

impl<T: Precision> Workspace<T> {
    /// The patch embedding of the whole loaded batch: patches, tokens = patches·conv1ᵀ + pos[1..],
    /// and the CLS row class_embedding + pos[0].
    pub fn embed_patches(&mut self, pass: &Pass<T>) -> Result<()> {
        let v = &pass.clip.cfg.vision_cfg;
        let (n, l, w) = (self.n, pass.clip.cfg.patches(), v.width);
        let pv = 3 * v.patch_size * v.patch_size;
        let (im, f, dev, wt) = (&self.image, &mut self.acts, pass.device, &pass.clip.weights);
        let (patches, tokens) = (im.patches.prefix(n * l * pv), im.tokens.prefix(n * l * w));
        {
            let ([images], [patches]) = f.split([im.images.prefix(n * 3 * v.image_size * v.image_size)], [patches])?;
            patchify(dev, patches, images, v.image_size, v.patch_size)?;
        }
        {
            let ([patches], [tokens]) = f.split([patches], [tokens])?;
            let [conv1] = pass.weights.views([wt.conv1])?;
            linear_forward(
                dev,
                tokens,
                patches,
                conv1,
                Epilogue::None,
                LinearShape { rows: n * l, inputs: pv, outputs: w },
            )?;
        }
        let pos = wt.visual_positional_embedding;
        let [pos_cls, pos_patches, class] =
            pass.weights.views([pos.part(0, w), pos.part(w, l * w), wt.class_embedding])?;
        let ([], [tokens, cls]) = f.split([], [tokens, im.cls])?;
        add_assign(dev, tokens, pos_patches)?;
        add(dev, cls, class, pos_cls)
    }

    /// The patch tokens [n, L, W] of the loaded batch on the host (CPU device): PGS's token
    /// similarity reads them.
    pub fn patch_tokens(&self, clip: &Clip) -> Result<&[f32]> {
        let len = self.n * clip.cfg.patches() * clip.cfg.vision_cfg.width;
        T::as_f32(host(self.acts.views([self.image.tokens.prefix(len)])?[0])?).ok_or_else(|| {
            clip_pgs_host::Error::InvalidArgument("the CPU masks read f32 patch tokens; bf16 runs on the GPU".into())
        })
    }

    /// The image features of samples `start .. start + n` into the batch's feature rows.
    fn image_forward(&mut self, pass: &Pass<T>, start: usize, n: usize) -> Result<()> {
        let cfg = &pass.clip.cfg;
        let (l, w, e, seq) = (cfg.patches(), cfg.vision_cfg.width, cfg.embed_dim, self.seq);
        let (im, ix, rows, dev, wt) = (&self.image, &self.index, n * seq, pass.device, &pass.clip.weights);
        self.image_rows_used = self.image_rows_used.max(rows);
        let f = &mut Arenas { acts: &mut self.acts, stats: &mut self.stats };
        let t = &im.tower;
        {
            let ([tokens, cls], [packed]) =
                f.acts.split([im.tokens.part(start * l * w, n * l * w), im.cls], [im.packed.prefix(rows * w)])?;
            let ([kept, kept_len], [lengths]) = self
                .u32s
                .split([ix.kept.part(start * l, n * l), ix.kept_len.part(start, n)], [ix.lengths.prefix(n)])?;
            let shape = GatherShape { images: n, patches: l, dim: w, rows: seq };
            gather(dev, packed, lengths, tokens, cls, KeptIndices { kept, kept_len }, shape)?;
        }
        let ln_pre =
            NormActs { y: t.resid(0, rows), mean: im.ln_pre.mean.prefix(rows), rstd: im.ln_pre.rstd.prefix(rows) };
        pass.norm(f, ln_pre, im.packed.prefix(rows * w), wt.ln_pre, w)?;
        let [lengths] = self.u32s.views([ix.lengths.prefix(n)])?;
        pass.blocks_forward(t, f, &wt.visual_blocks, Seqs { n, len: seq }, Some(lengths))?;
        let ln_post = NormActs {
            y: im.ln_post.y.prefix(rows * w),
            mean: im.ln_post.mean.prefix(rows),
            rstd: im.ln_post.rstd.prefix(rows),
        };
        pass.norm(f, ln_post, t.resid(t.layers, rows), wt.ln_post, w)?;
        let ([y], [features]) = f.acts.split([ln_post.y], [self.loss.image.part(start * e, n * e)])?;
        let [proj] = pass.weights.views([wt.visual_proj])?;
        // CLS is row 0 of each sequence: the rows seq·W apart.
        matmul(dev, Mat::new(features, n, e), Mat::new(y, n, w).row_stride(seq * w), Mat::new(proj, w, e), false)
    }

    fn text_forward(&mut self, pass: &Pass<T>, start: usize, n: usize) -> Result<()> {
        let cfg = &pass.clip.cfg;
        let (w, e, ctx) = (cfg.text_cfg.width, cfg.embed_dim, cfg.text_cfg.context_length);
        let (tp, ix, rows, dev, wt) = (&self.text, &self.index, n * ctx, pass.device, &pass.clip.weights);
        let (f, t) = (&mut Arenas { acts: &mut self.acts, stats: &mut self.stats }, &tp.tower);
        {
            let ([], [x]) = f.acts.split([], [t.resid(0, rows)])?;
            let [ids] = self.u32s.views([ix.ids.part(start * ctx, rows)])?;
            let [table, pos] = pass.weights.views([wt.token_embedding, wt.positional_embedding])?;
            embedding_forward(dev, x, ids, table, pos, w)?;
        }
        pass.blocks_forward(t, f, &wt.text_blocks, Seqs { n, len: ctx }, None)?;
        let ln = NormActs {
            y: tp.ln_final.y.prefix(rows * w),
            mean: tp.ln_final.mean.prefix(rows),
            rstd: tp.ln_final.rstd.prefix(rows),
        };
        pass.norm(f, ln, t.resid(t.layers, rows), wt.ln_final, w)?;
        {
            let ([ids], [eot]) = self.u32s.split([ix.ids.part(start * ctx, rows)], [ix.eot.prefix(n)])?;
            eot_rows(dev, eot, ids, ctx)?;
        }
        let [eot] = self.u32s.views([ix.eot.prefix(n)])?;
        {
            let ([y], [pooled]) = f.acts.split([ln.y], [tp.pooled.prefix(n * w)])?;
            gather_rows(dev, pooled, y, eot, w)?;
        }
        let ([pooled], [features]) =
            f.acts.split([tp.pooled.prefix(n * w)], [self.loss.text.part(start * e, n * e)])?;
        let [proj] = pass.weights.views([wt.text_projection])?;
        matmul(dev, Mat::new(features, n, e), Mat::new(pooled, n, w), Mat::new(proj, w, e), false)
    }

    /// Both towers' features of samples `start .. start + n`.
    pub fn encode(&mut self, pass: &Pass<T>, start: usize, n: usize) -> Result<()> {
        self.image_forward(pass, start, n)?;
        self.text_forward(pass, start, n)
    }

    /// The contrastive loss over the whole loaded batch's features (and their gradients).
    pub fn loss(&mut self, pass: &Pass<T>) -> Result<()> {
        let (n, e, lp) = (self.n, pass.clip.cfg.embed_dim, &self.loss);
        let ([image, text], [d_image, d_text]) = self.acts.split(
            [lp.image.prefix(n * e), lp.text.prefix(n * e)],
            [lp.d_image.prefix(n * e), lp.d_text.prefix(n * e)],
        )?;
        let ([], [loss, logits, d_logit_scale, workspace]) = self.stats.split(
            [],
            [lp.loss, lp.logits.prefix(n * n), lp.d_logit_scale, lp.workspace.prefix(clip_loss_workspace(n, e))],
        )?;
        let [scale] = pass.params.views([pass.clip.weights.logit_scale])?;
        let out = ClipLossOut { loss, logits, d_image, d_text, d_logit_scale };
        clip_loss(pass.device, out, image, text, scale, workspace, n, e)
    }

    /// The loss of the last `loss` on the device.
    pub fn loss_view(&self) -> Result<View<'_, f32>> {
        let [loss] = self.stats.views([self.loss.loss])?;
        Ok(loss)
    }

    /// Sets the last `loss` to NaN on the device (a test's non-finite step).
    pub fn poison_loss(&mut self, device: &Device) -> Result<()> {
        let ([], [loss]) = self.stats.split([], [self.loss.loss])?;
        fill(device, loss, f32::NAN)
    }

    /// The loss of the last `loss` (a host read: waits for the device).
    pub fn read_loss(&self) -> Result<f32> {
        let mut loss = [0.0f32];
        self.stats.read(self.loss.loss, &mut loss)?;
        Ok(loss[0])
    }

    /// As `loss`, with the loss computed by `f` on the host from the loaded batch's features
    /// ([n, E] each, f32) and the log logit scale; its gradients go where `loss` puts its own.
    pub fn loss_on_host(
        &mut self,
        pass: &Pass<T>,
        f: impl FnOnce(&[f32], &[f32], f32) -> Result<HostLoss, String>,
    ) -> Result<f32, String> {
        let (n, e, lp) = (self.n, pass.clip.cfg.embed_dim, &self.loss);
        let err = |e: clip_pgs_host::Error| e.to_string();
        let image = read_f32(&self.acts, lp.image.prefix(n * e)).map_err(err)?;
        let text = read_f32(&self.acts, lp.text.prefix(n * e)).map_err(err)?;
        let mut scale = [0.0f32];
        pass.params.read(pass.clip.weights.logit_scale, &mut scale).map_err(err)?;
        let out = f(&image, &text, scale[0])?;
        let mut staging = vec![T::default(); n * e];
        for (span, d) in [(lp.d_image, &out.d_image), (lp.d_text, &out.d_text)] {
            self.acts.write(span.prefix(n * e), T::stage(d, &mut staging)).map_err(err)?;
        }
        self.stats.write(lp.loss, &[out.loss]).map_err(err)?;
        self.stats.write(lp.d_logit_scale, &[out.d_logit_scale]).map_err(err)?;
        Ok(out.loss)
    }

    /// As `loss`, with the loss computed by `f` on the device from the views it is given.
    pub fn loss_with(
        &mut self,
        pass: &Pass<T>,
        f: impl FnOnce(LossIo<'_, T>) -> Result<(), String>,
    ) -> Result<(), String> {
        let (n, e, lp) = (self.n, pass.clip.cfg.embed_dim, &self.loss);
        let err = |e: clip_pgs_host::Error| e.to_string();
        let (features, d_features) = self
            .acts
            .split([lp.image.prefix(n * e), lp.text.prefix(n * e)], [lp.d_image.prefix(n * e), lp.d_text.prefix(n * e)])
            .map_err(err)?;
        let ([], [loss, d_logit_scale]) = self.stats.split([], [lp.loss, lp.d_logit_scale]).map_err(err)?;
        let [logit_scale] = pass.params.views([pass.clip.weights.logit_scale]).map_err(err)?;
        f(LossIo { features, logit_scale, loss, d_features, d_logit_scale })
    }

    /// Adds the logit scale's gradient from the last `loss` to `g`.
    pub fn logit_scale_backward(&mut self, pass: &Pass<T>, g: &mut Buffer<f32>) -> Result<()> {
        let [d] = self.stats.views([self.loss.d_logit_scale])?;
        let ([], [gs]) = g.split([], [pass.clip.weights.logit_scale])?;
        add_assign(pass.device, gs, d)
    }

    /// Adds to `g` what the feature gradients of samples `start .. start + n` send through both
    /// towers; their activations are the last `encode`'s of these samples.
    pub fn backward(&mut self, pass: &Pass<T>, g: &mut Buffer<f32>, start: usize, n: usize) -> Result<()> {
        self.image_backward(pass, g, start, n)?;
        self.text_backward(pass, g, start, n)
    }

    fn image_backward(&mut self, pass: &Pass<T>, g: &mut Buffer<f32>, start: usize, n: usize) -> Result<()> {
        let cfg = &pass.clip.cfg;
        let (l, w, e, seq) = (cfg.patches(), cfg.vision_cfg.width, cfg.embed_dim, self.seq);
        let (im, ix, rows, dev, wt) = (&self.image, &self.index, n * seq, pass.device, &pass.clip.weights);
        let (f, t) = (&mut Arenas { acts: &mut self.acts, stats: &mut self.stats }, &im.tower);
        let d_features = self.loss.d_image.part(start * e, n * e);
        let post_y = im.ln_post.y.prefix(rows * w);
        {
            let ([y, df], []) = f.acts.split([post_y, d_features], [])?;
            let ([], [d_proj]) = g.split([], [wt.visual_proj])?;
            matmul(dev, Mat::new(d_proj, w, e), Mat::new(y, n, w).row_stride(seq * w).t(), Mat::new(df, n, e), true)?;
        }
        {
            let ([], [d_post]) = f.acts.split([], [im.d_post.prefix(rows * w)])?;
            fill(dev, d_post, 0.0)?;
        }
        {
            let ([df], [d_post]) = f.acts.split([d_features], [im.d_post.prefix(rows * w)])?;
            let [proj] = pass.weights.views([wt.visual_proj])?;
            matmul(
                dev,
                Mat::new(d_post, n, w).row_stride(seq * w),
                Mat::new(df, n, e),
                Mat::new(proj, w, e).t(),
                false,
            )?;
        }
        let ln_post = NormActs { y: post_y, mean: im.ln_post.mean.prefix(rows), rstd: im.ln_post.rstd.prefix(rows) };
        let dx = t.dx.prefix(rows * w);
        pass.norm_backward(
            f,
            g,
            dx,
            im.d_post.prefix(rows * w),
            t.resid(t.layers, rows),
            ln_post,
            wt.ln_post,
            w,
            false,
        )?;
        let [lengths] = self.u32s.views([ix.lengths.prefix(n)])?;
        pass.blocks_backward(t, f, g, &wt.visual_blocks, Seqs { n, len: seq }, Some(lengths))?;
        let ln_pre =
            NormActs { y: t.resid(0, rows), mean: im.ln_pre.mean.prefix(rows), rstd: im.ln_pre.rstd.prefix(rows) };
        let d_packed = im.d_packed.prefix(rows * w);
        pass.norm_backward(f, g, d_packed, dx, im.packed.prefix(rows * w), ln_pre, wt.ln_pre, w, false)?;
        {
            let ([d_packed], [d_tokens]) = f.acts.split([d_packed], [im.d_tokens.prefix(n * l * w)])?;
            let ([], [d_cls, d_pos]) = g.split([], [wt.class_embedding, wt.visual_positional_embedding])?;
            let [kept, kept_len] = self.u32s.views([ix.kept.part(start * l, n * l), ix.kept_len.part(start, n)])?;
            let shape = GatherShape { images: n, patches: l, dim: w, rows: seq };
            gather_backward(dev, d_tokens, d_cls, d_pos, d_packed, KeptIndices { kept, kept_len }, shape)?;
        }
        let pv = 3 * cfg.vision_cfg.patch_size.pow(2);
        let ([d_tokens, patches], []) =
            f.acts.split([im.d_tokens.prefix(n * l * w), im.patches.part(start * l * pv, n * l * pv)], [])?;
        let [conv1] = pass.weights.views([wt.conv1])?;
        let ([], [d_conv1]) = g.split([], [wt.conv1])?;
        let grads = LinearGrads { dx: None, dw: d_conv1, db: None };
        linear_backward(dev, grads, d_tokens, patches, conv1, LinearShape { rows: n * l, inputs: pv, outputs: w })
    }

    fn text_backward(&mut self, pass: &Pass<T>, g: &mut Buffer<f32>, start: usize, n: usize) -> Result<()> {
        let cfg = &pass.clip.cfg;
        let (w, e, ctx) = (cfg.text_cfg.width, cfg.embed_dim, cfg.text_cfg.context_length);
        let (tp, ix, rows, dev, wt) = (&self.text, &self.index, n * ctx, pass.device, &pass.clip.weights);
        let (f, t) = (&mut Arenas { acts: &mut self.acts, stats: &mut self.stats }, &tp.tower);
        let d_features = self.loss.d_text.part(start * e, n * e);
        {
            let ([pooled, df], []) = f.acts.split([tp.pooled.prefix(n * w), d_features], [])?;
            let ([], [d_proj]) = g.split([], [wt.text_projection])?;
            matmul(dev, Mat::new(d_proj, w, e), Mat::new(pooled, n, w).t(), Mat::new(df, n, e), true)?;
        }
        {
            let ([df], [d_pooled]) = f.acts.split([d_features], [tp.d_pooled.prefix(n * w)])?;
            let [proj] = pass.weights.views([wt.text_projection])?;
            matmul(dev, Mat::new(d_pooled, n, w), Mat::new(df, n, e), Mat::new(proj, w, e).t(), false)?;
        }
        {
            let ([d_pooled], [d_ln]) = f.acts.split([tp.d_pooled.prefix(n * w)], [tp.d_ln.prefix(rows * w)])?;
            let [eot] = self.u32s.views([ix.eot.prefix(n)])?;
            scatter_rows(dev, d_ln, d_pooled, eot, w)?;
        }
        let ln = NormActs {
            y: tp.ln_final.y.prefix(rows * w),
            mean: tp.ln_final.mean.prefix(rows),
            rstd: tp.ln_final.rstd.prefix(rows),
        };
        let dx = t.dx.prefix(rows * w);
        pass.norm_backward(f, g, dx, tp.d_ln.prefix(rows * w), t.resid(t.layers, rows), ln, wt.ln_final, w, false)?;
        pass.blocks_backward(t, f, g, &wt.text_blocks, Seqs { n, len: ctx }, None)?;
        let ([dx], []) = f.acts.split([dx], [])?;
        let [ids] = self.u32s.views([ix.ids.part(start * ctx, rows)])?;
        let ([], [d_table, d_pos]) = g.split([], [wt.token_embedding, wt.positional_embedding])?;
        embedding_backward(dev, d_table, d_pos, dx, ids, w)
    }

    /// The loaded batch's features, logits and loss from the last `encode`s and `loss`, on the host.
    pub fn output(&self, clip: &Clip) -> Result<Output> {
        let (n, e) = (self.n, clip.cfg.embed_dim);
        let lp = &self.loss;
        let read = |span: Span| -> Result<Vec<f32>> {
            let mut out = vec![0.0; span.len];
            self.stats.read(span, &mut out)?;
            Ok(out)
        };
        Ok(Output {
            image_features: read_f32(&self.acts, lp.image.prefix(n * e))?,
            text_features: read_f32(&self.acts, lp.text.prefix(n * e))?,
            logits_per_image: read(lp.logits.prefix(n * n))?,
            loss: read(lp.loss)?[0],
        })
    }

    /// Image features [n, E] of `images` (up to `batch` of them; evaluation), on the host.
    pub fn encode_images(&mut self, pass: &Pass<T>, images: &[f32]) -> Result<Vec<f32>, String> {
        let err = |e: clip_pgs_host::Error| e.to_string();
        let n = self.load(pass.clip, images, &[])?;
        self.embed_patches(pass).map_err(err)?;
        let (e, seq) = (pass.clip.cfg.embed_dim, pass.clip.cfg.patches() + 1);
        let per_pass = match self.image_rows_used {
            0 => self.micro,
            rows => (rows / seq).clamp(1, self.micro),
        };
        for start in (0..n).step_by(per_pass) {
            self.image_forward(pass, start, per_pass.min(n - start)).map_err(err)?;
        }
        read_f32(&self.acts, self.loss.image.prefix(n * e)).map_err(err)
    }

    /// Text features [n, E] of token ids [n, T] (evaluation), on the host.
    pub fn encode_texts(&mut self, pass: &Pass<T>, ids: &[u32]) -> Result<Vec<f32>, String> {
        let err = |e: clip_pgs_host::Error| e.to_string();
        let ctx = pass.clip.cfg.text_cfg.context_length;
        let n = ids.len() / ctx;
        if n == 0 || n > self.batch || ids.len() != n * ctx {
            return Err(format!("{} ids are not 1 to {} captions of {ctx}", ids.len(), self.batch));
        }
        self.u32s.write(self.index.ids.prefix(ids.len()), ids).map_err(err)?;
        let e = pass.clip.cfg.embed_dim;
        for start in (0..n).step_by(self.micro) {
            self.text_forward(pass, start, self.micro.min(n - start)).map_err(err)?;
        }
        read_f32(&self.acts, self.loss.text.prefix(n * e)).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clip_pgs_host::bf16;

    /// ViT-B/16 at batch 256 in bf16: on a GPU the flash kernels run both towers' attention, so
    /// the arena holds no [B, H, S, S] probabilities (one set per layer) nor backward's scratch of
    /// that size, and one [B, H, S] log-sum-exp per layer instead (f32): 23.84 GB of arenas
    /// become 20.46 GB (3.38 GB less).
    #[test]
    fn flash_arenas_hold_no_probabilities() {
        let cfg = ClipConfig::load("ViT-B-16").unwrap();
        let clip = Clip::new(&cfg, &Layout::new(&cfg), false);
        let batch = 256;
        let bytes = |gpu: bool| {
            let plan = Workspace::<bf16>::plan(&clip, gpu, batch, batch, true);
            2 * plan.acts + 4 * (plan.stats + plan.u32s)
        };
        let (unfused, flash) = (bytes(false), bytes(true));
        let (v, t) = (&cfg.vision_cfg, &cfg.text_cfg);
        let towers = [(cfg.vision_heads(), cfg.patches() + 1, v.layers), (t.heads, t.context_length, t.layers)];
        let saved: usize = towers
            .iter()
            .map(|&(heads, seq, layers)| {
                let (probs, lse) = (batch * heads * seq * seq, batch * heads * seq);
                (layers + 1) * 2 * probs.next_multiple_of(8) - layers * 4 * lse
            })
            .sum();
        println!("ViT-B/16, batch 256, bf16 arenas: {unfused} bytes unfused, {flash} with flash");
        assert_eq!(unfused - flash, saved);
    }
}
