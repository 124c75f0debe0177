//! The SIMT emulator: runs the kernels' own Rust source on the host under the CUDA execution
//! model, so that every kernel executes in `cargo test` on a machine without a GPU.
//!
//! - A launch is a grid of blocks; independent blocks run in parallel (rayon), each on one host
//!   thread (`block.rs`). Its GPU threads are stackful coroutines (corosensei) in warps of 32;
//!   barriers and warp collectives are scheduler requests, with PTX semantics.
//! - Checks, as compute-sanitizer makes them: out-of-bounds and misaligned accesses (views know
//!   their length), shared-memory races and reads of uninitialized shared memory (`shared.rs`),
//!   divergent barriers, barriers some threads exited without, deadlocks and malformed warp
//!   collectives. A fault is an error value naming kernel, block, thread, address and source line
//!   (`fault.rs`); with several faulting blocks the lowest block's is reported, so the outcome
//!   does not depend on scheduling.
//! - Counters (`traffic.rs`, when [`Options::counters`]): warp requests, sectors, distinct bytes,
//!   bank conflicts, barriers.
//!
//! What it proves: the kernel's logic, indexing, synchronisation and traffic. What it cannot:
//! PTX code generation, timing, and memory ordering between blocks (blocks here never overlap
//! in a way that a GPU's would; global memory is not checked for inter-block races).

mod block;
pub mod device;
mod fault;
mod shared;
mod tensor;
mod traffic;

use rayon::prelude::*;
use std::vec::Vec;

pub use fault::{Fault, FaultKind, Hazard, Site, Space};
pub use traffic::{LaunchTraffic, SiteTraffic};

use traffic::ByteSet;

/// A kernel as the host sees it: its PTX entry name and the host function of its body, over the
/// tuple of its parameters (see [`crate::kernel!`]).
pub struct Kernel<P> {
    name: &'static str,
    body: fn(P),
}

// Not derived: that would ask P to be Clone.
impl<P> Clone for Kernel<P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Kernel<P> {}

impl<P> Kernel<P> {
    pub const fn new(name: &'static str, body: fn(P)) -> Self {
        Kernel { name, body }
    }

    /// The entry point's name in the PTX module.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Grid and block sizes and dynamic shared memory of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

/// The device limits a launch must respect (sm_90 values by default).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_threads_per_block: u32,
    pub max_block: [u32; 3],
    pub max_grid: [u32; 3],
    /// Static plus dynamic shared memory per block (the opt-in maximum).
    pub max_shared_bytes: usize,
}

/// An H100's (sm_90) limits.
pub const SM90: Limits = Limits {
    max_threads_per_block: 1024,
    max_block: [1024, 1024, 64],
    max_grid: [i32::MAX as u32, 65535, 65535],
    max_shared_bytes: 227 * 1024,
};

/// The order in which a block's threads run between synchronisation points (warp by warp, lane
/// by lane, or all reversed). Results must not depend on it; racy code shows its race as a
/// write after read one way and a read after write the other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    #[default]
    Forward,
    Reverse,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Count traffic (slower; the checks run either way).
    pub counters: bool,
    pub order: Order,
}

/// What a launch did, when it did not fault.
#[derive(Clone, Debug, Default)]
pub struct LaunchReport {
    pub kernel: &'static str,
    /// Empty unless [`Options::counters`].
    pub traffic: LaunchTraffic,
}

/// The launch a block belongs to, shared by all its blocks.
pub(crate) struct LaunchContext {
    kernel: &'static str,
    config: LaunchConfig,
    limits: Limits,
    options: Options,
    /// Per global buffer of the launch: distinct bytes read, written.
    touched: Vec<(ByteSet, ByteSet)>,
}

impl LaunchContext {
    fn threads_per_block(&self) -> usize {
        self.config.block.iter().product::<u32>() as usize
    }

    fn thread_xyz(&self, tid: u32) -> [u32; 3] {
        let [x, y, _] = self.config.block;
        [tid % x, tid / x % y, tid / (x * y)]
    }

    fn touch(&self, buffer: u32, offset: usize, size: usize, write: bool) {
        let (read, written) = &self.touched[buffer as usize];
        if write { written } else { read }.insert(offset, size);
    }

    fn fault(&self, block: [u32; 3], tid: Option<u32>, site: Option<Site>, kind: FaultKind) -> Fault {
        let kind = match kind {
            FaultKind::Race { hazard, byte_offset, other_thread, other_site } => {
                FaultKind::Race { hazard, byte_offset, other_thread: self.thread_xyz(other_thread[0]), other_site }
            }
            other => other,
        };
        Fault { kernel: self.kernel, block, thread: tid.map(|t| self.thread_xyz(t)), site, kind }
    }
}

/// Why a launch was refused before it ran: the same limits the CUDA driver enforces.
pub fn check_limits(config: &LaunchConfig, limits: &Limits) -> Result<(), std::string::String> {
    let threads: u64 = config.block.iter().map(|&d| d as u64).product();
    if config.block.contains(&0) || config.grid.contains(&0) {
        return Err(std::format!("empty launch: grid {:?}, block {:?}", config.grid, config.block));
    }
    if threads > limits.max_threads_per_block as u64 {
        return Err(std::format!("{threads} threads per block exceed the limit of {}", limits.max_threads_per_block));
    }
    for axis in 0..3 {
        if config.block[axis] > limits.max_block[axis] || config.grid[axis] > limits.max_grid[axis] {
            return Err(std::format!(
                "grid {:?} × block {:?} exceeds the limits grid {:?}, block {:?}",
                config.grid,
                config.block,
                limits.max_grid,
                limits.max_block
            ));
        }
    }
    if config.shared_bytes as usize > limits.max_shared_bytes {
        return Err(std::format!(
            "{} bytes of shared memory per block exceed the limit of {}",
            config.shared_bytes,
            limits.max_shared_bytes
        ));
    }
    Ok(())
}

/// Runs `kernel` over the grid with `params` (views made by the caller for global buffers with
/// the byte sizes `buffer_bytes`, indexed by the views' buffer numbers). The caller checks the
/// launch against the limits first ([`check_limits`]).
///
/// # Safety
/// The views in `params` point at live host memory of the lengths they claim, and no other code
/// touches it during the launch.
pub unsafe fn launch<P: Copy + Send + Sync + 'static>(
    kernel: &Kernel<P>,
    config: LaunchConfig,
    params: P,
    buffer_bytes: &[usize],
    limits: Limits,
    options: Options,
) -> Result<LaunchReport, Fault> {
    let touched = if options.counters {
        buffer_bytes.iter().map(|&b| (ByteSet::new(b), ByteSet::new(b))).collect()
    } else {
        Vec::new()
    };
    let context = LaunchContext { kernel: kernel.name, config, limits, options, touched };
    let [gx, gy, gz] = config.grid;
    let blocks = gx as usize * gy as usize * gz as usize;
    let body = kernel.body;
    let results: Vec<_> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            let index = [
                (b % gx as usize) as u32,
                (b / gx as usize % gy as usize) as u32,
                (b / (gx as usize * gy as usize)) as u32,
            ];
            block::run(&context, body, params, index)
        })
        .collect();
    let mut reports = Vec::with_capacity(blocks);
    for result in results {
        reports.push(result?);
    }
    let mut traffic = LaunchTraffic { barriers: reports.iter().map(|r| r.barriers).sum(), ..Default::default() };
    if options.counters {
        traffic.distinct_read = context.touched.iter().map(|(r, _)| r.count()).sum();
        traffic.distinct_written = context.touched.iter().map(|(_, w)| w.count()).sum();
        traffic.sites = traffic::merge(reports.into_iter().map(|r| r.sites));
    }
    Ok(LaunchReport { kernel: kernel.name, traffic })
}

#[cfg(test)]
mod tests;
