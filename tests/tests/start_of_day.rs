//! The address space on Xen's own start-of-day tree (cross-crate: pvmmu's
//! PV backend, its address space and invariant walker, the hypercall trait
//! and the Xen model's dom0-builder tables).
//!
//! The tree is live (the model's current root, pinned by "Xen"), and the
//! frames the new tables come from are mapped writable by Xen's initial
//! mapping: each must be zeroed, made read-only in that mapping and only
//! then hooked — in one ordered submission — and made writable again when
//! it is freed.

use hypercall::MmuHypercalls;
use pvmmu::backend::xen::MAX_ALIASES;
use pvmmu::backend::{Alias, AliasMap};
use pvmmu::entry::Flags;
use pvmmu::invariants::{self, Rules};
use pvmmu::model::XenModel;
use pvmmu::{AddressSpace, FrameAllocator, Pfn, XenPv};

use pvmmu::model::SharedModel as Shared;

/// Xen's initial mapping: pfn p at `base + p * 4096` for p < `n`.
struct InitialMapping {
    base: u64,
    n: u64,
}

impl AliasMap for InitialMapping {
    fn aliases(&self, pfn: Pfn, out: &mut [Alias; MAX_ALIASES]) -> usize {
        if pfn.0 < self.n {
            out[0] = Alias::Va(self.base + pfn.0 * 4096);
            1
        } else {
            0
        }
    }
}

/// Hands out frames from a range, lowest first.
struct Frames {
    free: Vec<u64>,
    out: usize,
}

impl FrameAllocator for Frames {
    fn allocate(&mut self) -> Option<Pfn> {
        let f = self.free.pop()?;
        self.out += 1;
        Some(Pfn(f))
    }
    fn free(&mut self, pfn: Pfn) {
        self.out -= 1;
        self.free.push(pfn.0);
    }
}

const VIRT_BASE: u64 = 0xffff_ffff_8000_0000;
/// "Image" frames: the first 600 are the kernel, the rest are free memory
/// that Xen's initial tables already map (writable).
const IMAGE: u64 = 1024;
const KERNEL: u64 = 600;
const REGION: u64 = 0xffff_c900_0000_0000;
const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);

#[test]
fn address_space_on_xens_start_of_day_tree() {
    let model = Shared::new(XenModel::new(32768));
    let sod = model
        .0
        .borrow_mut()
        .start_of_day(VIRT_BASE, IMAGE)
        .expect("start of day");
    let aliases = InitialMapping {
        base: VIRT_BASE,
        n: sod.nr_mapped_pfns,
    };
    let backend = XenPv::new(
        model.clone(),
        model.clone(),
        model.clone(),
        aliases,
        Some(sod.root_mfn),
    );
    let frames = Frames {
        free: (KERNEL..IMAGE).rev().collect(),
        out: 0,
    };
    // SAFETY: the start-of-day L4 is validated and pinned by the builder;
    // this test owns every table below it.
    let mut space = unsafe { AddressSpace::from_root(backend, frames, sod.pt_base_pfn, true) };
    let writable = |space: &AddressSpace<_, Frames>, pfn: u64| {
        space
            .lookup(VIRT_BASE + pfn * 4096)
            .expect("alias mapped")
            .flags
            .contains(Flags::WRITABLE)
    };
    assert!(writable(&space, KERNEL), "free frames start writable");

    // 64 MiB of data frames under a new L3: the tables come from frames Xen
    // maps writable.
    let pages = 16384;
    model.0.borrow_mut().reset_stats();
    space
        .map(REGION, Pfn(8192), pages * 4096, RW)
        .expect("map 64 MiB")
        .ignore();
    let st = model.0.borrow().stats();
    let tables = space.allocator().out as u64;
    assert_eq!(tables, 32 + 1 + 1, "32 L1s, one L2, one L3");
    // One RO flip per new table, then the single hook, in one hypercall.
    assert_eq!((st.mmu_update_entries, st.hypercalls), (tables + 1, 1));
    for k in [0, 1, 511, 512, pages - 1] {
        assert_eq!(
            space.lookup(REGION + k * 4096).map(|t| t.pfn),
            Ok(Pfn(8192 + k))
        );
    }
    for pfn in KERNEL..KERNEL + tables {
        assert!(
            !writable(&space, pfn),
            "alias of table {pfn:#x} still writable"
        );
    }
    assert!(
        writable(&space, KERNEL + tables),
        "a frame that is no table stays writable"
    );
    {
        let m = model.0.borrow();
        m.check_integrity().expect("integrity");
        let mut found = Vec::new();
        invariants::check(
            space.backend(),
            space.root(),
            Rules {
                pv: true,
                wx: false,
                pv_cache: false,
            },
            Some(&*m),
            &mut |v| found.push(v),
        );
        assert!(found.is_empty(), "{found:?}");
    }

    // Extending Xen's own live L1 (right after the mapped image): a queued
    // write into a live table.
    let next = VIRT_BASE + sod.nr_mapped_pfns * 4096;
    model.0.borrow_mut().reset_stats();
    space
        .map(next, Pfn(20000), 4 * 4096, RW)
        .expect("extend")
        .ignore();
    let st = model.0.borrow().stats();
    assert_eq!(st.mmu_update_entries, 4);
    assert_eq!(space.lookup(next + 3 * 4096).map(|t| t.pfn), Ok(Pfn(20003)));

    // Unmapping the region frees its tables (each L1 covered whole is
    // unhooked by one write, then the emptied L2 and L3): aliases writable
    // again, frames back to the allocator.
    space.unmap(REGION, pages * 4096).expect("unmap").ignore();
    assert_eq!(space.allocator().out, 0);
    for pfn in KERNEL..KERNEL + tables {
        assert!(
            writable(&space, pfn),
            "alias of freed table {pfn:#x} still read-only"
        );
    }
    space
        .unmap(next, 4 * 4096)
        .expect("unmap extension")
        .ignore();
    let m = model.0.borrow();
    m.check_integrity().expect("integrity");
    assert_eq!(m.current_root(), Some(sod.root_mfn));
}
