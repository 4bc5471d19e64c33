//! The hypercall instruction itself, chosen at run time.
//!
//! * **PV** (the default): a 64-bit PV guest kernel runs in ring 3; Xen
//!   treats a `syscall` issued from guest kernel mode as a hypercall (number
//!   in `rax`, arguments in `rdi`, `rsi`, `rdx`, `r10`, `r8`, result in
//!   `rax`). Linux has issued it directly since 2024 instead of calling into
//!   the hypercall page, and so do we: `syscall` clobbers `rcx` and `r11`,
//!   and a debug Xen may scramble the argument registers, so every argument
//!   register is declared as clobbered. `syscall` does not touch the guest
//!   stack (`nostack` is honest); an event delivered on return may push a
//!   frame, which the target's disabled red zone allows.
//! * **HVM/PVH**, once [`use_hypercall_page`] has been called (by
//!   [`crate::hvm::install_hypercall_page`]): a `call` to the 32-byte stub of
//!   hypercall `nr` in the page Xen filled (`vmcall`/`vmmcall` inside). Same
//!   registers; the `call` pushes a return address, so that path is not
//!   `nostack`. A debug Xen scrambles unused argument registers here too.
//!
//! Both paths count in [`hypercall_count`] (one counter for the whole
//! guest) and call the count hook, if one is set ([`set_count_hook`]): a
//! kernel with per-CPU data counts there per CPU. Neither asm is `nomem` or
//! `readonly`, so each is a compiler memory barrier: stores before it
//! (page-table contents Xen is about to validate, request arrays) are
//! emitted before it and loads after it are not hoisted above it.
//!
//! Invariant: these functions are only called when running as a Xen PV
//! guest, or as an HVM/PVH guest after its hypercall page is installed. On
//! anything else `syscall` from ring 0 is undefined behaviour of the
//! platform (a #UD or a jump through an unset LSTAR).

use core::arch::asm;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use crate::XenError;

/// Number of hypercalls issued through this module since boot.
static HYPERCALLS: AtomicU64 = AtomicU64::new(0);

/// The count hook as a `fn()` cast to a pointer; null: none.
static COUNT_HOOK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

/// Virtual address of the installed hypercall page; 0 selects `syscall`.
static HYPERCALL_PAGE: AtomicU64 = AtomicU64::new(0);

/// Size of one hypercall stub in the hypercall page.
pub const STUB_SIZE: u64 = 32;

/// Makes every later hypercall call through the stubs at `page_va`
/// (hypercall `nr` at `page_va + nr * 32`); 0 goes back to `syscall`.
///
/// # Safety
/// `page_va` is 0, or maps, executable, a page Xen has filled with its
/// hypercall stubs (or, in host tests, stubs that honour the same register
/// contract), for as long as hypercalls are issued.
pub unsafe fn use_hypercall_page(page_va: u64) {
    HYPERCALL_PAGE.store(page_va, Ordering::SeqCst);
}

/// The installed hypercall page, if any.
pub fn hypercall_page() -> Option<u64> {
    match HYPERCALL_PAGE.load(Ordering::Relaxed) {
        0 => None,
        va => Some(va),
    }
}

/// Hypercalls issued through [`call5`] (and so through every real wrapper).
pub fn hypercall_count() -> u64 {
    HYPERCALLS.load(Ordering::Relaxed)
}

/// Makes every later hypercall call `hook` first, on the issuing CPU,
/// before the hypercall instruction (`None`: no hook). For a per-CPU
/// count: the global [`hypercall_count`] cannot tell CPUs apart.
///
/// The hook runs wherever a hypercall is issued (interrupt handlers
/// included) and must not issue one itself.
pub fn set_count_hook(hook: Option<fn()>) {
    let ptr = hook.map_or(core::ptr::null_mut(), |f| f as *mut ());
    COUNT_HOOK.store(ptr, Ordering::SeqCst);
}

fn run_count_hook() {
    let ptr = COUNT_HOOK.load(Ordering::Relaxed);
    if !ptr.is_null() {
        // SAFETY: a non-null value of COUNT_HOOK was stored by
        // `set_count_hook` from a `fn()`, so it converts back to one.
        let hook = unsafe { core::mem::transmute::<*mut (), fn()>(ptr) };
        hook();
    }
}

/// Stubs in a hypercall page (32 bytes each).
pub const STUBS: u32 = 4096 / STUB_SIZE as u32;

/// The register contract both paths share: `nr` in rax, the arguments in
/// rdi, rsi, rdx, r10, r8 (declared clobbered: a debug Xen scrambles them),
/// rcx and r11 clobbered, the result in rax. `$operands` are the path's own
/// named operands and `$options` its options.
macro_rules! hypercall_asm {
    ($template:literal, [$($operands:tt)*], [$($options:tt)*], $nr:expr, $a1:expr, $a2:expr, $a3:expr, $a4:expr, $a5:expr) => {{
        let ret: i64;
        asm!(
            $template,
            $($operands)*
            inlateout("rax") u64::from($nr) => ret,
            inlateout("rdi") $a1 => _,
            inlateout("rsi") $a2 => _,
            inlateout("rdx") $a3 => _,
            inlateout("r10") $a4 => _,
            inlateout("r8") $a5 => _,
            lateout("rcx") _,
            lateout("r11") _,
            $($options)*
        );
        ret
    }};
}

/// Issues hypercall `nr` with five arguments and returns Xen's raw result.
///
/// # Safety
/// The caller must be a Xen PV guest kernel, or an HVM/PVH guest whose
/// hypercall page is installed ([`use_hypercall_page`]), and every pointer
/// argument must be valid for the access the hypercall makes (Xen checks
/// guest handles and returns `-EFAULT` for unmapped ones, but a pointer into
/// memory the caller does not own lets Xen read or write it).
#[inline]
pub unsafe fn call5(nr: u32, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    HYPERCALLS.fetch_add(1, Ordering::Relaxed);
    run_count_hook();
    if let Some(page) = hypercall_page() {
        if nr >= STUBS {
            // Past the page: no stub to call, as Xen answers unknown numbers.
            return -XenError::NoSys.errno();
        }
        let entry = page + u64::from(nr) * STUB_SIZE;
        // SAFETY: the caller guarantees the page holds Xen's stubs (so
        // `entry`, inside it, issues hypercall `nr` and returns) and that
        // pointer arguments are valid. `call` pushes on our stack, so no
        // `nostack`. `entry` may share a register with a clobbered output
        // only: `call` consumes it first.
        return unsafe {
            hypercall_asm!("call {entry}", [entry = in(reg) entry,], [], nr, a1, a2, a3, a4, a5)
        };
    }
    // SAFETY: the caller guarantees we are a PV guest kernel (so `syscall`
    // enters Xen's hypercall path) and that pointer arguments are valid.
    unsafe { hypercall_asm!("syscall", [], [options(nostack),], nr, a1, a2, a3, a4, a5) }
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

#[cfg(test)]
mod tests {
    use super::*;

    // A stand-in hypercall page for the host: 128 stubs of 32 bytes, stub
    // `n` loads `n` into eax (as Xen's do) and jumps to a routine that packs
    // the number and the five argument registers into rax, one byte each:
    // rax = nr << 40 | r8 << 32 | r10 << 24 | rdx << 16 | rsi << 8 | rdi.
    // It clobbers the argument registers, as a debug Xen may.
    core::arch::global_asm!(
        r#"
        .pushsection .text.test_hypercall_page, "ax", @progbits
        .balign 4096
        .globl TEST_HYPERCALL_PAGE
    TEST_HYPERCALL_PAGE:
        .set nr, 0
        .rept 128
        .balign 32
        mov $nr, %eax
        jmp test_hypercall_pack
        .set nr, nr + 1
        .endr
    test_hypercall_pack:
        shl $40, %rax
        add %rdi, %rax
        shl $8, %rsi
        add %rsi, %rax
        shl $16, %rdx
        add %rdx, %rax
        shl $24, %r10
        add %r10, %rax
        shl $32, %r8
        add %r8, %rax
        xor %edi, %edi
        mov $-1, %rsi
        ret
        .popsection
        "#,
        options(att_syntax)
    );

    extern "C" {
        static TEST_HYPERCALL_PAGE: u8;
    }

    static HOOKED: AtomicU64 = AtomicU64::new(0);

    fn count_hook() {
        HOOKED.fetch_add(1, Ordering::Relaxed);
    }

    /// With a page installed, `call5` calls stub `nr` with the arguments in
    /// rdi, rsi, rdx, r10, r8, returns rax, and counts the call; with the
    /// page removed again nothing is called (no syscall is made here: the
    /// test only checks the switch).
    #[test]
    fn calls_go_through_the_installed_page_and_are_counted() {
        let page = core::ptr::addr_of!(TEST_HYPERCALL_PAGE) as u64;
        assert_eq!(page % 4096, 0);
        // SAFETY: the page holds stubs with Xen's register contract.
        unsafe { use_hypercall_page(page) };
        assert_eq!(hypercall_page(), Some(page));
        set_count_hook(Some(count_hook));
        let before = hypercall_count();
        let hooked = HOOKED.load(Ordering::Relaxed);
        for nr in [0u32, 1, 34, 127] {
            // SAFETY: stubs only compute; no pointer is dereferenced.
            let ret = unsafe { call5(nr, 0x11, 0x22, 0x33, 0x44, 0x55) };
            assert_eq!(
                ret as u64,
                u64::from(nr) << 40 | 0x55_44_33_22_11,
                "hypercall {nr}"
            );
        }
        // SAFETY: as above; the shorter forms zero the unused arguments.
        let two = unsafe { call2(17, 0x0a, 0x0b) };
        assert_eq!(two as u64, 17 << 40 | 0x0b_0a);
        // SAFETY: as above.
        let three = unsafe { call3(6, 1, 2, 3) };
        assert_eq!(three as u64, 6 << 40 | 0x03_02_01);
        assert_eq!(hypercall_count() - before, 6);
        // A number past the page's stubs is refused without a call.
        // SAFETY: nothing is called.
        let past = unsafe { call2(STUBS, 0, 0) };
        assert_eq!(XenError::check(past), Err(XenError::NoSys));
        assert_eq!(hypercall_count() - before, 7);
        // The hook saw every one of them, and sees none once cleared.
        assert_eq!(HOOKED.load(Ordering::Relaxed) - hooked, 7);
        set_count_hook(None);
        // SAFETY: as above.
        let _ = unsafe { call2(3, 0, 0) };
        assert_eq!(HOOKED.load(Ordering::Relaxed) - hooked, 7);
        assert_eq!(hypercall_count() - before, 8);
        // SAFETY: 0 selects the PV path again.
        unsafe { use_hypercall_page(0) };
        assert_eq!(hypercall_page(), None);
    }
}
