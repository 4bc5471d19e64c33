//! Where things are: the workspace root, the cargo target directory, and the
//! xtask's own files under them.
//!
//! Invariant: every path the xtask reads or writes is derived here, from the
//! workspace root and from `$CARGO_TARGET_DIR` (made absolute against the
//! directory the xtask was started in, as cargo itself does) or
//! `<workspace>/target`.

use std::env;
use std::path::{Path, PathBuf};

use crate::cli::Profile;

/// The rust target the guest kernel is built for.
pub const KERNEL_TARGET: &str = "x86_64-unknown-none";

/// The guest kernel's package and binary name.
pub const KERNEL_PACKAGE: &str = "guest-kernel";

/// The workspace and its output directories.
#[derive(Clone, Debug)]
pub struct Workspace {
    /// The directory holding the workspace `Cargo.toml`.
    pub root: PathBuf,
    /// Cargo's target directory.
    pub target_dir: PathBuf,
}

impl Workspace {
    /// Locates the workspace from the environment cargo gives the xtask.
    pub fn from_env() -> Workspace {
        let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        let root = manifest_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or(manifest_dir);
        let cwd = env::current_dir().unwrap_or_else(|_| root.clone());
        let target_dir = target_dir_from(
            env::var_os("CARGO_TARGET_DIR").map(PathBuf::from),
            &cwd,
            &root,
        );
        Workspace { root, target_dir }
    }

    /// The guest kernel ELF that `cargo build -p guest-kernel` produces.
    pub fn kernel_elf(&self, profile: Profile) -> PathBuf {
        let profile_dir = match profile {
            Profile::Release => "release",
            Profile::Debug => "debug",
        };
        self.target_dir
            .join(KERNEL_TARGET)
            .join(profile_dir)
            .join(KERNEL_PACKAGE)
    }

    /// Full console transcripts of boots.
    pub fn logs_dir(&self) -> PathBuf {
        self.target_dir.join("xtask").join("logs")
    }

    /// Downloaded and extracted system pieces (gitignored).
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join(".cache")
    }

    /// The markdown table `cargo xtask bench` writes.
    pub fn bench_table(&self) -> PathBuf {
        self.target_dir.join("bench.md")
    }
}

/// `$CARGO_TARGET_DIR` resolved against `cwd`, else `<root>/target`.
fn target_dir_from(from_env: Option<PathBuf>, cwd: &Path, root: &Path) -> PathBuf {
    match from_env {
        Some(dir) if dir.as_os_str().is_empty() => root.join("target"),
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => cwd.join(dir),
        None => root.join("target"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_dir_rules() {
        let root = Path::new("/ws");
        let cwd = Path::new("/ws/xtask");
        assert_eq!(
            target_dir_from(None, cwd, root),
            PathBuf::from("/ws/target")
        );
        assert_eq!(
            target_dir_from(Some("/tmp/t".into()), cwd, root),
            PathBuf::from("/tmp/t")
        );
        assert_eq!(
            target_dir_from(Some("out".into()), cwd, root),
            PathBuf::from("/ws/xtask/out")
        );
        assert_eq!(
            target_dir_from(Some("".into()), cwd, root),
            PathBuf::from("/ws/target")
        );
    }

    #[test]
    fn kernel_path_follows_profile_and_target_dir() {
        let ws = Workspace {
            root: "/ws".into(),
            target_dir: "/tmp/t".into(),
        };
        assert_eq!(
            ws.kernel_elf(Profile::Release),
            PathBuf::from("/tmp/t/x86_64-unknown-none/release/guest-kernel")
        );
        assert_eq!(
            ws.kernel_elf(Profile::Debug),
            PathBuf::from("/tmp/t/x86_64-unknown-none/debug/guest-kernel")
        );
        assert_eq!(ws.bench_table(), PathBuf::from("/tmp/t/bench.md"));
    }
}
