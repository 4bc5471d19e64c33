//! Lazy MMU mode for the running kernel: batches of changes to the kernel
//! space ([`crate::kspace`]) that survive preemption, interrupts and
//! migration between CPUs.
//!
//! A thread enters lazy mode with [`enter`], which returns a [`LazySection`]
//! bound to the thread (not `Send`); sections nest. Changes made through it
//! ([`LazySection::apply`]) are queued in one pvmmu batch on the kernel
//! space, which stays open when the kspace lock is released between
//! changes, so the thread stays preemptible between entries. The rules
//! (see `docs/kernel.md`, "Lazy MMU mode"):
//!
//! * **Readers** through pvmmu ([`lookup`]) see queued writes. A flush the
//!   thread asks for ([`LazySection::flush`]) sends the queued writes
//!   first; leaving the outermost section sends them and the TLB flushes
//!   they owe; an inner section's end sends nothing.
//! * **At a switch** the scheduler hook ([`on_switch`]) closes the outgoing
//!   thread's batch (writes and owed flushes out) and marks the thread
//!   (its section counts as preempted). When the thread runs again, on any
//!   CPU, the hook records it as this CPU's lazy thread and its next change
//!   opens a fresh batch there: a batch never crosses a switch, so it never
//!   migrates half-sent.
//! * **Other writers** (another thread's change, any non-lazy kspace call)
//!   close the open batch before their own change, so no update overtakes
//!   one queued before it.
//! * **Interrupt context**: lazy mode reads as off ([`active`] is false,
//!   [`enter`] refuses); a handler changes the kernel space only through
//!   [`crate::kspace::try_apply_now`], which sends the open batch first and
//!   then its own change, flushed, before it returns.
//!
//! Per-CPU lazy state (which thread is in lazy mode on a CPU) is reached
//! through [`CpuLocal`], which borrows a preemption or interrupt guard, or
//! through [`cpu_lazy_thread`], which checks at run time and panics when
//! called from preemptible code.
//!
//! The state machine itself (depths, preempted marks, each CPU's lazy
//! thread; the batch owner under the kspace lock) is pvmmu's
//! [`pvmmu::lazy_task`], which the host tests drive with simulated CPUs and
//! loom model-checks.
//!
//! Invariant: at most one batch is open in the kernel space, owned by a
//! thread in lazy mode that has not been switched out since it opened it;
//! a thread's depth is changed only by the thread itself.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, Ordering};

use pvmmu::lazy_task::LazyTasks;

use crate::irq::{self, IrqGuard};
use crate::kspace::{self, KspaceError, LazyOp};
use crate::percpu::{self, MAX_CPUS};
use crate::sched::{self, PreemptGuard, ThreadId, MAX_THREADS};

/// The kernel-space area the lazy tests and the stress use (private: 4 GiB
/// into [`kspace::KSPACE_SLOT`], clear of stacks, fixmap and other users).
pub const LAZY_AREA: u64 = kspace::STACK_AREA + (4 << 30);
/// Bytes of [`LAZY_AREA`].
pub const LAZY_AREA_BYTES: u64 = 1 << 30;

/// Depths, preempted marks and each CPU's lazy thread (the hand-off state
/// machine, shared with the host tests and the loom model).
static TASKS: LazyTasks<MAX_CPUS, MAX_THREADS> = LazyTasks::new();
static HOOKED: AtomicBool = AtomicBool::new(false);

/// Why a lazy section could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyError {
    /// [`enter`] from an interrupt or exception handler (lazy mode reads
    /// as off there).
    InInterrupt,
    /// The kernel space refused the change.
    Kspace(KspaceError),
    /// Closing the batch at a context switch failed (its writes may be
    /// partly applied).
    SwitchDrain,
}

impl From<KspaceError> for LazyError {
    fn from(e: KspaceError) -> Self {
        LazyError::Kspace(e)
    }
}

/// Registers the switch hook (once, when the scheduler runs).
pub fn init() -> Result<(), sched::SchedError> {
    if !HOOKED.swap(true, Ordering::AcqRel) {
        sched::register_switch_hook(on_switch)?;
    }
    Ok(())
}

/// This CPU's per-CPU lazy state, for as long as the guard it borrows
/// keeps the thread on this CPU.
pub struct CpuLocal<'g> {
    cpu: usize,
    _guard: PhantomData<&'g ()>,
    _cpu_bound: PhantomData<*const ()>,
}

impl<'g> CpuLocal<'g> {
    /// From a preemption guard: no migration while it lives.
    pub fn new(_preempt_off: &'g PreemptGuard) -> Self {
        Self::at(percpu::cpu_id())
    }

    /// From an interrupt guard: no migration while it lives.
    pub fn with_irqs_off(_irqs_off: &'g IrqGuard) -> Self {
        Self::at(percpu::cpu_id())
    }

    fn at(cpu: usize) -> Self {
        CpuLocal {
            cpu,
            _guard: PhantomData,
            _cpu_bound: PhantomData,
        }
    }

    /// The CPU.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// The thread in lazy mode on this CPU, if any.
    pub fn lazy_thread(&self) -> Option<ThreadId> {
        TASKS.cpu_task(self.cpu).map(ThreadId)
    }
}

/// The thread in lazy mode on this CPU, for code that cannot hold a guard
/// the compiler sees. Checked at run time: panics when called with
/// preemption and interrupts both on (the answer would be for a CPU the
/// caller may already have left).
pub fn cpu_lazy_thread() -> Option<ThreadId> {
    if percpu::preempt_count() == 0 && irq::enabled() {
        panic!("BUG: lazy MMU per-CPU state used from preemptible code");
    }
    TASKS.cpu_task(percpu::cpu_id()).map(ThreadId)
}

/// Called by kspace under its lock (preemption off) before a lazy change:
/// the switch hook must have made `thread` this CPU's lazy thread.
pub(crate) fn check_cpu_owner(thread: usize) {
    let here = cpu_lazy_thread();
    if here != Some(ThreadId(thread)) {
        panic!(
            "BUG: lazy change by thread {thread} on cpu {}, whose lazy thread is {here:?}",
            percpu::cpu_id()
        );
    }
}

/// Whether the caller is in lazy mode (false in interrupt context).
pub fn active() -> bool {
    if irq::in_interrupt() {
        return false;
    }
    TASKS.is_lazy(sched::current().0)
}

/// An open lazy section of the running thread (nests; not `Send`: it
/// belongs to the thread that entered it).
#[must_use = "the batch goes out when the section ends"]
pub struct LazySection {
    thread: usize,
    outermost: bool,
    ended: bool,
    _thread_bound: PhantomData<*const ()>,
}

/// Enters lazy mode on the running thread (refused in interrupt context).
pub fn enter() -> Result<LazySection, LazyError> {
    if irq::in_interrupt() {
        return Err(LazyError::InInterrupt);
    }
    let thread = sched::current().0;
    let outermost = {
        let p = sched::preempt_disable();
        TASKS.enter(thread, CpuLocal::new(&p).cpu())
    };
    Ok(LazySection {
        thread,
        outermost,
        ended: false,
        _thread_bound: PhantomData,
    })
}

impl LazySection {
    /// Queues `op` in the batch; returns the writes queued so far (0
    /// natively, where stores are immediate).
    pub fn apply(&self, op: LazyOp) -> Result<usize, LazyError> {
        Ok(kspace::lazy_apply(self.thread, op)?)
    }

    /// Sends the queued writes and the flushes they owe now; the section
    /// stays open.
    pub fn flush(&self) -> Result<(), LazyError> {
        kspace::lazy_close(self.thread)?;
        Ok(())
    }

    /// Whether the section was switched out since the outermost one began.
    pub fn was_preempted(&self) -> bool {
        TASKS.was_preempted(self.thread)
    }

    /// Ends the section: the outermost one sends the batch.
    pub fn finish(mut self) -> Result<(), LazyError> {
        self.end()
    }

    fn end(&mut self) -> Result<(), LazyError> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        let result = if self.outermost {
            kspace::lazy_close(self.thread).map(|_| ())
        } else {
            Ok(())
        };
        let end = {
            let p = sched::preempt_disable();
            TASKS.leave(self.thread, CpuLocal::new(&p).cpu())
        };
        result?;
        if end.is_some_and(|e| e.switch_failed) {
            return Err(LazyError::SwitchDrain);
        }
        Ok(())
    }
}

impl Drop for LazySection {
    fn drop(&mut self) {
        if let Err(e) = self.end() {
            log::error!("lazy section of thread {}: {e:?}", self.thread);
        }
    }
}

/// The scheduler's switch hook (interrupts off, outgoing stack): closes
/// the outgoing thread's batch and re-enters lazy mode for the incoming
/// thread on this CPU.
fn on_switch(from: ThreadId, to: ThreadId) {
    // Interrupts are already off here; the guard (a no-op) is the proof
    // `CpuLocal` asks for.
    let irqs = irq::save();
    let here = CpuLocal::with_irqs_off(&irqs);
    if let Err(e) = TASKS.on_switch(here.cpu(), from.0, to.0, kspace::lazy_close_irqs_off) {
        log::error!("lazy batch of thread {} at a switch: {e:?}", from.0);
    }
}

/// What `va` translates to through pvmmu (sees queued writes).
pub fn lookup(va: u64) -> Result<Option<pvmmu::Translation>, LazyError> {
    Ok(kspace::lookup(va)?)
}

/// Counters for the report.
pub use pvmmu::lazy_task::LazyStats as Stats;

/// The counters.
pub fn stats() -> Stats {
    TASKS.stats()
}
