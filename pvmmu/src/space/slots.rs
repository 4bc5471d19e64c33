//! How a range splits over the entries of one table, and the per-leaf
//! visit of a range that map, protect, the undo log and
//! [`AddressSpace::apply_to_range`] share.
//!
//! Invariant: [`slots`] yields, in order, each entry of a `level` table
//! that `[start, last]` touches with the part of the range inside the
//! entry's span; [`Slot::is_whole`] is the one "range covers the entry"
//! test.

use super::{AddressSpace, Error};
use crate::backend::Backend;
use crate::entry::{Entry, Level};
use crate::phys::FrameAllocator;
use crate::types::{Pfn, ENTRIES};

/// The part of a range `[start, last]` that one entry of a `level` table
/// covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Index of the entry in its table.
    pub(crate) index: usize,
    /// First address the entry maps.
    pub(crate) base: u64,
    /// First address of the range inside the entry's span.
    pub(crate) first: u64,
    /// Last address of the range inside the entry's span.
    pub(crate) last: u64,
    /// Bytes one entry of the table maps.
    span: u64,
}

impl Slot {
    /// Whether the range covers the entry's whole span.
    pub(crate) fn is_whole(&self) -> bool {
        self.first == self.base && self.last == self.base | (self.span - 1)
    }
}

/// The entries of a `level` table that `[start, last]` touches (both inside
/// one table's span), in order.
pub(crate) fn slots(level: Level, start: u64, last: u64) -> impl Iterator<Item = Slot> {
    let span = level.entry_span();
    let base = table_base(level, start);
    (level.index(start)..=level.index(last)).map(move |index| {
        let e_base = base | (index as u64 * span);
        Slot {
            index,
            base: e_base,
            first: start.max(e_base),
            last: last.min(e_base | (span - 1)),
            span,
        }
    })
}

/// First address the `level` table holding `va` maps.
pub(crate) fn table_base(level: Level, va: u64) -> u64 {
    va & !(level.entry_span() * ENTRIES as u64 - 1)
}

/// Whether `[start, last]` covers the whole span of the `level` table
/// holding it.
pub(crate) fn covers_table(level: Level, start: u64, last: u64) -> bool {
    let base = table_base(level, start);
    start == base && last == base | (level.entry_span() * ENTRIES as u64 - 1)
}

/// A per-leaf visitor: `(space, table, level, index, va, entry)`.
pub(crate) type LeafVisit<'a, S> =
    dyn FnMut(&mut S, Pfn, Level, usize, u64, Entry) -> Result<(), Error> + 'a;

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
    /// Calls `visit(space, table, level, index, va, entry)` for every
    /// present leaf of `[va, last]` (a large page must be covered whole).
    pub(crate) fn visit_range(
        &mut self,
        va: u64,
        last: u64,
        visit: &mut LeafVisit<'_, Self>,
    ) -> Result<(), Error> {
        let root = self.root;
        self.visit_leaves(root, Level::L4, va, last, visit)
    }

    fn visit_leaves(
        &mut self,
        table: Pfn,
        level: Level,
        start: u64,
        last: u64,
        visit: &mut LeafVisit<'_, Self>,
    ) -> Result<(), Error> {
        for slot in slots(level, start, last) {
            let e = self.backend.read(table, slot.index);
            if !e.is_present() {
                continue;
            }
            if e.is_leaf(level) {
                if !slot.is_whole() {
                    return Err(Error::SplitsLargePage { va: slot.base });
                }
                visit(self, table, level, slot.index, slot.base, e)?;
            } else if let (Ok(child), Some(lower)) = (self.child_of(e), level.lower()) {
                self.visit_leaves(child, lower, slot.first, slot.last, visit)?;
            }
        }
        Ok(())
    }
}
