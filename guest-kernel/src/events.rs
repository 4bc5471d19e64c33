//! Xen PV event channels: the shared-info page, the event and failsafe
//! callbacks, the 2-level pending/mask bitmaps, per-port handlers, and the
//! timer VIRQ.
//!
//! Delivery: Xen bounces the event upcall to `event_upcall_pv` (traps.rs)
//! with events masked (registered with `CALLBACKF_mask_events`); the
//! dispatcher calls [`upcall`], which clears `evtchn_upcall_pending`, takes
//! the selector word with an atomic exchange, and for every selected word
//! handles `pending & !mask` port by port, clearing each pending bit
//! atomically before calling the port's handler; it loops while Xen raised
//! `evtchn_upcall_pending` again. The stub returns with `HYPERVISOR_iret`,
//! which restores the mask from the saved `RFLAGS.IF` atomically with the
//! return, so an event raised during the handler is delivered right after.
//!
//! Invariant: a port is handled at most once per time Xen sets its pending
//! bit, and only while unmasked; the shared-info page is mapped at
//! [`Fixmap::SharedInfo`] for the life of the kernel once [`init`] ran.

use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicU8, Ordering};

use hypercall::abi::{self, SharedInfo, VcpuInfo, LEGACY_MAX_VCPUS};
use hypercall::XenError;

use crate::kspace::{self, Fixmap, KspaceError};
use crate::xen_pv::PvBoot;
use crate::{clock, irq};

/// Ports with a handler (2-level ABI has 4,096 ports; we bind few).
pub const MAX_PORTS: usize = 64;

/// A port's handler, called with interrupts off.
pub type Handler = fn(port: u32);

static SHARED: AtomicPtr<SharedInfo> = AtomicPtr::new(core::ptr::null_mut());
static HANDLERS: spin::Mutex<[Option<Handler>; MAX_PORTS]> = spin::Mutex::new([None; MAX_PORTS]);
/// Ports (bit n = port n) each vCPU handles: the ports bound to it. Xen
/// flags a port in the selector of the vCPU it is bound to, but the
/// pending bitmap is shared: a vCPU scanning a word must skip the other
/// vCPUs' ports in it (Linux keeps the same per-CPU mask).
static OWNED: [AtomicU64; crate::percpu::MAX_CPUS] =
    [const { AtomicU64::new(0) }; crate::percpu::MAX_CPUS];
/// Upcalls taken.
static UPCALLS: AtomicU64 = AtomicU64::new(0);
/// Port events handled.
static EVENTS: AtomicU64 = AtomicU64::new(0);
/// Events on ports without a handler.
static STRAY: AtomicU64 = AtomicU64::new(0);

/// Why event channels could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventError {
    /// The shared-info page could not be mapped.
    Map(KspaceError),
    /// A callback registration was refused.
    Callback(XenError),
    /// Xen refused to bind or unmask a port.
    Bind(XenError),
    /// A port beyond [`MAX_PORTS`].
    PortTooHigh(u32),
}

extern "C" {
    fn event_upcall_pv();
    fn failsafe_callback_pv();
}

/// Address of the event upcall entry (for a new vCPU's context).
pub fn upcall_entry() -> u64 {
    event_upcall_pv as *const () as u64
}

/// Address of the failsafe entry (for a new vCPU's context).
pub fn failsafe_entry() -> u64 {
    failsafe_callback_pv as *const () as u64
}

/// The mapped shared-info page.
pub fn shared_info() -> Option<&'static SharedInfo> {
    let p = SHARED.load(Ordering::Acquire);
    // SAFETY: set once by `init` to the fixmap page, mapped for ever; Xen
    // writes it concurrently, so fields are read volatile / atomically.
    unsafe { p.as_ref() }
}

/// This CPU's `vcpu_info` (interrupts off: no migration).
fn this_vcpu() -> Option<&'static VcpuInfo> {
    shared_info().and_then(|s| s.vcpu_info.get(crate::percpu::cpu_id()))
}

/// Maps shared info, registers the callbacks, stops the periodic timer and
/// hands the interrupt flag and the clock their `vcpu_info`.
pub fn init(pv: &PvBoot) -> Result<(), EventError> {
    let va = kspace::map_foreign_pv(Fixmap::SharedInfo, pv.shared_info >> 12)
        .map_err(EventError::Map)?;
    let shared = va as *mut SharedInfo;
    SHARED.store(shared, Ordering::Release);
    // SAFETY: `shared` maps Xen's shared-info page (just mapped, never
    // unmapped); vcpu_info[0] is this (boot) vCPU's slot.
    unsafe {
        let vi = core::ptr::addr_of_mut!((*shared).vcpu_info[0]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*vi).evtchn_upcall_mask), 1);
        irq::init_pv(vi);
        clock::init_pv(core::ptr::addr_of_mut!((*vi).time));
    }
    // The other vCPUs' slots start masked too, before they come up.
    for n in 1..LEGACY_MAX_VCPUS {
        // SAFETY: as above; slot n of the mapped page.
        unsafe {
            let vi = core::ptr::addr_of_mut!((*shared).vcpu_info[n]);
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*vi).evtchn_upcall_mask), 1);
        }
    }
    // Every port starts masked; bound ports are unmasked one by one.
    // SAFETY: the guest owns the mask bitmap of its shared-info page.
    unsafe {
        for w in 0..64 {
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*shared).evtchn_mask[w]), !0);
        }
    }
    // SAFETY: PV; both stubs expect the PV bounce frame and leave with
    // HYPERVISOR_iret (traps.rs).
    unsafe {
        hypercall::ops::callback_register(
            abi::CALLBACKTYPE_EVENT,
            event_upcall_pv as *const () as u64,
            abi::CALLBACKF_MASK_EVENTS,
        )
        .map_err(EventError::Callback)?;
        hypercall::ops::callback_register(
            abi::CALLBACKTYPE_FAILSAFE,
            failsafe_callback_pv as *const () as u64,
            abi::CALLBACKF_MASK_EVENTS,
        )
        .map_err(EventError::Callback)?;
    }
    // SAFETY: PV; vCPU 0 is ours.
    unsafe { hypercall::ops::vcpu_stop_periodic_timer(0) }.map_err(EventError::Callback)?;
    Ok(())
}

/// Binds `virq` on `vcpu` to a new port with `handler`, and unmasks it.
pub fn bind_virq(virq: u32, vcpu: u32, handler: Handler) -> Result<u32, EventError> {
    // SAFETY: PV (only the PV path calls this).
    let port = unsafe { hypercall::ops::evtchn_bind_virq(virq, vcpu) }.map_err(EventError::Bind)?;
    install(port, vcpu, handler)?;
    Ok(port)
}

/// Binds a new inter-vCPU port notifying `vcpu` with `handler`, unmasked.
pub fn bind_ipi(vcpu: u32, handler: Handler) -> Result<u32, EventError> {
    // SAFETY: PV (only the PV path calls this).
    let port = unsafe { hypercall::ops::evtchn_bind_ipi(vcpu) }.map_err(EventError::Bind)?;
    install(port, vcpu, handler)?;
    Ok(port)
}

/// An application processor's part: its `vcpu_info` for the interrupt flag
/// and the clock, and its periodic timer stopped. Runs on that vCPU.
pub fn init_ap(cpu: usize) -> Result<(), EventError> {
    let shared = SHARED.load(Ordering::Acquire);
    if shared.is_null() || cpu >= LEGACY_MAX_VCPUS {
        return Err(EventError::PortTooHigh(cpu as u32));
    }
    // SAFETY: slot `cpu` of the mapped shared-info page; we run on it.
    unsafe { irq::init_pv(core::ptr::addr_of_mut!((*shared).vcpu_info[cpu])) };
    // SAFETY: PV; our own vCPU.
    unsafe { hypercall::ops::vcpu_stop_periodic_timer(cpu as u32) }.map_err(EventError::Callback)
}

fn install(port: u32, vcpu: u32, handler: Handler) -> Result<(), EventError> {
    let slot = port as usize;
    if slot >= MAX_PORTS || vcpu as usize >= crate::percpu::MAX_CPUS {
        // SAFETY: PV; closing the port we were just given.
        let _ = unsafe { hypercall::ops::evtchn_close(port) };
        return Err(EventError::PortTooHigh(port));
    }
    {
        let _irq = irq::save();
        HANDLERS.lock()[slot] = Some(handler);
    }
    OWNED[vcpu as usize].fetch_or(1 << slot, Ordering::SeqCst);
    // SAFETY: PV; the port is ours.
    unsafe { hypercall::ops::evtchn_unmask(port) }.map_err(EventError::Bind)
}

/// Whether `port`'s pending bit is set (for the masked-delivery test).
pub fn is_pending(port: u32) -> bool {
    let Some(s) = shared_info() else { return false };
    let (w, b) = ((port / 64) as usize, port % 64);
    // SAFETY: a word of the mapped page, updated by Xen; volatile read.
    let word = unsafe { core::ptr::read_volatile(&s.evtchn_pending[w]) };
    word & (1 << b) != 0
}

fn atomic_u64(p: &u64) -> &AtomicU64 {
    // SAFETY: `p` points into the mapped shared-info page, 8-byte aligned;
    // Xen updates these words with locked instructions, as we do.
    unsafe { &*(p as *const u64 as *const AtomicU64) }
}

/// Handles every pending, unmasked port. Called by the dispatcher with
/// events masked.
pub fn upcall() {
    UPCALLS.fetch_add(1, Ordering::Relaxed);
    let (Some(s), Some(vi)) = (shared_info(), this_vcpu()) else {
        return;
    };
    // SAFETY: a byte of the mapped page that Xen sets; the guest clears it.
    let pending_flag = unsafe { &*(&vi.evtchn_upcall_pending as *const u8 as *const AtomicU8) };
    let owned = OWNED[crate::percpu::cpu_id()].load(Ordering::SeqCst);
    loop {
        pending_flag.store(0, Ordering::SeqCst);
        let mut sel = atomic_u64(&vi.evtchn_pending_sel).swap(0, Ordering::SeqCst);
        while sel != 0 {
            let w = sel.trailing_zeros() as usize;
            sel &= sel - 1;
            let pending = atomic_u64(&s.evtchn_pending[w]);
            let mask = atomic_u64(&s.evtchn_mask[w]);
            loop {
                let mine = if w == 0 { owned } else { 0 };
                let ready = pending.load(Ordering::SeqCst) & !mask.load(Ordering::SeqCst) & mine;
                if ready == 0 {
                    break;
                }
                let b = ready.trailing_zeros();
                pending.fetch_and(!(1u64 << b), Ordering::SeqCst);
                dispatch(w as u32 * 64 + b);
            }
        }
        if pending_flag.load(Ordering::SeqCst) == 0 {
            break;
        }
    }
}

fn dispatch(port: u32) {
    EVENTS.fetch_add(1, Ordering::Relaxed);
    let handler = HANDLERS.lock().get(port as usize).copied().flatten();
    match handler {
        Some(h) => h(port),
        None => {
            STRAY.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Upcalls taken, port events handled, events on ports without a handler.
pub fn counts() -> (u64, u64, u64) {
    (
        UPCALLS.load(Ordering::Relaxed),
        EVENTS.load(Ordering::Relaxed),
        STRAY.load(Ordering::Relaxed),
    )
}

/// Called by the failsafe stub: Xen could not reload a segment register on
/// a return to the guest. Nothing here loads user segments, so this is a bug.
#[no_mangle]
extern "C" fn failsafe_callback(rip: u64) -> ! {
    panic!("Xen failsafe callback (segment reload failed), rip {rip:#x}");
}
