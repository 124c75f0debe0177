//! Multi-head self-attention core on the CPU: from the fused projection qkv [B, S, 3D] (q, k, v
//! in that order, head h in columns h·hd..(h+1)·hd of each, as PyTorch's `in_proj`) to the
//! heads' outputs [B, S, D] (before `out_proj`). Keys are masked causally (text tower) and/or
//! beyond each sequence's length (key padding of PGS-masked images); probabilities are kept for
//! the backward pass.

use rayon::prelude::*;

use super::matmul::{MatRef, matmul};

#[derive(Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

impl AttentionShape {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Copies head h of part `part` (0 q, 1 k, 2 v) of one sequence's qkv into a [S, hd] matrix.
fn head(qkv: &[f32], s: AttentionShape, part: usize, h: usize) -> Vec<f32> {
    let d = s.width();
    (0..s.seq).flat_map(|i| qkv[i * 3 * d + part * d + h * s.head_dim..][..s.head_dim].iter().copied()).collect()
}

/// out [B, S, D] and probs [B, H, S, S]. `lengths[b]` valid keys of sequence b (None: all).
pub fn attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    qkv: &[f32],
    lengths: Option<&[usize]>,
    s: AttentionShape,
) {
    let (d, seq, hd) = (s.width(), s.seq, s.head_dim);
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(seq * d).zip(probs.par_chunks_mut(s.heads * seq * seq)).enumerate().for_each(
        |(b, (out, probs))| {
            let qkv = &qkv[b * seq * 3 * d..(b + 1) * seq * 3 * d];
            let valid = lengths.map_or(seq, |l| l[b]);
            for h in 0..s.heads {
                let (q, k, v) = (head(qkv, s, 0, h), head(qkv, s, 1, h), head(qkv, s, 2, h));
                let p = &mut probs[h * seq * seq..(h + 1) * seq * seq];
                matmul(p, MatRef::new(&q, seq, hd), MatRef::new(&k, seq, hd).t(), false);
                for i in 0..seq {
                    let row = &mut p[i * seq..(i + 1) * seq];
                    let visible = |j: usize| j < valid && (!s.causal || j <= i);
                    let max =
                        (0..seq).filter(|&j| visible(j)).map(|j| row[j] * scale).fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0.0f32;
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = if visible(j) { (*v * scale - max).exp() } else { 0.0 };
                        total += *v;
                    }
                    row.iter_mut().for_each(|v| *v /= total);
                }
                let mut o = vec![0.0f32; seq * hd];
                matmul(&mut o, MatRef::new(p, seq, seq), MatRef::new(&v, seq, hd), false);
                for i in 0..seq {
                    out[i * d + h * hd..i * d + (h + 1) * hd].copy_from_slice(&o[i * hd..(i + 1) * hd]);
                }
            }
        },
    );
}

/// dqkv [B, S, 3D] (overwritten) from dout [B, S, D].
pub fn attention_backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], probs: &[f32], s: AttentionShape) {
    let (d, seq, hd) = (s.width(), s.seq, s.head_dim);
    let scale = 1.0 / (hd as f32).sqrt();
    dqkv.par_chunks_mut(seq * 3 * d).enumerate().for_each(|(b, dqkv)| {
        let qkv = &qkv[b * seq * 3 * d..(b + 1) * seq * 3 * d];
        for h in 0..s.heads {
            let (q, k, v) = (head(qkv, s, 0, h), head(qkv, s, 1, h), head(qkv, s, 2, h));
            let p = &probs[(b * s.heads + h) * seq * seq..][..seq * seq];
            let dout_h: Vec<f32> =
                (0..seq).flat_map(|i| dout[(b * seq + i) * d + h * hd..][..hd].iter().copied()).collect();
            let mut dv = vec![0.0f32; seq * hd];
            matmul(&mut dv, MatRef::new(p, seq, seq).t(), MatRef::new(&dout_h, seq, hd), false);
            let mut dp = vec![0.0f32; seq * seq];
            matmul(&mut dp, MatRef::new(&dout_h, seq, hd), MatRef::new(&v, seq, hd).t(), false);
            // Softmax backward, then the 1/sqrt(hd) of the scores.
            for i in 0..seq {
                let (pr, dr) = (&p[i * seq..(i + 1) * seq], &mut dp[i * seq..(i + 1) * seq]);
                let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                dr.iter_mut().zip(pr).for_each(|(g, p)| *g = p * (*g - dot) * scale);
            }
            let (mut dq, mut dk) = (vec![0.0f32; seq * hd], vec![0.0f32; seq * hd]);
            matmul(&mut dq, MatRef::new(&dp, seq, seq), MatRef::new(&k, seq, hd), false);
            matmul(&mut dk, MatRef::new(&dp, seq, seq).t(), MatRef::new(&q, seq, hd), false);
            for i in 0..seq {
                for (part, g) in [(0, &dq), (1, &dk), (2, &dv)] {
                    dqkv[i * 3 * d + part * d + h * hd..][..hd].copy_from_slice(&g[i * hd..(i + 1) * hd]);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gradient, values};
    use super::*;

    fn loss(qkv: &[f32], dout: &[f32], lengths: Option<&[usize]>, s: AttentionShape) -> f32 {
        let mut out = vec![0.0; s.batch * s.seq * s.width()];
        let mut probs = vec![0.0; s.batch * s.heads * s.seq * s.seq];
        attention_forward(&mut out, &mut probs, qkv, lengths, s);
        out.iter().zip(dout).map(|(a, b)| a * b).sum()
    }

    #[test]
    fn backward_matches_finite_differences_causal_and_padded() {
        for (causal, lengths) in [(true, None), (false, Some(vec![3usize, 5]))] {
            let s = AttentionShape { batch: 2, seq: 5, heads: 2, head_dim: 3, causal };
            let qkv = values(s.batch * s.seq * 3 * s.width(), 1);
            let dout = values(s.batch * s.seq * s.width(), 2);
            let mut out = vec![0.0; dout.len()];
            let mut probs = vec![0.0; s.batch * s.heads * s.seq * s.seq];
            attention_forward(&mut out, &mut probs, &qkv, lengths.as_deref(), s);
            let mut dqkv = vec![0.0; qkv.len()];
            attention_backward(&mut dqkv, &dout, &qkv, &probs, s);
            assert_gradient("dqkv", &dqkv, &qkv, |x| loss(x, &dout, lengths.as_deref(), s));
        }
    }

    #[test]
    fn masked_keys_get_no_weight() {
        let s = AttentionShape { batch: 1, seq: 4, heads: 1, head_dim: 2, causal: true };
        let qkv = values(4 * 6, 3);
        let (mut out, mut probs) = (vec![0.0; 8], vec![0.0; 16]);
        attention_forward(&mut out, &mut probs, &qkv, Some(&[3]), s);
        for i in 0..4 {
            let row = &probs[i * 4..(i + 1) * 4];
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert!(row.iter().enumerate().all(|(j, &p)| (j <= i && j < 3) || p == 0.0), "row {i}: {row:?}");
        }
    }
}
