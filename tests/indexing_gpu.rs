//! The model's indexing ops on a GPU device against the CPU reference, bit for bit (emulator in
//! `cargo test`, CUDA with `CLIP_PGS_TEST_DEVICE=cuda`): patchify (`kernels/src/patchify.rs`),
//! the token embedding forward and backward (`kernels/src/embedding.rs`), EOT rows, gather_rows
//! and scatter_rows (`kernels/src/rows.rs`) and PGS's gather backward (`kernels/src/gather.rs`).
//! All of them copy or add in the CPU's order, so every device gives the same bits; accumulated
//! gradients start from nonzero values, written outputs from garbage. The emulator reports any
//! race, out-of-bounds access or uninitialized shared read as a launch error, which fails these
//! tests; hostile indices (that only the CPU device refuses) must stay in bounds.
//!
//! bf16: the same ops over bf16 activations (gradients of parameters f32) against the CPU given
//! the same values widened to f32, bit for bit after rounding: the copies are exact (patchify,
//! the row gathers and scatters, d_tokens), the embedding's sum is the CPU's rounded once, and
//! the f32 gradients add the same widened values in the same order.

mod common;

use clip_pgs_host::ops::dtype::{Activation, Float};
use clip_pgs_host::ops::embedding::{embedding_backward, embedding_forward};
use clip_pgs_host::ops::patchify::patchify;
use clip_pgs_host::ops::pgs::gather::{GatherShape, KeptIndices, gather_backward};
use clip_pgs_host::ops::rows::{eot_rows, gather_rows, scatter_rows};
use clip_pgs_host::{Buffer, Device, bf16};
use clip_pgs_kernels::philox::Philox;

const VOCAB: usize = 49408;
const SOT: u32 = 49406;
const EOT: u32 = 49407;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let rng = Philox::new(seed, 11, 0);
    (0..n as u32).map(|i| rng.uniform(i) * 8.0 - 4.0).collect()
}

/// Uniform integers below `bound`.
fn integers(n: usize, bound: u32, seed: u64) -> Vec<u32> {
    let rng = Philox::new(seed, 12, 0);
    (0..n as u32).map(|i| ((rng.uniform(i) * bound as f32) as u32).min(bound - 1)).collect()
}

fn assert_same_bits(what: &str, want: &[f32], got: &[f32]) {
    assert_eq!(want.len(), got.len(), "{what}: lengths differ");
    let differ: Vec<usize> = (0..want.len()).filter(|&i| want[i].to_bits() != got[i].to_bits()).collect();
    if let Some(&i) = differ.first() {
        panic!(
            "{what}: {} of {} values differ, first at {i}: cpu {} gpu {}",
            differ.len(),
            want.len(),
            want[i],
            got[i]
        );
    }
}

/// Captions as the tokenizer writes them: SOT, words, EOT, then the padding id 0 to the context;
/// `words[b]` words for caption b (truncated to fit, EOT always last).
fn captions(words: &[usize], context: usize, seed: u64) -> Vec<u32> {
    let mut ids = Vec::new();
    for (b, &n) in words.iter().enumerate() {
        let mut caption = vec![SOT];
        caption.extend(integers(n.min(context.saturating_sub(2)), SOT - 1, seed + b as u64).iter().map(|i| i + 1));
        caption.push(EOT);
        caption.truncate(context);
        if caption.len() == context {
            caption[context - 1] = EOT;
        }
        caption.resize(context, 0);
        ids.extend(caption);
    }
    ids
}

#[test]
fn patchify_equals_the_cpu_bit_for_bit() {
    let gpu = common::gpu();
    // test-tiny (32 / 8), ViT-B/16 (224 / 16) with N = 2, ViT-B/14-like (28 / 14: runs that
    // straddle sectors), one patch per image, and 1-pixel patches.
    for (n, size, patch) in [(3, 32, 8), (2, 224, 16), (2, 28, 14), (2, 8, 8), (1, 4, 1)] {
        let images = values(n * 3 * size * size, 1);
        let run = |d: &Device| {
            let (mut patches, images) = (d.upload(&values(images.len(), 2)).unwrap(), d.upload(&images).unwrap());
            patchify(d, patches.view_mut(), images.view(), size, patch).unwrap();
            patches.to_vec().unwrap()
        };
        assert_same_bits(&format!("patchify N {n} S {size} p {patch}"), &run(&Device::Cpu), &run(&gpu));
    }
}

/// Runs the embedding forward and backward on `device`; returns x, d_table and d_pos.
fn embedding(device: &Device, ids: &[u32], vocab: usize, context: usize, width: usize) -> [Vec<f32>; 3] {
    embedding_as::<f32, f32>(device, ids, vocab, context, width)
}

/// `embedding` with x, the table, pos and dx of element type T, their values as H holds them
/// (d_table and d_pos f32).
fn embedding_as<T: Activation, H: Float>(
    device: &Device,
    ids: &[u32],
    vocab: usize,
    context: usize,
    width: usize,
) -> [Vec<f32>; 3] {
    let rows = ids.len();
    let up = |v: &[f32]| common::upload_as::<T>(device, &common::held::<H>(v));
    let (table, pos, dx) =
        (up(&values(vocab * width, 3)), up(&values(context * width, 4)), up(&values(rows * width, 5)));
    let mut x = up(&values(rows * width, 6));
    let (mut d_table, mut d_pos) =
        (device.upload(&values(vocab * width, 7)).unwrap(), device.upload(&values(context * width, 8)).unwrap());
    let ids = device.upload(ids).unwrap();
    embedding_forward(device, x.view_mut(), ids.view(), table.view(), pos.view(), width).unwrap();
    embedding_backward(device, d_table.view_mut(), d_pos.view_mut(), dx.view(), ids.view(), width).unwrap();
    [common::download(&x), d_table.to_vec().unwrap(), d_pos.to_vec().unwrap()]
}

#[test]
fn token_embedding_forward_and_backward_equal_the_cpu_bit_for_bit() {
    let gpu = common::gpu();
    let mut cases = vec![
        // test-tiny (T 16, W 32): short, full and empty captions, padding repeated.
        ("test-tiny", captions(&[3, 20, 0, 7, 1], 16, 1), VOCAB, 16, 32),
        // ViT-B/16's text tower (T 77, W 512), 2 captions.
        ("vit-b-16", captions(&[10, 40], 77, 2), VOCAB, 77, 512),
        // A width that is no multiple of a warp or block, more rows than a group.
        ("width 33", captions(&[5, 0, 2, 9, 14, 3, 3, 1, 0], 16, 3), VOCAB, 16, 33),
        // One column and one position.
        ("width 1", captions(&[0; 5], 1, 4), VOCAB, 1, 1),
    ];
    // More captions than a forward block takes (128), short ones: the padding id repeats within
    // and across the groups of 8 captions the forward loads together.
    let many: Vec<usize> = (0..130).map(|b| b % 5).collect();
    cases.push(("130 captions", captions(&many, 6, 6), VOCAB, 6, 3));
    // Ids of one bucket (≡ 0 mod 32) interleaved: the running sums switch ids at every row.
    let same_bucket: Vec<u32> = integers(6 * 5, 4, 5).iter().map(|i| i * 32).collect();
    cases.push(("one bucket", same_bucket, 100, 5, 140));
    // More rows than the backward stages at once (1024) and more columns than a block's strip
    // (512): runs continue across chunks, and a second strip is partly outside the width.
    let long: Vec<usize> = (0..70).map(|b| b % 13).collect();
    cases.push(("two chunks, two strips", captions(&long, 16, 8), VOCAB, 16, 520));
    for (name, ids, vocab, context, width) in cases {
        let (want, got) =
            (embedding(&Device::Cpu, &ids, vocab, context, width), embedding(&gpu, &ids, vocab, context, width));
        for (tensor, (w, g)) in ["x", "d_table", "d_pos"].iter().zip(want.iter().zip(&got)) {
            assert_same_bits(&format!("{name}: {tensor}"), w, g);
        }
    }
}

#[test]
fn eot_rows_equal_the_cpu() {
    let gpu = common::gpu();
    let mut cases = vec![
        (captions(&[3, 20, 0, 7, 1], 16, 1), 16),
        (captions(&[10, 40, 75, 76, 0], 77, 2), 77),
        (captions(&[4; 9], 5, 3), 5),
        (vec![3, 1, 4, 1, 5, 9, 2, 6], 1),
    ];
    // Ties: the first position of the largest id wins, across lanes (positions 3 and 40, 35 and
    // 67), and an all-padding caption points at its first position.
    let mut ties = vec![0u32; 3 * 77];
    (ties[3], ties[40]) = (9, 9);
    (ties[77 + 35], ties[77 + 67]) = (EOT, EOT);
    cases.push((ties, 77));
    cases.push((integers(33 * 100, 4, 6), 100));
    for (ids, context) in cases {
        let run = |d: &Device| {
            let (mut rows, ids) = (d.upload(&vec![u32::MAX; ids.len() / context]).unwrap(), d.upload(&ids).unwrap());
            eot_rows(d, rows.view_mut(), ids.view(), context).unwrap();
            rows.to_vec().unwrap()
        };
        assert_eq!(run(&Device::Cpu), run(&gpu), "context {context}");
    }
}

#[test]
fn gather_and_scatter_rows_equal_the_cpu_bit_for_bit() {
    let gpu = common::gpu();
    // (matrix rows, width, indices): EOT rows of test-tiny and ViT-B/16 captions, repeated rows
    // (scatter: the last wins), and a dx whose length is no whole number of rows.
    let eot = |words: &[usize], context: usize| {
        let ids = captions(words, context, 7);
        ids.chunks(context)
            .enumerate()
            .map(|(b, c)| (b * context + c.iter().position(|&i| i == EOT).unwrap()) as u32)
            .collect::<Vec<_>>()
    };
    let cases = [
        (5 * 16, 0, 32, eot(&[3, 20, 0, 7, 1], 16)),
        (2 * 77, 0, 512, eot(&[10, 40], 77)),
        (10, 0, 33, vec![9, 0, 3, 3, 9, 1]),
        (7, 3, 1, vec![6, 6, 0]),
        (4, 5, 40, vec![2, 0, 2]),
    ];
    for (rows, extra, width, idx) in cases {
        let len = rows * width + extra;
        let (x, d_out) = (values(len, 9), values(idx.len() * width, 10));
        let gather = |d: &Device| {
            let (mut out, x, idx) =
                (d.upload(&values(d_out.len(), 11)).unwrap(), d.upload(&x).unwrap(), d.upload(&idx).unwrap());
            gather_rows(d, out.view_mut(), x.view(), idx.view(), width).unwrap();
            out.to_vec().unwrap()
        };
        let scatter = |d: &Device| {
            let (mut dx, d_out, idx) =
                (d.upload(&values(len, 12)).unwrap(), d.upload(&d_out).unwrap(), d.upload(&idx).unwrap());
            scatter_rows(d, dx.view_mut(), d_out.view(), idx.view(), width).unwrap();
            dx.to_vec().unwrap()
        };
        let what = format!("{rows} rows + {extra} of width {width}, indices {idx:?}");
        assert_same_bits(&format!("gather_rows {what}"), &gather(&Device::Cpu), &gather(&gpu));
        assert_same_bits(&format!("scatter_rows {what}"), &scatter(&Device::Cpu), &scatter(&gpu));
    }
}

/// Keep lists of `images` images of `patches` patches: ascending, of the given lengths (cycled).
fn keep_lists(images: usize, patches: usize, lengths: &[usize], seed: u64) -> Vec<Vec<u32>> {
    (0..images)
        .map(|b| {
            let len = lengths[b % lengths.len()].min(patches);
            // The `len` patches with the smallest random keys, in ascending order.
            let keys = values(patches, seed + b as u64);
            let mut order: Vec<u32> = (0..patches as u32).collect();
            order.sort_by(|&i, &j| keys[i as usize].total_cmp(&keys[j as usize]));
            let mut kept = order[..len].to_vec();
            kept.sort();
            kept
        })
        .collect()
}

/// gather_backward on `device` from the same state; returns d_tokens, d_cls, d_pos.
fn gather_back(device: &Device, lists: &[Vec<u32>], kept_len: &[u32], s: GatherShape) -> [Vec<f32>; 3] {
    let GatherShape { images: n, patches: l, dim, rows } = s;
    // The unused tail of each kept row holds garbage (5), as the masks' buffers may.
    let kept: Vec<u32> = lists.iter().flat_map(|k| k.iter().copied().chain(std::iter::repeat(5)).take(l)).collect();
    let up = |v: &[f32]| device.upload(v).unwrap();
    let (mut d_tokens, mut d_cls, mut d_pos) =
        (up(&values(n * l * dim, 13)), up(&values(dim, 14)), up(&values((l + 1) * dim, 15)));
    let d_packed = up(&values(n * rows * dim, 16));
    let (kept, kept_len) = (device.upload(&kept).unwrap(), device.upload(kept_len).unwrap());
    let idx = KeptIndices { kept: kept.view(), kept_len: kept_len.view() };
    gather_backward(device, d_tokens.view_mut(), d_cls.view_mut(), d_pos.view_mut(), d_packed.view(), idx, s).unwrap();
    [d_tokens, d_cls, d_pos].map(|b| b.to_vec().unwrap())
}

#[test]
fn gather_backward_equals_the_cpu_bit_for_bit() {
    let gpu = common::gpu();
    // (images, L, D, keep lengths, padding rows beyond the most kept): test-tiny (L 16, D 48)
    // with an image keeping no patch and one keeping all; ViT-B/16 (L 196, D 768) with N = 2 at
    // half masking, and keeping all / none; more images than a group of loads (8), and than a
    // tile (1024), with a width that is no multiple of a warp; one patch of width 1; nothing kept
    // at all.
    let cases: [(usize, usize, usize, &[usize], usize); 8] = [
        (4, 16, 48, &[0, 16, 8, 3], 0),
        (3, 16, 48, &[5, 2, 7], 4),
        (2, 196, 768, &[98, 61], 1),
        (2, 196, 768, &[196, 0], 0),
        (131, 9, 3, &[4, 0, 9, 7, 1], 0),
        (1030, 4, 3, &[2, 0, 4, 1, 3], 0),
        (3, 1, 1, &[1, 0, 1], 0),
        (2, 5, 130, &[0], 0),
    ];
    for (n, l, dim, lengths, extra) in cases {
        let lists = keep_lists(n, l, lengths, 17);
        let kept_len: Vec<u32> = lists.iter().map(|k| k.len() as u32).collect();
        let rows = *kept_len.iter().max().unwrap() as usize + 1 + extra;
        let s = GatherShape { images: n, patches: l, dim, rows };
        let (want, got) = (gather_back(&Device::Cpu, &lists, &kept_len, s), gather_back(&gpu, &lists, &kept_len, s));
        for (tensor, (w, g)) in ["d_tokens", "d_cls", "d_pos"].iter().zip(want.iter().zip(&got)) {
            assert_same_bits(&format!("N {n} L {l} D {dim} keeps {lengths:?}, rows {rows}: {tensor}"), w, g);
        }
    }
}

#[test]
fn hostile_indices_stay_in_bounds_on_the_gpu() {
    // Only the CPU device reads index data to refuse it; the kernels must neither fault nor read
    // outside their buffers (the emulator reports any out-of-bounds access as an error).
    let gpu = common::gpu();
    let (vocab, context, width) = (10, 4, 3);
    let ids = vec![1u32, 10, u32::MAX, 2, 0, 0, 9, 11];
    let [x, d_table, d_pos] = embedding(&gpu, &ids, vocab, context, width);
    let x_row = |r: usize| &x[r * width..(r + 1) * width];
    assert!(x_row(1).iter().chain(x_row(2)).chain(x_row(7)).all(|v| v.is_nan()), "{x:?}");
    assert!(x_row(0).iter().chain(x_row(3)).all(|v| v.is_finite()));
    // The bad ids' rows reach d_pos only: d_pos is the CPU's, d_table sums the good ids' rows.
    let good: Vec<u32> = ids.iter().map(|&i| if (i as usize) < vocab { i } else { 0 }).collect();
    let [_, _, want_pos] = embedding(&Device::Cpu, &good, vocab, context, width);
    assert_same_bits("d_pos", &want_pos, &d_pos);
    let (mut want_table, dx) = (values(vocab * width, 7), values(ids.len() * width, 5));
    for (r, &id) in ids.iter().enumerate().filter(|(_, i)| (**i as usize) < vocab) {
        (0..width).for_each(|c| want_table[id as usize * width + c] += dx[r * width + c]);
    }
    assert_same_bits("d_table", &want_table, &d_table);

    let (x, idx) = (gpu.upload(&values(12, 1)).unwrap(), gpu.upload(&[3u32, 4, u32::MAX, 0]).unwrap());
    let mut out = gpu.upload(&[0.0f32; 12]).unwrap();
    gather_rows(&gpu, out.view_mut(), x.view(), idx.view(), 3).unwrap();
    let out = out.to_vec().unwrap();
    assert!(out[3..9].iter().all(|v| v.is_nan()) && out[..3].iter().chain(&out[9..]).all(|v| v.is_finite()));
    let (mut dx, d_out) = (gpu.upload(&[1.0f32; 12]).unwrap(), gpu.upload(&values(12, 2)).unwrap());
    scatter_rows(&gpu, dx.view_mut(), d_out.view(), idx.view(), 3).unwrap();
    let (dx, d_out) = (dx.to_vec().unwrap(), d_out.to_vec().unwrap());
    assert_eq!((&dx[..3], &dx[9..]), (&d_out[9..], &d_out[..3]));
    assert!(dx[3..9].iter().all(|&v| v == 0.0));

    // Counts beyond rows − 1, indices ≥ L, not ascending, repeated.
    let (n, l, dim, rows) = (3, 4, 5, 3);
    let (kept, kept_len) =
        (gpu.upload(&[3u32, 1, 0, 2, 9, u32::MAX, 2, 2, 0, 1, 2, 3]).unwrap(), gpu.upload(&[4u32, 2, 1000]).unwrap());
    let up = |v: &[f32]| gpu.upload(v).unwrap();
    let (mut d_tokens, mut d_cls, mut d_pos) = (up(&values(n * l * dim, 3)), up(&[0.0; 5]), up(&[0.0; 25]));
    let idx = KeptIndices { kept: kept.view(), kept_len: kept_len.view() };
    let s = GatherShape { images: n, patches: l, dim, rows };
    let d_packed = up(&values(n * rows * dim, 4));
    gather_backward(&gpu, d_tokens.view_mut(), d_cls.view_mut(), d_pos.view_mut(), d_packed.view(), idx, s).unwrap();
}

#[test]
fn a_tensor_on_another_device_is_named() {
    let gpu = common::gpu();
    let (on_gpu, on_gpu4) = (gpu.upload(&[1.0f32; 8]).unwrap(), gpu.upload(&[1.0f32; 4]).unwrap());
    let (ids_cpu, ids_gpu) = (Buffer::Cpu(vec![1u32, 0]), gpu.upload(&[1u32, 0]).unwrap());
    let (mut x, mut d_pos) = (gpu.upload(&[0.0f32; 4]).unwrap(), gpu.upload(&[0.0f32; 4]).unwrap());
    let expect = |e: clip_pgs_host::Error, what: &str| {
        let e = e.to_string();
        assert!(e.contains(&format!("{what} is on the cpu device, the op runs on")), "{e}");
    };
    let table_cpu = Buffer::Cpu(vec![0.0f32; 8]);
    let e = embedding_forward(&gpu, x.view_mut(), ids_gpu.view(), table_cpu.view(), on_gpu4.view(), 2);
    expect(e.unwrap_err(), "embedding_forward: table");
    let mut d_table = gpu.upload(&[0.0f32; 8]).unwrap();
    let e = embedding_backward(&gpu, d_table.view_mut(), d_pos.view_mut(), x.view(), ids_cpu.view(), 2);
    expect(e.unwrap_err(), "embedding_backward: ids");
    let images = Buffer::Cpu(vec![0.0f32; 12]);
    let mut patches = gpu.upload(&[0.0f32; 12]).unwrap();
    expect(patchify(&gpu, patches.view_mut(), images.view(), 2, 1).unwrap_err(), "patchify: images");
    let mut rows = Buffer::Cpu(vec![0u32; 1]);
    expect(eot_rows(&gpu, rows.view_mut(), ids_gpu.view(), 2).unwrap_err(), "eot_rows: rows");
    expect(gather_rows(&gpu, x.view_mut(), on_gpu.view(), ids_cpu.view(), 2).unwrap_err(), "gather_rows: rows");
    let d_out = Buffer::Cpu(vec![0.0f32; 4]);
    expect(scatter_rows(&gpu, x.view_mut(), d_out.view(), ids_gpu.view(), 2).unwrap_err(), "scatter_rows: d_out");
    let (kept, kept_len) = (gpu.upload(&[0u32, 1]).unwrap(), Buffer::Cpu(vec![1u32]));
    let idx = KeptIndices { kept: kept.view(), kept_len: kept_len.view() };
    let s = GatherShape { images: 1, patches: 2, dim: 2, rows: 2 };
    let mut d_cls = gpu.upload(&[0.0f32; 2]).unwrap();
    let mut d_pos6 = gpu.upload(&[0.0f32; 6]).unwrap();
    let e = gather_backward(&gpu, x.view_mut(), d_cls.view_mut(), d_pos6.view_mut(), on_gpu4.view(), idx, s);
    expect(e.unwrap_err(), "gather_backward: kept_len");
}

// ---- bf16 ----

/// Values as bf16 holds them.
fn exact(n: usize, seed: u64) -> Vec<f32> {
    common::rounded(&values(n, seed))
}

/// The GPU's bf16 values are the CPU's f32 results rounded once (exact for copies).
fn assert_rounded_cpu(what: &str, cpu: &[f32], gpu: &[f32]) {
    assert_same_bits(what, &common::rounded(cpu), gpu);
}

fn patchify_as<T: Activation>(d: &Device, images: &[f32], size: usize, patch: usize) -> Vec<f32> {
    let (mut patches, images) = (common::upload_as::<T>(d, &exact(images.len(), 2)), common::upload_as::<T>(d, images));
    patchify(d, patches.view_mut(), images.view(), size, patch).unwrap();
    common::download(&patches)
}

#[test]
fn patchify_in_bf16_copies_exactly() {
    let gpu = common::gpu();
    for (n, size, patch) in [(3, 32, 8), (2, 28, 14), (1, 4, 1)] {
        let images = exact(n * 3 * size * size, 1);
        let (want, got) =
            (patchify_as::<f32>(&Device::Cpu, &images, size, patch), patchify_as::<bf16>(&gpu, &images, size, patch));
        assert_rounded_cpu(&format!("bf16 patchify N {n} S {size} p {patch}"), &want, &got);
    }
}

#[test]
fn token_embedding_in_bf16_equals_the_cpu_after_rounding() {
    let gpu = common::gpu();
    let cases = [
        ("test-tiny", captions(&[3, 20, 0, 7, 1], 16, 1), VOCAB, 16, 32),
        ("width 33", captions(&[5, 0, 2, 9, 14, 3, 3, 1, 0], 16, 3), VOCAB, 16, 33),
    ];
    for (name, ids, vocab, context, width) in cases {
        let want = embedding_as::<f32, bf16>(&Device::Cpu, &ids, vocab, context, width);
        let got = embedding_as::<bf16, bf16>(&gpu, &ids, vocab, context, width);
        // x = table + pos in f32, rounded once.
        assert_rounded_cpu(&format!("bf16 {name}: x"), &want[0], &got[0]);
        // The f32 gradients add the same widened rows in the same order.
        assert_same_bits(&format!("bf16 {name}: d_table"), &want[1], &got[1]);
        assert_same_bits(&format!("bf16 {name}: d_pos"), &want[2], &got[2]);
    }
}

fn gather_scatter_as<T: Activation>(d: &Device, x: &[f32], d_out: &[f32], idx: &[u32], width: usize) -> [Vec<f32>; 2] {
    let (x, d_out, idx) = (common::upload_as::<T>(d, x), common::upload_as::<T>(d, d_out), d.upload(idx).unwrap());
    let mut out = common::upload_as::<T>(d, &exact(d_out.len(), 11));
    let mut dx = common::upload_as::<T>(d, &exact(x.len(), 12));
    gather_rows(d, out.view_mut(), x.view(), idx.view(), width).unwrap();
    scatter_rows(d, dx.view_mut(), d_out.view(), idx.view(), width).unwrap();
    [common::download(&out), common::download(&dx)]
}

#[test]
fn gather_and_scatter_rows_in_bf16_copy_exactly() {
    let gpu = common::gpu();
    for (rows, extra, width, idx) in [(10, 0, 33, vec![9u32, 0, 3, 3, 9, 1]), (4, 5, 40, vec![2, 0, 2])] {
        let len = rows * width + extra;
        let (x, d_out) = (exact(len, 9), exact(idx.len() * width, 10));
        let want = gather_scatter_as::<f32>(&Device::Cpu, &x, &d_out, &idx, width);
        let got = gather_scatter_as::<bf16>(&gpu, &x, &d_out, &idx, width);
        assert_rounded_cpu(&format!("bf16 gather_rows {idx:?}"), &want[0], &got[0]);
        assert_rounded_cpu(&format!("bf16 scatter_rows {idx:?}"), &want[1], &got[1]);
    }
}

/// gather_backward with d_tokens and d_packed of type T (values bf16 holds), d_cls and d_pos f32.
fn gather_back_as<T: Activation>(
    device: &Device,
    lists: &[Vec<u32>],
    kept_len: &[u32],
    s: GatherShape,
) -> [Vec<f32>; 3] {
    let GatherShape { images: n, patches: l, dim, rows } = s;
    let kept: Vec<u32> = lists.iter().flat_map(|k| k.iter().copied().chain(std::iter::repeat(5)).take(l)).collect();
    let mut d_tokens = common::upload_as::<T>(device, &exact(n * l * dim, 13));
    let (mut d_cls, mut d_pos) =
        (device.upload(&values(dim, 14)).unwrap(), device.upload(&values((l + 1) * dim, 15)).unwrap());
    let d_packed = common::upload_as::<T>(device, &exact(n * rows * dim, 16));
    let (kept, kept_len) = (device.upload(&kept).unwrap(), device.upload(kept_len).unwrap());
    let idx = KeptIndices { kept: kept.view(), kept_len: kept_len.view() };
    gather_backward(device, d_tokens.view_mut(), d_cls.view_mut(), d_pos.view_mut(), d_packed.view(), idx, s).unwrap();
    [common::download(&d_tokens), d_cls.to_vec().unwrap(), d_pos.to_vec().unwrap()]
}

#[test]
fn gather_backward_in_bf16_equals_the_cpu_bit_for_bit() {
    let gpu = common::gpu();
    let cases: [(usize, usize, usize, &[usize], usize); 3] =
        [(4, 16, 48, &[0, 16, 8, 3], 0), (2, 196, 768, &[98, 61], 1), (131, 9, 3, &[4, 0, 9, 7, 1], 0)];
    for (n, l, dim, lengths, extra) in cases {
        let lists = keep_lists(n, l, lengths, 17);
        let kept_len: Vec<u32> = lists.iter().map(|k| k.len() as u32).collect();
        let rows = *kept_len.iter().max().unwrap() as usize + 1 + extra;
        let s = GatherShape { images: n, patches: l, dim, rows };
        let want = gather_back_as::<f32>(&Device::Cpu, &lists, &kept_len, s);
        let got = gather_back_as::<bf16>(&gpu, &lists, &kept_len, s);
        let at = format!("bf16 N {n} L {l} D {dim} keeps {lengths:?}");
        // d_tokens copies bf16 rows; d_cls and d_pos add the same widened rows in the same order.
        assert_rounded_cpu(&format!("{at}: d_tokens"), &want[0], &got[0]);
        assert_same_bits(&format!("{at}: d_cls"), &want[1], &got[1]);
        assert_same_bits(&format!("{at}: d_pos"), &want[2], &got[2]);
    }
}
