//! Software tokens for a cell directory: what `station pki init-dev` and `station demo` use to
//! make a SoftHSM2 token that persists next to the cell (unlike [`crate::testkit`], whose tokens
//! live in a temporary directory with fixed PINs).
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, when the library is initialised, and sees only tokens that
//! exist then or that this process initialises: [`use_conf`] must run before the module is first
//! loaded, and [`init_token`] initialises the token in-process. This module does nothing for
//! hardware HSMs, whose tokens are set up with the vendor's tools.

use std::path::{Path, PathBuf};

use cryptoki::session::UserType;
use secrecy::SecretString;

use crate::context;
use crate::error::{CkResultExt, Error, Result};

/// Writes `DIR/softhsm2.conf` with its token directory `DIR/tokens`; returns the file.
pub fn write_conf(dir: &Path) -> Result<PathBuf> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| Error::io("create", &tokens, e))?;
    let conf = dir.join("softhsm2.conf");
    let text = format!(
        "# SoftHSM2 configuration of this cell's software token\ndirectories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens.display()
    );
    std::fs::write(&conf, text).map_err(|e| Error::io("write", &conf, e))?;
    Ok(conf)
}

/// Points this process's SoftHSM at `conf`.
///
/// Call it before any other thread exists and before the module is loaded (at the top of
/// `main`, before an async runtime starts).
#[allow(unsafe_code)]
pub fn use_conf(conf: &Path) {
    use_module_env("SOFTHSM2_CONF", conf);
}

/// Sets a software token's configuration variable (`SOFTHSM2_CONF`, `KRYOPTIC_CONF`) for this
/// process. Call it before any other thread exists, like [`use_conf`].
#[allow(unsafe_code)]
pub fn use_module_env(var: &str, value: &Path) {
    // SAFETY: `set_var` is unsafe because another thread may read the environment at the same
    // time. The contract of this function is that it runs before any other thread exists (the
    // station calls it at the top of `main`, before the runtime starts), so nothing can read the
    // environment concurrently.
    unsafe { std::env::set_var(var, value) };
}

/// Initialises a fresh token labelled `label` on a free slot of `module`, with `so_pin` and
/// `user_pin`. Refuses if a token with that label already exists.
pub fn init_token(
    module: &Path,
    label: &str,
    so_pin: &SecretString,
    user_pin: &SecretString,
) -> Result<()> {
    if label.is_empty() || label.len() > 32 {
        return Err(Error::InvalidInput(
            "a token label has 1 to 32 bytes".into(),
        ));
    }
    let ctx = context::shared(module)?;
    let slots = ctx.get_all_slots().ck("list slots")?;
    if slots.iter().any(|s| {
        ctx.get_token_info(*s)
            .is_ok_and(|i| i.token_initialized() && i.label().trim_end() == label)
    }) {
        return Err(Error::InvalidInput(format!(
            "a token labelled {label:?} already exists"
        )));
    }
    let slot = slots
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| !i.token_initialized()))
        .ok_or_else(|| {
            Error::InvalidInput("the module offers no free slot for a new token".into())
        })?;
    ctx.init_token(slot, so_pin, label)
        .ck("initialise a token")?;
    let slot = crate::pool::find_slot(&ctx, label)?;
    let session = ctx.open_rw_session(slot).ck("open a session")?;
    session
        .login(UserType::So, Some(so_pin))
        .ck("log in as security officer")?;
    session.init_pin(user_pin).ck("set the user pin")?;
    session.logout().ck("log out")?;
    Ok(())
}
