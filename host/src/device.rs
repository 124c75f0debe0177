//! Device selection: the CPU always works; CUDA is used when asked for, or under `auto` when a
//! GPU answers. When `auto` falls back to the CPU it says why in one line. `emu` runs the GPU
//! kernels on the SIMT emulator, to check them without a GPU (never chosen by `auto`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

use clip_pgs_kernels::hw::emu::Options;

use crate::buffer::Buffer;
use crate::cuda::CudaRuntime;
use crate::emu::EmuRuntime;
use crate::error::{CudaContextExt, Error, Result};
use crate::graph::Address;

#[derive(Clone)]
pub enum Device {
    /// The f32 reference: every op on the host, threaded with rayon.
    Cpu,
    Cuda(Arc<CudaRuntime>),
    /// The GPU kernels on the SIMT emulator: for checking kernels, not for speed.
    Emu(Arc<EmuRuntime>),
}

/// What the user asked for (`--device auto|cpu|cuda`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DevicePreference {
    #[default]
    Auto,
    Cpu,
    Cuda,
    Emu,
}

impl FromStr for DevicePreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DevicePreference::Auto),
            "cpu" => Ok(DevicePreference::Cpu),
            "cuda" | "gpu" => Ok(DevicePreference::Cuda),
            "emu" => Ok(DevicePreference::Emu),
            _ => Err(format!("unknown device '{s}': expected auto, cpu, cuda or emu")),
        }
    }
}

/// The device chosen, and when it is the CPU, why.
pub struct DeviceSelection {
    pub device: Device,
    pub cpu_reason: Option<String>,
}

impl fmt::Display for DeviceSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.device)?;
        match &self.cpu_reason {
            Some(reason) => write!(f, " ({reason})"),
            None => Ok(()),
        }
    }
}

impl Device {
    /// Picks the device for `preference`. `Cuda` fails with the reason when no GPU can be used;
    /// `Auto` then falls back to the CPU and keeps the reason.
    pub fn select(preference: DevicePreference) -> Result<DeviceSelection> {
        match preference {
            DevicePreference::Cpu => {
                Ok(DeviceSelection { device: Device::Cpu, cpu_reason: Some("--device cpu was asked for".into()) })
            }
            DevicePreference::Cuda => {
                Ok(DeviceSelection { device: Device::Cuda(CudaRuntime::new(0)?), cpu_reason: None })
            }
            DevicePreference::Emu => {
                Ok(DeviceSelection { device: Device::Emu(EmuRuntime::new(Options::default())), cpu_reason: None })
            }
            DevicePreference::Auto => Ok(match CudaRuntime::new(0) {
                Ok(rt) => DeviceSelection { device: Device::Cuda(rt), cpu_reason: None },
                Err(e) => DeviceSelection { device: Device::Cpu, cpu_reason: Some(reason(&e)) },
            }),
        }
    }

    /// Copies host data onto this device.
    pub fn upload<T: DeviceRepr + Clone>(&self, data: &[T]) -> Result<Buffer<T>> {
        match self {
            Device::Cpu => Ok(Buffer::Cpu(data.to_vec())),
            Device::Cuda(rt) => Ok(Buffer::Cuda(rt.stream.clone_htod(data).during("copying a buffer to the GPU")?)),
            Device::Emu(_) => {
                crate::graph::refuse_while_capturing(|| format!("uploading {} values", data.len()))?;
                Ok(Buffer::Emu(data.to_vec()))
            }
        }
    }

    /// `len` zeros (at least one element: a GPU allocation is never empty); `what` names the
    /// buffer in errors.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits + Clone + Default>(
        &self,
        len: usize,
        what: &str,
    ) -> Result<Buffer<T>> {
        let len = len.max(1);
        match self {
            Device::Cpu => Ok(Buffer::Cpu(vec![T::default(); len])),
            Device::Cuda(rt) => Ok(Buffer::Cuda(rt.stream.alloc_zeros(len).during(format!("allocating {what}"))?)),
            Device::Emu(_) => {
                crate::graph::refuse_while_capturing(|| format!("allocating {what}"))?;
                Ok(Buffer::Emu(vec![T::default(); len]))
            }
        }
    }

    /// Waits until all queued work is done (nothing to wait for on the CPU and the emulator).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu | Device::Emu(_) => Ok(()),
            Device::Cuda(rt) => rt.stream.synchronize().during("waiting for the GPU"),
        }
    }

    /// Where this device's buffers live.
    pub fn place(&self) -> crate::view::Place {
        match self {
            Device::Cpu => crate::view::Place::Cpu,
            Device::Cuda(_) => crate::view::Place::Cuda,
            Device::Emu(_) => crate::view::Place::Emu,
        }
    }

    /// The most shared memory a block may use (static plus dynamic, the opt-in maximum) on a GPU
    /// device; None on the CPU.
    pub fn max_shared_bytes(&self) -> Option<usize> {
        match self {
            Device::Cpu => None,
            Device::Cuda(rt) => Some(rt.limits.max_shared_bytes),
            Device::Emu(rt) => Some(rt.limits.max_shared_bytes),
        }
    }

    /// (free, total) bytes of device memory on CUDA; None on the host devices.
    pub fn memory_info(&self) -> Result<Option<(usize, usize)>> {
        match self {
            Device::Cuda(rt) => {
                rt.context.bind_to_thread().during("binding the CUDA context")?;
                cudarc::driver::result::mem_get_info().map(Some).during("reading free GPU memory")
            }
            Device::Cpu | Device::Emu(_) => Ok(None),
        }
    }

    /// dst ← src on this device (same length; a device-to-device copy on CUDA, queued on the
    /// stream).
    pub fn copy<T: Copy + Send + Sync + 'static>(
        &self,
        dst: crate::view::ViewMut<T>,
        src: crate::view::View<T>,
    ) -> Result<()> {
        use crate::view::{View, ViewMut};
        if dst.len() != src.len() {
            return Err(Error::InvalidArgument(format!("copying {} values into {}", src.len(), dst.len())));
        }
        match (self, dst, src) {
            (Device::Cpu, ViewMut::Cpu(d), View::Cpu(s)) => {
                d.copy_from_slice(s);
                Ok(())
            }
            (Device::Emu(rt), ViewMut::Emu(d), View::Emu(s)) => {
                let (d, s) = (Address::of_mut(d), Address::of(s));
                rt.run_or_record(Box::new(move |_| {
                    // SAFETY: run now, or replayed from a graph whose caller keeps both buffers
                    // where they were (`Graph::replay`); distinct (one was borrowed mutably).
                    unsafe { d.slice_mut().copy_from_slice(s.slice()) };
                    Ok(())
                }))
            }
            (Device::Cuda(rt), ViewMut::Cuda(d), View::Cuda(s)) => {
                let bytes = s.len * std::mem::size_of::<T>();
                // SAFETY: both ranges are live views of device buffers of `bytes` bytes, distinct
                // (one is borrowed mutably), on this context.
                unsafe { cudarc::driver::result::memcpy_dtod_async(d.address, s.address, bytes, rt.stream.cu_stream()) }
                    .during("copying on the GPU")
            }
            (_, d, s) => Err(Error::WrongDevice(format!(
                "copying from {} memory to {} memory on {self}",
                s.place().name(),
                d.place().name()
            ))),
        }
    }

    /// Runs `f` with `len` floats of scratch memory on this GPU device, kept by the runtime and
    /// grown when a larger one is asked for (so a steady-state step allocates nothing). For ops
    /// whose library call overwrites what the op accumulates (cuBLASLt's BGRADB).
    pub fn with_scratch<R>(&self, len: usize, f: impl FnOnce(crate::view::ViewMut<f32>) -> Result<R>) -> Result<R> {
        let (slot, graphs) = match self {
            Device::Cpu => return Err(Error::InvalidArgument("the cpu device keeps no scratch memory".into())),
            Device::Cuda(rt) => (&rt.scratch, &rt.graphs_alive),
            Device::Emu(rt) => (&rt.scratch, &rt.graphs_alive),
        };
        let mut slot = slot.lock().expect("scratch lock");
        if slot.as_ref().is_none_or(|b| b.len() < len) {
            // A captured graph holds the scratch memory's address: it must not move.
            if graphs.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                return Err(Error::Capture(format!(
                    "{len} floats of scratch memory asked for, more than the {} a captured graph holds",
                    slot.as_ref().map_or(0, |b| b.len())
                )));
            }
            *slot = Some(self.alloc_zeros(len, "scratch memory")?);
        }
        let buffer = slot.as_mut().expect("allocated above");
        let ([], [view]) = buffer.split([], [crate::view::Span::new(0, len)])?;
        f(view)
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

fn reason(e: &Error) -> String {
    match e {
        Error::CudaUnavailable(m) => format!("no usable GPU: {m}"),
        other => format!("no usable GPU: {other}"),
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu, {} threads", rayon::current_num_threads()),
            Device::Cuda(rt) => {
                let (major, minor) = rt.compute_capability;
                write!(f, "cuda:{} {} (sm_{major}{minor})", rt.context.ordinal(), rt.name)
            }
            Device::Emu(_) => write!(
                f,
                "emu (the GPU kernels on the SIMT emulator with sanitizer checks, sm_90 limits; for checking kernels, not for speed)"
            ),
        }
    }
}
