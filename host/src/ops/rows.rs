//! Pooling rows by index: the text tower's EOT token (the first position of each caption's
//! largest id, as `torch.argmax`), gathering those rows and scattering their gradients back.

use super::check::OpCheck;
use crate::device::Device;
use crate::error::Result;
use crate::view::{View, ViewMut};

/// rows[b] = b·T + argmax(ids[b·T..(b+1)·T]): the row of caption b's EOT token.
pub fn eot_rows(device: &Device, rows: ViewMut<u32>, ids: View<u32>, context: usize) -> Result<()> {
    let op = OpCheck::new("eot_rows", device);
    if context == 0 || !ids.len().is_multiple_of(context) {
        return Err(op.invalid(format!("{} ids are not whole captions of context {context}", ids.len())));
    }
    let n = ids.len() / context;
    op.size("rows", rows.len(), n, || format!("[captions {n}]"))?;
    let (rows, ids) = (op.cpu_mut("rows", rows)?, op.cpu("ids", ids)?);
    for (b, (row, ids)) in rows.iter_mut().zip(ids.chunks(context)).enumerate() {
        let eot = (0..context).fold(0, |best, i| if ids[i] > ids[best] { i } else { best });
        *row = (b * context + eot) as u32;
    }
    Ok(())
}

fn check_rows(op: &OpCheck, rows: &[u32], table_len: usize, out_len: usize, width: usize) -> Result<()> {
    op.size("out", out_len, rows.len() * width, || format!("[rows {}, width {width}]", rows.len()))?;
    match rows.iter().find(|&&r| (r as usize + 1) * width > table_len) {
        Some(r) => Err(op.invalid(format!("row {r} is outside a [{}, {width}] matrix", table_len / width))),
        None => Ok(()),
    }
}

/// out[i] = x[rows[i]] (rows of `width`).
pub fn gather_rows(device: &Device, out: ViewMut<f32>, x: View<f32>, rows: View<u32>, width: usize) -> Result<()> {
    let op = OpCheck::new("gather_rows", device);
    let (rows, x) = (op.cpu("rows", rows)?, op.cpu("x", x)?);
    check_rows(&op, rows, x.len(), out.len(), width)?;
    let out = op.cpu_mut("out", out)?;
    for (o, &r) in out.chunks_mut(width).zip(rows) {
        o.copy_from_slice(&x[r as usize * width..][..width]);
    }
    Ok(())
}

/// dx = 0 except dx[rows[i]] = d_out[i] (the backward of `gather_rows` for distinct rows).
pub fn scatter_rows(device: &Device, dx: ViewMut<f32>, d_out: View<f32>, rows: View<u32>, width: usize) -> Result<()> {
    let op = OpCheck::new("scatter_rows", device);
    let (rows, d_out) = (op.cpu("rows", rows)?, op.cpu("d_out", d_out)?);
    check_rows(&op, rows, dx.len(), d_out.len(), width)?;
    let dx = op.cpu_mut("dx", dx)?;
    dx.fill(0.0);
    for (d, &r) in d_out.chunks(width).zip(rows) {
        dx[r as usize * width..][..width].copy_from_slice(d);
    }
    Ok(())
}
