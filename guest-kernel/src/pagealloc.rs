//! DEBUG_PAGEALLOC (`pvmmu.debug_pagealloc`): every frame the boot frame
//! allocator ([`crate::frames::Frames`]) holds free is absent from the
//! direct map, so a use after free faults at once instead of corrupting a
//! frame someone else owns. It is CPA's stress test: every free and every
//! allocation is one `change_page_attr` call on the live tree
//! ([`kspace::direct_map_absent`] / [`kspace::direct_map_present`]), with the
//! cross-CPU TLB flush every CPA call makes.
//!
//! Switched on by [`enable`] as soon as the kernel's address space
//! (kspace, with its CPA) exists: with the option the boot starts kspace
//! right after the direct-map bootstrap (`running::start_kspace`), so the
//! direct-map and pvmmu suites run under it too (`docs/cpa.md`):
//! 1. natively, the direct map is split to 4 KiB pages through CPA (each
//!    large page gets CPA's software test bit set on one page and cleared
//!    again: the change splits it, the tree is otherwise unchanged; under
//!    PV the direct map is 4 KiB already). The split tables come from the
//!    kspace pool, topped up from the boot allocator *before* the
//!    allocator unmaps anything;
//! 2. every free frame is unmapped (one CPA call per free range);
//! 3. the allocator starts calling [`on_free`] / [`on_alloc`].
//!
//! The recursion (a split needs a frame; getting a frame must not need a
//! split) cannot happen: after step 1 every direct-map page is a 4 KiB
//! leaf, so the CPA call of a free or an allocation never splits and never
//! takes a frame; and CPA's split frames come from the kspace pool, never
//! from the allocator whose frames it unmaps (`docs/cpa.md`).
//!
//! Invariant (once enabled): a RAM frame not present in the direct map is
//! a free frame of the allocator (CPA's self-test parks its own frames for
//! a moment, probed with the fault caught), so a not-present #PF there is
//! reported as a use after free of that frame ([`use_after_free`]).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pvmmu::entry::Flags;
use pvmmu::{Granule, Pfn};

use crate::directmap::{DirectMem, DIRECT_MAP_BASE};
use crate::frames::FrameRange;
use crate::kspace::{self, KspaceError};
use crate::traps::pf;
use crate::Kernel;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// One past the last RAM frame of the direct map.
static RAM_END: AtomicU64 = AtomicU64::new(0);
static UNMAPS: AtomicU64 = AtomicU64::new(0);
static MAPS: AtomicU64 = AtomicU64::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);
static HYPERCALLS: AtomicU64 = AtomicU64::new(0);
static ENTRIES: AtomicU64 = AtomicU64::new(0);

/// Pool frames kept ready while the direct map is split (a split takes at
/// most [`pvmmu::space::MAX_SPLITS`]).
const SPLIT_POOL_LOW: usize = 16;

/// What [`enable`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Enabled {
    /// Large pages split to make the direct map 4 KiB.
    pub splits: u64,
    /// Free frames unmapped.
    pub unmapped: u64,
    /// Free ranges (one CPA call each).
    pub ranges: usize,
}

/// Whether DEBUG_PAGEALLOC is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Frames unmapped so far (at free, and the free frames at [`enable`]).
pub fn unmaps() -> u64 {
    UNMAPS.load(Ordering::Relaxed)
}

/// Frames mapped back at allocation so far.
pub fn maps() -> u64 {
    MAPS.load(Ordering::Relaxed)
}

/// CPA calls of the allocator that failed (must stay 0).
pub fn errors() -> u64 {
    ERRORS.load(Ordering::Relaxed)
}

/// Hypercalls and `mmu_update` entries issued while the allocator's CPA
/// calls ran (under PV; both 0 natively).
pub fn issued() -> (u64, u64) {
    (
        HYPERCALLS.load(Ordering::Relaxed),
        ENTRIES.load(Ordering::Relaxed),
    )
}

/// Runs `f` and adds the hypercalls and `mmu_update` entries issued
/// meanwhile to [`issued`]: what a test that counts its own subtracts
/// when the frames it takes and frees are unmapped and mapped back on
/// the way. The counters are global, so on several CPUs they would
/// include the others' too; the tests that subtract them run on one CPU
/// (before the others start).
fn counted<T>(f: impl FnOnce() -> T) -> T {
    let before = hypercall::mmu::issued_stats();
    let out = f();
    let after = hypercall::mmu::issued_stats();
    HYPERCALLS.fetch_add(
        after.hypercalls.wrapping_sub(before.hypercalls),
        Ordering::Relaxed,
    );
    ENTRIES.fetch_add(
        after
            .mmu_update_entries
            .wrapping_sub(before.mmu_update_entries),
        Ordering::Relaxed,
    );
    out
}

/// The allocator's frames `[pfn, pfn + n)` became free: unmaps them.
pub fn on_free(pfn: u64, n: u64) {
    match counted(|| kspace::direct_map_absent(Pfn(pfn), n)) {
        Ok(_) => {
            UNMAPS.fetch_add(n, Ordering::Relaxed);
        }
        Err(e) => {
            ERRORS.fetch_add(1, Ordering::Relaxed);
            log::error!("debug_pagealloc: cannot unmap pfns [{pfn:#x}, +{n}): {e:?}");
        }
    }
}

/// The allocator hands out frames `[pfn, pfn + n)`: maps them back.
pub fn on_alloc(pfn: u64, n: u64) {
    match counted(|| kspace::direct_map_present(Pfn(pfn), n)) {
        Ok(()) => {
            MAPS.fetch_add(n, Ordering::Relaxed);
        }
        Err(e) => {
            ERRORS.fetch_add(1, Ordering::Relaxed);
            log::error!("debug_pagealloc: cannot map pfns [{pfn:#x}, +{n}) back: {e:?}");
        }
    }
}

/// Switches DEBUG_PAGEALLOC on (see the module docs); the kernel space
/// must exist.
pub fn enable(kernel: &mut Kernel) -> Result<Enabled, KspaceError> {
    let dm = kernel.direct_map.clone().ok_or(KspaceError::NotReady)?;
    let mut done = Enabled::default();
    let ram = dm.mem.ram();
    let ram_end = ram.iter().map(|r| r.end.0).max().unwrap_or(0);
    // 1. A 4 KiB direct map, split through CPA.
    if kernel.pv.is_none() {
        let bit = pvmmu::space::CPA_TEST_BIT;
        for r in ram {
            let mut va = DirectMem::va(r.start);
            let end = DirectMem::va(r.end);
            while va < end {
                let t = kspace::translate(va)?;
                if t.granule != Granule::Size4KiB {
                    if kspace::pool_free().unwrap_or(0) < SPLIT_POOL_LOW {
                        kspace::pool_top_up(&mut kernel.frames, 4 * SPLIT_POOL_LOW)?;
                    }
                    let set = kspace::change_page_attr(va, 4096, bit, Flags::empty())?;
                    kspace::change_page_attr(va, 4096, Flags::empty(), bit)?;
                    done.splits += u64::from(set.splits);
                }
                va = (va | (Granule::Size2MiB.bytes() - 1)) + 1;
            }
        }
    }
    // 2. Every free frame unmapped.
    let mut free = [FrameRange { start: 0, end: 0 }; crate::frames::MAX_RANGES];
    let n = kernel.frames.ranges().len();
    free[..n].copy_from_slice(kernel.frames.ranges());
    for r in &free[..n] {
        kspace::direct_map_absent(Pfn(r.start), r.count())?;
        UNMAPS.fetch_add(r.count(), Ordering::Relaxed);
        done.unmapped += r.count();
    }
    done.ranges = n;
    // 3. From now on the allocator unmaps at free and maps at allocation.
    RAM_END.store(ram_end, Ordering::Relaxed);
    kernel.frames.set_debug_pagealloc(true);
    ENABLED.store(true, Ordering::Release);
    Ok(done)
}

/// Under DEBUG_PAGEALLOC, the frame a #PF with `error_code` at `cr2` is a
/// use after free of: a not-present access to the direct map's RAM.
/// `None` when it is not one (or DEBUG_PAGEALLOC is off).
pub fn use_after_free(cr2: u64, error_code: u64) -> Option<u64> {
    if !enabled() || error_code & pf::PRESENT != 0 {
        return None;
    }
    let pfn = cr2.checked_sub(DIRECT_MAP_BASE)? >> 12;
    (pfn < RAM_END.load(Ordering::Relaxed)).then_some(pfn)
}
