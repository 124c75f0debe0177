//! Image preprocessing as open_clip's eval transform: resize the shorter side to `size` (bicubic),
//! centre crop to size × size, scale to [0, 1] and normalize with the CLIP mean/std, as [3, H, W].

use std::fmt;
use std::path::{Path, PathBuf};

use clip_pgs_kernels::normalize::normalize_u8;
use image::imageops::{self, FilterType};
use image::{DynamicImage, RgbImage};

/// A picture that could not be read, and why.
#[derive(Debug)]
pub struct ImageLoadError {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for ImageLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot read image {}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for ImageLoadError {}

/// An image ready for the model: the cropped RGB picture and its normalized tensor [3, H, W].
pub struct Preprocessed {
    pub rgb: RgbImage,
    pub normalized: Vec<f32>,
}

/// Reads `path` (PNG or JPEG) and preprocesses it to size × size.
pub fn load_image(path: &Path, size: u32) -> Result<Preprocessed, ImageLoadError> {
    let error = |reason: String| ImageLoadError { path: path.to_path_buf(), reason };
    if size == 0 {
        return Err(error("the target size is 0".into()));
    }
    let image = image::ImageReader::open(path)
        .map_err(|e| error(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| error(e.to_string()))?
        .decode()
        .map_err(|e| error(e.to_string()))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(error("the image is empty".into()));
    }
    let rgb = resize_center_crop(&image, size);
    let normalized = normalize(&rgb);
    Ok(Preprocessed { rgb, normalized })
}

/// Longest side kept per unit of the shorter one before resizing (see below).
const MAX_ASPECT: u32 = 4;

/// Shorter side to `size` with bicubic (Catmull–Rom) filtering, then the central size × size.
///
/// A strip such as 16384 × 1 pixels would first be resized to 3.7 M × 224 (2.4 GB) only to be
/// cropped: the long side is first cut to its central `MAX_ASPECT` × the short side, which holds
/// the crop and the filter's reach around it, so the intermediate image stays under
/// `MAX_ASPECT` × size² pixels. (Only such strips are affected, by a sub-pixel shift.)
pub fn resize_center_crop(image: &DynamicImage, size: u32) -> RgbImage {
    let mut rgb = image.to_rgb8();
    let (mut w, mut h) = rgb.dimensions();
    if (w, h) == (size, size) {
        return rgb;
    }
    if w.max(h) / MAX_ASPECT > w.min(h) {
        let (cw, ch) = (w.min(MAX_ASPECT * h), h.min(MAX_ASPECT * w));
        rgb = imageops::crop_imm(&rgb, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image();
        (w, h) = (cw, ch);
    }
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (((w as f64 * scale).round() as u32).max(size), ((h as f64 * scale).round() as u32).max(size));
    let resized = imageops::resize(&rgb, nw, nh, FilterType::CatmullRom);
    imageops::crop_imm(&resized, (nw - size) / 2, (nh - size) / 2, size, size).to_image()
}

/// [H, W, 3] u8 to CLIP-normalized [3, H, W] f32.
pub fn normalize(rgb: &RgbImage) -> Vec<f32> {
    let (w, h) = rgb.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, pixel) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = normalize_u8(pixel[c], c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_the_centre_of_a_wide_image() {
        // 40×20: left half black, right half white; the 10×10 result keeps both halves.
        let image = RgbImage::from_fn(40, 20, |x, _| if x < 20 { image::Rgb([0, 0, 0]) } else { image::Rgb([255; 3]) });
        let out = resize_center_crop(&DynamicImage::ImageRgb8(image), 10);
        assert_eq!(out.dimensions(), (10, 10));
        assert_eq!(out.get_pixel(0, 5)[0], 0);
        assert_eq!(out.get_pixel(9, 5)[0], 255);
    }

    #[test]
    fn a_long_strip_is_cut_before_it_is_resized() {
        // 4000×2 with a white centre: only the central 8×2 matter for the 4×4 crop.
        let image = RgbImage::from_fn(4000, 2, |x, _| image::Rgb([if (1996..2004).contains(&x) { 255 } else { 0 }; 3]));
        let out = resize_center_crop(&DynamicImage::ImageRgb8(image), 4);
        assert_eq!(out.dimensions(), (4, 4));
        assert!(out.pixels().all(|p| p[0] > 200), "{out:?}");
    }

    #[test]
    fn normalize_is_channel_planar() {
        let image = RgbImage::from_fn(2, 1, |x, _| image::Rgb([x as u8 * 255, 0, 255]));
        let t = normalize(&image);
        assert_eq!(t.len(), 6);
        assert_eq!(t[0], normalize_u8(0, 0));
        assert_eq!(t[1], normalize_u8(255, 0));
        assert_eq!(t[2..4], [normalize_u8(0, 1); 2]);
        assert_eq!(t[4..6], [normalize_u8(255, 2); 2]);
    }

    #[test]
    fn unreadable_files_are_errors_naming_the_path() {
        let e = load_image(Path::new("/no/such/picture.png"), 224).err().unwrap().to_string();
        assert!(e.contains("/no/such/picture.png"), "{e}");
        let dir = std::env::temp_dir().join("clip-pgs-preprocess-test.png");
        std::fs::write(&dir, b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let e = load_image(&dir, 224).err().unwrap().to_string();
        assert!(e.contains("clip-pgs-preprocess-test.png"), "{e}");
        std::fs::remove_file(dir).unwrap();
    }
}
