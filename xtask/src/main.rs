//! `cargo xtask`: the project's own set-up and entry points, so that a fresh Debian machine with
//! only the Rust toolchain can run everything.
//!
//! Each command first installs what it needs when it is missing (Debian packages through
//! `apt-get`, `imgtool` and `jsonschema` from PyPI into a virtual environment under `target/`,
//! `cargo-nextest` from crates.io), idempotently and without questions, then builds and runs. It
//! depends on the standard library only, so it compiles in seconds.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  demo [ARGS...]        install what is missing, build, and run `station demo ARGS...`
                        (a whole batch on emulated meters with a real software HSM),
                        replacing the demo cell an earlier run left in demo-out/
  test                  install what is missing, then fmt check, cargo deny (licences,
                        bans, sources), clippy, every test (cargo nextest), the doc
                        tests, the HSM tests again under plain `cargo test`, and every
                        fuzz target for 30 s — what CI runs
  bench <what>          print benchmark figures as JSON lines; <what> is one of:
                        link, hsm, station, manifest, report (the evidence report
                        and the PSKC export of 20 000 meters), api, gui (the
                        console's screens and the OPC UA server's latency), opcua,
                        fleet, all
  screenshot [OUT.png]  start the touch console in demo mode under Xvfb and save a picture
  fuzz [TARGET|all] [SECS]
                        fuzz one target (or all) with libFuzzer on stable for SECS s
                        (default 60); seeds in fuzz/corpus/TARGET
  deps                  only install what is missing
";

/// Debian packages every command needs.
const BASE_PACKAGES: &[&str] = &[
    "gcc",
    "libc6-dev",
    "softhsm2",
    "opensc",
    "openssl",
    "python3",
    "python3-venv",
    "jq",
    // systemd-analyze checks the service unit of stationd.
    "systemd",
    // Kryoptic, the second PKCS#11 token of the tests, binds OpenSSL through bindgen.
    "libssl-dev",
    "libclang-dev",
    "pkg-config",
    // The factory registry's server (PostgreSQL) and psql, for its tests and benchmark.
    "postgresql",
    // `station report --pdf` prints with Chromium; the tests read the PDF with poppler's
    // pdftotext, render the report with Chromium and compare pictures with ImageMagick.
    "chromium",
    "poppler-utils",
    "fonts-dejavu-core",
    "imagemagick",
    // Moves a daemon's wall clock in the time-change test.
    "faketime",
];

/// Debian packages the console's tests and screenshot need (software rendering, a display).
const GUI_PACKAGES: &[&str] = &[
    "xvfb",
    "xauth",
    "libgl1-mesa-dri",
    "libegl1",
    "libgl1",
    "libxkbcommon-x11-0",
    "libx11-xcb1",
    "libxcursor1",
    "libxrandr2",
    "libxi6",
    "imagemagick",
    "matchbox-window-manager",
    "mesa-vulkan-drivers",
    "libvulkan1",
];

/// The MCUboot signing tool the tests use as an independent peer.
const IMGTOOL: &str = "imgtool==2.5.0";
/// The JSON Schema validator the tests check the schemas with (draft 2020-12), an independent
/// peer too; the tests find it through `CELL_PYTHON`.
const JSONSCHEMA: &str = "jsonschema>=4.18,<5";
/// A gRPC client we did not write, with the protobuf compiler that makes its stubs from
/// `schemas/station.proto` at test time.
const GRPCIO: [&str; 2] = ["grpcio>=1.60,<2", "grpcio-tools>=1.60,<2"];
/// A Modbus client we did not write: the tests play the line's PLC with it.
const PYMODBUS: &str = "pymodbus>=3.6,<4";
/// An OPC UA client we did not write: the tests play the MES with it.
const ASYNCUA: &str = "asyncua>=1.1,<2";
/// A PSKC (RFC 6030) reader we did not write: the tests open the key container with it.
const PSKC: &str = "python-pskc>=1.2,<2";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(&args[1..]),
        Some("test") => test(),
        Some("bench") => bench(args.get(1).map(String::as_str).unwrap_or("all")),
        Some("screenshot") => screenshot(args.get(1).map(String::as_str)),
        Some("fuzz") => fuzz(
            args.get(1).map(String::as_str),
            args.get(2).map(String::as_str),
        ),
        Some("deps") => deps(true).map(|_| ()),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    // A clean clone builds once: incremental caches only cost CI disk space (gigabytes).
    if env::var("CI").is_ok_and(|v| v == "true") {
        c.env("CARGO_INCREMENTAL", "0");
    }
    c
}

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {}", describe(cmd));
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {}: {e}", describe(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} failed ({status})", describe(cmd)))
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn have_command(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Installs the missing Debian packages among `pkgs`.
fn ensure_packages(pkgs: &[&str]) -> Result<(), String> {
    if !have_command("dpkg-query") {
        return Err(
            "this set-up needs a Debian-based system (dpkg-query not found); install \
                    softhsm2, opensc, openssl, jq, python3 and python3-venv by hand"
                .into(),
        );
    }
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let sudo: &[&str] = if is_root() {
        &[]
    } else if Command::new("sudo")
        .args(["-n", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        &["sudo", "-n"]
    } else {
        return Err(format!(
            "missing Debian packages and no root: run `sudo apt-get install -y {}`",
            missing.join(" ")
        ));
    };
    let apt = |args: &[&str]| {
        let mut all: Vec<&str> = sudo.to_vec();
        all.push("apt-get");
        all.extend_from_slice(args);
        let mut c = Command::new(all[0]);
        c.args(&all[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        c
    };
    run(&mut apt(&["update", "-qq"]))?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend_from_slice(&missing);
    run(&mut apt(&args))
}

/// `imgtool`, `jsonschema`, `grpcio`, `grpcio-tools`, `pymodbus`, `asyncua` and `python-pskc` in a virtual environment under
/// `target/xtask/venv`; returns the imgtool path (the environment's python is next to it).
fn ensure_imgtool() -> Result<PathBuf, String> {
    let venv = target_dir().join("xtask").join("venv");
    let bin = venv.join("bin");
    let imgtool = bin.join("imgtool");
    let has_jsonschema = || {
        Command::new(bin.join("python3"))
            .args([
                "-c",
                "import jsonschema, grpc, grpc_tools, pymodbus, asyncua, pskc",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if imgtool.exists() && has_jsonschema() {
        return Ok(imgtool);
    }
    eprintln!(
        "xtask: installing {IMGTOOL}, {JSONSCHEMA}, {PYMODBUS}, {ASYNCUA}, {PSKC} and {} from PyPI into {}",
        GRPCIO.join(", "),
        venv.display()
    );
    if !bin.join("pip").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run(Command::new(bin.join("pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            IMGTOOL,
            JSONSCHEMA,
            GRPCIO[0],
            GRPCIO[1],
            PYMODBUS,
            ASYNCUA,
            PSKC,
        ])
        .stdin(Stdio::null()))?;
    if imgtool.exists() && has_jsonschema() {
        Ok(imgtool)
    } else {
        Err(format!(
            "the Python tools were installed but {} or the jsonschema or grpc modules are missing",
            imgtool.display()
        ))
    }
}

fn ensure_nextest() -> Result<(), String> {
    let ok = cargo()
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-nextest from crates.io");
    run(cargo().args(["install", "--locked", "cargo-nextest"]))
}

/// Everything the tests and the demo need; returns the imgtool path.
fn deps(gui: bool) -> Result<PathBuf, String> {
    let mut pkgs: Vec<&str> = BASE_PACKAGES.to_vec();
    if gui {
        pkgs.extend_from_slice(GUI_PACKAGES);
    }
    ensure_packages(&pkgs)?;
    ensure_kryoptic()?;
    ensure_quirks()?;
    ensure_imgtool()
}

/// Where the test-only quirks module (SoftHSM behaving like other HSMs) is built.
fn quirks_lib() -> PathBuf {
    target_dir().join("debug").join("libhsm_quirks.so")
}

fn ensure_quirks() -> Result<(), String> {
    run(cargo().args(["build", "--locked", "--quiet", "-p", "hsm-quirks"]))
}

/// Where Kryoptic's PKCS#11 module is built.
fn kryoptic_module() -> PathBuf {
    target_dir()
        .join("kryoptic")
        .join("release")
        .join("libkryoptic_pkcs11.so")
}

/// Kryoptic, the second PKCS#11 implementation the tests use, built from crates.io (pinned in
/// tools/kryoptic) into target/kryoptic. Cargo makes it a no-op when nothing changed.
fn ensure_kryoptic() -> Result<(), String> {
    run(cargo()
        .args([
            "build",
            "--release",
            "--locked",
            "--quiet",
            "-p",
            "kryoptic",
        ])
        .arg("--manifest-path")
        .arg(root().join("tools").join("kryoptic").join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir().join("kryoptic")))
}

/// Environment for every test and benchmark run.
fn with_tool_env(cmd: &mut Command, imgtool: &Path) {
    cmd.env("IMGTOOL", imgtool);
    cmd.env("KRYOPTIC_MODULE", kryoptic_module());
    cmd.env("HSM_QUIRKS_LIB", quirks_lib());
    if let Some(dir) = imgtool.parent() {
        cmd.env("CELL_PYTHON", dir.join("python3"));
        let path = env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![dir.to_path_buf()];
        paths.extend(env::split_paths(&path));
        if let Ok(joined) = env::join_paths(paths) {
            cmd.env("PATH", joined);
        }
    }
}

/// cargo-deny, from crates.io (without its network features: licences, bans and sources are
/// checked from the lock file and the registry).
fn ensure_deny() -> Result<(), String> {
    let ok = cargo()
        .args(["deny", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deny from crates.io");
    run(cargo().args([
        "install",
        "--locked",
        "cargo-deny",
        "--version",
        "0.20.2",
        "--no-default-features",
    ]))
}

fn test() -> Result<(), String> {
    let imgtool = deps(true)?;
    ensure_nextest()?;
    ensure_deny()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // Errors only: the duplicate-version warnings (mostly the console's windowing stack) are for
    // `cargo deny check` by hand, not for every CI log.
    run(cargo().args([
        "deny",
        "--log-level",
        "error",
        "check",
        "licenses",
        "bans",
        "sources",
    ]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    // One registry server (PostgreSQL) for the whole run; each test makes a database in it.
    let registry = Registry::start()?;
    let mut nextest = cargo();
    nextest.args([
        "nextest",
        "run",
        "--workspace",
        "--all-targets",
        "--locked",
        "--no-fail-fast",
    ]);
    if env::var("CI").is_ok_and(|v| v == "true") {
        nextest.args(["--profile", "ci"]);
    }
    with_tool_env(&mut nextest, &imgtool);
    nextest.env("CELL_REGISTRY_DIR", &registry.dir);
    run(&mut nextest)?;
    drop(registry);
    let mut doc = cargo();
    doc.args(["test", "--workspace", "--doc", "--locked"]);
    with_tool_env(&mut doc, &imgtool);
    run(&mut doc)?;
    // The HSM crate's tests under plain `cargo test` as well: many tests in one process share
    // one initialised PKCS#11 library (nextest gives each test a process of its own).
    let mut plain = cargo();
    plain.args(["test", "--locked", "-p", "hsm", "--tests"]);
    with_tool_env(&mut plain, &imgtool);
    run(&mut plain)?;
    // Every parser of outside input under libFuzzer, for a bounded time each.
    fuzz(Some("all"), Some(FUZZ_SECS_IN_TEST))
}

/// The tests' registry server: the `e2e-registry` binary of the test package, which serves a
/// PostgreSQL cluster in a directory of its own until its standard input closes (when this is
/// dropped, or when xtask ends however it ends).
struct Registry {
    child: std::process::Child,
    dir: String,
}

impl Registry {
    fn start() -> Result<Registry, String> {
        use std::io::BufRead;
        run(cargo().args([
            "build",
            "--locked",
            "--quiet",
            "-p",
            "e2e",
            "--bin",
            "e2e-registry",
        ]))?;
        let exe = target_dir().join("debug").join("e2e-registry");
        let mut child = Command::new(&exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let out = child.stdout.take().ok_or("e2e-registry: no output")?;
        let mut lines = std::io::BufReader::new(out).lines();
        match lines.next() {
            Some(Ok(l)) if l.starts_with("ready ") => {
                let dir = l.trim_start_matches("ready ").to_string();
                eprintln!("xtask: the registry server for this run is in {dir}");
                Ok(Registry { child, dir })
            }
            other => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("the registry server did not start: {other:?}"))
            }
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SECS_IN_TEST: &str = "30";

fn demo(args: &[String]) -> Result<(), String> {
    let imgtool = deps(false)?;
    run(cargo().args(["build", "--release", "--locked", "-p", "station"]))?;
    let mut station = Command::new(target_dir().join("release").join("station"));
    station.arg("demo").args(args).current_dir(root());
    // Run after run, the demo replaces the one before it (only a directory that an earlier demo
    // made and marked is ever removed).
    if !args.iter().any(|a| a == "--force") {
        station.arg("--force");
    }
    with_tool_env(&mut station, &imgtool);
    run(&mut station)
}

fn bench(what: &str) -> Result<(), String> {
    let imgtool = deps(what == "gui" || what == "all")?;
    let all = [
        "link", "hsm", "station", "manifest", "report", "api", "gui", "opcua", "fleet",
    ];
    let list: Vec<&str> = match what {
        "all" => all.to_vec(),
        // The floor's figures: the console's dashboards and the OPC UA server's latency.
        "gui" => vec!["gui", "opcua"],
        _ => vec![what],
    };
    for w in list {
        let (pkg, example) = match w {
            "link" => ("meter-sim", "link-bench"),
            "hsm" => ("hsm", "hsm-bench"),
            "station" => ("station", "station-bench"),
            "manifest" | "report" => ("station", "manifest-bench"),
            "api" => ("station", "api-bench"),
            "gui" => ("gui", "gui-bench"),
            // The OPC UA server's part of the floor's figures, measured after the console's.
            "opcua" => {
                // The station tool the cell's set-up runs, beside the benchmark's binary.
                run(cargo().args([
                    "build",
                    "--release",
                    "--locked",
                    "--quiet",
                    "-p",
                    "e2e",
                    "--bins",
                ]))?;
                ("e2e", "opcua-bench")
            }
            "fleet" => {
                // Its registry server, beside the benchmark's binary.
                run(cargo().args([
                    "build",
                    "--release",
                    "--locked",
                    "--quiet",
                    "-p",
                    "e2e",
                    "--bin",
                    "e2e-registry",
                ]))?;
                ("e2e", "fleet-bench")
            }
            other => {
                return Err(format!(
                    "unknown benchmark {other:?}: link, hsm, station, manifest, report, api, gui, opcua, fleet or all"
                ));
            }
        };
        let mut c = cargo();
        c.args([
            "run",
            "--quiet",
            "--release",
            "--locked",
            "-p",
            pkg,
            "--example",
            example,
        ]);
        // The report's benchmark is the manifest's, with the audit entries and the report.
        if w == "report" {
            c.arg("--").arg("report");
        }
        with_tool_env(&mut c, &imgtool);
        if w == "gui" {
            c.env("XTASK_GUI_BENCH", "1");
        }
        run(&mut c)?;
    }
    Ok(())
}

fn screenshot(out: Option<&str>) -> Result<(), String> {
    deps(true)?;
    let out = out
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("docs").join("console.png"));
    run(cargo().args(["build", "--release", "--locked", "-p", "gui"]))?;
    let gui = target_dir().join("release").join("station-gui");
    // A running demo line (the demo operator logged in, the line started) with one meter that
    // reports a wrong firmware hash, so the picture shows BUSY, PASS and an alarm. The console
    // must still be running when the picture is taken, or the script fails with its log.
    let script = format!(
        "matchbox-window-manager -use_titlebar no >/dev/null 2>&1 & \
         WORK=$(mktemp -d); \
         {gui} --demo --kiosk --demo-run --meters 60 --fault 2:wrong-hash --demo-out \"$WORK/cell\" \
           >\"$WORK/gui.log\" 2>&1 & PID=$!; \
         sleep 25; \
         if ! kill -0 $PID 2>/dev/null; then cat \"$WORK/gui.log\" >&2; rm -rf \"$WORK\"; exit 1; fi; \
         import -window root {out}; STATUS=$?; \
         kill $PID; wait $PID 2>/dev/null; rm -rf \"$WORK\"; exit $STATUS",
        gui = gui.display(),
        out = out.display()
    );
    run(Command::new("xvfb-run")
        .args(["-a", "-s", "-screen 0 1920x1080x24", "sh", "-c", &script])
        .current_dir(root()))?;
    eprintln!("xtask: saved {}", out.display());
    Ok(())
}

/// Every fuzz target (`fuzz/fuzz_targets/<name>.rs`).
const FUZZ_TARGETS: [&str; 14] = [
    "frame_decoder",
    "message",
    "meter_input",
    "meter_secure",
    "host_input",
    "image",
    "receipt",
    "station_chain",
    "csr",
    "manifest_envelope",
    "manifest_content",
    "config",
    "api_message",
    "registry_answer",
];

/// Coverage-guided fuzzing with libFuzzer on the stable toolchain: the `fuzz/` crate built with
/// LLVM's sanitizer-coverage passes (for the explicit target triple, so that the flags stay off
/// build scripts), then each target run for `secs` seconds over its seed corpus in
/// `fuzz/corpus/<target>` (read only) and a working corpus under `target/fuzz/`. A crash is
/// saved under `target/fuzz/artifacts/` and fails the run.
fn fuzz(target: Option<&str>, secs: Option<&str>) -> Result<(), String> {
    let secs: u32 = secs
        .unwrap_or("60")
        .parse()
        .map_err(|_| "fuzz: SECS is a number of seconds".to_string())?;
    let targets: Vec<&str> = match target {
        None | Some("all") => FUZZ_TARGETS.to_vec(),
        Some(t) if FUZZ_TARGETS.contains(&t) => vec![t],
        Some(t) => {
            return Err(format!(
                "fuzz: unknown target {t:?}; the targets are {}",
                FUZZ_TARGETS.join(", ")
            ));
        }
    };
    const TRIPLE: &str = "x86_64-unknown-linux-gnu";
    let out = target_dir().join("fuzz");
    run(cargo()
        .args([
            "build",
            "--release",
            "--quiet",
            "--locked",
            "--target",
            TRIPLE,
        ])
        .arg("--manifest-path")
        .arg(root().join("fuzz").join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &out)
        .env(
            "RUSTFLAGS",
            "-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
             -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
             -Cllvm-args=-sanitizer-coverage-pc-table \
             -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing",
        ))?;
    let artifacts = out.join("artifacts");
    std::fs::create_dir_all(&artifacts).map_err(|e| format!("{}: {e}", artifacts.display()))?;
    for t in targets {
        let work = out.join("corpus").join(t);
        let seeds = root().join("fuzz").join("corpus").join(t);
        for d in [&work, &seeds] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        // libFuzzer's running commentary goes to a log file; the run's summary is printed,
        // and the log's end too when the target fails.
        let log_path = out.join(format!("{t}.log"));
        let log =
            std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut cmd = Command::new(out.join(TRIPLE).join("release").join(t));
        cmd.arg(&work)
            .arg(&seeds)
            .arg(format!("-max_total_time={secs}"))
            .arg(format!("-artifact_prefix={}/{t}-", artifacts.display()))
            .arg("-print_final_stats=1")
            .arg("-rss_limit_mb=2048")
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let result = run(&mut cmd);
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let shown: Vec<&str> = if result.is_ok() {
            lines
                .iter()
                .filter(|l| l.starts_with("Done ") || l.starts_with("stat::"))
                .copied()
                .collect()
        } else {
            lines[lines.len().saturating_sub(60)..].to_vec()
        };
        for l in shown {
            eprintln!("xtask: {t}: {l}");
        }
        result.map_err(|e| format!("{e}; the whole log: {}", log_path.display()))?;
    }
    Ok(())
}
