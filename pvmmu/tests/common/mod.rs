//! Test support shared by the pvmmu integration tests: an in-memory frame
//! arena, a frame pool that can be told to run dry, the Xen model shared
//! between the three traits the PV backend takes, oracles for the invariant
//! walker, and a leaf walker that lists every mapped 4 KiB page.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ptr::NonNull;

use pvmmu::backend::xen::MAX_ALIASES;
use pvmmu::backend::{Alias, AliasMap, Backend, Kind, NoAliases, XenPv};
use pvmmu::entry::{Entry, Flags, Level, HARDWARE_SET};
use pvmmu::invariants::{self, Oracle, Rules, Violation};
use pvmmu::model::XenModel;
use pvmmu::phys::FrameWords;
use pvmmu::{FrameAllocator, Mfn, Native, Pfn, PhysMem};

/// `n` zeroed frames; pfn `i` is frame `i`.
pub struct Arena {
    base: NonNull<FrameWords>,
    n: usize,
}

impl Arena {
    pub fn new(n: usize) -> Self {
        let frames: Box<[FrameWords]> = vec![[0u64; 512]; n].into_boxed_slice();
        let base = NonNull::new(Box::into_raw(frames).cast::<FrameWords>()).expect("non-null box");
        Self { base, n }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `base`/`n` come from `Box::into_raw` of a boxed slice of
        // exactly `n` frames, freed once here.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.base.as_ptr(),
                self.n,
            )))
        };
    }
}

// SAFETY: every pointer returned lies inside the boxed slice the arena owns
// until it is dropped, is 4096-byte sized, and is the same for the same pfn.
unsafe impl PhysMem for Arena {
    fn frame_ptr(&self, pfn: Pfn) -> Option<NonNull<FrameWords>> {
        if pfn.0 < self.n as u64 {
            // SAFETY: in bounds of the allocation.
            Some(unsafe { NonNull::new_unchecked(self.base.as_ptr().add(pfn.0 as usize)) })
        } else {
            None
        }
    }
}

/// A frame pool over `[first, first + n)` that hands out the lowest free
/// frame and can be told to fail after a number of allocations.
#[derive(Clone)]
pub struct Pool {
    free: BTreeSet<u64>,
    pub out: BTreeSet<u64>,
    pub fail_after: Option<usize>,
    pub allocations: u64,
    /// Accept frees of frames this pool never handed out (tables that came
    /// from a caller's x86_64 allocator).
    pub adopt_foreign: bool,
}

impl Pool {
    pub fn new(first: u64, n: u64) -> Self {
        Self {
            free: (first..first + n).collect(),
            out: BTreeSet::new(),
            fail_after: None,
            allocations: 0,
            adopt_foreign: false,
        }
    }
    pub fn in_use(&self) -> usize {
        self.out.len()
    }
    /// Adds frames `[first, first + n)` to the free set.
    pub fn add_frames(&mut self, first: u64, n: u64) {
        self.free.extend(first..first + n);
    }
}

impl FrameAllocator for Pool {
    fn allocate(&mut self) -> Option<Pfn> {
        if let Some(k) = self.fail_after.as_mut() {
            if *k == 0 {
                return None;
            }
            *k -= 1;
        }
        let f = *self.free.iter().next()?;
        self.free.remove(&f);
        self.out.insert(f);
        self.allocations += 1;
        Some(Pfn(f))
    }
    fn free(&mut self, pfn: Pfn) {
        assert!(
            self.out.remove(&pfn.0) || self.adopt_foreign,
            "freed a frame not handed out: {pfn:?}"
        );
        self.free.insert(pfn.0);
    }
}

/// The Xen model behind the three traits the PV backend takes.
pub use pvmmu::model::SharedModel as Shared;

/// A fresh unprivileged domain of `nr_pages` behind a shared handle.
pub fn shared(nr_pages: u64) -> Shared {
    Shared::new(XenModel::new(nr_pages))
}

/// The model's page types and pins as the invariant walker's oracle (the
/// library implements `Oracle` for `XenModel`).
pub struct ModelOracle<'a>(pub &'a XenModel);

impl Oracle for ModelOracle<'_> {
    fn table_level(&self, mfn: Mfn) -> Option<Level> {
        Oracle::table_level(self.0, mfn)
    }
    fn is_pinned(&self, mfn: Mfn) -> bool {
        Oracle::is_pinned(self.0, mfn)
    }
}

/// Tables found by a walk, as an oracle (native: "is this frame a table").
pub struct TableSet(pub BTreeMap<u64, Level>);

impl TableSet {
    pub fn of<B: Backend>(b: &B, root: Pfn) -> Self {
        let mut m = BTreeMap::new();
        invariants::for_each_table(b, root, &mut |pfn, level| {
            m.insert(b.to_mfn(pfn).map_or(u64::MAX, |m| m.0), level);
        });
        Self(m)
    }
}

impl Oracle for TableSet {
    fn table_level(&self, mfn: Mfn) -> Option<Level> {
        self.0.get(&mfn.0).copied()
    }
    fn is_pinned(&self, _mfn: Mfn) -> bool {
        true
    }
}

pub type PvBackend = XenPv<Shared, Shared, Shared, NoAliases>;

/// A kernel direct map: frames `[first, first + n)` are mapped at
/// `base + pfn * 4096` in the current root.
#[derive(Debug, Clone, Copy)]
pub struct DirectAliases {
    pub base: u64,
    pub first: u64,
    pub n: u64,
}

impl AliasMap for DirectAliases {
    fn aliases(&self, pfn: Pfn, out: &mut [Alias; MAX_ALIASES]) -> usize {
        if pfn.0 >= self.first && pfn.0 < self.first + self.n {
            out[0] = Alias::Va(self.base + pfn.0 * 4096);
            1
        } else {
            0
        }
    }
}

pub type PvAliasBackend = XenPv<Shared, Shared, Shared, DirectAliases>;
pub type NativeBackend = Native<Arena>;

pub fn pv_backend(model: &Shared, batch: usize) -> PvBackend {
    XenPv::new(model.clone(), model.clone(), model.clone(), NoAliases, None)
        .with_batch_capacity(batch)
}

/// One mapped 4 KiB page as the tests compare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    pub pfn: u64,
    pub flags: Flags,
    /// Start of the large page it belongs to (its own address for 4 KiB).
    pub page_start: u64,
    pub page_len: u64,
}

fn sign_extend(va: u64) -> u64 {
    if va & (1 << 47) != 0 {
        va | 0xffff_0000_0000_0000
    } else {
        va
    }
}

/// Every mapped 4 KiB page of the tree (large pages expanded), skipping
/// Xen's L4 slots under PV.
pub fn leaves<B: Backend>(b: &B, root: Pfn) -> BTreeMap<u64, Leaf> {
    leaves_outside(b, root, None)
}

/// [`leaves`] without the pages of `skip` (`[start, end)`): an entry whose
/// whole span lies inside it is not descended into, so a large mapping the
/// caller checks otherwise (a direct map) costs nothing per call.
pub fn leaves_outside<B: Backend>(
    b: &B,
    root: Pfn,
    skip: Option<(u64, u64)>,
) -> BTreeMap<u64, Leaf> {
    fn walk<B: Backend>(
        b: &B,
        table: Pfn,
        level: Level,
        base: u64,
        skip: Option<(u64, u64)>,
        out: &mut BTreeMap<u64, Leaf>,
    ) {
        let mut entries = [0u64; 512];
        b.read_table(table, &mut entries);
        for (i, raw) in entries.iter().enumerate() {
            let e = Entry(*raw);
            if !e.is_present() {
                continue;
            }
            if level == Level::L4 && b.kind() == Kind::XenPv && (256..=271).contains(&i) {
                continue;
            }
            let va = sign_extend(base | ((i as u64) << level.shift()));
            if let Some((start, end)) = skip {
                if va >= start && va.wrapping_add(level.entry_span() - 1) < end {
                    continue;
                }
            }
            let leaf = level == Level::L1 || (e.is_huge() && b.kind() == Kind::Native);
            let mfn = if leaf { e.leaf_mfn(level) } else { e.mfn() };
            let pfn = b.to_pfn(mfn).expect("entry points to a guest frame").0;
            if leaf {
                let flags = b.normalize(e.flags() - Flags::HUGE_PAGE - HARDWARE_SET);
                let n = level.entry_span() / 4096;
                for k in 0..n {
                    let page = va + k * 4096;
                    if skip.is_some_and(|(start, end)| page >= start && page < end) {
                        continue;
                    }
                    out.insert(
                        page,
                        Leaf {
                            pfn: pfn + k,
                            flags,
                            page_start: va,
                            page_len: level.entry_span(),
                        },
                    );
                }
            } else if let Some(lower) = level.lower() {
                walk(b, Pfn(pfn), lower, va, skip, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(b, root, Level::L4, 0, skip, &mut out);
    out
}

/// Runs the invariant walker; returns the violations.
pub fn violations<B: Backend>(b: &B, root: Pfn, oracle: Option<&dyn Oracle>) -> Vec<Violation> {
    let mut v = Vec::new();
    invariants::check(b, root, Rules::for_backend(b), oracle, &mut |x| v.push(x));
    v
}

/// The random seed of a property test's run: `PVMMU_SEED=<hex>` (to replay
/// a failure), otherwise from the clock.
pub fn random_seed() -> u64 {
    let replay = std::env::var("PVMMU_SEED")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
    replay.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7)
    })
}
