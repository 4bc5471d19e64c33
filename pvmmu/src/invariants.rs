//! The invariant walker: walks a tree and reports every rule it breaks.
//!
//! Invariant: the checker walks with [`crate::walk`] and only reads (queued
//! writes count) and reports each violation once per offending entry,
//! through a callback (no allocation). Rules:
//! * no leaf maps a page-table frame writable (needs an [`Oracle`] that knows
//!   which frames are tables: Xen's page types, or a set the caller built
//!   with [`for_each_table`]) — checked under PV, where Xen forbids it;
//! * every live table has the type Xen needs for its level, and the root is
//!   pinned (PV, with an oracle);
//! * no leaf is writable and executable ([`Rules::wx`]);
//! * no mapping inside Xen's hole (PV: L4 slots 256..=271 belong to Xen and
//!   are skipped by the walker, anything else in the range is reported);
//! * every present entry points to a frame the guest owns;
//! * PV: no PSE, PWT or PCD in any entry (GLOBAL may be Xen's own doing).

use crate::backend::Backend;
use crate::entry::{Flags, Level};
use crate::types::{Mfn, Pfn};
use crate::walk::{self, Step, TableReader};

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
    /// Under PV: 4 KiB leaves may carry cache attributes (PWT, PCD, PAT:
    /// the domain has I/O privilege and changes caching through CPA).
    pub pv_cache: bool,
}

impl Rules {
    /// The rules `backend` asks for (PV rules where tables are read-only),
    /// W^X included.
    pub fn for_backend<B: Backend>(backend: &B) -> Self {
        Self {
            pv: backend.caps().read_only_tables,
            wx: true,
            pv_cache: backend.caps().read_only_tables && backend.cache_encoding().is_some(),
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

pub use crate::walk::for_each_table;

/// Walks the tree at `root` and reports every violation; returns how many.
/// `backend` is any [`TableReader`]: a backend, or the kernel's own reader.
pub fn check<R: TableReader + ?Sized>(
    backend: &R,
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
        if let (Some(o), Some(mfn)) = (oracle, backend.machine_frame(root)) {
            if !o.is_pinned(mfn) {
                emit(Violation::RootNotPinned { mfn });
            }
        }
    }
    let hole = backend.skipped_range();
    walk::for_each(backend, root, &mut |step| match step {
        Step::Table { table, level } => {
            if rules.pv {
                if let (Some(o), Some(mfn)) = (oracle, backend.machine_frame(table)) {
                    let found = o.table_level(mfn);
                    if found != Some(level) {
                        emit(Violation::WrongType { mfn, level, found });
                    }
                }
            }
            true
        }
        Step::Entry {
            level,
            va,
            entry: e,
            child,
            ..
        } => {
            if rules.pv {
                if let Some((start, end)) = hole {
                    if va >= start && va < end {
                        emit(Violation::InXenHole { va });
                        return false;
                    }
                }
                // GLOBAL is not checked: Xen sets it itself on user pages of
                // a 64-bit PV guest (the backend never writes it).
                let forbidden = if rules.pv_cache && level == Level::L1 {
                    Flags::empty()
                } else {
                    Flags::HUGE_PAGE | Flags::WRITE_THROUGH | Flags::NO_CACHE
                };
                if e.flags().intersects(forbidden) {
                    emit(Violation::ForbiddenFlags {
                        va,
                        level,
                        raw: e.0,
                    });
                }
            }
            let mfn = if e.is_leaf(level) {
                e.leaf_mfn(level)
            } else {
                e.mfn()
            };
            if backend.guest_frame(mfn).is_none() {
                emit(Violation::ForeignFrame { va, level, mfn });
                return false;
            }
            if e.is_leaf(level) {
                let flags = e.flags();
                if rules.wx && flags.contains(Flags::WRITABLE) && !flags.contains(Flags::NO_EXECUTE)
                {
                    emit(Violation::WriteExecute { va });
                }
                if rules.pv && flags.contains(Flags::WRITABLE) {
                    if let Some(o) = oracle {
                        if o.table_level(e.mfn()).is_some() {
                            emit(Violation::WritableTable { va, mfn: e.mfn() });
                        }
                    }
                }
            }
            child.is_some()
        }
    });
    count
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
