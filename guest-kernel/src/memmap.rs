//! The boot memory map: e820-style regions from `hvm_start_info` (native,
//! PVH) or `XENMEM_memory_map` / `start_info.nr_pages` (Xen PV).
//!
//! Invariant: regions are kept in the order the firmware or Xen gave them,
//! at most [`MAX_REGIONS`]; extra entries are dropped and counted, never
//! written past the array.

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

/// The boot memory map.
#[derive(Clone)]
pub struct MemoryMap {
    regions: [Region; MAX_REGIONS],
    len: usize,
    dropped: usize,
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
            dropped: 0,
            source,
        }
    }

    /// Appends a region (`len` bytes at `start`); empty regions are skipped,
    /// regions beyond [`MAX_REGIONS`] are counted in [`Self::dropped`].
    pub fn push(&mut self, start: u64, len: u64, kind: RegionKind) {
        if len == 0 {
            return;
        }
        if self.len == MAX_REGIONS {
            self.dropped += 1;
            return;
        }
        self.regions[self.len] = Region {
            start,
            end: start.saturating_add(len),
            kind,
        };
        self.len += 1;
    }

    /// The regions.
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

    /// Regions that did not fit.
    pub fn dropped(&self) -> usize {
        self.dropped
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

/// Bytes rounded to the nearest MiB (firmware holes of a few hundred KiB
/// below 1 MiB do not change the figure).
pub const fn bytes_to_mib_rounded(bytes: u64) -> u64 {
    (bytes + (1 << 19)) >> 20
}
