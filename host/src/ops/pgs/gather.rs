//! Gather (pgs-spec.md step 6): CLS and the kept patch tokens packed into [N, rows, D], rows ≥
//! K_max + 1, zero padding, and each sequence's length (kept + 1) for attention; and its backward
//! for the image tower. The tokens are the patch embedding [N, L, D] (positional embedding
//! added) that PGS's token similarity also reads; CLS is one row [D]. The keep indices are the
//! masks' device layout: kept [N, L], the first kept_len[n] of row n valid.

use cudarc::driver::LaunchConfig;

use clip_pgs_kernels::gather as kernel;

use crate::device::Device;
use crate::error::Result;
use crate::ops::check::OpCheck;
use crate::ops::dtype::Activation;
use crate::ops::edge_map::ImageElement;
use crate::view::{View, ViewMut};

/// The sizes of one gather.
#[derive(Clone, Copy, Debug)]
pub struct GatherShape {
    pub images: usize,
    pub patches: usize,
    pub dim: usize,
    /// Output rows per image: at least the most kept patches + 1.
    pub rows: usize,
}

/// The masks of a batch as the gather reads them.
pub struct KeptIndices<'a> {
    pub kept: View<'a, u32>,
    pub kept_len: View<'a, u32>,
}

fn check(op: &OpCheck, s: GatherShape, tokens: usize, packed: usize, idx: &KeptIndices) -> Result<()> {
    let GatherShape { images: n, patches: l, dim, rows } = s;
    op.size("tokens", tokens, n * l * dim, || format!("[N {n}, L {l}, D {dim}]"))?;
    op.size("packed", packed, n * rows * dim, || format!("[N {n}, rows {rows}, D {dim}]"))?;
    op.size("kept", idx.kept.len(), n * l, || format!("[N {n}, L {l}]"))?;
    op.size("kept_len", idx.kept_len.len(), n, || format!("[N {n}]"))?;
    if rows == 0 || rows > l + 1 {
        return Err(op.invalid(format!("{rows} output rows; 1 to L + 1 = {} are possible", l + 1)));
    }
    Ok(())
}

/// Checks the keep indices on the host: counts that fit `rows`, indices below L, ascending.
fn check_indices(op: &OpCheck, s: GatherShape, kept: &[u32], kept_len: &[u32]) -> Result<()> {
    for (b, &len) in kept_len.iter().enumerate() {
        if len as usize + 1 > s.rows {
            return Err(op.invalid(format!("image {b} keeps {len} patches, more than rows − 1 = {}", s.rows - 1)));
        }
        let k = &kept[b * s.patches..][..len as usize];
        if k.iter().any(|&j| j as usize >= s.patches) || k.windows(2).any(|w| w[0] >= w[1]) {
            return Err(
                op.invalid(format!("the kept patches of image {b} are not ascending indices below {}", s.patches))
            );
        }
    }
    Ok(())
}

/// packed [N, rows, D] and lengths [N] from tokens [N, L, D] and cls [D].
pub fn gather<T: ImageElement>(
    device: &Device,
    packed: ViewMut<T>,
    lengths: ViewMut<u32>,
    tokens: View<T>,
    cls: View<T>,
    idx: KeptIndices,
    s: GatherShape,
) -> Result<()> {
    let op = OpCheck::new("gather", device);
    check(&op, s, tokens.len(), packed.len(), &idx)?;
    op.size("cls", cls.len(), s.dim, || format!("[D {}]", s.dim))?;
    op.size("lengths", lengths.len(), s.images, || format!("[N {}]", s.images))?;
    let GatherShape { images: n, patches: l, dim, rows } = s;
    if !matches!(device, Device::Cpu) {
        let grid = (rows.div_ceil(kernel::ROWS) as u32, n as u32, 1);
        let cfg = LaunchConfig { grid_dim: grid, block_dim: (kernel::THREADS, 1, 1), shared_mem_bytes: 0 };
        let args = (tokens, cls, idx.kept, idx.kept_len, packed, lengths, l as u32, dim as u32, rows as u32);
        // SAFETY: sizes checked above; kept_len ≤ rows − 1 is the caller's (the masks').
        return unsafe { device.launch(&T::GATHER, cfg, args) };
    }
    let (kept, kept_len) = (op.cpu("kept", idx.kept)?, op.cpu("kept_len", idx.kept_len)?);
    check_indices(&op, s, kept, kept_len)?;
    let (packed, lengths) = (op.cpu_mut("packed", packed)?, op.cpu_mut("lengths", lengths)?);
    let (tokens, cls) = (op.cpu("tokens", tokens)?, op.cpu("cls", cls)?);
    for b in 0..n {
        let dst = &mut packed[b * rows * dim..(b + 1) * rows * dim];
        let len = kept_len[b] as usize;
        dst[..dim].copy_from_slice(cls);
        for (r, &j) in kept[b * l..b * l + len].iter().enumerate() {
            dst[(1 + r) * dim..(2 + r) * dim].copy_from_slice(&tokens[(b * l + j as usize) * dim..][..dim]);
        }
        dst[(1 + len) * dim..].fill(T::default());
        lengths[b] = len as u32 + 1;
    }
    Ok(())
}

/// The backward of `gather` and of the positional embedding added before it: d_tokens [N, L, D]
/// is overwritten (zero for dropped patches), d_cls [D] and d_pos [L + 1, D] (f32) accumulate
/// over the images in order (the same bits on every device). d_tokens and d_packed are the
/// activations' type (f32, or bf16 on the GPU devices).
///
/// Only the CPU device reads the keep indices to refuse bad ones (counts above rows − 1, indices
/// not ascending or ≥ L). On a GPU device the kernel stays in bounds for any: it caps a count at
/// rows − 1 and treats a patch its search does not find as dropped. The model checks every
/// batch's keep lists on the host before the upload (`Clip::check_batch`, `check_keep`).
#[allow(clippy::too_many_arguments)]
pub fn gather_backward<T: Activation>(
    device: &Device,
    d_tokens: ViewMut<T>,
    d_cls: ViewMut<f32>,
    d_pos: ViewMut<f32>,
    d_packed: View<T>,
    idx: KeptIndices,
    s: GatherShape,
) -> Result<()> {
    let op = OpCheck::new("gather_backward", device);
    check(&op, s, d_tokens.len(), d_packed.len(), &idx)?;
    let GatherShape { images: n, patches: l, dim, rows } = s;
    op.size("d_cls", d_cls.len(), dim, || format!("[D {dim}]"))?;
    op.size("d_pos", d_pos.len(), (l + 1) * dim, || format!("[L + 1 = {}, D {dim}]", l + 1))?;
    if !matches!(device, Device::Cpu) {
        if dim == 0 {
            return Ok(()); // nothing to write (a launch needs at least one block)
        }
        if [d_tokens.len(), d_packed.len(), (l + 1) * dim].iter().any(|&len| len > u32::MAX as usize) {
            return Err(op.invalid("a tensor has more values than a kernel indexes (2³² − 1)"));
        }
        let (d_tokens, d_cls, d_pos) =
            (op.gpu_mut("d_tokens", d_tokens)?, op.gpu_mut("d_cls", d_cls)?, op.gpu_mut("d_pos", d_pos)?);
        let (d_packed, kept, kept_len) =
            (op.gpu("d_packed", d_packed)?, op.gpu("kept", idx.kept)?, op.gpu("kept_len", idx.kept_len)?);
        // One block per position, walking all D columns: each image's search runs once per
        // position, not once per column strip.
        let cfg = LaunchConfig {
            grid_dim: ((l + 1) as u32, 1, 1),
            block_dim: (kernel::BACKWARD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = (d_tokens, d_cls, d_pos, d_packed, kept, kept_len, n as u32, l as u32, dim as u32, rows as u32);
        // SAFETY: sizes checked above (1 ≤ rows ≤ L + 1); the kernel caps the counts at rows − 1.
        return unsafe { device.launch(&T::GATHER_BACKWARD, cfg, args) };
    }
    let (kept, kept_len) = (op.cpu("kept", idx.kept)?, op.cpu("kept_len", idx.kept_len)?);
    let (d_tokens, d_cls, d_pos) =
        (op.cpu_f32_mut("d_tokens", d_tokens)?, op.cpu_mut("d_cls", d_cls)?, op.cpu_mut("d_pos", d_pos)?);
    let d_packed = op.cpu_f32("d_packed", d_packed)?;
    check_indices(&op, s, kept, kept_len)?;
    d_tokens.fill(0.0);
    let add = |to: &mut [f32], d: &[f32]| to.iter_mut().zip(d).for_each(|(a, b)| *a += b);
    for b in 0..n {
        let src = &d_packed[b * rows * dim..(b + 1) * rows * dim];
        add(&mut d_pos[..dim], &src[..dim]);
        add(d_cls, &src[..dim]);
        let len = kept_len[b] as usize;
        for (r, &j) in kept[b * l..b * l + len].iter().enumerate() {
            let (j, d) = (j as usize, &src[(1 + r) * dim..(2 + r) * dim]);
            add(&mut d_pos[(1 + j) * dim..(2 + j) * dim], d);
            d_tokens[(b * l + j) * dim..][..dim].copy_from_slice(d);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;

    #[test]
    fn packs_cls_then_kept_rows_and_pads_with_zeros() {
        // 2 images, L = 3, D = 2; token value = 10·image + patch + 1, CLS 0.
        let tokens: Vec<f32> = (0..2).flat_map(|i| (0..3).flat_map(move |r| [(10 * i + r + 1) as f32; 2])).collect();
        let (tokens, cls) = (Buffer::Cpu(tokens), Buffer::Cpu(vec![0.0f32; 2]));
        let (kept, kept_len) = (Buffer::Cpu(vec![0u32, 2, 0, 1, 0, 0]), Buffer::Cpu(vec![2u32, 1]));
        let (mut packed, mut lengths) = (Buffer::Cpu(vec![9.0f32; 12]), Buffer::Cpu(vec![0u32; 2]));
        let s = GatherShape { images: 2, patches: 3, dim: 2, rows: 3 };
        let idx = KeptIndices { kept: kept.view(), kept_len: kept_len.view() };
        gather(&Device::Cpu, packed.view_mut(), lengths.view_mut(), tokens.view(), cls.view(), idx, s).unwrap();
        assert_eq!(lengths.to_vec().unwrap(), vec![3, 2]);
        assert_eq!(packed.to_vec().unwrap(), vec![0.0, 0.0, 1.0, 1.0, 3.0, 3.0, 0.0, 0.0, 12.0, 12.0, 0.0, 0.0]);
        let unsorted = Buffer::Cpu(vec![2u32, 0, 0, 1, 0, 0]);
        let idx = KeptIndices { kept: unsorted.view(), kept_len: kept_len.view() };
        let e = gather(&Device::Cpu, packed.view_mut(), lengths.view_mut(), tokens.view(), cls.view(), idx, s);
        assert!(e.unwrap_err().to_string().contains("gather: the kept patches of image 0 are not ascending"));
    }
}
