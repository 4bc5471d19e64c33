//! The kernel console: one output sink chosen at boot, a `log` logger and
//! the `kprint!`/`kprintln!` macros on top of it.
//!
//! Sinks: [`serial::Com1`] natively, Xen's `console_io` hypercall as a PV
//! dom0 ([`XenConsoleIo`]), and the PV console ring of a domU or a PVH
//! guest ([`ring::RingConsole`]).
//!
//! Invariant: all output goes through the single [`CONSOLE`] lock, so lines
//! from different paths never interleave mid-line; the panic path may break
//! the lock (one CPU, nothing else runs once it panics).

pub mod ring;
pub mod serial;

use core::fmt::{self, Write};

use spin::Mutex;

/// Something bytes can be written to.
pub trait ConsoleSink {
    /// Writes all of `bytes` (blocking until the sink took them).
    fn write_bytes(&mut self, bytes: &[u8]);
    /// Waits until everything written so far has left the guest (ring
    /// consumed, UART shift register empty). Called before shutdown.
    fn flush(&mut self) {}
}

/// Xen's emergency console: `console_io(CONSOLEIO_write)`, usable by dom0
/// (and by any domain on a debug hypervisor).
#[derive(Debug)]
pub struct XenConsoleIo;

impl ConsoleSink for XenConsoleIo {
    fn write_bytes(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // SAFETY: this sink is only installed by the PV entry path.
            match unsafe { hypercall::ops::console_write(bytes) } {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes = &bytes[n.min(bytes.len())..],
            }
        }
    }
}

/// The active console.
#[derive(Debug)]
pub enum Console {
    /// Nothing yet (output is dropped).
    None,
    /// COM1 16550 UART (native, PVH).
    Serial(serial::Com1),
    /// Xen `console_io` (PV dom0).
    XenConsoleIo(XenConsoleIo),
    /// PV console ring + event channel (PV domU, Xen PVH).
    Ring(ring::RingConsole),
}

impl Console {
    /// Short name of the sink, for the boot log.
    pub fn name(&self) -> &'static str {
        match self {
            Console::None => "none",
            Console::Serial(_) => "com1",
            Console::XenConsoleIo(_) => "xen-console-io",
            Console::Ring(_) => "xen-pv-ring",
        }
    }
}

impl ConsoleSink for Console {
    fn write_bytes(&mut self, bytes: &[u8]) {
        match self {
            Console::None => {}
            Console::Serial(s) => s.write_bytes(bytes),
            Console::XenConsoleIo(x) => x.write_bytes(bytes),
            Console::Ring(r) => r.write_bytes(bytes),
        }
    }
    fn flush(&mut self) {
        match self {
            Console::None => {}
            Console::Serial(s) => s.flush(),
            Console::XenConsoleIo(x) => x.flush(),
            Console::Ring(r) => r.flush(),
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// The kernel console.
pub static CONSOLE: Mutex<Console> = Mutex::new(Console::None);

/// Installs `console` as the output sink and the `log` logger.
pub fn init(console: Console) {
    *CONSOLE.lock() = console;
    // A second call finds the logger set; the sink has still been replaced.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// Name of the active sink.
pub fn name() -> &'static str {
    CONSOLE.lock().name()
}

/// Writes formatted output (used by the print macros). The lock is held
/// with interrupts off, so an interrupt handler that prints never spins on
/// a lock its own CPU holds, and a thread is never preempted mid-line.
pub fn print(args: fmt::Arguments<'_>) {
    let _irq = crate::irq::save();
    let _ = CONSOLE.lock().write_fmt(args);
}

/// Waits until all output has left the guest.
pub fn flush() {
    let _irq = crate::irq::save();
    CONSOLE.lock().flush();
}

/// Makes the console usable from the panic and trap paths even if the code
/// that was interrupted held the lock.
///
/// # Safety
/// Only on the single CPU, from a path that never returns to the
/// interrupted lock holder.
pub unsafe fn break_lock() {
    if CONSOLE.is_locked() {
        // SAFETY: the caller guarantees the holder never runs again.
        unsafe { CONSOLE.force_unlock() };
    }
}

/// `print!` to the kernel console.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// `println!` to the kernel console.
#[macro_export]
macro_rules! kprintln {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// The `log` logger writing `[LEVEL] target: message` lines to the console.
struct KernelLogger;

static LOGGER: KernelLogger = KernelLogger;

impl log::Log for KernelLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            print(format_args!(
                "[{:5}] {}: {}\n",
                record.level(),
                record.target(),
                record.args()
            ));
        }
    }
    fn flush(&self) {
        flush();
    }
}
