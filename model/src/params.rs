//! Named parameter tensors under open_clip's `state_dict()` names, f32 on the CPU.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::config::ClipConfig;

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }
}

/// Every parameter of a CLIP model, by open_clip name.
#[derive(Clone, Debug, PartialEq)]
pub struct Params(pub BTreeMap<String, Tensor>);

impl Params {
    /// The names and shapes open_clip gives a model of this config.
    pub fn shapes(cfg: &ClipConfig) -> Vec<(String, Vec<usize>)> {
        let (v, t) = (&cfg.vision_cfg, &cfg.text_cfg);
        let mut out: Vec<(String, Vec<usize>)> = vec![
            ("visual.class_embedding".into(), vec![v.width]),
            ("visual.positional_embedding".into(), vec![cfg.patches() + 1, v.width]),
            ("visual.proj".into(), vec![v.width, cfg.embed_dim]),
            ("visual.conv1.weight".into(), vec![v.width, 3, v.patch_size, v.patch_size]),
            ("visual.ln_pre.weight".into(), vec![v.width]),
            ("visual.ln_pre.bias".into(), vec![v.width]),
            ("visual.ln_post.weight".into(), vec![v.width]),
            ("visual.ln_post.bias".into(), vec![v.width]),
            ("positional_embedding".into(), vec![t.context_length, t.width]),
            ("text_projection".into(), vec![t.width, cfg.embed_dim]),
            ("logit_scale".into(), vec![]),
            ("token_embedding.weight".into(), vec![t.vocab_size, t.width]),
            ("ln_final.weight".into(), vec![t.width]),
            ("ln_final.bias".into(), vec![t.width]),
        ];
        let blocks = [
            ("visual.transformer", v.width, cfg.vision_mlp_width(), v.layers),
            ("transformer", t.width, cfg.text_mlp_width(), t.layers),
        ];
        for (prefix, width, mlp, layers) in blocks {
            for i in 0..layers {
                let p = format!("{prefix}.resblocks.{i}");
                for (name, shape) in [
                    ("ln_1.weight", vec![width]),
                    ("ln_1.bias", vec![width]),
                    ("attn.in_proj_weight", vec![3 * width, width]),
                    ("attn.in_proj_bias", vec![3 * width]),
                    ("attn.out_proj.weight", vec![width, width]),
                    ("attn.out_proj.bias", vec![width]),
                    ("ln_2.weight", vec![width]),
                    ("ln_2.bias", vec![width]),
                    ("mlp.c_fc.weight", vec![mlp, width]),
                    ("mlp.c_fc.bias", vec![mlp]),
                    ("mlp.c_proj.weight", vec![width, mlp]),
                    ("mlp.c_proj.bias", vec![width]),
                ] {
                    out.push((format!("{p}.{name}"), shape));
                }
            }
        }
        out
    }

    /// All parameters zero (the layout for gradients).
    pub fn zeros(cfg: &ClipConfig) -> Self {
        Params(Self::shapes(cfg).into_iter().map(|(n, s)| (n, Tensor::zeros(&s))).collect())
    }

    /// Every value 0, in place (gradients reused across steps).
    pub fn set_zero(&mut self) {
        self.0.values_mut().for_each(|t| t.data.par_iter_mut().for_each(|x| *x = 0.0));
    }

    /// Parameter `name`; the model asks only for names `shapes` lists.
    pub fn get(&self, name: &str) -> &[f32] {
        &self.0.get(name).unwrap_or_else(|| panic!("parameter {name} missing")).data
    }

    pub fn get_mut(&mut self, name: &str) -> &mut [f32] {
        &mut self.0.get_mut(name).unwrap_or_else(|| panic!("parameter {name} missing")).data
    }

    /// Two different parameters, both mutable (a layer's weight and bias gradients).
    pub fn pair_mut(&mut self, a: &str, b: &str) -> (&mut [f32], &mut [f32]) {
        assert_ne!(a, b, "pair_mut needs two different parameters");
        let (mut first, mut second) = (None, None);
        for (name, t) in self.0.iter_mut() {
            if name == a {
                first = Some(&mut t.data[..]);
            } else if name == b {
                second = Some(&mut t.data[..]);
            }
        }
        let missing = |n: &str| panic!("parameter {n} missing");
        (first.unwrap_or_else(|| missing(a)), second.unwrap_or_else(|| missing(b)))
    }

    /// Checks that `self` has exactly the parameters of `cfg`, shaped as open_clip shapes them.
    pub fn check(&self, cfg: &ClipConfig) -> Result<(), String> {
        let want = Self::shapes(cfg);
        for (name, shape) in &want {
            match self.0.get(name) {
                None => return Err(format!("tensor {name} is missing")),
                Some(t) if &t.shape != shape => {
                    return Err(format!("tensor {name} has shape {:?}, the config needs {shape:?}", t.shape));
                }
                Some(t) if t.data.len() != shape.iter().product::<usize>() => {
                    return Err(format!("tensor {name} has {} values for shape {shape:?}", t.data.len()));
                }
                _ => {}
            }
        }
        if let Some(extra) = self.0.keys().find(|k| !want.iter().any(|(n, _)| n == *k)) {
            return Err(format!("tensor {extra} is not a parameter of this config"));
        }
        Ok(())
    }
}
