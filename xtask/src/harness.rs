//! The boot harness: spawn QEMU, stream its console, watch for the verdict,
//! end the QEMU process it started.
//!
//! Invariant: the harness only ever signals the one child it spawned, and it
//! always reaps it before returning, whatever happened (result, crash,
//! timeout). The decision itself is made by [`Watcher`], which is pure: it is
//! fed console lines and the way the boot ended, and returns a [`Verdict`]. A
//! boot passes only if the console showed exactly one valid `PVMMU-REPORT`,
//! a single `PVMMU-RESULT PASS`, and no Xen crash line.

use std::fmt;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::children;
use crate::error::XtaskError;
use crate::report::{self, Report, ReportError, ResultLine};

/// Console text that means the Xen hypervisor or a domain crashed.
pub const XEN_CRASH_MARKERS: [&str; 7] = [
    "Panic on CPU",
    "FATAL TRAP",
    "Domain 0 crashed",
    "Dom0 crashed",
    "domain_crash",
    "crashed on cpu#",
    "Xen BUG at",
];

/// The start of a line where the kernel says it ignored or lost part of
/// what it was asked (a bad command-line option): a boot with one fails
/// unless it expects it.
pub const WARNING_MARKER: &str = "PVMMU-WARNING";

/// How long the console may keep talking after the result line (Xen prints
/// its shutdown lines; natively QEMU exits by itself through isa-debug-exit).
pub const RESULT_GRACE: Duration = Duration::from_millis(1500);

/// How long the harness waits for output still in the pipes once QEMU is
/// stopped.
const DRAIN_TIME: Duration = Duration::from_millis(500);

/// How long the console may keep talking after a crash line (the register
/// dump and call trace that follow it).
pub const CRASH_GRACE: Duration = Duration::from_secs(3);

/// Why a boot did not pass.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// The kernel printed `PVMMU-RESULT FAIL`.
    ResultFail {
        /// The report printed before it, if it was valid.
        report: Option<Report>,
    },
    /// A `PVMMU-RESULT` line that is neither PASS nor FAIL.
    GarbledResult(String),
    /// More than one `PVMMU-RESULT` line.
    DuplicateResult,
    /// No result line before the time limit.
    Timeout {
        /// The time limit.
        after: Duration,
        /// Whether a report line had been seen.
        saw_report: bool,
    },
    /// QEMU exited before the result line.
    QemuExited {
        /// How it exited.
        status: String,
        /// Its last line on stderr, if any.
        last_stderr: Option<String>,
        /// Whether a report line had been seen.
        saw_report: bool,
    },
    /// A Xen crash or panic line.
    XenCrash {
        /// The line.
        line: String,
        /// The lines after it that say why (Xen's panic message).
        reason: Vec<String>,
    },
    /// `PVMMU-RESULT PASS` without any `PVMMU-REPORT` line.
    MissingReport,
    /// More than one `PVMMU-REPORT` line.
    DuplicateReport,
    /// The report line is malformed.
    BadReport(ReportError),
    /// PASS although the report counts failed self-tests.
    PassWithFailedSelftests(u64),
    /// PASS, but the kernel printed `PVMMU-WARNING` lines (the first one,
    /// and how many in all).
    Warnings {
        /// The first warning's text.
        first: String,
        /// How many warning lines.
        count: usize,
    },
}

impl Failure {
    /// Whether this is the kernel's own, orderly `PVMMU-RESULT FAIL`.
    pub fn is_result_fail(&self) -> bool {
        matches!(self, Failure::ResultFail { .. })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let report_note = |saw: bool| {
            if saw {
                " (a PVMMU-REPORT line was seen)"
            } else {
                " (no PVMMU-REPORT line either)"
            }
        };
        match self {
            Failure::ResultFail { report } => {
                write!(f, "the kernel reported PVMMU-RESULT FAIL")?;
                if let Some(failed) = report.as_ref().and_then(|r| r.counter("selftests_failed")) {
                    write!(f, " ({failed} self-test(s) failed)")?;
                }
                Ok(())
            }
            Failure::GarbledResult(line) => write!(f, "garbled result line: {line}"),
            Failure::DuplicateResult => write!(f, "more than one PVMMU-RESULT line"),
            Failure::Timeout { after, saw_report } => write!(
                f,
                "timeout: no PVMMU-RESULT line after {} s{}",
                after.as_secs(),
                report_note(*saw_report)
            ),
            Failure::QemuExited {
                status,
                last_stderr,
                saw_report,
            } => {
                write!(
                    f,
                    "QEMU exited early ({status}) before any PVMMU-RESULT line{}",
                    report_note(*saw_report)
                )?;
                if let Some(line) = last_stderr {
                    write!(f, "; QEMU said: {line}")?;
                }
                Ok(())
            }
            Failure::XenCrash { line, reason } => {
                write!(f, "Xen crash: {}", line.trim())?;
                for why in reason {
                    write!(f, " {}", why.trim())?;
                }
                Ok(())
            }
            Failure::MissingReport => write!(f, "PVMMU-RESULT PASS but no PVMMU-REPORT line"),
            Failure::DuplicateReport => write!(f, "more than one PVMMU-REPORT line"),
            Failure::BadReport(error) => write!(f, "malformed PVMMU-REPORT line: {error}"),
            Failure::PassWithFailedSelftests(n) => write!(
                f,
                "PVMMU-RESULT PASS contradicts the report's selftests_failed = {n}"
            ),
            Failure::Warnings { first, count } => write!(
                f,
                "the kernel printed {count} {WARNING_MARKER} line(s), the first: {first}"
            ),
        }
    }
}

/// What a boot amounted to.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// `PVMMU-RESULT PASS` with a valid report.
    Pass(Report),
    /// Anything else.
    Fail(Failure),
}

impl Verdict {
    /// The report, if one valid report line was seen.
    pub fn report(&self) -> Option<&Report> {
        match self {
            Verdict::Pass(report) => Some(report),
            Verdict::Fail(Failure::ResultFail { report }) => report.as_ref(),
            Verdict::Fail(_) => None,
        }
    }
}

/// How the console stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The harness stopped QEMU after a result or crash line.
    Stopped,
    /// The time limit passed first.
    TimedOut(Duration),
    /// QEMU exited by itself.
    QemuExited {
        /// How it exited.
        status: String,
        /// Its last line on stderr, if any.
        last_stderr: Option<String>,
    },
}

/// What a console line means to the harness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing decisive.
    Continue,
    /// The result line: let trailing output through, then stop.
    Result,
    /// A crash line: collect the dump that follows, then stop.
    Crash,
    /// A `PVMMU-WARNING` line: the boot goes on, the verdict will fail.
    Warning,
}

/// Watches console lines and decides the verdict.
#[derive(Debug, Default)]
pub struct Watcher {
    reports: Vec<Result<Report, ReportError>>,
    results: Vec<(ResultLine, String)>,
    crash: Option<(String, Vec<String>)>,
    warnings: Vec<String>,
}

/// How many lines after a crash line are kept as its reason.
const CRASH_REASON_LINES: usize = 2;

/// A line after a crash line that says something: not Xen's row of stars,
/// not an empty `(XEN)` line.
fn crash_reason(line: &str) -> Option<&str> {
    let text = line.trim();
    let text = text.strip_prefix("(XEN)").unwrap_or(text).trim();
    (!text.is_empty() && !text.chars().all(|c| c == '*')).then_some(text)
}

impl Watcher {
    /// Feeds one console line (without its line ending).
    pub fn observe(&mut self, line: &str) -> Event {
        match &mut self.crash {
            None if XEN_CRASH_MARKERS.iter().any(|m| line.contains(m)) => {
                self.crash = Some((line.to_string(), Vec::new()));
                return Event::Crash;
            }
            Some((_, reason)) if reason.len() < CRASH_REASON_LINES => {
                if let Some(text) = crash_reason(line) {
                    reason.push(text.to_string());
                }
            }
            _ => {}
        }
        if let Some(json) = report::report_json(line) {
            self.reports.push(report::parse_report(json));
            return Event::Continue;
        }
        if let Some(result) = report::result_line(line) {
            self.results.push((result, line.trim().to_string()));
            return Event::Result;
        }
        if let Some(at) = line.find(WARNING_MARKER) {
            let text = line[at + WARNING_MARKER.len()..].trim();
            self.warnings.push(text.to_string());
            return Event::Warning;
        }
        Event::Continue
    }

    /// Whether a report line has been seen.
    pub fn saw_report(&self) -> bool {
        !self.reports.is_empty()
    }

    /// The verdict, given how the stream ended.
    pub fn verdict(mut self, end: End) -> Verdict {
        let saw_report = self.saw_report();
        if let Some((line, reason)) = self.crash {
            return Verdict::Fail(Failure::XenCrash { line, reason });
        }
        let mut results = self.results.into_iter();
        let Some((result, line)) = results.next() else {
            return Verdict::Fail(match end {
                End::TimedOut(after) => Failure::Timeout { after, saw_report },
                End::QemuExited {
                    status,
                    last_stderr,
                } => Failure::QemuExited {
                    status,
                    last_stderr,
                    saw_report,
                },
                // Stopped without a result or crash line cannot happen; call
                // it what it looks like from outside.
                End::Stopped => Failure::QemuExited {
                    status: "stopped".to_string(),
                    last_stderr: None,
                    saw_report,
                },
            });
        };
        if results.next().is_some() {
            return Verdict::Fail(Failure::DuplicateResult);
        }
        let mut reports = self.reports.into_iter();
        let report = reports.next();
        let duplicate_report = reports.next().is_some();
        match result {
            ResultLine::Garbled => Verdict::Fail(Failure::GarbledResult(line)),
            ResultLine::Fail => Verdict::Fail(Failure::ResultFail {
                report: report.and_then(Result::ok),
            }),
            ResultLine::Pass => match report {
                None => Verdict::Fail(Failure::MissingReport),
                Some(_) if duplicate_report => Verdict::Fail(Failure::DuplicateReport),
                Some(Err(error)) => Verdict::Fail(Failure::BadReport(error)),
                Some(Ok(report)) => match report.counter("selftests_failed") {
                    Some(failed) if failed > 0 => {
                        Verdict::Fail(Failure::PassWithFailedSelftests(failed))
                    }
                    _ if !self.warnings.is_empty() => Verdict::Fail(Failure::Warnings {
                        count: self.warnings.len(),
                        first: self.warnings.swap_remove(0),
                    }),
                    _ => Verdict::Pass(report),
                },
            },
        }
    }
}

/// Which console lines a boot echoes to the terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// Every line, as it arrives (`cargo xtask run`).
    All,
    /// Only report, result and crash lines, prefixed with the boot's label.
    Markers,
    /// Nothing: the caller shows what it needs from the transcript
    /// (`cargo xtask bench`, whose stdout carries only `BENCH` lines).
    Quiet,
}

/// One QEMU process to run under the harness.
#[derive(Clone, Debug)]
pub struct BootSpec {
    /// A short name for messages and the log file (`xen-512`).
    pub label: String,
    /// The QEMU binary.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// When to give up waiting for the result line.
    pub timeout: Duration,
    /// What to show on the terminal.
    pub echo: Echo,
    /// Where the whole transcript is written.
    pub log_path: PathBuf,
}

/// The result of a boot.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Pass or why not.
    pub verdict: Verdict,
    /// Every console line, in order (QEMU's own stderr lines prefixed `qemu: `).
    pub transcript: Vec<String>,
    /// From spawn to reaping QEMU.
    pub elapsed: Duration,
    /// Where the transcript was written.
    pub log_path: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    Console,
    Stderr,
}

enum Chunk {
    Line(Stream, String),
    Eof,
}

fn forward_lines(stream: Stream, pipe: impl Read, tx: mpsc::Sender<Chunk>) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                let line = text.trim_end_matches(['\n', '\r']).replace('\r', "");
                if tx.send(Chunk::Line(stream, line)).is_err() {
                    return;
                }
            }
        }
    }
    // The receiver may be gone already; nothing to do about it then.
    let _ = tx.send(Chunk::Eof);
}

/// The command line as one string, for messages.
pub fn display_command(program: &str, args: &[String]) -> String {
    let mut text = program.to_string();
    for arg in args {
        text.push(' ');
        if arg.is_empty() || arg.contains([' ', '"', '\'', ',']) {
            text.push('"');
            text.push_str(&arg.replace('"', "\\\""));
            text.push('"');
        } else {
            text.push_str(arg);
        }
    }
    text
}

/// Spawns QEMU, streams and watches its console until a verdict, ends it.
pub fn boot(spec: &BootSpec) -> Result<Outcome, XtaskError> {
    if let Some(dir) = spec.log_path.parent() {
        fs::create_dir_all(dir)
            .map_err(|e| XtaskError::io(format!("creating {}", dir.display()), e))?;
    }
    let log_file = File::create(&spec.log_path)
        .map_err(|e| XtaskError::io(format!("creating {}", spec.log_path.display()), e))?;
    let mut log = BufWriter::new(log_file);
    let command_line = display_command(&spec.program, &spec.args);
    // The log is a convenience: a failed write must not fail the boot.
    let _ = writeln!(log, "$ {command_line}");
    eprintln!("[{}] $ {command_line}", spec.label);

    let start = Instant::now();
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // QEMU leads its own process group: a signal to the xtask ends it and
    // anything it started (see `children`), kept until QEMU is reaped.
    let (mut child, _registration) =
        children::spawn_group(&mut command).map_err(|source| XtaskError::Spawn {
            program: spec.program.clone(),
            source,
        })?;
    let (tx, rx) = mpsc::channel();
    let mut open_streams = 0;
    if let Some(stdout) = child.stdout.take() {
        let tx = tx.clone();
        thread::spawn(move || forward_lines(Stream::Console, stdout, tx));
        open_streams += 1;
    }
    if let Some(stderr) = child.stderr.take() {
        let tx = tx.clone();
        thread::spawn(move || forward_lines(Stream::Stderr, stderr, tx));
        open_streams += 1;
    }
    drop(tx);

    let mut watcher = Watcher::default();
    let mut transcript = Vec::new();
    let mut last_stderr = None;
    let deadline = start + spec.timeout;
    // Once a result or crash line is seen: the moment to stop QEMU.
    let mut stop_at: Option<Instant> = None;
    let end = loop {
        let now = Instant::now();
        let wait_until = stop_at.unwrap_or(deadline);
        if now >= wait_until {
            break if stop_at.is_some() {
                End::Stopped
            } else {
                End::TimedOut(spec.timeout)
            };
        }
        match rx.recv_timeout(wait_until - now) {
            Ok(Chunk::Line(stream, line)) => {
                let _ = writeln!(log, "{line}");
                match stream {
                    Stream::Console => {
                        let event = watcher.observe(&line);
                        match spec.echo {
                            Echo::All => println!("{line}"),
                            Echo::Markers
                                if event != Event::Continue
                                    || report::report_json(&line).is_some() =>
                            {
                                println!("[{}] {}", spec.label, line.trim())
                            }
                            Echo::Markers | Echo::Quiet => {}
                        }
                        let grace = match event {
                            Event::Continue | Event::Warning => None,
                            Event::Result => Some(RESULT_GRACE),
                            Event::Crash => Some(CRASH_GRACE),
                        };
                        if let Some(grace) = grace {
                            let candidate = Instant::now() + grace;
                            stop_at = Some(stop_at.map_or(candidate, |at| at.min(candidate)));
                        }
                        transcript.push(line);
                    }
                    Stream::Stderr => {
                        eprintln!("[{}] qemu: {line}", spec.label);
                        if !line.trim().is_empty() {
                            last_stderr = Some(line.trim().to_string());
                        }
                        transcript.push(format!("qemu: {line}"));
                    }
                }
            }
            Ok(Chunk::Eof) => {
                open_streams -= 1;
                if open_streams == 0 {
                    break qemu_exited(&mut child, stop_at.is_some(), last_stderr.take());
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                break qemu_exited(&mut child, stop_at.is_some(), last_stderr.take());
            }
        }
    };
    stop(&mut child, &spec.label)?;
    // Lines that were still in the pipes when QEMU stopped. The readers are
    // not joined: a pipe inherited by some other process would block forever.
    let drain_until = Instant::now() + DRAIN_TIME;
    while open_streams > 0 {
        let now = Instant::now();
        if now >= drain_until {
            break;
        }
        match rx.recv_timeout(drain_until - now) {
            Ok(Chunk::Line(Stream::Console, line)) => {
                let _ = writeln!(log, "{line}");
                if spec.echo == Echo::All {
                    println!("{line}");
                }
                watcher.observe(&line);
                transcript.push(line);
            }
            Ok(Chunk::Line(Stream::Stderr, line)) => {
                let _ = writeln!(log, "{line}");
                transcript.push(format!("qemu: {line}"));
            }
            Ok(Chunk::Eof) => open_streams -= 1,
            Err(_) => break,
        }
    }
    let _ = log.flush();
    Ok(Outcome {
        verdict: watcher.verdict(end),
        transcript,
        elapsed: start.elapsed(),
        log_path: spec.log_path.clone(),
    })
}

/// QEMU closed its output: reap it and say how it ended.
fn qemu_exited(child: &mut Child, had_verdict_line: bool, last_stderr: Option<String>) -> End {
    if had_verdict_line {
        return End::Stopped;
    }
    let status = match child.wait() {
        Ok(status) => status.to_string(),
        Err(error) => format!("unknown status: {error}"),
    };
    End::QemuExited {
        status,
        last_stderr,
    }
}

/// Kills the child if it still runs, and reaps it.
fn stop(child: &mut Child, label: &str) -> Result<(), XtaskError> {
    let running = child
        .try_wait()
        .map_err(|e| XtaskError::io(format!("[{label}] checking QEMU (pid {})", child.id()), e))?
        .is_none();
    if running {
        child.kill().map_err(|e| {
            XtaskError::io(format!("[{label}] stopping QEMU (pid {})", child.id()), e)
        })?;
    }
    child
        .wait()
        .map_err(|e| XtaskError::io(format!("[{label}] reaping QEMU (pid {})", child.id()), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT_PASS: &str = r#"PVMMU-REPORT {"platform":"xen-pv","mem_mib":512,"pages_mapped":131072,"tables_created":260,"hypercalls":9,"mmu_update_entries":540,"map_cycles":1000,"selftests_passed":12,"selftests_failed":0}"#;
    const REPORT_FAILED: &str = r#"PVMMU-REPORT {"platform":"native","mem_mib":512,"pages_mapped":131072,"tables_created":7,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1000,"selftests_passed":11,"selftests_failed":1}"#;

    /// Feeds a transcript and returns the verdict and the events.
    fn judge(transcript: &str, end: End) -> (Verdict, Vec<Event>) {
        let mut watcher = Watcher::default();
        let events = transcript.lines().map(|l| watcher.observe(l)).collect();
        (watcher.verdict(end), events)
    }

    #[test]
    fn a_warning_line_fails_an_otherwise_passing_boot() {
        let warned = format!(
            "PVMMU-WARNING cmdline: unknown option `pvmmu.bogus` ignored\n{REPORT_PASS}\nPVMMU-RESULT PASS\n"
        );
        let (verdict, events) = judge(&warned, End::Stopped);
        assert_eq!(events[0], Event::Warning);
        assert_eq!(
            verdict,
            Verdict::Fail(Failure::Warnings {
                first: "cmdline: unknown option `pvmmu.bogus` ignored".into(),
                count: 1
            })
        );
        let (clean, _) = judge(&format!("{REPORT_PASS}\nPVMMU-RESULT PASS\n"), End::Stopped);
        assert!(matches!(clean, Verdict::Pass(_)), "{clean:?}");
    }

    fn xen_boot_log(kernel_lines: &[&str]) -> String {
        let mut log = String::from(
            " Xen 4.17.6-pre\n(XEN) Xen version 4.17.6-pre (Debian 4.17.5+72-g01f2e0dc0e-1)\n\
             (XEN) *** Building a PV Dom0 ***\n(XEN) Initial low memory virq threshold set at 0x4000 pages.\n\
             (XEN) Freed 644kB init memory\n",
        );
        for line in kernel_lines {
            log.push_str(line);
            log.push('\n');
        }
        log
    }

    #[test]
    fn pass_after_xen_boot_log() {
        let log = xen_boot_log(&[
            "pvmmu: selftest map_and_read ok",
            REPORT_PASS,
            "PVMMU-RESULT PASS",
            "(XEN) Hardware Dom0 halted: halting machine",
        ]);
        let (verdict, events) = judge(&log, End::Stopped);
        let Verdict::Pass(report) = verdict else {
            panic!("expected a pass, got {verdict:?}");
        };
        assert_eq!(report.platform, "xen-pv");
        assert_eq!(report.counter("hypercalls"), Some(9));
        assert_eq!(events.iter().filter(|e| **e == Event::Result).count(), 1);
    }

    #[test]
    fn pass_with_domu_prefix_and_carriage_returns() {
        let log = format!("(d1) {REPORT_PASS}\r\n(d1) PVMMU-RESULT PASS\r\n");
        let (verdict, _) = judge(&log, End::Stopped);
        assert!(matches!(verdict, Verdict::Pass(_)), "{verdict:?}");
    }

    #[test]
    fn result_fail_is_a_failure_with_its_report() {
        let log = format!("{REPORT_FAILED}\nPVMMU-RESULT FAIL\n");
        let (verdict, _) = judge(
            &log,
            End::QemuExited {
                status: "exit status: 35".into(),
                last_stderr: None,
            },
        );
        let Verdict::Fail(failure) = &verdict else {
            panic!("a FAIL line passed");
        };
        assert!(failure.is_result_fail());
        assert_eq!(
            verdict.report().and_then(|r| r.counter("selftests_failed")),
            Some(1)
        );
        assert!(failure.to_string().contains("1 self-test(s) failed"));
    }

    #[test]
    fn panic_without_report_still_fails_orderly() {
        let log = "panicked at guest-kernel/src/main.rs:10:5: boom\nPVMMU-RESULT FAIL\n";
        let (verdict, _) = judge(log, End::Stopped);
        assert_eq!(verdict, Verdict::Fail(Failure::ResultFail { report: None }));
    }

    #[test]
    fn xen_crash_lines_fail_even_after_pass() {
        for crash in [
            "(XEN) Panic on CPU 0:",
            "(XEN) FATAL TRAP: vector = 14 (page fault)",
            "(XEN) Domain 0 crashed: 'noreboot' set - not rebooting.",
            "(XEN) Hardware Dom0 crashed: 'noreboot' set - not rebooting.",
            "(XEN) domain_crash called from mm.c:1234",
            "(XEN) Domain 0 (vcpu#0) crashed on cpu#0:",
            "(XEN) Xen BUG at mm.c:2345",
        ] {
            let before = format!(
                "{}{crash}\n(XEN) ----[ Xen-4.17 x86_64 debug=n ]----\n",
                xen_boot_log(&[])
            );
            let (verdict, events) = judge(&before, End::Stopped);
            assert_eq!(
                verdict,
                Verdict::Fail(Failure::XenCrash {
                    line: crash.to_string(),
                    reason: vec!["----[ Xen-4.17 x86_64 debug=n ]----".to_string()],
                }),
                "{crash}"
            );
            assert!(events.contains(&Event::Crash));

            // A crash during the grace period after PASS still fails the boot.
            let after = xen_boot_log(&[REPORT_PASS, "PVMMU-RESULT PASS", crash]);
            let (verdict, _) = judge(&after, End::Stopped);
            assert!(
                matches!(verdict, Verdict::Fail(Failure::XenCrash { .. })),
                "{crash} after PASS gave {verdict:?}"
            );
        }
        // Xen's panic banner: the reason is the line after, the stars are not.
        let panic = "(XEN) ****************************************\n(XEN) Panic on CPU 0:\n\
                     (XEN) Could not construct domain 0\n(XEN) ****************************************\n\
                     (XEN) \n(XEN) Manual reset required ('noreboot' specified)\n";
        let (verdict, _) = judge(panic, End::Stopped);
        let Verdict::Fail(failure) = verdict else {
            panic!("a panic passed");
        };
        assert_eq!(
            failure.to_string(),
            "Xen crash: (XEN) Panic on CPU 0: Could not construct domain 0 Manual reset required ('noreboot' specified)"
        );
    }

    #[test]
    fn missing_result_line() {
        let log = xen_boot_log(&[REPORT_PASS]);
        let (verdict, _) = judge(&log, End::TimedOut(Duration::from_secs(60)));
        assert_eq!(
            verdict,
            Verdict::Fail(Failure::Timeout {
                after: Duration::from_secs(60),
                saw_report: true
            })
        );
        let (verdict, _) = judge(
            "SeaBIOS (version 1.16.2)\nBooting from ROM..\n",
            End::QemuExited {
                status: "exit status: 0".into(),
                last_stderr: Some("qemu-system-x86_64: triple fault".into()),
            },
        );
        let Verdict::Fail(failure) = verdict else {
            panic!("no result line passed");
        };
        let message = failure.to_string();
        assert!(
            message.contains("QEMU exited early (exit status: 0)"),
            "{message}"
        );
        assert!(message.contains("no PVMMU-REPORT line"), "{message}");
        assert!(message.contains("triple fault"), "{message}");
    }

    #[test]
    fn report_problems_fail_a_pass() {
        let (verdict, _) = judge("PVMMU-RESULT PASS\n", End::Stopped);
        assert_eq!(verdict, Verdict::Fail(Failure::MissingReport));

        let twice = format!("{REPORT_PASS}\n{REPORT_PASS}\nPVMMU-RESULT PASS\n");
        assert_eq!(
            judge(&twice, End::Stopped).0,
            Verdict::Fail(Failure::DuplicateReport)
        );

        let missing_key = REPORT_PASS.replace(r#""map_cycles":1000,"#, "");
        let log = format!("{missing_key}\nPVMMU-RESULT PASS\n");
        assert_eq!(
            judge(&log, End::Stopped).0,
            Verdict::Fail(Failure::BadReport(ReportError::MissingKey("map_cycles")))
        );

        let contradiction = format!("{REPORT_FAILED}\nPVMMU-RESULT PASS\n");
        assert_eq!(
            judge(&contradiction, End::Stopped).0,
            Verdict::Fail(Failure::PassWithFailedSelftests(1))
        );
    }

    #[test]
    fn result_line_oddities() {
        let log = format!("{REPORT_PASS}\nPVMMU-RESULT PASS\nPVMMU-RESULT PASS\n");
        assert_eq!(
            judge(&log, End::Stopped).0,
            Verdict::Fail(Failure::DuplicateResult)
        );
        let log = format!("{REPORT_PASS}\nPVMMU-RESULT PAS\n");
        assert!(matches!(
            judge(&log, End::Stopped).0,
            Verdict::Fail(Failure::GarbledResult(_))
        ));
    }

    #[test]
    fn command_display_quotes_what_a_shell_would_split() {
        let args = vec![
            "-append".to_string(),
            "a b".to_string(),
            "-initrd".to_string(),
            "/k pvmmu.x,,y".to_string(),
            "-m".to_string(),
            "512".to_string(),
        ];
        assert_eq!(
            display_command("qemu-system-x86_64", &args),
            r#"qemu-system-x86_64 -append "a b" -initrd "/k pvmmu.x,,y" -m 512"#
        );
    }

    /// Runs a shell script under the harness, as if it were QEMU.
    fn boot_script(name: &str, script: &str, timeout: Duration) -> Outcome {
        let spec = BootSpec {
            label: format!("script-{name}"),
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            timeout,
            echo: Echo::Markers,
            log_path: std::env::temp_dir()
                .join(format!("xtask-harness-{}", std::process::id()))
                .join(format!("{name}.log")),
        };
        boot(&spec).unwrap()
    }

    #[test]
    fn live_pass_then_hang_is_stopped_after_the_grace_period() {
        let script = format!("echo '(XEN) booting'; echo '{REPORT_PASS}'; echo 'PVMMU-RESULT PASS'; echo '(XEN) Hardware Dom0 halted: halting machine'; exec sleep 60");
        let outcome = boot_script("pass", &script, Duration::from_secs(30));
        assert!(
            matches!(outcome.verdict, Verdict::Pass(_)),
            "{:?}",
            outcome.verdict
        );
        assert!(
            outcome.elapsed >= RESULT_GRACE,
            "stopped before the grace period"
        );
        assert!(
            outcome.elapsed < Duration::from_secs(10),
            "took {:?}",
            outcome.elapsed
        );
        assert_eq!(
            outcome.transcript.last().map(String::as_str),
            Some("(XEN) Hardware Dom0 halted: halting machine")
        );
        let log = fs::read_to_string(&outcome.log_path).unwrap();
        assert!(log.contains("PVMMU-RESULT PASS"));
    }

    #[test]
    fn live_timeout_early_exit_crash_and_fail() {
        let outcome = boot_script(
            "timeout",
            "echo 'SeaBIOS'; exec sleep 60",
            Duration::from_secs(1),
        );
        assert_eq!(
            outcome.verdict,
            Verdict::Fail(Failure::Timeout {
                after: Duration::from_secs(1),
                saw_report: false
            })
        );
        assert!(
            outcome.elapsed < Duration::from_secs(5),
            "took {:?}",
            outcome.elapsed
        );

        let outcome = boot_script(
            "exit",
            "echo hello; echo 'no such file' >&2; exit 3",
            Duration::from_secs(30),
        );
        assert_eq!(
            outcome.verdict,
            Verdict::Fail(Failure::QemuExited {
                status: "exit status: 3".into(),
                last_stderr: Some("no such file".into()),
                saw_report: false
            })
        );

        let outcome = boot_script(
            "crash",
            "echo '(XEN) Panic on CPU 0:'; echo '(XEN) FATAL TRAP: vector = 6'; exec sleep 60",
            Duration::from_secs(30),
        );
        assert_eq!(
            outcome.verdict,
            Verdict::Fail(Failure::XenCrash {
                line: "(XEN) Panic on CPU 0:".into(),
                reason: vec!["FATAL TRAP: vector = 6".into()],
            })
        );
        assert!(
            outcome.elapsed < Duration::from_secs(10),
            "took {:?}",
            outcome.elapsed
        );

        // Natively QEMU exits by itself right after the result line.
        let script = format!("echo '{REPORT_FAILED}'; echo 'PVMMU-RESULT FAIL'; exit 35");
        let outcome = boot_script("fail", &script, Duration::from_secs(30));
        assert!(
            matches!(&outcome.verdict, Verdict::Fail(f) if f.is_result_fail()),
            "{:?}",
            outcome.verdict
        );
        assert!(
            outcome.elapsed < RESULT_GRACE,
            "waited for a QEMU that had exited"
        );
    }
}
