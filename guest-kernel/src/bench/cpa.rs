//! change_page_attr and the frame allocator (issue 12): `set_memory_ro` of
//! N pages of the direct map through the kernel's CPA
//! ([`kspace::change_page_attr`], the call every CPU's TLB answers to),
//! the cost of a split natively, and an alloc/free pair of the guest
//! frame allocator.
//!
//! The direct-map pages changed belong to a run of frames taken out of the
//! frame allocator for the benchmark (nobody else uses them) and given
//! back writable. Each run checks what it did: the pages changed, no split
//! (the bench boots' direct maps are 4 KiB), the first and last page
//! translate read-only at their own frame afterwards, writable again after
//! the restore; and the hypercalls are the design's: one `mmu_update` per
//! [`DEFAULT_BATCH`] entries and one `mmuext_op` for the TLB decision
//! (natively none).

use pvmmu::backend::DEFAULT_BATCH;
use pvmmu::entry::{Flags, HARDWARE_SET};
use pvmmu::space::CPA_TEST_BIT;
use pvmmu::{Granule, Pfn, PAGE_SIZE};

use crate::directmap::DirectMem;
use crate::frames::FrameRange;
use crate::kspace;
use crate::pvmmu_tests::{aligned_ram, failed, unmap, Cx, LiveBackend, TEST_AREA};
use crate::sched;
use crate::selftest::{check, check_eq, Failure, TestResult};
use crate::Kernel;

use super::figure::{emit_na, REPS};
use super::meter::{Cost, Meter, Sample};

/// The direct map's pages as the kernel keeps them.
const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);
const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);

/// A run of frames taken out of the allocator (given back by
/// [`OwnedRun::give_back`]).
pub struct OwnedRun {
    start: u64,
    pages: u64,
}

impl OwnedRun {
    /// The highest run of `pages` free frames, taken out of the allocator.
    pub fn take(kernel: &mut Kernel, pages: u64) -> Result<Self, Failure> {
        let range = kernel
            .frames
            .ranges()
            .iter()
            .rev()
            .find(|r| r.count() >= pages)
            .copied()
            .ok_or(Failure::Check("no run of free frames that long"))?;
        let start = range.end - pages;
        kernel
            .frames
            .reserve(start, range.end)
            .map_err(|_| Failure::Check("frame allocator: cannot take the run"))?;
        Ok(OwnedRun { start, pages })
    }

    /// The first frame.
    pub fn first(&self) -> u64 {
        self.start
    }

    /// The first page's direct-map address.
    pub fn va(&self) -> u64 {
        DirectMem::va(Pfn(self.start))
    }

    /// Gives the frames back.
    pub fn give_back(self, kernel: &mut Kernel) -> TestResult {
        let r = FrameRange {
            start: self.start,
            end: self.start + self.pages,
        };
        kernel
            .frames
            .add(r.start, r.end)
            .map_err(|_| Failure::Check("frame allocator: cannot give the run back"))
    }
}

fn kserr(what: &'static str) -> impl Fn(kspace::KspaceError) -> Failure {
    move |e| {
        log::error!("bench: {what}: {e:?}");
        Failure::Check(what)
    }
}

/// Requires page `k` of the run to translate to its own frame with `flags`.
fn expect_flags(run: &OwnedRun, k: u64, flags: Flags) -> TestResult {
    let t = kspace::translate(run.va() + k * PAGE_SIZE).map_err(kserr("translate"))?;
    check_eq("frame of a changed page", t.pfn.0, run.start + k)?;
    check_eq(
        "flags of a changed page",
        (t.flags - HARDWARE_SET).bits(),
        flags.bits(),
    )
}

/// Hypercalls of one CPA call over `pages` pages under PV: its entries in
/// batches of [`DEFAULT_BATCH`], then one `mmuext_op` (invlpg of each page
/// up to the threshold, a full flush above it; to every vCPU either way).
pub fn cpa_hypercalls(pages: u64) -> u64 {
    pages.div_ceil(DEFAULT_BATCH as u64) + 1
}

/// One `set_memory_ro` of the whole run, timed with preemption off, then
/// checked and restored (untimed).
pub fn ro_round(run: &OwnedRun) -> Result<Sample, Failure> {
    let len = run.pages * PAGE_SIZE;
    let (done, sample) = {
        let _p = sched::preempt_disable();
        let m = Meter::start();
        let done = kspace::change_page_attr(run.va(), len, Flags::empty(), Flags::WRITABLE);
        (done, m.stop()?)
    };
    let done = done.map_err(kserr("set_memory_ro"))?;
    check_eq("pages made read-only", done.pages_changed, run.pages)?;
    check_eq("splits of a 4 KiB direct map", u64::from(done.splits), 0)?;
    expect_flags(run, 0, RO)?;
    expect_flags(run, run.pages - 1, RO)?;
    let back = kspace::change_page_attr(run.va(), len, Flags::WRITABLE, Flags::empty())
        .map_err(kserr("set_memory_rw"))?;
    check_eq("pages made writable again", back.pages_changed, run.pages)?;
    expect_flags(run, 0, RW)?;
    expect_flags(run, run.pages - 1, RW)?;
    Ok(sample)
}

/// [`REPS`] rounds of [`ro_round`] over `pages` frames of the direct map.
pub fn ro_cost(kernel: &mut Kernel, pages: u64) -> Result<Cost, Failure> {
    let run = OwnedRun::take(kernel, pages)?;
    let mut cost = Cost::default();
    let mut result = Ok(());
    for _ in 0..REPS {
        match ro_round(&run) {
            Ok(s) => cost.push(s),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    run.give_back(kernel)?;
    result.map(|()| cost)
}

/// `set-memory-ro-<PAGES>`: cycles and hypercalls of one `set_memory_ro`
/// of `PAGES` pages of the direct map.
pub fn set_memory_ro<const PAGES: u64>(kernel: &mut Kernel) -> TestResult {
    let pv = kernel.pv.is_some();
    let cost = ro_cost(kernel, PAGES)?;
    if pv {
        cost.expect_hypercalls("set_memory_ro hypercalls", cpa_hypercalls(PAGES))?;
    }
    cost.report(pv, format_args!("set-memory-ro-{PAGES}"), 1, "call")
}

/// Where the split benchmark maps its 2 MiB page (a 2 MiB-aligned address
/// of the test area, clear of the space benchmarks' GiB).
const SPLIT_VA: u64 = TEST_AREA + (64 << 20);
/// The page of the 2 MiB page the call changes.
const SPLIT_PAGE: u64 = 7;

/// Under PV: no large pages, so no split to time (`n/a`).
pub fn split_pv<B: LiveBackend>(_: &mut Cx<'_, B>) -> TestResult {
    emit_na(format_args!("split-2m"), "cycles/call");
    emit_na(format_args!("split-2m-again"), "cycles/call");
    Ok(())
}

/// Natively: a 2 MiB page read-only over aligned RAM; `split-2m` is a CPA
/// call (CPA's software test bit, no effect on access) on one page of it,
/// which splits it (the new table, the write, a full flush);
/// `split-2m-again` is the same call on the page now split (no split), so
/// the split's own cost is the difference.
pub fn split_native<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = aligned_ram(&cx.mem, 512).ok_or(Failure::Check("no 2 MiB-aligned RAM"))?;
    let va = SPLIT_VA + SPLIT_PAGE * PAGE_SIZE;
    let (mut split, mut again) = (Cost::default(), Cost::default());
    for _ in 0..REPS {
        let f = cx
            .space
            .map_sized(SPLIT_VA, pfn, 2 << 20, RO, Granule::Size2MiB, false)
            .map_err(failed("2 MiB map"))?;
        cx.space.flush(f).map_err(failed("flush"))?;
        for (cost, splits, set, clear) in [
            (&mut split, 1, CPA_TEST_BIT, Flags::empty()),
            (&mut again, 0, Flags::empty(), CPA_TEST_BIT),
        ] {
            let m = Meter::start();
            let done = cx.space.change_page_attr_set_clr(va, PAGE_SIZE, set, clear);
            cost.push(m.stop()?);
            let done = done.map_err(failed("change_page_attr"))?;
            check_eq("splits", u64::from(done.splits), splits)?;
            check_eq("pages changed", done.pages_changed, 1)?;
            let t = cx.space.lookup(va).map_err(failed("translate"))?;
            check(
                t.granule == Granule::Size4KiB,
                "the page is 4 KiB after the split",
            )?;
            check_eq("frame after the split", t.pfn.0, pfn.0 + SPLIT_PAGE)?;
            check_eq(
                "flags after the change",
                (t.flags - HARDWARE_SET).bits(),
                (RO | set).bits(),
            )?;
        }
        let neighbour = cx.space.lookup(SPLIT_VA).map_err(failed("translate"))?;
        check_eq("a neighbour keeps its frame", neighbour.pfn.0, pfn.0)?;
        unmap(cx, SPLIT_VA, 512)?;
    }
    split.report(false, format_args!("split-2m"), 1, "call")?;
    again.report(false, format_args!("split-2m-again"), 1, "call")
}

/// A frame allocator as the benchmark drives it: one line per variant.
pub struct Allocator {
    /// The figure's name.
    pub name: &'static str,
    /// Takes one frame.
    pub alloc: fn(&mut Kernel) -> Option<Pfn>,
    /// Gives it back.
    pub free: fn(&mut Kernel, Pfn) -> TestResult,
    /// Hypercalls one pair must make under PV (at least, at most).
    pub pv_hypercalls: (u64, u64),
    /// Whether the allocator unmaps freed frames from the direct map
    /// (DEBUG_PAGEALLOC): then each run also checks that the frame is
    /// mapped while allocated and absent once freed.
    pub unmaps_freed: bool,
}

/// The plain guest frame allocator (lowest free frame first).
pub const PLAIN: Allocator = Allocator {
    name: "frame-alloc-free",
    alloc: |k| k.frames.allocate_lowest(),
    free: |k, pfn| {
        k.frames
            .try_free(pfn)
            .map_err(|_| Failure::Check("frame allocator refused a free"))
    },
    pv_hypercalls: (0, 0),
    unmaps_freed: false,
};

/// The same allocator with `pvmmu.debug_pagealloc` on: every allocation maps
/// the frame back into the direct map, every free unmaps it (one CPA call
/// each, a shootdown to the other CPUs). Under PV one hypercall each way:
/// the entry's `mmu_update` and the every-vCPU flush go in one multicall
/// (kspace runs the change in a lazy batch).
pub const PAGEALLOC: Allocator = Allocator {
    name: "frame-alloc-free-pagealloc",
    unmaps_freed: true,
    pv_hypercalls: (2, 2),
    ..PLAIN
};

/// Pairs timed per run.
const PAIRS: u64 = 1000;

/// `<name>`: cycles (and under PV hypercalls) per alloc/free pair of
/// `a`, [`PAIRS`] pairs a run. The frame is taken out of the free list by
/// the alloc and back in it after the free (checked on the first pair of
/// each run), and the free count is unchanged.
pub fn alloc_free(kernel: &mut Kernel, a: &Allocator) -> TestResult {
    let pv = kernel.pv.is_some();
    let free_before = kernel.frames.free_count();
    let mut cost = Cost::default();
    for _ in 0..REPS {
        let first = (a.alloc)(kernel).ok_or(Failure::Check("no frame"))?;
        check(
            !kernel.frames.is_free(first),
            "an allocated frame is not free",
        )?;
        let va = crate::directmap::DirectMem::va(first);
        if a.unmaps_freed {
            check(
                crate::kspace::translate(va).is_ok(),
                "an allocated frame is mapped in the direct map",
            )?;
        }
        (a.free)(kernel, first)?;
        check(kernel.frames.is_free(first), "a freed frame is free")?;
        if a.unmaps_freed {
            check(
                crate::kspace::translate(va).is_err(),
                "a freed frame is absent from the direct map",
            )?;
        }
        let _p = sched::preempt_disable();
        let m = Meter::start();
        for _ in 0..PAIRS {
            let pfn = (a.alloc)(kernel).ok_or(Failure::Check("no frame"))?;
            (a.free)(kernel, pfn)?;
        }
        cost.push(m.stop()?);
    }
    check_eq(
        "free frames after the pairs",
        kernel.frames.free_count(),
        free_before,
    )?;
    if pv {
        let (lo, hi) = a.pv_hypercalls;
        let got = cost.hypercalls.median();
        if got < lo * PAIRS || got > hi * PAIRS {
            log::error!(
                "{}: {got} hypercalls for {PAIRS} pairs, expected {}..={}",
                a.name,
                lo * PAIRS,
                hi * PAIRS
            );
            return Err(Failure::Check("alloc/free hypercalls"));
        }
    }
    cost.report(pv, format_args!("{}", a.name), PAIRS, "pair")
}
