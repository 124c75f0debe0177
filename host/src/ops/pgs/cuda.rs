//! PGS on the GPU: the launches of the whole pipeline on the runtime's one stream, no host
//! synchronisation inside. Each kernel does what the CPU reference (`mod.rs`) does, with the same
//! helpers of `clip-pgs-kernels`, so the masks are identical bit for bit.
//!
//! paper:     edge map → standardize patches (+ token norms) → Gumbel-top-k candidates →
//!            similarity [n_c, L] → log-domain Sinkhorn → selection (+ compaction)
//! reference: standardize → edge grid → candidates → similarity [L, L] → S + SK(S) →
//!            flags → batch K and keep order
//! flip:      selection of Philox uniforms

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};

use clip_pgs_kernels::select::{paper_candidate_count, reference_candidate_count};
use clip_pgs_kernels::sinkhorn::{EPSILON, MAX_ITERATIONS, TOLERANCE, log_shared_bytes};
use clip_pgs_kernels::{edge_map as edge_kernels, gather as gather_kernels, patch_stats, select, sinkhorn};

use super::{ImageMask, MaskRatio, MaskStep, Masking, Masks, PgsMode, REFERENCE_EPOCHS};
use crate::cuda::CudaRuntime;
use crate::error::{CudaContextExt, Error, Result};
use crate::ops::edge_map::{ImageBatchShape, ImageElement, TypedKernel, edge_map_cuda};

/// Masks still on the GPU; `to_masks` waits for them.
pub struct DeviceMasks {
    pub patches: usize,
    pub images: usize,
    /// [N, L]: the first kept_len[n] entries of row n are image n's kept patches, ascending.
    pub kept: CudaSlice<u32>,
    pub kept_len: CudaSlice<u32>,
    /// [N, n_c] in rank order, for PGS.
    pub candidates: Option<(CudaSlice<u32>, usize)>,
    /// [N, L] per patch (pixels) and per token: 1 where a value is NaN or ±∞.
    nonfinite: Vec<(CudaSlice<u32>, &'static str)>,
}

impl DeviceMasks {
    /// Copies the masks to the host (waits for the GPU). A non-finite input value surfaces here
    /// as an error naming the image.
    pub fn to_masks(&self) -> Result<Masks> {
        let stream = self.kept.stream();
        let l = self.patches;
        for (flags, what) in &self.nonfinite {
            let flags = stream.clone_dtoh(flags).during("copying the non-finite flags")?;
            if let Some(i) = flags.iter().position(|&f| f != 0) {
                return Err(Error::InvalidArgument(format!("image {} has non-finite {what} (patch {})", i / l, i % l)));
            }
        }
        let kept = stream.clone_dtoh(&self.kept).during("copying the kept patches")?;
        let kept_len = stream.clone_dtoh(&self.kept_len).during("copying the kept counts")?;
        let candidates = match &self.candidates {
            Some((c, n_c)) => Some((stream.clone_dtoh(c).during("copying the candidates")?, *n_c)),
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

fn per_image(images: usize, threads: u32, shared_bytes: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (images as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared_bytes as u32 }
}

fn grid_stride(total: usize, threads: u32) -> LaunchConfig {
    let blocks = total.div_ceil(threads as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// CUDA events recorded after each kernel of the pipeline (for `clip-pgs bench`), by kernel name.
pub type Timeline = Vec<(&'static str, CudaEvent)>;

/// Records an event named `what` on the stream when a timeline is being kept.
fn mark(rt: &CudaRuntime, timeline: &mut Option<Timeline>, what: &'static str) -> Result<()> {
    if let Some(t) = timeline {
        let event = rt.context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).during("creating an event")?;
        event.record(&rt.stream).during("recording an event")?;
        t.push((what, event));
    }
    Ok(())
}

/// Launches `f` with the arguments pushed by `push`, then marks the timeline.
fn launch<'a>(
    rt: &'a CudaRuntime,
    timeline: &mut Option<Timeline>,
    f: &'a CudaFunction,
    cfg: LaunchConfig,
    what: &'static str,
    push: impl FnOnce(&mut cudarc::driver::LaunchArgs<'a>),
) -> Result<()> {
    // SAFETY: each caller pushes the arguments of the kernel's signature (documented in
    // clip-pgs-kernels) with buffers sized as the kernel's safety section requires.
    unsafe { rt.launch(f, cfg, what, push) }?;
    mark(rt, timeline, what)
}

/// The masks of a batch on the GPU. Arguments as `mask_cpu`; `tokens` [N, L, D] on the GPU.
pub fn mask_cuda<T: ImageElement>(
    rt: &CudaRuntime,
    images: &CudaSlice<T>,
    shape: ImageBatchShape,
    patch: usize,
    tokens: Option<(&CudaSlice<T>, usize)>,
    masking: &Masking,
    at: &MaskStep,
) -> Result<DeviceMasks> {
    mask_cuda_timed(rt, images, shape, patch, tokens, masking, at, &mut None)
}

/// `mask_cuda`, recording an event after every kernel into `timeline` when it is `Some`.
#[allow(clippy::too_many_arguments)]
pub fn mask_cuda_timed<T: ImageElement>(
    rt: &CudaRuntime,
    images: &CudaSlice<T>,
    shape: ImageBatchShape,
    patch: usize,
    tokens: Option<(&CudaSlice<T>, usize)>,
    masking: &Masking,
    at: &MaskStep,
    timeline: &mut Option<Timeline>,
) -> Result<DeviceMasks> {
    let grid = super::check_arguments(images.len(), shape, patch, tokens.map(|(t, d)| (t.len(), d)), masking, at)?;
    let (n, l) = (shape.n, grid.len());
    let alloc = |len: usize, what: &str| rt.stream.alloc_zeros::<u32>(len.max(1)).during(format!("allocating {what}"));
    let mut kept = alloc(n * l, "kept patches")?;
    let mut kept_len = alloc(n, "kept counts")?;
    let (seed, step) = (at.seed, at.step);
    let (n32, l32) = (n as u32, l as u32);

    let cfg = match masking {
        Masking::None => {
            let all: Vec<u32> = (0..n).flat_map(|_| 0..l32).collect();
            rt.stream.memcpy_htod(&all, &mut kept).during("writing the kept patches")?;
            rt.stream.memcpy_htod(&vec![l32; n], &mut kept_len).during("writing the kept counts")?;
            return Ok(DeviceMasks { patches: l, images: n, kept, kept_len, candidates: None, nonfinite: vec![] });
        }
        Masking::Flip { ratio } => {
            let k_mask = (*ratio as f64 * l as f64).floor() as u32;
            launch(
                rt,
                timeline,
                &rt.kernels.select_flip,
                per_image(n, select::THREADS, select::shared_bytes(l)),
                "pgs_select_flip",
                |a| {
                    a.arg(&mut kept).arg(&mut kept_len).arg(&seed).arg(&step).arg(&l32).arg(&k_mask);
                },
            )?;
            return Ok(DeviceMasks { patches: l, images: n, kept, kept_len, candidates: None, nonfinite: vec![] });
        }
        Masking::Pgs(cfg) => *cfg,
    };

    // Standardized patches, their norms, and the non-finite flags.
    let values = 3 * patch * patch;
    let f32s = |len: usize, what: &str| rt.stream.alloc_zeros::<f32>(len.max(1)).during(format!("allocating {what}"));
    let mut hat = f32s(n * l * values, "standardized patches")?;
    let mut hat_norms = f32s(n * l, "patch norms")?;
    let mut pixel_flags = alloc(n * l, "non-finite flags")?;
    let (h32, w32, p32) = (shape.height as u32, shape.width as u32, patch as u32);
    launch(
        rt,
        timeline,
        T::kernel(&rt.kernels, TypedKernel::StandardizePatches),
        grid_stride(n * l, patch_stats::THREADS),
        "pgs_standardize_patches",
        |a| {
            a.arg(images)
                .arg(&mut hat)
                .arg(&mut hat_norms)
                .arg(&mut pixel_flags)
                .arg(&n32)
                .arg(&h32)
                .arg(&w32)
                .arg(&p32);
        },
    )?;
    let mut nonfinite = vec![(pixel_flags, "pixels")];
    let token_norms = match tokens {
        Some((t, dim)) => {
            let mut norms = f32s(n * l, "token norms")?;
            let mut flags = alloc(n * l, "non-finite token flags")?;
            let (rows, dim32) = ((n * l) as u32, dim as u32);
            launch(
                rt,
                timeline,
                T::kernel(&rt.kernels, TypedKernel::TokenNorms),
                grid_stride(n * l, patch_stats::THREADS),
                "pgs_token_norms",
                |a| {
                    a.arg(t).arg(&mut norms).arg(&mut flags).arg(&rows).arg(&dim32);
                },
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
        edges = match cfg.mode {
            PgsMode::Paper => {
                let edges = edge_map_cuda(rt, images, shape, grid)?;
                mark(rt, timeline, "pgs_edge_map")?;
                edges
            }
            PgsMode::Reference => {
                let (rows, cols, v32) = (grid.rows as u32, grid.cols as u32, values as u32);
                let smem = edge_kernels::reference_grid_shared_bytes(l);
                launch(
                    rt,
                    timeline,
                    &rt.kernels.reference_edge_grid,
                    per_image(n, edge_kernels::THREADS, smem),
                    "pgs_reference_edge_grid",
                    |a| {
                        a.arg(&hat).arg(&mut edges).arg(&rows).arg(&cols).arg(&v32);
                    },
                )?;
                edges
            }
        };
    }
    let reference = (cfg.mode == PgsMode::Reference) as u32;
    launch(
        rt,
        timeline,
        &rt.kernels.candidates,
        per_image(n, select::THREADS, select::shared_bytes(l)),
        "pgs_candidates",
        |a| {
            a.arg(&edges).arg(&mut candidates).arg(&seed).arg(&step).arg(&l32).arg(&n_c32).arg(&reference);
        },
    )?;

    // Similarity: candidate rows (paper) or all rows (reference).
    let rows = if cfg.mode == PgsMode::Paper { n_c } else { l };
    let mut s = f32s(n * rows * l, "similarity")?;
    similarity::<T>(
        rt,
        timeline,
        &hat,
        &hat_norms,
        tokens.map(|(t, d)| (t, token_norms.as_ref().unwrap(), d)),
        (cfg.mode == PgsMode::Paper).then_some(&candidates),
        &mut s,
        n,
        rows,
        l,
        values,
        alpha,
    )?;

    match cfg.mode {
        PgsMode::Paper => {
            let balanced = if cfg.use_otn {
                let mut balanced = f32s(n * n_c * l, "balanced similarity")?;
                let mut iterations = alloc(n, "Sinkhorn iterations")?;
                let (eps, max_it, tol) = (EPSILON, MAX_ITERATIONS as u32, TOLERANCE);
                let smem = log_shared_bytes(n_c, l);
                launch(
                    rt,
                    timeline,
                    &rt.kernels.sinkhorn_log,
                    per_image(n, sinkhorn::THREADS, smem),
                    "pgs_sinkhorn_log",
                    |a| {
                        a.arg(&s)
                            .arg(&mut balanced)
                            .arg(&mut iterations)
                            .arg(&n_c32)
                            .arg(&l32)
                            .arg(&eps)
                            .arg(&max_it)
                            .arg(&tol);
                    },
                )?;
                Some(balanced)
            } else {
                None
            };
            let floor = |r: f32| (r as f64 * l as f64).floor() as u32;
            let (dynamic, k_fixed, k_min, k_max) = match cfg.ratio {
                MaskRatio::Fixed(r) => (0u32, floor(r), 0, 0),
                MaskRatio::Dynamic { min, max } => (1, 0, floor(min), floor(max)),
            };
            launch(
                rt,
                timeline,
                &rt.kernels.select_paper,
                per_image(n, select::THREADS, select::shared_bytes(l)),
                "pgs_select_paper",
                |a| {
                    a.arg(&s)
                        .arg(balanced.as_ref().unwrap_or(&s))
                        .arg(&edges)
                        .arg(&candidates)
                        .arg(&mut kept)
                        .arg(&mut kept_len);
                    a.arg(&seed).arg(&step).arg(&l32).arg(&n_c32).arg(&dynamic).arg(&k_fixed).arg(&k_min).arg(&k_max);
                },
            )?;
        }
        PgsMode::Reference => {
            if cfg.use_otn {
                let mut scratch = f32s(n * l * l, "Sinkhorn scratch")?;
                let mut sums = f32s(n * (2 * l + 1), "Sinkhorn sums")?;
                launch(
                    rt,
                    timeline,
                    &rt.kernels.sinkhorn_knopp_signed,
                    per_image(n, sinkhorn::THREADS, 0),
                    "pgs_sinkhorn_knopp_signed",
                    |a| {
                        a.arg(&mut s).arg(&mut scratch).arg(&mut sums).arg(&l32);
                    },
                )?;
            }
            let mut flags = alloc(n * l, "reference flags")?;
            let mut counts = alloc(n, "reference counts")?;
            let mut edge_sums = f32s(n, "edge sums")?;
            launch(
                rt,
                timeline,
                &rt.kernels.reference_flags,
                per_image(n, select::THREADS, 0),
                "pgs_reference_flags",
                |a| {
                    a.arg(&s)
                        .arg(&candidates)
                        .arg(&edges)
                        .arg(&mut flags)
                        .arg(&mut counts)
                        .arg(&mut edge_sums)
                        .arg(&l32)
                        .arg(&n_c32);
                },
            )?;
            let cap = (l as f64 * (1.0 - cfg.ratio.min() as f64)).floor() as u32;
            let use_ed = cfg.use_ed as u32;
            launch(
                rt,
                timeline,
                &rt.kernels.reference_keep,
                per_image(n, select::THREADS, select::shared_bytes(l)),
                "pgs_reference_keep",
                |a| {
                    a.arg(&flags).arg(&counts).arg(&edge_sums).arg(&mut kept).arg(&mut kept_len);
                    a.arg(&seed).arg(&step).arg(&n32).arg(&l32).arg(&cap).arg(&use_ed);
                },
            )?;
        }
    }
    Ok(DeviceMasks { patches: l, images: n, kept, kept_len, candidates: Some((candidates, n_c)), nonfinite })
}

/// Launches `pgs_similarity_{f32,bf16}`: S [N, rows, L], rows = the candidates or every patch.
#[allow(clippy::too_many_arguments)]
fn similarity<T: ImageElement>(
    rt: &CudaRuntime,
    timeline: &mut Option<Timeline>,
    hat: &CudaSlice<f32>,
    hat_norms: &CudaSlice<f32>,
    tokens: Option<(&CudaSlice<T>, &CudaSlice<f32>, usize)>,
    rows: Option<&CudaSlice<u32>>,
    out: &mut CudaSlice<f32>,
    n: usize,
    r_count: usize,
    l: usize,
    values: usize,
    alpha: f32,
) -> Result<()> {
    let null = 0u64;
    let (n32, r32, l32, v32) = (n as u32, r_count as u32, l as u32, values as u32);
    let dim32 = tokens.map_or(0, |(_, _, d)| d as u32);
    let f = T::kernel(&rt.kernels, TypedKernel::Similarity);
    launch(rt, timeline, f, grid_stride(n * r_count * l, patch_stats::THREADS), "pgs_similarity", |a| {
        a.arg(hat).arg(hat_norms);
        match tokens {
            Some((t, norms, _)) => a.arg(t).arg(norms),
            None => a.arg(&null).arg(&null),
        };
        match rows {
            Some(r) => a.arg(r),
            None => a.arg(&null),
        };
        a.arg(out).arg(&n32).arg(&r32).arg(&l32).arg(&v32).arg(&dim32).arg(&alpha);
    })
}

/// Launches `pgs_gather_{f32,bf16}`: x [N, L + 1, D] → [N, K_max + 1, D] (zero padded), with
/// `rows` = K_max + 1 (from the masks, known on the host when the kept counts are).
pub fn gather_cuda<T: ImageElement>(
    rt: &CudaRuntime,
    x: &CudaSlice<T>,
    dim: usize,
    masks: &DeviceMasks,
    rows: usize,
) -> Result<CudaSlice<T>> {
    let (n, l) = (masks.images, masks.patches);
    if x.len() != n * (l + 1) * dim {
        return Err(Error::InvalidArgument(format!(
            "gather: tokens have {} elements, [N = {n}, L + 1 = {}, D = {dim}] needs {}",
            x.len(),
            l + 1,
            n * (l + 1) * dim
        )));
    }
    let mut out = rt.stream.alloc_zeros::<T>(n * rows * dim).during("allocating packed tokens")?;
    let (n32, l32, d32, r32) = (n as u32, l as u32, dim as u32, rows as u32);
    let f = T::kernel(&rt.kernels, TypedKernel::Gather);
    launch(rt, &mut None, f, grid_stride(n * rows * dim, gather_kernels::THREADS), "pgs_gather", |a| {
        a.arg(x).arg(&masks.kept).arg(&masks.kept_len).arg(&mut out).arg(&n32).arg(&l32).arg(&d32).arg(&r32);
    })?;
    Ok(out)
}
