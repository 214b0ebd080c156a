//! Integration tests of the `hsm` crate against real SoftHSM2 tokens (no mocks), with `openssl`
//! as the independent peer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

mod certs;
mod kryoptic;
mod ops;
mod pki;
mod quirks;
