//! The `emu` device: the project's SIMT emulator (`clip_pgs_kernels::hw::emu`) behind the same
//! launches, launch configurations, shared-memory sizes and `Buffer` API as CUDA, with buffers in
//! host memory. It is for checking kernels — logic, indexing, barriers, races, traffic — not for
//! speed: a kernel runs orders of magnitude slower than on a GPU, and slower than the CPU device.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use cudarc::driver::LaunchConfig;

use clip_pgs_kernels::hw::Kernel;
use clip_pgs_kernels::hw::emu::{self, LaunchReport, Limits, Options, SM90};

use crate::buffer::Buffer;
use crate::error::{Error, Result};
use crate::graph::Recorded;
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
    /// The work recorded since `Device::begin_capture`, while capturing.
    recording: Mutex<Option<Vec<Recorded>>>,
    /// Captured graphs alive: while one holds the scratch memory's address, it may not move.
    pub(crate) graphs_alive: Arc<AtomicUsize>,
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
            recording: Mutex::new(None),
            graphs_alive: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub(crate) fn begin_recording(&self) -> Result<()> {
        let mut recording = self.recording.lock().expect("recording lock");
        if recording.is_some() {
            return Err(Error::Capture("the emulator is already capturing (on another thread)".into()));
        }
        *recording = Some(Vec::new());
        Ok(())
    }

    pub(crate) fn end_recording(&self) -> Result<Vec<Recorded>> {
        let work = self.recording.lock().expect("recording lock").take();
        work.ok_or_else(|| Error::Capture("no capture was started on the emulator".into()))
    }

    /// Runs `work` now, or records it for the graph when capturing.
    pub(crate) fn run_or_record(&self, mut work: Recorded) -> Result<()> {
        match self.recording.lock().expect("recording lock").as_mut() {
            Some(recording) => {
                recording.push(work);
                Ok(())
            }
            None => work(self),
        }
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
        let (kernel, cfg, bytes) = (*kernel, emu_config(&cfg), buffers.bytes());
        self.run_or_record(Box::new(move |rt: &EmuRuntime| {
            // SAFETY: the views point into buffers borrowed by `args` for this call, or, replayed
            // from a graph, into buffers the replay's caller keeps where they were.
            let report = unsafe { emu::launch(&kernel, cfg, params, &bytes, rt.limits, rt.options) }
                .map_err(|fault| Error::KernelFault(Box::new(fault)))?;
            if let Some(reports) = rt.reports.lock().expect("reports lock").as_mut() {
                reports.push(report);
            }
            Ok(())
        }))
    }
}
