//! Map and translate: bytes through the new mapping and the direct map,
//! translations, a range over several L1 tables.

use pvmmu::entry::HARDWARE_SET;
use pvmmu::{Error, Granule, Pfn};

use crate::directmap::DirectMem;
use crate::selftest::{check, check_eq, TestResult};

use super::backends::LiveBackend;
use super::harness::Cx;
use super::steps::{expect_error, failed, give, map, pattern, read, take, unmap, write};
use super::{MIB2, NX, P, PAGE, RW, TEST_AREA};

/// 16 frames mapped at the test area: every page written through the new
/// mapping and read through the direct map, then the other way round.
pub(super) fn map_write_read<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let n = 16;
    let pfn = take(cx, n)?;
    let va = TEST_AREA;
    map(cx, va, pfn, n, P | RW | NX)?;
    for k in 0..n {
        let frame = Pfn(pfn.0 + k);
        let (new, direct) = (va + k * PAGE, DirectMem::va(frame));
        for (word, from, to) in [(0, new, direct), (511, direct, new), (77, new, direct)] {
            let value = pattern(frame, word, 1);
            // SAFETY: both addresses map `frame`, which this test borrowed.
            unsafe { write("write", from + word * 8, value) }?;
            check_eq(
                "word read through the other mapping",
                read("read", to + word * 8)?,
                value,
            )?;
        }
    }
    unmap(cx, va, n)?;
    give(cx, pfn)
}

/// Translate returns the frame, the offset and the flags asked for; the
/// direct map's translation agrees.
pub(super) fn translate_frames_and_flags<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 3)?;
    let va = TEST_AREA + 5 * PAGE;
    let asked = [P | NX, P | RW | NX, P];
    for (k, flags) in asked.iter().enumerate() {
        let k = k as u64;
        map(cx, va + k * PAGE, Pfn(pfn.0 + k), 1, *flags)?;
    }
    for (k, flags) in asked.iter().enumerate() {
        let k = k as u64;
        let t = cx
            .space
            .lookup(va + k * PAGE + 0x123)
            .map_err(failed("translate"))?;
        check_eq("translated frame", t.pfn.0, pfn.0 + k)?;
        check_eq("translated offset", t.offset, 0x123)?;
        check(t.granule == Granule::Size4KiB, "granule not 4 KiB")?;
        check_eq(
            "translated flags",
            (t.flags - HARDWARE_SET).bits(),
            flags.bits(),
        )?;
        let d = cx
            .space
            .lookup(DirectMem::va(Pfn(pfn.0 + k)) + 8)
            .map_err(failed("translate of the direct map"))?;
        check_eq("direct-map frame", d.pfn.0, pfn.0 + k)?;
        check(d.flags.contains(RW | NX), "direct map not RW+NX")?;
    }
    unmap(cx, va, 3)?;
    for k in 0..3 {
        expect_error(
            "translate after unmap",
            cx.space.lookup(va + k * PAGE),
            Error::NotMapped { va: va + k * PAGE },
        )?;
    }
    give(cx, pfn)
}

/// One range over four L1 tables (from the last page of one to the first
/// of another): every page right; unmapping the middle whole frees exactly
/// its tables.
pub(super) fn range_across_tables<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let n = 1026;
    let pfn = take(cx, n)?;
    let va = TEST_AREA + 2 * MIB2 - PAGE;
    let free0 = cx.space.allocator().free_count();
    map(cx, va, pfn, n, P | RW | NX)?;
    check_eq(
        "tables for the range (L3, L2, 4 L1)",
        free0 - cx.space.allocator().free_count(),
        6,
    )?;
    for k in [0, 1, 511, 512, 513, 1023, 1024, 1025] {
        let t = cx
            .space
            .lookup(va + k * PAGE)
            .map_err(failed("translate"))?;
        check_eq("frame of a page in the range", t.pfn.0, pfn.0 + k)?;
        let value = pattern(t.pfn, k, 3);
        // SAFETY: the page maps a frame of the borrowed run.
        unsafe { write("write", va + k * PAGE, value) }?;
        check_eq(
            "read back through the direct map",
            read("read", DirectMem::va(t.pfn))?,
            value,
        )?;
    }
    // The two middle L1s, covered whole.
    unmap(cx, TEST_AREA + 2 * MIB2, 1024)?;
    check_eq(
        "tables after the middle unmap",
        free0 - cx.space.allocator().free_count(),
        4,
    )?;
    expect_error(
        "translate in the middle",
        cx.space.lookup(TEST_AREA + 3 * MIB2),
        Error::NotMapped {
            va: TEST_AREA + 3 * MIB2,
        },
    )?;
    read("first page still mapped", va)?;
    read("last page still mapped", va + 1025 * PAGE)?;
    unmap(cx, va, 1)?;
    unmap(cx, va + 1025 * PAGE, 1)?;
    check_eq(
        "free frames at the end",
        cx.space.allocator().free_count(),
        free0,
    )?;
    give(cx, pfn)
}
