//! The CLIP contrastive loss, as open_clip's `ClipLoss`: features L2-normalized (F.normalize,
//! eps 1e-12), logits = e^s · img·txtᵀ, loss = (CE(logits, diag) + CE(logitsᵀ, diag)) / 2; one
//! call gives the loss, the logits, both feature gradients and the logit scale's gradient.

use cudarc::driver::LaunchConfig;

use clip_pgs_kernels::clip_loss as kernel;

use super::check::OpCheck;
use super::dtype::Activation;
use super::matmul::{Batch, Mat, gpu_matmul};
use crate::cublaslt::Epilogue as Lt;
use crate::device::Device;
use crate::error::Result;
use crate::launch::grid_stride_config;
use crate::view::{View, ViewMut};

/// What the loss writes.
pub struct ClipLossOut<'a, T> {
    /// [1].
    pub loss: ViewMut<'a, f32>,
    /// logits_per_image [B, B].
    pub logits: ViewMut<'a, f32>,
    /// [B, E] each.
    pub d_image: ViewMut<'a, T>,
    pub d_text: ViewMut<'a, T>,
    /// [1].
    pub d_logit_scale: ViewMut<'a, f32>,
}

/// Elements (f32) of the workspace `clip_loss` needs for a batch of `batch` features of `dim`:
/// the unit features, their norms, the logits' gradient and (GPU) the rows' and columns'
/// log-sum-exps, the scale gradient's parts and one feature gradient at the unit features (the
/// f32 product the normalization's backward reads: cuBLASLt multiplies f32 operands into f32
/// only).
pub fn clip_loss_workspace(batch: usize, dim: usize) -> usize {
    3 * batch * dim + 5 * batch + batch * batch
}

/// Writes the unit vectors of the rows of x into `unit`, their norms into `norms`.
fn normalize(unit: &mut [f32], norms: &mut [f32], x: &[f32], dim: usize) {
    for ((u, norm), row) in unit.chunks_mut(dim).zip(norms.iter_mut()).zip(x.chunks(dim)) {
        *norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        u.iter_mut().zip(row).for_each(|(u, v)| *u = v / *norm);
    }
}

/// Loss and gradients for image and text features [B, E] and the log logit scale [1].
#[allow(clippy::too_many_arguments)]
pub fn clip_loss<T: Activation>(
    device: &Device,
    out: ClipLossOut<T>,
    image: View<T>,
    text: View<T>,
    logit_scale: View<f32>,
    workspace: ViewMut<f32>,
    batch: usize,
    dim: usize,
) -> Result<()> {
    let op = OpCheck::new("clip_loss", device);
    let (b, e) = (batch, dim);
    let features = || format!("[B {b}, E {e}]");
    op.size("image", image.len(), b * e, features)?;
    op.size("text", text.len(), b * e, features)?;
    op.size("d_image", out.d_image.len(), b * e, features)?;
    op.size("d_text", out.d_text.len(), b * e, features)?;
    op.size("logits", out.logits.len(), b * b, || format!("[B {b}, B {b}]"))?;
    for (name, len) in
        [("loss", out.loss.len()), ("d_logit_scale", out.d_logit_scale.len()), ("logit_scale", logit_scale.len())]
    {
        op.size(name, len, 1, || "[1]".into())?;
    }
    op.size("workspace", workspace.len(), clip_loss_workspace(b, e), || format!("clip_loss_workspace({b}, {e})"))?;
    if !matches!(device, Device::Cpu) {
        let (image, text, scale) =
            (op.gpu("image", image)?, op.gpu("text", text)?, op.gpu("logit_scale", logit_scale)?);
        return gpu_clip_loss(device, out, image, text, scale, op.gpu_mut("workspace", workspace)?, b, e);
    }
    let (image, text, logit_scale) =
        (op.cpu_f32("image", image)?, op.cpu_f32("text", text)?, op.cpu("logit_scale", logit_scale)?);
    let (loss_out, logits) = (op.cpu_mut("loss", out.loss)?, op.cpu_mut("logits", out.logits)?);
    let (d_img, d_txt) = (op.cpu_f32_mut("d_image", out.d_image)?, op.cpu_f32_mut("d_text", out.d_text)?);
    let d_logit_scale = op.cpu_mut("d_logit_scale", out.d_logit_scale)?;
    let workspace = op.cpu_mut("workspace", workspace)?;
    let (img, rest) = workspace.split_at_mut(b * e);
    let (txt, rest) = rest.split_at_mut(b * e);
    let (img_norm, rest) = rest.split_at_mut(b);
    let (txt_norm, rest) = rest.split_at_mut(b);
    let dlogits = &mut rest[..b * b];
    normalize(img, img_norm, image, e);
    normalize(txt, txt_norm, text, e);
    let scale = logit_scale[0].exp();
    for i in 0..b {
        for j in 0..b {
            let dot: f32 = img[i * e..(i + 1) * e].iter().zip(&txt[j * e..(j + 1) * e]).map(|(a, b)| a * b).sum();
            logits[i * b + j] = scale * dot;
        }
    }
    // Softmax over rows (image→text) and over columns (text→image); dL/dlogits = (P_row + P_colᵀ
    // − 2I) / (2B).
    dlogits.fill(0.0);
    let mut loss = 0.0f32;
    for transpose in [false, true] {
        for i in 0..b {
            let at = |j: usize| if transpose { j * b + i } else { i * b + j };
            let max = (0..b).map(|j| logits[at(j)]).fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = (0..b).map(|j| (logits[at(j)] - max).exp()).sum();
            loss += (max + total.ln() - logits[at(i)]) / (2 * b) as f32;
            for j in 0..b {
                let p = (logits[at(j)] - max).exp() / total;
                dlogits[at(j)] += (p - if i == j { 1.0 } else { 0.0 }) / (2 * b) as f32;
            }
        }
    }
    loss_out[0] = loss;
    d_logit_scale[0] = dlogits.iter().zip(logits.iter()).map(|(g, l)| g * l).sum();
    // Through the product, then through the normalization: dx = (dn − n·(n·dn)) / ‖x‖.
    d_img.fill(0.0);
    d_txt.fill(0.0);
    for i in 0..b {
        for j in 0..b {
            let g = scale * dlogits[i * b + j];
            for k in 0..e {
                d_img[i * e + k] += g * txt[j * e + k];
                d_txt[j * e + k] += g * img[i * e + k];
            }
        }
    }
    let through_norm = |d: &mut [f32], n: &[f32], norms: &[f32]| {
        for ((d, n), norm) in d.chunks_mut(e).zip(n.chunks(e)).zip(norms) {
            let dot: f32 = d.iter().zip(n).map(|(a, b)| a * b).sum();
            d.iter_mut().zip(n).for_each(|(g, n)| *g = (*g - n * dot) / norm);
        }
    };
    through_norm(d_img, img, img_norm);
    through_norm(d_txt, txt, txt_norm);
    Ok(())
}

/// The GPU path (`kernels/src/clip_loss.rs` describes the passes).
#[allow(clippy::too_many_arguments)]
fn gpu_clip_loss<T: Activation>(
    device: &Device,
    out: ClipLossOut<T>,
    image: View<T>,
    text: View<T>,
    scale: View<f32>,
    workspace: ViewMut<f32>,
    b: usize,
    e: usize,
) -> Result<()> {
    let (mut img, rest) = workspace.split_at(b * e);
    let (mut txt, rest) = rest.split_at(b * e);
    let (mut img_norm, rest) = rest.split_at(b);
    let (mut txt_norm, rest) = rest.split_at(b);
    let (mut grad, rest) = rest.split_at(b * b);
    let (mut row_lse, rest) = rest.split_at(b);
    let (mut col_lse, rest) = rest.split_at(b);
    let (mut parts, mut d_unit) = rest.split_at(b);
    let ClipLossOut { loss, mut logits, d_image, d_text, d_logit_scale } = out;
    let (bu, eu) = (b as u32, e as u32);
    let rows = |n: usize| LaunchConfig {
        grid_dim: (n.div_ceil((kernel::THREADS / 32) as usize).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (kernel::THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY (every launch): the views have the sizes checked by `clip_loss` and carved above.
    unsafe {
        device.launch(&T::L2_NORMALIZE, rows(b), (img.reborrow(), img_norm.reborrow(), image, bu, eu))?;
        device.launch(&T::L2_NORMALIZE, rows(b), (txt.reborrow(), txt_norm.reborrow(), text, bu, eu))?;
    }
    let (img_m, txt_m) = (Mat::new(img.as_view(), b, e), Mat::new(txt.as_view(), b, e));
    gpu_matmul(device, Mat::new(logits.reborrow(), b, b), img_m, txt_m.t(), false, Batch::ONE, Lt::Default)?;
    // SAFETY: as above.
    unsafe {
        device.launch(&kernel::clip_logits_rows_f32, rows(b), (logits.reborrow(), row_lse.reborrow(), scale, bu))?;
        device.launch(
            &kernel::clip_logits_cols_f32,
            grid_stride_config(b, kernel::THREADS),
            (col_lse.reborrow(), logits.as_view(), bu),
        )?;
        let args =
            (grad.reborrow(), parts.reborrow(), logits.as_view(), row_lse.as_view(), col_lse.as_view(), scale, bu);
        device.launch(&kernel::clip_loss_grad_f32, rows(b), args)?;
        let args = (loss, d_logit_scale, parts.as_view(), logits.as_view(), row_lse.as_view(), col_lse.as_view(), bu);
        device.launch(&kernel::clip_loss_total_f32, grid_stride_config(1, kernel::THREADS), args)?;
    }
    // Each feature gradient: the f32 product at the unit features into `d_unit`, then through
    // the normalization into T.
    let g = Mat::new(grad.as_view(), b, b);
    for (d, g, other, unit, norms) in [
        (d_image, g, txt_m, img.as_view(), img_norm.as_view()),
        (d_text, g.t(), img_m, txt.as_view(), txt_norm.as_view()),
    ] {
        gpu_matmul(device, Mat::new(d_unit.reborrow(), b, e), g, other, false, Batch::ONE, Lt::Default)?;
        let args = (d, d_unit.as_view(), unit, norms, bu, eu);
        // SAFETY: as above.
        unsafe { device.launch(&T::L2_NORMALIZE_BACKWARD, rows(b), args)? };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gradient, values};
    use super::*;
    use crate::buffer::Buffer;

    /// (loss, d_image, d_text, d_logit_scale).
    fn run(img: &[f32], txt: &[f32], s: f32, b: usize, e: usize) -> (f32, Vec<f32>, Vec<f32>, f32) {
        let zeros = |n: usize| Buffer::Cpu(vec![0.0f32; n]);
        let (mut loss, mut logits, mut di, mut dt, mut ds, mut ws) =
            (zeros(1), zeros(b * b), zeros(b * e), zeros(b * e), zeros(1), zeros(clip_loss_workspace(b, e)));
        let (ib, tb, sb) = (Buffer::Cpu(img.to_vec()), Buffer::Cpu(txt.to_vec()), Buffer::Cpu(vec![s]));
        let out = ClipLossOut {
            loss: loss.view_mut(),
            logits: logits.view_mut(),
            d_image: di.view_mut(),
            d_text: dt.view_mut(),
            d_logit_scale: ds.view_mut(),
        };
        clip_loss(&Device::Cpu, out, ib.view(), tb.view(), sb.view(), ws.view_mut(), b, e).unwrap();
        (loss.to_vec().unwrap()[0], di.to_vec().unwrap(), dt.to_vec().unwrap(), ds.to_vec().unwrap()[0])
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (b, e, s) = (4, 3, 0.7f32);
        let (img, txt) = (values(b * e, 1), values(b * e, 2));
        let (_, d_img, d_txt, d_s) = run(&img, &txt, s, b, e);
        assert_gradient("d_image", &d_img, &img, |x| run(x, &txt, s, b, e).0);
        assert_gradient("d_text", &d_txt, &txt, |x| run(&img, x, s, b, e).0);
        assert_gradient("d_logit_scale", &[d_s], &[s], |x| run(&img, &txt, x[0], b, e).0);
    }

    #[test]
    fn perfectly_aligned_features_give_a_low_loss() {
        let (b, e) = (3, 3);
        let eye: Vec<f32> = (0..9).map(|i| if i % 4 == 0 { 1.0 } else { 0.0 }).collect();
        assert!(run(&eye, &eye, 100f32.ln(), b, e).0 < 1e-6);
        assert!((run(&eye, &eye, 0.0, b, e).0 - (1.0f32 + 2.0 * (-1.0f32).exp()).ln()).abs() < 1e-5);
    }
}
