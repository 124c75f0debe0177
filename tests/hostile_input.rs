//! Hostile bytes for every parser: arbitrary bytes and mutated valid files (bytes overwritten,
//! files cut short) go through the IDX reader, the webdataset tar scanner, the CSV source, image
//! decoding through the loader, safetensors checkpoints, the model-config JSON and the tokenizer.
//! Each must give an error or a skip, never a panic, and never an allocation that follows a
//! length field rather than the bytes that are there: a counting allocator records the largest
//! single allocation of the test's thread, and headers claiming 2^32 images, a 2^40-byte tar
//! member or a 2^40-byte safetensors header must leave it small.
//!
//! CI runs proptest's 256 cases per property (the file takes seconds); for a longer search:
//! `PROPTEST_CASES=100000 cargo test --release --test hostile_input`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Cursor, Write};
use std::path::Path;
use std::sync::OnceLock;

use clip_pgs_model::checkpoint;
use clip_pgs_model::config::ClipConfig;
use clip_pgs_model::data::csv::CsvSource;
use clip_pgs_model::data::fashion_mnist::FashionMnist;
use clip_pgs_model::data::loader::prepare;
use clip_pgs_model::data::wds::WdsSource;
use clip_pgs_model::data::{Source, SourceOptions, Split, decode_image};
use clip_pgs_model::params::Params;
use clip_pgs_model::preprocess::resize_center_crop;
use clip_pgs_model::tokenizer::ClipTokenizer;
use image::{ImageFormat, Rgb, RgbImage};
use proptest::prelude::*;
use proptest::sample::Index;

/// The system allocator, recording the largest single allocation per thread.
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the thread-local may already be gone while a thread shuts down.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Far above what these small inputs need, far below what their length fields claim.
const ALLOCATION_CAP: usize = 16 << 20;

/// Runs `f` and fails if it made an allocation over [`ALLOCATION_CAP`].
fn bounded<T>(what: &str, f: impl FnOnce() -> T) -> T {
    LARGEST.with(|l| l.set(0));
    let out = f();
    let largest = LARGEST.with(Cell::get);
    assert!(largest <= ALLOCATION_CAP, "{what}: allocated {largest} bytes at once");
    out
}

/// proptest's default: 256 cases per property, or `PROPTEST_CASES`. A failure prints its minimal
/// input; no regression files are written into the tree.
fn config() -> ProptestConfig {
    ProptestConfig { failure_persistence: None, ..ProptestConfig::default() }
}

/// Overwrites (position, byte) pairs and optionally cuts the result short.
fn mutate(base: &[u8], edits: &[(Index, u8)], cut: Option<Index>) -> Vec<u8> {
    let mut bytes = base.to_vec();
    for (at, b) in edits {
        let i = at.index(bytes.len());
        bytes[i] = *b;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len() + 1));
    }
    bytes
}

fn edits() -> impl Strategy<Value = (Vec<(Index, u8)>, Option<Index>)> {
    (prop::collection::vec((any::<Index>(), any::<u8>()), 0..12), any::<Option<Index>>())
}

fn encoded(format: ImageFormat) -> Vec<u8> {
    let image = RgbImage::from_fn(12, 9, |x, y| Rgb([(x * 20) as u8, (y * 25) as u8, 90]));
    let mut bytes = Vec::new();
    image.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
    bytes
}

fn png() -> &'static [u8] {
    static PNG: OnceLock<Vec<u8>> = OnceLock::new();
    PNG.get_or_init(|| encoded(ImageFormat::Png))
}

fn jpeg() -> &'static [u8] {
    static JPEG: OnceLock<Vec<u8>> = OnceLock::new();
    JPEG.get_or_init(|| encoded(ImageFormat::Jpeg))
}

/// A two-sample webdataset shard.
fn shard() -> &'static [u8] {
    static TAR: OnceLock<Vec<u8>> = OnceLock::new();
    TAR.get_or_init(|| {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in [("a.png", png()), ("a.txt", b"a thing".as_slice()), ("b.txt", b"b"), ("b.jpg", jpeg())] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, data).unwrap();
        }
        builder.into_inner().unwrap()
    })
}

/// Every sample of a source, decoded and preprocessed as the loader does.
fn read_all(source: &dyn Source) {
    for i in 0..source.len() {
        let _ = prepare(source, i, 16);
    }
}

fn wds(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shard.tar");
    std::fs::write(&path, bytes).unwrap();
    bounded("wds", || {
        if let Ok(source) = WdsSource::open(path.to_str().unwrap()) {
            read_all(&source);
        }
    });
}

fn gz(path: &Path, bytes: &[u8]) {
    let mut encoder = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), Default::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap();
}

/// A valid IDX pair of `n` 28×28 images.
fn idx(n: u32) -> (Vec<u8>, Vec<u8>) {
    let mut images = [2051u32, n, 28, 28].iter().flat_map(|w| w.to_be_bytes()).collect::<Vec<u8>>();
    images.extend((0..n as usize * 784).map(|i| (i % 251) as u8));
    let mut labels = [2049u32, n].iter().flat_map(|w| w.to_be_bytes()).collect::<Vec<u8>>();
    labels.extend((0..n).map(|i| (i % 10) as u8));
    (images, labels)
}

fn fashion_mnist(images: &[u8], labels: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    gz(&dir.path().join("train-images-idx3-ubyte.gz"), images);
    gz(&dir.path().join("train-labels-idx1-ubyte.gz"), labels);
    bounded("idx", || {
        if let Ok(source) = FashionMnist::open(dir.path().to_str(), Split::Train) {
            read_all(&source);
        }
    });
}

fn csv(table: &[u8], image: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.png"), image).unwrap();
    let file = dir.path().join("data.tsv");
    std::fs::write(&file, table).unwrap();
    bounded("csv", || {
        if let Ok(source) = CsvSource::open(file.to_str().unwrap(), &SourceOptions::default()) {
            read_all(&source);
        }
    });
}

/// A model small enough that its checkpoint is a few kilobytes.
const MICRO: &str = r#"{"embed_dim": 8,
  "vision_cfg": {"image_size": 8, "patch_size": 4, "width": 8, "layers": 1, "head_width": 4},
  "text_cfg": {"context_length": 4, "vocab_size": 16, "width": 8, "heads": 2, "layers": 1}}"#;

fn micro_checkpoint() -> &'static [u8] {
    static CKPT: OnceLock<Vec<u8>> = OnceLock::new();
    CKPT.get_or_init(|| {
        let cfg = ClipConfig::from_json(MICRO).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        checkpoint::save(
            &path,
            &serde_json::to_string(&cfg).unwrap(),
            &Params::init(&cfg, 0, &clip_pgs_host::Device::Cpu).unwrap(),
        )
        .unwrap();
        std::fs::read(path).unwrap()
    })
}

fn safetensors(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    std::fs::write(&path, bytes).unwrap();
    bounded("safetensors", || {
        let _ = checkpoint::load(&path, None);
        let _ = checkpoint::load_training(&path);
    });
}

fn tokenizer() -> &'static ClipTokenizer {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| ClipTokenizer::new().unwrap())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn tar_shards(bytes in prop::collection::vec(any::<u8>(), 0..2048), (e, cut) in edits()) {
        wds(&bytes);
        wds(&mutate(shard(), &e, cut));
    }

    #[test]
    fn idx_files(bytes in prop::collection::vec(any::<u8>(), 0..64), (e, cut) in edits(), n in 0u32..4) {
        let (images, labels) = idx(n);
        fashion_mnist(&bytes, &labels);
        fashion_mnist(&mutate(&images, &e, cut), &labels);
        fashion_mnist(&images, &mutate(&labels, &e, cut));
    }

    #[test]
    fn csv_tables_and_their_images(
        table in prop::collection::vec(any::<u8>(), 0..256),
        (e, cut) in edits(),
        jpeg_not_png: bool,
    ) {
        let good = b"filepath\ttitle\na.png\ta thing\n";
        csv(&table, png());
        csv(&mutate(good, &e, cut), png());
        csv(good, &mutate(if jpeg_not_png { jpeg() } else { png() }, &e, cut));
    }

    #[test]
    fn image_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512), (e, cut) in edits()) {
        bounded("image", || {
            let _ = decode_image(&bytes);
            let _ = decode_image(&mutate(png(), &e, cut));
            let _ = decode_image(&mutate(jpeg(), &e, cut));
        });
    }

    #[test]
    fn checkpoints(bytes in prop::collection::vec(any::<u8>(), 0..256), (e, cut) in edits()) {
        safetensors(&bytes);
        safetensors(&mutate(micro_checkpoint(), &e, cut));
    }

    #[test]
    fn model_configs(text in ".{0,200}", (e, cut) in edits()) {
        bounded("config", || {
            let _ = ClipConfig::from_json(&text);
            let _ = ClipConfig::from_json(&String::from_utf8_lossy(&mutate(MICRO.as_bytes(), &e, cut)));
        });
    }

    #[test]
    fn tokenizer_input(text in "\\PC{0,300}", bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        bounded("tokenizer", || {
            let _ = tokenizer().tokenize(&text, 77);
            let _ = tokenizer().tokenize(&String::from_utf8_lossy(&bytes), 77);
        });
    }
}

/// The headers of the issue: each claims far more than the file holds.
#[test]
fn length_fields_claiming_huge_sizes_are_not_allocated() {
    // IDX: 2^32 - 1 images of 28×28 (3.4 TB) in a file of 20 bytes; 2^32 - 1 labels likewise.
    let (_, labels) = idx(1);
    let huge_images: Vec<u8> = [2051u32, u32::MAX, 28, 28].iter().flat_map(|w| w.to_be_bytes()).collect();
    fashion_mnist(&huge_images, &labels);
    let (images, _) = idx(1);
    let huge_labels: Vec<u8> = [2049u32, u32::MAX].iter().flat_map(|w| w.to_be_bytes()).collect();
    fashion_mnist(&images, &huge_labels);

    // tar: a member of 2^40 bytes, a GNU long name of 2^40 bytes, a pax header of 2^40 bytes.
    for kind in [tar::EntryType::Regular, tar::EntryType::GNULongName, tar::EntryType::XHeader] {
        let mut header = tar::Header::new_gnu();
        header.set_path("x.png").unwrap();
        header.set_entry_type(kind);
        header.set_size(1 << 40);
        header.set_cksum();
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(&[7; 600]);
        wds(&bytes);
    }

    // safetensors: a header length of 2^40 bytes, and a tensor whose offsets reach 2^40.
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    safetensors(&bytes);
    let json = br#"{"t":{"dtype":"F32","shape":[262144,1048576],"data_offsets":[0,1099511627776]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json);
    safetensors(&bytes);

    // PNG: a 65535 × 65535 image header (12 GiB of pixels) with a correct checksum.
    let mut png = png().to_vec();
    png[16..24].copy_from_slice(&[0, 0, 255, 255, 0, 0, 255, 255]);
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    let crc = crc.sum();
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    let e = bounded("png", || decode_image(&png).unwrap_err());
    assert!(e.contains("limit"), "{e}");

    // A 16384 × 1 strip (a valid PNG of a few hundred bytes): preprocessing must not resize it to
    // 3.7 M × 224 pixels before cropping.
    let mut strip = Vec::new();
    RgbImage::new(16384, 1).write_to(&mut Cursor::new(&mut strip), ImageFormat::Png).unwrap();
    let image = decode_image(&strip).unwrap();
    let out = bounded("strip", || resize_center_crop(&image::DynamicImage::ImageRgb8(image), 224));
    assert_eq!(out.dimensions(), (224, 224));
}
