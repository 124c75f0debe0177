//! Parameter initialisation as open_clip initialises a fresh model (`create_model(..., pretrained=None)`):
//! - text tower (`CLIP.init_parameters`): token embedding N(0, 0.02²), positional N(0, 0.01²);
//!   per block in_proj N(0, w⁻¹), out_proj and c_proj N(0, w⁻¹/(2·layers)), c_fc N(0, 1/(2w));
//!   text_projection N(0, w⁻¹); biases 0 (open_clip zeroes in_proj_bias, out_proj.bias; the MLP
//!   biases keep torch's U(±1/√fan_in));
//! - image tower: class/positional embedding and proj N(0, w⁻¹); every block keeps PyTorch's module
//!   defaults (in_proj Xavier-uniform, Linear weights and biases U(±1/√fan_in)), conv1 U(±1/√fan_in);
//! - layer norms weight 1, bias 0; logit scale ln(1/0.07).
//!
//! Draws come from Philox (seed, tensor index), so a model is a pure function of its seed.

use clip_pgs_kernels::philox::Philox;

use crate::config::ClipConfig;
use clip_pgs_host::Device;

use crate::params::{Layout, Params, TensorInfo};

/// How one tensor is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    Normal(f32),
    Uniform(f32),
    Constant(f32),
}

fn rule(cfg: &ClipConfig, name: &str, shape: &[usize]) -> Init {
    let (v, t) = (&cfg.vision_cfg, &cfg.text_cfg);
    let fan_in = shape.iter().skip(1).product::<usize>().max(1) as f32;
    let last = name.rsplit('.').next().unwrap_or(name);
    if name == "logit_scale" {
        return Init::Constant((1.0f32 / 0.07).ln());
    }
    if name.contains(".ln_") || name.starts_with("ln_final") {
        return Init::Constant(if last == "weight" { 1.0 } else { 0.0 });
    }
    if name.starts_with("visual.") {
        let scale = (v.width as f32).powf(-0.5);
        return match name {
            "visual.class_embedding" | "visual.positional_embedding" | "visual.proj" => Init::Normal(scale),
            _ if name.ends_with("in_proj_weight") => Init::Uniform((6.0 / (shape[0] + shape[1]) as f32).sqrt()),
            _ if name.ends_with("in_proj_bias") || name.ends_with("out_proj.bias") => Init::Constant(0.0),
            // Linear biases draw from the weight's fan-in: the weight is [out, in], the bias [out].
            _ if last == "bias" => Init::Uniform(1.0 / (v.width as f32 * mlp_or_1(name, cfg)).sqrt()),
            _ => Init::Uniform(1.0 / fan_in.sqrt()),
        };
    }
    let w = t.width as f32;
    let proj_std = w.powf(-0.5) * (2.0 * t.layers as f32).powf(-0.5);
    match name {
        "token_embedding.weight" => Init::Normal(0.02),
        "positional_embedding" => Init::Normal(0.01),
        "text_projection" => Init::Normal(w.powf(-0.5)),
        _ if name.ends_with("in_proj_weight") => Init::Normal(w.powf(-0.5)),
        _ if name.ends_with("out_proj.weight") || name.ends_with("c_proj.weight") => Init::Normal(proj_std),
        _ if name.ends_with("c_fc.weight") => Init::Normal((2.0 * w).powf(-0.5)),
        _ if name.ends_with("in_proj_bias") || name.ends_with("out_proj.bias") => Init::Constant(0.0),
        _ if last == "bias" => Init::Uniform(1.0 / (w * mlp_or_1(name, cfg)).sqrt()),
        _ => Init::Uniform(1.0 / fan_in.sqrt()),
    }
}

/// c_proj's fan-in is the MLP width; c_fc's is the model width.
fn mlp_or_1(name: &str, cfg: &ClipConfig) -> f32 {
    if !name.ends_with("c_proj.bias") {
        return 1.0;
    }
    if name.starts_with("visual.") {
        cfg.vision_mlp_width() as f32 / cfg.vision_cfg.width as f32
    } else {
        cfg.text_mlp_width() as f32 / cfg.text_cfg.width as f32
    }
}

impl Params {
    /// A freshly initialised model on `device`, deterministic in `seed`. Tensor i of the names in
    /// alphabetical order draws from Philox stream (seed, i): the layout's order does not matter.
    pub fn init(cfg: &ClipConfig, seed: u64, device: &Device) -> Result<Params, String> {
        let layout = Layout::new(cfg);
        let mut values = vec![0.0f32; layout.len()];
        let mut names: Vec<&TensorInfo> = layout.tensors.iter().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        for (index, tensor) in names.into_iter().enumerate() {
            let rng = Philox::new(seed, 0x1417, index as u32);
            let draw = rule(cfg, &tensor.name, &tensor.shape);
            for (i, x) in values[tensor.span.range()].iter_mut().enumerate() {
                *x = match draw {
                    Init::Constant(c) => c,
                    Init::Uniform(bound) => bound * (2.0 * rng.uniform(i as u32) - 1.0),
                    Init::Normal(std) => std * standard_normal(&rng, i as u32),
                };
            }
        }
        Params::from_host(&layout, &values, device)
    }
}

/// Box-Muller over draws 2i and 2i + 1 of the stream.
pub fn standard_normal(rng: &Philox, i: u32) -> f32 {
    let (u1, u2) = (rng.uniform(2 * i), rng.uniform(2 * i + 1));
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std_of(x: &[f32]) -> f32 {
        let mean = x.iter().sum::<f32>() / x.len() as f32;
        (x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / x.len() as f32).sqrt()
    }

    #[test]
    fn follows_open_clip_scales_and_is_deterministic() {
        let cfg = ClipConfig::load("test-tiny").unwrap();
        let init = |seed| Params::init(&cfg, seed, &Device::Cpu).unwrap();
        let p = init(7);
        assert_eq!(p, init(7));
        assert_ne!(p, init(8));
        let std = std_of(&p.get("token_embedding.weight").unwrap());
        assert!((std - 0.02).abs() < 0.001, "token embedding std {std}");
        let w = cfg.text_cfg.width as f32;
        let std = std_of(&p.get("transformer.resblocks.0.attn.in_proj_weight").unwrap());
        assert!((std - w.powf(-0.5)).abs() < 0.02 * w.powf(-0.5) * 5.0, "in_proj std {std}");
        // conv1: U(±1/√fan_in) has std 1/√(3·fan_in).
        let fan_in = (3 * cfg.vision_cfg.patch_size.pow(2)) as f32;
        let std = std_of(&p.get("visual.conv1.weight").unwrap());
        assert!((std - (3.0 * fan_in).powf(-0.5)).abs() < 0.1 * (3.0 * fan_in).powf(-0.5), "conv1 std {std}");
        assert!(p.get("visual.ln_pre.weight").unwrap().iter().all(|&x| x == 1.0));
        assert!(p.get("transformer.resblocks.1.attn.in_proj_bias").unwrap().iter().all(|&x| x == 0.0));
        assert!((p.get("logit_scale").unwrap()[0] - 2.6593).abs() < 1e-4);
    }
}
