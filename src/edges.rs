//! `clip-pgs edges`: preprocess an image as open_clip does, compute its PGS edge map on the chosen
//! device, print the grid and write a picture (the image beside its edge map and its scale).

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::{Dtype, at_least};
use clip_pgs_host::ops::edge_map::{ImageBatchShape, edge_map};
use clip_pgs_host::{Device, DevicePreference, bf16};
use clip_pgs_model::outln;
use clip_pgs_model::preprocess::load_image;
use clip_pgs_model::train::plot::draw_text;
use image::{Rgb, RgbImage};

#[derive(Args)]
pub struct EdgesArgs {
    /// PNG or JPEG image.
    #[arg(long)]
    image: PathBuf,
    /// Side of the square the image is resized and centre-cropped to.
    #[arg(long, default_value_t = 224, value_parser = at_least::<u32>(1), allow_negative_numbers = true)]
    size: u32,
    /// Patch size (16 for ViT-B/16).
    #[arg(long, default_value_t = 16)]
    patch: usize,
    /// auto, cpu, cuda, or emu (the GPU kernel on the SIMT emulator, to check it; slow).
    #[arg(long, default_value = "auto")]
    device: DevicePreference,
    /// Element type of the image tensor the kernel reads.
    #[arg(long, default_value = "f32")]
    dtype: Dtype,
    /// Write the image, its edge map and the map's scale side by side to this PNG.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: &EdgesArgs) -> Result<(), Box<dyn Error>> {
    let selection = Device::select(args.device)?;
    outln!("device: {selection}");
    let device = &selection.device;
    let picture = load_image(&args.image, args.size)?;
    let size = args.size as usize;
    let shape = ImageBatchShape { n: 1, height: size, width: size };

    let start = Instant::now();
    let edges = match args.dtype {
        Dtype::F32 => edge_map(device, &device.upload(&picture.normalized)?, shape, args.patch)?,
        Dtype::Bf16 => {
            let narrowed: Vec<bf16> = picture.normalized.iter().map(|&v| bf16::from_f32(v)).collect();
            edge_map(device, &device.upload(&narrowed)?, shape, args.patch)?
        }
    }
    .to_vec()?;
    let elapsed = start.elapsed();

    let cols = size / args.patch;
    outln!(
        "{}: {size}×{size}, patch {}, {}×{cols} = {} patches, edge map in {:.2} ms",
        args.image.display(),
        args.patch,
        size / args.patch,
        edges.len(),
        elapsed.as_secs_f64() * 1e3
    );
    outln!("E per patch (0 = flattest, 9 = most edges; PGS seeds its masks where E is low):");
    for row in edges.chunks(cols) {
        let line: String = row.iter().map(|e| char::from(b'0' + (e * 9.999) as u8)).collect();
        outln!("  {line}");
    }
    if let Some(out) = &args.out {
        crate::mask::save_png(&side_by_side(&picture.rgb, &edges, cols, args.patch)?, out)?;
        outln!("wrote {}", out.display());
    }
    Ok(())
}

/// The image on the left, E in the middle (one grey square per patch, white = high E), and on
/// the right the scale: a grey ramp from E = 0 (bottom) to 1 (top) with its values.
fn side_by_side(rgb: &RgbImage, edges: &[f32], cols: usize, patch: usize) -> Result<RgbImage, String> {
    let (w, h) = rgb.dimensions();
    let grey = |e: f32| Rgb([(e.clamp(0.0, 1.0) * 255.0).round() as u8; 3]);
    let (scale_w, ramp_x, ramp_w, pad) = (64, 2 * w + 8, 12, 6);
    let ramp = |y: u32| 1.0 - (y - pad) as f32 / h.saturating_sub(2 * pad + 1).max(1) as f32;
    let mut out = RgbImage::from_fn(2 * w + scale_w, h, |x, y| {
        if x < w {
            *rgb.get_pixel(x, y)
        } else if x < 2 * w {
            let (px, py) = ((x - w) as usize / patch, y as usize / patch);
            grey(edges[py * cols + px])
        } else if (ramp_x..ramp_x + ramp_w).contains(&x) && (pad..h.saturating_sub(pad)).contains(&y) {
            grey(ramp(y))
        } else {
            Rgb([255; 3])
        }
    });
    let px = 12.0;
    let text_x = (ramp_x + ramp_w + 4) as i32;
    for (value, y) in [("E 1", pad as i32), ("0.5", (h / 2) as i32 - 6), ("0", h as i32 - pad as i32 - 12)] {
        draw_text(&mut out, value, (text_x, y), px, [0, 0, 0])?;
    }
    Ok(out)
}
