//! Linear layer on the CPU, PyTorch layout: y [rows, out] = x [rows, in]·Wᵀ + b, W [out, in].
//! Backward: dx = dy·W, dW += dyᵀ·x, db += Σ_rows dy.

use super::matmul::{MatRef, matmul};

pub fn linear_forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    rows: usize,
    inputs: usize,
    outputs: usize,
) {
    matmul(y, MatRef::new(x, rows, inputs), MatRef::new(w, outputs, inputs).t(), false);
    if let Some(b) = b {
        y[..rows * outputs].chunks_mut(outputs).for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
    }
}

/// Gradients of `linear_forward`: `dx` is overwritten (when asked for), `dw` and `db` accumulate.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    inputs: usize,
    outputs: usize,
) {
    if let Some(dx) = dx {
        matmul(dx, MatRef::new(dy, rows, outputs), MatRef::new(w, outputs, inputs), false);
    }
    matmul(dw, MatRef::new(dy, rows, outputs).t(), MatRef::new(x, rows, inputs), true);
    if let Some(db) = db {
        for row in dy[..rows * outputs].chunks(outputs) {
            db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_gradient, values};
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, inputs, outputs) = (3, 4, 5);
        let (x, w, b, dy) =
            (values(rows * inputs, 1), values(outputs * inputs, 2), values(outputs, 3), values(rows * outputs, 4));
        let loss = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![0.0; rows * outputs];
            linear_forward(&mut y, x, w, Some(b), rows, inputs, outputs);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f32>()
        };
        let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; b.len()]);
        linear_backward(Some(&mut dx), &mut dw, Some(&mut db), &dy, &x, &w, rows, inputs, outputs);
        assert_gradient("dx", &dx, &x, |x| loss(x, &w, &b));
        assert_gradient("dw", &dw, &w, |w| loss(&x, w, &b));
        assert_gradient("db", &db, &b, |b| loss(&x, &w, b));
    }
}
