//! kmap (issue 13): a kmap/release pair ([`crate::kmap::kmap_local`] and
//! the guard's release), and what a context switch costs with 0, 1 and 4
//! live kmaps per thread (the switch hook unmaps the outgoing thread's
//! slots and maps the incoming thread's).
//!
//! Design counts, checked: under PV a pair is two `update_va_mapping`
//! hypercalls (map, unmap) and a switch between two threads holding `n`
//! kmaps each is `n` (each slot rewritten once, to the incoming thread's
//! frame); natively none. The hook must have remapped `n` slots per
//! switch.
//!
//! The switch figure is measured inside one of two threads pinned to
//! CPU 0 that yield to each other: from the moment both hold their kmaps
//! until the measuring thread's last yield, while the other is still
//! yielding, so every switch in the window is between the two. Cycles and
//! hypercalls are divided by the switches CPU 0 made in the window.

use core::sync::atomic::{AtomicU64, Ordering};

use pvmmu::entry::Flags;
use pvmmu::Pfn;

use crate::directmap::DirectMem;
use crate::kmap::{self, kmap_local, KmapGuard};
use crate::percpu;
use crate::selftest::{check, check_eq, Failure, TestResult};
use crate::{kspace, sched, Kernel};

use super::figure::REPS;
use super::meter::{Cost, Meter};

const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);
/// Pairs per run.
const PAIRS: u64 = 1000;
/// Yields of the measuring thread per run.
const YIELDS: u64 = 200;
/// Yields the other thread makes beyond those (it outlives the window).
const EXTRA_YIELDS: u64 = 20;
/// Most live kmaps per thread measured.
const MAX_LIVE: usize = 4;

fn kserr(e: kspace::KspaceError) -> Failure {
    log::error!("bench: kspace: {e:?}");
    Failure::Check("a frame from the kspace pool")
}

fn kmerr(e: kmap::KmapError) -> Failure {
    log::error!("bench: kmap: {e}");
    Failure::Check("kmap")
}

/// `kmap-pair`: cycles and (PV) hypercalls per kmap/release pair.
pub fn pair(kernel: &mut Kernel) -> TestResult {
    let pv = kernel.pv.is_some();
    let frame = kspace::take_frame().map_err(kserr)?;
    sched::pin_current(Some(0));
    let result = pairs(frame);
    sched::pin_current(None);
    kspace::give_frame(frame).map_err(kserr)?;
    let cost = result?;
    if pv {
        cost.expect_hypercalls("kmap pair hypercalls", 2 * PAIRS)?;
    }
    cost.report(pv, format_args!("kmap-pair"), PAIRS, "pair")
}

fn pairs(frame: Pfn) -> Result<Cost, Failure> {
    // SAFETY: a pool frame lent to this benchmark, mapped in the direct map.
    let word = unsafe { core::ptr::read_volatile(DirectMem::va(frame) as *const u64) };
    let mut cost = Cost::default();
    for _ in 0..REPS {
        let mut g = kmap_local(frame, RO).map_err(kmerr)?;
        check_eq(
            "word read through the kmap",
            g.read_u64(0).map_err(kmerr)?,
            word,
        )?;
        g.try_release().map_err(kmerr)?;
        let m = Meter::start();
        for _ in 0..PAIRS {
            let mut g = kmap_local(frame, RO).map_err(kmerr)?;
            g.try_release().map_err(kmerr)?;
        }
        cost.push(m.stop()?);
    }
    Ok(cost)
}

static FRAME: AtomicU64 = AtomicU64::new(0);
static READY: AtomicU64 = AtomicU64::new(0);
/// The measuring thread's window: cycles, hypercalls, switches, remaps;
/// `u64::MAX` in the first on failure.
static WINDOW: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// One of the two threads: holds `live` kmaps; the one with `measure`
/// records its window.
fn switcher(arg: u64) -> u64 {
    let (live, measure) = ((arg & 0xff) as usize, arg & 0x100 != 0);
    let mut held: [Option<KmapGuard>; MAX_LIVE] = [const { None }; MAX_LIVE];
    for h in held.iter_mut().take(live) {
        match kmap_local(Pfn(FRAME.load(Ordering::Relaxed)), RO) {
            Ok(g) => *h = Some(g),
            Err(_) => return 1,
        }
    }
    READY.fetch_add(1, Ordering::SeqCst);
    while READY.load(Ordering::SeqCst) < 2 {
        sched::yield_now();
    }
    if measure {
        let switches = || percpu::CPUS[0].switches.load(Ordering::Relaxed);
        let (s0, r0) = (switches(), kmap::stats().switch_remaps);
        let m = Meter::start();
        for _ in 0..YIELDS {
            sched::yield_now();
        }
        let Ok(sample) = m.stop() else { return 2 };
        WINDOW[0].store(sample.cycles, Ordering::Relaxed);
        WINDOW[1].store(sample.hypercalls, Ordering::Relaxed);
        WINDOW[2].store(switches() - s0, Ordering::Relaxed);
        WINDOW[3].store(kmap::stats().switch_remaps - r0, Ordering::Relaxed);
    } else {
        for _ in 0..YIELDS + EXTRA_YIELDS {
            sched::yield_now();
        }
    }
    for h in held.iter_mut().rev() {
        drop(h.take());
    }
    0
}

/// `kmap-switch-<n>live`: cycles and (PV) hypercalls per switch between
/// two threads holding `LIVE` kmaps each.
pub fn switch<const LIVE: usize>(kernel: &mut Kernel) -> TestResult {
    let pv = kernel.pv.is_some();
    FRAME.store(kspace::take_frame().map_err(kserr)?.0, Ordering::Relaxed);
    let mut cost = Cost::default();
    let mut result = Ok(());
    for _ in 0..REPS {
        match switch_run(LIVE as u64) {
            Ok((cycles, hypercalls)) => cost.push(super::meter::Sample { cycles, hypercalls }),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    kspace::give_frame(Pfn(FRAME.load(Ordering::Relaxed))).map_err(kserr)?;
    result?;
    if pv {
        // Per switch, scaled by 1,000 (see `switch_run`).
        cost.expect_hypercalls("kmap switch hypercalls", 1000 * LIVE as u64)?;
    }
    cost.report(pv, format_args!("kmap-switch-{LIVE}live"), 1000, "switch")
}

/// One window: (cycles, hypercalls) per switch, times 1,000 (so that the
/// median keeps a decimal).
fn switch_run(live: u64) -> Result<(u64, u64), Failure> {
    READY.store(0, Ordering::SeqCst);
    WINDOW[0].store(u64::MAX, Ordering::Relaxed);
    let a = sched::spawn_on(0, "bench-kmap-a", switcher, live | 0x100);
    let b = sched::spawn_on(0, "bench-kmap-b", switcher, live);
    let ra = a.and_then(sched::join);
    let rb = b.and_then(sched::join);
    check(ra == Ok(0) && rb == Ok(0), "the switching threads ran")?;
    let [cycles, hypercalls, switches, remaps] =
        WINDOW.each_ref().map(|w| w.load(Ordering::Relaxed));
    check(cycles != u64::MAX, "the window was measured")?;
    check(switches >= YIELDS, "every yield switched")?;
    check_eq("slots remapped in the window", remaps, live * switches)?;
    let expected = if crate::platform::is_xen_pv() {
        live * switches
    } else {
        0
    };
    check_eq("hypercalls in the window", hypercalls, expected)?;
    Ok((cycles * 1000 / switches, hypercalls * 1000 / switches))
}
