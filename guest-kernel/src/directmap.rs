//! The kernel's direct map: every frame of RAM (below
//! `pvmmu.directmap_limit` when it is given) at `DIRECT_MAP_BASE + pfn *
//! 4096`, built by pvmmu's bootstrap right after entry, plus the kernel image
//! (natively) or Xen's whole start-of-day area (PV) at `KERNEL_VMA + pfn *
//! 4096` with per-section permissions, and under Xen PVH the console ring
//! page at its identity address.
//!
//! Invariant: after [`build`] returns, the tree rooted at
//! [`DirectMap::root`] is live, maps every RAM frame below the kernel's
//! `directmap_limit` (all of RAM without one) in the direct map and no RAM
//! frame above it (highmem: the allocator never hands those out, so no
//! page table is ever there), maps every page-table frame read-only under
//! Xen PV, leaves the boot stack's
//! guard page unmapped, and the frame allocator owns neither the tables nor
//! anything reserved at boot. Before it, only the boot mappings exist
//! (Xen's start-of-day area, or the trampoline's identity map).

use core::ptr::NonNull;

use hypercall::abi::mmu_update;
use hypercall::MmuHypercalls;
use pvmmu::backend::xen::{Alias, AliasMap, MAX_ALIASES};
use pvmmu::bootstrap::{
    self, Access, BootError, BootReport, Layout, PageSizes, PfnRange, Platform, Region,
};
use pvmmu::phys::FrameWords;
use pvmmu::{Pfn, PhysMem};

use crate::boot::KERNEL_VMA;
use crate::physmem::BootMem;
use crate::xen_pv::PvBoot;
use crate::Kernel;

/// Virtual base of the direct map (L4 slot 273, clear of Xen's hole).
pub const DIRECT_MAP_BASE: u64 = 0xffff_8880_0000_0000;

/// Page-table frames a live tree can hold: a direct map of the largest
/// supported guest (`hypercall::boot::MAX_GUEST_MIB`) in 4 KiB pages (one
/// L1 per 2 MiB, one L2 per GiB, one L3 per 512 GiB, the L4), plus 2,048
/// for the kernel image, RAM above a 4 GiB hole natively and the
/// self-tests' own mappings. Sets of tables collected by a walk are this
/// large, so no guest the kernel accepts overflows them.
pub const MAX_LIVE_TABLES: usize = {
    let mib = hypercall::boot::MAX_GUEST_MIB as usize;
    mib / 2 + mib / 1024 + mib / (512 * 1024) + 1 + 1 + 2048
};

/// Most RAM ranges the direct map tracks.
pub const MAX_RAM_RANGES: usize = 32;

/// Capacity of the bootstrap's `mmu_update` batch.
pub const BOOT_BATCH: usize = 2048;

/// Frames reached through the direct map (only RAM frames).
#[derive(Debug, Clone, Copy)]
pub struct DirectMem {
    ram: [PfnRange; MAX_RAM_RANGES],
    nr: usize,
}

impl DirectMem {
    /// RAM ranges of the direct map.
    pub fn ram(&self) -> &[PfnRange] {
        &self.ram[..self.nr]
    }

    /// Whether `pfn` is RAM (so mapped in the direct map).
    pub fn is_ram(&self, pfn: Pfn) -> bool {
        self.ram().iter().any(|r| r.contains(pfn))
    }

    /// Virtual address of `pfn` in the direct map.
    pub const fn va(pfn: Pfn) -> u64 {
        DIRECT_MAP_BASE + pfn.0 * 4096
    }
}

// SAFETY: once the direct map is live (the only time a `DirectMem` exists,
// see `build`), every RAM frame is mapped at `DIRECT_MAP_BASE + pfn * 4096`,
// readable, and writable unless it is a page table under Xen PV; the address
// never changes.
unsafe impl PhysMem for DirectMem {
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        if !self.is_ram(pfn) {
            return None;
        }
        NonNull::new(Self::va(pfn) as *mut FrameWords)
    }
}

/// Where the kernel maps each frame: the direct map, and the boot region
/// (PV: Xen's start-of-day area; natively: the kernel image).
#[derive(Debug, Clone, Copy)]
pub struct KernelAliases {
    mem: DirectMem,
    /// Frames `[start, end)` are also mapped at `KERNEL_VMA + pfn * 4096`.
    boot_region: PfnRange,
    /// Except this one (the stack guard).
    hole: Pfn,
}

impl AliasMap for KernelAliases {
    fn aliases(&self, pfn: Pfn, out: &mut [Alias; MAX_ALIASES]) -> usize {
        let mut n = 0;
        if self.mem.is_ram(pfn) {
            out[n] = Alias::Va(DirectMem::va(pfn));
            n += 1;
        }
        if self.boot_region.contains(pfn) && pfn != self.hole {
            out[n] = Alias::Va(KERNEL_VMA + pfn.0 * 4096);
            n += 1;
        }
        n
    }
}

/// The direct map once built.
#[derive(Debug, Clone)]
pub struct DirectMap {
    /// The live root L4.
    pub root: Pfn,
    /// Access to RAM through the direct map.
    pub mem: DirectMem,
    /// Every alias of a frame, for pvmmu's PV backend.
    pub aliases: KernelAliases,
    /// What the bootstrap built and what it cost.
    pub report: BootReport,
    /// TSC cycles the bootstrap took.
    pub cycles: u64,
}

/// Why the direct map could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectMapError {
    /// The bootstrap refused or failed.
    Bootstrap(BootError),
    /// More RAM ranges than [`MAX_RAM_RANGES`].
    TooManyRamRanges,
    /// The frame allocator could not take the bootstrap's changes.
    Frames(crate::frames::FrameError),
}

impl From<BootError> for DirectMapError {
    fn from(e: BootError) -> Self {
        DirectMapError::Bootstrap(e)
    }
}

/// Pushes `r` into a region list, skipping empty ranges.
fn push_region(out: &mut [Region; 8], n: &mut usize, start: u64, end: u64, access: Access) {
    if end > start && *n < out.len() {
        out[*n] = Region {
            va: KERNEL_VMA + start * 4096,
            pfns: PfnRange::new(start, end),
            access,
        };
        *n += 1;
    }
}

/// Builds the direct map and switches to it. See the module invariant.
pub fn build(kernel: &mut Kernel) -> Result<DirectMap, DirectMapError> {
    // RAM, clipped to what Xen gave us under PV and below
    // `pvmmu.directmap_limit` (highmem is reached through kmap only).
    let limit = kernel.directmap_limit.unwrap_or(u64::MAX);
    let mut mem = DirectMem {
        ram: [PfnRange::default(); MAX_RAM_RANGES],
        nr: 0,
    };
    for (s, e) in kernel.ram_pfns() {
        let e = e.min(limit);
        if s < e {
            if mem.nr == MAX_RAM_RANGES {
                return Err(DirectMapError::TooManyRamRanges);
            }
            mem.ram[mem.nr] = PfnRange::new(s, e);
            mem.nr += 1;
        }
    }
    mem.ram[..mem.nr].sort_unstable_by_key(|r| r.start);

    let mut reserved = [PfnRange::default(); crate::MAX_RESERVATIONS];
    let mut nres = 0;
    for r in kernel.reservations() {
        reserved[nres] = PfnRange::new(r.range.start, r.range.end);
        nres += 1;
    }

    // The boot region: section by section, the stack guard left out.
    let img = kernel.image;
    let pfn = |va: u64| (va - KERNEL_VMA) / 4096;
    let pfn_up = |va: u64| (va - KERNEL_VMA).div_ceil(4096);
    let guard = pfn(img.stack_guard.start);
    let (text, text_end) = (pfn(img.text.start), pfn_up(img.text.end));
    let (ro, ro_end) = (pfn(img.rodata.start), pfn_up(img.rodata.end));
    let (data, image_end) = (pfn(img.data.start), pfn_up(img.image.end));
    let (region_start, region_end, first_chunk, boot_mem) = match &kernel.pv {
        Some(pv) => {
            // The new tree maps Xen's start-of-day area at its old addresses
            // only up to the end of what Xen placed there (start_info, p2m,
            // rings, initial tables, boot stack): the free padding after it
            // is reached through the direct map alone, so a table placed
            // there has one alias to make read-only, not two.
            let end = pv.initial_mapping_end_pfn();
            let region_end = pv.bootstrap_end_pfn().min(end);
            (
                0,
                region_end,
                PfnRange::new(0, end),
                BootMem::xen_start_of_day(pv),
            )
        }
        None => {
            // The boot-mapped frames we take chunk 0's tables from: 4 MiB
            // past the image (the identity map covers far more; a small
            // first chunk keeps the growth visible in the 4 KiB mode).
            let end = (image_end + 1024).min(BootMem::identity().end().0);
            (
                text.min(ro).min(data),
                image_end,
                PfnRange::new(0, end),
                BootMem::identity(),
            )
        }
    };
    let mut regions = [Region {
        va: 0,
        pfns: PfnRange::default(),
        access: Access::Data,
    }; 8];
    let mut nreg = 0;
    // Under Xen PVH, the console ring at its identity address (below the
    // image's addresses, so first).
    if let Some(console) = crate::xen_hvm::console_region() {
        regions[nreg] = console;
        nreg += 1;
    }
    push_region(&mut regions, &mut nreg, region_start, text, Access::Data);
    push_region(&mut regions, &mut nreg, text, text_end, Access::Text);
    push_region(
        &mut regions,
        &mut nreg,
        ro.max(text_end),
        ro_end,
        Access::ReadOnly,
    );
    push_region(
        &mut regions,
        &mut nreg,
        data.max(ro_end),
        guard,
        Access::Data,
    );
    push_region(&mut regions, &mut nreg, guard + 1, region_end, Access::Data);

    let page_sizes = if kernel.options.only_4k {
        PageSizes::Only4K
    } else if crate::platform::has_1g_pages() {
        PageSizes::Up1G
    } else {
        PageSizes::Up2M
    };
    let layout = Layout {
        ram: mem.ram(),
        reserved: &reserved[..nres],
        first_chunk,
        entry_alias_base: if kernel.pv.is_some() { KERNEL_VMA } else { 0 },
        direct_map_base: DIRECT_MAP_BASE,
        regions: &regions[..nreg],
        page_sizes,
    };

    static SCRATCH: spin::Mutex<[mmu_update; BOOT_BATCH]> =
        spin::Mutex::new([mmu_update { ptr: 0, val: 0 }; BOOT_BATCH]);
    let mut scratch = SCRATCH.lock();
    let start = crate::platform::rdtsc();
    let report = match kernel.pv.clone() {
        Some(pv) => {
            // SAFETY: PV entry: we are a Xen PV guest kernel.
            let mut xen = unsafe { hypercall::Xen::new() };
            let old_root = Pfn(PvBoot::va_to_pfn(pv.pt_base)
                .ok_or(DirectMapError::Bootstrap(BootError::BadLayout))?);
            bootstrap::bootstrap(
                &layout,
                Platform::XenPv {
                    hyp: &mut xen as &mut dyn MmuHypercalls,
                    p2m: &pv,
                    old_root,
                },
                &boot_mem,
                &mem,
                &mut scratch[..],
            )?
        }
        None => {
            let mut load = |root: Pfn| {
                use x86_64::registers::control::Cr3;
                use x86_64::structures::paging::PhysFrame;
                use x86_64::PhysAddr;
                let (_, flags) = Cr3::read();
                // SAFETY: the new tree maps the kernel image (code, stack,
                // data) at the same addresses as the trampoline's tables;
                // nothing after this uses the identity map.
                unsafe {
                    Cr3::write(
                        PhysFrame::containing_address(PhysAddr::new(root.addr())),
                        flags,
                    )
                };
            };
            bootstrap::bootstrap(
                &layout,
                Platform::Native {
                    load_root: &mut load,
                },
                &boot_mem,
                &mem,
                &mut scratch[..],
            )?
        }
    };
    let cycles = crate::platform::rdtsc().wrapping_sub(start);
    drop(scratch);

    // The allocator: tables are taken, retired initial tables are free.
    for t in report.tables.ranges() {
        kernel
            .frames
            .reserve(t.start.0, t.end.0)
            .map_err(DirectMapError::Frames)?;
    }
    for f in report.freed.ranges() {
        kernel
            .frames
            .add(f.start.0, f.end.0)
            .map_err(DirectMapError::Frames)?;
    }
    let aliases = KernelAliases {
        mem,
        boot_region: PfnRange::new(region_start, region_end),
        hole: Pfn(guard),
    };
    Ok(DirectMap {
        root: report.root,
        mem,
        aliases,
        report,
        cycles,
    })
}
