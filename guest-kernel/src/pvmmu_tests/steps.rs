//! The steps test bodies are made of: typed errors and faults as
//! failures, borrowed frames, map/unmap/protect with their flush, reads
//! and writes confined to the test area and the direct map.

use pvmmu::entry::Flags;
use pvmmu::{Error, Pfn};

use crate::directmap::DIRECT_MAP_BASE;
use crate::selftest::{check, check_eq, Failure, TestResult};
use crate::traps::{probe_read, probe_write, Fault};

use super::backends::LiveBackend;
use super::harness::Cx;
use super::{PAGE, TEST_AREA, TEST_AREA_BYTES};

/// Turns a pvmmu error into a failure (logged with its details).
pub(crate) fn failed(what: &'static str) -> impl Fn(Error) -> Failure {
    move |e| {
        log::error!("{what}: {e:?}");
        match e {
            Error::Hypervisor(error) => Failure::Xen { what, error },
            _ => Failure::Check(what),
        }
    }
}

/// Requires `got` to be exactly the error `want`.
pub(super) fn expect_error<T>(
    what: &'static str,
    got: Result<T, Error>,
    want: Error,
) -> TestResult {
    match got {
        Err(e) if e == want => Ok(()),
        Err(e) => {
            log::error!("{what}: got {e:?}, expected {want:?}");
            Err(Failure::Check(what))
        }
        Ok(_) => {
            log::error!("{what}: accepted, expected {want:?}");
            Err(Failure::Check(what))
        }
    }
}

pub(crate) fn take<B: LiveBackend>(cx: &mut Cx<'_, B>, n: u64) -> Result<Pfn, Failure> {
    cx.space
        .allocator_mut()
        .take_run(n, 1)
        .ok_or(Failure::Check("no run of free frames"))
}

pub(crate) fn give<B: LiveBackend>(cx: &mut Cx<'_, B>, pfn: Pfn) -> TestResult {
    cx.space.allocator_mut().give_back(pfn)
}

pub(crate) fn map<B: LiveBackend>(
    cx: &mut Cx<'_, B>,
    va: u64,
    pfn: Pfn,
    pages: u64,
    flags: Flags,
) -> TestResult {
    let f = cx
        .space
        .map(va, pfn, pages * PAGE, flags)
        .map_err(failed("map"))?;
    cx.space.flush(f).map_err(failed("flush after map"))
}

pub(crate) fn unmap<B: LiveBackend>(cx: &mut Cx<'_, B>, va: u64, pages: u64) -> TestResult {
    let f = cx.space.unmap(va, pages * PAGE).map_err(failed("unmap"))?;
    cx.space.flush(f).map_err(failed("flush after unmap"))
}

pub(crate) fn protect<B: LiveBackend>(
    cx: &mut Cx<'_, B>,
    va: u64,
    pages: u64,
    flags: Flags,
) -> TestResult {
    let f = cx
        .space
        .protect(va, pages * PAGE, flags, false)
        .map_err(failed("protect"))?;
    cx.space.flush(f).map_err(failed("flush after protect"))
}

pub(super) fn fault(what: &'static str) -> impl Fn(Fault) -> Failure {
    move |f| Failure::Fault {
        what,
        vector: f.vector,
        error_code: f.error_code,
    }
}

/// Whether `va` lies where these tests only ever map RAM: the test area
/// (frames from the allocator, or page tables) and the direct map.
fn maps_ram_only(va: u64) -> bool {
    (TEST_AREA..TEST_AREA + TEST_AREA_BYTES).contains(&va)
        || (DIRECT_MAP_BASE..DIRECT_MAP_BASE + (1 << 39)).contains(&va)
}

/// Reads the word at `va` (test area or direct map only).
pub(crate) fn read(what: &'static str, va: u64) -> Result<u64, Failure> {
    check(
        maps_ram_only(va),
        "read outside the test area and direct map",
    )?;
    // SAFETY: both areas map only RAM (see `maps_ram_only`): no side effects.
    unsafe { probe_read(va) }.map_err(fault(what))
}

/// Writes the word at `va`.
///
/// # Safety
/// If `va` is mapped writable, its 8 bytes belong to a frame the running
/// test borrowed.
pub(crate) unsafe fn write(what: &'static str, va: u64, value: u64) -> TestResult {
    check(
        maps_ram_only(va),
        "write outside the test area and direct map",
    )?;
    // SAFETY: forwarded to the caller.
    unsafe { probe_write(va, value) }.map_err(fault(what))
}

/// Requires a #PF at `va`, with the error code's present and write bits as
/// given.
pub(super) fn expect_page_fault<T>(
    what: &'static str,
    got: Result<T, Fault>,
    va: u64,
    present: bool,
    write: bool,
) -> TestResult {
    match got {
        Ok(_) => Err(Failure::Check(what)),
        Err(f) => {
            check_eq("fault vector", u64::from(f.vector), 14)?;
            check_eq("fault address (cr2)", f.cr2, va)?;
            check_eq("#PF present bit", f.error_code & 1, u64::from(present))?;
            check_eq("#PF write bit", (f.error_code >> 1) & 1, u64::from(write))
        }
    }
}

pub(crate) fn pattern(pfn: Pfn, word: u64, round: u64) -> u64 {
    ((pfn.0 << 24) | (word << 4) | round).wrapping_mul(0x2545_f491_4f6c_dd1d)
        ^ 0x0123_4567_89ab_cdef
}
