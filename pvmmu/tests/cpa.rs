//! change_page_attr on both backends: splits natively (every other page's
//! translation and flags preserved), one TLB decision per call, the
//! refusals (W+X, Xen's hole, a PV page-table frame made writable, flags
//! outside CPA's set) leaving the tree unchanged, and a property test of
//! random set/clear calls over a mixed 1 GiB / 2 MiB / 4 KiB native tree
//! and a PV tree against a reference map, with the invariant walker after
//! every call.

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use pvmmu::backend::{Backend, LargePages, TlbScope};
use pvmmu::entry::{Entry, FlagError, Flags, Level};
use pvmmu::space::{
    Protected, SlowPath, StaticProtection, CLFLUSH_LIMIT, CPA_TEST_BIT, MAX_PROTECTIONS,
};
use pvmmu::{AddressSpace, Error, Granule, Pfn};

const GIB: u64 = 1 << 30;
const MIB2: u64 = 1 << 21;
const PAGE: u64 = 4096;
/// A kernel-half base, 1 GiB aligned.
const BASE: u64 = 0xffff_8880_0000_0000;
const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);

type NativeSpace = AddressSpace<NativeBackend, Pool>;

/// A native space over an arena of `data` frames plus 256 table frames,
/// 1 GiB pages allowed.
fn native(data: u64) -> NativeSpace {
    let arena = Arena::new((data + 256) as usize);
    let backend = pvmmu::Native::new(arena).with_large_pages(LargePages::Size1GiB);
    AddressSpace::new(backend, Pool::new(data, 256))
        .map_err(|e| e.0)
        .expect("native space")
}

/// Every mapped page's (pfn, flags), large pages expanded (the page size is
/// not compared: a split changes it and nothing else).
fn translations<B: Backend>(b: &B, root: Pfn) -> BTreeMap<u64, (u64, Flags)> {
    leaves(b, root)
        .into_iter()
        .map(|(va, l)| (va, (l.pfn, l.flags)))
        .collect()
}

fn no_violations<B: Backend>(s: &AddressSpace<B, Pool>) {
    let oracle = TableSet::of(s.backend(), s.root());
    let v = violations(s.backend(), s.root(), Some(&oracle));
    assert!(v.is_empty(), "invariant violations: {v:?}");
}

#[test]
fn a_partial_change_splits_1g_then_2m_and_preserves_every_other_page() {
    // A 1 GiB page needs the frames 0..262144 to exist only as numbers:
    // the arena holds the tables; the leaves are never dereferenced.
    let mut s = native(1024);
    let flags = RW | Flags::GLOBAL;
    s.map_sized(BASE, Pfn(0), GIB, flags, Granule::Size1GiB, false)
        .unwrap()
        .ignore();
    let before = translations(s.backend(), s.root());
    let va = BASE + 3 * MIB2 + 5 * PAGE;
    let done = s.set_memory_ro(va, 3).unwrap();
    assert_eq!(done.splits, 2, "1 GiB -> 2 MiB, then that 2 MiB -> 4 KiB");
    assert_eq!(done.pages_changed, 3);
    assert_eq!(
        done.flush,
        Some(TlbScope::All),
        "a split flushes everything"
    );
    let after = translations(s.backend(), s.root());
    assert_eq!(after.len(), before.len());
    for (va_k, (pfn, f)) in &after {
        let (pfn0, f0) = before[va_k];
        assert_eq!(*pfn, pfn0, "translation of {va_k:#x} kept");
        if (va..va + 3 * PAGE).contains(va_k) {
            assert_eq!(*f, f0 - Flags::WRITABLE, "{va_k:#x} made read-only");
        } else {
            assert_eq!(*f, f0, "flags of {va_k:#x} kept (GLOBAL, NX, RW)");
        }
    }
    // The page sizes: 4 KiB around the change, 2 MiB elsewhere in the GiB.
    let l = leaves(s.backend(), s.root());
    assert_eq!(l[&va].page_len, PAGE);
    assert_eq!(l[&(BASE + 3 * MIB2)].page_len, PAGE);
    assert_eq!(l[&(BASE + 4 * MIB2)].page_len, MIB2);
    assert_eq!(l[&BASE].page_len, MIB2);
    no_violations(&s);
    // A partial change that alters nothing splits nothing.
    let d = s.set_memory_nx(BASE + 300 * MIB2 + PAGE, 1).unwrap();
    assert_eq!((d.splits, d.pages_changed, d.flush), (0, 0, None));
    assert_eq!(
        leaves(s.backend(), s.root())[&(BASE + 300 * MIB2)].page_len,
        MIB2
    );
    // Restoring does not reassemble; no further split.
    let done = s.set_memory_rw(va, 3).unwrap();
    assert_eq!((done.splits, done.pages_changed), (0, 3));
    assert_eq!(
        done.flush,
        Some(TlbScope::Range {
            start: va,
            pages: 3
        })
    );
    assert_eq!(translations(s.backend(), s.root()), before);
    assert_eq!(leaves(s.backend(), s.root())[&va].page_len, PAGE);
    assert_eq!(s.cpa_stats().splits, 2);
    assert_eq!(s.cpa_stats().calls, 3);
    no_violations(&s);
}

#[test]
fn the_lockless_path_takes_only_what_needs_no_lock_and_refuses_as_the_locked_one() {
    let mut s = native(1024);
    s.map_sized(BASE, Pfn(0), 2 * MIB2, RW, Granule::Size2MiB, false)
        .unwrap()
        .ignore();
    s.map(BASE + 2 * MIB2, Pfn(1 << 10), 60 * PAGE, RW)
        .unwrap()
        .ignore();
    // Four pages of "kernel text", executable.
    let text_va = BASE + 2 * MIB2 + 60 * PAGE;
    s.map(text_va, Pfn((1 << 10) + 60), 4 * PAGE, Flags::PRESENT)
        .unwrap()
        .ignore();
    let text = StaticProtection {
        region: Protected::KernelText,
        first: Pfn((1 << 10) + 60),
        end: Pfn((1 << 10) + 64),
    };
    s.cpa_protect(text).unwrap();
    s.cpa_stable(BASE, BASE + 4 * MIB2).unwrap();
    // SAFETY: used only over this space's arena, while it lives.
    let fast = unsafe { s.cpa_fast() };
    assert_eq!(s.cpa_protect(text), Err(Error::ProtectionsFrozen));
    let small = BASE + 2 * MIB2;
    let before = tree(s.backend(), s.root());
    let mut b = pvmmu::Native::new(s.backend().mem()).with_large_pages(LargePages::Size2MiB);
    let mut call = |va: u64, pages: u64, set: Flags, clear: Flags| {
        fast.change_page_attr_set_clr(&mut b, va, pages * PAGE, set, clear)
    };
    // What needs the lock, and why; nothing written.
    let slow = |r: Result<_, Error>| match r {
        Err(Error::SlowPath(why)) => why,
        r => panic!("expected the slow path, got {r:?}"),
    };
    assert_eq!(
        slow(call(BASE + PAGE, 1, CPA_TEST_BIT, Flags::empty())),
        SlowPath::Split { splits: 1 }
    );
    assert_eq!(
        slow(call(small, 1, Flags::WRITABLE, Flags::empty())),
        SlowPath::Loosens
    );
    assert_eq!(
        slow(call(small, 1, Flags::empty(), Flags::NO_EXECUTE)),
        SlowPath::Loosens
    );
    assert_eq!(
        slow(call(BASE + 4 * MIB2, 1, CPA_TEST_BIT, Flags::empty())),
        SlowPath::Unstable
    );
    // Refused as the locked path refuses (static protection, flags).
    assert_eq!(
        call(small + 59 * PAGE, 2, Flags::empty(), Flags::PRESENT),
        Err(Error::StaticProtection {
            va: small + 60 * PAGE,
            pfn: Pfn((1 << 10) + 60),
            region: Protected::KernelText
        })
    );
    assert_eq!(
        call(small, 1, Flags::USER_ACCESSIBLE, Flags::empty()),
        Err(Error::CpaFlags)
    );
    assert_eq!(tree(s.backend(), s.root()), before);
    // Taken: 4 KiB leaves, and a large page covered whole, one decision.
    let d = call(small, 8, Flags::empty(), Flags::WRITABLE).unwrap();
    assert_eq!((d.pages_changed, d.splits), (8, 0));
    assert_eq!(
        d.flush,
        Some(TlbScope::Range {
            start: small,
            pages: 8
        })
    );
    let d = call(BASE, 512, CPA_TEST_BIT, Flags::empty()).unwrap();
    assert_eq!((d.pages_changed, d.flush), (512, Some(TlbScope::All)));
    let d = call(small, 8, Flags::empty(), Flags::WRITABLE).unwrap();
    assert_eq!((d.pages_changed, d.flush), (0, None));
    assert_eq!(b.tlb().pages, 8);
    assert_eq!(b.tlb().full, 1);
    let l = leaves(s.backend(), s.root());
    assert_eq!(l[&BASE].page_len, MIB2, "covered whole: not split");
    assert_eq!(l[&BASE].flags, RW | CPA_TEST_BIT);
    assert_eq!(l[&small].flags, RW - Flags::WRITABLE);
    // The tables below a stable range are never freed: unmap is refused.
    assert_eq!(s.unmap(small, PAGE), Err(Error::StableRange { va: small }));
    no_violations(&s);
}

#[test]
fn a_split_keeps_the_pat_bit_and_moves_it_to_the_4k_position() {
    let mut s = native(1024);
    s.map_sized(BASE, Pfn(0), MIB2, RW, Granule::Size2MiB, false)
        .unwrap()
        .ignore();
    // Set PAT (bit 12) on the large leaf by hand, as a WC mapping would.
    let f = pvmmu::walk::walk(s.backend(), s.root(), BASE, Level::L1).unwrap();
    assert_eq!(f.level, Level::L2);
    let e = Entry(f.entry.0 | (1 << 12));
    s.backend_mut().write(f.table, f.index, e).unwrap();
    s.set_memory_ro(BASE + PAGE, 1).unwrap();
    let l1 = pvmmu::walk::walk(s.backend(), s.root(), BASE + 2 * PAGE, Level::L1).unwrap();
    assert_eq!(l1.level, Level::L1);
    assert_eq!(
        l1.entry.0 & (1 << 7),
        1 << 7,
        "PAT at bit 7 in a 4 KiB entry"
    );
    assert_eq!(l1.entry.0 & 0x000f_ffff_ffff_f000, 2 * PAGE, "frame 2");
}

#[test]
fn the_flush_is_one_decision_pages_up_to_the_limit_then_all() {
    let mut s = native(1024);
    s.map(BASE, Pfn(0), 64 * PAGE, RW).unwrap().ignore();
    let d = s.set_memory_ro(BASE, 32).unwrap();
    assert_eq!(
        d.flush,
        Some(TlbScope::Range {
            start: BASE,
            pages: 32
        })
    );
    let d = s.set_memory_ro(BASE, 33).unwrap();
    assert_eq!(d.pages_changed, 1, "only page 32 was still writable");
    assert_eq!(
        d.flush,
        Some(TlbScope::Range {
            start: BASE,
            pages: 33
        }),
        "one page changed: page by page over the range"
    );
    let d = s.set_memory_rw(BASE, 64).unwrap();
    assert_eq!(d.flush, Some(TlbScope::All));
    let d = s.set_memory_rw(BASE, 64).unwrap();
    assert_eq!((d.pages_changed, d.flush), (0, None), "nothing changed");
}

#[test]
fn np_parks_the_entry_and_p_brings_it_back() {
    let mut s = native(1024);
    s.map(BASE, Pfn(7), 4 * PAGE, RW).unwrap().ignore();
    let before = translations(s.backend(), s.root());
    s.set_memory_np(BASE + PAGE, 2).unwrap();
    assert!(matches!(
        s.lookup(BASE + PAGE),
        Err(Error::NotMapped { .. })
    ));
    assert_eq!(s.lookup(BASE).unwrap().pfn, Pfn(7));
    // A parked page accepts further changes (here: read-only) ...
    s.set_memory_ro(BASE, 4).unwrap();
    s.set_memory_p(BASE + PAGE, 2).unwrap();
    let t = s.lookup(BASE + 2 * PAGE).unwrap();
    assert_eq!(t.pfn, Pfn(9));
    assert_eq!(t.flags, RW - Flags::WRITABLE);
    s.set_memory_rw(BASE, 4).unwrap();
    assert_eq!(translations(s.backend(), s.root()), before);
    no_violations(&s);
}

#[test]
fn refusals_leave_the_tree_unchanged() {
    let mut s = native(1024);
    s.map_sized(BASE, Pfn(0), GIB, RW, Granule::Size1GiB, false)
        .unwrap()
        .ignore();
    s.map(BASE + GIB, Pfn(0), 4 * PAGE, Flags::PRESENT)
        .unwrap()
        .ignore();
    let before = leaves(s.backend(), s.root());
    let used = s.allocator().in_use();
    // W+X: executable over writable pages (with a split pending).
    assert_eq!(s.set_memory_x(BASE + PAGE, 1), Err(Error::WriteExecute));
    // Writable over executable pages.
    assert_eq!(s.set_memory_rw(BASE + GIB, 1), Err(Error::WriteExecute));
    // A hole at the end: nothing changed at the start either.
    assert!(matches!(
        s.set_memory_ro(BASE + GIB, 5),
        Err(Error::NotMapped { va }) if va == BASE + GIB + 4 * PAGE
    ));
    // Flags CPA does not handle, and set = clear.
    assert_eq!(
        s.change_page_attr_set_clr(BASE, PAGE, Flags::USER_ACCESSIBLE, Flags::empty()),
        Err(Error::CpaFlags)
    );
    assert_eq!(
        s.change_page_attr_set_clr(BASE, PAGE, Flags::GLOBAL, Flags::empty()),
        Err(Error::CpaFlags)
    );
    assert_eq!(
        s.change_page_attr_set_clr(BASE, PAGE, Flags::WRITABLE, Flags::WRITABLE),
        Err(Error::CpaFlags)
    );
    // No frame for the split reserve.
    s.allocator_mut().fail_after = Some(0);
    assert_eq!(s.set_memory_ro(BASE + PAGE, 1), Err(Error::OutOfFrames));
    s.allocator_mut().fail_after = None;
    assert_eq!(leaves(s.backend(), s.root()), before, "tree unchanged");
    assert_eq!(s.allocator().in_use(), used, "no frame taken");
    assert_eq!(s.cpa_stats().refused, 7);
    assert_eq!(s.cpa_stats().splits, 0);
}

/// The kernel image's link address (a second alias of its frames).
const IMG: u64 = 0xffff_ffff_8000_0000;

fn protect(s: &mut NativeSpace, region: Protected, first: u64, end: u64) {
    s.cpa_protect(StaticProtection {
        region,
        first: Pfn(first),
        end: Pfn(end),
    })
    .unwrap();
}

#[test]
fn static_protections_hold_in_every_alias_and_leave_the_tree_unchanged() {
    let mut s = native(1024);
    let ro_nx = Flags::PRESENT | Flags::NO_EXECUTE;
    // The image: text 0..4 (read-only, executable), rodata 4..6, a page
    // shared with the hypervisor at 6, data 7..16; the direct map of the
    // same frames at BASE (text and rodata read-only there too).
    s.map(IMG, Pfn(0), 4 * PAGE, Flags::PRESENT)
        .unwrap()
        .ignore();
    s.map(IMG + 4 * PAGE, Pfn(4), 2 * PAGE, ro_nx)
        .unwrap()
        .ignore();
    s.map(IMG + 6 * PAGE, Pfn(6), 10 * PAGE, RW)
        .unwrap()
        .ignore();
    s.map(BASE, Pfn(0), 6 * PAGE, ro_nx).unwrap().ignore();
    s.map(BASE + 6 * PAGE, Pfn(6), 10 * PAGE, RW)
        .unwrap()
        .ignore();
    // A 2 MiB page over frames 512..1024, read-only, text at 600.
    s.map_sized(BASE + GIB, Pfn(512), MIB2, ro_nx, Granule::Size2MiB, false)
        .unwrap()
        .ignore();
    protect(&mut s, Protected::KernelText, 0, 4);
    protect(&mut s, Protected::KernelRodata, 4, 6);
    protect(&mut s, Protected::HypervisorShared, 6, 7);
    protect(&mut s, Protected::KernelText, 600, 601);
    let before = tree(s.backend(), s.root());
    let refused = |va: u64, pfn: u64, region: Protected| {
        Err(Error::StaticProtection {
            va,
            pfn: Pfn(pfn),
            region,
        })
    };
    // Text made writable through its direct-map alias; a range starting
    // on data before it names the first text page.
    assert_eq!(
        s.set_memory_rw(BASE, 1),
        refused(BASE, 0, Protected::KernelText)
    );
    assert_eq!(
        s.set_memory_rw(BASE + 2 * PAGE, 4),
        refused(BASE + 2 * PAGE, 2, Protected::KernelText)
    );
    // Rodata writable through either alias.
    assert_eq!(
        s.set_memory_rw(IMG + 4 * PAGE, 2),
        refused(IMG + 4 * PAGE, 4, Protected::KernelRodata)
    );
    assert_eq!(
        s.set_memory_rw(BASE + 5 * PAGE, 3),
        refused(BASE + 5 * PAGE, 5, Protected::KernelRodata)
    );
    // The executed text made non-executable, or not present.
    assert_eq!(
        s.set_memory_nx(IMG + PAGE, 1),
        refused(IMG + PAGE, 1, Protected::KernelText)
    );
    assert_eq!(
        s.set_memory_np(IMG, 4),
        refused(IMG, 0, Protected::KernelText)
    );
    // Any change to the shared page, even the software test bit.
    for va in [IMG + 6 * PAGE, BASE + 6 * PAGE] {
        assert_eq!(
            s.change_page_attr_set_clr(va, PAGE, CPA_TEST_BIT, Flags::empty()),
            refused(va, 6, Protected::HypervisorShared)
        );
    }
    // Inside a large page, found before it is split.
    assert_eq!(
        s.set_memory_rw(BASE + GIB + 80 * PAGE, 16),
        refused(BASE + GIB + 88 * PAGE, 600, Protected::KernelText)
    );
    assert_eq!(tree(s.backend(), s.root()), before, "tree unchanged");
    assert_eq!(s.cpa_stats().splits, 0);
    // What the protections allow: no-op changes, the non-executable
    // alias of text marked, data next to them, the large page elsewhere.
    s.set_memory_nx(BASE, 6).unwrap();
    s.set_memory_ro(IMG, 6).unwrap();
    s.change_page_attr_set_clr(BASE, 4 * PAGE, CPA_TEST_BIT, Flags::empty())
        .unwrap();
    s.set_memory_ro(BASE + 7 * PAGE, 9).unwrap();
    s.set_memory_rw(BASE + GIB + 90 * PAGE, 2).unwrap();
    assert_eq!(s.cpa_stats().splits, 1);
    assert_eq!(
        s.set_memory_rw(BASE + GIB + 88 * PAGE, 1),
        refused(BASE + GIB + 88 * PAGE, 600, Protected::KernelText)
    );
    // The table of protections is bounded.
    for _ in 4..MAX_PROTECTIONS {
        protect(&mut s, Protected::KernelRodata, 2000, 2001);
    }
    assert_eq!(
        s.cpa_protect(StaticProtection {
            region: Protected::KernelRodata,
            first: Pfn(2001),
            end: Pfn(2002),
        }),
        Err(Error::TooManyProtections)
    );
    no_violations(&s);
}

#[test]
fn caching_changes_flush_the_range_lines_below_the_limit_and_everything_above() {
    let mut s = native(1024);
    let pages = CLFLUSH_LIMIT + 1;
    s.map(BASE, Pfn(0), pages * PAGE, RW).unwrap().ignore();
    let cache = |s: &NativeSpace| (s.backend().tlb().cache_pages, s.backend().tlb().cache_all);
    let flags = |s: &NativeSpace, va: u64| s.lookup(va).unwrap().flags;
    // Uncached: PCD and PWT, the four pages' lines flushed.
    let d = s.set_memory_uc(BASE + PAGE, 4).unwrap();
    assert_eq!(
        d.cache,
        Some(TlbScope::Range {
            start: BASE + PAGE,
            pages: 4
        })
    );
    assert_eq!(cache(&s), (4, 0));
    assert_eq!(
        flags(&s, BASE + PAGE),
        RW | Flags::NO_CACHE | Flags::WRITE_THROUGH
    );
    assert_eq!(flags(&s, BASE), RW, "the page before is untouched");
    // Write-combining (PAT index 1): PWT alone.
    s.set_memory_wc(BASE + PAGE, 4).unwrap();
    assert_eq!(flags(&s, BASE + 4 * PAGE), RW | Flags::WRITE_THROUGH);
    assert_eq!(cache(&s), (8, 0));
    // Back to write-back.
    s.set_memory_wb(BASE + PAGE, 4).unwrap();
    assert_eq!(flags(&s, BASE + PAGE), RW);
    assert_eq!(cache(&s), (12, 0));
    // No change, no flush.
    assert_eq!(s.set_memory_wb(BASE, 1).unwrap().cache, None);
    // Above the limit: the whole cache (wbinvd), once.
    let d = s.set_memory_uc(BASE, pages).unwrap();
    assert_eq!(d.cache, Some(TlbScope::All));
    assert_eq!(cache(&s), (12, 1));
    s.set_memory_wb(BASE, CLFLUSH_LIMIT).unwrap();
    assert_eq!(cache(&s), (12 + CLFLUSH_LIMIT, 1));
    assert_eq!(s.cpa_stats().cache_all, 1);
    assert_eq!(s.cpa_stats().cache_lines, 4);
}

#[test]
fn pv_refuses_caching_changes_before_xen_is_asked() {
    // Without I/O privilege (the entry rules; with or without a PAT), and
    // with it but no PAT known (no encoding to write).
    for (io, pat) in [
        (false, None),
        (false, Some(hypercall::abi::XEN_MSR_PAT)),
        (true, None),
    ] {
        let model = shared(DATA_FRAMES + TABLE_FRAMES + BOOT_FRAMES);
        let (model, mut s, _) = pv_aliased_direct_map_on(model, io, pat);
        assert!(!s.backend().flushes_caches());
        let before = leaves(s.backend(), s.root());
        let calls = hypercalls(&model);
        let refused = Err(Error::Flags(FlagError::CacheAttributes));
        assert_eq!(s.set_memory_uc(BASE, 1), refused, "io {io}");
        assert_eq!(s.set_memory_wc(BASE, 4), refused);
        assert_eq!(s.set_memory_wb(BASE, 4), refused);
        assert_eq!(
            s.change_page_attr_set_clr(BASE, PAGE, Flags::NO_CACHE, Flags::empty()),
            refused
        );
        // The PAT bit is no CPA flag where no cache mode uses it.
        assert_eq!(
            s.change_page_attr_set_clr(BASE, PAGE, Flags::HUGE_PAGE, Flags::empty()),
            Err(Error::CpaFlags)
        );
        assert_eq!(s.cpa_stats().refused, 5);
        assert_eq!(hypercalls(&model), calls, "Xen not asked");
        assert_eq!(leaves(s.backend(), s.root()), before);
    }
}

/// The raw L1 entry mapping `va`, as Xen holds it.
fn raw_leaf(s: &PvSpace, va: u64) -> u64 {
    pvmmu::walk::walk(s.backend(), s.root(), va, Level::L1)
        .unwrap()
        .entry
        .0
}

#[test]
fn pv_dom0_changes_caching_through_xen_with_xens_pat() {
    use hypercall::MmuHypercalls;
    use pvmmu::backend::cache::{CACHE_SELECT, PAT_4K};
    use pvmmu::model::{CacheFlushes, XenModel};
    let model = Shared::new(XenModel::new_hardware_domain(
        DATA_FRAMES + TABLE_FRAMES + BOOT_FRAMES,
    ));
    let (model, mut s, _) =
        pv_aliased_direct_map_on(model, true, Some(hypercall::abi::XEN_MSR_PAT));
    let cache_bits = |s: &PvSpace, va: u64| raw_leaf(s, va) & CACHE_SELECT.bits();
    let flushes = |m: &Shared| m.0.borrow().cache_flushes();
    // The same frames stay mapped write-back at a second address: Xen
    // 4.17 accepts the mix (the kernel, which knows its aliases, refuses
    // it before asking: `cache::check_aliases`).
    const OTHER: u64 = BASE + (1 << 30);
    s.map(OTHER, Pfn(0), 4 * PAGE, RW).unwrap().ignore();
    for (call, mode_bits) in [
        (
            AddressSpace::set_memory_uc as fn(&mut PvSpace, u64, u64) -> _,
            Flags::WRITE_THROUGH | Flags::NO_CACHE,
        ),
        (AddressSpace::set_memory_wc, PAT_4K),
        (AddressSpace::set_memory_wb, Flags::empty()),
    ] {
        let stats = model.stats();
        let before = flushes(&model);
        let d = call(&mut s, BASE + PAGE, 4).unwrap();
        assert_eq!(d.pages_changed, 4);
        assert_eq!(
            d.cache,
            Some(TlbScope::Range {
                start: BASE + PAGE,
                pages: 4
            })
        );
        for k in 1..5 {
            assert_eq!(
                cache_bits(&s, BASE + k * PAGE),
                mode_bits.bits(),
                "page {k}"
            );
            assert_eq!(
                cache_bits(&s, OTHER + (k - 1) * PAGE),
                0,
                "the other mapping"
            );
        }
        assert_eq!(cache_bits(&s, BASE), 0, "the page before is untouched");
        assert_eq!(cache_bits(&s, BASE + 5 * PAGE), 0, "and the one after");
        // One mmu_update with the four entries, then one mmuext_op: four
        // invlpg and the global cache flush.
        let after = model.stats();
        assert_eq!(after.hypercalls - stats.hypercalls, 2);
        assert_eq!(after.mmu_update_entries - stats.mmu_update_entries, 4);
        assert_eq!(after.mmuext_ops - stats.mmuext_ops, 5);
        assert_eq!(flushes(&model).global - before.global, 1);
    }
    // Above the clflush limit the engine's decision is "everything": still
    // one global flush, after the full TLB flush in the same batch.
    let pages = CLFLUSH_LIMIT + 1;
    let stats = model.stats();
    let d = s.set_memory_uc(BASE, pages).unwrap();
    assert_eq!(
        (d.flush, d.cache),
        (Some(TlbScope::All), Some(TlbScope::All))
    );
    assert_eq!(model.stats().mmuext_ops - stats.mmuext_ops, 2);
    // Uncached leaves are no violation where the domain may have them.
    no_pv_violations(&model, &s);
    s.set_memory_wb(BASE, pages).unwrap();
    assert_eq!(cache_bits(&s, BASE + 100 * PAGE), 0);
    assert_eq!(
        flushes(&model),
        CacheFlushes {
            local: 0,
            global: 5
        }
    );
    // No change, no flush.
    assert_eq!(s.set_memory_wb(BASE, 1).unwrap().cache, None);
    assert_eq!(flushes(&model).global, 5);
    let st = s.cpa_stats();
    assert_eq!((st.cache_lines, st.cache_all, st.refused), (3, 2, 0));
    no_pv_violations(&model, &s);
}

#[test]
fn pv_cache_bits_without_io_caps_are_refused_by_xen() {
    // A kernel claiming I/O privilege Xen did not give it: the model (as
    // Xen) refuses the entries (EINVAL), and the tree stays as it was.
    let model = shared(DATA_FRAMES + TABLE_FRAMES + BOOT_FRAMES);
    let (model, mut s, _) =
        pv_aliased_direct_map_on(model, true, Some(hypercall::abi::XEN_MSR_PAT));
    let before = leaves(s.backend(), s.root());
    let r = s.set_memory_uc(BASE, 4);
    // (A refused writable entry is reported as a possible page-table
    // mapping: the engine cannot tell which rule Xen applied.)
    let inval = hypercall::XenError::Inval;
    assert!(
        matches!(r, Err(Error::WritablePageTable { error, .. }) if error == inval),
        "{r:?}"
    );
    assert_eq!(leaves(s.backend(), s.root()), before);
    assert_eq!(model.0.borrow().cache_flushes().global, 0);
}

#[test]
fn pv_refuses_page_table_frames_and_the_xen_hole_before_xen_is_asked() {
    let (model, mut s, direct) = pv_aliased_direct_map();
    // A direct-map page of a frame that is a table of this tree.
    let mut table = None;
    pvmmu::walk::for_each_table(s.backend(), s.root(), &mut |t, l| {
        if l == Level::L1 && t.0 >= direct.first && t.0 < direct.first + direct.n {
            table.get_or_insert(t);
        }
    });
    let table = table.expect("an L1 inside the direct map's frames");
    let va = direct.base + table.0 * PAGE;
    let t = s.lookup(va).unwrap();
    assert!(
        !t.flags.contains(Flags::WRITABLE),
        "sealed: read-only alias"
    );
    let before = leaves(s.backend(), s.root());
    let calls = hypercalls(&model);
    assert_eq!(
        s.set_memory_rw(va - 2 * PAGE, 4),
        Err(Error::PageTableFrame { va, pfn: table })
    );
    assert_eq!(
        s.set_memory_ro(0xffff_8000_0000_0000, 1),
        Err(Error::XenHole)
    );
    assert_eq!(hypercalls(&model), calls, "refused before Xen is asked");
    assert_eq!(leaves(s.backend(), s.root()), before);
    // No lockless path under PV (no compare-and-exchange of live entries):
    // every call is left to the locked path, nothing asked of Xen.
    s.cpa_stable(BASE, BASE + GIB).unwrap();
    // SAFETY: used only with this space's backend, while it lives.
    let fast = unsafe { s.cpa_fast() };
    assert_eq!(
        fast.change_page_attr_set_clr(s.backend_mut(), BASE, PAGE, Flags::empty(), Flags::WRITABLE),
        Err(Error::SlowPath(pvmmu::space::SlowPath::NoAtomicEntries))
    );
    assert_eq!(hypercalls(&model), calls);
    // RO/NX changes on ordinary direct-map pages work under PV.
    let data = BASE + 8 * PAGE;
    let calls = hypercalls(&model);
    let d = s.set_memory_ro(data, 4).unwrap();
    assert_eq!(d.pages_changed, 4);
    assert!(hypercalls(&model) > calls, "PV writes go through Xen");
    assert!(!s.lookup(data).unwrap().flags.contains(Flags::WRITABLE));
    s.set_memory_rw(data, 4).unwrap();
    assert!(s.lookup(data).unwrap().flags.contains(Flags::WRITABLE));
    no_pv_violations(&model, &s);
}

const DATA_FRAMES: u64 = 1024;
const TABLE_FRAMES: u64 = 256;
const BOOT_FRAMES: u64 = 64;

type PvSpace = AddressSpace<PvAliasBackend, Pool>;

/// A PV space whose direct map (at [`BASE`]) covers the frames its later
/// tables come from, so those tables have read-only direct-map aliases;
/// frames 0..DATA_FRAMES mapped writable at `BASE`.
fn pv_aliased_direct_map() -> (Shared, PvSpace, DirectAliases) {
    pv_aliased_direct_map_io(false)
}

/// [`pv_aliased_direct_map`], with I/O privilege (`io`) or without.
fn pv_aliased_direct_map_io(io: bool) -> (Shared, PvSpace, DirectAliases) {
    let model = shared(DATA_FRAMES + TABLE_FRAMES + BOOT_FRAMES);
    pv_aliased_direct_map_on(model, io, None)
}

/// [`pv_aliased_direct_map`] over `model`, the backend told `io` and the
/// PAT Xen runs the guest with (`pat`), if any.
fn pv_aliased_direct_map_on(
    model: Shared,
    io: bool,
    pat: Option<u64>,
) -> (Shared, PvSpace, DirectAliases) {
    let direct = DirectAliases {
        base: BASE,
        first: DATA_FRAMES,
        n: TABLE_FRAMES,
    };
    let backend = pvmmu::XenPv::new(model.clone(), model.clone(), model.clone(), direct, None)
        .with_io_privilege(io);
    let backend = match pat {
        Some(pat) => backend.with_pat(pat),
        None => backend,
    };
    let pool = Pool::new(DATA_FRAMES + TABLE_FRAMES, BOOT_FRAMES);
    let mut s = AddressSpace::new(backend, pool)
        .map_err(|e| e.0)
        .expect("pv space");
    s.map(
        BASE + DATA_FRAMES * PAGE,
        Pfn(DATA_FRAMES),
        TABLE_FRAMES * PAGE,
        RW,
    )
    .expect("direct map of the table frames")
    .ignore();
    // SAFETY: nothing runs on these tables; the model walks them.
    unsafe { s.activate() }.expect("NEW_BASEPTR");
    s.allocator_mut().add_frames(DATA_FRAMES, TABLE_FRAMES);
    // Data pages, with tables from the direct map's frames.
    s.map(BASE, Pfn(0), DATA_FRAMES * PAGE, RW)
        .expect("direct map of the data frames")
        .ignore();
    (model, s, direct)
}

fn hypercalls(model: &Shared) -> u64 {
    use hypercall::MmuHypercalls;
    model.stats().hypercalls
}

fn no_pv_violations(model: &Shared, s: &PvSpace) {
    let m = model.0.borrow();
    let oracle = ModelOracle(&m);
    let v = violations(s.backend(), s.root(), Some(&oracle));
    assert!(v.is_empty(), "invariant violations: {v:?}");
    assert_eq!(m.check_integrity(), Ok(()));
}

#[test]
fn a_large_page_where_the_backend_has_none_is_refused() {
    let arena = Arena::new(64);
    let mut s = AddressSpace::new(pvmmu::Native::new(arena), Pool::new(32, 32))
        .map_err(|e| e.0)
        .expect("space");
    s.map(BASE, Pfn(0), PAGE, RW).unwrap().ignore();
    // Turn the L2 entry into a 2 MiB leaf by hand (no large pages here).
    let f = pvmmu::walk::walk(s.backend(), s.root(), BASE, Level::L2).unwrap();
    let leaf = Entry((RW | Flags::HUGE_PAGE).bits());
    s.backend_mut().write(f.table, f.index, leaf).unwrap();
    let before = tree(s.backend(), s.root());
    assert_eq!(s.set_memory_ro(BASE, 1), Err(Error::LargePagesUnavailable));
    assert_eq!(
        s.set_memory_ro(BASE, 512),
        Err(Error::LargePagesUnavailable)
    );
    assert_eq!(tree(s.backend(), s.root()), before);
}

/// Every present entry of the tree, by (level, address) (cheap: large
/// pages are not expanded).
fn tree<B: Backend>(b: &B, root: Pfn) -> Vec<(Level, u64, u64)> {
    let mut out = Vec::new();
    pvmmu::walk::for_each(b, root, &mut |step| {
        if let pvmmu::walk::Step::Entry {
            level, va, entry, ..
        } = step
        {
            out.push((level, va, entry.0));
        }
        true
    });
    out
}

// ---- property test ---------------------------------------------------------

const CHANGES: [(Flags, Flags); 8] = [
    (Flags::empty(), Flags::WRITABLE),   // ro
    (Flags::WRITABLE, Flags::empty()),   // rw
    (Flags::NO_EXECUTE, Flags::empty()), // nx
    (Flags::empty(), Flags::NO_EXECUTE), // x
    (Flags::empty(), Flags::PRESENT),    // np
    (Flags::PRESENT, Flags::empty()),    // p
    (pvmmu::space::CPA_TEST_BIT, Flags::empty()),
    (Flags::empty(), pvmmu::space::CPA_TEST_BIT),
];

/// The reference: every page's (pfn, flags incl. PRESENT).
type Model = BTreeMap<u64, (u64, Flags)>;

fn apply_model(m: &Model, va: u64, pages: u64, set: Flags, clear: Flags) -> Result<Model, ()> {
    let mut out = m.clone();
    for k in 0..pages {
        let p = out.get_mut(&(va + k * PAGE)).ok_or(())?;
        let f = (p.1 - clear) | set;
        if f.contains(Flags::WRITABLE) && !f.contains(Flags::NO_EXECUTE) {
            return Err(());
        }
        p.1 = f;
    }
    Ok(out)
}

/// Every page of the tree, parked ones included, with its raw flags.
fn raw_pages<B: Backend>(b: &B, root: Pfn, base: u64, span: u64) -> Model {
    let mut out = Model::new();
    let mut va = base;
    while va < base + span {
        match pvmmu::walk::walk(b, root, va, Level::L1) {
            Ok(f) if !f.entry.is_empty() && (f.level == Level::L1 || f.entry.is_huge()) => {
                let page_bytes = f.level.entry_span();
                let first = f.entry.0 & 0x000f_ffff_ffff_f000 & !(page_bytes - 1);
                let flags = b.normalize(f.entry.flags() - Flags::HUGE_PAGE)
                    - Flags::ACCESSED
                    - Flags::DIRTY;
                let pfn = b.to_pfn(pvmmu::Mfn(first >> 12)).unwrap().0
                    + (va - (va & !(page_bytes - 1))) / PAGE;
                out.insert(va, (pfn, flags));
            }
            _ => {}
        }
        va += PAGE;
    }
    out
}

/// The pages where two page maps differ (a short failure message).
type Page = Option<(u64, Flags)>;

fn diff(a: &Model, b: &Model) -> Vec<(u64, Page, Page)> {
    let keys: std::collections::BTreeSet<u64> = a.keys().chain(b.keys()).copied().collect();
    keys.into_iter()
        .filter(|k| a.get(k) != b.get(k))
        .take(4)
        .map(|k| (k, a.get(&k).copied(), b.get(&k).copied()))
        .collect()
}

fn run_native(rng: &mut TestRng, steps: usize) -> Result<(), TestCaseError> {
    // 2 GiB window: a 1 GiB page, 2 MiB pages and 4 KiB pages.
    let mut s = native(64);
    s.map_sized(BASE, Pfn(0), GIB, RW, Granule::Size1GiB, false)
        .unwrap()
        .ignore();
    s.map_sized(
        BASE + GIB,
        Pfn(1 << 18),
        4 * MIB2,
        RW,
        Granule::Size2MiB,
        false,
    )
    .unwrap()
    .ignore();
    s.map(BASE + GIB + 4 * MIB2, Pfn(5 << 18), 512 * PAGE, RW)
        .unwrap()
        .ignore();
    // Only the interesting parts of the window are modelled page by page:
    // around the ends of the 1 GiB page and the whole smaller region.
    let regions = [
        (BASE, 3 * MIB2),
        (BASE + GIB - 2 * MIB2, 2 * MIB2),
        (BASE + GIB, 5 * MIB2),
    ];
    let snapshot = |s: &NativeSpace| {
        let mut m = Model::new();
        for (b, l) in regions {
            m.extend(raw_pages(s.backend(), s.root(), b, l));
        }
        m
    };
    let mut model = snapshot(&s);
    let mut splits = 0u64;
    // Half the calls try the lockless path first (the whole window is
    // stable), as the kernel does, and fall back to the locked one.
    s.cpa_stable(BASE, BASE + 2 * GIB).unwrap();
    // SAFETY: used only with backends over this space's arena, while the
    // space lives.
    let fast = unsafe { s.cpa_fast() };
    let mut lockless = 0u64;
    for _ in 0..steps {
        let (base, len) = regions[rng.random_range(0..regions.len())];
        let pages = rng.random_range(1..=100u64).min(len / PAGE);
        let first = rng.random_range(0..=(len / PAGE - pages));
        let va = base + first * PAGE;
        let (set, clear) = CHANGES[rng.random_range(0..CHANGES.len())];
        let before_tree = tree(s.backend(), s.root());
        let mut r = Err(Error::SlowPath(SlowPath::NoAtomicEntries));
        if rng.random_range(0..2) == 0 {
            let mut b =
                pvmmu::Native::new(s.backend().mem()).with_large_pages(LargePages::Size1GiB);
            r = fast.change_page_attr_set_clr(&mut b, va, pages * PAGE, set, clear);
            match r {
                Ok(d) => {
                    lockless += 1;
                    prop_assert_eq!(d.splits, 0);
                }
                Err(Error::SlowPath(_)) => {
                    prop_assert_eq!(tree(s.backend(), s.root()), before_tree.clone());
                }
                _ => {}
            }
        }
        if let Err(Error::SlowPath(_)) = r {
            r = s.change_page_attr_set_clr(va, pages * PAGE, set, clear);
        }
        let expect = apply_model(&model, va, pages, set, clear);
        match (r, expect) {
            (Ok(d), Ok(m)) => {
                splits += u64::from(d.splits);
                model = m;
            }
            (Err(Error::WriteExecute), Err(())) => {
                prop_assert_eq!(tree(s.backend(), s.root()), before_tree);
            }
            (r, e) => prop_assert!(
                false,
                "cpa {:?} vs model {:?} at {:#x}+{}",
                r,
                e.is_ok(),
                va,
                pages
            ),
        }
        let d = diff(&snapshot(&s), &model);
        prop_assert!(
            d.is_empty(),
            "tree vs model after {:#x}+{}: {:x?}",
            va,
            pages,
            d
        );
        let oracle = TableSet::of(s.backend(), s.root());
        let v = violations(s.backend(), s.root(), Some(&oracle));
        prop_assert!(v.is_empty(), "violations {:?}", v);
    }
    prop_assert_eq!(s.cpa_stats().splits, splits);
    prop_assert!(splits > 0, "the run split large pages");
    prop_assert!(lockless > 0, "calls went through the lockless path");
    Ok(())
}

fn run_pv(rng: &mut TestRng, steps: usize) -> Result<(), TestCaseError> {
    let (model_xen, mut s, _) = pv_aliased_direct_map();
    let region = (BASE, DATA_FRAMES * PAGE);
    let mut model = raw_pages(s.backend(), s.root(), region.0, region.1);
    let mut holes = 0u64;
    for _ in 0..steps {
        let pages = rng.random_range(1..=100u64);
        let va = BASE + rng.random_range(0..=(DATA_FRAMES - pages)) * PAGE;
        let (set, clear) = CHANGES[rng.random_range(0..CHANGES.len())];
        let before_leaves = leaves(s.backend(), s.root());
        let r = s.change_page_attr_set_clr(va, pages * PAGE, set, clear);
        // The model: np makes holes (PV cannot park); p is refused; any
        // change over a hole is NotMapped at the first hole.
        let first_hole = (0..pages)
            .map(|k| va + k * PAGE)
            .find(|a| !model.contains_key(a));
        let expect = if set.contains(Flags::PRESENT) {
            Err(Error::Flags(FlagError::NotPresent))
        } else if let Some(hole) = first_hole {
            Err(Error::NotMapped { va: hole })
        } else if clear.contains(Flags::PRESENT) {
            let mut m = model.clone();
            for k in 0..pages {
                m.remove(&(va + k * PAGE));
            }
            Ok(m)
        } else {
            apply_model(&model, va, pages, set, clear).map_err(|()| Error::WriteExecute)
        };
        match (r, expect) {
            (Ok(d), Ok(m)) => {
                prop_assert_eq!(d.splits, 0);
                if clear.contains(Flags::PRESENT) {
                    holes += pages;
                }
                model = m;
            }
            (Err(got), Err(want)) => {
                prop_assert_eq!(got, want);
                prop_assert_eq!(leaves(s.backend(), s.root()), before_leaves);
            }
            (r, e) => prop_assert!(false, "cpa {:?} vs model {:?}", r, e.map(|_| ())),
        }
        // Now and then the holes are mapped again (as DEBUG_PAGEALLOC
        // maps a frame back): their L1 tables are still there.
        if rng.random_range(0..4u32) == 0 {
            let tables = s.table_counts();
            for k in 0..DATA_FRAMES {
                let a = BASE + k * PAGE;
                if let std::collections::btree_map::Entry::Vacant(hole) = model.entry(a) {
                    s.map(a, Pfn(k), PAGE, RW).unwrap().ignore();
                    hole.insert((k, RW));
                }
            }
            prop_assert_eq!(s.table_counts(), tables, "no table made or freed");
        }
        let d = diff(
            &raw_pages(s.backend(), s.root(), region.0, region.1),
            &model,
        );
        prop_assert!(
            d.is_empty(),
            "tree vs model after {:#x}+{} {:?}/{:?}: {:x?}",
            va,
            pages,
            set,
            clear,
            d
        );
        let m = model_xen.0.borrow();
        let oracle = ModelOracle(&m);
        let v = violations(s.backend(), s.root(), Some(&oracle));
        prop_assert!(v.is_empty(), "violations {:?}", v);
        prop_assert_eq!(m.check_integrity(), Ok(()));
    }
    prop_assert!(holes > 0, "the run made holes");
    Ok(())
}

#[test]
fn random_cpa_calls_on_a_pv_direct_map_match_the_model() {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[9; 32]),
    );
    for _ in 0..4 {
        run_pv(runner.rng(), 60).unwrap();
    }
}

#[test]
fn random_cpa_calls_on_a_mixed_native_tree_match_the_model() {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    for _ in 0..8 {
        run_native(runner.rng(), 60).unwrap();
    }
}
