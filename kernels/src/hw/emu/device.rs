//! The hardware layer on the host: the same functions and views as `nvptx.rs`, served by the
//! emulator. Views carry their length and buffer; every access is checked and counted, and
//! `#[track_caller]` gives each report the kernel's source line.

use core::marker::PhantomData;
use core::mem::{align_of, size_of};
use core::panic::Location;

use super::Site;
use super::block::{WarpOp, current};
use crate::element::Bf16;
use crate::hw::Word;

pub use super::Kernel;

pub fn thread_x() -> usize {
    current().thread_index()[0] as usize
}

pub fn block_x() -> usize {
    current().block().index[0] as usize
}

pub fn block_y() -> usize {
    current().block().index[1] as usize
}

pub fn block_z() -> usize {
    current().block().index[2] as usize
}

pub fn block_dim_x() -> usize {
    current().block().launch.config.block[0] as usize
}

pub fn grid_dim_x() -> usize {
    current().block().launch.config.grid[0] as usize
}

/// The lane (on the GPU read from `%laneid` at every call, so that LLVM does not hoist what is
/// derived from it); the same number as [`crate::hw::lane`].
pub fn lane_here() -> usize {
    thread_x() % 32
}

/// `__syncthreads()`: every live thread of the block must reach it, at the same source line.
#[track_caller]
pub fn sync_threads() {
    current().barrier(Location::caller());
}

/// `__syncwarp(mask)`: orders shared-memory accesses among the lanes of `mask`.
#[track_caller]
pub fn sync_warp(mask: u32) {
    current().warp_op(WarpOp::Sync, mask, [0; 10], Location::caller());
}

/// The value of lane `lane ^ b` (butterfly).
#[track_caller]
pub fn shfl_xor<T: Word>(mask: u32, v: T, b: u32) -> T {
    T::from_word(current().warp_op(WarpOp::ShflXor(b), mask, word(v.to_word()), Location::caller())[0])
}

/// The value of lane `b`.
#[track_caller]
pub fn shfl_idx<T: Word>(mask: u32, v: T, b: u32) -> T {
    T::from_word(current().warp_op(WarpOp::ShflIdx(b), mask, word(v.to_word()), Location::caller())[0])
}

/// The value of lane `lane + b` (own value past lane 31).
#[track_caller]
pub fn shfl_down<T: Word>(mask: u32, v: T, b: u32) -> T {
    T::from_word(current().warp_op(WarpOp::ShflDown(b), mask, word(v.to_word()), Location::caller())[0])
}

/// The value of lane `lane − b` (own value below lane 0).
#[track_caller]
pub fn shfl_up<T: Word>(mask: u32, v: T, b: u32) -> T {
    T::from_word(current().warp_op(WarpOp::ShflUp(b), mask, word(v.to_word()), Location::caller())[0])
}

/// Bit i set when lane i of `mask` has `predicate` true.
#[track_caller]
pub fn ballot(mask: u32, predicate: bool) -> u32 {
    current().warp_op(WarpOp::Ballot, mask, word(predicate as u32), Location::caller())[0]
}

/// One 32-bit operand of a collective.
fn word(v: u32) -> [u32; 10] {
    let mut operands = [0; 10];
    operands[0] = v;
    operands
}

/// `ldmatrix.sync.aligned.m8n8.x{N}[.trans].shared.b16`: this lane supplies `row`, the start of
/// row `lane % 8` of matrix `lane / 8` (8 bf16 values, 16-byte aligned); returns, per matrix,
/// this lane's pair of the matrix (or of its transpose). Every lane of the warp executes it.
#[track_caller]
pub fn ldmatrix<const N: usize, const TRANS: bool>(row: Shared<Bf16>) -> [u32; N] {
    let op = WarpOp::Ldmatrix { matrices: N as u8, trans: TRANS };
    let regs = current().warp_op(op, u32::MAX, word(row.offset as u32), Location::caller());
    core::array::from_fn(|i| regs[i])
}

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`: d = a·b + c on this warp's fragments
/// (layouts in `emu/tensor.rs`). Every lane of the warp executes it.
#[track_caller]
pub fn mma_bf16_m16n8k16(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    let operands = [a[0], a[1], a[2], a[3], b[0], b[1], c[0].to_bits(), c[1].to_bits(), c[2].to_bits(), c[3].to_bits()];
    current().warp_op(WarpOp::Mma, u32::MAX, operands, Location::caller()).map(f32::from_bits)
}

/// `cp.async.cg.shared.global` of 16 bytes: elements `src_index ..` of `src` to elements
/// `dst_index ..` of `dst` (both 16-byte aligned). The destination may be read only after a
/// [`cp_async_wait`] that covers the copy's group (and, for other threads, a barrier).
/// # Safety
/// As on the GPU; here out-of-bounds, misaligned and early accesses are reported.
#[track_caller]
pub unsafe fn cp_async_16<T: Copy>(dst: Shared<T>, dst_index: usize, src: Global<T>, src_index: usize) {
    let (size, last) = (size_of::<T>(), 16 / size_of::<T>() - 1);
    let site = Location::caller();
    let thread = current();
    let offset = src.start + src_index * size;
    thread.global(site, false, src.buffer, offset, 16, 16, src_index + last, src.len);
    // SAFETY: the 16 bytes are in bounds (checked above).
    let data = unsafe { (src.ptr.add(src_index) as *const [u8; 16]).read_unaligned() };
    thread.cp_async(site, dst.offset + dst_index * size, data, dst_index + last, dst.len);
}

/// `cp.async.commit_group`.
pub fn cp_async_commit() {
    current().cp_async_commit();
}

/// `cp.async.wait_group N`: waits until at most the newest `N` committed groups are in flight.
#[track_caller]
pub fn cp_async_wait<const N: u32>() {
    current().cp_async_wait(Location::caller(), N);
}

/// 2^x; on the GPU `ex2.approx` (within 2 ulp of this).
pub fn ex2_approx(x: f32) -> f32 {
    x.exp2()
}

/// log2 x; on the GPU `lg2.approx`.
pub fn lg2_approx(x: f32) -> f32 {
    x.log2()
}

/// Read-only global memory: `len` elements from `ptr`, which lies `start` bytes into buffer
/// number `buffer` of the launch.
pub struct Global<T> {
    ptr: *const T,
    len: usize,
    start: usize,
    buffer: u32,
}

/// Writable global memory.
pub struct GlobalMut<T> {
    ptr: *mut T,
    len: usize,
    start: usize,
    buffer: u32,
}

/// A view of the block's shared memory: `len` elements from byte `offset`.
pub struct Shared<T> {
    offset: usize,
    len: usize,
    _t: PhantomData<T>,
}

macro_rules! copy_send_sync {
    ($($view:ident),*) => {$(
        impl<T> Clone for $view<T> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<T> Copy for $view<T> {}
        // SAFETY: a view is an address and a length; the emulator hands the same views to all
        // blocks as the GPU hands them the same pointers. Accesses are the kernel's contract.
        unsafe impl<T> Send for $view<T> {}
        // SAFETY: as above.
        unsafe impl<T> Sync for $view<T> {}
    )*};
}
copy_send_sync!(Global, GlobalMut, Shared);

/// What both global views share: construction, length, checked loads, sub-views and casts.
macro_rules! global_view {
    ($view:ident, $ptr:ty) => {
        impl<T: Copy> $view<T> {
            /// A view of `len` elements at `ptr`, buffer number `buffer` of the launch.
            /// # Safety
            /// `ptr` is valid for the view's accesses to `len` elements for the whole launch.
            pub unsafe fn new(ptr: $ptr, len: usize, buffer: u32) -> Self {
                $view { ptr, len, start: 0, buffer }
            }

            pub fn len(self) -> usize {
                self.len
            }

            pub fn is_empty(self) -> bool {
                self.len == 0
            }

            /// Element `i`.
            /// # Safety
            /// As on the GPU; here an index past the end is reported, not performed.
            #[track_caller]
            pub unsafe fn load(self, i: usize) -> T {
                self.check(Location::caller(), false, i);
                // SAFETY: i < len, checked above. Unaligned: the emulator checks alignment against
                // the view's offset in its launch argument (as a GPU allocation, 256-byte
                // aligned), while the host memory behind it is only the element's.
                unsafe { self.ptr.add(i).read_unaligned() }
            }

            /// The view from element `n` on (empty when `n` is past the end).
            /// # Safety
            /// As on the GPU.
            pub unsafe fn offset(self, n: usize) -> Self {
                let n = n.min(self.len);
                $view {
                    ptr: self.ptr.wrapping_add(n),
                    len: self.len - n,
                    start: self.start + n * size_of::<T>(),
                    buffer: self.buffer,
                }
            }

            /// The same bytes as elements of another type.
            pub fn cast<U: Copy>(self) -> $view<U> {
                $view {
                    ptr: self.ptr.cast(),
                    len: self.len * size_of::<T>() / size_of::<U>(),
                    start: self.start,
                    buffer: self.buffer,
                }
            }

            /// Element 0's place in its 32-byte sector, in elements: (address mod 32) / size. The
            /// counters number a view's bytes from its start, so here that is the start's offset
            /// within the view it was cut from (0 for a launch argument).
            pub fn sector_offset(self) -> usize {
                (self.start % 32) / size_of::<T>()
            }

            /// Checks and counts an access to element `i`.
            fn check(self, site: Site, write: bool, i: usize) {
                let size = size_of::<T>();
                current().global(site, write, self.buffer, self.start + i * size, size, align_of::<T>(), i, self.len);
            }
        }
    };
}
global_view!(Global, *const T);
global_view!(GlobalMut, *mut T);

impl<T: Copy> Global<T> {
    /// An absent optional input.
    pub fn null() -> Self {
        Global { ptr: core::ptr::null(), len: 0, start: 0, buffer: 0 }
    }

    pub fn is_null(self) -> bool {
        self.ptr.is_null()
    }
}

impl<T: Copy> GlobalMut<T> {
    /// An absent optional output.
    pub fn null() -> Self {
        GlobalMut { ptr: core::ptr::null_mut(), len: 0, start: 0, buffer: 0 }
    }

    pub fn is_null(self) -> bool {
        self.ptr.is_null()
    }

    /// The same memory, read-only.
    pub fn read_only(self) -> Global<T> {
        Global { ptr: self.ptr, len: self.len, start: self.start, buffer: self.buffer }
    }

    /// # Safety
    /// As on the GPU; here an index past the end is reported, not performed.
    #[track_caller]
    pub unsafe fn store(self, i: usize, v: T) {
        self.check(Location::caller(), true, i);
        // SAFETY: i < len, checked above; unaligned as in `load`.
        unsafe { self.ptr.add(i).write_unaligned(v) }
    }
}

macro_rules! atomic_add {
    ($t:ty, $atomic:ty, $add:expr) => {
        impl GlobalMut<$t> {
            /// `atomicAdd`: adds `v` to element `i` and returns the old value.
            /// # Safety
            /// As on the GPU; here an index past the end is reported, not performed.
            #[track_caller]
            pub unsafe fn atomic_add(self, i: usize, v: $t) -> $t {
                self.check(Location::caller(), true, i);
                // SAFETY: in bounds and aligned (checked); blocks on other host threads use
                // atomics on the same words.
                let cell = unsafe { &*(self.ptr.add(i) as *const $atomic) };
                let old = cell.fetch_update(
                    core::sync::atomic::Ordering::Relaxed,
                    core::sync::atomic::Ordering::Relaxed,
                    |w| Some($add(w, v)),
                );
                <$t>::from_word(old.expect("the update always succeeds"))
            }
        }
    };
}
atomic_add!(f32, core::sync::atomic::AtomicU32, |w: u32, v: f32| (f32::from_bits(w) + v).to_bits());
atomic_add!(u32, core::sync::atomic::AtomicU32, |w: u32, v: u32| w.wrapping_add(v));

impl<T: Copy> Shared<T> {
    fn at(offset: usize, len: usize) -> Self {
        Shared { offset, len, _t: PhantomData }
    }

    /// # Safety
    /// As on the GPU; here an index past the end is reported, not performed.
    #[track_caller]
    pub unsafe fn load(self, i: usize) -> T {
        let size = size_of::<T>();
        let p = current().shared(Location::caller(), false, self.offset + i * size, size, align_of::<T>(), i, self.len);
        // SAFETY: checked in bounds of the block's shared memory.
        unsafe { (p as *const T).read_unaligned() }
    }

    /// # Safety
    /// As on the GPU; here an index past the end is reported, not performed.
    #[track_caller]
    pub unsafe fn store(self, i: usize, v: T) {
        let size = size_of::<T>();
        let p = current().shared(Location::caller(), true, self.offset + i * size, size, align_of::<T>(), i, self.len);
        // SAFETY: checked in bounds of the block's shared memory.
        unsafe { (p as *mut T).write_unaligned(v) }
    }

    /// The view from element `n` on.
    /// # Safety
    /// As on the GPU.
    pub unsafe fn offset(self, n: usize) -> Self {
        Shared::at(self.offset + n * size_of::<T>(), self.len.saturating_sub(n))
    }

    /// The same bytes as elements of another type.
    pub fn cast<U: Copy>(self) -> Shared<U> {
        Shared::at(self.offset, self.len * size_of::<T>() / size_of::<U>())
    }
}

/// The block's dynamic shared memory (`shared_bytes` of the launch).
pub fn dynamic_shared<T: Copy>() -> Shared<T> {
    Shared::at(0, current().dynamic_shared_bytes() / size_of::<T>())
}

/// A static shared array (see [`crate::shared_array!`]), allocated in the block on first use.
#[track_caller]
pub fn static_shared<T: Copy>(name: &'static str, len: usize) -> Shared<T> {
    Shared::at(current().static_shared(Location::caller(), name, len * size_of::<T>()), len)
}
