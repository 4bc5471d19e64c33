//! Self-tests that need several CPUs: the stale-translation test (the one
//! that matters for a page-table layer on SMP) for unmap and for a
//! read-write to read-only protect.
//!
//! CPU A (the test thread, pinned) maps a page of its own; a reader thread
//! pinned to CPU B touches it in a loop and tells A once one access went
//! through (so B's TLB holds the translation). A then unmaps it (or makes it
//! read-only) through the kernel space, which flushes every CPU, and only
//! after that call returned publishes "changed". From then on every access
//! B starts must fault; one that does not is a stale translation. A waits
//! for B to see the fault before the next round.
//!
//! Invariant: each test leaves the probe page unmapped, its frame back in
//! the pool, and its reader joined; on one CPU they are skipped (and say
//! so), not passed.

use core::sync::atomic::{AtomicU64, Ordering};

use pvmmu::entry::Flags;
use pvmmu::Pfn;

use crate::directmap::DirectMem;
use crate::kspace::{self, Fixmap};
use crate::sched::{self, ThreadId};
use crate::selftest::{check, check_eq, Failure, SelfTest, TestResult};
use crate::traps::{probe_read, probe_write, vector};
use crate::{clock, percpu, Kernel};

/// The suite (run after the CPUs are up).
pub const SUITE: &[SelfTest] = &[
    SelfTest::new("smp_no_stale_translation_after_unmap", stale_after_unmap),
    SelfTest::new("smp_no_stale_write_after_protect_ro", stale_after_protect),
];

/// Rounds of the unmap test and of the protect test (10,000 per boot).
pub const UNMAP_ROUNDS: u64 = 6_000;
/// See [`UNMAP_ROUNDS`].
pub const PROTECT_ROUNDS: u64 = 4_000;
/// A Xen domU's rounds are a tenth of that: there the test's two busy vCPUs
/// share the physical CPUs with dom0's, and a round costs about ten times
/// as much (measured: 6,000 unmap rounds in 53 s in the emulated `xl`
/// domU, 5 s as dom0).
const DOMU_DIVISOR: u64 = 10;
/// How long A waits for B in one round before calling it a failure.
const ROUND_TIMEOUT_NS: u64 = 2_000_000_000;

/// Round number the page is mapped for (B may read it); odd = unmapped
/// (or read-only) and flushed for round `PHASE / 2`.
static PHASE: AtomicU64 = AtomicU64::new(u64::MAX);
/// Last round B read (or wrote) successfully in the mapped phase.
static B_OK: AtomicU64 = AtomicU64::new(u64::MAX);
/// Last round B saw its access fault in the changed phase.
static B_FAULT: AtomicU64 = AtomicU64::new(u64::MAX);
/// Accesses B started after "changed" that did not fault.
static STALE: AtomicU64 = AtomicU64::new(0);
/// Faults B took in a mapped phase before its first success there (must
/// be 0: the map was complete before it was published).
static EARLY_FAULTS: AtomicU64 = AtomicU64::new(0);
/// Whether B writes (protect test) or reads (unmap test).
static WRITES: AtomicU64 = AtomicU64::new(0);
/// Set by A to stop B.
static STOP: AtomicU64 = AtomicU64::new(0);
/// Totals for the report.
static ROUNDS_DONE: AtomicU64 = AtomicU64::new(0);
static STALE_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Rounds run and stale accesses seen, over both tests.
pub fn totals() -> (u64, u64) {
    (
        ROUNDS_DONE.load(Ordering::Relaxed),
        STALE_TOTAL.load(Ordering::Relaxed),
    )
}

fn pattern(round: u64) -> u64 {
    0x5a5a_0000_0000_0000 ^ round
}

/// The reader/writer on CPU B.
fn prober(_: u64) -> u64 {
    let va = Fixmap::TlbProbe.va();
    let writes = WRITES.load(Ordering::Acquire) != 0;
    while STOP.load(Ordering::Acquire) == 0 {
        let phase = PHASE.load(Ordering::Acquire);
        if phase == u64::MAX {
            relax();
            continue;
        }
        let round = phase / 2;
        let changed = phase % 2 == 1;
        if changed && B_FAULT.load(Ordering::Acquire) == round {
            // This round's fault is recorded: stop touching the page until
            // A moves on (its next map must not be mistaken for stale).
            relax();
            continue;
        }
        // SAFETY: `va` is the probe page: mapped to a frame this test owns
        // (readable/writable) or unmapped/read-only; the fault is caught.
        let r = unsafe {
            if writes {
                probe_write(va, pattern(round)).map(|_| pattern(round))
            } else {
                probe_read(va)
            }
        };
        match (changed, r) {
            (false, Ok(v)) if v == pattern(round) => B_OK.store(round, Ordering::Release),
            (false, Ok(_)) => {}
            // A fault after this round's first success is the race with A's
            // change (A changes the page, then publishes); before it, A's
            // map was complete and published: the page must be there.
            (false, Err(_)) if B_OK.load(Ordering::Acquire) != round => {
                EARLY_FAULTS.fetch_add(1, Ordering::Relaxed);
            }
            (false, Err(_)) => {}
            (true, Ok(_)) => {
                STALE.fetch_add(1, Ordering::Relaxed);
            }
            (true, Err(f)) if f.vector == vector::PF => B_FAULT.store(round, Ordering::Release),
            (true, Err(_)) => {}
        }
    }
    0
}

/// Waits for `flag` to reach `round`; false on timeout.
fn wait_for(flag: &AtomicU64, round: u64) -> bool {
    let end = clock::now_ns() + ROUND_TIMEOUT_NS;
    while flag.load(Ordering::Acquire) != round {
        if clock::now_ns() > end {
            return false;
        }
        relax();
    }
    true
}

/// A busy wait's pause. (Giving the physical CPU back to Xen with
/// `SCHEDOP_yield` here was tried to spare dom0's vCPU in the `xl` run: it
/// made the domU's rounds 6x slower, 490,000 hypercalls, and is not done.)
fn relax() {
    core::hint::spin_loop();
}

fn run(writes: bool, domu: bool) -> TestResult {
    let cpus = percpu::online_count();
    if cpus < 2 {
        crate::kprintln!("selftest note: one CPU, no other CPU to hold a stale translation");
        return Ok(());
    }
    let va = Fixmap::TlbProbe.va();
    let frame: Pfn = kspace::take_frame().map_err(|_| Failure::Check("no frame for the probe"))?;
    // A on CPU 0, B on CPU 1.
    sched::pin_current(Some(0));
    for (flag, v) in [(&PHASE, u64::MAX), (&B_OK, u64::MAX), (&B_FAULT, u64::MAX)] {
        flag.store(v, Ordering::SeqCst);
    }
    STALE.store(0, Ordering::SeqCst);
    EARLY_FAULTS.store(0, Ordering::SeqCst);
    STOP.store(0, Ordering::SeqCst);
    WRITES.store(u64::from(writes), Ordering::SeqCst);
    let b: Result<ThreadId, _> = sched::spawn_on(1, "tlb-prober", prober, 0);
    let result = match b {
        Ok(b) => {
            let r = rounds(va, frame, writes, domu);
            STOP.store(1, Ordering::SeqCst);
            let joined = sched::join(b);
            r.and(
                joined
                    .map(|_| ())
                    .map_err(|_| Failure::Check("prober join")),
            )
        }
        Err(_) => Err(Failure::Check("cannot spawn the prober")),
    };
    sched::pin_current(None);
    let _ = kspace::unmap_page(va);
    let _ = kspace::give_frame(frame);
    result?;
    let stale = STALE.load(Ordering::SeqCst);
    STALE_TOTAL.fetch_add(stale, Ordering::Relaxed);
    check_eq("stale accesses after the change", stale, 0)?;
    check_eq(
        "faults while mapped",
        EARLY_FAULTS.load(Ordering::SeqCst),
        0,
    )
}

fn rounds(va: u64, frame: Pfn, writes: bool, domu: bool) -> TestResult {
    let rw = Flags::PRESENT | Flags::WRITABLE | Flags::NO_EXECUTE;
    let ro = Flags::PRESENT | Flags::NO_EXECUTE;
    let t0 = clock::now_ns();
    let n = if writes { PROTECT_ROUNDS } else { UNMAP_ROUNDS };
    let n = if domu { n / DOMU_DIVISOR } else { n };
    for round in 0..n {
        // The frame holds this round's pattern (through the direct map).
        // SAFETY: a pool frame we took: ours, mapped writable there.
        unsafe { core::ptr::write_volatile(DirectMem::va(frame) as *mut u64, pattern(round)) };
        kspace::map_page(va, frame, rw).map_err(|_| Failure::Check("map the probe page"))?;
        PHASE.store(2 * round, Ordering::Release);
        check(wait_for(&B_OK, round), "the other CPU accessed the page")?;
        let change = if writes {
            kspace::protect_page(va, ro)
        } else {
            kspace::unmap_page(va)
        };
        change.map_err(|_| Failure::Check("unmap/protect the probe page"))?;
        // Only now, with the flush complete on every CPU, is "changed" true.
        PHASE.store(2 * round + 1, Ordering::Release);
        check(
            wait_for(&B_FAULT, round),
            "the other CPU faulted after the change",
        )?;
        if writes {
            kspace::unmap_page(va).map_err(|_| Failure::Check("unmap after protect"))?;
        }
        ROUNDS_DONE.fetch_add(1, Ordering::Relaxed);
    }
    log::info!(
        "smp: {n} {} rounds in {} ms, {} stale",
        if writes { "RW->RO" } else { "unmap" },
        (clock::now_ns() - t0) / 1_000_000,
        STALE.load(Ordering::SeqCst)
    );
    Ok(())
}

fn is_domu(kernel: &Kernel) -> bool {
    kernel.pv.as_ref().is_some_and(|pv| !pv.is_dom0())
}

fn stale_after_unmap(kernel: &mut Kernel) -> TestResult {
    run(false, is_domu(kernel))
}

fn stale_after_protect(kernel: &mut Kernel) -> TestResult {
    run(true, is_domu(kernel))
}
