//! Element types a kernel reads and writes: f32, and bf16 carried as its 16 bits. Kernels load
//! an element, compute in f32 and store with `from_f32` (round to nearest even for bf16).

/// bf16 as raw bits. Same layout as `half::bf16` on the host, so host buffers of `half::bf16`
/// are read by kernels as `Bf16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// Exact widening: bf16 is the top half of an f32.
    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }

    /// Round to nearest even (NaN stays NaN).
    #[inline(always)]
    pub fn from_f32(x: f32) -> Self {
        let bits = x.to_bits();
        if x.is_nan() {
            return Bf16(((bits >> 16) | 0x40) as u16);
        }
        let round = 0x7fff + ((bits >> 16) & 1);
        Bf16((bits.wrapping_add(round) >> 16) as u16)
    }
}

/// Four f32 as one 16-byte aligned unit: one 128-bit access (`ld/st.global.v4.f32`) instead of
/// four, for the same bytes, in memory-bound kernels.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(16))]
pub struct F32x4(pub [f32; 4]);

/// Four bf16 as one 8-byte aligned unit (one 64-bit access).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(8))]
pub struct Bf16x4(pub [Bf16; 4]);

/// A value a kernel loads and computes with in f32, and stores back rounded.
pub trait Element: Copy {
    const ZERO: Self;
    fn to_f32(self) -> f32;
    /// The nearest value (ties to even); exact for f32.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for Bf16 {
    const ZERO: Self = Bf16(0);
    #[inline(always)]
    fn to_f32(self) -> f32 {
        Bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        Bf16::from_f32(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trips_and_rounds_to_nearest_even() {
        for x in [0.0f32, 1.0, -2.5, 3.140625, 2f32.powi(-100), -65280.0] {
            assert_eq!(Bf16::from_f32(x).to_f32(), x, "{x} is representable in bf16");
        }
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(Bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties go to 1 + 2^-6.
        assert_eq!(Bf16::from_f32(1.0 + 3.0 / 256.0).to_f32(), 1.0 + 1.0 / 64.0);
        assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
    }
}
