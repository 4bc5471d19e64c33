//! Native cross-CPU TLB shootdown, behind pvmmu's `Tlb` hook.
//!
//! pvmmu's native backend calls [`ShootdownTlb::flush_page`] /
//! [`ShootdownTlb::flush_all`] after it changed a live entry. This flushes
//! the local TLB, then, when other CPUs are online, publishes one request
//! (an address, or "everything") with a new generation number, sends the
//! shootdown IPI to every other online CPU, and waits until each has
//! acknowledged that generation (its handler flushes, then stores the
//! generation). The wait is bounded: a CPU that does not answer within
//! [`ACK_TIMEOUT_NS`] is counted and reported, never waited for forever.
//!
//! Under Xen PV none of this runs: pvmmu's PV backend asks Xen for
//! `MMUEXT_INVLPG_ALL` / `MMUEXT_TLB_FLUSH_ALL` and Xen does the IPIs.
//!
//! Invariant: one request is in flight at a time (the initiator lock); the
//! initiator holds it with interrupts on, so a CPU spinning for it still
//! answers the request in flight; and an entry's old translation is gone
//! from every online CPU when `flush_page` returns (or a timeout was
//! counted).

use core::sync::atomic::{AtomicU64, Ordering};

use pvmmu::backend::Tlb;
use pvmmu::Pfn;

use crate::percpu::{self, MAX_CPUS};
use crate::{apic, clock};

/// Vector of the shootdown IPI.
pub const SHOOTDOWN_VECTOR: u8 = 0xfc;
/// How long an initiator waits for every acknowledgement.
pub const ACK_TIMEOUT_NS: u64 = 500_000_000;

/// "Flush everything" in [`REQ_VA`].
const ALL: u64 = u64::MAX;

static INITIATOR: spin::Mutex<()> = spin::Mutex::new(());
static GENERATION: AtomicU64 = AtomicU64::new(0);
static REQ_VA: AtomicU64 = AtomicU64::new(0);
static ACKED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);
static IPIS: AtomicU64 = AtomicU64::new(0);
static TIMEOUTS: AtomicU64 = AtomicU64::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);

/// pvmmu's TLB hook for the live tree natively: local flush plus remote
/// shootdown.
#[derive(Debug, Default)]
pub struct ShootdownTlb;

impl Tlb for ShootdownTlb {
    fn flush_page(&mut self, va: u64) {
        x86_64::instructions::tlb::flush(x86_64::VirtAddr::new_truncate(va));
        remote(va);
    }
    fn flush_all(&mut self) {
        x86_64::instructions::tlb::flush_all();
        remote(ALL);
    }
    unsafe fn load_root(&mut self, root: Pfn) {
        // SAFETY: ring 0 natively (the only place this type is used); the
        // rest is the caller's contract, per `Tlb::load_root`.
        unsafe {
            let mut local = pvmmu::backend::CpuTlb::new();
            local.load_root(root);
        }
    }
}

/// Asks every other online CPU to flush `va` (or everything), and waits.
fn remote(va: u64) {
    if percpu::online_count() <= 1 {
        return;
    }
    // Interrupts stay on while we wait for the lock and for the answers:
    // another initiator's request to us must still be served.
    let _one = INITIATOR.lock();
    let _p = crate::sched::preempt_disable();
    let me = percpu::cpu_id();
    // The address first, then the generation that publishes it: a handler
    // that sees the new generation sees its address.
    let gen = GENERATION.load(Ordering::SeqCst) + 1;
    REQ_VA.store(va, Ordering::SeqCst);
    GENERATION.store(gen, Ordering::SeqCst);
    let mut targets = [false; MAX_CPUS];
    for (cpu, t) in targets.iter_mut().enumerate() {
        if cpu != me && percpu::CPUS[cpu].online.load(Ordering::Acquire) {
            *t = true;
            IPIS.fetch_add(1, Ordering::Relaxed);
            apic::send_ipi(
                percpu::CPUS[cpu].apic_id.load(Ordering::Acquire),
                SHOOTDOWN_VECTOR,
            );
        }
    }
    SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
    let end = clock::now_ns() + ACK_TIMEOUT_NS;
    for (cpu, _) in targets.iter().enumerate().filter(|(_, t)| **t) {
        while ACKED[cpu].load(Ordering::Acquire) < gen {
            if clock::now_ns() > end {
                TIMEOUTS.fetch_add(1, Ordering::Relaxed);
                log::error!("TLB shootdown: cpu {cpu} did not acknowledge generation {gen}");
                break;
            }
            core::hint::spin_loop();
        }
    }
}

/// The shootdown IPI (interrupts off).
pub fn on_ipi() {
    let gen = GENERATION.load(Ordering::SeqCst);
    let va = REQ_VA.load(Ordering::SeqCst);
    if va == ALL {
        x86_64::instructions::tlb::flush_all();
    } else {
        x86_64::instructions::tlb::flush(x86_64::VirtAddr::new_truncate(va));
    }
    HANDLED.fetch_add(1, Ordering::Relaxed);
    ACKED[percpu::cpu_id()].fetch_max(gen, Ordering::Release);
}

/// Counters: shootdowns initiated, IPIs sent, requests handled, timeouts.
pub fn counts() -> (u64, u64, u64, u64) {
    (
        SHOOTDOWNS.load(Ordering::Relaxed),
        IPIS.load(Ordering::Relaxed),
        HANDLED.load(Ordering::Relaxed),
        TIMEOUTS.load(Ordering::Relaxed),
    )
}
