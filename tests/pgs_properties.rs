//! Properties of the PGS masks (pgs-spec.md) on real photos, for every mode and baseline.

mod common;

use clip_pgs_host::ops::edge_map::{ImageBatchShape, PatchGrid, edge_map_cpu};
use clip_pgs_host::ops::pgs::gather::{GatherShape, KeptIndices, gather};
use clip_pgs_host::ops::pgs::patches::{StandardizedPatches, similarity};
use clip_pgs_host::ops::pgs::select::top_k;
use clip_pgs_host::ops::pgs::{
    MaskRatio, MaskRequest, MaskStep, Masking, Masks, PatchTokens, PgsConfig, PgsMode, mask_cpu,
};
use clip_pgs_host::{Buffer, Device};
use clip_pgs_kernels::philox::Philox;
use clip_pgs_kernels::select::{gumbel_key, paper_candidate_count};
use common::photo_batch;

const L: usize = 196;

fn step(seed: u64) -> MaskStep {
    MaskStep { seed, step: 3, first: 0, epoch: 0, epochs: 32 }
}

fn pgs(mode: PgsMode, ratio: MaskRatio) -> Masking {
    Masking::Pgs(PgsConfig { mode, ratio, use_ed: true, use_otn: true })
}

fn masks(masking: Masking, seed: u64) -> Masks {
    let (images, shape) = photo_batch(224);
    mask_cpu(&MaskRequest { shape, patch: 16, masking, at: step(seed) }, &images, None).unwrap()
}

fn all_maskings() -> Vec<Masking> {
    vec![
        Masking::None,
        Masking::Flip { ratio: 0.5 },
        pgs(PgsMode::Paper, MaskRatio::Fixed(0.5)),
        pgs(PgsMode::Paper, MaskRatio::Dynamic { min: 0.3, max: 0.5 }),
        pgs(PgsMode::Reference, MaskRatio::Fixed(0.5)),
        pgs(PgsMode::Reference, MaskRatio::Fixed(0.3)),
    ]
}

#[test]
fn mask_counts_are_as_specified_per_mode() {
    for masking in all_maskings() {
        let m = masks(masking, 1);
        let kept: Vec<usize> = m.images.iter().map(|i| i.kept.len()).collect();
        match masking {
            Masking::None => assert!(kept.iter().all(|&k| k == L)),
            Masking::Flip { .. } => assert!(kept.iter().all(|&k| k == L - 98), "{kept:?}"),
            Masking::Pgs(PgsConfig { mode: PgsMode::Paper, ratio: MaskRatio::Fixed(_), .. }) => {
                assert!(kept.iter().all(|&k| k == L - 98), "floor(0.5·196) = 98 masked: {kept:?}")
            }
            Masking::Pgs(PgsConfig { mode: PgsMode::Paper, .. }) => {
                assert!(kept.iter().all(|&k| (L - 98..=L - 58).contains(&k)), "dynamic: 58..=98 masked: {kept:?}")
            }
            Masking::Pgs(cfg) => {
                // One K for the whole batch, at most floor(L·(1 − r_min)).
                let cap = (L as f64 * (1.0 - cfg.ratio.min() as f64)).floor() as usize;
                assert!(kept.iter().all(|&k| k == kept[0] && k <= cap), "reference: {kept:?}, cap {cap}");
            }
        }
    }
}

#[test]
fn kept_indices_are_sorted_unique_and_paper_candidates_always_masked() {
    for masking in all_maskings() {
        for seed in 0..4 {
            let m = masks(masking, seed);
            for image in &m.images {
                assert!(image.kept.windows(2).all(|w| w[0] < w[1]), "{masking:?}: not sorted and unique");
                assert!(image.kept.iter().all(|&j| (j as usize) < L));
                if let Masking::Pgs(PgsConfig { mode: PgsMode::Paper, .. }) = masking {
                    assert_eq!(image.candidates.len(), paper_candidate_count(L));
                    assert!(image.candidates.iter().all(|c| !image.kept.contains(c)), "a candidate was kept");
                }
            }
        }
    }
}

#[test]
fn gather_keeps_cls_first_and_the_kept_tokens_in_order() {
    let m = masks(pgs(PgsMode::Paper, MaskRatio::Dynamic { min: 0.3, max: 0.5 }), 5);
    let (dim, n) = (4, m.images.len());
    // Token (image i, patch j) holds the value 1000·i + 1 + j, CLS 0.
    let x: Vec<f32> = (0..n).flat_map(|i| (0..L).flat_map(move |j| [(1000 * i + 1 + j) as f32; 4])).collect();
    let kept: Vec<u32> = m.images.iter().flat_map(|im| (0..L).map(|j| im.kept.get(j).copied().unwrap_or(0))).collect();
    let kept_len: Vec<u32> = m.images.iter().map(|im| im.kept.len() as u32).collect();
    let rows = m.max_kept() + 1;
    let (x, cls, kept, kept_len) =
        (Buffer::Cpu(x), Buffer::Cpu(vec![0.0f32; dim]), Buffer::Cpu(kept), Buffer::Cpu(kept_len));
    let (mut packed, mut lengths) = (Buffer::Cpu(vec![0.0f32; n * rows * dim]), Buffer::Cpu(vec![0u32; n]));
    let idx = KeptIndices { kept: kept.view(), kept_len: kept_len.view() };
    let shape = GatherShape { images: n, patches: L, dim, rows };
    gather(&Device::Cpu, packed.view_mut(), lengths.view_mut(), x.view(), cls.view(), idx, shape).unwrap();
    let (packed, lengths) = (packed.to_vec().unwrap(), lengths.to_vec().unwrap());
    for (i, image) in m.images.iter().enumerate() {
        let row = |r: usize| packed[(i * rows + r) * dim];
        assert_eq!(row(0), 0.0, "CLS first");
        assert_eq!(lengths[i] as usize, image.kept.len() + 1);
        for (r, &j) in image.kept.iter().enumerate() {
            assert_eq!(row(1 + r), (1000 * i + 1 + j as usize) as f32);
        }
        assert!((image.kept.len() + 1..rows).all(|r| row(r) == 0.0), "padding is zero");
    }
}

#[test]
fn masks_are_deterministic_for_a_seed_and_change_with_it() {
    for masking in all_maskings().into_iter().skip(1) {
        assert_eq!(masks(masking, 7), masks(masking, 7), "{masking:?}");
        assert_ne!(masks(masking, 7), masks(masking, 8), "{masking:?}");
    }
}

#[test]
fn with_the_edge_map_the_strongest_edges_are_masked_far_less_often_than_under_flip() {
    let (images, shape) = photo_batch(224);
    let grid = PatchGrid::new(224, 224, 16).unwrap();
    let edges = edge_map_cpu(&images, shape, grid);
    let top: Vec<Vec<usize>> = (0..shape.n).map(|n| top_k(&edges[n * L..(n + 1) * L], None, L / 10)).collect();
    let rate = |masking: Masking| {
        let (mut masked, mut total) = (0, 0);
        for seed in 0..40 {
            let m =
                mask_cpu(&MaskRequest { shape, patch: 16, masking, at: step(seed) }, &images, None).unwrap().masked();
            for n in 0..shape.n {
                masked += top[n].iter().filter(|&&j| m[n][j]).count();
                total += top[n].len();
            }
        }
        masked as f64 / total as f64
    };
    let (flip, paper) = (rate(Masking::Flip { ratio: 0.5 }), rate(pgs(PgsMode::Paper, MaskRatio::Fixed(0.5))));
    println!("top-10% edge patches masked: FLIP {flip:.3}, PGS paper {paper:.3}");
    assert!((flip - 0.5).abs() < 0.1, "FLIP masks uniformly: {flip}");
    assert!(paper < 0.5 * flip, "PGS with ED should protect edges: {paper} vs FLIP {flip}");
}

#[test]
fn without_otn_the_mask_is_the_spec_formula_without_that_step() {
    let (images, shape) = photo_batch(224);
    let grid = PatchGrid::new(224, 224, 16).unwrap();
    let cfg = PgsConfig { mode: PgsMode::Paper, ratio: MaskRatio::Fixed(0.5), use_ed: true, use_otn: false };
    let at = step(11);
    let got = mask_cpu(&MaskRequest { shape, patch: 16, masking: Masking::Pgs(cfg), at }, &images, None).unwrap();
    let edges = edge_map_cpu(&images, shape, grid);
    for n in 0..shape.n {
        let e = &edges[n * L..(n + 1) * L];
        let rng = Philox::new(at.seed, at.step, n as u32);
        // Step 2: Gumbel-top-k; step 3: S; step 5 with Ŝ = S: μ_j = max_c S[c,j]·(1 − E_j).
        let keys: Vec<f32> = (0..L).map(|i| gumbel_key(e[i], rng.uniform(i as u32))).collect();
        let candidates = top_k(&keys, None, paper_candidate_count(L));
        let image = &images[n * shape.image_len()..(n + 1) * shape.image_len()];
        let s = similarity(&StandardizedPatches::new(image, 224, 224, grid), None, &candidates, 0.0);
        let mut mu: Vec<f32> = (0..L)
            .map(|j| candidates.iter().enumerate().map(|(c, _)| s[c * L + j]).fold(f32::MIN, f32::max) * (1.0 - e[j]))
            .collect();
        candidates.iter().for_each(|&c| mu[c] = f32::INFINITY);
        let jitter: Vec<u32> = (0..L).map(|j| rng.bits((L + j) as u32)).collect();
        let masked = top_k(&mu, Some(&jitter), 98);
        let kept: Vec<u32> = (0..L as u32).filter(|j| !masked.contains(&(*j as usize))).collect();
        assert_eq!(got.images[n].kept, kept, "image {n}");
    }
}

/// A data-parallel rank masks its part of the global batch: images k.. of a batch drawn from
/// `first` = k get the masks the whole batch gives them, for every method but `reference`
/// (whose keep count is a minimum over the batch); drawn from 0, they do not.
#[test]
fn a_batch_part_drawn_from_its_offset_gets_the_whole_batch_masks() {
    let (images, shape) = photo_batch(224);
    let k = shape.n / 2;
    let tail = ImageBatchShape { n: shape.n - k, ..shape };
    let reference = |m: &Masking| matches!(m, Masking::Pgs(PgsConfig { mode: PgsMode::Reference, .. }));
    for masking in all_maskings().into_iter().filter(|m| !reference(m)) {
        let whole = masks(masking, 1);
        let part = |first: u32| {
            let request = MaskRequest { shape: tail, patch: 16, masking, at: MaskStep { first, ..step(1) } };
            mask_cpu(&request, &images[k * shape.image_len()..], None).unwrap().images
        };
        assert_eq!(part(k as u32), whole.images[k..], "{masking:?}");
        if masking != Masking::None {
            assert_ne!(part(0), whole.images[k..], "{masking:?}");
        }
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let (mut images, shape) = photo_batch(64);
    let masking = pgs(PgsMode::Paper, MaskRatio::Fixed(0.5));
    let error = |images: &[f32],
                 shape: ImageBatchShape,
                 patch: usize,
                 masking: Masking,
                 tokens: Option<PatchTokens>,
                 at: MaskStep| {
        mask_cpu(&MaskRequest { shape, patch, masking, at }, images, tokens).expect_err("should fail").to_string()
    };
    assert!(error(&images, shape, 24, masking, None, step(0)).contains("does not divide"));
    let empty = ImageBatchShape { n: 1, height: 0, width: 64 };
    assert!(error(&[], empty, 16, masking, None, step(0)).contains("empty"));
    assert!(
        error(&images, shape, 16, pgs(PgsMode::Paper, MaskRatio::Fixed(1.2)), None, step(0)).contains("mask 19 of 16")
    );
    assert!(error(&images, shape, 16, Masking::Flip { ratio: -0.1 }, None, step(0)).contains("outside [0, 1]"));
    let later = MaskStep { epoch: 3, ..step(0) };
    assert!(error(&images, shape, 16, masking, None, later).contains("no patch tokens"));
    let tokens = vec![0.0f32; 10];
    let wrong = Some(PatchTokens { tokens: &tokens, dim: 8 });
    assert!(error(&images, shape, 16, masking, wrong, later).contains("patch tokens have 10 elements"));
    images[2 * shape.image_len() + 64 * 64 + 5] = f32::NAN;
    assert!(
        error(&images, shape, 16, masking, None, step(0))
            .contains("image 2 has a non-finite pixel (NaN) at channel 1, y 0, x 5")
    );
}
