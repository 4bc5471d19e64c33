//! Cache modes and how a backend encodes them in a 4 KiB leaf.
//!
//! A leaf selects one of the eight `IA32_PAT` entries with three bits: PWT
//! (bit 0 of the index), PCD (bit 1) and, in a 4 KiB entry, PAT (bit 7,
//! bit 2 of the index). Which memory type each index means is the PAT
//! value's business, so the encoding of a mode is read from the PAT in
//! force, never assumed:
//!
//! * natively the kernel programs [`crate::space::PAT_VALUE`] (WB 0, WC 1,
//!   UC- 2, UC 3, twice): the three modes need only PWT and PCD;
//! * under Xen PV the guest cannot program the PAT: Xen runs it with its
//!   own value (`XEN_MSR_PAT`, which a PV guest reads with `rdmsr
//!   IA32_PAT`: WB 0, WT 1, UC- 2, UC 3, WC 4, WP 5, UC 6, UC 7), where
//!   write-combining needs the PAT bit and PWT alone means write-through.
//!
//! Invariant: [`CacheEncoding::bits`] of every mode lies within
//! [`CacheEncoding::mask`], and the mask holds the PAT bit only when a mode
//! needs it (so natively, where bit 7 of a large leaf is PS, CPA never
//! touches it).

use crate::backend::xen::{Alias, AliasMap, MAX_ALIASES};
use crate::entry::Flags;
use crate::types::{Pfn, PAGE_SIZE};

/// A memory type `set_memory_uc / wc / wb` select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Write-back (`set_memory_wb`), PAT type 6.
    WriteBack,
    /// Write-combining (`set_memory_wc`), PAT type 1.
    WriteCombining,
    /// Uncached (`set_memory_uc`), PAT type 0 (strong UC).
    Uncached,
}

impl CacheMode {
    /// The memory-type code of this mode in an `IA32_PAT` byte.
    pub const fn pat_type(self) -> u8 {
        match self {
            CacheMode::WriteBack => 6,
            CacheMode::WriteCombining => 1,
            CacheMode::Uncached => 0,
        }
    }
}

/// The PAT bit of a 4 KiB leaf (bit 7; PS in an L2/L3 entry).
pub const PAT_4K: Flags = Flags::HUGE_PAGE;

/// Every bit a 4 KiB leaf selects its PAT index with.
pub const CACHE_SELECT: Flags = Flags::WRITE_THROUGH.union(Flags::NO_CACHE).union(PAT_4K);

/// The leaf bits of each [`CacheMode`] under one PAT value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheEncoding {
    wb: Flags,
    wc: Flags,
    uc: Flags,
}

/// The leaf bits selecting PAT index `i` (`i < 8`).
const fn index_bits(i: usize) -> Flags {
    let mut f = Flags::empty();
    if i & 1 != 0 {
        f = f.union(Flags::WRITE_THROUGH);
    }
    if i & 2 != 0 {
        f = f.union(Flags::NO_CACHE);
    }
    if i & 4 != 0 {
        f = f.union(PAT_4K);
    }
    f
}

/// The lowest PAT index of `pat` holding memory type `ty`.
const fn lowest_index(pat: u64, ty: u8) -> Option<usize> {
    let mut i = 0;
    while i < 8 {
        if (pat >> (8 * i)) as u8 == ty {
            return Some(i);
        }
        i += 1;
    }
    None
}

impl CacheEncoding {
    /// The encoding under `pat` (an `IA32_PAT` value): each mode takes the
    /// lowest index holding its memory type. `None` when a mode has no
    /// index (then no caching change can be expressed).
    pub const fn from_pat(pat: u64) -> Option<Self> {
        let (Some(wb), Some(wc), Some(uc)) = (
            lowest_index(pat, CacheMode::WriteBack.pat_type()),
            lowest_index(pat, CacheMode::WriteCombining.pat_type()),
            lowest_index(pat, CacheMode::Uncached.pat_type()),
        ) else {
            return None;
        };
        Some(Self {
            wb: index_bits(wb),
            wc: index_bits(wc),
            uc: index_bits(uc),
        })
    }

    /// The leaf bits selecting `mode`.
    pub const fn bits(&self, mode: CacheMode) -> Flags {
        match mode {
            CacheMode::WriteBack => self.wb,
            CacheMode::WriteCombining => self.wc,
            CacheMode::Uncached => self.uc,
        }
    }

    /// The bits a change of mode sets or clears: PWT and PCD, and the PAT
    /// bit when some mode needs it.
    pub const fn mask(&self) -> Flags {
        let used = self.wb.union(self.wc).union(self.uc);
        if used.contains(PAT_4K) {
            CACHE_SELECT
        } else {
            Flags::WRITE_THROUGH.union(Flags::NO_CACHE)
        }
    }

    /// The mode a 4 KiB leaf's flags select, if one of the three.
    pub fn mode_of(&self, flags: Flags) -> Option<CacheMode> {
        let bits = flags & self.mask();
        [
            CacheMode::WriteBack,
            CacheMode::WriteCombining,
            CacheMode::Uncached,
        ]
        .into_iter()
        .find(|&m| self.bits(m) == bits)
    }
}

/// A caching change that would leave a kernel mapping of one of its
/// frames with the old memory type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AliasConflict {
    /// The page of the range.
    pub va: u64,
    /// The other mapping of its frame.
    pub alias: u64,
}

/// Checks a caching change of `pages` pages at `va`, which map the
/// consecutive frames from `first`, against every mapping `aliases` knows
/// of those frames: each must lie in `[va, va + pages * 4 KiB)` or in one
/// of `carried` (ranges of the same length the caller changes with it).
/// Xen 4.17 accepts mixed memory types across a frame's mappings (it keeps
/// no per-frame cache attribute since XSA-402); the architecture warns
/// against them (aliases of one frame with different types), so the kernel
/// refuses them itself, before anything is written.
pub fn check_aliases<A: AliasMap + ?Sized>(
    aliases: &A,
    va: u64,
    first: Pfn,
    pages: u64,
    carried: &[u64],
) -> Result<(), AliasConflict> {
    let len = pages.saturating_mul(PAGE_SIZE);
    let within = |a: u64, base: u64| a >= base && a - base < len;
    for k in 0..pages {
        let mut out = [Alias::Va(0); MAX_ALIASES];
        let n = aliases.aliases(Pfn(first.0 + k), &mut out).min(MAX_ALIASES);
        for alias in &out[..n] {
            let Alias::Va(a) = *alias else { continue };
            if !within(a, va) && !carried.iter().any(|&c| within(a, c)) {
                return Err(AliasConflict {
                    va: va + k * PAGE_SIZE,
                    alias: a,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xen_pat_puts_write_combining_on_the_pat_bit() {
        let e = CacheEncoding::from_pat(hypercall::abi::XEN_MSR_PAT).unwrap();
        assert_eq!(e.bits(CacheMode::WriteBack), Flags::empty());
        assert_eq!(e.bits(CacheMode::WriteCombining), PAT_4K, "index 4");
        assert_eq!(
            e.bits(CacheMode::Uncached),
            Flags::WRITE_THROUGH | Flags::NO_CACHE,
            "index 3, the lowest UC"
        );
        assert_eq!(e.mask(), CACHE_SELECT);
        // PWT alone is write-through there, not one of the three modes.
        assert_eq!(e.mode_of(Flags::WRITE_THROUGH), None);
        assert_eq!(e.mode_of(PAT_4K), Some(CacheMode::WriteCombining));
    }

    #[test]
    fn the_native_pat_needs_no_pat_bit() {
        let e = CacheEncoding::from_pat(crate::space::PAT_VALUE).unwrap();
        assert_eq!(e.bits(CacheMode::WriteCombining), Flags::WRITE_THROUGH);
        assert_eq!(
            e.bits(CacheMode::Uncached),
            Flags::WRITE_THROUGH | Flags::NO_CACHE
        );
        assert_eq!(e.mask(), Flags::WRITE_THROUGH | Flags::NO_CACHE);
    }

    /// Frames 100.. mapped at `A` and, for 100..104, also at `B`.
    struct TwoMaps;
    const A: u64 = 0x10_0000;
    const B: u64 = 0x80_0000;
    impl AliasMap for TwoMaps {
        fn aliases(&self, pfn: Pfn, out: &mut [Alias; MAX_ALIASES]) -> usize {
            out[0] = Alias::Va(A + pfn.0 * PAGE_SIZE);
            if (100..104).contains(&pfn.0) {
                out[1] = Alias::Va(B + pfn.0 * PAGE_SIZE);
                return 2;
            }
            1
        }
    }

    #[test]
    fn a_mapping_left_with_the_old_type_is_a_conflict() {
        let at = |m: u64, pfn: u64| m + pfn * PAGE_SIZE;
        // Frames 104..: only their own mapping.
        assert_eq!(
            check_aliases(&TwoMaps, at(A, 104), Pfn(104), 8, &[]),
            Ok(())
        );
        // 102..106 through A: 102 is also at B, not carried.
        assert_eq!(
            check_aliases(&TwoMaps, at(A, 102), Pfn(102), 4, &[]),
            Err(AliasConflict {
                va: at(A, 102),
                alias: at(B, 102)
            })
        );
        // Carried to B: no conflict.
        assert_eq!(
            check_aliases(&TwoMaps, at(A, 100), Pfn(100), 4, &[at(B, 100)]),
            Ok(())
        );
        // A carried range one page short leaves the last frame's B alias.
        assert_eq!(
            check_aliases(&TwoMaps, at(A, 101), Pfn(101), 3, &[at(B, 100)]),
            Err(AliasConflict {
                va: at(A, 103),
                alias: at(B, 103)
            })
        );
    }

    #[test]
    fn a_pat_without_write_combining_encodes_nothing() {
        // The reset value: WB WT UC- UC, twice.
        assert_eq!(CacheEncoding::from_pat(0x0007_0406_0007_0406), None);
    }
}
