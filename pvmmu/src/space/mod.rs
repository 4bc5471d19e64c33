//! The address space: map, unmap, protect and translate over ranges, on any
//! [`Backend`].
//!
//! Invariants:
//! * A range operation walks the tree once: each table on the way is read
//!   once per call and each L1 table's entries are handled in one pass (no
//!   per-page re-walk).
//! * A new table is private until its subtree is complete: it is zeroed and
//!   filled with plain stores, then sealed (PV: every alias read-only, in the
//!   queue) and only then hooked by one queued write into a live table.
//! * When a call returns, every write it queued has been applied (unless it
//!   runs inside a [`crate::lazy::LazyBatch`]).
//! * A call that fails leaves the mappings as they were and leaks no frame:
//!   leaves it wrote are cleared, tables it created are unhooked, released
//!   and returned to the allocator. Documented exceptions: an *empty* table
//!   that existed before inside the failed range is reclaimed too (pvmmu
//!   never leaves empty tables itself). A PV `protect` that makes pages
//!   writable over a range whose old flags differ page by page keeps the
//!   old entries in an undo log in frames borrowed from the allocator (one
//!   per 511 pages) for the length of the call.
//! * Tables that become empty on `unmap` are freed, after the unhooking
//!   writes are applied and the TLB is flushed.
//!
//! By concept: `slots` (how a range splits over the entries of a table,
//! and the per-leaf visit), `map`, `unmap`, `protect` (with its undo log),
//! `flush` (the owed-flush token, drains and lazy batching), `cpa`
//! (change_page_attr: attributes over a range, with splits), and `mapper`
//! (the `x86_64` traits). One `Request` carries a call from its checks
//! through the walk to its flush. The engine asks the backend's
//! [`crate::backend::Caps`], never which backend it is.

mod cpa;
mod error;
mod flush;
mod map;
mod mapper;
mod protect;
mod slots;
mod unmap;

pub use cpa::{
    CpaDone, CpaFast, CpaStats, Protected, SlowPath, StaticProtection, CLFLUSH_LIMIT, CPA_FLAGS,
    CPA_TEST_BIT, MAX_PROTECTIONS, MAX_SPLITS, MAX_STABLE, PAT_VALUE,
};
pub use error::Error;
pub use flush::Flush;

use crate::backend::{Backend, LargePages};
use crate::entry::{Entry, Flags, Level, HARDWARE_SET};
use crate::phys::FrameAllocator;
use crate::types::{Pfn, LOWER_HALF_LAST, PAGE_SIZE, UPPER_HALF};
use crate::walk::walk;

use map::{Hook, HOOK_LOG, NO_HOOK};
use unmap::FREE_LOG;

/// The page size of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Granule {
    /// 4 KiB, an L1 entry.
    Size4KiB,
    /// 2 MiB, an L2 entry with PS (natively only).
    Size2MiB,
    /// 1 GiB, an L3 entry with PS (natively only).
    Size1GiB,
}

impl Granule {
    /// Bytes in one page.
    pub const fn bytes(self) -> u64 {
        self.level().entry_span()
    }
    /// The level holding the leaf entry.
    pub const fn level(self) -> Level {
        match self {
            Self::Size4KiB => Level::L1,
            Self::Size2MiB => Level::L2,
            Self::Size1GiB => Level::L3,
        }
    }
    fn of_level(level: Level) -> Self {
        match level {
            Level::L3 => Self::Size1GiB,
            Level::L2 => Self::Size2MiB,
            _ => Self::Size4KiB,
        }
    }
}

/// What a virtual address translates to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The guest frame holding the address's byte (inside a large page: the
    /// 4 KiB frame at the right offset).
    pub pfn: Pfn,
    /// Byte offset within that 4 KiB frame.
    pub offset: u64,
    /// The leaf's flags as the guest asked for them (PS removed; PV: USER
    /// removed, see [`crate::entry::pv_normalize`]).
    pub flags: Flags,
    /// Size of the page mapping it.
    pub granule: Granule,
}

/// One range request, carried from the checks through the walk to the
/// flush (as Linux's `cpa_data` carries a `change_page_attr` request), so
/// the walk's steps take the request instead of its parts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    /// First address of the range.
    pub(crate) va: u64,
    /// Last address of the range (inclusive).
    pub(crate) last: u64,
    /// Frame mapped at `va` (map).
    pub(crate) pfn: u64,
    /// The new leaf flags (map, protect); the flags to set (CPA).
    pub(crate) flags: Flags,
    /// The flags to clear (CPA).
    pub(crate) clear: Flags,
    /// Level of the new leaves (map).
    pub(crate) leaf: Level,
    /// Last address mapped so far (map's rollback).
    pub(crate) done: Option<u64>,
}

impl Request {
    /// A request over `[va, last]`.
    fn new(va: u64, last: u64) -> Self {
        Self {
            va,
            last,
            pfn: 0,
            flags: Flags::empty(),
            clear: Flags::empty(),
            leaf: Level::L1,
            done: None,
        }
    }
    /// The frame mapped at `va` (inside the range, map).
    fn pfn_at(&self, va: u64) -> u64 {
        self.pfn + (va - self.va) / PAGE_SIZE
    }
    /// The flush the request owes when it changed mappings.
    fn flush(&self) -> Flush {
        Flush::range(self.va, self.last - self.va + 1)
    }
}

/// An address space: a root table and everything below it, edited through
/// backend `B`, with page-table frames from allocator `A`.
pub struct AddressSpace<B: Backend, A: FrameAllocator> {
    backend: B,
    alloc: A,
    root: Pfn,
    pinned: bool,
    lazy: u32,
    sticky: Option<Error>,
    hooks: [Hook; HOOK_LOG],
    nhooks: usize,
    freed: [Pfn; FREE_LOG],
    nfreed: usize,
    tables_created: u64,
    tables_freed: u64,
    /// Frames handed in for this call's tables (x86_64 `Mapper` calls).
    spare: [Pfn; 4],
    nspare: usize,
    /// Frames kept for CPA's splits.
    reserve: cpa::SplitReserve,
    cpa_stats: CpaStats,
    /// Frames CPA keeps their protection (kernel text, rodata, pages
    /// shared with the hypervisor).
    protections: [Option<StaticProtection>; MAX_PROTECTIONS],
    /// Ranges `unmap` refuses, where the lockless CPA path may walk.
    stable: [Option<(u64, u64)>; cpa::MAX_STABLE],
    /// Whether a lockless CPA handle was made (protections frozen).
    fast_issued: bool,
}

fn canonical(va: u64) -> bool {
    va <= LOWER_HALF_LAST || va >= UPPER_HALF
}

/// Validates `[va, va + len)` for pages of `granule` on `backend`; returns
/// the last address, or `None` for an empty range.
pub(crate) fn range_last<B: Backend>(
    backend: &B,
    va: u64,
    len: u64,
    granule: Granule,
) -> Result<Option<u64>, Error> {
    if !canonical(va) {
        return Err(Error::NonCanonical { va });
    }
    if va % granule.bytes() != 0 || len % granule.bytes() != 0 {
        return Err(Error::Misaligned);
    }
    if len == 0 {
        return Ok(None);
    }
    let last = va.checked_add(len - 1).ok_or(Error::RangeOverflow)?;
    if !canonical(last) || (va >> 47) != (last >> 47) {
        return Err(Error::NonCanonical { va: last });
    }
    if let Some((start, end)) = backend.reserved() {
        if va < end && last >= start {
            return Err(Error::XenHole);
        }
    }
    Ok(Some(last))
}

/// The W^X rule, in one place: writable without NO_EXECUTE needs consent.
pub(crate) fn check_wx(flags: Flags, allow_wx: bool) -> Result<(), Error> {
    if flags.contains(Flags::WRITABLE) && !flags.contains(Flags::NO_EXECUTE) && !allow_wx {
        return Err(Error::WriteExecute);
    }
    Ok(())
}

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
    /// A new, empty address space: allocates and prepares a root table
    /// (sealed, and pinned as an L4 where the backend pins, so it can be
    /// switched to).
    pub fn new(mut backend: B, mut alloc: A) -> Result<Self, (Error, B, A)> {
        let Some(root) = alloc.allocate() else {
            return Err((Error::OutOfFrames, backend, alloc));
        };
        let pins = backend.caps().pins;
        let prepared = backend
            .new_table(root)
            .and_then(|()| backend.seal_table(root))
            .and_then(|()| backend.drain())
            .and_then(|()| {
                if pins {
                    backend.pin(Level::L4, root)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = prepared {
            // Best effort: give the frame its writable alias back.
            let _ = backend.release_table(root).and_then(|()| backend.drain());
            alloc.free(root);
            return Err((e.into(), backend, alloc));
        }
        Ok(Self::assemble(backend, alloc, root, pins))
    }

    /// Adopts an existing tree rooted at `root` (e.g. built by the
    /// bootstrap). `pinned` says whether the root is pinned (PV).
    ///
    /// # Safety
    /// `root` must be a valid L4 for this backend (under PV: a validated,
    /// pinned L4 if `pinned`), whose tables this address space may edit and
    /// free (their frames go to `alloc` when they become empty).
    pub unsafe fn from_root(backend: B, alloc: A, root: Pfn, pinned: bool) -> Self {
        Self::assemble(backend, alloc, root, pinned)
    }

    fn assemble(backend: B, alloc: A, root: Pfn, pinned: bool) -> Self {
        Self {
            backend,
            alloc,
            root,
            pinned,
            lazy: 0,
            sticky: None,
            hooks: [NO_HOOK; HOOK_LOG],
            nhooks: 0,
            freed: [Pfn(0); FREE_LOG],
            nfreed: 0,
            tables_created: 0,
            tables_freed: 0,
            spare: [Pfn(0); 4],
            nspare: 0,
            reserve: cpa::SplitReserve::EMPTY,
            cpa_stats: CpaStats {
                calls: 0,
                refused: 0,
                splits: 0,
                joined: 0,
                lost: 0,
                flush_pages: 0,
                flush_all: 0,
                cache_lines: 0,
                cache_all: 0,
            },
            protections: [None; MAX_PROTECTIONS],
            stable: [None; cpa::MAX_STABLE],
            fast_issued: false,
        }
    }

    /// The root table.
    pub fn root(&self) -> Pfn {
        self.root
    }
    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// The backend, mutably (raw entry access: bypasses the address space's
    /// bookkeeping; drain the space first).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }
    /// The frame allocator.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }
    /// The frame allocator, mutably.
    pub fn allocator_mut(&mut self) -> &mut A {
        &mut self.alloc
    }
    /// Tables this space allocated and freed so far.
    pub fn table_counts(&self) -> (u64, u64) {
        (self.tables_created, self.tables_freed)
    }

    /// What `va` translates to (sees queued writes). Named `lookup` so that
    /// it does not hide the `x86_64` `Translate::translate` this type also
    /// implements.
    pub fn lookup(&self, va: u64) -> Result<Translation, Error> {
        if !canonical(va) {
            return Err(Error::NonCanonical { va });
        }
        let found =
            walk(&self.backend, self.root, va, Level::L1).map_err(|e| Error::from_walk(e, va))?;
        if !found.is_leaf() {
            return Err(Error::NotMapped { va });
        }
        let t = self.leaf_translation(found.level, found.entry)?;
        let within = va & (t.granule.bytes() - 1);
        Ok(Translation {
            pfn: Pfn(t.pfn.0 + within / PAGE_SIZE),
            offset: va & (PAGE_SIZE - 1),
            ..t
        })
    }

    /// What a leaf entry translates to at its first byte.
    pub(crate) fn leaf_translation(&self, level: Level, e: Entry) -> Result<Translation, Error> {
        Ok(Translation {
            pfn: self.leaf_frame(level, e)?,
            offset: 0,
            flags: self
                .backend
                .normalize(e.flags() - Flags::HUGE_PAGE - HARDWARE_SET),
            granule: Granule::of_level(level),
        })
    }

    /// Makes this tree the current one (PV: `MMUEXT_NEW_BASEPTR` of the
    /// pinned root; natively CR3 through the backend's TLB hook).
    ///
    /// # Safety
    /// The tree must map everything the running code uses at the same
    /// addresses.
    pub unsafe fn activate(&mut self) -> Result<(), Error> {
        self.drain()?;
        // SAFETY: forwarded contract.
        unsafe { self.backend.switch_root(self.root) }.map_err(Error::from)
    }

    /// Unmaps everything outside the reserved range, frees every table and
    /// the root (unpinned first where pinned), and returns the backend and
    /// allocator. The tree must not be the current one. On failure the
    /// space is handed back (it is large, but the caller owns it: no
    /// allocation here).
    #[allow(clippy::result_large_err)]
    pub fn destroy(mut self) -> Result<(B, A), (Error, Self)> {
        let lower = (0, LOWER_HALF_LAST);
        let upper = (UPPER_HALF, u64::MAX);
        let mut r = Ok(());
        for (start, last) in [lower, upper] {
            r = r.and_then(|()| self.scrub(start, last));
        }
        let r = r
            .and_then(|()| self.settle())
            .and_then(|()| self.finish_frees())
            .and_then(|()| {
                if self.pinned {
                    self.backend.unpin(self.root)?;
                }
                self.backend.release_table(self.root)?;
                self.backend.drain()?;
                Ok(())
            });
        match r {
            Ok(()) => {
                self.cpa_drain_reserve();
                self.alloc.free(self.root);
                Ok((self.backend, self.alloc))
            }
            Err(e) => Err((e, self)),
        }
    }

    // ---- checks ------------------------------------------------------------

    pub(crate) fn set_sticky(&mut self, e: Error) {
        self.sticky.get_or_insert(e);
    }

    fn take_sticky(&mut self) -> Result<(), Error> {
        match self.sticky.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The checks every range call starts with: a failure kept by a lazy
    /// batch, then the range; `None` for an empty range.
    pub(crate) fn checked_range(&mut self, va: u64, len: u64) -> Result<Option<u64>, Error> {
        self.take_sticky()?;
        self.check_range(va, len, Granule::Size4KiB)
    }

    /// Validates `[va, va + len)` for pages of `granule`; returns the last
    /// address, or `None` for an empty range.
    fn check_range(&self, va: u64, len: u64, granule: Granule) -> Result<Option<u64>, Error> {
        range_last(&self.backend, va, len, granule)
    }

    /// Whether pages of `granule` may be mapped here.
    fn granule_allowed(&self, granule: Granule) -> bool {
        match granule {
            Granule::Size4KiB => true,
            Granule::Size2MiB => self.backend.large_pages() >= LargePages::Size2MiB,
            Granule::Size1GiB => self.backend.large_pages() >= LargePages::Size1GiB,
        }
    }

    /// The guest frame a table entry points to (or a 4 KiB leaf maps).
    fn child_of(&self, e: Entry) -> Result<Pfn, Error> {
        self.backend
            .to_pfn(e.mfn())
            .ok_or(Error::ForeignFrame(e.mfn()))
    }

    /// The first guest frame a leaf at `level` maps (a large leaf's PAT bit
    /// is not part of its frame).
    fn leaf_frame(&self, level: Level, e: Entry) -> Result<Pfn, Error> {
        let mfn = e.leaf_mfn(level);
        self.backend.to_pfn(mfn).ok_or(Error::ForeignFrame(mfn))
    }
}
