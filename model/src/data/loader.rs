//! The loader: each epoch this rank's share of a source in its seeded order (`share.rs`), batches
//! decoded and preprocessed
//! (open_clip's transform: resize, centre crop, CLIP mean/std) by a worker pool, prefetched on a
//! background thread so the trainer does not wait for data. A corrupt sample is skipped, counted
//! and replaced by the next one in the order; the data position after each batch travels with it,
//! so a checkpoint can resume exactly there.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use image::{DynamicImage, RgbImage};
use rayon::prelude::*;

use super::Source;
use super::share::Shares;
use crate::preprocess::{normalize, resize_center_crop};

/// Where the next batch starts: epoch and index into that epoch's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Position {
    pub epoch: usize,
    pub cursor: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub image_size: u32,
    pub seed: u64,
    pub workers: usize,
    /// This process's rank of `ranks` (data-parallel training: each reads its own share,
    /// `share.rs`).
    pub rank: usize,
    pub ranks: usize,
}

/// A batch ready for the model.
pub struct LoadedBatch {
    /// CLIP-normalized [B, 3, S, S].
    pub images: Vec<f32>,
    /// The preprocessed pictures (for mask grids).
    pub rgb: Vec<RgbImage>,
    pub captions: Vec<String>,
    pub labels: Vec<Option<usize>>,
    pub epoch: usize,
    /// The position after this batch.
    pub after: Position,
    /// Samples skipped while filling it: "index: reason".
    pub skipped: Vec<String>,
}

/// Sample `i` decoded and preprocessed: (normalized, picture, caption, label).
type Prepared = (Vec<f32>, RgbImage, String, Option<usize>);

pub fn prepare(source: &dyn Source, i: usize, size: u32) -> Result<Prepared, String> {
    let sample = source.get(i)?;
    if sample.caption.trim().is_empty() {
        return Err("empty caption".into());
    }
    if sample.image.width() == 0 || sample.image.height() == 0 {
        return Err("empty image".into());
    }
    let rgb = resize_center_crop(&DynamicImage::ImageRgb8(sample.image), size);
    Ok((normalize(&rgb), rgb, sample.caption, sample.label))
}

/// Fills one batch from `order[start.cursor..]`, or None when the epoch has too few samples left.
fn fill(source: &dyn Source, order: &[usize], start: Position, cfg: &LoaderConfig) -> Option<LoadedBatch> {
    let mut batch = LoadedBatch {
        images: Vec::new(),
        rgb: Vec::new(),
        captions: Vec::new(),
        labels: Vec::new(),
        epoch: start.epoch,
        after: start,
        skipped: Vec::new(),
    };
    let mut cursor = start.cursor;
    while batch.captions.len() < cfg.batch_size {
        let want = cfg.batch_size - batch.captions.len();
        if cursor + want > order.len() {
            return None;
        }
        let indices = &order[cursor..cursor + want];
        let prepared: Vec<_> = indices.par_iter().map(|&i| (i, prepare(source, i, cfg.image_size))).collect();
        for (i, p) in prepared {
            match p {
                Ok((x, rgb, caption, label)) => {
                    batch.images.extend_from_slice(&x);
                    batch.rgb.push(rgb);
                    batch.captions.push(caption);
                    batch.labels.push(label);
                }
                Err(reason) => batch.skipped.push(format!("sample {i}: {reason}")),
            }
        }
        cursor += want;
    }
    batch.after = if cursor + cfg.batch_size > order.len() {
        Position { epoch: start.epoch + 1, cursor: 0 }
    } else {
        Position { epoch: start.epoch, cursor }
    };
    Some(batch)
}

/// Batches from `start` until epoch `epochs`, made ahead on a background thread.
pub struct Prefetcher {
    rx: Receiver<Result<LoadedBatch, String>>,
    _thread: JoinHandle<()>,
}

impl Prefetcher {
    pub fn start(source: Arc<dyn Source>, cfg: LoaderConfig, start: Position, epochs: usize) -> Prefetcher {
        let (tx, rx) = sync_channel(2);
        let thread = std::thread::spawn(move || produce(&*source, cfg, start, epochs, tx));
        Prefetcher { rx, _thread: thread }
    }

    /// The next batch; None after the last epoch; Err when an epoch had no usable batch.
    pub fn next_batch(&self) -> Option<Result<LoadedBatch, String>> {
        self.rx.recv().ok()
    }
}

fn produce(
    source: &dyn Source,
    cfg: LoaderConfig,
    start: Position,
    epochs: usize,
    tx: SyncSender<Result<LoadedBatch, String>>,
) {
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(cfg.workers.max(1)).build() {
        Ok(pool) => pool,
        Err(e) => {
            let _ = tx.send(Err(format!("cannot start the data workers: {e}")));
            return;
        }
    };
    let shares = match Shares::new(source, &cfg) {
        Ok(shares) => shares,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    let mut position = start;
    while position.epoch < epochs {
        let (epoch, from) = (position.epoch, position.cursor);
        let epoch_order = shares.epoch(epoch);
        let mut batches = 0;
        while position.epoch == epoch {
            match pool.install(|| fill(source, &epoch_order, position, &cfg)) {
                Some(batch) => {
                    position = batch.after;
                    batches += 1;
                    if tx.send(Ok(batch)).is_err() {
                        return; // the trainer stopped
                    }
                }
                None => position = Position { epoch: epoch + 1, cursor: 0 },
            }
        }
        if batches == 0 && from == 0 {
            let _ = tx.send(Err(format!(
                "epoch {epoch} of {} gave no batch of {}: too few usable samples",
                source.describe(),
                cfg.batch_size
            )));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Sample, Split, shapes::Shapes};

    /// Every third sample is corrupt.
    struct Flaky(Shapes);
    impl Source for Flaky {
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn len(&self) -> usize {
            60
        }
        fn get(&self, i: usize) -> Result<Sample, String> {
            if i.is_multiple_of(3) { Err("corrupt".into()) } else { self.0.get(i) }
        }
    }

    #[test]
    fn skips_corrupt_samples_and_resumes_at_the_saved_position() {
        let source: Arc<dyn Source> = Arc::new(Flaky(Shapes::new(Split::Train, 0)));
        let cfg = LoaderConfig { batch_size: 8, image_size: 32, seed: 5, workers: 2, rank: 0, ranks: 1 };
        let all: Vec<LoadedBatch> = {
            let p = Prefetcher::start(source.clone(), cfg, Position::default(), 2);
            std::iter::from_fn(|| p.next_batch()).map(|b| b.unwrap()).collect()
        };
        // 40 good samples per epoch make 5 full batches of 8; each batch is full.
        assert_eq!(all.len(), 10);
        assert!(all.iter().all(|b| b.captions.len() == 8 && b.images.len() == 8 * 3 * 32 * 32));
        let skipped: usize = all.iter().map(|b| b.skipped.len()).sum();
        assert!((36..=40).contains(&skipped), "skipped {skipped}");
        assert_eq!(all[4].epoch, 0);
        assert_eq!(all[5].epoch, 1);
        // Resuming after batch 6 gives batches 7.. exactly.
        let p = Prefetcher::start(source, cfg, all[6].after, 2);
        let rest: Vec<LoadedBatch> = std::iter::from_fn(|| p.next_batch()).map(|b| b.unwrap()).collect();
        assert_eq!(rest.len(), 3);
        for (a, b) in rest.iter().zip(&all[7..]) {
            assert_eq!(a.captions, b.captions);
            assert_eq!(a.images, b.images);
        }
    }

    /// 60 shapes in 4 shards of unequal sizes, every seventh sample corrupt.
    struct Sharded(Shapes);
    impl Source for Sharded {
        fn describe(&self) -> String {
            "sharded".into()
        }
        fn len(&self) -> usize {
            60
        }
        fn get(&self, i: usize) -> Result<Sample, String> {
            if i.is_multiple_of(7) { Err("corrupt".into()) } else { self.0.get(i) }
        }
        fn shards(&self) -> Option<Vec<std::ops::Range<usize>>> {
            Some(vec![0..20, 20..27, 27..45, 45..60])
        }
    }

    /// Rank 1 of 2 reading by shard, resumed after a batch inside an epoch, reads what the
    /// uninterrupted run read after it; 5 ranks are too many for 4 shards.
    #[test]
    fn a_rank_reading_by_shard_resumes_at_its_saved_position() {
        let source: Arc<dyn Source> = Arc::new(Sharded(Shapes::new(Split::Train, 0)));
        let cfg = LoaderConfig { batch_size: 4, image_size: 16, seed: 3, workers: 2, rank: 1, ranks: 2 };
        let all: Vec<LoadedBatch> = {
            let p = Prefetcher::start(source.clone(), cfg, Position::default(), 3);
            std::iter::from_fn(|| p.next_batch()).map(|b| b.unwrap()).collect()
        };
        let inside = all.iter().position(|b| b.epoch == 1 && b.after.epoch == 1 && b.after.cursor > 0).unwrap();
        let p = Prefetcher::start(source.clone(), cfg, all[inside].after, 3);
        let rest: Vec<LoadedBatch> = std::iter::from_fn(|| p.next_batch()).map(|b| b.unwrap()).collect();
        assert_eq!(rest.len(), all.len() - inside - 1);
        for (a, b) in rest.iter().zip(&all[inside + 1..]) {
            assert_eq!((&a.captions, a.after), (&b.captions, b.after));
            assert_eq!(a.images, b.images);
        }
        let p = Prefetcher::start(source, LoaderConfig { ranks: 5, ..cfg }, Position::default(), 3);
        let e = p.next_batch().unwrap().err().unwrap();
        assert!(e.contains("4 shards with samples for 5 ranks"), "{e}");
    }

    #[test]
    fn an_epoch_without_a_batch_is_an_error() {
        struct Broken;
        impl Source for Broken {
            fn describe(&self) -> String {
                "broken".into()
            }
            fn len(&self) -> usize {
                10
            }
            fn get(&self, _: usize) -> Result<Sample, String> {
                Err("corrupt".into())
            }
        }
        let cfg = LoaderConfig { batch_size: 4, image_size: 16, seed: 0, workers: 1, rank: 0, ranks: 1 };
        let p = Prefetcher::start(Arc::new(Broken), cfg, Position::default(), 3);
        let e = p.next_batch().unwrap().err().unwrap();
        assert!(e.contains("broken") && e.contains("no batch"), "{e}");
        assert!(p.next_batch().is_none());
    }
}
