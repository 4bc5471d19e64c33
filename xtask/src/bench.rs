//! `cargo xtask bench`: run the workspace's host benchmarks, boot the
//! guest kernel in bench mode natively and under Xen (see
//! [`crate::kernel_bench`]), collect their `BENCH <name> <value> <unit>`
//! lines, write a markdown table.
//!
//! Invariant: stdout of `cargo xtask bench` carries only the BENCH lines, in
//! the order they were printed (host benchmarks, the native boot, the Xen
//! boot, then the PV/native ratios; cargo's, QEMU's and the benchmarks'
//! other output goes to stderr or the boot logs), and the table holds
//! exactly those lines.

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::build;
use crate::cli::Profile;
use crate::error::XtaskError;
use crate::host;
use crate::kernel_bench::{self, KernelFigures};
use crate::workspace::{Workspace, KERNEL_PACKAGE};

/// One `BENCH <name> <value> <unit>` line.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchLine {
    /// The benchmark's name, one word.
    pub name: String,
    /// The figure as printed.
    pub value: String,
    /// Its unit: the rest of the line.
    pub unit: String,
}

impl BenchLine {
    /// The line as printed: `BENCH <name> <value> <unit>`.
    pub fn text(&self) -> String {
        format!("BENCH {} {} {}", self.name, self.value, self.unit)
    }
}

/// The value of a figure that does not exist on the platform that
/// printed it (e.g. a large-page split under Xen PV).
pub const NOT_APPLICABLE: &str = "n/a";

/// Parses a BENCH line (its value a number or [`NOT_APPLICABLE`]); `None`
/// for any other line.
pub fn parse_line(line: &str) -> Option<BenchLine> {
    let rest = line.trim().strip_prefix("BENCH ")?;
    let mut words = rest.split_whitespace();
    let name = words.next()?;
    let value = words.next()?;
    if value != NOT_APPLICABLE {
        value.parse::<f64>().ok()?;
    }
    let unit = words.collect::<Vec<_>>().join(" ");
    if unit.is_empty() {
        return None;
    }
    Some(BenchLine {
        name: name.to_string(),
        value: value.to_string(),
        unit,
    })
}

/// The markdown page: the host benchmarks' table, then the kernel's
/// figures side by side with their ratios (when the kernel boots ran).
pub fn markdown(
    host: &[BenchLine],
    kernel: Option<&KernelFigures>,
    commit: Option<&str>,
) -> String {
    let mut text = String::from("# pvmmu benchmarks\n\n");
    text.push_str("Written by `cargo xtask bench`");
    if let Some(commit) = commit {
        text.push_str(&format!(" at commit `{commit}`"));
    }
    text.push_str(".\n\n## Host (`cargo bench`, the Xen model)\n\n");
    text.push_str("| benchmark | value | unit |\n|---|---:|---|\n");
    for line in host {
        text.push_str(&format!(
            "| {} | {} | {} |\n",
            line.name, line.value, line.unit
        ));
    }
    if let Some(kernel) = kernel {
        text.push_str("\n## In the guest kernel, PV against native\n\n");
        text.push_str(
            "Boots of one invocation, under QEMU TCG (absolute cycles are \
             emulation noise; the ratio is the figure). Timed figures are the \
             median of 5 runs; the bootstrap's are one run per boot.\n\n",
        );
        for boot in &kernel.boots {
            text.push_str(&format!("- {boot}\n"));
        }
        text.push('\n');
        text.push_str(&kernel_bench::table(kernel));
    }
    text
}

fn current_commit(ws: &Workspace) -> Option<String> {
    let output = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(&ws.root)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let commit = String::from_utf8(output.stdout).ok()?.trim().to_string();
    (output.status.success() && !commit.is_empty()).then_some(commit)
}

/// Runs `cargo bench` for the host crates, then the kernel's bench boots,
/// and writes `<target>/bench.md`.
pub fn run(ws: &Workspace) -> Result<(), XtaskError> {
    let host = host_benches(ws)?;
    let kernel = build::kernel(ws, Profile::Release)?;
    let figures = kernel_bench::run(ws, kernel)?;
    let path = ws.bench_table();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)
            .map_err(|e| XtaskError::io(format!("creating {}", dir.display()), e))?;
    }
    let text = markdown(&host, Some(&figures), current_commit(ws).as_deref());
    fs::write(&path, text).map_err(|e| XtaskError::io(format!("writing {}", path.display()), e))?;
    eprintln!(
        "xtask: {} host, {} kernel and {} ratio figures written to {}",
        host.len(),
        figures.lines.len(),
        figures.ratios.len(),
        path.display()
    );
    Ok(())
}

/// `cargo bench` of the host crates: their BENCH lines, echoed on stdout.
fn host_benches(ws: &Workspace) -> Result<Vec<BenchLine>, XtaskError> {
    let mut command = build::cargo(ws);
    command
        .args(["bench", "--workspace", "--exclude", KERNEL_PACKAGE])
        .stdout(Stdio::piped());
    let described = host::describe(&command);
    eprintln!("xtask: $ {described}");
    let mut child = command.spawn().map_err(|source| XtaskError::Spawn {
        program: "cargo".into(),
        source,
    })?;
    let mut lines = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(|e| XtaskError::io("reading cargo bench's output", e))?;
            match parse_line(&line) {
                Some(bench) => {
                    println!("{}", line.trim());
                    lines.push(bench);
                }
                None => eprintln!("{line}"),
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| XtaskError::io("waiting for cargo bench", e))?;
    if !status.success() {
        return Err(XtaskError::CommandFailed {
            command: described,
            status,
        });
    }
    if lines.is_empty() {
        return Err(XtaskError::NoBenchmarks);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_lines() {
        assert_eq!(
            parse_line("BENCH range-map-vs-x86_64 7.25 x"),
            Some(BenchLine {
                name: "range-map-vs-x86_64".into(),
                value: "7.25".into(),
                unit: "x".into()
            })
        );
        assert_eq!(
            parse_line("  BENCH pv-map-1g-hypercalls 8 calls per GiB\n").map(|b| b.unit),
            Some("calls per GiB".into())
        );
        assert_eq!(parse_line("BENCH no-unit 3"), None);
        assert_eq!(parse_line("BENCH bad-value fast x"), None);
        assert_eq!(
            parse_line("BENCH pv-split-2m n/a cycles/call").map(|b| b.value),
            Some("n/a".into())
        );
        assert_eq!(parse_line("BENCH pv-split-2m N/A cycles/call"), None);
        assert_eq!(parse_line("test foo ... bench: 10 ns/iter"), None);
        assert_eq!(parse_line("BENCHMARK x 1 y"), None);
    }

    #[test]
    fn table_has_one_row_per_line() {
        let lines = vec![
            parse_line("BENCH a 1.5 x").unwrap(),
            parse_line("BENCH b 8 calls").unwrap(),
        ];
        let text = markdown(&lines, None, Some("abc1234"));
        assert!(text.contains("commit `abc1234`"));
        assert!(text.contains("| a | 1.5 | x |\n| b | 8 | calls |\n"));
        assert_eq!(text.lines().filter(|l| l.starts_with("| ")).count(), 3);
        assert!(!text.contains("guest kernel"));
    }

    #[test]
    fn kernel_figures_follow_the_host_table() {
        let host = vec![parse_line("BENCH a 1.5 x").unwrap()];
        let lines = vec![
            parse_line("BENCH native-map-1-range 10.0 cycles/page").unwrap(),
            parse_line("BENCH pv-map-1-range 25.0 cycles/page").unwrap(),
        ];
        let figures = KernelFigures {
            ratios: kernel_bench::ratios(&lines),
            lines,
            boots: vec!["`--mode native`".into(), "`--mode xen`".into()],
        };
        let text = markdown(&host, Some(&figures), None);
        let (host_part, kernel_part) = text.split_once("guest kernel").unwrap();
        assert!(host_part.contains("| a | 1.5 | x |"));
        assert!(kernel_part.contains("- `--mode native`\n- `--mode xen`\n"));
        assert!(kernel_part.contains("| map-1-range | 10.0 | 25.0 | 2.50 | cycles/page |"));
    }

    #[test]
    fn a_line_prints_as_it_parses() {
        let line = parse_line("BENCH pv-map-16-range 7.5 cycles/page").unwrap();
        assert_eq!(line.text(), "BENCH pv-map-16-range 7.5 cycles/page");
        assert_eq!(parse_line(&line.text()), Some(line));
    }
}
