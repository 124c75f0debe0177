//! The CPU edge map against OpenCV (tools/golden_edge_map.py: cv2.Sobel ksize 3,
//! BORDER_REPLICATE, float64) on real photos from scikit-image, 224×224 and 64×64, patch 16.

mod common;

use clip_pgs_host::ops::edge_map::{ImageBatchShape, PatchGrid, edge_map_cpu, sobel_magnitude_map};
use common::{PHOTOS, SIZES, max_abs_diff, photo, repo_path};
use safetensors::SafeTensors;

const TOLERANCE: f32 = 1e-5;

fn golden_tensor(golden: &SafeTensors, name: &str) -> Vec<f32> {
    let view = golden.tensor(name).unwrap_or_else(|e| panic!("golden tensor {name}: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    f32_from_le_bytes(view.data())
}

fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

#[test]
fn cpu_edge_map_matches_opencv_on_real_photos() {
    let bytes = std::fs::read(repo_path("tests/goldens/edge_map_opencv.safetensors")).unwrap();
    let golden = SafeTensors::deserialize(&bytes).unwrap();
    for name in PHOTOS {
        for size in SIZES {
            let image = photo(name, size);
            let key = format!("{name}_{size}");

            let magnitude = sobel_magnitude_map(&image, size, size);
            let err = max_abs_diff(&magnitude, &golden_tensor(&golden, &format!("{key}.magnitude")));
            println!("{key}: Sobel magnitude max abs error {err:.2e}");
            assert!(err <= TOLERANCE, "{key}: magnitude differs from OpenCV by {err}");

            let shape = ImageBatchShape { n: 1, height: size, width: size };
            let edges = edge_map_cpu(&image, shape, PatchGrid::new(size, size, 16).unwrap());
            let want = golden_tensor(&golden, &format!("{key}.edges"));
            let err = max_abs_diff(&edges, &want);
            println!("{key}: E max abs error {err:.2e}");
            assert!(err <= TOLERANCE, "{key}: E differs from OpenCV by {err}");
            // The photos are not flat: E spans [0, 1].
            assert!(want.iter().any(|&e| e > 0.999) && want.contains(&0.0), "{key}: E should span [0, 1]");
        }
    }
}
