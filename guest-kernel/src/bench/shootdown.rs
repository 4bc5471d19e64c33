//! TLB shootdown (issue 10): what a change to the kernel's shared address
//! space costs when every CPU must drop the old translation.
//!
//! The change is a `set_memory_ro` of 1 or 512 pages of the direct map
//! ([`super::cpa::ro_round`]), made on CPU 0 while the other CPUs are
//! online and idle: natively pvmmu's flush reaches them through
//! [`crate::shootdown`] (1 page: one invlpg request; 512 pages, above the
//! invlpg threshold: one flush-everything request; either way one IPI per
//! other CPU and the wait for every acknowledgement); under Xen PV the
//! flush is one `mmuext_op` whose op reaches every vCPU, and Xen sends the
//! IPIs. The figure is named with the CPU count (`shootdown-1p-2cpu`); the
//! same call on one CPU is `set-memory-ro-1` / `set-memory-ro-512` of the
//! one-CPU bench boots.
//!
//! Hypercalls are counted on CPU 0 for its thread code only
//! ([`super::meter`]), so the idle CPUs' blocks and ticks are not in them:
//! under PV the shootdown must cost no hypercall beyond the 1-CPU call's.
//! Natively the shootdown counters must show one request per call, one
//! IPI per other CPU, and no timeout.

use crate::percpu;
use crate::selftest::{check, check_eq, TestResult};
use crate::shootdown as native_shootdown;
use crate::Kernel;

use super::cpa::{cpa_hypercalls, ro_cost};
use super::figure::REPS;

/// `shootdown-<PAGES>p-<n>cpu`.
pub fn shootdown<const PAGES: u64>(kernel: &mut Kernel) -> TestResult {
    let pv = kernel.pv.is_some();
    let cpus = percpu::online_count() as u64;
    check_eq(
        "CPUs online (all offered)",
        cpus,
        kernel.report.cpus_offered,
    )?;
    let (s0, ipis0, _, timeouts0) = native_shootdown::counts();
    let cost = ro_cost(kernel, PAGES)?;
    let (s1, ipis1, _, timeouts1) = native_shootdown::counts();
    check_eq("shootdown timeouts", timeouts1 - timeouts0, 0)?;
    if pv {
        check_eq("guest-side shootdowns under PV", s1 - s0, 0)?;
        cost.expect_hypercalls("shootdown hypercalls", cpa_hypercalls(PAGES))?;
    } else if cpus > 1 {
        // set_memory_ro and the untimed set_memory_rw: one request each.
        let calls = 2 * REPS as u64;
        if crate::pagealloc::enabled() {
            // Under DEBUG_PAGEALLOC the frames the runs borrow are also
            // unmapped when given back (outside the timed calls): one more
            // request per free, so only a lower bound here.
            check(s1 - s0 >= calls, "shootdown requests")?;
            check(ipis1 - ipis0 >= calls * (cpus - 1), "shootdown IPIs")?;
        } else {
            check_eq("shootdown requests", s1 - s0, calls)?;
            check_eq("shootdown IPIs", ipis1 - ipis0, calls * (cpus - 1))?;
        }
    }
    cost.report(pv, format_args!("shootdown-{PAGES}p-{cpus}cpu"), 1, "call")
}
