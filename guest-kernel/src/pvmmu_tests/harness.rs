//! The harness: one test's view of the live tree ([`Cx`]), the run of a
//! test body on the backend of this boot, and the checks after it (test
//! area empty, frames back, pvmmu's invariant walker clean).

use pvmmu::backend::{Backend, CpuTlb, LargePages, Native, XenPv};
use pvmmu::entry::Level;
use pvmmu::invariants::{Oracle, Rules, Violation};
use pvmmu::{invariants, AddressSpace, FrameAllocator, Mfn, Pfn};

use crate::directmap::DirectMem;
use crate::selftest::{check, check_eq, Failure, TestResult};
use crate::Kernel;

use super::backends::{LiveBackend, NativeBackend, PvBackend};
use super::frames::{TableFrames, MAX_LOANS};
use super::{Body, MIB2, PAGE, TEST_AREA, TEST_AREA_BYTES, TEST_SLOT};

/// One test's view: an address space adopted over the live tree.
pub(crate) struct Cx<'k, B: LiveBackend> {
    pub(crate) space: AddressSpace<B, TableFrames<'k>>,
    pub(crate) mem: DirectMem,
    pub(crate) pv: bool,
}

/// Runs `on_pv` or `on_native` on an address space over the live tree,
/// then cleans up and checks (see the module invariant).
pub(crate) fn live(
    kernel: &mut Kernel,
    on_pv: Body<PvBackend>,
    on_native: Body<NativeBackend>,
) -> TestResult {
    let dm = kernel
        .direct_map
        .clone()
        .ok_or(Failure::Check("no direct map"))?;
    let alloc = TableFrames {
        frames: &mut kernel.frames,
        loans: [None; MAX_LOANS],
    };
    match kernel.pv.clone() {
        Some(pv) => {
            let root_mfn = pv
                .pfn_to_mfn(dm.root.0)
                .map(Mfn)
                .ok_or(Failure::Check("root has no machine frame"))?;
            // SAFETY: `kernel.pv` is set only on the Xen PV entry path.
            let xen = unsafe { hypercall::Xen::new() };
            let backend = XenPv::new(xen, dm.mem, pv, dm.aliases, Some(root_mfn));
            // SAFETY: `dm.root` is the live L4 the bootstrap built, validated
            // and pinned; the tests edit only the test area, whose tables
            // come from and go back to `alloc`, and nothing else refers to
            // that slot.
            let space = unsafe { AddressSpace::from_root(backend, alloc, dm.root, true) };
            run_live(
                &mut Cx {
                    space,
                    mem: dm.mem,
                    pv: true,
                },
                on_pv,
            )
        }
        None => {
            let large = if crate::platform::has_1g_pages() {
                LargePages::Size1GiB
            } else {
                LargePages::Size2MiB
            };
            // SAFETY: native (or PVH) ring 0, and `dm.root` is the tree the
            // CPU walks (CR3).
            let backend =
                Native::with_tlb(dm.mem, unsafe { CpuTlb::new() }).with_large_pages(large);
            // SAFETY: `dm.root` is the live L4; as for PV, only the test
            // area is edited and its tables belong to `alloc`.
            let space = unsafe { AddressSpace::from_root(backend, alloc, dm.root, false) };
            run_live(
                &mut Cx {
                    space,
                    mem: dm.mem,
                    pv: false,
                },
                on_native,
            )
        }
    }
}

fn run_live<B: LiveBackend>(cx: &mut Cx<'_, B>, body: Body<B>) -> TestResult {
    check(!slot_in_use(cx), "test area in use before the test")?;
    let before = cx.space.allocator().free_count();
    let result = body(cx);
    let leftovers = clean_test_area(cx);
    let loans = cx.space.allocator_mut().give_back_all();
    let invariants = check_invariants(cx, &mut |v| {
        log::error!("invariant violation: {v:?}");
    });
    let after = cx.space.allocator().free_count();
    result?;
    check_eq("pages the test left mapped", leftovers, 0)?;
    check_eq("frame runs the test kept", loans, 0)?;
    check(!slot_in_use(cx), "tables left in the test area")?;
    check_eq("free frames after the test", after, before)?;
    check_eq("invariant violations", invariants?, 0)
}

pub(super) fn slot_in_use<B: LiveBackend>(cx: &Cx<'_, B>) -> bool {
    cx.space
        .backend()
        .read(cx.space.root(), TEST_SLOT)
        .is_present()
}

/// The tables on the way to `va`: `[L3, L2, L1]` (`None` past the first
/// missing one, or below a large page).
pub(super) fn tables_of<B: Backend, A: FrameAllocator>(
    space: &AddressSpace<B, A>,
    va: u64,
) -> [Option<Pfn>; 3] {
    let b = space.backend();
    let mut out = [None; 3];
    let mut table = space.root();
    let mut level = Level::L4;
    for slot in &mut out {
        let e = b.read(table, level.index(va));
        if !e.is_present() || (level != Level::L4 && e.is_huge()) {
            break;
        }
        let Some(next) = b.to_pfn(e.mfn()) else { break };
        *slot = Some(next);
        table = next;
        level = match level.lower() {
            Some(l) => l,
            None => break,
        };
    }
    out
}

/// Unmaps every leaf left in the test area; returns how many 4 KiB pages
/// were still mapped.
fn clean_test_area<B: LiveBackend>(cx: &mut Cx<'_, B>) -> u64 {
    let mut left = 0;
    let mut va = TEST_AREA;
    while va < TEST_AREA + TEST_AREA_BYTES {
        if tables_of(&cx.space, va)[0].is_none() {
            return left;
        }
        match cx.space.lookup(va) {
            Ok(t) => {
                let bytes = t.granule.bytes();
                left += bytes / PAGE;
                if let Ok(f) = cx.space.unmap(va, bytes) {
                    let _ = cx.space.flush(f);
                }
                va += bytes;
            }
            // Skip to the next table boundary that could hold something.
            Err(_) => {
                let [_, l2, l1] = tables_of(&cx.space, va);
                let step = if l2.is_none() {
                    1 << 30
                } else if l1.is_none() {
                    MIB2
                } else {
                    PAGE
                };
                va = (va & !(step - 1)) + step;
            }
        }
    }
    left
}

/// A set of table frames collected by a walk of the live tree, sorted
/// (`mfn << 2 | level - 1`), for the invariant walker's [`Oracle`].
const MAX_TABLES: usize = crate::directmap::MAX_LIVE_TABLES;
static TABLE_SET: spin::Mutex<[u64; MAX_TABLES]> = spin::Mutex::new([0; MAX_TABLES]);

/// The oracle: a frame is a table at the level the walk met it; the root
/// is pinned as far as Xen said. What it adds to the walk is the
/// writable-table rule (a leaf mapping any walked table RW) and the root's
/// pin; the types of walked tables agree with the walk by construction
/// (Xen's own types are not readable by a guest).
struct WalkedTables<'a> {
    set: &'a [u64],
    pinned_root: Option<Mfn>,
}

impl Oracle for WalkedTables<'_> {
    fn table_level(&self, mfn: Mfn) -> Option<Level> {
        let i = self.set.partition_point(|&x| x >> 2 < mfn.0);
        let x = *self.set.get(i)?;
        (x >> 2 == mfn.0).then_some(match x & 3 {
            0 => Level::L1,
            1 => Level::L2,
            2 => Level::L3,
            _ => Level::L4,
        })
    }
    fn is_pinned(&self, mfn: Mfn) -> bool {
        self.pinned_root == Some(mfn)
    }
}

/// pvmmu's invariant walker over the whole live tree (under PV with an
/// oracle of the walked tables and Xen's answer on the root's pin).
pub(crate) fn check_invariants<B: LiveBackend>(
    cx: &mut Cx<'_, B>,
    report: &mut dyn FnMut(Violation),
) -> Result<u64, Failure> {
    let root = cx.space.root();
    let pinned = cx.space.backend_mut().root_pinned(root)?;
    let b = cx.space.backend();
    let rules = Rules::for_backend(b);
    let Some(pinned) = pinned else {
        return Ok(invariants::check(b, root, rules, None, report) as u64);
    };
    let mut set = TABLE_SET.lock();
    let mut n = 0usize;
    let mut overflow = false;
    invariants::for_each_table(
        b,
        root,
        &mut |pfn, level| match (b.to_mfn(pfn), set.get_mut(n)) {
            (Some(mfn), Some(slot)) => {
                *slot = (mfn.0 << 2) | u64::from(level.number() - 1);
                n += 1;
            }
            _ => overflow = true,
        },
    );
    check(!overflow, "more tables than the oracle holds")?;
    set[..n].sort_unstable();
    let oracle = WalkedTables {
        set: &set[..n],
        pinned_root: if pinned { b.to_mfn(root) } else { None },
    };
    Ok(invariants::check(b, root, rules, Some(&oracle), report) as u64)
}
