//! The Xen hypervisor cache: Debian's `xen-hypervisor-<version>-amd64`
//! fetched with `apt-get download`, unpacked with `dpkg-deb -x`, its gzipped
//! image turned into the ELF that QEMU's multiboot loader takes.
//!
//! Xen 4.17 is the host's own Debian 12 package (`.cache/xen/`). Xen 4.20
//! is Debian 13's (trixie), fetched through a private apt configuration
//! under `.cache/xen-4.20/apt/` (its own sources list naming only trixie,
//! its own package lists and cache), so the machine's apt sources and lists
//! are never touched.
//!
//! Invariant: `<cache>/xen.elf` exists only complete (it is written under a
//! temporary name and renamed) and starts with the ELF magic; when it exists
//! it is reused as it is, and nothing on the host outside the cache changes
//! except apt's package lists when running as root (4.17 only).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cli::XenVersion;
use crate::error::XtaskError;
use crate::host;
use crate::workspace::Workspace;

/// The Debian package holding the hypervisor.
pub fn package(version: XenVersion) -> String {
    format!("xen-hypervisor-{}-amd64", version.name())
}

/// The apt source of Debian 13 (trixie), which ships Xen 4.20; signed by
/// the trixie keys every Debian 12 system has in its archive keyring.
pub const TRIXIE_SOURCE: &str = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                                 http://deb.debian.org/debian trixie main";

/// The cached, uncompressed hypervisor image.
pub fn cached_elf(ws: &Workspace, version: XenVersion) -> PathBuf {
    cache_dir(ws, version).join("xen.elf")
}

fn cache_dir(ws: &Workspace, version: XenVersion) -> PathBuf {
    match version {
        XenVersion::V4_17 => ws.cache_dir().join("xen"),
        XenVersion::V4_20 => ws.cache_dir().join("xen-4.20"),
    }
}

fn io_error(context: String) -> impl FnOnce(io::Error) -> XtaskError {
    move |source| XtaskError::io(context, source)
}

/// Returns the path of Xen's ELF image, fetching and unpacking it first if the
/// cache does not hold it.
pub fn ensure_cached(ws: &Workspace, version: XenVersion) -> Result<PathBuf, XtaskError> {
    let elf = cached_elf(ws, version);
    if is_elf(&elf) {
        return Ok(elf);
    }
    let dir = cache_dir(ws, version);
    fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
    let package = package(version);
    let deb = match find_deb(&dir, &package)? {
        Some(deb) => deb,
        None => match version {
            XenVersion::V4_17 => download(&dir, &package)?,
            XenVersion::V4_20 => download_private(&dir, &package)?,
        },
    };
    eprintln!("xtask: unpacking {}", deb.display());
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).map_err(io_error(format!("removing {}", root.display())))?;
    }
    host::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root)).map_err(|error| {
        XtaskError::XenFetch {
            reason: format!("{error} (dpkg-deb comes with any Debian system)"),
        }
    })?;
    let image = find_image(&root.join("boot"))?;
    gunzip(&image, &elf)?;
    if !is_elf(&elf) {
        return Err(XtaskError::XenFetch {
            reason: format!("{} did not unpack to an ELF image", image.display()),
        });
    }
    eprintln!("xtask: Xen cached at {}", elf.display());
    Ok(elf)
}

/// Whether `path` is a file starting with the ELF magic.
fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut file| io::Read::read_exact(&mut file, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// A previously downloaded package in the cache (the newest by name).
fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>, XtaskError> {
    let prefix = format!("{package}_");
    let mut debs = list_dir(dir)?
        .into_iter()
        .filter(|name| name.starts_with(&prefix) && name.ends_with(".deb"))
        .collect::<Vec<_>>();
    debs.sort();
    Ok(debs.pop().map(|name| dir.join(name)))
}

/// The hypervisor image in an unpacked package's `boot/`: `xen-*.gz`.
fn find_image(boot: &Path) -> Result<PathBuf, XtaskError> {
    let mut images = list_dir(boot)?
        .into_iter()
        .filter(|name| name.starts_with("xen-") && name.ends_with(".gz"))
        .collect::<Vec<_>>();
    images.sort();
    images
        .pop()
        .map(|name| boot.join(name))
        .ok_or_else(|| XtaskError::XenFetch {
            reason: format!("no xen-*.gz in {}", boot.display()),
        })
}

fn list_dir(dir: &Path) -> Result<Vec<String>, XtaskError> {
    let entries = fs::read_dir(dir).map_err(io_error(format!("reading {}", dir.display())))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(format!("reading {}", dir.display())))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// `apt-get download` into `dir`; as root, `apt-get update` and retry once.
fn download(dir: &Path, package: &str) -> Result<PathBuf, XtaskError> {
    eprintln!("xtask: fetching {package} into {}", dir.display());
    let mut first = host::apt_get(&["download", package]);
    first.current_dir(dir);
    if let Err(error) = host::run(&mut first) {
        if matches!(error, XtaskError::Spawn { .. }) {
            return Err(XtaskError::XenFetch {
                reason: format!(
                    "{error}; on a non-Debian host put {package}_*.deb into {} by hand",
                    dir.display()
                ),
            });
        }
        if !host::is_root() {
            return Err(XtaskError::XenFetch {
                reason: format!(
                    "{error}; the package lists may be stale: run\n    sudo apt-get update\n\
                     and try again (or: cd {} && apt-get download {package})",
                    dir.display()
                ),
            });
        }
        eprintln!("xtask: apt-get download failed; running apt-get update and retrying");
        host::run(&mut host::apt_get(&["update"]))?;
        let mut retry = host::apt_get(&["download", package]);
        retry.current_dir(dir);
        host::run(&mut retry).map_err(|error| XtaskError::XenFetch {
            reason: error.to_string(),
        })?;
    }
    find_deb(dir, package)?.ok_or_else(|| XtaskError::XenFetch {
        reason: format!(
            "apt-get download left no {package}_*.deb in {}",
            dir.display()
        ),
    })
}

/// The apt-get options of the private configuration in `apt`: its own
/// sources list (trixie only), lists, cache and (empty) dpkg status; no
/// translations, amd64 only, no lock on the host's apt.
pub fn private_apt_options(apt: &Path) -> Vec<String> {
    let dir = |name: &str| apt.join(name).display().to_string();
    vec![
        format!("Dir::Etc::SourceList={}", dir("sources.list")),
        format!("Dir::Etc::SourceParts={}", dir("sources.list.d")),
        format!("Dir::State={}", dir("state")),
        format!("Dir::State::status={}", dir("status")),
        format!("Dir::Cache={}", dir("cache")),
        "APT::Architectures=amd64".into(),
        "Acquire::Languages=none".into(),
        "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
        "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
        "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
        "Acquire::IndexTargets::deb::CNF::DefaultEnabled=false".into(),
        "APT::Sandbox::User=root".into(),
        "Debug::NoLocking=1".into(),
    ]
}

/// `apt-get <args>` under the private configuration in `apt`.
fn private_apt_get(apt: &Path, args: &[&str]) -> Command {
    let mut command = host::apt_get(&[]);
    for option in private_apt_options(apt) {
        command.arg("-o").arg(option);
    }
    command.args(args);
    command
}

/// Fetches `package` from Debian 13 into `dir` through a private apt
/// configuration in `dir/apt` (its package lists fetched on first use).
fn download_private(dir: &Path, package: &str) -> Result<PathBuf, XtaskError> {
    let apt = dir.join("apt");
    for sub in [
        "sources.list.d",
        "state/lists/partial",
        "cache/archives/partial",
    ] {
        let path = apt.join(sub);
        fs::create_dir_all(&path).map_err(io_error(format!("creating {}", path.display())))?;
    }
    let write = |name: &str, text: &str| {
        let path = apt.join(name);
        fs::write(&path, text).map_err(io_error(format!("writing {}", path.display())))
    };
    write("sources.list", &format!("{TRIXIE_SOURCE}\n"))?;
    write("status", "")?;
    let fetch = || {
        let mut command = private_apt_get(&apt, &["download", package]);
        command.current_dir(dir);
        host::run(&mut command)
    };
    eprintln!(
        "xtask: fetching {package} (Debian 13) into {} through the private apt configuration in {}",
        dir.display(),
        apt.display()
    );
    if fetch().is_err() {
        eprintln!("xtask: updating the private package lists (trixie main)");
        host::run(&mut private_apt_get(&apt, &["update"])).map_err(|error| {
            XtaskError::XenFetch {
                reason: format!("{error}: the trixie package lists could not be fetched"),
            }
        })?;
        fetch().map_err(|error| XtaskError::XenFetch {
            reason: error.to_string(),
        })?;
    }
    find_deb(dir, package)?.ok_or_else(|| XtaskError::XenFetch {
        reason: format!(
            "apt-get download left no {package}_*.deb in {}",
            dir.display()
        ),
    })
}

/// `gzip -dc image > elf`, written under a temporary name, then renamed.
fn gunzip(image: &Path, elf: &Path) -> Result<(), XtaskError> {
    let partial = elf.with_extension("elf.partial");
    let out =
        fs::File::create(&partial).map_err(io_error(format!("creating {}", partial.display())))?;
    let mut command = Command::new("gzip");
    command.arg("-dc").arg(image).stdout(Stdio::from(out));
    host::run(&mut command)?;
    fs::rename(&partial, elf).map_err(io_error(format!(
        "renaming {} to {}",
        partial.display(),
        elf.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-xen-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn finds_the_newest_deb_and_the_image() {
        let dir = scratch("find");
        for name in [
            "xen-hypervisor-4.17-amd64_4.17.5-1_amd64.deb",
            "xen-hypervisor-4.17-amd64_4.17.7-1_amd64.deb",
            "xen-utils-4.17_4.17.9-1_amd64.deb",
            "partial.deb",
        ] {
            fs::write(dir.join(name), b"").unwrap();
        }
        assert_eq!(
            find_deb(&dir, &package(XenVersion::V4_17)).unwrap(),
            Some(dir.join("xen-hypervisor-4.17-amd64_4.17.7-1_amd64.deb"))
        );
        let boot = dir.join("boot");
        fs::create_dir_all(&boot).unwrap();
        for name in [
            "xen-4.17-amd64.config",
            "xen-4.17-amd64.efi",
            "xen-4.17-amd64.gz",
        ] {
            fs::write(boot.join(name), b"").unwrap();
        }
        assert_eq!(find_image(&boot).unwrap(), boot.join("xen-4.17-amd64.gz"));
        fs::remove_file(boot.join("xen-4.17-amd64.gz")).unwrap();
        assert!(matches!(
            find_image(&boot),
            Err(XtaskError::XenFetch { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gunzip_writes_an_elf_only_when_complete() {
        let dir = scratch("gunzip");
        let plain = dir.join("image");
        fs::write(&plain, b"\x7fELF rest of image").unwrap();
        host::run(Command::new("gzip").arg("-k").arg(&plain)).unwrap();
        let elf = dir.join("xen.elf");
        gunzip(&dir.join("image.gz"), &elf).unwrap();
        assert!(is_elf(&elf));
        assert_eq!(fs::read(&elf).unwrap(), b"\x7fELF rest of image");

        let broken = dir.join("broken.gz");
        fs::write(&broken, b"not gzip").unwrap();
        let other = dir.join("other.elf");
        assert!(gunzip(&broken, &other).is_err());
        assert!(!other.exists());
        assert!(!is_elf(&dir.join("missing")));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn xen_4_20_uses_its_own_cache_and_a_private_apt() {
        let ws = Workspace {
            root: PathBuf::from("/w"),
            target_dir: PathBuf::from("/w/target"),
        };
        assert_eq!(package(XenVersion::V4_20), "xen-hypervisor-4.20-amd64");
        assert_ne!(
            cached_elf(&ws, XenVersion::V4_17),
            cached_elf(&ws, XenVersion::V4_20)
        );
        let options = private_apt_options(Path::new("/c/apt"));
        // Every path apt reads or writes is under the private directory.
        for option in options.iter().filter(|o| o.starts_with("Dir::")) {
            let path = option.split_once('=').unwrap().1;
            assert!(path.starts_with("/c/apt/"), "{option}");
        }
        assert!(TRIXIE_SOURCE.contains(" trixie main"));
    }
}
