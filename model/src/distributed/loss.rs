//! open_clip's distributed contrastive loss (`ClipLoss` with `world_size > 1`), on the host: the
//! features of every rank are all-gathered (rank order, so the gathered batch is the one-process
//! batch), each rank scores the whole gathered batch, or with `--local-loss` only its own
//! samples against all of them, and with `--gather-with-grad` the gathered features' gradients
//! are summed back over ranks (the backward of `torch.distributed.nn.all_gather`) before a rank
//! keeps the rows of its own samples. With the gradient average that follows
//! (`DataParallel::average`, DDP's), N ranks with batch b get the loss and gradients of one
//! process with batch N·b. The GPU devices compute the loss without `--local-loss` on the device
//! instead (`device_loss.rs`).

use clip_pgs_host::ops::clip_loss::{HostLossOut, clip_loss_local, clip_loss_workspace};

use super::DataParallel;
use crate::clip::HostLoss;

impl DataParallel {
    /// The loss of this rank's features `image` and `text` ([b, `dim`] each) at the log logit
    /// scale `logit_scale`, with every rank's: the mean of the ranks' losses (what the run logs),
    /// the gradients of this rank's features, and this rank's logit-scale gradient.
    pub fn loss(&self, image: &[f32], text: &[f32], logit_scale: f32, dim: usize) -> Result<HostLoss, String> {
        let (ranks, rank, b) = (self.ranks(), self.rank(), image.len() / dim.max(1));
        let all = ranks * b;
        let (mut all_image, mut all_text) = (vec![0.0; all * dim], vec![0.0; all * dim]);
        self.world.all_gather(image, &mut all_image);
        self.world.all_gather(text, &mut all_text);
        let mine = rank * b..(rank + 1) * b;
        let scored = if self.local_loss { mine.clone() } else { 0..all };
        let (mut loss, mut d_logit_scale, mut logits) = (0.0, 0.0, vec![0.0; all * all]);
        let (mut d_image, mut d_text) = (vec![0.0; all * dim], vec![0.0; all * dim]);
        let out = HostLossOut {
            loss: &mut loss,
            logits: &mut logits,
            d_image: &mut d_image,
            d_text: &mut d_text,
            d_logit_scale: &mut d_logit_scale,
        };
        let mut workspace = vec![0.0; clip_loss_workspace(all, dim)];
        clip_loss_local(out, &all_image, &all_text, logit_scale, &mut workspace, dim, scored)
            .map_err(|e| e.to_string())?;
        if self.gather_with_grad {
            self.world.all_reduce_sum(&mut d_image);
            self.world.all_reduce_sum(&mut d_text);
        }
        let mut mean = [loss];
        self.world.all_reduce_sum(&mut mean);
        let rows = mine.start * dim..mine.end * dim;
        Ok(HostLoss {
            loss: mean[0] / ranks as f32,
            d_image: d_image[rows.clone()].to_vec(),
            d_text: d_text[rows].to_vec(),
            d_logit_scale,
        })
    }
}
