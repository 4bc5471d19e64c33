//! Figures of the in-kernel benchmarks: the samples of one figure, their
//! median, and the `BENCH` line that carries it.
//!
//! Invariant: every line printed here is `BENCH <platform>-<name> <value>
//! <unit>` with one word for the name, a decimal number for the value (or
//! `n/a` for a figure that cannot exist on this platform, [`emit_na`]) and
//! a unit without the platform in it, so that the same figure from two
//! boots differs only in the platform word.

use core::fmt;

use crate::platform::{self, Platform};

/// Runs of each timed figure; the median is printed.
pub const REPS: usize = 5;

/// Samples of one figure (at most [`REPS`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Samples {
    values: [u64; REPS],
    len: usize,
}

impl Samples {
    /// Adds a sample (beyond [`REPS`] samples the last one is replaced).
    pub fn push(&mut self, value: u64) {
        let at = self.len.min(REPS - 1);
        self.values[at] = value;
        self.len = at + 1;
    }

    /// The median (of an even count, the lower middle); 0 without samples.
    pub fn median(&self) -> u64 {
        let mut sorted = self.values;
        let sorted = &mut sorted[..self.len];
        sorted.sort_unstable();
        match self.len {
            0 => 0,
            n => sorted[(n - 1) / 2],
        }
    }

    /// How many samples there are.
    pub fn len(&self) -> usize {
        self.len
    }
}

/// `total / count` printed with one decimal (rounded half up).
#[derive(Debug, Clone, Copy)]
pub struct Per {
    /// The numerator.
    pub total: u64,
    /// The denominator (0 prints 0.0).
    pub count: u64,
}

impl fmt::Display for Per {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tenths = match self.count {
            0 => 0,
            n => (u128::from(self.total) * 10 + u128::from(n) / 2) / u128::from(n),
        };
        write!(f, "{}.{}", tenths / 10, tenths % 10)
    }
}

/// The platform word of this boot's figures: `pv`, `native` or `pvh`.
pub fn platform_word() -> &'static str {
    match platform::get() {
        Some(Platform::XenPv) => "pv",
        Some(Platform::XenPvh) => "pvh",
        Some(Platform::Native) | None => "native",
    }
}

/// Prints one figure: `BENCH <platform>-<name> <value> <unit>`.
pub fn emit(name: fmt::Arguments<'_>, value: impl fmt::Display, unit: impl fmt::Display) {
    crate::kprintln!("BENCH {}-{} {} {}", platform_word(), name, value, unit);
}

/// Prints a figure that does not exist on this platform (e.g. a large-page
/// split under Xen PV, which has no large pages): `BENCH <platform>-<name>
/// n/a <unit>`, so the table says so instead of showing a number.
pub fn emit_na(name: fmt::Arguments<'_>, unit: &str) {
    crate::kprintln!("BENCH {}-{} n/a {}", platform_word(), name, unit);
}
