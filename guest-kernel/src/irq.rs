//! The interrupt flag, one abstraction over both platforms, and the
//! interrupt-context bookkeeping the scheduler and later kmap/lazy code read.
//!
//! Natively the flag is `RFLAGS.IF` (`cli`/`sti`). A Xen PV kernel runs in
//! ring 3 and cannot `cli`: its flag is `evtchn_upcall_mask` in its
//! `vcpu_info` (shared-info page). Unmasking under PV must deliver what
//! became pending meanwhile: Xen only checks for pending events when it
//! returns to the guest, so after clearing the mask the kernel looks at
//! `evtchn_upcall_pending` and, if set, makes any hypercall (Linux's
//! `xen_force_evtchn_callback`): the upcall is delivered on its return.
//!
//! Before [`init_pv`] has mapped the shared-info page the PV flag reads as
//! "disabled" (Xen starts a vCPU with its events masked) and the guards do
//! nothing.
//!
//! Invariant: an [`IrqGuard`] restores exactly the state it found, so
//! guards nest; interrupt and exception handlers run with the flag off
//! (IDT interrupt gates natively; under PV the event callback is registered
//! with `CALLBACKF_mask_events` and every trap-table entry asks Xen to mask
//! events on entry), and [`depth`] counts the handlers running on this CPU.

use core::marker::PhantomData;
use core::sync::atomic::{compiler_fence, fence, AtomicU32, Ordering};

use hypercall::abi::VcpuInfo;

use crate::{percpu, platform};

/// Events forced after an unmask found one pending (PV).
static FORCED: AtomicU32 = AtomicU32::new(0);

/// Records where this vCPU's `vcpu_info` is mapped; from now on the guards
/// drive its upcall mask.
///
/// # Safety
/// `vcpu_info` must be this vCPU's slot in the mapped shared-info page and
/// stay mapped for the life of the kernel; called on the vCPU it describes.
pub unsafe fn init_pv(vcpu_info: *mut VcpuInfo) {
    percpu::with_irqs_off(|cpu| cpu.vcpu_info.store(vcpu_info, Ordering::Release));
}

/// This CPU's `vcpu_info`. The caller keeps preemption off while it uses
/// it (a migration in between would touch another vCPU's mask).
fn vcpu_info() -> Option<&'static VcpuInfo> {
    let p = percpu::CPUS[percpu::cpu_id()]
        .vcpu_info
        .load(Ordering::Acquire);
    // SAFETY: set by `init_pv` to the mapped shared-info slot, which stays
    // mapped (its contract); Xen writes the fields concurrently, so they
    // are only accessed with volatile reads and writes below.
    unsafe { p.as_ref() }
}

fn mask_ptr(vi: &VcpuInfo) -> *mut u8 {
    core::ptr::addr_of!(vi.evtchn_upcall_mask) as *mut u8
}

/// Whether interrupts (events) are delivered right now.
pub fn enabled() -> bool {
    if platform::is_xen_pv() {
        percpu::preempt_inc();
        let on = match vcpu_info() {
            // SAFETY: a byte of the mapped vcpu_info (see `vcpu_info`).
            Some(vi) => unsafe { core::ptr::read_volatile(mask_ptr(vi)) == 0 },
            None => false,
        };
        percpu::preempt_dec();
        on
    } else {
        x86_64::instructions::interrupts::are_enabled()
    }
}

/// Turns interrupts off.
pub fn disable() {
    if platform::is_xen_pv() {
        // Preemption off between finding this vCPU's slot and the store
        // (Linux's xen_irq_disable does the same).
        percpu::preempt_inc();
        if let Some(vi) = vcpu_info() {
            // SAFETY: a byte of the mapped vcpu_info that the guest owns.
            unsafe { core::ptr::write_volatile(mask_ptr(vi), 1) };
            compiler_fence(Ordering::SeqCst);
        }
        percpu::preempt_dec();
    } else {
        x86_64::instructions::interrupts::disable();
    }
}

/// Turns interrupts on, delivering anything that became pending while they
/// were off.
pub fn enable() {
    if platform::is_xen_pv() {
        percpu::preempt_inc();
        if let Some(vi) = vcpu_info() {
            compiler_fence(Ordering::SeqCst);
            // SAFETY: a byte of the mapped vcpu_info that the guest owns.
            unsafe { core::ptr::write_volatile(mask_ptr(vi), 0) };
            // The mask store must be visible before the pending load.
            fence(Ordering::SeqCst);
            // SAFETY: Xen sets this byte; a volatile read of the mapped page.
            let pending = unsafe { core::ptr::read_volatile(&vi.evtchn_upcall_pending) };
            if pending != 0 {
                FORCED.fetch_add(1, Ordering::Relaxed);
                force_callback();
            }
        }
        // No resched check here: the caller (a guard's drop) does not expect
        // a switch inside it; a pending one is taken at the next interrupt
        // return or preemption point.
        percpu::preempt_dec();
    } else {
        x86_64::instructions::interrupts::enable();
    }
}

/// Makes Xen deliver a pending upcall now: any hypercall returns through
/// Xen's event check.
fn force_callback() {
    // Not thread code's hypercall: kept out of the per-CPU thread count
    // (the count hook runs before the hypercall, so the upcall delivered
    // on its return may clear the mark again).
    percpu::set_forcing_delivery(true);
    // SAFETY: PV (only called under PV); XENVER_version has no buffer.
    let _ = unsafe { hypercall::ops::xen_version() };
    percpu::set_forcing_delivery(false);
}

/// Unmasks after a pending check was forced (PV): how often that happened.
pub fn forced_deliveries() -> u32 {
    FORCED.load(Ordering::Relaxed)
}

/// Interrupts off until the guard drops, then back to what they were.
/// Not `Send`: it restores the flag of the CPU it was taken on.
#[must_use = "interrupts come back on when the guard drops"]
pub struct IrqGuard {
    was_enabled: bool,
    _cpu_bound: PhantomData<*const ()>,
}

/// Saves the interrupt flag and turns interrupts off.
pub fn save() -> IrqGuard {
    let was_enabled = enabled();
    if was_enabled {
        disable();
    }
    IrqGuard {
        was_enabled,
        _cpu_bound: PhantomData,
    }
}

impl Drop for IrqGuard {
    fn drop(&mut self) {
        if self.was_enabled {
            enable();
        }
    }
}

/// Called by the trap dispatcher when a handler starts; returns the depth.
pub fn enter() -> u32 {
    percpu::depth_inc()
}

/// Called by the trap dispatcher when a handler ends; returns the depth left.
pub fn exit() -> u32 {
    percpu::depth_dec()
}

/// Handlers running on this CPU (0 in thread context).
pub fn depth() -> u32 {
    percpu::depth()
}

/// Whether the caller runs inside an interrupt or exception handler.
pub fn in_interrupt() -> bool {
    depth() != 0
}

/// Waits for the next interrupt with interrupts off on entry, atomically
/// enabling them (so a wake-up between the caller's check and the wait is
/// not lost). Interrupts are on when it returns.
pub fn wait_for_interrupt() {
    if platform::is_xen_pv() {
        // SAFETY: PV. SCHEDOP_block unmasks events atomically with the
        // block and returns once one is pending; it is delivered on return.
        if let Err(e) = unsafe { hypercall::ops::sched_block() } {
            panic!("SCHEDOP_block failed: {e}");
        }
        // Xen cleared the mask; make sure the guest's view agrees.
        enable();
    } else {
        x86_64::instructions::interrupts::enable_and_hlt();
    }
}
