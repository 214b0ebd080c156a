//! The signed batch manifest: what the receiving utility gets for each batch.
//!
//! - [`model`]: the content (`manifest.json`), checked like its JSON Schema.
//! - [`export`](crate::engine::Command::Export): writing it from the journal, signed by the
//!   manifest signer in the HSM as CMS SignedData (`manifest.p7m`).
//! - [`verify`]: the utility's checks, with nothing but the manufacturer's root certificate.
//! - [`import`]: unwrapping every key into the utility's own HSM (never in clear), or into
//!   owner-only files for a head-end when asked to.

mod der;
pub(crate) mod export;
pub mod import;
pub mod model;
pub mod pskc;
pub mod verify;

pub use export::resign;
