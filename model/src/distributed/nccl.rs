//! NCCL for device buffers (cargo feature `nccl`): on `--device cuda` the gradient all-reduce and
//! the contrastive loss's collectives run between the GPUs (NVLink, InfiniBand) instead of
//! through host memory and MPI. MPI starts the ranks and carries NCCL's unique id from rank 0 to
//! the others, as llm.c does.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::Collective;

pub struct Nccl(Comm);

// SAFETY: the communicator is used by one thread at a time (the trainer's); NCCL allows a
// communicator to move between threads as long as calls on it do not overlap.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// A communicator over `world`'s ranks on `stream`'s GPU (one GPU per rank).
    pub fn new(world: &dyn Collective, stream: Arc<CudaStream>) -> Result<Nccl, String> {
        let fail = |e| format!("NCCL: {e:?}");
        let mut id = [0u8; 128];
        if world.rank() == 0 {
            let internal = Id::new().map_err(fail)?;
            id.iter_mut().zip(internal.internal()).for_each(|(b, &c)| *b = c as u8);
        }
        world.broadcast(&mut id, 0);
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        Ok(Nccl(Comm::from_rank(stream, world.rank(), world.size(), id).map_err(fail)?))
    }

    /// The mean over ranks of `values`, in place, queued on the communicator's stream.
    pub fn all_reduce_mean(&self, values: &mut CudaSlice<f32>) -> Result<(), String> {
        self.all_reduce(values, ReduceOp::Avg)
    }

    /// The sum over ranks of `values`, in place, queued on the communicator's stream.
    pub fn all_reduce_sum(&self, values: &mut CudaSlice<f32>) -> Result<(), String> {
        self.all_reduce(values, ReduceOp::Sum)
    }

    fn all_reduce(&self, values: &mut CudaSlice<f32>, op: ReduceOp) -> Result<(), String> {
        self.0.all_reduce_in_place(values, &op).map(|_| ()).map_err(|e| format!("NCCL all-reduce: {e:?}"))
    }

    /// Every rank's `local` (of the same length) into `all`, in rank order, queued on the
    /// communicator's stream.
    pub fn all_gather(&self, local: &CudaSlice<f32>, all: &mut CudaSlice<f32>) -> Result<(), String> {
        self.0.all_gather(local, all).map(|_| ()).map_err(|e| format!("NCCL all-gather: {e:?}"))
    }
}
