//! The cell both benchmarks start from: a SoftHSM token with the demo PKI under `DIR/pki`, the
//! demo utility, the HSM PIN in an owner-only file, and the head of a `station.toml` (station,
//! manufacturer, HSM, one meter model, audit) to which a benchmark adds its nests.

use std::path::{Path, PathBuf};

/// The cell's PKI directory and the head of its configuration.
#[allow(dead_code)] // not every benchmark needs the PKI directory
pub struct BenchCell {
    pub pki: PathBuf,
    pub conf_head: String,
}

pub async fn bench_cell(dir: &Path, station_id: &str, model: &str) -> BenchCell {
    let token = hsm::testkit::TestToken::new(station_id).unwrap();
    let softhsm_conf = hsm::testkit::dir().unwrap().join("softhsm2.conf");
    station::demo::write_secret(&dir.join("hsm-pin"), hsm::testkit::USER_PIN).unwrap();
    let h = token.open(2).unwrap();
    let pki = dir.join("pki");
    let p2 = pki.clone();
    tokio::task::spawn_blocking(move || hsm::pki::init_dev(&h, &p2))
        .await
        .unwrap()
        .unwrap();
    let d2 = dir.to_path_buf();
    let (utility, _) = tokio::task::spawn_blocking(move || station::demo::make_utility(&d2))
        .await
        .unwrap()
        .unwrap();
    // The token's security officer approves the utility's key before the cell opens the token.
    token
        .trust_customer("utility", &std::fs::read(utility).unwrap())
        .unwrap();
    let conf_head = format!(
        "station_id = \"{station_id}\"\ndatabase = \"station.db\"\n\n[manufacturer]\nname = \"{}\"\nflag_id = \"DMW\"\n\n\
         [hsm]\nmodule = \"{}\"\ntoken = \"{}\"\npin = {{ file = \"hsm-pin\" }}\nsofthsm_conf = \"{}\"\npool_size = 4\n\n\
         [[models]]\nname = \"{model}\"\nsuite = 1\nkeygen = \"meter\"\nkey_agreement = true\n\n[audit]\ncheckpoint_interval = 1000\n\n",
        hsm::pki::DEMO_ORGANIZATION,
        hsm::SOFTHSM_MODULE,
        token.label,
        softhsm_conf.display()
    );
    BenchCell { pki, conf_head }
}

/// The cell's people, all with `pin`, through the daemon: the officer (the cell's first), a
/// supervisor and an operator.
#[allow(dead_code)] // each benchmark uses one of the two
pub async fn add_users(client: &station::api::client::Client, pin: &str) {
    use station::auth::Role;
    client.bootstrap("officer", pin).await.unwrap();
    let officer = client.login("officer", pin).await.unwrap().session;
    for (name, role) in [("super", Role::Supervisor), ("oper", Role::Operator)] {
        client
            .execute(
                &officer,
                station::Command::AddUser {
                    name: name.into(),
                    role,
                    pin: zeroize::Zeroizing::new(pin.into()),
                },
            )
            .await
            .unwrap();
    }
    let _ = client.logout(&officer).await;
}

/// The same people on an engine opened in-process (the manifest benchmark builds its journal
/// directly); returns the officer's session.
#[allow(dead_code)] // each benchmark uses one of the two
pub async fn add_users_in_process(engine: &station::Engine, pin: &str) -> station::Session {
    use station::auth::Role;
    engine.bootstrap_admin("officer", pin).await.unwrap();
    let officer = engine.login("officer", pin).await.unwrap();
    for (name, role) in [("super", Role::Supervisor), ("oper", Role::Operator)] {
        engine
            .execute(
                &officer,
                station::Command::AddUser {
                    name: name.into(),
                    role,
                    pin: zeroize::Zeroizing::new(pin.into()),
                },
            )
            .await
            .unwrap();
    }
    officer
}
