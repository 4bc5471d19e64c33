//! What one boot is: the kernel, the run's options, the echo and the label
//! that names its messages and its log file.
//!
//! Invariant: this module depends on nothing that boots (`boot`, `xl`), so
//! both can take a [`BootRequest`] without importing each other; a label is
//! always a safe, bounded file name whatever the command line.

use std::path::PathBuf;

use crate::cli::{RunOptions, XenVersion};
use crate::harness::{BootSpec, Echo};
use crate::host;
use crate::qemu;
use crate::workspace::Workspace;

/// A boot to perform: which kernel, how, and what to show.
#[derive(Clone, Debug)]
pub struct BootRequest {
    /// The guest kernel ELF.
    pub kernel: PathBuf,
    /// Mode, memory, command line, timeout.
    pub options: RunOptions,
    /// What the terminal shows.
    pub echo: Echo,
    /// Name for messages and the log file.
    pub label: String,
}

impl BootRequest {
    /// The harness parameters for a QEMU command line built for this request.
    pub fn spec(&self, ws: &Workspace, args: Vec<String>) -> BootSpec {
        BootSpec {
            label: self.label.clone(),
            program: qemu::program(),
            args,
            timeout: self.options.timeout(),
            echo: self.echo,
            log_path: ws.logs_dir().join(format!("{}.log", self.label)),
        }
    }
}

/// The longest label, so that `<label>.log` is a valid file name whatever
/// the command line (file names end at 255 bytes).
pub const LABEL_MAX: usize = 64;

/// A label such as `xen-512` or `native-512-fail_selftest`: the mode, the
/// memory and the kernel command line's words, safe as a file name (ASCII
/// letters, digits, `-` and `_` only). A label that would be longer than
/// [`LABEL_MAX`] is cut and ends in a hash of the whole command line, so
/// two long command lines still get two logs.
pub fn label(options: &RunOptions) -> String {
    let cmdline = options.kernel_cmdline();
    let mut label = options.mode.name().to_string();
    if options.guest != crate::xl::guest::Guest::Pv {
        label.push('-');
        label.push_str(options.guest.name());
    }
    label.push_str(&format!("-{}", options.memory_mib));
    if options.smp > 1 {
        label.push_str(&format!("-smp{}", options.smp));
    }
    if options.xen != XenVersion::V4_17 {
        label.push_str("-xen");
        label.push_str(&options.xen.name().replace('.', "_"));
    }
    for word in cmdline.split_whitespace() {
        let word = word.strip_prefix("pvmmu.").unwrap_or(word);
        label.push('-');
        label.extend(
            word.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
        );
    }
    if label.len() > LABEL_MAX {
        let hash = format!("-{:016x}", host::fnv1a(cmdline.as_bytes()));
        // Only ASCII is left, so any byte index is a char boundary.
        label.truncate(LABEL_MAX - hash.len());
        label.push_str(&hash);
    }
    label
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Mode;

    #[test]
    fn labels_are_distinct_per_boot_kind() {
        let plain = RunOptions {
            mode: Mode::Xen,
            memory_mib: 256,
            ..RunOptions::default()
        };
        assert_eq!(label(&plain), "xen-256");
        let failing = RunOptions {
            fail_selftest: true,
            ..plain.clone()
        };
        assert_eq!(label(&failing), "xen-256-fail_selftest");
        let pvh = RunOptions {
            mode: Mode::Xl,
            guest: crate::xl::guest::Guest::Pvh,
            ..plain.clone()
        };
        assert_eq!(label(&pvh), "xl-pvh-256");
        let with_cmdline = RunOptions {
            mode: Mode::Native,
            cmdline: "pvmmu.small_pages log=a/b".into(),
            ..plain
        };
        assert_eq!(label(&with_cmdline), "native-256-small_pages-log_a_b");
        let smp = RunOptions {
            mode: Mode::Xen,
            memory_mib: 512,
            smp: 4,
            ..RunOptions::default()
        };
        assert_eq!(label(&smp), "xen-512-smp4");
    }

    #[test]
    fn labels_are_bounded_and_safe_whatever_the_command_line() {
        let long = |tail: &str| RunOptions {
            mode: Mode::Native,
            cmdline: format!("{} é/../\\x {tail}", "pvmmu.option=value ".repeat(200)),
            ..RunOptions::default()
        };
        let a = label(&long("a"));
        let b = label(&long("b"));
        assert!(a.len() <= LABEL_MAX, "{a}");
        assert!(a.starts_with("native-512-option_value-"), "{a}");
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{a}"
        );
        assert_ne!(a, b, "two long command lines share a log");
        let unicode = RunOptions {
            cmdline: "ü".repeat(300),
            ..RunOptions::default()
        };
        assert!(label(&unicode).len() <= LABEL_MAX);
    }
}
