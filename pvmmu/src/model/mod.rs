//! A software model of what Xen 4.17 enforces on a 64-bit PV guest's page
//! tables, so that pvmmu's PV backend runs on the host against the same rules
//! (and the same error numbers) as under the real hypervisor.
//!
//! Invariant: every guest frame with a page-table type and a non-zero type
//! count has a validated shadow copy, and the model's type and reference
//! counts are exactly those the shadow copies (plus pins and the current
//! roots) imply, as Xen's would be. The model never trusts the guest-visible
//! memory of a live table: it reads old entries from the shadow, so a direct
//! store into a live table (which real Xen makes impossible) cannot corrupt
//! the counts; [`XenModel::check_integrity`] reports such a store instead.
//!
//! What is modelled (see `docs/xen-pv-rules.md` for the rules and the
//! functions of Xen's `xen/arch/x86/mm.c` they come from):
//! * machine frames with an owner (the guest, Xen, another domain, free RAM,
//!   I/O, or no RAM at all), a type (none, writable, L1..L4), a type count,
//!   a validated bit and a pinned bit, and per-table linear-mapping counts;
//! * a non-identity p2m (a bijective scramble of the guest's pfns onto a
//!   machine range far above them), and the M2P with `MMU_MACHPHYS_UPDATE`;
//! * frame contents allocated on first touch (memory proportional to the
//!   frames touched, never to the guest's size).
//!
//! Not modelled: grant mappings, shadow/translated paging, 32-bit PV,
//! preemption (a model call never returns `ERESTART`), the L1TF checks on
//! non-present entries (off for dom0, and pvmmu writes non-present entries as
//! zero), `MMUEXT_SET_LDT`, `CLEAR_PAGE`, `COPY_PAGE` (the model answers
//! `ENOSYS` to those), `update_va_mapping` with a vCPU mask pointer
//! (`EFAULT`), global pages.
//!
//! TLBs are modelled per vCPU (`tlb.rs`): each simulated vCPU keeps the
//! translations it read through until a flush covering it, so a missing or
//! too-narrow flush is visible on the host.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use core::cell::RefCell;
use core::ptr::NonNull;

use hypercall::HypercallStats;

use crate::phys::{FrameMap, FrameWords, PhysMem};
use crate::types::{Mfn, Pfn, ENTRIES};

mod boot;
mod env;
mod hypercalls;
mod rules;
mod shared;
#[cfg(test)]
mod tests;
mod tlb;

pub use boot::StartOfDay;
pub use env::{ModelNegativeEnv, MODEL_VIRT_BASE, MODEL_WINDOW_VA};
pub use hypercalls::is_guest_l4_slot;
pub use shared::SharedModel;
pub use tlb::MODEL_MAX_VCPUS;

/// Entry bit: present.
pub const PAGE_PRESENT: u64 = 1 << 0;
/// Entry bit: writable.
pub const PAGE_RW: u64 = 1 << 1;
/// Entry bit: user accessible (Xen sets it on every 64-bit PV entry).
pub const PAGE_USER: u64 = 1 << 2;
/// Entry bit: write-through.
pub const PAGE_PWT: u64 = 1 << 3;
/// Entry bit: cache disable.
pub const PAGE_PCD: u64 = 1 << 4;
/// Entry bit: accessed.
pub const PAGE_ACCESSED: u64 = 1 << 5;
/// Entry bit: dirty.
pub const PAGE_DIRTY: u64 = 1 << 6;
/// Entry bit 7: PSE in L2/L3 entries, PAT in L1 entries.
pub const PAGE_PSE: u64 = 1 << 7;
/// Entry bit: global.
pub const PAGE_GLOBAL: u64 = 1 << 8;
/// Entry bit 52, which Xen sets on a 64-bit PV guest's kernel-only L1
/// entries (`_PAGE_GUEST_KERNEL`).
pub const PAGE_GUEST_KERNEL: u64 = 1 << 52;
/// Entry bit: no execute.
pub const PAGE_NX: u64 = 1 << 63;
/// Bits 12..52 of an entry: the machine frame it points to.
pub const ENTRY_MFN_MASK: u64 = 0x000f_ffff_ffff_f000;

/// First L4 slot Xen keeps for itself in every 64-bit PV root
/// (0xffff_8000_0000_0000).
pub const XEN_L4_FIRST: usize = 256;
/// Last L4 slot Xen keeps for itself (up to 0xffff_8800_0000_0000).
pub const XEN_L4_LAST: usize = 271;

/// First machine frame of the guest's memory in the model.
pub const GUEST_MFN_BASE: u64 = 0x10_0000;
/// Machine frames below this are I/O (Xen gives the first MiB to `dom_io`).
pub const IO_MFN_END: u64 = 0x100;
/// First of the frames the model gives to Xen itself.
pub const XEN_MFN_BASE: u64 = 0x1000;
/// Number of frames owned by Xen in the model.
pub const XEN_MFN_COUNT: u64 = 0x100;
/// First of the frames the model gives to another domain.
pub const OTHER_MFN_BASE: u64 = 0x2000;
/// Number of frames owned by another domain in the model.
pub const OTHER_MFN_COUNT: u64 = 0x100;
/// Free (unowned) RAM frames the model keeps after the guest's frames.
pub const FREE_TAIL_FRAMES: u64 = 0x100;
/// Machine frames a hardware domain may map as MMIO: those below 2^40 bytes.
pub const MMIO_MFN_LIMIT: u64 = 1 << 28;

/// The page type Xen tracks per machine frame (`PGT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageType {
    /// No type reference is held.
    None,
    /// Mapped writable somewhere (`PGT_writable_page`).
    Writable,
    /// A validated L1 page table.
    L1,
    /// A validated L2 page table.
    L2,
    /// A validated L3 page table.
    L3,
    /// A validated L4 page table (a root).
    L4,
}

impl PageType {
    /// The page-table type of `level` (1..=4), `None` otherwise.
    pub const fn table(level: u8) -> Option<PageType> {
        match level {
            1 => Some(PageType::L1),
            2 => Some(PageType::L2),
            3 => Some(PageType::L3),
            4 => Some(PageType::L4),
            _ => None,
        }
    }

    /// The level (1..=4) of a page-table type, 0 for `None` and `Writable`.
    pub const fn level(self) -> u8 {
        match self {
            PageType::L1 => 1,
            PageType::L2 => 2,
            PageType::L3 => 3,
            PageType::L4 => 4,
            PageType::None | PageType::Writable => 0,
        }
    }

    const fn code(self) -> u32 {
        match self {
            PageType::None => 0,
            PageType::Writable => 1,
            PageType::L1 => 2,
            PageType::L2 => 3,
            PageType::L3 => 4,
            PageType::L4 => 5,
        }
    }

    const fn from_code(code: u32) -> PageType {
        match code {
            1 => PageType::Writable,
            2 => PageType::L1,
            3 => PageType::L2,
            4 => PageType::L3,
            5 => PageType::L4,
            _ => PageType::None,
        }
    }
}

/// Who owns a machine frame, as Xen's frame table would say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The modelled guest.
    Guest,
    /// Xen itself (its image, its page tables, the M2P).
    Xen,
    /// Some other domain.
    OtherDomain,
    /// RAM that nobody owns (free in Xen's heap).
    Free,
    /// RAM or holes Xen assigned to `dom_io` (the first MiB).
    Io,
    /// Beyond the end of RAM: MMIO space or nothing.
    NotRam,
}

/// Which kind of PV domain the model plays: it changes which cache
/// attributes an L1 entry may carry, whether MMIO may be mapped and
/// whether Xen flushes caches for it (Xen decides all three by the
/// domain's I/O memory and port capabilities, which dom0 has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainKind {
    /// An ordinary domU without I/O privileges: PWT/PCD/PAT are refused in
    /// L1 entries (`EINVAL`), MMIO mappings get `EPERM`,
    /// `MMUEXT_FLUSH_CACHE` `EACCES` and `MMUEXT_FLUSH_CACHE_GLOBAL`
    /// `EINVAL`.
    Unprivileged,
    /// The hardware domain (dom0), which the reference kernel is under real
    /// Xen: cache attributes allowed in L1 entries (any PAT index, on any
    /// of its RAM frames, with no agreement required between two mappings
    /// of one frame: Xen 4.17 dropped that tracking, XSA-402), MMIO
    /// mappable, cache flushes run.
    Hardware,
}

/// Cache flushes the model accepted, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheFlushes {
    /// `MMUEXT_FLUSH_CACHE`: the current physical CPU's caches.
    pub local: u64,
    /// `MMUEXT_FLUSH_CACHE_GLOBAL`: every physical CPU's caches.
    pub global: u64,
}

/// A live page table whose guest-visible memory differs from what Xen
/// validated: something stored into it directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntegrityViolation {
    /// Machine frame of the table.
    pub mfn: Mfn,
    /// Its pseudo-physical frame.
    pub pfn: Option<Pfn>,
    /// Page-table type of the frame.
    pub page_type: PageType,
    /// First entry that differs.
    pub index: usize,
    /// The entry Xen validated.
    pub expected: u64,
    /// The entry in memory.
    pub found: u64,
}

/// Frames per chunk of the type-word array.
const CHUNK: usize = 4096;

// Packed per-frame type word: type code, pinned, validated, type count.
const TW_TYPE_MASK: u32 = 0x7;
const TW_PINNED: u32 = 1 << 3;
const TW_VALIDATED: u32 = 1 << 4;
const TW_COUNT_SHIFT: u32 = 5;
const TW_COUNT_MAX: u32 = (1 << (32 - TW_COUNT_SHIFT)) - 1;

/// Decoded per-frame type state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct TypeWord {
    pub(crate) ty: u32,
    pub(crate) pinned: bool,
    pub(crate) validated: bool,
    pub(crate) count: u32,
}

impl TypeWord {
    fn unpack(w: u32) -> Self {
        Self {
            ty: w & TW_TYPE_MASK,
            pinned: w & TW_PINNED != 0,
            validated: w & TW_VALIDATED != 0,
            count: w >> TW_COUNT_SHIFT,
        }
    }

    fn pack(self) -> u32 {
        (self.ty & TW_TYPE_MASK)
            | if self.pinned { TW_PINNED } else { 0 }
            | if self.validated { TW_VALIDATED } else { 0 }
            | (self.count.min(TW_COUNT_MAX) << TW_COUNT_SHIFT)
    }

    pub(crate) fn page_type(self) -> PageType {
        PageType::from_code(self.ty)
    }
}

/// A Xen 4.17 PV domain's memory and page-table rules, behind
/// [`hypercall::MmuHypercalls`], [`PhysMem`] and [`FrameMap`].
pub struct XenModel {
    nr_pages: u64,
    kind: DomainKind,
    p2m_mul: u64,
    p2m_add: u64,
    p2m_inv: u64,
    m2p_override: BTreeMap<u64, u64>,
    /// Packed type words of guest frames, by `mfn / CHUNK`.
    types: BTreeMap<u64, Box<[u32; CHUNK]>>,
    /// What Xen validated, per live page-table frame.
    shadows: BTreeMap<u64, Box<FrameWords>>,
    /// Linear page-table counts (`linear_pt_count`): positive = entries of
    /// this table that map another same-level table, negative = uses of this
    /// table by other same-level tables.
    linear: BTreeMap<u64, i32>,
    /// Frame contents by mfn, allocated on first touch. Each pointer comes
    /// from `Box::into_raw` and is freed in `Drop`.
    memory: RefCell<BTreeMap<u64, NonNull<FrameWords>>>,
    /// Frames left half-validated (Xen's `PGT_partial` with the type count
    /// at 1), with how many leading entries hold references
    /// (`nr_validated_ptes`): the one pending clean-up in `old_table`, and
    /// any Xen lost track of (see `rules.rs`, "stuck tables").
    partial: BTreeMap<u64, usize>,
    /// Xen's `old_guest_table`: the half-validated table whose references
    /// the end of the current hypercall drops.
    old_table: Option<u64>,
    root: u64,
    user_root: u64,
    stats: HypercallStats,
    tlb_flushes: u64,
    /// Cache flushes Xen ran for the guest.
    cache_flushes: CacheFlushes,
    /// The simulated vCPUs' TLBs.
    vcpus: tlb::Vcpus,
}

// SAFETY: the raw pointers in `memory` are owned allocations of this model
// alone (nothing else frees or aliases them except through `frame_ptr`,
// whose users are bound by `PhysMem`'s contract to this model's lifetime);
// moving the model to another thread moves that ownership with it.
unsafe impl Send for XenModel {}

impl core::fmt::Debug for XenModel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XenModel")
            .field("nr_pages", &self.nr_pages)
            .field("kind", &self.kind)
            .field("root", &Mfn(self.root))
            .field("tables", &self.shadows.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

/// `(a * b + c) % n`; in 64-bit arithmetic when it cannot overflow (every
/// guest this model stands for), in 128-bit otherwise. The p2m is
/// consulted on every entry of every walk, so this is the property tests'
/// hot path.
fn mul_add_mod(a: u64, b: u64, c: u64, n: u64) -> u64 {
    match a.checked_mul(b).and_then(|p| p.checked_add(c)) {
        Some(v) => v % n,
        None => ((u128::from(a) * u128::from(b) + u128::from(c)) % u128::from(n)) as u64,
    }
}

/// Inverse of `a` modulo `n` (`gcd(a, n) == 1`, `n >= 1`).
fn mod_inverse(a: u64, n: u64) -> u64 {
    let (mut t, mut new_t) = (0i128, 1i128);
    let (mut r, mut new_r) = (i128::from(n), i128::from(a % n));
    while new_r != 0 {
        let q = r / new_r;
        (t, new_t) = (new_t, t - q * new_t);
        (r, new_r) = (new_r, r - q * new_r);
    }
    let n = i128::from(n);
    (((t % n) + n) % n) as u64
}

impl XenModel {
    /// An unprivileged PV domain with pseudo-physical frames `0..nr_pages`.
    pub fn new(nr_pages: u64) -> Self {
        Self::with_kind(nr_pages, DomainKind::Unprivileged)
    }

    /// The hardware domain (dom0) with frames `0..nr_pages`: what the
    /// reference kernel is under real Xen.
    pub fn new_hardware_domain(nr_pages: u64) -> Self {
        Self::with_kind(nr_pages, DomainKind::Hardware)
    }

    /// A domain of the given kind with frames `0..nr_pages`.
    pub fn with_kind(nr_pages: u64, kind: DomainKind) -> Self {
        // A multiplicative scramble plus an offset: bijective on 0..n, not
        // the identity, and far from the pfn range so confusing a pfn with
        // an mfn is caught.
        let n = nr_pages.max(1);
        let mut mul = 0x9e37_79b1 % n;
        if n > 2 {
            if mul < 2 {
                mul = 2;
            }
            while gcd(mul, n) != 1 {
                mul += 1;
                if mul >= n {
                    mul = 1;
                }
            }
        } else {
            mul = 1;
        }
        let add = n / 3 + 1;
        Self {
            nr_pages,
            kind,
            p2m_mul: mul,
            p2m_add: add % n,
            p2m_inv: mod_inverse(mul, n),
            m2p_override: BTreeMap::new(),
            types: BTreeMap::new(),
            shadows: BTreeMap::new(),
            linear: BTreeMap::new(),
            partial: BTreeMap::new(),
            old_table: None,
            memory: RefCell::new(BTreeMap::new()),
            root: 0,
            user_root: 0,
            stats: HypercallStats::default(),
            tlb_flushes: 0,
            cache_flushes: CacheFlushes::default(),
            vcpus: tlb::Vcpus::default(),
        }
    }

    /// Number of pseudo-physical frames of the guest.
    pub fn nr_pages(&self) -> u64 {
        self.nr_pages
    }

    /// The kind of domain modelled.
    pub fn kind(&self) -> DomainKind {
        self.kind
    }

    /// Machine frame of guest frame `pfn` (the p2m), if `pfn < nr_pages`.
    pub fn mfn_of(&self, pfn: Pfn) -> Option<Mfn> {
        if pfn.0 >= self.nr_pages {
            return None;
        }
        let x = mul_add_mod(pfn.0, self.p2m_mul, self.p2m_add, self.nr_pages);
        Some(Mfn(GUEST_MFN_BASE + x))
    }

    /// Guest frame backed by `mfn` (the inverse p2m), if the guest owns it.
    pub fn pfn_of(&self, mfn: Mfn) -> Option<Pfn> {
        if self.owner(mfn) != Owner::Guest {
            return None;
        }
        let n = self.nr_pages;
        // x < n and p2m_add < n: no overflow, one subtraction modulo n.
        let x = mfn.0 - GUEST_MFN_BASE;
        let y = if x >= self.p2m_add {
            x - self.p2m_add
        } else {
            x + (n - self.p2m_add)
        };
        Some(Pfn(mul_add_mod(y, self.p2m_inv, 0, n)))
    }

    /// Owner of machine frame `mfn`.
    pub fn owner(&self, mfn: Mfn) -> Owner {
        let m = mfn.0;
        if m < IO_MFN_END {
            Owner::Io
        } else if (XEN_MFN_BASE..XEN_MFN_BASE + XEN_MFN_COUNT).contains(&m) {
            Owner::Xen
        } else if (OTHER_MFN_BASE..OTHER_MFN_BASE + OTHER_MFN_COUNT).contains(&m) {
            Owner::OtherDomain
        } else if (GUEST_MFN_BASE..GUEST_MFN_BASE + self.nr_pages).contains(&m) {
            Owner::Guest
        } else if m < GUEST_MFN_BASE + self.nr_pages + FREE_TAIL_FRAMES {
            Owner::Free
        } else {
            Owner::NotRam
        }
    }

    /// A frame owned by Xen (its entries fill the guest roots' Xen slots).
    pub fn xen_mfn(&self) -> Mfn {
        Mfn(XEN_MFN_BASE)
    }

    /// A frame owned by another domain.
    pub fn foreign_mfn(&self) -> Mfn {
        Mfn(OTHER_MFN_BASE)
    }

    /// Page type of `mfn` while at least one type reference is held, else
    /// [`PageType::None`] (Xen keeps a stale type at count zero; it means
    /// nothing until the next reference).
    pub fn page_type(&self, mfn: Mfn) -> PageType {
        let tw = self.tyword(mfn.0);
        if tw.count == 0 {
            PageType::None
        } else {
            tw.page_type()
        }
    }

    /// Number of type references held on `mfn`: one per writable mapping
    /// (for [`PageType::Writable`]), or one per entry referencing the table,
    /// plus one for the pin and one per vCPU root it serves.
    pub fn type_count(&self, mfn: Mfn) -> u32 {
        self.tyword(mfn.0).count
    }

    /// Whether `mfn` is pinned.
    pub fn is_pinned(&self, mfn: Mfn) -> bool {
        self.tyword(mfn.0).pinned
    }

    /// The kernel root (`MMUEXT_NEW_BASEPTR`), if one was loaded.
    pub fn current_root(&self) -> Option<Mfn> {
        (self.root != 0).then_some(Mfn(self.root))
    }

    /// The user root (`MMUEXT_NEW_USER_BASEPTR`), if one was loaded.
    pub fn current_user_root(&self) -> Option<Mfn> {
        (self.user_root != 0).then_some(Mfn(self.user_root))
    }

    /// Linear page-table count of `mfn` (Xen's `linear_pt_count`).
    pub fn linear_count(&self, mfn: Mfn) -> i32 {
        self.linear.get(&mfn.0).copied().unwrap_or(0)
    }

    /// Frames Xen left half-validated and no longer tracks (a stuck table:
    /// see `docs/xen-pv-rules.md`), lowest first.
    pub fn stuck_tables(&self) -> impl Iterator<Item = Mfn> + '_ {
        self.partial.keys().map(|&m| Mfn(m))
    }

    /// Number of frames currently validated as page tables.
    pub fn live_tables(&self) -> usize {
        self.shadows.len()
    }

    /// TLB flushes requested (mmuext flush/invlpg ops and
    /// `update_va_mapping` flush flags).
    pub fn tlb_flushes(&self) -> u64 {
        self.tlb_flushes
    }

    /// Cache flushes accepted (`MMUEXT_FLUSH_CACHE`, `_GLOBAL`).
    pub fn cache_flushes(&self) -> CacheFlushes {
        self.cache_flushes
    }

    /// Sets every counter of [`hypercall::MmuHypercalls::stats`] (and the
    /// TLB and cache flush counts) back to zero.
    pub fn reset_stats(&mut self) {
        self.stats = HypercallStats::default();
        self.tlb_flushes = 0;
        self.cache_flushes = CacheFlushes::default();
    }

    /// Entry `index` of machine frame `mfn` as the guest sees it, `None` if
    /// the guest cannot read that frame.
    pub fn read_entry(&self, mfn: Mfn, index: usize) -> Option<u64> {
        if self.owner(mfn) != Owner::Guest || index >= ENTRIES {
            return None;
        }
        Some(self.mem_read(mfn.0, index))
    }

    /// Checks every live page table's memory against what Xen validated and
    /// reports the first difference (a direct store into a live table).
    pub fn check_integrity(&self) -> Result<(), IntegrityViolation> {
        let mut first = None;
        self.integrity_violations(|v| {
            if first.is_none() {
                first = Some(v);
            }
        });
        match first {
            Some(v) => Err(v),
            None => Ok(()),
        }
    }

    /// Calls `report` once per live table whose memory differs from what
    /// Xen validated (with the first differing entry); returns how many.
    pub fn integrity_violations(&self, mut report: impl FnMut(IntegrityViolation)) -> usize {
        let mut n = 0;
        for (&mfn, shadow) in &self.shadows {
            let frame = self.frame(mfn);
            for (index, &expected) in shadow.iter().enumerate() {
                // SAFETY: `frame` points to a live 512-entry allocation owned
                // by this model and `index < ENTRIES`.
                let found = unsafe { frame.as_ptr().cast::<u64>().add(index).read() };
                if found != expected {
                    n += 1;
                    report(IntegrityViolation {
                        mfn: Mfn(mfn),
                        pfn: self.pfn_of(Mfn(mfn)),
                        page_type: self.page_type(Mfn(mfn)),
                        index,
                        expected,
                        found,
                    });
                    break;
                }
            }
        }
        n
    }

    // ---- frame contents -------------------------------------------------

    /// Contents of guest frame `mfn`, allocated zeroed on first touch.
    /// Callers pass only guest-owned frames.
    fn frame(&self, mfn: u64) -> NonNull<FrameWords> {
        let mut memory = self.memory.borrow_mut();
        *memory.entry(mfn).or_insert_with(|| {
            let boxed: Box<FrameWords> = Box::new([0; ENTRIES]);
            NonNull::from(Box::leak(boxed))
        })
    }

    pub(crate) fn mem_read(&self, mfn: u64, index: usize) -> u64 {
        let frame = self.frame(mfn);
        // SAFETY: `frame` is a live 512-entry allocation owned by this model;
        // `index & 511` stays inside it.
        unsafe {
            frame
                .as_ptr()
                .cast::<u64>()
                .add(index & (ENTRIES - 1))
                .read()
        }
    }

    /// What Xen believes entry `index` of `mfn` holds: the shadow for a live
    /// table, the memory otherwise.
    pub(crate) fn entry(&self, mfn: u64, index: usize) -> u64 {
        match self.shadows.get(&mfn) {
            Some(shadow) => shadow[index & (ENTRIES - 1)],
            None => self.mem_read(mfn, index),
        }
    }

    /// Xen writes entry `index` of `mfn`: memory and shadow both.
    pub(crate) fn write_entry(&mut self, mfn: u64, index: usize, val: u64) {
        let index = index & (ENTRIES - 1);
        if let Some(shadow) = self.shadows.get_mut(&mfn) {
            shadow[index] = val;
        }
        let frame = self.frame(mfn);
        // SAFETY: as in `mem_read`; the model is single-threaded and holds
        // no reference into the frame while writing.
        unsafe { frame.as_ptr().cast::<u64>().add(index).write(val) }
    }

    /// Starts tracking `mfn` as a live table: snapshot its memory.
    pub(crate) fn take_shadow(&mut self, mfn: u64) {
        let frame = self.frame(mfn);
        // SAFETY: `frame` is a live, initialised 4 KiB allocation owned by
        // this model; copying it by value creates no lasting reference.
        let copy: FrameWords = unsafe { frame.as_ptr().read() };
        self.shadows.insert(mfn, Box::new(copy));
    }

    pub(crate) fn drop_shadow(&mut self, mfn: u64) {
        self.shadows.remove(&mfn);
    }

    // ---- type words -----------------------------------------------------

    pub(crate) fn tyword(&self, mfn: u64) -> TypeWord {
        match self.types.get(&(mfn / CHUNK as u64)) {
            Some(chunk) => TypeWord::unpack(chunk[(mfn % CHUNK as u64) as usize]),
            None => TypeWord::default(),
        }
    }

    pub(crate) fn set_tyword(&mut self, mfn: u64, tw: TypeWord) {
        let key = mfn / CHUNK as u64;
        let slot = (mfn % CHUNK as u64) as usize;
        let packed = tw.pack();
        if packed == 0 && !self.types.contains_key(&key) {
            return;
        }
        let chunk = self
            .types
            .entry(key)
            .or_insert_with(|| Box::new([0; CHUNK]));
        chunk[slot] = packed;
    }

    pub(crate) fn linear_add(&mut self, mfn: u64, delta: i32) {
        let v = self.linear.get(&mfn).copied().unwrap_or(0) + delta;
        if v == 0 {
            self.linear.remove(&mfn);
        } else {
            self.linear.insert(mfn, v);
        }
    }

    pub(crate) fn type_count_max() -> u32 {
        TW_COUNT_MAX
    }
}

impl Drop for XenModel {
    fn drop(&mut self) {
        for (_, frame) in core::mem::take(self.memory.get_mut()) {
            // SAFETY: every pointer in `memory` came from `Box::leak` in
            // `frame` and is freed exactly once, here.
            drop(unsafe { Box::from_raw(frame.as_ptr()) });
        }
    }
}

// SAFETY: `frame_ptr` returns, for each guest pfn, a pointer to that frame's
// 4 KiB allocation, which lives (at the same address) until the model is
// dropped; other pfns get `None`.
unsafe impl PhysMem for XenModel {
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        let mfn = self.mfn_of(pfn)?;
        Some(self.frame(mfn.0))
    }
}

impl FrameMap for XenModel {
    fn to_mfn(&self, pfn: Pfn) -> Option<Mfn> {
        self.mfn_of(pfn)
    }

    fn to_pfn(&self, mfn: Mfn) -> Option<Pfn> {
        match self.m2p_override.get(&mfn.0) {
            Some(&pfn) if self.owner(mfn) == Owner::Guest => Some(Pfn(pfn)),
            _ => self.pfn_of(mfn),
        }
    }
}
