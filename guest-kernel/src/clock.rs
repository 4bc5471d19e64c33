//! One monotonic clock in nanoseconds over both platforms.
//!
//! Under Xen PV it is Xen's system time read from this vCPU's pvclock
//! (`vcpu_time_info` in the shared-info page): `system_time` plus the TSC
//! delta since `tsc_timestamp` scaled by `tsc_to_system_mul`/`tsc_shift`,
//! read under the record's version (odd while Xen updates it; retried if it
//! changed during the read). Timer deadlines under PV are in the same time
//! base. Natively it is the TSC, calibrated once against the PIT (channel 2,
//! gated through port 0x61, the method of Linux's `pit_calibrate_tsc`), or
//! taken from CPUID leaf 0x15/0x16 when the CPU states it; under Xen PVH
//! (no PIT) from Xen's CPUID time leaf.
//!
//! Invariant: [`now_ns`] never goes backwards on one CPU, and is 0 until
//! [`init_native`] or [`init_pv`] ran.

use core::sync::atomic::{fence, AtomicPtr, AtomicU64, Ordering};

use hypercall::abi::VcpuTimeInfo;
use x86_64::instructions::port::Port;

use crate::platform::{self, rdtsc};

/// TSC frequency (native), Hz.
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// TSC at calibration (native): time 0.
static TSC_ZERO: AtomicU64 = AtomicU64::new(0);
/// The boot vCPU's pvclock record (PV), used until a CPU has its own.
static PVCLOCK: AtomicPtr<VcpuTimeInfo> = AtomicPtr::new(core::ptr::null_mut());
/// The last value returned, so that the clock never goes backwards.
static LAST: AtomicU64 = AtomicU64::new(0);

/// Where the native TSC frequency came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscSource {
    /// CPUID leaf 0x15 (crystal ratio) or 0x16 (base MHz).
    Cpuid,
    /// Measured against the PIT.
    Pit,
    /// Xen's CPUID time leaf (Xen PVH: there is no PIT).
    Xen,
}

/// `vcpu_time_info.flags`: the TSC is synchronised across CPUs
/// (`XEN_PVCLOCK_TSC_STABLE_BIT`).
pub const TSC_STABLE: u8 = 1 << 0;

/// Whether Xen marks the boot vCPU's TSC as stable across CPUs (PV).
pub fn pv_tsc_stable() -> bool {
    let p = PVCLOCK.load(Ordering::Acquire);
    // SAFETY: the boot vCPU's record, mapped for ever (see `init_pv`).
    unsafe { p.as_ref() }
        .is_some_and(|t| unsafe { core::ptr::read_volatile(&t.flags) } & TSC_STABLE != 0)
}

/// Nanoseconds per second.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// Uses this vCPU's pvclock.
///
/// # Safety
/// `time` must be this vCPU's `vcpu_time_info` in the mapped shared-info
/// page, mapped for the life of the kernel.
pub unsafe fn init_pv(time: *mut VcpuTimeInfo) {
    PVCLOCK.store(time, Ordering::Release);
}

/// Why the TSC frequency could not be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockError {
    /// No CPUID leaf states it and there is no working PIT: channel 2's
    /// output was already high right after it was armed, or never rose.
    NoPit,
}

/// Calibrates the TSC (native); returns its frequency and the source.
pub fn init_native() -> Result<(u64, TscSource), ClockError> {
    let xen = match platform::get() {
        Some(platform::Platform::XenPvh) => crate::xen_hvm::tsc_hz(),
        _ => None,
    };
    let (hz, source) = match (xen, cpuid_tsc_hz()) {
        (Some(hz), _) => (hz, TscSource::Xen),
        (None, Some(hz)) => (hz, TscSource::Cpuid),
        (None, None) => (pit_calibrate_tsc()?, TscSource::Pit),
    };
    TSC_ZERO.store(rdtsc(), Ordering::Relaxed);
    TSC_HZ.store(hz, Ordering::Release);
    Ok((hz, source))
}

/// TSC frequency from CPUID 0x15 (crystal clock times ratio) or 0x16.
fn cpuid_tsc_hz() -> Option<u64> {
    let max = platform::cpuid(0).eax;
    if max >= 0x15 {
        let l = platform::cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return Some(u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax));
        }
    }
    if max >= 0x16 {
        let mhz = platform::cpuid(0x16).eax & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1_000_000);
        }
    }
    None
}

/// PIT input clock, Hz.
const PIT_HZ: u64 = 1_193_182;

/// Counts TSC cycles over 10 ms of PIT channel 2 (mode 0, output read on
/// port 0x61 bit 5), best of three (the shortest is the least disturbed).
/// In mode 0 the output is low from the moment the count is loaded: an
/// output already high there means nothing counts (no PIT, as in a Xen PVH
/// guest, where the port reads all ones), which is refused rather than
/// measured as a bogus frequency.
fn pit_calibrate_tsc() -> Result<u64, ClockError> {
    const MS: u64 = 10;
    let latch = (PIT_HZ * MS / 1000) as u16;
    let mut best = u64::MAX;
    for _ in 0..3 {
        // SAFETY: native ring 0; ports 0x42/0x43/0x61 are the PIT and the
        // speaker gate. Channel 2 is not used for anything else here, and
        // the speaker output stays off (bit 1 clear).
        let cycles = unsafe {
            let mut gate: Port<u8> = Port::new(0x61);
            let mut cmd: Port<u8> = Port::new(0x43);
            let mut ch2: Port<u8> = Port::new(0x42);
            let g = gate.read();
            gate.write((g & !0x02) | 0x01);
            cmd.write(0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
            ch2.write(latch as u8);
            ch2.write((latch >> 8) as u8);
            if gate.read() & 0x20 != 0 {
                return Err(ClockError::NoPit);
            }
            let t0 = rdtsc();
            let mut spins = 0u64;
            while gate.read() & 0x20 == 0 {
                spins += 1;
                if spins > 100_000_000 {
                    return Err(ClockError::NoPit);
                }
            }
            rdtsc() - t0
        };
        best = best.min(cycles);
    }
    Ok(best * (1000 / MS))
}

/// The native TSC frequency in Hz (0 before calibration or under PV).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Acquire)
}

/// Reads the pvclock record under its version protocol.
fn pvclock_ns(t: &VcpuTimeInfo) -> u64 {
    loop {
        // SAFETY (all reads below): fields of the mapped vcpu_time_info,
        // which Xen updates concurrently; volatile reads, re-validated by
        // the version check.
        let v0 = unsafe { core::ptr::read_volatile(&t.version) };
        fence(Ordering::Acquire);
        let (stamp, base, mul, shift) = unsafe {
            (
                core::ptr::read_volatile(&t.tsc_timestamp),
                core::ptr::read_volatile(&t.system_time),
                core::ptr::read_volatile(&t.tsc_to_system_mul),
                core::ptr::read_volatile(&t.tsc_shift),
            )
        };
        let tsc = rdtsc();
        fence(Ordering::Acquire);
        // SAFETY: as above: the mapped record, re-read to validate the copy.
        let v1 = unsafe { core::ptr::read_volatile(&t.version) };
        if v0 & 1 != 0 || v0 != v1 {
            core::hint::spin_loop();
            continue;
        }
        let delta = tsc.wrapping_sub(stamp);
        let delta = if shift >= 0 {
            delta << shift
        } else {
            delta >> -shift
        };
        return base + ((u128::from(delta) * u128::from(mul)) >> 32) as u64;
    }
}

/// Nanoseconds since an arbitrary epoch (Xen boot under PV, TSC
/// calibration natively); 0 before initialisation.
pub fn now_ns() -> u64 {
    let raw = if platform::is_xen_pv() {
        // This vCPU's record, read without migrating in between (the TSC
        // read must be of the CPU whose record scales it).
        crate::percpu::preempt_inc();
        let own = crate::percpu::CPUS[crate::percpu::cpu_id()]
            .vcpu_info
            .load(Ordering::Acquire);
        let boot = PVCLOCK.load(Ordering::Acquire);
        // SAFETY: the boot vCPU's record, mapped for ever (see `init_pv`).
        let stable = unsafe { boot.as_ref() }
            .is_some_and(|t| unsafe { core::ptr::read_volatile(&t.flags) } & TSC_STABLE != 0);
        // With a TSC Xen calls stable (synchronised across CPUs) every CPU
        // reads the boot vCPU's record: one time base for all CPUs, so a
        // deadline one CPU computes means the same instant on another.
        let p = if own.is_null() || stable {
            boot
        } else {
            // SAFETY: a vcpu_info in the mapped shared-info page.
            unsafe { core::ptr::addr_of_mut!((*own).time) }
        };
        // SAFETY: set by `init_pv` to the mapped record (its contract), or
        // this vCPU's record in the same page.
        let t = unsafe { p.as_ref() }.map(pvclock_ns);
        crate::percpu::preempt_dec();
        match t {
            Some(t) => t,
            None => return 0,
        }
    } else {
        let hz = tsc_hz();
        if hz == 0 {
            return 0;
        }
        let d = rdtsc().saturating_sub(TSC_ZERO.load(Ordering::Relaxed));
        ((u128::from(d) * u128::from(NS_PER_SEC)) / u128::from(hz)) as u64
    };
    // Monotonic across the CPU's reads (the TSC and Xen's records may step
    // back by a few ns at a pvclock update).
    let prev = LAST.fetch_max(raw, Ordering::Relaxed);
    raw.max(prev)
}

/// Busy-waits `ns` nanoseconds (interrupts keep their state).
pub fn spin_ns(ns: u64) {
    let end = now_ns() + ns;
    while now_ns() < end {
        core::hint::spin_loop();
    }
}
