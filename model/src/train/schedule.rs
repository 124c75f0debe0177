//! open_clip's `cosine_lr`: linear warm-up to the base rate over `warmup` steps, then a cosine
//! decay to 0 over the remaining steps.

pub fn cosine_lr(base: f32, warmup: usize, total: usize, step: usize) -> f32 {
    if step < warmup {
        return base * (step + 1) as f32 / warmup as f32;
    }
    let (e, es) = ((step - warmup) as f32, (total.saturating_sub(warmup)).max(1) as f32);
    0.5 * (1.0 + (std::f32::consts::PI * e / es).cos()) * base
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_zero() {
        assert_eq!(cosine_lr(1.0, 10, 110, 0), 0.1);
        assert_eq!(cosine_lr(1.0, 10, 110, 9), 1.0);
        assert_eq!(cosine_lr(1.0, 10, 110, 10), 1.0);
        assert!((cosine_lr(1.0, 10, 110, 60) - 0.5).abs() < 1e-6);
        assert!(cosine_lr(1.0, 10, 110, 109) < 0.001);
        assert!(cosine_lr(1.0, 0, 100, 0) == 1.0);
    }
}
