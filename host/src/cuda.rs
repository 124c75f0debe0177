//! The CUDA device: one context, one stream, and the kernels of the embedded PTX module.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig};
use cudarc::nvrtc::Ptx;

use clip_pgs_kernels::hw::emu::{Limits, SM90};

use crate::buffer::Buffer;
use crate::cublaslt::CublasLt;
use crate::error::{CudaContextExt, Error, Result};
use crate::launch::{KernelArgs, check_limits};

/// The PTX that `cargo run -p ptx-build` made from `kernels/` (committed, so building the host
/// needs only stable Rust).
pub const KERNELS_PTX: &str = include_str!("../../kernels/ptx/clip_pgs_kernels.ptx");

/// How many CUDA GPUs the driver sees, without opening a context; the reason when the driver is
/// missing or does not initialize.
pub fn gpu_count() -> Result<usize, String> {
    // SAFETY: only tries to dlopen libcuda; cudarc would panic at the first call without it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this machine".into());
    }
    let count = CudaContext::device_count().map_err(|e| format!("the CUDA driver did not initialize ({e})"))?;
    Ok(count.max(0) as usize)
}

/// A GPU ready to run the project's kernels.
pub struct CudaRuntime {
    pub context: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    /// Kernels loaded so far, by name (looked up in the module on first launch).
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    /// e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    pub compute_capability: (i32, i32),
    /// Threads, block and grid sizes and the most shared memory one block may use (opt-in).
    pub limits: Limits,
    /// cuBLASLt, opened at the first matmul.
    cublaslt: Mutex<Option<Arc<CublasLt>>>,
    /// Ops' scratch memory (`Device::with_scratch`).
    pub(crate) scratch: Mutex<Option<Buffer<f32>>>,
    /// Captured graphs alive: while one holds the scratch memory's address, it may not move.
    pub(crate) graphs_alive: Arc<AtomicUsize>,
}

impl CudaRuntime {
    /// Opens GPU `ordinal`. Every failure is an `Error` that says why; nothing panics, also on a
    /// machine without the NVIDIA driver.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        let count = gpu_count().map_err(Error::CudaUnavailable)?;
        if ordinal >= count {
            return Err(Error::CudaUnavailable(format!("GPU {ordinal} requested, {count} found")));
        }
        let context = CudaContext::new(ordinal).during(format!("opening GPU {ordinal}"))?;
        // One stream: cudarc's per-buffer event tracking would only cost time.
        // SAFETY: called before any buffer is allocated in this context.
        unsafe { context.disable_event_tracking() };
        let name = context.name().during("reading the GPU name")?;
        let compute_capability = context.compute_capability().during("reading the compute capability")?;
        if compute_capability.0 < 8 {
            return Err(Error::CudaUnavailable(format!(
                "{name} is sm_{}{}; the kernels are built for sm_80 and newer",
                compute_capability.0, compute_capability.1
            )));
        }
        let max_shared_bytes_per_block = context
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .during("reading the shared-memory limit")? as usize;
        let module = context.load_module(Ptx::from_src(KERNELS_PTX)).during("loading the kernels' PTX module")?;
        let stream = context.default_stream();
        let limits = Limits { max_shared_bytes: max_shared_bytes_per_block, ..SM90 };
        let functions = Mutex::new(HashMap::new());
        Ok(Arc::new(CudaRuntime {
            context,
            stream,
            module,
            functions,
            name,
            compute_capability,
            limits,
            cublaslt: Mutex::new(None),
            scratch: Mutex::new(None),
            graphs_alive: Arc::new(AtomicUsize::new(0)),
        }))
    }

    /// cuBLASLt on this GPU's stream (opened on first use).
    pub fn cublaslt(&self) -> Result<Arc<CublasLt>> {
        let mut slot = self.cublaslt.lock().expect("cuBLASLt lock");
        if let Some(lt) = slot.as_ref() {
            return Ok(lt.clone());
        }
        let lt = Arc::new(CublasLt::new(self.stream.clone(), self.compute_capability)?);
        *slot = Some(lt.clone());
        Ok(lt)
    }

    /// The kernel `name` of the module, its shared-memory limit raised to the device's.
    fn function(&self, name: &'static str) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().expect("kernel cache lock");
        if let Some(f) = functions.get(name) {
            return Ok(f.clone());
        }
        let f = self.module.load_function(name).during(format!("finding kernel {name} in the PTX module"))?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            self.limits.max_shared_bytes as i32,
        )
        .during("raising a kernel's shared-memory limit")?;
        functions.insert(name, f.clone());
        Ok(f)
    }
}

impl CudaRuntime {
    /// Launches kernel `name` on the stream with `args`, after checking the launch against the
    /// device's limits (an error naming the kernel, not a launch failure).
    ///
    /// # Safety
    /// As [`crate::Device::launch`].
    pub(crate) unsafe fn launch<P>(
        &self,
        name: &'static str,
        cfg: LaunchConfig,
        mut args: impl KernelArgs<P>,
    ) -> Result<()> {
        check_limits(name, &cfg, &self.limits, &self.name)?;
        let f = self.function(name)?;
        let mut builder = self.stream.launch_builder(&f);
        args.push_cuda(&mut builder)?;
        // SAFETY: the caller's contract; the argument order and types are the kernel's own.
        unsafe { builder.launch(cfg) }.during(format!("launching {name}"))?;
        Ok(())
    }
}
