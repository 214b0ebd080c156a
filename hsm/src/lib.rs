//! Everything PKCS#11 for the provisioning cell: the only crate that links `cryptoki`.
//!
//! - [`Hsm`]: a token opened by label, logged in, with a pool of sessions usable from tokio
//!   that recovers from lost sessions and re-initialised libraries ([`pool`]).
//! - [`HsmSession`]: the operations — EC and AES keys, ECDSA, AES key wrap (RFC 3394/5649),
//!   RSA-OAEP, ECDH, the key-transport key of the jig line protocol, imports, key check values.
//! - [`policy`]: the key policy table, the one place where key attributes are decided.
//! - [`so`]: the token security officer's operations (approving a utility's transport key).
//! - [`signer`]: HSM keys as `rcgen` signing keys and as `signature::Signer`s (for CMS).
//! - [`cert`]: the device-CA meter certificate profile (PKCS#10 in, checked; certificate out).
//! - [`pki`]: PKI set-up for the `station` CLI (demo hierarchy, CSR, import, info).
//! - [`testkit`]: SoftHSM2 test tokens for this and other crates' tests and the demo.
//!
//! What this crate deliberately does not do: decide *when* keys are made or certificates
//! issued (that is the station's orchestration), keep any database, or ever hand out secret or
//! private key material in clear. PINs live in zeroizing secrets and are never formatted.

pub mod cert;
pub mod config;
pub mod context;
pub mod error;
pub mod mechanisms;
pub mod pki;
pub mod policy;
pub mod pool;
pub mod session;
pub mod signer;
pub mod so;
pub mod softhsm;
mod sync;
pub mod testkit;

pub use cert::{
    IssuedCertificate, Issuer, MeterKeyUsage, MeterProfile, TlsKey, TlsProfile, TlsUsage,
    Verification,
};
pub use config::{HsmConfig, PinSource, SOFTHSM_MODULE};
pub use error::{CertError, CsrError, Error, Result, ckr_name};
pub use mechanisms::{Mechanisms, OaepHash};
pub use policy::{KeyPolicy, KeyRole, POLICY};
pub use pool::{Hsm, IN_PLACE_BELOW, TokenFlags, TokenIdentity};
pub use session::{
    AesKeySize, Curve, HsmSession, KeyFlags, KeyHandle, KeyKind, KeyPairHandle, OaepLabel,
    ObjectInfo, RsaKeyPairHandle, WrapAlg,
};
pub use signer::{HsmSigner, SessionSigner};
pub use so::{CustomerKey, SecurityOfficer};

/// Re-exported so that callers can hold PINs without depending on `secrecy` themselves.
pub use secrecy::SecretString;
