//! Host tests of the bootstrap over an in-memory arena (native) — the PV
//! path is tested against the Xen model in `tests_pv`.

use super::sim::Reach;
use super::*;
use crate::types::{Mfn, ENTRY_FRAME_MASK};
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use core::cell::RefCell;
use core::ptr::NonNull;
use std::vec::Vec;
use x86_64::structures::paging::PageTableFlags as F;

/// Frames allocated on first touch; `reach` limits which pfns are reachable.
pub(crate) struct LazyArena {
    frames: RefCell<BTreeMap<u64, Box<FrameWords>>>,
}

impl LazyArena {
    pub(crate) fn new() -> Self {
        Self {
            frames: RefCell::new(BTreeMap::new()),
        }
    }
    pub(crate) fn touched(&self) -> usize {
        self.frames.borrow().len()
    }
    fn ptr(&self, pfn: Pfn) -> NonNull<FrameWords> {
        let mut f = self.frames.borrow_mut();
        let b = f.entry(pfn.0).or_insert_with(|| Box::new([0; 512]));
        NonNull::from(&mut **b)
    }
}

// SAFETY: frames are boxed and never freed while the arena lives, so the
// pointer for a pfn is stable and valid for reads and writes of 4 KiB.
unsafe impl PhysMem for LazyArena {
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        Some(self.ptr(pfn))
    }
}

/// Walks the tree at `root` for `va` with its own reading of the raw
/// entries (a check on the engine's walker, not a use of it): (pfn, leaf
/// flags, level number).
pub(crate) fn translate(
    mem: &dyn PhysMem,
    root: Pfn,
    va: u64,
    pv_map: &dyn FrameMap,
) -> Option<(u64, u64, usize)> {
    let mut table = root;
    for (n, level) in [Level::L4, Level::L3, Level::L2, Level::L1]
        .into_iter()
        .enumerate()
    {
        let p = mem.frame_ptr(table)?;
        // SAFETY: the arena hands out valid frames.
        let e = unsafe { (*p.as_ptr())[level.index(va)] };
        if e & F::PRESENT.bits() == 0 {
            return None;
        }
        let frame = pv_map.to_pfn(Mfn((e & ENTRY_FRAME_MASK) >> 12))?.0;
        if level == Level::L1 || e & F::HUGE_PAGE.bits() != 0 {
            let off = (va >> 12) & ((level.entry_span() >> 12) - 1);
            return Some((frame + off, e & !ENTRY_FRAME_MASK, 4 - n));
        }
        table = Pfn(frame);
    }
    None
}

const DM: u64 = 0xffff_8880_0000_0000;
const KVA: u64 = 0xffff_ffff_8000_0000;

struct NativeRun {
    report: BootReport,
    loaded: Vec<Pfn>,
}

fn run_native(
    ram: &[PfnRange],
    reserved: &[PfnRange],
    first: PfnRange,
    sizes: PageSizes,
    arena: &LazyArena,
) -> Result<NativeRun, BootError> {
    let regions = [
        Region {
            va: KVA + 0x100 * PAGE_SIZE,
            pfns: PfnRange::new(0x100, 0x110),
            access: Access::Text,
        },
        Region {
            va: KVA + 0x110 * PAGE_SIZE,
            pfns: PfnRange::new(0x110, 0x118),
            access: Access::ReadOnly,
        },
        Region {
            va: KVA + 0x118 * PAGE_SIZE,
            pfns: PfnRange::new(0x118, 0x140),
            access: Access::Data,
        },
    ];
    let layout = Layout {
        ram,
        reserved,
        first_chunk: first,
        entry_alias_base: 0,
        direct_map_base: DM,
        regions: &regions,
        page_sizes: sizes,
    };
    let boot = Reach {
        mem: arena,
        ranges: alloc::vec![first],
    };
    let direct = Reach {
        mem: arena,
        ranges: ram.to_vec(),
    };
    let mut loaded = Vec::new();
    let mut load = |p: Pfn| loaded.push(p);
    let mut scratch = [mmu_update { ptr: 0, val: 0 }; 0];
    let report = bootstrap(
        &layout,
        Platform::Native {
            load_root: &mut load,
        },
        &boot,
        &direct,
        &mut scratch,
    )?;
    Ok(NativeRun { report, loaded })
}

fn check_direct_map(arena: &LazyArena, ram: &[PfnRange], report: &BootReport, stride: u64) {
    let all = Reach {
        mem: arena,
        ranges: ram.to_vec(),
    };
    let mut mapped = 0;
    for r in ram {
        let mut p = r.start.0;
        while p < r.end.0 {
            let (pfn, flags, _) = translate(&all, report.root, DM + p * PAGE_SIZE, &Identity)
                .unwrap_or_else(|| panic!("pfn {p:#x} not in the direct map"));
            assert_eq!(pfn, p);
            assert!(flags & F::WRITABLE.bits() != 0 && flags & F::NO_EXECUTE.bits() != 0);
            p += stride;
            mapped += 1;
        }
    }
    assert!(mapped > 0);
    // Holes are not mapped.
    let end = ram.iter().map(|r| r.end.0).max().unwrap_or(0);
    let mut prev = 0;
    for r in ram {
        if r.start.0 > prev {
            assert!(
                translate(&all, report.root, DM + prev * PAGE_SIZE, &Identity).is_none(),
                "hole pfn {prev:#x} mapped"
            );
        }
        prev = r.end.0;
    }
    assert!(translate(&all, report.root, DM + end * PAGE_SIZE, &Identity).is_none());
}

use crate::phys::Identity;

#[test]
fn native_4k_one_gib_grows_geometrically() {
    let arena = LazyArena::new();
    let ram = [PfnRange::new(0, 0x9f), PfnRange::new(0x100, 0x40000)];
    let reserved = [PfnRange::new(0x100, 0x140)];
    let first = PfnRange::new(0x100, 0x300); // 2 MiB boot-mapped
    let run = run_native(&ram, &reserved, first, PageSizes::Only4K, &arena).unwrap();
    let r = &run.report;
    assert_eq!(run.loaded, alloc::vec![r.root]);
    assert_eq!(r.pages_mapped, 0x9f + 0x40000 - 0x100);
    // 1 GiB of 4 KiB pages needs 512 L1s, 1 L2 and an L3 per side + L4.
    assert!(r.tables_created >= 515, "{r:?}");
    assert!(r.tables_created <= 512 + 16, "{r:?}");
    assert!(r.rounds >= 2 && r.rounds <= 4, "rounds {}", r.rounds);
    // Every chunk at most GROWTH x the previous one.
    for w in r.chunks[..r.rounds as usize].windows(2) {
        assert!(w[1].len() <= w[0].len().max(512) * GROWTH);
        assert_eq!(w[1].start, w[0].end);
    }
    // Tables never on reserved frames, all inside RAM.
    for t in r.tables.ranges() {
        for p in t.start.0..t.end.0 {
            assert!(!reserved.iter().any(|x| x.contains(Pfn(p))));
            assert!(ram.iter().any(|x| x.contains(Pfn(p))));
        }
    }
    assert_eq!(r.tables.frames(), r.tables_created);
    check_direct_map(&arena, &ram, r, 1);
    // Kernel regions with their permissions.
    let all = Reach {
        mem: &arena,
        ranges: ram.to_vec(),
    };
    let (p, f, _) = translate(&all, r.root, KVA + 0x105 * PAGE_SIZE, &Identity).unwrap();
    assert_eq!(p, 0x105);
    assert!(f & F::WRITABLE.bits() == 0 && f & F::NO_EXECUTE.bits() == 0);
    let (_, f, _) = translate(&all, r.root, KVA + 0x112 * PAGE_SIZE, &Identity).unwrap();
    assert!(f & F::WRITABLE.bits() == 0 && f & F::NO_EXECUTE.bits() != 0);
    let (_, f, _) = translate(&all, r.root, KVA + 0x13f * PAGE_SIZE, &Identity).unwrap();
    assert!(f & F::WRITABLE.bits() != 0 && f & F::NO_EXECUTE.bits() != 0);
    assert!(translate(&all, r.root, KVA + 0x140 * PAGE_SIZE, &Identity).is_none());
    // Memory touched is the tables plus nothing else.
    assert_eq!(arena.touched() as u64, r.tables_created);
    // Round 0's tables sit at the top of the boot-mapped frames, round 1's
    // at the top of chunk 0 (mapped by round 0).
    assert!(r
        .tables
        .ranges()
        .iter()
        .any(|t| t.end.0 == first.end.0 || t.end.0 == r.chunks[0].end.0));
    assert!(r.tables.contains(Pfn(r.chunks[0].end.0 - 1)));
}

#[test]
fn native_large_pages_with_high_memory() {
    // q35 with 3 GiB: 2 GiB low (minus the low hole), 1 GiB above 4 GiB.
    let arena = LazyArena::new();
    let ram = [
        PfnRange::new(0, 0x9f),
        PfnRange::new(0x100, 0x7ffe0),
        PfnRange::new(0x100000, 0x140000),
    ];
    let reserved = [PfnRange::new(0x100, 0x140)];
    let first = PfnRange::new(0x100, 0x1000);
    for sizes in [PageSizes::Up2M, PageSizes::Up1G] {
        let arena2 = LazyArena::new();
        let run = run_native(&ram, &reserved, first, sizes, &arena2).unwrap();
        let r = &run.report;
        assert_eq!(r.pages_mapped, 0x9f + (0x7ffe0 - 0x100) + 0x40000);
        check_direct_map(&arena2, &ram, r, 97);
        let all = Reach {
            mem: &arena2,
            ranges: ram.to_vec(),
        };
        let (_, _, level) = translate(&all, r.root, DM + 0x100000 * PAGE_SIZE, &Identity).unwrap();
        assert_eq!(level, if sizes == PageSizes::Up1G { 3 } else { 2 });
        assert!(r.tables_created < 16, "{sizes:?}: {r:?}");
    }
    let _ = arena;
}

#[test]
fn native_round_count_is_logarithmic() {
    // 4 KiB only: rounds grow slowly with memory (1, 4, 16 GiB).
    let mut rounds = Vec::new();
    for gib in [1u64, 4, 16] {
        let arena = LazyArena::new();
        let ram = [PfnRange::new(0x100, gib << 18)];
        let reserved = [PfnRange::new(0x100, 0x140)];
        let run = run_native(
            &ram,
            &reserved,
            PfnRange::new(0x100, 0x300),
            PageSizes::Only4K,
            &arena,
        )
        .unwrap();
        assert_eq!(run.report.pages_mapped, (gib << 18) - 0x100);
        rounds.push(run.report.rounds);
    }
    assert!(rounds[2] <= rounds[0] + 1, "rounds {rounds:?}");
}

#[test]
fn refuses_bad_layouts() {
    let arena = LazyArena::new();
    let ram = [PfnRange::new(0x100, 0x1000)];
    let boot = Reach {
        mem: &arena,
        ranges: ram.to_vec(),
    };
    let try_boot = |reserved: &[PfnRange], base: u64, regions: &[Region]| {
        let layout = Layout {
            ram: &ram,
            reserved,
            first_chunk: PfnRange::new(0x100, 0x200),
            entry_alias_base: 0,
            direct_map_base: base,
            regions,
            page_sizes: PageSizes::Only4K,
        };
        let mut load = |_p: Pfn| panic!("must not switch");
        let mut scratch = [mmu_update { ptr: 0, val: 0 }; 0];
        bootstrap(
            &layout,
            Platform::Native {
                load_root: &mut load,
            },
            &boot,
            &boot,
            &mut scratch,
        )
        .map(|r| r.root)
    };
    let outside_dm = [Region {
        va: DM + 0x200 * PAGE_SIZE,
        pfns: PfnRange::new(0x100, 0x101),
        access: Access::Data,
    }];
    for (base, regions) in [
        (XEN_HOLE.0, &[][..]),
        (DM + 4096, &[][..]),
        (DM, &outside_dm[..]),
    ] {
        assert_eq!(try_boot(&[], base, regions), Err(BootError::BadLayout));
    }
    // No free frame in the boot-mapped chunk.
    let e = try_boot(&[PfnRange::new(0x100, 0x200)], DM, &[]);
    assert!(
        matches!(e, Err(BootError::OutOfFrames { round: 0, .. })),
        "{e:?}"
    );
}

/// `check_layout`'s edges, each one page from the limit both ways: a region
/// touching Xen's hole, the direct map or the previous region is accepted;
/// one page into it, or misaligned, is refused. (cargo-mutants found every
/// comparison of the check movable by one without a test noticing.)
#[test]
fn layout_edges_are_exact() {
    let ram = [PfnRange::new(0x100, 0x1000)];
    let dm_end = DM + 0x1000 * PAGE_SIZE;
    let check = |regions: &[(u64, u64)]| {
        let regions: Vec<Region> = regions
            .iter()
            .map(|&(va, pages)| Region {
                va,
                pfns: PfnRange::new(0x100, 0x100 + pages),
                access: Access::Data,
            })
            .collect();
        check_layout(&Layout {
            ram: &ram,
            reserved: &[],
            first_chunk: PfnRange::new(0x100, 0x200),
            entry_alias_base: 0,
            direct_map_base: DM,
            regions: &regions,
            page_sizes: PageSizes::Only4K,
        })
    };
    let image = 0xffff_ffff_8000_0000u64;
    let ok: &[&[(u64, u64)]] = &[
        &[(XEN_HOLE.0 - 4 * PAGE_SIZE, 4)],
        &[(XEN_HOLE.1, 4)],
        &[(DM - 4 * PAGE_SIZE, 4)],
        &[(dm_end, 4)],
        &[(image, 4), (image + 4 * PAGE_SIZE, 2)],
    ];
    for regions in ok {
        assert_eq!(check(regions), Ok(()), "{regions:#x?}");
    }
    let refused: &[&[(u64, u64)]] = &[
        &[(XEN_HOLE.0 - 3 * PAGE_SIZE, 4)],
        &[(XEN_HOLE.1 - PAGE_SIZE, 4)],
        &[(DM - 3 * PAGE_SIZE, 4)],
        &[(dm_end - PAGE_SIZE, 4)],
        &[(image, 4), (image + 3 * PAGE_SIZE, 2)],
        &[(image + 8, 1)],
    ];
    for regions in refused {
        assert_eq!(check(regions), Err(BootError::BadLayout), "{regions:#x?}");
    }
}
