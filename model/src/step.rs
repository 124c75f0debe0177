//! One training step, the same for `clip-pgs train`, `clip-pgs parity` and the benchmarks: the
//! batch into the arenas, the patch embedding once, the masks (made from those patch tokens on
//! the model's device, consumed there by the image tower's gather), the loss and gradients over
//! `accum` micro-batches, then AdamW over the flat state.
//!
//! `--accum-freq` as open_clip: the features of every micro-batch first (no activations kept
//! beyond one micro-batch's), the contrastive loss over the whole batch, then per micro-batch a
//! recomputed forward and its backward. The forward is deterministic, so the gradients are one
//! big batch's; peak activation memory is one micro-batch's.

use clip_pgs_host::ops::cast::cast;
use clip_pgs_host::ops::elementwise::fill;
use clip_pgs_host::ops::pgs::gpu::MaskWork;
use clip_pgs_host::ops::pgs::{
    MaskRequest, Masking, PatchTokens, PgsMode, REFERENCE_EPOCHS, check_finite_pixels, mask_cpu,
};
use clip_pgs_host::{Buffer, Device, Graph};

use clip_pgs_kernels::select::paper_candidate_count;

use crate::clip::{Clip, Keep, Output, Pass, Workspace};
use crate::config::ClipConfig;
use crate::distributed::DataParallel;
use crate::distributed::device_loss::DeviceLoss;
use crate::optimizer::Optimizer;
use crate::params::{Layout, Params};
use crate::precision::{Dtype, Precision};

/// Which patches the step keeps.
pub enum StepMasks<'a> {
    All,
    /// Given per image (the parity goldens).
    Lists(&'a [Vec<usize>]),
    /// Made by PGS or FLIP for this step.
    Make(MaskRequest),
}

/// A model on a device with its gradients, optimizer and workspace, ready to take steps, its
/// activations in T (f32, or bf16 on the GPU devices: then the ops read a bf16 copy of the
/// weights, which AdamW keeps current).
pub struct TrainStep<T = f32> {
    pub device: Device,
    pub clip: Clip,
    pub params: Params,
    /// The weights in T when T is not f32.
    copy: Option<Buffer<T>>,
    pub grads: Params,
    pub optimizer: Optimizer,
    pub workspace: Workspace<T>,
    /// Micro-batches per step (`--accum-freq`).
    pub accum: usize,
    /// The gradients are zero (consumed by the last update, or never written), so the next
    /// backward need not clear them.
    grads_zero: bool,
    /// Other ranks to train with (None: one process): the loss over every rank's features, the
    /// gradients averaged over ranks.
    pub data_parallel: Option<DataParallel>,
    /// The gathered loss's device buffers of a data-parallel step on a GPU device.
    gathered: Option<DeviceLoss>,
    /// The GPU masks' working buffers, kept from step to step (a captured step holds them).
    mask_work: Option<MaskWork>,
    /// Whether `step` captures the device work of a step into a graph and replays it (GPU
    /// devices, one process; on by default there).
    pub capture: bool,
    /// The captured step and the shape it was captured for.
    graph: Option<(GraphKey, Graph)>,
    /// The shape of the last step `step` ran uncaptured: the next one of that shape is captured.
    warm: Option<GraphKey>,
}

/// What a captured step's work depends on besides device memory: the batch and mask shapes, the
/// clipping norm, and the addresses of every buffer it uses (replacing one, e.g. the parameters,
/// makes the next step capture again).
#[derive(Clone, PartialEq)]
struct GraphKey {
    images: usize,
    masking: Option<Masking>,
    tokens: bool,
    max_norm: Option<f32>,
    addresses: Vec<u64>,
}

fn err(e: clip_pgs_host::Error) -> String {
    e.to_string()
}

impl<T: Precision> TrainStep<T> {
    /// Buffers for batches of up to `batch`, split into `accum` micro-batches.
    pub fn new(
        device: Device,
        cfg: &ClipConfig,
        params: Params,
        optimizer: Optimizer,
        batch: usize,
        accum: usize,
        grad_checkpointing: bool,
    ) -> Result<TrainStep<T>, String> {
        if T::DTYPE != Dtype::F32 && matches!(device, Device::Cpu) {
            return Err(format!(
                "--dtype {} runs on the GPU devices (cuda, emu); the cpu device computes in f32",
                T::DTYPE
            ));
        }
        let clip = Clip::new(cfg, &params.layout, grad_checkpointing);
        let grads = Params::zeros(&params.layout, &device)?;
        let copy = match T::DTYPE {
            Dtype::F32 => None,
            Dtype::Bf16 => {
                let mut copy = device.alloc_zeros::<T>(params.layout.len(), "the bf16 weights").map_err(err)?;
                let bf16 = T::as_bf16(&mut copy).expect("a bf16 buffer");
                cast(&device, bf16.view_mut(), params.data.view()).map_err(err)?;
                Some(copy)
            }
        };
        let workspace = Workspace::new(&clip, &device, batch, batch.div_ceil(accum.max(1))).map_err(err)?;
        let capture = !matches!(device, Device::Cpu);
        Ok(TrainStep {
            device,
            clip,
            params,
            copy,
            grads,
            optimizer,
            workspace,
            accum: accum.max(1),
            grads_zero: true,
            data_parallel: None,
            gathered: None,
            mask_work: None,
            capture,
            graph: None,
            warm: None,
        })
    }

    /// The loss and the gradients (in `grads`) of one batch, left on the device: no host read
    /// (`loss`, `masked_fraction` read them). A non-finite loss gives non-finite gradients, and
    /// the update then skips the step on the device.
    pub fn forward_backward(&mut self, images: &[f32], text: &[u32], masks: StepMasks) -> Result<(), String> {
        let n = self.load(images, text, &masks)?;
        self.forward_backward_loaded(n, images, masks)
    }

    /// One whole step: `forward_backward`, `grad_norm` and `update` at `lr`. With `capture` (GPU
    /// devices, one process, masks made on the device or none) the first step of a shape runs
    /// as they do and warms every cache (cuBLASLt's algorithms, scratch memory); the second is
    /// captured into a graph, and every later step of that shape replays it: the host only writes
    /// the batch, the learning rate and the masks' clock, then launches the graph once.
    pub fn step(
        &mut self,
        images: &[f32],
        text: &[u32],
        masks: StepMasks,
        lr: f32,
        max_norm: Option<f32>,
    ) -> Result<(), String> {
        let key = self.graph_key(&masks, images.len(), max_norm);
        let n = self.load(images, text, &masks)?;
        self.optimizer.set_lr(lr)?;
        let Some(key) = key else {
            return self.forward_backward_norm_update(n, images, masks, max_norm);
        };
        if self.graph.as_ref().is_none_or(|(captured, _)| *captured != key) {
            self.graph = None;
            if self.warm.as_ref() != Some(&key) {
                self.warm = Some(key);
                return self.forward_backward_norm_update(n, images, masks, max_norm);
            }
            self.device.begin_capture().map_err(err)?;
            let captured = self.forward_backward_norm_update(n, images, masks, max_norm);
            let graph = self.device.end_capture().map_err(err);
            captured?;
            self.graph = Some((key, graph?));
        }
        let (_, graph) = self.graph.as_mut().expect("captured above");
        // SAFETY: the key holds the address of every buffer the captured work uses, and they are
        // the same now: this step owns them (and the runtime's scratch memory does not move
        // while a graph lives).
        unsafe { graph.replay() }.map_err(err)?;
        self.grads_zero = true;
        Ok(())
    }

    /// Pieces of work in the captured step (emu; None on CUDA or before a capture).
    pub fn captured_work(&self) -> Option<usize> {
        self.graph.as_ref().and_then(|(_, g)| g.recorded())
    }

    fn forward_backward_norm_update(
        &mut self,
        n: usize,
        images: &[f32],
        masks: StepMasks,
        max_norm: Option<f32>,
    ) -> Result<(), String> {
        self.forward_backward_loaded(n, images, masks)?;
        self.grad_norm()?;
        self.apply_update(max_norm)
    }

    /// The key of a step that can be captured (None: it runs uncaptured).
    fn graph_key(&self, masks: &StepMasks, images: usize, max_norm: Option<f32>) -> Option<GraphKey> {
        if !self.capture || matches!(self.device, Device::Cpu) || self.data_parallel.is_some() {
            return None;
        }
        let (masking, tokens) = match masks {
            StepMasks::All => (None, false),
            StepMasks::Lists(_) => return None,
            StepMasks::Make(request) => (Some(request.masking), needs_tokens(request)),
        };
        let copy = self.copy.as_ref().map(Buffer::address);
        let addresses = [self.params.data.address(), self.grads.data.address()]
            .into_iter()
            .chain(copy)
            .chain(self.optimizer.addresses())
            .chain(self.workspace.addresses())
            .collect();
        Some(GraphKey { images, masking, tokens, max_norm, addresses })
    }

    /// Writes the batch into the arenas and, for masks made on a GPU device, makes their buffers
    /// (once per shape) and writes their clock: every host write of a step.
    fn load(&mut self, images: &[f32], text: &[u32], masks: &StepMasks) -> Result<usize, String> {
        let n = self.workspace.load(&self.clip, images, text)?;
        if let StepMasks::Make(request) = masks
            && !matches!(self.device, Device::Cpu)
        {
            // The pixels are checked here, on the host, so no flags come back from the GPU.
            check_finite_pixels(request.shape, images).map_err(err)?;
            let dim = needs_tokens(request).then_some(self.clip.cfg.vision_cfg.width);
            if !self.mask_work.as_ref().is_some_and(|w| w.fits(request, dim)) {
                // A captured step holds the old buffers' addresses.
                self.graph = None;
                self.mask_work = Some(MaskWork::new(&self.device, request, dim).map_err(err)?);
            }
            self.mask_work.as_mut().expect("made above").set_clock(&request.at).map_err(err)?;
        }
        Ok(n)
    }

    /// `forward_backward` after `load`.
    fn forward_backward_loaded(&mut self, n: usize, images: &[f32], masks: StepMasks) -> Result<(), String> {
        let (pass, workspace) = self.pass_and_workspace();
        workspace.embed_patches(&pass).map_err(err)?;
        match masks {
            StepMasks::All => {}
            StepMasks::Lists(lists) => {
                // `load` checked the images and captions.
                self.clip.check_keep(n, lists)?;
                self.workspace.set_keep(&self.clip, Keep::Lists(lists))?;
            }
            StepMasks::Make(request) if !matches!(self.device, Device::Cpu) => {
                let (images, tokens) = self.workspace.mask_inputs(&self.clip).map_err(err)?;
                let tokens = needs_tokens(&request).then_some((tokens, self.clip.cfg.vision_cfg.width));
                let work = self.mask_work.as_mut().expect("`load` made the mask buffers");
                work.launch(&self.device, images, tokens, &mut None).map_err(err)?;
                let max_kept = request.masking.max_kept(self.clip.cfg.patches());
                self.workspace.set_keep_on_device(&self.clip, &self.device, work.masks(), max_kept).map_err(err)?;
            }
            StepMasks::Make(request) => {
                let tokens =
                    needs_tokens(&request).then(|| self.workspace.patch_tokens(&self.clip)).transpose().map_err(err)?;
                let dim = self.clip.cfg.vision_cfg.width;
                let tokens = tokens.map(|tokens| PatchTokens { tokens, dim });
                let masks = mask_cpu(&request, images, tokens).map_err(err)?;
                self.workspace.set_keep(&self.clip, Keep::Masks(&masks))?;
            }
        }
        self.loss_and_grads(n)?;
        // Every rank averages its gradients; a non-finite loss (the ranks' mean, the same on every
        // rank) makes every rank's device skip the update.
        if let Some(dp) = self.data_parallel.as_ref() {
            dp.average(&mut self.grads.data)?;
        }
        Ok(())
    }

    /// The loss of the last `forward_backward` (a host read: waits for the device).
    pub fn loss(&self) -> Result<f32, String> {
        self.workspace.read_loss().map_err(err)
    }

    /// The fraction of patches the last `forward_backward`'s masks dropped (a host read).
    pub fn masked_fraction(&self) -> Result<f64, String> {
        self.workspace.masked_fraction(&self.clip).map_err(err)
    }

    /// A pass over the model as it is now, and the workspace to run it in.
    pub fn pass_and_workspace(&mut self) -> (Pass<'_, T>, &mut Workspace<T>) {
        let weights = T::weights(&self.params.data, self.copy.as_ref());
        (Pass { device: &self.device, clip: &self.clip, params: &self.params.data, weights }, &mut self.workspace)
    }

    fn loss_and_grads(&mut self, n: usize) -> Result<(), String> {
        let weights = T::weights(&self.params.data, self.copy.as_ref());
        let pass = Pass { device: &self.device, clip: &self.clip, params: &self.params.data, weights };
        let ws = &mut self.workspace;
        let micro = ws.micro;
        let ranges = (0..n).step_by(micro).map(|s| (s, micro.min(n - s)));
        let single = n <= micro;
        for (s, len) in ranges.clone() {
            ws.encode(&pass, s, len).map_err(err)?;
        }
        match &self.data_parallel {
            None => ws.loss(&pass).map_err(err)?,
            // The cpu device's loss, and --local-loss's (the device kernels score every row),
            // run on the host; a GPU device's full loss over the gathered batch on the device.
            Some(dp) if dp.local_loss || matches!(self.device, Device::Cpu) => {
                let dim = self.clip.cfg.embed_dim;
                ws.loss_on_host(&pass, |image, text, scale| dp.loss(image, text, scale, dim))?;
            }
            Some(dp) => {
                let (n, dim) = (ws.n, self.clip.cfg.embed_dim);
                if !self.gathered.as_ref().is_some_and(|g| g.fits(dp.ranks(), n, dim)) {
                    self.gathered = Some(DeviceLoss::new(&self.device, dp.ranks(), n, dim)?);
                }
                let gathered = self.gathered.as_mut().expect("allocated above");
                ws.loss_with(&pass, |io| gathered.run(dp, &self.device, io))?;
            }
        }
        let g = &mut self.grads.data;
        if !std::mem::replace(&mut self.grads_zero, false) {
            fill(&self.device, g.view_mut(), 0.0).map_err(err)?;
        }
        ws.logit_scale_backward(&pass, g).map_err(err)?;
        for (s, len) in ranges {
            if !single {
                ws.encode(&pass, s, len).map_err(err)?;
            }
            ws.backward(&pass, g, s, len).map_err(err)?;
        }
        Ok(())
    }

    /// The features, logits and loss of the last `forward_backward`.
    pub fn output(&self) -> Result<Output, String> {
        self.workspace.output(&self.clip).map_err(err)
    }

    /// The global gradient norm of the last `forward_backward`, kept on the device for the
    /// update (`optimizer.last_norm()` reads it).
    pub fn grad_norm(&mut self) -> Result<(), String> {
        self.optimizer.grad_norm(&self.device, &self.grads)
    }

    /// AdamW at learning rate `lr` with the norm from `grad_norm`, clipping to `max_norm`; the
    /// device skips it when the loss or the norm is not finite. The gradients are consumed.
    pub fn update(&mut self, lr: f32, max_norm: Option<f32>) -> Result<(), String> {
        self.optimizer.set_lr(lr)?;
        self.apply_update(max_norm)
    }

    /// `update` at the learning rate already in device memory (`Optimizer::set_lr`).
    fn apply_update(&mut self, max_norm: Option<f32>) -> Result<(), String> {
        let copy = self.copy.as_mut().and_then(T::as_bf16);
        let loss = self.workspace.loss_view().map_err(err)?;
        self.optimizer.update(&self.device, &mut self.params, &mut self.grads, loss, max_norm, copy)?;
        self.grads_zero = true;
        Ok(())
    }

    /// Makes the last `forward_backward`'s loss NaN on the device, so that the update skips the
    /// step (the trainer's `--test-nonfinite-steps`).
    pub fn poison_loss(&mut self) -> Result<(), String> {
        self.workspace.poison_loss(&self.device).map_err(err)
    }
}

/// PGS weighs token similarity by α = epoch / epochs (paper) or epoch / 32 (reference): at
/// α = 0 the tokens are not needed.
fn needs_tokens(request: &MaskRequest) -> bool {
    let at = request.at;
    let alpha_epochs = match request.masking {
        Masking::Pgs(p) if p.mode == PgsMode::Reference => REFERENCE_EPOCHS,
        _ => at.epochs,
    };
    matches!(request.masking, Masking::Pgs(_)) && at.epoch > 0 && alpha_epochs > 0
}

/// cuBLASLt's workspace on Hopper (`host/src/cublaslt/cuda.rs`).
const CUBLASLT_WORKSPACE: usize = 32 << 20;

/// Device memory a training run needs, in bytes: the flat state (parameters, gradients and the
/// two AdamW moments, f32), both arenas, the GPU masks' working buffers and cuBLASLt's workspace.
pub fn memory_needed(
    cfg: &ClipConfig,
    batch: usize,
    accum: usize,
    grad_checkpointing: bool,
    masking: &Masking,
    dtype: Dtype,
) -> usize {
    let layout = Layout::new(cfg);
    let clip = Clip::new(cfg, &layout, grad_checkpointing);
    let micro = batch.div_ceil(accum.max(1));
    let (arenas, copy) = match dtype {
        Dtype::F32 => (Workspace::<f32>::bytes_needed(&clip, batch, micro), 0),
        Dtype::Bf16 => (Workspace::<clip_pgs_host::bf16>::bytes_needed(&clip, batch, micro), 2 * layout.len()),
    };
    let (l, values) = (cfg.patches(), 3 * cfg.vision_cfg.patch_size.pow(2));
    // mask_gpu: standardized patches [N, L, 3p²], the similarity and its balanced copy
    // [N, n_c, L], and a few [N, L] vectors.
    let masks = match masking {
        Masking::Pgs(_) => 4 * batch * l * (values + 2 * paper_candidate_count(l) + 8),
        Masking::Flip { .. } | Masking::None => 8 * batch * l,
    };
    4 * 4 * layout.len() + copy + arenas + masks + CUBLASLT_WORKSPACE
}

/// Checks that a run fits in `free` bytes of device memory; otherwise an error with the sizes and
/// the largest batch that fits (with the same --accum-freq), or what else to try.
pub fn check_fits(
    cfg: &ClipConfig,
    batch: usize,
    accum: usize,
    grad_checkpointing: bool,
    masking: &Masking,
    dtype: Dtype,
    free: usize,
) -> Result<(), String> {
    let need = |b: usize| memory_needed(cfg, b, accum, grad_checkpointing, masking, dtype);
    let gib = |bytes: usize| bytes as f64 / (1u64 << 30) as f64;
    if need(batch) <= free {
        return Ok(());
    }
    let (mut lo, mut hi) = (0, batch);
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if need(mid) <= free { lo = mid } else { hi = mid }
    }
    let advice = match lo {
        0 => "not even a batch of 1 fits: free GPU memory, or use a smaller model".to_string(),
        fits => format!(
            "--batch-size {fits} fits; to keep the batch, raise --accum-freq{}",
            if grad_checkpointing { "" } else { " or add --grad-checkpointing" }
        ),
    };
    Err(format!(
        "out of GPU memory: batch {batch} needs {:.2} GiB (model state {:.2} GiB), {:.2} GiB are free: {advice}",
        gib(need(batch)),
        gib(16 * Layout::new(cfg).len()),
        gib(free)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_does_not_fit_names_the_batch_that_does() {
        let cfg = ClipConfig::load("test-tiny").unwrap();
        let pgs = Masking::Pgs(clip_pgs_host::ops::pgs::PgsConfig {
            mode: PgsMode::Paper,
            ratio: clip_pgs_host::ops::pgs::MaskRatio::Fixed(0.5),
            use_ed: true,
            use_otn: true,
        });
        let need = |b: usize| memory_needed(&cfg, b, 1, false, &pgs, Dtype::F32);
        assert!(need(64) > need(32) && need(32) > need(1), "memory grows with the batch");
        assert!(check_fits(&cfg, 32, 1, false, &pgs, Dtype::F32, need(32)).is_ok());
        let e = check_fits(&cfg, 32, 1, false, &pgs, Dtype::F32, need(20) + 1).unwrap_err();
        assert!(e.contains("out of GPU memory: batch 32 needs") && e.contains("--batch-size 20 fits"), "{e}");
        let e = check_fits(&cfg, 32, 1, false, &pgs, Dtype::F32, 1000).unwrap_err();
        assert!(e.contains("not even a batch of 1 fits"), "{e}");
    }
}
