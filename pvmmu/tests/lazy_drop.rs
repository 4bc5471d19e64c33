//! A lazy batch ended by `Drop` (no `finish`): its valid writes are applied
//! when the guard goes, exactly as `finish` would apply them; inner batches
//! leave the draining to the outermost one. Checked in Xen's memory (the
//! model's, read past the backend's queue), so queued writes that reads
//! already see cannot pass for applied ones.

mod common;

use common::*;
use hypercall::MmuHypercalls;
use pvmmu::backend::Backend;
use pvmmu::entry::{Entry, Flags, Level};
use pvmmu::{AddressSpace, Mfn, Pfn};

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

/// The leaf for `va` in Xen's memory (not the backend's queue): the guest
/// frame it maps, `None` when a level on the way is not present.
fn applied(model: &Shared, root: Pfn, va: u64) -> Option<(Pfn, u64)> {
    let m = model.0.borrow();
    let mut table: Mfn = m.mfn_of(root)?;
    for level in [Level::L4, Level::L3, Level::L2, Level::L1] {
        let e = Entry(m.read_entry(table, level.index(va))?);
        if !e.is_present() {
            return None;
        }
        if level == Level::L1 {
            return Some((m.pfn_of(e.mfn())?, e.0));
        }
        table = e.mfn();
    }
    None
}

#[test]
fn a_dropped_batch_applies_its_valid_writes() {
    let model = shared(4096);
    let mut s = pv(&model);
    s.map(VA, Pfn(0), 4096, RO).expect("live L1").ignore();
    let root = s.root();
    model.0.borrow_mut().reset_stats();
    {
        let mut batch = s.lazy();
        // Into the live L1, and into a new L1 (a fresh table hooked in the
        // same batch), then a protect of a queued page.
        batch
            .map(VA + 4096, Pfn(10), 3 * 4096, RW)
            .expect("map live")
            .ignore();
        batch
            .map(VA + (2 << 20), Pfn(20), 2 * 4096, RO)
            .expect("map new L1")
            .ignore();
        batch
            .protect(VA + 2 * 4096, 4096, RO, false)
            .expect("protect queued")
            .ignore();
        assert!(batch.backend().pending() > 0, "nothing queued");
        assert_eq!(model.0.borrow().stats().hypercalls, 0);
        assert_eq!(applied(&model, root, VA + 4096), None, "applied early");
        // Dropped here, without finish.
    }
    assert_eq!(s.backend().pending(), 0, "writes left queued after drop");
    let st = model.0.borrow().stats();
    assert_eq!(st.hypercalls, 1, "one drain at drop: {st:?}");
    for (va, pfn) in [
        (VA + 4096, 10),
        (VA + 2 * 4096, 11),
        (VA + 3 * 4096, 12),
        (VA + (2 << 20), 20),
        (VA + (2 << 20) + 4096, 21),
    ] {
        let (got, _) = applied(&model, root, va)
            .unwrap_or_else(|| panic!("{va:#x}: not in Xen's memory after drop"));
        assert_eq!(got, Pfn(pfn), "{va:#x}");
    }
    let (_, raw) = applied(&model, root, VA + 2 * 4096).expect("mapped");
    assert_eq!(
        raw & Flags::WRITABLE.bits(),
        0,
        "the protect was not applied"
    );
    // No failure was kept: the next call succeeds and drains by itself.
    model.0.borrow_mut().reset_stats();
    s.map(VA + 8 * 4096, Pfn(8), 4096, RO)
        .expect("map after")
        .ignore();
    assert_eq!(
        model.0.borrow().stats().hypercalls,
        1,
        "not outside a batch"
    );
    assert_eq!(
        applied(&model, root, VA + 8 * 4096).map(|a| a.0),
        Some(Pfn(8))
    );
    model.0.borrow().check_integrity().expect("integrity");
}

#[test]
fn a_dropped_inner_batch_leaves_the_drain_to_the_outer_one() {
    let model = shared(4096);
    let mut s = pv(&model);
    s.map(VA, Pfn(0), 4096, RO).expect("live L1").ignore();
    let root = s.root();
    model.0.borrow_mut().reset_stats();
    {
        let mut outer = s.lazy();
        {
            let mut inner = outer.lazy();
            inner
                .map(VA + 4096, Pfn(10), 4096, RO)
                .expect("inner map")
                .ignore();
        }
        // The inner guard is gone; the outer batch still holds the write.
        assert_eq!(model.0.borrow().stats().hypercalls, 0, "inner drained");
        assert_eq!(applied(&model, root, VA + 4096), None);
        assert_eq!(outer.lookup(VA + 4096).map(|t| t.pfn), Ok(Pfn(10)));
        outer
            .map(VA + 2 * 4096, Pfn(11), 4096, RO)
            .expect("outer map")
            .ignore();
    }
    assert_eq!(s.backend().pending(), 0);
    assert_eq!(model.0.borrow().stats().hypercalls, 1);
    assert_eq!(applied(&model, root, VA + 4096).map(|a| a.0), Some(Pfn(10)));
    assert_eq!(
        applied(&model, root, VA + 2 * 4096).map(|a| a.0),
        Some(Pfn(11))
    );
    model.0.borrow().check_integrity().expect("integrity");
}
