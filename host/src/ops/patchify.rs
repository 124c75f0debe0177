//! The patch embedding's input packing: images [N, 3, H, W] → patches [N·L, 3p²], each row
//! flattened (channel, row, col) as conv1's weight [width, 3, p, p], so the convolution is one
//! GEMM; f32, or bf16 on the GPU devices (`dtype::Activation`: a copy, no rounding). CPU
//! reference here, the kernel in `kernels/src/patchify.rs` (CUDA and the emulator).

use rayon::prelude::*;

use clip_pgs_kernels::patchify::THREADS;

use super::check::OpCheck;
use super::dtype::Activation;
use crate::device::Device;
use crate::error::Result;
use crate::launch::grid_stride_config;
use crate::view::{View, ViewMut};

/// patches [N·L, 3p²] from images [N, 3, S, S], S = `image_size`, p = `patch`.
pub fn patchify<T: Activation>(
    device: &Device,
    patches: ViewMut<T>,
    images: View<T>,
    image_size: usize,
    patch: usize,
) -> Result<()> {
    let op = OpCheck::new("patchify", device);
    if patch == 0 || image_size == 0 || !image_size.is_multiple_of(patch) {
        return Err(op.invalid(format!("patch size {patch} does not tile images of {image_size}")));
    }
    let image_len = 3 * image_size * image_size;
    if !images.len().is_multiple_of(image_len) {
        return Err(
            op.invalid(format!("images have {} values, not whole images of 3×{image_size}×{image_size}", images.len()))
        );
    }
    let (n, cols, pv) = (images.len() / image_len, image_size / patch, 3 * patch * patch);
    let l = cols * cols;
    op.size("patches", patches.len(), n * l * pv, || format!("[N·L {}, 3p² {pv}]", n * l))?;
    if images.len() > u32::MAX as usize {
        return Err(op.invalid(format!("{} values, more than a kernel indexes (2³² − 1)", images.len())));
    }
    if !matches!(device, Device::Cpu) {
        let n = images.len() as u32;
        let args = (op.gpu_mut("patches", patches)?, op.gpu("images", images)?, n, image_size as u32, patch as u32);
        // SAFETY: images hold n = N·3·S² values and patches as many (checked above); patch ≥ 1
        // divides S.
        return unsafe { device.launch(&T::PATCHIFY, grid_stride_config(n as usize, THREADS), args) };
    }
    let (patches, images) = (op.cpu_f32_mut("patches", patches)?, op.cpu_f32("images", images)?);
    patches.par_chunks_mut(pv).enumerate().for_each(|(row, dst)| {
        let (b, j) = (row / l, row % l);
        let (y0, x0) = ((j / cols) * patch, (j % cols) * patch);
        let img = &images[b * image_len..(b + 1) * image_len];
        for c in 0..3 {
            for r in 0..patch {
                let src = c * image_size * image_size + (y0 + r) * image_size + x0;
                dst[(c * patch + r) * patch..][..patch].copy_from_slice(&img[src..src + patch]);
            }
        }
    });
    Ok(())
}
