//! The session pool survives HSM hiccups: a re-initialised library, a finalised library, a
//! logout behind its back, and all of that while many tasks are signing.
//!
//! A separate test binary because these tests finalise the PKCS#11 library of the whole
//! process; within it they run one at a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags};
use cryptoki::error::{Error as CkError, RvError};
use hsm::{AesKeySize, Curve, Error, KeyRole};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn finalize() {
    hsm::testkit::pkcs11().unwrap().finalize().unwrap();
}

fn initialize() {
    match hsm::testkit::pkcs11()
        .unwrap()
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
    {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
}

fn verifies(point: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    use signature::Verifier;
    p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
        .unwrap()
        .verify(msg, &p256::ecdsa::DerSignature::from_bytes(sig).unwrap())
        .is_ok()
}

#[test]
fn pool_recovers_after_the_library_is_reinitialised() {
    let _g = serial();
    let (_t, hsm) = util::token("reinit", 3);
    let pair = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::StationIdentity, Curve::P256, None))
        .unwrap();
    let meter_key = hsm
        .with_session(|s| s.generate_aes_key(KeyRole::MeterGuek, AesKeySize::Aes128, None))
        .unwrap();
    assert!(verifies(
        &pair.point,
        b"before",
        &hsm.with_session(|s| s.sign(&pair.private, b"before"))
            .unwrap()
    ));

    finalize();
    initialize();

    // The token key is found again by label; the pool re-opened and logged in.
    let sig = hsm
        .with_session(|s| s.sign(&pair.private, b"after"))
        .unwrap();
    assert!(verifies(&pair.point, b"after", &sig));
    assert!(hsm.generation() >= 1, "a new generation began");
    // The session object died with its session, and says so.
    let e = hsm.with_session(|s| s.kcv(&meter_key)).unwrap_err();
    assert!(matches!(e, Error::SessionObjectLost), "{e}");
    // New session objects work.
    let k = hsm
        .with_session(|s| s.generate_aes_key(KeyRole::MeterGuek, AesKeySize::Aes128, None))
        .unwrap();
    hsm.with_session(|s| s.kcv(&k)).unwrap();
}

#[test]
fn pool_initialises_a_finalised_library_itself() {
    let _g = serial();
    let (_t, hsm) = util::token("final", 2);
    let pair = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::ManifestSigner, Curve::P256, None))
        .unwrap();
    finalize();
    let sig = hsm.with_session(|s| s.sign(&pair.private, b"m")).unwrap();
    assert!(verifies(&pair.point, b"m", &sig));
    assert!(hsm.generation() >= 1);
}

#[test]
fn pool_logs_in_again_after_a_logout_behind_its_back() {
    let _g = serial();
    let (_t, hsm) = util::token("logout", 2);
    let pair = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::AuditSigner, Curve::P256, None))
        .unwrap();
    hsm.with_session(|s| {
        let raw = s.raw_session_for_tests();
        raw.logout().unwrap();
        let refused = raw.sign(
            &cryptoki::mechanism::Mechanism::Ecdsa,
            pair.private.raw_handle_for_tests(),
            &[1u8; 32],
        );
        assert!(refused.is_err(), "the logout took effect");
        Ok(())
    })
    .unwrap();
    let sig = hsm.with_session(|s| s.sign(&pair.private, b"m")).unwrap();
    assert!(verifies(&pair.point, b"m", &sig));
    assert!(hsm.generation() >= 1, "the pool noticed and repaired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The guard serialises whole tests (they finalise the library); holding it across awaits is the
// point, and no other task of this test takes it.
#[allow(clippy::await_holding_lock)]
async fn signing_tasks_survive_a_reinitialisation_mid_run() {
    let _g = serial();
    let t = hsm::testkit::TestToken::new("load").unwrap();
    // Every call after the first of its kind runs in place, however slow this build signs: the
    // lost sessions are met there too.
    let hsm = hsm::Hsm::open(&hsm::HsmConfig {
        in_place_below: std::time::Duration::from_secs(5),
        ..t.config(4)
    })
    .unwrap();
    let pair = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::StationIdentity, Curve::P256, None))
        .unwrap();
    const TASKS: usize = 12;
    const SIGNS: usize = 40;
    // All tasks pause half-way (PKCS#11 forbids C_Finalize while other threads are inside the
    // library), the library is re-initialised, and they carry on with sessions that are all gone.
    let halfway = Arc::new(tokio::sync::Barrier::new(TASKS + 1));
    let resume = Arc::new(tokio::sync::Barrier::new(TASKS + 1));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (hsm, key, halfway, resume) = (
            hsm.clone(),
            pair.private.clone(),
            halfway.clone(),
            resume.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..SIGNS {
                if i == SIGNS / 2 {
                    halfway.wait().await;
                    resume.wait().await;
                }
                let msg = format!("{t}/{i}").into_bytes();
                let (k, m) = (key.clone(), msg.clone());
                out.push((msg, hsm.run(move |s| s.sign(&k, &m)).await.unwrap()));
            }
            out
        }));
    }
    halfway.wait().await;
    let before = hsm.generation();
    tokio::task::spawn_blocking(|| {
        finalize();
        initialize();
    })
    .await
    .unwrap();
    resume.wait().await;
    let mut n = 0;
    for t in tasks {
        for (msg, sig) in t.await.unwrap() {
            assert!(verifies(&pair.point, &msg, &sig));
            n += 1;
        }
    }
    assert_eq!(n, TASKS * SIGNS);
    assert_eq!(hsm.generation(), before + 1, "one repair served every task");
    // Calls that met the lost sessions in place went the long way and recovered.
    assert!(hsm.calls_in_place() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Held across awaits on purpose: the other tests of this binary finalise the library.
#[allow(clippy::await_holding_lock)]
async fn only_calls_that_have_been_short_run_in_place() {
    let _g = serial();
    let (_t, hsm) = util::token("inplace", 2);
    let pair = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::StationIdentity, Curve::P256, None))
        .unwrap();
    // A kind of call that takes milliseconds (a slow HSM) never blocks a worker in place.
    for _ in 0..10 {
        let k = pair.private.clone();
        hsm.run(move |s| {
            std::thread::sleep(std::time::Duration::from_millis(3));
            s.sign(&k, b"slow")
        })
        .await
        .unwrap();
    }
    assert_eq!(hsm.calls_in_place(), 0);
    // A kind that takes microseconds runs in place once it has shown that it is short (a call
    // the scheduler happened to slow down only delays that).
    for _ in 0..100 {
        hsm.run(|s| Ok(s.mechanisms().rsa_oaep.is_some()))
            .await
            .unwrap();
    }
    assert!(hsm.calls_in_place() > 0);
}

/// The same recovery on Kryoptic: the library finalised and initialised behind the pool's back,
/// its token (kept in SQLite) found again by label, the pool logged in again.
#[test]
fn on_kryoptic_the_pool_recovers_after_the_library_is_reinitialised() {
    let _g = serial();
    let t = hsm::testkit::TestToken::kryoptic("reinit").unwrap();
    let hsm = t.open(2).unwrap();
    let pair = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::ManifestSigner, Curve::P256, None))
        .unwrap();
    let before = hsm.with_session(|s| s.sign(&pair.private, b"k1")).unwrap();
    assert!(verifies(&pair.point, b"k1", &before));
    let ctx = hsm::context::shared(&t.module).unwrap();
    ctx.clone().finalize().unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("{e}"),
    }
    let after = hsm.with_session(|s| s.sign(&pair.private, b"k2")).unwrap();
    assert!(verifies(&pair.point, b"k2", &after));
    assert!(hsm.generation() >= 1, "a new generation began");
}
