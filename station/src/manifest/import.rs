//! `station manifest import`: the utility's side. A manifest is verified in full first; one that
//! fails imports nothing. Then either
//!
//! - into the utility's own HSM: the batch transport key is unwrapped (RSA-OAEP) inside the token
//!   with the utility's private key, and every meter key is unwrapped (AES key wrap) under it into
//!   a token object labelled `<system title>/<key id>` — no key is ever in clear; or
//! - into per-meter key files for a head-end, only when the caller says explicitly that keys will
//!   be written in clear: owner-only files, written only after every key of the batch unwrapped
//!   and matched its check value.
//!
//! A key that does not match its check value (a key swapped between meters, a damaged wrap)
//! stops the import; keys created by the failed import are destroyed again. Importing the same
//! manifest twice changes nothing the second time.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hsm::{AesKeySize, Hsm, HsmConfig, KeyHandle, KeyRole, OaepHash, PinSource, WrapAlg};
use sha2::{Digest, Sha256};
use x509_cert::Certificate;
use zeroize::Zeroizing;

use super::model::*;
use super::verify;

/// Where the keys go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Per-meter files, keys in clear (owner-only).
    Files {
        /// The utility's RSA private key (PKCS#8 PEM).
        key_pem: PathBuf,
        /// Directory for the files.
        out_dir: PathBuf,
    },
    /// The utility's PKCS#11 token.
    Token {
        /// Module path.
        module: PathBuf,
        /// Token label.
        token: String,
        /// PIN source.
        pin: PinSource,
        /// Label of the utility's RSA key pair in the token.
        key_label: String,
        /// Keep the meter keys out of the token: wrapped under one token key
        /// (`utility-key-store`, made on first use) into this file, for tokens that cannot
        /// hold four objects per meter. `None`: one token object per meter key.
        store: Option<PathBuf>,
    },
}

/// The label of the token key a key store file is wrapped under.
pub const STORE_KEY_LABEL: &str = "utility-key-store";

/// A key store file: a batch's meter keys wrapped (RFC 3394) under the token key
/// [`STORE_KEY_LABEL`], each checked against the manifest (check value and binding) before it
/// was wrapped. To use a key, unwrap it into the HSM with that key.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KeyStore {
    /// "cell-key-store".
    pub format: String,
    /// 1.
    pub version: u32,
    /// The token that holds the store key.
    pub token: String,
    /// The store key's label.
    pub store_key: String,
    /// The batch's work order.
    pub work_order: String,
    /// The keys.
    pub keys: Vec<StoredKey>,
}

/// One meter key in a [`KeyStore`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct StoredKey {
    /// The meter's serial number.
    pub serial: String,
    /// Its system title, hex.
    pub system_title: String,
    /// guek, gbek, ak or kek.
    pub key_id: String,
    /// aes-128 or aes-256.
    pub key_type: String,
    /// The key wrapped under the store key with AES key wrap (RFC 3394), base64.
    pub wrapped: String,
    /// Its check value, hex (as in the manifest).
    pub kcv: String,
}

/// What an import did.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct ImportReport {
    /// Meters whose keys were imported now.
    pub meters: usize,
    /// Keys imported now.
    pub keys_imported: usize,
    /// Keys already present with the same check value (re-import).
    pub keys_present: usize,
    /// Where they went.
    pub destination: String,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "imported {} key(s) of {} meter(s) into {} ({} already present)",
            self.keys_imported, self.meters, self.destination, self.keys_present
        )
    }
}

/// Why an import stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The manifest did not verify; nothing was imported.
    #[error("the manifest did not verify; nothing was imported\n{0}")]
    NotVerified(Box<verify::Report>),
    /// The key given is not the one the batch was wrapped for.
    #[error("{0}")]
    WrongKey(String),
    /// A key did not match its check value.
    #[error("{0}; nothing was imported")]
    KeyCheck(String),
    /// The destination refused.
    #[error("{0}")]
    Destination(String),
}

fn oaep(m: &Manifest) -> OaepHash {
    if m.transport_key.oaep_hash == "sha256" {
        OaepHash::Sha256
    } else {
        OaepHash::Sha1
    }
}

/// Verifies and imports.
pub fn import(
    p7m: &Path,
    root: &Certificate,
    target: &Target,
) -> Result<ImportReport, ImportError> {
    let (report, manifest) = verify::verify_file(p7m, root).map_err(ImportError::Destination)?;
    let manifest = match (report.ok(), manifest) {
        (true, Some(m)) => m,
        _ => return Err(ImportError::NotVerified(Box::new(report))),
    };
    match target {
        Target::Files { key_pem, out_dir } => import_files(&manifest, key_pem, out_dir),
        Target::Token {
            module,
            token,
            pin,
            key_label,
            store,
        } => import_token(&manifest, module, token, pin, key_label, store.as_deref()),
    }
}

/// A system title as the manifest gives it (16 hex digits), as bytes.
fn title_bytes(hex_title: &str) -> Vec<u8> {
    hex::decode(hex_title).unwrap_or_default()
}

fn not_bound(serial: &str, id: &str) -> String {
    format!(
        "meter {serial}: key {id} is not bound to this meter (it was made for another meter or key id); nothing was imported"
    )
}

fn kcv_of(key: &[u8]) -> String {
    line_protocol::crypto::kcv_aes(key)
        .map(hex::encode)
        .unwrap_or_default()
}

fn import_files(m: &Manifest, key_pem: &Path, out_dir: &Path) -> Result<ImportReport, ImportError> {
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
    let pem = Zeroizing::new(std::fs::read_to_string(key_pem).map_err(|e| {
        ImportError::Destination(format!("cannot read {}: {e}", key_pem.display()))
    })?);
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(&pem).map_err(|_| {
        ImportError::WrongKey(format!(
            "{} is not an RSA private key in PKCS#8 PEM",
            key_pem.display()
        ))
    })?;
    let spki = rsa::RsaPublicKey::from(&key)
        .to_public_key_der()
        .map_err(|e| ImportError::WrongKey(e.to_string()))?;
    if hex::encode(Sha256::digest(spki.as_bytes())) != m.customer.public_key_sha256 {
        return Err(ImportError::WrongKey(format!(
            "{} is not the key of customer {} the batch was made for (public key SHA-256 {})",
            key_pem.display(),
            m.customer.name,
            m.customer.public_key_sha256
        )));
    }
    let wrapped = unb64(&m.transport_key.wrapped);
    let tk = Zeroizing::new(
        match (oaep(m), m.transport_key.oaep_label.clone()) {
            (OaepHash::Sha1, None) => key.decrypt(rsa::Oaep::<sha1::Sha1>::new(), &wrapped),
            (OaepHash::Sha256, None) => key.decrypt(rsa::Oaep::<Sha256>::new(), &wrapped),
            (OaepHash::Sha1, Some(l)) => key.decrypt(
                rsa::Oaep::<sha1::Sha1>::new_with_label(l.into_bytes()),
                &wrapped,
            ),
            (OaepHash::Sha256, Some(l)) => key.decrypt(
                rsa::Oaep::<Sha256>::new_with_label(l.into_bytes()),
                &wrapped,
            ),
        }
        .map_err(|_| {
            ImportError::WrongKey("the batch transport key does not unwrap with this key".into())
        })?,
    );
    let tk: Zeroizing<[u8; 32]> =
        Zeroizing::new(tk.as_slice().try_into().map_err(|_| {
            ImportError::KeyCheck("the batch transport key is not 32 bytes".into())
        })?);
    if kcv_of(tk.as_slice()) != m.transport_key.kcv {
        return Err(ImportError::KeyCheck(
            "the batch transport key does not match its check value".into(),
        ));
    }
    // Unwrap everything first; write nothing unless all of it checks out.
    let mut files = Vec::with_capacity(m.meters.len());
    for mr in &m.meters {
        // The document is built in one owner-wiped buffer, large enough never to be moved:
        // no copy of a clear key is left behind in freed memory.
        let mut doc = Zeroizing::new(String::with_capacity(1024 + 160 * mr.keys.len()));
        let head = serde_json::json!({
            "serial": mr.serial, "system_title": mr.system_title, "logical_device_name": mr.logical_device_name,
            "uid": mr.uid, "batch": m.batch.work_order,
        });
        let head = serde_json::to_string_pretty(&head).unwrap_or_default();
        doc.push_str(head.trim_end().trim_end_matches('}').trim_end());
        doc.push_str(",\n  \"keys\": {");
        for (i, k) in mr.keys.iter().enumerate() {
            let clear = line_protocol::crypto::unwrap_key(
                &tk,
                line_protocol::msg::WrapAlg::AesKw,
                &unb64(&k.wrapped),
            )
            .ok_or_else(|| {
                ImportError::KeyCheck(format!(
                    "meter {}: key {} does not unwrap under the batch transport key",
                    mr.serial, k.id
                ))
            })?;
            let want = if k.key_type == "aes-256" { 32 } else { 16 };
            if clear.len() != want || kcv_of(&clear) != k.kcv {
                return Err(ImportError::KeyCheck(format!(
                    "meter {}: key {} does not match its check value (swapped or damaged)",
                    mr.serial, k.id
                )));
            }
            if key_binding(&title_bytes(&mr.system_title), &k.id, &clear) != k.binding {
                return Err(ImportError::KeyCheck(not_bound(&mr.serial, &k.id)));
            }
            let key_hex = Zeroizing::new(hex::encode(&*clear));
            if i > 0 {
                doc.push(',');
            }
            doc.push_str("\n    \"");
            doc.push_str(&k.id);
            doc.push_str("\": \"");
            doc.push_str(&key_hex);
            doc.push('"');
        }
        doc.push_str("\n  }\n}");
        files.push((out_dir.join(format!("{}.json", mr.system_title)), doc));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out_dir)
        .map_err(|e| {
            ImportError::Destination(format!("cannot create {}: {e}", out_dir.display()))
        })?;
    let (mut written, mut present) = (0, 0);
    for (path, doc) in &files {
        if let Ok(existing) = std::fs::read_to_string(path) {
            let existing = Zeroizing::new(existing);
            if existing.trim_end() == doc.trim_end() {
                present += 4;
                continue;
            }
            return Err(ImportError::Destination(format!(
                "{} exists with other keys; move it away first",
                path.display()
            )));
        }
        let tmp = path.with_extension("json.tmp");
        // A file (or a link planted to redirect the keys) left at the temporary name is
        // removed, never written through: the new file is created exclusively.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| {
                ImportError::Destination(format!("cannot write {}: {e}", tmp.display()))
            })?;
        f.write_all(doc.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| {
                ImportError::Destination(format!("cannot write {}: {e}", tmp.display()))
            })?;
        std::fs::rename(&tmp, path).map_err(|e| {
            ImportError::Destination(format!("cannot write {}: {e}", path.display()))
        })?;
        written += 4;
    }
    Ok(ImportReport {
        meters: files.len(),
        keys_imported: written,
        keys_present: present,
        destination: out_dir.display().to_string(),
    })
}

fn import_token(
    m: &Manifest,
    module: &Path,
    token: &str,
    pin: &PinSource,
    key_label: &str,
    store: Option<&Path>,
) -> Result<ImportReport, ImportError> {
    let dest = |e: hsm::Error| ImportError::Destination(format!("utility token {token}: {e}"));
    if let Some(path) = store
        && path.exists()
    {
        return Err(ImportError::Destination(format!(
            "{} exists; a key store is never overwritten — choose another path",
            path.display()
        )));
    }
    let mut cfg = HsmConfig::new(module, token, pin.clone());
    cfg.pool_size = 1;
    let hsm = Hsm::open(&cfg).map_err(dest)?;
    let wrapped_tk = unb64(&m.transport_key.wrapped);
    let alg = match &m.transport_key.oaep_label {
        None => WrapAlg::RsaOaepWith(oaep(m)),
        Some(l) => WrapAlg::RsaOaepLabelled(
            oaep(m),
            hsm::OaepLabel::new(l.as_bytes()).ok_or_else(|| {
                ImportError::Destination(format!(
                    "the OAEP label is longer than {} bytes",
                    hsm::OaepLabel::MAX
                ))
            })?,
        ),
    };
    let tk_kcv = m.transport_key.kcv.clone();
    let label = key_label.to_string();
    let meters = m.meters.clone();
    hsm.with_session(|s| {
        let private = s
            .find_key(hsm::KeyKind::RsaPrivate, &label)?
            .ok_or_else(|| hsm::Error::ObjectNotFound {
                what: "utility transport private key",
                label: label.clone(),
            })?;
        let tk = s
            .unwrap_aes(
                &private,
                &wrapped_tk,
                alg,
                KeyRole::UtilityBatchTransport,
                AesKeySize::Aes256,
                None,
            )
            .map_err(|e| {
                hsm::Error::InvalidInput(format!(
                    "the batch transport key does not unwrap with {label}: {e}"
                ))
            })?;
        let result = match store {
            None => import_meter_keys(s, &tk, &tk_kcv, &meters).map(|r| (r, Vec::new())),
            Some(_) => store_meter_keys(s, &tk, &tk_kcv, &meters).map(|k| ((k.len(), 0), k)),
        };
        let _ = s.destroy(&tk);
        result
    })
    .map_err(|e| match e {
        hsm::Error::InvalidInput(msg) if msg.contains("check value") => ImportError::KeyCheck(msg),
        hsm::Error::InvalidInput(msg) if msg.contains("does not unwrap") => {
            ImportError::WrongKey(msg)
        }
        other => dest(other),
    })
    .and_then(|((imported, present), stored)| {
        let destination = match store {
            None => format!("token {token}"),
            Some(path) => {
                write_store(
                    path,
                    &KeyStore {
                        format: "cell-key-store".into(),
                        version: 1,
                        token: token.to_owned(),
                        store_key: STORE_KEY_LABEL.into(),
                        work_order: m.batch.work_order.clone(),
                        keys: stored,
                    },
                )?;
                format!(
                    "{} (wrapped under {STORE_KEY_LABEL} in token {token})",
                    path.display()
                )
            }
        };
        Ok(ImportReport {
            meters: m.meters.len(),
            keys_imported: imported,
            keys_present: present,
            destination,
        })
    })
}

/// Writes a key store file: created exclusively beside its final name, then renamed.
fn write_store(path: &Path, store: &KeyStore) -> Result<(), ImportError> {
    use std::io::Write;
    let fail = |e: std::io::Error| {
        ImportError::Destination(format!("cannot write {}: {e}", path.display()))
    };
    let tmp = path.with_extension("store.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    let text = serde_json::to_vec_pretty(store).map_err(|e| fail(std::io::Error::other(e)))?;
    f.write_all(&text).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

/// The size of a manifest key type.
fn key_size(key_type: &str) -> AesKeySize {
    if key_type == "aes-256" {
        AesKeySize::Aes256
    } else {
        AesKeySize::Aes128
    }
}

/// Unwraps meter `mr`'s key `k` under the batch transport key as a key of `role` (labelled
/// `label` for token roles) and checks it against the manifest: its check value, then its
/// binding to this meter and key id. A key that fails is destroyed again.
fn unwrap_checked(
    s: &hsm::HsmSession<'_>,
    tk: &KeyHandle,
    mr: &MeterRecord,
    k: &KeyEntry,
    role: KeyRole,
    label: Option<&str>,
) -> hsm::Result<KeyHandle> {
    let key = s
        .unwrap_aes(
            tk,
            &unb64(&k.wrapped),
            WrapAlg::AesKw,
            role,
            key_size(&k.key_type),
            label,
        )
        .map_err(|_| {
            hsm::Error::InvalidInput(format!(
                "meter {}: key {} does not match its check value (it does not unwrap)",
                mr.serial, k.id
            ))
        })?;
    let checked = (|| {
        if hex::encode(s.kcv(&key)?) != k.kcv {
            return Err(hsm::Error::InvalidInput(format!(
                "meter {}: key {} does not match its check value (swapped or damaged)",
                mr.serial, k.id
            )));
        }
        let prefix = key_binding_prefix(&title_bytes(&mr.system_title), &k.id);
        let binding = s.digest_key_sha256(&prefix, &key)?;
        if hex::encode(&binding[..16]) != k.binding {
            return Err(hsm::Error::InvalidInput(not_bound(&mr.serial, &k.id)));
        }
        Ok(())
    })();
    match checked {
        Ok(()) => Ok(key),
        Err(e) => {
            let _ = s.destroy(&key);
            Err(e)
        }
    }
}

/// Checks every meter key like [`import_meter_keys`], as a session object, and wraps it under
/// the token's store key (made on first use); nothing else stays in the token.
fn store_meter_keys(
    s: &hsm::HsmSession<'_>,
    tk: &KeyHandle,
    tk_kcv: &str,
    meters: &[MeterRecord],
) -> hsm::Result<Vec<StoredKey>> {
    if let Ok(kcv) = s.kcv(tk)
        && hex::encode(kcv) != tk_kcv
    {
        return Err(hsm::Error::InvalidInput(
            "the batch transport key does not match its check value".into(),
        ));
    }
    let store = match s.find_key(hsm::KeyKind::Aes(32), STORE_KEY_LABEL)? {
        Some(k) => k,
        None => s.generate_aes_key(
            KeyRole::UtilityKeyStore,
            AesKeySize::Aes256,
            Some(STORE_KEY_LABEL),
        )?,
    };
    let mut out = Vec::new();
    for mr in meters {
        for k in &mr.keys {
            let key = unwrap_checked(s, tk, mr, k, KeyRole::UtilityMeterKeyToStore, None)?;
            let checked = s.wrap(&store, &key, WrapAlg::AesKw);
            let _ = s.destroy(&key);
            out.push(StoredKey {
                serial: mr.serial.clone(),
                system_title: mr.system_title.clone(),
                key_id: k.id.clone(),
                key_type: k.key_type.clone(),
                wrapped: b64enc(&checked?),
                kcv: k.kcv.clone(),
            });
        }
    }
    Ok(out)
}

fn import_meter_keys(
    s: &hsm::HsmSession<'_>,
    tk: &KeyHandle,
    tk_kcv: &str,
    meters: &[MeterRecord],
) -> hsm::Result<(usize, usize)> {
    match s.kcv(tk) {
        Ok(kcv) if hex::encode(kcv) != tk_kcv => {
            return Err(hsm::Error::InvalidInput(
                "the batch transport key does not match its check value".into(),
            ));
        }
        // The unwrapped transport key may only unwrap, and some tokens (SoftHSM 2.6) give an
        // unwrapped key no CKA_CHECK_VALUE: its check value cannot be computed in the token.
        // Nothing is lost: a wrong transport key unwraps no meter key (RFC 3394 integrity), and
        // every meter key is checked against its own check value below.
        Ok(_) | Err(hsm::Error::KcvUnavailable) => {}
        Err(e) => return Err(e),
    }
    let mut created: Vec<KeyHandle> = Vec::new();
    let mut present = 0;
    let outcome = (|| -> hsm::Result<()> {
        for mr in meters {
            for k in &mr.keys {
                let label = format!("{}/{}", mr.system_title, k.id);
                let size = key_size(&k.key_type);
                if let Some(existing) = s.find_key(hsm::KeyKind::Aes(size.bytes()), &label)? {
                    if hex::encode(s.kcv(&existing)?) == k.kcv {
                        present += 1;
                        continue;
                    }
                    return Err(hsm::Error::InvalidInput(format!(
                        "meter {}: {label} already exists with another key",
                        mr.serial
                    )));
                }
                let key = unwrap_checked(s, tk, mr, k, KeyRole::UtilityMeterKey, Some(&label))?;
                created.push(key);
            }
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        for k in &created {
            let _ = s.destroy(k);
        }
        return Err(e);
    }
    Ok((created.len(), present))
}
