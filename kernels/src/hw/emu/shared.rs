//! One block's shared memory and its shadow state, for racecheck and initcheck.
//!
//! Every 4-byte word has a shadow: which of its bytes were written in this launch (initcheck is
//! exact to the byte), the last writer (thread, block barrier epoch, its warp's `__syncwarp`
//! epoch, source line, bytes) and up to two distinct readers of the current epoch. Two accesses
//! by different threads to overlapping bytes, at least one a write, race unless a barrier
//! (`bar.sync` advances the block epoch) or, within one warp, a `__syncwarp` lies between them.
//! Keeping two readers suffices: a writer differs from at least one of two distinct readers.
//! Sub-word accesses keep only the last writer of a word, so a race between two earlier writers
//! of different bytes of one word and a later reader can go unseen (never a false report).

use std::vec::Vec;

use super::fault::{FaultKind, Hazard, Site};

/// Who touched a word, which of its bytes, and when.
#[derive(Clone, Copy, Default)]
struct Touch {
    /// Thread index + 1 (0: nobody).
    thread: u32,
    epoch: u32,
    warp_epoch: u32,
    /// The bytes of the word touched (bit i: byte i).
    bytes: u8,
    site: Option<Site>,
}

#[derive(Clone, Copy, Default)]
struct Shadow {
    /// Bytes written in this launch.
    written: u8,
    /// Bytes an issued `cp.async` will write, not yet waited for.
    pending: u8,
    write: Touch,
    reads: [Touch; 2],
}

/// The thread making an access, and the synchronisation state it sees.
pub(super) struct Accessor<'a> {
    pub thread: u32,
    pub epoch: u32,
    /// `__syncwarp` epoch of every warp of the block.
    pub warp_epochs: &'a [u32],
    pub site: Site,
}

impl Accessor<'_> {
    fn warp(&self) -> usize {
        self.thread as usize / 32
    }

    /// Whether `other` (an earlier access) is ordered before this one by a barrier or, in the
    /// same warp, a `__syncwarp`.
    fn ordered_after(&self, other: &Touch) -> bool {
        let other_thread = other.thread - 1;
        other.epoch != self.epoch
            || (other_thread as usize / 32 == self.warp() && other.warp_epoch < self.warp_epochs[self.warp()])
    }

    fn touch(&self, bytes: u8) -> Touch {
        Touch {
            thread: self.thread + 1,
            epoch: self.epoch,
            warp_epoch: self.warp_epochs[self.warp()],
            bytes,
            site: Some(self.site),
        }
    }

    /// Whether `other` conflicts with an access of `bytes` by this thread.
    fn conflicts(&self, other: &Touch, bytes: u8) -> bool {
        other.thread != 0 && other.thread != self.thread + 1 && other.bytes & bytes != 0 && !self.ordered_after(other)
    }
}

/// The block's shared memory: dynamic bytes first, then static arrays as kernels first use them.
#[derive(Default)]
pub(super) struct SharedMemory {
    bytes: Vec<u8>,
    shadow: Vec<Shadow>,
    statics: Vec<(&'static str, usize)>,
}

/// The words an access of `size` bytes at `offset` covers, each with the mask of its bytes.
fn words(offset: usize, size: usize) -> impl Iterator<Item = (usize, u8)> {
    (offset / 4..(offset + size).div_ceil(4)).map(move |w| {
        let (start, end) = (offset.max(4 * w) - 4 * w, (offset + size).min(4 * w + 4) - 4 * w);
        (w, ((1u16 << end) - (1u16 << start)) as u8)
    })
}

impl SharedMemory {
    /// Empties the memory for a new block with `dynamic` bytes of dynamic shared memory.
    pub fn reset(&mut self, dynamic: usize) {
        self.bytes.clear();
        self.bytes.resize(dynamic, 0);
        self.shadow.clear();
        self.shadow.resize(dynamic.div_ceil(4), Shadow::default());
        self.statics.clear();
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The offset of the static array `name` of `bytes` bytes, allocated on first use (16-byte
    /// aligned); an error when the block's total exceeds `limit`.
    pub fn static_array(&mut self, name: &'static str, bytes: usize, limit: usize) -> Result<usize, FaultKind> {
        if let Some(&(_, offset)) = self.statics.iter().find(|(n, _)| *n == name) {
            return Ok(offset);
        }
        let offset = self.bytes.len().next_multiple_of(16);
        if offset + bytes > limit {
            return Err(FaultKind::SharedLimit { bytes: offset + bytes, limit });
        }
        self.bytes.resize(offset + bytes, 0);
        self.shadow.resize((offset + bytes).div_ceil(4), Shadow::default());
        self.statics.push((name, offset));
        Ok(offset)
    }

    /// Checks a read of `size` bytes at `offset` (in bounds) against the shadow and records it.
    pub fn read(&mut self, offset: usize, size: usize, by: &Accessor) -> Result<*const u8, FaultKind> {
        for (word, bytes) in words(offset, size) {
            let shadow = &mut self.shadow[word];
            if shadow.pending & bytes != 0 {
                return Err(FaultKind::AsyncCopyPending { byte_offset: 4 * word });
            }
            if shadow.written & bytes != bytes {
                let byte = 4 * word + (bytes & !shadow.written).trailing_zeros() as usize;
                return Err(FaultKind::Uninitialized { byte_offset: byte });
            }
            if by.conflicts(&shadow.write, bytes) {
                return Err(race(Hazard::ReadAfterWrite, 4 * word, &shadow.write));
            }
            let me = by.touch(bytes);
            let [first, second] = &mut shadow.reads;
            if first.thread == 0 || first.epoch != by.epoch {
                *first = me;
                *second = Touch::default();
            } else if first.thread == me.thread {
                first.bytes |= bytes;
            } else if second.thread == 0 || second.thread == me.thread {
                *second = Touch { bytes: second.bytes | bytes, ..me };
            }
        }
        Ok(self.bytes[offset..].as_ptr())
    }

    /// Checks a write of `size` bytes at `offset` (in bounds) against the shadow and records it.
    pub fn write(&mut self, offset: usize, size: usize, by: &Accessor) -> Result<*mut u8, FaultKind> {
        for (word, bytes) in words(offset, size) {
            let shadow = &mut self.shadow[word];
            if shadow.pending & bytes != 0 {
                return Err(FaultKind::AsyncCopyPending { byte_offset: 4 * word });
            }
            if by.conflicts(&shadow.write, bytes) {
                return Err(race(Hazard::WriteAfterWrite, 4 * word, &shadow.write));
            }
            for read in &shadow.reads {
                if read.epoch == by.epoch && by.conflicts(read, bytes) {
                    return Err(race(Hazard::WriteAfterRead, 4 * word, read));
                }
            }
            shadow.written |= bytes;
            shadow.write = by.touch(bytes);
            shadow.reads = Default::default();
        }
        Ok(self.bytes[offset..].as_mut_ptr())
    }
}

impl SharedMemory {
    /// Marks the destination of a `cp.async` pending: reading or writing it before the wait is
    /// an error.
    pub fn begin_async(&mut self, offset: usize, size: usize) -> Result<(), FaultKind> {
        for (word, bytes) in words(offset, size) {
            if self.shadow[word].pending & bytes != 0 {
                return Err(FaultKind::AsyncCopyPending { byte_offset: 4 * word });
            }
            self.shadow[word].pending |= bytes;
        }
        Ok(())
    }

    /// Completes a `cp.async` at its wait: the bytes land, written by the issuing thread.
    pub fn finish_async(&mut self, offset: usize, data: &[u8], by: &Accessor) -> Result<(), FaultKind> {
        for (word, bytes) in words(offset, data.len()) {
            self.shadow[word].pending &= !bytes;
        }
        let p = self.write(offset, data.len(), by)?;
        // SAFETY: `write` checked the range; `data` is a separate buffer.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }
}

fn race(hazard: Hazard, byte: usize, other: &Touch) -> FaultKind {
    FaultKind::Race { hazard, byte_offset: byte, other_thread: [other.thread - 1, 0, 0], other_site: other.site }
}
