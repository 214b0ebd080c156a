//! Recovery tests (written next).
