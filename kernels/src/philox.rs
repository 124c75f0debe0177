//! Philox 4x32-10, the counter-based RNG of Salmon et al. (SC'11, "Parallel random numbers: as
//! easy as 1, 2, 3"). A pure function of (counter, key): every thread of every kernel, and the CPU
//! reference, draws the same numbers for the same (seed, stream, index) without shared state.
//!
//! The project keys it with the seed and uses the counter for (step, image, draw): see
//! [`Philox::new`].

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9; // golden ratio
const W1: u32 = 0xBB67_AE85; // sqrt(3) - 1

#[inline(always)]
fn mul_hi_lo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

#[inline(always)]
fn round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mul_hi_lo(M0, c[0]);
    let (hi1, lo1) = mul_hi_lo(M1, c[2]);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// The Philox 4x32 block function with 10 rounds.
#[inline(always)]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    c = round(c, k);
    for _ in 1..10 {
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        c = round(c, k);
    }
    c
}

/// Maps 32 random bits to a uniform f32 in the open interval (0, 1): the top 23 bits plus half a
/// step, so neither 0 nor 1 is ever returned (safe for `ln(u)` and `ln(-ln(u))`). 23 bits, not
/// 24: the largest value, 1 − 2⁻²⁴, must stay representable below 1.
#[inline(always)]
pub fn uniform_open01(bits: u32) -> f32 {
    const STEP: f32 = 1.0 / (1u32 << 23) as f32;
    (bits >> 9) as f32 * STEP + 0.5 * STEP
}

/// A Philox stream: key = seed, counter = (index, stream id a, stream id b, 0).
/// Draw `i` of the stream is word `i % 4` of block `i / 4`.
#[derive(Clone, Copy, Debug)]
pub struct Philox {
    key: [u32; 2],
    stream: [u32; 2],
}

impl Philox {
    /// `a`, `b` name the stream, e.g. (training step, image index).
    pub fn new(seed: u64, a: u32, b: u32) -> Self {
        Philox { key: [seed as u32, (seed >> 32) as u32], stream: [a, b] }
    }

    /// The four words of block `block`.
    #[inline(always)]
    pub fn block(&self, block: u32) -> [u32; 4] {
        philox4x32_10([block, self.stream[0], self.stream[1], 0], self.key)
    }

    /// Draw `i` as raw bits.
    #[inline(always)]
    pub fn bits(&self, i: u32) -> u32 {
        // A match, not b[i % 4]: dynamic indexing would put the block in GPU local memory.
        let b = self.block(i / 4);
        match i % 4 {
            0 => b[0],
            1 => b[1],
            2 => b[2],
            _ => b[3],
        }
    }

    /// Draw `i` as a uniform in (0, 1).
    #[inline(always)]
    pub fn uniform(&self, i: u32) -> f32 {
        uniform_open01(self.bits(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors of Random123 (`tests/kat_vectors`, the three `philox4x32 10` lines):
    /// counter, key, expected output.
    #[test]
    fn matches_random123_known_answers() {
        let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            ([0; 4], [0; 2], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
            ([u32::MAX; 4], [u32::MAX; 2], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (counter, key, expected) in kat {
            assert_eq!(philox4x32_10(counter, key), expected, "counter {counter:x?} key {key:x?}");
        }
    }

    #[test]
    fn uniforms_are_open_and_roughly_uniform() {
        assert!(uniform_open01(0) > 0.0 && uniform_open01(u32::MAX) < 1.0);
        let rng = Philox::new(42, 7, 3);
        let n = 100_000u32;
        let mean = (0..n).map(|i| rng.uniform(i) as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
        // Different streams and seeds give different draws.
        assert_ne!(rng.bits(0), Philox::new(42, 7, 4).bits(0));
        assert_ne!(rng.bits(0), Philox::new(43, 7, 3).bits(0));
    }
}
