//! A steady-state training step on the CPU device allocates nothing: parameters, gradients,
//! moments and every activation live in buffers made once per run (`clip::Workspace`). Counted
//! with a counting global allocator around step 4 of test-tiny (given masks, two micro-batches,
//! gradient clipping). Two things allocate and are not the model's: the `gemm` crate packs its
//! operands into scratch it allocates per call (told apart by the allocation's stack), and PGS
//! and FLIP masks made on the CPU allocate their working memory (this step is given its masks).

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use clip_pgs_host::Device;
use clip_pgs_host::ops::adamw::AdamW;
use clip_pgs_kernels::philox::Philox;
use clip_pgs_model::config::ClipConfig;
use clip_pgs_model::optimizer::Optimizer;
use clip_pgs_model::params::Params;
use clip_pgs_model::step::{StepMasks, TrainStep};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
/// Allocations by the model (anything but the GEMM library), and the first one's stack.
static MODEL: AtomicUsize = AtomicUsize::new(0);
static GEMM: AtomicUsize = AtomicUsize::new(0);
static FIRST: Mutex<Option<String>> = Mutex::new(None);

thread_local! {
    /// Set while an allocation is being attributed (which allocates itself).
    static ATTRIBUTING: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if !COUNTING.load(Ordering::Relaxed) || ATTRIBUTING.with(Cell::get) {
        return;
    }
    ATTRIBUTING.with(|a| a.set(true));
    let stack = Backtrace::force_capture().to_string();
    if stack.contains("gemm_common::") || stack.contains("gemm_f32::") {
        GEMM.fetch_add(1, Ordering::Relaxed);
    } else {
        MODEL.fetch_add(1, Ordering::Relaxed);
        FIRST.lock().unwrap().get_or_insert(stack);
    }
    ATTRIBUTING.with(|a| a.set(false));
}

// SAFETY: forwards to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn a_steady_state_training_step_allocates_nothing() {
    let cfg = ClipConfig::load("test-tiny").unwrap();
    let device = Device::Cpu;
    let params = Params::init(&cfg, 1, &device).unwrap();
    let adamw = AdamW { beta1: 0.9, beta2: 0.98, eps: 1e-6 };
    let optimizer = Optimizer::new(&params.layout, &device, adamw, 0.1).unwrap();
    let (n, ctx, l) = (8, cfg.text_cfg.context_length, cfg.patches());
    let mut step: TrainStep = TrainStep::new(device, &cfg, params, optimizer, n, 2, false).unwrap();
    let rng = Philox::new(2, 0, 0);
    let images: Vec<f32> =
        (0..(n * 3 * cfg.vision_cfg.image_size.pow(2)) as u32).map(|i| rng.uniform(i) - 0.5).collect();
    let text: Vec<u32> = (0..(n * ctx) as u32).map(|i| if i as usize % ctx < 6 { 1 + i % 200 } else { 0 }).collect();
    let keep: Vec<Vec<usize>> = (0..n).map(|b| (0..l).filter(|j| (j + b) % 3 != 0).collect()).collect();
    // The whole step on a rayon worker: parallel ops then queue on its own deque, which keeps its
    // memory, instead of the pool's injector, which allocates blocks as jobs come in.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| {
        let mut take_step = || {
            step.forward_backward(&images, &text, StepMasks::Lists(&keep)).unwrap();
            step.grad_norm().unwrap();
            step.update(1e-3, Some(1.0)).unwrap();
            (step.loss().unwrap(), step.optimizer.last_norm().unwrap())
        };
        for _ in 0..3 {
            take_step();
        }
        COUNTING.store(true, Ordering::SeqCst);
        let (loss, norm) = take_step();
        COUNTING.store(false, Ordering::SeqCst);
        assert!(loss.is_finite() && norm.is_finite(), "{loss} {norm}");
    });
    let (model, gemm) = (MODEL.load(Ordering::SeqCst), GEMM.load(Ordering::SeqCst));
    println!("one steady-state step: {model} allocations by the model, {gemm} by the gemm crate's packing");
    assert!(gemm > 0, "the GEMM library's scratch was not seen: the attribution is broken");
    assert_eq!(
        model,
        0,
        "the model allocated in a steady-state step; the first:\n{}",
        FIRST.lock().unwrap().as_deref().unwrap_or("")
    );
}
