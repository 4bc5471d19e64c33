//! Page-table entries, levels and the entry rules of each backend.
//!
//! Invariant: an [`Entry`] is the raw 64-bit value as the MMU (natively) or
//! Xen (under PV) sees it: the frame field holds a machine frame number. The
//! address space never builds a raw value itself; it asks its backend, which
//! applies the rules written here once: [`pv_check`] for Xen PV (no PSE at
//! any level, no PWT/PCD/PAT, no GLOBAL, non-present written as 0, USER in a
//! read-back entry is Xen's doing) and [`native_check`] natively.

pub use x86_64::structures::paging::PageTableFlags as Flags;

use crate::types::{Mfn, ENTRIES, ENTRY_FRAME_MASK};

/// The PAT bit of a 4 KiB leaf (bit 7: PS at the other levels).
pub const PAT_4K: u64 = 1 << 7;
/// The PAT bit of a 2 MiB or 1 GiB leaf (bit 12, the lowest bit of the
/// frame field of a table entry or a 4 KiB leaf).
pub const PAT_LARGE: u64 = 1 << 12;

/// A page-table level; [`Level::L1`] holds 4 KiB leaf entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Page table: 4 KiB pages.
    L1,
    /// Page directory: L1 tables or 2 MiB pages.
    L2,
    /// Page-directory-pointer table: L2 tables or 1 GiB pages.
    L3,
    /// The root.
    L4,
}

impl Level {
    /// 1..=4.
    pub const fn number(self) -> u8 {
        match self {
            Self::L1 => 1,
            Self::L2 => 2,
            Self::L3 => 3,
            Self::L4 => 4,
        }
    }

    /// Bit position of the lowest virtual-address bit this level indexes.
    pub const fn shift(self) -> u32 {
        12 + 9 * (self.number() as u32 - 1)
    }

    /// Bytes of virtual address space one entry of this level covers.
    pub const fn entry_span(self) -> u64 {
        1u64 << self.shift()
    }

    /// Index into a table of this level for virtual address `va`.
    pub const fn index(self, va: u64) -> usize {
        ((va >> self.shift()) as usize) & (ENTRIES - 1)
    }

    /// The level below, `None` for L1.
    pub const fn lower(self) -> Option<Level> {
        match self {
            Self::L1 => None,
            Self::L2 => Some(Self::L1),
            Self::L3 => Some(Self::L2),
            Self::L4 => Some(Self::L3),
        }
    }

    /// The level above, `None` for L4.
    pub const fn upper(self) -> Option<Level> {
        match self {
            Self::L1 => Some(Self::L2),
            Self::L2 => Some(Self::L3),
            Self::L3 => Some(Self::L4),
            Self::L4 => None,
        }
    }

    /// The Xen pin level of a table of this level.
    pub const fn pin_level(self) -> hypercall::PinLevel {
        match self {
            Self::L1 => hypercall::PinLevel::L1,
            Self::L2 => hypercall::PinLevel::L2,
            Self::L3 => hypercall::PinLevel::L3,
            Self::L4 => hypercall::PinLevel::L4,
        }
    }
}

/// A raw page-table entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Entry(pub u64);

impl Entry {
    /// The all-zero, non-present entry.
    pub const EMPTY: Entry = Entry(0);

    /// Builds an entry from a machine frame and flags.
    pub const fn new(mfn: Mfn, flags: Flags) -> Self {
        Self(((mfn.0 << 12) & ENTRY_FRAME_MASK) | flags.bits())
    }
    /// Present bit set.
    pub const fn is_present(self) -> bool {
        self.0 & Flags::PRESENT.bits() != 0
    }
    /// Not present and all other bits clear too (how PV writes a hole).
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// PS bit: a 2 MiB / 1 GiB leaf at L2 / L3 (meaningless at L1, where it
    /// is the PAT bit).
    pub const fn is_huge(self) -> bool {
        self.0 & Flags::HUGE_PAGE.bits() != 0
    }
    /// The one leaf rule: a present entry at `level` maps memory itself
    /// (rather than pointing to a lower table) when it is an L1 entry, or
    /// an L2 / L3 entry with PS (a 2 MiB / 1 GiB page). PS at L4 is
    /// reserved and never a leaf. Under PV no entry has PS (Xen refuses
    /// it), so the rule is the same for every backend.
    pub const fn is_leaf(self, level: Level) -> bool {
        match level {
            Level::L1 => true,
            Level::L2 | Level::L3 => self.is_huge(),
            Level::L4 => false,
        }
    }
    /// Machine frame the entry points to (a table, or a 4 KiB page). For a
    /// large leaf use [`Entry::leaf_mfn`]: its bit 12 is the PAT bit, not
    /// part of the frame.
    pub const fn mfn(self) -> Mfn {
        Mfn((self.0 & ENTRY_FRAME_MASK) >> 12)
    }
    /// The first machine frame of the page this entry maps as a leaf at
    /// `level`: the frame field without the bits below the page's
    /// alignment (bit 12 of a 2 MiB or 1 GiB leaf is its PAT bit, the rest
    /// below the alignment is reserved).
    pub const fn leaf_mfn(self, level: Level) -> Mfn {
        Mfn((self.0 & ENTRY_FRAME_MASK & !(level.entry_span() - 1)) >> 12)
    }
    /// The PAT bit of a leaf at `level`, as it sits in the raw entry (bit 7
    /// of a 4 KiB leaf, bit 12 of a large one), or 0. [`Flags`] has no name
    /// for it, so code that rebuilds a leaf from flags carries it over with
    /// this.
    pub const fn pat_bit(self, level: Level) -> u64 {
        let bit = match level {
            Level::L1 => PAT_4K,
            _ => PAT_LARGE,
        };
        self.0 & bit
    }
    /// All flag bits (everything but the frame field).
    pub const fn flags(self) -> Flags {
        Flags::from_bits_truncate(self.0 & !ENTRY_FRAME_MASK)
    }
}

impl core::fmt::Debug for Entry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Entry({:#018x})", self.0)
    }
}

/// Why a backend refuses an entry's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagError {
    /// PS at a level where this backend has no large pages (always under PV).
    LargePage,
    /// PWT/PCD/PAT: caching attributes a PV guest without I/O privilege may
    /// not set.
    CacheAttributes,
    /// GLOBAL: refused on PV kernel pages.
    Global,
    /// The entry must be present to be written with flags.
    NotPresent,
}

/// Flags only the hardware or Xen set; masked out of comparisons.
pub const HARDWARE_SET: Flags = Flags::ACCESSED.union(Flags::DIRTY);

/// The flags an intermediate entry (pointing to a lower table) carries:
/// permissive, the leaf decides.
pub const TABLE_FLAGS: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::USER_ACCESSIBLE);

/// Xen PV entry rules for a leaf (always an L1 entry under PV). Returns the
/// flags to write or why they are refused. `io_privileged`: the domain may
/// set PWT/PCD (dom0 or a domain with I/O resources); PAT (bit 7 at L1) is
/// refused regardless, as PS is at every other level.
pub fn pv_check(flags: Flags, io_privileged: bool) -> Result<Flags, FlagError> {
    if !flags.contains(Flags::PRESENT) {
        return Err(FlagError::NotPresent);
    }
    // Bit 7 is PS at L2/L3 and PAT at L1: refused either way.
    if flags.contains(Flags::HUGE_PAGE) {
        return Err(FlagError::LargePage);
    }
    if !io_privileged && flags.intersects(Flags::WRITE_THROUGH | Flags::NO_CACHE) {
        return Err(FlagError::CacheAttributes);
    }
    if flags.contains(Flags::GLOBAL) {
        return Err(FlagError::Global);
    }
    Ok(flags)
}

/// Xen PV rules for any entry the backend writes (leaves, table entries,
/// alias flips): no PS at any level, no caching attributes without I/O
/// privilege. With it, bit 7 is let through as the PAT bit of a 4 KiB
/// leaf (a caching change, `crate::backend::cache`): the backend builds
/// table entries without it and leaves only at L1. GLOBAL is Xen's to
/// manage: a read-back GLOBAL is not written back.
pub fn pv_sanitize(val: Entry, io_privileged: bool) -> Result<Entry, FlagError> {
    if !val.is_present() {
        return Ok(Entry::EMPTY);
    }
    let flags = val.flags();
    if !io_privileged && flags.contains(Flags::HUGE_PAGE) {
        return Err(FlagError::LargePage);
    }
    if !io_privileged && flags.intersects(Flags::WRITE_THROUGH | Flags::NO_CACHE) {
        return Err(FlagError::CacheAttributes);
    }
    Ok(Entry(val.0 & !Flags::GLOBAL.bits()))
}

/// Native leaf rules: PRESENT required; `huge` says whether the leaf is a
/// 2 MiB / 1 GiB page (then PS is set by the address space, not the caller).
pub fn native_check(flags: Flags) -> Result<Flags, FlagError> {
    if !flags.contains(Flags::PRESENT) {
        return Err(FlagError::NotPresent);
    }
    if flags.contains(Flags::HUGE_PAGE) {
        return Err(FlagError::LargePage);
    }
    Ok(flags)
}

/// Bit 52, which Xen sets (with USER) on the kernel's L1 entries of a
/// 64-bit PV guest (`_PAGE_GUEST_KERNEL`).
pub const XEN_GUEST_KERNEL: Flags = Flags::BIT_52;

/// Flags of a read-back PV entry as the guest asked for them: Xen sets
/// USER (and its guest-kernel marker, bit 52) on present entries of a 64-bit
/// PV guest, whose kernel runs in ring 3, and may set GLOBAL on them (the
/// guest never may), so these carry no information and are dropped.
pub fn pv_normalize(flags: Flags) -> Flags {
    flags - Flags::USER_ACCESSIBLE - XEN_GUEST_KERNEL - Flags::GLOBAL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_index_addresses() {
        let va = 0xffff_8880_1234_5000u64;
        assert_eq!(Level::L4.index(va), 273);
        assert_eq!(Level::L1.index(va), 0x145);
        assert_eq!(Level::L2.entry_span(), 2 << 20);
        assert_eq!(Level::L3.entry_span(), 1 << 30);
        assert_eq!(Level::L4.lower(), Some(Level::L3));
        assert_eq!(Level::L1.lower(), None);
        assert_eq!(Level::L1.upper(), Some(Level::L2));
        assert_eq!(Level::L4.upper(), None);
    }

    #[test]
    fn leaf_rule_is_l1_or_ps_at_l2_l3() {
        let table = Entry::new(Mfn(7), TABLE_FLAGS);
        let huge = Entry(table.0 | Flags::HUGE_PAGE.bits());
        assert!(table.is_leaf(Level::L1) && huge.is_leaf(Level::L1));
        assert!(!table.is_leaf(Level::L2) && huge.is_leaf(Level::L2));
        assert!(!table.is_leaf(Level::L3) && huge.is_leaf(Level::L3));
        assert!(!table.is_leaf(Level::L4) && !huge.is_leaf(Level::L4));
    }

    #[test]
    fn entry_round_trips_frame_and_flags() {
        let e = Entry::new(Mfn(0xabcde), Flags::PRESENT | Flags::NO_EXECUTE);
        assert_eq!(e.mfn(), Mfn(0xabcde));
        assert!(e.is_present() && !e.is_huge());
        assert_eq!(e.flags(), Flags::PRESENT | Flags::NO_EXECUTE);
    }

    #[test]
    fn pv_rules_refuse_what_xen_refuses() {
        let p = Flags::PRESENT;
        assert_eq!(
            pv_check(p | Flags::HUGE_PAGE, true),
            Err(FlagError::LargePage)
        );
        assert_eq!(
            pv_check(p | Flags::NO_CACHE, false),
            Err(FlagError::CacheAttributes)
        );
        assert_eq!(pv_check(p | Flags::NO_CACHE, true), Ok(p | Flags::NO_CACHE));
        assert_eq!(
            pv_check(p | Flags::WRITE_THROUGH, false),
            Err(FlagError::CacheAttributes)
        );
        assert_eq!(pv_check(p | Flags::GLOBAL, true), Err(FlagError::Global));
        assert_eq!(pv_check(Flags::WRITABLE, false), Err(FlagError::NotPresent));
        assert_eq!(
            pv_check(p | Flags::WRITABLE, false),
            Ok(p | Flags::WRITABLE)
        );
        let e = Entry::new(Mfn(5), p | Flags::GLOBAL | Flags::WRITABLE);
        assert_eq!(
            pv_sanitize(e, false),
            Ok(Entry::new(Mfn(5), p | Flags::WRITABLE))
        );
        assert_eq!(
            pv_sanitize(Entry(Flags::WRITABLE.bits()), false),
            Ok(Entry::EMPTY)
        );
        assert_eq!(
            pv_sanitize(Entry::new(Mfn(5), p | Flags::HUGE_PAGE), false),
            Err(FlagError::LargePage)
        );
        // With I/O privilege bit 7 of a leaf is its PAT bit (Xen's
        // `l1_disallow_mask` lets PAT, PCD and PWT through).
        let wc = Entry::new(Mfn(5), p | Flags::HUGE_PAGE);
        assert_eq!(pv_sanitize(wc, true), Ok(wc));
        assert_eq!(pv_normalize(p | Flags::USER_ACCESSIBLE), p);
        assert_eq!(native_check(p | Flags::GLOBAL), Ok(p | Flags::GLOBAL));
    }
}
