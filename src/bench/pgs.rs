//! `clip-pgs bench pgs`: the PGS pipeline on a GPU, timed with CUDA events, L2 flushed between
//! repeats, medians reported per kernel and for the whole pipeline, beside the device's measured
//! copy bandwidth and the ViT-B/16 training-step floor at the same batch. Writes JSON under
//! benches/results/.
//!
//! `--device emu`: no timings (the emulator is not a GPU) but the traffic counters of every
//! kernel launch — warp requests, 32-byte sectors, sector efficiency, distinct bytes, bank
//! conflicts, barriers — beside each kernel's analytic minimum; writes a Markdown table.

use std::error::Error;
use std::path::PathBuf;

use clap::Args;

use super::{GEMM_FLOPS, VIT_B16_IMAGE, VIT_B16_TEXT, median};
use crate::Dtype;
use clip_pgs_host::cuda::CudaRuntime;
use clip_pgs_host::ops::edge_map::{ImageBatchShape, ImageElement};
use clip_pgs_host::ops::pgs::gpu::{Timeline, mask_gpu_timed};
use clip_pgs_host::ops::pgs::{MaskRatio, MaskRequest, MaskStep, Masking, PgsConfig, PgsMode};
use clip_pgs_host::{Device, DevicePreference, bf16};
use clip_pgs_kernels::philox::Philox;
use clip_pgs_model::outln;
use cudarc::driver::sys::CUevent_flags;

#[derive(Args)]
pub struct PgsBench {
    /// Images per batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Patch side in pixels.
    #[arg(long, default_value_t = 16)]
    patch: usize,
    /// Timed repeats per run (the median is reported; CUDA only).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Element type of the images and tokens.
    #[arg(long, default_value = "bf16")]
    dtype: Dtype,
    /// Token width for the runs with token similarity (α > 0).
    #[arg(long, default_value_t = 768)]
    dim: usize,
    /// JSON output (Markdown with `--device emu`); default benches/results/pgs-<gpu>-<commit>.json,
    /// or benches/results/pgs-traffic-emu.md.
    #[arg(long)]
    out: Option<PathBuf>,
    /// cuda (timings) or emu (traffic counters from the emulator, no timings).
    #[arg(long, default_value = "cuda")]
    device: DevicePreference,
}

pub fn run(args: &PgsBench) -> Result<(), Box<dyn Error>> {
    match args.device {
        DevicePreference::Cuda => {}
        DevicePreference::Emu => {
            return match args.dtype {
                Dtype::F32 => traffic::<f32>(args, |v| v),
                Dtype::Bf16 => traffic::<bf16>(args, bf16::from_f32),
            };
        }
        other => return Err(format!("clip-pgs bench runs on cuda or emu, not {other:?}").into()),
    }
    let selection =
        Device::select(DevicePreference::Cuda).map_err(|e| format!("clip-pgs bench needs a CUDA GPU: {e}"))?;
    let Device::Cuda(rt) = &selection.device else { unreachable!("Cuda was asked for") };
    outln!("device: {selection}");
    match args.dtype {
        Dtype::F32 => bench::<f32>(rt, &selection.device, args, |v| v),
        Dtype::Bf16 => bench::<bf16>(rt, &selection.device, args, bf16::from_f32),
    }
}

fn bench<T: ImageElement>(
    rt: &CudaRuntime,
    device: &Device,
    args: &PgsBench,
    convert: impl Fn(f32) -> T,
) -> Result<(), Box<dyn Error>> {
    let shape = ImageBatchShape { n: args.batch, height: args.size, width: args.size };
    let l = (args.size / args.patch).pow(2);
    let rng = Philox::new(1, 2, 3);
    let images: Vec<T> = (0..shape.len() as u32).map(|i| convert(rng.uniform(i) * 4.0 - 2.0)).collect();
    let tokens: Vec<T> = (0..(shape.n * l * args.dim) as u32).map(|i| convert(rng.uniform(i) - 0.5)).collect();
    let (images, tokens) = (device.upload(&images)?, device.upload(&tokens)?);
    let event = || rt.context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));

    // The device's copy bandwidth: a 1 GiB device-to-device copy (read + write).
    let bytes = 1usize << 30;
    let src = rt.stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = rt.stream.alloc_zeros::<u8>(bytes)?;
    let mut copies = Vec::new();
    for _ in 0..10 {
        let (start, end) = (event()?, event()?);
        start.record(&rt.stream)?;
        rt.stream.memcpy_dtod(&src, &mut dst)?;
        end.record(&rt.stream)?;
        copies.push(start.elapsed_ms(&end)? as f64);
    }
    let copy_gbs = 2.0 * bytes as f64 / (median(copies) * 1e-3) / 1e9;
    drop((src, dst));
    let mut flush = rt.stream.alloc_zeros::<u8>(256 << 20)?;

    let floor_ms =
        6.0 * (VIT_B16_IMAGE.0 * VIT_B16_IMAGE.1 + VIT_B16_TEXT.0 * VIT_B16_TEXT.1) * shape.n as f64 / GEMM_FLOPS * 1e3;
    outln!("copy bandwidth {copy_gbs:.0} GB/s; ViT-B/16 step floor at batch {}: {floor_ms:.2} ms", shape.n);
    let runs = pgs_runs();
    let elem = std::mem::size_of::<T>();
    let mut json_runs = Vec::new();
    for (name, masking, epoch) in runs {
        let at = MaskStep { seed: 0, step: 0, first: 0, epoch, epochs: 32 };
        let tokens = (epoch > 0).then_some((&tokens, args.dim));
        let mut totals = Vec::new();
        let mut stages: Vec<(&'static str, Vec<f64>)> = Vec::new();
        for _ in 0..args.repeats {
            rt.stream.memset_zeros(&mut flush)?;
            let start = event()?;
            start.record(&rt.stream)?;
            let mut timeline: Option<Timeline> = Some(Vec::new());
            let request = MaskRequest { shape, patch: args.patch, masking, at };
            mask_gpu_timed(device, &request, images.view(), tokens.map(|(t, d)| (t.view(), d)), &mut timeline)?;
            let timeline = timeline.unwrap_or_default();
            let mut previous = &start;
            for (i, (stage, end)) in timeline.iter().enumerate() {
                if stages.len() <= i {
                    stages.push((stage, Vec::new()));
                }
                stages[i].1.push(previous.elapsed_ms(end)? as f64);
                previous = end;
            }
            totals.push(start.elapsed_ms(previous)? as f64);
        }
        let total = median(totals);
        outln!("{name}: {total:.3} ms ({:.2}% of the step floor)", 100.0 * total / floor_ms);
        let mut json_stages = Vec::new();
        for (stage, times) in stages {
            let ms = median(times);
            // The memory-bound edge map reads the images once and writes E.
            let gbs =
                (stage == "pgs_edge_map").then(|| (shape.len() * elem + shape.n * l * 4) as f64 / (ms * 1e-3) / 1e9);
            match gbs {
                Some(g) => outln!("  {stage:<28} {ms:>8.3} ms  {g:>6.0} GB/s ({:.0}% of copy)", 100.0 * g / copy_gbs),
                None => outln!("  {stage:<28} {ms:>8.3} ms"),
            }
            json_stages.push(format!(
                "{{\"kernel\": \"{stage}\", \"median_ms\": {ms:.5}{}}}",
                gbs.map_or(String::new(), |g| format!(", \"gb_per_s\": {g:.1}"))
            ));
        }
        json_runs.push(format!(
            "{{\"run\": \"{name}\", \"median_ms\": {total:.5}, \"fraction_of_step_floor\": {:.5}, \"stages\": [{}]}}",
            total / floor_ms,
            json_stages.join(", ")
        ));
    }
    let commit = env!("CLIP_PGS_COMMIT");
    let device_name: String =
        rt.name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let out =
        args.out.clone().unwrap_or_else(|| PathBuf::from(format!("benches/results/pgs-{device_name}-{commit}.json")));
    let json = format!(
        "{{\n  \"device\": \"{}\",\n  \"commit\": \"{commit}\",\n  \"command\": \"{}\",\n  \"batch\": {}, \"size\": {}, \"patch\": {}, \"dtype\": \"{}\", \"repeats\": {},\n  \"copy_gb_per_s\": {copy_gbs:.1},\n  \"vit_b16_step_floor_ms\": {floor_ms:.4},\n  \"runs\": [\n    {}\n  ]\n}}\n",
        rt.name,
        std::env::args().collect::<Vec<_>>().join(" "),
        shape.n,
        args.size,
        args.patch,
        if elem == 2 { "bf16" } else { "f32" },
        args.repeats,
        json_runs.join(",\n    ")
    );
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, json)?;
    outln!("wrote {}", out.display());
    Ok(())
}

/// The runs of the pipeline a benchmark measures: (name, masking, epoch; epoch > 0 uses tokens).
fn pgs_runs() -> [(&'static str, Masking, usize); 5] {
    let pgs = |mode, ratio| Masking::Pgs(PgsConfig { mode, ratio, use_ed: true, use_otn: true });
    [
        ("flip_0.5", Masking::Flip { ratio: 0.5 }, 0),
        ("paper_0.5_epoch0", pgs(PgsMode::Paper, MaskRatio::Fixed(0.5)), 0),
        ("paper_0.5_epoch16_tokens", pgs(PgsMode::Paper, MaskRatio::Fixed(0.5)), 16),
        ("paper_dynamic_epoch0", pgs(PgsMode::Paper, MaskRatio::Dynamic { min: 0.3, max: 0.5 }), 0),
        ("reference_0.5_epoch0", pgs(PgsMode::Reference, MaskRatio::Fixed(0.5)), 0),
    ]
}

/// `bench pgs --device emu`: every launch of every run on the emulator with its traffic
/// counters, beside the kernel's analytic minimum (the `*min_bytes` functions of its file).
fn traffic<T: ImageElement>(args: &PgsBench, convert: impl Fn(f32) -> T) -> Result<(), Box<dyn Error>> {
    use clip_pgs_host::emu::EmuRuntime;
    use clip_pgs_host::ops::pgs::gather::{GatherShape, KeptIndices, gather};
    use clip_pgs_host::ops::pgs::gpu::mask_gpu;
    use clip_pgs_kernels::hw::emu::{Options, Space};
    use clip_pgs_kernels::{edge_map, gather, patch_stats, select, sinkhorn};

    let emu = EmuRuntime::new(Options { counters: true, ..Options::default() });
    let device = Device::Emu(emu.clone());
    outln!("device: {device}");
    let shape = ImageBatchShape { n: args.batch, height: args.size, width: args.size };
    let (n, l, p, dim) = (shape.n, (args.size / args.patch).pow(2), args.patch, args.dim);
    let elem = std::mem::size_of::<T>();
    let rng = Philox::new(1, 2, 3);
    let images: Vec<T> = (0..shape.len() as u32).map(|i| convert(rng.uniform(i) * 4.0 - 2.0)).collect();
    let tokens: Vec<T> = (0..(n * l * dim) as u32).map(|i| convert(rng.uniform(i) - 0.5)).collect();
    let (images, patch_tokens) = (device.upload(&images)?, device.upload(&tokens)?);
    let cls = device.upload(&tokens[..dim])?;
    emu.keep_reports();
    let (mut rows, mut conflicts) = (Vec::new(), Vec::new());
    for (run, masking, epoch) in pgs_runs() {
        let at = MaskStep { seed: 0, step: 0, first: 0, epoch, epochs: 32 };
        let request = MaskRequest { shape, patch: p, masking, at };
        let masks = mask_gpu(&device, &request, images.view(), (epoch > 0).then_some((patch_tokens.view(), dim)))?;
        let kept: Vec<usize> = masks.to_masks()?.images.iter().map(|m| m.kept.len()).collect();
        let packed_rows = kept.iter().max().copied().unwrap_or(0) + 1;
        let mut packed = device.alloc_zeros::<T>(n * packed_rows * dim, "packed tokens")?;
        let mut lengths = device.alloc_zeros::<u32>(n, "lengths")?;
        let idx = KeptIndices { kept: masks.kept.view(), kept_len: masks.kept_len.view() };
        let shape = GatherShape { images: n, patches: l, dim, rows: packed_rows };
        gather(&device, packed.view_mut(), lengths.view_mut(), patch_tokens.view(), cls.view(), idx, shape)?;
        let n_c = select::paper_candidate_count(l);
        let dynamic = matches!(masking, Masking::Pgs(PgsConfig { ratio: MaskRatio::Dynamic { .. }, .. }));
        let reference = matches!(masking, Masking::Pgs(PgsConfig { mode: PgsMode::Reference, .. }));
        let token_bytes = if epoch > 0 { dim * elem } else { 0 };
        for report in emu.take_reports() {
            let min = match report.kernel {
                k if k.starts_with("pgs_edge_map") => Some(edge_map::min_bytes(n, args.size, args.size, p, elem)),
                k if k.starts_with("pgs_standardize_patches") => {
                    Some(patch_stats::standardize_min_bytes(n, args.size, args.size, p, elem))
                }
                k if k.starts_with("pgs_token_norms") => Some(patch_stats::token_norms_min_bytes(n * l, dim, elem)),
                k if k.starts_with("pgs_similarity") && !reference => {
                    Some(patch_stats::similarity_min_bytes(n, n_c, l, 3 * p * p, token_bytes))
                }
                "pgs_sinkhorn_log" => Some(sinkhorn::log_min_bytes(n, n_c, l)),
                "pgs_candidates" if !reference => Some(select::candidates_min_bytes(n, l, n_c)),
                "pgs_select_paper" => Some(select::select_paper_min_bytes(n, l, n_c, dynamic)),
                k if k.starts_with("pgs_gather") => {
                    Some(gather::min_bytes(kept.iter().sum(), n, packed_rows, dim, elem))
                }
                _ => None,
            };
            let t = &report.traffic;
            // Hot global sites: at least 5% of the kernel's global requests.
            let hot = t
                .sites
                .iter()
                .filter(|s| s.space == Space::Global && s.requests * 20 >= t.global_requests().max(1))
                .min_by(|a, b| a.sector_efficiency().total_cmp(&b.sector_efficiency()));
            let distinct = t.distinct_read + t.distinct_written;
            for site in t.sites.iter().filter(|s| s.space == Space::Shared && s.bank_conflicts() > 0) {
                let line = format!(
                    "- {} {}: {} extra wavefronts over {} requests",
                    report.kernel,
                    site.site,
                    site.bank_conflicts(),
                    site.requests
                );
                if !conflicts.contains(&line) {
                    conflicts.push(line);
                }
            }
            rows.push(format!(
                "| {run} | {} | {} | {} | {} | {} | {} | {:.0}% | {} | {} | {} | {} |",
                report.kernel,
                t.global_requests(),
                t.sector_bytes(),
                distinct,
                min.map_or("—".into(), |m| m.to_string()),
                min.map_or("—".into(), |m| format!("{:.2}×", t.sector_bytes() as f64 / m as f64)),
                100.0 * t.sector_efficiency(),
                hot.map_or("—".into(), |s| format!(
                    "{:.0}% ({}:{})",
                    100.0 * s.sector_efficiency(),
                    s.site.file().rsplit('/').next().unwrap_or(""),
                    s.site.line()
                )),
                t.shared_requests(),
                t.bank_conflicts(),
                t.barriers,
            ));
        }
    }
    let commit = env!("CLIP_PGS_COMMIT");
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let table = format!(
        "# PGS kernel traffic on the emulator\n\n\
         Device: emu (the kernels' Rust source on the SIMT emulator; counters, not timings). Commit {commit}.\n\
         Command: `{command}`\n\
         Batch {n}, {size}×{size} images, patch {p}, {dtype}, tokens of width {dim}.\n\n\
         Sector bytes: 32 × the 32-byte sectors all warp requests touched (what the kernel moves through L2). \
         Distinct: bytes of global memory read plus written at least once (a lower bound on DRAM traffic). \
         Minimum: the kernel's analytic minimum (its file's `min_bytes`). Efficiency: bytes used / sector bytes; \
         worst hot site: the least efficient global access with ≥ 5% of the kernel's requests. \
         Bank conflicts: shared-memory wavefronts beyond one per request phase.\n\n\
         | run | kernel | global requests | sector bytes | distinct bytes | minimum | sector bytes / min | efficiency | worst hot site | shared requests | bank conflicts | barriers |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n{}\n\n         Shared-memory sites with bank conflicts:\n{}\n",
        rows.join("\n"),
        conflicts.join("\n"),
        size = args.size,
        dtype = if elem == 2 { "bf16" } else { "f32" },
    );
    outln!("{table}");
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("benches/results/pgs-traffic-emu.md"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, table)?;
    outln!("wrote {}", out.display());
    Ok(())
}
