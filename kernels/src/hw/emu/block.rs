//! One block on one host thread: its GPU threads are stackful coroutines, scheduled warp by warp
//! from one synchronisation point to the next.
//!
//! A thread runs until it reaches a barrier, posts a warp collective, faults or exits. When no
//! thread can run: a warp collective completes once every lane of its member mask has posted it;
//! the barrier releases once every live thread waits at it (PTX semantics), and only if they all
//! wait at the same source line and none exited without it; anything else is a deadlock. Faults
//! stop the block and come back as an error; suspended threads are unwound.

use core::cell::{Cell, RefCell};
use std::format;
use std::string::{String, ToString};
use std::vec::Vec;

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};

use super::fault::{Fault, FaultKind, Site, Space};
use super::shared::{Accessor, SharedMemory};
use super::tensor;
use super::traffic::{BlockTraffic, SiteTraffic};
use super::{LaunchContext, Order};

/// Stack per GPU thread: kernels are shallow, but a panic's unwinding needs well over 16 KiB.
/// Only the pages touched are ever backed by memory.
const STACK_BYTES: usize = 256 * 1024;

std::thread_local! {
    /// The GPU thread running on this host thread (set around every resume).
    static CURRENT: Cell<*const Thread> = const { Cell::new(core::ptr::null()) };
    /// Coroutine stacks for reuse: creating one costs microseconds.
    static STACKS: RefCell<Vec<DefaultStack>> = const { RefCell::new(Vec::new()) };
    /// Shared memory and shadow, reused block after block.
    static SHARED: RefCell<SharedMemory> = RefCell::new(SharedMemory::default());
}

/// Why a thread stopped running.
pub(super) enum Event {
    Barrier(Site),
    Warp,
    Fault,
}

/// A warp collective as one lane posts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WarpOp {
    ShflXor(u32),
    ShflIdx(u32),
    ShflDown(u32),
    ShflUp(u32),
    Ballot,
    Sync,
    /// `ldmatrix` of this many 8×8 matrices; the lane's value is its row's shared byte offset.
    Ldmatrix {
        matrices: u8,
        trans: bool,
    },
    /// `mma.sync.m16n8k16` bf16 → f32: the lane's value is a[4], b[2], c[4] (f32 bits).
    Mma,
}

/// What a lane posts with a collective, and what it gets back.
pub(super) type Operands = [u32; 10];
pub(super) type Results = [u32; 4];

#[derive(Clone, Copy)]
struct Post {
    op: WarpOp,
    mask: u32,
    value: Operands,
    site: Site,
}

/// The state of a block that its threads reach through [`current`].
pub(super) struct Block<'a> {
    pub launch: &'a LaunchContext,
    pub index: [u32; 3],
    epoch: Cell<u32>,
    warp_epochs: RefCell<Vec<u32>>,
    /// Per warp, the lanes that have not exited.
    live: RefCell<Vec<u32>>,
    shared: &'a RefCell<SharedMemory>,
    traffic: RefCell<BlockTraffic>,
    fault: RefCell<Option<(u32, Site, FaultKind)>>,
}

/// An issued `cp.async`: its group (None before the commit), shared byte offset, the 16 bytes
/// read at issue, and site.
type AsyncCopy = (Option<u32>, usize, [u8; 16], Site);

/// One GPU thread.
pub(super) struct Thread {
    pub tid: u32,
    block: *const Block<'static>,
    yielder: Cell<*const Yielder<(), Event>>,
    post: Cell<Option<Post>>,
    result: Cell<Results>,
    /// Accesses per site since the last barrier (to match lanes into warp requests).
    occurrences: RefCell<Vec<(usize, u32)>>,
    /// Issued `cp.async` copies.
    async_copies: RefCell<Vec<AsyncCopy>>,
    /// Groups committed so far.
    async_groups: Cell<u32>,
}

/// The thread running now. Panics outside an emulated kernel (a hardware-layer call from host
/// code is a programming error).
pub(super) fn current() -> &'static Thread {
    let p = CURRENT.with(Cell::get);
    assert!(!p.is_null(), "a clip-pgs-kernels hardware-layer function was called outside an emulated kernel");
    // SAFETY: set by the scheduler to a thread that outlives the resume.
    unsafe { &*p }
}

impl Thread {
    pub fn block(&self) -> &Block<'static> {
        // SAFETY: the block outlives its threads' coroutines.
        unsafe { &*self.block }
    }

    pub fn thread_index(&self) -> [u32; 3] {
        self.block().launch.thread_xyz(self.tid)
    }

    fn suspend(&self, event: Event) {
        // SAFETY: set when the coroutine started; valid while it runs.
        unsafe { &*self.yielder.get() }.suspend(event)
    }

    /// Records the fault and stops this thread for good.
    pub fn fail(&self, site: Site, kind: FaultKind) -> ! {
        self.block().fault.borrow_mut().get_or_insert((self.tid, site, kind));
        self.suspend(Event::Fault);
        unreachable!("a faulted GPU thread was resumed")
    }

    pub fn barrier(&self, site: Site) {
        self.suspend(Event::Barrier(site));
    }

    /// Posts a warp collective and returns this lane's result.
    pub fn warp_op(&self, op: WarpOp, mask: u32, value: Operands, site: Site) -> Results {
        let lane = self.tid % 32;
        if mask & (1 << lane) == 0 {
            self.fail(
                site,
                FaultKind::WarpCollective {
                    message: format!("lane {lane} executes a collective whose member mask {mask:#010x} excludes it"),
                },
            );
        }
        self.post.set(Some(Post { op, mask, value, site }));
        self.suspend(Event::Warp);
        self.result.get()
    }

    /// The n-th access of this thread at `site` since the last barrier.
    fn occurrence(&self, site: Site) -> u32 {
        let key = site as *const _ as usize;
        let mut seen = self.occurrences.borrow_mut();
        match seen.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                seen.push((key, 0));
                0
            }
        }
    }

    fn count(&self, site: Site, space: Space, write: bool, key: u64, size: usize) {
        let block = self.block();
        if !block.launch.options.counters {
            return;
        }
        let (warp, lane) = (self.tid as usize / 32, self.tid as usize % 32);
        let live = block.live.borrow()[warp];
        let occurrence = self.occurrence(site);
        block.traffic.borrow_mut().record(warp, lane, live, site, occurrence, space, write, key, size);
    }

    /// Checks and counts a global access of `size` bytes at `byte_offset` of `buffer`: element
    /// `index` of a view of `len`.
    #[allow(clippy::too_many_arguments)]
    pub fn global(
        &self,
        site: Site,
        write: bool,
        buffer: u32,
        byte_offset: usize,
        size: usize,
        align: usize,
        index: usize,
        len: usize,
    ) {
        if index >= len {
            self.fail(site, FaultKind::OutOfBounds { space: Space::Global, write, index, len, byte_offset });
        }
        if !byte_offset.is_multiple_of(align) {
            self.fail(site, FaultKind::Misaligned { space: Space::Global, byte_offset, align });
        }
        let launch = self.block().launch;
        if launch.options.counters {
            launch.touch(buffer, byte_offset, size, write);
            self.count(site, Space::Global, write, ((buffer as u64) << 48) | byte_offset as u64, size);
        }
    }

    /// Checks, records and counts a shared access; returns the address of its bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn shared(
        &self,
        site: Site,
        write: bool,
        byte_offset: usize,
        size: usize,
        align: usize,
        index: usize,
        len: usize,
    ) -> *mut u8 {
        let block = self.block();
        let mut memory = block.shared.borrow_mut();
        if index >= len || byte_offset + size > memory.len() {
            drop(memory);
            self.fail(site, FaultKind::OutOfBounds { space: Space::Shared, write, index, len, byte_offset });
        }
        if !byte_offset.is_multiple_of(align) {
            drop(memory);
            self.fail(site, FaultKind::Misaligned { space: Space::Shared, byte_offset, align });
        }
        let epochs = block.warp_epochs.borrow();
        let by = Accessor { thread: self.tid, epoch: block.epoch.get(), warp_epochs: &epochs, site };
        let access = if write {
            memory.write(byte_offset, size, &by)
        } else {
            memory.read(byte_offset, size, &by).map(|p| p as *mut u8)
        };
        drop(epochs);
        drop(memory);
        match access {
            Ok(p) => {
                self.count(site, Space::Shared, write, byte_offset as u64, size);
                p
            }
            Err(kind) => self.fail(site, kind),
        }
    }

    /// `cp.async` of 16 bytes from `src` (checked like a global read of `global` below) to shared
    /// byte `offset`. The source is read now; the destination is written at the wait.
    pub fn cp_async(&self, site: Site, offset: usize, src: [u8; 16], index: usize, len: usize) {
        if index >= len {
            self.fail(
                site,
                FaultKind::OutOfBounds { space: Space::Shared, write: true, index, len, byte_offset: offset },
            );
        }
        let block = self.block();
        let mut memory = block.shared.borrow_mut();
        let fault = if offset + 16 > memory.len() {
            Some(FaultKind::OutOfBounds { space: Space::Shared, write: true, index, len, byte_offset: offset })
        } else if !offset.is_multiple_of(16) {
            Some(FaultKind::Misaligned { space: Space::Shared, byte_offset: offset, align: 16 })
        } else {
            memory.begin_async(offset, 16).err()
        };
        drop(memory);
        if let Some(kind) = fault {
            self.fail(site, kind);
        }
        self.async_copies.borrow_mut().push((None, offset, src, site));
    }

    /// `cp.async.commit_group`: the copies issued since the last commit form a group.
    pub fn cp_async_commit(&self) {
        let group = self.async_groups.get();
        for copy in self.async_copies.borrow_mut().iter_mut().filter(|c| c.0.is_none()) {
            copy.0 = Some(group);
        }
        self.async_groups.set(group + 1);
    }

    /// `cp.async.wait_group n`: every committed group but the newest `n` has landed.
    pub fn cp_async_wait(&self, site: Site, newest: u32) {
        let done_below = self.async_groups.get().saturating_sub(newest);
        let landed: Vec<_> = {
            let mut copies = self.async_copies.borrow_mut();
            let (landed, waiting) = copies.drain(..).partition(|c| c.0.is_some_and(|g| g < done_below));
            *copies = waiting;
            landed
        };
        let block = self.block();
        for (_, offset, data, _) in landed {
            let epochs = block.warp_epochs.borrow();
            let by = Accessor { thread: self.tid, epoch: block.epoch.get(), warp_epochs: &epochs, site };
            let result = block.shared.borrow_mut().finish_async(offset, &data, &by);
            drop(epochs);
            if let Err(kind) = result {
                self.fail(site, kind);
            }
        }
    }

    /// The offset of a static shared array, allocated in this block on first use.
    pub fn static_shared(&self, site: Site, name: &'static str, bytes: usize) -> usize {
        let block = self.block();
        let limit = block.launch.limits.max_shared_bytes;
        let offset = block.shared.borrow_mut().static_array(name, bytes, limit);
        offset.unwrap_or_else(|kind| self.fail(site, kind))
    }

    /// Bytes of dynamic shared memory of the launch.
    pub fn dynamic_shared_bytes(&self) -> usize {
        self.block().launch.config.shared_bytes as usize
    }
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Ready,
    Barrier(Site),
    Warp,
    Exited,
}

/// What a block leaves behind: its traffic per site and its barriers.
pub(super) struct BlockReport {
    pub sites: std::collections::HashMap<usize, SiteTraffic>,
    pub barriers: u64,
}

/// Runs block `index` of a launch to completion.
pub(super) fn run<P: Copy + 'static>(
    launch: &LaunchContext,
    kernel: fn(P),
    params: P,
    index: [u32; 3],
) -> Result<BlockReport, Fault> {
    SHARED.with(|shared| {
        shared.borrow_mut().reset(launch.config.shared_bytes as usize);
        let n = launch.threads_per_block();
        let warps = n.div_ceil(32);
        let block = Block {
            launch,
            index,
            epoch: Cell::new(0),
            warp_epochs: RefCell::new(std::vec![0; warps]),
            live: RefCell::new((0..warps).map(|w| lanes_mask(n.min(32 * w + 32) - 32 * w)).collect()),
            shared,
            traffic: RefCell::new(BlockTraffic::new(warps)),
            fault: RefCell::new(None),
        };
        // SAFETY: the lifetime is erased for the threads' back pointer; the block outlives them.
        let block_ptr: *const Block<'static> = (&block as *const Block<'_>).cast();
        let threads: Vec<Thread> = (0..n as u32)
            .map(|tid| Thread {
                tid,
                block: block_ptr,
                yielder: Cell::new(core::ptr::null()),
                post: Cell::new(None),
                result: Cell::new([0; 4]),
                occurrences: RefCell::new(Vec::new()),
                async_copies: RefCell::new(Vec::new()),
                async_groups: Cell::new(0),
            })
            .collect();
        let mut scheduler = Scheduler {
            block: &block,
            threads: &threads,
            coroutines: Vec::with_capacity(n),
            states: std::vec![State::Ready; n],
        };
        for thread in &threads {
            let thread: *const Thread = thread;
            let stack = STACKS.with(|s| s.borrow_mut().pop()).unwrap_or_else(|| {
                DefaultStack::new(STACK_BYTES).expect("allocating a coroutine stack for an emulated GPU thread")
            });
            scheduler.coroutines.push(Some(Coroutine::with_stack(stack, move |yielder: &Yielder<(), Event>, ()| {
                // SAFETY: the thread outlives its coroutine.
                unsafe { (*thread).yielder.set(yielder) };
                kernel(params)
            })));
        }
        let outcome = scheduler.run(launch.options.order);
        drop(scheduler); // unwinds unfinished threads, returns the stacks
        outcome.map_err(|(tid, site, kind)| launch.fault(index, tid, site, kind))?;
        let barriers = block.traffic.borrow().barriers;
        let sites = block.traffic.into_inner().into_sites();
        Ok(BlockReport { sites, barriers })
    })
}

fn lanes_mask(lanes: usize) -> u32 {
    if lanes >= 32 { u32::MAX } else { (1u32 << lanes) - 1 }
}

type Raised = (Option<u32>, Option<Site>, FaultKind);

struct Scheduler<'a, 'b> {
    block: &'a Block<'b>,
    threads: &'a [Thread],
    coroutines: Vec<Option<Coroutine<(), Event, ()>>>,
    states: Vec<State>,
}

impl Scheduler<'_, '_> {
    fn run(&mut self, order: Order) -> Result<(), Raised> {
        let n = self.threads.len();
        let warps = n.div_ceil(32);
        let threads: Vec<usize> = match order {
            Order::Forward => (0..n).collect(),
            Order::Reverse => (0..n).rev().collect(),
        };
        loop {
            for &t in &threads {
                if self.states[t] == State::Ready {
                    self.resume(t)?;
                }
            }
            let mut released = false;
            for w in 0..warps {
                released |= self.complete_warp(w)?;
            }
            if released {
                continue;
            }
            if !self.release_barrier()? {
                return Ok(());
            }
        }
    }

    fn resume(&mut self, t: usize) -> Result<(), Raised> {
        let coroutine = self.coroutines[t].as_mut().expect("a ready thread has its coroutine");
        CURRENT.with(|c| c.set(&self.threads[t]));
        let result = std::panic::catch_unwind(core::panic::AssertUnwindSafe(|| coroutine.resume(())));
        CURRENT.with(|c| c.set(core::ptr::null()));
        match result {
            Ok(CoroutineResult::Yield(Event::Barrier(site))) => self.states[t] = State::Barrier(site),
            Ok(CoroutineResult::Yield(Event::Warp)) => self.states[t] = State::Warp,
            Ok(CoroutineResult::Yield(Event::Fault)) => {
                let (tid, site, kind) =
                    self.block.fault.borrow_mut().take().expect("a faulting thread records its fault");
                return Err((Some(tid), Some(site), kind));
            }
            Ok(CoroutineResult::Return(())) => {
                self.states[t] = State::Exited;
                self.block.live.borrow_mut()[t / 32] &= !(1 << (t % 32));
            }
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                return Err((Some(t as u32), None, FaultKind::Panic { message }));
            }
        }
        Ok(())
    }

    /// Completes the warp collectives of warp `w` whose lanes have all posted; true if any did.
    fn complete_warp(&mut self, w: usize) -> Result<bool, Raised> {
        let n = self.threads.len();
        let lanes = 32 * w..n.min(32 * w + 32);
        let mut released = false;
        for t in lanes.clone() {
            if self.states[t] != State::Warp {
                continue;
            }
            let post = self.threads[t].post.get().expect("a waiting lane posted");
            let fail = |message: String| Err((Some(t as u32), Some(post.site), FaultKind::WarpCollective { message }));
            let members: Vec<usize> = (0..32).filter(|l| post.mask & (1 << l) != 0).map(|l| 32 * w + l).collect();
            if let Some(&m) = members.iter().find(|&&m| m >= n) {
                return fail(format!("member mask {:#010x} names lane {} which does not exist", post.mask, m % 32));
            }
            if let Some(&m) = members.iter().find(|&&m| self.states[m] == State::Exited) {
                return fail(format!("member mask {:#010x} names lane {} which has exited", post.mask, m % 32));
            }
            if !members.iter().all(|&m| self.states[m] == State::Warp) {
                continue;
            }
            let posts: Vec<Post> = members.iter().map(|&m| self.threads[m].post.get().expect("posted")).collect();
            if let Some(other) = posts.iter().find(|p| p.mask != post.mask || p.op != post.op) {
                return fail(format!(
                    "lanes of one member mask disagree: {:?} with mask {:#010x} at {} against {:?} with mask {:#010x} at {}",
                    post.op, post.mask, post.site, other.op, other.mask, other.site
                ));
            }
            let value = |lane: usize| posts[members.iter().position(|&m| m == 32 * w + lane).expect("member")].value;
            let results = match post.op {
                WarpOp::Ldmatrix { matrices, trans } => {
                    if post.mask != u32::MAX {
                        return fail("ldmatrix is .aligned: all 32 lanes must execute it".into());
                    }
                    let mut rows = [[[0u16; 8]; 8]; 4];
                    for (i, matrix) in rows.iter_mut().enumerate().take(matrices as usize) {
                        for (r, row) in matrix.iter_mut().enumerate() {
                            let lane = 8 * i + r;
                            *row = self.shared_row(32 * w + lane, value(lane)[0] as usize, post.site)?;
                        }
                    }
                    tensor::ldmatrix(&rows[..matrices as usize], trans).to_vec()
                }
                WarpOp::Mma => {
                    if post.mask != u32::MAX {
                        return fail("mma.sync is .aligned: all 32 lanes must execute it".into());
                    }
                    let lanes: [([u32; 4], [u32; 2], [f32; 4]); 32] = core::array::from_fn(|l| {
                        let v = value(l);
                        ([v[0], v[1], v[2], v[3]], [v[4], v[5]], [6, 7, 8, 9].map(|i| f32::from_bits(v[i])))
                    });
                    tensor::mma_m16n8k16(&lanes).iter().map(|d| d.map(f32::to_bits)).collect()
                }
                _ => {
                    let mut results = Vec::with_capacity(members.len());
                    for &m in &members {
                        let lane = m % 32;
                        let source = match post.op {
                            WarpOp::ShflXor(b) => Some(lane ^ (b as usize & 31)),
                            WarpOp::ShflIdx(b) => Some(b as usize & 31),
                            WarpOp::ShflDown(b) => {
                                Some(if lane + (b as usize) < 32 { lane + b as usize } else { lane })
                            }
                            WarpOp::ShflUp(b) => Some(lane.checked_sub(b as usize).unwrap_or(lane)),
                            _ => None,
                        };
                        let result = match (post.op, source) {
                            (_, Some(s)) if post.mask & (1 << s) == 0 => {
                                return fail(format!(
                                    "lane {lane} reads lane {s}, outside the member mask {:#010x}",
                                    post.mask
                                ));
                            }
                            (_, Some(s)) => value(s)[0],
                            (WarpOp::Ballot, None) => members
                                .iter()
                                .zip(&posts)
                                .filter(|(_, p)| p.value[0] != 0)
                                .fold(0, |b, (&m, _)| b | 1 << (m % 32)),
                            _ => 0,
                        };
                        results.push([result, 0, 0, 0]);
                    }
                    results
                }
            };
            for (&m, result) in members.iter().zip(results) {
                self.threads[m].result.set(result);
                self.threads[m].post.set(None);
                self.states[m] = State::Ready;
            }
            if post.op == WarpOp::Sync {
                self.block.warp_epochs.borrow_mut()[w] += 1;
            }
            released = true;
        }
        Ok(released)
    }

    /// The 8 b16 values of an `ldmatrix` row at shared byte `offset`, read on behalf of thread
    /// `tid` (checked as its own read: bounds, 16-byte alignment, races, initialization).
    fn shared_row(&self, tid: usize, offset: usize, site: Site) -> Result<[u16; 8], Raised> {
        let raise = |kind| Err((Some(tid as u32), Some(site), kind));
        let mut memory = self.block.shared.borrow_mut();
        if offset + 16 > memory.len() {
            return raise(FaultKind::OutOfBounds {
                space: Space::Shared,
                write: false,
                index: offset / 2,
                len: memory.len() / 2,
                byte_offset: offset,
            });
        }
        if !offset.is_multiple_of(16) {
            return raise(FaultKind::Misaligned { space: Space::Shared, byte_offset: offset, align: 16 });
        }
        let epochs = self.block.warp_epochs.borrow();
        let by = Accessor { thread: tid as u32, epoch: self.block.epoch.get(), warp_epochs: &epochs, site };
        match memory.read(offset, 16, &by) {
            // SAFETY: 16 bytes in bounds (checked above).
            Ok(p) => Ok(core::array::from_fn(|i| unsafe { (p as *const u16).add(i).read_unaligned() })),
            Err(kind) => raise(kind),
        }
    }

    /// Releases the block barrier when every live thread waits at it; false when the block is
    /// done. Divergence, early exits and deadlocks are faults.
    fn release_barrier(&mut self) -> Result<bool, Raised> {
        let live: Vec<usize> = (0..self.states.len()).filter(|&t| self.states[t] != State::Exited).collect();
        let Some(&first) = live.first() else { return Ok(false) };
        let block_fault = |kind| Err((None, None, kind));
        match self.states[first] {
            State::Barrier(site) if live.iter().all(|&t| matches!(self.states[t], State::Barrier(_))) => {
                if let Some(&other) = live.iter().find(|&&t| self.states[t] != State::Barrier(site)) {
                    let State::Barrier(other_site) = self.states[other] else { unreachable!() };
                    let launch = self.block.launch;
                    return block_fault(FaultKind::DivergentBarrier {
                        a: (launch.thread_xyz(first as u32), site),
                        b: (launch.thread_xyz(other as u32), other_site),
                    });
                }
                let exited = self.states.len() - live.len();
                if exited > 0 {
                    return block_fault(FaultKind::BarrierNotReached { site, arrived: live.len(), exited });
                }
                self.block.epoch.set(self.block.epoch.get() + 1);
                let mut traffic = self.block.traffic.borrow_mut();
                traffic.barriers += 1;
                traffic.flush();
                for &t in &live {
                    self.threads[t].occurrences.borrow_mut().clear();
                    self.states[t] = State::Ready;
                }
                Ok(true)
            }
            _ => block_fault(FaultKind::Deadlock { waits: self.describe_waits(&live) }),
        }
    }

    fn describe_waits(&self, live: &[usize]) -> String {
        let mut sites: Vec<(String, usize)> = Vec::new();
        for &t in live {
            let what = match self.states[t] {
                State::Barrier(site) => format!("barrier at {site}"),
                State::Warp => {
                    let post = self.threads[t].post.get().expect("posted");
                    format!("{:?} (mask {:#010x}) at {}", post.op, post.mask, post.site)
                }
                State::Ready | State::Exited => continue,
            };
            match sites.iter_mut().find(|(w, _)| *w == what) {
                Some((_, count)) => *count += 1,
                None => sites.push((what, 1)),
            }
        }
        let waits: Vec<String> = sites.iter().map(|(w, c)| format!("{c} thread(s) wait at {w}")).collect();
        waits.join("; ")
    }

    /// Unwinds unfinished threads and returns every stack to the pool.
    fn recycle(&mut self) {
        for slot in &mut self.coroutines {
            if let Some(mut coroutine) = slot.take() {
                if !coroutine.done() {
                    coroutine.force_unwind();
                }
                STACKS.with(|s| s.borrow_mut().push(coroutine.into_stack()));
            }
        }
    }
}

impl Drop for Scheduler<'_, '_> {
    fn drop(&mut self) {
        self.recycle();
    }
}
