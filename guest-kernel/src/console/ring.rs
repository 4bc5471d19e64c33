//! The PV console ring of a Xen domU (`struct xencons_interface`), shared
//! with the console backend (xenconsoled) and signalled by an event channel.
//!
//! Layout of the shared page: `in[1024]`, `out[2048]`, then the 32-bit
//! indices `in_cons`, `in_prod`, `out_cons`, `out_prod`. The guest produces
//! into `out` and owns `out_prod`; the backend owns `out_cons`.
//!
//! Invariant: `out_prod - out_cons` never exceeds the ring size; the bytes
//! of `out` are stored before `out_prod` is advanced (release ordering), and
//! `out_cons` is read with acquire ordering before a slot is reused.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};

/// Size of the output ring in bytes.
const OUT_SIZE: u32 = 2048;
/// Offset of `out` in the page.
const OUT_OFFSET: usize = 1024;
/// Offset of `out_cons`.
const OUT_CONS_OFFSET: usize = 3080;
/// Offset of `out_prod`.
const OUT_PROD_OFFSET: usize = 3084;
/// How many yields `flush` waits for the backend before giving up.
const FLUSH_YIELDS: u32 = 20_000;

/// Writer side of the PV console ring.
#[derive(Debug)]
pub struct RingConsole {
    page: NonNull<u8>,
    port: u32,
}

// SAFETY: the ring page is only touched through `&mut self` (behind the
// console lock) and through atomics shared with the backend.
unsafe impl Send for RingConsole {}

impl RingConsole {
    /// A console on the ring page mapped at `page`, notified via `port`.
    ///
    /// # Safety
    /// `page` must be the writable mapping of the console page named in
    /// `start_info.console.domU` (PV) or `HVM_PARAM_CONSOLE_PFN` (PVH),
    /// mapped for as long as the console is used, and hypercalls must work
    /// (PV, or PVH with the hypercall page installed): notification is one.
    pub unsafe fn new(page: NonNull<u8>, port: u32) -> Self {
        RingConsole { page, port }
    }

    fn index(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: `offset` is one of the aligned index offsets inside the
        // 4 KiB page `new`'s contract keeps mapped; the backend accesses the
        // same words, so they are only ever used atomically here.
        unsafe { AtomicU32::from_ptr(self.page.as_ptr().add(offset).cast::<u32>()) }
    }

    fn notify(&self) {
        // SAFETY: `new`'s contract: hypercalls work. A failed send only
        // delays output until the backend polls.
        let _ = unsafe { hypercall::ops::evtchn_send(self.port) };
    }

    fn wait(&self) {
        self.notify();
        // SAFETY: hypercalls work (see `new`).
        let _ = unsafe { hypercall::ops::sched_yield() };
    }

    fn put_slice(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let prod = self.index(OUT_PROD_OFFSET).load(Ordering::Relaxed);
            let cons = self.index(OUT_CONS_OFFSET).load(Ordering::Acquire);
            let used = prod.wrapping_sub(cons);
            if used >= OUT_SIZE {
                self.wait();
                continue;
            }
            let n = (OUT_SIZE - used).min(bytes.len() as u32);
            for i in 0..n {
                let slot = OUT_OFFSET + (prod.wrapping_add(i) % OUT_SIZE) as usize;
                // SAFETY: `slot` lies in `out`, inside the mapped page, in a
                // slot the backend has consumed (used < OUT_SIZE).
                unsafe {
                    self.page
                        .as_ptr()
                        .add(slot)
                        .write_volatile(bytes[i as usize])
                };
            }
            // Release: the bytes above are visible before the new index.
            self.index(OUT_PROD_OFFSET)
                .store(prod.wrapping_add(n), Ordering::Release);
            bytes = &bytes[n as usize..];
        }
    }
}

impl super::ConsoleSink for RingConsole {
    fn write_bytes(&mut self, bytes: &[u8]) {
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            match line.split_last() {
                Some((b'\n', head)) => {
                    self.put_slice(head);
                    self.put_slice(b"\r\n");
                }
                _ => self.put_slice(line),
            }
        }
        // One notification per completed line, not per formatted fragment
        // (a `kprintln!` writes several): the backend prints whole lines
        // anyway, a full ring notifies while it waits, and `flush` notifies
        // whatever is left before shutdown.
        if bytes.contains(&b'\n') {
            self.notify();
        }
    }

    fn flush(&mut self) {
        for _ in 0..FLUSH_YIELDS {
            let prod = self.index(OUT_PROD_OFFSET).load(Ordering::Relaxed);
            if self.index(OUT_CONS_OFFSET).load(Ordering::Acquire) == prod {
                return;
            }
            self.wait();
        }
    }
}
