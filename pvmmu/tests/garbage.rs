//! Garbage input: non-canonical and hole addresses, huge and wrapping sizes,
//! misalignment, bad frames and flag combinations must come back as errors
//! (the exact variant where it is defined), never as a panic, and a failed
//! call must leave the tree exactly as it was. Also: the x86_64 `Mapper` /
//! `Translate` traits on the address space, and refusals by Xen.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use pvmmu::backend::{Backend, LargePages};
use pvmmu::entry::{FlagError, Flags};
use pvmmu::{AddressSpace, Error, Granule, Pfn};

const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);
const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);

fn native() -> AddressSpace<NativeBackend, Pool> {
    let backend = pvmmu::Native::new(Arena::new(2048)).with_large_pages(LargePages::Size1GiB);
    AddressSpace::new(backend, Pool::new(1024, 1024))
        .map_err(|e| e.0)
        .expect("space")
}

fn pv(model: &Shared) -> AddressSpace<PvBackend, Pool> {
    AddressSpace::new(pv_backend(model, 32), Pool::new(1024, 1024))
        .map_err(|e| e.0)
        .expect("space")
}

/// Fixed garbage with the error each must get, on one backend.
fn fixed_cases<B: Backend>(s: &mut AddressSpace<B, Pool>, pv: bool) {
    let base = 0x0000_4000_0000_0000u64;
    s.map(base, Pfn(1), 4 * 4096, RO)
        .expect("seed mapping")
        .ignore();
    let before = leaves(s.backend(), s.root());
    let cases: Vec<(&str, Result<(), Error>, Error)> = vec![
        (
            "non-canonical",
            s.map(0x0000_8000_0000_0000, Pfn(1), 4096, RO)
                .map(|f| f.ignore()),
            Error::NonCanonical {
                va: 0x0000_8000_0000_0000,
            },
        ),
        (
            "crosses the canonical hole",
            s.map(0x0000_7fff_ffff_f000, Pfn(1), 2 * 4096, RO)
                .map(|f| f.ignore()),
            Error::NonCanonical {
                va: 0x0000_8000_0000_0fff,
            },
        ),
        (
            "wraps",
            s.map(0xffff_ffff_ffff_f000, Pfn(1), 2 * 4096, RO)
                .map(|f| f.ignore()),
            Error::RangeOverflow,
        ),
        (
            "huge size",
            s.map(base, Pfn(1), !0xfffu64, RO).map(|f| f.ignore()),
            Error::RangeOverflow,
        ),
        (
            "unaligned va",
            s.map(base + 1, Pfn(1), 4096, RO).map(|f| f.ignore()),
            Error::Misaligned,
        ),
        (
            "unaligned len",
            s.map(base, Pfn(1), 100, RO).map(|f| f.ignore()),
            Error::Misaligned,
        ),
        (
            "frame overflow",
            s.map(base + 0x10_0000, Pfn(u64::MAX), 4096, RO)
                .map(|f| f.ignore()),
            Error::RangeOverflow,
        ),
        (
            "frame range overflow",
            s.map(base + 0x10_0000, Pfn(u64::MAX / 4096), 2 * 4096, RO)
                .map(|f| f.ignore()),
            Error::RangeOverflow,
        ),
        (
            "no PRESENT",
            s.map(base + 0x10_0000, Pfn(1), 4096, Flags::NO_EXECUTE)
                .map(|f| f.ignore()),
            Error::Flags(FlagError::NotPresent),
        ),
        (
            "caller PS",
            s.map(base + 0x10_0000, Pfn(1), 4096, RO | Flags::HUGE_PAGE)
                .map(|f| f.ignore()),
            Error::Flags(FlagError::LargePage),
        ),
        (
            "W+X",
            s.map(
                base + 0x10_0000,
                Pfn(1),
                4096,
                Flags::PRESENT | Flags::WRITABLE,
            )
            .map(|f| f.ignore()),
            Error::WriteExecute,
        ),
        (
            "already mapped",
            s.map(base + 2 * 4096, Pfn(9), 4 * 4096, RO)
                .map(|f| f.ignore()),
            Error::AlreadyMapped {
                va: base + 2 * 4096,
            },
        ),
        (
            "unmap a hole",
            s.unmap(base, 8 * 4096).map(|f| f.ignore()),
            Error::NotMapped {
                va: base + 4 * 4096,
            },
        ),
        (
            "protect a hole",
            s.protect(base + 0x20_0000, 4096, RO, false)
                .map(|f| f.ignore()),
            Error::NotMapped {
                va: base + 0x20_0000,
            },
        ),
        (
            "protect W+X",
            s.protect(base, 4096, Flags::PRESENT | Flags::WRITABLE, false)
                .map(|f| f.ignore()),
            Error::WriteExecute,
        ),
        (
            "translate non-canonical",
            s.lookup(0x1234_5678_9abc_d000).map(|_| ()),
            Error::NonCanonical {
                va: 0x1234_5678_9abc_d000,
            },
        ),
        (
            "translate hole",
            s.lookup(base + 0x40_0000).map(|_| ()),
            Error::NotMapped {
                va: base + 0x40_0000,
            },
        ),
    ];
    for (name, got, want) in cases {
        assert_eq!(got, Err(want), "{name}");
    }
    if pv {
        let hole = 0xffff_8000_0000_0000u64;
        assert_eq!(
            s.map(hole, Pfn(1), 4096, RO).map(|f| f.ignore()),
            Err(Error::XenHole)
        );
        assert_eq!(
            s.map(0xffff_87ff_ffff_f000, Pfn(1), 2 * 4096, RO)
                .map(|f| f.ignore()),
            Err(Error::XenHole)
        );
        assert_eq!(
            s.map(0xffff_8800_0000_0000, Pfn(1), 4096, RO)
                .map(|f| f.ignore())
                .map_err(|_| ()),
            Ok(())
        );
        s.unmap(0xffff_8800_0000_0000, 4096)
            .expect("unmap just above the hole")
            .ignore();
        assert_eq!(
            s.unmap(0xffff_87ff_ffff_f000, 4096).map(|f| f.ignore()),
            Err(Error::XenHole)
        );
        assert_eq!(
            s.map_sized(
                base + 0x4000_0000,
                Pfn(0),
                2 << 20,
                RO,
                Granule::Size2MiB,
                false
            )
            .map(|f| f.ignore()),
            Err(Error::LargePagesUnavailable)
        );
        for f in [Flags::GLOBAL, Flags::NO_CACHE, Flags::WRITE_THROUGH] {
            assert!(
                matches!(
                    s.map(base + 0x10_0000, Pfn(1), 4096, RO | f),
                    Err(Error::Flags(_))
                ),
                "{f:?}"
            );
        }
        // A frame the guest does not own.
        assert_eq!(
            s.map(base + 0x10_0000, Pfn(1 << 30), 4096, RO)
                .map(|f| f.ignore()),
            Err(Error::BadFrame(Pfn(1 << 30)))
        );
    } else {
        assert_eq!(
            s.map_sized(base + 0x1000, Pfn(0), 2 << 20, RO, Granule::Size2MiB, false)
                .map(|f| f.ignore()),
            Err(Error::Misaligned)
        );
        assert_eq!(
            s.map_sized(
                base + 0x4000_0000,
                Pfn(1),
                2 << 20,
                RO,
                Granule::Size2MiB,
                false
            )
            .map(|f| f.ignore()),
            Err(Error::Misaligned)
        );
        s.map_sized(
            base + 0x4000_0000,
            Pfn(512),
            2 << 20,
            RO,
            Granule::Size2MiB,
            false,
        )
        .expect("2M")
        .ignore();
        assert_eq!(
            s.unmap(base + 0x4000_0000, 4096).map(|f| f.ignore()),
            Err(Error::SplitsLargePage {
                va: base + 0x4000_0000
            })
        );
        let t = s.lookup(base + 0x4000_0000 + 0x1234).expect("translate 2M");
        assert_eq!(
            (t.pfn, t.offset, t.granule),
            (Pfn(513), 0x234, Granule::Size2MiB)
        );
        s.unmap(base + 0x4000_0000, 2 << 20)
            .expect("unmap 2M")
            .ignore();
        assert_eq!(
            s.map(base + 0x10_0000, Pfn(1 << 41), 4096, RO)
                .map(|f| f.ignore()),
            Err(Error::BadFrame(Pfn(1 << 41)))
        );
    }
    assert_eq!(
        leaves(s.backend(), s.root()),
        before,
        "a failed call changed the tree"
    );
    assert!(violations(s.backend(), s.root(), None).is_empty());
}

#[test]
fn fixed_garbage_gets_typed_errors_native() {
    fixed_cases(&mut native(), false);
}

#[test]
fn fixed_garbage_gets_typed_errors_pv() {
    let model = shared(4096);
    let mut s = pv(&model);
    fixed_cases(&mut s, true);
    model.0.borrow().check_integrity().expect("integrity");
}

/// Random u64s for every argument: no panic; an error leaves the tree as it
/// was; a success is undone by unmapping the same range.
fn random_garbage<B: Backend>(
    s: &mut AddressSpace<B, Pool>,
    seed: u64,
    check: &dyn Fn(&AddressSpace<B, Pool>),
) -> u64 {
    let edge = prop_oneof![
        any::<u64>(),
        Just(0u64),
        Just(u64::MAX),
        Just(0x0000_7fff_ffff_f000u64),
        Just(0xffff_8000_0000_0000u64),
        Just(0xffff_87ff_ffff_f000u64),
        (0u64..64).prop_map(|k| 0x0000_0100_0000_0000 + k * 0x1000),
        (0u64..64).prop_map(|k| 0xffff_ffff_8000_0000 + k * 0x20_0000),
    ];
    let len = prop_oneof![
        any::<u64>(),
        (0u64..600).prop_map(|k| k * 4096),
        Just(u64::MAX),
        (1u64..4).prop_map(|k| k << 21)
    ];
    let strategy = (edge, len, any::<u64>(), any::<u64>(), 0u8..4, any::<bool>());
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 3000,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let mut calls = 0u64;
    let cell = std::cell::RefCell::new((s, &mut calls));
    runner
        .run(&strategy, |(va, len, pfn, flag_bits, op, wx)| {
            let mut guard = cell.borrow_mut();
            let (s, calls) = &mut *guard;
            **calls += 1;
            let before = leaves(s.backend(), s.root());
            let flags = Flags::from_bits_truncate(flag_bits);
            let pfn = Pfn(pfn % 8192);
            let r = match op {
                0 => s
                    .map_sized(va, pfn, len, flags, Granule::Size4KiB, wx)
                    .map(|f| f.ignore()),
                1 => s
                    .map_sized(va, pfn, len, flags, Granule::Size2MiB, wx)
                    .map(|f| f.ignore()),
                2 => s.protect(va, len, flags, wx).map(|f| f.ignore()),
                _ => s.unmap(va, len).map(|f| f.ignore()),
            };
            match r {
                Err(_) => prop_assert_eq!(leaves(s.backend(), s.root()), before),
                Ok(()) if op <= 1 => {
                    s.unmap(va, len)
                        .map_err(|e| TestCaseError::fail(format!("undo: {e:?}")))?
                        .ignore();
                    prop_assert_eq!(leaves(s.backend(), s.root()), before);
                }
                Ok(()) => {}
            }
            check(s);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("seed {seed:#x}: {e}"));
    calls
}

#[test]
fn random_garbage_never_panics_native() {
    let mut s = native();
    let n = random_garbage(&mut s, 0x9a4b_a6e1, &|s| {
        assert!(violations(s.backend(), s.root(), None)
            .iter()
            .all(|v| matches!(v, pvmmu::invariants::Violation::WriteExecute { .. })));
    });
    assert!(n >= 3000);
}

#[test]
fn random_garbage_never_panics_pv() {
    let model = shared(8192 + 2048);
    let mut s = AddressSpace::new(pv_backend(&model, 32), Pool::new(8192, 2048))
        .map_err(|e| e.0)
        .expect("space");
    let m = model.clone();
    let n = random_garbage(&mut s, 0x9a4b_a6e2, &move |_| {
        m.0.borrow().check_integrity().expect("integrity");
    });
    assert!(n >= 3000);
}

#[test]
fn xen_refuses_a_writable_mapping_of_a_live_table() {
    let model = shared(4096);
    let mut s = pv(&model);
    let va = 0x0000_2000_0000_0000u64;
    s.map(va, Pfn(1), 4096, RO).expect("map").ignore();
    let before = leaves(s.backend(), s.root());
    let root = s.root();
    // Mapping the root (a live, pinned L4) writable next to it: refused by
    // Xen, named, and nothing changed.
    let r = s.map(va + 4096, root, 4096, RW);
    let mfn = model.0.borrow().mfn_of(root).expect("mfn");
    assert!(
        matches!(r, Err(Error::WritablePageTable { mfn: m, .. }) if m == mfn),
        "{r:?}"
    );
    assert_eq!(leaves(s.backend(), s.root()), before);
    // Read-only is fine.
    s.map(va + 4096, root, 4096, RO)
        .expect("RO map of a table")
        .ignore();
    // Making it writable by protect is refused too, and undone.
    let r = s.protect(va + 4096, 4096, RW, false);
    assert!(matches!(r, Err(Error::WritablePageTable { .. })), "{r:?}");
    assert!(!s
        .lookup(va + 4096)
        .expect("mapped")
        .flags
        .contains(Flags::WRITABLE));
    // Into a brand-new L1 (hooked whole): Xen refuses the hook.
    let far = 0x0000_3000_0000_0000u64;
    let in_use = s.allocator().in_use();
    let r = s.map(far, root, 4096, RW);
    assert!(
        matches!(
            r,
            Err(Error::WritablePageTable { .. }) | Err(Error::Hypervisor(_))
        ),
        "{r:?}"
    );
    assert_eq!(
        s.allocator().in_use(),
        in_use,
        "tables of the failed call leaked"
    );
    assert!(s.lookup(far).is_err());
    model.0.borrow().check_integrity().expect("integrity");
    assert!(violations(s.backend(), s.root(), Some(&ModelOracle(&model.0.borrow()))).is_empty());
}

/// An x86_64 frame allocator over arena frames 901..1024 (it counts what
/// it handed out in `.0`).
struct Frames(u64);

// SAFETY: hands out distinct arena frames.
unsafe impl x86_64::structures::paging::FrameAllocator<x86_64::structures::paging::Size4KiB>
    for Frames
{
    fn allocate_frame(
        &mut self,
    ) -> Option<x86_64::structures::paging::PhysFrame<x86_64::structures::paging::Size4KiB>> {
        self.0 += 1;
        (self.0 < 1024).then(|| {
            x86_64::structures::paging::PhysFrame::containing_address(x86_64::PhysAddr::new(
                self.0 * 4096,
            ))
        })
    }
}

#[test]
fn x86_64_mapper_and_translate_traits() {
    use x86_64::structures::paging::mapper::{
        MapToError, MappedFrame, TranslateResult, UnmapError,
    };
    use x86_64::structures::paging::{Mapper, Page, PhysFrame, Size2MiB, Size4KiB, Translate};
    use x86_64::{PhysAddr, VirtAddr};

    let mut s = native();
    s.allocator_mut().adopt_foreign = true;
    let mut frames = Frames(900);
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(0x0000_5000_0000_3000));
    let frame = PhysFrame::containing_address(PhysAddr::new(0x7000_0000));
    // SAFETY: nothing runs on these tables.
    unsafe { s.map_to(page, frame, RW, &mut frames) }
        .expect("map_to")
        .ignore();
    assert_eq!(
        frames.0, 903,
        "three tables taken from the caller's allocator"
    );
    match s.translate(VirtAddr::new(0x0000_5000_0000_3abc)) {
        TranslateResult::Mapped {
            frame: MappedFrame::Size4KiB(f),
            offset,
            flags,
        } => {
            assert_eq!((f, offset), (frame, 0xabc));
            assert!(flags.contains(Flags::WRITABLE));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.translate_addr(VirtAddr::new(0x0000_5000_0000_3010)),
        Some(PhysAddr::new(0x7000_0010))
    );
    // SAFETY: as above.
    let again = unsafe { s.map_to(page, frame, RW, &mut frames) };
    assert!(matches!(again, Err(MapToError::PageAlreadyMapped(f)) if f == frame));
    assert_eq!(
        Mapper::<Size4KiB>::translate_page(&s, page).expect("translate_page"),
        frame
    );
    // SAFETY: as above.
    unsafe { Mapper::<Size4KiB>::update_flags(&mut s, page, RO) }
        .expect("update_flags")
        .ignore();
    assert!(!s
        .lookup(page.start_address().as_u64())
        .expect("mapped")
        .flags
        .contains(Flags::WRITABLE));
    let (f, flush) = Mapper::<Size4KiB>::unmap(&mut s, page).expect("unmap");
    flush.ignore();
    assert_eq!(f, frame);
    assert!(matches!(
        Mapper::<Size4KiB>::unmap(&mut s, page),
        Err(UnmapError::PageNotMapped)
    ));
    // 2 MiB natively.
    let big = Page::<Size2MiB>::containing_address(VirtAddr::new(0x0000_5000_0020_0000));
    let bigf = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(0x8000_0000));
    // SAFETY: as above.
    unsafe { s.map_to(big, bigf, RO, &mut frames) }
        .expect("2M map_to")
        .ignore();
    let inside = Page::<Size4KiB>::containing_address(VirtAddr::new(0x0000_5000_0020_1000));
    assert!(matches!(
        Mapper::<Size4KiB>::unmap(&mut s, inside),
        Err(UnmapError::ParentEntryHugePage)
    ));
    assert_eq!(
        Mapper::<Size2MiB>::unmap(&mut s, big).expect("2M unmap").0,
        bigf
    );
    assert_eq!(
        s.allocator().in_use(),
        1,
        "tables freed into the space's pool; only its root is left"
    );
}

/// The `x86_64` traits' documented error contract, variant for variant:
/// `ParentEntryHugePage` only where a larger page covers the page, a slot
/// holding smaller pages is `PageAlreadyMapped` for `map_to` and
/// `PageNotMapped` for the calls that need a page of that size.
#[test]
fn x86_64_error_contract_by_page_state() {
    use x86_64::structures::paging::mapper::{
        FlagUpdateError, MapToError, TranslateError, UnmapError,
    };
    use x86_64::structures::paging::{Mapper, Page, PhysFrame, Size2MiB, Size4KiB};
    use x86_64::{PhysAddr, VirtAddr};

    let mut s = native();
    s.allocator_mut().adopt_foreign = true;
    let mut frames = Frames(900);
    // A 4 KiB page in the 2 MiB slot at 0x5000_0040_0000: the slot holds
    // smaller pages.
    let small = Page::<Size4KiB>::containing_address(VirtAddr::new(0x0000_5000_0040_3000));
    let f4 = PhysFrame::containing_address(PhysAddr::new(0x7000_0000));
    // SAFETY: nothing runs on these tables.
    unsafe { s.map_to(small, f4, RW, &mut frames) }
        .expect("map_to")
        .ignore();
    let slot = Page::<Size2MiB>::containing_address(VirtAddr::new(0x0000_5000_0040_0000));
    let f2 = PhysFrame::<Size2MiB>::containing_address(PhysAddr::new(0x8000_0000));
    let taken = frames.0;
    // SAFETY: as above.
    let r = unsafe { s.map_to(slot, f2, RO, &mut frames) };
    assert!(
        matches!(r, Err(MapToError::PageAlreadyMapped(f)) if f == f2),
        "{r:?}"
    );
    assert_eq!(frames.0, taken, "no table taken for a refused map");
    assert!(matches!(
        Mapper::<Size2MiB>::translate_page(&s, slot),
        Err(TranslateError::PageNotMapped)
    ));
    assert!(matches!(
        Mapper::<Size2MiB>::unmap(&mut s, slot),
        Err(UnmapError::PageNotMapped)
    ));
    // SAFETY: as above.
    let r = unsafe { Mapper::<Size2MiB>::update_flags(&mut s, slot, RO) };
    assert!(matches!(r, Err(FlagUpdateError::PageNotMapped)), "{r:?}");
    // A 2 MiB page: a 4 KiB page inside it is in a huge page.
    let big = Page::<Size2MiB>::containing_address(VirtAddr::new(0x0000_5000_0060_0000));
    // SAFETY: as above.
    unsafe { s.map_to(big, f2, RO, &mut frames) }
        .expect("2M map_to")
        .ignore();
    let inside = Page::<Size4KiB>::containing_address(VirtAddr::new(0x0000_5000_0060_5000));
    let f = PhysFrame::containing_address(PhysAddr::new(0x9000_0000));
    // SAFETY: as above.
    let r = unsafe { s.map_to(inside, f, RW, &mut frames) };
    assert!(matches!(r, Err(MapToError::ParentEntryHugePage)), "{r:?}");
    assert!(matches!(
        Mapper::<Size4KiB>::translate_page(&s, inside),
        Err(TranslateError::ParentEntryHugePage)
    ));
    // SAFETY: as above.
    let r = unsafe { Mapper::<Size4KiB>::set_flags_p2_entry(&mut s, inside, RO) };
    assert!(r.is_ok(), "the P2 entry exists (it is the 2 MiB page)");
    // SAFETY: as above.
    let r = unsafe { Mapper::<Size4KiB>::set_flags_p2_entry(&mut s, small, RO) };
    assert!(r.is_ok(), "the P2 entry exists (it points to an L1)");
    // The 2 MiB page again: already mapped, to the frame it maps.
    // SAFETY: as above.
    let r = unsafe { s.map_to(big, f2, RO, &mut frames) };
    assert!(
        matches!(r, Err(MapToError::PageAlreadyMapped(g)) if g == f2),
        "{r:?}"
    );
    // Nothing mapped at all.
    let none = Page::<Size4KiB>::containing_address(VirtAddr::new(0x0000_6000_0000_0000));
    assert!(matches!(
        Mapper::<Size4KiB>::translate_page(&s, none),
        Err(TranslateError::PageNotMapped)
    ));
    // SAFETY: as above.
    let r = unsafe { Mapper::<Size4KiB>::set_flags_p3_entry(&mut s, none, RO) };
    assert!(matches!(r, Err(FlagUpdateError::PageNotMapped)), "{r:?}");
}
