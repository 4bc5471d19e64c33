//! The `x86_64` crate's `Mapper` and `Translate` traits on pvmmu's address
//! space.

use pvmmu::{FrameAllocator, Pfn};
use x86_64::structures::paging::mapper::{
    MapToError, MappedFrame, TranslateError, TranslateResult, UnmapError,
};
use x86_64::structures::paging::{Mapper, Page, PageTableFlags, PhysFrame, Size4KiB, Translate};
use x86_64::{PhysAddr, VirtAddr};

use crate::directmap::DirectMem;
use crate::selftest::{check, check_eq, Failure, TestResult};
use crate::traps::probe_write;

use super::backends::LiveBackend;
use super::frames::X86Pool;
use super::harness::Cx;
use super::steps::{expect_page_fault, give, pattern, read, take, write};
use super::{MIB2, TEST_AREA};

/// The `x86_64` crate's traits on pvmmu's address space: `map_to` with the
/// crate's frame allocator, `translate`, `update_flags`, `unmap`, and the
/// crate's error values.
pub(super) fn x86_64_traits<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let data = take(cx, 1)?;
    let mut pool = X86Pool {
        frames: [Pfn(0); 4],
        len: 0,
    };
    while pool.len < 3 {
        pool.frames[pool.len] = cx
            .space
            .allocator_mut()
            .allocate()
            .ok_or(Failure::Check("no frame for the pool"))?;
        pool.len += 1;
    }
    let va = TEST_AREA + 30 * MIB2;
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va));
    let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(data.addr()));
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    // SAFETY: `frame` is a borrowed data frame; mapping it at the test area
    // aliases nothing the kernel uses.
    let mapped = unsafe { cx.space.map_to(page, frame, flags, &mut pool) };
    let result = (|| {
        let flush = mapped.map_err(|e| {
            log::error!("map_to: {e:?}");
            Failure::Check("map_to")
        })?;
        cx.space.backend_mut().flush_x86(flush, va)?;
        check_eq("tables taken from the x86_64 allocator", pool.len as u64, 0)?;
        check(
            cx.space.translate_addr(VirtAddr::new(va + 0x40))
                == Some(PhysAddr::new(data.addr() + 0x40)),
            "translate_addr",
        )?;
        match Translate::translate(&cx.space, VirtAddr::new(va + 0x40)) {
            TranslateResult::Mapped {
                frame: MappedFrame::Size4KiB(f),
                offset,
                flags: got,
            } => {
                check(f == frame, "translate: frame")?;
                check_eq("translate: offset", offset, 0x40)?;
                check(got.contains(flags), "translate: flags")?;
            }
            other => {
                log::error!("translate: {other:?}");
                return Err(Failure::Check("translate: not a 4 KiB mapping"));
            }
        }
        let value = pattern(data, 6, 6);
        // SAFETY: the page maps the borrowed data frame.
        unsafe { write("write through map_to's page", va + 0x40, value) }?;
        check_eq(
            "read back",
            read("read", DirectMem::va(data) + 0x40)?,
            value,
        )?;
        // SAFETY: read-only is stricter than before; nothing relies on
        // writing this page.
        let f = unsafe {
            Mapper::<Size4KiB>::update_flags(
                &mut cx.space,
                page,
                PageTableFlags::PRESENT | PageTableFlags::NO_EXECUTE,
            )
        }
        .map_err(|_| Failure::Check("update_flags"))?;
        cx.space.backend_mut().flush_x86(f, va)?;
        // SAFETY: expected to fault (read-only); else it writes our frame.
        let r = unsafe { probe_write(va + 0x40, !value) };
        expect_page_fault("store after update_flags", r, va + 0x40, true, true)?;
        // SAFETY: the page is mapped already: the call must refuse and
        // change nothing.
        match unsafe { cx.space.map_to(page, frame, flags, &mut pool) } {
            Err(MapToError::PageAlreadyMapped(f)) => check(f == frame, "already mapped: frame")?,
            other => {
                log::error!("map_to twice: {other:?}");
                return Err(Failure::Check("map_to twice"));
            }
        }
        let (f, flush) =
            Mapper::<Size4KiB>::unmap(&mut cx.space, page).map_err(|_| Failure::Check("unmap"))?;
        cx.space.backend_mut().flush_x86(flush, va)?;
        check(f == frame, "unmap returned another frame")?;
        check(
            matches!(
                cx.space.translate_page(page),
                Err(TranslateError::PageNotMapped)
            ),
            "translate_page after unmap",
        )?;
        check(
            matches!(
                Mapper::<Size4KiB>::unmap(&mut cx.space, page),
                Err(UnmapError::PageNotMapped)
            ),
            "unmap twice",
        )?;
        // The direct map through the trait, whatever its page size.
        let dva = DirectMem::va(data) + 0x40;
        check(
            cx.space.translate_addr(VirtAddr::new(dva)) == Some(PhysAddr::new(data.addr() + 0x40)),
            "translate_addr of the direct map",
        )
    })();
    while pool.len > 0 {
        pool.len -= 1;
        cx.space.allocator_mut().free(pool.frames[pool.len]);
    }
    result?;
    give(cx, data)
}
