//! Batch edges: sequences of 0, 1, cap - 1, cap, cap + 1, 3 x cap and
//! 3 x cap + 1 queued writes, so that a lost partial last batch cannot hide.
//! Hypercall and entry counts are asserted exactly, and every entry is read
//! back from the model's memory.

mod common;

use common::*;
use hypercall::MmuHypercalls;
use pvmmu::backend::Backend;
use pvmmu::entry::{Entry, Flags, Level};
use pvmmu::{AddressSpace, Pfn};

const CAP: usize = 16;
const LENGTHS: [usize; 7] = [0, 1, CAP - 1, CAP, CAP + 1, 3 * CAP, 3 * CAP + 1];
const VA: u64 = 0x0000_1000_0000_0000;
const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);

fn space(model: &Shared, cap: usize) -> AddressSpace<PvBackend, Pool> {
    let backend = pv_backend(model, cap);
    AddressSpace::new(backend, Pool::new(4096, 64))
        .map_err(|e| e.0)
        .expect("space")
}

fn calls(n: usize, cap: usize) -> u64 {
    n.div_ceil(cap) as u64
}

#[test]
fn map_and_unmap_in_a_live_l1_drain_every_entry() {
    for n in LENGTHS {
        let model = shared(8192);
        let mut s = space(&model, CAP);
        // Page 0 makes the L1 live; the n pages after it go into that L1.
        s.map(VA, Pfn(0), 4096, RO).expect("first page").ignore();
        model.0.borrow_mut().reset_stats();

        s.map(VA + 4096, Pfn(1), n as u64 * 4096, RO)
            .expect("map")
            .ignore();
        let st = model.0.borrow().stats();
        assert_eq!(st.mmu_update_entries, n as u64, "map of {n}: entries");
        assert_eq!(st.hypercalls, calls(n, CAP), "map of {n}: hypercalls");
        for k in 1..=n as u64 {
            let t = s.lookup(VA + k * 4096).expect("mapped");
            assert_eq!(t.pfn, Pfn(k), "page {k} of {n}");
        }
        model.0.borrow().check_integrity().expect("integrity");

        model.0.borrow_mut().reset_stats();
        s.unmap(VA + 4096, n as u64 * 4096).expect("unmap").ignore();
        let st = model.0.borrow().stats();
        assert_eq!(st.mmu_update_entries, n as u64, "unmap of {n}: entries");
        assert_eq!(st.hypercalls, calls(n, CAP), "unmap of {n}: hypercalls");
        for k in 1..=n as u64 {
            assert!(
                s.lookup(VA + k * 4096).is_err(),
                "page {k} of {n} still mapped"
            );
        }
        assert!(s.lookup(VA).is_ok());
    }
}

#[test]
fn raw_backend_writes_reach_memory_in_exact_batches() {
    for cap in [1, CAP, 512] {
        for n in [
            0,
            1,
            cap.saturating_sub(1),
            cap,
            cap + 1,
            3 * cap,
            3 * cap + 1,
        ] {
            if n > 512 {
                continue;
            }
            let model = shared(8192);
            let mut s = space(&model, cap);
            s.map(VA, Pfn(0), 4096, RO).expect("first page").ignore();
            let l1 = {
                let b = s.backend();
                let mut t = s.root();
                for level in [Level::L4, Level::L3, Level::L2] {
                    t = b.to_pfn(b.read(t, level.index(VA)).mfn()).expect("table");
                }
                t
            };
            model.0.borrow_mut().reset_stats();
            let b = s.backend_mut();
            for i in 0..n {
                let e = b
                    .leaf_entry(Level::L1, Pfn(100 + i as u64), RO)
                    .expect("entry");
                // Index 0 holds the first page: write entries from the top.
                b.write(l1, 511 - i, e).expect("queue");
            }
            // Reads see the queued values before the drain.
            for i in 0..n {
                assert_eq!(
                    b.to_pfn(b.read(l1, 511 - i).mfn()),
                    Some(Pfn(100 + i as u64))
                );
            }
            b.drain().expect("drain");
            let st = model.0.borrow().stats();
            assert_eq!(st.mmu_update_entries, n as u64, "cap {cap} n {n}: entries");
            assert_eq!(st.hypercalls, calls(n, cap), "cap {cap} n {n}: hypercalls");
            let m = model.0.borrow();
            let l1_mfn = m.mfn_of(l1).expect("mfn");
            for i in 0..n {
                let raw = m.read_entry(l1_mfn, 511 - i).expect("entry");
                assert_eq!(
                    Entry(raw).mfn(),
                    m.mfn_of(Pfn(100 + i as u64)).expect("mfn"),
                    "cap {cap} n {n} i {i}"
                );
            }
            m.check_integrity().expect("integrity");
        }
    }
}

#[test]
fn fresh_tables_cost_one_hook_each_not_one_entry_per_page() {
    let model = shared(8192);
    let mut s = space(&model, CAP);
    model.0.borrow_mut().reset_stats();
    // 3 L1 tables' worth (1536 pages) under a new L3 / L2: the whole subtree
    // is built with plain stores and hooked by one entry in the root.
    s.map(VA, Pfn(0), 1536 * 4096, RO).expect("map").ignore();
    let st = model.0.borrow().stats();
    assert_eq!(st.mmu_update_entries, 1);
    assert_eq!(st.hypercalls, 1);
    // A fourth L1 under the now-live L2: one hook again.
    model.0.borrow_mut().reset_stats();
    s.map(VA + 1536 * 4096, Pfn(1536), 512 * 4096, RO)
        .expect("map")
        .ignore();
    let st = model.0.borrow().stats();
    assert_eq!((st.mmu_update_entries, st.hypercalls), (1, 1));
    model.0.borrow().check_integrity().expect("integrity");
    // Unmapping everything: the four L1s are covered whole, so each is
    // unhooked by one write (no leaf is cleared one by one), then the
    // emptied L2 and L3: 6 entries; plus one TLB flush.
    model.0.borrow_mut().reset_stats();
    s.unmap(VA, 2048 * 4096).expect("unmap").ignore();
    let st = model.0.borrow().stats();
    assert_eq!(st.mmu_update_entries, 4 + 1 + 1);
    assert_eq!(st.mmuext_ops, 1);
    assert_eq!(st.hypercalls, 1, "unhooks and flush in one multicall");
    for k in [0, 511, 512, 2047] {
        assert!(s.lookup(VA + k * 4096).is_err());
    }
    model.0.borrow().check_integrity().expect("integrity");
    assert_eq!(s.allocator().in_use(), 1, "only the root is left");
}
