//! The PVH boot protocol's `hvm_start_info`, read once at entry through the
//! trampoline's identity map of the low 4 GiB.
//!
//! Invariant: the parsing and every check (pointers inside the identity map,
//! overflow-free ranges, the memory map normalised, every module kept) are
//! `hypercall::boot::hvm`, tested on the host; this module only supplies the
//! reads. Everything kept is copied, so the loader's memory may be reused.

use hypercall::boot::hvm::{self, BootMemory};
pub use hypercall::boot::hvm::{HvmBoot as PvhBoot, HvmError as PvhError, Module, MAX_MODULES};

/// The trampoline identity-maps physical memory below this address.
pub const IDENTITY_LIMIT: u64 = 4 << 30;

/// Physical memory through the boot identity map.
struct IdentityMap;

impl BootMemory for IdentityMap {
    fn limit(&self) -> u64 {
        IDENTITY_LIMIT
    }

    fn read(&self, paddr: u64, out: &mut [u8]) {
        // SAFETY: the parser calls this only for 0 < paddr and
        // paddr + out.len() <= IDENTITY_LIMIT, which the trampoline maps
        // readable at the same virtual address; `out` is a distinct buffer.
        unsafe {
            core::ptr::copy_nonoverlapping(paddr as *const u8, out.as_mut_ptr(), out.len());
        }
    }
}

/// Parses and checks the `hvm_start_info` at physical `paddr`.
pub fn parse(paddr: u64) -> Result<PvhBoot, PvhError> {
    hvm::parse(&IdentityMap, paddr)
}
