//! Polled 16550 UART on COM1 (I/O port 0x3f8), 115200 baud, 8n1.
//!
//! Invariant: a byte is written to the transmit register only when the line
//! status says the holding register is empty, so no byte is dropped.

use x86_64::instructions::port::Port;

/// COM1's base I/O port.
const COM1: u16 = 0x3f8;
/// Line status: transmit holding register empty.
const LSR_THRE: u8 = 1 << 5;
/// Line status: transmitter idle (holding and shift registers empty).
const LSR_TEMT: u8 = 1 << 6;

/// The COM1 UART, initialised.
#[derive(Debug)]
pub struct Com1 {
    _private: (),
}

impl Com1 {
    /// Programs COM1 for 115200 8n1, FIFOs on, interrupts off.
    ///
    /// # Safety
    /// Only natively (or as an HVM/PVH guest) where port 0x3f8 is a 16550 or
    /// nothing; port I/O from a PV guest traps.
    pub unsafe fn init() -> Self {
        // SAFETY: the caller guarantees these ports are COM1's registers.
        unsafe {
            outb(COM1 + 1, 0x00); // interrupts off
            outb(COM1 + 3, 0x80); // DLAB on
            outb(COM1, 0x01); // divisor 1 = 115200 baud
            outb(COM1 + 1, 0x00);
            outb(COM1 + 3, 0x03); // 8 bits, no parity, 1 stop, DLAB off
            outb(COM1 + 2, 0xc7); // FIFOs on and cleared, 14-byte threshold
            outb(COM1 + 4, 0x03); // DTR | RTS
        }
        Com1 { _private: () }
    }

    fn line_status(&self) -> u8 {
        // SAFETY: `self` exists only after `init`, whose contract makes
        // these ports COM1's.
        unsafe { inb(COM1 + 5) }
    }

    fn put(&mut self, byte: u8) {
        // A missing UART reads 0xff, which also has THRE set: no hang.
        while self.line_status() & LSR_THRE == 0 {
            core::hint::spin_loop();
        }
        // SAFETY: as in `line_status`.
        unsafe { outb(COM1, byte) };
    }
}

impl super::ConsoleSink for Com1 {
    fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
    }
    fn flush(&mut self) {
        while self.line_status() & LSR_TEMT == 0 {
            core::hint::spin_loop();
        }
    }
}

/// # Safety
/// `port` must be a device register that accepts this write.
unsafe fn outb(port: u16, value: u8) {
    // SAFETY: forwarded to the caller.
    unsafe { Port::new(port).write(value) }
}

/// # Safety
/// `port` must be a device register that may be read.
unsafe fn inb(port: u16) -> u8 {
    // SAFETY: forwarded to the caller.
    unsafe { Port::new(port).read() }
}
