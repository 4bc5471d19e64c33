//! The stack switch and the first frame of a new thread.
//!
//! A switched-out thread's stack holds, from its saved stack pointer up:
//! r15, r14, r13, r12, rbx, rbp (the System V callee-saved registers) and
//! the return address into `schedule`. A new thread's stack is made to
//! look the same, with the return address pointing at `thread_trampoline`,
//! which calls [`super::thread_start`] with a 16-byte-aligned stack.
//!
//! Invariant: `switch_stacks` is only entered with interrupts off, so no
//! handler runs on a half-switched stack.

use core::arch::global_asm;

global_asm!(
    r#"
    .pushsection .text.sched, "ax", @progbits
    .globl sched_switch_stacks
sched_switch_stacks:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, (%rdi)
    mov %rsi, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret

    .globl sched_thread_trampoline
sched_thread_trampoline:
    xor %ebp, %ebp
    call *%r12
    ud2
    .popsection
"#,
    options(att_syntax)
);

extern "C" {
    fn sched_switch_stacks(from_rsp: *mut u64, to_rsp: u64);
    fn sched_thread_trampoline();
}

/// Saves the current context's stack pointer in `*from_rsp` and resumes
/// the context saved at `to_rsp`.
///
/// # Safety
/// Interrupts off; `from_rsp` valid for a write; `to_rsp` a stack pointer
/// saved by this function or built by [`initial_frame`], on a mapped stack.
pub unsafe fn switch_stacks(from_rsp: *mut u64, to_rsp: u64) {
    // SAFETY: the caller's contract; the asm saves and restores every
    // callee-saved register, and the compiler treats the call as clobbering
    // the rest.
    unsafe { sched_switch_stacks(from_rsp, to_rsp) }
}

/// Builds a new thread's first frame below `top` (a mapped stack) and
/// returns the stack pointer to switch to.
pub fn initial_frame(top: u64) -> u64 {
    // After the six pops and the `ret`, rsp == top (16-byte aligned), so the
    // trampoline's `call` leaves the callee with the ABI's alignment.
    let frame = [
        0u64,                                        // r15
        0,                                           // r14
        0,                                           // r13
        super::thread_start as *const () as u64,     // r12: what the trampoline calls
        0,                                           // rbx
        0,                                           // rbp
        sched_thread_trampoline as *const () as u64, // return address
    ];
    let rsp = top - (frame.len() as u64) * 8;
    for (i, v) in frame.iter().enumerate() {
        // SAFETY: `top` is the top of a freshly mapped, writable stack of at
        // least one page that no thread runs on yet; the frame is 56 bytes.
        unsafe { core::ptr::write_volatile((rsp + i as u64 * 8) as *mut u64, *v) };
    }
    rsp
}
