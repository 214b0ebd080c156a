//! Meter certificates.
