//! Protect and execute: read-only pages fault on a store, code runs through
//! an executable mapping and not through an NX one, W+X is refused without
//! consent and reported by the invariant walker with it.

use pvmmu::entry::HARDWARE_SET;
use pvmmu::invariants::Violation;
use pvmmu::Error;

use crate::directmap::DirectMem;
use crate::selftest::{check, check_eq, Failure, TestResult};
use crate::traps::{probe_exec, probe_write};

use super::backends::LiveBackend;
use super::harness::{check_invariants, Cx};
use super::steps::{
    expect_error, expect_page_fault, failed, fault, give, map, pattern, protect, read, take, unmap,
    write,
};
use super::{MIB2, NX, P, PAGE, RW, TEST_AREA};

/// protect to read-only: a store faults (#PF, present + write) and changes
/// nothing; protect back to RW: the store lands.
pub(super) fn protect_read_only_faults<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 1)?;
    let va = TEST_AREA + 40 * PAGE;
    map(cx, va, pfn, 1, P | RW | NX)?;
    let first = pattern(pfn, 1, 2);
    // SAFETY: `va` maps the borrowed `pfn`.
    unsafe { write("write before protect", va + 8, first) }?;
    protect(cx, va, 1, P | NX)?;
    let t = cx.space.lookup(va).map_err(failed("translate"))?;
    check_eq(
        "flags after protect",
        (t.flags - HARDWARE_SET).bits(),
        (P | NX).bits(),
    )?;
    // SAFETY: as above; the store is expected to fault.
    let refused = unsafe { probe_write(va + 8, !first) };
    expect_page_fault("store to a read-only page", refused, va + 8, true, true)?;
    check_eq(
        "word after a refused store",
        read("read", DirectMem::va(pfn) + 8)?,
        first,
    )?;
    check_eq("word through the RO mapping", read("read", va + 8)?, first)?;
    protect(cx, va, 1, P | RW | NX)?;
    // SAFETY: as above.
    unsafe { write("write after protect back", va + 8, !first) }?;
    check_eq(
        "word after RW again",
        read("read", DirectMem::va(pfn) + 8)?,
        !first,
    )?;
    unmap(cx, va, 1)?;
    give(cx, pfn)
}

/// Code written through the direct map runs through a read-only,
/// executable mapping; W+X is refused without consent.
pub(super) fn execute_mapped_code<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 1)?;
    let va = TEST_AREA + 64 * PAGE;
    let magic: u32 = 0x5eed_c0de;
    // mov eax, imm32; ret
    let m = magic.to_le_bytes();
    let code = u64::from_le_bytes([0xb8, m[0], m[1], m[2], m[3], 0xc3, 0xcc, 0xcc]);
    // SAFETY: the direct-map page of the borrowed `pfn`.
    unsafe { write("code store", DirectMem::va(pfn), code) }?;
    // A second copy of `ret` at offset 8, for the NX probes.
    // SAFETY: as above.
    unsafe { write("ret store", DirectMem::va(pfn) + 8, 0xc3) }?;
    // The direct map is NX: fetching from it faults (instruction fetch).
    expect_fetch_fault("fetch through the direct map", DirectMem::va(pfn) + 8)?;
    expect_error(
        "writable executable map without consent",
        cx.space.map(va, pfn, PAGE, P | RW),
        Error::WriteExecute,
    )?;
    map(cx, va, pfn, 1, P)?;
    let t = cx.space.lookup(va).map_err(failed("translate"))?;
    check(!t.flags.contains(NX), "code page mapped NX")?;
    // SAFETY: `va` maps, read-only and executable, a frame holding
    // `mov eax, imm32; ret`: a complete function of the C ABI with no
    // arguments, returning a u32 in eax and touching nothing else.
    let run: extern "C" fn() -> u32 = unsafe { core::mem::transmute(va as usize) };
    check_eq(
        "value returned by mapped code",
        u64::from(run()),
        u64::from(magic),
    )?;
    // SAFETY: `va + 8` holds `ret` and is executable here.
    unsafe { probe_exec(va + 8) }.map_err(fault("fetch from the executable mapping"))?;
    // Made NX, the same page no longer runs.
    protect(cx, va, 1, P | NX)?;
    expect_fetch_fault("fetch after protect to NX", va + 8)?;
    unmap(cx, va, 1)?;
    give(cx, pfn)
}

/// A call to `va` must fault with a #PF whose error code says instruction
/// fetch (bit 4).
fn expect_fetch_fault(what: &'static str, va: u64) -> TestResult {
    // SAFETY: `va` holds `ret`; if it is (wrongly) executable, `ret` runs.
    match unsafe { probe_exec(va) } {
        Err(f) if f.vector == 14 && f.error_code & (1 << 4) != 0 && f.cr2 == va => Ok(()),
        Err(f) => Err(fault(what)(f)),
        Ok(()) => Err(Failure::Check("an NX page executed")),
    }
}

/// The invariant walker is not blind: a W+X page mapped with consent is
/// reported (exactly once, at its address), and gone after unmap.
pub(super) fn invariants_report_wx<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let pfn = take(cx, 1)?;
    let va = TEST_AREA + 3 * MIB2;
    let f = cx
        .space
        .map_wx(va, pfn, PAGE, P | RW)
        .map_err(failed("map_wx"))?;
    cx.space.flush(f).map_err(failed("flush"))?;
    let mut wx_at = 0u64;
    let mut other = 0u64;
    let n = check_invariants(cx, &mut |v| match v {
        Violation::WriteExecute { va } => wx_at = va,
        v => {
            other += 1;
            log::error!("invariant violation: {v:?}");
        }
    })?;
    check_eq("violations with one W+X page", n, 1)?;
    check_eq("reported W+X address", wx_at, va)?;
    check_eq("other violations", other, 0)?;
    unmap(cx, va, 1)?;
    check_eq(
        "violations after unmap",
        check_invariants(cx, &mut |_| {})?,
        0,
    )?;
    give(cx, pfn)
}
