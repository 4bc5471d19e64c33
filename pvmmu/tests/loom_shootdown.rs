//! Every interleaving of the TLB shootdown protocol (`pvmmu::shootdown`)
//! for two and three CPUs, with `loom`:
//! `RUSTFLAGS="--cfg loom" cargo test -p pvmmu --test loom_shootdown --release`
//! (`cargo xtask test` runs it). Each CPU's TLB is one cached copy of a
//! page-table entry; an IPI is a flag the target polls, as an interrupt
//! would arrive between its instructions. The property: once `initiate`
//! returns, every target's cached copy is at least the value the initiator
//! wrote before calling it (no stale translation survives a shootdown).
//! And the mask of CPUs a shootdown targets (`pvmmu::cpus`): a CPU that
//! joins it and loads the root while another CPU changes an entry and reads
//! the mask is either in the mask read, or walked the new entry.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use pvmmu::cpus::ActiveCpus;
use pvmmu::shootdown::Shootdown;

/// The shared world: the entry, each CPU's cached copy of it, each CPU's
/// pending IPI, and how many initiators are done.
struct World {
    sd: Shootdown<3>,
    pte: AtomicU64,
    tlb: [AtomicU64; 3],
    ipi: [AtomicBool; 3],
    done: AtomicU64,
}

impl World {
    fn new() -> Arc<Self> {
        Arc::new(World {
            sd: Shootdown::new(),
            pte: AtomicU64::new(1),
            tlb: core::array::from_fn(|_| AtomicU64::new(1)),
            ipi: core::array::from_fn(|_| AtomicBool::new(false)),
            done: AtomicU64::new(0),
        })
    }

    /// CPU `me` takes a pending IPI: the handler refreshes its copy.
    fn serve(&self, me: usize) {
        if self.ipi[me].swap(false, Ordering::AcqRel) {
            self.sd.handle(me, |_| {
                self.tlb[me].store(self.pte.load(Ordering::SeqCst), Ordering::SeqCst)
            });
        }
    }

    /// CPU `me` changes the entry and shoots it down on `targets`, with a
    /// patience of `SPINS` polls. Safety is what is checked: if the
    /// shootdown reports success, no target still holds the old entry; a
    /// timeout (a schedule that starved the target) must name a CPU that
    /// really did not acknowledge.
    fn change_and_shoot(&self, me: usize, targets: &[usize]) {
        let new = self.pte.fetch_add(1, Ordering::SeqCst) + 1;
        self.tlb[me].store(new, Ordering::SeqCst); // the local flush
        let mut polls = 0;
        let r = self.sd.initiate(
            targets,
            0x1000,
            |cpu| self.ipi[cpu].store(true, Ordering::SeqCst),
            || self.serve(me),
            || {
                polls += 1;
                polls <= SPINS
            },
        );
        match r {
            Ok(()) => {
                for &cpu in targets {
                    let seen = self.tlb[cpu].load(Ordering::SeqCst);
                    assert!(seen >= new, "cpu {cpu} still translates to {seen} < {new}");
                }
            }
            Err(t) => assert!(targets.contains(&t.cpu)),
        }
        self.done.fetch_add(1, Ordering::SeqCst);
    }

    /// A CPU that only answers IPIs, for at most `SPINS` polls after the
    /// last initiator it waits for is done or gave up.
    fn target_loop(&self, me: usize, initiators: u64) {
        for _ in 0..SPINS {
            self.serve(me);
            if self.done.load(Ordering::SeqCst) >= initiators {
                break;
            }
            thread::yield_now();
        }
    }
}

/// Polls of every spin loop in these models (bounded so that every
/// schedule ends; loom checks safety, not progress).
const SPINS: u32 = 3;

/// Every interleaving within a preemption bound (0: unbounded).
fn builder(preemptions: usize) -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    if preemptions > 0 {
        b.preemption_bound = Some(preemptions);
    }
    b.max_branches = 100_000;
    b
}

#[test]
fn one_initiator_one_target() {
    builder(0).check(|| {
        let w = World::new();
        let t = {
            let w = w.clone();
            thread::spawn(move || w.target_loop(1, 1))
        };
        w.change_and_shoot(0, &[1]);
        t.join().unwrap();
    });
}

#[test]
fn two_cpus_shoot_at_each_other() {
    builder(3).check(|| {
        let w = World::new();
        let t = {
            let w = w.clone();
            thread::spawn(move || {
                w.change_and_shoot(1, &[0]);
                w.target_loop(1, 2);
            })
        };
        w.change_and_shoot(0, &[1]);
        w.target_loop(0, 2);
        t.join().unwrap();
    });
}

#[test]
fn two_initiators_one_target() {
    // Three spinning threads: two preemptions keep it to minutes.
    builder(2).check(|| {
        let w = World::new();
        let a = {
            let w = w.clone();
            thread::spawn(move || w.change_and_shoot(0, &[2]))
        };
        let b = {
            let w = w.clone();
            thread::spawn(move || w.change_and_shoot(1, &[2]))
        };
        w.target_loop(2, 2);
        a.join().unwrap();
        b.join().unwrap();
    });
}

/// CPU 1 switches in (joins the mask, then loads the root and walks the
/// entry) while CPU 0 changes the entry and reads the mask to aim its
/// flush: if CPU 1 is not in the mask CPU 0 read, CPU 1 walked the new
/// entry. The same for a CPU that switches away and back in between.
#[test]
fn a_cpu_switching_in_is_in_the_mask_or_sees_the_change() {
    builder(0).check(|| {
        let cpus = Arc::new(ActiveCpus::new());
        let pte = Arc::new(AtomicU64::new(1));
        cpus.activate(0);
        let b = {
            let (cpus, pte) = (cpus.clone(), pte.clone());
            thread::spawn(move || {
                cpus.activate(1);
                let _first_walk = pte.load(Ordering::SeqCst);
                // Away (another root loaded: nothing cached), and back.
                cpus.deactivate(1);
                cpus.activate(1);
                pte.load(Ordering::SeqCst)
            })
        };
        pte.store(2, Ordering::SeqCst);
        let mask = cpus.snapshot();
        let again = b.join().unwrap();
        assert_ne!(mask & 1, 0, "the initiator is in its own mask");
        if mask & 2 == 0 {
            assert_eq!(again, 2, "cpu 1 missed by the mask walked the old entry");
        }
    });
}
