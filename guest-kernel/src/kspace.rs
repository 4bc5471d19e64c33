//! The running kernel's own dynamic mappings, made through pvmmu on the live
//! tree: thread stacks (each with an unmapped guard page below it) and a
//! small fixmap (the Xen shared-info page under PV, the local APIC's
//! registers natively).
//!
//! Everything lives in L4 slot [`KSPACE_SLOT`] (clear of the direct map, the
//! self-tests' area, the kernel image and Xen's hole). One pvmmu
//! `AddressSpace` over the live root edits it, behind a lock taken with
//! interrupts off. Its frames come from a pool carved out of the boot frame
//! allocator when the running kernel starts ([`init`]): stack pages and the
//! page tables of this slot are taken from it and given back to it, so
//! running out is a typed error ([`KspaceError::OutOfFrames`]) and a leak
//! shows as a pool count that does not come back.
//!
//! The same space is the kernel's change_page_attr ([`change_page_attr`]):
//! attribute changes over the direct map, with the same cross-CPU flush;
//! natively most of them take no lock (pvmmu's lockless CPA path over the
//! direct map and the image, whose tables are never freed), splits and
//! loosening changes take this lock as the split lock.
//!
//! Invariant: every stack slot is `[guard page][stack pages]`, and the guard
//! page of a slot is never mapped; fixmap pages are mapped once at init and
//! never unmapped.

use core::sync::atomic::{AtomicU64, Ordering};

use hypercall::MmuHypercalls;
use pvmmu::backend::cache::CACHE_SELECT;
use pvmmu::backend::{CacheEncoding, CacheMode, FlushTargets, LargePages, Native, XenPv};
use pvmmu::cpus::ActiveCpus;
use pvmmu::entry::Flags;
use pvmmu::lazy_task::BatchOwner;
use pvmmu::space::{CpaFast, Protected, SlowPath, StaticProtection};
use pvmmu::{AddressSpace, Backend, Error, Flush, FrameAllocator, Mfn, Pfn, Translation};

use crate::directmap::{DirectMem, KernelAliases, DIRECT_MAP_BASE};
use crate::frames::Frames;
use crate::shootdown::ShootdownTlb;
use crate::xen_pv::PvBoot;
use crate::Kernel;

/// The CPUs this address space is active on: every CPU, from before it
/// loads the kernel root (the boot CPU at [`init`], each other CPU before
/// [`crate::smp`] starts it), since the kernel root is never switched away
/// from. Under PV the flushes are `MMUEXT_*_MULTI` with this mask, which Xen
/// reads after the updates before it; natively only these CPUs (those of
/// them online) get the shootdown IPI. See `pvmmu::cpus` for the ordering.
pub static ACTIVE: ActiveCpus = ActiveCpus::new();

/// L4 slot of the kernel's dynamic area.
pub const KSPACE_SLOT: usize = 403;
/// First address of the stack area (the start of [`KSPACE_SLOT`]).
pub const STACK_AREA: u64 = 0xffff_0000_0000_0000 | ((KSPACE_SLOT as u64) << 39);
/// Bytes of address space per stack slot (guard page included).
pub const STACK_SLOT_BYTES: u64 = 64 << 10;
/// Stack slots.
pub const MAX_STACKS: usize = 128;
/// Most pages a stack may have (the rest of its slot).
pub const MAX_STACK_PAGES: usize = (STACK_SLOT_BYTES / 4096) as usize - 1;
/// First address of the fixmap (1 GiB above the stack area).
pub const FIXMAP_AREA: u64 = STACK_AREA + (1 << 30);
/// Frames in the pool.
pub const POOL_FRAMES: usize = 1024;

/// Fixed mappings, one page each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixmap {
    /// Xen's shared-info page (PV).
    SharedInfo = 0,
    /// The local APIC's MMIO page (native xAPIC).
    LocalApic = 1,
    /// The page the cross-CPU stale-translation test maps and unmaps.
    TlbProbe = 2,
    /// First of [`PHYS_WINDOW_PAGES`] pages for reading firmware tables.
    PhysWindow = 16,
}

/// Pages of the window [`with_phys`] maps.
pub const PHYS_WINDOW_PAGES: u64 = 16;

impl Fixmap {
    /// Virtual address of the page.
    pub const fn va(self) -> u64 {
        FIXMAP_AREA + (self as u64) * 4096
    }
}

/// Why a kernel mapping could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KspaceError {
    /// [`init`] has not run.
    NotReady,
    /// The pool has too few frames for the request.
    OutOfFrames,
    /// Every stack slot is in use.
    NoStackSlot,
    /// A stack of more than [`MAX_STACK_PAGES`] pages (or none).
    BadStackSize(usize),
    /// A physical window of 0 bytes or more than [`PHYS_WINDOW_PAGES`].
    BadLength(usize),
    /// pvmmu refused the change.
    Map(Error),
    /// Xen refused a direct `update_va_mapping` (fixmap of a foreign frame).
    Xen(hypercall::XenError),
    /// The boot allocator could not give the pool its frames.
    PoolFill,
    /// A caching change would leave another mapping of a page's frame
    /// with the old memory type (one the change does not carry: Xen 4.17
    /// would accept the mix, the architecture does not want it): refused
    /// before anything is written. `va` is the page of the range, `alias`
    /// the other mapping (0: the kernel cannot name the page's frame, so
    /// its direct-map alias cannot follow).
    CacheAlias {
        /// The page of the range.
        va: u64,
        /// The mapping that would disagree.
        alias: u64,
    },
}

impl From<Error> for KspaceError {
    fn from(e: Error) -> Self {
        match e {
            Error::OutOfFrames => KspaceError::OutOfFrames,
            e => KspaceError::Map(e),
        }
    }
}

/// The frames of the running kernel's mappings: a LIFO pool.
pub struct Pool {
    frames: [Pfn; POOL_FRAMES],
    len: usize,
    /// Frames handed out and not yet returned.
    out: usize,
}

impl Pool {
    const fn new() -> Self {
        Pool {
            frames: [Pfn(0); POOL_FRAMES],
            len: 0,
            out: 0,
        }
    }

    /// Free frames in the pool.
    pub fn free_count(&self) -> usize {
        self.len
    }

    fn take(&mut self) -> Option<Pfn> {
        self.len = self.len.checked_sub(1)?;
        self.out += 1;
        Some(self.frames[self.len])
    }

    fn give(&mut self, pfn: Pfn) {
        if self.len == POOL_FRAMES {
            log::error!("kspace pool overflow: {pfn:?} dropped");
            return;
        }
        self.frames[self.len] = pfn;
        self.len += 1;
        self.out = self.out.saturating_sub(1);
    }
}

impl FrameAllocator for Pool {
    fn allocate(&mut self) -> Option<Pfn> {
        self.take()
    }
    fn free(&mut self, pfn: Pfn) {
        self.give(pfn)
    }
}

type PvSpace = AddressSpace<XenPv<hypercall::Xen, DirectMem, PvBoot, KernelAliases>, Pool>;
type NativeSpace = AddressSpace<Native<DirectMem, ShootdownTlb>, Pool>;

/// The live tree as the running kernel edits it. It lives once, in a
/// static (no heap to box the larger variant into).
#[allow(clippy::large_enum_variant)]
enum Space {
    Pv(PvSpace),
    Native(NativeSpace),
}

/// Dispatches one expression over both backends.
macro_rules! on_space {
    ($space:expr, $s:ident => $body:expr) => {
        match $space {
            Space::Pv($s) => $body,
            Space::Native($s) => $body,
        }
    };
}

struct Kspace {
    space: Space,
    /// Which stack slots are in use.
    stacks: [bool; MAX_STACKS],
    /// The thread whose lazy batch is open in `space` and the TLB flushes
    /// it owes (see [`crate::lazy`]).
    batch: BatchOwner,
}

/// Every kernel mapping of a frame (direct map, image), for the caching
/// changes' alias check (set by [`init`]; a static, not in [`Kspace`]:
/// the boot stack holds one `Kspace` being built, with no room to spare).
static ALIASES: spin::Once<KernelAliases> = spin::Once::new();

static KSPACE: spin::Mutex<Option<Kspace>> = spin::Mutex::new(None);

/// Runs `f` under the lock, with preemption off but interrupts on: a
/// change here may wait for other CPUs to acknowledge a TLB shootdown,
/// and a CPU spinning for this lock must still answer one.
fn with<T>(f: impl FnOnce(&mut Kspace) -> Result<T, KspaceError>) -> Result<T, KspaceError> {
    let _p = crate::sched::preempt_disable();
    let mut guard = KSPACE.lock();
    let ks = guard.as_mut().ok_or(KspaceError::NotReady)?;
    // A lazy batch left open by a thread goes out before anyone else's
    // change (crate::lazy: no update overtakes a queued one).
    ks.close_lazy()?;
    f(ks)
}

/// Moves [`POOL_FRAMES`] frames from the boot allocator into the pool and
/// opens the address space over the live tree.
pub fn init(kernel: &mut Kernel) -> Result<(), KspaceError> {
    ACTIVE.activate(crate::percpu::cpu_id());
    let dm = kernel.direct_map.clone().ok_or(KspaceError::NotReady)?;
    let mut pool = Pool::new();
    fill_pool(&mut pool, &mut kernel.frames)?;
    let space = match kernel.pv.clone() {
        Some(pv) => {
            let root_mfn = pv.pfn_to_mfn(dm.root.0).map(Mfn);
            // SAFETY: `kernel.pv` is set only on the Xen PV entry path.
            let xen = unsafe { hypercall::Xen::new() };
            // Every flush reaches the vCPUs the tree is live on: all of
            // those started, each in ACTIVE before it loaded the root.
            let backend = XenPv::new(xen, dm.mem, pv, dm.aliases, root_mfn)
                .with_flush_targets(FlushTargets::Active(&ACTIVE));
            // SAFETY: `dm.root` is the live, pinned L4 the bootstrap built;
            // this space edits only slot KSPACE_SLOT, whose tables come from
            // and go back to its own pool.
            Space::Pv(unsafe { AddressSpace::from_root(backend, pool, dm.root, true) })
        }
        None => {
            // Ring 0 with paging on; `dm.root` is in CR3 of every CPU.
            // Large pages as the direct map has them: CPA splits them.
            let large = if crate::platform::has_1g_pages() {
                LargePages::Size1GiB
            } else {
                LargePages::Size2MiB
            };
            let backend = Native::with_tlb(dm.mem, ShootdownTlb).with_large_pages(large);
            // SAFETY: as above: the live root; only this slot is mapped and
            // unmapped, and elsewhere only CPA changes leaf attributes.
            Space::Native(unsafe { AddressSpace::from_root(backend, pool, dm.root, false) })
        }
    };
    let _p = crate::sched::preempt_disable();
    *KSPACE.lock() = Some(Kspace {
        space,
        stacks: [false; MAX_STACKS],
        batch: BatchOwner::new(),
    });
    drop(_p);
    remember_aliases(kernel);
    enable_caching(kernel)
}

/// Keeps the kernel's alias map for the caching changes' check (not in
/// [`init`]'s frame, for the same reason as [`enable_caching`]).
#[inline(never)]
fn remember_aliases(kernel: &Kernel) {
    if let Some(dm) = &kernel.direct_map {
        ALIASES.call_once(|| dm.aliases);
    }
}

/// Under Xen PV with I/O privilege (dom0): caching changes go through Xen,
/// encoded for the PAT Xen runs the guest with (read, as Xen emulates
/// `rdmsr IA32_PAT` for a PV kernel). Set on the backend in place, after
/// [`init`] stored the space: the backend holds its 16 KiB request queue,
/// and the boot stack has no room for another copy of it in `init`'s frame.
#[inline(never)]
fn enable_caching(kernel: &Kernel) -> Result<(), KspaceError> {
    if !kernel.pv.as_ref().is_some_and(|pv| pv.is_privileged()) {
        return Ok(());
    }
    let pat = crate::platform::read_pat();
    with(|ks| {
        if let Space::Pv(s) = &mut ks.space {
            s.backend_mut().set_caching(true, pat);
        }
        Ok(())
    })
}

/// Registers CPA's static protections of the kernel (see
/// [`static_protections`]) on the live tree, after making the direct map's
/// alias of text and rodata read-only (the bootstrap maps all RAM
/// writable there). Not inlined into [`init`]: the boot stack holds one
/// frame of that size, not two.
#[inline(never)]
pub fn protect_kernel(kernel: &Kernel) -> Result<(), KspaceError> {
    let protections = static_protections(kernel);
    with(|ks| {
        for p in protections.iter().flatten() {
            on_space!(&mut ks.space, s => {
                if p.region != Protected::HypervisorShared {
                    let len = (p.end.0 - p.first.0) * 4096;
                    s.change_page_attr_set_clr(DirectMem::va(p.first), len, Flags::empty(), Flags::WRITABLE)?;
                }
                s.cpa_protect(*p)?;
            });
        }
        // Natively: the lockless CPA path over the direct map and the
        // image, whose tables are never freed (pvmmu refuses an unmap
        // there from now on).
        if let Space::Native(s) = &mut ks.space {
            s.cpa_stable(DIRECT_MAP_BASE, DIRECT_MAP_BASE + (1 << 39))?;
            s.cpa_stable(crate::boot::KERNEL_VMA, u64::MAX)?;
            let mem = *s.backend().mem();
            let large = s.backend().large_pages();
            // SAFETY: the handle is used only with `Native` backends over
            // the direct map (`mem`), which reach this tree; the live tree
            // is never destroyed.
            let handle = unsafe { s.cpa_fast() };
            FAST.call_once(|| FastCpa { handle, mem, large });
        }
        Ok(())
    })
}

/// What the lockless CPA path needs (natively, once the static
/// protections are registered): the handle and how to build a backend
/// over the live tree on the calling CPU.
struct FastCpa {
    handle: CpaFast,
    mem: DirectMem,
    large: LargePages,
}

static FAST: spin::Once<FastCpa> = spin::Once::new();

/// CPA calls that completed on the lockless path (no kspace lock).
static CPA_FAST: AtomicU64 = AtomicU64::new(0);
/// The lockless path's share of [`cpa_stats`]: refusals, page-by-page and
/// full TLB flushes, range and whole cache flushes.
static FAST_STATS: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];

/// Counts a lockless call's flushes (or its refusal) in [`FAST_STATS`].
fn count_fast(done: Option<&pvmmu::space::CpaDone>) {
    use pvmmu::backend::TlbScope;
    let Some(done) = done else {
        FAST_STATS[0].fetch_add(1, Ordering::Relaxed);
        return;
    };
    CPA_FAST.fetch_add(1, Ordering::Relaxed);
    let kinds = [(done.flush, 1), (done.cache, 3)];
    for (scope, first) in kinds {
        match scope {
            Some(TlbScope::Range { .. }) => FAST_STATS[first].fetch_add(1, Ordering::Relaxed),
            Some(TlbScope::All) => FAST_STATS[first + 1].fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
    }
}
/// CPA calls whose lockless check found a large page to split, and whose
/// locked re-check then found (some of) those splits done by another CPU.
static CPA_SPLIT_RACES: AtomicU64 = AtomicU64::new(0);

/// Counters of the lockless CPA path: calls done without the lock, and
/// splits found done by another CPU at the locked re-check.
pub fn cpa_fast_counts() -> (u64, u64) {
    (
        CPA_FAST.load(Ordering::Relaxed),
        CPA_SPLIT_RACES.load(Ordering::Relaxed),
    )
}

/// The lockless attempt: `Ok(result)` when it decided the call (done, or
/// refused as the locked path would refuse it), `Err(splits)` when the
/// locked path must take it (`splits`: the large pages the lockless check
/// found to split, 0 for any other reason).
fn cpa_lockless(
    va: u64,
    len: u64,
    set: Flags,
    clear: Flags,
) -> Result<Result<pvmmu::space::CpaDone, KspaceError>, u32> {
    let Some(fast) = FAST.get() else {
        return Err(0);
    };
    // Preemption off (the shootdown runs on this CPU), interrupts on: the
    // other CPUs' shootdowns are answered while this one waits.
    let _p = crate::sched::preempt_disable();
    let mut backend = Native::with_tlb(fast.mem, ShootdownTlb).with_large_pages(fast.large);
    match fast
        .handle
        .change_page_attr_set_clr(&mut backend, va, len, set, clear)
    {
        Ok(done) => {
            count_fast(Some(&done));
            Ok(Ok(done))
        }
        Err(Error::SlowPath(SlowPath::Split { splits })) => Err(splits),
        Err(Error::SlowPath(_)) => Err(0),
        Err(e) => {
            count_fast(None);
            Ok(Err(e.into()))
        }
    }
}

/// What CPA must keep on the live tree: the kernel's text and read-only
/// data (every alias: the image and the direct map), and under PV the
/// pages Xen shares with the kernel (start_info, the domU's console ring).
/// Xen's own frames (shared info) are not the guest's: CPA refuses them
/// as foreign frames without an entry here.
fn static_protections(kernel: &Kernel) -> [Option<StaticProtection>; 4] {
    let frames = |r: crate::boot::VirtRange| {
        let (start, end) = r.to_phys();
        (Pfn(start >> 12), Pfn(end.div_ceil(4096)))
    };
    let region = |region, (first, end): (Pfn, Pfn)| Some(StaticProtection { region, first, end });
    let one = |pfn: u64| (Pfn(pfn), Pfn(pfn + 1));
    let mut out = [None; 4];
    out[0] = region(Protected::KernelText, frames(kernel.image.text));
    out[1] = region(Protected::KernelRodata, frames(kernel.image.rodata));
    if let Some(pv) = &kernel.pv {
        out[2] = PvBoot::va_to_pfn(pv.start_info_va)
            .and_then(|p| region(Protected::HypervisorShared, one(p)));
        if !pv.is_dom0() {
            out[3] = pv
                .console_pfn()
                .ok()
                .and_then(|p| region(Protected::HypervisorShared, one(p)));
        }
    }
    out
}

fn fill_pool(pool: &mut Pool, frames: &mut Frames) -> Result<(), KspaceError> {
    while pool.len < POOL_FRAMES {
        let pfn = frames.allocate_lowest().ok_or(KspaceError::PoolFill)?;
        pool.give(pfn);
        pool.out = 0;
    }
    Ok(())
}

/// Free frames left in the pool (`None` before [`init`]).
pub fn pool_free() -> Option<usize> {
    with(|ks| Ok(on_space!(&ks.space, s => s.allocator().free_count()))).ok()
}

/// A mapped thread stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stack {
    /// Slot index.
    pub slot: usize,
    /// The unmapped guard page.
    pub guard: u64,
    /// Lowest mapped address.
    pub bottom: u64,
    /// One past the highest mapped address (initial stack pointer).
    pub top: u64,
}

impl Stack {
    /// Whether `va` lies in this stack's guard page.
    pub fn guard_contains(&self, va: u64) -> bool {
        (self.guard..self.guard + 4096).contains(&va)
    }
}

/// Maps a stack of `pages` pages from the pool in a free slot, with the
/// slot's first page left unmapped as its guard.
pub fn alloc_stack(pages: usize) -> Result<Stack, KspaceError> {
    if pages == 0 || pages > MAX_STACK_PAGES {
        return Err(KspaceError::BadStackSize(pages));
    }
    with(|ks| {
        let slot = ks
            .stacks
            .iter()
            .position(|used| !used)
            .ok_or(KspaceError::NoStackSlot)?;
        let guard = STACK_AREA + slot as u64 * STACK_SLOT_BYTES;
        let bottom = guard + 4096;
        let flags = Flags::PRESENT | Flags::WRITABLE | Flags::NO_EXECUTE;
        let result = on_space!(&mut ks.space, s => map_stack(s, bottom, pages, flags));
        result?;
        ks.stacks[slot] = true;
        Ok(Stack {
            slot,
            guard,
            bottom,
            top: bottom + pages as u64 * 4096,
        })
    })
}

/// Maps `pages` pool frames at `bottom..`, undoing everything on failure.
fn map_stack<B: pvmmu::Backend>(
    s: &mut AddressSpace<B, Pool>,
    bottom: u64,
    pages: usize,
    flags: Flags,
) -> Result<(), KspaceError> {
    if s.allocator().free_count() < pages {
        return Err(KspaceError::OutOfFrames);
    }
    for i in 0..pages {
        let va = bottom + i as u64 * 4096;
        let Some(pfn) = s.allocator_mut().take() else {
            unmap_stack(s, bottom, i);
            return Err(KspaceError::OutOfFrames);
        };
        match s.map(va, pfn, 4096, flags) {
            Ok(flush) => s.flush(flush)?,
            Err(e) => {
                s.allocator_mut().give(pfn);
                unmap_stack(s, bottom, i);
                return Err(e.into());
            }
        }
    }
    Ok(())
}

/// Unmaps `pages` stack pages at `bottom` and returns their frames.
fn unmap_stack<B: pvmmu::Backend>(s: &mut AddressSpace<B, Pool>, bottom: u64, pages: usize) {
    for i in 0..pages {
        let va = bottom + i as u64 * 4096;
        let pfn = match s.lookup(va) {
            Ok(t) => t.pfn,
            Err(e) => {
                log::error!("stack page {va:#x} not mapped at free: {e:?}");
                continue;
            }
        };
        match s.unmap(va, 4096).and_then(|f| s.flush(f)) {
            Ok(()) => s.allocator_mut().give(pfn),
            Err(e) => log::error!("cannot unmap stack page {va:#x}: {e:?}"),
        }
    }
}

/// Unmaps a stack and gives its frames back.
///
/// The caller guarantees nothing runs on it any more.
pub fn free_stack(stack: Stack) -> Result<(), KspaceError> {
    with(|ks| {
        let pages = ((stack.top - stack.bottom) / 4096) as usize;
        on_space!(&mut ks.space, s => unmap_stack(s, stack.bottom, pages));
        ks.stacks[stack.slot] = false;
        Ok(())
    })
}

/// change_page_attr on the live tree (the direct map and this slot): sets
/// `set` and clears `clear` on every page of `len` bytes at `va`, splitting
/// large pages natively, with one TLB decision that reaches every CPU (the
/// shootdown natively, Xen's all-vCPU flush under PV). Tables made by
/// splits come from the pool and stay in the tree (never reassembled).
///
/// Natively the call first tries pvmmu's lockless path (no lock: the
/// direct map or image, no split, nothing loosened, no alias to carry,
/// no caching change: its alias check runs under the lock); otherwise it takes
/// the lock (the split lock), where the locked check pass re-checks: a
/// split the lockless check counted and another CPU made meanwhile is
/// counted as a split race ([`cpa_fast_counts`]). Under PV every call
/// takes the lock (no compare-and-exchange of live entries).
///
/// Aliases: the kernel image's `.data`/`.bss` frames are mapped twice, at
/// their image address and in the direct map. A change of what must agree
/// across the two (writable or not, the caching bits) on a range wholly
/// inside one of them is applied to the other too, in the same locked
/// section: read-only data stays read-only through either address (text
/// and rodata are read-only in both by the static protections). NX and
/// presence stay per mapping (the direct map is never executable). If the
/// alias's change is refused, the first change is undone with the inverse
/// change and the alias's error returned.
pub fn change_page_attr(
    va: u64,
    len: u64,
    set: Flags,
    clear: Flags,
) -> Result<pvmmu::space::CpaDone, KspaceError> {
    let (alias_set, alias_clear) = (set & ALIAS_AGREE, clear & ALIAS_AGREE);
    let alias = if (alias_set | alias_clear).is_empty() {
        None
    } else {
        image_data_alias(va, len)
    };
    let caching = (set | clear).intersects(CACHE_SELECT);
    // Natively, without an alias to carry or a caching change (whose
    // alias check reads the kernel's mappings under the lock): the
    // lockless path first.
    let mut counted = 0;
    if alias.is_none() && !caching {
        match cpa_lockless(va, len, set, clear) {
            Ok(result) => return result,
            Err(splits) => counted = splits,
        }
    }
    // The locked path: kspace's lock is the split lock, and its check pass
    // the re-check (a split the lockless check counted may be done by now).
    let waiting = counted > 0;
    if waiting {
        SPLIT_WAITERS.fetch_add(1, Ordering::AcqRel);
    }
    let entered = core::cell::Cell::new(false);
    let leave = || {
        if waiting && !entered.replace(true) {
            SPLIT_WAITERS.fetch_sub(1, Ordering::AcqRel);
        }
    };
    let r = with(|ks| {
        leave();
        if caching && on_space!(&ks.space, s => s.backend().flushes_caches()) {
            let aliases = ALIASES.get().ok_or(KspaceError::NotReady)?;
            cache_alias_check(aliases, va, len, alias)?;
        }
        let done = on_space!(&mut ks.space, s => s.change_page_attr_set_clr(va, len, set, clear))?;
        if counted > done.splits {
            CPA_SPLIT_RACES.fetch_add(u64::from(counted - done.splits), Ordering::Relaxed);
        }
        if let Some(other) = alias {
            let r = on_space!(&mut ks.space, s => s.change_page_attr_set_clr(other, len, alias_set, alias_clear));
            if let Err(e) = r {
                let undo =
                    on_space!(&mut ks.space, s => s.change_page_attr_set_clr(va, len, clear, set));
                if let Err(u) = undo {
                    log::error!("cpa: undoing {va:#x} after its alias was refused: {u:?}");
                }
                return Err(e.into());
            }
            ALIAS_CHANGES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(done)
    });
    // Refused before the closure ran (not ready, a lazy batch's error).
    leave();
    r
}

/// CPUs whose lockless CPA check found a split to make and that wait for
/// the split lock (kspace's) or hold it before their locked call starts.
static SPLIT_WAITERS: AtomicU64 = AtomicU64::new(0);

/// How many CPUs wait for the split lock after a lockless check that
/// found a split to make.
pub fn split_waiters() -> u64 {
    SPLIT_WAITERS.load(Ordering::Acquire)
}

/// [`change_page_attr`] on the locked path, the lock taken first and held
/// until `go()` returns true, then the change made under it: for the CPA
/// self-test, to split a large page while other CPUs, whose lockless
/// check saw it whole, wait for the split lock (as they would behind any
/// long split), so that their re-check finds it split. `go` must return
/// true eventually (the caller bounds its wait).
pub fn change_page_attr_holding(
    va: u64,
    len: u64,
    set: Flags,
    clear: Flags,
    mut go: impl FnMut() -> bool,
) -> Result<pvmmu::space::CpaDone, KspaceError> {
    with(|ks| {
        while !go() {
            core::hint::spin_loop();
        }
        Ok(on_space!(&mut ks.space, s => s.change_page_attr_set_clr(va, len, set, clear))?)
    })
}

/// The attributes every alias of a frame must agree on: writable or not,
/// and the memory type (PWT, PCD and the 4 KiB PAT bit, which only a PV
/// backend's cache modes use).
const ALIAS_AGREE: Flags = Flags::WRITABLE.union(CACHE_SELECT);

/// Checks that a caching change of `[va, va + len)` (carried to `carried`
/// when the range is image data) leaves no kernel mapping of its frames
/// with another memory type ([`pvmmu::backend::cache::check_aliases`] over
/// every alias the kernel knows: direct map, image). A range outside the
/// direct map and the image has frames the kernel cannot name without a
/// walk, whose direct-map alias would keep its type: refused too. Mappings
/// the kernel does not track (a kmap of the frame) are not seen.
fn cache_alias_check(
    aliases: &KernelAliases,
    va: u64,
    len: u64,
    carried: Option<u64>,
) -> Result<(), KspaceError> {
    let end = va.saturating_add(len);
    let image_end = crate::boot::image_layout().data.end;
    let first = if va >= DIRECT_MAP_BASE && end <= DIRECT_MAP_BASE + (1 << 39) {
        Pfn((va - DIRECT_MAP_BASE) / 4096)
    } else if va >= crate::boot::KERNEL_VMA && end <= image_end {
        Pfn((va - crate::boot::KERNEL_VMA) / 4096)
    } else {
        return Err(KspaceError::CacheAlias { va, alias: 0 });
    };
    let carried = carried.as_slice();
    pvmmu::backend::cache::check_aliases(aliases, va, first, len / 4096, carried).map_err(|c| {
        KspaceError::CacheAlias {
            va: c.va,
            alias: c.alias,
        }
    })
}

/// The leaf bits of cache mode `mode` on the live tree: the bits to set
/// and to clear (the backend's encoding: natively pvmmu's PAT, under PV
/// the PAT Xen runs the guest with).
pub fn cache_change(mode: CacheMode) -> Result<(Flags, Flags), KspaceError> {
    with(|ks| Ok(on_space!(&ks.space, s => s.cache_change(mode))))
}

/// `set_memory_uc / wc / wb` on the live tree: the bits of `mode`
/// ([`cache_change`]) through [`change_page_attr`] (so an image-data range
/// carries the change to its direct-map alias and back, and a range whose
/// frames keep another mapping is refused with
/// [`KspaceError::CacheAlias`]).
pub fn set_memory_cache(
    va: u64,
    pages: u64,
    mode: CacheMode,
) -> Result<pvmmu::space::CpaDone, KspaceError> {
    let (set, clear) = cache_change(mode)?;
    change_page_attr(va, pages * 4096, set, clear)
}

/// The raw leaf entry mapping `va` in the live tree (at whatever level),
/// as Xen or the MMU holds it: the translation ([`translate`]) drops bit 7,
/// which is the PAT bit of a 4 KiB leaf.
pub fn leaf_raw(va: u64) -> Result<u64, KspaceError> {
    with(|ks| {
        on_space!(&ks.space, s => {
            let found = pvmmu::walk::walk(s.backend(), s.root(), va, pvmmu::entry::Level::L1)
                .map_err(|e| match e {
                    pvmmu::walk::WalkError::NotPresent { .. } => Error::NotMapped { va },
                    pvmmu::walk::WalkError::ForeignFrame(mfn) => Error::ForeignFrame(mfn),
                })?;
            Ok(found.entry.0)
        })
    })
}

/// The live tree's cache-mode encoding, `None` where caching cannot change
/// (PV without I/O privilege).
pub fn cache_encoding() -> Option<CacheEncoding> {
    with(|ks| Ok(on_space!(&ks.space, s => s.backend().cache_encoding())))
        .ok()
        .flatten()
}

/// Changes [`change_page_attr`] carried to an alias.
static ALIAS_CHANGES: AtomicU64 = AtomicU64::new(0);

/// How many changes were carried to an alias so far.
pub fn alias_changes() -> u64 {
    ALIAS_CHANGES.load(Ordering::Relaxed)
}

/// The other mapping of `[va, va + len)` when the range lies wholly in the
/// image's data (`.data` and `.bss`) or wholly in that data's direct-map
/// alias; `None` otherwise.
fn image_data_alias(va: u64, len: u64) -> Option<u64> {
    let data = crate::boot::image_layout().data;
    let base = data.start & !0xfff;
    let end = va.checked_add(len)?;
    let dm = DirectMem::va(Pfn((base - crate::boot::KERNEL_VMA) >> 12));
    let dm_end = dm + (data.end - base);
    if va >= base && end <= data.end {
        Some(dm + (va - base))
    } else if va >= dm && end <= dm_end {
        Some(base + (va - dm))
    } else {
        None
    }
}

/// DEBUG_PAGEALLOC's unmap (and the CPA self-test's): the direct-map pages of frames
/// `[pfn, pfn + pages)` become not present through CPA (natively parked,
/// under PV holes written through Xen; the L1 tables stay). One CPA call,
/// one TLB decision reaching every CPU. Under PV the call runs in a lazy
/// batch ([`pv_absent_batched`]), so its `mmu_update`s and its flush go
/// out in one multicall.
pub fn direct_map_absent(pfn: Pfn, pages: u64) -> Result<pvmmu::space::CpaDone, KspaceError> {
    if crate::platform::is_xen_pv() {
        return pv_absent_batched(DirectMem::va(pfn), pages * 4096);
    }
    change_page_attr(
        DirectMem::va(pfn),
        pages * 4096,
        Flags::empty(),
        Flags::PRESENT,
    )
}

/// Under PV: CPA's `np` on `[va, va + len)` inside a lazy batch. The
/// batch keeps CPA's end-of-call drain from sending the holes on their
/// own, so the TLB flush that follows them is submitted with them, one
/// `HYPERVISOR_multicall` (`mmu_update` then `mmuext_op`, the backend's
/// `submit_ext`): one hypercall per call instead of two (a range of more
/// than one batch's capacity sends the full batches first). Nothing in
/// the range is an alias (PRESENT is not carried, see
/// [`change_page_attr`]).
fn pv_absent_batched(va: u64, len: u64) -> Result<pvmmu::space::CpaDone, KspaceError> {
    with(|ks| {
        let Space::Pv(s) = &mut ks.space else {
            return Err(KspaceError::NotReady);
        };
        let mut batch = s.lazy();
        let done = batch.change_page_attr_set_clr(va, len, Flags::empty(), Flags::PRESENT);
        let sent = batch.finish();
        let done = done?;
        sent?;
        Ok(done)
    })
}

/// DEBUG_PAGEALLOC's map-back (and the CPA self-test's): the direct-map pages of frames
/// `[pfn, pfn + pages)` present again, writable and non-executable.
/// Natively CPA makes the parked entries present (frame and attributes
/// were kept); under PV the holes lost their frame, so the frames are
/// mapped again (the L1 tables are still there: no frame is allocated,
/// Xen validates each entry, and refuses one whose frame is still a page
/// table).
pub fn direct_map_present(pfn: Pfn, pages: u64) -> Result<(), KspaceError> {
    let va = DirectMem::va(pfn);
    let len = pages * 4096;
    if !crate::platform::is_xen_pv() {
        change_page_attr(va, len, Flags::PRESENT, Flags::empty())?;
        return Ok(());
    }
    with(|ks| match &mut ks.space {
        Space::Native(s) => {
            s.change_page_attr_set_clr(va, len, Flags::PRESENT, Flags::empty())?;
            Ok(())
        }
        Space::Pv(s) => pv_present_batched(s, va, pfn, len),
    })
}

/// Under PV: the map-back of [`direct_map_present`] and its flush in one
/// lazy batch, so the `mmu_update`s and the `mmuext_op` go out in one
/// multicall (as [`pv_absent_batched`]).
fn pv_present_batched(s: &mut PvSpace, va: u64, pfn: Pfn, len: u64) -> Result<(), KspaceError> {
    let flags = Flags::PRESENT | Flags::WRITABLE | Flags::NO_EXECUTE;
    let mut batch = s.lazy();
    let done = batch
        .map(va, pfn, len, flags)
        .and_then(|flush| batch.flush(flush));
    let sent = batch.finish();
    done?;
    sent?;
    Ok(())
}

/// Moves frames from the boot allocator into the pool until it holds
/// `target` (at most [`POOL_FRAMES`]): the frames CPA's splits take.
pub fn pool_top_up(frames: &mut Frames, target: usize) -> Result<(), KspaceError> {
    with(|ks| {
        let pool = on_space!(&mut ks.space, s => s.allocator_mut());
        while pool.len < target.min(POOL_FRAMES) {
            let pfn = frames.allocate_lowest().ok_or(KspaceError::PoolFill)?;
            let out = pool.out;
            pool.give(pfn);
            pool.out = out;
        }
        Ok(())
    })
}

/// Counters of every CPA call on the live tree, the lockless path's
/// included (`None` before [`init`]).
pub fn cpa_stats() -> Option<pvmmu::space::CpaStats> {
    let mut st = with(|ks| Ok(on_space!(&ks.space, s => s.cpa_stats()))).ok()?;
    let fast = |i: usize| FAST_STATS[i].load(Ordering::Relaxed);
    st.calls += CPA_FAST.load(Ordering::Relaxed);
    st.refused += fast(0);
    st.flush_pages += fast(1);
    st.flush_all += fast(2);
    st.cache_lines += fast(3);
    st.cache_all += fast(4);
    Some(st)
}

/// What pvmmu's tree says about `va`.
pub fn translate(va: u64) -> Result<Translation, KspaceError> {
    with(|ks| Ok(on_space!(&ks.space, s => s.lookup(va))?))
}

/// Maps a non-RAM physical page (native MMIO) at `fix`, uncached.
pub fn map_mmio(fix: Fixmap, phys: u64) -> Result<u64, KspaceError> {
    let flags = Flags::PRESENT
        | Flags::WRITABLE
        | Flags::NO_EXECUTE
        | Flags::NO_CACHE
        | Flags::WRITE_THROUGH;
    with(|ks| {
        let va = fix.va();
        on_space!(&mut ks.space, s => {
            let flush = s.map(va, Pfn(phys >> 12), 4096, flags)?;
            s.flush(flush)?;
        });
        Ok(va)
    })
}

/// Maps the machine frame `mfn` (not one of the guest's own pseudo-physical
/// frames, e.g. Xen's shared-info page) writable at `fix`, under PV.
///
/// pvmmu maps guest frames only, so this builds the page's tables through
/// pvmmu (by mapping a pool frame there) and then replaces that leaf with
/// one `update_va_mapping`, which Xen validates like any PV update.
pub fn map_foreign_pv(fix: Fixmap, mfn: u64) -> Result<u64, KspaceError> {
    with(|ks| {
        let va = fix.va();
        let Space::Pv(s) = &mut ks.space else {
            return Err(KspaceError::NotReady);
        };
        let placeholder = s.allocator_mut().take().ok_or(KspaceError::OutOfFrames)?;
        let flags = Flags::PRESENT | Flags::WRITABLE | Flags::NO_EXECUTE;
        let flush = s.map(va, placeholder, 4096, flags)?;
        s.flush(flush)?;
        let pte = (mfn << 12) | flags.bits();
        let result = s.backend_mut().hypercalls_mut().update_va_mapping(
            va,
            pte,
            hypercall::abi::UVMF_INVLPG,
        );
        match result {
            Ok(()) => {
                s.allocator_mut().give(placeholder);
                Ok(va)
            }
            Err(e) => {
                let undo = s.unmap(va, 4096).and_then(|f| s.flush(f));
                if let Err(u) = undo {
                    log::error!("fixmap {va:#x}: undo failed: {u:?}");
                }
                s.allocator_mut().give(placeholder);
                Err(KspaceError::Xen(e))
            }
        }
    })
}

/// Maps the physical bytes `[phys, phys + len)` read-only (firmware tables
/// outside the direct map, e.g. ACPI), runs `f` on them, unmaps them.
pub fn with_phys<T>(phys: u64, len: usize, f: impl FnOnce(&[u8]) -> T) -> Result<T, KspaceError> {
    let first = phys & !0xfff;
    let end = phys
        .checked_add(len as u64)
        .ok_or(KspaceError::Map(Error::RangeOverflow))?;
    let pages = (end - first).div_ceil(4096);
    if len == 0 || pages > PHYS_WINDOW_PAGES {
        return Err(KspaceError::BadLength(len));
    }
    let va = Fixmap::PhysWindow.va();
    with(|ks| {
        on_space!(&mut ks.space, s => {
            for i in 0..pages {
                let flags = Flags::PRESENT | Flags::NO_EXECUTE;
                let r = s
                    .map(va + i * 4096, Pfn((first >> 12) + i), 4096, flags)
                    .and_then(|fl| s.flush(fl));
                if let Err(e) = r {
                    if i > 0 {
                        let _ = s.unmap(va, i * 4096).and_then(|fl| s.flush(fl));
                    }
                    return Err(e.into());
                }
            }
            // SAFETY: the pages were just mapped readable at `va`; the slice
            // covers exactly the requested bytes and lives only during `f`.
            let bytes = unsafe {
                core::slice::from_raw_parts((va + (phys - first)) as *const u8, len)
            };
            let out = f(bytes);
            s.unmap(va, pages * 4096).and_then(|fl| s.flush(fl))?;
            Ok(out)
        })
    })
}

/// Maps `va` (a low identity address for the AP trampoline) to `pfn`,
/// read-only and executable.
pub fn map_exec(va: u64, pfn: Pfn) -> Result<(), KspaceError> {
    with(|ks| {
        on_space!(&mut ks.space, s => {
            let flush = s.map(va, pfn, 4096, Flags::PRESENT)?;
            s.flush(flush)?;
        });
        Ok(())
    })
}

/// Maps the pool-owned or borrowed frame `pfn` at `va` with `flags`
/// (the stale-translation test's page), flushing every CPU.
pub fn map_page(va: u64, pfn: Pfn, flags: Flags) -> Result<(), KspaceError> {
    with(|ks| {
        on_space!(&mut ks.space, s => {
            let flush = s.map(va, pfn, 4096, flags)?;
            s.flush(flush)?;
        });
        Ok(())
    })
}

/// Changes the flags of the page at `va`, flushing every CPU.
pub fn protect_page(va: u64, flags: Flags) -> Result<(), KspaceError> {
    with(|ks| {
        on_space!(&mut ks.space, s => {
            let flush = s.protect(va, 4096, flags, false)?;
            s.flush(flush)?;
        });
        Ok(())
    })
}

/// A frame from the pool (its contents unspecified), for a test.
pub fn take_frame() -> Result<Pfn, KspaceError> {
    with(|ks| {
        on_space!(&mut ks.space, s => s.allocator_mut().take()).ok_or(KspaceError::OutOfFrames)
    })
}

/// Gives back a frame from [`take_frame`].
pub fn give_frame(pfn: Pfn) -> Result<(), KspaceError> {
    with(|ks| {
        on_space!(&mut ks.space, s => s.allocator_mut().give(pfn));
        Ok(())
    })
}

/// Unmaps one page mapped by [`map_exec`] or [`map_page`].
pub fn unmap_page(va: u64) -> Result<(), KspaceError> {
    with(|ks| {
        on_space!(&mut ks.space, s => {
            let flush = s.unmap(va, 4096)?;
            s.flush(flush)?;
        });
        Ok(())
    })
}

/// Takes every free frame out of the pool (for the out-of-frames test);
/// [`restore_pool`] puts them back.
pub fn drain_pool(into: &mut [Pfn; POOL_FRAMES]) -> Result<usize, KspaceError> {
    with(|ks| {
        let pool = on_space!(&mut ks.space, s => s.allocator_mut());
        let mut n = 0;
        while let Some(p) = pool.take() {
            into[n] = p;
            n += 1;
        }
        Ok(n)
    })
}

/// Gives back what [`drain_pool`] took.
pub fn restore_pool(frames: &[Pfn]) -> Result<(), KspaceError> {
    with(|ks| {
        let pool = on_space!(&mut ks.space, s => s.allocator_mut());
        for &p in frames {
            pool.give(p);
        }
        Ok(())
    })
}

/// A frame from the pool, zeroed, and read-only in its only mapping (the
/// direct map), with its machine frame: what Xen requires of a frame it
/// takes as a descriptor table (a vCPU's GDT) or a page table.
pub fn alloc_readonly_frame() -> Result<(Pfn, Mfn), KspaceError> {
    with(|ks| {
        let Space::Pv(s) = &mut ks.space else {
            return Err(KspaceError::NotReady);
        };
        let pfn = s.allocator_mut().take().ok_or(KspaceError::OutOfFrames)?;
        let va = DirectMem::va(pfn);
        // SAFETY: a pool frame: ours, mapped writable in the direct map, and
        // mapped nowhere else.
        unsafe { core::ptr::write_bytes(va as *mut u8, 0, 4096) };
        let ro = Flags::PRESENT | Flags::NO_EXECUTE;
        let result = s.protect(va, 4096, ro, false).and_then(|f| s.flush(f));
        if let Err(e) = result {
            s.allocator_mut().give(pfn);
            return Err(e.into());
        }
        let mfn = s
            .backend()
            .to_mfn(pfn)
            .ok_or(KspaceError::Map(Error::BadFrame(pfn)))?;
        Ok((pfn, mfn))
    })
}

// ---- lazy batches (crate::lazy) ---------------------------------------------

/// One change made inside a lazy section.
#[derive(Debug, Clone, Copy)]
pub enum LazyOp {
    /// Map `pfn` at `va` (one page).
    Map {
        /// Address.
        va: u64,
        /// Frame.
        pfn: Pfn,
        /// Entry flags.
        flags: Flags,
    },
    /// Unmap the page at `va`.
    Unmap {
        /// Address.
        va: u64,
    },
    /// `apply_to_range` over `[va, va + len)`, giving every mapped page
    /// `flags`.
    Protect {
        /// First address.
        va: u64,
        /// Bytes.
        len: u64,
        /// New flags.
        flags: Flags,
    },
}

impl LazyOp {
    /// Performs the change on `s`; returns the flush it owes.
    fn run<B: Backend, A: FrameAllocator>(
        self,
        s: &mut AddressSpace<B, A>,
    ) -> Result<Flush, pvmmu::Error> {
        match self {
            LazyOp::Map { va, pfn, flags } => s.map(va, pfn, 4096, flags),
            LazyOp::Unmap { va } => s.unmap(va, 4096),
            LazyOp::Protect { va, len, flags } => {
                s.apply_to_range(va, len, false, |_, _| Some(flags))
            }
        }
    }
}

impl Kspace {
    /// Closes the open lazy batch, if any: its queued writes go out, then
    /// the flushes it owes.
    fn close_lazy(&mut self) -> Result<bool, KspaceError> {
        Ok(on_space!(&mut self.space, s => self.batch.close(s))?)
    }
}

/// Runs `op` in `thread`'s lazy batch: a batch another thread left open is
/// closed first, this thread's is opened if none is; the writes stay
/// queued (and their TLB flush owed) after the lock is released, until the
/// batch is closed by [`lazy_close`], a switch, or anyone else's change.
/// Returns the writes still queued.
pub fn lazy_apply(thread: usize, op: LazyOp) -> Result<usize, KspaceError> {
    let _p = crate::sched::preempt_disable();
    let mut guard = KSPACE.lock();
    let ks = guard.as_mut().ok_or(KspaceError::NotReady)?;
    crate::lazy::check_cpu_owner(thread);
    on_space!(&mut ks.space, s => {
        ks.batch.apply(s, thread, |s| op.run(s))?;
        Ok(s.backend().pending())
    })
}

/// Closes `thread`'s lazy batch if it is the open one (its writes and
/// flushes go out); `Ok(false)` if it had none open.
pub fn lazy_close(thread: usize) -> Result<bool, KspaceError> {
    let _p = crate::sched::preempt_disable();
    let mut guard = KSPACE.lock();
    let ks = guard.as_mut().ok_or(KspaceError::NotReady)?;
    lazy_close_locked(ks, thread)
}

fn lazy_close_locked(ks: &mut Kspace, thread: usize) -> Result<bool, KspaceError> {
    Ok(on_space!(&mut ks.space, s => ks.batch.close_for(s, thread))?)
}

/// [`lazy_close`] from the switch path (interrupts off): spins for the
/// lock; natively it answers TLB shootdowns while it waits, since the
/// holder may be waiting for this CPU's acknowledgement.
pub fn lazy_close_irqs_off(thread: usize) -> Result<bool, KspaceError> {
    loop {
        if let Some(mut guard) = KSPACE.try_lock() {
            let ks = guard.as_mut().ok_or(KspaceError::NotReady)?;
            return lazy_close_locked(ks, thread);
        }
        if !crate::platform::is_xen_pv() {
            crate::shootdown::poll();
        }
        core::hint::spin_loop();
    }
}

/// Under Xen PV, when `thread`'s lazy batch is the open one: sends it
/// with `val` written into entry `index` of `table` (a kmap slot) and a
/// local invalidation of `va`, in one hypercall, the queued writes first;
/// the batch stays open (empty) and keeps the flushes it owes. `Ok(false)`
/// when `thread` has no open batch or natively (nothing was done). Called
/// with interrupts off from thread context: spins for the lock like
/// [`lazy_close_irqs_off`] (under PV no holder waits for this CPU).
pub fn send_with_slot(
    thread: usize,
    table: Pfn,
    index: usize,
    val: u64,
    va: u64,
) -> Result<bool, KspaceError> {
    if !crate::platform::is_xen_pv() {
        return Ok(false);
    }
    let mut guard = loop {
        if let Some(guard) = KSPACE.try_lock() {
            break guard;
        }
        core::hint::spin_loop();
    };
    let ks = guard.as_mut().ok_or(KspaceError::NotReady)?;
    if ks.batch.owner() != Some(thread) {
        return Ok(false);
    }
    let Space::Pv(s) = &mut ks.space else {
        return Ok(false);
    };
    s.send_with_entry(table, index, pvmmu::entry::Entry(val), va)?;
    Ok(true)
}

/// The tables of the live tree as kspace's backend reads them (the direct
/// map): how many, and the wrapping sum of their frame numbers.
pub fn table_census() -> Result<(u64, u64), KspaceError> {
    with(|ks| {
        let (mut n, mut sum) = (0u64, 0u64);
        on_space!(&ks.space, s => {
            pvmmu::invariants::for_each_table(s.backend(), s.root(), &mut |pfn, _| {
                n += 1;
                sum = sum.wrapping_add(pfn.0);
            })
        });
        Ok((n, sum))
    })
}

/// What `va` translates to through pvmmu (queued writes included).
pub fn lookup(va: u64) -> Result<Option<Translation>, KspaceError> {
    let _p = crate::sched::preempt_disable();
    let guard = KSPACE.lock();
    let ks = guard.as_ref().ok_or(KspaceError::NotReady)?;
    Ok(on_space!(&ks.space, s => s.lookup(va)).ok())
}

/// The thread whose lazy batch is open, if any.
pub fn lazy_owner() -> Result<Option<usize>, KspaceError> {
    let _p = crate::sched::preempt_disable();
    let guard = KSPACE.lock();
    let ks = guard.as_ref().ok_or(KspaceError::NotReady)?;
    Ok(ks.batch.owner())
}

/// Writes queued in the kernel space and not yet applied (0 natively).
pub fn pending_writes() -> Result<usize, KspaceError> {
    let _p = crate::sched::preempt_disable();
    let guard = KSPACE.lock();
    let ks = guard.as_ref().ok_or(KspaceError::NotReady)?;
    Ok(on_space!(&ks.space, s => s.backend().pending()))
}

/// Performs `op` now from an interrupt handler, with its flush: the open
/// lazy batch (whoever's) goes out first, so the handler's writes land
/// after everything queued before them. `Ok(None)` if the lock is busy
/// (the interrupted code may hold it: waiting would deadlock).
pub fn try_apply_now(op: LazyOp) -> Result<Option<()>, KspaceError> {
    let Some(mut guard) = KSPACE.try_lock() else {
        return Ok(None);
    };
    let ks = guard.as_mut().ok_or(KspaceError::NotReady)?;
    on_space!(&mut ks.space, s => ks.batch.apply_now(s, |s| op.run(s)))?;
    Ok(Some(()))
}

/// One change of the SMP stress ([`crate::smp_stress`]).
#[derive(Debug, Clone, Copy)]
pub enum RangeOp {
    /// Map one page to this frame with these flags.
    Map(Pfn, Flags),
    /// Unmap the pages (all mapped).
    Unmap,
    /// Set the pages' flags (all mapped).
    Protect(Flags),
}

/// Applies `op` to `pages` pages at `va` and performs its flush (every CPU
/// the space is active on), under the lock.
pub fn change_range(va: u64, pages: u64, op: RangeOp) -> Result<(), KspaceError> {
    with(|ks| {
        on_space!(&mut ks.space, s => {
            let flush = match op {
                RangeOp::Map(pfn, flags) => s.map(va, pfn, 4096, flags)?,
                RangeOp::Unmap => s.unmap(va, pages * 4096)?,
                RangeOp::Protect(flags) => s.protect(va, pages * 4096, flags, false)?,
            };
            s.flush(flush)?;
        });
        Ok(())
    })
}

/// Runs pvmmu's invariant walker over the whole live tree under the lock;
/// the number of violations (each passed to `note`). The one mapping of a
/// frame outside the guest's memory made on purpose, Xen's shared-info
/// page at [`Fixmap::SharedInfo`], is not one.
pub fn check_invariants(
    note: &mut dyn FnMut(pvmmu::invariants::Violation),
) -> Result<usize, KspaceError> {
    use pvmmu::invariants::{check, Rules, Violation};
    let shared_info = Fixmap::SharedInfo.va();
    let mut n = 0;
    let mut filter = |v: Violation| match v {
        Violation::ForeignFrame { va, .. } if va == shared_info => {}
        v => {
            n += 1;
            note(v);
        }
    };
    with(|ks| {
        on_space!(&ks.space, s => {
            let b = s.backend();
            check(b, s.root(), Rules::for_backend(b), None, &mut filter)
        });
        Ok(())
    })?;
    Ok(n)
}
