//! Every interleaving of the lazy-mode hand-off (`pvmmu::lazy_task`) for
//! two CPUs, with `loom`:
//! `RUSTFLAGS="--cfg loom" cargo test -p pvmmu --test loom_lazy --release`
//! (`cargo xtask test` runs it).
//!
//! Each loom thread is a CPU. Task A starts on CPU 0 and runs a program
//! (enter, two changes, send, leave); task B on CPU 1 runs its own. A third
//! thread is the timer: it raises an interrupt and then a preemption on
//! CPU 0, which CPU 0 takes between two steps of whatever it runs, as a
//! real CPU takes an interrupt between instructions; loom tries every step
//! it can land on. At the preemption the switch hook sends A's batch and A
//! goes on the run queue; whichever CPU takes it first resumes it there
//! (CPU 1 after B is done: a migration). The space is a stand-in queue
//! behind the real `BatchOwner`, under a mutex (the kernel space's lock).
//!
//! The properties: a batch never survives a switch (A resumes with none
//! open and everything it queued sent); a CPU's lazy task is the task it
//! runs in lazy mode; an interrupt handler's change goes out after
//! everything queued before it and before the handler returns; the task's
//! reads see its own writes; the counters agree with what happened.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use pvmmu::lazy_task::{BatchOwner, BatchQueue, LazyTasks};
use pvmmu::Flush;

const A: usize = 0;
const B: usize = 1;
/// The idle task of CPU `cpu`.
const fn idle(cpu: usize) -> usize {
    2 + cpu
}

/// Slots: A's two, B's, the handler's.
const SLOTS: usize = 4;
const A1: u64 = 0xa1;
const A2: u64 = 0xa2;
const B1: u64 = 0xb1;
const H: u64 = 0x41;

/// A page-table queue reduced to what ordering needs: writes to slots,
/// queued while a batch is open, and the order in which they went out.
#[derive(Default)]
struct Queue {
    open: u32,
    queued: Vec<(usize, u64)>,
    live: [u64; SLOTS],
    sent: Vec<u64>,
}

impl Queue {
    fn write(&mut self, slot: usize, value: u64) -> Flush {
        self.queued.push((slot, value));
        if self.open == 0 {
            self.send();
        }
        Flush::none()
    }
    fn send(&mut self) {
        for (slot, value) in self.queued.drain(..) {
            self.live[slot] = value;
            self.sent.push(value);
        }
    }
    /// What a read through the space sees (queued writes included).
    fn read(&self, slot: usize) -> u64 {
        self.queued
            .iter()
            .rev()
            .find(|(s, _)| *s == slot)
            .map_or(self.live[slot], |(_, v)| *v)
    }
    fn position(&self, value: u64) -> Option<usize> {
        self.sent.iter().position(|&v| v == value)
    }
}

impl BatchQueue for Queue {
    type Error = ();
    fn open_batch(&mut self) {
        self.open += 1;
    }
    fn close_batch(&mut self, _owed: Flush) -> Result<(), ()> {
        self.open -= 1;
        if self.open == 0 {
            self.send();
        }
        Ok(())
    }
    fn flush_now(&mut self, _flush: Flush) -> Result<(), ()> {
        // pvmmu's flush sends queued writes first.
        self.send();
        Ok(())
    }
}

/// One step of a task's program.
#[derive(Clone, Copy)]
enum Op {
    Enter,
    Write(usize, u64),
    /// The section's end, first half: its batch goes out.
    Send,
    /// Second half: the depth drops (a switch may land in between).
    Leave,
}

const PROGRAM_A: [Op; 5] = [
    Op::Enter,
    Op::Write(0, A1),
    Op::Write(1, A2),
    Op::Send,
    Op::Leave,
];
const PROGRAM_B: [Op; 4] = [Op::Enter, Op::Write(2, B1), Op::Send, Op::Leave];

struct World {
    tasks: LazyTasks<2, 4>,
    space: Mutex<(BatchOwner, Queue)>,
    /// A's next step, while A waits on the run queue.
    run_queue: Mutex<Option<usize>>,
    irq: AtomicBool,
    preempt: AtomicBool,
    a_done: AtomicBool,
}

/// What one execution saw, checked at its end.
#[derive(Default, Clone, Copy)]
struct Seen {
    a_switched_lazy: bool,
    a_migrated: bool,
    handler_ran: bool,
}

impl World {
    fn new() -> Arc<Self> {
        Arc::new(World {
            tasks: LazyTasks::new(),
            space: Mutex::new((BatchOwner::new(), Queue::default())),
            run_queue: Mutex::new(None),
            irq: AtomicBool::new(false),
            preempt: AtomicBool::new(false),
            a_done: AtomicBool::new(false),
        })
    }

    /// Runs `op` of `task` on `cpu`.
    fn step(&self, cpu: usize, task: usize, op: Op) {
        match op {
            Op::Enter => {
                self.tasks.enter(task, cpu);
            }
            Op::Write(slot, value) => {
                let mut guard = self.space.lock().unwrap();
                let (batch, q) = &mut *guard;
                // kspace's check: the switch hook made it this CPU's lazy task.
                assert_eq!(self.tasks.cpu_task(cpu), Some(task), "cpu {cpu}");
                batch.apply(q, task, |q| Ok(q.write(slot, value))).unwrap();
                assert_eq!(q.read(slot), value, "a task reads its own write");
            }
            Op::Send => {
                let mut guard = self.space.lock().unwrap();
                let (batch, q) = &mut *guard;
                batch.close_for(q, task).unwrap();
                assert_ne!(batch.owner(), Some(task));
            }
            Op::Leave => {
                let end = self.tasks.leave(task, cpu).expect("the outermost section");
                assert!(!end.switch_failed);
                assert_eq!(self.tasks.cpu_task(cpu), None);
            }
        }
    }

    /// The switch hook on `cpu` from `from` to `to`.
    fn switch(&self, cpu: usize, from: usize, to: usize) {
        self.tasks
            .on_switch(cpu, from, to, |t| {
                let mut guard = self.space.lock().unwrap();
                let (batch, q) = &mut *guard;
                batch.close_for(q, t)
            })
            .unwrap();
        let guard = self.space.lock().unwrap();
        let (batch, q) = &*guard;
        assert_ne!(batch.owner(), Some(from), "a batch survived a switch");
        assert_ne!(batch.owner(), Some(to), "a task resumed with a batch open");
        if self.tasks.is_lazy(to) {
            assert_eq!(self.tasks.cpu_task(cpu), Some(to));
        } else {
            assert_eq!(self.tasks.cpu_task(cpu), None);
        }
        if from == A {
            // Everything A queued is out.
            assert!(
                q.queued.iter().all(|&(s, _)| s > 1),
                "A's writes left queued"
            );
        }
    }

    /// An interrupt on CPU 0 while it runs `task`: the handler changes its
    /// own slot.
    fn handler(&self, task: usize) {
        let mut guard = self.space.lock().unwrap();
        let (batch, q) = &mut *guard;
        // Lazy state is the interrupted task's; the handler does not join it.
        let lazy = self.tasks.is_lazy(task);
        assert_eq!(self.tasks.cpu_task(0), lazy.then_some(task));
        let before: Vec<u64> = q.queued.iter().map(|&(_, v)| v).collect();
        batch.apply_now(q, |q| Ok(q.write(3, H))).unwrap();
        assert_eq!(
            q.live[3], H,
            "the handler's change is out before it returns"
        );
        assert!(q.queued.is_empty());
        assert_eq!(batch.owner(), None);
        let h = q.position(H).unwrap();
        for v in before {
            assert!(
                q.position(v).unwrap() < h,
                "{v:#x} went out after the handler's change"
            );
        }
    }

    /// Runs A from step `pc` on `cpu` until it ends or is preempted (only
    /// CPU 0 is). Returns the step to resume at if preempted.
    fn run_a(&self, cpu: usize, mut pc: usize, seen: &mut Seen) -> Option<usize> {
        while pc < PROGRAM_A.len() {
            if cpu == 0 && self.irq.swap(false, Ordering::AcqRel) {
                self.handler(A);
                seen.handler_ran = true;
            }
            if cpu == 0 && self.preempt.swap(false, Ordering::AcqRel) {
                seen.a_switched_lazy |= self.tasks.is_lazy(A);
                self.switch(0, A, idle(0));
                *self.run_queue.lock().unwrap() = Some(pc);
                return Some(pc);
            }
            self.step(cpu, A, PROGRAM_A[pc]);
            pc += 1;
        }
        self.a_done.store(true, Ordering::Release);
        None
    }

    /// CPU `cpu`, idle: takes A from the run queue if it is there and runs
    /// it to its end. Returns whether it did.
    fn take_a(&self, cpu: usize, seen: &mut Seen) -> bool {
        let Some(pc) = self.run_queue.lock().unwrap().take() else {
            return false;
        };
        if cpu != 0 && self.tasks.is_lazy(A) {
            seen.a_migrated = true;
        }
        self.switch(cpu, idle(cpu), A);
        let again = self.run_a(cpu, pc, seen);
        assert!(again.is_none());
        self.switch(cpu, A, idle(cpu));
        true
    }
}

/// Polls of the idle CPUs' wait for A (bounded: loom checks safety).
const SPINS: usize = 3;

/// How many executions saw A switched out in lazy mode, and migrate.
static SWITCHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static MIGRATED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn builder(preemptions: usize) -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(preemptions);
    b.max_branches = 100_000;
    b
}

#[test]
fn hand_off_at_a_switch_and_under_an_interrupt() {
    builder(3).check(|| {
        let w = World::new();
        let timer = {
            let w = w.clone();
            thread::spawn(move || {
                w.irq.store(true, Ordering::Release);
                w.preempt.store(true, Ordering::Release);
            })
        };
        let cpu1 = {
            let w = w.clone();
            thread::spawn(move || {
                let mut seen = Seen::default();
                for op in PROGRAM_B {
                    w.step(1, B, op);
                }
                w.switch(1, B, idle(1));
                for _ in 0..SPINS {
                    if w.a_done.load(Ordering::Acquire) || w.take_a(1, &mut seen) {
                        break;
                    }
                    thread::yield_now();
                }
                seen
            })
        };
        let mut seen = Seen::default();
        if w.run_a(0, 0, &mut seen).is_some() {
            for _ in 0..SPINS {
                if w.a_done.load(Ordering::Acquire) || w.take_a(0, &mut seen) {
                    break;
                }
                thread::yield_now();
            }
        }
        let seen1 = cpu1.join().unwrap();
        timer.join().unwrap();
        seen.a_migrated |= seen1.a_migrated;
        if !w.a_done.load(Ordering::Acquire) {
            return; // A starved within the bounds: nothing more to check.
        }
        let guard = w.space.lock().unwrap();
        let (batch, q) = &*guard;
        assert_eq!(batch.owner(), None);
        assert_eq!(q.live, [A1, A2, B1, if seen.handler_ran { H } else { 0 }]);
        assert!(q.position(A1) < q.position(A2), "A's writes out of order");
        let s = w.tasks.stats();
        assert_eq!(s.batches, 2);
        assert_eq!(s.batches_preempted, u64::from(seen.a_switched_lazy));
        assert_eq!(s.migrations, u64::from(seen.a_migrated));
        if seen.a_switched_lazy {
            SWITCHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if seen.a_migrated {
            MIGRATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // The model really reached the cases it is about.
    let switched = SWITCHED.load(std::sync::atomic::Ordering::Relaxed);
    let migrated = MIGRATED.load(std::sync::atomic::Ordering::Relaxed);
    println!("loom_lazy: {switched} executions with A switched out in lazy mode, {migrated} with it resumed on CPU 1");
    assert!(switched > 0 && migrated > 0);
}
