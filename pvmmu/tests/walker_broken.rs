//! The invariant walker given deliberately broken trees: each break must be
//! reported, exactly once, with the offending address; a clean tree reports
//! nothing. The breaks are direct stores into live tables behind Xen's back
//! (what a buggy kernel or engine would leave), on the Xen model with its
//! page types as oracle, and natively with a table set as oracle.

mod common;

use std::ptr::NonNull;

use common::*;
use pvmmu::backend::{Backend, BackendError, Caps, Kind, LargePages, Native, TlbScope};
use pvmmu::entry::{Entry, Flags, Level};
use pvmmu::invariants::{self, Rules, Violation};
use pvmmu::phys::FrameWords;
use pvmmu::types::ENTRIES;
use pvmmu::walk::walk;
use pvmmu::{AddressSpace, Mfn, Pfn};

const VA: u64 = 0x0000_0300_0000_0000;
const RO: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);
const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);
const RWX: Flags = Flags::PRESENT.union(Flags::WRITABLE);

/// Stores `val` into entry `index` of `table` directly (no hypercall, no
/// queue): the break under test.
fn poke<B: Backend>(b: &B, table: Pfn, index: usize, val: u64) {
    let frame = b.frame_ptr(table).expect("table frame reachable");
    // SAFETY: the frame pointer is valid for 4 KiB (PhysMem contract), the
    // index is below 512, and nothing else accesses the frame meanwhile
    // (single-threaded test, no call on the space in progress).
    unsafe { frame.as_ptr().cast::<u64>().add(index).write_volatile(val) };
}

/// The L1 table holding `va`'s entry, and the entry's index.
fn l1_slot<B: Backend>(b: &B, root: Pfn, va: u64) -> (Pfn, usize) {
    let f = walk(b, root, va, Level::L1).expect("walk");
    assert_eq!(f.level, Level::L1);
    (f.table, f.index)
}

fn pv_space(model: &Shared) -> AddressSpace<PvBackend, Pool> {
    let mut s = AddressSpace::new(pv_backend(model, 64), Pool::new(2048, 256))
        .map_err(|e| e.0)
        .expect("space");
    s.map(VA, Pfn(10), 8 * 4096, RO).expect("map").ignore();
    s
}

fn pv_violations(model: &Shared, s: &AddressSpace<PvBackend, Pool>) -> Vec<Violation> {
    violations(s.backend(), s.root(), Some(&ModelOracle(&model.0.borrow())))
}

#[test]
fn pv_walker_reports_a_table_frame_mapped_writable() {
    let model = shared(4096);
    let s = pv_space(&model);
    assert_eq!(pv_violations(&model, &s), []);
    let (l1, i) = l1_slot(s.backend(), s.root(), VA + 4096);
    // The L1 itself, mapped writable at VA + 4096; then the root at VA + 2
    // pages.
    for (k, table) in [(i, l1), (i + 1, s.root())] {
        let mfn = s.backend().to_mfn(table).expect("mfn");
        poke(s.backend(), l1, k, Entry::new(mfn, RW).0);
    }
    let root_mfn = s.backend().to_mfn(s.root()).expect("mfn");
    let l1_mfn = s.backend().to_mfn(l1).expect("mfn");
    assert_eq!(
        pv_violations(&model, &s),
        [
            Violation::WritableTable {
                va: VA + 4096,
                mfn: l1_mfn
            },
            Violation::WritableTable {
                va: VA + 2 * 4096,
                mfn: root_mfn
            },
        ]
    );
    // Read-only mappings of table frames are allowed.
    poke(s.backend(), l1, i, Entry::new(l1_mfn, RO).0);
    poke(s.backend(), l1, i + 1, Entry::new(root_mfn, RO).0);
    assert_eq!(pv_violations(&model, &s), []);
}

#[test]
fn pv_walker_reports_write_execute() {
    let model = shared(4096);
    let s = pv_space(&model);
    let (l1, i) = l1_slot(s.backend(), s.root(), VA + 3 * 4096);
    let mfn = s.backend().to_mfn(Pfn(13)).expect("mfn");
    poke(s.backend(), l1, i, Entry::new(mfn, RWX).0);
    assert_eq!(
        pv_violations(&model, &s),
        [Violation::WriteExecute { va: VA + 3 * 4096 }]
    );
    // Without the W^X rule, the same tree is clean.
    let mut v = Vec::new();
    let model_ref = model.0.borrow();
    invariants::check(
        s.backend(),
        s.root(),
        Rules {
            pv: true,
            wx: false,
            pv_cache: false,
        },
        Some(&ModelOracle(&model_ref)),
        &mut |x| v.push(x),
    );
    assert_eq!(v, []);
}

#[test]
fn native_walker_reports_a_writable_table_and_write_execute_under_pv_rules() {
    let mut s = AddressSpace::new(Native::new(Arena::new(64)), Pool::new(1, 63))
        .map_err(|e| e.0)
        .expect("space");
    s.map(VA, Pfn(40), 4 * 4096, RO).expect("map").ignore();
    let (l1, i) = l1_slot(s.backend(), s.root(), VA);
    poke(s.backend(), l1, i, Entry::new(Mfn(l1.0), RW).0);
    poke(s.backend(), l1, i + 1, Entry::new(Mfn(41), RWX).0);
    let tables = TableSet::of(s.backend(), s.root());
    let mut v = Vec::new();
    invariants::check(
        s.backend(),
        s.root(),
        Rules {
            pv: true,
            wx: true,
            pv_cache: false,
        },
        Some(&tables),
        &mut |x| v.push(x),
    );
    assert_eq!(
        v,
        [
            Violation::WritableTable {
                va: VA,
                mfn: Mfn(l1.0)
            },
            Violation::WriteExecute { va: VA + 4096 },
        ]
    );
    // Native rules: writable tables are fine, W^X is still reported.
    assert_eq!(
        violations(s.backend(), s.root(), Some(&tables)),
        [Violation::WriteExecute { va: VA + 4096 }]
    );
}

/// A backend over native tables whose reserved range is the 1 GiB at
/// `HOLE`: L4 slots inside a reserved range are skipped whole, so only a
/// range that is not L4-aligned can show the walker's report of a mapping
/// inside it.
struct Holed(Native<Arena>);

const HOLE: (u64, u64) = (VA + (1 << 30), VA + (2 << 30));

impl Backend for Holed {
    fn kind(&self) -> Kind {
        self.0.kind()
    }
    fn caps(&self) -> Caps {
        Caps::XEN_PV
    }
    fn large_pages(&self) -> LargePages {
        self.0.large_pages()
    }
    fn reserved(&self) -> Option<(u64, u64)> {
        Some(HOLE)
    }
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn> {
        self.0.to_mfn(pfn)
    }
    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn> {
        self.0.to_pfn(mfn)
    }
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        self.0.frame_ptr(pfn)
    }
    fn leaf_entry(&self, level: Level, pfn: Pfn, flags: Flags) -> Result<Entry, BackendError> {
        self.0.leaf_entry(level, pfn, flags)
    }
    fn table_entry(&self, pfn: Pfn) -> Result<Entry, BackendError> {
        self.0.table_entry(pfn)
    }
    fn normalize(&self, flags: Flags) -> Flags {
        self.0.normalize(flags)
    }
    fn read(&self, table: Pfn, index: usize) -> Entry {
        self.0.read(table, index)
    }
    fn read_table(&self, table: Pfn, out: &mut [u64; ENTRIES]) {
        self.0.read_table(table, out)
    }
    fn write(&mut self, table: Pfn, index: usize, val: Entry) -> Result<(), BackendError> {
        self.0.write(table, index, val)
    }
    fn pending(&self) -> usize {
        self.0.pending()
    }
    fn drain(&mut self) -> Result<(), BackendError> {
        self.0.drain()
    }
    fn new_table(&mut self, pfn: Pfn) -> Result<(), BackendError> {
        self.0.new_table(pfn)
    }
    fn seal_table(&mut self, pfn: Pfn) -> Result<(), BackendError> {
        self.0.seal_table(pfn)
    }
    fn release_table(&mut self, pfn: Pfn) -> Result<(), BackendError> {
        self.0.release_table(pfn)
    }
    fn pin(&mut self, level: Level, pfn: Pfn) -> Result<(), BackendError> {
        self.0.pin(level, pfn)
    }
    fn unpin(&mut self, pfn: Pfn) -> Result<(), BackendError> {
        self.0.unpin(pfn)
    }
    unsafe fn switch_root(&mut self, root: Pfn) -> Result<(), BackendError> {
        // SAFETY: forwarded contract; the tables are an arena nobody walks.
        unsafe { self.0.switch_root(root) }
    }
    unsafe fn replace_root(&mut self, root: Pfn, old: Option<Pfn>) -> Result<(), BackendError> {
        // SAFETY: forwarded contract; the tables are an arena nobody walks.
        unsafe { self.0.replace_root(root, old) }
    }
    fn flush_tlb(&mut self, scope: TlbScope) -> Result<(), BackendError> {
        self.0.flush_tlb(scope)
    }
}

#[test]
fn walker_reports_an_entry_in_the_reserved_hole() {
    let mut s = AddressSpace::new(Holed(Native::new(Arena::new(64))), Pool::new(1, 63))
        .map_err(|e| e.0)
        .expect("space");
    s.map(VA, Pfn(40), 4096, RO).expect("map").ignore();
    assert_eq!(
        s.map(HOLE.0, Pfn(41), 4096, RO).map(|f| f.ignore()),
        Err(pvmmu::Error::XenHole),
        "the engine refuses the hole itself"
    );
    let tables = TableSet::of(s.backend(), s.root());
    assert_eq!(violations(s.backend(), s.root(), Some(&tables)), []);
    // A 1 GiB slot of the L3 that maps VA, pointing into the hole's range:
    // an L2 table (the root frame reused, any table will do) hooked behind
    // the engine's back.
    let f = walk(s.backend(), s.root(), HOLE.0, Level::L3).expect("walk");
    assert_eq!(f.level, Level::L3);
    assert!(!f.entry.is_present());
    let l2 = Pfn(60);
    poke(
        s.backend(),
        f.table,
        f.index,
        Entry::new(Mfn(l2.0), Flags::PRESENT).0,
    );
    let tables = TableSet::of(s.backend(), s.root());
    assert_eq!(
        violations(s.backend(), s.root(), Some(&tables)),
        [Violation::InXenHole { va: HOLE.0 }]
    );
}
