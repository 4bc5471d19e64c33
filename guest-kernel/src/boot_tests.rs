//! Boot-level self-tests: what the entry paths, the memory map, the frame
//! allocator, the exception handlers and (under PV) Xen's start-of-day state
//! must look like before pvmmu builds anything.
//!
//! Invariant: every test here checks values it reads back from the machine
//! or from Xen; none can pass without looking.

use pvmmu::{FrameAllocator, FrameMap, Mfn, Pfn, PhysMem};

use crate::frames::FrameError;
use crate::memmap::{self, MapSource};
use crate::physmem::BootMem;
use crate::platform;
use crate::selftest::{check, check_eq, Failure, Only, SelfTest, TestResult};
use crate::traps::{self, pf, vector};
use crate::xen_pv::{PvBoot, START_INFO_MAGIC};
use crate::Kernel;

/// The boot suite, in order.
pub const SUITE: &[SelfTest] = &[
    SelfTest::new("fail_knob", fail_knob),
    SelfTest::new("cmdline_intact", cmdline_intact),
    SelfTest::new("tsc_increases", tsc_increases),
    SelfTest::new("memory_map", memory_map),
    SelfTest::new("image_reserved", image_reserved),
    SelfTest::new("frame_allocator", frame_allocator),
    SelfTest::new("trap_invalid_opcode", trap_invalid_opcode),
    SelfTest::new("trap_page_fault_unmapped", trap_page_fault_unmapped),
    SelfTest::new("probe_read_mapped", probe_read_mapped),
    SelfTest::only("start_info_magic", Only::XenPv, start_info_magic),
    SelfTest::only("xen_version", Only::XenPv, xen_version),
    SelfTest::only("p2m_m2p_consistent", Only::XenPv, p2m_m2p_consistent),
    SelfTest::only(
        "initial_tables_map_image",
        Only::XenPv,
        initial_tables_map_image,
    ),
    SelfTest::only("initial_l4_read_only", Only::XenPv, initial_l4_read_only),
    SelfTest::only(
        "initial_mapping_linear",
        Only::XenPv,
        initial_mapping_linear,
    ),
    SelfTest::only(
        "boot_tables_active",
        Only::HardwarePaging,
        boot_tables_active,
    ),
    SelfTest::new("boot_mem_reaches_image", boot_mem_reaches_image),
    SelfTest::new("stack_guard_unmapped", stack_guard_unmapped),
    SelfTest::only("frame_map_roundtrip", Only::XenPv, frame_map_roundtrip),
];

/// An address no boot mapping covers (PML4 slot 224, canonical, user half).
const UNMAPPED_VA: u64 = 0x0000_7000_0000_1008;

fn pv(kernel: &Kernel) -> Result<&PvBoot, Failure> {
    kernel.pv.as_ref().ok_or(Failure::Check("no PV boot state"))
}

/// `pvmmu.fail_selftest` on the command line makes this test fail.
fn fail_knob(kernel: &mut Kernel) -> TestResult {
    check(
        !kernel.options.fail_selftest,
        "pvmmu.fail_selftest is set: failing on purpose",
    )
}

/// The command line arrived whole: a truncated or non-UTF-8 line lost
/// options, so the boot cannot be trusted to have run what was asked.
fn cmdline_intact(kernel: &mut Kernel) -> TestResult {
    check(
        kernel.cmdline.problem().is_none(),
        "the command line was truncated or is not UTF-8: options were lost (see PVMMU-WARNING)",
    )
}

fn tsc_increases(_: &mut Kernel) -> TestResult {
    let t0 = platform::rdtsc();
    let mut x = 0u64;
    for i in 0..10_000u64 {
        x = core::hint::black_box(x.wrapping_add(i));
    }
    let t1 = platform::rdtsc();
    core::hint::black_box(x);
    check(t1 > t0, "TSC did not increase across a busy loop")
}

/// The memory map has RAM, is sorted without overlaps, `mem_mib` agrees with it,
/// and (natively) the kernel image lies in RAM; under PV the RAM in the map
/// covers all `nr_pages` frames.
fn memory_map(kernel: &mut Kernel) -> TestResult {
    let map = &kernel.memmap;
    check(map.ram().next().is_some(), "no RAM region")?;
    check(
        map.regions().windows(2).all(|w| w[0].end <= w[1].start),
        "memory map regions unsorted or overlapping",
    )?;
    match &kernel.pv {
        Some(pv) => {
            let limit = pv.nr_pages * 4096;
            let covered: u64 = map
                .ram()
                .map(|r| r.end.min(limit).saturating_sub(r.start.min(limit)))
                .sum();
            check_eq("RAM bytes below nr_pages", covered, limit)?;
            check_eq(
                "mem_mib",
                kernel.report.mem_mib,
                memmap::bytes_to_mib_rounded(limit),
            )?;
            if map.source() == MapSource::NrPages {
                check_eq("synthesised RAM", map.ram_bytes(), limit)?;
            }
        }
        None => {
            check_eq(
                "mem_mib",
                kernel.report.mem_mib,
                memmap::bytes_to_mib_rounded(map.ram_bytes()),
            )?;
            let (start, end) = kernel.image.image.to_phys();
            check(
                map.ram().any(|r| r.start <= start && end <= r.end),
                "kernel image not inside one RAM region",
            )?;
        }
    }
    Ok(())
}

/// The image (and under PV the whole bootstrap area) is not allocatable.
fn image_reserved(kernel: &mut Kernel) -> TestResult {
    let (start, end) = kernel.image_pfns();
    check(start < end, "empty image")?;
    for pfn in [start, (start + end) / 2, end - 1] {
        check(!kernel.frames.is_free(Pfn(pfn)), "image frame is free")?;
    }
    if let Some(pv) = &kernel.pv {
        let pt = PvBoot::va_to_pfn(pv.pt_base).ok_or(Failure::Check("pt_base below VIRT_BASE"))?;
        let si = PvBoot::va_to_pfn(pv.start_info_va)
            .ok_or(Failure::Check("start_info below VIRT_BASE"))?;
        let p2m = PvBoot::va_to_pfn(pv.mfn_list).ok_or(Failure::Check("p2m below VIRT_BASE"))?;
        for pfn in [pt, pt + pv.nr_pt_frames - 1, si, p2m] {
            check(!kernel.frames.is_free(Pfn(pfn)), "bootstrap frame is free")?;
        }
    }
    Ok(())
}

/// Allocates frames: distinct, in RAM, outside every reservation, backed by
/// an MFN under PV; freeing restores the count; a double free is refused.
fn frame_allocator(kernel: &mut Kernel) -> TestResult {
    const N: usize = 64;
    let free_before = kernel.frames.free_count();
    check(free_before >= N as u64, "fewer than 64 free frames")?;
    let mut got = [Pfn(0); N];
    for slot in got.iter_mut() {
        *slot = kernel
            .frames
            .allocate()
            .ok_or(Failure::Check("allocation failed"))?;
    }
    check_eq(
        "free frames after allocating",
        kernel.frames.free_count(),
        free_before - N as u64,
    )?;
    for (i, pfn) in got.iter().enumerate() {
        check(!got[..i].contains(pfn), "frame handed out twice")?;
        let addr = pfn.addr();
        check(
            kernel
                .memmap
                .ram()
                .any(|r| r.start <= addr && addr + 4096 <= r.end),
            "frame not in RAM",
        )?;
        check(
            kernel.reservations().all(|r| !r.range.contains(pfn.0)),
            "frame inside a reservation",
        )?;
        if let Some(pv) = &kernel.pv {
            check(pfn.0 < pv.nr_pages, "frame beyond nr_pages")?;
            let mfn = pv.pfn_to_mfn(pfn.0).ok_or(Failure::Check("no p2m entry"))?;
            check_eq(
                "M2P of allocated frame",
                pv.m2p(mfn).unwrap_or(u64::MAX),
                pfn.0,
            )?;
        }
    }
    for pfn in got {
        kernel.frames.free(pfn);
    }
    check_eq(
        "free frames after freeing",
        kernel.frames.free_count(),
        free_before,
    )?;
    check(
        kernel.frames.try_free(got[0]) == Err(FrameError::AlreadyFree(got[0])),
        "double free not refused",
    )?;
    let again = kernel
        .frames
        .allocate()
        .ok_or(Failure::Check("re-allocation failed"))?;
    check_eq("lowest frame reallocated", again.0, got[0].0)?;
    kernel.frames.free(again);
    check_eq("bad frees through the trait", kernel.frames.bad_frees(), 0)
}

fn trap_invalid_opcode(_: &mut Kernel) -> TestResult {
    let before = traps::traps_taken();
    match traps::probe_invalid_opcode() {
        Ok(()) => Err(Failure::Check("ud2 raised no exception")),
        Err(f) if f.vector == vector::UD => {
            check_eq("exceptions taken", traps::traps_taken() - before, 1)
        }
        Err(f) => Err(Failure::Fault {
            what: "ud2",
            vector: f.vector,
            error_code: f.error_code,
        }),
    }
}

fn trap_page_fault_unmapped(_: &mut Kernel) -> TestResult {
    // SAFETY: nothing is mapped at UNMAPPED_VA, and it is not MMIO.
    match unsafe { traps::probe_read(UNMAPPED_VA) } {
        Ok(_) => Err(Failure::Check("read of an unmapped address succeeded")),
        Err(f) if f.vector == vector::PF => {
            check_eq("cr2", f.cr2, UNMAPPED_VA)?;
            check_eq(
                "error code present|write|fetch bits",
                f.error_code & (pf::PRESENT | pf::WRITE | pf::FETCH),
                0,
            )
        }
        Err(f) => Err(Failure::Fault {
            what: "read of unmapped address",
            vector: f.vector,
            error_code: f.error_code,
        }),
    }
}

static PROBE_TARGET: u64 = 0x5a5a_1234_8765_a5a5;

fn probe_read_mapped(_: &mut Kernel) -> TestResult {
    let va = core::ptr::addr_of!(PROBE_TARGET) as u64;
    // SAFETY: a static of ours, plain memory.
    match unsafe { traps::probe_read(va) } {
        Ok(v) => check_eq("value read by probe", v, PROBE_TARGET),
        Err(f) => Err(Failure::Fault {
            what: "read of a static",
            vector: f.vector,
            error_code: f.error_code,
        }),
    }
}

fn start_info_magic(kernel: &mut Kernel) -> TestResult {
    let pv = pv(kernel)?;
    check(
        pv.magic_str().starts_with(START_INFO_MAGIC),
        "start_info magic does not start with xen-3.0-x86_64",
    )
}

/// `xen_version` answers 4.x and counts as exactly one hypercall.
fn xen_version(_: &mut Kernel) -> TestResult {
    let before = hypercall::raw::hypercall_count();
    // SAFETY: this test only runs under Xen PV.
    let (major, _minor) =
        unsafe { hypercall::ops::xen_version() }.map_err(|error| Failure::Xen {
            what: "xen_version",
            error,
        })?;
    check_eq("Xen major version", u64::from(major), 4)?;
    check_eq(
        "hypercalls counted",
        hypercall::raw::hypercall_count() - before,
        1,
    )
}

/// For a spread of PFNs (and the first and last), `m2p[p2m[pfn]] == pfn`.
fn p2m_m2p_consistent(kernel: &mut Kernel) -> TestResult {
    let pv = pv(kernel)?;
    let n = pv.nr_pages;
    check(n > 0, "nr_pages is 0")?;
    let step = (n / 509).max(1);
    let samples = (0..n).step_by(step as usize).chain(core::iter::once(n - 1));
    for pfn in samples {
        let mfn = pv
            .pfn_to_mfn(pfn)
            .ok_or(Failure::Check("p2m shorter than nr_pages"))?;
        let back = pv.m2p(mfn).ok_or(Failure::OutOfRange {
            what: "mfn beyond the M2P",
            got: mfn,
        })?;
        check_eq("m2p[p2m[pfn]]", back, pfn)?;
    }
    Ok(())
}

/// Walking Xen's start-of-day tables finds the image, start_info and the
/// p2m list at the MFNs the p2m list names.
fn initial_tables_map_image(kernel: &mut Kernel) -> TestResult {
    let pv = pv(kernel)?;
    let img = kernel.image;
    for va in [
        img.text.start,
        img.rodata.start,
        img.bss.end - 1,
        pv.start_info_va,
        pv.mfn_list,
    ] {
        let pfn = PvBoot::va_to_pfn(va).ok_or(Failure::Check("address below VIRT_BASE"))?;
        let expected = pv.pfn_to_mfn(pfn).ok_or(Failure::Check("no p2m entry"))?;
        let found = pv.translate_initial(va).ok_or(Failure::OutOfRange {
            what: "not mapped by Xen's tables",
            got: va,
        })?;
        check_eq("mfn mapped at address", found.mfn, expected)?;
    }
    Ok(())
}

/// Every frame from pfn 0 to the end of the bootstrap area (but the stack
/// guard page, which the kernel unmapped) is
/// mapped at `VIRT_BASE + pfn * 4096` with the MFN the p2m list names, the
/// bootstrap tables read-only, and the mapping goes on for at least Xen's
/// 512 KiB of slack past the bootstrap area.
fn initial_mapping_linear(kernel: &mut Kernel) -> TestResult {
    let pv = pv(kernel)?;
    let boot_end = pv.bootstrap_end_pfn();
    let pt_first =
        PvBoot::va_to_pfn(pv.pt_base).ok_or(Failure::Check("pt_base below VIRT_BASE"))?;
    let guard = PvBoot::va_to_pfn(kernel.image.stack_guard.start)
        .ok_or(Failure::Check("guard below VIRT_BASE"))?;
    for pfn in 0..boot_end {
        if pfn == guard {
            // Unmapped by the kernel itself (stack guard).
            check(
                pv.translate_initial(PvBoot::pfn_to_va(pfn)).is_none(),
                "stack guard page mapped",
            )?;
            continue;
        }
        let m = pv
            .translate_initial(PvBoot::pfn_to_va(pfn))
            .ok_or(Failure::OutOfRange {
                what: "bootstrap pfn not mapped",
                got: pfn,
            })?;
        check_eq(
            "mfn of bootstrap pfn",
            m.mfn,
            pv.pfn_to_mfn(pfn).unwrap_or(u64::MAX),
        )?;
        let is_table = (pt_first..pt_first + pv.nr_pt_frames).contains(&pfn);
        if is_table {
            check(!m.writable(), "bootstrap table mapped writable")?;
        }
    }
    let end = pv.initial_mapping_end_pfn();
    log::info!("start-of-day mapping: pfns [0x0, {end:#x}), bootstrap area ends at {boot_end:#x}");
    check(
        end >= boot_end + 128,
        "less than 512 KiB mapped past the bootstrap area",
    )
}

/// Xen maps the live L4 read-only, and a store to it faults.
fn initial_l4_read_only(kernel: &mut Kernel) -> TestResult {
    let pv = pv(kernel)?;
    let l4 = pv
        .translate_initial(pv.pt_base)
        .ok_or(Failure::Check("L4 not mapped"))?;
    check(!l4.writable(), "live L4 mapped writable")?;
    // Slot 1 of the L4 (unused by Xen's layout: below the hypervisor hole).
    let slot = pv.pt_base + 8;
    // SAFETY: a read of our own mapped L4.
    let old = unsafe { traps::probe_read(slot) }.map_err(|f| Failure::Fault {
        what: "read of L4",
        vector: f.vector,
        error_code: f.error_code,
    })?;
    // SAFETY: the write is expected to fault; if it does not, it writes
    // back the same value, which changes nothing.
    match unsafe { traps::probe_write(slot, old) } {
        Ok(()) => Err(Failure::Check("store to the live L4 succeeded")),
        Err(f) if f.vector == vector::PF => {
            check_eq("cr2", f.cr2, slot)?;
            check_eq(
                "error code present|write",
                f.error_code & (pf::PRESENT | pf::WRITE),
                pf::PRESENT | pf::WRITE,
            )
        }
        Err(f) => Err(Failure::Fault {
            what: "store to L4",
            vector: f.vector,
            error_code: f.error_code,
        }),
    }
}

/// CR3 points at the trampoline's PML4, which maps the image at its link
/// address and identity-maps it at its load address.
fn boot_tables_active(kernel: &mut Kernel) -> TestResult {
    let (frame, _) = x86_64::registers::control::Cr3::read_raw();
    let (pml4_phys, _) = kernel.image.pvh_tables.to_phys();
    check_eq("CR3", frame.start_address().as_u64(), pml4_phys)?;
    let va = core::ptr::addr_of!(PROBE_TARGET) as u64;
    let phys = va - crate::boot::KERNEL_VMA;
    // SAFETY: both addresses map the same static (identity map of the low
    // 4 GiB and the high mapping), plain memory.
    let via_identity = unsafe { traps::probe_read(phys) }.map_err(|f| Failure::Fault {
        what: "identity read",
        vector: f.vector,
        error_code: f.error_code,
    })?;
    check_eq("value through the identity map", via_identity, PROBE_TARGET)
}

/// The boot `PhysMem` reaches the frame holding a static at the address
/// that reads the static's value, and refuses the frame past its end.
fn boot_mem_reaches_image(kernel: &mut Kernel) -> TestResult {
    let mem = match &kernel.pv {
        Some(pv) => BootMem::xen_start_of_day(pv),
        None => BootMem::identity(),
    };
    let va = core::ptr::addr_of!(PROBE_TARGET) as u64;
    let phys = va - crate::boot::KERNEL_VMA;
    let frame = mem
        .frame_ptr(Pfn::containing(phys))
        .ok_or(Failure::Check("image frame not reachable"))?;
    let word = frame.as_ptr() as u64 + (phys & 0xfff);
    // SAFETY: plain memory (the static), reached through the boot mapping.
    let value = unsafe { traps::probe_read(word) }.map_err(|f| Failure::Fault {
        what: "read through boot mapping",
        vector: f.vector,
        error_code: f.error_code,
    })?;
    check_eq("value through BootMem", value, PROBE_TARGET)?;
    check(
        mem.frame_ptr(mem.end()).is_none(),
        "frame past the end reachable",
    )
}

/// The `FrameMap` of the p2m list and M2P round-trips and refuses a frame
/// the domain does not own.
fn frame_map_roundtrip(kernel: &mut Kernel) -> TestResult {
    let pv = pv(kernel)?;
    for pfn in [0, pv.nr_pages / 2, pv.nr_pages - 1] {
        let mfn = pv.to_mfn(Pfn(pfn)).ok_or(Failure::Check("no mfn"))?;
        check_eq(
            "to_pfn(to_mfn(pfn))",
            pv.to_pfn(mfn).map_or(u64::MAX, |p| p.0),
            pfn,
        )?;
    }
    check(
        pv.to_mfn(Pfn(pv.nr_pages)).is_none(),
        "pfn past nr_pages translated",
    )?;
    // MFN 0 belongs to Xen, never to a guest.
    check(pv.to_pfn(Mfn(0)).is_none(), "mfn 0 claimed as ours")
}

/// We run on the boot stack, and the page below it faults (not present).
fn stack_guard_unmapped(kernel: &mut Kernel) -> TestResult {
    let marker = 0u64;
    let sp = core::ptr::addr_of!(marker) as u64;
    let stack = kernel.image.stack;
    check(
        stack.start <= sp && sp < stack.end,
        "not running on the boot stack",
    )?;
    let guard = kernel.image.stack_guard;
    check_eq("guard page just below the stack", guard.end, stack.start)?;
    let probe = guard.end - 8;
    // SAFETY: the guard page is ours and plain memory; the read is expected
    // to fault.
    match unsafe { traps::probe_read(probe) } {
        Ok(_) => Err(Failure::Check("guard page is mapped")),
        Err(f) if f.vector == vector::PF => {
            check_eq("cr2", f.cr2, probe)?;
            check_eq("error code present bit", f.error_code & pf::PRESENT, 0)
        }
        Err(f) => Err(Failure::Fault {
            what: "read of the guard page",
            vector: f.vector,
            error_code: f.error_code,
        }),
    }
}
