//! Linear layer, PyTorch layout: y [rows, out] = x [rows, in]·Wᵀ + b, W [out, in], with the
//! epilogues BIAS, and BIAS then GELU (the pre-activation kept for backward) in either
//! `GeluForm`. Backward: dx = dy·W (after a GELU layer: dx = (dy·W)∘gelu'(pre)), dW += dyᵀ·x,
//! db += Σ_rows dy.
//!
//! On a GPU device the GELU's form picks its path. Erf (open_clip's, the default): a BIAS GEMM
//! then the GELU kernel over pre, and in backward the dx GEMM then the in-place GELU-gradient
//! kernel (one more pass each). Tanh: cuBLASLt's own GELU, fused: GELU_AUX_BIAS writes pre as
//! its aux and y as D, DGELU multiplies the dx GEMM's product by gelu'(pre) (no extra pass;
//! cuBLASLt needs the aux's leading dimension, the GELU layer's width, a multiple of 8).
//! x, W, b, y, pre and dx are the activations' type T (f32, or bf16 on the GPU devices:
//! `dtype::Activation`); the parameter gradients dW and db are f32, the weight gradient GEMM
//! accumulating T products into them in f32.

use rayon::prelude::*;

use super::check::OpCheck;
use super::dtype::Activation;
use super::elementwise::add_assign;
use super::gelu::{GeluForm, cpu_gelu, cpu_gelu_backward, gelu_backward_in_place, gelu_forward};
use super::matmul::{Batch, Mat, cpu_matmul, gpu_matmul};
use crate::cublaslt::Epilogue as Lt;
use crate::device::Device;
use crate::error::Result;
use crate::view::{View, ViewMut};

#[derive(Clone, Copy, Debug)]
pub struct LinearShape {
    pub rows: usize,
    pub inputs: usize,
    pub outputs: usize,
}

/// What follows the product in the forward pass.
pub enum Epilogue<'a, T> {
    None,
    /// y = x·Wᵀ + b.
    Bias(View<'a, T>),
    /// pre = x·Wᵀ + b, y = gelu(pre) in `form` (`GeluForm::Erf`, open_clip's, unless asked).
    BiasGelu {
        bias: View<'a, T>,
        pre: ViewMut<'a, T>,
        form: GeluForm,
    },
}

/// The pre-activation of the GELU before a layer (the output of a `BiasGelu` layer), and the
/// GELU's form: `linear_backward_gelu` takes dx through gelu'(pre).
pub type GeluPre<'a, T> = (View<'a, T>, GeluForm);

/// The gradients backward writes: `dx` overwritten (when asked for), `dw` and `db` (f32)
/// accumulated.
pub struct LinearGrads<'a, T> {
    pub dx: Option<ViewMut<'a, T>>,
    pub dw: ViewMut<'a, f32>,
    pub db: Option<ViewMut<'a, f32>>,
}

fn check_sizes(op: &OpCheck, s: LinearShape, x: usize, w: usize, y: usize) -> Result<()> {
    let LinearShape { rows, inputs, outputs } = s;
    op.size("x", x, rows * inputs, || format!("[rows {rows}, in {inputs}]"))?;
    op.size("weight", w, outputs * inputs, || format!("[out {outputs}, in {inputs}]"))?;
    op.size("y", y, rows * outputs, || format!("[rows {rows}, out {outputs}]"))
}

pub fn linear_forward<T: Activation>(
    device: &Device,
    y: ViewMut<T>,
    x: View<T>,
    w: View<T>,
    epilogue: Epilogue<T>,
    s: LinearShape,
) -> Result<()> {
    let op = OpCheck::new("linear_forward", device);
    check_sizes(&op, s, x.len(), w.len(), y.len())?;
    let LinearShape { rows, inputs, outputs } = s;
    match &epilogue {
        Epilogue::None => {}
        Epilogue::Bias(b) => op.size("bias", b.len(), outputs, || format!("[out {outputs}]"))?,
        Epilogue::BiasGelu { bias, pre, form } => {
            op.size("bias", bias.len(), outputs, || format!("[out {outputs}]"))?;
            op.size("pre", pre.len(), rows * outputs, || format!("[rows {rows}, out {outputs}]"))?;
            fused_aux_ld(&op, device, *form, "pre", outputs)?;
        }
    }
    if !matches!(device, Device::Cpu) {
        let (x, w) = (Mat::new(op.gpu("x", x)?, rows, inputs), Mat::new(op.gpu("weight", w)?, outputs, inputs).t());
        let y = op.gpu_mut("y", y)?;
        return match epilogue {
            Epilogue::None => gpu_matmul(device, Mat::new(y, rows, outputs), x, w, false, Batch::ONE, Lt::Default),
            Epilogue::Bias(b) => {
                gpu_matmul(device, Mat::new(y, rows, outputs), x, w, false, Batch::ONE, Lt::Bias(op.gpu("bias", b)?))
            }
            // open_clip's erf GELU is not cuBLASLt's: BIAS, then the GELU kernel (one more pass
            // over pre).
            Epilogue::BiasGelu { bias, pre, form: GeluForm::Erf } => {
                let (bias, mut pre) = (op.gpu("bias", bias)?, op.gpu_mut("pre", pre)?);
                gpu_matmul(device, Mat::new(pre.reborrow(), rows, outputs), x, w, false, Batch::ONE, Lt::Bias(bias))?;
                gelu_forward(device, y, pre.as_view())
            }
            // cuBLASLt's tanh GELU, fused: D = yᵀ, column-major [out, rows] with leading
            // dimension `out`; the aux (pre) has D's layout, so its ld is `out` too.
            Epilogue::BiasGelu { bias, pre, form: GeluForm::Tanh } => {
                let lt = Lt::GeluAuxBias { bias: op.gpu("bias", bias)?, aux: op.gpu_mut("pre", pre)?, ld: outputs };
                gpu_matmul(device, Mat::new(y, rows, outputs), x, w, false, Batch::ONE, lt)
            }
        };
    }
    let (x, w, y) = (op.cpu_f32("x", x)?, op.cpu_f32("weight", w)?, op.cpu_f32_mut("y", y)?);
    let product = |out: &mut [f32]| {
        cpu_matmul(Mat::new(out, rows, outputs), Mat::new(x, rows, inputs), Mat::new(w, outputs, inputs).t(), false)
    };
    let add_bias = |out: &mut [f32], b: &[f32]| {
        out.par_chunks_mut(outputs).with_min_len(64).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b))
    };
    match epilogue {
        Epilogue::None => product(y),
        Epilogue::Bias(b) => {
            let b = op.cpu_f32("bias", b)?;
            product(y);
            add_bias(y, b);
        }
        Epilogue::BiasGelu { bias, pre, form } => {
            let (bias, pre) = (op.cpu_f32("bias", bias)?, op.cpu_f32_mut("pre", pre)?);
            product(pre);
            add_bias(pre, bias);
            cpu_gelu(y, pre, form);
        }
    }
    Ok(())
}

/// On a GPU device the tanh form is cuBLASLt's fused epilogue, whose aux (the pre-activation,
/// `width` values a row) needs a leading dimension divisible by 8
/// (CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD); refused here, clearly and on emu too, rather than by
/// cuBLASLt.
fn fused_aux_ld(op: &OpCheck, device: &Device, form: GeluForm, name: &str, width: usize) -> Result<()> {
    if form == GeluForm::Tanh && !matches!(device, Device::Cpu) && !width.is_multiple_of(8) {
        return Err(op.invalid(format!(
            "{name} has rows of {width} values; the tanh GELU is cuBLASLt's epilogue, whose aux needs a \
             leading dimension divisible by 8 (the erf form has no such limit)"
        )));
    }
    Ok(())
}

/// Gradients of `linear_forward` (dx is the gradient at x itself; after a GELU layer see
/// `linear_backward_gelu`).
pub fn linear_backward<T: Activation>(
    device: &Device,
    grads: LinearGrads<T>,
    dy: View<T>,
    x: View<T>,
    w: View<T>,
    s: LinearShape,
) -> Result<()> {
    linear_backward_gelu(device, grads, dy, x, w, None, s)
}

/// `linear_backward` for the layer after a GELU-epilogue layer: with `gelu_pre` = (pre, form),
/// the pre-activation [rows, in] of that layer and its GELU's form, `dx` is taken through
/// gelu'(pre) in that form (the gradient at pre). On a GPU device: the erf form by the
/// GELU-gradient kernel after the dx GEMM, the tanh form by cuBLASLt's DGELU epilogue on it.
pub fn linear_backward_gelu<T: Activation>(
    device: &Device,
    grads: LinearGrads<T>,
    dy: View<T>,
    x: View<T>,
    w: View<T>,
    gelu_pre: Option<GeluPre<T>>,
    s: LinearShape,
) -> Result<()> {
    let op = OpCheck::new("linear_backward", device);
    check_sizes(&op, s, x.len(), w.len(), dy.len())?;
    let LinearShape { rows, inputs, outputs } = s;
    op.size("dweight", grads.dw.len(), outputs * inputs, || format!("[out {outputs}, in {inputs}]"))?;
    if let Some(dx) = &grads.dx {
        op.size("dx", dx.len(), rows * inputs, || format!("[rows {rows}, in {inputs}]"))?;
    }
    if let Some((pre, form)) = &gelu_pre {
        op.size("gelu_pre", pre.len(), rows * inputs, || format!("[rows {rows}, in {inputs}]"))?;
        if grads.dx.is_some() {
            fused_aux_ld(&op, device, *form, "gelu_pre", inputs)?;
        }
    }
    if let Some(db) = &grads.db {
        op.size("dbias", db.len(), outputs, || format!("[out {outputs}]"))?;
    }
    if !matches!(device, Device::Cpu) {
        let (dy, x, w) = (op.gpu("dy", dy)?, op.gpu("x", x)?, op.gpu("weight", w)?);
        if let Some(dx) = grads.dx {
            let mut dx = op.gpu_mut("dx", dx)?;
            let (dyr, wr) = (Mat::new(dy, rows, outputs), Mat::new(w, outputs, inputs));
            let dxm = Mat::new(dx.reborrow(), rows, inputs);
            match gelu_pre {
                None => gpu_matmul(device, dxm, dyr, wr, false, Batch::ONE, Lt::Default)?,
                Some((pre, GeluForm::Erf)) => {
                    gpu_matmul(device, dxm, dyr, wr, false, Batch::ONE, Lt::Default)?;
                    gelu_backward_in_place(device, dx, op.gpu("gelu_pre", pre)?)?;
                }
                // D = dxᵀ, column-major [in, rows] with leading dimension `in`; the aux (pre,
                // [rows, in] row-major) has D's layout.
                Some((pre, GeluForm::Tanh)) => {
                    let lt = Lt::DGelu { aux: op.gpu("gelu_pre", pre)?, ld: inputs };
                    gpu_matmul(device, dxm, dyr, wr, false, Batch::ONE, lt)?;
                }
            }
        }
        // dW += dyᵀ·x; BGRADB sums the rows of dyᵀ into a scratch (cuBLASLt overwrites its
        // bias gradient), which is then added to db.
        let dw = Mat::new(op.gpu_mut("dweight", grads.dw)?, outputs, inputs);
        let (dyt, x) = (Mat::new(dy, rows, outputs).t(), Mat::new(x, rows, inputs));
        return match grads.db {
            None => gpu_matmul(device, dw, dyt, x, true, Batch::ONE, Lt::Default),
            Some(db) => {
                let db = op.gpu_mut("dbias", db)?;
                device.with_scratch(outputs, |mut sum| {
                    gpu_matmul(device, dw, dyt, x, true, Batch::ONE, Lt::BGradB(sum.reborrow()))?;
                    add_assign(device, db, sum.as_view())
                })
            }
        };
    }
    let (dy, x, w) = (op.cpu_f32("dy", dy)?, op.cpu_f32("x", x)?, op.cpu_f32("weight", w)?);
    let dx = grads.dx.map(|dx| op.cpu_f32_mut("dx", dx)).transpose()?;
    let pre = gelu_pre.map(|(pre, form)| op.cpu_f32("gelu_pre", pre).map(|pre| (pre, form))).transpose()?;
    let dw = op.cpu_mut("dweight", grads.dw)?;
    let db = grads.db.map(|db| op.cpu_mut("dbias", db)).transpose()?;
    if let Some(dx) = dx {
        cpu_matmul(
            Mat::new(&mut dx[..], rows, inputs),
            Mat::new(dy, rows, outputs),
            Mat::new(w, outputs, inputs),
            false,
        );
        if let Some((pre, form)) = pre {
            cpu_gelu_backward(dx, None, pre, form);
        }
    }
    cpu_matmul(Mat::new(dw, outputs, inputs), Mat::new(dy, rows, outputs).t(), Mat::new(x, rows, inputs), true);
    if let Some(db) = db {
        for row in dy.chunks(outputs) {
            db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gradient, values};
    use super::*;
    use crate::buffer::Buffer;

    fn cpu(v: &[f32]) -> Buffer<f32> {
        Buffer::Cpu(v.to_vec())
    }

    #[test]
    fn backward_matches_finite_differences_with_both_epilogues() {
        let s = LinearShape { rows: 3, inputs: 4, outputs: 5 };
        let (x, w, b, dy) = (values(12, 1), values(20, 2), values(5, 3), values(15, 4));
        let dev = Device::Cpu;
        for gelu in [None, Some(GeluForm::Erf), Some(GeluForm::Tanh)] {
            let forward = |x: &[f32], w: &[f32], b: &[f32]| {
                let (mut y, mut pre) = (cpu(&[0.0; 15]), cpu(&[0.0; 15]));
                let (xb, wb, bb) = (cpu(x), cpu(w), cpu(b));
                let epilogue = match gelu {
                    Some(form) => Epilogue::BiasGelu { bias: bb.view(), pre: pre.view_mut(), form },
                    None => Epilogue::Bias(bb.view()),
                };
                linear_forward(&dev, y.view_mut(), xb.view(), wb.view(), epilogue, s).unwrap();
                (y.to_vec().unwrap(), pre.to_vec().unwrap())
            };
            let loss =
                |x: &[f32], w: &[f32], b: &[f32]| forward(x, w, b).0.iter().zip(&dy).map(|(a, b)| a * b).sum::<f32>();
            // The layer is followed by an identity: its dy is the pre-activation's gradient
            // when the epilogue is GELU, so run DGELU on the "dx" of a preceding identity.
            let pre = forward(&x, &w, &b).1;
            let mut dpre = dy.clone();
            if let Some(form) = gelu {
                cpu_gelu_backward(&mut dpre, None, &pre, form);
            }
            let (mut dx, mut dw, mut db) = (cpu(&[0.0; 12]), cpu(&[0.0; 20]), cpu(&[0.0; 5]));
            let grads = LinearGrads { dx: Some(dx.view_mut()), dw: dw.view_mut(), db: Some(db.view_mut()) };
            let dpre_b = cpu(&dpre);
            linear_backward(&dev, grads, dpre_b.view(), cpu(&x).view(), cpu(&w).view(), s).unwrap();
            let at = |name: &str| format!("{name} (gelu {gelu:?})");
            assert_gradient(&at("dx"), &dx.to_vec().unwrap(), &x, |x| loss(x, &w, &b));
            assert_gradient(&at("dw"), &dw.to_vec().unwrap(), &w, |w| loss(&x, w, &b));
            assert_gradient(&at("db"), &db.to_vec().unwrap(), &b, |b| loss(&x, &w, b));
        }
    }

    /// Two layers as the MLP has them, y = fc2(gelu(fc1(x))): fc1 with the GELU epilogue, fc2's
    /// backward taking dx through gelu'(pre) (`linear_backward_gelu`), in each form, against
    /// finite differences of the pair.
    #[test]
    fn backward_through_the_gelu_matches_finite_differences_in_both_forms() {
        let (s1, s2) = (LinearShape { rows: 3, inputs: 4, outputs: 8 }, LinearShape { rows: 3, inputs: 8, outputs: 5 });
        let (x, w1, b1, w2, b2, dy) =
            (values(12, 1), values(32, 2), values(8, 3), values(40, 4), values(5, 5), values(15, 6));
        // Weights scaled up so that pre spans [-3, 3], where the two forms' curvatures differ.
        let w1: Vec<f32> = w1.iter().map(|v| v * 2.0).collect();
        let dev = Device::Cpu;
        for form in GeluForm::ALL {
            // (y, pre, act) of the pair.
            let forward = |x: &[f32], w1: &[f32], b1: &[f32], w2: &[f32]| {
                let (mut act, mut pre, mut y) = (cpu(&[0.0; 24]), cpu(&[0.0; 24]), cpu(&[0.0; 15]));
                let (xb, w1b, b1b, w2b, b2b) = (cpu(x), cpu(w1), cpu(b1), cpu(w2), cpu(&b2));
                let epilogue = Epilogue::BiasGelu { bias: b1b.view(), pre: pre.view_mut(), form };
                linear_forward(&dev, act.view_mut(), xb.view(), w1b.view(), epilogue, s1).unwrap();
                linear_forward(&dev, y.view_mut(), act.view(), w2b.view(), Epilogue::Bias(b2b.view()), s2).unwrap();
                [y, pre, act].map(|b| b.to_vec().unwrap())
            };
            let loss = |x: &[f32], w1: &[f32], b1: &[f32], w2: &[f32]| -> f32 {
                forward(x, w1, b1, w2)[0].iter().zip(&dy).map(|(a, b)| a * b).sum()
            };
            let [_, pre, act] = forward(&x, &w1, &b1, &w2);
            let worst = pre.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(worst > 2.0, "pre reaches {worst} only");
            let (mut dpre, mut dw2, mut db2) = (cpu(&[0.0; 24]), cpu(&[0.0; 40]), cpu(&[0.0; 5]));
            let (mut dx, mut dw1, mut db1) = (cpu(&[0.0; 12]), cpu(&[0.0; 32]), cpu(&[0.0; 8]));
            let (dyb, actb, preb, w1b, w2b) = (cpu(&dy), cpu(&act), cpu(&pre), cpu(&w1), cpu(&w2));
            let grads = LinearGrads { dx: Some(dpre.view_mut()), dw: dw2.view_mut(), db: Some(db2.view_mut()) };
            linear_backward_gelu(&dev, grads, dyb.view(), actb.view(), w2b.view(), Some((preb.view(), form)), s2)
                .unwrap();
            let grads = LinearGrads { dx: Some(dx.view_mut()), dw: dw1.view_mut(), db: Some(db1.view_mut()) };
            linear_backward(&dev, grads, dpre.view(), cpu(&x).view(), w1b.view(), s1).unwrap();
            let at = |name: &str| format!("{name} ({form})");
            assert_gradient(&at("dx"), &dx.to_vec().unwrap(), &x, |x| loss(x, &w1, &b1, &w2));
            assert_gradient(&at("dw1"), &dw1.to_vec().unwrap(), &w1, |w1| loss(&x, w1, &b1, &w2));
            assert_gradient(&at("db1"), &db1.to_vec().unwrap(), &b1, |b1| loss(&x, &w1, b1, &w2));
            assert_gradient(&at("dw2"), &dw2.to_vec().unwrap(), &w2, |w2| loss(&x, &w1, &b1, w2));
        }
    }

    #[test]
    fn wrong_sizes_are_named() {
        let (x, w, mut y) = (cpu(&[0.0; 12]), cpu(&[0.0; 19]), cpu(&[0.0; 15]));
        let s = LinearShape { rows: 3, inputs: 4, outputs: 5 };
        let e = linear_forward(&Device::Cpu, y.view_mut(), x.view(), w.view(), Epilogue::None, s).unwrap_err();
        assert!(e.to_string().contains("linear_forward: weight has 19 values, [out 5, in 4] needs 20"), "{e}");
    }
}
