//! The `emu` device: the project's SIMT emulator (`clip_pgs_kernels::hw::emu`) behind the same
//! launches, launch configurations, shared-memory sizes and `Buffer` API as CUDA, with buffers in
//! host memory. It is for checking kernels — logic, indexing, barriers, races, traffic — not for
//! speed: a kernel runs orders of magnitude slower than on a GPU, and slower than the CPU device.

use std::sync::{Arc, Mutex};

use cudarc::driver::LaunchConfig;

use clip_pgs_kernels::hw::Kernel;
use clip_pgs_kernels::hw::emu::{self, LaunchReport, Limits, Options, SM90};

use crate::buffer::Buffer;
use crate::error::{Error, Result};
use crate::launch::{EmuBuffers, KernelArgs, check_limits, emu_config};

pub struct EmuRuntime {
    pub options: Options,
    /// The limits launches are checked against: an H100's (sm_90).
    pub limits: Limits,
    /// Reports of the launches so far, when kept (`keep_reports`).
    reports: Mutex<Option<Vec<LaunchReport>>>,
    /// Ops' scratch memory (`Device::with_scratch`).
    pub(crate) scratch: Mutex<Option<Buffer<f32>>>,
    /// cuBLASLt calls so far, when kept (with the launch reports).
    gemms: Mutex<Option<Vec<GemmRecord>>>,
}

/// One cuBLASLt matmul the emulator's interpreter ran: its work and the bytes it must move.
#[derive(Clone, Copy, Debug)]
pub struct GemmRecord {
    pub epilogue: &'static str,
    /// 2·m·n·k·batch.
    pub flops: u64,
    /// A and B read, D written (and read when β ≠ 0), the epilogue's vectors: each once.
    pub min_bytes: u64,
}

impl EmuRuntime {
    pub fn new(options: Options) -> Arc<Self> {
        Arc::new(EmuRuntime {
            options,
            limits: SM90,
            reports: Mutex::new(None),
            scratch: Mutex::new(None),
            gemms: Mutex::new(None),
        })
    }

    /// Starts keeping every launch's report (with its traffic when `options.counters`) and every
    /// cuBLASLt call's record.
    pub fn keep_reports(&self) {
        *self.reports.lock().expect("reports lock") = Some(Vec::new());
        *self.gemms.lock().expect("gemm records lock") = Some(Vec::new());
    }

    /// The cuBLASLt records kept since `keep_reports` or the last `take_gemms`.
    pub fn take_gemms(&self) -> Vec<GemmRecord> {
        self.gemms.lock().expect("gemm records lock").as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub(crate) fn record_gemm(&self, record: GemmRecord) {
        if let Some(gemms) = self.gemms.lock().expect("gemm records lock").as_mut() {
            gemms.push(record);
        }
    }

    /// The reports kept since `keep_reports` or the last `take_reports`.
    pub fn take_reports(&self) -> Vec<LaunchReport> {
        self.reports.lock().expect("reports lock").as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// # Safety
    /// As [`crate::Device::launch`].
    pub(crate) unsafe fn launch<P: Copy + Send + Sync + 'static>(
        &self,
        kernel: &Kernel<P>,
        cfg: LaunchConfig,
        mut args: impl KernelArgs<P>,
    ) -> Result<()> {
        check_limits(kernel.name(), &cfg, &self.limits, "emu (sm_90 limits)")?;
        let mut buffers = EmuBuffers::default();
        let params = args.emulated(&mut buffers)?;
        // SAFETY: the views point into buffers borrowed by `args` for this call.
        let report =
            unsafe { emu::launch(kernel, emu_config(&cfg), params, &buffers.bytes(), self.limits, self.options) }
                .map_err(|fault| Error::KernelFault(Box::new(fault)))?;
        if let Some(reports) = self.reports.lock().expect("reports lock").as_mut() {
            reports.push(report);
        }
        Ok(())
    }
}
