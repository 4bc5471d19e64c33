//! Unmap: the page faults, translate says not mapped, and the tables that
//! became empty go back to the allocator.

use pvmmu::{Error, Pfn};

use crate::selftest::{check, check_eq, TestResult};
use crate::traps::probe_read;

use super::backends::LiveBackend;
use super::harness::{slot_in_use, Cx};
use super::steps::{expect_error, expect_page_fault, give, map, read, take, unmap};
use super::{MIB2, NX, P, PAGE, RW, TEST_AREA};

/// Unmap: the page faults (#PF, not present), translate says not mapped,
/// and the tables that became empty go back to the allocator (counted).
pub(super) fn unmap_frees_tables<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 2)?;
    let (a, b) = (TEST_AREA + 7 * PAGE, TEST_AREA + MIB2 + 7 * PAGE);
    let free0 = cx.space.allocator().free_count();
    let (made0, freed0) = cx.space.table_counts();
    map(cx, a, pfn, 1, P | RW | NX)?;
    check_eq(
        "tables for the first page (L3, L2, L1)",
        free0 - cx.space.allocator().free_count(),
        3,
    )?;
    map(cx, b, Pfn(pfn.0 + 1), 1, P | RW | NX)?;
    check_eq(
        "tables for a page in the next L1",
        free0 - cx.space.allocator().free_count(),
        4,
    )?;
    check_eq("tables created", cx.space.table_counts().0 - made0, 4)?;
    read("read of a mapped page", a)?;

    unmap(cx, a, 1)?;
    check_eq(
        "tables left after the first unmap",
        free0 - cx.space.allocator().free_count(),
        3,
    )?;
    expect_page_fault(
        "read after unmap",
        // SAFETY: `a` is in the test area, which maps only RAM.
        unsafe { probe_read(a + 16) },
        a + 16,
        false,
        false,
    )?;
    expect_error(
        "translate after unmap",
        cx.space.lookup(a),
        Error::NotMapped { va: a },
    )?;
    read("read of the other page", b)?;

    unmap(cx, b, 1)?;
    check_eq(
        "free frames after both unmaps",
        cx.space.allocator().free_count(),
        free0,
    )?;
    check_eq("tables freed", cx.space.table_counts().1 - freed0, 4)?;
    check(!slot_in_use(cx), "L4 slot still in use")?;
    expect_page_fault(
        "read after the last unmap",
        // SAFETY: as above.
        unsafe { probe_read(b) },
        b,
        false,
        false,
    )?;
    give(cx, pfn)
}
