//! `clip-pgs bench attention`: the flash attention kernels (`kernels/src/flash_attention.rs`) on
//! the model's shapes — ViT-B/16's 12 heads of 64 at S = 197, at PGS's fixed 50 % (S = 99) and at
//! PGS's dynamic ragged lengths, the text tower's 8 heads of 64 at S = 77 causal — forward and
//! backward, beside the unfused path (cuBLASLt + softmax kernels) on the same inputs. TFLOP/s
//! count only the unmasked work: 4·D per visible (query, key) pair and head forward, 2.5 times
//! that backward (FlashAttention's convention). One JSON line per case; `tools/bench_attention_sdpa.py`
//! prints PyTorch's `scaled_dot_product_attention` (flash and cuDNN backends, the same masks) in
//! the same format, and `tools/bench_attention.sh` runs both on a GPU.
//!
//! `--device cuda`: CUDA events around each call, the L2 flushed before each repeat, medians.
//! `--device emu`: one run of each case, its global bytes on the emulator's counters (use a small
//! `--batch`: the emulator is slow).

use std::error::Error;

use clap::Args;

use super::median;
use clip_pgs_host::emu::EmuRuntime;
use clip_pgs_host::ops::attention::{
    AttentionShape, FlashBackwardPath, Sequences, attention_backward, attention_forward, flash_attention_backward,
    flash_attention_forward, flash_backward_scratch_len,
};
use clip_pgs_host::{Buffer, Device, DevicePreference, bf16};
use clip_pgs_kernels::hw::emu::Options;
use clip_pgs_kernels::philox::Philox;
use clip_pgs_model::outln;
use cudarc::driver::sys::CUevent_flags;

#[derive(Args)]
pub struct AttentionBench {
    /// Images (and captions) per call.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Timed repeats per case (the median is reported).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// cuda (timings) or emu (the emulator's traffic counters, one run).
    #[arg(long, default_value = "cuda")]
    device: DevicePreference,
}

/// One benchmark case: its name, shape and per-sequence lengths.
struct Case {
    name: &'static str,
    shape: AttentionShape,
    lengths: Option<Vec<u32>>,
}

/// The model's attention shapes at `batch` sequences.
fn cases(batch: usize) -> Vec<Case> {
    let vit = |seq, causal| AttentionShape { batch, seq, heads: 12, head_dim: 64, causal };
    // PGS dynamic: each image keeps its own share of the 196 patches, 30 % … 70 % (plus CLS).
    let rng = Philox::new(13, 0, 0);
    let dynamic = (0..batch as u32).map(|b| 1 + (196.0 * (0.3 + 0.4 * rng.uniform(b))) as u32).collect::<Vec<_>>();
    let longest = *dynamic.iter().max().unwrap_or(&1) as usize;
    vec![
        Case { name: "vit-b-16 S=197", shape: vit(197, false), lengths: None },
        Case { name: "vit-b-16 PGS 50% S=99", shape: vit(99, false), lengths: None },
        Case { name: "vit-b-16 PGS dynamic", shape: vit(longest, false), lengths: Some(dynamic) },
        Case {
            name: "text S=77 causal",
            shape: AttentionShape { batch, seq: 77, heads: 8, head_dim: 64, causal: true },
            lengths: None,
        },
    ]
}

/// Forward FLOPs of the unmasked work: 4·D per visible (query, key) pair per head.
fn forward_flops(c: &Case) -> f64 {
    let s = c.shape;
    let pairs: usize = (0..s.batch)
        .map(|b| {
            let len = c.lengths.as_ref().map_or(s.seq, |l| l[b] as usize);
            if s.causal { len * (len + 1) / 2 } else { len * len }
        })
        .sum();
    4.0 * (s.head_dim * s.heads * pairs) as f64
}

/// The buffers of one case on a device.
struct Inputs {
    qkv: Buffer<bf16>,
    dout: Buffer<bf16>,
    out: Buffer<bf16>,
    lse: Buffer<f32>,
    dqkv: Buffer<bf16>,
    scratch: Buffer<f32>,
    probs: Buffer<bf16>,
    d_scores: Buffer<bf16>,
    lengths: Option<Buffer<u32>>,
}

impl Inputs {
    fn new(device: &Device, c: &Case) -> Result<Inputs, Box<dyn Error>> {
        let s = c.shape;
        let n = s.batch * s.seq * s.heads * s.head_dim;
        let rng = Philox::new(7, 1, 0);
        let values = |len: usize, seed: u32| -> Vec<bf16> {
            (0..len as u32).map(|i| bf16::from_f32(rng.uniform(i.wrapping_add(seed << 28)) * 2.0 - 1.0)).collect()
        };
        Ok(Inputs {
            qkv: device.upload(&values(3 * n, 0))?,
            dout: device.upload(&values(n, 1))?,
            out: device.alloc_zeros(n, "out")?,
            lse: device.alloc_zeros(s.batch * s.heads * s.seq, "lse")?,
            dqkv: device.alloc_zeros(3 * n, "dqkv")?,
            scratch: device.alloc_zeros(flash_backward_scratch_len(device, s, FlashBackwardPath::Auto), "scratch")?,
            probs: device.alloc_zeros(s.probs_len(), "probs")?,
            d_scores: device.alloc_zeros(s.probs_len(), "scores' gradients")?,
            lengths: c.lengths.as_ref().map(|l| device.upload(l)).transpose()?,
        })
    }

    fn run(&mut self, device: &Device, s: AttentionShape, flash: bool, backward: bool) -> clip_pgs_host::Result<()> {
        let lengths = self.lengths.as_ref().map(|l| l.view());
        match (flash, backward) {
            (true, false) => {
                let seqs = Sequences::Padded(lengths);
                flash_attention_forward(device, self.out.view_mut(), self.lse.view_mut(), self.qkv.view(), seqs, s)
            }
            (true, true) => flash_attention_backward(
                device,
                self.dqkv.view_mut(),
                self.scratch.view_mut(),
                self.dout.view(),
                self.qkv.view(),
                self.out.view(),
                self.lse.view(),
                Sequences::Padded(lengths),
                s,
                FlashBackwardPath::Auto,
            ),
            (false, false) => {
                attention_forward(device, self.out.view_mut(), self.probs.view_mut(), self.qkv.view(), lengths, s)
            }
            (false, true) => attention_backward(
                device,
                self.dqkv.view_mut(),
                self.d_scores.view_mut(),
                self.dout.view(),
                self.qkv.view(),
                self.probs.view(),
                s,
            ),
        }
    }
}

pub fn run(args: &AttentionBench) -> Result<(), Box<dyn Error>> {
    if args.batch == 0 || args.repeats == 0 {
        return Err("bench attention needs at least one sequence and one repeat".into());
    }
    let device = match args.device {
        // The counters on (one run per case).
        DevicePreference::Emu => Device::Emu(EmuRuntime::new(Options { counters: true, ..Options::default() })),
        other => Device::select(other)?.device,
    };
    outln!("device: {device}");
    let cases = cases(args.batch);
    if let Some(lengths) = cases.iter().find_map(|c| c.lengths.as_ref()) {
        let list: Vec<String> = lengths.iter().map(|l| l.to_string()).collect();
        outln!("PGS dynamic lengths: {}", list.join(","));
    }
    // The emulator counts kernels only (its cuBLASLt interpreter is not a kernel): flash alone.
    let paths: &[(&str, bool)] =
        if matches!(device, Device::Emu(_)) { &[("flash", true)] } else { &[("flash", true), ("unfused", false)] };
    for c in cases {
        let mut inputs = Inputs::new(&device, &c)?;
        let flops = forward_flops(&c);
        for &(path, flash) in paths {
            let mut line = format!("{{\"case\": \"{}\", \"path\": \"{path}\", \"batch\": {}", c.name, args.batch);
            for (pass, backward, work) in [("forward", false, flops), ("backward", true, 2.5 * flops)] {
                match &device {
                    Device::Cuda(rt) => {
                        let event = || rt.context.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
                        let mut flush = rt.stream.alloc_zeros::<u8>(256 << 20)?;
                        // The forward first: the backward reads its out and lse (flash) or probs.
                        inputs.run(&device, c.shape, flash, false)?;
                        let mut times = Vec::with_capacity(args.repeats);
                        for _ in 0..args.repeats {
                            rt.stream.memset_zeros(&mut flush)?;
                            let (start, end) = (event()?, event()?);
                            start.record(&rt.stream)?;
                            inputs.run(&device, c.shape, flash, backward)?;
                            end.record(&rt.stream)?;
                            times.push(start.elapsed_ms(&end)? as f64 * 1e-3);
                        }
                        let t = median(times);
                        line += &format!(", \"{pass}_ms\": {:.4}, \"{pass}_tflops\": {:.1}", t * 1e3, work / t / 1e12);
                    }
                    Device::Emu(emu) => {
                        inputs.run(&device, c.shape, flash, false)?;
                        emu.keep_reports();
                        inputs.run(&device, c.shape, flash, backward)?;
                        let bytes: u64 = emu.take_reports().iter().map(|r| r.traffic.sector_bytes()).sum();
                        line += &format!(", \"{pass}_kernel_bytes\": {bytes}");
                    }
                    Device::Cpu => return Err("bench attention runs on --device cuda or emu".into()),
                }
            }
            outln!("{line}}}");
        }
    }
    Ok(())
}
