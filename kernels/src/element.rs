//! Element types a kernel reads and writes: f32, and bf16 carried as its 16 bits. Kernels load
//! an element, compute in f32 and store with `from_f32` (round to nearest even for bf16).
//!
//! Packs ([`Pack`]): consecutive elements moved by one wide access (128 bits: [`F32x4`],
//! [`Bf16x8`], each element type's [`Element::Vector`]; 64 bits: [`Bf16x4`]), for the
//! memory-bound kernels; an element is a pack of one, so one body serves both paths.

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

/// Eight bf16 as one 16-byte aligned unit (one 128-bit access).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(16))]
pub struct Bf16x8(pub [Bf16; 8]);

/// A value a kernel loads and computes with in f32, and stores back rounded.
pub trait Element: Pack<Element = Self> {
    const ZERO: Self;
    /// 16 bytes of these elements, 16-byte aligned: the widest (128-bit) access.
    type Vector: Pack<Element = Self>;
    fn to_f32(self) -> f32;
    /// The nearest value (ties to even); exact for f32.
    fn from_f32(x: f32) -> Self;
}

/// The most lanes of a [`Pack`].
pub const MAX_LANES: usize = 8;

/// `LANES` consecutive elements moved by one access, aligned to its size: a vector, or an element
/// itself (one lane), so that a kernel body written over packs also serves the scalar path.
pub trait Pack: Copy {
    type Element: Element;
    /// At most [`MAX_LANES`].
    const LANES: usize;
    /// Every lane `x`.
    fn splat(x: Self::Element) -> Self;
    /// Lane k < LANES.
    fn lane(self, k: usize) -> Self::Element;
    fn set_lane(&mut self, k: usize, x: Self::Element);
}

macro_rules! element_pack {
    ($($t:ty),*) => {$(
        impl Pack for $t {
            type Element = $t;
            const LANES: usize = 1;
            #[inline(always)]
            fn splat(x: $t) -> Self {
                x
            }
            #[inline(always)]
            fn lane(self, _: usize) -> $t {
                self
            }
            #[inline(always)]
            fn set_lane(&mut self, _: usize, x: $t) {
                *self = x;
            }
        }
    )*};
}
element_pack!(f32, Bf16);

macro_rules! vector_pack {
    ($($v:ident: [$t:ty; $lanes:literal]),*) => {$(
        const _: () = assert!($lanes <= MAX_LANES && size_of::<$v>() == $lanes * size_of::<$t>());
        impl Pack for $v {
            type Element = $t;
            const LANES: usize = $lanes;
            #[inline(always)]
            fn splat(x: $t) -> Self {
                $v([x; $lanes])
            }
            #[inline(always)]
            fn lane(self, k: usize) -> $t {
                self.0[k]
            }
            #[inline(always)]
            fn set_lane(&mut self, k: usize, x: $t) {
                self.0[k] = x;
            }
        }
    )*};
}
vector_pack!(F32x4: [f32; 4], Bf16x4: [Bf16; 4], Bf16x8: [Bf16; 8]);

impl Element for f32 {
    const ZERO: Self = 0.0;
    type Vector = F32x4;
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
    type Vector = Bf16x8;
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
