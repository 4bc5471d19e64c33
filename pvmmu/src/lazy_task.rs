//! Lazy MMU mode owned by tasks that are preempted, interrupted and moved
//! between CPUs: the hand-off of lazy state that a preemptive kernel's
//! scheduler hook, its interrupt handlers and its lazy sections share.
//!
//! Two pieces, both independent of how the kernel schedules:
//!
//! * [`LazyTasks`]: each task's section depth and whether its current
//!   section was switched out, and each CPU's lazy task. A task's own
//!   entries are changed only by that task ([`LazyTasks::enter`],
//!   [`LazyTasks::leave`]) or by the switch hook on the CPU it runs on
//!   ([`LazyTasks::on_switch`]); a CPU's entry only by that CPU. Every
//!   method takes the CPU it runs on: the caller proves it cannot migrate
//!   (preemption or interrupts off) while the call lasts. The atomics are
//!   relaxed: a task's state crosses CPUs only with the task itself, which
//!   the scheduler's run-queue lock orders.
//! * [`BatchOwner`]: which task's batch is open in a shared address space
//!   and the TLB flushes it owes. It lives under the lock that guards the
//!   space; every change goes through it, so at most one batch is open, and
//!   a change by anyone but its owner (another task, the switch hook, an
//!   interrupt handler) sends it first.
//!
//! Invariant: a batch is open only for a task in lazy mode that has not
//! been switched out since the batch opened; so no batch is ever resumed on
//! another CPU half-sent, and no change overtakes one queued before it.
//!
//! Under `cfg(loom)` the atomics are loom's (`tests/loom_lazy.rs` checks
//! every interleaving of the hand-off for small cases).

#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

#[cfg(not(loom))]
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::backend::Backend;
use crate::phys::FrameAllocator;
use crate::space::{AddressSpace, Error, Flush};

const NONE: usize = usize::MAX;

/// Counters of [`LazyTasks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Outermost sections ended.
    pub batches: u64,
    /// Of those, sections switched out at least once.
    pub batches_preempted: u64,
    /// Sections resumed on another CPU than where they last ran.
    pub migrations: u64,
    /// Batches sent by the switch hook.
    pub switch_closes: u64,
}

/// How an outermost section ended ([`LazyTasks::leave`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionEnd {
    /// The section was switched out at least once.
    pub preempted: bool,
    /// Sending its batch at a switch failed (its writes may be partly
    /// applied).
    pub switch_failed: bool,
}

/// Lazy state of up to `TASKS` tasks on up to `CPUS` CPUs.
pub struct LazyTasks<const CPUS: usize, const TASKS: usize> {
    depth: [AtomicU32; TASKS],
    preempted: [AtomicBool; TASKS],
    switch_failed: [AtomicBool; TASKS],
    section_cpu: [AtomicUsize; TASKS],
    cpu_task: [AtomicUsize; CPUS],
    batches: AtomicU64,
    batches_preempted: AtomicU64,
    migrations: AtomicU64,
    switch_closes: AtomicU64,
}

impl<const CPUS: usize, const TASKS: usize> LazyTasks<CPUS, TASKS> {
    /// No task in lazy mode.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            depth: [const { AtomicU32::new(0) }; TASKS],
            preempted: [const { AtomicBool::new(false) }; TASKS],
            switch_failed: [const { AtomicBool::new(false) }; TASKS],
            section_cpu: [const { AtomicUsize::new(NONE) }; TASKS],
            cpu_task: [const { AtomicUsize::new(NONE) }; CPUS],
            batches: AtomicU64::new(0),
            batches_preempted: AtomicU64::new(0),
            migrations: AtomicU64::new(0),
            switch_closes: AtomicU64::new(0),
        }
    }

    /// No task in lazy mode (loom's atomics are not `const`).
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            depth: core::array::from_fn(|_| AtomicU32::new(0)),
            preempted: core::array::from_fn(|_| AtomicBool::new(false)),
            switch_failed: core::array::from_fn(|_| AtomicBool::new(false)),
            section_cpu: core::array::from_fn(|_| AtomicUsize::new(NONE)),
            cpu_task: core::array::from_fn(|_| AtomicUsize::new(NONE)),
            batches: AtomicU64::new(0),
            batches_preempted: AtomicU64::new(0),
            migrations: AtomicU64::new(0),
            switch_closes: AtomicU64::new(0),
        }
    }

    /// Task `task`, running on `cpu`, enters a section; returns whether it
    /// is the outermost (then `cpu`'s lazy task becomes `task`).
    pub fn enter(&self, task: usize, cpu: usize) -> bool {
        let outermost = self.depth[task].fetch_add(1, Ordering::Relaxed) == 0;
        if outermost {
            self.preempted[task].store(false, Ordering::Relaxed);
            self.switch_failed[task].store(false, Ordering::Relaxed);
            self.cpu_task[cpu].store(task, Ordering::Relaxed);
            self.section_cpu[task].store(cpu, Ordering::Relaxed);
        }
        outermost
    }

    /// Task `task`, running on `cpu`, leaves a section (after sending its
    /// batch if it is the outermost). `Some` for the outermost: then `cpu`
    /// has no lazy task and the section is counted.
    pub fn leave(&self, task: usize, cpu: usize) -> Option<SectionEnd> {
        if self.depth[task].fetch_sub(1, Ordering::Relaxed) != 1 {
            return None;
        }
        self.cpu_task[cpu].store(NONE, Ordering::Relaxed);
        let end = SectionEnd {
            preempted: self.preempted[task].load(Ordering::Relaxed),
            switch_failed: self.switch_failed[task].load(Ordering::Relaxed),
        };
        self.batches.fetch_add(1, Ordering::Relaxed);
        if end.preempted {
            self.batches_preempted.fetch_add(1, Ordering::Relaxed);
        }
        Some(end)
    }

    /// Whether `task` is in lazy mode (its own view: only it and the switch
    /// hook on its CPU change its depth).
    pub fn is_lazy(&self, task: usize) -> bool {
        self.depth[task].load(Ordering::Relaxed) > 0
    }

    /// Whether `task`'s current section was switched out since it began.
    pub fn was_preempted(&self, task: usize) -> bool {
        self.preempted[task].load(Ordering::Relaxed)
    }

    /// The task in lazy mode on `cpu` (the caller runs on `cpu`).
    pub fn cpu_task(&self, cpu: usize) -> Option<usize> {
        let t = self.cpu_task[cpu].load(Ordering::Relaxed);
        (t != NONE).then_some(t)
    }

    /// The switch hook on `cpu` from `from` to `to`. If `from` is in lazy
    /// mode its section is marked preempted and `send(from)` must send its
    /// batch (returning whether it had one open); `cpu` then has no lazy
    /// task. If `to` is in lazy mode it becomes `cpu`'s lazy task (counted
    /// as a migration if its section last ran elsewhere); its next change
    /// opens a new batch. A failed send is kept for `from`'s section end and
    /// returned.
    pub fn on_switch<E>(
        &self,
        cpu: usize,
        from: usize,
        to: usize,
        send: impl FnOnce(usize) -> Result<bool, E>,
    ) -> Result<(), E> {
        let mut result = Ok(());
        if self.is_lazy(from) {
            self.preempted[from].store(true, Ordering::Relaxed);
            match send(from) {
                Ok(true) => {
                    self.switch_closes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(e) => {
                    self.switch_failed[from].store(true, Ordering::Relaxed);
                    result = Err(e);
                }
            }
            self.cpu_task[cpu].store(NONE, Ordering::Relaxed);
        }
        if self.is_lazy(to) {
            self.cpu_task[cpu].store(to, Ordering::Relaxed);
            if self.section_cpu[to].swap(cpu, Ordering::Relaxed) != cpu {
                self.migrations.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// The counters.
    pub fn stats(&self) -> LazyStats {
        LazyStats {
            batches: self.batches.load(Ordering::Relaxed),
            batches_preempted: self.batches_preempted.load(Ordering::Relaxed),
            migrations: self.migrations.load(Ordering::Relaxed),
            switch_closes: self.switch_closes.load(Ordering::Relaxed),
        }
    }
}

impl<const CPUS: usize, const TASKS: usize> Default for LazyTasks<CPUS, TASKS> {
    fn default() -> Self {
        Self::new()
    }
}

/// Something a [`BatchOwner`] opens and closes batches on: an
/// [`AddressSpace`] (a test may stand in its own).
pub trait BatchQueue {
    /// What a failed send reports.
    type Error;
    /// Opens a batch: later changes are queued.
    fn open_batch(&mut self);
    /// Sends the queued changes, then performs `owed`.
    fn close_batch(&mut self, owed: Flush) -> Result<(), Self::Error>;
    /// Performs `flush` now (queued changes first).
    fn flush_now(&mut self, flush: Flush) -> Result<(), Self::Error>;
}

impl<B: Backend, A: FrameAllocator> BatchQueue for AddressSpace<B, A> {
    type Error = Error;
    fn open_batch(&mut self) {
        self.open_lazy();
    }
    fn close_batch(&mut self, owed: Flush) -> Result<(), Error> {
        let closed = self.close_lazy();
        let flushed = self.flush(owed);
        closed.and(flushed)
    }
    fn flush_now(&mut self, flush: Flush) -> Result<(), Error> {
        self.flush(flush)
    }
}

/// The task whose batch is open in a shared space, and the TLB flushes
/// that batch owes. Kept under the space's lock.
#[derive(Debug)]
pub struct BatchOwner {
    owner: Option<usize>,
    owed: Flush,
}

impl Default for BatchOwner {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchOwner {
    /// No batch open.
    pub const fn new() -> Self {
        Self {
            owner: None,
            owed: Flush::none(),
        }
    }

    /// The task whose batch is open.
    pub fn owner(&self) -> Option<usize> {
        self.owner
    }

    /// Sends the open batch, whoever's (its changes, then its owed
    /// flushes); returns whether one was open. The batch counts as closed
    /// even if the send fails.
    pub fn close<Q: BatchQueue>(&mut self, queue: &mut Q) -> Result<bool, Q::Error> {
        if self.owner.take().is_none() {
            return Ok(false);
        }
        let owed = core::mem::replace(&mut self.owed, Flush::none());
        queue.close_batch(owed)?;
        Ok(true)
    }

    /// Sends `task`'s batch if it is the open one (the switch hook, the
    /// task's own flush or section end).
    pub fn close_for<Q: BatchQueue>(
        &mut self,
        queue: &mut Q,
        task: usize,
    ) -> Result<bool, Q::Error> {
        if self.owner != Some(task) {
            return Ok(false);
        }
        self.close(queue)
    }

    /// Runs `change` in `task`'s batch: another task's open batch is sent
    /// first, `task`'s is opened if none is; the change's flush is owed
    /// until the batch closes.
    pub fn apply<Q: BatchQueue>(
        &mut self,
        queue: &mut Q,
        task: usize,
        change: impl FnOnce(&mut Q) -> Result<Flush, Q::Error>,
    ) -> Result<(), Q::Error> {
        if self.owner.is_some_and(|o| o != task) {
            self.close(queue)?;
        }
        if self.owner.is_none() {
            queue.open_batch();
            self.owner = Some(task);
        }
        let flush = change(queue)?;
        self.owed = self.owed.merge(flush);
        Ok(())
    }

    /// Runs `change` outside any batch (an interrupt handler, a caller not
    /// in lazy mode): the open batch is sent first, then the change, whose
    /// flush is done before this returns.
    pub fn apply_now<Q: BatchQueue>(
        &mut self,
        queue: &mut Q,
        change: impl FnOnce(&mut Q) -> Result<Flush, Q::Error>,
    ) -> Result<(), Q::Error> {
        self.close(queue)?;
        let flush = change(queue)?;
        queue.flush_now(flush)
    }
}
