//! Which platform the kernel runs on, and small CPU facilities (CPUID, TSC).
//!
//! The entry point decides the first half: the PV entry means Xen PV (there
//! is no other way to get there); the PVH entry means either Xen PVH or a
//! plain PVH loader such as QEMU's `-kernel`, told apart by the hypervisor
//! CPUID leaves (signature "XenVMMXenVMM").
//!
//! Invariant: the platform is recorded once, at entry, before anything that
//! depends on it (console, traps, shutdown) runs.

use core::arch::x86_64::{__cpuid, CpuidResult};
use core::sync::atomic::{AtomicU8, Ordering};

/// Where the kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// Xen paravirtualised guest (64-bit PV entry).
    XenPv,
    /// Xen PVH guest (PVH entry, Xen's CPUID leaves present).
    XenPvh,
    /// Bare metal or another hypervisor, booted through PVH.
    Native,
}

impl Platform {
    /// The report's `platform` value.
    pub const fn name(self) -> &'static str {
        match self {
            Platform::XenPv => "xen-pv",
            Platform::XenPvh => "xen-pvh",
            Platform::Native => "native",
        }
    }
}

/// Which kind of Xen PV domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenDomain {
    /// The initial domain (`SIF_INITDOMAIN`).
    Dom0,
    /// A domain built by the toolstack.
    DomU,
}

impl XenDomain {
    /// The report's `xen_domain` value.
    pub const fn name(self) -> &'static str {
        match self {
            XenDomain::Dom0 => "dom0",
            XenDomain::DomU => "domU",
        }
    }
}

const UNKNOWN: u8 = 0;
static PLATFORM: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Records the platform (entry paths only).
pub fn set(platform: Platform) {
    let v = match platform {
        Platform::XenPv => 1,
        Platform::XenPvh => 2,
        Platform::Native => 3,
    };
    PLATFORM.store(v, Ordering::SeqCst);
}

/// The recorded platform, `None` before an entry path recorded it.
pub fn get() -> Option<Platform> {
    match PLATFORM.load(Ordering::SeqCst) {
        1 => Some(Platform::XenPv),
        2 => Some(Platform::XenPvh),
        3 => Some(Platform::Native),
        _ => None,
    }
}

/// Whether we run as a Xen PV guest (hypercalls allowed, no port I/O).
pub fn is_xen_pv() -> bool {
    get() == Some(Platform::XenPv)
}

/// Whether the CPU maps 1 GiB pages (CPUID 0x80000001 EDX bit 26).
pub fn has_1g_pages() -> bool {
    cpuid(0x8000_0000).eax >= 0x8000_0001 && cpuid(0x8000_0001).edx & (1 << 26) != 0
}

/// Programs this CPU's `IA32_PAT` with pvmmu's layout
/// ([`pvmmu::space::PAT_VALUE`]: write-combining at index 1, where CPA's
/// `set_memory_wc` points), when CPUID has PAT. Hardware paging only (ring
/// 0: native, Xen PVH); every CPU, before it maps anything.
pub fn program_pat() {
    if cpuid(1).edx & (1 << 16) == 0 {
        return;
    }
    let mut pat = x86_64::registers::model_specific::Msr::new(0x277);
    // SAFETY: ring 0 with hardware paging; no mapping uses PAT index 1
    // (WT at reset, WC after) or the PAT bit yet, so no page changes type
    // under a live mapping.
    unsafe { pat.write(pvmmu::space::PAT_VALUE) };
}

/// This CPU's `IA32_PAT`. Under Xen PV the `rdmsr` traps and Xen answers
/// with the PAT it runs PV guests with (`XEN_MSR_PAT` in Xen 4.17), which
/// decides what a leaf's PWT/PCD/PAT bits mean.
pub fn read_pat() -> u64 {
    let pat = x86_64::registers::model_specific::Msr::new(0x277);
    // SAFETY: reading IA32_PAT has no side effect; natively ring 0, under
    // Xen PV the privileged instruction is emulated by Xen for the guest
    // kernel (it reads, never faults, for IA32_PAT).
    unsafe { pat.read() }
}

/// `cpuid(leaf, 0)`.
pub fn cpuid(leaf: u32) -> CpuidResult {
    __cpuid(leaf)
}

/// `cpuid(leaf, 0)` as `[eax, ebx, ecx, edx]` (the form `hypercall::hvm`
/// decodes).
pub fn cpuid_regs(leaf: u32) -> [u32; 4] {
    let r = cpuid(leaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// A hypervisor's 12-byte CPUID vendor signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HypervisorSignature {
    /// The signature bytes (ebx, ecx, edx of the base leaf).
    pub bytes: [u8; 12],
    /// The base leaf it was found at (0x40000000 + n * 0x100).
    pub leaf: u32,
}

impl HypervisorSignature {
    /// The signature as text ("?" for non-printable bytes dropped).
    pub fn as_str(&self) -> &str {
        let end = self.bytes.iter().position(|&b| b == 0).unwrap_or(12);
        match core::str::from_utf8(&self.bytes[..end]) {
            Ok(s) if s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') => s,
            _ => "?",
        }
    }
    /// Whether this is Xen's signature.
    pub fn is_xen(&self) -> bool {
        &self.bytes == b"XenVMMXenVMM"
    }
}

impl core::fmt::Debug for HypervisorSignature {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}@{:#x}", self.as_str(), self.leaf)
    }
}

/// The hypervisor signature from CPUID, if the hypervisor bit is set. Xen
/// may move its leaves up in steps of 0x100 (when it also offers Viridian),
/// so a Xen signature is searched there too, as Linux does
/// ([`hypercall::hvm::find_xen_leaves`]).
pub fn hypervisor_signature() -> Option<HypervisorSignature> {
    if cpuid(1).ecx & (1 << 31) == 0 {
        return None;
    }
    let leaf = hypercall::hvm::find_xen_leaves(cpuid_regs).map_or(0x4000_0000, |xen| xen.base);
    Some(HypervisorSignature {
        bytes: hypercall::hvm::signature(cpuid_regs(leaf)),
        leaf,
    })
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged unless CR4.TSD is set, which neither
    // Xen (for PV guests by default) nor our boot code sets.
    unsafe { core::arch::x86_64::_rdtsc() }
}
