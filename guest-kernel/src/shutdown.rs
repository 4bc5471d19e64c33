//! Ending the run: the verdict line, then power-off.
//!
//! Natively the kernel writes to QEMU's `isa-debug-exit` device (I/O port
//! 0xf4): QEMU exits with status `(value << 1) | 1`, so 0x10 -> 33 (pass) and
//! 0x11 -> 35 (fail). Under Xen PV, and under Xen PVH once the hypercall
//! page is installed, it asks Xen for `SCHEDOP_shutdown` (poweroff; crash if
//! Xen refuses).
//!
//! Invariant: the result line is printed, and the console flushed, before
//! any shutdown request; nothing returns from here.

use crate::platform::{self, Platform};

/// `isa-debug-exit` I/O port.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Value written on success.
pub const DEBUG_EXIT_PASS: u8 = 0x10;
/// Value written on failure.
pub const DEBUG_EXIT_FAIL: u8 = 0x11;

/// The outcome of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Everything passed.
    Pass,
    /// Something failed.
    Fail,
}

impl Verdict {
    /// The word on the result line.
    pub const fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
        }
    }
}

/// Prints `PVMMU-RESULT <verdict>` and powers off.
pub fn finish(verdict: Verdict) -> ! {
    crate::kprintln!("PVMMU-RESULT {}", verdict.word());
    power_off(verdict)
}

/// Flushes the console and powers off without printing.
pub fn power_off(verdict: Verdict) -> ! {
    crate::console::flush();
    match platform::get() {
        Some(Platform::XenPv) => xen_shutdown(),
        Some(Platform::XenPvh) if hypercall::raw::hypercall_page().is_some() => xen_shutdown(),
        _ => native_exit(verdict),
    }
}

fn xen_shutdown() -> ! {
    use hypercall::ops::{shutdown, ShutdownReason};
    // SAFETY: Xen PV (recorded by the PV entry), or Xen PVH with its
    // hypercall page installed (checked by the caller).
    let err = unsafe { shutdown(ShutdownReason::Poweroff) };
    crate::kprintln!("SCHEDOP_shutdown(poweroff) returned {err}; crashing");
    // SAFETY: as above.
    let _ = unsafe { shutdown(ShutdownReason::Crash) };
    loop {
        core::hint::spin_loop();
    }
}

fn native_exit(verdict: Verdict) -> ! {
    let code = match verdict {
        Verdict::Pass => DEBUG_EXIT_PASS,
        Verdict::Fail => DEBUG_EXIT_FAIL,
    };
    // SAFETY: natively port 0xf4 is QEMU's isa-debug-exit (or nothing, on a
    // machine without it, where the write is ignored).
    unsafe { x86_64::instructions::port::Port::new(DEBUG_EXIT_PORT).write(code) };
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
