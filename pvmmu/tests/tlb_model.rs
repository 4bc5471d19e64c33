//! Stale translations after unmap and protect, through a TLB model.
//!
//! The native backend is built with a [`Tlb`] that records every
//! invalidation. Before each call the test "touches" every page of a
//! window, caching its translation as a CPU TLB would (a large page as one
//! entry); after the call it performs the returned [`pvmmu::Flush`], drops
//! the cached entries the recorded invalidations cover, and requires every
//! entry still cached to equal the live translation. An unmap or protect
//! that owes a flush and neither performs it nor returns it leaves a stale
//! entry behind, with and without table frees.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use common::*;
use pvmmu::backend::{LargePages, Tlb};
use pvmmu::entry::Flags;
use pvmmu::{AddressSpace, Granule, Native, Pfn};

/// What the backend asked the TLB to invalidate.
#[derive(Default)]
struct Invalidated {
    pages: BTreeSet<u64>,
    full: u64,
}

/// A [`Tlb`] that records what it is asked to invalidate (shared with the
/// test, which clears it before each call).
#[derive(Default, Clone)]
struct RecordingTlb(Rc<RefCell<Invalidated>>);

impl Tlb for RecordingTlb {
    fn flush_page(&mut self, va: u64) {
        self.0.borrow_mut().pages.insert(va);
    }
    fn flush_all(&mut self) {
        self.0.borrow_mut().full += 1;
    }
    unsafe fn load_root(&mut self, _root: Pfn) {}
    fn flush_cache_range(&mut self, _va: u64, _pages: u64) {}
    fn flush_cache_all(&mut self) {}
}

type Space = AddressSpace<Native<Arena, RecordingTlb>, Pool>;

/// One cached translation: the page it came from and what it said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cached {
    page_start: u64,
    page_len: u64,
    pfn: Pfn,
    flags: Flags,
}

const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);
const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);
const KIB4: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB1: u64 = 1 << 30;
/// Window base: 1 GiB aligned, in the lower half.
const BASE: u64 = 0x0000_0040_0000_0000;

fn space() -> Space {
    let backend = Native::with_tlb(Arena::new(256), RecordingTlb::default())
        .with_large_pages(LargePages::Size1GiB);
    AddressSpace::new(backend, Pool::new(1, 255))
        .map_err(|e| e.0)
        .expect("space")
}

/// What the CPU would cache after touching every 4 KiB page of `[va,
/// va + len)` (mapped ones only).
fn touch(s: &Space, va: u64, len: u64) -> BTreeMap<u64, Cached> {
    let mut tlb = BTreeMap::new();
    let mut at = va;
    while at < va + len {
        if let Ok(t) = s.lookup(at) {
            let page_len = t.granule.bytes();
            let page_start = at & !(page_len - 1);
            tlb.insert(
                at,
                Cached {
                    page_start,
                    page_len,
                    pfn: t.pfn,
                    flags: t.flags,
                },
            );
        }
        at += KIB4;
    }
    tlb
}

/// Runs `op` after touching the window, performs the flush it returns, and
/// returns the cached translations that are stale afterwards.
fn stale_after(
    s: &mut Space,
    window: (u64, u64),
    op: impl FnOnce(&mut Space) -> pvmmu::Flush,
) -> Vec<(u64, Cached)> {
    let mut cached = touch(s, window.0, window.1);
    assert!(!cached.is_empty(), "the window maps nothing");
    *s.backend().tlb().0.borrow_mut() = Invalidated::default();
    let owed = op(s);
    s.flush(owed).expect("flush");
    let tlb = s.backend().tlb().0.borrow();
    if tlb.full > 0 {
        cached.clear();
    }
    cached.retain(|_, c| {
        !tlb.pages
            .iter()
            .any(|&p| p >= c.page_start && p < c.page_start + c.page_len)
    });
    cached
        .into_iter()
        .filter(|(va, c)| match s.lookup(*va) {
            Ok(t) => t.pfn != c.pfn || t.flags != c.flags,
            Err(_) => true,
        })
        .collect()
}

/// One contiguous mapping of 4 KiB pages over two L1 tables (the last 64
/// pages of one, all of the next), then 2 MiB pages up to 1 GiB, then a
/// 1 GiB page.
fn populated() -> Space {
    let mut s = space();
    s.map(BASE + MIB2 - 64 * KIB4, Pfn(0x1000), (64 + 512) * KIB4, RW)
        .expect("4k")
        .ignore();
    s.map_sized(
        BASE + 2 * MIB2,
        Pfn(0x2_0000),
        GIB1 - 2 * MIB2,
        RW,
        Granule::Size2MiB,
        false,
    )
    .expect("2m")
    .ignore();
    s.map_sized(
        BASE + GIB1,
        Pfn(0x40_0000),
        GIB1,
        RW,
        Granule::Size1GiB,
        false,
    )
    .expect("1g")
    .ignore();
    s.flush(pvmmu::Flush::none()).expect("settle");
    s
}

/// The 4 KiB pages around the L1 boundary.
const WINDOW_4K: (u64, u64) = (BASE + MIB2 - 64 * KIB4, 128 * KIB4);
/// Everything mapped, 4 KiB pages and large ones.
const ALL: (u64, u64) = (BASE + MIB2 - 64 * KIB4, GIB1 + GIB1 - MIB2 + 64 * KIB4);

/// Every unmap shape: one page and a few pages (no table freed, invlpg), a
/// run over the invlpg limit (no table freed, full flush), a whole L1's
/// pages (its table freed), a 2 MiB and a 1 GiB page (an upper table
/// emptied), everything (every table freed).
#[test]
fn unmap_leaves_no_stale_translation() {
    type Shape = (&'static str, (u64, u64), u64, u64);
    let shapes: [Shape; 8] = [
        ("one page", WINDOW_4K, BASE + MIB2 - KIB4, KIB4),
        (
            "three pages across an L1 boundary",
            WINDOW_4K,
            BASE + MIB2 - KIB4,
            3 * KIB4,
        ),
        (
            "40 pages (over the invlpg limit)",
            WINDOW_4K,
            BASE + MIB2 - 40 * KIB4,
            40 * KIB4,
        ),
        (
            "an L1's pages (table freed)",
            WINDOW_4K,
            BASE + MIB2 - 64 * KIB4,
            64 * KIB4,
        ),
        (
            "both L1s (tables freed)",
            WINDOW_4K,
            WINDOW_4K.0,
            WINDOW_4K.1,
        ),
        ("a 2 MiB page", ALL, BASE + 2 * MIB2, MIB2),
        ("a 1 GiB page", ALL, BASE + GIB1, GIB1),
        (
            "everything",
            ALL,
            WINDOW_4K.0,
            BASE + 2 * GIB1 - WINDOW_4K.0,
        ),
    ];
    for (name, window, va, len) in shapes {
        let mut s = populated();
        let stale = stale_after(&mut s, window, |s| s.unmap(va, len).expect(name));
        assert!(
            stale.is_empty(),
            "unmap {name}: stale {:x?}",
            &stale[..stale.len().min(4)]
        );
        // The pages are gone.
        assert!(s.lookup(va).is_err(), "unmap {name}: still mapped");
    }
}

/// Every protect shape: one page, a run under and over the invlpg limit,
/// across an L1 boundary, a 2 MiB page, a 1 GiB page, all of it.
#[test]
fn protect_leaves_no_stale_translation() {
    type Shape = (&'static str, (u64, u64), u64, u64);
    let shapes: [Shape; 7] = [
        ("one page", WINDOW_4K, BASE + MIB2 - KIB4, KIB4),
        (
            "three pages across an L1 boundary",
            WINDOW_4K,
            BASE + MIB2 - KIB4,
            3 * KIB4,
        ),
        (
            "40 pages (over the invlpg limit)",
            WINDOW_4K,
            BASE + MIB2 - 40 * KIB4,
            40 * KIB4,
        ),
        ("both L1s", WINDOW_4K, ALL.0, (64 + 512) * KIB4),
        ("a 2 MiB page", ALL, BASE + 2 * MIB2, MIB2),
        ("a 1 GiB page", ALL, BASE + GIB1, GIB1),
        (
            "everything",
            ALL,
            WINDOW_4K.0,
            BASE + 2 * GIB1 - WINDOW_4K.0,
        ),
    ];
    for (name, window, va, len) in shapes {
        let mut s = populated();
        let stale = stale_after(&mut s, window, |s| {
            s.protect(va, len, RO, false).expect(name)
        });
        assert!(
            stale.is_empty(),
            "protect {name}: stale {:x?}",
            &stale[..stale.len().min(4)]
        );
        assert_eq!(s.lookup(va).expect("mapped").flags, RO, "protect {name}");
    }
}

/// A lazy batch of an unmap and a protect: the merged flushes cover both.
#[test]
fn batched_unmap_and_protect_leave_no_stale_translation() {
    let mut s = populated();
    let stale = stale_after(&mut s, WINDOW_4K, |s| {
        let mut batch = s.lazy();
        let a = batch.unmap(BASE + MIB2 - 2 * KIB4, KIB4).expect("unmap");
        let b = batch
            .protect(BASE + MIB2 + 5 * KIB4, KIB4, RO, false)
            .expect("protect");
        batch.finish().expect("finish");
        a.merge(b)
    });
    assert!(stale.is_empty(), "stale {stale:x?}");
}
