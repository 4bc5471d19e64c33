//! The boot memory map: e820-style regions from `hvm_start_info` (native,
//! PVH) or `XENMEM_memory_map` / `start_info.nr_pages` (Xen PV).
//!
//! Invariant: the map is built by `hypercall::boot::memmap` (host-tested):
//! sorted, same-kind overlaps merged, different-kind overlaps and
//! overflowing entries refused, never trimmed silently.

pub use hypercall::boot::memmap::{MapSource, MemoryMap, MAX_REGIONS};

/// Bytes rounded to the nearest MiB (firmware holes of a few hundred KiB
/// below 1 MiB do not change the figure).
pub const fn bytes_to_mib_rounded(bytes: u64) -> u64 {
    (bytes + (1 << 19)) >> 20
}
