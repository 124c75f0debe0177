//! The `clip-pgs` binary as a user runs it.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Output, Stdio};

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
    // Every device is listed, the emulator with what it is for.
    for line in ["\n  cpu   ", "\n  cuda  ", "\n  emu   the GPU kernels on the SIMT emulator"] {
        assert!(stdout.contains(line), "{line:?} missing from: {stdout}");
    }
    let emu = clip_pgs(&["devices", "--device", "emu"]);
    assert!(text(&emu.stdout).starts_with("device: emu ("), "{}", text(&emu.stdout));
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
    // Image, edge map, and the 64-pixel scale.
    assert_eq!(picture.dimensions(), (448 + 64, 224));
    // The scale: a ramp from white (E = 1, top) to black (E = 0, bottom) right of the map.
    let ramp_x = 448 + 8 + 6;
    assert_eq!(picture.get_pixel(ramp_x, 6).0, [255; 3]);
    assert_eq!(picture.get_pixel(ramp_x, 224 - 7).0, [0; 3]);
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

/// A tiny run's flags: test-tiny, 2 steps of 32 on shapes, 16 held-out samples; `extra` adds
/// flags or replaces these.
fn tiny_train(logs: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let base = [
        ("--model", "test-tiny"),
        ("--train-num-samples", "64"),
        ("--batch-size", "32"),
        ("--epochs", "1"),
        ("--eval-samples", "16"),
        ("--warmup", "1"),
        ("--workers", "1"),
        ("--device", "cpu"),
        ("--logs", logs.to_str().unwrap()),
        ("--name", name),
    ];
    let mut args = vec!["train".to_string()];
    for (flag, value) in base.into_iter().filter(|(flag, _)| !extra.contains(flag)) {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs clip-pgs with stdout a pipe whose reader takes `lines` lines and closes it (`| head -N`).
fn into_head(args: &[String], lines: usize) -> (Output, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_clip-pgs"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs clip-pgs");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let head: Vec<String> = stdout.lines().take(lines).map(Result::unwrap).collect();
    // The reader goes away here, as head's does.
    let out = child.wait_with_output().unwrap();
    (out, head)
}

#[test]
fn a_closed_stdout_ends_output_quietly_and_the_work_completes() {
    let logs = tempfile::tempdir().unwrap();
    let (out, head) = into_head(&tiny_train(logs.path(), "pipe", &[]), 3);
    assert_eq!(head.len(), 3);
    assert!(out.status.success(), "train | head -3: {:?} {}", out.status, text(&out.stderr));
    assert!(!text(&out.stderr).contains("panicked"), "{}", text(&out.stderr));
    let run = logs.path().join("pipe");
    for file in ["loss.png", "masks.png", "model.safetensors", "checkpoints/epoch_1.safetensors"] {
        assert!(run.join(file).exists(), "{file} was not written after stdout closed");
    }
    let checkpoint = run.join("model.safetensors");
    let image = common::repo_path("tests/data/chelsea_64.png");
    let png = logs.path().join("grid.png");
    for (args, lines, file) in [
        (vec!["eval", "--checkpoint", checkpoint.to_str().unwrap(), "--eval-samples", "16"], 1, None),
        (
            vec!["mask", "--image", image.to_str().unwrap(), "--size", "64", "--patch", "8", "--grid", "--out"],
            0,
            Some(&png),
        ),
        (vec!["edges", "--image", image.to_str().unwrap(), "--device", "cpu", "--size", "64", "--out"], 1, Some(&png)),
    ] {
        let mut args: Vec<String> = args.into_iter().map(String::from).collect();
        if let Some(file) = file {
            args.push(file.to_str().unwrap().into());
            let _ = std::fs::remove_file(file);
        }
        let (out, _) = into_head(&args, lines);
        assert!(out.status.success(), "{args:?} | head -{lines}: {:?} {}", out.status, text(&out.stderr));
        assert!(!text(&out.stderr).contains("panicked"), "{}", text(&out.stderr));
        assert!(file.is_none_or(|f| f.exists()), "{args:?}: the picture was not written");
    }
    // `2>&1 | head -0`: an error message into a closed pipe still exits 1, not with a panic's 101.
    let mut child = Command::new(env!("CARGO_BIN_EXE_clip-pgs"))
        .args(["edges", "--image", "/no/such.png", "--device", "cpu"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop((child.stdout.take(), child.stderr.take()));
    assert_eq!(child.wait().unwrap().code(), Some(1));
}

#[test]
fn a_log_file_gets_every_line_and_no_progress_bar() {
    let logs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut rows = String::from("filepath\ttitle\n");
    for i in 0..33 {
        let file = data.path().join(format!("{i}.png"));
        if i == 7 {
            std::fs::write(&file, b"\x89PNG\r\n\x1a\nbroken").unwrap();
        } else {
            image::RgbImage::from_pixel(8, 8, image::Rgb([i as u8 * 7, 80, 160])).save(&file).unwrap();
        }
        rows += &format!("{i}.png\ta picture {i}\n");
    }
    std::fs::write(data.path().join("data.tsv"), rows).unwrap();
    let csv = format!("csv:{}", data.path().join("data.tsv").display());
    // No --no-progress: stdout and stderr are pipes here, so the bar hides by itself.
    let args = tiny_train(logs.path(), "log", &["--data", &csv, "--val-data", "shapes", "--train-num-samples", "33"]);
    let out = Command::new(env!("CARGO_BIN_EXE_clip-pgs")).args(&args).output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("skipped 1 corrupt samples: sample 7: "), "{stdout}");
    assert!(stdout.contains("\nepoch 1: zeroshot_top1 "), "{stdout}");
    assert!(!stderr.contains("steps") && !stderr.contains('█'), "a progress bar reached a pipe: {stderr}");
}

#[test]
fn run_folders_are_never_mixed_and_names_stay_inside_logs() {
    let logs = tempfile::tempdir().unwrap();
    let first = clip_pgs(&tiny_train(logs.path(), "same", &[]).iter().map(String::as_str).collect::<Vec<_>>());
    let stdout = text(&first.stdout);
    assert!(first.status.success(), "{}", text(&first.stderr));
    // Two steps, under --log-every-n-steps: the loss curve still has its last point.
    assert!(stdout.contains("(metrics.jsonl, loss.png, masks.png, checkpoints/, model.safetensors)"), "{stdout}");
    assert!(logs.path().join("same/loss.png").exists());
    let dir = logs.path().join("same");
    for (extra, code, expected) in [
        (vec![], 1, format!("{} already holds a run: pass --resume latest", dir.display())),
        (vec!["--resume", "latest"], 1, "the run finished there (2 of 2 steps): nothing to resume".into()),
        (vec!["--resume", "latest", "--overwrite"], 2, "cannot be used with".into()),
    ] {
        let out = clip_pgs(&tiny_train(logs.path(), "same", &extra).iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(out.status.code(), Some(code), "{extra:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(&expected), "{extra:?}: {}", text(&out.stderr));
    }
    let again =
        clip_pgs(&tiny_train(logs.path(), "same", &["--overwrite"]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(again.status.success(), "{}", text(&again.stderr));
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.matches("\"loss\"").count(), 1, "only the new run's record: {metrics}");

    let inner = logs.path().join("inner");
    for name in ["../escaped", "a/b", ".."] {
        let out = clip_pgs(&tiny_train(&inner, name, &[]).iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains("a run name is one folder name"), "{name}: {}", text(&out.stderr));
    }
    assert!(!logs.path().join("escaped").exists() && !inner.exists(), "nothing written for a refused name");
}

#[test]
fn ctrl_c_writes_a_part_epoch_checkpoint_and_exits_130() {
    let logs = tempfile::tempdir().unwrap();
    let args = tiny_train(logs.path(), "stop", &["--train-num-samples", "6400", "--zeroshot-frequency", "0"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_clip-pgs"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // Training starts after the "model:" line; the handler is installed by then.
    let mut line = String::new();
    while !line.starts_with("model:") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "no model line");
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{rest} {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("interrupted (resume with --resume latest)"), "{}", text(&out.stderr));
    let names: Vec<String> = std::fs::read_dir(logs.path().join("stop/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("epoch_1_step_") && names[0].ends_with(".safetensors"), "{names:?}");
    assert!(
        rest.contains(&format!(
            "checkpoint {} written",
            logs.path().join("stop/checkpoints").join(&names[0]).display()
        )),
        "{rest}"
    );
}

#[test]
fn non_finite_losses_stop_the_run_with_a_true_message() {
    let logs = tempfile::tempdir().unwrap();
    let args = tiny_train(logs.path(), "nan", &["--test-nonfinite-loss-at", "0,1", "--max-bad-steps", "2"]);
    let out = clip_pgs(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(1));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.contains("step 0: loss NaN") && stdout.contains("step 1: loss NaN"), "{stdout}");
    assert!(
        stderr.contains(
            "2 consecutive steps had a non-finite loss or gradient: stopping at step 1; no checkpoint was written yet"
        ),
        "{stderr}"
    );
    // The hook is hidden from --help: it is for tests only.
    assert!(!text(&clip_pgs(&["train", "--help"]).stdout).contains("nonfinite"));
}

#[test]
fn flag_values_get_range_errors_and_the_messages_are_true() {
    let image = common::repo_path("tests/data/chelsea_64.png");
    let image = image.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unwritable = dir.path().join("no/such/dir/out.png");
    let unwritable = unwritable.to_str().unwrap();
    for (args, code, expected) in [
        (vec!["train", "--lr", "-1", "--device", "cpu"], 1, "--lr -1 is not a positive number"),
        (vec!["train", "--beta2", "-0.5"], 1, "--beta2 -0.5 is not in [0, 1)"),
        (vec!["train", "--grad-clip-norm", "-1"], 1, "--grad-clip-norm -1 is not a positive number"),
        (vec!["train", "--seed", "-1"], 2, "invalid value '-1' for '--seed <SEED>': -1 is not in 0.."),
        (vec!["train", "--epochs", "-3"], 2, "-3 is not in 1.."),
        (vec!["train", "--eval-samples", "0"], 2, "invalid value '0' for '--eval-samples <EVAL_SAMPLES>'"),
        (vec!["eval", "--checkpoint", "x", "--eval-samples", "0"], 2, "'--eval-samples <EVAL_SAMPLES>'"),
        (vec!["train", "--mask-ratio", "0", "--device", "cpu"], 1, "PGS always masks its candidate patches"),
        (vec!["mask", "--image", image, "--grid", "--mode", "flip", "--out", "x.png"], 2, "cannot be used with"),
        (vec!["mask", "--image", image, "--mask-ratio", "0", "--out", "x.png"], 1, "PGS always masks"),
        (vec!["mask", "--image", image, "--mask-ratio", "-0.5", "--out", "x.png"], 1, "--mask-ratio -0.5: expected"),
        (vec!["mask", "--image", image, "--size", "0", "--out", "x.png"], 2, "0 is not in 1.."),
        (vec!["edges", "--image", image, "--size", "0"], 2, "0 is not in 1.."),
        (vec!["edges", "--image", image, "--size", "64", "--device", "cpu", "--out", unwritable], 1, unwritable),
        (vec!["mask", "--image", image, "--size", "64", "--patch", "8", "--out", unwritable], 1, unwritable),
    ] {
        let out = clip_pgs(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("cannot read image"), "{args:?}: {stderr}");
    }
    // FLIP has a ratio 0: nothing masked.
    let png = dir.path().join("flip.png");
    let out = clip_pgs(&[
        "mask",
        "--image",
        image,
        "--size",
        "64",
        "--patch",
        "8",
        "--mode",
        "flip",
        "--mask-ratio",
        "0",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(text(&out.stdout).contains("flip       masks   0 of 64 patches"), "{}", text(&out.stdout));
}

#[test]
fn eval_reads_csv_data_with_the_same_flags_as_train() {
    let logs = tempfile::tempdir().unwrap();
    let out = clip_pgs(&tiny_train(logs.path(), "e", &[]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let data = tempfile::tempdir().unwrap();
    let mut rows = String::from("img;caption\n");
    for i in 0..4 {
        image::RgbImage::from_pixel(8, 8, image::Rgb([60 * i as u8, 0, 0]))
            .save(data.path().join(format!("{i}.png")))
            .unwrap();
        rows += &format!("{i}.png;red {i}\n");
    }
    std::fs::write(data.path().join("d.csv"), rows).unwrap();
    let checkpoint = logs.path().join("e/model.safetensors");
    let csv = format!("csv:{}", data.path().join("d.csv").display());
    let out = clip_pgs(&[
        "eval",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--data",
        &csv,
        "--csv-img-key",
        "img",
        "--csv-caption-key",
        "caption",
        "--csv-separator",
        ";",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("(4 samples used, 0 skipped)"), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("image_to_text_R@1"), "{}", text(&out.stdout));
}

/// `DIR/t10k-*.gz`: a held-out Fashion-MNIST split of 16 images in the IDX format.
fn fashion_mnist_eval_split(dir: &Path) {
    use std::io::Write;
    let n = 16u32;
    let mut images: Vec<u8> = [2051u32, n, 28, 28].iter().flat_map(|w| w.to_be_bytes()).collect();
    images.extend((0..n as usize * 784).map(|i| ((i / 784) * 16 + i % 7) as u8));
    let mut labels: Vec<u8> = [2049u32, n].iter().flat_map(|w| w.to_be_bytes()).collect();
    labels.extend((0..n).map(|i| (i % 10) as u8));
    for (name, bytes) in [("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)] {
        let file = std::fs::File::create(dir.join(name)).unwrap();
        let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        gz.finish().unwrap();
    }
}

#[test]
fn zeroshot_png_draws_one_chart_per_data_set() {
    let logs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    fashion_mnist_eval_split(data.path());
    let fmnist = format!("fashion-mnist:{}", data.path().display());
    for (name, extra) in [("a", vec![]), ("b", vec!["--seed", "1"]), ("c", vec!["--val-data", &fmnist])] {
        let out = clip_pgs(&tiny_train(logs.path(), name, &extra).iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
    }
    // Runs a and b on shapes share a chart, run c on Fashion-MNIST has its own: 2 charts of 450 px.
    let chart = image::open(logs.path().join("zeroshot.png")).unwrap();
    assert_eq!((chart.width(), chart.height()), (900, 2 * 450));
}
