//! PKI set-up (stub).
