//! Starts the running kernel once the direct map is live: the kernel's own
//! address space and frame pool (and, with `pvmmu.debug_pagealloc`,
//! DEBUG_PAGEALLOC on top of it; both already up when the boot started
//! them early for DEBUG_PAGEALLOC, [`start_kspace`]), the scheduler (the boot code becomes
//! thread "main", plus an idle thread), the tick (Xen events and
//! `VIRQ_TIMER` under PV, the local APIC natively), then interrupts on.
//!
//! Invariant: after [`start`] returns `Ok`, interrupts are enabled, the
//! timer is armed, and the caller runs as thread "main".

use crate::kspace::{self, KspaceError};
use crate::sched::{self, SchedError};
use crate::timer::{self, TimerError, TimerSource};
use crate::{irq, Kernel};

/// Why the running kernel could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartError {
    /// The kernel address space or its pool.
    Kspace(KspaceError),
    /// The scheduler.
    Sched(SchedError),
    /// The timer or its interrupt source.
    Timer(TimerError),
}

/// What [`start`] set up.
#[derive(Debug, Clone, Copy)]
pub struct Running {
    /// The tick's source.
    pub timer: TimerSource,
}

/// The kernel address space (kspace, with its CPA) over the live tree,
/// the kernel's static protections, and with `pvmmu.debug_pagealloc`
/// DEBUG_PAGEALLOC on top of it. Needs only the direct map: the boot
/// calls it right after the bootstrap when DEBUG_PAGEALLOC is asked for
/// (so the direct-map and pvmmu suites run under it), else [`start`] does.
/// Runs once; a second call does nothing.
pub fn start_kspace(kernel: &mut Kernel) -> Result<(), KspaceError> {
    if kspace::pool_free().is_some() {
        return Ok(());
    }
    kspace::init(kernel)?;
    kspace::protect_kernel(kernel)?;
    if kernel.options.debug_pagealloc {
        let on = crate::pagealloc::enable(kernel)?;
        log::info!(
            "debug_pagealloc: direct map split to 4 KiB ({} splits), {} free frames in {} \
             ranges unmapped",
            on.splits,
            on.unmapped,
            on.ranges
        );
    }
    Ok(())
}

/// See the module docs.
pub fn start(kernel: &mut Kernel) -> Result<Running, StartError> {
    crate::percpu::CPUS[0]
        .online
        .store(true, core::sync::atomic::Ordering::Release);
    start_kspace(kernel).map_err(StartError::Kspace)?;
    sched::init().map_err(StartError::Sched)?;
    crate::lazy::init().map_err(StartError::Sched)?;
    let source = match kernel.pv.as_ref() {
        Some(pv) => timer::init_pv(pv),
        None => timer::init_native(),
    }
    .map_err(StartError::Timer)?;
    irq::enable();
    Ok(Running { timer: source })
}
