//! The `--mode xl` fixture: Xen, a Linux dom0 kernel and the dom0's base
//! initramfs, built from Debian packages into `<workspace>/.cache/xl/`.
//!
//! (Xen itself comes from `crate::xen`'s cache, shared with `--mode xen`.)
//!
//! Nothing is installed on the host and nothing from the packages is
//! committed: the packages are fetched with `apt-get download` and unpacked
//! with `dpkg-deb -x` into a scratch directory, from which the xtask takes
//! - the dom0 kernel as an uncompressed ELF `vmlinux` taken out of Debian's
//!   bzImage (Xen would otherwise spend seconds unpacking xz under TCG),
//! - a `newc` cpio with busybox, the Xen 4.17 toolstack and the libraries it
//!   loads, the five Xen kernel modules, and the dom0 `/init` script.
//!
//! Invariant: the cache is either complete for one exact set of inputs or it
//! is rebuilt. The stamp file names every input (each package file and its
//! checksum, as apt resolves them now, the init script's hash and this
//! module's format number) and is written last, after every output is in
//! place; a run whose stamp matches reuses the outputs as they are. The guest
//! kernel is not an input: it travels in a second cpio
//! ([`guest_cpio`]) concatenated after the base, so a kernel rebuild never
//! rebuilds the base.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::bzimage::{self, BzImageError};
use super::cpio::CpioWriter;
use crate::host::{self, fnv1a};

/// Debian's metapackage whose dependency names the current 6.1 kernel.
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// Prefix of the kernel package the metapackage must resolve to.
const KERNEL_PACKAGE_PREFIX: &str = "linux-image-6.1.0-";

/// Packages unpacked into the dom0's root file system. This list was measured:
/// with it xenstored, xen-init-dom0, xenconsoled and xl all run; `libgcc-s1` is
/// needed for pthread_cancel, without it `xl` aborts when it exits.
pub const DOM0_PACKAGES: &[&str] = &[
    "busybox-static",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "libxenmisc4.17",
    "libxenstore4",
    "libxengnttab1",
    "libxenforeignmemory1",
    "libxencall1",
    "libxenevtchn1",
    "libxenhypfs1",
    "libxendevicemodel1",
    "libxentoolcore1",
    "libxentoollog1",
    "libyajl2",
    "libext2fs2",
    "liblzma5",
    "libuuid1",
    "libzstd1",
    "zlib1g",
    "libncurses6",
    "libtinfo6",
    "libc6",
    "libgcc-s1",
];

/// The Xen kernel modules dom0 loads, in load order (xenfs needs privcmd).
pub const XEN_MODULES: &[&str] = &[
    "xen-privcmd",
    "xenfs",
    "xen-evtchn",
    "xen-gntdev",
    "xen-gntalloc",
];

/// Paths of the unpacked packages that the dom0 never uses; left out of the
/// initramfs to keep it small (it is unpacked into dom0's RAM on every boot).
const EXCLUDED_PREFIXES: &[&str] = &[
    "boot",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/bash-completion",
    "usr/include",
    "usr/lib/python3",
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/xen-4.17/boot",
    "etc/init.d",
];

/// The dom0 init script (see the script's own header).
const DOM0_INIT: &str = include_str!("dom0-init.sh");

/// Bumped whenever the layout of the cached outputs changes.
const FORMAT: u32 = 1;

/// Inode numbers of the guest cpio start here, far above the base's.
const GUEST_FIRST_INO: u32 = 0x4000_0000;

/// The cached outputs of one fixture build.
#[derive(Clone, Debug)]
pub struct Fixture {
    /// The dom0 kernel as an ELF vmlinux (first multiboot module).
    pub dom0_kernel: PathBuf,
    /// The dom0 base initramfs (a newc cpio).
    pub base_cpio: PathBuf,
    /// The dom0 kernel's release, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// Whether this call built the outputs (false: the cache was reused).
    pub built: bool,
}

/// Why the fixture could not be built.
#[derive(Debug)]
pub enum FixtureError {
    /// A file operation failed.
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
    /// A host tool (apt-get, apt-cache, dpkg-deb) could not be started.
    Spawn {
        /// The program.
        program: String,
        /// The error.
        source: io::Error,
    },
    /// A host tool ran and failed.
    Command {
        /// The command line, to re-run by hand.
        command: String,
        /// Its standard error (or output), trimmed.
        output: String,
    },
    /// apt knows no `linux-image-6.1.0-*-amd64` package.
    NoKernelPackage {
        /// What apt-cache said the metapackage depends on.
        found: String,
    },
    /// A package did not contain a file the fixture needs.
    MissingFile {
        /// The file, relative to the unpacked package.
        path: String,
    },
    /// The dom0 kernel image could not be unpacked.
    BzImage(BzImageError),
}

impl fmt::Display for FixtureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FixtureError::Io { context, source } => write!(f, "{context}: {source}"),
            FixtureError::Spawn { program, source } => write!(
                f,
                "could not start `{program}` ({source}): the xl fixture is built from Debian \
                 packages and needs apt-get and dpkg-deb"
            ),
            FixtureError::Command { command, output } => {
                write!(f, "`{command}` failed: {output}")
            }
            FixtureError::NoKernelPackage { found } => write!(
                f,
                "apt resolves `{KERNEL_METAPACKAGE}` to `{found}`, not a \
                 `{KERNEL_PACKAGE_PREFIX}*-amd64` package: the xl fixture needs Debian 12's \
                 package lists (run `apt-get update` as root)"
            ),
            FixtureError::MissingFile { path } => {
                write!(f, "the unpacked packages have no `{path}`")
            }
            FixtureError::BzImage(e) => write!(f, "dom0 kernel: {e}"),
        }
    }
}

impl std::error::Error for FixtureError {}

impl From<BzImageError> for FixtureError {
    fn from(e: BzImageError) -> Self {
        FixtureError::BzImage(e)
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> FixtureError {
    let context = context.into();
    move |source| FixtureError::Io { context, source }
}

/// Runs `program args` in `dir` and returns its standard output.
fn output_of(program: &str, args: &[&str], dir: Option<&Path>) -> Result<String, FixtureError> {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let output = command.output().map_err(|source| FixtureError::Spawn {
        program: program.to_string(),
        source,
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let text = if stderr.trim().is_empty() {
            String::from_utf8_lossy(&output.stdout).into_owned()
        } else {
            stderr.into_owned()
        };
        return Err(FixtureError::Command {
            command: format!("{program} {}", args.join(" ")),
            output: format!("{} ({})", text.trim(), output.status),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The kernel package `linux-image-amd64` depends on, from `apt-cache depends`.
pub fn kernel_package_from_depends(depends: &str) -> Option<&str> {
    depends.lines().find_map(|line| {
        let name = line.trim().strip_prefix("Depends:")?.trim();
        name.starts_with("linux-image-").then_some(name)
    })
}

/// The kernel release inside a `linux-image-<release>` package name.
pub fn kernel_release(package: &str) -> Option<&str> {
    package
        .strip_prefix("linux-image-")
        .filter(|release| release.ends_with("-amd64"))
}

fn resolve_kernel_package() -> Result<String, FixtureError> {
    let query = || output_of("apt-cache", &["depends", KERNEL_METAPACKAGE], None);
    let depends = match query() {
        Ok(text) if kernel_package_from_depends(&text).is_some() => text,
        _ if host::is_root() => {
            eprintln!("xl fixture: apt has no kernel package list yet, running apt-get update");
            output_of("apt-get", &["update", "-q"], None)?;
            query()?
        }
        other => other?,
    };
    let found = kernel_package_from_depends(&depends).unwrap_or("nothing");
    if found.starts_with(KERNEL_PACKAGE_PREFIX) && kernel_release(found).is_some() {
        Ok(found.to_string())
    } else {
        Err(FixtureError::NoKernelPackage {
            found: found.to_string(),
        })
    }
}

/// One package file as `apt-get download --print-uris` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebFile {
    /// The package name.
    pub package: String,
    /// The file name apt downloads to (`name_version_arch.deb`).
    pub file: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its checksum as apt prints it (`SHA256:…`).
    pub checksum: String,
}

/// Parses `apt-get download --print-uris` output for `packages`.
///
/// Each line is `'URI' FILE SIZE CHECKSUM`; the package is the file name's
/// part before the first `_`. Returns `None` if a package has no line.
pub fn parse_print_uris(text: &str, packages: &[&str]) -> Option<Vec<DebFile>> {
    let files: Vec<DebFile> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let _uri = words.next()?.strip_prefix('\'')?;
            let file = words.next()?;
            let size = words.next()?.parse().ok()?;
            let checksum = words.next()?;
            let package = file.split('_').next()?;
            Some(DebFile {
                package: package.to_string(),
                file: file.to_string(),
                size,
                checksum: checksum.to_string(),
            })
        })
        .collect();
    packages
        .iter()
        .map(|package| files.iter().find(|deb| deb.package == *package).cloned())
        .collect()
}

/// The stamp text for a set of inputs.
fn stamp_text(debs: &[DebFile]) -> String {
    let mut text = format!(
        "format {FORMAT}\ninit {:016x}\n",
        fnv1a(DOM0_INIT.as_bytes())
    );
    for deb in debs {
        text.push_str(&format!("{} {} {}\n", deb.file, deb.size, deb.checksum));
    }
    text
}

/// Where the fixture's outputs live under `cache`.
struct Layout {
    debs: PathBuf,
    scratch: PathBuf,
    stamp: PathBuf,
    vmlinux: PathBuf,
    base_cpio: PathBuf,
}

impl Layout {
    fn new(cache: &Path) -> Self {
        Layout {
            debs: cache.join("debs"),
            scratch: cache.join("unpacked"),
            stamp: cache.join("base.stamp"),
            vmlinux: cache.join("dom0-vmlinux"),
            base_cpio: cache.join("dom0-base.cpio"),
        }
    }
}

/// The kernel package and every package file of the fixture, as apt
/// resolves them now.
fn resolve_inputs(cache: &Path) -> Result<(String, Vec<DebFile>), FixtureError> {
    let kernel_package = resolve_kernel_package()?;
    let mut packages: Vec<&str> = vec![kernel_package.as_str()];
    packages.extend_from_slice(DOM0_PACKAGES);

    let mut args = vec!["download", "--print-uris"];
    args.extend_from_slice(&packages);
    // apt prints nothing for a file already in its working directory: ask
    // from an empty one.
    let query_dir = cache.join("apt-query");
    fs::create_dir_all(&query_dir).map_err(io_err(format!("creating {}", query_dir.display())))?;
    let listing = output_of("apt-get", &args, Some(&query_dir))?;
    let debs = parse_print_uris(&listing, &packages).ok_or_else(|| FixtureError::Command {
        command: format!("apt-get {}", args.join(" ")),
        output: "did not name a file for every package".to_string(),
    })?;
    Ok((kernel_package, debs))
}

/// The dom0 kernel release recorded in a stamp (its `linux-image-<release>_…`
/// package file line).
fn release_from_stamp(stamp: &str) -> Option<&str> {
    stamp.lines().find_map(|line| {
        let rest = line.strip_prefix("linux-image-")?;
        rest.split('_')
            .next()
            .filter(|release| release.ends_with("-amd64"))
    })
}

/// Makes sure the fixture for the current Debian packages is in `cache`,
/// building it if any input changed, and returns where its parts are.
pub fn ensure(cache: &Path) -> Result<Fixture, FixtureError> {
    let layout = Layout::new(cache);
    fs::create_dir_all(&layout.debs)
        .map_err(io_err(format!("creating {}", layout.debs.display())))?;
    // Two xtasks (say `run` and `test` in two terminals) must not build the
    // same cache at once.
    let _lock = CacheLock::acquire(&cache.join("lock"))?;

    let outputs_present = [&layout.vmlinux, &layout.base_cpio]
        .iter()
        .all(|path| path.is_file());
    let old_stamp = fs::read_to_string(&layout.stamp).ok();
    let (kernel_package, debs) = match resolve_inputs(cache) {
        Ok(inputs) => inputs,
        // Offline, or apt's lists are gone: a complete cache still serves.
        Err(error) => match old_stamp.as_deref().and_then(release_from_stamp) {
            Some(release) if outputs_present => {
                eprintln!(
                    "xl fixture: cannot ask apt whether the packages changed ({error}); \
                     using the cached dom0 {release}"
                );
                return Ok(Fixture {
                    dom0_kernel: layout.vmlinux,
                    base_cpio: layout.base_cpio,
                    kernel_release: release.to_string(),
                    built: false,
                });
            }
            _ => return Err(error),
        },
    };
    let release = kernel_release(&kernel_package)
        .unwrap_or_default()
        .to_string();
    let stamp = stamp_text(&debs);
    if outputs_present && old_stamp.as_deref() == Some(&stamp) {
        return Ok(Fixture {
            dom0_kernel: layout.vmlinux,
            base_cpio: layout.base_cpio,
            kernel_release: release,
            built: false,
        });
    }

    let started = Instant::now();
    // The old stamp goes first, so an interrupted build is never taken as done.
    let _ = fs::remove_file(&layout.stamp);
    download(&layout.debs, &debs)?;
    let downloaded = started.elapsed();

    if layout.scratch.exists() {
        fs::remove_dir_all(&layout.scratch)
            .map_err(io_err(format!("removing {}", layout.scratch.display())))?;
    }
    let rootfs = layout.scratch.join("rootfs");
    let linux = layout.scratch.join("linux");
    for dir in [&rootfs, &linux] {
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    for deb in &debs {
        let deb_path = layout.debs.join(&deb.file);
        if deb.package == kernel_package {
            // 430 MiB of modules of which five are needed: take only those
            // and the bzImage out of the package's file system archive.
            let members = [
                format!("./boot/vmlinuz-{release}"),
                format!("./lib/modules/{release}/kernel/drivers/xen"),
            ];
            unpack_members(&deb_path, &linux, &members)?;
        } else {
            output_of(
                "dpkg-deb",
                &["-x", &deb_path.to_string_lossy(), &rootfs.to_string_lossy()],
                None,
            )?;
        }
    }
    let unpacked = started.elapsed();

    // The dom0 kernel, as an ELF.
    let vmlinuz_rel = format!("boot/vmlinuz-{release}");
    let vmlinuz = fs::read(linux.join(&vmlinuz_rel))
        .map_err(|_| FixtureError::MissingFile { path: vmlinuz_rel })?;
    let vmlinux = bzimage::extract_vmlinux(&vmlinuz)?;
    write_atomically(&layout.vmlinux, &vmlinux)?;
    let kernel_done = started.elapsed();

    // The base initramfs.
    let base = base_cpio(&rootfs, &linux, &release)?;
    write_atomically(&layout.base_cpio, &base)?;

    fs::remove_dir_all(&layout.scratch)
        .map_err(io_err(format!("removing {}", layout.scratch.display())))?;
    remove_stale_debs(&layout.debs, &debs);
    write_atomically(&layout.stamp, stamp.as_bytes())?;
    eprintln!(
        "xl fixture: built in {:.1}s (download {:.1}s, unpack {:.1}s, vmlinux {:.1}s, \
         initramfs {:.1}s): dom0 {release}, vmlinux {} MiB, base initramfs {} MiB",
        started.elapsed().as_secs_f64(),
        downloaded.as_secs_f64(),
        (unpacked - downloaded).as_secs_f64(),
        (kernel_done - unpacked).as_secs_f64(),
        (started.elapsed() - kernel_done).as_secs_f64(),
        vmlinux.len() >> 20,
        base.len() >> 20,
    );
    Ok(Fixture {
        dom0_kernel: layout.vmlinux,
        base_cpio: layout.base_cpio,
        kernel_release: release,
        built: true,
    })
}

/// An exclusive claim on the cache: a file created with `create_new` holding
/// the owner's pid, removed on drop. A file whose pid no longer runs is stale
/// (its xtask was killed) and is taken over.
struct CacheLock {
    path: PathBuf,
}

impl CacheLock {
    fn acquire(path: &Path) -> Result<CacheLock, FixtureError> {
        let mut told = false;
        let mut empty_reads = 0;
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(mut file) => {
                    write!(file, "{}", std::process::id())
                        .map_err(io_err(format!("writing {}", path.display())))?;
                    return Ok(CacheLock {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let owner = fs::read_to_string(path).unwrap_or_default();
                    if owner.trim().is_empty() && empty_reads < 20 {
                        // Just created, its pid not written yet.
                        empty_reads += 1;
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                    let alive = owner
                        .trim()
                        .parse::<u32>()
                        .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                    if !alive {
                        // Its owner is gone (killed mid-build): take over.
                        let _ = fs::remove_file(path);
                        continue;
                    }
                    if !told {
                        eprintln!(
                            "xl fixture: waiting for xtask pid {} to finish with {}",
                            owner.trim(),
                            path.parent().unwrap_or(path).display()
                        );
                        told = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                Err(e) => return Err(io_err(format!("creating {}", path.display()))(e)),
            }
        }
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Downloads the package files not already in `dir` with the right size.
fn download(dir: &Path, debs: &[DebFile]) -> Result<(), FixtureError> {
    let missing: Vec<&str> = debs
        .iter()
        .filter(|deb| {
            fs::metadata(dir.join(&deb.file))
                .map(|m| m.len() != deb.size)
                .unwrap_or(true)
        })
        .map(|deb| deb.package.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xl fixture: apt-get download {}", missing.join(" "));
    let mut args = Vec::new();
    if host::is_root() {
        // apt drops to the `_apt` user for downloads, who may not write here.
        args.extend(["-o", "APT::Sandbox::User=root"]);
    }
    args.extend(["download", "-q"]);
    args.extend_from_slice(&missing);
    output_of("apt-get", &args, Some(dir))?;
    for deb in debs {
        let size = fs::metadata(dir.join(&deb.file)).map(|m| m.len()).ok();
        if size != Some(deb.size) {
            return Err(FixtureError::Command {
                command: format!("apt-get download {}", deb.package),
                output: format!("{} is missing or has the wrong size", deb.file),
            });
        }
    }
    Ok(())
}

/// Unpacks only `members` (paths as the archive names them, directories
/// recursively) of the package `deb` into `into`: `dpkg-deb --fsys-tarfile`
/// piped into `tar -x` (dpkg-deb itself needs tar, so both are there).
fn unpack_members(deb: &Path, into: &Path, members: &[String]) -> Result<(), FixtureError> {
    let spawn = |program: &str, command: &mut Command| {
        command.spawn().map_err(|source| FixtureError::Spawn {
            program: program.to_string(),
            source,
        })
    };
    let mut archive = spawn(
        "dpkg-deb",
        Command::new("dpkg-deb")
            .arg("--fsys-tarfile")
            .arg(deb)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let Some(tar_stream) = archive.stdout.take() else {
        let _ = archive.kill();
        let _ = archive.wait();
        return Err(FixtureError::Command {
            command: format!("dpkg-deb --fsys-tarfile {}", deb.display()),
            output: "no output pipe".to_string(),
        });
    };
    let tar = spawn(
        "tar",
        Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(into)
            .args(members)
            .stdin(Stdio::from(tar_stream))
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )?;
    let tar_output = tar
        .wait_with_output()
        .map_err(io_err(format!("running tar on {}", deb.display())))?;
    let archive_output = archive
        .wait_with_output()
        .map_err(io_err(format!("running dpkg-deb on {}", deb.display())))?;
    for (name, output) in [
        ("dpkg-deb --fsys-tarfile", &archive_output),
        ("tar -x", &tar_output),
    ] {
        if !output.status.success() {
            return Err(FixtureError::Command {
                command: format!("{name} {} {}", deb.display(), members.join(" ")),
                output: format!(
                    "{} ({})",
                    String::from_utf8_lossy(&output.stderr).trim(),
                    output.status
                ),
            });
        }
    }
    Ok(())
}

/// Removes package files of earlier versions, so the cache does not grow.
fn remove_stale_debs(dir: &Path, debs: &[DebFile]) {
    let keep: BTreeSet<&str> = debs.iter().map(|deb| deb.file.as_str()).collect();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".deb") && !keep.contains(name.as_ref()) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), FixtureError> {
    let tmp = path.with_extension("partial");
    let context = format!("writing {}", path.display());
    let mut file = fs::File::create(&tmp).map_err(io_err(context.clone()))?;
    file.write_all(bytes).map_err(io_err(context.clone()))?;
    file.sync_all().map_err(io_err(context.clone()))?;
    fs::rename(&tmp, path).map_err(io_err(context))
}

/// Whether a path of the unpacked packages goes into the initramfs.
pub fn included(relative: &str) -> bool {
    !EXCLUDED_PREFIXES.iter().any(|prefix| {
        relative == *prefix
            || relative
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// Adds `dir` (relative path `relative`) and everything below it, parents
/// before children, in sorted order.
fn add_tree<W: Write>(
    cpio: &mut CpioWriter<W>,
    root: &Path,
    relative: &str,
    emitted: &mut BTreeSet<String>,
) -> Result<(), FixtureError> {
    let dir = root.join(relative);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .map_err(io_err(format!("reading {}", dir.display())))?
        .collect::<Result<_, _>>()
        .map_err(io_err(format!("reading {}", dir.display())))?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = if relative.is_empty() {
            name
        } else {
            format!("{relative}/{name}")
        };
        if !included(&path) {
            continue;
        }
        let full = entry.path();
        let context = format!("adding {} to the initramfs", full.display());
        let meta = fs::symlink_metadata(&full).map_err(io_err(context.clone()))?;
        let perm = meta.permissions().mode();
        let kind = meta.file_type();
        if kind.is_dir() {
            if emitted.insert(path.clone()) {
                cpio.dir(&path, perm).map_err(io_err(context.clone()))?;
            }
            add_tree(cpio, root, &path, emitted)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&full).map_err(io_err(context.clone()))?;
            if emitted.insert(path.clone()) {
                cpio.symlink(&path, &target.to_string_lossy())
                    .map_err(io_err(context))?;
            }
        } else if kind.is_file() {
            let contents = fs::read(&full).map_err(io_err(context.clone()))?;
            if emitted.insert(path.clone()) {
                cpio.file(&path, perm, &contents).map_err(io_err(context))?;
            }
        }
    }
    Ok(())
}

/// Adds every missing parent directory of `path`, then `path` as a directory.
fn add_dirs<W: Write>(
    cpio: &mut CpioWriter<W>,
    path: &str,
    emitted: &mut BTreeSet<String>,
) -> Result<(), FixtureError> {
    let mut prefix = String::new();
    for part in path.split('/').filter(|part| !part.is_empty()) {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        if emitted.insert(prefix.clone()) {
            cpio.dir(&prefix, 0o755)
                .map_err(io_err(format!("adding {prefix} to the initramfs")))?;
        }
    }
    Ok(())
}

/// Builds the base initramfs from the unpacked packages.
fn base_cpio(rootfs: &Path, linux: &Path, release: &str) -> Result<Vec<u8>, FixtureError> {
    let mut cpio = CpioWriter::new(Vec::new(), 1);
    let mut emitted = BTreeSet::new();
    let context = "building the dom0 initramfs";

    add_tree(&mut cpio, rootfs, "", &mut emitted)?;

    // The Xen modules, at the paths the kernel package gives them.
    let module_dir = format!("lib/modules/{release}/kernel/drivers/xen");
    let mut module_paths = Vec::new();
    for module in XEN_MODULES {
        let candidates = [
            format!("{module_dir}/{module}.ko"),
            format!("{module_dir}/{module}/{module}.ko"),
        ];
        let found = candidates
            .iter()
            .find(|candidate| linux.join(candidate).is_file())
            .ok_or_else(|| FixtureError::MissingFile {
                path: candidates[0].clone(),
            })?;
        let contents = fs::read(linux.join(found)).map_err(io_err(format!("reading {found}")))?;
        if let Some((parent, _)) = found.rsplit_once('/') {
            add_dirs(&mut cpio, parent, &mut emitted)?;
        }
        cpio.file(found, 0o644, &contents)
            .map_err(io_err(context))?;
        module_paths.push(format!("/{found}"));
    }

    // The pieces of a root file system the packages do not ship.
    for dir in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "etc/xl-dom0",
        "var/log",
        "var/lib",
        "guest",
    ] {
        add_dirs(&mut cpio, dir, &mut emitted)?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    if emitted.insert("dev/console".to_string()) {
        cpio.char_dev("dev/console", 0o600, 5, 1)
            .map_err(io_err(context))?;
    }
    for (link, target) in [
        ("bin/sh", "busybox"),
        ("var/run", "/run"),
        ("var/lock", "/run/lock"),
    ] {
        if emitted.insert(link.to_string()) {
            cpio.symlink(link, target).map_err(io_err(context))?;
        }
    }
    cpio.file(
        "etc/xl-dom0/modules",
        0o644,
        (module_paths.join("\n") + "\n").as_bytes(),
    )
    .map_err(io_err(context))?;
    cpio.file("init", 0o755, DOM0_INIT.as_bytes())
        .map_err(io_err(context))?;
    for required in [
        "bin/busybox",
        "usr/lib/xen-4.17/bin/xl",
        "usr/lib/xen-4.17/bin/xenstored",
    ] {
        if !emitted.contains(required) {
            return Err(FixtureError::MissingFile {
                path: required.to_string(),
            });
        }
    }
    cpio.finish().map_err(io_err(context))
}

/// The second cpio of a run: the guest kernel and its `xl` configuration,
/// unpacked over the base into `/guest/`.
pub fn guest_cpio(kernel: &[u8], config: &str, timeout_secs: u64) -> io::Result<Vec<u8>> {
    let mut cpio = CpioWriter::new(Vec::new(), GUEST_FIRST_INO);
    cpio.dir("guest", 0o755)?;
    cpio.file("guest/kernel", 0o644, kernel)?;
    cpio.file("guest/guest.cfg", 0o644, config.as_bytes())?;
    cpio.file(
        "guest/timeout",
        0o644,
        format!("{timeout_secs}\n").as_bytes(),
    )?;
    cpio.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_lock_excludes_a_second_owner_and_takes_over_stale_ones() {
        let dir = std::env::temp_dir().join(format!("xl-lock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lock");

        // A lock left by a pid that does not run (pid_max is below 2^22).
        fs::write(&path, "4194305").unwrap();
        let first = CacheLock::acquire(&path).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            std::process::id().to_string()
        );

        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                let second = CacheLock::acquire(&path).unwrap();
                tx.send(()).unwrap();
                drop(second);
            })
        };
        // Held by a live pid (ours): the second claim waits.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(800))
            .is_err());
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        waiter.join().unwrap();
        assert!(!path.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kernel_package_is_read_from_the_metapackage() {
        let depends = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            kernel_package_from_depends(depends),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(
            kernel_release("linux-image-6.1.0-56-amd64"),
            Some("6.1.0-56-amd64")
        );
        assert_eq!(kernel_release("linux-image-6.1.0-56-arm64"), None);
        assert_eq!(kernel_package_from_depends("linux-image-amd64\n"), None);
    }

    #[test]
    fn print_uris_lines_map_to_packages() {
        let text = "'http://mirror/pool/b/busybox-static_1%3a1.35.0-4_amd64.deb' \
                    busybox-static_1%3a1.35.0-4_amd64.deb 928188 SHA256:3d3f\n\
                    'http://mirror/pool/g/libc6_2.36-9_amd64.deb' libc6_2.36-9_amd64.deb 2759320 SHA256:ba4f\n";
        let debs = parse_print_uris(text, &["libc6", "busybox-static"]).unwrap();
        assert_eq!(debs[0].package, "libc6");
        assert_eq!(debs[0].file, "libc6_2.36-9_amd64.deb");
        assert_eq!(debs[0].size, 2_759_320);
        assert_eq!(debs[1].package, "busybox-static");
        assert_eq!(debs[1].checksum, "SHA256:3d3f");
        assert_eq!(parse_print_uris(text, &["libc6", "zlib1g"]), None);
    }

    #[test]
    fn stamp_changes_with_any_input() {
        let deb = DebFile {
            package: "libc6".into(),
            file: "libc6_2.36-9_amd64.deb".into(),
            size: 1,
            checksum: "SHA256:aa".into(),
        };
        let other = DebFile {
            checksum: "SHA256:ab".into(),
            ..deb.clone()
        };
        let one = std::slice::from_ref(&deb);
        assert_eq!(stamp_text(one), stamp_text(one));
        assert_ne!(stamp_text(one), stamp_text(&[other]));
        assert!(stamp_text(&[deb]).contains(&format!("{:016x}", fnv1a(DOM0_INIT.as_bytes()))));
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }

    #[test]
    fn release_is_read_back_from_the_stamp() {
        let debs = [
            DebFile {
                package: "linux-image-6.1.0-56-amd64".into(),
                file: "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb".into(),
                size: 1,
                checksum: "SHA256:aa".into(),
            },
            DebFile {
                package: "libc6".into(),
                file: "libc6_2.36-9_amd64.deb".into(),
                size: 1,
                checksum: "SHA256:bb".into(),
            },
        ];
        assert_eq!(
            release_from_stamp(&stamp_text(&debs)),
            Some("6.1.0-56-amd64")
        );
        assert_eq!(release_from_stamp(&stamp_text(&debs[1..])), None);
    }

    #[test]
    fn documentation_and_python_stay_out() {
        assert!(!included("usr/share/doc"));
        assert!(!included("usr/share/doc/libc6/copyright"));
        assert!(!included("boot/vmlinuz-6.1.0-56-amd64"));
        assert!(included("usr/share/docs-not-really"));
        assert!(included("usr/lib/xen-4.17/bin/xl"));
        assert!(included("lib/x86_64-linux-gnu/libc.so.6"));
    }

    #[test]
    fn guest_cpio_holds_kernel_config_and_timeout() {
        let bytes = guest_cpio(b"\x7fELF-kernel", "name = \"g\"\n", 90).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for needle in [
            "guest/kernel",
            "\x7fELF-kernel",
            "guest/guest.cfg",
            "name = \"g\"",
            "90\n",
            "TRAILER!!!",
        ] {
            assert!(text.contains(needle), "{needle:?} missing");
        }
        // Inode numbers start far above the base archive's.
        assert!(text.starts_with(&format!("070701{GUEST_FIRST_INO:08X}")));
    }

    #[test]
    fn init_script_never_prints_the_markers() {
        // The harness takes these markers from the guest only.
        assert!(!DOM0_INIT.contains("PVMMU-RESULT"));
        assert!(!DOM0_INIT.contains("PVMMU-REPORT"));
        for module in XEN_MODULES {
            assert!(!module.contains('/'));
        }
    }
}
