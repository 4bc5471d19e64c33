//! The `x86_64` crate's `Mapper` and `Translate` traits on an address space,
//! so a kernel written against them can switch with minimal change.
//!
//! Invariant: each trait call is one address-space call (same checks, same
//! rollback); tables are taken from the caller's x86_64 allocator, exactly
//! as many as the walk needs, and tables that are freed later go to the
//! address space's own allocator. The x86_64 error enums are narrower than
//! [`Error`]: errors without a counterpart are reported as the nearest
//! variant (documented per method); the range API gives the precise error.
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
use crate::types::{Pfn, PAGE_SIZE};

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

impl<B: Backend, A: FrameAllocator> AddressSpace<B, A> {
    /// Number of tables a map of one page of `granule` at `va` would create.
    fn tables_needed(&self, va: u64, granule: Granule) -> usize {
        let mut table = self.root;
        let mut level = Level::L4;
        while level != granule.level() {
            let e = self.backend.read(table, level.index(va));
            let Some(lower) = level.lower() else { break };
            if !e.is_present() {
                return (level.number() - granule.level().number()) as usize;
            }
            match self.backend.to_pfn(e.mfn()) {
                Some(child) if !e.is_huge() => table = child,
                _ => return 0,
            }
            level = lower;
        }
        0
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
        let need = self.tables_needed(va, granule);
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
            Err(Error::AlreadyMapped { .. }) => match self.translate(va) {
                Ok(t) if t.granule == granule => {
                    let base = Pfn(t.pfn.0 - (va & (S::SIZE - 1)) / PAGE_SIZE);
                    Err(MapToError::PageAlreadyMapped(
                        PhysFrame::containing_address(phys(base)),
                    ))
                }
                _ => Err(MapToError::ParentEntryHugePage),
            },
            // No x86_64 counterpart: reported as an allocation failure.
            Err(_) => Err(MapToError::FrameAllocationFailed),
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
            Err(Error::SplitsLargePage { .. }) => Err(UnmapError::ParentEntryHugePage),
            Err(_) => Err(UnmapError::PageNotMapped),
        }
    }

    fn x86_translate_page<S: PageSize>(
        &self,
        page: Page<S>,
    ) -> Result<PhysFrame<S>, TranslateError> {
        let va = page.start_address().as_u64();
        match self.translate(va) {
            Ok(t) if t.granule == granule_of::<S>() => PhysFrame::from_start_address(phys(t.pfn))
                .map_err(|_| TranslateError::InvalidFrameAddress(phys(t.pfn))),
            Ok(t) if t.granule > granule_of::<S>() => Err(TranslateError::ParentEntryHugePage),
            Ok(_) => Err(TranslateError::PageNotMapped),
            Err(Error::ForeignFrame(mfn)) => Err(TranslateError::InvalidFrameAddress(
                PhysAddr::new_truncate(mfn.maddr()),
            )),
            Err(_) => Err(TranslateError::PageNotMapped),
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
            Err(Error::SplitsLargePage { .. }) => Err(FlagUpdateError::ParentEntryHugePage),
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
        let mut table = self.root;
        let mut at = Level::L4;
        loop {
            let i = at.index(va);
            let e = self.backend.read(table, i);
            if !e.is_present() {
                return Err(FlagUpdateError::PageNotMapped);
            }
            if at == level {
                let new = Entry::new(e.mfn(), flags);
                let r = self
                    .backend
                    .write(table, i, new)
                    .and_then(|()| self.backend.drain());
                return r
                    .map(|()| MapperFlushAll::new())
                    .map_err(|_| FlagUpdateError::PageNotMapped);
            }
            if e.is_huge() {
                return Err(FlagUpdateError::ParentEntryHugePage);
            }
            table = self
                .backend
                .to_pfn(e.mfn())
                .ok_or(FlagUpdateError::PageNotMapped)?;
            at = at.lower().ok_or(FlagUpdateError::PageNotMapped)?;
        }
    }
}

macro_rules! impl_mapper {
    ($size:ty) => {
        impl<B: Backend, A: FrameAllocator> Mapper<$size> for AddressSpace<B, A> {
            /// Maps one page; `parent_table_flags` is ignored (intermediate
            /// entries are always PRESENT | WRITABLE | USER, the leaf
            /// decides); W+X is taken as consented. Errors other than
            /// allocation, huge parent and already-mapped are reported as
            /// `FrameAllocationFailed`.
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
        match AddressSpace::translate(self, va) {
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
