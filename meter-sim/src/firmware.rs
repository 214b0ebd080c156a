//! Firmware images for demos, tests and benchmarks: MCUboot-format signing (what a release
//! process does with `imgtool sign`; the cell itself never signs firmware) and generators for
//! incompressible and firmware-like payloads.

use line_protocol::crypto::sha256;
use line_protocol::image::{self, ImageVersion};
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::hazmat::PrehashSigner;

use crate::rng::NoiseRng;

/// Signs `payload` as an MCUboot image: header padded to `header_size`, TLVs SHA-256, key hash
/// and ECDSA P-256 signature, in the order `imgtool sign` writes them.
pub fn sign_image(
    payload: &[u8],
    version: ImageVersion,
    header_size: u16,
    key: &SigningKey,
) -> Vec<u8> {
    let mut img = Vec::with_capacity(header_size as usize + payload.len() + 160);
    img.extend_from_slice(&image::header_bytes(
        0,
        header_size,
        payload.len() as u32,
        version,
    ));
    img.resize(header_size as usize, 0);
    img.extend_from_slice(payload);
    let hash = sha256(&img);
    let sig: p256::ecdsa::Signature = match key.sign_prehash(&hash) {
        Ok(s) => s,
        // Signing a 32-byte prehash with a valid key does not fail.
        Err(_) => unreachable!("prehash signing failed"),
    };
    let mut tlvs = Vec::new();
    image::put_tlv(&mut tlvs, image::TLV_SHA256, &hash);
    image::put_tlv(
        &mut tlvs,
        image::TLV_KEYHASH,
        &image::key_hash(&p256::PublicKey::from(key.verifying_key())),
    );
    image::put_tlv(&mut tlvs, image::TLV_ECDSA_SIG, sig.to_der().as_bytes());
    img.extend_from_slice(&image::TLV_INFO_MAGIC.to_le_bytes());
    img.extend_from_slice(&((tlvs.len() + 4) as u16).to_le_bytes());
    img.extend_from_slice(&tlvs);
    img
}

/// `n` incompressible bytes.
pub fn random_payload(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = NoiseRng::new(seed);
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(n);
    v
}

/// `n` bytes that look like a microcontroller image: the first `code_fraction` is code-like
/// (16- and 32-bit instruction words from a small, skewed vocabulary, with literal constants and
/// short string tables), the rest erased flash (`0xFF`).
pub fn firmware_like_payload(n: usize, code_fraction: f64, seed: u64) -> Vec<u8> {
    let mut rng = NoiseRng::new(seed);
    let vocab: Vec<[u8; 2]> = (0..384)
        .map(|_| (rng.next_u64() as u16).to_le_bytes())
        .collect();
    let words = [
        "meter", "error", "flash", "keys", "dlms", "cosem", "init", "ok", "fail", "tariff",
    ];
    let code_len = ((n as f64) * code_fraction.clamp(0.0, 1.0)) as usize;
    let mut v = Vec::with_capacity(n);
    while v.len() < code_len {
        let r = rng.unit();
        if r < 0.78 {
            // Skewed choice: common instructions dominate, as in compiled code.
            let i = ((rng.unit().powi(3)) * vocab.len() as f64) as usize;
            v.extend_from_slice(&vocab[i.min(vocab.len() - 1)]);
        } else if r < 0.93 {
            v.extend_from_slice(&(rng.next_u64() as u32).to_le_bytes());
        } else {
            let w = words[rng.below(words.len() as u64) as usize];
            v.extend_from_slice(w.as_bytes());
            v.push(0);
        }
    }
    v.truncate(code_len);
    v.resize(n, 0xFF);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::elliptic_curve::Generate;

    #[test]
    fn signed_images_verify_and_one_bit_breaks_them() {
        let key = SigningKey::generate_from_rng(&mut line_protocol::testkit::SeededRng::new(3));
        let pk = p256::PublicKey::from(key.verifying_key());
        let img = sign_image(
            &firmware_like_payload(10_000, 0.6, 1),
            ImageVersion {
                major: 1,
                minor: 2,
                revision: 3,
                build: 0,
            },
            0x200,
            &key,
        );
        let info = image::verify(&img, &pk).unwrap();
        assert_eq!(info.version.to_string(), "1.2.3");
        let mut bad = img.clone();
        bad[0x300] ^= 0x04;
        assert!(image::verify(&bad, &pk).is_err());
        let other = SigningKey::generate_from_rng(&mut line_protocol::testkit::SeededRng::new(4));
        assert!(image::verify(&img, &p256::PublicKey::from(other.verifying_key())).is_err());
    }

    #[test]
    fn firmware_like_compresses_like_firmware() {
        let code = firmware_like_payload(200_000, 1.0, 5);
        let ratio =
            miniz_oxide::deflate::compress_to_vec(&code, 6).len() as f64 / code.len() as f64;
        assert!(
            (0.45..0.8).contains(&ratio),
            "code compresses to {ratio:.2}"
        );
        let random = random_payload(100_000, 5);
        let r =
            miniz_oxide::deflate::compress_to_vec(&random, 6).len() as f64 / random.len() as f64;
        assert!(r > 0.99, "random data must not compress: {r:.3}");
    }
}
