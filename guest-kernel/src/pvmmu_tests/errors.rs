//! Refused calls: each a typed error that changes nothing.

use pvmmu::entry::{FlagError, Flags};
use pvmmu::{Error, Granule, Pfn};

use crate::selftest::{check, check_eq, TestResult};

use super::backends::LiveBackend;
use super::harness::{slot_in_use, Cx};
use super::steps::{expect_error, failed, give, map, read, take, unmap};
use super::{MIB2, NX, P, PAGE, RW, TEST_AREA};

/// Double map → AlreadyMapped, unmap of unmapped → NotMapped; a refused
/// call changes nothing (the part it could have done is not done).
pub(super) fn errors_mapped_unmapped<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 2)?;
    let va = TEST_AREA + 9 * MIB2 + 8 * PAGE;
    map(cx, va, pfn, 1, P | RW | NX)?;
    let free1 = cx.space.allocator().free_count();
    expect_error(
        "map over a mapped page",
        cx.space.map(va, Pfn(pfn.0 + 1), PAGE, P | RW | NX),
        Error::AlreadyMapped { va },
    )?;
    expect_error(
        "map of a range ending on a mapped page",
        cx.space.map(va - PAGE, pfn, 2 * PAGE, P | RW | NX),
        Error::AlreadyMapped { va },
    )?;
    expect_error(
        "page before the refused range",
        cx.space.lookup(va - PAGE),
        Error::NotMapped { va: va - PAGE },
    )?;
    check_eq(
        "frame still mapped",
        cx.space.lookup(va).map_err(failed("translate"))?.pfn.0,
        pfn.0,
    )?;
    expect_error(
        "unmap of an unmapped page",
        cx.space.unmap(va + PAGE, PAGE),
        Error::NotMapped { va: va + PAGE },
    )?;
    expect_error(
        "unmap of a range with a hole",
        cx.space.unmap(va, 2 * PAGE),
        Error::NotMapped { va: va + PAGE },
    )?;
    expect_error(
        "unmap in an empty table",
        cx.space.unmap(va + 100 * MIB2, PAGE),
        Error::NotMapped {
            va: va + 100 * MIB2,
        },
    )?;
    expect_error(
        "protect of an unmapped page",
        cx.space.protect(va + PAGE, PAGE, P | NX, false),
        Error::NotMapped { va: va + PAGE },
    )?;
    read("page still readable", va)?;
    check_eq(
        "free frames after refused calls",
        cx.space.allocator().free_count(),
        free1,
    )?;
    unmap(cx, va, 1)?;
    give(cx, pfn)
}

/// Non-canonical, Xen's hole (PV), misaligned, overflowing, W+X, flags the
/// backend refuses, large pages under PV: each a typed error, nothing
/// mapped, no frame taken.
pub(super) fn errors_addresses_flags<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 1)?;
    let va = TEST_AREA + 11 * MIB2;
    let free0 = cx.space.allocator().free_count();
    let rw = P | RW | NX;
    let s = &mut cx.space;
    expect_error(
        "non-canonical address",
        s.map(0x0000_8000_0000_0000, pfn, PAGE, rw),
        Error::NonCanonical {
            va: 0x0000_8000_0000_0000,
        },
    )?;
    expect_error(
        "range into the non-canonical hole",
        s.map(0x0000_7fff_ffff_f000, pfn, 2 * PAGE, rw),
        Error::NonCanonical {
            va: 0x0000_8000_0000_0fff,
        },
    )?;
    expect_error(
        "translate of a non-canonical address",
        s.lookup(0x1234_0000_0000_0000),
        Error::NonCanonical {
            va: 0x1234_0000_0000_0000,
        },
    )?;
    expect_error(
        "misaligned address",
        s.map(va + 8, pfn, PAGE, rw),
        Error::Misaligned,
    )?;
    expect_error(
        "misaligned length",
        s.map(va, pfn, 100, rw),
        Error::Misaligned,
    )?;
    expect_error("misaligned unmap", s.unmap(va + 1, PAGE), Error::Misaligned)?;
    expect_error(
        "range past the top of memory",
        s.map(0xffff_ffff_ffff_f000, pfn, 2 * PAGE, rw),
        Error::RangeOverflow,
    )?;
    expect_error(
        "frame number overflows",
        s.map(va, Pfn(u64::MAX / 2), PAGE, rw),
        Error::RangeOverflow,
    )?;
    expect_error(
        "W+X without consent",
        s.map(va, pfn, PAGE, P | RW),
        Error::WriteExecute,
    )?;
    expect_error(
        "protect to W+X without consent",
        s.protect(va, PAGE, P | RW, false),
        Error::WriteExecute,
    )?;
    if cx.pv {
        let hole = 0xffff_8000_0000_0000 + 0x1000;
        expect_error(
            "map in Xen's hole",
            s.map(hole, pfn, PAGE, rw),
            Error::XenHole,
        )?;
        expect_error("unmap in Xen's hole", s.unmap(hole, PAGE), Error::XenHole)?;
        expect_error(
            "map from inside Xen's hole to past it",
            s.map(0xffff_87ff_ffff_f000, pfn, 2 * PAGE, rw),
            Error::XenHole,
        )?;
        expect_error(
            "2 MiB page under PV",
            s.map_sized(va, Pfn(0), MIB2, rw, Granule::Size2MiB, false),
            Error::LargePagesUnavailable,
        )?;
        expect_error(
            "GLOBAL under PV",
            s.map(va, pfn, PAGE, rw | Flags::GLOBAL),
            Error::Flags(FlagError::Global),
        )?;
        expect_error(
            "PCD under PV",
            s.map(va, pfn, PAGE, rw | Flags::NO_CACHE),
            Error::Flags(FlagError::CacheAttributes),
        )?;
    } else {
        expect_error(
            "2 MiB page on a misaligned frame",
            s.map_sized(va, Pfn(pfn.0 | 1), MIB2, rw, Granule::Size2MiB, false),
            Error::Misaligned,
        )?;
        expect_error(
            "2 MiB page at a misaligned address",
            s.map_sized(va + PAGE, Pfn(0), MIB2, rw, Granule::Size2MiB, false),
            Error::Misaligned,
        )?;
    }
    expect_error(
        "not present",
        s.map(va, pfn, PAGE, RW | NX),
        Error::Flags(FlagError::NotPresent),
    )?;
    expect_error("nothing mapped", s.lookup(va), Error::NotMapped { va })?;
    check(!slot_in_use(cx), "a refused call left tables")?;
    check_eq(
        "free frames after refused calls",
        cx.space.allocator().free_count(),
        free0,
    )?;
    give(cx, pfn)
}
