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
//! Invariant: [`PvBoot`] is a copy taken at entry; the pointers it keeps
//! (p2m list, M2P) stay valid until pvmmu replaces Xen's tables, and every
//! read through them is bounds-checked against `nr_pages` or the bootstrap
//! area first.

use crate::boot::KERNEL_VMA;
use crate::cmdline::Cmdline;
use hypercall::abi::{start_info, SIF_INITDOMAIN, SIF_MOD_START_PFN};

/// Start of the read-only machine-to-phys table Xen maps into every 64-bit
/// PV guest (`RO_MPT_VIRT_START`).
pub const M2P_VIRT_START: u64 = 0xffff_8000_0000_0000;
/// End of the M2P area (`RO_MPT_VIRT_END`).
pub const M2P_VIRT_END: u64 = 0xffff_8040_0000_0000;
/// Magic prefix of a 64-bit PV `start_info`.
pub const START_INFO_MAGIC: &[u8] = b"xen-3.0-x86_64";

/// Page-table entry bits used by the walk (pvmmu's definitions).
const PTE_PRESENT: u64 = pvmmu::entry::Flags::PRESENT.bits();
const PTE_WRITABLE: u64 = pvmmu::entry::Flags::WRITABLE.bits();
const PTE_PSE: u64 = pvmmu::entry::Flags::HUGE_PAGE.bits();
const PTE_FRAME: u64 = pvmmu::types::ENTRY_FRAME_MASK;

/// The fields of `start_info` the kernel uses, copied at entry.
#[derive(Clone)]
pub struct PvBoot {
    /// Virtual address of `start_info`.
    pub start_info_va: u64,
    /// `magic` ("xen-3.0-x86_64").
    pub magic: [u8; 32],
    /// Pages the domain has.
    pub nr_pages: u64,
    /// Machine address of the shared-info page.
    pub shared_info_maddr: u64,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Xenstore ring MFN (domU).
    pub store_mfn: u64,
    /// Xenstore event channel (domU).
    pub store_evtchn: u32,
    /// Console ring MFN (domU; 0 for dom0).
    pub console_mfn: u64,
    /// Console event channel (domU).
    pub console_evtchn: u32,
    /// Virtual address of the bootstrap L4.
    pub pt_base: u64,
    /// Number of bootstrap page-table frames.
    pub nr_pt_frames: u64,
    /// Virtual address of the p2m list (`nr_pages` MFNs).
    pub mfn_list: u64,
    /// Module start (virtual address, or PFN with `SIF_MOD_START_PFN`).
    pub mod_start: u64,
    /// Module length in bytes.
    pub mod_len: u64,
    /// First PFN of a separately placed p2m list (0 if none).
    pub first_p2m_pfn: u64,
    /// Frames of that p2m list.
    pub nr_p2m_frames: u64,
    /// Command line.
    pub cmdline: Cmdline,
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
    /// Copies what the kernel needs out of `start_info`.
    ///
    /// # Safety
    /// `si` must be the `start_info` pointer Xen passed to the PV entry
    /// (mapped, readable, and describing this domain).
    pub unsafe fn from_start_info(si: *const start_info) -> Self {
        // SAFETY: caller's contract: `si` is Xen's mapped start_info.
        let s = unsafe { &*si };
        let magic = s.magic.map(|c| c as u8);
        let cmd_bytes = s.cmd_line.map(|c| c as u8);
        // SAFETY: reading the union as domU is always defined (plain
        // integers); for dom0 the values are simply not used as a ring.
        let (console_mfn, console_evtchn) = unsafe { (s.console.domU.mfn, s.console.domU.evtchn) };
        PvBoot {
            start_info_va: si as u64,
            magic,
            nr_pages: s.nr_pages,
            shared_info_maddr: s.shared_info,
            flags: s.flags,
            store_mfn: s.store_mfn,
            store_evtchn: s.store_evtchn,
            console_mfn,
            console_evtchn,
            pt_base: s.pt_base,
            nr_pt_frames: s.nr_pt_frames,
            mfn_list: s.mfn_list,
            mod_start: s.mod_start,
            mod_len: s.mod_len,
            first_p2m_pfn: s.first_p2m_pfn,
            nr_p2m_frames: s.nr_p2m_frames,
            cmdline: Cmdline::from_nul_terminated(&cmd_bytes),
        }
    }

    /// Whether this is dom0.
    pub fn is_dom0(&self) -> bool {
        self.flags & SIF_INITDOMAIN != 0
    }

    /// The magic string up to its NUL.
    pub fn magic_str(&self) -> &[u8] {
        let end = self.magic.iter().position(|&b| b == 0).unwrap_or(32);
        &self.magic[..end]
    }

    /// The p2m list: `p2m()[pfn]` is the MFN backing `pfn`.
    pub fn p2m(&self) -> &'static [u64] {
        // SAFETY: Xen maps `nr_pages` 8-byte entries at `mfn_list` (in the
        // start-of-day area) and keeps them there until the guest remaps.
        unsafe { core::slice::from_raw_parts(self.mfn_list as *const u64, self.nr_pages as usize) }
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
        Self::va_to_pfn(self.pt_base).unwrap_or(0) + self.nr_pt_frames + 1
    }

    /// The module (initrd) as a PFN range, if any.
    pub fn module_pfns(&self) -> Option<(u64, u64)> {
        if self.mod_len == 0 {
            return None;
        }
        let first = if self.flags & SIF_MOD_START_PFN != 0 {
            self.mod_start
        } else {
            Self::va_to_pfn(self.mod_start)?
        };
        Some((first, first + self.mod_len.div_ceil(4096)))
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
