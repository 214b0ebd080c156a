#![no_main]
// The JSON inside a manifest, read and checked as if its signature had verified.
use std::sync::LazyLock;

static ROOT: LazyLock<x509_cert::Certificate> = LazyLock::new(station::fuzz::manifest_root);

libfuzzer_sys::fuzz_target!(|data: &[u8]| station::fuzz::manifest_content(data, &ROOT));
