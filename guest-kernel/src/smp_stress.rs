//! The concurrent stress of the kernel's shared address space: every CPU
//! runs random map / unmap / protect / translate calls through `kspace` at
//! once, on a private range of its own and on one range all CPUs share.
//!
//! Each private range (1,024 pages, across an L1 boundary; neighbouring
//! ranges share their L2 and L3 tables, so CPUs create and free tables
//! beside each other) is checked against its CPU's own reference; the
//! shared range (512 pages across an L1 boundary) against one reference
//! behind a lock that a CPU holds across its change and its checks. After
//! each change the CPU checks every page it touched by translation and by
//! a real access: a mapped page reads its frame's tag, a read-only one
//! faults on a write, an unmapped one faults on a read. On the shared range
//! the other CPUs read the same pages in between, so a flush that missed a
//! CPU shows as an access that should have faulted. At the end every page
//! is unmapped, the data frames go back, the kspace pool must hold as many
//! frames as before (no table frame lost) and pvmmu's invariant walker
//! must find nothing in the live tree.
//!
//! Invariant: a CPU changes a shared page only while holding [`SHARED`],
//! and a private page only from its own thread.

use core::sync::atomic::{AtomicU64, Ordering};

use pvmmu::entry::Flags;
use pvmmu::Pfn;

use crate::directmap::DirectMem;
use crate::kspace::{self, RangeOp};
use crate::percpu::MAX_CPUS;
use crate::sched;
use crate::selftest::{check_eq, Failure, SelfTest, TestResult};
use crate::traps::{probe_read, probe_write};
use crate::{percpu, Kernel};

/// The suite (run after the CPUs are up).
pub const SUITE: &[SelfTest] = &[SelfTest::new("smp_concurrent_stress", stress)];

/// Operations per boot under Xen PV, over all CPUs (the `xl` domU too:
/// 100,000 took 9.6 s there).
pub const OPS: u64 = 100_000;
/// Operations per boot natively: a tenth. Natively each change is a
/// shootdown whose initiator waits for every other CPU's acknowledgement,
/// and under TCG the CPUs are host threads: 100,000 operations took 386 s
/// on 4 CPUs (3.9 ms each), against 9 s for the stale-translation rounds
/// of the same boot.
pub const NATIVE_OPS: u64 = 10_000;

/// Start of the stress's area in the kspace slot (8 GiB in).
const AREA: u64 = kspace::STACK_AREA + (8 << 30);
/// Pages of a private range.
const PRIVATE_PAGES: usize = 1024;
/// Private range of CPU `n`: `AREA + n * 4 MiB + 1 MiB` (across the L1
/// boundary at 2 MiB).
const PRIVATE_STRIDE: u64 = 4 << 20;
/// The shared range: 1 MiB below an L1 boundary and 1 MiB above it,
/// above every private range.
const SHARED_VA: u64 = AREA + (64 << 20) - (1 << 20);
/// Pages of the shared range.
const SHARED_PAGES: usize = 512;
/// Data frames per CPU, and for the shared range.
const FRAMES: usize = 4;
/// Longest run one unmap or protect covers.
const MAX_RUN: u64 = 8;

/// Reference entry: 0 unmapped, else frame index + 1 (bits 0..=6) and
/// bit 7 writable.
type RefEntry = u8;
const REF_RW: u8 = 0x80;

/// The shared range's reference; held across a change and its checks.
static SHARED: spin::Mutex<[RefEntry; SHARED_PAGES]> = spin::Mutex::new([0; SHARED_PAGES]);
/// Frames of the shared range (pfns).
static SHARED_FRAMES: [AtomicU64; FRAMES] = [const { AtomicU64::new(0) }; FRAMES];
/// Frames of each CPU's private range (pfns).
static PRIVATE_FRAMES: [[AtomicU64; FRAMES]; MAX_CPUS] =
    [const { [const { AtomicU64::new(0) }; FRAMES] }; MAX_CPUS];
/// Operations each thread is to run.
static OPS_EACH: AtomicU64 = AtomicU64::new(0);
/// Operations run, over all CPUs and boots' calls.
static OPS_DONE: AtomicU64 = AtomicU64::new(0);
/// Accesses that should have faulted and did not (stale translations).
static STALE: AtomicU64 = AtomicU64::new(0);
/// The first disagreement a thread found.
static FIRST: spin::Mutex<Option<(usize, u64, &'static str)>> = spin::Mutex::new(None);

/// Operations run by the stress (for the report's `smp_stress_ops`).
pub fn ops_done() -> u64 {
    OPS_DONE.load(Ordering::Relaxed)
}

const RO_FLAGS: Flags = Flags::PRESENT.union(Flags::NO_EXECUTE);
const RW_FLAGS: Flags = RO_FLAGS.union(Flags::WRITABLE);

fn tag(pfn: u64) -> u64 {
    0x7a90_0000_0000_0000 ^ pfn
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// One range and its reference, as a CPU works on it.
struct Range<'a> {
    base: u64,
    frames: [u64; FRAMES],
    reference: &'a mut [RefEntry],
}

/// Why a check failed (recorded once, counted always).
type Check = Result<(), &'static str>;

impl Range<'_> {
    fn va(&self, page: usize) -> u64 {
        self.base + page as u64 * 4096
    }

    /// Translation and a real access of `page` agree with the reference.
    fn verify(&self, page: usize) -> Check {
        let va = self.va(page);
        let r = self.reference[page];
        let t = kspace::lookup(va).map_err(|_| "lookup")?;
        if r == 0 {
            if t.is_some() {
                return Err("translated after unmap");
            }
            // SAFETY: an address of the stress's area; a fault is caught.
            if unsafe { probe_read(va) }.is_ok() {
                STALE.fetch_add(1, Ordering::Relaxed);
                return Err("read went through after unmap");
            }
            return Ok(());
        }
        let pfn = self.frames[usize::from((r & !REF_RW) - 1)];
        let rw = r & REF_RW != 0;
        match t {
            Some(t) if t.pfn.0 == pfn && t.flags.contains(Flags::WRITABLE) == rw => {}
            _ => return Err("translation differs from the reference"),
        }
        // SAFETY: mapped to a frame this test owns; a fault is caught.
        match unsafe { probe_read(va) } {
            Ok(v) if v == tag(pfn) => {}
            Ok(_) => {
                STALE.fetch_add(1, Ordering::Relaxed);
                return Err("read another frame's tag");
            }
            Err(_) => return Err("read of a mapped page faulted"),
        }
        // SAFETY: as above; the tag written is the one the frame holds.
        let w = unsafe { probe_write(va, tag(pfn)) };
        match (rw, w) {
            (true, Err(_)) => Err("write to a writable page faulted"),
            (false, Ok(())) => {
                STALE.fetch_add(1, Ordering::Relaxed);
                Err("write to a read-only page went through")
            }
            _ => Ok(()),
        }
    }

    /// The run of pages from `page` (at most `max`) that are mapped.
    fn mapped_run(&self, page: usize, max: u64) -> usize {
        self.reference[page..]
            .iter()
            .take(max as usize)
            .take_while(|&&r| r != 0)
            .count()
    }

    /// One random operation.
    fn step(&mut self, rng: &mut Rng) -> Check {
        let pages = self.reference.len();
        let page = rng.below(pages as u64) as usize;
        match rng.below(4) {
            0 if self.reference[page] == 0 => {
                let f = rng.below(FRAMES as u64) as usize;
                let rw = rng.below(2) == 0;
                let flags = if rw { RW_FLAGS } else { RO_FLAGS };
                kspace::change_range(self.va(page), 1, RangeOp::Map(Pfn(self.frames[f]), flags))
                    .map_err(|_| "map")?;
                self.reference[page] = (f as u8 + 1) | if rw { REF_RW } else { 0 };
                self.verify(page)
            }
            1 => {
                let n = self.mapped_run(page, 1 + rng.below(MAX_RUN));
                if n == 0 {
                    return self.verify(page);
                }
                kspace::change_range(self.va(page), n as u64, RangeOp::Unmap)
                    .map_err(|_| "unmap")?;
                for p in page..page + n {
                    self.reference[p] = 0;
                    self.verify(p)?;
                }
                Ok(())
            }
            2 => {
                let n = self.mapped_run(page, 1 + rng.below(MAX_RUN));
                if n == 0 {
                    return self.verify(page);
                }
                let rw = rng.below(2) == 0;
                let flags = if rw { RW_FLAGS } else { RO_FLAGS };
                kspace::change_range(self.va(page), n as u64, RangeOp::Protect(flags))
                    .map_err(|_| "protect")?;
                for p in page..page + n {
                    self.reference[p] = (self.reference[p] & !REF_RW) | if rw { REF_RW } else { 0 };
                    self.verify(p)?;
                }
                Ok(())
            }
            _ => self.verify(page),
        }
    }

    /// Unmaps every mapped page.
    fn clear(&mut self) -> Check {
        for page in 0..self.reference.len() {
            if self.reference[page] != 0 {
                kspace::change_range(self.va(page), 1, RangeOp::Unmap).map_err(|_| "unmap")?;
                self.reference[page] = 0;
            }
        }
        Ok(())
    }
}

fn load(frames: &[AtomicU64; FRAMES]) -> [u64; FRAMES] {
    core::array::from_fn(|i| frames[i].load(Ordering::Acquire))
}

fn record(cpu: usize, op: u64, what: &'static str) {
    FIRST.lock().get_or_insert((cpu, op, what));
}

/// One CPU's share: its own range, and the shared one a quarter of the
/// time.
fn worker(cpu: u64) -> u64 {
    let cpu = cpu as usize;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((cpu as u64 + 1) << 32));
    let mut private = [0 as RefEntry; PRIVATE_PAGES];
    let mut mine = Range {
        base: AREA + cpu as u64 * PRIVATE_STRIDE + (1 << 20),
        frames: load(&PRIVATE_FRAMES[cpu]),
        reference: &mut private,
    };
    let shared_frames = load(&SHARED_FRAMES);
    let mut failures = 0;
    for op in 0..OPS_EACH.load(Ordering::Acquire) {
        let r = if rng.below(4) == 0 {
            let mut reference = SHARED.lock();
            let mut shared = Range {
                base: SHARED_VA,
                frames: shared_frames,
                reference: &mut reference[..],
            };
            shared.step(&mut rng)
        } else {
            mine.step(&mut rng)
        };
        OPS_DONE.fetch_add(1, Ordering::Relaxed);
        if let Err(what) = r {
            record(cpu, op, what);
            failures += 1;
            break;
        }
    }
    if let Err(what) = mine.clear() {
        record(cpu, u64::MAX, what);
        failures += 1;
    }
    failures
}

fn take_frames(into: &[AtomicU64; FRAMES]) -> TestResult {
    for slot in into {
        let pfn = kspace::take_frame().map_err(|_| Failure::Check("no frame for the stress"))?;
        // SAFETY: a pool frame we took: ours, writable in the direct map.
        unsafe { core::ptr::write_volatile(DirectMem::va(pfn) as *mut u64, tag(pfn.0)) };
        slot.store(pfn.0, Ordering::Release);
    }
    Ok(())
}

fn give_frames(from: &[AtomicU64; FRAMES]) {
    for slot in from {
        let pfn = slot.swap(0, Ordering::AcqRel);
        if pfn != 0 {
            let _ = kspace::give_frame(Pfn(pfn));
        }
    }
}

fn stress(_kernel: &mut Kernel) -> TestResult {
    let cpus = percpu::online_count();
    if cpus < 2 {
        crate::kprintln!("selftest note: one CPU, no concurrent use of the address space");
        return Ok(());
    }
    let total = if crate::platform::is_xen_pv() {
        OPS
    } else {
        NATIVE_OPS
    };
    let before = kspace::pool_free().ok_or(Failure::Check("kspace pool"))?;
    OPS_EACH.store(total.div_ceil(cpus as u64), Ordering::Release);
    STALE.store(0, Ordering::Release);
    *FIRST.lock() = None;
    let done_before = OPS_DONE.load(Ordering::Acquire);
    let t0 = crate::clock::now_ns();
    sched::pin_current(Some(0));
    let mut failures = 0;
    let mut result = take_frames(&SHARED_FRAMES);
    for frames in PRIVATE_FRAMES.iter().take(cpus) {
        if result.is_ok() {
            result = take_frames(frames);
        }
    }
    if result.is_ok() {
        let mut threads = [None; MAX_CPUS];
        for (cpu, slot) in threads.iter_mut().enumerate().take(cpus).skip(1) {
            *slot = sched::spawn_on(cpu, "smp-stress", worker, cpu as u64).ok();
            if slot.is_none() {
                result = Err(Failure::Check("cannot spawn a stress thread"));
            }
        }
        failures += worker(0);
        for id in threads.into_iter().flatten() {
            failures += sched::join(id).unwrap_or(1);
        }
        let mut reference = SHARED.lock();
        let mut shared = Range {
            base: SHARED_VA,
            frames: load(&SHARED_FRAMES),
            reference: &mut reference[..],
        };
        if let Err(what) = shared.clear() {
            record(0, u64::MAX, what);
            failures += 1;
        }
    }
    sched::pin_current(None);
    give_frames(&SHARED_FRAMES);
    for frames in PRIVATE_FRAMES.iter().take(cpus) {
        give_frames(frames);
    }
    result?;
    let ops = OPS_DONE.load(Ordering::Acquire) - done_before;
    log::info!(
        "smp stress: {ops} operations on {cpus} CPUs in {} ms, {} stale",
        (crate::clock::now_ns() - t0) / 1_000_000,
        STALE.load(Ordering::Acquire)
    );
    if let Some((cpu, op, what)) = *FIRST.lock() {
        log::error!("smp stress: cpu {cpu}, operation {op}: {what}");
    }
    check_eq("stress threads that failed", failures, 0)?;
    check_eq("stale accesses", STALE.load(Ordering::Acquire), 0)?;
    let after = kspace::pool_free().ok_or(Failure::Check("kspace pool"))?;
    check_eq(
        "kspace pool frames after the stress",
        after as u64,
        before as u64,
    )?;
    let mut first = None;
    let violations = kspace::check_invariants(&mut |v| {
        first.get_or_insert(v);
    })
    .map_err(|_| Failure::Check("invariant walk"))?;
    if let Some(v) = first {
        log::error!("smp stress: invariant walker: {v:?}");
    }
    check_eq("invariant violations", violations as u64, 0)?;
    check_eq(
        "operations run",
        ops,
        OPS_EACH.load(Ordering::Acquire) * cpus as u64,
    )
}
