//! Lazy batches (one drain for many calls, a failure kept for the next
//! call when the guard is dropped) and the life cycle of a PV address space
//! (pinned root, NEW_BASEPTR, destroy: unpin and every frame back).

mod common;

use common::*;
use hypercall::MmuHypercalls;
use pvmmu::entry::Flags;
use pvmmu::{AddressSpace, Error, Pfn};

const VA: u64 = 0x0000_0300_0000_0000;
const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);
const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);

fn pv(model: &Shared) -> AddressSpace<PvBackend, Pool> {
    AddressSpace::new(pv_backend(model, 64), Pool::new(2048, 256))
        .map_err(|e| e.0)
        .expect("space")
}

#[test]
fn a_lazy_batch_drains_once() {
    let model = shared(4096);
    let mut s = pv(&model);
    s.map(VA, Pfn(0), 4096, RO).expect("live L1").ignore();
    model.0.borrow_mut().reset_stats();
    {
        let mut batch = s.lazy();
        for k in 0..3u64 {
            batch
                .map(VA + (1 + 2 * k) * 4096, Pfn(10 + 2 * k), 2 * 4096, RW)
                .expect("map")
                .ignore();
        }
        // Nothing submitted yet, but reads see the queued entries.
        assert_eq!(model.0.borrow().stats().hypercalls, 0);
        assert_eq!(batch.lookup(VA + 6 * 4096).map(|t| t.pfn), Ok(Pfn(15)));
        batch.finish().expect("drain");
    }
    let st = model.0.borrow().stats();
    assert_eq!((st.hypercalls, st.mmu_update_entries), (1, 6));
    model.0.borrow().check_integrity().expect("integrity");
}

/// The guard-less batch a kernel keeps open across releases of its lock:
/// nothing is submitted until the last close; reads see the queue; nested
/// opens nest.
#[test]
fn an_open_batch_survives_the_borrow_and_drains_at_its_close() {
    let model = shared(4096);
    let mut s = pv(&model);
    s.map(VA, Pfn(0), 4096, RO).expect("live L1").ignore();
    model.0.borrow_mut().reset_stats();
    s.open_lazy();
    for k in 0..3u64 {
        // Each call is a separate borrow of the space (as under a lock
        // taken per change).
        let space = &mut s;
        space
            .map(VA + (1 + k) * 4096, Pfn(10 + k), 4096, RW)
            .expect("map")
            .ignore();
    }
    s.open_lazy();
    s.close_lazy().expect("inner close");
    assert_eq!(
        model.0.borrow().stats().hypercalls,
        0,
        "inner close sent nothing"
    );
    assert_eq!(s.lookup(VA + 3 * 4096).map(|t| t.pfn), Ok(Pfn(12)));
    s.close_lazy().expect("outer close");
    let st = model.0.borrow().stats();
    assert_eq!((st.hypercalls, st.mmu_update_entries), (1, 3));
    model.0.borrow().check_integrity().expect("integrity");
}

#[test]
fn a_dropped_batch_keeps_its_failure_for_the_next_call() {
    let model = shared(4096);
    let mut s = pv(&model);
    s.map(VA, Pfn(0), 4096, RO).expect("live L1").ignore();
    let root = s.root();
    {
        let mut batch = s.lazy();
        // Queued into the live L1 without a drain: Xen sees it only when
        // the batch ends.
        batch
            .map(VA + 4096, root, 4096, RW)
            .expect("queued")
            .ignore();
    }
    let r = s.map(VA + 8 * 4096, Pfn(8), 4096, RO);
    assert!(matches!(r, Err(Error::WritablePageTable { .. })), "{r:?}");
    // Reported once; the space works again and nothing was applied.
    s.map(VA + 8 * 4096, Pfn(8), 4096, RO)
        .expect("map after")
        .ignore();
    assert!(s.lookup(VA + 4096).is_err());
    model.0.borrow().check_integrity().expect("integrity");
}

#[test]
fn pv_space_is_pinned_switched_to_and_destroyed_cleanly() {
    let model = shared(4096);
    let mut s = pv(&model);
    let root_mfn = model.0.borrow().mfn_of(s.root()).expect("mfn");
    assert!(
        model.0.borrow().is_pinned(root_mfn),
        "root pinned before any NEW_BASEPTR"
    );
    s.map(VA, Pfn(0), 600 * 4096, RO).expect("map").ignore();
    s.map(0xffff_c900_0000_0000, Pfn(700), 3 * 4096, RW)
        .expect("map")
        .ignore();
    // SAFETY: nothing runs on these tables.
    unsafe { s.activate() }.expect("NEW_BASEPTR");
    assert_eq!(model.0.borrow().current_root(), Some(root_mfn));

    // A second space (not current) is destroyed: every frame back, root
    // unpinned and untyped.
    let mut t = AddressSpace::new(pv_backend(&model, 64), Pool::new(2304, 64))
        .map_err(|e| e.0)
        .expect("second space");
    t.map(VA, Pfn(0), 1024 * 4096, RO).expect("map").ignore();
    let t_root = model.0.borrow().mfn_of(t.root()).expect("mfn");
    let (_backend, pool) = t.destroy().map_err(|e| e.0).expect("destroy");
    assert_eq!(pool.in_use(), 0);
    let m = model.0.borrow();
    assert!(!m.is_pinned(t_root));
    assert_eq!(pvmmu::invariants::Oracle::table_level(&*m, t_root), None);
    m.check_integrity().expect("integrity");
}

#[test]
fn native_flush_tokens_reach_the_tlb_hook() {
    let mut s = AddressSpace::new(pvmmu::Native::new(Arena::new(64)), Pool::new(1, 63))
        .map_err(|e| e.0)
        .expect("space");
    let a = s.map(VA, Pfn(100), 4 * 4096, RO).expect("map");
    let b = s.protect(VA, 4096, RW, false).expect("protect");
    assert_eq!(a.merge(b).pages(), 4);
    s.flush(a.merge(b)).expect("flush");
    assert_eq!(s.backend().tlb().pages, 4);
    let big = s
        .map(VA + (1 << 21), Pfn(1000), 64 * 4096, RO)
        .expect("map");
    s.flush(big).expect("flush");
    assert_eq!(
        s.backend().tlb().full,
        1,
        "more than 32 pages: one full flush"
    );
    // Unmapping frees tables: the space flushed everything itself.
    let u = s.unmap(VA, 4 * 4096).expect("unmap");
    assert_eq!(u.pages(), 0);
    assert_eq!(s.backend().tlb().full, 2);
}

#[test]
fn apply_to_range_validates_everything_then_writes_in_one_batch() {
    let model = shared(4096);
    let mut s = pv(&model);
    s.map(VA, Pfn(0), 1024 * 4096, RW).expect("map").ignore();
    // A refused value anywhere: nothing written.
    let r = s.apply_to_range(VA, 2048 * 4096, false, |va, _| {
        (va == VA + 1000 * 4096).then_some(Flags::PRESENT | Flags::WRITABLE)
    });
    assert_eq!(r.map(|f| f.ignore()), Err(Error::WriteExecute));
    assert!(s
        .lookup(VA)
        .expect("mapped")
        .flags
        .contains(Flags::WRITABLE));
    // Every odd page read-only; the unmapped second half is skipped.
    model.0.borrow_mut().reset_stats();
    let seen = std::cell::Cell::new(0u64);
    let flush = s
        .apply_to_range(VA, 2048 * 4096, false, |va, t| {
            seen.set(seen.get() + 1);
            assert_eq!(t.pfn.0, (va - VA) / 4096);
            ((va / 4096) % 2 == 1).then_some(RO)
        })
        .expect("apply");
    assert_eq!(flush.pages(), 2048);
    flush.ignore();
    assert_eq!(seen.get(), 2 * 1024, "two passes over 1024 mapped pages");
    let st = model.0.borrow().stats();
    // 512 rewritten entries in batches of the capacity (64).
    assert_eq!((st.hypercalls, st.mmu_update_entries), (512 / 64, 512));
    for k in 0..1024u64 {
        let w = s
            .lookup(VA + k * 4096)
            .expect("mapped")
            .flags
            .contains(Flags::WRITABLE);
        assert_eq!(w, k % 2 == 0, "page {k}");
    }
    model.0.borrow().check_integrity().expect("integrity");
}

#[test]
fn apply_to_range_refused_by_xen_restores_every_entry() {
    let model = shared(4096);
    let mut s = pv(&model);
    let root = s.root();
    // Pages 0..8 data (mixed flags), page 8 the root table read-only.
    s.map(VA, Pfn(100), 8 * 4096, RO).expect("map").ignore();
    s.protect(VA + 2 * 4096, 3 * 4096, RW, false)
        .expect("mixed")
        .ignore();
    s.map(VA + 8 * 4096, root, 4096, RO)
        .expect("table read-only")
        .ignore();
    let before = leaves(s.backend(), s.root());
    let in_use = s.allocator().in_use();
    // Everything writable: Xen refuses page 8 after pages 0..8 were queued.
    let r = s.apply_to_range(VA, 9 * 4096, false, |_, _| Some(RW));
    assert!(matches!(r, Err(Error::WritablePageTable { .. })), "{r:?}");
    assert_eq!(leaves(s.backend(), s.root()), before, "entries restored");
    assert_eq!(s.allocator().in_use(), in_use, "undo frames returned");
    model.0.borrow().check_integrity().expect("integrity");
}
