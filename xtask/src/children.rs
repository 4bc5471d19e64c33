//! The processes the xtask starts, and ending them when the xtask is told to
//! stop (Ctrl-C, `kill`, a closed terminal).
//!
//! Invariant: every child started through [`spawn`] or [`spawn_group`] is in
//! the live list from before it exists until it has been reaped (the list is
//! locked across the spawn, so a signal cannot fall between the two). SIGINT,
//! SIGTERM and SIGHUP are taken by one thread, which ends every live child
//! (a QEMU with its whole process group: whatever QEMU itself started) and
//! then exits with 128 + the signal's number. A process-group child also gets
//! `PR_SET_PDEATHSIG`: if the xtask dies by SIGKILL, the kernel ends it.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// One live child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Live {
    pid: libc::pid_t,
    /// Whether it leads its own process group (signalled as `-pid`).
    group: bool,
}

/// Children spawned and not yet reaped.
static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

/// How long the children get to leave after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// The signals that end the xtask.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn live() -> MutexGuard<'static, Vec<Live>> {
    // A panic while the list was held leaves it valid (pushes and removes
    // only), so a poisoned lock is still usable.
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes SIGINT, SIGTERM and SIGHUP away from every thread and gives them to
/// one thread that ends the children. Call first thing in `main`, before
/// any other thread exists (threads inherit the blocked mask; children do
/// not: std resets the mask in every child it starts).
pub fn install_signal_handling() {
    // SAFETY: `set` is a local sigset_t initialised by sigemptyset before
    // use; pthread_sigmask only reads it. No other thread exists yet, so the
    // mask is the one every later thread inherits.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in STOP_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    thread::spawn(move || loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset_t owned by this closure and
        // `signal` a valid out-pointer; sigwait only reads the one and
        // writes the other.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            stop_all_and_exit(signal);
        }
    });
}

/// Ends every live child and exits with 128 + `signal`.
fn stop_all_and_exit(signal: libc::c_int) -> ! {
    // Held to the end: no new child can be spawned after this point.
    let live = live();
    let name = match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    };
    for child in live.iter() {
        send(*child, libc::SIGTERM);
    }
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline && live.iter().any(|c| !gone(c.pid)) {
        thread::sleep(Duration::from_millis(20));
    }
    for child in live.iter() {
        // The group may hold processes whose leader already left.
        send(*child, libc::SIGKILL);
        while !gone(child.pid) {
            thread::sleep(Duration::from_millis(5));
        }
    }
    eprintln!(
        "\nxtask: stopped by {name}; ended {} child process(es) it had started",
        live.len()
    );
    std::process::exit(128 + signal);
}

/// Sends `signal` to a child (its whole group if it leads one).
fn send(child: Live, signal: libc::c_int) {
    let target = if child.group { -child.pid } else { child.pid };
    // SAFETY: kill has no memory effects; `target` is a child this process
    // started and has not reaped (or its group), so the pid is not reused.
    unsafe {
        libc::kill(target, signal);
    }
}

/// Whether a child has exited; reaps it if so (an ECHILD means another
/// thread already reaped it).
fn gone(pid: libc::pid_t) -> bool {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer; WNOHANG never blocks.
    let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    reaped == pid || reaped == -1
}

/// A registered child; dropping it (once the child is reaped) takes it off
/// the live list.
#[derive(Debug)]
pub struct Registration {
    pid: libc::pid_t,
}

impl Drop for Registration {
    fn drop(&mut self) {
        live().retain(|c| c.pid != self.pid);
    }
}

fn spawn_registered(command: &mut Command, group: bool) -> io::Result<(Child, Registration)> {
    let mut live = live();
    let child = command.spawn()?;
    let pid = child.id() as libc::pid_t;
    live.push(Live { pid, group });
    Ok((child, Registration { pid }))
}

/// Spawns `command`, ended with the xtask if it is stopped by a signal.
/// Keep the [`Registration`] until the child is reaped.
pub fn spawn(command: &mut Command) -> io::Result<(Child, Registration)> {
    spawn_registered(command, false)
}

/// Spawns `command` as the leader of a new process group, ended with all of
/// its group if the xtask is stopped by a signal, and by the kernel if the
/// spawning thread dies. Keep the [`Registration`] until it is reaped.
pub fn spawn_group(command: &mut Command) -> io::Result<(Child, Registration)> {
    command.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl and getppid, which are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody is left to
            // watch this child.
            if libc::getppid() == 1 {
                return Err(io::Error::other("the xtask exited while starting QEMU"));
            }
            Ok(())
        });
    }
    spawn_registered(command, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_live_until_its_registration_drops() {
        let (mut child, registration) = spawn_group(Command::new("true").arg("x")).unwrap();
        let pid = child.id() as libc::pid_t;
        assert!(live().contains(&Live { pid, group: true }));
        child.wait().unwrap();
        drop(registration);
        assert!(!live().iter().any(|c| c.pid == pid));
    }
}
