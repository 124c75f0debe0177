//! `clip-pgs train` and `clip-pgs eval`: the flags (open_clip's names where open_clip has the
//! flag), Ctrl-C, the summary table and the plots. The training itself is
//! `clip_pgs_model::train`.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, ValueEnum};
use clip_pgs_host::ops::edge_map::ImageBatchShape;
use clip_pgs_host::ops::gelu::GeluForm;
use clip_pgs_host::ops::pgs::{MaskRatio, MaskRequest, MaskStep, Masking, PgsConfig, PgsMode, mask_cpu};
use clip_pgs_host::{Device, DevicePreference};
use clip_pgs_model::clip::{Clip, Pass, Workspace};
use clip_pgs_model::config::ClipConfig;
use clip_pgs_model::data::{self, SourceOptions, Split};
use clip_pgs_model::distributed::watchdog::Watched;
use clip_pgs_model::distributed::{self, DataParallel};
use clip_pgs_model::precision::Dtype;
use clip_pgs_model::tokenizer::ClipTokenizer;
use clip_pgs_model::train::eval::{CHUNK, Encoder, EvalSet, evaluate};
use clip_pgs_model::train::plot::{Series, line_chart, stacked_line_charts};
use clip_pgs_model::train::{TrainConfig, TrainSummary, describe_masking, headline, train_data_parallel};
use clip_pgs_model::{errln, outln};
use image::RgbImage;

use crate::at_least;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MaskMethod {
    None,
    Flip,
    Pgs,
}

/// The data flags `train` and `eval` share (open_clip's names).
#[derive(Args)]
pub struct DataArgs {
    /// CSV data: the column of image paths (relative paths are relative to the CSV file).
    #[arg(long, default_value = "filepath")]
    csv_img_key: String,
    /// CSV data: the column of captions.
    #[arg(long, default_value = "title")]
    csv_caption_key: String,
    /// CSV separator (one character; default tab, as open_clip).
    #[arg(long, default_value = "\t")]
    csv_separator: String,
}

impl DataArgs {
    fn options(&self, seed: u64) -> Result<SourceOptions, String> {
        let sep = self.csv_separator.as_bytes();
        if sep.len() != 1 {
            return Err(format!("--csv-separator {:?}: one single-byte character expected", self.csv_separator));
        }
        Ok(SourceOptions {
            csv_img_key: self.csv_img_key.clone(),
            csv_caption_key: self.csv_caption_key.clone(),
            csv_separator: sep[0],
            seed,
        })
    }
}

#[derive(Args)]
// Negative numbers are values (`--lr -1` is a range error, not an unexpected argument).
#[command(allow_negative_numbers = true)]
pub struct TrainArgs {
    /// Training data: shapes (embedded), fashion-mnist[:DIR], csv:FILE or wds:SHARDS ("a/{000..009}.tar").
    #[arg(long, alias = "train-data", default_value = "shapes")]
    data: String,
    /// Evaluation data (default: the held-out split of --data for shapes and fashion-mnist).
    #[arg(long)]
    val_data: Option<String>,
    /// A built-in config (shapes-tiny, fmnist-tiny, test-tiny, ViT-S-16, ViT-B-16, ViT-B-32) or an
    /// open_clip model-config JSON file. Default: shapes-tiny, or fmnist-tiny for fashion-mnist.
    #[arg(long)]
    model: Option<String>,
    /// Passes over the training data.
    #[arg(long, default_value_t = 5, value_parser = at_least::<usize>(1))]
    epochs: usize,
    /// Samples per optimizer step (at least 2: the contrastive loss needs negatives).
    #[arg(long, default_value_t = 64, value_parser = at_least::<usize>(2))]
    batch_size: usize,
    /// Samples per epoch (default: all the source holds).
    #[arg(long, value_parser = at_least::<usize>(1))]
    train_num_samples: Option<usize>,
    /// Peak learning rate of the cosine schedule.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// AdamW weight decay (open_clip's groups: none on gains, biases, 1-D tensors, the logit scale).
    #[arg(long, default_value_t = 0.1)]
    wd: f32,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    beta1: f32,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.98)]
    beta2: f32,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-6)]
    eps: f32,
    /// Warm-up steps of the cosine schedule.
    #[arg(long, default_value_t = 100, value_parser = at_least::<usize>(0))]
    warmup: usize,
    /// Clip the global gradient norm to this.
    #[arg(long)]
    grad_clip_norm: Option<f32>,
    /// Split each batch into this many micro-batches (the loss still sees the whole batch; peak
    /// activation memory is one micro-batch's, for a second forward per micro-batch).
    #[arg(long, default_value_t = 1, value_parser = at_least::<usize>(1))]
    accum_freq: usize,
    /// Recompute each transformer block's activations in backward instead of keeping them: the
    /// same gradients with less memory, for one more forward.
    #[arg(long)]
    grad_checkpointing: bool,
    /// The activations' type: bf16 (the default on a GPU device: weights read as a bf16 copy of
    /// the f32 master weights, f32 accumulation) or f32 (the cpu device's only one).
    #[arg(long)]
    dtype: Option<Dtype>,
    /// The MLP's GELU: erf (open_clip's, the default) or tanh (cuBLASLt's fused epilogue).
    #[arg(long, default_value = "erf")]
    gelu: GeluForm,
    /// Patch masking before the image tower: none (CLIP), flip (random), pgs (the default).
    #[arg(long, value_enum, default_value_t = MaskMethod::Pgs)]
    mask: MaskMethod,
    /// Fraction of patches masked (flip, pgs), or "dynamic" (PGS-0.3: 30–50% by similarity).
    #[arg(long, default_value = "0.5")]
    mask_ratio: String,
    /// paper (what the paper describes) or reference (what the public code runs).
    #[arg(long, default_value = "paper")]
    pgs_mode: PgsMode,
    /// PGS without the edge map (ablation).
    #[arg(long)]
    no_ed: bool,
    /// PGS without optimal-transport normalization (ablation).
    #[arg(long)]
    no_otn: bool,
    /// Seed of the initialization, data order, masks (and of the shapes data).
    #[arg(long, default_value_t = 0, value_parser = at_least::<u64>(0))]
    seed: u64,
    /// Data decoding workers.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(2, |n| n.get()),
          value_parser = at_least::<usize>(1))]
    workers: usize,
    /// Evaluate every this many epochs (and always after the last); 0: only at the end.
    #[arg(long, default_value_t = 1, value_parser = at_least::<usize>(0))]
    zeroshot_frequency: usize,
    /// Write a checkpoint every this many epochs (and always after the last); 0: only at the end.
    #[arg(long, default_value_t = 1, value_parser = at_least::<usize>(0))]
    save_frequency: usize,
    /// Held-out samples evaluated.
    #[arg(long, default_value_t = 1000, value_parser = at_least::<usize>(1))]
    eval_samples: usize,
    /// Write a metrics.jsonl record every this many steps (and at the last).
    #[arg(long, default_value_t = 20, value_parser = at_least::<usize>(1))]
    log_every_n_steps: usize,
    /// Continue from a checkpoint: a path, or "latest" (the newest in this run's folder).
    #[arg(long)]
    resume: Option<String>,
    /// Output root; the run writes to LOGS/NAME.
    #[arg(long, default_value = "logs")]
    logs: PathBuf,
    /// Run name, one folder name (default: data-mask-seed). An existing run folder is refused
    /// unless --resume or --overwrite.
    #[arg(long)]
    name: Option<String>,
    /// Delete an existing run folder of this name and start afresh.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// auto (a GPU when one answers, else the CPU), cpu, cuda, or emu (the GPU path on the SIMT
    /// emulator: slow, for checking it).
    #[arg(long, default_value = "auto")]
    device: DevicePreference,
    /// No progress bar (there is none anyway when stdout or stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    /// Consecutive non-finite losses that stop the run.
    #[arg(long, default_value_t = 5, value_parser = at_least::<usize>(1))]
    max_bad_steps: usize,
    /// Run every step's launches one by one (GPU devices): by default the second step of a
    /// shape is captured into a CUDA graph (recorded on emu) and later steps replay it.
    #[arg(long)]
    no_graph: bool,
    /// Data-parallel runs (under mpirun/srun): the gathered features carry their gradients back
    /// to the rank they came from, so N ranks of batch b train as one process of batch N·b.
    #[arg(long)]
    gather_with_grad: bool,
    /// Data-parallel runs: each rank scores only its own samples against every rank's (a
    /// b × N·b loss instead of N·b × N·b).
    #[arg(long)]
    local_loss: bool,
    /// Data-parallel runs: seconds a rank waits in one collective before it gives up and ends the
    /// job (another rank hangs); 0 waits forever. PyTorch's default, 30 minutes: rank 0 evaluates
    /// and writes checkpoints while the others wait.
    #[arg(long, default_value_t = 1800, value_parser = at_least::<u64>(0))]
    collective_timeout: u64,
    #[command(flatten)]
    data_args: DataArgs,
    /// Test hook, not for real runs: replace the loss of these steps (0-based, comma-separated)
    /// by NaN, so that tests can drive the non-finite-loss path through the binary.
    #[arg(long, hide = true, value_delimiter = ',')]
    test_nonfinite_loss_at: Vec<usize>,
    /// Test hook, not for real runs: this rank sleeps (10 minutes) instead of training, so that
    /// tests can drive the collective timeout with a rank that hangs.
    #[arg(long, hide = true)]
    test_hang_rank: Option<usize>,
}

fn masking(args: &TrainArgs) -> Result<Masking, String> {
    let ratio = match args.mask_ratio.as_str() {
        "dynamic" => MaskRatio::Dynamic { min: 0.3, max: 0.5 },
        r => match r.parse::<f32>() {
            Ok(r) if (0.0..1.0).contains(&r) => MaskRatio::Fixed(r),
            _ => return Err(format!("--mask-ratio {r:?}: expected a number in [0, 1) or \"dynamic\"")),
        },
    };
    if args.mask == MaskMethod::Pgs && ratio == MaskRatio::Fixed(0.0) {
        return Err(crate::mask::PGS_RATIO_ZERO.into());
    }
    Ok(match args.mask {
        MaskMethod::None => Masking::None,
        MaskMethod::Flip => match ratio {
            MaskRatio::Fixed(ratio) => Masking::Flip { ratio },
            MaskRatio::Dynamic { .. } => return Err("--mask-ratio dynamic is PGS's; FLIP needs a number".into()),
        },
        MaskMethod::Pgs => {
            Masking::Pgs(PgsConfig { mode: args.pgs_mode, ratio, use_ed: !args.no_ed, use_otn: !args.no_otn })
        }
    })
}

/// bf16 on the GPU devices, f32 on the CPU (which computes in f32 only).
pub fn default_dtype(device: &Device) -> Dtype {
    if matches!(device, Device::Cpu) { Dtype::F32 } else { Dtype::Bf16 }
}

fn default_model(data: &str) -> &'static str {
    if data.starts_with("fashion-mnist") { "fmnist-tiny" } else { "shapes-tiny" }
}

/// Training as one process, or as one rank of those mpirun or srun started (then an error on one
/// rank ends them all: the others would wait for it in the next collective).
pub fn run(args: &TrainArgs) -> Result<(), Box<dyn Error>> {
    let mut world = distributed::connect()?;
    if world.size() == 1 {
        return run_as(args, DataParallel::new(world, args.gather_with_grad, args.local_loss));
    }
    if args.collective_timeout > 0 {
        world = Arc::new(Watched::new(world, Duration::from_secs(args.collective_timeout)));
    }
    let dp = DataParallel::new(world.clone(), args.gather_with_grad, args.local_loss);
    outln!("rank {} of {}, engine: {}", world.rank(), world.size(), world.engine());
    if args.test_hang_rank == Some(world.rank()) {
        std::thread::sleep(Duration::from_secs(600));
    }
    match run_as(args, dp) {
        Err(e) if !e.is::<Interrupted>() => {
            errln!("error on rank {} of {}: {e}; ending every rank", world.rank(), world.size());
            world.abort(1)
        }
        result => result,
    }
}

#[cfg_attr(not(feature = "nccl"), allow(unused_mut))]
fn run_as(args: &TrainArgs, mut dp: DataParallel) -> Result<(), Box<dyn Error>> {
    let lead = dp.rank() == 0;
    // `auto` trains on a GPU when one answers (the CUDA path: the Rust kernels and cuBLASLt),
    // else on the CPU and says why; `emu` runs the same GPU path on the SIMT emulator (slow: for
    // checking it without a GPU).
    let selection = Device::select(args.device)?;
    if lead {
        outln!("device: {selection}");
    }
    #[cfg(feature = "nccl")]
    if let (Device::Cuda(rt), true) = (&selection.device, dp.ranks() > 1) {
        let nccl = distributed::nccl::Nccl::new(dp.world.as_ref(), rt.stream.clone())?;
        dp.nccl = Some(Arc::new(nccl));
        outln!("rank {}: gradients all-reduced by NCCL on the GPU", dp.rank());
    }
    let masking = masking(args)?;
    let model = args.model.clone().unwrap_or_else(|| default_model(&args.data).to_string());
    let name = args.name.clone().unwrap_or_else(|| {
        let data = args.data.split([':', '/']).next().unwrap_or("data");
        format!("{data}-{}-seed{}", describe_masking(&masking).replace(' ', "-"), args.seed)
    });
    let cfg = TrainConfig {
        data: args.data.clone(),
        val_data: args.val_data.clone(),
        source_options: args.data_args.options(args.seed)?,
        model,
        epochs: args.epochs,
        batch_size: args.batch_size,
        train_num_samples: args.train_num_samples,
        lr: args.lr,
        wd: args.wd,
        beta1: args.beta1,
        beta2: args.beta2,
        eps: args.eps,
        warmup: args.warmup,
        grad_clip_norm: args.grad_clip_norm,
        accum_freq: args.accum_freq,
        grad_checkpointing: args.grad_checkpointing,
        dtype: args.dtype.unwrap_or(default_dtype(&selection.device)),
        gelu: args.gelu,
        masking,
        seed: args.seed,
        workers: args.workers,
        zeroshot_frequency: args.zeroshot_frequency,
        save_frequency: args.save_frequency,
        eval_samples: args.eval_samples,
        log_every_n_steps: args.log_every_n_steps,
        resume: args.resume.clone(),
        logs: args.logs.clone(),
        name,
        overwrite: args.overwrite,
        progress: !args.no_progress,
        max_bad_steps: args.max_bad_steps,
        graph: !args.no_graph,
        test_nonfinite_steps: args.test_nonfinite_loss_at.clone(),
    };
    cfg.validate()?;
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    // A second Ctrl-C while the checkpoint is written kills the process as usual.
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        errln!("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)");
    })?;
    let ranks = dp.ranks();
    let summary = train_data_parallel(&cfg, selection.device, interrupt, dp)?;
    if lead {
        report(&cfg, &summary, ranks)?;
    }
    if summary.interrupted { Err(Interrupted.into()) } else { Ok(()) }
}

/// A run stopped by Ctrl-C (after its checkpoint and report): the process exits with 130.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted (resume with --resume latest)")
    }
}

impl Error for Interrupted {}

/// The summary table, the plots and the mask grid (samples/s over all `ranks`).
fn report(cfg: &TrainConfig, s: &TrainSummary, ranks: usize) -> Result<(), Box<dyn Error>> {
    outln!(
        "\n{} {} steps in {:.1} s ({:.0} samples/s), final loss {:.4}, {} corrupt samples skipped{}",
        if s.interrupted { "interrupted after" } else { "trained" },
        s.steps,
        s.wall_s,
        (s.steps * cfg.batch_size * ranks) as f64 / s.wall_s.max(1e-9),
        s.final_loss,
        s.samples_skipped,
        if s.bad_steps > 0 { format!(", {} non-finite steps skipped", s.bad_steps) } else { String::new() }
    );
    if !s.eval.is_empty() {
        outln!("{:<34} {:>8}", "held-out metric", "value");
        for (k, v) in &s.eval {
            outln!("{k:<34} {:>7.1}%", 100.0 * v);
        }
        if let (Some(top1), Some(chance)) = (s.eval.get("zeroshot_top1"), s.eval.get("zeroshot_chance")) {
            outln!("zero-shot top-1 is {:.1}× chance", top1 / chance);
        }
    }
    let dir = &s.out_dir;
    // What this report writes, for the last line: only files that exist.
    let mut written = vec!["metrics.jsonl"];
    let (losses, _, _) = read_metrics(&dir.join("metrics.jsonl"));
    if losses.iter().any(|(_, l)| l.is_finite()) {
        let series = [Series { name: cfg.name.clone(), points: losses }];
        line_chart(&dir.join("loss.png"), "training loss", "step", "loss", &series, 900, 500)?;
        written.push("loss.png");
    }
    // Zero-shot accuracy over training for every run beside this one, one chart per data set
    // (accuracies on different data do not compare).
    let mut by_data: BTreeMap<String, Vec<Series>> = BTreeMap::new();
    for entry in std::fs::read_dir(&cfg.logs)?.flatten() {
        let (_, e, data) = read_metrics(&entry.path().join("metrics.jsonl"));
        if !e.is_empty() {
            let run = Series { name: entry.file_name().to_string_lossy().into_owned(), points: e };
            by_data.entry(data.unwrap_or_else(|| "data set not recorded".into())).or_default().push(run);
        }
    }
    let charts: Vec<(String, Vec<Series>)> = by_data
        .into_iter()
        .map(|(data, mut runs)| {
            runs.sort_by(|a, b| a.name.cmp(&b.name));
            (format!("held-out zero-shot top-1: {data}"), runs)
        })
        .collect();
    let zeroshot = cfg.logs.join("zeroshot.png");
    if !charts.is_empty() {
        stacked_line_charts(&zeroshot, &charts, "epoch", "top-1 (%)", 900, 450)?;
    }
    if mask_grid(cfg, &dir.join("masks.png"))? {
        written.push("masks.png");
    }
    written.push("checkpoints/");
    if !s.interrupted {
        written.push("model.safetensors");
    }
    let and_zeroshot = if charts.is_empty() { String::new() } else { format!(" and {}", zeroshot.display()) };
    outln!("wrote {} ({}){and_zeroshot}", dir.display(), written.join(", "));
    Ok(())
}

type Points = Vec<(f64, f64)>;

/// (step, loss) of the training records, (epoch, zero-shot top-1 %) of the evaluations and the
/// data they were on; for a resumed run, a later record of the same step replaces the earlier one.
fn read_metrics(path: &Path) -> (Points, Points, Option<String>) {
    let Ok(text) = std::fs::read_to_string(path) else { return (Vec::new(), Vec::new(), None) };
    let (mut losses, mut evals, mut data) = (BTreeMap::new(), BTreeMap::new(), None);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let step = v["step"].as_u64().unwrap_or(0);
        if let Some(loss) = v["loss"].as_f64() {
            losses.insert(step, loss);
        }
        if let (Some(epoch), Some(top1)) = (v["epoch"].as_u64(), v["eval"]["zeroshot_top1"].as_f64())
            && v.get("eval").is_some()
        {
            evals.insert(epoch, 100.0 * top1);
            data = v["data"].as_str().map(String::from).or(data);
        }
    }
    let points = |m: BTreeMap<u64, f64>| m.into_iter().map(|(k, v)| (k as f64, v)).collect();
    (points(losses), points(evals), data)
}

/// Eight held-out (or training) images with the run's masks at step 0: masked patches dimmed and
/// hatched, PGS candidates outlined, each labelled with the patches masked. False when the data
/// gave no image to draw.
fn mask_grid(cfg: &TrainConfig, path: &Path) -> Result<bool, Box<dyn Error>> {
    let model = ClipConfig::load(&cfg.model)?;
    let size = model.vision_cfg.image_size;
    let spec = cfg.val_data.as_deref().unwrap_or(&cfg.data);
    let source = data::open(spec, Split::Eval, &cfg.source_options)?;
    let set = EvalSet::load(source.as_ref(), 8, size as u32);
    if set.is_empty() {
        return Ok(false);
    }
    let shape = ImageBatchShape { n: set.len(), height: size, width: size };
    let at = MaskStep { seed: cfg.seed, step: 0, first: 0, epoch: 0, epochs: cfg.epochs };
    let request = MaskRequest { shape, patch: model.vision_cfg.patch_size, masking: cfg.masking, at };
    let masks = mask_cpu(&request, &set.images, None)?;
    let panels = set
        .rgb
        .iter()
        .zip(&masks.images)
        .enumerate()
        .map(|(i, (rgb, m))| {
            let big = image::imageops::resize(rgb, 3 * size as u32, 3 * size as u32, image::imageops::Nearest);
            let label = format!("{}: {}/{} masked", i + 1, masks.patches - m.kept.len(), masks.patches);
            crate::mask::labelled(&crate::mask::draw(&big, m, 3 * model.vision_cfg.patch_size), &label)
        })
        .collect::<Result<Vec<RgbImage>, String>>()?;
    crate::mask::save_png(&crate::mask::side_by_side(&panels), path)?;
    Ok(true)
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub struct EvalArgs {
    /// A checkpoint (model.safetensors or checkpoints/epoch_N.safetensors of a run).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Evaluation data: shapes, fashion-mnist[:DIR] (held-out splits), csv:FILE or wds:SHARDS.
    #[arg(long, default_value = "shapes")]
    data: String,
    /// Samples evaluated (the first ones of the source).
    #[arg(long, default_value_t = 1000, value_parser = at_least::<usize>(1))]
    eval_samples: usize,
    /// Seed of the shapes data (the one the run was trained with).
    #[arg(long, default_value_t = 0, value_parser = at_least::<u64>(0))]
    seed: u64,
    #[command(flatten)]
    data_args: DataArgs,
}

pub fn eval(args: &EvalArgs) -> Result<(), Box<dyn Error>> {
    let (cfg, params) = clip_pgs_model::checkpoint::load(&args.checkpoint, None)?;
    let source = data::open(&args.data, Split::Eval, &args.data_args.options(args.seed)?)?;
    let set = EvalSet::load(source.as_ref(), args.eval_samples, cfg.vision_cfg.image_size as u32);
    outln!("device: cpu; {} ({} samples used, {} skipped)", source.describe(), set.len(), set.skipped);
    if set.is_empty() {
        return Err(format!("{}: no usable sample to evaluate", source.describe()).into());
    }
    let tokenizer = ClipTokenizer::new()?;
    let clip = Clip::new(&cfg, &params.layout, false);
    let mut workspace = Workspace::inference(&clip, &Device::Cpu, CHUNK)?;
    let enc = Encoder::new(
        Pass { device: &Device::Cpu, clip: &clip, params: &params.data, weights: &params.data },
        &tokenizer,
        &mut workspace,
    );
    let metrics = evaluate(&enc, &set)?;
    outln!("{}", headline(&metrics));
    for (k, v) in &metrics {
        outln!("{k:<34} {:>7.1}%", 100.0 * v);
    }
    Ok(())
}
