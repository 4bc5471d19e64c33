//! The invariant walker: walks a tree and reports every rule it breaks.
//!
//! Invariant: the walker only reads (through [`Backend::read`], so queued
//! writes count) and reports each violation once per offending entry,
//! through a callback (no allocation). Rules:
//! * no leaf maps a page-table frame writable (needs an [`Oracle`] that knows
//!   which frames are tables: Xen's page types, or a set the caller built
//!   with [`for_each_table`]) — checked under PV, where Xen forbids it;
//! * every live table has the type Xen needs for its level, and the root is
//!   pinned (PV, with an oracle);
//! * no leaf is writable and executable ([`Rules::wx`]);
//! * no mapping inside Xen's hole (PV: L4 slots 256..=271 belong to Xen and
//!   are skipped, anything else in the range is reported);
//! * every present entry points to a frame the guest owns;
//! * PV: no PSE, PWT or PCD in any entry (GLOBAL may be Xen's own doing).

use crate::backend::{Backend, Kind};
use crate::entry::{Flags, Level};
use crate::types::{Mfn, Pfn};

/// What the hypervisor (or a model of it, or the caller) knows about frames.
pub trait Oracle {
    /// The table level frame `mfn` is typed as, `None` if it is no table.
    fn table_level(&self, mfn: Mfn) -> Option<Level>;
    /// Whether `mfn` is pinned.
    fn is_pinned(&self, mfn: Mfn) -> bool;
}

/// Which rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Xen PV rules (hole, entry flags, writable tables, types, pins).
    pub pv: bool,
    /// Report writable + executable leaves.
    pub wx: bool,
}

impl Rules {
    /// The rules for `backend`'s kind, W^X included.
    pub fn for_backend<B: Backend>(backend: &B) -> Self {
        Self {
            pv: backend.kind() == Kind::XenPv,
            wx: true,
        }
    }
}

/// One broken rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A leaf maps a page-table frame writable.
    WritableTable {
        /// Virtual address of the leaf.
        va: u64,
        /// The table frame.
        mfn: Mfn,
    },
    /// A live table lacks the type its level needs.
    WrongType {
        /// The table frame.
        mfn: Mfn,
        /// Level it is used at.
        level: Level,
        /// Type the oracle reports.
        found: Option<Level>,
    },
    /// The root is not pinned (PV).
    RootNotPinned {
        /// The root frame.
        mfn: Mfn,
    },
    /// A leaf is writable and executable.
    WriteExecute {
        /// Virtual address of the leaf.
        va: u64,
    },
    /// A mapping inside Xen's hole.
    InXenHole {
        /// Virtual address.
        va: u64,
    },
    /// A present entry points outside the guest's frames.
    ForeignFrame {
        /// First virtual address the entry covers.
        va: u64,
        /// Level of the entry.
        level: Level,
        /// The frame.
        mfn: Mfn,
    },
    /// An entry carries flags the backend's rules forbid (PV: PSE, PWT,
    /// PCD, GLOBAL).
    ForbiddenFlags {
        /// First virtual address the entry covers.
        va: u64,
        /// Level of the entry.
        level: Level,
        /// The raw entry.
        raw: u64,
    },
}

const XEN_SLOTS: core::ops::RangeInclusive<usize> = 256..=271;

fn sign_extend(va: u64) -> u64 {
    if va & (1 << 47) != 0 {
        va | 0xffff_0000_0000_0000
    } else {
        va
    }
}

/// Calls `f(pfn, level)` for every table reachable from `root` (root first).
pub fn for_each_table<B: Backend>(backend: &B, root: Pfn, f: &mut dyn FnMut(Pfn, Level)) {
    fn walk<B: Backend>(b: &B, table: Pfn, level: Level, f: &mut dyn FnMut(Pfn, Level)) {
        f(table, level);
        let Some(lower) = level.lower() else { return };
        // Entry by entry (no 4 KiB buffer per level on a kernel stack).
        b.scan_table(table, &mut |i, e| {
            if level == Level::L4 && b.kind() == Kind::XenPv && XEN_SLOTS.contains(&i) {
                return;
            }
            if !e.is_present() || e.is_huge() {
                return;
            }
            if let Some(child) = b.to_pfn(e.mfn()) {
                walk(b, child, lower, f);
            }
        });
    }
    walk(backend, root, Level::L4, f);
}

/// Walks the tree at `root` and reports every violation; returns how many.
pub fn check<B: Backend>(
    backend: &B,
    root: Pfn,
    rules: Rules,
    oracle: Option<&dyn Oracle>,
    report: &mut dyn FnMut(Violation),
) -> usize {
    let mut count = 0usize;
    let mut emit = |v: Violation| {
        count += 1;
        report(v);
    };
    if rules.pv {
        if let (Some(o), Some(mfn)) = (oracle, backend.to_mfn(root)) {
            if !o.is_pinned(mfn) {
                emit(Violation::RootNotPinned { mfn });
            }
        }
    }
    walk(backend, root, Level::L4, 0, rules, oracle, &mut emit);
    count
}

fn walk<B: Backend>(
    b: &B,
    table: Pfn,
    level: Level,
    base: u64,
    rules: Rules,
    oracle: Option<&dyn Oracle>,
    emit: &mut dyn FnMut(Violation),
) {
    if rules.pv {
        if let (Some(o), Some(mfn)) = (oracle, b.to_mfn(table)) {
            let found = o.table_level(mfn);
            if found != Some(level) {
                emit(Violation::WrongType { mfn, level, found });
            }
        }
    }
    let hole = b.reserved();
    // Entry by entry (no 4 KiB buffer per level on a kernel stack).
    b.scan_table(table, &mut |i, e| {
        let raw = &e.0;
        if !e.is_present() {
            return;
        }
        if rules.pv && level == Level::L4 && XEN_SLOTS.contains(&i) {
            return;
        }
        let va = sign_extend(base | ((i as u64) << level.shift()));
        if rules.pv {
            if let Some((start, end)) = hole {
                if va >= start && va < end {
                    emit(Violation::InXenHole { va });
                    return;
                }
            }
            // GLOBAL is not checked: Xen sets it itself on user pages of a
            // 64-bit PV guest (the backend never writes it).
            let forbidden = Flags::HUGE_PAGE | Flags::WRITE_THROUGH | Flags::NO_CACHE;
            if e.flags().intersects(forbidden) {
                emit(Violation::ForbiddenFlags {
                    va,
                    level,
                    raw: *raw,
                });
            }
        }
        let Some(child) = b.to_pfn(e.mfn()) else {
            emit(Violation::ForeignFrame {
                va,
                level,
                mfn: e.mfn(),
            });
            return;
        };
        let leaf = level == Level::L1 || (e.is_huge() && !rules.pv);
        if leaf {
            let flags = e.flags();
            if rules.wx && flags.contains(Flags::WRITABLE) && !flags.contains(Flags::NO_EXECUTE) {
                emit(Violation::WriteExecute { va });
            }
            if rules.pv && flags.contains(Flags::WRITABLE) {
                if let Some(o) = oracle {
                    if o.table_level(e.mfn()).is_some() {
                        emit(Violation::WritableTable { va, mfn: e.mfn() });
                    }
                }
            }
        } else if let Some(lower) = level.lower() {
            walk(b, child, lower, va, rules, oracle, emit);
        }
    });
}

/// The Xen model answers with the page types and pins it keeps.
#[cfg(any(test, feature = "model"))]
impl Oracle for crate::model::XenModel {
    fn table_level(&self, mfn: Mfn) -> Option<Level> {
        use crate::model::PageType;
        match self.page_type(mfn) {
            PageType::L1 => Some(Level::L1),
            PageType::L2 => Some(Level::L2),
            PageType::L3 => Some(Level::L3),
            PageType::L4 => Some(Level::L4),
            PageType::None | PageType::Writable => None,
        }
    }
    fn is_pinned(&self, mfn: Mfn) -> bool {
        crate::model::XenModel::is_pinned(self, mfn)
    }
}
