//! The `clip-pgs` binary as a user runs it.

mod common;

use std::process::{Command, Output};

fn clip_pgs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clip-pgs")).args(args).output().expect("runs clip-pgs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn says_which_device_it_runs_on_and_why_not_the_gpu() {
    let out = clip_pgs(&["devices"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // Either a GPU answered, or the line says it runs on the CPU and gives the reason.
    assert!(stdout.starts_with("device: cuda:") || stdout.starts_with("device: cpu, "), "{stdout}");
    if stdout.starts_with("device: cpu") {
        assert!(stdout.contains("(no usable GPU: "), "the CPU fallback must say why: {stdout}");
    }
}

#[test]
fn edges_prints_the_grid_and_writes_the_picture() {
    let out_png = std::env::temp_dir().join(format!("clip-pgs-cli-edges-{}.png", std::process::id()));
    let image = common::repo_path("tests/data/coffee_224.png");
    let out =
        clip_pgs(&["edges", "--image", image.to_str().unwrap(), "--device", "cpu", "--out", out_png.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("device: cpu"), "{stdout}");
    assert!(stdout.contains("14×14 = 196 patches"), "{stdout}");
    let grid: Vec<&str> = stdout.lines().filter(|l| l.starts_with("  ")).map(str::trim).collect();
    assert_eq!(grid.len(), 14, "{stdout}");
    assert!(grid.iter().all(|row| row.len() == 14 && row.bytes().all(|b| b.is_ascii_digit())));
    assert!(grid.concat().contains('9') && grid.concat().contains('0'), "E spans [0, 1]: {stdout}");
    let picture = image::open(&out_png).expect("a PNG was written").to_rgb8();
    assert_eq!(picture.dimensions(), (448, 224));
    std::fs::remove_file(out_png).unwrap();
}

#[test]
fn bad_input_is_a_one_line_error_not_a_panic() {
    let image = common::repo_path("tests/data/coffee_64.png");
    let image = image.to_str().unwrap();
    for (args, expected) in [
        (vec!["edges", "--image", "/no/such.png", "--device", "cpu"], "cannot read image /no/such.png"),
        (
            vec!["edges", "--image", image, "--size", "64", "--patch", "24", "--device", "cpu"],
            "patch size 24 does not divide",
        ),
        (vec!["edges", "--image", image, "--patch", "0", "--device", "cpu"], "patch size is 0"),
        (vec!["edges", "--image", image, "--device", "tpu"], "unknown device 'tpu'"),
        (vec!["train", "--data", "csv:/no/such/file.tsv", "--device", "cpu"], "/no/such/file.tsv"),
        (vec!["train", "--mask-ratio", "2", "--device", "cpu"], "--mask-ratio \"2\""),
        (vec!["train", "--mask", "flip", "--mask-ratio", "dynamic", "--device", "cpu"], "FLIP needs a number"),
        (vec!["eval", "--checkpoint", "/no/such.safetensors"], "/no/such.safetensors"),
    ] {
        let out = clip_pgs(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
