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
    if let Ok(Some((_, ku))) = leaf.tbs_certificate().get_extension::<KeyUsage>()
        && !ku.digital_signature()
    {
        return Err(ChainError::LeafKeyUsage);
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
