//! Range map / unmap of 1 GiB of 4 KiB pages: pvmmu's native backend over an
//! in-memory arena against the x86_64 crate's per-page
//! `OffsetPageTable::map_to` / `unmap` over an identical arena, in one run
//! (one warm-up, then the median of several timed rounds, each on fresh
//! arenas); then the PV backend's hypercalls and entries for the same work
//! against the Xen model, with and without kernel aliases of the tables,
//! and for a page-at-a-time caller as the baseline.
//!
//! Why the PV figures are so small: a range in an empty part of the tree is
//! built in private tables (plain stores) and hooked with one `mmu_update`,
//! so 1 GiB costs one entry; Xen (here the model) validates all 262,144
//! leaves when that hook arrives. With the tables' frames aliased in a live
//! direct map, each new table also costs one read-only flip (515 entries).
//! The native map is a fill of consecutive entries, which the compiler
//! vectorises; a sample of translations checks every L1 after each round.
//!
//! Output: one `BENCH <name> <value> <unit>` line per figure.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use hypercall::MmuHypercalls;
use pvmmu::entry::Flags;
use pvmmu::{AddressSpace, Native, Pfn, PhysMem};
use x86_64::structures::paging::{
    FrameAllocator as X86FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PhysFrame,
    Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

const PAGES: u64 = 1 << 18; // 1 GiB of 4 KiB pages
const VA: u64 = 0xffff_c900_0000_0000;
const DATA_PFN: u64 = 0x10_0000;
const ARENA_FRAMES: usize = 1024;
const ROUNDS: usize = 7;
const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);

/// A stack of free frames: as cheap as the x86_64 side's bump allocator.
struct Stack(Vec<Pfn>);

impl pvmmu::FrameAllocator for Stack {
    fn allocate(&mut self) -> Option<Pfn> {
        self.0.pop()
    }
    fn free(&mut self, pfn: Pfn) {
        self.0.push(pfn);
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One round of pvmmu: (map time, unmap time).
fn pvmmu_round() -> (Duration, Duration) {
    let backend = Native::new(Arena::new(ARENA_FRAMES));
    let frames = Stack((1..ARENA_FRAMES as u64).rev().map(Pfn).collect());
    let mut space = AddressSpace::new(backend, frames)
        .map_err(|e| e.0)
        .expect("space");
    let t0 = Instant::now();
    space
        .map(VA, Pfn(DATA_PFN), PAGES * 4096, RW)
        .expect("map")
        .ignore();
    let map = t0.elapsed();
    // Outside the timing: the whole range really is mapped, page by page
    // (a sample across every L1, and the last page).
    for k in (0..PAGES).step_by(509).chain([PAGES - 1]) {
        assert_eq!(
            space.lookup(VA + k * 4096).map(|t| t.pfn),
            Ok(Pfn(DATA_PFN + k)),
            "page {k}"
        );
    }
    let t1 = Instant::now();
    space.unmap(VA, PAGES * 4096).expect("unmap").ignore();
    let unmap = t1.elapsed();
    assert!(space.lookup(VA).is_err());
    (map, unmap)
}

/// Hands out arena frames 1.. (frame 0 is the root).
struct ArenaFrames {
    next: u64,
}

// SAFETY: each frame is handed out once and lies inside the arena.
unsafe impl X86FrameAllocator<Size4KiB> for ArenaFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        if self.next as usize >= ARENA_FRAMES {
            return None;
        }
        let f = PhysFrame::containing_address(PhysAddr::new(self.next * 4096));
        self.next += 1;
        Some(f)
    }
}

/// One round of x86_64's OffsetPageTable over an identical arena.
fn x86_64_round() -> (Duration, Duration) {
    let arena = Arena::new(ARENA_FRAMES);
    let base = arena.frame_ptr(Pfn(0)).expect("frame 0").as_ptr() as u64;
    // SAFETY: frame 0 of the arena is a zeroed 4 KiB frame, used as the root
    // table only through this reference; the arena outlives `table`.
    let root = unsafe { &mut *(base as *mut PageTable) };
    // SAFETY: arena frame i (physical address i * 4096) is at base + i * 4096.
    let mut table = unsafe { OffsetPageTable::new(root, VirtAddr::new(base)) };
    let mut frames = ArenaFrames { next: 1 };
    let flags = RW;
    let t0 = Instant::now();
    for k in 0..PAGES {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(VA + k * 4096));
        let frame = PhysFrame::containing_address(PhysAddr::new((DATA_PFN + k) * 4096));
        // SAFETY: the tables live in the arena and are walked by no CPU.
        unsafe { table.map_to(page, frame, flags, &mut frames) }
            .expect("map_to")
            .ignore();
    }
    let map = t0.elapsed();
    let t1 = Instant::now();
    for k in 0..PAGES {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(VA + k * 4096));
        table.unmap(page).expect("unmap").1.ignore();
    }
    let unmap = t1.elapsed();
    drop(arena);
    (map, unmap)
}

fn pv_counts(name: &str, aliases: bool) {
    let data = PAGES;
    let tables = 1024;
    let model = shared(data + tables + 64);
    let stats = |m: &Shared| m.0.borrow().stats();
    if aliases {
        let direct = DirectAliases {
            base: 0xffff_8880_0000_0000,
            first: data,
            n: tables,
        };
        let backend = pvmmu::XenPv::new(model.clone(), model.clone(), model.clone(), direct, None);
        let mut space = AddressSpace::new(backend, Pool::new(data + tables, 64))
            .map_err(|e| e.0)
            .expect("space");
        space
            .map(direct.base + data * 4096, Pfn(data), tables * 4096, RW)
            .expect("direct map")
            .ignore();
        // SAFETY: nothing runs on these tables; the model walks them.
        unsafe { space.activate() }.expect("baseptr");
        space.allocator_mut().add_frames(data, tables);
        model.0.borrow_mut().reset_stats();
        pv_map_unmap(name, &model, &mut space, &stats);
    } else {
        let backend = pv_backend(&model, pvmmu::backend::DEFAULT_BATCH);
        let mut space = AddressSpace::new(backend, Pool::new(data, tables))
            .map_err(|e| e.0)
            .expect("space");
        model.0.borrow_mut().reset_stats();
        pv_map_unmap(name, &model, &mut space, &stats);
    }
}

fn pv_map_unmap<B: pvmmu::Backend>(
    name: &str,
    model: &Shared,
    space: &mut AddressSpace<B, Pool>,
    stats: &dyn Fn(&Shared) -> hypercall::HypercallStats,
) {
    space
        .map(VA, Pfn(0), PAGES * 4096, RW)
        .expect("pv map")
        .ignore();
    let s = stats(model);
    model
        .0
        .borrow()
        .check_integrity()
        .expect("integrity after map");
    println!("BENCH {name}-map-1g-hypercalls {} calls", s.hypercalls);
    println!(
        "BENCH {name}-map-1g-entries {} entries",
        s.mmu_update_entries
    );
    model.0.borrow_mut().reset_stats();
    space.unmap(VA, PAGES * 4096).expect("pv unmap").ignore();
    let s = stats(model);
    model
        .0
        .borrow()
        .check_integrity()
        .expect("integrity after unmap");
    println!("BENCH {name}-unmap-1g-hypercalls {} calls", s.hypercalls);
    println!(
        "BENCH {name}-unmap-1g-entries {} entries",
        s.mmu_update_entries
    );
}

/// The per-PTE baseline: the same 1 GiB mapped one page per call.
fn pv_per_page() {
    let model = shared(PAGES + 1024);
    let backend = pv_backend(&model, pvmmu::backend::DEFAULT_BATCH);
    let mut space = AddressSpace::new(backend, Pool::new(PAGES, 1024))
        .map_err(|e| e.0)
        .expect("space");
    model.0.borrow_mut().reset_stats();
    for k in 0..PAGES {
        space
            .map(VA + k * 4096, Pfn(k), 4096, RW)
            .expect("map page")
            .ignore();
    }
    let s = model.0.borrow().stats();
    println!("BENCH pv-per-page-map-1g-hypercalls {} calls", s.hypercalls);
    println!(
        "BENCH pv-per-page-map-1g-entries {} entries",
        s.mmu_update_entries
    );
}

fn main() {
    // Warm-up (page faults of fresh arenas, caches), not measured.
    let _ = pvmmu_round();
    let _ = x86_64_round();
    let (mut pm, mut pu, mut xm, mut xu) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let (m, u) = pvmmu_round();
        pm.push(m);
        pu.push(u);
        let (m, u) = x86_64_round();
        xm.push(m);
        xu.push(u);
    }
    let (pm, pu, xm, xu) = (median(pm), median(pu), median(xm), median(xu));
    let ns = |d: Duration| d.as_nanos() as f64 / PAGES as f64;
    println!("BENCH pvmmu-map-1g {:.2} ns/page", ns(pm));
    println!("BENCH pvmmu-unmap-1g {:.2} ns/page", ns(pu));
    println!("BENCH x86_64-map-1g {:.2} ns/page", ns(xm));
    println!("BENCH x86_64-unmap-1g {:.2} ns/page", ns(xu));
    println!(
        "BENCH range-map-vs-x86_64 {:.2} x",
        xm.as_secs_f64() / pm.as_secs_f64()
    );
    println!(
        "BENCH range-unmap-vs-x86_64 {:.2} x",
        xu.as_secs_f64() / pu.as_secs_f64()
    );
    pv_counts("pv", false);
    pv_counts("pv-aliased", true);
    pv_per_page();
}
