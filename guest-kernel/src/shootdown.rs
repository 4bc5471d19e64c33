//! Native cross-CPU TLB shootdown, behind pvmmu's `Tlb` hook.
//!
//! pvmmu's native backend calls [`ShootdownTlb::flush_page`] /
//! [`ShootdownTlb::flush_all`] after it changed a live entry. This flushes
//! the local TLB, then, when other CPUs are online, publishes one request
//! (an address, "everything", or — after a caching change above CPA's
//! clflush limit — "wbinvd") with a new generation number, sends the
//! shootdown IPI to every other online CPU, and waits until each has
//! acknowledged that generation (its handler flushes, then stores the
//! generation). The wait is bounded: a CPU that does not answer within
//! [`ACK_TIMEOUT_NS`] is counted and reported, never waited for forever.
//!
//! The targets are the CPUs in the kernel space's mask
//! ([`crate::kspace::ACTIVE`], read after the table change with a full
//! fence) that are online; a CPU marks itself online and then flushes its
//! whole TLB, so one that was skipped as offline holds nothing stale.
//!
//! Under Xen PV none of this runs: pvmmu's PV backend asks Xen for
//! `MMUEXT_INVLPG_MULTI` / `MMUEXT_TLB_FLUSH_MULTI` with that mask and Xen
//! does the IPIs.
//!
//! The request/acknowledge protocol itself is `pvmmu::shootdown`, which is
//! model-checked with loom on the host; this file sends the IPIs, flushes,
//! and bounds the wait with the clock.
//!
//! Invariant: one request is in flight at a time; the initiator waits with
//! interrupts on, so a CPU spinning to start its own request still answers
//! the one in flight; and an entry's old translation is gone from every
//! online CPU when `flush_page` returns (or a timeout was counted).

use core::sync::atomic::{AtomicU64, Ordering};

use pvmmu::backend::Tlb;
use pvmmu::shootdown::Shootdown;
use pvmmu::Pfn;

use crate::percpu::{self, MAX_CPUS};
use crate::{apic, clock};

/// Vector of the shootdown IPI.
pub const SHOOTDOWN_VECTOR: u8 = 0xfc;
/// How long an initiator waits for every acknowledgement. (500 ms timed
/// out twice in a native 4-CPU boot on a host at load 13, where TCG's vCPU
/// threads go unscheduled that long; a lost IPI or a deadlock still shows.)
pub const ACK_TIMEOUT_NS: u64 = 5_000_000_000;

/// "Flush everything" as the request word.
const ALL: u64 = u64::MAX;
/// "Write back and invalidate the caches" (`wbinvd`) as the request word
/// (not page aligned, so never a page's address).
const WBINVD: u64 = u64::MAX - 1;

/// The protocol (pvmmu's, model-checked with loom): one request at a time,
/// generation-numbered acknowledgements.
static PROTOCOL: Shootdown<MAX_CPUS> = Shootdown::new();

static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);
static IPIS: AtomicU64 = AtomicU64::new(0);
static TIMEOUTS: AtomicU64 = AtomicU64::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);
static WBINVDS: AtomicU64 = AtomicU64::new(0);

/// `wbinvd` requests this CPU and the others served from the IPI.
pub fn remote_wbinvds() -> u64 {
    WBINVDS.load(Ordering::Relaxed)
}

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
    fn flush_cache_range(&mut self, va: u64, pages: u64) {
        // clflush reaches every cache of the coherence domain: no IPI.
        // SAFETY: ring 0 natively (the only place this type is used).
        let mut local = unsafe { pvmmu::backend::CpuTlb::new() };
        local.flush_cache_range(va, pages);
    }
    fn flush_cache_all(&mut self) {
        // wbinvd acts on this CPU's caches only: every other CPU runs it
        // from the shootdown IPI too.
        // SAFETY: ring 0 natively (the only place this type is used).
        let mut local = unsafe { pvmmu::backend::CpuTlb::new() };
        local.flush_cache_all();
        remote(WBINVD);
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
    // Interrupts stay on while we wait (for the protocol and for the
    // answers): another initiator's request to us is served by our own IPI
    // handler meanwhile, so `serve` has nothing to do.
    let _p = crate::sched::preempt_disable();
    let me = percpu::cpu_id();
    let active = crate::kspace::ACTIVE.snapshot();
    let mut targets = [0usize; MAX_CPUS];
    let mut n = 0;
    for cpu in 0..MAX_CPUS {
        if cpu != me && active & (1 << cpu) != 0 && percpu::CPUS[cpu].online.load(Ordering::SeqCst)
        {
            targets[n] = cpu;
            n += 1;
        }
    }
    SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
    let end = clock::now_ns() + ACK_TIMEOUT_NS;
    let result = PROTOCOL.initiate(
        &targets[..n],
        va,
        |cpu| {
            IPIS.fetch_add(1, Ordering::Relaxed);
            apic::send_ipi(
                percpu::CPUS[cpu].apic_id.load(Ordering::Acquire),
                SHOOTDOWN_VECTOR,
            );
        },
        || {},
        || clock::now_ns() <= end,
    );
    if let Err(t) = result {
        TIMEOUTS.fetch_add(1, Ordering::Relaxed);
        log::error!(
            "TLB shootdown: cpu {} did not acknowledge generation {}",
            t.cpu,
            t.generation
        );
    }
}

/// The shootdown IPI (interrupts off).
pub fn on_ipi() {
    let handled = PROTOCOL.handle(percpu::cpu_id(), |va| match va {
        ALL => x86_64::instructions::tlb::flush_all(),
        WBINVD => {
            // SAFETY: ring 0 natively (the shootdown runs only there).
            let mut local = unsafe { pvmmu::backend::CpuTlb::new() };
            local.flush_cache_all();
            WBINVDS.fetch_add(1, Ordering::Relaxed);
        }
        va => x86_64::instructions::tlb::flush(x86_64::VirtAddr::new_truncate(va)),
    });
    if handled {
        HANDLED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves a request addressed to this CPU that its IPI has not served
/// yet, from code that waits with interrupts off (natively only).
pub fn poll() {
    // `handle` does nothing when this CPU has acknowledged the latest.
    on_ipi();
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
