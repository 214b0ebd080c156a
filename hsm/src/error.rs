//! The crate's one error type.
//!
//! Every variant is something a caller can branch on, and every message says in lower case what
//! happened and what to do about it. Nothing secret ever ends up here: PINs are never formatted,
//! key material is never formatted, and PKCS#11 return values are shown by name only.
//!
//! This module does not decide how to recover from a fault; it only classifies PKCS#11 return
//! values so that the session pool (`pool`) can.

use std::path::PathBuf;

use cryptoki::error::{Error as CkError, RvError};

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in the HSM layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The PKCS#11 module could not be loaded or initialised.
    #[error(
        "cannot load the pkcs#11 module {path}: {reason}; check the module path in the configuration and that the library is installed"
    )]
    ModuleLoad {
        /// The module path as configured.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// No token with the configured label is present.
    #[error(
        "no token labelled {label:?} is present (tokens seen: {available:?}); check the token label in the configuration or initialise the token"
    )]
    TokenNotFound {
        /// The label we looked for.
        label: String,
        /// Labels of the tokens that are present.
        available: Vec<String>,
    },
    /// The token refused the user PIN.
    #[error(
        "the token {label:?} refused the user pin; check the pin and try again (repeated failures lock the token)"
    )]
    PinIncorrect {
        /// Token label.
        label: String,
    },
    /// The user PIN is locked.
    #[error(
        "the user pin of token {label:?} is locked after too many failures; the security officer must unlock or reset it"
    )]
    PinLocked {
        /// Token label.
        label: String,
    },
    /// The token refused the security officer's PIN, or it is locked.
    #[error(
        "the token {label:?} refused the security officer pin{}; check the pin (repeated failures lock it)",
        if *locked { " (it is locked)" } else { "" }
    )]
    SoPinRefused {
        /// Token label.
        label: String,
        /// Whether the SO PIN is locked.
        locked: bool,
    },
    /// A customer's transport key in the token is not the one the security officer approved.
    #[error("refusing to wrap for the customer key {label:?}: {reason}")]
    CustomerKeyNotApproved {
        /// The key's label.
        label: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The PIN could not be obtained from its source.
    #[error("cannot read the hsm pin: {0}")]
    PinUnavailable(String),
    /// The PIN file can be read by group or others.
    #[error(
        "the pin file {path} can be read by group or others (mode {mode:o}); restrict it with `chmod 600 {path}` and try again"
    )]
    PinFileInsecure {
        /// The PIN file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token lacks a mechanism this operation needs.
    #[error(
        "the token does not offer {mechanism}, which is needed for {purpose}; use a token that supports it"
    )]
    MechanismMissing {
        /// PKCS#11 name of the mechanism, e.g. `CKM_ECDH1_DERIVE`.
        mechanism: &'static str,
        /// What it is needed for.
        purpose: &'static str,
    },
    /// The token cannot hold a cell's keys the way the cell keeps them.
    #[error("token {label:?} cannot hold a cell: {reason}")]
    TokenUnfit {
        /// The token.
        label: String,
        /// Why, and what it answered.
        reason: String,
    },
    /// The token did not give a key the attributes its template asked for (read back after
    /// the operation); the key was destroyed again.
    #[error(
        "the token did not keep the key policy on {operation}: {details}; the key was destroyed — this token cannot hold these keys safely"
    )]
    PolicyNotKept {
        /// The operation, e.g. "unwrap".
        operation: &'static str,
        /// What differs.
        details: String,
    },
    /// A session object belongs to a session that was lost (HSM restart, library re-initialised).
    #[error(
        "the hsm session that held this key was lost (hsm restart or reconnect); the key is gone: start the operation again"
    )]
    SessionObjectLost,
    /// The key's attributes forbid this use (policy at work).
    #[error("the key policy forbids this: {0}")]
    NotPermitted(String),
    /// The HSM could not be reached again after a fault.
    #[error(
        "the hsm did not recover after {attempts} attempts (last fault: {last}); check the hsm and its connection"
    )]
    HsmUnavailable {
        /// Attempts made.
        attempts: u32,
        /// The last fault seen.
        last: String,
    },
    /// Any other PKCS#11 failure.
    #[error("{operation}: {function} returned {}; {hint}", ckr_name(*rv))]
    Pkcs11 {
        /// What the station was doing, with the mechanism where there is one.
        operation: String,
        /// The PKCS#11 function.
        function: String,
        /// The return value, by name.
        rv: RvError,
        /// What to do.
        hint: &'static str,
    },
    /// A failure inside the cryptoki wrapper that is not a PKCS#11 return value.
    #[error("pkcs#11 wrapper error: {0}")]
    Wrapper(String),
    /// No object with this label (and class) exists.
    #[error("no {what} labelled {label:?} in the token; create or import it first")]
    ObjectNotFound {
        /// Kind of object, e.g. "private key".
        what: &'static str,
        /// Its label.
        label: String,
    },
    /// More than one object carries a label that must be unique.
    #[error(
        "{count} objects labelled {label:?} in the token; labels must be unique: remove the extra ones"
    )]
    DuplicateObjects {
        /// The label.
        label: String,
        /// How many were found.
        count: usize,
    },
    /// A role already has a key or certificate in the token.
    #[error("the token already holds a {what} for {label:?}; delete it first or use a fresh token")]
    RoleExists {
        /// The role's label.
        label: String,
        /// What exists.
        what: &'static str,
    },
    /// A PKCS#10 request was refused.
    #[error("certificate request refused: {0}")]
    Csr(#[from] CsrError),
    /// A certificate (or chain) was refused.
    #[error("certificate refused: {0}")]
    Cert(#[from] CertError),
    /// A profile input (system title, serial, names) is not acceptable.
    #[error("invalid certificate profile input: {0}")]
    Profile(String),
    /// Caller input that cannot be used (a malformed point, a wrong length).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The token gives no key check value for this key and cannot compute one.
    #[error(
        "the token gives no check value for this key and the key may not encrypt; no key check value is available"
    )]
    KcvUnavailable,
    /// Building or encoding a certificate failed.
    #[error("cannot build the certificate: {0}")]
    Encoding(String),
    /// File system failure.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What we tried.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A blocking HSM task panicked or was cancelled.
    #[error("the hsm worker task failed: {0}; this is a bug, please report it")]
    Task(String),
}

/// Why a PKCS#10 request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CsrError {
    /// Not a DER PKCS#10 request.
    #[error("it is not a der pkcs#10 request ({0}); send the request in der form")]
    Malformed(String),
    /// Its signature algorithm is not ECDSA with the hash that goes with the curve.
    #[error(
        "it is signed with {0}, expected ecdsa-with-sha256 (p-256) or ecdsa-with-sha384 (p-384)"
    )]
    UnsupportedSignatureAlgorithm(String),
    /// The self-signature does not verify: no proof of possession.
    #[error(
        "its signature does not verify against its own public key (no proof of possession); the meter must sign the request with the key it certifies"
    )]
    BadSignature,
    /// The key is on another curve than required.
    #[error("its key is on {found}, but this model requires {expected}")]
    WrongCurve {
        /// The curve required.
        expected: &'static str,
        /// The curve found.
        found: String,
    },
    /// The key is not an EC key or its point is invalid.
    #[error("its public key is not a valid ec point: {0}")]
    BadKey(String),
    /// The request asks for a CA certificate.
    #[error(
        "it requests a ca certificate (basicConstraints ca:true); meters never get ca certificates"
    )]
    RequestsCa,
    /// The request carries an extension the profile does not accept.
    #[error(
        "it requests extension {oid}; only keyUsage and subjectKeyIdentifier may be requested (the profile decides everything else)"
    )]
    UnexpectedExtension {
        /// The extension's OID.
        oid: String,
    },
    /// The request carries an attribute other than an extension request.
    #[error("it carries attribute {oid}; only an extension request is accepted")]
    UnexpectedAttribute {
        /// The attribute's OID.
        oid: String,
    },
}

/// Why a certificate (or chain) was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertError {
    /// The input is not a PEM/DER certificate.
    #[error("the input is not a certificate ({0}); give a PEM file with a CERTIFICATE block")]
    NotACertificate(String),
    /// The certificate's public key is not the HSM key of the role.
    #[error(
        "its public key is not the {role} key in the hsm; import the certificate issued for this token's request"
    )]
    KeyMismatch {
        /// The role's label.
        role: String,
    },
    /// The key is on another curve than the role's key.
    #[error("its key is on {found}, but {expected} is required")]
    WrongCurve {
        /// Expected curve.
        expected: String,
        /// Found curve.
        found: String,
    },
    /// The chain does not lead to a self-signed root.
    #[error(
        "it does not chain to a self-signed root: no certificate in the chain issued {subject:?} with a verifying signature; supply the issuing ca and the root"
    )]
    ChainBroken {
        /// Subject of the certificate whose issuer is missing.
        subject: String,
    },
    /// A signature in the chain does not verify.
    #[error("the signature on {subject:?} does not verify against its issuer's key")]
    BadSignature {
        /// Subject of the certificate.
        subject: String,
    },
    /// An issuer in the chain is not a CA.
    #[error(
        "{subject:?} issues certificates but is not a ca (basicConstraints/keyCertSign missing)"
    )]
    IssuerNotCa {
        /// Subject of the issuer.
        subject: String,
    },
    /// Basic constraints or key usage do not fit the role.
    #[error("it does not fit the {role} role: {reason}")]
    RoleMismatch {
        /// The role's label.
        role: String,
        /// What is wrong.
        reason: String,
    },
    /// Algorithm we do not verify.
    #[error("it uses {0}, which this station cannot verify (ecdsa p-256/p-384 only)")]
    UnsupportedAlgorithm(String),
}

/// How the session pool should react to a failed PKCS#11 call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The session handle is no longer valid.
    SessionLost,
    /// The library is not initialised or the device went away.
    LibraryLost,
    /// The user is no longer logged in.
    LoginLost,
    /// An object handle became invalid (objects must be found again).
    StaleHandle,
}

impl Error {
    /// Converts a cryptoki error, naming the function it came from.
    pub(crate) fn ck(function: &str, e: CkError) -> Self {
        match e {
            CkError::Pkcs11(rv, f) => Error::from_rv(function, format!("C_{f:?}"), rv),
            other => Error::Wrapper(format!("{function}: {other}")),
        }
    }

    fn from_rv(operation: &str, function: String, rv: RvError) -> Self {
        match rv {
            RvError::KeyFunctionNotPermitted
            | RvError::AttributeSensitive
            | RvError::KeyUnextractable
            | RvError::KeyNotWrappable => {
                let why = match rv {
                    RvError::AttributeSensitive => "the key is sensitive: its value cannot be read",
                    RvError::KeyUnextractable => "the key is not extractable: it cannot be wrapped",
                    RvError::KeyNotWrappable => "the key may not be wrapped by this key",
                    _ => "the key may not do this",
                };
                Error::NotPermitted(format!(
                    "{why} ({operation}: {function} returned {})",
                    ckr_name(rv)
                ))
            }
            _ => Error::Pkcs11 {
                operation: operation.to_owned(),
                function,
                rv,
                hint: hint(rv),
            },
        }
    }

    /// The PKCS#11 return value behind this error, if any.
    pub fn rv(&self) -> Option<RvError> {
        match self {
            Error::Pkcs11 { rv, .. } => Some(*rv),
            _ => None,
        }
    }

    pub(crate) fn fault(&self) -> Option<Fault> {
        match self.rv()? {
            RvError::SessionHandleInvalid | RvError::SessionClosed => Some(Fault::SessionLost),
            // A slot that is gone: the library was re-initialised or the token re-plugged, and
            // slots may be numbered anew; recovery finds the token again by label.
            RvError::CryptokiNotInitialized
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::SlotIdInvalid
            | RvError::DeviceError => Some(Fault::LibraryLost),
            RvError::UserNotLoggedIn => Some(Fault::LoginLost),
            RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid
            | RvError::WrappingKeyHandleInvalid
            | RvError::UnwrappingKeyHandleInvalid => Some(Fault::StaleHandle),
            _ => None,
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// The PKCS#11 name of a return value, e.g. `CKR_MECHANISM_INVALID` (cryptoki's `Display`
/// gives the specification's prose instead).
pub fn ckr_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED ({code:#x})"),
        RvError::UnknownErrorCode(code) => format!("CK_RV {code:#x}"),
        other => {
            let mut name = String::from("CKR");
            for c in format!("{other:?}").chars() {
                if c.is_ascii_uppercase() {
                    name.push('_');
                }
                name.push(c.to_ascii_uppercase());
            }
            name
        }
    }
}

fn hint(rv: RvError) -> &'static str {
    match rv {
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::CryptokiNotInitialized => {
            "the hsm session was lost; the operation can be retried"
        }
        RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::SlotIdInvalid
        | RvError::DeviceError => "check that the hsm is connected and powered",
        RvError::UserNotLoggedIn => "log in to the token again",
        RvError::MechanismInvalid | RvError::MechanismParamInvalid => {
            "the token does not support this mechanism or these parameters"
        }
        RvError::TemplateInconsistent
        | RvError::TemplateIncomplete
        | RvError::AttributeTypeInvalid
        | RvError::AttributeValueInvalid => {
            "the token refused the key attributes; it may not support this key policy"
        }
        RvError::DeviceMemory => "the token is full; delete unused objects",
        RvError::KeyTypeInconsistent
        | RvError::WrappingKeyTypeInconsistent
        | RvError::UnwrappingKeyTypeInconsistent => {
            "the key is of the wrong type for this operation"
        }
        RvError::WrappedKeyInvalid | RvError::EncryptedDataInvalid => {
            "the wrapped key does not unwrap under this key (wrong key or corrupted data)"
        }
        RvError::SignatureInvalid => "the signature does not verify",
        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => {
            "the key no longer exists in the token"
        }
        RvError::CurveNotSupported | RvError::DomainParamsInvalid => {
            "the token does not support this curve"
        }
        _ => "see the hsm's documentation for this return value",
    }
}

/// Shorthand: maps a cryptoki result to ours, naming the operation for non-PKCS#11 failures.
pub(crate) trait CkResultExt<T> {
    fn ck(self, what: &str) -> Result<T>;
}

impl<T> CkResultExt<T> for std::result::Result<T, CkError> {
    fn ck(self, what: &str) -> Result<T> {
        self.map_err(|e| Error::ck(what, e))
    }
}
