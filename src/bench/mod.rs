//! `clip-pgs bench`: `pgs` (the PGS pipeline: CUDA timings, or the emulator's traffic counters),
//! `step` (training steps: CPU and CUDA timings, or the emulator's traffic per kernel) and
//! `attention` (the flash attention kernels on the model's shapes, beside the unfused path).

mod attention;
mod pgs;
mod step;
mod step_traffic;

use std::error::Error;

use clap::{Args, Subcommand};

/// ViT-B/16 CLIP (open_clip): image tower parameters and tokens, text tower parameters and tokens.
const VIT_B16_IMAGE: (f64, f64) = (86.2e6, 197.0);
const VIT_B16_TEXT: (f64, f64) = (63.4e6, 77.0);
/// The measured bf16 GEMM rate of an H100 (architecture.md), the step floor's yardstick.
const GEMM_FLOPS: f64 = 790e12;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Every PGS kernel and the whole pipeline (paper, dynamic, reference) and FLIP.
    Pgs(pgs::PgsBench),
    /// Training steps of a CLIP config in this process: one JSON line with the median step time
    /// and the peak memory (tools/bench_train_step.sh interleaves it with PyTorch).
    Step(step::StepBench),
    /// The flash attention kernels, forward and backward, on ViT-B/16's and the text tower's
    /// shapes (PGS lengths, causal), beside the unfused path: one JSON line per case
    /// (tools/bench_attention.sh sets PyTorch's SDPA beside it).
    Attention(attention::AttentionBench),
}

pub fn run(args: &BenchArgs) -> Result<(), Box<dyn Error>> {
    match &args.what {
        BenchWhat::Pgs(args) => pgs::run(args),
        BenchWhat::Step(args) => step::run(args),
        BenchWhat::Attention(args) => attention::run(args),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
