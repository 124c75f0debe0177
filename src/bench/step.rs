//! `clip-pgs bench step`: training steps of a CLIP config in this process, the trainer's step
//! function on random images and real captions: median step time and peak memory as one JSON line
//! (tools/bench_train_step.sh interleaves it with PyTorch's on the CPU).
//!
//! `--device cuda`: each step between two CUDA events on the runtime's stream (the batch's upload,
//! the masks, forward, loss, backward, the gradient norm and AdamW), median, min and max; MFU
//! against the measured H100 bf16 GEMM rate; the peak of the driver's used GPU memory above what
//! was used before the workload was built (tools/bench_step_gpu.sh sets it beside open_clip's).

use std::error::Error;

use clap::Args;

use super::{GEMM_FLOPS, median};
use crate::train::MaskMethod;
use clip_pgs_host::bf16;
use clip_pgs_host::cuda::CudaRuntime;
use clip_pgs_host::ops::pgs::{MaskRatio, Masking, PgsConfig, PgsMode};
use clip_pgs_host::{Device, DevicePreference};
use clip_pgs_kernels::select::masked_count;
use clip_pgs_model::bench::{StepWorkload, train_step_flops};
use clip_pgs_model::outln;
use clip_pgs_model::precision::{Dtype, Precision};
use cudarc::driver::sys::CUevent_flags;

#[derive(Args)]
pub struct StepBench {
    /// Model config: a built-in name or a JSON file.
    #[arg(long, default_value = "ViT-B-16")]
    pub(super) model: String,
    /// Images (and captions) per step.
    #[arg(long, default_value_t = 2)]
    pub(super) batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub(super) steps: usize,
    /// Untimed steps first (on a GPU the first warms the caches and the second is captured
    /// into a CUDA graph that the timed steps replay).
    #[arg(long, default_value_t = 2)]
    pub(super) warmup: usize,
    /// Time steps launched kernel by kernel, not replayed from a CUDA graph.
    #[arg(long)]
    pub(super) no_graph: bool,
    /// Patches masked before the image tower: none, flip or pgs (paper mode, token similarity on).
    #[arg(long, value_enum, default_value_t = MaskMethod::None)]
    pub(super) mask: MaskMethod,
    /// Fraction masked (flip, pgs).
    #[arg(long, default_value_t = 0.5)]
    pub(super) mask_ratio: f32,
    /// cpu (wall-clock steps), cuda (steps timed with CUDA events, MFU, peak GPU memory) or emu
    /// (the emulator's traffic counters per kernel, one step).
    #[arg(long, default_value = "cpu")]
    pub(super) device: DevicePreference,
    /// The activations' type: f32 or bf16 (default: bf16 on a GPU device, f32 on the cpu).
    #[arg(long)]
    pub(super) dtype: Option<Dtype>,
}

impl StepBench {
    pub(super) fn masking(&self) -> Result<Masking, String> {
        if !(0.0..1.0).contains(&self.mask_ratio) {
            return Err(format!("--mask-ratio {}: expected a number in [0, 1)", self.mask_ratio));
        }
        Ok(match self.mask {
            MaskMethod::None => Masking::None,
            MaskMethod::Flip => Masking::Flip { ratio: self.mask_ratio },
            MaskMethod::Pgs => Masking::Pgs(PgsConfig {
                mode: PgsMode::Paper,
                ratio: MaskRatio::Fixed(self.mask_ratio),
                use_ed: true,
                use_otn: true,
            }),
        })
    }
}

/// `bench step`: `steps` timed training steps after `warmup`, as one JSON line.
pub fn run(args: &StepBench) -> Result<(), Box<dyn Error>> {
    if args.steps == 0 || args.batch == 0 {
        return Err("bench step needs at least one step of at least one image".into());
    }
    let selection = Device::select(args.device).map_err(|e| match args.device {
        DevicePreference::Cuda => format!("bench step --device cuda needs a CUDA GPU: {e}"),
        _ => e.to_string(),
    })?;
    let device = selection.device.clone();
    let dtype = args.dtype.unwrap_or(crate::train::default_dtype(&device));
    match (&device, dtype) {
        (Device::Cpu, Dtype::F32) => {}
        (Device::Cpu, Dtype::Bf16) => return Err("bench step on the cpu device runs f32 only".into()),
        (Device::Emu(_), Dtype::F32) => return super::step_traffic::run::<f32>(args),
        (Device::Emu(_), Dtype::Bf16) => return super::step_traffic::run::<bf16>(args),
        (Device::Cuda(rt), Dtype::F32) => return cuda_steps::<f32>(args, rt, device.clone()),
        (Device::Cuda(rt), Dtype::Bf16) => return cuda_steps::<bf16>(args, rt, device.clone()),
    }
    let mut workload: StepWorkload = StepWorkload::new(&args.model, args.batch, device, args.masking()?)?;
    for _ in 0..args.warmup {
        workload.step()?;
    }
    let mut times = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        let start = std::time::Instant::now();
        workload.step()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let median = median(times);
    outln!(
        "{}",
        serde_json::json!({
            "name": format!("{}_batch{}", args.model, args.batch),
            "mask": format!("{:?} {}", args.mask, args.mask_ratio),
            "device": Device::Cpu.to_string(),
            "median_s": median,
            "samples_per_s": args.batch as f64 / median,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}

/// `bench step --device cuda`: every step timed between two CUDA events on the runtime's stream;
/// one JSON line with the median, min and max, samples/s, MFU and the peak GPU memory.
fn cuda_steps<T: Precision>(args: &StepBench, rt: &CudaRuntime, device: Device) -> Result<(), Box<dyn Error>> {
    // What the driver counts as used before the workload (this context, its module, and other
    // processes), so that only the workload's memory is reported.
    let baseline = driver_used(rt, "before building the workload")?;
    let mut workload: StepWorkload<T> = StepWorkload::new(&args.model, args.batch, device.clone(), args.masking()?)
        .map_err(|e| {
            format!("bench step on {device}: building the {} workload at batch {}: {e}", args.model, args.batch)
        })?;
    workload.step.capture = !args.no_graph;
    let in_step = |i: usize, e: String| format!("bench step on {device}: step {i}: {e}");
    for i in 0..args.warmup {
        workload.step().map_err(|e| in_step(i, e))?;
    }
    rt.stream.synchronize().map_err(cuda("waiting for the warm-up steps"))?;
    // The driver's used memory is sampled (after the warm-up and after every timed step, outside
    // the timing), not a high-water mark: memory allocated and freed within a step is not seen.
    let mut peak = driver_used(rt, "after the warm-up")?;
    let event = || rt.context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda("creating a CUDA event"));
    let mut times = Vec::with_capacity(args.steps);
    for i in 0..args.steps {
        let (start, end) = (event()?, event()?);
        start.record(&rt.stream).map_err(cuda("recording the event before a step"))?;
        workload.step().map_err(|e| in_step(args.warmup + i, e))?;
        end.record(&rt.stream).map_err(cuda("recording the event after a step"))?;
        times.push(start.elapsed_ms(&end).map_err(cuda("waiting for a step and reading its time"))? as f64 * 1e-3);
        peak = peak.max(driver_used(rt, "after a timed step")?);
    }
    let (min, max) = (times.iter().copied().fold(f64::INFINITY, f64::min), times.iter().copied().fold(0.0, f64::max));
    let median = median(times);
    let l = workload.cfg.patches();
    let kept = match args.mask {
        MaskMethod::None => l,
        // PGS (paper, fixed ratio) and FLIP mask floor(ratio · L) patches per image; PGS masks
        // more only when it seeds more regions than that.
        MaskMethod::Flip | MaskMethod::Pgs => l - masked_count(args.mask_ratio, l),
    };
    let flops = train_step_flops(&workload.cfg, args.batch, kept) as f64;
    outln!(
        "{}",
        serde_json::json!({
            "name": format!("{}_batch{}", args.model, args.batch),
            "device": device.to_string(),
            "mask": format!("{:?} {}", args.mask, args.mask_ratio),
            "kept_tokens": kept,
            "precision": format!("{} activations and weights, f32 master weights and accumulation", T::DTYPE),
            "steps": args.steps,
            "warmup": args.warmup,
            "cuda_graph": workload.step.capture,
            "median_s": median,
            "min_s": min,
            "max_s": max,
            "ms_per_step": median * 1e3,
            "samples_per_s": args.batch as f64 / median,
            "flops_per_step": flops,
            // GEMM_FLOPS: 790 TFLOP/s, the H100's bf16 dense GEMM rate measured in the issue; the
            // same yardstick for every precision and peer.
            "mfu": flops / median / GEMM_FLOPS,
            "mfu_yardstick": "790 TFLOP/s, the measured H100 bf16 dense GEMM rate",
            // The driver's used memory (total − free), the max of the samples, above the baseline.
            "peak_gpu_mb": peak.saturating_sub(baseline) as f64 / (1 << 20) as f64,
            "commit": env!("CLIP_PGS_COMMIT"),
        })
    );
    Ok(())
}

/// A driver error as the error of `what` was being done.
fn cuda(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> String {
    move |e| format!("CUDA error while {what}: {e}")
}

/// The memory the driver counts as used on the GPU (total − free, every process), in bytes.
fn driver_used(rt: &CudaRuntime, when: &str) -> Result<usize, String> {
    let read = || {
        rt.context.bind_to_thread()?;
        cudarc::driver::result::mem_get_info()
    };
    let (free, total) = read().map_err(|e| format!("CUDA error while reading the GPU's free memory {when}: {e}"))?;
    Ok(total.saturating_sub(free))
}

/// This process's peak resident memory (Linux `VmHWM`), in MB; None elsewhere.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
