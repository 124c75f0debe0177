//! AdamW with open_clip's parameter groups: no weight decay for tensors with fewer than 2 dims,
//! gains, biases and the logit scale; the logit scale clamped to [0, ln 100] after each step.

use clip_pgs_host::ops::adamw::AdamW;

use crate::config::ClipConfig;
use crate::params::Params;

pub struct Optimizer {
    pub adamw: AdamW,
    pub weight_decay: f32,
    m: Params,
    v: Params,
    step: u32,
}

/// open_clip's `exclude`: p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in the name.
pub fn decays(name: &str, dims: usize) -> bool {
    !(dims < 2 || ["bn", "ln", "bias", "logit_scale"].iter().any(|k| name.contains(k)))
}

impl Optimizer {
    pub fn new(cfg: &ClipConfig, adamw: AdamW, weight_decay: f32) -> Self {
        Optimizer { adamw, weight_decay, m: Params::zeros(cfg), v: Params::zeros(cfg), step: 0 }
    }

    /// The first and second moments and the number of steps taken (for checkpoints).
    pub fn state(&self) -> (&Params, &Params, u32) {
        (&self.m, &self.v, self.step)
    }

    /// Continues from a checkpoint's moments and step count.
    pub fn restore(&mut self, m: Params, v: Params, step: u32) {
        (self.m, self.v, self.step) = (m, v, step);
    }

    pub fn step(&mut self, params: &mut Params, grads: &Params) {
        self.step += 1;
        // The three maps have the same keys, so they iterate in the same order.
        let moments = self.m.0.values_mut().zip(self.v.0.values_mut());
        for ((name, p), (m, v)) in params.0.iter_mut().zip(moments) {
            let wd = if decays(name, p.shape.len()) { self.weight_decay } else { 0.0 };
            self.adamw.update(&mut p.data, grads.get(name), &mut m.data, &mut v.data, self.step, wd);
        }
        let s = params.get_mut("logit_scale");
        s[0] = s[0].clamp(0.0, 100f32.ln());
    }
}
