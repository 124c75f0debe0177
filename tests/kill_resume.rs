//! SIGKILL during checkpoint writes: the trainer is killed 20 times, each time at a seeded random
//! moment in or just after one of its checkpoint writes, and resumed with `--resume latest`.
//! No kill may leave a partial checkpoint that resume picks (writes go to `*.tmp`, fsync, rename,
//! fsync of the folder), and the run pieced together from the survivors must be the
//! uninterrupted run: the same loss at every step and the same final model, bit for bit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use clip_pgs_kernels::philox::Philox;
use clip_pgs_model::checkpoint;
use clip_pgs_model::train::latest_checkpoint;

/// A small model with the tokenizer's full vocabulary: a checkpoint of about 5 MB, so a write
/// lasts long enough to be caught in the act.
const MODEL: &str = r#"{"embed_dim": 8,
  "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 8, "layers": 1, "head_width": 4},
  "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 1}}"#;

const EPOCHS: usize = 48;
const KILLS: u32 = 20;

fn command(logs: &Path, model: &Path, name: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clip-pgs"));
    cmd.args(["train", "--model", model.to_str().unwrap(), "--logs", logs.to_str().unwrap(), "--name", name]);
    // One step per epoch, a checkpoint after each, a metrics record per step.
    cmd.args(["--train-num-samples", "16", "--batch-size", "16", "--epochs", &EPOCHS.to_string()]);
    cmd.args(["--eval-samples", "8", "--zeroshot-frequency", "0", "--log-every-n-steps", "1", "--warmup", "2"]);
    cmd.args(["--workers", "1", "--device", "cpu"]).args(extra);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

/// The loss of each step; a step trained again after a resume replaces the earlier record, and a
/// line torn by a kill is not a record.
fn losses(run: &Path) -> BTreeMap<u64, f64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
            out.insert(step, loss);
        }
    }
    out
}

fn temp_files(checkpoints: &Path) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(checkpoints) else { return BTreeSet::new() };
    entries.flatten().filter_map(|e| e.file_name().into_string().ok()).filter(|n| n.ends_with(".tmp")).collect()
}

#[test]
fn killed_during_checkpoint_writes_20_times_the_run_resumes_to_the_same_result() {
    let logs = tempfile::tempdir().unwrap();
    let model = logs.path().join("micro.json");
    std::fs::write(&model, MODEL).unwrap();
    let whole = command(logs.path(), &model, "whole", &[]).output().unwrap();
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));

    let run = logs.path().join("killed");
    let checkpoints = run.join("checkpoints");
    let rng = Philox::new(2026, 9, 0);
    let mut torn_writes = 0;
    // Resume the newest checkpoint; before the first one there is only a folder to replace.
    let continue_flags = || -> &[&str] {
        match (latest_checkpoint(&run), run.exists()) {
            (Some(_), _) => &["--resume", "latest"],
            (None, true) => &["--overwrite"],
            (None, false) => &[],
        }
    };
    for kill in 0..KILLS {
        let extra = continue_flags();
        // Temporary files earlier kills left behind stay (resume must ignore them) but are not news.
        let stale = temp_files(&checkpoints);
        let mut child = command(logs.path(), &model, "killed", extra).spawn().unwrap();
        // Kill during this process's first or second checkpoint write, 0–4 ms after it is seen.
        let nth_write = 1 + rng.bits(2 * kill) as usize % 2;
        let delay = Duration::from_micros(u64::from(rng.bits(2 * kill + 1) % 4000));
        let mut seen = BTreeSet::new();
        while seen.len() < nth_write {
            if let Some(status) = child.try_wait().unwrap() {
                let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
                panic!("kill {kill}: the run ended ({status}) before its write {nth_write}: {stderr}");
            }
            seen.extend(temp_files(&checkpoints).difference(&stale).cloned());
        }
        std::thread::sleep(delay);
        child.kill().unwrap();
        child.wait().unwrap();
        torn_writes += usize::from(!temp_files(&checkpoints).is_subset(&stale));
        // Whatever resume would pick now is a whole checkpoint.
        if let Some(latest) = latest_checkpoint(&run) {
            assert!(latest.extension().is_some_and(|e| e == "safetensors"), "{}", latest.display());
            checkpoint::load_training(&latest).unwrap_or_else(|e| panic!("kill {kill}: resume would pick {e}"));
        }
    }
    // At least some kills landed inside a write (a temporary file was left behind).
    eprintln!("{torn_writes} of {KILLS} kills interrupted a checkpoint write");
    assert!(torn_writes > 0, "no kill interrupted a write");

    let rest = command(logs.path(), &model, "killed", continue_flags()).output().unwrap();
    assert!(rest.status.success(), "{}", String::from_utf8_lossy(&rest.stderr));
    let (expected, got) = (losses(&logs.path().join("whole")), losses(&run));
    assert_eq!(expected.len(), EPOCHS);
    assert_eq!(got, expected, "the pieced-together run has other losses");
    let (_, a) = checkpoint::load(&logs.path().join("whole/model.safetensors"), None).unwrap();
    let (_, b) = checkpoint::load(&run.join("model.safetensors"), None).unwrap();
    assert!(a == b, "the final models differ");
}
