//! The CLIP contrastive loss on the CPU, as open_clip's `ClipLoss`: features L2-normalized
//! (F.normalize, eps 1e-12), logits = e^s · img·txtᵀ, loss = (CE(logits, diag) + CE(logitsᵀ,
//! diag)) / 2, with the gradients for the features and the logit scale s.

/// What the forward pass returns and the backward pass needs.
pub struct ClipLossOutput {
    pub loss: f32,
    /// logits_per_image [B, B].
    pub logits: Vec<f32>,
    pub d_image: Vec<f32>,
    pub d_text: Vec<f32>,
    pub d_logit_scale: f32,
}

fn normalize(x: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>) {
    let mut n = x.to_vec();
    let mut norms = Vec::new();
    for row in n.chunks_mut(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
        norms.push(norm);
    }
    (n, norms)
}

/// Loss and gradients for image and text features [B, E] and the log logit scale.
pub fn clip_loss(image: &[f32], text: &[f32], logit_scale: f32, batch: usize, dim: usize) -> ClipLossOutput {
    let ((img, img_norm), (txt, txt_norm)) = (normalize(image, dim), normalize(text, dim));
    let scale = logit_scale.exp();
    let mut logits = vec![0.0f32; batch * batch];
    for i in 0..batch {
        for j in 0..batch {
            let dot: f32 =
                img[i * dim..(i + 1) * dim].iter().zip(&txt[j * dim..(j + 1) * dim]).map(|(a, b)| a * b).sum();
            logits[i * batch + j] = scale * dot;
        }
    }
    // Softmax over rows (image→text) and over columns (text→image); dL/dlogits = (P_row + P_colᵀ
    // − 2I) / (2B).
    let mut dlogits = vec![0.0f32; batch * batch];
    let mut loss = 0.0f32;
    for transpose in [false, true] {
        for i in 0..batch {
            let at = |j: usize| if transpose { j * batch + i } else { i * batch + j };
            let max = (0..batch).map(|j| logits[at(j)]).fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = (0..batch).map(|j| (logits[at(j)] - max).exp()).sum();
            loss += (max + total.ln() - logits[at(i)]) / (2 * batch) as f32;
            for j in 0..batch {
                let p = (logits[at(j)] - max).exp() / total;
                dlogits[at(j)] += (p - if i == j { 1.0 } else { 0.0 }) / (2 * batch) as f32;
            }
        }
    }
    let d_logit_scale = dlogits.iter().zip(&logits).map(|(g, l)| g * l).sum();
    // Through the product, then through the normalization: dx = (dn − n·(n·dn)) / ‖x‖.
    let mut d_img = vec![0.0f32; batch * dim];
    let mut d_txt = vec![0.0f32; batch * dim];
    for i in 0..batch {
        for j in 0..batch {
            let g = scale * dlogits[i * batch + j];
            for k in 0..dim {
                d_img[i * dim + k] += g * txt[j * dim + k];
                d_txt[j * dim + k] += g * img[i * dim + k];
            }
        }
    }
    let through_norm = |d: &mut [f32], n: &[f32], norms: &[f32]| {
        for ((d, n), norm) in d.chunks_mut(dim).zip(n.chunks(dim)).zip(norms) {
            let dot: f32 = d.iter().zip(n).map(|(a, b)| a * b).sum();
            d.iter_mut().zip(n).for_each(|(g, n)| *g = (*g - n * dot) / norm);
        }
    };
    through_norm(&mut d_img, &img, &img_norm);
    through_norm(&mut d_txt, &txt, &txt_norm);
    ClipLossOutput { loss, logits, d_image: d_img, d_text: d_txt, d_logit_scale }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gradient, values};
    use super::*;

    #[test]
    fn gradients_match_finite_differences() {
        let (b, e, s) = (4, 3, 0.7f32);
        let (img, txt) = (values(b * e, 1), values(b * e, 2));
        let out = clip_loss(&img, &txt, s, b, e);
        assert_gradient("d_image", &out.d_image, &img, |x| clip_loss(x, &txt, s, b, e).loss);
        assert_gradient("d_text", &out.d_text, &txt, |x| clip_loss(&img, x, s, b, e).loss);
        assert_gradient("d_logit_scale", &[out.d_logit_scale], &[s], |x| clip_loss(&img, &txt, x[0], b, e).loss);
    }

    #[test]
    fn perfectly_aligned_features_give_a_low_loss() {
        let (b, e) = (3, 3);
        let eye: Vec<f32> = (0..9).map(|i| if i % 4 == 0 { 1.0 } else { 0.0 }).collect();
        let out = clip_loss(&eye, &eye, 100f32.ln(), b, e);
        assert!(out.loss < 1e-6, "{}", out.loss);
        assert!((clip_loss(&eye, &eye, 0.0, b, e).loss - (1.0f32 + 2.0 * (-1.0f32).exp()).ln()).abs() < 1e-5);
    }
}
