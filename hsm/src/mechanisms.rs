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

/// `CKM_AES_KEY_WRAP_KWP` (PKCS#11 3.0): RFC 5649 on tokens that number it so (Kryoptic, Luna);
/// SoftHSM 2.6 uses `CKM_AES_KEY_WRAP_PAD` (0x210A) for it. Which number does RFC 5649 on a token
/// is decided by a known-answer wrap, never by the number alone (on one HSM family 0x210B is a
/// PKCS#7-padded variant).
const CKM_AES_KEY_WRAP_KWP: std::os::raw::c_ulong = 0x210B;

/// The `MechanismType` of a standard mechanism number that cryptoki 0.12.1 cannot name: it
/// offers no constant for it and refuses to convert the number (only vendor-defined numbers may
/// be built).
#[allow(unsafe_code)]
pub(crate) fn raw_type(n: std::os::raw::c_ulong) -> MechanismType {
    // SAFETY: `MechanismType` is `#[repr(transparent)]` over `CK_MECHANISM_TYPE` (cryptoki relies
    // on this itself to pass `&[MechanismType]` to C as `CK_MECHANISM_TYPE*`), `transmute`
    // checks that the sizes match, and every `CK_MECHANISM_TYPE` value is a valid mechanism type
    // (unknown values print as numbers). `mechanism_type_round_trips` checks the result.
    unsafe { std::mem::transmute::<std::os::raw::c_ulong, MechanismType>(n) }
}

/// The `MechanismType` of `CKM_AES_ECB_ENCRYPT_DATA`, needed for the key-transport key.
pub(crate) fn aes_ecb_encrypt_data_type() -> MechanismType {
    raw_type(CKM_AES_ECB_ENCRYPT_DATA)
}

/// The `MechanismType` of `CKM_AES_KEY_WRAP_KWP` (0x210B).
pub(crate) fn aes_key_wrap_kwp_type() -> MechanismType {
    raw_type(CKM_AES_KEY_WRAP_KWP)
}

/// A mechanism without parameters, by type.
pub(crate) fn bare(t: MechanismType) -> Mechanism<'static> {
    if t == MechanismType::AES_KEY_WRAP_PAD {
        Mechanism::AesKeyWrapPad
    } else {
        Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(t, None))
    }
}

/// The known answer of the RFC 5649 probe: the 16-byte key [`KWP_KAT_KEY`] wrapped under the
/// AES-256 key [`KWP_KAT_KEK`] (checked against the `aes-kw` crate in this module's tests).
pub(crate) const KWP_KAT_KEK: [u8; 32] = [
    0x4b, 0x57, 0x50, 0x2d, 0x6b, 0x61, 0x74, 0x2d, 0x6b, 0x65, 0x6b, 0x2d, 0x30, 0x31, 0x32, 0x33,
    0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a,
];
/// The key of the RFC 5649 probe.
pub(crate) const KWP_KAT_KEY: [u8; 16] = [
    0x6b, 0x77, 0x70, 0x20, 0x70, 0x72, 0x6f, 0x62, 0x65, 0x20, 0x6b, 0x65, 0x79, 0x20, 0x31, 0x36,
];
/// [`KWP_KAT_KEY`] wrapped under [`KWP_KAT_KEK`] by RFC 5649 (what `openssl enc
/// -id-aes256-wrap-pad -iv A65959A6` gives too).
pub(crate) const KWP_KAT_WRAPPED: [u8; 24] = [
    0x94, 0x96, 0x1b, 0x3f, 0xaf, 0xeb, 0xee, 0x54, 0xce, 0x03, 0x5a, 0x76, 0xac, 0x88, 0x03, 0x3d,
    0x2b, 0x30, 0xfe, 0x9e, 0x1d, 0xb7, 0x9e, 0x10,
];

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

    /// The `CK_RSA_PKCS_OAEP_PARAMS` of this hash with `label`.
    pub fn params_with_label(self, label: &[u8]) -> PkcsOaepParams<'_> {
        let (hash, mgf) = match self {
            OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
            OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        };
        PkcsOaepParams::new(hash, mgf, PkcsOaepSource::data_specified(label))
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
    /// RFC 5649 AES key wrap with padding, under whichever number the token does it
    /// (CKM_AES_KEY_WRAP_PAD 0x210A, or CKM_AES_KEY_WRAP_KWP 0x210B), found by a known-answer
    /// wrap when the token opens.
    pub aes_key_wrap_pad: bool,
    /// The mechanism that does RFC 5649 on this token, when one does.
    pub kwp: Option<MechanismType>,
    /// ECDH (CKM_ECDH1_DERIVE, null KDF).
    pub ecdh: bool,
    /// CKM_AES_ECB_ENCRYPT_DATA (key-transport key derivation).
    pub aes_ecb_encrypt_data: bool,
    /// RSA key pair generation (utility side).
    pub rsa_keygen: bool,
    /// RSA-OAEP and the hash chosen for it (`None`: the token has no usable RSA-OAEP).
    pub rsa_oaep: Option<OaepHash>,
    /// RSA-OAEP takes a label (SoftHSM 2.6.1 refuses every label): the batch transport key is
    /// then wrapped with its work order as the label.
    pub oaep_label: bool,
    /// The token gives AES keys a CKA_CHECK_VALUE (else keys that need a check value may
    /// ECB-encrypt to compute one; see `ObjectPolicy::with_ecb_check_value`).
    pub check_value: bool,
    /// The line protocol's AES-ECB key transport works here: a probe derived with
    /// CKM_ECDH1_DERIVE and the null KDF, then CKM_AES_ECB_ENCRYPT_DATA (FIPS-mode HSMs refuse
    /// the null KDF even where they list the mechanism).
    pub ktk_aes_ecb: bool,
    /// The line protocol's X9.63 key transport works here: a probe derived with
    /// CKM_ECDH1_DERIVE and CKD_SHA256_KDF.
    pub ktk_x963: bool,
}

impl Mechanisms {
    /// The RSA-OAEP choice, e.g. `CKM_RSA_PKCS_OAEP(SHA-256, MGF1-SHA-256, empty label)`.
    pub fn chosen_oaep(&self) -> &'static str {
        match self.rsa_oaep {
            Some(OaepHash::Sha256) if self.oaep_label => {
                "CKM_RSA_PKCS_OAEP(SHA-256, MGF1-SHA-256, the work order as label)"
            }
            Some(OaepHash::Sha1) if self.oaep_label => {
                "CKM_RSA_PKCS_OAEP(SHA-1, MGF1-SHA-1, the work order as label)"
            }
            Some(OaepHash::Sha256) => "CKM_RSA_PKCS_OAEP(SHA-256, MGF1-SHA-256, empty label)",
            Some(OaepHash::Sha1) => "CKM_RSA_PKCS_OAEP(SHA-1, MGF1-SHA-1, empty label)",
            None => "none",
        }
    }

    /// The key-transport derivations this token does.
    pub fn chosen_ktk(&self) -> &'static str {
        match (self.ktk_x963, self.ktk_aes_ecb) {
            (true, true) => {
                "CKM_ECDH1_DERIVE(CKD_SHA256_KDF) with meters that offer X9.63, else CKM_ECDH1_DERIVE(null kdf) + CKM_AES_ECB_ENCRYPT_DATA"
            }
            (true, false) => {
                "CKM_ECDH1_DERIVE(CKD_SHA256_KDF) only: meters must offer the X9.63 key transport"
            }
            (false, true) => "CKM_ECDH1_DERIVE(null kdf) + CKM_AES_ECB_ENCRYPT_DATA",
            (false, false) => "unavailable",
        }
    }

    /// A one-line summary of the choices, for logs and `station hsm info`.
    pub fn chosen(&self) -> String {
        let oaep = self.chosen_oaep();
        format!(
            "sign: CKM_ECDSA over a software SHA-256/384 digest; wrap: {}; wrap with padding: {}; transport-key wrap: {oaep}; ktk: {}; check values: {}",
            if self.aes_key_wrap {
                "CKM_AES_KEY_WRAP (RFC 3394)"
            } else {
                "none"
            },
            match self.kwp {
                Some(t) => format!("{t} (RFC 5649, known answer checked)"),
                None => "none".into(),
            },
            self.chosen_ktk(),
            if self.check_value {
                "CKA_CHECK_VALUE"
            } else {
                "CKM_AES_ECB over a zero block (the token gives no CKA_CHECK_VALUE)"
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
    fn the_rfc5649_known_answer_is_what_an_independent_implementation_computes() {
        let mut kek = [0u8; 32];
        kek.copy_from_slice(&KWP_KAT_KEK);
        let expected = line_protocol::crypto::wrap_key(
            &kek,
            line_protocol::msg::WrapAlg::AesKwp,
            &KWP_KAT_KEY,
        )
        .unwrap();
        assert_eq!(
            KWP_KAT_WRAPPED.to_vec(),
            expected,
            "{}",
            hex::encode(&expected)
        );
        assert_eq!(*aes_key_wrap_kwp_type(), 0x210B);
    }

    #[test]
    fn mechanism_type_round_trips() {
        let t = aes_ecb_encrypt_data_type();
        assert_eq!(*t, 0x1104);
        assert_eq!(t.to_string(), "CKM_AES_ECB_ENCRYPT_DATA");
    }
}
