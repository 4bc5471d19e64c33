//! What a loader hands a guest at entry, parsed and checked before use:
//! Xen PV's `start_info` ([`start_info`]), PVH's `hvm_start_info` with its
//! module list ([`hvm`]), the memory map ([`memmap`]) and the command line
//! ([`cmdline`]).
//!
//! Invariant: everything here is plain data in, typed result out (no
//! hypercall; memory is read only through a caller-supplied, range-checked
//! reader), so it builds and is tested on the host with crafted inputs, hand
//! made and random. Each bad input is a typed error whose `Display` names
//! the field and the value; nothing here panics on any input.

/// The largest guest the reference kernel supports, in MiB. Its fixed
/// capacities (the self-tests' table set, the frame allocator's ranges) are
/// sized for a direct map of this much RAM in 4 KiB pages, as Xen PV
/// builds it; the kernel refuses more RAM at boot and the xtask refuses a
/// larger `--memory` before booting.
pub const MAX_GUEST_MIB: u64 = 64 * 1024;

pub mod cmdline;
pub mod hvm;
pub mod memmap;
pub mod start_info;

/// A xorshift64 generator for the randomized tests of this module (a fixed
/// seed per test, so a failure replays).
#[cfg(test)]
fn test_rng(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
