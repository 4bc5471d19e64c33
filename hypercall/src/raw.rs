//! The hypercall instruction itself.
//!
//! A 64-bit PV guest kernel runs in ring 3; Xen treats a `syscall` issued
//! from guest kernel mode as a hypercall (number in `rax`, arguments in
//! `rdi`, `rsi`, `rdx`, `r10`, `r8`, result in `rax`). Linux has issued it
//! directly since 2024 instead of calling into the hypercall page, and so do
//! we: `syscall` clobbers `rcx` and `r11`, and a debug Xen may scramble the
//! argument registers, so every argument register is declared as clobbered.
//! The asm is not `nomem`/`readonly`, so it is a compiler memory barrier:
//! stores before it (page-table contents Xen is about to validate, request
//! arrays) are emitted before it and loads after it are not hoisted above it.
//! `syscall` does not touch the guest stack (`nostack` is honest); an event
//! delivered on return may push a frame, which the target's disabled red
//! zone allows.
//!
//! Invariant: these functions are only called when running as a Xen PV
//! guest. On anything else `syscall` from ring 0 is undefined behaviour of the
//! platform (a #UD or a jump through an unset LSTAR).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Number of hypercalls issued through this module since boot.
static HYPERCALLS: AtomicU64 = AtomicU64::new(0);

/// Hypercalls issued through [`call5`] (and so through every real wrapper).
pub fn hypercall_count() -> u64 {
    HYPERCALLS.load(Ordering::Relaxed)
}

/// Issues hypercall `nr` with five arguments and returns Xen's raw result.
///
/// # Safety
/// The caller must be a Xen PV guest kernel, and every pointer argument must
/// be valid for the access the hypercall makes (Xen checks guest handles and
/// returns `-EFAULT` for unmapped ones, but a pointer into memory the caller
/// does not own lets Xen read or write it).
#[inline]
pub unsafe fn call5(nr: u32, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    HYPERCALLS.fetch_add(1, Ordering::Relaxed);
    let ret: i64;
    // SAFETY: the caller guarantees we are a PV guest kernel (so `syscall`
    // enters Xen's hypercall path) and that pointer arguments are valid.
    // rcx/r11 are clobbered by `syscall`; argument registers may come back
    // changed and are declared as such.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") u64::from(nr) => ret,
            inlateout("rdi") a1 => _,
            inlateout("rsi") a2 => _,
            inlateout("rdx") a3 => _,
            inlateout("r10") a4 => _,
            inlateout("r8") a5 => _,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// [`call5`] with fewer arguments (the unused ones are zero).
///
/// # Safety
/// As for [`call5`].
#[inline]
pub unsafe fn call3(nr: u32, a1: u64, a2: u64, a3: u64) -> i64 {
    // SAFETY: forwarded contract.
    unsafe { call5(nr, a1, a2, a3, 0, 0) }
}

/// [`call5`] with two arguments.
///
/// # Safety
/// As for [`call5`].
#[inline]
pub unsafe fn call2(nr: u32, a1: u64, a2: u64) -> i64 {
    // SAFETY: forwarded contract.
    unsafe { call5(nr, a1, a2, 0, 0, 0) }
}
