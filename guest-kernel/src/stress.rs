//! Randomized stress of pvmmu on the live tree: seeded map / unmap /
//! protect / translate calls and lazy batches of them over 256 MiB of the
//! test area, under real Xen (every write a hypercall Xen may refuse) and
//! natively.
//!
//! The seed is printed (`STRESS seed ...`) and `pvmmu.seed=<n>` replays it;
//! `pvmmu.stress_ops=<n>` sets the number of operations (default
//! [`DEFAULT_OPS`]).
//!
//! Invariant: every step is checked against a reference map kept here (one
//! entry per page of the window: frame and flags, or unmapped) — the call's
//! result (`Ok`, or exactly the `AlreadyMapped` / `NotMapped` error at the
//! first page the reference says), then a translation of every page it
//! touched, and for writable pages a store through the new mapping read back
//! through the direct map, and for pages just unmapped a read that must
//! fault (so a missing TLB flush shows). Every
//! [`CHECK_EVERY`] operations the whole window is compared page by page and
//! pvmmu's invariant walker runs over the whole live tree. The first
//! disagreement stops the run and fails the test, with the seed and the step.

use core::sync::atomic::{AtomicU64, Ordering};

use pvmmu::entry::Flags;
use pvmmu::{Error, Granule, Pfn, PAGE_SIZE};

use crate::directmap::DirectMem;
use crate::pvmmu_tests::{
    check_invariants, failed, give, live, pattern, read, take, write, Cx, LiveBackend, TEST_AREA,
};
use crate::selftest::{Failure, TestResult};
use crate::traps::probe_read;
use crate::Kernel;

/// Pages of the window: 256 MiB of virtual space (128 L1 tables).
pub const WINDOW_PAGES: usize = 64 * 1024;
/// Data frames the mappings point into (borrowed for the run).
const POOL: u64 = 256;
/// Operations when `pvmmu.stress_ops` is not given.
pub const DEFAULT_OPS: u64 = 200_000;
/// Operations between two full checks (window sweep and invariant walker).
pub const CHECK_EVERY: u64 = 50_000;
/// Longest run of pages one call covers.
const MAX_RUN: u64 = 16;
/// Runs remembered as targets for unmap and protect.
const RECENT: usize = 64;

const PAGE: u64 = PAGE_SIZE;
const P: Flags = Flags::PRESENT;
const RW: Flags = Flags::WRITABLE;
const NX: Flags = Flags::NO_EXECUTE;

/// Reference entry: 0 unmapped; else bits 0..=9 the pool frame + 1, bit 14
/// writable, bit 15 no-execute.
type RefEntry = u16;
const REF_RW: u16 = 1 << 14;
const REF_NX: u16 = 1 << 15;
const REF_FRAME: u16 = 0x3ff;

static REFERENCE: spin::Mutex<[RefEntry; WINDOW_PAGES]> = spin::Mutex::new([0; WINDOW_PAGES]);

/// The seed of this boot's run (set before it starts).
static SEED: AtomicU64 = AtomicU64::new(0);
/// Operations asked for.
static WANTED: AtomicU64 = AtomicU64::new(DEFAULT_OPS);
/// Figures of the last run, for the report.
static OPS: AtomicU64 = AtomicU64::new(0);
static MISMATCHES: AtomicU64 = AtomicU64::new(0);

/// `(random_ops, random_mismatches, random_seed)` of this boot, for the
/// report (all 0 if the stress did not run).
pub fn figures() -> (u64, u64, u64) {
    (
        OPS.load(Ordering::Relaxed),
        MISMATCHES.load(Ordering::Relaxed),
        SEED.load(Ordering::Relaxed),
    )
}

/// The self-test: picks the seed, prints it, runs [`body`] on the live
/// tree under the usual harness (which then checks the area is empty, the
/// frames are back and the invariants hold).
pub fn test(kernel: &mut Kernel) -> TestResult {
    let seed = kernel
        .options
        .seed
        .unwrap_or_else(|| splitmix(crate::platform::rdtsc()));
    SEED.store(seed, Ordering::Relaxed);
    WANTED.store(
        kernel.options.stress_ops.unwrap_or(DEFAULT_OPS),
        Ordering::Relaxed,
    );
    crate::kprintln!("STRESS seed {seed:#x} (replay with pvmmu.seed={seed:#x})");
    live(kernel, body, body)
}

/// One round of SplitMix64 (turns a TSC value into a well-mixed seed).
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0; the bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Counts per operation kind.
#[derive(Default)]
struct Counts {
    map: u64,
    unmap: u64,
    protect: u64,
    translate: u64,
    batches: u64,
    refused: u64,
    sweeps: u64,
}

impl Counts {
    fn ops(&self) -> u64 {
        self.map + self.unmap + self.protect + self.translate
    }
}

/// The run's state.
struct Stress<'r> {
    rng: Rng,
    pool: Pfn,
    reference: &'r mut [RefEntry; WINDOW_PAGES],
    recent: [(u64, u64); RECENT],
    counts: Counts,
    /// A store counter making each written value distinct.
    stores: u64,
}

fn va_of(slot: u64) -> u64 {
    TEST_AREA + slot * PAGE
}

fn encode(frame: u64, flags: Flags) -> RefEntry {
    let mut e = (frame as u16 + 1) & REF_FRAME;
    if flags.contains(RW) {
        e |= REF_RW;
    }
    if flags.contains(NX) {
        e |= REF_NX;
    }
    e
}

/// A mismatch: logged with the step and the seed, counted, and the run
/// stops.
fn mismatch(step: u64, what: &'static str) -> Failure {
    MISMATCHES.fetch_add(1, Ordering::Relaxed);
    log::error!(
        "stress: mismatch at operation {step} (seed {:#x}): {what}",
        SEED.load(Ordering::Relaxed)
    );
    Failure::Check(what)
}

impl Stress<'_> {
    fn step(&self) -> u64 {
        self.counts.ops()
    }

    /// A random valid leaf flag set (never writable and executable).
    fn flags(&mut self) -> Flags {
        match self.rng.below(3) {
            0 => P | RW | NX,
            1 => P | NX,
            _ => P,
        }
    }

    /// A run `(slot, pages)` anywhere in the window; one in eight starts
    /// just below a 2 MiB or 1 GiB boundary so runs cross tables.
    fn any_run(&mut self) -> (u64, u64) {
        let n = 1 + self.rng.below(MAX_RUN);
        let slot = match self.rng.below(8) {
            0 => {
                let boundary = 512 * (1 + self.rng.below(WINDOW_PAGES as u64 / 512 - 1));
                boundary - 1 - self.rng.below(n)
            }
            _ => self.rng.below(WINDOW_PAGES as u64 - n),
        };
        (slot, n)
    }

    /// A run that was mapped recently (part of it, most of the time), or
    /// one anywhere (which then mostly exercises the error paths).
    fn target_run(&mut self) -> (u64, u64) {
        if self.rng.below(4) == 0 {
            return self.any_run();
        }
        let (slot, n) = self.recent[self.rng.below(RECENT as u64) as usize];
        if n == 0 {
            return self.any_run();
        }
        let skip = self.rng.below(n);
        let len = 1 + self.rng.below(n - skip);
        (slot + skip, len)
    }

    fn first(&self, slot: u64, n: u64, mapped: bool) -> Option<u64> {
        (slot..slot + n).find(|&s| (self.reference[s as usize] != 0) == mapped)
    }

    /// Checks one page against the reference.
    fn verify_page<B: LiveBackend>(&self, cx: &Cx<'_, B>, slot: u64) -> TestResult {
        let step = self.step();
        let va = va_of(slot);
        let want = self.reference[slot as usize];
        match (want, cx.space.lookup(va)) {
            (0, Err(Error::NotMapped { va: at })) if at == va => Ok(()),
            (0, _) => Err(mismatch(
                step,
                "a page the reference has unmapped translates",
            )),
            (_, Ok(t)) => {
                let frame = u64::from(want & REF_FRAME) - 1;
                let flags_ok = t.flags.contains(P)
                    && t.flags.contains(RW) == (want & REF_RW != 0)
                    && t.flags.contains(NX) == (want & REF_NX != 0);
                if t.pfn.0 != self.pool.0 + frame || t.granule != Granule::Size4KiB {
                    Err(mismatch(step, "a page translates to the wrong frame"))
                } else if !flags_ok {
                    Err(mismatch(step, "a page translates with the wrong flags"))
                } else {
                    Ok(())
                }
            }
            (_, Err(_)) => Err(mismatch(
                step,
                "a page the reference has mapped does not translate",
            )),
        }
    }

    fn verify_run<B: LiveBackend>(&self, cx: &Cx<'_, B>, slot: u64, n: u64) -> TestResult {
        (slot..slot + n).try_for_each(|s| self.verify_page(cx, s))
    }

    /// Stores through the mapping of a writable page and reads the word back
    /// through the direct map (the frame the reference names).
    fn store_and_read_back(&mut self, slot: u64) -> TestResult {
        let want = self.reference[slot as usize];
        if want & REF_RW == 0 {
            return Ok(());
        }
        let frame = Pfn(self.pool.0 + u64::from(want & REF_FRAME) - 1);
        self.stores += 1;
        let value = pattern(frame, slot & 511, self.stores);
        // SAFETY: the page maps a frame of the run borrowed for the stress
        // (the reference says so and `verify_page` just confirmed it).
        unsafe { write("stress: store through the mapping", va_of(slot), value) }
            .map_err(|_| mismatch(self.step(), "store through a writable mapping faulted"))?;
        let seen = read("stress: read through the direct map", DirectMem::va(frame))?;
        if seen != value {
            return Err(mismatch(
                self.step(),
                "store not seen through the direct map",
            ));
        }
        Ok(())
    }

    /// A read of an unmapped page must fault (a stale TLB entry would let
    /// it through: the unmap's flush is checked here).
    fn read_faults(&self, slot: u64) -> TestResult {
        // SAFETY: the window maps only frames of the borrowed run (RAM), so
        // a read has no side effect whatever the TLB holds.
        match unsafe { probe_read(va_of(slot)) } {
            Err(_) => Ok(()),
            Ok(_) => Err(mismatch(
                self.step(),
                "a read of an unmapped page did not fault",
            )),
        }
    }

    fn remember(&mut self, slot: u64, n: u64) {
        let i = self.rng.below(RECENT as u64) as usize;
        self.recent[i] = (slot, n);
    }

    fn map<B: LiveBackend>(&mut self, cx: &mut Cx<'_, B>) -> TestResult {
        let (slot, n) = self.any_run();
        let frame = self.rng.below(POOL - n + 1);
        let flags = self.flags();
        self.counts.map += 1;
        let got = cx
            .space
            .map(va_of(slot), Pfn(self.pool.0 + frame), n * PAGE, flags);
        match (self.first(slot, n, true), got) {
            (None, Ok(flush)) => {
                cx.space.flush(flush).map_err(failed("stress: flush"))?;
                for k in 0..n {
                    self.reference[(slot + k) as usize] = encode(frame + k, flags);
                }
                self.remember(slot, n);
                self.verify_run(cx, slot, n)?;
                let page = slot + self.rng.below(n);
                self.store_and_read_back(page)
            }
            (Some(at), Err(Error::AlreadyMapped { va })) if va == va_of(at) => {
                self.counts.refused += 1;
                self.verify_run(cx, slot, n)
            }
            (None, Err(e)) => Err(failed("stress: map refused")(e)),
            _ => Err(mismatch(
                self.step(),
                "map: result differs from the reference",
            )),
        }
    }

    fn unmap<B: LiveBackend>(&mut self, cx: &mut Cx<'_, B>) -> TestResult {
        let (slot, n) = self.target_run();
        self.counts.unmap += 1;
        let got = cx.space.unmap(va_of(slot), n * PAGE);
        match (self.first(slot, n, false), got) {
            (None, Ok(flush)) => {
                cx.space.flush(flush).map_err(failed("stress: flush"))?;
                self.reference[slot as usize..(slot + n) as usize].fill(0);
                self.verify_run(cx, slot, n)?;
                let page = slot + self.rng.below(n);
                self.read_faults(page)
            }
            (Some(at), Err(Error::NotMapped { va })) if va == va_of(at) => {
                self.counts.refused += 1;
                self.verify_run(cx, slot, n)
            }
            (None, Err(e)) => Err(failed("stress: unmap refused")(e)),
            _ => Err(mismatch(
                self.step(),
                "unmap: result differs from the reference",
            )),
        }
    }

    fn protect<B: LiveBackend>(&mut self, cx: &mut Cx<'_, B>) -> TestResult {
        let (slot, n) = self.target_run();
        let flags = self.flags();
        self.counts.protect += 1;
        let got = cx.space.protect(va_of(slot), n * PAGE, flags, false);
        match (self.first(slot, n, false), got) {
            (None, Ok(flush)) => {
                cx.space.flush(flush).map_err(failed("stress: flush"))?;
                for s in slot..slot + n {
                    let frame = u64::from(self.reference[s as usize] & REF_FRAME) - 1;
                    self.reference[s as usize] = encode(frame, flags);
                }
                self.verify_run(cx, slot, n)?;
                let page = slot + self.rng.below(n);
                self.store_and_read_back(page)
            }
            (Some(at), Err(Error::NotMapped { va })) if va == va_of(at) => {
                self.counts.refused += 1;
                self.verify_run(cx, slot, n)
            }
            (None, Err(e)) => Err(failed("stress: protect refused")(e)),
            _ => Err(mismatch(
                self.step(),
                "protect: result differs from the reference",
            )),
        }
    }

    fn translate<B: LiveBackend>(&mut self, cx: &mut Cx<'_, B>) -> TestResult {
        for _ in 0..1 + self.rng.below(4) {
            let slot = match self.rng.below(2) {
                0 => self.target_run().0,
                _ => self.rng.below(WINDOW_PAGES as u64),
            };
            self.counts.translate += 1;
            self.verify_page(cx, slot)?;
        }
        Ok(())
    }

    /// A lazy batch of maps and unmaps the reference says will succeed, one
    /// translation inside it (which must see the queued writes), then every
    /// touched run checked after the batch ends.
    fn batch<B: LiveBackend>(&mut self, cx: &mut Cx<'_, B>) -> TestResult {
        let mut touched = [(0u64, 0u64); 16];
        let mut n_touched = 0;
        let mut batch = cx.space.lazy();
        for _ in 0..2 + self.rng.below(15) {
            let (slot, n) = if self.rng.below(2) == 0 {
                self.any_run()
            } else {
                self.target_run()
            };
            if self.first(slot, n, true).is_none() {
                let frame = self.rng.below(POOL - n + 1);
                let flags = self.flags();
                self.counts.map += 1;
                batch
                    .map(va_of(slot), Pfn(self.pool.0 + frame), n * PAGE, flags)
                    .map_err(failed("stress: map in a batch"))?
                    .ignore(); // not-present before: nothing cached to flush
                for k in 0..n {
                    self.reference[(slot + k) as usize] = encode(frame + k, flags);
                }
                self.remember(slot, n);
            } else if self.first(slot, n, false).is_none() {
                self.counts.unmap += 1;
                let flush = batch
                    .unmap(va_of(slot), n * PAGE)
                    .map_err(failed("stress: unmap in a batch"))?;
                batch
                    .flush(flush)
                    .map_err(failed("stress: flush in a batch"))?;
                self.reference[slot as usize..(slot + n) as usize].fill(0);
            } else {
                continue;
            }
            touched[n_touched] = (slot, n);
            n_touched += 1;
        }
        if n_touched > 0 {
            let (slot, n) = touched[self.rng.below(n_touched as u64) as usize];
            self.counts.translate += 1;
            let probe = slot + self.rng.below(n);
            let want = self.reference[probe as usize];
            let seen = batch.lookup(va_of(probe));
            let ok = match (want, seen) {
                (0, Err(Error::NotMapped { .. })) => true,
                (0, _) | (_, Err(_)) => false,
                (w, Ok(t)) => t.pfn.0 == self.pool.0 + u64::from(w & REF_FRAME) - 1,
            };
            if !ok {
                return Err(mismatch(
                    self.step(),
                    "a translation inside a batch missed its queued write",
                ));
            }
        }
        batch.finish().map_err(failed("stress: end of a batch"))?;
        self.counts.batches += 1;
        for &(slot, n) in &touched[..n_touched] {
            self.verify_run(cx, slot, n)?;
            let page = slot + self.rng.below(n);
            if self.reference[page as usize] == 0 {
                self.read_faults(page)?;
            } else {
                self.store_and_read_back(page)?;
            }
        }
        Ok(())
    }

    /// The whole window against the reference, and the invariant walker.
    fn sweep<B: LiveBackend>(&mut self, cx: &mut Cx<'_, B>) -> TestResult {
        self.counts.sweeps += 1;
        self.verify_run(cx, 0, WINDOW_PAGES as u64)?;
        let violations = check_invariants(cx, &mut |v| {
            log::error!("stress: invariant violation: {v:?}");
        })?;
        if violations != 0 {
            return Err(mismatch(
                self.step(),
                "the invariant walker found violations",
            ));
        }
        Ok(())
    }

    fn run<B: LiveBackend>(&mut self, cx: &mut Cx<'_, B>, wanted: u64) -> TestResult {
        let mut next_sweep = CHECK_EVERY;
        while self.counts.ops() < wanted {
            match self.rng.below(20) {
                0..=5 => self.map(cx)?,
                6..=10 => self.unmap(cx)?,
                11..=14 => self.protect(cx)?,
                15..=17 => self.translate(cx)?,
                _ => self.batch(cx)?,
            }
            if self.counts.ops() >= next_sweep {
                self.sweep(cx)?;
                next_sweep += CHECK_EVERY;
            }
        }
        self.sweep(cx)
    }

    /// Unmaps whatever the reference still has mapped, run by run.
    fn unmap_all<B: LiveBackend>(&mut self, cx: &mut Cx<'_, B>) -> TestResult {
        let mut slot = 0;
        while slot < WINDOW_PAGES {
            if self.reference[slot] == 0 {
                slot += 1;
                continue;
            }
            let end = (slot..WINDOW_PAGES)
                .find(|&s| self.reference[s] == 0)
                .unwrap_or(WINDOW_PAGES);
            let flush = cx
                .space
                .unmap(va_of(slot as u64), (end - slot) as u64 * PAGE)
                .map_err(failed("stress: final unmap"))?;
            cx.space.flush(flush).map_err(failed("stress: flush"))?;
            self.reference[slot..end].fill(0);
            slot = end;
        }
        Ok(())
    }
}

/// The run on one backend.
fn body<B: LiveBackend>(cx: &mut Cx<'_, B>) -> TestResult {
    let seed = SEED.load(Ordering::Relaxed);
    let wanted = WANTED.load(Ordering::Relaxed);
    let pool = take(cx, POOL)?;
    let mut reference = REFERENCE.lock();
    reference.fill(0);
    let mut stress = Stress {
        // xorshift has one fixed point: zero.
        rng: Rng(seed | 1),
        pool,
        reference: &mut reference,
        recent: [(0, 0); RECENT],
        counts: Counts::default(),
        stores: 0,
    };
    let start = crate::platform::rdtsc();
    let s0 = cx.space.backend().counters();
    let result = stress.run(cx, wanted);
    let cleanup = stress.unmap_all(cx);
    let cycles = crate::platform::rdtsc().wrapping_sub(start);
    let s1 = cx.space.backend().counters();
    let c = &stress.counts;
    OPS.store(c.ops(), Ordering::Relaxed);
    crate::kprintln!(
        "STRESS seed {seed:#x}: {} operations (map {}, unmap {}, protect {}, translate {}; {} lazy \
         batches; {} refused as the reference predicted), {} full checks, {} mismatches, {} \
         hypercalls, {} mmu_update entries, {} cycles",
        c.ops(),
        c.map,
        c.unmap,
        c.protect,
        c.translate,
        c.batches,
        c.refused,
        c.sweeps,
        MISMATCHES.load(Ordering::Relaxed),
        s1.hypercalls - s0.hypercalls,
        s1.mmu_update_entries - s0.mmu_update_entries,
        cycles
    );
    drop(reference);
    give(cx, pool)?;
    result?;
    cleanup
}
