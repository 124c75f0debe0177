//! Traffic counters: the performance that can be measured without a GPU.
//!
//! A warp-level memory request is what the lanes of one warp do at one source line for the n-th
//! time since the last barrier (threads run one after another between synchronisation points, so
//! the lanes' accesses are matched by site and occurrence). Per request:
//! - global: the 32-byte sectors it touches and the distinct bytes it uses (coalescing: used
//!   bytes / 32·sectors);
//! - shared: the wavefronts it needs, split into phases of 128 bytes (32 lanes of 4 bytes, 16 of
//!   8, 8 of 16) and, per phase, the most distinct 4-byte words that fall in one of the 32 banks
//!   (a broadcast of one word is free); wavefronts beyond one per phase are bank conflicts.
//!
//! Per launch: distinct bytes read and written per buffer (a lower bound on DRAM traffic) and the
//! barriers executed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::vec::Vec;

use super::fault::{Site, Space};

/// Totals of one source line of a kernel.
#[derive(Clone, Copy, Debug)]
pub struct SiteTraffic {
    pub site: Site,
    pub space: Space,
    pub write: bool,
    /// Warp-level requests.
    pub requests: u64,
    /// Global: 32-byte sectors touched, summed over requests.
    pub sectors: u64,
    /// Distinct bytes the lanes used, summed over requests.
    pub bytes: u64,
    /// Shared: wavefronts, and the fewest the same requests could have needed.
    pub wavefronts: u64,
    pub ideal_wavefronts: u64,
}

impl SiteTraffic {
    /// Fraction of the touched sectors' bytes that were used (1.0: fully coalesced).
    pub fn sector_efficiency(&self) -> f64 {
        if self.sectors == 0 { 1.0 } else { self.bytes as f64 / (32 * self.sectors) as f64 }
    }

    /// Shared: extra wavefronts from bank conflicts.
    pub fn bank_conflicts(&self) -> u64 {
        self.wavefronts - self.ideal_wavefronts
    }

    fn add(&mut self, o: &SiteTraffic) {
        self.requests += o.requests;
        self.sectors += o.sectors;
        self.bytes += o.bytes;
        self.wavefronts += o.wavefronts;
        self.ideal_wavefronts += o.ideal_wavefronts;
    }
}

/// The counters of one launch.
#[derive(Clone, Debug, Default)]
pub struct LaunchTraffic {
    /// Per source line, in source order.
    pub sites: Vec<SiteTraffic>,
    /// Distinct bytes of global memory read and written.
    pub distinct_read: u64,
    pub distinct_written: u64,
    /// Barriers executed, summed over blocks.
    pub barriers: u64,
}

impl LaunchTraffic {
    fn sum(&self, space: Space, f: impl Fn(&SiteTraffic) -> u64) -> u64 {
        self.sites.iter().filter(|s| s.space == space).map(f).sum()
    }

    pub fn global_requests(&self) -> u64 {
        self.sum(Space::Global, |s| s.requests)
    }

    pub fn sectors(&self) -> u64 {
        self.sum(Space::Global, |s| s.sectors)
    }

    /// Bytes moved through sectors: 32 per sector (an upper bound on DRAM traffic).
    pub fn sector_bytes(&self) -> u64 {
        32 * self.sectors()
    }

    /// Used bytes over sector bytes, over all global requests.
    pub fn sector_efficiency(&self) -> f64 {
        let sectors = self.sectors();
        if sectors == 0 { 1.0 } else { self.sum(Space::Global, |s| s.bytes) as f64 / (32 * sectors) as f64 }
    }

    pub fn shared_requests(&self) -> u64 {
        self.sum(Space::Shared, |s| s.requests)
    }

    pub fn bank_conflicts(&self) -> u64 {
        self.sum(Space::Shared, |s| s.bank_conflicts())
    }
}

/// One access of a lane: (lane, address key, size). Global keys are buffer << 48 | byte offset.
type LaneAccess = (u8, u64, u8);

struct Request {
    space: Space,
    write: bool,
    lanes: u32,
    accesses: Vec<LaneAccess>,
}

/// The counters of one block while it runs.
#[derive(Default)]
pub(super) struct BlockTraffic {
    /// Open requests per warp, by (site, occurrence).
    open: Vec<HashMap<(usize, u32), Request>>,
    sites: HashMap<usize, SiteTraffic>,
    pub barriers: u64,
}

impl BlockTraffic {
    pub fn new(warps: usize) -> Self {
        BlockTraffic { open: (0..warps).map(|_| HashMap::new()).collect(), ..Default::default() }
    }

    /// Records one lane's access; the request closes when every live lane of the warp took part.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        warp: usize,
        lane: usize,
        live_lanes: u32,
        site: Site,
        occurrence: u32,
        space: Space,
        write: bool,
        key: u64,
        size: usize,
    ) {
        let id = (site as *const _ as usize, occurrence);
        let request =
            self.open[warp].entry(id).or_insert_with(|| Request { space, write, lanes: 0, accesses: Vec::new() });
        request.lanes |= 1 << lane;
        request.accesses.push((lane as u8, key, size as u8));
        if request.lanes & live_lanes == live_lanes {
            let request = self.open[warp].remove(&id).expect("just inserted");
            self.close(site, request);
        }
    }

    /// Closes every open request (at a barrier and at the end of the block).
    pub fn flush(&mut self) {
        for warp in 0..self.open.len() {
            let open: Vec<_> = self.open[warp].drain().collect();
            for ((site, _), request) in open {
                // SAFETY: the key was made from a `&'static Location` in `record`.
                let site: Site = unsafe { &*(site as *const _) };
                self.close(site, request);
            }
        }
    }

    fn close(&mut self, site: Site, mut r: Request) {
        let entry = self.sites.entry(site as *const _ as usize).or_insert(SiteTraffic {
            site,
            space: r.space,
            write: r.write,
            requests: 0,
            sectors: 0,
            bytes: 0,
            wavefronts: 0,
            ideal_wavefronts: 0,
        });
        entry.requests += 1;
        match r.space {
            Space::Global => {
                let mut sectors: Vec<u64> =
                    r.accesses.iter().flat_map(|&(_, key, size)| key / 32..=(key + size as u64 - 1) / 32).collect();
                sectors.sort_unstable();
                sectors.dedup();
                entry.sectors += sectors.len() as u64;
                entry.bytes += distinct_bytes(&mut r.accesses);
            }
            Space::Shared => {
                let (wavefronts, ideal) = wavefronts(&r.accesses);
                entry.wavefronts += wavefronts;
                entry.ideal_wavefronts += ideal;
                entry.bytes += distinct_bytes(&mut r.accesses);
            }
        }
    }

    /// The block's totals, per site.
    pub fn into_sites(mut self) -> HashMap<usize, SiteTraffic> {
        self.flush();
        self.sites
    }
}

/// Bytes covered by the union of the accesses.
fn distinct_bytes(accesses: &mut [LaneAccess]) -> u64 {
    accesses.sort_unstable_by_key(|a| a.1);
    let (mut total, mut end) = (0u64, 0u64);
    for &(_, start, size) in accesses.iter() {
        let stop = start + size as u64;
        if stop > end {
            total += stop - start.max(end);
            end = stop;
        }
    }
    total
}

/// (wavefronts, one per non-empty phase) of a shared-memory request.
fn wavefronts(accesses: &[LaneAccess]) -> (u64, u64) {
    let size = accesses.iter().map(|a| a.2 as usize).max().unwrap_or(4).max(4);
    let lanes_per_phase = (128 / size).min(32);
    let (mut total, mut ideal) = (0u64, 0u64);
    for phase in 0..32usize.div_ceil(lanes_per_phase) {
        let mut words: Vec<u64> = accesses
            .iter()
            .filter(|a| a.0 as usize / lanes_per_phase == phase)
            .flat_map(|&(_, offset, size)| offset / 4..(offset + size as u64).div_ceil(4))
            .collect();
        if words.is_empty() {
            continue;
        }
        words.sort_unstable();
        words.dedup();
        let mut per_bank = [0u64; 32];
        for w in words {
            per_bank[(w % 32) as usize] += 1;
        }
        total += per_bank.iter().copied().max().unwrap_or(1);
        ideal += 1;
    }
    (total, ideal)
}

/// Distinct bytes touched in one global buffer, shared by all blocks of a launch.
pub(super) struct ByteSet(Vec<AtomicU64>);

impl ByteSet {
    pub fn new(bytes: usize) -> Self {
        ByteSet((0..bytes.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }

    pub fn insert(&self, offset: usize, size: usize) {
        for byte in offset..offset + size {
            self.0[byte / 64].fetch_or(1 << (byte % 64), Ordering::Relaxed);
        }
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }
}

/// Merges per-block site totals into a launch's, in source order.
pub(super) fn merge(blocks: impl Iterator<Item = HashMap<usize, SiteTraffic>>) -> Vec<SiteTraffic> {
    let mut all: HashMap<usize, SiteTraffic> = HashMap::new();
    for block in blocks {
        for (key, site) in block {
            all.entry(key).and_modify(|s| s.add(&site)).or_insert(site);
        }
    }
    let mut sites: Vec<SiteTraffic> = all.into_values().collect();
    sites.sort_by_key(|s| (s.site.file(), s.site.line(), s.site.column()));
    sites
}
