//! Preemptive kernel threads: a round-robin scheduler driven by the timer,
//! `spawn` / `yield_now` / `sleep` / `join`, a per-CPU preemption count
//! with RAII guards, and a context-switch hook list.
//!
//! Each spawned thread runs on its own stack, mapped through pvmmu in the
//! kernel's stack area with an unmapped guard page below it (see
//! [`crate::kspace`]); the boot thread ("main") keeps the boot stack, whose
//! guard page the boot path unmapped.
//!
//! Preemption happens only at interrupt return (the dispatcher calls
//! [`irq_return`] when the outermost handler ends), and only when this CPU's
//! preemption count is 0; otherwise the request stays pending and is taken
//! when the last [`PreemptGuard`] drops or the thread yields. A thread
//! never switches inside a nested handler: the dispatcher has already left
//! the handler depth when it asks.
//!
//! Order of operations at a switch (interrupts off throughout):
//! 1. the scheduler picks the next thread (round robin over ready threads;
//!    the idle thread only if none is ready) and updates both states;
//! 2. every registered [`SwitchHook`] runs, in registration order, with the
//!    outgoing and incoming thread ids, on the outgoing thread's stack (this
//!    is where lazy MMU batches are drained and kmaps saved);
//! 3. the stacks are switched: callee-saved registers are pushed on the
//!    outgoing stack, its stack pointer saved, the incoming one loaded.
//!
//! Invariant: exactly one thread is `Running` on this CPU; the scheduler
//! lock is only taken with interrupts off, and never held across the stack
//! switch; an involuntary switch with a non-zero preemption count is a bug
//! that panics.

mod switch;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::kspace::{self, KspaceError, Stack};
use crate::percpu::{self, MAX_CPUS};
use crate::{ipi, irq};

/// Most threads alive at once (including main and idle).
pub const MAX_THREADS: usize = 64;
/// Stack pages of a spawned thread unless asked otherwise.
pub const DEFAULT_STACK_PAGES: usize = 4;
/// Most context-switch hooks.
pub const MAX_HOOKS: usize = 8;

/// A thread's id (its slot; reused after the thread is joined).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ThreadId(pub usize);

/// A thread's entry point: takes the spawn argument, returns the value
/// `join` gets.
pub type Entry = fn(u64) -> u64;

/// Called at every switch with (outgoing, incoming), interrupts off.
pub type SwitchHook = fn(from: ThreadId, to: ThreadId);

/// Why a thread could not be spawned or joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedError {
    /// [`init`] has not run.
    NotReady,
    /// Every thread slot is in use.
    TooManyThreads,
    /// The stack could not be mapped (out of frames, no slot, ...).
    Stack(KspaceError),
    /// No such thread, or it was already joined.
    NoSuchThread(ThreadId),
    /// A thread cannot join itself.
    JoinSelf,
    /// More than [`MAX_HOOKS`] hooks.
    TooManyHooks,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Ready,
    Running,
    Sleeping { until_ns: u64 },
    Joining { target: usize },
    Dead,
}

#[derive(Clone, Copy)]
struct Thread {
    state: State,
    name: &'static str,
    /// Saved stack pointer while not running.
    rsp: u64,
    stack: Option<Stack>,
    entry: Option<Entry>,
    arg: u64,
    result: u64,
    /// Times the timer took the CPU away from it.
    preemptions: u64,
    /// The only CPU it may run on, if pinned.
    affinity: Option<usize>,
}

const FREE: Thread = Thread {
    state: State::Free,
    name: "",
    rsp: 0,
    stack: None,
    entry: None,
    arg: 0,
    result: 0,
    preemptions: 0,
    affinity: None,
};

/// The thread table (one lock for all CPUs: threads migrate freely; each
/// CPU keeps its running thread and its idle thread in its `PerCpu`).
struct Sched {
    threads: [Thread; MAX_THREADS],
    /// Idle thread of each CPU (`NO_THREAD` until started).
    idle: [usize; MAX_CPUS],
    hooks: [Option<SwitchHook>; MAX_HOOKS],
    /// Where each thread last ran.
    last_cpu: [usize; MAX_THREADS],
    /// Switches of a thread from one CPU to another.
    migrations: u64,
}

static SCHED: spin::Mutex<Sched> = spin::Mutex::new(Sched {
    threads: [FREE; MAX_THREADS],
    idle: [percpu::NO_THREAD; MAX_CPUS],
    hooks: [None; MAX_HOOKS],
    last_cpu: [0; MAX_THREADS],
    migrations: 0,
});

/// Whether a thread's context is live on some CPU (running, or switched
/// away from but its registers not yet saved). Another CPU may only pick
/// a thread whose flag is clear; the flag is cleared by the next thread on
/// the old CPU once the switch is complete (`finish_switch`).
#[allow(clippy::declare_interior_mutable_const)]
const OFF_CPU: AtomicBool = AtomicBool::new(false);
static ON_CPU: [AtomicBool; MAX_THREADS] = [OFF_CPU; MAX_THREADS];

static READY: AtomicBool = AtomicBool::new(false);
static CONTEXT_SWITCHES: AtomicU64 = AtomicU64::new(0);
static PREEMPTIONS: AtomicU64 = AtomicU64::new(0);
static SPAWNED: AtomicU64 = AtomicU64::new(0);
/// Resched requests deferred because preemption was disabled.
static DEFERRED: AtomicU64 = AtomicU64::new(0);

/// Runs `f` under the scheduler lock with interrupts off. The lock guard
/// is a local declared after the interrupt guard, so it is released
/// before interrupts come back on (a temporary in the tail expression
/// would outlive `_irq`, and a tick arriving in between would spin on the
/// lock its own CPU holds: found as a hang under TCG).
fn locked<T>(f: impl FnOnce(&mut Sched) -> T) -> T {
    let _irq = irq::save();
    let mut guard = SCHED.lock();
    f(&mut guard)
}

/// The running thread of this CPU (interrupts off: no migration).
fn cur() -> usize {
    // SAFETY: callers run with interrupts off (inside `locked` or a handler).
    unsafe { percpu::this_cpu_irqs_off() }
        .current
        .load(Ordering::Relaxed)
}

fn set_cur(t: usize) {
    // SAFETY: as for `cur`.
    unsafe { percpu::this_cpu_irqs_off() }
        .current
        .store(t, Ordering::Relaxed)
}

fn this_idle(s: &Sched) -> usize {
    s.idle[percpu::cpu_id()]
}

/// Makes the running boot code thread 0 ("main") and starts the idle
/// thread. Interrupts stay as they are.
pub fn init() -> Result<(), SchedError> {
    locked(|s| {
        s.threads[0] = Thread {
            state: State::Running,
            name: "main",
            ..FREE
        };
        ON_CPU[0].store(true, Ordering::Relaxed);
        set_cur(0);
    });
    SPAWNED.store(1, Ordering::Relaxed);
    READY.store(true, Ordering::Release);
    let idle = spawn("idle", idle_loop, 0)?;
    locked(|s| s.idle[0] = idle.0);
    Ok(())
}

/// Makes the code running on a CPU that is coming up its idle thread,
/// `thread` (spawned for it by [`spawn_idle_for`], never started; the CPU
/// runs on its stack).
pub fn adopt_idle(cpu: usize, thread: ThreadId) {
    locked(|s| {
        s.idle[cpu] = thread.0;
        s.threads[thread.0].state = State::Running;
        s.last_cpu[thread.0] = cpu;
        ON_CPU[thread.0].store(true, Ordering::Relaxed);
        set_cur(thread.0);
    });
}

/// Creates the idle thread of CPU `cpu` without making it runnable (the
/// CPU starts on its stack and adopts it with [`adopt_idle`]).
pub fn spawn_idle_for(cpu: usize) -> Result<(ThreadId, Stack), SchedError> {
    // Parked (waiting on itself): runnable by no one until its CPU adopts it.
    let parked = State::Joining {
        target: MAX_THREADS,
    };
    let id = create("idle", idle_loop, cpu as u64, DEFAULT_STACK_PAGES, parked)?;
    let stack = locked(|s| {
        s.idle[cpu] = id.0;
        s.threads[id.0].stack
    });
    percpu::CPUS[cpu].idle.store(id.0, Ordering::Release);
    stack.map(|st| (id, st)).ok_or(SchedError::NoSuchThread(id))
}

/// The idle loop of every CPU.
pub fn idle_loop(_: u64) -> u64 {
    loop {
        let g = irq::save();
        if locked(|s| s.has_ready_besides(this_idle(s))) {
            schedule(false);
            drop(g);
        } else {
            // Enables interrupts atomically with the wait.
            irq::wait_for_interrupt();
            drop(g);
        }
    }
}

impl Sched {
    fn is_idle(&self, t: usize) -> bool {
        self.idle.contains(&t)
    }

    /// Whether thread `i` may be switched to on `cpu`: ready, not an idle
    /// thread, its context not live on a CPU, and not pinned elsewhere.
    fn runnable(&self, i: usize, cpu: usize) -> bool {
        !self.is_idle(i)
            && self.threads[i].state == State::Ready
            && self.threads[i].affinity.is_none_or(|c| c == cpu)
            && !ON_CPU[i].load(Ordering::Acquire)
    }

    /// A thread other than `skip` that this CPU could switch to.
    fn has_ready_besides(&self, skip: usize) -> bool {
        let cpu = percpu::cpu_id();
        (0..MAX_THREADS).any(|i| i != skip && self.runnable(i, cpu))
    }

    /// Round robin: the next ready thread after the current one; the
    /// current one if it is still runnable and nothing else is; this CPU's
    /// idle thread last.
    fn pick_next(&self, cur: usize, idle: usize, cpu: usize) -> usize {
        for k in 1..=MAX_THREADS {
            let i = (cur + k) % MAX_THREADS;
            if self.runnable(i, cpu) {
                return i;
            }
        }
        let stays = self.threads[cur].affinity.is_none_or(|c| c == cpu);
        if self.threads[cur].state == State::Running && cur != idle && stays {
            return cur;
        }
        idle
    }
}

/// Spawns a thread with a stack of [`DEFAULT_STACK_PAGES`].
pub fn spawn(name: &'static str, entry: Entry, arg: u64) -> Result<ThreadId, SchedError> {
    spawn_with_stack(name, entry, arg, DEFAULT_STACK_PAGES)
}

/// Spawns a thread with a stack of `pages` pages; it starts on the next
/// switch to it, with interrupts on.
pub fn spawn_with_stack(
    name: &'static str,
    entry: Entry,
    arg: u64,
    pages: usize,
) -> Result<ThreadId, SchedError> {
    let id = create(name, entry, arg, pages, State::Ready)?;
    ipi::kick_idle_cpus();
    Ok(id)
}

/// Creates a thread in `state` with a fresh stack and its first frame.
fn create(
    name: &'static str,
    entry: Entry,
    arg: u64,
    pages: usize,
    state: State,
) -> Result<ThreadId, SchedError> {
    if !READY.load(Ordering::Acquire) {
        return Err(SchedError::NotReady);
    }
    let stack = kspace::alloc_stack(pages).map_err(SchedError::Stack)?;
    let rsp = switch::initial_frame(stack.top);
    let slot = locked(|s| {
        let slot = (0..MAX_THREADS)
            .find(|&i| s.threads[i].state == State::Free && !ON_CPU[i].load(Ordering::Acquire))?;
        s.threads[slot] = Thread {
            state,
            name,
            rsp,
            stack: Some(stack),
            entry: Some(entry),
            arg,
            ..FREE
        };
        Some(slot)
    });
    match slot {
        Some(slot) => {
            SPAWNED.fetch_add(1, Ordering::Relaxed);
            Ok(ThreadId(slot))
        }
        None => {
            if let Err(e) = kspace::free_stack(stack) {
                log::error!("spawn: cannot free the unused stack: {e:?}");
            }
            Err(SchedError::TooManyThreads)
        }
    }
}

/// First Rust code of a new thread (called by the switch trampoline, on
/// the new stack, interrupts off).
extern "C" fn thread_start() -> ! {
    finish_switch();
    let (entry, arg) = locked(|s| {
        let t = &s.threads[cur()];
        (t.entry, t.arg)
    });
    irq::enable();
    let result = match entry {
        Some(f) => f(arg),
        None => 0,
    };
    exit(result)
}

/// Ends the current thread with `result` (for `join`). Never returns.
pub fn exit(result: u64) -> ! {
    let _g = irq::save();
    locked(|s| {
        let cur = cur();
        s.threads[cur].state = State::Dead;
        s.threads[cur].result = result;
        for t in s.threads.iter_mut() {
            if t.state == (State::Joining { target: cur }) {
                t.state = State::Ready;
            }
        }
    });
    ipi::kick_idle_cpus();
    schedule(false);
    unreachable!("a dead thread was scheduled again");
}

/// Waits for `id` to end, frees its stack and returns its result.
pub fn join(id: ThreadId) -> Result<u64, SchedError> {
    loop {
        let g = irq::save();
        let outcome = locked(|s| {
            let cur = cur();
            if id.0 == cur {
                return Some(Err(SchedError::JoinSelf));
            }
            if s.is_idle(id.0) {
                return Some(Err(SchedError::NoSuchThread(id)));
            }
            match s.threads.get(id.0).map(|t| t.state) {
                None | Some(State::Free) => Some(Err(SchedError::NoSuchThread(id))),
                // Dead but still finishing its last switch on another CPU:
                // its stack is in use for a few more instructions. Retry
                // at the next tick.
                Some(State::Dead) if ON_CPU[id.0].load(Ordering::Acquire) => {
                    s.threads[cur].state = State::Sleeping { until_ns: 0 };
                    None
                }
                Some(State::Dead) => {
                    let t = s.threads[id.0];
                    s.threads[id.0] = FREE;
                    Some(Ok(t))
                }
                Some(_) => {
                    s.threads[cur].state = State::Joining { target: id.0 };
                    None
                }
            }
        });
        match outcome {
            Some(Ok(t)) => {
                drop(g);
                if let Some(stack) = t.stack {
                    kspace::free_stack(stack).map_err(SchedError::Stack)?;
                }
                return Ok(t.result);
            }
            Some(Err(e)) => return Err(e),
            None => {
                schedule(false);
                drop(g);
            }
        }
    }
}

/// Gives the CPU to the next ready thread, if any.
pub fn yield_now() {
    let _g = irq::save();
    schedule(false);
}

/// Sleeps at least `ns` nanoseconds (woken by the timer tick after).
pub fn sleep_ns(ns: u64) {
    let until_ns = crate::clock::now_ns() + ns;
    let _g = irq::save();
    locked(|s| {
        let cur = cur();
        s.threads[cur].state = State::Sleeping { until_ns };
    });
    schedule(false);
}

/// Pins the running thread to `cpu` (`None`: may run anywhere) and, if it
/// is on another CPU, gives up this one until `cpu` picks it up.
pub fn pin_current(cpu: Option<usize>) {
    locked(|s| {
        let cur = cur();
        s.threads[cur].affinity = cpu;
    });
    while let Some(c) = cpu.filter(|&c| c != percpu::cpu_id()) {
        ipi::send_resched(c);
        yield_now();
    }
}

/// Spawns a thread that only ever runs on `cpu`.
pub fn spawn_on(
    cpu: usize,
    name: &'static str,
    entry: Entry,
    arg: u64,
) -> Result<ThreadId, SchedError> {
    spawn_on_with_stack(cpu, name, entry, arg, DEFAULT_STACK_PAGES)
}

/// Spawns a thread that only ever runs on `cpu`, with a stack of `pages`
/// pages.
pub fn spawn_on_with_stack(
    cpu: usize,
    name: &'static str,
    entry: Entry,
    arg: u64,
    pages: usize,
) -> Result<ThreadId, SchedError> {
    let parked = State::Joining {
        target: MAX_THREADS,
    };
    let id = create(name, entry, arg, pages, parked)?;
    locked(|s| {
        s.threads[id.0].affinity = Some(cpu);
        s.threads[id.0].state = State::Ready;
    });
    ipi::send_resched(cpu);
    Ok(id)
}

/// The running thread.
pub fn current() -> ThreadId {
    ThreadId(locked(|_| cur()))
}

/// The running thread's name.
pub fn current_name() -> &'static str {
    locked(|s| s.threads[cur()].name)
}

/// Registers a hook called at every switch (see the module docs).
pub fn register_switch_hook(hook: SwitchHook) -> Result<(), SchedError> {
    locked(|s| {
        let slot = s
            .hooks
            .iter()
            .position(Option::is_none)
            .ok_or(SchedError::TooManyHooks)?;
        s.hooks[slot] = Some(hook);
        Ok(())
    })
}

/// Switches to the next thread. Interrupts must be off.
fn schedule(involuntary: bool) {
    debug_assert!(!irq::enabled());
    let preempt = percpu::preempt_count();
    if preempt != 0 {
        panic!(
            "scheduling with preemption disabled (count {preempt}, {})",
            if involuntary {
                "preempted from an interrupt"
            } else {
                "the thread blocked or yielded"
            }
        );
    }
    let cpu = percpu::cpu_id();
    let mut sched = SCHED.lock();
    let s = &mut *sched;
    let cur = cur();
    let next = s.pick_next(cur, s.idle[cpu], cpu);
    if next == cur {
        return;
    }
    if s.threads[cur].state == State::Running {
        s.threads[cur].state = State::Ready;
    }
    if involuntary {
        s.threads[cur].preemptions += 1;
        PREEMPTIONS.fetch_add(1, Ordering::Relaxed);
    }
    s.threads[next].state = State::Running;
    if s.last_cpu[next] != cpu && !s.is_idle(next) {
        s.migrations += 1;
    }
    s.last_cpu[next] = cpu;
    ON_CPU[next].store(true, Ordering::Relaxed);
    set_cur(next);
    // SAFETY: interrupts are off.
    let pc = unsafe { percpu::this_cpu_irqs_off() };
    pc.prev.store(cur, Ordering::Relaxed);
    pc.switches.fetch_add(1, Ordering::Relaxed);
    let hooks = s.hooks;
    let from_rsp: *mut u64 = &mut s.threads[cur].rsp;
    let to_rsp = s.threads[next].rsp;
    drop(sched);
    CONTEXT_SWITCHES.fetch_add(1, Ordering::Relaxed);
    for hook in hooks.iter().flatten() {
        hook(ThreadId(cur), ThreadId(next));
    }
    // SAFETY: interrupts are off and the lock is released; `from_rsp` is
    // the outgoing thread's slot in the static table (stable address) and
    // `to_rsp` the incoming thread's saved stack pointer, built by
    // `initial_frame` or saved by an earlier switch; its `ON_CPU` flag was
    // clear when it was picked, so no other CPU runs on that stack.
    unsafe { switch::switch_stacks(from_rsp, to_rsp) };
    finish_switch();
}

/// Run by the incoming thread right after a switch: the outgoing thread's
/// registers are saved now, so other CPUs may pick it.
fn finish_switch() {
    // SAFETY: interrupts are off until the switch path is left.
    let cpu = unsafe { percpu::this_cpu_irqs_off() };
    let prev = cpu.prev.swap(percpu::NO_THREAD, Ordering::Relaxed);
    if !percpu::is_none(prev) {
        ON_CPU[prev].store(false, Ordering::Release);
    }
}

/// Called by the timer interrupt: wakes sleepers whose time came and asks
/// for a switch if another thread can run.
pub fn tick(now_ns: u64) {
    if !READY.load(Ordering::Acquire) {
        return;
    }
    let mut s = SCHED.lock();
    let mut woke = false;
    for t in s.threads.iter_mut() {
        if let State::Sleeping { until_ns } = t.state {
            if until_ns <= now_ns {
                t.state = State::Ready;
                woke = true;
            }
        }
    }
    if s.has_ready_besides(cur()) {
        percpu::set_need_resched(true);
    }
    drop(s);
    if woke {
        ipi::kick_idle_cpus();
    }
}

/// Called on a reschedule IPI: look for work.
pub fn resched_ipi() {
    if READY.load(Ordering::Acquire) && locked(|s| s.has_ready_besides(cur())) {
        percpu::set_need_resched(true);
    }
}

/// Whether CPU `cpu` runs its idle thread.
pub fn cpu_is_idle(cpu: usize) -> bool {
    let cur = percpu::CPUS[cpu].current.load(Ordering::Relaxed);
    locked(|s| s.idle[cpu] == cur)
}

/// Called by the dispatcher when the outermost interrupt handler is done,
/// interrupts still off: the one place where a thread is preempted.
pub fn irq_return() {
    if !percpu::need_resched() {
        return;
    }
    if percpu::preempt_count() != 0 {
        DEFERRED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    percpu::set_need_resched(false);
    schedule(true);
}

/// Preemption off until the guard drops (nests). A resched requested
/// meanwhile is taken when the last guard drops with interrupts on.
#[must_use = "preemption comes back on when the guard drops"]
pub struct PreemptGuard {
    _cpu_bound: core::marker::PhantomData<*const ()>,
}

/// Disables preemption on this CPU.
pub fn preempt_disable() -> PreemptGuard {
    percpu::preempt_inc();
    PreemptGuard {
        _cpu_bound: core::marker::PhantomData,
    }
}

impl Drop for PreemptGuard {
    fn drop(&mut self) {
        let left = percpu::preempt_dec();
        if left == 0 && percpu::need_resched() && !irq::in_interrupt() && irq::enabled() {
            let _g = irq::save();
            percpu::set_need_resched(false);
            schedule(true);
        }
    }
}

/// This CPU's preemption count.
pub fn preempt_count() -> u32 {
    percpu::preempt_count()
}

/// Counters for the report and the tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Stack switches.
    pub context_switches: u64,
    /// Switches forced at interrupt return.
    pub preemptions: u64,
    /// Threads created (main and idle included).
    pub threads: u64,
    /// Resched requests deferred by a preemption guard.
    pub deferred: u64,
    /// Switches that resumed a thread on another CPU than its last one.
    pub migrations: u64,
}

/// The counters.
pub fn stats() -> Stats {
    Stats {
        context_switches: CONTEXT_SWITCHES.load(Ordering::Relaxed),
        preemptions: PREEMPTIONS.load(Ordering::Relaxed),
        threads: SPAWNED.load(Ordering::Relaxed),
        deferred: DEFERRED.load(Ordering::Relaxed),
        migrations: locked(|s| s.migrations),
    }
}

/// Times `id` was preempted.
pub fn preemptions_of(id: ThreadId) -> u64 {
    locked(|s| s.threads.get(id.0).map_or(0, |t| t.preemptions))
}

/// The name of the thread whose stack guard page holds `va`, if any (for
/// the fatal-fault path, which may have interrupted the lock holder).
///
/// # Safety
/// Only from a path that never returns to the interrupted code: the lock
/// is broken if it is held.
pub unsafe fn guard_owner(va: u64) -> Option<&'static str> {
    if SCHED.is_locked() {
        // SAFETY: the caller guarantees the holder never runs again.
        unsafe { SCHED.force_unlock() };
    }
    let s = SCHED.lock();
    s.threads.iter().find_map(|t| match (t.state, t.stack) {
        (State::Free, _) | (_, None) => None,
        (_, Some(st)) if st.guard_contains(va) => Some(t.name),
        _ => None,
    })
}

/// The stacks of live threads (for the guard-page test).
pub fn live_stacks(out: &mut [Option<(&'static str, Stack)>; MAX_THREADS]) -> usize {
    locked(|s| {
        let mut n = 0;
        for t in s.threads.iter() {
            if let (State::Free, _) | (_, None) = (t.state, t.stack) {
                continue;
            }
            if let Some(st) = t.stack {
                out[n] = Some((t.name, st));
                n += 1;
            }
        }
        n
    })
}
