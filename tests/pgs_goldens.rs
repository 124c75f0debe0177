//! PGS against peers (tools/golden_pgs.py): Sinkhorn plans from POT, and the `reference` mode's
//! whole pipeline from a NumPy port of the public algorithm, fed the same uniform draws, plus the
//! reference edge grid from OpenCV.

mod common;

use clip_pgs_host::ops::edge_map::PatchGrid;
use clip_pgs_host::ops::pgs::patches::StandardizedPatches;
use clip_pgs_host::ops::pgs::sinkhorn::sinkhorn_log;
use clip_pgs_host::ops::pgs::{MaskRatio, PatchTokens, PgsConfig, PgsMode, REFERENCE_EPOCHS, reference_batch};
use common::{PHOTOS, golden, photo_batch, tensor_f32, tensor_f64};
use safetensors::SafeTensors;

/// The comma-separated names under `key` in the file's metadata.
fn metadata_names(file: &[u8], key: &str) -> Vec<String> {
    let (_, meta) = SafeTensors::read_metadata(file).unwrap();
    let value = meta.metadata().as_ref().and_then(|m| m.get(key).cloned()).unwrap_or_else(|| panic!("metadata {key}"));
    value.split(',').map(str::to_string).collect()
}

/// The value after `prefix` in a name like `nc10_L196_eps0.05` (fields separated by `_`).
fn setting<T: std::str::FromStr>(name: &str, prefix: &str) -> T {
    name.split('_')
        .find_map(|f| f.strip_prefix(prefix).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("{name}: no {prefix} setting"))
}

/// max |ours − POT| / max |POT|.
fn relative_error(ours: &[f32], pot: &[f64]) -> f64 {
    let scale = pot.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    ours.iter().zip(pot).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max) / scale
}

#[test]
fn sinkhorn_plans_match_pot() {
    let bytes = golden("sinkhorn_pot.safetensors");
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let cases = metadata_names(&bytes, "cases");
    assert_eq!(cases.len(), 5);
    for name in &cases {
        let (rows, cols, eps): (usize, usize, f32) = (setting(name, "nc"), setting(name, "L"), setting(name, "eps"));
        let s = tensor_f32(&file, &format!("{name}.s"));

        let converged = sinkhorn_log(&s, rows, cols, eps, 100_000, 1e-6);
        let err = relative_error(&converged.plan, &tensor_f64(&file, &format!("{name}.converged")));
        println!(
            "{name}: converged after {} iterations (L1 {:.1e}): {err:.2e} relative to POT",
            converged.iterations, converged.error
        );
        assert!(converged.error < 1e-6, "{name}: did not converge ({})", converged.error);
        assert!(err <= 1e-5, "{name}: converged plan differs from POT by {err}");

        let fifty = sinkhorn_log(&s, rows, cols, eps, 50, 0.0);
        assert_eq!(fifty.iterations, 50);
        let err = relative_error(&fifty.plan, &tensor_f64(&file, &format!("{name}.iter50")));
        println!("{name}: 50 iterations: {err:.2e} relative to POT");
        assert!(err <= 1e-5, "{name}: 50-iteration plan differs from POT by {err}");
    }
}

#[test]
fn reference_pipeline_masks_equal_the_numpy_port() {
    let bytes = golden("pgs_reference_numpy.safetensors");
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (images, shape) = photo_batch(224);
    let grid = PatchGrid::new(224, 224, 16).unwrap();
    let l = grid.len();
    let tokens = tensor_f32(&file, "tokens");
    let configs = metadata_names(&bytes, "configs");
    assert_eq!(configs.len(), 5);
    for name in &configs {
        let epoch: usize = setting(name, "e");
        let cfg = PgsConfig {
            mode: PgsMode::Reference,
            ratio: MaskRatio::Fixed(setting(name, "r")),
            use_ed: setting::<u8>(name, "ed") == 1,
            use_otn: setting::<u8>(name, "otn") == 1,
        };
        let tokens = (epoch > 0).then_some(PatchTokens { tokens: &tokens, dim: tokens.len() / (PHOTOS.len() * l) });
        let alpha = epoch as f32 / REFERENCE_EPOCHS as f32;
        let draws = tensor_f32(&file, &format!("{name}.draws"));
        let masks = reference_batch(&images, shape, grid, tokens, &cfg, alpha, &draws);

        let want_kept = tensor_f64(&file, &format!("{name}.kept"));
        let want_candidates = tensor_f64(&file, &format!("{name}.candidates"));
        let n_c = want_candidates.len() / PHOTOS.len();
        for (n, mask) in masks.iter().enumerate() {
            let kept: Vec<u32> = (0..l as u32).filter(|&j| want_kept[n * l + j as usize] == 1.0).collect();
            assert_eq!(mask.kept, kept, "{name}, {}: kept patches differ from the NumPy port", PHOTOS[n]);
            let mut candidates = mask.candidates.clone();
            candidates.sort_unstable();
            let want: Vec<u32> = want_candidates[n * n_c..(n + 1) * n_c].iter().map(|&c| c as u32).collect();
            assert_eq!(candidates, want, "{name}, {}: candidates differ", PHOTOS[n]);
        }
        println!("{name}: {} kept per image, identical to the NumPy port", masks[0].kept.len());
    }
}

#[test]
fn reference_edge_grid_matches_numpy_exactly_and_opencv_closely() {
    let bytes = golden("pgs_reference_numpy.safetensors");
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (images, shape) = photo_batch(224);
    let grid = PatchGrid::new(224, 224, 16).unwrap();
    let numpy = tensor_f32(&file, "reference_edges.numpy");
    let opencv = tensor_f32(&file, "reference_edges.opencv");
    let l = grid.len();
    for n in 0..shape.n {
        let image = &images[n * shape.image_len()..(n + 1) * shape.image_len()];
        let ours = StandardizedPatches::new(image, 224, 224, grid).reference_edge_grid();
        assert_eq!(ours, numpy[n * l..(n + 1) * l], "{}: differs from the NumPy port", PHOTOS[n]);
        let err = common::max_abs_diff(&ours, &opencv[n * l..(n + 1) * l]);
        println!("{}: reference edge grid vs OpenCV (BORDER_CONSTANT): max abs {err:.2e}", PHOTOS[n]);
        assert!(err <= 1e-5, "{}: differs from OpenCV by {err}", PHOTOS[n]);
    }
}
