//! Evaluation on a held-out set:
//! - zero-shot classification, top-1/top-5, with open_clip's prompt ensembles (each class's
//!   normalized prompt embeddings averaged and renormalized);
//! - image↔text retrieval, R@1/5/10 both ways (the paired caption is the only right answer);
//! - compositionality in the manner of SugarCrepe: for each two-object image, is its caption scored
//!   above each hard negative (colours swapped, relation flipped, a colour or shape replaced)?
//! - robustness: zero-shot top-1 on shifted copies of the images (noise, blur, colour jitter).

use std::cell::RefCell;
use std::collections::BTreeMap;

use clip_pgs_kernels::philox::Philox;
use image::RgbImage;
use image::imageops;
use rayon::prelude::*;

use crate::clip::{Pass, Workspace};
use crate::data::loader::prepare;
use crate::data::{Classes, Source};
use crate::init::standard_normal;
use crate::precision::Precision;
use crate::preprocess::normalize;
use crate::tokenizer::ClipTokenizer;

/// Samples per forward pass of a workspace made only for evaluation (`clip-pgs eval`).
pub const CHUNK: usize = 128;

/// The held-out samples, preprocessed once.
pub struct EvalSet {
    pub rgb: Vec<RgbImage>,
    pub images: Vec<f32>,
    pub captions: Vec<String>,
    pub labels: Vec<Option<usize>>,
    /// (image, kind, caption) for the compositionality test.
    pub negatives: Vec<(usize, &'static str, String)>,
    pub classes: Option<Classes>,
    pub skipped: usize,
}

impl EvalSet {
    /// The first `n` usable samples of `source`.
    pub fn load(source: &dyn Source, n: usize, size: u32) -> EvalSet {
        let prepared: Vec<_> =
            (0..n.min(source.len())).into_par_iter().map(|i| (i, prepare(source, i, size))).collect();
        let mut set = EvalSet {
            rgb: Vec::new(),
            images: Vec::new(),
            captions: Vec::new(),
            labels: Vec::new(),
            negatives: Vec::new(),
            classes: source.classes().cloned(),
            skipped: 0,
        };
        for (i, p) in prepared {
            let Ok((x, rgb, caption, label)) = p else {
                set.skipped += 1;
                continue;
            };
            let row = set.captions.len();
            set.negatives.extend(source.hard_negatives(i).into_iter().map(|(kind, c)| (row, kind, c)));
            set.images.extend_from_slice(&x);
            set.rgb.push(rgb);
            set.captions.push(caption);
            set.labels.push(label);
        }
        set
    }

    pub fn len(&self) -> usize {
        self.captions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }
}

/// Row-wise L2 normalization.
fn normalized(mut x: Vec<f32>, dim: usize) -> Vec<f32> {
    for row in x.chunks_mut(dim) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= n);
    }
    x
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The model as evaluation uses it: normalized features in chunks.
pub struct Encoder<'a, T = f32> {
    pub pass: Pass<'a, T>,
    pub tokenizer: &'a ClipTokenizer,
    /// Buffers for the forward passes, in chunks of the workspace's batch (the trainer lends its
    /// own: evaluation then needs no memory of its own).
    workspace: RefCell<&'a mut Workspace<T>>,
}

impl<'a, T: Precision> Encoder<'a, T> {
    pub fn new(pass: Pass<'a, T>, tokenizer: &'a ClipTokenizer, workspace: &'a mut Workspace<T>) -> Self {
        Encoder { pass, tokenizer, workspace: RefCell::new(workspace) }
    }

    fn dim(&self) -> usize {
        self.pass.clip.cfg.embed_dim
    }

    pub fn images(&self, images: &[f32]) -> Result<Vec<f32>, String> {
        let len = 3 * self.pass.clip.cfg.vision_cfg.image_size.pow(2);
        let mut f = Vec::with_capacity(images.len() / len * self.dim());
        let chunk_len = self.workspace.borrow().batch;
        for chunk in images.chunks(chunk_len * len) {
            f.extend(self.workspace.borrow_mut().encode_images(&self.pass, chunk)?);
        }
        Ok(normalized(f, self.dim()))
    }

    pub fn texts(&self, texts: &[String]) -> Result<Vec<f32>, String> {
        let ctx = self.pass.clip.cfg.text_cfg.context_length;
        let mut ids = Vec::with_capacity(texts.len() * ctx);
        for t in texts {
            ids.extend(self.tokenizer.tokenize(t, ctx).map_err(|e| e.to_string())?);
        }
        let mut f = Vec::with_capacity(texts.len() * self.dim());
        let chunk_len = self.workspace.borrow().batch;
        for chunk in ids.chunks(chunk_len * ctx) {
            f.extend(self.workspace.borrow_mut().encode_texts(&self.pass, chunk)?);
        }
        Ok(normalized(f, self.dim()))
    }

    /// open_clip's zero-shot classifier: per class, the mean of its normalized prompt embeddings,
    /// renormalized. [C, E].
    pub fn classifier(&self, classes: &Classes) -> Result<Vec<f32>, String> {
        let e = self.dim();
        let mut weights = Vec::with_capacity(classes.names.len() * e);
        for c in 0..classes.names.len() {
            let prompts = self.texts(&classes.prompts(c))?;
            let mut mean = vec![0.0f32; e];
            for p in prompts.chunks(e) {
                mean.iter_mut().zip(p).for_each(|(m, v)| *m += v);
            }
            weights.extend(normalized(mean, e));
        }
        Ok(weights)
    }
}

/// (top-1, top-5) accuracy of `classifier` [C, E] on normalized image features with labels.
fn zero_shot(features: &[f32], labels: &[Option<usize>], classifier: &[f32], e: usize) -> Option<(f64, f64)> {
    let (mut top1, mut top5, mut n) = (0usize, 0usize, 0usize);
    for (f, label) in features.chunks(e).zip(labels) {
        let Some(label) = *label else { continue };
        let score = dot(f, &classifier[label * e..(label + 1) * e]);
        let better = classifier.chunks(e).filter(|w| dot(f, w) > score).count();
        top1 += usize::from(better == 0);
        top5 += usize::from(better < 5);
        n += 1;
    }
    (n > 0).then(|| (top1 as f64 / n as f64, top5 as f64 / n as f64))
}

/// Recall@k both ways for paired image and text features [N, E].
fn retrieval(images: &[f32], texts: &[f32], e: usize, out: &mut BTreeMap<String, f64>) {
    let n = images.len() / e;
    let score = |i: usize, t: usize| dot(&images[i * e..(i + 1) * e], &texts[t * e..(t + 1) * e]);
    // Rank of the right answer: how many others score strictly higher than the pair.
    let paired: Vec<f32> = (0..n).map(|i| score(i, i)).collect();
    let image_ranks: Vec<usize> =
        (0..n).into_par_iter().map(|i| (0..n).filter(|&t| score(i, t) > paired[i]).count()).collect();
    let text_ranks: Vec<usize> =
        (0..n).into_par_iter().map(|t| (0..n).filter(|&i| score(i, t) > paired[t]).count()).collect();
    for k in [1, 5, 10] {
        let recall = |ranks: &[usize]| ranks.iter().filter(|&&r| r < k).count() as f64 / n.max(1) as f64;
        out.insert(format!("image_to_text_R@{k}"), recall(&image_ranks));
        out.insert(format!("text_to_image_R@{k}"), recall(&text_ranks));
    }
}

/// The distribution shifts of the robustness test, applied to the preprocessed pictures.
pub const SHIFTS: [&str; 3] = ["noise", "blur", "colour_jitter"];

pub fn shift(rgb: &RgbImage, kind: &str, seed: u32) -> RgbImage {
    match kind {
        "noise" => {
            let rng = Philox::new(0x5eed, 0xa015e, seed);
            let mut out = rgb.clone();
            for (i, v) in out.iter_mut().enumerate() {
                *v = (*v as f32 + 25.0 * standard_normal(&rng, i as u32)).clamp(0.0, 255.0) as u8;
            }
            out
        }
        "blur" => imageops::blur(rgb, 1.5),
        _ => {
            // Brightness, contrast and a per-channel gain drawn per image (torchvision ColorJitter-like).
            let rng = Philox::new(0x5eed, 0xc0102, seed);
            let (brightness, contrast) = (0.7 + 0.6 * rng.uniform(0), 0.6 + 0.8 * rng.uniform(1));
            let gains: [f32; 3] = std::array::from_fn(|c| 0.8 + 0.4 * rng.uniform(2 + c as u32));
            let mean = rgb.iter().map(|&v| v as f32).sum::<f32>() / rgb.len().max(1) as f32;
            let mut out = rgb.clone();
            for (i, v) in out.iter_mut().enumerate() {
                let x = (*v as f32 - mean) * contrast + mean;
                *v = (x * brightness * gains[i % 3]).clamp(0.0, 255.0) as u8;
            }
            out
        }
    }
}

/// Every metric the set supports, by name.
pub fn evaluate<T: Precision>(enc: &Encoder<T>, set: &EvalSet) -> Result<BTreeMap<String, f64>, String> {
    let e = enc.dim();
    let mut out = BTreeMap::new();
    if set.is_empty() {
        return Ok(out);
    }
    let images = enc.images(&set.images)?;
    let texts = enc.texts(&set.captions)?;
    retrieval(&images, &texts, e, &mut out);
    if let Some(classes) = &set.classes {
        let classifier = enc.classifier(classes)?;
        if let Some((top1, top5)) = zero_shot(&images, &set.labels, &classifier, e) {
            out.insert("zeroshot_top1".into(), top1);
            out.insert("zeroshot_top5".into(), top5);
            out.insert("zeroshot_chance".into(), 1.0 / classes.names.len() as f64);
            for kind in SHIFTS {
                let shifted: Vec<f32> = set
                    .rgb
                    .par_iter()
                    .enumerate()
                    .flat_map_iter(|(i, rgb)| normalize(&shift(rgb, kind, i as u32)))
                    .collect();
                if let Some((top1, _)) = zero_shot(&enc.images(&shifted)?, &set.labels, &classifier, e) {
                    out.insert(format!("robust_{kind}_top1"), top1);
                }
            }
        }
    }
    if !set.negatives.is_empty() {
        let negatives: Vec<String> = set.negatives.iter().map(|(_, _, c)| c.clone()).collect();
        let negative_features = enc.texts(&negatives)?;
        let mut by_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for ((row, kind, _), neg) in set.negatives.iter().zip(negative_features.chunks(e)) {
            let image = &images[row * e..(row + 1) * e];
            // The plain caption of the scene is the sample's own caption for two-object images.
            let right = dot(image, &texts[row * e..(row + 1) * e]) > dot(image, neg);
            let entry = by_kind.entry(kind).or_default();
            entry.0 += usize::from(right);
            entry.1 += 1;
        }
        let (right, total) = by_kind.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        out.insert("compositionality".into(), right as f64 / total as f64);
        for (kind, (r, t)) in by_kind {
            out.insert(format!("compositionality_{}", kind.replace(' ', "_")), r as f64 / t as f64);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_shot_and_retrieval_count_ranks() {
        // Three orthogonal classes; images 0, 1 match their class, image 2 is closest to class 0.
        let classifier = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let images = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.8, 0.0, 0.6];
        let labels = [Some(0), Some(1), Some(2)];
        let (top1, top5) = zero_shot(&images, &labels, &classifier, 3).unwrap();
        assert!((top1 - 2.0 / 3.0).abs() < 1e-9 && top5 == 1.0);
        let mut out = BTreeMap::new();
        retrieval(&images, &classifier, 3, &mut out);
        assert!((out["image_to_text_R@1"] - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(out["image_to_text_R@5"], 1.0);
        // Text 0 is closest to image 0, text 2 to image 2 (0.6 > 0): text→image gets all three.
        assert_eq!(out["text_to_image_R@1"], 1.0);
    }

    #[test]
    fn shifts_change_the_picture_deterministically() {
        let rgb = RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16) as u8, (y * 16) as u8, 128]));
        for kind in SHIFTS {
            let a = shift(&rgb, kind, 3);
            assert_ne!(a, rgb, "{kind}");
            assert_eq!(a, shift(&rgb, kind, 3), "{kind}");
        }
    }
}
