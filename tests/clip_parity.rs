//! The CLIP step against open_clip (tools/golden_open_clip.py) on the CPU device and on the GPU
//! path: features, logits, loss, every gradient and the loss over AdamW steps, for two small
//! configs, unmasked and with a keep-gather.

mod common;

use clip_pgs_host::Device;
use clip_pgs_model::golden::Golden;
use clip_pgs_model::precision::Dtype;

fn check_goldens(device: &Device, dtype: Dtype) {
    for name in ["tiny-a_unmasked", "tiny-a_masked", "tiny-b_unmasked", "tiny-b_masked"] {
        let golden = Golden::load(&common::repo_path(&format!("tests/goldens/clip_{name}.safetensors"))).unwrap();
        let (report, ok) = golden.check(device, dtype).unwrap();
        println!("{name} on {device} in {dtype}\n{report}");
        assert!(ok, "{name}: parity with open_clip failed on {device} in {dtype}\n{report}");
    }
}

#[test]
fn cpu_clip_matches_open_clip_goldens() {
    check_goldens(&Device::Cpu, Dtype::F32);
}

/// The GPU path (Rust kernels and cuBLASLt; on the emulator in `cargo test`, on CUDA with
/// `CLIP_PGS_TEST_DEVICE=cuda`) within the CPU device's bounds in f32 (1e-4, gradients 1e-3),
/// and within the bf16 bounds (3e-2, gradients 5e-2) with bf16 activations and weights.
#[test]
fn gpu_clip_matches_open_clip_goldens() {
    check_goldens(&common::gpu(), Dtype::F32);
    check_goldens(&common::gpu(), Dtype::Bf16);
}

#[test]
fn bf16_on_the_cpu_device_is_refused() {
    let golden = Golden::load(&common::repo_path("tests/goldens/clip_tiny-a_masked.safetensors")).unwrap();
    let e = golden.check(&Device::Cpu, Dtype::Bf16).unwrap_err();
    assert!(e.contains("--dtype bf16 runs on the GPU devices"), "{e}");
}

#[test]
fn bad_batches_and_checkpoints_are_errors_naming_the_problem() {
    use clip_pgs_model::clip::Clip;
    use clip_pgs_model::params::Layout;
    let golden = Golden::load(&common::repo_path("tests/goldens/clip_tiny-a_masked.safetensors")).unwrap();
    let layout = Layout::new(&golden.config);
    let clip = Clip::new(&golden.config, &layout, false);
    let mut text = golden.text.clone();
    text[17] = 600;
    let error =
        |images: &[f32], text: &[u32], keep: Option<&[Vec<usize>]>| clip.check_batch(images, text, keep).unwrap_err();
    assert!(error(&golden.image, &text, None).contains("token id 600 of caption 1 is out of range"));
    let unsorted = vec![vec![3, 1]; 4];
    assert!(error(&golden.image, &golden.text, Some(&unsorted)).contains("not strictly ascending"));
    let outside = vec![vec![1, 16]; 4];
    assert!(error(&golden.image, &golden.text, Some(&outside)).contains("keep index 16 of image 0"));
    assert!(error(&golden.image[1..], &golden.text, None).contains("not a positive multiple"));

    // Checkpoint tensors against the config: the first wrong tensor is named.
    let named = golden.params.named().unwrap();
    let pack = |tensors: &[(String, Vec<usize>, Vec<f32>)]| {
        layout.pack(tensors.iter().map(|(n, s, v)| (n.as_str(), s.as_slice(), v.clone()))).unwrap_err()
    };
    let without: Vec<_> = named.iter().filter(|t| t.0 != "visual.proj").cloned().collect();
    assert!(pack(&without).contains("tensor visual.proj is missing"));
    let mut reshaped = named.clone();
    reshaped.iter_mut().find(|t| t.0 == "ln_final.weight").unwrap().1 = vec![31];
    assert!(pack(&reshaped).contains("tensor ln_final.weight has shape [31]"));
    let mut extra = named.clone();
    extra.push(("extra.weight".into(), vec![2], vec![0.0; 2]));
    assert!(pack(&extra).contains("tensor extra.weight is not a parameter"));
    assert!(
        Golden::load(&common::repo_path("tests/goldens/sinkhorn_pot.safetensors"))
            .err()
            .unwrap()
            .contains("not a clip-golden-v1 file")
    );
}

#[test]
fn checkpoints_round_trip_and_read_open_clip_state_dicts() {
    use clip_pgs_model::checkpoint::{load, save};
    // The golden files are open_clip state dicts (safetensors.torch.save_file): load one.
    let path = common::repo_path("tests/goldens/clip_tiny-b_unmasked.safetensors");
    let golden = Golden::load(&path).unwrap();
    let (_, params) = load(&path, Some(&golden.config)).unwrap();
    assert_eq!(params, golden.params);
    // Write it, read it back with the config from the metadata: identical.
    let out = std::env::temp_dir().join(format!("clip-pgs-checkpoint-{}.safetensors", std::process::id()));
    let config_json = r#"{"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 24, "patch_size": 4, "head_width": 8, "mlp_ratio": 2.0}, "text_cfg": {"context_length": 8, "vocab_size": 300, "width": 16, "heads": 4, "layers": 2}}"#;
    save(&out, config_json, &params).unwrap();
    let (config, back) = load(&out, None).unwrap();
    assert_eq!((config, back), (golden.config.clone(), params));
    std::fs::remove_file(&out).unwrap();
    // Another config's checkpoint is refused with the tensor named.
    let other = clip_pgs_model::config::ClipConfig::load("test-tiny").unwrap();
    assert!(load(&path, Some(&other)).unwrap_err().contains("tensor"));
}
