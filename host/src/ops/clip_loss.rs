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
use crate::error::{Error, Result};
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
    let out = HostLossOut {
        loss: &mut op.cpu_mut("loss", out.loss)?[0],
        logits: op.cpu_mut("logits", out.logits)?,
        d_image: op.cpu_f32_mut("d_image", out.d_image)?,
        d_text: op.cpu_f32_mut("d_text", out.d_text)?,
        d_logit_scale: &mut op.cpu_mut("d_logit_scale", out.d_logit_scale)?[0],
    };
    cpu_clip_loss(out, image, text, logit_scale[0], op.cpu_mut("workspace", workspace)?, e, 0..b);
    Ok(())
}

/// What the CPU loss writes, in host memory.
pub struct HostLossOut<'a> {
    pub loss: &'a mut f32,
    /// [B, B].
    pub logits: &'a mut [f32],
    /// [B, E] each.
    pub d_image: &'a mut [f32],
    pub d_text: &'a mut [f32],
    pub d_logit_scale: &'a mut f32,
}

/// open_clip's loss with `local_loss` (data-parallel training, on the host): only the samples
/// `local` of the gathered batch (one rank's) are scored, each image against every text and each
/// text against every image; the loss is their mean, and the gradients reach every sample's
/// features. `local` = 0..B is the whole batch's loss.
pub fn clip_loss_local(
    out: HostLossOut,
    image: &[f32],
    text: &[f32],
    logit_scale: f32,
    workspace: &mut [f32],
    dim: usize,
    local: std::ops::Range<usize>,
) -> Result<()> {
    let b = image.len() / dim.max(1);
    let check = |name: &str, len: usize, want: usize| {
        if len == want {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "clip_loss_local: {name} has {len} values, [B {b}, E {dim}] needs {want}"
            )))
        }
    };
    check("image", image.len(), b * dim)?;
    check("text", text.len(), b * dim)?;
    check("d_image", out.d_image.len(), b * dim)?;
    check("d_text", out.d_text.len(), b * dim)?;
    check("logits", out.logits.len(), b * b)?;
    check("workspace", workspace.len(), clip_loss_workspace(b, dim))?;
    if local.is_empty() || local.end > b {
        return Err(Error::InvalidArgument(format!(
            "clip_loss_local: samples {local:?} are not within a batch of {b}"
        )));
    }
    cpu_clip_loss(out, image, text, logit_scale, workspace, dim, local);
    Ok(())
}

/// The CPU reference over checked sizes: rows and columns `local` of the logits scored.
fn cpu_clip_loss(
    out: HostLossOut,
    image: &[f32],
    text: &[f32],
    logit_scale: f32,
    workspace: &mut [f32],
    e: usize,
    local: std::ops::Range<usize>,
) {
    let b = image.len() / e;
    let HostLossOut { loss: loss_out, logits, d_image: d_img, d_text: d_txt, d_logit_scale } = out;
    let (img, rest) = workspace.split_at_mut(b * e);
    let (txt, rest) = rest.split_at_mut(b * e);
    let (img_norm, rest) = rest.split_at_mut(b);
    let (txt_norm, rest) = rest.split_at_mut(b);
    let dlogits = &mut rest[..b * b];
    normalize(img, img_norm, image, e);
    normalize(txt, txt_norm, text, e);
    let scale = logit_scale.exp();
    for i in 0..b {
        for j in 0..b {
            let dot: f32 = img[i * e..(i + 1) * e].iter().zip(&txt[j * e..(j + 1) * e]).map(|(a, b)| a * b).sum();
            logits[i * b + j] = scale * dot;
        }
    }
    // Softmax over the scored rows (image→text) and columns (text→image); dL/dlogits = (P_row +
    // P_colᵀ − 2I) / (2n) on them, n the samples scored.
    dlogits.fill(0.0);
    let mut loss = 0.0f32;
    let scored = (2 * local.len()) as f32;
    for transpose in [false, true] {
        for i in local.clone() {
            let at = |j: usize| if transpose { j * b + i } else { i * b + j };
            let max = (0..b).map(|j| logits[at(j)]).fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = (0..b).map(|j| (logits[at(j)] - max).exp()).sum();
            loss += (max + total.ln() - logits[at(i)]) / scored;
            for j in 0..b {
                let p = (logits[at(j)] - max).exp() / total;
                dlogits[at(j)] += (p - if i == j { 1.0 } else { 0.0 }) / scored;
            }
        }
    }
    *loss_out = loss;
    *d_logit_scale = dlogits.iter().zip(logits.iter()).map(|(g, l)| g * l).sum();
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

    /// (loss, d_image, d_text, d_logit_scale) of `clip_loss_local`.
    fn run_local(
        img: &[f32],
        txt: &[f32],
        s: f32,
        e: usize,
        local: std::ops::Range<usize>,
    ) -> (f32, Vec<f32>, Vec<f32>, f32) {
        let b = img.len() / e;
        let (mut loss, mut ds, mut logits) = (0.0, 0.0, vec![0.0; b * b]);
        let (mut di, mut dt, mut ws) = (vec![0.0; b * e], vec![0.0; b * e], vec![0.0; clip_loss_workspace(b, e)]);
        let out = HostLossOut {
            loss: &mut loss,
            logits: &mut logits,
            d_image: &mut di,
            d_text: &mut dt,
            d_logit_scale: &mut ds,
        };
        clip_loss_local(out, img, txt, s, &mut ws, e, local).unwrap();
        (loss, di, dt, ds)
    }

    /// open_clip's `local_loss`: each part's loss has the finite-difference gradients, and the
    /// parts' mean is the whole batch's loss and gradients (what N ranks average).
    #[test]
    fn local_losses_average_to_the_whole_batch_loss() {
        let (b, e, s) = (6, 3, 0.7f32);
        let (img, txt) = (values(b * e, 1), values(b * e, 2));
        let whole = run(&img, &txt, s, b, e);
        let (a, c) = (run_local(&img, &txt, s, e, 0..3), run_local(&img, &txt, s, e, 3..6));
        assert!(((a.0 + c.0) / 2.0 - whole.0).abs() <= 1e-6 * whole.0, "{} {} vs {}", a.0, c.0, whole.0);
        assert!(((a.3 + c.3) / 2.0 - whole.3).abs() <= 1e-6);
        for (parts, all) in [((&a.1, &c.1), &whole.1), ((&a.2, &c.2), &whole.2)] {
            for ((x, y), w) in parts.0.iter().zip(parts.1).zip(all) {
                assert!(((x + y) / 2.0 - w).abs() <= 1e-6, "{x} + {y} vs {w}");
            }
        }
        assert_gradient("d_image", &a.1, &img, |x| run_local(x, &txt, s, e, 0..3).0);
        assert_gradient("d_text", &c.2, &txt, |x| run_local(&img, x, s, e, 3..6).0);
        let bad = clip_loss_local(
            HostLossOut {
                loss: &mut 0.0,
                logits: &mut [0.0; 36],
                d_image: &mut [0.0; 18],
                d_text: &mut [0.0; 18],
                d_logit_scale: &mut 0.0,
            },
            &img,
            &txt,
            s,
            &mut vec![0.0; clip_loss_workspace(b, e)],
            e,
            4..9,
        );
        assert!(bad.unwrap_err().to_string().contains("samples 4..9 are not within a batch of 6"));
    }

    #[test]
    fn perfectly_aligned_features_give_a_low_loss() {
        let (b, e) = (3, 3);
        let eye: Vec<f32> = (0..9).map(|i| if i % 4 == 0 { 1.0 } else { 0.0 }).collect();
        assert!(run(&eye, &eye, 100f32.ln(), b, e).0 < 1e-6);
        assert!((run(&eye, &eye, 0.0, b, e).0 - (1.0f32 + 2.0 * (-1.0f32).exp()).ln()).abs() < 1e-5);
    }
}
