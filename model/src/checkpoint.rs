//! Checkpoints: safetensors with open_clip's parameter names and the model-config JSON in the
//! metadata (`config`), written atomically (temporary file, fsync, rename), so open_clip's
//! `create_model(...)` + `load_state_dict` reads what this project writes and this project reads
//! open_clip's state dicts saved with `safetensors.torch.save_file`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::config::ClipConfig;
use crate::params::{Params, Tensor};

/// Writes `params` of `config` to `path` atomically.
pub fn save(path: &Path, config_json: &str, params: &Params) -> Result<(), String> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = params
        .0
        .iter()
        .map(|(n, t)| (n.clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape.clone()))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, b, s)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| format!("{n}: {e}"))?)))
        .collect::<Result<_, String>>()?;
    let metadata =
        HashMap::from([("format".to_string(), "pt".to_string()), ("config".to_string(), config_json.to_string())]);
    let data = safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("safetensors.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Reads a checkpoint and checks it against `config` (the file's own `config` metadata when
/// `config` is None): every tensor present, none extra, every shape right.
pub fn load(path: &Path, config: Option<&ClipConfig>) -> Result<(ClipConfig, Params), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let config = match config {
        Some(c) => c.clone(),
        None => {
            let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
            let json = meta.metadata().as_ref().and_then(|m| m.get("config").cloned());
            let json = json.ok_or_else(|| format!("{}: no config in the metadata; pass --model", path.display()))?;
            ClipConfig::from_json(&json).map_err(|e| e.to_string())?
        }
    };
    let mut params = Params(Default::default());
    for (name, view) in file.tensors() {
        if name == "attn_mask" || name.starts_with("input.") || name.starts_with("expected.") {
            continue;
        }
        if view.dtype() != Dtype::F32 {
            return Err(format!("{}: tensor {name} is {:?}, f32 expected", path.display(), view.dtype()));
        }
        let data = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        params.0.insert(name, Tensor { shape: view.shape().to_vec(), data });
    }
    params.check(&config).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((config, params))
}
