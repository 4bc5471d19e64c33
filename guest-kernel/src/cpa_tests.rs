//! The CPA self-test (in the manner of Linux's cpa-test): random ranges of
//! up to 100 pages in the direct map get random attribute changes through
//! [`kspace::change_page_attr`], each checked by walking the tree and by a
//! real access that must fault (a write to a read-only page, an execute of
//! a non-executable page, a read of a non-present page), then restored and
//! checked again; plus the refusals. Natively the direct map has 2 MiB /
//! 1 GiB pages, so the changes split them (unless DEBUG_PAGEALLOC made it
//! 4 KiB already); under PV it is 4 KiB (no splits), np leaves holes and
//! the frames are mapped again to restore them (p is refused: PV cannot
//! park). A second test marks random
//! ranges anywhere in the direct map's RAM with CPA's software test bit
//! (no effect on access, as Linux's cpa-test does) and checks the range
//! and its neighbours by walking: natively these spread the splits over
//! the whole direct map (under DEBUG_PAGEALLOC only mapped pages: free
//! frames are out of the direct map).
//!
//! Invariant: only frames this test took from the frame allocator change
//! access rights (the marker changes only the software bit, and clears it
//! again); every one is writable and non-executable, at its own frame,
//! when the test returns (checked), and goes back to the allocator.

use core::sync::atomic::{AtomicU64, Ordering};

use pvmmu::entry::{FlagError, Flags};
use pvmmu::space::{Protected, CPA_TEST_BIT};
use pvmmu::{Error, Pfn};

use crate::directmap::DirectMem;
use crate::kspace::{self, KspaceError};
use crate::selftest::{check, check_eq, Failure, SelfTest, TestResult};
use crate::traps::{self, pf};
use crate::{percpu, sched, Kernel};

/// The suite (run once the running kernel's address space exists).
pub const SUITE: &[SelfTest] = &[
    SelfTest::new("cpa_random_ranges_walk_and_faults", random_ranges),
    SelfTest::new("cpa_refusals_leave_the_tree_unchanged", refusals),
    SelfTest::new("cpa_cache_modes_clflush_and_wbinvd", cache_modes),
    SelfTest::new("cpa_image_data_alias_follows", image_data_alias_follows),
    // Before the marker test, which splits large pages all over.
    SelfTest::new("cpa_every_cpu_at_once", every_cpu_at_once),
    SelfTest::new("cpa_marker_ranges_across_the_direct_map", marker_ranges),
];

/// Ranges of the marker test (each may split up to two large pages; the
/// tables come from the kspace pool and stay).
const MARKER_ROUNDS: usize = 100;

/// Frames the test changes (taken from the allocator, given back).
const FRAMES: usize = 768;
/// Random ranges (at least 300).
const ROUNDS: usize = 320;
/// Longest range.
const MAX_PAGES: u64 = 100;

static FAULTS_VERIFIED: AtomicU64 = AtomicU64::new(0);

/// Faults the CPA tests expected and took.
pub fn faults_verified() -> u64 {
    FAULTS_VERIFIED.load(Ordering::Relaxed)
}

const RW: Flags = Flags::PRESENT
    .union(Flags::WRITABLE)
    .union(Flags::NO_EXECUTE);

/// xorshift64*: the test's random numbers (seed logged).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in `[lo, hi]`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// The frames taken: sorted, as runs of consecutive frames.
struct Owned {
    frames: [u64; FRAMES],
    n: usize,
}

impl Owned {
    fn take(kernel: &mut Kernel) -> Result<Self, Failure> {
        let mut o = Owned {
            frames: [0; FRAMES],
            n: 0,
        };
        while o.n < FRAMES {
            let Some(p) = kernel.frames.allocate_lowest() else {
                o.give_back(kernel);
                return Err(Failure::Check("frame allocator: too few frames"));
            };
            o.frames[o.n] = p.0;
            o.n += 1;
        }
        o.frames.sort_unstable();
        Ok(o)
    }
    fn give_back(&self, kernel: &mut Kernel) {
        for &f in &self.frames[..self.n] {
            if kernel.frames.try_free(Pfn(f)).is_err() {
                log::error!("cpa test: frame {f:#x} not taken back");
            }
        }
    }
    /// The frames `[from, to)` of `all` (sorted), as an `Owned` of their
    /// own (a CPU's share; `all` keeps the ownership).
    fn share(all: &Owned, from: usize, to: usize) -> Self {
        let mut o = Owned {
            frames: [0; FRAMES],
            n: to - from,
        };
        o.frames[..o.n].copy_from_slice(&all.frames[from..to]);
        o
    }
    /// A random range of consecutive owned frames: (first pfn, pages).
    fn random_range(&self, rng: &mut Rng) -> (u64, u64) {
        let i = rng.range(0, self.n as u64 - 1) as usize;
        // Extend to the run around `i`.
        let mut end = i;
        while end + 1 < self.n
            && self.frames[end + 1] == self.frames[end] + 1
            && end - i + 1 < MAX_PAGES as usize
        {
            end += 1;
        }
        let run = (end - i + 1) as u64;
        let pages = rng.range(1, run);
        (self.frames[i], pages)
    }
}

fn cpa(va: u64, pages: u64, set: Flags, clear: Flags) -> TestResult {
    kspace::change_page_attr(va, pages * 4096, set, clear)
        .map(|_| ())
        .map_err(|e| {
            log::error!("cpa {va:#x}+{pages}: {e:?}");
            Failure::Check("change_page_attr refused a valid change")
        })
}

/// Every page of the range maps its own frame with exactly `want` (the
/// flags pvmmu reports; GLOBAL, if the direct map has it, ignored).
fn walk_check(pfn: u64, pages: u64, want: Option<Flags>) -> TestResult {
    for k in 0..pages {
        let va = DirectMem::va(Pfn(pfn + k));
        match (kspace::translate(va), want) {
            (Ok(t), Some(w)) => {
                check_eq("translation keeps the frame", t.pfn.0, pfn + k)?;
                check_eq(
                    "flags after the change",
                    (t.flags - Flags::GLOBAL).bits(),
                    w.bits(),
                )?;
            }
            (Err(KspaceError::Map(Error::NotMapped { .. })), None) => {}
            _ => return Err(Failure::Check("walk: page (not) mapped as expected")),
        }
    }
    Ok(())
}

/// The probe at `va` must fault with a #PF whose error code has `bits`
/// among PRESENT/WRITE/FETCH.
fn expect_fault(r: Result<(), traps::Fault>, va: u64, bits: u64) -> TestResult {
    match r {
        Err(f)
            if f.vector == traps::vector::PF
                && f.cr2 == va
                && f.error_code & (pf::PRESENT | pf::WRITE | pf::FETCH) == bits =>
        {
            FAULTS_VERIFIED.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(f) => Err(Failure::Fault {
            what: "access after CPA: wrong fault",
            vector: f.vector,
            error_code: f.error_code,
        }),
        Ok(()) => Err(Failure::Check("access after CPA did not fault")),
    }
}

/// The trap path keeps one record of the last caught fault for all CPUs,
/// so CPA rounds running on several CPUs at once take turns for each
/// access and the read of its record (preemption off while they hold it).
static PROBE_TURN: spin::Mutex<()> = spin::Mutex::new(());

/// [`traps::probe_read`], in turn.
///
/// # Safety
/// As [`traps::probe_read`].
unsafe fn probe_read(va: u64) -> Result<u64, traps::Fault> {
    let _p = crate::sched::preempt_disable();
    let _turn = PROBE_TURN.lock();
    // SAFETY: the caller's contract, forwarded.
    unsafe { traps::probe_read(va) }
}

/// [`traps::probe_write`], in turn.
///
/// # Safety
/// As [`traps::probe_write`].
unsafe fn probe_write(va: u64, value: u64) -> Result<(), traps::Fault> {
    let _p = crate::sched::preempt_disable();
    let _turn = PROBE_TURN.lock();
    // SAFETY: the caller's contract, forwarded.
    unsafe { traps::probe_write(va, value) }
}

/// [`traps::probe_exec`], in turn.
///
/// # Safety
/// As [`traps::probe_exec`].
unsafe fn probe_exec(va: u64) -> Result<(), traps::Fault> {
    let _p = crate::sched::preempt_disable();
    let _turn = PROBE_TURN.lock();
    // SAFETY: the caller's contract, forwarded.
    unsafe { traps::probe_exec(va) }
}

/// One round over a random range: read-only, then (at one page) executable
/// and back, or not present; each checked, then restored.
fn round(rng: &mut Rng, owned: &Owned) -> TestResult {
    let (pfn, pages) = owned.random_range(rng);
    let va = DirectMem::va(Pfn(pfn));
    let probe = va + rng.range(0, pages - 1) * 4096;
    let ro = RW - Flags::WRITABLE;
    match rng.range(0, 2) {
        0 => {
            cpa(va, pages, Flags::empty(), Flags::WRITABLE)?;
            walk_check(pfn, pages, Some(ro))?;
            // SAFETY: the page is one of this test's frames (owned).
            expect_fault(
                unsafe { probe_write(probe, 0x5a) },
                probe,
                pf::PRESENT | pf::WRITE,
            )?;
        }
        1 => {
            // `ret` at the probe page, then read-only + executable: the
            // call must return; then NX: the fetch must fault.
            // SAFETY: an owned, still writable page.
            unsafe { probe_write(probe, 0xc3) }
                .map_err(|_| Failure::Check("write to an owned page faulted"))?;
            cpa(va, pages, Flags::empty(), Flags::WRITABLE)?;
            cpa(va, pages, Flags::empty(), Flags::NO_EXECUTE)?;
            walk_check(pfn, pages, Some(ro - Flags::NO_EXECUTE))?;
            // SAFETY: the byte at `probe` is `ret`.
            unsafe { probe_exec(probe) }
                .map_err(|_| Failure::Check("exec of an executable page faulted"))?;
            cpa(va, pages, Flags::NO_EXECUTE, Flags::empty())?;
            walk_check(pfn, pages, Some(ro))?;
            // SAFETY: as above (and NX now: the fetch faults).
            expect_fault(unsafe { probe_exec(probe) }, probe, pf::PRESENT | pf::FETCH)?;
        }
        _ => {
            // Not present: natively parked, under PV holes.
            cpa(va, pages, Flags::empty(), Flags::PRESENT)?;
            walk_check(pfn, pages, None)?;
            // SAFETY: reading an owned page has no side effect.
            expect_fault(unsafe { probe_read(probe) }.map(|_| ()), probe, 0)?;
            // Back (natively CPA's p; under PV a map of the frames, as
            // DEBUG_PAGEALLOC does), then read-only for the common restore.
            kspace::direct_map_present(Pfn(pfn), pages).map_err(|e| {
                log::error!("direct map {va:#x}+{pages} back: {e:?}");
                Failure::Check("direct-map pages not made present again")
            })?;
            walk_check(pfn, pages, Some(RW))?;
            cpa(va, pages, Flags::empty(), Flags::WRITABLE)?;
        }
    }
    // Restore and check: writable again (the write must land).
    cpa(va, pages, Flags::WRITABLE, Flags::empty())?;
    walk_check(pfn, pages, Some(RW))?;
    // SAFETY: an owned page, writable again.
    unsafe { probe_write(probe, 0x1234) }
        .map_err(|_| Failure::Check("write after restore faulted"))?;
    // SAFETY: reading an owned page has no side effect.
    let back = unsafe { probe_read(probe) }.unwrap_or(0);
    check_eq("value written after restore", back, 0x1234)
}

// ---- caching attributes -----------------------------------------------------

const UC: Flags = Flags::WRITE_THROUGH.union(Flags::NO_CACHE);

/// Uncached, write-combining and write-back again on a few pages (their
/// cache lines flushed, natively one by one) and on more than
/// [`pvmmu::space::CLFLUSH_LIMIT`] pages (the whole cache written back),
/// each checked by the raw leaf (the bits of the backend's encoding: under
/// Xen PV the PAT Xen runs the guest with, write-combining on the PAT bit),
/// by walk, and by a write read back; then the alias refusal. Under PV
/// with I/O privilege (dom0) through Xen, each change's TLB and cache
/// flush in one hypercall; without it (domU): refused before Xen is asked.
fn cache_modes(kernel: &mut Kernel) -> TestResult {
    let pages = pvmmu::space::CLFLUSH_LIMIT + 1;
    let start = kernel
        .frames
        .ranges()
        .iter()
        .rev()
        .find(|r| r.count() >= pages)
        .map(|r| r.end - pages)
        .ok_or(Failure::Check("no free run for the cache test"))?;
    kernel
        .frames
        .reserve(start, start + pages)
        .map_err(|_| Failure::Check("cannot take the run"))?;
    let r = cache_modes_on(start, pages, kernel.pv.as_ref());
    let back = kernel.frames.add(start, start + pages);
    r?;
    back.map_err(|_| Failure::Check("cannot give the run back"))
}

/// MMU requests issued so far: mmu_update entries, mmuext ops and
/// update_va_mappings (not hypercalls: a timer tick may set the next
/// deadline, `set_timer_op`, in the middle of a change).
fn mmu_issued() -> u64 {
    let st = hypercall::mmu::issued_stats();
    st.mmu_update_entries + st.mmuext_ops + st.update_va_mappings
}

fn cache_modes_on(pfn: u64, pages: u64, pv: Option<&crate::xen_pv::PvBoot>) -> TestResult {
    use pvmmu::backend::cache::CACHE_SELECT;
    use pvmmu::backend::CacheMode;
    let va = DirectMem::va(Pfn(pfn));
    let Some(enc) = kspace::cache_encoding() else {
        check(
            pv.is_some_and(|p| !p.is_privileged()),
            "caching changes impossible only in a PV domain without I/O privilege",
        )?;
        let calls = mmu_issued();
        for mode in [
            CacheMode::Uncached,
            CacheMode::WriteCombining,
            CacheMode::WriteBack,
        ] {
            refused(
                kspace::set_memory_cache(va, 1, mode),
                Error::Flags(FlagError::CacheAttributes),
            )?;
        }
        refused(
            kspace::change_page_attr(va, 4096, UC, Flags::empty()),
            Error::Flags(FlagError::CacheAttributes),
        )?;
        check_eq(
            "MMU requests for a refused caching change",
            mmu_issued() - calls,
            0,
        )?;
        return walk_check(pfn, 1, Some(RW));
    };
    if pv.is_some() {
        // Read, not assumed: Xen answers the rdmsr with its PV PAT.
        let pat = crate::platform::read_pat();
        log::info!("cpa cache test: IA32_PAT under Xen PV {pat:#018x}");
        check_eq(
            "the PAT Xen runs PV guests with",
            pat,
            hypercall::abi::XEN_MSR_PAT,
        )?;
        check_eq(
            "write-combining on the PAT bit (Xen's index 4)",
            enc.bits(CacheMode::WriteCombining).bits(),
            pvmmu::backend::cache::PAT_4K.bits(),
        )?;
    }
    let before = kspace::cpa_stats().unwrap_or_default();
    let wbinvds = crate::shootdown::remote_wbinvds();
    let change = |n: u64, mode: CacheMode| {
        kspace::set_memory_cache(va, n, mode).map_err(|e| {
            log::error!("caching change {va:#x}+{n} to {mode:?}: {e:?}");
            Failure::Check("caching change refused")
        })
    };
    let lines = |n: u64| {
        Some(pvmmu::backend::TlbScope::Range {
            start: va,
            pages: n,
        })
    };
    // The raw leaves select `mode` (the translation drops bit 7).
    let raw_check = |n: u64, mode: CacheMode| -> TestResult {
        for k in 0..n {
            let e = kspace::leaf_raw(va + k * 4096).map_err(|_| Failure::Check("leaf read"))?;
            check_eq(
                "a leaf's cache bits after the change",
                e & CACHE_SELECT.bits(),
                enc.bits(mode).bits(),
            )?;
        }
        Ok(())
    };
    // Few pages: their lines. Each mode checked by the leaves, by walk and
    // by a value written and read back through it.
    for mode in [
        CacheMode::Uncached,
        CacheMode::WriteCombining,
        CacheMode::WriteBack,
    ] {
        let calls = mmu_issued();
        let done = change(4, mode)?;
        let used = mmu_issued();
        check(done.cache == lines(4), "the four pages' lines flushed")?;
        if pv.is_some() {
            // 4 entries (one mmu_update), then 4 invlpg and the global
            // cache flush in one mmuext_op batch.
            check_eq("MMU requests for one caching change", used - calls, 9)?;
        }
        raw_check(4, mode)?;
        let want = RW | (enc.bits(mode) - pvmmu::backend::cache::PAT_4K);
        walk_check(pfn, 4, Some(want))?;
        // SAFETY: the run is this test's (reserved), mapped writable.
        unsafe { probe_write(va + 8, want.bits() | 0x5a00) }
            .map_err(|_| Failure::Check("write through a cache mode faulted"))?;
        // SAFETY: as above.
        let got = unsafe { probe_read(va + 8) }.unwrap_or(0);
        check_eq("value read back", got, want.bits() | 0x5a00)?;
    }
    // Above the limit: everything written back.
    let done = change(pages, CacheMode::Uncached)?;
    check(
        done.cache == Some(pvmmu::backend::TlbScope::All),
        "the whole cache flushed above the limit",
    )?;
    raw_check(pages, CacheMode::Uncached)?;
    walk_check(pfn, pages, Some(RW | UC))?;
    change(pages, CacheMode::WriteBack)?;
    raw_check(pages, CacheMode::WriteBack)?;
    walk_check(pfn, pages, Some(RW))?;
    let after = kspace::cpa_stats().unwrap_or_default();
    let opt = crate::platform::cpuid(0).eax >= 7
        && core::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 23) != 0;
    log::info!(
        "cpa cache test: 3 range flushes with {}, 2 whole-cache flushes",
        match (pv.is_some(), opt) {
            (true, _) => "MMUEXT_FLUSH_CACHE_GLOBAL",
            (false, true) => "clflushopt",
            (false, false) => "clflush",
        }
    );
    check_eq("range flushes", after.cache_lines - before.cache_lines, 3)?;
    check_eq("whole-cache flushes", after.cache_all - before.cache_all, 2)?;
    if pv.is_none() {
        // Each wbinvd reached every other CPU (through the shootdown).
        check_eq(
            "wbinvd served by the other CPUs",
            crate::shootdown::remote_wbinvds() - wbinvds,
            2 * (percpu::online_count() as u64 - 1),
        )?;
    }
    cache_alias_refusals()
}

/// A caching change that would leave another mapping of a frame with the
/// old type is refused before anything is written: a page outside the
/// direct map and the image (whose direct-map alias could not follow), and
/// a direct-map range covering image data in part (its image alias not
/// carried). The image data through its direct-map alias is carried.
fn cache_alias_refusals() -> TestResult {
    use pvmmu::backend::CacheMode;
    let calls = mmu_issued();
    let probe = kspace::Fixmap::TlbProbe.va();
    match kspace::set_memory_cache(probe, 1, CacheMode::Uncached) {
        Err(KspaceError::CacheAlias { va, alias: 0 }) if va == probe => {}
        r => {
            log::error!("caching change outside the direct map: {r:?}");
            return Err(Failure::Check(
                "caching change outside the direct map not refused",
            ));
        }
    }
    let dm_of = |img: u64| DirectMem::va(Pfn((img - crate::boot::KERNEL_VMA) >> 12));
    // The last page of the image's data and the page after it.
    let last = (crate::boot::image_layout().data.end - 1) & !0xfff;
    match kspace::set_memory_cache(dm_of(last), 2, CacheMode::Uncached) {
        Err(KspaceError::CacheAlias { va, alias }) if va == dm_of(last) && alias == last => {}
        r => {
            log::error!("caching change over image data in part: {r:?}");
            return Err(Failure::Check("image data's alias left behind"));
        }
    }
    check_eq(
        "MMU requests for refused alias changes",
        mmu_issued() - calls,
        0,
    )?;
    // Whole: carried, both leaves uncached, then both write-back again.
    let img = core::ptr::addr_of!(ALIAS_PAGE) as u64;
    let dm = dm_of(img);
    let before = kspace::alias_changes();
    for mode in [CacheMode::Uncached, CacheMode::WriteBack] {
        kspace::set_memory_cache(dm, 1, mode).map_err(|e| {
            log::error!("image data's caching change: {e:?}");
            Failure::Check("image data's caching change refused")
        })?;
        let want = kspace::cache_change(mode)
            .map_err(|_| Failure::Check("encoding"))?
            .0;
        for v in [img, dm] {
            let e = kspace::leaf_raw(v).map_err(|_| Failure::Check("leaf read"))?;
            check_eq(
                "both aliases' cache bits",
                e & UC.bits(),
                (want & UC).bits(),
            )?;
        }
    }
    check_eq(
        "caching changes carried",
        kspace::alias_changes() - before,
        2,
    )?;
    Ok(())
}

// ---- every CPU at once ----------------------------------------------------

/// Rounds each CPU runs on its share of the frames.
const ROUNDS_PER_CPU: usize = 50;

/// The frames of the concurrent test, one share per CPU (in a static, off
/// the workers' stacks).
static SHARES: [spin::Mutex<Option<Owned>>; percpu::MAX_CPUS] =
    [const { spin::Mutex::new(None) }; percpu::MAX_CPUS];
/// CPUs taking part.
static WORKERS: AtomicU64 = AtomicU64::new(0);
/// The large pages every CPU marks at once, one per race round (the
/// first `RACE_COUNT` of them), and how many CPUs are ready to start.
static RACE_PAGES: [AtomicU64; RACE_ROUNDS] = [const { AtomicU64::new(0) }; RACE_ROUNDS];
static RACE_COUNT: AtomicU64 = AtomicU64::new(0);
static READY: AtomicU64 = AtomicU64::new(0);
/// Splits the CPUs' marks of each race round's page made, summed (each
/// must be 1).
static RACE_SPLITS: [AtomicU64; RACE_ROUNDS] = [const { AtomicU64::new(0) }; RACE_ROUNDS];

/// Race rounds: still-large 2 MiB pages of the direct map that every CPU
/// marks at once (each round splits one for good: a pool frame).
const RACE_ROUNDS: usize = 24;
/// The first rounds run free (whether a CPU's lockless check sees the
/// page whole before another CPU's split is up to timing); in the rest
/// CPU 0 splits under the split lock once the others wait for it.
const RACE_FREE: usize = 12;
/// Split races counted by the end of the free rounds.
static FREE_RACES: AtomicU64 = AtomicU64::new(0);
/// Pages each CPU marks in a race round (CPU `c` from page `37 c`: the
/// ranges of neighbouring CPUs overlap).
const RACE_PAGES_PER_CPU: u64 = 48;

/// A worker pinned to CPU `cpu`: random rounds on its own frames (disjoint
/// from every other CPU's), then the race rounds: all CPUs start together
/// and mark overlapping ranges of the same still-large page (the lockless
/// check finds a split to make; the first CPU under the lock splits, the
/// others' re-check finds the table), read every page of their range
/// through the direct map while the others split and mark (a hole would
/// be a fatal fault), and unmark it (lockless now: 4 KiB leaves). In the
/// rounds after [`RACE_FREE`] CPU 0 makes its change holding the split
/// lock until the others wait for it, so the race happens on every boot,
/// however the host schedules the CPUs. Returns 0 or a failure code.
fn worker(cpu: u64) -> u64 {
    let n = WORKERS.load(Ordering::Acquire);
    let share = SHARES[cpu as usize % percpu::MAX_CPUS].lock();
    let Some(mine) = share.as_ref() else {
        READY.fetch_add(RACE_ROUNDS as u64 + 1, Ordering::AcqRel);
        return 1;
    };
    let mut rng = Rng((crate::platform::rdtsc() ^ (cpu << 32)) | 1);
    for _ in 0..ROUNDS_PER_CPU {
        if let Err(e) = round(&mut rng, mine) {
            log::error!("cpa on cpu {cpu}: {e}");
            READY.fetch_add(RACE_ROUNDS as u64 + 1, Ordering::AcqRel);
            return 2;
        }
    }
    let rounds = RACE_COUNT.load(Ordering::Acquire) as usize;
    let mut code = 0;
    for (r, page) in RACE_PAGES.iter().enumerate() {
        let line = n * (r as u64 + 1);
        // CPU 0 holds the split lock in this round (below): it waits for
        // the others at the line first, and lets them go only once it
        // holds the lock, so none of them can take it first.
        let holder = cpu == 0 && r >= RACE_FREE && r < rounds && n > 1 && code == 0;
        if holder {
            while READY.load(Ordering::Acquire) + 1 < line {
                core::hint::spin_loop();
            }
        } else {
            // Everyone at the line (a failed CPU still arrives at every
            // line).
            READY.fetch_add(1, Ordering::AcqRel);
            while READY.load(Ordering::Acquire) < line {
                core::hint::spin_loop();
            }
        }
        if r == RACE_FREE && cpu == 0 {
            // Every other CPU at the line: no call in flight.
            FREE_RACES.store(kspace::cpa_fast_counts().1, Ordering::Release);
        }
        if r >= rounds || code != 0 {
            continue;
        }
        let base = page.load(Ordering::Acquire);
        let va = base + (cpu * 37 % (512 - RACE_PAGES_PER_CPU)) * 4096;
        let len = RACE_PAGES_PER_CPU * 4096;
        let bit = CPA_TEST_BIT;
        let first = if holder {
            // CPU 0 splits under the split lock once every other CPU's
            // lockless check has found the page whole and waits for it
            // (or after 2 s): their re-checks find it split.
            let arrived = core::cell::Cell::new(false);
            let arrive = || {
                if !arrived.replace(true) {
                    READY.fetch_add(1, Ordering::AcqRel);
                }
            };
            let deadline = crate::clock::now_ns() + 2_000_000_000;
            let done = kspace::change_page_attr_holding(va, len, bit, Flags::empty(), || {
                arrive();
                kspace::split_waiters() + 1 >= n || crate::clock::now_ns() > deadline
            });
            // Refused before the lock was held: the others still go.
            arrive();
            done
        } else {
            kspace::change_page_attr(va, len, bit, Flags::empty())
        };
        let marked = first.and_then(|done| {
            RACE_SPLITS[r].fetch_add(u64::from(done.splits), Ordering::AcqRel);
            for k in 0..RACE_PAGES_PER_CPU {
                // SAFETY: a RAM page of the direct map, mapped (the
                // page is still large, or split into a complete table):
                // reading it changes nothing.
                unsafe { core::ptr::read_volatile((va + k * 4096) as *const u64) };
            }
            kspace::change_page_attr(va, len, Flags::empty(), bit)
        });
        if let Err(e) = marked {
            log::error!("cpa marker on cpu {cpu} at {va:#x}: {e:?}");
            code = 3;
        }
    }
    READY.fetch_add(1, Ordering::AcqRel);
    code
}

/// 2 MiB pages of the direct map still mapped whole (natively, without
/// DEBUG_PAGEALLOC) and holding none of `owned` (whose rounds would split
/// them first), for the CPUs to split at once: into `out`, how many.
fn unsplit_large_pages(kernel: &Kernel, owned: &Owned, out: &mut [u64]) -> usize {
    let Some(dm) = kernel.direct_map.as_ref() else {
        return 0;
    };
    let base = crate::directmap::DIRECT_MAP_BASE;
    let mut found = 0;
    for r in dm.mem.ram() {
        let mut va = DirectMem::va(r.start).next_multiple_of(1 << 21);
        while va + (1 << 21) <= DirectMem::va(r.end) && found < out.len() {
            let first = (va - base) / 4096;
            let holds_owned = owned.frames[..owned.n]
                .iter()
                .any(|&f| (first..first + 512).contains(&f));
            if let Ok(t) = kspace::translate(va) {
                if t.granule == pvmmu::Granule::Size2MiB && !holds_owned {
                    out[found] = va;
                    found += 1;
                }
            }
            va += 1 << 21;
        }
    }
    found
}

fn every_cpu_at_once(kernel: &mut Kernel) -> TestResult {
    let n = percpu::online_count();
    let owned = Owned::take(kernel)?;
    let mut pages = [0u64; RACE_ROUNDS];
    let races = unsplit_large_pages(kernel, &owned, &mut pages);
    for (r, split) in RACE_SPLITS.iter().enumerate() {
        split.store(0, Ordering::Release);
        RACE_PAGES[r].store(pages[r], Ordering::Release);
    }
    RACE_COUNT.store(races as u64, Ordering::Release);
    let (fast0, races0) = kspace::cpa_fast_counts();
    let per = owned.n / n;
    for (cpu, share) in SHARES.iter().enumerate().take(n) {
        *share.lock() = Some(Owned::share(&owned, cpu * per, (cpu + 1) * per));
    }
    WORKERS.store(n as u64, Ordering::Release);
    READY.store(0, Ordering::Release);
    let before = kspace::cpa_stats().unwrap_or_default();
    let t0 = crate::clock::now_ns();
    let mut threads = [None; percpu::MAX_CPUS];
    for (cpu, t) in threads.iter_mut().enumerate().take(n) {
        // The largest stack: a CPA call under PV is deep (the backend's
        // batch, the undo log); 16 KiB overflowed.
        let pages = crate::kspace::MAX_STACK_PAGES;
        *t = sched::spawn_on_with_stack(cpu, "cpa-worker", worker, cpu as u64, pages).ok();
    }
    let mut result = Ok(());
    for (cpu, t) in threads.iter().enumerate().take(n) {
        let code = match t {
            Some(t) => sched::join(*t).unwrap_or(u64::MAX),
            None => u64::MAX,
        };
        if code != 0 && result.is_ok() {
            log::error!("cpa worker on cpu {cpu}: code {code}");
            result = Err(Failure::Check("a CPU's CPA rounds failed"));
        }
    }
    let after = kspace::cpa_stats().unwrap_or_default();
    // Before the frames go back (under DEBUG_PAGEALLOC each free is a
    // lockless call).
    let (fast1, races1) = kspace::cpa_fast_counts();
    for share in &SHARES {
        *share.lock() = None;
    }
    // Every frame back to writable, NX, its own frame.
    let mut i = 0;
    while result.is_ok() && i < owned.n {
        result = walk_check(owned.frames[i], 1, Some(RW));
        i += 1;
    }
    owned.give_back(kernel);
    let free = FREE_RACES.load(Ordering::Acquire).max(races0);
    log::info!(
        "cpa on {n} CPUs at once: {} calls ({} lockless), {} splits in {} ms; \
         {races} large pages raced for, split races {} in {RACE_FREE} free rounds + {} \
         with the split lock held, exchanges lost {}, joined {}",
        after.calls - before.calls,
        fast1 - fast0,
        after.splits - before.splits,
        (crate::clock::now_ns() - t0) / 1_000_000,
        free - races0,
        races1 - free,
        after.lost - before.lost,
        after.joined - before.joined,
    );
    result?;
    check(
        threads.iter().take(n).all(Option::is_some),
        "a worker on every CPU",
    )?;
    for (r, &base) in pages.iter().enumerate().take(races) {
        // Split once, by whichever CPU came first (the others found the
        // table): one table, every page at its own frame, no mark left.
        check_eq(
            "splits of the large page every CPU marked",
            RACE_SPLITS[r].load(Ordering::Acquire),
            1,
        )?;
        for k in 0..512 {
            let t = kspace::translate(base + k * 4096)
                .map_err(|_| Failure::Check("page of the shared large page unmapped"))?;
            check(
                t.granule == pvmmu::Granule::Size4KiB,
                "the shared large page was split",
            )?;
            check(!t.flags.contains(CPA_TEST_BIT), "marks cleared")?;
            check_eq(
                "frame of the shared large page",
                t.pfn.0,
                (base - crate::directmap::DIRECT_MAP_BASE) / 4096 + k,
            )?;
        }
    }
    Ok(())
}

fn random_ranges(kernel: &mut Kernel) -> TestResult {
    let pv = kernel.pv.is_some();
    let owned = Owned::take(kernel)?;
    let seed = crate::platform::rdtsc() | 1;
    log::info!("cpa test: seed {seed:#x}, {ROUNDS} ranges");
    let mut rng = Rng(seed);
    let before = kspace::cpa_stats().unwrap_or_default();
    let mut result = Ok(());
    for _ in 0..ROUNDS {
        result = round(&mut rng, &owned);
        if result.is_err() {
            break;
        }
    }
    // Everything restored: every owned page writable, NX, its own frame.
    let mut i = 0;
    while result.is_ok() && i < owned.n {
        result = walk_check(owned.frames[i], 1, Some(RW));
        i += 1;
    }
    let after = kspace::cpa_stats().unwrap_or_default();
    log::info!(
        "cpa test: {} calls, {} splits, {} full / {} page-range flushes, {} faults verified",
        after.calls - before.calls,
        after.splits - before.splits,
        after.flush_all - before.flush_all,
        after.flush_pages - before.flush_pages,
        faults_verified()
    );
    owned.give_back(kernel);
    result?;
    // Under DEBUG_PAGEALLOC the direct map is 4 KiB already.
    if !pv && !kernel.options.only_4k && !crate::pagealloc::enabled() {
        check(after.splits > before.splits, "large pages were split")?;
    }
    Ok(())
}

fn refusals(kernel: &mut Kernel) -> TestResult {
    let pv = kernel.pv.is_some();
    let owned = Owned::take(kernel)?;
    let r = refusals_on(kernel, &owned, pv);
    owned.give_back(kernel);
    r
}

fn refused(r: Result<pvmmu::space::CpaDone, KspaceError>, want: Error) -> TestResult {
    match r {
        Err(KspaceError::Map(e)) if e == want => Ok(()),
        Err(e) => {
            log::error!("cpa refusal: got {e:?}, expected {want:?}");
            Err(Failure::Check("CPA refused with the wrong error"))
        }
        Ok(_) => {
            log::error!("cpa accepted a change it must refuse with {want:?}");
            Err(Failure::Check("CPA accepted a change it must refuse"))
        }
    }
}

fn refusals_on(kernel: &Kernel, owned: &Owned, pv: bool) -> TestResult {
    let pfn = owned.frames[0];
    let va = DirectMem::va(Pfn(pfn));
    // Writable and executable: never.
    refused(
        kspace::change_page_attr(va, 4096, Flags::empty(), Flags::NO_EXECUTE),
        Error::WriteExecute,
    )?;
    // Flags CPA does not change.
    refused(
        kspace::change_page_attr(va, 4096, Flags::USER_ACCESSIBLE, Flags::empty()),
        Error::CpaFlags,
    )?;
    walk_check(pfn, 1, Some(RW))?;
    // The static protections: text and rodata never writable (the direct
    // map's alias included), executed text stays executable.
    let img = kernel.image;
    // `set` on the page at `va` (mapping `pfn`) refused for `region`.
    let protected = |va: u64, pfn: Pfn, set: Flags, region: Protected| {
        refused(
            kspace::change_page_attr(va, 4096, set, Flags::empty()),
            Error::StaticProtection { va, pfn, region },
        )
    };
    let rw = Flags::WRITABLE | Flags::NO_EXECUTE;
    let text_pfn = Pfn(img.text.to_phys().0 >> 12);
    protected(DirectMem::va(text_pfn), text_pfn, rw, Protected::KernelText)?;
    let text_va = img.text.start & !0xfff;
    protected(text_va, text_pfn, Flags::NO_EXECUTE, Protected::KernelText)?;
    let ro_pfn = Pfn(img.rodata.to_phys().0.div_ceil(4096));
    protected(DirectMem::va(ro_pfn), ro_pfn, rw, Protected::KernelRodata)?;
    if pv {
        // A page Xen shares (start_info), and a frame that is Xen's own
        // (the shared-info page in the fixmap): untouched.
        let si = kernel
            .pv
            .as_ref()
            .and_then(|p| crate::xen_pv::PvBoot::va_to_pfn(p.start_info_va))
            .ok_or(Failure::Check("start_info frame"))?;
        protected(
            DirectMem::va(Pfn(si)),
            Pfn(si),
            CPA_TEST_BIT,
            Protected::HypervisorShared,
        )?;
        let shared = kspace::Fixmap::SharedInfo.va();
        match kspace::change_page_attr(shared, 4096, CPA_TEST_BIT, Flags::empty()) {
            Err(KspaceError::Map(Error::ForeignFrame(_))) => {}
            other => {
                log::error!("cpa of Xen's shared-info page: {other:?}");
                return Err(Failure::Check("CPA changed a frame of Xen's"));
            }
        }
        // The live root's direct-map alias made writable: refused by
        // pvmmu, Xen not asked.
        let root = kernel
            .direct_map
            .as_ref()
            .map(|d| d.root)
            .ok_or(Failure::Check("no direct map"))?;
        let root_va = DirectMem::va(root);
        // MMU requests only: the tick and event delivery make other
        // hypercalls meanwhile.
        let mmu = || {
            let st = hypercall::mmu::issued_stats();
            st.mmu_update_entries + st.mmuext_ops + st.update_va_mappings
        };
        let calls = mmu();
        refused(
            kspace::change_page_attr(root_va, 4096, Flags::WRITABLE, Flags::empty()),
            Error::PageTableFrame {
                va: root_va,
                pfn: root,
            },
        )?;
        check_eq("MMU requests for a refused change", mmu() - calls, 0)?;
        check(
            !kspace::translate(root_va)
                .map_err(|_| Failure::Check("root alias unmapped"))?
                .flags
                .contains(Flags::WRITABLE),
            "root alias still read-only",
        )?;
        refused(
            kspace::change_page_attr(
                0xffff_8000_0000_0000,
                4096,
                Flags::NO_EXECUTE,
                Flags::empty(),
            ),
            Error::XenHole,
        )?;
        // p needs the frame a PV hole no longer holds.
        refused(
            kspace::change_page_attr(va, 4096, Flags::PRESENT, Flags::empty()),
            Error::Flags(FlagError::NotPresent),
        )?;
        walk_check(pfn, 1, Some(RW))?;
    }
    Ok(())
}

/// The software test bit of `va`'s page, `None` when not mapped.
fn marked(va: u64) -> Option<bool> {
    kspace::translate(va)
        .ok()
        .map(|t| t.flags.contains(CPA_TEST_BIT))
}

fn marker_ranges(kernel: &mut Kernel) -> TestResult {
    let ram = match &kernel.direct_map {
        Some(dm) => dm.mem,
        None => return Err(Failure::Check("no direct map")),
    };
    let ranges = ram.ram();
    let seed = crate::platform::rdtsc() | 1;
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let before = kspace::cpa_stats().unwrap_or_default();
    let bit = CPA_TEST_BIT;
    let mut rounds = 0;
    let mut tries = 0;
    while rounds < MARKER_ROUNDS {
        tries += 1;
        check(
            tries < 100 * MARKER_ROUNDS,
            "mapped direct-map ranges to mark",
        )?;
        let r = ranges[rng.range(0, ranges.len() as u64 - 1) as usize];
        let (start, end) = (r.start.0, r.end.0);
        let mut pages = rng.range(1, MAX_PAGES.min(end - start));
        let first = rng.range(start, end - pages);
        if crate::pagealloc::enabled() {
            // Free frames are out of the direct map: mark only the mapped
            // pages at the start of the range.
            let mapped = (0..pages)
                .take_while(|&k| marked(DirectMem::va(Pfn(first + k))).is_some())
                .count() as u64;
            if mapped == 0 {
                continue;
            }
            pages = mapped;
        }
        rounds += 1;
        let va = DirectMem::va(Pfn(first));
        let len = pages * 4096;
        match kspace::change_page_attr(va, len, bit, Flags::empty()) {
            Ok(_) => {}
            // A page Xen shares with the kernel: CPA keeps it untouched.
            Err(KspaceError::Map(Error::StaticProtection {
                region: Protected::HypervisorShared,
                ..
            })) => {
                rounds -= 1;
                continue;
            }
            Err(_) => return Err(Failure::Check("marking a direct-map range refused")),
        }
        for k in 0..pages {
            check(
                marked(va + k * 4096) == Some(true),
                "page of the range marked",
            )?;
        }
        check(
            marked(va - 4096) != Some(true),
            "page before the range unmarked",
        )?;
        check(
            marked(va + len) != Some(true),
            "page after the range unmarked",
        )?;
        kspace::change_page_attr(va, len, Flags::empty(), bit)
            .map_err(|_| Failure::Check("unmarking a direct-map range refused"))?;
        for k in 0..pages {
            let t = kspace::translate(va + k * 4096)
                .map_err(|_| Failure::Check("page of the range unmapped"))?;
            check(!t.flags.contains(bit), "page of the range unmarked")?;
            check_eq("frame kept", t.pfn.0, first + k)?;
        }
    }
    let after = kspace::cpa_stats().unwrap_or_default();
    log::info!(
        "cpa marker test: {} ranges, {} splits",
        MARKER_ROUNDS,
        after.splits - before.splits
    );
    Ok(())
}

/// A page of the image's `.bss`, for the alias test (nothing else uses it).
#[repr(C, align(4096))]
struct AliasPage([u64; 512]);
static mut ALIAS_PAGE: AliasPage = AliasPage([0; 512]);

/// A frame of the image's data is mapped at its image address and in the
/// direct map: read-only through one makes it read-only through the other
/// (a write through either faults), and writable again through the other
/// restores both.
fn image_data_alias_follows(_kernel: &mut Kernel) -> TestResult {
    let img = core::ptr::addr_of!(ALIAS_PAGE) as u64;
    let dm = DirectMem::va(Pfn((img - crate::boot::KERNEL_VMA) >> 12));
    let before = kspace::alias_changes();
    let writes = |value: u64| -> TestResult {
        for va in [img + 8, dm + 16] {
            // SAFETY: the test's own page of .bss (both addresses).
            unsafe { probe_write(va, value) }
                .map_err(|_| Failure::Check("write to the alias page faulted"))?;
        }
        Ok(())
    };
    writes(1)?;
    cpa(img, 1, Flags::empty(), Flags::WRITABLE)?;
    for va in [img + 8, dm + 16] {
        // SAFETY: as above; read-only now, the write faults.
        expect_fault(unsafe { probe_write(va, 2) }, va, pf::PRESENT | pf::WRITE)?;
        // SAFETY: reading the page has no side effect.
        check_eq(
            "the value through either alias",
            unsafe { probe_read(va) }
                .map_err(|_| Failure::Check("read of the alias page faulted"))?,
            1,
        )?;
    }
    cpa(dm, 1, Flags::WRITABLE, Flags::empty())?;
    writes(3)?;
    check_eq(
        "changes carried to an alias",
        kspace::alias_changes() - before,
        2,
    )
}
