//! The kernel's self-test lines (`selftest <name> ... ok`, `... FAIL: why`,
//! `... skipped (why)`), read back from a boot's console, and the check that
//! a boot ran every self-test a native boot passed.
//!
//! Invariant: a line counts only if it is exactly one self-test line (after
//! trimming the console's `\r`); the comparison names every self-test that
//! is missing, failed or skipped, never just a count.

use std::collections::BTreeSet;

/// How one self-test ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `... ok`.
    Passed,
    /// `... FAIL: ...`.
    Failed,
    /// `... skipped (...)`.
    Skipped,
}

/// One self-test line split into its name and outcome.
pub fn parse_line(line: &str) -> Option<(&str, Outcome)> {
    let rest = line.trim_end_matches('\r').strip_prefix("selftest ")?;
    let (name, result) = rest.split_once(" ... ")?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    let outcome = if result == "ok" {
        Outcome::Passed
    } else if result.starts_with("FAIL") {
        Outcome::Failed
    } else if result.starts_with("skipped") {
        Outcome::Skipped
    } else {
        return None;
    };
    Some((name, outcome))
}

/// The names of the self-tests with `outcome` in a console transcript.
pub fn with_outcome(transcript: &[String], outcome: Outcome) -> BTreeSet<String> {
    transcript
        .iter()
        .filter_map(|line| parse_line(line))
        .filter(|(_, o)| *o == outcome)
        .map(|(name, _)| name.to_string())
        .collect()
}

/// `Ok` if every self-test in `native_passed` passed in `transcript` too;
/// else the names that did not, with how they ended.
pub fn compare_with_native(
    native_passed: &BTreeSet<String>,
    transcript: &[String],
) -> Result<(), String> {
    if native_passed.is_empty() {
        return Err(
            "no native self-tests to compare with (the plain native row must pass first)".into(),
        );
    }
    let passed = with_outcome(transcript, Outcome::Passed);
    let failed = with_outcome(transcript, Outcome::Failed);
    let skipped = with_outcome(transcript, Outcome::Skipped);
    let missing: Vec<String> = native_passed
        .difference(&passed)
        .map(|name| {
            let how = if failed.contains(name) {
                "failed"
            } else if skipped.contains(name) {
                "skipped"
            } else {
                "not run"
            };
            format!("{name} ({how})")
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of the {} self-tests that pass natively did not pass here: {}",
            missing.len(),
            native_passed.len(),
            missing.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn lines_are_parsed_strictly() {
        assert_eq!(
            parse_line("selftest dm_every_ram_page_readable ... ok\r"),
            Some(("dm_every_ram_page_readable", Outcome::Passed))
        );
        assert_eq!(
            parse_line("selftest fail_knob ... FAIL: knob: got 0x1, expected 0x0"),
            Some(("fail_knob", Outcome::Failed))
        );
        assert_eq!(
            parse_line("selftest start_info_magic ... skipped (platform)"),
            Some(("start_info_magic", Outcome::Skipped))
        );
        assert_eq!(parse_line("[INFO ] selftest x ... ok"), None);
        assert_eq!(parse_line("selftest x ... okay"), None);
        assert_eq!(parse_line("selftest two words ... ok"), None);
        assert_eq!(parse_line("selftest  ... ok"), None);
    }

    #[test]
    fn every_native_pass_must_pass_here() {
        let native = with_outcome(
            &lines(
                "selftest a ... ok\nselftest b ... ok\nselftest c ... ok\n\
                 selftest pv_only ... skipped (platform)",
            ),
            Outcome::Passed,
        );
        assert_eq!(native.len(), 3);
        // More tests here than natively is fine.
        let superset = lines(
            "selftest a ... ok\r\nselftest b ... ok\nselftest c ... ok\nselftest xen_pvh_x ... ok",
        );
        assert_eq!(compare_with_native(&native, &superset), Ok(()));
        let worse = lines("selftest a ... ok\nselftest b ... FAIL: no\nselftest c ... skipped (x)");
        assert_eq!(
            compare_with_native(&native, &worse),
            Err("2 of the 3 self-tests that pass natively did not pass here: b (failed), c (skipped)"
                .into())
        );
        let short = lines("selftest a ... ok\nselftest b ... ok");
        assert!(compare_with_native(&native, &short)
            .unwrap_err()
            .contains("c (not run)"));
        assert!(compare_with_native(&BTreeSet::new(), &superset).is_err());
    }
}
