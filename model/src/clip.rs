//! CLIP on the CPU device, forward and backward written op by op over `clip_pgs_host::ops`, as
//! open_clip computes it: the image tower (patch embedding as a matmul, CLS, positional embedding,
//! the optional PGS/FLIP keep-gather, ln_pre, pre-LN blocks, ln_post on CLS, projection), the
//! text tower (token + positional embedding, causal blocks, ln_final, the EOT token, projection)
//! and the contrastive loss with its learnable logit scale.

use clip_pgs_host::ops::attention::{AttentionShape, attention_backward, attention_forward};
use clip_pgs_host::ops::clip_loss::clip_loss;
use clip_pgs_host::ops::gelu::{gelu_backward, gelu_forward};
use clip_pgs_host::ops::layernorm::{layernorm_backward, layernorm_forward};
use clip_pgs_host::ops::linear::{linear_backward, linear_forward};
use clip_pgs_host::ops::matmul::{MatRef, matmul};

use crate::config::ClipConfig;
use crate::params::Params;

/// A batch: images [B, 3, H, W] (CLIP-normalized), token ids [B, T], and optionally the kept
/// patch indices of each image (ascending; CLS is always kept).
pub struct Batch<'a> {
    pub images: &'a [f32],
    pub text: &'a [u32],
    pub keep: Option<&'a [Vec<usize>]>,
}

/// What forward returns.
pub struct Output {
    pub image_features: Vec<f32>,
    pub text_features: Vec<f32>,
    pub logits_per_image: Vec<f32>,
    pub loss: f32,
}

/// One layernorm's output and statistics.
struct Norm {
    y: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

fn norm(p: &Params, prefix: &str, x: &[f32], width: usize) -> Norm {
    let rows = x.len() / width;
    let mut n = Norm { y: vec![0.0; x.len()], mean: vec![0.0; rows], rstd: vec![0.0; rows] };
    layernorm_forward(
        &mut n.y,
        &mut n.mean,
        &mut n.rstd,
        x,
        p.get(&format!("{prefix}.weight")),
        p.get(&format!("{prefix}.bias")),
        width,
    );
    n
}

/// dx (overwritten) of a layernorm, accumulating its parameter gradients.
fn norm_backward(p: &Params, g: &mut Params, prefix: &str, dy: &[f32], x: &[f32], n: &Norm, width: usize) -> Vec<f32> {
    let mut dx = vec![0.0; x.len()];
    let (w, b) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
    let (dw, db) = g.pair_mut(&w, &b);
    layernorm_backward(&mut dx, dw, db, dy, x, &n.mean, &n.rstd, p.get(&w), width);
    dx
}

/// The saved activations of one residual block.
struct BlockCache {
    x: Vec<f32>,
    ln1: Norm,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    attn: Vec<f32>,
    mid: Vec<f32>,
    ln2: Norm,
    fc: Vec<f32>,
    act: Vec<f32>,
}

struct Tower {
    prefix: &'static str,
    width: usize,
    mlp: usize,
    shape: AttentionShape,
}

impl Tower {
    fn rows(&self) -> usize {
        self.shape.batch * self.shape.seq
    }

    /// x ← x + attn(ln_1(x)); x ← x + mlp(ln_2(x)).
    fn block_forward(&self, p: &Params, i: usize, x: &mut [f32], lengths: Option<&[usize]>) -> BlockCache {
        let (w, m, rows) = (self.width, self.mlp, self.rows());
        let name = |n: &str| format!("{}.resblocks.{i}.{n}", self.prefix);
        let input = x.to_vec();
        let ln1 = norm(p, &name("ln_1"), x, w);
        let mut qkv = vec![0.0; rows * 3 * w];
        linear_forward(
            &mut qkv,
            &ln1.y,
            p.get(&name("attn.in_proj_weight")),
            Some(p.get(&name("attn.in_proj_bias"))),
            rows,
            w,
            3 * w,
        );
        let mut attn = vec![0.0; rows * w];
        let mut probs = vec![0.0; self.shape.batch * self.shape.heads * self.shape.seq * self.shape.seq];
        attention_forward(&mut attn, &mut probs, &qkv, lengths, self.shape);
        let mut out = vec![0.0; rows * w];
        linear_forward(
            &mut out,
            &attn,
            p.get(&name("attn.out_proj.weight")),
            Some(p.get(&name("attn.out_proj.bias"))),
            rows,
            w,
            w,
        );
        x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
        let mid = x.to_vec();
        let ln2 = norm(p, &name("ln_2"), x, w);
        let mut fc = vec![0.0; rows * m];
        linear_forward(
            &mut fc,
            &ln2.y,
            p.get(&name("mlp.c_fc.weight")),
            Some(p.get(&name("mlp.c_fc.bias"))),
            rows,
            w,
            m,
        );
        let mut act = vec![0.0; rows * m];
        gelu_forward(&mut act, &fc);
        linear_forward(
            &mut out,
            &act,
            p.get(&name("mlp.c_proj.weight")),
            Some(p.get(&name("mlp.c_proj.bias"))),
            rows,
            m,
            w,
        );
        x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
        BlockCache { x: input, ln1, qkv, probs, attn, mid, ln2, fc, act }
    }

    /// Every block forward over `x`; keeps each block's activations, or with `checkpoint` only
    /// its input (the rest is recomputed in backward, one block at a time).
    fn blocks_forward(
        &self,
        p: &Params,
        layers: usize,
        x: &mut [f32],
        lengths: Option<&[usize]>,
        checkpoint: bool,
    ) -> Blocks {
        if checkpoint {
            let inputs = (0..layers)
                .map(|i| {
                    let input = x.to_vec();
                    self.block_forward(p, i, x, lengths);
                    input
                })
                .collect();
            Blocks::Recomputed { inputs, lengths: lengths.map(<[usize]>::to_vec) }
        } else {
            Blocks::Kept((0..layers).map(|i| self.block_forward(p, i, x, lengths)).collect())
        }
    }

    /// dx: the gradient at the last block's output in, at the first block's input out.
    fn blocks_backward(&self, p: &Params, g: &mut Params, dx: &mut [f32], blocks: &Blocks) {
        match blocks {
            Blocks::Kept(caches) => {
                for (i, cache) in caches.iter().enumerate().rev() {
                    self.block_backward(p, g, i, dx, cache);
                }
            }
            Blocks::Recomputed { inputs, lengths } => {
                for (i, input) in inputs.iter().enumerate().rev() {
                    let cache = self.block_forward(p, i, &mut input.clone(), lengths.as_deref());
                    self.block_backward(p, g, i, dx, &cache);
                }
            }
        }
    }

    /// dx: the gradient at the block's output in, at its input out.
    fn block_backward(&self, p: &Params, g: &mut Params, i: usize, dx: &mut [f32], c: &BlockCache) {
        let (w, m, rows) = (self.width, self.mlp, self.rows());
        let name = |n: &str| format!("{}.resblocks.{i}.{n}", self.prefix);
        // `weight`, `bias`: the parameter names within the block.
        let linear =
            |g: &mut Params, dinput: &mut [f32], dy: &[f32], x: &[f32], weights: [&str; 2], dims: (usize, usize)| {
                let (wn, bn) = (name(weights[0]), name(weights[1]));
                let (dw, db) = g.pair_mut(&wn, &bn);
                linear_backward(Some(dinput), dw, Some(db), dy, x, p.get(&wn), rows, dims.0, dims.1);
            };
        // MLP branch.
        let mut dact = vec![0.0; rows * m];
        linear(g, &mut dact, dx, &c.act, ["mlp.c_proj.weight", "mlp.c_proj.bias"], (m, w));
        let mut dfc = vec![0.0; rows * m];
        gelu_backward(&mut dfc, &dact, &c.fc);
        let mut dln2 = vec![0.0; rows * w];
        linear(g, &mut dln2, &dfc, &c.ln2.y, ["mlp.c_fc.weight", "mlp.c_fc.bias"], (w, m));
        let d = norm_backward(p, g, &name("ln_2"), &dln2, &c.mid, &c.ln2, w);
        dx.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        // Attention branch.
        let mut dattn = vec![0.0; rows * w];
        linear(g, &mut dattn, dx, &c.attn, ["attn.out_proj.weight", "attn.out_proj.bias"], (w, w));
        let mut dqkv = vec![0.0; rows * 3 * w];
        attention_backward(&mut dqkv, &dattn, &c.qkv, &c.probs, self.shape);
        let mut dln1 = vec![0.0; rows * w];
        linear(g, &mut dln1, &dqkv, &c.ln1.y, ["attn.in_proj_weight", "attn.in_proj_bias"], (w, 3 * w));
        let d = norm_backward(p, g, &name("ln_1"), &dln1, &c.x, &c.ln1, w);
        dx.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
    }
}

/// The transformer blocks' activations for backward: all of them, or (gradient checkpointing)
/// each block's input, from which backward recomputes the rest block by block: peak memory of
/// one block's activations instead of every block's, for one more forward.
enum Blocks {
    Kept(Vec<BlockCache>),
    Recomputed { inputs: Vec<Vec<f32>>, lengths: Option<Vec<usize>> },
}

/// What the two towers' backward needs.
pub struct TowerCaches {
    image: ImageCache,
    text: TextCache,
}

/// Everything the backward pass needs.
pub struct Cache {
    towers: TowerCaches,
    loss_grads: (Vec<f32>, Vec<f32>, f32),
}

struct ImageCache {
    patches: Vec<f32>,
    /// (image, source row in [0, L]) of each row of the gathered sequence, None for padding.
    sources: Vec<Option<(usize, usize)>>,
    x0: Vec<f32>,
    ln_pre: Norm,
    blocks: Blocks,
    cls: Vec<f32>,
    ln_post: Norm,
    tower: Tower,
}

struct TextCache {
    blocks: Blocks,
    last: Vec<f32>,
    ln_final: Norm,
    eot: Vec<usize>,
    tower: Tower,
}

pub struct Clip<'a> {
    pub cfg: &'a ClipConfig,
    /// Recompute each block's activations in backward instead of keeping them
    /// (`--grad-checkpointing`): the same gradients, less memory, one more forward.
    pub grad_checkpointing: bool,
}

impl Clip<'_> {
    /// Checks a batch against the config: sizes, token ids below the vocabulary size, keep
    /// indices in range and strictly ascending. Forward assumes a checked batch.
    pub fn check_batch(&self, batch: &Batch) -> Result<usize, String> {
        let (v, t) = (&self.cfg.vision_cfg, &self.cfg.text_cfg);
        let image_len = 3 * v.image_size * v.image_size;
        if batch.images.is_empty() || !batch.images.len().is_multiple_of(image_len) {
            return Err(format!(
                "images have {} values, not a positive multiple of 3×{}×{}",
                batch.images.len(),
                v.image_size,
                v.image_size
            ));
        }
        let n = batch.images.len() / image_len;
        if batch.text.len() != n * t.context_length {
            return Err(format!(
                "text has {} ids, {n} captions of context {} need {}",
                batch.text.len(),
                t.context_length,
                n * t.context_length
            ));
        }
        if let Some(i) = batch.text.iter().position(|&id| id as usize >= t.vocab_size) {
            return Err(format!(
                "token id {} of caption {} is out of range (vocab_size {})",
                batch.text[i],
                i / t.context_length,
                t.vocab_size
            ));
        }
        if let Some(keep) = batch.keep {
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
        }
        Ok(n)
    }

    /// Forward pass and loss; the cache feeds `backward`.
    pub fn forward(&self, p: &Params, batch: &Batch) -> (Output, Cache) {
        let (image_features, text_features, towers) = self.encode(p, batch);
        let b = towers.text.tower.shape.batch;
        let loss = clip_loss(&image_features, &text_features, p.get("logit_scale")[0], b, self.cfg.embed_dim);
        let out = Output { image_features, text_features, logits_per_image: loss.logits.clone(), loss: loss.loss };
        (out, Cache { towers, loss_grads: (loss.d_image, loss.d_text, loss.d_logit_scale) })
    }

    /// Image and text features (projected, not normalized) and what their backward needs; the
    /// loss is left to the caller (gradient accumulation computes it over several of these).
    pub fn encode(&self, p: &Params, batch: &Batch) -> (Vec<f32>, Vec<f32>, TowerCaches) {
        let (image_features, image) = self.image_forward(p, batch);
        let (text_features, text) = self.text_forward(p, batch);
        (image_features, text_features, TowerCaches { image, text })
    }

    /// Image features only (evaluation).
    pub fn encode_image(&self, p: &Params, images: &[f32]) -> Vec<f32> {
        self.image_forward(p, &Batch { images, text: &[], keep: None }).0
    }

    /// Text features only (evaluation).
    pub fn encode_text(&self, p: &Params, text: &[u32]) -> Vec<f32> {
        self.text_forward(p, &Batch { images: &[], text, keep: None }).0
    }

    /// Patch tokens [N, L, W] after the positional embedding (CLS excluded): PGS's token similarity.
    pub fn patch_tokens(&self, p: &Params, images: &[f32]) -> Vec<f32> {
        let (w, l) = (self.cfg.vision_cfg.width, self.cfg.patches());
        let patches = self.patchify(images);
        let pv = 3 * self.cfg.vision_cfg.patch_size.pow(2);
        let n = patches.len() / (l * pv);
        let mut tokens = vec![0.0; n * l * w];
        linear_forward(&mut tokens, &patches, p.get("visual.conv1.weight"), None, n * l, pv, w);
        let pos = &p.get("visual.positional_embedding")[w..];
        tokens.chunks_mut(l * w).for_each(|t| t.iter_mut().zip(pos).for_each(|(x, q)| *x += q));
        tokens
    }

    /// Patches [N·L, 3p²] flattened (channel, row, col) as conv1's weight [W, 3, p, p].
    fn patchify(&self, images: &[f32]) -> Vec<f32> {
        let v = &self.cfg.vision_cfg;
        let (ps, size, l) = (v.patch_size, v.image_size, self.cfg.patches());
        let n = images.len() / (3 * size * size);
        let cols = size / ps;
        let pv = 3 * ps * ps;
        let mut patches = vec![0.0; n * l * pv];
        for (b, img) in images.chunks(3 * size * size).enumerate() {
            for j in 0..l {
                let (y0, x0) = ((j / cols) * ps, (j % cols) * ps);
                for c in 0..3 {
                    for r in 0..ps {
                        let src = c * size * size + (y0 + r) * size + x0;
                        let dst = (b * l + j) * pv + (c * ps + r) * ps;
                        patches[dst..dst + ps].copy_from_slice(&img[src..src + ps]);
                    }
                }
            }
        }
        patches
    }

    fn image_forward(&self, p: &Params, batch: &Batch) -> (Vec<f32>, ImageCache) {
        let v = &self.cfg.vision_cfg;
        let (w, ps, size, l) = (v.width, v.patch_size, v.image_size, self.cfg.patches());
        let n = batch.images.len() / (3 * size * size);
        let pv = 3 * ps * ps;
        let patches = self.patchify(batch.images);
        let mut emb = vec![0.0; n * l * w];
        linear_forward(&mut emb, &patches, p.get("visual.conv1.weight"), None, n * l, pv, w);
        let keep: Vec<Vec<usize>> = match batch.keep {
            Some(k) => k.to_vec(),
            None => vec![(0..l).collect(); n],
        };
        let seq = 1 + keep.iter().map(Vec::len).max().unwrap_or(0);
        let (cls, pos) = (p.get("visual.class_embedding"), p.get("visual.positional_embedding"));
        let mut x0 = vec![0.0; n * seq * w];
        let mut sources = vec![None; n * seq];
        for b in 0..n {
            for (r, src) in std::iter::once(0).chain(keep[b].iter().map(|&j| j + 1)).enumerate() {
                let row = &mut x0[(b * seq + r) * w..(b * seq + r + 1) * w];
                let token = if src == 0 { cls } else { &emb[(b * l + src - 1) * w..(b * l + src) * w] };
                for k in 0..w {
                    row[k] = token[k] + pos[src * w + k];
                }
                sources[b * seq + r] = Some((b, src));
            }
        }
        let lengths: Vec<usize> = keep.iter().map(|k| k.len() + 1).collect();
        let tower = Tower {
            prefix: "visual.transformer",
            width: w,
            mlp: self.cfg.vision_mlp_width(),
            shape: AttentionShape {
                batch: n,
                seq,
                heads: self.cfg.vision_heads(),
                head_dim: v.head_width,
                causal: false,
            },
        };
        let ln_pre = norm(p, "visual.ln_pre", &x0, w);
        let mut x = ln_pre.y.clone();
        let padded = lengths.iter().any(|&len| len < seq);
        let blocks = tower.blocks_forward(p, v.layers, &mut x, padded.then_some(&lengths[..]), self.grad_checkpointing);
        let cls_rows: Vec<f32> = (0..n).flat_map(|b| x[b * seq * w..(b * seq + 1) * w].to_vec()).collect();
        let ln_post = norm(p, "visual.ln_post", &cls_rows, w);
        let mut features = vec![0.0; n * self.cfg.embed_dim];
        matmul(
            &mut features,
            MatRef::new(&ln_post.y, n, w),
            MatRef::new(p.get("visual.proj"), w, self.cfg.embed_dim),
            false,
        );
        (features, ImageCache { patches, sources, x0, ln_pre, blocks, cls: cls_rows, ln_post, tower })
    }

    fn text_forward(&self, p: &Params, batch: &Batch) -> (Vec<f32>, TextCache) {
        let t = &self.cfg.text_cfg;
        let (w, ctx) = (t.width, t.context_length);
        let n = batch.text.len() / ctx;
        let (tok, pos) = (p.get("token_embedding.weight"), p.get("positional_embedding"));
        let mut x = vec![0.0; n * ctx * w];
        for (r, &id) in batch.text.iter().enumerate() {
            let id = id as usize;
            for k in 0..w {
                x[r * w + k] = tok[id * w + k] + pos[(r % ctx) * w + k];
            }
        }
        let tower = Tower {
            prefix: "transformer",
            width: w,
            mlp: self.cfg.text_mlp_width(),
            shape: AttentionShape { batch: n, seq: ctx, heads: t.heads, head_dim: w / t.heads, causal: true },
        };
        let blocks = tower.blocks_forward(p, t.layers, &mut x, None, self.grad_checkpointing);
        let ln_final = norm(p, "ln_final", &x, w);
        // The EOT token: the first position of the largest id, as torch.argmax.
        let eot: Vec<usize> = batch
            .text
            .chunks(ctx)
            .map(|ids| (0..ctx).fold(0, |best, i| if ids[i] > ids[best] { i } else { best }))
            .collect();
        let pooled: Vec<f32> = eot
            .iter()
            .enumerate()
            .flat_map(|(b, &i)| ln_final.y[(b * ctx + i) * w..(b * ctx + i + 1) * w].to_vec())
            .collect();
        let mut features = vec![0.0; n * self.cfg.embed_dim];
        matmul(
            &mut features,
            MatRef::new(&pooled, n, w),
            MatRef::new(p.get("text_projection"), w, self.cfg.embed_dim),
            false,
        );
        (features, TextCache { blocks, last: x, ln_final, eot, tower })
    }

    /// Gradients of the loss for every parameter, written over `g` (shaped as `Params::zeros`).
    /// Reusing `g` across steps matters: a fresh 600 MB gradient set per ViT-B/16 step costs more
    /// in page faults than the backward GEMMs.
    pub fn backward(&self, p: &Params, batch: &Batch, cache: &Cache, g: &mut Params) {
        g.set_zero();
        let (d_img, d_txt, d_scale) = &cache.loss_grads;
        g.get_mut("logit_scale")[0] = *d_scale;
        self.backward_towers(p, batch, &cache.towers, d_img, d_txt, g);
    }

    /// Adds to `g` the gradients that the feature gradients `d_image`, `d_text` [B, E] send
    /// through both towers (the logit scale's gradient is the caller's).
    pub fn backward_towers(
        &self,
        p: &Params,
        batch: &Batch,
        towers: &TowerCaches,
        d_image: &[f32],
        d_text: &[f32],
        g: &mut Params,
    ) {
        self.image_backward(p, g, d_image, &towers.image);
        self.text_backward(p, g, batch, d_text, &towers.text);
    }

    fn image_backward(&self, p: &Params, g: &mut Params, d_features: &[f32], c: &ImageCache) {
        let (w, e) = (self.cfg.vision_cfg.width, self.cfg.embed_dim);
        let (n, seq) = (c.tower.shape.batch, c.tower.shape.seq);
        matmul(g.get_mut("visual.proj"), MatRef::new(&c.ln_post.y, n, w).t(), MatRef::new(d_features, n, e), true);
        let mut d_post = vec![0.0; n * w];
        matmul(&mut d_post, MatRef::new(d_features, n, e), MatRef::new(p.get("visual.proj"), w, e).t(), false);
        let d_cls = norm_backward(p, g, "visual.ln_post", &d_post, &c.cls, &c.ln_post, w);
        let mut dx = vec![0.0; n * seq * w];
        for b in 0..n {
            dx[b * seq * w..(b * seq + 1) * w].copy_from_slice(&d_cls[b * w..(b + 1) * w]);
        }
        c.tower.blocks_backward(p, g, &mut dx, &c.blocks);
        let dx0 = norm_backward(p, g, "visual.ln_pre", &dx, &c.x0, &c.ln_pre, w);
        let l = self.cfg.patches();
        let pv = 3 * self.cfg.vision_cfg.patch_size.pow(2);
        let mut d_emb = vec![0.0; n * l * w];
        for (r, src) in c.sources.iter().enumerate() {
            let Some((b, s)) = *src else { continue };
            let d = &dx0[r * w..(r + 1) * w];
            g.get_mut("visual.positional_embedding")[s * w..(s + 1) * w].iter_mut().zip(d).for_each(|(a, b)| *a += b);
            if s == 0 {
                g.get_mut("visual.class_embedding").iter_mut().zip(d).for_each(|(a, b)| *a += b);
            } else {
                d_emb[(b * l + s - 1) * w..(b * l + s) * w].copy_from_slice(d);
            }
        }
        let dw = g.get_mut("visual.conv1.weight");
        linear_backward(None, dw, None, &d_emb, &c.patches, p.get("visual.conv1.weight"), n * l, pv, w);
    }

    fn text_backward(&self, p: &Params, g: &mut Params, batch: &Batch, d_features: &[f32], c: &TextCache) {
        let (w, e, ctx) = (self.cfg.text_cfg.width, self.cfg.embed_dim, self.cfg.text_cfg.context_length);
        let n = c.tower.shape.batch;
        let pooled: Vec<f32> = c
            .eot
            .iter()
            .enumerate()
            .flat_map(|(b, &i)| c.ln_final.y[(b * ctx + i) * w..(b * ctx + i + 1) * w].to_vec())
            .collect();
        matmul(g.get_mut("text_projection"), MatRef::new(&pooled, n, w).t(), MatRef::new(d_features, n, e), true);
        let mut d_pooled = vec![0.0; n * w];
        matmul(&mut d_pooled, MatRef::new(d_features, n, e), MatRef::new(p.get("text_projection"), w, e).t(), false);
        let mut d_ln = vec![0.0; n * ctx * w];
        for (b, &i) in c.eot.iter().enumerate() {
            d_ln[(b * ctx + i) * w..(b * ctx + i + 1) * w].copy_from_slice(&d_pooled[b * w..(b + 1) * w]);
        }
        let mut dx = norm_backward(p, g, "ln_final", &d_ln, &c.last, &c.ln_final, w);
        c.tower.blocks_backward(p, g, &mut dx, &c.blocks);
        for (r, &id) in batch.text.iter().enumerate() {
            let d = &dx[r * w..(r + 1) * w];
            g.get_mut("token_embedding.weight")[id as usize * w..(id as usize + 1) * w]
                .iter_mut()
                .zip(d)
                .for_each(|(a, b)| *a += b);
            g.get_mut("positional_embedding")[(r % ctx) * w..(r % ctx + 1) * w]
                .iter_mut()
                .zip(d)
                .for_each(|(a, b)| *a += b);
        }
    }
}
