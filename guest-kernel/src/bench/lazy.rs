//! Lazy MMU mode (issue 11): 1,000 page updates (a map of one page each)
//! in the kernel space, in one lazy section ([`crate::lazy`]) against one
//! call at a time ([`kspace::map_page`], each with its TLB flush), with
//! and without preemption during the batch.
//!
//! Preemption is forced: the benchmark thread yields every
//! [`YIELD_EVERY`] updates while a partner thread on the same CPU is
//! ready, so each yield is a real switch (the switch hook closes the open
//! batch, the next update opens a new one). Without preemption no other
//! thread is ready, so the tick never switches. Everything runs pinned to
//! CPU 0, and the hypercalls are CPU 0's thread-code count (the partner
//! only yields and makes none).
//!
//! Each run checks its work: every page translates to its frame, the lazy
//! section was (or was not) preempted, and the hypercalls are the
//! design's. The pages are unmapped after each run (untimed) and the
//! kspace pool must end as full as it began.

use core::sync::atomic::{AtomicBool, Ordering};

use pvmmu::backend::DEFAULT_BATCH;
use pvmmu::entry::Flags;
use pvmmu::{Pfn, PAGE_SIZE};

use crate::kspace::{self, LazyOp};
use crate::lazy;
use crate::sched;
use crate::selftest::{check, check_eq, Failure, TestResult};
use crate::Kernel;

use super::cpa::OwnedRun;
use super::figure::REPS;
use super::meter::{Cost, Meter};

/// Updates per run.
pub const UPDATES: u64 = 1000;
/// Updates between two forced switches.
pub const YIELD_EVERY: u64 = 100;
/// Where the pages go: 6 GiB into the kernel space's slot, clear of its
/// stacks, fixmap, kmap windows and the lazy tests' area.
const BENCH_AREA: u64 = kspace::STACK_AREA + (6 << 30);
const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);

/// How a run makes its updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// One `kspace::map_page` per page (update and flush).
    OneAtATime,
    /// One lazy section around all of them.
    Lazy,
}

static PARTNER_STOP: AtomicBool = AtomicBool::new(false);

fn partner(_: u64) -> u64 {
    while !PARTNER_STOP.load(Ordering::Relaxed) {
        sched::yield_now();
    }
    0
}

fn kserr(what: &'static str) -> impl Fn(kspace::KspaceError) -> Failure {
    move |e| {
        log::error!("bench: {what}: {e:?}");
        Failure::Check(what)
    }
}

fn lzerr(what: &'static str) -> impl Fn(lazy::LazyError) -> Failure {
    move |e| {
        log::error!("bench: {what}: {e:?}");
        Failure::Check(what)
    }
}

fn va(k: u64) -> u64 {
    BENCH_AREA + k * PAGE_SIZE
}

/// One timed run of [`UPDATES`] maps; returns the cost and whether the
/// lazy section (if any) was preempted.
fn run(way: Way, first: Pfn, preempt: bool) -> Result<(super::meter::Sample, bool), Failure> {
    let m = Meter::start();
    let mut preempted = false;
    match way {
        Way::OneAtATime => {
            for k in 0..UPDATES {
                kspace::map_page(va(k), Pfn(first.0 + k), RO).map_err(kserr("map_page"))?;
                if preempt && (k + 1) % YIELD_EVERY == 0 {
                    sched::yield_now();
                }
            }
        }
        Way::Lazy => {
            let section = lazy::enter().map_err(lzerr("lazy enter"))?;
            for k in 0..UPDATES {
                let op = LazyOp::Map {
                    va: va(k),
                    pfn: Pfn(first.0 + k),
                    flags: RO,
                };
                section.apply(op).map_err(lzerr("lazy map"))?;
                if preempt && (k + 1) % YIELD_EVERY == 0 {
                    sched::yield_now();
                }
            }
            preempted = section.was_preempted();
            section.finish().map_err(lzerr("lazy finish"))?;
        }
    }
    Ok((m.stop()?, preempted))
}

/// Every page maps its frame; then all are unmapped (in one lazy section).
fn check_and_clear(first: Pfn) -> TestResult {
    let mut wrong = 0;
    for k in 0..UPDATES {
        match kspace::lookup(va(k)).map_err(kserr("lookup"))? {
            Some(t) if t.pfn.0 == first.0 + k => {}
            _ => wrong += 1,
        }
    }
    check_eq("pages not mapping their frame", wrong, 0)?;
    let section = lazy::enter().map_err(lzerr("lazy enter"))?;
    for k in 0..UPDATES {
        section
            .apply(LazyOp::Unmap { va: va(k) })
            .map_err(lzerr("lazy unmap"))?;
    }
    section.finish().map_err(lzerr("lazy finish"))?;
    let last = kspace::lookup(va(UPDATES - 1)).map_err(kserr("lookup"))?;
    check(last.is_none(), "a page still mapped after the unmap")
}

/// The four figures: `lazy-1000` and `single-1000`, each also
/// `-preempted`; cycles and (PV) hypercalls per 1,000 updates.
pub fn updates(kernel: &mut Kernel) -> TestResult {
    let pv = kernel.pv.is_some();
    let frames = OwnedRun::take(kernel, UPDATES)?;
    let first = Pfn(frames.first());
    let pool = kspace::pool_free();
    sched::pin_current(Some(0));
    let result = all_figures(pv, first);
    sched::pin_current(None);
    frames.give_back(kernel)?;
    result?;
    check_eq(
        "kspace pool after the runs",
        kspace::pool_free().unwrap_or(0) as u64,
        pool.unwrap_or(usize::MAX) as u64,
    )
}

fn all_figures(pv: bool, first: Pfn) -> TestResult {
    for preempt in [false, true] {
        let partner_id = if preempt {
            PARTNER_STOP.store(false, Ordering::Relaxed);
            Some(
                sched::spawn_on(0, "bench-partner", partner, 0).map_err(|e| {
                    log::error!("bench: partner thread: {e:?}");
                    Failure::Check("spawn the partner thread")
                })?,
            )
        } else {
            None
        };
        let result = ways(pv, first, preempt);
        PARTNER_STOP.store(true, Ordering::Relaxed);
        if let Some(id) = partner_id {
            check(sched::join(id) == Ok(0), "the partner thread ran")?;
        }
        result?;
    }
    Ok(())
}

/// The design's hypercalls for one run under PV: one at a time, each
/// update is one `mmu_update` and its flush one `mmuext_op`; a lazy batch
/// sends its entries in batches of [`DEFAULT_BATCH`] (the new tables'
/// hooks may add one) and the TLB flush it owes when it closes; every
/// forced switch closes the open batch, which costs at least one
/// hypercall, and the batch still saves most of them.
fn check_pv_hypercalls(way: Way, preempt: bool, hypercalls: u64) -> TestResult {
    let single = 2 * UPDATES;
    let lazy = UPDATES.div_ceil(DEFAULT_BATCH as u64) + 2;
    match (way, preempt) {
        (Way::OneAtATime, _) => check_eq("hypercalls one at a time", hypercalls, single),
        (Way::Lazy, false) => check(
            (1..=lazy).contains(&hypercalls),
            "hypercalls of a lazy batch: its batches and one flush",
        ),
        (Way::Lazy, true) => check(
            hypercalls > UPDATES / YIELD_EVERY && hypercalls < single / 10,
            "hypercalls of a preempted lazy batch: at least one per forced switch",
        ),
    }
}

fn ways(pv: bool, first: Pfn, preempt: bool) -> TestResult {
    let suffix = if preempt { "-preempted" } else { "" };
    for way in [Way::Lazy, Way::OneAtATime] {
        let mut cost = Cost::default();
        let switches0 = lazy::stats().switch_closes;
        for _ in 0..REPS {
            let (sample, preempted) = run(way, first, preempt)?;
            check_and_clear(first)?;
            if way == Way::Lazy {
                check(
                    preempted == preempt,
                    "the lazy section was preempted as asked",
                )?;
            }
            if pv {
                check_pv_hypercalls(way, preempt, sample.hypercalls)?;
            }
            cost.push(sample);
        }
        let closes = lazy::stats().switch_closes - switches0;
        let name = match way {
            Way::Lazy => "lazy",
            Way::OneAtATime => "single",
        };
        if way == Way::Lazy && preempt {
            // Every forced switch closed the open batch.
            check(
                closes >= REPS as u64 * (UPDATES / YIELD_EVERY),
                "the switch hook closed the batch at every forced switch",
            )?;
        }
        log::info!(
            "bench {name}-{UPDATES}{suffix}: hypercalls per run {:?}, batches closed at a switch {closes}",
            cost.hypercalls
        );
        cost.report(
            pv,
            format_args!("{name}-{UPDATES}{suffix}"),
            1,
            "1000 updates",
        )?;
    }
    Ok(())
}
