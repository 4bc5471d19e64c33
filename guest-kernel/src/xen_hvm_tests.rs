//! Self-tests of the Xen PVH platform (run after the direct map is live):
//! the hypercall page holds Xen's stubs and every hypercall goes through
//! it and is counted, the console is the ring the HVM parameters name and
//! the live tree maps it where the console writes, the two memory-map
//! sources agree, and nothing was ever asked of Xen's PV MMU.
//!
//! Invariant: each test reads back what Xen or the CPU says; none trusts the
//! values the setup stored without asking again.

use hypercall::hvm::{self, ConsoleRing};
use pvmmu::backend::{CpuTlb, Native};
use pvmmu::{AddressSpace, FrameAllocator, Pfn};

use crate::memmap::MemoryMap;
use crate::selftest::{check, check_eq, Failure, Only, SelfTest, TestResult};
use crate::xen_hvm::{self, XenPvh};
use crate::Kernel;

/// The suite.
pub const SUITE: &[SelfTest] = &[
    SelfTest::only(
        "xen_pvh_hypercall_page_stubs",
        Only::XenPvh,
        hypercall_page_stubs,
    ),
    SelfTest::only(
        "xen_pvh_hypercalls_through_page",
        Only::XenPvh,
        hypercalls_through_page,
    ),
    SelfTest::only("xen_pvh_console_ring", Only::XenPvh, console_ring),
    SelfTest::only("xen_pvh_memory_maps_agree", Only::XenPvh, memory_maps_agree),
    SelfTest::only("xen_pvh_no_pv_mmu_calls", Only::XenPvh, no_pv_mmu_calls),
];

fn pvh(kernel: &Kernel) -> Result<XenPvh, Failure> {
    kernel.xen_pvh.ok_or(Failure::Check("no Xen PVH state"))
}

/// `vmcall` (Intel VMX).
const VMCALL: [u8; 3] = [0x0f, 0x01, 0xc1];
/// `vmmcall` (AMD SVM).
const VMMCALL: [u8; 3] = [0x0f, 0x01, 0xd9];

/// Every stub the kernel uses starts `mov $nr, %eax` followed by `vmcall`
/// or `vmmcall`: Xen, not our `int3` filler, is in the page.
fn hypercall_page_stubs(kernel: &mut Kernel) -> TestResult {
    let xen = pvh(kernel)?;
    let va = xen_hvm::hypercall_page_va();
    check_eq(
        "installed page",
        hypercall::raw::hypercall_page().unwrap_or(0),
        va,
    )?;
    check_eq(
        "page paddr",
        xen.hypercall_page_paddr,
        va - crate::boot::KERNEL_VMA,
    )?;
    let used = [
        hypercall::abi::nr::XEN_VERSION,
        hypercall::abi::nr::SCHED_OP,
        hypercall::abi::nr::EVENT_CHANNEL_OP,
        hypercall::abi::nr::MEMORY_OP,
        hvm::HVM_OP,
    ];
    for nr in used {
        let stub = va + u64::from(nr) * hypercall::raw::STUB_SIZE;
        let mut bytes = [0u8; 8];
        for (i, b) in bytes.iter_mut().enumerate() {
            // SAFETY: the hypercall page is part of the kernel's text,
            // mapped readable; the stub lies inside it (nr < 128).
            *b = unsafe { core::ptr::read_volatile((stub + i as u64) as *const u8) };
        }
        check_eq("mov $nr, %eax opcode", u64::from(bytes[0]), 0xb8)?;
        check_eq(
            "stub's hypercall number",
            u64::from(u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]])),
            u64::from(nr),
        )?;
        let insn = [bytes[5], bytes[6], bytes[7]];
        check(
            insn == VMCALL || insn == VMMCALL,
            "no vmcall/vmmcall in the stub",
        )?;
    }
    Ok(())
}

/// A hypercall through the page answers as Xen does (its version, the same
/// the setup saw) and is counted exactly once.
fn hypercalls_through_page(kernel: &mut Kernel) -> TestResult {
    let xen = pvh(kernel)?;
    let before = hypercall::raw::hypercall_count();
    // SAFETY: PVH with the hypercall page installed.
    let version = unsafe { hypercall::ops::xen_version() }.map_err(|error| Failure::Xen {
        what: "xen_version",
        error,
    })?;
    check_eq(
        "hypercalls counted",
        hypercall::raw::hypercall_count() - before,
        1,
    )?;
    check_eq("major", u64::from(version.0), u64::from(xen.version.0))?;
    check_eq("minor", u64::from(version.1), u64::from(xen.version.1))?;
    check(version.0 >= 4, "Xen older than 4.0")
}

/// Allocates nothing: the console test only translates.
struct NoFrames;

impl FrameAllocator for NoFrames {
    fn allocate(&mut self) -> Option<Pfn> {
        None
    }
    fn free(&mut self, _pfn: Pfn) {}
}

/// The HVM parameters, asked again, name the ring in use; the live tree
/// maps the ring's identity address to that frame, writable; and the ring's
/// output indices are sane (the backend consumed no more than we produced).
fn console_ring(kernel: &mut Kernel) -> TestResult {
    let xen = pvh(kernel)?;
    // SAFETY: PVH with the hypercall page installed.
    let again = unsafe { hvm::console_ring() }.map_err(|_| Failure::Check("HVM params"))?;
    check_eq("console pfn", again.pfn, xen.console.pfn)?;
    check_eq(
        "console evtchn",
        u64::from(again.evtchn),
        u64::from(xen.console.evtchn),
    )?;
    check(
        crate::console::name() == "xen-pv-ring",
        "the console is not the PV ring",
    )?;
    let dm = kernel
        .direct_map
        .clone()
        .ok_or(Failure::Check("no direct map"))?;
    // SAFETY: hardware paging in ring 0; `dm.root` is the live tree. The
    // space only translates (its allocator has no frames to give).
    let space = unsafe {
        AddressSpace::from_root(
            Native::with_tlb(dm.mem, CpuTlb::new()),
            NoFrames,
            dm.root,
            false,
        )
    };
    let t = space
        .lookup(ConsoleRing::paddr(&xen.console))
        .map_err(|_| Failure::Check("console page not mapped in the live tree"))?;
    check_eq("console page frame", t.pfn.0, xen.console.pfn)?;
    check(
        t.flags.contains(pvmmu::entry::Flags::WRITABLE),
        "console page read-only",
    )?;
    let index = |offset: u64| {
        // SAFETY: the ring page is mapped (just translated) and these are
        // its aligned 32-bit output indices.
        unsafe { core::ptr::read_volatile((xen.console.paddr() + offset) as *const u32) }
    };
    let (cons, prod) = (index(3080), index(3084));
    check(prod.wrapping_sub(cons) <= 2048, "ring indices out of range")?;
    check(prod != 0, "nothing was ever written to the ring")
}

/// `XENMEM_memory_map` and `hvm_start_info` describe the same RAM.
fn memory_maps_agree(kernel: &mut Kernel) -> TestResult {
    // SAFETY: PVH with the hypercall page installed.
    let xen_map = unsafe { xen_hvm::xen_memory_map() }.map_err(|error| Failure::Xen {
        what: "XENMEM_memory_map",
        error,
    })?;
    let ram = |map: &MemoryMap| (map.ram().count() as u64, map.ram_bytes());
    let (n_xen, bytes_xen) = ram(&xen_map);
    let (n_boot, bytes_boot) = ram(&kernel.memmap);
    check_eq("RAM bytes", bytes_xen, bytes_boot)?;
    check_eq("RAM regions", n_xen, n_boot)?;
    for (a, b) in xen_map.ram().zip(kernel.memmap.ram()) {
        check_eq("RAM region start", a.start, b.start)?;
        check_eq("RAM region end", a.end, b.end)?;
    }
    Ok(())
}

/// Hardware walks the tables: no `mmu_update`, `mmuext_op` or
/// `update_va_mapping` was issued from entry to here.
fn no_pv_mmu_calls(_kernel: &mut Kernel) -> TestResult {
    let stats = hypercall::mmu::issued_stats();
    check_eq("mmu_update entries", stats.mmu_update_entries, 0)?;
    check_eq("mmuext ops", stats.mmuext_ops, 0)?;
    check_eq("update_va_mapping calls", stats.update_va_mappings, 0)?;
    check_eq("multicalls", stats.multicalls, 0)
}
