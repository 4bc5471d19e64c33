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

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::irq;
use crate::kspace::{self, KspaceError, Stack};

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
};

struct Sched {
    threads: [Thread; MAX_THREADS],
    current: usize,
    idle: usize,
    hooks: [Option<SwitchHook>; MAX_HOOKS],
}

static SCHED: spin::Mutex<Sched> = spin::Mutex::new(Sched {
    threads: [FREE; MAX_THREADS],
    current: 0,
    idle: usize::MAX,
    hooks: [None; MAX_HOOKS],
});

static READY: AtomicBool = AtomicBool::new(false);
static NEED_RESCHED: AtomicBool = AtomicBool::new(false);
static PREEMPT_COUNT: AtomicU32 = AtomicU32::new(0);
static CONTEXT_SWITCHES: AtomicU64 = AtomicU64::new(0);
static PREEMPTIONS: AtomicU64 = AtomicU64::new(0);
static SPAWNED: AtomicU64 = AtomicU64::new(0);
/// Resched requests deferred because preemption was disabled.
static DEFERRED: AtomicU64 = AtomicU64::new(0);

fn locked<T>(f: impl FnOnce(&mut Sched) -> T) -> T {
    let _irq = irq::save();
    f(&mut SCHED.lock())
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
        s.current = 0;
    });
    SPAWNED.store(1, Ordering::Relaxed);
    READY.store(true, Ordering::Release);
    let idle = spawn("idle", idle_loop, 0)?;
    locked(|s| s.idle = idle.0);
    Ok(())
}

fn idle_loop(_: u64) -> u64 {
    loop {
        let g = irq::save();
        if locked(|s| s.has_ready_besides(s.idle)) {
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
    fn has_ready_besides(&self, skip: usize) -> bool {
        self.threads
            .iter()
            .enumerate()
            .any(|(i, t)| i != skip && i != self.idle && t.state == State::Ready)
    }

    /// Round robin: the next ready thread after the current one; the
    /// current one if it is still runnable and nothing else is; idle last.
    fn pick_next(&self) -> usize {
        let cur = self.current;
        for k in 1..=MAX_THREADS {
            let i = (cur + k) % MAX_THREADS;
            if i != self.idle && self.threads[i].state == State::Ready {
                return i;
            }
        }
        if self.threads[cur].state == State::Running && cur != self.idle {
            return cur;
        }
        self.idle
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
    if !READY.load(Ordering::Acquire) {
        return Err(SchedError::NotReady);
    }
    let stack = kspace::alloc_stack(pages).map_err(SchedError::Stack)?;
    let rsp = switch::initial_frame(stack.top);
    let slot = locked(|s| {
        let slot = s.threads.iter().position(|t| t.state == State::Free)?;
        s.threads[slot] = Thread {
            state: State::Ready,
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
    let (entry, arg) = locked(|s| {
        let t = &s.threads[s.current];
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
        let cur = s.current;
        s.threads[cur].state = State::Dead;
        s.threads[cur].result = result;
        for t in s.threads.iter_mut() {
            if t.state == (State::Joining { target: cur }) {
                t.state = State::Ready;
            }
        }
    });
    schedule(false);
    unreachable!("a dead thread was scheduled again");
}

/// Waits for `id` to end, frees its stack and returns its result.
pub fn join(id: ThreadId) -> Result<u64, SchedError> {
    loop {
        let g = irq::save();
        let outcome = locked(|s| {
            let cur = s.current;
            if id.0 == cur {
                return Some(Err(SchedError::JoinSelf));
            }
            match s.threads.get(id.0).map(|t| t.state) {
                None | Some(State::Free) => Some(Err(SchedError::NoSuchThread(id))),
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
        let cur = s.current;
        s.threads[cur].state = State::Sleeping { until_ns };
    });
    schedule(false);
}

/// The running thread.
pub fn current() -> ThreadId {
    ThreadId(locked(|s| s.current))
}

/// The running thread's name.
pub fn current_name() -> &'static str {
    locked(|s| s.threads[s.current].name)
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
    let preempt = PREEMPT_COUNT.load(Ordering::Relaxed);
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
    let mut sched = SCHED.lock();
    let s = &mut *sched;
    let cur = s.current;
    let next = s.pick_next();
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
    s.current = next;
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
    // `initial_frame` or saved by an earlier switch.
    unsafe { switch::switch_stacks(from_rsp, to_rsp) };
}

/// Called by the timer interrupt: wakes sleepers whose time came and asks
/// for a switch if another thread can run.
pub fn tick(now_ns: u64) {
    if !READY.load(Ordering::Acquire) {
        return;
    }
    let mut s = SCHED.lock();
    for t in s.threads.iter_mut() {
        if let State::Sleeping { until_ns } = t.state {
            if until_ns <= now_ns {
                t.state = State::Ready;
            }
        }
    }
    let cur = s.current;
    if s.has_ready_besides(cur) || (cur == s.idle && s.has_ready_besides(usize::MAX)) {
        NEED_RESCHED.store(true, Ordering::Relaxed);
    }
}

/// Called by the dispatcher when the outermost interrupt handler is done,
/// interrupts still off: the one place where a thread is preempted.
pub fn irq_return() {
    if !NEED_RESCHED.load(Ordering::Relaxed) {
        return;
    }
    if PREEMPT_COUNT.load(Ordering::Relaxed) != 0 {
        DEFERRED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    NEED_RESCHED.store(false, Ordering::Relaxed);
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
    PREEMPT_COUNT.fetch_add(1, Ordering::Relaxed);
    PreemptGuard {
        _cpu_bound: core::marker::PhantomData,
    }
}

impl Drop for PreemptGuard {
    fn drop(&mut self) {
        let left = PREEMPT_COUNT.fetch_sub(1, Ordering::Relaxed) - 1;
        if left == 0
            && NEED_RESCHED.load(Ordering::Relaxed)
            && irq::enabled()
            && !irq::in_interrupt()
        {
            let _g = irq::save();
            NEED_RESCHED.store(false, Ordering::Relaxed);
            schedule(true);
        }
    }
}

/// This CPU's preemption count.
pub fn preempt_count() -> u32 {
    PREEMPT_COUNT.load(Ordering::Relaxed)
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
}

/// The counters.
pub fn stats() -> Stats {
    Stats {
        context_switches: CONTEXT_SWITCHES.load(Ordering::Relaxed),
        preemptions: PREEMPTIONS.load(Ordering::Relaxed),
        threads: SPAWNED.load(Ordering::Relaxed),
        deferred: DEFERRED.load(Ordering::Relaxed),
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
