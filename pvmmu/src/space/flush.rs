//! What a call owes the TLB, and when queued writes are applied.
//!
//! Invariant: a changed mapping is either flushed by the call itself (when
//! it freed tables: one full flush submitted with the queued writes) or
//! handed back as a `#[must_use]` [`Flush`]; queued writes are applied at
//! the end of every call outside a lazy batch ([`AddressSpace::settle`]),
//! before any TLB flush, and a failed drain frees the subtrees whose hook
//! never landed.

use hypercall::MmuHypercalls;

use super::{AddressSpace, Error};
use crate::backend::xen::{AliasMap, RequestBuffer};
use crate::backend::{Backend, TlbScope, XenPv};
use crate::entry::Entry;
use crate::phys::{FrameAllocator, FrameMap, PhysMem};
use crate::types::{Pfn, PAGE_SIZE};

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
    pub(crate) fn range(start: u64, bytes: u64) -> Self {
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

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
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

    /// Ends a call: drains unless inside a lazy batch.
    pub(crate) fn settle(&mut self) -> Result<(), Error> {
        if self.lazy > 0 {
            return Ok(());
        }
        self.drain()
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
}

impl<H, M, F, Al, Q, A> AddressSpace<XenPv<H, M, F, Al, Q>, A>
where
    H: MmuHypercalls,
    M: PhysMem,
    F: FrameMap,
    Al: AliasMap,
    Q: RequestBuffer,
    A: FrameAllocator,
{
    /// Sends the writes queued so far (an open lazy batch's included: the
    /// batch stays open, empty) followed by `val` into entry `index` of
    /// `table` and a local invalidation of `va`, in one hypercall. For an
    /// entry the kernel changes outside this space's calls (a kmap slot
    /// in a table the space never frees), so the change joins the batch in
    /// order instead of going out on its own.
    pub fn send_with_entry(
        &mut self,
        table: Pfn,
        index: usize,
        val: Entry,
        va: u64,
    ) -> Result<(), Error> {
        let r = self
            .backend
            .send_entry_invlpg_local(table, index, val, va)
            .map_err(Error::from);
        self.after_submit(r)
    }
}
