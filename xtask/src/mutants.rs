//! `cargo xtask mutants`: cargo-mutants over pvmmu's core (the backends, the
//! address space and its engine, lazy batches, the walker and invariants,
//! the bootstrap, entries, the shootdown protocol) against pvmmu's host
//! tests, within a time budget.
//!
//! Invariant: the summary counts only outcomes cargo-mutants wrote (its
//! `caught.txt`, `missed.txt`, `timeout.txt`, `unviable.txt`), so a run
//! stopped by the budget reports what it tested and how many mutants it
//! did not reach, never a guess. cargo-mutants runs in its own process
//! group and is ended with it (budget, Ctrl-C, or the xtask's death).
//!
//! The property tests run small for each mutant (`PVMMU_PROPS_CASES`);
//! every other host test of pvmmu runs as in `cargo test` (the doctests
//! do not: they are usage examples). The exit status is 0 only
//! when every mutant was tested and none was missed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::children;
use crate::error::XtaskError;
use crate::host;
use crate::workspace::Workspace;

/// The budget when `--minutes` is not given.
pub const DEFAULT_MINUTES: u64 = 150;

/// What `cargo xtask mutants` was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MutantsOptions {
    /// The time budget in minutes.
    pub minutes: u64,
    /// Only the `k`-th of `n` slices of the mutants (cargo-mutants'
    /// `--shard k/n`), for a budget smaller than the whole run.
    pub shard: Option<(u32, u32)>,
}

impl Default for MutantsOptions {
    fn default() -> Self {
        Self {
            minutes: DEFAULT_MINUTES,
            shard: None,
        }
    }
}

/// pvmmu's core: the files whose mutants are tested (paths as cargo-mutants
/// sees them, relative to the workspace).
const FILES: &[&str] = &[
    "pvmmu/src/backend/**",
    "pvmmu/src/space/**",
    "pvmmu/src/bootstrap/**",
    "pvmmu/src/lazy.rs",
    "pvmmu/src/invariants.rs",
    "pvmmu/src/walk.rs",
    "pvmmu/src/entry.rs",
    "pvmmu/src/shootdown.rs",
];

/// Test-only code inside those directories.
const EXCLUDED: &[&str] = &[
    "pvmmu/src/bootstrap/tests*.rs",
    "pvmmu/src/bootstrap/sim.rs",
];

/// Property-test cases per seed for each mutant (the default run has 150).
const PROPS_CASES: &str = "6";

/// One mutant's test run may take this long before it counts as a timeout.
const TEST_TIMEOUT_SECS: u64 = 300;

/// What cargo-mutants reported, by outcome.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Mutants a test failed on.
    pub caught: Vec<String>,
    /// Mutants every test passed with.
    pub missed: Vec<String>,
    /// Mutants whose tests ran past the timeout.
    pub timeout: Vec<String>,
    /// Mutants that did not build.
    pub unviable: Vec<String>,
}

impl Outcomes {
    /// Reads the outcome lists in `dir` (cargo-mutants' `mutants.out`); a
    /// list not written yet is empty.
    pub fn read(dir: &Path) -> Outcomes {
        let list = |name: &str| -> Vec<String> {
            fs::read_to_string(dir.join(name))
                .map(|text| {
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        Outcomes {
            caught: list("caught.txt"),
            missed: list("missed.txt"),
            timeout: list("timeout.txt"),
            unviable: list("unviable.txt"),
        }
    }

    /// Mutants with an outcome.
    pub fn tested(&self) -> usize {
        self.caught.len() + self.missed.len() + self.timeout.len() + self.unviable.len()
    }

    /// The markdown summary: counts, then every missed and timed-out mutant.
    pub fn summary(&self, total: usize, minutes: f64, budget: u64) -> String {
        let mut out = format!(
            "cargo-mutants over pvmmu's core: {} of {total} mutants tested in {minutes:.0} min \
             (budget {budget} min): {} caught, {} missed, {} timeout, {} unviable\n",
            self.tested(),
            self.caught.len(),
            self.missed.len(),
            self.timeout.len(),
            self.unviable.len()
        );
        for (title, list) in [("Missed", &self.missed), ("Timeout", &self.timeout)] {
            if !list.is_empty() {
                out.push_str(&format!("\n{title}:\n"));
                for m in list {
                    out.push_str(&format!("- `{m}`\n"));
                }
            }
        }
        out
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The cargo-mutants arguments selecting pvmmu's core (and the shard).
fn selection(shard: Option<(u32, u32)>) -> Vec<String> {
    let mut args = vec!["--package".to_string(), "pvmmu".to_string()];
    if let Some((k, n)) = shard {
        args.push("--shard".into());
        args.push(format!("{k}/{n}"));
    }
    for f in FILES {
        args.push("--file".into());
        args.push((*f).into());
    }
    for e in EXCLUDED {
        args.push("--exclude".into());
        args.push((*e).into());
    }
    args
}

/// Installs cargo-mutants with `cargo install` when `cargo mutants` does not
/// run, saying so first.
fn ensure_installed() -> Result<(), XtaskError> {
    let present = cargo()
        .args(["mutants", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        eprintln!("xtask: cargo-mutants is not installed; installing it with `cargo install cargo-mutants --locked`");
        host::run(cargo().args(["install", "cargo-mutants", "--locked"]))?;
    }
    Ok(())
}

/// How many mutants the selection holds (`cargo mutants --list`).
fn count(ws: &Workspace, shard: Option<(u32, u32)>) -> Result<usize, XtaskError> {
    let mut list = cargo();
    list.current_dir(&ws.root)
        .arg("mutants")
        .arg("--list")
        .args(selection(shard));
    Ok(host::stdout_of(&mut list)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// Runs cargo-mutants for at most `minutes`, then writes and prints the
/// summary. `Ok(true)` only when every mutant was tested and none missed.
pub fn run(ws: &Workspace, options: MutantsOptions) -> Result<bool, XtaskError> {
    let MutantsOptions { minutes, shard } = options;
    ensure_installed()?;
    let total = count(ws, shard)?;
    let out_dir: PathBuf = ws.target_dir.join("mutants");
    fs::create_dir_all(&out_dir).map_err(|source| XtaskError::Io {
        context: format!("creating {}", out_dir.display()),
        source,
    })?;
    let slice = shard.map_or(String::new(), |(k, n)| format!(" (shard {k}/{n})"));
    eprintln!(
        "xtask: cargo-mutants: {total} mutants in pvmmu's core{slice}, budget {minutes} min, \
         output in {}",
        out_dir.display()
    );
    let mut mutants = cargo();
    mutants
        .current_dir(&ws.root)
        .env("PVMMU_PROPS_CASES", PROPS_CASES)
        .arg("mutants")
        .args(selection(shard))
        .args(["--no-shuffle", "--baseline", "run", "--timeout"])
        .arg(TEST_TIMEOUT_SECS.to_string())
        .arg("--output")
        .arg(&out_dir)
        // cargo test's arguments: the library's and the test files' tests
        // (the doctests are usage examples, and compiling them per mutant
        // would cost more than running every other test).
        .args(["--", "--lib", "--tests"]);
    let started = Instant::now();
    let (mut child, _registration) =
        children::spawn_group(&mut mutants).map_err(|source| XtaskError::Spawn {
            program: "cargo mutants".into(),
            source,
        })?;
    let budget = Duration::from_secs(minutes * 60);
    let finished = loop {
        match child.try_wait() {
            Ok(Some(_)) => break true,
            Ok(None) if started.elapsed() >= budget => {
                eprintln!("xtask: the {minutes} min budget is spent; stopping cargo-mutants");
                // SAFETY: kill(2) on the process group this xtask created
                // for the child; it is still registered, so not reaped and
                // its group id not reused.
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGTERM) };
                let _ = child.wait();
                break false;
            }
            Ok(None) => thread::sleep(Duration::from_secs(2)),
            Err(source) => {
                return Err(XtaskError::Io {
                    context: "waiting for cargo mutants".into(),
                    source,
                })
            }
        }
    };
    let outcomes = Outcomes::read(&out_dir.join("mutants.out"));
    let mut summary = outcomes.summary(total, started.elapsed().as_secs_f64() / 60.0, minutes);
    if let Some((k, n)) = shard {
        summary.insert_str(0, &format!("Shard {k}/{n} of the mutants.\n"));
    }
    let path = out_dir.join("summary.md");
    fs::write(&path, &summary).map_err(|source| XtaskError::Io {
        context: format!("writing {}", path.display()),
        source,
    })?;
    print!("{summary}");
    eprintln!("xtask: summary written to {}", path.display());
    Ok(finished && outcomes.tested() == total && outcomes.missed.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_come_from_the_lists_written() {
        let dir = std::env::temp_dir().join(format!("xtask-mutants-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("caught.txt"),
            "a.rs:1:1: replace f -> bool with true\n\n",
        )
        .unwrap();
        fs::write(
            dir.join("missed.txt"),
            "b.rs:2:3: delete !\nb.rs:4:5: replace + with -\n",
        )
        .unwrap();
        let o = Outcomes::read(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(o.caught.len(), 1);
        assert_eq!(
            o.missed,
            ["b.rs:2:3: delete !", "b.rs:4:5: replace + with -"]
        );
        assert!(o.timeout.is_empty() && o.unviable.is_empty());
        assert_eq!(o.tested(), 3);
        let s = o.summary(10, 12.4, 30);
        assert!(s.starts_with(
            "cargo-mutants over pvmmu's core: 3 of 10 mutants tested in 12 min (budget 30 min): \
             1 caught, 2 missed, 0 timeout, 0 unviable\n"
        ));
        assert!(s.contains("\nMissed:\n- `b.rs:2:3: delete !`\n"));
        assert!(!s.contains("Timeout:"));
    }
}
