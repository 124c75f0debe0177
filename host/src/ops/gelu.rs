//! Exact (erf) GELU on the CPU, as open_clip's `nn.GELU()`: gelu(x) = x·Φ(x),
//! Φ(x) = (1 + erf(x/√2))/2; gelu'(x) = Φ(x) + x·φ(x).

use rayon::prelude::*;

/// erf in f64: its Maclaurin series below 3 (|error| < 1e-13), the continued fraction of erfc above.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let value = if a < 3.0 {
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let mut k = a;
        for n in (1..=60).rev() {
            k = a + (n as f64 / 2.0) / k;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * k)
    };
    value.copysign(x)
}

fn cdf(x: f32) -> f64 {
    0.5 * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2))
}

pub fn gelu_forward(y: &mut [f32], x: &[f32]) {
    y.par_iter_mut().zip(x.par_iter()).for_each(|(y, &x)| *y = (x as f64 * cdf(x)) as f32);
}

/// dx = dy·gelu'(x) (overwritten).
pub fn gelu_backward(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    dx.par_iter_mut().zip(dy.par_iter().zip(x.par_iter())).for_each(|(dx, (&dy, &x))| {
        let xf = x as f64;
        *dx = (dy as f64 * (cdf(x) + xf * (-0.5 * xf * xf).exp() * inv_sqrt_2pi)) as f32;
    });
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gradient, values};
    use super::*;

    #[test]
    fn erf_matches_reference_values() {
        // erf(0.5), erf(1), erf(2), erf(3.5) to 15 digits (Abramowitz & Stegun table 7.1).
        for (x, want) in
            [(0.5, 0.520499877813047), (1.0, 0.842700792949715), (2.0, 0.995322265018953), (3.5, 0.999999256901628)]
        {
            assert!((erf(x) - want).abs() < 1e-13, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + want).abs() < 1e-13);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x: Vec<f32> = values(20, 1).iter().map(|v| v * 4.0).collect();
        let dy = values(20, 2);
        let mut dx = vec![0.0; 20];
        gelu_backward(&mut dx, &dy, &x);
        assert_gradient("dx", &dx, &x, |x| {
            let mut y = vec![0.0; 20];
            gelu_forward(&mut y, x);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum()
        });
    }
}
