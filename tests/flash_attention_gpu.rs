//! The flash attention kernel (`kernels/src/flash_attention.rs`, launched by
//! `flash_attention_forward` in `host/src/ops/attention.rs`) against the CPU attention, on the
//! emulator in `cargo test` (which also reports any race, out-of-bounds access or uninitialized
//! shared read as an error) and on CUDA with `CLIP_PGS_TEST_DEVICE=cuda`: sequence lengths from
//! 1 to 257 around the 64-row tiles, ragged PGS lengths with an image that keeps only CLS, causal
//! on and off, head dims 32, 64 and 128; sequences padded to S with lengths, or packed back to
//! back with offsets (varlen); the forward on both of its grids (K and V resident per sequence,
//! and the per-query-tile fallback), each against its own traffic minimum.

mod common;

use clip_pgs_host::ops::attention::{
    AttentionShape, FlashBackwardPath, FlashGrid, Sequences, attention_backward, attention_forward,
    flash_attention_backward, flash_attention_forward, flash_attention_forward_on, flash_backward_scratch_len,
};
use clip_pgs_host::{Buffer, Device, bf16};
use clip_pgs_kernels::flash_attention as flash;
use clip_pgs_kernels::philox::Philox;

/// Values in [-1, 1) rounded to bf16 (so that the CPU reference sees what the kernel sees), as q,
/// k, v after a LayerNorm and a projection.
fn qkv_values(n: usize, seed: u64) -> Vec<f32> {
    let rng = Philox::new(seed, 3, 0);
    (0..n as u32).map(|i| bf16::from_f32(rng.uniform(i) * 2.0 - 1.0).to_f32()).collect()
}

/// The CPU attention's out [B, S, D] (f32 reference).
fn reference_out(qkv: &[f32], lengths: Option<&[u32]>, s: AttentionShape) -> Vec<f32> {
    let mut out = Buffer::Cpu(vec![0.0; s.batch * s.seq * s.heads * s.head_dim]);
    let mut probs = Buffer::Cpu(vec![0.0; s.probs_len()]);
    let (qkv, lengths) = (Buffer::Cpu(qkv.to_vec()), lengths.map(|l| Buffer::Cpu(l.to_vec())));
    let lengths = lengths.as_ref().map(|l| l.view());
    attention_forward(&Device::Cpu, out.view_mut(), probs.view_mut(), qkv.view(), lengths, s).unwrap();
    out.to_vec().unwrap()
}

/// log Σ_visible exp(q·k/√D) of every (sequence, head, query) in f64 (0 for padding rows).
fn reference_lse(qkv: &[f32], lengths: Option<&[u32]>, s: AttentionShape) -> Vec<f32> {
    let (w, hd) = (s.heads * s.head_dim, s.head_dim);
    let mut lse = vec![0.0f32; s.batch * s.heads * s.seq];
    for b in 0..s.batch {
        let len = lengths.map_or(s.seq, |l| l[b] as usize);
        for h in 0..s.heads {
            for i in 0..len {
                let at =
                    |part: usize, row: usize, d: usize| qkv[(b * s.seq + row) * 3 * w + part * w + h * hd + d] as f64;
                let keys = if s.causal { i + 1 } else { len };
                let scores: Vec<f64> = (0..keys)
                    .map(|j| (0..hd).map(|d| at(0, i, d) * at(1, j, d)).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                lse[(b * s.heads + h) * s.seq + i] =
                    (max + scores.iter().map(|x| (x - max).exp()).sum::<f64>().ln()) as f32;
            }
        }
    }
    lse
}

/// How the test's sequences lie: [B, S] with valid lengths (None: all S), or packed back to back
/// with these lengths.
#[derive(Clone, Copy)]
enum Layout<'a> {
    Padded(Option<&'a [u32]>),
    Packed(&'a [u32]),
}

impl Layout<'_> {
    /// The kernels' lengths or offsets (cumulative lengths from 0) on `device`.
    fn upload(self, device: &Device) -> Option<Buffer<u32>> {
        match self {
            Layout::Padded(lengths) => lengths.map(|l| device.upload(l).unwrap()),
            Layout::Packed(lengths) => {
                let offsets: Vec<u32> = std::iter::once(0)
                    .chain(lengths.iter().scan(0, |o, &l| {
                        *o += l;
                        Some(*o)
                    }))
                    .collect();
                Some(device.upload(&offsets).unwrap())
            }
        }
    }

    fn sequences<'a>(self, uploaded: &'a Option<Buffer<u32>>) -> Sequences<'a> {
        match self {
            Layout::Padded(_) => Sequences::Padded(uploaded.as_ref().map(|l| l.view())),
            Layout::Packed(_) => Sequences::Packed(uploaded.as_ref().expect("offsets").view()),
        }
    }
}

/// The flash kernel's out (widened) and lse on `device` and `grid`, qkv laid out as `layout` says.
fn flash(device: &Device, qkv: &[f32], layout: Layout, s: AttentionShape, grid: FlashGrid) -> (Vec<f32>, Vec<f32>) {
    let qkv: Vec<bf16> = qkv.iter().map(|&x| bf16::from_f32(x)).collect();
    let qkv = device.upload(&qkv).unwrap();
    // Garbage where the kernel must write: every element of out and lse is its output.
    let rows = qkv.len() / (3 * s.heads * s.head_dim);
    let mut out = device.upload(&vec![bf16::NAN; rows * s.heads * s.head_dim]).unwrap();
    let mut lse = device.upload(&vec![f32::NAN; rows * s.heads]).unwrap();
    let uploaded = layout.upload(device);
    let seqs = layout.sequences(&uploaded);
    flash_attention_forward_on(device, out.view_mut(), lse.view_mut(), qkv.view(), seqs, s, grid).unwrap();
    (out.to_vec().unwrap().iter().map(|x| x.to_f32()).collect(), lse.to_vec().unwrap())
}

/// (batch, S, heads, causal, lengths).
type Case = (usize, usize, usize, bool, Option<Vec<u32>>);

/// The forward's grids at a head dim: both, or per query tile alone at 128.
fn grids(head_dim: usize) -> &'static [FlashGrid] {
    match head_dim {
        128 => &[FlashGrid::PerQueryTile],
        _ => &[FlashGrid::Resident, FlashGrid::PerQueryTile],
    }
}

#[test]
fn flash_forward_matches_the_cpu_attention() {
    let gpu = common::gpu();
    // One tile and the tile edges (1, 63, 64, 65), PGS ragged
    // lengths at ViT-B/16's 197 and its dynamic 99 with an image that keeps only CLS, the text
    // tower's 77 causal with padded captions, and 257 (ViT-L/14) across five tiles.
    let cases: [Case; 8] = [
        (1, 1, 1, false, None),
        (2, 63, 2, true, None),
        (1, 64, 1, false, None),
        (2, 65, 1, true, Some(vec![65, 30])),
        (3, 99, 1, false, Some(vec![99, 1, 50])),
        (2, 77, 2, true, Some(vec![77, 13])),
        (2, 197, 1, false, Some(vec![197, 70])),
        (1, 257, 1, true, None),
    ];
    for head_dim in [32, 64, 128] {
        for (batch, seq, heads, causal, lengths) in &cases {
            if head_dim != 64 && *seq > 100 {
                continue; // the long sequences once, at ViT's head dim (the emulator is slow)
            }
            let s = AttentionShape { batch: *batch, seq: *seq, heads: *heads, head_dim, causal: *causal };
            let lengths = lengths.as_deref();
            let qkv = qkv_values(s.batch * s.seq * 3 * s.heads * head_dim, *seq as u64);
            let (want_out, want_lse) = (reference_out(&qkv, lengths, s), reference_lse(&qkv, lengths, s));
            for &grid in grids(head_dim) {
                let (out, lse) = flash(&gpu, &qkv, Layout::Padded(lengths), s, grid);
                let at = format!(
                    "{grid:?}, D {head_dim}, B {batch}, S {seq}, H {heads}, causal {causal}, lengths {lengths:?}"
                );
                let w = s.heads * head_dim;
                for b in 0..s.batch {
                    let len = lengths.map_or(s.seq, |l| l[b] as usize);
                    for i in 0..s.seq {
                        for c in 0..w {
                            let (got, want) = (out[(b * s.seq + i) * w + c], want_out[(b * s.seq + i) * w + c]);
                            // Valid rows: P rounded to bf16 for the P·V mma (≤ 2⁻⁸ relative per
                            // probability, random in sign) and out stored in bf16 (2⁻⁹ of |o| ≤ 1):
                            // 1e-2, where a wrong mask, tile or scale is off by O(0.1). Padding rows
                            // are 0.
                            let want = if i < len { want } else { 0.0 };
                            assert!((got - want).abs() <= 1e-2, "{at}: out[{b}, {i}, {c}] = {got}, want {want}");
                        }
                    }
                    for h in 0..s.heads {
                        for i in 0..s.seq {
                            let k = (b * s.heads + h) * s.seq + i;
                            // Exact bf16 products summed in f32 by the mma: agreement to rounding.
                            assert!(
                                (lse[k] - want_lse[k]).abs() <= 1e-4 * want_lse[k].abs().max(1.0),
                                "{at}: lse[{k}] = {}, want {}",
                                lse[k],
                                want_lse[k]
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn flash_refuses_head_dims_it_does_not_cover() {
    let gpu = common::gpu();
    let s = AttentionShape { batch: 1, seq: 4, heads: 1, head_dim: 16, causal: false };
    let qkv = gpu.upload(&vec![bf16::ZERO; 4 * 48]).unwrap();
    let (mut out, mut lse) = (gpu.upload(&[bf16::ZERO; 4 * 16]).unwrap(), gpu.upload(&[0.0f32; 4]).unwrap());
    let seqs = Sequences::Padded(None);
    let e = flash_attention_forward(&gpu, out.view_mut(), lse.view_mut(), qkv.view(), seqs, s).unwrap_err();
    assert!(e.to_string().contains("head dim 16: the flash kernels cover 32, 64 and 128"), "{e}");
}

/// The grid `flash_attention_forward` picks: resident while Q and the ⌈S/64⌉ K and V tiles fit the
/// device's 227 KiB (the emulator's H100 limit), 64-row tiles of 2·D bytes: at D = 64 up to S =
/// 832 (27 tiles of 8 KiB); per query tile at D = 128, which the resident kernels do not cover. A
/// resident launch beyond either is refused, not run.
#[test]
fn flash_grid_is_resident_where_its_shared_memory_fits() {
    let device = Device::Emu(clip_pgs_host::emu::EmuRuntime::new(Default::default()));
    let shape = |seq, head_dim| AttentionShape { batch: 1, seq, heads: 1, head_dim, causal: false };
    assert_eq!(FlashGrid::for_shape(&device, shape(197, 64)), FlashGrid::Resident);
    assert_eq!(FlashGrid::for_shape(&device, shape(832, 64)), FlashGrid::Resident);
    assert_eq!(FlashGrid::for_shape(&device, shape(833, 64)), FlashGrid::PerQueryTile);
    assert_eq!(FlashGrid::for_shape(&device, shape(64, 128)), FlashGrid::PerQueryTile);
    for (s, why) in [
        (shape(833, 64), "bytes of shared memory per block exceed the limit"),
        (shape(64, 128), "head dim 128: the resident flash grid covers 32 and 64"),
    ] {
        let qkv = device.upload(&vec![bf16::ZERO; s.seq * 3 * s.head_dim]).unwrap();
        let mut out = device.upload(&vec![bf16::ZERO; s.seq * s.head_dim]).unwrap();
        let mut lse = device.upload(&vec![0.0f32; s.seq]).unwrap();
        let seqs = Sequences::Padded(None);
        let (o, l) = (out.view_mut(), lse.view_mut());
        let e = flash_attention_forward_on(&device, o, l, qkv.view(), seqs, s, FlashGrid::Resident).unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
    }
}

/// Bytes the forward must move: out and lse written once, padding rows included (packed sequences
/// have none); Q's valid rows read once, 2·D bytes each; K's and V's valid rows once per
/// (sequence, head) on the resident grid, and on the per-query-tile grid once per query tile
/// that visits them (causal: the key tiles up to the query tile's).
fn forward_min_bytes(lengths: &[u32], s: AttentionShape, packed: bool, grid: FlashGrid) -> u64 {
    let tile = clip_pgs_kernels::flash_attention::TILE;
    let row = 2 * s.head_dim as u64;
    let rows = if packed { lengths.iter().sum::<u32>() as usize } else { s.batch * s.seq };
    let mut bytes = (rows * s.heads) as u64 * (row + 4);
    for &len in lengths {
        let len = len as usize;
        let kv_rows = match grid {
            FlashGrid::Resident => len,
            FlashGrid::PerQueryTile => {
                (0..len).step_by(tile).map(|q0| if s.causal { len.min(q0 + tile) } else { len }).sum()
            }
        };
        bytes += s.heads as u64 * row * (len + 2 * kv_rows) as u64;
    }
    bytes
}

#[test]
fn flash_forward_moves_at_most_1_1_times_its_minimum() {
    use clip_pgs_host::emu::EmuRuntime;
    use clip_pgs_kernels::hw::emu::Options;
    let emu = EmuRuntime::new(Options { counters: true, ..Options::default() });
    let device = Device::Emu(emu.clone());
    // ViT-B/16 with PGS's ragged lengths (one image keeping only CLS), padded and packed (no
    // padding rows to write), the text tower's causal 77; each on both grids, against the grid's
    // own minimum (the fallback's also against the resident one: what residency saves).
    let vit = AttentionShape { batch: 3, seq: 197, heads: 2, head_dim: 64, causal: false };
    let text = AttentionShape { batch: 2, seq: 77, heads: 2, head_dim: 64, causal: true };
    for (s, lengths, packed) in
        [(vit, vec![197u32, 99, 1], false), (vit, vec![197u32, 99, 1], true), (text, vec![77, 77], false)]
    {
        let (rows, layout) = match packed {
            true => (lengths.iter().sum::<u32>() as usize, Layout::Packed(&lengths)),
            false => (s.batch * s.seq, Layout::Padded(Some(&lengths))),
        };
        for grid in [FlashGrid::Resident, FlashGrid::PerQueryTile] {
            emu.keep_reports();
            flash(&device, &qkv_values(rows * 3 * s.heads * s.head_dim, 9), layout, s, grid);
            let reports = emu.take_reports();
            let moved: u64 = reports.iter().map(|r| r.traffic.sector_bytes()).sum();
            let min = forward_min_bytes(&lengths, s, packed, grid);
            let resident_min = forward_min_bytes(&lengths, s, packed, FlashGrid::Resident);
            let (ratio, vs_resident) = (moved as f64 / min as f64, moved as f64 / resident_min as f64);
            println!(
                "{grid:?} {s:?} lengths {lengths:?} packed {packed}: {moved} bytes moved, minimum {min}: {ratio:.3}× \
                 ({vs_resident:.3}× the resident minimum)"
            );
            assert!(ratio <= 1.1, "{grid:?} {s:?}: {moved} bytes moved, {ratio:.3}× the minimum {min}");
            assert!(ratio >= 1.0, "{grid:?} {s:?}: {moved} bytes moved, below the minimum {min}: the count is wrong");
        }
    }
}

/// dqkv of the CPU attention's backward (f32 reference).
fn reference_dqkv(qkv: &[f32], dout: &[f32], lengths: Option<&[u32]>, s: AttentionShape) -> Vec<f32> {
    let mut out = Buffer::Cpu(vec![0.0; dout.len()]);
    let mut probs = Buffer::Cpu(vec![0.0; s.probs_len()]);
    let (qkv_b, lengths_b) = (Buffer::Cpu(qkv.to_vec()), lengths.map(|l| Buffer::Cpu(l.to_vec())));
    let lengths_v = lengths_b.as_ref().map(|l| l.view());
    attention_forward(&Device::Cpu, out.view_mut(), probs.view_mut(), qkv_b.view(), lengths_v, s).unwrap();
    let (mut dqkv, mut scratch) = (Buffer::Cpu(vec![0.0; qkv.len()]), Buffer::Cpu(vec![0.0; s.probs_len()]));
    let dout = Buffer::Cpu(dout.to_vec());
    attention_backward(&Device::Cpu, dqkv.view_mut(), scratch.view_mut(), dout.view(), qkv_b.view(), probs.view(), s)
        .unwrap();
    dqkv.to_vec().unwrap()
}

/// The flash kernels' dqkv (widened) on `device` by the backward `path`, forward first for out and
/// lse.
fn flash_dqkv(
    device: &Device,
    qkv: &[f32],
    dout: &[f32],
    layout: Layout,
    s: AttentionShape,
    path: FlashBackwardPath,
) -> Vec<f32> {
    let up = |x: &[f32]| device.upload(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).unwrap();
    let (qkv_b, dout_b) = (up(qkv), up(dout));
    let mut out = up(&vec![0.0; dout.len()]);
    let mut lse = device.upload(&vec![0.0f32; dout.len() / s.head_dim]).unwrap();
    let uploaded = layout.upload(device);
    let lengths = layout.sequences(&uploaded);
    flash_attention_forward(device, out.view_mut(), lse.view_mut(), qkv_b.view(), lengths, s).unwrap();
    // Garbage where the kernels must write.
    let mut dqkv = device.upload(&vec![bf16::NAN; qkv.len()]).unwrap();
    let mut scratch = device.upload(&vec![f32::NAN; flash_backward_scratch_len(device, s, path)]).unwrap();
    let (d, q, o, l) = (dout_b.view(), qkv_b.view(), out.view(), lse.view());
    flash_attention_backward(device, dqkv.view_mut(), scratch.view_mut(), d, q, o, l, lengths, s, path).unwrap();
    dqkv.to_vec().unwrap().iter().map(|x| x.to_f32()).collect()
}

#[test]
fn flash_backward_matches_the_cpu_attention() {
    let gpu = common::gpu();
    let cases: [Case; 6] = [
        (1, 1, 1, false, None),
        (2, 65, 2, true, None),
        (3, 99, 1, false, Some(vec![99, 1, 50])),
        (2, 77, 1, true, Some(vec![77, 13])),
        (2, 130, 1, false, Some(vec![130, 64])),
        (1, 257, 1, true, None),
    ];
    for head_dim in [32, 64, 128] {
        for (batch, seq, heads, causal, lengths) in &cases {
            if head_dim != 64 && *seq > 100 {
                continue;
            }
            let s = AttentionShape { batch: *batch, seq: *seq, heads: *heads, head_dim, causal: *causal };
            let lengths = lengths.as_deref();
            let w = s.heads * head_dim;
            let qkv = qkv_values(s.batch * s.seq * 3 * w, *seq as u64);
            // dout 0 in padding rows, as in the model (nothing reads those rows of out).
            let mut dout = qkv_values(s.batch * s.seq * w, 100 + *seq as u64);
            for (row, chunk) in dout.chunks_mut(w).enumerate() {
                if row % s.seq >= lengths.map_or(s.seq, |l| l[row / s.seq] as usize) {
                    chunk.fill(0.0);
                }
            }
            let want = reference_dqkv(&qkv, &dout, lengths, s);
            // P and dS rounded to bf16 for their mma, dqkv stored in bf16: 2e-2 of the largest
            // gradient, where a wrong mask, scale or transpose is off by O(1) of it.
            let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-3);
            // Auto: resident where its slots fit (D = 32 up to 768 rows, 64 up to 384, 128 up to 128);
            // there the key-tile fallback forced too.
            let paths: &[_] = match FlashBackwardPath::Auto.resident(&gpu, s) {
                true => &[FlashBackwardPath::Auto, FlashBackwardPath::KeyTiles],
                false => &[FlashBackwardPath::Auto],
            };
            for &path in paths {
                let got = flash_dqkv(&gpu, &qkv, &dout, Layout::Padded(lengths), s, path);
                let at = format!("D {head_dim}, B {batch}, S {seq}, H {heads}, causal {causal}, lengths {lengths:?}");
                let at = format!("{at}, {path:?} (resident {})", path.resident(&gpu, s));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 2e-2 * scale, "{at}: dqkv[{i}] = {g}, want {w} (largest {scale})");
                }
            }
        }
    }
}

/// The valid rows of [B, S, width] values, packed back to back.
fn pack(x: &[f32], width: usize, lengths: &[u32], seq: usize) -> Vec<f32> {
    let rows = lengths.iter().enumerate().flat_map(|(b, &l)| b * seq..b * seq + l as usize);
    rows.flat_map(|r| x[r * width..(r + 1) * width].iter().copied()).collect()
}

#[test]
fn packed_sequences_match_the_cpu_attention() {
    let gpu = common::gpu();
    // (head dim, batch, S, heads, causal, lengths): ragged PGS lengths with an image keeping only
    // CLS, a single token, the text tower's causal 77 with a short caption, 257 across five tiles
    // with a sequence that ends mid-tile before the next begins, D = 128 across a tile edge.
    let cases: [(usize, usize, usize, usize, bool, Vec<u32>); 5] = [
        (64, 3, 99, 2, false, vec![99, 1, 50]),
        (32, 1, 1, 1, false, vec![1]),
        (32, 2, 77, 1, true, vec![77, 13]),
        (64, 3, 257, 1, false, vec![130, 1, 257]),
        (128, 2, 65, 1, false, vec![65, 30]),
    ];
    for (head_dim, batch, seq, heads, causal, lengths) in &cases {
        let s = AttentionShape { batch: *batch, seq: *seq, heads: *heads, head_dim: *head_dim, causal: *causal };
        let w = s.heads * s.head_dim;
        let qkv = qkv_values(s.batch * s.seq * 3 * w, 7 + *seq as u64);
        let mut dout = qkv_values(s.batch * s.seq * w, 200 + *seq as u64);
        for (row, chunk) in dout.chunks_mut(w).enumerate() {
            if row % s.seq >= lengths[row / s.seq] as usize {
                chunk.fill(0.0);
            }
        }
        let padded = Some(lengths.as_slice());
        let (want_out, want_lse) = (reference_out(&qkv, padded, s), reference_lse(&qkv, padded, s));
        let want_dqkv = reference_dqkv(&qkv, &dout, padded, s);
        let (packed_qkv, packed_dout) = (pack(&qkv, 3 * w, lengths, s.seq), pack(&dout, w, lengths, s.seq));
        let layout = Layout::Packed(lengths);
        let forwards: Vec<_> =
            grids(s.head_dim).iter().map(|&grid| (grid, flash(&gpu, &packed_qkv, layout, s, grid))).collect();
        // Both backward paths: the resident one walks the key tiles of each sequence's rows.
        let paths = [FlashBackwardPath::Auto, FlashBackwardPath::KeyTiles];
        let dqkv = paths.map(|path| flash_dqkv(&gpu, &packed_qkv, &packed_dout, layout, s, path));
        let at = format!("D {head_dim}, S {seq}, H {heads}, causal {causal}, lengths {lengths:?}");
        // Tolerances as the padded tests'.
        let scale = want_dqkv.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-3);
        let mut row = 0;
        for (b, &len) in lengths.iter().enumerate() {
            let len = len as usize;
            for i in 0..len {
                let (p, r) = (row + i, b * s.seq + i);
                for (grid, (out, lse)) in &forwards {
                    for c in 0..w {
                        let (got, want) = (out[p * w + c], want_out[r * w + c]);
                        let ok = (got - want).abs() <= 1e-2;
                        assert!(ok, "{grid:?} {at}: out of sequence {b} row {i} [{c}] = {got}, want {want}");
                    }
                    for h in 0..s.heads {
                        let (got, want) = (lse[row * s.heads + h * len + i], want_lse[(b * s.heads + h) * s.seq + i]);
                        let ok = (got - want).abs() <= 1e-4 * want.abs().max(1.0);
                        assert!(ok, "{grid:?} {at}: lse of {b} head {h} row {i}");
                    }
                }
                for (dqkv, path) in dqkv.iter().zip(paths) {
                    for c in 0..3 * w {
                        let (got, want) = (dqkv[p * 3 * w + c], want_dqkv[r * 3 * w + c]);
                        let ok = (got - want).abs() <= 2e-2 * scale;
                        assert!(ok, "{at}, {path:?}: dqkv of {b} row {i} [{c}] = {got}, want {want}");
                    }
                }
            }
            row += len;
        }
    }
}

/// Bytes the key-tile fallback must move, its dQ by atomics: per (sequence, head, key tile with
/// k valid keys) K and V once, and per query tile it visits (q valid queries) Q and dO (2·D bytes
/// a row), lse and δ (8 bytes) and the dQ atomics (4·D bytes a row); dK and dV written once
/// (padding rows included); the δ pre-pass reads O and dO of the valid rows and writes δ and the
/// zeroed dQ accumulator; the last pass reads the accumulator and writes dQ in bf16.
fn key_tiles_min_bytes(lengths: &[u32], s: AttentionShape) -> u64 {
    let tile = clip_pgs_kernels::flash_attention::TILE;
    let (d, heads) = (s.head_dim as u64, s.heads as u64);
    let rows = (s.batch * s.seq) as u64;
    let mut bytes = heads * rows * (4 * d + (4 + 4 * d) + (4 * d + 2 * d));
    for &len in lengths {
        let len = len as usize;
        bytes += heads * 4 * d * len as u64; // O and dO of the valid rows
        for k0 in (0..len).step_by(tile) {
            bytes += heads * 4 * d * (len - k0).min(tile) as u64;
            let q_start = if s.causal { k0 } else { 0 };
            bytes += heads * (4 * d + 8 + 4 * d) * (len - q_start) as u64;
        }
    }
    bytes
}

/// Bytes the resident backward must move: per (sequence, head) Q, K, V and dO of the valid rows
/// once (2·D bytes a row each) with their lse and δ (8 bytes); dQ, dK and dV written once as
/// bf16 (padding rows included); the δ pre-pass reads O and dO of the valid rows and writes δ.
fn resident_min_bytes(lengths: &[u32], s: AttentionShape) -> u64 {
    let (d, heads) = (s.head_dim as u64, s.heads as u64);
    let rows = (s.batch * s.seq) as u64;
    let valid = lengths.iter().map(|&l| l as u64).sum::<u64>();
    heads * rows * (6 * d + 4) + heads * valid * (8 * d + 8 + 4 * d)
}

/// Warp requests of `flash_attention_backward_dot` (padded sequences): in 16-byte vectors, and
/// as two bf16 (one f32) a lane. Each warp loads its sequence's length; a group of 8 rows of a
/// head loads O and dO once per 32/V of its valid rows (V = D/8 vectors a row; per valid row and
/// 64 columns as words), stores its δ once and, with the accumulator, zeroes its rows' 4·D bytes
/// in 512-byte stores (per row and 32 columns as f32).
fn dot_requests(lengths: &[u32], s: AttentionShape, accumulator: bool) -> (u64, u64) {
    let (rows, d) = (flash::DOT_ROWS, s.head_dim);
    let warps = (flash::THREADS / 32) as usize;
    let groups = s.seq.div_ceil(rows);
    let lengths_loads = (groups * s.heads).div_ceil(warps) * warps * s.batch;
    let per_load = 32 / (d / 8);
    let (mut vector, mut scalar) = (lengths_loads, lengths_loads);
    for &len in lengths {
        for g in 0..groups {
            let (valid, all) = ((len as usize).saturating_sub(g * rows).min(rows), (s.seq - g * rows).min(rows));
            let zero = usize::from(accumulator);
            vector += s.heads * (2 * valid.div_ceil(per_load) + 1 + zero * (all * d / 4).div_ceil(32));
            scalar += s.heads * (2 * valid * d.div_ceil(64) + 1 + zero * all * d.div_ceil(32));
        }
    }
    (vector as u64, scalar as u64)
}

/// The resident path (ViT-B/16's S = 197 with PGS lengths at D = 64 and 32, the text tower's
/// causal 77 at D = 128) and the fallback (the ViT shape forced at D = 64 and 32; and D = 128 at
/// S = 257, whose slots exceed an H100's shared memory), each against its own minimum; the rest is the δ pre-pass's lengths load
/// per warp and δ rows across sectors. The fallback's dQ atomics add 32 consecutive columns of
/// a row an instruction (staged in shared memory), whole sectors.
#[test]
fn flash_backward_moves_at_most_1_1_times_its_minimum() {
    use clip_pgs_host::emu::EmuRuntime;
    use clip_pgs_kernels::hw::emu::Options;
    let emu = EmuRuntime::new(Options { counters: true, ..Options::default() });
    let device = Device::Emu(emu.clone());
    let vit = AttentionShape { batch: 3, seq: 197, heads: 2, head_dim: 64, causal: false };
    let vit32 = AttentionShape { head_dim: 32, ..vit };
    let text = AttentionShape { batch: 2, seq: 77, heads: 2, head_dim: 128, causal: true };
    let long = AttentionShape { batch: 2, seq: 257, heads: 1, head_dim: 128, causal: false };
    for (s, lengths, path, want_resident) in [
        (vit, vec![197u32, 99, 1], FlashBackwardPath::Auto, true),
        (vit32, vec![197, 99, 1], FlashBackwardPath::Auto, true),
        (text, vec![77, 13], FlashBackwardPath::Auto, true),
        (vit, vec![197, 99, 1], FlashBackwardPath::KeyTiles, false),
        (vit32, vec![197, 99, 1], FlashBackwardPath::KeyTiles, false),
        (long, vec![257, 130], FlashBackwardPath::Auto, false),
    ] {
        let resident = path.resident(&device, s);
        assert_eq!(resident, want_resident, "{s:?}: {path:?} resident {resident}");
        // δ, and the fallback's dQ accumulator.
        let accumulator = if resident { 0 } else { s.heads * s.head_dim };
        assert_eq!(flash_backward_scratch_len(&device, s, path), s.batch * s.seq * (s.heads + accumulator));
        let n = s.batch * s.seq * s.heads * s.head_dim;
        let (qkv, mut dout) = (qkv_values(3 * n, 9), qkv_values(n, 10));
        let w = s.heads * s.head_dim;
        for (row, chunk) in dout.chunks_mut(w).enumerate() {
            if row % s.seq >= lengths[row / s.seq] as usize {
                chunk.fill(0.0);
            }
        }
        emu.keep_reports();
        flash_dqkv(&device, &qkv, &dout, Layout::Padded(Some(&lengths)), s, path);
        let reports = emu.take_reports();
        let backward: Vec<_> = reports.iter().filter(|r| r.kernel.starts_with("flash_attention_backward")).collect();
        for r in &backward {
            println!(
                "{}: {} bytes, {:.0}% of sector bytes used",
                r.kernel,
                r.traffic.sector_bytes(),
                100.0 * r.traffic.sector_efficiency()
            );
        }
        let dot = backward.iter().find(|r| r.kernel == "flash_attention_backward_dot").expect("the δ pre-pass");
        let (vector, scalar) = dot_requests(&lengths, s, !resident);
        println!(
            "flash_attention_backward_dot: {} requests (two bf16 a lane: {scalar}), {} sector bytes",
            dot.traffic.global_requests(),
            dot.traffic.sector_bytes()
        );
        assert_eq!(dot.traffic.global_requests(), vector, "{s:?} {path:?}: the δ pre-pass's requests");
        let moved: u64 = backward.iter().map(|r| r.traffic.sector_bytes()).sum();
        let min = if resident { resident_min_bytes(&lengths, s) } else { key_tiles_min_bytes(&lengths, s) };
        let ratio = moved as f64 / min as f64;
        println!("{s:?} {path:?}: backward {moved} bytes moved, minimum {min}: {ratio:.3}×");
        assert!((1.0..=1.1).contains(&ratio), "{s:?} {path:?}: {moved} bytes moved, {ratio:.3}× the minimum {min}");
    }
}
