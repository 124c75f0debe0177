//! The loader: epochs as seeded permutations of a source, batches decoded and preprocessed
//! (open_clip's transform: resize, centre crop, CLIP mean/std) by a worker pool, prefetched on a
//! background thread so the trainer does not wait for data. A corrupt sample is skipped, counted
//! and replaced by the next one in the order; the data position after each batch travels with it,
//! so a checkpoint can resume exactly there.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use clip_pgs_kernels::philox::Philox;
use image::{DynamicImage, RgbImage};
use rayon::prelude::*;

use super::Source;
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
    /// This process's rank of `ranks` (data-parallel training: each reads its own share).
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

/// Epoch `epoch`'s order: a Fisher–Yates shuffle of 0..len drawn from (seed, epoch).
pub fn order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let rng = Philox::new(seed, 0x0de7, epoch as u32);
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = ((rng.uniform(i as u32) * (i + 1) as f32) as usize).min(i);
        order.swap(i, j);
    }
    order
}

/// Rank `rank` of `ranks`' share of an epoch's order: its block of `batch` in every global batch
/// of `ranks`·`batch`, so the shares are disjoint and the ranks' batches, in rank order, are the
/// one-process batches of `ranks`·`batch`. A rank replaces a corrupt sample from its own share.
pub fn rank_share(order: &[usize], batch: usize, rank: usize, ranks: usize) -> Vec<usize> {
    order.chunks(batch).skip(rank).step_by(ranks).flatten().copied().collect()
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
    let mut position = start;
    while position.epoch < epochs {
        let (epoch, from) = (position.epoch, position.cursor);
        let epoch_order = rank_share(&order(source.len(), cfg.seed, epoch), cfg.batch_size, cfg.rank, cfg.ranks);
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

    #[test]
    fn orders_are_permutations_that_change_per_epoch() {
        let (a, b) = (order(1000, 1, 0), order(1000, 1, 1));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(a, order(1000, 1, 0));
    }

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

    /// Two ranks' shares: disjoint, together the epoch, and each global batch of 2·4 is rank 0's
    /// batch then rank 1's.
    #[test]
    fn rank_shares_split_each_global_batch() {
        let epoch = order(37, 3, 1);
        let (a, b) = (rank_share(&epoch, 4, 0, 2), rank_share(&epoch, 4, 1, 2));
        let mut both: Vec<usize> = a.iter().chain(&b).copied().collect();
        both.sort();
        assert_eq!(both, (0..37).collect::<Vec<_>>());
        for (step, global) in epoch.chunks(8).enumerate().take(4) {
            assert_eq!(global[..4], a[4 * step..4 * step + 4]);
            assert_eq!(global[4..], b[4 * step..4 * step + 4]);
        }
        assert_eq!(rank_share(&epoch, 4, 0, 1), epoch);
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
