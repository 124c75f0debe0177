//! The CUDA device: one context, one stream, and the kernels of the embedded PTX module.

use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchArgs, LaunchConfig};
use cudarc::nvrtc::Ptx;

use crate::error::{CudaContextExt, Error, Result};

/// The PTX that `cargo run -p ptx-build` made from `kernels/` (committed, so building the host
/// needs only stable Rust).
pub const KERNELS_PTX: &str = include_str!("../../kernels/ptx/clip_pgs_kernels.ptx");

/// Declares `Kernels`, one field per kernel of the PTX module, and its loader.
macro_rules! kernels {
    ($($field:ident = $name:literal),* $(,)?) => {
        /// Every kernel of the module, loaded once.
        pub struct Kernels {
            $(pub $field: CudaFunction,)*
        }

        impl Kernels {
            fn load(module: &Arc<CudaModule>) -> Result<Self> {
                let load = |name: &str| {
                    module.load_function(name).during(format!("finding kernel {name} in the PTX module"))
                };
                Ok(Kernels { $($field: load($name)?,)* })
            }

            fn all(&self) -> Vec<&CudaFunction> {
                vec![$(&self.$field),*]
            }
        }
    };
}

kernels! {
    edge_map_f32 = "pgs_edge_map_f32",
    edge_map_bf16 = "pgs_edge_map_bf16",
    reference_edge_grid = "pgs_reference_edge_grid",
    philox_uniform = "philox_uniform",
    standardize_patches_f32 = "pgs_standardize_patches_f32",
    standardize_patches_bf16 = "pgs_standardize_patches_bf16",
    token_norms_f32 = "pgs_token_norms_f32",
    token_norms_bf16 = "pgs_token_norms_bf16",
    similarity_f32 = "pgs_similarity_f32",
    similarity_bf16 = "pgs_similarity_bf16",
    sinkhorn_log = "pgs_sinkhorn_log",
    sinkhorn_knopp_signed = "pgs_sinkhorn_knopp_signed",
    candidates = "pgs_candidates",
    select_paper = "pgs_select_paper",
    select_flip = "pgs_select_flip",
    reference_flags = "pgs_reference_flags",
    reference_keep = "pgs_reference_keep",
    gather_f32 = "pgs_gather_f32",
    gather_bf16 = "pgs_gather_bf16",
}

/// A GPU ready to run the project's kernels.
pub struct CudaRuntime {
    pub context: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub kernels: Kernels,
    /// e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    pub compute_capability: (i32, i32),
    /// The most dynamic shared memory one block may use (the opt-in limit).
    pub max_shared_bytes_per_block: usize,
}

impl CudaRuntime {
    /// Opens GPU `ordinal`. Every failure is an `Error` that says why; nothing panics, also on a
    /// machine without the NVIDIA driver.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        // SAFETY: only tries to dlopen libcuda; cudarc would panic at the first call without it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::CudaUnavailable(
                "the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this machine".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::CudaUnavailable(format!("the CUDA driver did not initialize ({e})")))?;
        if ordinal >= count.max(0) as usize {
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
        let kernels = Kernels::load(&module)?;
        for f in kernels.all() {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                max_shared_bytes_per_block as i32,
            )
            .during("raising a kernel's shared-memory limit")?;
        }
        let stream = context.default_stream();
        Ok(Arc::new(CudaRuntime { context, stream, kernels, name, compute_capability, max_shared_bytes_per_block }))
    }
}

impl CudaRuntime {
    /// Launches `f` on the stream with the arguments `push` adds, after checking that the block's
    /// dynamic shared memory fits this GPU (an error naming the kernel, not a launch failure).
    ///
    /// # Safety
    /// `push` must add the kernel's arguments in its signature's order and types, with buffers as
    /// large as the kernel's safety section requires.
    pub unsafe fn launch<'a>(
        &'a self,
        f: &'a CudaFunction,
        cfg: LaunchConfig,
        what: &str,
        push: impl FnOnce(&mut LaunchArgs<'a>),
    ) -> Result<()> {
        if cfg.shared_mem_bytes as usize > self.max_shared_bytes_per_block {
            return Err(Error::InvalidArgument(format!(
                "{what} needs {} bytes of shared memory per block; {} has {}",
                cfg.shared_mem_bytes, self.name, self.max_shared_bytes_per_block
            )));
        }
        let mut args = self.stream.launch_builder(f);
        push(&mut args);
        // SAFETY: the caller's contract.
        unsafe { args.launch(cfg) }.during(format!("launching {what}"))?;
        Ok(())
    }
}
