//! The kernel command line: copied out of the loader's memory, and checked
//! for what would otherwise be lost without a word.
//!
//! Invariant: a [`Cmdline`] holds at most [`CMDLINE_MAX`] bytes; whatever
//! it could not keep whole (a line longer than the buffer, bytes that are not
//! UTF-8) is recorded as a [`CmdlineProblem`], and the text it offers is the
//! longest prefix of whole words it did keep. Options are checked against a
//! table ([`OptionSpec`]): an unknown option under the table's prefix or a
//! bad value is an [`OptionWarning`], never silently ignored.

use core::fmt;

/// Longest command line kept, with its NUL (Xen's `MAX_GUEST_CMDLINE`).
pub const CMDLINE_MAX: usize = 1024;

/// Why a command line is not what the loader was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineProblem {
    /// No NUL within the buffer: the line went on beyond the `kept` bytes.
    Truncated {
        /// Bytes kept.
        kept: usize,
    },
    /// Bytes that are not UTF-8 from offset `at`: the line is cut there.
    NotUtf8 {
        /// Offset of the first bad byte.
        at: usize,
    },
}

impl fmt::Display for CmdlineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineProblem::Truncated { kept } => write!(
                f,
                "the command line is longer than {CMDLINE_MAX} bytes: only the first {kept} \
                 were kept and the options after them are lost"
            ),
            CmdlineProblem::NotUtf8 { at } => write!(
                f,
                "the command line is not UTF-8 from byte {at}: the options from there on are \
                 ignored"
            ),
        }
    }
}

/// A copied command line.
#[derive(Clone)]
pub struct Cmdline {
    bytes: [u8; CMDLINE_MAX],
    /// Length of the usable text: whole words of valid UTF-8.
    len: usize,
    problem: Option<CmdlineProblem>,
}

impl Cmdline {
    /// An empty command line.
    pub const fn empty() -> Self {
        Cmdline {
            bytes: [0; CMDLINE_MAX],
            len: 0,
            problem: None,
        }
    }

    /// Copies a NUL-terminated byte string. A source without a NUL in its
    /// first [`CMDLINE_MAX`] bytes (or in all of it, if shorter: the rest is
    /// not readable) is truncated; the last word, which may have been cut,
    /// is dropped rather than read as a different option.
    pub fn from_nul_terminated(src: &[u8]) -> Self {
        let mut line = Self::empty();
        let window = &src[..src.len().min(CMDLINE_MAX)];
        let (mut len, mut problem) = match window.iter().position(|&b| b == 0) {
            Some(nul) => (nul, None),
            None => {
                // Keep room for a NUL, as Xen's buffer does.
                let kept = window.len().min(CMDLINE_MAX - 1);
                let whole = window[..kept]
                    .iter()
                    .rposition(|b| b.is_ascii_whitespace())
                    .unwrap_or(0);
                (whole, Some(CmdlineProblem::Truncated { kept }))
            }
        };
        if let Err(error) = core::str::from_utf8(&window[..len]) {
            let at = error.valid_up_to();
            // Cut at the last whole word before the bad bytes.
            len = window[..at]
                .iter()
                .rposition(|b| b.is_ascii_whitespace())
                .unwrap_or(0);
            problem = problem.or(Some(CmdlineProblem::NotUtf8 { at }));
        }
        line.bytes[..len].copy_from_slice(&window[..len]);
        line.len = len;
        line.problem = problem;
        line
    }

    /// What was lost when the line was copied, if anything.
    pub fn problem(&self) -> Option<CmdlineProblem> {
        self.problem
    }

    /// The text kept (whole words of valid UTF-8).
    pub fn as_str(&self) -> &str {
        // The constructor keeps only a valid UTF-8 prefix; an error is
        // impossible and would show as an empty line.
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }

    /// Whitespace-separated words.
    pub fn words(&self) -> impl Iterator<Item = &str> {
        self.as_str().split_ascii_whitespace()
    }

    /// The value of the first `name=value` word.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.words()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// Whether the flag `name` is set (`name`, or `name=` one of
    /// [`FLAG_ON`]).
    pub fn flag(&self, name: &str) -> bool {
        self.words().any(|w| match w.split_once('=') {
            None => w == name,
            Some((k, v)) => k == name && FLAG_ON.contains(&v),
        })
    }

    /// The warnings for the words under `prefix` (such as `pvmmu.`) that
    /// `specs` does not accept.
    pub fn check_options<'a>(
        &'a self,
        prefix: &'a str,
        specs: &'a [OptionSpec],
    ) -> impl Iterator<Item = OptionWarning<'a>> + 'a {
        self.words()
            .filter(move |w| w.starts_with(prefix))
            .filter_map(move |word| {
                let (name, value) = match word.split_once('=') {
                    Some((name, value)) => (name, Some(value)),
                    None => (word, None),
                };
                let Some(spec) = specs.iter().find(|s| s.name == name) else {
                    return Some(OptionWarning::Unknown { word });
                };
                let accepted = match (spec.kind, value) {
                    (OptionKind::Flag, None) => true,
                    (OptionKind::Flag, Some(v)) => FLAG_ON.contains(&v) || FLAG_OFF.contains(&v),
                    (OptionKind::Choice(_), None) => false,
                    (OptionKind::Choice(choices), Some(v)) => choices.contains(&v),
                    (OptionKind::Number, None) => false,
                    (OptionKind::Number, Some(v)) => parse_number(v).is_some(),
                };
                (!accepted).then_some(OptionWarning::BadValue {
                    name,
                    value: value.unwrap_or(""),
                    spec: *spec,
                })
            })
    }
}

impl fmt::Debug for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Values that turn a flag on.
pub const FLAG_ON: [&str; 4] = ["1", "on", "yes", "true"];

/// Values that leave a flag off.
pub const FLAG_OFF: [&str; 4] = ["0", "off", "no", "false"];

/// What values an option takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionKind {
    /// `name`, or `name=` one of [`FLAG_ON`] / [`FLAG_OFF`].
    Flag,
    /// `name=` one of these values.
    Choice(&'static [&'static str]),
    /// `name=` a 64-bit number, decimal or `0x` hexadecimal.
    Number,
}

/// A 64-bit number written in decimal or with a `0x` prefix in hex.
pub fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// One option a kernel accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionSpec {
    /// The full name (`pvmmu.crash`).
    pub name: &'static str,
    /// Its values.
    pub kind: OptionKind,
}

/// An option word that is not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionWarning<'a> {
    /// No option of that name.
    Unknown {
        /// The word.
        word: &'a str,
    },
    /// A known option with a value it does not take.
    BadValue {
        /// The option.
        name: &'a str,
        /// The value given (empty if none).
        value: &'a str,
        /// What it takes.
        spec: OptionSpec,
    },
}

impl fmt::Display for OptionWarning<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionWarning::Unknown { word } => write!(f, "unknown option `{word}` ignored"),
            OptionWarning::BadValue { name, value, spec } => {
                write!(f, "`{name}={value}` is not a valid value; {name} takes ")?;
                match spec.kind {
                    OptionKind::Flag => write!(f, "no value (or 1/0, on/off, yes/no, true/false)"),
                    OptionKind::Number => write!(f, "a number (decimal or 0x hex)"),
                    OptionKind::Choice(choices) => {
                        for (i, c) in choices.iter().enumerate() {
                            let sep = if i == 0 { "" } else { "|" };
                            write!(f, "{sep}{c}")?;
                        }
                        Ok(())
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;
    use std::vec::Vec;

    const SPECS: &[OptionSpec] = &[
        OptionSpec {
            name: "pvmmu.fail_selftest",
            kind: OptionKind::Flag,
        },
        OptionSpec {
            name: "pvmmu.crash",
            kind: OptionKind::Choice(&["panic", "ud", "pf", "stack"]),
        },
        OptionSpec {
            name: "pvmmu.seed",
            kind: OptionKind::Number,
        },
    ];

    fn line(bytes: &[u8]) -> Cmdline {
        Cmdline::from_nul_terminated(bytes)
    }

    #[test]
    fn a_terminated_line_is_kept_whole() {
        let l = line(b"a=1 pvmmu.fail_selftest\0garbage");
        assert_eq!(l.as_str(), "a=1 pvmmu.fail_selftest");
        assert_eq!(l.problem(), None);
        assert!(l.flag("pvmmu.fail_selftest"));
        assert_eq!(l.value("a"), Some("1"));
        // A 1023-byte line and its NUL fill Xen's buffer exactly: intact.
        let mut full = [b'x'; CMDLINE_MAX];
        full[CMDLINE_MAX - 1] = 0;
        assert_eq!(line(&full).problem(), None);
        assert_eq!(line(&full).as_str().len(), CMDLINE_MAX - 1);
    }

    #[test]
    fn a_line_without_nul_is_truncated_and_says_so() {
        let mut src = Vec::new();
        while src.len() < 2000 {
            src.extend_from_slice(b"pvmmu.fail_selftest ");
        }
        let l = line(&src);
        assert_eq!(
            l.problem(),
            Some(CmdlineProblem::Truncated {
                kept: CMDLINE_MAX - 1
            })
        );
        // Only whole words are offered: the cut one is dropped.
        assert!(l.words().all(|w| w == "pvmmu.fail_selftest"));
        assert!(l.as_str().len() < CMDLINE_MAX - 1);
        assert!(l
            .problem()
            .unwrap()
            .to_string()
            .contains("longer than 1024"));
        // A short source without NUL (the rest unreadable) is truncated too.
        assert_eq!(
            line(b"abc def").problem(),
            Some(CmdlineProblem::Truncated { kept: 7 })
        );
        assert_eq!(line(b"abc def").as_str(), "abc");
    }

    #[test]
    fn a_cut_through_a_utf8_character_keeps_the_options_before_it() {
        // `é` is two bytes; put its first byte at the last kept position.
        let mut src = Vec::new();
        src.extend_from_slice(b"pvmmu.fail_selftest ");
        while src.len() < CMDLINE_MAX - 2 {
            src.push(b'a');
        }
        src.extend_from_slice("é tail".as_bytes());
        let l = line(&src);
        assert!(matches!(
            l.problem(),
            Some(CmdlineProblem::Truncated { .. })
        ));
        assert_eq!(l.as_str(), "pvmmu.fail_selftest");
        assert!(
            l.flag("pvmmu.fail_selftest"),
            "the option before the cut was lost"
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_are_reported() {
        let l = line(b"pvmmu.fail_selftest x\xffy z\0");
        assert_eq!(l.problem(), Some(CmdlineProblem::NotUtf8 { at: 21 }));
        assert_eq!(l.as_str(), "pvmmu.fail_selftest");
        assert!(l.flag("pvmmu.fail_selftest"));
    }

    #[test]
    fn unknown_options_and_bad_values_are_warnings() {
        let l = line(
            b"pvmmu.fail_selftest=on pvmmu.crash=bogus pvmmu.bogus other.x pvmmu.crash \
              pvmmu.fail_selftest=maybe pvmmu.crash=ud\0",
        );
        let warnings: Vec<_> = l.check_options("pvmmu.", SPECS).collect();
        let text: Vec<_> = warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "`pvmmu.crash=bogus` is not a valid value; pvmmu.crash takes panic|ud|pf|stack",
                "unknown option `pvmmu.bogus` ignored",
                "`pvmmu.crash=` is not a valid value; pvmmu.crash takes panic|ud|pf|stack",
                "`pvmmu.fail_selftest=maybe` is not a valid value; pvmmu.fail_selftest takes no \
                 value (or 1/0, on/off, yes/no, true/false)",
            ]
        );
        assert_eq!(
            line(b"pvmmu.crash=pf a b\0")
                .check_options("pvmmu.", SPECS)
                .count(),
            0
        );
    }
}
