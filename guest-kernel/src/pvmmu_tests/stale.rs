//! No stale translation after any unmap or protect shape, with a real
//! access: the CPU's TLB is loaded by reading every page of a window, the
//! call and the flush it returns run, then every page the call changed must
//! fault (a read after unmap, a write after protect read-only) and every
//! other page must still read. A call that owes a flush and does not return
//! it leaves the old translation in the TLB (QEMU's software TLB keeps it
//! as a CPU does; under Xen PV the guest's own flush request is the only
//! one), and the access goes through.
//!
//! The shapes are the host TLB model's (`pvmmu/tests/tlb_model.rs`) on 4
//! KiB pages: one page, a few pages across an L1 boundary, a run over the
//! invlpg limit (a full flush), a whole L1's pages (the table freed), and
//! everything.

use pvmmu::Pfn;

use crate::selftest::{check, TestResult};
use crate::traps::{probe_read, probe_write};

use super::backends::LiveBackend;
use super::harness::Cx;
use super::steps::{expect_page_fault, give, map, protect, read, take, unmap};
use super::{MIB2, NX, P, PAGE, RW, TEST_AREA};

/// The window: the last 64 pages of one L1 and all 512 of the next.
const FIRST: u64 = TEST_AREA + MIB2 - 64 * PAGE;
const PAGES: u64 = 64 + 512;

/// What a shape does to its pages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Unmap,
    ReadOnly,
}

/// (what, first page index in the window, pages).
const SHAPES: [(Change, u64, u64); 9] = [
    (Change::Unmap, 63, 1),
    (Change::Unmap, 60, 8),
    (Change::Unmap, 40, 40),
    (Change::Unmap, 64, 512),
    (Change::Unmap, 0, PAGES),
    (Change::ReadOnly, 63, 1),
    (Change::ReadOnly, 60, 8),
    (Change::ReadOnly, 40, 40),
    (Change::ReadOnly, 64, 512),
];

pub(super) fn no_stale_translation_after_any_shape<B: LiveBackend>(
    cx: &mut Cx<'_, B>,
) -> TestResult {
    let pfn = take(cx, PAGES)?;
    let mut result = Ok(());
    for &(change, first, n) in &SHAPES {
        result = shape(cx, pfn, change, first, n);
        if result.is_err() {
            log::error!(
                "stale shape: {} of pages {first}..{} of the window",
                if change == Change::Unmap {
                    "unmap"
                } else {
                    "protect read-only"
                },
                first + n
            );
            break;
        }
    }
    give(cx, pfn)?;
    result
}

fn shape<B: LiveBackend>(
    cx: &mut Cx<'_, B>,
    pfn: Pfn,
    change: Change,
    first: u64,
    n: u64,
) -> TestResult {
    map(cx, FIRST, pfn, PAGES, P | RW | NX)?;
    // Load the TLB with every page's translation (writable).
    for i in 0..PAGES {
        read("read before the change", FIRST + i * PAGE)?;
    }
    match change {
        Change::Unmap => unmap(cx, FIRST + first * PAGE, n)?,
        Change::ReadOnly => protect(cx, FIRST + first * PAGE, n, P | NX)?,
    }
    for i in 0..PAGES {
        let va = FIRST + i * PAGE + 8;
        let changed = (first..first + n).contains(&i);
        match (changed, change) {
            (false, _) => {
                read("read of a page the call left alone", va)?;
            }
            (true, Change::Unmap) => expect_page_fault(
                "read after unmap went through (stale translation)",
                // SAFETY: the test area maps only the frames this test
                // borrowed; a read has no side effect.
                unsafe { probe_read(va) },
                va,
                false,
                false,
            )?,
            (true, Change::ReadOnly) => {
                expect_page_fault(
                    "write after protect read-only went through (stale translation)",
                    // SAFETY: the page holds a frame this test borrowed; if
                    // the write goes through it only changes that frame.
                    unsafe { probe_write(va, 0x5afe) },
                    va,
                    true,
                    true,
                )?;
                read("read after protect read-only", va)?;
            }
        }
    }
    // Leave the window empty.
    match change {
        Change::Unmap => {
            if first > 0 {
                unmap(cx, FIRST, first)?;
            }
            if first + n < PAGES {
                unmap(cx, FIRST + (first + n) * PAGE, PAGES - first - n)?;
            }
        }
        Change::ReadOnly => unmap(cx, FIRST, PAGES)?,
    }
    check(
        cx.space.lookup(FIRST).is_err() && cx.space.lookup(FIRST + (PAGES - 1) * PAGE).is_err(),
        "window not empty after the shape",
    )
}
