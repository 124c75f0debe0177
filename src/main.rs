//! `clip-pgs`: CLIP training with PGS patch masking. So far: `edges` (the PGS edge map of an
//! image, on the CPU or a GPU), `mask` (PGS masks drawn on an image) and `devices` (which device
//! runs, and why).

mod bench;
mod edges;
mod mask;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use clip_pgs_host::{Device, DevicePreference};

#[derive(Parser)]
#[command(name = "clip-pgs", version, about = "CLIP training with PGS patch masking (Patch Generation-to-Selection)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compute the PGS edge map (pgs-spec.md step 1) of an image, print it and draw it.
    Edges(edges::EdgesArgs),
    /// Draw the patches a masking method drops (PGS paper/reference, FLIP, none) on an image.
    Mask(mask::MaskArgs),
    /// Benchmarks on a GPU (CUDA events): `bench pgs`.
    Bench(bench::BenchArgs),
    /// Say which device clip-pgs runs on, and why.
    Devices {
        /// auto, cpu or cuda
        #[arg(long, default_value = "auto")]
        device: DevicePreference,
    },
}

/// Element type of the tensors a GPU command reads (`--dtype`).
#[derive(Clone, Copy, ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Edges(args) => edges::run(&args),
        Command::Mask(args) => mask::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Devices { device } => Device::select(device).map(|s| println!("device: {s}")).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
