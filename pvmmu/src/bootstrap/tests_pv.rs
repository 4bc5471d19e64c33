//! The PV bootstrap against the Xen model: Xen-style start-of-day tables,
//! the real hypercall path, Xen's validation of every hook and pin.

use super::sim::{run_pv, run_pv_after, PvRun, Shared, DM, VIRT_BASE};
use super::tests::translate;
use super::*;
use crate::backend::{NoAliases, XenPv};
use crate::entry::Level;
use crate::invariants::{self, Oracle, Rules};
use crate::model::{PageType, XenModel};
use crate::types::Mfn;
use alloc::rc::Rc;
use core::cell::RefCell;
use std::vec::Vec;
use x86_64::structures::paging::PageTableFlags as F;

struct ModelOracle<'a>(&'a XenModel);

impl Oracle for ModelOracle<'_> {
    fn table_level(&self, mfn: Mfn) -> Option<Level> {
        match self.0.page_type(mfn) {
            PageType::L1 => Some(Level::L1),
            PageType::L2 => Some(Level::L2),
            PageType::L3 => Some(Level::L3),
            PageType::L4 => Some(Level::L4),
            _ => None,
        }
    }
    fn is_pinned(&self, mfn: Mfn) -> bool {
        self.0.is_pinned(mfn)
    }
}

fn check_pv(run: &PvRun, stride: u64) {
    let model = run.model.borrow();
    let r = &run.report;
    let nr = model.nr_pages();
    // The new root is live and pinned; Xen's initial tree is gone.
    let root_mfn = model.mfn_of(r.root).unwrap();
    assert_eq!(model.current_root(), Some(root_mfn));
    assert!(model.is_pinned(root_mfn));
    assert_eq!(model.check_integrity(), Ok(()));
    assert_eq!(r.pages_mapped, nr);
    // Tables: exactly the frames Xen has typed, none reserved.
    assert_eq!(model.live_tables() as u64, r.tables.frames());
    assert_eq!(r.tables.frames(), r.tables_created - r.tables_replaced);
    for t in r.tables.ranges() {
        for p in t.start.0..t.end.0 {
            assert_ne!(
                model.page_type(model.mfn_of(Pfn(p)).unwrap()),
                PageType::None,
                "pfn {p:#x}"
            );
            assert!(p >= run.image - 256);
        }
    }
    // The old tables were given back (or reused as new tables): untyped,
    // writable in the direct map.
    for p in run.old_tables.start.0..run.old_tables.end.0 {
        assert!(
            r.freed.contains(Pfn(p)) || r.tables.contains(Pfn(p)),
            "old table {p:#x} lost"
        );
    }
    for f in r.freed.ranges() {
        for p in f.start.0..f.end.0 {
            assert!(
                !r.tables.contains(Pfn(p)),
                "pfn {p:#x} both freed and a table"
            );
        }
    }
    for f in r.freed.ranges() {
        for p in f.start.0..f.end.0 {
            let mfn = model.mfn_of(Pfn(p)).unwrap();
            assert!(
                matches!(model.page_type(mfn), PageType::None | PageType::Writable),
                "pfn {p:#x}: {:?} count {} freed {:?} root {:?}",
                model.page_type(mfn),
                model.type_count(mfn),
                r.freed,
                r.root
            );
            let (pfn, flags, _) = translate(&*model, r.root, DM + p * PAGE_SIZE, &*model).unwrap();
            assert_eq!(pfn, p);
            assert!(flags & F::WRITABLE.bits() != 0);
        }
    }
    // Xen's initial tables lie in the image's data region: a retired one is
    // writable again through that alias too, one still a table read-only.
    let mut data_aliases = 0;
    for p in run.old_tables.start.0..run.old_tables.end.0 {
        let (pfn, flags, _) = translate(&*model, r.root, VIRT_BASE + p * PAGE_SIZE, &*model)
            .unwrap_or_else(|| panic!("old table {p:#x}: no alias in the data region"));
        assert_eq!(pfn, p);
        assert_eq!(
            flags & F::WRITABLE.bits() != 0,
            r.freed.contains(Pfn(p)),
            "old table {p:#x}: data-region alias writable iff given back"
        );
        data_aliases += 1;
    }
    assert!(data_aliases > 0);
    // Every RAM frame is in the direct map, tables read-only, the rest RW.
    let mut p = 0;
    while p < nr {
        let (pfn, flags, level) = translate(&*model, r.root, DM + p * PAGE_SIZE, &*model)
            .unwrap_or_else(|| panic!("pfn {p:#x} not mapped"));
        assert_eq!((pfn, level), (p, 1));
        assert_eq!(
            flags & F::WRITABLE.bits() != 0,
            !r.tables.contains(Pfn(p)),
            "pfn {p:#x}"
        );
        p += if p < 0x1000 { 1 } else { stride };
    }
    assert!(translate(&*model, r.root, DM + nr * PAGE_SIZE, &*model).is_none());
    // The boot region keeps its permissions.
    let (_, f, _) = translate(&*model, r.root, VIRT_BASE + 0x105 * PAGE_SIZE, &*model).unwrap();
    assert!(f & F::WRITABLE.bits() == 0 && f & F::NO_EXECUTE.bits() == 0);
    let (_, f, _) = translate(&*model, r.root, VIRT_BASE + 0x125 * PAGE_SIZE, &*model).unwrap();
    assert!(f & F::WRITABLE.bits() == 0 && f & F::NO_EXECUTE.bits() != 0);
    // pvmmu's invariant walker over the live tree, with Xen's types as oracle.
    let backend = XenPv::new(
        run_handle(&run.model),
        run_handle(&run.model),
        run_handle(&run.model),
        NoAliases,
        Some(root_mfn),
    );
    let mut violations = Vec::new();
    let n = invariants::check(
        &backend,
        r.root,
        Rules::for_backend(&backend),
        Some(&ModelOracle(&model)),
        &mut |v| {
            if violations.len() < 8 {
                violations.push(v)
            }
        },
    );
    assert_eq!(n, 0, "{violations:?}");
}

fn run_handle(m: &Rc<RefCell<XenModel>>) -> Shared {
    Shared(m.clone())
}

#[test]
fn pv_one_gib_dom0() {
    let run = run_pv(1 << 18, 0x400, 1024).unwrap();
    check_pv(&run, 7);
    let r = &run.report;
    assert!(r.rounds >= 2 && r.rounds <= 4, "{r:?}");
    // Targets from issue 4 were <= 8 hypercalls and <= 1100 entries per
    // GiB; issue 8 keeps what the bootstrap reached: 3 hypercalls and about
    // 540 entries (one RO flip per new table, one hook per fresh L2).
    assert!(r.hypercalls <= 3, "{r:?}");
    assert!(r.mmu_update_entries <= 560, "{r:?}");
}

#[test]
fn pv_small_batches_lose_nothing() {
    // A tiny batch forces many partial flushes; the result must be the same
    // tree, just more hypercalls.
    let big = run_pv(1 << 16, 0x400, 4096).unwrap();
    let small = run_pv(1 << 16, 0x400, 64).unwrap();
    check_pv(&small, 3);
    assert_eq!(big.report.tables_created, small.report.tables_created);
    assert_eq!(
        big.report.mmu_update_entries,
        small.report.mmu_update_entries
    );
    assert!(small.report.hypercalls > big.report.hypercalls);
}

#[test]
fn pv_scaling_is_logarithmic_and_within_bounds() {
    let mut rows = Vec::new();
    for gib in [1u64, 4, 16, 64] {
        let run = run_pv(gib << 18, 0x400, 2048).unwrap();
        let r = &run.report;
        assert_eq!(r.pages_mapped, gib << 18);
        assert!(r.hypercalls <= 8 * gib, "{gib} GiB: {r:?}");
        assert!(r.mmu_update_entries <= 1100 * gib, "{gib} GiB: {r:?}");
        rows.push((
            gib,
            r.rounds,
            r.tables_created,
            r.hypercalls,
            r.mmu_update_entries,
        ));
        if gib <= 4 {
            check_pv(&run, 4099);
        } else {
            assert_eq!(run.model.borrow().check_integrity(), Ok(()));
        }
    }
    std::println!("{rows:?}");
    // 64x more memory costs at most two more rounds.
    assert!(rows[3].1 <= rows[0].1 + 2, "{rows:?}");
}

/// The design's central rule under PV: each round's new tables are the top
/// free frames of the memory mapped before it (round 0: the top of the
/// boot-mapped frames; round r + 1: the top of chunk r), never the bottom.
#[test]
fn pv_new_tables_are_the_top_frames_of_the_previous_chunk() {
    for gib in [1u64, 4] {
        let run = run_pv(gib << 18, 0x400, 1024).unwrap();
        let r = &run.report;
        assert!(r.rounds >= 2, "{r:?}");
        let chunks = &r.chunks[..r.rounds as usize];
        // Every round but the last placed the next round's tables at the
        // very top of its chunk.
        for (k, c) in chunks[..chunks.len() - 1].iter().enumerate() {
            assert!(
                r.tables.contains(Pfn(c.end.0 - 1)),
                "{gib} GiB, round {}: top frame {:#x} of chunk {k} is no table",
                k + 1,
                c.end.0 - 1,
            );
        }
        // Above any table frame, the rest of its chunk is tables too, but
        // for the holes a top-down placement leaves: tables retired during
        // the run and Xen's initial tables given back.
        let holes_allowed = r.tables_replaced + r.freed.frames();
        let reserved_end = run.image - 256;
        for t in r.tables.ranges() {
            let p = t.start.0;
            let c = chunks.iter().find(|c| c.contains(Pfn(p))).unwrap();
            let holes = (p..c.end.0)
                .filter(|&q| q >= reserved_end && !r.tables.contains(Pfn(q)))
                .count() as u64;
            assert!(
                holes <= holes_allowed,
                "{gib} GiB: table frame {p:#x} has {holes} free frames above it in \
                 chunk {c:?} (at most {holes_allowed} expected): not the top"
            );
        }
    }
}

/// The report's `hypercalls` and `mmu_update_entries` are what went to Xen:
/// equal to the model's own count of the same run (the model counts in its
/// hypercall handlers, the report by differences of the backend's view),
/// and at least one request per new table (its RO flip) plus one hook per
/// new table that is not in a fresh parent.
#[test]
fn pv_report_counters_match_what_xen_counted() {
    for (pages, batch, earlier) in [
        (1u64 << 16, 64usize, 0u64),
        (1 << 18, 1024, 3),
        (1 << 20, 4096, 0),
    ] {
        let run = run_pv_after(pages, 0x400, batch, earlier as usize).unwrap();
        let r = &run.report;
        // The model counted the earlier hypercalls too; the report only
        // the bootstrap's (they carried no mmu_update entries).
        let st = hypercall::MmuHypercalls::stats(&*run.model.borrow());
        assert_eq!(
            r.hypercalls,
            st.hypercalls - earlier,
            "{pages} pages: {r:?}"
        );
        assert_eq!(
            r.mmu_update_entries, st.mmu_update_entries,
            "{pages} pages: {r:?}"
        );
        // Independent lower bounds: every new table is made read-only
        // through Xen (one request each), every queue of `batch` requests
        // costs a hypercall.
        let fresh = r.tables_created;
        assert!(r.mmu_update_entries >= fresh, "{pages} pages: {r:?}");
        assert!(
            r.hypercalls >= r.mmu_update_entries.div_ceil(batch as u64),
            "{pages} pages: {r:?}"
        );
        // The old tree was replaced by one multicall at least.
        assert!(r.hypercalls >= r.rounds as u64, "{pages} pages: {r:?}");
    }
}
