//! Temporary kernel mappings as a balanced stack (`kmap_local`).
//!
//! Every CPU owns a window of [`SLOTS_PER_CPU`] consecutive pages in
//! kspace's L4 slot, at [`KMAP_AREA`] (one L1 table covers all CPUs'
//! windows). [`init`] has pvmmu build that table once, anchored by a
//! read-only page in its last entry so pvmmu never frees it; from then on
//! pvmmu is never asked to touch the window again and kmap changes its
//! leaves itself: under Xen PV with one `update_va_mapping` and a local
//! invlpg (Xen validates the entry like any PV update), or, when the
//! thread's lazy MMU batch is open, as one more entry of that batch sent
//! at once with the local invlpg ([`kspace::send_with_slot`]: one
//! hypercall, the queued writes first), natively with one
//! store into that L1 (through the direct map) and an invlpg. pvmmu reads
//! the tree from memory (it keeps no per-table counts), so these edits
//! keep its view and invariants true: a window leaf is either empty or a
//! 4 KiB mapping of a guest frame, never writable onto a page table.
//!
//! [`kmap_local`] pushes the next slot of this CPU; dropping the
//! [`KmapGuard`] pops it. Strict LIFO: releasing anything but the top is a
//! typed error ([`KmapGuard::try_release`]) and a panic naming the slot
//! when it happens in `drop`; the stack is then left as it was (never a
//! silent remap). Overflow is a typed error, never a wrap.
//!
//! Contexts: thread (handler depth 0), interrupt (depth 1) and nested
//! exception (depth >= 2) push on the same per-CPU stack; a handler must
//! pop what it pushed before it returns, so the stack is balanced by
//! construction. The high-water mark of each context is kept
//! ([`stats`]); their sum must fit the window.
//!
//! Per-task stacks: a thread's kmaps are also recorded in its own slot
//! array, and the scheduler's switch hook ([`on_switch`]) unmaps the
//! outgoing thread's slots and maps the incoming thread's on the CPU it
//! runs on. A thread may therefore hold kmaps across preemption and
//! migration. Because the window is per CPU, the address of a slot depends
//! on the CPU: access goes through the guard ([`KmapGuard::with_ptr`],
//! [`KmapGuard::read_u64`], [`KmapGuard::write_u64`]), which holds
//! preemption off across the access.
//!
//! Why no cross-CPU flush: CPU `n`'s window is only ever accessed by CPU
//! `n` (the thread that runs there, or its handlers), so no other CPU can
//! hold a translation of it that is ever used; the CPU that changes a slot
//! invalidates its own entry.
//!
//! The books (push, pop, nesting, depths, the switch) are
//! `pvmmu::kmap::SlotStack` and `pvmmu::kmap::switch`, host-tested against
//! a reference model and the Xen model (`pvmmu/tests/kmap.rs`); this
//! module adds the hardware slot changes and the per-CPU and per-thread
//! storage.
//!
//! Invariant: on every CPU, with interrupts off, the CPU stack's `top`
//! equals the running thread's depth plus the slots its handlers hold, and
//! slot `i < top` maps the stack's entry `i`, slot `i >= top` is empty.

use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hypercall::MmuHypercalls;
use pvmmu::entry::Flags;
use pvmmu::kmap::{self as books, SlotStack, StackError};
use pvmmu::Pfn;

use crate::directmap::{DirectMem, DIRECT_MAP_BASE};
use crate::kspace::{self, KspaceError, FIXMAP_AREA};
use crate::percpu::{self, MAX_CPUS};
use crate::sched::{self, ThreadId, MAX_THREADS};
use crate::xen_pv::PvBoot;
use crate::{irq, Kernel};

/// First address of the kmap windows (2 MiB above the fixmap: its own L1).
pub const KMAP_AREA: u64 = FIXMAP_AREA + (2 << 20);
/// Slots in one CPU's window.
pub const SLOTS_PER_CPU: usize = 32;
/// Most kmaps one thread may hold (the rest of the window is for handlers).
pub const TASK_SLOTS: usize = 16;
/// Index in the window's L1 of the page that keeps the table alive.
const ANCHOR_INDEX: u64 = 511;
/// Contexts whose depth is tracked: thread, interrupt, nested exception.
pub const LEVELS: usize = books::LEVELS;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const HUGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

const _: () = assert!(SLOTS_PER_CPU * MAX_CPUS <= ANCHOR_INDEX as usize);

/// Why a kmap or its release failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmapError {
    /// [`init`] has not run.
    NotReady,
    /// The stack refused: overflow (the window or the thread's share of
    /// it is full), an out-of-order release, a release from another
    /// context, or a kmap over a handler's leftover slot.
    Stack(StackError),
    /// A writable kmap of a frame the kernel keeps read-only (a page table
    /// or descriptor table under PV): refused before Xen sees it.
    PageTableWritable(Pfn),
    /// The frame has no machine frame (PV).
    BadFrame(Pfn),
    /// A write through a read-only kmap.
    ReadOnly {
        /// The slot.
        slot: usize,
    },
    /// An access beyond the page.
    BadOffset(usize),
    /// Xen refused the slot update.
    Xen(hypercall::XenError),
    /// kspace could not build the window's table.
    Kspace(KspaceError),
}

impl From<StackError> for KmapError {
    fn from(e: StackError) -> Self {
        KmapError::Stack(e)
    }
}

impl fmt::Display for KmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KmapError::Stack(StackError::OutOfOrder { slot, top }) => write!(
                f,
                "out-of-order release of kmap slot {slot} (top of stack is slot {})",
                top.wrapping_sub(1)
            ),
            KmapError::Stack(StackError::Overflow { slot }) => {
                write!(f, "kmap overflow at slot {slot}")
            }
            KmapError::Stack(StackError::WrongContext { slot }) => {
                write!(f, "kmap slot {slot} released from another context")
            }
            e => write!(f, "{e:?}"),
        }
    }
}

/// Where the window lives and how to change it.
struct Window {
    /// The live root.
    root: Pfn,
    /// Xen PV start-of-day facts (p2m, m2p); `None` natively.
    pv: Option<PvBoot>,
    /// Natively: direct-map address of the window's L1.
    l1: u64,
    /// The window's L1 frame.
    l1_pfn: Pfn,
}

static WINDOW: spin::Once<Window> = spin::Once::new();

/// One CPU's stack of slots (the books; `pvmmu::kmap`, host-tested).
type CpuKmaps = SlotStack<SLOTS_PER_CPU>;
/// One thread's kmaps (its share of the window, saved across switches).
type TaskKmaps = SlotStack<TASK_SLOTS>;

struct CpuCell(UnsafeCell<CpuKmaps>);
struct TaskCell(UnsafeCell<TaskKmaps>);
// SAFETY: `CPU_KMAPS[n]` is only touched on CPU `n` with interrupts off
// (kmap, release, the switch hook), so accesses never overlap.
unsafe impl Sync for CpuCell {}
// SAFETY: `TASKS[t]` is only touched with interrupts off by thread `t`
// itself or by the switch hook of the CPU switching away from or to `t`
// (the scheduler's ON_CPU flag keeps `t` on one CPU at a time).
unsafe impl Sync for TaskCell {}

static CPU_KMAPS: [CpuCell; MAX_CPUS] =
    [const { CpuCell(UnsafeCell::new(SlotStack::new())) }; MAX_CPUS];
static TASKS: [TaskCell; MAX_THREADS] =
    [const { TaskCell(UnsafeCell::new(SlotStack::new())) }; MAX_THREADS];

static KMAPS: AtomicU64 = AtomicU64::new(0);
static RELEASES: AtomicU64 = AtomicU64::new(0);
static SWITCH_REMAPS: AtomicU64 = AtomicU64::new(0);
static SWITCH_UNMAPS: AtomicU64 = AtomicU64::new(0);
static SWITCH_ERRORS: AtomicU64 = AtomicU64::new(0);
static LAZY_JOINS: AtomicU64 = AtomicU64::new(0);
static MAX_DEPTH: [AtomicU32; LEVELS] = [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)];

/// Virtual address of slot `slot` of CPU `cpu`'s window.
pub const fn slot_va(cpu: usize, slot: usize) -> u64 {
    KMAP_AREA + ((cpu * SLOTS_PER_CPU + slot) as u64) * 4096
}

fn level_now() -> usize {
    (irq::depth() as usize).min(LEVELS - 1)
}

/// The entry that maps `va` in the live tree (an L1 entry, or a large
/// leaf above), read through the direct map; `None` if a table on the way
/// is missing.
fn leaf_entry(root: Pfn, pv: Option<&PvBoot>, va: u64) -> Option<*mut u64> {
    let mut table = root;
    for level in (1..=4u32).rev() {
        let idx = ((va >> (12 + 9 * (level - 1))) & 511) as usize;
        // SAFETY: `table` is a page-table frame of the live tree, RAM and
        // so mapped (at least readable) in the direct map; `idx < 512`.
        let p = unsafe { (DirectMem::va(table) as *mut u64).add(idx) };
        if level == 1 {
            return Some(p);
        }
        // SAFETY: as above; a volatile read of a live entry.
        let e = unsafe { core::ptr::read_volatile(p) };
        if e & PRESENT == 0 {
            return None;
        }
        if e & HUGE != 0 {
            return Some(p);
        }
        let frame = (e & ADDR_MASK) >> 12;
        table = match pv {
            Some(pv) => Pfn(pv.mfn_to_pfn(frame)?),
            None => Pfn(frame),
        };
    }
    None
}

impl Window {
    /// The entry a slot gets for `frame` with `flags`, after the PV checks.
    fn pte(&self, frame: Pfn, flags: Flags) -> Result<u64, KmapError> {
        let bits = (flags | Flags::PRESENT).bits();
        match &self.pv {
            Some(pv) => {
                if bits & WRITABLE != 0 {
                    // Xen keeps every alias of a page or descriptor table
                    // read-only, and pvmmu makes the direct-map alias so:
                    // a read-only direct-map leaf means "not writable".
                    let leaf = leaf_entry(self.root, Some(pv), DirectMem::va(frame));
                    // SAFETY: a live entry, read through the direct map.
                    let e = leaf.map(|p| unsafe { core::ptr::read_volatile(p) });
                    if matches!(e, Some(e) if e & PRESENT != 0 && e & WRITABLE == 0) {
                        return Err(KmapError::PageTableWritable(frame));
                    }
                }
                let mfn = pv.pfn_to_mfn(frame.0).ok_or(KmapError::BadFrame(frame))?;
                Ok((mfn << 12) | bits)
            }
            None => Ok((frame.0 << 12) | bits),
        }
    }

    /// Points slot `slot` of `cpu` (the calling CPU) at `pte` (0: empty).
    fn set(&self, cpu: usize, slot: usize, pte: u64) -> Result<(), KmapError> {
        let va = slot_va(cpu, slot);
        if self.pv.is_some() {
            // SAFETY: PV (`pv` is set only on the Xen PV path).
            let mut xen = unsafe { hypercall::Xen::new() };
            xen.update_va_mapping(va, pte, hypercall::abi::UVMF_INVLPG)
                .map_err(KmapError::Xen)
        } else {
            let idx = ((va >> 12) & 511) as usize;
            // SAFETY: `l1` is the window's L1 (found at init, never freed:
            // the anchor keeps it), mapped writable in the direct map
            // natively; this CPU owns entry `idx` (its window).
            unsafe { core::ptr::write_volatile((self.l1 as *mut u64).add(idx), pte) };
            x86_64::instructions::tlb::flush(x86_64::VirtAddr::new(va));
            Ok(())
        }
    }
}

impl Window {
    /// A thread's slot change ([`kmap_local`], release; interrupts off):
    /// under PV, when the thread's lazy batch is open, the change is sent
    /// with it (one hypercall, the queued writes first); otherwise as
    /// [`Window::set`].
    fn set_thread(
        &self,
        cpu: usize,
        thread: usize,
        slot: usize,
        pte: u64,
    ) -> Result<(), KmapError> {
        if self.pv.is_some() && crate::lazy::active() {
            let va = slot_va(cpu, slot);
            let idx = ((va >> 12) & 511) as usize;
            if kspace::send_with_slot(thread, self.l1_pfn, idx, pte, va)
                .map_err(KmapError::Kspace)?
            {
                LAZY_JOINS.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        self.set(cpu, slot, pte)
    }
}

/// Builds the window's table through kspace (once), finds it, and
/// registers the switch hook.
pub fn init(kernel: &Kernel) -> Result<(), KmapError> {
    let dm = kernel.direct_map.as_ref().ok_or(KmapError::NotReady)?;
    let anchor_va = KMAP_AREA + ANCHOR_INDEX * 4096;
    let anchor = kspace::take_frame().map_err(KmapError::Kspace)?;
    kspace::map_page(anchor_va, anchor, Flags::PRESENT | Flags::NO_EXECUTE)
        .map_err(KmapError::Kspace)?;
    let pv = kernel.pv.clone();
    let l1 = match leaf_entry(dm.root, pv.as_ref(), KMAP_AREA) {
        Some(p) => (p as u64) & !0xfff,
        None => return Err(KmapError::NotReady),
    };
    let l1_pfn = Pfn((l1 - DIRECT_MAP_BASE) >> 12);
    WINDOW.call_once(|| Window {
        root: dm.root,
        pv,
        l1,
        l1_pfn,
    });
    sched::register_switch_hook(on_switch).map_err(|_| KmapError::NotReady)?;
    Ok(())
}

/// A live kmap: one slot of the stack. Dropping it releases the slot.
/// Not `Send`: it belongs to the thread (or handler) that made it.
#[must_use = "the slot is released when the guard drops"]
pub struct KmapGuard {
    slot: usize,
    level: usize,
    writable: bool,
    released: bool,
    _not_send: PhantomData<*const ()>,
}

/// Maps `frame` in the next slot of this CPU's window.
pub fn kmap_local(frame: Pfn, flags: Flags) -> Result<KmapGuard, KmapError> {
    let w = WINDOW.get().ok_or(KmapError::NotReady)?;
    let pte = w.pte(frame, flags)?;
    let g = irq::save();
    let cpu = percpu::cpu_id();
    let level = level_now();
    // SAFETY: this CPU's cell, interrupts off (see `CpuCell`).
    let c = unsafe { &mut *CPU_KMAPS[cpu].0.get() };
    let slot = c.check_push(level)?;
    let task = if level == 0 {
        let t = percpu::this_cpu(&g).current.load(Ordering::Relaxed);
        // SAFETY: the running thread's own cell, interrupts off.
        let tk = unsafe { &mut *TASKS[t].0.get() };
        tk.check_push(0)
            .map_err(|_| StackError::Overflow { slot })?;
        Some((t, tk))
    } else {
        None
    };
    match task {
        Some((t, _)) => w.set_thread(cpu, t, slot, pte)?,
        None => w.set(cpu, slot, pte)?,
    }
    c.push(level, pte)?;
    MAX_DEPTH[level].fetch_max(c.depth()[level], Ordering::Relaxed);
    if let Some((_, tk)) = task {
        tk.push(0, pte)?;
    }
    KMAPS.fetch_add(1, Ordering::Relaxed);
    drop(g);
    Ok(KmapGuard {
        slot,
        level,
        writable: pte & WRITABLE != 0,
        released: false,
        _not_send: PhantomData,
    })
}

impl KmapGuard {
    /// The slot (its index in the stack).
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Runs `f` with the page's address on this CPU, preemption off (the
    /// address is only valid on the CPU that runs `f`).
    pub fn with_ptr<T>(&self, f: impl FnOnce(*mut u8) -> T) -> T {
        let _p = sched::preempt_disable();
        f(slot_va(percpu::cpu_id(), self.slot) as *mut u8)
    }

    /// Reads the `u64` at byte `off` of the page.
    pub fn read_u64(&self, off: usize) -> Result<u64, KmapError> {
        if off > 4096 - 8 || !off.is_multiple_of(8) {
            return Err(KmapError::BadOffset(off));
        }
        // SAFETY: the slot maps a frame (this guard is live) on the CPU
        // that runs the closure; `off` is inside the page and aligned.
        Ok(self.with_ptr(|p| unsafe { core::ptr::read_volatile(p.add(off) as *const u64) }))
    }

    /// Writes the `u64` at byte `off` of the page (a writable kmap).
    pub fn write_u64(&self, off: usize, v: u64) -> Result<(), KmapError> {
        if off > 4096 - 8 || !off.is_multiple_of(8) {
            return Err(KmapError::BadOffset(off));
        }
        if !self.writable {
            return Err(KmapError::ReadOnly { slot: self.slot });
        }
        // SAFETY: as in `read_u64`, and the slot is mapped writable.
        self.with_ptr(|p| unsafe { core::ptr::write_volatile(p.add(off) as *mut u64, v) });
        Ok(())
    }

    /// Releases the slot. Fails (and changes nothing) unless it is the top
    /// of this CPU's stack and the caller is the context that made it.
    pub fn try_release(&mut self) -> Result<(), KmapError> {
        if self.released {
            return Ok(());
        }
        let w = WINDOW.get().ok_or(KmapError::NotReady)?;
        let g = irq::save();
        let cpu = percpu::cpu_id();
        let slot = self.slot;
        if level_now() != self.level {
            return Err(StackError::WrongContext { slot }.into());
        }
        // SAFETY: this CPU's cell, interrupts off.
        let c = unsafe { &mut *CPU_KMAPS[cpu].0.get() };
        c.check_pop(slot, self.level)?;
        let task = if self.level == 0 {
            let t = percpu::this_cpu(&g).current.load(Ordering::Relaxed);
            // SAFETY: the running thread's own cell, interrupts off.
            let tk = unsafe { &mut *TASKS[t].0.get() };
            tk.check_pop(slot, 0)?;
            Some((t, tk))
        } else {
            None
        };
        match task {
            Some((t, _)) => w.set_thread(cpu, t, slot, 0)?,
            None => w.set(cpu, slot, 0)?,
        }
        c.pop(slot, self.level)?;
        if let Some((_, tk)) = task {
            tk.pop(slot, 0)?;
        }
        RELEASES.fetch_add(1, Ordering::Relaxed);
        self.released = true;
        Ok(())
    }
}

impl Drop for KmapGuard {
    fn drop(&mut self) {
        if let Err(e) = self.try_release() {
            panic!("KMAP UNBALANCED: {e}");
        }
    }
}

/// The switch hook: unmaps `from`'s slots and maps `to`'s on this CPU
/// (interrupts off, on the outgoing stack).
pub fn on_switch(from: ThreadId, to: ThreadId) {
    let Some(w) = WINDOW.get() else { return };
    let cpu = percpu::cpu_id();
    // SAFETY: interrupts are off in a switch hook; this CPU's cell, and
    // the two threads' cells (see `TaskCell`).
    let (c, fk, tk) = unsafe {
        (
            &mut *CPU_KMAPS[cpu].0.get(),
            &*TASKS[from.0].0.get(),
            &*TASKS[to.0].0.get(),
        )
    };
    let mut failed = 0;
    match books::switch(c, fk, tk, |slot, pte| {
        if w.set(cpu, slot, pte).is_err() {
            failed += 1;
        }
    }) {
        Ok(n) => {
            SWITCH_UNMAPS.fetch_add(n.unmapped as u64, Ordering::Relaxed);
            SWITCH_REMAPS.fetch_add(n.remapped as u64, Ordering::Relaxed);
            SWITCH_ERRORS.fetch_add(failed, Ordering::Relaxed);
        }
        // Handler slots held across a switch: a bug elsewhere; left alone.
        Err(_) => {
            SWITCH_ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads page tables through kmap: one read-only slot per table, held
/// while a walk descends below it (at most four at once). pvmmu's
/// traversal and invariant walker ([`pvmmu::walk::for_each`],
/// [`pvmmu::invariants::check`]) run over it without using any permanent
/// alias of a table frame. Thread context only (it kmaps at level 0).
pub struct KmapTables {
    pv: Option<PvBoot>,
    tables: core::cell::Cell<u64>,
    failures: core::cell::Cell<u64>,
}

impl KmapTables {
    /// A reader for the kernel's tables (PV: translating through the p2m
    /// and M2P).
    pub fn new(pv: Option<PvBoot>) -> Self {
        KmapTables {
            pv,
            tables: core::cell::Cell::new(0),
            failures: core::cell::Cell::new(0),
        }
    }

    /// Tables read, and tables that could not be kmapped (walked as empty).
    pub fn counts(&self) -> (u64, u64) {
        (self.tables.get(), self.failures.get())
    }
}

impl pvmmu::walk::TableReader for KmapTables {
    fn skipped_range(&self) -> Option<(u64, u64)> {
        self.pv.as_ref().map(|_| pvmmu::types::XEN_HOLE)
    }
    fn machine_frame(&self, pfn: Pfn) -> Option<pvmmu::Mfn> {
        match &self.pv {
            Some(pv) => pv.pfn_to_mfn(pfn.0).map(pvmmu::Mfn),
            None => Some(pvmmu::Mfn(pfn.0)),
        }
    }
    fn guest_frame(&self, mfn: pvmmu::Mfn) -> Option<Pfn> {
        match &self.pv {
            Some(pv) => pv.mfn_to_pfn(mfn.0).map(Pfn),
            None => Some(Pfn(mfn.0)),
        }
    }
    fn entries(&self, table: Pfn, f: &mut dyn FnMut(usize, pvmmu::entry::Entry)) {
        let g = match kmap_local(table, Flags::PRESENT | Flags::NO_EXECUTE) {
            Ok(g) => g,
            Err(_) => {
                self.failures.set(self.failures.get() + 1);
                return;
            }
        };
        self.tables.set(self.tables.get() + 1);
        for i in 0..512 {
            match g.read_u64(i * 8) {
                Ok(e) => f(i, pvmmu::entry::Entry(e)),
                Err(_) => self.failures.set(self.failures.get() + 1),
            }
        }
    }
}

/// kmap counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// kmaps made.
    pub kmaps: u64,
    /// kmaps released.
    pub releases: u64,
    /// Slots mapped for an incoming thread at a switch.
    pub switch_remaps: u64,
    /// Slots unmapped for an outgoing thread at a switch.
    pub switch_unmaps: u64,
    /// Switches that found the stack inconsistent or Xen refusing.
    pub switch_errors: u64,
    /// Highest depth seen per context (thread, interrupt, nested).
    pub max_depth: [u32; LEVELS],
    /// Slot changes sent with the thread's open lazy batch (PV).
    pub lazy_joins: u64,
}

/// The counters so far.
pub fn stats() -> Stats {
    Stats {
        kmaps: KMAPS.load(Ordering::Relaxed),
        releases: RELEASES.load(Ordering::Relaxed),
        switch_remaps: SWITCH_REMAPS.load(Ordering::Relaxed),
        switch_unmaps: SWITCH_UNMAPS.load(Ordering::Relaxed),
        switch_errors: SWITCH_ERRORS.load(Ordering::Relaxed),
        max_depth: [0, 1, 2].map(|i| MAX_DEPTH[i].load(Ordering::Relaxed)),
        lazy_joins: LAZY_JOINS.load(Ordering::Relaxed),
    }
}

/// Slots in use on any CPU or held by any thread, and window leaves still
/// present (all 0 when the stacks are balanced and idle).
pub fn live_slots() -> (usize, usize, usize) {
    let Some(w) = WINDOW.get() else {
        return (0, 0, 0);
    };
    let _g = irq::save();
    // SAFETY: reading counters only, at the end of a test when no kmap is
    // in flight on any CPU (a racy read only makes the check fail).
    let on_cpus = CPU_KMAPS
        .iter()
        .map(|c| unsafe { (*c.0.get()).top() })
        .sum();
    // SAFETY: as above.
    let in_tasks = TASKS.iter().map(|t| unsafe { (*t.0.get()).top() }).sum();
    let mut present = 0;
    for cpu in 0..MAX_CPUS {
        for slot in 0..SLOTS_PER_CPU {
            if let Some(p) = leaf_entry(w.root, w.pv.as_ref(), slot_va(cpu, slot)) {
                // SAFETY: a live L1 entry read through the direct map.
                if unsafe { core::ptr::read_volatile(p) } & PRESENT != 0 {
                    present += 1;
                }
            }
        }
    }
    (on_cpus, in_tasks, present)
}
