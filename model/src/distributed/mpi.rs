//! The MPI collective: the world communicator of the job the launcher started. MPI's default
//! error handler ends the job on a failed call, and `mpirun`/`srun --kill-on-bad-exit` end every
//! rank when one dies, so a collective never waits for a rank that is gone.

use std::sync::{Mutex, MutexGuard};

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

use super::Collective;

pub struct Mpi {
    world: Mutex<World>,
    /// Finalizes MPI when dropped: after every collective.
    _universe: Universe,
}

/// The world communicator's handle.
struct World(SimpleCommunicator);

// SAFETY: MPI was initialized with MPI_THREAD_SERIALIZED (checked in `init`): any thread may
// call MPI as long as no two calls overlap, which the mutex around the handle ensures.
unsafe impl Send for World {}

impl Mpi {
    pub fn init() -> Result<Mpi, String> {
        let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or("MPI was initialized twice in this process")?;
        if level < mpi::Threading::Serialized {
            return Err(format!("the MPI library offers threading level {level:?}, clip-pgs needs Serialized"));
        }
        Ok(Mpi { world: Mutex::new(World(universe.world())), _universe: universe })
    }

    fn world(&self) -> MutexGuard<'_, World> {
        // A panic while holding it leaves nothing half-done in MPI: the handle stays usable.
        self.world.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world().0.rank() as usize
    }
    fn size(&self) -> usize {
        self.world().0.size() as usize
    }
    fn engine(&self) -> String {
        let library = mpi::environment::library_version().unwrap_or_default();
        format!("mpi ({})", library.lines().next().unwrap_or("unknown library").trim())
    }
    fn all_reduce_sum(&self, values: &mut [f32]) {
        let send = values.to_vec();
        self.world().0.all_reduce_into(&send[..], values, SystemOperation::sum());
    }
    fn all_gather(&self, local: &[f32], all: &mut [f32]) {
        self.world().0.all_gather_into(local, all);
    }
    fn all_gather_u64(&self, local: &[u64], all: &mut [u64]) {
        self.world().0.all_gather_into(local, all);
    }
    fn broadcast(&self, values: &mut [u8], root: usize) {
        self.world().0.process_at_rank(root as i32).broadcast_into(values);
    }
    fn barrier(&self) {
        self.world().0.barrier();
    }
    fn abort(&self, code: i32) -> ! {
        self.world().0.abort(code)
    }
}
