//! Leaves carrying the PAT bit (a cache type from `IA32_PAT` entries 4-7):
//! bit 12 of a 2 MiB or 1 GiB leaf is its PAT bit, not part of its frame,
//! and bit 7 of a 4 KiB leaf is. Translation, protect, the `x86_64` traits
//! and CPA's split must name the right frame and keep the bit.

mod common;

use common::*;
use pvmmu::backend::{Backend, LargePages};
use pvmmu::entry::{Entry, Flags, Level, PAT_4K, PAT_LARGE};
use pvmmu::{AddressSpace, Granule, Pfn};
use x86_64::structures::paging::{Mapper, Page, PageTableFlags, Size2MiB};
use x86_64::VirtAddr;

const BASE: u64 = 0xffff_8880_0000_0000;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);
const RW: Flags = RO.union(Flags::WRITABLE);

type NativeSpace = AddressSpace<NativeBackend, Pool>;

fn native() -> NativeSpace {
    let backend = pvmmu::Native::new(Arena::new(1024 + 256)).with_large_pages(LargePages::Size1GiB);
    AddressSpace::new(backend, Pool::new(1024, 256))
        .map_err(|e| e.0)
        .expect("native space")
}

/// Maps `len` bytes at `va` from `pfn` in `granule` pages, then sets the PAT
/// bit in the leaf at `va` by hand (pvmmu's flags cannot name it; a kernel
/// or firmware may have written it).
fn map_with_pat(s: &mut NativeSpace, va: u64, pfn: u64, granule: Granule) -> Entry {
    s.map_sized(va, Pfn(pfn), granule.bytes(), RW, granule, false)
        .expect("map")
        .ignore();
    let f = pvmmu::walk::walk(s.backend(), s.root(), va, Level::L1).expect("walk");
    assert_eq!(f.level, granule.level());
    let pat = if granule == Granule::Size4KiB {
        PAT_4K
    } else {
        PAT_LARGE
    };
    let e = Entry(f.entry.0 | pat);
    s.backend_mut().write(f.table, f.index, e).expect("write");
    s.backend_mut().drain().expect("drain");
    e
}

fn no_violations(s: &NativeSpace) {
    let oracle = TableSet::of(s.backend(), s.root());
    let v = violations(s.backend(), s.root(), Some(&oracle));
    assert!(v.is_empty(), "invariant violations: {v:?}");
}

fn raw_leaf(s: &NativeSpace, va: u64) -> (Level, Entry) {
    let f = pvmmu::walk::walk(s.backend(), s.root(), va, Level::L1).expect("walk");
    (f.level, f.entry)
}

#[test]
fn a_large_leaf_with_pat_translates_to_its_own_frames() {
    let mut s = native();
    map_with_pat(&mut s, BASE, 512, Granule::Size2MiB);
    for k in [0, 1, 511] {
        let t = s.lookup(BASE + k * PAGE).expect("translation");
        assert_eq!(t.pfn, Pfn(512 + k), "page {k} of the 2 MiB page");
        assert_eq!(t.granule, Granule::Size2MiB);
    }
    // 1 GiB: the frames exist only as numbers (never dereferenced).
    map_with_pat(&mut s, BASE + GIB, 1 << 18, Granule::Size1GiB);
    let t = s.lookup(BASE + GIB + 3 * PAGE).expect("translation");
    assert_eq!(t.pfn, Pfn((1 << 18) + 3));
    no_violations(&s);
}

#[test]
fn protect_keeps_the_frame_and_the_pat_bit_of_every_leaf_size() {
    let mut s = native();
    for (va, pfn, granule) in [
        (BASE, 512, Granule::Size2MiB),
        (BASE + GIB, 1 << 18, Granule::Size1GiB),
        (BASE + 2 * GIB, 7, Granule::Size4KiB),
    ] {
        let before = map_with_pat(&mut s, va, pfn, granule);
        let flush = s.protect(va, granule.bytes(), RO, false).expect("protect");
        s.flush(flush).expect("flush");
        let (level, after) = raw_leaf(&s, va);
        assert_eq!(
            after.leaf_mfn(level),
            before.leaf_mfn(level),
            "{granule:?} frame"
        );
        assert_ne!(after.pat_bit(level), 0, "{granule:?} keeps its PAT bit");
        assert!(
            !after.flags().contains(Flags::WRITABLE),
            "{granule:?} read-only"
        );
        let last = granule.bytes() / PAGE - 1;
        assert_eq!(s.lookup(va + last * PAGE).unwrap().pfn, Pfn(pfn + last));
    }
}

#[test]
fn the_x86_64_update_flags_keeps_a_large_pages_frame_and_pat_bit() {
    let mut s = native();
    let before = map_with_pat(&mut s, BASE, 512, Granule::Size2MiB);
    let page = Page::<Size2MiB>::containing_address(VirtAddr::new(BASE));
    let flags = PageTableFlags::PRESENT | PageTableFlags::NO_EXECUTE | PageTableFlags::HUGE_PAGE;
    // SAFETY (test): the arena's frames back nothing live.
    unsafe { s.update_flags(page, flags) }
        .expect("update_flags")
        .ignore();
    let (level, after) = raw_leaf(&s, BASE);
    assert_eq!(after.leaf_mfn(level), before.leaf_mfn(level));
    assert_ne!(after.pat_bit(level), 0);
    assert_eq!(s.lookup(BASE + PAGE).unwrap().pfn, Pfn(513));
}

#[test]
fn a_split_of_a_pat_large_page_gives_4k_leaves_with_pat_at_bit_7() {
    let mut s = native();
    map_with_pat(&mut s, BASE, 512, Granule::Size2MiB);
    let done = s.set_memory_ro(BASE + 5 * PAGE, 1).expect("cpa");
    assert_eq!(done.splits, 1);
    for k in [0, 5, 511] {
        let (level, e) = raw_leaf(&s, BASE + k * PAGE);
        assert_eq!(level, Level::L1);
        assert_eq!(
            e.mfn(),
            s.backend().to_mfn(Pfn(512 + k)).expect("mfn"),
            "page {k}"
        );
        assert_eq!(
            e.pat_bit(Level::L1),
            PAT_4K,
            "page {k} keeps the cache type"
        );
    }
    no_violations(&s);
}
