//! Helpers shared by the integration tests: the committed photos and golden files.
#![allow(dead_code)] // each test binary uses a part

use std::path::PathBuf;

use clip_pgs_host::ops::edge_map::ImageBatchShape;
use clip_pgs_host::{Device, DevicePreference};
use clip_pgs_kernels::philox::Philox;

pub const PHOTOS: [&str; 3] = ["astronaut", "coffee", "chelsea"];
pub const SIZES: [usize; 2] = [224, 64];

/// A path in the repository: under the current directory when it is a checkout (test binaries
/// copied to a GPU machine run from its copy of the tree), else where the tests were built.
pub fn repo_path(relative: &str) -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_default();
    let root = if cwd.join("tests/data").is_dir() { cwd } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")) };
    root.join(relative)
}

/// The CLIP-normalized tensor [3, size, size] of `tests/data/<name>_<size>.png`.
pub fn photo(name: &str, size: usize) -> Vec<f32> {
    let path = repo_path(&format!("tests/data/{name}_{size}.png"));
    clip_pgs_model::preprocess::load_image(&path, size as u32).expect("committed test photo").normalized
}

/// All photos of one size as a batch [3 photos, 3, size, size].
pub fn photo_batch(size: usize) -> (Vec<f32>, ImageBatchShape) {
    let images = PHOTOS.iter().flat_map(|name| photo(name, size)).collect();
    (images, ImageBatchShape { n: PHOTOS.len(), height: size, width: size })
}

/// Uniform noise in [-2, 2) (the range of CLIP-normalized pixels), from Philox.
pub fn noise_batch(shape: ImageBatchShape, seed: u64) -> Vec<f32> {
    let rng = Philox::new(seed, 1, 0);
    (0..shape.len() as u32).map(|i| rng.uniform(i) * 4.0 - 2.0).collect()
}

/// A golden safetensors file of tests/goldens.
pub fn golden(name: &str) -> Vec<u8> {
    std::fs::read(repo_path(&format!("tests/goldens/{name}"))).unwrap_or_else(|e| panic!("golden {name}: {e}"))
}

/// A tensor of a golden file as f32 (stored as f32 or f64), i64 or u8 widened to f64.
pub fn tensor_f64(file: &safetensors::SafeTensors, name: &str) -> Vec<f64> {
    let view = file.tensor(name).unwrap_or_else(|e| panic!("golden tensor {name}: {e}"));
    let bytes = view.data();
    match view.dtype() {
        safetensors::Dtype::F32 => {
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect()
        }
        safetensors::Dtype::F64 => bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
        safetensors::Dtype::I64 => {
            bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect()
        }
        safetensors::Dtype::U8 => bytes.iter().map(|&b| b as f64).collect(),
        other => panic!("golden tensor {name}: unexpected dtype {other:?}"),
    }
}

pub fn tensor_f32(file: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    tensor_f64(file, name).into_iter().map(|v| v as f32).collect()
}

/// Largest |a − b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The GPU device the kernel tests run on: the emulator (`emu`) unless `CLIP_PGS_TEST_DEVICE=cuda`,
/// which requires a CUDA GPU (the test fails without one; it never passes silently).
pub fn gpu() -> Device {
    let preference = match std::env::var("CLIP_PGS_TEST_DEVICE").as_deref() {
        Ok("cuda") => DevicePreference::Cuda,
        Ok("emu") | Err(_) => DevicePreference::Emu,
        Ok(other) => panic!("CLIP_PGS_TEST_DEVICE={other}: expected emu or cuda"),
    };
    Device::select(preference)
        .unwrap_or_else(|e| panic!("the GPU tests were asked to run on {preference:?}: {e}"))
        .device
}

/// The bf16 values nearest to `v` (ties to even, the kernels' rounding).
pub fn bf16s(v: &[f32]) -> Vec<clip_pgs_host::bf16> {
    use clip_pgs_host::ops::dtype::Float;
    v.iter().map(|&x| Float::from_f32(x)).collect()
}

/// bf16 values widened to f32 (exact).
pub fn widen(v: &[clip_pgs_host::bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// `v` as a bf16 tensor holds it: rounded to bf16 and widened back.
pub fn rounded(v: &[f32]) -> Vec<f32> {
    widen(&bf16s(v))
}

/// The rounding of a value stored in bf16, relative to the value: at most half an ulp, which is
/// |x|·2⁻⁸ at most (8 significant bits: 7 stored and the implicit one; the unit roundoff u).
pub const BF16_ROUNDING: f32 = 1.0 / 256.0;

/// `v` uploaded to `device` as elements of type T (rounded to nearest even for bf16).
pub fn upload_as<T: clip_pgs_host::ops::dtype::Float>(device: &Device, v: &[f32]) -> clip_pgs_host::Buffer<T> {
    let values: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    device.upload(&values).expect("upload")
}

/// A buffer's values, widened to f32.
pub fn download<T: clip_pgs_host::ops::dtype::Float>(b: &clip_pgs_host::Buffer<T>) -> Vec<f32> {
    b.to_vec().expect("download").into_iter().map(|x| x.to_f32()).collect()
}

/// `v` as values of type T hold it: itself for f32, rounded to bf16 for bf16.
pub fn held<T: clip_pgs_host::ops::dtype::Float>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}
