//! The configuration contract: `schemas/config.schema.json` checked with an independent
//! validator (Python's jsonschema) against the example configuration and the files the cell
//! writes, and the station's own loader agreeing with the schema on what it refuses.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::path::{Path, PathBuf};

fn schemas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

/// Validates `toml_text` against the config schema with Python's jsonschema; Ok or the message.
fn python_validate(toml_text: &str) -> Result<(), String> {
    let value: serde_json::Value =
        toml::from_str(toml_text).map_err(|e| format!("not TOML: {e}"))?;
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("doc.json");
    std::fs::write(&doc, serde_json::to_string(&value).unwrap()).unwrap();
    e2e::validate_with_jsonschema(&schemas().join("config.schema.json"), &doc)
}

fn station_parse(text: &str) -> Result<(), String> {
    station::config::Config::parse(Path::new("/cell/station.toml"), text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn the_example_configuration_is_valid_for_both() {
    let text = std::fs::read_to_string(schemas().join("station.example.toml")).unwrap();
    python_validate(&text).unwrap();
    station_parse(&text).unwrap();
}

/// The example with its `[plc]` and `[fleet]` sections switched on (the commented settings from
/// `# [plc]` on).
fn with_fleet(example: &str) -> String {
    let mut on = false;
    example
        .lines()
        .map(|l| {
            on |= l == "# [plc]";
            match l.strip_prefix("# ") {
                Some(rest) if on && (rest.starts_with('[') || rest.contains(" = ")) => rest,
                _ => l,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_example_with_a_registry_is_valid_for_both() {
    let text =
        with_fleet(&std::fs::read_to_string(schemas().join("station.example.toml")).unwrap());
    assert!(text.contains("\n[fleet]\nhost = "), "{text}");
    assert!(text.contains("\n[plc]\nlisten = "), "{text}");
    assert!(text.contains("\n[labels]\nprinter = "), "{text}");
    python_validate(&text).unwrap();
    let cfg = station_parse(&text);
    assert!(cfg.is_ok(), "{cfg:?}");
    for (what, bad) in [
        (
            "no host",
            text.replace("host = \"registry.plant.example\"\n", ""),
        ),
        (
            "a password",
            text.replace(
                "lease_block = 10000",
                "lease_block = 10000\npassword = \"x\"",
            ),
        ),
        (
            "an empty lease",
            text.replace("lease_block = 10000", "lease_block = 0"),
        ),
        (
            "a printer without a port",
            text.replace("printer = \"10.20.0.30:9100\"", "printer = \"10.20.0.30\""),
        ),
        (
            "a PLC from anywhere",
            text.replace("allow = [\"10.20.0.10\"]", "allow = []"),
        ),
        (
            "a PLC that starts the line",
            text.replace("start = \"plc\"", "start = \"line\""),
        ),
    ] {
        assert!(python_validate(&bad).is_err(), "the schema takes {what}");
        assert!(station_parse(&bad).is_err(), "the station takes {what}");
    }
}

#[test]
fn bad_configurations_are_refused_by_both() {
    let good = std::fs::read_to_string(schemas().join("station.example.toml")).unwrap();
    let cases = [
        (
            "unknown key",
            good.replace("window = 16", "window = 16\nwindoww = 3"),
        ),
        (
            "lower-case FLAG ID",
            good.replace("flag_id = \"EXM\"", "flag_id = \"exm\""),
        ),
        ("suite 7", good.replace("suite = 2", "suite = 7")),
        ("baud 12", good.replace("baud = 115200", "baud = 12")),
        (
            "UDP port",
            good.replace("tcp://10.20.0.12:4001", "udp://10.20.0.12:4001"),
        ),
        ("pool of 0", good.replace("pool_size = 4", "pool_size = 0")),
        (
            "an interface that does not exist",
            good.replace(
                "disable = [\"debug\", \"optical\"]",
                "disable = [\"debug\", \"usb\"]",
            ),
        ),
        (
            "keygen in the cloud",
            good.replace("keygen = \"hsm\"", "keygen = \"cloud\""),
        ),
        (
            "payload too small",
            good.replace("max_payload = 16384", "max_payload = 512"),
        ),
        (
            "no token",
            good.lines()
                .filter(|l| !l.starts_with("token = "))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        (
            "pin both ways",
            good.replace(
                "pin = { file = \"hsm-user.pin\" }",
                "pin = { file = \"p\", env = \"X\" }",
            ),
        ),
    ];
    for (what, text) in cases {
        assert!(
            python_validate(&text).is_err(),
            "the schema accepts: {what}"
        );
        let e = station_parse(&text).expect_err(what);
        assert!(e.starts_with("/cell/station.toml:"), "{what}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configuration_a_cell_writes_is_valid() {
    let cell = e2e::Cell::new(e2e::CellOptions {
        nests: 1,
        open_batch: false,
        ..e2e::CellOptions::default()
    })
    .await;
    python_validate(&std::fs::read_to_string(&cell.config).unwrap()).unwrap();
}
