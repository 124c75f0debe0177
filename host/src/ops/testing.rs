//! Test helpers: deterministic values and finite-difference gradient checks.

/// `n` values in [-1, 1) from Philox stream `seed`.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let rng = clip_pgs_kernels::philox::Philox::new(seed, 9, 9);
    (0..n as u32).map(|i| rng.uniform(i) * 2.0 - 1.0).collect()
}

/// Checks an analytic gradient against central differences of `loss` at `x` (f32, step 1e-2,
/// tolerance 2e-2 relative to the larger of the gradient's scale and 1).
pub fn assert_gradient(name: &str, analytic: &[f32], x: &[f32], loss: impl Fn(&[f32]) -> f32) {
    let scale = analytic.iter().fold(1.0f32, |m, g| m.max(g.abs()));
    let mut probe = x.to_vec();
    for i in 0..x.len() {
        let h = 1e-2;
        probe[i] = x[i] + h;
        let up = loss(&probe);
        probe[i] = x[i] - h;
        let down = loss(&probe);
        probe[i] = x[i];
        let numeric = (up - down) / (2.0 * h);
        assert!(
            (numeric - analytic[i]).abs() <= 2e-2 * scale,
            "{name}[{i}]: analytic {} vs numeric {numeric}",
            analytic[i]
        );
    }
}
