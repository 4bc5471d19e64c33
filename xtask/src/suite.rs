//! `cargo xtask test` and `cargo xtask ci`: the host stages, then the boot
//! table, then a summary.
//!
//! Invariant: every boot the suite performs is one row of [`BOOTS`] (or
//! [`CI_BOOTS`] for `ci`), each with its expected result; every stage and
//! every row is counted exactly once in the closing `N passed, M failed`
//! line, and the suite exits 0 only if every one of them met its expectation.
//! A row that expects FAIL is met only by the kernel's own orderly
//! `PVMMU-RESULT FAIL` (a timeout or a crash is not the failure we asked for).

use std::time::{Duration, Instant};

use crate::boot;
use crate::build;
use crate::cli::{
    Mode, Profile, RunOptions, TestOptions, UsageError, XenVersion, FAIL_SELFTEST_KNOB,
};
use crate::error::XtaskError;
use crate::harness::{Echo, Failure, Outcome, Verdict};
use crate::host;
use crate::negative;
use crate::oracle;
use crate::qemu;
use crate::request::{self, BootRequest};
use crate::selftests;
use crate::toolchain::{self, Component};
use crate::workspace::{Workspace, KERNEL_PACKAGE, KERNEL_TARGET};
use crate::xl::guest::Guest;

/// What a boot must end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `PVMMU-RESULT PASS`, a valid report, the mode's platform.
    Pass,
    /// The kernel's own `PVMMU-RESULT FAIL`.
    Fail,
    /// A crash that Xen reports (the kernel cannot report it itself).
    XenCrash,
    /// A PASS but for the kernel's `PVMMU-WARNING` lines (a bad option).
    Warning,
}

impl Expect {
    fn name(self) -> &'static str {
        match self {
            Expect::Pass => "PASS",
            Expect::Fail => "FAIL",
            Expect::XenCrash => "CRASH",
            Expect::Warning => "WARNING",
        }
    }
}

/// A check a boot row adds to its expected result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The expected result is all.
    Nothing,
    /// The kernel's `NEGATIVE` lines under real Xen must equal the Xen
    /// model's (the `negative-model` binary of the tests crate).
    NegativeSuite,
    /// Some console line must contain this text (e.g. the kernel's own
    /// description of a deliberate crash).
    Console(&'static str),
    /// Native paging under a hypervisor: no `mmu_update` entry issued, and
    /// every self-test that passed in the table's plain native row (which
    /// must come earlier) passes here too.
    LikeNative,
}

/// Report counters every passing boot must show above zero: the running
/// kernel (interrupts, the tick, threads, lazy batches, kmap) is part of
/// every boot.
pub const RUNNING_KERNEL_COUNTERS: &[&str] = &[
    "timer_irqs",
    "context_switches",
    "lazy_batches_preempted",
    "kmaps",
];

/// The option that leaves RAM above a limit out of the direct map; a
/// passing row that sets it must report `highmem_frames_checked` > 0.
pub const DIRECTMAP_LIMIT_KNOB: &str = "pvmmu.directmap_limit=";

/// The kernel option that turns DEBUG_PAGEALLOC on.
pub const DEBUG_PAGEALLOC: &str = "pvmmu.debug_pagealloc";

/// DEBUG_PAGEALLOC and a read of a frame just freed: a deliberate crash.
pub const USE_AFTER_FREE_CRASH: &str = "pvmmu.debug_pagealloc pvmmu.crash=use-after-free";

/// What the kernel prints for [`USE_AFTER_FREE_CRASH`] (the frame and the
/// address follow).
pub const USE_AFTER_FREE_LINE: &str = "USE-AFTER-FREE: read of freed frame pfn 0x";

/// Report counters a passing boot with [`DEBUG_PAGEALLOC`] must show above
/// zero: frames unmapped from the direct map, use-after-free faults taken.
pub const PAGEALLOC_COUNTERS: &[&str] = &["pagealloc_unmaps", "pagealloc_faults"];

/// Random operations a passing Xen boot must report (`random_ops`, the
/// kernel's randomized stress on the live tree).
pub const MIN_RANDOM_OPS_UNDER_XEN: u64 = 200_000;

/// One row of the boot table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Boot {
    /// How to boot.
    pub mode: Mode,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Kernel command line.
    pub cmdline: &'static str,
    /// What the boot must end with.
    pub expect: Expect,
    /// What else a passing boot must show.
    pub check: Check,
    /// CPUs (QEMU `-smp`; the domU's vCPUs in `xl` mode).
    pub smp: u32,
    /// The domU type (`--mode xl` only; PV unless [`Boot::guest`] says).
    pub guest: Guest,
    /// The Xen of a `--mode xen` row (4.17 unless [`Boot::on`] says).
    pub xen: XenVersion,
}

impl Boot {
    /// The same row under another Xen.
    const fn on(self, xen: XenVersion) -> Boot {
        Boot { xen, ..self }
    }
}

const fn boot(
    mode: Mode,
    memory_mib: u64,
    cmdline: &'static str,
    expect: Expect,
    check: Check,
) -> Boot {
    Boot {
        mode,
        memory_mib,
        cmdline,
        expect,
        check,
        smp: 1,
        guest: Guest::Pv,
        xen: XenVersion::V4_17,
    }
}

impl Boot {
    /// The same row with `n` CPUs.
    pub const fn smp(mut self, n: u32) -> Boot {
        self.smp = n;
        self
    }
}

/// The lazy-MMU stress with a 100 us tick (issue 11).
pub const FAST_LAZY_TICK: &str = "pvmmu.lazy_tick_us=100";

/// Every boot `cargo xtask test` performs, in order. One line per boot: add
/// memory sizes and command-line variants here.
/// Columns: mode, guest MiB, kernel command line, expected result, extra check.
#[rustfmt::skip]
pub const BOOTS: &[Boot] = &[
    //   mode          MiB  kernel command line   expected          extra check
    boot(Mode::Native, 512, "",                   Expect::Pass,     Check::Nothing),
    boot(Mode::Xen,    512, "",                   Expect::Pass,     Check::NegativeSuite),
    boot(Mode::Xen,    512, "",                   Expect::Pass,     Check::NegativeSuite).on(XenVersion::V4_20),
    // Issue 4: the direct-map bootstrap at several sizes (every page mapped
    // and touched; under PV within 8 hypercalls and 1,100 entries per GiB).
    boot(Mode::Xen,    256, "",                   Expect::Pass,     Check::NegativeSuite),
    boot(Mode::Xen,   1024, "",                   Expect::Pass,     Check::NegativeSuite),
    boot(Mode::Xen,   2048, "",                   Expect::Pass,     Check::NegativeSuite),
    // 3 GiB: QEMU puts 1 GiB of it above 4 GiB, past the PCI hole.
    boot(Mode::Native, 3072, "",                  Expect::Pass,     Check::Nothing),
    // 4 KiB pages only natively, table for table comparable with PV.
    boot(Mode::Native, 512, "pvmmu.4k",           Expect::Pass,     Check::Nothing),
    // Issue 5: a PV domU built by `xl create` in an emulated Linux dom0
    // (about 12 s warm, plus about 8 s for a cold dom0 fixture).
    boot(Mode::Xl,     512, DEBUG_PAGEALLOC,      Expect::Pass,     Check::NegativeSuite),
    // Issue 14: the same ELF as an `xl` PVH domU: native paging under Xen.
    boot(Mode::Xl,     512, "",                   Expect::Pass,     Check::LikeNative).guest(Guest::Pvh),
    // The deliberate failure: proves the harness tells FAIL from PASS.
    boot(Mode::Native, 512, FAIL_SELFTEST_KNOB,   Expect::Fail,     Check::Nothing),
    boot(Mode::Xen,    512, FAIL_SELFTEST_KNOB,   Expect::Fail,     Check::Nothing),
    // A crash only Xen can report (a stack overflow: Xen cannot deliver the
    // #PF and kills the domain): the harness catches what the kernel cannot print.
    boot(Mode::Xen,    512, "pvmmu.crash=stack",  Expect::XenCrash, Check::Nothing),
    // Issue 9: a kernel thread overflows its stack into its guard page.
    // Natively the #DF handler names the thread; under PV Xen cannot
    // deliver the #PF on the overflowed stack and kills the domain; its
    // dump must show the guest on a thread stack (kernel stack area, L4
    // slot 403 at 0xffffc98000000000), not the boot stack.
    boot(Mode::Native, 512, "pvmmu.crash=thread-stack", Expect::Fail,
         Check::Console("STACK OVERFLOW: thread 'overflow' hit its stack guard page")),
    // Per-CPU lazy-MMU state used from preemptible code: the run-time check
    // stops the kernel.
    boot(Mode::Native, 512, "pvmmu.crash=lazy-preemptible", Expect::Fail,
         Check::Console("BUG: lazy MMU per-CPU state used from preemptible code")),
    boot(Mode::Xen,    512, "pvmmu.crash=thread-stack", Expect::XenCrash,
         Check::Console("Guest stack trace from rsp=ffffc980")),
    // Issue 10: every CPU up, threads and ticks on all of them, and the
    // cross-CPU stale-translation test (10,000 rounds) with zero stale
    // accesses (`tlb_stale` checked for every row with cpus > 1).
    // Issue 11: the 2-CPU rows run the lazy-MMU stress with a 100 us tick
    // (the report's lazy_tick_us must say so).
    boot(Mode::Native, 512, FAST_LAZY_TICK,       Expect::Pass,     Check::Nothing).smp(2),
    boot(Mode::Native, 512, "",                   Expect::Pass,     Check::Nothing).smp(4),
    boot(Mode::Xen,    512, FAST_LAZY_TICK,       Expect::Pass,     Check::NegativeSuite).smp(2),
    boot(Mode::Xen,    512, "",                   Expect::Pass,     Check::NegativeSuite).smp(4),
    boot(Mode::Xl,     512, FAST_LAZY_TICK,       Expect::Pass,     Check::NegativeSuite).smp(2),
    // Issue 12: DEBUG_PAGEALLOC, every free frame out of the direct map
    // (natively split to 4 KiB through CPA first) for the running
    // kernel's suites; `pagealloc_unmaps` and `pagealloc_faults` checked
    // (see `judge`). The xl domU row above (issue 5) runs with it too.
    boot(Mode::Native, 512, DEBUG_PAGEALLOC,      Expect::Pass,     Check::Nothing),
    boot(Mode::Xen,    512, DEBUG_PAGEALLOC,      Expect::Pass,     Check::NegativeSuite),
    // A read of a freed frame: the fatal #PF names the frame and address.
    // Under PV the freed frame's direct-map entry is a hole written
    // through Xen, and the #PF reaches the kernel through Xen's trap
    // bounce (dom0 and an `xl` domU).
    boot(Mode::Native, 512, USE_AFTER_FREE_CRASH, Expect::Fail,
         Check::Console(USE_AFTER_FREE_LINE)),
    boot(Mode::Xen,    512, USE_AFTER_FREE_CRASH, Expect::Fail,
         Check::Console(USE_AFTER_FREE_LINE)),
    boot(Mode::Xl,     512, USE_AFTER_FREE_CRASH, Expect::Fail,
         Check::Console(USE_AFTER_FREE_LINE)),
    // A limit below what the kernel needs is refused with the warning too.
    boot(Mode::Native, 512, "pvmmu.bogus pvmmu.crash=bogus pvmmu.lazy_tick_us=5 pvmmu.directmap_limit=16",
         Expect::Warning, Check::Console("pvmmu.directmap_limit below 64 MiB")),
    boot(Mode::Xen,    512, "pvmmu.4k",           Expect::Warning,  Check::Nothing),
    // Issue 13: two kmaps released out of order; the guard's drop fails
    // loudly, naming the slot (the kmap self-tests run in every PASS row).
    boot(Mode::Native, 512, "pvmmu.crash=kmap-unbalanced", Expect::Fail,
         Check::Console("KMAP UNBALANCED: out-of-order release of kmap slot 0")),
    boot(Mode::Xen,    512, "pvmmu.crash=kmap-unbalanced", Expect::Fail,
         Check::Console("KMAP UNBALANCED: out-of-order release of kmap slot 0")),
    // RAM above 256 MiB left out of the direct map (highmem): every frame
    // there zeroed, filled and checked through kmap (highmem_frames_checked > 0).
    boot(Mode::Native, 512, "pvmmu.directmap_limit=256", Expect::Pass, Check::Nothing),
    boot(Mode::Xen,    512, "pvmmu.directmap_limit=256", Expect::Pass, Check::NegativeSuite),
];

/// The boots `cargo xtask ci` adds to [`BOOTS`] (none at present: the xl
/// boot is cheap enough, about 12 s, to be part of `test`).
#[rustfmt::skip]
pub const CI_BOOTS: &[Boot] = &[
];

/// The loom stage (run with `RUSTFLAGS="--cfg loom"`, see `run`).
pub const LOOM_STAGE: (&str, &[&str]) = (
    "loom: TLB shootdown, lazy-mode hand-off, table install (pvmmu)",
    &[
        "test",
        "-p",
        "pvmmu",
        "--test",
        "loom_shootdown",
        "--test",
        "loom_lazy",
        "--test",
        "loom_split",
        "--release",
    ],
);

/// The host stages: a name and cargo's arguments.
pub const HOST_STAGES: &[(&str, &[&str])] = &[
    (
        "cargo test (host crates)",
        &[
            "test",
            "--workspace",
            "--exclude",
            KERNEL_PACKAGE,
            "--no-fail-fast",
        ],
    ),
    (
        "cargo clippy (host crates)",
        &[
            "clippy",
            "--workspace",
            "--exclude",
            KERNEL_PACKAGE,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    ),
    (
        "cargo clippy (guest-kernel)",
        &[
            "clippy",
            "-p",
            KERNEL_PACKAGE,
            "--target",
            KERNEL_TARGET,
            "--",
            "-D",
            "warnings",
        ],
    ),
    ("cargo fmt --check", &["fmt", "--all", "--check"]),
];

impl Boot {
    /// This row with another `xl` guest type.
    pub const fn guest(self, guest: Guest) -> Boot {
        Boot { guest, ..self }
    }

    /// The run options of this row.
    pub fn options(&self) -> RunOptions {
        RunOptions {
            mode: self.mode,
            memory_mib: self.memory_mib,
            cmdline: self.cmdline.to_string(),
            smp: self.smp,
            guest: self.guest,
            xen: self.xen,
            ..RunOptions::default()
        }
    }

    /// `boot xen 512 MiB pvmmu.fail_selftest`, `boot xl pvh 512 MiB`.
    pub fn name(&self) -> String {
        let mut name = format!("boot {}", self.mode.name());
        if self.guest != Guest::Pv {
            name.push(' ');
            name.push_str(self.guest.name());
        }
        name.push_str(&format!(" {} MiB", self.memory_mib));
        if self.smp > 1 {
            name.push_str(&format!(" smp {}", self.smp));
        }
        if self.xen != XenVersion::V4_17 {
            name.push_str(&format!(" (Xen {})", self.xen.name()));
        }
        if !self.cmdline.is_empty() {
            name.push(' ');
            name.push_str(self.cmdline);
        }
        name
    }
}

/// The `platform` a passing report must show in each mode (and guest type).
pub fn expected_platform(mode: Mode, guest: Guest) -> &'static str {
    match mode {
        Mode::Native => "native",
        Mode::Xen => "xen-pv",
        Mode::Xl => guest.platform(),
    }
}

/// Whether `verdict` meets the row's expectation; `Err` says why not.
pub fn judge(row: &Boot, verdict: &Verdict) -> Result<(), String> {
    match (row.expect, verdict) {
        (Expect::Pass, Verdict::Pass(report)) => {
            let want = expected_platform(row.mode, row.guest);
            if report.platform != want {
                return Err(format!(
                    "platform is {:?}, expected {want:?}",
                    report.platform
                ));
            }
            // Under real Xen the randomized stress must have run in full.
            let random_ops = report.counter("random_ops").unwrap_or(0);
            if row.mode != Mode::Native && random_ops < MIN_RANDOM_OPS_UNDER_XEN {
                return Err(format!(
                    "random_ops is {random_ops}: a Xen boot must run at least \
                     {MIN_RANDOM_OPS_UNDER_XEN} random operations"
                ));
            }
            if let Some(key) = RUNNING_KERNEL_COUNTERS
                .iter()
                .find(|key| report.counter(key).unwrap_or(0) == 0)
            {
                return Err(format!("report counter {key} is 0 or missing"));
            }
            if row.cmdline.contains(DIRECTMAP_LIMIT_KNOB)
                && report.counter("highmem_frames_checked").unwrap_or(0) == 0
            {
                return Err("highmem_frames_checked is 0 or missing: no frame above \
                     pvmmu.directmap_limit was checked through kmap"
                    .into());
            }
            if row.cmdline.split_whitespace().any(|w| w == DEBUG_PAGEALLOC) {
                if let Some(key) = PAGEALLOC_COUNTERS
                    .iter()
                    .find(|key| report.counter(key).unwrap_or(0) == 0)
                {
                    return Err(format!(
                        "report counter {key} is 0 or missing under {DEBUG_PAGEALLOC}"
                    ));
                }
            }
            smp_judgement(row, report)?;
            lazy_tick_judgement(row, report)
        }
        (Expect::Pass, Verdict::Fail(failure)) => Err(failure.to_string()),
        (Expect::Fail, Verdict::Fail(failure)) if failure.is_result_fail() => Ok(()),
        (Expect::Fail, Verdict::Fail(failure)) => Err(format!(
            "expected the kernel's own PVMMU-RESULT FAIL, got: {failure}"
        )),
        (Expect::Fail, Verdict::Pass(_)) => {
            Err("PASS although a self-test was made to fail".into())
        }
        (Expect::XenCrash, Verdict::Fail(Failure::XenCrash { .. })) => Ok(()),
        (Expect::XenCrash, Verdict::Fail(failure)) => {
            Err(format!("expected Xen to report a crash, got: {failure}"))
        }
        (Expect::Warning, Verdict::Fail(Failure::Warnings { .. })) => Ok(()),
        (Expect::Warning, Verdict::Fail(failure)) => Err(format!(
            "expected a PASS with PVMMU-WARNING lines for a bad option, got: {failure}"
        )),
        (Expect::Warning, Verdict::Pass(_)) => {
            Err("PASS without the PVMMU-WARNING line a bad option must give".into())
        }
        (Expect::XenCrash, Verdict::Pass(_)) => {
            Err("PASS although the kernel was made to crash".into())
        }
    }
}

/// A row with several CPUs must have all of them online and the
/// stale-translation rounds run with no stale access.
fn smp_judgement(row: &Boot, report: &crate::report::Report) -> Result<(), String> {
    if row.smp <= 1 {
        return Ok(());
    }
    let cpus = report.counter("cpus").unwrap_or(0);
    if cpus != u64::from(row.smp) {
        return Err(format!("cpus is {cpus}, expected {}", row.smp));
    }
    // A domU runs a tenth of the rounds (its busy vCPUs share the CPUs
    // with dom0's; see smp_tests.rs).
    let need = if row.mode == Mode::Xl { 1_000 } else { 10_000 };
    let rounds = report.counter("tlb_rounds").unwrap_or(0);
    let stale = report.counter("tlb_stale").unwrap_or(u64::MAX);
    if rounds < need || stale != 0 {
        return Err(format!(
            "stale-translation test: {rounds} rounds (need {need}), {stale} stale accesses"
        ));
    }
    // The concurrent stress of the shared address space (smp_stress.rs):
    // 100,000 operations under Xen PV (the domU's too), 10,000 natively
    // (each a shootdown waiting for every CPU: 3.9 ms under TCG on 4 CPUs).
    let need = if row.mode == Mode::Native {
        10_000
    } else {
        100_000
    };
    let ops = report.counter("smp_stress_ops").unwrap_or(0);
    if ops < need {
        return Err(format!(
            "concurrent stress: smp_stress_ops is {ops}, need {need}"
        ));
    }
    // Natively with large pages: CPA's lockless path ran, and the CPA
    // self-test's CPUs raced for the same large page (a lockless check
    // counted a split that the locked re-check found done by another CPU).
    if row.mode == Mode::Native && !row.cmdline.contains("pvmmu.4k") {
        let fast = report.counter("cpa_fast").unwrap_or(0);
        let races = report.counter("cpa_split_races").unwrap_or(0);
        if fast == 0 || races == 0 {
            return Err(format!(
                "lockless CPA: cpa_fast is {fast}, cpa_split_races is {races}, need both above 0"
            ));
        }
    }
    // The per-CPU run queues (runq_tests.rs): idle CPUs stole queued
    // threads, and wake-ups crossed CPUs with an IPI.
    if let Some(key) = SMP_SCHED_COUNTERS
        .iter()
        .find(|key| report.counter(key).unwrap_or(0) == 0)
    {
        return Err(format!(
            "report counter {key} is 0 or missing on an SMP row"
        ));
    }
    Ok(())
}

/// Report counters every passing row with several CPUs must show above
/// zero: threads stolen from another CPU's run queue, and wake-ups that
/// queued a thread on another CPU (with a reschedule IPI).
pub const SMP_SCHED_COUNTERS: &[&str] = &["sched_steals", "sched_remote_wakeups"];

/// A row that sets `pvmmu.lazy_tick_us=N` must report that the lazy
/// stress ran with that tick.
fn lazy_tick_judgement(row: &Boot, report: &crate::report::Report) -> Result<(), String> {
    let Some(want) = row
        .cmdline
        .split_whitespace()
        .find_map(|o| o.strip_prefix("pvmmu.lazy_tick_us="))
    else {
        return Ok(());
    };
    let got = report.counter("lazy_tick_us");
    if got.map(|us| us.to_string()).as_deref() != Some(want) {
        return Err(format!(
            "lazy_tick_us is {got:?}: the lazy stress must run with the {want} us tick the row asks for"
        ));
    }
    Ok(())
}

/// The rows a suite runs.
pub fn rows(with_xl: bool) -> Vec<Boot> {
    let mut rows = BOOTS.to_vec();
    if with_xl {
        rows.extend_from_slice(CI_BOOTS);
    }
    rows
}

/// Checks every row against the host before anything runs.
pub fn validate(rows: &[Boot], available_mib: Option<u64>) -> Result<(), UsageError> {
    rows.iter()
        .try_for_each(|row| boot::validate(&row.options(), available_mib))
}

/// One line of the summary.
#[derive(Clone, Debug)]
struct Line {
    name: String,
    expected: &'static str,
    got: String,
    ok: bool,
    elapsed: Duration,
    detail: String,
}

fn stage_line(name: &str, error: Option<&XtaskError>, elapsed: Duration) -> Line {
    Line {
        name: name.to_string(),
        expected: "ok",
        got: if error.is_none() { "ok" } else { "error" }.to_string(),
        ok: error.is_none(),
        elapsed,
        detail: error.map(ToString::to_string).unwrap_or_default(),
    }
}

fn got_name(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Pass(_) => "PASS".into(),
        Verdict::Fail(Failure::ResultFail { .. }) => "FAIL".into(),
        Verdict::Fail(Failure::Timeout { .. }) => "TIMEOUT".into(),
        Verdict::Fail(Failure::XenCrash { .. }) => "CRASH".into(),
        Verdict::Fail(Failure::Warnings { .. }) => "WARNING".into(),
        Verdict::Fail(Failure::QemuExited { .. }) => "EXITED".into(),
        Verdict::Fail(_) => "BAD".into(),
    }
}

fn boot_line(row: &Boot, outcome: &Result<Outcome, XtaskError>) -> Line {
    let name = row.name();
    let expected = row.expect.name();
    match outcome {
        Err(error) => Line {
            name,
            expected,
            got: "error".into(),
            ok: false,
            elapsed: Duration::ZERO,
            detail: error.to_string(),
        },
        Ok(outcome) => {
            let judgement = judge(row, &outcome.verdict);
            let detail = match (&judgement, outcome.verdict.report()) {
                (Err(why), _) => format!("{why} (log: {})", outcome.log_path.display()),
                (Ok(()), Some(report)) => report.summary(),
                (Ok(()), None) => match &outcome.verdict {
                    Verdict::Fail(failure) => failure.to_string(),
                    Verdict::Pass(_) => String::new(),
                },
            };
            Line {
                name,
                expected,
                got: got_name(&outcome.verdict),
                ok: judgement.is_ok(),
                elapsed: outcome.elapsed,
                detail,
            }
        }
    }
}

fn format_duration(elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        format!("{}m{:02}s", elapsed.as_secs() / 60, elapsed.as_secs() % 60)
    }
}

/// The summary table and the closing `N passed, M failed` line.
fn summary(lines: &[Line], total: Duration) -> String {
    let width = lines.iter().map(|l| l.name.len()).max().unwrap_or(0).max(5);
    let mut text = format!(
        "{:>2}  {:<width$}  {:<8}  {:<7}  {:<6}  {:>7}  detail\n",
        "#", "stage", "expected", "got", "status", "time"
    );
    for (index, line) in lines.iter().enumerate() {
        let row = format!(
            "{:>2}  {:<width$}  {:<8}  {:<7}  {:<6}  {:>7}  {}",
            index + 1,
            line.name,
            line.expected,
            line.got,
            if line.ok { "ok" } else { "FAILED" },
            format_duration(line.elapsed),
            line.detail
        );
        text.push_str(row.trim_end());
        text.push('\n');
    }
    let passed = lines.iter().filter(|l| l.ok).count();
    text.push_str(&format!("total time {}\n", format_duration(total)));
    text.push_str(&format!("{passed} passed, {} failed", lines.len() - passed));
    text
}

/// Runs the suite; returns whether everything met its expectation.
pub fn run(ws: &Workspace, options: TestOptions, with_xl: bool) -> Result<bool, XtaskError> {
    let rows = rows(with_xl);
    let start = Instant::now();
    qemu::ensure_installed()?;
    toolchain::ensure(ws, &[Component::Rustfmt, Component::Clippy])?;
    let mut lines = Vec::new();
    // The Xen model's negative-suite answers, computed once if a row needs them.
    let mut model_negative: Option<Result<Vec<String>, String>> = None;
    // The self-tests the plain native row passed, for `Check::LikeNative`.
    let mut native_passed = std::collections::BTreeSet::new();

    for (name, args) in HOST_STAGES {
        let mut command = build::cargo(ws);
        command.args(*args);
        eprintln!("\n==> {name}: {}", host::describe(&command));
        let stage_start = Instant::now();
        let result = host::run(&mut command);
        lines.push(stage_line(
            name,
            result.as_ref().err(),
            stage_start.elapsed(),
        ));
    }
    {
        // The TLB shootdown protocol and the lazy-mode hand-off,
        // model-checked with loom. Everything
        // is built with `--cfg loom`, so in its own target directory.
        let (name, args) = LOOM_STAGE;
        let mut command = build::cargo(ws);
        command
            .args(args)
            .env("RUSTFLAGS", "--cfg loom")
            .env("CARGO_TARGET_DIR", ws.target_dir.join("loom"));
        eprintln!(
            "\n==> {name}: RUSTFLAGS=\"--cfg loom\" {}",
            host::describe(&command)
        );
        let stage_start = Instant::now();
        let result = host::run(&mut command);
        lines.push(stage_line(
            name,
            result.as_ref().err(),
            stage_start.elapsed(),
        ));
    }

    eprintln!("\n==> build the guest kernel");
    let build_start = Instant::now();
    let kernel = build::kernel(ws, Profile::Release);
    lines.push(stage_line(
        "cargo build guest-kernel (release)",
        kernel.as_ref().err(),
        build_start.elapsed(),
    ));

    for row in &rows {
        eprintln!("\n==> {}", row.name());
        let Ok(kernel) = &kernel else {
            lines.push(Line {
                name: row.name(),
                expected: row.expect.name(),
                got: "skipped".into(),
                ok: false,
                elapsed: Duration::ZERO,
                detail: "not booted: the guest kernel did not build".into(),
            });
            continue;
        };
        let run_options = row.options();
        let request = BootRequest {
            kernel: kernel.clone(),
            label: request::label(&run_options),
            options: run_options,
            echo: if options.verbose {
                Echo::All
            } else {
                Echo::Markers
            },
        };
        let outcome = boot::boot(ws, &request);
        let mut line = boot_line(row, &outcome);
        if let (true, Check::NegativeSuite, Ok(outcome)) = (line.ok, row.check, &outcome) {
            let model = model_negative.get_or_insert_with(|| {
                negative::model_lines(ws).map_err(|error| error.to_string())
            });
            let compared = model
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|model| negative::compare(model, &negative::lines(&outcome.transcript)));
            match compared {
                Ok(()) => line.detail.push_str(" negative-suite=model"),
                Err(why) => {
                    line.ok = false;
                    line.got = "DIFF".into();
                    line.detail = why;
                }
            }
            // Every Xen PV row runs the oracle's random requests too.
            let domain = match row.mode {
                Mode::Xl => oracle::Domain::DomU,
                _ => oracle::Domain::Dom0,
            };
            let oracle = oracle::check(ws, &outcome.transcript, domain).and_then(|c| {
                let c =
                    c.ok_or_else(|| "the kernel printed no ORACLE lines under Xen".to_string())?;
                c.verdict().map(|()| c.figures())
            });
            match (line.ok, oracle) {
                (true, Ok(figures)) => {
                    line.detail.push(' ');
                    line.detail.push_str(&figures);
                }
                (true, Err(why)) => {
                    line.ok = false;
                    line.got = "DIFF".into();
                    line.detail = why;
                }
                (false, _) => {}
            }
        }
        if let (true, Check::Console(text), Ok(outcome)) = (line.ok, row.check, &outcome) {
            if !outcome.transcript.iter().any(|l| l.contains(text)) {
                line.ok = false;
                line.got = "NO-LINE".into();
                line.detail = format!("no console line contains {text:?}");
            }
        }
        if let (true, Ok(outcome)) = (line.ok, &outcome) {
            if row.is_plain_native_pass() {
                native_passed =
                    selftests::with_outcome(&outcome.transcript, selftests::Outcome::Passed);
            }
            if row.check == Check::LikeNative {
                match like_native(&native_passed, outcome) {
                    Ok(()) => line
                        .detail
                        .push_str(&format!(" native-selftests={}", native_passed.len())),
                    Err(why) => {
                        line.ok = false;
                        line.got = "DIFF".into();
                        line.detail = why;
                    }
                }
            }
        }
        if !line.ok {
            if let Ok(outcome) = &outcome {
                print_tail(outcome);
            }
        }
        eprintln!(
            "[{}] {} in {}: {}",
            row.name(),
            if line.ok { "ok" } else { "FAILED" },
            format_duration(line.elapsed),
            line.detail
        );
        lines.push(line);
    }

    let all_ok = lines.iter().all(|l| l.ok);
    println!("\n{}", summary(&lines, start.elapsed()));
    Ok(all_ok)
}

impl Boot {
    /// The row whose passed self-tests [`Check::LikeNative`] rows compare with.
    fn is_plain_native_pass(&self) -> bool {
        self.mode == Mode::Native && self.cmdline.is_empty() && self.expect == Expect::Pass
    }
}

/// [`Check::LikeNative`] on a passing boot.
fn like_native(
    native_passed: &std::collections::BTreeSet<String>,
    outcome: &Outcome,
) -> Result<(), String> {
    let report = outcome
        .verdict
        .report()
        .ok_or("no report to check".to_string())?;
    match report.counter("mmu_update_entries") {
        Some(0) => {}
        other => return Err(format!("mmu_update_entries is {other:?}, expected 0")),
    }
    selftests::compare_with_native(native_passed, &outcome.transcript)
}

/// The last lines of a failed boot's console, for the CI log.
fn print_tail(outcome: &Outcome) {
    const TAIL: usize = 40;
    let skip = outcome.transcript.len().saturating_sub(TAIL);
    eprintln!(
        "---- last {} console lines (full log: {}) ----",
        outcome.transcript.len() - skip,
        outcome.log_path.display()
    );
    for line in &outcome.transcript[skip..] {
        eprintln!("| {line}");
    }
    eprintln!("----");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::parse_report;

    fn report(platform: &str, failed: u64) -> crate::report::Report {
        parse_report(&format!(
            r#"{{"platform":"{platform}","mem_mib":512,"pages_mapped":1,"tables_created":1,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1,"selftests_passed":3,"selftests_failed":{failed},"random_ops":200000,"timer_irqs":7,"context_switches":5,"lazy_batches_preempted":2,"kmaps":9}}"#
        ))
        .unwrap()
    }

    #[test]
    fn table_has_pass_and_deliberate_failure_in_both_modes() {
        for mode in [Mode::Native, Mode::Xen] {
            assert!(BOOTS
                .iter()
                .any(|b| b.mode == mode && b.expect == Expect::Pass));
            assert!(BOOTS.iter().any(|b| b.mode == mode
                && b.expect == Expect::Fail
                && b.options().kernel_cmdline().contains(FAIL_SELFTEST_KNOB)));
        }
        assert!(BOOTS
            .iter()
            .any(|b| b.mode == Mode::Xen && b.expect == Expect::XenCrash));
        // The xl domU boot is part of `test` itself (issue 5).
        assert!(rows(false).iter().any(|b| b.mode == Mode::Xl));
    }

    #[test]
    fn pvh_row_runs_after_the_native_row_it_is_compared_with() {
        let rows = rows(false);
        let pvh = rows
            .iter()
            .position(|b| b.mode == Mode::Xl && b.guest == Guest::Pvh)
            .expect("an xl PVH row (issue 14)");
        assert_eq!(rows[pvh].memory_mib, 512);
        assert_eq!(rows[pvh].check, Check::LikeNative);
        assert_eq!(rows[pvh].name(), "boot xl pvh 512 MiB");
        assert_eq!(rows[pvh].options().guest, Guest::Pvh);
        for (i, row) in rows.iter().enumerate() {
            if row.check == Check::LikeNative {
                assert!(rows[..i].iter().any(Boot::is_plain_native_pass), "{row:?}");
            }
            // Only xl rows choose a guest type.
            assert!(row.mode == Mode::Xl || row.guest == Guest::Pv, "{row:?}");
        }
    }

    fn outcome(report_json: &str, transcript: &str) -> Outcome {
        Outcome {
            verdict: Verdict::Pass(parse_report(report_json).unwrap()),
            transcript: transcript.lines().map(str::to_string).collect(),
            elapsed: Duration::ZERO,
            log_path: Default::default(),
        }
    }

    #[test]
    fn like_native_needs_no_mmu_update_and_the_native_tests() {
        let native: std::collections::BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let json = |entries: u64| {
            format!(
                r#"{{"platform":"xen-pvh","mem_mib":512,"pages_mapped":1,"tables_created":1,"hypercalls":9,"mmu_update_entries":{entries},"map_cycles":1,"selftests_passed":3,"selftests_failed":0}}"#
            )
        };
        let all = "selftest a ... ok
selftest b ... ok
selftest xen_pvh_c ... ok";
        assert_eq!(like_native(&native, &outcome(&json(0), all)), Ok(()));
        assert!(like_native(&native, &outcome(&json(1), all))
            .unwrap_err()
            .contains("mmu_update_entries"));
        assert!(
            like_native(&native, &outcome(&json(0), "selftest a ... ok"))
                .unwrap_err()
                .contains("b (not run)")
        );
    }

    #[test]
    fn every_row_is_valid_on_a_machine_with_8_gib() {
        assert_eq!(validate(&rows(true), Some(8 * 1024)), Ok(()));
        assert!(validate(&rows(false), Some(256)).is_err());
    }

    #[test]
    fn passing_xen_rows_compare_the_negative_suite() {
        let xen_pass = BOOTS
            .iter()
            .filter(|b| b.mode == Mode::Xen && b.expect == Expect::Pass);
        for row in xen_pass {
            assert_eq!(row.check, Check::NegativeSuite, "{row:?}");
        }
    }

    #[test]
    fn a_dom0_row_runs_under_xen_4_20_with_the_model_comparison() {
        let rows: Vec<_> = BOOTS
            .iter()
            .filter(|b| b.xen == XenVersion::V4_20)
            .collect();
        assert!(!rows.is_empty());
        for row in rows {
            assert_eq!((row.mode, row.check), (Mode::Xen, Check::NegativeSuite));
            assert_eq!(row.options().xen, XenVersion::V4_20);
            assert!(row.name().contains("Xen 4.20"), "{}", row.name());
        }
    }

    #[test]
    fn bad_option_rows_expect_the_warning() {
        for cmdline in [
            "pvmmu.bogus",
            "pvmmu.crash=bogus",
            "pvmmu.4k",
            "pvmmu.lazy_tick_us=5",
            "pvmmu.directmap_limit=16",
        ] {
            assert!(BOOTS
                .iter()
                .any(|b| b.cmdline.contains(cmdline) && b.expect == Expect::Warning));
        }
        let row = boot(
            Mode::Native,
            512,
            "pvmmu.bogus",
            Expect::Warning,
            Check::Nothing,
        );
        let warned = Verdict::Fail(Failure::Warnings {
            first: "cmdline: unknown option `pvmmu.bogus` ignored".into(),
            count: 1,
        });
        assert_eq!(judge(&row, &warned), Ok(()));
        assert!(judge(&row, &Verdict::Fail(Failure::DuplicateResult)).is_err());
    }

    #[test]
    fn judging_rows() {
        let pass_xen = boot(Mode::Xen, 512, "", Expect::Pass, Check::Nothing);
        assert_eq!(
            judge(&pass_xen, &Verdict::Pass(report("xen-pv", 0))),
            Ok(())
        );
        assert!(judge(&pass_xen, &Verdict::Pass(report("native", 0)))
            .unwrap_err()
            .contains("platform"));
        // A kernel that never took a tick or switched threads does not pass.
        let still = parse_report(
            r#"{"platform":"xen-pv","mem_mib":512,"pages_mapped":1,"tables_created":1,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1,"selftests_passed":3,"selftests_failed":0,"random_ops":200000,"timer_irqs":0,"context_switches":5}"#,
        )
        .unwrap();
        assert!(judge(&pass_xen, &Verdict::Pass(still))
            .unwrap_err()
            .contains("timer_irqs"));
        // Nor one whose lazy batches were never preempted.
        let unpreempted = parse_report(
            r#"{"platform":"xen-pv","mem_mib":512,"pages_mapped":1,"tables_created":1,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1,"selftests_passed":3,"selftests_failed":0,"random_ops":200000,"timer_irqs":7,"context_switches":5,"lazy_batches_preempted":0}"#,
        )
        .unwrap();
        assert!(judge(&pass_xen, &Verdict::Pass(unpreempted))
            .unwrap_err()
            .contains("lazy_batches_preempted"));
        // Nor one that made no kmap (the xl rows included).
        let xl = boot(Mode::Xl, 512, "", Expect::Pass, Check::NegativeSuite);
        let no_kmap = parse_report(
            r#"{"platform":"xen-pv","mem_mib":512,"pages_mapped":1,"tables_created":1,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1,"selftests_passed":3,"selftests_failed":0,"random_ops":200000,"timer_irqs":7,"context_switches":5,"lazy_batches_preempted":2,"kmaps":0}"#,
        )
        .unwrap();
        assert!(judge(&xl, &Verdict::Pass(no_kmap))
            .unwrap_err()
            .contains("kmaps"));
        assert_eq!(judge(&xl, &Verdict::Pass(report("xen-pv", 0))), Ok(()));
        // A directmap_limit row must have checked highmem frames.
        let limited = boot(
            Mode::Native,
            512,
            "pvmmu.directmap_limit=256",
            Expect::Pass,
            Check::Nothing,
        );
        let highmem = |n: u64| {
            parse_report(&format!(
                r#"{{"platform":"native","mem_mib":512,"pages_mapped":1,"tables_created":1,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1,"selftests_passed":3,"selftests_failed":0,"timer_irqs":7,"context_switches":5,"lazy_batches_preempted":2,"kmaps":9,"highmem_frames_checked":{n}}}"#
            ))
            .unwrap()
        };
        assert!(judge(&limited, &Verdict::Pass(highmem(0)))
            .unwrap_err()
            .contains("highmem_frames_checked"));
        assert_eq!(judge(&limited, &Verdict::Pass(highmem(65_536))), Ok(()));
        // SMP rows: every CPU online, 10,000 stale-translation rounds, none
        // stale, 100,000 operations of the concurrent stress.
        let smp2 = boot(Mode::Xen, 512, "", Expect::Pass, Check::Nothing).smp(2);
        let smp_report_ops = |cpus: u64, rounds: u64, stale: u64, ops: u64| {
            parse_report(&format!(
                r#"{{"platform":"xen-pv","mem_mib":512,"pages_mapped":1,"tables_created":1,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1,"selftests_passed":3,"selftests_failed":0,"random_ops":200000,"timer_irqs":7,"context_switches":5,"lazy_batches_preempted":2,"kmaps":9,"cpus":{cpus},"tlb_rounds":{rounds},"tlb_stale":{stale},"smp_stress_ops":{ops},"sched_steals":4,"sched_remote_wakeups":50}}"#
            ))
            .unwrap()
        };
        let smp_report =
            |cpus: u64, rounds: u64, stale: u64| smp_report_ops(cpus, rounds, stale, 100_000);
        assert!(
            judge(&smp2, &Verdict::Pass(smp_report_ops(2, 10_000, 0, 99_999)))
                .unwrap_err()
                .contains("smp_stress_ops")
        );
        assert_eq!(
            judge(&smp2, &Verdict::Pass(smp_report(2, 10_000, 0))),
            Ok(())
        );
        assert!(judge(&smp2, &Verdict::Pass(smp_report(1, 10_000, 0)))
            .unwrap_err()
            .contains("cpus"));
        assert!(judge(&smp2, &Verdict::Pass(smp_report(2, 10_000, 3)))
            .unwrap_err()
            .contains("stale"));
        assert!(judge(&smp2, &Verdict::Pass(smp_report(2, 9_999, 0))).is_err());
        // A native SMP row: the lockless CPA path ran and raced.
        let native2 = boot(Mode::Native, 512, "", Expect::Pass, Check::Nothing).smp(2);
        let native_report = |fast: u64, races: u64| {
            parse_report(&format!(
                r#"{{"platform":"native","mem_mib":512,"pages_mapped":1,"tables_created":1,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1,"selftests_passed":3,"selftests_failed":0,"random_ops":200000,"timer_irqs":7,"context_switches":5,"lazy_batches_preempted":2,"kmaps":9,"cpus":2,"tlb_rounds":10000,"tlb_stale":0,"smp_stress_ops":10000,"sched_steals":4,"sched_remote_wakeups":50,"cpa_fast":{fast},"cpa_split_races":{races}}}"#
            ))
            .unwrap()
        };
        assert_eq!(judge(&native2, &Verdict::Pass(native_report(5, 1))), Ok(()));
        for (fast, races) in [(0, 1), (5, 0)] {
            assert!(judge(&native2, &Verdict::Pass(native_report(fast, races)))
                .unwrap_err()
                .contains("cpa_split_races"));
        }
        // ... and the run queues' steals and remote wake-ups.
        let mut no_steals = smp_report(2, 10_000, 0);
        no_steals
            .fields
            .insert("sched_steals".into(), serde_json::Value::from(0u64));
        assert!(judge(&smp2, &Verdict::Pass(no_steals))
            .unwrap_err()
            .contains("sched_steals"));
        let mut no_wakeups = smp_report(2, 10_000, 0);
        no_wakeups.fields.remove("sched_remote_wakeups");
        assert!(judge(&smp2, &Verdict::Pass(no_wakeups))
            .unwrap_err()
            .contains("sched_remote_wakeups"));
        // A row asking for a fast lazy tick: the report must show it.
        let fast = boot(Mode::Xen, 512, FAST_LAZY_TICK, Expect::Pass, Check::Nothing);
        let tick_report = |us: u64| {
            parse_report(&format!(
                r#"{{"platform":"xen-pv","mem_mib":512,"pages_mapped":1,"tables_created":1,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1,"selftests_passed":3,"selftests_failed":0,"random_ops":200000,"timer_irqs":7,"context_switches":5,"lazy_batches_preempted":2,"kmaps":9,"lazy_tick_us":{us}}}"#
            ))
            .unwrap()
        };
        assert_eq!(judge(&fast, &Verdict::Pass(tick_report(100))), Ok(()));
        assert!(judge(&fast, &Verdict::Pass(tick_report(1000)))
            .unwrap_err()
            .contains("lazy_tick_us"));
        assert_eq!(judge(&pass_xen, &Verdict::Pass(tick_report(1000))), Ok(()));
        let timeout = Verdict::Fail(Failure::Timeout {
            after: Duration::from_secs(60),
            saw_report: false,
        });
        assert!(judge(&pass_xen, &timeout).unwrap_err().contains("timeout"));
        let pass_pvh = boot(Mode::Xl, 512, "", Expect::Pass, Check::LikeNative).guest(Guest::Pvh);
        assert_eq!(
            judge(&pass_pvh, &Verdict::Pass(report("xen-pvh", 0))),
            Ok(())
        );
        assert!(judge(&pass_pvh, &Verdict::Pass(report("xen-pv", 0)))
            .unwrap_err()
            .contains("platform"));
        // Under Xen the randomized stress must have run its 200,000 ops.
        let short = parse_report(
            r#"{"platform":"xen-pv","mem_mib":512,"pages_mapped":1,"tables_created":1,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1,"selftests_passed":3,"selftests_failed":0,"random_ops":199999,"timer_irqs":7,"context_switches":5}"#,
        )
        .unwrap();
        assert!(judge(&pass_xen, &Verdict::Pass(short))
            .unwrap_err()
            .contains("random_ops is 199999"));

        let fail_native = boot(
            Mode::Native,
            512,
            FAIL_SELFTEST_KNOB,
            Expect::Fail,
            Check::Nothing,
        );
        let orderly = Verdict::Fail(Failure::ResultFail {
            report: Some(report("native", 1)),
        });
        assert_eq!(judge(&fail_native, &orderly), Ok(()));
        assert!(judge(&fail_native, &timeout).is_err());
        let crash = Verdict::Fail(Failure::XenCrash {
            line: "(XEN) Panic on CPU 0:".into(),
            reason: Vec::new(),
        });
        assert!(judge(&fail_native, &crash)
            .unwrap_err()
            .contains("Xen crash"));
        assert!(judge(&fail_native, &Verdict::Pass(report("native", 0))).is_err());

        let crash_xen = boot(
            Mode::Xen,
            512,
            "pvmmu.crash=stack",
            Expect::XenCrash,
            Check::Nothing,
        );
        assert_eq!(judge(&crash_xen, &crash), Ok(()));
        assert!(judge(&crash_xen, &orderly)
            .unwrap_err()
            .contains("expected Xen to report a crash"));
        assert!(judge(&crash_xen, &timeout).is_err());
        assert!(judge(&crash_xen, &Verdict::Pass(report("xen-pv", 0))).is_err());
    }

    #[test]
    fn debug_pagealloc_rows_in_every_mode_and_the_use_after_free_row() {
        for mode in [Mode::Native, Mode::Xen, Mode::Xl] {
            assert!(
                BOOTS.iter().any(|b| b.mode == mode
                    && b.expect == Expect::Pass
                    && b.cmdline.split_whitespace().any(|w| w == DEBUG_PAGEALLOC)),
                "{mode:?}"
            );
            // The deliberate use after free, in every mode too (under PV
            // the #PF comes through Xen's trap bounce).
            assert!(
                BOOTS.iter().any(|b| b.mode == mode
                    && b.guest == Guest::Pv
                    && b.expect == Expect::Fail
                    && b.cmdline.contains(DEBUG_PAGEALLOC)
                    && b.cmdline.contains("pvmmu.crash=use-after-free")
                    && matches!(b.check, Check::Console(text) if text.contains("freed frame pfn"))),
                "{mode:?}"
            );
        }
    }

    #[test]
    fn a_debug_pagealloc_pass_needs_unmaps_and_faults() {
        let row = boot(
            Mode::Native,
            512,
            DEBUG_PAGEALLOC,
            Expect::Pass,
            Check::Nothing,
        );
        let with = |unmaps: u64, faults: u64| {
            Verdict::Pass(
                parse_report(&format!(
                    r#"{{"platform":"native","mem_mib":512,"pages_mapped":1,"tables_created":1,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1,"selftests_passed":3,"selftests_failed":0,"timer_irqs":7,"context_switches":5,"lazy_batches_preempted":2,"kmaps":1,"pagealloc_unmaps":{unmaps},"pagealloc_faults":{faults}}}"#
                ))
                .unwrap(),
            )
        };
        assert_eq!(judge(&row, &with(130_000, 2)), Ok(()));
        assert!(judge(&row, &with(0, 2))
            .unwrap_err()
            .contains("pagealloc_unmaps"));
        assert!(judge(&row, &with(130_000, 0))
            .unwrap_err()
            .contains("pagealloc_faults"));
        assert!(judge(&row, &Verdict::Pass(report("native", 0)))
            .unwrap_err()
            .contains("pagealloc_unmaps"));
        // Without the option the counters are not asked for.
        let plain = boot(Mode::Native, 512, "", Expect::Pass, Check::Nothing);
        assert_eq!(judge(&plain, &Verdict::Pass(report("native", 0))), Ok(()));
    }

    #[test]
    fn summary_counts_every_line() {
        let ok = Line {
            name: "cargo test (host crates)".into(),
            expected: "ok",
            got: "ok".into(),
            ok: true,
            elapsed: Duration::from_millis(41_200),
            detail: String::new(),
        };
        let failed = Line {
            name: "boot xen 512 MiB".into(),
            expected: "PASS",
            got: "TIMEOUT".into(),
            ok: false,
            elapsed: Duration::from_secs(125),
            detail: "timeout".into(),
        };
        let text = summary(&[ok.clone(), failed, ok], Duration::from_secs(200));
        let last = text.lines().last().unwrap();
        assert_eq!(last, "2 passed, 1 failed");
        assert!(text.contains("2m05s"));
        assert!(text.contains("41.2s"));
        assert!(text.contains("FAILED"));
    }
}
