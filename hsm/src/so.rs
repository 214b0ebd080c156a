//! The token security officer's operations: approving a utility's transport key.
//!
//! The batch transport key wraps every meter key of a batch for the utility, so whoever can wrap
//! the batch key out holds the batch. Its policy row makes it CKA_WRAP_WITH_TRUSTED: the token
//! wraps it only under a key marked CKA_TRUSTED, and only the token's security officer (SO) may
//! set that mark. The station's service logs in as the token's user and so cannot make a
//! trusted key of its own — nor can anyone else holding the user PIN.
//!
//! Approving a utility is therefore the SO's act: [`SecurityOfficer::trust_customer_key`]
//! installs the RSA public key of the utility's certificate as `customer-transport/<name>`,
//! trusted, usable with RSA-OAEP only. Before every wrap the station compares that token object
//! with the certificate recorded for the customer
//! ([`crate::HsmSession::approved_customer_key`]).
//!
//! A PKCS#11 application is logged in to a token as one user type at a time, so these
//! operations run in a process of their own (`station hsm trust-customer`), beside a running
//! service. This module checks that the certificate carries an RSA key; what a utility's
//! certificate must be beyond that (key size, exponent, validity, key usage) is the station's
//! rule and is checked by the station before it calls here.

use std::path::Path;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use der::Decode;
use secrecy::SecretString;
use sha2::Digest;

use crate::error::{CkResultExt, Error, Result};
use crate::policy::{self, Class, KeyRole};

/// The label of customer `name`'s transport key.
pub fn customer_label(name: &str) -> String {
    let prefix = policy::policy(KeyRole::CustomerTransport)
        .label
        .unwrap_or("customer-transport");
    format!("{prefix}/{name}")
}

/// The RSA public key of a certificate: modulus and public exponent, big-endian, without
/// leading zero bytes, and the SHA-256 of its SubjectPublicKeyInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublic {
    /// The modulus.
    pub modulus: Vec<u8>,
    /// The public exponent.
    pub exponent: Vec<u8>,
    /// SHA-256 of the DER SubjectPublicKeyInfo (what `openssl x509 -pubkey | openssl pkey
    /// -pubin -outform der | sha256sum` prints).
    pub spki_sha256: [u8; 32],
}

impl RsaPublic {
    /// Size of the modulus in bits.
    pub fn bits(&self) -> usize {
        let Some(first) = self.modulus.first() else {
            return 0;
        };
        self.modulus.len() * 8 - first.leading_zeros() as usize
    }
}

/// The RSA public key of the DER certificate `cert_der`.
pub fn rsa_public_of_certificate(cert_der: &[u8]) -> Result<RsaPublic> {
    use der::Encode;
    let cert = x509_cert::Certificate::from_der(cert_der)
        .map_err(|e| crate::error::CertError::NotACertificate(e.to_string()))?;
    let spki = cert.tbs_certificate().subject_public_key_info();
    const RSA_ENCRYPTION: der::oid::ObjectIdentifier =
        der::oid::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
    if spki.algorithm.oid != RSA_ENCRYPTION {
        return Err(Error::InvalidInput(format!(
            "the customer transport certificate carries a {} key; an rsa key is required",
            spki.algorithm.oid
        )));
    }
    let key = pkcs1::RsaPublicKey::<der::asn1::UintRef<'_>>::from_der(
        spki.subject_public_key.raw_bytes(),
    )
    .map_err(|e| Error::InvalidInput(format!("malformed rsa public key: {e}")))?;
    let spki_der = spki
        .to_der()
        .map_err(|e| Error::InvalidInput(format!("cannot encode the public key: {e}")))?;
    Ok(RsaPublic {
        modulus: strip_zeros(key.modulus.as_bytes()).to_vec(),
        exponent: strip_zeros(key.public_exponent.as_bytes()).to_vec(),
        spki_sha256: sha2::Sha256::digest(&spki_der).into(),
    })
}

pub(crate) fn strip_zeros(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|x| **x == 0).count();
    &b[n..]
}

/// A customer transport key in the token, as the security officer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerKey {
    /// The customer's name (the label without its `customer-transport/` prefix).
    pub name: String,
    /// The object's label.
    pub label: String,
    /// Size of the modulus in bits.
    pub bits: usize,
    /// SHA-256 of the key's SubjectPublicKeyInfo, in hex.
    pub spki_sha256: String,
    /// CKA_TRUSTED.
    pub trusted: bool,
}

impl std::fmt::Display for CustomerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<24} rsa-{} {} spki sha-256 {}",
            self.name,
            self.bits,
            if self.trusted {
                "trusted"
            } else {
                "NOT TRUSTED"
            },
            self.spki_sha256
        )
    }
}

/// A session of the token's security officer, logged out when dropped.
pub struct SecurityOfficer {
    session: Session,
    label: String,
}

impl std::fmt::Debug for SecurityOfficer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityOfficer")
            .field("token", &self.label)
            .finish_non_exhaustive()
    }
}

impl SecurityOfficer {
    /// Opens a read-write session on the token labelled `token_label` of `module` and logs in
    /// as its security officer with `so_pin`.
    pub fn login(module: &Path, token_label: &str, so_pin: &SecretString) -> Result<Self> {
        let ctx = crate::context::shared(module)?;
        let slot = crate::pool::find_slot(&ctx, token_label)?;
        let session = ctx.open_rw_session(slot).ck("open a session")?;
        so_login_outcome(session.login(UserType::So, Some(so_pin)), token_label)?;
        Ok(SecurityOfficer {
            session,
            label: token_label.to_owned(),
        })
    }

    /// Installs the RSA public key of the DER certificate `cert_der` as customer `name`'s
    /// transport key: CKA_TRUSTED, wrapping with RSA-OAEP only. Refused when any object already
    /// carries the label (remove it first with [`SecurityOfficer::remove_customer_key`]).
    pub fn trust_customer_key(&self, name: &str, cert_der: &[u8]) -> Result<CustomerKey> {
        self.install_customer_key(name, cert_der, true)
    }

    /// As [`SecurityOfficer::trust_customer_key`], with CKA_TRUSTED only when `trusted`: for a
    /// cell configured without trusted wrapping (`hsm.trusted_wrap = false`), on tokens that
    /// cannot mark a key trusted.
    pub fn install_customer_key(
        &self,
        name: &str,
        cert_der: &[u8],
        trusted: bool,
    ) -> Result<CustomerKey> {
        check_name(name)?;
        let key = rsa_public_of_certificate(cert_der)?;
        let label = customer_label(name);
        let existing = self.find(&label)?;
        if !existing.is_empty() {
            return Err(Error::RoleExists {
                label,
                what: "key or object",
            });
        }
        let mut key_policy = policy::policy(KeyRole::CustomerTransport).key;
        key_policy.trusted = trusted;
        let t = key_policy.template(
            Class::Public,
            [
                Attribute::Class(ObjectClass::PUBLIC_KEY),
                Attribute::KeyType(KeyType::RSA),
                Attribute::Modulus(key.modulus.clone()),
                Attribute::PublicExponent(key.exponent.clone()),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(sha2::Sha256::digest(cert_der)[..16].to_vec()),
            ],
        );
        self.session
            .create_object(&t)
            .ck("install a trusted rsa public key")?;
        Ok(CustomerKey {
            name: name.to_owned(),
            label,
            bits: key.bits(),
            spki_sha256: hex::encode(key.spki_sha256),
            trusted,
        })
    }

    /// Removes every object labelled as customer `name`'s transport key; whether there was one.
    pub fn remove_customer_key(&self, name: &str) -> Result<bool> {
        check_name(name)?;
        let found = self.find(&customer_label(name))?;
        for h in &found {
            self.session
                .destroy_object(*h)
                .ck("remove a customer transport key")?;
        }
        Ok(!found.is_empty())
    }

    /// Every customer transport key in the token (public objects: the security officer sees
    /// them all), sorted by name.
    pub fn customer_keys(&self) -> Result<Vec<CustomerKey>> {
        let prefix = customer_label("");
        let all = self
            .session
            .find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY)])
            .ck("find objects")?;
        let mut out = Vec::new();
        for h in all {
            let attrs = self
                .session
                .get_attributes(
                    h,
                    &[
                        AttributeType::Label,
                        AttributeType::Modulus,
                        AttributeType::PublicExponent,
                        AttributeType::Trusted,
                    ],
                )
                .ck("read a public key")?;
            let (mut label, mut n, mut e, mut trusted) = (String::new(), vec![], vec![], false);
            for a in attrs {
                match a {
                    Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                    Attribute::Modulus(m) => n = m,
                    Attribute::PublicExponent(x) => e = x,
                    Attribute::Trusted(t) => trusted = t,
                    _ => {}
                }
            }
            let Some(name) = label.strip_prefix(&prefix) else {
                continue;
            };
            let spki = crate::session::rsa_spki_der(strip_zeros(&n), strip_zeros(&e))?;
            let public = RsaPublic {
                modulus: strip_zeros(&n).to_vec(),
                exponent: strip_zeros(&e).to_vec(),
                spki_sha256: sha2::Sha256::digest(&spki).into(),
            };
            out.push(CustomerKey {
                name: name.to_owned(),
                label: label.clone(),
                bits: public.bits(),
                spki_sha256: hex::encode(public.spki_sha256),
                trusted,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn find(&self, label: &str) -> Result<Vec<ObjectHandle>> {
        self.session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .ck("find objects")
    }
}

impl Drop for SecurityOfficer {
    fn drop(&mut self) {
        let _ = self.session.logout();
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 24
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Error::InvalidInput(
            "customer names are 1 to 24 letters, digits, '-', '_' or '.'".into(),
        ));
    }
    Ok(())
}

/// Maps the outcome of the security officer's `C_Login`.
fn so_login_outcome(r: std::result::Result<(), CkError>, label: &str) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        // The PIN was not even checked: a second officer in one process is a mistake.
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Err(Error::InvalidInput(format!(
            "the security officer of token {label:?} is already logged in in this process; use that session"
        ))),
        Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(Error::SoPinRefused {
            label: label.to_owned(),
            locked: false,
        }),
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(Error::SoPinRefused {
            label: label.to_owned(),
            locked: true,
        }),
        Err(CkError::Pkcs11(RvError::UserAnotherAlreadyLoggedIn, _)) => {
            Err(Error::InvalidInput(format!(
                "this process is already logged in to the token {label:?} as its user; the security officer's operations run in a process of their own"
            )))
        }
        Err(e) => Err(Error::ck("log in as security officer", e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn so_login_outcomes_map_to_distinct_errors() {
        let rv = |rv| Err(CkError::Pkcs11(rv, Function::Login));
        assert!(so_login_outcome(Ok(()), "t").is_ok());
        assert!(so_login_outcome(rv(RvError::UserAlreadyLoggedIn), "t").is_err());
        let e = so_login_outcome(rv(RvError::PinIncorrect), "t").unwrap_err();
        assert!(
            matches!(e, Error::SoPinRefused { locked: false, .. }),
            "{e}"
        );
        let e = so_login_outcome(rv(RvError::PinLocked), "t").unwrap_err();
        assert!(matches!(e, Error::SoPinRefused { locked: true, .. }), "{e}");
        let e = so_login_outcome(rv(RvError::UserAnotherAlreadyLoggedIn), "t").unwrap_err();
        assert!(e.to_string().contains("process of their own"), "{e}");
    }

    #[test]
    fn customer_names_are_checked_before_the_token_is_touched() {
        for bad in ["", "a/b", "x y", &"n".repeat(25)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("utility-1.a_b").is_ok());
        assert_eq!(customer_label("u"), "customer-transport/u");
    }
}
