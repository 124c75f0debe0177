//! The model state as flat buffers (as llm.c keeps it): parameters, gradients and AdamW's moments
//! are each one buffer on the model's device, laid out by one `Layout` built from the config:
//! open_clip's `state_dict()` names, shapes and offsets. The weight-decay group comes first and
//! the no-decay group after it, so the optimizer updates each group as one span. `Weights` holds
//! the spans the model reads, by role, so no op call looks a name up.

use std::collections::HashMap;
use std::sync::Arc;

use clip_pgs_host::{Buffer, Device, Span};

use crate::config::ClipConfig;

/// One named tensor of the layout.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub span: Span,
}

/// Where every parameter lives in the flat buffers.
#[derive(Debug, PartialEq)]
pub struct Layout {
    /// In buffer order: the decay group, then the no-decay group, each sorted by name.
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    /// The tensors AdamW decays, and those it does not (open_clip's groups).
    pub decay: Span,
    pub no_decay: Span,
}

/// open_clip's `exclude`: p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in the name.
pub fn decays(name: &str, dims: usize) -> bool {
    !(dims < 2 || ["bn", "ln", "bias", "logit_scale"].iter().any(|k| name.contains(k)))
}

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
    for (prefix, width, mlp, layers) in towers(cfg) {
        for i in 0..layers {
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
                out.push((format!("{prefix}.resblocks.{i}.{name}"), shape));
            }
        }
    }
    out
}

/// (name prefix, width, MLP width, layers) of the image and the text tower.
fn towers(cfg: &ClipConfig) -> [(&'static str, usize, usize, usize); 2] {
    let (v, t) = (&cfg.vision_cfg, &cfg.text_cfg);
    [
        ("visual.transformer", v.width, cfg.vision_mlp_width(), v.layers),
        ("transformer", t.width, cfg.text_mlp_width(), t.layers),
    ]
}

impl Layout {
    pub fn new(cfg: &ClipConfig) -> Arc<Layout> {
        let mut named = shapes(cfg);
        named.sort_by(|a, b| (!decays(&a.0, a.1.len()), &a.0).cmp(&(!decays(&b.0, b.1.len()), &b.0)));
        let mut offset = 0;
        let mut decay_end = 0;
        let tensors: Vec<TensorInfo> = named
            .into_iter()
            .map(|(name, shape)| {
                let len = shape.iter().product();
                let span = Span::new(offset, len);
                offset += len;
                if decays(&name, shape.len()) {
                    decay_end = offset;
                }
                TensorInfo { name, shape, span }
            })
            .collect();
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Arc::new(Layout {
            tensors,
            index,
            decay: Span::new(0, decay_end),
            no_decay: Span::new(decay_end, offset - decay_end),
        })
    }

    /// Values in all tensors.
    pub fn len(&self) -> usize {
        self.no_decay.end()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The span of a tensor the config defines (a name `shapes` lists).
    pub fn span(&self, name: &str) -> Span {
        self.get(name).unwrap_or_else(|| panic!("parameter {name} is not in the layout")).span
    }

    /// Checks named tensors against this layout (every tensor present, none extra, every shape
    /// right) and packs them into one host buffer.
    pub fn pack<'a>(
        &self,
        named: impl IntoIterator<Item = (&'a str, &'a [usize], Vec<f32>)>,
    ) -> Result<Vec<f32>, String> {
        let mut data = vec![0.0f32; self.len()];
        let mut seen = vec![false; self.tensors.len()];
        for (name, shape, values) in named {
            let Some(&i) = self.index.get(name) else {
                return Err(format!("tensor {name} is not a parameter of this config"));
            };
            let t = &self.tensors[i];
            if shape != t.shape.as_slice() {
                return Err(format!("tensor {name} has shape {shape:?}, the config needs {:?}", t.shape));
            }
            if values.len() != t.span.len {
                return Err(format!("tensor {name} has {} values for shape {shape:?}", values.len()));
            }
            data[t.span.range()].copy_from_slice(&values);
            seen[i] = true;
        }
        match seen.iter().position(|s| !s) {
            Some(i) => Err(format!("tensor {} is missing", self.tensors[i].name)),
            None => Ok(data),
        }
    }
}

/// (name, shape, values) of tensors, on the host.
pub type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// A model's parameters (or any tensor set of the same layout: gradients, moments) on a device.
pub struct Params {
    pub layout: Arc<Layout>,
    pub data: Buffer<f32>,
}

impl Params {
    /// All zeros on `device`.
    pub fn zeros(layout: &Arc<Layout>, device: &Device) -> Result<Params, String> {
        let data = device.alloc_zeros(layout.len(), "the model state").map_err(|e| e.to_string())?;
        Ok(Params { layout: layout.clone(), data })
    }

    /// Host values in layout order, copied onto `device`.
    pub fn from_host(layout: &Arc<Layout>, values: &[f32], device: &Device) -> Result<Params, String> {
        assert_eq!(values.len(), layout.len(), "values for the whole layout");
        Ok(Params { layout: layout.clone(), data: device.upload(values).map_err(|e| e.to_string())? })
    }

    /// All values, on the host, in layout order.
    pub fn to_host(&self) -> Result<Vec<f32>, String> {
        self.data.to_vec().map_err(|e| e.to_string())
    }

    /// All values in layout order on the host: borrowed where the device's memory is the host's.
    pub fn host(&self) -> Result<std::borrow::Cow<'_, [f32]>, String> {
        match &self.data {
            Buffer::Cpu(v) | Buffer::Emu(v) => Ok(std::borrow::Cow::Borrowed(v)),
            Buffer::Cuda(_) => Ok(std::borrow::Cow::Owned(self.to_host()?)),
        }
    }

    /// One tensor's values, copied to the host (tests, logging, checkpoints).
    pub fn get(&self, name: &str) -> Result<Vec<f32>, String> {
        let span = self.layout.span(name);
        let mut values = vec![0.0; span.len];
        self.data.read(span, &mut values).map_err(|e| e.to_string())?;
        Ok(values)
    }

    /// (name, shape, values) of every tensor, in layout order.
    pub fn named(&self) -> Result<NamedTensors, String> {
        let host = self.to_host()?;
        Ok(self
            .layout
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), host[t.span.range()].to_vec()))
            .collect())
    }

    /// The same values on `device`.
    pub fn copy_to(&self, device: &Device) -> Result<Params, String> {
        Params::from_host(&self.layout, &self.to_host()?, device)
    }
}

impl PartialEq for Params {
    fn eq(&self, other: &Self) -> bool {
        self.layout == other.layout && self.to_host().ok() == other.to_host().ok()
    }
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Params({} tensors, {} values on {})",
            self.layout.tensors.len(),
            self.layout.len(),
            self.data.device_name()
        )
    }
}

/// A layer norm's parameters.
#[derive(Clone, Copy, Debug)]
pub struct NormWeights {
    pub weight: Span,
    pub bias: Span,
}

/// One residual block's parameters.
#[derive(Clone, Copy, Debug)]
pub struct BlockWeights {
    pub ln_1: NormWeights,
    pub in_proj_weight: Span,
    pub in_proj_bias: Span,
    pub out_proj_weight: Span,
    pub out_proj_bias: Span,
    pub ln_2: NormWeights,
    pub c_fc_weight: Span,
    pub c_fc_bias: Span,
    pub c_proj_weight: Span,
    pub c_proj_bias: Span,
}

/// Every parameter the model reads, by role: spans of the layout, looked up once.
#[derive(Clone, Debug)]
pub struct Weights {
    pub class_embedding: Span,
    pub visual_positional_embedding: Span,
    pub conv1: Span,
    pub ln_pre: NormWeights,
    pub visual_blocks: Vec<BlockWeights>,
    pub ln_post: NormWeights,
    pub visual_proj: Span,
    pub token_embedding: Span,
    pub positional_embedding: Span,
    pub text_blocks: Vec<BlockWeights>,
    pub ln_final: NormWeights,
    pub text_projection: Span,
    pub logit_scale: Span,
}

impl Weights {
    pub fn new(cfg: &ClipConfig, layout: &Layout) -> Weights {
        let s = |name: &str| layout.span(name);
        let norm = |p: &str| NormWeights { weight: s(&format!("{p}.weight")), bias: s(&format!("{p}.bias")) };
        let blocks = |prefix: &str, layers: usize| -> Vec<BlockWeights> {
            (0..layers)
                .map(|i| {
                    let n = |x: &str| format!("{prefix}.resblocks.{i}.{x}");
                    BlockWeights {
                        ln_1: norm(&n("ln_1")),
                        in_proj_weight: s(&n("attn.in_proj_weight")),
                        in_proj_bias: s(&n("attn.in_proj_bias")),
                        out_proj_weight: s(&n("attn.out_proj.weight")),
                        out_proj_bias: s(&n("attn.out_proj.bias")),
                        ln_2: norm(&n("ln_2")),
                        c_fc_weight: s(&n("mlp.c_fc.weight")),
                        c_fc_bias: s(&n("mlp.c_fc.bias")),
                        c_proj_weight: s(&n("mlp.c_proj.weight")),
                        c_proj_bias: s(&n("mlp.c_proj.bias")),
                    }
                })
                .collect()
        };
        let [(vision, ..), (text, ..)] = towers(cfg);
        Weights {
            class_embedding: s("visual.class_embedding"),
            visual_positional_embedding: s("visual.positional_embedding"),
            conv1: s("visual.conv1.weight"),
            ln_pre: norm("visual.ln_pre"),
            visual_blocks: blocks(vision, cfg.vision_cfg.layers),
            ln_post: norm("visual.ln_post"),
            visual_proj: s("visual.proj"),
            token_embedding: s("token_embedding.weight"),
            positional_embedding: s("positional_embedding"),
            text_blocks: blocks(text, cfg.text_cfg.layers),
            ln_final: norm("ln_final"),
            text_projection: s("text_projection"),
            logit_scale: s("logit_scale"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_puts_the_decay_group_first_and_packs_checked_tensors() {
        let cfg = ClipConfig::load("test-tiny").unwrap();
        let layout = Layout::new(&cfg);
        assert_eq!(layout.len(), shapes(&cfg).iter().map(|(_, s)| s.iter().product::<usize>()).sum::<usize>());
        for t in &layout.tensors {
            let in_decay = t.span.end() <= layout.decay.end();
            assert_eq!(in_decay, decays(&t.name, t.shape.len()), "{}", t.name);
        }
        let named: Vec<(String, Vec<usize>)> = shapes(&cfg);
        let values = |s: &[usize]| vec![1.0f32; s.iter().product()];
        assert!(layout.pack(named.iter().map(|(n, s)| (n.as_str(), s.as_slice(), values(s)))).is_ok());
        let missing = layout.pack(named.iter().skip(1).map(|(n, s)| (n.as_str(), s.as_slice(), values(s))));
        assert!(missing.unwrap_err().contains("tensor visual.class_embedding is missing"));
    }
}
