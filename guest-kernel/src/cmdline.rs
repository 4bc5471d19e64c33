//! The kernel command line and the boot options parsed from it.
//!
//! Invariant: the command line is copied into the kernel's own buffer at
//! entry (from `start_info.cmd_line` or `hvm_start_info.cmdline_paddr`), so
//! it stays valid after the loader's memory is reused (the buffer and its
//! checks are `hypercall::boot::cmdline`, tested on the host). Nothing is
//! dropped silently: a truncated or non-UTF-8 line, an unknown `pvmmu.*`
//! option, a bad value or an option that does not apply on this platform
//! each print a `PVMMU-WARNING` line ([`warn_about`]), which the harness
//! turns into a FAIL unless the boot expects it, and a line that lost
//! options fails the `cmdline_intact` self-test.

pub use hypercall::boot::cmdline::Cmdline;
use hypercall::boot::cmdline::{parse_number, OptionKind, OptionSpec};

use crate::platform::Platform;

/// Options that change what the kernel does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootOptions {
    /// `pvmmu.fail_selftest`: a self-test fails on purpose, so the harness
    /// can prove it notices (`PVMMU-RESULT FAIL`).
    pub fail_selftest: bool,
    /// `pvmmu.4k`: natively, build the direct map from 4 KiB pages only, to
    /// compare table counts with Xen PV.
    pub only_4k: bool,
    /// `pvmmu.bench`: run the in-kernel benchmarks after the self-tests
    /// (`BENCH` lines, see `crate::bench`).
    pub bench: bool,
    /// `pvmmu.bench_smp`: run only the benchmarks that depend on the CPU
    /// count (the TLB shootdowns), after the running kernel's self-tests
    /// (the SMP boots of `cargo xtask bench`).
    pub bench_smp: bool,
    /// `pvmmu.debug_pagealloc`: DEBUG_PAGEALLOC, every free frame unmapped
    /// from the direct map through CPA (see `crate::pagealloc`).
    pub debug_pagealloc: bool,
    /// `pvmmu.crash=panic|ud|pf|stack|thread-stack|lazy-preemptible|kmap-unbalanced|use-after-free`: crash on purpose after the self-tests,
    /// before the report, to exercise the panic and fatal-exception paths.
    pub crash: Option<CrashKind>,
    /// `pvmmu.seed=N`: the randomized stress replays this seed.
    pub seed: Option<u64>,
    /// `pvmmu.stress_ops=N`: operations of the randomized stress.
    pub stress_ops: Option<u64>,
    /// `pvmmu.lazy_tick_us=N`: the tick period, in us, while the lazy-MMU
    /// stress runs ([`LAZY_TICK_US`]; default: the normal 1 ms tick).
    pub lazy_tick_us: Option<u64>,
    /// `pvmmu.oracle_lines`: the oracle prints every request's line, not
    /// one hash per block of them (see `pvmmu::oracle`).
    pub oracle_lines: bool,
    /// `pvmmu.directmap_limit=MIB`: RAM at and above this many MiB is left
    /// out of the direct map and the frame allocator (highmem, reached
    /// through kmap only); checked by [`directmap_limit_pfn`].
    pub directmap_limit_mib: Option<u64>,
}

/// The lowest `pvmmu.directmap_limit` accepted: the kernel's image, Xen's
/// start-of-day area, the page tables and the self-tests' frames need it.
pub const MIN_DIRECTMAP_LIMIT_MIB: u64 = 64;

/// Why a `pvmmu.directmap_limit` is refused (the kernel then maps all RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitError {
    /// Below [`MIN_DIRECTMAP_LIMIT_MIB`].
    TooLow,
    /// Below the end of memory in use at boot (frame `end`).
    BelowBootMemory {
        /// One past the last frame in use at boot.
        end: u64,
    },
    /// At or above the end of RAM: nothing would be left out.
    NoHighmem {
        /// One past the last RAM frame.
        ram_end: u64,
    },
}

impl core::fmt::Display for LimitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LimitError::TooLow => write!(
                f,
                "pvmmu.directmap_limit below {MIN_DIRECTMAP_LIMIT_MIB} MiB (ignored)"
            ),
            LimitError::BelowBootMemory { end } => write!(
                f,
                "pvmmu.directmap_limit below memory in use at boot (up to {} KiB; ignored)",
                end * 4
            ),
            LimitError::NoHighmem { ram_end } => write!(
                f,
                "pvmmu.directmap_limit at or above the end of RAM ({} MiB): nothing is left out \
                 of the direct map",
                ram_end >> 8
            ),
        }
    }
}

/// The first frame left out of the direct map for a limit of `mib`, given
/// one past the last frame in use at boot and one past the last RAM frame.
pub fn directmap_limit_pfn(mib: u64, boot_end: u64, ram_end: u64) -> Result<u64, LimitError> {
    if mib < MIN_DIRECTMAP_LIMIT_MIB {
        return Err(LimitError::TooLow);
    }
    let pfn = mib.saturating_mul(256);
    if pfn < boot_end {
        return Err(LimitError::BelowBootMemory { end: boot_end });
    }
    if pfn >= ram_end {
        return Err(LimitError::NoHighmem { ram_end });
    }
    Ok(pfn)
}

/// The values `pvmmu.lazy_tick_us` accepts, in us: from Xen's default
/// timer slop (50 us) to the normal tick.
pub const LAZY_TICK_US: core::ops::RangeInclusive<u64> = 50..=1000;

/// A deliberate crash (`pvmmu.crash=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashKind {
    /// `panic!`.
    Panic,
    /// An unexpected invalid opcode (`ud2`).
    InvalidOpcode,
    /// An unexpected page fault (read of an unmapped address).
    PageFault,
    /// A stack overflow into the guard page (natively a #PF that becomes a
    /// #DF on the IST stack; under PV Xen cannot deliver the #PF and crashes
    /// the domain).
    StackOverflow,
    /// A spawned thread overflows its stack into its guard page (natively
    /// reported with the thread's name from the #DF handler; under PV Xen
    /// cannot deliver the #PF and crashes the domain).
    ThreadStackOverflow,
    /// Per-CPU lazy-MMU state read from preemptible code: the run-time
    /// check panics (`pvmmu.crash=lazy-preemptible`).
    LazyPreemptible,
    /// Two kmaps released out of order: the guard's drop panics naming
    /// the slot.
    KmapUnbalanced,
    /// A frame is freed and then read through the direct map: under
    /// `pvmmu.debug_pagealloc` the #PF report names the address and the
    /// frame.
    UseAfterFree,
}

/// Every `pvmmu.*` option the kernel knows.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "pvmmu.fail_selftest",
        kind: OptionKind::Flag,
    },
    OptionSpec {
        name: "pvmmu.4k",
        kind: OptionKind::Flag,
    },
    OptionSpec {
        name: "pvmmu.bench",
        kind: OptionKind::Flag,
    },
    OptionSpec {
        name: "pvmmu.bench_smp",
        kind: OptionKind::Flag,
    },
    OptionSpec {
        name: "pvmmu.crash",
        // Every value `BootOptions::parse` maps to a `CrashKind`.
        kind: OptionKind::Choice(&[
            "panic",
            "ud",
            "pf",
            "stack",
            "thread-stack",
            "lazy-preemptible",
            "kmap-unbalanced",
            "use-after-free",
        ]),
    },
    OptionSpec {
        name: "pvmmu.debug_pagealloc",
        kind: OptionKind::Flag,
    },
    OptionSpec {
        name: "pvmmu.seed",
        kind: OptionKind::Number,
    },
    OptionSpec {
        name: "pvmmu.stress_ops",
        kind: OptionKind::Number,
    },
    OptionSpec {
        name: "pvmmu.lazy_tick_us",
        kind: OptionKind::Number,
    },
    OptionSpec {
        name: "pvmmu.oracle_lines",
        kind: OptionKind::Flag,
    },
    OptionSpec {
        name: "pvmmu.directmap_limit",
        kind: OptionKind::Number,
    },
];

/// The prefix of the kernel's own options.
pub const OPTION_PREFIX: &str = "pvmmu.";

/// The marker of a warning line the harness fails a boot on.
pub const WARNING_MARKER: &str = "PVMMU-WARNING";

/// Prints one `PVMMU-WARNING cmdline: ...` line for each thing wrong with
/// `line` on `platform`, and returns how many.
pub fn warn_about(line: &Cmdline, options: &BootOptions, platform: Platform) -> u64 {
    let mut count = 0;
    if let Some(problem) = line.problem() {
        crate::kprintln!("{WARNING_MARKER} cmdline: {problem}");
        count += 1;
    }
    for warning in line.check_options(OPTION_PREFIX, OPTIONS) {
        crate::kprintln!("{WARNING_MARKER} cmdline: {warning}");
        count += 1;
    }
    if options.only_4k && platform == Platform::XenPv {
        crate::kprintln!(
            "{WARNING_MARKER} cmdline: pvmmu.4k has no effect under Xen PV (the direct map is \
             always built from 4 KiB pages there)"
        );
        count += 1;
    }
    let tick = line.value("pvmmu.lazy_tick_us").and_then(parse_number);
    if let Some(us) = tick.filter(|us| !LAZY_TICK_US.contains(us)) {
        crate::kprintln!(
            "{WARNING_MARKER} cmdline: pvmmu.lazy_tick_us={us} is outside {}..={} us (the \
             lazy stress keeps the normal tick)",
            LAZY_TICK_US.start(),
            LAZY_TICK_US.end()
        );
        count += 1;
    }
    if options.crash == Some(CrashKind::UseAfterFree) && !options.debug_pagealloc {
        crate::kprintln!(
            "{WARNING_MARKER} cmdline: pvmmu.crash=use-after-free needs pvmmu.debug_pagealloc \
             (without it a freed frame stays mapped and the read does not fault)"
        );
        count += 1;
    }
    count
}

impl BootOptions {
    /// Parses the options out of `line`; what it does not accept is reported
    /// by [`warn_about`].
    pub fn parse(line: &Cmdline) -> Self {
        BootOptions {
            fail_selftest: line.flag("pvmmu.fail_selftest"),
            only_4k: line.flag("pvmmu.4k"),
            bench: line.flag("pvmmu.bench"),
            bench_smp: line.flag("pvmmu.bench_smp"),
            debug_pagealloc: line.flag("pvmmu.debug_pagealloc"),
            crash: match line.value("pvmmu.crash") {
                Some("panic") => Some(CrashKind::Panic),
                Some("ud") => Some(CrashKind::InvalidOpcode),
                Some("pf") => Some(CrashKind::PageFault),
                Some("stack") => Some(CrashKind::StackOverflow),
                Some("thread-stack") => Some(CrashKind::ThreadStackOverflow),
                Some("lazy-preemptible") => Some(CrashKind::LazyPreemptible),
                Some("kmap-unbalanced") => Some(CrashKind::KmapUnbalanced),
                Some("use-after-free") => Some(CrashKind::UseAfterFree),
                _ => None,
            },
            seed: line.value("pvmmu.seed").and_then(parse_number),
            stress_ops: line.value("pvmmu.stress_ops").and_then(parse_number),
            lazy_tick_us: line
                .value("pvmmu.lazy_tick_us")
                .and_then(parse_number)
                .filter(|us| LAZY_TICK_US.contains(us)),
            oracle_lines: line.flag("pvmmu.oracle_lines"),
            directmap_limit_mib: line.value("pvmmu.directmap_limit").and_then(parse_number),
        }
    }
}
