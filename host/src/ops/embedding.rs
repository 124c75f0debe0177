//! The text tower's input: x[r] = table[ids[r]] + pos[r mod T] (token embedding lookup and the
//! positional embedding, one pass), and its backward: the table's and the positional
//! embedding's gradients accumulate the rows of dx. CPU reference here, the kernels in
//! `kernels/src/embedding.rs` (CUDA and the emulator; the same bits). x, the table and pos are
//! the activations' type T (f32, or bf16 on the GPU devices: `dtype::Activation`); the gradients
//! d_table and d_pos are f32.
//!
//! The ids stay on the device: only the CPU device reads them to refuse one outside the
//! vocabulary. On a GPU device the kernels skip such an id without reading outside the table
//! (the forward writes a NaN row for it, the backward adds its row to d_pos only); the model
//! checks every batch's ids on the host before the upload (`Clip::check_batch`).

use rayon::prelude::*;

use clip_pgs_kernels::embedding::{BUCKETS, CAPTIONS, COLUMNS, THREADS};
use cudarc::driver::LaunchConfig;

use super::check::OpCheck;
use super::dtype::Activation;
use crate::device::Device;
use crate::error::Result;
use crate::launch::grid_stride_config;
use crate::view::{View, ViewMut};

/// The sizes of one embedding op, checked from the tensors' lengths only.
struct Sizes {
    width: usize,
    context: usize,
    vocab: usize,
}

/// `table` and `pos` (or their gradients) are rows of `width`; `ids` whole captions of T = pos
/// rows; `x` (or dx) [R, W]; every length fits a kernel's 32-bit index.
fn check_sizes(
    op: &OpCheck,
    table: (&str, usize),
    pos: (&str, usize),
    x: (&str, usize),
    ids: usize,
    width: usize,
) -> Result<Sizes> {
    if width == 0 || !table.1.is_multiple_of(width) || !pos.1.is_multiple_of(width) {
        return Err(
            op.invalid(format!("{} ({}) and {} ({}) are not rows of width {width}", table.0, table.1, pos.0, pos.1))
        );
    }
    let context = pos.1 / width;
    if context == 0 || !ids.is_multiple_of(context) {
        return Err(op.invalid(format!("{ids} ids are not whole captions of context {context}")));
    }
    op.size(x.0, x.1, ids * width, || format!("[rows {ids}, width {width}]"))?;
    for (tensor, n) in [table, pos, x] {
        if n > u32::MAX as usize {
            return Err(op.invalid(format!("{tensor} has {n} values, more than a kernel indexes (2³² − 1)")));
        }
    }
    Ok(Sizes { width, context, vocab: table.1 / width })
}

/// Reads the ids on the host (CPU device): all inside the vocabulary.
fn check_ids(op: &OpCheck, ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&id| id as usize >= vocab) {
        Some(i) => Err(op.invalid(format!("id {} at position {i} is outside the vocabulary of {vocab}", ids[i]))),
        None => Ok(()),
    }
}

/// x [R, W] from ids [R] (R = captions × T), table [V, W], pos [T, W]. On a GPU device an id ≥ V
/// is not refused (the ids are not read on the host): its row of x is NaN.
pub fn embedding_forward<T: Activation>(
    device: &Device,
    x: ViewMut<T>,
    ids: View<u32>,
    table: View<T>,
    pos: View<T>,
    width: usize,
) -> Result<()> {
    let op = OpCheck::new("embedding_forward", device);
    let Sizes { width, context, vocab } =
        check_sizes(&op, ("table", table.len()), ("pos", pos.len()), ("x", x.len()), ids.len(), width)?;
    if !matches!(device, Device::Cpu) {
        let (n, captions) = (x.len() as u32, ids.len() / context);
        let args = (
            op.gpu_mut("x", x)?,
            op.gpu("ids", ids)?,
            op.gpu("table", table)?,
            op.gpu("pos", pos)?,
            n,
            width as u32,
            context as u32,
            vocab as u32,
        );
        // One block per position and CAPTIONS captions (the kernel walks the columns).
        let groups = captions.div_ceil(CAPTIONS as usize).max(1) as u32;
        let cfg =
            LaunchConfig { grid_dim: (1, context as u32, groups), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: x holds n = R·W values, ids R = captions·T, table V·W, pos T·W (checked
        // above), n < 2³²; the grid is the kernel's.
        return unsafe { device.launch(&T::EMBEDDING_FORWARD, cfg, args) };
    }
    let (ids, table, pos) = (op.cpu("ids", ids)?, op.cpu_f32("table", table)?, op.cpu_f32("pos", pos)?);
    let x = op.cpu_f32_mut("x", x)?;
    check_ids(&op, ids, vocab)?;
    x.par_chunks_mut(width).zip(ids.par_iter()).enumerate().for_each(|(r, (x, &id))| {
        let (t, p) = (&table[id as usize * width..][..width], &pos[(r % context) * width..][..width]);
        x.iter_mut().zip(t.iter().zip(p)).for_each(|(x, (t, p))| *x = t + p);
    });
    Ok(())
}

/// d_table [V, W] and d_pos [T, W] accumulate dx [R, W], each element over the rows in order
/// (the same bits on every device). On a GPU device an id ≥ V is not refused: its row of dx
/// goes to d_pos only.
pub fn embedding_backward<T: Activation>(
    device: &Device,
    d_table: ViewMut<f32>,
    d_pos: ViewMut<f32>,
    dx: View<T>,
    ids: View<u32>,
    width: usize,
) -> Result<()> {
    let op = OpCheck::new("embedding_backward", device);
    let Sizes { width, context, vocab } =
        check_sizes(&op, ("d_table", d_table.len()), ("d_pos", d_pos.len()), ("dx", dx.len()), ids.len(), width)?;
    if !matches!(device, Device::Cpu) {
        let (d_table, d_pos) = (op.gpu_mut("d_table", d_table)?, op.gpu_mut("d_pos", d_pos)?);
        let (dx, ids) = (op.gpu("dx", dx)?, op.gpu("ids", ids)?);
        let (rows, captions, context_width) =
            (ids.len() as u32, (ids.len() / context) as u32, (context * width) as u32);
        let args = (d_pos, dx, captions, context_width);
        // SAFETY: d_pos holds T·W floats and dx captions·T·W values (checked above).
        unsafe { device.launch(&T::EMBEDDING_BACKWARD_POS, grid_stride_config(context * width, THREADS), args)? };
        let cfg = LaunchConfig {
            grid_dim: (width.div_ceil((THREADS * COLUMNS) as usize) as u32, BUCKETS, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = (d_table, dx, ids, rows, width as u32, vocab as u32);
        // SAFETY: d_table holds V·W floats, dx R·W values and ids R (checked above); the grid is
        // the kernel's.
        return unsafe { device.launch(&T::EMBEDDING_BACKWARD_TABLE, cfg, args) };
    }
    let (d_table, d_pos) = (op.cpu_mut("d_table", d_table)?, op.cpu_mut("d_pos", d_pos)?);
    let (dx, ids) = (op.cpu_f32("dx", dx)?, op.cpu("ids", ids)?);
    check_ids(&op, ids, vocab)?;
    for (r, (&id, d)) in ids.iter().zip(dx.chunks(width)).enumerate() {
        d_table[id as usize * width..][..width].iter_mut().zip(d).for_each(|(a, b)| *a += b);
        d_pos[(r % context) * width..][..width].iter_mut().zip(d).for_each(|(a, b)| *a += b);
    }
    Ok(())
}
