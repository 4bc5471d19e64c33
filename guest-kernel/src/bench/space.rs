//! Benchmarks of pvmmu's address space on the live tree: map, protect and
//! unmap of N pages, in one range call or in one call per page, and
//! translate. Every call is followed by the TLB flush it asks for, as a
//! caller would do, and the flush is timed with it.
//!
//! The pages map RAM read-only (a run of RAM frames found in the direct
//! map, page tables included, which is allowed under PV too): no frame is
//! borrowed, so the run can be as long as RAM. Each run checks what it did
//! (the frames and flags translate back, the pages are gone after unmap)
//! and natively that no hypercall was made.

use pvmmu::entry::{Flags, HARDWARE_SET};
use pvmmu::{Error, Pfn, PAGE_SIZE};

use crate::directmap::DirectMem;
use crate::platform::rdtsc;
use crate::pvmmu_tests::{failed, map, protect, unmap, Cx, LiveBackend, TEST_AREA};
use crate::selftest::{check, check_eq, Failure, TestResult};

use super::figure::{emit, Per, Samples, REPS};

/// Where the pages go: the test area's second GiB, so that 262,144 pages
/// fill exactly one L2's 512 L1 tables and a smaller run starts an L1.
const BENCH_VA: u64 = TEST_AREA + (1 << 30);
/// The mapping as `map` makes it.
const MAPPED: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);
/// The mapping as `protect` leaves it (executable, still read-only).
const PROTECTED: Flags = Flags::PRESENT;

/// One call for the whole run, or one call per page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Calls {
    Range,
    PerPage,
}

impl Calls {
    fn name(self) -> &'static str {
        match self {
            Calls::Range => "range",
            Calls::PerPage => "per-page",
        }
    }
    fn count(self, pages: u64) -> u64 {
        match self {
            Calls::Range => 1,
            Calls::PerPage => pages,
        }
    }
}

/// The timed operations, in the order a run does them.
#[derive(Debug, Clone, Copy)]
enum Op {
    Map,
    Protect,
    Unmap,
}

impl Op {
    const ALL: [Op; 3] = [Op::Map, Op::Protect, Op::Unmap];
    fn name(self) -> &'static str {
        match self {
            Op::Map => "map",
            Op::Protect => "protect",
            Op::Unmap => "unmap",
        }
    }
    fn apply<B: LiveBackend>(
        self,
        cx: &mut Cx<'_, B>,
        va: u64,
        pfn: Pfn,
        pages: u64,
    ) -> TestResult {
        match self {
            Op::Map => map(cx, va, pfn, pages, MAPPED),
            Op::Protect => protect(cx, va, pages, PROTECTED),
            Op::Unmap => unmap(cx, va, pages),
        }
    }
}

/// Samples of one operation: cycles, hypercalls and `mmu_update` entries.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    cycles: Samples,
    hypercalls: Samples,
    entries: Samples,
}

/// The first run of `pages` RAM frames.
fn ram_run(mem: &DirectMem, pages: u64) -> Result<Pfn, Failure> {
    mem.ram()
        .iter()
        .find(|r| r.end.0 - r.start.0 >= pages)
        .map(|r| r.start)
        .ok_or(Failure::Check("no run of RAM frames that long"))
}

/// Runs `op` over `pages` pages at [`BENCH_VA`] with `calls`, and adds its
/// cost to `cost`.
fn timed<B: LiveBackend>(
    cx: &mut Cx<'_, B>,
    cost: &mut Cost,
    op: Op,
    calls: Calls,
    pfn: Pfn,
    pages: u64,
) -> TestResult {
    let before = cx.space.backend().counters();
    let start = rdtsc();
    match calls {
        Calls::Range => op.apply(cx, BENCH_VA, pfn, pages)?,
        Calls::PerPage => {
            for k in 0..pages {
                op.apply(cx, BENCH_VA + k * PAGE_SIZE, Pfn(pfn.0 + k), 1)?;
            }
        }
    }
    let cycles = rdtsc().wrapping_sub(start);
    let after = cx.space.backend().counters();
    cost.cycles.push(cycles);
    cost.hypercalls.push(after.hypercalls - before.hypercalls);
    cost.entries
        .push(after.mmu_update_entries - before.mmu_update_entries);
    Ok(())
}

/// Requires the page `k` of the run to map frame `pfn + k` with `flags`.
fn expect_mapped<B: LiveBackend>(cx: &Cx<'_, B>, pfn: Pfn, k: u64, flags: Flags) -> TestResult {
    let t = cx
        .space
        .lookup(BENCH_VA + k * PAGE_SIZE)
        .map_err(failed("translate"))?;
    check_eq("frame of a benchmarked page", t.pfn.0, pfn.0 + k)?;
    check_eq(
        "flags of a benchmarked page",
        (t.flags - HARDWARE_SET).bits(),
        flags.bits(),
    )
}

/// Map, protect and unmap of `pages` pages, [`REPS`] times in each way of
/// calling, with their figures.
pub fn ops<const PAGES: u64, B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = ram_run(&cx.mem, PAGES)?;
    let last = PAGES - 1;
    for calls in [Calls::Range, Calls::PerPage] {
        if calls == Calls::PerPage && PAGES == 1 {
            continue; // the same call as the range
        }
        let mut costs = [Cost::default(); 3];
        for _ in 0..REPS {
            timed(cx, &mut costs[0], Op::Map, calls, pfn, PAGES)?;
            expect_mapped(cx, pfn, 0, MAPPED)?;
            expect_mapped(cx, pfn, last, MAPPED)?;
            timed(cx, &mut costs[1], Op::Protect, calls, pfn, PAGES)?;
            expect_mapped(cx, pfn, 0, PROTECTED)?;
            expect_mapped(cx, pfn, last, PROTECTED)?;
            timed(cx, &mut costs[2], Op::Unmap, calls, pfn, PAGES)?;
            let va = BENCH_VA + last * PAGE_SIZE;
            check(
                cx.space.lookup(va) == Err(Error::NotMapped { va }),
                "page still mapped after unmap",
            )?;
        }
        for (op, cost) in Op::ALL.iter().zip(&costs) {
            report(cx.pv, *op, calls, PAGES, cost)?;
        }
    }
    Ok(())
}

/// Emits one operation's figures (natively: requires no hypercall).
fn report(pv: bool, op: Op, calls: Calls, pages: u64, cost: &Cost) -> TestResult {
    check_eq("samples per figure", cost.cycles.len() as u64, REPS as u64)?;
    let (op, how) = (op.name(), calls.name());
    let per_page = Per {
        total: cost.cycles.median(),
        count: pages,
    };
    emit(format_args!("{op}-{pages}-{how}"), per_page, "cycles/page");
    if !pv {
        return check_eq("native hypercalls", cost.hypercalls.median(), 0);
    }
    let count = calls.count(pages);
    emit(
        format_args!("{op}-{pages}-{how}-hypercalls"),
        Per {
            total: cost.hypercalls.median(),
            count,
        },
        "hypercalls/call",
    );
    emit(
        format_args!("{op}-{pages}-{how}-entries"),
        Per {
            total: cost.entries.median(),
            count,
        },
        "entries/call",
    );
    Ok(())
}

/// Translate of every page of a mapped run of `PAGES` pages, [`REPS`]
/// times.
pub fn translate<const PAGES: u64, B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = ram_run(&cx.mem, PAGES)?;
    map(cx, BENCH_VA, pfn, PAGES, MAPPED)?;
    let mut cycles = Samples::default();
    let mut wrong = 0u64;
    for _ in 0..REPS {
        let start = rdtsc();
        for k in 0..PAGES {
            match cx.space.lookup(BENCH_VA + k * PAGE_SIZE) {
                Ok(t) if t.pfn.0 == pfn.0 + k => {}
                _ => wrong += 1,
            }
        }
        cycles.push(rdtsc().wrapping_sub(start));
    }
    unmap(cx, BENCH_VA, PAGES)?;
    check_eq("wrong translations", wrong, 0)?;
    emit(
        format_args!("translate-{PAGES}"),
        Per {
            total: cycles.median(),
            count: PAGES,
        },
        "cycles/page",
    );
    Ok(())
}
