//! A bounded wait in collectives. MPI's collectives have no timeout: a rank that dies ends the job
//! (the launcher sees it), but a rank that hangs, alive and never reaching the next collective,
//! would keep every other rank waiting in it forever. [`Watched`] times every collective of the
//! collective it wraps on a watchdog thread; one that has not completed within the timeout ends
//! this process with a message naming the collective, and the launcher then ends the others, as
//! for a rank that died.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Collective;

/// `inner`, every collective of which must complete within a timeout.
pub struct Watched {
    inner: Arc<dyn Collective>,
    waiting: Arc<Mutex<Waiting>>,
}

/// The collective a rank waits in, and since when.
type Waiting = Option<(&'static str, Instant)>;

/// The exit status of a rank that gave up waiting.
const EXIT_TIMEOUT: i32 = 3;

impl Watched {
    /// Wraps `inner`; a collective still waiting after `timeout` ends the process.
    pub fn new(inner: Arc<dyn Collective>, timeout: Duration) -> Watched {
        let waiting: Arc<Mutex<Waiting>> = Arc::default();
        let (rank, size, watched) = (inner.rank(), inner.size(), waiting.clone());
        // Checked a few times per timeout, at most every second: it fires within 1.25 timeouts.
        let period = (timeout / 4).min(Duration::from_secs(1));
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(period);
                if let Some((name, since)) = *lock(&watched)
                    && since.elapsed() > timeout
                {
                    crate::errln!(
                        "error on rank {rank} of {size}: {name} did not complete within {} s (--collective-timeout): \
                         another rank hangs or is that much slower; ending this rank, and with it the job",
                        timeout.as_secs_f64()
                    );
                    std::process::exit(EXIT_TIMEOUT);
                }
            }
        });
        Watched { inner, waiting }
    }

    fn timed<R>(&self, name: &'static str, collective: impl FnOnce() -> R) -> R {
        *lock(&self.waiting) = Some((name, Instant::now()));
        let result = collective();
        *lock(&self.waiting) = None;
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The value is a plain record: usable after a panic elsewhere.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Collective for Watched {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn engine(&self) -> String {
        self.inner.engine()
    }
    fn all_reduce_sum(&self, values: &mut [f32]) {
        self.timed("all-reduce", || self.inner.all_reduce_sum(values))
    }
    fn all_gather(&self, local: &[f32], all: &mut [f32]) {
        self.timed("all-gather", || self.inner.all_gather(local, all))
    }
    fn all_gather_u64(&self, local: &[u64], all: &mut [u64]) {
        self.timed("all-gather", || self.inner.all_gather_u64(local, all))
    }
    fn broadcast(&self, values: &mut [u8], root: usize) {
        self.timed("broadcast", || self.inner.broadcast(values, root))
    }
    fn barrier(&self) {
        self.timed("barrier", || self.inner.barrier())
    }
    fn abort(&self, code: i32) -> ! {
        self.inner.abort(code)
    }
}
