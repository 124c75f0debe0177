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

use super::{ImageMask, MaskRatio, MaskRequest, Masking, Masks, PgsMode, REFERENCE_EPOCHS};
use crate::buffer::Buffer;
use crate::device::Device;
use crate::error::{CudaContextExt, Error, Result};
use crate::launch::KernelArgs;
use crate::ops::edge_map::{ImageElement, edge_map_gpu};
use crate::view::View;

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
/// `tokens` [N, L, D]. The working buffers are allocated per call.
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
    let grid = super::check_arguments(request, images.len(), tokens.map(|(t, d)| (t.len(), d)))?;
    let MaskRequest { shape, patch, ref masking, ref at } = *request;
    let (n, l) = (shape.n, grid.len());
    let alloc = |len: usize, what: &str| device.alloc_zeros::<u32>(len, what);
    let mut kept = alloc(n * l, "kept patches")?;
    let mut kept_len = alloc(n, "kept counts")?;
    let (seed, step, first) = (at.seed, at.step, at.first);
    let (n32, l32) = (n as u32, l as u32);

    let cfg = match masking {
        Masking::None => {
            let all: Vec<u32> = (0..n).flat_map(|_| 0..l32).collect();
            let kept = device.upload(&all)?;
            let kept_len = device.upload(&vec![l32; n])?;
            return Ok(DeviceMasks { patches: l, images: n, kept, kept_len, candidates: None, nonfinite: vec![] });
        }
        Masking::Flip { ratio } => {
            let k_mask = masked_count(*ratio, l) as u32;
            let cfg = per_image(n, select::THREADS, select::shared_bytes(l));
            launch(
                device,
                timeline,
                &pgs_select_flip,
                cfg,
                (&mut kept, &mut kept_len, seed, step, first, l32, k_mask),
            )?;
            return Ok(DeviceMasks { patches: l, images: n, kept, kept_len, candidates: None, nonfinite: vec![] });
        }
        Masking::Pgs(cfg) => *cfg,
    };

    // Standardized patches, their norms, and the non-finite flags.
    let values = 3 * patch * patch;
    let f32s = |len: usize, what: &str| device.alloc_zeros::<f32>(len, what);
    let mut hat = f32s(n * l * values, "standardized patches")?;
    let mut hat_norms = f32s(n * l, "patch norms")?;
    let mut pixel_flags = alloc(n * l, "non-finite flags")?;
    let (h32, w32, p32) = (shape.height as u32, shape.width as u32, patch as u32);
    let standardize_cfg =
        blocks((grid.rows, n, 1), patch_stats::THREADS, patch_stats::standardize_shared_bytes(shape.width, patch));
    let args = (images, &mut hat, &mut hat_norms, &mut pixel_flags, h32, w32, p32);
    launch(device, timeline, &T::STANDARDIZE_PATCHES, standardize_cfg, args)?;
    let mut nonfinite = vec![(pixel_flags, "pixels")];
    let token_norms = match tokens {
        Some((t, dim)) => {
            let mut norms = f32s(n * l, "token norms")?;
            let mut flags = alloc(n * l, "non-finite token flags")?;
            let rows = (n * l).div_ceil(patch_stats::THREADS as usize);
            let norms_cfg = blocks((rows, 1, 1), patch_stats::THREADS, patch_stats::token_norms_shared_bytes());
            launch(
                device,
                timeline,
                &T::TOKEN_NORMS,
                norms_cfg,
                (t, &mut norms, &mut flags, (n * l) as u32, dim as u32),
            )?;
            nonfinite.push((flags, "patch tokens"));
            Some(norms)
        }
        None => None,
    };

    let (n_c, alpha) = match cfg.mode {
        PgsMode::Paper => (paper_candidate_count(l), at.epoch as f32 / at.epochs as f32),
        PgsMode::Reference => (reference_candidate_count(l), at.epoch as f32 / REFERENCE_EPOCHS as f32),
    };
    let n_c32 = n_c as u32;
    let mut candidates = alloc(n * n_c, "candidates")?;
    let mut edges = f32s(n * l, "edge map")?;
    if cfg.use_ed {
        match cfg.mode {
            PgsMode::Paper => {
                edges = edge_map_gpu(device, images, shape, grid)?;
                mark(device, timeline, "pgs_edge_map")?;
            }
            PgsMode::Reference => {
                let cfg = per_image(n, edge_kernels::THREADS, reference_grid_shared_bytes(l));
                let (rows, cols) = (grid.rows as u32, grid.cols as u32);
                launch(device, timeline, &pgs_reference_edge_grid, cfg, (&hat, &mut edges, rows, cols, values as u32))?;
            }
        }
    }
    let reference = (cfg.mode == PgsMode::Reference) as u32;
    launch(
        device,
        timeline,
        &pgs_candidates,
        per_image(n, select::THREADS, select::shared_bytes(l)),
        (&edges, &mut candidates, seed, step, first, l32, n_c32, reference),
    )?;

    // Similarity: candidate rows (paper) or all rows (reference).
    let rows = if cfg.mode == PgsMode::Paper { n_c } else { l };
    let mut s = f32s(n * rows * l, "similarity")?;
    let dim = tokens.map_or(0, |(_, d)| d as u32);
    let similarity_grid = (l.div_ceil(patch_stats::THREADS as usize), rows.div_ceil(patch_stats::ROWS), n);
    let similarity_cfg = blocks(similarity_grid, patch_stats::THREADS, patch_stats::similarity_shared_bytes());
    launch(
        device,
        timeline,
        &T::SIMILARITY,
        similarity_cfg,
        (
            &hat,
            &hat_norms,
            tokens.map(|(t, _)| t),
            token_norms.as_ref(),
            (cfg.mode == PgsMode::Paper).then_some(&candidates),
            &mut s,
            rows as u32,
            l32,
            values as u32,
            dim,
            alpha,
        ),
    )?;

    match cfg.mode {
        PgsMode::Paper => {
            let balanced = if cfg.use_otn {
                let mut balanced = f32s(n * n_c * l, "balanced similarity")?;
                let mut iterations = alloc(n, "Sinkhorn iterations")?;
                let cfg = per_image(n, sinkhorn::THREADS, log_shared_bytes(n_c, l));
                let (eps, max_it, tol) = (EPSILON, MAX_ITERATIONS as u32, TOLERANCE);
                launch(
                    device,
                    timeline,
                    &pgs_sinkhorn_log,
                    cfg,
                    (&s, &mut balanced, &mut iterations, n_c32, l32, eps, max_it, tol),
                )?;
                Some(balanced)
            } else {
                None
            };
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
                    &s,
                    balanced.as_ref().unwrap_or(&s),
                    &edges,
                    &candidates,
                    &mut kept,
                    &mut kept_len,
                    seed,
                    step,
                    first,
                    l32,
                    n_c32,
                    dynamic,
                    k_fixed,
                    k_min,
                    k_max,
                ),
            )?;
        }
        PgsMode::Reference => {
            if cfg.use_otn {
                let mut scratch = f32s(n * l * l, "Sinkhorn scratch")?;
                let mut sums = f32s(n * (2 * l + 1), "Sinkhorn sums")?;
                let cfg = per_image(n, sinkhorn::THREADS, 0);
                launch(device, timeline, &pgs_sinkhorn_knopp_signed, cfg, (&mut s, &mut scratch, &mut sums, l32))?;
            }
            let mut flags = alloc(n * l, "reference flags")?;
            let mut counts = alloc(n, "reference counts")?;
            let mut edge_sums = f32s(n, "edge sums")?;
            launch(
                device,
                timeline,
                &pgs_reference_flags,
                per_image(n, select::THREADS, 0),
                (&s, &candidates, &edges, &mut flags, &mut counts, &mut edge_sums, l32, n_c32),
            )?;
            let cap = reference_keep_cap(cfg.ratio.min(), l) as u32;
            launch(
                device,
                timeline,
                &pgs_reference_keep,
                per_image(n, select::THREADS, select::shared_bytes(l)),
                (
                    &flags,
                    &counts,
                    &edge_sums,
                    &mut kept,
                    &mut kept_len,
                    seed,
                    step,
                    first,
                    n32,
                    l32,
                    cap,
                    cfg.use_ed as u32,
                ),
            )?;
        }
    }
    Ok(DeviceMasks { patches: l, images: n, kept, kept_len, candidates: Some((candidates, n_c)), nonfinite })
}
