//! The kmap slot stack (`pvmmu::kmap`) against a plain reference model
//! (a vector of pushed entries per context), and the PV slot updates the
//! guest kernel makes with it against the Xen model: every slot of the
//! window's L1 in Xen's memory holds exactly what the stack says, through
//! pushes, pops and context switches; a writable entry onto a page table is
//! refused by Xen; a slot change sent with an open lazy batch goes out in
//! the same hypercall, after the writes queued before it.

mod common;

use common::*;
use hypercall::abi::UVMF_INVLPG;
use hypercall::MmuHypercalls;
use proptest::prelude::*;
use pvmmu::backend::Backend;
use pvmmu::entry::{Entry, Flags, Level};
use pvmmu::kmap::{self, SlotStack, StackError, SwitchError, LEVELS};
use pvmmu::{AddressSpace, Mfn, Pfn};

const WINDOW: usize = 8;
const TASK: usize = 4;
const THREADS: usize = 3;

/// One step of a CPU's life.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Push `frame` at `level`.
    Push { level: usize, frame: u64 },
    /// Pop the slot `back` below the top (0: the top) claiming `level`.
    Pop { back: usize, level: usize },
    /// Switch to thread `to`.
    Switch { to: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..LEVELS, 1u64..64).prop_map(|(level, frame)| Op::Push { level, frame }),
        4 => (prop_oneof![4 => Just(0usize), 1 => 1usize..3], 0..LEVELS)
            .prop_map(|(back, level)| Op::Pop { back, level }),
        1 => (0..THREADS).prop_map(|to| Op::Switch { to }),
    ]
}

/// The reference: a CPU's stack as a vector of (level, entry), each
/// thread's saved kmaps as a vector, and the high-water marks.
#[derive(Default)]
struct Reference {
    cpu: Vec<(usize, u64)>,
    threads: [Vec<u64>; THREADS],
    running: usize,
    max: [u32; LEVELS],
}

impl Reference {
    fn depth(&self, level: usize) -> u32 {
        self.cpu.iter().filter(|(l, _)| *l == level).count() as u32
    }
}

/// The system under test: the CPU's stack, the threads' stacks, and the
/// window as the hardware sees it (written only through `set`).
struct Cpu {
    stack: SlotStack<WINDOW>,
    threads: [SlotStack<TASK>; THREADS],
    running: usize,
    window: [u64; WINDOW],
}

impl Cpu {
    fn new() -> Self {
        Cpu {
            stack: SlotStack::new(),
            threads: core::array::from_fn(|_| SlotStack::new()),
            running: 0,
            window: [0; WINDOW],
        }
    }

    /// What the guest kernel's kmap_local does: both stacks checked, the
    /// hardware slot set, then both committed.
    fn push(&mut self, level: usize, entry: u64) -> Result<usize, StackError> {
        let slot = self.stack.check_push(level)?;
        if level == 0 {
            self.threads[self.running]
                .check_push(0)
                .map_err(|_| StackError::Overflow { slot })?;
        }
        self.window[slot] = entry;
        self.stack.push(level, entry)?;
        if level == 0 {
            self.threads[self.running].push(0, entry)?;
        }
        Ok(slot)
    }

    fn pop(&mut self, slot: usize, level: usize) -> Result<(), StackError> {
        self.stack.check_pop(slot, level)?;
        if level == 0 {
            self.threads[self.running].check_pop(slot, 0)?;
        }
        self.window[slot] = 0;
        self.stack.pop(slot, level)?;
        if level == 0 {
            self.threads[self.running].pop(slot, 0)?;
        }
        Ok(())
    }

    fn switch(&mut self, to: usize) -> Result<(), SwitchError> {
        let window = &mut self.window;
        kmap::switch(
            &mut self.stack,
            &self.threads[self.running],
            &self.threads[to],
            |slot, e| window[slot] = e,
        )?;
        self.running = to;
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every push, pop and switch gives the reference's answer, and after
    /// each the stacks, the depths, their high-water marks and the window
    /// equal the reference's.
    #[test]
    fn stack_matches_the_reference(ops in prop::collection::vec(op(), 1..80)) {
        let mut r = Reference::default();
        let mut c = Cpu::new();
        for op in ops {
            match op {
                Op::Push { level, frame } => {
                    let full = r.cpu.len() >= WINDOW
                        || (level == 0 && r.threads[r.running].len() >= TASK);
                    let under = r.cpu.last().is_some_and(|&(l, _)| l > level);
                    let got = c.push(level, frame << 12 | 1);
                    if r.cpu.len() >= WINDOW {
                        prop_assert_eq!(got, Err(StackError::Overflow { slot: r.cpu.len() }));
                    } else if under {
                        prop_assert_eq!(got, Err(StackError::Nesting { slot: r.cpu.len() - 1 }));
                    } else if full {
                        prop_assert_eq!(got, Err(StackError::Overflow { slot: r.cpu.len() }));
                    } else {
                        prop_assert_eq!(got, Ok(r.cpu.len()));
                        r.cpu.push((level, frame << 12 | 1));
                        if level == 0 {
                            r.threads[r.running].push(frame << 12 | 1);
                        }
                        let d = r.depth(level);
                        r.max[level] = r.max[level].max(d);
                    }
                }
                Op::Pop { back, level } => {
                    let Some(slot) = r.cpu.len().checked_sub(1 + back) else {
                        continue;
                    };
                    let got = c.pop(slot, level);
                    if back != 0 {
                        prop_assert_eq!(got, Err(StackError::OutOfOrder { slot, top: r.cpu.len() }));
                    } else if r.cpu[slot].0 != level {
                        prop_assert_eq!(got, Err(StackError::WrongContext { slot }));
                    } else {
                        prop_assert_eq!(got, Ok(()));
                        r.cpu.pop();
                        if level == 0 {
                            r.threads[r.running].pop();
                        }
                    }
                }
                Op::Switch { to } => {
                    let handlers = r.cpu.iter().any(|(l, _)| *l != 0);
                    let got = c.switch(to);
                    if handlers {
                        prop_assert!(got.is_err(), "switch with handler slots accepted");
                    } else {
                        prop_assert_eq!(got, Ok(()));
                        r.running = to;
                        r.cpu = r.threads[to].iter().map(|&e| (0, e)).collect();
                        let d = r.depth(0);
                        r.max[0] = r.max[0].max(d);
                    }
                }
            }
            let want: Vec<u64> = r.cpu.iter().map(|&(_, e)| e).collect();
            prop_assert_eq!(c.stack.entries(), &want[..]);
            prop_assert_eq!(&c.window[..want.len()], &want[..]);
            prop_assert!(c.window[want.len()..].iter().all(|&e| e == 0), "stale slot above top");
            for level in 0..LEVELS {
                prop_assert_eq!(c.stack.depth()[level], r.depth(level));
            }
            for (slot, &(level, _)) in r.cpu.iter().enumerate() {
                prop_assert_eq!(c.stack.level_of(slot), Some(level));
            }
            prop_assert_eq!(c.stack.max_depth(), r.max);
            for t in 0..THREADS {
                prop_assert_eq!(c.threads[t].entries(), &r.threads[t][..]);
            }
            prop_assert!(kmap::depths_fit(c.stack.depth(), WINDOW));
        }
    }
}

// ---- PV slot updates against the Xen model ---------------------------------

const KMAP_VA: u64 = 0x0000_0300_0000_0000;
const ANCHOR: usize = 511;
const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);
const RW: Flags = RO.union(Flags::WRITABLE);

fn slot_va(slot: usize) -> u64 {
    KMAP_VA + slot as u64 * 4096
}

/// A live space over the model whose window L1 exists (anchored by a page
/// in its last entry, as the guest's `kmap::init` does), and that L1.
fn window(model: &Shared) -> (AddressSpace<PvBackend, Pool>, Pfn) {
    let mut s = AddressSpace::new(pv_backend(model, 64), Pool::new(2048, 256))
        .map_err(|e| e.0)
        .expect("space");
    s.map(slot_va(ANCHOR), Pfn(1), 4096, RO)
        .expect("anchor")
        .ignore();
    // SAFETY: nothing runs on these tables; the model just walks them.
    unsafe { s.activate() }.expect("NEW_BASEPTR");
    let l1 = pvmmu::walk::walk(s.backend(), s.root(), KMAP_VA, Level::L1)
        .expect("window L1")
        .table;
    (s, l1)
}

/// The bits a slot's entry is compared on: frame, present, writable, NX
/// (Xen adds USER and its own software bit to a PV kernel's leaves).
const COMPARED: u64 = 0x000f_ffff_ffff_f000 | 1 | 2 | (1 << 63);

/// Slot `slot`'s entry in Xen's memory (compared bits only).
fn in_xen(model: &Shared, l1: Pfn, slot: usize) -> u64 {
    let m = model.0.borrow();
    let mfn = m.mfn_of(l1).expect("l1 mfn");
    m.read_entry(mfn, slot).expect("readable") & COMPARED
}

fn pte(model: &Shared, frame: u64, flags: Flags) -> u64 {
    let mfn: Mfn = model.0.borrow().mfn_of(Pfn(frame)).expect("guest frame");
    Entry::new(mfn, flags).0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The stack's books drive `update_va_mapping` on the window exactly as
    /// the guest kernel does; after every step Xen's copy of each slot is
    /// the stack's entry (or empty above the top), and Xen accepted every
    /// change.
    #[test]
    fn pv_slot_updates_match_the_stack(ops in prop::collection::vec(op(), 1..60)) {
        let model = shared(4096);
        let (mut s, l1) = window(&model);
        let mut c = Cpu::new();
        for op in ops {
            let before = c.window;
            match op {
                Op::Push { level, frame } => {
                    let e = pte(&model, 100 + frame, RW);
                    let _ = c.push(level, e);
                }
                Op::Pop { back, level } => {
                    if let Some(slot) = c.stack.top().checked_sub(1 + back) {
                        let _ = c.pop(slot, level);
                    }
                }
                Op::Switch { to } => {
                    let _ = c.switch(to);
                }
            }
            for (slot, (&now, &was)) in c.window.iter().zip(&before).enumerate() {
                if now != was {
                    s.backend_mut()
                        .hypercalls_mut()
                        .update_va_mapping(slot_va(slot), now, UVMF_INVLPG)
                        .expect("Xen accepts the slot update");
                }
            }
            for slot in 0..WINDOW {
                prop_assert_eq!(in_xen(&model, l1, slot), c.stack.entry(slot), "slot {}", slot);
            }
        }
        prop_assert!(model.0.borrow().check_integrity().is_ok());
    }
}

/// A read-only kmap of a page table is fine; a writable one is what Xen
/// refuses (the guest refuses it itself first, with a typed error).
#[test]
fn pv_writable_kmap_of_a_page_table_is_refused_by_xen() {
    let model = shared(4096);
    let (mut s, l1) = window(&model);
    let table = pte(&model, l1.0, RO);
    let hv = s.backend_mut().hypercalls_mut();
    hv.update_va_mapping(slot_va(0), table, UVMF_INVLPG)
        .expect("read-only kmap of a table");
    assert_eq!(in_xen(&model, l1, 0), table);
    let writable = pte(&model, l1.0, RW);
    let hv = s.backend_mut().hypercalls_mut();
    assert!(hv
        .update_va_mapping(slot_va(1), writable, UVMF_INVLPG)
        .is_err());
    assert_eq!(in_xen(&model, l1, 1), 0, "refused entry written");
}

/// A slot change made while a lazy batch is open goes out with it: one
/// hypercall for the queued writes and the slot, the queued writes first
/// (a queued write to the same slot is overwritten, not the reverse), and
/// the batch stays open for what follows.
#[test]
fn pv_slot_change_joins_the_open_lazy_batch() {
    let model = shared(4096);
    let (mut s, l1) = window(&model);
    let far = 0x0000_0310_0000_0000;
    s.open_lazy();
    s.map(far, Pfn(50), 4096, RW).expect("queued map").ignore();
    let stale = Entry(pte(&model, 60, RO));
    s.backend_mut()
        .write(l1, 2, stale)
        .expect("queued slot write");
    let queued = s.backend().pending();
    assert!(queued >= 2, "writes queued: {queued}");
    model.0.borrow_mut().reset_stats();
    let e = pte(&model, 70, RW);
    s.send_with_entry(l1, 2, Entry(e), slot_va(2))
        .expect("joined");
    let st = model.0.borrow().stats();
    assert_eq!(st.hypercalls, 1, "one hypercall for batch and slot: {st:?}");
    assert_eq!(
        st.update_va_mappings, 0,
        "a separate update_va_mapping: {st:?}"
    );
    assert_eq!(s.backend().pending(), 0, "batch left queued");
    assert_eq!(
        in_xen(&model, l1, 2),
        e,
        "slot lost to the older queued write"
    );
    let m = model.0.borrow();
    let leaf = pvmmu::walk::walk(s.backend(), s.root(), far, Level::L1).expect("far L1");
    let far_l1 = m.mfn_of(leaf.table).expect("mfn");
    assert_eq!(
        Entry(m.read_entry(far_l1, leaf.index).expect("entry")).mfn(),
        m.mfn_of(Pfn(50)).expect("mfn"),
        "the queued map was not sent"
    );
    drop(m);
    // Still open: the next change queues again, the close drains it.
    s.map(far + 4096, Pfn(51), 4096, RW).expect("map").ignore();
    assert_eq!(s.backend().pending(), 1);
    s.close_lazy().expect("close");
    assert_eq!(s.backend().pending(), 0);
}
