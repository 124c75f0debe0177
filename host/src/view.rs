//! Views of parts of a device buffer, as llm.c passes tensors: one allocation (the parameters, an
//! activation arena), tensors as `Span`s (offset, length) into it. `Buffer::split` hands out the
//! views one op call needs, read-only and writable, after checking that every span lies inside
//! the buffer and that no writable span overlaps another span: the borrow checker's rules, kept
//! per call for buffers the compiler sees as one.

use std::marker::PhantomData;
use std::ops::Range;

use cudarc::driver::{DevicePtr, DeviceRepr};

use crate::buffer::Buffer;
use crate::error::{Error, Result};

/// Elements `offset .. offset + len` of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Span {
    pub offset: usize,
    pub len: usize,
}

impl Span {
    pub const fn new(offset: usize, len: usize) -> Self {
        Span { offset, len }
    }

    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }

    pub fn end(&self) -> usize {
        self.offset + self.len
    }

    /// Elements `start .. start + len` of this span: a micro-batch's rows of a span sized for the
    /// whole batch, or the rows a smaller sequence uses.
    pub fn part(self, start: usize, len: usize) -> Span {
        assert!(start + len <= self.len, "part {start}..{} of a span of {}", start + len, self.len);
        Span { offset: self.offset + start, len }
    }

    /// The first `len` elements.
    pub fn prefix(self, len: usize) -> Span {
        self.part(0, len)
    }
}

/// Hands out consecutive spans of an arena, in the order they are asked for, each starting at a
/// multiple of 8 elements (16 bytes in bf16: the flash attention kernels' cp.async and vector
/// stores).
#[derive(Default)]
pub struct SpanAllocator {
    pub len: usize,
}

impl SpanAllocator {
    pub fn take(&mut self, len: usize) -> Span {
        let span = Span::new(self.len.next_multiple_of(8), len);
        self.len = span.end();
        span
    }
}

/// Which memory a view is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Cpu,
    Cuda,
    Emu,
}

impl Place {
    pub fn name(self) -> &'static str {
        match self {
            Place::Cpu => "cpu",
            Place::Cuda => "cuda",
            Place::Emu => "emu",
        }
    }
}

/// A device address range (the CUDA device's views: kernels take the address).
#[derive(Clone, Copy)]
pub struct DeviceRange<'a, T> {
    pub address: u64,
    pub len: usize,
    _borrow: PhantomData<&'a [T]>,
}

/// A writable device address range.
pub struct DeviceRangeMut<'a, T> {
    pub address: u64,
    pub len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

/// What `Buffer::split` hands out: R read-only and W writable views.
pub type Split<'a, T, const R: usize, const W: usize> = ([View<'a, T>; R], [ViewMut<'a, T>; W]);

/// A read-only view of part of a buffer.
#[derive(Clone, Copy)]
pub enum View<'a, T> {
    Cpu(&'a [T]),
    Cuda(DeviceRange<'a, T>),
    Emu(&'a [T]),
}

/// A writable view of part of a buffer.
pub enum ViewMut<'a, T> {
    Cpu(&'a mut [T]),
    Cuda(DeviceRangeMut<'a, T>),
    Emu(&'a mut [T]),
}

impl<'a, T> View<'a, T> {
    /// The elements from `n` on (`n` ≤ len).
    pub fn skip(self, n: usize) -> View<'a, T> {
        match self {
            View::Cpu(s) => View::Cpu(&s[n..]),
            View::Emu(s) => View::Emu(&s[n..]),
            View::Cuda(r) => {
                assert!(n <= r.len, "skipping {n} of a view of {}", r.len);
                let address = r.address + (n * std::mem::size_of::<T>()) as u64;
                View::Cuda(DeviceRange { address, len: r.len - n, _borrow: PhantomData })
            }
        }
    }
}

impl<T> View<'_, T> {
    /// The device address of a cuda view (None on the host devices).
    pub fn cuda_address(&self) -> Option<u64> {
        match self {
            View::Cuda(r) => Some(r.address),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            View::Cpu(s) | View::Emu(s) => s.len(),
            View::Cuda(r) => r.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn place(&self) -> Place {
        match self {
            View::Cpu(_) => Place::Cpu,
            View::Cuda(_) => Place::Cuda,
            View::Emu(_) => Place::Emu,
        }
    }
}

impl<'a, T> ViewMut<'a, T> {
    /// A shorter-lived writable view of the same memory (to pass on and use again after).
    pub fn reborrow(&mut self) -> ViewMut<'_, T> {
        match self {
            ViewMut::Cpu(s) => ViewMut::Cpu(s),
            ViewMut::Emu(s) => ViewMut::Emu(s),
            ViewMut::Cuda(r) => ViewMut::Cuda(DeviceRangeMut { address: r.address, len: r.len, _borrow: PhantomData }),
        }
    }

    /// The first `n` elements and the rest, as two views (`n` ≤ len).
    pub fn split_at(self, n: usize) -> (ViewMut<'a, T>, ViewMut<'a, T>) {
        match self {
            ViewMut::Cpu(s) => {
                let (a, b) = s.split_at_mut(n);
                (ViewMut::Cpu(a), ViewMut::Cpu(b))
            }
            ViewMut::Emu(s) => {
                let (a, b) = s.split_at_mut(n);
                (ViewMut::Emu(a), ViewMut::Emu(b))
            }
            ViewMut::Cuda(r) => {
                assert!(n <= r.len, "splitting a view of {} at {n}", r.len);
                let rest = r.address + (n * std::mem::size_of::<T>()) as u64;
                (
                    ViewMut::Cuda(DeviceRangeMut { address: r.address, len: n, _borrow: PhantomData }),
                    ViewMut::Cuda(DeviceRangeMut { address: rest, len: r.len - n, _borrow: PhantomData }),
                )
            }
        }
    }

    /// The elements from `n` on (a shorter-lived view; `n` ≤ len).
    pub fn skip(&mut self, n: usize) -> ViewMut<'_, T> {
        match self {
            ViewMut::Cpu(s) => ViewMut::Cpu(&mut s[n..]),
            ViewMut::Emu(s) => ViewMut::Emu(&mut s[n..]),
            ViewMut::Cuda(r) => {
                assert!(n <= r.len, "skipping {n} of a view of {}", r.len);
                let address = r.address + (n * std::mem::size_of::<T>()) as u64;
                ViewMut::Cuda(DeviceRangeMut { address, len: r.len - n, _borrow: PhantomData })
            }
        }
    }

    /// A read-only view of the same memory.
    pub fn as_view(&self) -> View<'_, T> {
        match self {
            ViewMut::Cpu(s) => View::Cpu(s),
            ViewMut::Emu(s) => View::Emu(s),
            ViewMut::Cuda(r) => View::Cuda(DeviceRange { address: r.address, len: r.len, _borrow: PhantomData }),
        }
    }
}

impl<T> ViewMut<'_, T> {
    /// The device address of a cuda view (None on the host devices).
    pub fn cuda_address(&self) -> Option<u64> {
        match self {
            ViewMut::Cuda(r) => Some(r.address),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ViewMut::Cpu(s) | ViewMut::Emu(s) => s.len(),
            ViewMut::Cuda(r) => r.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn place(&self) -> Place {
        match self {
            ViewMut::Cpu(_) => Place::Cpu,
            ViewMut::Cuda(_) => Place::Cuda,
            ViewMut::Emu(_) => Place::Emu,
        }
    }
}

impl<T: DeviceRepr + Clone + Default> Buffer<T> {
    pub fn place(&self) -> Place {
        match self {
            Buffer::Cpu(_) => Place::Cpu,
            Buffer::Cuda(_) => Place::Cuda,
            Buffer::Emu(_) => Place::Emu,
        }
    }

    /// The whole buffer, read-only.
    pub fn view(&self) -> View<'_, T> {
        self.views([Span::new(0, self.len())]).map(|[v]| v).expect("the whole buffer is inside it")
    }

    /// The whole buffer, writable.
    pub fn view_mut(&mut self) -> ViewMut<'_, T> {
        let all = Span::new(0, self.len());
        self.split([], [all]).map(|(_, [v])| v).expect("the whole buffer is inside it")
    }

    /// Read-only views of `spans` (which may overlap).
    pub fn views<const R: usize>(&self, spans: [Span; R]) -> Result<[View<'_, T>; R]> {
        self.check_inside(&spans)?;
        Ok(match self {
            Buffer::Cpu(v) => spans.map(|s| View::Cpu(&v[s.range()])),
            Buffer::Emu(v) => spans.map(|s| View::Emu(&v[s.range()])),
            Buffer::Cuda(slice) => {
                let base = slice.device_ptr(slice.stream()).0;
                let size = std::mem::size_of::<T>() as u64;
                spans.map(|s| {
                    View::Cuda(DeviceRange { address: base + s.offset as u64 * size, len: s.len, _borrow: PhantomData })
                })
            }
        })
    }

    /// Read-only views of `reads` and writable views of `writes` at once. Errors when a span lies
    /// outside the buffer or a writable span overlaps any other span.
    pub fn split<const R: usize, const W: usize>(
        &mut self,
        reads: [Span; R],
        writes: [Span; W],
    ) -> Result<Split<'_, T, R, W>> {
        self.check_inside(&reads)?;
        self.check_inside(&writes)?;
        for (i, w) in writes.iter().enumerate() {
            let others = reads.iter().chain(writes.iter().take(i));
            if let Some(o) =
                others.filter(|o| o.len > 0 && w.len > 0).find(|o| o.offset < w.end() && w.offset < o.end())
            {
                return Err(Error::InvalidArgument(format!(
                    "written span {:?} overlaps span {:?} of the same buffer",
                    w.range(),
                    o.range()
                )));
            }
        }
        let emu = self.place() == Place::Emu;
        Ok(match self {
            Buffer::Cpu(v) | Buffer::Emu(v) => {
                let base = v.as_mut_ptr();
                // SAFETY: every span is inside `v` (checked above) and no written span overlaps
                // another span, so the slices alias only where both are read-only; they borrow
                // `self` mutably for their lifetime.
                let read = |s: Span| unsafe { std::slice::from_raw_parts(base.add(s.offset).cast_const(), s.len) };
                let write = |s: Span| unsafe { std::slice::from_raw_parts_mut(base.add(s.offset), s.len) };
                if emu {
                    (reads.map(|s| View::Emu(read(s))), writes.map(|s| ViewMut::Emu(write(s))))
                } else {
                    (reads.map(|s| View::Cpu(read(s))), writes.map(|s| ViewMut::Cpu(write(s))))
                }
            }
            Buffer::Cuda(slice) => {
                let base = slice.device_ptr(slice.stream()).0;
                let size = std::mem::size_of::<T>() as u64;
                let at = |s: Span| base + s.offset as u64 * size;
                (
                    reads.map(|s| View::Cuda(DeviceRange { address: at(s), len: s.len, _borrow: PhantomData })),
                    writes.map(|s| ViewMut::Cuda(DeviceRangeMut { address: at(s), len: s.len, _borrow: PhantomData })),
                )
            }
        })
    }

    fn check_inside(&self, spans: &[Span]) -> Result<()> {
        match spans.iter().find(|s| s.end() > self.len()) {
            Some(s) => Err(Error::InvalidArgument(format!(
                "span {:?} is outside a buffer of {} elements",
                s.range(),
                self.len()
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_refuses_overlapping_writes_and_spans_outside() {
        let mut b = Buffer::Cpu((0..10).map(|i| i as f32).collect());
        let (a, c) = (Span::new(0, 4), Span::new(3, 4));
        assert!(b.split([a], [c]).is_err());
        assert!(b.split([], [a, c]).is_err());
        let Err(outside) = b.split([Span::new(8, 4)], []) else { panic!("a span outside was accepted") };
        assert!(outside.to_string().contains("outside a buffer of 10"), "{outside}");
        let ([r1, r2], [w]) = b.split([a, Span::new(2, 2)], [Span::new(4, 6)]).unwrap();
        let (View::Cpu(r1), View::Cpu(r2), ViewMut::Cpu(w)) = (r1, r2, w) else { panic!("cpu views expected") };
        w[0] = r1[3] + r2[1];
        assert_eq!(b.to_vec().unwrap()[4], 6.0);
    }
}
