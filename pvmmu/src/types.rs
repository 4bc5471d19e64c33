//! Frame numbers and page-table entry bits.
//!
//! Invariant: a [`Pfn`] is a guest pseudo-physical frame (what the guest's
//! allocator and direct map index by); an [`Mfn`] is a machine frame (what a
//! page-table entry holds under Xen PV). Natively the two are equal. The types
//! are distinct so that one is never used for the other by accident.

use core::fmt;

/// Size of a 4 KiB page.
pub const PAGE_SIZE: u64 = 4096;
/// Entries per page-table frame at every level.
pub const ENTRIES: usize = 512;

/// Guest pseudo-physical frame number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pfn(pub u64);

/// Machine frame number (what Xen and the MMU see).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mfn(pub u64);

impl Pfn {
    /// Pseudo-physical address of the frame's first byte.
    pub const fn addr(self) -> u64 {
        self.0 * PAGE_SIZE
    }
    /// The frame containing pseudo-physical address `addr`.
    pub const fn containing(addr: u64) -> Self {
        Self(addr / PAGE_SIZE)
    }
}

impl Mfn {
    /// Machine address of the frame's first byte.
    pub const fn maddr(self) -> u64 {
        self.0 * PAGE_SIZE
    }
}

impl fmt::Debug for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pfn:{:#x}", self.0)
    }
}

impl fmt::Debug for Mfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mfn:{:#x}", self.0)
    }
}

/// Bits 12..52 of an entry: the frame number it points to.
pub const ENTRY_FRAME_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Xen's part of the 64-bit PV address space, `[start, end)`: L4 slots
/// 256..=271, which a PV guest may neither map nor change. The only
/// definition in pvmmu (the Xen model keeps its own on purpose).
pub const XEN_HOLE: (u64, u64) = (0xffff_8000_0000_0000, 0xffff_8800_0000_0000);

/// Last address of the lower (user) half of the canonical address space.
pub const LOWER_HALF_LAST: u64 = (1 << 47) - 1;
/// First address of the upper (kernel) half of the canonical address space.
pub const UPPER_HALF: u64 = !LOWER_HALF_LAST;
