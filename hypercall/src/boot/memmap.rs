//! The boot memory map: e820-style regions from `hvm_start_info` (PVH),
//! `XENMEM_memory_map` or `start_info.nr_pages` (Xen PV), normalised.
//!
//! Invariant: a [`MemoryMap`] is sorted by address, its regions neither
//! overlap nor touch when they are of the same kind (such neighbours are
//! merged), and every end was computed without overflow. A map that cannot
//! be made so — an entry whose end overflows, two regions of different kinds
//! that overlap, more regions than [`MAX_REGIONS`] — is refused with a
//! [`MemmapError`], never trimmed silently.

use core::fmt;

/// Most regions kept.
pub const MAX_REGIONS: usize = 128;

/// What a region holds (e820 type numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// 1: usable RAM.
    Ram,
    /// 2: reserved.
    Reserved,
    /// 3: ACPI tables (reclaimable).
    Acpi,
    /// 4: ACPI non-volatile storage.
    Nvs,
    /// 5: unusable.
    Unusable,
    /// Anything else.
    Other(u32),
}

impl RegionKind {
    /// Decodes an e820 type.
    pub const fn from_e820(kind: u32) -> Self {
        match kind {
            1 => RegionKind::Ram,
            2 => RegionKind::Reserved,
            3 => RegionKind::Acpi,
            4 => RegionKind::Nvs,
            5 => RegionKind::Unusable,
            other => RegionKind::Other(other),
        }
    }
}

/// One region `[start, end)` in (pseudo-)physical bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// What it holds.
    pub kind: RegionKind,
}

impl Region {
    /// Size in bytes.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }
    /// Whether the region is empty.
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Where the map came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapSource {
    /// `hvm_start_info.memmap_paddr` (PVH).
    HvmStartInfo,
    /// `XENMEM_memory_map` (PV).
    XenMemoryMap,
    /// One RAM region of `start_info.nr_pages` pages (PV, when Xen has no
    /// map for the domain, as for a PV dom0).
    NrPages,
}

/// Why a memory map was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemmapError {
    /// Entry `index` ends beyond the 64-bit address space.
    Overflow {
        /// Its position in the map as given.
        index: usize,
        /// Its start.
        addr: u64,
        /// Its size.
        size: u64,
    },
    /// Two regions of different kinds overlap: which one holds is unknown.
    Conflict {
        /// The lower one.
        first: Region,
        /// The one that starts inside it.
        second: Region,
    },
    /// More non-empty entries than [`MAX_REGIONS`].
    TooMany {
        /// How many were given (at least).
        count: usize,
    },
}

impl fmt::Display for MemmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemmapError::Overflow { index, addr, size } => write!(
                f,
                "memory map entry {index} ({size:#x} bytes at {addr:#x}) ends beyond 2^64"
            ),
            MemmapError::Conflict { first, second } => write!(
                f,
                "memory map regions [{:#x}, {:#x}) {:?} and [{:#x}, {:#x}) {:?} overlap",
                first.start, first.end, first.kind, second.start, second.end, second.kind
            ),
            MemmapError::TooMany { count } => write!(
                f,
                "memory map has {count} entries; at most {MAX_REGIONS} are supported"
            ),
        }
    }
}

/// The boot memory map.
#[derive(Clone)]
pub struct MemoryMap {
    regions: [Region; MAX_REGIONS],
    len: usize,
    source: MapSource,
}

impl MemoryMap {
    /// An empty map from `source`.
    pub const fn new(source: MapSource) -> Self {
        MemoryMap {
            regions: [Region {
                start: 0,
                end: 0,
                kind: RegionKind::Reserved,
            }; MAX_REGIONS],
            len: 0,
            source,
        }
    }

    /// Normalises `(addr, size, e820 type)` entries in any order: empty
    /// ones are skipped, the rest sorted, same-kind neighbours merged.
    pub fn from_entries<I>(source: MapSource, entries: I) -> Result<Self, MemmapError>
    where
        I: IntoIterator<Item = (u64, u64, u32)>,
    {
        let mut map = MemoryMap::new(source);
        let mut count = 0;
        for (index, (addr, size, kind)) in entries.into_iter().enumerate() {
            if size == 0 {
                continue;
            }
            let end = addr
                .checked_add(size)
                .ok_or(MemmapError::Overflow { index, addr, size })?;
            count += 1;
            if map.len == MAX_REGIONS {
                continue;
            }
            map.regions[map.len] = Region {
                start: addr,
                end,
                kind: RegionKind::from_e820(kind),
            };
            map.len += 1;
        }
        if count > MAX_REGIONS {
            return Err(MemmapError::TooMany { count });
        }
        let regions = &mut map.regions[..map.len];
        regions.sort_unstable_by_key(|r| (r.start, r.end));
        let mut kept = 0;
        for i in 0..map.len {
            let next = map.regions[i];
            if kept > 0 {
                let last = &mut map.regions[kept - 1];
                if next.start < last.end && next.kind != last.kind {
                    return Err(MemmapError::Conflict {
                        first: *last,
                        second: next,
                    });
                }
                if next.start <= last.end && next.kind == last.kind {
                    last.end = last.end.max(next.end);
                    continue;
                }
            }
            map.regions[kept] = next;
            kept += 1;
        }
        map.len = kept;
        Ok(map)
    }

    /// The regions, sorted.
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.len]
    }

    /// RAM regions only.
    pub fn ram(&self) -> impl Iterator<Item = &Region> {
        self.regions().iter().filter(|r| r.kind == RegionKind::Ram)
    }

    /// Total RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram().map(Region::len).sum()
    }

    /// One past the highest RAM byte.
    pub fn ram_end(&self) -> u64 {
        self.ram().map(|r| r.end).max().unwrap_or(0)
    }

    /// Whether `[start, end)` lies entirely in RAM.
    pub fn is_ram(&self, start: u64, end: u64) -> bool {
        self.ram().any(|r| r.start <= start && end <= r.end)
    }

    /// Where the map came from.
    pub fn source(&self) -> MapSource {
        self.source
    }
}

impl fmt::Debug for MemoryMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.regions()).finish()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn map(entries: &[(u64, u64, u32)]) -> Result<MemoryMap, MemmapError> {
        MemoryMap::from_entries(MapSource::HvmStartInfo, entries.iter().copied())
    }

    fn spans(map: &MemoryMap) -> Vec<(u64, u64, RegionKind)> {
        map.regions()
            .iter()
            .map(|r| (r.start, r.end, r.kind))
            .collect()
    }

    #[test]
    fn unsorted_overlapping_ram_is_sorted_and_merged() {
        let m = map(&[
            (0x10_0000, 0x10_0000, 1),
            (0, 0x9_fc00, 1),
            (0x18_0000, 0x10_0000, 1), // overlaps the first
            (0xf_0000, 0x1_0000, 2),
            (0x28_0000, 0, 1), // empty: skipped
        ])
        .unwrap();
        assert_eq!(
            spans(&m),
            [
                (0, 0x9_fc00, RegionKind::Ram),
                (0xf_0000, 0x10_0000, RegionKind::Reserved),
                (0x10_0000, 0x28_0000, RegionKind::Ram),
            ]
        );
        // Counted once, not twice: the overlap is not double RAM.
        assert_eq!(m.ram_bytes(), 0x9_fc00 + 0x18_0000);
    }

    #[test]
    fn bad_maps_are_refused_with_the_reason() {
        assert_eq!(
            map(&[(0, 0x1000, 1), (u64::MAX - 0xfff, 0x1000, 1)]).unwrap_err(),
            MemmapError::Overflow {
                index: 1,
                addr: u64::MAX - 0xfff,
                size: 0x1000
            }
        );
        let conflict = map(&[(0x1000, 0x3000, 1), (0x2000, 0x1000, 2)]).unwrap_err();
        assert!(matches!(conflict, MemmapError::Conflict { .. }));
        assert!(std::format!("{conflict}").contains("overlap"));
        let many: Vec<_> = (0..200u64).map(|i| (i * 0x2000, 0x1000, 1)).collect();
        assert_eq!(map(&many).unwrap_err(), MemmapError::TooMany { count: 200 });
    }

    /// Random small maps against a byte-by-byte reference: every byte's kind
    /// is the same before and after, or the map is refused exactly when two
    /// kinds claim a byte.
    #[test]
    fn random_maps_keep_every_byte_or_are_refused() {
        let mut rng = crate::boot::test_rng(0x2545_f491_4f6c_dd1d);
        let mut next = move |n: u64| rng() % n;
        for _ in 0..20_000 {
            let n = next(8) as usize;
            let entries: Vec<(u64, u64, u32)> = (0..n)
                .map(|_| (next(64), next(16), 1 + next(3) as u32))
                .collect();
            let mut owner = [None::<u32>; 80];
            let mut clash = false;
            for &(addr, size, kind) in &entries {
                for b in addr..addr + size {
                    match owner[b as usize] {
                        Some(k) if k != kind => clash = true,
                        _ => owner[b as usize] = Some(kind),
                    }
                }
            }
            match map(&entries) {
                Err(MemmapError::Conflict { .. }) => assert!(clash, "{entries:?}"),
                Err(e) => panic!("{e:?} for {entries:?}"),
                Ok(m) => {
                    assert!(!clash, "{entries:?} accepted");
                    for w in m.regions().windows(2) {
                        assert!(w[0].end <= w[1].start, "{entries:?}");
                        assert!(w[0].end < w[1].start || w[0].kind != w[1].kind);
                    }
                    for (b, want) in owner.iter().enumerate() {
                        let b = b as u64;
                        let got = m
                            .regions()
                            .iter()
                            .find(|r| r.start <= b && b < r.end)
                            .map(|r| r.kind);
                        assert_eq!(
                            got,
                            want.map(RegionKind::from_e820),
                            "byte {b} of {entries:?}"
                        );
                    }
                }
            }
        }
    }
}
