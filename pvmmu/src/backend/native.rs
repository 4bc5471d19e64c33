//! Native x86-64 paging: entries are plain stores, TLB maintenance is invlpg
//! and CR3 through a [`Tlb`].
//!
//! Invariant: every live write is a single volatile 8-byte store, so the
//! hardware walker never sees a torn entry; TLB instructions run only through
//! the [`Tlb`] the backend was built with, so host tests over an in-memory
//! arena never execute them.

use core::ptr::NonNull;
use core::sync::atomic::AtomicU64;

use super::{Backend, BackendError, Caps, Kind, LargePages, TlbScope, INVLPG_LIMIT};
use crate::entry::{native_check, Entry, Flags, Level, TABLE_FLAGS};
use crate::phys::{FrameWords, PhysMem};
use crate::types::{Mfn, Pfn, ENTRIES, ENTRY_FRAME_MASK, PAGE_SIZE};

/// TLB maintenance of the CPU the tables are used by.
pub trait Tlb {
    /// Invalidates the translation of one 4 KiB page.
    fn flush_page(&mut self, va: u64);
    /// Invalidates every non-global translation.
    fn flush_all(&mut self);
    /// Loads `root` as the current root.
    ///
    /// # Safety
    /// As [`Backend::switch_root`].
    unsafe fn load_root(&mut self, root: Pfn);
    /// Writes back and invalidates the cache lines of `pages` 4 KiB pages
    /// at `va` (`clflush`, or `clflushopt` where CPUID has it), after a
    /// change of their caching attributes.
    fn flush_cache_range(&mut self, va: u64, pages: u64);
    /// Writes back and invalidates every cache (`wbinvd`).
    fn flush_cache_all(&mut self);
}

/// A [`Tlb`] for tables nobody walks (host tests, tables being built): it
/// only counts what it was asked to do.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NoTlb {
    /// `flush_page` calls.
    pub pages: u64,
    /// `flush_all` calls.
    pub full: u64,
    /// Last root loaded.
    pub root: Option<Pfn>,
    /// Pages whose cache lines `flush_cache_range` was asked to flush.
    pub cache_pages: u64,
    /// `flush_cache_all` calls.
    pub cache_all: u64,
}

impl Tlb for NoTlb {
    fn flush_page(&mut self, _va: u64) {
        self.pages += 1;
    }
    fn flush_all(&mut self) {
        self.full += 1;
    }
    unsafe fn load_root(&mut self, root: Pfn) {
        self.root = Some(root);
    }
    fn flush_cache_range(&mut self, _va: u64, pages: u64) {
        self.cache_pages += pages;
    }
    fn flush_cache_all(&mut self) {
        self.cache_all += 1;
    }
}

/// Bytes of a cache line `clflush` works on (CPUID leaf 1 reports it; 64
/// on every x86-64 CPU in use).
const CACHE_LINE: u64 = 64;

/// Whether CPUID has `clflushopt` (leaf 7, EBX bit 23).
fn has_clflushopt() -> bool {
    let max = core::arch::x86_64::__cpuid(0).eax;
    max >= 7 && core::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 23) != 0
}

/// The running CPU's TLB: `invlpg`, CR3 reload.
#[derive(Debug)]
pub struct CpuTlb {
    _private: (),
}

impl CpuTlb {
    /// # Safety
    /// The caller runs in ring 0 natively (or in a PVH/HVM guest), where
    /// `invlpg` and CR3 writes are allowed, and the tables this backend edits
    /// are the ones the CPU walks.
    pub const unsafe fn new() -> Self {
        Self { _private: () }
    }
}

impl Tlb for CpuTlb {
    fn flush_page(&mut self, va: u64) {
        x86_64::instructions::tlb::flush(x86_64::VirtAddr::new_truncate(va));
    }
    fn flush_all(&mut self) {
        x86_64::instructions::tlb::flush_all();
    }
    unsafe fn load_root(&mut self, root: Pfn) {
        use x86_64::registers::control::Cr3;
        use x86_64::structures::paging::PhysFrame;
        let frame = PhysFrame::containing_address(x86_64::PhysAddr::new_truncate(root.addr()));
        let (_, cr3_flags) = Cr3::read();
        // SAFETY: the caller guarantees (per `Backend::switch_root`) that the
        // new tree maps everything the running code needs.
        unsafe { Cr3::write(frame, cr3_flags) };
    }
    fn flush_cache_range(&mut self, va: u64, pages: u64) {
        let opt = has_clflushopt();
        let end = va.wrapping_add(pages * PAGE_SIZE);
        let mut line = va;
        while line < end {
            // SAFETY: the range is mapped (CPA just changed its caching,
            // and the range was checked mapped); a cache flush of a mapped
            // line changes no memory contents.
            unsafe {
                if opt {
                    core::arch::asm!("clflushopt [{}]", in(reg) line, options(nostack));
                } else {
                    core::arch::asm!("clflush [{}]", in(reg) line, options(nostack));
                }
            }
            line += CACHE_LINE;
        }
        // SAFETY: a fence orders the flushes before later accesses (as the
        // architecture asks of clflushopt); no memory is changed.
        unsafe { core::arch::asm!("mfence", options(nostack)) };
    }
    fn flush_cache_all(&mut self) {
        // SAFETY: ring 0 (this type's contract); wbinvd writes back and
        // invalidates the caches, changing no memory contents.
        unsafe { core::arch::asm!("wbinvd", options(nostack)) };
    }
}

/// The native backend over any [`PhysMem`] (the kernel's direct map, or an
/// arena in tests).
pub struct Native<M: PhysMem, T: Tlb = NoTlb> {
    mem: M,
    tlb: T,
    large: LargePages,
    /// Highest pfn (exclusive) an entry may point to: the CPU's physical
    /// address width.
    pfn_limit: u64,
}

impl<M: PhysMem> Native<M, NoTlb> {
    /// A backend whose tables no CPU walks (4 KiB pages only until
    /// [`Native::with_large_pages`]).
    pub fn new(mem: M) -> Self {
        Self::with_tlb(mem, NoTlb::default())
    }
}

impl<M: PhysMem, T: Tlb> Native<M, T> {
    /// A backend with explicit TLB maintenance.
    pub fn with_tlb(mem: M, tlb: T) -> Self {
        Self {
            mem,
            tlb,
            large: LargePages::None,
            pfn_limit: 1 << 40,
        }
    }

    /// Allows large pages up to `large` (what CPUID reports).
    pub fn with_large_pages(mut self, large: LargePages) -> Self {
        self.large = large;
        self
    }

    /// Limits entries to frames below `pfn_limit` (MAXPHYADDR).
    pub fn with_pfn_limit(mut self, pfn_limit: u64) -> Self {
        self.pfn_limit = pfn_limit.min(1 << 40);
        self
    }

    /// The TLB hook (counters for [`NoTlb`]).
    pub fn tlb(&self) -> &T {
        &self.tlb
    }

    /// The frame access the backend was built with.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    fn entry_ptr(&self, table: Pfn, index: usize) -> Option<*mut u64> {
        let frame = self.mem.frame_ptr(table)?;
        // `index & 511` keeps the pointer inside the 4 KiB frame.
        Some(
            frame
                .as_ptr()
                .cast::<u64>()
                .wrapping_add(index & (ENTRIES - 1)),
        )
    }
}

impl<M: PhysMem, T: Tlb> Backend for Native<M, T> {
    fn kind(&self) -> Kind {
        Kind::Native
    }
    fn caps(&self) -> Caps {
        Caps::NATIVE
    }
    fn large_pages(&self) -> LargePages {
        self.large
    }
    fn reserved(&self) -> Option<(u64, u64)> {
        None
    }
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn> {
        (pfn.0 < self.pfn_limit).then_some(Mfn(pfn.0))
    }
    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn> {
        (mfn.0 < self.pfn_limit).then_some(Pfn(mfn.0))
    }
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        self.mem.frame_ptr(pfn)
    }

    fn leaf_entry(&self, level: Level, pfn: Pfn, flags: Flags) -> Result<Entry, BackendError> {
        let mut flags = native_check(flags).map_err(BackendError::Flags)?;
        let mfn = self.to_mfn(pfn).ok_or(BackendError::BadFrame(pfn))?;
        match level {
            Level::L1 => {}
            Level::L2 if self.large >= LargePages::Size2MiB => flags |= Flags::HUGE_PAGE,
            Level::L3 if self.large >= LargePages::Size1GiB => flags |= Flags::HUGE_PAGE,
            _ => return Err(BackendError::Flags(crate::entry::FlagError::LargePage)),
        }
        Ok(Entry::new(mfn, flags))
    }

    fn fill_leaves(
        &self,
        level: Level,
        first: Pfn,
        step: u64,
        flags: Flags,
        out: &mut [u64],
    ) -> Result<(), BackendError> {
        let Some(n) = (out.len() as u64).checked_sub(1) else {
            return Ok(());
        };
        // Checks the flags and both ends of the run once; frames in between
        // are below the last one.
        let template = self.leaf_entry(level, first, flags)?;
        let last = n
            .checked_mul(step)
            .and_then(|d| first.0.checked_add(d))
            .ok_or(BackendError::BadFrame(first))?;
        self.leaf_entry(level, Pfn(last), flags)?;
        let bits = template.0 & !ENTRY_FRAME_MASK;
        let mut addr = first.0 << 12;
        for slot in out.iter_mut() {
            *slot = addr | bits;
            addr += step << 12;
        }
        Ok(())
    }

    fn table_entry(&self, pfn: Pfn) -> Result<Entry, BackendError> {
        let mfn = self.to_mfn(pfn).ok_or(BackendError::BadFrame(pfn))?;
        Ok(Entry::new(mfn, TABLE_FLAGS))
    }

    fn normalize(&self, flags: Flags) -> Flags {
        flags
    }

    fn read(&self, table: Pfn, index: usize) -> Entry {
        match self.entry_ptr(table, index) {
            // SAFETY: `PhysMem` guarantees the frame pointer is valid for
            // 4096-byte reads; the index is masked into the frame.
            Some(p) => Entry(unsafe { p.read_volatile() }),
            None => Entry::EMPTY,
        }
    }

    fn read_table(&self, table: Pfn, out: &mut [u64; ENTRIES]) {
        match self.mem.frame_ptr(table) {
            // SAFETY: valid for 4096-byte reads per `PhysMem`; `out` is a
            // distinct caller-owned buffer. The CPU may set accessed/dirty
            // bits meanwhile; the copy then holds either value of those bits,
            // which every caller masks.
            Some(p) => unsafe {
                core::ptr::copy_nonoverlapping(p.as_ptr().cast::<u64>(), out.as_mut_ptr(), ENTRIES)
            },
            None => *out = [0; ENTRIES],
        }
    }

    fn scan_table(&self, table: Pfn, f: &mut dyn FnMut(usize, Entry)) {
        let Some(p) = self.mem.frame_ptr(table) else {
            return;
        };
        let words = p.as_ptr().cast::<u64>();
        for i in 0..ENTRIES {
            // SAFETY: valid for 4096-byte reads per `PhysMem`; i < 512.
            f(i, Entry(unsafe { words.add(i).read_volatile() }));
        }
    }

    fn write(&mut self, table: Pfn, index: usize, val: Entry) -> Result<(), BackendError> {
        let p = self
            .entry_ptr(table, index)
            .ok_or(BackendError::BadFrame(table))?;
        // SAFETY: natively every table frame is ordinary writable memory,
        // valid for writes per `PhysMem`; one aligned 8-byte store.
        unsafe { p.write_volatile(val.0) };
        Ok(())
    }

    fn entry_cell(&self, table: Pfn, index: usize) -> Option<&AtomicU64> {
        let p = self.entry_ptr(table, index)?;
        // SAFETY: `PhysMem` guarantees the frame is valid for reads and
        // writes of 4096 bytes for as long as `self.mem` lives (so for the
        // borrow of `self`), and the entry is 8-byte aligned inside it.
        // Every access to a live entry natively is an aligned 8-byte
        // access (volatile or atomic), so none of them tears.
        Some(unsafe { AtomicU64::from_ptr(p) })
    }

    fn pending(&self) -> usize {
        0
    }
    fn drain(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn new_table(&mut self, pfn: Pfn) -> Result<(), BackendError> {
        let p = self.mem.frame_ptr(pfn).ok_or(BackendError::BadFrame(pfn))?;
        // SAFETY: the frame is valid for writes per `PhysMem` and, per the
        // caller's contract, not (yet) a live table.
        unsafe { p.as_ptr().write_bytes(0, 1) };
        Ok(())
    }
    fn seal_table(&mut self, _pfn: Pfn) -> Result<(), BackendError> {
        Ok(())
    }
    fn release_table(&mut self, _pfn: Pfn) -> Result<(), BackendError> {
        Ok(())
    }
    fn pin(&mut self, _level: Level, _pfn: Pfn) -> Result<(), BackendError> {
        Ok(())
    }
    fn unpin(&mut self, _pfn: Pfn) -> Result<(), BackendError> {
        Ok(())
    }
    unsafe fn switch_root(&mut self, root: Pfn) -> Result<(), BackendError> {
        // SAFETY: forwarded contract of `Backend::switch_root`.
        unsafe { self.tlb.load_root(root) };
        Ok(())
    }
    unsafe fn replace_root(&mut self, root: Pfn, _old: Option<Pfn>) -> Result<(), BackendError> {
        // SAFETY: forwarded contract of `Backend::replace_root`.
        unsafe { self.tlb.load_root(root) };
        Ok(())
    }
    fn flush_tlb(&mut self, scope: TlbScope) -> Result<(), BackendError> {
        match scope {
            TlbScope::Range { start, pages } if pages <= INVLPG_LIMIT => {
                for i in 0..pages {
                    self.tlb.flush_page(start.wrapping_add(i * PAGE_SIZE));
                }
            }
            _ => self.tlb.flush_all(),
        }
        Ok(())
    }

    fn flush_cache(&mut self, scope: TlbScope) -> Result<(), BackendError> {
        match scope {
            TlbScope::Range { start, pages } => self.tlb.flush_cache_range(start, pages),
            TlbScope::All => self.tlb.flush_cache_all(),
        }
        Ok(())
    }

    fn flushes_caches(&self) -> bool {
        true
    }

    fn cache_encoding(&self) -> Option<super::CacheEncoding> {
        // The PAT the kernel programs on every CPU (docs/cpa.md).
        const NATIVE: Option<super::CacheEncoding> =
            super::CacheEncoding::from_pat(crate::space::PAT_VALUE);
        NATIVE
    }
}
