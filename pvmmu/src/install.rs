//! Installing a page table into a live entry, and changing a live leaf,
//! with compare-and-exchange: correct with any number of CPUs doing it to
//! the same entry at once, with no lock (natively; under Xen PV entries
//! change only through the hypervisor, which has no compare-and-exchange,
//! and none of this runs).
//!
//! **Install** ([`install_table`]): the entry holds a value that needs a
//! table under it (a large leaf to split, or nothing: a missing table).
//! The installer builds the whole table privately in a frame of its own,
//! then publishes it with one compare-and-exchange expecting the value it
//! built from. The winner's table is live, complete, at once. A loser
//! looks at what the entry holds now (the re-check): still a value that
//! needs a table (another large leaf value: a change of the whole page, or
//! the accessed/dirty bits the CPU sets) — it builds again from it in the
//! same frame; a table — it gives its frame back and continues on that
//! table. So: exactly one table per entry, no frame leaked, and a walker
//! reading the entry meanwhile sees the old value or the complete new
//! table, never a hole (the exchange releases the table's contents; the
//! reader's load acquires them).
//!
//! **Leaf update** ([`update_leaf`]): a compare-and-exchange loop that
//! applies a change to the entry's *current* value, so two changes of
//! different bits of one leaf both land, and a leaf that became a table
//! meanwhile (split by another CPU) is reported instead of overwritten.
//!
//! The protocol is model-checked with `loom` (`tests/loom_split.rs`: two
//! CPUs splitting one large page while a third walks it, two creating the
//! same missing table, a leaf update racing a split and another update);
//! under `cfg(loom)` the tests run it over loom's atomics, natively the
//! backend hands out the live entry as a `core` atomic
//! ([`crate::backend::Backend::entry_cell`]).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::phys::FrameAllocator;
use crate::types::Pfn;

/// One live entry that can be read and compare-and-exchanged atomically.
pub trait EntryCell {
    /// The entry now (acquire: the contents of a table it points to,
    /// published by [`install_table`], are visible after this load).
    fn load(&self) -> u64;
    /// Replaces `current` by `new` if the entry still holds `current`
    /// (release on success: the new table's contents are published with
    /// it); otherwise returns what the entry holds.
    fn compare_exchange(&self, current: u64, new: u64) -> Result<(), u64>;
}

impl EntryCell for AtomicU64 {
    fn load(&self) -> u64 {
        AtomicU64::load(self, Ordering::Acquire)
    }
    fn compare_exchange(&self, current: u64, new: u64) -> Result<(), u64> {
        AtomicU64::compare_exchange(self, current, new, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
    }
}

#[cfg(loom)]
impl EntryCell for loom::sync::atomic::AtomicU64 {
    fn load(&self) -> u64 {
        loom::sync::atomic::AtomicU64::load(self, Ordering::Acquire)
    }
    fn compare_exchange(&self, current: u64, new: u64) -> Result<(), u64> {
        loom::sync::atomic::AtomicU64::compare_exchange(
            self,
            current,
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .map(|_| ())
    }
}

/// How [`install_table`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// The entry now: a table entry (this caller's or another's).
    pub entry: u64,
    /// The frame of the table this caller installed, `None` when another
    /// caller's table was found (then every frame this caller took was
    /// given back).
    pub built: Option<Pfn>,
    /// Exchanges this caller lost (each followed by the re-check).
    pub lost: u32,
}

/// Why [`install_table`] installed nothing (the entry is as it was, and
/// every frame taken was given back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallError<E> {
    /// The allocator had no frame.
    NoFrame,
    /// `build` failed.
    Build(E),
}

/// Makes sure a table is installed in `cell`: while the entry holds a
/// value for which `needs` is true, builds a table from that value in a
/// frame from `frames` (`build(frame, value)` fills the frame, privately,
/// and returns the entry pointing at it) and publishes it with one
/// compare-and-exchange. A caller that finds a table (at once, or after
/// losing the exchange) gives its frame back to `frames` and returns that
/// table's entry. See the module docs.
pub fn install_table<C: EntryCell + ?Sized, F: FrameAllocator + ?Sized, E>(
    cell: &C,
    needs: impl Fn(u64) -> bool,
    frames: &mut F,
    mut build: impl FnMut(Pfn, u64) -> Result<u64, E>,
) -> Result<Installed, InstallError<E>> {
    let mut frame: Option<Pfn> = None;
    let mut lost = 0u32;
    let mut cur = cell.load();
    loop {
        // The re-check: another CPU's table is used, not replaced.
        if !needs(cur) {
            if let Some(f) = frame.take() {
                frames.free(f);
            }
            return Ok(Installed {
                entry: cur,
                built: None,
                lost,
            });
        }
        let f = match frame.take() {
            Some(f) => f,
            None => frames.allocate().ok_or(InstallError::NoFrame)?,
        };
        let te = match build(f, cur) {
            Ok(te) => te,
            Err(e) => {
                frames.free(f);
                return Err(InstallError::Build(e));
            }
        };
        match cell.compare_exchange(cur, te) {
            Ok(()) => {
                return Ok(Installed {
                    entry: te,
                    built: Some(f),
                    lost,
                })
            }
            Err(now) => {
                lost += 1;
                frame = Some(f);
                cur = now;
            }
        }
    }
}

/// How [`update_leaf`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    /// The leaf changed from `old` to `new`.
    Changed {
        /// The value replaced.
        old: u64,
        /// The value written.
        new: u64,
    },
    /// The change leaves the current leaf as it is.
    Unchanged(u64),
    /// The entry is not a leaf (now): a table, or empty.
    NotLeaf(u64),
    /// `change` refused the current value (nothing written).
    Refused(u64),
}

/// Applies `change` to the leaf in `cell` atomically: reads the entry,
/// and while it is a leaf (`is_leaf`), replaces it by `change(value)`
/// with a compare-and-exchange, retrying on the value found if another
/// writer came first. `change` returns `None` to refuse a value.
pub fn update_leaf<C: EntryCell + ?Sized>(
    cell: &C,
    is_leaf: impl Fn(u64) -> bool,
    change: impl Fn(u64) -> Option<u64>,
) -> Leaf {
    let mut cur = cell.load();
    loop {
        if !is_leaf(cur) {
            return Leaf::NotLeaf(cur);
        }
        let Some(new) = change(cur) else {
            return Leaf::Refused(cur);
        };
        if new == cur {
            return Leaf::Unchanged(cur);
        }
        match cell.compare_exchange(cur, new) {
            Ok(()) => return Leaf::Changed { old: cur, new },
            Err(now) => cur = now,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Hands out one frame, remembers what came back.
    struct One(Option<Pfn>, Option<Pfn>);
    impl FrameAllocator for One {
        fn allocate(&mut self) -> Option<Pfn> {
            self.0.take()
        }
        fn free(&mut self, pfn: Pfn) {
            self.1 = Some(pfn);
        }
    }

    #[test]
    fn a_loser_gives_its_frame_back_and_joins_the_table_found() {
        let cell = AtomicU64::new(0x1_0000_0083);
        let mut frames = One(Some(Pfn(7)), None);
        // The "other CPU" installs its table while this one builds.
        let r = install_table::<_, _, ()>(
            &cell,
            |v| v & 0x80 != 0,
            &mut frames,
            |f, _| {
                cell.store(0x5003, Ordering::SeqCst);
                Ok(f.0 << 12 | 3)
            },
        );
        assert_eq!(
            r,
            Ok(Installed {
                entry: 0x5003,
                built: None,
                lost: 1
            })
        );
        assert_eq!(frames.1, Some(Pfn(7)));
        assert_eq!(cell.load(Ordering::SeqCst), 0x5003);
    }

    #[test]
    fn a_winner_installs_and_keeps_its_frame() {
        let cell = AtomicU64::new(0);
        let mut frames = One(Some(Pfn(9)), None);
        let r = install_table::<_, _, ()>(&cell, |v| v == 0, &mut frames, |f, _| Ok(f.0 << 12 | 3));
        assert_eq!(r.map(|i| i.built), Ok(Some(Pfn(9))));
        assert_eq!(frames.1, None);
        assert_eq!(cell.load(Ordering::SeqCst), 0x9003);
        // A failed build installs nothing and gives the frame back.
        let cell = AtomicU64::new(0);
        let mut frames = One(Some(Pfn(9)), None);
        let r = install_table(&cell, |v| v == 0, &mut frames, |_, _| Err(5));
        assert_eq!(r, Err(InstallError::Build(5)));
        assert_eq!((frames.1, cell.load(Ordering::SeqCst)), (Some(Pfn(9)), 0));
        let r = install_table(&cell, |v| v == 0, &mut frames, |_, _| Err(5));
        assert_eq!(r, Err(InstallError::NoFrame));
    }

    #[test]
    fn a_leaf_update_applies_to_the_current_value() {
        let cell = AtomicU64::new(0x1003);
        let set = |bit: u64| move |v: u64| Some(v | bit);
        assert_eq!(
            update_leaf(&cell, |v| v & 1 != 0, set(0x200)),
            Leaf::Changed {
                old: 0x1003,
                new: 0x1203
            }
        );
        assert_eq!(
            update_leaf(&cell, |v| v & 1 != 0, set(0x200)),
            Leaf::Unchanged(0x1203)
        );
        assert_eq!(
            update_leaf(&cell, |v| v & 1 != 0, |_| None),
            Leaf::Refused(0x1203)
        );
        cell.store(0, Ordering::SeqCst);
        assert_eq!(update_leaf(&cell, |v| v & 1 != 0, set(2)), Leaf::NotLeaf(0));
    }
}
