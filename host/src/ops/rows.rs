//! Pooling rows by index: the text tower's EOT token (the first position of each caption's
//! largest id, as `torch.argmax`), gathering those rows and scattering their gradients back. CPU
//! reference here, the kernels in `kernels/src/rows.rs` (CUDA and the emulator; the same bits).
//! The rows are f32, or bf16 on the GPU devices (`dtype::Activation`: copies, no rounding).
//!
//! The row indices stay on the device: only the CPU device reads them to refuse one outside the
//! matrix. On a GPU device the kernels never access outside it: `gather_rows` writes a NaN row
//! for such an index and `scatter_rows` drops its row (the model's indices come from `eot_rows`,
//! always in range).

use clip_pgs_kernels::rows::{THREADS, eot_rows_u32};

use super::check::OpCheck;
use super::dtype::Activation;
use crate::device::Device;
use crate::error::Result;
use crate::launch::grid_stride_config;
use crate::view::{View, ViewMut};

/// Items (captions, rows) per block of the one-warp-per-item kernels.
const WARPS: usize = THREADS as usize / 32;

fn check_len(op: &OpCheck, tensor: &str, n: usize) -> Result<()> {
    if n > u32::MAX as usize {
        return Err(op.invalid(format!("{tensor} has {n} values, more than a kernel indexes (2³² − 1)")));
    }
    Ok(())
}

/// rows[b] = b·T + argmax(ids[b·T..(b+1)·T]): the row of caption b's EOT token.
pub fn eot_rows(device: &Device, rows: ViewMut<u32>, ids: View<u32>, context: usize) -> Result<()> {
    let op = OpCheck::new("eot_rows", device);
    if context == 0 || !ids.len().is_multiple_of(context) {
        return Err(op.invalid(format!("{} ids are not whole captions of context {context}", ids.len())));
    }
    let n = ids.len() / context;
    op.size("rows", rows.len(), n, || format!("[captions {n}]"))?;
    check_len(&op, "ids", ids.len())?;
    if !matches!(device, Device::Cpu) {
        let args = (op.gpu_mut("rows", rows)?, op.gpu("ids", ids)?, n as u32, context as u32);
        // SAFETY: ids hold n·T < 2³² words and rows n (checked above); T ≥ 1; whole warps.
        return unsafe { device.launch(&eot_rows_u32, grid_stride_config(n * 32, THREADS), args) };
    }
    let (rows, ids) = (op.cpu_mut("rows", rows)?, op.cpu("ids", ids)?);
    for (b, (row, ids)) in rows.iter_mut().zip(ids.chunks(context)).enumerate() {
        let eot = (0..context).fold(0, |best, i| if ids[i] > ids[best] { i } else { best });
        *row = (b * context + eot) as u32;
    }
    Ok(())
}

/// The sizes of a gather or scatter, from lengths only: out [rows, width], every length within a
/// kernel's 32-bit index.
fn check_sizes(op: &OpCheck, rows: usize, table: (&str, usize), out: (&str, usize), width: usize) -> Result<()> {
    if width == 0 {
        return Err(op.invalid("rows of width 0"));
    }
    op.size(out.0, out.1, rows * width, || format!("[rows {rows}, width {width}]"))?;
    check_len(op, table.0, table.1)?;
    check_len(op, out.0, out.1)
}

/// Reads the indices on the host (CPU device): every row inside a matrix of `table_len` values.
fn check_rows(op: &OpCheck, rows: &[u32], table_len: usize, width: usize) -> Result<()> {
    match rows.iter().find(|&&r| (r as usize + 1) * width > table_len) {
        Some(r) => Err(op.invalid(format!("row {r} is outside a [{}, {width}] matrix", table_len / width))),
        None => Ok(()),
    }
}

/// out[i] = x[rows[i]] (rows of `width`). On a GPU device a row outside x is not refused (the
/// indices are not read on the host): out[i] is NaN.
pub fn gather_rows<T: Activation>(
    device: &Device,
    out: ViewMut<T>,
    x: View<T>,
    rows: View<u32>,
    width: usize,
) -> Result<()> {
    let op = OpCheck::new("gather_rows", device);
    check_sizes(&op, rows.len(), ("x", x.len()), ("out", out.len()), width)?;
    if !matches!(device, Device::Cpu) {
        let (n, x_rows) = (out.len() as u32, (x.len() / width) as u32);
        let args = (op.gpu_mut("out", out)?, op.gpu("x", x)?, op.gpu("rows", rows)?, n, width as u32, x_rows);
        // SAFETY: out holds n = rows·W < 2³² values, rows n / W, x at least x_rows·W (checked
        // above).
        return unsafe { device.launch(&T::GATHER_ROWS, grid_stride_config(n as usize, THREADS), args) };
    }
    let (rows, x, out) = (op.cpu("rows", rows)?, op.cpu_f32("x", x)?, op.cpu_f32_mut("out", out)?);
    check_rows(&op, rows, x.len(), width)?;
    for (o, &r) in out.chunks_mut(width).zip(rows) {
        o.copy_from_slice(&x[r as usize * width..][..width]);
    }
    Ok(())
}

/// dx = 0 except dx[rows[i]] = d_out[i] (the backward of `gather_rows` for distinct rows; of
/// repeated rows the last i wins). On a GPU device a row outside dx is not refused (the indices
/// are not read on the host): its d_out row is dropped.
pub fn scatter_rows<T: Activation>(
    device: &Device,
    dx: ViewMut<T>,
    d_out: View<T>,
    rows: View<u32>,
    width: usize,
) -> Result<()> {
    let op = OpCheck::new("scatter_rows", device);
    check_sizes(&op, rows.len(), ("dx", dx.len()), ("d_out", d_out.len()), width)?;
    if !matches!(device, Device::Cpu) {
        let (n, dx_len) = (rows.len() as u32, dx.len() as u32);
        let blocks = dx.len().div_ceil(width).div_ceil(WARPS);
        let args = (op.gpu_mut("dx", dx)?, op.gpu("d_out", d_out)?, op.gpu("rows", rows)?, n, width as u32, dx_len);
        // SAFETY: dx holds dx_len values, d_out n·W and rows n (checked above); whole warps.
        return unsafe {
            device.launch(&T::SCATTER_ROWS, grid_stride_config(blocks * THREADS as usize, THREADS), args)
        };
    }
    let (rows, d_out, dx) = (op.cpu("rows", rows)?, op.cpu_f32("d_out", d_out)?, op.cpu_f32_mut("dx", dx)?);
    check_rows(&op, rows, dx.len(), width)?;
    dx.fill(0.0);
    for (d, &r) in d_out.chunks(width).zip(rows) {
        dx[r as usize * width..][..width].copy_from_slice(d);
    }
    Ok(())
}
