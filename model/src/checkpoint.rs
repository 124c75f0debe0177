//! Checkpoints: safetensors with open_clip's parameter names and the model-config JSON in the
//! metadata (`config`), written atomically (temporary file, fsync, rename), so open_clip's
//! `create_model(...)` + `load_state_dict` reads what this project writes and this project reads
//! open_clip's state dicts saved with `safetensors.torch.save_file`.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::config::ClipConfig;
use crate::optimizer::Optimizer;
use clip_pgs_host::Device;

use crate::params::{Layout, Params};

/// Writes `params` of `config` to `path` atomically.
pub fn save(path: &Path, config_json: &str, params: &Params) -> Result<(), String> {
    let host = params.host()?;
    write_atomic(path, tensors(params, &host, ""), [("config".to_string(), config_json.to_string())].into())
}

/// (name, shape, values) of tensors to write; the values borrow the state's host copy.
type Tensors<'a> = Vec<(String, Vec<usize>, &'a [f32])>;

/// Every tensor of `params` (values in `host`), each name after `prefix`.
fn tensors<'a>(params: &Params, host: &'a [f32], prefix: &str) -> Tensors<'a> {
    let named = params.layout.tensors.iter();
    named.map(|t| (format!("{prefix}{}", t.name), t.shape.clone(), &host[t.span.range()])).collect()
}

// safetensors stores little-endian values: the f32 bytes are written as they are in memory.
const _: () = assert!(cfg!(target_endian = "little"), "checkpoints are written from little-endian memory");

/// Tensors and metadata to `path`, streamed from memory without a copy: temporary file, fsync,
/// rename, fsync of the folder (a crash at any point leaves either no file or a whole one under
/// `path`; only `*.tmp` can be partial).
fn write_atomic(path: &Path, tensors: Tensors, mut metadata: HashMap<String, String>) -> Result<(), String> {
    let views: Vec<(String, TensorView)> = tensors
        .into_iter()
        .map(|(n, s, v)| {
            let view = TensorView::new(Dtype::F32, s, bytemuck::cast_slice(v)).map_err(|e| format!("{n}: {e}"))?;
            Ok((n, view))
        })
        .collect::<Result<_, String>>()?;
    metadata.insert("format".to_string(), "pt".to_string());
    let tmp = path.with_extension("safetensors.tmp");
    let fail = |e: &dyn std::fmt::Display| format!("writing {}: {e}", path.display());
    safetensors::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| fail(&e))?;
    let durable = || -> std::io::Result<()> {
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the folder's entry is on disk.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    };
    durable().map_err(|e| fail(&e))
}

/// A training checkpoint: the model (open_clip names), AdamW's moments as
/// `optimizer.exp_avg.<name>` / `optimizer.exp_avg_sq.<name>`, and `train_state` (JSON the
/// trainer defines: step, data position, ...) in the metadata. `load` reads its model part.
pub fn save_training(
    path: &Path,
    config_json: &str,
    params: &Params,
    optimizer: &Optimizer,
    train_state: &str,
) -> Result<(), String> {
    let step = optimizer.steps()?;
    let (p, m, v) = (params.host()?, optimizer.m.host()?, optimizer.v.host()?);
    let mut all = tensors(params, &p, "");
    all.extend(tensors(&optimizer.m, &m, "optimizer.exp_avg."));
    all.extend(tensors(&optimizer.v, &v, "optimizer.exp_avg_sq."));
    let metadata = HashMap::from([
        ("config".to_string(), config_json.to_string()),
        ("train_state".to_string(), train_state.to_string()),
        ("optimizer_step".to_string(), step.to_string()),
    ]);
    write_atomic(path, all, metadata)
}

/// What `save_training` wrote: config, model, the optimizer's (m, v, step) and the train state.
pub struct TrainingCheckpoint {
    pub config: ClipConfig,
    pub params: Params,
    pub moments: (Params, Params, u32),
    pub train_state: String,
}

pub fn load_training(path: &Path) -> Result<TrainingCheckpoint, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (config, params) = parse(path, &bytes, None)?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = metadata(&bytes);
    let field = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| format!("{}: not a training checkpoint (no {k} in the metadata)", path.display()))
    };
    let train_state = field("train_state")?;
    let step: u32 = field("optimizer_step")?.parse().map_err(|e| format!("{}: optimizer_step: {e}", path.display()))?;
    let layout = params.layout.clone();
    let moment = |prefix: &str| -> Result<Params, String> {
        let mut values = vec![0.0f32; layout.len()];
        for t in &layout.tensors {
            let key = format!("optimizer.{prefix}.{}", t.name);
            let view = file.tensor(&key).map_err(|_| format!("{}: tensor {key} is missing", path.display()))?;
            if view.shape() != t.shape.as_slice() || view.dtype() != Dtype::F32 {
                return Err(format!(
                    "{}: tensor {key} has shape {:?}, {:?} expected",
                    path.display(),
                    view.shape(),
                    t.shape
                ));
            }
            values[t.span.range()].copy_from_slice(&f32s(view.data()));
        }
        Params::from_host(&layout, &values, &Device::Cpu)
    };
    let moments = (moment("exp_avg")?, moment("exp_avg_sq")?, step);
    Ok(TrainingCheckpoint { config, params, moments, train_state })
}

fn metadata(bytes: &[u8]) -> HashMap<String, String> {
    SafeTensors::read_metadata(bytes).ok().and_then(|(_, m)| m.metadata().clone()).unwrap_or_default()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Reads a checkpoint and checks it against `config` (the file's own `config` metadata when
/// `config` is None): every tensor present, none extra, every shape right.
pub fn load(path: &Path, config: Option<&ClipConfig>) -> Result<(ClipConfig, Params), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(path, &bytes, config)
}

fn parse(path: &Path, bytes: &[u8], config: Option<&ClipConfig>) -> Result<(ClipConfig, Params), String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let config = match config {
        Some(c) => c.clone(),
        None => {
            let json = metadata(bytes).get("config").cloned();
            let json = json.ok_or_else(|| format!("{}: no config in the metadata; pass --model", path.display()))?;
            ClipConfig::from_json(&json).map_err(|e| e.to_string())?
        }
    };
    let mut tensors = Vec::new();
    for (name, view) in file.tensors() {
        let skipped = ["input.", "expected.", "optimizer."];
        if name == "attn_mask" || skipped.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        if view.dtype() != Dtype::F32 {
            return Err(format!("{}: tensor {name} is {:?}, f32 expected", path.display(), view.dtype()));
        }
        tensors.push((name, view.shape().to_vec(), f32s(view.data())));
    }
    let layout = Layout::new(&config);
    let values = layout
        .pack(tensors.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.clone())))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((config, Params::from_host(&layout, &values, &Device::Cpu)?))
}
