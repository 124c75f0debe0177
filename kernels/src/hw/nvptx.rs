//! The hardware layer on the GPU: special registers, `bar.sync`, `shfl.sync`, `vote.sync`,
//! atomics and `ex2`/`lg2` as inline PTX; views as bare pointers (plain `ld`/`st`).

use core::arch::nvptx;

use super::Word;

#[inline(always)]
pub fn thread_x() -> usize {
    // SAFETY: reading a special register.
    unsafe { nvptx::_thread_idx_x() as usize }
}

#[inline(always)]
pub fn block_x() -> usize {
    // SAFETY: reading a special register.
    unsafe { nvptx::_block_idx_x() as usize }
}

#[inline(always)]
pub fn block_y() -> usize {
    // SAFETY: reading a special register.
    unsafe { nvptx::_block_idx_y() as usize }
}

#[inline(always)]
pub fn block_z() -> usize {
    // SAFETY: reading a special register.
    unsafe { nvptx::_block_idx_z() as usize }
}

#[inline(always)]
pub fn block_dim_x() -> usize {
    // SAFETY: reading a special register.
    unsafe { nvptx::_block_dim_x() as usize }
}

#[inline(always)]
pub fn grid_dim_x() -> usize {
    // SAFETY: reading a special register.
    unsafe { nvptx::_grid_dim_x() as usize }
}

/// The lane, read from `%laneid` at every call: an asm statement LLVM neither hoists out of a
/// loop nor merges with another call's, so values derived from it (the per-lane bounds of an
/// unrolled register array) are recomputed where they are used instead of being held in
/// registers across the loop. [`super::lane`] gives the same number.
#[inline(always)]
pub fn lane_here() -> usize {
    let lane: u32;
    // SAFETY: reads a special register; no memory is touched.
    unsafe { core::arch::asm!("mov.u32 {l}, %laneid;", l = out(reg32) lane) };
    lane as usize
}

/// `__syncthreads()`. Every thread of the block must reach it, at the same call site.
#[inline(always)]
pub fn sync_threads() {
    // SAFETY: a barrier; callers keep it in uniform control flow.
    unsafe { nvptx::_syncthreads() }
}

/// `__syncwarp(mask)`: orders shared-memory accesses among the lanes of `mask`.
#[inline(always)]
pub fn sync_warp(mask: u32) {
    // SAFETY: a warp barrier over the lanes of `mask`, which must all execute it.
    unsafe { core::arch::asm!("bar.warp.sync {m};", m = in(reg32) mask) }
}

macro_rules! shfl {
    ($(#[$doc:meta])* $name:ident, $mode:literal, $clamp:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub fn $name<T: Word>(mask: u32, v: T, b: u32) -> T {
            let out: u32;
            // SAFETY: every lane of `mask` executes this shuffle (the caller's contract).
            unsafe {
                core::arch::asm!(
                    concat!("shfl.sync.", $mode, ".b32 {o}, {v}, {b}, ", $clamp, ", {m};"),
                    o = out(reg32) out, v = in(reg32) v.to_word(), b = in(reg32) b, m = in(reg32) mask
                )
            };
            T::from_word(out)
        }
    };
}
shfl!(
    /// The value of lane `lane ^ b` (butterfly).
    shfl_xor, "bfly", "0x1f"
);
shfl!(
    /// The value of lane `b`.
    shfl_idx, "idx", "0x1f"
);
shfl!(
    /// The value of lane `lane + b` (own value past lane 31).
    shfl_down, "down", "0x1f"
);
shfl!(
    /// The value of lane `lane − b` (own value below lane 0).
    shfl_up, "up", "0"
);

/// Bit i set when lane i of `mask` has `predicate` true.
#[inline(always)]
pub fn ballot(mask: u32, predicate: bool) -> u32 {
    let out: u32;
    // SAFETY: every lane of `mask` executes this vote (the caller's contract).
    unsafe {
        core::arch::asm!(
            "{{ .reg .pred p; setp.ne.u32 p, {v}, 0; vote.sync.ballot.b32 {o}, p, {m}; }}",
            o = out(reg32) out, v = in(reg32) predicate as u32, m = in(reg32) mask
        )
    };
    out
}

/// 2^x by `ex2.approx.ftz.f32` (about 2 ulp, subnormal results flushed to zero).
#[inline(always)]
pub fn ex2_approx(x: f32) -> f32 {
    let y: f32;
    // SAFETY: a pure arithmetic instruction on registers.
    unsafe { core::arch::asm!("ex2.approx.ftz.f32 {y}, {x};", y = out(reg32) y, x = in(reg32) x) };
    y
}

/// log2 x by `lg2.approx.ftz.f32`.
#[inline(always)]
pub fn lg2_approx(x: f32) -> f32 {
    let y: f32;
    // SAFETY: a pure arithmetic instruction on registers.
    unsafe { core::arch::asm!("lg2.approx.ftz.f32 {y}, {x};", y = out(reg32) y, x = in(reg32) x) };
    y
}

/// Read-only global memory: a pointer (the kernel parameter is a `.u64`).
#[repr(transparent)]
pub struct Global<T> {
    ptr: *const T,
}

/// Writable global memory.
#[repr(transparent)]
pub struct GlobalMut<T> {
    ptr: *mut T,
}

/// Shared memory of the block, as a generic address.
#[repr(transparent)]
pub struct Shared<T> {
    ptr: *mut T,
}

macro_rules! copy {
    ($($view:ident),*) => {$(
        impl<T> Clone for $view<T> {
            #[inline(always)]
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<T> Copy for $view<T> {}
    )*};
}
copy!(Global, GlobalMut, Shared);

/// What both global views share: loads, sub-views and casts, as plain pointer arithmetic.
macro_rules! global_view {
    ($view:ident, $ptr:ident) => {
        impl<T: Copy> $view<T> {
            /// Element `i`.
            /// # Safety
            /// `i` is inside the buffer.
            #[inline(always)]
            pub unsafe fn load(self, i: usize) -> T {
                unsafe { *self.ptr.add(i) }
            }

            /// The view from element `n` on.
            /// # Safety
            /// `n` is at most the view's length.
            #[inline(always)]
            pub unsafe fn offset(self, n: usize) -> Self {
                $view { ptr: unsafe { self.ptr.add(n) } }
            }

            /// Element 0's place in its 32-byte sector, in elements: (address mod 32) / size.
            #[inline(always)]
            pub fn sector_offset(self) -> usize {
                (self.ptr as usize % 32) / core::mem::size_of::<T>()
            }

            /// The same bytes as elements of another type of the same alignment or less.
            #[inline(always)]
            pub fn cast<U: Copy>(self) -> $view<U> {
                $view { ptr: self.ptr as *$ptr U }
            }
        }
    };
}
global_view!(Global, const);
global_view!(GlobalMut, mut);

impl<T: Copy> Global<T> {
    /// Whether no buffer was passed (an optional input).
    #[inline(always)]
    pub fn is_null(self) -> bool {
        self.ptr.is_null()
    }
}

impl<T: Copy> GlobalMut<T> {
    /// # Safety
    /// `i` is inside the buffer.
    #[inline(always)]
    pub unsafe fn store(self, i: usize, v: T) {
        unsafe { *self.ptr.add(i) = v }
    }

    /// Whether no buffer was passed (an optional output).
    #[inline(always)]
    pub fn is_null(self) -> bool {
        self.ptr.is_null()
    }

    /// The same memory, read-only.
    #[inline(always)]
    pub fn read_only(self) -> Global<T> {
        Global { ptr: self.ptr }
    }
}

impl GlobalMut<f32> {
    /// `atomicAdd`: adds `v` to element `i` and returns the old value.
    /// # Safety
    /// `i` is inside the buffer.
    #[inline(always)]
    pub unsafe fn atomic_add(self, i: usize, v: f32) -> f32 {
        let old: f32;
        unsafe {
            core::arch::asm!("atom.add.f32 {o}, [{a}], {v};", o = out(reg32) old, a = in(reg64) self.ptr.add(i), v = in(reg32) v)
        };
        old
    }
}

impl GlobalMut<u32> {
    /// `atomicAdd`: adds `v` to element `i` and returns the old value.
    /// # Safety
    /// `i` is inside the buffer.
    #[inline(always)]
    pub unsafe fn atomic_add(self, i: usize, v: u32) -> u32 {
        let old: u32;
        unsafe {
            core::arch::asm!("atom.add.u32 {o}, [{a}], {v};", o = out(reg32) old, a = in(reg64) self.ptr.add(i), v = in(reg32) v)
        };
        old
    }
}

impl<T: Copy> Shared<T> {
    #[inline(always)]
    pub(crate) fn from_ptr(ptr: *mut T) -> Self {
        Shared { ptr }
    }

    /// # Safety
    /// `i` is inside the view.
    #[inline(always)]
    pub unsafe fn load(self, i: usize) -> T {
        unsafe { *self.ptr.add(i) }
    }

    /// # Safety
    /// `i` is inside the view.
    #[inline(always)]
    pub unsafe fn store(self, i: usize, v: T) {
        unsafe { *self.ptr.add(i) = v }
    }

    /// The view from element `n` on.
    /// # Safety
    /// `n` is at most the view's length.
    #[inline(always)]
    pub unsafe fn offset(self, n: usize) -> Self {
        Shared::from_ptr(unsafe { self.ptr.add(n) })
    }

    /// The same bytes as elements of another type of the same alignment or less.
    #[inline(always)]
    pub fn cast<U: Copy>(self) -> Shared<U> {
        Shared::from_ptr(self.ptr as *mut U)
    }
}

core::arch::global_asm!(".extern .shared .align 16 .b8 dynamic_shared_memory[];");

/// The block's dynamic shared memory (`shared_mem_bytes` of the launch).
#[inline(always)]
pub fn dynamic_shared<T: Copy>() -> Shared<T> {
    let p: u64;
    // SAFETY: takes the address of a shared-memory symbol; no memory is touched.
    unsafe { core::arch::asm!("cvta.shared.u64 {p}, dynamic_shared_memory;", p = out(reg64) p) };
    Shared::from_ptr(p as *mut T)
}

/// `ldmatrix.sync.aligned.m8n8.x{N}[.trans].shared.b16`: this lane supplies `row`, the start of
/// row `lane % 8` of matrix `lane / 8` (8 bf16 values, 16-byte aligned); returns, per matrix,
/// this lane's pair of the matrix (or of its transpose). Every lane of the warp executes it.
#[inline(always)]
pub fn ldmatrix<const N: usize, const TRANS: bool>(row: Shared<crate::element::Bf16>) -> [u32; N] {
    let mut out = [0u32; N];
    let p = row.ptr as u64;
    macro_rules! ld {
        ($shape:literal, $regs:literal, $($r:ident),+) => {{
            $(let $r: u32;)+
            // SAFETY: a warp-wide load from the shared addresses the lanes supply.
            unsafe {
                core::arch::asm!(
                    concat!("{{ .reg .u64 s; cvta.to.shared.u64 s, {p}; ldmatrix.sync.aligned.m8n8.", $shape,
                        ".shared.b16 {{", $regs, "}}, [s]; }}"),
                    $($r = out(reg32) $r,)+ p = in(reg64) p
                )
            };
            out.copy_from_slice(&[$($r),+][..N]);
        }};
    }
    match (N, TRANS) {
        (1, false) => ld!("x1", "{r0}", r0),
        (1, true) => ld!("x1.trans", "{r0}", r0),
        (2, false) => ld!("x2", "{r0}, {r1}", r0, r1),
        (2, true) => ld!("x2.trans", "{r0}, {r1}", r0, r1),
        (4, false) => ld!("x4", "{r0}, {r1}, {r2}, {r3}", r0, r1, r2, r3),
        (4, true) => ld!("x4.trans", "{r0}, {r1}, {r2}, {r3}", r0, r1, r2, r3),
        _ => panic!("ldmatrix loads 1, 2 or 4 matrices"),
    }
    out
}

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`: d = a·b + c on this warp's fragments
/// (layouts in `emu/tensor.rs`). Every lane of the warp executes it.
#[inline(always)]
pub fn mma_bf16_m16n8k16(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    let (d0, d1, d2, d3): (f32, f32, f32, f32);
    // SAFETY: a warp-wide instruction on registers; every lane executes it.
    unsafe {
        core::arch::asm!(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{c0}, {c1}, {c2}, {c3}}};",
            d0 = out(reg32) d0, d1 = out(reg32) d1, d2 = out(reg32) d2, d3 = out(reg32) d3,
            a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
            b0 = in(reg32) b[0], b1 = in(reg32) b[1],
            c0 = in(reg32) c[0], c1 = in(reg32) c[1], c2 = in(reg32) c[2], c3 = in(reg32) c[3],
        )
    };
    [d0, d1, d2, d3]
}

/// `cp.async.cg.shared.global` of 16 bytes: elements `src_index ..` of `src` to elements
/// `dst_index ..` of `dst` (both 16-byte aligned), completed by [`cp_async_wait`].
/// # Safety
/// Both ranges are in bounds and 16-byte aligned.
#[inline(always)]
pub unsafe fn cp_async_16<T: Copy>(dst: Shared<T>, dst_index: usize, src: Global<T>, src_index: usize) {
    unsafe {
        let (d, s) = (dst.ptr.add(dst_index) as u64, src.ptr.add(src_index) as u64);
        core::arch::asm!(
            "{{ .reg .u64 d, s; cvta.to.shared.u64 d, {d}; cvta.to.global.u64 s, {s}; cp.async.cg.shared.global [d], [s], 16; }}",
            d = in(reg64) d, s = in(reg64) s
        )
    }
}

/// `cp.async.commit_group`.
#[inline(always)]
pub fn cp_async_commit() {
    // SAFETY: groups the copies this thread issued.
    unsafe { core::arch::asm!("cp.async.commit_group;") }
}

/// `cp.async.wait_group N`: waits until at most the newest `N` committed groups are in flight.
#[inline(always)]
pub fn cp_async_wait<const N: u32>() {
    // SAFETY: waits for this thread's copies.
    unsafe { core::arch::asm!("cp.async.wait_group {n};", n = const N) }
}
