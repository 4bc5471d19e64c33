//! A small self-test framework in the style of XTF: each test is a named
//! function, the framework runs them in order and prints one line per test,
//! `selftest <name> ... ok`, `... FAIL: <reason>` or `... skipped (<why>)`.
//!
//! Adding a test is one line in a suite table: `SelfTest::new("name", f)` or
//! `SelfTest::only("name", Only::XenPv, f)`.
//!
//! Invariant: every test that runs is counted exactly once as passed or
//! failed; a skipped test counts as neither.

use core::fmt;

use crate::Kernel;

/// Why a test failed: what was checked, and the values seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A condition did not hold.
    Check(&'static str),
    /// Two values differ.
    Mismatch {
        /// What was compared.
        what: &'static str,
        /// Value seen.
        got: u64,
        /// Value expected.
        expected: u64,
    },
    /// A value was out of its allowed range.
    OutOfRange {
        /// What was measured.
        what: &'static str,
        /// Value seen.
        got: u64,
    },
    /// A fault was raised where none was expected, or the wrong one.
    Fault {
        /// What was being done.
        what: &'static str,
        /// Vector raised (or 255 for "none").
        vector: u8,
        /// Its error code.
        error_code: u64,
    },
    /// A hypercall failed.
    Xen {
        /// Which call.
        what: &'static str,
        /// Xen's error.
        error: hypercall::XenError,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Check(what) => write!(f, "{what}"),
            Failure::Mismatch {
                what,
                got,
                expected,
            } => write!(f, "{what}: got {got:#x}, expected {expected:#x}"),
            Failure::OutOfRange { what, got } => write!(f, "{what}: {got:#x} out of range"),
            Failure::Fault {
                what,
                vector,
                error_code,
            } => write!(f, "{what}: vector {vector} error code {error_code:#x}"),
            Failure::Xen { what, error } => write!(f, "{what}: {error}"),
        }
    }
}

/// Result of one test.
pub type TestResult = Result<(), Failure>;

/// `Ok` if `cond`, else [`Failure::Check`].
pub fn check(cond: bool, what: &'static str) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(Failure::Check(what))
    }
}

/// `Ok` if `got == expected`, else [`Failure::Mismatch`].
pub fn check_eq(what: &'static str, got: u64, expected: u64) -> TestResult {
    if got == expected {
        Ok(())
    } else {
        Err(Failure::Mismatch {
            what,
            got,
            expected,
        })
    }
}

/// Which platforms a test applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Only {
    /// Every platform.
    Any,
    /// Xen PV only.
    XenPv,
    /// Hardware paging only (native, Xen PVH).
    HardwarePaging,
    /// Xen PVH only.
    XenPvh,
    /// Boots with `pvmmu.debug_pagealloc` only.
    DebugPagealloc,
}

/// One named test.
#[derive(Clone, Copy)]
pub struct SelfTest {
    /// Name printed on its line.
    pub name: &'static str,
    /// Where it runs.
    pub only: Only,
    /// The test.
    pub run: fn(&mut Kernel) -> TestResult,
}

impl SelfTest {
    /// A test for every platform.
    pub const fn new(name: &'static str, run: fn(&mut Kernel) -> TestResult) -> Self {
        SelfTest {
            name,
            only: Only::Any,
            run,
        }
    }

    /// A test for some platforms only.
    pub const fn only(name: &'static str, only: Only, run: fn(&mut Kernel) -> TestResult) -> Self {
        SelfTest { name, only, run }
    }
}

/// Passed and failed counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
}

/// Runs `suite`, printing one line per test, and adds to `tally`.
pub fn run_suite(kernel: &mut Kernel, suite: &[SelfTest], tally: &mut Tally) {
    for test in suite {
        let applies = match test.only {
            Only::Any => true,
            Only::XenPv => kernel.pv.is_some(),
            Only::HardwarePaging => kernel.pv.is_none(),
            Only::XenPvh => kernel.xen_pvh.is_some(),
            Only::DebugPagealloc => kernel.options.debug_pagealloc,
        };
        if !applies {
            let why = match test.only {
                Only::DebugPagealloc => "option",
                _ => "platform",
            };
            crate::kprintln!("selftest {} ... skipped ({why})", test.name);
            continue;
        }
        match (test.run)(kernel) {
            Ok(()) => {
                tally.passed += 1;
                crate::kprintln!("selftest {} ... ok", test.name);
            }
            Err(failure) => {
                tally.failed += 1;
                crate::kprintln!("selftest {} ... FAIL: {}", test.name, failure);
            }
        }
    }
}
