//! How the ranks of a data-parallel run divide each epoch (one process: the whole epoch); the
//! loader (`loader.rs`) reads its rank's share in order, and a cursor into the share resumes it.
//!
//! - **By sample** (`shapes`, Fashion-MNIST, CSV): the epoch's seeded permutation cut into global
//!   batches of N·b; rank r takes block r of each, so the ranks' batches, in rank order, are the
//!   one-process batches of N·b.
//! - **By shard** (webdataset, as open_clip reads it): each epoch's seeded order of the shards,
//!   rank r taking the shards r, r + N, r + 2N, …, and reading their samples in a seeded order.
//!   Every step is a collective, so the ranks must take as many steps: shards differ in size,
//!   and each rank reads as many samples of an epoch as the smallest share holds. What a larger
//!   share holds beyond that is left out of that epoch only (the next epoch deals the shards anew).

use std::ops::Range;

use clip_pgs_kernels::philox::Philox;

use super::Source;
use super::loader::LoaderConfig;

/// Philox streams (the counter's first stream word; the second is the epoch).
const SAMPLE_ORDER: u32 = 0x0de7;
const SHARD_ORDER: u32 = 0x5a4d;
const SHARD_SAMPLE_ORDER: u32 = 0x5a4e;

/// A Fisher–Yates shuffle of `items` drawn from `rng`.
fn shuffle(items: &mut [usize], rng: Philox) {
    for i in (1..items.len()).rev() {
        let j = ((rng.uniform(i as u32) * (i + 1) as f32) as usize).min(i);
        items.swap(i, j);
    }
}

/// Epoch `epoch`'s order of samples 0..len, drawn from (seed, epoch).
pub fn order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    shuffle(&mut order, Philox::new(seed, SAMPLE_ORDER, epoch as u32));
    order
}

/// Rank `rank` of `ranks`' share of an epoch's order: its block of `batch` in every global batch
/// of `ranks`·`batch`. A rank replaces a corrupt sample from its own share.
pub fn rank_share(order: &[usize], batch: usize, rank: usize, ranks: usize) -> Vec<usize> {
    order.chunks(batch).skip(rank).step_by(ranks).flatten().copied().collect()
}

/// Every rank's shards of epoch `epoch` (indices into `shards`): rank r gets positions r, r + N, …
/// of the epoch's shard order.
pub fn shard_deal(shards: usize, seed: u64, epoch: usize, ranks: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..shards).collect();
    shuffle(&mut order, Philox::new(seed, SHARD_ORDER, epoch as u32));
    (0..ranks).map(|r| order.iter().skip(r).step_by(ranks).copied().collect()).collect()
}

/// One rank's share of every epoch of a source (see the module comment).
#[derive(Clone, Debug)]
pub struct Shares {
    /// What the source is, for errors.
    source: String,
    len: usize,
    /// Each shard's samples (non-empty), where the ranks read by shard.
    shards: Option<Vec<Range<usize>>>,
    seed: u64,
    batch: usize,
    rank: usize,
    ranks: usize,
}

impl Shares {
    /// `cfg.rank`'s shares of `source`. A source read by shard must have a shard with samples for
    /// every rank.
    pub fn new(source: &dyn Source, cfg: &LoaderConfig) -> Result<Shares, String> {
        let shards = source.shards().map(|mut s| {
            s.retain(|r| !r.is_empty());
            s
        });
        if let Some(shards) = &shards
            && shards.len() < cfg.ranks
        {
            return Err(format!(
                "{}: {} shards with samples for {} ranks: ranks read webdataset by shard, so each needs at least \
                 one: split the data into more shards or train on at most {} ranks",
                source.describe(),
                shards.len(),
                cfg.ranks,
                shards.len()
            ));
        }
        let (seed, batch, rank, ranks) = (cfg.seed, cfg.batch_size, cfg.rank, cfg.ranks);
        Ok(Shares { source: source.describe(), len: source.len(), shards, seed, batch, rank, ranks })
    }

    /// Whether the ranks read whole shards.
    pub fn by_shard(&self) -> bool {
        self.shards.is_some()
    }

    /// Samples every rank reads in epoch `epoch` when reading by shard: the smallest share's.
    fn shard_share_len(&self, shards: &[Range<usize>], epoch: usize) -> usize {
        let deal = shard_deal(shards.len(), self.seed, epoch, self.ranks);
        deal.iter().map(|mine| mine.iter().map(|&s| shards[s].len()).sum()).min().unwrap_or(0)
    }

    /// This rank's samples of epoch `epoch`, in the order it reads them.
    pub fn epoch(&self, epoch: usize) -> Vec<usize> {
        let Some(shards) = &self.shards else {
            return rank_share(&order(self.len, self.seed, epoch), self.batch, self.rank, self.ranks);
        };
        let deal = shard_deal(shards.len(), self.seed, epoch, self.ranks);
        let mut mine: Vec<usize> = deal[self.rank].iter().flat_map(|&s| shards[s].clone()).collect();
        shuffle(&mut mine, Philox::new(self.seed, SHARD_SAMPLE_ORDER, epoch as u32));
        mine.truncate(self.shard_share_len(shards, epoch));
        mine
    }

    /// The steps of epoch `epoch` (every rank takes as many), or why there is none.
    pub fn steps(&self, epoch: usize) -> Result<usize, String> {
        let global = self.batch * self.ranks;
        let Some(shards) = &self.shards else {
            let per_rank =
                if self.ranks > 1 { format!(" ({} ranks × {})", self.ranks, self.batch) } else { String::new() };
            return match self.len / global {
                0 => Err(format!("{} holds fewer samples than one batch of {global}{per_rank}", self.source)),
                steps => Ok(steps),
            };
        };
        match self.shard_share_len(shards, epoch) / self.batch {
            0 => Err(format!(
                "{}: in epoch {}, the smallest of the {} ranks' shares of shards holds fewer samples than one batch \
                 of {}: use fewer ranks, a smaller --batch-size or shards of more equal sizes",
                self.source,
                epoch + 1,
                self.ranks,
                self.batch
            )),
            steps => Ok(steps),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sample;

    #[test]
    fn orders_are_permutations_that_change_per_epoch() {
        let (a, b) = (order(1000, 1, 0), order(1000, 1, 1));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(a, order(1000, 1, 0));
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

    /// Shards of the given sizes, samples numbered shard after shard (as `wds` numbers them).
    struct Sharded(Vec<usize>);
    impl Source for Sharded {
        fn describe(&self) -> String {
            format!("sharded {:?}", self.0)
        }
        fn len(&self) -> usize {
            self.0.iter().sum()
        }
        fn get(&self, _: usize) -> Result<Sample, String> {
            Err("not read".into())
        }
        fn shards(&self) -> Option<Vec<Range<usize>>> {
            let ends = self.0.iter().scan(0, |end, n| {
                *end += n;
                Some(*end)
            });
            Some(ends.zip(&self.0).map(|(end, n)| end - n..end).collect())
        }
    }

    fn shares(source: &Sharded, batch: usize, rank: usize, ranks: usize) -> Shares {
        let cfg = LoaderConfig { batch_size: batch, image_size: 8, seed: 7, workers: 1, rank, ranks };
        Shares::new(source, &cfg).unwrap()
    }

    /// Two ranks by shard over 7 shards of unequal sizes (and an empty one): each epoch, the
    /// ranks are dealt disjoint sets of shards whose union is every shard with samples, read
    /// samples of their own shards only, as many each (the smaller share's, all of it), each
    /// once, deterministically; the deal changes between epochs.
    #[test]
    fn ranks_read_disjoint_shards_that_together_are_all_of_them() {
        let source = Sharded(vec![10, 3, 8, 0, 12, 5, 9, 7]);
        let shards: Vec<Range<usize>> = source.shards().unwrap().into_iter().filter(|r| !r.is_empty()).collect();
        let (a, b) = (shares(&source, 4, 0, 2), shares(&source, 4, 1, 2));
        assert!(a.by_shard());
        let mut deals = Vec::new();
        for epoch in 0..6 {
            let deal = shard_deal(shards.len(), 7, epoch, 2);
            let mut dealt: Vec<usize> = deal.concat();
            dealt.sort();
            assert_eq!(dealt, (0..7).collect::<Vec<_>>(), "epoch {epoch}: {deal:?}");
            let samples = |r: usize| -> Vec<usize> {
                let mut s: Vec<usize> = deal[r].iter().flat_map(|&s| shards[s].clone()).collect();
                s.sort();
                s
            };
            let (ea, eb) = (a.epoch(epoch), b.epoch(epoch));
            assert_eq!(ea.len(), eb.len(), "epoch {epoch}");
            let smaller = samples(0).len().min(samples(1).len());
            assert_eq!(ea.len(), smaller, "epoch {epoch}");
            assert_eq!(a.steps(epoch).unwrap(), smaller / 4);
            for (r, read) in [(0, &ea), (1, &eb)] {
                let mut read = read.clone();
                read.sort();
                read.dedup();
                assert_eq!(read.len(), smaller, "epoch {epoch}: rank {r} reads a sample twice");
                let own = samples(r);
                assert!(read.iter().all(|i| own.contains(i)), "epoch {epoch}: rank {r} reads another's shard");
                if own.len() == smaller {
                    assert_eq!(read, own, "epoch {epoch}: rank {r} leaves out part of the smaller share");
                }
            }
            assert_eq!(ea, shares(&source, 4, 0, 2).epoch(epoch));
            deals.push(deal);
        }
        assert!(deals.windows(2).any(|w| w[0] != w[1]), "the same deal every epoch");
        // One rank reads every sample of every shard.
        let mut whole = shares(&source, 4, 0, 1).epoch(2);
        whole.sort();
        assert_eq!(whole, (0..54).collect::<Vec<_>>());
    }

    #[test]
    fn too_few_shards_or_samples_for_the_ranks_is_an_error() {
        let cfg = |ranks| LoaderConfig { batch_size: 4, image_size: 8, seed: 0, workers: 1, rank: 0, ranks };
        let e = Shares::new(&Sharded(vec![20, 0, 20]), &cfg(3)).unwrap_err();
        assert!(e.contains("2 shards with samples for 3 ranks") && e.contains("at most 2"), "{e}");
        let tiny = Sharded(vec![20, 2, 3]);
        let shares = Shares::new(&tiny, &cfg(3)).unwrap();
        let e = shares.steps(0).unwrap_err();
        assert!(e.contains("sharded [20, 2, 3]: in epoch 1") && e.contains("one batch of 4"), "{e}");
    }
}
