//! The service API of `stationd`: its contract is `schemas/station.proto`; [`pb`] is the code
//! generated from it at build time, [`server`] answers it with the engine, [`client`] is what
//! the `station` command and the touch console use, and [`convert`] moves values between the
//! engine's types and the messages.

#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    unused_qualifications
)]
pub mod pb {
    tonic::include_proto!("station.v1");
}

pub mod client;
pub mod convert;
pub mod server;

/// The files of an export, in the order `FetchExport` delivers them. The last two, the PSKC
/// container and the evidence report, are missing from exports made before there were such
/// (their manifests do not name a container).
pub const EXPORT_FILES: [&str; 5] = [
    "manifest.json",
    "manifest.p7m",
    "voided.crl",
    "keys.pskc",
    crate::report::FILE,
];

/// The response metadata key that says why a call was refused, for clients that branch on it:
/// `no-session`, `expired`, `bad-credentials`, `locked`, `disabled`, `forbidden`, `invalid`,
/// `not-found`, `conflict`, `audit-frozen`, `setup`, `hsm`, `journal`, `no-client-certificate`,
/// `not-a-console-certificate`.
pub const REASON_KEY: &str = "x-station-reason";

/// A key role by the name the command line and the API use.
pub fn key_role(name: &str) -> Result<hsm::KeyRole, String> {
    Ok(match name {
        "device-ca" => hsm::KeyRole::DeviceCa,
        "manifest-signer" => hsm::KeyRole::ManifestSigner,
        "audit-signer" => hsm::KeyRole::AuditSigner,
        "station" => hsm::KeyRole::StationIdentity,
        other => {
            return Err(format!(
                "unknown role {other:?}: device-ca, manifest-signer, audit-signer or station"
            ));
        }
    })
}

/// DER as PEM.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
