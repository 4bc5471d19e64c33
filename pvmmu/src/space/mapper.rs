//! The `x86_64` crate's `Mapper` and `Translate` traits on an address space,
//! so a kernel written against them can switch with minimal change.
//!
//! Invariant: each trait call classifies its page once with the walker
//! ([`crate::walk`]) and reports the trait's documented error for that
//! state, variant for variant: `ParentEntryHugePage` only where a larger
//! page really covers the page, `PageAlreadyMapped` for a slot that holds a
//! page or a table of smaller pages, `PageNotMapped` where no page of the
//! size maps it (see `docs/pvmmu-api.md` for where x86_64's own
//! `OffsetPageTable` departs from these docs). A change is then one
//! address-space call (same checks, same rollback); tables are taken from
//! the caller's x86_64 allocator, exactly as many as the walk showed
//! missing, and tables freed later go to the address space's own
//! allocator. Errors without an x86_64 counterpart (refused flags, Xen's
//! hole, the hypervisor) are reported as the nearest variant, documented
//! per method; the range API gives the precise error.
//! The x86_64 `MapperFlush::flush` executes `invlpg` directly: natively
//! fine, under PV use [`AddressSpace::flush`] instead.

use x86_64::structures::paging::mapper::{
    FlagUpdateError, MapToError, MappedFrame, MapperFlush, MapperFlushAll, TranslateError,
    TranslateResult, UnmapError,
};
use x86_64::structures::paging::{
    FrameAllocator as X86FrameAllocator, Mapper, Page, PageSize, PageTableFlags, PhysFrame,
    Size1GiB, Size2MiB, Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

use super::{AddressSpace, Error, Granule};
use crate::backend::Backend;
use crate::entry::{Entry, Flags, Level};
use crate::phys::FrameAllocator;
use crate::types::{Mfn, Pfn, PAGE_SIZE};
use crate::walk::{walk, WalkError};

fn granule_of<S: PageSize>() -> Granule {
    match S::SIZE {
        s if s == Size1GiB::SIZE => Granule::Size1GiB,
        s if s == Size2MiB::SIZE => Granule::Size2MiB,
        _ => Granule::Size4KiB,
    }
}

fn phys(pfn: Pfn) -> PhysAddr {
    PhysAddr::new_truncate(pfn.0.wrapping_mul(PAGE_SIZE))
}

/// Where a page of one size stands, as the walker finds it: the single
/// classification every trait method reports from.
enum PageState {
    /// A page of this size maps it, to this frame.
    Mapped(Pfn),
    /// A page of this size maps it, to a frame the guest does not own.
    Foreign(Mfn),
    /// A larger page covers it (an upper entry has PS).
    InHugePage,
    /// Its slot points to a table of smaller pages.
    HoldsSmaller,
    /// Nothing maps it; mapping it needs this many new tables.
    Free(usize),
    /// An upper entry points to a frame the guest does not own.
    Unreachable,
}

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
    fn page_state(&self, va: u64, granule: Granule) -> PageState {
        let want = granule.level();
        match walk(&self.backend, self.root, va, want) {
            Ok(f) if f.level > want => PageState::InHugePage,
            Ok(f) if !f.entry.is_present() => PageState::Free(0),
            Ok(f) if !f.is_leaf() => PageState::HoldsSmaller,
            Ok(f) => match self.backend.to_pfn(f.entry.leaf_mfn(f.level)) {
                Some(pfn) => PageState::Mapped(pfn),
                None => PageState::Foreign(f.entry.leaf_mfn(f.level)),
            },
            Err(WalkError::NotPresent { level }) => {
                PageState::Free((level.number() - want.number()) as usize)
            }
            Err(WalkError::ForeignFrame(_)) => PageState::Unreachable,
        }
    }

    fn x86_map<S: PageSize, X: X86FrameAllocator<Size4KiB> + ?Sized>(
        &mut self,
        page: Page<S>,
        frame: PhysFrame<S>,
        flags: PageTableFlags,
        frame_allocator: &mut X,
    ) -> Result<MapperFlush<S>, MapToError<S>> {
        let granule = granule_of::<S>();
        let va = page.start_address().as_u64();
        let need = match self.page_state(va, granule) {
            PageState::Free(need) => need,
            PageState::InHugePage => return Err(MapToError::ParentEntryHugePage),
            PageState::Mapped(pfn) => {
                return Err(MapToError::PageAlreadyMapped(
                    PhysFrame::containing_address(phys(pfn)),
                ))
            }
            // Mapped to smaller pages, or to a frame without a guest
            // address: the requested frame is named, as x86_64 does.
            PageState::HoldsSmaller | PageState::Foreign(_) => {
                return Err(MapToError::PageAlreadyMapped(frame))
            }
            // No x86_64 counterpart: reported as an allocation failure.
            PageState::Unreachable => return Err(MapToError::FrameAllocationFailed),
        };
        for _ in 0..need {
            match frame_allocator.allocate_frame() {
                Some(f) => self.push_spare(Pfn(f.start_address().as_u64() / PAGE_SIZE)),
                None => {
                    self.return_spares();
                    return Err(MapToError::FrameAllocationFailed);
                }
            }
        }
        let pfn = Pfn(frame.start_address().as_u64() / PAGE_SIZE);
        let flags = flags | Flags::PRESENT;
        let r = self.map_sized(va, pfn, S::SIZE, flags, granule, true);
        self.return_spares();
        match r {
            Ok(f) => {
                f.ignore();
                Ok(MapperFlush::new(page))
            }
            // No x86_64 counterpart (refused flags, Xen's hole, hypervisor):
            // reported as an allocation failure.
            Err(_) => Err(MapToError::FrameAllocationFailed),
        }
    }

    /// The frame a page of size `S` maps, or why there is none.
    fn x86_translate_page<S: PageSize>(
        &self,
        page: Page<S>,
    ) -> Result<PhysFrame<S>, TranslateError> {
        let va = page.start_address().as_u64();
        match self.page_state(va, granule_of::<S>()) {
            PageState::Mapped(pfn) => PhysFrame::from_start_address(phys(pfn))
                .map_err(|_| TranslateError::InvalidFrameAddress(phys(pfn))),
            PageState::Foreign(mfn) => Err(TranslateError::InvalidFrameAddress(
                PhysAddr::new_truncate(mfn.maddr()),
            )),
            PageState::InHugePage => Err(TranslateError::ParentEntryHugePage),
            PageState::HoldsSmaller | PageState::Free(_) | PageState::Unreachable => {
                Err(TranslateError::PageNotMapped)
            }
        }
    }

    fn x86_unmap<S: PageSize>(
        &mut self,
        page: Page<S>,
    ) -> Result<(PhysFrame<S>, MapperFlush<S>), UnmapError> {
        let va = page.start_address().as_u64();
        let frame = self.x86_translate_page::<S>(page).map_err(|e| match e {
            TranslateError::ParentEntryHugePage => UnmapError::ParentEntryHugePage,
            TranslateError::InvalidFrameAddress(a) => UnmapError::InvalidFrameAddress(a),
            TranslateError::PageNotMapped => UnmapError::PageNotMapped,
        })?;
        match self.unmap(va, S::SIZE) {
            Ok(f) => {
                f.ignore();
                Ok((frame, MapperFlush::new(page)))
            }
            // No x86_64 counterpart (Xen's hole, hypervisor): not mapped.
            Err(_) => Err(UnmapError::PageNotMapped),
        }
    }

    fn x86_update_flags<S: PageSize>(
        &mut self,
        page: Page<S>,
        flags: PageTableFlags,
    ) -> Result<MapperFlush<S>, FlagUpdateError> {
        self.x86_translate_page::<S>(page).map_err(|e| match e {
            TranslateError::ParentEntryHugePage => FlagUpdateError::ParentEntryHugePage,
            _ => FlagUpdateError::PageNotMapped,
        })?;
        let flags = (flags | Flags::PRESENT) - Flags::HUGE_PAGE;
        match self.protect(page.start_address().as_u64(), S::SIZE, flags, true) {
            Ok(f) => {
                f.ignore();
                Ok(MapperFlush::new(page))
            }
            // No x86_64 counterpart (refused flags, hypervisor): not mapped.
            Err(_) => Err(FlagUpdateError::PageNotMapped),
        }
    }

    /// Sets the flags of the entry at `level` on the path to `va`.
    fn x86_set_upper(
        &mut self,
        va: u64,
        level: Level,
        flags: PageTableFlags,
    ) -> Result<MapperFlushAll, FlagUpdateError> {
        let found = match walk(&self.backend, self.root, va, level) {
            Ok(f) if f.level > level => return Err(FlagUpdateError::ParentEntryHugePage),
            Ok(f) if f.entry.is_present() => f,
            _ => return Err(FlagUpdateError::PageNotMapped),
        };
        // A large leaf keeps its PAT bit (bit 12, which `flags` cannot name).
        let pat = if level == Level::L1 {
            0
        } else {
            found.entry.pat_bit(level)
        };
        let new = Entry(Entry::new(found.entry.leaf_mfn(level), flags).0 | pat);
        self.backend
            .write(found.table, found.index, new)
            .and_then(|()| self.backend.drain())
            .map(|()| MapperFlushAll::new())
            // No x86_64 counterpart (refused flags, hypervisor): not mapped.
            .map_err(|_| FlagUpdateError::PageNotMapped)
    }
}

macro_rules! impl_mapper {
    ($size:ty) => {
        impl<B: Backend, A: FrameAllocator> Mapper<$size> for AddressSpace<B, A> {
            /// Maps one page; `parent_table_flags` is ignored (intermediate
            /// entries are always PRESENT | WRITABLE | USER, the leaf
            /// decides); W+X is taken as consented. `PageAlreadyMapped`
            /// names the mapped frame when a page of this size maps the
            /// address, the requested frame when smaller pages do. Errors
            /// other than allocation, huge parent and already-mapped are
            /// reported as `FrameAllocationFailed`.
            unsafe fn map_to_with_table_flags<X>(
                &mut self,
                page: Page<$size>,
                frame: PhysFrame<$size>,
                flags: PageTableFlags,
                _parent_table_flags: PageTableFlags,
                frame_allocator: &mut X,
            ) -> Result<MapperFlush<$size>, MapToError<$size>>
            where
                Self: Sized,
                X: X86FrameAllocator<Size4KiB> + ?Sized,
            {
                self.x86_map(page, frame, flags, frame_allocator)
            }

            fn unmap(
                &mut self,
                page: Page<$size>,
            ) -> Result<(PhysFrame<$size>, MapperFlush<$size>), UnmapError> {
                self.x86_unmap(page)
            }

            unsafe fn update_flags(
                &mut self,
                page: Page<$size>,
                flags: PageTableFlags,
            ) -> Result<MapperFlush<$size>, FlagUpdateError> {
                self.x86_update_flags(page, flags)
            }

            unsafe fn set_flags_p4_entry(
                &mut self,
                page: Page<$size>,
                flags: PageTableFlags,
            ) -> Result<MapperFlushAll, FlagUpdateError> {
                self.x86_set_upper(page.start_address().as_u64(), Level::L4, flags)
            }

            unsafe fn set_flags_p3_entry(
                &mut self,
                page: Page<$size>,
                flags: PageTableFlags,
            ) -> Result<MapperFlushAll, FlagUpdateError> {
                self.x86_set_upper(page.start_address().as_u64(), Level::L3, flags)
            }

            unsafe fn set_flags_p2_entry(
                &mut self,
                page: Page<$size>,
                flags: PageTableFlags,
            ) -> Result<MapperFlushAll, FlagUpdateError> {
                self.x86_set_upper(page.start_address().as_u64(), Level::L2, flags)
            }

            fn translate_page(
                &self,
                page: Page<$size>,
            ) -> Result<PhysFrame<$size>, TranslateError> {
                self.x86_translate_page(page)
            }
        }
    };
}

impl_mapper!(Size4KiB);
impl_mapper!(Size2MiB);
impl_mapper!(Size1GiB);

impl<B: Backend, A: FrameAllocator> Translate for AddressSpace<B, A> {
    fn translate(&self, addr: VirtAddr) -> TranslateResult {
        let va = addr.as_u64();
        match self.lookup(va) {
            Ok(t) => {
                let size = t.granule.bytes();
                let offset = va & (size - 1);
                let base = phys(Pfn(t.pfn.0 - offset / PAGE_SIZE));
                let frame = match t.granule {
                    Granule::Size4KiB => MappedFrame::Size4KiB(PhysFrame::containing_address(base)),
                    Granule::Size2MiB => MappedFrame::Size2MiB(PhysFrame::containing_address(base)),
                    Granule::Size1GiB => MappedFrame::Size1GiB(PhysFrame::containing_address(base)),
                };
                let flags = if t.granule == Granule::Size4KiB {
                    t.flags
                } else {
                    t.flags | Flags::HUGE_PAGE
                };
                TranslateResult::Mapped {
                    frame,
                    offset,
                    flags,
                }
            }
            Err(Error::ForeignFrame(mfn)) => {
                TranslateResult::InvalidFrameAddress(PhysAddr::new_truncate(mfn.maddr()))
            }
            Err(_) => TranslateResult::NotMapped,
        }
    }
}
