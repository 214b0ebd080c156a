//! One initialised PKCS#11 context per module per process.
//!
//! A PKCS#11 library may be initialised only once per process, and parallel `C_Initialize`
//! calls crash some modules (SoftHSM among them). Every [`crate::Hsm`] and the test helper get
//! their context from here, so two pools on two tokens of the same module share one context.
//!
//! This module does not log in or open sessions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use crate::error::{Error, Result};
use crate::sync::lock;

static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// The process-wide context of the module at `path`, loaded and initialised on first use.
pub fn shared(path: &Path) -> Result<Pkcs11> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    // The lock is held across loading and `C_Initialize` on purpose: it is what keeps two
    // threads from initialising the same module at once.
    let mut map = lock(CONTEXTS.get_or_init(Default::default));
    if let Some(ctx) = map.get(&key) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(path).map_err(|e| Error::ModuleLoad {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    initialize(&ctx).map_err(|e| Error::ModuleLoad {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    map.insert(key, ctx.clone());
    Ok(ctx)
}

/// `C_Initialize` with OS locking; an already initialised library is fine.
pub(crate) fn initialize(ctx: &Pkcs11) -> Result<()> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(Error::ck("initialise the pkcs#11 library", e)),
    }
}
