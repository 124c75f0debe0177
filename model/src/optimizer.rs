//! AdamW with open_clip's parameter groups (no weight decay for tensors with fewer than 2 dims,
//! gains, biases and the logit scale: the layout's no-decay span) over the flat model state on
//! its device: the global gradient norm, clipping inside the update, the logit scale clamped to
//! [0, ln 100] after each step.

use std::sync::Arc;

use clip_pgs_host::ops::adamw::{AdamW, AdamWStep, adamw_update, grad_norm};
use clip_pgs_host::ops::cast::cast;
use clip_pgs_host::ops::elementwise::clamp;
use clip_pgs_host::{Buffer, Device, bf16};

use crate::params::{Layout, Params};

pub struct Optimizer {
    pub adamw: AdamW,
    pub weight_decay: f32,
    /// First and second moments.
    pub m: Params,
    pub v: Params,
    /// Steps taken.
    pub step: u32,
    /// The last global gradient norm, on the device.
    norm: Buffer<f32>,
}

fn err(e: clip_pgs_host::Error) -> String {
    e.to_string()
}

impl Optimizer {
    pub fn new(layout: &Arc<Layout>, device: &Device, adamw: AdamW, weight_decay: f32) -> Result<Self, String> {
        let (m, v) = (Params::zeros(layout, device)?, Params::zeros(layout, device)?);
        let norm = device.alloc_zeros(1, "the gradient norm").map_err(err)?;
        Ok(Optimizer { adamw, weight_decay, m, v, step: 0, norm })
    }

    /// The global L2 norm of `grads` (kept on the device for the update, and returned).
    pub fn grad_norm(&mut self, device: &Device, grads: &Params) -> Result<f32, String> {
        grad_norm(device, self.norm.view_mut(), grads.data.view()).map_err(err)?;
        let mut norm = [0.0f32];
        self.norm.read(clip_pgs_host::Span::new(0, 1), &mut norm).map_err(err)?;
        Ok(norm[0])
    }

    /// One step with the norm from `grad_norm`; gradients above `max_norm` are scaled to it. The
    /// gradients are consumed (zeroed) when the norm is finite; `copy` (bf16 training) receives
    /// the new weights rounded to bf16 in the same pass.
    pub fn update(
        &mut self,
        device: &Device,
        params: &mut Params,
        grads: &mut Params,
        max_norm: Option<f32>,
        mut copy: Option<&mut Buffer<bf16>>,
    ) -> Result<(), String> {
        self.step += 1;
        let layout = params.layout.clone();
        for (span, weight_decay) in [(layout.decay, self.weight_decay), (layout.no_decay, 0.0)] {
            let ([], [g]) = grads.data.split([], [span]).map_err(err)?;
            let ([], [p]) = params.data.split([], [span]).map_err(err)?;
            let ([], [m]) = self.m.data.split([], [span]).map_err(err)?;
            let ([], [v]) = self.v.data.split([], [span]).map_err(err)?;
            let at = AdamWStep { step: self.step, weight_decay, max_norm };
            let copy = copy.as_mut().map(|c| c.split([], [span]).map(|([], [c])| c)).transpose().map_err(err)?;
            adamw_update(device, p, g, m, v, copy, self.norm.view(), &self.adamw, at).map_err(err)?;
        }
        let scale_span = layout.span("logit_scale");
        let ([], [scale]) = params.data.split([], [scale_span]).map_err(err)?;
        clamp(device, scale, 0.0, 100f32.ln()).map_err(err)?;
        // The copy's logit scale is never read (the loss reads the f32 one), but keep it equal.
        if let Some(copy) = copy {
            let ([], [c]) = copy.split([], [scale_span]).map_err(err)?;
            let [scale] = params.data.views([scale_span]).map_err(err)?;
            cast(device, c, scale).map_err(err)?;
        }
        Ok(())
    }
}
