//! The jig line protocol between a provisioning station (the *host*) and a meter's bootloader.
//!
//! The specification is `schemas/line-protocol.md`; this crate is its reference implementation.
//! The core is sans-IO, in the manner of rustls and mini-redis: bytes and events go in, bytes and
//! events come out, and nothing in it reads a clock, touches a file or a socket, or spawns a task.
//! Randomness is passed in by the caller. The `io` feature adds the thin tokio adapters (serial
//! ports through `tokio-serial`, TCP serial device servers, in-memory pipes) and the async drivers
//! a station and a meter emulator run.
//!
//! Code map:
//! - [`cobs`], [`frame`]: byte stuffing, header, CRC-32C, bounded stream decoder.
//! - [`msg`]: the message set and its payload encodings.
//! - [`crypto`]: transcript, HKDF key schedule, AES-GCM frame protection, key-transport key.
//! - [`chain`]: the meter's check of the station certificate chain.
//! - [`firmware`]: block plan with compression, sliding window with selective acknowledgement.
//! - [`image`]: MCUboot signed images.
//! - [`receipt`]: the attestation receipt.
//! - [`rework`]: the signed token that returns a sealed meter to blank.
//! - [`host`], [`meter`]: the two session state machines.
//! - [`timing`]: timeouts that scale with payload size and link speed.
//! - `io` (feature): transports and async drivers.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chain;
pub mod cobs;
pub mod crypto;
mod endpoint;
pub mod firmware;
pub mod frame;
#[cfg(any(test, feature = "testkit"))]
pub mod fuzz;
pub mod host;
pub mod image;
pub mod meter;
pub mod msg;
pub mod receipt;
pub mod rework;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod timing;

#[cfg(feature = "io")]
pub mod io;

/// Protocol limits. A receiver refuses anything beyond them before allocating.
pub mod limits {
    /// Payload limit before HELLO_ACK has negotiated one.
    pub const INITIAL_MAX_PAYLOAD: usize = 4096;
    /// Smallest `max_payload` a party may advertise.
    pub const MIN_MAX_PAYLOAD: usize = 2048;
    /// Largest payload this version allows.
    pub const MAX_PAYLOAD: usize = 32768;
    /// Largest window (frames in flight).
    pub const MAX_WINDOW: usize = 32;
    /// Largest decoded firmware block.
    pub const MAX_BLOCK: u32 = 65536;
    /// Certificates in the station chain.
    pub const MAX_CHAIN: usize = 4;
    /// Bytes of one certificate or certificate request.
    pub const MAX_CERT: usize = 2048;
    /// Bytes of a DER ECDSA signature (P-384 needs 104).
    pub const MAX_SIGNATURE: usize = 112;
    /// Bytes of a hardware UID.
    pub const MAX_UID: usize = 32;
    /// Bytes of a model name.
    pub const MAX_MODEL: usize = 32;
    /// Bytes of a serial number.
    pub const MAX_SERIAL: usize = 32;
    /// Bytes of a logical device name.
    pub const MAX_LDN: usize = 48;
    /// Bytes of a wrapped key.
    pub const MAX_WRAPPED_KEY: usize = 512;
    /// Bytes of an attestation receipt.
    pub const MAX_RECEIPT: usize = 1024;
    /// Bytes of a rework token.
    pub const MAX_REWORK_TOKEN: usize = 128;
    /// Ranges in one FW_ACK.
    pub const MAX_SACK_RANGES: usize = 8;
    /// Bytes of an ERROR detail.
    pub const MAX_ERROR_DETAIL: usize = 96;
}

pub use endpoint::Violation;
pub use msg::{ErrorCode, Message};
