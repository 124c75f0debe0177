//! `clip-pgs`: CLIP training with PGS patch masking: `train` and `eval` (the trainer), `edges`
//! (the PGS edge map of an image, on the CPU or a GPU), `mask` (PGS masks drawn on an image),
//! `parity` (the CLIP step on a device against open_clip), `bench` (GPU timings) and `devices`.

mod bench;
mod edges;
mod mask;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use clip_pgs_host::{Device, DevicePreference};
use clip_pgs_model::{errln, outln};

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
    /// Check the CLIP step against an open_clip golden file (clip-golden-v1): forward, backward, AdamW.
    Parity {
        /// A golden file made by tools/golden_open_clip.py.
        #[arg(long)]
        golden: std::path::PathBuf,
        /// auto, cpu, cuda, or emu (the GPU path on the SIMT emulator).
        #[arg(long, default_value = "auto")]
        device: DevicePreference,
        /// The activations' type: f32 (bounds 1e-4, gradients 1e-3) or bf16 (3e-2, 5e-2; GPU
        /// devices only); default: bf16 on a GPU device, f32 on the cpu.
        #[arg(long)]
        dtype: Option<Dtype>,
        /// Also write the golden's parameters as a clip-pgs checkpoint (for tools/checkpoint_open_clip.py).
        #[arg(long)]
        save_checkpoint: Option<std::path::PathBuf>,
    },
    /// Train CLIP (with none / FLIP / PGS masking); writes checkpoints, metrics.jsonl and plots.
    Train(Box<train::TrainArgs>),
    /// Evaluate a checkpoint: zero-shot, retrieval, compositionality, robustness.
    Eval(train::EvalArgs),
    /// Benchmarks of the GPU kernels: `bench pgs` (CUDA timings, or emulator traffic with --device emu).
    Bench(bench::BenchArgs),
    /// Say which device clip-pgs runs on, and why.
    Devices {
        /// auto, cpu, cuda or emu
        #[arg(long, default_value = "auto")]
        device: DevicePreference,
    },
}

/// Element type of the tensors a GPU command reads and computes with (`--dtype f32|bf16`).
pub use clip_pgs_model::precision::Dtype;

/// Parses a whole-number flag, with a range error below `min` (`--epochs -1`, `--size 0`).
pub fn at_least<T: TryFrom<i64> + Clone + Send + Sync + 'static>(min: i64) -> clap::builder::RangedI64ValueParser<T> {
    clap::builder::RangedI64ValueParser::new().range(min..)
}

/// `clip-pgs parity`: prints max abs/rel error per group, fails above tolerance.
fn parity(
    path: &std::path::Path,
    device: DevicePreference,
    dtype: Option<Dtype>,
    checkpoint: Option<&std::path::Path>,
) -> Result<(), Box<dyn std::error::Error>> {
    let golden = clip_pgs_model::golden::Golden::load(path)?;
    if let Some(out) = checkpoint {
        clip_pgs_model::checkpoint::save(out, &golden.config_json, &golden.params)?;
        outln!("wrote checkpoint {}", out.display());
    }
    let selection = Device::select(device)?;
    let dtype = dtype.unwrap_or(train::default_dtype(&selection.device));
    outln!("device: {selection}; {dtype}; golden {}", path.display());
    let (report, ok) = golden.check(&selection.device, dtype)?;
    outln!("{}", report.trim_end());
    if ok {
        Ok(())
    } else {
        Err(format!("parity with open_clip failed in {dtype} (the bounds are in the report)").into())
    }
}

/// `clip-pgs devices`: the device `--device` picks, then every device and whether it can run.
fn devices(preference: DevicePreference) -> Result<(), Box<dyn std::error::Error>> {
    outln!("device: {}", Device::select(preference)?);
    outln!("available:");
    outln!("  cpu   the f32 reference: {}", Device::Cpu);
    match Device::select(DevicePreference::Cuda) {
        Ok(s) => outln!("  cuda  {s}"),
        Err(e) => outln!("  cuda  not usable: {e}"),
    }
    outln!("  emu   the GPU kernels on the SIMT emulator with sanitizer checks: for checking kernels, not for speed");
    Ok(())
}

/// glibc hands freed blocks above 128 KiB back to the OS at once (munmap), so the next step
/// faults them in again, with a TLB shootdown per unmap on every core: a CPU training step that
/// allocates and frees its activations op by op spent a quarter of its time there (perf, ViT-B/16
/// batch 8). Keeping freed memory in the heap makes that step 20% faster at the same peak RSS.
/// (The activation arena of the device model will make the step allocate nothing.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: glibc's documented tuning calls, made before any thread starts.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20); // glibc's largest: 32 MiB on 64-bit
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let result = match Cli::parse().command {
        Command::Edges(args) => edges::run(&args),
        Command::Mask(args) => mask::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Eval(args) => train::eval(&args),
        Command::Parity { golden, device, dtype, save_checkpoint } => {
            parity(&golden, device, dtype, save_checkpoint.as_deref())
        }
        Command::Devices { device } => devices(device),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Ctrl-C: the checkpoint and the report are written; exit as a shell expects (128 + SIGINT).
        Err(e) if e.is::<train::Interrupted>() => {
            errln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            errln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag a user can see says what it does in `--help`, down to `bench pgs`.
    #[test]
    fn every_flag_has_a_description() {
        let command = super::Cli::command();
        let subs = command.get_subcommands().flat_map(|s| std::iter::once(s).chain(s.get_subcommands()));
        for sub in subs {
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                let id = arg.get_id().as_str();
                assert!(
                    arg.get_help().is_some() || ["help", "version"].contains(&id),
                    "clip-pgs {} --{id} has no description",
                    sub.get_name()
                );
            }
        }
    }
}
