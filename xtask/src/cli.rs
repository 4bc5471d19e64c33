//! Command-line parsing and validation.
//!
//! Invariant: everything here is pure (no I/O): `parse` turns the argument list
//! into a [`Command`] or a [`UsageError`], and `validate_run` checks a
//! [`RunOptions`] against the host's available memory that the caller read.
//! Nothing is built or booted until both have succeeded.

use std::ffi::OsString;
use std::fmt;
use std::time::Duration;

use crate::xl::guest::Guest;

/// Usage text printed by `help` and after a usage error.
pub const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  build [--debug]           build the guest kernel (release unless --debug)
  run [options]             build the guest kernel, boot it, exit 0 only on PVMMU-RESULT PASS
      --mode native|xen|xl  how to boot it (default: xen)
                              native: QEMU -kernel through the PVH entry
                              xen:    QEMU -> Xen 4.17 -> the kernel as PV dom0
                              xl:     QEMU -> Xen -> Linux dom0 -> `xl create` of the kernel as PV domU
      --guest pv|pvh        with --mode xl: the domU's type (default: pv; pvh: native paging under Xen)
      --memory MIB          the guest's memory in MiB (default: 512, at least 64)
      --smp N               virtual CPUs (default: 1)
      --cmdline \"...\"       extra kernel command line
      --fail-selftest       add `pvmmu.fail_selftest`: a self-test fails on purpose, run must exit non-zero
      --timeout SECS        give up after SECS seconds (default: grows with --memory)
      --xen 4.17|4.20       which Xen --mode xen boots (default: 4.17, Debian 12; 4.20 is Debian 13's)
      --debug               boot a debug build of the kernel
  test [--verbose]          host tests, clippy, fmt, then every boot of the boot table
  ci [--verbose]            everything `test` does, plus the `--mode xl` boots
  bench                     run the benchmarks, print their BENCH lines, write <target>/bench.md
  mutants [--minutes N] [--shard K/N]
                            cargo-mutants over pvmmu's core against its host tests, stopped
                              after N minutes (default: 150); --shard tests the K-th of N
                              slices (0-based); summary in <target>/mutants/summary.md
  help                      this text";

/// The smallest guest the reference kernel supports, in MiB.
pub const MIN_GUEST_MIB: u64 = 64;

/// The largest guest the reference kernel supports, in MiB (its fixed
/// capacities are sized for it; see `hypercall::boot::MAX_GUEST_MIB`).
pub const MAX_GUEST_MIB: u64 = hypercall::boot::MAX_GUEST_MIB;

/// The largest number of virtual CPUs the xtask will ask QEMU for.
pub const MAX_SMP: u32 = 64;

/// Guest memory when `--memory` is not given, in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 512;

/// The kernel command-line knob that makes a self-test fail on purpose.
pub const FAIL_SELFTEST_KNOB: &str = "pvmmu.fail_selftest";

/// The longest kernel command line, in bytes: Xen's `MAX_GUEST_CMDLINE`
/// (1024) less the terminating NUL, which is also what the kernel keeps.
pub const KERNEL_CMDLINE_MAX: usize = 1023;

/// How the guest kernel is booted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// QEMU `-kernel`, PVH entry, no hypervisor.
    Native,
    /// QEMU -> Xen -> the kernel as PV dom0.
    Xen,
    /// QEMU -> Xen -> Linux dom0 -> `xl create` of the kernel as PV domU.
    Xl,
}

impl Mode {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Xen => "xen",
            Mode::Xl => "xl",
        }
    }

    fn from_name(name: &str) -> Option<Mode> {
        match name {
            "native" => Some(Mode::Native),
            "xen" => Some(Mode::Xen),
            "xl" => Some(Mode::Xl),
            _ => None,
        }
    }
}

/// Which Xen hypervisor `--mode xen` boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XenVersion {
    /// Xen 4.17, Debian 12 (bookworm): the default, and the only one the
    /// `--mode xl` dom0's toolstack matches.
    V4_17,
    /// Xen 4.20, Debian 13 (trixie).
    V4_20,
}

impl XenVersion {
    /// The version as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            XenVersion::V4_17 => "4.17",
            XenVersion::V4_20 => "4.20",
        }
    }

    fn from_name(name: &str) -> Option<XenVersion> {
        match name {
            "4.17" => Some(XenVersion::V4_17),
            "4.20" => Some(XenVersion::V4_20),
            _ => None,
        }
    }
}

/// Which cargo profile the guest kernel is built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `--release` (the default).
    Release,
    /// The dev profile.
    Debug,
}

/// Everything `cargo xtask run` needs to boot the kernel once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// How to boot.
    pub mode: Mode,
    /// Guest memory in MiB (`dom0_mem` under Xen, `-m` natively).
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub smp: u32,
    /// Extra kernel command line given with `--cmdline`.
    pub cmdline: String,
    /// Whether `pvmmu.fail_selftest` is added to the command line.
    pub fail_selftest: bool,
    /// Explicit `--timeout`; `None` means [`RunOptions::timeout`] derives one.
    pub timeout_secs: Option<u64>,
    /// Kernel build profile.
    pub profile: Profile,
    /// The domU type under `--mode xl` (`--guest`).
    pub guest: Guest,
    /// The Xen of `--mode xen`.
    pub xen: XenVersion,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            mode: Mode::Xen,
            memory_mib: DEFAULT_MEMORY_MIB,
            smp: 1,
            cmdline: String::new(),
            fail_selftest: false,
            timeout_secs: None,
            profile: Profile::Release,
            guest: Guest::Pv,
            xen: XenVersion::V4_17,
        }
    }
}

impl RunOptions {
    /// The kernel command line: `--cmdline` plus the failure knob if asked.
    pub fn kernel_cmdline(&self) -> String {
        let mut words: Vec<&str> = self.cmdline.split_whitespace().collect();
        if self.fail_selftest && !words.contains(&FAIL_SELFTEST_KNOB) {
            words.push(FAIL_SELFTEST_KNOB);
        }
        words.join(" ")
    }

    /// How long the boot may take before the harness gives up: `--timeout`, or
    /// a budget that grows with the memory the kernel maps and touches. A
    /// 512 MiB boot reaches its result line in about 3 s under Xen and 10 s
    /// under xl (TCG, 2 cores); the budget leaves a wide margin while keeping
    /// a hung `cargo xtask test` well inside CI's time.
    pub fn timeout(&self) -> Duration {
        let secs = match self.timeout_secs {
            Some(secs) => secs,
            None => {
                let base = match self.mode {
                    Mode::Native => 45,
                    // Under Xen the kernel's randomized stress (200,000
                    // operations, each a hypercall or more) takes about 8 s
                    // of TCG on its own: 30 s more leave room for a loaded
                    // machine.
                    Mode::Xen => 45 + 30,
                    Mode::Xl => 150 + 30,
                };
                // Each further CPU: its bring-up, and the stale-translation
                // rounds that run on two CPUs (tens of seconds under Xen).
                // With several CPUs, the concurrent stress too (100,000
                // kspace calls: 77 s of a loaded machine for Xen's 2 vCPUs).
                let smp = u64::from(self.smp.saturating_sub(1));
                base + 30 * self.memory_mib.div_ceil(1024) + 120 * smp + 120 * smp.min(1)
            }
        };
        Duration::from_secs(secs)
    }
}

/// Options of `cargo xtask test` and `cargo xtask ci`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestOptions {
    /// Stream every boot's console instead of only its result lines.
    pub verbose: bool,
}

/// A parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `cargo xtask build`.
    Build(Profile),
    /// `cargo xtask run`.
    Run(RunOptions),
    /// `cargo xtask test`.
    Test(TestOptions),
    /// `cargo xtask ci`.
    Ci(TestOptions),
    /// `cargo xtask bench`.
    Bench,
    /// `cargo xtask mutants`.
    Mutants(crate::mutants::MutantsOptions),
    /// `cargo xtask help`.
    Help,
}

/// What is wrong with the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageError {
    /// No command was given.
    NoCommand,
    /// The command is not one of build/run/test/ci/bench/mutants/help.
    UnknownCommand(String),
    /// A flag the command does not take.
    UnknownFlag {
        /// The command.
        command: &'static str,
        /// The flag.
        flag: String,
    },
    /// A positional argument where none is taken.
    UnexpectedArgument(String),
    /// A flag that needs a value came last.
    MissingValue(&'static str),
    /// A flag that takes no value was given one (`--debug=yes`).
    UnexpectedValue(&'static str),
    /// A numeric flag's value is not a number.
    BadNumber {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
    },
    /// `--mode` is not native, xen or xl.
    UnknownMode(String),
    /// `--guest` is not pv or pvh.
    UnknownGuest(String),
    /// `--guest pvh` without `--mode xl`.
    GuestNeedsXl(Mode),
    /// `--xen` is not 4.17 or 4.20.
    UnknownXen(String),
    /// `--xen 4.20` with a mode other than `xen`.
    XenVersionNeedsModeXen(Mode),
    /// `--memory` below [`MIN_GUEST_MIB`].
    MemoryTooSmall {
        /// What was asked.
        mib: u64,
    },
    /// `--memory` above what the kernel supports ([`MAX_GUEST_MIB`]).
    MemoryAboveSupported {
        /// What was asked.
        mib: u64,
    },
    /// QEMU would need more memory than the host has available.
    MemoryTooLarge {
        /// The guest memory asked for.
        mib: u64,
        /// The mode (it decides the hypervisor's overhead).
        mode: Mode,
        /// What QEMU would need in all, in MiB.
        needed_mib: u64,
        /// `MemAvailable` on the host, in MiB.
        available_mib: u64,
    },
    /// `--smp 0`.
    SmpZero,
    /// `--smp` above [`MAX_SMP`].
    SmpTooLarge(u32),
    /// `--timeout 0`.
    TimeoutZero,
    /// `mutants --minutes 0`.
    MinutesZero,
    /// `mutants --shard` is not `K/N` with `K < N`.
    BadShard(String),
    /// An argument that is not valid UTF-8 (shown with replacement chars).
    NotUtf8(String),
    /// The kernel command line is longer than the kernel can be given.
    CmdlineTooLong {
        /// Its length in bytes (with `pvmmu.fail_selftest` if added).
        bytes: usize,
    },
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageError::NoCommand => write!(f, "no command given"),
            UsageError::UnknownCommand(command) => write!(f, "unknown command `{command}`"),
            UsageError::UnknownFlag { command, flag } => {
                write!(f, "`{command}` does not take `{flag}`")
            }
            UsageError::UnexpectedArgument(arg) => write!(f, "unexpected argument `{arg}`"),
            UsageError::MissingValue(flag) => write!(f, "`{flag}` needs a value"),
            UsageError::UnexpectedValue(flag) => write!(f, "`{flag}` takes no value"),
            UsageError::BadNumber { flag, value } => {
                write!(f, "`{flag}` needs a whole number, not `{value}`")
            }
            UsageError::UnknownMode(mode) => {
                write!(f, "unknown mode `{mode}`: use native, xen or xl")
            }
            UsageError::UnknownGuest(guest) => {
                write!(f, "unknown guest type `{guest}`: use pv or pvh")
            }
            UsageError::GuestNeedsXl(mode) => write!(
                f,
                "--guest pvh needs --mode xl (--mode {} boots the kernel itself)",
                mode.name()
            ),
            UsageError::UnknownXen(version) => {
                write!(f, "unknown Xen `{version}`: use 4.17 or 4.20")
            }
            UsageError::XenVersionNeedsModeXen(mode) => write!(
                f,
                "--xen 4.20 boots the kernel as dom0 and needs --mode xen (--mode {} uses {})",
                mode.name(),
                match mode {
                    Mode::Native => "no Xen",
                    _ => "Xen 4.17, whose toolstack the xl dom0 carries",
                }
            ),
            UsageError::MemoryTooSmall { mib } => write!(
                f,
                "--memory {mib} is too small: the guest kernel needs at least {MIN_GUEST_MIB} MiB"
            ),
            UsageError::MemoryAboveSupported { mib } => write!(
                f,
                "--memory {mib} is more than the guest kernel supports: at most {MAX_GUEST_MIB} MiB \
                 (its page-table self-tests and checks are sized for that much RAM)"
            ),
            UsageError::MemoryTooLarge {
                mib,
                mode,
                needed_mib,
                available_mib,
            } => write!(
                f,
                "--memory {mib} is too large for this machine: --mode {} needs about {needed_mib} MiB \
                 of host memory (guest, hypervisor and QEMU itself) but only {available_mib} MiB are \
                 available (MemAvailable in /proc/meminfo)",
                mode.name()
            ),
            UsageError::SmpZero => write!(f, "--smp must be at least 1"),
            UsageError::SmpTooLarge(n) => write!(f, "--smp {n} is too many: at most {MAX_SMP}"),
            UsageError::TimeoutZero => write!(f, "--timeout must be at least 1 second"),
            UsageError::MinutesZero => write!(f, "--minutes must be at least 1"),
            UsageError::BadShard(s) => {
                write!(f, "--shard {s}: expected K/N with 0 <= K < N (e.g. 0/12)")
            }
            UsageError::NotUtf8(arg) => {
                write!(f, "argument `{arg}` is not valid UTF-8")
            }
            UsageError::CmdlineTooLong { bytes } => write!(
                f,
                "the kernel command line is {bytes} bytes long: Xen and the kernel take at most \
                 {KERNEL_CMDLINE_MAX}"
            ),
        }
    }
}

impl std::error::Error for UsageError {}

/// One `--flag value` / `--flag=value` / `--switch` argument, split.
struct Flag<'a> {
    name: &'a str,
    inline_value: Option<&'a str>,
}

impl<'a> Flag<'a> {
    fn split(arg: &'a str) -> Option<Flag<'a>> {
        if !arg.starts_with("--") {
            return None;
        }
        Some(match arg.split_once('=') {
            Some((name, value)) => Flag {
                name,
                inline_value: Some(value),
            },
            None => Flag {
                name: arg,
                inline_value: None,
            },
        })
    }
}

/// Walks the arguments after the command name.
struct Args<'a> {
    command: &'static str,
    rest: std::slice::Iter<'a, String>,
}

impl<'a> Args<'a> {
    /// The next flag, or `None` at the end.
    fn next_flag(&mut self) -> Result<Option<Flag<'a>>, UsageError> {
        match self.rest.next() {
            None => Ok(None),
            Some(arg) => match Flag::split(arg) {
                Some(flag) => Ok(Some(flag)),
                None => Err(UsageError::UnexpectedArgument(arg.clone())),
            },
        }
    }

    /// The value of a flag that takes one.
    fn value(&mut self, flag: &Flag<'a>, name: &'static str) -> Result<&'a str, UsageError> {
        match flag.inline_value {
            Some(value) => Ok(value),
            None => self
                .rest
                .next()
                .map(String::as_str)
                .ok_or(UsageError::MissingValue(name)),
        }
    }

    fn number<T: std::str::FromStr>(
        &mut self,
        flag: &Flag<'a>,
        name: &'static str,
    ) -> Result<T, UsageError> {
        let value = self.value(flag, name)?;
        value.parse().map_err(|_| UsageError::BadNumber {
            flag: name,
            value: value.to_string(),
        })
    }

    fn unknown(&self, flag: &Flag<'a>) -> UsageError {
        UsageError::UnknownFlag {
            command: self.command,
            flag: flag.name.to_string(),
        }
    }
}

/// Rejects `--switch=value` for flags that take no value.
fn switch(flag: &Flag<'_>, name: &'static str) -> Result<(), UsageError> {
    match flag.inline_value {
        Some(_) => Err(UsageError::UnexpectedValue(name)),
        None => Ok(()),
    }
}

/// Parses the arguments after `cargo xtask` as the OS gives them: an
/// argument that is not UTF-8 is a usage error.
pub fn parse_os<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, UsageError> {
    let argv = args
        .into_iter()
        .map(|arg| {
            arg.into_string()
                .map_err(|arg| UsageError::NotUtf8(arg.to_string_lossy().into_owned()))
        })
        .collect::<Result<Vec<String>, UsageError>>()?;
    parse(&argv)
}

/// Parses the arguments after `cargo xtask`.
pub fn parse(argv: &[String]) -> Result<Command, UsageError> {
    let Some((command, rest)) = argv.split_first() else {
        return Err(UsageError::NoCommand);
    };
    let command_name: &'static str = match command.as_str() {
        "build" => "build",
        "run" => "run",
        "test" => "test",
        "ci" => "ci",
        "bench" => "bench",
        "mutants" => "mutants",
        "help" | "-h" | "--help" => return Ok(Command::Help),
        other => return Err(UsageError::UnknownCommand(other.to_string())),
    };
    let mut args = Args {
        command: command_name,
        rest: rest.iter(),
    };
    match command_name {
        "build" => {
            let mut profile = Profile::Release;
            while let Some(flag) = args.next_flag()? {
                match flag.name {
                    "--debug" => {
                        switch(&flag, "--debug")?;
                        profile = Profile::Debug;
                    }
                    _ => return Err(args.unknown(&flag)),
                }
            }
            Ok(Command::Build(profile))
        }
        "run" => parse_run(&mut args).map(Command::Run),
        "test" | "ci" => {
            let mut options = TestOptions::default();
            while let Some(flag) = args.next_flag()? {
                match flag.name {
                    "--verbose" => {
                        switch(&flag, "--verbose")?;
                        options.verbose = true;
                    }
                    _ => return Err(args.unknown(&flag)),
                }
            }
            Ok(if command_name == "test" {
                Command::Test(options)
            } else {
                Command::Ci(options)
            })
        }
        "mutants" => {
            let mut options = crate::mutants::MutantsOptions::default();
            while let Some(flag) = args.next_flag()? {
                match flag.name {
                    "--minutes" => options.minutes = args.number(&flag, "--minutes")?,
                    "--shard" => {
                        let value = args.value(&flag, "--shard")?;
                        options.shard = Some(parse_shard(value)?);
                    }
                    _ => return Err(args.unknown(&flag)),
                }
            }
            if options.minutes == 0 {
                return Err(UsageError::MinutesZero);
            }
            Ok(Command::Mutants(options))
        }
        _ => {
            if let Some(flag) = args.next_flag()? {
                return Err(args.unknown(&flag));
            }
            Ok(Command::Bench)
        }
    }
}

/// `K/N` with `K < N`.
fn parse_shard(value: &str) -> Result<(u32, u32), UsageError> {
    let bad = || UsageError::BadShard(value.to_string());
    let (k, n) = value.split_once('/').ok_or_else(bad)?;
    let (k, n): (u32, u32) = (k.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if k < n {
        Ok((k, n))
    } else {
        Err(bad())
    }
}

fn parse_run(args: &mut Args<'_>) -> Result<RunOptions, UsageError> {
    let mut options = RunOptions::default();
    while let Some(flag) = args.next_flag()? {
        match flag.name {
            "--mode" => {
                let name = args.value(&flag, "--mode")?;
                options.mode = Mode::from_name(name)
                    .ok_or_else(|| UsageError::UnknownMode(name.to_string()))?;
            }
            "--guest" => {
                let name = args.value(&flag, "--guest")?;
                options.guest = Guest::from_name(name)
                    .ok_or_else(|| UsageError::UnknownGuest(name.to_string()))?;
            }
            "--memory" => options.memory_mib = args.number(&flag, "--memory")?,
            "--smp" => options.smp = args.number(&flag, "--smp")?,
            "--cmdline" => options.cmdline = args.value(&flag, "--cmdline")?.to_string(),
            "--timeout" => options.timeout_secs = Some(args.number(&flag, "--timeout")?),
            "--xen" => {
                let name = args.value(&flag, "--xen")?;
                options.xen = XenVersion::from_name(name)
                    .ok_or_else(|| UsageError::UnknownXen(name.to_string()))?;
            }
            "--fail-selftest" => {
                switch(&flag, "--fail-selftest")?;
                options.fail_selftest = true;
            }
            "--debug" => {
                switch(&flag, "--debug")?;
                options.profile = Profile::Debug;
            }
            _ => return Err(args.unknown(&flag)),
        }
    }
    Ok(options)
}

/// Checks a run's options against each other (the host's memory is checked
/// by [`crate::qemu::check_host_memory`], which knows what each mode needs).
pub fn validate_run(options: &RunOptions) -> Result<(), UsageError> {
    if options.memory_mib < MIN_GUEST_MIB {
        return Err(UsageError::MemoryTooSmall {
            mib: options.memory_mib,
        });
    }
    if options.guest != Guest::Pv && options.mode != Mode::Xl {
        return Err(UsageError::GuestNeedsXl(options.mode));
    }
    if options.xen != XenVersion::V4_17 && options.mode != Mode::Xen {
        return Err(UsageError::XenVersionNeedsModeXen(options.mode));
    }
    if options.memory_mib > MAX_GUEST_MIB {
        return Err(UsageError::MemoryAboveSupported {
            mib: options.memory_mib,
        });
    }
    if options.smp == 0 {
        return Err(UsageError::SmpZero);
    }
    if options.smp > MAX_SMP {
        return Err(UsageError::SmpTooLarge(options.smp));
    }
    if options.timeout_secs == Some(0) {
        return Err(UsageError::TimeoutZero);
    }
    let bytes = options.kernel_cmdline().len();
    if bytes > KERNEL_CMDLINE_MAX {
        return Err(UsageError::CmdlineTooLong { bytes });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    fn run(line: &str) -> Result<RunOptions, UsageError> {
        match parse(&argv(line))? {
            Command::Run(options) => Ok(options),
            other => panic!("`{line}` parsed as {other:?}, not run"),
        }
    }

    #[test]
    fn run_defaults_to_xen_512_one_cpu() {
        let options = run("run").unwrap();
        assert_eq!(options.mode, Mode::Xen);
        assert_eq!(options.memory_mib, 512);
        assert_eq!(options.smp, 1);
        assert_eq!(options.kernel_cmdline(), "");
        assert_eq!(options.profile, Profile::Release);
    }

    #[test]
    fn run_flags_in_both_spellings() {
        let options = run("run --mode native --memory=3072 --smp 2 --timeout=30 --debug").unwrap();
        assert_eq!(options.mode, Mode::Native);
        assert_eq!(options.memory_mib, 3072);
        assert_eq!(options.smp, 2);
        assert_eq!(options.timeout(), Duration::from_secs(30));
        assert_eq!(options.profile, Profile::Debug);
        assert_eq!(run("run --mode=xl").unwrap().mode, Mode::Xl);
    }

    #[test]
    fn guest_type_is_pv_unless_asked_and_only_with_xl() {
        assert_eq!(run("run --mode xl").unwrap().guest, Guest::Pv);
        let pvh = run("run --mode xl --guest pvh").unwrap();
        assert_eq!(pvh.guest, Guest::Pvh);
        assert_eq!(validate_run(&pvh), Ok(()));
        assert_eq!(run("run --guest=pv").unwrap().guest, Guest::Pv);
        assert_eq!(
            run("run --mode xl --guest hvm"),
            Err(UsageError::UnknownGuest("hvm".to_string()))
        );
        for mode in [Mode::Native, Mode::Xen] {
            let options = RunOptions {
                mode,
                ..pvh.clone()
            };
            assert_eq!(validate_run(&options), Err(UsageError::GuestNeedsXl(mode)));
        }
    }

    #[test]
    fn cmdline_keeps_spaces_and_gains_the_knob_once() {
        let argv = vec![
            "run".to_string(),
            "--cmdline".to_string(),
            "pvmmu.small_pages  loglevel=debug".to_string(),
            "--fail-selftest".to_string(),
        ];
        let Command::Run(options) = parse(&argv).unwrap() else {
            panic!("not a run");
        };
        assert_eq!(
            options.kernel_cmdline(),
            "pvmmu.small_pages loglevel=debug pvmmu.fail_selftest"
        );
        let mut twice = options.clone();
        twice.cmdline = "pvmmu.fail_selftest".to_string();
        assert_eq!(twice.kernel_cmdline(), "pvmmu.fail_selftest");
    }

    #[test]
    fn bad_arguments_are_named() {
        assert_eq!(
            run("run --mode hvm"),
            Err(UsageError::UnknownMode("hvm".to_string()))
        );
        assert_eq!(
            run("run --memroy 512"),
            Err(UsageError::UnknownFlag {
                command: "run",
                flag: "--memroy".to_string()
            })
        );
        assert_eq!(
            run("run --memory lots"),
            Err(UsageError::BadNumber {
                flag: "--memory",
                value: "lots".to_string()
            })
        );
        assert_eq!(
            run("run --memory -5").unwrap_err(),
            UsageError::BadNumber {
                flag: "--memory",
                value: "-5".to_string()
            }
        );
        assert_eq!(run("run --smp"), Err(UsageError::MissingValue("--smp")));
        assert_eq!(
            run("run --fail-selftest=1"),
            Err(UsageError::UnexpectedValue("--fail-selftest"))
        );
        assert_eq!(
            run("run native"),
            Err(UsageError::UnexpectedArgument("native".to_string()))
        );
        assert_eq!(
            parse(&argv("frobnicate")),
            Err(UsageError::UnknownCommand("frobnicate".to_string()))
        );
        assert_eq!(parse(&[]), Err(UsageError::NoCommand));
        assert_eq!(
            parse(&argv("bench --fast")),
            Err(UsageError::UnknownFlag {
                command: "bench",
                flag: "--fast".to_string()
            })
        );
        assert_eq!(
            parse(&argv("build --mode xen")),
            Err(UsageError::UnknownFlag {
                command: "build",
                flag: "--mode".to_string()
            })
        );
    }

    #[test]
    fn other_commands() {
        assert_eq!(parse(&argv("build")), Ok(Command::Build(Profile::Release)));
        assert_eq!(
            parse(&argv("build --debug")),
            Ok(Command::Build(Profile::Debug))
        );
        assert_eq!(
            parse(&argv("test --verbose")),
            Ok(Command::Test(TestOptions { verbose: true }))
        );
        assert_eq!(parse(&argv("ci")), Ok(Command::Ci(TestOptions::default())));
        assert_eq!(parse(&argv("bench")), Ok(Command::Bench));
        assert_eq!(
            parse(&argv("mutants")),
            Ok(Command::Mutants(crate::mutants::MutantsOptions::default()))
        );
        assert_eq!(
            parse(&argv("mutants --minutes 30 --shard 2/12")),
            Ok(Command::Mutants(crate::mutants::MutantsOptions {
                minutes: 30,
                shard: Some((2, 12)),
            }))
        );
        for bad in ["12/12", "1", "a/2", "1/0"] {
            assert_eq!(
                parse(&argv(&format!("mutants --shard {bad}"))),
                Err(UsageError::BadShard(bad.to_string()))
            );
        }
        assert_eq!(
            parse(&argv("mutants --minutes 0")),
            Err(UsageError::MinutesZero)
        );
        assert_eq!(parse(&argv("--help")), Ok(Command::Help));
    }

    #[test]
    fn validation_limits() {
        let ok = RunOptions::default();
        assert_eq!(validate_run(&ok), Ok(()));
        assert_eq!(validate_run(&ok), Ok(()));

        let small = RunOptions {
            memory_mib: 63,
            ..ok.clone()
        };
        assert_eq!(
            validate_run(&small),
            Err(UsageError::MemoryTooSmall { mib: 63 })
        );
        let smallest = RunOptions {
            memory_mib: MIN_GUEST_MIB,
            ..ok.clone()
        };
        assert_eq!(validate_run(&smallest), Ok(()));

        let zero_cpus = RunOptions {
            smp: 0,
            ..ok.clone()
        };
        assert_eq!(validate_run(&zero_cpus), Err(UsageError::SmpZero));
        let many_cpus = RunOptions {
            smp: 65,
            ..ok.clone()
        };
        assert_eq!(validate_run(&many_cpus), Err(UsageError::SmpTooLarge(65)));
        let no_time = RunOptions {
            timeout_secs: Some(0),
            ..ok.clone()
        };
        assert_eq!(validate_run(&no_time), Err(UsageError::TimeoutZero));
    }

    #[test]
    fn timeout_grows_with_memory() {
        let small = RunOptions {
            memory_mib: 256,
            ..RunOptions::default()
        };
        let large = RunOptions {
            memory_mib: 3072,
            ..RunOptions::default()
        };
        assert!(large.timeout() > small.timeout());
        assert_eq!(small.timeout(), Duration::from_secs(105));
        assert_eq!(large.timeout(), Duration::from_secs(165));
    }

    #[test]
    fn a_non_utf8_argument_is_a_usage_error() {
        use std::os::unix::ffi::OsStringExt;
        let bad = OsString::from_vec(b"--cmdline=\xff\xfe".to_vec());
        assert_eq!(
            parse_os([OsString::from("run"), bad]),
            Err(UsageError::NotUtf8("--cmdline=\u{fffd}\u{fffd}".into()))
        );
        assert!(matches!(
            parse_os([OsString::from("run"), OsString::from("--memory=128")]),
            Ok(Command::Run(_))
        ));
    }

    #[test]
    fn the_command_line_may_be_as_long_as_the_kernel_takes() {
        let at_limit = RunOptions {
            cmdline: "x".repeat(KERNEL_CMDLINE_MAX),
            ..RunOptions::default()
        };
        assert_eq!(validate_run(&at_limit), Ok(()));
        let over = RunOptions {
            cmdline: "x".repeat(KERNEL_CMDLINE_MAX + 1),
            ..RunOptions::default()
        };
        assert_eq!(
            validate_run(&over),
            Err(UsageError::CmdlineTooLong {
                bytes: KERNEL_CMDLINE_MAX + 1
            })
        );
        // The failure knob counts: it is part of what the kernel is given.
        let with_knob = RunOptions {
            cmdline: "x".repeat(KERNEL_CMDLINE_MAX - FAIL_SELFTEST_KNOB.len()),
            fail_selftest: true,
            ..RunOptions::default()
        };
        assert!(validate_run(&with_knob).is_err());
    }

    #[test]
    fn memory_above_what_the_kernel_supports_is_refused() {
        let largest = RunOptions {
            memory_mib: MAX_GUEST_MIB,
            ..RunOptions::default()
        };
        assert_eq!(validate_run(&largest), Ok(()));
        let above = RunOptions {
            memory_mib: MAX_GUEST_MIB + 1,
            ..RunOptions::default()
        };
        assert_eq!(
            validate_run(&above),
            Err(UsageError::MemoryAboveSupported {
                mib: MAX_GUEST_MIB + 1
            })
        );
        assert!(validate_run(&above)
            .unwrap_err()
            .to_string()
            .contains("at most 65536 MiB"));
    }

    #[test]
    fn xen_version_is_chosen_for_mode_xen_only() {
        assert_eq!(run("run").unwrap().xen, XenVersion::V4_17);
        let v420 = run("run --xen 4.20").unwrap();
        assert_eq!(v420.xen, XenVersion::V4_20);
        assert_eq!(validate_run(&v420), Ok(()));
        assert_eq!(run("run --xen=4.17").unwrap().xen, XenVersion::V4_17);
        assert_eq!(
            run("run --xen 4.18"),
            Err(UsageError::UnknownXen("4.18".into()))
        );
        let xl = run("run --mode xl --xen 4.20").unwrap();
        assert_eq!(
            validate_run(&xl),
            Err(UsageError::XenVersionNeedsModeXen(Mode::Xl))
        );
    }
}
