//! The in-kernel half of `cargo xtask bench`: the guest kernel booted with
//! `pvmmu.bench` natively and as Xen PV dom0, back to back, its `BENCH`
//! lines collected from both consoles and paired into PV/native ratios.
//!
//! Invariant: both boots run the same kernel build at the same memory in
//! the same invocation, and both must pass (one valid `PVMMU-REPORT`, then
//! `PVMMU-RESULT PASS`) and print at least one `BENCH` line, or the command
//! fails. A ratio `<name>-pv-vs-native` exists only for a `pv-<name>` and a
//! `native-<name>` figure with the same unit, both above zero; nothing here
//! knows the figures' names, so a new figure in the kernel gets its line,
//! its table row and its ratio without a change here.

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

/// Guest memory of both bench boots: the bootstraps are compared at this
/// size, and the largest run (262,144 pages, 1 GiB) needs a contiguous GiB
/// of RAM frames in either mode.
pub const BENCH_MEMORY_MIB: u64 = 1280;

/// Time limit of one bench boot (the Xen boot took 160 s in TCG, most of it
/// in the one-call-per-page runs over 262,144 pages).
pub const BENCH_TIMEOUT_SECS: u64 = 900;

/// The platform words of the two boots, as the kernel prints them.
pub const PV: &str = "pv";
/// See [`PV`].
pub const NATIVE: &str = "native";

/// The two boots: natively with a 4 KiB-only direct map (what PV builds),
/// then as Xen PV dom0.
pub fn boots() -> [RunOptions; 2] {
    let bench = |mode, cmdline: &str| RunOptions {
        mode,
        memory_mib: BENCH_MEMORY_MIB,
        cmdline: cmdline.to_string(),
        timeout_secs: Some(BENCH_TIMEOUT_SECS),
        ..RunOptions::default()
    };
    [
        bench(Mode::Native, "pvmmu.bench pvmmu.4k"),
        bench(Mode::Xen, "pvmmu.bench"),
    ]
}

/// What the bench boots produced.
#[derive(Debug, Default)]
pub struct KernelFigures {
    /// Every kernel `BENCH` line, native boot first, in console order.
    pub lines: Vec<BenchLine>,
    /// The ratios computed from them.
    pub ratios: Vec<BenchLine>,
    /// One sentence per boot: mode, memory, command line, time.
    pub boots: Vec<String>,
}

/// Builds the kernel, runs both bench boots and pairs their figures.
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
            "xtask: bench boot {} (--mode {} --memory {} --cmdline \"{}\")",
            request.label,
            request.options.mode.name(),
            request.options.memory_mib,
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
        "`--mode {}`, {} MiB, kernel command line `{}`, {:.0} s",
        options.mode.name(),
        options.memory_mib,
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
/// the same unit, both above zero: PV's figure over native's, two
/// decimals, unit `x`.
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
        let [native, xen] = boots();
        assert_eq!((native.mode, xen.mode), (Mode::Native, Mode::Xen));
        assert_eq!(native.memory_mib, xen.memory_mib);
        assert!(native.cmdline.split_whitespace().any(|w| w == "pvmmu.4k"));
        for options in [&native, &xen] {
            assert!(options
                .cmdline
                .split_whitespace()
                .any(|w| w == "pvmmu.bench"));
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
        ]
        .map(line);
        let got = ratios(&lines);
        assert_eq!(
            got,
            vec![BenchLine {
                name: "map-16-range-pv-vs-native".into(),
                value: "2.50".into(),
                unit: "x".into(),
            }]
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
            ]
        );
    }
}
