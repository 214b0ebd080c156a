//! How the station finds its HSM: module path, token label, PIN source, pool size, retries.
//!
//! The PIN is obtained once, at open time, from a prompt, an environment variable or an
//! owner-only file, and held in a zeroizing [`SecretString`]. This module never writes a PIN
//! anywhere and never formats one: `Debug` of every type here redacts it.
//!
//! It does not parse configuration files; the station maps its own configuration onto
//! [`HsmConfig`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::error::{Error, Result};

/// Where Debian's SoftHSM2 installs its PKCS#11 module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Where the user PIN comes from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PinSource {
    /// Ask on the controlling terminal, without echo.
    Prompt,
    /// Read the named environment variable.
    Env(String),
    /// Read an owner-only file (mode `0600` or stricter); a trailing newline is ignored.
    File(PathBuf),
    /// A PIN the caller already holds (e.g. typed into the GUI).
    Secret(SecretString),
}

impl PinSource {
    /// Obtains the user PIN.
    pub fn read(&self) -> Result<SecretString> {
        self.read_as("user")
    }

    /// Obtains the PIN of `who` ("user", "security officer"): the prompt names it.
    pub fn read_as(&self, who: &str) -> Result<SecretString> {
        match self {
            PinSource::Prompt => {
                let pin = rpassword::prompt_password(format!("HSM {who} PIN: "))
                    .map_err(|e| Error::PinUnavailable(format!("cannot prompt for it: {e}")))?;
                non_empty(SecretString::from(pin), "the prompt")
            }
            PinSource::Env(var) => {
                let pin = std::env::var(var).map_err(|_| {
                    Error::PinUnavailable(format!(
                        "the environment variable {var} is not set or not valid utf-8; set it or use another pin source"
                    ))
                })?;
                non_empty(SecretString::from(pin), "the environment variable")
            }
            PinSource::File(path) => read_pin_file(path),
            PinSource::Secret(pin) => Ok(pin.clone()),
        }
    }
}

fn non_empty(pin: SecretString, from: &str) -> Result<SecretString> {
    if pin.expose_secret().is_empty() {
        return Err(Error::PinUnavailable(format!("{from} gave an empty pin")));
    }
    Ok(pin)
}

/// Reads a PIN file, refusing one that group or others may read.
fn read_pin_file(path: &Path) -> Result<SecretString> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| Error::io("read the pin file", path, e))?;
    if !meta.is_file() {
        return Err(Error::PinUnavailable(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::PinFileInsecure {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(path).map_err(|e| Error::io("read the pin file", path, e))?,
    );
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::PinUnavailable(format!("{} is not utf-8 text", path.display())))?;
    let pin = text.trim_end_matches(['\n', '\r']);
    non_empty(SecretString::from(pin.to_owned()), "the pin file")
}

/// Everything needed to open an [`crate::Hsm`].
#[derive(Debug, Clone)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module (shared library).
    pub module: PathBuf,
    /// Label of the token to use. Tokens are always picked by label, never by slot number.
    pub token_label: String,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// Number of sessions in the pool (the number of HSM operations that can run at once).
    pub pool_size: usize,
    /// How many times an operation is retried after a lost session or library.
    pub max_retries: u32,
    /// Pause before the first retry; it grows linearly with each further attempt.
    pub retry_backoff: Duration,
    /// An async call whose kind has recently taken less than this runs in place on its worker
    /// instead of being handed off ([`crate::IN_PLACE_BELOW`] by default; zero: never).
    pub in_place_below: Duration,
    /// Batch transport keys may be wrapped only under keys the token's security officer marked
    /// CKA_TRUSTED (CKA_WRAP_WITH_TRUSTED; the default). Off only for tokens that cannot mark a
    /// key trusted (Kryoptic): then anyone with the user PIN can wrap a batch key out.
    pub trusted_wrap: bool,
}

impl HsmConfig {
    /// A configuration with the defaults: a pool of 4 sessions, 3 retries 50 ms apart.
    pub fn new(module: impl Into<PathBuf>, token_label: impl Into<String>, pin: PinSource) -> Self {
        HsmConfig {
            module: module.into(),
            token_label: token_label.into(),
            pin,
            pool_size: 4,
            max_retries: 3,
            retry_backoff: Duration::from_millis(50),
            in_place_below: crate::pool::IN_PLACE_BELOW,
            trusted_wrap: true,
        }
    }
}
