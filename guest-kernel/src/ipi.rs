//! Inter-processor interrupts: reschedule (a thread was made ready on the
//! target's run queue: a remote wake-up, a spawn placed there, a thread
//! pinned there) and TLB shootdown requests.
//!
//! Under Xen PV each vCPU has an event channel bound with
//! `EVTCHNOP_bind_ipi`; sending is `EVTCHNOP_send` on the target's port.
//! Natively it is the local APIC's interrupt command register with
//! [`RESCHED_VECTOR`].
//!
//! Invariant: an IPI only ever asks its target to look at shared state
//! (the run queue, a shootdown request); losing or duplicating one delays
//! that look until the target's next tick, never breaks it.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::{apic, percpu, platform, sched};

/// Vector of the reschedule IPI (native).
pub const RESCHED_VECTOR: u8 = 0xfd;

static SENT: AtomicU64 = AtomicU64::new(0);
static RECEIVED: AtomicU64 = AtomicU64::new(0);

/// Sends the reschedule IPI to `cpu`.
pub fn send_resched(cpu: usize) {
    let Some(target) = percpu::cpu(cpu) else {
        return;
    };
    if !target.online.load(Ordering::Acquire) {
        return;
    }
    SENT.fetch_add(1, Ordering::Relaxed);
    target.resched_ipis_sent.fetch_add(1, Ordering::Relaxed);
    if platform::is_xen_pv() {
        let port = target.ipi_port.load(Ordering::Acquire);
        if port != u32::MAX {
            // SAFETY: PV; `port` is an IPI port we bound for that vCPU.
            if let Err(e) = unsafe { hypercall::ops::evtchn_send(port) } {
                log::warn!("IPI to cpu {cpu} (port {port}) failed: {e}");
            }
        }
    } else {
        apic::send_ipi(target.apic_id.load(Ordering::Acquire), RESCHED_VECTOR);
    }
}

/// The reschedule IPI arrived (interrupts off).
pub fn on_resched() {
    RECEIVED.fetch_add(1, Ordering::Relaxed);
    // SAFETY: an interrupt handler: interrupts are off.
    unsafe { percpu::this_cpu_irqs_off() }
        .resched_ipis
        .fetch_add(1, Ordering::Relaxed);
    sched::resched_ipi();
}

/// IPIs sent and received since boot.
pub fn counts() -> (u64, u64) {
    (
        SENT.load(Ordering::Relaxed),
        RECEIVED.load(Ordering::Relaxed),
    )
}
