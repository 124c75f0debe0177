//! GPU kernels of clip-pgs, written in Rust.
//!
//! The crate builds twice:
//! - for `nvptx64-nvidia-cuda` (by `cargo run -p ptx-build`), where the `extern "ptx-kernel"`
//!   entry points become `kernels/ptx/clip_pgs_kernels.ptx`;
//! - for the host, where the pure math (Philox RNG, Sobel stencil, element conversions) is shared
//!   with the CPU reference in `clip-pgs-host`, so both devices compute the same numbers, and
//!   where the kernels themselves run on the SIMT emulator (`hw::emu`).
//!
//! Kernels touch the hardware only through [`hw`], and are declared with [`kernel!`].
#![no_std]
#![cfg_attr(target_arch = "nvptx64", feature(abi_ptx, stdarch_nvptx, asm_experimental_arch, core_intrinsics))]
#![cfg_attr(target_arch = "nvptx64", allow(internal_features))]

#[cfg(not(target_arch = "nvptx64"))]
extern crate std;

pub mod adamw;
pub mod attention;
pub mod cast;
pub mod clip_loss;
pub mod edge_map;
pub mod element;
pub mod elementwise;
pub mod embedding;
pub mod flash_attention;
pub mod gather;
pub mod gelu;
pub mod hw;
pub mod layernorm;
pub mod map;
pub mod mask_clock;
pub mod math;
pub mod mma_tile;
pub mod normalize;
pub mod patch_stats;
pub mod patchify;
pub mod philox;
pub mod random;
pub mod reduce;
pub mod rows;
pub mod select;
pub mod sinkhorn;
pub mod sobel;

/// Kernels are built with `panic = immediate-abort`; this handler only satisfies the compiler.
#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: aborts the kernel; nothing runs after it.
    unsafe { core::arch::nvptx::trap() }
}
