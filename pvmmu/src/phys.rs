//! How pvmmu reaches frame contents and translates frame numbers.
//!
//! Invariant: pvmmu only ever *stores* through [`PhysMem::frame_ptr`] into a
//! frame that is not (yet, or any more) a live page table. Under Xen PV the
//! hypervisor enforces this (live tables are read-only in every mapping); the
//! Xen model checks it by comparing its own copy of every typed frame with
//! the memory the guest sees.

use core::ptr::NonNull;

use crate::types::{Mfn, Pfn, ENTRIES};

/// One 4 KiB frame viewed as page-table entries.
pub type FrameWords = [u64; ENTRIES];

/// Access to the guest's frames by pseudo-physical number: the kernel's direct
/// map (or its boot identity map), an arena in host tests, or the Xen model's
/// memory.
///
/// # Safety
/// An implementation must return, for every frame it accepts, a pointer that
/// is valid for reads of 4096 bytes (and for writes, when the frame is not a
/// live page table under Xen PV) for as long as the implementation lives, and
/// the same pointer for the same frame every time.
pub unsafe trait PhysMem {
    /// Pointer to frame `pfn`, or `None` if the frame is not guest memory.
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>>;
}

// SAFETY: forwards to `T`, whose pointers are valid and stable for as long
// as `T` lives, which outlives the borrow.
unsafe impl<T: PhysMem + ?Sized> PhysMem for &T {
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        (**self).frame_ptr(pfn)
    }
}

/// Pseudo-physical to machine translation: Xen PV's p2m list and M2P table;
/// the identity natively.
pub trait FrameMap {
    /// Machine frame backing `pfn`, if the guest owns one there.
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn>;
    /// Pseudo-physical frame that `mfn` backs, if it belongs to the guest.
    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn>;
}

impl<T: FrameMap + ?Sized> FrameMap for &T {
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn> {
        (**self).to_mfn(pfn)
    }
    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn> {
        (**self).to_pfn(mfn)
    }
}

/// The identity [`FrameMap`] of native paging (and of Xen PVH/HVM, where the
/// guest's "machine" frames are its own guest-physical frames).
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity;

impl FrameMap for Identity {
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn> {
        Some(Mfn(pfn.0))
    }
    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn> {
        Some(Pfn(mfn.0))
    }
}

/// Where new page-table frames come from.
pub trait FrameAllocator {
    /// A free 4 KiB frame, or `None` when memory is exhausted. Its contents
    /// are unspecified; pvmmu zeroes it before use.
    fn allocate(&mut self) -> Option<Pfn>;
    /// Gives back a frame pvmmu no longer uses (for example a page table
    /// freed by `unmap`). Under Xen PV it is already unpinned and writable.
    fn free(&mut self, pfn: Pfn);
}
