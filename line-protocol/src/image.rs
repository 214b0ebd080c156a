//! MCUboot signed images: parsing and verification, shared by the meter (before activation) and
//! the station (at `firmware import`).
//!
//! Layout, as written by MCUboot's `imgtool sign`: a 32-byte header (magic `0x96f3b83d`), padding
//! up to `hdr_size`, the payload (`img_size` bytes), optional protected TLVs (magic `0x6908`), then
//! the TLV area (magic `0x6907`) holding the SHA-256 of header+payload+protected TLVs (type
//! `0x10`), the SHA-256 of the signer's public key (`0x01`) and an ECDSA P-256 signature over that
//! hash (`0x22`). This module accepts exactly that shape and nothing else: every length is checked
//! against the buffer before use, and any byte after the TLV area is refused.

use p256::PublicKey;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use spki::EncodePublicKey;

use crate::crypto::sha256;

/// Header magic.
pub const IMAGE_MAGIC: u32 = 0x96f3_b83d;
/// Unprotected TLV area magic.
pub const TLV_INFO_MAGIC: u16 = 0x6907;
/// Protected TLV area magic.
pub const TLV_PROT_INFO_MAGIC: u16 = 0x6908;
/// TLV: SHA-256 of the signing public key.
pub const TLV_KEYHASH: u16 = 0x01;
/// TLV: SHA-256 of the image.
pub const TLV_SHA256: u16 = 0x10;
/// TLV: ECDSA P-256 signature (DER) over the image hash.
pub const TLV_ECDSA_SIG: u16 = 0x22;
/// Length of the fixed header.
pub const HEADER_SIZE: usize = 32;
/// Largest image this module will parse.
pub const MAX_IMAGE: usize = 16 << 20;

/// Image version from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageVersion {
    /// Major.
    pub major: u8,
    /// Minor.
    pub minor: u8,
    /// Revision.
    pub revision: u16,
    /// Build number.
    pub build: u32,
}

impl ImageVersion {
    /// The 8 bytes FW_RESULT carries.
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.major;
        b[1] = self.minor;
        b[2..4].copy_from_slice(&self.revision.to_le_bytes());
        b[4..8].copy_from_slice(&self.build.to_le_bytes());
        b
    }

    /// Decodes FW_RESULT's version bytes.
    pub fn from_bytes(b: [u8; 8]) -> Self {
        ImageVersion {
            major: b[0],
            minor: b[1],
            revision: u16::from_le_bytes([b[2], b[3]]),
            build: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }
}

impl std::fmt::Display for ImageVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.revision)?;
        if self.build != 0 {
            write!(f, "+{}", self.build)?;
        }
        Ok(())
    }
}

/// What a well-formed image holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Load address from the header.
    pub load_addr: u32,
    /// Header size (including padding).
    pub hdr_size: u16,
    /// Payload size.
    pub img_size: u32,
    /// Header flags.
    pub flags: u32,
    /// Version.
    pub version: ImageVersion,
    /// The hash TLV (checked against the content).
    pub hash: [u8; 32],
    /// The key-hash TLV, if present.
    pub key_hash: Option<[u8; 32]>,
    /// The signature TLV, if present.
    pub signature: Option<Vec<u8>>,
    /// SHA-256 of the whole file, as the batch pins it.
    pub file_sha256: [u8; 32],
}

/// Why an image was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageError {
    /// Not an MCUboot image or its structure is broken; the text says where.
    Format(&'static str),
    /// The hash TLV does not match the content.
    HashMismatch,
    /// No signature TLV.
    Unsigned,
    /// Signed by a different key than the verification key.
    WrongKey,
    /// The signature does not verify.
    BadSignature,
}

impl std::fmt::Display for ImageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageError::Format(what) => write!(f, "not a valid signed image: {what}"),
            ImageError::HashMismatch => write!(f, "image hash does not match its content"),
            ImageError::Unsigned => write!(f, "image carries no ECDSA P-256 signature"),
            ImageError::WrongKey => write!(f, "image was signed by a different key"),
            ImageError::BadSignature => write!(f, "image signature does not verify"),
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses the structure and checks the hash TLV; does not check the signature.
pub fn parse(image: &[u8]) -> Result<ImageInfo, ImageError> {
    use ImageError::Format;
    if image.len() > MAX_IMAGE {
        return Err(Format("larger than 16 MiB"));
    }
    if image.len() < HEADER_SIZE {
        return Err(Format("shorter than the header"));
    }
    if le32(image, 0) != IMAGE_MAGIC {
        return Err(Format("bad header magic"));
    }
    let load_addr = le32(image, 4);
    let hdr_size = le16(image, 8);
    let prot_size = le16(image, 10) as usize;
    let img_size = le32(image, 12);
    let flags = le32(image, 16);
    let version = ImageVersion {
        major: image[20],
        minor: image[21],
        revision: le16(image, 22),
        build: le32(image, 24),
    };
    if (hdr_size as usize) < HEADER_SIZE {
        return Err(Format("header size below 32"));
    }
    if flags != 0 {
        // Encrypted, compressed or RAM-load images are not what a meter activates here.
        return Err(Format("unsupported header flags"));
    }
    let body_end = (hdr_size as usize)
        .checked_add(img_size as usize)
        .filter(|&e| e <= image.len())
        .ok_or(Format("payload runs past the end"))?;
    let hashed_end = body_end
        .checked_add(prot_size)
        .filter(|&e| e <= image.len())
        .ok_or(Format("protected TLVs run past the end"))?;
    if prot_size != 0 {
        if prot_size < 4
            || le16(image, body_end) != TLV_PROT_INFO_MAGIC
            || le16(image, body_end + 2) as usize != prot_size
        {
            return Err(Format("bad protected TLV area"));
        }
        walk_tlvs(&image[body_end + 4..hashed_end], |_, _| Ok(()))?;
    }
    if hashed_end + 4 > image.len() {
        return Err(Format("no TLV area"));
    }
    if le16(image, hashed_end) != TLV_INFO_MAGIC {
        return Err(Format("bad TLV area magic"));
    }
    let tlv_total = le16(image, hashed_end + 2) as usize;
    let tlv_end = hashed_end
        .checked_add(tlv_total)
        .filter(|&e| e <= image.len() && tlv_total >= 4)
        .ok_or(Format("TLV area runs past the end"))?;
    if tlv_end != image.len() {
        return Err(Format("bytes after the TLV area"));
    }
    // TLVs 0x10, 0x01 and 0x22 count only here, each at most once (section 6.4).
    let mut hash = None;
    let mut key_hash = None;
    let mut signature = None;
    walk_tlvs(&image[hashed_end + 4..tlv_end], |t, v| {
        match t {
            TLV_SHA256 => {
                if hash.is_some() {
                    return Err(Format("two SHA-256 TLVs"));
                }
                hash = Some(<[u8; 32]>::try_from(v).map_err(|_| Format("hash TLV not 32 bytes"))?);
            }
            TLV_KEYHASH => {
                if key_hash.is_some() {
                    return Err(Format("two key hash TLVs"));
                }
                key_hash =
                    Some(<[u8; 32]>::try_from(v).map_err(|_| Format("key hash TLV not 32 bytes"))?);
            }
            TLV_ECDSA_SIG => {
                if signature.is_some() {
                    return Err(Format("two signature TLVs"));
                }
                signature = Some(v.to_vec());
            }
            _ => {}
        }
        Ok(())
    })?;
    let hash = hash.ok_or(Format("no SHA-256 TLV"))?;
    if sha256(&image[..hashed_end]) != hash {
        return Err(ImageError::HashMismatch);
    }
    Ok(ImageInfo {
        load_addr,
        hdr_size,
        img_size,
        flags,
        version,
        hash,
        key_hash,
        signature,
        file_sha256: sha256(image),
    })
}

/// Walks the TLVs of one area, checking its structure only: every TLV lies within the area.
/// What the types mean, and which may repeat, is the caller's business (the protected area's
/// TLVs count through the hash alone).
fn walk_tlvs(
    mut area: &[u8],
    mut each: impl FnMut(u16, &[u8]) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    while !area.is_empty() {
        if area.len() < 4 {
            return Err(ImageError::Format("truncated TLV"));
        }
        let t = le16(area, 0);
        let len = le16(area, 2) as usize;
        if area.len() < 4 + len {
            return Err(ImageError::Format("TLV runs past its area"));
        }
        each(t, &area[4..4 + len])?;
        area = &area[4 + len..];
    }
    Ok(())
}

/// SHA-256 of the DER SubjectPublicKeyInfo of `key`, as imgtool puts in the key-hash TLV.
pub fn key_hash(key: &PublicKey) -> [u8; 32] {
    match key.to_public_key_der() {
        Ok(doc) => sha256(doc.as_bytes()),
        // Encoding a valid P-256 key cannot fail; an all-zero hash matches nothing.
        Err(_) => [0u8; 32],
    }
}

/// Parses `image` and verifies its signature against `key`.
pub fn verify(image: &[u8], key: &PublicKey) -> Result<ImageInfo, ImageError> {
    verify_any(image, std::slice::from_ref(key)).map(|(info, _)| info)
}

/// Parses `image` and verifies its signature against any of `keys`: a meter holding several
/// firmware verification anchors accepts an image that verifies with any of them, and a key-hash
/// TLV names the one meant (sections 4.10 and 6.4). Returns the image and the index of the key
/// that verified it.
pub fn verify_any(image: &[u8], keys: &[PublicKey]) -> Result<(ImageInfo, usize), ImageError> {
    let info = parse(image)?;
    let candidates: Vec<(usize, &PublicKey)> = keys
        .iter()
        .enumerate()
        .filter(|(_, k)| info.key_hash.is_none_or(|kh| kh == key_hash(k)))
        .collect();
    if candidates.is_empty() && info.key_hash.is_some() {
        return Err(ImageError::WrongKey);
    }
    let sig = info.signature.as_ref().ok_or(ImageError::Unsigned)?;
    let sig = Signature::from_der(sig).map_err(|_| ImageError::BadSignature)?;
    let found = candidates
        .into_iter()
        .find(|(_, k)| {
            VerifyingKey::from(*k)
                .verify_prehash(&info.hash, &sig)
                .is_ok()
        })
        .map(|(i, _)| i)
        .ok_or(ImageError::BadSignature)?;
    Ok((info, found))
}

/// The 32-byte header for an image (used by the image builder in `meter-sim`).
pub fn header_bytes(
    load_addr: u32,
    hdr_size: u16,
    img_size: u32,
    version: ImageVersion,
) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(&IMAGE_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&load_addr.to_le_bytes());
    h[8..10].copy_from_slice(&hdr_size.to_le_bytes());
    h[12..16].copy_from_slice(&img_size.to_le_bytes());
    h[20] = version.major;
    h[21] = version.minor;
    h[22..24].copy_from_slice(&version.revision.to_le_bytes());
    h[24..28].copy_from_slice(&version.build.to_le_bytes());
    h
}

/// Appends one TLV.
pub fn put_tlv(out: &mut Vec<u8>, t: u16, v: &[u8]) {
    out.extend_from_slice(&t.to_le_bytes());
    out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    out.extend_from_slice(v);
}
