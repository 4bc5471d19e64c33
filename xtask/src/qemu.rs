//! QEMU: making sure it is installed, its command lines for each mode, and
//! how much memory each mode needs.
//!
//! Invariant: the command lines are built by pure functions from the run's
//! options and the paths of the images, so they are unit-tested exactly as
//! they are run; memory sizes are computed in one place, and argument
//! validation uses the same numbers as the boot.

use std::path::Path;

use crate::cli::{Mode, RunOptions, UsageError};
use crate::error::XtaskError;
use crate::host;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// The environment variable that names another QEMU binary (a build of
/// one's own, or a stand-in in the xtask's tests).
pub const QEMU_ENV: &str = "XTASK_QEMU";

/// The QEMU program the boots run: `$XTASK_QEMU`, else [`QEMU`] on PATH.
pub fn program() -> String {
    std::env::var(QEMU_ENV).unwrap_or_else(|_| QEMU.to_string())
}

/// The Debian package that provides it.
pub const QEMU_PACKAGE: &str = "qemu-system-x86";

/// QEMU's own memory beyond guest RAM (TCG translation cache, devices), MiB.
pub const QEMU_PROCESS_MIB: u64 = 256;

/// Memory the Linux dom0 of `--mode xl` gets, in MiB.
pub const XL_DOM0_MIB: u64 = 512;

/// The I/O port of QEMU's isa-debug-exit device, where the kernel writes its
/// result natively (0x10 pass, 0x11 fail; QEMU exits with `(v << 1) | 1`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// RAM QEMU must give Xen on top of dom0's memory: Xen's image, heap, frame
/// table and M2P (about 1% of RAM), and the boot modules that are still in
/// memory while dom0 is built.
pub fn xen_overhead_mib(guest_mib: u64) -> u64 {
    192 + guest_mib / 16
}

/// The `-m` QEMU is given for a guest of `guest_mib` in `mode`.
pub fn machine_mib(mode: Mode, guest_mib: u64) -> u64 {
    match mode {
        Mode::Native => guest_mib,
        Mode::Xen => guest_mib.saturating_add(xen_overhead_mib(guest_mib)),
        Mode::Xl => guest_mib
            .saturating_add(XL_DOM0_MIB)
            .saturating_add(xen_overhead_mib(guest_mib + XL_DOM0_MIB)),
    }
}

/// Host memory a boot needs in all: QEMU's RAM plus QEMU itself.
pub fn host_mib_needed(mode: Mode, guest_mib: u64) -> u64 {
    machine_mib(mode, guest_mib).saturating_add(QEMU_PROCESS_MIB)
}

/// Refuses a run that would need more host memory than `available_mib`
/// (the host's `MemAvailable`; `None`, unreadable, skips the check rather
/// than guessing).
pub fn check_host_memory(
    options: &RunOptions,
    available_mib: Option<u64>,
) -> Result<(), UsageError> {
    let Some(available_mib) = available_mib else {
        return Ok(());
    };
    let needed_mib = host_mib_needed(options.mode, options.memory_mib);
    if needed_mib > available_mib {
        return Err(UsageError::MemoryTooLarge {
            mib: options.memory_mib,
            mode: options.mode,
            needed_mib,
            available_mib,
        });
    }
    Ok(())
}

/// `qemu-system-x86_64` arguments for a native (PVH) boot of `kernel`.
pub fn native_args(kernel: &Path, options: &RunOptions) -> Vec<String> {
    vec![
        "-machine".into(),
        "q35".into(),
        "-cpu".into(),
        "max".into(),
        "-m".into(),
        machine_mib(Mode::Native, options.memory_mib).to_string(),
        "-smp".into(),
        options.smp.to_string(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-append".into(),
        options.kernel_cmdline(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
        "-device".into(),
        format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04"),
    ]
}

/// Xen's own command line for a dom0 of `guest_mib`.
pub fn xen_cmdline(guest_mib: u64) -> String {
    format!(
        "com1=115200,8n1,0x3f8,4 console=com1 dom0_mem={guest_mib}M,max:{guest_mib}M \
         noreboot loglvl=all guest_loglvl=all"
    )
}

/// One multiboot module for QEMU's `-initrd`: `path cmdline`, with commas
/// doubled because QEMU separates modules with commas.
pub fn multiboot_module(path: &Path, cmdline: &str) -> Result<String, XtaskError> {
    let path = path.display().to_string();
    if path.contains(char::is_whitespace) {
        return Err(XtaskError::UnsupportedPath {
            path: path.into(),
            reason: "QEMU's multiboot loader ends a module's file name at the first space",
        });
    }
    let mut module = path.replace(',', ",,");
    if !cmdline.is_empty() {
        module.push(' ');
        module.push_str(&cmdline.replace(',', ",,"));
    }
    Ok(module)
}

/// `qemu-system-x86_64` arguments for Xen (`xen_elf`) with `kernel` as dom0.
pub fn xen_args(
    xen_elf: &Path,
    kernel: &Path,
    options: &RunOptions,
) -> Result<Vec<String>, XtaskError> {
    Ok(vec![
        // Plain `-cpu max` crashes a PV dom0 in Xen's bounce-frame code under TCG.
        "-cpu".into(),
        "max,-smap".into(),
        "-m".into(),
        machine_mib(Mode::Xen, options.memory_mib).to_string(),
        "-smp".into(),
        options.smp.to_string(),
        "-kernel".into(),
        xen_elf.display().to_string(),
        "-append".into(),
        xen_cmdline(options.memory_mib),
        "-initrd".into(),
        multiboot_module(kernel, &options.kernel_cmdline())?,
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-no-reboot".into(),
    ])
}

/// Makes sure QEMU is installed: installs it with apt-get as root, else says
/// how.
pub fn ensure_installed() -> Result<(), XtaskError> {
    if host::program_exists(&program()) {
        return Ok(());
    }
    if !host::is_root() {
        return Err(XtaskError::MissingTool {
            tool: QEMU,
            install: format!("sudo apt-get update && sudo apt-get install -y {QEMU_PACKAGE}"),
        });
    }
    eprintln!("xtask: {QEMU} is missing; installing {QEMU_PACKAGE} with apt-get");
    if host::run(&mut host::apt_get(&["install", "-y", QEMU_PACKAGE])).is_err() {
        host::run(&mut host::apt_get(&["update"]))?;
        host::run(&mut host::apt_get(&["install", "-y", QEMU_PACKAGE]))?;
    }
    if host::program_exists(QEMU) {
        Ok(())
    } else {
        Err(XtaskError::MissingTool {
            tool: QEMU,
            install: format!("apt-get install -y {QEMU_PACKAGE}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(mode: Mode, memory_mib: u64, cmdline: &str, fail_selftest: bool) -> RunOptions {
        RunOptions {
            mode,
            memory_mib,
            cmdline: cmdline.into(),
            fail_selftest,
            ..RunOptions::default()
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> &'a str {
        let at = args.iter().position(|a| a == flag).unwrap();
        &args[at + 1]
    }

    #[test]
    fn native_command_line() {
        let args = native_args(
            Path::new("/t/guest-kernel"),
            &options(Mode::Native, 3072, "", true),
        );
        assert_eq!(
            args.join(" "),
            "-machine q35 -cpu max -m 3072 -smp 1 -kernel /t/guest-kernel -append pvmmu.fail_selftest \
             -display none -serial stdio -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04"
        );
    }

    #[test]
    fn xen_command_line() {
        let args = xen_args(
            Path::new("/c/xen.elf"),
            Path::new("/t/guest-kernel"),
            &options(Mode::Xen, 1024, "a=1,2", true),
        )
        .unwrap();
        assert_eq!(value_after(&args, "-cpu"), "max,-smap");
        assert_eq!(value_after(&args, "-m"), (1024 + 192 + 64).to_string());
        assert_eq!(value_after(&args, "-kernel"), "/c/xen.elf");
        assert_eq!(
            value_after(&args, "-append"),
            "com1=115200,8n1,0x3f8,4 console=com1 dom0_mem=1024M,max:1024M noreboot loglvl=all guest_loglvl=all"
        );
        assert_eq!(
            value_after(&args, "-initrd"),
            "/t/guest-kernel a=1,,2 pvmmu.fail_selftest"
        );
        assert!(args.contains(&"-no-reboot".to_string()));
        assert!(!args.iter().any(|a| a.contains("isa-debug-exit")));
    }

    #[test]
    fn module_without_cmdline_and_with_bad_paths() {
        assert_eq!(multiboot_module(Path::new("/t/k"), "").unwrap(), "/t/k");
        assert_eq!(
            multiboot_module(Path::new("/t,u/k"), "x").unwrap(),
            "/t,,u/k x"
        );
        assert!(matches!(
            multiboot_module(Path::new("/my dir/k"), ""),
            Err(XtaskError::UnsupportedPath { .. })
        ));
    }

    #[test]
    fn memory_overheads() {
        assert_eq!(machine_mib(Mode::Native, 512), 512);
        assert_eq!(machine_mib(Mode::Xen, 512), 512 + 192 + 32);
        assert!(machine_mib(Mode::Xl, 512) > machine_mib(Mode::Xen, 512) + XL_DOM0_MIB - 1);
        assert_eq!(host_mib_needed(Mode::Native, 512), 512 + QEMU_PROCESS_MIB);
        assert_eq!(host_mib_needed(Mode::Xen, u64::MAX), u64::MAX);
    }

    #[test]
    fn memory_too_large_counts_the_hypervisor_and_qemu() {
        let native = RunOptions {
            mode: Mode::Native,
            memory_mib: 4096,
            ..RunOptions::default()
        };
        let needed_native = host_mib_needed(Mode::Native, 4096);
        assert!(needed_native > 4096);
        assert_eq!(check_host_memory(&native, Some(needed_native)), Ok(()));
        assert_eq!(
            check_host_memory(&native, Some(needed_native - 1)),
            Err(UsageError::MemoryTooLarge {
                mib: 4096,
                mode: Mode::Native,
                needed_mib: needed_native,
                available_mib: needed_native - 1
            })
        );
        // Xen needs more than native for the same guest: a size that fits
        // natively can be refused under Xen.
        let xen = RunOptions {
            mode: Mode::Xen,
            ..native.clone()
        };
        assert!(matches!(
            check_host_memory(&xen, Some(needed_native)),
            Err(UsageError::MemoryTooLarge { .. })
        ));
        let huge = RunOptions {
            memory_mib: 1 << 40,
            ..native
        };
        assert!(check_host_memory(&huge, Some(24_000)).is_err());
    }
}
