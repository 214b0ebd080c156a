//! The rework token: the station's signed permission for one sealed meter to return to blank.
//!
//! A sealed meter refuses every request that changes it. A meter that sealed but whose record
//! did not complete (a lost answer after SEAL, a failed attestation, a station stopped between
//! SEAL and its journal) would otherwise be scrap. REWORK carries a token the station signs in
//! its HSM, with the same key that signed the channel's transcript, after a supervisor approved
//! the rework. The token names the meter (its UID), the channel (the transcript hash, so it is
//! good for this channel only and cannot be replayed later or elsewhere) and the signing
//! certificate the cell issued to the meter (so a meter holding another certificate refuses it).
//! Its signature is ECDSA P-256 with SHA-256 over the token bytes.

use crate::limits;
use crate::msg::{Reader, put_str8};

/// First bytes of every rework token.
pub const REWORK_MAGIC: &[u8; 4] = b"JIGW";
/// Token format version.
pub const REWORK_VERSION: u8 = 1;

/// A decoded rework token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReworkToken {
    /// The meter's hardware UID.
    pub uid: Vec<u8>,
    /// The transcript hash of the channel the token is sent on.
    pub session: [u8; 32],
    /// SHA-256 of the signing (slot 1) certificate the cell issued to this meter; zeros when the
    /// meter holds none.
    pub cert_sha256: [u8; 32],
}

impl ReworkToken {
    /// Encodes the token.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + 1 + self.uid.len() + 64);
        out.extend_from_slice(REWORK_MAGIC);
        out.push(REWORK_VERSION);
        put_str8(&mut out, &self.uid);
        out.extend_from_slice(&self.session);
        out.extend_from_slice(&self.cert_sha256);
        out
    }

    /// Decodes a token; `None` if it is malformed in any way.
    pub fn decode(bytes: &[u8]) -> Option<ReworkToken> {
        if bytes.len() > limits::MAX_REWORK_TOKEN {
            return None;
        }
        let mut r = Reader::new(bytes);
        if r.take(4, "magic").ok()? != REWORK_MAGIC || r.u8("version").ok()? != REWORK_VERSION {
            return None;
        }
        let uid = r.bytes8(limits::MAX_UID, "uid").ok()?;
        if uid.is_empty() {
            return None;
        }
        let session = r.array("session").ok()?;
        let cert_sha256 = r.array("cert_sha256").ok()?;
        r.finish().ok()?;
        Some(ReworkToken {
            uid,
            session,
            cert_sha256,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_strictness() {
        let t = ReworkToken {
            uid: vec![0xA5; 12],
            session: [1; 32],
            cert_sha256: [2; 32],
        };
        let b = t.encode();
        assert_eq!(ReworkToken::decode(&b), Some(t));
        for cut in 0..b.len() {
            assert_eq!(ReworkToken::decode(&b[..cut]), None);
        }
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(ReworkToken::decode(&longer), None);
        let mut other = b.clone();
        other[0] = b'X';
        assert_eq!(ReworkToken::decode(&other), None);
        let mut v2 = b;
        v2[4] = 2;
        assert_eq!(ReworkToken::decode(&v2), None);
    }
}
