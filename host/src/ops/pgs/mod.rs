//! PGS masking on the CPU (the reference): pgs-spec.md, both modes (`paper`, `reference`), the
//! baselines `none` and `flip`, and the ablations without the edge map (ED) or without optimal
//! transport (OTN). The masks are a pure function of (pixels, tokens, config, seed, step, epoch).
//!
//! Files: `patches` (standardized patches, similarity, the reference edge grid), `sinkhorn`,
//! `select` (top-k and mask counts), `gather` (packing kept tokens).

pub mod gather;
pub mod gpu;
pub mod patches;
pub mod select;
pub mod sinkhorn;

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use clip_pgs_kernels::philox::Philox;
use clip_pgs_kernels::select::{
    REFERENCE_EDGE_WEIGHT, SIMILARITY_THRESHOLD, floor_nonnegative, gumbel_key, masked_count, paper_candidate_count,
    rank_reference_keep, reference_candidate_count, reference_keep_cap,
};
use clip_pgs_kernels::sinkhorn::{EPSILON, MAX_ITERATIONS, TOLERANCE};

use super::edge_map::{ImageBatchShape, ImageElement, PatchGrid, edge_map_cpu};
use crate::buffer::Buffer;
use crate::device::Device;
use crate::error::{Error, Result};
use patches::{StandardizedPatches, Tokens, similarity};
use select::{paper_mask_count, top_k, top_k_ties_to_higher_index};
use sinkhorn::{sinkhorn_knopp_signed, sinkhorn_log};

/// The `reference` mode's hard-wired epoch count in α = e/32.
pub const REFERENCE_EPOCHS: usize = 32;

/// Which masking a training step uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Masking {
    /// CLIP: every patch kept.
    None,
    /// FLIP: floor(ratio·L) uniformly random patches dropped per image.
    Flip {
        ratio: f32,
    },
    Pgs(PgsConfig),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgsMode {
    /// What the paper describes (default).
    Paper,
    /// What the public code computes.
    Reference,
}

/// How many patches PGS masks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskRatio {
    /// floor(r·L) per image (PGS-0.5: r = 0.5).
    Fixed(f32),
    /// Per image, the patches similar to a candidate, clamped to [floor(min·L), floor(max·L)]
    /// (PGS-0.3: min 0.3, max 0.5). In `reference` mode `min` is the public code's r_min.
    Dynamic { min: f32, max: f32 },
}

impl Masking {
    /// The most of `l` patches an image keeps under this rule: the GPU step sizes the image
    /// sequence with it, so no host read of the counts sits inside a step (images that keep
    /// fewer are padded, and their padding is masked in attention).
    pub fn max_kept(&self, l: usize) -> usize {
        match self {
            Masking::None => l,
            Masking::Flip { ratio } => l - masked_count(*ratio, l).min(l),
            Masking::Pgs(cfg) if cfg.mode == PgsMode::Reference => reference_keep_cap(cfg.ratio.min(), l).min(l),
            Masking::Pgs(cfg) => l - masked_count(cfg.ratio.min(), l).min(l),
        }
    }
}

impl MaskRatio {
    /// The smallest ratio this rule allows (the `reference` mode's r_min).
    pub fn min(&self) -> f32 {
        match *self {
            MaskRatio::Fixed(r) => r,
            MaskRatio::Dynamic { min, .. } => min,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PgsConfig {
    pub mode: PgsMode,
    pub ratio: MaskRatio,
    /// Edge map (ED); off = `--no-ed`.
    pub use_ed: bool,
    /// Optimal-transport normalization (OTN); off = `--no-otn`.
    pub use_otn: bool,
}

impl Default for PgsConfig {
    fn default() -> Self {
        PgsConfig { mode: PgsMode::Paper, ratio: MaskRatio::Fixed(0.5), use_ed: true, use_otn: true }
    }
}

impl FromStr for PgsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "paper" => Ok(PgsMode::Paper),
            "reference" => Ok(PgsMode::Reference),
            _ => Err(format!("unknown PGS mode '{s}': expected paper or reference")),
        }
    }
}

impl fmt::Display for PgsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PgsMode::Paper => "paper",
            PgsMode::Reference => "reference",
        })
    }
}

/// Where in training the masks are drawn: the seed, step and image key the random draws, the
/// epoch sets the token/pixel weight α = epoch / epochs (`paper`) or epoch / 32 (`reference`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskStep {
    pub seed: u64,
    pub step: u32,
    /// The batch's first image in the global batch (data-parallel rank r of batch b: r·b), so
    /// that N ranks draw the masks of one process of N·b; 0 in one process.
    pub first: u32,
    pub epoch: usize,
    pub epochs: usize,
}

impl MaskStep {
    fn rng(&self, image: usize) -> Philox {
        Philox::new(self.seed, self.step, self.first.wrapping_add(image as u32))
    }
}

/// One image's mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageMask {
    /// Kept patch indices, ascending (raster order).
    pub kept: Vec<u32>,
    /// The candidates (seeds of the masked regions); empty for `none` and `flip`.
    pub candidates: Vec<u32>,
}

/// The masks of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Masks {
    /// L, patches per image.
    pub patches: usize,
    pub images: Vec<ImageMask>,
}

impl Masks {
    /// K_max, the most patches any image keeps.
    pub fn max_kept(&self) -> usize {
        self.images.iter().map(|m| m.kept.len()).max().unwrap_or(0)
    }

    /// Masked patches over all patches of the batch.
    pub fn masked_fraction(&self) -> f64 {
        let kept: usize = self.images.iter().map(|m| m.kept.len()).sum();
        1.0 - kept as f64 / (self.patches * self.images.len()).max(1) as f64
    }

    /// masked[i][j]: whether image i drops patch j.
    pub fn masked(&self) -> Vec<Vec<bool>> {
        self.images
            .iter()
            .map(|m| {
                let mut masked = vec![true; self.patches];
                m.kept.iter().for_each(|&j| masked[j as usize] = false);
                masked
            })
            .collect()
    }
}

/// What to mask: the batch's geometry, the method and the training step it is for. One value for
/// every entry point (CPU, GPU, checks) instead of the same six arguments each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskRequest {
    pub shape: ImageBatchShape,
    /// Patch side in pixels.
    pub patch: usize,
    pub masking: Masking,
    pub at: MaskStep,
}

/// Patch tokens [N, L, D] (after the positional embedding, CLS excluded), if the similarity uses
/// them; with α = 0 (first epoch) they may be omitted.
#[derive(Clone, Copy)]
pub struct PatchTokens<'a> {
    pub tokens: &'a [f32],
    pub dim: usize,
}

/// Masks on the device that computed them.
pub enum MaskBuffers {
    Cpu(Masks),
    /// On CUDA or the emulator.
    Gpu(Box<gpu::DeviceMasks>),
}

impl MaskBuffers {
    /// The masks on the host (waits for the GPU).
    pub fn to_masks(&self) -> Result<Masks> {
        match self {
            MaskBuffers::Cpu(m) => Ok(m.clone()),
            MaskBuffers::Gpu(m) => m.to_masks(),
        }
    }
}

/// The whole PGS (or FLIP, or none) pipeline on the device that holds `images` [N, 3, H, W]
/// (and `tokens` [N, L, D], same element type), one call; on CUDA every step is queued on the
/// runtime's stream with no host synchronisation until `to_masks`.
pub fn pgs_mask<T: ImageElement>(
    device: &Device,
    request: &MaskRequest,
    images: &Buffer<T>,
    tokens: Option<(&Buffer<T>, usize)>,
) -> Result<MaskBuffers> {
    match (device, images) {
        (Device::Cpu, Buffer::Cpu(pixels)) => {
            let widen = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
            let pixels = widen(pixels);
            let tokens = match tokens {
                Some((Buffer::Cpu(t), dim)) => Some((widen(t), dim)),
                Some((other, _)) => return Err(wrong_device(device, "patch tokens", other.device_name())),
                None => None,
            };
            let tokens = tokens.as_ref().map(|(t, dim)| PatchTokens { tokens: t, dim: *dim });
            Ok(MaskBuffers::Cpu(mask_cpu(request, &pixels, tokens)?))
        }
        (Device::Cuda(_), Buffer::Cuda(_)) | (Device::Emu(_), Buffer::Emu(_)) => {
            if let Some((t, _)) = tokens
                && t.device_name() != images.device_name()
            {
                return Err(wrong_device(device, "patch tokens", t.device_name()));
            }
            Ok(MaskBuffers::Gpu(Box::new(gpu::mask_gpu(
                device,
                request,
                images.view(),
                tokens.map(|(t, d)| (t.view(), d)),
            )?)))
        }
        (_, buffer) => Err(wrong_device(device, "images", buffer.device_name())),
    }
}

fn wrong_device(device: &Device, what: &str, memory: &str) -> Error {
    Error::WrongDevice(format!("pgs_mask runs on {device} but the {what} are in {memory} memory"))
}

/// The masks of a batch of CLIP-normalized images [N, 3, H, W] cut into `patch`-sized patches.
pub fn mask_cpu(request: &MaskRequest, images: &[f32], tokens: Option<PatchTokens>) -> Result<Masks> {
    let grid = check_inputs(request, images, tokens)?;
    let MaskRequest { shape, ref masking, ref at, .. } = *request;
    let l = grid.len();
    let images_of = |n: usize| &images[n * shape.image_len()..(n + 1) * shape.image_len()];
    let tokens_of = |n: usize| tokens.map(|t| Tokens::new(&t.tokens[n * l * t.dim..(n + 1) * l * t.dim], t.dim));
    let images_out = match masking {
        Masking::None => {
            (0..shape.n).map(|_| ImageMask { kept: (0..l as u32).collect(), candidates: vec![] }).collect()
        }
        Masking::Flip { ratio } => (0..shape.n)
            .map(|n| {
                let rng = at.rng(n);
                let draws: Vec<f32> = (0..l).map(|j| rng.uniform(j as u32)).collect();
                let masked = top_k(&draws, None, masked_count(*ratio, l));
                ImageMask { kept: complement(&masked, l), candidates: vec![] }
            })
            .collect(),
        Masking::Pgs(cfg) if cfg.mode == PgsMode::Paper => {
            let edges = if cfg.use_ed { edge_map_cpu(images, shape, grid) } else { vec![0.0; shape.n * l] };
            let alpha = at.epoch as f32 / at.epochs as f32;
            (0..shape.n)
                .into_par_iter()
                .map(|n| {
                    let patches = StandardizedPatches::new(images_of(n), shape.height, shape.width, grid);
                    paper_image(&patches, tokens_of(n).as_ref(), &edges[n * l..(n + 1) * l], cfg, alpha, at.rng(n))
                })
                .collect()
        }
        Masking::Pgs(cfg) => {
            let draws: Vec<f32> = (0..shape.n)
                .flat_map(|n| {
                    let rng = at.rng(n);
                    (0..2 * l).map(move |j| rng.uniform(j as u32))
                })
                .collect();
            let alpha = at.epoch as f32 / REFERENCE_EPOCHS as f32;
            reference_batch(images, shape, grid, tokens, cfg, alpha, &draws)
        }
    };
    Ok(Masks { patches: l, images: images_out })
}

/// `paper` mode, one image (pgs-spec.md steps 2–5).
fn paper_image(
    patches: &StandardizedPatches,
    tokens: Option<&Tokens>,
    edges: &[f32],
    cfg: &PgsConfig,
    alpha: f32,
    rng: Philox,
) -> ImageMask {
    let l = edges.len();
    let n_c = paper_candidate_count(l);
    let keys: Vec<f32> = (0..l).map(|i| gumbel_key(edges[i], rng.uniform(i as u32))).collect();
    let candidates = top_k(&keys, None, n_c);
    let s = similarity(patches, tokens, &candidates, alpha);
    let balanced = if cfg.use_otn {
        let scale = (n_c * l) as f32;
        sinkhorn_log(&s, n_c, l, EPSILON, MAX_ITERATIONS, TOLERANCE).plan.iter().map(|p| scale * p).collect()
    } else {
        s.clone()
    };
    let mut score: Vec<f32> = (0..l)
        .map(|j| {
            let best = (0..n_c).fold(f32::NEG_INFINITY, |m, c| m.max(balanced[c * l + j]));
            best * (1.0 - edges[j])
        })
        .collect();
    candidates.iter().for_each(|&c| score[c] = f32::INFINITY);
    let jitter: Vec<u32> = (0..l).map(|j| rng.bits((l + j) as u32)).collect();
    let masked = top_k(&score, Some(&jitter), paper_mask_count(cfg.ratio, &s, n_c, l));
    ImageMask { kept: complement(&masked, l), candidates: candidates.iter().map(|&c| c as u32).collect() }
}

/// `reference` mode, the whole batch (the kept count is shared). `draws` [N, 2L] are uniforms in
/// (0, 1): per image, L for the candidate scores, then L for the priorities. Public so that tests
/// can feed the draws of the NumPy port.
pub fn reference_batch(
    images: &[f32],
    shape: ImageBatchShape,
    grid: PatchGrid,
    tokens: Option<PatchTokens>,
    cfg: &PgsConfig,
    alpha: f32,
    draws: &[f32],
) -> Vec<ImageMask> {
    let l = grid.len();
    let n_c = reference_candidate_count(l);
    struct Flagged {
        masked: Vec<bool>,
        edge_sum: f32,
        candidates: Vec<usize>,
    }
    let flagged: Vec<Flagged> = (0..shape.n)
        .into_par_iter()
        .map(|n| {
            let image = &images[n * shape.image_len()..(n + 1) * shape.image_len()];
            let patches = StandardizedPatches::new(image, shape.height, shape.width, grid);
            let edges = if cfg.use_ed { patches.reference_edge_grid() } else { vec![0.0; l] };
            let u = &draws[n * 2 * l..n * 2 * l + l];
            let scores: Vec<f32> = (0..l).map(|i| u[i] + REFERENCE_EDGE_WEIGHT * edges[i]).collect();
            let candidates = top_k_ties_to_higher_index(&scores, n_c);
            let toks = tokens.map(|t| Tokens::new(&t.tokens[n * l * t.dim..(n + 1) * l * t.dim], t.dim));
            let all: Vec<usize> = (0..l).collect();
            let mut s = similarity(&patches, toks.as_ref(), &all, alpha);
            if cfg.use_otn {
                let sk = sinkhorn_knopp_signed(&s, l);
                s.iter_mut().zip(&sk).for_each(|(v, k)| *v += k);
            }
            let masked = (0..l).map(|j| candidates.iter().any(|&a| s[a * l + j] > SIMILARITY_THRESHOLD)).collect();
            let edge_sum = edges.iter().fold(0.0f32, |acc, e| acc + e);
            Flagged { masked, edge_sum, candidates }
        })
        .collect();
    let fewest_masked = flagged.iter().map(|f| f.masked.iter().filter(|&&m| m).count()).min().unwrap_or(0);
    let least_edge = flagged.iter().map(|f| f.edge_sum).fold(f32::INFINITY, f32::min);
    let edge_bonus = if cfg.use_ed { floor_nonnegative(least_edge) } else { 0 };
    let cap = reference_keep_cap(cfg.ratio.min(), l);
    let keep = cap.min(l - fewest_masked + edge_bonus);
    flagged
        .iter()
        .enumerate()
        .map(|(n, f)| {
            let priority = &draws[n * 2 * l + l..(n + 1) * 2 * l];
            // Ascending (m_j, u_j), stable: unflagged patches first in raster order.
            let kept = (0..l as u32)
                .filter(|&j| rank_reference_keep(j as usize, l, |i| f.masked[i], |i| priority[i]) < keep)
                .collect();
            ImageMask { kept, candidates: f.candidates.iter().map(|&c| c as u32).collect() }
        })
        .collect()
}

/// The indices of 0..l not in `masked`, ascending.
fn complement(masked: &[usize], l: usize) -> Vec<u32> {
    let mut is_masked = vec![false; l];
    masked.iter().for_each(|&j| is_masked[j] = true);
    (0..l as u32).filter(|&j| !is_masked[j as usize]).collect()
}

/// An error naming the first non-finite pixel of `images` [N, 3, H, W]: the masks' only input
/// from the host (a GPU step checks it there, before the upload, rather than read flags back).
pub fn check_finite_pixels(shape: ImageBatchShape, images: &[f32]) -> Result<()> {
    match images.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => {
            let (n, rest) = (i / shape.image_len(), i % shape.image_len());
            let (c, y, x) =
                (rest / (shape.height * shape.width), rest / shape.width % shape.height, rest % shape.width);
            Err(Error::InvalidArgument(format!(
                "image {n} has a non-finite pixel ({}) at channel {c}, y {y}, x {x}",
                images[i]
            )))
        }
    }
}

fn check_inputs(request: &MaskRequest, images: &[f32], tokens: Option<PatchTokens>) -> Result<PatchGrid> {
    let grid = check_arguments(request, images.len(), tokens.map(|t| (t.tokens.len(), t.dim)))?;
    check_finite_pixels(request.shape, images)?;
    if let Some(t) = tokens
        && let Some(i) = t.tokens.iter().position(|v| !v.is_finite())
    {
        let l = grid.len();
        return Err(Error::InvalidArgument(format!(
            "patch token {} of image {} is not finite",
            i / t.dim % l,
            i / (l * t.dim)
        )));
    }
    Ok(grid)
}

/// The checks both devices make before any work: sizes, ratios, epochs. `tokens` is (elements,
/// dim). Non-finite values are checked by each device (the GPU flags them on the way).
pub(crate) fn check_arguments(
    request: &MaskRequest,
    images_len: usize,
    tokens: Option<(usize, usize)>,
) -> Result<PatchGrid> {
    let MaskRequest { shape, patch, ref masking, ref at } = *request;
    let invalid = |m: String| Err(Error::InvalidArgument(m));
    let grid = PatchGrid::new(shape.height, shape.width, patch)?;
    let l = grid.len();
    if shape.n == 0 {
        return invalid("the batch is empty (n = 0)".into());
    }
    if images_len != shape.len() {
        return invalid(format!(
            "images buffer has {images_len} elements, shape [{}, 3, {}, {}] needs {}",
            shape.n,
            shape.height,
            shape.width,
            shape.len()
        ));
    }
    if shape.n * l * (3 * patch * patch).max(l) >= u32::MAX as usize {
        return invalid(format!("a batch of {} images with {l} patches is too large for one call", shape.n));
    }
    if let Some((len, dim)) = tokens
        && (dim == 0 || len != shape.n * l * dim)
    {
        return invalid(format!(
            "patch tokens have {len} elements, [N = {}, L = {l}, D = {dim}] needs {}",
            shape.n,
            shape.n * l * dim
        ));
    }
    let check_ratio = |name: &str, r: f32| {
        if (0.0..=1.0).contains(&r) {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "{name} {r} is outside [0, 1]: it would mask {} of {l} patches",
                (r as f64 * l as f64).floor()
            )))
        }
    };
    match masking {
        Masking::None => {}
        Masking::Flip { ratio } => check_ratio("FLIP mask ratio", *ratio)?,
        Masking::Pgs(cfg) => {
            match cfg.ratio {
                MaskRatio::Fixed(r) => check_ratio("mask ratio", r)?,
                MaskRatio::Dynamic { min, max } => {
                    check_ratio("minimum mask ratio", min)?;
                    check_ratio("maximum mask ratio", max)?;
                    if min > max {
                        return invalid(format!("dynamic mask ratio: minimum {min} exceeds maximum {max}"));
                    }
                }
            }
            if cfg.mode == PgsMode::Paper && at.epochs == 0 {
                return invalid("the number of epochs is 0 (α = epoch / epochs)".into());
            }
            let alpha_is_zero = at.epoch == 0;
            if tokens.is_none() && !alpha_is_zero {
                return invalid(format!(
                    "epoch {} weighs token similarity (α > 0) but no patch tokens were given",
                    at.epoch
                ));
            }
            if l < 2 {
                return invalid(format!("PGS needs at least 2 patches per image, the grid has {l}"));
            }
        }
    }
    Ok(grid)
}
