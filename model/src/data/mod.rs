//! Data sources: image–caption pairs for training and evaluation, chosen by `--data SPEC`:
//! - `shapes` (embedded, procedural: coloured shapes on textured backgrounds, `shapes.rs`);
//! - `fashion-mnist[:DIR]` (the IDX files, captions from class names, `fashion_mnist.rs`);
//! - `csv:FILE` (image path and caption columns, open_clip's `--csv-*` keys, `csv.rs`);
//! - `wds:SHARDS` (webdataset tar shards with brace expansion, `wds.rs`).
//!
//! Every source is indexable (sample i of n), so an epoch's order is a seeded permutation, the
//! data position is one integer, and resuming reproduces the uninterrupted run; data-parallel
//! ranks divide each epoch by sample or, for `wds`, by shard (`share.rs`). Decoding happens
//! in `get`, in the loader's workers (`loader.rs`); a corrupt sample is an `Err`, skipped and
//! counted there, never a panic.

pub mod csv;
pub mod fashion_mnist;
pub mod loader;
pub mod shapes;
pub mod share;
pub mod wds;

use std::ops::Range;

use image::RgbImage;

/// The most pixels per side, and bytes in all, that decoding one image may claim: a corrupt or
/// hostile header announcing 65535 × 65535 pixels is an error, not a 12 GiB allocation. (PIL,
/// which open_clip uses, refuses images over 179 M pixels; 16384² RGB is 805 MB, so the byte
/// limit, 256 MiB, is the one that binds.)
const MAX_IMAGE_SIDE: u32 = 16384;
const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// Decodes PNG, JPEG or WebP bytes (format from the magic bytes) to RGB within the limits above.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, String> {
    let mut reader =
        image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    reader.limits(limits);
    Ok(reader.decode().map_err(|e| e.to_string())?.to_rgb8())
}

/// One decoded pair; `label` is the class index for sources with classes.
#[derive(Clone, Debug)]
pub struct Sample {
    pub image: RgbImage,
    pub caption: String,
    pub label: Option<usize>,
}

/// Class names and prompt templates (`{}` stands for the class name) for zero-shot evaluation.
#[derive(Clone, Debug)]
pub struct Classes {
    pub names: Vec<String>,
    pub templates: Vec<String>,
}

impl Classes {
    /// Every prompt of class `c`.
    pub fn prompts(&self, c: usize) -> Vec<String> {
        self.templates.iter().map(|t| t.replace("{}", &self.names[c])).collect()
    }
}

/// Which part of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    /// Held out from training: evaluation.
    Eval,
}

/// A finite, indexable source of samples.
pub trait Source: Send + Sync {
    /// What the source is, for logs ("shapes (train, 20000 samples)").
    fn describe(&self) -> String;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sample `i` (< len), decoded; Err(reason) for a corrupt sample.
    fn get(&self, i: usize) -> Result<Sample, String>;
    /// Class names and templates, where the source has classes.
    fn classes(&self) -> Option<&Classes> {
        None
    }
    /// Hard-negative captions of sample `i` (kind, caption) for the compositionality test, where
    /// the source knows what its images compose (`shapes`).
    fn hard_negatives(&self, _i: usize) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// The samples of each shard, for a source stored in shards that data-parallel ranks read
    /// whole (`wds`; `share.rs`); None: the ranks split it by sample.
    fn shards(&self) -> Option<Vec<Range<usize>>> {
        None
    }
}

/// Options the file-based sources read (open_clip's names).
#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub csv_img_key: String,
    pub csv_caption_key: String,
    pub csv_separator: u8,
    /// Seed of procedural sources (`shapes`).
    pub seed: u64,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions { csv_img_key: "filepath".into(), csv_caption_key: "title".into(), csv_separator: b'\t', seed: 0 }
    }
}

/// Opens the source `spec` names (see the module comment). An unusable source (no such file, no
/// samples, missing columns) is an error naming what is wrong, before any training starts.
pub fn open(spec: &str, split: Split, options: &SourceOptions) -> Result<Box<dyn Source>, String> {
    let source: Box<dyn Source> = match spec.split_once(':') {
        None if spec == "shapes" => Box::new(shapes::Shapes::new(split, options.seed)),
        None if spec == "fashion-mnist" => Box::new(fashion_mnist::FashionMnist::open(None, split)?),
        Some(("fashion-mnist", dir)) => Box::new(fashion_mnist::FashionMnist::open(Some(dir), split)?),
        Some(("csv", file)) => Box::new(csv::CsvSource::open(file, options)?),
        Some(("wds", shards)) => Box::new(wds::WdsSource::open(shards)?),
        _ => {
            return Err(format!(
                "unknown data source {spec:?}: use shapes, fashion-mnist[:DIR], csv:FILE or wds:SHARDS"
            ));
        }
    };
    if source.is_empty() {
        return Err(format!("data source {spec:?} has no samples"));
    }
    Ok(source)
}
