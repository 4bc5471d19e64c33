//! Entry points, Xen ELF notes and the boot stack.
//!
//! Two ways in, one image:
//! * `pv_entry`: Xen's PV domain builder jumps here in 64-bit mode on Xen's
//!   initial page tables, with `rsi` = virtual address of `start_info` and
//!   event delivery masked.
//! * `pvh_entry`: QEMU's PVH loader (or Xen's PVH domain builder, `xl
//!   create` with `type = "pvh"`) jumps here in 32-bit protected mode with
//!   paging off and `ebx` = physical address of `hvm_start_info`. A
//!   trampoline builds the boot page tables, enters long mode and moves to
//!   the high-half link address.
//!
//! Invariant: both entries zero `.bss` before anything uses it and call Rust
//! on the kernel's own stack (`BOOT_STACK`), never on the loader's. The page
//! below the stack (`BOOT_STACK_GUARD`) is never mapped at its link address
//! (the PVH trampoline leaves it out; the PV path unmaps it first thing), so
//! a stack overflow faults instead of corrupting `.bss`.

use core::arch::global_asm;

/// Size of the kernel's boot stack in `.bss`.
pub const BOOT_STACK_SIZE: usize = 128 * 1024;

/// Size of the native double-fault (IST 1) stack in `.bss`.
pub const DOUBLE_FAULT_STACK_SIZE: usize = 16 * 1024;

/// Where the kernel is linked: virtual = `KERNEL_VMA` + physical.
pub const KERNEL_VMA: u64 = 0xffff_ffff_8000_0000;

// The Xen ELF notes (xen/include/public/elfnote.h). Strings are
// NUL-terminated; numbers are 64-bit. The section is 4-byte aligned so the
// note layout is the one Xen's libelf and QEMU's PVH loader parse.
global_asm!(
    r#"
    .macro xen_note type, desc_start, desc_end
        .balign 4
        .long 4
        .long \desc_end - \desc_start
        .long \type
        .asciz "Xen"
        .balign 4
    .endm

    .pushsection .note.Xen, "a", @note
    .balign 4
    xen_note 6, 1f, 2f
1:  .asciz "pvmmu"
2:  xen_note 7, 1f, 2f
1:  .asciz "0.1"
2:  xen_note 5, 1f, 2f
1:  .asciz "xen-3.0"
2:  xen_note 8, 1f, 2f
1:  .asciz "generic"
2:  xen_note 1, 1f, 2f
1:  .quad pv_entry
2:  xen_note 2, 1f, 2f
1:  .quad HYPERCALL_PAGE
2:  xen_note 3, 1f, 2f
1:  .quad 0xffffffff80000000
2:  xen_note 4, 1f, 2f
1:  .quad 0
2:  xen_note 10, 1f, 2f
1:  .asciz "!writable_page_tables"
2:  xen_note 18, 1f, 2f
1:  .quad pvh_entry - 0xffffffff80000000
2:  .balign 4
    .popsection
"#,
    options(att_syntax)
);

// The hypercall page: Xen fills it with call stubs at PV boot, where the
// kernel does not call through it (hypercall::raw issues `syscall`
// directly) but the HYPERCALL_PAGE note must name a page inside the image.
// Under Xen PVH the kernel has Xen fill it through the hypercall MSR and
// calls through it (xen_hvm.rs). xen-sys refers to the symbol too.
global_asm!(
    r#"
    .pushsection .text.hypercall_page, "ax", @progbits
    .balign 4096
    .globl HYPERCALL_PAGE
HYPERCALL_PAGE:
    .fill 4096, 1, 0xcc
    .popsection
"#,
    options(att_syntax)
);

// Boot stack, PVH boot page tables, boot GDT.
global_asm!(
    r#"
    .pushsection .bss.boot_stack, "aw", @nobits
    .balign 4096
    .globl BOOT_STACK_GUARD
BOOT_STACK_GUARD:                   # left unmapped: an overflow faults
    .skip 4096
    .globl BOOT_STACK
BOOT_STACK:
    .skip {stack_size}
    .globl BOOT_STACK_TOP
BOOT_STACK_TOP:
    .globl DOUBLE_FAULT_STACK
DOUBLE_FAULT_STACK:                 # IST stack for #DF (native)
    .skip {df_stack_size}
    .globl DOUBLE_FAULT_STACK_TOP
DOUBLE_FAULT_STACK_TOP:

    .balign 4096
    .globl PVH_PML4
PVH_PML4:       .skip 4096
PVH_PDPT_LOW:   .skip 4096
PVH_PDPT_HIGH:  .skip 4096
PVH_PD_HIGH:    .skip 4096          # high 0..1 GiB: the guard's 2 MiB via PVH_PT_HIGH
PVH_PT_HIGH:    .skip 4096          # the stack guard's 2 MiB in 4 KiB pages
    .globl PVH_PD
PVH_PD:         .skip 4 * 4096
    .globl PVH_TABLES_END
PVH_TABLES_END:
    .popsection

    .pushsection .rodata.boot_gdt, "a", @progbits
    .balign 16
    .globl BOOT_GDT
BOOT_GDT:
    .quad 0                         # null
    .quad 0x00af9a000000ffff        # 0x08: 64-bit code, DPL 0
    .quad 0x00cf92000000ffff        # 0x10: flat data
BOOT_GDT_END:
    .balign 4
    .word 0
BOOT_GDT_PTR32:                     # lgdt operand before paging: physical base
    .word BOOT_GDT_END - BOOT_GDT - 1
    .long BOOT_GDT - 0xffffffff80000000
    .balign 8
    .word 0, 0, 0
BOOT_GDT_PTR64:                     # lgdt operand in long mode: virtual base
    .word BOOT_GDT_END - BOOT_GDT - 1
    .quad BOOT_GDT
    .popsection
"#,
    stack_size = const BOOT_STACK_SIZE,
    df_stack_size = const DOUBLE_FAULT_STACK_SIZE,
    options(att_syntax)
);

// 64-bit PV entry.
global_asm!(
    r#"
    .pushsection .text.boot, "ax", @progbits
    .code64
    .globl pv_entry
pv_entry:
    cld
    # Zero .bss (our stack lives there; we still run on Xen's).
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    rep stosb
    lea BOOT_STACK_TOP(%rip), %rsp
    xor %ebp, %ebp
    mov %rsi, %rdi                  # start_info virtual address
    call pv_main
1:  ud2
    jmp 1b
    .popsection
"#,
    options(att_syntax)
);

// 32-bit PVH entry and the trampoline to long mode.
global_asm!(
    r#"
    .pushsection .text.boot, "ax", @progbits
    .set KVMA, 0xffffffff80000000
    .code32
    .globl pvh_entry
pvh_entry:
    cli
    cld
    mov %ebx, %esi                  # hvm_start_info (physical); cpuid clobbers ebx

    # Zero .bss at its physical address (paging is off).
    mov $(__bss_start - KVMA), %edi
    mov $(__bss_end - KVMA), %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl

    # 4 page directories of 2 MiB pages: identity map of 0..4 GiB.
    mov $(PVH_PD - KVMA), %edi
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax                  # present | writable | 2 MiB page
    mov %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 1b

    # Low PDPT: 4 x 1 GiB -> the 4 directories.
    mov $(PVH_PDPT_LOW - KVMA), %edi
    mov $(PVH_PD - KVMA + 3), %eax
    mov %eax, 0(%edi)
    add $4096, %eax
    mov %eax, 8(%edi)
    add $4096, %eax
    mov %eax, 16(%edi)
    add $4096, %eax
    mov %eax, 24(%edi)

    # High page table: the 2 MiB holding the boot stack's guard page, in
    # 4 KiB pages, except the guard page (wherever the image's size puts
    # it; %edx: the physical start of those 2 MiB).
    mov $(BOOT_STACK_GUARD - KVMA), %edx
    and $0xffe00000, %edx
    mov $(PVH_PT_HIGH - KVMA), %edi
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $12, %eax
    add %edx, %eax
    or $0x3, %eax                   # present | writable
    mov %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 1b
    mov $(BOOT_STACK_GUARD - KVMA), %ecx
    shr $12, %ecx
    and $511, %ecx
    movl $0, (%edi,%ecx,8)
    # High directory for physical 0..1 GiB: 2 MiB pages as in the identity
    # map, the guard's 2 MiB -> that table.
    mov $(PVH_PD_HIGH - KVMA), %edi
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 1b
    shr $21, %edx
    movl $(PVH_PT_HIGH - KVMA + 3), (%edi,%edx,8)

    # High PDPT: 0xffffffff80000000 (slots 510, 511) -> physical 0..2 GiB.
    mov $(PVH_PDPT_HIGH - KVMA), %edi
    mov $(PVH_PD_HIGH - KVMA + 3), %eax
    mov %eax, 510*8(%edi)
    mov $(PVH_PD - KVMA + 4096 + 3), %eax
    mov %eax, 511*8(%edi)

    # PML4: slot 0 -> low PDPT, slot 511 -> high PDPT.
    mov $(PVH_PML4 - KVMA), %edi
    movl $(PVH_PDPT_LOW - KVMA + 3), 0(%edi)
    movl $(PVH_PDPT_HIGH - KVMA + 3), 511*8(%edi)

    # NX available? (CPUID 0x80000001 EDX bit 20)
    mov $0x80000001, %eax
    cpuid
    mov %edx, %ebp

    mov %cr4, %eax
    or $0x20, %eax                  # PAE
    mov %eax, %cr4
    mov $(PVH_PML4 - KVMA), %eax
    mov %eax, %cr3

    mov $0xc0000080, %ecx           # EFER
    rdmsr
    or $0x100, %eax                 # LME
    test $(1 << 20), %ebp
    jz 2f
    or $0x800, %eax                 # NXE
2:  wrmsr

    mov %cr0, %eax
    or $0x80000001, %eax            # PG | PE
    mov %eax, %cr0

    lgdt (BOOT_GDT_PTR32 - KVMA)
    ljmp $0x08, $(pvh_long_mode - KVMA)

    .code64
pvh_long_mode:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    movabs $pvh_high, %rax
    jmp *%rax
pvh_high:
    lgdt BOOT_GDT_PTR64(%rip)
    lea BOOT_STACK_TOP(%rip), %rsp
    xor %ebp, %ebp
    mov %esi, %edi                  # hvm_start_info physical address
    call pvh_main
3:  hlt
    jmp 3b
    .popsection
"#,
    options(att_syntax)
);

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __bss_start: u8;
    static __bss_end: u8;
    static PVH_PML4: u8;
    static PVH_TABLES_END: u8;
    static BOOT_STACK_GUARD: u8;
    static BOOT_STACK: u8;
    static BOOT_STACK_TOP: u8;
    static DOUBLE_FAULT_STACK_TOP: u8;
}

/// A range of kernel virtual addresses `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl VirtRange {
    /// The physical (load) addresses of this range of the kernel image.
    pub const fn to_phys(self) -> (u64, u64) {
        (self.start - KERNEL_VMA, self.end - KERNEL_VMA)
    }
}

/// Virtual address of a linker symbol.
fn sym(s: &u8) -> u64 {
    s as *const u8 as u64
}

/// The kernel image sections, from the linker script's symbols.
#[derive(Debug, Clone, Copy)]
pub struct ImageLayout {
    /// Whole image, including `.bss`.
    pub image: VirtRange,
    /// Code (entry points, hypercall page, `.text`).
    pub text: VirtRange,
    /// Read-only data and the notes.
    pub rodata: VirtRange,
    /// `.data` and `.bss`.
    pub data: VirtRange,
    /// `.bss` alone.
    pub bss: VirtRange,
    /// The PVH boot page tables (in `.bss`; unused under PV).
    pub pvh_tables: VirtRange,
    /// The boot stack.
    pub stack: VirtRange,
    /// The unmapped guard page below the boot stack.
    pub stack_guard: VirtRange,
    /// Top of the native double-fault stack.
    pub double_fault_stack_top: u64,
}

/// Reads the image layout from the linker symbols.
pub fn image_layout() -> ImageLayout {
    // SAFETY: only the addresses of these linker-defined symbols are taken;
    // nothing is read through them.
    unsafe {
        ImageLayout {
            image: VirtRange {
                start: sym(&__kernel_start),
                end: sym(&__kernel_end),
            },
            text: VirtRange {
                start: sym(&__text_start),
                end: sym(&__text_end),
            },
            rodata: VirtRange {
                start: sym(&__rodata_start),
                end: sym(&__rodata_end),
            },
            data: VirtRange {
                start: sym(&__data_start),
                end: sym(&__kernel_end),
            },
            bss: VirtRange {
                start: sym(&__bss_start),
                end: sym(&__bss_end),
            },
            pvh_tables: VirtRange {
                start: sym(&PVH_PML4),
                end: sym(&PVH_TABLES_END),
            },
            stack: VirtRange {
                start: sym(&BOOT_STACK),
                end: sym(&BOOT_STACK_TOP),
            },
            stack_guard: VirtRange {
                start: sym(&BOOT_STACK_GUARD),
                end: sym(&BOOT_STACK),
            },
            double_fault_stack_top: sym(&DOUBLE_FAULT_STACK_TOP),
        }
    }
}
