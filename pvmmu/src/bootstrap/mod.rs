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

use core::cell::Cell;
use core::ptr::NonNull;

use hypercall::abi::mmu_update;
use hypercall::{MmuHypercalls, XenError};

pub use ranges::{PfnRange, RangeSet, RangeSetFull};

use crate::backend::xen::{Alias, AliasMap, MAX_ALIASES};
use crate::backend::{Backend, BackendError, LargePages, Native, Tlb, XenPv};
use crate::entry::{Entry, Flags, Level};
use crate::phys::{FrameMap, FrameWords, PhysMem};
use crate::types::{Pfn, ENTRIES, PAGE_SIZE, XEN_HOLE};
use crate::walk::{self, Step};

/// Capacity of the range sets that track page-table frames.
pub const MAX_TABLE_RANGES: usize = 64;
/// Most L4/L3/L2 tables the initial tree may have (it maps a few MiB).
pub const MAX_UPPER_TABLES: usize = 64;
/// Most rounds a bootstrap may take (far more than any real memory size needs).
pub const MAX_ROUNDS: usize = 16;
/// How much larger a chunk may be than the chunk before it (Linux keeps the
/// same x256 slack: a chunk could host the 4 KiB tables of one 512x larger).
pub const GROWTH: u64 = 256;

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
    /// Xen refused a hypercall made outside the backend (the simulated
    /// start of day).
    Hypervisor {
        /// Round in which it happened.
        round: u32,
        /// Requests of the failing call applied before the failure.
        done: usize,
        /// Xen's error.
        error: XenError,
    },
    /// The backend refused a write, a pin, the root switch or a flag (under
    /// PV: Xen refused a request).
    Backend {
        /// Round in which it happened.
        round: u32,
        /// The backend's error.
        error: BackendError,
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

/// 4 KiB pages one L3 entry (1 GiB) covers.
const GIB_PAGES: u64 = Level::L3.entry_span() / PAGE_SIZE;
/// 4 KiB pages one L1 table (2 MiB) covers: chunks are multiples of it.
const L1_PAGES: u64 = ENTRIES as u64;

/// A page table the traversal is inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    /// Already hooked into the live tree: writes go through the backend.
    Live(Pfn),
    /// Created this round, not yet hooked: private, filled with plain
    /// stores.
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

/// The bootstrap's view of memory: `boot` (the entry environment's
/// mapping) until the new root is live, `direct` (the new direct map)
/// from then on. The pointer for a frame changes once, at the switch; no
/// pointer is kept across it (the backend asks for every access).
struct Phase<'a> {
    boot: &'a dyn PhysMem,
    direct: &'a dyn PhysMem,
    switched: Cell<bool>,
}

// SAFETY: forwards to `boot` or `direct`, both `PhysMem`s valid for as long
// as the view lives. The pointer of a frame is stable within each phase;
// the bootstrap, the only user, holds none across the switch.
unsafe impl PhysMem for Phase<'_> {
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        if self.switched.get() {
            self.direct.frame_ptr(pfn)
        } else {
            self.boot.frame_ptr(pfn)
        }
    }
}

/// Where a frame of the bootstrap's trees is mapped writable: before the
/// switch at `entry_alias_base` in the entry tree (frames of the first
/// chunk), after it in the new tree's direct map and `Data` regions (text
/// and rodata aliases are read-only already, and stay so when a table is
/// given back).
struct BootAliases<'a> {
    layout: &'a Layout<'a>,
    phase: &'a Phase<'a>,
}

impl AliasMap for BootAliases<'_> {
    fn aliases(&self, pfn: Pfn, out: &mut [Alias; MAX_ALIASES]) -> usize {
        let l = self.layout;
        if !self.phase.switched.get() {
            if !l.first_chunk.contains(pfn) {
                return 0;
            }
            out[0] = Alias::Va(l.entry_alias_base + pfn.0 * PAGE_SIZE);
            return 1;
        }
        out[0] = Alias::Va(l.direct_map_base + pfn.0 * PAGE_SIZE);
        let mut n = 1;
        for r in l.regions {
            if n < MAX_ALIASES && r.access == Access::Data && r.pfns.contains(pfn) {
                out[n] = Alias::Va(r.va + (pfn.0 - r.pfns.start.0) * PAGE_SIZE);
                n += 1;
            }
        }
        n
    }
}

/// The native root switch: the caller's `load_root` (CR3). The bootstrap
/// only adds mappings, so it never asks for a TLB flush.
struct LoadRoot<'a>(&'a mut dyn FnMut(Pfn));

impl Tlb for LoadRoot<'_> {
    fn flush_page(&mut self, _va: u64) {}
    fn flush_all(&mut self) {}
    unsafe fn load_root(&mut self, root: Pfn) {
        (self.0)(root)
    }
    // The bootstrap changes no caching attribute.
    fn flush_cache_range(&mut self, _va: u64, _pages: u64) {}
    fn flush_cache_all(&mut self) {}
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
    check_layout(layout)?;
    let phase = Phase {
        boot: boot_mem,
        direct: direct_mem,
        switched: Cell::new(false),
    };
    match platform {
        Platform::XenPv { hyp, p2m, old_root } => {
            if scratch.len() < 64 {
                return Err(BootError::BadLayout);
            }
            let at_start = hyp.stats();
            let old_mfn = p2m
                .to_mfn(old_root)
                .ok_or(BootError::NoMachineFrame(old_root.0))?;
            let aliases = BootAliases {
                layout,
                phase: &phase,
            };
            let backend = XenPv::with_queue(hyp, &phase, p2m, aliases, Some(old_mfn), scratch);
            let mut b = Boot::new(layout, backend, &phase, Some(old_root));
            b.run()?;
            let stats = b.backend.hypercalls().stats();
            b.report.hypercalls = stats.hypercalls - at_start.hypercalls;
            b.report.mmu_update_entries = stats.mmu_update_entries - at_start.mmu_update_entries;
            Ok(b.report)
        }
        Platform::Native { load_root } => {
            let large = match layout.page_sizes {
                PageSizes::Only4K => LargePages::None,
                PageSizes::Up2M => LargePages::Size2MiB,
                PageSizes::Up1G => LargePages::Size1GiB,
            };
            let backend = Native::with_tlb(&phase, LoadRoot(load_root)).with_large_pages(large);
            let mut b = Boot::new(layout, backend, &phase, None);
            b.run()?;
            Ok(b.report)
        }
    }
}

fn check_layout(layout: &Layout<'_>) -> Result<(), BootError> {
    let base = layout.direct_map_base;
    let ram_end = layout.ram.iter().map(|r| r.end.0).max().unwrap_or(0);
    let dm_end = base
        .checked_add(ram_end * PAGE_SIZE)
        .ok_or(BootError::BadLayout)?;
    let overlaps_hole = |s: u64, e: u64| s < XEN_HOLE.1 && e > XEN_HOLE.0;
    if base % Level::L3.entry_span() != 0 || overlaps_hole(base, dm_end) {
        return Err(BootError::BadLayout);
    }
    let mut prev_end = 0u64;
    for r in layout.regions {
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

/// The index of a level's slot in the traversal path.
const fn at(level: Level) -> usize {
    level.number() as usize
}

struct Boot<'a, B: Backend> {
    layout: &'a Layout<'a>,
    backend: B,
    phase: &'a Phase<'a>,
    /// The entry environment's root, replaced in round 0 (PV).
    old_root: Option<Pfn>,
    round: u32,
    /// Frames reserved for this round's tables, handed out top-down.
    pool: RangeSet<MAX_TABLE_RANGES>,
    dry_count: u64,
    dry: bool,
    /// The table the traversal is in at each level (index: level number).
    path: [Option<PathSlot>; 5],
    report: BootReport,
}

impl<'a, B: Backend> Boot<'a, B> {
    fn new(
        layout: &'a Layout<'a>,
        backend: B,
        phase: &'a Phase<'a>,
        old_root: Option<Pfn>,
    ) -> Self {
        Self {
            layout,
            backend,
            phase,
            old_root,
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
        }
    }

    fn switched(&self) -> bool {
        self.phase.switched.get()
    }

    fn root(&self) -> Pfn {
        self.report.root
    }

    /// A backend error as the bootstrap reports it.
    fn fail(&self, e: BackendError) -> BootError {
        match e {
            BackendError::BadFrame(p) if self.backend.frame_ptr(p).is_none() => {
                BootError::Unreachable(p)
            }
            BackendError::BadFrame(p) => BootError::NoMachineFrame(p.0),
            error => BootError::Backend {
                round: self.round,
                error,
            },
        }
    }

    /// The frame of a table the bootstrap must reach.
    fn frame(&self, pfn: Pfn) -> Result<*mut FrameWords, BootError> {
        self.backend
            .frame_ptr(pfn)
            .map(|p| p.as_ptr())
            .ok_or(BootError::Unreachable(pfn))
    }

    /// Entry `index` of `table` (with queued writes); the frame must be
    /// reachable.
    fn read(&self, table: Pfn, index: usize) -> Result<Entry, BootError> {
        self.frame(table)?;
        Ok(self.backend.read(table, index))
    }

    /// The table an entry points to.
    fn child(&self, e: Entry) -> Result<Pfn, BootError> {
        self.backend
            .to_pfn(e.mfn())
            .ok_or(BootError::NoMachineFrame(e.mfn().0))
    }

    /// Plain store into a private (fresh) table.
    fn store(&self, table: Pfn, index: usize, val: Entry) -> Result<(), BootError> {
        let p = self.frame(table)?;
        // SAFETY: only fresh tables of this round are stored into: reserved
        // for it, reachable, not yet sealed, so writable per `PhysMem`;
        // `index & 511` stays inside the frame.
        unsafe { core::ptr::write_volatile(&mut (*p)[index & (ENTRIES - 1)], val.0) };
        Ok(())
    }

    fn write(&mut self, table: Table, index: usize, val: Entry) -> Result<(), BootError> {
        match table {
            Table::Dry => Ok(()),
            Table::Fresh(pfn) => self.store(pfn, index, val),
            Table::Live(pfn) => self
                .backend
                .write(pfn, index, val)
                .map_err(|e| self.fail(e)),
        }
    }

    fn drain(&mut self) -> Result<(), BootError> {
        self.backend.drain().map_err(|e| self.fail(e))
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
        self.frame(top)?;
        self.backend.new_table(top).map_err(|e| self.fail(e))?;
        self.report.tables_created += 1;
        Ok(Table::Fresh(top))
    }

    /// Finishes a fresh table: sealed (PV: read-only in every live
    /// mapping), then hooked into `parent[index]`. Post-order: nothing
    /// stores into `child` afterwards.
    fn complete(&mut self, child: Table, parent: Table, index: usize) -> Result<(), BootError> {
        let Table::Fresh(pfn) = child else {
            return Ok(());
        };
        self.backend.seal_table(pfn).map_err(|e| self.fail(e))?;
        let entry = self.backend.table_entry(pfn).map_err(|e| self.fail(e))?;
        self.write(parent, index, entry)
    }

    /// A fresh table holding a copy of live table `live`'s entries.
    fn copy_table(&mut self, live: Pfn) -> Result<Table, BootError> {
        let copy = self.new_table()?;
        if let Table::Fresh(new) = copy {
            self.frame(live)?;
            let p = self.frame(new)?;
            self.backend.scan_table(live, &mut |i, e| {
                if !e.is_empty() {
                    // SAFETY: `new` is this round's fresh table (private,
                    // writable); `i < 512`.
                    unsafe { core::ptr::write_volatile(&mut (*p)[i], e.0) };
                }
            });
            self.report.tables_replaced += 1;
        }
        Ok(copy)
    }

    /// Queued after the hook of its replacement: the old table is no longer
    /// referenced, so Xen drops its type; its aliases become writable and it
    /// stops counting as a table (the frame is free for the caller again).
    fn retire(&mut self, old: Pfn) -> Result<(), BootError> {
        self.backend.release_table(old).map_err(|e| self.fail(e))?;
        self.report.tables.remove(PfnRange::new(old.0, old.0 + 1))?;
        Ok(())
    }

    // ---- traversal --------------------------------------------------------

    /// Completes (post-order) every path slot at or below `level`.
    fn close_path(&mut self, level: Level) -> Result<(), BootError> {
        for lv in [Level::L1, Level::L2, Level::L3] {
            if lv > level {
                break;
            }
            if let Some(slot) = self.path[at(lv)].take() {
                let parent = match self.path[at(lv) + 1] {
                    Some(s) => s.table,
                    None => self.root_table(),
                };
                let upper = lv.upper().unwrap_or(Level::L4);
                self.complete(slot.table, parent, upper.index(slot.block))?;
                if let (Some(old), false) = (slot.replaces, self.dry) {
                    self.retire(old)?;
                }
            }
        }
        Ok(())
    }

    /// The table at `level` (L1..L3) covering `va`, creating it if needed.
    fn table_at(&mut self, level: Level, va: u64) -> Result<Table, BootError> {
        let upper = level.upper().unwrap_or(Level::L4);
        let block = va & !(upper.entry_span() - 1);
        if let Some(slot) = self.path[at(level)] {
            if slot.block == block {
                return Ok(slot.table);
            }
        }
        // Leaving the previous block at this level: complete it and below.
        self.close_path(level)?;
        let parent = if upper == Level::L4 {
            self.root_table()
        } else {
            self.table_at(upper, va)?
        };
        let pi = upper.index(va);
        let mut replaces = None;
        let child = match parent {
            Table::Dry => self.new_table()?,
            Table::Live(p) | Table::Fresh(p) => {
                let e = self.read(p, pi)?;
                if e.is_present() {
                    if e.is_leaf(upper) {
                        return Err(BootError::AlreadyMapped(va));
                    }
                    let child = self.child(e)?;
                    let batches = self.backend.caps().batches;
                    if level == Level::L2 && batches && matches!(parent, Table::Live(_)) {
                        // A live L2 about to receive this round's L1s:
                        // replace it by a fresh copy hooked with one entry,
                        // instead of one queued request per new L1.
                        replaces = Some(child);
                        self.copy_table(child)?
                    } else {
                        // A present entry names a table already in the tree
                        // (a copied L2's entries point at live L1s); a table
                        // created this round is never revisited, because the
                        // traversal is monotonic in va. Writes to it go
                        // through the backend, never by store.
                        Table::Live(child)
                    }
                } else {
                    self.new_table()?
                }
            }
        };
        self.path[at(level)] = Some(PathSlot {
            block,
            table: child,
            replaces,
        });
        Ok(child)
    }

    fn root_table(&self) -> Table {
        if self.dry && !self.switched() && self.round == 0 {
            Table::Dry
        } else if self.switched() {
            Table::Live(self.root())
        } else {
            Table::Fresh(self.root())
        }
    }

    fn leaf_flags(access: Access) -> Flags {
        let base = Flags::PRESENT | Flags::ACCESSED;
        match access {
            Access::Text => base,
            Access::ReadOnly => base | Flags::NO_EXECUTE,
            Access::Data => base | Flags::WRITABLE | Flags::DIRTY | Flags::NO_EXECUTE,
        }
    }

    /// The largest leaf level for `pages` frames from `pfn` at `va`.
    fn leaf_level(&self, seg: &Segment, va: u64, pfn: u64, left: u64) -> Level {
        if !seg.direct {
            return Level::L1;
        }
        let max = match self.backend.large_pages() {
            LargePages::None => return Level::L1,
            LargePages::Size2MiB => Level::L2,
            LargePages::Size1GiB => Level::L3,
        };
        for level in [Level::L3, Level::L2] {
            let pages = level.entry_span() / PAGE_SIZE;
            let fits = va % level.entry_span() == 0 && pfn % pages == 0 && left >= pages;
            if level <= max && fits {
                return level;
            }
        }
        Level::L1
    }

    /// Maps one segment (monotonic in va with respect to earlier segments).
    fn map_segment(&mut self, seg: Segment) -> Result<(), BootError> {
        let mut done = 0;
        let mut run = [0u64; ENTRIES];
        while done < seg.pages {
            let va = seg.va + done * PAGE_SIZE;
            let pfn = seg.pfn + done;
            let level = self.leaf_level(&seg, va, pfn, seg.pages - done);
            let table = self.table_at(level, va)?;
            let pages_per_entry = level.entry_span() / PAGE_SIZE;
            let first = level.index(va);
            // One run: the rest of this table (one entry for a large page,
            // whose size is re-evaluated for the next block).
            let fit = ((seg.pages - done) / pages_per_entry) as usize;
            let n = if level == Level::L1 {
                fit.min(ENTRIES - first)
            } else {
                fit.min(1)
            };
            if n == 0 {
                break;
            }
            if !self.dry {
                self.map_run(table, level, first, &seg, done, &mut run[..n])?;
            }
            done += n as u64 * pages_per_entry;
        }
        Ok(())
    }

    /// Writes the leaves of one run: the flags checked once by the backend,
    /// table frames read-only where tables must be.
    fn map_run(
        &mut self,
        table: Table,
        level: Level,
        first: usize,
        seg: &Segment,
        done: u64,
        run: &mut [u64],
    ) -> Result<(), BootError> {
        let step = level.entry_span() / PAGE_SIZE;
        let pfn0 = seg.pfn + done;
        self.backend
            .fill_leaves(level, Pfn(pfn0), step, Self::leaf_flags(seg.access), run)
            .map_err(|e| self.fail(e))?;
        // Every slot of the run must be free: a fresh table is private (no
        // queued write can name it), so its words are read directly.
        let taken = match table {
            Table::Dry => None,
            Table::Fresh(t) => {
                let p = self.frame(t)?;
                // SAFETY: this round's fresh table, reachable per `PhysMem`
                // and private to the bootstrap; `first + run.len() <= 512`.
                let words = unsafe { &(&*p)[first..first + run.len()] };
                words.iter().position(|&w| Entry(w).is_present())
            }
            Table::Live(t) => {
                self.frame(t)?;
                (0..run.len()).find(|&k| self.backend.read(t, first + k).is_present())
            }
        };
        if let Some(k) = taken {
            return Err(BootError::AlreadyMapped(
                seg.va + (done + k as u64 * step) * PAGE_SIZE,
            ));
        }
        let ro_tables = self.backend.caps().read_only_tables;
        for (k, raw) in run.iter().enumerate() {
            let i = first + k;
            let mut e = Entry(*raw);
            if ro_tables && self.report.tables.contains(Pfn(pfn0 + k as u64 * step)) {
                e = Entry(e.0 & !Flags::WRITABLE.bits());
            }
            self.write(table, i, e)?;
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
        self.close_path(Level::L3)
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

    fn run(&mut self) -> Result<(), BootError> {
        let old_tables = self.collect_old_tables()?;
        for r in old_tables.ranges() {
            self.report.tables.insert(*r)?;
        }
        // Round 0: new root + chunk 0 + regions, tables from the top of the
        // boot-mapped memory.
        let first = self.layout.first_chunk;
        let chunk0 = PfnRange::new(
            0,
            align_up(first.end.0, L1_PAGES).min(align_up(self.ram_end(), L1_PAGES)),
        );
        let needed = self.tables_needed(chunk0, true)? + 1;
        self.reserve(first, needed)?;
        self.report.root = match self.new_table()? {
            Table::Fresh(p) => p,
            _ => return Err(BootError::BadLayout),
        };
        self.traverse(chunk0, true)?;
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
            let remaining = align_up(self.ram_end(), L1_PAGES) - prev.end.0;
            let mut span = (prev.len().max(L1_PAGES) * GROWTH).min(remaining);
            let mut chunk;
            loop {
                span = align_up(span, L1_PAGES).min(remaining);
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
                if span <= L1_PAGES {
                    return Err(BootError::OutOfFrames {
                        round: self.round,
                        needed: need,
                        available,
                    });
                }
                // Shrink in proportion, with a margin for upper levels.
                span = (span / (need + 1)).max(1) * available.saturating_sub(2).max(1);
                span = (span / L1_PAGES * L1_PAGES).max(L1_PAGES);
            }
            self.traverse(chunk, false)?;
            self.drain()?;
            self.end_round(chunk)?;
            prev = chunk;
        }
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

    /// Every frame of the entry environment's tree (PV: Xen's initial
    /// tables, walked, not assumed; Xen's own slots skipped).
    fn collect_old_tables(&self) -> Result<RangeSet<MAX_TABLE_RANGES>, BootError> {
        let mut set = RangeSet::new();
        let Some(old_root) = self.old_root else {
            return Ok(set);
        };
        self.frame(old_root)?;
        let mut failed = None;
        walk::for_each(&self.backend, old_root, &mut |step| {
            let r = match step {
                Step::Table { table, .. } => match self.frame(table) {
                    Ok(_) => set
                        .insert(PfnRange::new(table.0, table.0 + 1))
                        .map_err(BootError::from),
                    Err(e) => Err(e),
                },
                Step::Entry {
                    level,
                    entry,
                    child,
                    ..
                } => match child {
                    None if !entry.is_leaf(level) => Err(BootError::NoMachineFrame(entry.mfn().0)),
                    _ => Ok(()),
                },
            };
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
            failed.is_none()
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(set),
        }
    }

    /// Seals the new root, then replaces the entry tree's root by it (PV:
    /// one multicall with the queued requests: pin, switch, unpin), then
    /// gives back the retired initial tables (writable again in the new
    /// tree, in one more batch).
    fn switch_to_new_root(
        &mut self,
        old_tables: &RangeSet<MAX_TABLE_RANGES>,
    ) -> Result<(), BootError> {
        let root = self.root();
        self.backend.seal_table(root).map_err(|e| self.fail(e))?;
        // SAFETY: the new tree maps the regions (the kernel image, under PV
        // Xen's whole boot region) at the same addresses as the entry tree,
        // and the direct map; nothing after this uses the entry tree.
        unsafe { self.backend.replace_root(root, self.old_root) }.map_err(|e| self.fail(e))?;
        self.phase.switched.set(true);
        // The initial tables are no longer typed: make them writable again
        // in the new tree and give them back.
        for r in old_tables.ranges() {
            for p in r.start.0..r.end.0 {
                self.backend
                    .release_table(Pfn(p))
                    .map_err(|e| self.fail(e))?;
            }
            self.report.tables.remove(*r)?;
            self.report.freed.insert(*r)?;
        }
        self.drain()
    }
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
