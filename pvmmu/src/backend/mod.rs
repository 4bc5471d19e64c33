//! How a page-table entry changes: one trait, two backends.
//!
//! Invariant: the address space changes a *live* table (one reachable from a
//! root, or pinned) only through [`Backend::write`], and stores directly only
//! into a *private* table: a frame it allocated, passed through
//! [`Backend::new_table`] and has not yet sealed with
//! [`Backend::seal_table`]. Every read ([`Backend::read`],
//! [`Backend::read_table`]) sees the writes queued before it, so nothing
//! queued is ever observable as stale. Writes are durable only after
//! [`Backend::drain`]; the address space drains at the end of every call
//! (or when a [`crate::lazy::LazyBatch`] ends).
//!
//! * [`native::Native`]: plain stores, invlpg / CR3 through a [`native::Tlb`].
//! * [`xen::XenPv`]: queued `mmu_update` requests drained in ordered batches.

pub mod cache;
pub mod native;
pub mod xen;

use core::ptr::NonNull;
use core::sync::atomic::AtomicU64;

use hypercall::XenError;

use crate::entry::{Entry, FlagError, Flags, Level};
use crate::phys::FrameWords;
use crate::types::{Mfn, Pfn, ENTRIES, ENTRY_FRAME_MASK};

pub use cache::{CacheEncoding, CacheMode};
pub use native::{CpuTlb, Native, NoTlb, Tlb};
pub use xen::{
    Alias, AliasMap, FlushTargets, NoAliases, RequestBuffer, XenPv, DEFAULT_BATCH, MAX_BATCH,
};

/// Which set of entry rules a backend enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Native x86-64 paging (bare metal, Xen PVH/HVM).
    Native,
    /// Xen PV: live tables change only through the hypervisor.
    XenPv,
}

/// What a backend asks of the engine above it. The address space, lazy
/// batches, the bootstrap and the invariant walker decide by these, never by
/// which backend they run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// A table must be pinned before it serves as a root, and unpinned
    /// before it is freed (PV).
    pub pins: bool,
    /// Live tables are read-only in every mapping (PV): a frame is sealed
    /// before it becomes a table and released after; no leaf may map a
    /// table frame writable, and the hypervisor refuses a write that would
    /// (so a change that makes pages writable can fail half-way).
    pub read_only_tables: bool,
    /// Live writes are queued requests, applied in batches by
    /// [`Backend::drain`] (PV): each one costs a request, so fewer live
    /// writes are cheaper. Otherwise a write is a plain store.
    pub batches: bool,
}

impl Caps {
    /// Native paging: stores, no pins, writable tables.
    pub const NATIVE: Caps = Caps {
        pins: false,
        read_only_tables: false,
        batches: false,
    };
    /// Xen PV: pinned roots, read-only tables, batched requests.
    pub const XEN_PV: Caps = Caps {
        pins: true,
        read_only_tables: true,
        batches: true,
    };
}

/// Largest page size the backend may use (natively from CPUID; never more
/// than 4 KiB under PV).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LargePages {
    /// 4 KiB pages only.
    None,
    /// 4 KiB and 2 MiB (PSE).
    Size2MiB,
    /// 4 KiB, 2 MiB and 1 GiB (CPUID pdpe1gb).
    Size1GiB,
}

/// Which TLB entries to invalidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlbScope {
    /// `pages` pages of 4 KiB from `start`.
    Range {
        /// First virtual address.
        start: u64,
        /// Number of 4 KiB pages.
        pages: u64,
    },
    /// Everything (non-global).
    All,
}

/// Invalidate page by page up to this many pages, then flush everything.
pub const INVLPG_LIMIT: u64 = 32;

/// Why a backend operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendError {
    /// The frame is not guest memory (no pointer, or no machine frame).
    BadFrame(Pfn),
    /// The flags break this backend's entry rules.
    Flags(FlagError),
    /// The hypervisor refused a queued entry write: `val` is the value that
    /// was refused (the requests before it were applied, those after it were
    /// dropped).
    Refused {
        /// Xen's error.
        error: XenError,
        /// Machine address of the refused entry.
        entry_maddr: u64,
        /// The refused value.
        val: u64,
    },
    /// The hypervisor refused an extended operation (pin, unpin, root
    /// switch, TLB flush).
    Hypervisor(XenError),
    /// A kernel alias of a table frame could not be found in the current
    /// tree (no current root is known).
    NoCurrentRoot,
}

/// The operations an address space needs from a page-table backend.
pub trait Backend {
    /// Which entry rules apply (for reports; the engine decides by
    /// [`Backend::caps`]).
    fn kind(&self) -> Kind;
    /// What this backend asks of the engine.
    fn caps(&self) -> Caps;
    /// Largest page size allowed.
    fn large_pages(&self) -> LargePages;
    /// A virtual range no mapping may touch (`[start, end)`): Xen's hole under
    /// PV.
    fn reserved(&self) -> Option<(u64, u64)>;
    /// Machine frame of `pfn`.
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn>;
    /// Guest frame of `mfn`, `None` if the guest does not own it.
    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn>;
    /// Pointer to the frame's contents (for private tables and reads).
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>>;

    /// The entry mapping `pfn` as a leaf at `level` with `flags` (L2/L3: a
    /// large page; PS is added here).
    fn leaf_entry(&self, level: Level, pfn: Pfn, flags: Flags) -> Result<Entry, BackendError>;
    /// Fills `out[k]` with the leaf entry for frame `first + k * step` at
    /// `level` with `flags` (a run of pages in one table). The flags are
    /// checked once per run (by [`Backend::leaf_entry`] on the first
    /// frame); each further frame only needs its machine frame. Backends
    /// may do better (natively the frames are contiguous).
    fn fill_leaves(
        &self,
        level: Level,
        first: Pfn,
        step: u64,
        flags: Flags,
        out: &mut [u64],
    ) -> Result<(), BackendError> {
        if out.is_empty() {
            return Ok(());
        }
        let bits = self.leaf_entry(level, first, flags)?.0 & !ENTRY_FRAME_MASK;
        for (k, slot) in out.iter_mut().enumerate() {
            let pfn = (k as u64)
                .checked_mul(step)
                .and_then(|d| first.0.checked_add(d))
                .map(Pfn)
                .ok_or(BackendError::BadFrame(first))?;
            let mfn = self.to_mfn(pfn).ok_or(BackendError::BadFrame(pfn))?;
            *slot = Entry::new(mfn, Flags::empty()).0 | bits;
        }
        Ok(())
    }
    /// The entry pointing at table frame `pfn`.
    fn table_entry(&self, pfn: Pfn) -> Result<Entry, BackendError>;
    /// The flags of a read-back entry as the guest asked for them.
    fn normalize(&self, flags: Flags) -> Flags;

    /// Entry `index` of table `table`, including queued writes.
    fn read(&self, table: Pfn, index: usize) -> Entry;
    /// All entries of `table`, including queued writes.
    fn read_table(&self, table: Pfn, out: &mut [u64; ENTRIES]);
    /// Calls `f(index, entry)` for every entry of `table`, including queued
    /// writes, without a 4 KiB buffer (the default reads entry by entry;
    /// backends resolve the frame once).
    fn scan_table(&self, table: Pfn, f: &mut dyn FnMut(usize, Entry)) {
        for i in 0..ENTRIES {
            f(i, self.read(table, i));
        }
    }
    /// Queues a write of entry `index` of live table `table` (draining first
    /// when the queue is full).
    fn write(&mut self, table: Pfn, index: usize, val: Entry) -> Result<(), BackendError>;
    /// Entry `index` of live table `table` as an atomic cell, where live
    /// entries may be changed by compare-and-exchange (natively: a plain
    /// 8-byte word the CPU's walker reads atomically); `None` where they
    /// change only through the hypervisor (PV). The engine uses it for
    /// [`crate::install`]'s protocol: CPA's leaf updates and splits.
    fn entry_cell(&self, table: Pfn, index: usize) -> Option<&AtomicU64> {
        let _ = (table, index);
        None
    }
    /// Writes queued and not yet applied.
    fn pending(&self) -> usize;
    /// Applies every queued write, in order.
    fn drain(&mut self) -> Result<(), BackendError>;

    /// Makes `pfn` an empty private table: zeroes it with plain stores while
    /// it is still writable.
    fn new_table(&mut self, pfn: Pfn) -> Result<(), BackendError>;
    /// Ends the private life of table `pfn`: after this (PV: queued, so in
    /// order before the write that hooks it) every kernel alias of the frame
    /// is read-only. No store into the frame may follow.
    fn seal_table(&mut self, pfn: Pfn) -> Result<(), BackendError>;
    /// Returns table `pfn` to plain memory: queued after the write that
    /// unhooked it, every kernel alias becomes writable again. The frame may
    /// be reused only after the next successful [`Backend::drain`] and a TLB
    /// flush.
    fn release_table(&mut self, pfn: Pfn) -> Result<(), BackendError>;
    /// Pins table `pfn` at `level` (drains first; natively a no-op).
    fn pin(&mut self, level: Level, pfn: Pfn) -> Result<(), BackendError>;
    /// Unpins table `pfn` (drains first; natively a no-op).
    fn unpin(&mut self, pfn: Pfn) -> Result<(), BackendError>;
    /// Makes `root` the current root (drains first).
    ///
    /// # Safety
    /// The new tree must map everything the running code needs (its code,
    /// stack and data) at the same addresses.
    unsafe fn switch_root(&mut self, root: Pfn) -> Result<(), BackendError>;
    /// Replaces the current root `old` by `root` for good: pins `root`,
    /// makes it current and unpins `old` (if given), after every queued write (PV: one
    /// `multicall` of the queued requests and the four extended operations,
    /// the user root cleared too; natively loads `root`). The bootstrap's
    /// step from the entry tree to its own.
    ///
    /// # Safety
    /// As [`Backend::switch_root`]; `old` is the current root and nothing
    /// uses it afterwards.
    unsafe fn replace_root(&mut self, root: Pfn, old: Option<Pfn>) -> Result<(), BackendError>;
    /// Invalidates TLB entries (drains first).
    fn flush_tlb(&mut self, scope: TlbScope) -> Result<(), BackendError>;
    /// Whether [`Backend::flush_cache`] works here, and so whether caching
    /// attributes may change: natively; under PV only with I/O privilege
    /// (Xen refuses both the attributes and the flush without it) and a
    /// known PAT.
    fn flushes_caches(&self) -> bool {
        false
    }
    /// The leaf bits of each cache mode under the PAT in force, `None`
    /// where caching attributes cannot change (see
    /// [`Backend::flushes_caches`]).
    fn cache_encoding(&self) -> Option<CacheEncoding> {
        None
    }
    /// Writes back and invalidates caches after a caching-attribute change:
    /// the range's lines, or everything. Backends that cannot refuse.
    fn flush_cache(&mut self, scope: TlbScope) -> Result<(), BackendError> {
        let _ = scope;
        Err(BackendError::Flags(
            crate::entry::FlagError::CacheAttributes,
        ))
    }
    /// After a caching change: the TLB flush `tlb`, then the cache flush
    /// `cache`, as one submission where the backend can (PV: one
    /// `mmuext_op` batch).
    fn flush_tlb_and_cache(&mut self, tlb: TlbScope, cache: TlbScope) -> Result<(), BackendError> {
        self.flush_tlb(tlb)?;
        self.flush_cache(cache)
    }
}
