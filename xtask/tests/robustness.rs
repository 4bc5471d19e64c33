//! The xtask binary as a user meets it: a signal during a boot ends every
//! process it started; odd command lines are usage errors or work.
//!
//! The boot's QEMU is a stand-in script (`$XTASK_QEMU`) that starts a child
//! of its own, as QEMU does with helpers, and writes both pids; the kernel
//! build is a stand-in `$CARGO` and an empty kernel file. The xtask is then
//! sent SIGINT or SIGTERM: it must exit with 128 + the signal and leave
//! neither process behind.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const FAKE_QEMU: &str = r#"#!/bin/sh
[ "$1" = "--version" ] && exit 0
if [ -n "$XTASK_TEST_PASS" ]; then
    echo 'PVMMU-REPORT {"platform":"native","mem_mib":64,"pages_mapped":16384,"tables_created":8,"hypercalls":0,"mmu_update_entries":0,"map_cycles":1,"selftests_passed":1,"selftests_failed":0}'
    echo 'PVMMU-RESULT PASS'
    exit 33
fi
sleep 300 &
echo "$$ $!" > "$XTASK_TEST_PIDS.tmp" && mv "$XTASK_TEST_PIDS.tmp" "$XTASK_TEST_PIDS"
echo "fake QEMU up"
wait
"#;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xtask-interrupt-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let kernel_dir = dir.join("target/x86_64-unknown-none/release");
    fs::create_dir_all(&kernel_dir).unwrap();
    fs::write(kernel_dir.join("guest-kernel"), b"not a kernel").unwrap();
    let qemu = dir.join("fake-qemu");
    fs::write(&qemu, FAKE_QEMU).unwrap();
    fs::set_permissions(&qemu, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Whether `pid` is gone (no such process, or a zombie nobody reaped yet).
fn gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the xtask did not exit within {limit:?} of the signal");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `cargo xtask <args>` with the stand-in cargo, kernel and QEMU of `dir`.
fn xtask(dir: &Path, args: &[&std::ffi::OsStr]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
    command
        .args(args)
        .env("CARGO", "/bin/true")
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .env("XTASK_QEMU", dir.join("fake-qemu"))
        .env("XTASK_TEST_PIDS", dir.join("pids"))
        .stdin(Stdio::null());
    command
}

fn start_boot(dir: &Path) -> Child {
    let args = [
        "run",
        "--mode",
        "native",
        "--memory",
        "64",
        "--timeout",
        "120",
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    xtask(dir, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal_ends_everything(signal: i32, name: &str) {
    let dir = scratch(name);
    let mut xtask = start_boot(&dir);
    let pids_file = dir.join("pids");
    wait_for("the fake QEMU to start", Duration::from_secs(120), || {
        pids_file.is_file()
    });
    let pids: Vec<i32> = fs::read_to_string(&pids_file)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| !gone(p)), "children already gone");

    // SAFETY: kill has no memory effects; the pid is our own unreaped child.
    assert_eq!(unsafe { libc::kill(xtask.id() as i32, signal) }, 0);
    let status = wait_exit(&mut xtask, Duration::from_secs(15));
    let mut stderr = String::new();
    use std::io::Read;
    xtask
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();

    // The stand-ins' processes may take a moment to be reaped by init.
    let start = Instant::now();
    while !pids.iter().all(|&p| gone(p)) && start.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<i32> = pids.iter().copied().filter(|&p| !gone(p)).collect();
    for &pid in &left {
        // SAFETY: as above; cleaning up what the failed test left.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert!(
        left.is_empty(),
        "{name} left processes {left:?} running; stderr:\n{stderr}"
    );
    assert_eq!(
        status.code(),
        Some(128 + signal),
        "{status}; stderr:\n{stderr}"
    );
    assert!(stderr.contains(&format!("stopped by {name}")), "{stderr}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sigterm_ends_qemu_and_its_children() {
    signal_ends_everything(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_ends_qemu_and_its_children() {
    signal_ends_everything(libc::SIGINT, "SIGINT");
}

#[test]
fn a_non_utf8_argument_exits_2() {
    use std::os::unix::ffi::OsStrExt;
    let dir = scratch("utf8");
    let bad = std::ffi::OsStr::from_bytes(b"--cmdline=\xff");
    let output = xtask(&dir, &["run".as_ref(), bad]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not valid UTF-8"), "{stderr}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_long_command_line_boots_and_a_too_long_one_exits_2() {
    let dir = scratch("long");
    // 600 bytes of options: longer than a file name may be, shorter than
    // what the kernel takes.
    let long = "pvmmu.some_option=some_value ".repeat(20);
    let arg = format!("--cmdline={long}");
    let output = xtask(
        &dir,
        &["run".as_ref(), "--mode=native".as_ref(), arg.as_ref()],
    )
    .env("XTASK_TEST_PASS", "1")
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let logs: Vec<_> = fs::read_dir(dir.join("target/xtask/logs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].len() < 80 && logs[0].starts_with("native-512-some_option"),
        "{logs:?}"
    );

    let too_long = format!("--cmdline={}", "x".repeat(1024));
    let output = xtask(&dir, &["run".as_ref(), too_long.as_ref()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("1024 bytes long"), "{stderr}");
    fs::remove_dir_all(dir).unwrap();
}
