//! The attestation receipt a sealed meter signs with its new signing key.
//!
//! The receipt is what proves, to the station and later to the utility and the auditor, that this
//! meter holds these certificates, runs this firmware, is sealed, and answered this station's
//! challenge. It is signed with ECDSA over the receipt bytes: SHA-256 for a P-256 key, SHA-384 for
//! P-384. Verification of the signature lives with whoever holds the certificate (the station).

use crate::limits;
use crate::msg::{Lifecycle, Reader, put_str8};

/// A decoded receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Hardware UID.
    pub uid: Vec<u8>,
    /// Serial number.
    pub serial: String,
    /// System title.
    pub system_title: [u8; 8],
    /// Logical device name.
    pub ldn: String,
    /// Lifecycle at signing time.
    pub lifecycle: Lifecycle,
    /// Interfaces disabled.
    pub disabled: u16,
    /// SHA-256 of the active image.
    pub fw_sha256: [u8; 32],
    /// `(slot, SHA-256 of certificate DER)` for each installed certificate.
    pub certs: Vec<(u8, [u8; 32])>,
    /// The station's challenge.
    pub nonce: [u8; 16],
}

/// Receipt format version.
pub const RECEIPT_VERSION: u8 = 1;

impl Receipt {
    /// Encodes the receipt.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(200);
        out.extend_from_slice(crate::crypto::RECEIPT_MAGIC);
        out.push(RECEIPT_VERSION);
        put_str8(&mut out, &self.uid);
        put_str8(&mut out, self.serial.as_bytes());
        out.extend_from_slice(&self.system_title);
        put_str8(&mut out, self.ldn.as_bytes());
        out.push(self.lifecycle as u8);
        out.extend_from_slice(&self.disabled.to_le_bytes());
        out.extend_from_slice(&self.fw_sha256);
        out.push(self.certs.len() as u8);
        for (slot, fp) in &self.certs {
            out.push(*slot);
            out.extend_from_slice(fp);
        }
        out.extend_from_slice(&self.nonce);
        out
    }

    /// Decodes a receipt; `None` if it is malformed in any way.
    pub fn decode(bytes: &[u8]) -> Option<Receipt> {
        if bytes.len() > limits::MAX_RECEIPT {
            return None;
        }
        let mut r = Reader::new(bytes);
        if r.take(4, "magic").ok()? != crate::crypto::RECEIPT_MAGIC
            || r.u8("version").ok()? != RECEIPT_VERSION
        {
            return None;
        }
        let uid = r.bytes8(limits::MAX_UID, "uid").ok()?;
        let serial = r.str8(1, limits::MAX_SERIAL, "serial").ok()?;
        let system_title = r.array("system_title").ok()?;
        let ldn = r.str8(1, limits::MAX_LDN, "ldn").ok()?;
        let lifecycle = Lifecycle::from_u8(r.u8("lifecycle").ok()?)?;
        let disabled = r.u16("disabled").ok()?;
        let fw_sha256 = r.array("fw").ok()?;
        let n = r.u8("certs").ok()? as usize;
        if n > 4 {
            return None;
        }
        let mut certs = Vec::with_capacity(n);
        for _ in 0..n {
            certs.push((r.u8("slot").ok()?, r.array("fp").ok()?));
        }
        let nonce = r.array("nonce").ok()?;
        r.finish().ok()?;
        Some(Receipt {
            uid,
            serial,
            system_title,
            ldn,
            lifecycle,
            disabled,
            fw_sha256,
            certs,
            nonce,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_strictness() {
        let r = Receipt {
            uid: vec![1; 12],
            serial: "SN0001".into(),
            system_title: [2; 8],
            ldn: "LDN".into(),
            lifecycle: Lifecycle::Sealed,
            disabled: 7,
            fw_sha256: [3; 32],
            certs: vec![(1, [4; 32]), (2, [5; 32])],
            nonce: [6; 16],
        };
        let b = r.encode();
        assert_eq!(Receipt::decode(&b), Some(r));
        for cut in 0..b.len() {
            assert_eq!(Receipt::decode(&b[..cut]), None);
        }
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(Receipt::decode(&longer), None);
    }
}
