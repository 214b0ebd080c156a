//! The message set: typed messages and their payload encodings.
//!
//! Every multi-byte integer is little-endian. Variable fields carry their length in front of them
//! (`str8`/`bytes8`: one length byte; `bytes16`: two) and every length is checked against a limit
//! before anything is allocated. Decoding consumes the whole payload: trailing bytes are an error.
//! Nothing here knows about frames, sequence numbers or encryption.

use std::fmt;

use crate::limits;

/// Message type codes (the header's `type` byte).
pub mod ty {
    /// Host asks a meter to identify itself and start a session.
    pub const HELLO: u8 = 0x01;
    /// Meter identity, capabilities and ephemeral key.
    pub const HELLO_ACK: u8 = 0x02;
    /// Host's ephemeral keys, certificate chain and transcript signature.
    pub const CHANNEL_OPEN: u8 = 0x03;
    /// Meter's first encrypted frame: the channel is up.
    pub const CHANNEL_READY: u8 = 0x04;
    /// Generic success response.
    pub const ACK: u8 = 0x05;
    /// Meter status request.
    pub const STATUS: u8 = 0x10;
    /// Meter status.
    pub const STATUS_RSP: u8 = 0x11;
    /// Serial number, system title and logical device name.
    pub const IDENTITY: u8 = 0x12;
    /// Generate a key pair on the meter.
    pub const KEYGEN: u8 = 0x14;
    /// The certificate request for the generated key.
    pub const KEYGEN_RSP: u8 = 0x15;
    /// Install a certificate.
    pub const PUT_CERT: u8 = 0x16;
    /// Install a trust anchor.
    pub const PUT_ANCHOR: u8 = 0x18;
    /// Install a wrapped secret key.
    pub const PUT_KEY: u8 = 0x1A;
    /// Start (or resume) a firmware transfer.
    pub const FW_BEGIN: u8 = 0x20;
    /// How much of the image the meter already holds.
    pub const FW_BEGIN_RSP: u8 = 0x21;
    /// One offset-addressed block of the image.
    pub const FW_DATA: u8 = 0x22;
    /// Selective acknowledgement of firmware blocks.
    pub const FW_ACK: u8 = 0x23;
    /// All blocks sent: verify and activate.
    pub const FW_END: u8 = 0x24;
    /// Verification result.
    pub const FW_RESULT: u8 = 0x25;
    /// Lock the provisioning interface.
    pub const SEAL: u8 = 0x26;
    /// Lifecycle after sealing.
    pub const SEAL_RSP: u8 = 0x27;
    /// Ask for a signed receipt.
    pub const ATTEST: u8 = 0x28;
    /// The signed receipt.
    pub const ATTEST_RSP: u8 = 0x29;
    /// Reboot, release the meter from the nest, or wipe it.
    pub const RESET: u8 = 0x2A;
    /// A signed rework token: a sealed meter returns to blank.
    pub const REWORK: u8 = 0x2C;
    /// Failure response with an error code.
    pub const ERROR: u8 = 0x7F;

    /// Is `t` a type the meter sends (M→H in the type table, ERROR included)? A meter answers
    /// one it receives `UNEXPECTED` on a channel and `NO_CHANNEL` without one, without decoding
    /// its payload (section 4, "Order of checks", step 2).
    pub fn sent_by_meter(t: u8) -> bool {
        matches!(
            t,
            HELLO_ACK
                | CHANNEL_READY
                | ACK
                | STATUS_RSP
                | KEYGEN_RSP
                | FW_BEGIN_RSP
                | FW_ACK
                | FW_RESULT
                | SEAL_RSP
                | ATTEST_RSP
                | ERROR
        )
    }

    /// Is `t` a type this implementation knows (either direction)?
    pub fn is_known(t: u8) -> bool {
        sent_by_meter(t)
            || matches!(
                t,
                HELLO
                    | CHANNEL_OPEN
                    | STATUS
                    | IDENTITY
                    | KEYGEN
                    | PUT_CERT
                    | PUT_ANCHOR
                    | PUT_KEY
                    | FW_BEGIN
                    | FW_DATA
                    | FW_END
                    | SEAL
                    | ATTEST
                    | RESET
                    | REWORK
            )
    }
}

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $val:expr),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $($(#[$vm])* $var = $val),+ }
        impl $name {
            /// Decodes the wire value.
            pub fn from_u8(v: u8) -> Option<Self> {
                match v { $($val => Some($name::$var),)+ _ => None }
            }
        }
    };
}

wire_enum!(
    /// The meter's lifecycle state.
    Lifecycle {
        /// Nothing provisioned.
        Blank = 0,
        /// Identity, keys or certificates present; provisioning interface open.
        Personalized = 1,
        /// Provisioning interface locked.
        Sealed = 2,
    }
);

impl Lifecycle {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Lifecycle::Blank => "blank",
            Lifecycle::Personalized => "personalized",
            Lifecycle::Sealed => "sealed",
        }
    }
}

wire_enum!(
    /// Elliptic curves for meter key pairs.
    Curve {
        /// NIST P-256 (DLMS security suite 1).
        P256 = 1,
        /// NIST P-384 (DLMS security suite 2).
        P384 = 2,
    }
);

wire_enum!(
    /// Certificate slots on the meter.
    CertSlot {
        /// The meter's digital-signature certificate.
        Sign = 1,
        /// The meter's key-agreement certificate.
        KeyAgreement = 2,
        /// The certificate of the CA that issued the two above.
        DeviceCa = 3,
    }
);

wire_enum!(
    /// Trust anchor kinds.
    AnchorKind {
        /// Verifies firmware images before activation.
        FirmwareVerification = 1,
        /// The utility's CA.
        UtilityCa = 2,
        /// A utility client (head-end) certificate.
        UtilityClient = 3,
    }
);

wire_enum!(
    /// Identifiers of secret keys delivered to the meter.
    KeyId {
        /// Global unicast encryption key.
        Guek = 1,
        /// Global broadcast encryption key.
        Gbek = 2,
        /// Authentication key.
        Ak = 3,
        /// Master key (key encryption key).
        Kek = 4,
        /// Signing private key generated by the HSM (meters without a TRNG).
        SignPrivate = 0x11,
        /// Key-agreement private key generated by the HSM (meters without a TRNG).
        KaPrivate = 0x12,
    }
);

impl KeyId {
    /// Short lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            KeyId::Guek => "guek",
            KeyId::Gbek => "gbek",
            KeyId::Ak => "ak",
            KeyId::Kek => "kek",
            KeyId::SignPrivate => "sign-private",
            KeyId::KaPrivate => "ka-private",
        }
    }

    /// Does this key id take keys of `key_type`? Ids 1..4 take AES keys, 0x11 and 0x12 EC
    /// private keys; any other pairing is `MALFORMED` (section 4.11).
    pub fn takes(self, key_type: KeyType) -> bool {
        match self {
            KeyId::Guek | KeyId::Gbek | KeyId::Ak | KeyId::Kek => {
                matches!(key_type, KeyType::Aes128 | KeyType::Aes256)
            }
            KeyId::SignPrivate | KeyId::KaPrivate => {
                matches!(key_type, KeyType::EcP256 | KeyType::EcP384)
            }
        }
    }
}

wire_enum!(
    /// Types of delivered keys.
    KeyType {
        /// AES-128 secret key.
        Aes128 = 1,
        /// AES-256 secret key.
        Aes256 = 2,
        /// P-256 private key as PKCS#8 DER.
        EcP256 = 3,
        /// P-384 private key as PKCS#8 DER.
        EcP384 = 4,
    }
);

wire_enum!(
    /// Key wrapping algorithms.
    WrapAlg {
        /// AES key wrap, RFC 3394.
        AesKw = 1,
        /// AES key wrap with padding, RFC 5649.
        AesKwp = 2,
    }
);

wire_enum!(
    /// Reset modes.
    ResetMode {
        /// Reboot; persistent state is kept.
        Reboot = 0,
        /// Provisioning of this meter is over: power it down so the nest can take the next one.
        Release = 1,
        /// Erase everything back to blank (refused once sealed).
        FactoryWipe = 2,
    }
);

wire_enum!(
    /// Encodings of firmware blocks.
    Encoding {
        /// The bytes as they are.
        Raw = 0,
        /// Raw DEFLATE (RFC 1951, no zlib header).
        Deflate = 1,
    }
);

/// The STATUS_RSP `keys` bit of a delivered key id: bit (id−1) for the secret keys 1..4, bit 8
/// for 0x11 and bit 9 for 0x12 (section 4.6).
pub fn status_key_bit(key_id: u8) -> u16 {
    match key_id {
        0x11 => 1 << 8,
        0x12 => 1 << 9,
        n => 1u16.checked_shl(u32::from(n.wrapping_sub(1))).unwrap_or(0),
    }
}

/// Feature bit: DEFLATE-compressed firmware blocks (HELLO and HELLO_ACK).
pub const FEATURE_DEFLATE: u8 = 0x01;
/// Feature bit: the meter generates P-256 key pairs on chip.
pub const FEATURE_KEYGEN_P256: u8 = 0x02;
/// Feature bit: the meter generates P-384 key pairs on chip.
pub const FEATURE_KEYGEN_P384: u8 = 0x04;
/// Feature bit (HELLO and HELLO_ACK): the key-transport key by the ANSI X9.63 KDF (section 5.3);
/// used when both sides set it, else the AES-ECB construction.
pub const FEATURE_KTK_X963: u8 = 0x08;
/// Feature bit (HELLO_ACK): the meter accepts REWORK (section 4.16), so a sealed meter can be
/// returned to blank with a station-signed token.
pub const FEATURE_REWORK: u8 = 0x10;

/// Interface bits for SEAL.
pub mod iface {
    /// The jig provisioning interface (always locked by SEAL).
    pub const PROVISIONING: u16 = 0x0001;
    /// The debug port (SWD/JTAG).
    pub const DEBUG: u16 = 0x0002;
    /// The optical maintenance port.
    pub const OPTICAL: u16 = 0x0004;
    /// Every interface bit this protocol version defines.
    pub const ALL: u16 = PROVISIONING | DEBUG | OPTICAL;
}

/// Error codes carried by ERROR messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The payload could not be decoded.
    Malformed,
    /// No common protocol version.
    UnsupportedVersion,
    /// Unknown message type.
    UnknownType,
    /// The message is not allowed in the current state.
    Unexpected,
    /// A field or the frame exceeds a limit.
    TooLarge,
    /// The message needs the secure channel.
    NoChannel,
    /// The certificate chain does not lead to the provisioning root.
    BadCertChain,
    /// The transcript signature is invalid.
    BadSignature,
    /// An encrypted frame failed authentication.
    DecryptFailed,
    /// A frame counter was not above the last one accepted.
    Replay,
    /// The meter is sealed.
    Locked,
    /// The meter is not ready to seal.
    NotReady,
    /// A wrapped key could not be unwrapped.
    UnwrapFailed,
    /// A key's check value does not match.
    KcvMismatch,
    /// A certificate does not certify the meter's key for that slot.
    CertKeyMismatch,
    /// An identity differs from the one already stored.
    IdentityMismatch,
    /// The curve is not supported.
    UnsupportedCurve,
    /// Key generation failed.
    KeygenFailed,
    /// Writing to non-volatile memory failed.
    Storage,
    /// A firmware block lies outside the image.
    FwOutOfRange,
    /// A firmware block did not decompress to its stated length.
    FwDecompress,
    /// FW_END before every byte arrived.
    FwIncomplete,
    /// The received image does not have the announced SHA-256.
    FwHashMismatch,
    /// The image signature does not verify.
    FwSignatureInvalid,
    /// The image is not a valid signed image.
    FwFormat,
    /// No firmware verification anchor is installed.
    FwNoAnchor,
    /// The image does not fit the slot.
    FwTooLarge,
    /// FW_DATA or FW_END without FW_BEGIN.
    FwNotStarted,
    /// A rework token is not for this meter, this channel or this certificate, or its
    /// signature does not verify.
    ReworkRefused,
    /// Anything else.
    Internal,
    /// A code this implementation does not know.
    Other(u16),
}

impl ErrorCode {
    /// The wire value.
    pub fn code(self) -> u16 {
        use ErrorCode::*;
        match self {
            Malformed => 0x0001,
            UnsupportedVersion => 0x0002,
            UnknownType => 0x0003,
            Unexpected => 0x0004,
            TooLarge => 0x0005,
            NoChannel => 0x0006,
            BadCertChain => 0x0007,
            BadSignature => 0x0008,
            DecryptFailed => 0x0009,
            Replay => 0x000A,
            Locked => 0x000B,
            NotReady => 0x000C,
            UnwrapFailed => 0x000D,
            KcvMismatch => 0x000E,
            CertKeyMismatch => 0x000F,
            IdentityMismatch => 0x0010,
            UnsupportedCurve => 0x0011,
            KeygenFailed => 0x0012,
            Storage => 0x0013,
            ReworkRefused => 0x0014,
            FwOutOfRange => 0x0020,
            FwDecompress => 0x0021,
            FwIncomplete => 0x0022,
            FwHashMismatch => 0x0023,
            FwSignatureInvalid => 0x0024,
            FwFormat => 0x0025,
            FwNoAnchor => 0x0026,
            FwTooLarge => 0x0027,
            FwNotStarted => 0x0028,
            Internal => 0x00FF,
            Other(c) => c,
        }
    }

    /// Decodes a wire value (unknown values are kept as [`ErrorCode::Other`]).
    pub fn from_code(c: u16) -> Self {
        use ErrorCode::*;
        const ALL: [ErrorCode; 30] = [
            Malformed,
            UnsupportedVersion,
            UnknownType,
            Unexpected,
            TooLarge,
            NoChannel,
            BadCertChain,
            BadSignature,
            DecryptFailed,
            Replay,
            Locked,
            NotReady,
            UnwrapFailed,
            KcvMismatch,
            CertKeyMismatch,
            IdentityMismatch,
            UnsupportedCurve,
            KeygenFailed,
            Storage,
            ReworkRefused,
            FwOutOfRange,
            FwDecompress,
            FwIncomplete,
            FwHashMismatch,
            FwSignatureInvalid,
            FwFormat,
            FwNoAnchor,
            FwTooLarge,
            FwNotStarted,
            Internal,
        ];
        ALL.into_iter().find(|e| e.code() == c).unwrap_or(Other(c))
    }

    /// What the code means, in words an operator can read.
    pub fn describe(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Malformed => "message could not be decoded",
            UnsupportedVersion => "no common protocol version",
            UnknownType => "unknown message type",
            Unexpected => "message not allowed in this state",
            TooLarge => "message exceeds a limit",
            NoChannel => "secure channel required",
            BadCertChain => "station certificate chain not trusted by the meter",
            BadSignature => "station transcript signature invalid",
            DecryptFailed => "encrypted frame failed authentication",
            Replay => "replayed or reordered frame",
            Locked => "meter is sealed",
            NotReady => "meter not ready to seal",
            UnwrapFailed => "wrapped key could not be unwrapped",
            KcvMismatch => "key check value mismatch",
            CertKeyMismatch => "certificate does not match the meter's key",
            IdentityMismatch => "meter already holds a different identity",
            UnsupportedCurve => "curve not supported by the meter",
            KeygenFailed => "key generation failed on the meter",
            Storage => "meter flash write failed",
            ReworkRefused => "rework token refused by the meter",
            FwOutOfRange => "firmware block outside the image",
            FwDecompress => "firmware block failed to decompress",
            FwIncomplete => "firmware image incomplete",
            FwHashMismatch => "firmware image hash mismatch",
            FwSignatureInvalid => "firmware signature invalid",
            FwFormat => "firmware image format invalid",
            FwNoAnchor => "no firmware verification key installed",
            FwTooLarge => "firmware image larger than the slot",
            FwNotStarted => "no firmware transfer in progress",
            Internal => "internal meter error",
            Other(_) => "unknown error code",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:04x})", self.describe(), self.code())
    }
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload ended inside `field`.
    Truncated(&'static str),
    /// Bytes left over after the last field.
    Trailing,
    /// `field` holds a value this version does not define.
    BadValue(&'static str),
    /// `field` is longer than its limit.
    TooLong(&'static str),
    /// The type code is unknown.
    UnknownType(u8),
}

impl DecodeError {
    /// The error code a receiver answers with.
    pub fn code(self) -> ErrorCode {
        match self {
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
            DecodeError::TooLong(_) => ErrorCode::TooLarge,
            _ => ErrorCode::Malformed,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated(field) => write!(f, "payload ends inside field `{field}`"),
            DecodeError::Trailing => write!(f, "trailing bytes after the last field"),
            DecodeError::BadValue(field) => write!(f, "undefined value in field `{field}`"),
            DecodeError::TooLong(field) => write!(f, "field `{field}` exceeds its limit"),
            DecodeError::UnknownType(t) => write!(f, "unknown message type 0x{t:02x}"),
        }
    }
}

/// A bounded reader over a payload.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(DecodeError::Truncated(field));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    pub(crate) fn bytes8(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<Vec<u8>, DecodeError> {
        let n = self.u8(field)? as usize;
        if n > max {
            return Err(DecodeError::TooLong(field));
        }
        Ok(self.take(n, field)?.to_vec())
    }

    pub(crate) fn bytes16(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<Vec<u8>, DecodeError> {
        let n = self.u16(field)? as usize;
        if n > max {
            return Err(DecodeError::TooLong(field));
        }
        Ok(self.take(n, field)?.to_vec())
    }

    /// A length-prefixed printable ASCII string (0x20..=0x7E), at least `min` bytes.
    pub(crate) fn str8(
        &mut self,
        min: usize,
        max: usize,
        field: &'static str,
    ) -> Result<String, DecodeError> {
        let b = self.bytes8(max, field)?;
        if b.len() < min || !b.iter().all(|c| (0x20..=0x7E).contains(c)) {
            return Err(DecodeError::BadValue(field));
        }
        // Printable ASCII is valid UTF-8.
        String::from_utf8(b).map_err(|_| DecodeError::BadValue(field))
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::Trailing)
        }
    }
}

pub(crate) fn put_str8(out: &mut Vec<u8>, s: &[u8]) {
    debug_assert!(s.len() <= 255);
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

pub(crate) fn put_bytes16(out: &mut Vec<u8>, s: &[u8]) {
    debug_assert!(s.len() <= u16::MAX as usize);
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s);
}

fn enum_field<T>(v: u8, f: fn(u8) -> Option<T>, field: &'static str) -> Result<T, DecodeError> {
    f(v).ok_or(DecodeError::BadValue(field))
}

/// HELLO: the host starts a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the host speaks.
    pub version_min: u8,
    /// Highest protocol version the host speaks.
    pub version_max: u8,
    /// Fresh random nonce.
    pub nonce: [u8; 16],
    /// Largest payload the host accepts.
    pub max_payload: u16,
    /// Frames the host keeps in flight at most.
    pub window: u8,
    /// Feature bits the host supports.
    pub features: u8,
}

/// HELLO_ACK: the meter's identity, capabilities and ephemeral public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// The version chosen.
    pub version: u8,
    /// Lifecycle state as the meter reports it.
    pub lifecycle: Lifecycle,
    /// Hardware unique identifier (1..=32 bytes).
    pub uid: Vec<u8>,
    /// Model name (printable ASCII, 1..=32).
    pub model: String,
    /// Bootloader version (major, minor, patch).
    pub bootloader: [u8; 3],
    /// Largest payload the meter accepts.
    pub max_payload: u16,
    /// Frames the meter can buffer.
    pub window: u8,
    /// Feature bits the meter supports.
    pub features: u8,
    /// Largest decompressed firmware block.
    pub max_block: u32,
    /// Size of the firmware slot in bytes.
    pub slot_size: u32,
    /// Fresh random nonce.
    pub nonce: [u8; 16],
    /// The meter's ephemeral P-256 public key (SEC1 uncompressed).
    pub eph_pub: [u8; 65],
}

/// CHANNEL_OPEN: the host's keys, certificate chain and transcript signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOpen {
    /// Host ephemeral P-256 public key for the session keys.
    pub eph_pub: [u8; 65],
    /// Host ephemeral P-256 public key for the key-transport key (held in the HSM).
    pub kt_pub: [u8; 65],
    /// Station certificate chain, leaf first (DER).
    pub chain: Vec<Vec<u8>>,
    /// ECDSA P-256 signature (DER) by the leaf's key over the transcript.
    pub signature: Vec<u8>,
}

impl ChannelOpen {
    /// The signed part of the payload: everything before the signature.
    pub fn body_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(256 + self.chain.iter().map(|c| c.len() + 2).sum::<usize>());
        out.extend_from_slice(&self.eph_pub);
        out.extend_from_slice(&self.kt_pub);
        out.push(self.chain.len() as u8);
        for cert in &self.chain {
            put_bytes16(&mut out, cert);
        }
        out
    }
}

/// STATUS_RSP: what the meter holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// Lifecycle state.
    pub lifecycle: u8,
    /// 1 when an identity is stored.
    pub identity: u8,
    /// Certificate slots filled (bit 0 sign, bit 1 key agreement, bit 2 device CA).
    pub certs: u8,
    /// Keys held (bit `key_id - 1` for ids 1..=4, bit 8/9 for 0x11/0x12).
    pub keys: u16,
    /// Trust anchors held.
    pub anchors: u8,
    /// 0 none, 1 receiving, 2 verified and active, 3 failed.
    pub fw_state: u8,
    /// Size of the image being received or active.
    pub fw_size: u32,
    /// Contiguous bytes held from offset 0.
    pub fw_have: u32,
    /// SHA-256 of that image.
    pub fw_sha256: [u8; 32],
}

/// IDENTITY: assigned identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Meter serial number (printable ASCII, 1..=32).
    pub serial: String,
    /// DLMS system title (3-byte FLAG ID + 5 bytes).
    pub system_title: [u8; 8],
    /// COSEM logical device name (printable ASCII, 1..=48).
    pub ldn: String,
}

/// PUT_KEY: a secret key wrapped under the key-transport key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutKey {
    /// Which key.
    pub key_id: KeyId,
    /// Its type.
    pub key_type: KeyType,
    /// How it is wrapped.
    pub wrap: WrapAlg,
    /// Key check value.
    pub kcv: [u8; 3],
    /// The wrapped key.
    pub wrapped: Vec<u8>,
}

/// FW_DATA: one block of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwData {
    /// Offset of the block in the image.
    pub offset: u32,
    /// Length of the block once decoded.
    pub raw_len: u32,
    /// How `data` encodes the block.
    pub encoding: Encoding,
    /// The encoded block.
    pub data: Vec<u8>,
}

/// FW_ACK: selective acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FwAck {
    /// Every byte below this offset is held.
    pub have: u32,
    /// Further held ranges `[start, end)` above `have`, ascending, at most 8.
    pub ranges: Vec<(u32, u32)>,
}

/// FW_RESULT: outcome of verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FwResult {
    /// 0 when verified and activated; otherwise an error code.
    pub status: u16,
    /// SHA-256 of the received image as computed by the meter.
    pub sha256: [u8; 32],
    /// Image version from its header: major, minor, revision (LE u16), build (LE u32).
    pub version: [u8; 8],
}

/// Every message of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`ChannelOpen`].
    ChannelOpen(ChannelOpen),
    /// The channel is up; carries the first 8 bytes of the transcript hash.
    ChannelReady {
        /// Session identifier.
        session_id: [u8; 8],
    },
    /// Generic success.
    Ack,
    /// Ask for status.
    Status,
    /// See [`Status`].
    StatusRsp(Status),
    /// See [`Identity`].
    Identity(Identity),
    /// Generate a key pair for `slot`.
    KeyGen {
        /// Which slot.
        slot: CertSlot,
        /// On which curve.
        curve: Curve,
    },
    /// The PKCS#10 request for the key just generated.
    KeyGenRsp {
        /// Which slot.
        slot: CertSlot,
        /// DER certificate request.
        csr: Vec<u8>,
    },
    /// Install a certificate.
    PutCert {
        /// Which slot.
        slot: CertSlot,
        /// DER certificate.
        der: Vec<u8>,
    },
    /// Install a trust anchor.
    PutAnchor {
        /// What it anchors.
        kind: AnchorKind,
        /// Position among anchors of that kind.
        index: u8,
        /// DER certificate.
        der: Vec<u8>,
    },
    /// See [`PutKey`].
    PutKey(PutKey),
    /// Start or resume a firmware transfer.
    FwBegin {
        /// Image size in bytes.
        size: u32,
        /// SHA-256 of the whole image.
        sha256: [u8; 32],
        /// 1 when blocks may be DEFLATE-compressed.
        compression: u8,
    },
    /// How much of that image the meter already holds.
    FwBeginRsp {
        /// Contiguous bytes held from offset 0.
        have: u32,
    },
    /// See [`FwData`].
    FwData(FwData),
    /// See [`FwAck`].
    FwAck(FwAck),
    /// Every block has been sent.
    FwEnd,
    /// See [`FwResult`].
    FwResult(FwResult),
    /// Lock interfaces.
    Seal {
        /// Interface bits to disable; see [`iface`].
        disable: u16,
    },
    /// Lifecycle after sealing.
    SealRsp {
        /// New lifecycle.
        lifecycle: Lifecycle,
        /// Interfaces now disabled.
        disabled: u16,
    },
    /// Ask for a receipt.
    Attest {
        /// Fresh station nonce.
        nonce: [u8; 16],
    },
    /// The signed receipt.
    AttestRsp {
        /// Receipt bytes; see [`crate::receipt`].
        receipt: Vec<u8>,
        /// DER ECDSA signature by the meter's signing key.
        signature: Vec<u8>,
    },
    /// Reset the meter.
    Reset {
        /// How.
        mode: ResetMode,
    },
    /// Return a sealed meter to blank.
    Rework {
        /// The token; see [`crate::rework`].
        token: Vec<u8>,
        /// DER ECDSA P-256/SHA-256 signature over the token by the channel's station key.
        signature: Vec<u8>,
    },
    /// A failure.
    Error {
        /// What failed.
        code: ErrorCode,
        /// Printable ASCII detail, at most 96 bytes.
        detail: String,
    },
}

impl Message {
    /// The type code.
    pub fn msg_type(&self) -> u8 {
        match self {
            Message::Hello(_) => ty::HELLO,
            Message::HelloAck(_) => ty::HELLO_ACK,
            Message::ChannelOpen(_) => ty::CHANNEL_OPEN,
            Message::ChannelReady { .. } => ty::CHANNEL_READY,
            Message::Ack => ty::ACK,
            Message::Status => ty::STATUS,
            Message::StatusRsp(_) => ty::STATUS_RSP,
            Message::Identity(_) => ty::IDENTITY,
            Message::KeyGen { .. } => ty::KEYGEN,
            Message::KeyGenRsp { .. } => ty::KEYGEN_RSP,
            Message::PutCert { .. } => ty::PUT_CERT,
            Message::PutAnchor { .. } => ty::PUT_ANCHOR,
            Message::PutKey(_) => ty::PUT_KEY,
            Message::FwBegin { .. } => ty::FW_BEGIN,
            Message::FwBeginRsp { .. } => ty::FW_BEGIN_RSP,
            Message::FwData(_) => ty::FW_DATA,
            Message::FwAck(_) => ty::FW_ACK,
            Message::FwEnd => ty::FW_END,
            Message::FwResult(_) => ty::FW_RESULT,
            Message::Seal { .. } => ty::SEAL,
            Message::SealRsp { .. } => ty::SEAL_RSP,
            Message::Attest { .. } => ty::ATTEST,
            Message::AttestRsp { .. } => ty::ATTEST_RSP,
            Message::Reset { .. } => ty::RESET,
            Message::Rework { .. } => ty::REWORK,
            Message::Error { .. } => ty::ERROR,
        }
    }

    /// Short upper-case name, for logs.
    pub fn name(&self) -> &'static str {
        type_name(self.msg_type())
    }

    /// Appends the payload encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(h) => {
                out.extend_from_slice(&[h.version_min, h.version_max]);
                out.extend_from_slice(&h.nonce);
                out.extend_from_slice(&h.max_payload.to_le_bytes());
                out.extend_from_slice(&[h.window, h.features]);
            }
            Message::HelloAck(a) => {
                out.extend_from_slice(&[a.version, a.lifecycle as u8]);
                put_str8(out, &a.uid);
                put_str8(out, a.model.as_bytes());
                out.extend_from_slice(&a.bootloader);
                out.extend_from_slice(&a.max_payload.to_le_bytes());
                out.extend_from_slice(&[a.window, a.features]);
                out.extend_from_slice(&a.max_block.to_le_bytes());
                out.extend_from_slice(&a.slot_size.to_le_bytes());
                out.extend_from_slice(&a.nonce);
                out.extend_from_slice(&a.eph_pub);
            }
            Message::ChannelOpen(o) => {
                out.extend_from_slice(&o.body_bytes());
                put_str8(out, &o.signature);
            }
            Message::ChannelReady { session_id } => out.extend_from_slice(session_id),
            Message::Ack | Message::Status | Message::FwEnd => {}
            Message::StatusRsp(s) => {
                out.extend_from_slice(&[s.lifecycle, s.identity, s.certs]);
                out.extend_from_slice(&s.keys.to_le_bytes());
                out.extend_from_slice(&[s.anchors, s.fw_state]);
                out.extend_from_slice(&s.fw_size.to_le_bytes());
                out.extend_from_slice(&s.fw_have.to_le_bytes());
                out.extend_from_slice(&s.fw_sha256);
            }
            Message::Identity(i) => {
                put_str8(out, i.serial.as_bytes());
                out.extend_from_slice(&i.system_title);
                put_str8(out, i.ldn.as_bytes());
            }
            Message::KeyGen { slot, curve } => out.extend_from_slice(&[*slot as u8, *curve as u8]),
            Message::KeyGenRsp { slot, csr } => {
                out.push(*slot as u8);
                put_bytes16(out, csr);
            }
            Message::PutCert { slot, der } => {
                out.push(*slot as u8);
                put_bytes16(out, der);
            }
            Message::PutAnchor { kind, index, der } => {
                out.extend_from_slice(&[*kind as u8, *index]);
                put_bytes16(out, der);
            }
            Message::PutKey(k) => {
                out.extend_from_slice(&[k.key_id as u8, k.key_type as u8, k.wrap as u8]);
                out.extend_from_slice(&k.kcv);
                put_bytes16(out, &k.wrapped);
            }
            Message::FwBegin {
                size,
                sha256,
                compression,
            } => {
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(sha256);
                out.push(*compression);
            }
            Message::FwBeginRsp { have } => out.extend_from_slice(&have.to_le_bytes()),
            Message::FwData(d) => {
                out.extend_from_slice(&d.offset.to_le_bytes());
                out.extend_from_slice(&d.raw_len.to_le_bytes());
                out.push(d.encoding as u8);
                out.extend_from_slice(&d.data);
            }
            Message::FwAck(a) => {
                out.extend_from_slice(&a.have.to_le_bytes());
                out.push(a.ranges.len() as u8);
                for (s, e) in &a.ranges {
                    out.extend_from_slice(&s.to_le_bytes());
                    out.extend_from_slice(&e.to_le_bytes());
                }
            }
            Message::FwResult(r) => {
                out.extend_from_slice(&r.status.to_le_bytes());
                out.extend_from_slice(&r.sha256);
                out.extend_from_slice(&r.version);
            }
            Message::Seal { disable } => out.extend_from_slice(&disable.to_le_bytes()),
            Message::SealRsp {
                lifecycle,
                disabled,
            } => {
                out.push(*lifecycle as u8);
                out.extend_from_slice(&disabled.to_le_bytes());
            }
            Message::Attest { nonce } => out.extend_from_slice(nonce),
            Message::AttestRsp { receipt, signature } => {
                put_bytes16(out, receipt);
                put_str8(out, signature);
            }
            Message::Reset { mode } => out.push(*mode as u8),
            Message::Rework { token, signature } => {
                put_str8(out, token);
                put_str8(out, signature);
            }
            Message::Error { code, detail } => {
                out.extend_from_slice(&code.code().to_le_bytes());
                let d = detail.as_bytes();
                put_str8(out, &d[..d.len().min(limits::MAX_ERROR_DETAIL)]);
            }
        }
    }

    /// The payload encoding as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes the payload of a message of type `msg_type`.
    pub fn decode(msg_type: u8, payload: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader::new(payload);
        let m = match msg_type {
            ty::HELLO => Message::Hello(Hello {
                version_min: r.u8("version_min")?,
                version_max: r.u8("version_max")?,
                nonce: r.array("nonce")?,
                max_payload: r.u16("max_payload")?,
                window: r.u8("window")?,
                features: r.u8("features")?,
            }),
            ty::HELLO_ACK => {
                let version = r.u8("version")?;
                let lifecycle = enum_field(r.u8("lifecycle")?, Lifecycle::from_u8, "lifecycle")?;
                let uid = r.bytes8(limits::MAX_UID, "uid")?;
                if uid.is_empty() {
                    return Err(DecodeError::BadValue("uid"));
                }
                Message::HelloAck(HelloAck {
                    version,
                    lifecycle,
                    uid,
                    model: r.str8(1, limits::MAX_MODEL, "model")?,
                    bootloader: r.array("bootloader")?,
                    max_payload: r.u16("max_payload")?,
                    window: r.u8("window")?,
                    features: r.u8("features")?,
                    max_block: r.u32("max_block")?,
                    slot_size: r.u32("slot_size")?,
                    nonce: r.array("nonce")?,
                    eph_pub: r.array("eph_pub")?,
                })
            }
            ty::CHANNEL_OPEN => {
                let eph_pub = r.array("eph_pub")?;
                let kt_pub = r.array("kt_pub")?;
                let n = r.u8("chain_count")? as usize;
                // Above the maximum is TOO_LARGE, below the minimum MALFORMED (section 4).
                if n > limits::MAX_CHAIN {
                    return Err(DecodeError::TooLong("chain_count"));
                }
                if n == 0 {
                    return Err(DecodeError::BadValue("chain_count"));
                }
                let mut chain = Vec::with_capacity(n);
                for _ in 0..n {
                    chain.push(r.bytes16(limits::MAX_CERT, "certificate")?);
                }
                let signature = r.bytes8(limits::MAX_SIGNATURE, "signature")?;
                Message::ChannelOpen(ChannelOpen {
                    eph_pub,
                    kt_pub,
                    chain,
                    signature,
                })
            }
            ty::CHANNEL_READY => Message::ChannelReady {
                session_id: r.array("session_id")?,
            },
            ty::ACK => Message::Ack,
            ty::STATUS => Message::Status,
            ty::STATUS_RSP => Message::StatusRsp(Status {
                lifecycle: r.u8("lifecycle")?,
                identity: r.u8("identity")?,
                certs: r.u8("certs")?,
                keys: r.u16("keys")?,
                anchors: r.u8("anchors")?,
                fw_state: r.u8("fw_state")?,
                fw_size: r.u32("fw_size")?,
                fw_have: r.u32("fw_have")?,
                fw_sha256: r.array("fw_sha256")?,
            }),
            ty::IDENTITY => Message::Identity(Identity {
                serial: r.str8(1, limits::MAX_SERIAL, "serial")?,
                system_title: r.array("system_title")?,
                ldn: r.str8(1, limits::MAX_LDN, "ldn")?,
            }),
            ty::KEYGEN => Message::KeyGen {
                slot: enum_field(r.u8("slot")?, CertSlot::from_u8, "slot")?,
                curve: enum_field(r.u8("curve")?, Curve::from_u8, "curve")?,
            },
            ty::KEYGEN_RSP => Message::KeyGenRsp {
                slot: enum_field(r.u8("slot")?, CertSlot::from_u8, "slot")?,
                csr: r.bytes16(limits::MAX_CERT, "csr")?,
            },
            ty::PUT_CERT => Message::PutCert {
                slot: enum_field(r.u8("slot")?, CertSlot::from_u8, "slot")?,
                der: r.bytes16(limits::MAX_CERT, "certificate")?,
            },
            ty::PUT_ANCHOR => Message::PutAnchor {
                kind: enum_field(r.u8("kind")?, AnchorKind::from_u8, "kind")?,
                index: r.u8("index")?,
                der: r.bytes16(limits::MAX_CERT, "certificate")?,
            },
            ty::PUT_KEY => Message::PutKey(PutKey {
                key_id: enum_field(r.u8("key_id")?, KeyId::from_u8, "key_id")?,
                key_type: enum_field(r.u8("key_type")?, KeyType::from_u8, "key_type")?,
                wrap: enum_field(r.u8("wrap")?, WrapAlg::from_u8, "wrap")?,
                kcv: r.array("kcv")?,
                wrapped: r.bytes16(limits::MAX_WRAPPED_KEY, "wrapped")?,
            }),
            ty::FW_BEGIN => Message::FwBegin {
                size: r.u32("size")?,
                sha256: r.array("sha256")?,
                compression: r.u8("compression")?,
            },
            ty::FW_BEGIN_RSP => Message::FwBeginRsp {
                have: r.u32("have")?,
            },
            ty::FW_DATA => Message::FwData(FwData {
                offset: r.u32("offset")?,
                raw_len: r.u32("raw_len")?,
                encoding: enum_field(r.u8("encoding")?, Encoding::from_u8, "encoding")?,
                data: r.rest().to_vec(),
            }),
            ty::FW_ACK => {
                let have = r.u32("have")?;
                let n = r.u8("range_count")? as usize;
                if n > limits::MAX_SACK_RANGES {
                    return Err(DecodeError::TooLong("ranges"));
                }
                let mut ranges = Vec::with_capacity(n);
                for _ in 0..n {
                    let s = r.u32("range_start")?;
                    let e = r.u32("range_end")?;
                    ranges.push((s, e));
                }
                Message::FwAck(FwAck { have, ranges })
            }
            ty::FW_END => Message::FwEnd,
            ty::FW_RESULT => Message::FwResult(FwResult {
                status: r.u16("status")?,
                sha256: r.array("sha256")?,
                version: r.array("version")?,
            }),
            ty::SEAL => Message::Seal {
                disable: r.u16("disable")?,
            },
            ty::SEAL_RSP => Message::SealRsp {
                lifecycle: enum_field(r.u8("lifecycle")?, Lifecycle::from_u8, "lifecycle")?,
                disabled: r.u16("disabled")?,
            },
            ty::ATTEST => Message::Attest {
                nonce: r.array("nonce")?,
            },
            ty::ATTEST_RSP => Message::AttestRsp {
                receipt: r.bytes16(limits::MAX_RECEIPT, "receipt")?,
                signature: r.bytes8(limits::MAX_SIGNATURE, "signature")?,
            },
            ty::RESET => Message::Reset {
                mode: enum_field(r.u8("mode")?, ResetMode::from_u8, "mode")?,
            },
            ty::REWORK => Message::Rework {
                token: r.bytes8(limits::MAX_REWORK_TOKEN, "token")?,
                signature: r.bytes8(limits::MAX_SIGNATURE, "signature")?,
            },
            ty::ERROR => Message::Error {
                code: ErrorCode::from_code(r.u16("code")?),
                detail: r.str8(0, limits::MAX_ERROR_DETAIL, "detail")?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(m)
    }
}

/// Upper-case name of a type code.
pub fn type_name(t: u8) -> &'static str {
    match t {
        ty::HELLO => "HELLO",
        ty::HELLO_ACK => "HELLO_ACK",
        ty::CHANNEL_OPEN => "CHANNEL_OPEN",
        ty::CHANNEL_READY => "CHANNEL_READY",
        ty::ACK => "ACK",
        ty::STATUS => "STATUS",
        ty::STATUS_RSP => "STATUS_RSP",
        ty::IDENTITY => "IDENTITY",
        ty::KEYGEN => "KEYGEN",
        ty::KEYGEN_RSP => "KEYGEN_RSP",
        ty::PUT_CERT => "PUT_CERT",
        ty::PUT_ANCHOR => "PUT_ANCHOR",
        ty::PUT_KEY => "PUT_KEY",
        ty::FW_BEGIN => "FW_BEGIN",
        ty::FW_BEGIN_RSP => "FW_BEGIN_RSP",
        ty::FW_DATA => "FW_DATA",
        ty::FW_ACK => "FW_ACK",
        ty::FW_END => "FW_END",
        ty::FW_RESULT => "FW_RESULT",
        ty::SEAL => "SEAL",
        ty::SEAL_RSP => "SEAL_RSP",
        ty::ATTEST => "ATTEST",
        ty::ATTEST_RSP => "ATTEST_RSP",
        ty::RESET => "RESET",
        ty::REWORK => "REWORK",
        ty::ERROR => "ERROR",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version_min: 1,
                version_max: 1,
                nonce: [7; 16],
                max_payload: 8192,
                window: 8,
                features: FEATURE_DEFLATE,
            }),
            Message::HelloAck(HelloAck {
                version: 1,
                lifecycle: Lifecycle::Blank,
                uid: vec![1, 2, 3, 4, 5, 6, 7, 8],
                model: "EM-300".into(),
                bootloader: [1, 4, 2],
                max_payload: 8192,
                window: 8,
                features: FEATURE_DEFLATE | FEATURE_KEYGEN_P256,
                max_block: 32768,
                slot_size: 1 << 20,
                nonce: [9; 16],
                eph_pub: [4; 65],
            }),
            Message::ChannelOpen(ChannelOpen {
                eph_pub: [4; 65],
                kt_pub: [4; 65],
                chain: vec![vec![0x30, 0x01, 0x00], vec![0x30; 40]],
                signature: vec![0x30; 70],
            }),
            Message::ChannelReady { session_id: [3; 8] },
            Message::Ack,
            Message::Status,
            Message::StatusRsp(Status::default()),
            Message::Identity(Identity {
                serial: "A1000001".into(),
                system_title: *b"ABC\x00\x00\x01\x02\x03",
                ldn: "ABC0000010203".into(),
            }),
            Message::KeyGen {
                slot: CertSlot::Sign,
                curve: Curve::P384,
            },
            Message::KeyGenRsp {
                slot: CertSlot::KeyAgreement,
                csr: vec![0x30; 300],
            },
            Message::PutCert {
                slot: CertSlot::DeviceCa,
                der: vec![1; 500],
            },
            Message::PutAnchor {
                kind: AnchorKind::UtilityCa,
                index: 2,
                der: vec![2; 400],
            },
            Message::PutKey(PutKey {
                key_id: KeyId::Guek,
                key_type: KeyType::Aes128,
                wrap: WrapAlg::AesKw,
                kcv: [1, 2, 3],
                wrapped: vec![5; 24],
            }),
            Message::FwBegin {
                size: 262144,
                sha256: [0xAB; 32],
                compression: 1,
            },
            Message::FwBeginRsp { have: 4096 },
            Message::FwData(FwData {
                offset: 8192,
                raw_len: 16384,
                encoding: Encoding::Deflate,
                data: vec![0xCC; 77],
            }),
            Message::FwAck(FwAck {
                have: 4096,
                ranges: vec![(8192, 12288), (20000, 30000)],
            }),
            Message::FwEnd,
            Message::FwResult(FwResult {
                status: 0,
                sha256: [1; 32],
                version: [1, 2, 3, 0, 0, 0, 0, 0],
            }),
            Message::Seal {
                disable: iface::ALL,
            },
            Message::SealRsp {
                lifecycle: Lifecycle::Sealed,
                disabled: iface::ALL,
            },
            Message::Attest { nonce: [8; 16] },
            Message::AttestRsp {
                receipt: vec![1; 200],
                signature: vec![0x30; 71],
            },
            Message::Reset {
                mode: ResetMode::Release,
            },
            Message::Rework {
                token: vec![9; 102],
                signature: vec![0x30; 70],
            },
            Message::Error {
                code: ErrorCode::FwHashMismatch,
                detail: "sha256 differs".into(),
            },
        ]
    }

    #[test]
    fn every_message_roundtrips() {
        for m in samples() {
            let bytes = m.to_bytes();
            let back = Message::decode(m.msg_type(), &bytes).unwrap();
            assert_eq!(back, m, "{}", m.name());
        }
    }

    #[test]
    fn every_truncation_is_an_error_and_trailing_bytes_too() {
        for m in samples() {
            let bytes = m.to_bytes();
            for cut in 0..bytes.len() {
                // FW_DATA's data field runs to the end, so a cut inside it is a shorter block.
                if m.msg_type() == ty::FW_DATA && cut >= 9 {
                    continue;
                }
                assert!(
                    Message::decode(m.msg_type(), &bytes[..cut]).is_err(),
                    "{} cut at {cut} decoded",
                    m.name()
                );
            }
            if m.msg_type() != ty::FW_DATA {
                let mut longer = bytes.clone();
                longer.push(0);
                assert_eq!(
                    Message::decode(m.msg_type(), &longer),
                    Err(DecodeError::Trailing),
                    "{}",
                    m.name()
                );
            }
        }
    }

    #[test]
    fn status_key_bits_follow_section_4_6() {
        let bits: Vec<u16> = [1, 2, 3, 4, 0x11, 0x12, 0, 0x40]
            .into_iter()
            .map(status_key_bit)
            .collect();
        assert_eq!(bits, [1, 2, 4, 8, 0x100, 0x200, 0, 0]);
    }

    #[test]
    fn error_codes_roundtrip() {
        for c in 0..=0x100u16 {
            assert_eq!(ErrorCode::from_code(c).code(), c);
        }
    }

    #[test]
    fn known_types_are_the_types_the_codec_decodes() {
        for t in 0..=255u8 {
            let unknown = Message::decode(t, &[]) == Err(DecodeError::UnknownType(t));
            assert_eq!(ty::is_known(t), !unknown, "type 0x{t:02x}");
        }
        for m in samples() {
            let from_meter = matches!(
                m,
                Message::HelloAck(_)
                    | Message::ChannelReady { .. }
                    | Message::Ack
                    | Message::StatusRsp(_)
                    | Message::KeyGenRsp { .. }
                    | Message::FwBeginRsp { .. }
                    | Message::FwAck(_)
                    | Message::FwResult(_)
                    | Message::SealRsp { .. }
                    | Message::AttestRsp { .. }
                    | Message::Error { .. }
            );
            assert_eq!(ty::sent_by_meter(m.msg_type()), from_meter, "{}", m.name());
        }
    }

    #[test]
    fn unknown_type_and_bad_enum() {
        assert_eq!(
            Message::decode(0x55, &[]),
            Err(DecodeError::UnknownType(0x55))
        );
        assert_eq!(
            Message::decode(ty::KEYGEN, &[9, 1]),
            Err(DecodeError::BadValue("slot"))
        );
        assert_eq!(
            Message::decode(
                ty::IDENTITY,
                &[2, b'A', 0x07, 0, 0, 0, 0, 0, 0, 0, 0, 1, b'x']
            ),
            Err(DecodeError::BadValue("serial"))
        );
    }
}
