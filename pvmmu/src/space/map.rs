//! Map: new leaves over a range, new tables where the range needs them.
//!
//! Invariant: a table this call creates is private until its subtree is
//! complete (filled with plain stores, then sealed), and is hooked by one
//! queued write into a live table; every hook queued since the last drain
//! is logged, so that a refused drain frees exactly the subtrees whose hook
//! never landed. On failure the leaves written are cleared and the new
//! tables freed ([`AddressSpace::rollback_map`]).

use super::slots::slots;
use super::{check_wx, AddressSpace, Error, Flush, Granule, Request};
use crate::backend::Backend;
use crate::entry::{Entry, Flags, Level};
use crate::phys::FrameAllocator;
use crate::types::{Pfn, ENTRIES, PAGE_SIZE};

/// Hooks of new subtrees queued since the last drain (what must be undone
/// if a drain fails).
pub(super) const HOOK_LOG: usize = 64;

#[derive(Clone, Copy)]
pub(super) struct Hook {
    child: Pfn,
    parent: Pfn,
    index: u16,
    level: Level,
}

pub(super) const NO_HOOK: Hook = Hook {
    child: Pfn(0),
    parent: Pfn(0),
    index: 0,
    level: Level::L1,
};

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
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
        if !self.granule_allowed(granule) {
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
        check_wx(flags, allow_wx)?;
        // Validate the flags once, against the first frame (each run of
        // leaves is checked once more by the backend).
        self.backend.leaf_entry(granule.level(), pfn, flags)?;
        let mut req = Request {
            pfn: pfn.0,
            flags,
            leaf: granule.level(),
            ..Request::new(va, last)
        };
        self.nhooks = 0;
        let root = self.root;
        let result = self
            .map_table(root, Level::L4, false, va, last, &mut req)
            .and_then(|()| self.settle());
        match result {
            Ok(()) => Ok(req.flush()),
            Err(e) => {
                self.rollback_map(&req);
                Err(e)
            }
        }
    }

    fn map_table(
        &mut self,
        table: Pfn,
        level: Level,
        private: bool,
        start: u64,
        last: u64,
        req: &mut Request,
    ) -> Result<(), Error> {
        let Some(lower) = level.lower().filter(|_| level != req.leaf) else {
            // The leaves of `[start, last]` in this table: one run, its
            // flags checked once by the backend.
            let first = level.index(start);
            let n = level.index(last) - first + 1;
            if !private {
                return self.map_live_leaves(table, level, first, n, start, req);
            }
            let frame = self
                .backend
                .frame_ptr(table)
                .ok_or(Error::BadFrame(table))?;
            // SAFETY: `table` is private (allocated and zeroed in this call,
            // not yet sealed), so nothing else reads or writes it and plain
            // stores are allowed; `first + n <= 512` keeps the slice inside
            // the frame.
            let words = unsafe { &mut (&mut *frame.as_ptr())[first..first + n] };
            let step = level.entry_span() / PAGE_SIZE;
            self.backend
                .fill_leaves(level, Pfn(req.pfn_at(start)), step, req.flags, words)?;
            req.done = Some(last);
            return Ok(());
        };
        for slot in slots(level, start, last) {
            let (i, s, l) = (slot.index, slot.first, slot.last);
            let e = if private {
                Entry::EMPTY
            } else {
                self.backend.read(table, i)
            };
            if e.is_present() {
                if e.is_leaf(level) {
                    return Err(Error::AlreadyMapped { va: s });
                }
                let child = self.child_of(e)?;
                self.map_table(child, lower, false, s, l, req)?;
                continue;
            }
            let child = self.allocate_table().ok_or(Error::OutOfFrames)?;
            if let Err(e) = self.backend.new_table(child) {
                self.alloc.free(child);
                return Err(e.into());
            }
            self.tables_created += 1;
            let built = self
                .map_table(child, lower, true, s, l, req)
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
                self.hook(table, i, child, lower, te)?;
            }
        }
        Ok(())
    }

    /// Hooks a complete new subtree into live `table[i]`, logging the hook.
    fn hook(
        &mut self,
        table: Pfn,
        i: usize,
        child: Pfn,
        lower: Level,
        te: Entry,
    ) -> Result<(), Error> {
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
        Ok(())
    }

    /// The leaves of `[start, last]` in a live table: every slot checked
    /// free first, then the new entries built in one run and written.
    #[inline(never)]
    fn map_live_leaves(
        &mut self,
        table: Pfn,
        level: Level,
        first: usize,
        n: usize,
        start: u64,
        req: &mut Request,
    ) -> Result<(), Error> {
        let span = level.entry_span();
        let mut entries = [0u64; ENTRIES];
        self.backend.read_table(table, &mut entries);
        if let Some(k) = entries[first..first + n]
            .iter()
            .position(|&raw| Entry(raw).is_present())
        {
            // Nothing is written into this table: the call fails and the
            // rollback clears what earlier tables got.
            return Err(Error::AlreadyMapped {
                va: start + k as u64 * span,
            });
        }
        // The snapshot is no longer needed: it holds the new run.
        let run = &mut entries[..n];
        let step = span / PAGE_SIZE;
        self.backend
            .fill_leaves(level, Pfn(req.pfn_at(start)), step, req.flags, run)?;
        for (k, &raw) in run.iter().enumerate() {
            self.backend.write(table, first + k, Entry(raw))?;
            req.done = Some(start + (k as u64 + 1) * span - 1);
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
                if e.is_present() && !e.is_leaf(level) {
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
    pub(super) fn reclaim_lost_hooks(&mut self) {
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

    fn rollback_map(&mut self, req: &Request) {
        // Make the state concrete: apply what is queued (a refusal drops the
        // rest), then free subtrees whose hook did not land.
        // A hook is checked against memory, so hooks that landed (in this
        // drain or an earlier one) are left alone.
        let _ = self.backend.drain();
        self.reclaim_lost_hooks();
        if let Some(last) = req.done {
            let _ = self.scrub(req.va, last);
        }
        let _ = self.settle();
        let _ = self.finish_frees();
    }
}
