//! The tick: a one-shot timer re-armed at absolute deadlines
//! [`TICK_NS`] apart, so the rate does not drift with handler latency.
//!
//! Under Xen PV it is `VIRQ_TIMER`, bound to an event channel, armed with
//! `VCPUOP_set_singleshot_timer` in Xen system time (the periodic timer is
//! stopped). Natively it is the local APIC timer in one-shot mode on
//! [`apic::TIMER_VECTOR`]. Each tick counts, runs the test hook, wakes
//! sleepers and may ask the scheduler for a switch, which happens when the
//! dispatcher leaves the outermost handler.
//!
//! Invariant: exactly one deadline is armed while the timer runs; a deadline
//! found in the past is moved to one tick from now (the missed ticks are
//! counted, not replayed).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hypercall::XenError;

use crate::apic::{self, ApicError, ApicInfo};
use crate::events::{self, EventError};
use crate::xen_pv::PvBoot;
use crate::{clock, sched};

/// Tick period (the default; [`set_period_ns`] changes it for a while).
pub const TICK_NS: u64 = 1_000_000;
/// Shortest period [`set_period_ns`] accepts.
pub const MIN_PERIOD_NS: u64 = 50_000;

/// The period in force: each CPU's next deadline is its last one plus this.
static PERIOD_NS: AtomicU64 = AtomicU64::new(TICK_NS);

/// Ticks on all CPUs.
static TICKS: AtomicU64 = AtomicU64::new(0);
static MISSED: AtomicU64 = AtomicU64::new(0);
/// Ticks that ran before their deadline (beyond [`EARLY_SLACK_NS`]).
static EARLY: AtomicU64 = AtomicU64::new(0);
/// The most a tick ran before its deadline, ns.
static EARLY_MAX_NS: AtomicU64 = AtomicU64::new(0);
/// Sum and maximum of how late ticks ran after their deadline.
static LATE_SUM_NS: AtomicU64 = AtomicU64::new(0);
static LATE_MAX_NS: AtomicU64 = AtomicU64::new(0);

/// How early a tick may look (clock read vs. the timer's own time base,
/// APIC calibration error) before it counts as early.
pub const EARLY_SLACK_NS: u64 = 50_000;

/// The slack in force: [`EARLY_SLACK_NS`], or one tick more under Xen PV
/// with several vCPUs and a TSC Xen does not call stable. There each vCPU
/// reads its own pvclock record and Xen fires timers in its per-CPU time;
/// under TCG those drift apart by up to about a millisecond between Xen's
/// calibrations (measured: ticks up to 999 us early in an `xl` domU with
/// 2 vCPUs; never with 1).
pub fn early_slack_ns() -> u64 {
    let skewed =
        PV.load(Ordering::Relaxed) && crate::percpu::online_count() > 1 && !clock::pv_tsc_stable();
    if skewed {
        EARLY_SLACK_NS + TICK_NS
    } else {
        EARLY_SLACK_NS
    }
}
static RUNNING: AtomicBool = AtomicBool::new(false);
static PV: AtomicBool = AtomicBool::new(false);
/// A hook run by every tick (tests: faults inside the handler).
static HOOK: spin::Mutex<Option<fn()>> = spin::Mutex::new(None);

/// Why the timer could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerError {
    /// Event-channel setup (PV).
    Events(EventError),
    /// The APIC (native).
    Apic(ApicError),
    /// Xen refused the one-shot timer.
    Arm(XenError),
    /// No way to know the TSC frequency.
    Clock(clock::ClockError),
}

/// What drives the tick.
#[derive(Debug, Clone, Copy)]
pub enum TimerSource {
    /// `VIRQ_TIMER` on this event-channel port.
    XenVirq {
        /// The port.
        port: u32,
    },
    /// The local APIC timer.
    Apic(ApicInfo),
}

impl core::fmt::Display for TimerSource {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TimerSource::XenVirq { port } => write!(f, "Xen VIRQ_TIMER on event channel {port}"),
            TimerSource::Apic(a) => write!(
                f,
                "local APIC {} (id {}), timer {} Hz",
                if a.x2apic { "x2APIC" } else { "xAPIC MMIO" },
                a.id,
                a.timer_hz
            ),
        }
    }
}

/// Starts the tick under Xen PV: events, the timer VIRQ, the first deadline.
pub fn init_pv(pv: &PvBoot) -> Result<TimerSource, TimerError> {
    events::init(pv).map_err(TimerError::Events)?;
    PV.store(true, Ordering::Relaxed);
    start_pv_cpu(0)
}

/// Binds this vCPU's `VIRQ_TIMER` and reschedule IPI and arms its first
/// deadline (every vCPU, on itself).
pub fn start_pv_cpu(cpu: usize) -> Result<TimerSource, TimerError> {
    let vcpu = cpu as u32;
    let port = events::bind_virq(hypercall::abi::VIRQ_TIMER, vcpu, |_| on_tick())
        .map_err(TimerError::Events)?;
    let ipi = events::bind_ipi(vcpu, |_| crate::ipi::on_resched()).map_err(TimerError::Events)?;
    let pc = &crate::percpu::CPUS[cpu];
    pc.timer_port.store(port, Ordering::Release);
    pc.ipi_port.store(ipi, Ordering::Release);
    start()?;
    Ok(TimerSource::XenVirq { port })
}

/// Starts this application processor's APIC timer.
pub fn start_native_cpu() -> Result<TimerSource, TimerError> {
    let info = apic::init_ap().map_err(TimerError::Apic)?;
    crate::percpu::with_irqs_off(|pc| pc.apic_id.store(info.id, Ordering::Release));
    start()?;
    Ok(TimerSource::Apic(info))
}

/// Starts the tick natively: TSC calibration, the APIC, the first deadline.
pub fn init_native() -> Result<TimerSource, TimerError> {
    let (hz, source) = clock::init_native().map_err(TimerError::Clock)?;
    log::info!("TSC {hz} Hz ({source:?})");
    let info = apic::init().map_err(TimerError::Apic)?;
    crate::percpu::with_irqs_off(|pc| pc.apic_id.store(info.id, Ordering::Release));
    start()?;
    Ok(TimerSource::Apic(info))
}

fn start() -> Result<(), TimerError> {
    let first = clock::now_ns() + TICK_NS;
    crate::percpu::with_irqs_off(|pc| pc.deadline.store(first, Ordering::Relaxed));
    RUNNING.store(true, Ordering::Relaxed);
    arm(first)
}

fn arm(deadline: u64) -> Result<(), TimerError> {
    if PV.load(Ordering::Relaxed) {
        let vcpu = crate::percpu::cpu_id() as u32;
        // SAFETY: PV; a vCPU arms its own timer. Not `future`: a deadline
        // that passed while we computed it fires at once rather than failing.
        unsafe { hypercall::ops::vcpu_set_singleshot_timer(vcpu, deadline, false) }
            .map_err(TimerError::Arm)
    } else {
        apic::arm_oneshot(deadline.saturating_sub(clock::now_ns()));
        Ok(())
    }
}

/// The timer interrupt (interrupts off, inside the dispatcher).
pub fn on_tick() {
    if !RUNNING.load(Ordering::Relaxed) {
        return;
    }
    TICKS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the tick runs in the interrupt handler, interrupts off.
    let pc = unsafe { crate::percpu::this_cpu_irqs_off() };
    pc.ticks.fetch_add(1, Ordering::Relaxed);
    let hook = *HOOK.lock();
    if let Some(h) = hook {
        h();
    }
    let now = clock::now_ns();
    let due = pc.deadline.load(Ordering::Relaxed);
    if now + early_slack_ns() < due {
        EARLY.fetch_add(1, Ordering::Relaxed);
    }
    EARLY_MAX_NS.fetch_max(due.saturating_sub(now), Ordering::Relaxed);
    let late = now.saturating_sub(due);
    LATE_SUM_NS.fetch_add(late, Ordering::Relaxed);
    LATE_MAX_NS.fetch_max(late, Ordering::Relaxed);
    let period = period_ns();
    let mut next = due + period;
    if next <= now {
        MISSED.fetch_add((now - next) / period + 1, Ordering::Relaxed);
        next = now + period;
    }
    pc.deadline.store(next, Ordering::Relaxed);
    if let Err(e) = arm(next) {
        panic!("cannot re-arm the timer: {e:?}");
    }
    sched::tick(now);
}

/// The tick period in force, ns.
pub fn period_ns() -> u64 {
    PERIOD_NS.load(Ordering::Relaxed)
}

/// Sets the tick period (at least [`MIN_PERIOD_NS`]); each CPU switches
/// at its next tick. A test that shortens it puts [`TICK_NS`] back.
pub fn set_period_ns(ns: u64) {
    PERIOD_NS.store(ns.max(MIN_PERIOD_NS), Ordering::Relaxed);
}

/// Ticks taken since start.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// Deadlines that had already passed when the tick re-armed.
pub fn missed() -> u64 {
    MISSED.load(Ordering::Relaxed)
}

/// Deadlines consumed: ticks taken plus deadlines skipped because the
/// CPU (or, under TCG, the emulator) was too slow to take them.
pub fn deadlines() -> u64 {
    ticks() + missed()
}

/// Ticks that ran before their deadline.
pub fn early() -> u64 {
    EARLY.load(Ordering::Relaxed)
}

/// The most any tick ran before its deadline, ns.
pub fn early_max_ns() -> u64 {
    EARLY_MAX_NS.load(Ordering::Relaxed)
}

/// Total and maximum lateness of ticks, ns.
pub fn lateness_ns() -> (u64, u64) {
    (
        LATE_SUM_NS.load(Ordering::Relaxed),
        LATE_MAX_NS.load(Ordering::Relaxed),
    )
}

/// This CPU's timer event-channel port under PV (a snapshot).
pub fn pv_port() -> Option<u32> {
    let port = crate::percpu::CPUS[crate::percpu::cpu_id()]
        .timer_port
        .load(Ordering::Relaxed);
    (PV.load(Ordering::Relaxed) && port != u32::MAX).then_some(port)
}

/// Installs (or clears) the per-tick hook.
pub fn set_hook(hook: Option<fn()>) {
    let _g = crate::irq::save();
    *HOOK.lock() = hook;
}
