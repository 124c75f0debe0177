//! Shared memory (device only).
//!
//! `#[link_section = ".shared"]` statics land in global memory on nvptx, so shared arrays are
//! declared in PTX itself: once per module with `global_asm!` (declaring them in an inlined `asm!`
//! block would duplicate the symbol), and reached through `cvta.shared` as generic pointers.

core::arch::global_asm!(".extern .shared .align 16 .b8 dynamic_shared_memory[];");

/// The block's dynamic shared memory (`shared_mem_bytes` of the launch), as `*mut T`.
#[inline(always)]
pub fn dynamic_shared<T>() -> *mut T {
    let p: u64;
    // SAFETY: takes the address of a shared-memory symbol; no memory is touched.
    unsafe { core::arch::asm!("cvta.shared.u64 {p}, dynamic_shared_memory;", p = out(reg64) p) };
    p as *mut T
}

/// `shared_array!(pub fn scratch() -> [f32; 32]);` declares a module-level shared array of that
/// size (each block has its own) and a function returning its generic address.
#[macro_export]
macro_rules! shared_array {
    ($vis:vis fn $name:ident() -> [$ty:ty; $len:expr]) => {
        core::arch::global_asm!(
            concat!(".shared .align 16 .b8 ", stringify!($name), "[{bytes}];"),
            bytes = const $len * core::mem::size_of::<$ty>(),
        );
        #[inline(always)]
        $vis fn $name() -> *mut $ty {
            let p: u64;
            // SAFETY: takes the address of a shared-memory symbol; no memory is touched.
            unsafe {
                core::arch::asm!(
                    concat!("cvta.shared.u64 {p}, ", stringify!($name), ";"),
                    p = out(reg64) p
                )
            };
            p as *mut $ty
        }
    };
}
