//! Native application-processor start: the CPUs from the ACPI MADT, and
//! INIT-SIPI-SIPI through a real-mode trampoline below 1 MiB.
//!
//! The trampoline is copied to [`TRAMPOLINE_PHYS`] (a frame of the low
//! 1 MiB the allocator never hands out) through the direct map, and the
//! same page is mapped at its own address (identity, read-only and
//! executable) in the live tree while CPUs come up, because the first
//! instruction after paging is enabled runs at that address. It goes from
//! real mode straight to long mode: PAE, the live root in CR3 (which must
//! be below 4 GiB), EFER.LME|NXE, CR0.PE|PG|WP together, a far jump into a
//! 64-bit code segment of its own small GDT, then a jump to
//! [`smp_ap_native_entry`] at its kernel address on the stack prepared for
//! it. One CPU at a time uses the trampoline's data words.
//!
//! Invariant: the identity page exists only during [`start_native`]; the
//! trampoline frame is written only while no CPU executes it.

use core::arch::global_asm;
use core::sync::atomic::Ordering;

use crate::directmap::DirectMem;
use crate::kspace::{self, KspaceError};
use crate::percpu::{self, MAX_CPUS};
use crate::sched;
use crate::smp::{SmpError, SmpReport};
use crate::{apic, clock, Kernel};

/// Physical (and, during bring-up, virtual) address of the trampoline.
pub const TRAMPOLINE_PHYS: u64 = 0x8000;

global_asm!(
    r#"
    .pushsection .rodata.trampoline, "a", @progbits
    .balign 16
    .globl ap_tramp_start
ap_tramp_start:
    .code16
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    mov %cr4, %eax
    or $0x20, %eax                          # PAE
    mov %eax, %cr4
    movl (ap_tramp_cr3 - ap_tramp_start), %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx                   # EFER
    rdmsr
    or $0x900, %eax                         # LME | NXE
    wrmsr
    lgdtl (ap_tramp_gdtr - ap_tramp_start)
    mov %cr0, %eax
    or $0x80010001, %eax                    # PG | WP | PE
    mov %eax, %cr0
    .byte 0x66, 0xea                        # ljmpl $0x08, $tramp64 (absolute)
    .long 0x8000 + (ap_tramp_64 - ap_tramp_start)
    .word 0x08
    .code64
ap_tramp_64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov (0x8000 + (ap_tramp_stack - ap_tramp_start)), %rsp
    mov (0x8000 + (ap_tramp_cpu - ap_tramp_start)), %rdi
    mov (0x8000 + (ap_tramp_entry - ap_tramp_start)), %rax
    jmp *%rax
    .balign 8
ap_tramp_gdt:
    .quad 0
    # Accessed bits preset: loading a selector would otherwise write them
    # into this page, which is mapped read-only.
    .quad 0x00209b0000000000                # 64-bit code, DPL 0, accessed
    .quad 0x0000930000000000                # data, accessed
ap_tramp_gdtr:
    .word 23
    .long 0x8000 + (ap_tramp_gdt - ap_tramp_start)
    .balign 8
    .globl ap_tramp_cr3
ap_tramp_cr3:
    .quad 0
    .globl ap_tramp_stack
ap_tramp_stack:
    .quad 0
    .globl ap_tramp_entry
ap_tramp_entry:
    .quad 0
    .globl ap_tramp_cpu
ap_tramp_cpu:
    .quad 0
    .globl ap_tramp_end
ap_tramp_end:
    .popsection
"#,
    options(att_syntax)
);

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static ap_tramp_cr3: u8;
    static ap_tramp_stack: u8;
    static ap_tramp_entry: u8;
    static ap_tramp_cpu: u8;
}

fn sym(s: &u8) -> u64 {
    s as *const u8 as u64
}

/// Local APIC ids of the enabled CPUs the MADT lists.
#[derive(Debug, Clone, Copy)]
pub struct Madt {
    /// APIC ids.
    pub ids: [u32; MAX_CPUS],
    /// How many.
    pub count: usize,
    /// Enabled CPUs beyond [`MAX_CPUS`] (not started).
    pub ignored: usize,
}

/// Why the MADT could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiError {
    /// No RSDP address in the boot information.
    NoRsdp,
    /// A signature or checksum is wrong.
    Bad(&'static str),
    /// No MADT ("APIC") in the RSDT/XSDT.
    NoMadt,
    /// Mapping firmware memory failed.
    Map(KspaceError),
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
}

/// Reads a whole SDT (header, then the rest) at `phys`.
fn with_sdt<T>(phys: u64, f: impl FnOnce(&[u8]) -> T) -> Result<Option<T>, AcpiError> {
    let len = kspace::with_phys(phys, 36, |h| le32(h, 4).unwrap_or(0) as usize)
        .map_err(AcpiError::Map)?;
    if !(36..=60 * 1024).contains(&len) {
        return Ok(None);
    }
    kspace::with_phys(phys, len, |t| checksum_ok(t).then(|| f(t))).map_err(AcpiError::Map)
}

/// Finds the MADT from the RSDP and lists the enabled local APICs.
pub fn read_madt(rsdp: u64) -> Result<Madt, AcpiError> {
    if rsdp == 0 {
        return Err(AcpiError::NoRsdp);
    }
    let (rev, rsdt, xsdt) = kspace::with_phys(rsdp, 36, |r| {
        (&r[0..8] == b"RSD PTR " && checksum_ok(&r[..20]))
            .then(|| (r[15], le32(r, 16).unwrap_or(0), le64(r, 24).unwrap_or(0)))
    })
    .map_err(AcpiError::Map)?
    .ok_or(AcpiError::Bad("RSDP"))?;
    let (root, entry_size) = if rev >= 2 && xsdt != 0 {
        (xsdt, 8)
    } else {
        (u64::from(rsdt), 4)
    };
    let mut entries = [0u64; 32];
    let n = with_sdt(root, |t| {
        let mut n = 0;
        for (i, chunk) in t[36..].chunks_exact(entry_size).enumerate().take(32) {
            entries[i] = if entry_size == 8 {
                le64(chunk, 0).unwrap_or(0)
            } else {
                u64::from(le32(chunk, 0).unwrap_or(0))
            };
            n = i + 1;
        }
        n
    })?
    .ok_or(AcpiError::Bad("RSDT/XSDT"))?;
    for &table in &entries[..n] {
        let sig =
            kspace::with_phys(table, 4, |s| [s[0], s[1], s[2], s[3]]).map_err(AcpiError::Map)?;
        if &sig != b"APIC" {
            continue;
        }
        return with_sdt(table, parse_madt)?.ok_or(AcpiError::Bad("MADT"));
    }
    Err(AcpiError::NoMadt)
}

/// The enabled processor entries of a MADT (types 0 and 9).
fn parse_madt(t: &[u8]) -> Madt {
    let mut m = Madt {
        ids: [0; MAX_CPUS],
        count: 0,
        ignored: 0,
    };
    let mut at = 44;
    while at + 2 <= t.len() {
        let (kind, len) = (t[at], usize::from(t[at + 1]));
        if len < 2 || at + len > t.len() {
            break;
        }
        let e = &t[at..at + len];
        let cpu = match (kind, len) {
            (0, 8) if le32(e, 4).unwrap_or(0) & 1 != 0 => Some(u32::from(e[3])),
            (9, 16) if le32(e, 8).unwrap_or(0) & 1 != 0 => le32(e, 4),
            _ => None,
        };
        if let Some(id) = cpu {
            if m.count < MAX_CPUS {
                m.ids[m.count] = id;
                m.count += 1;
            } else {
                m.ignored += 1;
            }
        }
        at += len;
    }
    m
}

/// Starts every enabled CPU of the MADT other than this one.
pub fn start_native(kernel: &Kernel) -> SmpReport {
    let mut report = SmpReport {
        offered: 1,
        online: 1,
        failed: None,
    };
    let madt = match read_madt(kernel.rsdp) {
        Ok(m) => m,
        Err(e) => {
            log::warn!("no MADT ({e:?}): one CPU");
            return report;
        }
    };
    let me = apic::id();
    report.offered = madt.count.max(1);
    log::info!(
        "MADT: {} enabled CPUs, APIC ids {:?}{}",
        madt.count,
        &madt.ids[..madt.count],
        if madt.ignored > 0 {
            " (more ignored)"
        } else {
            ""
        }
    );
    let Some(root) = kernel.direct_map.as_ref().map(|d| d.root) else {
        return report;
    };
    if root.0 >= 1 << 20 {
        report.failed = Some((1, SmpError::NoRoot));
        log::error!("live root {root:?} above 4 GiB: the trampoline cannot load it");
        return report;
    }
    if let Err(e) = install_trampoline() {
        log::error!("trampoline: {e:?}");
        report.failed = Some((1, SmpError::Gdt(e)));
        return report;
    }
    let others = madt.ids[..madt.count].iter().filter(|&&id| id != me);
    for (cpu, &id) in (1..MAX_CPUS).zip(others) {
        match start_one(cpu, id, root.0 << 12) {
            Ok(()) => report.online += 1,
            Err(e) => {
                log::error!("cpu {cpu} (APIC id {id}) did not come up: {e:?}");
                report.failed.get_or_insert((cpu, e));
            }
        }
    }
    if let Err(e) = kspace::unmap_page(TRAMPOLINE_PHYS) {
        log::error!("cannot remove the trampoline's identity page: {e:?}");
    }
    report
}

/// Copies the trampoline to its frame and maps it at its own address.
fn install_trampoline() -> Result<(), KspaceError> {
    // SAFETY: only the addresses of the asm labels are taken.
    let (start, end) = unsafe { (sym(&ap_tramp_start), sym(&ap_tramp_end)) };
    let len = (end - start) as usize;
    let dst = DirectMem::va(pvmmu::Pfn(TRAMPOLINE_PHYS >> 12));
    // SAFETY: the trampoline bytes are in .rodata; the destination is RAM
    // frame 8, mapped writable in the direct map and used by nothing else
    // (the low 1 MiB is reserved out of the allocator); len < 4 KiB.
    unsafe { core::ptr::copy_nonoverlapping(start as *const u8, dst as *mut u8, len) };
    kspace::map_exec(TRAMPOLINE_PHYS, pvmmu::Pfn(TRAMPOLINE_PHYS >> 12))
}

/// Writes one of the trampoline's data words (in its low frame).
fn set_word(label: u64, value: u64) {
    // SAFETY: only the address of the label is taken.
    let start = unsafe { sym(&ap_tramp_start) };
    let dst = DirectMem::va(pvmmu::Pfn(TRAMPOLINE_PHYS >> 12)) + (label - start);
    // SAFETY: inside the trampoline frame (see `install_trampoline`); no
    // CPU runs the trampoline while we write (one at a time).
    unsafe { core::ptr::write_volatile(dst as *mut u64, value) };
}

fn start_one(cpu: usize, apic_id: u32, cr3: u64) -> Result<(), SmpError> {
    let (_idle, stack) = sched::spawn_idle_for(cpu).map_err(SmpError::Sched)?;
    percpu::prepare(cpu);
    // SAFETY: only the addresses of the asm labels are taken.
    unsafe {
        set_word(sym(&ap_tramp_cr3), cr3);
        set_word(sym(&ap_tramp_stack), stack.top);
        set_word(
            sym(&ap_tramp_entry),
            smp_ap_native_entry as *const () as u64,
        );
        set_word(sym(&ap_tramp_cpu), cpu as u64);
    }
    // In the kernel space's mask before the trampoline loads the root.
    crate::kspace::ACTIVE.activate(cpu);
    core::sync::atomic::fence(Ordering::SeqCst);
    let page = (TRAMPOLINE_PHYS >> 12) as u8;
    apic::send_init_sipi(apic_id, None);
    clock::spin_ns(10_000_000);
    apic::send_init_sipi(apic_id, Some(page));
    clock::spin_ns(200_000);
    if !percpu::CPUS[cpu].online.load(Ordering::Acquire) {
        apic::send_init_sipi(apic_id, Some(page));
    }
    crate::smp::wait_online(cpu)
}

/// First 64-bit code of a native AP at its kernel address (interrupts off,
/// on its idle thread's stack): GS, GDT/TSS, IDT, then the common path.
#[no_mangle]
extern "C" fn smp_ap_native_entry(cpu: u64) -> ! {
    if percpu::install(cpu as usize).is_err() {
        loop {
            x86_64::instructions::hlt();
        }
    }
    crate::traps::init_native_ap(cpu as usize);
    crate::platform::program_pat();
    crate::smp::smp_ap_main(cpu)
}
