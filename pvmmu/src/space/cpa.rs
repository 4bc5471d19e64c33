//! change_page_attr: set and clear leaf attributes over a kernel virtual
//! range, splitting large pages where the range covers them in part.
//!
//! Invariants:
//! * One core, [`AddressSpace::change_page_attr_set_clr`], carries one
//!   [`Request`] through a read-only check pass, the reserve refill, the
//!   write pass (splits and leaf writes) and one TLB decision; every
//!   `set_memory_*` is a thin call of it.
//! * Nothing is written unless the check pass accepted every page: all
//!   mapped (present, or parked non-present by an earlier `np`), the new
//!   attributes acceptable (never W+X, the backend's entry rules, under PV
//!   no page-table frame made writable, no large page, no `p`: PV cannot
//!   park, its `np` leaves holes; the static protections: kernel text and
//!   rodata frames never writable in any alias, executed text stays
//!   executable, pages shared with the hypervisor untouched; no frame the
//!   guest does not own),
//!   and the split
//!   reserve holds every frame the splits need.
//! * A split builds the whole new table (512 entries carrying every
//!   attribute of the large page, the frames at their offsets) in a
//!   private frame before one write replaces the large leaf: a concurrent
//!   walker sees the old large page or the complete new table, never a
//!   hole. A large page is split only when the change alters it, and
//!   never reassembled.
//! * Natively every write is a compare-and-exchange ([`crate::install`]):
//!   a leaf gets set/clear applied to its current value (a concurrent
//!   change of other bits, or the CPU's dirty bit, is kept), a split is
//!   published only over the large leaf it was built from (a loser gives
//!   its frame back and continues on the winner's table). So calls may
//!   run on several CPUs at once: [`CpaFast`] is the lockless path (same
//!   check pass, no splits, only tightening, only inside stable ranges
//!   whose tables `unmap` may not free); the locked path takes the rest.
//! * A call needs at most [`MAX_SPLITS`] frames: only the pages holding
//!   the two ends of the range can be partly covered, and each end splits
//!   at most one 1 GiB and one 2 MiB page. The frames come from a reserve
//!   refilled from the allocator before the walk starts, so a split never
//!   asks the allocator for a frame in the middle of a change.
//! * After all writes are applied: one TLB decision (pages one by one up
//!   to [`crate::backend::INVLPG_LIMIT`], everything above it or after a
//!   split), through the backend (which shoots down every CPU where the
//!   kernel configured it to); after a caching change, one cache flush
//!   (the range's lines up to [`CLFLUSH_LIMIT`] pages, `wbinvd` above;
//!   under PV Xen's global cache flush in the TLB flush's batch), and a
//!   caching change is refused up front where the backend flushes no
//!   caches (PV without I/O privilege). The cache modes' bits are the
//!   backend's ([`crate::backend::CacheEncoding`], from the PAT in force).

use super::slots::slots;
use super::{range_last, AddressSpace, Error, Granule, Request};
use crate::backend::cache::CACHE_SELECT;
use crate::backend::{Backend, CacheMode, LargePages, TlbScope, INVLPG_LIMIT};
use crate::entry::{Entry, FlagError, Flags, Level, HARDWARE_SET, PAT_4K, PAT_LARGE};
use crate::install::{install_table, update_leaf, EntryCell, InstallError, Leaf};
use crate::phys::FrameAllocator;
use crate::types::{Pfn, ENTRIES, ENTRY_FRAME_MASK, PAGE_SIZE};
use core::sync::atomic::AtomicU64;

/// Most frames one call can need for splits (two ends, each a 1 GiB and a
/// 2 MiB page).
pub const MAX_SPLITS: usize = 4;

/// A software-available bit CPA may set and clear with no effect on
/// access (as Linux's cpa-test marks pages): for self-tests.
pub const CPA_TEST_BIT: Flags = Flags::BIT_9;

/// The flags a CPA call may set or clear: never the frame, PS, the bits
/// the hardware sets, USER, or GLOBAL (a global page would survive the full
/// flush, a CR3 reload, that CPA uses above the page-by-page threshold).
pub const CPA_FLAGS: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE)
    .union(Flags::WRITE_THROUGH)
    .union(Flags::NO_CACHE)
    .union(CPA_TEST_BIT);

/// Most pages whose cache lines a caching change flushes one by one
/// (`clflush`); above it the whole cache is written back (`wbinvd`).
pub const CLFLUSH_LIMIT: u64 = 256;

/// The caching bits CPA sets for each cache mode, with the PAT the kernel
/// must program (`IA32_PAT`): index 0 write-back, 1 write-combining, 3
/// uncached (PWT and PCD select the index; CPA never sets the PAT bit).
const CACHE_BITS: Flags = Flags::WRITE_THROUGH.union(Flags::NO_CACHE);

/// The `IA32_PAT` value the kernel programs on every CPU for
/// [`AddressSpace::set_memory_wc`]: PA0 WB, PA1 WC, PA2 UC-, PA3 UC, and
/// the same again for PA4..PA7 (the reset value has WT at PA1).
pub const PAT_VALUE: u64 = 0x0007_0106_0007_0106;

/// Most static protections one address space keeps.
pub const MAX_PROTECTIONS: usize = 8;

/// What a protected range of frames holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protected {
    /// Kernel code: never writable, in any mapping (the direct-map alias
    /// included); a mapping that executes it stays executable.
    KernelText,
    /// Kernel read-only data: never writable, in any mapping.
    KernelRodata,
    /// A page the hypervisor shares with the guest (start_info, a console
    /// or store ring): CPA changes nothing in its mappings.
    HypervisorShared,
}

/// Frames `[first, end)` whose mappings CPA keeps as `region` requires (as
/// Linux's `static_protections`), by frame, so every alias is covered.
/// Frames the guest does not own (Xen's, e.g. its shared-info page) need no
/// entry: CPA refuses any mapping of them with [`Error::ForeignFrame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticProtection {
    /// What the frames hold.
    pub region: Protected,
    /// First frame.
    pub first: Pfn,
    /// One past the last frame.
    pub end: Pfn,
}

impl StaticProtection {
    /// Whether changing `old` into `new` (by setting `set`) breaks the rule.
    fn breaks(&self, old: Entry, new: Entry, set: Flags) -> bool {
        match self.region {
            Protected::KernelRodata => set.contains(Flags::WRITABLE),
            Protected::KernelText => {
                let executes = |e: Entry| e.is_present() && !e.flags().contains(Flags::NO_EXECUTE);
                set.contains(Flags::WRITABLE) || (executes(old) && !executes(new))
            }
            Protected::HypervisorShared => new != old,
        }
    }
}

/// Frames kept aside for splits (see the module docs for the bound).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SplitReserve {
    frames: [Pfn; MAX_SPLITS],
    n: usize,
}

impl SplitReserve {
    pub(crate) const EMPTY: SplitReserve = SplitReserve {
        frames: [Pfn(0); MAX_SPLITS],
        n: 0,
    };
}

/// The reserve hands its frames to the install protocol and takes back a
/// loser's (never more than it held: a frame given back was taken).
impl FrameAllocator for SplitReserve {
    fn allocate(&mut self) -> Option<Pfn> {
        self.n = self.n.checked_sub(1)?;
        Some(self.frames[self.n])
    }
    fn free(&mut self, pfn: Pfn) {
        if let Some(slot) = self.frames.get_mut(self.n) {
            *slot = pfn;
            self.n += 1;
        }
    }
}

/// Most stable ranges (see [`AddressSpace::cpa_stable`]) one address
/// space keeps.
pub const MAX_STABLE: usize = 4;

/// Why the lockless path ([`CpaFast`]) leaves a change to the locked one
/// ([`Error::SlowPath`]); nothing was changed, or what was changed is
/// flushed and the locked call redoes it (set and clear are idempotent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowPath {
    /// The backend cannot compare-and-exchange live entries (Xen PV).
    NoAtomicEntries,
    /// The range is not inside one stable range: its tables may be freed
    /// by an `unmap` while the lockless walk reads them.
    Unstable,
    /// The change loosens a page (sets WRITABLE or clears NO_EXECUTE): its
    /// W+X check must not race another change of the same page, so it
    /// runs under the lock (every lockless change only tightens, which
    /// cannot make a checked loosening W+X).
    Loosens,
    /// Large pages must be split (the count of the lockless check pass).
    Split {
        /// Splits counted.
        splits: u32,
    },
}

/// What a successful CPA call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpaDone {
    /// 4 KiB pages whose entry changed (a changed large page counts its
    /// 4 KiB pages).
    pub pages_changed: u64,
    /// Large pages split by this call.
    pub splits: u32,
    /// Large pages this call was about to split and found split by
    /// another CPU at the exchange (its frame went back to the reserve,
    /// it continued on the other CPU's table).
    pub joined: u32,
    /// Exchanges lost while installing a split's table (each followed by
    /// the re-check).
    pub lost: u32,
    /// The TLB decision taken: `None` when nothing changed.
    pub flush: Option<TlbScope>,
    /// The cache flush after a caching change: the range's lines, or all
    /// (`None` when no caching attribute changed).
    pub cache: Option<TlbScope>,
}

/// Counters over every CPA call of an address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpaStats {
    /// Calls that succeeded.
    pub calls: u64,
    /// Calls refused (nothing changed).
    pub refused: u64,
    /// Large pages split.
    pub splits: u64,
    /// Splits found done by another CPU at the exchange
    /// ([`CpaDone::joined`]).
    pub joined: u64,
    /// Exchanges lost installing a split ([`CpaDone::lost`]).
    pub lost: u64,
    /// Page-by-page TLB flushes.
    pub flush_pages: u64,
    /// Full TLB flushes.
    pub flush_all: u64,
    /// Cache flushes of a range's lines (`clflush`).
    pub cache_lines: u64,
    /// Whole-cache flushes (`wbinvd`).
    pub cache_all: u64,
}

/// A leaf as CPA sees it: present, or parked (not present but not empty,
/// left by a `set_memory_np`).
fn cpa_leaf(e: Entry, level: Level) -> bool {
    !e.is_empty() && (level == Level::L1 || e.is_huge())
}

/// The new value of a leaf: `set` and `clear` applied, the rest kept.
fn changed(e: Entry, set: Flags, clear: Flags) -> Entry {
    Entry((e.0 & !clear.bits()) | set.bits())
}

/// The 512 entries of the table replacing large leaf `e` at `level`: the
/// same attributes, PAT moved to the 4 KiB position at L1, PS kept above.
fn split_entry(e: Entry, level: Level, k: u64) -> Entry {
    let span = level.entry_span();
    let lower = level.lower().unwrap_or(Level::L1);
    let base = e.0 & ENTRY_FRAME_MASK & !(span - 1);
    let attrs = e.0 & !ENTRY_FRAME_MASK;
    let addr = base + k * lower.entry_span();
    if lower == Level::L1 {
        let pat = if e.0 & PAT_LARGE != 0 { PAT_4K } else { 0 };
        let attrs = attrs & !Flags::HUGE_PAGE.bits();
        Entry(addr | attrs | pat)
    } else {
        Entry(addr | attrs | (e.0 & PAT_LARGE))
    }
}

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
    /// The one CPA core: on every page of `len` bytes at `va` (each mapped,
    /// or parked by [`AddressSpace::set_memory_np`]) sets the flags in
    /// `set` and clears those in `clear` (both within [`CPA_FLAGS`]),
    /// splitting large pages the range covers in part. Refusals leave the
    /// tree unchanged: [`Error::WriteExecute`] (a page would be writable
    /// and executable), [`Error::XenHole`], [`Error::PageTableFrame`]
    /// (under PV a page-table frame would become writable),
    /// [`Error::LargePagesUnavailable`] (a large page where the backend has
    /// none: PV), [`Error::Flags`], [`Error::NotMapped`],
    /// [`Error::OutOfFrames`] (the split reserve could not be filled).
    /// The TLB is flushed by the call (one decision, after all writes).
    pub fn change_page_attr_set_clr(
        &mut self,
        va: u64,
        len: u64,
        set: Flags,
        clear: Flags,
    ) -> Result<CpaDone, Error> {
        let r = self.cpa(va, len, set, clear);
        match r {
            Ok(_) => self.cpa_stats.calls += 1,
            Err(_) => self.cpa_stats.refused += 1,
        }
        r
    }

    fn cpa(&mut self, va: u64, len: u64, set: Flags, clear: Flags) -> Result<CpaDone, Error> {
        self.take_sticky()?;
        let Some(req) = cpa_request(&self.backend, va, len, set, clear)? else {
            return Ok(CpaDone::default());
        };
        let last = req.last;
        // Check pass: nothing is written before every page is accepted.
        let mut splits = 0usize;
        let root = self.root;
        self.checker()
            .check(root, Level::L4, va, last, &req, &mut splits)?;
        if self.backend.caps().read_only_tables && set.contains(Flags::WRITABLE) {
            self.cpa_check_tables(&req)?;
        }
        self.refill_reserve(splits)?;
        // Write pass. Natively every entry changes by compare-and-exchange
        // (the lockless path may change leaves meanwhile, the CPU sets
        // accessed and dirty bits). Under PV a page made writable may
        // still be refused by Xen (the checks make it unlikely): then the
        // old leaves come back from the engine's undo log (PV has no large
        // pages, and the present set is unchanged when PRESENT is not
        // touched).
        let mut done = CpaDone::default();
        let refusable = self.backend.caps().read_only_tables
            && set.contains(Flags::WRITABLE)
            && !(set | clear).contains(Flags::PRESENT);
        let written = if self.backend.entry_cell(root, 0).is_some() {
            let mut w = AtomicWrite {
                b: &self.backend,
                req: &req,
                reserve: Some(&mut self.reserve),
                done: CpaDone::default(),
            };
            let r = w.write(root, Level::L4, va, last);
            done = w.done;
            self.tables_created += u64::from(done.splits);
            r
        } else if refusable {
            self.with_undo(va, last, true, &mut |space| {
                space.cpa_write(root, Level::L4, va, last, &req, &mut done)?;
                space.drain()
            })
        } else {
            self.cpa_write(root, Level::L4, va, last, &req, &mut done)
                .and_then(|()| self.settle())
        };
        self.cpa_stats.splits += u64::from(done.splits);
        self.cpa_stats.joined += u64::from(done.joined);
        self.cpa_stats.lost += u64::from(done.lost);
        written?;
        let flushed = cpa_flush(&mut self.backend, &req, &mut done);
        let st = &mut self.cpa_stats;
        match done.flush {
            Some(TlbScope::All) => st.flush_all += 1,
            Some(TlbScope::Range { .. }) => st.flush_pages += 1,
            None => {}
        }
        match done.cache {
            Some(TlbScope::All) => st.cache_all += 1,
            Some(TlbScope::Range { .. }) => st.cache_lines += 1,
            None => {}
        }
        flushed?;
        Ok(done)
    }

    /// The check pass's view of this space.
    fn checker(&self) -> Checker<'_, B> {
        Checker {
            backend: &self.backend,
            protections: &self.protections,
        }
    }

    /// Registers a static protection: from now on CPA refuses a change
    /// that breaks it ([`Error::StaticProtection`]);
    /// [`Error::TooManyProtections`] when [`MAX_PROTECTIONS`] are in place.
    /// [`Error::ProtectionsFrozen`] once a lockless handle exists
    /// ([`AddressSpace::cpa_fast`]: it holds a copy of them).
    pub fn cpa_protect(&mut self, p: StaticProtection) -> Result<(), Error> {
        if self.fast_issued {
            return Err(Error::ProtectionsFrozen);
        }
        first_free(&mut self.protections, p, Error::TooManyProtections)
    }

    /// Declares `[start, end)` stable: from now on [`AddressSpace::unmap`]
    /// refuses any range touching it ([`Error::StableRange`]), so no table
    /// below it is ever freed (CPA's np parks entries and keeps tables;
    /// only `unmap` frees empty tables, and `destroy` with the whole
    /// space). The lockless CPA path ([`CpaFast`]) works only inside such
    /// ranges (the kernel's direct map and image).
    /// [`Error::TooManyStableRanges`] beyond [`MAX_STABLE`].
    pub fn cpa_stable(&mut self, start: u64, end: u64) -> Result<(), Error> {
        first_free(&mut self.stable, (start, end), Error::TooManyStableRanges)
    }

    /// Refuses `[va, last]` if it touches a stable range.
    pub(crate) fn check_unstable(&self, va: u64, last: u64) -> Result<(), Error> {
        match self
            .stable
            .iter()
            .flatten()
            .find(|&&(s, e)| va < e && last >= s)
        {
            Some(&(s, _)) => Err(Error::StableRange { va: va.max(s) }),
            None => Ok(()),
        }
    }

    /// The lockless CPA path over this tree ([`CpaFast`]), with a copy of
    /// the static protections (registering one afterwards is refused) and
    /// of the stable ranges (one added afterwards is not used by it).
    ///
    /// # Safety
    /// The handle is used only with backends over this space's tables,
    /// while the tree lives (not after [`AddressSpace::destroy`]).
    pub unsafe fn cpa_fast(&mut self) -> CpaFast {
        self.fast_issued = true;
        CpaFast {
            root: self.root,
            protections: self.protections,
            stable: self.stable,
        }
    }

    /// Under PV: refuses a change that would make a page-table frame of
    /// this tree writable (before Xen is asked). The frames the range maps
    /// are bounded first; only tables inside those bounds are looked up.
    fn cpa_check_tables(&self, req: &Request) -> Result<(), Error> {
        let (mut lo, mut hi) = (u64::MAX, 0u64);
        self.cpa_frames(req, &mut |_, pfn| {
            lo = lo.min(pfn);
            hi = hi.max(pfn);
            Ok(())
        })?;
        let mut tables = [Pfn(0); 64];
        let mut n = 0usize;
        let mut overflow = false;
        self.tables_in(lo, hi, &mut |t| {
            if n < tables.len() {
                tables[n] = t;
                n += 1;
            } else {
                overflow = true;
            }
        });
        let tables = &tables[..n];
        let check = |va: u64, pfn: u64| -> Result<(), Error> {
            let mut hit = tables.contains(&Pfn(pfn));
            if overflow && !hit {
                self.tables_in(pfn, pfn, &mut |_| hit = true);
            }
            if hit {
                return Err(Error::PageTableFrame { va, pfn: Pfn(pfn) });
            }
            Ok(())
        };
        let mut found = Ok(());
        self.cpa_frames(req, &mut |va, pfn| {
            if found.is_ok() {
                found = check(va, pfn);
            }
            Ok(())
        })?;
        found
    }

    /// Calls `f(table)` for every table of the tree whose frame lies in
    /// `[lo, hi]`; L1 tables are found from their L2 entries, without
    /// reading their own entries (so the cost is that of the upper levels).
    fn tables_in(&self, lo: u64, hi: u64, f: &mut dyn FnMut(Pfn)) {
        if (lo..=hi).contains(&self.root.0) {
            f(self.root);
        }
        crate::walk::for_each(&self.backend, self.root, &mut |step| match step {
            crate::walk::Step::Entry {
                level,
                child: Some(c),
                ..
            } => {
                if (lo..=hi).contains(&c.0) {
                    f(c);
                }
                level != Level::L2
            }
            _ => true,
        });
    }

    /// Calls `f(va, pfn)` for every 4 KiB page of the request (PV: only
    /// 4 KiB leaves exist).
    fn cpa_frames(
        &self,
        req: &Request,
        f: &mut dyn FnMut(u64, u64) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut va = req.va;
        loop {
            let found = crate::walk::walk(&self.backend, self.root, va, Level::L1)
                .map_err(|e| Error::from_walk(e, va))?;
            if found.level == Level::L1 && !found.entry.is_empty() {
                let pfn = self.child_of(found.entry)?;
                f(va, pfn.0)?;
            }
            match va.checked_add(PAGE_SIZE) {
                Some(next) if next <= req.last => va = next,
                _ => return Ok(()),
            }
        }
    }

    /// Tops the split reserve up to `need` frames (before any write).
    fn refill_reserve(&mut self, need: usize) -> Result<(), Error> {
        while self.reserve.n < need.min(MAX_SPLITS) {
            let f = self.alloc.allocate().ok_or(Error::OutOfFrames)?;
            self.reserve.frames[self.reserve.n] = f;
            self.reserve.n += 1;
        }
        Ok(())
    }

    /// Fills the split reserve to [`MAX_SPLITS`] frames (outside any CPA
    /// call, e.g. where allocating may itself change mappings).
    pub fn cpa_refill(&mut self) -> Result<(), Error> {
        self.refill_reserve(MAX_SPLITS)
    }

    /// Returns the split reserve's frames to the allocator.
    pub fn cpa_drain_reserve(&mut self) {
        while self.reserve.n > 0 {
            self.reserve.n -= 1;
            self.alloc.free(self.reserve.frames[self.reserve.n]);
        }
    }

    /// Counters over every CPA call so far.
    pub fn cpa_stats(&self) -> CpaStats {
        self.cpa_stats
    }

    /// The write pass: splits partly covered large pages, writes the
    /// changed leaves.
    fn cpa_write(
        &mut self,
        table: Pfn,
        level: Level,
        start: u64,
        last: u64,
        req: &Request,
        done: &mut CpaDone,
    ) -> Result<(), Error> {
        if level == Level::L1 {
            return self.cpa_write_l1(table, start, last, req, done);
        }
        for slot in slots(level, start, last) {
            let e = self.backend.read(table, slot.index);
            if e.is_empty() {
                continue;
            }
            let Some(lower) = level.lower() else {
                continue;
            };
            let child = if cpa_leaf(e, level) {
                let new = changed(e, req.flags, req.clear);
                if new == e {
                    // Nothing to change here: no write, no split.
                    continue;
                }
                if slot.is_whole() {
                    self.backend.write(table, slot.index, new)?;
                    done.pages_changed += level.entry_span() / PAGE_SIZE;
                    continue;
                }
                let child = self.split(table, slot.index, level, e)?;
                done.splits += 1;
                child
            } else {
                self.child_of(e)?
            };
            self.cpa_write(child, lower, slot.first, slot.last, req, done)?;
        }
        Ok(())
    }

    /// The L1 step: one snapshot, the changed entries written.
    #[inline(never)]
    fn cpa_write_l1(
        &mut self,
        table: Pfn,
        start: u64,
        last: u64,
        req: &Request,
        done: &mut CpaDone,
    ) -> Result<(), Error> {
        let mut entries = [0u64; ENTRIES];
        self.backend.read_table(table, &mut entries);
        let (first, end) = (Level::L1.index(start), Level::L1.index(last));
        for (i, &raw) in entries.iter().enumerate().take(end + 1).skip(first) {
            let e = Entry(raw);
            if e.is_empty() {
                continue;
            }
            let new = changed(e, req.flags, req.clear);
            if new != e {
                self.backend.write(table, i, new)?;
                done.pages_changed += 1;
            }
        }
        Ok(())
    }

    /// Replaces large leaf `e` at `table[index]` by a table of 512 smaller
    /// pages with the same attributes: built in a reserve frame, then made
    /// live by one store. Returns the new table.
    fn split(&mut self, table: Pfn, index: usize, level: Level, e: Entry) -> Result<Pfn, Error> {
        if self.reserve.n == 0 {
            // The check pass counted the splits and filled the reserve.
            return Err(Error::OutOfFrames);
        }
        self.reserve.n -= 1;
        let frame = self.reserve.frames[self.reserve.n];
        let built = self.build_split(frame, level, e);
        let te = match built {
            Ok(te) => te,
            Err(err) => {
                self.reserve.frames[self.reserve.n] = frame;
                self.reserve.n += 1;
                return Err(err);
            }
        };
        // The one store that makes the complete table live.
        self.backend.write(table, index, te)?;
        self.tables_created += 1;
        Ok(frame)
    }

    fn build_split(&mut self, frame: Pfn, level: Level, e: Entry) -> Result<Entry, Error> {
        self.backend.new_table(frame)?;
        let ptr = self
            .backend
            .frame_ptr(frame)
            .ok_or(Error::BadFrame(frame))?;
        // SAFETY: `frame` came from the reserve (the allocator's, owned by
        // this space) and is not yet reachable from any table: plain stores
        // into it race with nothing.
        let words = unsafe { &mut *ptr.as_ptr() };
        for (k, w) in words.iter_mut().enumerate() {
            *w = split_entry(e, level, k as u64).0;
        }
        self.backend.seal_table(frame)?;
        // Table entries are permissive (the leaves decide), as elsewhere.
        Ok(self.backend.table_entry(frame)?)
    }

    /// Makes the pages uncached (natively PAT index 3: PCD and PWT; under
    /// PV Xen's index 3 too), then flushes their cache lines (or the whole
    /// cache above [`CLFLUSH_LIMIT`]). Refused where the backend flushes no
    /// caches (PV without I/O privilege):
    /// `Error::Flags(FlagError::CacheAttributes)`, before Xen is asked.
    pub fn set_memory_uc(&mut self, va: u64, pages: u64) -> Result<CpaDone, Error> {
        self.set_memory_cache(va, pages, CacheMode::Uncached)
    }
    /// Makes the pages write-combining (natively PAT index 1: PWT, with the
    /// PAT of [`PAT_VALUE`]; under PV Xen's index 4: the PAT bit), then
    /// flushes as [`AddressSpace::set_memory_uc`].
    pub fn set_memory_wc(&mut self, va: u64, pages: u64) -> Result<CpaDone, Error> {
        self.set_memory_cache(va, pages, CacheMode::WriteCombining)
    }
    /// Makes the pages write-back again (PAT index 0), then flushes as
    /// [`AddressSpace::set_memory_uc`].
    pub fn set_memory_wb(&mut self, va: u64, pages: u64) -> Result<CpaDone, Error> {
        self.set_memory_cache(va, pages, CacheMode::WriteBack)
    }
    /// Gives the pages cache mode `mode`, encoded as the backend says
    /// ([`Backend::cache_encoding`]), then flushes as
    /// [`AddressSpace::set_memory_uc`].
    pub fn set_memory_cache(
        &mut self,
        va: u64,
        pages: u64,
        mode: CacheMode,
    ) -> Result<CpaDone, Error> {
        let (set, clear) = self.cache_change(mode);
        self.change_page_attr_set_clr(va, pages * PAGE_SIZE, set, clear)
    }
    /// The bits to set and clear for cache mode `mode`. Where the backend
    /// has no encoding, the native uncached bits: the core refuses them
    /// (and counts the refusal).
    pub fn cache_change(&self, mode: CacheMode) -> (Flags, Flags) {
        match self.backend.cache_encoding() {
            Some(enc) => (enc.bits(mode), enc.mask() - enc.bits(mode)),
            None => (CACHE_BITS, Flags::empty()),
        }
    }
    /// Makes the pages read-only.
    pub fn set_memory_ro(&mut self, va: u64, pages: u64) -> Result<CpaDone, Error> {
        self.change_page_attr_set_clr(va, pages * PAGE_SIZE, Flags::empty(), Flags::WRITABLE)
    }
    /// Makes the pages writable (they must be NX already: never W+X).
    pub fn set_memory_rw(&mut self, va: u64, pages: u64) -> Result<CpaDone, Error> {
        self.change_page_attr_set_clr(va, pages * PAGE_SIZE, Flags::WRITABLE, Flags::empty())
    }
    /// Makes the pages non-executable.
    pub fn set_memory_nx(&mut self, va: u64, pages: u64) -> Result<CpaDone, Error> {
        self.change_page_attr_set_clr(va, pages * PAGE_SIZE, Flags::NO_EXECUTE, Flags::empty())
    }
    /// Makes the pages executable (they must be read-only: never W+X).
    pub fn set_memory_x(&mut self, va: u64, pages: u64) -> Result<CpaDone, Error> {
        self.change_page_attr_set_clr(va, pages * PAGE_SIZE, Flags::empty(), Flags::NO_EXECUTE)
    }
    /// Makes the pages not present, keeping frame and attributes in the
    /// entry ("parked") for [`AddressSpace::set_memory_p`]. Where tables
    /// are read-only (PV) an entry cannot be parked: the pages become holes
    /// (the tables stay), and a `map` of the frames brings them back.
    pub fn set_memory_np(&mut self, va: u64, pages: u64) -> Result<CpaDone, Error> {
        self.change_page_attr_set_clr(va, pages * PAGE_SIZE, Flags::empty(), Flags::PRESENT)
    }
    /// Makes parked pages present again (refused under PV, which cannot
    /// park: `Error::Flags(FlagError::NotPresent)`).
    pub fn set_memory_p(&mut self, va: u64, pages: u64) -> Result<CpaDone, Error> {
        self.change_page_attr_set_clr(va, pages * PAGE_SIZE, Flags::PRESENT, Flags::empty())
    }
}

/// Puts `v` in the first free slot of `slots`; `full` when there is none.
fn first_free<T>(slots: &mut [Option<T>], v: T, full: Error) -> Result<(), Error> {
    let slot = slots.iter_mut().find(|s| s.is_none()).ok_or(full)?;
    *slot = Some(v);
    Ok(())
}

/// The checks every CPA call starts with (both paths): the range, the
/// flags, what the backend cannot do; the request, `None` for an empty
/// range.
fn cpa_request<B: Backend>(
    backend: &B,
    va: u64,
    len: u64,
    set: Flags,
    clear: Flags,
) -> Result<Option<Request>, Error> {
    let Some(last) = range_last(backend, va, len, Granule::Size4KiB)? else {
        return Ok(None);
    };
    // The PAT bit of a 4 KiB leaf too, where the backend's cache modes
    // use it (PV: write-combining).
    let allowed = CPA_FLAGS
        | backend
            .cache_encoding()
            .map_or(Flags::empty(), |c| c.mask());
    if !allowed.contains(set | clear) || set.intersects(clear) {
        return Err(Error::CpaFlags);
    }
    // A caching change needs its cache flush: refused where the backend
    // cannot do it (PV without I/O privilege), before anything is read or
    // written.
    if (set | clear).intersects(CACHE_SELECT) && !backend.flushes_caches() {
        return Err(Error::Flags(FlagError::CacheAttributes));
    }
    // Where tables are read-only (PV) a non-present entry is written as
    // an all-zero hole (`entry::pv_sanitize`, Xen's L1TF rules): an
    // entry cannot be parked. np leaves holes (the frame is gone from
    // the entry, so only a `map` of the frame brings it back); p, which
    // would need the frame, is refused.
    if backend.caps().read_only_tables && set.contains(Flags::PRESENT) {
        return Err(Error::Flags(FlagError::NotPresent));
    }
    Ok(Some(Request {
        flags: set,
        clear,
        ..Request::new(va, last)
    }))
}

/// The one TLB decision after all writes (pages one by one up to
/// [`INVLPG_LIMIT`] changed pages and no split, else everything), with,
/// after a caching change, the cache flush (the range's lines up to
/// [`CLFLUSH_LIMIT`] pages, everything above) in the same submission
/// where the backend can; recorded in `done`.
fn cpa_flush<B: Backend>(backend: &mut B, req: &Request, done: &mut CpaDone) -> Result<(), Error> {
    // The cache, once the new attributes are in every TLB.
    if (req.flags | req.clear).intersects(CACHE_SELECT) && done.pages_changed > 0 {
        let range = req.flush_scope();
        done.cache = Some(match range {
            TlbScope::Range { pages, .. } if pages <= CLFLUSH_LIMIT => range,
            _ => TlbScope::All,
        });
    }
    if done.pages_changed > 0 || done.splits > 0 {
        let scope = if done.splits > 0 || done.pages_changed > INVLPG_LIMIT {
            TlbScope::All
        } else {
            req.flush_scope()
        };
        done.flush = Some(scope);
        // TLB then cache, one submission where the backend can.
        match done.cache {
            Some(cache) => backend.flush_tlb_and_cache(scope, cache)?,
            None => backend.flush_tlb(scope)?,
        }
    }
    Ok(())
}

/// The write pass where live entries are atomic cells (natively), shared
/// by both paths: every leaf changes by a compare-and-exchange loop on its
/// current value ([`update_leaf`]), so a concurrent change of other bits
/// (another CPA call, the CPU's accessed/dirty bits) is kept; a leaf that
/// became a table meanwhile (split by another CPU) is descended into. A
/// large page covered in part that the change alters is split with the
/// install protocol ([`install_table`]), frames from `reserve`: the locked
/// path's; without one (the lockless path) the call stops with
/// [`SlowPath::Split`].
struct AtomicWrite<'a, 'r, B: Backend> {
    b: &'a B,
    req: &'a Request,
    reserve: Option<&'r mut SplitReserve>,
    /// What the pass did so far.
    done: CpaDone,
}

impl<B: Backend> AtomicWrite<'_, '_, B> {
    /// The pass over `[start, last]` in `table` at `level`.
    fn write(&mut self, table: Pfn, level: Level, start: u64, last: u64) -> Result<(), Error> {
        let (b, req) = (self.b, self.req);
        let is_leaf = |v: u64| cpa_leaf(Entry(v), level);
        // Never writes W+X: with the rules of both paths (only the locked
        // one loosens, after its check) no interleaving reaches it.
        let change = |v: u64| {
            let new = changed(Entry(v), req.flags, req.clear);
            let f = new.flags();
            (!f.contains(Flags::WRITABLE) || f.contains(Flags::NO_EXECUTE)).then_some(new.0)
        };
        for slot in slots(level, start, last) {
            let cell = b
                .entry_cell(table, slot.index)
                .ok_or(Error::BadFrame(table))?;
            let e = if level == Level::L1 || slot.is_whole() {
                match update_leaf(cell, is_leaf, change) {
                    Leaf::Changed { .. } => {
                        self.done.pages_changed += level.entry_span() / PAGE_SIZE;
                        continue;
                    }
                    Leaf::Unchanged(_) => continue,
                    Leaf::Refused(_) => return Err(Error::WriteExecute),
                    Leaf::NotLeaf(v) => Entry(v),
                }
            } else {
                let v = EntryCell::load(cell);
                if !is_leaf(v) {
                    Entry(v)
                } else if change(v) == Some(v) {
                    // Nothing to change here: no write, no split.
                    continue;
                } else {
                    Entry(self.split(cell, level)?)
                }
            };
            let Some(lower) = level.lower() else {
                continue;
            };
            if e.is_empty() {
                continue;
            }
            let child = b.to_pfn(e.mfn()).ok_or(Error::ForeignFrame(e.mfn()))?;
            self.write(child, lower, slot.first, slot.last)?;
        }
        Ok(())
    }

    /// Splits the large leaf in `cell` with the install protocol, or finds
    /// the table another CPU installed; the table entry.
    fn split(&mut self, cell: &AtomicU64, level: Level) -> Result<u64, Error> {
        let b = self.b;
        let Some(frames) = self.reserve.as_deref_mut() else {
            return Err(Error::SlowPath(SlowPath::Split { splits: 1 }));
        };
        let is_leaf = |v: u64| cpa_leaf(Entry(v), level);
        let got = install_table(cell, is_leaf, frames, |f, v| {
            build_split_plain(b, f, level, Entry(v))
        });
        match got {
            Ok(i) => {
                self.done.lost += i.lost;
                match i.built {
                    Some(_) => self.done.splits += 1,
                    None => self.done.joined += 1,
                }
                Ok(i.entry)
            }
            // The check pass counted the splits and filled the reserve; a
            // loser's frame comes back to it.
            Err(InstallError::NoFrame) => Err(Error::OutOfFrames),
            Err(InstallError::Build(e)) => Err(e),
        }
    }
}

/// Builds, in private `frame`, the table replacing large leaf `e` at
/// `level`, with plain stores (where entries are atomic cells, tables are
/// plain memory: nothing to zero or seal); the entry pointing at it.
fn build_split_plain<B: Backend>(b: &B, frame: Pfn, level: Level, e: Entry) -> Result<u64, Error> {
    let ptr = b.frame_ptr(frame).ok_or(Error::BadFrame(frame))?;
    // SAFETY: `frame` came from the split reserve (this space's
    // allocator's) and is reachable from no table until the exchange that
    // publishes it: plain stores into it race with nothing.
    let words = unsafe { &mut *ptr.as_ptr() };
    for (k, w) in words.iter_mut().enumerate() {
        *w = split_entry(e, level, k as u64).0;
    }
    // Table entries are permissive (the leaves decide), as elsewhere.
    Ok(b.table_entry(frame)?.0)
}

/// The lockless CPA path of an address space (from
/// [`AddressSpace::cpa_fast`]): its root, static protections and stable
/// ranges, to change attributes from any number of CPUs at once with no
/// lock, over a backend of the same tables.
///
/// A call runs the same checks as the locked path and then writes every
/// leaf by compare-and-exchange, with one TLB decision after all writes.
/// It takes a change only when (each checked, else
/// [`Error::SlowPath`] says why and the caller takes the locked path):
/// live entries are atomic cells (natively, not PV); the range lies inside
/// one stable range (no table there is ever freed: `unmap` is refused
/// there, so a walk without the lock never reads a freed table); the
/// change only tightens (never sets WRITABLE or clears NO_EXECUTE); and no
/// large page needs a split.
#[derive(Debug, Clone, Copy)]
pub struct CpaFast {
    root: Pfn,
    protections: [Option<StaticProtection>; MAX_PROTECTIONS],
    stable: [Option<(u64, u64)>; MAX_STABLE],
}

impl CpaFast {
    /// [`AddressSpace::change_page_attr_set_clr`] without the address
    /// space: `backend` reaches the same tables (natively a [`Native`]
    /// over the same memory, with the TLB maintenance of the CPU calling).
    /// Refusals are the locked path's and leave the tree unchanged; an
    /// [`Error::SlowPath`] found after some writes (a concurrent change
    /// made a split necessary) first flushes everything this call changed.
    ///
    /// [`Native`]: crate::backend::Native
    pub fn change_page_attr_set_clr<B: Backend>(
        &self,
        backend: &mut B,
        va: u64,
        len: u64,
        set: Flags,
        clear: Flags,
    ) -> Result<CpaDone, Error> {
        let Some(req) = cpa_request(&*backend, va, len, set, clear)? else {
            return Ok(CpaDone::default());
        };
        if backend.entry_cell(self.root, 0).is_none() {
            return Err(Error::SlowPath(SlowPath::NoAtomicEntries));
        }
        let inside = |&(s, e): &(u64, u64)| req.va >= s && req.last < e;
        if !self.stable.iter().flatten().any(inside) {
            return Err(Error::SlowPath(SlowPath::Unstable));
        }
        if set.contains(Flags::WRITABLE) || clear.contains(Flags::NO_EXECUTE) {
            return Err(Error::SlowPath(SlowPath::Loosens));
        }
        let checker = Checker {
            backend: &*backend,
            protections: &self.protections,
        };
        let mut splits = 0usize;
        checker.check(self.root, Level::L4, req.va, req.last, &req, &mut splits)?;
        if splits > 0 {
            let splits = u32::try_from(splits).unwrap_or(u32::MAX);
            return Err(Error::SlowPath(SlowPath::Split { splits }));
        }
        let mut w = AtomicWrite {
            b: &*backend,
            req: &req,
            reserve: None,
            done: CpaDone::default(),
        };
        let written = w.write(self.root, Level::L4, req.va, req.last);
        let mut done = w.done;
        if let Err(e) = written {
            if done.pages_changed > 0 {
                if (set | clear).intersects(CACHE_SELECT) {
                    backend.flush_tlb_and_cache(TlbScope::All, TlbScope::All)?;
                } else {
                    backend.flush_tlb(TlbScope::All)?;
                }
            }
            return Err(e);
        }
        cpa_flush(backend, &req, &mut done)?;
        Ok(done)
    }
}

/// The check pass over a tree: its backend and the static protections.
/// One code for the locked path ([`AddressSpace::change_page_attr_set_clr`])
/// and the lockless one ([`CpaFast`]), so both refuse exactly the same
/// changes.
struct Checker<'a, B: Backend> {
    backend: &'a B,
    protections: &'a [Option<StaticProtection>],
}

impl<B: Backend> Checker<'_, B> {
    /// The guest frame an entry points to.
    fn child_of(&self, e: Entry) -> Result<Pfn, Error> {
        self.backend
            .to_pfn(e.mfn())
            .ok_or(Error::ForeignFrame(e.mfn()))
    }

    /// The check pass: every page mapped or parked, the new entries
    /// acceptable; counts the splits the write pass will make.
    fn check(
        &self,
        table: Pfn,
        level: Level,
        start: u64,
        last: u64,
        req: &Request,
        splits: &mut usize,
    ) -> Result<(), Error> {
        for slot in slots(level, start, last) {
            let e = self.backend.read(table, slot.index);
            if !cpa_leaf(e, level) {
                if !e.is_present() {
                    return Err(Error::NotMapped { va: slot.first });
                }
                let child = self.child_of(e)?;
                let lower = level.lower().ok_or(Error::NotMapped { va: slot.first })?;
                self.check(child, lower, slot.first, slot.last, req, splits)?;
                continue;
            }
            if level != Level::L1 && self.backend.large_pages() == LargePages::None {
                return Err(Error::LargePagesUnavailable);
            }
            self.check_leaf(level, e, req)?;
            self.check_protections(level, e, slot.first, slot.last, req)?;
            // A large page that already has the attributes is left whole.
            if !slot.is_whole() && changed(e, req.flags, req.clear) != e {
                // The split keeps the attributes; the part inside the range
                // is then checked as smaller pages of the same attributes.
                *splits += 1;
                let lower = level.lower().ok_or(Error::NotMapped { va: slot.first })?;
                if lower != Level::L1 {
                    for sub in slots(lower, slot.first, slot.last) {
                        if !sub.is_whole() {
                            *splits += 1;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// One leaf's new value: never W+X, the backend's rules when present.
    fn check_leaf(&self, level: Level, e: Entry, req: &Request) -> Result<(), Error> {
        let new = changed(e, req.flags, req.clear);
        let flags = new.flags();
        if flags.contains(Flags::WRITABLE) && !flags.contains(Flags::NO_EXECUTE) {
            return Err(Error::WriteExecute);
        }
        if new.is_present() {
            let mfn = e.leaf_mfn(level);
            let frame = self.backend.to_pfn(mfn).ok_or(Error::ForeignFrame(mfn))?;
            self.backend
                .leaf_entry(level, frame, flags - Flags::HUGE_PAGE - HARDWARE_SET)?;
        }
        Ok(())
    }

    /// The static protections: the frames of leaf `e` that `[first, last]`
    /// covers, against every registered [`StaticProtection`].
    fn check_protections(
        &self,
        level: Level,
        e: Entry,
        first: u64,
        last: u64,
        req: &Request,
    ) -> Result<(), Error> {
        let new = changed(e, req.flags, req.clear);
        if new == e || self.protections.iter().all(Option::is_none) {
            return Ok(());
        }
        let span = level.entry_span();
        let addr = e.0 & ENTRY_FRAME_MASK & !(span - 1);
        let mfn = crate::types::Mfn(addr / PAGE_SIZE);
        let base = self.backend.to_pfn(mfn).ok_or(Error::ForeignFrame(mfn))?;
        let leaf_va = first & !(span - 1);
        let lo = base.0 + (first - leaf_va) / PAGE_SIZE;
        let hi = base.0 + (last - leaf_va) / PAGE_SIZE + 1;
        for p in self.protections.iter().flatten() {
            let (from, to) = (lo.max(p.first.0), hi.min(p.end.0));
            if from < to && p.breaks(e, new, req.flags) {
                return Err(Error::StaticProtection {
                    va: first + (from - lo) * PAGE_SIZE,
                    pfn: Pfn(from),
                    region: p.region,
                });
            }
        }
        Ok(())
    }
}

impl Request {
    /// The page-by-page flush of the request's range.
    fn flush_scope(&self) -> TlbScope {
        TlbScope::Range {
            start: self.va,
            pages: (self.last - self.va) / PAGE_SIZE + 1,
        }
    }
}
