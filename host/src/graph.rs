//! Capturing a step's device work once and replaying it: a CUDA graph on `cuda` (the launches,
//! cuBLASLt calls and copies queued on the stream between `begin_capture` and `end_capture`,
//! replayed by one launch, with no per-kernel launch cost on the host). On `emu` the same
//! contract, checked: the work between the two calls is recorded, not run, with its arguments as
//! they were (buffer addresses and scalars), and a host read or write of device memory, an upload
//! or an allocation in between is an error naming it — what breaks CUDA's stream capture or
//! would be frozen into the graph. A replay runs the recorded work on the same buffers, so what
//! must change between replays (the batch, the learning rate, the masks' seed and step) has to be
//! in device memory, written before the replay: a scalar passed to a launch would replay stale,
//! and the emulator tests compare replays with uncaptured steps to catch it.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use crate::device::Device;
use crate::emu::EmuRuntime;
use crate::error::{CudaContextExt, Error, Result};

/// One recorded piece of emulated work (a launch, a cuBLASLt call, a copy), replayable.
pub(crate) type Recorded = Box<dyn FnMut(&EmuRuntime) -> Result<()> + Send>;

thread_local! {
    /// Whether this thread is capturing emulated work (host accesses to emu memory are refused).
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
}

/// An error when this thread is capturing emulated work: `what` (a host access to emu memory, an
/// allocation) cannot be part of a graph.
pub(crate) fn refuse_while_capturing(what: impl FnOnce() -> String) -> Result<()> {
    if CAPTURING.get() { Err(Error::Capture(what())) } else { Ok(()) }
}

/// Where emulated work reads or writes: a slice of emu memory as an address, so that recorded
/// work can hold it past the borrow it came from (the caller of `Graph::replay` keeps the buffer
/// where it was). Slices are made from it only while the work runs.
pub(crate) struct Address<T> {
    at: *mut T,
    len: usize,
}

impl<T> Clone for Address<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Address<T> {}

// SAFETY: an address of emu memory, which any thread may access while the work runs (the work
// runs on one thread at a time: recorded, then replayed in order).
unsafe impl<T: Send> Send for Address<T> {}

impl<T> Address<T> {
    pub(crate) fn of(s: &[T]) -> Address<T> {
        Address { at: s.as_ptr().cast_mut(), len: s.len() }
    }

    pub(crate) fn of_mut(s: &mut [T]) -> Address<T> {
        Address { at: s.as_mut_ptr(), len: s.len() }
    }

    /// # Safety
    /// The memory is live and not written through another slice while this one is used.
    pub(crate) unsafe fn slice<'a>(self) -> &'a [T] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(self.at, self.len) }
    }

    /// # Safety
    /// The memory is live and not accessed through another slice while this one is used.
    pub(crate) unsafe fn slice_mut<'a>(self) -> &'a mut [T] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.at, self.len) }
    }
}

/// Device work captured once, replayed by `replay`.
pub struct Graph {
    captured: Captured,
    _scratch: ScratchHold,
}

/// Counts a graph in its runtime's graphs alive while it exists: the scratch memory it may use
/// (`Device::with_scratch`) does not move until every graph is dropped.
struct ScratchHold(Arc<AtomicUsize>);

impl ScratchHold {
    fn new(graphs_alive: &Arc<AtomicUsize>) -> ScratchHold {
        graphs_alive.fetch_add(1, Ordering::SeqCst);
        ScratchHold(graphs_alive.clone())
    }
}

impl Drop for ScratchHold {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

// SAFETY: CUDA graph objects may be used from any thread when calls on one are serialized
// (CUDA's "graph thread safety"): `replay` takes `&mut self`, and Graph is not Sync.
unsafe impl Send for Graph {}

enum Captured {
    Cuda(CudaGraph),
    Emu { runtime: Arc<EmuRuntime>, work: Vec<Recorded> },
}

impl Device {
    /// Starts capturing this device's work (the GPU devices): until `end_capture`, launches,
    /// matmuls and device copies are recorded into the graph instead of run.
    pub fn begin_capture(&self) -> Result<()> {
        match self {
            Device::Cpu => Err(Error::InvalidArgument("graph capture is for the GPU devices (cuda, emu)".into())),
            Device::Cuda(rt) => rt
                .stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .during("starting a graph capture"),
            Device::Emu(rt) => {
                if CAPTURING.get() {
                    return Err(Error::Capture("a capture is already under way on this thread".into()));
                }
                rt.begin_recording()?;
                CAPTURING.set(true);
                Ok(())
            }
        }
    }

    /// Ends the capture `begin_capture` started, and makes the graph.
    pub fn end_capture(&self) -> Result<Graph> {
        match self {
            Device::Cpu => Err(Error::InvalidArgument("graph capture is for the GPU devices (cuda, emu)".into())),
            Device::Cuda(rt) => {
                let graph = rt.stream.end_capture(CUgraphInstantiate_flags(0)).during("ending a graph capture")?;
                let graph = graph.ok_or_else(|| Error::Capture("the capture recorded no work".into()))?;
                Ok(Graph { captured: Captured::Cuda(graph), _scratch: ScratchHold::new(&rt.graphs_alive) })
            }
            Device::Emu(rt) => {
                CAPTURING.set(false);
                let work = rt.end_recording()?;
                let scratch = ScratchHold::new(&rt.graphs_alive);
                Ok(Graph { captured: Captured::Emu { runtime: rt.clone(), work }, _scratch: scratch })
            }
        }
    }
}

impl Graph {
    /// Runs the captured work again, queued on the device's stream.
    ///
    /// # Safety
    /// Every buffer the captured work used is still allocated where it was (a graph holds
    /// addresses, not buffers), and holds what the work expects.
    pub unsafe fn replay(&mut self) -> Result<()> {
        match &mut self.captured {
            Captured::Cuda(graph) => graph.launch().during("launching a captured graph"),
            Captured::Emu { runtime, work } => work.iter_mut().try_for_each(|w| w(runtime)),
        }
    }

    /// The pieces of work recorded (launches, matmuls, copies), on `emu`; None on CUDA.
    pub fn recorded(&self) -> Option<usize> {
        match &self.captured {
            Captured::Cuda(_) => None,
            Captured::Emu { work, .. } => Some(work.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::elementwise::fill;
    use clip_pgs_kernels::hw::emu::Options;

    #[test]
    fn captured_work_runs_only_when_replayed_and_host_accesses_are_refused() {
        let emu = Device::Emu(EmuRuntime::new(Options::default()));
        let mut x = emu.upload(&[1.0f32; 5]).unwrap();
        let y = emu.upload(&[2.0f32; 5]).unwrap();
        emu.begin_capture().unwrap();
        fill(&emu, x.view_mut(), 3.0).unwrap();
        let refused = [
            x.to_vec().map(|_| ()).unwrap_err(),
            emu.upload(&[1.0f32]).map(|_| ()).unwrap_err(),
            emu.alloc_zeros::<f32>(4, "a late buffer").map(|_| ()).unwrap_err(),
            x.write(crate::Span::new(0, 1), &[0.0]).unwrap_err(),
            emu.begin_capture().unwrap_err(),
        ];
        emu.copy(x.view_mut(), y.view()).unwrap();
        let mut graph = emu.end_capture().unwrap();
        let messages: Vec<String> = refused.iter().map(|e| e.to_string()).collect();
        for (m, what) in
            messages.iter().zip(["reading 5 values", "uploading 1", "allocating a late buffer", "writing 1"])
        {
            assert!(m.contains("not allowed while capturing a graph") && m.contains(what), "{m}");
        }
        assert_eq!(graph.recorded(), Some(2), "the fill and the copy");
        assert_eq!(x.to_vec().unwrap(), [1.0; 5], "captured work does not run at capture");
        fill(&emu, x.view_mut(), 0.0).unwrap();
        // SAFETY: x and y are where they were at capture.
        unsafe { graph.replay() }.unwrap();
        assert_eq!(x.to_vec().unwrap(), [2.0; 5], "the fill, then the copy, replayed in order");
    }

    #[test]
    fn scratch_memory_stays_put_while_a_graph_lives() {
        let emu = Device::Emu(EmuRuntime::new(Options::default()));
        emu.with_scratch(8, |_| Ok(())).unwrap();
        emu.begin_capture().unwrap();
        emu.with_scratch(8, |_| Ok(())).unwrap();
        let graph = emu.end_capture().unwrap();
        let e = emu.with_scratch(16, |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("16 floats of scratch memory asked for, more than the 8 a captured graph holds"), "{e}");
        drop(graph);
        emu.with_scratch(16, |_| Ok(())).unwrap();
    }
}
