//! In-kernel micro-benchmarks, run after the self-tests when the command
//! line says `pvmmu.bench`: pvmmu's address-space calls on the live tree
//! timed with the TSC, and what the bootstrap that built the tree cost
//! ([`SUITE`], one CPU, before the tick starts); then, once the running
//! kernel and the other CPUs are up, change_page_attr, lazy mode, kmap and
//! the frame allocator ([`RUNNING_SUITE`]). With `pvmmu.bench_smp` (the
//! SMP bench boots) only the figures that depend on the CPU count run:
//! the TLB shootdowns ([`SMP_SUITE`]).
//!
//! Invariant: every figure is one line `BENCH <platform>-<name> <value>
//! <unit>` ([`figure::emit`]); a boot prints the same names and units on
//! every platform, so that the xtask pairs the figures of two boots (`pv-`
//! and `native-`) into `<name>-pv-vs-native`. A timed figure is the median
//! of [`figure::REPS`] runs. Hypercalls are counted per CPU for thread
//! code only ([`meter`]), so other CPUs and interrupt handlers never land
//! in a count. A benchmark is also a self-test: it checks what it
//! measured (including the hypercalls the design says it makes), and a
//! failure fails the boot.
//!
//! Adding a figure: a function `fn(&mut Kernel) -> TestResult` (or a body
//! for the live address space, see [`crate::pvmmu_tests::live`]) that calls
//! [`figure::emit`] (or [`meter::Cost::report`]), and one line in a suite.

mod bootstrap;
mod cpa;
pub mod figure;
mod kmap;
mod lazy;
mod meter;
mod shootdown;
mod space;

use crate::pvmmu_tests::live;
use crate::selftest::SelfTest;

/// The benchmarks on one CPU before the running kernel, in order.
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
    SelfTest::new("bench_split_2m", |k| {
        live(k, cpa::split_pv, cpa::split_native)
    }),
];

/// The benchmarks of the running kernel (threads, the tick, the kernel
/// space), after its self-tests, in order.
pub const RUNNING_SUITE: &[SelfTest] = &[
    SelfTest::new("bench_set_memory_ro_1", cpa::set_memory_ro::<1>),
    SelfTest::new("bench_set_memory_ro_512", cpa::set_memory_ro::<512>),
    SelfTest::new("bench_set_memory_ro_262144", cpa::set_memory_ro::<262_144>),
    SelfTest::new("bench_frame_alloc_free", |k| {
        cpa::alloc_free(k, &cpa::PLAIN)
    }),
    SelfTest::new("bench_lazy_1000_updates", lazy::updates),
    SelfTest::new("bench_kmap_pair", kmap::pair),
    SelfTest::new("bench_kmap_switch_0", kmap::switch::<0>),
    SelfTest::new("bench_kmap_switch_1", kmap::switch::<1>),
    SelfTest::new("bench_kmap_switch_4", kmap::switch::<4>),
];

/// The benchmarks of the SMP bench boots (`pvmmu.bench_smp`).
pub const SMP_SUITE: &[SelfTest] = &[
    SelfTest::new("bench_shootdown_1", shootdown::shootdown::<1>),
    SelfTest::new("bench_shootdown_512", shootdown::shootdown::<512>),
    // Only in the boots with `pvmmu.debug_pagealloc` (the 2-CPU pair).
    SelfTest::new("bench_frame_alloc_free_pagealloc", |k| {
        if !crate::pagealloc::enabled() {
            return Ok(());
        }
        cpa::alloc_free(k, &cpa::PAGEALLOC)
    }),
];
