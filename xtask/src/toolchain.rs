//! The Rust toolchain pieces the xtask needs beyond a plain `cargo`: the
//! guest kernel's bare-metal target, and for `cargo xtask test` the rustfmt
//! and clippy components.
//!
//! A fresh machine with a stable toolchain has neither the target nor, with
//! rustup's minimal profile, the components; `rust-toolchain.toml` lists them,
//! but rustup only honours that list when it installs the toolchain itself.
//!
//! Invariant: what is missing is read from the sysroot of the toolchain that
//! runs the xtask (the `rustc` beside `$CARGO`), never guessed; each missing
//! piece is installed with `rustup` after a line saying so, and without
//! rustup the error names the piece and how to get it.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::XtaskError;
use crate::host;
use crate::workspace::{Workspace, KERNEL_TARGET};

/// A rustup component the xtask uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// `cargo fmt`.
    Rustfmt,
    /// `cargo clippy`.
    Clippy,
}

impl Component {
    /// The component's rustup name.
    pub fn name(self) -> &'static str {
        match self {
            Component::Rustfmt => "rustfmt",
            Component::Clippy => "clippy",
        }
    }

    /// The program the component puts in the sysroot's `bin/`.
    fn program(self) -> &'static str {
        match self {
            Component::Rustfmt => "rustfmt",
            Component::Clippy => "cargo-clippy",
        }
    }
}

/// What a toolchain lacks of what was asked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Missing {
    /// The target whose `core` library is absent, if it is.
    pub target: Option<&'static str>,
    /// The components whose program is absent.
    pub components: Vec<Component>,
}

impl Missing {
    /// Whether nothing is missing.
    pub fn is_empty(&self) -> bool {
        self.target.is_none() && self.components.is_empty()
    }

    /// The rustup commands that install what is missing.
    pub fn rustup_args(&self) -> Vec<Vec<&'static str>> {
        let mut commands = Vec::new();
        if let Some(target) = self.target {
            commands.push(vec!["target", "add", target]);
        }
        if !self.components.is_empty() {
            let mut args = vec!["component", "add"];
            args.extend(self.components.iter().map(|c| c.name()));
            commands.push(args);
        }
        commands
    }
}

/// Whether `sysroot` holds a `core` library built for `target`.
pub fn has_target(sysroot: &Path, target: &str) -> bool {
    let lib = sysroot.join("lib/rustlib").join(target).join("lib");
    fs::read_dir(lib).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("libcore-") && name.ends_with(".rlib")
        })
    })
}

/// What `sysroot` lacks of the kernel target and of `components`.
pub fn missing(sysroot: &Path, target: &'static str, components: &[Component]) -> Missing {
    Missing {
        target: (!has_target(sysroot, target)).then_some(target),
        components: components
            .iter()
            .copied()
            .filter(|c| !sysroot.join("bin").join(c.program()).is_file())
            .collect(),
    }
}

/// The `rustc` of the toolchain that runs the xtask: the one beside `$CARGO`
/// (the real toolchain binary, not the rustup proxy), else `rustc` on PATH.
fn rustc() -> OsString {
    env::var_os("CARGO")
        .map(PathBuf::from)
        .and_then(|cargo| {
            let rustc = cargo.with_file_name("rustc");
            rustc.is_file().then(|| rustc.into_os_string())
        })
        .unwrap_or_else(|| OsString::from("rustc"))
}

/// The sysroot of the toolchain that runs the xtask.
fn sysroot(ws: &Workspace) -> Result<PathBuf, XtaskError> {
    let program = rustc();
    let output = Command::new(&program)
        .args(["--print", "sysroot"])
        .current_dir(&ws.root)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| XtaskError::Spawn {
            program: program.to_string_lossy().into_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(XtaskError::CommandFailed {
            command: format!("{} --print sysroot", program.to_string_lossy()),
            status: output.status,
        });
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim_end(),
    ))
}

/// Makes sure the kernel target and `components` are installed, adding them
/// with rustup if not.
pub fn ensure(ws: &Workspace, components: &[Component]) -> Result<(), XtaskError> {
    let sysroot = sysroot(ws)?;
    let missing = missing(&sysroot, KERNEL_TARGET, components);
    if missing.is_empty() {
        return Ok(());
    }
    let install: Vec<String> = missing
        .rustup_args()
        .iter()
        .map(|args| format!("rustup {}", args.join(" ")))
        .collect();
    if !host::program_exists("rustup") {
        return Err(XtaskError::MissingRust {
            what: describe(&missing),
            install: install.join(" && "),
        });
    }
    eprintln!(
        "xtask: the Rust toolchain at {} lacks {}; installing it: {}",
        sysroot.display(),
        describe(&missing),
        install.join(" && ")
    );
    for args in missing.rustup_args() {
        let mut command = Command::new("rustup");
        command.args(&args).current_dir(&ws.root);
        host::run(&mut command)?;
    }
    let still = self::missing(&sysroot, KERNEL_TARGET, components);
    if still.is_empty() {
        Ok(())
    } else {
        Err(XtaskError::MissingRust {
            what: describe(&still),
            install: install.join(" && "),
        })
    }
}

/// `the Rust target x86_64-unknown-none and the components rustfmt, clippy`.
fn describe(missing: &Missing) -> String {
    let mut parts = Vec::new();
    if let Some(target) = missing.target {
        parts.push(format!("the Rust target {target}"));
    }
    if !missing.components.is_empty() {
        let names: Vec<&str> = missing.components.iter().map(|c| c.name()).collect();
        parts.push(format!("the component(s) {}", names.join(", ")));
    }
    parts.join(" and ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysroot under the temp directory with the given files.
    fn sysroot_with(name: &str, files: &[&str]) -> PathBuf {
        let root = env::temp_dir().join(format!("xtask-sysroot-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for file in files {
            let path = root.join(file);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, b"").unwrap();
        }
        fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn a_toolchain_without_the_target_or_components_is_seen_as_such() {
        let bare = sysroot_with(
            "bare",
            &[
                "bin/rustc",
                "lib/rustlib/x86_64-unknown-linux-gnu/lib/libcore-1234.rlib",
                // A target directory without its core library is not installed.
                "lib/rustlib/x86_64-unknown-none/lib/README",
            ],
        );
        let all = [Component::Rustfmt, Component::Clippy];
        let missing = missing(&bare, KERNEL_TARGET, &all);
        assert_eq!(missing.target, Some("x86_64-unknown-none"));
        assert_eq!(missing.components, all);
        assert_eq!(
            missing.rustup_args(),
            vec![
                vec!["target", "add", "x86_64-unknown-none"],
                vec!["component", "add", "rustfmt", "clippy"]
            ]
        );
        assert_eq!(
            describe(&missing),
            "the Rust target x86_64-unknown-none and the component(s) rustfmt, clippy"
        );
        // `run` asks for no component: only the target is missing.
        assert_eq!(
            super::missing(&bare, KERNEL_TARGET, &[]).rustup_args(),
            vec![vec!["target", "add", "x86_64-unknown-none"]]
        );
        fs::remove_dir_all(bare).unwrap();
    }

    #[test]
    fn a_complete_toolchain_lacks_nothing() {
        let full = sysroot_with(
            "full",
            &[
                "bin/rustfmt",
                "bin/cargo-clippy",
                "lib/rustlib/x86_64-unknown-none/lib/libcore-abcd.rlib",
            ],
        );
        let missing = missing(
            &full,
            KERNEL_TARGET,
            &[Component::Rustfmt, Component::Clippy],
        );
        assert!(missing.is_empty(), "{missing:?}");
        assert!(missing.rustup_args().is_empty());
        fs::remove_dir_all(full).unwrap();
    }

    #[test]
    fn the_running_toolchain_has_the_kernel_target() {
        // The machine's toolchain is complete (rust-toolchain.toml): the real
        // sysroot must be read as such, or every run would call rustup.
        let ws = Workspace::from_env();
        let sysroot = sysroot(&ws).unwrap();
        assert!(has_target(&sysroot, KERNEL_TARGET), "{}", sysroot.display());
    }
}
