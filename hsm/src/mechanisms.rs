//! Mechanism discovery: what the token offers, and which variant this crate uses.
//!
//! At open time the token's mechanism list is read and the best available choice is made for
//! each job (notably RSA-OAEP with SHA-256 where the token does it, else SHA-1). The choices are
//! exposed in [`Mechanisms`] so that callers can record them in what they produce (the manifest
//! says which OAEP hash wrapped its transport key).
//!
//! Nothing here is specific to SoftHSM: every choice comes from asking the token, and the OAEP
//! hash is found by trying it. This module does not perform any operation for callers.

use cryptoki::mechanism::misc::KeyDerivationStringData;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism, MechanismType};

/// `CKM_AES_ECB_ENCRYPT_DATA` (PKCS#11 2.40 §2.10.2 / 3.0 §6.14).
const CKM_AES_ECB_ENCRYPT_DATA: std::os::raw::c_ulong = 0x1104;

/// The `MechanismType` of `CKM_AES_ECB_ENCRYPT_DATA`, which cryptoki 0.12.1 cannot name: it
/// offers no constant for it and refuses to convert the number (only vendor-defined numbers may
/// be built). The mechanism is standard and needed for the key-transport key.
#[allow(unsafe_code)]
pub(crate) fn aes_ecb_encrypt_data_type() -> MechanismType {
    // SAFETY: `MechanismType` is `#[repr(transparent)]` over `CK_MECHANISM_TYPE` (cryptoki relies
    // on this itself to pass `&[MechanismType]` to C as `CK_MECHANISM_TYPE*`), `transmute`
    // checks that the sizes match, and every `CK_MECHANISM_TYPE` value is a valid mechanism type
    // (unknown values print as numbers). `mechanism_type_round_trips` checks the result.
    unsafe { std::mem::transmute::<std::os::raw::c_ulong, MechanismType>(CKM_AES_ECB_ENCRYPT_DATA) }
}

/// `CKM_AES_ECB_ENCRYPT_DATA` with its `CK_KEY_DERIVATION_STRING_DATA` parameter.
pub(crate) fn aes_ecb_encrypt_data<'a>(params: &'a KeyDerivationStringData<'a>) -> Mechanism<'a> {
    Mechanism::VendorDefined(VendorDefinedMechanism::new(
        aes_ecb_encrypt_data_type(),
        Some(params),
    ))
}

/// The hash RSA-OAEP uses (for both the label hash and MGF1). The label is always empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OaepHash {
    /// SHA-256 with MGF1-SHA-256: preferred.
    Sha256,
    /// SHA-1 with MGF1-SHA-1: the fallback (SoftHSM 2.6.1 offers nothing else).
    Sha1,
}

impl OaepHash {
    /// Name as OpenSSL spells it (`-pkeyopt rsa_oaep_md:<name>`).
    pub fn openssl_name(self) -> &'static str {
        match self {
            OaepHash::Sha256 => "sha256",
            OaepHash::Sha1 => "sha1",
        }
    }

    /// The `CK_RSA_PKCS_OAEP_PARAMS` of this hash (empty label).
    pub fn params(self) -> PkcsOaepParams<'static> {
        match self {
            OaepHash::Sha256 => PkcsOaepParams::new(
                MechanismType::SHA256,
                PkcsMgfType::MGF1_SHA256,
                PkcsOaepSource::empty(),
            ),
            OaepHash::Sha1 => PkcsOaepParams::new(
                MechanismType::SHA1,
                PkcsMgfType::MGF1_SHA1,
                PkcsOaepSource::empty(),
            ),
        }
    }
}

/// What the token offers and what this crate chose. Read it from [`crate::Hsm::mechanisms`].
#[derive(Debug, Clone)]
pub struct Mechanisms {
    /// Every mechanism the token lists (PKCS#11 names; unnamed ones as hex numbers).
    pub listed: Vec<String>,
    /// EC key pair generation (CKM_EC_KEY_PAIR_GEN).
    pub ec_keygen: bool,
    /// Raw ECDSA (CKM_ECDSA); hashing is done in software so that every token works alike.
    pub ecdsa: bool,
    /// AES key generation.
    pub aes_keygen: bool,
    /// RFC 3394 AES key wrap (CKM_AES_KEY_WRAP).
    pub aes_key_wrap: bool,
    /// RFC 5649 AES key wrap with padding (CKM_AES_KEY_WRAP_PAD, 0x210A).
    pub aes_key_wrap_pad: bool,
    /// ECDH (CKM_ECDH1_DERIVE, null KDF).
    pub ecdh: bool,
    /// CKM_AES_ECB_ENCRYPT_DATA (key-transport key derivation).
    pub aes_ecb_encrypt_data: bool,
    /// RSA key pair generation (utility side).
    pub rsa_keygen: bool,
    /// RSA-OAEP and the hash chosen for it (`None`: the token has no usable RSA-OAEP).
    pub rsa_oaep: Option<OaepHash>,
}

impl Mechanisms {
    /// A one-line summary of the choices, for logs and `station hsm info`.
    pub fn chosen(&self) -> String {
        let oaep = match self.rsa_oaep {
            Some(OaepHash::Sha256) => "CKM_RSA_PKCS_OAEP(SHA-256, MGF1-SHA-256, empty label)",
            Some(OaepHash::Sha1) => "CKM_RSA_PKCS_OAEP(SHA-1, MGF1-SHA-1, empty label)",
            None => "none",
        };
        format!(
            "sign: CKM_ECDSA over a software SHA-256/384 digest; wrap: {}; wrap with padding: {}; transport-key wrap: {oaep}; ktk: {}",
            if self.aes_key_wrap {
                "CKM_AES_KEY_WRAP (RFC 3394)"
            } else {
                "none"
            },
            if self.aes_key_wrap_pad {
                "CKM_AES_KEY_WRAP_PAD (RFC 5649)"
            } else {
                "none"
            },
            if self.ecdh && self.aes_ecb_encrypt_data {
                "CKM_ECDH1_DERIVE(null kdf) + CKM_AES_ECB_ENCRYPT_DATA"
            } else {
                "unavailable"
            },
        )
    }
}

/// Names the mechanisms this crate requires at open time, with what each is for.
pub(crate) const REQUIRED: [(&str, &str); 4] = [
    ("CKM_EC_KEY_PAIR_GEN", "ec key pairs"),
    ("CKM_ECDSA", "signatures"),
    ("CKM_AES_KEY_GEN", "per-meter secret keys"),
    ("CKM_AES_KEY_WRAP", "wrapping per-meter keys"),
];

impl Mechanisms {
    pub(crate) fn has_required(&self, name: &str) -> bool {
        match name {
            "CKM_EC_KEY_PAIR_GEN" => self.ec_keygen,
            "CKM_ECDSA" => self.ecdsa,
            "CKM_AES_KEY_GEN" => self.aes_keygen,
            "CKM_AES_KEY_WRAP" => self.aes_key_wrap,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanism_type_round_trips() {
        let t = aes_ecb_encrypt_data_type();
        assert_eq!(*t, 0x1104);
        assert_eq!(t.to_string(), "CKM_AES_ECB_ENCRYPT_DATA");
    }
}
