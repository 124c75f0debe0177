//! What the emulator reports, as compute-sanitizer would: the kernel, block, thread, address and
//! the kernel's source line of every fault.

use core::fmt;
use core::panic::Location;
use std::string::String;

/// Global or shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    Global,
    Shared,
}

/// The order of two conflicting shared-memory accesses with no barrier between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hazard {
    ReadAfterWrite,
    WriteAfterRead,
    WriteAfterWrite,
}

/// A source line of kernel code (`#[track_caller]` of the hardware layer).
pub type Site = &'static Location<'static>;

#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    /// An access past the end of a view: element `index` of `len`.
    OutOfBounds { space: Space, write: bool, index: usize, len: usize, byte_offset: usize },
    /// An access whose address is not a multiple of the element's alignment.
    Misaligned { space: Space, byte_offset: usize, align: usize },
    /// Two threads touched the same shared byte between two barriers, one of them writing.
    Race { hazard: Hazard, byte_offset: usize, other_thread: [u32; 3], other_site: Option<Site> },
    /// A read of shared memory no thread wrote in this launch.
    Uninitialized { byte_offset: usize },
    /// An access to shared memory that an issued `cp.async` has not finished writing (its
    /// `cp.async.wait_group` is missing or comes later).
    AsyncCopyPending { byte_offset: usize },
    /// Threads wait at barriers on different source lines.
    DivergentBarrier { a: ([u32; 3], Site), b: ([u32; 3], Site) },
    /// Every live thread waits at a barrier, but some threads of the block exited without it.
    BarrierNotReached { site: Site, arrived: usize, exited: usize },
    /// Every live thread waits and none can go on; `waits` says who waits where.
    Deadlock { waits: String },
    /// A warp shuffle, vote or `__syncwarp` that cannot complete as posted.
    WarpCollective { message: String },
    /// Static plus dynamic shared memory beyond the device's limit.
    SharedLimit { bytes: usize, limit: usize },
    /// The kernel's Rust code panicked.
    Panic { message: String },
}

/// An emulated kernel fault: an error value, never an abort.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub kernel: &'static str,
    pub block: [u32; 3],
    /// The faulting thread (absent for block-wide faults: deadlock, divergent barrier).
    pub thread: Option<[u32; 3]>,
    pub site: Option<Site>,
    pub kind: FaultKind,
}

struct Xyz([u32; 3]);

impl fmt::Display for Xyz {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {}, {})", self.0[0], self.0[1], self.0[2])
    }
}

fn space(s: Space) -> &'static str {
    match s {
        Space::Global => "global",
        Space::Shared => "shared",
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel {} block {}", self.kernel, Xyz(self.block))?;
        if let Some(t) = self.thread {
            write!(f, " thread {}", Xyz(t))?;
        }
        if let Some(site) = self.site {
            write!(f, " at {site}")?;
        }
        f.write_str(": ")?;
        match &self.kind {
            FaultKind::OutOfBounds { space: s, write, index, len, byte_offset } => write!(
                f,
                "out-of-bounds {} {} memory: element {index} of a view of {len} (byte offset {byte_offset:#x})",
                if *write { "write to" } else { "read of" },
                space(*s)
            ),
            FaultKind::Misaligned { space: s, byte_offset, align } => {
                write!(f, "misaligned {} access: byte offset {byte_offset:#x} is not a multiple of {align}", space(*s))
            }
            FaultKind::Race { hazard, byte_offset, other_thread, other_site } => {
                let (what, other) = match hazard {
                    Hazard::ReadAfterWrite => ("reads", "written"),
                    Hazard::WriteAfterRead => ("writes", "read"),
                    Hazard::WriteAfterWrite => ("writes", "written"),
                };
                write!(
                    f,
                    "shared-memory race ({hazard:?}): {what} shared byte {byte_offset:#x}, {other} by thread {}",
                    Xyz(*other_thread)
                )?;
                if let Some(s) = other_site {
                    write!(f, " at {s}")?;
                }
                f.write_str(" with no barrier in between")
            }
            FaultKind::Uninitialized { byte_offset } => {
                write!(f, "read of uninitialized shared memory: byte {byte_offset:#x} was not written in this launch")
            }
            FaultKind::AsyncCopyPending { byte_offset } => write!(
                f,
                "shared byte {byte_offset:#x} is the destination of a cp.async not yet waited for (cp.async.wait_group missing or too late)"
            ),
            FaultKind::DivergentBarrier { a, b } => write!(
                f,
                "divergent barrier: thread {} waits at {} while thread {} waits at {}",
                Xyz(a.0),
                a.1,
                Xyz(b.0),
                b.1
            ),
            FaultKind::BarrierNotReached { site, arrived, exited } => write!(
                f,
                "barrier at {site} not reached by every thread: {arrived} arrived, {exited} exited without reaching it"
            ),
            FaultKind::Deadlock { waits } => write!(f, "deadlock, no thread can go on: {waits}"),
            FaultKind::WarpCollective { message } => write!(f, "warp collective: {message}"),
            FaultKind::SharedLimit { bytes, limit } => {
                write!(f, "{bytes} bytes of shared memory per block exceed the limit of {limit}")
            }
            FaultKind::Panic { message } => write!(f, "the kernel panicked: {message}"),
        }
    }
}

impl std::error::Error for Fault {}
