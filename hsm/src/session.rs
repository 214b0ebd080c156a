//! Operations on one pooled session: key generation, signing, wrapping, ECDH, imports.
//!
//! [`HsmSession`] is what the closures given to [`crate::Hsm::run`] and
//! [`crate::Hsm::with_session`] receive. Every key it creates takes its attributes from the
//! policy table ([`crate::policy`]); every object creation, destruction and search happens
//! behind the pool's one object lock; handles of token objects are cached by label.
//!
//! Keys are referred to by [`KeyHandle`], which remembers whether the object is a token object
//! (found again by label after a reconnect) or a session object (valid only while the session
//! that created it lives).
//!
//! This module never returns secret or private key material in clear: the only values it reads
//! back are public points, public certificates and key check values.

use std::sync::Arc;

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::misc::KeyDerivationStringData;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{
    Attribute, AttributeType, CertificateType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use der::{Decode, Encode};
use sha2::Digest;

use crate::error::{CkResultExt, Error, Result};
use crate::mechanisms::{self, Mechanisms, OaepHash};
use crate::policy::{self, Class, KeyFamily, KeyRole};
use crate::pool::{Hsm, Inner, ObjectCache};
use crate::sync::lock;

/// An elliptic curve this crate handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    /// NIST P-256 (secp256r1), DLMS suite 1.
    P256,
    /// NIST P-384 (secp384r1), DLMS suite 2.
    P384,
}

const P256_OID_DER: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID_DER: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

impl Curve {
    /// DER of the curve's OID, as CKA_EC_PARAMS carries it.
    pub fn ec_params(self) -> &'static [u8] {
        match self {
            Curve::P256 => &P256_OID_DER,
            Curve::P384 => &P384_OID_DER,
        }
    }

    /// Length of an uncompressed SEC1 point.
    pub fn point_len(self) -> usize {
        match self {
            Curve::P256 => 65,
            Curve::P384 => 97,
        }
    }

    /// Human name.
    pub fn name(self) -> &'static str {
        match self {
            Curve::P256 => "p-256",
            Curve::P384 => "p-384",
        }
    }

    /// The curve's OID.
    pub fn oid(self) -> der::oid::ObjectIdentifier {
        match self {
            Curve::P256 => der::oid::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7"),
            Curve::P384 => der::oid::ObjectIdentifier::new_unwrap("1.3.132.0.34"),
        }
    }

    /// The curve named by `oid`, if it is one of ours.
    pub fn from_oid(oid: &der::oid::ObjectIdentifier) -> Option<Curve> {
        [Curve::P256, Curve::P384]
            .into_iter()
            .find(|c| c.oid() == *oid)
    }

    pub(crate) fn from_ec_params(params: &[u8]) -> Option<Curve> {
        match params {
            p if p == P256_OID_DER => Some(Curve::P256),
            p if p == P384_OID_DER => Some(Curve::P384),
            _ => None,
        }
    }

    /// Checks that `point` is a valid uncompressed point on this curve.
    pub fn check_point(self, point: &[u8]) -> Result<()> {
        let ok = point.len() == self.point_len()
            && point.first() == Some(&0x04)
            && match self {
                Curve::P256 => p256::PublicKey::from_sec1_bytes(point).is_ok(),
                Curve::P384 => p384::PublicKey::from_sec1_bytes(point).is_ok(),
            };
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "not an uncompressed {} point on the curve",
                self.name()
            )))
        }
    }
}

/// AES key sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AesKeySize {
    /// 128-bit (DLMS suite 0/1).
    Aes128,
    /// 256-bit (DLMS suite 2, transport keys).
    Aes256,
}

impl AesKeySize {
    /// Length in bytes.
    pub fn bytes(self) -> usize {
        match self {
            AesKeySize::Aes128 => 16,
            AesKeySize::Aes256 => 32,
        }
    }
}

/// Wrapping mechanisms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrapAlg {
    /// RFC 3394 AES key wrap (CKM_AES_KEY_WRAP).
    AesKw,
    /// RFC 5649 AES key wrap with padding (CKM_AES_KEY_WRAP_PAD, 0x210A).
    AesKwPad,
    /// RSA-OAEP with the hash chosen at open time ([`Mechanisms::rsa_oaep`]), empty label.
    RsaOaep,
    /// RSA-OAEP with a given hash (the utility side follows what the manifest says), empty label.
    RsaOaepWith(OaepHash),
    /// RSA-OAEP with a given hash and a label (at most [`OaepLabel::MAX`] bytes), on tokens that
    /// take one ([`Mechanisms::oaep_label`]).
    RsaOaepLabelled(OaepHash, OaepLabel),
}

/// An RSA-OAEP label, held inline so that [`WrapAlg`] stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct OaepLabel {
    len: u8,
    bytes: [u8; OaepLabel::MAX],
}

impl OaepLabel {
    /// The longest label (a work order has at most 32 bytes).
    pub const MAX: usize = 64;

    /// A label of `bytes`; `None` when it is longer than [`OaepLabel::MAX`].
    pub fn new(bytes: &[u8]) -> Option<OaepLabel> {
        let mut l = OaepLabel {
            len: u8::try_from(bytes.len())
                .ok()
                .filter(|n| usize::from(*n) <= Self::MAX)?,
            bytes: [0; Self::MAX],
        };
        l.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(l)
    }

    /// The label.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for OaepLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OaepLabel({:?})",
            String::from_utf8_lossy(self.as_bytes())
        )
    }
}

/// What kind of key (or object) a handle refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// EC private key.
    EcPrivate(Curve),
    /// EC public key.
    EcPublic(Curve),
    /// AES key of this many bytes.
    Aes(usize),
    /// RSA public key.
    RsaPublic,
    /// RSA private key.
    RsaPrivate,
    /// X.509 certificate.
    Certificate,
    /// Generic secret (HMAC) of this many bytes.
    Hmac(usize),
}

impl KeyKind {
    fn class(self) -> ObjectClass {
        match self {
            KeyKind::EcPrivate(_) | KeyKind::RsaPrivate => ObjectClass::PRIVATE_KEY,
            KeyKind::EcPublic(_) | KeyKind::RsaPublic => ObjectClass::PUBLIC_KEY,
            KeyKind::Aes(_) | KeyKind::Hmac(_) => ObjectClass::SECRET_KEY,
            KeyKind::Certificate => ObjectClass::CERTIFICATE,
        }
    }

    fn class_code(self) -> u64 {
        match self {
            KeyKind::EcPrivate(_) | KeyKind::RsaPrivate => 3,
            KeyKind::EcPublic(_) | KeyKind::RsaPublic => 2,
            KeyKind::Aes(_) | KeyKind::Hmac(_) => 4,
            KeyKind::Certificate => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// A token object: found again by label after a reconnect.
    Token { label: Arc<str> },
    /// A session object created on pooled session `owner`.
    Session { owner: u64 },
}

/// A reference to an object in the token. It carries no secret (only the object's number,
/// label and kind) and is cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHandle {
    handle: ObjectHandle,
    generation: u64,
    scope: Scope,
    kind: KeyKind,
    role: Option<KeyRole>,
}

impl KeyHandle {
    /// The kind of object.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The policy role the key was made for, if known.
    pub fn role(&self) -> Option<KeyRole> {
        self.role
    }

    /// The label of a token object (`None` for session objects).
    pub fn label(&self) -> Option<&str> {
        match &self.scope {
            Scope::Token { label } => Some(label),
            Scope::Session { .. } => None,
        }
    }

    /// True for token (persistent) objects.
    pub fn is_token_object(&self) -> bool {
        matches!(self.scope, Scope::Token { .. })
    }

    /// The curve of an EC key.
    pub fn curve(&self) -> Option<Curve> {
        match self.kind {
            KeyKind::EcPrivate(c) | KeyKind::EcPublic(c) => Some(c),
            _ => None,
        }
    }

    /// The raw PKCS#11 object handle, for tests that must prove what the token refuses.
    #[doc(hidden)]
    pub fn raw_handle_for_tests(&self) -> ObjectHandle {
        self.handle
    }
}

/// An EC key pair in the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPairHandle {
    /// The private key.
    pub private: KeyHandle,
    /// The public key object.
    pub public: KeyHandle,
    /// Its curve.
    pub curve: Curve,
    /// Uncompressed SEC1 public point.
    pub point: Vec<u8>,
    /// CKA_ID shared by the pair and its certificate (token keys; empty for session keys).
    pub id: Vec<u8>,
}

/// An RSA key pair in the token (the utility side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaKeyPairHandle {
    /// The private key.
    pub private: KeyHandle,
    /// The public key object.
    pub public: KeyHandle,
    /// Modulus, big-endian.
    pub modulus: Vec<u8>,
    /// Public exponent, big-endian.
    pub exponent: Vec<u8>,
}

impl RsaKeyPairHandle {
    /// The public key as a DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Result<Vec<u8>> {
        rsa_spki_der(&self.modulus, &self.exponent)
    }
}

/// The key attributes that say what a key may do (read back from the token; nothing secret).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFlags {
    /// CKA_TOKEN.
    pub token: bool,
    /// CKA_PRIVATE.
    pub private: bool,
    /// CKA_SENSITIVE.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE.
    pub extractable: bool,
    /// CKA_SIGN.
    pub sign: bool,
    /// CKA_VERIFY.
    pub verify: bool,
    /// CKA_WRAP.
    pub wrap: bool,
    /// CKA_UNWRAP.
    pub unwrap: bool,
    /// CKA_DERIVE.
    pub derive: bool,
    /// CKA_ENCRYPT.
    pub encrypt: bool,
    /// CKA_DECRYPT.
    pub decrypt: bool,
    /// CKA_WRAP_WITH_TRUSTED.
    pub wrap_with_trusted: bool,
    /// CKA_TRUSTED.
    pub trusted: bool,
    /// CKA_ALWAYS_AUTHENTICATE (private keys): a log-in before every use.
    pub always_authenticate: bool,
    /// CKA_ALLOWED_MECHANISMS as the token reports it (`None`: it reports none).
    pub allowed_mechanisms: Option<Vec<u64>>,
}

impl std::fmt::Display for KeyFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let flags = [
            (self.token, "token"),
            (self.private, "private"),
            (self.sensitive, "sensitive"),
            (self.extractable, "extractable"),
            (self.sign, "sign"),
            (self.verify, "verify"),
            (self.wrap, "wrap"),
            (self.unwrap, "unwrap"),
            (self.derive, "derive"),
            (self.encrypt, "encrypt"),
            (self.decrypt, "decrypt"),
            (self.wrap_with_trusted, "wrap-with-trusted"),
            (self.trusted, "trusted"),
            (self.always_authenticate, "always-authenticate"),
        ];
        let on: Vec<&str> = flags.iter().filter(|(b, _)| *b).map(|(_, n)| *n).collect();
        f.write_str(&on.join(","))
    }
}

/// One pooled session, lent to an operation.
pub struct HsmSession<'a> {
    hsm: &'a Hsm,
    session: &'a Session,
    id: u64,
    generation: u64,
}

impl std::fmt::Debug for HsmSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmSession")
            .field("id", &self.id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl<'a> HsmSession<'a> {
    pub(crate) fn new(hsm: &'a Hsm, session: &'a Session, id: u64, generation: u64) -> Self {
        HsmSession {
            hsm,
            session,
            id,
            generation,
        }
    }

    fn inner(&self) -> &Inner {
        &self.hsm.inner
    }

    /// The pool this session belongs to.
    pub fn hsm(&self) -> &Hsm {
        self.hsm
    }

    /// What the token offers and what was chosen.
    pub fn mechanisms(&self) -> &Mechanisms {
        &self.inner().mechanisms
    }

    /// The raw cryptoki session, for tests that must prove what the token refuses.
    #[doc(hidden)]
    pub fn raw_session_for_tests(&self) -> &Session {
        self.session
    }

    // ----- handles -------------------------------------------------------------------------

    fn handle_for(
        &self,
        handle: ObjectHandle,
        kind: KeyKind,
        role: Option<KeyRole>,
        label: Option<&str>,
    ) -> KeyHandle {
        let scope = match label {
            Some(l) => Scope::Token {
                label: Arc::from(l),
            },
            None => Scope::Session { owner: self.id },
        };
        KeyHandle {
            handle,
            generation: self.generation,
            scope,
            kind,
            role,
        }
    }

    /// The current object handle behind `key`.
    pub(crate) fn resolve(&self, key: &KeyHandle) -> Result<ObjectHandle> {
        match &key.scope {
            Scope::Session { owner } => {
                if key.generation == self.generation && self.inner().is_alive(*owner) {
                    Ok(key.handle)
                } else {
                    Err(Error::SessionObjectLost)
                }
            }
            Scope::Token { label } => {
                if key.generation == self.generation {
                    return Ok(key.handle);
                }
                let mut cache = lock(&self.inner().objects);
                self.find_one_locked(&mut cache, key.kind, label)?
                    .ok_or_else(|| Error::ObjectNotFound {
                        what: kind_name(key.kind),
                        label: label.to_string(),
                    })
            }
        }
    }

    fn find_one_locked(
        &self,
        cache: &mut ObjectCache,
        kind: KeyKind,
        label: &str,
    ) -> Result<Option<ObjectHandle>> {
        let key = (kind.class_code(), label.to_owned());
        if let Some(h) = cache.handles.get(&key) {
            return Ok(Some(*h));
        }
        let found = self
            .session
            .find_objects(&[
                Attribute::Class(kind.class()),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .ck("find objects")?;
        match found.as_slice() {
            [] => Ok(None),
            [h] => {
                cache.handles.insert(key, *h);
                Ok(Some(*h))
            }
            many => Err(Error::DuplicateObjects {
                label: label.to_owned(),
                count: many.len(),
            }),
        }
    }

    /// Finds a token object of `kind`'s class by label.
    fn find_token_object(&self, kind: KeyKind, label: &str) -> Result<Option<ObjectHandle>> {
        let mut cache = lock(&self.inner().objects);
        self.find_one_locked(&mut cache, kind, label)
    }

    // ----- random --------------------------------------------------------------------------

    /// `len` random bytes from the token's RNG.
    pub fn random(&self, len: usize) -> Result<Vec<u8>> {
        let len =
            u32::try_from(len).map_err(|_| Error::InvalidInput("too many random bytes".into()))?;
        self.session
            .generate_random_vec(len)
            .ck("generate random bytes")
    }

    // ----- key generation ------------------------------------------------------------------

    /// Generates an EC key pair for `role`. Token roles get CKA_LABEL (`label`, default the
    /// role's label) and a random CKA_ID; session roles get neither.
    pub fn generate_ec_keypair(
        &self,
        role: KeyRole,
        curve: Curve,
        label: Option<&str>,
    ) -> Result<KeyPairHandle> {
        let row = policy::policy(role);
        let public_policy = match (row.family, row.public) {
            (KeyFamily::EcPair, Some(p)) => p,
            _ => {
                return Err(Error::InvalidInput(format!(
                    "{role:?} is not an ec key pair role"
                )));
            }
        };
        let label = if row.key.token {
            Some(label.or(row.label).unwrap_or("unnamed"))
        } else {
            None
        };
        let id = if row.key.token {
            self.random(16)?
        } else {
            Vec::new()
        };
        let naming = |label: Option<&str>| -> Vec<Attribute> {
            label
                .map(|l| {
                    vec![
                        Attribute::Label(l.as_bytes().to_vec()),
                        Attribute::Id(id.clone()),
                    ]
                })
                .unwrap_or_default()
        };
        let mut pub_extra = vec![
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(curve.ec_params().to_vec()),
        ];
        pub_extra.extend(naming(label));
        let pub_t = public_policy.template(Class::Public, pub_extra);
        let mut priv_extra = vec![Attribute::KeyType(KeyType::EC)];
        priv_extra.extend(naming(label));
        let priv_t = row.key.template(Class::Private, priv_extra);
        let mut cache = lock(&self.inner().objects);
        if let Some(l) = label
            && self
                .find_one_locked(&mut cache, KeyKind::EcPrivate(curve), l)?
                .is_some()
        {
            return Err(Error::RoleExists {
                label: l.to_owned(),
                what: "private key",
            });
        }
        let (pub_h, priv_h) = self
            .session
            .generate_key_pair(&Mechanism::EccKeyPairGen, &pub_t, &priv_t)
            .ck("generate an ec key pair with CKM_EC_KEY_PAIR_GEN")?;
        let point = match self.read_ec_point(pub_h, curve) {
            Ok(p) => p,
            Err(e) => {
                let _ = self.session.destroy_object(priv_h);
                let _ = self.session.destroy_object(pub_h);
                return Err(e);
            }
        };
        if let Some(l) = label {
            cache.handles.insert(
                (KeyKind::EcPrivate(curve).class_code(), l.to_owned()),
                priv_h,
            );
            cache
                .handles
                .insert((KeyKind::EcPublic(curve).class_code(), l.to_owned()), pub_h);
        }
        drop(cache);
        Ok(KeyPairHandle {
            private: self.handle_for(priv_h, KeyKind::EcPrivate(curve), Some(role), label),
            public: self.handle_for(pub_h, KeyKind::EcPublic(curve), Some(role), label),
            curve,
            point,
            id,
        })
    }

    fn read_ec_point(&self, public: ObjectHandle, curve: Curve) -> Result<Vec<u8>> {
        let attrs = self
            .session
            .get_attributes(public, &[AttributeType::EcPoint])
            .ck("read the public point")?;
        let raw = attrs
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .ok_or_else(|| Error::InvalidInput("the public key has no CKA_EC_POINT".into()))?;
        let point = decode_ec_point(&raw, curve)?;
        curve.check_point(&point)?;
        Ok(point)
    }

    /// The policy of an AES key of `role` on this token: the table's, and, where the token gives
    /// no CKA_CHECK_VALUE and the role needs a check value, allowed ECB for it.
    pub fn aes_policy(&self, role: KeyRole) -> policy::ObjectPolicy {
        let mut p = policy::policy(role).key;
        if !self.mechanisms().check_value && policy::needs_check_value(role) {
            p = p.with_ecb_check_value();
        }
        if !self.inner().trusted_wrap {
            // A token that cannot mark a key trusted could never wrap such a key.
            p.wrap_with_trusted = false;
        }
        p
    }

    /// Generates an AES key for `role`. Token roles are labelled `label` (required for them).
    pub fn generate_aes_key(
        &self,
        role: KeyRole,
        size: AesKeySize,
        label: Option<&str>,
    ) -> Result<KeyHandle> {
        let row = policy::policy(role);
        if row.family != KeyFamily::Aes {
            return Err(Error::InvalidInput(format!(
                "{role:?} is not an aes key role"
            )));
        }
        let label = match (row.key.token, label) {
            (true, Some(l)) => Some(l),
            (true, None) => {
                return Err(Error::InvalidInput(format!(
                    "{role:?} keys are token objects and need a label"
                )));
            }
            (false, _) => None,
        };
        let mut extra = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen((size.bytes() as u64).into()),
        ];
        if let Some(l) = label {
            extra.push(Attribute::Label(l.as_bytes().to_vec()));
            extra.push(Attribute::Id(self.random(16)?));
        }
        let t = self.aes_policy(role).template(Class::Secret, extra);
        let kind = KeyKind::Aes(size.bytes());
        let mut cache = lock(&self.inner().objects);
        if let Some(l) = label
            && self.find_one_locked(&mut cache, kind, l)?.is_some()
        {
            return Err(Error::RoleExists {
                label: l.to_owned(),
                what: "secret key",
            });
        }
        let h = self
            .session
            .generate_key(&Mechanism::AesKeyGen, &t)
            .ck("generate an aes key with CKM_AES_KEY_GEN")?;
        if let Some(l) = label {
            cache.handles.insert((kind.class_code(), l.to_owned()), h);
        }
        drop(cache);
        Ok(self.handle_for(h, kind, Some(role), label))
    }

    /// Generates an RSA key pair for the utility side ([`KeyRole::UtilityTransportPair`]).
    pub fn generate_rsa_keypair(&self, bits: u32, label: &str) -> Result<RsaKeyPairHandle> {
        if !self.mechanisms().rsa_keygen {
            return Err(Error::MechanismMissing {
                mechanism: "CKM_RSA_PKCS_KEY_PAIR_GEN",
                purpose: "rsa transport key pairs",
            });
        }
        let row = policy::policy(KeyRole::UtilityTransportPair);
        let public_policy = row
            .public
            .ok_or_else(|| Error::InvalidInput("policy row without a public half".into()))?;
        let id = self.random(16)?;
        let pub_t = public_policy.template(
            Class::Public,
            [
                Attribute::KeyType(KeyType::RSA),
                Attribute::ModulusBits(u64::from(bits).into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.clone()),
            ],
        );
        let priv_t = row.key.template(
            Class::Private,
            [
                Attribute::KeyType(KeyType::RSA),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id),
            ],
        );
        let mut cache = lock(&self.inner().objects);
        if self
            .find_one_locked(&mut cache, KeyKind::RsaPrivate, label)?
            .is_some()
        {
            return Err(Error::RoleExists {
                label: label.to_owned(),
                what: "private key",
            });
        }
        let (pub_h, priv_h) = self
            .session
            .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &pub_t, &priv_t)
            .ck("generate an rsa key pair with CKM_RSA_PKCS_KEY_PAIR_GEN")?;
        let attrs = self
            .session
            .get_attributes(
                pub_h,
                &[AttributeType::Modulus, AttributeType::PublicExponent],
            )
            .ck("read the rsa public key");
        let (mut modulus, mut exponent) = (Vec::new(), Vec::new());
        for a in attrs.unwrap_or_default() {
            match a {
                Attribute::Modulus(m) => modulus = m,
                Attribute::PublicExponent(e) => exponent = e,
                _ => {}
            }
        }
        if modulus.is_empty() || exponent.is_empty() {
            let _ = self.session.destroy_object(priv_h);
            let _ = self.session.destroy_object(pub_h);
            return Err(Error::InvalidInput(
                "the token did not return the rsa public key".into(),
            ));
        }
        cache
            .handles
            .insert((KeyKind::RsaPrivate.class_code(), label.to_owned()), priv_h);
        cache
            .handles
            .insert((KeyKind::RsaPublic.class_code(), label.to_owned()), pub_h);
        drop(cache);
        let role = Some(KeyRole::UtilityTransportPair);
        Ok(RsaKeyPairHandle {
            private: self.handle_for(priv_h, KeyKind::RsaPrivate, role, Some(label)),
            public: self.handle_for(pub_h, KeyKind::RsaPublic, role, Some(label)),
            modulus,
            exponent,
        })
    }

    // ----- the two key-transport operations of the jig line protocol ----------------------

    /// An ephemeral P-256 key pair for one secure channel: session objects, the private key
    /// sensitive, non-extractable and derive-only. Returns the private key and the 65-byte
    /// uncompressed public point. The public key object is not kept.
    pub fn generate_kt_keypair(&self) -> Result<(KeyHandle, [u8; 65])> {
        let pair = self.generate_ec_keypair(KeyRole::KeyTransportAgreement, Curve::P256, None)?;
        let point: [u8; 65] = pair.point.as_slice().try_into().map_err(|_| {
            Error::InvalidInput("the token returned a point of the wrong length".into())
        })?;
        if let Err(e) = self.destroy(&pair.public) {
            let _ = self.destroy(&pair.private);
            return Err(e);
        }
        Ok((pair.private, point))
    }

    /// The key-transport key of a secure channel: ECDH (null KDF) of `kt_private` with the
    /// meter's ephemeral point into an intermediate AES-256 key (value = x-coordinate), then
    /// `CKM_AES_ECB_ENCRYPT_DATA` of `data` under it. The result is a session AES-256 key that can
    /// only wrap; the intermediate key is destroyed.
    ///
    /// With `data = line_protocol::crypto::ktk_derivation_data(th)` the key equals
    /// `line_protocol::crypto::ktk_from_shared(z, th)`.
    pub fn derive_ktk(
        &self,
        kt_private: &KeyHandle,
        meter_eph_pub: &[u8; 65],
        data: &[u8; 32],
    ) -> Result<KeyHandle> {
        if !self.mechanisms().aes_ecb_encrypt_data {
            return Err(Error::MechanismMissing {
                mechanism: "CKM_AES_ECB_ENCRYPT_DATA",
                purpose: "the key-transport key",
            });
        }
        if !self.mechanisms().ktk_aes_ecb {
            return Err(Error::MechanismMissing {
                mechanism: "CKM_ECDH1_DERIVE with the null KDF",
                purpose: "the AES-ECB key-transport key",
            });
        }
        let z = self.ecdh_derive(
            kt_private,
            meter_eph_pub,
            KeyRole::KeyTransportSecret,
            AesKeySize::Aes256,
        )?;
        let result = self.derive_encrypt_data(&z, data, KeyRole::KeyTransport);
        let destroyed = self.destroy(&z);
        let ktk = result?;
        if let Err(e) = destroyed {
            let _ = self.destroy(&ktk);
            return Err(e);
        }
        Ok(ktk)
    }

    /// The key-transport key of a secure channel by the line protocol's X9.63 construction:
    /// `CKM_ECDH1_DERIVE` of `kt_private` with the meter's ephemeral point, `CKD_SHA256_KDF`
    /// with `shared_info` (`line_protocol::crypto::ktk_x963_shared_info(th)`), straight into a
    /// session AES-256 key that can only wrap. It equals
    /// `line_protocol::crypto::ktk_x963_from_shared(z, th)`.
    pub fn derive_ktk_x963(
        &self,
        kt_private: &KeyHandle,
        meter_eph_pub: &[u8; 65],
        shared_info: &[u8],
    ) -> Result<KeyHandle> {
        if !self.mechanisms().ktk_x963 {
            return Err(Error::MechanismMissing {
                mechanism: "CKM_ECDH1_DERIVE with CKD_SHA256_KDF",
                purpose: "the X9.63 key-transport key",
            });
        }
        if !matches!(kt_private.kind, KeyKind::EcPrivate(Curve::P256)) {
            return Err(Error::InvalidInput(
                "the key transport needs a p-256 private key".into(),
            ));
        }
        Curve::P256.check_point(meter_eph_pub)?;
        let base = self.resolve(kt_private)?;
        let t = self.aes_policy(KeyRole::KeyTransport).template(
            Class::Secret,
            [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
            ],
        );
        let params = Ecdh1DeriveParams::new(EcKdf::sha256(shared_info), meter_eph_pub);
        let _guard = lock(&self.inner().objects);
        let h = self
            .session
            .derive_key(&Mechanism::Ecdh1Derive(params), base, &t)
            .ck("derive the key-transport key with CKM_ECDH1_DERIVE (CKD_SHA256_KDF)")?;
        Ok(self.handle_for(h, KeyKind::Aes(32), Some(KeyRole::KeyTransport), None))
    }

    /// ECDH (CKM_ECDH1_DERIVE, null KDF) of `private` with `peer_point` into an AES key of
    /// `size` for `role` (session roles only). The key's value is the x-coordinate.
    pub fn ecdh_derive(
        &self,
        private: &KeyHandle,
        peer_point: &[u8],
        role: KeyRole,
        size: AesKeySize,
    ) -> Result<KeyHandle> {
        if !self.mechanisms().ecdh {
            return Err(Error::MechanismMissing {
                mechanism: "CKM_ECDH1_DERIVE",
                purpose: "ecdh key agreement",
            });
        }
        let curve = match private.kind {
            KeyKind::EcPrivate(c) => c,
            _ => return Err(Error::InvalidInput("ecdh needs an ec private key".into())),
        };
        curve.check_point(peer_point)?;
        let row = policy::policy(role);
        if row.family != KeyFamily::Aes || row.key.token {
            return Err(Error::InvalidInput(format!(
                "{role:?} is not a session aes key role"
            )));
        }
        let base = self.resolve(private)?;
        let t = row.key.template(
            Class::Secret,
            [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen((size.bytes() as u64).into()),
            ],
        );
        let params = Ecdh1DeriveParams::new(EcKdf::null(), peer_point);
        let _guard = lock(&self.inner().objects);
        let h = self
            .session
            .derive_key(&Mechanism::Ecdh1Derive(params), base, &t)
            .ck("derive an ecdh secret with CKM_ECDH1_DERIVE (null kdf)")?;
        Ok(self.handle_for(h, KeyKind::Aes(size.bytes()), Some(role), None))
    }

    fn derive_encrypt_data(
        &self,
        base: &KeyHandle,
        data: &[u8; 32],
        role: KeyRole,
    ) -> Result<KeyHandle> {
        let row = policy::policy(role);
        let base_h = self.resolve(base)?;
        let t = row.key.template(
            Class::Secret,
            [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
            ],
        );
        let params = KeyDerivationStringData::new(data);
        let _guard = lock(&self.inner().objects);
        let h = self
            .session
            .derive_key(&mechanisms::aes_ecb_encrypt_data(&params), base_h, &t)
            .ck("derive the key-transport key with CKM_AES_ECB_ENCRYPT_DATA")?;
        Ok(self.handle_for(h, KeyKind::Aes(32), Some(role), None))
    }

    // ----- signing -------------------------------------------------------------------------

    /// ECDSA over `msg` (SHA-256 for P-256, SHA-384 for P-384, hashed in software) with an EC
    /// private key; returns the DER signature.
    pub fn sign(&self, key: &KeyHandle, msg: &[u8]) -> Result<Vec<u8>> {
        let curve = match key.kind {
            KeyKind::EcPrivate(c) => c,
            _ => return Err(Error::InvalidInput("ecdsa needs an ec private key".into())),
        };
        let h = self.resolve(key)?;
        let der = match curve {
            Curve::P256 => {
                let digest = sha2::Sha256::digest(msg);
                let raw = transient(|| self.session.sign(&Mechanism::Ecdsa, h, &digest))
                    .ck("sign with CKM_ECDSA")?;
                p256::ecdsa::Signature::from_slice(&raw)
                    .map_err(|_| {
                        Error::InvalidInput("the token returned a malformed signature".into())
                    })?
                    .to_der()
                    .as_bytes()
                    .to_vec()
            }
            Curve::P384 => {
                let digest = sha2::Sha384::digest(msg);
                let raw = transient(|| self.session.sign(&Mechanism::Ecdsa, h, &digest))
                    .ck("sign with CKM_ECDSA")?;
                p384::ecdsa::Signature::from_slice(&raw)
                    .map_err(|_| {
                        Error::InvalidInput("the token returned a malformed signature".into())
                    })?
                    .to_der()
                    .as_bytes()
                    .to_vec()
            }
        };
        Ok(der)
    }

    /// Verifies a DER ECDSA signature over `msg` (hashed in software as in [`Self::sign`])
    /// with an EC public key object. A signature that does not verify is `Ok(false)`.
    pub fn verify(&self, public: &KeyHandle, msg: &[u8], sig_der: &[u8]) -> Result<bool> {
        let curve = match public.kind {
            KeyKind::EcPublic(c) => c,
            _ => {
                return Err(Error::InvalidInput(
                    "ecdsa verification needs an ec public key".into(),
                ));
            }
        };
        let h = self.resolve(public)?;
        let (digest, raw) = match curve {
            Curve::P256 => (
                sha2::Sha256::digest(msg).to_vec(),
                p256::ecdsa::Signature::from_der(sig_der).map(|s| s.to_bytes().to_vec()),
            ),
            Curve::P384 => (
                sha2::Sha384::digest(msg).to_vec(),
                p384::ecdsa::Signature::from_der(sig_der).map(|s| s.to_bytes().to_vec()),
            ),
        };
        let Ok(raw) = raw else {
            return Ok(false);
        };
        match self.session.verify(&Mechanism::Ecdsa, h, &digest, &raw) {
            Ok(()) => Ok(true),
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::SignatureInvalid
                | cryptoki::error::RvError::SignatureLenRange,
                _,
            )) => Ok(false),
            Err(e) => Err(Error::ck("verify", e)),
        }
    }

    /// [`Self::verify`] with a public key given by value: imported as a verify-only session
    /// object for the call and destroyed afterwards.
    pub fn verify_with_point(
        &self,
        curve: Curve,
        point: &[u8],
        msg: &[u8],
        sig_der: &[u8],
    ) -> Result<bool> {
        let key = self.import_ec_public_key(curve, point)?;
        let result = self.verify(&key, msg, sig_der);
        let destroyed = self.destroy(&key);
        let ok = result?;
        destroyed?;
        Ok(ok)
    }

    // ----- wrapping ------------------------------------------------------------------------

    fn wrap_mechanism<'w>(&self, alg: &'w WrapAlg) -> Result<Mechanism<'w>> {
        let m = self.mechanisms();
        match alg {
            WrapAlg::RsaOaepLabelled(hash, label) => {
                if !m.oaep_label {
                    return Err(Error::MechanismMissing {
                        mechanism: "CKM_RSA_PKCS_OAEP with a label",
                        purpose: "binding the batch transport key to its work order",
                    });
                }
                Ok(Mechanism::RsaPkcsOaep(
                    hash.params_with_label(label.as_bytes()),
                ))
            }
            WrapAlg::AesKw if m.aes_key_wrap => Ok(Mechanism::AesKeyWrap),
            WrapAlg::AesKwPad if m.kwp.is_some() => Ok(mechanisms::bare(
                m.kwp.unwrap_or(MechanismType::AES_KEY_WRAP_PAD),
            )),
            WrapAlg::RsaOaepWith(hash) => Ok(Mechanism::RsaPkcsOaep(hash.params())),
            WrapAlg::RsaOaep => match m.rsa_oaep {
                Some(hash) => Ok(Mechanism::RsaPkcsOaep(hash.params())),
                None => Err(Error::MechanismMissing {
                    mechanism: "CKM_RSA_PKCS_OAEP",
                    purpose: "wrapping the batch transport key for the utility",
                }),
            },
            WrapAlg::AesKw => Err(Error::MechanismMissing {
                mechanism: "CKM_AES_KEY_WRAP",
                purpose: "aes key wrap (rfc 3394)",
            }),
            WrapAlg::AesKwPad => Err(Error::MechanismMissing {
                mechanism: "CKM_AES_KEY_WRAP_PAD",
                purpose: "aes key wrap with padding (rfc 5649)",
            }),
        }
    }

    /// The known-answer test of RSA-OAEP wrapping: a throw-away AES-128 key of a value the
    /// caller learns, wrapped with `alg` under a throw-away public key of `modulus` (exponent
    /// 65537). Both are session objects, destroyed before this returns. The caller decrypts
    /// with the matching private key in software and compares. Returns (wrapped, value).
    pub fn oaep_known_answer(
        &self,
        modulus: &[u8],
        alg: WrapAlg,
    ) -> Result<(Vec<u8>, zeroize::Zeroizing<Vec<u8>>)> {
        let mech = self.wrap_mechanism(&alg)?;
        if !matches!(
            alg,
            WrapAlg::RsaOaep | WrapAlg::RsaOaepWith(_) | WrapAlg::RsaOaepLabelled(..)
        ) {
            return Err(Error::InvalidInput(
                "the rsa-oaep known-answer test takes an rsa-oaep algorithm".into(),
            ));
        }
        let value = zeroize::Zeroizing::new(self.random(16)?);
        let public = self
            .session
            .create_object(&throwaway_rsa_public(modulus.to_vec()))
            .ck("create the rsa-oaep known-answer key")?;
        let secret = self
            .session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Value(value.to_vec()),
            ])
            .ck("create the rsa-oaep known-answer secret");
        let wrapped = match &secret {
            Ok(secret) => self
                .session
                .wrap_key(&mech, public, *secret)
                .ck(&format!("wrap a key with {}", mech.mechanism_type())),
            Err(_) => Err(Error::Wrapper("no known-answer secret".into())),
        };
        let _ = self.session.destroy_object(public);
        let secret = secret?;
        let _ = self.session.destroy_object(secret);
        Ok((wrapped?, value))
    }

    /// Wraps `key` under `wrapping` with `alg` (inside the token).
    pub fn wrap(&self, wrapping: &KeyHandle, key: &KeyHandle, alg: WrapAlg) -> Result<Vec<u8>> {
        let mech = self.wrap_mechanism(&alg)?;
        let w = self.resolve(wrapping)?;
        let k = self.resolve(key)?;
        self.session
            .wrap_key(&mech, w, k)
            .ck(&format!("wrap a key with {}", mech.mechanism_type()))
    }

    /// Unwraps an AES key of `size` under `unwrapping` into a new key with `role`'s attributes
    /// (token roles need `label`).
    pub fn unwrap_aes(
        &self,
        unwrapping: &KeyHandle,
        wrapped: &[u8],
        alg: WrapAlg,
        role: KeyRole,
        size: AesKeySize,
        label: Option<&str>,
    ) -> Result<KeyHandle> {
        let mech = self.wrap_mechanism(&alg)?;
        let row = policy::policy(role);
        if row.family != KeyFamily::Aes {
            return Err(Error::InvalidInput(format!(
                "{role:?} is not an aes key role"
            )));
        }
        let label = if row.key.token {
            Some(label.ok_or_else(|| Error::InvalidInput(format!("{role:?} keys need a label")))?)
        } else {
            None
        };
        let u = self.resolve(unwrapping)?;
        let mut extra = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
        ];
        if let Some(l) = label {
            extra.push(Attribute::Label(l.as_bytes().to_vec()));
            extra.push(Attribute::Id(self.random(16)?));
        }
        let t = self.aes_policy(role).template(Class::Secret, extra);
        let kind = KeyKind::Aes(size.bytes());
        let guard = lock(&self.inner().objects);
        let h = self
            .session
            .unwrap_key(&mech, u, wrapped, &t)
            .ck(&format!("unwrap a key with {}", mech.mechanism_type()))?;
        drop(guard);
        let key = self.handle_for(h, kind, Some(role), label);
        // Some tokens (SoftHSM 2.6.1) leave CKA_VALUE_LEN at 0 after an unwrap; a length they do
        // report must match.
        let len = self
            .session
            .get_attributes(h, &[AttributeType::ValueLen])
            .ck("read the key length")
            .ok()
            .and_then(|v| {
                v.into_iter().find_map(|a| match a {
                    Attribute::ValueLen(n) => Some(u64::from(n)),
                    _ => None,
                })
            })
            .unwrap_or(0);
        if len != 0 && len != size.bytes() as u64 {
            let _ = self.destroy(&key);
            return Err(Error::InvalidInput(format!(
                "the unwrapped key has {len} bytes, expected {}",
                size.bytes()
            )));
        }
        // Read back: a token that ignores part of the template on unwrap (CKA_SENSITIVE,
        // CKA_EXTRACTABLE, a usage flag) would leave the key weaker than the policy.
        let wrong = match self.flags_of(h) {
            Ok(f) => self.aes_policy(role).mismatches(&f),
            Err(e) => {
                let _ = self.destroy(&key);
                return Err(e);
            }
        };
        if !wrong.is_empty() {
            let _ = self.destroy(&key);
            return Err(Error::PolicyNotKept {
                operation: "unwrap",
                details: wrong.join(", "),
            });
        }
        Ok(key)
    }

    // ----- key check values ----------------------------------------------------------------

    /// The key check value of an AES key: CKA_CHECK_VALUE where the token gives it, else the first
    /// three bytes of AES-ECB(key, zero block) if the key may encrypt.
    pub fn kcv(&self, key: &KeyHandle) -> Result<[u8; 3]> {
        if !matches!(key.kind, KeyKind::Aes(_)) {
            return Err(Error::InvalidInput(
                "key check values are for aes keys".into(),
            ));
        }
        let h = self.resolve(key)?;
        let attrs = self
            .session
            .get_attributes(h, &[AttributeType::CheckValue, AttributeType::Encrypt])
            .ck("read the key check value")?;
        let mut may_encrypt = false;
        for a in attrs {
            match a {
                Attribute::CheckValue(v) if v.len() >= 3 => return Ok([v[0], v[1], v[2]]),
                Attribute::Encrypt(e) => may_encrypt = e,
                _ => {}
            }
        }
        if may_encrypt {
            let block = self
                .session
                .encrypt(&Mechanism::AesEcb, h, &[0u8; 16])
                .ck("compute a check value with CKM_AES_ECB")?;
            if block.len() >= 3 {
                return Ok([block[0], block[1], block[2]]);
            }
        }
        Err(Error::KcvUnavailable)
    }

    // ----- encryption ----------------------------------------------------------------------

    /// AES-GCM encryption of `data` with `key` (an AES key whose policy allows encryption, such
    /// as an imported [`KeyRole::UtilityMeterKey`]), a 12-byte `iv` and additional data `aad`;
    /// returns the ciphertext followed by the 16-byte tag, as RFC 5116 lays it out.
    pub fn aes_gcm_encrypt(
        &self,
        key: &KeyHandle,
        iv: &[u8; 12],
        aad: &[u8],
        data: &[u8],
    ) -> Result<Vec<u8>> {
        if !matches!(key.kind, KeyKind::Aes(_)) {
            return Err(Error::InvalidInput("aes-gcm needs an aes key".into()));
        }
        let h = self.resolve(key)?;
        let mut iv = *iv;
        let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv, aad, 128.into())
            .map_err(|e| Error::InvalidInput(format!("aes-gcm parameters: {e}")))?;
        self.session
            .encrypt(&Mechanism::AesGcm(params), h, data)
            .ck("encrypt with CKM_AES_GCM")
    }

    // ----- imports -------------------------------------------------------------------------

    /// Imports a DER X.509 certificate as a token (or session) CKO_CERTIFICATE with `label` and
    /// `id` (use the key pair's id so that key and certificate belong together).
    pub fn import_certificate(
        &self,
        label: &str,
        id: &[u8],
        cert_der: &[u8],
        token: bool,
    ) -> Result<KeyHandle> {
        let cert = x509_cert::Certificate::from_der(cert_der)
            .map_err(|e| crate::error::CertError::NotACertificate(e.to_string()))?;
        let tbs = cert.tbs_certificate();
        let enc = |r: der::Result<Vec<u8>>| r.map_err(|e| Error::Encoding(e.to_string()));
        let subject = enc(tbs.subject().to_der())?;
        let issuer = enc(tbs.issuer().to_der())?;
        let serial = enc(tbs.serial_number().to_der())?;
        let t = vec![
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(CertificateType::X_509),
            Attribute::Token(token),
            Attribute::Private(false),
            Attribute::Modifiable(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
            Attribute::Subject(subject),
            Attribute::Issuer(issuer),
            Attribute::SerialNumber(serial),
            Attribute::Value(cert_der.to_vec()),
        ];
        let mut cache = lock(&self.inner().objects);
        if token
            && self
                .find_one_locked(&mut cache, KeyKind::Certificate, label)?
                .is_some()
        {
            return Err(Error::RoleExists {
                label: label.to_owned(),
                what: "certificate",
            });
        }
        let h = self.session.create_object(&t).ck("store a certificate")?;
        if token {
            cache
                .handles
                .insert((KeyKind::Certificate.class_code(), label.to_owned()), h);
        }
        drop(cache);
        Ok(self.handle_for(h, KeyKind::Certificate, None, token.then_some(label)))
    }

    /// Imports an EC public key (session object, verify only): e.g. a meter's key.
    pub fn import_ec_public_key(&self, curve: Curve, point: &[u8]) -> Result<KeyHandle> {
        curve.check_point(point)?;
        let wrapped = der::asn1::OctetString::new(point)
            .and_then(|o| o.to_der())
            .map_err(|e| Error::Encoding(e.to_string()))?;
        let t = vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(false),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Derive(false),
            Attribute::EcParams(curve.ec_params().to_vec()),
            Attribute::EcPoint(wrapped),
        ];
        let _guard = lock(&self.inner().objects);
        let h = self.session.create_object(&t).ck("import a public key")?;
        Ok(self.handle_for(h, KeyKind::EcPublic(curve), None, None))
    }

    /// The transport key of customer `name`, after checking it is the one the security officer
    /// approved for the DER certificate `cert_der`: exactly one public key object labelled
    /// `customer-transport/<name>`, CKA_TRUSTED, wrapping allowed with RSA-OAEP only, and the
    /// certificate's modulus and exponent. Call it before every wrap for a customer: the token
    /// is read afresh each time, never from a cache.
    pub fn approved_customer_key(&self, name: &str, cert_der: &[u8]) -> Result<KeyHandle> {
        let want = crate::so::rsa_public_of_certificate(cert_der)?;
        let label = crate::so::customer_label(name);
        let refuse = |reason: &str| Error::CustomerKeyNotApproved {
            label: label.clone(),
            reason: reason.to_owned(),
        };
        let found = self
            .session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .ck("find objects")?;
        let h = match found.as_slice() {
            [] => {
                return Err(refuse(
                    "the token holds no such key; the token's security officer installs it",
                ));
            }
            [h] => *h,
            many => {
                return Err(refuse(&format!(
                    "{} objects carry its label; the security officer must remove the extra ones",
                    many.len()
                )));
            }
        };
        let attrs = self
            .session
            .get_attributes(
                h,
                &[
                    AttributeType::Class,
                    AttributeType::KeyType,
                    AttributeType::Trusted,
                    AttributeType::Wrap,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                    AttributeType::AllowedMechanisms,
                ],
            )
            .ck("read the customer key")?;
        let (mut class, mut rsa, mut trusted, mut wrap) = (None, false, false, false);
        let (mut n, mut e, mut mechs) = (Vec::new(), Vec::new(), None);
        for a in attrs {
            match a {
                Attribute::Class(c) => class = Some(c),
                Attribute::KeyType(k) => rsa = k == KeyType::RSA,
                Attribute::Trusted(t) => trusted = t,
                Attribute::Wrap(w) => wrap = w,
                Attribute::Modulus(m) => n = m,
                Attribute::PublicExponent(x) => e = x,
                Attribute::AllowedMechanisms(m) => mechs = Some(m),
                _ => {}
            }
        }
        if class != Some(ObjectClass::PUBLIC_KEY) || !rsa {
            return Err(refuse("it is not an rsa public key"));
        }
        if !trusted && self.inner().trusted_wrap {
            return Err(refuse(
                "it is not marked trusted, so the token's security officer did not install it",
            ));
        }
        if crate::so::strip_zeros(&n) != want.modulus.as_slice()
            || crate::so::strip_zeros(&e) != want.exponent.as_slice()
        {
            return Err(refuse(
                "it is not the key of the customer's approved certificate",
            ));
        }
        if !wrap || mechs.as_deref() != Some(&[MechanismType::RSA_PKCS_OAEP][..]) {
            return Err(refuse(
                "it is not restricted to wrapping with rsa-oaep (CKA_WRAP, CKA_ALLOWED_MECHANISMS)",
            ));
        }
        Ok(self.handle_for(
            h,
            KeyKind::RsaPublic,
            Some(KeyRole::CustomerTransport),
            Some(&label),
        ))
    }

    // ----- finding and destroying ----------------------------------------------------------

    /// The EC key pair labelled `label` (private and public key objects).
    pub fn find_ec_keypair(&self, label: &str) -> Result<KeyPairHandle> {
        // The class code is what matters for lookup; the curve is read below.
        let probe = KeyKind::EcPrivate(Curve::P256);
        let private =
            self.find_token_object(probe, label)?
                .ok_or_else(|| Error::ObjectNotFound {
                    what: "private key",
                    label: label.to_owned(),
                })?;
        let public = self
            .find_token_object(KeyKind::EcPublic(Curve::P256), label)?
            .ok_or_else(|| Error::ObjectNotFound {
                what: "public key",
                label: label.to_owned(),
            })?;
        let attrs = self
            .session
            .get_attributes(public, &[AttributeType::EcParams, AttributeType::Id])
            .ck("read the public key")?;
        let mut curve = None;
        let mut id = Vec::new();
        for a in attrs {
            match a {
                Attribute::EcParams(p) => curve = Curve::from_ec_params(&p),
                Attribute::Id(i) => id = i,
                _ => {}
            }
        }
        let curve = curve
            .ok_or_else(|| Error::InvalidInput(format!("{label:?} is not a p-256/p-384 key")))?;
        let point = self.read_ec_point(public, curve)?;
        let role = KeyRole::from_label(label);
        Ok(KeyPairHandle {
            private: self.handle_for(private, KeyKind::EcPrivate(curve), role, Some(label)),
            public: self.handle_for(public, KeyKind::EcPublic(curve), role, Some(label)),
            curve,
            point,
            id,
        })
    }

    /// The DER certificate labelled `label`, if there is one.
    pub fn find_certificate(&self, label: &str) -> Result<Option<Vec<u8>>> {
        let Some(h) = self.find_token_object(KeyKind::Certificate, label)? else {
            return Ok(None);
        };
        let attrs = self
            .session
            .get_attributes(h, &[AttributeType::Value])
            .ck("read a certificate")?;
        Ok(attrs.into_iter().find_map(|a| match a {
            Attribute::Value(v) => Some(v),
            _ => None,
        }))
    }

    /// The key labelled `label` of `kind`'s class, as a handle.
    pub fn find_key(&self, kind: KeyKind, label: &str) -> Result<Option<KeyHandle>> {
        Ok(self
            .find_token_object(kind, label)?
            .map(|h| self.handle_for(h, kind, KeyRole::from_label(label), Some(label))))
    }

    // ----- HMAC and data objects ------------------------------------------------------------

    /// Generates a 32-byte generic secret for HMAC-SHA256 as a token object labelled `label`
    /// (a role of the [`KeyFamily::Hmac`] family, e.g. [`KeyRole::PinPepper`]). Refused when one
    /// with that label exists.
    pub fn generate_hmac_key(&self, role: KeyRole, label: &str) -> Result<KeyHandle> {
        let row = policy::policy(role);
        if row.family != KeyFamily::Hmac {
            return Err(Error::InvalidInput(format!(
                "{role:?} is not an hmac key role"
            )));
        }
        let kind = KeyKind::Hmac(32);
        let t = row.key.template(
            Class::Secret,
            [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::ValueLen(32u64.into()),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(self.random(16)?),
            ],
        );
        let mut cache = lock(&self.inner().objects);
        if self.find_one_locked(&mut cache, kind, label)?.is_some() {
            return Err(Error::RoleExists {
                label: label.to_owned(),
                what: "secret key",
            });
        }
        let h = self
            .session
            .generate_key(&Mechanism::GenericSecretKeyGen, &t)
            .ck("generate an hmac key")?;
        cache
            .handles
            .insert((kind.class_code(), label.to_owned()), h);
        drop(cache);
        Ok(self.handle_for(h, kind, Some(role), Some(label)))
    }

    /// HMAC-SHA256 of `data` under `key` (CKM_SHA256_HMAC), computed in the token.
    pub fn hmac_sha256(&self, key: &KeyHandle, data: &[u8]) -> Result<[u8; 32]> {
        if !matches!(key.kind, KeyKind::Hmac(_)) {
            return Err(Error::InvalidInput(
                "hmac needs a generic secret key".into(),
            ));
        }
        let h = self.resolve(key)?;
        let mac = self
            .session
            .sign(&Mechanism::Sha256Hmac, h, data)
            .ck("compute an hmac with CKM_SHA256_HMAC")?;
        mac.try_into().map_err(|_| {
            Error::InvalidInput("the token returned an hmac of the wrong length".into())
        })
    }

    /// SHA-256 over `prefix` followed by the value of the secret key `key`, computed in the
    /// token (C_DigestKey): a commitment to the key that reveals nothing of it, e.g. to bind a
    /// key to the meter and key id it was made for.
    pub fn digest_key_sha256(&self, prefix: &[u8], key: &KeyHandle) -> Result<[u8; 32]> {
        if !matches!(key.kind, KeyKind::Aes(_)) {
            return Err(Error::InvalidInput("only secret keys are digested".into()));
        }
        let h = self.resolve(key)?;
        self.session
            .digest_init(&Mechanism::Sha256)
            .ck("start a digest")?;
        self.session.digest_update(prefix).ck("digest")?;
        self.session.digest_key(h).ck("digest a key")?;
        let d = self.session.digest_final().ck("finish a digest")?;
        d.try_into().map_err(|_| {
            Error::InvalidInput("the token returned a digest of the wrong length".into())
        })
    }

    /// The value of the private token data object labelled `label` (CKO_DATA, visible only after
    /// login), if there is one.
    pub fn find_data(&self, label: &str) -> Result<Option<Vec<u8>>> {
        match self.data_objects(label)?.as_slice() {
            [] => Ok(None),
            [h] => self.data_value(*h),
            many => Err(Error::DuplicateObjects {
                label: label.to_owned(),
                count: many.len(),
            }),
        }
    }

    /// The data objects labelled `label`.
    fn data_objects(&self, label: &str) -> Result<Vec<ObjectHandle>> {
        self.session
            .find_objects(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .ck("find data objects")
    }

    /// The value of data object `h`.
    fn data_value(&self, h: ObjectHandle) -> Result<Option<Vec<u8>>> {
        let attrs = self
            .session
            .get_attributes(h, &[AttributeType::Value])
            .ck("read a data object")?;
        Ok(attrs.into_iter().find_map(|a| match a {
            Attribute::Value(v) => Some(v),
            _ => None,
        }))
    }

    /// Stores a private, unmodifiable token data object labelled `label` holding `value`.
    fn store_data(&self, label: &str, value: &[u8]) -> Result<()> {
        self.session
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Application(b"station".to_vec()),
                Attribute::Value(value.to_vec()),
                Attribute::Modifiable(false),
            ])
            .ck("create a data object")?;
        Ok(())
    }

    /// Replaces the private token data object labelled `label` with one holding `value`: the new
    /// object is created first and the older ones destroyed after, so that a crash in between
    /// leaves both (read them with [`HsmSession::find_data_all`]) rather than none. Tokens do
    /// not let an application change a data object's value in place.
    pub fn put_data(&self, label: &str, value: &[u8]) -> Result<()> {
        let _cache = lock(&self.inner().objects);
        let old = self.data_objects(label)?;
        self.store_data(label, value)?;
        for h in old {
            self.session.destroy_object(h).ck("destroy a data object")?;
        }
        Ok(())
    }

    /// The values of every private token data object labelled `label`.
    pub fn find_data_all(&self, label: &str) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for h in self.data_objects(label)? {
            out.extend(self.data_value(h)?);
        }
        Ok(out)
    }

    /// Creates a private, unmodifiable token data object labelled `label` holding `value`
    /// (nothing secret: a marker or a record). Refused when one with that label exists.
    pub fn create_data(&self, label: &str, value: &[u8]) -> Result<()> {
        let _cache = lock(&self.inner().objects);
        if self.find_data(label)?.is_some() {
            return Err(Error::RoleExists {
                label: label.to_owned(),
                what: "data object",
            });
        }
        self.store_data(label, value)
    }

    /// Destroys the object behind `key`. A session object that is already gone is fine.
    pub fn destroy(&self, key: &KeyHandle) -> Result<()> {
        let h = match self.resolve(key) {
            Ok(h) => h,
            Err(Error::SessionObjectLost) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut cache = lock(&self.inner().objects);
        self.session.destroy_object(h).ck("destroy an object")?;
        if let Some(label) = key.label() {
            cache
                .handles
                .remove(&(key.kind.class_code(), label.to_owned()));
        }
        Ok(())
    }

    /// Reads the usage flags of `key` (nothing secret).
    pub fn key_flags(&self, key: &KeyHandle) -> Result<KeyFlags> {
        let h = self.resolve(key)?;
        self.flags_of(h)
    }

    fn flags_of(&self, h: ObjectHandle) -> Result<KeyFlags> {
        let attrs = self
            .session
            .get_attributes(
                h,
                &[
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Sign,
                    AttributeType::Verify,
                    AttributeType::Wrap,
                    AttributeType::Unwrap,
                    AttributeType::Derive,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::WrapWithTrusted,
                    AttributeType::Trusted,
                    AttributeType::AlwaysAuthenticate,
                ],
            )
            .ck("read key attributes")?;
        let mut f = KeyFlags::default();
        for a in attrs {
            match a {
                Attribute::Token(b) => f.token = b,
                Attribute::Private(b) => f.private = b,
                Attribute::Sensitive(b) => f.sensitive = b,
                Attribute::Extractable(b) => f.extractable = b,
                Attribute::Sign(b) => f.sign = b,
                Attribute::Verify(b) => f.verify = b,
                Attribute::Wrap(b) => f.wrap = b,
                Attribute::Unwrap(b) => f.unwrap = b,
                Attribute::Derive(b) => f.derive = b,
                Attribute::Encrypt(b) => f.encrypt = b,
                Attribute::Decrypt(b) => f.decrypt = b,
                Attribute::WrapWithTrusted(b) => f.wrap_with_trusted = b,
                Attribute::Trusted(b) => f.trusted = b,
                Attribute::AlwaysAuthenticate(b) => f.always_authenticate = b,
                _ => {}
            }
        }
        // Apart: cryptoki cannot represent a list holding a number it has no name for (0x210B,
        // RFC 5649 in PKCS#11 3.0), and fails the whole read; such a list stays unread.
        if let Ok(attrs) = self
            .session
            .get_attributes(h, &[AttributeType::AllowedMechanisms])
        {
            for a in attrs {
                if let Attribute::AllowedMechanisms(m) = a {
                    f.allowed_mechanisms = Some(m.iter().map(|t| **t).collect());
                }
            }
        }
        Ok(f)
    }

    /// Tries to read a key's value in clear. For every key this crate makes it fails with
    /// [`Error::NotPermitted`]: it exists so that tests and audits can prove exactly that.
    pub fn try_read_value(&self, key: &KeyHandle) -> Result<Vec<u8>> {
        let h = self.resolve(key)?;
        let attrs = self
            .session
            .get_attributes(h, &[AttributeType::Value])
            .ck("read a key value")?;
        attrs
            .into_iter()
            .find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })
            .ok_or_else(|| {
                Error::NotPermitted("the key is sensitive: its value cannot be read".into())
            })
    }

    /// Every object in the token visible to this session, described without secrets.
    pub fn list_objects(&self) -> Result<Vec<ObjectInfo>> {
        let handles = {
            let _guard = lock(&self.inner().objects);
            self.session.find_objects(&[]).ck("list objects")?
        };
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            let attrs = self
                .session
                .get_attributes(
                    h,
                    &[
                        AttributeType::Class,
                        AttributeType::Label,
                        AttributeType::Id,
                        AttributeType::KeyType,
                        AttributeType::EcParams,
                        AttributeType::ValueLen,
                        AttributeType::ModulusBits,
                    ],
                )
                .ck("read object attributes")?;
            let mut info = ObjectInfo::default();
            for a in attrs {
                match a {
                    Attribute::Class(c) => info.class = class_name(c).to_owned(),
                    Attribute::Label(l) => info.label = String::from_utf8_lossy(&l).into_owned(),
                    Attribute::Id(i) => info.id = hex::encode(i),
                    Attribute::KeyType(k) => info.key_type = Some(key_type_name(k)),
                    Attribute::EcParams(p) => info.curve = Curve::from_ec_params(&p),
                    Attribute::ValueLen(n) => info.bits = Some(u64::from(n) * 8),
                    Attribute::ModulusBits(n) => info.bits = Some(u64::from(n)),
                    _ => {}
                }
            }
            if info.class != "certificate" {
                info.flags = Some(self.flags_of(h)?);
            }
            out.push(info);
        }
        out.sort_by(|a, b| (&a.label, &a.class).cmp(&(&b.label, &b.class)));
        Ok(out)
    }
}

/// One object of the token, described without secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectInfo {
    /// "private key", "public key", "secret key", "certificate", ...
    pub class: String,
    /// CKA_LABEL.
    pub label: String,
    /// CKA_ID in hex.
    pub id: String,
    /// Key type ("EC", "AES", "RSA"), for keys.
    pub key_type: Option<String>,
    /// Curve of EC keys.
    pub curve: Option<Curve>,
    /// Size in bits of AES and RSA keys.
    pub bits: Option<u64>,
    /// Usage flags, for keys.
    pub flags: Option<KeyFlags>,
}

impl std::fmt::Display for ObjectInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<28} {:<12}", self.label, self.class)?;
        if let Some(k) = &self.key_type {
            write!(f, " {k}")?;
        }
        if let Some(c) = self.curve {
            write!(f, " {}", c.name())?;
        }
        if let Some(b) = self.bits {
            write!(f, " {b}-bit")?;
        }
        if let Some(flags) = &self.flags {
            write!(f, " [{flags}]")?;
        }
        write!(f, " id={}", self.id)
    }
}

fn class_name(c: ObjectClass) -> &'static str {
    if c == ObjectClass::PRIVATE_KEY {
        "private key"
    } else if c == ObjectClass::PUBLIC_KEY {
        "public key"
    } else if c == ObjectClass::SECRET_KEY {
        "secret key"
    } else if c == ObjectClass::CERTIFICATE {
        "certificate"
    } else if c == ObjectClass::DATA {
        "data"
    } else {
        "other"
    }
}

fn key_type_name(k: KeyType) -> String {
    if k == KeyType::EC {
        "EC".into()
    } else if k == KeyType::AES {
        "AES".into()
    } else if k == KeyType::RSA {
        "RSA".into()
    } else {
        k.to_string()
    }
}

fn kind_name(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::EcPrivate(_) | KeyKind::RsaPrivate => "private key",
        KeyKind::EcPublic(_) | KeyKind::RsaPublic => "public key",
        KeyKind::Aes(_) | KeyKind::Hmac(_) => "secret key",
        KeyKind::Certificate => "certificate",
    }
}

/// CKA_EC_POINT is a DER OCTET STRING around the point; some tokens return the bare point.
pub(crate) fn decode_ec_point(raw: &[u8], curve: Curve) -> Result<Vec<u8>> {
    if raw.len() == curve.point_len() && raw.first() == Some(&0x04) {
        return Ok(raw.to_vec());
    }
    der::asn1::OctetString::from_der(raw)
        .map(|o| o.as_bytes().to_vec())
        .map_err(|e| Error::InvalidInput(format!("malformed CKA_EC_POINT: {e}")))
}

/// DER SubjectPublicKeyInfo of an RSA public key.
pub(crate) fn rsa_spki_der(modulus: &[u8], exponent: &[u8]) -> Result<Vec<u8>> {
    let enc = |e: der::Error| Error::Encoding(e.to_string());
    let key = pkcs1::RsaPublicKey {
        modulus: der::asn1::UintRef::new(modulus).map_err(enc)?,
        public_exponent: der::asn1::UintRef::new(exponent).map_err(enc)?,
    };
    let key_der = key.to_der().map_err(enc)?;
    let spki = spki::SubjectPublicKeyInfoOwned {
        algorithm: spki::AlgorithmIdentifierOwned {
            oid: der::oid::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1"),
            parameters: Some(der::Any::null()),
        },
        subject_public_key: der::asn1::BitString::from_bytes(&key_der).map_err(enc)?,
    };
    spki.to_der().map_err(enc)
}

/// A fixed RSA-2048 public modulus used only to find out which OAEP hash the token accepts.
const PROBE_RSA_MODULUS: &str = concat!(
    "cef6bdf4b1ed21db1556e78aaec80b09333d6fc09f49e2d3f0db4c58d7b6bcfe",
    "1f5ac7841c057a19cbc5ddd3b01eda61266ef35470fdffe8e5b6eccc19f9ef30",
    "e8d38bdc3dd93246a7bacc3566ac351017750ef3307dad5c24e2a6ec8abf814d",
    "8bb981d9d5361c783e5ac13760bf8293a3a947b1f1386bb47b62861bdbf9f1ac",
    "8c951e9c9e6686e6d26b8e8e18be5ae0c82208dbe3055ade829baee2ef1d37da",
    "b1f497bcf09d24b392ba97309a128a78558bea9a21f467516c3e86d770812a8c",
    "703899d39b206ac36727a4341232d7460e097533cac70da84d18ddac9dacfc36",
    "5e33678722a6942bb68bab307ed253e5498b7f4ab5555ecaff7bf57e08c5f86d",
);

/// Reads the token's mechanism list and makes the choices recorded in [`Mechanisms`].
/// Pauses before each retry of a call that met a transient `CKR_DEVICE_ERROR`.
const TRANSIENT_PAUSES: [std::time::Duration; 2] = [
    std::time::Duration::from_millis(5),
    std::time::Duration::from_millis(50),
];

/// Runs `call`, and again (twice at most, after a short pause) while it fails with
/// `CKR_DEVICE_ERROR`: network HSMs and HSMs under load report a passing fault that way. A
/// signature is safe to repeat; an error that stays is the caller's (and the pool's recovery).
fn transient<T>(
    mut call: impl FnMut() -> std::result::Result<T, cryptoki::error::Error>,
) -> std::result::Result<T, cryptoki::error::Error> {
    for pause in TRANSIENT_PAUSES {
        match call() {
            Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::DeviceError, f)) => {
                tracing::warn!(function = ?f, "CKR_DEVICE_ERROR from the token; trying again");
                std::thread::sleep(pause);
            }
            done => return done,
        }
    }
    call()
}

pub(crate) fn probe_mechanisms(ctx: &Pkcs11, slot: Slot, session: &Session) -> Result<Mechanisms> {
    let list = ctx.get_mechanism_list(slot).ck("list mechanisms")?;
    let has = |m: MechanismType| list.contains(&m);
    let ecb_encrypt_data = ctx
        .get_mechanism_info(slot, mechanisms::aes_ecb_encrypt_data_type())
        .is_ok_and(|i| i.derive());
    let mut listed: Vec<String> = list.iter().map(|m| m.to_string()).collect();
    if ecb_encrypt_data {
        listed.push(mechanisms::aes_ecb_encrypt_data_type().to_string());
    }
    listed.sort();
    let kwp = [
        MechanismType::AES_KEY_WRAP_PAD,
        mechanisms::aes_key_wrap_kwp_type(),
    ]
    .into_iter()
    // cryptoki's mechanism list leaves out numbers it cannot name (0x210B among them): ask for
    // each by number.
    .filter(|t| ctx.get_mechanism_info(slot, *t).is_ok_and(|i| i.wrap()))
    .find(|t| kwp_answers_known(session, *t));
    let (ktk_aes_ecb, ktk_x963) =
        if has(MechanismType::ECC_KEY_PAIR_GEN) && has(MechanismType::ECDH1_DERIVE) {
            probe_ktk(session, ecb_encrypt_data)
        } else {
            (false, false)
        };
    let (rsa_oaep, oaep_label) =
        if has(MechanismType::RSA_PKCS_OAEP) && has(MechanismType::AES_KEY_GEN) {
            probe_oaep(session)?
        } else {
            (None, false)
        };
    Ok(Mechanisms {
        listed,
        ec_keygen: has(MechanismType::ECC_KEY_PAIR_GEN),
        ecdsa: has(MechanismType::ECDSA),
        aes_keygen: has(MechanismType::AES_KEY_GEN),
        aes_key_wrap: has(MechanismType::AES_KEY_WRAP),
        aes_key_wrap_pad: kwp.is_some(),
        kwp,
        check_value: has(MechanismType::AES_KEY_GEN) && gives_check_value(session),
        ecdh: has(MechanismType::ECDH1_DERIVE),
        aes_ecb_encrypt_data: ecb_encrypt_data,
        rsa_keygen: has(MechanismType::RSA_PKCS_KEY_PAIR_GEN),
        rsa_oaep,
        oaep_label,
        ktk_aes_ecb,
        ktk_x963,
    })
}

/// The P-256 base point, uncompressed: a peer point every token accepts, for the probes.
const P256_G: &str = concat!(
    "04",
    "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296",
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
);

/// Which key-transport derivations really work (a listed mechanism may still refuse the null
/// KDF): (AES-ECB, X9.63). Every object made is a session object, destroyed again.
fn probe_ktk(session: &Session, ecb_encrypt_data: bool) -> (bool, bool) {
    let Ok(g) = hex::decode(P256_G) else {
        return (false, false);
    };
    let params = Curve::P256.ec_params().to_vec();
    let Ok((public, private)) = session.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &[Attribute::Token(false), Attribute::EcParams(params)],
        &[
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Derive(true),
        ],
    ) else {
        return (false, false);
    };
    let aes = |derive: bool| {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32u64.into()),
            Attribute::Token(false),
            Attribute::Sensitive(true),
            Attribute::Derive(derive),
        ]
    };
    let mut made = vec![public, private];
    let mut aes_ecb = false;
    if let Ok(z) = session.derive_key(
        &Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), &g)),
        private,
        &aes(true),
    ) {
        made.push(z);
        if ecb_encrypt_data {
            let data = [0u8; 32];
            let params = KeyDerivationStringData::new(&data);
            if let Ok(k) =
                session.derive_key(&mechanisms::aes_ecb_encrypt_data(&params), z, &aes(false))
            {
                made.push(k);
                aes_ecb = true;
            }
        }
    }
    let info = crypto_x963_probe_info();
    let x963 = match session.derive_key(
        &Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::sha256(&info), &g)),
        private,
        &aes(false),
    ) {
        Ok(k) => {
            made.push(k);
            true
        }
        Err(_) => false,
    };
    for h in made {
        let _ = session.destroy_object(h);
    }
    (aes_ecb, x963)
}

/// SharedInfo of the X9.63 probe: the shape the line protocol uses (label and 32 bytes).
fn crypto_x963_probe_info() -> Vec<u8> {
    let mut info = b"jig-line-v1 ktk x963".to_vec();
    info.extend_from_slice(&[0u8; 32]);
    info
}

/// Whether the token gives a fresh AES key a CKA_CHECK_VALUE (PKCS#11 2.40 and later; some
/// tokens ignore it).
fn gives_check_value(session: &Session) -> bool {
    let Ok(key) = session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(16u64.into()),
            Attribute::Token(false),
        ],
    ) else {
        return false;
    };
    let got = session
        .get_attributes(key, &[AttributeType::CheckValue])
        .ok()
        .is_some_and(|v| {
            v.iter()
                .any(|a| matches!(a, Attribute::CheckValue(c) if c.len() >= 3))
        });
    let _ = session.destroy_object(key);
    got
}

/// Whether mechanism `t` does RFC 5649 on this token: it wraps a known key under a known key
/// (both session objects, destroyed afterwards) to the known answer.
fn kwp_answers_known(session: &Session, t: MechanismType) -> bool {
    let secret = |value: &[u8], wrap: bool| {
        session.create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Value(value.to_vec()),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::Wrap(wrap),
        ])
    };
    let Ok(kek) = secret(&mechanisms::KWP_KAT_KEK, true) else {
        return false;
    };
    let answer = secret(&mechanisms::KWP_KAT_KEY, false).ok().map(|key| {
        let w = session.wrap_key(&mechanisms::bare(t), kek, key);
        let _ = session.destroy_object(key);
        w
    });
    let _ = session.destroy_object(kek);
    matches!(answer, Some(Ok(w)) if w == mechanisms::KWP_KAT_WRAPPED)
}

/// The template of a throw-away AES-128 session key (sensitive; `extractable` as asked).
pub(crate) fn throwaway_aes(extractable: bool) -> [Attribute; 6] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(16u64.into()),
        Attribute::Token(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable),
    ]
}

/// The template of a throw-away RSA public key (session object, exponent 65537) that may only
/// wrap: the OAEP probe's and the known-answer test's.
fn throwaway_rsa_public(modulus: Vec<u8>) -> [Attribute; 7] {
    [
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Wrap(true),
        Attribute::Modulus(modulus),
        Attribute::PublicExponent(vec![1, 0, 1]),
    ]
}

/// Finds the best OAEP hash the token accepts by wrapping a throw-away key under a throw-away
/// public key. Both are session objects and destroyed afterwards.
///
/// SHA-1 is chosen only when the token refuses SHA-256's parameters as such (SoftHSM 2.6.1
/// answers CKR_ARGUMENTS_BAD, others CKR_MECHANISM_PARAM_INVALID); any other failure of the
/// probe is an error, never a quiet step down to SHA-1.
fn probe_oaep(session: &Session) -> Result<(Option<OaepHash>, bool)> {
    let Ok(modulus) = hex::decode(PROBE_RSA_MODULUS) else {
        return Ok((None, false));
    };
    let public = session
        .create_object(&throwaway_rsa_public(modulus))
        .ck("create the rsa-oaep probe key")?;
    let secret = session
        .generate_key(&Mechanism::AesKeyGen, &throwaway_aes(true))
        .ck("create the rsa-oaep probe secret");
    // (the secret's failure is reported below, after the public key is destroyed)
    let chosen = match &secret {
        Ok(secret) => {
            let wrap = |hash: OaepHash| {
                session
                    .wrap_key(&Mechanism::RsaPkcsOaep(hash.params()), public, *secret)
                    .map(drop)
            };
            oaep_choice(wrap(OaepHash::Sha256), || wrap(OaepHash::Sha1)).map(|hash| {
                // Does it take a label with that hash?
                let labelled = hash.is_some_and(|h| {
                    session
                        .wrap_key(
                            &Mechanism::RsaPkcsOaep(h.params_with_label(b"label probe")),
                            public,
                            *secret,
                        )
                        .is_ok()
                });
                (hash, labelled)
            })
        }
        Err(e) => Err(Error::Wrapper(format!("the rsa-oaep probe: {e}"))),
    };
    if let Ok(secret) = secret {
        let _ = session.destroy_object(secret);
    }
    let _ = session.destroy_object(public);
    chosen
}

/// The OAEP hash to use, from the outcome of a SHA-256 wrap and (called only when SHA-256's
/// parameters were refused as such) a SHA-1 wrap.
fn oaep_choice(
    sha256: std::result::Result<(), cryptoki::error::Error>,
    sha1: impl FnOnce() -> std::result::Result<(), cryptoki::error::Error>,
) -> Result<Option<OaepHash>> {
    use cryptoki::error::{Error as CkError, RvError};
    let refused_params = |e: &CkError| {
        matches!(
            e,
            CkError::Pkcs11(
                RvError::ArgumentsBad | RvError::MechanismParamInvalid | RvError::MechanismInvalid,
                _
            )
        )
    };
    match sha256 {
        Ok(()) => Ok(Some(OaepHash::Sha256)),
        Err(e) if refused_params(&e) => match sha1() {
            Ok(()) => Ok(Some(OaepHash::Sha1)),
            Err(e) if refused_params(&e) => Ok(None),
            Err(e) => Err(Error::ck("probe rsa-oaep with sha-1", e)),
        },
        Err(e) => Err(Error::ck("probe rsa-oaep with sha-256", e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cryptoki::context::Function;
    use cryptoki::error::{Error as CkError, RvError};

    #[test]
    fn oaep_steps_down_to_sha1_only_when_sha256_parameters_are_refused() {
        let rv = |rv| Err(CkError::Pkcs11(rv, Function::WrapKey));
        let never = || -> std::result::Result<(), CkError> { panic!("sha-1 must not be tried") };
        assert_eq!(oaep_choice(Ok(()), never).unwrap(), Some(OaepHash::Sha256));
        for refused in [
            RvError::ArgumentsBad,
            RvError::MechanismParamInvalid,
            RvError::MechanismInvalid,
        ] {
            assert_eq!(
                oaep_choice(rv(refused), || Ok(())).unwrap(),
                Some(OaepHash::Sha1)
            );
            assert_eq!(oaep_choice(rv(refused), || rv(refused)).unwrap(), None);
        }
        // A fault of the token is no reason to use SHA-1: it is an error, and SHA-1 is never
        // tried.
        for fault in [
            RvError::DeviceError,
            RvError::SessionHandleInvalid,
            RvError::KeyHandleInvalid,
        ] {
            let e = oaep_choice(rv(fault), never).unwrap_err();
            assert!(matches!(e, Error::Pkcs11 { rv, .. } if rv == fault), "{e}");
        }
        let e = oaep_choice(rv(RvError::ArgumentsBad), || rv(RvError::DeviceError)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Pkcs11 {
                    rv: RvError::DeviceError,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_transient_device_error_is_retried_twice_and_nothing_else_is() {
        let failing = |rv: RvError, times: usize| {
            let mut calls = 0;
            let r = transient(|| {
                calls += 1;
                if calls <= times {
                    Err(CkError::Pkcs11(rv, Function::Sign))
                } else {
                    Ok(calls)
                }
            });
            (r, calls)
        };
        assert_eq!(failing(RvError::DeviceError, 2).0.unwrap(), 3);
        let (r, calls) = failing(RvError::DeviceError, 3);
        assert!(matches!(r, Err(CkError::Pkcs11(RvError::DeviceError, _))));
        assert_eq!(calls, 3);
        let (r, calls) = failing(RvError::KeyHandleInvalid, 1);
        assert!(r.is_err());
        assert_eq!(calls, 1, "only CKR_DEVICE_ERROR is retried here");
    }
}
