//! The kernel command line and the boot options parsed from it.
//!
//! Invariant: the command line is copied into the kernel's own buffer at
//! entry (from `start_info.cmd_line` or `hvm_start_info.cmdline_paddr`), so
//! it stays valid after the loader's memory is reused; it is truncated, never
//! overrun, at [`CMDLINE_MAX`] bytes.

/// Longest command line kept (Xen's `MAX_GUEST_CMDLINE`).
pub const CMDLINE_MAX: usize = 1024;

/// A copied command line.
#[derive(Clone)]
pub struct Cmdline {
    bytes: [u8; CMDLINE_MAX],
    len: usize,
}

impl Cmdline {
    /// An empty command line.
    pub const fn empty() -> Self {
        Cmdline {
            bytes: [0; CMDLINE_MAX],
            len: 0,
        }
    }

    /// Copies a NUL-terminated (or full-length) byte string, truncating at
    /// the first NUL or at [`CMDLINE_MAX`].
    pub fn from_nul_terminated(src: &[u8]) -> Self {
        let mut line = Self::empty();
        let len = src
            .iter()
            .take(CMDLINE_MAX)
            .position(|&b| b == 0)
            .unwrap_or(src.len().min(CMDLINE_MAX));
        line.bytes[..len].copy_from_slice(&src[..len]);
        line.len = len;
        line
    }

    /// The text; bytes that are not UTF-8 make it empty (options are ASCII).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }

    /// Whitespace-separated words.
    pub fn words(&self) -> impl Iterator<Item = &str> {
        self.as_str().split_ascii_whitespace()
    }

    /// The value of the first `name=value` word.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.words()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// Whether the flag `name` is present (`name` or `name=1`/`name=on`).
    pub fn flag(&self, name: &str) -> bool {
        self.words().any(|w| match w.split_once('=') {
            None => w == name,
            Some((k, v)) => k == name && matches!(v, "1" | "on" | "yes" | "true"),
        })
    }
}

impl core::fmt::Debug for Cmdline {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

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
    /// `pvmmu.crash=panic|ud|pf|stack|thread-stack`: crash on purpose after the self-tests,
    /// before the report, to exercise the panic and fatal-exception paths.
    pub crash: Option<CrashKind>,
}

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
}

impl BootOptions {
    /// Parses the options out of `line`; unknown words are ignored.
    pub fn parse(line: &Cmdline) -> Self {
        BootOptions {
            fail_selftest: line.flag("pvmmu.fail_selftest"),
            only_4k: line.flag("pvmmu.4k"),
            bench: line.flag("pvmmu.bench"),
            crash: match line.value("pvmmu.crash") {
                Some("panic") => Some(CrashKind::Panic),
                Some("ud") => Some(CrashKind::InvalidOpcode),
                Some("pf") => Some(CrashKind::PageFault),
                Some("stack") => Some(CrashKind::StackOverflow),
                Some("thread-stack") => Some(CrashKind::ThreadStackOverflow),
                _ => None,
            },
        }
    }
}
