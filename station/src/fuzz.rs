//! Fuzzing entry points for what the station reads from outside: a manifest (the signed
//! envelope, and the JSON inside it), the configuration file, the service API's messages
//! (requests the daemon takes apart itself, and the replies and events a console reads), and
//! what the factory registry hands back (checkpoint notes, enrolled certificates, the factory
//! view) with the registry connection file. Each
//! `fuzz/` target is a one-line wrapper over one of these, and the test suite runs them over the
//! seed corpora and mutations of them. Every function must return normally for every input: a
//! panic is a bug.

use std::path::Path;

use prost::Message as _;
use x509_cert::Certificate;

use crate::api::{convert, pb};
use crate::config::Config;
use crate::manifest::verify;

/// The manufacturer root the manifest seed corpus was signed under
/// (`fuzz/fixtures/manifest-root.der`, committed with the seeds).
pub fn manifest_root() -> Certificate {
    der::Decode::from_der(include_bytes!("../../fuzz/fixtures/manifest-root.der"))
        .unwrap_or_else(|e| panic!("fuzz/fixtures/manifest-root.der, committed with the seeds, is a DER certificate: {e}"))
}

/// A signed manifest (`manifest.p7m`) checked against `root`, as `manifest verify` does.
pub fn manifest_envelope(data: &[u8], root: &Certificate) {
    let (report, manifest) = verify::verify_bytes(data, root);
    if report.ok() {
        assert!(manifest.is_some(), "a manifest that verifies was read");
    }
}

/// The JSON content of a manifest, read and checked as if its envelope had verified.
pub fn manifest_content(data: &[u8], root: &Certificate) {
    let mut report = verify::Report::default();
    let manifest = verify::check_manifest(data, root, &mut report);
    if manifest.is_none() {
        assert!(!report.failures.is_empty(), "an unread manifest says why");
    }
}

/// The configuration file.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(Path::new("/etc/station/station.toml"), text);
    }
}

/// A service API message: the first byte picks the message type, the rest is its protobuf
/// encoding. Requests whose content the daemon parses itself go through that parser; replies and
/// events go through the console's conversions.
pub fn api_message(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            if let Ok(m) = pb::ImportCustomerRequest::decode(bytes) {
                let _ = crate::engine::accept_customer_certificate(&m.name, &m.certificate);
            }
        }
        1 => {
            if let Ok(m) = pb::PkiImportRequest::decode(bytes) {
                let _ = crate::engine::keys::parse_cert(m.certificate_pem.as_bytes());
                for c in &m.chain_pem {
                    let _ = crate::engine::keys::parse_cert(c.as_bytes());
                }
            }
        }
        2 => {
            if let Ok(m) = pb::ImportFirmwareRequest::decode(bytes) {
                let _ = line_protocol::image::parse(&m.image);
            }
        }
        3 => {
            if let Ok(m) = pb::LineView::decode(bytes) {
                let _ = crate::LineView::from(m);
            }
        }
        4 => {
            if let Ok(m) = pb::Event::decode(bytes) {
                let _ = convert::update(m);
            }
        }
        5 => {
            if let Ok(m) = pb::AuditEntries::decode(bytes) {
                let _: Vec<crate::audit::Entry> = m.entries.into_iter().map(Into::into).collect();
            }
        }
        6 => {
            if let Ok(m) = pb::BatchList::decode(bytes) {
                let _: Vec<crate::records::BatchRow> =
                    m.batches.into_iter().map(Into::into).collect();
            }
        }
        _ => {
            if let Ok(m) = pb::Verification::decode(bytes) {
                let _ = crate::audit::Verification::from(m);
            }
        }
    }
}

/// What comes back from the factory registry, or tells how to reach it: the first byte picks
/// it. A checkpoint note as `station fleet audit` reads it (tree head, chain values, signature
/// against a fixed key), an enrolled audit certificate (PEM), a registry connection file, a
/// `FleetViewReply` or a `ShiftViewReply` as the console converts it.
pub fn registry_answer(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(bytes);
    match which % 4 {
        0 => {
            let head = crate::audit::checkpoint_tree_head(&text);
            let values = crate::audit::checkpoint_values(&text);
            if let Some((seq, _)) = head {
                assert_eq!(values.map(|v| v.0), Some(seq), "one note, one entry number");
            }
            let key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32])
                .unwrap_or_else(|e| panic!("a constant scalar in range is a key: {e}"));
            let _ = crate::audit::verify_note(&text, key.verifying_key(), &[0, 0, 0, 0]);
        }
        1 => {
            let _ = crate::fleet::audit_key(&text);
        }
        2 => {
            let _ = crate::fleet::Endpoint::parse(Path::new("/etc/station/registry.toml"), &text);
        }
        _ => {
            if let Ok(m) = pb::FleetViewReply::decode(bytes) {
                let v = crate::fleet::FleetView::from(m.clone());
                assert_eq!(
                    pb::FleetViewReply::from(v),
                    m,
                    "the view converts both ways"
                );
            }
            // The dashboards' reply: whatever arrives converts without panicking, and once
            // converted it converts both ways.
            if let Ok(m) = pb::ShiftViewReply::decode(bytes) {
                let v = crate::shift::ShiftView::from(m);
                assert_eq!(
                    crate::shift::ShiftView::from(pb::ShiftViewReply::from(v.clone())),
                    v,
                    "the shift view converts both ways"
                );
            }
        }
    }
}
