//! PV only: what Xen must refuse (a writable mapping of a live page table)
//! and the read-only aliases of live tables.

use hypercall::XenError;
use pvmmu::Error;

use crate::directmap::{DirectMem, DIRECT_MAP_BASE};
use crate::selftest::{check, check_eq, Failure, TestResult};
use crate::traps::probe_write;

use super::backends::LiveBackend;
use super::harness::{slot_in_use, tables_of, Cx};
use super::steps::{expect_error, expect_page_fault, failed, give, map, read, take, unmap};
use super::{MIB2, NX, P, PAGE, RW, TEST_AREA};

/// PV: mapping a page-table frame writable is refused with Xen's EBUSY as
/// the typed error — the live root and an L1 of the direct map, into an
/// existing L1 and inside a new subtree — and leaves nothing behind; the
/// root mapped read-only is fine and reads like the root.
pub(super) fn refuses_writable_table<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let root = cx.space.root();
    let root_mfn = cx
        .space
        .backend()
        .to_mfn(root)
        .ok_or(Failure::Check("root has no mfn"))?;
    let va = TEST_AREA + 13 * MIB2;
    let free0 = cx.space.allocator().free_count();
    // A new subtree: Xen validates it when it is hooked.
    match cx.space.map(va, root, PAGE, P | RW | NX) {
        Err(Error::WritablePageTable { error, .. }) => {
            check(error == XenError::Busy, "new subtree: refusal not EBUSY")?
        }
        other => {
            log::error!("root mapped writable in a new subtree: {other:?}");
            return Err(Failure::Check("root mapped writable in a new subtree"));
        }
    }
    check(!slot_in_use(cx), "refused subtree left in the tree")?;
    check_eq(
        "free frames after the refusal",
        cx.space.allocator().free_count(),
        free0,
    )?;

    // Into a live L1.
    let pfn = take(cx, 1)?;
    map(cx, va, pfn, 1, P | RW | NX)?;
    expect_error(
        "root mapped writable in a live L1",
        cx.space.map(va + PAGE, root, PAGE, P | RW | NX),
        Error::WritablePageTable {
            mfn: root_mfn,
            error: XenError::Busy,
        },
    )?;
    let dm_l1 = tables_of(&cx.space, DirectMem::va(pfn))[2]
        .ok_or(Failure::Check("direct map has no L1 here"))?;
    let dm_l1_mfn = cx
        .space
        .backend()
        .to_mfn(dm_l1)
        .ok_or(Failure::Check("L1 has no mfn"))?;
    expect_error(
        "direct-map L1 mapped writable",
        cx.space.map(va + 2 * PAGE, dm_l1, PAGE, P | RW | NX),
        Error::WritablePageTable {
            mfn: dm_l1_mfn,
            error: XenError::Busy,
        },
    )?;
    expect_error(
        "refused page not mapped",
        cx.space.lookup(va + PAGE),
        Error::NotMapped { va: va + PAGE },
    )?;
    // Read-only is allowed, and shows the root's entries.
    map(cx, va + PAGE, root, 1, P | NX)?;
    let slot = (DIRECT_MAP_BASE >> 39) & 511;
    let via_alias = read("root through a RO alias", va + PAGE + slot * 8)?;
    let e = cx.space.backend().read(root, slot as usize);
    check_eq("direct-map slot of the root", via_alias, e.0)?;
    unmap(cx, va, 2)?;
    give(cx, pfn)
}

/// PV: while a table lives, every kernel alias of its frame (direct map,
/// boot region) is read-only and a store into an L2/L3 faults; once freed,
/// the aliases are writable again (under DEBUG_PAGEALLOC the direct map's
/// is absent: the frame is free).
pub(super) fn tables_read_only_aliases<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 1)?;
    let va = TEST_AREA + 15 * MIB2;
    map(cx, va, pfn, 1, P | RW | NX)?;
    let tables = tables_of(&cx.space, va);
    let mut seen = 0;
    for (depth, table) in tables.iter().enumerate() {
        let t = table.ok_or(Failure::Check("missing table on the way"))?;
        for alias in [DirectMem::va(t), crate::boot::KERNEL_VMA + t.0 * PAGE] {
            let Ok(tr) = cx.space.lookup(alias) else {
                continue;
            };
            if tr.pfn != t {
                continue;
            }
            seen += 1;
            check(!tr.flags.contains(RW), "live table aliased writable")?;
        }
        // L3 and L2 (Xen emulates stores into L1s; see dm_tests).
        if depth < 2 {
            let at = DirectMem::va(t) + 8 * 100;
            let word = read("table word", at)?;
            // SAFETY: the store, if it went through, would write the word
            // already there (entry 100 of a table this test created).
            let r = unsafe { probe_write(at, word) };
            expect_page_fault("store into a live table", r, at, true, true)?;
        }
    }
    check(seen >= 3, "no alias of the new tables found")?;
    unmap(cx, va, 1)?;
    for t in tables.iter().flatten() {
        if crate::pagealloc::enabled() {
            freed_table_under_pagealloc(cx, *t)?;
            continue;
        }
        let tr = cx
            .space
            .lookup(DirectMem::va(*t))
            .map_err(failed("translate of a freed table"))?;
        check(tr.flags.contains(RW), "freed table still read-only")?;
    }
    give(cx, pfn)
}

/// Under DEBUG_PAGEALLOC a freed table is a free frame: its direct-map
/// page is absent (pvmmu made the alias writable before giving the frame
/// back, the allocator then unmapped it); its alias in the boot region,
/// where it has one, is writable again.
fn freed_table_under_pagealloc<B: LiveBackend>(cx: &mut Cx<'_, B>, t: pvmmu::Pfn) -> TestResult {
    match cx.space.lookup(DirectMem::va(t)) {
        Err(Error::NotMapped { .. }) => {}
        Ok(_) => return Err(Failure::Check("freed table mapped in the direct map")),
        Err(_) => return Err(Failure::Check("walk of a freed table's page failed")),
    }
    match cx.space.lookup(crate::boot::KERNEL_VMA + t.0 * PAGE) {
        Ok(tr) if tr.pfn == t => check(tr.flags.contains(RW), "freed table still read-only"),
        _ => Ok(()),
    }
}
