//! Elementwise ops: a broadcast add (positional embeddings, the residual stream), fill, clamp.

use rayon::prelude::*;

use super::check::OpCheck;
use crate::device::Device;
use crate::error::Result;
use crate::view::{View, ViewMut};

/// out[i] = a[i] + b[i mod len(b)] (b repeats: one row added to every row, or a same-sized add).
pub fn add(device: &Device, out: ViewMut<f32>, a: View<f32>, b: View<f32>) -> Result<()> {
    let op = OpCheck::new("add", device);
    op.size("out", out.len(), a.len(), || "a's size".into())?;
    if b.is_empty() || !a.len().is_multiple_of(b.len()) {
        return Err(op.invalid(format!("b has {} values, which do not tile a's {}", b.len(), a.len())));
    }
    let (out, a, b) = (op.cpu_mut("out", out)?, op.cpu("a", a)?, op.cpu("b", b)?);
    out.par_chunks_mut(b.len()).zip(a.par_chunks(b.len())).for_each(|(o, a)| {
        o.iter_mut().zip(a).zip(b).for_each(|((o, a), b)| *o = a + b);
    });
    Ok(())
}

/// x[i] += b[i mod len(b)].
pub fn add_assign(device: &Device, x: ViewMut<f32>, b: View<f32>) -> Result<()> {
    let op = OpCheck::new("add_assign", device);
    if b.is_empty() || !x.len().is_multiple_of(b.len()) {
        return Err(op.invalid(format!("b has {} values, which do not tile x's {}", b.len(), x.len())));
    }
    let (x, b) = (op.cpu_mut("x", x)?, op.cpu("b", b)?);
    x.par_chunks_mut(b.len()).for_each(|x| x.iter_mut().zip(b).for_each(|(x, b)| *x += b));
    Ok(())
}

pub fn fill(device: &Device, x: ViewMut<f32>, value: f32) -> Result<()> {
    let op = OpCheck::new("fill", device);
    op.cpu_mut("x", x)?.par_chunks_mut(1 << 16).for_each(|x| x.fill(value));
    Ok(())
}

/// x ← min(max(x, lo), hi).
pub fn clamp(device: &Device, x: ViewMut<f32>, lo: f32, hi: f32) -> Result<()> {
    let op = OpCheck::new("clamp", device);
    op.cpu_mut("x", x)?.iter_mut().for_each(|x| *x = x.clamp(lo, hi));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;

    #[test]
    fn add_broadcasts_a_row_and_refuses_a_row_that_does_not_tile() {
        let (a, b, mut out) =
            (Buffer::Cpu(vec![1.0f32, 2.0, 3.0, 4.0]), Buffer::Cpu(vec![10.0f32, 20.0]), Buffer::Cpu(vec![0.0f32; 4]));
        add(&Device::Cpu, out.view_mut(), a.view(), b.view()).unwrap();
        assert_eq!(out.to_vec().unwrap(), vec![11.0, 22.0, 13.0, 24.0]);
        let c = Buffer::Cpu(vec![0.0f32; 3]);
        assert!(
            add(&Device::Cpu, out.view_mut(), a.view(), c.view())
                .unwrap_err()
                .to_string()
                .contains("add: b has 3 values")
        );
    }
}
