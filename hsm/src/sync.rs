//! Small helpers around `std::sync`.
//!
//! Locks in this crate guard plain data whose invariants hold between statements, so a panic
//! in another thread while holding one cannot leave it half-updated: a poisoned lock is simply
//! taken over. This module holds no state.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking over a poisoned lock (see the module comment).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
