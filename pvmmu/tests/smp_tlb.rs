//! Stale translations across vCPUs, through the Xen model's per-vCPU TLBs.
//!
//! One PV address space is live on 2..=4 simulated vCPUs. Before each step
//! every vCPU the space is active on reads through the pages of the step
//! (caching their translations); one of them then maps, unmaps or protects
//! and performs the flush the call returns; vCPUs also switch away from the
//! space and back. After every step, no vCPU may hold a translation that
//! differs from the live tables: a missing or too-narrow flush (a local one,
//! or a mask without a vCPU that runs the space) leaves one behind, which
//! the tests below also show by flushing too narrowly on purpose.

mod common;

use std::cell::Cell;
use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use pvmmu::backend::FlushTargets;
use pvmmu::cpus::ActiveCpus;
use pvmmu::entry::Flags;
use pvmmu::{AddressSpace, Pfn};

/// Pages of the window, which straddles an L1 boundary (two L1 tables,
/// freed and recreated as the steps empty and refill them).
const PAGES: u64 = 768;
/// First page: 256 pages below a 2 MiB boundary, in the lower half.
const BASE: u64 = 0x0000_0040_0000_0000 + (2 << 20) - 256 * 4096;
const DATA_FRAMES: u64 = 2048;
const TABLE_FRAMES: u64 = 64;
const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);
const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);
const STEPS: usize = 48;

#[derive(Debug, Clone)]
enum Step {
    /// `cpu` maps the unmapped run at `page` (at most `pages`).
    Map {
        cpu: usize,
        page: u64,
        pages: u64,
        pfn: u64,
        writable: bool,
    },
    /// `cpu` unmaps the mapped run at `page` (at most `pages`).
    Unmap { cpu: usize, page: u64, pages: u64 },
    /// `cpu` protects the mapped run at `page` (at most `pages`).
    Protect {
        cpu: usize,
        page: u64,
        pages: u64,
        writable: bool,
    },
    /// `cpu` loads another root: its TLB is emptied, then it leaves the
    /// mask.
    SwitchAway { cpu: usize },
    /// `cpu` joins the mask, then loads the space's root.
    SwitchBack { cpu: usize },
}

fn step_strategy() -> impl Strategy<Value = Step> {
    // Runs of 1..=8 pages (invlpg), 20..=40 (around the invlpg limit of
    // 32), and up to the whole window (full flushes, tables freed).
    let pages = prop_oneof![1u64..=8, 20u64..=40, 100u64..=PAGES];
    let page = 0..PAGES;
    let cpu = 0usize..4;
    prop_oneof![
        3 => (cpu.clone(), page.clone(), pages.clone(), 0..DATA_FRAMES, any::<bool>()).prop_map(
            |(cpu, page, pages, pfn, writable)| Step::Map { cpu, page, pages, pfn, writable }
        ),
        3 => (cpu.clone(), page.clone(), pages.clone())
            .prop_map(|(cpu, page, pages)| Step::Unmap { cpu, page, pages }),
        2 => (cpu.clone(), page, pages, any::<bool>()).prop_map(|(cpu, page, pages, writable)| {
            Step::Protect { cpu, page, pages, writable }
        }),
        1 => cpu.clone().prop_map(|cpu| Step::SwitchAway { cpu }),
        1 => cpu.prop_map(|cpu| Step::SwitchBack { cpu }),
    ]
}

/// How the space's flushes are aimed, and whether the harness keeps the
/// mask true.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aim {
    /// `MMUEXT_*_MULTI` with the mask of the vCPUs the space is active on.
    Active,
    /// `MMUEXT_*_ALL`.
    All,
    /// `MMUEXT_*_LOCAL` (wrong with more than one vCPU).
    Local,
    /// `*_MULTI`, but vCPU 1 runs the space without joining the mask
    /// (wrong).
    MaskMissingCpu1,
}

struct Harness {
    model: Shared,
    space: AddressSpace<PvBackend, Pool>,
    cpus: &'static ActiveCpus,
    vcpus: usize,
    /// Which vCPUs run the space (they read through it).
    running: Vec<bool>,
    aim: Aim,
    /// The test's own record of what is mapped: page -> (pfn, writable).
    reference: BTreeMap<u64, (u64, bool)>,
}

impl Harness {
    fn new(vcpus: usize, aim: Aim) -> Self {
        let model = shared(DATA_FRAMES + TABLE_FRAMES);
        let cpus: &'static ActiveCpus = Box::leak(Box::new(ActiveCpus::new()));
        let targets = match aim {
            Aim::Active | Aim::MaskMissingCpu1 => FlushTargets::Active(cpus),
            Aim::All => FlushTargets::All,
            Aim::Local => FlushTargets::Local,
        };
        {
            let mut m = model.0.borrow_mut();
            m.set_vcpus(vcpus);
            m.accept_vcpu_mask(cpus);
        }
        let backend = pv_backend(&model, 64).with_flush_targets(targets);
        let mut space = AddressSpace::new(backend, Pool::new(DATA_FRAMES, TABLE_FRAMES))
            .map_err(|e| e.0)
            .expect("pv space");
        let h = Harness {
            model,
            space: {
                // Every vCPU starts on the space: in the mask before the
                // root is loaded.
                for cpu in 0..vcpus {
                    if !(aim == Aim::MaskMissingCpu1 && cpu == 1) {
                        cpus.activate(cpu);
                    }
                }
                // SAFETY: nothing runs on these tables; the model walks them.
                unsafe { space.activate() }.expect("NEW_BASEPTR");
                space
            },
            cpus,
            vcpus,
            running: vec![true; vcpus],
            aim,
            reference: BTreeMap::new(),
        };
        for cpu in 0..vcpus {
            h.model.0.borrow_mut().vcpu_reload(cpu);
        }
        h
    }

    /// Every running vCPU reads through every page of the window.
    fn touch_all(&self) {
        let mut m = self.model.0.borrow_mut();
        for cpu in (0..self.vcpus).filter(|&c| self.running[c]) {
            for page in 0..PAGES {
                m.vcpu_translate(cpu, BASE + page * 4096);
            }
        }
    }

    /// The run of pages from `page` (at most `pages`) whose mapped state is
    /// `mapped`.
    fn run(&self, page: u64, pages: u64, mapped: bool) -> u64 {
        (page..(page + pages).min(PAGES))
            .take_while(|p| self.reference.contains_key(p) == mapped)
            .count() as u64
    }

    fn switch_away(&mut self, cpu: usize) {
        if !self.running[cpu] {
            return;
        }
        self.model.0.borrow_mut().vcpu_reload(cpu);
        self.cpus.deactivate(cpu);
        self.running[cpu] = false;
    }

    fn switch_back(&mut self, cpu: usize) {
        if self.running[cpu] {
            return;
        }
        if !(self.aim == Aim::MaskMissingCpu1 && cpu == 1) {
            self.cpus.activate(cpu);
        }
        self.model.0.borrow_mut().vcpu_reload(cpu);
        self.running[cpu] = true;
    }

    /// Runs one step on the vCPU it names (switched in first if it was
    /// away); returns what it changed, for messages.
    fn step(&mut self, step: &Step) -> Result<String, TestCaseError> {
        let cpu = match *step {
            Step::Map { cpu, .. } | Step::Unmap { cpu, .. } | Step::Protect { cpu, .. } => {
                cpu % self.vcpus
            }
            Step::SwitchAway { cpu } => {
                self.switch_away(cpu % self.vcpus);
                return Ok(String::new());
            }
            Step::SwitchBack { cpu } => {
                self.switch_back(cpu % self.vcpus);
                return Ok(String::new());
            }
        };
        self.switch_back(cpu);
        self.touch_all();
        self.model.0.borrow_mut().set_current_vcpu(cpu);
        let (what, flush) = match *step {
            Step::Map {
                page,
                pages,
                pfn,
                writable,
                ..
            } => {
                let n = self.run(page, pages, false);
                if n == 0 {
                    return Ok(String::new());
                }
                let pfn = pfn.min(DATA_FRAMES - n);
                let flags = if writable { RW } else { RO };
                let f = self
                    .space
                    .map(BASE + page * 4096, Pfn(pfn), n * 4096, flags)
                    .map_err(|e| TestCaseError::fail(format!("map: {e:?}")))?;
                for k in 0..n {
                    self.reference.insert(page + k, (pfn + k, writable));
                }
                (format!("cpu {cpu} maps {n} pages at {page}"), f)
            }
            Step::Unmap { page, pages, .. } => {
                let n = self.run(page, pages, true);
                if n == 0 {
                    return Ok(String::new());
                }
                let f = self
                    .space
                    .unmap(BASE + page * 4096, n * 4096)
                    .map_err(|e| TestCaseError::fail(format!("unmap: {e:?}")))?;
                for k in 0..n {
                    self.reference.remove(&(page + k));
                }
                (format!("cpu {cpu} unmaps {n} pages at {page}"), f)
            }
            Step::Protect {
                page,
                pages,
                writable,
                ..
            } => {
                let n = self.run(page, pages, true);
                if n == 0 {
                    return Ok(String::new());
                }
                let flags = if writable { RW } else { RO };
                let f = self
                    .space
                    .protect(BASE + page * 4096, n * 4096, flags, false)
                    .map_err(|e| TestCaseError::fail(format!("protect: {e:?}")))?;
                for k in 0..n {
                    if let Some(e) = self.reference.get_mut(&(page + k)) {
                        e.1 = writable;
                    }
                }
                (format!("cpu {cpu} protects {n} pages at {page}"), f)
            }
            Step::SwitchAway { .. } | Step::SwitchBack { .. } => unreachable!(),
        };
        self.space
            .flush(flush)
            .map_err(|e| TestCaseError::fail(format!("flush: {e:?}")))?;
        Ok(what)
    }

    /// Every translation any vCPU still holds equals the live entry, and
    /// the live tables equal the reference.
    fn check(&self, after: &str, checked: &Cell<u64>) -> Result<(), TestCaseError> {
        let m = self.model.0.borrow();
        for cpu in 0..self.vcpus {
            for (va, cached) in m.vcpu_tlb(cpu) {
                checked.set(checked.get() + 1);
                let live = m.live_leaf(va);
                if live != Some(cached) {
                    return Err(TestCaseError::fail(format!(
                        "after {after}: vCPU {cpu} still translates {va:#x} as {cached:#x}, \
                         the tables say {live:x?}"
                    )));
                }
            }
        }
        for page in 0..PAGES {
            let va = BASE + page * 4096;
            let live = self
                .space
                .lookup(va)
                .ok()
                .map(|t| (t.pfn.0, t.flags.contains(Flags::WRITABLE)));
            prop_assert_eq!(live, self.reference.get(&page).copied(), "page {}", page);
        }
        Ok(())
    }
}

/// What a run did: steps that changed the tables, translations checked.
#[derive(Debug)]
struct Done {
    changes: u64,
    checked: u64,
}

/// Runs `cases` cases of [`STEPS`] steps on `vcpus` vCPUs; the first stale
/// translation or wrong table, if any.
fn run(vcpus: usize, aim: Aim, cases: u32, seed: u8) -> Result<Done, String> {
    let changes = Cell::new(0);
    let checked = Cell::new(0);
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    );
    runner
        .run(
            &proptest::collection::vec(step_strategy(), STEPS),
            |steps| {
                let mut h = Harness::new(vcpus, aim);
                for step in &steps {
                    let what = h.step(step)?;
                    if !what.is_empty() {
                        changes.set(changes.get() + 1);
                    }
                    h.check(&what, &checked)?;
                }
                Ok(())
            },
        )
        .map_err(|e| e.to_string())?;
    Ok(Done {
        changes: changes.get(),
        checked: checked.get(),
    })
}

/// The run changed the tables in at least a quarter of its steps and checked
/// at least 50 cached translations per step.
fn assert_did_work(done: &Done, cases: u32) {
    let steps = u64::from(cases) * STEPS as u64;
    eprintln!("{done:?} of {steps} steps");
    assert!(done.changes * 4 >= steps, "{done:?} of {steps} steps");
    assert!(done.checked >= 50 * steps, "{done:?} of {steps} steps");
}

#[test]
fn multi_flushes_with_the_active_mask_leave_no_stale_translation() {
    for (vcpus, seed) in [(2, 1), (3, 2), (4, 3)] {
        match run(vcpus, Aim::Active, 48, seed) {
            Ok(done) => assert_did_work(&done, 48),
            Err(e) => panic!("{vcpus} vCPUs: {e}"),
        }
    }
}

#[test]
fn all_vcpu_flushes_leave_no_stale_translation() {
    match run(3, Aim::All, 32, 4) {
        Ok(done) => assert_did_work(&done, 32),
        Err(e) => panic!("{e}"),
    }
}

/// The harness finds a flush that is too narrow: local flushes with two
/// vCPUs, and a mask missing a vCPU that runs the space.
#[test]
fn too_narrow_flushes_are_caught() {
    for aim in [Aim::Local, Aim::MaskMissingCpu1] {
        let e = run(2, aim, 16, 5).expect_err("a too-narrow flush went unseen");
        assert!(e.contains("vCPU 1 still translates"), "{aim:?}: {e}");
    }
    // One vCPU: local flushes are enough.
    run(1, Aim::Local, 16, 6).expect("one vCPU, local flushes");
}
