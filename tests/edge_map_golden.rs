//! The CPU edge map against OpenCV (tools/golden_edge_map.py: cv2.Sobel ksize 3,
//! BORDER_REPLICATE, float64) on real photos from scikit-image, 224×224 and 64×64, patch 16.

mod common;

use clip_pgs_host::ops::edge_map::{ImageBatchShape, PatchGrid, edge_map_cpu, sobel_magnitude_map};
use common::{PHOTOS, SIZES, max_abs_diff, photo, tensor_f32 as golden_tensor};
use safetensors::SafeTensors;

const TOLERANCE: f32 = 1e-5;

#[test]
fn cpu_edge_map_matches_opencv_on_real_photos() {
    let bytes = common::golden("edge_map_opencv.safetensors");
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
