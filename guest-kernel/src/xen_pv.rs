//! What a Xen PV guest learns at entry: `start_info`, the p2m list, the
//! read-only M2P table, and the layout of Xen's start-of-day mapping.
//!
//! Both of Xen's domain builders (Xen's own for dom0, libxenguest's for a
//! domU) map the guest's first pseudo-physical frames linearly at
//! `VIRT_BASE` (pfn `p` at `VIRT_BASE + p * 4096`): the kernel image, then
//! what they placed after it (p2m list, start_info, store and console pages,
//! the bootstrap page tables, a boot stack), then at least 512 KiB of slack.
//! The tables are walked, not assumed: [`PvBoot::translate_initial`] reads
//! them through that linear mapping.
//!
//! Invariant: [`PvBoot`] is a copy taken at entry of a `start_info` that
//! passed `hypercall::boot::start_info::validate` (magic, every range
//! overflow-checked and inside what Xen mapped or inside `nr_pages`); the
//! pointers it keeps (p2m list, M2P) stay valid until pvmmu replaces Xen's
//! tables, and every read through them is bounds-checked against `nr_pages`
//! or the bootstrap area first.

use crate::boot::KERNEL_VMA;
use crate::cmdline::Cmdline;
use hypercall::abi::start_info;
pub use hypercall::boot::start_info::START_INFO_MAGIC;
use hypercall::boot::start_info::{self as si_check, PvLayout, StartInfoError, StartInfoFields};

/// Start of the read-only machine-to-phys table Xen maps into every 64-bit
/// PV guest (`RO_MPT_VIRT_START`).
pub const M2P_VIRT_START: u64 = 0xffff_8000_0000_0000;
/// End of the M2P area (`RO_MPT_VIRT_END`).
pub const M2P_VIRT_END: u64 = 0xffff_8040_0000_0000;

/// Page-table entry bits used by the walk (pvmmu's definitions).
const PTE_PRESENT: u64 = pvmmu::entry::Flags::PRESENT.bits();
const PTE_WRITABLE: u64 = pvmmu::entry::Flags::WRITABLE.bits();
const PTE_PSE: u64 = pvmmu::entry::Flags::HUGE_PAGE.bits();
const PTE_FRAME: u64 = pvmmu::types::ENTRY_FRAME_MASK;

/// `start_info` as copied and validated at entry; its fields are read
/// through `Deref` (`pv.nr_pages`, `pv.pt_base`, ...).
#[derive(Clone)]
pub struct PvBoot {
    /// Virtual address of `start_info`.
    pub start_info_va: u64,
    /// The fields, copied.
    pub fields: StartInfoFields,
    /// Command line.
    pub cmdline: Cmdline,
    /// Where things are, as validated.
    pub layout: PvLayout,
}

impl core::ops::Deref for PvBoot {
    type Target = StartInfoFields;

    fn deref(&self) -> &StartInfoFields {
        &self.fields
    }
}

/// A translation found in Xen's start-of-day tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitialMapping {
    /// Machine frame the address maps to.
    pub mfn: u64,
    /// The leaf entry (flags in the low bits).
    pub pte: u64,
}

impl InitialMapping {
    /// Whether the leaf entry allows writes.
    pub fn writable(&self) -> bool {
        self.pte & PTE_WRITABLE != 0
    }
}

impl PvBoot {
    /// Copies what the kernel needs out of `start_info`, after checking
    /// every field it will use (see `hypercall::boot::start_info`).
    ///
    /// # Safety
    /// `si` must be the `start_info` pointer Xen passed to the PV entry
    /// (mapped and readable).
    pub unsafe fn from_start_info(si: *const start_info) -> Result<Self, StartInfoError> {
        // SAFETY: caller's contract: `si` is Xen's mapped start_info.
        let f = StartInfoFields::from_abi(unsafe { &*si });
        let layout = si_check::validate(&f, si as u64, KERNEL_VMA)?;
        Ok(PvBoot {
            start_info_va: si as u64,
            cmdline: f.cmdline(),
            fields: f,
            layout,
        })
    }

    /// The magic string up to its NUL.
    pub fn magic_str(&self) -> &[u8] {
        let end = self.magic.iter().position(|&b| b == 0).unwrap_or(32);
        &self.magic[..end]
    }

    /// The p2m list: `p2m()[pfn]` is the MFN backing `pfn`.
    pub fn p2m(&self) -> &'static [u64] {
        // SAFETY: `validate` checked that the `nr_pages` 8-byte entries at
        // `mfn_list` are aligned and inside the start-of-day mapping, where
        // Xen keeps them until the guest remaps.
        unsafe {
            core::slice::from_raw_parts(self.layout.p2m_va as *const u64, self.nr_pages as usize)
        }
    }

    /// The PFN of a domU's console ring, if its MFN is the domain's (found
    /// in the p2m list, without reading the M2P for a foreign MFN).
    pub fn console_pfn(&self) -> Result<u64, StartInfoError> {
        si_check::console_pfn(self.p2m(), self.console_mfn)
    }

    /// MFN of `pfn`, if the domain has that frame.
    pub fn pfn_to_mfn(&self, pfn: u64) -> Option<u64> {
        self.p2m().get(pfn as usize).copied()
    }

    /// The M2P entry of `mfn` (any value; Xen stores garbage for frames
    /// the domain does not own). `None` if outside the M2P area.
    pub fn m2p(&self, mfn: u64) -> Option<u64> {
        let va = M2P_VIRT_START.checked_add(mfn.checked_mul(8)?)?;
        if va >= M2P_VIRT_END {
            return None;
        }
        // SAFETY: Xen maps the M2P read-only for every machine frame it
        // manages; `mfn` values passed here come from our own p2m list or
        // page tables, so the entry exists.
        Some(unsafe { core::ptr::read_volatile(va as *const u64) })
    }

    /// The PFN `mfn` backs, if it is ours (M2P and p2m agree).
    pub fn mfn_to_pfn(&self, mfn: u64) -> Option<u64> {
        let pfn = self.m2p(mfn)?;
        (self.pfn_to_mfn(pfn)? == mfn).then_some(pfn)
    }

    /// PFN of a virtual address in the start-of-day linear area.
    pub fn va_to_pfn(va: u64) -> Option<u64> {
        va.checked_sub(KERNEL_VMA).map(|off| off >> 12)
    }

    /// Virtual address of `pfn` in the start-of-day linear area.
    pub fn pfn_to_va(pfn: u64) -> u64 {
        KERNEL_VMA + (pfn << 12)
    }

    /// One past the last PFN of Xen's bootstrap area: the bootstrap tables
    /// end here, followed by one boot-stack page, which is included.
    pub fn bootstrap_end_pfn(&self) -> u64 {
        self.layout.bootstrap_end_pfn
    }

    /// The module (initrd) as a PFN range, if any.
    pub fn module_pfns(&self) -> Option<(u64, u64)> {
        self.layout.module_pfns
    }

    /// One past the last PFN of the start-of-day linear mapping: the first
    /// PFN at or after the bootstrap area that Xen's tables do not map at
    /// `VIRT_BASE + pfn * 4096` (bounded by `nr_pages`). Frames below it can
    /// be reached with plain loads and stores before pvmmu maps anything.
    pub fn initial_mapping_end_pfn(&self) -> u64 {
        let mut pfn = self.bootstrap_end_pfn().min(self.nr_pages);
        while pfn < self.nr_pages {
            match self.translate_initial(Self::pfn_to_va(pfn)) {
                Some(m) if Some(m.mfn) == self.pfn_to_mfn(pfn) => pfn += 1,
                _ => break,
            }
        }
        pfn
    }

    /// Walks Xen's start-of-day tables for `va`. Table frames are read
    /// through the linear area, so only tables inside the bootstrap area are
    /// followed (all of Xen's are).
    pub fn translate_initial(&self, va: u64) -> Option<InitialMapping> {
        let mut table_va = self.pt_base;
        for level in (1..=4u32).rev() {
            let index = (va >> (12 + 9 * (level - 1))) & 511;
            // SAFETY: `table_va` is the bootstrap L4 or a table frame inside
            // the bootstrap area (checked below), mapped readable by Xen.
            let pte =
                unsafe { core::ptr::read_volatile((table_va as *const u64).add(index as usize)) };
            if pte & PTE_PRESENT == 0 {
                return None;
            }
            let mfn = (pte & PTE_FRAME) >> 12;
            if level == 1 || pte & PTE_PSE != 0 {
                return Some(InitialMapping { mfn, pte });
            }
            let pfn = self.mfn_to_pfn(mfn)?;
            if pfn >= self.bootstrap_end_pfn() {
                return None;
            }
            table_va = Self::pfn_to_va(pfn);
        }
        None
    }
}
