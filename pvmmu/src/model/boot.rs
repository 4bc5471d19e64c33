//! Xen-style start-of-day page tables, as the PV dom0 builder
//! (`dom0_construct_pv`) leaves them: the guest's first frames mapped with
//! 4 KiB pages at a virtual base, the page-table frames themselves among them
//! and mapped read-only, the L4 pinned and loaded as the current root.
//!
//! Invariant: on success every table frame is validated with the type counts
//! Xen's builder gives them (one per referencing entry, the L4 two: pin and
//! CR3) and no hypercall counter has moved.

use hypercall::{PinLevel, XenError};

use super::{
    XenModel, PAGE_ACCESSED, PAGE_DIRTY, PAGE_GUEST_KERNEL, PAGE_PRESENT, PAGE_RW, PAGE_USER,
};
use crate::types::{Mfn, Pfn, PAGE_SIZE};

/// What the builder hands the guest (the page-table part of `start_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartOfDay {
    /// Virtual address of pfn 0.
    pub virt_base: u64,
    /// Frames `0..nr_mapped_pfns` are mapped at `virt_base + pfn * 4096`.
    pub nr_mapped_pfns: u64,
    /// First page-table frame (the L4); `start_info.pt_base` is its virtual
    /// address [`StartOfDay::pt_base_va`].
    pub pt_base_pfn: Pfn,
    /// Virtual address of the first page-table frame.
    pub pt_base_va: u64,
    /// Number of page-table frames (`start_info.nr_pt_frames`), contiguous
    /// from `pt_base_pfn`: the L4, then the L3s, L2s and L1s.
    pub nr_pt_frames: u64,
    /// Machine frame of the L4, pinned and loaded.
    pub root_mfn: Mfn,
    /// First frame after the mapped range: free for the guest.
    pub first_free_pfn: Pfn,
}

const BASE_PROT: u64 = PAGE_PRESENT | PAGE_RW | PAGE_ACCESSED | PAGE_USER | PAGE_DIRTY;

/// Number of distinct `2^shift`-sized blocks that `[va, va + pages*4K)` touches.
fn blocks(va: u64, pages: u64, shift: u32) -> u64 {
    if pages == 0 {
        return 0;
    }
    let last = va + (pages - 1) * PAGE_SIZE;
    (last >> shift) - (va >> shift) + 1
}

fn canonical(va: u64) -> bool {
    ((va as i64) >> 47) == ((va as i64) >> 63)
}

impl XenModel {
    /// Builds the initial page tables for `nr_image_pfns` frames of kernel
    /// image (pfns `0..nr_image_pfns`) at `virt_base`, followed by the table
    /// frames themselves, like Xen's dom0 builder; pins the L4 and loads it.
    ///
    /// Errors: `EINVAL` if `virt_base` is misaligned, the range is not
    /// canonical or touches Xen's hole, or a root is already loaded;
    /// `ENOMEM` if the guest is too small.
    pub fn start_of_day(
        &mut self,
        virt_base: u64,
        nr_image_pfns: u64,
    ) -> Result<StartOfDay, XenError> {
        if virt_base % PAGE_SIZE != 0 || self.root != 0 {
            return Err(XenError::Inval);
        }
        if nr_image_pfns >= self.nr_pages {
            return Err(XenError::NoMem);
        }
        // The last byte of a mapping of `pages` frames, if it fits.
        let last = |pages: u64| {
            pages
                .checked_mul(PAGE_SIZE)
                .and_then(|len| virt_base.checked_add(len - 1))
        };
        // Table frames needed to map the image plus the tables themselves.
        let count = |total: u64| {
            1 + blocks(virt_base, total, 39)
                + blocks(virt_base, total, 30)
                + blocks(virt_base, total, 21)
        };
        let mut nr_pt = 1;
        loop {
            let total = nr_image_pfns + nr_pt;
            if total > self.nr_pages {
                return Err(XenError::NoMem);
            }
            last(total).ok_or(XenError::Inval)?;
            let need = count(total);
            if need <= nr_pt {
                break;
            }
            nr_pt = need;
        }
        let total = nr_image_pfns + nr_pt;
        let end = last(total).ok_or(XenError::Inval)?;
        let hole = 0xffff_8000_0000_0000..0xffff_8800_0000_0000u64;
        if !canonical(virt_base)
            || !canonical(end)
            || (virt_base >> 63) != (end >> 63)
            || (virt_base < hole.end && end >= hole.start)
        {
            return Err(XenError::Inval);
        }

        let n3 = blocks(virt_base, total, 39);
        let n2 = blocks(virt_base, total, 30);
        let pt_first = nr_image_pfns;
        let l4_pfn = pt_first;
        let l3_pfn = |va: u64| pt_first + 1 + ((va >> 39) - (virt_base >> 39));
        let l2_pfn = |va: u64| pt_first + 1 + n3 + ((va >> 30) - (virt_base >> 30));
        let l1_pfn = |va: u64| pt_first + 1 + n3 + n2 + ((va >> 21) - (virt_base >> 21));
        let mfn = |m: &XenModel, pfn: u64| m.mfn_of(Pfn(pfn)).map(|x| x.0).ok_or(XenError::NoMem);
        let idx = |va: u64, shift: u32| ((va >> shift) & 511) as usize;

        for f in pt_first..total {
            let m = mfn(self, f)?;
            for i in 0..crate::types::ENTRIES {
                self.write_entry(m, i, 0);
            }
        }
        let l4 = mfn(self, l4_pfn)?;
        for pfn in 0..total {
            let va = virt_base + pfn * PAGE_SIZE;
            let (m3, m2, m1) = (
                mfn(self, l3_pfn(va))?,
                mfn(self, l2_pfn(va))?,
                mfn(self, l1_pfn(va))?,
            );
            self.write_entry(l4, idx(va, 39), (m3 << 12) | BASE_PROT);
            self.write_entry(m3, idx(va, 30), (m2 << 12) | BASE_PROT);
            self.write_entry(m2, idx(va, 21), (m1 << 12) | BASE_PROT);
            let mut l1e = (mfn(self, pfn)? << 12) | BASE_PROT | PAGE_GUEST_KERNEL;
            if pfn >= pt_first {
                l1e &= !PAGE_RW;
            }
            self.write_entry(m1, idx(va, 12), l1e);
        }

        self.pin(PinLevel::L4, l4)?;
        self.init_xen_l4_slots(l4, true);
        self.new_baseptr(l4)?;
        self.tlb_flushes = 0;
        Ok(StartOfDay {
            virt_base,
            nr_mapped_pfns: total,
            pt_base_pfn: Pfn(pt_first),
            pt_base_va: virt_base + pt_first * PAGE_SIZE,
            nr_pt_frames: nr_pt,
            root_mfn: Mfn(l4),
            first_free_pfn: Pfn(total),
        })
    }
}
