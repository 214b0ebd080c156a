//! The secure channel's cryptography: transcript hash, key schedule, frame protection and the
//! key-transport key.
//!
//! Everything here is a pure function of its inputs; randomness comes from the caller. The
//! station's key-transport private key lives in its HSM, so the host side only ever computes the
//! *derivation data* ([`ktk_derivation_data`]) and asks the HSM to do the rest; the meter side
//! computes the key-transport key in software with [`meter_ktk`].

use aes::Aes256;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use p256::ecdh::diffie_hellman;
use p256::{NonZeroScalar, PublicKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::frame::HEADER_LEN;
use crate::msg::{KeyType, WrapAlg};

/// Length of the AES-GCM tag appended to every encrypted payload.
pub const TAG_LEN: usize = 16;
/// Domain separation of the transcript hash.
pub const TRANSCRIPT_LABEL: &[u8] = b"jig-line-v1 transcript";
/// Prefix of the message the station signs.
pub const CHANNEL_SIG_LABEL: &[u8] = b"jig-line-v1 channel";
/// HKDF info for the two session keys.
pub const SESSION_KEYS_INFO: &[u8] = b"jig-line-v1 session keys";
/// Prefix of the key-transport key derivation data.
pub const KTK_LABEL: &[u8] = b"jig-line-v1 ktk";
/// Prefix of the X9.63 KDF's SharedInfo for the key-transport key.
pub const KTK_X963_LABEL: &[u8] = b"jig-line-v1 ktk x963";
/// Prefix of the proof-of-possession and receipt domains (see [`crate::receipt`]).
pub const RECEIPT_MAGIC: &[u8; 4] = b"JIGR";

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The transcript hash `TH` over HELLO, HELLO_ACK and the signed body of CHANNEL_OPEN.
///
/// `TH = SHA-256(label ‖ len16 ‖ hello ‖ len16 ‖ hello_ack ‖ len16 ‖ open_body)`, lengths
/// little-endian, payloads exactly as they travelled (plaintext).
pub fn transcript_hash(hello: &[u8], hello_ack: &[u8], open_body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TRANSCRIPT_LABEL);
    for part in [hello, hello_ack, open_body] {
        h.update((part.len() as u16).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// The byte string the station signs (ECDSA P-256 with SHA-256): `label ‖ TH`.
pub fn channel_signed_message(th: &[u8; 32]) -> Vec<u8> {
    [CHANNEL_SIG_LABEL, th.as_slice()].concat()
}

/// The two session keys: host→meter and meter→host.
pub struct SessionKeys {
    /// Protects frames the host sends.
    pub host_to_meter: Zeroizing<[u8; 32]>,
    /// Protects frames the meter sends.
    pub meter_to_host: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(<redacted>)")
    }
}

/// `HKDF-SHA256(salt = TH, ikm = Z, info = "jig-line-v1 session keys", L = 64)`, split in two.
pub fn session_keys(shared_x: &[u8; 32], th: &[u8; 32]) -> SessionKeys {
    let hk = Hkdf::<Sha256>::new(Some(th), shared_x);
    let mut okm = Zeroizing::new([0u8; 64]);
    // 64 bytes is far below HKDF-SHA256's limit of 255·32.
    let _ = hk.expand(SESSION_KEYS_INFO, okm.as_mut());
    let mut a = Zeroizing::new([0u8; 32]);
    let mut b = Zeroizing::new([0u8; 32]);
    a.copy_from_slice(&okm[..32]);
    b.copy_from_slice(&okm[32..]);
    SessionKeys {
        host_to_meter: a,
        meter_to_host: b,
    }
}

/// The 32 bytes the key-transport key is derived from: `SHA-256("jig-line-v1 ktk" ‖ TH)`.
pub fn ktk_derivation_data(th: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(KTK_LABEL);
    h.update(th);
    h.finalize().into()
}

/// `KTK = AES-256-ECB(key = Z2, data)`, the derivation an HSM performs with
/// `CKM_AES_ECB_ENCRYPT_DATA` on the ECDH output. Exposed for the meter side and for tests.
pub fn ktk_from_shared(z2: &[u8; 32], th: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let data = ktk_derivation_data(th);
    let cipher = Aes256::new(z2.into());
    let mut out = Zeroizing::new(data);
    for block in out.chunks_exact_mut(16) {
        cipher.encrypt_block(block.try_into().unwrap_or_else(|_| unreachable!()));
    }
    out
}

/// How the key-transport key is derived from the ECDH value (section 5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtkMethod {
    /// `AES-256-ECB(Z2, SHA-256("jig-line-v1 ktk" ‖ TH))` (the HSM: `CKM_ECDH1_DERIVE` with the
    /// null KDF, then `CKM_AES_ECB_ENCRYPT_DATA`). Every meter does it.
    AesEcb,
    /// The ANSI X9.63 KDF with SHA-256 and SharedInfo `"jig-line-v1 ktk x963" ‖ TH` (the HSM:
    /// `CKM_ECDH1_DERIVE` with `CKD_SHA256_KDF`, offered by every HSM family). Used when both the
    /// host's HELLO and the meter's HELLO_ACK set [`crate::msg::FEATURE_KTK_X963`].
    X963,
}

impl KtkMethod {
    /// The method a HELLO's and a HELLO_ACK's feature bytes agree on.
    pub fn negotiate(host_features: u8, meter_features: u8) -> KtkMethod {
        if host_features & meter_features & crate::msg::FEATURE_KTK_X963 != 0 {
            KtkMethod::X963
        } else {
            KtkMethod::AesEcb
        }
    }

    /// The key-transport key from the ECDH value `z2` and the transcript hash.
    pub fn derive(self, z2: &[u8; 32], th: &[u8; 32]) -> Zeroizing<[u8; 32]> {
        match self {
            KtkMethod::AesEcb => ktk_from_shared(z2, th),
            KtkMethod::X963 => ktk_x963_from_shared(z2, th),
        }
    }

    /// Its name in logs and records: `aes-ecb` or `x963`.
    pub fn name(self) -> &'static str {
        match self {
            KtkMethod::AesEcb => "aes-ecb",
            KtkMethod::X963 => "x963",
        }
    }
}

/// The X9.63 KDF's SharedInfo: `"jig-line-v1 ktk x963" ‖ TH` (52 bytes).
pub fn ktk_x963_shared_info(th: &[u8; 32]) -> Vec<u8> {
    let mut info = Vec::with_capacity(KTK_X963_LABEL.len() + 32);
    info.extend_from_slice(KTK_X963_LABEL);
    info.extend_from_slice(th);
    info
}

/// `KTK = SHA-256(Z2 ‖ 00000001 ‖ SharedInfo)`: the ANSI X9.63 KDF for one 32-byte block, what an
/// HSM computes with `CKM_ECDH1_DERIVE` and `CKD_SHA256_KDF`.
pub fn ktk_x963_from_shared(z2: &[u8; 32], th: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(z2);
    h.update(1u32.to_be_bytes());
    h.update(ktk_x963_shared_info(th));
    Zeroizing::new(h.finalize().into())
}

/// Raw ECDH: the x-coordinate of `secret · public`.
pub fn ecdh_x(secret: &NonZeroScalar, public: &PublicKey) -> Zeroizing<[u8; 32]> {
    let shared = diffie_hellman(secret, public.as_affine());
    let mut x = Zeroizing::new([0u8; 32]);
    x.copy_from_slice(shared.raw_secret_bytes());
    x
}

/// The meter's key-transport key by `method`, from its ephemeral secret and the host's `kt_pub`.
pub fn meter_ktk_with(
    method: KtkMethod,
    meter_eph: &NonZeroScalar,
    kt_pub: &PublicKey,
    th: &[u8; 32],
) -> Zeroizing<[u8; 32]> {
    method.derive(&ecdh_x(meter_eph, kt_pub), th)
}

/// The meter's key-transport key (AES-ECB construction) from its ephemeral secret and the
/// host's `kt_pub`.
pub fn meter_ktk(
    meter_eph: &NonZeroScalar,
    kt_pub: &PublicKey,
    th: &[u8; 32],
) -> Zeroizing<[u8; 32]> {
    ktk_from_shared(&ecdh_x(meter_eph, kt_pub), th)
}

/// Parses a SEC1 uncompressed P-256 point, rejecting the identity and off-curve points.
pub fn parse_p256_point(bytes: &[u8; 65]) -> Option<PublicKey> {
    if bytes[0] != 0x04 {
        return None;
    }
    PublicKey::from_sec1_bytes(bytes).ok()
}

/// One direction's AES-256-GCM state.
pub struct Aead {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Aead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aead(<redacted>)")
    }
}

/// The nonce of frame `seq`: `seq` (u32 LE) followed by eight zero bytes.
pub fn nonce_for(seq: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&seq.to_le_bytes());
    n
}

impl Aead {
    /// A direction keyed with `key`.
    pub fn new(key: &[u8; 32]) -> Self {
        Aead {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// Encrypts `buf` in place and appends the tag. `aad` is the frame header.
    pub fn seal(&self, seq: u32, aad: &[u8; HEADER_LEN], buf: &mut Vec<u8>) {
        let nonce = Nonce::from(nonce_for(seq));
        // AES-GCM fails only for messages over 2^36 bytes; frames are below 64 KiB.
        if let Ok(tag) = self
            .cipher
            .encrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into())
        {
            buf.extend_from_slice(tag.as_slice());
        }
    }

    /// Checks and decrypts `payload` (ciphertext ‖ tag). `None` when authentication fails.
    pub fn open(&self, seq: u32, aad: &[u8; HEADER_LEN], payload: &[u8]) -> Option<Vec<u8>> {
        if payload.len() < TAG_LEN {
            return None;
        }
        let (ct, tag) = payload.split_at(payload.len() - TAG_LEN);
        let tag = Tag::try_from(tag).ok()?;
        let mut buf = ct.to_vec();
        let nonce = Nonce::from(nonce_for(seq));
        self.cipher
            .decrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into(), &tag)
            .ok()?;
        Some(buf)
    }
}

/// Key check value of an AES key: the first three bytes of `AES-ECB(key, 0^16)` (the PKCS#11
/// `CKA_CHECK_VALUE` definition).
pub fn kcv_aes(key: &[u8]) -> Option<[u8; 3]> {
    let mut block = [0u8; 16];
    match key.len() {
        16 => aes::Aes128::new_from_slice(key)
            .ok()?
            .encrypt_block((&mut block).into()),
        32 => Aes256::new_from_slice(key)
            .ok()?
            .encrypt_block((&mut block).into()),
        _ => return None,
    }
    Some([block[0], block[1], block[2]])
}

/// Key check value of an EC private key: the first three bytes of SHA-256 of its uncompressed
/// public point.
pub fn kcv_ec_public(point: &[u8]) -> [u8; 3] {
    let d = sha256(point);
    [d[0], d[1], d[2]]
}

/// Expected length of the clear key of `key_type` (`None` for variable-length PKCS#8).
pub fn clear_key_len(key_type: KeyType) -> Option<usize> {
    match key_type {
        KeyType::Aes128 => Some(16),
        KeyType::Aes256 => Some(32),
        KeyType::EcP256 | KeyType::EcP384 => None,
    }
}

/// Unwraps `wrapped` under `ktk` with `alg`. `None` when the integrity check fails.
pub fn unwrap_key(ktk: &[u8; 32], alg: WrapAlg, wrapped: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if wrapped.len() < 16 || !wrapped.len().is_multiple_of(8) || wrapped.len() > 4096 {
        return None;
    }
    let mut buf = Zeroizing::new(vec![0u8; wrapped.len()]);
    let n = match alg {
        WrapAlg::AesKw => aes_kw::KwAes256::new(ktk.into())
            .unwrap_key(wrapped, &mut buf)
            .ok()?
            .len(),
        WrapAlg::AesKwp => aes_kw::KwpAes256::new(ktk.into())
            .unwrap_key(wrapped, &mut buf)
            .ok()?
            .len(),
    };
    buf.truncate(n);
    Some(buf)
}

/// Wraps `key` under `ktk` (software; used by tests and by tools that act as the HSM).
pub fn wrap_key(ktk: &[u8; 32], alg: WrapAlg, key: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; key.len() + 16];
    let n = match alg {
        WrapAlg::AesKw => aes_kw::KwAes256::new(ktk.into())
            .wrap_key(key, &mut buf)
            .ok()?
            .len(),
        WrapAlg::AesKwp => aes_kw::KwpAes256::new(ktk.into())
            .wrap_key(key, &mut buf)
            .ok()?
            .len(),
    };
    buf.truncate(n);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_kw_rfc3394_vector_4_6() {
        // RFC 3394 §4.6: 256-bit key data with a 256-bit KEK.
        let kek: [u8; 32] =
            hex::decode("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
                .unwrap()
                .try_into()
                .unwrap();
        let key = hex::decode("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
            .unwrap();
        let expected = hex::decode(
            "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21",
        )
        .unwrap();
        assert_eq!(wrap_key(&kek, WrapAlg::AesKw, &key).unwrap(), expected);
        assert_eq!(
            &unwrap_key(&kek, WrapAlg::AesKw, &expected).unwrap()[..],
            &key[..]
        );
        let mut bad = expected.clone();
        bad[5] ^= 1;
        assert!(unwrap_key(&kek, WrapAlg::AesKw, &bad).is_none());
    }

    #[test]
    fn gcm_rejects_any_change() {
        let aead = Aead::new(&[7u8; 32]);
        let aad = [1u8; HEADER_LEN];
        let mut buf = b"secret data".to_vec();
        aead.seal(5, &aad, &mut buf);
        assert_eq!(aead.open(5, &aad, &buf).unwrap(), b"secret data");
        assert!(aead.open(6, &aad, &buf).is_none(), "other counter");
        let mut aad2 = aad;
        aad2[0] ^= 1;
        assert!(aead.open(5, &aad2, &buf).is_none(), "other header");
        buf[0] ^= 1;
        assert!(aead.open(5, &aad, &buf).is_none(), "other ciphertext");
    }

    #[test]
    fn kcv_of_zero_key_matches_known_value() {
        // AES-128 of the zero block under the zero key is 66e94bd4ef8a2c3b884cfa59ca342b2e.
        assert_eq!(kcv_aes(&[0u8; 16]), Some([0x66, 0xe9, 0x4b]));
    }
}
