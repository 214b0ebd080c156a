//! A real PostgreSQL server for the factory registry, on loopback, as the tests' peer.
//!
//! `e2e-registry` (this package's binary) runs one: a fresh cluster in a directory, a server
//! certificate from a registry CA made with `openssl`, TLS with client certificates
//! (`hostssl … cert`: the certificate's CN is the role), and the clients' CA bundle a file the
//! tests append their cells' CAs to. It prints `ready DIR` and then takes commands on standard
//! input: `kill` (SIGKILL to the whole server, as a crash), `start`; at end of input it stops the
//! server and removes the directory. `cargo xtask test` starts one for the whole run and names
//! it in `CELL_REGISTRY_DIR`; without it, a test process starts its own.
//!
//! Each test gets a database of its own in the shared server ([`Registry::database`]) and
//! station ids that no other test uses.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;

/// What a running server's directory holds (`registry.json`).
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// Its directory.
    pub dir: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// The Unix socket directory (the superuser's way in).
    pub socket_dir: PathBuf,
    /// The registry server's CA (PEM), for clients.
    pub server_ca: PathBuf,
    /// The bundle of client CAs the server trusts.
    pub client_cas: PathBuf,
}

impl ServerInfo {
    fn read(dir: &Path) -> ServerInfo {
        let v: Value =
            serde_json::from_slice(&std::fs::read(dir.join("registry.json")).unwrap()).unwrap();
        ServerInfo {
            dir: dir.to_path_buf(),
            port: v["port"].as_u64().unwrap() as u16,
            socket_dir: dir.join("sock"),
            server_ca: dir.join("server-ca.pem"),
            client_cas: dir.join("client-cas.pem"),
        }
    }
}

/// The PostgreSQL server binaries: Debian's newest version, else `pg_config --bindir`.
pub fn bindir() -> PathBuf {
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<(u32, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("postgres").exists().then_some((v, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, b)) = versions.pop() {
            return b;
        }
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("PostgreSQL is not installed: run `cargo xtask test` once (it installs Debian's postgresql)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The server cannot run as root: as root, it runs as the `postgres` user Debian's package made.
fn as_server_user(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--clear-groups",
            "--",
        ])
        .arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn chown_to_server(p: &Path) {
    if is_root() {
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(p)
            .status()
            .unwrap();
        assert!(st.success(), "chown {}", p.display());
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// With `openssl` in `dir`: a CA `CA.pem` with its key `CA-key.pem` (made if absent), and a
/// P-256 key `NAME-key.pem` (owner-only) with a certificate `NAME.pem` for `cn` it issues, with
/// the extensions `ext` (an `openssl x509 -extfile`).
pub fn openssl_issue(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    let run = |line: String| {
        let args: Vec<&str> = line.split_whitespace().collect();
        crate::openssl(&args, dir);
    };
    if !dir.join(format!("{ca}.pem")).exists() {
        run(format!(
            "ecparam -name prime256v1 -genkey -noout -out {ca}-key.pem"
        ));
        run(format!(
            "req -x509 -new -key {ca}-key.pem -subj /CN={ca} -days 30 -out {ca}.pem"
        ));
    }
    run(format!(
        "ecparam -name prime256v1 -genkey -noout -out {name}-key.pem"
    ));
    run(format!(
        "req -new -key {name}-key.pem -subj /CN={cn} -out {name}.csr"
    ));
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    run(format!(
        "x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}-key.pem -CAcreateserial -days 30 -extfile {name}.ext -out {name}.pem"
    ));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join(format!("{name}-key.pem")),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

/// Serves a registry server (the `e2e-registry` binary): see the module documentation.
pub fn serve(dir: Option<PathBuf>, durable: bool) {
    let (dir, owned) = match dir {
        Some(d) => (d, false),
        None => {
            let d = tempfile::Builder::new()
                .prefix("cell-registry-")
                .tempdir()
                .unwrap()
                .keep();
            (d, true)
        }
    };
    std::fs::create_dir_all(dir.join("sock")).unwrap();
    let bin = bindir();
    let data = dir.join("data");
    // initdb writes into a directory the server user owns.
    chown_to_server(&dir);
    let st = as_server_user(&bin.join("initdb"))
        .args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "-D",
        ])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(st.success(), "initdb failed");
    // The registry's server certificate, from a CA of its own.
    openssl_issue(
        &dir,
        "server-ca",
        "server",
        "localhost",
        "subjectAltName = DNS:localhost, IP:127.0.0.1\nextendedKeyUsage = serverAuth\n",
    );
    // Until a test adds its cells' CAs, the bundle holds the registry CA (it may not be empty).
    std::fs::copy(dir.join("server-ca.pem"), dir.join("client-cas.pem")).unwrap();
    let port = free_port();
    let conf = format!(
        "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{sock}'\n\
         ssl = on\nssl_cert_file = '{d}/server.pem'\nssl_key_file = '{d}/server-key.pem'\nssl_ca_file = '{d}/client-cas.pem'\n\
         {durability}max_connections = 300\nshared_buffers = 64MB\n\
         log_min_messages = warning\nlog_connections = off\n",
        sock = dir.join("sock").display(),
        // Tests trade durability against a machine crash for speed (a killed server still
        // loses nothing: commits wait for the WAL write); the benchmark measures a durable one.
        durability = if durable {
            ""
        } else {
            "fsync = off\nfull_page_writes = off\n"
        },
        d = dir.display(),
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    f.write_all(conf.as_bytes()).unwrap();
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all postgres trust\nhostssl all all 127.0.0.1/32 cert\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("registry.json"),
        serde_json::json!({"port": port}).to_string(),
    )
    .unwrap();
    chown_to_server(&dir);
    // The tests append to the bundle as root or as themselves.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.join("client-cas.pem"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let start = || -> Child {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .unwrap();
        let mut child = as_server_user(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        let info = ServerInfo::read(&dir);
        for _ in 0..200 {
            if admin_psql(&info, "postgres", "SELECT 1").is_ok() {
                return child;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the registry server did not start: {}",
            std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
        );
    };
    let mut server = start();
    let info = ServerInfo::read(&dir);
    admin_psql(
        &info,
        "postgres",
        "CREATE ROLE fleet_station NOLOGIN; CREATE ROLE fleet_reader NOLOGIN;",
    )
    .unwrap();
    println!("ready {}", dir.display());
    let _ = std::io::stdout().flush();
    let stop = |c: &mut Child, sig: &str| {
        // The server's whole process group: the postmaster and every backend.
        let _ = Command::new("kill")
            .args([sig, "--", &format!("-{}", c.id())])
            .status();
        let _ = c.wait();
    };
    for line in std::io::stdin().lock().lines() {
        match line.as_deref().map(str::trim) {
            Ok("kill") => {
                stop(&mut server, "-KILL");
                println!("killed");
            }
            Ok("start") => {
                server = start();
                println!("started");
            }
            _ => break,
        }
        let _ = std::io::stdout().flush();
    }
    stop(&mut server, "-INT");
    if owned {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Runs SQL as the superuser over the server's Unix socket with `psql`.
pub fn admin_psql(info: &ServerInfo, db: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-h",
        ])
        .arg(&info.socket_dir)
        .args(["-p", &info.port.to_string(), "-d", db, "-c", sql])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A registry server process this test process controls.
pub struct Registry {
    pub info: ServerInfo,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    stdout: Option<std::io::Lines<std::io::BufReader<ChildStdout>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("dir", &self.info.dir)
            .finish()
    }
}

/// The binary that serves one.
pub fn registry_exe() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.parent().unwrap()
    } else {
        dir
    };
    dir.join("e2e-registry")
}

impl Registry {
    /// A server of this test's own (one it may kill).
    pub fn private() -> Registry {
        Registry::spawn(false)
    }

    /// A server of its own that syncs its WAL to disk as a production registry does.
    pub fn private_durable() -> Registry {
        Registry::spawn(true)
    }

    fn spawn(durable: bool) -> Registry {
        let mut child = Command::new(registry_exe())
            .args(durable.then_some("--durable"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", registry_exe().display()));
        let stdin = child.stdin.take();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let dir = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(d) = l.strip_prefix("ready ") {
                        break PathBuf::from(d);
                    }
                }
                _ => panic!("the registry server did not start: {:?}", child.wait()),
            }
        };
        Registry {
            info: ServerInfo::read(&dir),
            child: Some(child),
            stdin,
            stdout: Some(lines),
        }
    }

    /// The run's shared server (`CELL_REGISTRY_DIR`), or this process's own.
    pub fn shared() -> ServerInfo {
        static OWN: OnceLock<Mutex<Registry>> = OnceLock::new();
        if let Ok(d) = std::env::var("CELL_REGISTRY_DIR") {
            return ServerInfo::read(Path::new(&d));
        }
        let r = OWN.get_or_init(|| Mutex::new(Registry::private()));
        r.lock().unwrap_or_else(|p| p.into_inner()).info.clone()
    }

    fn command(&mut self, cmd: &str, answer: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        let lines = self.stdout.as_mut().unwrap();
        match lines.next() {
            Some(Ok(l)) if l == answer => {}
            other => panic!("registry server: {cmd}: {other:?}"),
        }
    }

    /// Kills the server (SIGKILL to every process of it), as a crash.
    pub fn kill(&mut self) {
        self.command("kill", "killed");
    }

    /// Starts it again.
    pub fn start(&mut self) {
        self.command("start", "started");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

/// A database of one test in a registry server, with the registry's schema and a number space.
#[derive(Debug, Clone)]
pub struct RegistryDb {
    pub info: ServerInfo,
    pub name: String,
}

impl RegistryDb {
    /// A new database with the schema (`station fleet init`'s work, done with the library) and
    /// numbers from 1 for `flag`.
    pub async fn new(info: &ServerInfo, flag: &str) -> RegistryDb {
        let mut raw = [0u8; 6];
        rand_fill(&mut raw);
        let name = format!("reg_{}", hex::encode(raw));
        admin_psql(info, "postgres", &format!("CREATE DATABASE {name}")).unwrap();
        let db = RegistryDb {
            info: info.clone(),
            name,
        };
        let c = db.admin().await;
        station::fleet::migrate(&c).await.unwrap();
        station::fleet::add_number_space(&c, flag, 1, station::fleet::LAST_NUMBER)
            .await
            .unwrap();
        db
    }

    /// The superuser's connection over the Unix socket.
    pub async fn admin(&self) -> tokio_postgres::Client {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.info.socket_dir)
            .port(self.info.port)
            .user("postgres")
            .dbname(&self.name);
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    /// Trusts a CA for client certificates (appends it to the server's bundle and reloads).
    pub async fn trust_client_ca(&self, pem: &str) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.info.client_cas)
            .unwrap();
        f.write_all(format!("\n{}\n", pem.trim()).as_bytes())
            .unwrap();
        drop(f);
        self.admin()
            .await
            .execute("SELECT pg_reload_conf()", &[])
            .await
            .unwrap();
        // The server reads its configuration again a moment later.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// A registry endpoint for `user` with the given certificate files.
    pub fn endpoint(&self, user: &str, cert: &Path, key: &Path) -> station::fleet::Endpoint {
        station::fleet::Endpoint {
            host: "127.0.0.1".into(),
            port: self.info.port,
            database: self.name.clone(),
            user: user.into(),
            server_ca: self.info.server_ca.clone(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }
    }

    /// The `[fleet]` section of a station configuration for this database.
    pub fn fleet_config(&self, cert: &str, key: &str, lease_block: u32, low: u32) -> String {
        format!(
            "\n[fleet]\nhost = \"127.0.0.1\"\nport = {}\ndatabase = \"{}\"\nserver_ca = \"{}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             lease_block = {lease_block}\nlease_low_water = {low}\npush_interval_s = 1\npush_batch = 50\n",
            self.info.port,
            self.name,
            self.info.server_ca.display(),
        )
    }
}

fn rand_fill(b: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(b)
        .unwrap();
}

/// A fresh station id no other test uses: `prefix-` and six hex digits.
pub fn station_id(prefix: &str) -> String {
    let mut raw = [0u8; 3];
    rand_fill(&mut raw);
    format!("{prefix}-{}", hex::encode(raw))
}
