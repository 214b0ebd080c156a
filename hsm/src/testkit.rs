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
//! The same for Kryoptic, the second PKCS#11 implementation of the tests
//! ([`TestToken::kryoptic`]): a configuration of its own (`KRYOPTIC_CONF`) with a few dozen
//! SQLite-backed slots per process, tokens made in-process on free slots. Its module is found
//! through `KRYOPTIC_MODULE` (`cargo xtask` sets it) or at `target/kryoptic/`, and built there
//! from `tools/kryoptic` when it is missing, so plain `cargo test` works too.
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
    set_env("SOFTHSM2_CONF", conf);
}

#[allow(unsafe_code)]
fn set_env(var: &str, value: &Path) {
    // SAFETY: `set_var` is unsafe because another thread may read the environment at the same
    // time. This runs once per process and module (inside `OnceLock::get_or_init`), before that
    // PKCS#11 module is loaded; the only concurrent readers are other test threads, and on Linux
    // glibc's `setenv` never frees the strings a concurrent `getenv` may be reading, so the race
    // cannot corrupt memory. Nothing else in this crate writes the environment.
    unsafe { std::env::set_var(var, value) };
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

/// A freshly initialised test token with a unique label and the fixed test PINs.
#[derive(Debug, Clone)]
pub struct TestToken {
    /// The token's label.
    pub label: String,
    /// The PKCS#11 module that holds it.
    pub module: PathBuf,
}

/// `<prefix>-<n>`, unique in this process, at most 32 bytes.
fn new_label(prefix: &str) -> Result<String> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let label = format!("{prefix}-{n}");
    if label.len() > 32 {
        return Err(Error::InvalidInput(format!(
            "token label {label:?} is longer than 32 bytes"
        )));
    }
    Ok(label)
}

/// Initialises a token labelled `label` on a free slot of `ctx`, with the test PINs.
fn init_on_free_slot(ctx: &Pkcs11, label: &str) -> Result<()> {
    let _guard = lock(&TOKEN_INIT);
    let slot = ctx
        .get_all_slots()
        .ck("list slots")?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).is_ok_and(|i| !i.token_initialized()))
        .ok_or_else(|| {
            Error::InvalidInput("the module offers no free slot for a new token".into())
        })?;
    let so_pin = SecretString::from(SO_PIN);
    ctx.init_token(slot, &so_pin, label)
        .ck("initialise a token")?;
    let slot = crate::pool::find_slot(ctx, label)?;
    let session = ctx.open_rw_session(slot).ck("open a session")?;
    session
        .login(UserType::So, Some(&so_pin))
        .ck("log in as so")?;
    session
        .init_pin(&SecretString::from(USER_PIN))
        .ck("set the user pin")?;
    session.logout().ck("log out")?;
    Ok(())
}

/// Slots of the per-process Kryoptic configuration (each test process makes at most this many
/// Kryoptic tokens).
const KRYOPTIC_SLOTS: u32 = 48;

static KRYOPTIC: OnceLock<std::result::Result<(PathBuf, Pkcs11), String>> = OnceLock::new();

/// The per-process Kryoptic configuration (`KRYOPTIC_CONF`), set up on first use.
pub fn kryoptic_conf() -> Result<PathBuf> {
    kryoptic_env()?;
    std::env::var_os("KRYOPTIC_CONF")
        .map(PathBuf::from)
        .ok_or_else(|| Error::InvalidInput("KRYOPTIC_CONF is not set".into()))
}

/// The test-only quirks module (`hsm-quirks`) as a copy named for `quirks` (e.g.
/// `"no-null-kdf"`, `"sessions=16,device-error-every=3"`): SoftHSM behaving like another HSM.
/// Each profile is a file of its own, so one process can load several. The module is
/// `HSM_QUIRKS_LIB` (`cargo xtask` builds it and sets it), else built into
/// `target/hsm-quirks/` with cargo.
pub fn quirks_module(quirks: &str) -> Result<PathBuf> {
    if !quirks
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-=,".contains(c))
    {
        return Err(Error::InvalidInput(format!("quirks {quirks:?}")));
    }
    let lib = match std::env::var_os("HSM_QUIRKS_LIB") {
        Some(p) => PathBuf::from(p),
        None => build_quirks()?,
    };
    let base = std::env::temp_dir().join("hsm-testkit-quirks");
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| remove_dead_dirs(&base));
    let dir = base.join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let copy = dir.join(format!("quirks-{quirks}.so"));
    if !copy.exists() {
        let tmp = dir.join(format!(".quirks-{quirks}.so.tmp"));
        std::fs::copy(&lib, &tmp).map_err(|e| Error::io("copy", &lib, e))?;
        std::fs::rename(&tmp, &copy).map_err(|e| Error::io("rename", &tmp, e))?;
    }
    Ok(copy)
}

/// The workspace's root and its target directory.
fn workspace_dirs() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    (root, target)
}

/// Builds `hsm-quirks` into `target/hsm-quirks` (a target directory of its own, so that a test
/// run's cargo never waits for the one that started it).
fn build_quirks() -> Result<PathBuf> {
    let (root, target) = workspace_dirs();
    let target = target.join("hsm-quirks");
    let lib = target.join("debug").join("libhsm_quirks.so");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = std::process::Command::new(cargo)
        .args(["build", "--locked", "--quiet", "-p", "hsm-quirks"])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .map_err(|e| Error::io("run cargo to build", &lib, e))?;
    if !st.success() || !lib.exists() {
        return Err(Error::ModuleLoad {
            path: lib,
            reason: "building hsm-quirks failed".into(),
        });
    }
    Ok(lib)
}

/// Kryoptic's PKCS#11 module: `KRYOPTIC_MODULE`, else `target/kryoptic/release/`, built there
/// from `tools/kryoptic` when it is missing.
pub fn kryoptic_module() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KRYOPTIC_MODULE") {
        return Ok(PathBuf::from(p));
    }
    let (root, target) = workspace_dirs();
    let target = target.join("kryoptic");
    let module = target.join("release").join("libkryoptic_pkcs11.so");
    if !module.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = std::process::Command::new(cargo)
            .args([
                "build",
                "--release",
                "--locked",
                "--quiet",
                "-p",
                "kryoptic",
            ])
            .arg("--manifest-path")
            .arg(root.join("tools").join("kryoptic").join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .status()
            .map_err(|e| Error::io("run cargo to build", &module, e))?;
        if !st.success() || !module.exists() {
            return Err(Error::ModuleLoad {
                path: module,
                reason: "building Kryoptic from tools/kryoptic failed (it needs Debian's libssl-dev and libclang-dev: `cargo xtask deps` installs them)".into(),
            });
        }
    }
    Ok(module)
}

fn kryoptic_env() -> Result<&'static (PathBuf, Pkcs11)> {
    KRYOPTIC
        .get_or_init(|| kryoptic_setup().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|reason| Error::ModuleLoad {
            path: PathBuf::from("kryoptic"),
            reason: reason.clone(),
        })
}

fn kryoptic_setup() -> Result<(PathBuf, Pkcs11)> {
    let module = kryoptic_module()?;
    let base = std::env::temp_dir().join("hsm-testkit-kryoptic");
    std::fs::create_dir_all(&base).map_err(|e| Error::io("create", &base, e))?;
    remove_dead_dirs(&base);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = base.join(format!("{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let mut conf = String::new();
    for n in 1..=KRYOPTIC_SLOTS {
        conf.push_str(&format!(
            "[[slots]]\nslot = {n}\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n\n",
            dir.join(format!("slot-{n}.sql")).display()
        ));
    }
    let path = dir.join("kryoptic.conf");
    std::fs::write(&path, conf).map_err(|e| Error::io("write", &path, e))?;
    set_env("KRYOPTIC_CONF", &path);
    let ctx = context::shared(&module)?;
    Ok((module, ctx))
}

impl TestToken {
    /// A token that exists already in SoftHSM's test environment, by label.
    pub fn softhsm(label: &str) -> TestToken {
        TestToken {
            label: label.to_owned(),
            module: PathBuf::from(SOFTHSM_MODULE),
        }
    }

    /// A new SoftHSM token seen through the quirks module with `quirks` (see
    /// [`quirks_module`]).
    pub fn with_quirks(prefix: &str, quirks: &str) -> Result<TestToken> {
        let mut t = TestToken::new(prefix)?;
        t.module = quirks_module(quirks)?;
        Ok(t)
    }

    /// Initialises a new Kryoptic token labelled `<prefix>-<n>`.
    pub fn kryoptic(prefix: &str) -> Result<TestToken> {
        let (module, ctx) = kryoptic_env()?;
        let label = new_label(prefix)?;
        init_on_free_slot(ctx, &label)?;
        Ok(TestToken {
            label,
            module: module.clone(),
        })
    }

    /// Initialises a new SoftHSM token labelled `<prefix>-<n>` (at most 32 bytes; keep the
    /// prefix short).
    pub fn new(prefix: &str) -> Result<TestToken> {
        let env = env()?;
        let label = new_label(prefix)?;
        init_on_free_slot(&env.ctx, &label)?;
        Ok(TestToken {
            label,
            module: PathBuf::from(SOFTHSM_MODULE),
        })
    }

    /// A configuration for this token with a pool of `pool_size` sessions.
    pub fn config(&self, pool_size: usize) -> HsmConfig {
        let mut config = HsmConfig::new(
            self.module.clone(),
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
            &self.module,
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
