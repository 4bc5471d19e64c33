//! Per-CPU data, reached through the GS base.
//!
//! Every CPU has one [`PerCpu`] in a static array; its GS base points at
//! it (`HYPERVISOR_set_segment_base(SEGBASE_GS_KERNEL)` under Xen PV, the
//! `IA32_GS_BASE` MSR natively), set on the boot CPU at entry, before the
//! first trap, and on every other CPU before it runs any Rust code that
//! could take one.
//!
//! The counters a preemptible thread touches (the preemption count, the
//! CPU number) are read and changed with single `%gs:`-relative
//! instructions, so they cannot be split by an interrupt or a migration:
//! the 2011 lazy-MMU thread's "per-CPU data used from preemptible code" bug
//! cannot happen through them. Everything else is reached through
//! [`this_cpu`], which takes an [`IrqGuard`] (or [`with_irqs_off`]): a
//! thread cannot migrate while it holds the reference.
//!
//! Invariant: the GS base of CPU `n` is `&CPUS[n]` from its first
//! instruction of Rust code to the end; `CPUS[n].self_ptr == &CPUS[n]`.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use hypercall::abi::VcpuInfo;

use crate::irq::IrqGuard;

/// Most CPUs the kernel drives.
pub const MAX_CPUS: usize = 8;

/// One CPU's data. The first fields have fixed offsets used by the
/// `%gs:`-relative accessors below.
#[repr(C, align(64))]
pub struct PerCpu {
    /// Address of this struct (GS:0).
    self_ptr: AtomicU64,
    /// Preemption count (GS:8).
    preempt_count: AtomicU32,
    /// Handlers running (GS:12).
    irq_depth: AtomicU32,
    /// A switch was requested (GS:16).
    need_resched: AtomicU32,
    /// CPU number (GS:20).
    cpu: AtomicU32,
    /// Hypercalls issued on this CPU, in any context (GS:24).
    hypercalls: AtomicU64,
    /// Of those, the ones thread code asked for: outside handlers, and not
    /// the one [`crate::irq::enable`] makes to have a pending event
    /// delivered (GS:32).
    thread_hypercalls: AtomicU64,
    /// Non-zero while `irq::enable` forces an event delivery (GS:40).
    forcing_delivery: AtomicU32,
    /// Whether this CPU runs the kernel.
    pub online: AtomicBool,
    /// Xen PV: this vCPU's `vcpu_info`.
    pub vcpu_info: AtomicPtr<VcpuInfo>,
    /// The running thread's slot.
    pub current: AtomicUsize,
    /// The thread switched away from, until the switch completed.
    pub prev: AtomicUsize,
    /// This CPU's idle thread.
    pub idle: AtomicUsize,
    /// The next tick deadline (clock ns).
    pub deadline: AtomicU64,
    /// Ticks taken on this CPU.
    pub ticks: AtomicU64,
    /// Xen PV: this vCPU's timer port.
    pub timer_port: AtomicU32,
    /// Natively: this CPU's local APIC id.
    pub apic_id: AtomicU32,
    /// Xen PV: this vCPU's IPI port.
    pub ipi_port: AtomicU32,
    /// Interrupts taken on this CPU.
    pub interrupts: AtomicU64,
    /// Thread switches on this CPU.
    pub switches: AtomicU64,
    /// The CPU whose run queue the thread switched away from goes to once
    /// its registers are saved (it was pinned elsewhere), or none.
    pub migrate_to: AtomicUsize,
    /// Reschedule IPIs received on this CPU.
    pub resched_ipis: AtomicU64,
    /// Reschedule IPIs sent to this CPU (by any CPU).
    pub resched_ipis_sent: AtomicU64,
}

/// Offsets of the `%gs:` fields (checked below).
mod off {
    pub const PREEMPT: usize = 8;
    pub const DEPTH: usize = 12;
    pub const RESCHED: usize = 16;
    pub const CPU: usize = 20;
    pub const HYPERCALLS: usize = 24;
    pub const THREAD_HYPERCALLS: usize = 32;
    pub const FORCING: usize = 40;
}
const _: () = {
    assert!(core::mem::offset_of!(PerCpu, preempt_count) == off::PREEMPT);
    assert!(core::mem::offset_of!(PerCpu, irq_depth) == off::DEPTH);
    assert!(core::mem::offset_of!(PerCpu, need_resched) == off::RESCHED);
    assert!(core::mem::offset_of!(PerCpu, cpu) == off::CPU);
    assert!(core::mem::offset_of!(PerCpu, hypercalls) == off::HYPERCALLS);
    assert!(core::mem::offset_of!(PerCpu, thread_hypercalls) == off::THREAD_HYPERCALLS);
    assert!(core::mem::offset_of!(PerCpu, forcing_delivery) == off::FORCING);
};

const NONE: usize = usize::MAX;

#[allow(clippy::declare_interior_mutable_const)]
const CPU_INIT: PerCpu = PerCpu {
    self_ptr: AtomicU64::new(0),
    preempt_count: AtomicU32::new(0),
    irq_depth: AtomicU32::new(0),
    need_resched: AtomicU32::new(0),
    cpu: AtomicU32::new(0),
    hypercalls: AtomicU64::new(0),
    thread_hypercalls: AtomicU64::new(0),
    forcing_delivery: AtomicU32::new(0),
    online: AtomicBool::new(false),
    vcpu_info: AtomicPtr::new(core::ptr::null_mut()),
    current: AtomicUsize::new(0),
    prev: AtomicUsize::new(NONE),
    idle: AtomicUsize::new(NONE),
    deadline: AtomicU64::new(0),
    ticks: AtomicU64::new(0),
    timer_port: AtomicU32::new(u32::MAX),
    apic_id: AtomicU32::new(u32::MAX),
    ipi_port: AtomicU32::new(u32::MAX),
    interrupts: AtomicU64::new(0),
    switches: AtomicU64::new(0),
    migrate_to: AtomicUsize::new(NONE),
    resched_ipis: AtomicU64::new(0),
    resched_ipis_sent: AtomicU64::new(0),
};

/// Every CPU's data.
pub static CPUS: [PerCpu; MAX_CPUS] = [CPU_INIT; MAX_CPUS];

/// Why the GS base could not be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerCpuError {
    /// CPU number beyond [`MAX_CPUS`].
    TooMany(usize),
    /// Xen refused `set_segment_base`.
    Xen(hypercall::XenError),
}

/// Points this CPU's GS base at `CPUS[cpu]`. Called first thing on every
/// CPU (the boot CPU at entry, others on their way up). From then on every
/// hypercall is also counted per CPU ([`count_hypercall`]).
pub fn install(cpu: usize) -> Result<(), PerCpuError> {
    let pc = CPUS.get(cpu).ok_or(PerCpuError::TooMany(cpu))?;
    let base = pc as *const PerCpu as u64;
    pc.self_ptr.store(base, Ordering::Relaxed);
    pc.cpu.store(cpu as u32, Ordering::Relaxed);
    if crate::platform::is_xen_pv() {
        // SAFETY: PV; setting our own kernel GS base to a static.
        unsafe { hypercall::ops::set_gs_base_kernel(base) }.map_err(PerCpuError::Xen)?;
    } else {
        // Ring 0; IA32_GS_BASE takes any canonical address.
        x86_64::registers::model_specific::GsBase::write(x86_64::VirtAddr::new(base));
    }
    // Every CPU that can issue a hypercall has its GS base before its
    // first one (the boot CPU here, Xen PV vCPUs from their initial
    // context), so the hook's `%gs:` stores always land in a `PerCpu`.
    hypercall::raw::set_count_hook(Some(count_hypercall));
    Ok(())
}

/// The hypercall count hook: counts on this CPU, and in the thread count
/// when thread code (handler depth 0, not a forced event delivery) issued
/// it. Each counter is one `%gs:` instruction, so a migration cannot split
/// an update; a thread that migrates between the depth check and the
/// thread count is counted on the CPU it lands on (benchmarks read the
/// count with preemption off, where this cannot happen).
fn count_hypercall() {
    // SAFETY: GS points at this CPU's `PerCpu` (see `install`).
    unsafe { asm!("inc qword ptr gs:[24]", options(nostack)) };
    if depth() == 0 && forcing() == 0 {
        // SAFETY: as above.
        unsafe { asm!("inc qword ptr gs:[32]", options(nostack)) };
    }
}

fn forcing() -> u32 {
    let v: u32;
    // SAFETY: a single `%gs:` load.
    unsafe { asm!("mov {:e}, gs:[40]", out(reg) v, options(nostack, readonly, preserves_flags)) };
    v
}

/// Marks (or unmarks) the hypercall `irq::enable` makes only to have a
/// pending event delivered, so that it is not counted as thread code's.
pub fn set_forcing_delivery(on: bool) {
    let v = u32::from(on);
    // SAFETY: a single `%gs:` store.
    unsafe { asm!("mov dword ptr gs:[40], {:e}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Hypercalls issued on CPU `cpu` so far: (in any context, by thread
/// code). Readable from any CPU. The thread count between two reads is
/// exactly what thread code on `cpu` asked for meanwhile, whatever the
/// other CPUs and this CPU's handlers did.
pub fn hypercalls_of(cpu: usize) -> (u64, u64) {
    CPUS.get(cpu).map_or((0, 0), |c| {
        (
            c.hypercalls.load(Ordering::Relaxed),
            c.thread_hypercalls.load(Ordering::Relaxed),
        )
    })
}

/// Fills CPU `cpu`'s self pointer and number before it starts (its GS
/// base is set by whoever starts it).
pub fn prepare(cpu: usize) {
    if let Some(pc) = CPUS.get(cpu) {
        pc.self_ptr
            .store(pc as *const PerCpu as u64, Ordering::Relaxed);
        pc.cpu.store(cpu as u32, Ordering::Relaxed);
    }
}

/// The GS base CPU `cpu` must run with.
pub fn base_of(cpu: usize) -> u64 {
    CPUS.get(cpu).map_or(0, |pc| pc as *const PerCpu as u64)
}

/// This CPU's number (one `%gs:` load: valid even if the caller migrates
/// right after, as a snapshot).
pub fn cpu_id() -> usize {
    let v: u32;
    // SAFETY: GS points at this CPU's `PerCpu` (module invariant).
    unsafe { asm!("mov {:e}, gs:[20]", out(reg) v, options(nostack, readonly, preserves_flags)) };
    v as usize
}

/// This CPU's data, borrowed for as long as interrupts are off (the guard
/// proves the thread cannot migrate meanwhile).
pub fn this_cpu(_irqs_off: &IrqGuard) -> &PerCpu {
    &CPUS[cpu_id()]
}

/// This CPU's data from code that already runs with interrupts off (trap
/// handlers, the scheduler's switch path).
///
/// # Safety
/// Interrupts must be off for as long as the reference is used.
pub unsafe fn this_cpu_irqs_off() -> &'static PerCpu {
    &CPUS[cpu_id()]
}

/// Runs `f` with interrupts off on this CPU's data.
pub fn with_irqs_off<T>(f: impl FnOnce(&PerCpu) -> T) -> T {
    let g = crate::irq::save();
    f(this_cpu(&g))
}

/// Raises this CPU's preemption count (one instruction).
pub fn preempt_inc() {
    // SAFETY: GS points at this CPU's `PerCpu`; a single read-modify-write
    // of its count cannot be split by an interrupt or a migration.
    unsafe { asm!("inc dword ptr gs:[8]", options(nostack)) };
}

/// Lowers this CPU's preemption count; returns the new value.
pub fn preempt_dec() -> u32 {
    let v: u32;
    // SAFETY: as for `preempt_inc`. A thread with a non-zero count does
    // not migrate, so the read after the decrement is of the same CPU.
    unsafe {
        asm!(
            "dec dword ptr gs:[8]",
            "mov {:e}, gs:[8]",
            out(reg) v,
            options(nostack)
        )
    };
    v
}

/// This CPU's preemption count.
pub fn preempt_count() -> u32 {
    let v: u32;
    // SAFETY: a single `%gs:` load.
    unsafe { asm!("mov {:e}, gs:[8]", out(reg) v, options(nostack, readonly, preserves_flags)) };
    v
}

/// Handler depth on this CPU, +1; returns the new depth.
pub fn depth_inc() -> u32 {
    let v: u32;
    // SAFETY: a `%gs:` read-modify-write and load; only called by trap
    // handlers (interrupts off, no migration).
    unsafe {
        asm!(
            "inc dword ptr gs:[12]",
            "mov {:e}, gs:[12]",
            out(reg) v,
            options(nostack)
        )
    };
    v
}

/// Handler depth on this CPU, -1; returns the new depth.
pub fn depth_dec() -> u32 {
    let v: u32;
    // SAFETY: as for `depth_inc`.
    unsafe {
        asm!(
            "dec dword ptr gs:[12]",
            "mov {:e}, gs:[12]",
            out(reg) v,
            options(nostack)
        )
    };
    v
}

/// Handler depth on this CPU (0 in thread context).
pub fn depth() -> u32 {
    let v: u32;
    // SAFETY: a single `%gs:` load.
    unsafe { asm!("mov {:e}, gs:[12]", out(reg) v, options(nostack, readonly, preserves_flags)) };
    v
}

/// Sets or clears this CPU's switch request.
pub fn set_need_resched(on: bool) {
    let v = u32::from(on);
    // SAFETY: a single `%gs:` store.
    unsafe { asm!("mov dword ptr gs:[16], {:e}", in(reg) v, options(nostack, preserves_flags)) };
}

/// Whether this CPU has a switch request.
pub fn need_resched() -> bool {
    let v: u32;
    // SAFETY: a single `%gs:` load.
    unsafe { asm!("mov {:e}, gs:[16]", out(reg) v, options(nostack, readonly, preserves_flags)) };
    v != 0
}

/// CPUs online.
pub fn online_count() -> usize {
    CPUS.iter()
        .filter(|c| c.online.load(Ordering::Acquire))
        .count()
}

/// CPU `n`'s data.
pub fn cpu(n: usize) -> Option<&'static PerCpu> {
    CPUS.get(n)
}

/// Whether `v` is the "no thread" marker of `prev`/`idle`.
pub const fn is_none(v: usize) -> bool {
    v == NONE
}

/// The "no thread" marker.
pub const NO_THREAD: usize = NONE;
