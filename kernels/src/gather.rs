//! Gather (pgs-spec.md step 6): CLS and the kept patch tokens packed into [N, rows, D], rows =
//! K_max + 1, zero padding. One thread per output element (grid-stride): reads and writes
//! N·rows·D elements once, coalesced along D.

/// Threads per block of `pgs_gather`.
pub const THREADS: u32 = 256;

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use crate::element::{Bf16, Element};
    use crate::thread::grid_stride;

    /// # Safety
    /// `x` [N, L + 1, D] (CLS at row 0); `kept` [N, L] (the first kept_len[n] valid);
    /// `out` [N, rows, D] with rows ≥ max kept_len + 1.
    #[inline(always)]
    unsafe fn gather<T: Element>(
        x: *const T,
        kept: *const u32,
        kept_len: *const u32,
        out: *mut T,
        n_images: usize,
        patches: usize,
        dim: usize,
        rows: usize,
    ) {
        grid_stride(n_images * rows * dim, |t| unsafe {
            let (image, r, d) = (t / (rows * dim), t / dim % rows, t % dim);
            let src = x.add(image * (patches + 1) * dim);
            *out.add(t) = if r == 0 {
                *src.add(d)
            } else if r - 1 < *kept_len.add(image) as usize {
                *src.add((1 + *kept.add(image * patches + r - 1) as usize) * dim + d)
            } else {
                T::ZERO
            };
        });
    }

    macro_rules! gather_entry {
        ($name:ident, $t:ty) => {
            /// Packs CLS and the kept tokens of each image.
            #[unsafe(no_mangle)]
            pub unsafe extern "ptx-kernel" fn $name(
                x: *const $t,
                kept: *const u32,
                kept_len: *const u32,
                out: *mut $t,
                n_images: u32,
                patches: u32,
                dim: u32,
                rows: u32,
            ) {
                unsafe {
                    gather(x, kept, kept_len, out, n_images as usize, patches as usize, dim as usize, rows as usize)
                }
            }
        };
    }
    gather_entry!(pgs_gather_f32, f32);
    gather_entry!(pgs_gather_bf16, Bf16);
}
