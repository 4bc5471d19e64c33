//! The pvmmu reference guest kernel: one ELF that boots as a Xen PV guest
//! (64-bit PV entry), and through the PVH protocol (32-bit entry) natively
//! (QEMU `-kernel`) or as a Xen PVH guest, runs its self-tests, prints the
//! `PVMMU-REPORT` line and the `PVMMU-RESULT` verdict, and shuts down.
//!
//! Invariant: whatever happens after the console is up — a failed test, a
//! panic, an unexpected exception — the last line printed is exactly one
//! `PVMMU-RESULT PASS|FAIL`, followed by a shutdown request.
#![no_std]
#![no_main]
#![deny(missing_docs)]

mod apic;
mod bench;
mod boot;
mod boot_tests;
mod clock;
mod cmdline;
mod console;
mod cpa_tests;
mod directmap;
mod dm_tests;
mod events;
mod frames;
mod ipi;
mod irq;
mod kmap;
mod kmap_tests;
mod kspace;
mod lazy;
mod lazy_tests;
mod memmap;
mod negative_env;
mod pagealloc;
mod pagealloc_tests;
mod percpu;
mod physmem;
mod platform;
mod pvh;
mod pvmmu_tests;
mod report;
mod rk_tests;
mod running;
mod runq_tests;
mod sched;
mod selftest;
mod shootdown;
mod shutdown;
mod smp;
mod smp_stress;
mod smp_tests;
mod stress;
mod timer;
mod trampoline;
mod traps;
mod xen_hvm;
mod xen_hvm_tests;
mod xen_pv;

use core::panic::PanicInfo;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use boot::ImageLayout;
use cmdline::{BootOptions, Cmdline};
use console::Console;
use frames::{FrameRange, Frames};
use memmap::{MapSource, MemoryMap};
use platform::{Platform, XenDomain};
use report::Report;
use selftest::{SelfTest, Tally};
use shutdown::Verdict;
use xen_pv::PvBoot;

/// Self-test suites of the entry state, run before pvmmu replaces the boot
/// page tables. Adding a suite is one line.
const BOOT_SUITES: &[&[SelfTest]] = &[boot_tests::SUITE];

/// Self-test suites run on the direct map pvmmu built. Adding a suite is one
/// line.
const SUITES: &[&[SelfTest]] = &[dm_tests::SUITE, pvmmu_tests::SUITE, xen_hvm_tests::SUITE];

/// Self-test suites run once interrupts, the tick and threads are up.
const RUNNING_SUITES: &[&[SelfTest]] = &[
    rk_tests::SUITE,
    smp_tests::SUITE,
    runq_tests::SUITE,
    smp_stress::SUITE,
    cpa_tests::SUITE,
    pagealloc_tests::SUITE,
    lazy_tests::SUITE,
    kmap_tests::SUITE,
];

/// Most reservations remembered (for the self-tests): the fixed ones and
/// one per boot module.
pub const MAX_RESERVATIONS: usize = 8 + pvh::MAX_MODULES;

/// A range of frames taken out of the allocator at boot, and why.
#[derive(Debug, Clone, Copy)]
pub struct Reservation {
    /// What is there.
    pub what: &'static str,
    /// The frames.
    pub range: FrameRange,
}

/// Everything the kernel knows after entry; passed to every self-test.
pub struct Kernel {
    /// Where we run.
    pub platform: Platform,
    /// Options from the command line.
    pub options: BootOptions,
    /// The command line.
    pub cmdline: Cmdline,
    /// The boot memory map.
    pub memmap: MemoryMap,
    /// The frame allocator.
    pub frames: Frames,
    /// What was reserved out of the allocator.
    pub reservations: [Option<Reservation>; MAX_RESERVATIONS],
    /// Xen PV boot facts (`None` natively).
    pub pv: Option<PvBoot>,
    /// Xen PVH facts (`None` natively and under PV).
    pub xen_pvh: Option<xen_hvm::XenPvh>,
    /// Physical address of `hvm_start_info` (PVH entry; 0 under PV).
    pub hvm_start_info: u64,
    /// Physical address of the ACPI RSDP from `hvm_start_info` (0 if none).
    pub rsdp: u64,
    /// Boot modules of the PVH entry (physical byte ranges).
    pub pvh_modules: [pvh::Module; pvh::MAX_MODULES],
    /// The kernel image's sections.
    pub image: ImageLayout,
    /// The report being filled.
    pub report: Report,
    /// The direct map, once pvmmu's bootstrap has built it.
    pub direct_map: Option<directmap::DirectMap>,
    /// `pvmmu.directmap_limit` once accepted: the first frame left out of
    /// the direct map and the frame allocator (highmem above it).
    pub directmap_limit: Option<u64>,
}

impl Kernel {
    fn new(platform: Platform, cmdline: Cmdline, memmap: MemoryMap) -> Self {
        Kernel {
            platform,
            options: BootOptions::parse(&cmdline),
            cmdline,
            memmap,
            frames: Frames::new(),
            reservations: [None; MAX_RESERVATIONS],
            pv: None,
            xen_pvh: None,
            hvm_start_info: 0,
            rsdp: 0,
            pvh_modules: [pvh::Module::default(); pvh::MAX_MODULES],
            image: boot::image_layout(),
            report: Report::new(platform),
            direct_map: None,
            directmap_limit: None,
        }
    }

    /// RAM as frame ranges `[start, end)` (clipped to what Xen gave under
    /// PV), in memory-map order.
    pub fn ram_pfns(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let limit = self.pv.as_ref().map_or(u64::MAX, |pv| pv.nr_pages);
        self.memmap
            .ram()
            .map(move |r| (r.start.div_ceil(4096), (r.end / 4096).min(limit)))
            .filter(|(s, e)| s < e)
    }

    /// RAM frames left out of the direct map (`pvmmu.directmap_limit`).
    pub fn highmem_pfns(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let limit = self.directmap_limit.unwrap_or(u64::MAX);
        self.ram_pfns()
            .map(move |(s, e)| (s.max(limit), e))
            .filter(|(s, e)| s < e)
    }

    /// Applies `pvmmu.directmap_limit` (after [`Self::build_frames`]): a
    /// valid limit takes the RAM above it out of the allocator; a bad one
    /// is reported with a `PVMMU-WARNING` line and ignored.
    fn apply_directmap_limit(&mut self) {
        let Some(mib) = self.options.directmap_limit_mib else {
            return;
        };
        // Everything the bootstrap reaches through the boot mapping (its
        // first chunk) and everything reserved must stay direct-mapped.
        let first_chunk_end = match &self.pv {
            Some(pv) => pv.initial_mapping_end_pfn(),
            None => self.image_pfns().1 + 1024,
        };
        let boot_end = self
            .reservations()
            .map(|r| r.range.end)
            .fold(first_chunk_end, u64::max);
        let ram_end = self.ram_pfns().map(|(_, e)| e).max().unwrap_or(0);
        match cmdline::directmap_limit_pfn(mib, boot_end, ram_end) {
            Ok(limit) => {
                if let Err(e) = self.frames.reserve(limit, ram_end) {
                    panic!("cannot take highmem out of the allocator: {e:?}");
                }
                self.directmap_limit = Some(limit);
                log::info!(
                    "directmap_limit: frames from {limit:#x} ({mib} MiB) to {ram_end:#x} are \
                     highmem (kmap only)"
                );
            }
            Err(e) => kprintln!("{} cmdline: {e}", cmdline::WARNING_MARKER),
        }
    }

    /// Reserved ranges.
    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.reservations.iter().flatten()
    }

    fn reserve(&mut self, what: &'static str, start: u64, end: u64) {
        if let Err(e) = self.frames.reserve(start, end) {
            panic!("cannot reserve {what} [{start:#x}, {end:#x}): {e:?}");
        }
        match self.reservations.iter_mut().find(|r| r.is_none()) {
            Some(slot) => {
                *slot = Some(Reservation {
                    what,
                    range: FrameRange { start, end },
                })
            }
            None => panic!("more than {MAX_RESERVATIONS} reservations"),
        }
    }

    /// Frames of the kernel image (load addresses).
    pub fn image_pfns(&self) -> (u64, u64) {
        let (start, end) = self.image.image.to_phys();
        (start >> 12, end.div_ceil(4096))
    }

    /// Fills the allocator from the memory map and reserves what is in use.
    fn build_frames(&mut self) {
        let ram: [Option<(u64, u64)>; memmap::MAX_REGIONS] = {
            let mut out = [None; memmap::MAX_REGIONS];
            for (slot, r) in out.iter_mut().zip(self.ram_pfns()) {
                *slot = Some(r);
            }
            out
        };
        for (start, end) in ram.iter().flatten() {
            if let Err(e) = self.frames.add(*start, *end) {
                panic!("cannot add RAM [{start:#x}, {end:#x}) to the allocator: {e:?}");
            }
        }
        let (img_start, img_end) = self.image_pfns();
        self.reserve("kernel image", img_start, img_end);
        match self.pv.clone() {
            Some(pv) => {
                self.reserve("xen bootstrap area", 0, pv.bootstrap_end_pfn());
                if let Some((start, end)) = pv.layout.p2m_frames {
                    self.reserve("p2m list", start, end);
                }
                if let Some((start, end)) = pv.module_pfns() {
                    self.reserve("module", start, end);
                }
            }
            None => {
                self.reserve("low 1 MiB", 0, 0x100);
                for m in self.pvh_modules {
                    if m.end > m.start {
                        self.reserve("module", m.start >> 12, m.end.div_ceil(4096));
                    }
                }
            }
        }
    }
}

/// 64-bit Xen PV entry (called by `pv_entry` on the boot stack).
#[no_mangle]
extern "C" fn pv_main(start_info: *const hypercall::abi::start_info) -> ! {
    platform::set(Platform::XenPv);
    // Per-CPU data before anything can trap (the trap path counts its depth
    // there). A failure cannot be printed yet: stop.
    if percpu::install(0).is_err() {
        shutdown::power_off(Verdict::Fail);
    }
    // SAFETY: `pv_entry` passes Xen's start_info pointer unchanged.
    let pv = match unsafe { PvBoot::from_start_info(start_info) } {
        Ok(pv) => pv,
        Err(e) => {
            // Nothing from start_info can be trusted, not even the console
            // ring: say why through Xen's console and stop.
            console::init(Console::XenConsoleIo(console::XenConsoleIo));
            panic!("start_info at {start_info:p} refused: {e}");
        }
    };
    console::init(pv_console(&pv));
    kprintln!("pvmmu guest kernel: Xen PV entry, start_info at {start_info:p}");
    if let Err(e) = traps::init() {
        panic!("set_trap_table failed: {e:?}");
    }
    unmap_pv_stack_guard();

    let mut buf = [hypercall::abi::E820Entry::default(); memmap::MAX_REGIONS];
    // SAFETY: we are a PV guest; `buf` is a valid buffer.
    let map = match unsafe { hypercall::ops::memory_map(&mut buf) } {
        Ok(n) if n > 0 => MemoryMap::from_entries(
            MapSource::XenMemoryMap,
            buf[..n.min(buf.len())]
                .iter()
                .map(|e| (e.addr, e.size, e.kind)),
        ),
        other => {
            log::info!("XENMEM_memory_map: {other:?}; using nr_pages");
            // `nr_pages` was checked against MAX_NR_PAGES: no overflow.
            MemoryMap::from_entries(MapSource::NrPages, [(0, pv.nr_pages * 4096, 1)])
        }
    };
    let memmap = match map {
        Ok(map) => map,
        Err(e) => panic!("the memory map Xen gave is refused: {e}"),
    };

    let mut kernel = Kernel::new(Platform::XenPv, pv.cmdline.clone(), memmap);
    kernel.report.mem_mib = memmap::bytes_to_mib_rounded(pv.nr_pages * 4096);
    kernel.report.xen_domain = Some(if pv.is_dom0() {
        XenDomain::Dom0
    } else {
        XenDomain::DomU
    });
    kernel.pv = Some(pv);
    kernel_main(kernel)
}

/// Unmaps the boot stack's guard page in Xen's start-of-day tables, so a
/// stack overflow faults (the PVH trampoline never maps it).
fn unmap_pv_stack_guard() {
    use hypercall::MmuHypercalls;
    let guard = boot::image_layout().stack_guard.start;
    // SAFETY: platform is Xen PV (PV entry).
    let mut xen = unsafe { hypercall::Xen::new() };
    if let Err(e) = xen.update_va_mapping(guard, 0, hypercall::abi::UVMF_INVLPG) {
        panic!("cannot unmap the stack guard page at {guard:#x}: {e}");
    }
}

/// The console for a PV domain: `console_io` for dom0, the console ring
/// for a domU (falling back to `console_io` if the ring page is not in the
/// start-of-day mapping).
fn pv_console(pv: &PvBoot) -> Console {
    if pv.is_dom0() {
        return Console::XenConsoleIo(console::XenConsoleIo);
    }
    // The toolstack maps the ring inside Xen's start-of-day area; walk Xen's
    // tables to check that its address really maps the ring's frame writable.
    let page = pv
        .console_pfn()
        .ok()
        .map(PvBoot::pfn_to_va)
        .filter(|&va| {
            pv.translate_initial(va)
                .is_some_and(|m| m.mfn == pv.console_mfn && m.writable())
        })
        .and_then(|va| NonNull::new(va as *mut u8));
    match page {
        // SAFETY: the walk above found start_info's console frame mapped
        // writable at this address by Xen's start-of-day tables; we are PV.
        Some(page) => {
            Console::Ring(unsafe { console::ring::RingConsole::new(page, pv.console_evtchn) })
        }
        None => Console::XenConsoleIo(console::XenConsoleIo),
    }
}

/// 32-bit PVH entry (called by the trampoline in long mode, on the boot
/// stack, with the low 4 GiB identity-mapped).
#[no_mangle]
extern "C" fn pvh_main(hvm_start_info: u64) -> ! {
    let hypervisor = platform::hypervisor_signature();
    let platform = match hypervisor {
        Some(sig) if sig.is_xen() => Platform::XenPvh,
        _ => Platform::Native,
    };
    platform::set(platform);
    if percpu::install(0).is_err() {
        shutdown::power_off(Verdict::Fail);
    }
    // Ring 0 honours read-only mappings only with CR0.WP set; the kernel's
    // W^X (text read-only) depends on it.
    // SAFETY: setting WP only makes more writes fault; nothing relies on
    // writing through read-only mappings.
    unsafe {
        use x86_64::registers::control::{Cr0, Cr0Flags};
        Cr0::update(|f| f.insert(Cr0Flags::WRITE_PROTECT));
    }
    platform::program_pat();
    // Under Xen: the hypercall page, then the PV console ring.
    let xen = (platform == Platform::XenPvh).then(xen_hvm::init);
    console::init(match &xen {
        Some(Ok(xen)) => xen.console(),
        // SAFETY: PVH entry: natively COM1 is a 16550 or absent (under Xen
        // PVH, absent: this only carries a panic nobody may see); port I/O
        // is allowed in ring 0.
        _ => Console::Serial(unsafe { console::serial::Com1::init() }),
    });
    kprintln!("pvmmu guest kernel: PVH entry, hvm_start_info at {hvm_start_info:#x}");
    let xen = xen
        .transpose()
        .unwrap_or_else(|e| panic!("Xen PVH setup: {e:?}"));
    traps::init().unwrap_or_else(|e| panic!("traps: {e:?}"));
    let boot = match pvh::parse(hvm_start_info) {
        Ok(boot) => boot,
        Err(e) => panic!("hvm_start_info at {hvm_start_info:#x} refused: {e}"),
    };
    let mut kernel = Kernel::new(platform, boot.cmdline.clone(), boot.memmap.clone());
    kernel.hvm_start_info = hvm_start_info;
    kernel.rsdp = boot.rsdp_paddr;
    kernel.pvh_modules = boot.modules;
    log::info!(
        "hvm_start_info at {:#x}: version {}, rsdp {:#x}, {} modules",
        boot.start_info_paddr,
        boot.version,
        boot.rsdp_paddr,
        boot.nr_modules
    );
    if let Some(xen) = xen {
        xen_hvm::adopt(&mut kernel, xen);
    }
    kernel.report.mem_mib = memmap::bytes_to_mib_rounded(kernel.memmap.ram_bytes());
    kernel.report.hypervisor = hypervisor;
    kernel_main(kernel)
}

/// Common boot path after entry.
fn kernel_main(mut kernel: Kernel) -> ! {
    log::info!("platform {}", kernel.platform.name());
    log::info!("console {}", console::name());
    log::info!("command line {:?}", kernel.cmdline);
    log::info!("options {:?}", kernel.options);
    cmdline::warn_about(&kernel.cmdline, &kernel.options, kernel.platform);
    if let Some(sig) = kernel.report.hypervisor {
        log::info!("hypervisor signature {sig:?}");
    }
    if let Some(pv) = &kernel.pv {
        log::info!(
            "start_info: nr_pages {:#x} flags {:#x} pt_base {:#x} nr_pt_frames {} mfn_list {:#x} \
             first_p2m_pfn {:#x} nr_p2m_frames {} console mfn {:#x} evtchn {}",
            pv.nr_pages,
            pv.flags,
            pv.pt_base,
            pv.nr_pt_frames,
            pv.mfn_list,
            pv.first_p2m_pfn,
            pv.nr_p2m_frames,
            pv.console_mfn,
            pv.console_evtchn
        );
    }
    log::info!("memory map ({:?}):", kernel.memmap.source());
    for r in kernel.memmap.regions() {
        log::info!("  [{:#014x}, {:#014x}) {:?}", r.start, r.end, r.kind);
    }
    let img = kernel.image.image;
    log::info!(
        "kernel image {:#x}..{:#x} (phys {:#x}..{:#x})",
        img.start,
        img.end,
        img.to_phys().0,
        img.to_phys().1
    );
    let max_bytes = hypercall::boot::MAX_GUEST_MIB << 20;
    if kernel.memmap.ram_bytes() > max_bytes {
        panic!(
            "{} MiB of RAM: this kernel supports at most {} MiB (its page-table checks are sized \
             for that)",
            kernel.memmap.ram_bytes() >> 20,
            hypercall::boot::MAX_GUEST_MIB
        );
    }
    kernel.build_frames();
    kernel.apply_directmap_limit();
    for r in kernel.reservations() {
        log::info!(
            "reserved pfns [{:#x}, {:#x}) {}",
            r.range.start,
            r.range.end,
            r.what
        );
    }
    log::info!(
        "frame allocator: {} free frames in {} ranges",
        kernel.frames.free_count(),
        kernel.frames.ranges().len()
    );

    let mut tally = Tally::default();
    for suite in BOOT_SUITES {
        selftest::run_suite(&mut kernel, suite, &mut tally);
    }

    match directmap::build(&mut kernel) {
        Ok(dm) => {
            let r = &dm.report;
            log::info!(
                "direct map at {:#x}: {} pages, {} tables in {} rounds, {} hypercalls, {} mmu_update entries, {} cycles; root {:?}",
                directmap::DIRECT_MAP_BASE,
                r.pages_mapped,
                r.tables_created,
                r.rounds,
                r.hypercalls,
                r.mmu_update_entries,
                dm.cycles,
                dm.root
            );
            for (i, c) in r.chunks[..r.rounds as usize].iter().enumerate() {
                log::info!("  round {i}: pfns [{:#x}, {:#x})", c.start.0, c.end.0);
            }
            for t in r.tables.ranges() {
                log::info!("  tables in pfns [{:#x}, {:#x})", t.start.0, t.end.0);
            }
            for f in r.freed.ranges() {
                log::info!(
                    "  retired initial tables freed: pfns [{:#x}, {:#x})",
                    f.start.0,
                    f.end.0
                );
            }
            kernel.report.pages_mapped = r.pages_mapped;
            kernel.report.tables_created = r.tables_created;
            kernel.report.map_cycles = dm.cycles;
            kernel.report.bootstrap_rounds = u64::from(r.rounds);
            kernel.report.bootstrap_hypercalls = r.hypercalls;
            kernel.report.bootstrap_entries = r.mmu_update_entries;
            kernel.direct_map = Some(dm);
        }
        Err(e) => panic!("direct-map bootstrap failed: {e:?}"),
    }

    // DEBUG_PAGEALLOC as early as it can be: it needs kspace's CPA, which
    // needs only the direct map. The direct-map and pvmmu suites then run
    // with every free frame out of the direct map (docs/cpa.md).
    if kernel.options.debug_pagealloc {
        if let Err(e) = running::start_kspace(&mut kernel) {
            panic!("cannot start the kernel space for debug_pagealloc: {e:?}");
        }
    }
    for suite in SUITES {
        selftest::run_suite(&mut kernel, suite, &mut tally);
    }
    // Before the tick: no interrupt in the timed runs, and the hypercall
    // counts are the benchmarked calls' alone.
    if kernel.options.bench && !kernel.options.bench_smp {
        selftest::run_suite(&mut kernel, bench::SUITE, &mut tally);
    }

    // The running kernel: interrupts, the tick, threads. The suites above
    // count hypercalls exactly and run before it.
    match running::start(&mut kernel) {
        Ok(r) => log::info!(
            "running kernel: tick every {} us from the {}",
            timer::TICK_NS / 1000,
            r.timer
        ),
        Err(e) => panic!("cannot start the running kernel: {e:?}"),
    }
    if let Err(e) = kmap::init(&kernel) {
        panic!("cannot set up the kmap windows: {e:?}");
    }
    if kernel.pv.is_some() {
        log::info!(
            "pvclock: TSC stable across vCPUs: {}",
            clock::pv_tsc_stable()
        );
    }
    let smp = smp::start_aps(&kernel);
    log::info!("cpus: {} offered, {} online", smp.offered, smp.online);
    if let Some((cpu, e)) = smp.failed {
        log::error!("cpu {cpu} failed to come up: {e:?}");
    }
    kernel.report.cpus_offered = smp.offered as u64;
    for suite in RUNNING_SUITES {
        selftest::run_suite(&mut kernel, suite, &mut tally);
    }
    if kernel.options.bench_smp {
        selftest::run_suite(&mut kernel, bench::SMP_SUITE, &mut tally);
    } else if kernel.options.bench {
        selftest::run_suite(&mut kernel, bench::RUNNING_SUITE, &mut tally);
    }
    if kernel.pv.is_some() {
        let (upcalls, events, stray) = events::counts();
        log::info!("events: {upcalls} upcalls, {events} port events, {stray} on unbound ports");
    }
    match negative_env::run(&mut kernel) {
        Some(0) => tally.passed += 1,
        Some(_) => tally.failed += 1,
        None => {}
    }
    // The random differential: its lines are judged by the harness against
    // the model; here only that it ran in full and gave its frames back.
    // Not in the deliberate-crash rows, which do not judge it.
    let stress_seed = stress::figures().2;
    let oracle = match kernel.options.crash {
        None => negative_env::run_oracle(&mut kernel, stress_seed ^ 0x0a11_ce00, stress_seed),
        Some(_) => None,
    };
    if let Some(o) = oracle {
        kernel.report.oracle_requests = o.requests;
        if o.clean && o.requests == u64::from(pvmmu::oracle::DEFAULT_REQUESTS) {
            tally.passed += 1;
        } else {
            log::error!("oracle: {} requests, clean: {}", o.requests, o.clean);
            tally.failed += 1;
        }
    }
    if let Some(kind) = kernel.options.crash {
        crash(kind, &mut kernel);
    }
    let st = sched::stats();
    kernel.report.timer_irqs = timer::ticks();
    kernel.report.context_switches = st.context_switches;
    kernel.report.threads = st.threads;
    kernel.report.cpus = percpu::online_count() as u64;
    kernel.report.migrations = st.migrations;
    kernel.report.sched_steals = st.steals;
    kernel.report.sched_remote_wakeups = st.remote_wakeups;
    let (shootdowns, shootdown_ipis, _, timeouts) = shootdown::counts();
    kernel.report.ipis = ipi::counts().0 + shootdown_ipis;
    kernel.report.shootdowns = shootdowns;
    (kernel.report.tlb_rounds, kernel.report.tlb_stale) = smp_tests::totals();
    kernel.report.smp_stress_ops = smp_stress::ops_done();
    let (cpa_fast, cpa_split_races) = kspace::cpa_fast_counts();
    if let Some(cpa) = kspace::cpa_stats() {
        kernel.report.cpa_calls = cpa.calls;
        kernel.report.cpa_splits = cpa.splits;
    }
    kernel.report.cpa_fast = cpa_fast;
    kernel.report.cpa_split_races = cpa_split_races;
    kernel.report.cpa_faults_verified = cpa_tests::faults_verified();
    kernel.report.pagealloc_unmaps = pagealloc::unmaps();
    kernel.report.pagealloc_faults = pagealloc_tests::faults_caught();
    if timeouts != 0 {
        log::error!("{timeouts} TLB shootdown acknowledgements timed out");
        tally.failed += 1;
    }
    kernel.report.preemptions = st.preemptions;
    let lz = lazy::stats();
    kernel.report.lazy_batches = lz.batches;
    kernel.report.lazy_batches_preempted = lz.batches_preempted;
    kernel.report.lazy_migrations = lz.migrations;
    kernel.report.lazy_tick_us = lazy_tests::stress_tick_us();
    let km = kmap::stats();
    kernel.report.kmaps = km.kmaps;
    kernel.report.kmap_max_depth = km.max_depth;
    kernel.report.kmap_switch_remaps = km.switch_remaps;
    kernel.report.kmap_mismatches = kmap_tests::mismatches();
    kernel.report.kmap_lazy_joins = km.lazy_joins;
    kernel.report.highmem_frames_checked = kmap_tests::highmem_frames_checked();
    kernel.report.interrupts = traps::interrupts();
    kernel.report.selftests_passed = tally.passed;
    kernel.report.selftests_failed = tally.failed;
    (
        kernel.report.random_ops,
        kernel.report.random_mismatches,
        kernel.report.random_seed,
    ) = stress::figures();
    kernel.report.hypercalls = hypercall::raw::hypercall_count();
    kernel.report.mmu_update_entries = hypercall::mmu::issued_stats().mmu_update_entries;
    report::print(&kernel.report);
    let verdict = if tally.failed == 0 && tally.passed > 0 {
        Verdict::Pass
    } else {
        Verdict::Fail
    };
    shutdown::finish(verdict)
}

/// Crashes on purpose (`pvmmu.crash=`): the harness checks that a crash
/// ends in `PVMMU-RESULT FAIL`.
fn crash(kind: cmdline::CrashKind, kernel: &mut Kernel) {
    log::warn!("crashing on purpose: {kind:?}");
    match kind {
        cmdline::CrashKind::Panic => panic!("pvmmu.crash=panic"),
        // SAFETY: deliberately raises #UD; the handler does not return.
        cmdline::CrashKind::InvalidOpcode => unsafe { core::arch::asm!("ud2") },
        cmdline::CrashKind::PageFault => {
            // SAFETY: deliberately faults; the handler does not return.
            let v = unsafe { core::ptr::read_volatile(0x0000_7000_0000_0040 as *const u64) };
            log::error!("read of an unmapped address returned {v:#x}");
        }
        cmdline::CrashKind::StackOverflow => {
            let depth = recurse(0);
            log::error!("recursion returned at depth {depth}");
        }
        cmdline::CrashKind::KmapUnbalanced => kmap_tests::crash_unbalanced(),
        cmdline::CrashKind::UseAfterFree => pagealloc_tests::crash_use_after_free(kernel),
        cmdline::CrashKind::ThreadStackOverflow => {
            let overflow = |_: u64| recurse(0);
            match sched::spawn("overflow", overflow, 0).and_then(sched::join) {
                Ok(depth) => log::error!("thread recursion returned at depth {depth}"),
                Err(e) => log::error!("cannot run the overflowing thread: {e:?}"),
            }
        }
        cmdline::CrashKind::LazyPreemptible => {
            // Per-CPU lazy state read with preemption and interrupts on:
            // the run-time check must stop the kernel.
            let t = lazy::cpu_lazy_thread();
            log::error!("per-CPU lazy state read from preemptible code: {t:?}");
        }
    }
}

/// Recurses until the stack overflows (every frame keeps 512 live bytes).
fn recurse(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 64]);
    if depth == u64::MAX {
        return frame[0];
    }
    core::hint::black_box(recurse(depth + 1)) + frame[63]
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if PANICKING.swap(true, Ordering::SeqCst) {
        // A panic while panicking: do not print again, just stop.
        shutdown::power_off(Verdict::Fail);
    }
    // SAFETY: one CPU; the panicking code never resumes.
    unsafe { console::break_lock() };
    match info.location() {
        Some(loc) => kprintln!(
            "PANIC at {}:{}:{}: {}",
            loc.file(),
            loc.line(),
            loc.column(),
            info.message()
        ),
        None => kprintln!("PANIC: {}", info.message()),
    }
    shutdown::finish(Verdict::Fail)
}
