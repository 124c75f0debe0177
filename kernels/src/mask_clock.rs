//! The per-step values of the mask kernels — the Philox seed and step of the draws, the first
//! image's number in the global batch, and α, the weight of token similarity — read from device memory rather than passed as launch parameters,
//! so that a captured training step (a CUDA graph, whose launch parameters are frozen at capture)
//! draws new masks at every replay: the host writes the four words before each step.

use crate::hw::Global;

/// Word indices of the clock buffer.
pub const SEED_LO: usize = 0;
pub const SEED_HI: usize = 1;
pub const STEP: usize = 2;
/// α's f32 bits.
pub const ALPHA: usize = 3;
/// The batch's first image in the global batch (data-parallel ranks), the draws' image offset.
pub const FIRST: usize = 4;
pub const LEN: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskClock {
    pub seed: u64,
    pub step: u32,
    pub alpha: f32,
    pub first: u32,
}

impl MaskClock {
    /// The buffer's words.
    pub fn words(&self) -> [u32; LEN] {
        [self.seed as u32, (self.seed >> 32) as u32, self.step, self.alpha.to_bits(), self.first]
    }

    /// The clock in `clock` (every thread reads the same words: one broadcast each).
    ///
    /// # Safety
    /// `clock` holds LEN words.
    pub unsafe fn load(clock: Global<u32>) -> MaskClock {
        // SAFETY: the caller's contract.
        unsafe {
            let seed = clock.load(SEED_LO) as u64 | (clock.load(SEED_HI) as u64) << 32;
            let alpha = f32::from_bits(clock.load(ALPHA));
            MaskClock { seed, step: clock.load(STEP), alpha, first: clock.load(FIRST) }
        }
    }
}
