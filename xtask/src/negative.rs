//! The negative suite's cross-check: the requests Xen must refuse, answered
//! by the host model of Xen and by real Xen (the guest kernel under
//! `--mode xen`), must get the same error numbers, line for line.
//!
//! Invariant: a comparison passes only if both lists are non-empty and equal
//! in length, order and content; anything else names the first difference.

use std::process::Stdio;

use crate::build;
use crate::error::XtaskError;
use crate::host;
use crate::workspace::Workspace;

/// Marker of a negative-suite line: `NEGATIVE <name> <errno-name> <errno>`.
pub const NEGATIVE_MARKER: &str = "NEGATIVE ";

/// The negative-suite lines of a console transcript (text from the marker on,
/// so that a `(d1) ` prefix does not count).
pub fn lines(transcript: &[String]) -> Vec<String> {
    transcript
        .iter()
        .filter_map(|line| {
            line.find(NEGATIVE_MARKER)
                .map(|at| line[at..].trim().to_string())
        })
        .collect()
}

/// The model's answers: the output of the `negative-model` binary.
pub fn model_lines(ws: &Workspace) -> Result<Vec<String>, XtaskError> {
    let mut command = build::cargo(ws);
    command
        .args([
            "run",
            "--quiet",
            "-p",
            "pvmmu-tests",
            "--bin",
            "negative-model",
        ])
        .stderr(Stdio::inherit());
    let text = host::stdout_of(&mut command)?;
    Ok(lines(&text.lines().map(str::to_string).collect::<Vec<_>>()))
}

/// Compares the model's list with real Xen's.
pub fn compare(model: &[String], xen: &[String]) -> Result<(), String> {
    if model.is_empty() {
        return Err("the model printed no NEGATIVE lines".into());
    }
    if xen.is_empty() {
        return Err("the kernel printed no NEGATIVE lines under Xen".into());
    }
    if let Some((index, (m, x))) = model.iter().zip(xen).enumerate().find(|(_, (m, x))| m != x) {
        return Err(format!(
            "negative suite differs at case {}: model `{m}`, Xen `{x}`",
            index + 1
        ));
    }
    if model.len() != xen.len() {
        return Err(format!(
            "negative suite: the model answered {} cases, Xen {}",
            model.len(),
            xen.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(lines: &[&str]) -> Vec<String> {
        lines.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn extracts_lines_behind_prefixes() {
        let transcript = owned(&[
            "(XEN) d0 has maximum 208 PIRQs",
            "NEGATIVE map-pinned-l1-rw EBUSY 16",
            "(d1) NEGATIVE pin-twice EINVAL 22\r",
            "selftest negative ... ok",
        ]);
        assert_eq!(
            lines(&transcript),
            owned(&[
                "NEGATIVE map-pinned-l1-rw EBUSY 16",
                "NEGATIVE pin-twice EINVAL 22"
            ])
        );
    }

    #[test]
    fn comparison() {
        let model = owned(&["NEGATIVE a EBUSY 16", "NEGATIVE b EINVAL 22"]);
        assert_eq!(compare(&model, &model.clone()), Ok(()));
        let differs = owned(&["NEGATIVE a EBUSY 16", "NEGATIVE b OK 0"]);
        let why = compare(&model, &differs).unwrap_err();
        assert!(
            why.contains("case 2") && why.contains("NEGATIVE b OK 0"),
            "{why}"
        );
        let short = owned(&["NEGATIVE a EBUSY 16"]);
        assert!(compare(&model, &short)
            .unwrap_err()
            .contains("answered 2 cases, Xen 1"));
        assert!(compare(&model, &[])
            .unwrap_err()
            .contains("no NEGATIVE lines under Xen"));
        assert!(compare(&[], &model)
            .unwrap_err()
            .contains("model printed no"));
    }
}
