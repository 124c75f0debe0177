//! `clip-pgs mask`: draw which patches a masking method drops on a real image (masked patches
//! dimmed and hatched, PGS candidates outlined, each panel labelled), or, with `--grid`, none /
//! flip / pgs-paper / pgs-reference side by side. Pixel similarity only (epoch 0: α = 0), as at
//! the start of training.

use std::error::Error;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use clip_pgs_host::ops::edge_map::ImageBatchShape;
use clip_pgs_host::ops::pgs::{ImageMask, MaskRatio, MaskRequest, MaskStep, Masking, PgsConfig, PgsMode, mask_cpu};
use clip_pgs_model::outln;
use clip_pgs_model::preprocess::load_image;
use clip_pgs_model::train::plot::draw_text;
use image::{Rgb, RgbImage};

use crate::at_least;

/// Why PGS has no ratio 0: its candidates are always masked (pgs-spec step 4).
pub const PGS_RATIO_ZERO: &str = "--mask-ratio 0: PGS always masks its candidate patches, so it has no ratio 0; use --mask none (train) or \
     --mode none (mask) for no masking";

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Method {
    None,
    Flip,
    Paper,
    Reference,
}

#[derive(Args)]
pub struct MaskArgs {
    /// PNG or JPEG image.
    #[arg(long)]
    image: PathBuf,
    /// Masking: none, flip, paper (PGS as the paper describes) or reference (PGS as the public code runs).
    #[arg(long, value_enum, default_value_t = Method::Paper, conflicts_with = "grid")]
    mode: Method,
    /// Fraction of patches to mask, in [0, 1) (PGS-0.5, FLIP 0.5; PGS needs more than 0).
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true, conflicts_with = "dynamic")]
    mask_ratio: f32,
    /// PGS-0.3: mask the patches similar to a candidate, between 30% and 50%.
    #[arg(long)]
    dynamic: bool,
    /// PGS without the edge map (ablation).
    #[arg(long)]
    no_ed: bool,
    /// PGS without optimal-transport normalization (ablation).
    #[arg(long)]
    no_otn: bool,
    /// Seed of FLIP's draws and PGS's tie-breaking jitter.
    #[arg(long, default_value_t = 0, value_parser = at_least::<u64>(0), allow_negative_numbers = true)]
    seed: u64,
    /// Side of the square the image is resized and centre-cropped to.
    #[arg(long, default_value_t = 224, value_parser = at_least::<u32>(1), allow_negative_numbers = true)]
    size: u32,
    /// Patch size (16 for ViT-B/16).
    #[arg(long, default_value_t = 16)]
    patch: usize,
    /// Put none, flip, pgs-paper and pgs-reference side by side (left to right).
    #[arg(long)]
    grid: bool,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &MaskArgs) -> Result<(), Box<dyn Error>> {
    if !(0.0..1.0).contains(&args.mask_ratio) {
        return Err(format!("--mask-ratio {}: expected a number in [0, 1)", args.mask_ratio).into());
    }
    let pgs = args.grid || matches!(args.mode, Method::Paper | Method::Reference);
    if pgs && !args.dynamic && args.mask_ratio == 0.0 {
        return Err(PGS_RATIO_ZERO.into());
    }
    let picture = load_image(&args.image, args.size)?;
    let size = args.size as usize;
    let shape = ImageBatchShape { n: 1, height: size, width: size };
    let step = MaskStep { seed: args.seed, step: 0, first: 0, epoch: 0, epochs: 1 };
    let methods =
        if args.grid { vec![Method::None, Method::Flip, Method::Paper, Method::Reference] } else { vec![args.mode] };
    let mut panels = Vec::new();
    for method in methods {
        let masking = masking(method, args);
        let masks = mask_cpu(&MaskRequest { shape, patch: args.patch, masking, at: step }, &picture.normalized, None)?;
        let mask = &masks.images[0];
        let masked = masks.patches - mask.kept.len();
        outln!(
            "{:<10} masks {masked:>3} of {} patches ({:.1}%){}",
            name(method),
            masks.patches,
            100.0 * masks.masked_fraction(),
            if mask.candidates.is_empty() { String::new() } else { format!(", candidates {:?}", mask.candidates) }
        );
        let label = format!("{}: {masked}/{} masked", name(method), masks.patches);
        panels.push(labelled(&draw(&picture.rgb, mask, args.patch), &label)?);
    }
    save_png(&side_by_side(&panels), &args.out)?;
    outln!("wrote {} (masked patches dimmed and hatched, candidates outlined in red)", args.out.display());
    Ok(())
}

/// Saves a PNG; the error names the path.
pub fn save_png(image: &RgbImage, path: &Path) -> Result<(), String> {
    image.save_with_format(path, image::ImageFormat::Png).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// `panel` under a white strip holding `label`.
pub fn labelled(panel: &RgbImage, label: &str) -> Result<RgbImage, String> {
    let px = (panel.width() as f64 / 12.0).clamp(11.0, 18.0);
    let strip = (px * 1.4).round() as u32;
    let mut out = RgbImage::from_pixel(panel.width(), panel.height() + strip, Rgb([255; 3]));
    image::imageops::replace(&mut out, panel, 0, strip as i64);
    draw_text(&mut out, label, (3, (px * 0.2) as i32), px, [0, 0, 0])?;
    Ok(out)
}

fn masking(method: Method, args: &MaskArgs) -> Masking {
    let ratio =
        if args.dynamic { MaskRatio::Dynamic { min: 0.3, max: 0.5 } } else { MaskRatio::Fixed(args.mask_ratio) };
    let pgs = |mode| Masking::Pgs(PgsConfig { mode, ratio, use_ed: !args.no_ed, use_otn: !args.no_otn });
    match method {
        Method::None => Masking::None,
        Method::Flip => Masking::Flip { ratio: args.mask_ratio },
        Method::Paper => pgs(PgsMode::Paper),
        Method::Reference => pgs(PgsMode::Reference),
    }
}

fn name(method: Method) -> &'static str {
    match method {
        Method::None => "none",
        Method::Flip => "flip",
        Method::Paper => "pgs-paper",
        Method::Reference => "pgs-ref",
    }
}

/// The image with masked patches dimmed to a quarter under light diagonal hatching (so that a
/// masked patch is never mistaken for a dark object) and candidates outlined.
pub fn draw(rgb: &RgbImage, mask: &ImageMask, patch: usize) -> RgbImage {
    let cols = rgb.width() as usize / patch;
    let mut kept = vec![false; cols * (rgb.height() as usize / patch)];
    mask.kept.iter().for_each(|&j| kept[j as usize] = true);
    let mut out = rgb.clone();
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        let (px, py) = (x as usize / patch, y as usize / patch);
        let j = py * cols + px;
        if !kept[j] {
            let hatch = (x + y) % 6 == 0;
            pixel.0 = if hatch { [150; 3] } else { pixel.0.map(|v| v / 4) };
        }
        let on_border = [x as usize % patch, y as usize % patch].iter().any(|&o| o == 0 || o == patch - 1);
        if on_border && mask.candidates.contains(&(j as u32)) {
            *pixel = Rgb([255, 32, 32]);
        }
    }
    out
}

/// Panels left to right with a 4-pixel white gap.
pub fn side_by_side(panels: &[RgbImage]) -> RgbImage {
    let (w, h) = panels[0].dimensions();
    let gap = 4;
    let mut out = RgbImage::from_pixel(panels.len() as u32 * (w + gap) - gap, h, Rgb([255; 3]));
    for (i, panel) in panels.iter().enumerate() {
        image::imageops::replace(&mut out, panel, (i as u32 * (w + gap)) as i64, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_masked_patch_never_looks_like_a_dark_object() {
        // A black picture of 2×2 patches, the right column masked, patch 1 a candidate.
        let black = RgbImage::new(16, 16);
        let mask = ImageMask { kept: vec![0, 2], candidates: vec![1] };
        let drawn = draw(&black, &mask, 8);
        let patch = |px: u32, py: u32| (0..8).flat_map(move |y| (0..8).map(move |x| (8 * px + x, 8 * py + y)));
        // Kept black stays black; masked black is hatched, so it differs from kept black.
        assert!(patch(0, 1).all(|(x, y)| drawn.get_pixel(x, y).0 == [0; 3]));
        assert!(patch(1, 1).any(|(x, y)| drawn.get_pixel(x, y).0 == [150; 3]));
        assert_eq!(drawn.get_pixel(8, 0).0, [255, 32, 32], "candidate outlined");
        // The label strip sits above the panel and holds dark text on white.
        let panel = labelled(&drawn, "flip: 2/4 masked").unwrap();
        let strip = panel.height() - 16;
        assert!(strip > 0 && panel.width() == 16);
        assert!((0..strip).any(|y| (0..16).any(|x| panel.get_pixel(x, y).0[0] < 128)), "no label drawn");
    }
}
