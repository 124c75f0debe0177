//! Multi-head self-attention core: from the fused projection qkv [B, S, 3D] (q, k, v in that
//! order, head h in columns h·hd..(h+1)·hd of each, as PyTorch's `in_proj`) to the heads' outputs
//! [B, S, D] (before `out_proj`). Keys are masked causally (text tower) and/or beyond each
//! sequence's length (the padding of PGS-masked images); probabilities [B, H, S, S] are kept for
//! the backward pass. On the CPU every head is a pair of strided GEMMs over qkv, no copies. On a
//! GPU device qkv, the probabilities, the outputs and every gradient may be bf16
//! (`dtype::Activation`): the GEMMs accumulate in f32 and round what they store, the softmax
//! kernels compute in f32.

use rayon::prelude::*;

use cudarc::driver::LaunchConfig;

use clip_pgs_kernels::attention as kernel;
use clip_pgs_kernels::element::Bf16;
use clip_pgs_kernels::flash_attention as flash;
use clip_pgs_kernels::hw::{Global, GlobalMut, Kernel};
use half::bf16;

use super::check::OpCheck;
use super::dtype::{Activation, Float};
use super::matmul::{Batch, Mat, MatRef, cpu_matmul, gpu_matmul};
use crate::cublaslt::{DataType, Epilogue as Lt};
use crate::device::Device;
use crate::error::Result;
use crate::launch::grid_stride_config;
use crate::view::{View, ViewMut};

#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

impl AttentionShape {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Elements of the probabilities [B, H, S, S] (and of backward's scratch).
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }
}

/// Head h of part `part` (0 q, 1 k, 2 v) of one sequence's qkv, as a strided [S, hd] matrix.
fn head(qkv: &[f32], s: AttentionShape, part: usize, h: usize) -> MatRef<'_> {
    let d = s.width();
    let data = &qkv[part * d + h * s.head_dim..(s.seq - 1) * 3 * d + (part + 1) * d];
    Mat::new(data, s.seq, s.head_dim).row_stride(3 * d)
}

fn check(op: &OpCheck, s: AttentionShape, qkv: usize, out: usize, probs: usize) -> Result<()> {
    check_io(op, s, s.batch * s.seq, qkv, out)?;
    let AttentionShape { batch: b, seq, heads, .. } = s;
    op.size("probs", probs, s.probs_len(), || format!("[B {b}, H {heads}, S {seq}, S {seq}]"))
}

/// qkv [rows, 3D] and out (or dout) [rows, D]; rows = B·S unless packed.
fn check_io(op: &OpCheck, s: AttentionShape, rows: usize, qkv: usize, out: usize) -> Result<()> {
    let AttentionShape { batch: b, seq, head_dim, .. } = s;
    if seq == 0 || head_dim == 0 {
        return Err(op.invalid(format!("empty sequences or heads: S = {seq}, head_dim = {head_dim}")));
    }
    let d = s.width();
    op.size("qkv", qkv, rows * 3 * d, || format!("[rows {rows} (B {b}, S {seq}), 3·D {}]", 3 * d))?;
    op.size("out", out, rows * d, || format!("[rows {rows}, D {d}]"))
}

/// out [B, S, D] and probs [B, H, S, S]. `lengths[b]` valid keys of sequence b (None: all).
pub fn attention_forward<T: Activation>(
    device: &Device,
    out: ViewMut<T>,
    probs: ViewMut<T>,
    qkv: View<T>,
    lengths: Option<View<u32>>,
    s: AttentionShape,
) -> Result<()> {
    let op = OpCheck::new("attention_forward", device);
    check(&op, s, qkv.len(), out.len(), probs.len())?;
    if let Some(l) = &lengths {
        op.size("lengths", l.len(), s.batch, || format!("[B {}]", s.batch))?;
    }
    if !matches!(device, Device::Cpu) {
        let lengths = lengths.map(|l| op.gpu("lengths", l)).transpose()?;
        return gpu_forward(
            device,
            op.gpu_mut("out", out)?,
            op.gpu_mut("probs", probs)?,
            op.gpu("qkv", qkv)?,
            lengths,
            s,
        );
    }
    let lengths = match lengths {
        Some(l) => {
            let l = op.cpu("lengths", l)?;
            if let Some((b, &len)) = l.iter().enumerate().find(|(_, len)| **len == 0 || **len as usize > s.seq) {
                return Err(op.invalid(format!("sequence {b} has length {len}, outside 1..={}", s.seq)));
            }
            Some(l)
        }
        None => None,
    };
    let (out, probs, qkv) = (op.cpu_f32_mut("out", out)?, op.cpu_f32_mut("probs", probs)?, op.cpu_f32("qkv", qkv)?);
    let (d, seq, hd) = (s.width(), s.seq, s.head_dim);
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(seq * d).zip(probs.par_chunks_mut(s.heads * seq * seq)).enumerate().for_each(
        |(b, (out, probs))| {
            let qkv = &qkv[b * seq * 3 * d..(b + 1) * seq * 3 * d];
            let valid = lengths.map_or(seq, |l| l[b] as usize);
            for h in 0..s.heads {
                let p = &mut probs[h * seq * seq..(h + 1) * seq * seq];
                cpu_matmul(Mat::new(&mut p[..], seq, seq), head(qkv, s, 0, h), head(qkv, s, 1, h).t(), false);
                for i in 0..seq {
                    let row = &mut p[i * seq..(i + 1) * seq];
                    let visible = |j: usize| j < valid && (!s.causal || j <= i);
                    let max =
                        (0..seq).filter(|&j| visible(j)).map(|j| row[j] * scale).fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0.0f32;
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = if visible(j) { (*v * scale - max).exp() } else { 0.0 };
                        total += *v;
                    }
                    row.iter_mut().for_each(|v| *v /= total);
                }
                let o = Mat::new(&mut out[h * hd..], seq, hd).row_stride(d);
                cpu_matmul(o, Mat::new(&p[..], seq, seq), head(qkv, s, 2, h), false);
            }
        },
    );
    Ok(())
}

/// dqkv [B, S, 3D] (overwritten) from dout [B, S, D]; `scratch` [B, H, S, S] holds the scores'
/// gradients.
pub fn attention_backward<T: Activation>(
    device: &Device,
    dqkv: ViewMut<T>,
    scratch: ViewMut<T>,
    dout: View<T>,
    qkv: View<T>,
    probs: View<T>,
    s: AttentionShape,
) -> Result<()> {
    let op = OpCheck::new("attention_backward", device);
    check(&op, s, qkv.len(), dout.len(), probs.len())?;
    op.size("dqkv", dqkv.len(), qkv.len(), || "qkv's size".into())?;
    op.size("scratch", scratch.len(), s.probs_len(), || "probs' size".into())?;
    if !matches!(device, Device::Cpu) {
        let (dqkv, scratch) = (op.gpu_mut("dqkv", dqkv)?, op.gpu_mut("scratch", scratch)?);
        let (dout, qkv, probs) = (op.gpu("dout", dout)?, op.gpu("qkv", qkv)?, op.gpu("probs", probs)?);
        return gpu_backward(device, dqkv, scratch, dout, qkv, probs, s);
    }
    let (dqkv, scratch) = (op.cpu_f32_mut("dqkv", dqkv)?, op.cpu_f32_mut("scratch", scratch)?);
    let (dout, qkv, probs) = (op.cpu_f32("dout", dout)?, op.cpu_f32("qkv", qkv)?, op.cpu_f32("probs", probs)?);
    let (d, seq, hd) = (s.width(), s.seq, s.head_dim);
    let scale = 1.0 / (hd as f32).sqrt();
    dqkv.par_chunks_mut(seq * 3 * d).zip(scratch.par_chunks_mut(s.heads * seq * seq)).enumerate().for_each(
        |(b, (dqkv, scratch))| {
            let qkv = &qkv[b * seq * 3 * d..(b + 1) * seq * 3 * d];
            let dout = &dout[b * seq * d..(b + 1) * seq * d];
            for h in 0..s.heads {
                let p = &probs[(b * s.heads + h) * seq * seq..][..seq * seq];
                let dp = &mut scratch[h * seq * seq..(h + 1) * seq * seq];
                let dout_h = Mat::new(&dout[h * hd..], seq, hd).row_stride(d);
                // The [S, hd] columns of part `part`, head h.
                fn part(dqkv: &mut [f32], s: AttentionShape, part: usize, h: usize) -> Mat<&mut [f32]> {
                    let (d, hd) = (s.width(), s.head_dim);
                    let start = part * d + h * hd;
                    Mat::new(&mut dqkv[start..(s.seq - 1) * 3 * d + start + hd], s.seq, hd).row_stride(3 * d)
                }
                cpu_matmul(part(dqkv, s, 2, h), Mat::new(p, seq, seq).t(), dout_h, false);
                cpu_matmul(Mat::new(&mut dp[..], seq, seq), dout_h, head(qkv, s, 2, h).t(), false);
                // Softmax backward, then the 1/sqrt(hd) of the scores.
                for i in 0..seq {
                    let (pr, dr) = (&p[i * seq..(i + 1) * seq], &mut dp[i * seq..(i + 1) * seq]);
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    dr.iter_mut().zip(pr).for_each(|(g, p)| *g = p * (*g - dot) * scale);
                }
                cpu_matmul(part(dqkv, s, 0, h), Mat::new(&dp[..], seq, seq), head(qkv, s, 1, h), false);
                cpu_matmul(part(dqkv, s, 1, h), Mat::new(&dp[..], seq, seq).t(), head(qkv, s, 0, h), false);
            }
        },
    );
    Ok(())
}

/// The strided batches of the GPU path: head h of every sequence at once, sequences one batch
/// stride apart (qkv S·3D, out S·D, probs H·S²).
struct HeadBatches {
    s: AttentionShape,
}

impl HeadBatches {
    /// Part `part` (0 q, 1 k, 2 v) of head h in qkv or dqkv, as a strided [S, hd] matrix.
    fn qkv_offset(&self, part: usize, h: usize) -> usize {
        part * self.s.width() + h * self.s.head_dim
    }

    fn qkv<D>(&self, data: D) -> Mat<D> {
        Mat::new(data, self.s.seq, self.s.head_dim).row_stride(3 * self.s.width())
    }

    fn out<D>(&self, data: D) -> Mat<D> {
        Mat::new(data, self.s.seq, self.s.head_dim).row_stride(self.s.width())
    }

    fn square<D>(&self, data: D) -> Mat<D> {
        Mat::new(data, self.s.seq, self.s.seq)
    }

    /// Batch strides of (c, a, b) from their kinds' sequence strides.
    fn batch(&self, c: usize, a: usize, b: usize) -> Batch {
        Batch { count: self.s.batch, a, b, c }
    }

    fn qkv_stride(&self) -> usize {
        self.s.seq * 3 * self.s.width()
    }

    fn out_stride(&self) -> usize {
        self.s.seq * self.s.width()
    }

    fn square_stride(&self) -> usize {
        self.s.heads * self.s.seq * self.s.seq
    }
}

/// The softmax kernels' launch: a warp per group of `kernel::rows_per_warp(seq)` rows.
fn softmax_config(rows: usize, seq: usize) -> LaunchConfig {
    let warps = (kernel::THREADS / 32) as usize;
    let groups = rows.div_ceil(kernel::rows_per_warp(seq));
    LaunchConfig {
        grid_dim: (groups.div_ceil(warps).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (kernel::THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn gpu_forward<T: Activation>(
    device: &Device,
    mut out: ViewMut<T>,
    mut probs: ViewMut<T>,
    qkv: View<T>,
    lengths: Option<View<u32>>,
    s: AttentionShape,
) -> Result<()> {
    let hb = HeadBatches { s };
    let (sq, qs, os) = (hb.square_stride(), hb.qkv_stride(), hb.out_stride());
    for h in 0..s.heads {
        let (q, k) = (hb.qkv(qkv.skip(hb.qkv_offset(0, h))), hb.qkv(qkv.skip(hb.qkv_offset(1, h))));
        let scores = hb.square(probs.skip(h * s.seq * s.seq));
        gpu_matmul(device, scores, q, k.t(), false, hb.batch(sq, qs, qs), Lt::Default)?;
    }
    let args = (probs.reborrow(), lengths, s.batch as u32, s.heads as u32, s.seq as u32, s.causal as u32, scale(s));
    // SAFETY: probs holds B·H·S² values and lengths B (checked by the caller).
    unsafe { device.launch(&T::ATTENTION_SOFTMAX, softmax_config(s.batch * s.heads * s.seq, s.seq), args)? };
    for h in 0..s.heads {
        let (p, v) = (hb.square(probs.as_view().skip(h * s.seq * s.seq)), hb.qkv(qkv.skip(hb.qkv_offset(2, h))));
        let o = hb.out(out.skip(h * s.head_dim));
        gpu_matmul(device, o, p, v, false, hb.batch(os, sq, qs), Lt::Default)?;
    }
    Ok(())
}

fn gpu_backward<T: Activation>(
    device: &Device,
    mut dqkv: ViewMut<T>,
    mut scratch: ViewMut<T>,
    dout: View<T>,
    qkv: View<T>,
    probs: View<T>,
    s: AttentionShape,
) -> Result<()> {
    let hb = HeadBatches { s };
    let (sq, qs, os, s2) = (hb.square_stride(), hb.qkv_stride(), hb.out_stride(), s.seq * s.seq);
    for h in 0..s.heads {
        let (p, d_o) = (hb.square(probs.skip(h * s2)), hb.out(dout.skip(h * s.head_dim)));
        let dv = hb.qkv(dqkv.skip(hb.qkv_offset(2, h)));
        gpu_matmul(device, dv, p.t(), d_o, false, hb.batch(qs, sq, os), Lt::Default)?;
        let (dp, v) = (hb.square(scratch.skip(h * s2)), hb.qkv(qkv.skip(hb.qkv_offset(2, h))));
        gpu_matmul(device, dp, d_o, v.t(), false, hb.batch(sq, os, qs), Lt::Default)?;
    }
    let rows = s.batch * s.heads * s.seq;
    let args = (scratch.reborrow(), probs, rows as u32, s.seq as u32, scale(s));
    // SAFETY: scratch and probs hold B·H·S² values.
    unsafe { device.launch(&T::ATTENTION_SOFTMAX_BACKWARD, softmax_config(rows, s.seq), args)? };
    for h in 0..s.heads {
        let ds = hb.square(scratch.as_view().skip(h * s2));
        let (q, k) = (hb.qkv(qkv.skip(hb.qkv_offset(0, h))), hb.qkv(qkv.skip(hb.qkv_offset(1, h))));
        let dq = hb.qkv(dqkv.skip(hb.qkv_offset(0, h)));
        gpu_matmul(device, dq, ds, k, false, hb.batch(qs, sq, qs), Lt::Default)?;
        let dk = hb.qkv(dqkv.skip(hb.qkv_offset(1, h)));
        gpu_matmul(device, dk, ds.t(), q, false, hb.batch(qs, sq, qs), Lt::Default)?;
    }
    Ok(())
}

fn scale(s: AttentionShape) -> f32 {
    1.0 / (s.head_dim as f32).sqrt()
}

/// The flash forward's parameter tuple (`kernels/src/flash_attention.rs`).
type FlashForward =
    Kernel<(GlobalMut<Bf16>, GlobalMut<f32>, Global<Bf16>, Global<u32>, Global<u32>, u32, u32, u32, f32)>;

/// The head dims the flash kernels cover, with their entry points on `grid` (resident: head dims
/// 32 and 64; at 128 its kernel would spill on sm_90).
fn flash_forward_kernel(head_dim: usize, grid: FlashGrid) -> Option<FlashForward> {
    match (head_dim, grid) {
        (32, FlashGrid::Resident) => Some(flash::flash_attention_forward_d32),
        (64, FlashGrid::Resident) => Some(flash::flash_attention_forward_d64),
        (32, FlashGrid::PerQueryTile) => Some(flash::flash_attention_forward_tiles_d32),
        (64, FlashGrid::PerQueryTile) => Some(flash::flash_attention_forward_tiles_d64),
        (128, FlashGrid::PerQueryTile) => Some(flash::flash_attention_forward_tiles_d128),
        _ => None,
    }
}

/// Whether the flash kernels cover this shape (head dims 32, 64 and 128); the unfused
/// [`attention_forward`]/[`attention_backward`] cover any.
pub fn flash_covers(s: AttentionShape) -> bool {
    flash_forward_kernel(s.head_dim, FlashGrid::PerQueryTile).is_some()
}

/// The flash backward's parameter tuple.
type FlashBackward = Kernel<(
    GlobalMut<Bf16>,
    GlobalMut<f32>,
    Global<Bf16>,
    Global<Bf16>,
    Global<f32>,
    Global<f32>,
    Global<u32>,
    Global<u32>,
    u32,
    u32,
    u32,
    f32,
)>;

/// The flash backward's entry points of a head dim: the fallback, and the resident kernel where
/// there is one (not at D = 64, whose registers would spill on sm_80:
/// `kernels/src/flash_attention.rs`).
fn flash_backward_kernels(head_dim: usize) -> Option<(FlashBackward, Option<FlashBackward>)> {
    match head_dim {
        32 => Some((flash::flash_attention_backward_d32, Some(flash::flash_attention_backward_resident_d32))),
        64 => Some((flash::flash_attention_backward_d64, Some(flash::flash_attention_backward_resident_d64))),
        128 => Some((flash::flash_attention_backward_d128, Some(flash::flash_attention_backward_resident_d128))),
        _ => None,
    }
}

/// f32 scratch of [`flash_attention_backward`] on `device` by `path`: δ [B, H, S], and for the
/// key-tile fallback its dQ accumulator [B, S, D] (packed sequences, at most B·S rows, use their
/// first rows of each). The resident path needs δ only (ViT-B/16 at batch 256: 2.4 of 157 MB).
pub fn flash_backward_scratch_len(device: &Device, s: AttentionShape, path: FlashBackwardPath) -> usize {
    let accumulator = if path.resident(device, s) { 0 } else { s.width() };
    s.batch * s.seq * (s.heads + accumulator)
}

/// Which flash backward [`flash_attention_backward`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashBackwardPath {
    /// Resident (a block per sequence and head, Q and dO read once, dQ in shared memory) where
    /// the head dim has it and its shared memory fits the device's per-block limit, else the
    /// key-tile fallback.
    Auto,
    /// The fallback: a block per key tile, dQ added to an f32 accumulator by atomics.
    KeyTiles,
}

impl FlashBackwardPath {
    /// Whether the resident kernel runs for shape `s` on `device`: there is one for the head dim
    /// (32, 64 and 128), and its ⌈S/64⌉ query tiles' Q, dO, lse, δ and f32 dQ fit the device's
    /// shared memory (on an H100: S ≤ 768 at D = 32, 384 at D = 64, 128 at D = 128).
    pub fn resident(self, device: &Device, s: AttentionShape) -> bool {
        let bytes = flash::resident_backward_shared_bytes(s.head_dim, s.seq);
        let exists = flash_backward_kernels(s.head_dim).is_some_and(|(_, resident)| resident.is_some());
        self == FlashBackwardPath::Auto && exists && device.max_shared_bytes().is_some_and(|max| bytes <= max)
    }
}

/// How the sequences of a flash launch lie in qkv, out and lse.
#[derive(Clone, Copy)]
pub enum Sequences<'a> {
    /// B sequences of S rows, `lengths[b]` of sequence b's valid (None: all S), the rest padding
    /// (out's and lse's padding rows get 0); lse [B, H, S].
    Padded(Option<View<'a, u32>>),
    /// Back to back (FlashAttention's varlen, `cu_seqlens`): sequence b is rows offsets[b] …
    /// offsets[b + 1] − 1, B + 1 ascending offsets from 0 to the buffers' rows, each length at
    /// most S (S sizes the grid); no padding, so no work on it. lse [H, its rows] per sequence
    /// from offsets[b]·H.
    Packed(View<'a, u32>),
}

impl<'a> Sequences<'a> {
    /// Rows of qkv [rows, 3D], out [rows, D] and lse (·H): B·S padded; packed, what qkv holds.
    fn rows(&self, s: AttentionShape, qkv: usize) -> usize {
        match self {
            Sequences::Padded(_) => s.batch * s.seq,
            Sequences::Packed(_) => qkv / (3 * s.width()),
        }
    }

    /// Checked on `op`'s device: the kernels' `lengths` and `offsets` (one of them or neither).
    fn kernel_args(self, op: &OpCheck, s: AttentionShape) -> Result<[Option<View<'a, u32>>; 2]> {
        match self {
            Sequences::Padded(lengths) => {
                if let Some(l) = &lengths {
                    op.size("lengths", l.len(), s.batch, || format!("[B {}]", s.batch))?;
                }
                Ok([lengths.map(|l| op.gpu("lengths", l)).transpose()?, None])
            }
            Sequences::Packed(offsets) => {
                op.size("offsets", offsets.len(), s.batch + 1, || format!("[B + 1 = {}]", s.batch + 1))?;
                Ok([None, Some(op.gpu("offsets", offsets)?)])
            }
        }
    }
}

/// The address of a view's first element (device address on CUDA, host address on emu).
fn address<T>(v: &View<T>) -> usize {
    match v {
        View::Cpu(x) | View::Emu(x) => x.as_ptr() as usize,
        View::Cuda(r) => r.address as usize,
    }
}

/// How the flash forward's blocks split the work (`kernels/src/flash_attention.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashGrid {
    /// A block per (head, sequence), the sequence's K and V resident in shared memory: each read
    /// once. Shared memory `flash::shared_bytes(D, ⌈S/64⌉)`; head dims 32 and 64.
    Resident,
    /// A block per (64-query tile, head, sequence): K and V read once per query tile, in 3·128·D
    /// bytes of shared memory whatever S.
    PerQueryTile,
}

impl FlashGrid {
    /// Resident where it covers the head dim and its shared memory fits the device's per-block
    /// limit.
    pub fn for_shape(device: &Device, s: AttentionShape) -> FlashGrid {
        let bytes = flash::shared_bytes(s.head_dim, s.seq.div_ceil(flash::TILE)) as usize;
        let fits = device.max_shared_bytes().is_some_and(|limit| bytes <= limit);
        match fits && flash_forward_kernel(s.head_dim, FlashGrid::Resident).is_some() {
            true => FlashGrid::Resident,
            false => FlashGrid::PerQueryTile,
        }
    }
}

/// Flash attention on a GPU device (`kernels/src/flash_attention.rs`): out [B, S, D] and the
/// log-sum-exp of the scaled scores lse [B, H, S] (f32, for the backward pass) from bf16 qkv
/// [B, S, 3D], without the [B, H, S, S] probabilities; the same masks as [`attention_forward`]
/// (`lengths[b]` valid tokens, causal), or packed sequences ([`Sequences`]). Rows of a sequence
/// past its length get 0 in out and lse (the unfused path computes them: they attend to the
/// valid keys, and nothing reads them). qkv and out must start 16-byte aligned; head dims 32,
/// 64, 128 ([`flash_covers`]). The grid is [`FlashGrid::for_shape`]'s.
pub fn flash_attention_forward(
    device: &Device,
    out: ViewMut<bf16>,
    lse: ViewMut<f32>,
    qkv: View<bf16>,
    sequences: Sequences,
    s: AttentionShape,
) -> Result<()> {
    flash_attention_forward_on(device, out, lse, qkv, sequences, s, FlashGrid::for_shape(device, s))
}

/// [`flash_attention_forward`] on the grid `grid` (resident beyond the device's shared memory, or
/// at a head dim it does not cover, is refused).
pub fn flash_attention_forward_on(
    device: &Device,
    out: ViewMut<bf16>,
    lse: ViewMut<f32>,
    qkv: View<bf16>,
    sequences: Sequences,
    s: AttentionShape,
    grid: FlashGrid,
) -> Result<()> {
    let op = OpCheck::new("flash_attention_forward", device);
    let rows = sequences.rows(s, qkv.len());
    check_io(&op, s, rows, qkv.len(), out.len())?;
    op.size("lse", lse.len(), rows * s.heads, || format!("[rows {rows}, H {}]", s.heads))?;
    let kernel = flash_forward_kernel(s.head_dim, grid).ok_or_else(|| match grid {
        FlashGrid::PerQueryTile => op.invalid(format!(
            "head dim {}: the flash kernels cover 32, 64 and 128 (attention_forward any)",
            s.head_dim
        )),
        FlashGrid::Resident => op.invalid(format!("head dim {}: the resident flash grid covers 32 and 64", s.head_dim)),
    })?;
    let (out, lse, qkv) = (op.gpu_mut("out", out)?, op.gpu_mut("lse", lse)?, op.gpu("qkv", qkv)?);
    let [lengths, offsets] = sequences.kernel_args(&op, s)?;
    if address(&qkv) % 16 != 0 || address(&out.as_view()) % 16 != 0 {
        return Err(op.invalid("qkv and out must start 16-byte aligned (cp.async and vector stores)"));
    }
    let tiles = s.seq.div_ceil(flash::TILE);
    let (query_blocks, key_tiles) = match grid {
        FlashGrid::Resident => (1, tiles),
        FlashGrid::PerQueryTile => (tiles, 1),
    };
    let cfg = LaunchConfig {
        grid_dim: (query_blocks as u32, s.heads as u32, s.batch as u32),
        block_dim: (flash::THREADS, 1, 1),
        shared_mem_bytes: flash::shared_bytes(s.head_dim, key_tiles),
    };
    let args = (out, lse, qkv, lengths, offsets, s.seq as u32, s.heads as u32, s.causal as u32, scale(s));
    // SAFETY: sizes checked above; grid, block and shared memory as `grid`'s kernel requires (a
    // launch beyond the device's limits is refused before it runs).
    unsafe { device.launch(&kernel, cfg, args) }
}

/// The backward of [`flash_attention_forward`] on a GPU device: dqkv [B, S, 3D] (bf16,
/// overwritten) from dout [B, S, D], qkv, the forward's out and lse, recomputing the
/// probabilities tile by tile; `scratch` holds [`flash_backward_scratch_len`] f32. A pre-pass
/// computes δ = rowsum(dO∘O); then, where shared memory allows ([`FlashBackwardPath`]), the
/// resident kernel writes all of dqkv; else the pre-pass also zeroes the dQ accumulator, the
/// key-tile kernel writes dK and dV and adds dQ by f32 atomics, and a last launch rounds dQ into
/// dqkv. Rows of dout past a sequence's length must be 0 (as the model's are: nothing reads
/// those rows of out), for the unfused path's gradient to be the same.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward(
    device: &Device,
    mut dqkv: ViewMut<bf16>,
    scratch: ViewMut<f32>,
    dout: View<bf16>,
    qkv: View<bf16>,
    out: View<bf16>,
    lse: View<f32>,
    sequences: Sequences,
    s: AttentionShape,
    path: FlashBackwardPath,
) -> Result<()> {
    let op = OpCheck::new("flash_attention_backward", device);
    let rows = sequences.rows(s, qkv.len());
    check_io(&op, s, rows, qkv.len(), dout.len())?;
    op.size("out", out.len(), dout.len(), || "dout's size".into())?;
    op.size("dqkv", dqkv.len(), qkv.len(), || "qkv's size".into())?;
    op.size("lse", lse.len(), rows * s.heads, || format!("[rows {rows}, H {}]", s.heads))?;
    let scratch_len = flash_backward_scratch_len(device, s, path);
    op.size("scratch", scratch.len(), scratch_len, || "flash_backward_scratch_len".into())?;
    let (tiles, resident_kernel) = flash_backward_kernels(s.head_dim).ok_or_else(|| {
        op.invalid(format!("head dim {}: the flash kernels cover 32, 64 and 128 (attention_backward any)", s.head_dim))
    })?;
    let (dqkv_view, dout, qkv, out) =
        (op.gpu_mut("dqkv", dqkv.reborrow())?, op.gpu("dout", dout)?, op.gpu("qkv", qkv)?, op.gpu("out", out)?);
    if [address(&qkv), address(&dout), address(&dqkv_view.as_view())].iter().any(|a| a % 16 != 0) {
        return Err(op.invalid("qkv, dqkv and dout must start 16-byte aligned (cp.async and vector stores)"));
    }
    let (lse, [lengths, offsets]) = (op.gpu("lse", lse)?, sequences.kernel_args(&op, s)?);
    let (mut delta, mut dq) = op.gpu_mut("scratch", scratch)?.split_at(s.batch * s.seq * s.heads);
    let resident = resident_kernel.filter(|_| path.resident(device, s));
    let warps = (flash::THREADS / 32) as usize;
    let (b, seq, h, d) = (s.batch as u32, s.seq as u32, s.heads as u32, s.head_dim as u32);
    // One row of blocks per sequence, a warp per (head, DOT_ROWS rows).
    let dot = LaunchConfig {
        grid_dim: ((s.seq.div_ceil(flash::DOT_ROWS) * s.heads).div_ceil(warps).clamp(1, 1 << 16) as u32, b, 1),
        block_dim: (flash::THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let accumulator = resident.is_none().then(|| dq.reborrow());
    let args = (delta.reborrow(), accumulator, out, dout, lengths, offsets, seq, h, d);
    // SAFETY: sizes checked above.
    unsafe { device.launch(&flash::flash_attention_backward_dot, dot, args)? };
    let delta = delta.as_view();
    if let Some(resident) = resident {
        let cfg = LaunchConfig {
            grid_dim: (1, h, b),
            block_dim: (flash::THREADS, 1, 1),
            shared_mem_bytes: flash::resident_backward_shared_bytes(s.head_dim, s.seq) as u32,
        };
        let args = (
            dqkv_view,
            None::<ViewMut<f32>>,
            qkv,
            dout,
            lse,
            delta,
            lengths,
            offsets,
            seq,
            h,
            s.causal as u32,
            scale(s),
        );
        // SAFETY: sizes and alignment checked above; grid, block and shared memory as the kernel
        // requires (the shared memory within the device's limit: `resident`).
        return unsafe { device.launch(&resident, cfg, args) };
    }
    let cfg = LaunchConfig {
        grid_dim: (s.seq.div_ceil(flash::TILE) as u32, h, b),
        block_dim: (flash::THREADS, 1, 1),
        shared_mem_bytes: flash::backward_shared_bytes(s.head_dim),
    };
    let args = (dqkv_view, dq.reborrow(), qkv, dout, lse, delta, lengths, offsets, seq, h, s.causal as u32, scale(s));
    // SAFETY: sizes and alignment checked above; grid, block and shared memory as the kernel requires.
    unsafe { device.launch(&tiles, cfg, args)? };
    let n = rows * s.width();
    let args = (dqkv.reborrow(), dq.as_view(), rows as u32, s.width() as u32);
    // SAFETY: dqkv holds B·S·3D values and dq B·S·D.
    unsafe { device.launch(&flash::flash_attention_backward_dq, grid_stride_config(n, flash::THREADS), args) }
}

/// Which attention a GPU training step runs: the flash kernels (bf16 on a GPU device, head dims
/// 32, 64, 128) or the unfused cuBLASLt + softmax path (any type and head dim; the test oracle).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    Unfused,
    Flash,
}

impl AttentionKernel {
    /// Flash where it applies, else unfused (the CPU device: its reference). The environment
    /// variable `CLIP_PGS_ATTENTION` chooses explicitly: `unfused`, or `flash`, which is an
    /// error where the flash kernels do not apply.
    pub fn select<T: Float>(device: &Device, s: AttentionShape) -> Result<AttentionKernel> {
        Self::select_on::<T>(!matches!(device, Device::Cpu), s)
    }

    /// [`AttentionKernel::select`] on a GPU device (`gpu`: CUDA or emu) or the CPU, before a
    /// device is at hand: the model's arenas hold the [B, H, S, S] probabilities only for the
    /// unfused path.
    pub fn select_on<T: Float>(gpu: bool, s: AttentionShape) -> Result<AttentionKernel> {
        let applies = gpu && T::DATA_TYPE == DataType::Bf16 && flash_covers(s);
        match std::env::var("CLIP_PGS_ATTENTION").as_deref() {
            Ok("unfused") => Ok(AttentionKernel::Unfused),
            Ok("flash") if !applies => Err(crate::error::Error::InvalidArgument(format!(
                "CLIP_PGS_ATTENTION=flash: the flash kernels run bf16 on a GPU device with head dims 32, 64 \
                 and 128; this is {} on {} device with head dim {}",
                T::NAME,
                if gpu { "a GPU" } else { "the CPU" },
                s.head_dim
            ))),
            Ok("flash" | "auto") | Err(_) => {
                Ok(if applies { AttentionKernel::Flash } else { AttentionKernel::Unfused })
            }
            Ok(other) => Err(crate::error::Error::InvalidArgument(format!(
                "CLIP_PGS_ATTENTION={other}: expected flash, unfused or auto"
            ))),
        }
    }
}

/// The model's attention forward: out, and what backward needs — probs for the unfused path, lse
/// for flash ([`AttentionKernel::select`]); the other is left untouched.
pub fn model_attention_forward<T: Activation>(
    device: &Device,
    out: ViewMut<T>,
    probs: ViewMut<T>,
    lse: ViewMut<f32>,
    qkv: View<T>,
    lengths: Option<View<u32>>,
    s: AttentionShape,
) -> Result<()> {
    match AttentionKernel::select::<T>(device, s)? {
        AttentionKernel::Unfused => attention_forward(device, out, probs, qkv, lengths, s),
        AttentionKernel::Flash => {
            let (out, qkv) = (T::bf16_view_mut(out).expect("bf16"), T::bf16_view(qkv).expect("bf16"));
            flash_attention_forward(device, out, lse, qkv, Sequences::Padded(lengths), s)
        }
    }
}

/// The backward of [`model_attention_forward`] (the same kernel choice); flash takes its f32
/// scratch from the device's.
#[allow(clippy::too_many_arguments)]
pub fn model_attention_backward<T: Activation>(
    device: &Device,
    dqkv: ViewMut<T>,
    scratch: ViewMut<T>,
    dout: View<T>,
    qkv: View<T>,
    saved: (View<T>, View<T>, View<f32>),
    lengths: Option<View<u32>>,
    s: AttentionShape,
) -> Result<()> {
    let (probs, out, lse) = saved;
    match AttentionKernel::select::<T>(device, s)? {
        AttentionKernel::Unfused => attention_backward(device, dqkv, scratch, dout, qkv, probs, s),
        AttentionKernel::Flash => {
            let dqkv = T::bf16_view_mut(dqkv).expect("bf16");
            let (dout, qkv, out) =
                (T::bf16_view(dout).expect("bf16"), T::bf16_view(qkv).expect("bf16"), T::bf16_view(out).expect("bf16"));
            let path = FlashBackwardPath::Auto;
            device.with_scratch(flash_backward_scratch_len(device, s, path), |scratch| {
                let seqs = Sequences::Padded(lengths);
                flash_attention_backward(device, dqkv, scratch, dout, qkv, out, lse, seqs, s, path)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gradient, values};
    use super::*;
    use crate::buffer::Buffer;

    fn forward(qkv: &[f32], lengths: Option<&[u32]>, s: AttentionShape) -> (Vec<f32>, Vec<f32>) {
        let mut out = Buffer::Cpu(vec![0.0; s.batch * s.seq * s.width()]);
        let mut probs = Buffer::Cpu(vec![0.0; s.probs_len()]);
        let (qkv, lengths) = (Buffer::Cpu(qkv.to_vec()), lengths.map(|l| Buffer::Cpu(l.to_vec())));
        attention_forward(
            &Device::Cpu,
            out.view_mut(),
            probs.view_mut(),
            qkv.view(),
            lengths.as_ref().map(|l| l.view()),
            s,
        )
        .unwrap();
        (out.to_vec().unwrap(), probs.to_vec().unwrap())
    }

    #[test]
    fn backward_matches_finite_differences_causal_and_padded() {
        for (causal, lengths) in [(true, None), (false, Some(vec![3u32, 5]))] {
            let s = AttentionShape { batch: 2, seq: 5, heads: 2, head_dim: 3, causal };
            let qkv = values(s.batch * s.seq * 3 * s.width(), 1);
            let dout = values(s.batch * s.seq * s.width(), 2);
            let (_, probs) = forward(&qkv, lengths.as_deref(), s);
            let (mut dqkv, mut scratch) = (Buffer::Cpu(vec![0.0; qkv.len()]), Buffer::Cpu(vec![0.0; s.probs_len()]));
            let (dout_b, qkv_b, probs_b) = (Buffer::Cpu(dout.clone()), Buffer::Cpu(qkv.clone()), Buffer::Cpu(probs));
            attention_backward(
                &Device::Cpu,
                dqkv.view_mut(),
                scratch.view_mut(),
                dout_b.view(),
                qkv_b.view(),
                probs_b.view(),
                s,
            )
            .unwrap();
            let loss = |x: &[f32]| forward(x, lengths.as_deref(), s).0.iter().zip(&dout).map(|(a, b)| a * b).sum();
            assert_gradient("dqkv", &dqkv.to_vec().unwrap(), &qkv, loss);
        }
    }

    #[test]
    fn masked_keys_get_no_weight_and_bad_lengths_are_errors() {
        let s = AttentionShape { batch: 1, seq: 4, heads: 1, head_dim: 2, causal: true };
        let qkv = values(4 * 6, 3);
        let (_, probs) = forward(&qkv, Some(&[3]), s);
        for i in 0..4 {
            let row = &probs[i * 4..(i + 1) * 4];
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert!(row.iter().enumerate().all(|(j, &p)| (j <= i && j < 3) || p == 0.0), "row {i}: {row:?}");
        }
        let (mut out, mut probs) = (Buffer::Cpu(vec![0.0; 8]), Buffer::Cpu(vec![0.0; 16]));
        let (qkv, lengths) = (Buffer::Cpu(qkv), Buffer::Cpu(vec![5u32]));
        let e = attention_forward(&Device::Cpu, out.view_mut(), probs.view_mut(), qkv.view(), Some(lengths.view()), s);
        assert!(e.unwrap_err().to_string().contains("attention_forward: sequence 0 has length 5, outside 1..=4"));
    }
}
