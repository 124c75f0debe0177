//! Data-parallel training across processes, as open_clip runs it under torchrun: every rank holds
//! the whole model, trains on its own share of each batch (`data::loader::rank_share`), gathers
//! every rank's features for the contrastive loss (`loss.rs` on the host, `device_loss.rs` on a
//! GPU device: `--gather-with-grad`, `--local-loss`) and averages the gradients before AdamW, so
//! that the ranks' parameters stay identical and N ranks with batch b follow one process with
//! batch N·b.
//!
//! The processes talk through one collective interface ([`Collective`]), implemented by MPI
//! (`mpi.rs`, cargo feature `mpi`): the launcher (`mpirun`, `srun`) starts the processes and
//! MPI's environment says who they are. A process not started by a launcher is a world of one
//! ([`Solo`]) and needs no MPI library. Every collective of a job is bounded in time
//! (`watchdog.rs`): a rank that hangs ends the job.

pub mod device_loss;
pub mod loss;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod watchdog;

use std::sync::Arc;

use clip_pgs_host::Buffer;

/// The collective operations the trainer needs, over host memory. Every rank calls each one in
/// the same order with the same lengths (the trainer's steps are the same on every rank).
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// The engine, for the start-up line ("mpi (Open MPI v4.1.4 …)").
    fn engine(&self) -> String;
    /// Element-wise sum over ranks, in place.
    fn all_reduce_sum(&self, values: &mut [f32]);
    /// Every rank's `local` (of the same length) into `all`, in rank order.
    fn all_gather(&self, local: &[f32], all: &mut [f32]);
    /// As `all_gather`, for counters and positions.
    fn all_gather_u64(&self, local: &[u64], all: &mut [u64]);
    /// Rank `root`'s `values` into every rank's.
    fn broadcast(&self, values: &mut [u8], root: usize);
    fn barrier(&self);
    /// Ends every rank's process (a rank that failed: the others must not wait for it forever).
    fn abort(&self, code: i32) -> !;
}

/// A world of one process: every collective is the identity.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn engine(&self) -> String {
        "none (one process)".into()
    }
    fn all_reduce_sum(&self, _: &mut [f32]) {}
    fn all_gather(&self, local: &[f32], all: &mut [f32]) {
        all.copy_from_slice(local);
    }
    fn all_gather_u64(&self, local: &[u64], all: &mut [u64]) {
        all.copy_from_slice(local);
    }
    fn broadcast(&self, _: &mut [u8], _: usize) {}
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A run's ranks and open_clip's distributed-loss flags.
#[derive(Clone)]
pub struct DataParallel {
    pub world: Arc<dyn Collective>,
    /// `--gather-with-grad`: the gathered features carry gradients back to the rank they came
    /// from (without it, only a rank's own features get its loss's gradient, as in open_clip).
    pub gather_with_grad: bool,
    /// `--local-loss`: each rank scores only its own samples against every rank's.
    pub local_loss: bool,
    /// The GPUs' own collective for the gradients of a `cuda` device (None: through the host).
    #[cfg(feature = "nccl")]
    pub nccl: Option<Arc<nccl::Nccl>>,
}

impl DataParallel {
    /// One process, no communication.
    pub fn single() -> DataParallel {
        DataParallel::new(Arc::new(Solo), false, false)
    }

    pub fn new(world: Arc<dyn Collective>, gather_with_grad: bool, local_loss: bool) -> DataParallel {
        #[cfg(feature = "nccl")]
        return DataParallel { world, gather_with_grad, local_loss, nccl: None };
        #[cfg(not(feature = "nccl"))]
        DataParallel { world, gather_with_grad, local_loss }
    }

    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    pub fn ranks(&self) -> usize {
        self.world.size()
    }

    /// Rank 0's `s` on every rank.
    pub fn broadcast_string(&self, s: &str) -> String {
        let mut len = (s.len() as u64).to_le_bytes();
        self.world.broadcast(&mut len, 0);
        let mut bytes = s.as_bytes().to_vec();
        bytes.resize(u64::from_le_bytes(len) as usize, 0);
        self.world.broadcast(&mut bytes, 0);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The mean over ranks of a device buffer, on every rank: DDP's gradient all-reduce, and the
    /// logged loss.
    pub fn average(&self, values: &mut Buffer<f32>) -> Result<(), String> {
        #[cfg(feature = "nccl")]
        if let (Buffer::Cuda(v), Some(nccl)) = (&mut *values, &self.nccl) {
            return nccl.all_reduce_mean(v);
        }
        let scale = 1.0 / self.ranks() as f32;
        self.in_host_memory(values, |v| {
            self.world.all_reduce_sum(v);
            v.iter_mut().for_each(|v| *v *= scale);
        })
    }

    /// The sum over ranks of a device buffer, on every rank (`--gather-with-grad`'s backward).
    pub fn all_reduce_sum(&self, values: &mut Buffer<f32>) -> Result<(), String> {
        #[cfg(feature = "nccl")]
        if let (Buffer::Cuda(v), Some(nccl)) = (&mut *values, &self.nccl) {
            return nccl.all_reduce_sum(v);
        }
        self.in_host_memory(values, |v| self.world.all_reduce_sum(v))
    }

    /// Every rank's device buffer `local` (of the same length) into `all`, in rank order.
    pub fn all_gather(&self, local: &Buffer<f32>, all: &mut Buffer<f32>) -> Result<(), String> {
        #[cfg(feature = "nccl")]
        if let (Buffer::Cuda(l), Buffer::Cuda(a), Some(nccl)) = (local, &mut *all, &self.nccl) {
            return nccl.all_gather(l, a);
        }
        let staged;
        let local = match local {
            Buffer::Cpu(l) | Buffer::Emu(l) => l.as_slice(),
            Buffer::Cuda(_) => {
                staged = local.to_vec().map_err(|e| e.to_string())?;
                staged.as_slice()
            }
        };
        self.in_host_memory(all, |a| self.world.all_gather(local, a))
    }

    /// Where the MPI collectives meet a device buffer: the cpu's and the emulator's memory is the
    /// host's, so they run on it in place; a cuda buffer without NCCL goes through a host copy
    /// (a read that waits for the GPU, and a write back).
    fn in_host_memory(&self, values: &mut Buffer<f32>, f: impl FnOnce(&mut [f32])) -> Result<(), String> {
        match values {
            Buffer::Cpu(v) | Buffer::Emu(v) => f(v),
            Buffer::Cuda(_) => {
                let mut host = values.to_vec().map_err(|e| e.to_string())?;
                f(&mut host);
                values.write(clip_pgs_host::Span::new(0, host.len()), &host).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

/// Who started this process, from the launcher's environment: the world size MPI will report,
/// or None for a process started on its own.
pub fn launched_by() -> Option<(&'static str, usize)> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
    [
        ("mpirun", "OMPI_COMM_WORLD_SIZE"),
        ("a PMI launcher (mpiexec, srun)", "PMI_SIZE"),
        ("srun", "SLURM_STEP_NUM_TASKS"),
    ]
    .into_iter()
    .find_map(|(who, name)| Some((who, var(name)?)))
    .or_else(|| std::env::var("PMIX_RANK").is_ok().then_some(("a PMIx launcher (srun --mpi=pmix)", 0)))
}

/// The collective this process trains with: MPI when a launcher started it, else one process.
/// torchrun's variables (WORLD_SIZE > 1 with no MPI launcher) are refused: its rendezvous is not
/// MPI's.
pub fn connect() -> Result<Arc<dyn Collective>, String> {
    let torchrun = std::env::var("WORLD_SIZE").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 1);
    match (launched_by(), torchrun) {
        (None, Some(n)) => Err(format!(
            "WORLD_SIZE={n} (torchrun?): clip-pgs starts its ranks through MPI: launch with `mpirun -np {n} \
             clip-pgs train …` or `srun --mpi=pmix -n {n} clip-pgs train …`"
        )),
        (None, None) => Ok(Arc::new(Solo)),
        (Some(launcher), _) => from_launcher(launcher),
    }
}

#[cfg(feature = "mpi")]
fn from_launcher(_: (&str, usize)) -> Result<Arc<dyn Collective>, String> {
    Ok(Arc::new(mpi::Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn from_launcher((who, size): (&str, usize)) -> Result<Arc<dyn Collective>, String> {
    if size == 1 {
        return Ok(Arc::new(Solo));
    }
    Err(format!(
        "started by {who} as one of {size} processes, but this clip-pgs was built without MPI: build it with \
         `cargo build --release --features mpi` (needs libopenmpi-dev and libclang-dev)"
    ))
}
