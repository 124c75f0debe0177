//! `clip-pgs bench step --device emu`: one training step on the emulator with its traffic
//! counters, per kernel, and the cuBLASLt calls the emulator's interpreter ran with their FLOPs
//! and bytes; from both, the H100 roofline lower bound of the step (an estimate, not a timing).
//!
//! Per kernel: sector bytes (32 × the sectors its warp requests touched: what it moves through
//! L2), distinct bytes (bytes of global memory read plus written at least once: what must cross
//! DRAM at least once). Every kernel here touches only bytes its op needs — whole tensors, or the
//! rows its indices select — so distinct bytes are its analytic minimum, and sector bytes /
//! distinct is how often it moves a byte (re-reads of a row a warp has just read are L1 hits on
//! a GPU; the emulator does not model caches). Efficiency: bytes used / sector bytes.

use std::error::Error;
use std::path::PathBuf;

use clip_pgs_host::Device;
use clip_pgs_host::emu::EmuRuntime;
use clip_pgs_kernels::hw::emu::Options;
use clip_pgs_model::bench::StepWorkload;
use clip_pgs_model::outln;
use clip_pgs_model::precision::Precision;

use super::GEMM_FLOPS;
use super::step::StepBench;

/// The copy bandwidth of an H100 SXM (the measured figure), bytes per second.
const COPY_BYTES_PER_S: f64 = 3.0e12;

/// A kernel is memory-bound here when a launch must move at least this much (0.35 µs at 3 TB/s,
/// the order of a launch's own cost): below, latency decides its time, not its traffic.
const MEMORY_BOUND_BYTES: usize = 1 << 20;

/// One kernel's launches in the step, summed.
#[derive(Default)]
struct KernelTotals {
    launches: usize,
    requests: u64,
    sector_bytes: u64,
    used_bytes: f64,
    distinct: u64,
    worst_efficiency: f64,
}

pub fn run<T: Precision>(args: &StepBench) -> Result<(), Box<dyn Error>> {
    // A runtime with the counters on.
    let emu = EmuRuntime::new(Options { counters: true, ..Options::default() });
    let device = Device::Emu(emu.clone());
    outln!("device: {device}");
    let masking = args.masking()?;
    let mut workload: StepWorkload<T> = StepWorkload::new(&args.model, args.batch, device, masking)?;
    emu.keep_reports();
    let start = std::time::Instant::now();
    workload.step()?;
    let loss = workload.loss()?;
    outln!("one step in {:.1} s on the emulator, loss {loss:.4}", start.elapsed().as_secs_f64());

    let mut kernels: Vec<(&'static str, KernelTotals)> = Vec::new();
    for report in emu.take_reports() {
        let t = &report.traffic;
        let index = match kernels.iter().position(|(k, _)| *k == report.kernel) {
            Some(i) => i,
            None => {
                kernels.push((report.kernel, KernelTotals { worst_efficiency: 1.0, ..KernelTotals::default() }));
                kernels.len() - 1
            }
        };
        let k = &mut kernels[index].1;
        k.launches += 1;
        k.requests += t.global_requests();
        k.sector_bytes += t.sector_bytes();
        k.used_bytes += t.sector_efficiency() * t.sector_bytes() as f64;
        k.distinct += t.distinct_read + t.distinct_written;
        k.worst_efficiency = k.worst_efficiency.min(t.sector_efficiency());
    }
    kernels.sort_by_key(|(_, k)| std::cmp::Reverse(k.sector_bytes));

    let mut gemms: Vec<(&'static str, usize, u64, u64, f64)> = Vec::new();
    for g in emu.take_gemms() {
        let bound = (g.flops as f64 / GEMM_FLOPS).max(g.min_bytes as f64 / COPY_BYTES_PER_S);
        match gemms.iter_mut().find(|e| e.0 == g.epilogue) {
            Some(e) => (e.1, e.2, e.3, e.4) = (e.1 + 1, e.2 + g.flops, e.3 + g.min_bytes, e.4 + bound),
            None => gemms.push((g.epilogue, 1, g.flops, g.min_bytes, bound)),
        }
    }

    let mut rows = Vec::new();
    let (mut kernel_bound, mut kernel_distinct, mut kernel_sectors) = (0.0, 0u64, 0u64);
    let mut misses = Vec::new();
    for (name, k) in &kernels {
        let efficiency = k.used_bytes / k.sector_bytes.max(1) as f64;
        let ratio = k.sector_bytes as f64 / k.distinct.max(1) as f64;
        let bound = k.distinct as f64 / COPY_BYTES_PER_S;
        (kernel_bound, kernel_distinct, kernel_sectors) =
            (kernel_bound + bound, kernel_distinct + k.distinct, kernel_sectors + k.sector_bytes);
        let memory_bound = k.distinct as usize / k.launches >= MEMORY_BOUND_BYTES;
        if memory_bound && (ratio > 1.2 || efficiency < 0.8) {
            misses.push(format!("{name} ({ratio:.2}×, {:.0}%)", 100.0 * efficiency));
        }
        rows.push(format!(
            "| {name} | {} | {} | {} | {} | {} | {ratio:.2}× | {:.0}% | {:.0}% | {:.1} |",
            if memory_bound { "yes" } else { "" },
            k.launches,
            k.requests,
            k.sector_bytes,
            k.distinct,
            100.0 * efficiency,
            100.0 * k.worst_efficiency,
            bound * 1e6,
        ));
    }
    let mut gemm_rows = Vec::new();
    let (mut gemm_flops, mut gemm_bound) = (0u64, 0.0);
    for (epilogue, calls, flops, bytes, bound) in &gemms {
        (gemm_flops, gemm_bound) = (gemm_flops + flops, gemm_bound + bound);
        gemm_rows.push(format!("| {epilogue} | {calls} | {:.2} | {bytes} | {:.1} |", *flops as f64 / 1e9, bound * 1e6));
    }
    let step_bound = kernel_bound + gemm_bound;
    let commit = env!("CLIP_PGS_COMMIT");
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let table = format!(
        "# Training-step traffic on the emulator\n\n\
         Device: emu (the kernels' Rust source on the SIMT emulator: counters, not timings). Commit {commit}.\n\
         Command: `{command}`\n\
         Model {model}, batch {batch}, masks {mask:?} {ratio}, {dtype} activations. One step: masks, forward, loss, backward, \
         gradient norm, AdamW.\n\n\
         ## Kernels\n\n\
         Sector bytes: 32 × the 32-byte sectors all warp requests touched (L2 traffic). Distinct: bytes read \
         plus written at least once — every kernel touches only bytes its op needs, so this is its analytic \
         minimum and what must cross DRAM. Moved / minimum: sector bytes / distinct (above 1: a byte moved \
         again, an L1/L2 hit on a GPU when the re-read follows soon, as in the row kernels' second pass). \
         Efficiency: bytes used / sector bytes, over all launches and for the worst launch. Lower bound: \
         distinct bytes at {bw:.1} TB/s (an H100's copy rate).\n\n\
         | kernel | memory-bound | launches | global requests | sector bytes | distinct bytes | moved / minimum \
         | efficiency | worst launch | H100 lower bound µs |\n|---|---|---|---|---|---|---|---|---|---|\n{rows}\n\
         | **all kernels** | | | | {kernel_sectors} | {kernel_distinct} | | | | {kernel_us:.1} |\n\n\
         Memory-bound: at least {mb} MiB per launch. Memory-bound kernels above 1.2× or below 80%: {misses}.\n\n\
         ## cuBLASLt calls (the interpreter's records)\n\n\
         FLOPs 2·m·n·k per product; minimum bytes: A, B, D (and C when β ≠ 0) and the epilogue's vectors, once. \
         Lower bound per call: the larger of FLOPs at {tf:.0} TFLOP/s (an H100's measured bf16 dense rate) and \
         bytes at {bw:.1} TB/s, summed.\n\n\
         | epilogue | calls | GFLOP | minimum bytes | H100 lower bound µs |\n|---|---|---|---|---|\n{gemm_rows}\n\n\
         ## The step's roofline lower bound (an estimate)\n\n\
         GEMMs {gemm_us:.1} µs + other kernels {kernel_us:.1} µs = **{step_us:.1} µs** per step of {batch} \
         ({samples:.0} samples/s at most; at that bound the GEMMs' {gflop:.1} GFLOP would run at {mfu:.0}% of \
         {tf:.0} TFLOP/s). Counts scale with the batch except \
         the optimizer's (per parameter).\n",
        model = args.model,
        dtype = T::DTYPE,
        batch = args.batch,
        mask = args.mask,
        ratio = args.mask_ratio,
        bw = COPY_BYTES_PER_S / 1e12,
        mb = MEMORY_BOUND_BYTES >> 20,
        tf = GEMM_FLOPS / 1e12,
        rows = rows.join("\n"),
        kernel_us = kernel_bound * 1e6,
        misses = if misses.is_empty() { "none".to_string() } else { misses.join(", ") },
        gemm_rows = gemm_rows.join("\n"),
        gemm_us = gemm_bound * 1e6,
        step_us = step_bound * 1e6,
        samples = args.batch as f64 / step_bound,
        gflop = gemm_flops as f64 / 1e9,
        mfu = 100.0 * gemm_flops as f64 / step_bound / GEMM_FLOPS,
    );
    outln!("{table}");
    let out = PathBuf::from(format!("benches/results/train-step-traffic-emu-{}.md", T::DTYPE));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, table)?;
    outln!("wrote {}", out.display());
    Ok(())
}
