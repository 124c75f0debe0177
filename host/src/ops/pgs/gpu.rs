//! PGS on a GPU device (CUDA, or the emulator): the launches of the whole pipeline on one
//! stream, no host synchronisation inside. Each kernel does what the CPU reference (`mod.rs`)
//! does, with the same helpers of `clip-pgs-kernels`, so the masks are identical bit for bit.
//!
//! paper:     edge map → standardize patches (+ token norms) → Gumbel-top-k candidates →
//!            similarity [n_c, L] → log-domain Sinkhorn → selection (+ compaction)
//! reference: standardize → edge grid → candidates → similarity [L, L] → S + SK(S) →
//!            flags → batch K and keep order
//! flip:      selection of Philox uniforms

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, LaunchConfig};

use clip_pgs_kernels::edge_map::{pgs_reference_edge_grid, reference_grid_shared_bytes};
use clip_pgs_kernels::hw::Kernel;
use clip_pgs_kernels::select::{
    masked_count, paper_candidate_count, pgs_candidates, pgs_reference_flags, pgs_reference_keep, pgs_select_flip,
    pgs_select_paper, reference_candidate_count, reference_keep_cap,
};
use clip_pgs_kernels::sinkhorn::{
    EPSILON, MAX_ITERATIONS, TOLERANCE, log_shared_bytes, pgs_sinkhorn_knopp_signed, pgs_sinkhorn_log,
};
use clip_pgs_kernels::{edge_map as edge_kernels, patch_stats, select, sinkhorn};

use clip_pgs_kernels::mask_clock::{self, MaskClock};

use super::{ImageMask, MaskRatio, MaskRequest, MaskStep, Masking, Masks, PgsMode, REFERENCE_EPOCHS};
use crate::buffer::Buffer;
use crate::device::Device;
use crate::error::{CudaContextExt, Error, Result};
use crate::launch::KernelArgs;
use crate::ops::edge_map::{ImageElement, PatchGrid, edge_map_gpu_into};
use crate::view::{Span, View};

/// Masks still on the GPU device; `to_masks` waits for them.
pub struct DeviceMasks {
    pub patches: usize,
    pub images: usize,
    /// [N, L]: the first kept_len[n] entries of row n are image n's kept patches, ascending.
    pub kept: Buffer<u32>,
    pub kept_len: Buffer<u32>,
    /// [N, n_c] in rank order, for PGS.
    pub candidates: Option<(Buffer<u32>, usize)>,
    /// [N, L] per patch (pixels) and per token: 1 where a value is NaN or ±∞.
    nonfinite: Vec<(Buffer<u32>, &'static str)>,
}

impl DeviceMasks {
    /// An error naming the first image with a non-finite pixel or patch token (waits for the
    /// GPU).
    pub fn check_finite(&self) -> Result<()> {
        let l = self.patches;
        for (flags, what) in &self.nonfinite {
            if let Some(i) = flags.to_vec()?.iter().position(|&f| f != 0) {
                return Err(Error::InvalidArgument(format!("image {} has non-finite {what} (patch {})", i / l, i % l)));
            }
        }
        Ok(())
    }

    /// Copies the masks to the host (waits for the GPU). A non-finite input value surfaces here
    /// as an error naming the image.
    pub fn to_masks(&self) -> Result<Masks> {
        let l = self.patches;
        self.check_finite()?;
        let kept = self.kept.to_vec()?;
        let kept_len = self.kept_len.to_vec()?;
        let candidates = match &self.candidates {
            Some((c, n_c)) => Some((c.to_vec()?, *n_c)),
            None => None,
        };
        let images = (0..self.images)
            .map(|n| ImageMask {
                kept: kept[n * l..n * l + kept_len[n] as usize].to_vec(),
                candidates: candidates.as_ref().map_or(vec![], |(c, n_c)| c[n * n_c..(n + 1) * n_c].to_vec()),
            })
            .collect();
        Ok(Masks { patches: l, images })
    }
}

/// A grid of (x, y, z) blocks of `threads` with `shared_bytes` of dynamic shared memory.
fn blocks(grid: (usize, usize, usize), threads: u32, shared_bytes: usize) -> LaunchConfig {
    let grid_dim = (grid.0 as u32, grid.1 as u32, grid.2 as u32);
    LaunchConfig { grid_dim, block_dim: (threads, 1, 1), shared_mem_bytes: shared_bytes as u32 }
}

/// One block per image.
fn per_image(images: usize, threads: u32, shared_bytes: usize) -> LaunchConfig {
    blocks((images, 1, 1), threads, shared_bytes)
}

/// CUDA events recorded after each kernel of the pipeline (for `clip-pgs bench`), by kernel name.
pub type Timeline = Vec<(&'static str, CudaEvent)>;

/// Records an event named `what` on the CUDA stream when a timeline is being kept.
fn mark(device: &Device, timeline: &mut Option<Timeline>, what: &'static str) -> Result<()> {
    if let (Some(t), Device::Cuda(rt)) = (timeline, device) {
        let event = rt.context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).during("creating an event")?;
        event.record(&rt.stream).during("recording an event")?;
        t.push((what, event));
    }
    Ok(())
}

/// Launches `kernel` with `args`, then marks the timeline.
fn launch<P: Copy + Send + Sync + 'static>(
    device: &Device,
    timeline: &mut Option<Timeline>,
    kernel: &Kernel<P>,
    cfg: LaunchConfig,
    args: impl KernelArgs<P>,
) -> Result<()> {
    // SAFETY: each caller passes buffers sized as the kernel's safety section requires.
    unsafe { device.launch(kernel, cfg, args) }?;
    mark(device, timeline, kernel.name())
}

/// The masks of a batch on a GPU device. Arguments as `mask_cpu`, as views on the device;
/// `tokens` [N, L, D]. The working buffers are allocated per call (`MaskWork` keeps them).
pub fn mask_gpu<T: ImageElement>(
    device: &Device,
    request: &MaskRequest,
    images: View<T>,
    tokens: Option<(View<T>, usize)>,
) -> Result<DeviceMasks> {
    mask_gpu_timed(device, request, images, tokens, &mut None)
}

/// `mask_gpu`, recording a CUDA event after every kernel into `timeline` when it is `Some`.
pub fn mask_gpu_timed<T: ImageElement>(
    device: &Device,
    request: &MaskRequest,
    images: View<T>,
    tokens: Option<(View<T>, usize)>,
    timeline: &mut Option<Timeline>,
) -> Result<DeviceMasks> {
    let mut work = MaskWork::new(device, request, tokens.map(|(_, dim)| dim))?;
    work.set_clock(&request.at)?;
    work.launch(device, images, tokens, timeline)?;
    Ok(work.masks)
}

/// The pipeline for batches of one shape and masking rule, with every working buffer allocated
/// once: repeated batches allocate nothing, and a captured training step (a CUDA graph) replays
/// the same launches on the same buffers. What changes from step to step — the draws' seed and
/// step, α — the kernels read from the mask clock in device memory (`set_clock`, a host write
/// before the launches).
pub struct MaskWork {
    request: MaskRequest,
    /// D of the patch tokens the similarity reads (None: pixels only, α = 0).
    token_dim: Option<usize>,
    clock: Buffer<u32>,
    masks: DeviceMasks,
    /// Standardized patches [N, L, 3p²] and their norms; the tokens' norms.
    hat: Buffer<f32>,
    hat_norms: Buffer<f32>,
    token_norms: Buffer<f32>,
    edges: Buffer<f32>,
    /// The similarity [N, rows, L] and (paper, OTN) its balanced copy.
    similarity: Buffer<f32>,
    balanced: Buffer<f32>,
    iterations: Buffer<u32>,
    /// The reference mode's Sinkhorn scratch and sums, flags, counts and edge sums.
    scratch: Buffer<f32>,
    sums: Buffer<f32>,
    flags: Buffer<u32>,
    counts: Buffer<u32>,
    edge_sums: Buffer<f32>,
}

impl MaskWork {
    /// The buffers for `request`'s shape and masking, with patch tokens of `token_dim` values
    /// (None: the similarity reads pixels only), and its clock.
    pub fn new(device: &Device, request: &MaskRequest, token_dim: Option<usize>) -> Result<MaskWork> {
        let l = PatchGrid::new(request.shape.height, request.shape.width, request.patch)?.len();
        let n = request.shape.n;
        super::check_arguments(request, request.shape.len(), token_dim.map(|d| (n * l * d, d)))?;
        let u32s = |len: usize, what: &str| device.alloc_zeros::<u32>(len, what);
        let f32s = |len: usize, what: &str| device.alloc_zeros::<f32>(len, what);
        let (kept, kept_len) = match request.masking {
            // Every patch kept, written once.
            Masking::None => {
                let all: Vec<u32> = (0..n).flat_map(|_| 0..l as u32).collect();
                (device.upload(&all)?, device.upload(&vec![l as u32; n])?)
            }
            _ => (u32s(n * l, "kept patches")?, u32s(n, "kept counts")?),
        };
        let pgs = match request.masking {
            Masking::Pgs(cfg) => Some(cfg),
            _ => None,
        };
        // Buffers a mode does not use are one element (never read).
        let sized = |used: bool, len: usize| if used { len } else { 1 };
        let values = 3 * request.patch * request.patch;
        let n_c = match pgs.map(|c| c.mode) {
            Some(PgsMode::Paper) => paper_candidate_count(l),
            Some(PgsMode::Reference) => reference_candidate_count(l),
            None => 0,
        };
        let paper = pgs.is_some_and(|c| c.mode == PgsMode::Paper);
        let reference = pgs.is_some_and(|c| c.mode == PgsMode::Reference);
        let otn = pgs.is_some_and(|c| c.use_otn);
        let rows = if paper { n_c } else { l };
        let mut nonfinite = vec![];
        if pgs.is_some() {
            nonfinite.push((u32s(n * l, "non-finite flags")?, "pixels"));
            if token_dim.is_some() {
                nonfinite.push((u32s(n * l, "non-finite token flags")?, "patch tokens"));
            }
        }
        let candidates = pgs.map(|_| u32s(n * n_c, "candidates").map(|c| (c, n_c))).transpose()?;
        Ok(MaskWork {
            request: *request,
            token_dim,
            clock: u32s(mask_clock::LEN, "the mask clock")?,
            masks: DeviceMasks { patches: l, images: n, kept, kept_len, candidates, nonfinite },
            hat: f32s(sized(pgs.is_some(), n * l * values), "standardized patches")?,
            hat_norms: f32s(sized(pgs.is_some(), n * l), "patch norms")?,
            token_norms: f32s(sized(token_dim.is_some() && pgs.is_some(), n * l), "token norms")?,
            edges: f32s(sized(pgs.is_some(), n * l), "edge map")?,
            similarity: f32s(sized(pgs.is_some(), n * rows * l), "similarity")?,
            balanced: f32s(sized(paper && otn, n * n_c * l), "balanced similarity")?,
            iterations: u32s(sized(paper && otn, n), "Sinkhorn iterations")?,
            scratch: f32s(sized(reference && otn, n * l * l), "Sinkhorn scratch")?,
            sums: f32s(sized(reference && otn, n * (2 * l + 1)), "Sinkhorn sums")?,
            flags: u32s(sized(reference, n * l), "reference flags")?,
            counts: u32s(sized(reference, n), "reference counts")?,
            edge_sums: f32s(sized(reference, n), "edge sums")?,
        })
    }

    /// Whether these buffers serve `request` with tokens of `token_dim` (the step aside).
    pub fn fits(&self, request: &MaskRequest, token_dim: Option<usize>) -> bool {
        let r = &self.request;
        (r.shape, r.patch, r.masking, self.token_dim) == (request.shape, request.patch, request.masking, token_dim)
    }

    /// The masks of the last launch, on the device.
    pub fn masks(&self) -> &DeviceMasks {
        &self.masks
    }

    /// Writes the draws' seed, step and first image and α of `at` into the clock (a host write: before the
    /// launches, outside a captured step).
    pub fn set_clock(&mut self, at: &MaskStep) -> Result<()> {
        let alpha_epochs = match self.request.masking {
            Masking::Pgs(cfg) if cfg.mode == PgsMode::Reference => REFERENCE_EPOCHS,
            _ => at.epochs,
        };
        let alpha = if alpha_epochs == 0 { 0.0 } else { at.epoch as f32 / alpha_epochs as f32 };
        let clock = MaskClock { seed: at.seed, step: at.step, alpha, first: at.first };
        self.clock.write(Span::new(0, mask_clock::LEN), &clock.words())?;
        self.request.at = *at;
        Ok(())
    }

    /// Launches the pipeline for `images` [N, 3, H, W] and `tokens` (as `new` was told), at the
    /// clock's step, into `masks()`; nothing is allocated or read back.
    pub fn launch<T: ImageElement>(
        &mut self,
        device: &Device,
        images: View<T>,
        tokens: Option<(View<T>, usize)>,
        timeline: &mut Option<Timeline>,
    ) -> Result<()> {
        if tokens.map(|(_, dim)| dim) != self.token_dim {
            return Err(Error::InvalidArgument(format!(
                "the mask buffers were made for patch tokens of {:?} values, the launch gives {:?}",
                self.token_dim,
                tokens.map(|(_, dim)| dim)
            )));
        }
        let grid = super::check_arguments(&self.request, images.len(), tokens.map(|(t, d)| (t.len(), d)))?;
        let MaskRequest { shape, patch, masking, .. } = self.request;
        let (n, l) = (shape.n, grid.len());
        let (n32, l32) = (n as u32, l as u32);
        let w = self;
        let (kept, kept_len) = (&mut w.masks.kept, &mut w.masks.kept_len);
        let cfg = match masking {
            Masking::None => return Ok(()),
            Masking::Flip { ratio } => {
                let k_mask = masked_count(ratio, l) as u32;
                let cfg = per_image(n, select::THREADS, select::shared_bytes(l));
                let args = (kept, kept_len, &w.clock, l32, k_mask);
                return launch(device, timeline, &pgs_select_flip, cfg, args);
            }
            Masking::Pgs(cfg) => cfg,
        };

        // Standardized patches, their norms, and the non-finite flags.
        let values = 3 * patch * patch;
        let (h32, w32, p32) = (shape.height as u32, shape.width as u32, patch as u32);
        let standardize_cfg =
            blocks((grid.rows, n, 1), patch_stats::THREADS, patch_stats::standardize_shared_bytes(shape.width, patch));
        let [pixel_flags, token_flags @ ..] = &mut w.masks.nonfinite[..] else {
            unreachable!("PGS keeps the pixels' flags")
        };
        let args = (images, &mut w.hat, &mut w.hat_norms, &mut pixel_flags.0, h32, w32, p32);
        launch(device, timeline, &T::STANDARDIZE_PATCHES, standardize_cfg, args)?;
        if let (Some((t, dim)), [(flags, _)]) = (tokens, token_flags) {
            let rows = (n * l).div_ceil(patch_stats::THREADS as usize);
            let norms_cfg = blocks((rows, 1, 1), patch_stats::THREADS, patch_stats::token_norms_shared_bytes());
            let args = (t, &mut w.token_norms, flags, (n * l) as u32, dim as u32);
            launch(device, timeline, &T::TOKEN_NORMS, norms_cfg, args)?;
        }

        let (candidates, n_c) = w.masks.candidates.as_mut().expect("PGS keeps candidates");
        let (n_c, n_c32) = (*n_c, *n_c as u32);
        if cfg.use_ed {
            match cfg.mode {
                PgsMode::Paper => {
                    edge_map_gpu_into(device, images, shape, grid, w.edges.view_mut())?;
                    mark(device, timeline, "pgs_edge_map")?;
                }
                PgsMode::Reference => {
                    let cfg = per_image(n, edge_kernels::THREADS, reference_grid_shared_bytes(l));
                    let (rows, cols) = (grid.rows as u32, grid.cols as u32);
                    let args = (&w.hat, &mut w.edges, rows, cols, values as u32);
                    launch(device, timeline, &pgs_reference_edge_grid, cfg, args)?;
                }
            }
        }
        let reference = (cfg.mode == PgsMode::Reference) as u32;
        launch(
            device,
            timeline,
            &pgs_candidates,
            per_image(n, select::THREADS, select::shared_bytes(l)),
            (&w.edges, &mut *candidates, &w.clock, l32, n_c32, reference),
        )?;

        // Similarity: candidate rows (paper) or all rows (reference).
        let rows = if cfg.mode == PgsMode::Paper { n_c } else { l };
        let dim = tokens.map_or(0, |(_, d)| d as u32);
        let similarity_grid = (l.div_ceil(patch_stats::THREADS as usize), rows.div_ceil(patch_stats::ROWS), n);
        let similarity_cfg = blocks(similarity_grid, patch_stats::THREADS, patch_stats::similarity_shared_bytes());
        launch(
            device,
            timeline,
            &T::SIMILARITY,
            similarity_cfg,
            (
                &w.hat,
                &w.hat_norms,
                tokens.map(|(t, _)| t),
                tokens.map(|_| &w.token_norms),
                (cfg.mode == PgsMode::Paper).then_some(&*candidates),
                &mut w.similarity,
                rows as u32,
                l32,
                values as u32,
                dim,
                &w.clock,
            ),
        )?;

        match cfg.mode {
            PgsMode::Paper => {
                if cfg.use_otn {
                    let cfg = per_image(n, sinkhorn::THREADS, log_shared_bytes(n_c, l));
                    let (eps, max_it, tol) = (EPSILON, MAX_ITERATIONS as u32, TOLERANCE);
                    let args = (&w.similarity, &mut w.balanced, &mut w.iterations, n_c32, l32, eps, max_it, tol);
                    launch(device, timeline, &pgs_sinkhorn_log, cfg, args)?;
                }
                let floor = |r: f32| masked_count(r, l) as u32;
                let (dynamic, k_fixed, k_min, k_max) = match cfg.ratio {
                    MaskRatio::Fixed(r) => (0u32, floor(r), 0, 0),
                    MaskRatio::Dynamic { min, max } => (1, 0, floor(min), floor(max)),
                };
                launch(
                    device,
                    timeline,
                    &pgs_select_paper,
                    per_image(n, select::THREADS, select::shared_bytes(l)),
                    (
                        &w.similarity,
                        if cfg.use_otn { &w.balanced } else { &w.similarity },
                        &w.edges,
                        &*candidates,
                        kept,
                        kept_len,
                        &w.clock,
                        l32,
                        n_c32,
                        dynamic,
                        k_fixed,
                        k_min,
                        k_max,
                    ),
                )
            }
            PgsMode::Reference => {
                if cfg.use_otn {
                    let cfg = per_image(n, sinkhorn::THREADS, 0);
                    let args = (&mut w.similarity, &mut w.scratch, &mut w.sums, l32);
                    launch(device, timeline, &pgs_sinkhorn_knopp_signed, cfg, args)?;
                }
                launch(
                    device,
                    timeline,
                    &pgs_reference_flags,
                    per_image(n, select::THREADS, 0),
                    (&w.similarity, &*candidates, &w.edges, &mut w.flags, &mut w.counts, &mut w.edge_sums, l32, n_c32),
                )?;
                let cap = reference_keep_cap(cfg.ratio.min(), l) as u32;
                launch(
                    device,
                    timeline,
                    &pgs_reference_keep,
                    per_image(n, select::THREADS, select::shared_bytes(l)),
                    (&w.flags, &w.counts, &w.edge_sums, kept, kept_len, &w.clock, n32, l32, cap, cfg.use_ed as u32),
                )
            }
        }
    }
}
