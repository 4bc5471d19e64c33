//! Self-tests of DEBUG_PAGEALLOC (`crate::pagealloc`, boots with
//! `pvmmu.debug_pagealloc` only): free frames are absent from the direct
//! map, a frame is mapped back when it is handed out (one by one and as a
//! run) and unmapped when it comes back, and a touch of a freed frame
//! takes a not-present #PF that the kernel attributes to that frame
//! (caught here and counted); with several CPUs, a frame freed on CPU 0
//! faults on CPU 1, which held its translation a moment before (the free's
//! CPA call shoots the translation down everywhere).
//!
//! Invariant: every frame a test takes goes back to the allocator, and the
//! allocator's CPA calls never fail (`pagealloc::errors` stays 0).

use core::sync::atomic::{AtomicU64, Ordering};

use pvmmu::entry::Flags;
use pvmmu::{Error, Pfn};

use crate::directmap::DirectMem;
use crate::kspace::{self, KspaceError};
use crate::sched::{self, ThreadId};
use crate::selftest::{check, check_eq, Failure, Only, SelfTest, TestResult};
use crate::traps::{self, pf, probe_read, probe_write, vector};
use crate::{clock, pagealloc, percpu, Kernel};

/// The suite (run once the running kernel, and DEBUG_PAGEALLOC, are on).
pub const SUITE: &[SelfTest] = &[
    SelfTest::only(
        "pagealloc_free_frames_absent_use_after_free_faults",
        Only::DebugPagealloc,
        free_frames_absent,
    ),
    SelfTest::only(
        "pagealloc_free_on_one_cpu_faults_on_another",
        Only::DebugPagealloc,
        free_faults_on_other_cpu,
    ),
    SelfTest::only(
        "pagealloc_pv_pair_two_multicalls",
        Only::DebugPagealloc,
        pv_pair_two_multicalls,
    ),
];

static FAULTS: AtomicU64 = AtomicU64::new(0);

/// Use-after-free faults the tests expected and took.
pub fn faults_caught() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);

/// The page of `pfn` is absent from the direct map (the walk finds no
/// present leaf).
fn absent(pfn: u64) -> TestResult {
    match kspace::translate(DirectMem::va(Pfn(pfn))) {
        Err(KspaceError::Map(Error::NotMapped { .. })) => Ok(()),
        Ok(_) => Err(Failure::Check("a free frame is mapped in the direct map")),
        Err(_) => Err(Failure::Check("direct-map walk failed")),
    }
}

/// The page of `pfn` is mapped in the direct map, to `pfn`, writable.
fn present(pfn: u64) -> TestResult {
    let t = kspace::translate(DirectMem::va(Pfn(pfn)))
        .map_err(|_| Failure::Check("an allocated frame is not mapped in the direct map"))?;
    check_eq("direct map keeps the frame", t.pfn.0, pfn)?;
    check_eq(
        "direct-map flags of an allocated frame",
        (t.flags - Flags::GLOBAL).bits(),
        RW.bits(),
    )
}

/// The access `r` at `va` took a not-present #PF (`write` says which) that
/// the fault path attributes to frame `pfn`.
fn use_after_free_fault(r: Result<(), traps::Fault>, va: u64, pfn: u64, write: bool) -> TestResult {
    let f = match r {
        Ok(()) => return Err(Failure::Check("a freed frame was accessible")),
        Err(f) => f,
    };
    check_eq(
        "vector of the use after free",
        u64::from(f.vector),
        u64::from(vector::PF),
    )?;
    check_eq("cr2 of the use after free", f.cr2, va)?;
    let want = if write { pf::WRITE } else { 0 };
    check_eq(
        "error code (not present)",
        f.error_code & (pf::PRESENT | pf::WRITE),
        want,
    )?;
    check(
        pagealloc::use_after_free(f.cr2, f.error_code) == Some(pfn),
        "the fault is attributed to the freed frame",
    )?;
    FAULTS.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

fn free_frames_absent(kernel: &mut Kernel) -> TestResult {
    check(pagealloc::enabled(), "debug_pagealloc on")?;
    check(pagealloc::unmaps() > 0, "free frames were unmapped")?;
    check_eq("allocator CPA failures", pagealloc::errors(), 0)?;
    // The ends of every free range are absent.
    let ranges = kernel.frames.ranges();
    check(!ranges.is_empty(), "free frames exist")?;
    for r in ranges.iter().take(16) {
        absent(r.start)?;
        absent(r.end - 1)?;
    }
    // One frame: mapped when handed out, absent again once freed.
    let pfn = kernel
        .frames
        .allocate_lowest()
        .ok_or(Failure::Check("no free frame"))?
        .0;
    let va = DirectMem::va(Pfn(pfn));
    let used = present(pfn).and_then(|()| {
        // SAFETY: the frame is ours (just allocated) and mapped writable.
        unsafe { probe_write(va + 8, 0xfeed_f00d) }
            .map_err(|_| Failure::Check("write to an allocated frame faulted"))?;
        // SAFETY: as above.
        let back = unsafe { probe_read(va + 8) }.unwrap_or(0);
        check_eq("allocated frame holds what was written", back, 0xfeed_f00d)
    });
    let freed = kernel.frames.try_free(Pfn(pfn));
    used?;
    freed.map_err(|_| Failure::Check("free refused"))?;
    absent(pfn)?;
    check(
        pagealloc::maps() > 0,
        "frames were mapped back at allocation",
    )?;
    // SAFETY: a read of a frame we freed: must fault (caught by the probe).
    use_after_free_fault(
        unsafe { probe_read(va + 8) }.map(|_| ()),
        va + 8,
        pfn,
        false,
    )?;
    // SAFETY: a write to a frame we freed: must fault, and change nothing.
    use_after_free_fault(unsafe { probe_write(va + 16, 0xdead) }, va + 16, pfn, true)?;
    // A run taken out of the free list and given back.
    let run = kernel
        .frames
        .ranges()
        .iter()
        .find(|r| r.count() >= 3)
        .map(|r| r.start)
        .ok_or(Failure::Check("no free run of 3 frames"))?;
    kernel
        .frames
        .reserve(run, run + 3)
        .map_err(|_| Failure::Check("reserve of a free run refused"))?;
    let mapped = (run..run + 3).try_for_each(present);
    let back = kernel.frames.add(run, run + 3);
    mapped?;
    back.map_err(|_| Failure::Check("a run given back was refused"))?;
    (run..run + 3).try_for_each(absent)?;
    check_eq("allocator CPA failures", pagealloc::errors(), 0)
}

// ---- the frame freed on one CPU, touched on another ------------------------

/// Rounds of the cross-CPU test.
const ROUNDS: u64 = 200;
/// How long CPU 0 waits for CPU 1 in one round.
const ROUND_TIMEOUT_NS: u64 = 2_000_000_000;

/// `2 * round` while the round's frame is allocated (mapped), `2 * round +
/// 1` once it was freed (unmapped, every CPU flushed).
static PHASE: AtomicU64 = AtomicU64::new(u64::MAX);
/// The round's frame's direct-map address.
static PROBE_VA: AtomicU64 = AtomicU64::new(0);
/// Last round CPU 1 read the frame's pattern.
static B_OK: AtomicU64 = AtomicU64::new(u64::MAX);
/// Last round CPU 1 saw the freed frame fault.
static B_FAULT: AtomicU64 = AtomicU64::new(u64::MAX);
/// Reads after the free that did not fault.
static STALE: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicU64 = AtomicU64::new(0);

fn pattern(round: u64) -> u64 {
    0xa110_c000_0000_0000 ^ round
}

/// CPU 1: reads the round's frame until it sees the pattern (its TLB now
/// holds the translation), then, once freed, until the read faults.
fn reader(_: u64) -> u64 {
    while STOP.load(Ordering::Acquire) == 0 {
        let phase = PHASE.load(Ordering::Acquire);
        if phase == u64::MAX {
            core::hint::spin_loop();
            continue;
        }
        let (round, freed) = (phase / 2, phase % 2 == 1);
        let seen = if freed { &B_FAULT } else { &B_OK };
        if seen.load(Ordering::Acquire) == round {
            core::hint::spin_loop();
            continue;
        }
        let va = PROBE_VA.load(Ordering::Acquire);
        // SAFETY: the frame is the test's (allocated) or free and absent
        // from the direct map; a fault is caught by the probe.
        match (freed, unsafe { probe_read(va) }) {
            (false, Ok(v)) if v == pattern(round) => B_OK.store(round, Ordering::Release),
            (true, Ok(_)) => {
                STALE.fetch_add(1, Ordering::Relaxed);
            }
            (true, Err(f)) if f.vector == vector::PF && f.cr2 == va => {
                FAULTS.fetch_add(1, Ordering::Relaxed);
                B_FAULT.store(round, Ordering::Release);
            }
            _ => {}
        }
    }
    0
}

fn wait_for(flag: &AtomicU64, round: u64) -> TestResult {
    let end = clock::now_ns() + ROUND_TIMEOUT_NS;
    while flag.load(Ordering::Acquire) != round {
        if clock::now_ns() > end {
            return Err(Failure::Check("the other CPU did not answer in 2 s"));
        }
        core::hint::spin_loop();
    }
    Ok(())
}

fn free_faults_on_other_cpu(kernel: &mut Kernel) -> TestResult {
    if percpu::online_count() < 2 {
        crate::kprintln!("selftest note: one CPU, no other CPU to hold the freed frame");
        return Ok(());
    }
    for (flag, v) in [(&PHASE, u64::MAX), (&B_OK, u64::MAX), (&B_FAULT, u64::MAX)] {
        flag.store(v, Ordering::SeqCst);
    }
    STALE.store(0, Ordering::SeqCst);
    STOP.store(0, Ordering::SeqCst);
    sched::pin_current(Some(0));
    let b: Result<ThreadId, _> = sched::spawn_on(1, "pagealloc-reader", reader, 0);
    let result = match b {
        Ok(b) => {
            let r = rounds(kernel);
            STOP.store(1, Ordering::SeqCst);
            let joined = sched::join(b).map(|_| ());
            r.and(joined.map_err(|_| Failure::Check("reader join")))
        }
        Err(_) => Err(Failure::Check("cannot spawn the reader")),
    };
    sched::pin_current(None);
    result?;
    check_eq(
        "reads of a freed frame that did not fault",
        STALE.load(Ordering::SeqCst),
        0,
    )?;
    check_eq("allocator CPA failures", pagealloc::errors(), 0)
}

fn rounds(kernel: &mut Kernel) -> TestResult {
    for round in 0..ROUNDS {
        let pfn = kernel
            .frames
            .allocate_lowest()
            .ok_or(Failure::Check("no free frame"))?;
        let va = DirectMem::va(pfn);
        // SAFETY: the frame is ours, mapped back writable at allocation.
        let wrote = unsafe { probe_write(va, pattern(round)) };
        PROBE_VA.store(va, Ordering::Release);
        PHASE.store(2 * round, Ordering::Release);
        let seen = wrote
            .map_err(|_| Failure::Check("write to an allocated frame faulted"))
            .and_then(|()| wait_for(&B_OK, round));
        // Freed while CPU 1 holds the translation: the free's CPA call
        // returns only after every CPU flushed it.
        kernel
            .frames
            .try_free(pfn)
            .map_err(|_| Failure::Check("free refused"))?;
        seen?;
        PHASE.store(2 * round + 1, Ordering::Release);
        wait_for(&B_FAULT, round)?;
    }
    Ok(())
}

/// `pvmmu.crash=use-after-free`: a frame is allocated, written, freed and
/// read again through the direct map; the #PF is fatal and its report
/// names the address and the frame.
pub fn crash_use_after_free(kernel: &mut Kernel) {
    let Some(pfn) = kernel.frames.allocate_lowest() else {
        log::error!("use-after-free crash: no free frame");
        return;
    };
    let va = DirectMem::va(pfn) + 0x80;
    // SAFETY: the frame is ours and mapped writable.
    unsafe { core::ptr::write_volatile(va as *mut u64, 0x0bad_f00d) };
    if kernel.frames.try_free(pfn).is_err() {
        log::error!("use-after-free crash: free refused");
        return;
    }
    log::warn!("reading freed frame {pfn:?} at {va:#x}");
    // SAFETY: deliberately reads a freed frame: under DEBUG_PAGEALLOC it is
    // absent and the fault is fatal (the handler does not return).
    let v = unsafe { core::ptr::read_volatile(va as *const u64) };
    log::error!("read of a freed frame returned {v:#x}: not unmapped");
}

// ---- the hypercalls of an alloc/free pair under PV ---------------------------

/// Pairs counted by [`pv_pair_two_multicalls`].
const COUNTED_PAIRS: u64 = 100;

/// Under Xen PV (natively it passes without a check): an allocation and a
/// free under DEBUG_PAGEALLOC cost one hypercall each, a multicall whose
/// `mmu_update` carries the entry and whose `mmuext_op` carries the flush
/// of every vCPU (`kspace::direct_map_present` / `direct_map_absent` run
/// in a lazy batch): [`COUNTED_PAIRS`] pairs with interrupts off (the tick
/// makes hypercalls of its own) make exactly 2 hypercalls each on this
/// CPU (its thread count, `percpu::hypercalls_of`: the other CPUs' ticks
/// and idle blocks are not in it), one for the allocation, and the frame
/// is absent once freed. With one CPU online the global counters must
/// also show 2 multicalls, 2 `mmu_update` entries and 2 extended ops per
/// pair (with more, the others' hypercalls are in them: only logged).
fn pv_pair_two_multicalls(kernel: &mut Kernel) -> TestResult {
    if kernel.pv.is_none() {
        return Ok(());
    }
    let _irqs = crate::irq::save();
    let cpu = percpu::cpu_id();
    let mine = || percpu::hypercalls_of(cpu).1;
    let (before, calls0) = (hypercall::mmu::issued_stats(), mine());
    let mut checked = Ok(());
    for i in 0..COUNTED_PAIRS {
        let pfn = kernel
            .frames
            .allocate_lowest()
            .ok_or(Failure::Check("no free frame"))?;
        if i == 0 {
            checked = check_eq("hypercalls of one allocation", mine() - calls0, 1);
        }
        kernel
            .frames
            .try_free(pfn)
            .map_err(|_| Failure::Check("free refused"))?;
        if i == 0 {
            checked = checked.and_then(|()| absent(pfn.0));
        }
    }
    let (after, calls) = (hypercall::mmu::issued_stats(), mine() - calls0);
    checked?;
    log::info!(
        "pagealloc: {COUNTED_PAIRS} alloc/free pairs, {calls} hypercalls on cpu {cpu}; all CPUs: \
         {} multicalls, {} mmu_update entries, {} mmuext ops",
        after.multicalls - before.multicalls,
        after.mmu_update_entries - before.mmu_update_entries,
        after.mmuext_ops - before.mmuext_ops
    );
    check_eq("hypercalls per pair (x100)", calls, 2 * COUNTED_PAIRS)?;
    if percpu::online_count() == 1 {
        check_eq(
            "multicalls per pair (x100)",
            after.multicalls - before.multicalls,
            2 * COUNTED_PAIRS,
        )?;
        check_eq(
            "mmu_update entries per pair (x100)",
            after.mmu_update_entries - before.mmu_update_entries,
            2 * COUNTED_PAIRS,
        )?;
        check_eq(
            "mmuext ops per pair (x100)",
            after.mmuext_ops - before.mmuext_ops,
            2 * COUNTED_PAIRS,
        )?;
    }
    check_eq("allocator CPA failures", pagealloc::errors(), 0)
}
