//! `clip-golden-v1` files (tools/golden_open_clip.py) and the parity check against them:
//! forward, backward and AdamW steps on a device (the CPU, or the GPU path), compared group by
//! group with open_clip.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use clip_pgs_host::ops::adamw::AdamW;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use clip_pgs_host::Device;

use crate::clip::Clip;
use crate::config::ClipConfig;
use crate::optimizer::Optimizer;
use crate::params::{Layout, Params};
use crate::precision::{self, Precision};
use crate::step::{StepMasks, TrainStep};

#[derive(Deserialize)]
struct Optim {
    lr: f32,
    betas: [f32; 2],
    eps: f32,
    weight_decay: f32,
    steps: usize,
}

pub struct Golden {
    pub config: ClipConfig,
    /// The config as the file gives it (open_clip's JSON).
    pub config_json: String,
    optim: Optim,
    pub params: Params,
    pub image: Vec<f32>,
    pub text: Vec<u32>,
    pub keep: Option<Vec<Vec<usize>>>,
    expected: BTreeMap<String, Vec<f32>>,
}

fn values(file: &SafeTensors, name: &str) -> Result<(Vec<usize>, Vec<f64>), String> {
    let t = file.tensor(name).map_err(|e| format!("tensor {name}: {e}"))?;
    let d = t.data();
    let v: Vec<f64> = match t.dtype() {
        Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
        Dtype::I64 => d.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
        other => return Err(format!("tensor {name} has dtype {other:?}; f32 or i64 expected")),
    };
    Ok((t.shape().to_vec(), v))
}

impl Golden {
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some("clip-golden-v1") {
            return Err(format!("{}: not a clip-golden-v1 file", path.display()));
        }
        let field = |k: &str| meta.get(k).ok_or_else(|| format!("{}: metadata {k} missing", path.display()));
        let config = ClipConfig::from_json(field("config")?).map_err(|e| e.to_string())?;
        let optim: Optim = serde_json::from_str(field("optim")?).map_err(|e| format!("metadata optim: {e}"))?;
        let mut tensors = Vec::new();
        let mut expected = BTreeMap::new();
        for name in file.names() {
            let (shape, v) = values(&file, name)?;
            if let Some(e) = name.strip_prefix("expected.") {
                expected.insert(e.to_string(), v.into_iter().map(|x| x as f32).collect());
            } else if !name.starts_with("input.") {
                tensors.push((name.to_string(), shape, v.into_iter().map(|x| x as f32).collect::<Vec<f32>>()));
            }
        }
        let layout = Layout::new(&config);
        let packed = layout.pack(tensors.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.clone())))?;
        let params = Params::from_host(&layout, &packed, &Device::Cpu)?;
        let image: Vec<f32> = values(&file, "input.image")?.1.into_iter().map(|x| x as f32).collect();
        let text: Vec<u32> = values(&file, "input.text")?.1.into_iter().map(|x| x as u32).collect();
        let keep: Option<Vec<Vec<usize>>> = match file.tensor("input.keep") {
            Ok(_) => {
                let (shape, v) = values(&file, "input.keep")?;
                Some(v.chunks(shape[1]).map(|r| r.iter().map(|&x| x as usize).collect()).collect())
            }
            Err(_) => None,
        };
        let config_json = field("config")?.clone();
        let golden = Golden { config, config_json, optim, params, image, text, keep, expected };
        Clip::new(&golden.config, &layout, false)
            .check_batch(&golden.image, &golden.text, golden.keep.as_deref())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(golden)
    }

    fn expected(&self, name: &str) -> &[f32] {
        self.expected.get(name).map_or(&[], Vec::as_slice)
    }

    /// Runs forward, backward and the AdamW steps through the trainer's step function on `device`
    /// (the CPU, or the GPU path: CUDA or the emulator); returns
    /// the report and whether every group is within tolerance (`Precision::PARITY_BOUNDS`: in
    /// f32 relative 1e-4 on features, logits, loss and losses, 1e-3 on gradients).
    pub fn check(&self, device: &Device, dtype: precision::Dtype) -> Result<(String, bool), String> {
        match dtype {
            precision::Dtype::F32 => self.check_in::<f32>(device),
            precision::Dtype::Bf16 => self.check_in::<clip_pgs_host::bf16>(device),
        }
    }

    fn check_in<T: Precision>(&self, device: &Device) -> Result<(String, bool), String> {
        let device = device.clone();
        let (tol, grad_tol) = T::PARITY_BOUNDS;
        let adamw = AdamW { beta1: self.optim.betas[0], beta2: self.optim.betas[1], eps: self.optim.eps };
        let optimizer = Optimizer::new(&self.params.layout, &device, adamw, self.optim.weight_decay)?;
        let n = self.text.len() / self.config.text_cfg.context_length;
        let params = self.params.copy_to(&device)?;
        let mut step: TrainStep<T> = TrainStep::new(device, &self.config, params, optimizer, n, 1, false)?;
        let masks = || match &self.keep {
            Some(k) => StepMasks::Lists(k),
            None => StepMasks::All,
        };
        step.forward_backward(&self.image, &self.text, masks())?;
        let out = step.output()?;
        let mut rows: Vec<(String, f32, f32, f32)> = vec![
            group("image_features", &out.image_features, self.expected("image_features"), tol),
            group("text_features", &out.text_features, self.expected("text_features"), tol),
            group("logits_per_image", &out.logits_per_image, self.expected("logits_per_image"), tol),
            group("loss", &[out.loss], self.expected("loss"), tol),
        ];
        let mut grads = step.grads.named()?;
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, _, g) in &grads {
            rows.push(group(&format!("grad.{name}"), g, self.expected(&format!("grad.{name}")), grad_tol));
        }
        let mut losses = Vec::new();
        for _ in 0..self.optim.steps {
            step.forward_backward(&self.image, &self.text, masks())?;
            losses.push(step.loss()?);
            step.grad_norm()?;
            step.update(self.optim.lr, None)?;
        }
        rows.push(group("losses", &losses, self.expected("losses"), tol));
        let mut report = format!("{:<60} {:>10} {:>10}  {}\n", "group", "max abs", "max rel", "");
        let mut ok = true;
        for (name, abs, rel, tol) in rows {
            let pass = rel <= tol;
            ok &= pass;
            let _ = writeln!(report, "{name:<60} {abs:>10.2e} {rel:>10.2e}  {}", if pass { "ok" } else { "FAIL" });
        }
        Ok((report, ok))
    }
}

/// (name, max |a − b|, max |a − b| / max |b|, tolerance); a length mismatch is infinitely wrong.
fn group(name: &str, ours: &[f32], theirs: &[f32], tolerance: f32) -> (String, f32, f32, f32) {
    if ours.len() != theirs.len() {
        return (format!("{name} (sizes {} vs {})", ours.len(), theirs.len()), f32::INFINITY, f32::INFINITY, tolerance);
    }
    let abs = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    let scale = theirs.iter().fold(0.0f32, |m, b| m.max(b.abs()));
    (name.to_string(), abs, if scale > 0.0 { abs / scale } else { abs }, tolerance)
}
