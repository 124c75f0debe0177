//! AdamW on the CPU, as `torch.optim.AdamW`: decoupled weight decay p ← p·(1 − lr·wd), then
//! m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g², p ← p − lr/(1 − β1ᵗ) · m / (√v/√(1 − β2ᵗ) + ε).

use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl AdamW {
    /// One step for one tensor; `step` counts from 1.
    #[allow(clippy::too_many_arguments)]
    pub fn update(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], step: u32, weight_decay: f32) {
        let bias1 = 1.0 - self.beta1.powi(step as i32);
        let bias2_sqrt = (1.0 - self.beta2.powi(step as i32)).sqrt();
        let step_size = self.lr / bias1;
        let decay = 1.0 - self.lr * weight_decay;
        p.par_iter_mut().zip(g.par_iter()).zip(m.par_iter_mut().zip(v.par_iter_mut())).for_each(|((p, &g), (m, v))| {
            *p *= decay;
            *m = self.beta1 * *m + (1.0 - self.beta1) * g;
            *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
            *p -= step_size * *m / (v.sqrt() / bias2_sqrt + self.eps);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_about_lr() {
        // With bias correction the first step is lr·g/(|g| + ε′): about lr against the gradient.
        let opt = AdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let (mut p, mut m, mut v) = (vec![1.0f32, -2.0], vec![0.0; 2], vec![0.0; 2]);
        opt.update(&mut p, &[0.5, -3.0], &mut m, &mut v, 1, 0.0);
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 1.9).abs() < 1e-6, "{p:?}");
        let mut q = vec![1.0f32];
        opt.update(&mut q, &[0.0], &mut [0.0], &mut [0.0], 1, 0.5);
        assert!((q[0] - 0.95).abs() < 1e-7, "decay only: {q:?}");
    }
}
