#![no_main]
// A signed manifest (CMS SignedData around the JSON) checked against the manufacturer root, as
// `manifest verify` and the utility's import do; anything may be refused, nothing may panic.
use std::sync::LazyLock;

static ROOT: LazyLock<x509_cert::Certificate> = LazyLock::new(station::fuzz::manifest_root);

libfuzzer_sys::fuzz_target!(|data: &[u8]| station::fuzz::manifest_envelope(data, &ROOT));
