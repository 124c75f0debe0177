//! Scalar math that works the same way in kernels and on the host.
//!
//! `sqrt` is IEEE correctly rounded on both (PTX `sqrt.rn.f32`), so results match bit for bit.
//! `exp`/`ln` are the fast approximations (PTX `ex2.approx.ftz.f32` / `lg2.approx.ftz.f32`,
//! about 2 ulp); on the host they use the correctly rounded std versions, so the two agree only to
//! a few ulp: never use them where CPU and GPU must agree exactly (e.g. mask decisions).
//! `core::intrinsics::expf32` would crash LLVM's nvptx backend, hence the asm.

/// log2(e), to turn e^x into 2^(x·log2 e).
pub const LOG2_E: f32 = core::f32::consts::LOG2_E;
/// ln(2), to turn log2 into ln.
pub const LN_2: f32 = core::f32::consts::LN_2;

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

/// One PTX f32 instruction `INSTR y, x;` on registers.
#[cfg(target_arch = "nvptx64")]
macro_rules! ptx_unary {
    ($instr:literal, $x:expr) => {{
        let y: f32;
        // SAFETY: a pure arithmetic instruction on registers.
        unsafe { core::arch::asm!(concat!($instr, " {y}, {x};"), y = out(reg32) y, x = in(reg32) $x) };
        y
    }};
}

/// 2^x, fast (`ex2.approx`, subnormal results flushed to zero) on the GPU.
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    #[cfg(target_arch = "nvptx64")]
    return ptx_unary!("ex2.approx.ftz.f32", x);
    #[cfg(not(target_arch = "nvptx64"))]
    return std::primitive::f32::exp2(x);
}

/// log2(x), fast (`lg2.approx`) on the GPU.
#[inline(always)]
pub fn log2(x: f32) -> f32 {
    #[cfg(target_arch = "nvptx64")]
    return ptx_unary!("lg2.approx.ftz.f32", x);
    #[cfg(not(target_arch = "nvptx64"))]
    return std::primitive::f32::log2(x);
}

/// e^x through 2^(x·log2 e).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp2(x * LOG2_E)
}

/// ln x through log2(x)·ln 2.
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    log2(x) * LN_2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_ln_match_std_within_a_few_ulp() {
        for i in -200..=200 {
            let x = i as f32 * 0.37;
            let (got, want) = (exp(x), x.exp());
            // Rounding x·log2(e) costs up to |x|·ε relative on top of the approximation itself.
            let tolerance = (4.0 + x.abs()) * f32::EPSILON * want;
            assert!((got - want).abs() <= tolerance, "exp({x}) = {got}, std {want}");
            let y = (i as f32 * 0.11).exp();
            let (got, want) = (ln(y), y.ln());
            assert!((got - want).abs() <= 4e-6 * want.abs().max(1.0), "ln({y}) = {got}, std {want}");
        }
        assert_eq!(sqrt(2.0), core::f32::consts::SQRT_2);
    }
}
