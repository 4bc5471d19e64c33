//! `cargo xtask`: builds the pvmmu guest kernel, boots it natively, under Xen
//! and under `xl`, runs the host tests and the benchmarks.
//!
//! Invariant: arguments are parsed and validated (including against the
//! host's memory) before anything is built or booted; a usage error exits 2,
//! a failed command or boot exits 1, and only a passing command exits 0.

mod bench;
mod boot;
mod build;
mod children;
mod cli;
mod error;
mod harness;
mod host;
mod kernel_bench;
mod mutants;
mod negative;
mod oracle;
mod qemu;
mod report;
mod request;
mod selftests;
mod suite;
mod toolchain;
mod workspace;
mod xen;
mod xl;

use std::env;
use std::process::ExitCode;

use crate::cli::{Command, RunOptions, UsageError};
use crate::error::XtaskError;
use crate::harness::{Echo, Verdict};
use crate::request::BootRequest;
use crate::workspace::Workspace;

fn main() -> ExitCode {
    children::install_signal_handling();
    let command = match cli::parse_os(env::args_os().skip(1)) {
        Ok(command) => command,
        Err(error) => return usage_error(&error),
    };
    let ws = Workspace::from_env();
    let result = match command {
        Command::Help => {
            println!("{}", cli::USAGE);
            Ok(true)
        }
        Command::Build(profile) => build::kernel(&ws, profile).map(|elf| {
            println!("{}", elf.display());
            true
        }),
        Command::Run(options) => {
            if let Err(error) = boot::validate(&options, host::mem_available_mib()) {
                return usage_error(&error);
            }
            run(&ws, options)
        }
        Command::Test(options) | Command::Ci(options) => {
            let with_xl = matches!(command, Command::Ci(_));
            if let Err(error) = suite::validate(&suite::rows(with_xl), host::mem_available_mib()) {
                return usage_error(&error);
            }
            suite::run(&ws, options, with_xl)
        }
        Command::Bench => bench::run(&ws).map(|()| true),
        Command::Mutants(options) => mutants::run(&ws, options),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("xtask: error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(error: &UsageError) -> ExitCode {
    eprintln!("xtask: {error}\n\n{}", cli::USAGE);
    ExitCode::from(2)
}

/// `cargo xtask run`: build, boot once, say how it ended.
fn run(ws: &Workspace, options: RunOptions) -> Result<bool, XtaskError> {
    let kernel = build::kernel(ws, options.profile)?;
    let request = BootRequest {
        kernel,
        label: request::label(&options),
        options,
        echo: Echo::All,
    };
    let outcome = boot::boot(ws, &request)?;
    let guest = match request.options.guest {
        xl::guest::Guest::Pv => String::new(),
        other => format!(" --guest {}", other.name()),
    };
    let what = format!(
        "--mode {}{guest}, {} MiB, in {:.1} s",
        request.options.mode.name(),
        request.options.memory_mib,
        outcome.elapsed.as_secs_f64()
    );
    let domain = match request.options.mode {
        cli::Mode::Xl => oracle::Domain::DomU,
        _ => oracle::Domain::Dom0,
    };
    match &outcome.verdict {
        Verdict::Pass(report) => match oracle::check(ws, &outcome.transcript, domain)
            .and_then(|c| c.map_or(Ok(String::new()), |c| c.verdict().map(|()| c.figures())))
        {
            Ok(figures) => {
                eprintln!("xtask: PASS ({what}): {} {figures}", report.summary());
                Ok(true)
            }
            Err(why) => {
                eprintln!(
                    "xtask: FAIL ({what}): {why}\nxtask: console log: {}",
                    outcome.log_path.display()
                );
                Ok(false)
            }
        },
        Verdict::Fail(failure) => {
            eprintln!(
                "xtask: FAIL ({what}): {failure}\nxtask: console log: {}",
                outcome.log_path.display()
            );
            Ok(false)
        }
    }
}
