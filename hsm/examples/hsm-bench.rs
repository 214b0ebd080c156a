//! Throughput of the hsm crate on a temporary SoftHSM token and a temporary Kryoptic token.
//!
//! `cargo run --release -p hsm --example hsm-bench` prints one JSON object per line:
//! `{"token": ..., "op": ..., "tasks": N, "ops_per_s": F}` for `sign` (ECDSA P-256), `keygen` (session key
//! pair), `issue_cert` (request check + build + HSM signature + parse back and verify) and
//! `secret_key` (AES key generation + AES-KW under a KTK + AES-KW under a batch transport key).
//! `issue_cert` lines say where signatures were verified (`"verify": "software"` or `"token"`,
//! see `hsm::cert::Verification`).
//! The `sign` lines also carry `overhead_ratio`: the rate of the same loop written directly on
//! `cryptoki` (one session per thread), measured in the same run, divided by ours: the two run in
//! alternating rounds and the line gives the medians, so that the machine's other load does not
//! decide the ratio.
//!
//! Figures, not a test: nothing here asserts a goal.

// A benchmark tool: a failed set-up step should stop it with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use hsm::cert::{Issuer, MeterKeyUsage, MeterProfile, Verification, issue_meter_certificate};
use hsm::{AesKeySize, Curve, Hsm, KeyRole, WrapAlg};
use p256::elliptic_curve::sec1::ToSec1Point;
use sha2::Digest;

const RUN: Duration = Duration::from_secs(2);
const POOL: usize = 4;
/// The sign comparison: rounds, and the time each side runs in a round.
const SIGN_ROUNDS: usize = 7;
const SIGN_ROUND: Duration = Duration::from_millis(600);

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn line(token: &str, op: &str, tasks: usize, rate: f64, ratio: Option<f64>) {
    match ratio {
        Some(r) => println!(
            r#"{{"token": "{token}", "op": "{op}", "tasks": {tasks}, "ops_per_s": {rate:.0}, "overhead_ratio": {r:.3}}}"#
        ),
        None => println!(
            r#"{{"token": "{token}", "op": "{op}", "tasks": {tasks}, "ops_per_s": {rate:.0}}}"#
        ),
    }
}

/// Runs `tasks` tokio tasks, each calling `op` in a loop for `RUN`; returns operations/s.
async fn measure<F, Fut>(tasks: usize, op: F) -> f64
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send,
{
    measure_for(tasks, RUN, op).await
}

/// [`measure`] for `run` instead of `RUN`.
async fn measure_for<F, Fut>(tasks: usize, run: Duration, op: F) -> f64
where
    F: Fn(u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + Send,
{
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let op = op.clone();
        handles.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < run {
                op((t as u64) << 32 | n).await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// The same signing loop directly on cryptoki: `threads` threads, one session each.
fn direct_sign(module: &std::path::Path, label: &str, threads: usize, run: Duration) -> f64 {
    let ctx = hsm::context::shared(module).unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == label)
        .unwrap();
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let ctx = ctx.clone();
            std::thread::spawn(move || {
                let session = ctx.open_rw_session(slot).unwrap();
                let key = session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Label(b"station".to_vec()),
                    ])
                    .unwrap()[0];
                let mut n = 0u64;
                while start.elapsed() < run {
                    // The same message as ours: the 8-byte counter.
                    let msg = ((t as u64) << 32 | n).to_le_bytes();
                    let digest = sha2::Sha256::digest(msg);
                    let raw = session.sign(&Mechanism::Ecdsa, key, &digest).unwrap();
                    let der = p256::ecdsa::Signature::from_slice(&raw).unwrap().to_der();
                    std::hint::black_box(der);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total as f64 / start.elapsed().as_secs_f64()
}

/// A meter's key in software, to make requests with.
struct SoftKey(p256::ecdsa::SigningKey, Vec<u8>);

impl rcgen::PublicKeyData for SoftKey {
    fn der_bytes(&self) -> &[u8] {
        &self.1
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for SoftKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        use signature::Signer;
        let s: p256::ecdsa::DerSignature = self.0.sign(msg);
        Ok(s.as_bytes().to_vec())
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    bench("softhsm", hsm::testkit::TestToken::new("bench").unwrap()).await;
    bench(
        "kryoptic",
        hsm::testkit::TestToken::kryoptic("bench").unwrap(),
    )
    .await;
}

async fn bench(name: &str, token: hsm::testkit::TestToken) {
    let hsm: Hsm = token.open(POOL).unwrap();
    let out = std::env::temp_dir().join(format!("hsm-bench-{}", std::process::id()));
    hsm::pki::init_dev(&hsm, &out).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    let station = Arc::new(hsm.with_session(|s| s.find_ec_keypair("station")).unwrap());

    // sign: ours and the direct loop in alternating rounds, so that a change in the machine's
    // load hits both; the medians over the rounds are reported.
    for tasks in [1, POOL] {
        let mut rates = Vec::new();
        let mut ratios = Vec::new();
        for _ in 0..SIGN_ROUNDS {
            let (h, k) = (hsm.clone(), station.private.clone());
            let ours = measure_for(tasks, SIGN_ROUND, move |n| {
                let (h, k) = (h.clone(), k.clone());
                async move {
                    let msg = n.to_le_bytes();
                    h.run(move |s| s.sign(&k, &msg)).await.unwrap();
                }
            })
            .await;
            let (module, label) = (token.module.clone(), token.label.clone());
            let direct = tokio::task::spawn_blocking(move || {
                direct_sign(&module, &label, tasks, SIGN_ROUND)
            })
            .await
            .unwrap();
            rates.push(ours);
            ratios.push(direct / ours);
        }
        line(
            name,
            "sign",
            tasks,
            median(&mut rates),
            Some(median(&mut ratios)),
        );
    }

    // keygen: a session key pair, generated and destroyed
    for tasks in [1, POOL] {
        let h = hsm.clone();
        let rate = measure(tasks, move |_| {
            let h = h.clone();
            async move {
                h.run(|s| {
                    let p = s.generate_ec_keypair(KeyRole::MeterKeyPair, Curve::P256, None)?;
                    s.destroy(&p.private)?;
                    s.destroy(&p.public)
                })
                .await
                .unwrap();
            }
        })
        .await;
        line(name, "keygen", tasks, rate, None);
    }

    // issue_cert
    let ca = Arc::new(hsm.with_session(|s| Issuer::load(s, "device-ca")).unwrap());
    let sk = p256::ecdsa::SigningKey::from_slice(&sha2::Sha256::digest(b"bench meter")).unwrap();
    let point = sk.verifying_key().to_sec1_point(false).as_bytes().to_vec();
    let mut req = rcgen::CertificateParams::default();
    req.distinguished_name = rcgen::DistinguishedName::new();
    let csr = Arc::new(
        req.serialize_request(&SoftKey(sk, point))
            .unwrap()
            .der()
            .to_vec(),
    );
    let profile = Arc::new(MeterProfile {
        system_title: *b"MMM\x00\x00\x00\x00\x01",
        meter_serial: "B-0001".into(),
        manufacturer: "Demo Meter Works".into(),
        usage: MeterKeyUsage::DigitalSignature,
        curve: Curve::P256,
        not_after: None,
    });
    for (verification, tasks) in [
        (Verification::Software, 1),
        (Verification::Software, POOL),
        (Verification::Token, 1),
        (Verification::Token, POOL),
    ] {
        let ca = Arc::new((*ca).clone().with_verification(verification));
        let (h, ca, csr, profile) = (hsm.clone(), ca.clone(), csr.clone(), profile.clone());
        let rate = measure(tasks, move |_| {
            let (h, ca, csr, profile) = (h.clone(), ca.clone(), csr.clone(), profile.clone());
            async move {
                h.run(move |s| issue_meter_certificate(s, &ca, &csr, &profile))
                    .await
                    .unwrap();
            }
        })
        .await;
        let how = match verification {
            Verification::Software => "software",
            Verification::Token => "token",
        };
        println!(
            r#"{{"token": "{name}", "op": "issue_cert", "tasks": {tasks}, "ops_per_s": {rate:.0}, "verify": "{how}"}}"#
        );
    }

    // secret_key: generate + AES-KW under the KTK + AES-KW under the batch transport key
    let meter_pub = p256::SecretKey::from_slice(&sha2::Sha256::digest(b"meter eph"))
        .unwrap()
        .public_key()
        .to_sec1_point(false);
    let meter_pub: [u8; 65] = meter_pub.as_bytes().try_into().unwrap();
    let (ktk, tk) = hsm
        .with_session(|s| {
            let (kt, _) = s.generate_kt_keypair()?;
            let ktk = s.derive_ktk(&kt, &meter_pub, &[7u8; 32])?;
            let tk = s.generate_aes_key(
                KeyRole::BatchTransport,
                AesKeySize::Aes256,
                Some("batch-transport/bench"),
            )?;
            Ok((ktk, tk))
        })
        .unwrap();
    for tasks in [1, POOL] {
        let (h, ktk, tk) = (hsm.clone(), ktk.clone(), tk.clone());
        let rate = measure(tasks, move |_| {
            let (h, ktk, tk) = (h.clone(), ktk.clone(), tk.clone());
            async move {
                h.run(move |s| {
                    let k = s.generate_aes_key(KeyRole::MeterGuek, AesKeySize::Aes128, None)?;
                    let a = s.wrap(&ktk, &k, WrapAlg::AesKw)?;
                    let b = s.wrap(&tk, &k, WrapAlg::AesKw)?;
                    s.destroy(&k)?;
                    Ok((a, b))
                })
                .await
                .unwrap();
            }
        })
        .await;
        line(name, "secret_key", tasks, rate, None);
    }
}
