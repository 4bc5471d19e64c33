//! One boot of the guest kernel in a given mode, under the harness.
//!
//! Invariant: `cargo xtask run` and every row of `cargo xtask test` boot
//! through [`boot`], so the same QEMU command lines and the same verdict logic
//! serve both; only the echo mode and the label differ.

use crate::cli::{self, Mode, RunOptions, UsageError};
use crate::error::XtaskError;
use crate::harness::{self, Outcome};
use crate::qemu;
use crate::request::BootRequest;
use crate::workspace::Workspace;
use crate::xen;
use crate::xl;

/// Checks a run before anything is built: its options against each other,
/// then what it needs against the host's available memory.
pub fn validate(options: &RunOptions, available_mib: Option<u64>) -> Result<(), UsageError> {
    cli::validate_run(options)?;
    qemu::check_host_memory(options, available_mib)
}

/// Boots `request.kernel` in the requested mode and returns the outcome.
pub fn boot(ws: &Workspace, request: &BootRequest) -> Result<Outcome, XtaskError> {
    match request.options.mode {
        Mode::Native => {
            qemu::ensure_installed()?;
            let args = qemu::native_args(&request.kernel, &request.options);
            harness::boot(&request.spec(ws, args))
        }
        Mode::Xen => {
            qemu::ensure_installed()?;
            let xen_elf = xen::ensure_cached(ws, request.options.xen)?;
            let args = qemu::xen_args(&xen_elf, &request.kernel, &request.options)?;
            harness::boot(&request.spec(ws, args))
        }
        Mode::Xl => xl::run(ws, request),
    }
}
