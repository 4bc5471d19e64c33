//! Self-tests of the running kernel: the tick's rate against the clock,
//! preemption of threads that never yield, preemption-disabled sections,
//! a page fault taken inside the timer handler, events delivered on
//! unmask, thread stacks' guard pages, sleep/join, and the typed errors of
//! spawn and of a refused VIRQ bind.
//!
//! Invariant: every test leaves no thread of its own alive (each joins what
//! it spawned) and the tick hook cleared.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::kspace::{self, KspaceError, POOL_FRAMES};
use crate::sched::{self, SchedError, ThreadId};
use crate::selftest::{check, check_eq, Failure, Only, SelfTest, TestResult};
use crate::traps::{self, probe_read};
use crate::{clock, irq, timer, Kernel};

/// The suite (run after [`crate::running::start`]).
pub const SUITE: &[SelfTest] = &[
    SelfTest::new("rk_timer_rate_1000_ticks", timer_rate),
    SelfTest::new("rk_threads_preempted_without_yielding", threads_preempted),
    SelfTest::new("rk_preempt_disable_not_preempted", preempt_disable_holds),
    SelfTest::new("rk_page_fault_inside_timer_handler", fault_in_interrupt),
    SelfTest::new(
        "rk_masked_events_delivered_on_unmask",
        masked_then_delivered,
    ),
    SelfTest::new("rk_thread_stack_guard_pages", stack_guards),
    SelfTest::new("rk_sleep_and_join", sleep_and_join),
    SelfTest::new("rk_yield_runs_switch_hooks", yield_and_hooks),
    SelfTest::new("rk_spawn_out_of_frames_is_typed", spawn_out_of_frames),
    SelfTest::only("rk_bind_bad_virq_reports_errno", Only::XenPv, bad_virq),
];

const MS: u64 = 1_000_000;

/// Waits (sleeping, so other threads and idle run) until `cond` holds or
/// `timeout_ns` passes; returns whether it held.
fn wait_until(timeout_ns: u64, cond: impl Fn() -> bool) -> bool {
    let end = clock::now_ns() + timeout_ns;
    while !cond() {
        if clock::now_ns() > end {
            return false;
        }
        sched::sleep_ns(MS);
    }
    true
}

/// The tick runs at its programmed deadlines: over 1,000 deadlines of
/// 1 ms, no tick runs early, and the deadlines consumed (ticks taken plus
/// deadlines the emulated CPU was too slow to take, which are skipped, not
/// replayed) match the clock within 10 %. How many were taken in time
/// depends on the host's load under TCG and is logged, not asserted.
fn timer_rate(_: &mut Kernel) -> TestResult {
    const N: u64 = 1000;
    let (d0, k0, e0) = (timer::deadlines(), timer::ticks(), timer::early());
    let (late0, _) = timer::lateness_ns();
    let t0 = clock::now_ns();
    check(
        wait_until(10_000 * MS, || timer::deadlines() >= d0 + N),
        "1,000 deadlines within 10 s",
    )?;
    let elapsed = clock::now_ns() - t0;
    let consumed = timer::deadlines() - d0;
    let taken = timer::ticks() - k0;
    let early = timer::early() - e0;
    let (late, late_max) = timer::lateness_ns();
    log::info!(
        "rk: {consumed} deadlines in {} us: {taken} ticks taken, {} skipped, {early} early; \
         mean lateness {} us, max {} us",
        elapsed / 1000,
        consumed - taken,
        (late - late0) / taken.max(1) / 1000,
        late_max / 1000
    );
    check_eq("ticks before their deadline", early, 0)?;
    check(taken > 0, "ticks were taken")?;
    let expected = consumed * timer::TICK_NS;
    check(
        elapsed >= expected * 9 / 10 && elapsed <= expected * 11 / 10,
        "1 ms deadlines match the clock within 10 %",
    )
}

/// Progress and first-run times of the spinning threads.
static SPIN_PROGRESS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static SPIN_FIRST_NS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static SPIN_LAST_NS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static SPIN_UNTIL: AtomicU64 = AtomicU64::new(0);

/// Spins (never yields) until the shared deadline, counting.
fn spinner(i: u64) -> u64 {
    let i = i as usize;
    SPIN_FIRST_NS[i].store(clock::now_ns(), Ordering::Relaxed);
    let until = SPIN_UNTIL.load(Ordering::Relaxed);
    loop {
        let now = clock::now_ns();
        if now >= until {
            SPIN_LAST_NS[i].store(now, Ordering::Relaxed);
            break;
        }
        SPIN_PROGRESS[i].fetch_add(1, Ordering::Relaxed);
    }
    sched::preemptions_of(sched::current())
}

/// Four threads that never yield all make progress: each is preempted at
/// least once, and all of them started before any of them finished.
fn threads_preempted(_: &mut Kernel) -> TestResult {
    let switches0 = sched::stats().context_switches;
    for i in 0..4 {
        SPIN_PROGRESS[i].store(0, Ordering::Relaxed);
        SPIN_FIRST_NS[i].store(0, Ordering::Relaxed);
    }
    SPIN_UNTIL.store(clock::now_ns() + 60 * MS, Ordering::Relaxed);
    let mut ids = [ThreadId(0); 4];
    for (i, id) in ids.iter_mut().enumerate() {
        *id = sched::spawn("spinner", spinner, i as u64).map_err(spawn_failure)?;
    }
    let mut preempted = [0u64; 4];
    for (i, id) in ids.iter().enumerate() {
        preempted[i] = sched::join(*id).map_err(spawn_failure)?;
    }
    let first_end = (0..4)
        .map(|i| SPIN_LAST_NS[i].load(Ordering::Relaxed))
        .min()
        .unwrap_or(0);
    log::info!(
        "rk: spinners progress {:?}, preempted {preempted:?} times, {} switches",
        SPIN_PROGRESS.each_ref().map(|p| p.load(Ordering::Relaxed)),
        sched::stats().context_switches - switches0
    );
    for i in 0..4 {
        check(
            SPIN_PROGRESS[i].load(Ordering::Relaxed) > 0,
            "every spinner made progress",
        )?;
        check(preempted[i] >= 1, "every spinner was preempted")?;
        check(
            SPIN_FIRST_NS[i].load(Ordering::Relaxed) < first_end,
            "every spinner started before the first one finished",
        )?;
    }
    Ok(())
}

fn spawn_failure(e: SchedError) -> Failure {
    log::error!("rk: scheduler error {e:?}");
    Failure::Check("spawn or join failed")
}

/// A section with preemption disabled is never switched away from, even
/// with another thread ready and the tick firing; the deferred switch
/// happens when the guard drops.
fn preempt_disable_holds(_: &mut Kernel) -> TestResult {
    SPIN_UNTIL.store(clock::now_ns() + 80 * MS, Ordering::Relaxed);
    let other = sched::spawn("spinner", spinner, 0).map_err(spawn_failure)?;
    let (switches_in, ticks_in, deferred_in, switches_end) = {
        let _p = sched::preempt_disable();
        let s0 = sched::stats();
        let k0 = timer::ticks();
        clock::spin_ns(20 * MS);
        let s1 = sched::stats();
        (
            s1.context_switches - s0.context_switches,
            timer::ticks() - k0,
            s1.deferred - s0.deferred,
            s1.context_switches,
        )
    };
    // The guard dropped with a switch pending: it happens here.
    let switched_after = sched::stats().context_switches > switches_end;
    sched::join(other).map_err(spawn_failure)?;
    log::info!(
        "rk: 20 ms without preemption: {ticks_in} ticks, {switches_in} switches, {deferred_in} deferred"
    );
    check(ticks_in >= 5, "the tick fired during the section")?;
    check_eq("switches during the section", switches_in, 0)?;
    check(deferred_in > 0, "the tick asked to preempt")?;
    check(
        switched_after,
        "the deferred switch happened when the guard dropped",
    )
}

static HOOK_RUNS: AtomicU64 = AtomicU64::new(0);
static HOOK_FAULTS: AtomicU64 = AtomicU64::new(0);
static HOOK_DEPTH: AtomicU64 = AtomicU64::new(0);

/// An address that is never mapped (below the kernel's areas, user half).
const UNMAPPED: u64 = 0x0000_7000_0000_0040;

fn faulting_hook() {
    HOOK_RUNS.fetch_add(1, Ordering::Relaxed);
    HOOK_DEPTH.fetch_max(u64::from(irq::depth()), Ordering::Relaxed);
    // SAFETY: `UNMAPPED` is not mapped; reading it has no side effects.
    if let Err(f) = unsafe { probe_read(UNMAPPED) } {
        if f.vector == traps::vector::PF && f.cr2 == UNMAPPED {
            HOOK_FAULTS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A page fault inside the timer handler is handled (nested exception) and
/// the handler and the interrupted thread carry on.
fn fault_in_interrupt(_: &mut Kernel) -> TestResult {
    HOOK_RUNS.store(0, Ordering::Relaxed);
    HOOK_FAULTS.store(0, Ordering::Relaxed);
    let nested0 = traps::nested_exceptions();
    timer::set_hook(Some(faulting_hook));
    let ok = wait_until(1000 * MS, || HOOK_RUNS.load(Ordering::Relaxed) >= 10);
    timer::set_hook(None);
    let (runs, faults) = (
        HOOK_RUNS.load(Ordering::Relaxed),
        HOOK_FAULTS.load(Ordering::Relaxed),
    );
    let nested = traps::nested_exceptions() - nested0;
    log::info!(
        "rk: {runs} ticks probed, {faults} #PF caught inside the handler, {nested} nested exceptions, depth {}",
        HOOK_DEPTH.load(Ordering::Relaxed)
    );
    check(ok, "the hook ran 10 times")?;
    check_eq("faults caught in the handler", faults, runs)?;
    check(nested >= runs, "each fault counted as nested")?;
    check(
        HOOK_DEPTH.load(Ordering::Relaxed) >= 1,
        "the hook ran in interrupt context",
    )
}

/// With interrupts off the tick does not run although its deadline passed
/// (under PV the port is pending in shared info); it runs as soon as they
/// are back on.
fn masked_then_delivered(_: &mut Kernel) -> TestResult {
    let (during, pending, k0) = {
        let _g = irq::save();
        let k0 = timer::ticks();
        clock::spin_ns(5 * MS);
        let pending = match timer::pv_port() {
            Some(port) => crate::events::is_pending(port),
            None => true,
        };
        (timer::ticks() - k0, pending, k0)
    };
    // The guard dropped: delivery must happen now, not at the next tick.
    let right_after = timer::ticks() - k0;
    log::info!(
        "rk: masked 5 ms: {during} ticks while masked, {right_after} right after unmask, {} forced upcalls",
        irq::forced_deliveries()
    );
    check_eq("ticks while masked", during, 0)?;
    check(pending, "the timer event is pending while masked")?;
    check(right_after >= 1, "the tick was delivered on unmask")
}

static STACK_CHECK: AtomicU64 = AtomicU64::new(0);

fn sleeper(ms: u64) -> u64 {
    sched::sleep_ns(ms * MS);
    STACK_CHECK.fetch_add(1, Ordering::Relaxed);
    ms + 1
}

/// Every live thread's stack has its guard page unmapped (pvmmu's walk and
/// a real access agree) and its stack pages mapped.
fn stack_guards(_: &mut Kernel) -> TestResult {
    let a = sched::spawn("sleeper-a", sleeper, 30).map_err(spawn_failure)?;
    let b = sched::spawn("sleeper-b", sleeper, 30).map_err(spawn_failure)?;
    let mut stacks = [None; sched::MAX_THREADS];
    let n = sched::live_stacks(&mut stacks);
    let mut checked = 0;
    let mut result = Ok(());
    for (name, st) in stacks[..n].iter().flatten() {
        let guard_walk = kspace::translate(st.guard);
        // SAFETY: a read of an address in our own stack area (mapped stack
        // or unmapped guard); no side effects.
        let guard_read = unsafe { probe_read(st.guard + 8) };
        let bottom = kspace::translate(st.bottom);
        let top = kspace::translate(st.top - 8);
        let guard_ok = matches!(
            guard_walk,
            Err(KspaceError::Map(pvmmu::Error::NotMapped { .. }))
        ) && matches!(guard_read, Err(f) if f.vector == traps::vector::PF);
        if !guard_ok || bottom.is_err() || top.is_err() {
            log::error!(
                "rk: thread '{name}': guard {:#x} walk {guard_walk:?} read {guard_read:?}, bottom {bottom:?}, top {top:?}",
                st.guard
            );
            result = Err(Failure::Check("a thread stack's guard page is mapped"));
        }
        checked += 1;
    }
    sched::join(a).map_err(spawn_failure)?;
    sched::join(b).map_err(spawn_failure)?;
    log::info!("rk: {checked} thread stacks checked");
    result?;
    check(checked >= 3, "idle and the two sleepers were checked")
}

/// A sleeping thread wakes after its time, `join` returns its result, and
/// a second join of the same id is a typed error.
fn sleep_and_join(_: &mut Kernel) -> TestResult {
    let t0 = clock::now_ns();
    let id = sched::spawn("sleeper", sleeper, 20).map_err(spawn_failure)?;
    let result = sched::join(id).map_err(spawn_failure)?;
    let elapsed = clock::now_ns() - t0;
    check_eq("join result", result, 21)?;
    check(elapsed >= 20 * MS, "slept at least 20 ms")?;
    check(
        sched::join(id) == Err(SchedError::NoSuchThread(id)),
        "second join is NoSuchThread",
    )?;
    check(
        sched::join(sched::current()) == Err(SchedError::JoinSelf),
        "joining oneself is JoinSelf",
    )
}

static HOOK_SWITCHES: AtomicU64 = AtomicU64::new(0);
static HOOK_LAST_TO: AtomicU64 = AtomicU64::new(u64::MAX);
static YIELDER_STEPS: AtomicU64 = AtomicU64::new(0);
static YIELDER_NAME_OK: AtomicU64 = AtomicU64::new(0);

fn count_switch(_from: ThreadId, to: ThreadId) {
    HOOK_SWITCHES.fetch_add(1, Ordering::Relaxed);
    HOOK_LAST_TO.store(to.0 as u64, Ordering::Relaxed);
}

fn yielder(n: u64) -> u64 {
    if sched::current_name() == "yielder" {
        YIELDER_NAME_OK.store(1, Ordering::Relaxed);
    }
    for _ in 0..n {
        YIELDER_STEPS.fetch_add(1, Ordering::Relaxed);
        sched::yield_now();
    }
    n
}

/// Two threads that yield to each other alternate step by step, and the
/// registered switch hook sees every switch with the right incoming thread;
/// preemption guards nest.
fn yield_and_hooks(_: &mut Kernel) -> TestResult {
    const N: u64 = 100;
    {
        let _a = sched::preempt_disable();
        let _b = sched::preempt_disable();
        check_eq("nested preempt count", u64::from(sched::preempt_count()), 2)?;
    }
    check_eq("preempt count after", u64::from(sched::preempt_count()), 0)?;
    sched::register_switch_hook(count_switch).map_err(spawn_failure)?;
    YIELDER_STEPS.store(0, Ordering::Relaxed);
    let h0 = HOOK_SWITCHES.load(Ordering::Relaxed);
    let s0 = sched::stats().context_switches;
    let id = sched::spawn("yielder", yielder, N).map_err(spawn_failure)?;
    let mut lockstep = 0;
    for i in 0..N {
        sched::yield_now();
        // Between two of our yields the yielder ran (at least) once.
        if YIELDER_STEPS.load(Ordering::Relaxed) > i {
            lockstep += 1;
        }
        if HOOK_LAST_TO.load(Ordering::Relaxed) != sched::current().0 as u64 {
            return Err(Failure::Check("the hook saw another incoming thread"));
        }
    }
    check_eq("yielder result", sched::join(id).map_err(spawn_failure)?, N)?;
    let hooks = HOOK_SWITCHES.load(Ordering::Relaxed) - h0;
    let switches = sched::stats().context_switches - s0;
    log::info!(
        "rk: {N} yields each way: {switches} switches, {hooks} hook calls, {lockstep} in lockstep"
    );
    check_eq(
        "yielder saw its own name",
        YIELDER_NAME_OK.load(Ordering::Relaxed),
        1,
    )?;
    check(lockstep >= N - 2, "the two threads alternated")?;
    check(switches >= 2 * N, "at least two switches per round")?;
    check_eq("hook calls", hooks, switches)
}

/// With the pool empty, spawn returns `OutOfFrames` and leaks nothing.
fn spawn_out_of_frames(_: &mut Kernel) -> TestResult {
    let before = kspace::pool_free().ok_or(Failure::Check("no kernel pool"))?;
    let mut taken = [pvmmu::Pfn(0); POOL_FRAMES];
    let n = kspace::drain_pool(&mut taken).map_err(|_| Failure::Check("drain"))?;
    let refused = sched::spawn("starved", sleeper, 1);
    kspace::restore_pool(&taken[..n]).map_err(|_| Failure::Check("restore"))?;
    let after = kspace::pool_free().ok_or(Failure::Check("no kernel pool"))?;
    check(
        refused == Err(SchedError::Stack(KspaceError::OutOfFrames)),
        "spawn with no frames is OutOfFrames",
    )?;
    check_eq("pool frames after", after as u64, before as u64)?;
    let id = sched::spawn("fed", sleeper, 1).map_err(spawn_failure)?;
    sched::join(id).map_err(spawn_failure)?;
    check_eq(
        "pool frames after a spawn and join",
        kspace::pool_free().unwrap_or(0) as u64,
        before as u64,
    )
}

/// Xen refuses a VIRQ that does not exist with EINVAL, and we report it.
fn bad_virq(_: &mut Kernel) -> TestResult {
    let r = crate::events::bind_virq(1000, |_| {});
    match r {
        Err(crate::events::EventError::Bind(e)) => {
            check_eq("errno of a bad VIRQ bind", e.errno() as u64, 22)
        }
        Err(_) => Err(Failure::Check("wrong error type for a bad VIRQ")),
        Ok(_) => Err(Failure::Check("Xen bound a VIRQ that does not exist")),
    }
}
