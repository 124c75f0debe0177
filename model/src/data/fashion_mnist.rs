//! Fashion-MNIST from its IDX files (gzip), as Debian's `dataset-fashion-mnist` installs them:
//! 28×28 grey images of ten clothing classes. A small real data set with classes, so zero-shot
//! evaluation has something to measure; captions are the class names in prompt templates.
//!
//! The decoded bytes stay in memory (47 MB for the training split), so `get` is a copy.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use image::RgbImage;

use super::{Classes, Sample, Source, Split};

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Class names in label order, lower-case as CLIP's zero-shot prompts use them.
pub const CLASS_NAMES: [&str; 10] =
    ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"];

/// Prompt templates in open_clip's style; training captions cycle through them so the text tower
/// sees the same phrasings zero-shot evaluation uses.
pub const TEMPLATES: [&str; 8] = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
];

/// IDX magic numbers: unsigned bytes, 3 dimensions (images) or 1 (labels).
const IMAGES_MAGIC: u32 = 2051;
const LABELS_MAGIC: u32 = 2049;
/// Image side in pixels.
pub const SIDE: usize = 28;

/// One split of Fashion-MNIST, decoded into memory.
pub struct FashionMnist {
    dir: PathBuf,
    split: Split,
    /// `len * SIDE * SIDE` grey bytes, row-major per image.
    pixels: Vec<u8>,
    /// One class index (< 10) per image.
    labels: Vec<u8>,
    classes: Classes,
}

impl FashionMnist {
    /// Reads and validates the split's two files from `dir` (default [`DEFAULT_DIR`]).
    pub fn open(dir: Option<&str>, split: Split) -> Result<FashionMnist, String> {
        let dir = PathBuf::from(dir.unwrap_or(DEFAULT_DIR));
        let prefix = match split {
            Split::Train => "train",
            Split::Eval => "t10k",
        };
        let images_path = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
        let labels_path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
        for path in [&images_path, &labels_path] {
            if !path.is_file() {
                return Err(format!(
                    "fashion-mnist: {} not found: install the Debian package dataset-fashion-mnist or pass \
                     fashion-mnist:DIR",
                    path.display()
                ));
            }
        }
        let (n_images, pixels) = parse_images(&images_path, &read_gz(&images_path)?)?;
        let labels = parse_labels(&labels_path, &read_gz(&labels_path)?)?;
        if labels.len() != n_images {
            return Err(format!(
                "fashion-mnist: {} has {} labels but {} has {n_images} images",
                labels_path.display(),
                labels.len(),
                images_path.display()
            ));
        }
        Ok(FashionMnist { dir, split, pixels, labels, classes: classes() })
    }

    /// The class index of sample `i`, without decoding the image.
    pub fn label(&self, i: usize) -> Option<usize> {
        self.labels.get(i).map(|&l| l as usize)
    }
}

/// The ten classes with [`TEMPLATES`].
pub fn classes() -> Classes {
    Classes {
        names: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        templates: TEMPLATES.iter().map(|s| s.to_string()).collect(),
    }
}

/// The whole decompressed file.
fn read_gz(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("fashion-mnist: {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("fashion-mnist: {}: not a readable gzip file: {e}", path.display()))?;
    Ok(bytes)
}

/// The big-endian u32 header words of an IDX file: magic, then one size per dimension.
fn header(path: &Path, bytes: &[u8], magic: u32, dims: usize) -> Result<Vec<usize>, String> {
    let words: Vec<u32> =
        bytes.chunks_exact(4).take(1 + dims).map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]])).collect();
    if words.len() < 1 + dims {
        return Err(format!("fashion-mnist: {}: {} bytes is too short for an IDX header", path.display(), bytes.len()));
    }
    if words[0] != magic {
        return Err(format!(
            "fashion-mnist: {}: magic number {} is not {magic} (not an IDX {} file)",
            path.display(),
            words[0],
            if magic == IMAGES_MAGIC { "images" } else { "labels" }
        ));
    }
    Ok(words[1..].iter().map(|&w| w as usize).collect())
}

/// The body of an IDX file after `header_len` bytes, which must hold exactly `count` bytes.
fn body<'a>(path: &Path, bytes: &'a [u8], header_len: usize, count: Option<usize>) -> Result<&'a [u8], String> {
    let body = &bytes[header_len..];
    match count {
        Some(n) if n == body.len() => Ok(body),
        Some(n) => Err(format!(
            "fashion-mnist: {}: the header promises {n} data bytes but the file has {}",
            path.display(),
            body.len()
        )),
        None => Err(format!("fashion-mnist: {}: the header's sizes overflow", path.display())),
    }
}

/// (image count, pixels) of an images file; images must be 28×28.
fn parse_images(path: &Path, bytes: &[u8]) -> Result<(usize, Vec<u8>), String> {
    let dims = header(path, bytes, IMAGES_MAGIC, 3)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if (rows, cols) != (SIDE, SIDE) {
        return Err(format!("fashion-mnist: {}: images are {rows}×{cols}, not {SIDE}×{SIDE}", path.display()));
    }
    let pixels = body(path, bytes, 16, n.checked_mul(SIDE * SIDE))?;
    Ok((n, pixels.to_vec()))
}

/// The labels of a labels file; every label must be a class (< 10).
fn parse_labels(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let dims = header(path, bytes, LABELS_MAGIC, 1)?;
    let labels = body(path, bytes, 8, Some(dims[0]))?;
    if let Some(i) = labels.iter().position(|&l| l as usize >= CLASS_NAMES.len()) {
        return Err(format!(
            "fashion-mnist: {}: label {i} is {}, not a class (0..{})",
            path.display(),
            labels[i],
            CLASS_NAMES.len()
        ));
    }
    Ok(labels.to_vec())
}

impl Source for FashionMnist {
    fn describe(&self) -> String {
        let split = match self.split {
            Split::Train => "train",
            Split::Eval => "eval",
        };
        format!("fashion-mnist ({split}, {} samples, {})", self.labels.len(), self.dir.display())
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn get(&self, i: usize) -> Result<Sample, String> {
        let label = self.label(i).ok_or_else(|| format!("fashion-mnist: sample {i} out of range ({})", self.len()))?;
        let grey = &self.pixels[i * SIDE * SIDE..(i + 1) * SIDE * SIDE];
        let rgb: Vec<u8> = grey.iter().flat_map(|&g| [g, g, g]).collect();
        let image = RgbImage::from_raw(SIDE as u32, SIDE as u32, rgb)
            .ok_or_else(|| format!("fashion-mnist: sample {i}: image buffer has the wrong size"))?;
        let templates = &self.classes.templates;
        let caption = templates[i % templates.len()].replace("{}", &self.classes.names[label]);
        Ok(Sample { image, caption, label: Some(label) })
    }

    fn classes(&self) -> Option<&Classes> {
        Some(&self.classes)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn write_gz(path: &Path, bytes: &[u8]) {
        let mut enc = GzEncoder::new(std::fs::File::create(path).unwrap(), Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap();
    }

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut bytes: Vec<u8> =
            std::iter::once(magic).chain(dims.iter().copied()).flat_map(u32::to_be_bytes).collect();
        bytes.extend_from_slice(data);
        bytes
    }

    /// Two training images (pixel value = 3·index + image, so every pixel is distinct per image)
    /// with labels 9 and 2, written as the train split of a temp dir.
    fn write_split(dir: &Path, images: Vec<u8>, labels: Vec<u8>) {
        write_gz(&dir.join("train-images-idx3-ubyte.gz"), &images);
        write_gz(&dir.join("train-labels-idx1-ubyte.gz"), &labels);
    }

    fn two_images() -> Vec<u8> {
        let data: Vec<u8> =
            (0..2 * SIDE * SIDE).map(|p| ((p % (SIDE * SIDE)) * 3 % 256 + p / (SIDE * SIDE)) as u8).collect();
        idx(IMAGES_MAGIC, &[2, 28, 28], &data)
    }

    #[test]
    fn parses_small_idx_files() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), two_images(), idx(LABELS_MAGIC, &[2], &[9, 2]));
        let ds = FashionMnist::open(dir.path().to_str(), Split::Train).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.describe(), format!("fashion-mnist (train, 2 samples, {})", dir.path().display()));
        assert_eq!(ds.classes().unwrap().names.len(), 10);

        let s0 = ds.get(0).unwrap();
        assert_eq!(s0.image.dimensions(), (28, 28));
        assert_eq!(s0.label, Some(9));
        assert_eq!(s0.caption, "a photo of a ankle boot.");
        // Pixel (x=5, y=1) is byte 33 of the image: value 99, replicated to three channels.
        assert_eq!(s0.image.get_pixel(5, 1).0, [99, 99, 99]);

        let s1 = ds.get(1).unwrap();
        assert_eq!(s1.label, Some(2));
        assert_eq!(s1.caption, "a blurry photo of a pullover.");
        assert_eq!(s1.image.get_pixel(5, 1).0, [100, 100, 100]);
        assert_eq!(s1.image.get_pixel(27, 27).0, [((783 * 3 % 256) + 1) as u8; 3]);

        assert!(ds.get(2).is_err());
        // The eval split's files are absent from the temp dir: the error names the file and the fix.
        let err = FashionMnist::open(dir.path().to_str(), Split::Eval).err().unwrap();
        assert!(err.contains("t10k-images-idx3-ubyte.gz not found"), "{err}");
        assert!(err.contains("dataset-fashion-mnist"), "{err}");
    }

    #[test]
    fn bad_magic_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), two_images(), idx(2051, &[2], &[9, 2]));
        let err = FashionMnist::open(dir.path().to_str(), Split::Train).err().unwrap();
        assert!(err.contains("train-labels-idx1-ubyte.gz"), "{err}");
        assert!(err.contains("magic number 2051"), "{err}");
    }

    #[test]
    fn count_mismatch_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), two_images(), idx(LABELS_MAGIC, &[3], &[9, 2, 1]));
        let err = FashionMnist::open(dir.path().to_str(), Split::Train).err().unwrap();
        assert!(err.contains("train-labels-idx1-ubyte.gz has 3 labels"), "{err}");
        assert!(err.contains("train-images-idx3-ubyte.gz has 2 images"), "{err}");
    }

    #[test]
    fn malformed_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let labels = idx(LABELS_MAGIC, &[2], &[9, 2]);
        // A header promising more images than the file holds.
        let mut short = two_images();
        short.truncate(short.len() - 1);
        write_split(dir.path(), short, labels.clone());
        let err = FashionMnist::open(dir.path().to_str(), Split::Train).err().unwrap();
        assert!(err.contains("train-images-idx3-ubyte.gz") && err.contains("promises 1568"), "{err}");
        // Wrong image size.
        write_split(dir.path(), idx(IMAGES_MAGIC, &[1, 32, 32], &[0; 1024]), labels.clone());
        let err = FashionMnist::open(dir.path().to_str(), Split::Train).err().unwrap();
        assert!(err.contains("32×32"), "{err}");
        // A label that is not a class.
        write_split(dir.path(), two_images(), idx(LABELS_MAGIC, &[2], &[9, 10]));
        let err = FashionMnist::open(dir.path().to_str(), Split::Train).err().unwrap();
        assert!(err.contains("train-labels-idx1-ubyte.gz: label 1 is 10"), "{err}");
        // Not gzip at all.
        std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), two_images()).unwrap();
        let err = FashionMnist::open(dir.path().to_str(), Split::Train).err().unwrap();
        assert!(err.contains("train-images-idx3-ubyte.gz: not a readable gzip file"), "{err}");
    }

    /// Checks the installed data set; passes without checking when the package is not installed.
    #[test]
    fn real_files_open_when_installed_else_skip() {
        if !Path::new(DEFAULT_DIR).join("train-images-idx3-ubyte.gz").exists() {
            eprintln!("skipped: {DEFAULT_DIR} is not installed");
            return;
        }
        let train = FashionMnist::open(None, Split::Train).unwrap();
        let eval = FashionMnist::open(None, Split::Eval).unwrap();
        assert_eq!(train.len(), 60000);
        assert_eq!(eval.len(), 10000);
        assert_eq!(train.describe(), format!("fashion-mnist (train, 60000 samples, {DEFAULT_DIR})"));
        // Every class occurs (6000 times each in the training split).
        let mut counts = [0usize; 10];
        for i in 0..train.len() {
            counts[train.label(i).unwrap()] += 1;
        }
        assert_eq!(counts, [6000; 10]);
        // Images are not blank: the mean of the last training image is well above zero.
        let s = train.get(59999).unwrap();
        let mean = s.image.pixels().map(|p| p.0[0] as f64).sum::<f64>() / (28.0 * 28.0);
        assert!(mean > 10.0, "{mean}");
        assert!(s.caption.contains(CLASS_NAMES[s.label.unwrap()]));
    }
}
