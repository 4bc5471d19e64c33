//! Self-tests of lazy MMU mode in the running kernel ([`crate::lazy`]):
//! readers, flushes and nesting; the batch sent at a switch; an interrupt
//! handler changing the kernel space inside a thread's lazy section; and a
//! stress of preempted (and, with SMP, migrated) batches, each verified
//! entry by entry through pvmmu and through a real access.
//!
//! Invariant: every test gives back the pool frames it took, leaves its
//! part of [`LAZY_AREA`] unmapped, clears the tick hook and joins its
//! threads.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use pvmmu::entry::Flags;
use pvmmu::Pfn;

use crate::directmap::DirectMem;
use crate::kspace::{self, LazyOp};
use crate::lazy::{self, LAZY_AREA};
use crate::selftest::{check, check_eq, Failure, SelfTest, TestResult};
use crate::traps::{probe_read, probe_write};
use crate::{clock, percpu, platform, sched, timer, Kernel};

/// The suite (run after [`crate::running::start`]).
pub const SUITE: &[SelfTest] = &[
    SelfTest::new("lazy_readers_flush_and_nesting", readers_flush_nesting),
    SelfTest::new("lazy_switch_sends_the_batch", switch_sends_batch),
    SelfTest::new("lazy_interrupt_handler_updates_in_order", handler_in_order),
    SelfTest::new("lazy_stress_preempted_batches", stress),
];

const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);
const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);

fn kerr(what: &'static str) -> impl Fn(lazy::LazyError) -> Failure {
    move |e| {
        log::error!("{what}: {e:?}");
        Failure::Check(what)
    }
}

fn kserr(what: &'static str) -> impl Fn(kspace::KspaceError) -> Failure {
    move |e| {
        log::error!("{what}: {e:?}");
        Failure::Check(what)
    }
}

/// Fills `pfn` (through the direct map) with `pattern`'s first word.
fn stamp(pfn: Pfn, pattern: u64) {
    // SAFETY: a pool frame this test owns and maps nowhere writable but
    // the direct map and its own test address.
    unsafe { core::ptr::write_volatile(DirectMem::va(pfn) as *mut u64, pattern) };
}

/// A real read of `va`: `Some(value)` or `None` if it faults.
fn read(va: u64) -> Option<u64> {
    // SAFETY: `va` is in the lazy area: RAM mapped by these tests, or
    // nothing.
    unsafe { probe_read(va) }.ok()
}

fn pfn_at(va: u64) -> Result<Option<(Pfn, Flags)>, Failure> {
    Ok(lazy::lookup(va)
        .map_err(kerr("lookup"))?
        .map(|t| (t.pfn, t.flags)))
}

fn take(n: usize, out: &mut [Pfn]) -> TestResult {
    for f in out.iter_mut().take(n) {
        *f = kspace::take_frame().map_err(kserr("take a pool frame"))?;
    }
    Ok(())
}

fn give(frames: &[Pfn]) -> TestResult {
    for &f in frames {
        kspace::give_frame(f).map_err(kserr("give a pool frame"))?;
    }
    Ok(())
}

/// Whether writes stay queued in a batch here (Xen PV; natively stores
/// are immediate).
fn queues() -> bool {
    platform::is_xen_pv()
}

/// Readers see queued writes; an inner section's end sends nothing; a
/// flush sends the batch; the outermost end sends the rest and the TLB
/// flushes it owes.
fn readers_flush_nesting(_: &mut Kernel) -> TestResult {
    let va = [LAZY_AREA, LAZY_AREA + 4096];
    let mut f = [Pfn(0); 2];
    take(2, &mut f)?;
    stamp(f[0], 0x1a2_0000);
    stamp(f[1], 0x1a2_0001);
    let r = readers_body(va, f);
    give(&f)?;
    r
}

fn readers_body(va: [u64; 2], f: [Pfn; 2]) -> TestResult {
    let b0 = lazy::stats().batches;
    let outer = lazy::enter().map_err(kerr("enter"))?;
    {
        // No switch in here: the batch stays open while we look.
        let _p = sched::preempt_disable();
        let q = outer
            .apply(LazyOp::Map {
                va: va[0],
                pfn: f[0],
                flags: RW,
            })
            .map_err(kerr("lazy map"))?;
        check(lazy::active(), "lazy mode reads as on in the thread")?;
        check_eq(
            "pvmmu sees the queued entry",
            pfn_at(va[0])?.map_or(0, |p| p.0 .0),
            f[0].0,
        )?;
        if queues() {
            check(q > 0, "PV: the map is queued")?;
            check(
                read(va[0]).is_none(),
                "PV: the queued entry is not live yet",
            )?;
        }
        let inner = lazy::enter().map_err(kerr("nested enter"))?;
        inner
            .apply(LazyOp::Map {
                va: va[1],
                pfn: f[1],
                flags: RW,
            })
            .map_err(kerr("nested map"))?;
        inner.finish().map_err(kerr("nested finish"))?;
        let pending = kspace::pending_writes().map_err(kserr("pending"))?;
        if queues() {
            check(pending > q, "PV: an inner section's end sends nothing")?;
            check(
                read(va[1]).is_none(),
                "PV: the nested entry is not live yet",
            )?;
        }
        outer.flush().map_err(kerr("flush"))?;
        check_eq(
            "a flush sends the batch",
            kspace::pending_writes().map_err(kserr("pending"))? as u64,
            0,
        )?;
        check_eq("live after the flush", read(va[0]).unwrap_or(0), 0x1a2_0000)?;
        check_eq(
            "nested entry live after the flush",
            read(va[1]).unwrap_or(0),
            0x1a2_0001,
        )?;
        outer
            .apply(LazyOp::Unmap { va: va[0] })
            .map_err(kerr("lazy unmap"))?;
        outer
            .apply(LazyOp::Unmap { va: va[1] })
            .map_err(kerr("lazy unmap"))?;
        check(pfn_at(va[0])?.is_none(), "pvmmu sees the queued unmap")?;
    }
    outer.finish().map_err(kerr("finish"))?;
    check_eq(
        "the end sends the batch",
        kspace::pending_writes().map_err(kserr("pending"))? as u64,
        0,
    )?;
    check(
        read(va[0]).is_none() && read(va[1]).is_none(),
        "unmapped and flushed at the end",
    )?;
    check(!lazy::active(), "lazy mode off after the outermost end")?;
    check_eq("one batch counted", lazy::stats().batches - b0, 1)?;
    Ok(())
}

static YIELDED: AtomicBool = AtomicBool::new(false);
/// What the other thread saw: 1 = the page live and no batch open.
static SEEN: AtomicU64 = AtomicU64::new(0);
static SWITCH_VA: AtomicU64 = AtomicU64::new(0);

fn observer(_: u64) -> u64 {
    while !YIELDED.load(Ordering::Acquire) {
        sched::yield_now();
    }
    let va = SWITCH_VA.load(Ordering::Relaxed);
    let live = read(va) == Some(0x5a17_c400);
    let queued = kspace::pending_writes().map_or(usize::MAX, |n| n);
    let open = kspace::lazy_owner().map_or(true, |o| o.is_some());
    SEEN.store(
        u64::from(live && queued == 0 && !open) | 2,
        Ordering::Release,
    );
    0
}

/// A thread that yields inside its lazy section has its batch sent at the
/// switch: the next thread on the CPU sees the entry live (a real access)
/// with nothing queued and no batch open; the section then continues and counts as
/// preempted.
fn switch_sends_batch(_: &mut Kernel) -> TestResult {
    let cpu = percpu::cpu_id();
    sched::pin_current(Some(cpu));
    let mut f = [Pfn(0); 2];
    take(2, &mut f)?;
    stamp(f[0], 0x5a17_c400);
    stamp(f[1], 0x5a17_c401);
    let r = switch_body(cpu, f);
    sched::pin_current(None);
    give(&f)?;
    r
}

fn switch_body(cpu: usize, f: [Pfn; 2]) -> TestResult {
    let va = LAZY_AREA + 0x10_0000;
    SWITCH_VA.store(va, Ordering::Relaxed);
    YIELDED.store(false, Ordering::Relaxed);
    SEEN.store(0, Ordering::Relaxed);
    let other = sched::spawn_on(cpu, "lazy-observer", observer, 0)
        .map_err(|_| Failure::Check("spawn the observer"))?;
    let sec = lazy::enter().map_err(kerr("enter"))?;
    {
        let _p = sched::preempt_disable();
        sec.apply(LazyOp::Map {
            va,
            pfn: f[0],
            flags: RW,
        })
        .map_err(kerr("lazy map"))?;
        if queues() {
            check(read(va).is_none(), "PV: queued before the switch")?;
        }
        YIELDED.store(true, Ordering::Release);
    }
    let end = clock::now_ns() + 5_000_000_000;
    while SEEN.load(Ordering::Acquire) == 0 && clock::now_ns() < end {
        sched::yield_now();
    }
    check(sec.was_preempted(), "the section was switched out")?;
    check_eq(
        "the next thread saw the batch sent",
        SEEN.load(Ordering::Acquire),
        3,
    )?;
    sec.apply(LazyOp::Map {
        va: va + 4096,
        pfn: f[1],
        flags: RW,
    })
    .map_err(kerr("map after the switch"))?;
    check_eq(
        "own entry after the switch",
        pfn_at(va)?.map_or(0, |p| p.0 .0),
        f[0].0,
    )?;
    sec.apply(LazyOp::Unmap { va }).map_err(kerr("unmap"))?;
    sec.apply(LazyOp::Unmap { va: va + 4096 })
        .map_err(kerr("unmap"))?;
    sec.finish().map_err(kerr("finish"))?;
    sched::join(other).map_err(|_| Failure::Check("join the observer"))?;
    check(read(va).is_none(), "unmapped at the end")?;
    Ok(())
}

/// The CPU the handler test's thread runs on (`usize::MAX`: hook idle).
static H_CPU: AtomicUsize = AtomicUsize::new(usize::MAX);
static H_THREAD_VA: AtomicU64 = AtomicU64::new(0);
static H_VA: AtomicU64 = AtomicU64::new(0);
static H_PFN: AtomicU64 = AtomicU64::new(0);
/// Bit 0: done; bit 1: lazy mode read as off; bit 2: the thread was this
/// CPU's lazy thread; bit 3: the thread's queued entry was live before the
/// handler's own; bit 4: the handler's map was live at once; bit 5: its
/// unmap was too; bit 6: its unmap of the thread's second queued entry
/// left that page unmapped (it went out after the thread's map of it).
static H_RESULT: AtomicU64 = AtomicU64::new(0);
static H_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Where the thread's second entry lies, from its first.
const H_SHARED_OFFSET: u64 = 2 * 4096;

fn handler_hook() {
    if percpu::cpu_id() != H_CPU.load(Ordering::Acquire)
        || H_RESULT.load(Ordering::Acquire) & 1 != 0
    {
        return;
    }
    let mut bits = 0u64;
    if !lazy::active() {
        bits |= 2;
    }
    let irqs = crate::irq::save();
    if lazy::CpuLocal::with_irqs_off(&irqs).lazy_thread().is_some() {
        bits |= 4;
    }
    let va = H_VA.load(Ordering::Relaxed);
    let pfn = Pfn(H_PFN.load(Ordering::Relaxed));
    match kspace::try_apply_now(LazyOp::Map { va, pfn, flags: RW }) {
        Ok(None) => return, // the lock is busy: try at the next tick
        Ok(Some(())) => {}
        Err(_) => {
            H_ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
    if read(H_THREAD_VA.load(Ordering::Relaxed)) == Some(0x1e_0001) {
        bits |= 8;
    }
    if read(va) == Some(0x1e_0002) {
        bits |= 16;
    }
    loop {
        match kspace::try_apply_now(LazyOp::Unmap { va }) {
            Ok(None) => core::hint::spin_loop(),
            Ok(Some(())) => break,
            Err(_) => {
                H_ERRORS.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    if read(va).is_none() {
        bits |= 32;
    }
    // The thread's second entry, queued before the handler ran: unmapping
    // it leaves it unmapped only if the thread's map went out first.
    let shared = H_THREAD_VA.load(Ordering::Relaxed) + H_SHARED_OFFSET;
    loop {
        match kspace::try_apply_now(LazyOp::Unmap { va: shared }) {
            Ok(None) => core::hint::spin_loop(),
            Ok(Some(())) => break,
            Err(_) => {
                H_ERRORS.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    if read(shared).is_none() {
        bits |= 64;
    }
    H_RESULT.store(bits | 1, Ordering::Release);
}

/// A tick handler maps, reads and unmaps a page while the interrupted
/// thread has a batch open: lazy mode reads as off in the handler, the
/// thread's queued entry goes out before the handler's, both of the
/// handler's changes are live before it returns, and the thread then sees
/// its own entries. The handler also unmaps a second page the thread has
/// a map of queued: the page ends unmapped, so the two went out in order.
fn handler_in_order(_: &mut Kernel) -> TestResult {
    let mut f = [Pfn(0); 3];
    take(3, &mut f)?;
    stamp(f[0], 0x1e_0001);
    stamp(f[1], 0x1e_0002);
    stamp(f[2], 0x1e_0003);
    let r = handler_body(f);
    timer::set_hook(None);
    H_CPU.store(usize::MAX, Ordering::Release);
    give(&f)?;
    r
}

fn handler_body(f: [Pfn; 3]) -> TestResult {
    let tva = LAZY_AREA + 0x20_0000;
    let hva = LAZY_AREA + 0x30_0000;
    H_THREAD_VA.store(tva, Ordering::Relaxed);
    H_VA.store(hva, Ordering::Relaxed);
    H_PFN.store(f[1].0, Ordering::Relaxed);
    H_RESULT.store(0, Ordering::Relaxed);
    H_ERRORS.store(0, Ordering::Relaxed);
    timer::set_hook(Some(handler_hook));
    let sec = lazy::enter().map_err(kerr("enter"))?;
    let bits = {
        // The thread stays on its CPU with its batch open until the
        // handler has run there.
        let _p = sched::preempt_disable();
        sec.apply(LazyOp::Map {
            va: tva,
            pfn: f[0],
            flags: RW,
        })
        .map_err(kerr("lazy map"))?;
        sec.apply(LazyOp::Map {
            va: tva + H_SHARED_OFFSET,
            pfn: f[0],
            flags: RO,
        })
        .map_err(kerr("lazy map of the entry the handler unmaps"))?;
        if queues() {
            check(read(tva).is_none(), "PV: the thread's entry is queued")?;
        }
        H_CPU.store(percpu::cpu_id(), Ordering::Release);
        let end = clock::now_ns() + 5_000_000_000;
        while H_RESULT.load(Ordering::Acquire) & 1 == 0 && clock::now_ns() < end {
            core::hint::spin_loop();
        }
        H_CPU.store(usize::MAX, Ordering::Release);
        H_RESULT.load(Ordering::Acquire)
    };
    log::info!("lazy: handler result bits {bits:#b}");
    check_eq("handler errors", H_ERRORS.load(Ordering::Relaxed), 0)?;
    check(bits & 1 != 0, "the handler ran within 5 s")?;
    check(bits & 2 != 0, "lazy mode reads as off in the handler")?;
    check(bits & 4 != 0, "the handler's CPU was in lazy mode")?;
    check(
        bits & 8 != 0,
        "the thread's queued entry landed before the handler's",
    )?;
    check(
        bits & 16 != 0,
        "the handler's map was live before it returned",
    )?;
    check(
        bits & 32 != 0,
        "the handler's unmap was live before it returned",
    )?;
    check(
        bits & 64 != 0,
        "the handler's unmap of the thread's queued entry went out after it",
    )?;
    check(
        pfn_at(tva + H_SHARED_OFFSET)?.is_none(),
        "the thread sees the handler's unmap of its entry",
    )?;
    sec.apply(LazyOp::Map {
        va: tva + 4096,
        pfn: f[2],
        flags: RW,
    })
    .map_err(kerr("lazy map after the handler"))?;
    check_eq(
        "own first entry",
        pfn_at(tva)?.map_or(0, |p| p.0 .0),
        f[0].0,
    )?;
    check_eq(
        "own second entry",
        pfn_at(tva + 4096)?.map_or(0, |p| p.0 .0),
        f[2].0,
    )?;
    check(pfn_at(hva)?.is_none(), "the handler's page is gone")?;
    sec.finish().map_err(kerr("finish"))?;
    check_eq("own entry live", read(tva + 4096).unwrap_or(0), 0x1e_0003)?;
    let sec = lazy::enter().map_err(kerr("enter"))?;
    sec.apply(LazyOp::Unmap { va: tva })
        .map_err(kerr("unmap"))?;
    sec.apply(LazyOp::Unmap { va: tva + 4096 })
        .map_err(kerr("unmap"))?;
    sec.finish().map_err(kerr("finish"))?;
    Ok(())
}

/// Pages per stress thread.
const STRESS_PAGES: usize = 16;
/// Rounds (three batches each) per stress thread.
const STRESS_ROUNDS: u64 = 6;
/// Pages per `apply_to_range` call (the lock, and so preemption, is
/// released between calls).
const PROTECT_CHUNK: usize = 4;
/// Busy time between two changes of a batch, so batches outlast ticks.
const SPIN_NS: u64 = 150_000;

// Every stress thread's range lies in the lazy area, above the other tests'.
const _: () = assert!(0x100_0000 * 13 <= lazy::LAZY_AREA_BYTES);

static STRESS_FRAMES: spin::Mutex<[[Pfn; STRESS_PAGES]; 12]> =
    spin::Mutex::new([[Pfn(0); STRESS_PAGES]; 12]);

fn spin_ns(ns: u64) {
    let end = clock::now_ns() + ns;
    while clock::now_ns() < end {
        core::hint::spin_loop();
    }
}

fn pattern(t: u64, frame: usize) -> u64 {
    0x1a2e_0000_0000 | (t << 16) | frame as u64
}

/// One stress thread: `arg` is its index. Returns 0, or the failed step
/// (1..) times 0x100 plus the page.
fn stress_thread(arg: u64) -> u64 {
    let frames = STRESS_FRAMES.lock()[arg as usize];
    let base = LAZY_AREA + 0x100_0000 * (arg + 1);
    for (i, &f) in frames.iter().enumerate() {
        stamp(f, pattern(arg, i));
    }
    let fail = |step: u64, page: usize| step * 0x100 + page as u64;
    for round in 0..STRESS_ROUNDS {
        let frame_of = |p: usize| (p + round as usize) % STRESS_PAGES;
        // Batch 1: map every page, a rotation of the frames per round.
        let Ok(sec) = lazy::enter() else {
            return fail(1, 0);
        };
        for p in 0..STRESS_PAGES {
            let va = base + p as u64 * 4096;
            let op = LazyOp::Map {
                va,
                pfn: frames[frame_of(p)],
                flags: RW,
            };
            if sec.apply(op).is_err() {
                return fail(2, p);
            }
            if !matches!(pfn_at(va), Ok(Some((f, _))) if f == frames[frame_of(p)]) {
                return fail(3, p);
            }
            spin_ns(SPIN_NS);
        }
        if sec.finish().is_err() {
            return fail(4, 0);
        }
        for p in 0..STRESS_PAGES {
            let va = base + p as u64 * 4096;
            let ok = matches!(pfn_at(va), Ok(Some((f, fl))) if f == frames[frame_of(p)]
                && fl.contains(Flags::WRITABLE));
            if !ok || read(va) != Some(pattern(arg, frame_of(p))) {
                return fail(5, p);
            }
        }
        // Batch 2: read-only, by apply_to_range in chunks.
        let Ok(sec) = lazy::enter() else {
            return fail(6, 0);
        };
        for c in (0..STRESS_PAGES).step_by(PROTECT_CHUNK) {
            let va = base + c as u64 * 4096;
            let op = LazyOp::Protect {
                va,
                len: (PROTECT_CHUNK * 4096) as u64,
                flags: RO,
            };
            if sec.apply(op).is_err() {
                return fail(7, c);
            }
            spin_ns(SPIN_NS * PROTECT_CHUNK as u64);
        }
        if sec.finish().is_err() {
            return fail(8, 0);
        }
        for p in 0..STRESS_PAGES {
            let va = base + p as u64 * 4096;
            let ro = matches!(pfn_at(va), Ok(Some((_, fl))) if !fl.contains(Flags::WRITABLE));
            // SAFETY: `va` maps a pool frame this thread owns (or faults).
            let wrote = unsafe { probe_write(va, 0) }.is_ok();
            if !ro || wrote || read(va) != Some(pattern(arg, frame_of(p))) {
                return fail(9, p);
            }
        }
        // Batch 3: unmap every page.
        let Ok(sec) = lazy::enter() else {
            return fail(10, 0);
        };
        for p in 0..STRESS_PAGES {
            if sec
                .apply(LazyOp::Unmap {
                    va: base + p as u64 * 4096,
                })
                .is_err()
            {
                return fail(11, p);
            }
            spin_ns(SPIN_NS);
        }
        if sec.finish().is_err() {
            return fail(12, 0);
        }
        for p in 0..STRESS_PAGES {
            let va = base + p as u64 * 4096;
            if !matches!(pfn_at(va), Ok(None)) || read(va).is_some() {
                return fail(13, p);
            }
        }
    }
    0
}

/// More threads than CPUs run long lazy batches (with the tick
/// `pvmmu.lazy_tick_us` asks for) over private ranges (each
/// change a spin apart, so ticks fall inside batches) and verify every
/// entry after each batch; at least one batch must have been preempted.
fn stress(kernel: &mut Kernel) -> TestResult {
    // `pvmmu.lazy_tick_us`: a faster tick for the stress, so that many
    // ticks (and switches) land inside each batch.
    let tick_ns = kernel
        .options
        .lazy_tick_us
        .map_or(timer::TICK_NS, |us| us * 1000);
    timer::set_period_ns(tick_ns);
    let r = stress_body();
    timer::set_period_ns(timer::TICK_NS);
    STRESS_TICK_US.store(tick_ns / 1000, Ordering::Relaxed);
    r
}

/// The tick period the stress ran with, us (0: it did not run).
static STRESS_TICK_US: AtomicU64 = AtomicU64::new(0);

/// The tick period the lazy stress ran with, us (0: it did not run), for
/// the report's `lazy_tick_us`.
pub fn stress_tick_us() -> u64 {
    STRESS_TICK_US.load(Ordering::Relaxed)
}

fn stress_body() -> TestResult {
    let cpus = percpu::online_count().max(1);
    let n = (2 * cpus + 1).min(12);
    {
        let mut frames = STRESS_FRAMES.lock();
        for t in frames.iter_mut().take(n) {
            take(STRESS_PAGES, t)?;
        }
    }
    let s0 = lazy::stats();
    let k0 = timer::ticks();
    let t0 = clock::now_ns();
    let mut ids = [None; 12];
    let mut spawn_err = false;
    for (i, id) in ids.iter_mut().enumerate().take(n) {
        match sched::spawn("lazy-stress", stress_thread, i as u64) {
            Ok(t) => *id = Some(t),
            Err(_) => spawn_err = true,
        }
    }
    let mut worst = 0;
    for id in ids.iter().flatten() {
        match sched::join(*id) {
            Ok(r) => worst = worst.max(r),
            Err(_) => spawn_err = true,
        }
    }
    let frames = *STRESS_FRAMES.lock();
    for t in frames.iter().take(n) {
        give(t)?;
    }
    let s = lazy::stats();
    log::info!(
        "lazy stress: {n} threads on {cpus} CPU(s) in {} ms, tick every {} us ({} ticks): {} \
         batches, {} preempted, {} closed at a switch, {} migrations",
        (clock::now_ns() - t0) / 1_000_000,
        timer::period_ns() / 1000,
        timer::ticks() - k0,
        s.batches - s0.batches,
        s.batches_preempted - s0.batches_preempted,
        s.switch_closes - s0.switch_closes,
        s.migrations - s0.migrations
    );
    check(!spawn_err, "spawn and join the stress threads")?;
    check_eq("stress thread failure (step * 0x100 + page)", worst, 0)?;
    check_eq(
        "batches",
        s.batches - s0.batches,
        n as u64 * STRESS_ROUNDS * 3,
    )?;
    check(
        s.batches_preempted > s0.batches_preempted,
        "some batches were preempted",
    )?;
    Ok(())
}
