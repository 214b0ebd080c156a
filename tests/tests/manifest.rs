//! The signed batch manifest as the utility meets it: a real export of a batch run to completion
//! on emulated meters, opened with the OpenSSL recipe of `docs/utility.md` (extracted from the
//! page and run with bash), checked against `schemas/manifest.schema.json` by Python's
//! `jsonschema` and by `station manifest verify`, imported into a second SoftHSM token (the
//! utility's) and into owner-only files, and refused — with its own error, importing nothing —
//! when it has been tampered with. Every imported key is compared with the copy the meter holds
//! in its flash.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use der::{Decode, Encode};
use e2e::{Cell, CellOptions, MODEL, run_batch};
use serde_json::Value;
use station::engine::BatchSpec;
use station::{Engine, Reply};

const KEY_IDS: [&str; 4] = ["guek", "gbek", "ak", "kek"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the cell's open batch to completion, closes it (supervisor, CLI) and exports it
/// (officer, CLI) into `<cell>/export`.
async fn finish_and_export(cell: &Cell, batch: i64) -> PathBuf {
    let (daemon, summary) = run_batch(cell, Duration::from_secs(300)).await;
    assert!(summary.batch_complete, "{summary}");
    assert_eq!(summary.failed, 0, "{summary}");
    let id = batch.to_string();
    let (code, out, err) = cell.run(Some("super"), &["batch", "close", &id]);
    assert_eq!(code, 0, "batch close: {out}{err}");
    let dir = cell.path("export");
    let (code, out, err) = cell.run(
        Some("officer"),
        &["export", "--batch", &id, "--out", s(&dir)],
    );
    assert_eq!(code, 0, "export: {out}{err}");
    daemon.stop().await.unwrap();
    dir
}

/// A cell with a batch of `meters` made for the harness's demo utility, exported.
async fn exported(meters: i64) -> (Cell, PathBuf) {
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: meters,
        ..CellOptions::default()
    })
    .await;
    let batch = cell.batch_id.unwrap();
    let dir = finish_and_export(&cell, batch).await;
    (cell, dir)
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn meters(m: &Value) -> &Vec<Value> {
    m["meters"].as_array().unwrap()
}

fn text(m: &Value, field: &str) -> String {
    m[field].as_str().unwrap().to_string()
}

/// The copy of a key the meter holds in its flash.
fn flash_key(cell: &Cell, meter: &Value, id: &str) -> Vec<u8> {
    std::fs::read(
        cell.meter_dir(&text(meter, "uid"))
            .join(format!("secret-{id}.bin")),
    )
    .unwrap()
}

/// Copies the export in `src` to `dst` with `manifest.json` edited by `edit` and `manifest.p7m`
/// signed again by the cell's manifest signer: a validly signed manifest with chosen content.
fn resigned(engine: &Engine, src: &Path, dst: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    let mut m = manifest(src);
    edit(&mut m);
    let json = dst.join("manifest.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let p7m = dst.join("manifest.p7m");
    tokio::task::block_in_place(|| {
        station::manifest::resign(engine.hsm(), engine.keys(), &json, &p7m).unwrap()
    });
    p7m
}

/// `station manifest verify`: (exit code, everything it printed).
fn verify(cell: &Cell, p7m: &Path, root: &Path) -> (i32, String) {
    let (code, out, err) = cell.run(None, &["manifest", "verify", s(p7m), "--root", s(root)]);
    (code, format!("{out}{err}"))
}

/// `station manifest import` into per-meter key files: (exit code, everything it printed).
fn import_files(cell: &Cell, p7m: &Path, key: &Path, out: &Path) -> (i32, String) {
    let root = cell.path("root-ca.pem");
    let (code, o, e) = cell.run(
        None,
        &[
            "manifest",
            "import",
            s(p7m),
            "--root",
            s(&root),
            "--key",
            s(key),
            "--out",
            s(out),
            "--clear-keys",
        ],
    );
    (code, format!("{o}{e}"))
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(d) => d.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// A fresh RSA key that is not the utility's (PKCS#8 PEM, made by openssl).
fn stranger_key(dir: &Path) -> PathBuf {
    let path = dir.join("stranger-key.pem");
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

// ----- the OpenSSL recipe of the docs ------------------------------------------------------

/// The recipe: the one ```sh block between the markers of `docs/utility.md`.
fn recipe() -> String {
    let page = std::fs::read_to_string(repo().join("docs/utility.md")).unwrap();
    let (_, rest) = page
        .split_once("<!-- recipe:begin -->")
        .expect("docs/utility.md has no <!-- recipe:begin --> marker");
    let (block, _) = rest
        .split_once("<!-- recipe:end -->")
        .expect("docs/utility.md has no <!-- recipe:end --> marker");
    let body = block
        .trim()
        .strip_prefix("```sh\n")
        .and_then(|b| b.strip_suffix("```"))
        .expect("the recipe is one ```sh block");
    assert!(!body.contains("```"), "the recipe is one block");
    body.to_string()
}

struct RecipeRun {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_recipe(
    work: &Path,
    dir: &Path,
    root: &Path,
    key: &Path,
    keys_out: Option<&Path>,
) -> RecipeRun {
    let script = work.join("recipe.sh");
    std::fs::write(&script, recipe()).unwrap();
    let mut c = Command::new("bash");
    c.arg(&script)
        .env("MANIFEST_DIR", dir)
        .env("ROOT", root)
        .env("UTILITY_KEY", key)
        .env_remove("KEYS_OUT");
    if let Some(k) = keys_out {
        c.env("KEYS_OUT", k);
    }
    let out = c.output().unwrap();
    RecipeRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openssl_recipe_of_the_docs_opens_a_real_export() {
    let (cell, dir) = exported(3).await;
    let m = manifest(&dir);
    assert_eq!(meters(&m).len(), 3);
    let (root, key) = (cell.path("root-ca.pem"), cell.path("utility-key.pem"));

    let keys_out = cell.path("clear-keys");
    let run = run_recipe(cell.dir.path(), &dir, &root, &key, Some(&keys_out));
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines.contains(&"signature: verified"), "{}", run.stdout);
    assert!(
        lines.contains(&"transport key: unwrapped, kcv ok"),
        "{}",
        run.stdout
    );
    assert_eq!(
        lines.iter().filter(|l| l.ends_with(" kcv ok")).count(),
        3 * 4 + 1,
        "{}",
        run.stdout
    );
    for meter in meters(&m) {
        let (serial, title) = (text(meter, "serial"), text(meter, "system_title"));
        for id in KEY_IDS {
            assert!(
                lines.contains(&format!("{serial} {title} {id} kcv ok").as_str()),
                "{serial} {id}: {}",
                run.stdout
            );
            // The key OpenSSL unwrapped is the key the meter holds.
            let file = keys_out.join(format!("{title}.{id}.key"));
            assert_eq!(
                std::fs::read(&file).unwrap(),
                flash_key(&cell, meter, id),
                "{serial} {id}"
            );
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
    }

    // The same recipe sees a key moved between meters, a foreign root and a foreign key.
    let engine = cell.engine(false).await;
    let swapped = resigned(&engine, &dir, &cell.path("swapped"), |m| {
        let a = m["meters"][0]["keys"][1]["wrapped"].take();
        let b = m["meters"][2]["keys"][1]["wrapped"].take();
        m["meters"][0]["keys"][1]["wrapped"] = b;
        m["meters"][2]["keys"][1]["wrapped"] = a;
    });
    engine.shutdown().await.unwrap();
    let run = run_recipe(
        cell.dir.path(),
        swapped.parent().unwrap(),
        &root,
        &key,
        None,
    );
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let mismatches: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.ends_with("kcv MISMATCH"))
        .collect();
    assert_eq!(
        mismatches,
        [0, 2]
            .map(|i| {
                let meter = &meters(&m)[i];
                format!(
                    "{} {} gbek kcv MISMATCH",
                    text(meter, "serial"),
                    text(meter, "system_title")
                )
            })
            .to_vec(),
        "{}",
        run.stdout
    );

    let run = run_recipe(
        cell.dir.path(),
        &dir,
        &cell.path("pki/provisioning-root.pem"),
        &key,
        None,
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("signature: NOT VERIFIED"),
        "{}",
        run.stderr
    );
    assert!(!run.stdout.contains("kcv"), "{}", run.stdout);

    let run = run_recipe(
        cell.dir.path(),
        &dir,
        &root,
        &stranger_key(cell.dir.path()),
        None,
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("UTILITY_KEY is not the key of customer utility"),
        "{}",
        run.stderr
    );
    assert!(!run.stdout.contains("kcv"), "{}", run.stdout);
}

// ----- the JSON Schema ---------------------------------------------------------------------

/// Validates `doc` against the manifest schema with Python's jsonschema: Ok, or the messages.
fn python_validate(doc: &Path) -> Result<(), String> {
    e2e::validate_with_jsonschema(&repo().join("schemas/manifest.schema.json"), doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_schema_and_the_station_agree_on_real_and_broken_manifests() {
    // The documented example: valid for both.
    let example = repo().join("schemas/manifest.example.json");
    python_validate(&example).unwrap();
    let parsed: station::manifest::model::Manifest =
        serde_json::from_slice(&std::fs::read(&example).unwrap()).unwrap();
    assert_eq!(parsed.check_form(), Vec::new());

    // A real export: valid for both.
    let (cell, dir) = exported(2).await;
    python_validate(&dir.join("manifest.json")).unwrap();
    let root = cell.path("root-ca.pem");
    let (code, out) = verify(&cell, &dir.join("manifest.p7m"), &root);
    assert_eq!(code, 0, "{out}");

    let engine = cell.engine(false).await;
    // Signed again unchanged (but re-formatted): still good, so below only the edit is at fault.
    let same = resigned(&engine, &dir, &cell.path("same"), |_| {});
    let (code, out) = verify(&cell, &same, &root);
    assert_eq!(code, 0, "{out}");

    let serial = text(&meters(&manifest(&dir))[0], "serial");
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit, String)> = vec![
        (
            "unknown field",
            Box::new(|m| m["meters"][0]["colour"] = "grey".into()),
            "schema: the content is not a valid manifest: unknown field `colour`".into(),
        ),
        (
            "upper-case hex",
            Box::new(|m| m["meters"][0]["keys"][0]["kcv"] = "ABCDEF".into()),
            format!("schema: meters[0] ({serial}): kcv is not 3 bytes of hex"),
        ),
        (
            "short hex",
            Box::new(|m| m["firmware"]["sha256"] = "71dbac31".into()),
            "schema: firmware.sha256 is not 32 bytes of hex".into(),
        ),
        (
            "unknown slot",
            Box::new(|m| m["meters"][0]["certificates"][0]["slot"] = "enc".into()),
            format!("schema: meters[0] ({serial}): certificate slot \"enc\" is not sign or ka"),
        ),
        (
            "unknown OAEP hash",
            Box::new(|m| m["transport_key"]["oaep_hash"] = "md5".into()),
            "schema: transport_key.oaep_hash is not sha1 or sha256".into(),
        ),
        (
            "a key listed twice",
            Box::new(|m| m["meters"][0]["keys"][1]["id"] = "guek".into()),
            format!(
                "schema: meters[0] ({serial}): needs the four keys guek, gbek, ak, kek, each once"
            ),
        ),
        (
            "time with a space",
            Box::new(|m| {
                let t = m["created_at"].as_str().unwrap().replace('T', " ");
                m["created_at"] = t.into();
            }),
            "schema: created_at is not an RFC 3339 time".into(),
        ),
        (
            "base64 with a line break",
            Box::new(|m| {
                let d = m["device_ca"]["certificate"].as_str().unwrap().to_string();
                m["device_ca"]["certificate"] = format!("{}\n{}", &d[..64], &d[64..]).into();
            }),
            "schema: device_ca.certificate is not base64".into(),
        ),
        (
            "missing section",
            Box::new(|m| {
                m.as_object_mut().unwrap().remove("audit_checkpoint");
            }),
            "schema: the content is not a valid manifest: missing field `audit_checkpoint`".into(),
        ),
        (
            "wrong version",
            Box::new(|m| m["version"] = 2.into()),
            "schema: version 2 is not 1".into(),
        ),
    ];
    for (i, (what, edit, message)) in cases.into_iter().enumerate() {
        let p7m = resigned(&engine, &dir, &cell.path(&format!("bad-{i}")), edit);
        let python = python_validate(&p7m.with_file_name("manifest.json"));
        assert!(python.is_err(), "the schema accepts: {what}");
        let (code, out) = verify(&cell, &p7m, &root);
        assert_eq!(code, 2, "station accepts: {what}\n{out}");
        assert!(
            out.contains(&message),
            "{what}: expected {message:?} in\n{out}"
        );
        assert!(
            !out.contains("signature:"),
            "{what}: the signature is good\n{out}"
        );
    }
    engine.shutdown().await.unwrap();
}

// ----- import into the utility's token -----------------------------------------------------

/// Certifies the utility token's RSA public key with a software CA (as the utility's own CA
/// would): a key-encipherment certificate, DER.
fn utility_certificate(spki_der: &[u8]) -> Vec<u8> {
    use p256::elliptic_curve::Generate;
    use x509_cert::builder::profile::BuilderProfile;
    use x509_cert::builder::{Builder, CertificateBuilder};
    use x509_cert::ext::ToExtension;
    use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages};
    use x509_cert::name::Name;

    struct KeyImport(Name, Name);
    impl BuilderProfile for KeyImport {
        fn get_issuer(&self, _subject: &Name) -> Name {
            self.0.clone()
        }
        fn get_subject(&self) -> Name {
            self.1.clone()
        }
        fn build_extensions(
            &self,
            _spk: spki::SubjectPublicKeyInfoRef<'_>,
            _issuer: spki::SubjectPublicKeyInfoRef<'_>,
            tbs: &x509_cert::certificate::TbsCertificate,
        ) -> x509_cert::builder::Result<Vec<x509_cert::ext::Extension>> {
            Ok(vec![
                BasicConstraints {
                    ca: false,
                    path_len_constraint: None,
                }
                .to_extension(tbs.subject(), &[])?,
                KeyUsage(KeyUsages::KeyEncipherment.into()).to_extension(tbs.subject(), &[])?,
            ])
        }
    }
    let ca = p256::ecdsa::SigningKey::generate_from_rng(&mut line_protocol::io::system_rng());
    let profile = KeyImport(
        Name::from_str("CN=Test Utility CA,O=Test Utility").unwrap(),
        Name::from_str("CN=Key Import,O=Test Utility").unwrap(),
    );
    let builder = CertificateBuilder::new(
        profile,
        x509_cert::serial_number::SerialNumber::from(7u32),
        x509_cert::time::Validity::from_now(Duration::from_secs(3600 * 24 * 365)).unwrap(),
        spki::SubjectPublicKeyInfoOwned::from_der(spki_der).unwrap(),
    )
    .unwrap();
    builder
        .build::<_, p256::ecdsa::DerSignature>(&ca)
        .unwrap()
        .to_der()
        .unwrap()
}

/// A SoftHSM token for a utility, with its RSA transport key pair; returns it opened, and the
/// key's certificate.
async fn utility_token(prefix: &str) -> (hsm::testkit::TestToken, hsm::Hsm, Vec<u8>) {
    let token = hsm::testkit::TestToken::new(prefix).unwrap();
    let h = token.open(1).unwrap();
    let spki = h
        .run(|s| {
            s.generate_rsa_keypair(3072, "utility-transport")?
                .spki_der()
        })
        .await
        .unwrap();
    (token, h, utility_certificate(&spki))
}

/// Labels of the secret keys in a token.
async fn secret_keys(h: &hsm::Hsm) -> Vec<String> {
    let mut labels: Vec<String> = h
        .run(|s| s.list_objects())
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.class == "secret key")
        .map(|o| o.label)
        .collect();
    labels.sort();
    labels
}

fn import_token(cell: &Cell, p7m: &Path, token: &str) -> (i32, String) {
    let pin = cell.path(&format!("{token}.pin"));
    if !pin.exists() {
        station::demo::write_secret(&pin, hsm::testkit::USER_PIN).unwrap();
    }
    let root = cell.path("root-ca.pem");
    let (code, o, e) = cell.run(
        None,
        &[
            "manifest",
            "import",
            s(p7m),
            "--root",
            s(&root),
            "--pkcs11-module",
            hsm::SOFTHSM_MODULE,
            "--token",
            token,
            "--token-pin-file",
            s(&pin),
        ],
    );
    (code, format!("{o}{e}"))
}

/// Opens a batch of `quantity` meters for customer `name` whose key-transport certificate is
/// `cert` (the token's security officer approves it first); returns the batch id.
async fn batch_for(cell: &Cell, name: &str, cert: Vec<u8>, work_order: &str, quantity: i64) -> i64 {
    cell.trust_customer(name, &cert);
    let engine = cell.engine(false).await;
    let officer = cell.login_engine(&engine, "officer").await;
    engine
        .execute(
            &officer,
            station::Command::ImportCustomer {
                name: name.into(),
                cert,
            },
        )
        .await
        .unwrap();
    let sup = cell.login_engine(&engine, "super").await;
    let batch = match engine
        .execute(
            &sup,
            station::Command::OpenBatch(BatchSpec {
                work_order: work_order.into(),
                model: MODEL.into(),
                firmware: cell.firmware_sha.clone(),
                customer: name.into(),
                quantity,
                serial_prefix: "UTL".into(),
                serial_first: 1,
                serial_last: 100,
            }),
        )
        .await
        .unwrap()
    {
        Reply::Batch(b) => b.id,
        other => panic!("{other:?}"),
    };
    engine.shutdown().await.unwrap();
    batch
}

/// A token too small for four objects per meter: `--store` keeps every meter key out of it,
/// checked and wrapped under one token key into a file; a key taken back from the file into the
/// HSM works as the meter's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn import_into_a_key_store_keeps_one_object_in_the_token_for_a_whole_batch() {
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 3,
        open_batch: false,
        ..CellOptions::default()
    })
    .await;
    let (token, util, cert) = utility_token("store").await;
    let batch = batch_for(&cell, "util-store", cert, "WO-STORE-1", 3).await;
    let dir = finish_and_export(&cell, batch).await;
    let m = manifest(&dir);
    let before = util.run(|s| s.list_objects()).await.unwrap().len();
    let store = cell.path("keys.store");
    let pin = cell.path("store.pin");
    station::demo::write_secret(&pin, hsm::testkit::USER_PIN).unwrap();
    let import = |extra: &[&str]| {
        let p7m = dir.join("manifest.p7m");
        let root = cell.path("root-ca.pem");
        let mut args = vec![
            "manifest",
            "import",
            s(&p7m),
            "--root",
            s(&root),
            "--pkcs11-module",
            hsm::SOFTHSM_MODULE,
            "--token",
            &token.label,
            "--token-pin-file",
            s(&pin),
        ];
        args.extend_from_slice(extra);
        let (code, o, e) = cell.run(None, &args);
        (code, format!("{o}{e}"))
    };
    let (code, out) = import(&["--store", s(&store)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("imported 12 key(s) of 3 meter(s)"), "{out}");
    // One object more in the token: the store key.
    let objects = util.run(|s| s.list_objects()).await.unwrap();
    assert_eq!(objects.len(), before + 1, "{objects:?}");
    assert!(objects.iter().any(|o| o.label == "utility-key-store"));
    // A second import never overwrites the store.
    let (code, out) = import(&["--store", s(&store)]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("is never overwritten"), "{out}");

    // The file: every key, wrapped; taken back into the HSM it is the meter's key.
    let st: station::manifest::import::KeyStore =
        serde_json::from_slice(&std::fs::read(&store).unwrap()).unwrap();
    assert_eq!(st.keys.len(), 12);
    assert_eq!(st.work_order, "WO-STORE-1");
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    for meter in meters(&m) {
        let title = text(meter, "system_title");
        let k = st
            .keys
            .iter()
            .find(|k| k.system_title == title && k.key_id == "guek")
            .unwrap();
        let wrapped = station::manifest::model::unb64(&k.wrapped);
        let label = format!("{title}/guek");
        let (l, iv, aad) = (label.clone(), [9u8; 12], b"apdu".to_vec());
        let sealed = util
            .run(move |s| {
                let store = s
                    .find_key(hsm::KeyKind::Aes(32), "utility-key-store")?
                    .expect("the store key");
                let key = s.unwrap_aes(
                    &store,
                    &wrapped,
                    hsm::WrapAlg::AesKw,
                    hsm::KeyRole::UtilityMeterKey,
                    hsm::AesKeySize::Aes128,
                    Some(&l),
                )?;
                let out = s.aes_gcm_encrypt(&key, &iv, &aad, b"hello meter")?;
                s.destroy(&key)?;
                Ok(out)
            })
            .await
            .unwrap();
        let opened = aes_gcm::Aes128Gcm::new_from_slice(&flash_key(&cell, meter, "guek"))
            .unwrap()
            .decrypt(
                &iv.into(),
                Payload {
                    msg: &sealed,
                    aad: b"apdu",
                },
            )
            .unwrap_or_else(|_| panic!("{label}: the meter's key does not open it"));
        assert_eq!(opened, b"hello meter");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn import_into_the_utility_token_delivers_keys_that_work() {
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 2,
        open_batch: false,
        ..CellOptions::default()
    })
    .await;
    // The utility's token and key, and another utility's.
    let (token, util, cert) = utility_token("util").await;
    let (other, other_hsm, _) = utility_token("other").await;

    let batch = batch_for(&cell, "util-hsm", cert, "WO-UTIL-1", 2).await;
    let dir = finish_and_export(&cell, batch).await;
    let m = manifest(&dir);
    let p7m = dir.join("manifest.p7m");

    // Another utility's key does not open it, and its token gains nothing.
    let (code, out) = import_token(&cell, &p7m, &other.label);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("the batch transport key does not unwrap with utility-transport"),
        "{out}"
    );
    assert_eq!(secret_keys(&other_hsm).await, Vec::<String>::new());

    // A key swapped between meters stops the import after some keys were unwrapped: they are
    // destroyed again.
    let engine = cell.engine(false).await;
    let swapped = resigned(&engine, &dir, &cell.path("swapped"), |m| {
        let a = m["meters"][0]["keys"][3]["wrapped"].take();
        let b = m["meters"][1]["keys"][3]["wrapped"].take();
        m["meters"][0]["keys"][3]["wrapped"] = b;
        m["meters"][1]["keys"][3]["wrapped"] = a;
    });
    engine.shutdown().await.unwrap();
    let (code, out) = import_token(&cell, &swapped, &token.label);
    assert_eq!(code, 2, "{out}");
    let first = text(&meters(&m)[0], "serial");
    assert!(
        out.contains(&format!(
            "meter {first}: key kek does not match its check value (swapped or damaged); nothing was imported"
        )),
        "{out}"
    );
    assert_eq!(secret_keys(&util).await, Vec::<String>::new());

    // The real import: every key lands as `<system title>/<key id>`.
    let (code, out) = import_token(&cell, &p7m, &token.label);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "imported 8 key(s) of 2 meter(s) into token {} (0 already present)",
            token.label
        )),
        "{out}"
    );
    let mut want: Vec<String> = meters(&m)
        .iter()
        .flat_map(|meter| KEY_IDS.map(|id| format!("{}/{id}", text(meter, "system_title"))))
        .collect();
    want.sort();
    assert_eq!(secret_keys(&util).await, want);

    // Each imported key encrypts in the utility's HSM (AES-GCM); the meter's own copy decrypts.
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    for meter in meters(&m) {
        for id in KEY_IDS {
            let label = format!("{}/{id}", text(meter, "system_title"));
            let (iv, aad) = ([7u8; 12], label.clone().into_bytes());
            let plain = format!("a DLMS APDU for {label}").into_bytes();
            let (l, a, p) = (label.clone(), aad.clone(), plain.clone());
            let (sealed, flags) = util
                .run(move |s| {
                    let key = s
                        .find_key(hsm::KeyKind::Aes(16), &l)?
                        .ok_or_else(|| hsm::Error::InvalidInput(format!("no key {l}")))?;
                    Ok((s.aes_gcm_encrypt(&key, &iv, &a, &p)?, s.key_flags(&key)?))
                })
                .await
                .unwrap();
            assert!(
                flags.token && flags.sensitive && !flags.extractable && flags.encrypt,
                "{label}: {flags}"
            );
            assert_ne!(sealed[..plain.len()], plain[..]);
            let meter_key = flash_key(&cell, meter, id);
            let opened = aes_gcm::Aes128Gcm::new_from_slice(&meter_key)
                .unwrap()
                .decrypt(
                    &iv.into(),
                    Payload {
                        msg: &sealed,
                        aad: &aad,
                    },
                )
                .unwrap_or_else(|_| panic!("{label}: the meter's key does not open it"));
            assert_eq!(opened, plain, "{label}");
        }
    }

    // Importing again changes nothing.
    let (code, out) = import_token(&cell, &p7m, &token.label);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "imported 0 key(s) of 2 meter(s) into token {} (8 already present)",
            token.label
        )),
        "{out}"
    );
    assert_eq!(secret_keys(&util).await, want);
}

// ----- import into files -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn import_into_files_writes_owner_only_files_only_when_asked() {
    let (cell, dir) = exported(2).await;
    let m = manifest(&dir);
    let p7m = dir.join("manifest.p7m");
    let (root, key, out) = (
        cell.path("root-ca.pem"),
        cell.path("utility-key.pem"),
        cell.path("head-end"),
    );

    // Keys in clear only with --clear-keys.
    let (code, o, e) = cell.run(
        None,
        &[
            "manifest",
            "import",
            s(&p7m),
            "--root",
            s(&root),
            "--key",
            s(&key),
            "--out",
            s(&out),
        ],
    );
    assert_ne!(code, 0, "{o}{e}");
    assert!(e.contains("--clear-keys"), "{e}");
    assert!(!out.exists());

    let (code, text_out) = import_files(&cell, &p7m, &key, &out);
    assert_eq!(code, 0, "{text_out}");
    assert!(
        text_out.contains(&format!(
            "imported 8 key(s) of 2 meter(s) into {} (0 already present)",
            out.display()
        )),
        "{text_out}"
    );
    assert_eq!(files_in(&out).len(), 2);
    for meter in meters(&m) {
        let file = out.join(format!("{}.json", text(meter, "system_title")));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
        let doc: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        for field in ["serial", "uid", "system_title", "logical_device_name"] {
            assert_eq!(doc[field], meter[field], "{field}");
        }
        assert_eq!(doc["batch"], m["batch"]["work_order"]);
        for id in KEY_IDS {
            let k = hex::decode(doc["keys"][id].as_str().unwrap()).unwrap();
            assert_eq!(
                k,
                flash_key(&cell, meter, id),
                "{} {id}",
                text(meter, "serial")
            );
        }
    }

    let (code, text_out) = import_files(&cell, &p7m, &key, &out);
    assert_eq!(code, 0, "{text_out}");
    assert!(
        text_out.contains("imported 0 key(s) of 2 meter(s)"),
        "{text_out}"
    );
    assert!(text_out.contains("(8 already present)"), "{text_out}");
}

// ----- tampering ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tampered_manifests_are_refused_each_with_its_error_and_import_nothing() {
    let (cell, dir) = exported(2).await;
    let m = manifest(&dir);
    let p7m = dir.join("manifest.p7m");
    let root = cell.path("root-ca.pem");
    let key = cell.path("utility-key.pem");
    let bytes = std::fs::read(&p7m).unwrap();
    let first = text(&meters(&m)[0], "serial");

    let write = |name: &str, b: &[u8]| {
        let d = cell.path(name);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("manifest.p7m");
        std::fs::write(&p, b).unwrap();
        p
    };
    let engine = cell.engine(false).await;
    let cases: Vec<(&str, PathBuf, PathBuf, Vec<String>)> = vec![
        (
            "a byte of the signed content",
            write("content-byte", &{
                let mut b = bytes.clone();
                let at = b.windows(8).position(|w| w == b"\"meters\"").unwrap() + 200;
                b[at] ^= 0x01;
                b
            }),
            root.clone(),
            vec!["signature: the content does not match its signed digest (manifest.json was changed)".into()],
        ),
        (
            "a byte of the signature",
            write("signature-byte", &{
                let mut b = bytes.clone();
                *b.last_mut().unwrap() ^= 0x01;
                b
            }),
            root.clone(),
            vec!["signature: the signature does not verify with the signer's certificate".into()],
        ),
        (
            "another root",
            p7m.clone(),
            cell.path("pki/provisioning-root.pem"),
            vec!["signature: the signer does not chain to the given root".into()],
        ),
        (
            "a truncated file",
            write("truncated", &bytes[..bytes.len() / 2]),
            root.clone(),
            vec![format!(
                "signature: the file is truncated: it has {} of the {} bytes its encoding declares",
                bytes.len() / 2,
                bytes.len()
            )],
        ),
        (
            "a meter record altered",
            resigned(&engine, &dir, &cell.path("altered"), |m| {
                m["meters"][0]["serial"] = "E2E000009999".into();
            }),
            root.clone(),
            vec![
                "meter E2E000009999".into(),
                "the sign certificate is for another serial number".into(),
                format!("the receipt names another identity ({first}, "),
            ],
        ),
        (
            "a schema violation",
            resigned(&engine, &dir, &cell.path("schema"), |m| {
                m["meters"][0]["keys"][0]["kcv"] = "xyz".into();
            }),
            root.clone(),
            vec![format!("schema: meters[0] ({first}): kcv is not 3 bytes of hex")],
        ),
        (
            "another device CA among the anchors",
            resigned(&engine, &dir, &cell.path("anchor"), |m| {
                m["trust_anchors"][0]["sha256"] = "00".repeat(32).into();
            }),
            root.clone(),
            vec!["trust anchors: the device CA the meters received is not the manifest's device CA".into()],
        ),
    ];
    let swapped = resigned(&engine, &dir, &cell.path("swapped"), |m| {
        let a = m["meters"][0]["keys"][0]["wrapped"].take();
        let b = m["meters"][1]["keys"][0]["wrapped"].take();
        m["meters"][0]["keys"][0]["wrapped"] = b;
        m["meters"][1]["keys"][0]["wrapped"] = a;
    });
    engine.shutdown().await.unwrap();

    for (what, file, root_used, messages) in &cases {
        let (code, out) = verify(&cell, file, root_used);
        assert_eq!(code, 2, "{what} verifies:\n{out}");
        assert!(
            out.contains("manifest FAILED verification"),
            "{what}:\n{out}"
        );
        for msg in messages {
            assert!(
                out.contains(msg.as_str()),
                "{what}: expected {msg:?} in\n{out}"
            );
        }
        // Import: refused with the same message, nothing written.
        let dest = cell.path(&format!("keys-{}", what.replace(' ', "-")));
        let (code, out) = if root_used == &root {
            import_files(&cell, file, &key, &dest)
        } else {
            let (c, o, e) = cell.run(
                None,
                &[
                    "manifest",
                    "import",
                    s(file),
                    "--root",
                    s(root_used),
                    "--key",
                    s(&key),
                    "--out",
                    s(&dest),
                    "--clear-keys",
                ],
            );
            (c, format!("{o}{e}"))
        };
        assert_eq!(code, 2, "{what} imports:\n{out}");
        assert!(
            out.contains("the manifest did not verify; nothing was imported"),
            "{what}:\n{out}"
        );
        assert!(out.contains(messages[0].as_str()), "{what}:\n{out}");
        assert_eq!(files_in(&dest), Vec::<PathBuf>::new(), "{what}");
    }

    // A wrapped key swapped between meters: the signature, the certificates and the receipts
    // are all good, so it verifies; only the key check value catches it, at import.
    let (code, out) = verify(&cell, &swapped, &root);
    assert_eq!(code, 0, "{out}");
    let dest = cell.path("keys-swapped");
    let (code, out) = import_files(&cell, &swapped, &key, &dest);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!(
            "meter {first}: key guek does not match its check value (swapped or damaged); nothing was imported"
        )),
        "{out}"
    );
    assert_eq!(files_in(&dest), Vec::<PathBuf>::new());

    // The wrong utility key.
    let stranger = stranger_key(cell.dir.path());
    let dest = cell.path("keys-stranger");
    let (code, out) = import_files(&cell, &p7m, &stranger, &dest);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!(
            "{} is not the key of customer utility the batch was made for (public key SHA-256 {})",
            stranger.display(),
            m["customer"]["public_key_sha256"].as_str().unwrap()
        )),
        "{out}"
    );
    assert_eq!(files_in(&dest), Vec::<PathBuf>::new());

    // The untouched export still imports, so each refusal above was the tampering's doing.
    let dest = cell.path("keys-good");
    let (code, out) = import_files(&cell, &p7m, &key, &dest);
    assert_eq!(code, 0, "{out}");
    assert_eq!(files_in(&dest).len(), 2);
}

// ----- who may sign ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_signed_with_a_meters_own_key_is_refused_by_every_verifier() {
    let (cell, dir) = exported(2).await;
    let m = manifest(&dir);
    // A forger holds one meter's signing key (it sits in the meter; a rogue board in a nest
    // has its own). Its certificate chains to the root through the device CA. It keeps the real
    // certificates and receipts and swaps two meters' keys, then signs with OpenSSL.
    let uid = text(&meters(&m)[0], "uid");
    let forge = cell.path("forge");
    std::fs::create_dir_all(&forge).unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&forge)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let meter = cell.meter_dir(&uid);
    openssl(&[
        "x509",
        "-inform",
        "DER",
        "-in",
        s(&meter.join("cert-sign.der")),
        "-out",
        "meter.pem",
    ]);
    openssl(&[
        "pkcs8",
        "-inform",
        "DER",
        "-nocrypt",
        "-in",
        s(&meter.join("key-sign.pk8")),
        "-out",
        "meter-key.pem",
    ]);
    let mut forged = m.clone();
    let a = forged["meters"][0]["keys"][0].take();
    let b = forged["meters"][1]["keys"][0].take();
    forged["meters"][0]["keys"][0] = b;
    forged["meters"][1]["keys"][0] = a;
    std::fs::write(
        forge.join("manifest.json"),
        serde_json::to_vec_pretty(&forged).unwrap(),
    )
    .unwrap();
    openssl(&[
        "cms",
        "-sign",
        "-binary",
        "-nodetach",
        "-outform",
        "DER",
        "-md",
        "sha256",
        "-in",
        "manifest.json",
        "-signer",
        "meter.pem",
        "-inkey",
        "meter-key.pem",
        "-certfile",
        s(&cell.path("pki/device-ca.pem")),
        "-out",
        "manifest.p7m",
    ]);
    let p7m = forge.join("manifest.p7m");
    let root = cell.path("root-ca.pem");
    // Its signature and chain are sound: only the signer's role gives it away.
    let (code, out) = verify(&cell, &p7m, &root);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("is not the manifest signer"), "{out}");
    assert!(!out.contains("the signature does not verify"), "{out}");
    let run = run_recipe(
        cell.dir.path(),
        &forge,
        &root,
        &cell.path("utility-key.pem"),
        None,
    );
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("is not the manifest signer"),
        "{}",
        run.stderr
    );
    assert!(!run.stdout.contains("kcv"), "{}", run.stdout);
    let out_dir = cell.path("forged-keys");
    let (code, out) = import_files(&cell, &p7m, &cell.path("utility-key.pem"), &out_dir);
    assert_ne!(code, 0, "{out}");
    assert!(files_in(&out_dir).is_empty(), "nothing is imported");
    // The real manifest still passes all three.
    let (code, out) = verify(&cell, &dir.join("manifest.p7m"), &root);
    assert_eq!(code, 0, "{out}");
}

// ----- the voided certificates ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn voided_certificates_are_revoked_by_a_crl_that_openssl_checks() {
    // Nest 1's first meter reports a wrong firmware hash after its certificates were issued:
    // it fails, and its certificates are voided.
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 3,
        faults: vec![(1, "wrong-hash".into())],
        ..CellOptions::default()
    })
    .await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(300)).await;
    assert!(summary.batch_complete, "{summary}");
    let id = cell.batch_id.unwrap().to_string();
    let (code, out, err) = cell.run(Some("super"), &["batch", "close", &id]);
    assert_eq!(code, 0, "{out}{err}");
    let dir = cell.path("export");
    let (code, out, err) = cell.run(
        Some("officer"),
        &["export", "--batch", &id, "--out", s(&dir)],
    );
    assert_eq!(code, 0, "{out}{err}");
    daemon.stop().await.unwrap();
    // The CRL came with the manifest, and is the one the signed manifest names.
    let crl = std::fs::read(dir.join("voided.crl")).unwrap();
    let m = manifest(&dir);
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(m["device_ca"]["crl"].as_str().unwrap())
            .unwrap(),
        crl
    );
    assert!(!m["voided_certificates"].as_array().unwrap().is_empty());
    let (code, out) = verify(&cell, &dir.join("manifest.p7m"), &cell.path("root-ca.pem"));
    assert_eq!(code, 0, "{out}");

    let db = cell.db();
    let der_of = |sql: &str| -> Vec<u8> { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    let voided =
        der_of("SELECT der FROM certificates WHERE state = 'voided' AND der IS NOT NULL LIMIT 1");
    let delivered = der_of("SELECT der FROM certificates WHERE state = 'delivered' LIMIT 1");
    let work = cell.path("crl-check");
    std::fs::create_dir_all(&work).unwrap();
    let check = |der: &[u8], name: &str| {
        let pem = work.join(format!("{name}.pem"));
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let body: Vec<String> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        std::fs::write(
            &pem,
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                body.join("\n")
            ),
        )
        .unwrap();
        let out = Command::new("openssl")
            .args(["verify", "-crl_check", "-CRLfile"])
            .arg(dir.join("voided.crl"))
            .arg("-CAfile")
            .arg(cell.path("root-ca.pem"))
            .arg("-untrusted")
            .arg(cell.path("pki/device-ca.pem"))
            .arg(&pem)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, text) = check(&voided, "voided");
    assert!(!ok && text.contains("certificate revoked"), "{text}");
    let (ok, text) = check(&delivered, "delivered");
    assert!(ok, "{text}");
}

// ----- an export cut short -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_export_cut_short_is_published_whole_or_not_at_all_and_settled_at_the_next_start() {
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 2,
        ..CellOptions::default()
    })
    .await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(300)).await;
    assert!(summary.batch_complete, "{summary}");
    let id = cell.batch_id.unwrap().to_string();
    let (code, out, err) = cell.run(Some("super"), &["batch", "close", &id]);
    assert_eq!(code, 0, "{out}{err}");
    daemon.stop().await.unwrap();
    let exports = cell.path("exports");
    let published = || -> Vec<PathBuf> {
        files_in(&exports)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("batch-")
            })
            .collect()
    };
    let staging = || -> Vec<PathBuf> {
        files_in(&exports)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .contains(".export-")
            })
            .collect()
    };
    let q = |sql: &str| -> i64 { cell.db().query_row(sql, [], |r| r.get(0)).unwrap() };
    let root = cell.path("root-ca.pem");

    // Power cut after the files were published, before the record: the directory is whole.
    let mut d = tokio::task::block_in_place(|| {
        cell.spawn_stationd_with(&[("STATION_FAILPOINT", "export.published")])
    });
    let (code, _, _) = cell.run(
        Some("officer"),
        &["export", "--batch", &id, "--out", s(&cell.path("x1"))],
    );
    assert_ne!(code, 0);
    assert!(
        !d.wait().unwrap().success(),
        "the daemon died at the crash point"
    );
    assert_eq!(published().len(), 1);
    assert_eq!(q("SELECT count(*) FROM exports"), 0, "not recorded yet");
    let first = published().remove(0);
    // The next start finds it, and records it (audited).
    let d = tokio::task::block_in_place(|| cell.spawn_stationd());
    assert_eq!(q("SELECT count(*) FROM exports"), 1);
    assert_eq!(
        q("SELECT count(*) FROM audit WHERE kind = 'manifest.export_recovered'"),
        1
    );
    let (code, out) = verify(&cell, &first.join("manifest.p7m"), &root);
    assert_eq!(code, 0, "{out}");
    e2e::stop_stationd(d);

    // Power cut while the files were still being written: nothing is published, and the next
    // start clears the leftovers (audited); the export then runs again.
    let mut d = tokio::task::block_in_place(|| {
        cell.spawn_stationd_with(&[("STATION_FAILPOINT", "export.staged")])
    });
    let (code, _, _) = cell.run(
        Some("officer"),
        &["export", "--batch", &id, "--out", s(&cell.path("x2"))],
    );
    assert_ne!(code, 0);
    assert!(!d.wait().unwrap().success());
    assert_eq!(
        published(),
        vec![first.clone()],
        "nothing half-made was published"
    );
    assert_eq!(staging().len(), 1);
    let d = tokio::task::block_in_place(|| cell.spawn_stationd());
    assert!(staging().is_empty());
    assert_eq!(
        q("SELECT count(*) FROM audit WHERE kind = 'manifest.export_abandoned'"),
        1
    );
    assert_eq!(
        q("SELECT count(*) FROM export_runs WHERE state = 'started'"),
        0
    );
    let (code, out, err) = cell.run(
        Some("officer"),
        &["export", "--batch", &id, "--out", s(&cell.path("x3"))],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out) = verify(&cell, &cell.path("x3/manifest.p7m"), &root);
    assert_eq!(code, 0, "{out}");
    assert_eq!(q("SELECT count(*) FROM exports"), 2);
    e2e::stop_stationd(d);
}

// ----- keys bound to their meters ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_moved_to_another_meter_with_its_check_value_is_refused() {
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 2,
        ..CellOptions::default()
    })
    .await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(300)).await;
    assert!(summary.batch_complete, "{summary}");
    let id = cell.batch_id.unwrap().to_string();
    let (code, out, err) = cell.run(Some("super"), &["batch", "close", &id]);
    assert_eq!(code, 0, "{out}{err}");
    daemon.stop().await.unwrap();
    // Someone with the journal swaps two meters' GBEKs, each with everything stored beside it
    // (check value and binding), before the manifest is exported and signed.
    let db = cell.db();
    db.execute_batch(
        "CREATE TEMP TABLE k AS SELECT meter_id, wrapped, kcv, binding FROM wrapped_keys WHERE key_id = 'gbek';
         UPDATE wrapped_keys SET
           wrapped = (SELECT wrapped FROM k WHERE k.meter_id <> wrapped_keys.meter_id),
           kcv = (SELECT kcv FROM k WHERE k.meter_id <> wrapped_keys.meter_id),
           binding = (SELECT binding FROM k WHERE k.meter_id <> wrapped_keys.meter_id)
         WHERE key_id = 'gbek';",
    )
    .unwrap();
    drop(db);
    let d = tokio::task::block_in_place(|| cell.spawn_stationd());
    let dir = cell.path("export");
    let (code, out, err) = cell.run(
        Some("officer"),
        &["export", "--batch", &id, "--out", s(&dir)],
    );
    assert_eq!(code, 0, "{out}{err}");
    e2e::stop_stationd(d);
    // The manifest is genuinely signed, and the key still matches its check value…
    let root = cell.path("root-ca.pem");
    let (code, out) = verify(&cell, &dir.join("manifest.p7m"), &root);
    assert_eq!(code, 0, "{out}");
    // …but not its binding: the utility refuses, with the station's importer and with OpenSSL.
    let keys = cell.path("keys");
    let (code, out) = import_files(
        &cell,
        &dir.join("manifest.p7m"),
        &cell.path("utility-key.pem"),
        &keys,
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("gbek is not bound to this meter"), "{out}");
    assert!(files_in(&keys).is_empty(), "nothing is imported");
    let run = run_recipe(
        cell.dir.path(),
        &dir,
        &root,
        &cell.path("utility-key.pem"),
        None,
    );
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_eq!(
        run.stdout
            .lines()
            .filter(|l| l.ends_with("gbek NOT BOUND to this meter"))
            .count(),
        2,
        "{}",
        run.stdout
    );
    assert_eq!(
        run.stdout
            .lines()
            .filter(|l| l.ends_with(" kcv ok"))
            .count(),
        1 + 2 * 3,
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_planted_at_the_import_temporary_name_does_not_redirect_the_keys() {
    let (cell, dir) = exported(1).await;
    let m = manifest(&dir);
    let title = text(&meters(&m)[0], "system_title");
    let out = cell.path("keys");
    std::fs::create_dir_all(&out).unwrap();
    // Someone who can write into the key directory plants a link where the importer writes
    // its temporary file, hoping the clear keys land in a file of theirs.
    let theirs = cell.path("theirs.txt");
    std::fs::write(&theirs, "untouched\n").unwrap();
    std::os::unix::fs::symlink(&theirs, out.join(format!("{title}.json.tmp"))).unwrap();
    let (code, o) = import_files(
        &cell,
        &dir.join("manifest.p7m"),
        &cell.path("utility-key.pem"),
        &out,
    );
    assert_eq!(code, 0, "{o}");
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "untouched\n");
    let written = out.join(format!("{title}.json"));
    let meta = std::fs::symlink_metadata(&written).unwrap();
    assert!(meta.file_type().is_file(), "a regular file, not a link");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let doc: Value = serde_json::from_slice(&std::fs::read(&written).unwrap()).unwrap();
    assert_eq!(doc["keys"].as_object().unwrap().len(), 4);
    assert_eq!(
        hex::decode(doc["keys"]["gbek"].as_str().unwrap()).unwrap(),
        flash_key(&cell, &meters(&m)[0], "gbek")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_utility_anchor_changed_on_disk_after_the_batch_opened_never_reaches_a_meter() {
    // The batch pinned the model's utility anchor (utility.pem) when it opened. Someone with the
    // configuration's files then swaps it for a CA of their own: meters would trust it.
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        ..CellOptions::default()
    })
    .await;
    let anchor = cell.path("utility.pem");
    let original = cell.path("original-utility.pem");
    std::fs::copy(&anchor, &original).unwrap();
    e2e::rogue_certificate(&anchor, "/CN=Rogue Utility CA", &[]);

    let dir = finish_and_export(&cell, cell.batch_id.unwrap()).await;
    let pem = std::fs::read(&original).unwrap();
    let der = der::pem::decode_vec(&pem).unwrap().1;
    // The meter holds the pinned certificate, byte for byte.
    let m = manifest(&dir);
    let meter_dir = cell.meter_dir(&text(&meters(&m)[0], "uid"));
    let installed: Vec<Vec<u8>> = std::fs::read_dir(&meter_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("anchor-"))
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    assert_eq!(installed.len(), 2, "the firmware anchor and the utility's");
    assert!(installed.contains(&der), "the pinned utility anchor");
    let rogue = der::pem::decode_vec(&std::fs::read(&anchor).unwrap())
        .unwrap()
        .1;
    assert!(!installed.contains(&rogue));
    // The manifest lists it with the SHA-256 OpenSSL computes of the original certificate, and
    // the batch's audit entry recorded the same set.
    let fp = e2e::sha256_of_pipeline(&format!(
        "openssl x509 -in '{}' -outform der",
        original.display()
    ));
    let anchors = m["trust_anchors"].as_array().unwrap();
    let kinds: Vec<&str> = anchors
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["device-ca", "firmware-verification", "utility-client"]
    );
    assert_eq!(anchors[2]["sha256"].as_str().unwrap(), fp);
    let audited: String = cell
        .db()
        .query_row(
            "SELECT details FROM audit WHERE kind = 'batch.opened'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(audited.contains(&fp), "{audited}");
    let (code, out) = verify(&cell, &dir.join("manifest.p7m"), &cell.path("root-ca.pem"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("utility-client 0 {fp}")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_receipt_is_checked_against_the_interfaces_the_model_disables() {
    // The model disables the optical port only; a meter leaves its debug port open, which this
    // model allows. The manifest says so, and a manifest that claims more than the receipts show
    // is refused.
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        faults: vec![(1, "debug-open".into())],
        model_extra: "disable = [\"optical\"]\n".into(),
        ..CellOptions::default()
    })
    .await;
    let dir = finish_and_export(&cell, cell.batch_id.unwrap()).await;
    let m = manifest(&dir);
    assert_eq!(
        m["batch"]["interfaces_disabled"], 5,
        "provisioning and optical"
    );
    let root = cell.path("root-ca.pem");
    let (code, out) = verify(&cell, &dir.join("manifest.p7m"), &root);
    assert_eq!(code, 0, "{out}");
    let engine = cell.engine(false).await;
    let claimed = resigned(&engine, &dir, &cell.path("claimed"), |m| {
        m["batch"]["interfaces_disabled"] = 7.into();
    });
    engine.shutdown().await.unwrap();
    let (code, out) = verify(&cell, &claimed, &root);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(
            "the receipt says interfaces are still enabled that the model disables: debug"
        ),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_on_kryoptic_ends_in_a_manifest_the_utility_verifies_and_imports() {
    // The whole cell on a second PKCS#11 implementation: RFC 5649 at 0x210B, no
    // CKA_CHECK_VALUE, RSA-OAEP with SHA-256, no trusted keys (the cell says so in its log).
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 3,
        kryoptic: true,
        ..CellOptions::default()
    })
    .await;
    let dir = finish_and_export(&cell, cell.batch_id.unwrap()).await;
    let m = manifest(&dir);
    assert_eq!(meters(&m).len(), 3);
    assert_eq!(m["transport_key"]["oaep_hash"], "sha256");
    // Kryoptic takes OAEP labels: the transport key is bound to its work order.
    assert_eq!(m["transport_key"]["oaep_label"], m["batch"]["work_order"]);
    python_validate(&dir.join("manifest.json")).unwrap();
    let (root, key) = (cell.path("root-ca.pem"), cell.path("utility-key.pem"));
    let (code, out) = verify(&cell, &dir.join("manifest.p7m"), &root);
    assert_eq!(code, 0, "{out}");
    let dest = cell.path("keys");
    let (code, out) = import_files(&cell, &dir.join("manifest.p7m"), &key, &dest);
    assert_eq!(code, 0, "{out}");
    // OpenSSL, following the documented recipe, unwraps it with the label.
    let run = run_recipe(cell.dir.path(), &dir, &root, &key, None);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .lines()
            .any(|l| l == "transport key: unwrapped, kcv ok"),
        "{}",
        run.stdout
    );

    // A label that is not the work order is refused by every verifier; a transport key moved
    // into another work order's manifest (label and work order both renamed) does not unwrap.
    let engine = cell.engine(false).await;
    let relabelled = resigned(&engine, &dir, &cell.path("relabelled"), |m| {
        m["transport_key"]["oaep_label"] = "WO-ELSEWHERE".into();
    });
    let (code, out) = verify(&cell, &relabelled, &root);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("transport_key.oaep_label \"WO-ELSEWHERE\" is not the batch's work order"),
        "{out}"
    );
    let run = run_recipe(
        cell.dir.path(),
        relabelled.parent().unwrap(),
        &root,
        &key,
        None,
    );
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stderr
            .contains("transport key: its OAEP label is not the batch's work order"),
        "{}",
        run.stderr
    );
    let moved = resigned(&engine, &dir, &cell.path("moved"), |m| {
        m["transport_key"]["oaep_label"] = "WO-ELSEWHERE".into();
        m["batch"]["work_order"] = "WO-ELSEWHERE".into();
    });
    let (code, out) = verify(&cell, &moved, &root);
    assert_eq!(code, 0, "{out}");
    let (code, out) = import_files(&cell, &moved, &key, &cell.path("moved-keys"));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("the batch transport key does not unwrap with this key"),
        "{out}"
    );
    assert!(!cell.path("moved-keys").exists() || files_in(&cell.path("moved-keys")).is_empty());
    let run = run_recipe(cell.dir.path(), moved.parent().unwrap(), &root, &key, None);
    assert_ne!(run.code, 0, "{}", run.stdout);
    assert!(
        !run.stdout.contains("transport key: unwrapped"),
        "{}",
        run.stdout
    );
    let warned: i64 = cell
        .db()
        .query_row(
            "SELECT COUNT(*) FROM audit WHERE kind = 'security.untrusted_wrap'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(warned >= 1);
    // Kryoptic derives with CKD_SHA256_KDF and the meters offer it: the X9.63 key transport.
    assert_eq!(key_transports(&cell), ["x963"]);
}

/// A Kryoptic cell's manifest (its transport key wrapped with the work order as the OAEP
/// label) imported into the utility's own Kryoptic token, with `manifest import` — the labelled
/// unwrap in a second token — into token objects and into a key store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kryoptic_cells_manifest_imports_into_a_kryoptic_utility_token() {
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 2,
        open_batch: false,
        kryoptic: true,
        ..CellOptions::default()
    })
    .await;
    let token = hsm::testkit::TestToken::kryoptic("util").unwrap();
    let util = token.open(1).unwrap();
    let spki = util
        .run(|s| {
            s.generate_rsa_keypair(3072, "utility-transport")?
                .spki_der()
        })
        .await
        .unwrap();
    let batch = batch_for(&cell, "util-kry", utility_certificate(&spki), "WO-KRY-1", 2).await;
    let dir = finish_and_export(&cell, batch).await;
    let m = manifest(&dir);
    assert_eq!(m["transport_key"]["oaep_label"], "WO-KRY-1");
    let pin = cell.path("kry.pin");
    station::demo::write_secret(&pin, hsm::testkit::USER_PIN).unwrap();
    let module = hsm::testkit::kryoptic_module().unwrap();
    let p7m = dir.join("manifest.p7m");
    let root = cell.path("root-ca.pem");
    let store = cell.path("kry.store");
    for extra in [vec![], vec!["--store", s(&store)]] {
        let mut args = vec![
            "manifest",
            "import",
            s(&p7m),
            "--root",
            s(&root),
            "--pkcs11-module",
            s(&module),
            "--token",
            &token.label,
            "--token-pin-file",
            s(&pin),
        ];
        args.extend(extra);
        let (code, o, e) = cell.run(None, &args);
        assert_eq!(code, 0, "{o}{e}");
        assert!(o.contains("imported 8 key(s) of 2 meter(s)"), "{o}");
    }
    let mut labels = secret_keys(&util).await;
    labels.retain(|l| l != "utility-key-store");
    assert_eq!(labels.len(), 8, "{labels:?}");
}

/// The key transports the cell's provisioned meters used (line protocol 5.3), distinct.
fn key_transports(cell: &Cell) -> Vec<String> {
    let db = cell.db();
    let mut stmt = db
        .prepare("SELECT DISTINCT json_extract(details, '$.key_transport') FROM audit WHERE kind = 'meter.provisioned'")
        .unwrap();
    let v: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    v
}

// ----- HSMs that differ from SoftHSM --------------------------------------------------------

/// A whole batch on SoftHSM made to behave like another HSM: it completes, and the manifest
/// verifies.
async fn a_batch_completes_on(quirks: &'static str) -> Cell {
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 3,
        quirks: Some(quirks),
        ..CellOptions::default()
    })
    .await;
    let dir = finish_and_export(&cell, cell.batch_id.unwrap()).await;
    assert_eq!(meters(&manifest(&dir)).len(), 3, "{quirks}");
    let (code, out) = verify(&cell, &dir.join("manifest.p7m"), &cell.path("root-ca.pem"));
    assert_eq!(code, 0, "{quirks}: {out}");
    cell
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_completes_where_rfc_5649_is_only_0x210b() {
    let cell = a_batch_completes_on("kwp-at-210b").await;
    // SoftHSM derives with the null KDF only: the AES-ECB key transport.
    assert_eq!(key_transports(&cell), ["aes-ecb"]);
}

/// A FIPS-mode HSM (the null KDF refused, CKD_SHA256_KDF offered): the batch completes with the
/// X9.63 key transport. (Before: no key transport, every meter failed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_completes_on_a_fips_token_with_the_x963_key_transport() {
    let cell = a_batch_completes_on("no-null-kdf,x963-kdf").await;
    assert_eq!(key_transports(&cell), ["x963"]);
}

/// A cloud HSM (no CKM_AES_ECB_ENCRYPT_DATA): the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_completes_on_a_token_without_ecb_encrypt_data() {
    let cell = a_batch_completes_on("no-ecb-encrypt-data,x963-kdf").await;
    assert_eq!(key_transports(&cell), ["x963"]);
}

/// On such an HSM, a meter that knows only the AES-ECB key transport is refused with that
/// reason before any key is made for it; the line goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meter_without_the_x963_key_transport_is_refused_on_a_fips_token() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        quirks: Some("no-null-kdf,x963-kdf"),
        meters_without_x963: true,
        ..CellOptions::default()
    })
    .await;
    // The meters keep coming and each is refused: the first refusal.
    let reason = e2e::first_stopped_meter(&cell).await;
    assert!(
        reason.contains(
            "the meter offers only the AES-ECB key transport, which this HSM cannot derive"
        ),
        "{reason}"
    );
    let keys: i64 = cell
        .db()
        .query_row("SELECT COUNT(*) FROM wrapped_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(keys, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_completes_on_a_token_without_check_values() {
    a_batch_completes_on("no-check-value").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_completes_through_transient_device_errors() {
    a_batch_completes_on("device-error-every=5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_completes_on_a_token_of_few_sessions() {
    // The cell asks for a pool of 4; the token allows 3 sessions.
    a_batch_completes_on("sessions=3").await;
}

/// Tokens unfit for a cell — no key transport of the line protocol, no random number
/// generator, no log-in required: the cell refuses to start, naming what is wrong, before any
/// meter — not at the first meter with the line stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_unfit_for_a_cell_is_refused_at_start_with_every_finding() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        ..CellOptions::default()
    })
    .await;
    let config = std::fs::read_to_string(&cell.config).unwrap();
    for (quirks, says) in [
        (
            "no-ecb-encrypt-data",
            "FAIL  key transport: neither key transport of the line protocol works on this token — AES-ECB: the token does not offer CKM_AES_ECB_ENCRYPT_DATA",
        ),
        (
            "no-null-kdf",
            "FAIL  key transport: neither key transport of the line protocol works on this token — AES-ECB: the token does not offer CKM_ECDH1_DERIVE with the null KDF",
        ),
        (
            "no-rng",
            "FAIL  token flags: the token has no random number generator (no CKF_RNG)",
        ),
        (
            "no-login-required",
            "FAIL  token flags: the token needs no log-in (no CKF_LOGIN_REQUIRED)",
        ),
        (
            "always-authenticate",
            "CKA_ALWAYS_AUTHENTICATE is true: the token wants a log-in before every use",
        ),
        (
            "no-session-objects",
            "cannot hold a cell: it keeps no session objects",
        ),
    ] {
        let module = hsm::testkit::quirks_module(quirks).unwrap();
        let line = config.lines().find(|l| l.starts_with("module = ")).unwrap();
        std::fs::write(
            &cell.config,
            config.replace(line, &format!("module = \"{}\"", module.display())),
        )
        .unwrap();
        let before: i64 = cell
            .db()
            .query_row("SELECT COUNT(*) FROM meters", [], |r| r.get(0))
            .unwrap();
        let cfg = station::config::Config::load(&cell.config).unwrap();
        let e = Engine::open(
            cfg,
            station::OpenOptions {
                source: "test".into(),
                nests: true,
            },
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{quirks}: the cell started"));
        let text = e.to_string();
        assert!(text.contains(says), "{quirks}: {text}");
        if quirks == "no-session-objects" {
            // Refused when the HSM opens, before the journal is touched.
            continue;
        }
        assert!(
            text.contains("the HSM failed its self-test; nothing was started"),
            "{text}"
        );
        assert!(
            text.contains("  signing keys: ") && text.contains("  rsa-oaep: "),
            "every finding is shown: {text}"
        );
        let after: i64 = cell
            .db()
            .query_row("SELECT COUNT(*) FROM meters", [], |r| r.get(0))
            .unwrap();
        assert_eq!(before, after);
        let failed: i64 = cell
            .db()
            .query_row(
                "SELECT COUNT(*) FROM audit WHERE kind = 'hsm.self_test' AND json_extract(details, '$.passed') = 0",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            failed >= 1,
            "{quirks}: the failed self-test is in the audit log"
        );
    }
}

/// The utility's side of the PSKC container, with tools we did not write: `cryptography`
/// unwraps the transport key from the manifest with the utility's RSA key (RSA-OAEP), and
/// `python-pskc` opens `keys.pskc` with it. Prints every key's id, device serial and check value,
/// or the error opening it gave.
const PSKC_READER: &str = r#"
import base64, json, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pskc import PSKC

manifest, pskc_file, key_file = sys.argv[1], sys.argv[2], sys.argv[3]
m = json.load(open(manifest))
tk = m["transport_key"]
h = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}[tk["oaep_hash"].replace("-", "").lower()]
priv = serialization.load_pem_private_key(open(key_file, "rb").read(), None)
transport = priv.decrypt(base64.b64decode(tk["wrapped"]), padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None))
def kcv(k):
    e = Cipher(algorithms.AES(k), modes.ECB()).encryptor()
    return (e.update(bytes(16)) + e.finalize())[:3].hex()
p = PSKC(pskc_file)
out = {"key_name": p.encryption.key_name, "keys": []}
p.encryption.key = transport
try:
    for k in p.keys:
        out["keys"].append([k.id, k.serial, k.manufacturer, k.model, kcv(k.secret)])
except Exception as e:
    out["error"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_pskc_opens_the_pskc_export_and_a_flipped_byte_fails_there_and_in_verify() {
    let (cell, dir) = exported(2).await;
    let m = manifest(&dir);
    let pskc = &m["pskc"];
    assert_eq!(pskc["file"], "keys.pskc", "{pskc}");
    let script = cell.path("pskc_reader.py");
    std::fs::write(&script, PSKC_READER).unwrap();
    let python = std::env::var("CELL_PYTHON").unwrap_or_else(|_| "python3".into());
    let read = |file: &Path| -> Value {
        let out = Command::new(&python)
            .arg(&script)
            .arg(dir.join("manifest.json"))
            .arg(file)
            .arg(cell.path("utility-key.pem"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the PSKC reader failed (python-pskc missing? run through `cargo xtask test`): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let seen = read(&dir.join("keys.pskc"));
    assert!(seen.get("error").is_none(), "{seen}");
    assert_eq!(seen["key_name"], pskc["transport_key_name"]);
    // Every key of every meter, its check value the manifest's.
    let mut want = Vec::new();
    for meter in meters(&m) {
        for k in meter["keys"].as_array().unwrap() {
            want.push(serde_json::json!([
                format!(
                    "{}:{}",
                    text(meter, "system_title"),
                    k["id"].as_str().unwrap()
                ),
                text(meter, "serial"),
                text(&m["manufacturer"], "name"),
                text(meter, "model"),
                k["kcv"],
            ]));
        }
    }
    assert_eq!(want.len(), 2 * KEY_IDS.len());
    assert_eq!(seen["keys"], Value::Array(want), "{seen}");
    // The manifest's verification checks the container's hash.
    let root = cell.path("root-ca.pem");
    let (code, out) = verify(&cell, &dir.join("manifest.p7m"), &root);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("keys.pskc: its SHA-256 matches the manifest"),
        "{out}"
    );

    // One byte of one wrapped key changed: python-pskc's unwrap fails its integrity check, and
    // the manifest's verification names the container.
    let text_ = std::fs::read_to_string(dir.join("keys.pskc")).unwrap();
    let at = text_.find("<xenc:CipherValue>").unwrap() + "<xenc:CipherValue>".len() + 4;
    let mut bytes = text_.into_bytes();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    std::fs::write(dir.join("keys.pskc"), &bytes).unwrap();
    let seen = read(&dir.join("keys.pskc"));
    assert!(
        seen["error"]
            .as_str()
            .is_some_and(|e| e.contains("Decryption")),
        "{seen}"
    );
    let (code, out) = verify(&cell, &dir.join("manifest.p7m"), &root);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("keys.pskc has SHA-256") && out.contains("was changed"),
        "{out}"
    );
}
