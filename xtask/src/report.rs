//! The guest kernel's report and result lines (format fixed in DESIGN.md).
//!
//! Invariant: a [`Report`] only exists if its JSON object holds every required
//! key with the right type; the whole object is kept so that later checks (per-
//! GiB bounds, `xen_domain`, …) can read keys this module does not know about.
//! The markers are searched anywhere in a console line, because Xen may put a
//! prefix such as `(d1) ` in front of a guest's output.

use std::fmt;

use serde_json::{Map, Value};

/// Marker of the report line: `PVMMU-REPORT {json}`.
pub const REPORT_MARKER: &str = "PVMMU-REPORT ";

/// Marker of the result line: `PVMMU-RESULT PASS|FAIL`.
pub const RESULT_MARKER: &str = "PVMMU-RESULT ";

/// Keys every report must hold as unsigned integers.
pub const REQUIRED_COUNTERS: [&str; 8] = [
    "mem_mib",
    "pages_mapped",
    "tables_created",
    "hypercalls",
    "mmu_update_entries",
    "map_cycles",
    "selftests_passed",
    "selftests_failed",
];

/// A parsed `PVMMU-REPORT` line.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// `platform`: "xen-pv", "xen-pvh", "native", …
    pub platform: String,
    /// The whole JSON object, required keys included.
    pub fields: Map<String, Value>,
}

impl Report {
    /// An unsigned counter of the report; `None` if absent or not a `u64`.
    pub fn counter(&self, key: &str) -> Option<u64> {
        self.fields.get(key).and_then(Value::as_u64)
    }

    /// A one-line summary of the main counters, for tables.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("platform={}", self.platform)];
        for key in [
            "mem_mib",
            "pages_mapped",
            "tables_created",
            "hypercalls",
            "mmu_update_entries",
            "selftests_passed",
            "selftests_failed",
        ] {
            if let Some(value) = self.counter(key) {
                parts.push(format!("{key}={value}"));
            }
        }
        parts.join(" ")
    }
}

/// Why a report line was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReportError {
    /// The text after the marker is not JSON.
    Json(String),
    /// The JSON is not an object.
    NotAnObject,
    /// A required key is absent.
    MissingKey(&'static str),
    /// A required key has the wrong type.
    WrongType {
        /// The key.
        key: &'static str,
        /// What it should be.
        expected: &'static str,
    },
}

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReportError::Json(reason) => write!(f, "not valid JSON: {reason}"),
            ReportError::NotAnObject => write!(f, "not a JSON object"),
            ReportError::MissingKey(key) => write!(f, "missing key `{key}`"),
            ReportError::WrongType { key, expected } => {
                write!(f, "key `{key}` is not {expected}")
            }
        }
    }
}

/// The result line's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultLine {
    /// `PVMMU-RESULT PASS`.
    Pass,
    /// `PVMMU-RESULT FAIL`.
    Fail,
    /// `PVMMU-RESULT` followed by anything else.
    Garbled,
}

/// The JSON text of a report line, if `line` is one.
pub fn report_json(line: &str) -> Option<&str> {
    line.find(REPORT_MARKER)
        .map(|at| line[at + REPORT_MARKER.len()..].trim())
}

/// The verdict of a result line, if `line` is one.
pub fn result_line(line: &str) -> Option<ResultLine> {
    let at = line.find(RESULT_MARKER)?;
    Some(match line[at + RESULT_MARKER.len()..].trim() {
        "PASS" => ResultLine::Pass,
        "FAIL" => ResultLine::Fail,
        _ => ResultLine::Garbled,
    })
}

/// Parses and checks the JSON of a report line.
pub fn parse_report(json: &str) -> Result<Report, ReportError> {
    let value: Value =
        serde_json::from_str(json).map_err(|error| ReportError::Json(error.to_string()))?;
    let Value::Object(fields) = value else {
        return Err(ReportError::NotAnObject);
    };
    let platform = match fields.get("platform") {
        None => return Err(ReportError::MissingKey("platform")),
        Some(Value::String(platform)) => platform.clone(),
        Some(_) => {
            return Err(ReportError::WrongType {
                key: "platform",
                expected: "a string",
            })
        }
    };
    for key in REQUIRED_COUNTERS {
        match fields.get(key) {
            None => return Err(ReportError::MissingKey(key)),
            Some(value) if value.as_u64().is_none() => {
                return Err(ReportError::WrongType {
                    key,
                    expected: "an unsigned integer",
                })
            }
            Some(_) => {}
        }
    }
    Ok(Report { platform, fields })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"platform":"xen-pv","mem_mib":512,"pages_mapped":131072,"tables_created":260,"hypercalls":9,"mmu_update_entries":540,"map_cycles":123456789,"selftests_passed":12,"selftests_failed":0,"xen_domain":"dom0"}"#;

    #[test]
    fn finds_markers_behind_a_prefix() {
        let line = format!("(d1) PVMMU-REPORT {GOOD}\r");
        assert_eq!(report_json(&line), Some(GOOD));
        assert_eq!(report_json("PVMMU-RESULT PASS"), None);
        assert_eq!(
            result_line("(d1) PVMMU-RESULT PASS\r"),
            Some(ResultLine::Pass)
        );
        assert_eq!(result_line("PVMMU-RESULT FAIL"), Some(ResultLine::Fail));
        assert_eq!(result_line("PVMMU-RESULT MAYBE"), Some(ResultLine::Garbled));
        assert_eq!(result_line("PVMMU-RESULT"), None);
        assert_eq!(result_line("all tests PASS"), None);
    }

    #[test]
    fn parses_a_full_report_and_keeps_extra_keys() {
        let report = parse_report(GOOD).unwrap();
        assert_eq!(report.platform, "xen-pv");
        assert_eq!(report.counter("pages_mapped"), Some(131072));
        assert_eq!(report.counter("selftests_failed"), Some(0));
        assert_eq!(
            report.fields.get("xen_domain").and_then(Value::as_str),
            Some("dom0")
        );
        assert!(report.summary().contains("hypercalls=9"));
    }

    #[test]
    fn refuses_every_missing_key() {
        let full: Map<String, Value> = serde_json::from_str(GOOD).unwrap();
        for key in std::iter::once("platform").chain(REQUIRED_COUNTERS) {
            let mut partial = full.clone();
            partial.remove(key);
            let json = Value::Object(partial).to_string();
            assert_eq!(
                parse_report(&json),
                Err(ReportError::MissingKey(match key {
                    "platform" => "platform",
                    _ => REQUIRED_COUNTERS.iter().find(|k| **k == key).unwrap(),
                })),
                "without {key}"
            );
        }
    }

    #[test]
    fn refuses_wrong_types_and_bad_json() {
        let negative = GOOD.replace(r#""hypercalls":9"#, r#""hypercalls":-1"#);
        assert_eq!(
            parse_report(&negative),
            Err(ReportError::WrongType {
                key: "hypercalls",
                expected: "an unsigned integer"
            })
        );
        let numeric_platform = GOOD.replace(r#""xen-pv""#, "7");
        assert_eq!(
            parse_report(&numeric_platform),
            Err(ReportError::WrongType {
                key: "platform",
                expected: "a string"
            })
        );
        assert_eq!(parse_report("[1,2]"), Err(ReportError::NotAnObject));
        assert!(matches!(
            parse_report(r#"{"platform":"native","#),
            Err(ReportError::Json(_))
        ));
    }
}
