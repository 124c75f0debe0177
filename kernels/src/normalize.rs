//! open_clip's image normalization (OpenAI CLIP constants): x_norm = (x − mean) / std, x ∈ [0, 1].
//! The host's preprocessing normalizes with it and the edge map de-normalizes with it, so both
//! use the very same f32 constants.

// open_clip's digits, kept as written there (f32 rounds them).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// An 8-bit channel value of channel `c`, normalized: (v/255 − mean) / std.
#[inline(always)]
pub fn normalize_u8(v: u8, c: usize) -> f32 {
    (v as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
}

/// Back to [0, 1]: x·std + mean.
#[inline(always)]
pub fn denormalize(x: f32, c: usize) -> f32 {
    x * CLIP_STD[c] + CLIP_MEAN[c]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denormalize_inverts_normalize() {
        for c in 0..3 {
            for v in [0u8, 1, 127, 128, 254, 255] {
                assert!((denormalize(normalize_u8(v, c), c) - v as f32 / 255.0).abs() < 1e-6);
            }
        }
    }
}
