//! The device-CA certificate profile: meter certificates from PKCS#10 requests.
//!
//! A request is checked before anything is signed: it must parse, its self-signature must
//! verify (proof of possession), its key must be on the curve the model requires, and it may
//! ask for nothing but keyUsage / subjectKeyIdentifier. Only its public key is used; the profile
//! ([`MeterProfile`]) decides the subject, key usage, validity and every extension. The issued
//! certificate is parsed back and its signature verified against the CA key before it is
//! returned, with its serial as re-parsed and its SHA-256 fingerprint.
//!
//! Also here: certificate parsing and signature checks shared with [`crate::pki`].
//!
//! This module does not store certificates or decide serial uniqueness across the station (the
//! station's database holds the unique constraint); it draws serials from the HSM's RNG.

use der::asn1::Any;
use der::oid::ObjectIdentifier;
use der::{Decode, Encode, Tag, Tagged};
use sha2::Digest;
use time::OffsetDateTime;
use x509_cert::Certificate;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::BasicConstraints;
use x509_cert::request::CertReq;
use x509_cert::spki::SubjectPublicKeyInfoOwned;

use crate::error::{CertError, CsrError, Error, Result};
use crate::session::{Curve, HsmSession, KeyPairHandle};
use crate::signer::{ECDSA_WITH_SHA256, ECDSA_WITH_SHA384, SessionSigner, rcgen_algorithm};

/// id-ecPublicKey.
pub(crate) const ID_EC_PUBLIC_KEY: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// pkcs-9 extensionRequest.
const ID_EXTENSION_REQ: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.14");
/// keyUsage.
pub(crate) const ID_CE_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
/// subjectKeyIdentifier.
pub(crate) const ID_CE_SKI: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");
/// basicConstraints.
pub(crate) const ID_CE_BASIC_CONSTRAINTS: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("2.5.29.19");
/// The role only the manifest signer's certificate carries: the extended key usage
/// id-kp-documentSigning (RFC 9336), which the manufacturer root issues to the manifest signer
/// and to no other certificate of the cell (the device CA's meter profile and the service API's
/// TLS profile never set it; `pki import` refuses it on any other role). Every manifest verifier
/// requires it, together with issuance by the root itself.
pub const MANIFEST_SIGNING_EKU: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.36");

/// The same, as arcs, for certificate builders.
pub const MANIFEST_SIGNING_EKU_ARCS: [u64; 9] = [1, 3, 6, 1, 5, 5, 7, 3, 36];

/// The role of the firmware-verification certificate, the anchor every meter checks firmware
/// against: id-kp-codeSigning. The station refuses, at start-up, a firmware-verification
/// certificate without it (so a meter's or a signer's certificate cannot stand in for it).
pub const CODE_SIGNING_EKU: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.3");

/// The same, as arcs, for certificate builders.
pub const CODE_SIGNING_EKU_ARCS: [u64; 9] = [1, 3, 6, 1, 5, 5, 7, 3, 3];

/// Whether `c` carries the extended key usage `oid`.
pub fn has_eku(c: &Certificate, oid: ObjectIdentifier) -> bool {
    c.tbs_certificate()
        .get_extension::<x509_cert::ext::pkix::ExtendedKeyUsage>()
        .ok()
        .flatten()
        .is_some_and(|(_, eku)| eku.0.contains(&oid))
}

/// Whether `c` carries the manifest signer's role ([`MANIFEST_SIGNING_EKU`]).
pub fn has_manifest_signing_role(c: &Certificate) -> bool {
    c.tbs_certificate()
        .get_extension::<x509_cert::ext::pkix::ExtendedKeyUsage>()
        .ok()
        .flatten()
        .is_some_and(|(_, eku)| eku.0.contains(&MANIFEST_SIGNING_EKU))
}

/// X.520 serialNumber attribute.
const ID_AT_SERIAL_NUMBER: [u64; 4] = [2, 5, 4, 5];

/// The one key usage a meter certificate carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterKeyUsage {
    /// digitalSignature: the meter's signing key.
    DigitalSignature,
    /// keyAgreement: the meter's key-agreement key.
    KeyAgreement,
}

/// What the profile puts into a meter certificate. Nothing else comes from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterProfile {
    /// The DLMS system title; the subject CN is its 16 upper-case hex digits.
    pub system_title: [u8; 8],
    /// The meter serial number (subject serialNumber, PrintableString).
    pub meter_serial: String,
    /// The manufacturer (subject O).
    pub manufacturer: String,
    /// digitalSignature or keyAgreement (critical).
    pub usage: MeterKeyUsage,
    /// The curve the model requires of the meter's key.
    pub curve: Curve,
    /// End of validity; `None` means 9999-12-31T23:59:59Z (RFC 5280 §4.1.2.5).
    pub not_after: Option<OffsetDateTime>,
}

/// An issued certificate, as parsed back from its own DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// The serial number's content octets, as parsed from the certificate.
    pub serial: Vec<u8>,
    /// SHA-256 of the DER.
    pub sha256: [u8; 32],
}

impl IssuedCertificate {
    /// The certificate as PEM.
    pub fn pem(&self) -> String {
        to_pem("CERTIFICATE", &self.der)
    }

    /// The serial in lower-case hex.
    pub fn serial_hex(&self) -> String {
        hex::encode(&self.serial)
    }

    /// The fingerprint in lower-case hex.
    pub fn fingerprint_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// A CA that issues through the HSM: its key pair and certificate.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// The CA's key pair in the token.
    pub key: KeyPairHandle,
    /// The CA's certificate, DER.
    pub cert_der: Vec<u8>,
    /// Where issuance verifies signatures.
    pub verification: Verification,
    params: rcgen::CertificateParams,
}

/// Where issuance verifies signatures: the request's proof of possession and the issued
/// certificate's signature (both are always verified; this only says by whom).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verification {
    /// In software (RustCrypto): scales with the station's CPUs and spends no HSM capacity.
    /// The right choice for a hardware HSM shared by many nests.
    #[default]
    Software,
    /// In the token (`C_Verify` with `CKM_ECDSA`; the request's key is imported as a session
    /// object for the call). Faster where the token computes in-process and faster than
    /// RustCrypto, as SoftHSM does on small machines.
    Token,
}

impl Issuer {
    /// Binds a key pair to its certificate (which must carry the pair's public key).
    pub fn new(key: KeyPairHandle, cert_der: Vec<u8>) -> Result<Self> {
        let cert = parse_der(&cert_der)?;
        let (curve, point) = ec_key_of(cert.tbs_certificate().subject_public_key_info())?;
        if curve != key.curve || point != key.point {
            return Err(CertError::KeyMismatch {
                role: "issuing ca".into(),
            }
            .into());
        }
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen_name(cert.tbs_certificate().subject())?;
        let ski = subject_key_identifier(&cert).unwrap_or_else(|| key_identifier(&point));
        params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(ski);
        Ok(Issuer {
            key,
            cert_der,
            verification: Verification::Software,
            params,
        })
    }

    /// The same issuer, verifying signatures as `verification` says.
    pub fn with_verification(mut self, verification: Verification) -> Self {
        self.verification = verification;
        self
    }

    /// Loads the key pair and certificate labelled `label` from the token.
    pub fn load(session: &HsmSession<'_>, label: &str) -> Result<Self> {
        let key = session.find_ec_keypair(label)?;
        let cert = session
            .find_certificate(label)?
            .ok_or_else(|| Error::ObjectNotFound {
                what: "certificate",
                label: label.to_owned(),
            })?;
        Issuer::new(key, cert)
    }

    pub(crate) fn rcgen_issuer<'s>(
        &'s self,
        session: &'s HsmSession<'s>,
    ) -> rcgen::Issuer<'s, SessionSigner<'s>> {
        rcgen::Issuer::from_params(&self.params, SessionSigner::new(session, &self.key))
    }
}

/// RFC 7093 method 1 key identifier: the leftmost 160 bits of SHA-256 of the public point.
pub fn key_identifier(point: &[u8]) -> Vec<u8> {
    sha2::Sha256::digest(point)[..20].to_vec()
}

/// Checks `csr_der` and issues a meter certificate for its key under `ca`, per `profile`.
pub fn issue_meter_certificate(
    session: &HsmSession<'_>,
    ca: &Issuer,
    csr_der: &[u8],
    profile: &MeterProfile,
) -> Result<IssuedCertificate> {
    let serial = random_serial(session)?;
    issue_with_serial(
        session,
        ca,
        &Subject::Csr(csr_der.to_vec()),
        profile,
        &serial,
    )
}

/// Whose key a meter certificate certifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// The key of a PKCS#10 request (checked: proof of possession, curve, no CA flag or unknown
    /// extension).
    Csr(Vec<u8>),
    /// A key pair the HSM generated for a meter without a key generator.
    Key {
        /// Its curve (must be the profile's).
        curve: Curve,
        /// Its uncompressed public point.
        point: Vec<u8>,
    },
}

/// Issues a meter certificate with a serial chosen (and committed to a journal) beforehand, so
/// that a crash between signing and recording leaves a known serial to void.
pub fn issue_with_serial(
    session: &HsmSession<'_>,
    ca: &Issuer,
    subject: &Subject,
    profile: &MeterProfile,
    serial: &[u8; 16],
) -> Result<IssuedCertificate> {
    if serial[0] == 0 || serial[0] & 0x80 != 0 {
        return Err(Error::InvalidInput(
            "a certificate serial must be 16 bytes, positive, with a non-zero first byte".into(),
        ));
    }
    let point = match subject {
        Subject::Csr(csr) => match ca.verification {
            Verification::Software => check_csr(csr, profile.curve)?,
            Verification::Token => check_csr_with(csr, profile.curve, |curve, point, msg, sig| {
                session.verify_with_point(curve, point, msg, sig)
            })?,
        },
        Subject::Key { curve, point } => {
            if *curve != profile.curve {
                return Err(Error::Profile(format!(
                    "the key is on {} but the model requires {}",
                    curve.name(),
                    profile.curve.name()
                )));
            }
            curve.check_point(point)?;
            point.clone()
        }
    };
    let mut params = meter_params(profile, &point)?;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
    let subject = SubjectKey {
        point,
        algorithm: rcgen_algorithm(profile.curve),
    };
    let issuer = ca.rcgen_issuer(session);
    let cert = params
        .signed_by(&subject, &issuer)
        .map_err(crate::signer::rcgen_error)?;
    match ca.verification {
        Verification::Software => parse_and_verify(cert.der(), ca.key.curve, &ca.key.point),
        Verification::Token => parse_and_verify_with(cert.der(), ca.key.curve, |msg, sig| {
            session.verify(&ca.key.public, msg, sig)
        }),
    }
}

/// What a TLS certificate of the cell's service API is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsUsage {
    /// A remote console: extended key usage clientAuth.
    Client,
    /// The daemon's TLS listener: extended key usage serverAuth.
    Server,
}

/// What the profile puts into a TLS certificate of the service API (issued by the device CA;
/// the explicit extended key usage keeps it apart from meter certificates, which carry none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsProfile {
    /// Subject CN: the console's or the host's name.
    pub name: String,
    /// Subject O.
    pub organization: String,
    /// Client or server.
    pub usage: TlsUsage,
    /// The subject's key.
    pub key: TlsKey,
    /// An OPC UA application instance certificate: the application URI (a URI subject
    /// alternative name), the key usages OPC 10000-6 §6.2.2 asks for, and both clientAuth and
    /// serverAuth.
    pub application_uri: Option<String>,
    /// Validity in days from now.
    pub days: u32,
    /// Server certificates: DNS names.
    pub dns_names: Vec<String>,
    /// Server certificates: IP addresses.
    pub ip_addresses: Vec<std::net::IpAddr>,
}

/// The public key a TLS or OPC UA certificate is issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsKey {
    /// An uncompressed P-256 point (the service API's TLS).
    P256(Vec<u8>),
    /// An RSA public key, PKCS#1 `RSAPublicKey` DER, 2048 to 4096 bits with exponent 65537
    /// (OPC UA's Basic256Sha256 and Aes256-Sha256-RsaPss security policies need RSA).
    Rsa(Vec<u8>),
}

impl TlsKey {
    /// The key as it goes into the certificate's subjectPublicKey, checked.
    fn checked(&self) -> Result<SubjectKey> {
        match self {
            TlsKey::P256(point) => {
                Curve::P256.check_point(point)?;
                Ok(SubjectKey {
                    point: point.clone(),
                    algorithm: rcgen_algorithm(Curve::P256),
                })
            }
            TlsKey::Rsa(der) => {
                use der::Decode;
                let k = pkcs1::RsaPublicKey::<der::asn1::UintRef<'_>>::from_der(der)
                    .map_err(|_| Error::Profile("the RSA public key is not PKCS#1 DER".into()))?;
                let bits = k.modulus.as_bytes().len() * 8;
                if !(2048..=4096).contains(&bits) || k.public_exponent.as_bytes() != [1, 0, 1] {
                    return Err(Error::Profile(format!(
                        "an RSA key must have 2048 to 4096 bits and the exponent 65537 (this one has {bits} bits)"
                    )));
                }
                Ok(SubjectKey {
                    point: der.clone(),
                    algorithm: &rcgen::PKCS_RSA_SHA256,
                })
            }
        }
    }
}

/// Issues a TLS certificate for the cell's service API, or an OPC UA application instance
/// certificate, under `ca`.
pub fn issue_tls_certificate(
    session: &HsmSession<'_>,
    ca: &Issuer,
    profile: &TlsProfile,
) -> Result<IssuedCertificate> {
    use rcgen::{DnType, DnValue};
    let name = profile.name.trim();
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Error::Profile(
            "the name must be 1 to 64 letters, digits, '-', '_' or '.'".into(),
        ));
    }
    if !(1..=825).contains(&profile.days) {
        return Err(Error::Profile("validity must be 1 to 825 days".into()));
    }
    let subject = profile.key.checked()?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        DnValue::Utf8String(profile.organization.trim().to_owned()),
    );
    dn.push(DnType::CommonName, DnValue::Utf8String(name.to_owned()));
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = dn;
    params.not_before = now();
    params.not_after = params.not_before + time::Duration::days(i64::from(profile.days));
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match profile.usage {
        TlsUsage::Client => rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        TlsUsage::Server => rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    }];
    if let Some(uri) = &profile.application_uri {
        let uri = rcgen::string::Ia5String::try_from(uri.trim())
            .ok()
            .filter(|u| u.as_str().contains(':') && u.as_str().len() <= 256)
            .ok_or_else(|| Error::Profile(format!("{uri:?} is not an application URI")))?;
        params.subject_alt_names.push(rcgen::SanType::URI(uri));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::ContentCommitment,
            rcgen::KeyUsagePurpose::KeyEncipherment,
            rcgen::KeyUsagePurpose::DataEncipherment,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
    }
    if profile.usage == TlsUsage::Server {
        for d in &profile.dns_names {
            let d = rcgen::string::Ia5String::try_from(d.as_str())
                .map_err(|_| Error::Profile(format!("{d:?} is not a DNS name")))?;
            params.subject_alt_names.push(rcgen::SanType::DnsName(d));
        }
        for ip in &profile.ip_addresses {
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(*ip));
        }
        if !params
            .subject_alt_names
            .iter()
            .any(|n| matches!(n, rcgen::SanType::DnsName(_) | rcgen::SanType::IpAddress(_)))
        {
            return Err(Error::Profile(
                "a server certificate needs the DNS names or IP addresses clients connect to"
                    .into(),
            ));
        }
    }
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(key_identifier(&subject.point));
    let serial = random_serial(session)?;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let issuer = ca.rcgen_issuer(session);
    let cert = params
        .signed_by(&subject, &issuer)
        .map_err(crate::signer::rcgen_error)?;
    parse_and_verify(cert.der(), ca.key.curve, &ca.key.point)
}

/// Issues a CRL from `ca` listing `serials` (content octets of each revoked certificate's
/// serial number) as revoked at `revoked_at`, numbered `number`, valid for `days`. RFC 5280 §5:
/// CRL number and authority key identifier extensions; DER.
pub fn issue_crl(
    session: &HsmSession<'_>,
    ca: &Issuer,
    serials: &[(Vec<u8>, OffsetDateTime)],
    number: u64,
    days: u32,
) -> Result<Vec<u8>> {
    let this_update = now();
    let params = rcgen::CertificateRevocationListParams {
        this_update,
        next_update: this_update + time::Duration::days(i64::from(days.max(1))),
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|(serial, at)| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(serial),
                revocation_time: (*at).min(this_update),
                reason_code: Some(rcgen::RevocationReason::CessationOfOperation),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::PreSpecified(
            subject_key_identifier(&parse_der(&ca.cert_der)?)
                .unwrap_or_else(|| key_identifier(&ca.key.point)),
        ),
    };
    let crl = params
        .signed_by(&ca.rcgen_issuer(session))
        .map_err(crate::signer::rcgen_error)?;
    Ok(crl.der().to_vec())
}

/// The subject public point of a certificate (DER).
pub fn subject_point(der: &[u8]) -> Result<Vec<u8>> {
    let cert = parse_der(der)?;
    Ok(ec_key_of(cert.tbs_certificate().subject_public_key_info())?.1)
}

fn meter_params(profile: &MeterProfile, point: &[u8]) -> Result<rcgen::CertificateParams> {
    use rcgen::{DnType, DnValue};
    let serial = &profile.meter_serial;
    if serial.is_empty() || serial.len() > 64 {
        return Err(Error::Profile(
            "the meter serial must have 1 to 64 characters".into(),
        ));
    }
    let serial_value = rcgen::string::PrintableString::try_from(serial.as_str()).map_err(|_| {
        Error::Profile(format!(
            "the meter serial {serial:?} has characters a PrintableString cannot hold (letters, digits, space and '()+,-./:=? only)"
        ))
    })?;
    let manufacturer = profile.manufacturer.trim();
    if manufacturer.is_empty() || manufacturer.len() > 64 {
        return Err(Error::Profile(
            "the manufacturer must have 1 to 64 characters".into(),
        ));
    }
    let not_before = now();
    let not_after = profile.not_after.unwrap_or_else(end_of_time);
    if not_after <= not_before {
        return Err(Error::Profile(
            "the end of validity lies in the past".into(),
        ));
    }
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        DnValue::Utf8String(manufacturer.to_owned()),
    );
    dn.push(
        DnType::CustomDnType(ID_AT_SERIAL_NUMBER.to_vec()),
        DnValue::PrintableString(serial_value),
    );
    dn.push(
        DnType::CommonName,
        DnValue::Utf8String(hex::encode_upper(profile.system_title)),
    );
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = dn;
    params.not_before = not_before;
    params.not_after = not_after;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![match profile.usage {
        MeterKeyUsage::DigitalSignature => rcgen::KeyUsagePurpose::DigitalSignature,
        MeterKeyUsage::KeyAgreement => rcgen::KeyUsagePurpose::KeyAgreement,
    }];
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(key_identifier(point));
    Ok(params)
}

/// A certificate serial: 16 bytes from the HSM's RNG with the top bit cleared (positive) and a
/// non-zero first byte, so that it is encoded as exactly 16 content octets.
pub fn random_serial(session: &HsmSession<'_>) -> Result<[u8; 16]> {
    for _ in 0..16 {
        let bytes = session.random(16)?;
        let mut serial: [u8; 16] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| Error::InvalidInput("the token returned too few random bytes".into()))?;
        serial[0] &= 0x7f;
        if serial[0] != 0 {
            return Ok(serial);
        }
    }
    Err(Error::InvalidInput(
        "the token's random generator keeps returning zero bytes; check the hsm".into(),
    ))
}

/// The current time, whole seconds, UTC.
pub(crate) fn now() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(0).unwrap_or(t)
}

/// 9999-12-31T23:59:59Z: "no well-defined expiration date" (RFC 5280 §4.1.2.5).
pub fn end_of_time() -> OffsetDateTime {
    time::Date::from_calendar_date(9999, time::Month::December, 31)
        .map(|d| {
            d.with_hms(23, 59, 59)
                .unwrap_or(time::PrimitiveDateTime::MAX)
        })
        .map(|d| d.assume_utc())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The subject's public key, for rcgen.
struct SubjectKey {
    /// The subjectPublicKey's bits: an EC point or a PKCS#1 RSA public key.
    point: Vec<u8>,
    algorithm: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for SubjectKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

/// Checks a PKCS#10 request for a meter key on `curve`; returns its public point.
pub fn check_csr(csr_der: &[u8], curve: Curve) -> Result<Vec<u8>, CsrError> {
    check_csr_with(csr_der, curve, |curve, point, msg, sig| {
        Ok(verify_ecdsa(curve, point, msg, sig))
    })
    .map_err(|e| match e {
        Error::Csr(e) => e,
        other => CsrError::Malformed(other.to_string()),
    })
}

/// [`check_csr`] with the signature check done by `verify(curve, point, msg, sig_der)`.
pub(crate) fn check_csr_with(
    csr_der: &[u8],
    curve: Curve,
    verify: impl FnOnce(Curve, &[u8], &[u8], &[u8]) -> Result<bool>,
) -> Result<Vec<u8>> {
    let req = CertReq::from_der(csr_der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    let (found, point) = ec_key_of(&req.info.public_key).map_err(|e| match e {
        Error::Cert(CertError::WrongCurve { found, .. }) => CsrError::WrongCurve {
            expected: curve.name(),
            found,
        },
        other => CsrError::BadKey(other.to_string()),
    })?;
    // Proof of possession first, with the curve the request claims.
    let expected_alg = signature_oid(found);
    if req.algorithm.oid != expected_alg {
        return Err(CsrError::UnsupportedSignatureAlgorithm(req.algorithm.oid.to_string()).into());
    }
    let tbs = req
        .info
        .to_der()
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    let sig = req.signature.as_bytes().ok_or_else(|| {
        CsrError::Malformed("the signature bit string is not octet-aligned".into())
    })?;
    if !verify(found, &point, &tbs, sig)? {
        return Err(CsrError::BadSignature.into());
    }
    if found != curve {
        return Err(CsrError::WrongCurve {
            expected: curve.name(),
            found: found.name().to_owned(),
        }
        .into());
    }
    for attr in req.info.attributes.iter() {
        if attr.oid != ID_EXTENSION_REQ {
            return Err(CsrError::UnexpectedAttribute {
                oid: attr.oid.to_string(),
            }
            .into());
        }
        for value in attr.values.iter() {
            let bytes = value
                .to_der()
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
            let exts = Vec::<Extension>::from_der(&bytes)
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
            for ext in exts {
                check_requested_extension(&ext)?;
            }
        }
    }
    Ok(point)
}

fn check_requested_extension(ext: &Extension) -> Result<(), CsrError> {
    if ext.extn_id == ID_CE_KEY_USAGE || ext.extn_id == ID_CE_SKI {
        return Ok(());
    }
    if ext.extn_id == ID_CE_BASIC_CONSTRAINTS {
        let bc = BasicConstraints::from_der(ext.extn_value.as_bytes())
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if bc.ca {
            return Err(CsrError::RequestsCa);
        }
    }
    Err(CsrError::UnexpectedExtension {
        oid: ext.extn_id.to_string(),
    })
}

fn signature_oid(curve: Curve) -> ObjectIdentifier {
    match curve {
        Curve::P256 => ECDSA_WITH_SHA256,
        Curve::P384 => ECDSA_WITH_SHA384,
    }
}

/// Verifies a DER ECDSA signature over `msg` (SHA-256 for P-256, SHA-384 for P-384).
pub fn verify_ecdsa(curve: Curve, point: &[u8], msg: &[u8], sig_der: &[u8]) -> bool {
    use signature::Verifier;
    match curve {
        Curve::P256 => {
            let (Ok(vk), Ok(sig)) = (
                p256::ecdsa::VerifyingKey::from_sec1_bytes(point),
                p256::ecdsa::DerSignature::from_bytes(sig_der),
            ) else {
                return false;
            };
            vk.verify(msg, &sig).is_ok()
        }
        Curve::P384 => {
            let (Ok(vk), Ok(sig)) = (
                p384::ecdsa::VerifyingKey::from_sec1_bytes(point),
                p384::ecdsa::DerSignature::from_bytes(sig_der),
            ) else {
                return false;
            };
            vk.verify(msg, &sig).is_ok()
        }
    }
}

/// The curve and point of an EC SubjectPublicKeyInfo.
pub(crate) fn ec_key_of(spki: &SubjectPublicKeyInfoOwned) -> Result<(Curve, Vec<u8>)> {
    if spki.algorithm.oid != ID_EC_PUBLIC_KEY {
        return Err(CertError::UnsupportedAlgorithm(format!(
            "a key of type {}",
            spki.algorithm.oid
        ))
        .into());
    }
    let params: &Any = spki
        .algorithm
        .parameters
        .as_ref()
        .ok_or_else(|| Error::InvalidInput("the ec key names no curve".into()))?;
    if params.tag() != Tag::ObjectIdentifier {
        return Err(Error::InvalidInput(
            "the ec key uses explicit curve parameters".into(),
        ));
    }
    let oid: ObjectIdentifier = params
        .decode_as()
        .map_err(|e: der::Error| Error::InvalidInput(e.to_string()))?;
    let curve = Curve::from_oid(&oid).ok_or_else(|| CertError::WrongCurve {
        expected: "p-256 or p-384".into(),
        found: oid.to_string(),
    })?;
    let point = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| {
            Error::InvalidInput("the public key bit string is not octet-aligned".into())
        })?
        .to_vec();
    curve.check_point(&point)?;
    Ok((curve, point))
}

/// Parses a DER certificate.
pub(crate) fn parse_der(der: &[u8]) -> Result<Certificate> {
    Certificate::from_der(der).map_err(|e| CertError::NotACertificate(e.to_string()).into())
}

/// Parses `der`, checks its signature against the issuer key, returns what callers store.
pub(crate) fn parse_and_verify(
    der: &[u8],
    issuer_curve: Curve,
    issuer_point: &[u8],
) -> Result<IssuedCertificate> {
    parse_and_verify_with(der, issuer_curve, |msg, sig| {
        Ok(verify_ecdsa(issuer_curve, issuer_point, msg, sig))
    })
}

/// Checks that `der` is a certificate `ca` signed (the signature only: names, validity and
/// extensions are the caller's to check).
pub fn verify_issued_by(der: &[u8], ca: &Issuer) -> Result<IssuedCertificate> {
    parse_and_verify(der, ca.key.curve, &ca.key.point)
}

/// [`parse_and_verify`] with the signature check done by `verify(tbs, sig_der)`.
fn parse_and_verify_with(
    der: &[u8],
    issuer_curve: Curve,
    verify: impl FnOnce(&[u8], &[u8]) -> Result<bool>,
) -> Result<IssuedCertificate> {
    let cert = parse_der(der)?;
    check_signature(&cert, issuer_curve, verify)?;
    Ok(IssuedCertificate {
        der: der.to_vec(),
        serial: cert.tbs_certificate().serial_number().as_bytes().to_vec(),
        sha256: sha2::Sha256::digest(der).into(),
    })
}

/// Checks that `cert` is signed by the EC key `point` on `curve`.
pub(crate) fn verify_signed_by(cert: &Certificate, curve: Curve, point: &[u8]) -> Result<()> {
    check_signature(cert, curve, |msg, sig| {
        Ok(verify_ecdsa(curve, point, msg, sig))
    })
}

fn check_signature(
    cert: &Certificate,
    curve: Curve,
    verify: impl FnOnce(&[u8], &[u8]) -> Result<bool>,
) -> Result<()> {
    let subject = cert.tbs_certificate().subject().to_string();
    let alg = cert.signature_algorithm().oid;
    if alg != ECDSA_WITH_SHA256 && alg != ECDSA_WITH_SHA384 {
        return Err(CertError::UnsupportedAlgorithm(format!("signature algorithm {alg}")).into());
    }
    let tbs = cert
        .tbs_certificate()
        .to_der()
        .map_err(|e| Error::Encoding(e.to_string()))?;
    let sig = cert.signature().as_bytes().unwrap_or_default();
    // The digest follows the signature algorithm; p256 verifies SHA-256, p384 SHA-384.
    let ok = alg == signature_oid(curve) && verify(&tbs, sig)?;
    if ok {
        Ok(())
    } else {
        Err(CertError::BadSignature { subject }.into())
    }
}

/// The subjectKeyIdentifier of `cert`, if present.
pub(crate) fn subject_key_identifier(cert: &Certificate) -> Option<Vec<u8>> {
    let ext = cert
        .tbs_certificate()
        .extensions()?
        .iter()
        .find(|e| e.extn_id == ID_CE_SKI)?;
    der::asn1::OctetString::from_der(ext.extn_value.as_bytes())
        .ok()
        .map(|o| o.as_bytes().to_vec())
}

/// An X.509 name as an rcgen name (single-valued RDNs of the usual string types only).
pub(crate) fn rcgen_name(name: &x509_cert::name::Name) -> Result<rcgen::DistinguishedName> {
    use rcgen::DnValue;
    let mut dn = rcgen::DistinguishedName::new();
    for rdn in name.iter_rdn() {
        if rdn.len() != 1 {
            return Err(Error::Encoding(format!(
                "the issuer name {name} has a multi-valued rdn, which cannot be reproduced"
            )));
        }
        for atv in rdn.iter() {
            let arcs: Vec<u64> = atv.oid.arcs().map(u64::from).collect();
            let ty = rcgen::DnType::from_oid(&arcs);
            let text = || {
                String::from_utf8(atv.value.value().to_vec())
                    .map_err(|e| Error::Encoding(e.to_string()))
            };
            let value = match atv.value.tag() {
                Tag::Utf8String => DnValue::Utf8String(text()?),
                Tag::PrintableString => DnValue::PrintableString(
                    rcgen::string::PrintableString::try_from(text()?)
                        .map_err(|e| Error::Encoding(e.to_string()))?,
                ),
                Tag::Ia5String => DnValue::Ia5String(
                    rcgen::string::Ia5String::try_from(text()?)
                        .map_err(|e| Error::Encoding(e.to_string()))?,
                ),
                other => {
                    return Err(Error::Encoding(format!(
                        "the issuer name {name} uses a {other} value, which cannot be reproduced"
                    )));
                }
            };
            dn.push(ty, value);
        }
    }
    Ok(dn)
}

/// PEM of `der` with `label`, LF line endings.
pub(crate) fn to_pem(label: &str, der: &[u8]) -> String {
    // Encoding fails only for labels with invalid characters; ours are constants.
    der::pem::encode_string(label, der::pem::LineEnding::LF, der).unwrap_or_default()
}

/// DER SubjectPublicKeyInfo of an EC public key.
pub fn ec_spki_der(curve: Curve, point: &[u8]) -> Result<Vec<u8>> {
    let enc = |e: der::Error| Error::Encoding(e.to_string());
    let spki = SubjectPublicKeyInfoOwned {
        algorithm: spki::AlgorithmIdentifierOwned {
            oid: ID_EC_PUBLIC_KEY,
            parameters: Some(Any::encode_from(&curve.oid()).map_err(enc)?),
        },
        subject_public_key: der::asn1::BitString::from_bytes(point).map_err(enc)?,
    };
    spki.to_der().map_err(enc)
}

/// PEM ("PUBLIC KEY") of an EC public key, as `openssl pkey -pubin` reads it.
pub fn ec_public_key_pem(curve: Curve, point: &[u8]) -> Result<String> {
    Ok(to_pem("PUBLIC KEY", &ec_spki_der(curve, point)?))
}
