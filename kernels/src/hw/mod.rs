//! The hardware layer: everything a kernel touches of the GPU goes through this module — thread,
//! block and grid indices, barriers, dynamic and static shared memory, warp shuffles and votes,
//! atomics and the fast-math instructions — and kernels reach global and shared memory only
//! through the typed views [`Global`], [`GlobalMut`] and [`Shared`].
//!
//! One API, two implementations:
//! - `nvptx.rs` (target nvptx64): inline PTX; the views are bare pointers and compile to the
//!   plain loads and stores a raw-pointer kernel would have;
//! - `emu/` (the host): the SIMT emulator. Views carry their length; every access is checked
//!   (bounds, alignment, shared-memory races and initialization) and counted (traffic).
//!
//! A kernel is declared once with [`kernel!`]: it becomes an `extern "ptx-kernel"` entry point on
//! nvptx and a [`Kernel`] descriptor (its name and a host function over the same parameter tuple)
//! on the host, from which the host crate builds the CUDA and the emulated launch alike, so the
//! argument list cannot drift between them.

#[cfg(target_arch = "nvptx64")]
mod nvptx;
#[cfg(target_arch = "nvptx64")]
pub use nvptx::*;

#[cfg(not(target_arch = "nvptx64"))]
pub mod emu;
#[cfg(not(target_arch = "nvptx64"))]
pub use emu::device::*;

/// Threads per warp.
pub const WARP: usize = 32;

/// A 32-bit value a warp shuffle moves.
pub trait Word: Copy {
    fn to_word(self) -> u32;
    fn from_word(w: u32) -> Self;
}

impl Word for u32 {
    #[inline(always)]
    fn to_word(self) -> u32 {
        self
    }
    #[inline(always)]
    fn from_word(w: u32) -> Self {
        w
    }
}

impl Word for f32 {
    #[inline(always)]
    fn to_word(self) -> u32 {
        self.to_bits()
    }
    #[inline(always)]
    fn from_word(w: u32) -> Self {
        f32::from_bits(w)
    }
}

/// Lane within the warp.
#[inline(always)]
pub fn lane() -> usize {
    thread_x() % WARP
}

/// Warp within the block.
#[inline(always)]
pub fn warp() -> usize {
    thread_x() / WARP
}

/// Calls `f(i)` for i = thread, thread + blockDim, … < n: the block's threads share 0..n.
#[inline(always)]
pub fn block_stride(n: usize, mut f: impl FnMut(usize)) {
    let mut i = thread_x();
    while i < n {
        f(i);
        i += block_dim_x();
    }
}

/// Calls `f(row)` for the rows of this warp: warp w of block b takes row b·W + w, then every
/// (grid size · W)-th after, W = warps per block (blocks of whole warps). Uniform within a warp:
/// the row kernels' one-warp-per-row loop.
#[inline(always)]
pub fn warp_rows(rows: usize, mut f: impl FnMut(usize)) {
    let warps = block_dim_x() / WARP;
    let step = grid_dim_x() * warps;
    let mut row = block_x() * warps + warp();
    while row < rows {
        f(row);
        row += step;
    }
}

/// Calls `f(i)` for this lane's i = lane, lane + 32, … < n: a warp's pass over a row, each of
/// its load instructions reading 32 consecutive elements.
#[inline(always)]
pub fn lane_stride(n: usize, mut f: impl FnMut(usize)) {
    let mut i = lane();
    while i < n {
        f(i);
        i += WARP;
    }
}

/// Calls `f(0)`, …, `f(N − 1)` (N ≤ 32), unrolled by hand: LLVM does not fully unroll loops of
/// this many iterations, and arrays indexed by the argument stay in registers only when every
/// index is a constant.
#[inline(always)]
pub fn unrolled<const N: usize>(mut f: impl FnMut(usize)) {
    const { assert!(N <= 32) };
    macro_rules! calls {
        ($($k:literal)*) => {$(
            if $k < N {
                f($k);
            }
        )*};
    }
    calls!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31);
}

/// Calls `f(i)` for every i < n, spread over all threads of the grid (1-D).
#[inline(always)]
pub fn grid_stride(n: usize, mut f: impl FnMut(usize)) {
    let step = grid_dim_x() * block_dim_x();
    let mut i = block_x() * block_dim_x() + thread_x();
    while i < n {
        f(i);
        i += step;
    }
}

/// Declares a kernel once for both builds:
///
/// ```ignore
/// kernel! {
///     /// docs
///     pub fn scale(x: GlobalMut<f32>, n: u32, factor: f32) { unsafe { … } }
/// }
/// ```
///
/// On nvptx: `#[no_mangle] pub unsafe extern "ptx-kernel" fn scale(…)`. On the host: a constant
/// `scale: Kernel<(GlobalMut<f32>, u32, f32)>` named "scale" whose function runs the same body;
/// `clip_pgs_host` launches it on CUDA (by name, arguments pushed in this order and these types)
/// or on the emulator.
#[macro_export]
macro_rules! kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        #[cfg(target_arch = "nvptx64")]
        $(#[$meta])*
        #[unsafe(no_mangle)]
        $vis unsafe extern "ptx-kernel" fn $name($($arg: $ty),*) $body

        #[cfg(not(target_arch = "nvptx64"))]
        $(#[$meta])*
        #[allow(non_upper_case_globals)]
        $vis const $name: $crate::hw::Kernel<($($ty,)*)> =
            $crate::hw::Kernel::new(stringify!($name), |($($arg,)*): ($($ty,)*)| $body);
    };
}

/// `shared_array!(pub fn scratch() -> [f32; 32]);` declares a shared array of that size (each
/// block has its own) and a function returning a [`Shared`] view of it.
#[macro_export]
macro_rules! shared_array {
    ($vis:vis fn $name:ident() -> [$ty:ty; $len:expr]) => {
        #[cfg(target_arch = "nvptx64")]
        core::arch::global_asm!(
            concat!(".shared .align 16 .b8 ", stringify!($name), "[{bytes}];"),
            bytes = const $len * core::mem::size_of::<$ty>(),
        );
        #[inline(always)]
        $vis fn $name() -> $crate::hw::Shared<$ty> {
            #[cfg(target_arch = "nvptx64")]
            {
                let p: u64;
                // SAFETY: takes the address of a shared-memory symbol; no memory is touched.
                unsafe {
                    core::arch::asm!(concat!("cvta.shared.u64 {p}, ", stringify!($name), ";"), p = out(reg64) p)
                };
                $crate::hw::Shared::from_ptr(p as *mut $ty)
            }
            #[cfg(not(target_arch = "nvptx64"))]
            {
                $crate::hw::emu::device::static_shared::<$ty>(concat!(module_path!(), "::", stringify!($name)), $len)
            }
        }
    };
}
