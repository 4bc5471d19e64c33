//! The host machine: who we are, how much memory there is, running programs.
//!
//! Invariant: every external program the xtask runs goes through [`run`] or
//! [`program_exists`], so a failure always names the command line that failed.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::children;
use crate::error::XtaskError;
use crate::harness::display_command;

/// Whether the xtask runs as root (effective uid 0), read from /proc.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_uid(&status))
        == Some(0)
}

/// The effective uid from a `/proc/<pid>/status` text.
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `MemAvailable` in MiB, if /proc/meminfo can be read.
pub fn mem_available_mib() -> Option<u64> {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| parse_mem_available_mib(&meminfo))
}

/// Reads `MemAvailable` from a `/proc/meminfo` text, in MiB.
fn parse_mem_available_mib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib / 1024)
    })
}

/// 64-bit FNV-1a: a stable hash for stamps and names (not for security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether `program` can be started (it is run with `--version`).
pub fn program_exists(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// The command line of `command`, for messages (cargo by its short name, not
/// the toolchain path that `$CARGO` holds).
pub fn describe(command: &Command) -> String {
    let program = Path::new(command.get_program());
    let program = match program.file_name() {
        Some(name) if name == "cargo" => "cargo".to_string(),
        _ => program.to_string_lossy().into_owned(),
    };
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    display_command(&program, &args)
}

/// Runs `command` to completion; an unsuccessful exit is an error.
pub fn run(command: &mut Command) -> Result<(), XtaskError> {
    let program = command.get_program().to_string_lossy().into_owned();
    // Registered until reaped: a signal to the xtask ends this child too.
    let (mut child, _registration) =
        children::spawn(command).map_err(|source| XtaskError::Spawn {
            program: program.clone(),
            source,
        })?;
    let status = child
        .wait()
        .map_err(|source| XtaskError::Spawn { program, source })?;
    if status.success() {
        Ok(())
    } else {
        Err(XtaskError::CommandFailed {
            command: describe(command),
            status,
        })
    }
}

/// Runs `command` to completion and returns what it wrote on stdout (its
/// stderr is left as the caller set it); an unsuccessful exit is an error.
pub fn stdout_of(command: &mut Command) -> Result<String, XtaskError> {
    let output = command.output().map_err(|source| XtaskError::Spawn {
        program: command.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    if !output.status.success() {
        return Err(XtaskError::CommandFailed {
            command: describe(command),
            status: output.status,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `apt-get <args>` without questions.
pub fn apt_get(args: &[&str]) -> Command {
    let mut command = Command::new("apt-get");
    command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_shortens_cargo_only() {
        let mut cargo = Command::new("/root/.rustup/toolchains/stable/bin/cargo");
        cargo.args(["fmt", "--all", "--check"]);
        assert_eq!(describe(&cargo), "cargo fmt --all --check");
        let mut qemu = Command::new("/usr/bin/qemu-system-x86_64");
        qemu.args(["-append", "a b"]);
        assert_eq!(
            describe(&qemu),
            "/usr/bin/qemu-system-x86_64 -append \"a b\""
        );
    }

    #[test]
    fn effective_uid_is_the_second_uid_field() {
        assert_eq!(effective_uid("Name:\tx\nUid:\t1000\t0\t0\t0\n"), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn meminfo_parsing() {
        let meminfo =
            "MemTotal:       24684092 kB\nMemFree:        1000 kB\nMemAvailable:   24406268 kB\n";
        assert_eq!(parse_mem_available_mib(meminfo), Some(24406268 / 1024));
        assert_eq!(parse_mem_available_mib("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available_mib("MemAvailable: lots kB\n"), None);
    }
}
