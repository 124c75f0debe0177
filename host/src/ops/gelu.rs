//! GELU in two forms (`GeluForm`): the exact (erf) one of open_clip's `nn.GELU()`, gelu(x) =
//! x·Φ(x), Φ(x) = (1 + erf(x/√2))/2, gelu'(x) = Φ(x) + x·φ(x); and the tanh approximation
//! (`nn.GELU(approximate="tanh")`), the one cuBLASLt's GELU_AUX_BIAS and DGELU epilogues compute.
//! The math is shared with the kernels and the cuBLASLt emulator (`kernels/src/gelu.rs`). erf
//! is the kernels' f32 one (|error| ≤ 1.5e-7): the f64 series it replaced cost a fifth of a
//! ViT-B/16 training step. The linear layer applies either form as its epilogue (`linear.rs`;
//! on a GPU device erf through the kernels here, tanh fused into cuBLASLt's GEMM); the ops here
//! are the erf form, for activations no linear layer produces, f32 or bf16
//! (`dtype::Activation`; bf16 on the GPU devices only, computed in f32).

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use clip_pgs_kernels::gelu::{THREADS, gelu, gelu_grad, gelu_tanh, gelu_tanh_grad};
use clip_pgs_kernels::map::threads;

use super::check::OpCheck;
use super::dtype::Activation;
use crate::device::Device;
use crate::error::Result;
use crate::launch::grid_stride_config;
use crate::view::{View, ViewMut};

/// Which GELU a linear layer's epilogue applies. `Erf` (the default) is open_clip's exact
/// `nn.GELU()`; `Tanh` is the approximation x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))/2 that
/// cuBLASLt's GELU epilogues compute (fused into the GEMM on a GPU device). The two agree to
/// within 5e-4 and their gradients to within 9e-4 (measured over [-4, 4]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GeluForm {
    #[default]
    Erf,
    Tanh,
}

impl GeluForm {
    pub const ALL: [GeluForm; 2] = [GeluForm::Erf, GeluForm::Tanh];

    /// The name the flag takes: "erf" or "tanh".
    pub fn name(self) -> &'static str {
        match self {
            GeluForm::Erf => "erf",
            GeluForm::Tanh => "tanh",
        }
    }

    /// gelu(x) in this form (f32, the math of the kernels and of cuBLASLt's emulator).
    pub fn apply(self, x: f32) -> f32 {
        match self {
            GeluForm::Erf => gelu(x),
            GeluForm::Tanh => gelu_tanh(x),
        }
    }

    /// dy·gelu'(x) in this form.
    pub fn grad(self, dy: f32, x: f32) -> f32 {
        match self {
            GeluForm::Erf => gelu_grad(dy, x),
            GeluForm::Tanh => gelu_tanh_grad(dy, x),
        }
    }
}

impl fmt::Display for GeluForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GeluForm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "erf" => Ok(GeluForm::Erf),
            "tanh" => Ok(GeluForm::Tanh),
            _ => Err(format!("unknown GELU form '{s}': expected erf or tanh")),
        }
    }
}

/// Elements per parallel task: plain loops inside (rayon's element-wise zips compile to slower
/// loops).
const CHUNK: usize = 1 << 12;

/// y = f(x), element-wise in parallel chunks.
fn cpu_map(y: &mut [f32], x: &[f32], f: impl Fn(f32) -> f32 + Sync) {
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = f(x));
    });
}

/// dx = grad(dy, x), element-wise; `dy` None reads dx in place.
fn cpu_map_grad(dx: &mut [f32], dy: Option<&[f32]>, x: &[f32], grad: impl Fn(f32, f32) -> f32 + Sync) {
    match dy {
        Some(dy) => {
            dx.par_chunks_mut(CHUNK).zip(dy.par_chunks(CHUNK).zip(x.par_chunks(CHUNK))).for_each(|(dx, (dy, x))| {
                dx.iter_mut().zip(dy.iter().zip(x)).for_each(|(dx, (&dy, &x))| *dx = grad(dy, x))
            })
        }
        None => dx
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(dx, x)| dx.iter_mut().zip(x).for_each(|(d, &x)| *d = grad(*d, x))),
    }
}

/// y = gelu(x) in `form`.
pub(super) fn cpu_gelu(y: &mut [f32], x: &[f32], form: GeluForm) {
    // One loop per form: the form is not matched per element.
    match form {
        GeluForm::Erf => cpu_map(y, x, gelu),
        GeluForm::Tanh => cpu_map(y, x, gelu_tanh),
    }
}

/// dx = dy·gelu'(x) in `form`; `dy` and `dx` may be the same slice (pass it as `dx` with `dy`
/// None).
pub(super) fn cpu_gelu_backward(dx: &mut [f32], dy: Option<&[f32]>, x: &[f32], form: GeluForm) {
    match form {
        GeluForm::Erf => cpu_map_grad(dx, dy, x, gelu_grad),
        GeluForm::Tanh => cpu_map_grad(dx, dy, x, gelu_tanh_grad),
    }
}

/// n as a kernel's u32 count.
fn checked_len(op: &OpCheck, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| op.invalid(format!("{n} values, more than a kernel indexes (2³² − 1)")))
}

/// y = gelu(x), the erf form.
pub fn gelu_forward<T: Activation>(device: &Device, y: ViewMut<T>, x: View<T>) -> Result<()> {
    let op = OpCheck::new("gelu_forward", device);
    op.size("y", y.len(), x.len(), || "x's size".into())?;
    let n = checked_len(&op, x.len())?;
    if !matches!(device, Device::Cpu) {
        // SAFETY: y and x hold n values.
        return unsafe {
            device.launch(
                &T::GELU,
                grid_stride_config(threads(n as usize, T::LANES), THREADS),
                (op.gpu_mut("y", y)?, op.gpu("x", x)?, n),
            )
        };
    }
    cpu_gelu(op.cpu_f32_mut("y", y)?, op.cpu_f32("x", x)?, GeluForm::Erf);
    Ok(())
}

/// dx = dy·gelu'(x) (overwritten), the erf form.
pub fn gelu_backward<T: Activation>(device: &Device, dx: ViewMut<T>, dy: View<T>, x: View<T>) -> Result<()> {
    let op = OpCheck::new("gelu_backward", device);
    op.size("dy", dy.len(), x.len(), || "x's size".into())?;
    op.size("dx", dx.len(), x.len(), || "x's size".into())?;
    let n = checked_len(&op, x.len())?;
    if !matches!(device, Device::Cpu) {
        let args = (op.gpu_mut("dx", dx)?, op.gpu("dy", dy)?, op.gpu("x", x)?, n);
        // SAFETY: dx, dy and x hold n values.
        return unsafe {
            device.launch(&T::GELU_BACKWARD, grid_stride_config(threads(n as usize, T::LANES), THREADS), args)
        };
    }
    cpu_gelu_backward(op.cpu_f32_mut("dx", dx)?, Some(op.cpu_f32("dy", dy)?), op.cpu_f32("x", x)?, GeluForm::Erf);
    Ok(())
}

/// dx ← dx·gelu'(x) (the gradient at a GELU's output becomes the one at its input), the erf
/// form.
pub fn gelu_backward_in_place<T: Activation>(device: &Device, dx: ViewMut<T>, x: View<T>) -> Result<()> {
    let op = OpCheck::new("gelu_backward", device);
    op.size("dx", dx.len(), x.len(), || "x's size".into())?;
    let n = checked_len(&op, x.len())?;
    if !matches!(device, Device::Cpu) {
        let args = (op.gpu_mut("dx", dx)?, None::<View<T>>, op.gpu("x", x)?, n);
        // SAFETY: dx and x hold n values; the null dy makes the kernel read dx.
        return unsafe {
            device.launch(&T::GELU_BACKWARD, grid_stride_config(threads(n as usize, T::LANES), THREADS), args)
        };
    }
    cpu_gelu_backward(op.cpu_f32_mut("dx", dx)?, None, op.cpu_f32("x", x)?, GeluForm::Erf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gradient, values};
    use super::*;

    #[test]
    fn backward_matches_finite_differences_in_both_forms() {
        let x: Vec<f32> = values(20, 1).iter().map(|v| v * 4.0).collect();
        let dy = values(20, 2);
        for form in GeluForm::ALL {
            let mut dx = vec![0.0; 20];
            cpu_gelu_backward(&mut dx, Some(&dy), &x, form);
            assert_gradient(&format!("dx ({form})"), &dx, &x, |x| {
                let mut y = vec![0.0; 20];
                cpu_gelu(&mut y, x, form);
                y.iter().zip(&dy).map(|(a, b)| a * b).sum()
            });
            let mut in_place = dy.clone();
            cpu_gelu_backward(&mut in_place, None, &x, form);
            assert_eq!(in_place, dx);
        }
    }

    #[test]
    fn the_forms_differ_by_the_approximation_and_parse_by_name() {
        // Over [-4, 4]: the tanh form is within 1e-3 of the exact one, but not equal to it.
        let (mut worst, mut worst_grad) = (0.0f32, 0.0f32);
        for i in 0..=8000 {
            let x = -4.0 + i as f32 * 1e-3;
            worst = worst.max((GeluForm::Erf.apply(x) - GeluForm::Tanh.apply(x)).abs());
            worst_grad = worst_grad.max((GeluForm::Erf.grad(1.0, x) - GeluForm::Tanh.grad(1.0, x)).abs());
        }
        eprintln!("over [-4, 4]: |gelu_erf − gelu_tanh| ≤ {worst:.3e}, |gelu'_erf − gelu'_tanh| ≤ {worst_grad:.3e}");
        assert!((1e-4..=1e-3).contains(&worst), "gelu: erf and tanh differ by {worst}");
        assert!((1e-4..=1e-3).contains(&worst_grad), "gelu': erf and tanh differ by {worst_grad}");
        // Each form's gradient is its own forward's: central differences (step 1e-2: truncation
        // and rounding below 1e-4) agree with it to 2e-4, and with the other form's gradient
        // not everywhere (they differ by up to worst_grad).
        for (form, other) in [(GeluForm::Erf, GeluForm::Tanh), (GeluForm::Tanh, GeluForm::Erf)] {
            let (mut own, mut crossed) = (0.0f32, 0.0f32);
            for i in 0..=800 {
                let (x, h) = (-4.0 + i as f32 * 1e-2, 1e-2);
                let numeric = (form.apply(x + h) - form.apply(x - h)) / (2.0 * h);
                own = own.max((numeric - form.grad(1.0, x)).abs());
                crossed = crossed.max((numeric - other.grad(1.0, x)).abs());
            }
            assert!(own <= 2e-4 && crossed > 5e-4, "{form}: own gradient off by {own}, the other's by {crossed}");
        }
        for form in GeluForm::ALL {
            assert_eq!(form.to_string().parse::<GeluForm>(), Ok(form));
        }
        assert_eq!(GeluForm::default(), GeluForm::Erf);
        assert!("exact".parse::<GeluForm>().unwrap_err().contains("expected erf or tanh"));
    }
}
