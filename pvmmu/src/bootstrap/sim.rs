//! Runs the PV bootstrap against the Xen model with a Xen-style start of
//! day: for host tests and for the scaling benchmark (`cargo xtask bench`).
//!
//! Invariant: the simulated guest sees exactly what a dom0 sees under Xen's
//! dom0 builder (frames `0..image` of kernel, p2m and start_info, the last
//! 256 of them free padding, then the initial tables), and the bootstrap
//! reaches frames only through the boot mapping until its tree is live.

use super::*;
use crate::model::XenModel;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::ptr::NonNull;

/// Where the simulated kernel and Xen's start-of-day area live.
pub const VIRT_BASE: u64 = 0xffff_ffff_8000_0000;
/// The simulated direct map.
pub const DM: u64 = 0xffff_8880_0000_0000;

pub use crate::model::SharedModel as Shared;

/// A view of another [`PhysMem`] that reaches only the frames in `ranges`:
/// what an entry environment maps, so a test can prove the bootstrap never
/// touches a frame it cannot reach yet.
pub struct Reach<'a, M: PhysMem> {
    /// The memory behind the view.
    pub mem: &'a M,
    /// The frames the view reaches.
    pub ranges: Vec<PfnRange>,
}

// SAFETY: forwards to `mem` for frames in `ranges`, so the pointers are
// `mem`'s, valid and stable for as long as `mem` (which outlives the view).
unsafe impl<M: PhysMem> PhysMem for Reach<'_, M> {
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        if self.ranges.iter().any(|r| r.contains(pfn)) {
            self.mem.frame_ptr(pfn)
        } else {
            None
        }
    }
}

/// A finished simulated bootstrap.
pub struct PvRun {
    /// What the bootstrap reported.
    pub report: BootReport,
    /// The model after the bootstrap.
    pub model: Rc<RefCell<XenModel>>,
    /// Frames of image, p2m and start_info (incl. the free padding).
    pub image: u64,
    /// Xen's initial tables.
    pub old_tables: PfnRange,
}

/// Boots a PV guest of `nr_pages` with `image` frames of kernel, p2m and
/// start_info (the last 256 of them free padding, as Xen leaves >= 512 KiB).
pub fn run_pv(nr_pages: u64, image: u64, batch: usize) -> Result<PvRun, BootError> {
    run_pv_after(nr_pages, image, batch, 0)
}

/// [`run_pv`] with `earlier` local TLB flushes sent to the model before the
/// bootstrap starts, as a kernel's console and set-up hypercalls come
/// before it: the report must count only the bootstrap's own.
pub fn run_pv_after(
    nr_pages: u64,
    image: u64,
    batch: usize,
    earlier: usize,
) -> Result<PvRun, BootError> {
    let mut model = XenModel::new_hardware_domain(nr_pages);
    for _ in 0..earlier {
        hypercall::MmuHypercalls::mmuext_op(
            &mut model,
            &[hypercall::mmu::MmuExt::TlbFlushLocal.encode()],
        )
        .map_err(|e| BootError::Hypervisor {
            round: 0,
            done: 0,
            error: e.error,
        })?;
    }
    let sod = model
        .start_of_day(VIRT_BASE, image)
        .map_err(|error| BootError::Hypervisor {
            round: 0,
            done: 0,
            error,
        })?;
    let shared = Shared(Rc::new(RefCell::new(model)));
    let mapped = sod.nr_mapped_pfns;
    let ram = [PfnRange::new(0, nr_pages)];
    let reserved = [PfnRange::new(0, image - 256)];
    let regions = [
        Region {
            va: VIRT_BASE,
            pfns: PfnRange::new(0, 0x100),
            access: Access::Data,
        },
        Region {
            va: VIRT_BASE + 0x100 * PAGE_SIZE,
            pfns: PfnRange::new(0x100, 0x120),
            access: Access::Text,
        },
        Region {
            va: VIRT_BASE + 0x120 * PAGE_SIZE,
            pfns: PfnRange::new(0x120, 0x130),
            access: Access::ReadOnly,
        },
        Region {
            va: VIRT_BASE + 0x130 * PAGE_SIZE,
            pfns: PfnRange::new(0x130, mapped),
            access: Access::Data,
        },
    ];
    let layout = Layout {
        ram: &ram,
        reserved: &reserved,
        first_chunk: PfnRange::new(0, mapped),
        entry_alias_base: VIRT_BASE,
        direct_map_base: DM,
        regions: &regions,
        page_sizes: PageSizes::Up1G,
    };
    let boot = Reach {
        mem: &shared,
        ranges: vec![PfnRange::new(0, mapped)],
    };
    let direct = Reach {
        mem: &shared,
        ranges: vec![PfnRange::new(0, nr_pages)],
    };
    let mut hyp = shared.clone();
    let p2m = shared.clone();
    let mut scratch = vec![mmu_update { ptr: 0, val: 0 }; batch];
    let report = bootstrap(
        &layout,
        Platform::XenPv {
            hyp: &mut hyp,
            p2m: &p2m,
            old_root: sod.pt_base_pfn,
        },
        &boot,
        &direct,
        &mut scratch,
    )?;
    let old_tables = PfnRange::new(sod.pt_base_pfn.0, sod.pt_base_pfn.0 + sod.nr_pt_frames);
    Ok(PvRun {
        report,
        model: shared.0,
        image,
        old_tables,
    })
}
