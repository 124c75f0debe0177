//! Launching a kernel of `clip-pgs-kernels` on a GPU device, CUDA or the emulator, from its one
//! declaration (`kernel!`): the kernel's parameter tuple fixes the order and types of the
//! arguments, and each argument knows how to become a CUDA launch argument or an emulator view.
//!
//! | kernel parameter | host argument                                   |
//! |------------------|-------------------------------------------------|
//! | `Global<E>`      | `&Buffer<T>`, `View<T>`, `Option<&Buffer<T>>` / `Option<View<T>>` (None: null) |
//! | `GlobalMut<E>`   | `&mut Buffer<T>`, `ViewMut<T>`, `Option<ViewMut<T>>` (None: null) |
//! | `u32`, `u64`, `f32` | the same scalar                              |
//!
//! with E the kernel's element type of the host element T (f32, u32, bf16 → `Bf16`).

use cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};

use clip_pgs_kernels::element::Bf16;
use clip_pgs_kernels::hw::emu::{self, Limits};
use clip_pgs_kernels::hw::{Global, GlobalMut, Kernel};

use crate::buffer::Buffer;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::view::{View, ViewMut};

/// Host element types and the type kernels see them as.
pub trait KernelElement: cudarc::driver::DeviceRepr + Default + Copy + Send + Sync + 'static {
    type Kernel: Copy + 'static;
}

impl KernelElement for f32 {
    type Kernel = f32;
}

impl KernelElement for u32 {
    type Kernel = u32;
}

impl KernelElement for half::bf16 {
    type Kernel = Bf16;
}

/// Global buffers of an emulated launch: (address, bytes), one entry per distinct buffer.
#[derive(Default)]
pub struct EmuBuffers(Vec<(usize, usize)>);

impl EmuBuffers {
    fn number<T>(&mut self, data: &[T]) -> u32 {
        let key = (data.as_ptr() as usize, std::mem::size_of_val(data));
        let index = self.0.iter().position(|&b| b == key).unwrap_or_else(|| {
            self.0.push(key);
            self.0.len() - 1
        });
        index as u32
    }

    pub fn bytes(&self) -> Vec<usize> {
        self.0.iter().map(|b| b.1).collect()
    }
}

/// A host value that can be passed for the kernel parameter `P`.
pub trait KernelArg<P> {
    /// Adds the argument to a CUDA launch (the value lives as long as the launch builder).
    fn push_cuda<'a>(&'a mut self, args: &mut LaunchArgs<'a>) -> Result<()>;
    /// The parameter as the emulated kernel sees it.
    fn emulated(&mut self, buffers: &mut EmuBuffers) -> Result<P>;
}

fn not_on(what: &str, buffer: &'static str) -> Error {
    Error::WrongDevice(format!("a kernel argument is in {buffer} memory, not {what} memory"))
}

impl<T: KernelElement> KernelArg<Global<T::Kernel>> for &Buffer<T> {
    fn push_cuda<'a>(&'a mut self, args: &mut LaunchArgs<'a>) -> Result<()> {
        match &**self {
            Buffer::Cuda(s) => {
                args.arg(s);
                Ok(())
            }
            other => Err(not_on("cuda", other.device_name())),
        }
    }

    fn emulated(&mut self, buffers: &mut EmuBuffers) -> Result<Global<T::Kernel>> {
        self.view().emulated(buffers)
    }
}

/// An optional input: `None` is a null pointer.
impl<T: KernelElement> KernelArg<Global<T::Kernel>> for Option<&Buffer<T>> {
    fn push_cuda<'a>(&'a mut self, args: &mut LaunchArgs<'a>) -> Result<()> {
        static NULL: u64 = 0;
        match self {
            Some(buffer) => buffer.push_cuda(args),
            None => {
                args.arg(&NULL);
                Ok(())
            }
        }
    }

    fn emulated(&mut self, buffers: &mut EmuBuffers) -> Result<Global<T::Kernel>> {
        match self {
            Some(buffer) => buffer.emulated(buffers),
            None => Ok(Global::null()),
        }
    }
}

impl<T: KernelElement> KernelArg<GlobalMut<T::Kernel>> for &mut Buffer<T> {
    fn push_cuda<'a>(&'a mut self, args: &mut LaunchArgs<'a>) -> Result<()> {
        match &mut **self {
            Buffer::Cuda(s) => {
                args.arg(s);
                Ok(())
            }
            other => Err(not_on("cuda", other.device_name())),
        }
    }

    fn emulated(&mut self, buffers: &mut EmuBuffers) -> Result<GlobalMut<T::Kernel>> {
        self.view_mut().emulated(buffers)
    }
}

impl<T: KernelElement> KernelArg<Global<T::Kernel>> for View<'_, T> {
    fn push_cuda<'a>(&'a mut self, args: &mut LaunchArgs<'a>) -> Result<()> {
        match self {
            View::Cuda(range) => {
                args.arg(&range.address);
                Ok(())
            }
            other => Err(not_on("cuda", other.place().name())),
        }
    }

    fn emulated(&mut self, buffers: &mut EmuBuffers) -> Result<Global<T::Kernel>> {
        match self {
            // SAFETY: the view outlives the launch, which only reads it.
            View::Emu(v) => Ok(unsafe { Global::new(v.as_ptr().cast(), v.len(), buffers.number(v)) }),
            other => Err(not_on("emu", other.place().name())),
        }
    }
}

/// An optional input view: `None` is a null pointer.
impl<T: KernelElement> KernelArg<Global<T::Kernel>> for Option<View<'_, T>> {
    fn push_cuda<'a>(&'a mut self, args: &mut LaunchArgs<'a>) -> Result<()> {
        static NULL: u64 = 0;
        match self {
            Some(view) => view.push_cuda(args),
            None => {
                args.arg(&NULL);
                Ok(())
            }
        }
    }

    fn emulated(&mut self, buffers: &mut EmuBuffers) -> Result<Global<T::Kernel>> {
        match self {
            Some(view) => view.emulated(buffers),
            None => Ok(Global::null()),
        }
    }
}

impl<T: KernelElement> KernelArg<GlobalMut<T::Kernel>> for ViewMut<'_, T> {
    fn push_cuda<'a>(&'a mut self, args: &mut LaunchArgs<'a>) -> Result<()> {
        match self {
            ViewMut::Cuda(range) => {
                args.arg(&range.address);
                Ok(())
            }
            other => Err(not_on("cuda", other.place().name())),
        }
    }

    fn emulated(&mut self, buffers: &mut EmuBuffers) -> Result<GlobalMut<T::Kernel>> {
        match self {
            ViewMut::Emu(v) => {
                let number = buffers.number(v);
                // SAFETY: the view outlives the launch and is borrowed mutably for it.
                Ok(unsafe { GlobalMut::new(v.as_mut_ptr().cast(), v.len(), number) })
            }
            other => Err(not_on("emu", other.place().name())),
        }
    }
}

/// An optional output view: `None` is a null pointer.
impl<T: KernelElement> KernelArg<GlobalMut<T::Kernel>> for Option<ViewMut<'_, T>> {
    fn push_cuda<'a>(&'a mut self, args: &mut LaunchArgs<'a>) -> Result<()> {
        static NULL: u64 = 0;
        match self {
            Some(view) => view.push_cuda(args),
            None => {
                args.arg(&NULL);
                Ok(())
            }
        }
    }

    fn emulated(&mut self, buffers: &mut EmuBuffers) -> Result<GlobalMut<T::Kernel>> {
        match self {
            Some(view) => view.emulated(buffers),
            None => Ok(GlobalMut::null()),
        }
    }
}

macro_rules! scalar_arg {
    ($($t:ty),*) => {$(
        impl KernelArg<$t> for $t {
            fn push_cuda<'a>(&'a mut self, args: &mut LaunchArgs<'a>) -> Result<()> {
                args.arg(&*self);
                Ok(())
            }

            fn emulated(&mut self, _: &mut EmuBuffers) -> Result<$t> {
                Ok(*self)
            }
        }
    )*};
}
scalar_arg!(u32, u64, f32);

/// A tuple of host arguments for a kernel whose parameter tuple is `P`.
pub trait KernelArgs<P> {
    fn push_cuda<'a>(&'a mut self, args: &mut LaunchArgs<'a>) -> Result<()>;
    fn emulated(&mut self, buffers: &mut EmuBuffers) -> Result<P>;
}

macro_rules! tuple_args {
    ($($a:ident $p:ident),*) => {
        impl<$($a: KernelArg<$p>, $p),*> KernelArgs<($($p,)*)> for ($($a,)*) {
            #[allow(non_snake_case)]
            fn push_cuda<'a>(&'a mut self, args: &mut LaunchArgs<'a>) -> Result<()> {
                let ($($a,)*) = self;
                $($a.push_cuda(args)?;)*
                Ok(())
            }

            #[allow(non_snake_case)]
            fn emulated(&mut self, buffers: &mut EmuBuffers) -> Result<($($p,)*)> {
                let ($($a,)*) = self;
                Ok(($($a.emulated(buffers)?,)*))
            }
        }
    };
}
tuple_args!(A1 P1);
tuple_args!(A1 P1, A2 P2);
tuple_args!(A1 P1, A2 P2, A3 P3);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4, A5 P5);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4, A5 P5, A6 P6);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4, A5 P5, A6 P6, A7 P7);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4, A5 P5, A6 P6, A7 P7, A8 P8);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4, A5 P5, A6 P6, A7 P7, A8 P8, A9 P9);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4, A5 P5, A6 P6, A7 P7, A8 P8, A9 P9, A10 P10);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4, A5 P5, A6 P6, A7 P7, A8 P8, A9 P9, A10 P10, A11 P11);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4, A5 P5, A6 P6, A7 P7, A8 P8, A9 P9, A10 P10, A11 P11, A12 P12);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4, A5 P5, A6 P6, A7 P7, A8 P8, A9 P9, A10 P10, A11 P11, A12 P12, A13 P13);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4, A5 P5, A6 P6, A7 P7, A8 P8, A9 P9, A10 P10, A11 P11, A12 P12, A13 P13, A14 P14);
tuple_args!(A1 P1, A2 P2, A3 P3, A4 P4, A5 P5, A6 P6, A7 P7, A8 P8, A9 P9, A10 P10, A11 P11, A12 P12, A13 P13, A14 P14, A15 P15);

/// A launch of `threads`-thread blocks for a grid-stride loop over n elements: enough blocks to
/// cover n, at most 2¹⁶ (the loop covers the rest).
pub fn grid_stride_config(n: usize, threads: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// The emulator's launch configuration of a CUDA one.
pub fn emu_config(cfg: &LaunchConfig) -> emu::LaunchConfig {
    emu::LaunchConfig {
        grid: [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2],
        block: [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2],
        shared_bytes: cfg.shared_mem_bytes,
    }
}

/// The same refusal on CUDA and on the emulator for a launch beyond the device's limits.
pub fn check_limits(kernel: &str, cfg: &LaunchConfig, limits: &Limits, device: &str) -> Result<()> {
    emu::check_limits(&emu_config(cfg), limits)
        .map_err(|why| Error::InvalidArgument(format!("cannot launch {kernel} on {device}: {why}")))
}

impl Device {
    /// Launches `kernel` on this GPU device (CUDA or the emulator) with `args`.
    ///
    /// # Safety
    /// The arguments satisfy the kernel's safety section (buffer sizes, shared memory). On the
    /// emulator a violation is reported as an error; on CUDA it is undefined behaviour.
    pub unsafe fn launch<P: Copy + Send + Sync + 'static>(
        &self,
        kernel: &Kernel<P>,
        cfg: LaunchConfig,
        args: impl KernelArgs<P>,
    ) -> Result<()> {
        match self {
            Device::Cpu => Err(Error::InvalidArgument(format!(
                "{} is a GPU kernel; on the cpu device the op runs its reference implementation",
                kernel.name()
            ))),
            // SAFETY: the caller's contract.
            Device::Cuda(rt) => unsafe { rt.launch(kernel.name(), cfg, args) },
            // SAFETY: the caller's contract.
            Device::Emu(emu) => unsafe { emu.launch(kernel, cfg, args) },
        }
    }
}
