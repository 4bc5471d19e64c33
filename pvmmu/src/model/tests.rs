//! Unit tests of the model: each rule with its accept and refuse cases and
//! the exact error number, type counts after hook/unhook and pin/unpin,
//! batches, multicall ordering, counters and the integrity check.

use alloc::vec::Vec;

use hypercall::abi::{mmu_update, mmuext_op};
use hypercall::{BatchError, Call, MmuExt, MmuHypercalls, PinLevel, XenError};

use super::*;
use crate::phys::{FrameMap, PhysMem};
use crate::types::{Mfn, Pfn};

const P: u64 = PAGE_PRESENT;
const RW: u64 = PAGE_RW;
const KERNEL_BITS: u64 = PAGE_USER | PAGE_GUEST_KERNEL;

fn mfn(m: &XenModel, pfn: u64) -> u64 {
    m.mfn_of(Pfn(pfn)).unwrap().0
}

fn pte(m: &XenModel, pfn: u64, flags: u64) -> u64 {
    (mfn(m, pfn) << 12) | flags
}

fn req(m: &XenModel, table_pfn: u64, index: usize, val: u64) -> mmu_update {
    mmu_update {
        ptr: (mfn(m, table_pfn) << 12) + index as u64 * 8,
        val,
    }
}

fn set(m: &mut XenModel, table_pfn: u64, index: usize, val: u64) -> Result<(), XenError> {
    let r = req(m, table_pfn, index, val);
    m.mmu_update(&[r]).map_err(|e| e.error)
}

/// `set(m, table, index, val)` with `val` evaluated first, so it may borrow
/// the model.
macro_rules! set {
    ($m:ident, $t:expr, $i:expr, $v:expr) => {{
        let v = $v;
        set(&mut $m, $t, $i, v)
    }};
}

fn ext(m: &mut XenModel, op: MmuExt) -> Result<(), XenError> {
    m.mmuext_op(&[op.encode()]).map_err(|e| e.error)
}

fn pin(m: &mut XenModel, pfn: u64, level: PinLevel) -> Result<(), XenError> {
    let mfn = mfn(m, pfn);
    ext(m, MmuExt::Pin { level, mfn })
}

fn unpin(m: &mut XenModel, pfn: u64) -> Result<(), XenError> {
    let mfn = mfn(m, pfn);
    ext(m, MmuExt::Unpin { mfn })
}

/// Stores directly into frame `pfn` (only valid while it is not a table).
fn poke(m: &XenModel, pfn: u64, index: usize, val: u64) {
    let ptr = m.frame_ptr(Pfn(pfn)).unwrap();
    // SAFETY: the model's frames are valid for 4 KiB of writes and the test
    // holds no other reference into them.
    unsafe { (*ptr.as_ptr())[index] = val };
}

fn peek(m: &XenModel, pfn: u64, index: usize) -> u64 {
    m.read_entry(Mfn(mfn(m, pfn)), index).unwrap()
}

fn ty(m: &XenModel, pfn: u64) -> (PageType, u32) {
    let x = Mfn(mfn(m, pfn));
    (m.page_type(x), m.type_count(x))
}

#[test]
fn p2m_is_a_non_identity_bijection() {
    for n in [1u64, 2, 3, 10, 64, 1000, 4097] {
        let m = XenModel::new(n);
        let mut seen = alloc::collections::BTreeSet::new();
        let mut identity_offsets = 0;
        for pfn in 0..n {
            let x = m.to_mfn(Pfn(pfn)).unwrap();
            assert!((GUEST_MFN_BASE..GUEST_MFN_BASE + n).contains(&x.0));
            assert!(seen.insert(x.0), "n={n}: mfn {x:?} twice");
            assert_eq!(m.to_pfn(x), Some(Pfn(pfn)));
            if x.0 - GUEST_MFN_BASE == pfn {
                identity_offsets += 1;
            }
        }
        if n > 3 {
            assert!(identity_offsets < n / 2, "n={n}: nearly identity");
        }
        assert_eq!(m.to_mfn(Pfn(n)), None);
        assert_eq!(m.to_pfn(Mfn(5)), None);
    }
}

#[test]
fn memory_is_lazy_and_pointers_are_stable() {
    // 64 GiB of guest: nothing allocated until touched.
    let m = XenModel::new(16 << 20);
    assert_eq!(m.memory.borrow().len(), 0);
    let a = m.frame_ptr(Pfn(12_345_678)).unwrap();
    let b = m.frame_ptr(Pfn(7)).unwrap();
    assert_eq!(m.memory.borrow().len(), 2);
    for pfn in 100..200 {
        m.frame_ptr(Pfn(pfn)).unwrap();
    }
    assert_eq!(m.frame_ptr(Pfn(12_345_678)), Some(a));
    assert_eq!(m.frame_ptr(Pfn(7)), Some(b));
    assert_eq!(m.frame_ptr(Pfn(16 << 20)), None);
    poke(&m, 7, 3, 0xdead);
    assert_eq!(peek(&m, 7, 3), 0xdead);
}

#[test]
fn start_of_day_builds_xen_style_tables() {
    let mut m = XenModel::new(1024);
    let virt = 0xffff_ffff_8000_0000;
    let sod = m.start_of_day(virt, 20).unwrap();
    assert_eq!(sod.pt_base_pfn, Pfn(20));
    // One each of L4, L3, L2, L1 for 24 frames in one 2 MiB block.
    assert_eq!(sod.nr_pt_frames, 4);
    assert_eq!(sod.first_free_pfn, Pfn(24));
    assert_eq!(sod.pt_base_va, virt + 20 * 4096);
    let root = sod.root_mfn;
    assert_eq!(m.current_root(), Some(root));
    assert!(m.is_pinned(root));
    assert_eq!(m.page_type(root), PageType::L4);
    assert_eq!(m.type_count(root), 2, "pin + CR3");
    assert_eq!(ty(&m, 21), (PageType::L3, 1));
    assert_eq!(ty(&m, 22), (PageType::L2, 1));
    assert_eq!(ty(&m, 23), (PageType::L1, 1));
    assert_eq!(ty(&m, 0), (PageType::Writable, 1));
    assert_eq!(ty(&m, 19), (PageType::Writable, 1));
    assert_eq!(ty(&m, 24), (PageType::None, 0));
    // Tables are mapped read-only, the image writable, all with USER.
    let l1 = 23;
    assert_eq!(peek(&m, l1, 0), pte(&m, 0, BASE | PAGE_GUEST_KERNEL));
    assert_eq!(
        peek(&m, l1, 20),
        pte(&m, 20, (BASE & !RW) | PAGE_GUEST_KERNEL)
    );
    // Xen's slots are filled: RO M2P, the linear self-map.
    assert_ne!(peek(&m, 20, 256), 0);
    assert_eq!(peek(&m, 20, 258) & ENTRY_MFN_MASK, root.0 << 12);
    assert_eq!(m.stats(), HypercallStats::default());
    assert_eq!(m.check_integrity(), Ok(()));
    assert_eq!(
        m.l1_slot_of(virt + 5 * 4096),
        Ok((mfn(&m, 23), 5)),
        "update_va_mapping finds the L1"
    );
    // A second start of day is refused; so are bad bases and tiny guests.
    assert_eq!(m.start_of_day(virt, 1), Err(XenError::Inval));
    assert_eq!(
        XenModel::new(1024).start_of_day(virt + 1, 1),
        Err(XenError::Inval)
    );
    assert_eq!(
        XenModel::new(1024).start_of_day(0xffff_8000_0000_0000, 1),
        Err(XenError::Inval)
    );
    assert_eq!(
        XenModel::new(10).start_of_day(virt, 8),
        Err(XenError::NoMem)
    );
    assert_eq!(
        XenModel::new(1024).start_of_day(virt, u64::MAX),
        Err(XenError::NoMem)
    );
    assert_eq!(
        XenModel::new(1 << 20).start_of_day(0xffff_ffff_ffff_f000, 100),
        Err(XenError::Inval),
        "wraps past the top"
    );
    assert_eq!(
        XenModel::new(1 << 20).start_of_day(0x7fff_ffff_f000, 100),
        Err(XenError::Inval),
        "leaves the lower half"
    );
}

const BASE: u64 = PAGE_PRESENT | PAGE_RW | PAGE_ACCESSED | PAGE_USER | PAGE_DIRTY;

/// A domain with a pinned L1 at pfn 10 (empty) and data frames 20..
fn with_l1(kind: DomainKind) -> XenModel {
    let mut m = XenModel::with_kind(256, kind);
    pin(&mut m, 10, PinLevel::L1).unwrap();
    m
}

#[test]
fn l1_entry_takes_and_drops_a_writable_reference() {
    let mut m = with_l1(DomainKind::Unprivileged);
    assert_eq!(ty(&m, 10), (PageType::L1, 1));
    set!(m, 10, 0, pte(&m, 20, P | RW)).unwrap();
    assert_eq!(ty(&m, 20), (PageType::Writable, 1));
    // Xen marks kernel mappings USER + GUEST_KERNEL.
    assert_eq!(peek(&m, 10, 0), pte(&m, 20, P | RW | KERNEL_BITS));
    set!(m, 10, 1, pte(&m, 20, P | RW)).unwrap();
    assert_eq!(ty(&m, 20), (PageType::Writable, 2));
    // A user mapping gets GLOBAL instead.
    set!(m, 10, 2, pte(&m, 21, P | PAGE_USER)).unwrap();
    assert_eq!(peek(&m, 10, 2), pte(&m, 21, P | PAGE_USER | PAGE_GLOBAL));
    assert_eq!(ty(&m, 21), (PageType::None, 0), "read-only: no type ref");
    set!(m, 10, 0, 0).unwrap();
    set!(m, 10, 1, pte(&m, 20, P)).unwrap();
    assert_eq!(ty(&m, 20), (PageType::None, 0));
    // Only NX/A/D/AVAIL change: fast path, no second reference.
    set!(m, 10, 3, pte(&m, 22, P | RW)).unwrap();
    set!(m, 10, 3, pte(&m, 22, P | RW | PAGE_NX | PAGE_DIRTY | 0x200)).unwrap();
    assert_eq!(ty(&m, 22), (PageType::Writable, 1));
    assert_eq!(m.check_integrity(), Ok(()));
}

#[test]
fn l1_cache_attributes_depend_on_privilege() {
    let mut domu = with_l1(DomainKind::Unprivileged);
    for bit in [PAGE_PWT, PAGE_PCD, PAGE_PSE] {
        let v = pte(&domu, 20, P | RW | bit);
        assert_eq!(set!(domu, 10, 0, v), Err(XenError::Inval));
    }
    // GLOBAL is fine in an L1 entry.
    let v = pte(&domu, 20, P | PAGE_GLOBAL);
    assert_eq!(set!(domu, 10, 0, v), Ok(()));
    let mut dom0 = with_l1(DomainKind::Hardware);
    let v = pte(&dom0, 20, P | RW | PAGE_PCD);
    assert_eq!(set!(dom0, 10, 0, v), Ok(()));
}

#[test]
fn dom0_maps_one_frame_with_different_cache_attributes_at_once() {
    // Xen 4.17 keeps no per-frame cache attribute (XSA-402 dropped
    // PGC_cacheattr): every PAT index is accepted on a RAM frame, whatever
    // its other mappings say, and read back as written.
    let mut dom0 = with_l1(DomainKind::Hardware);
    let modes = [
        0,
        PAGE_PWT,
        PAGE_PCD,
        PAGE_PWT | PAGE_PCD,
        PAGE_PSE,
        PAGE_PSE | PAGE_PWT | PAGE_PCD,
    ];
    for (i, bits) in modes.into_iter().enumerate() {
        set!(dom0, 10, i, pte(&dom0, 20, P | RW | bits)).unwrap();
        assert_eq!(
            peek(&dom0, 10, i),
            pte(&dom0, 20, P | RW | bits | KERNEL_BITS)
        );
    }
    assert_eq!(ty(&dom0, 20), (PageType::Writable, modes.len() as u32));
    // A change of cache attribute alone re-validates the entry (it is not
    // on the fast path's whitelist) and keeps one writable reference.
    set!(dom0, 10, 0, pte(&dom0, 20, P | RW | PAGE_PSE)).unwrap();
    assert_eq!(ty(&dom0, 20), (PageType::Writable, modes.len() as u32));
    assert_eq!(dom0.check_integrity(), Ok(()));
    // The same in a domU: refused, the old entry kept.
    let mut domu = with_l1(DomainKind::Unprivileged);
    set!(domu, 10, 0, pte(&domu, 20, P | RW)).unwrap();
    assert_eq!(
        set!(domu, 10, 0, pte(&domu, 20, P | RW | PAGE_PSE)),
        Err(XenError::Inval)
    );
    assert_eq!(peek(&domu, 10, 0), pte(&domu, 20, P | RW | KERNEL_BITS));
}

#[test]
fn cache_flushes_need_io_privilege_and_are_counted() {
    let mut domu = XenModel::new(64);
    let mut dom0 = XenModel::new_hardware_domain(64);
    // Xen 4.17 `do_mmuext_op`: EACCES for the local flush, EINVAL for the
    // global one.
    assert_eq!(ext(&mut domu, MmuExt::FlushCache), Err(XenError::Acces));
    assert_eq!(
        ext(&mut domu, MmuExt::FlushCacheGlobal),
        Err(XenError::Inval)
    );
    assert_eq!(domu.cache_flushes(), CacheFlushes::default());
    assert_eq!(ext(&mut dom0, MmuExt::FlushCache), Ok(()));
    assert_eq!(ext(&mut dom0, MmuExt::FlushCacheGlobal), Ok(()));
    assert_eq!(ext(&mut dom0, MmuExt::FlushCacheGlobal), Ok(()));
    assert_eq!(
        dom0.cache_flushes(),
        CacheFlushes {
            local: 1,
            global: 2
        }
    );
    assert_eq!(dom0.tlb_flushes(), 0, "a cache flush is no TLB flush");
    dom0.reset_stats();
    assert_eq!(dom0.cache_flushes(), CacheFlushes::default());
}

#[test]
fn l1_entries_for_frames_the_guest_does_not_own() {
    let mut domu = with_l1(DomainKind::Unprivileged);
    for m in [XEN_MFN_BASE, OTHER_MFN_BASE, GUEST_MFN_BASE + 256] {
        assert_eq!(
            set!(domu, 10, 0, (m << 12) | P),
            Err(XenError::Busy),
            "{m:#x}"
        );
    }
    // MMIO (beyond RAM, or the first MiB): EPERM, except INVALID_MFN.
    assert_eq!(
        set!(domu, 10, 0, (0x800_0000 << 12) | P),
        Err(XenError::Perm)
    );
    assert_eq!(set!(domu, 10, 0, (0x10 << 12) | P), Err(XenError::Perm));
    assert_eq!(set!(domu, 10, 0, ENTRY_MFN_MASK | P), Err(XenError::Inval));
    // dom0 may map MMIO; Xen makes a write-back mapping uncached.
    let mut dom0 = with_l1(DomainKind::Hardware);
    set!(dom0, 10, 0, (0x800_0000 << 12) | P | RW).unwrap();
    assert_eq!(
        peek(&dom0, 10, 0),
        (0x800_0000 << 12) | P | RW | PAGE_PWT | PAGE_PCD | KERNEL_BITS
    );
    assert_eq!(
        set!(dom0, 10, 1, (XEN_MFN_BASE << 12) | P),
        Err(XenError::Busy)
    );
}

#[test]
fn writable_mapping_of_a_table_is_refused() {
    let mut m = with_l1(DomainKind::Unprivileged);
    for (pfn, level) in [
        (11, PinLevel::L1),
        (12, PinLevel::L2),
        (13, PinLevel::L3),
        (14, PinLevel::L4),
    ] {
        pin(&mut m, pfn, level).unwrap();
        assert_eq!(set!(m, 10, 0, pte(&m, pfn, P | RW)), Err(XenError::Busy));
        assert_eq!(set!(m, 10, 0, pte(&m, pfn, P)), Ok(()), "read-only is fine");
        set!(m, 10, 0, 0).unwrap();
    }
    // The L1 itself, through itself.
    assert_eq!(set!(m, 10, 5, pte(&m, 10, P | RW)), Err(XenError::Busy));
    assert_eq!(peek(&m, 10, 5), 0, "refused entry left as it was");
}

#[test]
fn a_frame_mapped_writable_cannot_become_a_table() {
    let mut m = with_l1(DomainKind::Unprivileged);
    set!(m, 10, 0, pte(&m, 30, P | RW)).unwrap();
    for level in [PinLevel::L1, PinLevel::L2, PinLevel::L3, PinLevel::L4] {
        assert_eq!(pin(&mut m, 30, level), Err(XenError::Inval));
    }
    let root = mfn(&m, 30);
    assert_eq!(
        ext(&mut m, MmuExt::NewBaseptr { mfn: root }),
        Err(XenError::Inval)
    );
    assert_eq!(ty(&m, 30), (PageType::Writable, 1));
    set!(m, 10, 0, 0).unwrap();
    assert_eq!(pin(&mut m, 30, PinLevel::L1), Ok(()));
}

#[test]
fn pin_validates_the_whole_tree_and_unpin_tears_it_down() {
    let mut m = XenModel::new(256);
    // L4 40 -> L3 41 -> L2 42 -> L1 43 -> data 50 (rw), 51 (ro).
    poke(&m, 43, 0, pte(&m, 50, P | RW));
    poke(&m, 43, 1, pte(&m, 51, P));
    poke(&m, 42, 0, pte(&m, 43, P | RW));
    poke(&m, 41, 0, pte(&m, 42, P | RW));
    poke(&m, 40, 0, pte(&m, 41, P | RW));
    poke(&m, 40, 300, pte(&m, 41, P | RW));
    pin(&mut m, 40, PinLevel::L4).unwrap();
    assert_eq!(ty(&m, 40), (PageType::L4, 1));
    assert_eq!(ty(&m, 41), (PageType::L3, 2), "two L4 entries");
    assert_eq!(ty(&m, 42), (PageType::L2, 1));
    assert_eq!(ty(&m, 43), (PageType::L1, 1));
    assert_eq!(ty(&m, 50), (PageType::Writable, 1));
    assert_eq!(ty(&m, 51), (PageType::None, 0));
    assert_eq!(m.live_tables(), 4);
    // Entries were adjusted in place: USER everywhere, ACCESSED on L4.
    assert_eq!(peek(&m, 42, 0), pte(&m, 43, P | RW | PAGE_USER));
    assert_eq!(
        peek(&m, 40, 0),
        pte(&m, 41, P | RW | PAGE_USER | PAGE_ACCESSED)
    );
    assert_eq!(peek(&m, 43, 0), pte(&m, 50, P | RW | KERNEL_BITS));
    // Xen filled its own slots.
    assert_eq!(peek(&m, 40, 258) & ENTRY_MFN_MASK, mfn(&m, 40) << 12);
    assert!(m.is_pinned(Mfn(mfn(&m, 40))));
    assert_eq!(m.check_integrity(), Ok(()));
    unpin(&mut m, 40).unwrap();
    for pfn in [40, 41, 42, 43, 50] {
        assert_eq!(ty(&m, pfn), (PageType::None, 0), "pfn {pfn}");
    }
    assert_eq!(m.live_tables(), 0);
}

#[test]
fn failed_validation_leaves_nothing_behind() {
    let mut m = XenModel::new(256);
    // L2 60 -> L1 61 (fine, maps 70 rw) and -> L1 62, which maps 60 rw.
    poke(&m, 61, 0, pte(&m, 70, P | RW));
    poke(&m, 62, 0, pte(&m, 60, P | RW));
    poke(&m, 60, 0, pte(&m, 61, P | RW));
    poke(&m, 60, 1, pte(&m, 62, P | RW));
    assert_eq!(pin(&mut m, 60, PinLevel::L2), Err(XenError::Busy));
    for pfn in [60, 61, 62, 70] {
        assert_eq!(ty(&m, pfn), (PageType::None, 0), "pfn {pfn}");
    }
    assert_eq!(m.live_tables(), 0);
    // An L1 with a bad flag fails with EINVAL, and so does its L2.
    let mut m = XenModel::new(256);
    poke(&m, 81, 7, pte(&m, 70, P | PAGE_PCD));
    poke(&m, 80, 0, pte(&m, 81, P));
    assert_eq!(pin(&mut m, 80, PinLevel::L2), Err(XenError::Inval));
    assert_eq!(pin(&mut m, 81, PinLevel::L1), Err(XenError::Inval));
    assert_eq!(m.live_tables(), 0);
}

#[test]
fn a_table_behind_one_that_fails_at_entry_0_stays_half_validated() {
    // L4 10 -> (entry 2) L3 11 -> (entry 0) L2 12 -> (entry 0) L1 13, fine,
    // and (entry 1) L1 14, which has a cache attribute an unprivileged L1
    // may not: 12 fails at entry 1 and becomes the hypercall's
    // old_guest_table, 11 fails at entry 0, 10 fails at entry 2 and
    // replaces 12 as old_guest_table. 12 is left half-validated (what the
    // oracle found under Xen 4.17 and 4.20; see docs/xen-pv-rules.md).
    let mut m = XenModel::new(256);
    poke(&m, 13, 0, pte(&m, 70, P));
    poke(&m, 14, 0, pte(&m, 71, P | PAGE_PCD));
    poke(&m, 12, 0, pte(&m, 13, P | RW));
    poke(&m, 12, 1, pte(&m, 14, P | RW));
    poke(&m, 11, 0, pte(&m, 12, P | RW));
    poke(&m, 10, 2, pte(&m, 11, P | RW));
    assert_eq!(pin(&mut m, 10, PinLevel::L4), Err(XenError::Inval));
    let stuck = Mfn(mfn(&m, 12));
    assert_eq!(m.stuck_tables().collect::<Vec<_>>(), [stuck]);
    assert_eq!(ty(&m, 12), (PageType::L2, 1));
    // Its entry 0 still holds the L1 it validated.
    assert_eq!(ty(&m, 13), (PageType::L1, 1));
    for pfn in [10, 11, 14] {
        assert_eq!(ty(&m, pfn), (PageType::None, 0), "pfn {pfn}");
    }
    // Every write and every other type is refused...
    assert_eq!(set!(m, 12, 3, 0), Err(XenError::Inval));
    assert_eq!(pin(&mut m, 12, PinLevel::L1), Err(XenError::Inval));
    assert_eq!(pin(&mut m, 20, PinLevel::L1), Ok(()));
    assert_eq!(set!(m, 20, 0, pte(&m, 12, P | RW)), Err(XenError::Busy));
    // ...until its own type is asked for: the validation resumes at entry
    // 1 and fails there again; this time the clean-up happens.
    assert_eq!(pin(&mut m, 12, PinLevel::L2), Err(XenError::Inval));
    assert_eq!(m.stuck_tables().count(), 0);
    for pfn in [12, 13] {
        assert_eq!(ty(&m, pfn), (PageType::None, 0), "pfn {pfn}");
    }
    assert_eq!(set!(m, 12, 3, 0), Ok(()));
    // Stuck again, then 14 fixed: the resumed validation completes and the
    // pin holds the one reference the stuck table had.
    assert_eq!(pin(&mut m, 10, PinLevel::L4), Err(XenError::Inval));
    assert_eq!(m.stuck_tables().count(), 1);
    assert_eq!(set!(m, 14, 0, 0), Ok(()));
    assert_eq!(pin(&mut m, 12, PinLevel::L2), Ok(()));
    assert_eq!(m.stuck_tables().count(), 0);
    assert_eq!(ty(&m, 12), (PageType::L2, 1));
    assert_eq!(
        (ty(&m, 13), ty(&m, 14)),
        ((PageType::L1, 1), (PageType::L1, 1))
    );
    assert_eq!(unpin(&mut m, 12), Ok(()));
    for pfn in [12, 13, 14] {
        assert_eq!(ty(&m, pfn), (PageType::None, 0), "pfn {pfn}");
    }
    assert_eq!(m.check_integrity(), Ok(()));
}

#[test]
fn hook_and_unhook_move_type_counts() {
    let mut m = XenModel::new(256);
    pin(&mut m, 10, PinLevel::L2).unwrap();
    poke(&m, 11, 0, pte(&m, 20, P | RW));
    set!(m, 10, 0, pte(&m, 11, P | RW)).unwrap();
    assert_eq!(ty(&m, 11), (PageType::L1, 1));
    assert_eq!(ty(&m, 20), (PageType::Writable, 1));
    // Hooking the same L1 twice takes a second reference.
    set!(m, 10, 1, pte(&m, 11, P | RW)).unwrap();
    assert_eq!(ty(&m, 11), (PageType::L1, 2));
    set!(m, 10, 1, 0).unwrap();
    assert_eq!(ty(&m, 11), (PageType::L1, 1));
    // Unhooking the last reference demotes the L1 and frees its mappings.
    set!(m, 10, 0, 0).unwrap();
    assert_eq!(ty(&m, 11), (PageType::None, 0));
    assert_eq!(ty(&m, 20), (PageType::None, 0));
    // A pinned L1 survives unhooking.
    pin(&mut m, 11, PinLevel::L1).unwrap();
    set!(m, 10, 0, pte(&m, 11, P | RW)).unwrap();
    assert_eq!(ty(&m, 11), (PageType::L1, 2));
    set!(m, 10, 0, 0).unwrap();
    assert_eq!(ty(&m, 11), (PageType::L1, 1));
    assert_eq!(ty(&m, 20), (PageType::Writable, 1));
}

#[test]
fn hooking_checks_the_lower_table() {
    let mut m = with_l1(DomainKind::Unprivileged);
    pin(&mut m, 12, PinLevel::L2).unwrap();
    // An L1 that maps itself writable: EBUSY.
    poke(&m, 13, 0, pte(&m, 13, P | RW));
    assert_eq!(set!(m, 12, 0, pte(&m, 13, P | RW)), Err(XenError::Busy));
    // ... read-only is fine.
    poke(&m, 13, 0, pte(&m, 13, P));
    assert_eq!(set!(m, 12, 0, pte(&m, 13, P | RW)), Ok(()));
    set!(m, 12, 0, 0).unwrap();
    // An L1 mapped writable somewhere: EINVAL.
    set!(m, 10, 0, pte(&m, 14, P | RW)).unwrap();
    assert_eq!(set!(m, 12, 0, pte(&m, 14, P | RW)), Err(XenError::Inval));
    // A table of the wrong level: EINVAL.
    pin(&mut m, 15, PinLevel::L3).unwrap();
    assert_eq!(set!(m, 12, 1, pte(&m, 15, P | RW)), Err(XenError::Inval));
    // A frame the guest does not own: EINVAL (not EBUSY as in an L1).
    assert_eq!(
        set!(m, 12, 1, (OTHER_MFN_BASE << 12) | P),
        Err(XenError::Inval)
    );
    assert_eq!(
        set!(m, 12, 1, (XEN_MFN_BASE << 12) | P),
        Err(XenError::Inval)
    );
}

#[test]
fn upper_level_flags() {
    let mut m = XenModel::new(256);
    pin(&mut m, 10, PinLevel::L2).unwrap();
    pin(&mut m, 11, PinLevel::L3).unwrap();
    pin(&mut m, 12, PinLevel::L4).unwrap();
    for (table, level_pfn) in [(10, 20), (11, 21), (12, 22)] {
        for bit in [PAGE_PWT, PAGE_PCD, PAGE_PSE, PAGE_GLOBAL] {
            let v = pte(&m, level_pfn, P | RW | bit);
            assert_eq!(
                set!(m, table, 0, v),
                Err(XenError::Inval),
                "{table} {bit:#x}"
            );
        }
        // NX and the available bits are allowed.
        let v = pte(&m, level_pfn, P | RW | PAGE_NX | 0xe00);
        assert_eq!(set!(m, table, 0, v), Ok(()), "{table}");
    }
    // Non-present entries are not checked at all.
    assert_eq!(set!(m, 10, 5, 0xffff_ffff_ffff_fffe), Ok(()));
}

#[test]
fn l4_rules() {
    let mut m = XenModel::new(256);
    pin(&mut m, 10, PinLevel::L4).unwrap();
    // Xen's slots, whatever the value.
    for slot in [256, 263, 271] {
        assert_eq!(set!(m, 10, slot, 0), Err(XenError::Inval));
    }
    assert_eq!(set!(m, 10, 255, 0), Ok(()));
    assert_eq!(set!(m, 10, 272, 0), Ok(()));
    // Self-map: read-only only, and it takes no reference.
    assert_eq!(set!(m, 10, 1, pte(&m, 10, P | RW)), Err(XenError::Inval));
    assert_eq!(set!(m, 10, 1, pte(&m, 10, P)), Ok(()));
    assert_eq!(ty(&m, 10), (PageType::L4, 1));
    assert_eq!(peek(&m, 10, 1), pte(&m, 10, P | PAGE_ACCESSED | PAGE_USER));
    // Another validated L4, read-only: a linear reference.
    pin(&mut m, 11, PinLevel::L4).unwrap();
    set!(m, 10, 2, pte(&m, 11, P)).unwrap();
    assert_eq!(ty(&m, 11), (PageType::L4, 2));
    assert_eq!(m.linear_count(Mfn(mfn(&m, 10))), 1);
    assert_eq!(m.linear_count(Mfn(mfn(&m, 11))), -1);
    // 11 is used as a linear table: it may not hold linear entries itself,
    // and 10 (which holds one) may not be used as one.
    pin(&mut m, 12, PinLevel::L4).unwrap();
    assert_eq!(set!(m, 11, 0, pte(&m, 12, P)), Err(XenError::Inval));
    assert_eq!(set!(m, 12, 0, pte(&m, 10, P)), Err(XenError::Inval));
    // An unvalidated frame cannot be a linear target.
    assert_eq!(set!(m, 10, 3, pte(&m, 13, P)), Ok(()), "13 becomes an L3");
    assert_eq!(ty(&m, 13), (PageType::L3, 1));
    set!(m, 10, 2, 0).unwrap();
    assert_eq!(ty(&m, 11), (PageType::L4, 1));
    assert_eq!(m.linear_count(Mfn(mfn(&m, 10))), 0);
    assert_eq!(m.linear_count(Mfn(mfn(&m, 11))), 0);
}

#[test]
fn pin_and_unpin_errors() {
    let mut m = XenModel::new(256);
    pin(&mut m, 10, PinLevel::L1).unwrap();
    assert_eq!(pin(&mut m, 10, PinLevel::L1), Err(XenError::Inval));
    assert_eq!(ty(&m, 10), (PageType::L1, 1), "no reference leaked");
    assert_eq!(pin(&mut m, 10, PinLevel::L2), Err(XenError::Inval));
    assert_eq!(unpin(&mut m, 11), Err(XenError::Inval));
    for foreign in [XEN_MFN_BASE, OTHER_MFN_BASE, 5, 0x800_0000] {
        assert_eq!(
            ext(
                &mut m,
                MmuExt::Pin {
                    level: PinLevel::L1,
                    mfn: foreign
                }
            ),
            Err(XenError::Inval)
        );
        assert_eq!(
            ext(&mut m, MmuExt::Unpin { mfn: foreign }),
            Err(XenError::Inval)
        );
    }
    unpin(&mut m, 10).unwrap();
    assert_eq!(unpin(&mut m, 10), Err(XenError::Inval));
    assert_eq!(ty(&m, 10), (PageType::None, 0));
}

#[test]
fn new_baseptr_semantics() {
    let mut m = XenModel::new(1024);
    let sod = m.start_of_day(0xffff_ffff_8000_0000, 8).unwrap();
    let root = sod.root_mfn.0;
    // The same root: nothing changes.
    assert_eq!(ext(&mut m, MmuExt::NewBaseptr { mfn: root }), Ok(()));
    assert_eq!(m.type_count(Mfn(root)), 2);
    // A fresh zero frame is validated as an L4 on the spot.
    let fresh = mfn(&m, 100);
    assert_eq!(ext(&mut m, MmuExt::NewBaseptr { mfn: fresh }), Ok(()));
    assert_eq!(m.current_root(), Some(Mfn(fresh)));
    assert_eq!(
        (m.page_type(Mfn(fresh)), m.type_count(Mfn(fresh))),
        (PageType::L4, 1)
    );
    assert!(!m.is_pinned(Mfn(fresh)));
    assert_eq!(m.type_count(Mfn(root)), 1, "old root keeps its pin");
    assert_eq!(m.read_entry(Mfn(fresh), 256), Some(m.ro_mpt_entry()));
    // Back again: the fresh L4 loses its only reference.
    ext(&mut m, MmuExt::NewBaseptr { mfn: root }).unwrap();
    assert_eq!(m.page_type(Mfn(fresh)), PageType::None);
    // Not an L4, not ours.
    pin(&mut m, 101, PinLevel::L1).unwrap();
    let l1 = mfn(&m, 101);
    assert_eq!(
        ext(&mut m, MmuExt::NewBaseptr { mfn: l1 }),
        Err(XenError::Inval)
    );
    assert_eq!(
        ext(&mut m, MmuExt::NewBaseptr { mfn: XEN_MFN_BASE }),
        Err(XenError::Inval)
    );
    // A frame whose validation fails gives the validation's error.
    poke(&m, 102, 0, pte(&m, 102, P | RW | PAGE_PCD));
    let bad = mfn(&m, 102);
    assert_eq!(
        ext(&mut m, MmuExt::NewBaseptr { mfn: bad }),
        Err(XenError::Inval)
    );
    assert_eq!(m.current_root(), Some(Mfn(root)));
    // Unpinning the live root is allowed: CR3 holds its own reference.
    assert_eq!(ext(&mut m, MmuExt::Unpin { mfn: root }), Ok(()));
    assert_eq!(
        (m.page_type(Mfn(root)), m.type_count(Mfn(root))),
        (PageType::L4, 1)
    );
    assert_eq!(
        ext(
            &mut m,
            MmuExt::Pin {
                level: PinLevel::L4,
                mfn: root
            }
        ),
        Ok(())
    );
    // User root: 0 clears it.
    assert_eq!(ext(&mut m, MmuExt::NewUserBaseptr { mfn: fresh }), Ok(()));
    assert_eq!(m.current_user_root(), Some(Mfn(fresh)));
    assert_eq!(ext(&mut m, MmuExt::NewUserBaseptr { mfn: 0 }), Ok(()));
    assert_eq!(m.page_type(Mfn(fresh)), PageType::None);
}

#[test]
fn mmu_update_commands() {
    let mut m = with_l1(DomainKind::Unprivileged);
    // A plain frame: a checked write, no validation.
    assert_eq!(set!(m, 30, 4, 0x1234), Ok(()));
    assert_eq!(peek(&m, 30, 4), 0x1234);
    assert_eq!(ty(&m, 30), (PageType::None, 0));
    // A frame we do not own.
    let r = mmu_update {
        ptr: OTHER_MFN_BASE << 12,
        val: 0,
    };
    assert_eq!(
        m.mmu_update(&[r]),
        Err(BatchError {
            done: 0,
            error: XenError::Inval
        })
    );
    // Commands 4..7 do not exist; 3 (NO_TRANSLATE) is a normal update.
    for cmd in 4..8 {
        let r = mmu_update {
            ptr: (mfn(&m, 10) << 12) | cmd,
            val: 0,
        };
        assert_eq!(
            m.mmu_update(&[r]).map_err(|e| e.error),
            Err(XenError::NoSys)
        );
    }
    let r = mmu_update {
        ptr: (mfn(&m, 10) << 12) | 3,
        val: pte(&m, 20, P | RW),
    };
    assert_eq!(m.mmu_update(&[r]), Ok(()));
    assert_eq!(ty(&m, 20), (PageType::Writable, 1));
    // PRESERVE_AD keeps accessed/dirty from the old entry.
    set!(m, 10, 1, pte(&m, 21, P | PAGE_ACCESSED | PAGE_DIRTY)).unwrap();
    let r = mmu_update {
        ptr: ((mfn(&m, 10) << 12) + 8) | 2,
        val: pte(&m, 21, P),
    };
    m.mmu_update(&[r]).unwrap();
    assert_eq!(
        peek(&m, 10, 1) & (PAGE_ACCESSED | PAGE_DIRTY),
        PAGE_ACCESSED | PAGE_DIRTY
    );
    // MACHPHYS updates the M2P of our own frames only.
    let x = mfn(&m, 40);
    let r = mmu_update {
        ptr: (x << 12) | 1,
        val: 77,
    };
    m.mmu_update(&[r]).unwrap();
    assert_eq!(m.to_pfn(Mfn(x)), Some(Pfn(77)));
    let r = mmu_update {
        ptr: (XEN_MFN_BASE << 12) | 1,
        val: 77,
    };
    assert_eq!(
        m.mmu_update(&[r]).map_err(|e| e.error),
        Err(XenError::Inval)
    );
}

#[test]
fn a_batch_stops_at_the_first_refusal() {
    let mut m = with_l1(DomainKind::Unprivileged);
    pin(&mut m, 11, PinLevel::L1).unwrap();
    let reqs = [
        req(&m, 10, 0, pte(&m, 20, P | RW)),
        req(&m, 10, 1, pte(&m, 11, P | RW)),
        req(&m, 10, 2, pte(&m, 21, P | RW)),
    ];
    assert_eq!(
        m.mmu_update(&reqs),
        Err(BatchError {
            done: 1,
            error: XenError::Busy
        })
    );
    assert_ne!(peek(&m, 10, 0), 0);
    assert_eq!(peek(&m, 10, 1), 0);
    assert_eq!(peek(&m, 10, 2), 0, "not attempted");
    assert_eq!(ty(&m, 21), (PageType::None, 0));
    let ops = [
        MmuExt::Unpin { mfn: mfn(&m, 11) }.encode(),
        MmuExt::Unpin { mfn: mfn(&m, 11) }.encode(),
        MmuExt::TlbFlushLocal.encode(),
    ];
    assert_eq!(
        m.mmuext_op(&ops),
        Err(BatchError {
            done: 1,
            error: XenError::Inval
        })
    );
    let s = m.stats();
    assert_eq!(s.mmu_update_entries, 3);
    assert_eq!(s.mmuext_ops, 2 + 3, "two pins, then the batch of three");
}

#[test]
fn multicall_runs_in_order_and_failures_do_not_stop_it() {
    let mut m = with_l1(DomainKind::Unprivileged);
    let t = mfn(&m, 11);
    let pin_t = [MmuExt::Pin {
        level: PinLevel::L1,
        mfn: t,
    }
    .encode()];
    let unpin_t = [MmuExt::Unpin { mfn: t }.encode()];
    let map_t = [req(&m, 10, 0, pte(&m, 11, P | RW))];
    let calls = [
        Call::MmuExtOp(&pin_t),
        Call::MmuUpdate(&map_t),
        Call::MmuExtOp(&unpin_t),
        Call::MmuUpdate(&map_t),
        Call::MmuExtOp(&pin_t),
    ];
    let mut results = [Ok(99); 5];
    m.reset_stats();
    assert_eq!(m.multicall(&calls, &mut results), Ok(()));
    assert_eq!(
        results,
        [
            Ok(0),
            Err(XenError::Busy),
            Ok(0),
            Ok(0),
            Err(XenError::Inval)
        ]
    );
    assert_eq!(ty(&m, 11), (PageType::Writable, 1));
    let s = m.stats();
    assert_eq!((s.hypercalls, s.multicalls), (1, 1));
    assert_eq!((s.mmu_update_entries, s.mmuext_ops), (2, 3));
    // Limits and the empty list.
    let many = [Call::MmuUpdate(&map_t); 33];
    let mut r33 = [Ok(0); 33];
    assert_eq!(m.multicall(&many, &mut r33), Err(XenError::TooBig));
    assert_eq!(
        m.multicall(&calls, &mut results[..2]),
        Err(XenError::TooBig)
    );
    assert_eq!(m.multicall(&[], &mut []), Ok(()));
    assert_eq!(m.stats().hypercalls, 1);
}

#[test]
fn update_va_mapping_walks_the_current_root() {
    let mut m = XenModel::new(1024);
    let virt = 0xffff_ffff_8000_0000;
    m.start_of_day(virt, 8).unwrap();
    m.reset_stats();
    // Remap the page at virt + 1 page to frame 200, writable.
    let v = pte(&m, 200, P | RW);
    assert_eq!(m.update_va_mapping(virt + 4096, v, 2), Ok(()));
    assert_eq!(ty(&m, 200), (PageType::Writable, 1));
    assert_eq!(ty(&m, 1), (PageType::None, 0), "old frame released");
    assert_eq!(m.tlb_flushes(), 1);
    // A table frame (pfn 8 is the L4) cannot be mapped writable.
    let v = pte(&m, 8, P | RW);
    assert_eq!(m.update_va_mapping(virt + 4096, v, 0), Err(XenError::Busy));
    // Unmapped, Xen hole, non-canonical.
    for va in [
        0x1000,
        0xffff_8000_0000_1000,
        0x0000_8000_0000_0000,
        0xffff_8800_0000_0000,
    ] {
        assert_eq!(
            m.update_va_mapping(va, 0, 0),
            Err(XenError::Inval),
            "{va:#x}"
        );
    }
    // Beyond the last L1 entry in the same L2: still the same L1, fine;
    // beyond the L2's present entries: EINVAL.
    assert_eq!(m.update_va_mapping(virt + 100 * 4096, 0, 0), Ok(()));
    assert_eq!(
        m.update_va_mapping(virt + (2 << 20), 0, 0),
        Err(XenError::Inval)
    );
    // A vCPU-mask pointer in the flags: the entry changes, then EFAULT.
    let v = pte(&m, 201, P);
    assert_eq!(
        m.update_va_mapping(virt + 2 * 4096, v, 1 | 0x1000),
        Err(XenError::Fault)
    );
    let s = m.stats();
    assert_eq!((s.hypercalls, s.update_va_mappings), (9, 9));
    m.reset_stats();
    assert_eq!(m.stats(), HypercallStats::default());
    assert_eq!(m.tlb_flushes(), 0);
}

#[test]
fn mmuext_other_commands() {
    let mut domu = XenModel::new(64);
    let mut dom0 = XenModel::new_hardware_domain(64);
    let mut op: mmuext_op = MmuExt::TlbFlushAll.encode();
    for (cmd, want_u, want_0) in [
        (12, Err(XenError::Acces), Ok(())),
        (19, Err(XenError::OpNotSupp), Err(XenError::OpNotSupp)),
        (20, Err(XenError::OpNotSupp), Err(XenError::OpNotSupp)),
        (99, Err(XenError::NoSys), Err(XenError::NoSys)),
    ] {
        op.cmd = cmd;
        assert_eq!(domu.mmuext_op(&[op]).map_err(|e| e.error), want_u, "{cmd}");
        assert_eq!(dom0.mmuext_op(&[op]).map_err(|e| e.error), want_0, "{cmd}");
    }
    for flush in [
        MmuExt::TlbFlushLocal,
        MmuExt::TlbFlushAll,
        MmuExt::InvlpgLocal { va: 0x1000 },
        MmuExt::InvlpgAll {
            va: 0xffff_8000_0000_0000,
        },
    ] {
        assert_eq!(ext(&mut domu, flush), Ok(()));
    }
    assert_eq!(domu.tlb_flushes(), 4);
    assert_eq!(domu.mmuext_op(&[]), Ok(()));
    assert_eq!(domu.mmu_update(&[]), Ok(()));
    assert_eq!(domu.stats().hypercalls, 8, "empty batches issue nothing");
}

#[test]
fn integrity_catches_direct_stores_into_live_tables() {
    let mut m = with_l1(DomainKind::Unprivileged);
    set!(m, 10, 0, pte(&m, 20, P | RW)).unwrap();
    // Stores into ordinary frames are fine.
    poke(&m, 20, 0, 42);
    assert_eq!(m.check_integrity(), Ok(()));
    // A store into the live L1 is caught, with the entry.
    poke(&m, 10, 9, pte(&m, 11, P | RW));
    let v = m.check_integrity().unwrap_err();
    assert_eq!(v.mfn, Mfn(mfn(&m, 10)));
    assert_eq!(v.pfn, Some(Pfn(10)));
    assert_eq!(v.page_type, PageType::L1);
    assert_eq!((v.index, v.expected), (9, 0));
    let mut all = Vec::new();
    assert_eq!(m.integrity_violations(|v| all.push(v)), 1);
    // The model keeps counting from what it validated: tearing down drops
    // the reference of entry 0 and ignores the forged entry 9.
    unpin(&mut m, 10).unwrap();
    assert_eq!(ty(&m, 20), (PageType::None, 0));
    assert_eq!(ty(&m, 11), (PageType::None, 0));
    assert_eq!(m.check_integrity(), Ok(()), "no longer a table");
}

#[test]
fn frame_map_and_owner_queries() {
    let m = XenModel::new(100);
    assert_eq!(m.owner(Mfn(0)), Owner::Io);
    assert_eq!(m.owner(m.xen_mfn()), Owner::Xen);
    assert_eq!(m.owner(m.foreign_mfn()), Owner::OtherDomain);
    assert_eq!(m.owner(Mfn(GUEST_MFN_BASE + 99)), Owner::Guest);
    assert_eq!(m.owner(Mfn(GUEST_MFN_BASE + 100)), Owner::Free);
    assert_eq!(m.owner(Mfn(1 << 30)), Owner::NotRam);
    assert_eq!(m.read_entry(m.xen_mfn(), 0), None);
    assert!(is_guest_l4_slot(255) && !is_guest_l4_slot(256) && !is_guest_l4_slot(271));
    assert!(is_guest_l4_slot(272) && !is_guest_l4_slot(512));
}

#[test]
fn each_vcpu_keeps_its_translations_until_a_flush_covers_it() {
    let mut m = XenModel::new(1024);
    let virt = 0xffff_ffff_8000_0000;
    m.start_of_day(virt, 8).unwrap();
    m.set_vcpus(3);
    let va = virt + 4096;
    let old = m.live_leaf(va).unwrap();
    let mask: &'static crate::cpus::ActiveCpus =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(crate::cpus::ActiveCpus::new()));
    let fill = |m: &mut XenModel, want: u64| {
        for v in 0..3 {
            assert_eq!(m.vcpu_translate(v, va + 12), Some(want));
        }
    };
    let cached = |m: &XenModel| [0, 1, 2].map(|v| m.vcpu_cached(v, va).is_some());
    fill(&mut m, old);
    // Unmapped with no flush: every vCPU still translates the old entry,
    // while a walk finds nothing.
    m.update_va_mapping(va, 0, 0).unwrap();
    assert_eq!(m.live_leaf(va), None);
    assert_eq!(m.vcpu_translate(1, va), Some(old), "stale until flushed");
    // A local invlpg reaches the issuing vCPU only.
    m.set_current_vcpu(1);
    assert_eq!(ext(&mut m, MmuExt::InvlpgLocal { va }), Ok(()));
    assert_eq!(cached(&m), [true, false, true]);
    assert_eq!(m.vcpu_translate(1, va), None, "re-walked: not mapped");
    // A mask the model was not given: EFAULT, nothing flushed.
    let unknown = 0b111u64;
    assert_eq!(
        ext(&mut m, MmuExt::TlbFlushMulti { mask: &unknown }),
        Err(XenError::Fault)
    );
    assert_eq!(cached(&m), [true, false, true]);
    // INVLPG_MULTI: the vCPUs of the mask, read when the op runs.
    m.accept_vcpu_mask(mask);
    mask.activate(2);
    let multi = MmuExt::InvlpgMulti {
        va,
        mask: mask.as_ptr(),
    };
    assert_eq!(ext(&mut m, multi), Ok(()));
    assert_eq!(cached(&m), [true, false, false]);
    // Another page's invlpg leaves this one.
    assert_eq!(ext(&mut m, MmuExt::InvlpgAll { va: va + 4096 }), Ok(()));
    assert_eq!(cached(&m), [true, false, false]);
    assert_eq!(ext(&mut m, MmuExt::InvlpgAll { va }), Ok(()));
    assert_eq!(cached(&m), [false; 3]);
    // Full flushes: local, multi, all; NEW_BASEPTR flushes the issuer.
    let v = pte(&m, 200, P);
    m.update_va_mapping(va, v, 0).unwrap();
    let new = m.live_leaf(va).unwrap();
    fill(&mut m, new);
    m.set_current_vcpu(0);
    assert_eq!(ext(&mut m, MmuExt::TlbFlushLocal), Ok(()));
    assert_eq!(cached(&m), [false, true, true]);
    mask.deactivate(2);
    mask.activate(1);
    let multi = MmuExt::TlbFlushMulti {
        mask: mask.as_ptr(),
    };
    assert_eq!(ext(&mut m, multi), Ok(()));
    assert_eq!(cached(&m), [false, false, true]);
    fill(&mut m, new);
    m.set_current_vcpu(2);
    let root = m.current_root().unwrap().0;
    assert_eq!(ext(&mut m, MmuExt::NewBaseptr { mfn: root }), Ok(()));
    assert_eq!(cached(&m), [true, true, false]);
    assert_eq!(ext(&mut m, MmuExt::TlbFlushAll), Ok(()));
    assert_eq!(cached(&m), [false; 3]);
    // update_va_mapping's flags: UVMF_INVLPG | UVMF_ALL, and local.
    fill(&mut m, new);
    m.update_va_mapping(va, 0, 2 | 4).unwrap();
    assert_eq!(cached(&m), [false; 3]);
    m.update_va_mapping(va, v, 0).unwrap();
    fill(&mut m, new);
    m.set_current_vcpu(1);
    m.update_va_mapping(va, 0, 1).unwrap();
    assert_eq!(cached(&m), [true, false, true]);
}
