//! PKI set-up.
