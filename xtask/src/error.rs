//! The xtask's error type.
//!
//! Invariant: every failure the xtask can meet before or around a boot is one
//! variant here, and its `Display` says what to do about it in one sentence, so
//! `main` only has to print it. A boot that ran but did not pass is not an
//! error: it is a [`crate::harness::Verdict`].

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Why an xtask command could not do its work.
#[derive(Debug)]
pub enum XtaskError {
    /// An I/O operation failed; `context` says which one.
    Io {
        /// What the xtask was doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A program could not be started at all (not installed, not executable).
    Spawn {
        /// The program's name.
        program: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A program ran and exited unsuccessfully.
    CommandFailed {
        /// The command line, for the user to re-run it by hand.
        command: String,
        /// How it exited.
        status: ExitStatus,
    },
    /// A system tool is missing and the xtask may not install it (not root).
    MissingTool {
        /// The tool that is missing.
        tool: &'static str,
        /// The exact command that installs it.
        install: String,
    },
    /// A piece of the Rust toolchain is missing and rustup, which would add
    /// it, is not installed (or did not add it).
    MissingRust {
        /// What is missing (`the Rust target x86_64-unknown-none`).
        what: String,
        /// The rustup command(s) that add it.
        install: String,
    },
    /// The Xen hypervisor package could not be fetched into the cache.
    XenFetch {
        /// What went wrong, and what to run by hand.
        reason: String,
    },
    /// A file the build should have produced is absent.
    MissingArtifact {
        /// Where it was expected.
        path: PathBuf,
    },
    /// A path the boot cannot use as it is.
    UnsupportedPath {
        /// The path.
        path: PathBuf,
        /// Why not.
        reason: &'static str,
    },
    /// `cargo xtask bench` found no benchmark output to collect.
    NoBenchmarks,
    /// A bench boot of the kernel could not be run, did not pass, or
    /// printed no figure.
    BenchBoot {
        /// The boot's label.
        label: String,
        /// What went wrong.
        reason: String,
        /// Its console log, if it ran.
        log: Option<PathBuf>,
    },
}

impl XtaskError {
    /// Wraps an I/O error with what the xtask was doing at the time.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        XtaskError::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for XtaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XtaskError::Io { context, source } => write!(f, "{context}: {source}"),
            XtaskError::Spawn { program, source } => {
                write!(f, "could not start `{program}`: {source}")
            }
            XtaskError::CommandFailed { command, status } => {
                write!(f, "`{command}` failed ({status})")
            }
            XtaskError::MissingTool { tool, install } => write!(
                f,
                "`{tool}` is not installed and the xtask is not running as root; install it with:\n    {install}"
            ),
            XtaskError::MissingRust { what, install } => write!(
                f,
                "the Rust toolchain lacks {what} and rustup could not add it (is rustup installed? \
                 see https://rustup.rs); with rustup, run:\n    {install}"
            ),
            XtaskError::XenFetch { reason } => {
                write!(f, "could not fetch the Xen hypervisor: {reason}")
            }
            XtaskError::MissingArtifact { path } => {
                write!(f, "the build did not produce {}", path.display())
            }
            XtaskError::UnsupportedPath { path, reason } => {
                write!(f, "cannot use {}: {reason}", path.display())
            }
            XtaskError::NoBenchmarks => write!(
                f,
                "no benchmarks: no bench target printed a `BENCH <name> <value> <unit>` line"
            ),
            XtaskError::BenchBoot { label, reason, log } => {
                write!(f, "bench boot {label}: {reason}")?;
                match log {
                    Some(log) => write!(f, " (console log: {})", log.display()),
                    None => Ok(()),
                }
            }
        }
    }
}

impl std::error::Error for XtaskError {}
