//! The Xen PV backend: every write to a live table is an `mmu_update`
//! request, queued and drained in large ordered batches.
//!
//! Invariant: requests reach Xen in exactly the order they were queued, in
//! as few hypercalls as the batch capacity allows; an extended operation
//! (pin, unpin, `NEW_BASEPTR`, TLB flush) is submitted after every queued
//! request, in the same `multicall` when requests are pending. A read of an
//! entry with a queued write returns the queued value. A frame becomes a
//! table only after it was zeroed while writable and every kernel alias of
//! it was made read-only by a request queued before the one that hooks it
//! (when the queue fills between the two they go in consecutive hypercalls,
//! still in order, with nothing in between);
//! a freed table's aliases become writable only after the request that
//! unhooked it. Entry rules (no PSE, no PWT/PCD/PAT without I/O
//! privilege, no GLOBAL, holes written as 0, USER read back is Xen's) live
//! in [`crate::entry`].
//!
//! Caching: a domain with I/O privilege (dom0: Xen's `l1_disallow_mask`
//! lets PAT/PCD/PWT through for a domain with I/O memory or port
//! capabilities) may change cache attributes when the kernel told the
//! backend the PAT Xen runs it with ([`XenPv::with_pat`], read with `rdmsr
//! IA32_PAT`): the leaves are written as any other, and the cache flush is
//! `MMUEXT_FLUSH_CACHE_GLOBAL` after the TLB flush in the same `mmuext_op`
//! batch (the flush every physical CPU runs: a vCPU may have run, and left
//! dirty lines of the frames, on any of them).

use core::ptr::NonNull;

use hypercall::abi::{mmu_update, mmuext_op};
use hypercall::{Call, MmuExt, MmuHypercalls, MmuUpdate};

use super::{Backend, BackendError, CacheEncoding, Caps, Kind, LargePages, TlbScope, INVLPG_LIMIT};
use crate::cpus::ActiveCpus;
use crate::entry::{
    pv_check, pv_normalize, pv_sanitize, Entry, FlagError, Flags, Level, TABLE_FLAGS,
};
use crate::phys::{FrameMap, FrameWords, PhysMem};
use crate::types::{Mfn, Pfn, ENTRIES, PAGE_SIZE};
use crate::walk::walk;

/// Largest batch (requests per `mmu_update` hypercall) a backend can hold.
pub const MAX_BATCH: usize = 1024;
/// Batch capacity unless configured otherwise.
pub const DEFAULT_BATCH: usize = 512;
/// Most kernel aliases one frame may have.
pub const MAX_ALIASES: usize = 4;

pub use crate::types::XEN_HOLE;

/// Where the kernel maps a frame (its direct map, a kmap slot, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alias {
    /// A virtual address mapped in the current root.
    Va(u64),
    /// An explicit L1 entry (for trees that are not current yet).
    Entry {
        /// The L1 table frame.
        table: Pfn,
        /// Index of the entry mapping the frame.
        index: usize,
    },
}

/// The kernel tells the PV backend where each frame is mapped, so a frame
/// can be made read-only everywhere before it becomes a table.
pub trait AliasMap {
    /// Writes the aliases of `pfn` into `out` and returns how many.
    fn aliases(&self, pfn: Pfn, out: &mut [Alias; MAX_ALIASES]) -> usize;
}

/// No frame has a kernel alias (host tests over the model, or a kernel that
/// maps no memory it uses for tables).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAliases;

impl AliasMap for NoAliases {
    fn aliases(&self, _pfn: Pfn, _out: &mut [Alias; MAX_ALIASES]) -> usize {
        0
    }
}

const EMPTY_REQ: mmu_update = mmu_update { ptr: 0, val: 0 };

/// Storage for the queued `mmu_update` requests: the backend's own array
/// (the default), or a caller's buffer (the bootstrap's larger batch).
pub trait RequestBuffer: AsRef<[mmu_update]> + AsMut<[mmu_update]> {}

impl<T: AsRef<[mmu_update]> + AsMut<[mmu_update]> + ?Sized> RequestBuffer for T {}

/// The backend's own request storage.
pub type OwnQueue = [mmu_update; MAX_BATCH];

/// The Xen PV backend.
pub struct XenPv<
    H: MmuHypercalls,
    M: PhysMem,
    F: FrameMap,
    A: AliasMap = NoAliases,
    Q: RequestBuffer = OwnQueue,
> {
    hv: H,
    mem: M,
    frames: F,
    aliases: A,
    queue: Q,
    len: usize,
    cap: usize,
    /// One bit per hash of the table mfns with queued writes.
    filter: u64,
    /// The root Xen walks now (aliases given as virtual addresses are
    /// resolved in it).
    root: Option<Mfn>,
    /// PWT/PCD/PAT allowed (the domain has I/O privileges).
    io_privileged: bool,
    /// The cache modes' leaf bits under the PAT Xen runs the guest with
    /// ([`XenPv::with_pat`]), if known.
    cache: Option<CacheEncoding>,
    /// Which vCPUs a TLB flush reaches.
    targets: FlushTargets,
}

/// Which vCPUs the PV backend's TLB flushes reach.
#[derive(Debug, Clone, Copy)]
pub enum FlushTargets {
    /// The calling vCPU only (`MMUEXT_*_LOCAL`): a tree live on one vCPU.
    Local,
    /// Every vCPU of the domain (`MMUEXT_*_ALL`).
    All,
    /// The vCPUs of a mask (`MMUEXT_*_MULTI`): those the tree is active on.
    /// Xen reads the mask when it runs the flush, after the updates queued
    /// before it in the same multicall (see [`crate::cpus`] for why that
    /// order keeps a vCPU switching in from missing the flush).
    Active(&'static ActiveCpus),
}

fn filter_bit(table_maddr: u64) -> u64 {
    let mfn = table_maddr >> 12;
    1u64 << ((mfn ^ (mfn >> 6) ^ (mfn >> 12)) & 63)
}

impl<H: MmuHypercalls, M: PhysMem, F: FrameMap, A: AliasMap> XenPv<H, M, F, A> {
    /// A backend issuing `hv`'s hypercalls, reaching frames through `mem`
    /// and translating through `frames`; `root` is the L4 Xen walks now
    /// (`start_info.pt_base`'s frame), if known.
    pub fn new(hv: H, mem: M, frames: F, aliases: A, root: Option<Mfn>) -> Self {
        XenPv::with_queue(hv, mem, frames, aliases, root, [EMPTY_REQ; MAX_BATCH])
            .with_batch_capacity(DEFAULT_BATCH)
    }
}

impl<H: MmuHypercalls, M: PhysMem, F: FrameMap, A: AliasMap, Q: RequestBuffer>
    XenPv<H, M, F, A, Q>
{
    /// As [`XenPv::new`], queueing into `queue` (batch capacity: its whole
    /// length). With an empty buffer every write fails (`EINVAL`).
    pub fn with_queue(hv: H, mem: M, frames: F, aliases: A, root: Option<Mfn>, queue: Q) -> Self {
        let cap = queue.as_ref().len();
        Self {
            hv,
            mem,
            frames,
            aliases,
            queue,
            len: 0,
            cap,
            filter: 0,
            root,
            io_privileged: false,
            cache: None,
            targets: FlushTargets::Local,
        }
    }

    /// Makes every TLB flush reach all of the domain's vCPUs (Xen sends the
    /// IPIs and returns when they are done): for a tree that other vCPUs
    /// may be running on. Off by default (one vCPU: local flushes).
    pub fn with_flush_all_vcpus(self, all: bool) -> Self {
        self.with_flush_targets(if all {
            FlushTargets::All
        } else {
            FlushTargets::Local
        })
    }

    /// Chooses which vCPUs TLB flushes reach (default
    /// [`FlushTargets::Local`]).
    pub fn with_flush_targets(mut self, targets: FlushTargets) -> Self {
        self.targets = targets;
        self
    }

    /// Which vCPUs TLB flushes reach.
    pub fn flush_targets(&self) -> FlushTargets {
        self.targets
    }

    /// Allows PWT/PCD/PAT in leaves: only for a domain with I/O privileges
    /// (dom0, or I/O memory or ports assigned), as Xen checks.
    pub fn with_io_privilege(mut self, io_privileged: bool) -> Self {
        self.io_privileged = io_privileged;
        self
    }

    /// The `IA32_PAT` value Xen runs the guest with (a PV guest reads it
    /// with `rdmsr`; Xen 4.17 answers `XEN_MSR_PAT`): with I/O privilege,
    /// caching changes are then possible ([`Backend::cache_encoding`]).
    /// A PAT lacking WB, WC or UC leaves them impossible.
    pub fn with_pat(mut self, pat: u64) -> Self {
        self.cache = CacheEncoding::from_pat(pat);
        self
    }

    /// [`XenPv::with_io_privilege`] and [`XenPv::with_pat`] in place: for
    /// a caller that cannot afford another copy of the backend (it holds
    /// its request queue) on its stack.
    pub fn set_caching(&mut self, io_privileged: bool, pat: u64) {
        self.io_privileged = io_privileged;
        self.cache = CacheEncoding::from_pat(pat);
    }

    /// Sets the batch capacity (clamped to `1..=` the buffer's length,
    /// [`MAX_BATCH`] for the backend's own).
    pub fn with_batch_capacity(mut self, cap: usize) -> Self {
        self.cap = cap.clamp(1, self.queue.as_ref().len().max(1));
        self
    }

    /// The batch capacity.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The hypercall implementation (counters, the model's queries).
    pub fn hypercalls(&self) -> &H {
        &self.hv
    }

    /// Mutable access to the hypercall implementation (tests reset counters).
    pub fn hypercalls_mut(&mut self) -> &mut H {
        &mut self.hv
    }

    /// The frame map.
    pub fn frames(&self) -> &F {
        &self.frames
    }

    /// The L4 Xen walks now, as far as this backend knows.
    pub fn current_root(&self) -> Option<Mfn> {
        self.root
    }

    /// Writes `val` into entry `index` of `table` after every queued
    /// request and invalidates `va` on this vCPU only, all in one
    /// submission (one `multicall`: the queued requests and this one as an
    /// `mmu_update`, then `MMUEXT_INVLPG_LOCAL`). For an entry the kernel
    /// owns outside the address space's bookkeeping (a kmap slot) that
    /// must take effect now without overtaking a write queued before it.
    pub fn send_entry_invlpg_local(
        &mut self,
        table: Pfn,
        index: usize,
        val: Entry,
        va: u64,
    ) -> Result<(), BackendError> {
        self.write(table, index, val)?;
        self.submit_ext(&[MmuExt::InvlpgLocal { va }])
    }

    fn table_maddr(&self, table: Pfn) -> Option<u64> {
        self.frames.to_mfn(table).map(Mfn::maddr)
    }

    fn memory_entry(&self, table: Pfn, index: usize) -> Entry {
        match self.mem.frame_ptr(table) {
            // SAFETY: `PhysMem` frames are valid for 4096-byte reads; the
            // index is masked into the frame.
            Some(p) => Entry(unsafe {
                p.as_ptr()
                    .cast::<u64>()
                    .add(index & (ENTRIES - 1))
                    .read_volatile()
            }),
            None => Entry::EMPTY,
        }
    }

    fn queued(&self, entry_maddr: u64) -> Option<u64> {
        if self.len == 0 || self.filter & filter_bit(entry_maddr) == 0 {
            return None;
        }
        self.queue.as_ref()[..self.len]
            .iter()
            .rev()
            .find(|r| r.ptr & !7 == entry_maddr)
            .map(|r| r.val)
    }

    fn push(&mut self, entry_maddr: u64, val: u64) -> Result<(), BackendError> {
        if self.len >= self.cap {
            self.drain()?;
        }
        let slot = self
            .queue
            .as_mut()
            .get_mut(self.len)
            .ok_or(BackendError::Hypervisor(hypercall::XenError::Inval))?;
        *slot = MmuUpdate::PtUpdate { entry_maddr, val }.encode();
        self.len += 1;
        self.filter |= filter_bit(entry_maddr);
        Ok(())
    }

    fn clear_queue(&mut self) {
        self.len = 0;
        self.filter = 0;
    }

    /// Finds the L1 entry that maps `va` in the current root.
    fn resolve_va(&self, va: u64) -> Result<Option<(Pfn, usize)>, BackendError> {
        let root = self.root.ok_or(BackendError::NoCurrentRoot)?;
        let Some(root) = self.frames.to_pfn(root) else {
            return Ok(None);
        };
        Ok(match walk(self, root, va, Level::L1) {
            Ok(found) if found.level == Level::L1 => Some((found.table, found.index)),
            _ => None,
        })
    }

    /// Queues `RW := writable` on every alias of `pfn`.
    fn set_aliases(&mut self, pfn: Pfn, writable: bool) -> Result<(), BackendError> {
        let mut out = [Alias::Va(0); MAX_ALIASES];
        let n = self.aliases.aliases(pfn, &mut out).min(MAX_ALIASES);
        for alias in &out[..n] {
            let place = match *alias {
                Alias::Va(va) => self.resolve_va(va)?,
                Alias::Entry { table, index } => Some((table, index & (ENTRIES - 1))),
            };
            let Some((table, index)) = place else {
                continue;
            };
            let e = self.read(table, index);
            if !e.is_present() || self.frames.to_mfn(pfn) != Some(e.mfn()) {
                continue;
            }
            let is_rw = e.flags().contains(Flags::WRITABLE);
            if is_rw != writable {
                let val = if writable {
                    e.0 | Flags::WRITABLE.bits()
                } else {
                    e.0 & !Flags::WRITABLE.bits()
                };
                self.write(table, index, Entry(val))?;
            }
        }
        Ok(())
    }

    /// Submits `ops` after every queued request, in one `multicall` when
    /// requests are pending.
    fn submit_ext(&mut self, ops: &[MmuExt]) -> Result<(), BackendError> {
        let mut encoded = [MmuExt::TlbFlushLocal.encode(); INVLPG_LIMIT as usize + 1];
        let n = ops.len().min(encoded.len());
        for (slot, op) in encoded.iter_mut().zip(&ops[..n]) {
            *slot = op.encode();
        }
        let ext: &[mmuext_op] = &encoded[..n];
        if self.len == 0 {
            return self
                .hv
                .mmuext_op(ext)
                .map_err(|e| BackendError::Hypervisor(e.error));
        }
        let len = self.len;
        self.clear_queue();
        let calls = [
            Call::MmuUpdate(&self.queue.as_ref()[..len]),
            Call::MmuExtOp(ext),
        ];
        let mut results = [Ok(0); 2];
        self.hv
            .multicall(&calls, &mut results)
            .map_err(BackendError::Hypervisor)?;
        if let Err(error) = results[0] {
            return Err(BackendError::Refused {
                error,
                entry_maddr: 0,
                val: 0,
            });
        }
        results[1].map(|_| ()).map_err(BackendError::Hypervisor)
    }

    fn mfn_of(&self, pfn: Pfn) -> Result<u64, BackendError> {
        self.frames
            .to_mfn(pfn)
            .map(|m| m.0)
            .ok_or(BackendError::BadFrame(pfn))
    }
}

impl<H: MmuHypercalls, M: PhysMem, F: FrameMap, A: AliasMap, Q: RequestBuffer> Backend
    for XenPv<H, M, F, A, Q>
{
    fn kind(&self) -> Kind {
        Kind::XenPv
    }
    fn caps(&self) -> Caps {
        Caps::XEN_PV
    }
    fn large_pages(&self) -> LargePages {
        LargePages::None
    }
    fn reserved(&self) -> Option<(u64, u64)> {
        Some(XEN_HOLE)
    }
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn> {
        self.frames.to_mfn(pfn)
    }
    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn> {
        self.frames.to_pfn(mfn)
    }
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        self.mem.frame_ptr(pfn)
    }

    fn leaf_entry(&self, level: Level, pfn: Pfn, flags: Flags) -> Result<Entry, BackendError> {
        if level != Level::L1 {
            return Err(BackendError::Flags(FlagError::LargePage));
        }
        let flags = pv_check(flags, self.io_privileged).map_err(BackendError::Flags)?;
        let mfn = self.frames.to_mfn(pfn).ok_or(BackendError::BadFrame(pfn))?;
        Ok(Entry::new(mfn, flags))
    }

    fn table_entry(&self, pfn: Pfn) -> Result<Entry, BackendError> {
        let mfn = self.frames.to_mfn(pfn).ok_or(BackendError::BadFrame(pfn))?;
        Ok(Entry::new(mfn, TABLE_FLAGS))
    }

    fn normalize(&self, flags: Flags) -> Flags {
        pv_normalize(flags)
    }

    fn read(&self, table: Pfn, index: usize) -> Entry {
        let index = index & (ENTRIES - 1);
        if self.len != 0 {
            if let Some(maddr) = self.table_maddr(table) {
                if let Some(val) = self.queued(maddr + index as u64 * 8) {
                    return Entry(val);
                }
            }
        }
        self.memory_entry(table, index)
    }

    fn read_table(&self, table: Pfn, out: &mut [u64; ENTRIES]) {
        match self.mem.frame_ptr(table) {
            // SAFETY: valid for reads per `PhysMem`; `out` is caller-owned.
            Some(p) => *out = unsafe { p.as_ptr().read_volatile() },
            None => *out = [0; ENTRIES],
        }
        if self.len == 0 {
            return;
        }
        let Some(base) = self.table_maddr(table) else {
            return;
        };
        if self.filter & filter_bit(base) == 0 {
            return;
        }
        for r in &self.queue.as_ref()[..self.len] {
            let addr = r.ptr & !7;
            if addr & !(PAGE_SIZE - 1) == base {
                out[((addr & (PAGE_SIZE - 1)) / 8) as usize] = r.val;
            }
        }
    }

    fn scan_table(&self, table: Pfn, f: &mut dyn FnMut(usize, Entry)) {
        let Some(p) = self.mem.frame_ptr(table) else {
            return;
        };
        let words = p.as_ptr().cast::<u64>();
        let queued_base = self
            .table_maddr(table)
            .filter(|&m| self.len != 0 && self.filter & filter_bit(m) != 0);
        for i in 0..ENTRIES {
            let queued = queued_base.and_then(|m| self.queued(m + i as u64 * 8));
            // SAFETY: valid for 4096-byte reads per `PhysMem`; i < 512.
            let val = queued.unwrap_or_else(|| unsafe { words.add(i).read_volatile() });
            f(i, Entry(val));
        }
    }

    fn write(&mut self, table: Pfn, index: usize, val: Entry) -> Result<(), BackendError> {
        let base = self.mfn_of(table)? << 12;
        // PV rules: a hole is written as all-zero, no PS / caching
        // attributes, GLOBAL left to Xen.
        let val = pv_sanitize(val, self.io_privileged).map_err(BackendError::Flags)?;
        self.push(base + (index & (ENTRIES - 1)) as u64 * 8, val.0)
    }

    fn pending(&self) -> usize {
        self.len
    }

    fn drain(&mut self) -> Result<(), BackendError> {
        if self.len == 0 {
            return Ok(());
        }
        let len = self.len;
        self.clear_queue();
        let queue = &self.queue.as_ref()[..len];
        self.hv.mmu_update(queue).map_err(|e| {
            let failed = queue[e.done.min(len - 1)];
            BackendError::Refused {
                error: e.error,
                entry_maddr: failed.ptr & !7,
                val: failed.val,
            }
        })
    }

    fn new_table(&mut self, pfn: Pfn) -> Result<(), BackendError> {
        let p = self.mem.frame_ptr(pfn).ok_or(BackendError::BadFrame(pfn))?;
        self.mfn_of(pfn)?;
        // SAFETY: the caller hands us a frame that is not a table yet, so
        // every mapping of it is still writable; valid per `PhysMem`.
        unsafe { p.as_ptr().write_bytes(0, 1) };
        Ok(())
    }

    fn seal_table(&mut self, pfn: Pfn) -> Result<(), BackendError> {
        self.set_aliases(pfn, false)
    }

    fn release_table(&mut self, pfn: Pfn) -> Result<(), BackendError> {
        self.set_aliases(pfn, true)
    }

    fn pin(&mut self, level: Level, pfn: Pfn) -> Result<(), BackendError> {
        let mfn = self.mfn_of(pfn)?;
        self.submit_ext(&[MmuExt::Pin {
            level: level.pin_level(),
            mfn,
        }])
    }

    fn unpin(&mut self, pfn: Pfn) -> Result<(), BackendError> {
        let mfn = self.mfn_of(pfn)?;
        self.submit_ext(&[MmuExt::Unpin { mfn }])
    }

    unsafe fn switch_root(&mut self, root: Pfn) -> Result<(), BackendError> {
        let mfn = self.mfn_of(root)?;
        self.submit_ext(&[MmuExt::NewBaseptr { mfn }])?;
        self.root = Some(Mfn(mfn));
        Ok(())
    }

    unsafe fn replace_root(&mut self, root: Pfn, old: Option<Pfn>) -> Result<(), BackendError> {
        let mfn = self.mfn_of(root)?;
        let ops = [
            MmuExt::Pin {
                level: Level::L4.pin_level(),
                mfn,
            },
            MmuExt::NewBaseptr { mfn },
            MmuExt::NewUserBaseptr { mfn: 0 },
            MmuExt::Unpin {
                mfn: match old {
                    Some(old) => self.mfn_of(old)?,
                    None => 0,
                },
            },
        ];
        let n = if old.is_some() { 4 } else { 3 };
        self.submit_ext(&ops[..n])?;
        self.root = Some(Mfn(mfn));
        Ok(())
    }

    fn flush_tlb(&mut self, scope: TlbScope) -> Result<(), BackendError> {
        let mut ops = [MmuExt::TlbFlushLocal; INVLPG_LIMIT as usize + 1];
        let n = self.tlb_ops(scope, &mut ops);
        if n == 0 {
            return self.drain();
        }
        self.submit_ext(&ops[..n])
    }

    fn flushes_caches(&self) -> bool {
        self.cache_encoding().is_some()
    }

    fn cache_encoding(&self) -> Option<CacheEncoding> {
        self.cache.filter(|_| self.io_privileged)
    }

    fn flush_cache(&mut self, scope: TlbScope) -> Result<(), BackendError> {
        // Xen has no range flush: every scope is the global one.
        let _ = scope;
        if !self.flushes_caches() {
            return Err(BackendError::Flags(FlagError::CacheAttributes));
        }
        self.submit_ext(&[MmuExt::FlushCacheGlobal])
    }

    fn flush_tlb_and_cache(&mut self, tlb: TlbScope, cache: TlbScope) -> Result<(), BackendError> {
        let _ = cache;
        if !self.flushes_caches() {
            return Err(BackendError::Flags(FlagError::CacheAttributes));
        }
        let mut ops = [MmuExt::TlbFlushLocal; INVLPG_LIMIT as usize + 1];
        let n = self.tlb_ops(tlb, &mut ops);
        ops[n] = MmuExt::FlushCacheGlobal;
        self.submit_ext(&ops[..=n])
    }
}

impl<H: MmuHypercalls, M: PhysMem, F: FrameMap, A: AliasMap, Q: RequestBuffer>
    XenPv<H, M, F, A, Q>
{
    /// The flush operations of `scope` for this backend's targets, into
    /// `ops`: one per page up to [`INVLPG_LIMIT`], else one full flush.
    /// Returns how many (0 for an empty range).
    fn tlb_ops(&self, scope: TlbScope, ops: &mut [MmuExt; INVLPG_LIMIT as usize + 1]) -> usize {
        let targets = self.targets;
        let full = match targets {
            FlushTargets::Local => MmuExt::TlbFlushLocal,
            FlushTargets::All => MmuExt::TlbFlushAll,
            FlushTargets::Active(cpus) => MmuExt::TlbFlushMulti {
                mask: cpus.as_ptr(),
            },
        };
        match scope {
            TlbScope::Range { start, pages } if pages <= INVLPG_LIMIT => {
                for (i, op) in ops.iter_mut().enumerate().take(pages as usize) {
                    let va = start.wrapping_add(i as u64 * PAGE_SIZE);
                    *op = match targets {
                        FlushTargets::Local => MmuExt::InvlpgLocal { va },
                        FlushTargets::All => MmuExt::InvlpgAll { va },
                        FlushTargets::Active(cpus) => MmuExt::InvlpgMulti {
                            va,
                            mask: cpus.as_ptr(),
                        },
                    };
                }
                pages as usize
            }
            _ => {
                ops[0] = full;
                1
            }
        }
    }
}

/// Why a [`hypercall::XenError`] from a refused request is worth naming: used by the
/// address space to tell "mapped a page table writable" from other refusals.
pub fn refused_writable(val: u64) -> bool {
    let e = Entry(val);
    e.is_present() && e.flags().contains(Flags::WRITABLE)
}
