//! Scalar math that works the same way in kernels and on the host.
//!
//! - `sqrt` is IEEE correctly rounded on both (PTX `sqrt.rn.f32`): same bits.
//! - `exp`/`ln` are built from IEEE add, mul and div only (range reduction + polynomial), so they
//!   give the same bits on the CPU and the GPU (about 1 ulp from the true value). Use them wherever
//!   both devices must decide the same way (masks, Sinkhorn).
//! - `fast_exp`/`fast_ln` are PTX `ex2.approx.ftz` / `lg2.approx.ftz` (about 2 ulp, one
//!   instruction); on the host the correctly rounded std versions, so the two devices agree only to
//!   a few ulp. For speed where exact agreement does not matter.
//!
//! `core::intrinsics::expf32` would crash LLVM's nvptx backend, hence the asm and the polynomials.
//! Rust never fuses a*b+c into an FMA on its own, on either target, so the operation sequence
//! written here is the one executed.

/// log2(e), to turn e^x into 2^(x·log2 e).
pub const LOG2_E: f32 = core::f32::consts::LOG2_E;
/// ln(2), to turn log2 into ln.
pub const LN_2: f32 = core::f32::consts::LN_2;

/// x^n by binary exponentiation, in one fixed sequence of f32 multiplications (the CPU's `powi`
/// leaves the order to the compiler): AdamW's bias corrections β^t, the same bits on every device.
#[inline(always)]
pub fn powi(mut x: f32, mut n: u32) -> f32 {
    let mut out = 1.0f32;
    while n > 0 {
        if n & 1 != 0 {
            out *= x;
        }
        x *= x;
        n >>= 1;
    }
    out
}

/// Correctly rounded square root.
#[inline(always)]
pub fn sqrt(x: f32) -> f32 {
    #[cfg(target_arch = "nvptx64")]
    {
        core::intrinsics::sqrtf32(x) // lowered to sqrt.rn.f32
    }
    #[cfg(not(target_arch = "nvptx64"))]
    {
        std::primitive::f32::sqrt(x)
    }
}

/// 2^x, fast (`ex2.approx`, subnormal results flushed to zero) on the GPU.
#[inline(always)]
pub fn fast_exp2(x: f32) -> f32 {
    crate::hw::ex2_approx(x)
}

/// log2(x), fast (`lg2.approx`) on the GPU.
#[inline(always)]
pub fn fast_log2(x: f32) -> f32 {
    crate::hw::lg2_approx(x)
}

/// e^x through 2^(x·log2 e), fast.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    fast_exp2(x * LOG2_E)
}

/// ln x through log2(x)·ln 2, fast.
#[inline(always)]
pub fn fast_ln(x: f32) -> f32 {
    fast_log2(x) * LN_2
}

/// ln 2 split so that n·LN2_HI is exact for |n| < 2¹² (Cody–Waite).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5·2²³: adding and subtracting it rounds an f32 of magnitude < 2²² to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// 2^n for an integer n in [-126, 127], built from its bits.
#[inline(always)]
fn pow2i(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// e^x, the same bits on every device (see the module comment). Overflow gives +∞, underflow 0
/// (through the subnormals), NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > 88.722_84 {
        return f32::INFINITY;
    }
    if x < -103.972_08 {
        return 0.0;
    }
    // x = n·ln 2 + r, |r| ≤ ln2/2.
    let n = (x * LOG2_E + ROUND_MAGIC) - ROUND_MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r by its Taylor series to r⁸ (truncation < 1e-9 relative for |r| ≤ 0.347).
    let mut p = 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // Scale by 2^n in two exact steps so that n down to -150 (subnormal results) works.
    let n = n as i32;
    let half = n / 2;
    p * pow2i(half) * pow2i(n - half)
}

/// ln x, the same bits on every device (see the module comment). ln 0 = −∞, ln of a negative
/// number or NaN is NaN, ln ∞ = ∞.
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return x;
    }
    // Subnormals: scale into the normal range first.
    let (x, mut e) = if x < f32::MIN_POSITIVE { (x * 8_388_608.0, -23) } else { (x, 0) };
    let bits = x.to_bits();
    e += ((bits >> 23) as i32) - 127;
    // m ∈ [1, 2); fold into [√½, √2) so that |s| below is small.
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if m > core::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2·atanh(s), s = (m − 1)/(m + 1), |s| ≤ 0.1716: odd series to s¹³.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut q = 1.0 / 13.0;
    q = q * s2 + 1.0 / 11.0;
    q = q * s2 + 1.0 / 9.0;
    q = q * s2 + 1.0 / 7.0;
    q = q * s2 + 1.0 / 5.0;
    q = q * s2 + 1.0 / 3.0;
    q = q * s2 + 1.0;
    let ln_m = 2.0 * s * q;
    let e = e as f32;
    e * LN2_HI + (e * LN2_LO + ln_m)
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7, below f32 resolution near ±1):
/// erf(x) = 1 − t·(a1 + t·(a2 + t·(a3 + t·(a4 + t·a5))))·e^(−x²), t = 1/(1 + p·|x|), odd in x.
/// Branch-free apart from the sign, so it vectorizes on the CPU; the constant PyTorch's CPU erf uses.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_72, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * fast_exp(-a * a)).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_reference_values() {
        // erf to 15 digits (Abramowitz & Stegun table 7.1).
        for (x, want) in [
            (0.1f32, 0.112462916018285f64),
            (0.5, 0.520499877813047),
            (1.0, 0.842700792949715),
            (2.0, 0.995322265018953),
            (3.5, 0.999999256901628),
        ] {
            assert!((erf(x) as f64 - want).abs() < 3e-7, "erf({x}) = {}", erf(x));
            assert!((erf(-x) as f64 + want).abs() < 3e-7);
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(9.0), 1.0);
    }

    #[test]
    fn fast_exp_and_fast_ln_match_std_within_a_few_ulp() {
        for i in -200..=200 {
            let x = i as f32 * 0.37;
            let (got, want) = (fast_exp(x), x.exp());
            // Rounding x·log2(e) costs up to |x|·ε relative on top of the approximation itself.
            let tolerance = (4.0 + x.abs()) * f32::EPSILON * want;
            assert!((got - want).abs() <= tolerance, "exp({x}) = {got}, std {want}");
            let y = (i as f32 * 0.11).exp();
            let (got, want) = (fast_ln(y), y.ln());
            assert!((got - want).abs() <= 4e-6 * want.abs().max(1.0), "ln({y}) = {got}, std {want}");
        }
        assert_eq!(sqrt(2.0), core::f32::consts::SQRT_2);
    }

    /// Distance in units in the last place between two finite f32 of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn portable_exp_is_within_2_ulp_of_the_true_value() {
        let mut worst = 0;
        for i in 0..200_000 {
            let x = -103.9 + i as f64 * (88.7 + 103.9) / 200_000.0;
            let x = x as f32;
            let want = (x as f64).exp() as f32;
            if want.is_normal() {
                worst = worst.max(ulps(exp(x), want));
            } else {
                assert!((exp(x) - want).abs() <= 2.0 * f32::from_bits(1), "exp({x})");
            }
        }
        assert!(worst <= 2, "exp: {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(1000.0), f32::INFINITY);
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn portable_ln_is_within_2_ulp_of_the_true_value() {
        let mut worst = 0;
        // Every 64th f32 bit pattern from the smallest subnormal to the largest finite value.
        for bits in (1..0x7f7f_ffffu32).step_by(64 * 997) {
            let x = f32::from_bits(bits);
            let want = (x as f64).ln() as f32;
            let got = ln(x);
            if want.abs() > 1e-3 {
                worst = worst.max(ulps(got, want));
            } else {
                assert!((got - want).abs() <= 2.0 * f32::EPSILON * 1e-3, "ln({x}) = {got}, want {want}");
            }
        }
        assert!(worst <= 2, "ln: {worst} ulp");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert!(ln(-1.0).is_nan() && ln(f32::NAN).is_nan());
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
    }
}
