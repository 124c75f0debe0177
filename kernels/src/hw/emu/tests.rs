//! The emulator against small test-only kernels: each check fires on a kernel with the bug, and
//! stays silent on the corrected kernel; warp collectives compute what PTX defines; the counters
//! see coalescing and bank conflicts.

use std::vec;
use std::vec::Vec;

use super::tensor;
use super::*;
use crate::hw::{
    Global, GlobalMut, ballot, block_dim_x, dynamic_shared, shfl_down, shfl_idx, shfl_xor, sync_threads, sync_warp,
    thread_x,
};
use crate::kernel;

fn config(threads: u32, shared_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid: [2, 1, 1], block: [threads, 1, 1], shared_bytes }
}

/// Runs `kernel` over (input, output) in both warp orders; the faults, or the output.
fn run(
    kernel: &Kernel<(Global<f32>, GlobalMut<f32>, u32)>,
    threads: u32,
    shared_bytes: u32,
    flag: u32,
) -> Vec<Result<Vec<f32>, Fault>> {
    let input: Vec<f32> = (0..threads).map(|i| i as f32).collect();
    [Order::Forward, Order::Reverse]
        .map(|order| {
            let mut output = vec![0.0f32; 2 * threads as usize];
            // SAFETY: the views cover the two vectors, alive for the launch.
            let params = unsafe {
                (
                    Global::new(input.as_ptr(), input.len(), 0),
                    GlobalMut::new(output.as_mut_ptr(), output.len(), 1),
                    flag,
                )
            };
            let options = Options { counters: true, order };
            unsafe {
                launch(
                    kernel,
                    config(threads, shared_bytes),
                    params,
                    &[input.len() * 4, output.len() * 4],
                    SM90,
                    options,
                )
            }
            .map(|_| output)
        })
        .into_iter()
        .collect()
}

fn fault(results: Vec<Result<Vec<f32>, Fault>>) -> Vec<Fault> {
    results.into_iter().map(|r| r.expect_err("the emulator must report this kernel")).collect()
}

fn ok(results: Vec<Result<Vec<f32>, Fault>>) -> Vec<f32> {
    let outputs: Vec<Vec<f32>> =
        results.into_iter().map(|r| r.unwrap_or_else(|f| panic!("unexpected fault: {f}"))).collect();
    assert_eq!(outputs[0], outputs[1], "results depend on the warp order");
    outputs[0].clone()
}

kernel! {
    /// After zeroing shared memory, each thread publishes its value, then reads its
    /// neighbour's: with `flag` = 1 a barrier separates the two, with 0 it is missing (a race).
    fn neighbour(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        unsafe {
            let s = dynamic_shared::<f32>();
            let (t, n) = (thread_x(), block_dim_x());
            s.store(t, 0.0);
            sync_threads();
            s.store(t, input.load(t));
            if flag == 1 {
                sync_threads();
            }
            output.store(crate::hw::block_x() * n + t, s.load((t + 1) % n));
        }
    }
}

#[test]
fn a_missing_barrier_is_a_race_in_either_warp_order_and_the_barrier_fixes_it() {
    // Forward, thread 0 reads slot 1 before thread 1 writes it (write after read); in reverse
    // order thread 63 writes slot 63 before thread 62 reads it (read after write).
    let faults = fault(run(&neighbour, 64, 256, 0));
    assert!(
        matches!(faults[0].kind, FaultKind::Race { hazard: Hazard::WriteAfterRead, byte_offset: 4, .. }),
        "{}",
        faults[0]
    );
    assert!(matches!(faults[1].kind, FaultKind::Race { hazard: Hazard::ReadAfterWrite, .. }), "{}", faults[1]);
    for f in &faults {
        let text = std::format!("{f}");
        assert!(text.contains("kernel neighbour block (0, 0, 0) thread (") && text.contains("tests.rs:"), "{text}");
    }
    let out = ok(run(&neighbour, 64, 256, 1));
    assert_eq!(out[63], 0.0);
    assert_eq!(out[64 + 5], 6.0);
}

kernel! {
    /// A shared-memory tree sum; `flag` = 0 leaves out the barrier between the levels.
    fn tree_sum(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        unsafe {
            let s = dynamic_shared::<f32>();
            let t = thread_x();
            s.store(t, input.load(t));
            sync_threads();
            let mut half = block_dim_x() / 2;
            while half > 0 {
                if t < half {
                    s.store(t, s.load(t) + s.load(t + half));
                }
                if flag == 1 {
                    sync_threads();
                }
                half /= 2;
            }
            if t == 0 {
                output.store(crate::hw::block_x(), s.load(0));
            }
        }
    }
}

#[test]
fn a_reduction_without_its_barriers_races_and_with_them_sums() {
    for f in fault(run(&tree_sum, 128, 512, 0)) {
        assert!(matches!(f.kind, FaultKind::Race { .. }), "{f}");
    }
    assert_eq!(ok(run(&tree_sum, 128, 512, 1))[0], (0..128).sum::<u32>() as f32);
}

kernel! {
    /// Reads input[t + flag]: with flag = 1 the last thread reads one past the end.
    fn shifted_read(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        unsafe {
            let t = thread_x();
            output.store(t, input.load(t + flag as usize));
        }
    }
}

#[test]
fn an_out_of_bounds_read_is_reported_with_thread_index_and_line() {
    let faults = fault(run(&shifted_read, 32, 0, 1));
    let f = &faults[0];
    assert_eq!(f.thread, Some([31, 0, 0]));
    assert!(
        matches!(
            f.kind,
            FaultKind::OutOfBounds { space: Space::Global, write: false, index: 32, len: 32, byte_offset: 128 }
        ),
        "{f}"
    );
    assert!(f.site.expect("a source line").file().ends_with("tests.rs"));
    ok(run(&shifted_read, 32, 0, 0));
}

kernel! {
    /// Even threads write their slot; every thread reads its own (flag = 0: odd slots were
    /// never written) or its even neighbour's (flag = 1) after a barrier.
    fn sparse_init(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        unsafe {
            let s = dynamic_shared::<f32>();
            let t = thread_x();
            if t.is_multiple_of(2) {
                s.store(t, input.load(t));
            }
            sync_threads();
            output.store(t, s.load(if flag == 1 { t & !1 } else { t }));
        }
    }
}

#[test]
fn reading_unwritten_shared_memory_is_reported() {
    for f in fault(run(&sparse_init, 32, 128, 0)) {
        assert_eq!(f.kind, FaultKind::Uninitialized { byte_offset: 4 * f.thread.unwrap()[0] as usize }, "{f}");
    }
    ok(run(&sparse_init, 32, 128, 1));
}

kernel! {
    /// flag = 0: the two halves of the block wait at different barriers; 1: one barrier;
    /// 2: the second half exits before the barrier.
    #[allow(clippy::if_same_then_else)] // two barriers on two lines: the point of the test
    fn branches(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        unsafe {
            let t = thread_x();
            if flag == 2 && t >= 32 {
                return;
            }
            if flag == 0 && t < 32 {
                sync_threads();
            } else {
                sync_threads();
            }
            output.store(t, input.load(t));
        }
    }
}

#[test]
fn divergent_barriers_and_barriers_some_threads_skip_are_reported() {
    for f in fault(run(&branches, 64, 0, 0)) {
        assert!(matches!(f.kind, FaultKind::DivergentBarrier { .. }), "{f}");
    }
    for f in fault(run(&branches, 64, 0, 2)) {
        assert!(matches!(f.kind, FaultKind::BarrierNotReached { arrived: 32, exited: 32, .. }), "{f}");
    }
    ok(run(&branches, 64, 0, 1));
}

kernel! {
    /// flag = 0: lane 0 waits at a barrier while its warp waits for it in a shuffle (deadlock);
    /// 1: lane 5 exits before the shuffle; 2: everyone shuffles.
    fn stuck(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        unsafe {
            let t = thread_x();
            if flag == 1 && t == 5 {
                return;
            }
            if flag == 0 && t == 0 {
                sync_threads();
            } else {
                output.store(t, shfl_xor(u32::MAX, input.load(t), 1));
            }
        }
    }
}

#[test]
fn deadlocks_and_shuffles_with_exited_lanes_are_errors_not_hangs() {
    for f in fault(run(&stuck, 32, 0, 0)) {
        let FaultKind::Deadlock { waits } = &f.kind else { panic!("expected a deadlock, got {f}") };
        assert!(
            waits.contains("1 thread(s) wait at barrier") && waits.contains("31 thread(s) wait at ShflXor"),
            "{waits}"
        );
    }
    for f in fault(run(&stuck, 32, 0, 1)) {
        assert!(std::format!("{f}").contains("names lane 5 which has exited"), "{f}");
    }
    let out = ok(run(&stuck, 32, 0, 2));
    assert_eq!(&out[..4], &[1.0, 0.0, 3.0, 2.0]);
}

kernel! {
    /// Warp collectives as PTX defines them: butterfly sum, broadcast, shift down, ballot.
    fn collectives(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        unsafe {
            let t = thread_x();
            let mut v = input.load(t);
            let mut b = 16;
            while b > 0 {
                v += shfl_xor(u32::MAX, v, b);
                b /= 2;
            }
            let from_3 = shfl_idx(u32::MAX, input.load(t), 3);
            let down = shfl_down(u32::MAX, input.load(t), flag);
            let odd = ballot(u32::MAX, t % 2 == 1);
            sync_warp(u32::MAX);
            output.store(t, v + 1000.0 * from_3 + 1e5 * down + if odd == 0xaaaa_aaaa { 0.5 } else { 0.0 });
        }
    }
}

#[test]
fn warp_collectives_compute_what_ptx_defines() {
    let out = ok(run(&collectives, 32, 0, 4));
    for (t, &v) in out.iter().take(32).enumerate() {
        let down = if t + 4 < 32 { t + 4 } else { t } as f32;
        assert_eq!(v, 496.0 + 3000.0 + 1e5 * down + 0.5, "lane {t}");
    }
}

kernel! {
    /// flag = 0: a coalesced read (lane t reads element t); 1: stride 8 (one lane per sector);
    /// 2: shared memory at stride 2 (2-way bank conflict); 3: stride 1 (none).
    fn access_patterns(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        unsafe {
            let t = thread_x();
            let v = if flag == 1 { input.load((8 * t) % 256) } else { input.load(t) };
            let s = dynamic_shared::<f32>();
            s.store(if flag == 2 { 2 * t } else { t }, v);
            output.store(t, v);
        }
    }
}

#[test]
fn counters_see_coalescing_and_bank_conflicts() {
    let traffic = |flag| {
        let input: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut output = vec![0.0f32; 32];
        let params = unsafe { (Global::new(input.as_ptr(), 256, 0), GlobalMut::new(output.as_mut_ptr(), 32, 1), flag) };
        let cfg = LaunchConfig { grid: [1, 1, 1], block: [32, 1, 1], shared_bytes: 256 };
        let options = Options { counters: true, order: Order::Forward };
        unsafe { launch(&access_patterns, cfg, params, &[1024, 128], SM90, options) }.unwrap().traffic
    };
    let coalesced = traffic(0);
    assert_eq!(coalesced.sector_efficiency(), 1.0);
    assert_eq!((coalesced.global_requests(), coalesced.sectors()), (2, 8)); // 128 B read, 128 B written
    assert_eq!(coalesced.distinct_read, 128);
    let strided = traffic(1);
    let read = strided.sites.iter().find(|s| s.space == Space::Global && !s.write).unwrap();
    assert_eq!((read.sectors, read.bytes), (32, 128));
    assert_eq!(read.sector_efficiency(), 0.125);
    assert_eq!(traffic(2).bank_conflicts(), 1);
    assert_eq!(traffic(3).bank_conflicts(), 0);
}

#[test]
fn launches_beyond_the_device_limits_are_refused() {
    let too_many = LaunchConfig { grid: [1, 1, 1], block: [2048, 1, 1], shared_bytes: 0 };
    assert!(check_limits(&too_many, &SM90).unwrap_err().contains("2048 threads per block exceed the limit of 1024"));
    let too_much = LaunchConfig { grid: [1, 1, 1], block: [32, 1, 1], shared_bytes: 300_000 };
    assert!(check_limits(&too_much, &SM90).unwrap_err().contains("shared memory"));
}

kernel! {
    /// Panics on thread 7 (flag = 1).
    fn panics(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        unsafe {
            let t = thread_x();
            assert!(!(flag == 1 && t == 7), "thread seven refuses");
            output.store(t, input.load(t));
        }
    }
}

#[test]
fn a_kernel_panic_is_a_fault_value() {
    let faults = fault(run(&panics, 32, 0, 1));
    assert_eq!(faults[0].thread, Some([7, 0, 0]));
    assert!(matches!(&faults[0].kind, FaultKind::Panic { message } if message.contains("thread seven refuses")));
}

/// Four floats loaded as one 16-byte vector (`ld.shared.v4.f32` on the GPU).
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct F32x4([f32; 4]);

kernel! {
    /// A 16-byte vector load from shared memory at float `flag` (misaligned unless a multiple of 4).
    fn vector_load(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        unsafe {
            let s = dynamic_shared::<f32>();
            let t = thread_x();
            s.store(t, input.load(t));
            sync_threads();
            let v = s.offset(flag as usize).cast::<F32x4>().load(0);
            output.store(t, v.0[t % 4]);
        }
    }
}

#[test]
fn misaligned_vector_accesses_are_reported() {
    for f in fault(run(&vector_load, 32, 128, 1)) {
        assert_eq!(f.kind, FaultKind::Misaligned { space: Space::Shared, byte_offset: 4, align: 16 }, "{f}");
    }
    assert_eq!(ok(run(&vector_load, 32, 128, 4))[..4], [4.0, 5.0, 6.0, 7.0]);
}

/// The mma fragment tables of the PTX ISA ("Matrix fragments for mma.m16n8k16 with floating
/// point type"), written out per element as the document states them: A's a_i (i < 8) at row
/// g (i < 2 or 4 ≤ i < 6, else g + 8), column 2t + (i & 1) (+ 8 for i ≥ 4); B's b_i (i < 4) at
/// row 2t + (i & 1) (+ 8 for i ≥ 2), column g; C's c_i at row g (+ 8 for i ≥ 2), column
/// 2t + (i & 1).
#[test]
fn mma_follows_the_ptx_fragment_tables() {
    use crate::element::Bf16;
    let rng = crate::philox::Philox::new(5, 0, 0);
    let value = |i: u32| Bf16::from_f32(rng.uniform(i) * 4.0 - 2.0);
    let a: Vec<Vec<Bf16>> = (0..16).map(|r| (0..16).map(|k| value(r * 16 + k)).collect()).collect();
    let b: Vec<Vec<Bf16>> = (0..16).map(|k| (0..8).map(|n| value(1000 + k * 8 + n)).collect()).collect();
    let c: Vec<Vec<f32>> = (0..16).map(|r| (0..8).map(|n| rng.uniform(2000 + r * 8 + n)).collect()).collect();
    let lanes: [([u32; 4], [u32; 2], [f32; 4]); 32] = core::array::from_fn(|lane| {
        let (g, t) = (lane / 4, lane % 4);
        let a_el = |i: usize| {
            let row = if i < 2 || (4..6).contains(&i) { g } else { g + 8 };
            a[row][2 * t + (i & 1) + if i >= 4 { 8 } else { 0 }].0
        };
        let b_el = |i: usize| b[2 * t + (i & 1) + if i >= 2 { 8 } else { 0 }][g].0;
        let regs_a = core::array::from_fn(|r| tensor::pack(a_el(2 * r), a_el(2 * r + 1)));
        let regs_b = core::array::from_fn(|r| tensor::pack(b_el(2 * r), b_el(2 * r + 1)));
        (regs_a, regs_b, core::array::from_fn(|i| c[g + if i >= 2 { 8 } else { 0 }][2 * t + (i & 1)]))
    });
    let d = tensor::mma_m16n8k16(&lanes);
    for (lane, regs) in d.iter().enumerate() {
        let (g, t) = (lane / 4, lane % 4);
        for (i, &got) in regs.iter().enumerate() {
            let (row, col) = (g + if i >= 2 { 8 } else { 0 }, 2 * t + (i & 1));
            let mut want = c[row][col];
            for k in 0..16 {
                want += a[row][k].to_f32() * b[k][col].to_f32();
            }
            assert_eq!(got, want, "lane {lane} d{i}");
        }
    }
}

#[test]
fn ldmatrix_gives_each_lane_its_row_pair_or_the_transposed_one() {
    let m: Vec<[[u16; 8]; 8]> =
        (0..4).map(|i| core::array::from_fn(|r| core::array::from_fn(|c| (100 * i + 10 * r + c) as u16))).collect();
    let plain = tensor::ldmatrix(&m, false);
    let trans = tensor::ldmatrix(&m, true);
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for i in 0..4 {
            assert_eq!(plain[lane][i], tensor::pack(m[i][g][2 * t], m[i][g][2 * t + 1]));
            assert_eq!(trans[lane][i], tensor::pack(m[i][2 * t][g], m[i][2 * t + 1][g]));
        }
    }
}

kernel! {
    /// Each lane copies 16 bytes (4 floats) to shared memory with cp.async and reads them back:
    /// with `flag` = 1 after `cp.async.wait_group 0`, with 0 without waiting.
    fn async_copy(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        unsafe {
            let s = dynamic_shared::<f32>();
            let t = thread_x();
            crate::hw::cp_async_16(s, 4 * t, input, 4 * t);
            crate::hw::cp_async_commit();
            if flag == 1 {
                crate::hw::cp_async_wait::<0>();
            }
            output.store(t, s.load(4 * t + 1));
        }
    }
}

#[test]
fn reading_a_cp_async_destination_before_its_wait_is_reported() {
    let run = |flag: u32| {
        let input: Vec<f32> = (0..128).map(|i| i as f32).collect();
        let mut output = vec![0.0f32; 32];
        let params = unsafe { (Global::new(input.as_ptr(), 128, 0), GlobalMut::new(output.as_mut_ptr(), 32, 1), flag) };
        let cfg = LaunchConfig { grid: [1, 1, 1], block: [32, 1, 1], shared_bytes: 512 };
        unsafe { launch(&async_copy, cfg, params, &[512, 128], SM90, Options::default()) }.map(|_| output)
    };
    let f = run(0).expect_err("the early read must be reported");
    assert_eq!(f.kind, FaultKind::AsyncCopyPending { byte_offset: 4 }, "{f}");
    assert_eq!(run(1).unwrap()[3], 13.0);
}

kernel! {
    /// Every lane fills 8 bf16 of shared memory, then the warp runs `ldmatrix.x4` with lane l
    /// naming row l, 16-byte aligned, shifted by `flag` bytes (misaligned unless 0) — and a
    /// `cp.async` to a destination shifted by `flag` bytes, for `flag` ≥ 100 (100: aligned).
    fn tensor_misaligned(input: Global<f32>, output: GlobalMut<f32>, flag: u32) {
        use crate::element::Bf16;
        unsafe {
            let s = dynamic_shared::<Bf16>();
            let t = thread_x();
            if flag >= 100 {
                crate::hw::cp_async_16(dynamic_shared::<f32>(), 4 * t + (flag as usize - 100), input, 0);
                crate::hw::cp_async_commit();
                crate::hw::cp_async_wait::<0>();
            } else {
                for i in 0..8 {
                    s.store(8 * t + i, Bf16::from_f32(input.load(t)));
                }
                sync_warp(u32::MAX);
                let regs = crate::hw::ldmatrix::<4, false>(s.cast::<u8>().offset(16 * t + flag as usize).cast::<Bf16>());
                output.store(t, regs[0] as f32);
            }
        }
    }
}

#[test]
fn misaligned_tensor_core_addresses_are_reported() {
    for f in fault(run(&tensor_misaligned, 32, 1024, 2)) {
        assert_eq!(f.kind, FaultKind::Misaligned { space: Space::Shared, byte_offset: 2, align: 16 }, "{f}");
    }
    assert!(ok(run(&tensor_misaligned, 32, 1024, 0)).iter().all(|v| v.is_finite()));
    for f in fault(run(&tensor_misaligned, 32, 1024, 101)) {
        assert!(matches!(f.kind, FaultKind::Misaligned { space: Space::Shared, align: 16, .. }), "{f}");
    }
    ok(run(&tensor_misaligned, 32, 1024, 100));
}
