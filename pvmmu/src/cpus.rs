//! Which CPUs may hold translations of an address space: the CPUs it is
//! active on, tracked at activate / switch, read by the TLB flush.
//!
//! Ordering (the rule that keeps a CPU switching in from missing a flush):
//! a CPU sets its bit *before* it loads the root (the load flushes every
//! non-global translation it had) and clears it only *after* it has loaded
//! another root. An initiator changes the tables first and reads the mask
//! after (a full fence between, [`ActiveCpus::snapshot`]; under Xen PV,
//! Xen reads the mask when it runs `MMUEXT_*_MULTI`, after the updates of
//! the same batch). So a CPU missing from the mask the initiator read set
//! its bit after that read, hence loaded the root after the change: it
//! walks the new tables, and holds nothing old to flush.
//!
//! Invariant: bit `n` is set from before CPU `n` can cache a translation of
//! the address space until after it stopped being able to use one.
//!
//! The ordering is model-checked with `loom` (`tests/loom_shootdown.rs`:
//! a CPU switching in races a change and its mask read); under `cfg(loom)`
//! the atomics are loom's.

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicU64, Ordering};

#[cfg(not(loom))]
use core::sync::atomic::{fence, AtomicU64, Ordering};

/// Most CPUs a mask can name.
pub const MAX_CPUS: usize = 64;

/// A mask of CPUs (bit `n` for CPU, or under Xen PV vCPU, `n`): the layout
/// of the one `unsigned long` Xen's `MMUEXT_*_MULTI` reads.
#[derive(Debug, Default)]
#[repr(transparent)]
pub struct ActiveCpus(AtomicU64);

impl ActiveCpus {
    /// No CPU.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self::with_bits(0)
    }

    /// No CPU (loom's atomics are not `const`).
    #[cfg(loom)]
    pub fn new() -> Self {
        Self::with_bits(0)
    }

    /// A mask with the CPUs of `bits` already in it.
    #[cfg(not(loom))]
    pub const fn with_bits(bits: u64) -> Self {
        Self(AtomicU64::new(bits))
    }

    /// A mask with the CPUs of `bits` already in it (loom's atomics are not
    /// `const`).
    #[cfg(loom)]
    pub fn with_bits(bits: u64) -> Self {
        Self(AtomicU64::new(bits))
    }

    /// CPU `cpu` is about to load the root: call before the load (a full
    /// fence orders the bit before the walks that follow). CPUs past
    /// [`MAX_CPUS`] are ignored (the caller refuses to bring them up).
    pub fn activate(&self, cpu: usize) {
        if cpu < MAX_CPUS {
            self.0.fetch_or(1 << cpu, Ordering::SeqCst);
            fence(Ordering::SeqCst);
        }
    }

    /// CPU `cpu` has loaded another root: call after the load.
    pub fn deactivate(&self, cpu: usize) {
        if cpu < MAX_CPUS {
            self.0.fetch_and(!(1 << cpu), Ordering::SeqCst);
        }
    }

    /// The CPUs that may hold a translation changed before this call: a
    /// full fence orders the caller's table writes before the read.
    pub fn snapshot(&self) -> u64 {
        fence(Ordering::SeqCst);
        self.0.load(Ordering::SeqCst)
    }

    /// The mask's address, for Xen to read (`MMUEXT_*_MULTI`'s `vcpumask`):
    /// the type is a transparent `AtomicU64`, which has the layout of a
    /// `u64`.
    pub fn as_ptr(&self) -> *const u64 {
        (self as *const Self).cast()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn activate_and_deactivate_set_and_clear_one_bit() {
        let m = ActiveCpus::with_bits(0b1);
        m.activate(3);
        m.activate(63);
        m.activate(64);
        assert_eq!(m.snapshot(), 0b1001 | 1 << 63);
        m.deactivate(0);
        m.deactivate(64);
        assert_eq!(m.snapshot(), 0b1000 | 1 << 63);
        // SAFETY: the pointer is to the live atomic, read while nothing
        // writes it.
        assert_eq!(unsafe { m.as_ptr().read() }, 0b1000 | 1 << 63);
    }
}
