//! The trainer: `clip-pgs train`. Data (`crate::data`), masking (none / FLIP / PGS from
//! `clip_pgs_host::ops::pgs`), the CLIP forward/backward with gradient accumulation, AdamW with
//! open_clip's cosine schedule and gradient clipping, evaluation (`eval.rs`), atomic checkpoints
//! with optimizer state and data position (resume reproduces the uninterrupted run exactly),
//! metrics as JSONL and plots at the end (`plot.rs`).
//!
//! Randomness is counter-based (Philox keyed by seed and step), so the RNG state a checkpoint needs
//! is the step and the data position.

pub mod eval;
pub mod history;
pub mod plot;
pub mod schedule;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clip_pgs_host::Device;
use clip_pgs_host::ops::adamw::AdamW;
use clip_pgs_host::ops::edge_map::ImageBatchShape;
use clip_pgs_host::ops::gelu::GeluForm;
use clip_pgs_host::ops::pgs::{MaskRequest, MaskStep, Masking};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::config::ClipConfig;
use crate::data::loader::{LoadedBatch, LoaderConfig, Position, Prefetcher};
use crate::data::share::Shares;
use crate::data::{Sample, Source, SourceOptions, Split};
use crate::distributed::DataParallel;
use crate::optimizer::Optimizer;
use crate::outln;
use crate::params::Params;
use crate::precision::{Dtype, Precision};
use crate::step::{StepMasks, TrainStep};
use crate::tokenizer::ClipTokenizer;
use eval::{Encoder, EvalSet};
use history::{StepHistory, StepRecord};

/// Everything a run is defined by (the CLI's flags, open_clip's names).
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub data: String,
    /// Evaluation data; default: the held-out split of `data` where it has one.
    pub val_data: Option<String>,
    pub source_options: SourceOptions,
    pub model: String,
    pub epochs: usize,
    pub batch_size: usize,
    /// Samples per epoch, if fewer than the source holds.
    pub train_num_samples: Option<usize>,
    pub lr: f32,
    pub wd: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub warmup: usize,
    pub grad_clip_norm: Option<f32>,
    pub accum_freq: usize,
    /// Recompute each transformer block's activations in backward (less memory).
    pub grad_checkpointing: bool,
    /// The activations' type (`--dtype`; bf16 on the GPU devices).
    pub dtype: Dtype,
    /// The MLP's GELU form (`--gelu`).
    pub gelu: GeluForm,
    pub masking: Masking,
    pub seed: u64,
    pub workers: usize,
    pub zeroshot_frequency: usize,
    pub save_frequency: usize,
    pub eval_samples: usize,
    pub log_every_n_steps: usize,
    /// `latest` or a checkpoint path.
    pub resume: Option<String>,
    pub logs: PathBuf,
    /// The run's folder name under `logs`: one path component.
    pub name: String,
    /// Replace an existing run folder (without it, a run refuses one unless it resumes).
    pub overwrite: bool,
    /// A progress bar on stderr, when stdout and stderr are terminals.
    pub progress: bool,
    /// Consecutive non-finite losses that stop the run.
    pub max_bad_steps: usize,
    /// Capture a step into a graph and replay it (GPU devices, one process: `TrainStep::step`).
    pub graph: bool,
    /// Test hook (the CLI's hidden `--test-nonfinite-loss-at`): these steps' losses are replaced by
    /// NaN, so the tests can drive the non-finite-loss path. Empty in every real run.
    pub test_nonfinite_steps: Vec<usize>,
}

/// What a checkpoint records besides the tensors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub step: usize,
    pub epoch: usize,
    pub cursor: usize,
    pub seed: u64,
    pub samples_skipped: usize,
    pub bad_steps: usize,
    pub elapsed_s: f64,
    /// Every rank's position in its share of the epoch (data-parallel; `cursor` is rank 0's).
    #[serde(default)]
    pub cursors: Vec<usize>,
}

/// The result of a run.
#[derive(Debug)]
pub struct TrainSummary {
    pub steps: usize,
    pub final_loss: f32,
    pub losses: Vec<f32>,
    pub eval: BTreeMap<String, f64>,
    pub wall_s: f64,
    pub samples_skipped: usize,
    /// Steps skipped for a non-finite loss or gradient (over the whole run, resumes included).
    pub bad_steps: usize,
    pub interrupted: bool,
    pub out_dir: PathBuf,
}

/// `limit` samples of another source: `--train-num-samples`.
struct Limited(Box<dyn Source>, usize);

impl Source for Limited {
    fn describe(&self) -> String {
        format!("{}, first {} used per epoch", self.0.describe(), self.1)
    }
    fn len(&self) -> usize {
        self.1.min(self.0.len())
    }
    fn get(&self, i: usize) -> Result<Sample, String> {
        self.0.get(i)
    }
    fn classes(&self) -> Option<&crate::data::Classes> {
        self.0.classes()
    }
    /// The shards cut at the limit.
    fn shards(&self) -> Option<Vec<std::ops::Range<usize>>> {
        let end = self.len();
        Some(self.0.shards()?.into_iter().map(|r| r.start.min(end)..r.end.min(end)).collect())
    }
}

impl TrainConfig {
    /// Checks the flags before anything is loaded.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--accum-freq", self.accum_freq),
            ("--workers", self.workers),
            ("--eval-samples", self.eval_samples),
            ("--max-bad-steps", self.max_bad_steps),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{flag} must be at least 1"));
        }
        if self.batch_size < 2 {
            return Err("--batch-size must be at least 2: the contrastive loss needs negatives".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("--lr {} is not a positive number", self.lr));
        }
        if !(self.wd.is_finite() && self.wd >= 0.0) {
            return Err(format!("--wd {} is not a non-negative number", self.wd));
        }
        for (flag, beta) in [("--beta1", self.beta1), ("--beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(format!("{flag} {beta} is not in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!("--eps {} is not a positive number", self.eps));
        }
        if let Some(c) = self.grad_clip_norm.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return Err(format!("--grad-clip-norm {c} is not a positive number"));
        }
        // `--name ../x` or `a/b` would write outside --logs or into another run's folder.
        let mut parts = Path::new(&self.name).components();
        if !matches!((parts.next(), parts.next()), (Some(Component::Normal(_)), None))
            || self.name.contains(['/', '\\'])
        {
            return Err(format!("--name {:?}: a run name is one folder name (no '/', '.' or '..')", self.name));
        }
        Ok(())
    }

    fn out_dir(&self) -> PathBuf {
        self.logs.join(&self.name)
    }
}

/// Where a checkpoint goes in the run folder `dir`: `epoch_N.safetensors` after epoch N (1-based)
/// finished, `epoch_N_step_S.safetensors` when a run stops (Ctrl-C) at global step S inside epoch N.
fn checkpoint_path(dir: &Path, epoch: usize, part_epoch_step: Option<usize>) -> PathBuf {
    let name = match part_epoch_step {
        None => format!("epoch_{epoch}.safetensors"),
        Some(step) => format!("epoch_{epoch}_step_{step}.safetensors"),
    };
    dir.join("checkpoints").join(name)
}

/// Orders checkpoint names: epoch N's part-epoch checkpoints by step, then epoch N finished.
/// Anything else (the `.tmp` of an interrupted write included) is not a checkpoint.
fn checkpoint_order(name: &str) -> Option<(usize, usize)> {
    let tag = name.strip_prefix("epoch_")?.strip_suffix(".safetensors")?;
    match tag.split_once("_step_") {
        None => Some((tag.parse().ok()?, usize::MAX)),
        Some((epoch, step)) => Some((epoch.parse().ok()?, step.parse().ok()?)),
    }
}

/// The newest checkpoint in the run folder `dir` (see [`checkpoint_path`]).
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir.join("checkpoints")).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((checkpoint_order(e.file_name().to_str()?)?, e.path())))
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// Appends JSON lines to metrics.jsonl (rank 0 does; the other ranks' records go nowhere).
struct Metrics(Option<std::fs::File>);

impl Metrics {
    /// Opens `path` for appending. A process killed mid-write leaves a torn last line: the next
    /// record starts on a line of its own.
    fn open(path: &Path) -> Result<Metrics, String> {
        let fail = |e: std::io::Error| format!("{}: {e}", path.display());
        let torn = std::fs::read(path).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n'));
        let mut file = OpenOptions::new().create(true).append(true).open(path).map_err(fail)?;
        if torn {
            file.write_all(b"\n").map_err(fail)?;
        }
        Ok(Metrics(Some(file)))
    }

    /// One record in one write, so that a kill tears at most the line being written.
    fn write(&mut self, record: serde_json::Value) -> Result<(), String> {
        let Some(file) = &mut self.0 else { return Ok(()) };
        file.write_all(format!("{record}\n").as_bytes()).map_err(|e| format!("writing metrics.jsonl: {e}"))
    }
}

/// Runs training on `device` to the end (or until `interrupt` is set: then a checkpoint is
/// written).
pub fn train(cfg: &TrainConfig, device: Device, interrupt: Arc<AtomicBool>) -> Result<TrainSummary, String> {
    train_data_parallel(cfg, device, interrupt, DataParallel::single())
}

/// `train` as one of `dp`'s ranks: each rank trains on its share of every batch of
/// `cfg.batch_size` per rank; rank 0 alone writes checkpoints, metrics and the model, and
/// evaluates.
pub fn train_data_parallel(
    cfg: &TrainConfig,
    device: Device,
    interrupt: Arc<AtomicBool>,
    dp: DataParallel,
) -> Result<TrainSummary, String> {
    match cfg.dtype {
        Dtype::F32 => train_in::<f32>(cfg, device, interrupt, dp),
        Dtype::Bf16 => train_in::<clip_pgs_host::bf16>(cfg, device, interrupt, dp),
    }
}

fn train_in<T: Precision>(
    cfg: &TrainConfig,
    device: Device,
    interrupt: Arc<AtomicBool>,
    dp: DataParallel,
) -> Result<TrainSummary, String> {
    cfg.validate()?;
    let (rank, ranks) = (dp.rank(), dp.ranks());
    let lead = rank == 0;
    if cfg.dtype != Dtype::F32 && matches!(device, Device::Cpu) {
        return Err(format!("--dtype {} runs on the GPU devices (cuda, emu); the cpu device trains in f32", cfg.dtype));
    }
    let model_cfg = ClipConfig::load(&cfg.model).map_err(|e| e.to_string())?;
    // Every field, defaults filled in: the checkpoint's config reads back equal to this one.
    let config_json = serde_json::to_string(&model_cfg).map_err(|e| e.to_string())?;
    let image_size = model_cfg.vision_cfg.image_size as u32;
    let mut train_source = crate::data::open(&cfg.data, Split::Train, &cfg.source_options)?;
    if let Some(n) = cfg.train_num_samples {
        train_source = Box::new(Limited(train_source, n));
    }
    let eval_source = match &cfg.val_data {
        Some(spec) => Some(crate::data::open(spec, Split::Eval, &cfg.source_options)?),
        // Sources with a held-out split evaluate on it; a csv or wds source needs --val-data.
        None if cfg.data == "shapes" || cfg.data.starts_with("fashion-mnist") => {
            Some(crate::data::open(&cfg.data, Split::Eval, &cfg.source_options)?)
        }
        None => None,
    };
    let loader_cfg =
        LoaderConfig { batch_size: cfg.batch_size, image_size, seed: cfg.seed, workers: cfg.workers, rank, ranks };
    // Every rank takes each epoch's steps (by shard: as many as the smallest share allows).
    let shares = Shares::new(train_source.as_ref(), &loader_cfg)?;
    let epoch_steps = (0..cfg.epochs).map(|e| shares.steps(e)).collect::<Result<Vec<usize>, String>>()?;
    let total_steps: usize = epoch_steps.iter().sum();
    let out_dir = cfg.out_dir();
    // A second run of the same name would append to the first one's metrics and resume from its
    // checkpoints: an existing run folder is only continued (--resume) or replaced (--overwrite).
    let occupied = std::fs::read_dir(&out_dir).is_ok_and(|mut d| d.next().is_some());
    if lead && occupied && cfg.resume.is_none() {
        if !cfg.overwrite {
            return Err(format!(
                "{} already holds a run: pass --resume latest to continue it, --overwrite to replace it, or \
                 another --name",
                out_dir.display()
            ));
        }
        std::fs::remove_dir_all(&out_dir).map_err(|e| format!("--overwrite: removing {}: {e}", out_dir.display()))?;
    }
    if lead {
        std::fs::create_dir_all(out_dir.join("checkpoints")).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    }
    // The folder is settled (or rank 0 refused it and ended the job) before any rank loads data.
    dp.world.barrier();
    let tokenizer = ClipTokenizer::new().map_err(|e| e.to_string())?;
    let adamw = AdamW { beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps };
    // On a GPU, measure before allocating: a run that cannot fit says which batch would.
    if let Some((free, _)) = device.memory_info().map_err(|e| e.to_string())? {
        crate::step::check_fits(
            &model_cfg,
            cfg.batch_size,
            cfg.accum_freq,
            cfg.grad_checkpointing,
            &cfg.masking,
            cfg.dtype,
            free,
        )?;
    }
    let mut params = Params::init(&model_cfg, cfg.seed, &device)?;
    let mut optimizer = Optimizer::new(&params.layout, &device, adamw, cfg.wd)?;
    let mut state = TrainState {
        step: 0,
        epoch: 0,
        cursor: 0,
        seed: cfg.seed,
        samples_skipped: 0,
        bad_steps: 0,
        elapsed_s: 0.0,
        cursors: vec![0; ranks],
    };
    if let Some(resume) = &cfg.resume {
        let path = match resume.as_str() {
            "latest" => latest_checkpoint(&out_dir).ok_or_else(|| {
                format!("--resume latest: no checkpoint in {}", out_dir.join("checkpoints").display())
            })?,
            p => PathBuf::from(p),
        };
        // Every rank resumes from rank 0's choice.
        let path = PathBuf::from(dp.broadcast_string(&path.to_string_lossy()));
        let ckpt = checkpoint::load_training(&path)?;
        if ckpt.config != model_cfg {
            return Err(format!(
                "{}: the checkpoint's model config differs from --model {}",
                path.display(),
                cfg.model
            ));
        }
        state = serde_json::from_str(&ckpt.train_state).map_err(|e| format!("{}: train_state: {e}", path.display()))?;
        if state.seed != cfg.seed {
            return Err(format!(
                "{}: written with --seed {}, this run has --seed {}",
                path.display(),
                state.seed,
                cfg.seed
            ));
        }
        if state.step >= total_steps {
            return Err(format!(
                "{}: the run finished there ({} of {total_steps} steps): nothing to resume (raise --epochs to \
                 train further)",
                path.display(),
                state.step
            ));
        }
        state.cursors = rank_cursors(&state, ranks).map_err(|e| format!("{}: {e}", path.display()))?;
        params = ckpt.params.copy_to(&device)?;
        let (m, v, step) = ckpt.moments;
        (optimizer.m, optimizer.v) = (m.copy_to(&device)?, v.copy_to(&device)?);
        optimizer.set_steps(step)?;
        if lead {
            outln!("resuming from {} at step {}, epoch {}", path.display(), state.step, state.epoch + 1);
        }
    }
    // Rank 0 evaluates and writes; the others train.
    let eval_set =
        eval_source.as_ref().filter(|_| lead).map(|s| EvalSet::load(s.as_ref(), cfg.eval_samples, image_size));
    let mut metrics = if lead { Metrics::open(&out_dir.join("metrics.jsonl"))? } else { Metrics(None) };
    let say = |msg: String| {
        if lead {
            outln!("{msg}")
        }
    };
    say(format!("data: {}", train_source.describe()));
    if let (Some(s), Some(set)) = (&eval_source, &eval_set) {
        say(format!("eval: {} ({} used, {} skipped)", s.describe(), set.len(), set.skipped));
    }
    let (fewest, most) = (epoch_steps.iter().min(), epoch_steps.iter().max());
    let steps = match (fewest, most) {
        (Some(a), Some(b)) if a != b => format!(", {total_steps} steps ({a} to {b} per epoch)"),
        _ => format!(" × {} steps", total_steps / cfg.epochs),
    };
    say(format!(
        "model: {} ({} parameters), masking: {}, {} epochs{steps} of {}",
        cfg.model,
        params.layout.len(),
        describe_masking(&cfg.masking),
        cfg.epochs,
        cfg.batch_size * ranks
    ));
    if shares.by_shard() && ranks > 1 {
        say(format!(
            "data: the {ranks} ranks read by shard: each epoch deals the shards in turn, and every rank reads as \
             many samples as the smallest share holds"
        ));
    }
    let source: Arc<dyn Source> = Arc::from(train_source);
    let start_at = Position { epoch: state.epoch, cursor: state.cursors[rank] };
    let prefetcher = Prefetcher::start(source, loader_cfg, start_at, cfg.epochs);
    // The bar is for a person watching: not drawn into a pipe or a log file.
    let terminal = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    let bar =
        if cfg.progress && terminal && lead { ProgressBar::new(total_steps as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
            .map_err(|e| e.to_string())?,
    );
    bar.set_position(state.step as u64);
    // Every message goes to stdout (a log keeps it), the bar only to a terminal's stderr.
    let say = |msg: String| bar.suspend(|| say(msg));
    let ctx = model_cfg.text_cfg.context_length;
    let mut step: TrainStep<T> =
        TrainStep::new(device, &model_cfg, params, optimizer, cfg.batch_size, cfg.accum_freq, cfg.grad_checkpointing)?;
    step.clip.gelu = cfg.gelu;
    step.data_parallel = (ranks > 1).then(|| dp.clone());
    step.capture &= cfg.graph;
    let (start, elapsed_before) = (Instant::now(), state.elapsed_s);
    let mut losses = Vec::new();
    let mut last_eval = BTreeMap::new();
    let mut consecutive_bad = 0;
    let mut window = (Instant::now(), 0usize);
    let mut interrupted = false;
    let mut history = StepHistory::new(&step.device, cfg.log_every_n_steps.max(1))?;
    // The last applied step's values, for the progress line and the metrics.
    let mut shown = StepRecord { step: 0, loss: f32::NAN, norm: f32::NAN };
    let save = |step: &TrainStep<T>, state: &TrainState, path: &Path| -> Result<(), String> {
        if !lead {
            return Ok(());
        }
        let json = serde_json::to_string(state).map_err(|e| e.to_string())?;
        checkpoint::save_training(path, &config_json, &step.params, &step.optimizer, &json)
    };
    let image_shape = |n| ImageBatchShape { n, height: image_size as usize, width: image_size as usize };
    while let (Some(batch), skipped) = next_batch(&prefetcher, &dp, cfg.epochs)? {
        if skipped > 0 {
            state.samples_skipped += skipped;
            let first = batch.skipped.first().map_or(String::new(), |s| format!(": {s}"));
            say(format!("skipped {skipped} corrupt samples{first}"));
            metrics.write(serde_json::json!({"step": state.step, "skipped": batch.skipped, "count": skipped}))?;
        }
        let mut text = Vec::with_capacity(cfg.batch_size * ctx);
        for caption in &batch.captions {
            text.extend(tokenizer.tokenize(caption, ctx).map_err(|e| e.to_string())?);
        }
        // The masks' draws are keyed by the image's index in the global batch: N ranks of b
        // draw what one process of N·b does.
        let first = (rank * cfg.batch_size) as u32;
        let at = MaskStep { seed: cfg.seed, step: state.step as u32, first, epoch: batch.epoch, epochs: cfg.epochs };
        let masks = match cfg.masking {
            Masking::None => StepMasks::All,
            masking => {
                let shape = image_shape(batch.captions.len());
                StepMasks::Make(MaskRequest { shape, patch: model_cfg.vision_cfg.patch_size, masking, at })
            }
        };
        let lr = schedule::cosine_lr(cfg.lr, cfg.warmup, total_steps, state.step);
        // Decided on the device: a step with a non-finite loss or norm changes nothing.
        if cfg.test_nonfinite_steps.contains(&state.step) {
            step.forward_backward(&batch.images, &text, masks)?;
            step.poison_loss()?;
            step.grad_norm()?;
            step.update(lr, cfg.grad_clip_norm)?;
        } else {
            step.step(&batch.images, &text, masks, lr, cfg.grad_clip_norm)?;
        }
        history.record(&step, state.step)?;
        state.step += 1;
        window.1 += cfg.batch_size * ranks;
        // Where every rank is, and whether any was interrupted: the ranks stop and end epochs
        // together.
        let mut all = vec![0u64; 3 * ranks];
        let mine = [batch.after.epoch as u64, batch.after.cursor as u64, interrupt.load(Ordering::SeqCst) as u64];
        dp.world.all_gather_u64(&mine, &mut all);
        state.epoch = all.chunks(3).map(|r| r[0] as usize).max().unwrap_or(batch.after.epoch);
        let epoch_done = state.epoch > batch.epoch;
        state.cursors = all.chunks(3).map(|r| if epoch_done { 0 } else { r[1] as usize }).collect();
        state.cursor = state.cursors[0];
        let stopping = all.chunks(3).any(|r| r[2] != 0);
        // The last step and a stop are logged too, so a short run still has a loss curve.
        let log = state.step.is_multiple_of(cfg.log_every_n_steps.max(1)) || state.step == total_steps || stopping;
        // The values come back from the device here only: at a log line, a checkpoint, or when
        // the history is full.
        if log || epoch_done || history.is_full() {
            for record in history.take()? {
                if record.applied() {
                    consecutive_bad = 0;
                    losses.push(record.loss);
                    shown = record;
                    continue;
                }
                state.bad_steps += 1;
                consecutive_bad += 1;
                let (n, loss, norm) = (record.step, record.loss, record.norm);
                say(format!("step {n}: loss {loss}, gradient norm {norm}: step skipped, no update"));
                metrics.write(serde_json::json!({"step": n, "bad_step": true, "loss": loss.to_string()}))?;
                if consecutive_bad >= cfg.max_bad_steps {
                    bar.finish_and_clear();
                    let last = match latest_checkpoint(&out_dir) {
                        Some(path) => {
                            format!("the last checkpoint, {}, is unaffected (--resume latest)", path.display())
                        }
                        None => "no checkpoint was written yet".to_string(),
                    };
                    return Err(format!(
                        "{consecutive_bad} consecutive steps had a non-finite loss or gradient: stopping at step {n}; {last}"
                    ));
                }
            }
        }
        let samples_per_s = window.1 as f64 / window.0.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "epoch {}/{} loss {:.4} {samples_per_s:.0} samples/s",
            batch.epoch + 1,
            cfg.epochs,
            shown.loss
        ));
        bar.inc(1);
        if log {
            let masked = if matches!(cfg.masking, Masking::None) { 0.0 } else { step.masked_fraction()? };
            metrics.write(serde_json::json!({
                "step": state.step, "epoch": batch.epoch, "loss": shown.loss, "lr": lr, "grad_norm": shown.norm,
                "logit_scale": step.params.get("logit_scale")?[0].exp(), "masked_fraction": masked,
                "samples_per_s": samples_per_s, "time_s": elapsed_before + start.elapsed().as_secs_f64(),
            }))?;
            window = (Instant::now(), 0);
        }
        let last = epoch_done && state.epoch == cfg.epochs;
        if epoch_done {
            let finished = batch.epoch + 1;
            if let Some(set) = &eval_set
                && (last || (cfg.zeroshot_frequency > 0 && finished.is_multiple_of(cfg.zeroshot_frequency)))
            {
                let (pass, workspace) = step.pass_and_workspace();
                let enc = Encoder::new(pass, &tokenizer, workspace);
                last_eval = eval::evaluate(&enc, set)?;
                let mut record = serde_json::json!({"step": state.step, "epoch": finished, "eval": &last_eval});
                // Which data the numbers are on: zeroshot.png draws one chart per data set.
                record["data"] = cfg.val_data.as_deref().unwrap_or(&cfg.data).into();
                record["time_s"] = (elapsed_before + start.elapsed().as_secs_f64()).into();
                metrics.write(record)?;
                say(format!("epoch {finished}: {}", headline(&last_eval)));
            }
            state.elapsed_s = elapsed_before + start.elapsed().as_secs_f64();
            if last || stopping || (cfg.save_frequency > 0 && finished.is_multiple_of(cfg.save_frequency)) {
                save(&step, &state, &checkpoint_path(&out_dir, finished, None))?;
            }
        }
        if stopping {
            if !epoch_done {
                state.elapsed_s = elapsed_before + start.elapsed().as_secs_f64();
                // Inside an epoch: named so that it is not taken for a finished one.
                save(&step, &state, &checkpoint_path(&out_dir, batch.epoch + 1, Some(state.step)))?;
            }
            let path = latest_checkpoint(&out_dir).unwrap_or_default();
            say(format!("interrupted at step {}: checkpoint {} written", state.step, path.display()));
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    let wall_s = elapsed_before + start.elapsed().as_secs_f64();
    if !interrupted && lead {
        checkpoint::save(&out_dir.join("model.safetensors"), &config_json, &step.params)?;
    }
    Ok(TrainSummary {
        steps: state.step,
        final_loss: losses.last().copied().unwrap_or(f32::NAN),
        losses,
        eval: last_eval,
        wall_s,
        samples_skipped: state.samples_skipped,
        bad_steps: state.bad_steps,
        interrupted,
        out_dir,
    })
}

/// The next batch every rank has, and the corrupt samples all ranks skipped filling theirs. A
/// rank whose share of an epoch ran out first (corrupt samples) is ahead: the others drop their
/// batches of the epoch it left until they reach it. None when every rank is done.
fn next_batch(
    prefetcher: &Prefetcher,
    dp: &DataParallel,
    epochs: usize,
) -> Result<(Option<LoadedBatch>, usize), String> {
    let mut batch = prefetcher.next_batch().transpose()?;
    let mut all = vec![0u64; 2 * dp.ranks()];
    loop {
        let epoch = batch.as_ref().map_or(epochs, |b| b.epoch) as u64;
        let skipped = batch.as_ref().map_or(0, |b| b.skipped.len()) as u64;
        dp.world.all_gather_u64(&[epoch, skipped], &mut all);
        let latest = all.chunks(2).map(|r| r[0]).max().unwrap_or(epoch);
        if all.chunks(2).all(|r| r[0] == latest) {
            let skipped = all.chunks(2).map(|r| r[1] as usize).sum();
            return Ok((batch.filter(|_| latest < epochs as u64), skipped));
        }
        if epoch < latest {
            batch = prefetcher.next_batch().transpose()?;
        }
    }
}

/// Where each of `ranks` ranks resumes in its share of the checkpoint's epoch: the checkpoint's
/// positions when it was written by as many ranks; at an epoch's end, any number of ranks starts
/// the next epoch.
fn rank_cursors(state: &TrainState, ranks: usize) -> Result<Vec<usize>, String> {
    let written = if state.cursors.is_empty() { vec![state.cursor] } else { state.cursors.clone() };
    match (written.len() == ranks, written.iter().all(|&c| c == 0)) {
        (true, _) => Ok(written),
        (false, true) => Ok(vec![0; ranks]),
        (false, false) => Err(format!(
            "written by {} ranks inside an epoch: resume it on {} ranks, or on {ranks} from a checkpoint written at \
             the end of an epoch",
            written.len(),
            written.len()
        )),
    }
}

pub fn describe_masking(m: &Masking) -> String {
    match m {
        Masking::None => "none".into(),
        Masking::Flip { ratio } => format!("flip {ratio}"),
        Masking::Pgs(p) => {
            let ratio = match p.ratio {
                clip_pgs_host::ops::pgs::MaskRatio::Fixed(r) => format!("{r}"),
                clip_pgs_host::ops::pgs::MaskRatio::Dynamic { min, max } => format!("dynamic {min}-{max}"),
            };
            let ablations =
                format!("{}{}", if p.use_ed { "" } else { " no-ed" }, if p.use_otn { "" } else { " no-otn" });
            format!("pgs {} {ratio}{ablations}", p.mode)
        }
    }
}

/// The metrics a progress line shows.
pub fn headline(m: &BTreeMap<String, f64>) -> String {
    ["zeroshot_top1", "zeroshot_top5", "image_to_text_R@1", "text_to_image_R@1", "compositionality"]
        .iter()
        .filter_map(|k| m.get(*k).map(|v| format!("{k} {:.1}%", 100.0 * v)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Layout;
    use crate::precision::Precision;
    use clip_pgs_kernels::philox::Philox;

    /// A test-tiny step on random images and captions; returns the loss and the gradients.
    fn grads(accum: usize, checkpointing: bool, keep: Option<&[Vec<usize>]>, seed: u64) -> (f32, Vec<f32>) {
        let (loss, grads) = grads_on::<f32>("test-tiny", Device::Cpu, accum, checkpointing, keep, seed);
        (loss, grads.to_host().unwrap())
    }

    /// `grads` of the model config `model` on `device` with activations in T; the gradients as
    /// the model state they are.
    fn grads_on<T: Precision>(
        model: &str,
        device: Device,
        accum: usize,
        checkpointing: bool,
        keep: Option<&[Vec<usize>]>,
        seed: u64,
    ) -> (f32, Params) {
        let cfg = ClipConfig::load(model).unwrap();
        let params = Params::init(&cfg, seed, &device).unwrap();
        let adamw = AdamW { beta1: 0.9, beta2: 0.98, eps: 1e-6 };
        let optimizer = Optimizer::new(&params.layout, &device, adamw, 0.1).unwrap();
        let (n, ctx) = (8, cfg.text_cfg.context_length);
        let mut step: TrainStep<T> = TrainStep::new(device, &cfg, params, optimizer, n, accum, checkpointing).unwrap();
        let rng = Philox::new(seed + 1, 0, 0);
        let size = 3 * cfg.vision_cfg.image_size.pow(2);
        let images: Vec<f32> = (0..(n * size) as u32).map(|i| rng.uniform(i) * 2.0 - 1.0).collect();
        let text: Vec<u32> = (0..(n * ctx) as u32).map(|i| if i as usize % ctx < 5 { 1 + i % 97 } else { 0 }).collect();
        let masks = keep.map_or(StepMasks::All, StepMasks::Lists);
        step.forward_backward(&images, &text, masks).unwrap();
        let loss = step.loss().unwrap();
        (loss, step.grads)
    }

    /// A whole step's gradients on the GPU path (emulator) against the CPU device, every tensor,
    /// with keep lists, two micro-batches and gradient checkpointing: in f32 within 1e-4 of each
    /// tensor's largest gradient (summation order only; measured ≤ 2e-6); in bf16 within 1e-1
    /// (measured: ≤ 3.1e-2 for every tensor but the LayerNorm gains before and after the image
    /// tower, 5.1e-2 and 8.0e-2, sums over a few rows whose terms cancel, at this random
    /// initialisation; the open_clip goldens stay within the 5e-2, `tests/clip_parity.rs`).
    #[test]
    fn a_gpu_step_gives_the_cpu_gradients() {
        use clip_pgs_host::DevicePreference;
        let emu = || Device::select(DevicePreference::Emu).unwrap().device;
        let keep: Vec<Vec<usize>> = (0..8).map(|b| (0..16).filter(|j| (j + b) % 3 != 0).collect()).collect();
        let (cpu_loss, cpu) = grads_on::<f32>("test-tiny", Device::Cpu, 2, true, Some(&keep), 5);
        let cpu = cpu.named().unwrap();
        for (dtype, (loss, gpu), bound) in [
            ("f32", grads_on::<f32>("test-tiny", emu(), 2, true, Some(&keep), 5), 1e-4f32),
            ("bf16", grads_on::<clip_pgs_host::bf16>("test-tiny", emu(), 2, true, Some(&keep), 5), 1e-1),
        ] {
            assert!((loss - cpu_loss).abs() <= bound * cpu_loss, "{dtype}: loss {loss} vs {cpu_loss}");
            for ((name, _, want), (_, _, got)) in cpu.iter().zip(gpu.named().unwrap()) {
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
                assert!(worst <= bound * scale, "{dtype} {name}: max difference {worst} of the scale {scale}");
            }
        }
    }

    /// The bf16 step on the GPU path through the flash attention kernels (shapes-tiny: head dim 32
    /// in both towers; ragged kept patches, one image keeping a single patch, the causal text
    /// tower, gradient checkpointing) against the CPU device's f32 step, every gradient within
    /// the bf16 bound of `a_gpu_step_gives_the_cpu_gradients` (measured: ≤ 2.1e-2 of each
    /// tensor's largest gradient, the unfused path's range); the emulator's launch list shows
    /// that the flash kernels ran and the unfused softmax did not.
    #[test]
    fn a_gpu_step_through_flash_attention_gives_the_cpu_gradients() {
        use clip_pgs_host::emu::EmuRuntime;
        use clip_pgs_kernels::hw::emu::Options;
        let l = ClipConfig::load("shapes-tiny").unwrap().patches();
        let mut keep: Vec<Vec<usize>> = (0..8).map(|b| (0..l).filter(|j| (j + b) % (b + 2) != 0).collect()).collect();
        keep[3] = vec![5];
        let (cpu_loss, cpu) = grads_on::<f32>("shapes-tiny", Device::Cpu, 1, true, Some(&keep), 5);
        let emu = EmuRuntime::new(Options::default());
        emu.keep_reports();
        let (loss, gpu) =
            grads_on::<clip_pgs_host::bf16>("shapes-tiny", Device::Emu(emu.clone()), 1, true, Some(&keep), 5);
        let kernels: Vec<&str> = emu.take_reports().iter().map(|r| r.kernel).collect();
        // The resident grids: shapes-tiny's sequences fit the emulator's (an H100's) shared memory.
        for k in ["flash_attention_forward_d32", "flash_attention_backward_resident_d32"] {
            assert!(kernels.contains(&k), "{k} did not run");
        }
        assert!(!kernels.contains(&"attention_softmax_bf16"), "the unfused attention ran");
        let bound = 1e-1f32;
        assert!((loss - cpu_loss).abs() <= bound * cpu_loss, "loss {loss} vs {cpu_loss}");
        for ((name, _, want), (_, _, got)) in cpu.named().unwrap().iter().zip(gpu.named().unwrap()) {
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
            assert!(worst <= bound * scale, "{name}: max difference {worst} of the scale {scale}");
        }
    }

    /// A checkpoint's data positions: resumed on as many ranks as wrote it, or at an epoch's end
    /// on any number; inside an epoch on another number of ranks, an error that says what works.
    #[test]
    fn rank_positions_resume_on_as_many_ranks_or_at_an_epoch_end() {
        let state = |cursor, cursors: Vec<usize>| TrainState {
            step: 7,
            epoch: 1,
            cursor,
            seed: 0,
            samples_skipped: 0,
            bad_steps: 0,
            elapsed_s: 0.0,
            cursors,
        };
        assert_eq!(rank_cursors(&state(32, vec![32, 36]), 2).unwrap(), [32, 36]);
        assert_eq!(rank_cursors(&state(0, vec![0, 0]), 4).unwrap(), [0; 4]);
        // Written before data-parallel training (no `cursors`): one rank's position.
        assert_eq!(rank_cursors(&state(64, vec![]), 1).unwrap(), [64]);
        let e = rank_cursors(&state(32, vec![32, 36]), 3).unwrap_err();
        assert!(e.contains("written by 2 ranks inside an epoch: resume it on 2 ranks"), "{e}");
    }

    /// `--train-num-samples` of a source read by shard cuts its shards at the limit.
    #[test]
    fn a_limited_source_cuts_its_shards() {
        struct Sharded;
        impl Source for Sharded {
            fn describe(&self) -> String {
                "sharded".into()
            }
            fn len(&self) -> usize {
                30
            }
            fn get(&self, _: usize) -> Result<Sample, String> {
                Err("not read".into())
            }
            fn shards(&self) -> Option<Vec<std::ops::Range<usize>>> {
                Some(vec![0..10, 10..20, 20..30])
            }
        }
        assert_eq!(Limited(Box::new(Sharded), 15).shards(), Some(vec![0..10, 10..15, 15..15]));
        assert_eq!(Limited(Box::new(Sharded), 99).shards(), Some(vec![0..10, 10..20, 20..30]));
    }

    /// `--accum-freq 4` recomputes each micro-batch's forward for its backward: the loss and the
    /// gradients are those of one batch (up to the order of the gradient sums).
    #[test]
    fn accumulated_micro_batches_give_the_whole_batch_loss_and_gradients() {
        let (loss_1, whole) = grads(1, false, None, 3);
        let (loss_4, accumulated) = grads(4, false, None, 3);
        assert!((loss_1 - loss_4).abs() <= 1e-6 * loss_1.abs(), "{loss_1} vs {loss_4}");
        let layout = Layout::new(&ClipConfig::load("test-tiny").unwrap());
        for t in &layout.tensors {
            let (a, b) = (&whole[t.span.range()], &accumulated[t.span.range()]);
            let scale = a.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-5 * scale, "{}: {worst} against a largest value {scale}", t.name);
        }
    }

    /// `--grad-checkpointing` recomputes each block in backward: the same loss and gradients, bit
    /// for bit (the recomputation is the forward's arithmetic), also with ragged kept patches.
    #[test]
    fn gradient_checkpointing_changes_memory_not_gradients() {
        let l = ClipConfig::load("test-tiny").unwrap().patches();
        let keep: Vec<Vec<usize>> = (0..8).map(|b| (0..l).filter(|j| (j + b) % (b + 2) != 0).collect()).collect();
        let (kept, recomputed) = (grads(1, false, Some(&keep), 5), grads(1, true, Some(&keep), 5));
        assert_eq!(kept.0, recomputed.0);
        assert!(kept.1 == recomputed.1, "gradients differ with gradient checkpointing");
    }
}
