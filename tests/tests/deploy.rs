//! The service unit `stationd` is installed with (`deploy/stationd.service`), checked by systemd's
//! own tools: it loads (`systemd-analyze verify`, with its ExecStart pointed at the daemon this
//! build made) and its hardening keeps the exposure `systemd-analyze security` reports at 2.5 or
//! below ("OK"), so that an option dropped by mistake fails here.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::path::Path;
use std::process::Command;

fn unit() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stationd.service");
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn the_service_unit_loads_and_stays_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let text = unit();
    assert!(
        text.contains("ExecStart=/usr/bin/stationd --config /etc/station/station.toml"),
        "the unit starts the daemon with the documented configuration"
    );
    for option in [
        "User=stationd",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "UMask=0077",
        "LimitCORE=0",
        "KillSignal=SIGTERM",
    ] {
        assert!(text.contains(option), "{option} is missing");
    }
    let exe = e2e::stationd_exe();
    let local = dir.path().join("stationd.service");
    std::fs::write(
        &local,
        text.replace("/usr/bin/stationd", exe.to_str().unwrap()),
    )
    .unwrap();
    let analyze = |args: &[&str]| {
        Command::new("systemd-analyze")
            .args(args)
            .arg(&local)
            .output()
            .expect("systemd-analyze (Debian's systemd; `cargo xtask test` installs it)")
    };
    let out = analyze(&["verify"]);
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = analyze(&["security", "--offline=yes", "--threshold=25", "--no-pager"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exposure above 2.5: {text}");
    let level = text
        .lines()
        .find_map(|l| l.split("exposure level for stationd.service: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .expect("the exposure level");
    assert!(level <= 2.5, "{level}");
}
