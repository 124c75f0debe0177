//! AdamW with open_clip's parameter groups (no weight decay for tensors with fewer than 2 dims,
//! gains, biases and the logit scale: the layout's no-decay span) over the flat model state on
//! its device: the global gradient norm, clipping inside the update, the logit scale clamped to
//! [0, ln 100] after each step.

use std::sync::Arc;

use clip_pgs_host::ops::adamw::{AdamW, adamw_settings, adamw_update, grad_norm};
use clip_pgs_host::ops::cast::cast;
use clip_pgs_host::ops::elementwise::clamp;
use clip_pgs_host::view::{Span, View};
use clip_pgs_host::{Buffer, Device, bf16};
use clip_pgs_kernels::adamw::settings;

use crate::params::{Layout, Params};

pub struct Optimizer {
    pub adamw: AdamW,
    pub weight_decay: f32,
    /// First and second moments.
    pub m: Params,
    pub v: Params,
    /// The updates applied so far (skipped steps do not count), on the device: a step decides
    /// there whether it applies, without a host read.
    steps: Buffer<u32>,
    /// The last global gradient norm, on the device.
    norm: Buffer<f32>,
    /// The last step's decision and factors (`adamw_settings`), on the device.
    settings: Buffer<f32>,
    /// The learning rate of the next update, in device memory (`set_lr`).
    lr: Buffer<f32>,
}

fn err(e: clip_pgs_host::Error) -> String {
    e.to_string()
}

impl Optimizer {
    pub fn new(layout: &Arc<Layout>, device: &Device, adamw: AdamW, weight_decay: f32) -> Result<Self, String> {
        let (m, v) = (Params::zeros(layout, device)?, Params::zeros(layout, device)?);
        let steps = device.alloc_zeros(1, "the optimizer's step count").map_err(err)?;
        let norm = device.alloc_zeros(1, "the gradient norm").map_err(err)?;
        let settings = device.alloc_zeros(settings::LEN, "the optimizer's settings").map_err(err)?;
        let lr = device.alloc_zeros(1, "the learning rate").map_err(err)?;
        Ok(Optimizer { adamw, weight_decay, m, v, steps, norm, settings, lr })
    }

    /// The updates applied so far (a host read: waits for the device).
    pub fn steps(&self) -> Result<u32, String> {
        let mut steps = [0u32];
        self.steps.read(Span::new(0, 1), &mut steps).map_err(err)?;
        Ok(steps[0])
    }

    /// Sets the count of applied updates (a resumed run's).
    pub fn set_steps(&mut self, steps: u32) -> Result<(), String> {
        self.steps.write(Span::new(0, 1), &[steps]).map_err(err)
    }

    /// Writes the learning rate of the next update into device memory (a host write, before the
    /// step: the update reads it there, also when it replays a captured step).
    pub fn set_lr(&mut self, lr: f32) -> Result<(), String> {
        self.lr.write(Span::new(0, 1), &[lr]).map_err(err)
    }

    /// The addresses of the buffers an update uses (what a captured step holds).
    pub fn addresses(&self) -> [u64; 6] {
        let (m, v) = (self.m.data.address(), self.v.data.address());
        [m, v, self.steps.address(), self.norm.address(), self.settings.address(), self.lr.address()]
    }

    /// The global L2 norm of `grads`, kept on the device for the update.
    pub fn grad_norm(&mut self, device: &Device, grads: &Params) -> Result<(), String> {
        grad_norm(device, self.norm.view_mut(), grads.data.view()).map_err(err)
    }

    /// The norm from the last `grad_norm` (a host read: waits for the device).
    pub fn last_norm(&self) -> Result<f32, String> {
        let mut norm = [0.0f32];
        self.norm.read(Span::new(0, 1), &mut norm).map_err(err)?;
        Ok(norm[0])
    }

    /// The norm on the device, for a caller that keeps a history of it there.
    pub fn norm_view(&self) -> View<'_, f32> {
        self.norm.view()
    }

    /// One step with the norm from `grad_norm`, decided on the device: it applies when `loss` [1]
    /// and the norm are finite (gradients above `max_norm` are scaled to it); the gradients are
    /// consumed (zeroed) either way. `copy` (bf16 training) receives the new weights rounded to
    /// bf16 in the same pass.
    pub fn update(
        &mut self,
        device: &Device,
        params: &mut Params,
        grads: &mut Params,
        loss: View<f32>,
        max_norm: Option<f32>,
        mut copy: Option<&mut Buffer<bf16>>,
    ) -> Result<(), String> {
        let (settings, steps, norm) = (self.settings.view_mut(), self.steps.view_mut(), self.norm.view());
        adamw_settings(device, settings, steps, norm, loss, self.lr.view(), max_norm, &self.adamw).map_err(err)?;
        let layout = params.layout.clone();
        for (span, weight_decay) in [(layout.decay, self.weight_decay), (layout.no_decay, 0.0)] {
            let ([], [g]) = grads.data.split([], [span]).map_err(err)?;
            let ([], [p]) = params.data.split([], [span]).map_err(err)?;
            let ([], [m]) = self.m.data.split([], [span]).map_err(err)?;
            let ([], [v]) = self.v.data.split([], [span]).map_err(err)?;
            let copy = copy.as_mut().map(|c| c.split([], [span]).map(|([], [c])| c)).transpose().map_err(err)?;
            adamw_update(device, p, g, m, v, copy, self.settings.view(), &self.adamw, weight_decay).map_err(err)?;
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
