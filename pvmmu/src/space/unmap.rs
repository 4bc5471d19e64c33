//! Unmap: leaves cleared over a range, tables that become empty freed.
//!
//! Invariant: a checked unmap changes nothing unless every page of the
//! range is mapped and large pages are covered whole; a subtree covered
//! whole is unhooked with one write; a freed table is released (PV: its
//! aliases writable again) only after the write that unhooked it, and
//! returned to the allocator only after those writes are applied and the
//! TLB is flushed ([`AddressSpace::finish_frees`]).

use super::protect::Uniform;
use super::slots::{covers_table, slots};
use super::{AddressSpace, Error, Flush, Request};
use crate::backend::{Backend, TlbScope};
use crate::entry::{Entry, Flags, Level};
use crate::phys::FrameAllocator;
use crate::types::{Pfn, ENTRIES};

/// Freed tables waiting for their unhooking writes and a TLB flush.
pub(super) const FREE_LOG: usize = 1024;

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
    /// Unmaps `len` bytes at `va`; every page must be mapped (else
    /// [`Error::NotMapped`], nothing changed) and large pages must be
    /// covered whole. Tables that become empty are freed (after a TLB flush
    /// of everything, so the returned token is then empty).
    /// A range touching a stable range ([`AddressSpace::cpa_stable`]) is
    /// refused ([`Error::StableRange`]).
    pub fn unmap(&mut self, va: u64, len: u64) -> Result<Flush, Error> {
        let Some(last) = self.checked_range(va, len)? else {
            return Ok(Flush::none());
        };
        self.check_unstable(va, last)?;
        let req = Request::new(va, last);
        let root = self.root;
        self.check_pass(
            root,
            Level::L4,
            va,
            last,
            Flags::empty(),
            &mut Uniform::Skip,
        )?;
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
            Ok(()) => Ok(req.flush()),
            Err(e) => Err(e),
        }
    }

    /// Clears present leaves in `[start, last]` and frees tables that became
    /// empty (tolerates holes).
    pub(super) fn scrub(&mut self, start: u64, last: u64) -> Result<(), Error> {
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
        let reserved = self.backend.reserved();
        for slot in slots(level, start, last) {
            let i = slot.index;
            if let Some((rs, re)) = reserved {
                if slot.first < re && slot.last >= rs {
                    continue;
                }
            }
            let e = self.backend.read(table, i);
            if !e.is_present() {
                continue;
            }
            if e.is_leaf(level) {
                if slot.is_whole() {
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
            if slot.is_whole() || self.unmap_table(child, lower, slot.first, slot.last)? {
                self.backend.write(table, i, Entry::EMPTY)?;
                self.release_subtree(child, lower)?;
            }
        }
        if level == Level::L4 {
            return Ok(false);
        }
        if covers_table(level, start, last) {
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
                if e.is_present() && !e.is_leaf(level) {
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
    pub(super) fn finish_frees(&mut self) -> Result<(), Error> {
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
}
