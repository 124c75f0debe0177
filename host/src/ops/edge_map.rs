//! The PGS edge map E [N, L] of a batch of CLIP-normalized images [N, 3, H, W] (pgs-spec.md step 1,
//! mode `paper`): luminance, 3×3 Sobel with replicate border, magnitude, per-patch mean, per-image
//! min–max normalization. GPU kernel: `kernels/src/edge_map.rs`; both devices share the math of
//! `clip_pgs_kernels::sobel` and its summation order, so they agree bit for bit.

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use clip_pgs_kernels as kernels;
use clip_pgs_kernels::edge_map::{THREADS, shared_bytes};
use clip_pgs_kernels::hw::{Global, GlobalMut, Kernel};
use clip_pgs_kernels::sobel::{luminance, min_max_normalize, patch_mean, replicate, sobel_magnitude};

use super::dtype::Float;
use crate::buffer::Buffer;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::view::{View, ViewMut};

/// A batch of RGB images in [N, 3, H, W] layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageBatchShape {
    pub n: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageBatchShape {
    pub fn image_len(&self) -> usize {
        3 * self.height * self.width
    }

    pub fn len(&self) -> usize {
        self.n * self.image_len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The gh × gw grid of p×p patches an image is cut into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchGrid {
    pub rows: usize,
    pub cols: usize,
    pub patch: usize,
}

impl PatchGrid {
    /// Checks that `patch` tiles a `height` × `width` image exactly.
    pub fn new(height: usize, width: usize, patch: usize) -> Result<Self> {
        if height == 0 || width == 0 {
            return Err(Error::InvalidArgument(format!("image size {height}×{width} is empty")));
        }
        if patch == 0 {
            return Err(Error::InvalidArgument("patch size is 0".into()));
        }
        if !height.is_multiple_of(patch) || !width.is_multiple_of(patch) {
            return Err(Error::InvalidArgument(format!(
                "patch size {patch} does not divide the image size {height}×{width}"
            )));
        }
        Ok(PatchGrid { rows: height / patch, cols: width / patch, patch })
    }

    /// L, the number of patches.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// The kernels that come in an f32 and a bf16 entry point, by their parameter tuples (element E).
type EdgeMapKernel<E> = Kernel<(Global<E>, GlobalMut<f32>, u32, u32, u32)>;
type StandardizeKernel<E> = Kernel<(Global<E>, GlobalMut<f32>, GlobalMut<f32>, GlobalMut<u32>, u32, u32, u32)>;
type TokenNormsKernel<E> = Kernel<(Global<E>, GlobalMut<f32>, GlobalMut<u32>, u32, u32)>;
type SimilarityKernel<E> = Kernel<(
    Global<f32>,
    Global<f32>,
    Global<E>,
    Global<f32>,
    Global<u32>,
    GlobalMut<f32>,
    u32,
    u32,
    u32,
    u32,
    Global<u32>,
)>;
type GatherKernel<E> =
    Kernel<(Global<E>, Global<E>, Global<u32>, Global<u32>, GlobalMut<E>, GlobalMut<u32>, u32, u32, u32)>;

/// Element types the kernels read (f32, and bf16 widened exactly to f32), with the entry point of
/// each kernel that comes in both.
pub trait ImageElement: Float {
    const EDGE_MAP: EdgeMapKernel<Self::Kernel>;
    const STANDARDIZE_PATCHES: StandardizeKernel<Self::Kernel>;
    const TOKEN_NORMS: TokenNormsKernel<Self::Kernel>;
    const SIMILARITY: SimilarityKernel<Self::Kernel>;
    const GATHER: GatherKernel<Self::Kernel>;
}

macro_rules! image_element {
    ($t:ty, $edge:ident, $standardize:ident, $norms:ident, $similarity:ident, $gather:ident) => {
        impl ImageElement for $t {
            const EDGE_MAP: EdgeMapKernel<Self::Kernel> = kernels::edge_map::$edge;
            const STANDARDIZE_PATCHES: StandardizeKernel<Self::Kernel> = kernels::patch_stats::$standardize;
            const TOKEN_NORMS: TokenNormsKernel<Self::Kernel> = kernels::patch_stats::$norms;
            const SIMILARITY: SimilarityKernel<Self::Kernel> = kernels::patch_stats::$similarity;
            const GATHER: GatherKernel<Self::Kernel> = kernels::gather::$gather;
        }
    };
}
image_element!(
    f32,
    pgs_edge_map_f32,
    pgs_standardize_patches_f32,
    pgs_token_norms_f32,
    pgs_similarity_f32,
    pgs_gather_f32
);
image_element!(
    half::bf16,
    pgs_edge_map_bf16,
    pgs_standardize_patches_bf16,
    pgs_token_norms_bf16,
    pgs_similarity_bf16,
    pgs_gather_bf16
);

/// E [N, L] of `images` [N, 3, H, W], on the device that holds `images`.
pub fn edge_map<T: ImageElement>(
    device: &Device,
    images: &Buffer<T>,
    shape: ImageBatchShape,
    patch: usize,
) -> Result<Buffer<f32>> {
    let grid = check_args(images.len(), shape, patch)?;
    match (device, images) {
        (Device::Cpu, Buffer::Cpu(pixels)) => {
            let widened: Vec<f32> = pixels.par_iter().map(|&v| v.to_f32()).collect();
            Ok(Buffer::Cpu(edge_map_cpu(&widened, shape, grid)))
        }
        (Device::Cuda(_), Buffer::Cuda(_)) | (Device::Emu(_), Buffer::Emu(_)) => {
            edge_map_gpu(device, images.view(), shape, grid)
        }
        (_, buffer) => Err(Error::WrongDevice(format!(
            "edge_map runs on {device} but the images are in {} memory",
            buffer.device_name()
        ))),
    }
}

fn check_args(len: usize, shape: ImageBatchShape, patch: usize) -> Result<PatchGrid> {
    let grid = PatchGrid::new(shape.height, shape.width, patch)?;
    if shape.n == 0 {
        return Err(Error::InvalidArgument("the batch is empty (n = 0)".into()));
    }
    if len != shape.len() {
        return Err(Error::InvalidArgument(format!(
            "images buffer has {len} elements, shape [{}, 3, {}, {}] needs {}",
            shape.n,
            shape.height,
            shape.width,
            shape.len()
        )));
    }
    if shape.len() >= u32::MAX as usize {
        return Err(Error::InvalidArgument(format!("batch of {} elements exceeds 2³² − 1", shape.len())));
    }
    Ok(grid)
}

/// The CPU reference, written for clarity: per image, the magnitude map, then patch means and
/// min–max normalization. `images` are f32 [N, 3, H, W].
pub fn edge_map_cpu(images: &[f32], shape: ImageBatchShape, grid: PatchGrid) -> Vec<f32> {
    let (h, w, p) = (shape.height, shape.width, grid.patch);
    let mut edges = vec![0.0f32; shape.n * grid.len()];
    edges.par_chunks_mut(grid.len()).zip(images.par_chunks(shape.image_len())).for_each(|(e, image)| {
        let magnitude = sobel_magnitude_map(image, h, w);
        for (i, e) in e.iter_mut().enumerate() {
            let (y0, x0) = ((i / grid.cols) * p, (i % grid.cols) * p);
            let mut sum = 0.0f32;
            for y in y0..y0 + p {
                let mut row = 0.0f32;
                for x in x0..x0 + p {
                    row += magnitude[y * w + x];
                }
                sum += row;
            }
            *e = patch_mean(sum, p);
        }
        let min = e.iter().copied().fold(f32::INFINITY, f32::min);
        let max = e.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        e.iter_mut().for_each(|v| *v = min_max_normalize(*v, min, max));
    });
    edges
}

/// Sobel magnitude [H, W] of the luminance of one normalized image [3, H, W], replicate border.
pub fn sobel_magnitude_map(image: &[f32], h: usize, w: usize) -> Vec<f32> {
    let plane = h * w;
    let luma: Vec<f32> = (0..plane).map(|i| luminance([image[i], image[plane + i], image[2 * plane + i]])).collect();
    (0..plane)
        .map(|i| {
            let (y, x) = (i / w, i % w);
            let window = [-1, 0, 1].map(|dy| [-1, 0, 1].map(|dx| luma[replicate(y, dy, h) * w + replicate(x, dx, w)]));
            sobel_magnitude(window)
        })
        .collect()
}

/// Launches `pgs_edge_map_{f32,bf16}` on CUDA or the emulator: one block of `THREADS` per image.
pub(crate) fn edge_map_gpu<T: ImageElement>(
    device: &Device,
    images: View<T>,
    shape: ImageBatchShape,
    grid: PatchGrid,
) -> Result<Buffer<f32>> {
    let mut edges = device.alloc_zeros::<f32>(shape.n * grid.len(), "the edge map")?;
    edge_map_gpu_into(device, images, shape, grid, edges.view_mut())?;
    Ok(edges)
}

/// `edge_map_gpu` into `edges` [N, L] (the caller's buffer: nothing allocated).
pub(crate) fn edge_map_gpu_into<T: ImageElement>(
    device: &Device,
    images: View<T>,
    shape: ImageBatchShape,
    grid: PatchGrid,
    edges: ViewMut<f32>,
) -> Result<()> {
    if edges.len() != shape.n * grid.len() {
        return Err(Error::InvalidArgument(format!(
            "edge map of {} values for {} images of {} patches",
            edges.len(),
            shape.n,
            grid.len()
        )));
    }
    let smem = shared_bytes(shape.width, grid.patch, grid.len());
    let cfg =
        LaunchConfig { grid_dim: (shape.n as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem as u32 };
    let (h, w, p) = (shape.height as u32, shape.width as u32, grid.patch as u32);
    // SAFETY: the callers checked that the image buffer holds n·3·h·w elements; `edges` holds
    // n·L (above), and smem is what the kernel's layout needs (shared_bytes).
    unsafe { device.launch(&T::EDGE_MAP, cfg, (images, edges, h, w, p)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clip_pgs_kernels::philox::Philox;

    fn random_images(shape: ImageBatchShape, seed: u64) -> Vec<f32> {
        let rng = Philox::new(seed, 0, 0);
        (0..shape.len() as u32).map(|i| rng.uniform(i) * 4.0 - 2.0).collect()
    }

    /// A naive f64 edge map: explicit kernels, clamped indices, nothing shared with the reference.
    fn naive_edge_map(images: &[f32], shape: ImageBatchShape, p: usize) -> Vec<f64> {
        let (h, w) = (shape.height as i64, shape.width as i64);
        let mean = [0.48145466f64, 0.4578275, 0.40821073];
        let std = [0.26862954f64, 0.26130258, 0.27577711];
        let kx = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]];
        let mut out = Vec::new();
        for image in images.chunks(shape.image_len()) {
            let y_at = |y: i64, x: i64| -> f64 {
                let (y, x) = (y.clamp(0, h - 1), x.clamp(0, w - 1));
                let px = |c: usize| image[c * (h * w) as usize + (y * w + x) as usize] as f64 * std[c] + mean[c];
                0.299 * px(0) + 0.587 * px(1) + 0.114 * px(2)
            };
            let mut e = Vec::new();
            for py in 0..h / p as i64 {
                for px in 0..w / p as i64 {
                    let mut total = 0.0;
                    for y in py * p as i64..(py + 1) * p as i64 {
                        for x in px * p as i64..(px + 1) * p as i64 {
                            let (mut gx, mut gy) = (0.0, 0.0);
                            for (i, dy) in (-1..=1).enumerate() {
                                for (j, dx) in (-1..=1).enumerate() {
                                    gx += kx[i][j] * y_at(y + dy, x + dx);
                                    gy += kx[j][i] * y_at(y + dy, x + dx);
                                }
                            }
                            total += (gx * gx + gy * gy).sqrt();
                        }
                    }
                    e.push(total / (p * p) as f64);
                }
            }
            let min = e.iter().copied().fold(f64::INFINITY, f64::min);
            let max = e.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            out.extend(e.iter().map(|v| (v - min) / (max - min + 1e-6)));
        }
        out
    }

    #[test]
    fn reference_matches_naive_implementation() {
        for (shape, p) in [
            (ImageBatchShape { n: 3, height: 32, width: 48 }, 8),
            (ImageBatchShape { n: 2, height: 64, width: 64 }, 16),
            (ImageBatchShape { n: 1, height: 12, width: 6 }, 3),
            (ImageBatchShape { n: 2, height: 5, width: 7 }, 1),
        ] {
            let images = random_images(shape, 7);
            let grid = PatchGrid::new(shape.height, shape.width, p).unwrap();
            let got = edge_map_cpu(&images, shape, grid);
            let want = naive_edge_map(&images, shape, p);
            assert_eq!(got.len(), shape.n * grid.len());
            let err = got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(err < 1e-5, "{shape:?} patch {p}: max abs error {err}");
        }
    }

    #[test]
    fn a_square_on_a_flat_background_has_its_edges_at_the_square_outline() {
        // 64×64, patch 8: a bright 24×24 square at (16..40, 16..40) on black.
        let shape = ImageBatchShape { n: 1, height: 64, width: 64 };
        let mut images = vec![0.0f32; shape.len()];
        for c in 0..3 {
            let (black, white) =
                (clip_pgs_kernels::normalize::normalize_u8(0, c), clip_pgs_kernels::normalize::normalize_u8(255, c));
            for y in 0..64 {
                for x in 0..64 {
                    let inside = (16..40).contains(&y) && (16..40).contains(&x);
                    images[c * 4096 + y * 64 + x] = if inside { white } else { black };
                }
            }
        }
        let e = edge_map_cpu(&images, shape, PatchGrid::new(64, 64, 8).unwrap());
        let at = |r: usize, c: usize| e[r * 8 + c];
        assert_eq!(at(0, 0), 0.0, "far background");
        assert_eq!(at(3, 3), 0.0, "inside the square (rows 24..32 are 8 px from every side)");
        // A side patch holds one edge row (about half the corner's two), the corner the maximum.
        assert!(at(2, 3) > 0.4 && at(3, 2) > 0.4 && at(1, 3) > 0.4, "patches on the outline");
        assert!(at(2, 2) > 0.99 && at(4, 4) > 0.99, "corner patches");
        assert!(e.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn flat_image_gives_zero_not_nan() {
        let shape = ImageBatchShape { n: 1, height: 16, width: 16 };
        let e = edge_map_cpu(&vec![0.3; shape.len()], shape, PatchGrid::new(16, 16, 4).unwrap());
        assert!(e.iter().all(|&v| v == 0.0), "{e:?}");
    }

    #[test]
    fn bad_arguments_are_errors_naming_the_problem() {
        let shape = ImageBatchShape { n: 1, height: 30, width: 32 };
        let images = Buffer::Cpu(vec![0.0f32; shape.len()]);
        let message = |r: Result<Buffer<f32>>| r.err().expect("should fail").to_string();
        assert!(message(edge_map(&Device::Cpu, &images, shape, 16)).contains("does not divide the image size 30×32"));
        assert!(message(edge_map(&Device::Cpu, &images, shape, 0)).contains("patch size is 0"));
        let empty = ImageBatchShape { n: 1, height: 0, width: 32 };
        assert!(message(edge_map(&Device::Cpu, &Buffer::Cpu(Vec::<f32>::new()), empty, 2)).contains("empty"));
        let none = ImageBatchShape { n: 0, ..shape };
        assert!(message(edge_map(&Device::Cpu, &Buffer::Cpu(Vec::<f32>::new()), none, 2)).contains("n = 0"));
        let short = Buffer::Cpu(vec![0.0f32; shape.len() - 1]);
        assert!(message(edge_map(&Device::Cpu, &short, shape, 2)).contains("needs 2880"));
    }

    #[test]
    fn bf16_input_equals_f32_input_of_the_same_values() {
        let shape = ImageBatchShape { n: 2, height: 16, width: 24 };
        let bf: Vec<half::bf16> = random_images(shape, 3).into_iter().map(half::bf16::from_f32).collect();
        let widened: Vec<f32> = bf.iter().map(|v| v.to_f32()).collect();
        let from_bf16 = edge_map(&Device::Cpu, &Buffer::Cpu(bf), shape, 8).unwrap().to_vec().unwrap();
        let from_f32 = edge_map(&Device::Cpu, &Buffer::Cpu(widened), shape, 8).unwrap().to_vec().unwrap();
        assert_eq!(from_bf16, from_f32);
    }
}
