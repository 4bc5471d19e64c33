//! Lazy-MMU batches: many address-space calls, one drain.
//!
//! Invariant: inside a [`LazyBatch`] calls queue their writes without
//! draining; every read (translate, the walks of later calls) already sees
//! the queued values; the batch is drained when the guard ends — by
//! [`LazyBatch::finish`], which returns the result, or by `Drop`, which
//! keeps a failure for the next call on the address space to report. A TLB
//! flush inside the batch drains first, so no flush ever precedes the write
//! it is for. Batches nest; only the outermost drains.

use core::ops::{Deref, DerefMut};

use crate::backend::Backend;
use crate::entry::Flags;
use crate::phys::FrameAllocator;
use crate::space::{check_wx, AddressSpace, Error, Flush, Translation};

/// An open lazy batch on an address space (derefs to it).
pub struct LazyBatch<'a, B: Backend, A: FrameAllocator> {
    space: &'a mut AddressSpace<B, A>,
    finished: bool,
}

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
    /// Opens a lazy batch: calls made through the guard are drained
    /// together when it ends.
    pub fn lazy(&mut self) -> LazyBatch<'_, B, A> {
        self.enter_lazy();
        LazyBatch {
            space: self,
            finished: false,
        }
    }
}

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
    /// Opens a lazy batch without a guard, for a kernel whose batch must
    /// outlive the borrow of the space (a batch kept open across releases
    /// of the lock around a shared space). Every [`Self::open_lazy`] must be
    /// matched by one [`Self::close_lazy`]; prefer [`Self::lazy`].
    pub fn open_lazy(&mut self) {
        self.enter_lazy();
    }

    /// Closes a batch opened by [`Self::open_lazy`], draining it when it is
    /// the outermost.
    pub fn close_lazy(&mut self) -> Result<(), Error> {
        self.leave_lazy()
    }
}

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
    /// Runs `f(va, translation)` on every mapped page of `[va, va + len)`
    /// (a large page once, at its start, and only when covered whole) and
    /// gives the page the flags `f` returns (`None`: unchanged), all in one
    /// batch. Holes are skipped. `f` is called twice per page — once to
    /// check every new entry (nothing is written if one is refused: W+X
    /// without `allow_wx`, flags the backend refuses), once to write — so it
    /// must depend only on its arguments. If Xen refuses a page made
    /// writable, every entry is restored (from an undo log in frames
    /// borrowed from the allocator).
    pub fn apply_to_range(
        &mut self,
        va: u64,
        len: u64,
        allow_wx: bool,
        f: impl Fn(u64, Translation) -> Option<Flags>,
    ) -> Result<Flush, Error> {
        let Some(last) = self.checked_range(va, len)? else {
            return Ok(Flush::none());
        };
        let mut adds_writable = false;
        // Pass 1: every new entry is acceptable.
        self.visit_range(va, last, &mut |space, _t, level, _i, at, e| {
            let t = space.leaf_translation(level, e)?;
            if let Some(flags) = f(at, t) {
                check_wx(flags, allow_wx)?;
                space.backend().leaf_entry(level, t.pfn, flags)?;
                adds_writable |= flags.contains(Flags::WRITABLE);
            }
            Ok(())
        })?;
        // Pass 2: write, in one batch. Where the backend may refuse a page
        // made writable (PV: a page-table frame), every entry is restored
        // from an undo log.
        let refusable = self.backend().caps().read_only_tables && adds_writable;
        self.with_undo(va, last, refusable, &mut |space| {
            space.enter_lazy();
            let written = space.visit_range(va, last, &mut |space, table, level, i, at, e| {
                let t = space.leaf_translation(level, e)?;
                match f(at, t) {
                    Some(flags) => space.rewrite_leaf(table, level, i, e, flags),
                    None => Ok(()),
                }
            });
            let left = space.leave_lazy();
            written.and(left)?;
            if refusable {
                // The outcome must be known before the undo log goes.
                space.drain()
            } else {
                space.settle()
            }
        })?;
        Ok(Flush::range(va, len))
    }
}

impl<B: Backend, A: FrameAllocator> LazyBatch<'_, B, A> {
    /// Ends the batch, draining it (when outermost), and reports the result.
    pub fn finish(mut self) -> Result<(), Error> {
        self.finished = true;
        self.space.leave_lazy()
    }
}

impl<B: Backend, A: FrameAllocator> Deref for LazyBatch<'_, B, A> {
    type Target = AddressSpace<B, A>;
    fn deref(&self) -> &Self::Target {
        self.space
    }
}

impl<B: Backend, A: FrameAllocator> DerefMut for LazyBatch<'_, B, A> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.space
    }
}

impl<B: Backend, A: FrameAllocator> Drop for LazyBatch<'_, B, A> {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.space.leave_lazy() {
                self.space.set_sticky(e);
            }
        }
    }
}
