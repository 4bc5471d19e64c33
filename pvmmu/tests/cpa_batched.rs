//! Under PV, a change of the direct map made inside a lazy batch goes out
//! with its TLB flush in one multicall: what the guest kernel's
//! DEBUG_PAGEALLOC relies on (`kspace::direct_map_absent` /
//! `direct_map_present` run CPA's `np`, and the map-back with its flush, in
//! a lazy batch, so an allocation or a free of a frame is one hypercall).
//! Outside a batch the same calls are two each (the end-of-call drain, then
//! the flush), which is why the kernel batches them.

mod common;

use common::*;
use hypercall::MmuHypercalls;
use pvmmu::backend::{Backend, FlushTargets};
use pvmmu::entry::Flags;
use pvmmu::{AddressSpace, Error, Pfn};

/// Where the data frames are mapped (a direct map).
const BASE: u64 = 0xffff_8880_0000_0000;
/// Data frames `0..DATA`, then the table frames.
const DATA: u64 = 64;
const PAGE: u64 = 4096;

/// What DEBUG_PAGEALLOC maps a frame back with.
fn rw() -> Flags {
    Flags::PRESENT | Flags::WRITABLE | Flags::NO_EXECUTE
}

type Space = AddressSpace<PvBackend, Pool>;

/// A live PV space with frames `0..DATA` mapped writable at [`BASE`],
/// flushing every vCPU (as the kernel's space does).
fn direct_map() -> (Shared, Space) {
    let model = shared(DATA + 16);
    let backend = pv_backend(&model, 512).with_flush_targets(FlushTargets::All);
    let mut s = AddressSpace::new(backend, Pool::new(DATA, 16))
        .map_err(|e| e.0)
        .expect("pv space");
    // SAFETY: nothing runs on these tables; the model walks them.
    unsafe { s.activate() }.expect("NEW_BASEPTR");
    s.map(BASE, Pfn(0), DATA * PAGE, rw())
        .expect("direct map")
        .ignore();
    (model, s)
}

/// (hypercalls, multicalls, mmu_update entries, mmuext ops) so far.
fn counts(model: &Shared) -> [u64; 4] {
    let s = model.stats();
    [
        s.hypercalls,
        s.multicalls,
        s.mmu_update_entries,
        s.mmuext_ops,
    ]
}

fn delta(a: [u64; 4], b: [u64; 4]) -> [u64; 4] {
    [b[0] - a[0], b[1] - a[1], b[2] - a[2], b[3] - a[3]]
}

/// The free: `np` in a batch. Returns what it cost.
fn absent_batched(model: &Shared, s: &mut Space, va: u64) -> [u64; 4] {
    let before = counts(model);
    let mut batch = s.lazy();
    batch
        .change_page_attr_set_clr(va, PAGE, Flags::empty(), Flags::PRESENT)
        .expect("np");
    batch.finish().expect("end of the batch");
    delta(before, counts(model))
}

/// The allocation: the map-back and its flush in a batch.
fn present_batched(model: &Shared, s: &mut Space, va: u64, pfn: Pfn) -> [u64; 4] {
    let before = counts(model);
    let mut batch = s.lazy();
    let flush = batch.map(va, pfn, PAGE, rw()).expect("map back");
    batch.flush(flush).expect("flush");
    batch.finish().expect("end of the batch");
    delta(before, counts(model))
}

#[test]
fn a_batched_unmap_or_map_back_is_one_multicall_with_its_flush() {
    let (model, mut s) = direct_map();
    for k in [0, 1, 17, DATA - 1] {
        let va = BASE + k * PAGE;
        // One hypercall, a multicall: one entry, one flush op.
        assert_eq!(absent_batched(&model, &mut s, va), [1, 1, 1, 1], "free {k}");
        assert!(
            matches!(s.lookup(va), Err(Error::NotMapped { .. })),
            "a hole after the free"
        );
        assert_eq!(s.backend().pending(), 0, "nothing left queued");
        assert_eq!(
            present_batched(&model, &mut s, va, Pfn(k)),
            [1, 1, 1, 1],
            "allocation {k}"
        );
        let t = s.lookup(va).expect("mapped again");
        assert_eq!((t.pfn, t.flags & rw()), (Pfn(k), rw()));
        assert_eq!(s.backend().pending(), 0, "nothing left queued");
    }
    assert_eq!(model.0.borrow().check_integrity(), Ok(()));
}

#[test]
fn outside_a_batch_the_same_calls_are_two_hypercalls_each() {
    let (model, mut s) = direct_map();
    let va = BASE + 5 * PAGE;
    let before = counts(&model);
    s.change_page_attr_set_clr(va, PAGE, Flags::empty(), Flags::PRESENT)
        .expect("np");
    let mid = counts(&model);
    let flush = s.map(va, Pfn(5), PAGE, rw()).expect("map back");
    s.flush(flush).expect("flush");
    let after = counts(&model);
    // The drain (mmu_update) and the flush (mmuext_op), no multicall.
    assert_eq!(delta(before, mid), [2, 0, 1, 1]);
    assert_eq!(delta(mid, after), [2, 0, 1, 1]);
}
