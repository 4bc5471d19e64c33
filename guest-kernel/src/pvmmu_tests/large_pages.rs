//! Large pages (natively): 2 MiB and 1 GiB maps, translations inside them,
//! partial unmap/protect refused.

use pvmmu::{Error, Granule, Pfn};

use crate::directmap::DirectMem;
use crate::selftest::{check, check_eq, Failure, TestResult};

use super::backends::LiveBackend;
use super::harness::Cx;
use super::steps::{expect_error, failed, give, pattern, read, write};
use super::{MIB2, NX, P, PAGE, RW, TEST_AREA};

/// Natively: a 2 MiB page over an aligned run of free frames (written
/// through, read through the direct map), or read-only over aligned RAM;
/// partial unmap/protect refused; 1 GiB likewise where RAM allows.
pub(super) fn large_pages<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let va = TEST_AREA + 64 * MIB2;
    let run = cx.space.allocator_mut().take_run(512, 512);
    let (pfn, flags) = match run {
        Some(p) => (p, P | RW | NX),
        None => {
            let ram = aligned_ram(&cx.mem, 512);
            log::info!("no aligned run of free frames: read-only 2 MiB page over RAM");
            (ram.ok_or(Failure::Check("no 2 MiB-aligned RAM"))?, P | NX)
        }
    };
    let f = cx
        .space
        .map_sized(va, pfn, MIB2, flags, Granule::Size2MiB, false)
        .map_err(failed("2 MiB map"))?;
    cx.space.flush(f).map_err(failed("flush"))?;
    for k in [0u64, 1, 300, 511] {
        let at = va + k * PAGE + 0x18;
        let t = cx.space.lookup(at).map_err(failed("translate"))?;
        check(t.granule == Granule::Size2MiB, "not a 2 MiB page")?;
        check_eq("frame inside the 2 MiB page", t.pfn.0, pfn.0 + k)?;
        let direct = DirectMem::va(t.pfn) + 0x18;
        if run.is_some() {
            let value = pattern(t.pfn, k, 5);
            // SAFETY: the 2 MiB page maps the borrowed aligned run.
            unsafe { write("write through the 2 MiB page", at, value) }?;
        }
        check_eq(
            "same word both ways",
            read("read", at)?,
            read("read", direct)?,
        )?;
    }
    expect_error(
        "unmap of part of a 2 MiB page",
        cx.space.unmap(va + PAGE, PAGE),
        Error::SplitsLargePage { va },
    )?;
    expect_error(
        "protect of part of a 2 MiB page",
        cx.space.protect(va, PAGE, P | NX, false),
        Error::SplitsLargePage { va },
    )?;
    let f = cx.space.unmap(va, MIB2).map_err(failed("2 MiB unmap"))?;
    cx.space.flush(f).map_err(failed("flush"))?;
    expect_error(
        "translate after unmap",
        cx.space.lookup(va),
        Error::NotMapped { va },
    )?;
    if run.is_some() {
        give(cx, pfn)?;
    }

    // 1 GiB, read-only over an aligned GiB of RAM, where there is one.
    let gib = 1u64 << 18;
    let ram = aligned_ram(&cx.mem, gib);
    match (crate::platform::has_1g_pages(), ram) {
        (true, Some(g)) => {
            let va = TEST_AREA + (1 << 30);
            let f = cx
                .space
                .map_sized(va, g, 1 << 30, P | NX, Granule::Size1GiB, false)
                .map_err(failed("1 GiB map"))?;
            cx.space.flush(f).map_err(failed("flush"))?;
            for k in [0u64, 12345, gib - 1] {
                let t = cx
                    .space
                    .lookup(va + k * PAGE)
                    .map_err(failed("translate"))?;
                check(t.granule == Granule::Size1GiB, "not a 1 GiB page")?;
                check_eq("frame inside the 1 GiB page", t.pfn.0, g.0 + k)?;
                check_eq(
                    "same word both ways (1 GiB)",
                    read("read", va + k * PAGE)?,
                    read("read", DirectMem::va(t.pfn))?,
                )?;
            }
            let f = cx.space.unmap(va, 1 << 30).map_err(failed("1 GiB unmap"))?;
            cx.space.flush(f).map_err(failed("flush"))?;
        }
        (has, _) => log::info!(
            "1 GiB part not run: 1 GiB pages {has}, aligned GiB of RAM {}",
            ram.is_some()
        ),
    }
    Ok(())
}

/// The first run of `pages` RAM frames starting at a multiple of `pages`.
pub(crate) fn aligned_ram(mem: &DirectMem, pages: u64) -> Option<Pfn> {
    mem.ram().iter().find_map(|r| {
        let s = r.start.0.next_multiple_of(pages);
        (s + pages <= r.end.0).then_some(Pfn(s))
    })
}
