//! Preemptive kernel threads with one run queue per CPU: `spawn` /
//! `yield_now` / `sleep_ns` / `join` / `park` / `unpark`, a per-CPU
//! preemption count with RAII guards, and a context-switch hook list.
//!
//! Each spawned thread runs on its own stack, mapped through pvmmu in the
//! kernel's stack area with an unmapped guard page below it (see
//! [`crate::kspace`]); the boot thread ("main") keeps the boot stack, whose
//! guard page the boot path unmapped.
//!
//! **Run queues.** Every CPU has its own queue of ready threads behind its
//! own lock ([`runq`]); a CPU picks its next thread from its queue only
//! (first in, first out; its idle thread when the queue is empty). Each
//! thread belongs to one CPU's queue at a time (`CPU_OF`), including while
//! it runs or is blocked there:
//! - a spawned thread goes to its pinned CPU, or (`spawn_near`) the CPU
//!   asked for, or the least loaded online CPU (queued plus running,
//!   preferring the spawner's on a tie); a reschedule IPI tells that CPU
//!   if it is not the spawner's;
//! - a CPU about to run its idle thread first steals one ready, unpinned
//!   thread whose registers are saved from the CPU with the longest queue;
//!   and at each tick a CPU whose queue is two or more shorter than the
//!   longest pulls one the same way (the periodic balance between busy
//!   CPUs). Both are counted as steals.
//! - a wake-up (a sleeper's time came, a joined thread exited, `unpark`)
//!   puts the thread on its own CPU's queue, and if that is not the waker's
//!   CPU sends it a reschedule IPI (under Xen PV an event channel per vCPU).
//!   Sleepers are woken by their own CPU's tick (the timer is per CPU).
//! - a thread pinned to another CPU than the one it runs on
//!   ([`pin_current`]) is handed to that CPU's queue by the next thread on
//!   the old CPU, once the switch saved its registers, plus an IPI.
//! - pinned threads are never stolen.
//!
//! **Locks and their order.** Run-queue locks (`RQ[cpu]`), then a thread's
//! descriptor lock (`THREADS[t]`, a leaf: one at a time, held for a few
//! loads and stores). Two run-queue locks (a steal, a hand-off, a join
//! that looks at its target's queue) are taken in increasing CPU id
//! ([`with_two`]). Every one of them is taken with interrupts off (the
//! tick and the IPI take them), none is held across the stack switch, and
//! nothing waits for another CPU while holding one (a run-queue or
//! descriptor lock taken or released with interrupts on panics: the tick
//! taking it on the same CPU would spin forever). A thread's state
//! changes only under the lock of the queue it belongs to, and `CPU_OF`
//! only under both the old and the new queue's locks, so whoever holds the
//! queue lock `CPU_OF[t]` named when it locked owns `t`'s state.
//!
//! **On-CPU owner.** `OWNER[t]` is the CPU whose context holds thread `t`:
//! set (compare-and-swap from none: a second CPU finding it set panics,
//! "run twice at once") when a CPU switches to `t`, cleared by the next
//! thread on that CPU once the switch has saved `t`'s registers
//! (`finish_switch`). A CPU picks, and a steal takes, only a thread whose
//! owner is none (or, on its own CPU, the running thread itself); `join`
//! frees a dead thread's stack only once its owner is none. (Either check
//! alone keeps a thread from running twice: a steal that moved an owned
//! thread leaves it queued until the owner clears, and a pick never meets
//! an owned thread that a steal did not bring. Both are kept; removing
//! each alone was tried and no test can tell.)
//!
//! Preemption happens only at interrupt return (the dispatcher calls
//! [`irq_return`] when the outermost handler ends), and only when this CPU's
//! preemption count is 0; otherwise the request stays pending and is taken
//! when the last [`PreemptGuard`] drops or the thread yields. A thread
//! never switches inside a nested handler: the dispatcher has already left
//! the handler depth when it asks.
//!
//! Order of operations at a switch (interrupts off throughout):
//! 1. under this CPU's queue lock the scheduler requeues the outgoing
//!    thread if it is still runnable here, picks the next one, and updates
//!    both states and the owner;
//! 2. every registered [`SwitchHook`] runs, in registration order, with the
//!    outgoing and incoming thread ids, on the outgoing thread's stack (this
//!    is where lazy MMU batches are drained and kmaps saved);
//! 3. the stacks are switched: callee-saved registers are pushed on the
//!    outgoing stack, its stack pointer saved, the incoming one loaded;
//! 4. the incoming thread clears the outgoing one's owner and, if it was
//!    pinned away, hands it to its CPU's queue.
//!
//! Invariant: exactly one thread is `Running` on each CPU and its owner is
//! that CPU; an involuntary switch with a non-zero preemption count is a
//! bug that panics.

mod runq;
mod switch;

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crate::kspace::{self, KspaceError, Stack};
use crate::percpu::{self, MAX_CPUS};
use crate::{ipi, irq};
use runq::{Rq, RunQueue};

/// Most threads alive at once (including main and the idle threads).
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
    /// No such CPU online.
    NoSuchCpu(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Ready,
    Running,
    Sleeping { until_ns: u64 },
    Joining { target: usize },
    Parked,
    Dead,
}

#[derive(Clone, Copy)]
struct Thread {
    state: State,
    name: &'static str,
    stack: Option<Stack>,
    entry: Option<Entry>,
    arg: u64,
    result: u64,
    /// Times the timer took the CPU away from it.
    preemptions: u64,
    /// The only CPU it may run on, if pinned.
    affinity: Option<usize>,
    /// A CPU's idle thread (never queued, never joined).
    idle: bool,
    /// Where it last ran.
    last_cpu: usize,
    /// An `unpark` came while it was not parked: the next `park` returns.
    wake_token: bool,
}

const FREE: Thread = Thread {
    state: State::Free,
    name: "",
    stack: None,
    entry: None,
    arg: 0,
    result: 0,
    preemptions: 0,
    affinity: None,
    idle: false,
    last_cpu: 0,
    wake_token: false,
};

/// "No CPU" in `OWNER` and `migrate_to`.
const NO_CPU: usize = usize::MAX;

/// Thread descriptors (leaf locks; see the module docs for who owns a
/// thread's state).
static THREADS: [Slot; MAX_THREADS] = [const { Slot::new() }; MAX_THREADS];

/// A thread descriptor behind its leaf lock, which is taken and released
/// only with interrupts off: the tick and the reschedule IPI take
/// descriptor locks (`schedule` takes the running thread's), so one still
/// held when interrupts come back on deadlocks its CPU if an interrupt that
/// switches lands in that window. Checked at both ends, in every build: a
/// guard that outlives the [`irq::IrqGuard`] meant to cover it (a temporary
/// in a block's tail expression is dropped after the block's locals) panics
/// at its release instead of hanging a later switch.
struct Slot(spin::Mutex<Thread>);

impl Slot {
    const fn new() -> Self {
        Slot(spin::Mutex::new(FREE))
    }

    /// Locks the descriptor. Interrupts must be off (checked).
    fn lock(&self) -> SlotGuard<'_> {
        assert!(
            !irq::enabled(),
            "thread descriptor locked with interrupts on"
        );
        SlotGuard(self.0.lock())
    }
}

/// A locked descriptor; checks at release that interrupts are still off.
struct SlotGuard<'a>(spin::MutexGuard<'a, Thread>);

impl core::ops::Deref for SlotGuard<'_> {
    type Target = Thread;
    fn deref(&self) -> &Thread {
        &self.0
    }
}

impl core::ops::DerefMut for SlotGuard<'_> {
    fn deref_mut(&mut self) -> &mut Thread {
        &mut self.0
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        // Before the lock is released (the field drops after this).
        if irq::enabled() {
            // No tick may switch into a spin on this lock during the panic.
            irq::disable();
            panic!(
                "thread descriptor released with interrupts on (an interrupt \
                 switching here would spin on it forever)"
            );
        }
    }
}
/// Saved stack pointers (written by the switch itself).
static RSP: [AtomicU64; MAX_THREADS] = [const { AtomicU64::new(0) }; MAX_THREADS];
/// The CPU whose run queue each thread belongs to.
static CPU_OF: [AtomicUsize; MAX_THREADS] = [const { AtomicUsize::new(0) }; MAX_THREADS];
/// The CPU whose context holds each thread (see the module docs).
static OWNER: [AtomicUsize; MAX_THREADS] = [const { AtomicUsize::new(NO_CPU) }; MAX_THREADS];
/// Slots in use (bit per thread).
static SLOTS: AtomicU64 = AtomicU64::new(0);
/// Every CPU's run queue.
static RQ: [Rq; MAX_CPUS] = [const { Rq::new() }; MAX_CPUS];
/// Switch hooks (function pointers; null: free slot).
static HOOKS: [AtomicPtr<()>; MAX_HOOKS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_HOOKS];

static READY: AtomicBool = AtomicBool::new(false);
static CONTEXT_SWITCHES: AtomicU64 = AtomicU64::new(0);
static PREEMPTIONS: AtomicU64 = AtomicU64::new(0);
static SPAWNED: AtomicU64 = AtomicU64::new(0);
/// Resched requests deferred because preemption was disabled.
static DEFERRED: AtomicU64 = AtomicU64::new(0);
/// Switches of a thread from one CPU to another.
static MIGRATIONS: AtomicU64 = AtomicU64::new(0);
/// Threads moved from another CPU's queue to an idle or less loaded one.
static STEALS: AtomicU64 = AtomicU64::new(0);
/// Of those, the ones the tick's balance pulled (the CPU was not idle).
static BALANCE_PULLS: AtomicU64 = AtomicU64::new(0);
/// Wake-ups that put a thread on another CPU's queue (each with an IPI).
static REMOTE_WAKEUPS: AtomicU64 = AtomicU64::new(0);
/// Threads a spawn placed on another CPU's queue than the spawner's.
static REMOTE_SPAWNS: AtomicU64 = AtomicU64::new(0);
/// Pinned threads handed to their CPU after a switch.
static HANDOFFS: AtomicU64 = AtomicU64::new(0);

fn bit(t: usize) -> u64 {
    1u64 << t
}

/// The running thread of this CPU (interrupts off: no migration).
fn cur() -> usize {
    // SAFETY: callers run with interrupts off (an `IrqGuard` or a handler).
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

fn idle_of(cpu: usize) -> usize {
    percpu::CPUS[cpu].idle.load(Ordering::Acquire)
}

fn online(cpu: usize) -> bool {
    percpu::cpu(cpu).is_some_and(|c| c.online.load(Ordering::Acquire))
}

/// Runs `f` with the queues of CPUs `a` and `b` locked (in increasing CPU
/// id: the one lock order for two queues); `f` gets `a`'s queue and, if
/// `b` is another CPU, `b`'s. Interrupts must be off.
fn with_two<T>(a: usize, b: usize, f: impl FnOnce(&mut RunQueue, Option<&mut RunQueue>) -> T) -> T {
    if a == b {
        let mut g = RQ[a].lock();
        return f(&mut g, None);
    }
    let mut lo = RQ[a.min(b)].lock();
    let mut hi = RQ[a.max(b)].lock();
    if a < b {
        f(&mut lo, Some(&mut hi))
    } else {
        f(&mut hi, Some(&mut lo))
    }
}

/// Runs `f` with `me`'s queue and thread `t`'s queue locked; `f` gets
/// (`me`'s queue, `t`'s queue if another, `t`'s CPU). Retries if `t` moved
/// between reading its CPU and locking.
fn with_thread_rq<T>(
    me: usize,
    t: usize,
    mut f: impl FnMut(&mut RunQueue, Option<&mut RunQueue>, usize) -> T,
) -> T {
    loop {
        let tc = CPU_OF[t].load(Ordering::Acquire);
        let r = with_two(me, tc, |a, b| {
            (CPU_OF[t].load(Ordering::Acquire) == tc).then(|| f(a, b, tc))
        });
        if let Some(r) = r {
            return r;
        }
    }
}

/// Makes the running boot code thread 0 ("main") on CPU 0 and creates
/// CPU 0's idle thread. Interrupts stay as they are.
pub fn init() -> Result<(), SchedError> {
    {
        let _irq = irq::save();
        *THREADS[0].lock() = Thread {
            state: State::Running,
            name: "main",
            ..FREE
        };
        SLOTS.fetch_or(bit(0), Ordering::AcqRel);
        CPU_OF[0].store(0, Ordering::Release);
        OWNER[0].store(0, Ordering::Release);
        set_cur(0);
    }
    SPAWNED.store(1, Ordering::Relaxed);
    READY.store(true, Ordering::Release);
    // Runs when CPU 0 has nothing queued (its first frame is built).
    spawn_idle_for(0).map(|_| ())
}

/// Makes the code running on a CPU that is coming up its idle thread,
/// `thread` (made for it by [`spawn_idle_for`], never started; the CPU
/// runs on its stack).
pub fn adopt_idle(cpu: usize, thread: ThreadId) {
    let _irq = irq::save();
    {
        let mut t = THREADS[thread.0].lock();
        t.state = State::Running;
        t.last_cpu = cpu;
    }
    CPU_OF[thread.0].store(cpu, Ordering::Release);
    OWNER[thread.0].store(cpu, Ordering::Release);
    set_cur(thread.0);
}

/// Creates the idle thread of CPU `cpu` (never queued: a CPU runs it when
/// its queue is empty; an AP starts on its stack and adopts it with
/// [`adopt_idle`]).
pub fn spawn_idle_for(cpu: usize) -> Result<(ThreadId, Stack), SchedError> {
    if cpu >= MAX_CPUS {
        return Err(SchedError::NoSuchCpu(cpu));
    }
    let id = create(
        "idle",
        idle_loop,
        cpu as u64,
        DEFAULT_STACK_PAGES,
        Place::Idle(cpu),
    )?;
    percpu::CPUS[cpu].idle.store(id.0, Ordering::Release);
    let _irq = irq::save();
    let stack = THREADS[id.0].lock().stack;
    stack.map(|st| (id, st)).ok_or(SchedError::NoSuchThread(id))
}

/// The idle loop of every CPU: run what is queued here, else steal, else
/// wait for an interrupt (the tick, an IPI).
pub fn idle_loop(_: u64) -> u64 {
    loop {
        let g = irq::save();
        let cpu = percpu::cpu_id();
        if RQ[cpu].queued() > 0 || steal_into(cpu, 1) {
            schedule(false);
            drop(g);
        } else {
            // Enables interrupts atomically with the wait.
            irq::wait_for_interrupt();
            drop(g);
        }
    }
}

/// Moves one ready, unpinned thread whose registers are saved from the CPU
/// with the longest queue (at least `min_len` long) to `me`'s queue.
/// Returns whether one moved. Interrupts must be off.
fn steal_into(me: usize, min_len: usize) -> bool {
    let victim = (0..MAX_CPUS)
        .filter(|&c| c != me && online(c))
        .max_by_key(|&c| RQ[c].queued())
        .filter(|&c| RQ[c].queued() >= min_len.max(1));
    let Some(v) = victim else {
        return false;
    };
    let moved = with_two(me, v, |mine, theirs| {
        let theirs = theirs?;
        if theirs.len() < min_len {
            return None;
        }
        let t = theirs.take_last(|i| {
            OWNER[i].load(Ordering::Acquire) == NO_CPU && THREADS[i].lock().affinity.is_none()
        })?;
        CPU_OF[t].store(me, Ordering::Release);
        mine.push(t);
        Some(t)
    });
    if moved.is_some() {
        STEALS.fetch_add(1, Ordering::Relaxed);
    }
    moved.is_some()
}

/// Where a new thread goes.
#[derive(Clone, Copy)]
enum Place {
    /// The idle thread of this CPU: never queued.
    Idle(usize),
    /// Pinned to this CPU.
    Pinned(usize),
    /// On this CPU's queue, free to be stolen.
    Near(usize),
    /// The least loaded online CPU.
    Balanced,
}

/// The least loaded online CPU (queued plus running threads), the
/// caller's on a tie.
fn least_loaded() -> usize {
    let me = percpu::cpu_id();
    let load = |c: usize| {
        let pc = &percpu::CPUS[c];
        let busy = pc.current.load(Ordering::Relaxed) != pc.idle.load(Ordering::Relaxed);
        RQ[c].queued() + usize::from(busy)
    };
    (0..MAX_CPUS)
        .filter(|&c| online(c))
        .min_by_key(|&c| (load(c), c != me, c))
        .unwrap_or(me)
}

/// Spawns a thread with a stack of [`DEFAULT_STACK_PAGES`] on the least
/// loaded online CPU.
pub fn spawn(name: &'static str, entry: Entry, arg: u64) -> Result<ThreadId, SchedError> {
    spawn_with_stack(name, entry, arg, DEFAULT_STACK_PAGES)
}

/// Spawns a thread with a stack of `pages` pages on the least loaded online
/// CPU; it starts on the next switch to it, with interrupts on.
pub fn spawn_with_stack(
    name: &'static str,
    entry: Entry,
    arg: u64,
    pages: usize,
) -> Result<ThreadId, SchedError> {
    create(name, entry, arg, pages, Place::Balanced)
}

/// Spawns an unpinned thread on `cpu`'s queue (other CPUs may steal it).
pub fn spawn_near(
    cpu: usize,
    name: &'static str,
    entry: Entry,
    arg: u64,
) -> Result<ThreadId, SchedError> {
    create(name, entry, arg, DEFAULT_STACK_PAGES, Place::Near(cpu))
}

/// Creates a thread with a fresh stack and its first frame and puts it
/// where `place` says.
fn create(
    name: &'static str,
    entry: Entry,
    arg: u64,
    pages: usize,
    place: Place,
) -> Result<ThreadId, SchedError> {
    // A thread placed on a CPU needs that CPU up (its idle thread is
    // created while it comes up).
    if let Place::Pinned(c) | Place::Near(c) = place {
        if !online(c) {
            return Err(SchedError::NoSuchCpu(c));
        }
    }
    if !READY.load(Ordering::Acquire) {
        return Err(SchedError::NotReady);
    }
    let stack = kspace::alloc_stack(pages).map_err(SchedError::Stack)?;
    let rsp = switch::initial_frame(stack.top);
    let Some(slot) = claim_slot() else {
        if let Err(e) = kspace::free_stack(stack) {
            log::error!("spawn: cannot free the unused stack: {e:?}");
        }
        return Err(SchedError::TooManyThreads);
    };
    let _irq = irq::save();
    let (cpu, affinity, idle) = match place {
        Place::Idle(c) => (c, Some(c), true),
        Place::Pinned(c) => (c, Some(c), false),
        Place::Near(c) => (c, None, false),
        Place::Balanced => (least_loaded(), None, false),
    };
    RSP[slot].store(rsp, Ordering::Relaxed);
    CPU_OF[slot].store(cpu, Ordering::Release);
    {
        let mut rq = RQ[cpu].lock();
        *THREADS[slot].lock() = Thread {
            state: State::Ready,
            name,
            stack: Some(stack),
            entry: Some(entry),
            arg,
            affinity,
            idle,
            last_cpu: cpu,
            ..FREE
        };
        if !idle {
            rq.push(slot);
        }
    }
    SPAWNED.fetch_add(1, Ordering::Relaxed);
    if !idle && cpu != percpu::cpu_id() {
        REMOTE_SPAWNS.fetch_add(1, Ordering::Relaxed);
        ipi::send_resched(cpu);
    }
    Ok(ThreadId(slot))
}

/// Claims a free slot whose last thread's context is gone.
fn claim_slot() -> Option<usize> {
    loop {
        let used = SLOTS.load(Ordering::Acquire);
        let slot = (0..MAX_THREADS)
            .find(|&i| used & bit(i) == 0 && OWNER[i].load(Ordering::Acquire) == NO_CPU)?;
        if SLOTS
            .compare_exchange(used, used | bit(slot), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Some(slot);
        }
    }
}

/// First Rust code of a new thread (called by the switch trampoline, on
/// the new stack, interrupts off).
extern "C" fn thread_start() -> ! {
    finish_switch();
    let (entry, arg) = {
        let t = THREADS[cur()].lock();
        (t.entry, t.arg)
    };
    irq::enable();
    let result = match entry {
        Some(f) => f(arg),
        None => 0,
    };
    exit(result)
}

/// Wakes `t` (blocked on `tc`, whose queue `q` is locked): ready, queued.
fn make_ready(q: &mut RunQueue, t: usize, th: &mut Thread) {
    th.state = State::Ready;
    q.blocked &= !bit(t);
    q.push(t);
}

/// After a wake-up that queued a thread on `tc`: tell `tc` if it is
/// another CPU.
fn kick_after_wake(tc: usize) {
    if tc != percpu::cpu_id() {
        REMOTE_WAKEUPS.fetch_add(1, Ordering::Relaxed);
        ipi::send_resched(tc);
    }
}

/// Ends the current thread with `result` (for `join`). Never returns.
pub fn exit(result: u64) -> ! {
    let _g = irq::save();
    let me = cur();
    let cpu = percpu::cpu_id();
    {
        let _rq = RQ[cpu].lock();
        let mut t = THREADS[me].lock();
        t.state = State::Dead;
        t.result = result;
    }
    // Joiners: blocked on some CPU's queue, waiting for `me`.
    for c in (0..MAX_CPUS).filter(|&c| online(c)) {
        let woke = {
            let mut rq = RQ[c].lock();
            let mut woke = false;
            let mut blocked = rq.blocked;
            while blocked != 0 {
                let t = blocked.trailing_zeros() as usize;
                blocked &= blocked - 1;
                let mut th = THREADS[t].lock();
                if th.state == (State::Joining { target: me }) {
                    make_ready(&mut rq, t, &mut th);
                    woke = true;
                }
            }
            woke
        };
        if woke {
            kick_after_wake(c);
        }
    }
    schedule(false);
    unreachable!("a dead thread was scheduled again");
}

/// Waits for `id` to end, frees its stack and returns its result.
pub fn join(id: ThreadId) -> Result<u64, SchedError> {
    if id.0 >= MAX_THREADS {
        return Err(SchedError::NoSuchThread(id));
    }
    loop {
        let g = irq::save();
        let me = cur();
        if id.0 == me {
            return Err(SchedError::JoinSelf);
        }
        let cpu = percpu::cpu_id();
        let outcome = with_thread_rq(cpu, id.0, |mine, _, _| {
            let target = *THREADS[id.0].lock();
            let block = |mine: &mut RunQueue, state: State| {
                THREADS[me].lock().state = state;
                mine.blocked |= bit(me);
                None
            };
            match target.state {
                _ if target.idle => Some(Err(SchedError::NoSuchThread(id))),
                State::Free => Some(Err(SchedError::NoSuchThread(id))),
                // Dead but still finishing its last switch on a CPU: its
                // stack is in use for a few more instructions. Retry at
                // this CPU's next tick.
                State::Dead if OWNER[id.0].load(Ordering::Acquire) != NO_CPU => {
                    block(mine, State::Sleeping { until_ns: 0 })
                }
                State::Dead => {
                    *THREADS[id.0].lock() = FREE;
                    SLOTS.fetch_and(!bit(id.0), Ordering::AcqRel);
                    Some(Ok(target))
                }
                _ => block(mine, State::Joining { target: id.0 }),
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

/// Gives the CPU to the next ready thread of this CPU, if any.
pub fn yield_now() {
    let _g = irq::save();
    schedule(false);
}

/// Blocks the running thread in `state` on this CPU's queue, then switches.
fn block_current(state: State) {
    let _g = irq::save();
    let cpu = percpu::cpu_id();
    {
        let mut rq = RQ[cpu].lock();
        let me = cur();
        THREADS[me].lock().state = state;
        rq.blocked |= bit(me);
    }
    schedule(false);
}

/// Sleeps at least `ns` nanoseconds (woken by this CPU's tick after).
pub fn sleep_ns(ns: u64) {
    let until_ns = crate::clock::now_ns() + ns;
    block_current(State::Sleeping { until_ns });
}

/// Blocks until [`unpark`] is called for this thread; returns at once if
/// it was called since the last `park` returned (no wake-up is lost).
pub fn park() {
    let _g = irq::save();
    let cpu = percpu::cpu_id();
    let parked = {
        let _rq = RQ[cpu].lock();
        let mut t = THREADS[cur()].lock();
        if t.wake_token {
            t.wake_token = false;
            false
        } else {
            t.state = State::Parked;
            true
        }
    };
    if parked {
        schedule(false);
    }
}

/// Wakes `id` if it is parked (on its CPU's queue, with a reschedule IPI
/// if that is another CPU), or makes its next [`park`] return at once.
pub fn unpark(id: ThreadId) -> Result<(), SchedError> {
    if id.0 >= MAX_THREADS {
        return Err(SchedError::NoSuchThread(id));
    }
    let _g = irq::save();
    let cpu = percpu::cpu_id();
    let (woke, tc) = with_thread_rq(cpu, id.0, |mine, theirs, tc| {
        let q = match theirs {
            Some(q) => q,
            None => mine,
        };
        let mut th = THREADS[id.0].lock();
        match th.state {
            State::Free | State::Dead => Err(SchedError::NoSuchThread(id)),
            _ if th.idle => Err(SchedError::NoSuchThread(id)),
            State::Parked => {
                make_ready(q, id.0, &mut th);
                Ok((true, tc))
            }
            _ => {
                th.wake_token = true;
                Ok((false, tc))
            }
        }
    })?;
    if woke {
        kick_after_wake(tc);
    }
    Ok(())
}

/// Pins the running thread to `cpu` (`None`: may run anywhere) and, if it
/// is on another CPU, switches away so that `cpu` picks it up. A CPU that
/// is not online is refused (logged; the affinity is left as it was).
pub fn pin_current(cpu: Option<usize>) {
    if let Some(c) = cpu.filter(|&c| !online(c)) {
        log::warn!("pin_current: cpu {c} is not online; not pinned");
        return;
    }
    {
        let _g = irq::save();
        let me = cur();
        let _rq = RQ[percpu::cpu_id()].lock();
        THREADS[me].lock().affinity = cpu;
    }
    while cpu.is_some_and(|c| c != percpu::cpu_id()) {
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
    create(name, entry, arg, pages, Place::Pinned(cpu))
}

/// The running thread.
pub fn current() -> ThreadId {
    let _g = irq::save();
    ThreadId(cur())
}

/// The running thread's name.
pub fn current_name() -> &'static str {
    let _g = irq::save();
    // A local, not a temporary of the tail expression: released before
    // `_g` turns interrupts back on (see [`Slot`]).
    let t = THREADS[cur()].lock();
    t.name
}

/// The CPU whose context holds `id` right now (a snapshot), if any.
pub fn owner_cpu(id: ThreadId) -> Option<usize> {
    OWNER
        .get(id.0)
        .map(|o| o.load(Ordering::Acquire))
        .filter(|&c| c != NO_CPU)
}

/// Registers a hook called at every switch (see the module docs).
pub fn register_switch_hook(hook: SwitchHook) -> Result<(), SchedError> {
    let p = hook as *mut ();
    HOOKS
        .iter()
        .find(|slot| {
            slot.compare_exchange(
                core::ptr::null_mut(),
                p,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        })
        .map(|_| ())
        .ok_or(SchedError::TooManyHooks)
}

/// Runs the registered hooks, in registration order.
fn run_hooks(from: usize, to: usize) {
    for slot in &HOOKS {
        let p = slot.load(Ordering::Acquire);
        if p.is_null() {
            break;
        }
        // SAFETY: every non-null slot holds a `SwitchHook` stored by
        // `register_switch_hook` (a function pointer cast to a data
        // pointer of the same size), never changed afterwards.
        let hook: SwitchHook = unsafe { core::mem::transmute::<*mut (), SwitchHook>(p) };
        hook(ThreadId(from), ThreadId(to));
    }
}

/// Switches to the next thread of this CPU's queue (its idle thread if
/// none). Interrupts must be off.
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
    let cur = cur();
    let idle = idle_of(cpu);
    // About to go idle: pull work from the busiest CPU first.
    if RQ[cpu].queued() == 0 {
        let stays = cur != idle && {
            let t = THREADS[cur].lock();
            t.state == State::Running && t.affinity.is_none_or(|c| c == cpu)
        };
        if !stays {
            steal_into(cpu, 1);
        }
    }
    let mut rq = RQ[cpu].lock();
    let (state, affinity) = {
        let t = THREADS[cur].lock();
        (t.state, t.affinity)
    };
    let runnable = state == State::Running && cur != idle;
    let here = affinity.is_none_or(|c| c == cpu);
    // The oldest queued thread whose registers are saved (or the running
    // one, queued again by a wake-up that came before it switched out).
    let next = match rq.take_first(|i| i == cur || OWNER[i].load(Ordering::Acquire) == NO_CPU) {
        Some(n) => n,
        None if runnable && here => return,
        None => idle,
    };
    if next == cur {
        THREADS[cur].lock().state = State::Running;
        return;
    }
    {
        let mut t = THREADS[cur].lock();
        if runnable {
            t.state = State::Ready;
            if here {
                rq.push(cur);
            } else if let Some(to) = affinity {
                // Handed to its CPU once its registers are saved.
                // SAFETY: interrupts are off.
                unsafe { percpu::this_cpu_irqs_off() }
                    .migrate_to
                    .store(to, Ordering::Relaxed);
            }
        }
        if involuntary {
            t.preemptions += 1;
            PREEMPTIONS.fetch_add(1, Ordering::Relaxed);
        }
    }
    {
        let mut t = THREADS[next].lock();
        t.state = State::Running;
        if t.last_cpu != cpu && !t.idle {
            MIGRATIONS.fetch_add(1, Ordering::Relaxed);
        }
        t.last_cpu = cpu;
    }
    if let Err(other) =
        OWNER[next].compare_exchange(NO_CPU, cpu, Ordering::AcqRel, Ordering::Acquire)
    {
        panic!("thread {next} picked on cpu {cpu} while cpu {other} runs it");
    }
    set_cur(next);
    // SAFETY: interrupts are off.
    let pc = unsafe { percpu::this_cpu_irqs_off() };
    pc.prev.store(cur, Ordering::Relaxed);
    pc.switches.fetch_add(1, Ordering::Relaxed);
    drop(rq);
    CONTEXT_SWITCHES.fetch_add(1, Ordering::Relaxed);
    run_hooks(cur, next);
    // SAFETY: interrupts are off and no lock is held; `RSP[cur]` is the
    // outgoing thread's slot in a static (stable address) and `RSP[next]`
    // the incoming thread's saved stack pointer, built by `initial_frame`
    // or saved by an earlier switch; this CPU just became its owner (the
    // compare-and-swap above), so no other CPU runs on that stack.
    unsafe { switch::switch_stacks(RSP[cur].as_ptr(), RSP[next].load(Ordering::Acquire)) };
    finish_switch();
}

/// Run by the incoming thread right after a switch: the outgoing thread's
/// registers are saved now, so other CPUs may pick it; one pinned away is
/// handed to its CPU's queue.
fn finish_switch() {
    // SAFETY: interrupts are off until the switch path is left.
    let pc = unsafe { percpu::this_cpu_irqs_off() };
    let prev = pc.prev.swap(percpu::NO_THREAD, Ordering::Relaxed);
    let to = pc.migrate_to.swap(NO_CPU, Ordering::Relaxed);
    if percpu::is_none(prev) {
        return;
    }
    OWNER[prev].store(NO_CPU, Ordering::Release);
    if to == NO_CPU {
        return;
    }
    let cpu = percpu::cpu_id();
    with_two(cpu, to, |_, theirs| {
        if let Some(q) = theirs {
            CPU_OF[prev].store(to, Ordering::Release);
            q.push(prev);
        }
    });
    HANDOFFS.fetch_add(1, Ordering::Relaxed);
    ipi::send_resched(to);
}

/// Called by this CPU's timer interrupt: balances against the busiest CPU,
/// wakes this CPU's sleepers whose time came and asks for a switch if
/// another thread is queued here.
pub fn tick(now_ns: u64) {
    if !READY.load(Ordering::Acquire) {
        return;
    }
    let cpu = percpu::cpu_id();
    let mine = RQ[cpu].queued();
    let busiest = (0..MAX_CPUS)
        .filter(|&c| c != cpu && online(c))
        .map(|c| RQ[c].queued())
        .max()
        .unwrap_or(0);
    if busiest >= mine + 2 && steal_into(cpu, mine + 2) {
        BALANCE_PULLS.fetch_add(1, Ordering::Relaxed);
    }
    let mut rq = RQ[cpu].lock();
    let mut blocked = rq.blocked;
    while blocked != 0 {
        let t = blocked.trailing_zeros() as usize;
        blocked &= blocked - 1;
        let mut th = THREADS[t].lock();
        if let State::Sleeping { until_ns } = th.state {
            if until_ns <= now_ns {
                make_ready(&mut rq, t, &mut th);
            }
        }
    }
    if rq.len() > 0 {
        percpu::set_need_resched(true);
    }
}

/// Called on a reschedule IPI: something was queued here.
pub fn resched_ipi() {
    if READY.load(Ordering::Acquire) && RQ[percpu::cpu_id()].queued() > 0 {
        percpu::set_need_resched(true);
    }
}

/// Whether CPU `cpu` runs its idle thread (a snapshot).
pub fn cpu_is_idle(cpu: usize) -> bool {
    percpu::cpu(cpu)
        .is_some_and(|pc| pc.current.load(Ordering::Relaxed) == pc.idle.load(Ordering::Relaxed))
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
    /// Threads moved from another CPU's queue (idle steals and the tick's
    /// balance pulls).
    pub steals: u64,
    /// Of those, the tick's balance pulls.
    pub balance_pulls: u64,
    /// Wake-ups that queued a thread on another CPU (each with an IPI).
    pub remote_wakeups: u64,
    /// Spawns placed on another CPU than the spawner's.
    pub remote_spawns: u64,
    /// Running threads pinned away and handed to their CPU.
    pub handoffs: u64,
}

/// The counters.
pub fn stats() -> Stats {
    Stats {
        context_switches: CONTEXT_SWITCHES.load(Ordering::Relaxed),
        preemptions: PREEMPTIONS.load(Ordering::Relaxed),
        threads: SPAWNED.load(Ordering::Relaxed),
        deferred: DEFERRED.load(Ordering::Relaxed),
        migrations: MIGRATIONS.load(Ordering::Relaxed),
        steals: STEALS.load(Ordering::Relaxed),
        balance_pulls: BALANCE_PULLS.load(Ordering::Relaxed),
        remote_wakeups: REMOTE_WAKEUPS.load(Ordering::Relaxed),
        remote_spawns: REMOTE_SPAWNS.load(Ordering::Relaxed),
        handoffs: HANDOFFS.load(Ordering::Relaxed),
    }
}

/// Times `id` was preempted.
pub fn preemptions_of(id: ThreadId) -> u64 {
    let _g = irq::save();
    THREADS.get(id.0).map_or(0, |t| t.lock().preemptions)
}

/// The name of the thread whose stack guard page holds `va`, if any (for
/// the fatal-fault path, which may have interrupted a lock holder).
///
/// # Safety
/// Only from a path that never returns to the interrupted code: the locks
/// are broken if they are held.
pub unsafe fn guard_owner(va: u64) -> Option<&'static str> {
    THREADS.iter().map(|slot| &slot.0).find_map(|slot| {
        if slot.is_locked() {
            // SAFETY: the caller guarantees the holder never runs again.
            unsafe { slot.force_unlock() };
        }
        let t = *slot.lock();
        match (t.state, t.stack) {
            (State::Free, _) | (_, None) => None,
            (_, Some(st)) if st.guard_contains(va) => Some(t.name),
            _ => None,
        }
    })
}

/// The stacks of live threads (for the guard-page test).
pub fn live_stacks(out: &mut [Option<(&'static str, Stack)>; MAX_THREADS]) -> usize {
    let _g = irq::save();
    let mut n = 0;
    for slot in &THREADS {
        let t = *slot.lock();
        if let (State::Free, _) | (_, None) = (t.state, t.stack) {
            continue;
        }
        if let Some(st) = t.stack {
            out[n] = Some((t.name, st));
            n += 1;
        }
    }
    n
}
