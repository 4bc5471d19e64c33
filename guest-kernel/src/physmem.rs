//! How the kernel reaches frames before pvmmu has built its direct map, as
//! the [`pvmmu::PhysMem`] and [`pvmmu::FrameMap`] that pvmmu's bootstrap
//! takes: Xen's start-of-day linear mapping under PV, the trampoline's
//! identity map natively, and the p2m list / M2P table for translation.
//!
//! Invariant: a pointer is only handed out for a frame the boot mapping
//! really covers (below the walked end of Xen's linear area and not the
//! stack guard page the kernel unmapped there, or below the 4 GiB identity
//! map), so the `PhysMem` contract holds as long as those
//! boot mappings are live.

use core::ptr::NonNull;

use pvmmu::phys::FrameWords;
use pvmmu::{FrameMap, Mfn, Pfn, PhysMem};

use crate::pvh::IDENTITY_LIMIT;
use crate::xen_pv::PvBoot;

/// Frames `[0, end)` reached at `base + pfn * 4096`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootMem {
    base: u64,
    end: Pfn,
    /// A frame below `end` that the mapping leaves out (PV: the boot stack's
    /// guard page).
    hole: Option<Pfn>,
}

impl BootMem {
    /// Xen PV: the start-of-day linear area (`VIRT_BASE + pfn * 4096`), up
    /// to where Xen's tables stop mapping it.
    pub fn xen_start_of_day(pv: &PvBoot) -> Self {
        let guard = crate::boot::image_layout().stack_guard.start;
        BootMem {
            base: crate::boot::KERNEL_VMA,
            end: Pfn(pv.initial_mapping_end_pfn()),
            hole: PvBoot::va_to_pfn(guard).map(Pfn),
        }
    }

    /// Native (PVH entry): the trampoline's identity map of the low 4 GiB.
    pub fn identity() -> Self {
        BootMem {
            base: 0,
            end: Pfn::containing(IDENTITY_LIMIT),
            hole: None,
        }
    }

    /// One past the last frame reached.
    pub fn end(&self) -> Pfn {
        self.end
    }
}

// SAFETY: every frame below `end` but `hole` is mapped at `base + pfn * 4096` by the
// boot tables (walked under PV, built by the trampoline natively), readable,
// and writable unless it is a live page table under Xen PV; the address is
// the same every time.
unsafe impl PhysMem for BootMem {
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        if pfn >= self.end || Some(pfn) == self.hole {
            return None;
        }
        NonNull::new((self.base + pfn.addr()) as *mut FrameWords)
    }
}

impl FrameMap for PvBoot {
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn> {
        self.pfn_to_mfn(pfn.0).map(Mfn)
    }
    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn> {
        self.mfn_to_pfn(mfn.0).map(Pfn)
    }
}
