//! The requirement map, `schemas/requirements.toml`: every requirement of the seed documents the
//! cell answers to, how the cell meets it, where that lives, which tests prove it and which
//! audit kinds evidence it. The evidence report reads it, and so do the build (an applicable
//! requirement without a test, or one that does not apply without a reason, stops the build;
//! see `build.rs`) and the end-to-end test that checks every named test exists.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The map as the repository holds it, compiled into the station.
pub const MAP_TOML: &str = include_str!("../../../schemas/requirements.toml");

/// The whole map.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Map {
    /// The seed documents, by short name.
    pub documents: BTreeMap<String, Document>,
    /// Every requirement, in the documents' order.
    #[serde(rename = "requirement")]
    pub requirements: Vec<Requirement>,
}

/// A seed document.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Its title.
    pub title: String,
    /// Where it was read.
    pub source: String,
}

/// One requirement.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    /// Its id, unique across the map (e.g. `SMCG-A.1`).
    pub id: String,
    /// The document's short name (a key of `documents`).
    pub document: String,
    /// The requirement's text, as the document words it (or a faithful summary, marked so).
    pub text: String,
    /// Whether it applies to a provisioning cell.
    pub applies: bool,
    /// How the cell meets it (applicable), or why it does not apply.
    #[serde(default)]
    pub how: String,
    /// Why it does not apply to a provisioning cell (required when `applies = false`).
    #[serde(default)]
    pub reason: String,
    /// Where it lives: files or modules of the repository.
    #[serde(default, rename = "where")]
    pub places: Vec<String>,
    /// The tests that prove it: `path/to/file.rs::test_name`.
    #[serde(default)]
    pub tests: Vec<String>,
    /// The audit kinds that evidence it.
    #[serde(default)]
    pub audit: Vec<String>,
    /// The report's checks of this batch that bear on it (see [`super::Check`]).
    #[serde(default)]
    pub checks: Vec<String>,
}

/// Why a map is not acceptable.
pub fn problems(map: &Map) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for r in &map.requirements {
        if !seen.insert(r.id.as_str()) {
            out.push(format!("{}: the id appears twice", r.id));
        }
        if !map.documents.contains_key(&r.document) {
            out.push(format!("{}: unknown document {:?}", r.id, r.document));
        }
        if r.text.trim().is_empty() {
            out.push(format!("{}: no text", r.id));
        }
        if r.applies {
            if r.tests.is_empty() {
                out.push(format!("{}: applies, but no test proves it", r.id));
            }
            if r.how.trim().is_empty() {
                out.push(format!(
                    "{}: applies, but says not how the cell meets it",
                    r.id
                ));
            }
            for t in &r.tests {
                if !t.contains("::") {
                    out.push(format!("{}: test {t:?} is not FILE::NAME", r.id));
                }
            }
            for c in &r.checks {
                if !super::Check::NAMES.contains(&c.as_str()) {
                    out.push(format!("{}: unknown check {c:?}", r.id));
                }
            }
        } else if r.reason.trim().is_empty() {
            out.push(format!("{}: does not apply, but says not why", r.id));
        }
    }
    out
}

/// SHA-256 of the map compiled into the station (hex): which map a report was made with.
pub fn map_sha256() -> String {
    hex::encode(line_protocol::crypto::sha256(MAP_TOML.as_bytes()))
}

/// The map compiled into the station.
pub fn map() -> Result<Map, String> {
    let map: Map =
        toml::from_str(MAP_TOML).map_err(|e| format!("schemas/requirements.toml: {e}"))?;
    let p = problems(&map);
    if p.is_empty() {
        Ok(map)
    } else {
        Err(format!("schemas/requirements.toml: {}", p.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_map_parses_and_holds_every_rule() {
        let m = map().unwrap();
        assert!(m.requirements.len() > 20);
        assert!(m.requirements.iter().any(|r| !r.applies));
    }

    #[test]
    fn a_requirement_without_a_test_or_a_reason_is_refused() {
        let bad = r#"
[documents.X]
title = "x"
source = "x"
[[requirement]]
id = "X.1"
document = "X"
text = "shall"
applies = true
how = "somehow"
[[requirement]]
id = "X.2"
document = "X"
text = "shall"
applies = false
[[requirement]]
id = "X.1"
document = "Y"
text = "shall"
applies = true
how = "so"
tests = ["nowhere"]
checks = ["magic"]
"#;
        let m: Map = toml::from_str(bad).unwrap();
        let p = problems(&m).join("\n");
        assert!(p.contains("X.1: applies, but no test proves it"), "{p}");
        assert!(p.contains("X.2: does not apply, but says not why"), "{p}");
        assert!(p.contains("X.1: the id appears twice"), "{p}");
        assert!(p.contains("unknown document \"Y\""), "{p}");
        assert!(p.contains("is not FILE::NAME"), "{p}");
        assert!(p.contains("unknown check \"magic\""), "{p}");
    }
}
