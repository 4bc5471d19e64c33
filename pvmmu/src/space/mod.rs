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

mod error;
mod mapper;

pub use error::Error;

use crate::backend::{Backend, Kind, LargePages, TlbScope};
use crate::entry::{Entry, Flags, Level, HARDWARE_SET};
use crate::phys::FrameAllocator;
use crate::types::{Pfn, ENTRIES, PAGE_SIZE};

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
        match self {
            Self::Size4KiB => 1 << 12,
            Self::Size2MiB => 1 << 21,
            Self::Size1GiB => 1 << 30,
        }
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

/// A TLB flush owed for pages whose mapping changed. Hand it to
/// [`AddressSpace::flush`] or drop it explicitly with [`Flush::ignore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "changed mappings may still be cached in the TLB: flush or ignore"]
pub struct Flush {
    start: u64,
    pages: u64,
}

impl Flush {
    /// Nothing to flush.
    pub const fn none() -> Self {
        Self { start: 0, pages: 0 }
    }
    pub(crate) fn range_of(start: u64, bytes: u64) -> Self {
        Self::range(start, bytes)
    }
    fn range(start: u64, bytes: u64) -> Self {
        Self {
            start,
            pages: bytes / PAGE_SIZE,
        }
    }
    /// 4 KiB pages covered (0: nothing owed).
    pub const fn pages(&self) -> u64 {
        self.pages
    }
    /// First address covered.
    pub const fn start(&self) -> u64 {
        self.start
    }
    /// Declares the flush unnecessary (e.g. the tables are not in use).
    pub fn ignore(self) {}
    /// One flush covering both.
    pub fn merge(self, other: Flush) -> Flush {
        if self.pages == 0 {
            return other;
        }
        if other.pages == 0 {
            return self;
        }
        let start = self.start.min(other.start);
        let end = (self.start + (self.pages - 1) * PAGE_SIZE)
            .max(other.start + (other.pages - 1) * PAGE_SIZE);
        Flush {
            start,
            pages: (end - start) / PAGE_SIZE + 1,
        }
    }
}

/// Hooks of new subtrees queued since the last drain (what must be undone
/// if a drain fails).
const HOOK_LOG: usize = 64;
/// Freed tables waiting for their unhooking writes and a TLB flush.
const FREE_LOG: usize = 1024;

#[derive(Clone, Copy)]
struct Hook {
    child: Pfn,
    parent: Pfn,
    index: u16,
    level: Level,
}

const NO_HOOK: Hook = Hook {
    child: Pfn(0),
    parent: Pfn(0),
    index: 0,
    level: Level::L1,
};

/// One map request walking down the tree.
struct MapOp {
    va0: u64,
    pfn0: u64,
    flags: Flags,
    leaf: Level,
    /// Last address mapped so far.
    done: Option<u64>,
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
}

fn canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == 0x1_ffff
}

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
    /// A new, empty address space: allocates and prepares a root table
    /// (under PV: sealed and pinned as an L4, so it can be switched to).
    pub fn new(mut backend: B, mut alloc: A) -> Result<Self, (Error, B, A)> {
        let Some(root) = alloc.allocate() else {
            return Err((Error::OutOfFrames, backend, alloc));
        };
        let pv = backend.kind() == Kind::XenPv;
        let prepared = backend
            .new_table(root)
            .and_then(|()| backend.seal_table(root))
            .and_then(|()| backend.drain())
            .and_then(|()| {
                if pv {
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
        Ok(Self::assemble(backend, alloc, root, pv))
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

    // ---- public operations -------------------------------------------------

    /// Maps `len` bytes at `va` to the frames from `pfn` on, with 4 KiB
    /// pages. `flags` must include PRESENT; WRITABLE without NO_EXECUTE is
    /// refused ([`Error::WriteExecute`]; see [`AddressSpace::map_wx`]).
    pub fn map(&mut self, va: u64, pfn: Pfn, len: u64, flags: Flags) -> Result<Flush, Error> {
        self.map_sized(va, pfn, len, flags, Granule::Size4KiB, false)
    }

    /// As [`AddressSpace::map`], with explicit consent to writable and
    /// executable pages.
    pub fn map_wx(&mut self, va: u64, pfn: Pfn, len: u64, flags: Flags) -> Result<Flush, Error> {
        self.map_sized(va, pfn, len, flags, Granule::Size4KiB, true)
    }

    /// Maps with pages of `granule` (2 MiB / 1 GiB natively when the backend
    /// allows them; under PV only 4 KiB). `allow_wx` is the consent to
    /// writable and executable pages.
    pub fn map_sized(
        &mut self,
        va: u64,
        pfn: Pfn,
        len: u64,
        flags: Flags,
        granule: Granule,
        allow_wx: bool,
    ) -> Result<Flush, Error> {
        self.take_sticky()?;
        let Some(last) = self.check_range(va, len, granule)? else {
            return Ok(Flush::none());
        };
        let allowed = match granule {
            Granule::Size4KiB => true,
            Granule::Size2MiB => self.backend.large_pages() >= LargePages::Size2MiB,
            Granule::Size1GiB => self.backend.large_pages() >= LargePages::Size1GiB,
        };
        if !allowed {
            return Err(Error::LargePagesUnavailable);
        }
        let phys = pfn.0.checked_mul(PAGE_SIZE).ok_or(Error::RangeOverflow)?;
        if phys % granule.bytes() != 0 {
            return Err(Error::Misaligned);
        }
        let frames_end = pfn.0.checked_add(len / PAGE_SIZE);
        if frames_end.and_then(|e| e.checked_mul(PAGE_SIZE)).is_none() {
            return Err(Error::RangeOverflow);
        }
        if flags.contains(Flags::WRITABLE) && !flags.contains(Flags::NO_EXECUTE) && !allow_wx {
            return Err(Error::WriteExecute);
        }
        // Validate the flags once, against the first frame (the per-page
        // encoding re-checks the frame).
        self.backend.leaf_entry(granule.level(), pfn, flags)?;
        let mut op = MapOp {
            va0: va,
            pfn0: pfn.0,
            flags,
            leaf: granule.level(),
            done: None,
        };
        self.nhooks = 0;
        let root = self.root;
        let result = self
            .map_table(root, Level::L4, false, va, last, &mut op)
            .and_then(|()| self.settle());
        match result {
            Ok(()) => Ok(Flush::range(va, len)),
            Err(e) => {
                self.rollback_map(va, op.done);
                Err(e)
            }
        }
    }

    /// Unmaps `len` bytes at `va`; every page must be mapped (else
    /// [`Error::NotMapped`], nothing changed) and large pages must be
    /// covered whole. Tables that become empty are freed (after a TLB flush
    /// of everything, so the returned token is then empty).
    pub fn unmap(&mut self, va: u64, len: u64) -> Result<Flush, Error> {
        self.take_sticky()?;
        let Some(last) = self.check_range(va, len, Granule::Size4KiB)? else {
            return Ok(Flush::none());
        };
        self.check_mapped(self.root, Level::L4, va, last)?;
        let root = self.root;
        let result = self.unmap_table(root, Level::L4, va, last).map(|_| ());
        let flushed = self.nfreed > 0;
        // Freed tables: their flush submits the queue with it.
        let result = result.and_then(|()| {
            if flushed {
                self.finish_frees()
            } else {
                self.settle()
            }
        });
        match result {
            Ok(()) if flushed => Ok(Flush::none()),
            Ok(()) => Ok(Flush::range(va, len)),
            Err(e) => Err(e),
        }
    }

    /// Sets the leaf flags of every page in `len` bytes at `va` (every page
    /// must be mapped; large pages covered whole). WRITABLE without
    /// NO_EXECUTE is refused unless `allow_wx`.
    pub fn protect(
        &mut self,
        va: u64,
        len: u64,
        flags: Flags,
        allow_wx: bool,
    ) -> Result<Flush, Error> {
        self.take_sticky()?;
        let Some(last) = self.check_range(va, len, Granule::Size4KiB)? else {
            return Ok(Flush::none());
        };
        if flags.contains(Flags::WRITABLE) && !flags.contains(Flags::NO_EXECUTE) && !allow_wx {
            return Err(Error::WriteExecute);
        }
        let mut uniform = Uniform::Unknown;
        self.check_protect(self.root, Level::L4, va, last, flags, &mut uniform)?;
        let root = self.root;
        // Under PV, Xen may refuse a page made writable (a page-table
        // frame). To undo exactly when the old flags differ page by page,
        // the old entries go to an undo log in borrowed frames first.
        let refusable = self.backend.kind() == Kind::XenPv && flags.contains(Flags::WRITABLE);
        let mut log = UndoLog::default();
        if refusable && matches!(uniform, Uniform::Mixed) {
            let recorded =
                self.visit_leaves(root, Level::L4, va, last, &mut |space, _, _, _, _, e| {
                    space.undo_push(&mut log, e.0)
                });
            if let Err(e) = recorded {
                self.undo_free(log);
                return Err(e);
            }
        }
        let result = self
            .protect_table(root, Level::L4, va, last, flags)
            .and_then(|()| {
                // With an undo log the outcome must be known now.
                if log.head.is_some() {
                    self.drain()
                } else {
                    self.settle()
                }
            });
        let result = match result {
            Ok(()) => Ok(Flush::range(va, len)),
            Err(e) => {
                let _ = self.backend.drain();
                match uniform {
                    Uniform::Same(old) => {
                        let _ = self
                            .protect_table(root, Level::L4, va, last, old)
                            .and_then(|()| self.backend.drain().map_err(Error::from));
                    }
                    _ if log.head.is_some() => {
                        let _ = self.undo_restore(&log, va, last);
                    }
                    _ => {}
                }
                Err(e)
            }
        };
        self.undo_free(log);
        result
    }

    /// What `va` translates to (sees queued writes).
    pub fn translate(&self, va: u64) -> Result<Translation, Error> {
        if !canonical(va) {
            return Err(Error::NonCanonical { va });
        }
        let mut table = self.root;
        let mut level = Level::L4;
        loop {
            let e = self.backend.read(table, level.index(va));
            if !e.is_present() {
                return Err(Error::NotMapped { va });
            }
            let leaf = level == Level::L1
                || (level != Level::L4 && e.is_huge() && self.backend.kind() == Kind::Native);
            let pfn = self
                .backend
                .to_pfn(e.mfn())
                .ok_or(Error::ForeignFrame(e.mfn()))?;
            if leaf {
                let granule = Granule::of_level(level);
                let within = va & (granule.bytes() - 1);
                return Ok(Translation {
                    pfn: Pfn(pfn.0 + within / PAGE_SIZE),
                    offset: va & (PAGE_SIZE - 1),
                    flags: self.backend.normalize(e.flags() - Flags::HUGE_PAGE),
                    granule,
                });
            }
            table = pfn;
            level = match level.lower() {
                Some(l) => l,
                None => return Err(Error::NotMapped { va }),
            };
        }
    }

    /// Performs a flush owed by an earlier call (applies queued writes
    /// first).
    pub fn flush(&mut self, flush: Flush) -> Result<(), Error> {
        if flush.pages == 0 {
            return self.settle();
        }
        let r = self.backend.flush_tlb(TlbScope::Range {
            start: flush.start,
            pages: flush.pages,
        });
        self.after_submit(r.map_err(Error::from))
    }

    /// Applies every queued write now. If Xen refuses one, the requests
    /// before it stay applied (a lazy batch's documented limit) and new
    /// subtrees whose hook was dropped are freed.
    pub fn drain(&mut self) -> Result<(), Error> {
        let r = self.backend.drain().map_err(Error::from);
        self.after_submit(r)
    }

    fn after_submit(&mut self, r: Result<(), Error>) -> Result<(), Error> {
        match r {
            Ok(()) => self.nhooks = 0,
            Err(_) => self.reclaim_lost_hooks(),
        }
        r
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
    /// the root (PV: unpinned first), and returns the backend and allocator.
    /// The tree must not be the current one. On failure the space is handed
    /// back (it is large, but the caller owns it: no allocation here).
    #[allow(clippy::result_large_err)]
    pub fn destroy(mut self) -> Result<(B, A), (Error, Self)> {
        let lower = (0, 0x0000_7fff_ffff_ffff);
        let upper = (0xffff_8000_0000_0000, u64::MAX);
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
                self.alloc.free(self.root);
                Ok((self.backend, self.alloc))
            }
            Err(e) => Err((e, self)),
        }
    }

    // ---- lazy batching (crate::lazy) ---------------------------------------

    pub(crate) fn enter_lazy(&mut self) {
        self.lazy += 1;
    }

    pub(crate) fn leave_lazy(&mut self) -> Result<(), Error> {
        self.lazy = self.lazy.saturating_sub(1);
        if self.lazy == 0 {
            let r = self.drain();
            if let Err(e) = r {
                self.reclaim_lost_hooks();
                return Err(e);
            }
        }
        Ok(())
    }

    pub(crate) fn set_sticky(&mut self, e: Error) {
        self.sticky.get_or_insert(e);
    }

    fn take_sticky(&mut self) -> Result<(), Error> {
        match self.sticky.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    // ---- checks ------------------------------------------------------------

    /// Validates `[va, va + len)` for pages of `granule`; returns the last
    /// address, or `None` for an empty range.
    fn check_range(&self, va: u64, len: u64, granule: Granule) -> Result<Option<u64>, Error> {
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
        if let Some((start, end)) = self.backend.reserved() {
            if va < end && last >= start {
                return Err(Error::XenHole);
            }
        }
        Ok(Some(last))
    }

    fn child_of(&self, e: Entry) -> Result<Pfn, Error> {
        self.backend
            .to_pfn(e.mfn())
            .ok_or(Error::ForeignFrame(e.mfn()))
    }

    fn is_leaf(&self, level: Level, e: Entry) -> bool {
        level == Level::L1
            || (level != Level::L4 && e.is_huge() && self.backend.kind() == Kind::Native)
    }

    /// Read-only pass: every page of `[start, last]` is mapped and large
    /// pages are covered whole.
    fn check_mapped(&self, table: Pfn, level: Level, start: u64, last: u64) -> Result<(), Error> {
        self.check_protect(
            table,
            level,
            start,
            last,
            Flags::empty(),
            &mut Uniform::Skip,
        )
    }

    fn check_protect(
        &self,
        table: Pfn,
        level: Level,
        start: u64,
        last: u64,
        flags: Flags,
        uniform: &mut Uniform,
    ) -> Result<(), Error> {
        if level == Level::L1 {
            return self.check_l1(table, start, last, flags, uniform);
        }
        self.check_entries(level, start, last, flags, uniform, &|i| {
            self.backend.read(table, i)
        })
    }

    /// The L1 step of the check: one snapshot of the table (kept out of the
    /// upper levels' stack frames).
    #[inline(never)]
    fn check_l1(
        &self,
        table: Pfn,
        start: u64,
        last: u64,
        flags: Flags,
        uniform: &mut Uniform,
    ) -> Result<(), Error> {
        let mut entries = [0u64; ENTRIES];
        self.backend.read_table(table, &mut entries);
        if matches!(uniform, Uniform::Skip) {
            // Fast path of unmap's check: every entry present.
            let first = Level::L1.index(start);
            let run = &entries[first..=Level::L1.index(last)];
            return match run.iter().position(|&raw| !Entry(raw).is_present()) {
                Some(k) => Err(Error::NotMapped {
                    va: start + k as u64 * PAGE_SIZE,
                }),
                None => Ok(()),
            };
        }
        self.check_entries(Level::L1, start, last, flags, uniform, &|i| {
            Entry(entries[i])
        })
    }

    fn check_entries(
        &self,
        level: Level,
        start: u64,
        last: u64,
        flags: Flags,
        uniform: &mut Uniform,
        read: &dyn Fn(usize) -> Entry,
    ) -> Result<(), Error> {
        for_each_entry(level, start, last, |i, s, l, whole| {
            let e = read(i);
            if !e.is_present() {
                return Err(Error::NotMapped { va: s });
            }
            if self.is_leaf(level, e) {
                if !whole {
                    return Err(Error::SplitsLargePage {
                        va: s & !(level.entry_span() - 1),
                    });
                }
                if !matches!(uniform, Uniform::Skip) {
                    let pfn = self.child_of(e)?;
                    self.backend.leaf_entry(level, pfn, flags)?;
                    let old = self
                        .backend
                        .normalize(e.flags() - Flags::HUGE_PAGE - HARDWARE_SET);
                    uniform.see(old);
                }
                Ok(())
            } else {
                let child = self.child_of(e)?;
                let lower = level.lower().ok_or(Error::NotMapped { va: s })?;
                self.check_protect(child, lower, s, l, flags, uniform)
            }
        })
    }

    // ---- map ---------------------------------------------------------------

    fn map_table(
        &mut self,
        table: Pfn,
        level: Level,
        private: bool,
        start: u64,
        last: u64,
        op: &mut MapOp,
    ) -> Result<(), Error> {
        let Some(lower) = level.lower().filter(|_| level != op.leaf) else {
            return self.map_leaves(table, level, private, start, last, op);
        };
        for Slot {
            index: i,
            first: s,
            last: l,
            ..
        } in slots(level, start, last)
        {
            let e = if private {
                Entry::EMPTY
            } else {
                self.backend.read(table, i)
            };
            if e.is_present() {
                if self.is_leaf(level, e) {
                    return Err(Error::AlreadyMapped { va: s });
                }
                let child = self.child_of(e)?;
                self.map_table(child, lower, false, s, l, op)?;
                continue;
            }
            let child = self.allocate_table().ok_or(Error::OutOfFrames)?;
            if let Err(e) = self.backend.new_table(child) {
                self.alloc.free(child);
                return Err(e.into());
            }
            self.tables_created += 1;
            let built = self
                .map_table(child, lower, true, s, l, op)
                .and_then(|()| self.backend.seal_table(child).map_err(Error::from))
                .and_then(|()| self.backend.table_entry(child).map_err(Error::from));
            let te = match built {
                Ok(te) => te,
                Err(err) => {
                    self.discard(child, lower);
                    return Err(err);
                }
            };
            if private {
                self.store_private(table, i, te)?;
            } else {
                if self.nhooks == HOOK_LOG {
                    if let Err(err) = self.drain() {
                        self.discard(child, lower);
                        return Err(err);
                    }
                }
                if let Err(err) = self.backend.write(table, i, te) {
                    self.discard(child, lower);
                    return Err(err.into());
                }
                self.hooks[self.nhooks] = Hook {
                    child,
                    parent: table,
                    index: i as u16,
                    level: lower,
                };
                self.nhooks += 1;
            }
        }
        Ok(())
    }

    fn map_leaves(
        &mut self,
        table: Pfn,
        level: Level,
        private: bool,
        start: u64,
        last: u64,
        op: &mut MapOp,
    ) -> Result<(), Error> {
        let span = level.entry_span();
        let first = level.index(start);
        let n = level.index(last) - first + 1;
        let pfn_first = op.pfn0 + (start - op.va0) / PAGE_SIZE;
        let step = span / PAGE_SIZE;
        if private {
            let frame = self
                .backend
                .frame_ptr(table)
                .ok_or(Error::BadFrame(table))?;
            // SAFETY: `table` is private (allocated and zeroed in this call,
            // not yet sealed), so nothing else reads or writes it and plain
            // stores are allowed; `first + n <= 512` keeps the slice inside
            // the frame.
            let words = unsafe { &mut (&mut *frame.as_ptr())[first..first + n] };
            self.backend
                .fill_leaves(level, Pfn(pfn_first), step, op.flags, words)?;
            op.done = Some(last);
            return Ok(());
        }
        self.map_live_leaves(table, level, first, n, start, pfn_first, step, op)
    }

    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn map_live_leaves(
        &mut self,
        table: Pfn,
        level: Level,
        first: usize,
        n: usize,
        start: u64,
        pfn_first: u64,
        step: u64,
        op: &mut MapOp,
    ) -> Result<(), Error> {
        let span = level.entry_span();
        let mut entries = [0u64; ENTRIES];
        self.backend.read_table(table, &mut entries);
        for k in 0..n {
            let i = first + k;
            let va = start + k as u64 * span;
            if Entry(entries[i]).is_present() {
                return Err(Error::AlreadyMapped { va });
            }
            let e = self
                .backend
                .leaf_entry(level, Pfn(pfn_first + k as u64 * step), op.flags)?;
            self.backend.write(table, i, e)?;
            op.done = Some(va + span - 1);
        }
        Ok(())
    }

    fn allocate_table(&mut self) -> Option<Pfn> {
        if self.nspare > 0 {
            self.nspare -= 1;
            return Some(self.spare[self.nspare]);
        }
        self.alloc.allocate()
    }

    pub(crate) fn push_spare(&mut self, pfn: Pfn) {
        if self.nspare < self.spare.len() {
            self.spare[self.nspare] = pfn;
            self.nspare += 1;
        } else {
            self.alloc.free(pfn);
        }
    }

    pub(crate) fn return_spares(&mut self) {
        while self.nspare > 0 {
            self.nspare -= 1;
            self.alloc.free(self.spare[self.nspare]);
        }
    }

    fn store_private(&mut self, table: Pfn, index: usize, e: Entry) -> Result<(), Error> {
        let frame = self
            .backend
            .frame_ptr(table)
            .ok_or(Error::BadFrame(table))?;
        // SAFETY: `table` is private to the running call (zeroed, not
        // sealed), so a plain store is allowed; the index is masked.
        unsafe {
            frame
                .as_ptr()
                .cast::<u64>()
                .add(index & (ENTRIES - 1))
                .write(e.0)
        };
        Ok(())
    }

    /// Frees an unreachable subtree this call built (children first).
    fn discard(&mut self, table: Pfn, level: Level) {
        if let Some(lower) = level.lower() {
            for i in 0..ENTRIES {
                let e = self.backend.read(table, i);
                if e.is_present() && !self.is_leaf(level, e) {
                    if let Ok(child) = self.child_of(e) {
                        self.discard(child, lower);
                    }
                }
            }
        }
        // Its aliases may have been made read-only by a seal already queued
        // or applied: make them writable again before reuse.
        let released = self
            .backend
            .release_table(table)
            .and_then(|()| self.backend.drain());
        if released.is_ok() {
            self.alloc.free(table);
            self.tables_freed += 1;
        }
    }

    /// After a failed drain: subtrees whose hook never landed are
    /// unreachable; free them (newest first).
    fn reclaim_lost_hooks(&mut self) {
        while self.nhooks > 0 {
            self.nhooks -= 1;
            let h = self.hooks[self.nhooks];
            let landed = self
                .backend
                .table_entry(h.child)
                .map(|te| self.backend.read(h.parent, h.index as usize).mfn() == te.mfn())
                .unwrap_or(false);
            if !landed {
                self.discard(h.child, h.level);
            }
        }
    }

    fn rollback_map(&mut self, va: u64, done: Option<u64>) {
        // Make the state concrete: apply what is queued (a refusal drops the
        // rest), then free subtrees whose hook did not land.
        // A hook is checked against memory, so hooks that landed (in this
        // drain or an earlier one) are left alone.
        let _ = self.backend.drain();
        self.reclaim_lost_hooks();
        if let Some(last) = done {
            let _ = self.scrub(va, last);
        }
        let _ = self.settle();
        let _ = self.finish_frees();
    }

    // ---- unmap -------------------------------------------------------------

    /// Clears present leaves in `[start, last]` and frees tables that became
    /// empty (tolerates holes).
    fn scrub(&mut self, start: u64, last: u64) -> Result<(), Error> {
        let root = self.root;
        self.unmap_table(root, Level::L4, start, last).map(|_| ())
    }

    /// Returns whether `table` is empty afterwards.
    fn unmap_table(
        &mut self,
        table: Pfn,
        level: Level,
        start: u64,
        last: u64,
    ) -> Result<bool, Error> {
        if level == Level::L1 {
            return self.unmap_l1(table, start, last);
        }
        let span = level.entry_span();
        let base = start & !(span * ENTRIES as u64 - 1);
        let reserved = self.backend.reserved();
        for Slot {
            index: i,
            base: e_base,
            first: s,
            last: l,
            ..
        } in slots(level, start, last)
        {
            if let Some((rs, re)) = reserved {
                if s < re && l >= rs {
                    continue;
                }
            }
            let e = self.backend.read(table, i);
            if !e.is_present() {
                continue;
            }
            if self.is_leaf(level, e) {
                if s == e_base && l == e_base | (span - 1) {
                    self.backend.write(table, i, Entry::EMPTY)?;
                }
                continue;
            }
            let (Ok(child), Some(lower)) = (self.child_of(e), level.lower()) else {
                continue;
            };
            // A subtree covered whole is unhooked with one write (Xen drops
            // the types of the whole subtree); its leaves are not cleared
            // one by one.
            let whole = s == e_base && l == e_base | (span - 1);
            if whole || self.unmap_table(child, lower, s, l)? {
                self.backend.write(table, i, Entry::EMPTY)?;
                self.release_subtree(child, lower)?;
            }
        }
        if level == Level::L4 {
            return Ok(false);
        }
        if start == base && last == base | (span * ENTRIES as u64 - 1) {
            return Ok(true);
        }
        let mut empty = true;
        self.backend
            .scan_table(table, &mut |_, e| empty &= e.is_empty());
        Ok(empty)
    }

    /// The L1 step of unmap: one snapshot, leaves cleared in one pass.
    #[inline(never)]
    fn unmap_l1(&mut self, table: Pfn, start: u64, last: u64) -> Result<bool, Error> {
        let mut entries = [0u64; ENTRIES];
        self.backend.read_table(table, &mut entries);
        let (first, end) = (Level::L1.index(start), Level::L1.index(last));
        for (i, raw) in entries.iter_mut().enumerate().take(end + 1).skip(first) {
            if Entry(*raw).is_present() {
                self.backend.write(table, i, Entry::EMPTY)?;
            }
            *raw = 0;
        }
        Ok(entries.iter().all(|&raw| raw == 0))
    }

    /// Queues the release of an unhooked subtree (after the unhooking write)
    /// and records its frames for freeing.
    fn release_subtree(&mut self, table: Pfn, level: Level) -> Result<(), Error> {
        if let Some(lower) = level.lower() {
            for i in 0..ENTRIES {
                let e = self.backend.read(table, i);
                if e.is_present() && !self.is_leaf(level, e) {
                    if let Ok(child) = self.child_of(e) {
                        self.release_subtree(child, lower)?;
                    }
                }
            }
        }
        self.backend.release_table(table)?;
        if self.nfreed == FREE_LOG {
            self.finish_frees()?;
        }
        self.freed[self.nfreed] = table;
        self.nfreed += 1;
        Ok(())
    }

    /// Applies the unhooking writes, flushes the TLB and returns freed
    /// tables to the allocator.
    fn finish_frees(&mut self) -> Result<(), Error> {
        if self.nfreed == 0 {
            return Ok(());
        }
        // One submission: the queued unhooks and releases, then the flush.
        self.backend.flush_tlb(TlbScope::All)?;
        self.nhooks = 0;
        for k in 0..self.nfreed {
            self.alloc.free(self.freed[k]);
        }
        self.tables_freed += self.nfreed as u64;
        self.nfreed = 0;
        Ok(())
    }

    // ---- protect -----------------------------------------------------------

    fn protect_table(
        &mut self,
        table: Pfn,
        level: Level,
        start: u64,
        last: u64,
        flags: Flags,
    ) -> Result<(), Error> {
        if level == Level::L1 {
            return self.protect_l1(table, start, last, flags);
        }
        for Slot {
            index: i,
            first: s,
            last: l,
            ..
        } in slots(level, start, last)
        {
            let e = self.backend.read(table, i);
            if !e.is_present() {
                continue;
            }
            let child = self.child_of(e)?;
            if self.is_leaf(level, e) {
                self.protect_leaf(table, level, i, e, child, flags)?;
            } else if let Some(lower) = level.lower() {
                self.protect_table(child, lower, s, l, flags)?;
            }
        }
        Ok(())
    }

    /// The L1 step of protect: one snapshot of the table.
    #[inline(never)]
    fn protect_l1(&mut self, table: Pfn, start: u64, last: u64, flags: Flags) -> Result<(), Error> {
        let mut entries = [0u64; ENTRIES];
        self.backend.read_table(table, &mut entries);
        let (first, end) = (Level::L1.index(start), Level::L1.index(last));
        for (i, raw) in entries.iter().enumerate().take(end + 1).skip(first) {
            let e = Entry(*raw);
            if e.is_present() {
                let frame = self.child_of(e)?;
                self.protect_leaf(table, Level::L1, i, e, frame, flags)?;
            }
        }
        Ok(())
    }

    fn protect_leaf(
        &mut self,
        table: Pfn,
        level: Level,
        i: usize,
        e: Entry,
        frame: Pfn,
        flags: Flags,
    ) -> Result<(), Error> {
        let new = self.backend.leaf_entry(level, frame, flags)?;
        let same = new.mfn() == e.mfn()
            && self.backend.normalize(new.flags())
                == self.backend.normalize(e.flags() - HARDWARE_SET);
        if !same {
            self.backend.write(table, i, new)?;
        }
        Ok(())
    }

    // ---- per-leaf visits (lazy::apply_to_range) ------------------------------

    /// Calls `visit(space, table, level, index, va, entry)` for every present
    /// leaf of `[start, last]` (a large page must be covered whole).
    pub(crate) fn visit_leaves(
        &mut self,
        table: Pfn,
        level: Level,
        start: u64,
        last: u64,
        visit: &mut LeafVisit<'_, Self>,
    ) -> Result<(), Error> {
        let span = level.entry_span();
        for Slot {
            index: i,
            base: e_base,
            first: s,
            last: l,
            ..
        } in slots(level, start, last)
        {
            let e = self.backend.read(table, i);
            if !e.is_present() {
                continue;
            }
            if self.is_leaf(level, e) {
                if s != e_base || l != e_base | (span - 1) {
                    return Err(Error::SplitsLargePage { va: e_base });
                }
                visit(self, table, level, i, e_base, e)?;
            } else if let (Ok(child), Some(lower)) = (self.child_of(e), level.lower()) {
                self.visit_leaves(child, lower, s, l, visit)?;
            }
        }
        Ok(())
    }

    /// What a leaf entry translates to at its first byte.
    pub(crate) fn leaf_translation(&self, level: Level, e: Entry) -> Result<Translation, Error> {
        Ok(Translation {
            pfn: self.child_of(e)?,
            offset: 0,
            flags: self
                .backend
                .normalize(e.flags() - Flags::HUGE_PAGE - HARDWARE_SET),
            granule: Granule::of_level(level),
        })
    }

    /// Rewrites one leaf with new flags (no write when nothing changes).
    pub(crate) fn rewrite_leaf(
        &mut self,
        table: Pfn,
        level: Level,
        index: usize,
        e: Entry,
        flags: Flags,
    ) -> Result<(), Error> {
        let frame = self.child_of(e)?;
        self.protect_leaf(table, level, index, e, frame, flags)
    }

    pub(crate) fn checked_range(&mut self, va: u64, len: u64) -> Result<Option<u64>, Error> {
        self.take_sticky()?;
        self.check_range(va, len, Granule::Size4KiB)
    }

    pub(crate) fn finish_call(&mut self) -> Result<(), Error> {
        self.settle()
    }

    // ---- protect's undo log ----------------------------------------------------

    fn undo_words(&self, frame: Pfn) -> Result<*mut u64, Error> {
        self.backend
            .frame_ptr(frame)
            .map(|p| p.as_ptr().cast::<u64>())
            .ok_or(Error::BadFrame(frame))
    }

    /// Appends one old entry, borrowing a frame when the last one is full.
    fn undo_push(&mut self, log: &mut UndoLog, val: u64) -> Result<(), Error> {
        if log.head.is_none() || log.used == UNDO_SLOTS {
            let frame = self.alloc.allocate().ok_or(Error::OutOfFrames)?;
            let words = match self.undo_words(frame) {
                Ok(w) => w,
                Err(e) => {
                    self.alloc.free(frame);
                    return Err(e);
                }
            };
            // SAFETY: a frame just handed out by the allocator is plain,
            // writable memory owned by this call; slot 511 < 512.
            unsafe { words.add(UNDO_SLOTS).write(0) };
            match log.head {
                None => log.head = Some(frame),
                Some(_) => {
                    let tail = self.undo_words(log.tail)?;
                    // SAFETY: the tail frame is this log's own frame.
                    unsafe { tail.add(UNDO_SLOTS).write(frame.0 + 1) };
                }
            }
            log.tail = frame;
            log.used = 0;
        }
        let words = self.undo_words(log.tail)?;
        // SAFETY: the log's own frame; `used` < 511.
        unsafe { words.add(log.used).write(val) };
        log.used += 1;
        Ok(())
    }

    /// Runs `apply` (which must leave nothing queued) over the leaves of
    /// `[va, last]`; when `refusable`, the old leaves are logged first and
    /// written back if `apply` fails.
    pub(crate) fn with_undo(
        &mut self,
        va: u64,
        last: u64,
        refusable: bool,
        apply: &mut dyn FnMut(&mut Self) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut log = UndoLog::default();
        if refusable {
            let root = self.root;
            let recorded =
                self.visit_leaves(root, Level::L4, va, last, &mut |space, _, _, _, _, e| {
                    space.undo_push(&mut log, e.0)
                });
            if let Err(e) = recorded {
                self.undo_free(log);
                return Err(e);
            }
        }
        let result = apply(self);
        if result.is_err() && log.head.is_some() {
            let _ = self.backend.drain();
            let _ = self.undo_restore(&log, va, last);
        }
        self.undo_free(log);
        result
    }

    /// Writes back every recorded entry that changed, in walk order.
    fn undo_restore(&mut self, log: &UndoLog, va: u64, last: u64) -> Result<(), Error> {
        let mut frame = log.head;
        let mut slot = 0usize;
        let root = self.root;
        self.visit_leaves(
            root,
            Level::L4,
            va,
            last,
            &mut |space, table, _, i, _, e| {
                let Some(f) = frame else { return Ok(()) };
                let words = space.undo_words(f)?;
                // SAFETY: the log's own frame, slot < 511.
                let old = unsafe { words.add(slot).read() };
                slot += 1;
                if slot == UNDO_SLOTS {
                    // SAFETY: as above; slot 511 holds the link.
                    let next = unsafe { words.add(UNDO_SLOTS).read() };
                    frame = next.checked_sub(1).map(Pfn);
                    slot = 0;
                }
                if e.0 != old {
                    space.backend.write(table, i, Entry(old))?;
                }
                Ok(())
            },
        )?;
        self.backend.drain().map_err(Error::from)
    }

    /// Returns the log's frames to the allocator.
    fn undo_free(&mut self, log: UndoLog) {
        let mut frame = log.head;
        while let Some(f) = frame {
            frame = match self.undo_words(f) {
                // SAFETY: the log's own frame; slot 511 holds the link.
                Ok(w) => unsafe { w.add(UNDO_SLOTS).read() }.checked_sub(1).map(Pfn),
                Err(_) => None,
            };
            self.alloc.free(f);
        }
    }

    // ---- common ------------------------------------------------------------

    /// Ends a call: drains unless inside a lazy batch.
    fn settle(&mut self) -> Result<(), Error> {
        if self.lazy > 0 {
            return Ok(());
        }
        self.drain()
    }
}

/// A per-leaf visitor: `(space, table, level, index, va, entry)`.
pub(crate) type LeafVisit<'a, S> =
    dyn FnMut(&mut S, Pfn, Level, usize, u64, Entry) -> Result<(), Error> + 'a;

/// Entries per undo-log frame (word 511 links to the next frame as
/// `pfn + 1`, 0 ending the chain).
const UNDO_SLOTS: usize = ENTRIES - 1;

/// Old leaf values of a PV protect that Xen may refuse, kept in frames
/// borrowed from the allocator for the length of the call.
#[derive(Default)]
struct UndoLog {
    head: Option<Pfn>,
    tail: Pfn,
    used: usize,
}

/// Old flags seen by protect's check pass.
enum Uniform {
    Skip,
    Unknown,
    Same(Flags),
    Mixed,
}

impl Uniform {
    fn see(&mut self, f: Flags) {
        *self = match *self {
            Uniform::Skip => Uniform::Skip,
            Uniform::Unknown => Uniform::Same(f),
            Uniform::Same(g) if g == f => Uniform::Same(g),
            _ => Uniform::Mixed,
        };
    }
}

/// Calls `f(index, first, last, whole)` for each entry of a `level` table
/// that `[start, last]` touches; `whole` says the entry's span is covered.
fn for_each_entry(
    level: Level,
    start: u64,
    last: u64,
    mut f: impl FnMut(usize, u64, u64, bool) -> Result<(), Error>,
) -> Result<(), Error> {
    for slot in slots(level, start, last) {
        f(slot.index, slot.first, slot.last, slot.is_whole(level))?;
    }
    Ok(())
}

/// The part of a range `[start, last]` that one entry of a `level` table
/// covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    /// Index of the entry in its table.
    index: usize,
    /// First address the entry maps.
    base: u64,
    /// First address of the range inside the entry's span.
    first: u64,
    /// Last address of the range inside the entry's span.
    last: u64,
}

impl Slot {
    /// Whether the range covers the entry's whole span.
    fn is_whole(&self, level: Level) -> bool {
        self.first == self.base && self.last == self.base | (level.entry_span() - 1)
    }
}

/// The entries of a `level` table that `[start, last]` touches (both inside
/// one table's span), in order.
fn slots(level: Level, start: u64, last: u64) -> impl Iterator<Item = Slot> {
    let span = level.entry_span();
    let base = start & !(span * ENTRIES as u64 - 1);
    (level.index(start)..=level.index(last)).map(move |index| {
        let e_base = base | (index as u64 * span);
        Slot {
            index,
            base: e_base,
            first: start.max(e_base),
            last: last.min(e_base | (span - 1)),
        }
    })
}
