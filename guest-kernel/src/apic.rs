//! The local APIC (native and PVH): x2APIC through MSRs when CPUID offers
//! it, otherwise xAPIC MMIO mapped uncached through pvmmu's fixmap; the
//! legacy 8259 PICs masked; a spurious vector; EOI; and the APIC timer in
//! one-shot mode, calibrated against the (already calibrated) TSC clock.
//!
//! Invariant: after [`init`] the APIC is software-enabled, its timer is
//! masked until [`arm_oneshot`] is called, and every interrupt it delivers
//! to a vector here is acknowledged with [`eoi`] exactly once by the
//! dispatcher.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

use crate::clock;
use crate::kspace::{self, Fixmap, KspaceError};
use crate::platform;

/// Vector of the local timer.
pub const TIMER_VECTOR: u8 = 0xec;
/// Vector of the spurious interrupt.
pub const SPURIOUS_VECTOR: u8 = 0xff;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

/// Register offsets (xAPIC MMIO; x2APIC MSR = 0x800 + offset / 16).
mod reg {
    pub const ID: u32 = 0x20;
    pub const EOI: u32 = 0xb0;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const SVR: u32 = 0xf0;
    pub const LVT_TIMER: u32 = 0x320;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3e0;
}

const LVT_MASKED: u32 = 1 << 16;
/// Divide configuration "divide by 16".
const DIVIDE_16: u32 = 0b0011;

static X2APIC: AtomicBool = AtomicBool::new(false);
static MMIO: AtomicU64 = AtomicU64::new(0);
/// APIC timer ticks per second (after the divider).
static TIMER_HZ: AtomicU64 = AtomicU64::new(0);

/// Why the APIC could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicError {
    /// CPUID reports no local APIC.
    NoApic,
    /// The xAPIC page could not be mapped.
    Map(KspaceError),
    /// The timer did not count during calibration.
    TimerDead,
}

/// How the APIC is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicInfo {
    /// x2APIC (MSRs) rather than xAPIC (MMIO).
    pub x2apic: bool,
    /// The APIC id of this CPU.
    pub id: u32,
    /// Timer ticks per second after the divider.
    pub timer_hz: u64,
}

fn read(r: u32) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: x2APIC mode is on; 0x800 + r/16 is the register's MSR.
        unsafe { Msr::new(0x800 + r / 16).read() as u32 }
    } else {
        let base = MMIO.load(Ordering::Relaxed);
        // SAFETY: `base` maps the APIC page uncached (init); `r` is a
        // register offset inside it, 16-byte aligned.
        unsafe { core::ptr::read_volatile((base + u64::from(r)) as *const u32) }
    }
}

fn write(r: u32, v: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: as in `read`; writing a defined register.
        unsafe { Msr::new(0x800 + r / 16).write(u64::from(v)) }
    } else {
        let base = MMIO.load(Ordering::Relaxed);
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((base + u64::from(r)) as *mut u32, v) }
    }
}

/// Masks both 8259 PICs so that only the APIC delivers interrupts.
fn mask_pics() {
    // SAFETY: ring 0 (native/PVH); writing the PICs' interrupt mask
    // registers only masks their lines.
    unsafe {
        Port::<u8>::new(0x21).write(0xff);
        Port::<u8>::new(0xa1).write(0xff);
    }
}

/// Enables this CPU's APIC, masks its timer and calibrates it (the boot
/// CPU; others call [`init_ap`]).
pub fn init() -> Result<ApicInfo, ApicError> {
    let info = enable()?;
    let hz = calibrate()?;
    TIMER_HZ.store(hz, Ordering::Relaxed);
    Ok(ApicInfo {
        timer_hz: hz,
        ..info
    })
}

/// Enables an application processor's APIC with the boot CPU's mode and
/// timer calibration.
pub fn init_ap() -> Result<ApicInfo, ApicError> {
    let info = enable()?;
    Ok(ApicInfo {
        timer_hz: TIMER_HZ.load(Ordering::Relaxed),
        ..info
    })
}

/// This CPU's APIC id, read from the APIC.
pub fn id() -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        read(reg::ID)
    } else {
        read(reg::ID) >> 24
    }
}

/// Sends a fixed interrupt with `vector` to the CPU whose APIC id is
/// `apic_id`, and waits until the APIC accepted it (xAPIC delivery status).
pub fn send_ipi(apic_id: u32, vector: u8) {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: x2APIC mode; the ICR is one 64-bit MSR (0x830).
        unsafe { Msr::new(0x830).write((u64::from(apic_id) << 32) | u64::from(vector)) };
        return;
    }
    // xAPIC: the destination and the command are two MMIO writes. An
    // interrupt between them whose handler sends an IPI of its own (a
    // reschedule after a preemption or a wake-up) would rewrite ICR_HIGH,
    // and our write of ICR_LOW would send our vector to its destination: a
    // shootdown lost for the CPU it was meant for. Interrupts stay off
    // across the pair.
    let _g = crate::irq::save();
    write(reg::ICR_HIGH, apic_id << 24);
    write(reg::ICR_LOW, u32::from(vector));
    wait_icr_idle();
}

/// Sends INIT, or a startup IPI for the page `vector` (xAPIC or x2APIC).
pub fn send_init_sipi(apic_id: u32, sipi_page: Option<u8>) {
    // INIT: delivery mode 101, level assert; SIPI: delivery mode 110.
    let low = match sipi_page {
        None => 0x0000_4500,
        Some(page) => 0x0000_4600 | u32::from(page),
    };
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: as in `send_ipi`.
        unsafe { Msr::new(0x830).write((u64::from(apic_id) << 32) | u64::from(low)) };
        return;
    }
    // As in `send_ipi`: the two writes are one command.
    let _g = crate::irq::save();
    write(reg::ICR_HIGH, apic_id << 24);
    write(reg::ICR_LOW, low);
    wait_icr_idle();
}

fn wait_icr_idle() {
    for _ in 0..1_000_000 {
        if read(reg::ICR_LOW) & (1 << 12) == 0 {
            return;
        }
        core::hint::spin_loop();
    }
    log::warn!("APIC ICR still busy after 1,000,000 reads");
}

fn enable() -> Result<ApicInfo, ApicError> {
    let leaf1 = platform::cpuid(1);
    if leaf1.edx & (1 << 9) == 0 {
        return Err(ApicError::NoApic);
    }
    mask_pics();
    let x2 = leaf1.ecx & (1 << 21) != 0;
    let mut base_msr = Msr::new(IA32_APIC_BASE);
    // SAFETY: ring 0; IA32_APIC_BASE exists when CPUID.1:EDX.APIC is set.
    let base = unsafe { base_msr.read() };
    if x2 {
        // SAFETY: enabling x2APIC mode (CPUID says it exists) from either
        // enabled state is allowed (xAPIC -> x2APIC).
        unsafe { base_msr.write(base | APIC_BASE_ENABLE | APIC_BASE_X2APIC) };
        X2APIC.store(true, Ordering::Relaxed);
    } else {
        // SAFETY: setting the global enable bit keeps the base address.
        unsafe { base_msr.write(base | APIC_BASE_ENABLE) };
        if MMIO.load(Ordering::Relaxed) == 0 {
            // Every CPU sees its own APIC at the same physical address: one
            // mapping serves them all.
            let phys = base & 0x000f_ffff_ffff_f000;
            let va = kspace::map_mmio(Fixmap::LocalApic, phys).map_err(ApicError::Map)?;
            MMIO.store(va, Ordering::Relaxed);
        }
    }
    write(reg::SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    write(reg::LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(reg::TIMER_DIVIDE, DIVIDE_16);
    Ok(ApicInfo {
        x2apic: x2,
        id: id(),
        timer_hz: 0,
    })
}

/// Counts timer ticks over 10 ms of the TSC clock.
fn calibrate() -> Result<u64, ApicError> {
    const WINDOW_NS: u64 = 10_000_000;
    write(reg::LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(reg::TIMER_INITIAL, u32::MAX);
    let t0 = clock::now_ns();
    clock::spin_ns(WINDOW_NS);
    let left = read(reg::TIMER_CURRENT);
    let t1 = clock::now_ns();
    write(reg::TIMER_INITIAL, 0);
    let ticks = u64::from(u32::MAX - left);
    if ticks == 0 || t1 <= t0 {
        return Err(ApicError::TimerDead);
    }
    Ok(ticks * clock::NS_PER_SEC / (t1 - t0))
}

/// Fires the timer vector once, `delta_ns` from now (at least one tick).
pub fn arm_oneshot(delta_ns: u64) {
    let hz = TIMER_HZ.load(Ordering::Relaxed);
    let count = (u128::from(delta_ns) * u128::from(hz) / u128::from(clock::NS_PER_SEC))
        .clamp(1, u128::from(u32::MAX)) as u32;
    write(reg::LVT_TIMER, u32::from(TIMER_VECTOR)); // one-shot, unmasked
    write(reg::TIMER_INITIAL, count);
}

/// Whether `vector` is pending in this CPU's interrupt request register
/// (raised, not yet delivered: interrupts are off).
pub fn is_pending(vector: u8) -> bool {
    let reg = 0x200 + 0x10 * u32::from(vector / 32);
    read(reg) & (1 << (vector % 32)) != 0
}

/// Acknowledges the interrupt being handled.
pub fn eoi() {
    write(reg::EOI, 0);
}
