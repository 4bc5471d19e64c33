//! Typed wrappers for the hypercalls a PV kernel needs outside the MMU:
//! console, scheduler, version, memory map, event channels, timer, vCPU.
//!
//! Invariant: as for [`crate::raw`], only call these as a Xen guest with a
//! hypercall path: PV, or HVM/PVH once its hypercall page is installed.
//! The ones marked "PV guest" are PV-only interfaces.

use crate::abi::{self, nr, E820Entry, EvtchnSend, SchedShutdown, XenMemoryMap};
use crate::raw::{call2, call3};
use crate::XenError;

/// Why the domain shuts down (`SHUTDOWN_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// Clean power-off.
    Poweroff,
    /// Reboot request.
    Reboot,
    /// The domain crashed.
    Crash,
}

/// `console_io(CONSOLEIO_write)`: writes bytes to Xen's console (dom0, or any
/// domain on a debug Xen). Returns the number of bytes Xen accepted.
///
/// # Safety
/// Only as a Xen guest with a hypercall path (see [`crate::raw`]).
pub unsafe fn console_write(bytes: &[u8]) -> Result<usize, XenError> {
    // SAFETY: `bytes` is a valid buffer of the stated length; caller is PV.
    let ret = unsafe {
        call3(
            nr::CONSOLE_IO,
            u64::from(abi::CONSOLEIO_write),
            bytes.len() as u64,
            bytes.as_ptr() as u64,
        )
    };
    XenError::check(ret).map(|n| n as usize)
}

/// `sched_op(SCHEDOP_shutdown)`. Returns only if Xen refused.
///
/// # Safety
/// Only as a Xen guest with a hypercall path (see [`crate::raw`]).
pub unsafe fn shutdown(reason: ShutdownReason) -> XenError {
    let arg = SchedShutdown {
        reason: match reason {
            ShutdownReason::Poweroff => abi::SHUTDOWN_poweroff,
            ShutdownReason::Reboot => abi::SHUTDOWN_reboot,
            ShutdownReason::Crash => abi::SHUTDOWN_crash,
        },
    };
    // SAFETY: `arg` lives across the call; caller is PV.
    let ret = unsafe {
        call2(
            nr::SCHED_OP,
            u64::from(abi::SCHEDOP_shutdown),
            &arg as *const _ as u64,
        )
    };
    match XenError::check(ret) {
        Err(e) => e,
        Ok(_) => XenError::Other(0),
    }
}

/// `xen_version(XENVER_version)`: `(major, minor)`.
///
/// # Safety
/// Only as a Xen guest with a hypercall path (see [`crate::raw`]).
pub unsafe fn xen_version() -> Result<(u16, u16), XenError> {
    // SAFETY: XENVER_version takes no buffer; caller is PV.
    let ret = unsafe { call2(nr::XEN_VERSION, u64::from(abi::XENVER_VERSION), 0) };
    XenError::check(ret).map(|v| ((v >> 16) as u16, v as u16))
}

/// `vm_assist(cmd, type)`, e.g. to enable or disable an assist.
///
/// # Safety
/// Only as a Xen PV guest.
pub unsafe fn vm_assist(cmd: u32, kind: u32) -> Result<(), XenError> {
    // SAFETY: no pointers; caller is PV.
    let ret = unsafe { call2(nr::VM_ASSIST, u64::from(cmd), u64::from(kind)) };
    XenError::check(ret).map(|_| ())
}

/// `memory_op(XENMEM_memory_map)`: fills `buf` with the domain's pseudo-
/// physical memory map and returns the number of entries written.
///
/// # Safety
/// Only as a Xen guest with a hypercall path (see [`crate::raw`]).
pub unsafe fn memory_map(buf: &mut [E820Entry]) -> Result<usize, XenError> {
    let mut arg = XenMemoryMap {
        nr_entries: buf.len().min(u32::MAX as usize) as u32,
        buffer: buf.as_mut_ptr(),
    };
    // SAFETY: `arg` and `buf` are valid for the call; Xen writes at most
    // `nr_entries` entries into `buf`.
    let ret = unsafe {
        call2(
            nr::MEMORY_OP,
            u64::from(abi::XENMEM_MEMORY_MAP),
            &mut arg as *mut _ as u64,
        )
    };
    XenError::check(ret).map(|_| arg.nr_entries as usize)
}

/// `memory_op(XENMEM_current_reservation, DOMID_SELF)`: pages this domain has.
///
/// # Safety
/// Only as a Xen PV guest.
pub unsafe fn current_reservation() -> Result<u64, XenError> {
    let domid: abi::DomId = abi::DOMID_SELF;
    // SAFETY: `domid` lives across the call.
    let ret = unsafe {
        call2(
            nr::MEMORY_OP,
            u64::from(abi::XENMEM_CURRENT_RESERVATION),
            &domid as *const _ as u64,
        )
    };
    XenError::check(ret).map(|n| n as u64)
}

/// `event_channel_op(EVTCHNOP_send)`: notifies the other end of `port`.
///
/// # Safety
/// Only as a Xen guest with a hypercall path (see [`crate::raw`]).
pub unsafe fn evtchn_send(port: u32) -> Result<(), XenError> {
    let arg = EvtchnSend { port };
    // SAFETY: `arg` lives across the call.
    let ret = unsafe {
        call2(
            nr::EVENT_CHANNEL_OP,
            u64::from(abi::EVTCHNOP_send),
            &arg as *const _ as u64,
        )
    };
    XenError::check(ret).map(|_| ())
}

/// `set_timer_op(deadline)`: one-shot timer at system time `deadline` (ns);
/// 0 cancels it.
///
/// # Safety
/// Only as a Xen PV guest.
pub unsafe fn set_timer_op(deadline_ns: u64) -> Result<(), XenError> {
    // SAFETY: no pointers.
    let ret = unsafe { call2(nr::SET_TIMER_OP, deadline_ns, 0) };
    XenError::check(ret).map(|_| ())
}

/// `vcpu_op(VCPUOP_stop_periodic_timer, vcpu)`.
///
/// # Safety
/// Only as a Xen PV guest.
pub unsafe fn vcpu_stop_periodic_timer(vcpu: u32) -> Result<(), XenError> {
    // SAFETY: this sub-op takes no argument buffer.
    let ret = unsafe {
        call3(
            nr::VCPU_OP,
            u64::from(abi::VCPUOP_STOP_PERIODIC_TIMER),
            u64::from(vcpu),
            0,
        )
    };
    XenError::check(ret).map(|_| ())
}

/// One entry of the guest's virtual trap table (`struct trap_info`): the
/// handler Xen bounces exception `vector` to.
pub use xen_sys::trap_info as TrapInfo;

/// Code selector of a 64-bit PV guest kernel (`FLAT_KERNEL_CS64`), the `cs`
/// of every [`TrapInfo`] that targets kernel code.
pub const FLAT_KERNEL_CS64: u16 = xen_sys::FLAT_KERNEL_CS64 as u16;

/// `set_trap_table(table)`: registers the guest's exception handlers.
///
/// Xen reads entries until one whose `address` is 0, so `table` must end
/// with such a terminator; without one this returns [`XenError::Inval`]
/// and issues no hypercall.
///
/// # Safety
/// Only as a Xen PV guest, and every non-terminator `address` must be the
/// entry point of a handler that expects Xen's 64-bit PV exception frame
/// (`rcx`, `r11`, then the hardware frame).
pub unsafe fn set_trap_table(table: &[TrapInfo]) -> Result<(), XenError> {
    match table.last() {
        Some(last) if last.address == 0 => {}
        _ => return Err(XenError::Inval),
    }
    // SAFETY: `table` is valid and terminated (checked above), so Xen reads
    // only inside it; caller is PV and vouches for the handler addresses.
    let ret = unsafe {
        call2(
            xen_sys::__HYPERVISOR_set_trap_table,
            table.as_ptr() as u64,
            0,
        )
    };
    XenError::check(ret).map(|_| ())
}

/// `sched_op(SCHEDOP_yield)`: gives the physical CPU to another vCPU, for
/// example while waiting for a console backend to drain a ring.
///
/// # Safety
/// Only as a Xen guest with a hypercall path (see [`crate::raw`]).
pub unsafe fn sched_yield() -> Result<(), XenError> {
    // SAFETY: SCHEDOP_yield takes no argument buffer; caller is PV.
    let ret = unsafe { call2(nr::SCHED_OP, u64::from(xen_sys::SCHEDOP_yield), 0) };
    XenError::check(ret).map(|_| ())
}

/// `callback_op(CALLBACKOP_register)`: registers the entry point Xen bounces
/// the event upcall (or the failsafe callback) to.
///
/// # Safety
/// Only as a Xen PV guest; `address` must be an entry stub that expects
/// Xen's 64-bit PV bounce frame (`rcx`, `r11`, then the hardware frame) and
/// returns with `HYPERVISOR_iret`.
pub unsafe fn callback_register(kind: u16, address: u64, flags: u16) -> Result<(), XenError> {
    let arg = abi::CallbackRegister {
        kind,
        flags,
        pad: 0,
        address,
    };
    // SAFETY: `arg` lives across the call; the caller vouches for `address`.
    let ret = unsafe {
        call2(
            abi::HYPERVISOR_CALLBACK_OP,
            u64::from(abi::CALLBACKOP_REGISTER),
            &arg as *const _ as u64,
        )
    };
    XenError::check(ret).map(|_| ())
}

/// `event_channel_op(EVTCHNOP_bind_virq)`: binds `virq` on `vcpu` to a new
/// port and returns it (the port starts masked only if the guest masked it).
///
/// # Safety
/// Only as a Xen PV guest.
pub unsafe fn evtchn_bind_virq(virq: u32, vcpu: u32) -> Result<u32, XenError> {
    let mut arg = abi::EvtchnBindVirq {
        virq,
        vcpu,
        port: 0,
    };
    // SAFETY: `arg` lives across the call; Xen writes only `port`.
    let ret = unsafe {
        call2(
            nr::EVENT_CHANNEL_OP,
            u64::from(abi::EVTCHNOP_BIND_VIRQ),
            &mut arg as *mut _ as u64,
        )
    };
    XenError::check(ret).map(|_| arg.port)
}

/// `event_channel_op(EVTCHNOP_bind_ipi)`: a new port that notifies `vcpu`.
///
/// # Safety
/// Only as a Xen PV guest.
pub unsafe fn evtchn_bind_ipi(vcpu: u32) -> Result<u32, XenError> {
    let mut arg = abi::EvtchnBindIpi { vcpu, port: 0 };
    // SAFETY: `arg` lives across the call; Xen writes only `port`.
    let ret = unsafe {
        call2(
            nr::EVENT_CHANNEL_OP,
            u64::from(abi::EVTCHNOP_BIND_IPI),
            &mut arg as *mut _ as u64,
        )
    };
    XenError::check(ret).map(|_| arg.port)
}

/// `event_channel_op(EVTCHNOP_unmask)`: clears the port's mask bit; Xen
/// raises the upcall again if the port is pending.
///
/// # Safety
/// Only as a Xen PV guest.
pub unsafe fn evtchn_unmask(port: u32) -> Result<(), XenError> {
    let arg = abi::EvtchnPort { port };
    // SAFETY: `arg` lives across the call.
    let ret = unsafe {
        call2(
            nr::EVENT_CHANNEL_OP,
            u64::from(abi::EVTCHNOP_UNMASK),
            &arg as *const _ as u64,
        )
    };
    XenError::check(ret).map(|_| ())
}

/// `event_channel_op(EVTCHNOP_close)`.
///
/// # Safety
/// Only as a Xen PV guest.
pub unsafe fn evtchn_close(port: u32) -> Result<(), XenError> {
    let arg = abi::EvtchnPort { port };
    // SAFETY: `arg` lives across the call.
    let ret = unsafe {
        call2(
            nr::EVENT_CHANNEL_OP,
            u64::from(abi::EVTCHNOP_CLOSE),
            &arg as *const _ as u64,
        )
    };
    XenError::check(ret).map(|_| ())
}

/// `vcpu_op(VCPUOP_set_singleshot_timer, vcpu)`: `VIRQ_TIMER` fires once at
/// Xen system time `deadline_ns`. With `future`, a deadline already past
/// fails with `-ETIME` instead of firing at once.
///
/// # Safety
/// Only as a Xen PV guest.
pub unsafe fn vcpu_set_singleshot_timer(
    vcpu: u32,
    deadline_ns: u64,
    future: bool,
) -> Result<(), XenError> {
    let arg = abi::VcpuSetSingleshotTimer {
        timeout_abs_ns: deadline_ns,
        flags: if future { abi::VCPU_SSHOTTMR_FUTURE } else { 0 },
        pad: 0,
    };
    // SAFETY: `arg` lives across the call.
    let ret = unsafe {
        call3(
            nr::VCPU_OP,
            u64::from(abi::VCPUOP_SET_SINGLESHOT_TIMER),
            u64::from(vcpu),
            &arg as *const _ as u64,
        )
    };
    XenError::check(ret).map(|_| ())
}

/// `sched_op(SCHEDOP_block)`: sleeps until an event is pending. Called with
/// events masked, Xen unmasks them atomically with the block, so an event
/// that arrives between the caller's check and the block is not lost.
///
/// # Safety
/// Only as a Xen PV guest.
pub unsafe fn sched_block() -> Result<(), XenError> {
    // SAFETY: SCHEDOP_block takes no argument buffer.
    let ret = unsafe { call2(nr::SCHED_OP, u64::from(abi::SCHEDOP_BLOCK), 0) };
    XenError::check(ret).map(|_| ())
}

/// `__HYPERVISOR_set_segment_base`.
pub const HYPERVISOR_SET_SEGMENT_BASE: u32 = 25;
/// `set_segment_base` selector: the guest kernel's GS base.
pub const SEGBASE_GS_KERNEL: u64 = 2;

/// `set_segment_base(SEGBASE_GS_KERNEL, base)`: the GS base the vCPU uses
/// in guest kernel mode (a PV kernel cannot write the MSR).
///
/// # Safety
/// Only as a Xen PV guest; code that reads `%gs:` must find what it
/// expects at `base`.
pub unsafe fn set_gs_base_kernel(base: u64) -> Result<(), XenError> {
    // SAFETY: no pointer is passed to Xen.
    let ret = unsafe { call2(HYPERVISOR_SET_SEGMENT_BASE, SEGBASE_GS_KERNEL, base) };
    XenError::check(ret).map(|_| ())
}

/// The initial state of a vCPU (`struct vcpu_guest_context`, x86_64).
pub use xen_sys::vcpu_guest_context as VcpuGuestContext;

/// `vcpu_op` sub-command: set a vCPU's initial state.
pub const VCPUOP_INITIALISE: u32 = 0;
/// `vcpu_op` sub-command: bring a vCPU online.
pub const VCPUOP_UP: u32 = 1;
/// `vcpu_op` sub-command: is the vCPU online (1) or not (0).
pub const VCPUOP_IS_UP: u32 = 3;
/// `vcpu_guest_context.flags`: the vCPU starts in guest kernel mode.
pub const VGCF_IN_KERNEL: u64 = 1 << 2;
/// `vcpu_guest_context.flags`: the failsafe callback masks events.
pub const VGCF_FAILSAFE_DISABLES_EVENTS: u64 = 1 << 3;

/// `vcpu_op(VCPUOP_initialise, vcpu, ctxt)`: Xen validates the context
/// (GDT frames read-only, `ctrlreg[3]` a pinned L4, selectors) and keeps a
/// copy; the vCPU starts from it at `VCPUOP_up`.
///
/// # Safety
/// Only as a Xen PV guest; `ctxt` must describe a stack, page tables and
/// entry points that are valid for the new vCPU.
pub unsafe fn vcpu_initialise(vcpu: u32, ctxt: &VcpuGuestContext) -> Result<(), XenError> {
    // SAFETY: `ctxt` lives across the call; Xen only reads it.
    let ret = unsafe {
        call3(
            nr::VCPU_OP,
            u64::from(VCPUOP_INITIALISE),
            u64::from(vcpu),
            ctxt as *const _ as u64,
        )
    };
    XenError::check(ret).map(|_| ())
}

/// `vcpu_op(VCPUOP_up, vcpu)`.
///
/// # Safety
/// Only as a Xen PV guest, after `vcpu_initialise` of that vCPU.
pub unsafe fn vcpu_up(vcpu: u32) -> Result<(), XenError> {
    // SAFETY: no buffer.
    let ret = unsafe { call3(nr::VCPU_OP, u64::from(VCPUOP_UP), u64::from(vcpu), 0) };
    XenError::check(ret).map(|_| ())
}

/// `vcpu_op(VCPUOP_is_up, vcpu)`: `Ok(true)` if online, `Err(NoEnt)` if
/// the domain has no such vCPU.
///
/// # Safety
/// Only as a Xen PV guest.
pub unsafe fn vcpu_is_up(vcpu: u32) -> Result<bool, XenError> {
    // SAFETY: no buffer.
    let ret = unsafe { call3(nr::VCPU_OP, u64::from(VCPUOP_IS_UP), u64::from(vcpu), 0) };
    XenError::check(ret).map(|v| v != 0)
}
