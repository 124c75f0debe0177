//! `clip-pgs bench step`: training steps of a CLIP config in this process, the trainer's step
//! function on random images and real captions: median step time and peak memory as one JSON line
//! (tools/bench_train_step.sh interleaves it with PyTorch's on the CPU).

use std::error::Error;

use clap::Args;

use super::median;
use crate::train::MaskMethod;
use clip_pgs_host::ops::pgs::{MaskRatio, Masking, PgsConfig, PgsMode};
use clip_pgs_host::{Device, DevicePreference};
use clip_pgs_model::outln;

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
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub(super) warmup: usize,
    /// Patches masked before the image tower: none, flip or pgs (paper mode, token similarity on).
    #[arg(long, value_enum, default_value_t = MaskMethod::None)]
    pub(super) mask: MaskMethod,
    /// Fraction masked (flip, pgs).
    #[arg(long, default_value_t = 0.5)]
    pub(super) mask_ratio: f32,
    /// cpu (wall-clock steps) or emu (the emulator's traffic counters per kernel, one step).
    #[arg(long, default_value = "cpu")]
    pub(super) device: DevicePreference,
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
    let selection = Device::select(args.device)?;
    let device = selection.device.clone();
    match device {
        Device::Cpu => {}
        Device::Emu(_) => return super::step_traffic::run(args, device),
        Device::Cuda(_) => return Err("bench step on cuda is not built yet".into()),
    }
    let mut workload = clip_pgs_model::bench::StepWorkload::new(&args.model, args.batch, device, args.masking()?)?;
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

/// This process's peak resident memory (Linux `VmHWM`), in MB; None elsewhere.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
