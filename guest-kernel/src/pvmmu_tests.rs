//! Self-tests of pvmmu's address space on real memory, through the live
//! tree: map frames from the allocator at a test area, write through one
//! mapping and read the same bytes through the direct map, translate,
//! protect, execute, unmap, the typed errors, Xen's refusal of a writable
//! page-table mapping, lazy batches and their hypercall cost, 2 MiB pages
//! natively, and the `x86_64` crate's `Mapper`/`Translate` traits. The same
//! test bodies run on both backends (generic over [`LiveBackend`]).
//!
//! Invariant: a test touches the live tree only inside the test area (L4
//! slot [`TEST_SLOT`], clear of the direct map, the kernel image and Xen's
//! hole), which is empty before and after every test; after each test the
//! harness here unmaps whatever a failed test left there, returns the frames
//! it borrowed, and requires the allocator's free count to be what it was,
//! the slot to be empty again and pvmmu's invariant walker to find nothing
//! wrong with the whole live tree.

use hypercall::{HypercallStats, MmuExt, MmuHypercalls, PinLevel, XenError};
use pvmmu::backend::{Backend, CpuTlb, LargePages, Native, TlbScope, XenPv};
use pvmmu::entry::{FlagError, Flags, Level, HARDWARE_SET};
use pvmmu::invariants::{self, Oracle, Rules, Violation};
use pvmmu::space::Flush;
use pvmmu::{AddressSpace, Error, FrameAllocator, Granule, Mfn, Pfn, PAGE_SIZE};
use x86_64::structures::paging::mapper::{
    MapToError, MappedFrame, MapperFlush, TranslateError, TranslateResult, UnmapError,
};
use x86_64::structures::paging::{
    FrameAllocator as X86FrameAllocator, Mapper, Page, PageSize, PageTableFlags, PhysFrame,
    Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

use crate::directmap::{DirectMem, KernelAliases, DIRECT_MAP_BASE};
use crate::frames::Frames;
use crate::selftest::{check, check_eq, Failure, Only, SelfTest, TestResult};
use crate::traps::{probe_exec, probe_read, probe_write, Fault};
use crate::xen_pv::PvBoot;
use crate::Kernel;

/// L4 slot of the test area (where Linux keeps vmalloc).
pub const TEST_SLOT: usize = 402;
/// First address of the test area.
pub const TEST_AREA: u64 = 0xffff_c900_0000_0000;
/// Bytes of the test area (one L4 slot).
const TEST_AREA_BYTES: u64 = 1 << 39;

const P: Flags = Flags::PRESENT;
const RW: Flags = Flags::WRITABLE;
const NX: Flags = Flags::NO_EXECUTE;
const PAGE: u64 = PAGE_SIZE;
const MIB2: u64 = 2 << 20;

/// The PV backend over the live tree.
type PvBackend = XenPv<hypercall::Xen, DirectMem, PvBoot, KernelAliases>;
/// The native backend over the live tree.
type NativeBackend = Native<DirectMem, CpuTlb>;

/// A test body, run on either backend.
pub(crate) type Body<B> = fn(&mut Cx<'_, B>) -> TestResult;

/// Registers a test that runs on both backends.
macro_rules! live_test {
    ($name:literal, $body:ident) => {
        SelfTest::new($name, |kernel| live(kernel, $body, $body))
    };
    ($name:literal, $only:expr, $body:ident) => {
        SelfTest::only($name, $only, |kernel| live(kernel, $body, $body))
    };
}

/// The suite.
pub const SUITE: &[SelfTest] = &[
    live_test!("pvmmu_map_write_read_both_ways", map_write_read),
    live_test!(
        "pvmmu_translate_frames_and_flags",
        translate_frames_and_flags
    ),
    live_test!("pvmmu_protect_read_only_faults", protect_read_only_faults),
    live_test!("pvmmu_execute_mapped_code", execute_mapped_code),
    live_test!("pvmmu_invariants_report_wx", invariants_report_wx),
    live_test!("pvmmu_unmap_faults_and_frees_tables", unmap_frees_tables),
    live_test!("pvmmu_range_across_tables", range_across_tables),
    live_test!("pvmmu_errors_mapped_and_unmapped", errors_mapped_unmapped),
    live_test!("pvmmu_errors_addresses_and_flags", errors_addresses_flags),
    live_test!(
        "pvmmu_refuses_writable_page_table",
        Only::XenPv,
        refuses_writable_table
    ),
    live_test!(
        "pvmmu_new_tables_read_only_aliases",
        Only::XenPv,
        tables_read_only_aliases
    ),
    live_test!("pvmmu_lazy_batch_few_hypercalls", lazy_batch_hypercalls),
    live_test!("pvmmu_large_pages_2m", Only::HardwarePaging, large_pages),
    live_test!("pvmmu_x86_64_mapper_translate", x86_64_traits),
    SelfTest::new("pvmmu_random_stress", crate::stress::test),
];

// ---- the frames a test uses ------------------------------------------------

/// Most runs of data frames a test borrows at once.
const MAX_LOANS: usize = 8;

/// The kernel's allocator as the address space sees it (tables), plus the
/// runs of data frames the running test borrowed.
pub struct TableFrames<'k> {
    frames: &'k mut Frames,
    loans: [Option<(u64, u64)>; MAX_LOANS],
}

impl FrameAllocator for TableFrames<'_> {
    fn allocate(&mut self) -> Option<Pfn> {
        self.frames.allocate_lowest()
    }
    fn free(&mut self, pfn: Pfn) {
        if let Err(e) = self.frames.try_free(pfn) {
            log::error!("table frame {pfn:?} not taken back: {e:?}");
        }
    }
}

impl TableFrames<'_> {
    /// Takes `n` contiguous free frames, the first a multiple of `align`.
    fn take_run(&mut self, n: u64, align: u64) -> Option<Pfn> {
        let slot = self.loans.iter().position(Option::is_none)?;
        let start = self.frames.ranges().iter().find_map(|r| {
            let start = r.start.next_multiple_of(align);
            (start.checked_add(n)? <= r.end).then_some(start)
        })?;
        self.frames.reserve(start, start + n).ok()?;
        self.loans[slot] = Some((start, n));
        Some(Pfn(start))
    }

    /// Gives back the run starting at `start`.
    fn give_back(&mut self, start: Pfn) -> TestResult {
        let slot = self
            .loans
            .iter()
            .position(|l| matches!(l, Some((s, _)) if *s == start.0))
            .ok_or(Failure::Check("gave back a run that was not lent"))?;
        if let Some((s, n)) = self.loans[slot].take() {
            self.frames
                .add(s, s + n)
                .map_err(|_| Failure::Check("allocator refused a run back"))?;
        }
        Ok(())
    }

    /// Gives back every run still lent; returns how many there were.
    fn give_back_all(&mut self) -> u64 {
        let mut n = 0;
        for slot in 0..MAX_LOANS {
            if let Some((s, _)) = self.loans[slot] {
                n += 1;
                let _ = self.give_back(Pfn(s));
            }
        }
        n
    }

    fn free_count(&self) -> u64 {
        self.frames.free_count()
    }
}

/// A few frames handed to the `x86_64` crate's `Mapper` as its allocator.
struct X86Pool {
    frames: [Pfn; 4],
    len: usize,
}

// SAFETY: every frame in the pool was taken out of the kernel's allocator
// for this pool and is handed out at most once.
unsafe impl X86FrameAllocator<Size4KiB> for X86Pool {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        self.len = self.len.checked_sub(1)?;
        Some(PhysFrame::containing_address(PhysAddr::new(
            self.frames[self.len].addr(),
        )))
    }
}

// ---- backends ---------------------------------------------------------------

/// What the tests need beyond [`Backend`] from the backend of the live
/// tree.
pub trait LiveBackend: Backend {
    /// Hypercall counters since boot (natively: no hypercall, all zero).
    fn counters(&self) -> HypercallStats;
    /// Whether Xen holds the root pinned (`None` natively: no pins).
    fn root_pinned(&mut self, root: Pfn) -> Result<Option<bool>, Failure>;
    /// Carries out a TLB flush the `x86_64` crate asked for (of the page
    /// at `va`).
    fn flush_x86<S: PageSize>(&mut self, flush: MapperFlush<S>, va: u64) -> TestResult;
}

impl LiveBackend for PvBackend {
    fn counters(&self) -> HypercallStats {
        self.hypercalls().stats()
    }

    /// Pins the root again: Xen answers EINVAL when it is pinned already
    /// (and drops the extra reference); if the pin succeeds the root was
    /// not pinned, and it is unpinned again.
    fn root_pinned(&mut self, root: Pfn) -> Result<Option<bool>, Failure> {
        let mfn = self
            .to_mfn(root)
            .ok_or(Failure::Check("root has no machine frame"))?
            .0;
        let pin = MmuExt::Pin {
            level: PinLevel::L4,
            mfn,
        };
        match self.hypercalls_mut().mmuext_op(&[pin.encode()]) {
            Err(e) if e.error == XenError::Inval => Ok(Some(true)),
            Ok(()) => {
                let unpin = MmuExt::Unpin { mfn };
                let _ = self.hypercalls_mut().mmuext_op(&[unpin.encode()]);
                Ok(Some(false))
            }
            Err(e) => Err(Failure::Xen {
                what: "pin of the live root",
                error: e.error,
            }),
        }
    }

    /// `invlpg` is privileged: the flush goes through Xen.
    fn flush_x86<S: PageSize>(&mut self, flush: MapperFlush<S>, va: u64) -> TestResult {
        flush.ignore();
        self.flush_tlb(TlbScope::Range {
            start: va,
            pages: S::SIZE / PAGE,
        })
        .map_err(|_| Failure::Check("TLB flush through Xen failed"))
    }
}

impl LiveBackend for NativeBackend {
    fn counters(&self) -> HypercallStats {
        HypercallStats {
            hypercalls: hypercall::raw::hypercall_count(),
            ..HypercallStats::default()
        }
    }
    fn root_pinned(&mut self, _root: Pfn) -> Result<Option<bool>, Failure> {
        Ok(None)
    }
    fn flush_x86<S: PageSize>(&mut self, flush: MapperFlush<S>, _va: u64) -> TestResult {
        flush.flush();
        Ok(())
    }
}

// ---- the harness -------------------------------------------------------------

/// One test's view: an address space adopted over the live tree.
pub struct Cx<'k, B: LiveBackend> {
    pub(crate) space: AddressSpace<B, TableFrames<'k>>,
    mem: DirectMem,
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

fn slot_in_use<B: LiveBackend>(cx: &Cx<'_, B>) -> bool {
    cx.space
        .backend()
        .read(cx.space.root(), TEST_SLOT)
        .is_present()
}

/// The tables on the way to `va`: `[L3, L2, L1]` (`None` past the first
/// missing one, or below a large page).
fn tables_of<B: Backend, A: FrameAllocator>(
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

// ---- small helpers -------------------------------------------------------------

/// Turns a pvmmu error into a failure (logged with its details).
pub(crate) fn failed(what: &'static str) -> impl Fn(Error) -> Failure {
    move |e| {
        log::error!("{what}: {e:?}");
        match e {
            Error::Hypervisor(error) => Failure::Xen { what, error },
            _ => Failure::Check(what),
        }
    }
}

/// Requires `got` to be exactly the error `want`.
fn expect_error<T>(what: &'static str, got: Result<T, Error>, want: Error) -> TestResult {
    match got {
        Err(e) if e == want => Ok(()),
        Err(e) => {
            log::error!("{what}: got {e:?}, expected {want:?}");
            Err(Failure::Check(what))
        }
        Ok(_) => {
            log::error!("{what}: accepted, expected {want:?}");
            Err(Failure::Check(what))
        }
    }
}

pub(crate) fn take<B: LiveBackend>(cx: &mut Cx<'_, B>, n: u64) -> Result<Pfn, Failure> {
    cx.space
        .allocator_mut()
        .take_run(n, 1)
        .ok_or(Failure::Check("no run of free frames"))
}

pub(crate) fn give<B: LiveBackend>(cx: &mut Cx<'_, B>, pfn: Pfn) -> TestResult {
    cx.space.allocator_mut().give_back(pfn)
}

fn map<B: LiveBackend>(
    cx: &mut Cx<'_, B>,
    va: u64,
    pfn: Pfn,
    pages: u64,
    flags: Flags,
) -> TestResult {
    let f = cx
        .space
        .map(va, pfn, pages * PAGE, flags)
        .map_err(failed("map"))?;
    cx.space.flush(f).map_err(failed("flush after map"))
}

fn unmap<B: LiveBackend>(cx: &mut Cx<'_, B>, va: u64, pages: u64) -> TestResult {
    let f = cx.space.unmap(va, pages * PAGE).map_err(failed("unmap"))?;
    cx.space.flush(f).map_err(failed("flush after unmap"))
}

fn protect<B: LiveBackend>(cx: &mut Cx<'_, B>, va: u64, pages: u64, flags: Flags) -> TestResult {
    let f = cx
        .space
        .protect(va, pages * PAGE, flags, false)
        .map_err(failed("protect"))?;
    cx.space.flush(f).map_err(failed("flush after protect"))
}

fn fault(what: &'static str) -> impl Fn(Fault) -> Failure {
    move |f| Failure::Fault {
        what,
        vector: f.vector,
        error_code: f.error_code,
    }
}

/// Whether `va` lies where these tests only ever map RAM: the test area
/// (frames from the allocator, or page tables) and the direct map.
fn maps_ram_only(va: u64) -> bool {
    (TEST_AREA..TEST_AREA + TEST_AREA_BYTES).contains(&va)
        || (DIRECT_MAP_BASE..DIRECT_MAP_BASE + (1 << 39)).contains(&va)
}

/// Reads the word at `va` (test area or direct map only).
pub(crate) fn read(what: &'static str, va: u64) -> Result<u64, Failure> {
    check(
        maps_ram_only(va),
        "read outside the test area and direct map",
    )?;
    // SAFETY: both areas map only RAM (see `maps_ram_only`): no side effects.
    unsafe { probe_read(va) }.map_err(fault(what))
}

/// Writes the word at `va`.
///
/// # Safety
/// If `va` is mapped writable, its 8 bytes belong to a frame the running
/// test borrowed.
pub(crate) unsafe fn write(what: &'static str, va: u64, value: u64) -> TestResult {
    check(
        maps_ram_only(va),
        "write outside the test area and direct map",
    )?;
    // SAFETY: forwarded to the caller.
    unsafe { probe_write(va, value) }.map_err(fault(what))
}

/// Requires a #PF at `va`, with the error code's present and write bits as
/// given.
fn expect_page_fault<T>(
    what: &'static str,
    got: Result<T, Fault>,
    va: u64,
    present: bool,
    write: bool,
) -> TestResult {
    match got {
        Ok(_) => Err(Failure::Check(what)),
        Err(f) => {
            check_eq("fault vector", u64::from(f.vector), 14)?;
            check_eq("fault address (cr2)", f.cr2, va)?;
            check_eq("#PF present bit", f.error_code & 1, u64::from(present))?;
            check_eq("#PF write bit", (f.error_code >> 1) & 1, u64::from(write))
        }
    }
}

pub(crate) fn pattern(pfn: Pfn, word: u64, round: u64) -> u64 {
    ((pfn.0 << 24) | (word << 4) | round).wrapping_mul(0x2545_f491_4f6c_dd1d)
        ^ 0x0123_4567_89ab_cdef
}

// ---- the tests -------------------------------------------------------------------

/// 16 frames mapped at the test area: every page written through the new
/// mapping and read through the direct map, then the other way round.
fn map_write_read<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let n = 16;
    let pfn = take(cx, n)?;
    let va = TEST_AREA;
    map(cx, va, pfn, n, P | RW | NX)?;
    for k in 0..n {
        let frame = Pfn(pfn.0 + k);
        let (new, direct) = (va + k * PAGE, DirectMem::va(frame));
        for (word, from, to) in [(0, new, direct), (511, direct, new), (77, new, direct)] {
            let value = pattern(frame, word, 1);
            // SAFETY: both addresses map `frame`, which this test borrowed.
            unsafe { write("write", from + word * 8, value) }?;
            check_eq(
                "word read through the other mapping",
                read("read", to + word * 8)?,
                value,
            )?;
        }
    }
    unmap(cx, va, n)?;
    give(cx, pfn)
}

/// Translate returns the frame, the offset and the flags asked for; the
/// direct map's translation agrees.
fn translate_frames_and_flags<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 3)?;
    let va = TEST_AREA + 5 * PAGE;
    let asked = [P | NX, P | RW | NX, P];
    for (k, flags) in asked.iter().enumerate() {
        let k = k as u64;
        map(cx, va + k * PAGE, Pfn(pfn.0 + k), 1, *flags)?;
    }
    for (k, flags) in asked.iter().enumerate() {
        let k = k as u64;
        let t = cx
            .space
            .lookup(va + k * PAGE + 0x123)
            .map_err(failed("translate"))?;
        check_eq("translated frame", t.pfn.0, pfn.0 + k)?;
        check_eq("translated offset", t.offset, 0x123)?;
        check(t.granule == Granule::Size4KiB, "granule not 4 KiB")?;
        check_eq(
            "translated flags",
            (t.flags - HARDWARE_SET).bits(),
            flags.bits(),
        )?;
        let d = cx
            .space
            .lookup(DirectMem::va(Pfn(pfn.0 + k)) + 8)
            .map_err(failed("translate of the direct map"))?;
        check_eq("direct-map frame", d.pfn.0, pfn.0 + k)?;
        check(d.flags.contains(RW | NX), "direct map not RW+NX")?;
    }
    unmap(cx, va, 3)?;
    for k in 0..3 {
        expect_error(
            "translate after unmap",
            cx.space.lookup(va + k * PAGE),
            Error::NotMapped { va: va + k * PAGE },
        )?;
    }
    give(cx, pfn)
}

/// protect to read-only: a store faults (#PF, present + write) and changes
/// nothing; protect back to RW: the store lands.
fn protect_read_only_faults<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 1)?;
    let va = TEST_AREA + 40 * PAGE;
    map(cx, va, pfn, 1, P | RW | NX)?;
    let first = pattern(pfn, 1, 2);
    // SAFETY: `va` maps the borrowed `pfn`.
    unsafe { write("write before protect", va + 8, first) }?;
    protect(cx, va, 1, P | NX)?;
    let t = cx.space.lookup(va).map_err(failed("translate"))?;
    check_eq(
        "flags after protect",
        (t.flags - HARDWARE_SET).bits(),
        (P | NX).bits(),
    )?;
    // SAFETY: as above; the store is expected to fault.
    let refused = unsafe { probe_write(va + 8, !first) };
    expect_page_fault("store to a read-only page", refused, va + 8, true, true)?;
    check_eq(
        "word after a refused store",
        read("read", DirectMem::va(pfn) + 8)?,
        first,
    )?;
    check_eq("word through the RO mapping", read("read", va + 8)?, first)?;
    protect(cx, va, 1, P | RW | NX)?;
    // SAFETY: as above.
    unsafe { write("write after protect back", va + 8, !first) }?;
    check_eq(
        "word after RW again",
        read("read", DirectMem::va(pfn) + 8)?,
        !first,
    )?;
    unmap(cx, va, 1)?;
    give(cx, pfn)
}

/// Code written through the direct map runs through a read-only,
/// executable mapping; W+X is refused without consent.
fn execute_mapped_code<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 1)?;
    let va = TEST_AREA + 64 * PAGE;
    let magic: u32 = 0x5eed_c0de;
    // mov eax, imm32; ret
    let m = magic.to_le_bytes();
    let code = u64::from_le_bytes([0xb8, m[0], m[1], m[2], m[3], 0xc3, 0xcc, 0xcc]);
    // SAFETY: the direct-map page of the borrowed `pfn`.
    unsafe { write("code store", DirectMem::va(pfn), code) }?;
    // A second copy of `ret` at offset 8, for the NX probes.
    // SAFETY: as above.
    unsafe { write("ret store", DirectMem::va(pfn) + 8, 0xc3) }?;
    // The direct map is NX: fetching from it faults (instruction fetch).
    expect_fetch_fault("fetch through the direct map", DirectMem::va(pfn) + 8)?;
    expect_error(
        "writable executable map without consent",
        cx.space.map(va, pfn, PAGE, P | RW),
        Error::WriteExecute,
    )?;
    map(cx, va, pfn, 1, P)?;
    let t = cx.space.lookup(va).map_err(failed("translate"))?;
    check(!t.flags.contains(NX), "code page mapped NX")?;
    // SAFETY: `va` maps, read-only and executable, a frame holding
    // `mov eax, imm32; ret`: a complete function of the C ABI with no
    // arguments, returning a u32 in eax and touching nothing else.
    let run: extern "C" fn() -> u32 = unsafe { core::mem::transmute(va as usize) };
    check_eq(
        "value returned by mapped code",
        u64::from(run()),
        u64::from(magic),
    )?;
    // SAFETY: `va + 8` holds `ret` and is executable here.
    unsafe { probe_exec(va + 8) }.map_err(|f| Failure::Fault {
        what: "fetch from the executable mapping",
        vector: f.vector,
        error_code: f.error_code,
    })?;
    // Made NX, the same page no longer runs.
    protect(cx, va, 1, P | NX)?;
    expect_fetch_fault("fetch after protect to NX", va + 8)?;
    unmap(cx, va, 1)?;
    give(cx, pfn)
}

/// A call to `va` must fault with a #PF whose error code says instruction
/// fetch (bit 4).
fn expect_fetch_fault(what: &'static str, va: u64) -> TestResult {
    // SAFETY: `va` holds `ret`; if it is (wrongly) executable, `ret` runs.
    match unsafe { probe_exec(va) } {
        Err(f) if f.vector == 14 && f.error_code & (1 << 4) != 0 && f.cr2 == va => Ok(()),
        Err(f) => Err(Failure::Fault {
            what,
            vector: f.vector,
            error_code: f.error_code,
        }),
        Ok(()) => Err(Failure::Check("an NX page executed")),
    }
}

/// The invariant walker is not blind: a W+X page mapped with consent is
/// reported (exactly once, at its address), and gone after unmap.
fn invariants_report_wx<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 1)?;
    let va = TEST_AREA + 3 * MIB2;
    let f = cx
        .space
        .map_wx(va, pfn, PAGE, P | RW)
        .map_err(failed("map_wx"))?;
    cx.space.flush(f).map_err(failed("flush"))?;
    let mut wx_at = 0u64;
    let mut other = 0u64;
    let n = check_invariants(cx, &mut |v| match v {
        Violation::WriteExecute { va } => wx_at = va,
        v => {
            other += 1;
            log::error!("invariant violation: {v:?}");
        }
    })?;
    check_eq("violations with one W+X page", n, 1)?;
    check_eq("reported W+X address", wx_at, va)?;
    check_eq("other violations", other, 0)?;
    unmap(cx, va, 1)?;
    check_eq(
        "violations after unmap",
        check_invariants(cx, &mut |_| {})?,
        0,
    )?;
    give(cx, pfn)
}

/// Unmap: the page faults (#PF, not present), translate says not mapped,
/// and the tables that became empty go back to the allocator (counted).
fn unmap_frees_tables<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 2)?;
    let (a, b) = (TEST_AREA + 7 * PAGE, TEST_AREA + MIB2 + 7 * PAGE);
    let free0 = cx.space.allocator().free_count();
    let (made0, freed0) = cx.space.table_counts();
    map(cx, a, pfn, 1, P | RW | NX)?;
    check_eq(
        "tables for the first page (L3, L2, L1)",
        free0 - cx.space.allocator().free_count(),
        3,
    )?;
    map(cx, b, Pfn(pfn.0 + 1), 1, P | RW | NX)?;
    check_eq(
        "tables for a page in the next L1",
        free0 - cx.space.allocator().free_count(),
        4,
    )?;
    check_eq("tables created", cx.space.table_counts().0 - made0, 4)?;
    read("read of a mapped page", a)?;

    unmap(cx, a, 1)?;
    check_eq(
        "tables left after the first unmap",
        free0 - cx.space.allocator().free_count(),
        3,
    )?;
    expect_page_fault(
        "read after unmap",
        // SAFETY: `a` is in the test area, which maps only RAM.
        unsafe { probe_read(a + 16) },
        a + 16,
        false,
        false,
    )?;
    expect_error(
        "translate after unmap",
        cx.space.lookup(a),
        Error::NotMapped { va: a },
    )?;
    read("read of the other page", b)?;

    unmap(cx, b, 1)?;
    check_eq(
        "free frames after both unmaps",
        cx.space.allocator().free_count(),
        free0,
    )?;
    check_eq("tables freed", cx.space.table_counts().1 - freed0, 4)?;
    check(!slot_in_use(cx), "L4 slot still in use")?;
    expect_page_fault(
        "read after the last unmap",
        // SAFETY: as above.
        unsafe { probe_read(b) },
        b,
        false,
        false,
    )?;
    give(cx, pfn)
}

/// One range over four L1 tables (from the last page of one to the first
/// of another): every page right; unmapping the middle whole frees exactly
/// its tables.
fn range_across_tables<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let n = 1026;
    let pfn = take(cx, n)?;
    let va = TEST_AREA + 2 * MIB2 - PAGE;
    let free0 = cx.space.allocator().free_count();
    map(cx, va, pfn, n, P | RW | NX)?;
    check_eq(
        "tables for the range (L3, L2, 4 L1)",
        free0 - cx.space.allocator().free_count(),
        6,
    )?;
    for k in [0, 1, 511, 512, 513, 1023, 1024, 1025] {
        let t = cx
            .space
            .lookup(va + k * PAGE)
            .map_err(failed("translate"))?;
        check_eq("frame of a page in the range", t.pfn.0, pfn.0 + k)?;
        let value = pattern(t.pfn, k, 3);
        // SAFETY: the page maps a frame of the borrowed run.
        unsafe { write("write", va + k * PAGE, value) }?;
        check_eq(
            "read back through the direct map",
            read("read", DirectMem::va(t.pfn))?,
            value,
        )?;
    }
    // The two middle L1s, covered whole.
    unmap(cx, TEST_AREA + 2 * MIB2, 1024)?;
    check_eq(
        "tables after the middle unmap",
        free0 - cx.space.allocator().free_count(),
        4,
    )?;
    expect_error(
        "translate in the middle",
        cx.space.lookup(TEST_AREA + 3 * MIB2),
        Error::NotMapped {
            va: TEST_AREA + 3 * MIB2,
        },
    )?;
    read("first page still mapped", va)?;
    read("last page still mapped", va + 1025 * PAGE)?;
    unmap(cx, va, 1)?;
    unmap(cx, va + 1025 * PAGE, 1)?;
    check_eq(
        "free frames at the end",
        cx.space.allocator().free_count(),
        free0,
    )?;
    give(cx, pfn)
}

/// Double map → AlreadyMapped, unmap of unmapped → NotMapped; a refused
/// call changes nothing (the part it could have done is not done).
fn errors_mapped_unmapped<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 2)?;
    let va = TEST_AREA + 9 * MIB2 + 8 * PAGE;
    map(cx, va, pfn, 1, P | RW | NX)?;
    let free1 = cx.space.allocator().free_count();
    expect_error(
        "map over a mapped page",
        cx.space.map(va, Pfn(pfn.0 + 1), PAGE, P | RW | NX),
        Error::AlreadyMapped { va },
    )?;
    expect_error(
        "map of a range ending on a mapped page",
        cx.space.map(va - PAGE, pfn, 2 * PAGE, P | RW | NX),
        Error::AlreadyMapped { va },
    )?;
    expect_error(
        "page before the refused range",
        cx.space.lookup(va - PAGE),
        Error::NotMapped { va: va - PAGE },
    )?;
    check_eq(
        "frame still mapped",
        cx.space.lookup(va).map_err(failed("translate"))?.pfn.0,
        pfn.0,
    )?;
    expect_error(
        "unmap of an unmapped page",
        cx.space.unmap(va + PAGE, PAGE),
        Error::NotMapped { va: va + PAGE },
    )?;
    expect_error(
        "unmap of a range with a hole",
        cx.space.unmap(va, 2 * PAGE),
        Error::NotMapped { va: va + PAGE },
    )?;
    expect_error(
        "unmap in an empty table",
        cx.space.unmap(va + 100 * MIB2, PAGE),
        Error::NotMapped {
            va: va + 100 * MIB2,
        },
    )?;
    expect_error(
        "protect of an unmapped page",
        cx.space.protect(va + PAGE, PAGE, P | NX, false),
        Error::NotMapped { va: va + PAGE },
    )?;
    read("page still readable", va)?;
    check_eq(
        "free frames after refused calls",
        cx.space.allocator().free_count(),
        free1,
    )?;
    unmap(cx, va, 1)?;
    give(cx, pfn)
}

/// Non-canonical, Xen's hole (PV), misaligned, overflowing, W+X, flags the
/// backend refuses, large pages under PV: each a typed error, nothing
/// mapped, no frame taken.
fn errors_addresses_flags<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 1)?;
    let va = TEST_AREA + 11 * MIB2;
    let free0 = cx.space.allocator().free_count();
    let rw = P | RW | NX;
    let s = &mut cx.space;
    expect_error(
        "non-canonical address",
        s.map(0x0000_8000_0000_0000, pfn, PAGE, rw),
        Error::NonCanonical {
            va: 0x0000_8000_0000_0000,
        },
    )?;
    expect_error(
        "range into the non-canonical hole",
        s.map(0x0000_7fff_ffff_f000, pfn, 2 * PAGE, rw),
        Error::NonCanonical {
            va: 0x0000_8000_0000_0fff,
        },
    )?;
    expect_error(
        "translate of a non-canonical address",
        s.lookup(0x1234_0000_0000_0000),
        Error::NonCanonical {
            va: 0x1234_0000_0000_0000,
        },
    )?;
    expect_error(
        "misaligned address",
        s.map(va + 8, pfn, PAGE, rw),
        Error::Misaligned,
    )?;
    expect_error(
        "misaligned length",
        s.map(va, pfn, 100, rw),
        Error::Misaligned,
    )?;
    expect_error("misaligned unmap", s.unmap(va + 1, PAGE), Error::Misaligned)?;
    expect_error(
        "range past the top of memory",
        s.map(0xffff_ffff_ffff_f000, pfn, 2 * PAGE, rw),
        Error::RangeOverflow,
    )?;
    expect_error(
        "frame number overflows",
        s.map(va, Pfn(u64::MAX / 2), PAGE, rw),
        Error::RangeOverflow,
    )?;
    expect_error(
        "W+X without consent",
        s.map(va, pfn, PAGE, P | RW),
        Error::WriteExecute,
    )?;
    expect_error(
        "protect to W+X without consent",
        s.protect(va, PAGE, P | RW, false),
        Error::WriteExecute,
    )?;
    if cx.pv {
        let hole = 0xffff_8000_0000_0000 + 0x1000;
        expect_error(
            "map in Xen's hole",
            s.map(hole, pfn, PAGE, rw),
            Error::XenHole,
        )?;
        expect_error("unmap in Xen's hole", s.unmap(hole, PAGE), Error::XenHole)?;
        expect_error(
            "map from inside Xen's hole to past it",
            s.map(0xffff_87ff_ffff_f000, pfn, 2 * PAGE, rw),
            Error::XenHole,
        )?;
        expect_error(
            "2 MiB page under PV",
            s.map_sized(va, Pfn(0), MIB2, rw, Granule::Size2MiB, false),
            Error::LargePagesUnavailable,
        )?;
        expect_error(
            "GLOBAL under PV",
            s.map(va, pfn, PAGE, rw | Flags::GLOBAL),
            Error::Flags(FlagError::Global),
        )?;
        expect_error(
            "PCD under PV",
            s.map(va, pfn, PAGE, rw | Flags::NO_CACHE),
            Error::Flags(FlagError::CacheAttributes),
        )?;
    } else {
        expect_error(
            "2 MiB page on a misaligned frame",
            s.map_sized(va, Pfn(pfn.0 | 1), MIB2, rw, Granule::Size2MiB, false),
            Error::Misaligned,
        )?;
        expect_error(
            "2 MiB page at a misaligned address",
            s.map_sized(va + PAGE, Pfn(0), MIB2, rw, Granule::Size2MiB, false),
            Error::Misaligned,
        )?;
    }
    expect_error(
        "not present",
        s.map(va, pfn, PAGE, RW | NX),
        Error::Flags(FlagError::NotPresent),
    )?;
    expect_error("nothing mapped", s.lookup(va), Error::NotMapped { va })?;
    check(!slot_in_use(cx), "a refused call left tables")?;
    check_eq(
        "free frames after refused calls",
        cx.space.allocator().free_count(),
        free0,
    )?;
    give(cx, pfn)
}

/// PV: mapping a page-table frame writable is refused with Xen's EBUSY as
/// the typed error — the live root and an L1 of the direct map, into an
/// existing L1 and inside a new subtree — and leaves nothing behind; the
/// root mapped read-only is fine and reads like the root.
fn refuses_writable_table<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let root = cx.space.root();
    let root_mfn = cx
        .space
        .backend()
        .to_mfn(root)
        .ok_or(Failure::Check("root has no mfn"))?;
    let va = TEST_AREA + 13 * MIB2;
    let free0 = cx.space.allocator().free_count();
    // A new subtree: Xen validates it when it is hooked.
    match cx.space.map(va, root, PAGE, P | RW | NX) {
        Err(Error::WritablePageTable { error, .. }) => {
            check(error == XenError::Busy, "new subtree: refusal not EBUSY")?
        }
        other => {
            log::error!("root mapped writable in a new subtree: {other:?}");
            return Err(Failure::Check("root mapped writable in a new subtree"));
        }
    }
    check(!slot_in_use(cx), "refused subtree left in the tree")?;
    check_eq(
        "free frames after the refusal",
        cx.space.allocator().free_count(),
        free0,
    )?;

    // Into a live L1.
    let pfn = take(cx, 1)?;
    map(cx, va, pfn, 1, P | RW | NX)?;
    expect_error(
        "root mapped writable in a live L1",
        cx.space.map(va + PAGE, root, PAGE, P | RW | NX),
        Error::WritablePageTable {
            mfn: root_mfn,
            error: XenError::Busy,
        },
    )?;
    let dm_l1 = tables_of(&cx.space, DirectMem::va(pfn))[2]
        .ok_or(Failure::Check("direct map has no L1 here"))?;
    let dm_l1_mfn = cx
        .space
        .backend()
        .to_mfn(dm_l1)
        .ok_or(Failure::Check("L1 has no mfn"))?;
    expect_error(
        "direct-map L1 mapped writable",
        cx.space.map(va + 2 * PAGE, dm_l1, PAGE, P | RW | NX),
        Error::WritablePageTable {
            mfn: dm_l1_mfn,
            error: XenError::Busy,
        },
    )?;
    expect_error(
        "refused page not mapped",
        cx.space.lookup(va + PAGE),
        Error::NotMapped { va: va + PAGE },
    )?;
    // Read-only is allowed, and shows the root's entries.
    map(cx, va + PAGE, root, 1, P | NX)?;
    let slot = (DIRECT_MAP_BASE >> 39) & 511;
    let via_alias = read("root through a RO alias", va + PAGE + slot * 8)?;
    let e = cx.space.backend().read(root, slot as usize);
    check_eq("direct-map slot of the root", via_alias, e.0)?;
    unmap(cx, va, 2)?;
    give(cx, pfn)
}

/// PV: while a table lives, every kernel alias of its frame (direct map,
/// boot region) is read-only and a store into an L2/L3 faults; once freed,
/// the aliases are writable again.
fn tables_read_only_aliases<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 1)?;
    let va = TEST_AREA + 15 * MIB2;
    map(cx, va, pfn, 1, P | RW | NX)?;
    let tables = tables_of(&cx.space, va);
    let mut seen = 0;
    for (depth, table) in tables.iter().enumerate() {
        let t = table.ok_or(Failure::Check("missing table on the way"))?;
        for alias in [DirectMem::va(t), crate::boot::KERNEL_VMA + t.0 * PAGE] {
            let Ok(tr) = cx.space.lookup(alias) else {
                continue;
            };
            if tr.pfn != t {
                continue;
            }
            seen += 1;
            check(!tr.flags.contains(RW), "live table aliased writable")?;
        }
        // L3 and L2 (Xen emulates stores into L1s; see dm_tests).
        if depth < 2 {
            let at = DirectMem::va(t) + 8 * 100;
            let word = read("table word", at)?;
            // SAFETY: the store, if it went through, would write the word
            // already there (entry 100 of a table this test created).
            let r = unsafe { probe_write(at, word) };
            expect_page_fault("store into a live table", r, at, true, true)?;
        }
    }
    check(seen >= 3, "no alias of the new tables found")?;
    unmap(cx, va, 1)?;
    for t in tables.iter().flatten() {
        let tr = cx
            .space
            .lookup(DirectMem::va(*t))
            .map_err(failed("translate of a freed table"))?;
        check(tr.flags.contains(RW), "freed table still read-only")?;
    }
    give(cx, pfn)
}

/// A lazy batch of 512 one-page maps reaches Xen in a handful of
/// hypercalls (one per 512 queued entries), and so does the unmap of 448
/// pages one by one, where 64 unmaps outside a batch cost at least one
/// hypercall each; natively no hypercall at all. Queued entries are seen by
/// translate before the flush.
fn lazy_batch_hypercalls<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let n = 512u64;
    let pfn = take(cx, n)?;
    let va = TEST_AREA + 20 * MIB2;
    let s0 = cx.space.backend().counters();
    let mut batch = cx.space.lazy();
    for k in 0..n {
        batch
            .map(va + k * PAGE, Pfn(pfn.0 + k), PAGE, P | RW | NX)
            .map_err(failed("map in a batch"))?
            .ignore(); // x86 caches no not-present entry: nothing to flush
    }
    let seen = batch
        .lookup(va + (n - 1) * PAGE)
        .map_err(failed("translate in a batch"));
    let pending = batch.backend().pending();
    batch.finish().map_err(failed("end of the batch"))?;
    let s1 = cx.space.backend().counters();
    check_eq("frame seen inside the batch", seen?.pfn.0, pfn.0 + n - 1)?;
    let (calls, entries) = (
        s1.hypercalls - s0.hypercalls,
        s1.mmu_update_entries - s0.mmu_update_entries,
    );
    log::info!("lazy map of {n} pages: {calls} hypercalls, {entries} mmu_update entries");
    if cx.pv {
        check(pending > 0, "nothing queued inside the batch")?;
        // 512 leaves + 3 tables (sealing up to 2 aliases each, 1 hook).
        check(calls <= 3, "lazy map: more than 3 hypercalls")?;
        check(
            (n..=n + 7).contains(&entries),
            "lazy map: mmu_update entries out of range",
        )?;
    } else {
        check_eq("native hypercalls", calls, 0)?;
    }
    for k in [0, 1, 255, 511] {
        let frame = Pfn(pfn.0 + k);
        let value = pattern(frame, k, 4);
        // SAFETY: the page maps a frame of the borrowed run.
        unsafe { write("write after the batch", va + k * PAGE, value) }?;
        check_eq("read back", read("read", DirectMem::va(frame))?, value)?;
    }

    // Outside a batch: every call drains.
    let u = 64;
    let s2 = cx.space.backend().counters();
    for k in 0..u {
        let f = cx
            .space
            .unmap(va + k * PAGE, PAGE)
            .map_err(failed("unmap"))?;
        cx.space.flush(f).map_err(failed("flush"))?;
    }
    let s3 = cx.space.backend().counters();
    let unbatched = s3.hypercalls - s2.hypercalls;
    let mut flush = Flush::none();
    let mut batch = cx.space.lazy();
    for k in u..n {
        let f = batch
            .unmap(va + k * PAGE, PAGE)
            .map_err(failed("unmap in a batch"))?;
        flush = flush.merge(f);
    }
    batch.finish().map_err(failed("end of the unmap batch"))?;
    cx.space
        .flush(flush)
        .map_err(failed("flush after the batch"))?;
    let s4 = cx.space.backend().counters();
    let batched = s4.hypercalls - s3.hypercalls;
    log::info!(
        "unmap one page at a time: {u} pages {unbatched} hypercalls unbatched, {} pages {batched} in a batch",
        n - u
    );
    if cx.pv {
        check(
            unbatched >= u,
            "unbatched unmaps: fewer hypercalls than calls",
        )?;
        check(batched <= 4, "batched unmaps: more than 4 hypercalls")?;
    } else {
        check_eq("native hypercalls (unmap)", unbatched + batched, 0)?;
    }
    check(!slot_in_use(cx), "tables left after the batch")?;
    give(cx, pfn)
}

/// Natively: a 2 MiB page over an aligned run of free frames (written
/// through, read through the direct map), or read-only over aligned RAM;
/// partial unmap/protect refused; 1 GiB likewise where RAM allows.
fn large_pages<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let va = TEST_AREA + 64 * MIB2;
    let run = cx.space.allocator_mut().take_run(512, 512);
    let (pfn, flags) = match run {
        Some(p) => (p, P | RW | NX),
        None => {
            let ram = cx.mem.ram().iter().find_map(|r| {
                let s = r.start.0.next_multiple_of(512);
                (s + 512 <= r.end.0).then_some(Pfn(s))
            });
            log::info!("no aligned run of free frames: read-only 2 MiB page over RAM");
            (ram.ok_or(Failure::Check("no 2 MiB-aligned RAM"))?, P | NX)
        }
    };
    let f = cx
        .space
        .map_sized(va, pfn, MIB2, flags, Granule::Size2MiB, false)
        .map_err(failed("2 MiB map"))?;
    cx.space.flush(f).map_err(failed("flush"))?;
    for k in [0u64, 1, 300, 511] {
        let at = va + k * PAGE + 0x18;
        let t = cx.space.lookup(at).map_err(failed("translate"))?;
        check(t.granule == Granule::Size2MiB, "not a 2 MiB page")?;
        check_eq("frame inside the 2 MiB page", t.pfn.0, pfn.0 + k)?;
        let direct = DirectMem::va(t.pfn) + 0x18;
        if run.is_some() {
            let value = pattern(t.pfn, k, 5);
            // SAFETY: the 2 MiB page maps the borrowed aligned run.
            unsafe { write("write through the 2 MiB page", at, value) }?;
        }
        check_eq(
            "same word both ways",
            read("read", at)?,
            read("read", direct)?,
        )?;
    }
    expect_error(
        "unmap of part of a 2 MiB page",
        cx.space.unmap(va + PAGE, PAGE),
        Error::SplitsLargePage { va },
    )?;
    expect_error(
        "protect of part of a 2 MiB page",
        cx.space.protect(va, PAGE, P | NX, false),
        Error::SplitsLargePage { va },
    )?;
    let f = cx.space.unmap(va, MIB2).map_err(failed("2 MiB unmap"))?;
    cx.space.flush(f).map_err(failed("flush"))?;
    expect_error(
        "translate after unmap",
        cx.space.lookup(va),
        Error::NotMapped { va },
    )?;
    if run.is_some() {
        give(cx, pfn)?;
    }

    // 1 GiB, read-only over an aligned GiB of RAM, where there is one.
    let gib = 1u64 << 18;
    let ram = cx.mem.ram().iter().find_map(|r| {
        let s = r.start.0.next_multiple_of(gib);
        (s + gib <= r.end.0).then_some(Pfn(s))
    });
    match (crate::platform::has_1g_pages(), ram) {
        (true, Some(g)) => {
            let va = TEST_AREA + (1 << 30);
            let f = cx
                .space
                .map_sized(va, g, 1 << 30, P | NX, Granule::Size1GiB, false)
                .map_err(failed("1 GiB map"))?;
            cx.space.flush(f).map_err(failed("flush"))?;
            for k in [0u64, 12345, gib - 1] {
                let t = cx
                    .space
                    .lookup(va + k * PAGE)
                    .map_err(failed("translate"))?;
                check(t.granule == Granule::Size1GiB, "not a 1 GiB page")?;
                check_eq("frame inside the 1 GiB page", t.pfn.0, g.0 + k)?;
                check_eq(
                    "same word both ways (1 GiB)",
                    read("read", va + k * PAGE)?,
                    read("read", DirectMem::va(t.pfn))?,
                )?;
            }
            let f = cx.space.unmap(va, 1 << 30).map_err(failed("1 GiB unmap"))?;
            cx.space.flush(f).map_err(failed("flush"))?;
        }
        (has, _) => log::info!(
            "1 GiB part not run: 1 GiB pages {has}, aligned GiB of RAM {}",
            ram.is_some()
        ),
    }
    Ok(())
}

/// The `x86_64` crate's traits on pvmmu's address space: `map_to` with the
/// crate's frame allocator, `translate`, `update_flags`, `unmap`, and the
/// crate's error values.
fn x86_64_traits<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let data = take(cx, 1)?;
    let mut pool = X86Pool {
        frames: [Pfn(0); 4],
        len: 0,
    };
    while pool.len < 3 {
        pool.frames[pool.len] = cx
            .space
            .allocator_mut()
            .allocate()
            .ok_or(Failure::Check("no frame for the pool"))?;
        pool.len += 1;
    }
    let va = TEST_AREA + 30 * MIB2;
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va));
    let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(data.addr()));
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    // SAFETY: `frame` is a borrowed data frame; mapping it at the test area
    // aliases nothing the kernel uses.
    let mapped = unsafe { cx.space.map_to(page, frame, flags, &mut pool) };
    let result = (|| {
        let flush = mapped.map_err(|e| {
            log::error!("map_to: {e:?}");
            Failure::Check("map_to")
        })?;
        cx.space.backend_mut().flush_x86(flush, va)?;
        check_eq("tables taken from the x86_64 allocator", pool.len as u64, 0)?;
        check(
            cx.space.translate_addr(VirtAddr::new(va + 0x40))
                == Some(PhysAddr::new(data.addr() + 0x40)),
            "translate_addr",
        )?;
        match cx.space.translate(VirtAddr::new(va + 0x40)) {
            TranslateResult::Mapped {
                frame: MappedFrame::Size4KiB(f),
                offset,
                flags: got,
            } => {
                check(f == frame, "translate: frame")?;
                check_eq("translate: offset", offset, 0x40)?;
                check(got.contains(flags), "translate: flags")?;
            }
            other => {
                log::error!("translate: {other:?}");
                return Err(Failure::Check("translate: not a 4 KiB mapping"));
            }
        }
        let value = pattern(data, 6, 6);
        // SAFETY: the page maps the borrowed data frame.
        unsafe { write("write through map_to's page", va + 0x40, value) }?;
        check_eq(
            "read back",
            read("read", DirectMem::va(data) + 0x40)?,
            value,
        )?;
        // SAFETY: read-only is stricter than before; nothing relies on
        // writing this page.
        let f = unsafe {
            Mapper::<Size4KiB>::update_flags(
                &mut cx.space,
                page,
                PageTableFlags::PRESENT | PageTableFlags::NO_EXECUTE,
            )
        }
        .map_err(|_| Failure::Check("update_flags"))?;
        cx.space.backend_mut().flush_x86(f, va)?;
        // SAFETY: expected to fault (read-only); else it writes our frame.
        let r = unsafe { probe_write(va + 0x40, !value) };
        expect_page_fault("store after update_flags", r, va + 0x40, true, true)?;
        // SAFETY: the page is mapped already: the call must refuse and
        // change nothing.
        match unsafe { cx.space.map_to(page, frame, flags, &mut pool) } {
            Err(MapToError::PageAlreadyMapped(f)) => check(f == frame, "already mapped: frame")?,
            other => {
                log::error!("map_to twice: {other:?}");
                return Err(Failure::Check("map_to twice"));
            }
        }
        let (f, flush) =
            Mapper::<Size4KiB>::unmap(&mut cx.space, page).map_err(|_| Failure::Check("unmap"))?;
        cx.space.backend_mut().flush_x86(flush, va)?;
        check(f == frame, "unmap returned another frame")?;
        check(
            matches!(
                cx.space.translate_page(page),
                Err(TranslateError::PageNotMapped)
            ),
            "translate_page after unmap",
        )?;
        check(
            matches!(
                Mapper::<Size4KiB>::unmap(&mut cx.space, page),
                Err(UnmapError::PageNotMapped)
            ),
            "unmap twice",
        )?;
        // The direct map through the trait, whatever its page size.
        let dva = DirectMem::va(data) + 0x40;
        check(
            cx.space.translate_addr(VirtAddr::new(dva)) == Some(PhysAddr::new(data.addr() + 0x40)),
            "translate_addr of the direct map",
        )
    })();
    while pool.len > 0 {
        pool.len -= 1;
        cx.space.allocator_mut().free(pool.frames[pool.len]);
    }
    result?;
    give(cx, data)
}
