//! `cargo xtask bench`: run the workspace's benchmarks, collect their
//! `BENCH <name> <value> <unit>` lines, write a markdown table.
//!
//! Invariant: stdout of `cargo xtask bench` carries only the BENCH lines, in
//! the order the benchmarks printed them (cargo's and the benchmarks' other
//! output goes to stderr), and the table holds exactly those lines.

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::build;
use crate::error::XtaskError;
use crate::host;
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

/// Parses a BENCH line; `None` for any other line.
pub fn parse_line(line: &str) -> Option<BenchLine> {
    let rest = line.trim().strip_prefix("BENCH ")?;
    let mut words = rest.split_whitespace();
    let name = words.next()?;
    let value = words.next()?;
    value.parse::<f64>().ok()?;
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

/// The markdown table of `lines`.
pub fn markdown(lines: &[BenchLine], commit: Option<&str>) -> String {
    let mut text = String::from("# pvmmu benchmarks\n\n");
    text.push_str("Written by `cargo xtask bench`");
    if let Some(commit) = commit {
        text.push_str(&format!(" at commit `{commit}`"));
    }
    text.push_str(".\n\n| benchmark | value | unit |\n|---|---:|---|\n");
    for line in lines {
        text.push_str(&format!(
            "| {} | {} | {} |\n",
            line.name, line.value, line.unit
        ));
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

/// Runs `cargo bench` for the host crates and writes `<target>/bench.md`.
pub fn run(ws: &Workspace) -> Result<(), XtaskError> {
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
    let path = ws.bench_table();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)
            .map_err(|e| XtaskError::io(format!("creating {}", dir.display()), e))?;
    }
    fs::write(&path, markdown(&lines, current_commit(ws).as_deref()))
        .map_err(|e| XtaskError::io(format!("writing {}", path.display()), e))?;
    eprintln!(
        "xtask: {} benchmark figures written to {}",
        lines.len(),
        path.display()
    );
    Ok(())
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
        assert_eq!(parse_line("test foo ... bench: 10 ns/iter"), None);
        assert_eq!(parse_line("BENCHMARK x 1 y"), None);
    }

    #[test]
    fn table_has_one_row_per_line() {
        let lines = vec![
            parse_line("BENCH a 1.5 x").unwrap(),
            parse_line("BENCH b 8 calls").unwrap(),
        ];
        let text = markdown(&lines, Some("abc1234"));
        assert!(text.contains("commit `abc1234`"));
        assert!(text.contains("| a | 1.5 | x |\n| b | 8 | calls |\n"));
        assert_eq!(text.lines().filter(|l| l.starts_with("| ")).count(), 3);
    }
}
