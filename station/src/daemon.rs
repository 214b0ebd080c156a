//! `stationd`: the one process that opens the journal and logs into the HSM, and serves the API
//! (`schemas/station.proto`) to every front end.
//!
//! [`Daemon::start`] opens the engine (journal lock first, then HSM, start-up recovery, the nest
//! tasks, the watchdog), binds the Unix socket (owner and group only, as the configuration says)
//! and, when configured, the mutual-TLS listener for remote consoles, whose client certificates
//! must chain to the cell's device CA as the token holds it. [`Daemon::stop`] ends the event
//! streams, waits for the calls in progress, stops the line cleanly, writes the shut-down
//! checkpoint and gives the journal's lock up.
//!
//! What it does not do: decide anything about users or commands (the engine does), or detach
//! from the terminal (a service manager runs it; see `deploy/stationd.service`).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::api::server::Service;
use crate::config::{Config, TlsSettings};
use crate::engine::{Engine, OpenOptions};

/// A running daemon.
pub struct Daemon {
    engine: Engine,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    socket: PathBuf,
    tls_addr: Option<std::net::SocketAddr>,
    plc_addr: Option<std::net::SocketAddr>,
    opcua_addr: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// Creates `dir` (and its parents) owner-only when missing.
pub fn private_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

/// Removes a socket file a stopped daemon left behind. Safe only while the journal's lock is
/// ours (no other daemon of this cell can be serving it).
fn remove_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the old socket {}", path.display())),
        Ok(_) => bail!(
            "{} exists and is not a socket; remove it or choose another `[api] socket`",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

fn tls_server_config(
    tls: &TlsSettings,
    device_ca_der: &[u8],
) -> Result<tonic::transport::ServerTlsConfig> {
    let key_meta = std::fs::metadata(&tls.key)
        .with_context(|| format!("cannot read the TLS key {}", tls.key.display()))?;
    if key_meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "the TLS key {} can be read by others; `chmod 600` it",
            tls.key.display()
        );
    }
    let cert = std::fs::read(&tls.cert)
        .with_context(|| format!("cannot read the TLS certificate {}", tls.cert.display()))?;
    let key = zeroize::Zeroizing::new(
        std::fs::read(&tls.key)
            .with_context(|| format!("cannot read the TLS key {}", tls.key.display()))?,
    );
    let ca = crate::api::pem("CERTIFICATE", device_ca_der);
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key.as_slice()))
        // Client certificates must chain to this cell's device CA, read from the token (not
        // from a file anyone could replace).
        .client_ca_root(tonic::transport::Certificate::from_pem(ca))
        .client_auth_optional(false))
}

impl Daemon {
    /// Opens the cell and serves the API. `source` names the daemon in the audit log.
    pub async fn start(cfg: Config, source: &str) -> Result<Daemon> {
        let api = cfg.api.clone();
        let engine = Engine::open(
            cfg,
            OpenOptions {
                source: source.into(),
                nests: true,
            },
        )
        .await?;
        match Daemon::serve(engine.clone(), &api).await {
            Ok(d) => Ok(d),
            Err(e) => {
                let _ = engine.shutdown().await;
                Err(e)
            }
        }
    }

    async fn serve(engine: Engine, api: &crate::config::ApiSettings) -> Result<Daemon> {
        private_dir(&api.export_dir)?;
        if let Some(parent) = api.socket.parent() {
            private_dir(parent)?;
        }
        remove_stale_socket(&api.socket)?;
        let listener = UnixListener::bind(&api.socket)
            .with_context(|| format!("cannot listen on {}", api.socket.display()))?;
        std::fs::set_permissions(
            &api.socket,
            std::fs::Permissions::from_mode(api.socket_mode),
        )
        .with_context(|| format!("cannot set the permissions of {}", api.socket.display()))?;
        let (shutdown, rx) = watch::channel(false);
        let service = Service::new(engine.clone(), api.export_dir.clone(), rx.clone());
        let mut servers = Vec::new();
        let mut stop = rx.clone();
        servers.push(tokio::spawn(
            Server::builder().serve_with_incoming_shutdown(
                service.clone().server(),
                UnixListenerStream::new(listener),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            ),
        ));
        let mut tls_addr = None;
        if let Some(tls) = &api.tls {
            let config = tls_server_config(tls, &engine.keys().device_ca.cert_der)?;
            let addr: std::net::SocketAddr = tls
                .listen
                .parse()
                .with_context(|| format!("api.tls.listen {:?} is not an address", tls.listen))?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            tls_addr = Some(listener.local_addr()?);
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let mut stop = rx.clone();
            servers.push(tokio::spawn(
                Server::builder()
                    .tls_config(config)
                    .context("the TLS configuration is not usable")?
                    .serve_with_incoming_shutdown(service.server(), incoming, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    }),
            ));
        }
        let mut plc_addr = None;
        if let (Some(plc), Some(table)) = (engine.config().plc.clone(), engine.plc()) {
            let listener = tokio::net::TcpListener::bind(plc.listen)
                .await
                .with_context(|| format!("cannot listen for the PLC on {}", plc.listen))?;
            plc_addr = Some(listener.local_addr()?);
            let mut stop = rx.clone();
            let e2 = engine.clone();
            let rt = tokio::runtime::Handle::current();
            let refused = move |addr| {
                tracing::warn!(%addr, "a Modbus connection from an address not in plc.allow was refused");
                let e = e2.clone();
                rt.spawn(async move { e.plc_refused(addr).await });
            };
            tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) =
                    crate::plc::serve(listener, table, plc.allow, refused, stopped).await
                {
                    tracing::error!(error = %e, "the PLC's Modbus server stopped");
                }
            });
        }
        let mut opcua_addr = None;
        if let Some(o) = engine.config().opcua.clone() {
            // The library's certificate store lives beside the journal, owner-only.
            let pki = engine
                .config()
                .database
                .parent()
                .unwrap_or(Path::new("."))
                .join("opcua-pki");
            let server = crate::opcua::start(engine.clone(), &o, pki, rx.clone())
                .await
                .context("the OPC UA server cannot start (opcua in the configuration)")?;
            opcua_addr = Some(server.addr);
        }
        tracing::info!(socket = %api.socket.display(), tls = ?tls_addr, plc = ?plc_addr, opcua = ?opcua_addr, "serving the station API");
        Ok(Daemon {
            engine,
            shutdown,
            servers,
            socket: api.socket.clone(),
            tls_addr,
            plc_addr,
            opcua_addr,
        })
    }

    /// The engine (for the daemon's own process: tests and the demo look inside).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The TLS listener's address, when there is one.
    pub fn tls_addr(&self) -> Option<std::net::SocketAddr> {
        self.tls_addr
    }

    /// The OPC UA server's address, when there is one.
    pub fn opcua_addr(&self) -> Option<std::net::SocketAddr> {
        self.opcua_addr
    }

    /// The PLC's Modbus listener's address, when there is one.
    pub fn plc_addr(&self) -> Option<std::net::SocketAddr> {
        self.plc_addr
    }

    /// Stops serving, stops the line cleanly (the shut-down event and checkpoint) and gives
    /// the journal up.
    pub async fn stop(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        for s in self.servers {
            match tokio::time::timeout(std::time::Duration::from_secs(30), s).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the API server ended with an error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "the API server task failed"),
                Err(_) => tracing::warn!("calls in progress did not finish within 30 s"),
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        self.engine.shutdown().await?;
        Ok(())
    }
}

/// `stationd`'s main: run until SIGTERM or SIGINT.
pub fn main() -> std::process::ExitCode {
    use clap::Parser;
    #[derive(Parser, Debug)]
    #[command(
        name = "stationd",
        version,
        about = "The provisioning station's service: alone holds the journal and the HSM, runs the nests, and serves the `station` command and the touch console",
        long_about = "The provisioning station's service.\n\nIt is the only process that opens the cell's journal and logs into its HSM. It runs the nests, start-up recovery, the watchdog, checkpoints and alarms, and serves the API of schemas/station.proto on the Unix socket named in the configuration (and, when configured, to remote consoles over mutual TLS). Run it under a service manager (deploy/stationd.service); stop it with SIGTERM."
    )]
    struct Args {
        /// Cell configuration.
        #[arg(
            long,
            default_value = "/etc/station/station.toml",
            env = "STATION_CONFIG"
        )]
        config: PathBuf,
    }
    let args = Args::parse();
    crate::cli::init_logging();
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stationd: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // A software token reads its configuration once, when loaded: set it before any thread
    // starts.
    cfg.hsm.use_module_env();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stationd: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stationd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let station = cfg.station_id.clone();
    let daemon = Daemon::start(cfg, "stationd").await?;
    // Readiness, for whoever started us (a test, the demo, a service manager's log).
    println!(
        "stationd: cell {station} ready on {}{}",
        daemon.socket().display(),
        daemon
            .tls_addr()
            .map(|a| format!(" and {a} (TLS)"))
            .unwrap_or_default()
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("stationd: stopping: the meters in progress finish first");
    daemon.stop().await
}
