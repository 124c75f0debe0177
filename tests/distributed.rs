//! Data-parallel training under `mpirun` (built with `--features mpi`; `.ci/run` installs Open MPI
//! and runs these): 2 ranks of batch 16 train as 1 process of batch 32, with open_clip's
//! `--gather-with-grad`, with and without `--local-loss`, without masks and with FLIP and PGS
//! masks, on the CPU and on the GPU path (the emulator; on 2 GPUs with NCCL, ignored without
//! them); a 2-rank run resumed from its checkpoint is the uninterrupted one bit for bit, on
//! `shapes` and on webdataset read by shard; a rank killed mid-run ends the other, and so does a
//! rank that hangs, after the collective timeout.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use clip_pgs_model::checkpoint;
use clip_pgs_model::train::latest_checkpoint;

/// test-tiny on 160 shapes without masks: 5 steps of 32 per epoch, 2 epochs; a metrics record
/// per step. A flag in `extra` replaces its default here.
fn train_args(logs: &Path, name: &str, batch: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["train".into(), "--logs".into(), logs.display().to_string()];
    args.extend(["--name".into(), name.into(), "--batch-size".into(), batch.to_string()]);
    let defaults = [
        ("--model", "test-tiny"),
        ("--data", "shapes"),
        ("--mask", "none"),
        ("--train-num-samples", "160"),
        ("--epochs", "2"),
        ("--eval-samples", "16"),
        ("--zeroshot-frequency", "0"),
        ("--log-every-n-steps", "1"),
        ("--workers", "1"),
        ("--warmup", "2"),
        ("--seed", "1"),
    ];
    for (flag, value) in defaults.into_iter().filter(|(flag, _)| !extra.contains(flag)) {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `clip-pgs ARGS` as `ranks` processes under mpirun (as root too: CI runs as root), each on
/// one thread so that 2 ranks share 2 cores.
fn mpirun(ranks: usize, args: &[String]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "--bind-to", "none", "-np", &ranks.to_string()]);
    cmd.args(["-x", "RAYON_NUM_THREADS=1", env!("CARGO_BIN_EXE_clip-pgs")]).args(args);
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}

fn succeeded(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what}: {}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The loss of each step in a run's metrics.jsonl.
fn losses(run: &Path) -> BTreeMap<u64, f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let records = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    records.filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?))).collect()
}

/// The difference of each tensor of two models relative to the tensor, ‖a − b‖ / ‖a‖ (summation
/// order alone moves the small biases, whose AdamW steps are gradient / √v, by a few 1e-8
/// absolute: 1e-5 of their largest value); the worst tensor. Not the key biases (the middle third of `in_proj_bias`): their exact
/// gradient is zero (a softmax does not see a constant added to every score of a query), so
/// what they get is rounding noise, which AdamW scales up to steps of the learning rate's size in
/// any run that sums in another order.
fn worst_parameter_difference(a: &Path, b: &Path) -> (String, f32) {
    let ((_, a), (_, b)) = (checkpoint::load(a, None).unwrap(), checkpoint::load(b, None).unwrap());
    let (a, b) = (a.named().unwrap(), b.named().unwrap());
    let mut worst = (String::new(), 0.0f32);
    for ((name, _, x), (_, _, y)) in a.iter().zip(&b) {
        let third = x.len() / 3;
        let key_bias = |i: &usize| name.ends_with("attn.in_proj_bias") && (third..2 * third).contains(i);
        let values = || x.iter().zip(y).enumerate().filter(|(i, _)| !key_bias(i)).map(|(_, v)| v);
        let norm = values().map(|(p, _)| p * p).sum::<f32>().sqrt().max(1e-12);
        let d = values().map(|(p, q)| (p - q).powi(2)).sum::<f32>().sqrt() / norm;
        if d > worst.1 {
            worst = (name.clone(), d);
        }
    }
    worst
}

/// 1 process of batch 32 and 2 ranks of 16 with each of `modes` (run names and flags), on the
/// device `extra` names: the same losses and final parameters within 1e-5.
fn two_ranks_train_as_one_process(extra: &[&str], modes: &[(&str, &[&str])]) {
    let logs = tempfile::tempdir().unwrap();
    let one = Command::new(env!("CARGO_BIN_EXE_clip-pgs")).args(train_args(logs.path(), "one", 32, extra)).output();
    succeeded("1 process", one.unwrap());
    let reference = losses(&logs.path().join("one"));
    assert_eq!(reference.len(), 10);
    for (name, flags) in modes {
        let flags: Vec<&str> = flags.iter().chain(extra).copied().collect();
        let out = succeeded(name, mpirun(2, &train_args(logs.path(), name, 16, &flags)).output().unwrap());
        assert!(out.contains("rank 0 of 2, engine: mpi") && out.contains("rank 1 of 2"), "{out}");
        assert!(out.contains(" steps of 32"), "{out}");
        let got = losses(&logs.path().join(name));
        assert_eq!(got.len(), 10, "{name}: {got:?}");
        for ((step, want), (_, have)) in reference.iter().zip(&got) {
            let rel = (have - want).abs() / want.abs();
            eprintln!("{name} step {step}: loss {have} vs {want} (relative {rel:.1e})");
            assert!(rel <= 1e-5, "{name} step {step}: 2 ranks {have}, 1 process {want}");
        }
        let model = |run: &str| logs.path().join(run).join("model.safetensors");
        let (tensor, worst) = worst_parameter_difference(&model("one"), &model(name));
        eprintln!("{name}: final parameters within {worst:.1e} relative, ‖a − b‖ / ‖a‖ (worst: {tensor})");
        assert!(worst <= 1e-5, "{name}: {tensor} differs by {worst:.1e}");
    }
}

const GATHER: (&str, &[&str]) = ("gather", &["--gather-with-grad"]);
const LOCAL: (&str, &[&str]) = ("local", &["--gather-with-grad", "--local-loss"]);

#[test]
fn two_ranks_of_16_train_as_one_process_of_32() {
    two_ranks_train_as_one_process(&["--device", "cpu"], &[GATHER, LOCAL]);
}

/// FLIP and PGS masks are drawn per image of the global batch: rank 1's image i has the draws of
/// the one-process batch's image 16 + i, so masked training matches too. PGS over one epoch of 10
/// steps: from the second, its similarity also weighs the patch tokens, which differ between the
/// runs in the last bits (summation order), enough to flip a near tie in the selection (measured:
/// the loss 1.8e-5 apart at the first step of epoch 2).
#[test]
fn with_flip_and_pgs_masks_two_ranks_train_as_one_process() {
    two_ranks_train_as_one_process(&["--device", "cpu", "--mask", "flip"], &[GATHER]);
    let pgs = ["--device", "cpu", "--mask", "pgs", "--train-num-samples", "320", "--epochs", "1"];
    two_ranks_train_as_one_process(&pgs, &[GATHER]);
}

/// The GPU path on the emulator, f32 to compare with the 1e-5 bound: with `--gather-with-grad`
/// the loss on the device over the features gathered by MPI in the emulator's memory; with
/// `--local-loss` on the host, the features read from and the gradients written to the device
/// arenas. Gradients averaged by MPI in the emulator's memory.
#[test]
fn on_the_emulator_two_ranks_train_as_one_process() {
    two_ranks_train_as_one_process(&["--device", "emu", "--dtype", "f32"], &[GATHER, LOCAL]);
}

/// On 2 GPUs, the gradients through NCCL: needs a machine with two, and `--features nccl`:
/// `cargo test --release --features nccl --test distributed -- --ignored`.
#[test]
#[ignore = "needs 2 CUDA GPUs and --features nccl"]
fn on_two_gpus_with_nccl_two_ranks_train_as_one_process() {
    two_ranks_train_as_one_process(&["--device", "cuda", "--dtype", "f32"], &[GATHER, LOCAL]);
}

#[test]
fn a_two_rank_run_resumed_from_its_checkpoint_is_the_uninterrupted_run() {
    let logs = tempfile::tempdir().unwrap();
    let flags = ["--gather-with-grad", "--device", "cpu"];
    succeeded("whole", mpirun(2, &train_args(logs.path(), "whole", 16, &flags)).output().unwrap());
    let epoch_1 = logs.path().join("whole/checkpoints/epoch_1.safetensors");
    let resume = ["--gather-with-grad", "--device", "cpu", "--resume", epoch_1.to_str().unwrap()];
    let out = succeeded("resumed", mpirun(2, &train_args(logs.path(), "resumed", 16, &resume)).output().unwrap());
    assert!(out.contains("resuming from") && out.contains("at step 5"), "{out}");
    let (whole, resumed) = (losses(&logs.path().join("whole")), losses(&logs.path().join("resumed")));
    assert_eq!(resumed.len(), 5);
    for (step, loss) in &resumed {
        assert_eq!(loss.to_bits(), whole[step].to_bits(), "step {step}: {loss} vs {}", whole[step]);
    }
    let (_, a) = checkpoint::load(&logs.path().join("whole/model.safetensors"), None).unwrap();
    let (_, b) = checkpoint::load(&logs.path().join("resumed/model.safetensors"), None).unwrap();
    assert!(a == b, "the resumed run's final model differs");
}

/// Webdataset shards of `sizes` samples (a red or blue square, its caption) in `dir`; the pattern.
fn wds_shards(dir: &Path, sizes: &[usize]) -> String {
    for (s, &n) in sizes.iter().enumerate() {
        let mut tar = tar::Builder::new(std::fs::File::create(dir.join(format!("shard-{s}.tar"))).unwrap());
        for j in 0..n {
            let (colour, name) = if (s + j) % 2 == 0 { ([220, 30, 30], "red") } else { ([30, 60, 220], "blue") };
            let mut png = Vec::new();
            let square = image::RgbImage::from_pixel(24, 24, image::Rgb(colour));
            square.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
            let caption = format!("a {name} square, shard {s} sample {j}").into_bytes();
            for (ext, bytes) in [("png", png), ("txt", caption)] {
                let mut header = tar::Header::new_gnu();
                header.set_size(bytes.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                tar.append_data(&mut header, format!("{s}-{j}.{ext}"), bytes.as_slice()).unwrap();
            }
        }
        tar.finish().unwrap();
    }
    format!("wds:{}/shard-{{0..{}}}.tar", dir.display(), sizes.len() - 1)
}

/// webdataset on 2 ranks, read by shard: 5 shards of unequal sizes dealt anew each epoch, the
/// ranks take the same steps (the smaller share's), and a run resumed from its first epoch's
/// checkpoint is the uninterrupted one bit for bit.
#[test]
fn two_ranks_read_webdataset_by_shard_and_resume_exactly() {
    let logs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let shards = wds_shards(data.path(), &[20, 12, 16, 24, 8]);
    let with_data = |name: &str, extra: &[&str]| {
        let extra: Vec<&str> = ["--data", shards.as_str()].iter().chain(extra).copied().collect();
        train_args(logs.path(), name, 4, &extra)
    };
    let flags = ["--gather-with-grad", "--device", "cpu"];
    let out = succeeded("whole", mpirun(2, &with_data("whole", &flags)).output().unwrap());
    assert!(out.contains("the 2 ranks read by shard"), "{out}");
    eprintln!("{}", out.lines().find(|l| l.starts_with("model: ")).unwrap_or_default());
    let whole = losses(&logs.path().join("whole"));
    // 80 samples: an epoch has at most 10 steps of 2 × 4, fewer when the deal is uneven.
    assert!((2..=20).contains(&whole.len()), "{whole:?}");
    let epoch_1 = logs.path().join("whole/checkpoints/epoch_1.safetensors");
    let resume = ["--gather-with-grad", "--device", "cpu", "--resume", epoch_1.to_str().unwrap()];
    let out = succeeded("resumed", mpirun(2, &with_data("resumed", &resume)).output().unwrap());
    assert!(out.contains("resuming from"), "{out}");
    let resumed = losses(&logs.path().join("resumed"));
    assert!(!resumed.is_empty() && resumed.len() < whole.len(), "{resumed:?}");
    for (step, loss) in &resumed {
        assert_eq!(loss.to_bits(), whole[step].to_bits(), "step {step}: {loss} vs {}", whole[step]);
    }
    let (_, a) = checkpoint::load(&logs.path().join("whole/model.safetensors"), None).unwrap();
    let (_, b) = checkpoint::load(&logs.path().join("resumed/model.safetensors"), None).unwrap();
    assert!(a == b, "the resumed run's final model differs");
    // 6 ranks for 5 shards: an error before training.
    let out = mpirun(6, &with_data("six", &flags)).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("5 shards with samples for 6 ranks"), "{text}");
}

/// The process ids of this run's rank `rank` (found by the marker its environment carries).
fn rank_pid(marker: &str, rank: usize) -> Option<u32> {
    let wanted = [format!("CLIP_PGS_TEST_RUN={marker}"), format!("OMPI_COMM_WORLD_RANK={rank}")];
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        wanted.iter().all(|w| vars.contains(&w.as_bytes())).then_some(pid)
    })
}

#[test]
fn a_rank_killed_mid_run_ends_the_other_and_the_last_checkpoint_stays_whole() {
    let logs = tempfile::tempdir().unwrap();
    // One step per epoch and a checkpoint after each, for long enough to be killed in the middle.
    let mut args = train_args(logs.path(), "killed", 16, &["--gather-with-grad", "--device", "cpu"]);
    let at = |args: &[String], flag: &str| args.iter().position(|a| a == flag).unwrap() + 1;
    let (n, e) = (at(&args, "--train-num-samples"), at(&args, "--epochs"));
    (args[n], args[e]) = ("32".into(), "1000".into());
    let marker = logs.path().display().to_string();
    let mut child = mpirun(2, &args)
        .env("CLIP_PGS_TEST_RUN", &marker)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = logs.path().join("killed");
    let started = Instant::now();
    let steps = || std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.matches("\"loss\"").count());
    while steps() < 3 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it was killed");
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint after 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = rank_pid(&marker, 1).expect("rank 1's process");
    let killed = Instant::now();
    Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "rank 0 still runs 60 s after rank 1 was killed");
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    eprintln!("mpirun exited {status} {:.1} s after the kill", killed.elapsed().as_secs_f64());
    assert!(!status.success(), "{stderr}");
    assert!(rank_pid(&marker, 0).is_none(), "rank 0 is still running");
    let latest = latest_checkpoint(&run).unwrap();
    checkpoint::load_training(&latest).unwrap_or_else(|e| panic!("the last checkpoint is broken: {e}"));
}

/// A rank that hangs (alive, never reaching the next collective): the other gives up waiting in
/// that collective after `--collective-timeout`, says which, and the job ends.
#[test]
fn a_hung_rank_ends_the_job_after_the_collective_timeout() {
    let logs = tempfile::tempdir().unwrap();
    let flags = ["--device", "cpu", "--collective-timeout", "2", "--test-hang-rank", "1"];
    let mut child = mpirun(2, &train_args(logs.path(), "hung", 16, &flags))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            // SIGTERM: mpirun passes it on to the ranks.
            Command::new("kill").arg(child.id().to_string()).status().unwrap();
            panic!("the job still runs 60 s after it started with a hung rank");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    eprintln!("mpirun exited {status} {:.1} s after it started", started.elapsed().as_secs_f64());
    assert!(!status.success(), "{stderr}");
    let said = "error on rank 0 of 2: barrier did not complete within 2 s (--collective-timeout)";
    assert!(stderr.contains(said), "{stderr}");
}

/// A CSV of 48 rows, every fifth image corrupt: the ranks' shares hold different numbers of usable
/// samples, so one rank's share of an epoch runs out first and the other drops its batch of that
/// epoch; the corrupt samples of both ranks are counted.
#[test]
fn ranks_with_corrupt_samples_stay_in_step_and_count_them_together() {
    let logs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut rows = String::from("filepath\ttitle\n");
    for i in 0..48 {
        let file = data.path().join(format!("{i}.png"));
        if i % 5 == 0 {
            std::fs::write(&file, b"\x89PNG\r\n\x1a\nbroken").unwrap();
        } else {
            let colour = if i % 2 == 0 { [220, 30, 30] } else { [30, 60, 220] };
            image::RgbImage::from_pixel(40, 40, image::Rgb(colour)).save(&file).unwrap();
        }
        rows += &format!("{i}.png\ta {} square\n", if i % 2 == 0 { "red" } else { "blue" });
    }
    std::fs::write(data.path().join("data.tsv"), rows).unwrap();
    let csv = format!("csv:{}", data.path().join("data.tsv").display());
    let mut args = train_args(logs.path(), "csv", 4, &["--gather-with-grad", "--device", "cpu"]);
    let at = |args: &[String], flag: &str| args.iter().position(|a| a == flag).unwrap() + 1;
    let (d, n, e) = (at(&args, "--data"), at(&args, "--train-num-samples"), at(&args, "--epochs"));
    (args[d], args[n], args[e]) = (csv, "48".into(), "3".into());
    let out = succeeded("csv", mpirun(2, &args).output().unwrap());
    // 48 samples make 6 global batches of 8 per epoch; the 10 corrupt ones cost each epoch 1–2.
    let summary = out.lines().find(|l| l.starts_with("trained ")).unwrap_or_else(|| panic!("{out}"));
    let steps: usize = summary.split_whitespace().nth(1).unwrap().parse().unwrap();
    eprintln!("{summary}");
    assert!((12..18).contains(&steps), "{summary}");
    let skipped: usize =
        summary.split(", ").find_map(|p| p.strip_suffix(" corrupt samples skipped")).unwrap().parse().unwrap();
    let metrics = std::fs::read_to_string(logs.path().join("csv/metrics.jsonl")).unwrap();
    let counted: u64 = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["count"].as_u64())
        .sum();
    assert_eq!(counted as usize, skipped, "{metrics}");
    assert!(skipped >= 3 * 6, "each epoch meets most of the 10 corrupt samples: {summary}");
}
