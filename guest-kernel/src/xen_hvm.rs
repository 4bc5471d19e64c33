//! The kernel as a Xen PVH guest: the PVH entry (the one native boots use)
//! with Xen underneath. Paging is native (hardware walks the tables, pvmmu
//! takes its native backend, no `mmu_update` is ever issued); what differs
//! from bare metal is how the kernel talks to the outside:
//!
//! * hypercalls through the hypercall page, installed by writing its
//!   physical address to the MSR that Xen's CPUID leaf `base + 2` names
//!   (`hypercall::hvm`); there is no PV `syscall` path in ring 0 of an HVM
//!   container;
//! * the console is the PV console ring whose frame and event channel the
//!   toolstack left in `HVM_PARAM_CONSOLE_PFN` / `HVM_PARAM_CONSOLE_EVTCHN`
//!   (there is no COM1 and no `isa-debug-exit`);
//! * shutdown is `SCHEDOP_shutdown`;
//! * the memory map is `hvm_start_info`'s, or `XENMEM_memory_map` when the
//!   start info carries none.
//!
//! The ring page lies in Xen's special-page area below 4 GiB, outside RAM,
//! so the direct map does not cover it. The kernel keeps it at its identity
//! address: the PVH trampoline's identity map covers it at entry, and the
//! direct-map bootstrap maps that one page there again in the new tree
//! ([`console_region`]), so the console's pointer never changes.
//!
//! Invariant: the hypercall page is installed before the first hypercall;
//! the console ring is used only at an address that maps its frame in the
//! tree that is live at that moment.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use hypercall::hvm::{self, ConsoleRing, HvmError, HypercallPageMsr, XenLeaves};
use pvmmu::bootstrap::{Access, PfnRange, Region};

use crate::boot::KERNEL_VMA;
use crate::console::{ring::RingConsole, Console};
use crate::memmap::{MapSource, MemoryMap};
use crate::platform::XenDomain;
use crate::pvh::IDENTITY_LIMIT;

extern "C" {
    /// The page Xen fills with hypercall stubs (`boot.rs`, in `.text`).
    static HYPERCALL_PAGE: u8;
}

/// Why the kernel could not set itself up as a Xen PVH guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenPvhError {
    /// Finding Xen, installing the hypercall page or reading the console
    /// parameters failed.
    Hvm(HvmError),
    /// The console ring is not below 4 GiB, where the boot identity map
    /// (and so the console's fixed address) reaches.
    ConsoleAboveIdentityMap(u64),
}

impl From<HvmError> for XenPvhError {
    fn from(e: HvmError) -> Self {
        XenPvhError::Hvm(e)
    }
}

/// What the PVH setup found.
#[derive(Debug, Clone, Copy)]
pub struct XenPvh {
    /// Xen's CPUID leaves.
    pub leaves: XenLeaves,
    /// The hypercall-page MSR.
    pub msr: HypercallPageMsr,
    /// Physical address of the installed hypercall page.
    pub hypercall_page_paddr: u64,
    /// Xen's version (major, minor).
    pub version: (u16, u16),
    /// The PV console.
    pub console: ConsoleRing,
    /// dom0 (`XENFEAT_dom0`) or a toolstack-built domU.
    pub domain: XenDomain,
}

/// The TSC frequency Xen states for this guest (Hz), `None` unless Xen's
/// CPUID time leaf has one. A PVH guest has no PIT to calibrate against.
pub fn tsc_hz() -> Option<u64> {
    let cpuid = crate::platform::cpuid_regs;
    hvm::tsc_hz(hvm::find_xen_leaves(cpuid)?, cpuid)
}

/// Frame of the console ring once [`init`] found it (0 before).
static CONSOLE_PFN: AtomicU64 = AtomicU64::new(0);

/// Virtual address of the hypercall page.
pub fn hypercall_page_va() -> u64 {
    core::ptr::addr_of!(HYPERCALL_PAGE) as u64
}

/// Finds Xen's leaves, installs the hypercall page, asks Xen for its
/// version, the console parameters and whether this is dom0.
///
/// Only on the PVH entry path with Xen's signature in CPUID, before any
/// hypercall.
pub fn init() -> Result<XenPvh, XenPvhError> {
    let cpuid = crate::platform::cpuid_regs;
    let leaves = hvm::find_xen_leaves(cpuid).ok_or(HvmError::NoXenLeaves)?;
    let msr = HypercallPageMsr::from_cpuid(leaves, cpuid)?;
    let va = hypercall_page_va();
    let paddr = va - KERNEL_VMA;
    // SAFETY: we are in ring 0 of a Xen HVM container (PVH entry, Xen's
    // leaves found); the page is the kernel's own, reserved for the stubs,
    // mapped executable at `va` by the boot tables and by every tree the
    // bootstrap builds (it is part of the image's text).
    unsafe { hvm::install_hypercall_page(msr, va, paddr) }?;
    // SAFETY: the hypercall page is installed.
    let version = unsafe { hypercall::ops::xen_version() }.map_err(HvmError::Xen)?;
    // SAFETY: as above.
    let console = unsafe { hvm::console_ring() }?;
    if console.paddr() + 4096 > IDENTITY_LIMIT {
        return Err(XenPvhError::ConsoleAboveIdentityMap(console.paddr()));
    }
    // SAFETY: as above.
    let features = unsafe { hvm::features(0) }.map_err(HvmError::Xen)?;
    let domain = if features & (1 << hvm::XENFEAT_DOM0) != 0 {
        XenDomain::Dom0
    } else {
        XenDomain::DomU
    };
    CONSOLE_PFN.store(console.pfn, Ordering::SeqCst);
    Ok(XenPvh {
        leaves,
        msr,
        hypercall_page_paddr: paddr,
        version,
        console,
        domain,
    })
}

impl XenPvh {
    /// The console on the PV ring, at the ring's identity address.
    pub fn console(&self) -> Console {
        let page = NonNull::new(self.console.paddr() as *mut u8);
        match page {
            // SAFETY: the ring frame is below 4 GiB (checked in `init`), so
            // the trampoline's identity map maps it writable now, and the
            // bootstrap keeps it there (`console_region`); the hypercall
            // page is installed, so the ring's notifications work.
            Some(page) => Console::Ring(unsafe { RingConsole::new(page, self.console.evtchn) }),
            None => Console::None,
        }
    }
}

/// The console ring page at its identity address, for the direct-map
/// bootstrap's regions (`None` unless [`init`] found a console).
pub fn console_region() -> Option<Region> {
    match CONSOLE_PFN.load(Ordering::SeqCst) {
        0 => None,
        pfn => Some(Region {
            va: pfn * 4096,
            pfns: PfnRange::new(pfn, pfn + 1),
            access: Access::Data,
        }),
    }
}

/// The domain's memory map from `XENMEM_memory_map`.
///
/// # Safety
/// The hypercall page is installed (or we are PV).
pub unsafe fn xen_memory_map() -> Result<MemoryMap, hypercall::XenError> {
    let mut buf = [hypercall::abi::E820Entry::default(); crate::memmap::MAX_REGIONS];
    // SAFETY: forwarded contract; `buf` is a valid buffer.
    let n = unsafe { hypercall::ops::memory_map(&mut buf) }?;
    let entries = buf[..n.min(buf.len())]
        .iter()
        .map(|e| (e.addr, e.size, e.kind));
    match MemoryMap::from_entries(MapSource::XenMemoryMap, entries) {
        Ok(map) => Ok(map),
        // Sorted, merged or refused (hypercall::boot::memmap): a map with
        // conflicting regions cannot be used at all.
        Err(e) => panic!("the memory map Xen gave is refused: {e}"),
    }
}

/// Records what the PVH setup found in `kernel` (before its frame
/// allocator is built): the state, the report's domain and, when
/// `hvm_start_info` carried no RAM, Xen's own memory map.
pub fn adopt(kernel: &mut crate::Kernel, xen: XenPvh) {
    log::info!(
        "Xen {}.{} PVH: CPUID leaves at {:#x} (max {:#x}), hypercall page at pfn {:#x} via MSR {:#x}, \
         console ring pfn {:#x} evtchn {}, {}",
        xen.version.0,
        xen.version.1,
        xen.leaves.base,
        xen.leaves.max_leaf,
        xen.hypercall_page_paddr >> 12,
        xen.msr.msr,
        xen.console.pfn,
        xen.console.evtchn,
        xen.domain.name()
    );
    if kernel.memmap.ram_bytes() == 0 {
        // SAFETY: the hypercall page is installed (`init` succeeded).
        match unsafe { xen_memory_map() } {
            Ok(map) => kernel.memmap = map,
            Err(e) => panic!("no RAM in hvm_start_info and XENMEM_memory_map failed: {e}"),
        }
    }
    kernel.report.xen_domain = Some(xen.domain);
    kernel.xen_pvh = Some(xen);
}
