//! Building the guest kernel (and running cargo in general).
//!
//! Invariant: cargo is always the one that started the xtask (`$CARGO`), run
//! from the workspace root with the caller's environment, so the xtask builds
//! with the toolchain of `rust-toolchain.toml` and into the target directory
//! that [`Workspace`] computed.

use std::env;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use crate::cli::Profile;
use crate::error::XtaskError;
use crate::host;
use crate::toolchain;
use crate::workspace::{Workspace, KERNEL_PACKAGE, KERNEL_TARGET};

/// A `cargo` command run from the workspace root.
pub fn cargo(ws: &Workspace) -> Command {
    let program = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(program);
    command.current_dir(&ws.root);
    command.env("CARGO_TARGET_DIR", &ws.target_dir);
    command
}

/// The cargo arguments that build the guest kernel.
pub fn kernel_build_args(profile: Profile) -> Vec<&'static str> {
    let mut args = vec!["build", "-p", KERNEL_PACKAGE, "--target", KERNEL_TARGET];
    if profile == Profile::Release {
        args.push("--release");
    }
    args
}

/// Builds the guest kernel and returns the path of its ELF.
/// A missing kernel target is added first (see [`toolchain::ensure`]).
pub fn kernel(ws: &Workspace, profile: Profile) -> Result<PathBuf, XtaskError> {
    toolchain::ensure(ws, &[])?;
    let mut command = cargo(ws);
    command.args(kernel_build_args(profile));
    eprintln!("xtask: $ {}", host::describe(&command));
    host::run(&mut command)?;
    let elf = ws.kernel_elf(profile);
    if elf.is_file() {
        Ok(elf)
    } else {
        Err(XtaskError::MissingArtifact { path: elf })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_built_for_the_bare_metal_target() {
        assert_eq!(
            kernel_build_args(Profile::Release).join(" "),
            "build -p guest-kernel --target x86_64-unknown-none --release"
        );
        assert_eq!(
            kernel_build_args(Profile::Debug).join(" "),
            "build -p guest-kernel --target x86_64-unknown-none"
        );
    }
}
