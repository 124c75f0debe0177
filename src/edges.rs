//! `clip-pgs edges`: preprocess an image as open_clip does, compute its PGS edge map on the chosen
//! device, print the grid and write a picture (the image beside its edge map).

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::Dtype;
use clip_pgs_host::ops::edge_map::{ImageBatchShape, edge_map};
use clip_pgs_host::{Device, DevicePreference, bf16};
use clip_pgs_model::preprocess::load_image;
use image::{Rgb, RgbImage};

#[derive(Args)]
pub struct EdgesArgs {
    /// PNG or JPEG image.
    #[arg(long)]
    image: PathBuf,
    /// Side of the square the image is resized and centre-cropped to.
    #[arg(long, default_value_t = 224)]
    size: u32,
    /// Patch size (16 for ViT-B/16).
    #[arg(long, default_value_t = 16)]
    patch: usize,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: DevicePreference,
    /// Element type of the image tensor the kernel reads.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// Write the image and its edge map side by side to this PNG.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: &EdgesArgs) -> Result<(), Box<dyn Error>> {
    let selection = Device::select(args.device)?;
    println!("device: {selection}");
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
    println!(
        "{}: {size}×{size}, patch {}, {}×{cols} = {} patches, edge map in {:.2} ms",
        args.image.display(),
        args.patch,
        size / args.patch,
        edges.len(),
        elapsed.as_secs_f64() * 1e3
    );
    println!("E per patch (0 = flattest, 9 = most edges; PGS seeds its masks where E is low):");
    for row in edges.chunks(cols) {
        let line: String = row.iter().map(|e| char::from(b'0' + (e * 9.999) as u8)).collect();
        println!("  {line}");
    }
    if let Some(out) = &args.out {
        side_by_side(&picture.rgb, &edges, cols, args.patch).save(out)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// The image on the left, E on the right (one grey square per patch, white = high E).
fn side_by_side(rgb: &RgbImage, edges: &[f32], cols: usize, patch: usize) -> RgbImage {
    let (w, h) = rgb.dimensions();
    RgbImage::from_fn(2 * w, h, |x, y| {
        if x < w {
            *rgb.get_pixel(x, y)
        } else {
            let (px, py) = ((x - w) as usize / patch, y as usize / patch);
            Rgb([(edges[py * cols + px] * 255.0).round() as u8; 3])
        }
    })
}
