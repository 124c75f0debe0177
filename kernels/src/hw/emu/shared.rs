//! One block's shared memory and its shadow state, for racecheck and initcheck.
//!
//! Every byte has a shadow: the last writer (thread, block barrier epoch, its warp's `__syncwarp`
//! epoch, source line) and up to two distinct readers of the current epoch. Two accesses by
//! different threads to the same byte, at least one a write, race unless a barrier (`bar.sync`
//! advances the block epoch) or, within one warp, a `__syncwarp` lies between them. Keeping two
//! readers suffices: a writer differs from at least one of two distinct readers.

use std::vec::Vec;

use super::fault::{FaultKind, Hazard, Site};

/// Who touched a byte, and when.
#[derive(Clone, Copy, Default)]
struct Touch {
    /// Thread index + 1 (0: nobody).
    thread: u32,
    epoch: u32,
    warp_epoch: u32,
    site: Option<Site>,
}

#[derive(Clone, Copy, Default)]
struct Shadow {
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

    fn touch(&self) -> Touch {
        Touch {
            thread: self.thread + 1,
            epoch: self.epoch,
            warp_epoch: self.warp_epochs[self.warp()],
            site: Some(self.site),
        }
    }
}

/// The block's shared memory: dynamic bytes first, then static arrays as kernels first use them.
#[derive(Default)]
pub(super) struct SharedMemory {
    bytes: Vec<u8>,
    shadow: Vec<Shadow>,
    statics: Vec<(&'static str, usize)>,
}

impl SharedMemory {
    /// Empties the memory for a new block with `dynamic` bytes of dynamic shared memory.
    pub fn reset(&mut self, dynamic: usize) {
        self.bytes.clear();
        self.bytes.resize(dynamic, 0);
        self.shadow.clear();
        self.shadow.resize(dynamic, Shadow::default());
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
        self.shadow.resize(offset + bytes, Shadow::default());
        self.statics.push((name, offset));
        Ok(offset)
    }

    /// Checks a read of `size` bytes at `offset` (in bounds) against the shadow and records it.
    pub fn read(&mut self, offset: usize, size: usize, by: &Accessor) -> Result<*const u8, FaultKind> {
        for byte in offset..offset + size {
            let shadow = &mut self.shadow[byte];
            if shadow.write.thread == 0 {
                return Err(FaultKind::Uninitialized { byte_offset: byte });
            }
            if shadow.write.thread != by.thread + 1 && !by.ordered_after(&shadow.write) {
                return Err(race(Hazard::ReadAfterWrite, byte, &shadow.write));
            }
            let me = by.touch();
            let [first, second] = &mut shadow.reads;
            if first.thread == 0 || first.epoch != by.epoch {
                *first = me;
                *second = Touch::default();
            } else if first.thread != me.thread && (second.thread == 0 || second.epoch != by.epoch) {
                *second = me;
            }
        }
        Ok(self.bytes[offset..].as_ptr())
    }

    /// Checks a write of `size` bytes at `offset` (in bounds) against the shadow and records it.
    pub fn write(&mut self, offset: usize, size: usize, by: &Accessor) -> Result<*mut u8, FaultKind> {
        for byte in offset..offset + size {
            let shadow = &mut self.shadow[byte];
            let me = by.thread + 1;
            if shadow.write.thread != 0 && shadow.write.thread != me && !by.ordered_after(&shadow.write) {
                return Err(race(Hazard::WriteAfterWrite, byte, &shadow.write));
            }
            for read in &shadow.reads {
                if read.thread != 0 && read.thread != me && !by.ordered_after(read) {
                    return Err(race(Hazard::WriteAfterRead, byte, read));
                }
            }
            shadow.write = by.touch();
            shadow.reads = Default::default();
        }
        Ok(self.bytes[offset..].as_mut_ptr())
    }
}

fn race(hazard: Hazard, byte: usize, other: &Touch) -> FaultKind {
    FaultKind::Race { hazard, byte_offset: byte, other_thread: [other.thread - 1, 0, 0], other_site: other.site }
}
