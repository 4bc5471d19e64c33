//! Every interleaving of the table-install protocol (`pvmmu::install`) with
//! `loom`: `RUSTFLAGS="--cfg loom" cargo test -p pvmmu --test loom_split
//! --release` (`cargo xtask test` runs it).
//!
//! Each loom thread is a CPU. An entry is a loom atomic; a table is two of
//! them (two entries are enough for every race: one per CPU), in a frame
//! the CPU owns until it publishes it. A table is built with relaxed
//! stores (natively: plain stores into the private frame); the only
//! ordering is the protocol's exchange and the reader's load. Each CPU has
//! its own one-frame allocator, so a leak is a frame neither in the tree
//! nor back in its allocator.
//!
//! The cases:
//! * two CPUs split the same large page (and each then changes its own
//!   4 KiB page of it) while a third translates every address: exactly one
//!   table, the loser's frame back in its allocator, the reader never
//!   finds a hole or another frame, both changes present at the end;
//! * two CPUs create the same missing table (and each then maps its own
//!   page in it): one table, no leak, both pages mapped;
//! * a lockless change of the whole large page races a split of it for
//!   part of the page: the whole-page change lands in every 4 KiB page
//!   (before the split, through it; after, in the table), the split's
//!   own change too;
//! * two lockless changes of different bits of one leaf both land.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use pvmmu::install::{install_table, update_leaf, EntryCell, Installed, Leaf};
use pvmmu::{FrameAllocator, Pfn};

const PRESENT: u64 = 1;
const PS: u64 = 0x80;
const BIT_A: u64 = 1 << 9;
const BIT_B: u64 = 1 << 10;
/// Entries per table in the model.
const N: usize = 2;
/// First frame of the large page.
const BASE: u64 = 0x100;
const LARGE: u64 = BASE << 12 | PS | PRESENT;

fn frame(v: u64) -> u64 {
    v >> 12
}
fn is_large(v: u64) -> bool {
    v & (PS | PRESENT) == PS | PRESENT
}
fn present(v: u64) -> bool {
    v & PRESENT != 0
}

/// The model's memory: one live upper entry and the frames tables can be
/// built in (frame `f` is `tables[f]`; frame 0 is not a table).
struct World {
    entry: AtomicU64,
    tables: [[AtomicU64; N]; 3],
}

impl World {
    fn new(entry: u64) -> Arc<Self> {
        Arc::new(World {
            entry: AtomicU64::new(entry),
            tables: core::array::from_fn(|_| core::array::from_fn(|_| AtomicU64::new(0))),
        })
    }

    /// Builds, in private frame `f`, the table replacing `v` (a large
    /// leaf: its pages with its attributes; empty: nothing mapped).
    fn build(&self, f: Pfn, v: u64) -> Result<u64, ()> {
        for (k, e) in self.tables[f.0 as usize].iter().enumerate() {
            let leaf = if is_large(v) {
                (frame(v) + k as u64) << 12 | (v & 0xfff & !PS)
            } else {
                0
            };
            e.store(leaf, Ordering::Relaxed);
        }
        Ok(f.0 << 12 | PRESENT)
    }

    /// Entry `k` of the table `v` points to.
    fn child(&self, v: u64, k: usize) -> &AtomicU64 {
        &self.tables[frame(v) as usize][k]
    }

    /// Installs a table where `needs` says one is needed, from `frames`.
    fn install(&self, needs: fn(u64) -> bool, frames: &mut OneFrame) -> Installed {
        install_table(&self.entry, needs, frames, |f, v| self.build(f, v))
            .expect("the frame is there and the build cannot fail")
    }

    /// A lockless change of every 4 KiB page of the large page: the large
    /// leaf if it is still one, else every entry of the table it became.
    fn change_whole(&self, bit: u64) {
        match update_leaf(&self.entry, is_large, |v| Some(v | bit)) {
            Leaf::Changed { .. } | Leaf::Unchanged(_) => {}
            Leaf::NotLeaf(t) => {
                for k in 0..N {
                    let r = update_leaf(self.child(t, k), present, |v| Some(v | bit));
                    assert!(matches!(r, Leaf::Changed { .. }), "{r:?}");
                }
            }
            Leaf::Refused(_) => unreachable!(),
        }
    }

    /// The frame and bits `k` translates to: never a hole.
    fn translate(&self, k: usize) -> (u64, u64) {
        let v = EntryCell::load(&self.entry);
        assert!(present(v), "the upper entry is a hole");
        if is_large(v) {
            return (frame(v) + k as u64, v & 0xfff & !PS);
        }
        let e = EntryCell::load(self.child(v, k));
        assert!(present(e), "a hole at page {k} of a published table");
        (frame(e), e & 0xfff)
    }
}

/// A CPU's allocator: one frame to hand out, and what came back.
struct OneFrame {
    frame: Option<Pfn>,
    back: Option<Pfn>,
}

impl OneFrame {
    fn new(f: u64) -> Self {
        OneFrame {
            frame: Some(Pfn(f)),
            back: None,
        }
    }
    /// The frame is in the allocator again (never taken, or given back).
    fn whole(&self) -> bool {
        self.frame.is_some() || self.back.is_some()
    }
}

impl FrameAllocator for OneFrame {
    fn allocate(&mut self) -> Option<Pfn> {
        self.frame.take()
    }
    fn free(&mut self, pfn: Pfn) {
        assert!(self.back.replace(pfn).is_none(), "a frame given back twice");
    }
}

/// Every interleaving, no preemption bound (the models are small: all
/// four cases together take about 200 executions, well under a second).
fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    b.max_branches = 100_000;
    b
}

/// CPU `cpu` (frame `cpu + 1`) splits the large page, then sets `bit` on
/// page `k` of the table found; returns its install and its allocator.
fn split_and_mark(w: &World, cpu: u64, k: usize, bit: u64) -> (Installed, OneFrame) {
    let mut frames = OneFrame::new(cpu + 1);
    let got = w.install(is_large, &mut frames);
    let r = update_leaf(w.child(got.entry, k), present, |v| Some(v | bit));
    assert!(matches!(r, Leaf::Changed { .. }), "{r:?}");
    (got, frames)
}

/// The end of two installers: one built the live table, the other's frame
/// went back to its allocator, none leaked.
fn one_table_no_leak(w: &World, a: (Installed, OneFrame), b: (Installed, OneFrame)) -> u64 {
    let live = EntryCell::load(&w.entry);
    let built: Vec<Pfn> = [&a, &b].iter().filter_map(|(i, _)| i.built).collect();
    assert_eq!(
        built,
        vec![Pfn(frame(live))],
        "exactly one table, the live one"
    );
    for (i, f) in [&a, &b] {
        assert_eq!(i.entry, live, "both continue on the live table");
        if i.built.is_none() {
            assert!(f.whole(), "the loser's frame is back in its allocator");
        } else {
            assert!(
                f.frame.is_none() && f.back.is_none(),
                "the table's frame is in use"
            );
        }
    }
    live
}

#[test]
fn two_cpus_split_one_large_page_while_a_third_translates() {
    builder().check(|| {
        let w = World::new(LARGE);
        let spawn = |cpu: u64, k: usize, bit: u64| {
            let w = w.clone();
            thread::spawn(move || split_and_mark(&w, cpu, k, bit))
        };
        let a = spawn(0, 0, BIT_A);
        let b = spawn(1, 1, BIT_B);
        for k in 0..N {
            let (f, _) = w.translate(k);
            assert_eq!(f, BASE + k as u64, "page {k} kept its frame");
        }
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        let live = one_table_no_leak(&w, a, b);
        let e0 = EntryCell::load(w.child(live, 0));
        let e1 = EntryCell::load(w.child(live, 1));
        assert_eq!(e0, BASE << 12 | PRESENT | BIT_A);
        assert_eq!(e1, (BASE + 1) << 12 | PRESENT | BIT_B);
    });
}

#[test]
fn two_cpus_create_the_same_missing_table() {
    builder().check(|| {
        let w = World::new(0);
        let spawn = |cpu: u64| {
            let w = w.clone();
            thread::spawn(move || {
                let mut frames = OneFrame::new(cpu + 1);
                let got = w.install(|v| v == 0, &mut frames);
                // Map this CPU's page in the table found.
                let leaf = (0x500 + cpu) << 12 | PRESENT;
                let slot = w.child(got.entry, cpu as usize);
                assert_eq!(EntryCell::compare_exchange(slot, 0, leaf), Ok(()));
                (got, frames)
            })
        };
        let a = spawn(0);
        let b = spawn(1);
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        let live = one_table_no_leak(&w, a, b);
        for cpu in 0..2u64 {
            let e = EntryCell::load(w.child(live, cpu as usize));
            assert_eq!(e, (0x500 + cpu) << 12 | PRESENT, "cpu {cpu}'s page mapped");
        }
    });
}

#[test]
fn a_whole_page_change_racing_a_split_lands_in_every_page() {
    builder().check(|| {
        let w = World::new(LARGE);
        let a = {
            let w = w.clone();
            thread::spawn(move || w.change_whole(BIT_A))
        };
        let (got, frames) = split_and_mark(&w, 1, 1, BIT_B);
        a.join().unwrap();
        assert_eq!(got.built, Some(Pfn(2)), "the only splitter built the table");
        assert!(!frames.whole());
        let live = EntryCell::load(&w.entry);
        assert_eq!(live, got.entry);
        let e0 = EntryCell::load(w.child(live, 0));
        let e1 = EntryCell::load(w.child(live, 1));
        assert_eq!(e0, BASE << 12 | PRESENT | BIT_A);
        assert_eq!(e1, (BASE + 1) << 12 | PRESENT | BIT_A | BIT_B);
    });
}

#[test]
fn two_changes_of_different_bits_of_one_leaf_both_land() {
    builder().check(|| {
        let leaf = Arc::new(AtomicU64::new(0x700 << 12 | PRESENT));
        let spawn = |bit: u64| {
            let leaf = leaf.clone();
            thread::spawn(move || {
                let r = update_leaf(&*leaf, present, |v| Some(v | bit));
                assert!(matches!(r, Leaf::Changed { .. }), "{r:?}");
            })
        };
        let a = spawn(BIT_A);
        let b = spawn(BIT_B);
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(
            leaf.load(Ordering::SeqCst),
            0x700 << 12 | PRESENT | BIT_A | BIT_B
        );
    });
}
