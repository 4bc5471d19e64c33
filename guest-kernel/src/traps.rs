//! Exception handling: an IDT natively, a virtual trap table (through
//! `set_trap_table`) under Xen PV, one Rust dispatcher behind both.
//!
//! Frames: natively the CPU pushes `[error code,] rip, cs, rflags, rsp, ss`.
//! Under 64-bit Xen PV, Xen's bounce frame adds `rcx` and `r11` on top
//! (`rcx, r11, [error code,] rip, ...`); the PV stubs restore those two
//! registers and drop them, so both paths build the same [`TrapFrame`].
//! Returning from a handled exception is `iretq` natively and the `iret`
//! hypercall under PV (the guest kernel runs in ring 3 there).
//!
//! An exception is either expected, at one of the probe instructions below
//! (like Linux's exception table: the dispatcher puts the fault in the
//! probe's return registers and resumes at the probe's fixup label), or fatal: it prints vector, error
//! code, rip and cr2 and takes the panic path.
//!
//! Invariant: the dispatcher never returns to a faulting instruction; it
//! either moves `rip` to a fixup label or does not return at all.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::platform;

/// The boot GDT's 64-bit code selector (see `boot.rs`).
const KERNEL_CS: u16 = 0x08;

/// Vector numbers.
pub mod vector {
    /// #UD invalid opcode.
    pub const UD: u8 = 6;
    /// #PF page fault.
    pub const PF: u8 = 14;
}

/// Page-fault error code bits.
pub mod pf {
    /// The page was present (protection violation).
    pub const PRESENT: u64 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u64 = 1 << 1;
    /// The access was an instruction fetch.
    pub const FETCH: u64 = 1 << 4;
}

// Per-vector entry stubs for both entry conventions, the common save /
// dispatch / restore path, and the probe routines.
global_asm!(
    r#"
    .pushsection .text.traps, "ax", @progbits
    .code64

    .macro native_stub vec, err
    .balign 16
trap_native_\vec:
    .if \err == 0
    push $0
    .endif
    push $\vec
    jmp trap_common_native
    .endm

    .macro pv_stub vec, err
    .balign 16
trap_pv_\vec:
    mov (%rsp), %rcx
    mov 8(%rsp), %r11
    add $16, %rsp
    .if \err == 0
    push $0
    .endif
    push $\vec
    jmp trap_common_pv
    .endm

    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    native_stub \v, 0
    pv_stub \v, 0
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
    native_stub \v, 1
    pv_stub \v, 1
    .endr

    # Native interrupt vectors 32..255: one 16-byte stub each, in order,
    # so vector v's stub is at trap_native_irq_stubs + 16 * (v - 32).
    .balign 16
    .globl trap_native_irq_stubs
trap_native_irq_stubs:
    .set irqvec, 32
    .rept 224
    .balign 16
    push $0
    push $irqvec
    jmp trap_common_native
    .set irqvec, irqvec + 1
    .endr

    # Xen PV event upcall: the same bounce frame as an exception without
    # an error code; dispatched as pseudo-vector 256.
    .balign 16
    .globl event_upcall_pv
event_upcall_pv:
    mov (%rsp), %rcx
    mov 8(%rsp), %r11
    add $16, %rsp
    push $0
    push $256
    jmp trap_common_pv

    # Xen PV failsafe callback: rcx, r11, ds, es, fs, gs, then the iret
    # frame. Nothing loads user segments, so it only reports.
    .balign 16
    .globl failsafe_callback_pv
failsafe_callback_pv:
    mov 48(%rsp), %rdi
    and $-16, %rsp
    call failsafe_callback
    ud2

    .macro save_and_dispatch
    cld
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    mov %rsp, %rbx
    and $-16, %rsp
    call trap_dispatch
    mov %rbx, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp                   # vector, error code
    .endm

trap_common_native:
    save_and_dispatch
    iretq

trap_common_pv:
    save_and_dispatch
    # HYPERVISOR_iret frame: rax, r11, rcx, flags, then the iret frame.
    push $0                         # flags: not returning from a syscall
    push %rcx
    push %r11
    push %rax
    mov $23, %eax                   # __HYPERVISOR_iret
    syscall
    ud2

    .globl trap_native_stubs
trap_native_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad trap_native_\v
    .endr
    .globl trap_pv_stubs
trap_pv_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad trap_pv_\v
    .endr

    # Probes: rax = value, rdx = 0; after a fault the dispatcher sets
    # rdx = 1 | vector << 8 | error code << 16 and rax = CR2.
    .globl probe_read_u64
probe_read_u64:
    xor %eax, %eax
    xor %edx, %edx
    .globl probe_read_insn
probe_read_insn:
    mov (%rdi), %rax
    .globl probe_read_fixup
probe_read_fixup:
    ret

    .globl probe_write_u64
probe_write_u64:
    xor %eax, %eax
    xor %edx, %edx
    .globl probe_write_insn
probe_write_insn:
    mov %rsi, (%rdi)
    .globl probe_write_fixup
probe_write_fixup:
    ret

    # Calls the code at rdi (which must be a plain `ret` if it runs); an
    # instruction-fetch fault there resumes at the fixup with the return
    # address popped (see `trap_dispatch`).
    .globl probe_exec_u64
probe_exec_u64:
    xor %eax, %eax
    xor %edx, %edx
    call *%rdi
    .globl probe_exec_fixup
probe_exec_fixup:
    ret

    .globl probe_ud2
probe_ud2:
    xor %eax, %eax
    xor %edx, %edx
    .globl probe_ud2_insn
probe_ud2_insn:
    ud2
    .globl probe_ud2_fixup
probe_ud2_fixup:
    ret
    .popsection
"#,
    options(att_syntax)
);

/// What the probe routines return (`rax`, `rdx`).
#[repr(C)]
struct ProbeResult {
    value: u64,
    faulted: u64,
}

extern "C" {
    static trap_native_stubs: [u64; 32];
    static trap_native_irq_stubs: u8;
    static trap_pv_stubs: [u64; 32];
    fn probe_read_u64(addr: u64) -> ProbeResult;
    fn probe_write_u64(addr: u64, value: u64) -> ProbeResult;
    fn probe_ud2() -> ProbeResult;
    fn probe_exec_u64(target: u64) -> ProbeResult;
    static probe_read_insn: u8;
    static probe_read_fixup: u8;
    static probe_write_insn: u8;
    static probe_write_fixup: u8;
    static probe_ud2_insn: u8;
    static probe_ud2_fixup: u8;
    static probe_exec_fixup: u8;
}

/// The saved state of an interrupted context, as the stubs build it.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    /// General-purpose registers, as pushed (r15 lowest).
    pub r15: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    #[allow(missing_docs)]
    pub rax: u64,
    /// Exception vector.
    pub vector: u64,
    /// Error code (0 for vectors without one).
    pub error_code: u64,
    /// Faulting instruction.
    pub rip: u64,
    /// Code selector.
    pub cs: u64,
    /// Flags.
    pub rflags: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Stack selector.
    pub ss: u64,
}

/// A fault caught by a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Exception vector.
    pub vector: u8,
    /// Error code.
    pub error_code: u64,
    /// CR2 (page faults; 0 otherwise).
    pub cr2: u64,
}

/// How a caught fault travels back to its probe: in the probe's own return
/// registers (`rdx` = 1 | vector << 8 | error code << 16, `rax` = CR2), so
/// probes on several CPUs at once, or a thread that migrates right after
/// its probe, never read another fault's record. Error codes are at most
/// 32 bits wide (the CPU and Xen push them zero-extended).
fn fault_registers(frame: &mut TrapFrame, cr2: u64) {
    frame.rdx = 1 | (frame.vector & 0xff) << 8 | (frame.error_code & 0xffff_ffff) << 16;
    frame.rax = cr2;
}
/// Exceptions taken (expected and fatal).
static TRAPS_TAKEN: AtomicU64 = AtomicU64::new(0);

/// Number of exceptions the dispatcher has seen since boot.
pub fn traps_taken() -> u64 {
    TRAPS_TAKEN.load(Ordering::Relaxed)
}

fn read_cr2() -> u64 {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects; under Xen PV the privileged
    // read is emulated by Xen and returns the guest's virtual CR2.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    cr2
}

fn addr(s: &u8) -> u64 {
    s as *const u8 as u64
}

/// Fixup label for a probe instruction at `rip`, if it is one.
fn fixup_for(rip: u64) -> Option<u64> {
    // SAFETY: only the addresses of the asm labels are taken.
    let table = unsafe {
        [
            (addr(&probe_read_insn), addr(&probe_read_fixup)),
            (addr(&probe_write_insn), addr(&probe_write_fixup)),
            (addr(&probe_ud2_insn), addr(&probe_ud2_fixup)),
        ]
    };
    table
        .iter()
        .find(|(insn, _)| *insn == rip)
        .map(|(_, fix)| *fix)
}

/// Name of an exception vector.
pub fn vector_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        _ => "?",
    }
}

/// First vector of a device or timer interrupt (natively).
pub const FIRST_IRQ_VECTOR: u64 = 32;
/// The pseudo-vector the PV event upcall stub dispatches as.
pub const EVENT_VECTOR: u64 = 256;

/// Exceptions taken while another handler was running (nested).
static NESTED_EXCEPTIONS: AtomicU64 = AtomicU64::new(0);
/// Interrupts (native IRQs and PV upcalls) taken.
static INTERRUPTS: AtomicU64 = AtomicU64::new(0);

/// Exceptions taken inside another handler since boot.
pub fn nested_exceptions() -> u64 {
    NESTED_EXCEPTIONS.load(Ordering::Relaxed)
}

/// Interrupts taken since boot.
pub fn interrupts() -> u64 {
    INTERRUPTS.load(Ordering::Relaxed)
}

/// A hook run inside the handler of every expected (probe) fault (tests:
/// work done in a nested exception).
static PROBE_FAULT_HOOK: spin::Mutex<Option<fn()>> = spin::Mutex::new(None);

/// Installs (or clears) the probe-fault hook.
pub fn set_probe_fault_hook(hook: Option<fn()>) {
    let _g = crate::irq::save();
    *PROBE_FAULT_HOOK.lock() = hook;
}

/// Called by the stubs with the saved frame: interrupts (native vectors
/// 32..=255, the PV event upcall) go to their handlers, exceptions to
/// [`exception`]. The handler depth is tracked around both; when the
/// outermost interrupt handler is done the scheduler may switch threads
/// (the only preemption point), still with interrupts off.
#[no_mangle]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    crate::irq::enter();
    let is_irq = frame.vector >= FIRST_IRQ_VECTOR;
    if is_irq {
        INTERRUPTS.fetch_add(1, Ordering::Relaxed);
        interrupt(frame.vector);
    } else {
        if crate::irq::depth() > 1 {
            NESTED_EXCEPTIONS.fetch_add(1, Ordering::Relaxed);
        }
        exception(frame);
    }
    let depth = crate::irq::exit();
    if is_irq && depth == 0 {
        crate::sched::irq_return();
    }
}

/// One interrupt.
fn interrupt(vector: u64) {
    match vector {
        EVENT_VECTOR => crate::events::upcall(),
        v if v == u64::from(crate::apic::TIMER_VECTOR) => {
            crate::apic::eoi();
            crate::timer::on_tick();
        }
        v if v == u64::from(crate::apic::SPURIOUS_VECTOR) => {}
        v if v == u64::from(crate::shootdown::SHOOTDOWN_VECTOR) => {
            crate::apic::eoi();
            crate::shootdown::on_ipi();
        }
        v if v == u64::from(crate::ipi::RESCHED_VECTOR) => {
            crate::apic::eoi();
            crate::ipi::on_resched();
        }
        v => {
            crate::apic::eoi();
            log::warn!("unexpected interrupt vector {v}");
        }
    }
}

/// One exception: a probe's expected fault, or fatal.
fn exception(frame: &mut TrapFrame) {
    TRAPS_TAKEN.fetch_add(1, Ordering::Relaxed);
    let cr2 = if frame.vector == u64::from(vector::PF) || frame.vector == DOUBLE_FAULT as u64 {
        read_cr2()
    } else {
        0
    };
    if exec_probe_fault(frame, cr2) {
        // An instruction fetch from the probed page faulted: return to the
        // probe as if the `ret` there had run, with the fault recorded.
        fault_registers(frame, cr2);
        // SAFETY: only the address of the asm label is taken.
        frame.rip = addr(unsafe { &probe_exec_fixup });
        frame.rsp += 8;
        return;
    }
    if let Some(fixup) = fixup_for(frame.rip) {
        let hook = *PROBE_FAULT_HOOK.lock();
        if let Some(hook) = hook {
            hook();
        }
        fault_registers(frame, cr2);
        frame.rip = fixup;
        return;
    }
    // SAFETY: one CPU; this path never returns to the interrupted code.
    unsafe { crate::console::break_lock() };
    // SAFETY: this path never returns to the interrupted code.
    if let Some(name) = unsafe { crate::sched::guard_owner(cr2) } {
        crate::kprintln!(
            "STACK OVERFLOW: thread '{name}' hit its stack guard page at {cr2:#x} ({})",
            vector_name(frame.vector)
        );
        panic!(
            "stack overflow in thread '{name}' (guard page {:#x})",
            cr2 & !0xfff
        );
    }
    if frame.vector == u64::from(vector::PF) {
        if let Some(pfn) = crate::pagealloc::use_after_free(cr2, frame.error_code) {
            let access = if frame.error_code & pf::WRITE != 0 {
                "write"
            } else {
                "read"
            };
            crate::kprintln!(
                "USE-AFTER-FREE: {access} of freed frame pfn {pfn:#x} at {cr2:#x} (rip {:#x}; \
                 DEBUG_PAGEALLOC keeps free frames out of the direct map)",
                frame.rip
            );
        }
    }
    crate::kprintln!(
        "TRAP vector {} ({}) error_code {:#x} rip {:#x} cr2 {:#x} rsp {:#x} cs {:#x} rflags {:#x} \
         on cpu {} thread {}",
        frame.vector,
        vector_name(frame.vector),
        frame.error_code,
        frame.rip,
        cr2,
        frame.rsp,
        frame.cs & 0xffff, // Xen PV keeps the saved upcall mask in bits 32..40
        frame.rflags,
        crate::percpu::cpu_id(),
        crate::percpu::CPUS[crate::percpu::cpu_id()]
            .current
            .load(Ordering::Relaxed)
    );
    panic!(
        "unexpected exception {} ({}) at rip {:#x}",
        frame.vector,
        vector_name(frame.vector),
        frame.rip
    );
}

/// Whether `frame` is `probe_exec`'s call faulting on its fetch: a #PF
/// fetching at the faulting address whose top of stack is the return
/// address into `probe_exec_u64` (the stack the frame was pushed on is
/// mapped, so reading its top cannot fault).
fn exec_probe_fault(frame: &TrapFrame, cr2: u64) -> bool {
    if frame.vector != u64::from(vector::PF)
        || frame.error_code & pf::FETCH == 0
        || cr2 != frame.rip
    {
        return false;
    }
    // SAFETY: `frame.rsp` is the interrupted stack pointer; the exception
    // frame was pushed just below it on the same stack, so the word at it
    // is mapped and readable.
    let ret = unsafe { core::ptr::read_volatile(frame.rsp as *const u64) };
    // SAFETY: only the address of the asm label is taken.
    ret == addr(unsafe { &probe_exec_fixup })
}

fn probe_outcome(r: ProbeResult) -> Result<u64, Fault> {
    if r.faulted == 0 {
        Ok(r.value)
    } else {
        Err(Fault {
            vector: (r.faulted >> 8) as u8,
            error_code: r.faulted >> 16,
            cr2: r.value,
        })
    }
}

/// Reads the 8 bytes at `va`, or reports the fault the read raised.
///
/// # Safety
/// Reading `va`, if it is mapped, must have no side effects (not MMIO).
pub unsafe fn probe_read(va: u64) -> Result<u64, Fault> {
    // SAFETY: a fault in the probe is caught by `trap_dispatch` (handlers
    // installed by `init`); the caller vouches for side-effect freedom.
    probe_outcome(unsafe { probe_read_u64(va) })
}

/// Writes `value` to the 8 bytes at `va`, or reports the fault.
///
/// # Safety
/// If `va` is writable, the caller must own those 8 bytes.
pub unsafe fn probe_write(va: u64, value: u64) -> Result<(), Fault> {
    // SAFETY: as for `probe_read`; the caller owns the target if mapped.
    probe_outcome(unsafe { probe_write_u64(va, value) }).map(|_| ())
}

/// Calls the code at `va`, or reports the fault the instruction fetch
/// raised (for NX checks).
///
/// # Safety
/// If `va` is executable, the byte there must be `ret` (0xc3): nothing else
/// runs.
pub unsafe fn probe_exec(va: u64) -> Result<(), Fault> {
    // SAFETY: a fetch fault at `va` is caught by `trap_dispatch` (handlers
    // installed by `init`); otherwise the caller vouches `va` holds `ret`.
    probe_outcome(unsafe { probe_exec_u64(va) }).map(|_| ())
}

/// Executes `ud2`; returns the fault it raised (`Ok` would mean the
/// exception never arrived).
pub fn probe_invalid_opcode() -> Result<(), Fault> {
    // SAFETY: the #UD is caught by `trap_dispatch` once `init` ran.
    probe_outcome(unsafe { probe_ud2() }).map(|_| ())
}

/// An IDT gate (interrupt gate, DPL 0; IST 1 for the double fault).
#[repr(C)]
#[derive(Clone, Copy)]
struct IdtGate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

/// The native IDT: exceptions and every interrupt vector.
#[repr(C, align(16))]
struct Idt([IdtGate; 256]);

static IDT: spin::Once<Idt> = spin::Once::new();

/// Why installing the handlers failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapError {
    /// Xen refused the trap table.
    SetTrapTable(hypercall::XenError),
}

/// Installs the exception handlers for the recorded platform.
pub fn init() -> Result<(), TrapError> {
    if platform::is_xen_pv() {
        init_pv()
    } else {
        init_native();
        Ok(())
    }
}

/// Vector of the double fault, which runs on its own stack (IST 1).
const DOUBLE_FAULT: usize = 8;

static TSS: spin::Once<x86_64::structures::tss::TaskStateSegment> = spin::Once::new();
static GDT: spin::Once<(
    x86_64::structures::gdt::GlobalDescriptorTable,
    x86_64::structures::gdt::SegmentSelector,
)> = spin::Once::new();

/// Replaces the boot GDT by one with the same code (0x08) and data (0x10)
/// selectors plus a TSS whose IST 1 is the double-fault stack, and loads
/// the TSS.
fn init_native_tss() {
    use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
    let tss = TSS.call_once(|| {
        let mut tss = x86_64::structures::tss::TaskStateSegment::new();
        tss.interrupt_stack_table[0] =
            x86_64::VirtAddr::new(crate::boot::image_layout().double_fault_stack_top);
        tss
    });
    let (gdt, tss_selector) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        debug_assert_eq!((code.0, data.0), (0x08, 0x10));
        let tss_selector = gdt.append(Descriptor::tss_segment(tss));
        (gdt, tss_selector)
    });
    gdt.load();
    // SAFETY: the GDT just loaded holds a valid, not yet busy TSS descriptor
    // at `tss_selector`, and both live in statics forever.
    unsafe { x86_64::instructions::tables::load_tss(*tss_selector) };
}

/// Per-CPU TSS and GDT of the application processors (the boot CPU uses
/// [`TSS`] and [`GDT`]).
static AP_TSS: [spin::Once<x86_64::structures::tss::TaskStateSegment>; crate::percpu::MAX_CPUS] =
    [const { spin::Once::new() }; crate::percpu::MAX_CPUS];
#[allow(clippy::type_complexity)]
static AP_GDT: [spin::Once<(
    x86_64::structures::gdt::GlobalDescriptorTable,
    x86_64::structures::gdt::SegmentSelector,
)>; crate::percpu::MAX_CPUS] = [const { spin::Once::new() }; crate::percpu::MAX_CPUS];

/// An application processor's descriptor tables: its own GDT (same code and
/// data selectors as the boot CPU's) and TSS, whose IST 1 is a double-fault
/// stack of its own (mapped through pvmmu with a guard page), and the
/// shared IDT.
pub fn init_native_ap(cpu: usize) {
    use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
    let df_top = match crate::kspace::alloc_stack(2) {
        Ok(st) => st.top,
        Err(e) => panic!("cpu {cpu}: no double-fault stack: {e:?}"),
    };
    let tss = AP_TSS[cpu].call_once(|| {
        let mut tss = x86_64::structures::tss::TaskStateSegment::new();
        tss.interrupt_stack_table[0] = x86_64::VirtAddr::new(df_top);
        tss
    });
    let (gdt, tss_selector) = AP_GDT[cpu].call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        gdt.append(Descriptor::kernel_code_segment());
        gdt.append(Descriptor::kernel_data_segment());
        let sel = gdt.append(Descriptor::tss_segment(tss));
        (gdt, sel)
    });
    gdt.load();
    // SAFETY: CS 0x08 is the 64-bit code segment of the GDT just loaded
    // (the trampoline's own GDT had the same layout); data selectors 0x10.
    unsafe {
        use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
        use x86_64::structures::gdt::SegmentSelector;
        use x86_64::PrivilegeLevel;
        CS::set_reg(SegmentSelector::new(1, PrivilegeLevel::Ring0));
        let data = SegmentSelector::new(2, PrivilegeLevel::Ring0);
        DS::set_reg(data);
        ES::set_reg(data);
        SS::set_reg(data);
        x86_64::instructions::tables::load_tss(*tss_selector);
    }
    load_idt();
}

fn init_native() {
    init_native_tss();
    IDT.call_once(|| {
        // SAFETY: `trap_native_stubs` is a constant table in .text.
        let stubs = unsafe { &trap_native_stubs };
        let mut gates = [IdtGate {
            offset_low: 0,
            selector: 0,
            ist: 0,
            type_attr: 0,
            offset_mid: 0,
            offset_high: 0,
            reserved: 0,
        }; 256];
        // SAFETY: only the address of the asm label is taken.
        let irq_base = addr(unsafe { &trap_native_irq_stubs });
        let handlers = stubs
            .iter()
            .copied()
            .chain((0..224u64).map(|i| irq_base + 16 * i));
        for (gate, handler) in gates.iter_mut().zip(handlers) {
            *gate = IdtGate {
                offset_low: handler as u16,
                selector: KERNEL_CS,
                ist: 0,
                type_attr: 0x8e, // present, DPL 0, 64-bit interrupt gate
                offset_mid: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                reserved: 0,
            };
        }
        gates[DOUBLE_FAULT].ist = 1;
        Idt(gates)
    });
    load_idt();
}

/// Loads the shared IDT on this CPU (built by the boot CPU's `init`).
fn load_idt() {
    let Some(idt) = IDT.get() else {
        panic!("IDT not built");
    };
    let ptr = x86_64::structures::DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: x86_64::VirtAddr::new(idt as *const Idt as u64),
    };
    // SAFETY: the IDT is in a static that lives forever, its gates point at
    // the stubs above with the code selector every CPU's GDT has.
    unsafe { x86_64::instructions::tables::lidt(&ptr) };
}

/// The PV trap table: one entry per exception vector plus the zero
/// terminator, every entry masking events on entry (flag bit 2).
pub fn pv_trap_table() -> [hypercall::ops::TrapInfo; 33] {
    use hypercall::ops::{TrapInfo, FLAT_KERNEL_CS64};
    // SAFETY: `trap_pv_stubs` is a constant table in .text.
    let stubs = unsafe { &trap_pv_stubs };
    let mut table = [TrapInfo {
        vector: 0,
        flags: 0,
        cs: 0,
        address: 0,
    }; 33];
    for (i, (slot, &handler)) in table.iter_mut().zip(stubs.iter()).enumerate() {
        *slot = TrapInfo {
            vector: i as u8,
            // DPL 0 (`int n` from user space may not raise it); bit 2: Xen
            // masks events on entry, as an interrupt gate clears IF.
            flags: 4,
            cs: FLAT_KERNEL_CS64,
            address: handler,
        };
    }
    table
}

fn init_pv() -> Result<(), TrapError> {
    let table = pv_trap_table();
    // SAFETY: we are PV (checked by `init`); every handler is a PV stub
    // expecting Xen's 64-bit bounce frame; the table ends with a zero entry.
    unsafe { hypercall::ops::set_trap_table(&table) }.map_err(TrapError::SetTrapTable)
}
