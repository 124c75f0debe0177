//! CLIP model configuration in open_clip's model-config JSON format (`embed_dim`, `vision_cfg`,
//! `text_cfg`), with open_clip's defaults for the fields a config leaves out. Built in: ViT-B-16,
//! ViT-B-32, ViT-S-16 (open_clip's files, MIT) and `test-tiny` for tests.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct VisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub layers: usize,
    #[serde(default = "default_head_width")]
    pub head_width: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct TextConfig {
    #[serde(default = "default_context_length")]
    pub context_length: usize,
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct ClipConfig {
    pub embed_dim: usize,
    pub vision_cfg: VisionConfig,
    pub text_cfg: TextConfig,
}

fn default_head_width() -> usize {
    64
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_context_length() -> usize {
    77
}
fn default_vocab_size() -> usize {
    49408
}

/// Every key a config may have, nested as in the file: a built-in config serialized with all
/// its fields (defaults included), so the list cannot drift from the structs above.
fn known_keys() -> serde_json::Value {
    let tiny: ClipConfig = serde_json::from_str(include_str!("../configs/test-tiny.json")).expect("a built-in config");
    serde_json::to_value(tiny).expect("a config serializes")
}

/// Errs on the first key of `value` that `known` lacks, naming the closest known key.
fn check_keys(value: &serde_json::Value, known: &serde_json::Value, path: &str) -> Result<(), ConfigError> {
    let (Some(object), Some(known)) = (value.as_object(), known.as_object()) else { return Ok(()) };
    for (key, v) in object {
        let full = format!("{path}{key}");
        match known.get(key) {
            Some(k) => check_keys(v, k, &format!("{full}."))?,
            None => {
                let closest = known.keys().min_by_key(|k| strsim::levenshtein(key, k)).map(String::as_str);
                return Err(ConfigError(format!(
                    "unknown key {full:?}{}",
                    closest.map_or(String::new(), |c| format!(" (did you mean {:?}?)", format!("{path}{c}")))
                )));
            }
        }
    }
    Ok(())
}

/// A config that could not be read or does not describe a model, and why.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "model config: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

const BUILT_IN: [(&str, &str); 6] = [
    ("ViT-B-16", include_str!("../configs/ViT-B-16.json")),
    ("ViT-B-32", include_str!("../configs/ViT-B-32.json")),
    ("ViT-S-16", include_str!("../configs/ViT-S-16.json")),
    ("test-tiny", include_str!("../configs/test-tiny.json")),
    // The trainer's small models: `shapes` at 64×64 (L = 64) and Fashion-MNIST at 28×28 (L = 49).
    ("shapes-tiny", include_str!("../configs/shapes-tiny.json")),
    ("fmnist-tiny", include_str!("../configs/fmnist-tiny.json")),
];

impl ClipConfig {
    /// A built-in config by name, or a JSON file (`--model CONFIG|FILE.json`).
    pub fn load(name_or_path: &str) -> Result<Self, ConfigError> {
        if let Some((_, json)) = BUILT_IN.iter().find(|(name, _)| *name == name_or_path) {
            return Self::from_json(json);
        }
        let path = Path::new(name_or_path);
        if path.extension().is_some_and(|e| e == "json") || path.exists() {
            let json = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            return Self::from_json(&json).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)));
        }
        let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
        Err(ConfigError(format!(
            "unknown model '{name_or_path}': expected one of {} or a .json file",
            names.join(", ")
        )))
    }

    /// Parses and validates a config. A key this project does not know is an error naming the
    /// closest known one: a typo (`mlp_ratoi`) must not leave a default in place silently.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| ConfigError(e.to_string()))?;
        check_keys(&value, &known_keys(), "")?;
        let config: ClipConfig = serde_json::from_value(value).map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the sizes fit together, naming the field that does not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (v, t) = (&self.vision_cfg, &self.text_cfg);
        let positive = [
            ("embed_dim", self.embed_dim),
            ("vision_cfg.image_size", v.image_size),
            ("vision_cfg.patch_size", v.patch_size),
            ("vision_cfg.width", v.width),
            ("vision_cfg.layers", v.layers),
            ("vision_cfg.head_width", v.head_width),
            ("text_cfg.context_length", t.context_length),
            ("text_cfg.vocab_size", t.vocab_size),
            ("text_cfg.width", t.width),
            ("text_cfg.heads", t.heads),
            ("text_cfg.layers", t.layers),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError(format!("{field} is 0")));
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return Err(ConfigError(format!(
                "vision_cfg.patch_size {} does not divide vision_cfg.image_size {}",
                v.patch_size, v.image_size
            )));
        }
        if !v.width.is_multiple_of(v.head_width) {
            return Err(ConfigError(format!(
                "vision_cfg.head_width {} does not divide vision_cfg.width {}",
                v.head_width, v.width
            )));
        }
        if !t.width.is_multiple_of(t.heads) {
            return Err(ConfigError(format!("text_cfg.heads {} does not divide text_cfg.width {}", t.heads, t.width)));
        }
        for (field, ratio) in [("vision_cfg.mlp_ratio", v.mlp_ratio), ("text_cfg.mlp_ratio", t.mlp_ratio)] {
            if !(ratio > 0.0 && ratio.is_finite()) {
                return Err(ConfigError(format!("{field} {ratio} is not a positive number")));
            }
        }
        Ok(())
    }

    /// Patches per image, L.
    pub fn patches(&self) -> usize {
        (self.vision_cfg.image_size / self.vision_cfg.patch_size).pow(2)
    }

    pub fn vision_heads(&self) -> usize {
        self.vision_cfg.width / self.vision_cfg.head_width
    }

    /// MLP hidden width of the image tower (open_clip: int(width · mlp_ratio)).
    pub fn vision_mlp_width(&self) -> usize {
        (self.vision_cfg.width as f64 * self.vision_cfg.mlp_ratio) as usize
    }

    pub fn text_mlp_width(&self) -> usize {
        (self.text_cfg.width as f64 * self.text_cfg.mlp_ratio) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_configs_load_with_open_clip_defaults() {
        let b16 = ClipConfig::load("ViT-B-16").unwrap();
        assert_eq!(
            (b16.embed_dim, b16.vision_cfg.width, b16.vision_cfg.head_width, b16.patches()),
            (512, 768, 64, 196)
        );
        assert_eq!((b16.vision_heads(), b16.vision_mlp_width(), b16.text_cfg.heads), (12, 3072, 8));
        assert_eq!(ClipConfig::load("ViT-B-32").unwrap().patches(), 49);
        assert_eq!(ClipConfig::load("ViT-S-16").unwrap().vision_heads(), 6);
        assert_eq!(ClipConfig::load("test-tiny").unwrap().patches(), 16);
    }

    #[test]
    fn inconsistent_configs_are_errors_naming_the_field() {
        let tiny = include_str!("../configs/test-tiny.json");
        let broken = |from: &str, to: &str| ClipConfig::from_json(&tiny.replace(from, to)).unwrap_err().to_string();
        assert!(broken("\"patch_size\": 8", "\"patch_size\": 5").contains("vision_cfg.patch_size 5 does not divide"));
        assert!(broken("\"head_width\": 16", "\"head_width\": 10").contains("vision_cfg.head_width 10"));
        assert!(broken("\"heads\": 2", "\"heads\": 3").contains("text_cfg.heads 3"));
        assert!(
            broken("\"layers\": 2,\n        \"width\": 48", "\"layers\": 0,\n        \"width\": 48")
                .contains("vision_cfg.layers is 0")
        );
        assert!(broken("\"embed_dim\": 32", "\"embed_dim\": \"x\"").contains("invalid type"));
        // Misspelt keys, optional or required, are named with the key meant.
        assert_eq!(
            broken("\"head_width\": 16", "\"head_width\": 16, \"mlp_ratoi\": 2"),
            "model config: unknown key \"vision_cfg.mlp_ratoi\" (did you mean \"vision_cfg.mlp_ratio\"?)"
        );
        assert_eq!(
            broken("\"head_width\"", "\"head_widht\""),
            "model config: unknown key \"vision_cfg.head_widht\" (did you mean \"vision_cfg.head_width\"?)"
        );
        assert!(
            broken("\"embed_dim\"", "\"embed_dims\"")
                .contains("unknown key \"embed_dims\" (did you mean \"embed_dim\"?)")
        );
        assert!(ClipConfig::load("ViT-Z-99").unwrap_err().to_string().contains("unknown model 'ViT-Z-99'"));
        assert!(ClipConfig::load("/no/such.json").unwrap_err().to_string().contains("/no/such.json"));
    }
}
