//! The in-kernel half of `cargo xtask bench`: the guest kernel booted in
//! bench mode natively and as Xen PV dom0, in pairs, back to back: on one
//! CPU with `pvmmu.bench` (every one-CPU figure), then with 2 and 4 CPUs
//! with `pvmmu.bench_smp` (the figures that depend on the CPU count, the
//! TLB shootdowns, whose names carry it: `shootdown-1p-2cpu`). Their
//! `BENCH` lines are collected from every console and paired into PV/native
//! ratios.
//!
//! Invariant: the two boots of a pair run the same kernel build at the same
//! memory and CPU count in the same invocation, and every boot must pass
//! (one valid `PVMMU-REPORT`, then `PVMMU-RESULT PASS`) and print at least
//! one `BENCH` line, or the command fails. A ratio `<name>-pv-vs-native`
//! exists only for a `pv-<name>` and a `native-<name>` figure with the same
//! unit, both numbers above zero (a figure that cannot exist on a platform
//! is printed as `n/a` and has no ratio); nothing here knows the figures'
//! names, so a new figure in the kernel gets its line, its table row and
//! its ratio without a change here.

use std::path::PathBuf;
use std::time::Duration;

use crate::bench::{parse_line, BenchLine};
use crate::boot;
use crate::cli::{Mode, RunOptions};
use crate::error::XtaskError;
use crate::harness::{Echo, Verdict};
use crate::host;
use crate::request::{self, BootRequest};
use crate::workspace::Workspace;

/// Guest memory of the one-CPU bench boots: the bootstraps are compared
/// at this size, and the largest runs (262,144 pages, 1 GiB) need a
/// contiguous GiB of RAM frames in either mode.
pub const BENCH_MEMORY_MIB: u64 = 1280;

/// Guest memory of the SMP bench boots (their figures touch 512 pages).
pub const SMP_BENCH_MEMORY_MIB: u64 = 512;

/// CPU counts of the SMP bench boots.
pub const SMP_CPUS: [u32; 2] = [2, 4];

/// Time limit of one bench boot (the one-CPU Xen boot took 160 s in TCG,
/// most of it in the one-call-per-page runs over 262,144 pages).
pub const BENCH_TIMEOUT_SECS: u64 = 900;

/// The platform words of the two boots of a pair, as the kernel prints them.
pub const PV: &str = "pv";
/// See [`PV`].
pub const NATIVE: &str = "native";

/// The boots, in pairs (native with a 4 KiB-only direct map, what PV
/// builds, then Xen PV dom0): one CPU with every figure, then 2 and 4
/// CPUs with the SMP figures.
pub fn boots() -> Vec<RunOptions> {
    let bench = |mode, memory_mib, smp, cmdline: &str| RunOptions {
        mode,
        memory_mib,
        smp,
        cmdline: cmdline.to_string(),
        timeout_secs: Some(BENCH_TIMEOUT_SECS),
        ..RunOptions::default()
    };
    let mut boots = vec![
        bench(Mode::Native, BENCH_MEMORY_MIB, 1, "pvmmu.bench pvmmu.4k"),
        bench(Mode::Xen, BENCH_MEMORY_MIB, 1, "pvmmu.bench"),
    ];
    for cpus in SMP_CPUS {
        // The 2-CPU pair also times the frame allocator under
        // DEBUG_PAGEALLOC (a shootdown per free), against the one-CPU
        // boots' plain figure.
        let pagealloc = if cpus == 2 {
            " pvmmu.debug_pagealloc"
        } else {
            ""
        };
        boots.push(bench(
            Mode::Native,
            SMP_BENCH_MEMORY_MIB,
            cpus,
            &format!("pvmmu.bench_smp pvmmu.4k{pagealloc}"),
        ));
        boots.push(bench(
            Mode::Xen,
            SMP_BENCH_MEMORY_MIB,
            cpus,
            &format!("pvmmu.bench_smp{pagealloc}"),
        ));
    }
    boots
}

/// What the bench boots produced.
#[derive(Debug, Default)]
pub struct KernelFigures {
    /// Every kernel `BENCH` line, in boot order, each boot's in console
    /// order.
    pub lines: Vec<BenchLine>,
    /// The ratios computed from them.
    pub ratios: Vec<BenchLine>,
    /// One sentence per boot: mode, memory, CPUs, command line, time.
    pub boots: Vec<String>,
}

/// Runs every bench boot of the built kernel and pairs their figures.
/// Prints the kernel's and the ratio lines on stdout as they are known.
pub fn run(ws: &Workspace, kernel: PathBuf) -> Result<KernelFigures, XtaskError> {
    let mut figures = KernelFigures::default();
    for options in boots() {
        if let Err(e) = boot::validate(&options, host::mem_available_mib()) {
            return Err(XtaskError::BenchBoot {
                label: request::label(&options),
                reason: e.to_string(),
                log: None,
            });
        }
        let request = BootRequest {
            kernel: kernel.clone(),
            label: request::label(&options),
            options,
            echo: Echo::Quiet,
        };
        eprintln!(
            "xtask: bench boot {} (--mode {} --memory {} --smp {} --cmdline \"{}\")",
            request.label,
            request.options.mode.name(),
            request.options.memory_mib,
            request.options.smp,
            request.options.cmdline
        );
        let outcome = boot::boot(ws, &request)?;
        let failed = |reason: String| XtaskError::BenchBoot {
            label: request.label.clone(),
            reason,
            log: Some(outcome.log_path.clone()),
        };
        let report = match &outcome.verdict {
            Verdict::Pass(report) => report.summary(),
            Verdict::Fail(failure) => return Err(failed(failure.to_string())),
        };
        let lines = bench_lines(&outcome.transcript);
        if lines.is_empty() {
            return Err(failed("the boot passed but printed no BENCH line".into()));
        }
        for line in &lines {
            println!("{}", line.text());
        }
        eprintln!(
            "xtask: {} PASS in {:.1} s, {} figures: {report}",
            request.label,
            outcome.elapsed.as_secs_f64(),
            lines.len()
        );
        figures
            .boots
            .push(describe(&request.options, outcome.elapsed));
        figures.lines.extend(lines);
    }
    figures.ratios = ratios(&figures.lines);
    for line in &figures.ratios {
        println!("{}", line.text());
    }
    Ok(figures)
}

fn describe(options: &RunOptions, elapsed: Duration) -> String {
    format!(
        "`--mode {}`, {} MiB, {} CPU{}, kernel command line `{}`, {:.0} s",
        options.mode.name(),
        options.memory_mib,
        options.smp,
        if options.smp == 1 { "" } else { "s" },
        options.cmdline,
        elapsed.as_secs_f64()
    )
}

/// The `BENCH` lines of a console transcript, in order.
pub fn bench_lines(transcript: &[String]) -> Vec<BenchLine> {
    transcript.iter().filter_map(|l| parse_line(l)).collect()
}

/// Splits `pv-map-16-range` into (`pv`, `map-16-range`).
pub fn split_platform(name: &str) -> Option<(&str, &str)> {
    let (platform, rest) = name.split_once('-')?;
    (!rest.is_empty()).then_some((platform, rest))
}

/// `<name>-pv-vs-native` for every `pv-<name>` with a `native-<name>` of
/// the same unit, both numbers above zero (not `n/a`): PV's figure over
/// native's, two decimals, unit `x`.
pub fn ratios(lines: &[BenchLine]) -> Vec<BenchLine> {
    let value = |platform: &str, name: &str, unit: &str| {
        lines.iter().find_map(|l| {
            let (p, n) = split_platform(&l.name)?;
            (p == platform && n == name && l.unit == unit)
                .then(|| l.value.parse::<f64>().ok())
                .flatten()
        })
    };
    lines
        .iter()
        .filter_map(|l| {
            let (platform, name) = split_platform(&l.name)?;
            if platform != PV {
                return None;
            }
            let pv = value(PV, name, &l.unit)?;
            let native = value(NATIVE, name, &l.unit)?;
            (pv > 0.0 && native > 0.0).then(|| BenchLine {
                name: format!("{name}-pv-vs-native"),
                value: format!("{:.2}", pv / native),
                unit: "x".into(),
            })
        })
        .collect()
}

/// The kernel figures side by side: one row per name and unit, native and
/// PV values, their ratio, the unit; in the PV boot's order (it prints
/// every figure native prints, and its counters next to them), then any
/// other.
pub fn table(figures: &KernelFigures) -> String {
    let mut rows: Vec<(&str, &str)> = Vec::new();
    let pv_first = figures
        .lines
        .iter()
        .filter(|l| split_platform(&l.name).is_some_and(|(p, _)| p == PV))
        .chain(figures.lines.iter());
    for line in pv_first {
        if let Some((_, name)) = split_platform(&line.name) {
            if !rows.contains(&(name, line.unit.as_str())) {
                rows.push((name, &line.unit));
            }
        }
    }
    let cell = |platform: &str, name: &str, unit: &str| {
        figures
            .lines
            .iter()
            .find(|l| split_platform(&l.name) == Some((platform, name)) && l.unit == unit)
            .map_or("–".to_string(), |l| l.value.clone())
    };
    let mut text = String::from("| figure | native | pv | pv / native | unit |\n");
    text.push_str("|---|---:|---:|---:|---|\n");
    for (name, unit) in rows {
        let ratio = figures
            .ratios
            .iter()
            .find(|r| r.name == format!("{name}-pv-vs-native"))
            .map_or("–".to_string(), |r| r.value.clone());
        text.push_str(&format!(
            "| {name} | {} | {} | {ratio} | {unit} |\n",
            cell(NATIVE, name, unit),
            cell(PV, name, unit)
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> BenchLine {
        parse_line(text).expect("a BENCH line")
    }

    #[test]
    fn boots_compare_like_with_like() {
        let boots = boots();
        assert_eq!(boots.len(), 2 * (1 + SMP_CPUS.len()));
        let pairs: Vec<&[RunOptions]> = boots.chunks(2).collect();
        for pair in &pairs {
            let [native, xen] = pair else {
                panic!("boots come in pairs")
            };
            assert_eq!((native.mode, xen.mode), (Mode::Native, Mode::Xen));
            assert_eq!(native.memory_mib, xen.memory_mib);
            assert_eq!(native.smp, xen.smp);
            assert!(native.cmdline.split_whitespace().any(|w| w == "pvmmu.4k"));
            assert!(!xen.cmdline.split_whitespace().any(|w| w == "pvmmu.4k"));
            // The same bench option on both sides: every one-CPU figure
            // on one CPU, only the SMP figures on more.
            let option = if native.smp == 1 {
                "pvmmu.bench"
            } else {
                "pvmmu.bench_smp"
            };
            for options in [native, xen] {
                let words: Vec<&str> = options.cmdline.split_whitespace().collect();
                assert!(words.contains(&option), "{words:?}");
                assert_eq!(
                    words
                        .iter()
                        .filter(|w| w.starts_with("pvmmu.bench"))
                        .count(),
                    1
                );
            }
        }
        let cpus: Vec<u32> = pairs.iter().map(|p| p[0].smp).collect();
        assert_eq!(cpus, [1, 2, 4]);
        assert_eq!(boots[0].memory_mib, BENCH_MEMORY_MIB);
    }

    /// A `pvmmu.*` word the kernel does not know prints a `PVMMU-WARNING`,
    /// which fails the boot: every option of a bench boot must be in the
    /// kernel's option table (`pvmmu.bench` was missing from it once).
    #[test]
    fn the_kernel_knows_every_bench_option() {
        let table = include_str!("../../guest-kernel/src/cmdline.rs");
        for options in boots() {
            for word in options.cmdline.split_whitespace() {
                assert!(word.starts_with("pvmmu."), "{word}");
                assert!(
                    table.contains(&format!("name: \"{word}\",")),
                    "{word} is not in the kernel's OPTIONS"
                );
            }
        }
    }

    #[test]
    fn labels_of_the_boots_differ() {
        let labels: Vec<String> = boots().iter().map(request::label).collect();
        for (i, l) in labels.iter().enumerate() {
            assert!(!labels[i + 1..].contains(l), "two boots log to {l}");
        }
    }

    #[test]
    fn bench_lines_come_from_the_console_only_when_well_formed() {
        let transcript: Vec<String> = [
            "selftest bench_space_16 ... ok",
            "BENCH native-map-16-range 2343.3 cycles/page\r",
            "BENCH broken",
            "qemu: BENCH not-console 1 x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let lines = bench_lines(&transcript);
        assert_eq!(
            lines,
            vec![line("BENCH native-map-16-range 2343.3 cycles/page")]
        );
    }

    #[test]
    fn ratios_pair_same_name_and_unit() {
        let lines = [
            "BENCH native-map-16-range 100.0 cycles/page",
            "BENCH pv-map-16-range 250.0 cycles/page",
            // Same name, other unit: not paired with the one above.
            "BENCH pv-map-16-range 3.0 hypercalls/call",
            // Native only, PV only, zero native.
            "BENCH native-translate-512 700.0 cycles/page",
            "BENCH pv-map-16-range-entries 19.0 entries/call",
            "BENCH native-unmap-1-range 0.0 cycles/page",
            "BENCH pv-unmap-1-range 5.0 cycles/page",
            "BENCH pvh-map-16-range 120.0 cycles/page",
            // Not there on one side: no ratio.
            "BENCH native-split-2m 5000.0 cycles/call",
            "BENCH pv-split-2m n/a cycles/call",
            // The CPU count is part of the name: 2 CPUs pair with 2.
            "BENCH native-shootdown-1p-2cpu 400.0 cycles/call",
            "BENCH native-shootdown-1p-4cpu 800.0 cycles/call",
            "BENCH pv-shootdown-1p-4cpu 1000.0 cycles/call",
            "BENCH pv-shootdown-1p-2cpu 200.0 cycles/call",
        ]
        .map(line);
        let got = ratios(&lines);
        let ratio = |name: &str, value: &str| BenchLine {
            name: name.into(),
            value: value.into(),
            unit: "x".into(),
        };
        assert_eq!(
            got,
            vec![
                ratio("map-16-range-pv-vs-native", "2.50"),
                ratio("shootdown-1p-4cpu-pv-vs-native", "1.25"),
                ratio("shootdown-1p-2cpu-pv-vs-native", "0.50"),
            ]
        );
    }

    #[test]
    fn table_has_one_row_per_figure_with_both_platforms() {
        let lines: Vec<BenchLine> = [
            "BENCH native-map-1-range 10.0 cycles/page",
            "BENCH native-translate-1 5.0 cycles/page",
            "BENCH pv-map-1-range 30.0 cycles/page",
            "BENCH pv-map-1-range-hypercalls 1.0 hypercalls/call",
            "BENCH pv-translate-1 6.0 cycles/page",
            "BENCH native-split-2m 5000.0 cycles/call",
            "BENCH pv-split-2m n/a cycles/call",
        ]
        .map(line)
        .to_vec();
        let figures = KernelFigures {
            ratios: ratios(&lines),
            lines,
            boots: vec![],
        };
        let text = table(&figures);
        let rows: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(
            rows,
            [
                "| map-1-range | 10.0 | 30.0 | 3.00 | cycles/page |",
                "| map-1-range-hypercalls | – | 1.0 | – | hypercalls/call |",
                "| translate-1 | 5.0 | 6.0 | 1.20 | cycles/page |",
                "| split-2m | 5000.0 | n/a | – | cycles/call |",
            ]
        );
    }
}
