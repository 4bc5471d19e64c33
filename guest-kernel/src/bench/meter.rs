//! Measuring one run on one CPU: TSC cycles and the hypercalls thread code
//! issued on that CPU ([`crate::percpu::hypercalls_of`]), so that on SMP
//! neither the other CPUs' hypercalls (their ticks, their idle blocks) nor
//! this CPU's interrupt handlers land in a count.
//!
//! Invariant: a [`Meter`] is read on the CPU it was started on (the
//! measured code runs with preemption off, or in threads pinned to that
//! CPU); [`Meter::stop`] fails the benchmark otherwise.

use crate::percpu;
use crate::platform::rdtsc;
use crate::selftest::{check_eq, Failure};

use super::figure::{emit, Per, Samples, REPS};

/// A run being measured.
#[derive(Debug)]
pub struct Meter {
    cpu: usize,
    tsc: u64,
    hypercalls: u64,
}

/// What one run cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// TSC cycles.
    pub cycles: u64,
    /// Hypercalls thread code issued on the CPU.
    pub hypercalls: u64,
}

impl Meter {
    /// Starts measuring on this CPU.
    pub fn start() -> Self {
        let cpu = percpu::cpu_id();
        let hypercalls = percpu::hypercalls_of(cpu).1;
        Meter {
            cpu,
            hypercalls,
            tsc: rdtsc(),
        }
    }

    /// Ends the run (on the CPU it started on).
    pub fn stop(self) -> Result<Sample, Failure> {
        let cycles = rdtsc().wrapping_sub(self.tsc);
        check_eq(
            "benchmark read on the CPU it started on",
            percpu::cpu_id() as u64,
            self.cpu as u64,
        )?;
        let hypercalls = percpu::hypercalls_of(self.cpu).1 - self.hypercalls;
        Ok(Sample { cycles, hypercalls })
    }
}

/// The samples of one figure: cycles and hypercalls of [`REPS`] runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    /// Cycles of each run.
    pub cycles: Samples,
    /// Hypercalls of each run.
    pub hypercalls: Samples,
}

impl Cost {
    /// Adds one run.
    pub fn push(&mut self, s: Sample) {
        self.cycles.push(s.cycles);
        self.hypercalls.push(s.hypercalls);
    }

    /// Emits `<name>` in `cycles/<per>` and, under PV, `<name>-hypercalls`
    /// in `hypercalls/<per>`, each the median over `count` (calls, pages,
    /// switches in a run). Natively requires that no hypercall was made.
    pub fn report(
        &self,
        pv: bool,
        name: core::fmt::Arguments<'_>,
        count: u64,
        per: &str,
    ) -> Result<(), Failure> {
        check_eq("samples per figure", self.cycles.len() as u64, REPS as u64)?;
        let cycles = Per {
            total: self.cycles.median(),
            count,
        };
        emit(format_args!("{name}"), cycles, format_args!("cycles/{per}"));
        if !pv {
            return check_eq("native hypercalls", self.hypercalls.median(), 0);
        }
        let hypercalls = Per {
            total: self.hypercalls.median(),
            count,
        };
        emit(
            format_args!("{name}-hypercalls"),
            hypercalls,
            format_args!("hypercalls/{per}"),
        );
        Ok(())
    }

    /// Requires the median hypercalls of a run to be `expected` (the
    /// design's count).
    pub fn expect_hypercalls(&self, what: &'static str, expected: u64) -> Result<(), Failure> {
        check_eq(what, self.hypercalls.median(), expected)
    }
}
