//! Linear layer, PyTorch layout: y [rows, out] = x [rows, in]·Wᵀ + b, W [out, in], with
//! cuBLASLt's epilogues: BIAS, and GELU_AUX_BIAS (the pre-activation kept for backward).
//! Backward: dx = dy·W (with DGELU: dx = (dy·W)∘gelu'(pre)), dW += dyᵀ·x, db += Σ_rows dy.
//! x, W, b, y, pre and dx are the activations' type T (f32, or bf16 on the GPU devices:
//! `dtype::Activation`); the parameter gradients dW and db are f32, the weight gradient GEMM
//! accumulating T products into them in f32.

use rayon::prelude::*;

use super::check::OpCheck;
use super::dtype::Activation;
use super::elementwise::add_assign;
use super::gelu::{cpu_gelu, cpu_gelu_backward, gelu_backward_in_place, gelu_forward};
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
    /// pre = x·Wᵀ + b, y = gelu(pre).
    BiasGelu {
        bias: View<'a, T>,
        pre: ViewMut<'a, T>,
    },
}

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
        Epilogue::BiasGelu { bias, pre } => {
            op.size("bias", bias.len(), outputs, || format!("[out {outputs}]"))?;
            op.size("pre", pre.len(), rows * outputs, || format!("[rows {rows}, out {outputs}]"))?;
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
            // cuBLASLt's GELU epilogue is the tanh form; open_clip's is erf: BIAS, then the GELU
            // kernel (one more pass over pre).
            Epilogue::BiasGelu { bias, pre } => {
                let (bias, mut pre) = (op.gpu("bias", bias)?, op.gpu_mut("pre", pre)?);
                gpu_matmul(device, Mat::new(pre.reborrow(), rows, outputs), x, w, false, Batch::ONE, Lt::Bias(bias))?;
                gelu_forward(device, y, pre.as_view())
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
        Epilogue::BiasGelu { bias, pre } => {
            let (bias, pre) = (op.cpu_f32("bias", bias)?, op.cpu_f32_mut("pre", pre)?);
            product(pre);
            add_bias(pre, bias);
            cpu_gelu(y, pre);
        }
    }
    Ok(())
}

/// Gradients of `linear_forward`. `gelu_pre`: the forward had the GELU epilogue and this is its
/// pre-activation (cuBLASLt's DGELU: dx becomes the gradient at the pre-activation).
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

/// `linear_backward` for the layer after a GELU-epilogue layer: `dx` is taken through gelu'(pre).
pub fn linear_backward_gelu<T: Activation>(
    device: &Device,
    grads: LinearGrads<T>,
    dy: View<T>,
    x: View<T>,
    w: View<T>,
    gelu_pre: Option<View<T>>,
    s: LinearShape,
) -> Result<()> {
    let op = OpCheck::new("linear_backward", device);
    check_sizes(&op, s, x.len(), w.len(), dy.len())?;
    let LinearShape { rows, inputs, outputs } = s;
    op.size("dweight", grads.dw.len(), outputs * inputs, || format!("[out {outputs}, in {inputs}]"))?;
    if let Some(dx) = &grads.dx {
        op.size("dx", dx.len(), rows * inputs, || format!("[rows {rows}, in {inputs}]"))?;
    }
    if let Some(pre) = &gelu_pre {
        op.size("gelu_pre", pre.len(), rows * inputs, || format!("[rows {rows}, in {inputs}]"))?;
    }
    if let Some(db) = &grads.db {
        op.size("dbias", db.len(), outputs, || format!("[out {outputs}]"))?;
    }
    if !matches!(device, Device::Cpu) {
        let (dy, x, w) = (op.gpu("dy", dy)?, op.gpu("x", x)?, op.gpu("weight", w)?);
        if let Some(dx) = grads.dx {
            let mut dx = op.gpu_mut("dx", dx)?;
            let (dyr, wr) = (Mat::new(dy, rows, outputs), Mat::new(w, outputs, inputs));
            gpu_matmul(device, Mat::new(dx.reborrow(), rows, inputs), dyr, wr, false, Batch::ONE, Lt::Default)?;
            if let Some(pre) = gelu_pre {
                gelu_backward_in_place(device, dx, op.gpu("gelu_pre", pre)?)?;
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
    let pre = gelu_pre.map(|pre| op.cpu_f32("gelu_pre", pre)).transpose()?;
    let dw = op.cpu_mut("dweight", grads.dw)?;
    let db = grads.db.map(|db| op.cpu_mut("dbias", db)).transpose()?;
    if let Some(dx) = dx {
        cpu_matmul(
            Mat::new(&mut dx[..], rows, inputs),
            Mat::new(dy, rows, outputs),
            Mat::new(w, outputs, inputs),
            false,
        );
        if let Some(pre) = pre {
            cpu_gelu_backward(dx, None, pre);
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
        for gelu in [false, true] {
            let forward = |x: &[f32], w: &[f32], b: &[f32]| {
                let (mut y, mut pre) = (cpu(&[0.0; 15]), cpu(&[0.0; 15]));
                let (xb, wb, bb) = (cpu(x), cpu(w), cpu(b));
                let epilogue = if gelu {
                    Epilogue::BiasGelu { bias: bb.view(), pre: pre.view_mut() }
                } else {
                    Epilogue::Bias(bb.view())
                };
                linear_forward(&dev, y.view_mut(), xb.view(), wb.view(), epilogue, s).unwrap();
                (y.to_vec().unwrap(), pre.to_vec().unwrap())
            };
            let loss =
                |x: &[f32], w: &[f32], b: &[f32]| forward(x, w, b).0.iter().zip(&dy).map(|(a, b)| a * b).sum::<f32>();
            // The layer is followed by an identity: its dy is the pre-activation's gradient
            // when the epilogue is GELU, so run DGELU on the "dx" of a preceding identity.
            let pre = forward(&x, &w, &b).1;
            let dpre: Vec<f32> = if gelu {
                let mut d = dy.clone();
                cpu_gelu_backward(&mut d, None, &pre);
                d
            } else {
                dy.clone()
            };
            let (mut dx, mut dw, mut db) = (cpu(&[0.0; 12]), cpu(&[0.0; 20]), cpu(&[0.0; 5]));
            let grads = LinearGrads { dx: Some(dx.view_mut()), dw: dw.view_mut(), db: Some(db.view_mut()) };
            let dpre_b = cpu(&dpre);
            linear_backward(&dev, grads, dpre_b.view(), cpu(&x).view(), cpu(&w).view(), s).unwrap();
            assert_gradient("dx", &dx.to_vec().unwrap(), &x, |x| loss(x, &w, &b));
            assert_gradient("dw", &dw.to_vec().unwrap(), &w, |w| loss(&x, w, &b));
            assert_gradient("db", &db.to_vec().unwrap(), &b, |b| loss(&x, &w, b));
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
