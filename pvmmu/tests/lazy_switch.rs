//! Lazy batches under preemption, interrupts and migration, on the Xen
//! model: several simulated CPUs share one PV address space the way a
//! kernel shares its kernel space, through pvmmu's hand-off state machine
//! (`pvmmu::lazy_task`: `LazyTasks` for each task's and each CPU's lazy
//! state, `BatchOwner` under the space's "lock"). Random steps — a task's
//! change, section entry or end, a context switch on a CPU (inserted at any
//! point inside a batch; the task may resume on another CPU), an interrupt
//! handler's change on a CPU whose task is lazy — are checked after every
//! step:
//!
//! - reads through pvmmu equal the reference (queued writes included);
//! - Xen's memory (past the backend's queue) equals the reference when no
//!   batch is open, and otherwise equals the reference at some point since
//!   the open batch began (batches go out in order, never reordered);
//! - an open batch belongs to a lazy task running on a CPU whose lazy task
//!   it is (a batch never survives a switch, so never migrates);
//! - after a switch or an interrupt nothing of the previous batch is left
//!   queued; after a switch to a lazy task that CPU's lazy task is it;
//! - the invariant walker and the model's integrity check find nothing;
//! - at the end, the counters (batches, preempted, migrations) equal the
//!   ones the test kept itself.
//!
//! Fixed seeds plus one random seed (`PVMMU_SEED=<hex>` replays it).

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use pvmmu::backend::Backend;
use pvmmu::entry::{Entry, Flags, Level};
use pvmmu::lazy_task::{BatchOwner, LazyTasks};
use pvmmu::{AddressSpace, Flush, Mfn, Pfn};

/// Simulated CPUs.
const CPUS: usize = 3;
/// Tasks that make changes (ids `0..WORKERS`); each CPU also has an idle
/// task (`WORKERS + cpu`) that never enters lazy mode.
const WORKERS: usize = 5;
const TASKS: usize = WORKERS + CPUS;
/// Pages per task; each task's pages (and the handlers') have their own
/// L1, so unmaps free tables and maps create them inside batches.
const PAGES: u64 = 8;
const BASE: u64 = 0x0000_0300_0000_0000;
/// The window of the interrupt handlers' own pages.
const IRQ_WINDOW: usize = WORKERS;
const DATA_FRAMES: u64 = 512;
const STEPS: usize = 200;
const CASES: u32 = 64;
/// Deepest nesting of sections a task reaches.
const MAX_DEPTH: u32 = 3;

const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);
const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);

fn va(window: usize, page: u64) -> u64 {
    BASE + window as u64 * 0x20_0000 + page * 4096
}

#[derive(Debug, Clone)]
enum Step {
    /// The task running on `cpu` enters a (possibly nested) section.
    Enter { cpu: usize },
    /// It leaves its innermost section (the outermost sends the batch).
    Leave { cpu: usize },
    /// It maps page `page` of its own range to `frame` (if unmapped) or
    /// unmaps it: in its batch if lazy, otherwise at once.
    Toggle {
        cpu: usize,
        page: u64,
        frame: u64,
        writable: bool,
    },
    /// It gives pages `[page, page + n)` of its range new flags with
    /// `apply_to_range`.
    Protect {
        cpu: usize,
        page: u64,
        n: u64,
        writable: bool,
    },
    /// A context switch on `cpu` to the `pick`-th task not running
    /// anywhere (or to the CPU's idle task).
    Switch { cpu: usize, pick: usize },
    /// An interrupt on `cpu` whose handler toggles a page: its own
    /// (`window == IRQ_WINDOW`) or any task's.
    Interrupt {
        cpu: usize,
        window: usize,
        page: u64,
        frame: u64,
    },
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let cpu = 0..CPUS;
    prop_oneof![
        3 => cpu.clone().prop_map(|cpu| Step::Enter { cpu }),
        2 => cpu.clone().prop_map(|cpu| Step::Leave { cpu }),
        8 => (cpu.clone(), 0..PAGES, 0..DATA_FRAMES, any::<bool>())
            .prop_map(|(cpu, page, frame, writable)| Step::Toggle { cpu, page, frame, writable }),
        2 => (cpu.clone(), 0..PAGES, 1..=PAGES, any::<bool>())
            .prop_map(|(cpu, page, n, writable)| Step::Protect { cpu, page, n, writable }),
        4 => (cpu.clone(), 0..WORKERS + 1).prop_map(|(cpu, pick)| Step::Switch { cpu, pick }),
        2 => (cpu, prop_oneof![2 => Just(IRQ_WINDOW), 1 => 0..WORKERS], 0..PAGES, 0..DATA_FRAMES)
            .prop_map(|(cpu, window, page, frame)| Step::Interrupt { cpu, window, page, frame }),
    ]
}

/// What a page maps: frame and whether writable.
type Reference = BTreeMap<u64, (u64, bool)>;

/// The simulated kernel: one shared space, the hand-off state, and what
/// each CPU runs.
struct Kernel {
    model: Shared,
    space: AddressSpace<PvBackend, Pool>,
    tasks: LazyTasks<CPUS, TASKS>,
    batch: BatchOwner,
    running: [usize; CPUS],
    /// The reference: every change so far, queued or not.
    reference: Reference,
    /// The reference at the open batch's start and after each of its
    /// changes: Xen's memory must be one of them.
    since_open: Vec<Reference>,
    /// What the test expects the counters to be.
    batches: u64,
    preempted: u64,
    migrations: u64,
    /// Per task: its section was switched out; the CPU it last ran on in
    /// its section.
    was_preempted: [bool; TASKS],
    section_cpu: [usize; TASKS],
    depth: [u32; TASKS],
}

impl Kernel {
    fn new() -> Self {
        let model = shared(4096);
        // A small queue: long batches are also sent in parts on the way.
        let space = AddressSpace::new(pv_backend(&model, 8), Pool::new(2048, 256))
            .map_err(|e| e.0)
            .expect("space");
        Kernel {
            model,
            space,
            tasks: LazyTasks::new(),
            batch: BatchOwner::new(),
            running: core::array::from_fn(|cpu| WORKERS + cpu),
            reference: Reference::new(),
            since_open: Vec::new(),
            batches: 0,
            preempted: 0,
            migrations: 0,
            was_preempted: [false; TASKS],
            section_cpu: [usize::MAX; TASKS],
            depth: [0; TASKS],
        }
    }

    /// A change by `task` on `cpu`: in its batch if it is lazy, otherwise
    /// at once (the open batch, whoever's, goes out first).
    fn change(
        &mut self,
        task: usize,
        cpu: usize,
        op: impl FnOnce(&mut AddressSpace<PvBackend, Pool>, &mut Reference) -> Flush,
    ) -> Result<(), TestCaseError> {
        let Kernel {
            space,
            batch,
            reference,
            ..
        } = self;
        if self.tasks.is_lazy(task) {
            // The guest checks this too: the switch hook made the task this
            // CPU's lazy task.
            prop_assert_eq!(
                self.tasks.cpu_task(cpu),
                Some(task),
                "lazy task of cpu {}",
                cpu
            );
            let opened = batch.owner() != Some(task);
            if opened {
                // Whatever was open goes out first: Xen's memory is then
                // the reference before this change.
                self.since_open = vec![reference.clone()];
            }
            batch
                .apply(space, task, |s| Ok(op(s, reference)))
                .map_err(|e| TestCaseError::fail(format!("lazy change: {e:?}")))?;
            self.since_open.push(self.reference.clone());
        } else {
            batch
                .apply_now(space, |s| Ok(op(s, reference)))
                .map_err(|e| TestCaseError::fail(format!("change: {e:?}")))?;
            self.since_open.clear();
        }
        Ok(())
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match *step {
            Step::Enter { cpu } => {
                let task = self.running[cpu];
                if task >= WORKERS || self.depth[task] == MAX_DEPTH {
                    return Ok(());
                }
                let outermost = self.tasks.enter(task, cpu);
                prop_assert_eq!(outermost, self.depth[task] == 0);
                self.depth[task] += 1;
                if outermost {
                    self.was_preempted[task] = false;
                    self.section_cpu[task] = cpu;
                }
                prop_assert_eq!(self.tasks.cpu_task(cpu), Some(task));
            }
            Step::Leave { cpu } => {
                let task = self.running[cpu];
                if self.depth[task] == 0 {
                    return Ok(());
                }
                self.depth[task] -= 1;
                if self.depth[task] == 0 {
                    let sent = self
                        .batch
                        .close_for(&mut self.space, task)
                        .map_err(|e| TestCaseError::fail(format!("close: {e:?}")))?;
                    if sent {
                        self.since_open.clear();
                    }
                }
                let end = self.tasks.leave(task, cpu);
                prop_assert_eq!(end.is_some(), self.depth[task] == 0);
                if let Some(end) = end {
                    self.batches += 1;
                    self.preempted += u64::from(self.was_preempted[task]);
                    prop_assert_eq!(end.preempted, self.was_preempted[task]);
                    prop_assert!(!end.switch_failed);
                    prop_assert_eq!(self.tasks.cpu_task(cpu), None);
                    prop_assert_ne!(self.batch.owner(), Some(task), "batch left open");
                }
            }
            Step::Toggle {
                cpu,
                page,
                frame,
                writable,
            } => {
                let task = self.running[cpu];
                if task >= WORKERS {
                    return Ok(());
                }
                self.change(task, cpu, |s, r| {
                    toggle(s, r, va(task, page), frame, writable)
                })?;
            }
            Step::Protect {
                cpu,
                page,
                n,
                writable,
            } => {
                let task = self.running[cpu];
                if task >= WORKERS {
                    return Ok(());
                }
                let n = n.min(PAGES - page);
                self.change(task, cpu, |s, r| protect(s, r, va(task, page), n, writable))?;
            }
            Step::Switch { cpu, pick } => {
                let from = self.running[cpu];
                let idle = WORKERS + cpu;
                let ready: Vec<usize> = (0..WORKERS)
                    .filter(|t| !self.running.contains(t))
                    .chain([idle])
                    .filter(|&t| t != from)
                    .collect();
                let to = ready[pick % ready.len()];
                let Kernel {
                    space,
                    batch,
                    tasks,
                    ..
                } = self;
                let mut sent_any = false;
                tasks
                    .on_switch(cpu, from, to, |t| {
                        let sent = batch.close_for(space, t)?;
                        sent_any |= sent;
                        Ok::<bool, pvmmu::Error>(sent)
                    })
                    .map_err(|e| TestCaseError::fail(format!("switch: {e:?}")))?;
                if sent_any {
                    self.since_open.clear();
                }
                self.running[cpu] = to;
                if self.depth[from] > 0 {
                    self.was_preempted[from] = true;
                    prop_assert!(self.tasks.was_preempted(from));
                }
                prop_assert_ne!(self.batch.owner(), Some(from), "a batch survived a switch");
                if self.depth[to] > 0 {
                    if self.section_cpu[to] != cpu {
                        self.migrations += 1;
                    }
                    self.section_cpu[to] = cpu;
                    prop_assert_eq!(self.tasks.cpu_task(cpu), Some(to));
                    // Its batch was sent when it was switched out: it
                    // resumes with none, here or on another CPU.
                    prop_assert_ne!(self.batch.owner(), Some(to));
                } else {
                    prop_assert_eq!(self.tasks.cpu_task(cpu), None);
                }
            }
            Step::Interrupt {
                cpu,
                window,
                page,
                frame,
            } => {
                let interrupted = self.running[cpu];
                prop_assert_eq!(
                    self.tasks.cpu_task(cpu),
                    (self.depth[interrupted] > 0).then_some(interrupted)
                );
                let Kernel {
                    space,
                    batch,
                    reference,
                    ..
                } = self;
                batch
                    .apply_now(space, |s| {
                        Ok(toggle(s, reference, va(window, page), frame, false))
                    })
                    .map_err(|e| TestCaseError::fail(format!("handler: {e:?}")))?;
                self.since_open.clear();
                prop_assert_eq!(self.batch.owner(), None, "a batch open after a handler");
                // The interrupted task's section goes on; its next change
                // opens a new batch.
                prop_assert_eq!(self.tasks.is_lazy(interrupted), self.depth[interrupted] > 0);
            }
        }
        Ok(())
    }

    /// Every check that holds between steps.
    fn check(&self, at: usize) -> Result<(), TestCaseError> {
        // Reads through pvmmu see every change, queued or not.
        let mut seen = Reference::new();
        for window in 0..=IRQ_WINDOW {
            for page in 0..PAGES {
                let v = va(window, page);
                if let Ok(t) = self.space.lookup(v) {
                    seen.insert(v, (t.pfn.0, t.flags.contains(Flags::WRITABLE)));
                }
            }
        }
        prop_assert_eq!(&seen, &self.reference, "step {}: pvmmu's reads", at);
        // Xen's memory: everything, or the reference at some point of the
        // open batch.
        let live = self.live();
        match self.batch.owner() {
            None => {
                prop_assert_eq!(&live, &self.reference, "step {}: Xen's memory", at);
                prop_assert_eq!(self.space.backend().pending(), 0);
            }
            Some(owner) => {
                prop_assert!(
                    self.since_open.contains(&live),
                    "step {}: Xen's memory is no point of the open batch",
                    at
                );
                let cpu = self.running.iter().position(|&t| t == owner);
                prop_assert!(cpu.is_some(), "step {}: batch of a task not running", at);
                prop_assert!(self.depth[owner] > 0);
                prop_assert_eq!(self.tasks.cpu_task(cpu.unwrap_or(0)), Some(owner));
            }
        }
        for (cpu, &t) in self.running.iter().enumerate() {
            prop_assert_eq!(
                self.tasks.cpu_task(cpu),
                (self.depth[t] > 0).then_some(t),
                "step {}: lazy task of cpu {}",
                at,
                cpu
            );
        }
        // The walker reads through the queue; Xen's page types (the
        // oracle) agree with it once nothing is queued.
        let model = self.model.0.borrow();
        let oracle = ModelOracle(&model);
        let queued = self.space.backend().pending() > 0;
        let v = violations(
            self.space.backend(),
            self.space.root(),
            (!queued).then_some(&oracle as &dyn pvmmu::invariants::Oracle),
        );
        prop_assert!(v.is_empty(), "step {}: invariant violations {:?}", at, v);
        prop_assert!(
            model.check_integrity().is_ok(),
            "step {}: model integrity",
            at
        );
        Ok(())
    }

    /// The test's pages as Xen's memory has them (the backend's queue not
    /// included).
    fn live(&self) -> Reference {
        let m = self.model.0.borrow();
        let mut out = Reference::new();
        for window in 0..=IRQ_WINDOW {
            for page in 0..PAGES {
                let v = va(window, page);
                let Some(mut table) = m.mfn_of(self.space.root()) else {
                    continue;
                };
                for level in [Level::L4, Level::L3, Level::L2, Level::L1] {
                    let Some(e) = m.read_entry(table, level.index(v)).map(Entry) else {
                        break;
                    };
                    if !e.is_present() {
                        break;
                    }
                    if level == Level::L1 {
                        let pfn = m.pfn_of(e.mfn()).map_or(u64::MAX, |p| p.0);
                        out.insert(v, (pfn, e.flags().contains(Flags::WRITABLE)));
                    }
                    table = Mfn(e.mfn().0);
                }
            }
        }
        out
    }

    /// Ends every section (each sends its batch) and checks the counters.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        for cpu in 0..CPUS {
            while self.depth[self.running[cpu]] > 0 {
                self.step(&Step::Leave { cpu })?;
            }
        }
        self.check(usize::MAX)?;
        let s = self.tasks.stats();
        prop_assert_eq!(s.batches, self.batches);
        prop_assert_eq!(s.batches_preempted, self.preempted);
        prop_assert_eq!(s.migrations, self.migrations);
        Ok(())
    }
}

/// Maps `va` (unmapped in `r`) to `frame`, or unmaps it.
fn toggle(
    s: &mut AddressSpace<PvBackend, Pool>,
    r: &mut Reference,
    va: u64,
    frame: u64,
    writable: bool,
) -> Flush {
    if r.remove(&va).is_some() {
        s.unmap(va, 4096).expect("unmap a mapped page")
    } else {
        r.insert(va, (frame, writable));
        let flags = if writable { RW } else { RO };
        s.map(va, Pfn(frame), 4096, flags).expect("map a free page")
    }
}

/// `apply_to_range` over `n` pages from `va`.
fn protect(
    s: &mut AddressSpace<PvBackend, Pool>,
    r: &mut Reference,
    va: u64,
    n: u64,
    writable: bool,
) -> Flush {
    for k in 0..n {
        if let Some(e) = r.get_mut(&(va + k * 4096)) {
            e.1 = writable;
        }
    }
    let flags = if writable { RW } else { RO };
    s.apply_to_range(va, n * 4096, false, |_, _| Some(flags))
        .expect("protect data pages")
}

fn run(steps: &[Step]) -> Result<(u64, u64, u64), TestCaseError> {
    let mut k = Kernel::new();
    for (i, step) in steps.iter().enumerate() {
        k.step(step)
            .map_err(|e| TestCaseError::fail(format!("step {i} ({step:?}): {e}")))?;
        k.check(i)?;
    }
    k.finish()?;
    Ok((k.batches, k.preempted, k.migrations))
}

#[test]
fn batches_survive_switches_interrupts_and_migration() {
    let random = random_seed();
    let totals = std::cell::Cell::new((0u64, 0u64, 0u64, 0u64));
    for seed in [0x1a2e_0001u64, 0x1a2e_0002, random] {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let config = Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
        let strategy = proptest::collection::vec(step_strategy(), STEPS);
        let result = runner.run(&strategy, |steps| {
            let (b, p, m) = run(&steps)?;
            let (s, tb, tp, tm) = totals.get();
            totals.set((s + steps.len() as u64, tb + b, tp + p, tm + m));
            Ok(())
        });
        if let Err(e) = result {
            panic!("seed {seed:#x} failed: {e}");
        }
    }
    let (steps, batches, preempted, migrations) = totals.get();
    let line = format!(
        "lazy_switch: {steps} steps, {batches} batches, {preempted} preempted, {migrations} \
         migrations over seeds 0x1a2e0001, 0x1a2e0002, {random:#x}\n"
    );
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), line.as_bytes());
    // The steps must really exercise the hand-off.
    assert!(preempted > 0 && migrations > 0, "{line}");
}
