//! The PGS pipeline on a GPU device against the CPU reference: identical masks, bit for bit, for
//! every mode, ablation and baseline, f32 and bf16 (emulator in `cargo test`, CUDA with
//! `CLIP_PGS_TEST_DEVICE=cuda`).

mod common;

use clip_pgs_host::ops::edge_map::ImageBatchShape;
use clip_pgs_host::ops::pgs::gather::{GatherShape, KeptIndices, gather};
use clip_pgs_host::ops::pgs::{MaskBuffers, MaskRatio, MaskRequest, MaskStep, Masking, PgsConfig, PgsMode, pgs_mask};
use clip_pgs_host::{Buffer, Device, bf16};
use clip_pgs_kernels::philox::Philox;
use common::{noise_batch, photo_batch};

fn maskings() -> Vec<Masking> {
    let mut all = vec![Masking::None, Masking::Flip { ratio: 0.5 }];
    for mode in [PgsMode::Paper, PgsMode::Reference] {
        for ratio in [MaskRatio::Fixed(0.5), MaskRatio::Dynamic { min: 0.3, max: 0.5 }] {
            for (use_ed, use_otn) in [(true, true), (false, true), (true, false), (false, false)] {
                all.push(Masking::Pgs(PgsConfig { mode, ratio, use_ed, use_otn }));
            }
        }
    }
    all
}

fn tokens_for(shape: ImageBatchShape, patches: usize, dim: usize) -> Vec<f32> {
    let rng = Philox::new(99, 0, 0);
    (0..(shape.n * patches * dim) as u32).map(|i| rng.uniform(i) - 0.5).collect()
}

fn compare<T: clip_pgs_host::ops::edge_map::ImageElement>(
    gpu: &Device,
    images: &[T],
    shape: ImageBatchShape,
    patch: usize,
    tokens: Option<&[T]>,
    dim: usize,
    what: &str,
) {
    // A batch that starts at image 3 of the global batch: the kernels count images from there.
    let at = MaskStep { seed: 42, step: 7, first: 3, epoch: if tokens.is_some() { 5 } else { 0 }, epochs: 32 };
    let gpu_images = gpu.upload(images).unwrap();
    let gpu_tokens = tokens.map(|t| gpu.upload(t).unwrap());
    let cpu_images = Buffer::Cpu(images.to_vec());
    let cpu_tokens = tokens.map(|t| Buffer::Cpu(t.to_vec()));
    for masking in maskings() {
        let request = MaskRequest { shape, patch, masking, at };
        let got = pgs_mask(gpu, &request, &gpu_images, gpu_tokens.as_ref().map(|t| (t, dim)))
            .and_then(|m| m.to_masks())
            .unwrap_or_else(|e| panic!("{what} {masking:?}: {e}"));
        let want = pgs_mask(&Device::Cpu, &request, &cpu_images, cpu_tokens.as_ref().map(|t| (t, dim)))
            .unwrap()
            .to_masks()
            .unwrap();
        assert_eq!(got, want, "{what} {masking:?}: GPU masks differ from the CPU reference");
    }
    println!("{what}: {} maskings identical on GPU and CPU", maskings().len());
}

#[test]
fn gpu_masks_equal_cpu_masks_on_real_photos() {
    let gpu = common::gpu();
    let (images, shape) = photo_batch(224);
    compare(&gpu, &images, shape, 16, None, 0, "photos f32");
    let bf: Vec<bf16> = images.iter().map(|&v| bf16::from_f32(v)).collect();
    compare(&gpu, &bf, shape, 16, None, 0, "photos bf16");
    let tokens = tokens_for(shape, 196, 32);
    compare(&gpu, &images, shape, 16, Some(&tokens), 32, "photos f32 + tokens (epoch 5)");
}

#[test]
fn gpu_masks_equal_cpu_masks_on_other_shapes() {
    let gpu = common::gpu();
    for (n, h, w, p) in [(9, 64, 48, 8), (4, 28, 28, 2), (2, 32, 32, 4)] {
        let shape = ImageBatchShape { n, height: h, width: w };
        let images = noise_batch(shape, n as u64);
        compare(&gpu, &images, shape, p, None, 0, &format!("noise {n}×{h}×{w}/{p}"));
    }
}

#[test]
fn gpu_gather_equals_cpu_gather() {
    let gpu = common::gpu();
    let (images, shape) = photo_batch(224);
    let masking = Masking::Pgs(PgsConfig {
        mode: PgsMode::Paper,
        ratio: MaskRatio::Dynamic { min: 0.3, max: 0.5 },
        use_ed: true,
        use_otn: true,
    });
    let at = MaskStep { seed: 1, step: 0, first: 0, epoch: 0, epochs: 1 };
    let (dim, l) = (24, 196);
    let x = tokens_for(shape, l, dim);
    let cls: Vec<f32> = (0..dim).map(|d| d as f32).collect();
    let MaskBuffers::Gpu(device_masks) =
        pgs_mask(&gpu, &MaskRequest { shape, patch: 16, masking, at }, &gpu.upload(&images).unwrap(), None).unwrap()
    else {
        panic!("masks should be on the GPU")
    };
    let masks = device_masks.to_masks().unwrap();
    let s = GatherShape { images: shape.n, patches: l, dim, rows: masks.max_kept() + 1 };
    // The same gather on the CPU device, from the masks copied to the host.
    let cpu = Device::Cpu;
    let kept: Vec<u32> =
        masks.images.iter().flat_map(|m| (0..l).map(|j| m.kept.get(j).copied().unwrap_or(0))).collect();
    let kept_len: Vec<u32> = masks.images.iter().map(|m| m.kept.len() as u32).collect();
    let run = |device: &Device, kept: &Buffer<u32>, kept_len: &Buffer<u32>| {
        let (x, cls) = (device.upload(&x).unwrap(), device.upload(&cls).unwrap());
        let mut packed = device.alloc_zeros::<f32>(shape.n * s.rows * dim, "packed").unwrap();
        let mut lengths = device.alloc_zeros::<u32>(shape.n, "lengths").unwrap();
        let idx = KeptIndices { kept: kept.view(), kept_len: kept_len.view() };
        gather(device, packed.view_mut(), lengths.view_mut(), x.view(), cls.view(), idx, s).unwrap();
        (packed.to_vec().unwrap(), lengths.to_vec().unwrap())
    };
    let want = run(&cpu, &cpu.upload(&kept).unwrap(), &cpu.upload(&kept_len).unwrap());
    let got = run(&gpu, &device_masks.kept, &device_masks.kept_len);
    assert_eq!(got, want);
    assert!(want.1.iter().zip(&masks.images).all(|(&len, m)| len as usize == m.kept.len() + 1));
}

#[test]
fn gpu_reports_non_finite_pixels_as_an_error() {
    let gpu = common::gpu();
    let (mut images, shape) = photo_batch(64);
    images[shape.image_len() + 100] = f32::NAN;
    let masking = Masking::Pgs(PgsConfig::default());
    let at = MaskStep { seed: 0, step: 0, first: 0, epoch: 0, epochs: 1 };
    let request = MaskRequest { shape, patch: 16, masking, at };
    let masks = pgs_mask(&gpu, &request, &gpu.upload(&images).unwrap(), None).unwrap();
    let error = masks.to_masks().expect_err("NaN pixels must be an error").to_string();
    assert!(error.contains("image 1 has non-finite pixels"), "{error}");
}

/// On the emulator, the threads of each block run in the opposite order: the masks (and the
/// absence of race reports) must not depend on scheduling.
#[test]
fn emulated_masks_do_not_depend_on_the_thread_order() {
    use clip_pgs_host::emu::EmuRuntime;
    use clip_pgs_kernels::hw::emu::{Options, Order};
    if !matches!(common::gpu(), Device::Emu(_)) {
        return; // a real GPU has its own order; the other tests cover it
    }
    let reversed = Device::Emu(EmuRuntime::new(Options { order: Order::Reverse, ..Options::default() }));
    let (images, shape) = photo_batch(64);
    compare(&reversed, &images, shape, 16, None, 0, "photos 64 f32, threads in reverse order");
}
