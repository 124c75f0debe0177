//! open_clip's distributed contrastive loss on a GPU device (cuda, emu), without `--local-loss`:
//! the ranks' features are all-gathered into device buffers (rank order: the one-process batch),
//! every rank runs the device's fused loss (`clip_loss`) over the whole gathered batch, with
//! `--gather-with-grad` the gathered features' gradients are summed over ranks on the device, and
//! the rank keeps the rows of its own samples. The loss is the same on every rank; the value
//! logged is still the ranks' mean (`loss.rs`'s). Nothing is read back to the host except where
//! the collectives themselves go through it (cuda without NCCL: `DataParallel::in_host_memory`).
//! The gathered batch is f32 whatever the activations' type: the loss is computed in f32 either
//! way, and the collectives are f32's.

use clip_pgs_host::ops::clip_loss::{ClipLossOut, clip_loss, clip_loss_workspace};
use clip_pgs_host::view::SpanAllocator;
use clip_pgs_host::{Buffer, Device, Span};

use super::DataParallel;
use crate::clip::LossIo;
use crate::precision::Precision;

/// The device buffers of the gathered loss, for `ranks` ranks of `batch` samples of `dim`.
pub struct DeviceLoss {
    ranks: usize,
    batch: usize,
    dim: usize,
    /// This rank's features in f32 [batch, dim], what it sends.
    local: Buffer<f32>,
    /// The gathered image and text features [ranks·batch, dim], and their gradients.
    features: [Buffer<f32>; 2],
    grads: [Buffer<f32>; 2],
    /// [1], averaged over ranks in place.
    loss: Buffer<f32>,
    /// The logits [(ranks·batch)²] and `clip_loss`'s workspace, at `spans`.
    stats: Buffer<f32>,
    spans: [Span; 2],
}

impl DeviceLoss {
    pub fn new(device: &Device, ranks: usize, batch: usize, dim: usize) -> Result<DeviceLoss, String> {
        let all = ranks * batch;
        let zeros = |n: usize| device.alloc_zeros::<f32>(n, "the gathered contrastive loss").map_err(|e| e.to_string());
        let mut stats = SpanAllocator::default();
        let spans = [stats.take(all * all), stats.take(clip_loss_workspace(all, dim))];
        Ok(DeviceLoss {
            ranks,
            batch,
            dim,
            local: zeros(batch * dim)?,
            features: [zeros(all * dim)?, zeros(all * dim)?],
            grads: [zeros(all * dim)?, zeros(all * dim)?],
            loss: zeros(1)?,
            stats: zeros(stats.len)?,
            spans,
        })
    }

    /// Whether these buffers are sized for `ranks` ranks of `batch` samples of `dim`.
    pub fn fits(&self, ranks: usize, batch: usize, dim: usize) -> bool {
        (self.ranks, self.batch, self.dim) == (ranks, batch, dim)
    }

    /// The loss of `io`'s features with every rank's, its gradients written where `io` says: the
    /// rank's own rows of the gathered gradients, its own logit-scale gradient (as on the host),
    /// and the ranks' mean loss.
    pub fn run<T: Precision>(&mut self, dp: &DataParallel, device: &Device, io: LossIo<T>) -> Result<(), String> {
        let err = |e: clip_pgs_host::Error| e.to_string();
        let (b, e, all) = (self.batch, self.dim, self.ranks * self.batch);
        let LossIo { features, logit_scale, loss, d_features, d_logit_scale } = io;
        for (features, gathered) in features.into_iter().zip(&mut self.features) {
            T::widen(device, self.local.view_mut(), features).map_err(err)?;
            dp.all_gather(&self.local, gathered)?;
        }
        let [image, text] = &self.features;
        let [grad_image, grad_text] = &mut self.grads;
        let ([], [logits, workspace]) = self.stats.split([], self.spans).map_err(err)?;
        let out = ClipLossOut {
            loss: self.loss.view_mut(),
            logits,
            d_image: grad_image.view_mut(),
            d_text: grad_text.view_mut(),
            d_logit_scale,
        };
        clip_loss(device, out, image.view(), text.view(), logit_scale, workspace, all, e).map_err(err)?;
        if dp.gather_with_grad {
            for grad in &mut self.grads {
                dp.all_reduce_sum(grad)?;
            }
        }
        dp.average(&mut self.loss)?;
        device.copy(loss, self.loss.view()).map_err(err)?;
        let mine = Span::new(dp.rank() * b * e, b * e);
        for (d, grad) in d_features.into_iter().zip(&self.grads) {
            T::narrow(device, d, grad.views([mine]).map_err(err)?[0]).map_err(err)?;
        }
        Ok(())
    }
}
