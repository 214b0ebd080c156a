//! The meter bootloader emulator and the serial link emulator, for tests, demos, benchmarks and
//! the factory's commissioning checks.
//!
//! - [`flash`]: the meter application, its "flash" kept as files a test can inspect.
//! - [`nest`]: one jig nest: meters inserted one after another, line faults, the operator model.
//! - [`faults`]: the fault catalogue.
//! - [`linksim`]: a serial line between two byte streams: baud rate, latency, bit errors, drops.
//! - [`firmware`]: MCUboot image signing and payload generators.
//!
//! It is not a meter: it speaks the jig protocol honestly enough to prove the station right and
//! dishonestly on request to prove the station careful.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod faults;
pub mod firmware;
pub mod flash;
pub mod linksim;
pub mod nest;
pub mod rng;

use std::path::Path;

use der::{Decode, DecodePem};

/// Reads a provisioning root: a certificate (PEM or DER) or a public key (PEM SPKI, DER SPKI or a
/// 65-byte SEC1 point).
pub fn load_root(path: &Path) -> Result<p256::PublicKey, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_root(&bytes).ok_or_else(|| {
        format!(
            "{} is not a P-256 certificate or public key (PEM or DER)",
            path.display()
        )
    })
}

/// Parses what [`load_root`] accepts.
pub fn parse_root(bytes: &[u8]) -> Option<p256::PublicKey> {
    use spki::DecodePublicKey;
    if bytes.len() == 65
        && let Ok(k) = p256::PublicKey::from_sec1_bytes(bytes)
    {
        return Some(k);
    }
    if let Ok(c) = x509_cert::Certificate::from_der(bytes) {
        return line_protocol::chain::p256_key(&c);
    }
    if let Ok(c) = x509_cert::Certificate::from_pem(bytes) {
        return line_protocol::chain::p256_key(&c);
    }
    if let Ok(k) = p256::PublicKey::from_public_key_der(bytes) {
        return Some(k);
    }
    let text = std::str::from_utf8(bytes).ok()?;
    p256::PublicKey::from_public_key_pem(text).ok()
}
