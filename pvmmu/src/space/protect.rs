//! Protect: new leaf flags over a range, with the undo log that makes a
//! refused PV change reversible.
//!
//! Invariant: nothing is written unless a read-only check pass found every
//! page mapped, large pages covered whole and the new flags acceptable (W^X
//! by [`check_wx`], the backend's rules once per table). Where the backend
//! may refuse a page made writable ([`crate::backend::Caps::read_only_tables`])
//! and the old flags differ page by page, the old leaves are recorded first
//! ([`AddressSpace::with_undo`], the one place that records them) and
//! written back if the change fails; uniform old flags are restored by a
//! second protect instead.

use super::slots::slots;
use super::{check_wx, AddressSpace, Error, Flush, Request};
use crate::backend::Backend;
use crate::entry::{Entry, Flags, Level, HARDWARE_SET};
use crate::phys::FrameAllocator;
use crate::types::{Pfn, ENTRIES, ENTRY_FRAME_MASK, PAGE_SIZE};

/// Old flags seen by the check pass.
pub(super) enum Uniform {
    /// Not tracked (unmap's check: presence only).
    Skip,
    /// No leaf seen yet.
    Unknown,
    /// Every leaf so far had these flags.
    Same(Flags),
    /// Leaves differ.
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

/// Entries per undo-log frame (word 511 links to the next frame as
/// `pfn + 1`, 0 ending the chain).
const UNDO_SLOTS: usize = ENTRIES - 1;

/// Old leaf values of a change the backend may refuse, kept in frames
/// borrowed from the allocator for the length of the call.
#[derive(Default)]
struct UndoLog {
    head: Option<Pfn>,
    tail: Pfn,
    used: usize,
}

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
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
        let Some(last) = self.checked_range(va, len)? else {
            return Ok(Flush::none());
        };
        check_wx(flags, allow_wx)?;
        let req = Request {
            flags,
            ..Request::new(va, last)
        };
        let mut uniform = Uniform::Unknown;
        let root = self.root;
        self.check_pass(root, Level::L4, va, last, flags, &mut uniform)?;
        // The backend may refuse a page made writable (PV: a page-table
        // frame). To undo exactly when the old flags differ page by page,
        // the old entries go to an undo log first.
        let refusable = self.backend.caps().read_only_tables && flags.contains(Flags::WRITABLE);
        let logged = refusable && matches!(uniform, Uniform::Mixed);
        let result = self.with_undo(va, last, logged, &mut |space| {
            space.protect_table(root, Level::L4, va, last, flags)?;
            // With an undo log the outcome must be known now.
            if logged {
                space.drain()
            } else {
                space.settle()
            }
        });
        if result.is_err() {
            if let Uniform::Same(old) = uniform {
                let _ = self.backend.drain();
                let _ = self
                    .protect_table(root, Level::L4, va, last, old)
                    .and_then(|()| self.backend.drain().map_err(Error::from));
            }
        }
        result.map(|()| req.flush())
    }

    // ---- the check pass ----------------------------------------------------

    /// Read-only pass: every page of `[start, last]` is mapped, large pages
    /// are covered whole and (unless `uniform` is [`Uniform::Skip`]) the
    /// backend accepts `flags` on them; records the old flags in `uniform`.
    pub(super) fn check_pass(
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

    /// Checks the entries of one table; the flags once per table (the
    /// frames are already mapped, so only the flags can be refused).
    fn check_entries(
        &self,
        level: Level,
        start: u64,
        last: u64,
        flags: Flags,
        uniform: &mut Uniform,
        read: &dyn Fn(usize) -> Entry,
    ) -> Result<(), Error> {
        let mut flags_checked = false;
        for slot in slots(level, start, last) {
            let e = read(slot.index);
            if !e.is_present() {
                return Err(Error::NotMapped { va: slot.first });
            }
            if !e.is_leaf(level) {
                let child = self.child_of(e)?;
                let lower = level.lower().ok_or(Error::NotMapped { va: slot.first })?;
                self.check_pass(child, lower, slot.first, slot.last, flags, uniform)?;
                continue;
            }
            if !slot.is_whole() {
                return Err(Error::SplitsLargePage { va: slot.base });
            }
            if !matches!(uniform, Uniform::Skip) {
                let frame = self.leaf_frame(level, e)?;
                if !flags_checked {
                    self.backend.leaf_entry(level, frame, flags)?;
                    flags_checked = true;
                }
                let old = self
                    .backend
                    .normalize(e.flags() - Flags::HUGE_PAGE - HARDWARE_SET);
                uniform.see(old);
            }
        }
        Ok(())
    }

    // ---- the write pass ----------------------------------------------------

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
        for slot in slots(level, start, last) {
            let e = self.backend.read(table, slot.index);
            if !e.is_present() {
                continue;
            }
            if e.is_leaf(level) {
                self.rewrite_leaf(table, level, slot.index, e, flags)?;
            } else if let Some(lower) = level.lower() {
                let child = self.child_of(e)?;
                self.protect_table(child, lower, slot.first, slot.last, flags)?;
            }
        }
        Ok(())
    }

    /// The L1 step of protect: one snapshot of the table, the new flags
    /// built by the backend once for the run.
    #[inline(never)]
    fn protect_l1(&mut self, table: Pfn, start: u64, last: u64, flags: Flags) -> Result<(), Error> {
        let mut entries = [0u64; ENTRIES];
        self.backend.read_table(table, &mut entries);
        let (first, end) = (Level::L1.index(start), Level::L1.index(last));
        let mut bits = None;
        for (i, raw) in entries.iter().enumerate().take(end + 1).skip(first) {
            let e = Entry(*raw);
            if !e.is_present() {
                continue;
            }
            let frame = self.child_of(e)?;
            let bits = match bits {
                Some(b) => b,
                None => {
                    let b = self.backend.leaf_entry(Level::L1, frame, flags)?.0 & !ENTRY_FRAME_MASK;
                    *bits.insert(b)
                }
            };
            // The PAT bit stays: `flags` cannot name it, and protect changes
            // access, not the cache type.
            let new = Entry((e.0 & ENTRY_FRAME_MASK) | e.pat_bit(Level::L1) | bits);
            self.write_leaf(table, i, e, new)?;
        }
        Ok(())
    }

    /// Writes leaf `new` over `old` unless they differ only in what the
    /// hardware or Xen set.
    fn write_leaf(&mut self, table: Pfn, i: usize, old: Entry, new: Entry) -> Result<(), Error> {
        let same = new.mfn() == old.mfn()
            && self.backend.normalize(new.flags())
                == self.backend.normalize(old.flags() - HARDWARE_SET);
        if !same {
            self.backend.write(table, i, new)?;
        }
        Ok(())
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
        let frame = self.leaf_frame(level, e)?;
        // The PAT bit stays (see `protect_l1`).
        let new = Entry(self.backend.leaf_entry(level, frame, flags)?.0 | e.pat_bit(level));
        self.write_leaf(table, index, e, new)
    }

    // ---- the undo log ------------------------------------------------------

    /// Runs `apply` (which must leave nothing queued) over the leaves of
    /// `[va, last]`; when `record`, the old leaves are logged first and
    /// written back if `apply` fails.
    pub(crate) fn with_undo(
        &mut self,
        va: u64,
        last: u64,
        record: bool,
        apply: &mut dyn FnMut(&mut Self) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut log = UndoLog::default();
        if record {
            let recorded = self.visit_range(va, last, &mut |space, _, _, _, _, e| {
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

    /// Writes back every recorded entry that changed, in walk order.
    fn undo_restore(&mut self, log: &UndoLog, va: u64, last: u64) -> Result<(), Error> {
        let mut frame = log.head;
        let mut slot = 0usize;
        self.visit_range(va, last, &mut |space, table, _, i, _, e| {
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
        })?;
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
}
