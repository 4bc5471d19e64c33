//! `--mode xl`: the guest kernel as a domU started by the Xen toolstack, PV
//! or (`--guest pvh`) PVH.
//!
//! Two ways, same verdict:
//! - **emulated** (any Linux host): QEMU -> Xen 4.17 -> a Debian Linux dom0
//!   booted from the initramfs of [`fixture`] -> xenstored,
//!   xen-init-dom0, xenconsoled -> `xl create` of the kernel. The dom0's
//!   `/init` copies the guest's console log (written by xenconsoled) to its
//!   own console, which Xen sends to the serial port QEMU gives the harness.
//! - **real** (the xtask runs inside a real Xen dom0: `/proc/xen/capabilities`
//!   says `control_d` and `xl` is on PATH): `xl create -c` of the kernel, its
//!   console read from `xl`'s standard output.
//!
//! Invariant: a run passes only if the harness's verdict is PASS *and* the
//! report says the guest type's platform (`"xen-pv"`, or `"xen-pvh"` for
//! `--guest pvh`) and `"xen_domain":"domU"`: a kernel that somehow ran as
//! dom0, or as another kind of guest than asked, fails here. A domain this module
//! created on a real dom0 is destroyed before [`run`] returns, whatever the
//! verdict.

pub mod bzimage;
pub mod cpio;
pub mod fixture;
pub mod guest;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cli::{Mode, RunOptions, XenVersion};
use crate::error::XtaskError;
use crate::harness::{self, BootSpec, Failure, Outcome, Verdict};
use crate::host;
use crate::qemu;
use crate::report::ReportError;
use crate::request::BootRequest;
use crate::workspace::Workspace;
use crate::xen;
use guest::Guest;

/// The domU's name in the emulated dom0 (one guest per boot).
const EMULATED_NAME: &str = "pvmmu";

/// Where the dom0 initramfs puts the guest kernel (see `fixture::guest_cpio`).
const EMULATED_KERNEL_PATH: &str = "/guest/kernel";

/// The dom0 kernel's command line: its console on hvc0 (Xen's console, so on
/// the serial port), quiet, and a panic ends the machine at once (with QEMU's
/// `-no-reboot`, Xen's reboot ends QEMU). `mitigations=off rodata=off` skip
/// work that only costs boot time in this throw-away dom0 (about 0.5 s of
/// the ~4 s it takes to reach /init under TCG).
const DOM0_CMDLINE: &str = "console=hvc0 quiet loglevel=3 panic=-1 mitigations=off rodata=off";

/// Boots `request.kernel` as a domU of the requested type started by `xl
/// create`.
pub fn run(ws: &Workspace, request: &BootRequest) -> Result<Outcome, XtaskError> {
    let outcome = if in_real_dom0() {
        run_real(ws, request)?
    } else {
        run_emulated(ws, request)?
    };
    Ok(require_domu(outcome, request.options.guest))
}

/// Whether the xtask runs inside a real Xen control domain with `xl`.
pub fn in_real_dom0() -> bool {
    let control_domain = fs::read_to_string("/proc/xen/capabilities")
        .map(|caps| caps.contains("control_d"))
        .unwrap_or(false);
    control_domain && xl_program().is_some()
}

/// `xl` on PATH, else Debian's `/usr/sbin/xl` (not on a normal user's PATH).
fn xl_program() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("xl"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/xl");
        sbin.is_file().then_some(sbin)
    })
}

/// The program and leading arguments that run `xl`: itself as root, else
/// through `sudo -n` (never prompting: a CI runner has no terminal).
fn xl_invocation(xl: &Path, root: bool) -> (String, Vec<String>) {
    let xl = xl.display().to_string();
    if root {
        (xl, Vec::new())
    } else {
        ("sudo".to_string(), vec!["-n".to_string(), xl])
    }
}

/// A `Command` running `xl args...` as [`xl_invocation`] says.
fn xl_command(xl: &Path, root: bool, args: &[&str]) -> Command {
    let (program, mut leading) = xl_invocation(xl, root);
    leading.extend(args.iter().map(|arg| arg.to_string()));
    let mut command = Command::new(program);
    command.args(leading);
    command
}

/// Turns a PASS whose report is not a domU of type `guest` into a failure.
fn require_domu(mut outcome: Outcome, guest: Guest) -> Outcome {
    if let Verdict::Pass(report) = &outcome.verdict {
        let field = |key: &str| report.fields.get(key).and_then(|v| v.as_str());
        let failure = if field("platform") != Some(guest.platform()) {
            Some(ReportError::WrongType {
                key: "platform",
                expected: match guest {
                    Guest::Pv => "\"xen-pv\" under --mode xl",
                    Guest::Pvh => "\"xen-pvh\" under --mode xl --guest pvh",
                },
            })
        } else if field("xen_domain").is_none() {
            Some(ReportError::MissingKey("xen_domain"))
        } else if field("xen_domain") != Some("domU") {
            Some(ReportError::WrongType {
                key: "xen_domain",
                expected: "\"domU\" under --mode xl",
            })
        } else {
            None
        };
        if let Some(error) = failure {
            outcome.verdict = Verdict::Fail(Failure::BadReport(error));
        }
    }
    outcome
}

/// An `xl` configuration string literal: quotes and backslashes escaped.
fn xl_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            '\n' | '\r' => quoted.push(' '),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// The `xl` domain configuration for the guest kernel at `kernel`.
pub fn guest_config(name: &str, kernel: &str, options: &RunOptions) -> String {
    let mut config = format!(
        "name = {}\n\
         type = \"{}\"\n\
         kernel = {}\n\
         memory = {mib}\n\
         maxmem = {mib}\n\
         vcpus = {}\n\
         on_poweroff = \"destroy\"\n\
         on_reboot = \"destroy\"\n\
         on_crash = \"destroy\"\n",
        xl_string(name),
        options.guest.xl_type(),
        xl_string(kernel),
        options.smp,
        mib = options.memory_mib,
    );
    let cmdline = options.kernel_cmdline();
    if !cmdline.is_empty() {
        config.push_str(&format!("extra = {}\n", xl_string(&cmdline)));
    }
    config
}

/// Xen's command line for the emulated chain: serial console, a fixed dom0
/// with one vCPU, and no `noreboot`, so that dom0's `poweroff -f` (or a
/// panic) ends QEMU through `-no-reboot`. `bootscrub=false`: QEMU's RAM is
/// zero already, and scrubbing it under TCG made `xl create` of a 512 MiB
/// guest take 5 s instead of 1.3 s here.
pub fn xen_cmdline() -> String {
    let dom0 = qemu::XL_DOM0_MIB;
    format!(
        "com1=115200,8n1,0x3f8,4 console=com1 dom0_mem={dom0}M,max:{dom0}M dom0_max_vcpus=1 \
         bootscrub=false loglvl=warning guest_loglvl=warning"
    )
}

/// QEMU's arguments for the emulated chain.
pub fn qemu_args(
    xen_elf: &Path,
    dom0_kernel: &Path,
    initrd: &Path,
    options: &RunOptions,
) -> Result<Vec<String>, XtaskError> {
    Ok(vec![
        // Plain `-cpu max` crashes a PV dom0 in Xen's bounce-frame code under
        // TCG; `qemu64` lacks RDRAND and `xl` then blocks in getrandom.
        "-cpu".into(),
        "max,-smap".into(),
        "-m".into(),
        qemu::machine_mib(Mode::Xl, options.memory_mib).to_string(),
        "-smp".into(),
        options.smp.to_string(),
        "-kernel".into(),
        xen_elf.display().to_string(),
        "-append".into(),
        xen_cmdline(),
        // Multiboot modules: the dom0 kernel first, then its initrd.
        "-initrd".into(),
        format!(
            "{},{}",
            qemu::multiboot_module(dom0_kernel, DOM0_CMDLINE)?,
            qemu::multiboot_module(initrd, "")?
        ),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
    ])
}

fn fixture_error(error: fixture::FixtureError) -> XtaskError {
    XtaskError::io(
        "building the xl fixture (Linux dom0 from Debian packages)",
        io::Error::other(error),
    )
}

/// The emulated chain: QEMU -> Xen -> Linux dom0 -> `xl create`.
fn run_emulated(ws: &Workspace, request: &BootRequest) -> Result<Outcome, XtaskError> {
    qemu::ensure_installed()?;
    // The dom0's toolstack is 4.17's: so must the hypervisor be.
    let xen_elf = xen::ensure_cached(ws, XenVersion::V4_17)?;
    let fixture = fixture::ensure(&ws.cache_dir().join("xl")).map_err(fixture_error)?;
    eprintln!(
        "[{}] xl fixture: dom0 Linux {} ({}), base initramfs {}",
        request.label,
        fixture.kernel_release,
        if fixture.built { "built now" } else { "cached" },
        fixture.base_cpio.display()
    );

    let kernel = fs::read(&request.kernel)
        .map_err(|e| XtaskError::io(format!("reading {}", request.kernel.display()), e))?;
    let config = guest_config(EMULATED_NAME, EMULATED_KERNEL_PATH, &request.options);
    // The dom0 gives up a little before the harness does, so a guest that
    // never ends still shows dom0's own account of it.
    let guest_timeout = request
        .options
        .timeout()
        .as_secs()
        .saturating_sub(30)
        .max(30);
    let guest = fixture::guest_cpio(&kernel, &config, guest_timeout)
        .map_err(|e| XtaskError::io("building the guest cpio", e))?;

    // The initrd of this run: the cached base, then the guest archive.
    let run_dir = ws.target_dir.join("xtask").join("xl");
    fs::create_dir_all(&run_dir)
        .map_err(|e| XtaskError::io(format!("creating {}", run_dir.display()), e))?;
    let initrd = run_dir.join(format!("{}-initrd.cpio", request.label));
    concatenate(&fixture.base_cpio, &guest, &initrd)?;

    let args = qemu_args(&xen_elf, &fixture.dom0_kernel, &initrd, &request.options)?;
    let outcome = harness::boot(&request.spec(ws, args))?;
    match shutdown_reason(&outcome.transcript) {
        Some("poweroff") => {}
        Some(reason) => eprintln!(
            "[{}] xtask: warning: xl saw the guest end with shutdown reason `{reason}`, not poweroff",
            request.label
        ),
        // The harness may stop QEMU before dom0 gets to say it.
        None => {}
    }
    Ok(outcome)
}

/// The shutdown reason xl logged for the guest, as the dom0's `/init`
/// reports it (`xl-dom0: [...] guest domain ... shutdown reason: poweroff; ...`).
pub fn shutdown_reason(transcript: &[String]) -> Option<&str> {
    transcript.iter().find_map(|line| {
        let rest = line.strip_prefix("xl-dom0:")?;
        let reason = rest.split("shutdown reason: ").nth(1)?;
        reason.split(';').next().map(str::trim)
    })
}

/// Writes `base` followed by `tail` to `out`.
fn concatenate(base: &Path, tail: &[u8], out: &Path) -> Result<(), XtaskError> {
    let context = || format!("writing {}", out.display());
    let partial = out.with_extension(format!("partial-{}", std::process::id()));
    fs::copy(base, &partial).map_err(|e| XtaskError::io(context(), e))?;
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(&partial)
        .map_err(|e| XtaskError::io(context(), e))?;
    io::Write::write_all(&mut file, tail).map_err(|e| XtaskError::io(context(), e))?;
    drop(file);
    fs::rename(&partial, out).map_err(|e| XtaskError::io(context(), e))
}

/// The real toolstack: `xl create -c` in the dom0 the xtask runs in.
fn run_real(ws: &Workspace, request: &BootRequest) -> Result<Outcome, XtaskError> {
    let xl = xl_program().ok_or(XtaskError::MissingTool {
        tool: "xl",
        install: "apt-get install xen-utils-4.17 (inside a Xen dom0)".to_string(),
    })?;
    run_with_xl(ws, request, &xl, host::is_root())
}

/// `xl create -c` with the given `xl` binary (as root, or through sudo).
fn run_with_xl(
    ws: &Workspace,
    request: &BootRequest,
    xl: &Path,
    root: bool,
) -> Result<Outcome, XtaskError> {
    let name = format!("pvmmu-{}-{}", request.label, std::process::id());
    let kernel = fs::canonicalize(&request.kernel)
        .map_err(|e| XtaskError::io(format!("resolving {}", request.kernel.display()), e))?;
    let run_dir = ws.target_dir.join("xtask").join("xl");
    fs::create_dir_all(&run_dir)
        .map_err(|e| XtaskError::io(format!("creating {}", run_dir.display()), e))?;
    let config_path = run_dir.join(format!("{name}.cfg"));
    let config = guest_config(&name, &kernel.display().to_string(), &request.options);
    fs::write(&config_path, config)
        .map_err(|e| XtaskError::io(format!("writing {}", config_path.display()), e))?;

    let (program, mut args) = xl_invocation(xl, root);
    args.extend([
        "create".to_string(),
        "-c".to_string(),
        config_path.display().to_string(),
    ]);
    let spec = BootSpec {
        program,
        args,
        ..request.spec(ws, Vec::new())
    };
    let outcome = harness::boot(&spec);
    // The harness ended the console client; the domain may still be there
    // (a timeout, or a guest still shutting down).
    destroy_if_present(xl, root, &name);
    outcome
}

/// `xl destroy name` if a domain of that name exists.
fn destroy_if_present(xl: &Path, root: bool, name: &str) {
    let exists = xl_command(xl, root, &["domid", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false);
    if exists {
        eprintln!("xtask: destroying leftover domain {name}");
        if let Err(error) = host::run(&mut xl_command(xl, root, &["destroy", name])) {
            eprintln!("xtask: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::parse_report;
    use std::time::Duration;

    fn options(memory_mib: u64, cmdline: &str, fail_selftest: bool) -> RunOptions {
        RunOptions {
            mode: Mode::Xl,
            memory_mib,
            cmdline: cmdline.into(),
            fail_selftest,
            ..RunOptions::default()
        }
    }

    #[test]
    fn config_names_kernel_memory_and_cmdline() {
        let config = guest_config("pvmmu", "/guest/kernel", &options(256, "a=\"b\"", true));
        assert!(config.contains("name = \"pvmmu\"\n"));
        assert!(config.contains("type = \"pv\"\n"));
        assert!(config.contains("kernel = \"/guest/kernel\"\n"));
        assert!(config.contains("memory = 256\nmaxmem = 256\n"));
        assert!(config.contains("vcpus = 1\n"));
        assert!(config.contains("on_poweroff = \"destroy\"\n"));
        assert!(config.contains("extra = \"a=\\\"b\\\" pvmmu.fail_selftest\"\n"));
        let plain = guest_config("g", "/k", &options(64, "", false));
        assert!(!plain.contains("extra"));
        let pvh = guest_config(
            "g",
            "/k",
            &RunOptions {
                guest: Guest::Pvh,
                ..options(512, "", false)
            },
        );
        assert!(pvh.contains("type = \"pvh\"\n"), "{pvh}");
        assert!(pvh.contains("kernel = \"/k\"\n"));
    }

    #[test]
    fn qemu_command_line_boots_xen_with_dom0_and_initrd() {
        let args = qemu_args(
            Path::new("/c/xen.elf"),
            Path::new("/c/xl/dom0-vmlinux"),
            Path::new("/t/xl-512-initrd.cpio"),
            &options(512, "", false),
        )
        .unwrap();
        let after = |flag: &str| {
            let at = args.iter().position(|a| a == flag).unwrap();
            args[at + 1].clone()
        };
        assert_eq!(after("-cpu"), "max,-smap");
        assert_eq!(after("-kernel"), "/c/xen.elf");
        assert_eq!(
            after("-initrd"),
            format!("/c/xl/dom0-vmlinux {DOM0_CMDLINE},/t/xl-512-initrd.cpio")
        );
        assert_eq!(
            after("-m").parse::<u64>().unwrap(),
            qemu::machine_mib(Mode::Xl, 512)
        );
        let xen = after("-append");
        assert!(xen.contains("com1=115200,8n1,0x3f8,4 console=com1"));
        assert!(xen.contains(&format!("dom0_mem={0}M,max:{0}M", qemu::XL_DOM0_MIB)));
        // Without noreboot, dom0's poweroff ends QEMU (-no-reboot).
        assert!(!xen.contains("noreboot"));
        assert!(args.contains(&"-no-reboot".to_string()));
    }

    fn outcome_with(json: &str) -> Outcome {
        Outcome {
            verdict: Verdict::Pass(parse_report(json).unwrap()),
            transcript: Vec::new(),
            elapsed: Duration::ZERO,
            log_path: PathBuf::new(),
        }
    }

    const COUNTERS: &str = "\"mem_mib\":1,\"pages_mapped\":1,\"tables_created\":1,\
        \"hypercalls\":1,\"mmu_update_entries\":1,\"map_cycles\":1,\
        \"selftests_passed\":1,\"selftests_failed\":0";

    #[test]
    fn pass_requires_a_pv_domu_report() {
        let domu = format!("{{\"platform\":\"xen-pv\",\"xen_domain\":\"domU\",{COUNTERS}}}");
        assert!(matches!(
            require_domu(outcome_with(&domu), Guest::Pv).verdict,
            Verdict::Pass(_)
        ));

        let dom0 = format!("{{\"platform\":\"xen-pv\",\"xen_domain\":\"dom0\",{COUNTERS}}}");
        assert_eq!(
            require_domu(outcome_with(&dom0), Guest::Pv).verdict,
            Verdict::Fail(Failure::BadReport(ReportError::WrongType {
                key: "xen_domain",
                expected: "\"domU\" under --mode xl",
            }))
        );
        let missing = format!("{{\"platform\":\"xen-pv\",{COUNTERS}}}");
        assert_eq!(
            require_domu(outcome_with(&missing), Guest::Pv).verdict,
            Verdict::Fail(Failure::BadReport(ReportError::MissingKey("xen_domain")))
        );
        let native = format!("{{\"platform\":\"native\",\"xen_domain\":\"domU\",{COUNTERS}}}");
        assert!(matches!(
            require_domu(outcome_with(&native), Guest::Pv).verdict,
            Verdict::Fail(Failure::BadReport(ReportError::WrongType {
                key: "platform",
                ..
            }))
        ));
    }

    /// The whole emulated chain with a PV kernel known to work as a domU:
    /// Debian's own Linux (the dom0 kernel). It has no root file system, so
    /// it panics after its boot log and the domain is destroyed; what this
    /// checks is that the guest's console reaches the harness through
    /// xenconsoled and dom0, and that dom0 then powers the machine off.
    /// Slow (a full boot, and the fixture on first use): run it with
    /// `cargo test -p xtask -- --ignored emulated_chain`.
    #[test]
    #[ignore]
    fn emulated_chain_streams_a_linux_domu_console() {
        let ws = Workspace::from_env();
        let fixture = fixture::ensure(&ws.cache_dir().join("xl")).unwrap();
        let request = BootRequest {
            kernel: fixture.dom0_kernel.clone(),
            options: RunOptions {
                mode: Mode::Xl,
                memory_mib: 256,
                cmdline: "console=hvc0 panic=-1".into(),
                timeout_secs: Some(300),
                ..RunOptions::default()
            },
            echo: crate::harness::Echo::All,
            label: "xl-chain-linux-domu".into(),
        };
        let outcome = run_emulated(&ws, &request).unwrap();
        let transcript = outcome.transcript.join("\n");
        let started = transcript
            .find("] guest pvmmu created; its console follows")
            .expect("dom0 started the guest");
        let banner = transcript[started..]
            .find("Linux version")
            .expect("the domU's console reached the harness");
        assert!(transcript[started + banner..].contains("] guest domain pvmmu is gone"));
        // Linux panics without a root file system, and as a Xen guest it
        // reports a panic to Xen as SHUTDOWN_crash, which xl logs.
        assert_eq!(shutdown_reason(&outcome.transcript), Some("crash"));
        // No result line: the harness calls that an early QEMU exit, which
        // shows that dom0's poweroff ended QEMU by itself.
        assert!(matches!(
            outcome.verdict,
            Verdict::Fail(Failure::QemuExited { .. })
        ));
    }

    /// The real-dom0 path against a stand-in `xl`: a script that logs its
    /// arguments, prints a guest console for `create -c`, claims the domain
    /// still exists for `domid`, and logs `destroy`.
    #[test]
    fn real_path_creates_reads_console_and_destroys_the_leftover() {
        real_path_with_stand_in_xl(Guest::Pv);
    }

    /// The same for `--guest pvh`: the configuration asks for a PVH domain
    /// and the guest's PVH report passes the domU check.
    #[test]
    fn real_path_creates_a_pvh_guest() {
        real_path_with_stand_in_xl(Guest::Pvh);
    }

    fn real_path_with_stand_in_xl(guest: Guest) {
        use std::os::unix::fs::PermissionsExt;

        let dir =
            std::env::temp_dir().join(format!("xl-real-{}-{}", guest.name(), std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let calls = dir.join("calls");
        let kernel = dir.join("guest-kernel");
        fs::write(&kernel, b"\x7fELF").unwrap();
        let report = format!(
            "{{\"platform\":\"{}\",\"xen_domain\":\"domU\",{COUNTERS}}}",
            guest.platform()
        );
        let xl = dir.join("xl");
        fs::write(
            &xl,
            format!(
                "#!/bin/sh\n\
                 echo \"$*\" >> {calls}\n\
                 case \"$1\" in\n\
                 create) cat \"$3\" >> {calls}; echo 'pvmmu guest kernel: Xen PV entry';\n\
                 echo 'PVMMU-REPORT {report}'; echo 'PVMMU-RESULT PASS' ;;\n\
                 esac\n",
                calls = calls.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&xl, fs::Permissions::from_mode(0o755)).unwrap();

        let ws = Workspace {
            root: dir.clone(),
            target_dir: dir.join("target"),
        };
        let request = BootRequest {
            kernel: kernel.clone(),
            options: RunOptions {
                guest,
                ..options(128, "pvmmu.x", false)
            },
            echo: crate::harness::Echo::Markers,
            label: "xl-128".into(),
        };
        let outcome = require_domu(run_with_xl(&ws, &request, &xl, true).unwrap(), guest);
        assert!(
            matches!(outcome.verdict, Verdict::Pass(_)),
            "{:?}",
            outcome.verdict
        );

        let calls = fs::read_to_string(&calls).unwrap();
        let name = format!("pvmmu-xl-128-{}", std::process::id());
        let lines: Vec<&str> = calls.lines().collect();
        assert!(lines[0].starts_with("create -c "), "{calls}");
        assert!(lines[0].ends_with(&format!("{name}.cfg")));
        assert!(calls.contains(&format!("kernel = \"{}\"", kernel.display())));
        assert!(calls.contains("memory = 128"));
        assert!(calls.contains(&format!("type = \"{}\"", guest.xl_type())));
        assert!(calls.contains("extra = \"pvmmu.x\""));
        assert!(calls.contains(&format!("domid {name}\ndestroy {name}\n")));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pvh_pass_requires_a_pvh_domu_report() {
        let pvh = format!("{{\"platform\":\"xen-pvh\",\"xen_domain\":\"domU\",{COUNTERS}}}");
        let pv = format!("{{\"platform\":\"xen-pv\",\"xen_domain\":\"domU\",{COUNTERS}}}");
        assert!(matches!(
            require_domu(outcome_with(&pvh), Guest::Pvh).verdict,
            Verdict::Pass(_)
        ));
        // Each guest type refuses the other's report.
        assert_eq!(
            require_domu(outcome_with(&pv), Guest::Pvh).verdict,
            Verdict::Fail(Failure::BadReport(ReportError::WrongType {
                key: "platform",
                expected: "\"xen-pvh\" under --mode xl --guest pvh",
            }))
        );
        assert!(matches!(
            require_domu(outcome_with(&pvh), Guest::Pv).verdict,
            Verdict::Fail(Failure::BadReport(ReportError::WrongType {
                key: "platform",
                ..
            }))
        ));
        let pvh_dom0 = format!("{{\"platform\":\"xen-pvh\",\"xen_domain\":\"dom0\",{COUNTERS}}}");
        assert!(matches!(
            require_domu(outcome_with(&pvh_dom0), Guest::Pvh).verdict,
            Verdict::Fail(Failure::BadReport(ReportError::WrongType {
                key: "xen_domain",
                ..
            }))
        ));
    }

    #[test]
    fn xl_runs_directly_as_root_and_through_sudo_otherwise() {
        let xl = Path::new("/usr/sbin/xl");
        assert_eq!(
            xl_invocation(xl, true),
            ("/usr/sbin/xl".to_string(), vec![])
        );
        assert_eq!(
            xl_invocation(xl, false),
            (
                "sudo".to_string(),
                vec!["-n".to_string(), "/usr/sbin/xl".to_string()]
            )
        );
    }

    #[test]
    fn shutdown_reason_comes_from_dom0_lines_only() {
        let lines = |text: &str| text.lines().map(str::to_string).collect::<Vec<_>>();
        let transcript = lines(
            "guest says shutdown reason: fake; x\n\
             xl-dom0: [9.1] guest domain pvmmu is gone after 1s, shutdown reason: poweroff; powering off",
        );
        assert_eq!(shutdown_reason(&transcript), Some("poweroff"));
        assert_eq!(shutdown_reason(&lines("xl-dom0: [1.0] toolstack up")), None);
    }

    #[test]
    fn xl_strings_are_escaped() {
        assert_eq!(xl_string("plain"), "\"plain\"");
        assert_eq!(xl_string("a\"b\\c\nd"), "\"a\\\"b\\\\c d\"");
    }
}
