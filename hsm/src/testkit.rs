//! SoftHSM2 test tokens, for this crate's tests, other crates' tests and the demo.
//!
//! SoftHSM reads its configuration (`SOFTHSM2_CONF`) once, at `C_Initialize`, and a token made
//! by `softhsm2-util` after that is invisible to the process. So the first call here writes a
//! configuration into a fresh directory of its own (one per process, i.e. per test binary under
//! `cargo test` and per test under nextest), points `SOFTHSM2_CONF` at it, loads and initialises
//! the module once for the whole process, and then makes tokens in-process (`C_InitToken`, SO
//! login, `C_InitPIN`), each under a unique label. Directories of processes that have ended
//! are removed on the next start.
//!
//! Usage (any crate's test):
//!
//! ```no_run
//! # fn main() -> hsm::Result<()> {
//! let token = hsm::testkit::TestToken::new("station")?;
//! let hsm = token.open(4)?; // an `hsm::Hsm` with a pool of 4 sessions
//! # Ok(()) }
//! ```
//!
//! This module is for tests and demos only: its PINs are fixed and public.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::Pkcs11;
use cryptoki::session::UserType;
use secrecy::SecretString;

use crate::config::{HsmConfig, PinSource, SOFTHSM_MODULE};
use crate::context;
use crate::error::{CkResultExt, Error, Result};
use crate::pool::Hsm;
use crate::sync::lock;

/// The SO PIN of every test token (public: tests only).
pub const SO_PIN: &str = "test-so-pin-0000";
/// The user PIN of every test token (public: tests only).
pub const USER_PIN: &str = "test-user-pin-1234";

struct TestEnv {
    dir: PathBuf,
    ctx: Pkcs11,
}

static ENV: OnceLock<std::result::Result<TestEnv, String>> = OnceLock::new();
static TOKEN_INIT: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn env() -> Result<&'static TestEnv> {
    ENV.get_or_init(|| setup().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|reason| Error::ModuleLoad {
            path: PathBuf::from(SOFTHSM_MODULE),
            reason: reason.clone(),
        })
}

fn setup() -> Result<TestEnv> {
    let base = std::env::temp_dir().join("hsm-testkit");
    std::fs::create_dir_all(&base).map_err(|e| Error::io("create", &base, e))?;
    remove_dead_dirs(&base);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = base.join(format!("{}-{nanos}", std::process::id()));
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| Error::io("create", &tokens, e))?;
    let conf = dir.join("softhsm2.conf");
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
        tokens.display()
    );
    std::fs::write(&conf, text).map_err(|e| Error::io("write", &conf, e))?;
    set_softhsm_conf(&conf);
    let ctx = context::shared(Path::new(SOFTHSM_MODULE))?;
    Ok(TestEnv { dir, ctx })
}

#[allow(unsafe_code)]
fn set_softhsm_conf(conf: &Path) {
    // SAFETY: `set_var` is unsafe because another thread may read the environment at the same
    // time. This runs once per process (inside `OnceLock::get_or_init`), before the PKCS#11
    // module is loaded; the only concurrent readers are other test threads, and on Linux glibc's
    // `setenv` never frees the strings a concurrent `getenv` may be reading, so the race cannot
    // corrupt memory. Nothing else in this crate writes the environment.
    unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
}

/// Removes directories left by processes that no longer run.
fn remove_dead_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The process-wide SoftHSM context of the test environment (set up on first use).
pub fn pkcs11() -> Result<Pkcs11> {
    Ok(env()?.ctx.clone())
}

/// The test environment's directory (holds `softhsm2.conf` and `tokens/`).
pub fn dir() -> Result<PathBuf> {
    Ok(env()?.dir.clone())
}

/// A freshly initialised SoftHSM token with a unique label and the fixed test PINs.
#[derive(Debug, Clone)]
pub struct TestToken {
    /// The token's label.
    pub label: String,
}

impl TestToken {
    /// Initialises a new token labelled `<prefix>-<n>` (at most 32 bytes; keep the prefix short).
    pub fn new(prefix: &str) -> Result<TestToken> {
        let env = env()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let label = format!("{prefix}-{n}");
        if label.len() > 32 {
            return Err(Error::InvalidInput(format!(
                "token label {label:?} is longer than 32 bytes"
            )));
        }
        let _guard = lock(&TOKEN_INIT);
        let ctx = &env.ctx;
        let slot = ctx
            .get_all_slots()
            .ck("list slots")?
            .into_iter()
            .find(|s| ctx.get_token_info(*s).is_ok_and(|i| !i.token_initialized()))
            .ok_or_else(|| {
                Error::InvalidInput("softhsm offers no free slot for a new token".into())
            })?;
        let so_pin = SecretString::from(SO_PIN);
        ctx.init_token(slot, &so_pin, &label)
            .ck("initialise a token")?;
        let slot = crate::pool::find_slot(ctx, &label)?;
        let session = ctx.open_rw_session(slot).ck("open a session")?;
        session
            .login(UserType::So, Some(&so_pin))
            .ck("log in as so")?;
        session
            .init_pin(&SecretString::from(USER_PIN))
            .ck("set the user pin")?;
        session.logout().ck("log out")?;
        drop(session);
        Ok(TestToken { label })
    }

    /// A configuration for this token with a pool of `pool_size` sessions.
    pub fn config(&self, pool_size: usize) -> HsmConfig {
        let mut config = HsmConfig::new(
            SOFTHSM_MODULE,
            self.label.clone(),
            PinSource::Secret(SecretString::from(USER_PIN)),
        );
        config.pool_size = pool_size;
        config
    }

    /// As the token's security officer, installs the RSA key of `cert` (PEM or DER) as customer
    /// `name`'s trusted transport key. Run it before this process opens the token as its user
    /// (a process is logged in to a token as one user type at a time).
    pub fn trust_customer(&self, name: &str, cert: &[u8]) -> Result<crate::so::CustomerKey> {
        let der = if cert.starts_with(b"-----BEGIN") {
            der::pem::decode_vec(cert)
                .map_err(|e| Error::InvalidInput(format!("not a pem certificate: {e}")))?
                .1
        } else {
            cert.to_vec()
        };
        let officer = crate::so::SecurityOfficer::login(
            Path::new(SOFTHSM_MODULE),
            &self.label,
            &SecretString::from(SO_PIN),
        )?;
        officer.trust_customer_key(name, &der)
    }

    /// Opens the token with a pool of `pool_size` sessions.
    pub fn open(&self, pool_size: usize) -> Result<Hsm> {
        Hsm::open(&self.config(pool_size))
    }
}
