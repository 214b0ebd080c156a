//! Certificate chain check on the meter side: does the station's chain lead to the provisioning
//! root burned into the bootloader?
//!
//! Deliberately small, as a bootloader's would be: ECDSA P-256 with SHA-256 only, names compared
//! as DER, CA flag on every issuer, `digitalSignature` on the leaf when key usage is present. No
//! validity dates: a meter on the line has no trusted clock (the station and the PKI own expiry).

use der::{Decode, Encode};
use p256::PublicKey;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use x509_cert::Certificate;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage};

use crate::limits;

const ECDSA_WITH_SHA256: &str = "1.2.840.10045.4.3.2";
const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const PRIME256V1: &str = "1.2.840.10045.3.1.7";

/// Why a chain was refused; the index counts from the leaf (0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// No certificate, or more than the limit.
    Length,
    /// Certificate `i` is not valid DER X.509.
    Parse(usize),
    /// Certificate `i` is not ECDSA P-256 / SHA-256.
    Algorithm(usize),
    /// Certificate `i`'s issuer is not the subject of certificate `i + 1`.
    IssuerMismatch(usize),
    /// Certificate `i` issues another but is not a CA.
    NotCa(usize),
    /// The leaf may not sign.
    LeafKeyUsage,
    /// Certificate `i`'s signature does not verify (the last one against the provisioning root).
    Signature(usize),
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainError::Length => {
                write!(f, "chain must hold 1 to {} certificates", limits::MAX_CHAIN)
            }
            ChainError::Parse(i) => write!(f, "certificate {i} is not valid DER X.509"),
            ChainError::Algorithm(i) => write!(f, "certificate {i} is not ECDSA P-256/SHA-256"),
            ChainError::IssuerMismatch(i) => {
                write!(f, "certificate {i} issuer does not match the next subject")
            }
            ChainError::NotCa(i) => write!(f, "certificate {i} is not a CA"),
            ChainError::LeafKeyUsage => write!(f, "leaf certificate lacks digitalSignature"),
            ChainError::Signature(i) => write!(f, "certificate {i} signature does not verify"),
        }
    }
}

/// The P-256 public key of a parsed certificate, if it has one.
pub fn p256_key(cert: &Certificate) -> Option<PublicKey> {
    let spki = cert.tbs_certificate().subject_public_key_info();
    if spki.algorithm.oid.to_string() != EC_PUBLIC_KEY {
        return None;
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()?
        .decode_as::<der::asn1::ObjectIdentifier>()
        .ok()?;
    if curve.to_string() != PRIME256V1 {
        return None;
    }
    PublicKey::from_sec1_bytes(spki.subject_public_key.as_bytes()?).ok()
}

fn verify_signed_by(cert: &Certificate, issuer: &PublicKey) -> bool {
    let Ok(tbs) = cert.tbs_certificate().to_der() else {
        return false;
    };
    let Some(sig_bytes) = cert.signature().as_bytes() else {
        return false;
    };
    let Ok(sig) = Signature::from_der(sig_bytes) else {
        return false;
    };
    VerifyingKey::from(issuer).verify(&tbs, &sig).is_ok()
}

/// Checks `chain` (leaf first, DER) against the provisioning `root` key and returns the leaf's key.
pub fn verify_chain(chain: &[Vec<u8>], root: &PublicKey) -> Result<PublicKey, ChainError> {
    if chain.is_empty() || chain.len() > limits::MAX_CHAIN {
        return Err(ChainError::Length);
    }
    let mut certs = Vec::with_capacity(chain.len());
    for (i, der) in chain.iter().enumerate() {
        let cert = Certificate::from_der(der).map_err(|_| ChainError::Parse(i))?;
        if cert.signature_algorithm().oid.to_string() != ECDSA_WITH_SHA256 {
            return Err(ChainError::Algorithm(i));
        }
        let key = p256_key(&cert).ok_or(ChainError::Algorithm(i))?;
        certs.push((cert, key));
    }
    let (leaf, leaf_key) = &certs[0];
    // Fail closed: the leaf must state digitalSignature; a missing or malformed key usage is
    // refused like a wrong one.
    match leaf.tbs_certificate().get_extension::<KeyUsage>() {
        Ok(Some((_, ku))) if ku.digital_signature() => {}
        _ => return Err(ChainError::LeafKeyUsage),
    }
    for i in 0..certs.len() {
        let (cert, _) = &certs[i];
        let issuer_key = match certs.get(i + 1) {
            Some((next, next_key)) => {
                let issuer = cert
                    .tbs_certificate()
                    .issuer()
                    .to_der()
                    .map_err(|_| ChainError::Parse(i))?;
                let subject = next
                    .tbs_certificate()
                    .subject()
                    .to_der()
                    .map_err(|_| ChainError::Parse(i + 1))?;
                if issuer != subject {
                    return Err(ChainError::IssuerMismatch(i));
                }
                let is_ca = matches!(
                    next.tbs_certificate().get_extension::<BasicConstraints>(),
                    Ok(Some((_, bc))) if bc.ca
                );
                if !is_ca {
                    return Err(ChainError::NotCa(i + 1));
                }
                *next_key
            }
            None => *root,
        };
        if !verify_signed_by(cert, &issuer_key) {
            return Err(ChainError::Signature(i));
        }
    }
    Ok(*leaf_key)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;

    /// The test station certificate with its key-usage value replaced by `ku` (the same length)
    /// and signed again by a root of the test's own, whose public key is returned.
    fn station_with_key_usage(ku: [u8; 2]) -> (Vec<u8>, PublicKey) {
        let der = crate::testkit::STATION_DER;
        // SEQUENCE { tbs, algorithm, signature }: the TBS is the first element.
        let outer = der::asn1::AnyRef::from_der(der).unwrap();
        let mut reader = der::SliceReader::new(outer.value()).unwrap();
        let tbs = der::asn1::AnyRef::decode(&mut reader).unwrap();
        let mut tbs = tbs.to_der().unwrap();
        let at = tbs
            .windows(10)
            .position(|w| w == [0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04])
            .unwrap()
            + 10;
        assert_eq!(&tbs[at..at + 2], [0x03, 0x02]);
        tbs[at + 2..at + 4].copy_from_slice(&ku);
        let root = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let sig: p256::ecdsa::DerSignature = root.sign(&tbs);
        let alg = der::asn1::AnyRef::decode(&mut reader)
            .unwrap()
            .to_der()
            .unwrap();
        let bits = der::asn1::BitString::from_bytes(sig.as_bytes())
            .unwrap()
            .to_der()
            .unwrap();
        let body = [tbs, alg, bits].concat();
        let mut cert = vec![0x30];
        der::Length::try_from(body.len())
            .unwrap()
            .encode_to_vec(&mut cert)
            .unwrap();
        cert.extend_from_slice(&body);
        (cert, PublicKey::from(root.verifying_key()))
    }

    #[test]
    fn a_leaf_without_a_sound_digital_signature_key_usage_is_refused() {
        // Re-signed as it was: accepted.
        let (ok, root) = station_with_key_usage([0x07, 0x80]);
        assert!(verify_chain(&[ok], &root).is_ok());
        // keyAgreement instead of digitalSignature.
        let (ka, root) = station_with_key_usage([0x03, 0x08]);
        assert_eq!(verify_chain(&[ka], &root), Err(ChainError::LeafKeyUsage));
        // A key usage that does not parse (nine unused bits): refused, not skipped.
        let (bad, root) = station_with_key_usage([0x09, 0x80]);
        assert_eq!(verify_chain(&[bad], &root), Err(ChainError::LeafKeyUsage));
    }
}
