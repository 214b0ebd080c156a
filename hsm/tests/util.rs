//! Test harness: tokens, software meter keys and requests, and the `openssl` peer.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use hsm::testkit::TestToken;
use hsm::{Curve, Hsm};
use sha2::Digest;

/// A fresh token and a pool of `pool` sessions on it.
pub fn token(prefix: &str, pool: usize) -> (TestToken, Hsm) {
    let token = TestToken::new(prefix).expect("create a test token");
    let hsm = token.open(pool).expect("open the test token");
    (token, hsm)
}

/// Runs `openssl` with `args` in `dir`; returns (success, stdout+stderr).
pub fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A software key standing in for a meter's key (deterministic from `seed`).
pub enum SoftKey {
    P256(p256::ecdsa::SigningKey),
    P384(p384::ecdsa::SigningKey),
}

impl SoftKey {
    pub fn new(curve: Curve, seed: &str) -> SoftKey {
        match curve {
            Curve::P256 => {
                let d = sha2::Sha256::digest(seed.as_bytes());
                SoftKey::P256(p256::ecdsa::SigningKey::from_slice(&d).unwrap())
            }
            Curve::P384 => {
                let d = sha2::Sha384::digest(seed.as_bytes());
                SoftKey::P384(p384::ecdsa::SigningKey::from_slice(&d).unwrap())
            }
        }
    }

    pub fn point(&self) -> Vec<u8> {
        match self {
            SoftKey::P256(k) => k.verifying_key().to_sec1_point(false).as_bytes().to_vec(),
            SoftKey::P384(k) => k.verifying_key().to_sec1_point(false).as_bytes().to_vec(),
        }
    }
}

impl rcgen::PublicKeyData for SoftKey {
    fn der_bytes(&self) -> &[u8] {
        // rcgen wants a borrowed point; leak is fine in tests.
        Box::leak(self.point().into_boxed_slice())
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            SoftKey::P256(_) => &rcgen::PKCS_ECDSA_P256_SHA256,
            SoftKey::P384(_) => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }
}

impl rcgen::SigningKey for SoftKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        use signature::Signer;
        Ok(match self {
            SoftKey::P256(k) => {
                let s: p256::ecdsa::DerSignature = k.sign(msg);
                s.as_bytes().to_vec()
            }
            SoftKey::P384(k) => {
                let s: p384::ecdsa::DerSignature = k.sign(msg);
                s.as_bytes().to_vec()
            }
        })
    }
}

/// A PKCS#10 request by `key` built from `params` (extensions and all).
pub fn csr_with(key: &SoftKey, params: &rcgen::CertificateParams) -> Vec<u8> {
    params.serialize_request(key).unwrap().der().to_vec()
}

/// A plain meter request: CN only, keyUsage digitalSignature requested.
pub fn meter_csr(key: &SoftKey) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "meter says hello");
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    csr_with(key, &params)
}

/// Writes `contents` to `dir/name` and returns the name.
pub fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> String {
    std::fs::write(dir.join(name), contents).unwrap();
    name.to_owned()
}

/// A meter's ephemeral key pair from `seed` (its SEC1 uncompressed point alongside).
pub fn meter_point(seed: u8) -> (p256::SecretKey, [u8; 65]) {
    use p256::elliptic_curve::sec1::ToSec1Point;
    let secret = p256::SecretKey::from_slice(&[seed; 32]).unwrap();
    let point: [u8; 65] = secret
        .public_key()
        .to_sec1_point(false)
        .as_bytes()
        .try_into()
        .unwrap();
    (secret, point)
}
