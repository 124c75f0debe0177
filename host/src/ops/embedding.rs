//! The text tower's input: x[r] = table[ids[r]] + pos[r mod T] (token embedding lookup and the
//! positional embedding, one pass), and its backward: the table's and the positional
//! embedding's gradients accumulate the rows of dx.

use rayon::prelude::*;

use super::check::OpCheck;
use crate::device::Device;
use crate::error::Result;
use crate::view::{View, ViewMut};

fn check_ids(op: &OpCheck, ids: &[u32], vocab: usize, context: usize) -> Result<()> {
    if context == 0 || !ids.len().is_multiple_of(context) {
        return Err(op.invalid(format!("{} ids are not whole captions of context {context}", ids.len())));
    }
    match ids.iter().position(|&id| id as usize >= vocab) {
        Some(i) => Err(op.invalid(format!("id {} at position {i} is outside the vocabulary of {vocab}", ids[i]))),
        None => Ok(()),
    }
}

/// x [R, W] from ids [R] (R = captions × T), table [V, W], pos [T, W].
pub fn embedding_forward(
    device: &Device,
    x: ViewMut<f32>,
    ids: View<u32>,
    table: View<f32>,
    pos: View<f32>,
    width: usize,
) -> Result<()> {
    let op = OpCheck::new("embedding_forward", device);
    let (ids, table, pos) = (op.cpu("ids", ids)?, op.cpu("table", table)?, op.cpu("pos", pos)?);
    if width == 0 || !table.len().is_multiple_of(width) || !pos.len().is_multiple_of(width) {
        return Err(op.invalid(format!(
            "table ({}) and pos ({}) are not rows of width {width}",
            table.len(),
            pos.len()
        )));
    }
    let context = pos.len() / width;
    check_ids(&op, ids, table.len() / width, context)?;
    op.size("x", x.len(), ids.len() * width, || format!("[rows {}, width {width}]", ids.len()))?;
    let x = op.cpu_mut("x", x)?;
    x.par_chunks_mut(width).zip(ids.par_iter()).enumerate().for_each(|(r, (x, &id))| {
        let (t, p) = (&table[id as usize * width..][..width], &pos[(r % context) * width..][..width]);
        x.iter_mut().zip(t.iter().zip(p)).for_each(|(x, (t, p))| *x = t + p);
    });
    Ok(())
}

/// d_table [V, W] and d_pos [T, W] accumulate dx [R, W].
pub fn embedding_backward(
    device: &Device,
    d_table: ViewMut<f32>,
    d_pos: ViewMut<f32>,
    dx: View<f32>,
    ids: View<u32>,
    width: usize,
) -> Result<()> {
    let op = OpCheck::new("embedding_backward", device);
    let (d_table, d_pos) = (op.cpu_mut("d_table", d_table)?, op.cpu_mut("d_pos", d_pos)?);
    let (dx, ids) = (op.cpu("dx", dx)?, op.cpu("ids", ids)?);
    if width == 0 || !d_table.len().is_multiple_of(width) || !d_pos.len().is_multiple_of(width) {
        return Err(op.invalid(format!(
            "d_table ({}) and d_pos ({}) are not rows of width {width}",
            d_table.len(),
            d_pos.len()
        )));
    }
    let context = d_pos.len() / width;
    check_ids(&op, ids, d_table.len() / width, context)?;
    op.size("dx", dx.len(), ids.len() * width, || format!("[rows {}, width {width}]", ids.len()))?;
    for (r, (&id, d)) in ids.iter().zip(dx.chunks(width)).enumerate() {
        d_table[id as usize * width..][..width].iter_mut().zip(d).for_each(|(a, b)| *a += b);
        d_pos[(r % context) * width..][..width].iter_mut().zip(d).for_each(|(a, b)| *a += b);
    }
    Ok(())
}
