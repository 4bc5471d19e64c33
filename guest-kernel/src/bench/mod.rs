//! In-kernel micro-benchmarks, run after the self-tests when the command
//! line says `pvmmu.bench`: pvmmu's address-space calls on the live tree
//! timed with the TSC, and what the bootstrap that built the tree cost.
//!
//! Invariant: every figure is one line `BENCH <platform>-<name> <value>
//! <unit>` ([`figure::emit`]); a boot prints the same names and units on
//! every platform, so that the xtask pairs the figures of two boots (`pv-`
//! and `native-`) into `<name>-pv-vs-native`. A timed figure is the median
//! of [`figure::REPS`] runs. A benchmark is also a self-test: it checks what
//! it measured, and a failure fails the boot.
//!
//! Adding a figure: a function `fn(&mut Kernel) -> TestResult` (or a body
//! for the live address space, see [`crate::pvmmu_tests::live`]) that calls
//! [`figure::emit`], and one line in [`SUITE`].

mod bootstrap;
pub mod figure;
mod space;

use crate::pvmmu_tests::live;
use crate::selftest::SelfTest;

/// The benchmarks, in the order they run.
pub const SUITE: &[SelfTest] = &[
    SelfTest::new("bench_bootstrap", bootstrap::bootstrap),
    SelfTest::new("bench_space_1", |k| {
        live(k, space::ops::<1, _>, space::ops::<1, _>)
    }),
    SelfTest::new("bench_space_16", |k| {
        live(k, space::ops::<16, _>, space::ops::<16, _>)
    }),
    SelfTest::new("bench_space_512", |k| {
        live(k, space::ops::<512, _>, space::ops::<512, _>)
    }),
    SelfTest::new("bench_space_262144", |k| {
        live(k, space::ops::<262_144, _>, space::ops::<262_144, _>)
    }),
    SelfTest::new("bench_translate_512", |k| {
        live(k, space::translate::<512, _>, space::translate::<512, _>)
    }),
];
