//! The one tree walker: from a root down to the entry of an address, and
//! over a whole tree.
//!
//! Invariant: every walk in pvmmu goes through here (translate, the
//! `x86_64` `Mapper` impl, the PV backend's alias resolution, the bootstrap
//! and the invariant walker); it reads only through [`Backend::read`] /
//! [`Backend::scan_table`], so queued writes count; it decides what is a
//! leaf by [`Entry::is_leaf`] and nothing else; and it follows an entry only
//! to a frame the guest owns ([`Backend::to_pfn`]). Its errors are its own
//! ([`WalkError`]); each public API converts them into its own error type.

use crate::backend::Backend;
use crate::entry::{Entry, Level};
use crate::types::{Mfn, Pfn};

/// Why a walk stopped above the level it was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The entry at `level` on the way is not present.
    NotPresent {
        /// Level of the missing entry.
        level: Level,
    },
    /// An entry on the way points to a machine frame the guest does not own.
    ForeignFrame(Mfn),
}

/// An entry a walk reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Level of the table holding the entry.
    pub level: Level,
    /// The table holding the entry.
    pub table: Pfn,
    /// Index of the entry in its table.
    pub index: usize,
    /// The entry (with queued writes).
    pub entry: Entry,
}

impl Found {
    /// A present leaf (a page of [`Found::level`]'s size maps the address).
    pub fn is_leaf(&self) -> bool {
        self.entry.is_present() && self.entry.is_leaf(self.level)
    }
}

/// Walks from `root` (an L4) towards the entry of `va` at level `stop`.
/// Returns that entry, present or not, or the present leaf above `stop`
/// that maps `va` (a large page: then `found.level > stop`).
pub fn walk<B: Backend + ?Sized>(
    backend: &B,
    root: Pfn,
    va: u64,
    stop: Level,
) -> Result<Found, WalkError> {
    let mut table = root;
    let mut level = Level::L4;
    loop {
        let index = level.index(va);
        let entry = backend.read(table, index);
        let found = Found {
            level,
            table,
            index,
            entry,
        };
        let Some(lower) = level.lower().filter(|_| level > stop) else {
            return Ok(found);
        };
        if !entry.is_present() {
            return Err(WalkError::NotPresent { level });
        }
        if entry.is_leaf(level) {
            return Ok(found);
        }
        table = backend
            .to_pfn(entry.mfn())
            .ok_or(WalkError::ForeignFrame(entry.mfn()))?;
        level = lower;
    }
}

/// One step of a whole-tree traversal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Entering a table (before its entries).
    Table {
        /// The table.
        table: Pfn,
        /// Its level.
        level: Level,
    },
    /// A present entry.
    Entry {
        /// Level of the table holding it.
        level: Level,
        /// Index in that table.
        index: usize,
        /// First (canonical) virtual address the entry covers.
        va: u64,
        /// The entry.
        entry: Entry,
        /// The table it points to: `None` for a leaf or a frame the guest
        /// does not own.
        child: Option<Pfn>,
    },
}

fn sign_extend(va: u64) -> u64 {
    if va & (1 << 47) != 0 {
        va | 0xffff_0000_0000_0000
    } else {
        va
    }
}

/// Visits the tree at `root` pre-order: each table, then each of its
/// present entries, then (when `f` returns `true` for an entry with a
/// child) the child table. L4 entries whose span lies in the backend's
/// reserved range (Xen's slots under PV) are skipped. Entry by entry: no
/// 4 KiB buffer per level on a kernel stack.
pub fn for_each<R: TableReader + ?Sized>(backend: &R, root: Pfn, f: &mut dyn FnMut(Step) -> bool) {
    visit(backend, root, Level::L4, 0, f);
}

/// What a whole-tree traversal ([`for_each`], the invariant walker)
/// reads. Every [`Backend`] is one (its reads include queued writes); a
/// kernel may give its own, e.g. one that reads each table through a
/// temporary mapping instead of a permanent alias.
pub trait TableReader {
    /// A virtual range the traversal skips (Xen's hole under PV).
    fn skipped_range(&self) -> Option<(u64, u64)>;
    /// Machine frame of `pfn`.
    fn machine_frame(&self, pfn: Pfn) -> Option<Mfn>;
    /// Guest frame of `mfn`, `None` if the guest does not own it.
    fn guest_frame(&self, mfn: Mfn) -> Option<Pfn>;
    /// Calls `f(index, entry)` for every entry of table `table`.
    fn entries(&self, table: Pfn, f: &mut dyn FnMut(usize, Entry));
}

impl<B: Backend + ?Sized> TableReader for B {
    fn skipped_range(&self) -> Option<(u64, u64)> {
        self.reserved()
    }
    fn machine_frame(&self, pfn: Pfn) -> Option<Mfn> {
        self.to_mfn(pfn)
    }
    fn guest_frame(&self, mfn: Mfn) -> Option<Pfn> {
        self.to_pfn(mfn)
    }
    fn entries(&self, table: Pfn, f: &mut dyn FnMut(usize, Entry)) {
        self.scan_table(table, f)
    }
}

fn visit<R: TableReader + ?Sized>(
    b: &R,
    table: Pfn,
    level: Level,
    base: u64,
    f: &mut dyn FnMut(Step) -> bool,
) {
    f(Step::Table { table, level });
    let reserved = b.skipped_range();
    b.entries(table, &mut |index, entry| {
        if !entry.is_present() {
            return;
        }
        let va = sign_extend(base | ((index as u64) << level.shift()));
        if level == Level::L4 {
            if let Some((start, end)) = reserved {
                if va >= start && va.wrapping_add(level.entry_span() - 1) < end {
                    return;
                }
            }
        }
        let leaf = entry.is_leaf(level);
        let child = if leaf {
            None
        } else {
            b.guest_frame(entry.mfn())
        };
        let descend = f(Step::Entry {
            level,
            index,
            va,
            entry,
            child,
        });
        if let (true, Some(child), Some(lower)) = (descend, child, level.lower()) {
            visit(b, child, lower, va, f);
        }
    });
}

/// Calls `f(pfn, level)` for every table reachable from `root` (root first).
pub fn for_each_table<R: TableReader + ?Sized>(
    backend: &R,
    root: Pfn,
    f: &mut dyn FnMut(Pfn, Level),
) {
    for_each(backend, root, &mut |step| {
        if let Step::Table { table, level } = step {
            f(table, level);
        }
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Native;
    use crate::entry::{Flags, TABLE_FLAGS};
    use crate::phys::{FrameWords, PhysMem};
    use core::ptr::NonNull;
    use std::boxed::Box;
    use std::vec::Vec;

    /// 16 frames; pfn `i` is frame `i`.
    struct Frames(Vec<Box<FrameWords>>);

    // SAFETY: boxed frames, never freed or moved while the arena lives.
    unsafe impl PhysMem for Frames {
        fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
            let b = self.0.get(pfn.0 as usize)?;
            Some(NonNull::from(&**b))
        }
    }

    const GIB: u64 = 1 << 30;
    const MIB2: u64 = 1 << 21;

    /// L4 0 -> L3 1 -> L2 2 -> L1 3 (page 5 -> frame 9); L2[1] a 2 MiB
    /// page; L3[1] empty; L3[2] names a frame beyond the guest's (pfn 16).
    fn tree() -> Native<Frames> {
        let frames = Frames((0..16).map(|_| Box::new([0u64; 512])).collect());
        let mut b = Native::new(frames).with_pfn_limit(16);
        let table = |p: u64| Entry::new(Mfn(p), TABLE_FLAGS);
        let rw = Flags::PRESENT | Flags::WRITABLE;
        b.write(Pfn(0), 0, table(1)).unwrap();
        b.write(Pfn(1), 0, table(2)).unwrap();
        b.write(Pfn(1), 2, Entry((16 << 12) | TABLE_FLAGS.bits()))
            .unwrap();
        b.write(Pfn(2), 0, table(3)).unwrap();
        b.write(Pfn(2), 1, Entry::new(Mfn(0), rw | Flags::HUGE_PAGE))
            .unwrap();
        b.write(Pfn(3), 5, Entry::new(Mfn(9), rw)).unwrap();
        b
    }

    #[test]
    fn walk_stops_at_the_level_or_at_a_leaf_above_it() {
        let b = tree();
        let f = walk(&b, Pfn(0), 5 << 12, Level::L1).unwrap();
        assert_eq!((f.level, f.table, f.index), (Level::L1, Pfn(3), 5));
        assert!(f.is_leaf() && f.entry.mfn() == Mfn(9));
        let f = walk(&b, Pfn(0), 6 << 12, Level::L1).unwrap();
        assert!(!f.entry.is_present() && f.level == Level::L1);
        let f = walk(&b, Pfn(0), 5 << 12, Level::L2).unwrap();
        assert_eq!((f.level, f.table, f.index), (Level::L2, Pfn(2), 0));
        assert!(!f.is_leaf(), "an L2 entry pointing to an L1 is no leaf");
        let f = walk(&b, Pfn(0), MIB2 + 0x5000, Level::L1).unwrap();
        assert_eq!((f.level, f.index), (Level::L2, 1));
        assert!(f.is_leaf(), "the 2 MiB page above L1");
    }

    #[test]
    fn walk_reports_holes_and_foreign_frames() {
        let b = tree();
        assert_eq!(
            walk(&b, Pfn(0), GIB, Level::L1),
            Err(WalkError::NotPresent { level: Level::L3 })
        );
        assert_eq!(
            walk(&b, Pfn(0), 1 << 39, Level::L1),
            Err(WalkError::NotPresent { level: Level::L4 })
        );
        assert_eq!(
            walk(&b, Pfn(0), 2 * GIB, Level::L1),
            Err(WalkError::ForeignFrame(Mfn(16)))
        );
    }

    #[test]
    fn for_each_visits_tables_pre_order_and_skips_foreign_frames() {
        let b = tree();
        let mut tables = Vec::new();
        let mut leaves = Vec::new();
        for_each(&b, Pfn(0), &mut |step| {
            match step {
                Step::Table { table, level } => tables.push((table, level)),
                Step::Entry {
                    level, va, entry, ..
                } if entry.is_leaf(level) => leaves.push((va, level)),
                Step::Entry { .. } => {}
            }
            true
        });
        assert_eq!(
            tables,
            [
                (Pfn(0), Level::L4),
                (Pfn(1), Level::L3),
                (Pfn(2), Level::L2),
                (Pfn(3), Level::L1)
            ]
        );
        assert_eq!(leaves, [(5 << 12, Level::L1), (MIB2, Level::L2)]);
    }
}
