//! HSM keys as signers for other crates' builders.
//!
//! - [`SessionSigner`] borrows one [`HsmSession`] and implements `rcgen::SigningKey`, so that a
//!   whole certificate (build, sign, check) is made on one session without a second checkout.
//! - [`HsmSigner`] holds the pool and implements `signature::Signer<p256::ecdsa::DerSignature>`,
//!   `signature::Keypair` and `spki::DynSignatureAlgorithmIdentifier`: what the CMS SignedData
//!   builder needs. Each signature checks a session out of the pool and blocks the calling
//!   thread, so drive it from a blocking context (e.g. inside `spawn_blocking`), not from an
//!   async task's thread.
//!
//! Neither ever sees private key material; both only ask the token to sign.

use der::oid::ObjectIdentifier;
use spki::AlgorithmIdentifierOwned;

use crate::error::{Error, Result};
use crate::pool::Hsm;
use crate::session::{Curve, HsmSession, KeyHandle, KeyKind, KeyPairHandle};

/// ecdsa-with-SHA256 (RFC 5758).
pub const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
/// ecdsa-with-SHA384 (RFC 5758).
pub const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");

/// The rcgen algorithm of keys on `curve`.
pub fn rcgen_algorithm(curve: Curve) -> &'static rcgen::SignatureAlgorithm {
    match curve {
        Curve::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        Curve::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
    }
}

/// An HSM key pair used through one borrowed session, as an `rcgen` signing key.
pub struct SessionSigner<'s> {
    session: &'s HsmSession<'s>,
    key: KeyHandle,
    curve: Curve,
    point: Vec<u8>,
}

impl std::fmt::Debug for SessionSigner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSigner")
            .field("key", &self.key)
            .field("curve", &self.curve)
            .finish_non_exhaustive()
    }
}

impl<'s> SessionSigner<'s> {
    /// Signs with `pair` through `session`.
    pub fn new(session: &'s HsmSession<'s>, pair: &KeyPairHandle) -> Self {
        SessionSigner {
            session,
            key: pair.private.clone(),
            curve: pair.curve,
            point: pair.point.clone(),
        }
    }

    /// The public point.
    pub fn point(&self) -> &[u8] {
        &self.point
    }
}

impl rcgen::PublicKeyData for SessionSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        rcgen_algorithm(self.curve)
    }
}

thread_local! {
    /// The token's error behind the last `rcgen::Error::RemoteKeyError` of this thread: rcgen
    /// can only say "remote key error", so the cause waits here for [`rcgen_error`].
    static SIGN_ERROR: std::cell::RefCell<Option<Error>> = const { std::cell::RefCell::new(None) };
}

impl rcgen::SigningKey for SessionSigner<'_> {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        self.session.sign(&self.key, msg).map_err(|e| {
            tracing::warn!(error = %e, "hsm signature for a certificate failed");
            SIGN_ERROR.with(|slot| *slot.borrow_mut() = Some(e));
            rcgen::Error::RemoteKeyError
        })
    }
}

/// Our error for an rcgen failure: the token's own error when a [`SessionSigner`] signature
/// failed (so that it names the CKR, and the pool can recover and retry), else an encoding
/// error.
pub(crate) fn rcgen_error(e: rcgen::Error) -> Error {
    let cause = SIGN_ERROR.with(|slot| slot.borrow_mut().take());
    match (e, cause) {
        (rcgen::Error::RemoteKeyError, Some(cause)) => cause,
        (e, _) => Error::Encoding(e.to_string()),
    }
}

/// A pool-backed P-256 signer for `signature`-trait users (the CMS SignedData builder).
#[derive(Clone)]
pub struct HsmSigner {
    hsm: Hsm,
    key: KeyHandle,
    verifying_key: p256::ecdsa::VerifyingKey,
}

impl std::fmt::Debug for HsmSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmSigner")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl HsmSigner {
    /// A signer for the P-256 key pair `pair` of `hsm`.
    pub fn new(hsm: Hsm, pair: &KeyPairHandle) -> Result<Self> {
        if pair.curve != Curve::P256 || !matches!(pair.private.kind(), KeyKind::EcPrivate(_)) {
            return Err(Error::InvalidInput(
                "the signature-trait signer supports p-256 key pairs only".into(),
            ));
        }
        let verifying_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&pair.point)
            .map_err(|_| Error::InvalidInput("the key pair's public point is invalid".into()))?;
        Ok(HsmSigner {
            hsm,
            key: pair.private.clone(),
            verifying_key,
        })
    }

    /// Finds the token key pair labelled `label` and makes a signer of it (blocks).
    pub fn from_label(hsm: &Hsm, label: &str) -> Result<Self> {
        let pair = hsm.with_session(|s| s.find_ec_keypair(label))?;
        HsmSigner::new(hsm.clone(), &pair)
    }
}

impl signature::Signer<p256::ecdsa::DerSignature> for HsmSigner {
    fn try_sign(
        &self,
        msg: &[u8],
    ) -> std::result::Result<p256::ecdsa::DerSignature, signature::Error> {
        let der = self
            .hsm
            .with_session(|s| s.sign(&self.key, msg))
            .map_err(signature::Error::from_source)?;
        p256::ecdsa::DerSignature::from_bytes(&der).map_err(|_| signature::Error::new())
    }
}

impl signature::Keypair for HsmSigner {
    type VerifyingKey = p256::ecdsa::VerifyingKey;

    fn verifying_key(&self) -> Self::VerifyingKey {
        self.verifying_key
    }
}

impl spki::DynSignatureAlgorithmIdentifier for HsmSigner {
    fn signature_algorithm_identifier(&self) -> spki::Result<AlgorithmIdentifierOwned> {
        Ok(AlgorithmIdentifierOwned {
            oid: ECDSA_WITH_SHA256,
            parameters: None,
        })
    }
}
