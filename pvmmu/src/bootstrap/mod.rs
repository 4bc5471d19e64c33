//! Early bootstrap of the whole direct map, chunk by chunk, with each round's
//! new page tables placed in the last free frames of the chunk mapped before.
//!
//! # The rule
//! The next page table always comes from memory that is already mapped (so
//! it is filled with plain stores) and is not yet a table (so it is still
//! writable). Once a table is complete it is made read-only in every live
//! mapping and hooked into the tree, in one ordered submission. Under Xen PV
//! no live table is ever writable, at any moment.
//!
//! # Rounds
//! * Round 0 maps chunk 0 (from pfn 0 up to the end of the memory the entry
//!   environment already maps, rounded up to 2 MiB) and the `regions` (the
//!   kernel image / Xen's boot region) into a brand-new tree whose tables come
//!   from the top of that boot-mapped memory. Under PV its tables are made RO
//!   in Xen's initial tables, then one multicall pins the new L4, switches to
//!   it and unpins Xen's initial tree; a last batch makes the retired initial
//!   tables writable again so the caller can reuse them. Natively the new root
//!   is loaded with the caller's `load_root`.
//! * Round r+1 maps the next chunk, at most [`GROWTH`] times larger than chunk
//!   r and only as large as the free frames at the end of chunk r can hold the
//!   tables for. Tables are counted by a dry run of the very traversal that
//!   then builds them, reserved from the top of chunk r, filled with stores,
//!   and completed in post-order: a table is made RO and hooked only when the
//!   traversal has left it for good, so its RO flip precedes its hook, and a
//!   flush of the batch can never make a table RO that is still being filled.
//!
//! Chunk sizes therefore grow geometrically and the number of rounds grows
//! with the logarithm of memory size.
//!
//! # What the caller guarantees
//! `boot_mem` reaches every frame of `first_chunk` and every table of the
//! initial tree; `direct_mem` reaches frame `p` at `direct_map_base + p *
//! 4096` once the new tree is live; `reserved` covers every frame in use (the
//! kernel image, everything Xen placed after it, stacks, modules).

mod ranges;

use hypercall::abi::mmu_update;
use hypercall::{BatchError, Call, MmuExt, MmuHypercalls, MmuUpdate, PinLevel, XenError};
use x86_64::structures::paging::PageTableFlags as F;

pub use ranges::{PfnRange, RangeSet, RangeSetFull};

use crate::phys::{FrameMap, FrameWords, PhysMem};
use crate::types::{Mfn, Pfn, ENTRY_FRAME_MASK, PAGE_SIZE};

/// Capacity of the range sets that track page-table frames.
pub const MAX_TABLE_RANGES: usize = 64;
/// Most L4/L3/L2 tables the initial tree may have (it maps a few MiB).
pub const MAX_UPPER_TABLES: usize = 64;
/// Most rounds a bootstrap may take (far more than any real memory size needs).
pub const MAX_ROUNDS: usize = 16;
/// How much larger a chunk may be than the chunk before it (Linux keeps the
/// same x256 slack: a chunk could host the 4 KiB tables of one 512x larger).
pub const GROWTH: u64 = 256;

/// Start of Xen's hole in the 64-bit PV address space.
pub const XEN_HOLE_START: u64 = 0xffff_8000_0000_0000;
/// End of Xen's hole.
pub const XEN_HOLE_END: u64 = 0xffff_8800_0000_0000;

/// How a region of the new tree may be accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-only and executable (kernel text).
    Text,
    /// Read-only, not executable (rodata).
    ReadOnly,
    /// Writable, not executable (data, bss, everything else).
    Data,
}

/// A contiguous mapping the new tree must contain besides the direct map
/// (the kernel image, or under PV Xen's whole boot region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Virtual address of the first frame (4 KiB aligned).
    pub va: u64,
    /// The frames mapped, in order.
    pub pfns: PfnRange,
    /// Their permissions.
    pub access: Access,
}

/// Largest page size the direct map may use (natively; PV is always 4 KiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSizes {
    /// 4 KiB pages only (also what PV uses).
    Only4K,
    /// 2 MiB pages where a whole aligned block is RAM.
    Up2M,
    /// 1 GiB pages where a whole aligned block is RAM, else 2 MiB.
    Up1G,
}

/// What the bootstrap works on.
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    /// RAM as pseudo-physical frame ranges, sorted and disjoint.
    pub ram: &'a [PfnRange],
    /// Frames in use that must never become tables (sorted or not).
    pub reserved: &'a [PfnRange],
    /// Frames the entry environment maps (through `boot_mem`): chunk 0's
    /// source of tables.
    pub first_chunk: PfnRange,
    /// Where the entry environment's tree maps `first_chunk`: frame `p` at
    /// `entry_alias_base + p * 4096` (PV: Xen's `VIRT_BASE`; unused natively,
    /// where tables need not be read-only). Round 0 makes its new tables
    /// read-only there before the new root is pinned.
    pub entry_alias_base: u64,
    /// Virtual base of the direct map (pfn `p` at `base + p * 4096`).
    pub direct_map_base: u64,
    /// Other mappings of the new tree, disjoint in virtual address.
    pub regions: &'a [Region],
    /// Largest page size for the direct map (ignored under PV).
    pub page_sizes: PageSizes,
}

/// The platform under the bootstrap.
pub enum Platform<'a> {
    /// Xen PV: all live-table writes go through `hyp`.
    XenPv {
        /// The MMU hypercalls.
        hyp: &'a mut dyn MmuHypercalls,
        /// p2m / M2P.
        p2m: &'a dyn FrameMap,
        /// Pseudo-physical frame of Xen's initial L4 (`start_info.pt_base`).
        old_root: Pfn,
    },
    /// Native paging: plain stores; `load_root` loads CR3.
    Native {
        /// Makes the given L4 the live root (writes CR3).
        load_root: &'a mut dyn FnMut(Pfn),
    },
}

/// Where the bootstrap stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootError {
    /// A frame the bootstrap must reach is not reachable through the memory
    /// accessor in use.
    Unreachable(Pfn),
    /// A pfn has no machine frame in the p2m, or an entry points at a machine
    /// frame the guest does not own.
    NoMachineFrame(u64),
    /// Not enough free mapped frames for the tables of the next chunk.
    OutOfFrames {
        /// Round that needed them.
        round: u32,
        /// Tables needed.
        needed: u64,
        /// Frames available.
        available: u64,
    },
    /// More disjoint table ranges than [`MAX_TABLE_RANGES`].
    TooManyRanges,
    /// More rounds than [`MAX_ROUNDS`].
    TooManyRounds,
    /// A region or the direct map overlaps Xen's hole, is misaligned, or two
    /// mappings overlap.
    BadLayout,
    /// The new tree already maps an address the bootstrap must map.
    AlreadyMapped(u64),
    /// A round used fewer tables than its dry run counted (a bug in pvmmu).
    CountMismatch(u32),
    /// Xen refused a request.
    Hypervisor {
        /// Round in which it happened.
        round: u32,
        /// Requests of the failing call applied before the failure.
        done: usize,
        /// Xen's error.
        error: XenError,
    },
}

impl From<RangeSetFull> for BootError {
    fn from(_: RangeSetFull) -> Self {
        BootError::TooManyRanges
    }
}

/// What the bootstrap built and what it cost.
#[derive(Debug, Clone)]
pub struct BootReport {
    /// The new root L4 (live on return).
    pub root: Pfn,
    /// Every frame that is a page table of the new tree.
    pub tables: RangeSet<MAX_TABLE_RANGES>,
    /// Frames of the retired initial tables, now writable and free (PV).
    pub freed: RangeSet<MAX_TABLE_RANGES>,
    /// Page tables created.
    pub tables_created: u64,
    /// Live L2s replaced by a fresh copy (PV; the old frame is free again).
    pub tables_replaced: u64,
    /// Rounds taken (round 0 included).
    pub rounds: u32,
    /// Chunk of pfn space mapped by each round.
    pub chunks: [PfnRange; MAX_ROUNDS],
    /// 4 KiB pages of RAM reachable through the direct map.
    pub pages_mapped: u64,
    /// Hypercalls issued by the bootstrap.
    pub hypercalls: u64,
    /// `mmu_update` requests issued by the bootstrap.
    pub mmu_update_entries: u64,
}

const GIB_PAGES: u64 = 1 << 18;
const LEVEL_SHIFT: [u32; 5] = [0, 12, 21, 30, 39];
const INTERMEDIATE: u64 = F::PRESENT.bits() | F::WRITABLE.bits() | F::ACCESSED.bits();

/// A page table the traversal is inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    /// Already hooked into the live tree: writes go through the backend.
    Live(Pfn),
    /// Created this round, not yet hooked: filled with plain stores.
    Fresh(Pfn),
    /// Would be created (dry run).
    Dry,
}

#[derive(Debug, Clone, Copy)]
struct PathSlot {
    /// Virtual block covered (start address), level implied by the slot.
    block: u64,
    table: Table,
    /// A live L2 this (fresh) table replaces once hooked.
    replaces: Option<Pfn>,
}

/// A leaf mapping to create: `pages` frames from `pfn` at `va`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    va: u64,
    pfn: u64,
    pages: u64,
    access: Access,
    /// Direct-map segment (may use large pages natively).
    direct: bool,
}

/// Bootstraps the direct map. See the module documentation.
///
/// `scratch` is the `mmu_update` batch buffer (its length is the batch
/// capacity; under PV at least 64 entries). On success the new tree is live.
pub fn bootstrap<'a>(
    layout: &'a Layout<'a>,
    platform: Platform<'a>,
    boot_mem: &'a dyn PhysMem,
    direct_mem: &'a dyn PhysMem,
    scratch: &mut [mmu_update],
) -> Result<BootReport, BootError> {
    let mut b = Boot::new(layout, platform, boot_mem, direct_mem, scratch)?;
    b.run()?;
    Ok(b.report)
}

struct Boot<'a, 's> {
    layout: &'a Layout<'a>,
    pv: Option<(&'a mut dyn MmuHypercalls, &'a dyn FrameMap, Pfn)>,
    load_root: Option<&'a mut dyn FnMut(Pfn)>,
    boot_mem: &'a dyn PhysMem,
    direct_mem: &'a dyn PhysMem,
    /// True once the new tree is live (round 0 done).
    switched: bool,
    queue: &'s mut [mmu_update],
    queued: usize,
    round: u32,
    /// Frames reserved for this round's tables, handed out top-down.
    pool: RangeSet<MAX_TABLE_RANGES>,
    dry_count: u64,
    dry: bool,
    path: [Option<PathSlot>; 5],
    report: BootReport,
    stats_at_start: hypercall::HypercallStats,
}

impl<'a, 's> Boot<'a, 's> {
    fn new(
        layout: &'a Layout<'a>,
        platform: Platform<'a>,
        boot_mem: &'a dyn PhysMem,
        direct_mem: &'a dyn PhysMem,
        scratch: &'s mut [mmu_update],
    ) -> Result<Self, BootError> {
        let (pv, load_root) = match platform {
            Platform::XenPv { hyp, p2m, old_root } => (Some((hyp, p2m, old_root)), None),
            Platform::Native { load_root } => (None, Some(load_root)),
        };
        if pv.is_some() && scratch.len() < 64 {
            return Err(BootError::BadLayout);
        }
        let stats_at_start = pv.as_ref().map(|(h, _, _)| h.stats()).unwrap_or_default();
        Ok(Self {
            layout,
            pv,
            load_root,
            boot_mem,
            direct_mem,
            switched: false,
            queue: scratch,
            queued: 0,
            round: 0,
            pool: RangeSet::new(),
            dry_count: 0,
            dry: false,
            path: [None; 5],
            report: BootReport {
                root: Pfn(0),
                tables: RangeSet::new(),
                freed: RangeSet::new(),
                tables_created: 0,
                tables_replaced: 0,
                rounds: 0,
                chunks: [PfnRange::default(); MAX_ROUNDS],
                pages_mapped: 0,
                hypercalls: 0,
                mmu_update_entries: 0,
            },
            stats_at_start,
        })
    }

    fn is_pv(&self) -> bool {
        self.pv.is_some()
    }

    fn mem(&self) -> &'a dyn PhysMem {
        if self.switched {
            self.direct_mem
        } else {
            self.boot_mem
        }
    }

    fn frame(&self, pfn: Pfn) -> Result<*mut FrameWords, BootError> {
        self.mem()
            .frame_ptr(pfn)
            .map(|p| p.as_ptr())
            .ok_or(BootError::Unreachable(pfn))
    }

    fn read(&self, table: Pfn, index: usize) -> Result<u64, BootError> {
        let p = self.frame(table)?;
        // SAFETY: PhysMem guarantees `p` is valid for reads of a whole frame
        // and `index < 512`; page tables are always readable by the guest.
        Ok(unsafe { core::ptr::read_volatile(&(*p)[index]) })
    }

    /// Plain store into a frame that is not a live table.
    fn store(&self, table: Pfn, index: usize, val: u64) -> Result<(), BootError> {
        let p = self.frame(table)?;
        // SAFETY: callers only store into frames that are not live page
        // tables (fresh tables of this round, or any table natively), which
        // PhysMem guarantees writable; `index < 512`.
        unsafe { core::ptr::write_volatile(&mut (*p)[index], val) };
        Ok(())
    }

    fn to_frame(&self, pfn: u64) -> Result<u64, BootError> {
        match &self.pv {
            Some((_, p2m, _)) => p2m
                .to_mfn(Pfn(pfn))
                .map(|m| m.0)
                .ok_or(BootError::NoMachineFrame(pfn)),
            None => Ok(pfn),
        }
    }

    fn entry_pfn(&self, entry: u64) -> Result<Pfn, BootError> {
        let frame = (entry & ENTRY_FRAME_MASK) >> 12;
        match &self.pv {
            Some((_, p2m, _)) => p2m
                .to_pfn(Mfn(frame))
                .ok_or(BootError::NoMachineFrame(frame)),
            None => Ok(Pfn(frame)),
        }
    }

    fn root(&self) -> Pfn {
        self.report.root
    }

    // ---- the mmu_update queue (PV) -------------------------------------

    fn push(&mut self, req: MmuUpdate) -> Result<(), BootError> {
        if self.queued == self.queue.len() {
            self.flush()?;
        }
        self.queue[self.queued] = req.encode();
        self.queued += 1;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BootError> {
        let n = core::mem::take(&mut self.queued);
        let round = self.round;
        if let Some((hyp, _, _)) = self.pv.as_mut() {
            hyp.mmu_update(&self.queue[..n])
                .map_err(|BatchError { done, error }| BootError::Hypervisor {
                    round,
                    done,
                    error,
                })?;
        }
        Ok(())
    }

    /// Writes an entry of a table that is live (in the live tree, or, in round
    /// 0, a table of the tree Xen validates at pin time: never, see callers).
    fn write_live(&mut self, table: Pfn, index: usize, val: u64) -> Result<(), BootError> {
        if self.is_pv() {
            let mfn = self.to_frame(table.0)?;
            self.push(MmuUpdate::PtUpdate {
                entry_maddr: mfn * PAGE_SIZE + index as u64 * 8,
                val,
            })
        } else {
            self.store(table, index, val)
        }
    }

    fn write(&mut self, table: Table, index: usize, val: u64) -> Result<(), BootError> {
        match table {
            Table::Dry => Ok(()),
            Table::Fresh(pfn) => self.store(pfn, index, val),
            Table::Live(pfn) => self.write_live(pfn, index, val),
        }
    }

    // ---- tables ---------------------------------------------------------

    /// Takes the next table frame from this round's pool (top-down), zeroed.
    fn new_table(&mut self) -> Result<Table, BootError> {
        if self.dry {
            self.dry_count += 1;
            return Ok(Table::Dry);
        }
        let top = match self.pool.ranges().last() {
            Some(r) => Pfn(r.end.0 - 1),
            None => {
                return Err(BootError::OutOfFrames {
                    round: self.round,
                    needed: self.report.tables_created + 1,
                    available: 0,
                })
            }
        };
        self.pool.remove(PfnRange::new(top.0, top.0 + 1))?;
        let p = self.frame(top)?;
        // SAFETY: `top` was reserved for this round: reachable, free, not a
        // live table, so writable through the accessor.
        unsafe { core::ptr::write_bytes(p, 0, 1) };
        self.report.tables_created += 1;
        Ok(Table::Fresh(top))
    }

    /// Finishes a fresh table: RO in every live mapping, then hooked into
    /// `parent[index]`. Post-order: nothing stores into `child` afterwards.
    fn complete(&mut self, child: Table, parent: Table, index: usize) -> Result<(), BootError> {
        let pfn = match child {
            Table::Fresh(p) => p,
            Table::Dry | Table::Live(_) => return Ok(()),
        };
        self.protect_aliases(pfn)?;
        let entry = self.to_frame(pfn.0)? << 12 | INTERMEDIATE;
        self.write(parent, index, entry)
    }

    /// A fresh table holding a copy of live table `live`'s entries.
    fn copy_table(&mut self, live: Pfn) -> Result<Table, BootError> {
        let copy = self.new_table()?;
        if let Table::Fresh(new) = copy {
            for i in 0..512 {
                let e = self.read(live, i)?;
                if e != 0 {
                    self.store(new, i, e)?;
                }
            }
            self.report.tables_replaced += 1;
        }
        Ok(copy)
    }

    /// Queued after the hook of its replacement: the old table is no longer
    /// referenced, so Xen drops its type; make its aliases writable and stop
    /// counting it as a table (the frame is free for the caller again).
    fn retire_replaced(&mut self, old: Pfn) -> Result<(), BootError> {
        self.set_new_tree_aliases(old, true)?;
        self.report.tables.remove(PfnRange::new(old.0, old.0 + 1))?;
        Ok(())
    }

    /// Queues RO flips of every live mapping of `pfn` (PV only).
    fn protect_aliases(&mut self, pfn: Pfn) -> Result<(), BootError> {
        if !self.is_pv() {
            return Ok(());
        }
        if !self.switched {
            // Round 0: the live tree is the entry tree, which maps the boot
            // frames linearly; the new tree writes its own aliases RO.
            let old = match &self.pv {
                Some((_, _, old)) => *old,
                None => return Ok(()),
            };
            if self.layout.first_chunk.contains(pfn) {
                let va = self.layout.entry_alias_base + pfn.0 * PAGE_SIZE;
                self.set_alias_rw(old, va, false)?;
            }
            return Ok(());
        }
        self.set_new_tree_aliases(pfn, false)
    }

    /// Queues the RW bit of every mapping the new tree has of `pfn`: its
    /// direct-map page, and its page in each region (only in `Data` regions
    /// when making it writable again, so text and rodata stay read-only).
    fn set_new_tree_aliases(&mut self, pfn: Pfn, rw: bool) -> Result<(), BootError> {
        let root = self.root();
        let dm = self.layout.direct_map_base + pfn.0 * PAGE_SIZE;
        self.set_alias_rw(root, dm, rw)?;
        let regions = self.layout.regions;
        for r in regions {
            if r.pfns.contains(pfn) && (!rw || r.access == Access::Data) {
                let va = r.va + (pfn.0 - r.pfns.start.0) * PAGE_SIZE;
                self.set_alias_rw(root, va, rw)?;
            }
        }
        Ok(())
    }

    /// Walks the tree at `root` to the 4 KiB leaf of `va`; if it is present
    /// and its RW bit differs from `rw`, queues the change.
    fn set_alias_rw(&mut self, root: Pfn, va: u64, rw: bool) -> Result<(), BootError> {
        let mut table = root;
        for level in (2..=4).rev() {
            let e = self.read(table, index(va, level))?;
            if e & F::PRESENT.bits() == 0 {
                return Ok(());
            }
            if e & F::HUGE_PAGE.bits() != 0 {
                // Never under PV (no superpages); nothing to flip.
                return Ok(());
            }
            table = self.entry_pfn(e)?;
        }
        let i = index(va, 1);
        let e = self.read(table, i)?;
        if e & F::PRESENT.bits() == 0 || (e & F::WRITABLE.bits() != 0) == rw {
            return Ok(());
        }
        let val = if rw {
            e | F::WRITABLE.bits()
        } else {
            e & !F::WRITABLE.bits()
        };
        self.write_live(table, i, val)
    }

    // ---- traversal --------------------------------------------------------

    /// Completes (post-order) every path slot at or below `level`.
    fn close_path(&mut self, level: usize) -> Result<(), BootError> {
        for l in 1..=level.min(3) {
            if let Some(slot) = self.path[l].take() {
                let parent = match self.path[l + 1] {
                    Some(s) => s.table,
                    None => self.root_table(),
                };
                let pi = index(slot.block, l + 1);
                self.complete(slot.table, parent, pi)?;
                if let (Some(old), false) = (slot.replaces, self.dry) {
                    self.retire_replaced(old)?;
                }
            }
        }
        Ok(())
    }

    /// The table at `level` (1..=3) covering `va`, creating it if needed.
    fn table_at(&mut self, level: usize, va: u64) -> Result<Table, BootError> {
        let block = va & !((1u64 << LEVEL_SHIFT[level + 1]) - 1);
        if let Some(slot) = self.path[level] {
            if slot.block == block {
                return Ok(slot.table);
            }
        }
        // Leaving the previous block at this level: complete it and below.
        self.close_path(level)?;
        let parent = if level == 3 {
            self.root_table()
        } else {
            self.table_at(level + 1, va)?
        };
        let pi = index(va, level + 1);
        let mut replaces = None;
        let child = match parent {
            Table::Dry => self.new_table()?,
            Table::Live(p) | Table::Fresh(p) => {
                let e = self.read(p, pi)?;
                if e & F::PRESENT.bits() != 0 {
                    if e & F::HUGE_PAGE.bits() != 0 {
                        return Err(BootError::AlreadyMapped(va));
                    }
                    let child = self.entry_pfn(e)?;
                    if level == 2 && self.is_pv() && matches!(parent, Table::Live(_)) {
                        // A live L2 about to receive this round's L1s:
                        // replace it by a fresh copy hooked with one entry,
                        // instead of one mmu_update per new L1.
                        replaces = Some(child);
                        self.copy_table(child)?
                    } else {
                        // A present entry names a table already in the tree
                        // (a copied L2's entries point at live L1s); a table
                        // created this round is never revisited, because the
                        // traversal is monotonic in va. Writes to it go
                        // through the queue, never by store.
                        Table::Live(child)
                    }
                } else {
                    self.new_table()?
                }
            }
        };
        self.path[level] = Some(PathSlot {
            block,
            table: child,
            replaces,
        });
        Ok(child)
    }

    fn root_table(&self) -> Table {
        if self.dry && !self.switched && self.round == 0 {
            Table::Dry
        } else if self.switched {
            Table::Live(self.root())
        } else {
            Table::Fresh(self.root())
        }
    }

    fn leaf_flags(&self, access: Access, pfn: u64) -> u64 {
        let base = F::PRESENT.bits() | F::ACCESSED.bits();
        let mut f = match access {
            Access::Text => base,
            Access::ReadOnly => base | F::NO_EXECUTE.bits(),
            Access::Data => base | F::WRITABLE.bits() | F::DIRTY.bits() | F::NO_EXECUTE.bits(),
        };
        if self.is_pv() && self.report.tables.contains(Pfn(pfn)) {
            f &= !F::WRITABLE.bits();
        }
        f
    }

    /// Maps one segment (monotonic in va with respect to earlier segments).
    fn map_segment(&mut self, seg: Segment) -> Result<(), BootError> {
        let mut done = 0;
        while done < seg.pages {
            let va = seg.va + done * PAGE_SIZE;
            let pfn = seg.pfn + done;
            let left = seg.pages - done;
            // Largest leaf allowed here.
            let mut level = 1;
            if seg.direct && !self.is_pv() {
                let max = match self.layout.page_sizes {
                    PageSizes::Only4K => 1,
                    PageSizes::Up2M => 2,
                    PageSizes::Up1G => 3,
                };
                for l in (2..=max).rev() {
                    let pages = 1u64 << (LEVEL_SHIFT[l] - 12);
                    if va % (pages * PAGE_SIZE) == 0 && pfn % pages == 0 && left >= pages {
                        level = l;
                        break;
                    }
                }
            }
            let table = self.table_at(level, va)?;
            let pages_per_entry = 1u64 << (LEVEL_SHIFT[level] - 12);
            let mut i = index(va, level);
            let mut n = 0;
            while i < 512 && done < seg.pages && seg.pages - done >= pages_per_entry {
                let p = seg.pfn + done;
                if !self.dry {
                    if let Table::Live(t) | Table::Fresh(t) = table {
                        if self.read(t, i)? & F::PRESENT.bits() != 0 {
                            return Err(BootError::AlreadyMapped(seg.va + done * PAGE_SIZE));
                        }
                    }
                    let mut val = self.to_frame(p)? << 12 | self.leaf_flags(seg.access, p);
                    if level > 1 {
                        val |= F::HUGE_PAGE.bits();
                    }
                    self.write(table, i, val)?;
                }
                done += pages_per_entry;
                i += 1;
                n += 1;
                if level > 1 {
                    // Re-evaluate the leaf size for the next block.
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Every leaf mapping of round `round` covering pfn chunk `chunk`.
    fn for_each_segment(
        &mut self,
        chunk: PfnRange,
        with_regions: bool,
        mut f: impl FnMut(&mut Self, Segment) -> Result<(), BootError>,
    ) -> Result<(), BootError> {
        let base = self.layout.direct_map_base;
        // Direct map and regions interleaved by virtual address.
        let mut segs_dm = self
            .layout
            .ram
            .iter()
            .map(|r| r.intersect(&chunk))
            .filter(|r| !r.is_empty());
        let regions = if with_regions {
            self.layout.regions
        } else {
            &[]
        };
        let mut ri = 0;
        let mut next_dm = segs_dm.next();
        loop {
            let dm_va = next_dm.map(|r| base + r.start.0 * PAGE_SIZE);
            let rg_va = regions.get(ri).map(|r| r.va);
            let take_dm = match (dm_va, rg_va) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(a), Some(b)) => a < b,
            };
            let seg = if take_dm {
                let r = next_dm.take().ok_or(BootError::BadLayout)?;
                next_dm = segs_dm.next();
                Segment {
                    va: base + r.start.0 * PAGE_SIZE,
                    pfn: r.start.0,
                    pages: r.len(),
                    access: Access::Data,
                    direct: true,
                }
            } else {
                let r = regions[ri];
                ri += 1;
                Segment {
                    va: r.va,
                    pfn: r.pfns.start.0,
                    pages: r.pfns.len(),
                    access: r.access,
                    direct: false,
                }
            };
            f(self, seg)?;
        }
        Ok(())
    }

    /// Runs one round's traversal (dry or real) over `chunk`.
    fn traverse(&mut self, chunk: PfnRange, with_regions: bool) -> Result<(), BootError> {
        self.path = [None; 5];
        self.for_each_segment(chunk, with_regions, |b, seg| b.map_segment(seg))?;
        self.close_path(3)
    }

    fn tables_needed(&mut self, chunk: PfnRange, with_regions: bool) -> Result<u64, BootError> {
        self.dry = true;
        self.dry_count = 0;
        let r = self.traverse(chunk, with_regions);
        self.dry = false;
        r?;
        Ok(self.dry_count)
    }

    // ---- rounds -----------------------------------------------------------

    /// Free frames of `source` (RAM, not reserved, not tables), as ranges.
    fn free_in(&self, source: PfnRange) -> Result<RangeSet<{ 2 * MAX_TABLE_RANGES }>, BootError> {
        let mut free = RangeSet::new();
        for r in self.layout.ram {
            free.insert(r.intersect(&source))?;
        }
        for r in self.layout.reserved {
            free.remove(*r)?;
        }
        for r in self.report.tables.ranges() {
            free.remove(*r)?;
        }
        Ok(free)
    }

    /// Reserves `n` free frames from the top of `source` into the pool and
    /// marks them as tables.
    fn reserve(&mut self, source: PfnRange, n: u64) -> Result<(), BootError> {
        let free = self.free_in(source)?;
        let mut left = n;
        for r in free.ranges().iter().rev() {
            if left == 0 {
                break;
            }
            let take = left.min(r.len());
            let got = PfnRange::new(r.end.0 - take, r.end.0);
            self.pool.insert(got)?;
            self.report.tables.insert(got)?;
            // Retired initial tables are free again and may be reused.
            self.report.freed.remove(got)?;
            left -= take;
        }
        if left > 0 {
            return Err(BootError::OutOfFrames {
                round: self.round,
                needed: n,
                available: n - left,
            });
        }
        Ok(())
    }

    fn free_frames(&self, source: PfnRange) -> Result<u64, BootError> {
        Ok(self.free_in(source)?.frames())
    }

    fn ram_end(&self) -> u64 {
        self.layout.ram.iter().map(|r| r.end.0).max().unwrap_or(0)
    }

    fn ram_in(&self, chunk: PfnRange) -> u64 {
        self.layout
            .ram
            .iter()
            .map(|r| r.intersect(&chunk).len())
            .sum()
    }

    fn check_layout(&self) -> Result<(), BootError> {
        let base = self.layout.direct_map_base;
        let dm_end = base
            .checked_add(self.ram_end() * PAGE_SIZE)
            .ok_or(BootError::BadLayout)?;
        let overlaps_hole = |s: u64, e: u64| s < XEN_HOLE_END && e > XEN_HOLE_START;
        if base % (1 << 30) != 0 || overlaps_hole(base, dm_end) {
            return Err(BootError::BadLayout);
        }
        let mut prev_end = 0u64;
        for r in self.layout.regions {
            let end =
                r.va.checked_add(r.pfns.len() * PAGE_SIZE)
                    .ok_or(BootError::BadLayout)?;
            if r.va % PAGE_SIZE != 0 || r.va < prev_end || overlaps_hole(r.va, end) {
                return Err(BootError::BadLayout);
            }
            if r.va < dm_end && end > base {
                return Err(BootError::BadLayout);
            }
            prev_end = end;
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), BootError> {
        self.check_layout()?;
        let old_tables = self.collect_old_tables()?;
        for r in old_tables.ranges() {
            self.report.tables.insert(*r)?;
        }
        // Round 0: new root + chunk 0 + regions, tables from the top of the
        // boot-mapped memory.
        let first = self.layout.first_chunk;
        let chunk0 = PfnRange::new(
            0,
            align_up(first.end.0, 512).min(align_up(self.ram_end(), 512)),
        );
        let needed = self.tables_needed(chunk0, true)? + 1;
        self.reserve(first, needed)?;
        let root = self.new_table()?;
        self.report.root = match root {
            Table::Fresh(p) => p,
            _ => return Err(BootError::BadLayout),
        };
        self.traverse(chunk0, true)?;
        self.protect_aliases(self.root())?;
        self.switch_to_new_root(&old_tables)?;
        self.end_round(chunk0)?;

        // Rounds 1..: geometric growth.
        let mut prev = chunk0;
        while prev.end.0 < self.ram_end() {
            self.round += 1;
            if self.round as usize >= MAX_ROUNDS {
                return Err(BootError::TooManyRounds);
            }
            let available = self.free_frames(prev)?;
            let remaining = align_up(self.ram_end(), 512) - prev.end.0;
            let mut span = (prev.len().max(512) * GROWTH).min(remaining);
            let mut chunk;
            loop {
                span = align_up(span, 512).min(remaining);
                // End chunks on a 1 GiB boundary when that leaves a non-empty
                // chunk: whole GiBs get fresh L2s (hooked once, not per L1)
                // and natively can use 1 GiB pages.
                let end = prev.end.0 + span;
                let gib_end = end / GIB_PAGES * GIB_PAGES;
                if span < remaining && gib_end > prev.end.0 {
                    span = gib_end - prev.end.0;
                }
                chunk = PfnRange::new(prev.end.0, prev.end.0 + span);
                let need = self.tables_needed(chunk, false)?;
                if need <= available {
                    self.reserve(prev, need)?;
                    break;
                }
                if span <= 512 {
                    return Err(BootError::OutOfFrames {
                        round: self.round,
                        needed: need,
                        available,
                    });
                }
                // Shrink in proportion, with a margin for upper levels.
                span = (span / (need + 1)).max(1) * available.saturating_sub(2).max(1);
                span = (span / 512 * 512).max(512);
            }
            self.traverse(chunk, false)?;
            self.flush()?;
            self.end_round(chunk)?;
            prev = chunk;
        }
        let stats = self
            .pv
            .as_ref()
            .map(|(h, _, _)| h.stats())
            .unwrap_or_default();
        self.report.hypercalls = stats.hypercalls - self.stats_at_start.hypercalls;
        self.report.mmu_update_entries =
            stats.mmu_update_entries - self.stats_at_start.mmu_update_entries;
        Ok(())
    }

    fn end_round(&mut self, chunk: PfnRange) -> Result<(), BootError> {
        if !self.pool.ranges().is_empty() {
            // The dry run and the real traversal disagreed: never expected.
            return Err(BootError::CountMismatch(self.round));
        }
        if let Some(slot) = self.report.chunks.get_mut(self.round as usize) {
            *slot = chunk;
        }
        self.report.rounds = self.round + 1;
        self.report.pages_mapped += self.ram_in(chunk);
        Ok(())
    }

    /// Under PV: every frame of Xen's initial tree (walked, not assumed).
    fn collect_old_tables(&self) -> Result<RangeSet<MAX_TABLE_RANGES>, BootError> {
        let mut set = RangeSet::new();
        let Some((_, _, old_root)) = &self.pv else {
            return Ok(set);
        };
        let old_root = *old_root;
        set.insert(PfnRange::new(old_root.0, old_root.0 + 1))?;
        // Breadth-first over the L4, L3s and L2s, recording every child.
        let mut frames = [(Pfn(0), 0usize); MAX_UPPER_TABLES];
        let mut nf = 1;
        frames[0] = (old_root, 4);
        let mut k = 0;
        while k < nf {
            let (t, level) = frames[k];
            k += 1;
            if level == 1 {
                continue;
            }
            for i in 0..512 {
                if level == 4 && (256..272).contains(&i) {
                    continue; // Xen's own slots.
                }
                let e = self.read(t, i)?;
                if e & F::PRESENT.bits() == 0 || e & F::HUGE_PAGE.bits() != 0 {
                    continue;
                }
                let child = self.entry_pfn(e)?;
                set.insert(PfnRange::new(child.0, child.0 + 1))?;
                if level > 2 {
                    if nf == frames.len() {
                        return Err(BootError::TooManyRanges);
                    }
                    frames[nf] = (child, level - 1);
                    nf += 1;
                }
            }
        }
        Ok(set)
    }

    fn switch_to_new_root(
        &mut self,
        old_tables: &RangeSet<MAX_TABLE_RANGES>,
    ) -> Result<(), BootError> {
        let root = self.root();
        let round = self.round;
        if let Some(load) = self.load_root.as_mut() {
            load(root);
            self.switched = true;
            return Ok(());
        }
        let new_mfn = self.to_frame(root.0)?;
        let Some((_, _, old_root)) = &self.pv else {
            return Err(BootError::BadLayout);
        };
        let old_mfn = self.to_frame(old_root.0)?;
        let ops = [
            MmuExt::Pin {
                level: PinLevel::L4,
                mfn: new_mfn,
            }
            .encode(),
            MmuExt::NewBaseptr { mfn: new_mfn }.encode(),
            MmuExt::NewUserBaseptr { mfn: 0 }.encode(),
            MmuExt::Unpin { mfn: old_mfn }.encode(),
        ];
        let n = core::mem::take(&mut self.queued);
        let mut results = [Ok(0); 2];
        if let Some((hyp, _, _)) = self.pv.as_mut() {
            let calls = [Call::MmuUpdate(&self.queue[..n]), Call::MmuExtOp(&ops)];
            hyp.multicall(&calls, &mut results)
                .map_err(|error| BootError::Hypervisor {
                    round,
                    done: 0,
                    error,
                })?;
        }
        for r in results {
            r.map_err(|error| BootError::Hypervisor {
                round,
                done: 0,
                error,
            })?;
        }
        self.switched = true;
        // The initial tables are no longer typed: make them writable again
        // in the new tree and give them back.
        for r in old_tables.ranges() {
            for p in r.start.0..r.end.0 {
                self.set_new_tree_aliases(Pfn(p), true)?;
            }
            self.report.tables.remove(*r)?;
            self.report.freed.insert(*r)?;
        }
        self.flush()
    }
}

fn index(va: u64, level: usize) -> usize {
    ((va >> LEVEL_SHIFT[level]) & 511) as usize
}

const fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

#[cfg(any(test, feature = "model"))]
pub mod sim;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_pv;
