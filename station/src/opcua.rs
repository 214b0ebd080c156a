//! The OPC UA server of `stationd` (schemas/opcua.md): the cell as a machine after the OPC UA
//! Machinery companion specification (OPC 40001-1) for the line's MES and SCADA — its
//! identification and state, one object per nest, the open batch, alarms as events, and methods
//! to open, start and stop a batch under the station's own permission table.
//!
//! What keeps it a trust anchor's interface:
//! - only secure channels: Basic256Sha256 and Aes256-Sha256-RsaPss, SignAndEncrypt (discovery
//!   still answers over an unsecured channel, as OPC UA requires, but no session activates there);
//! - the server's application instance certificate must have been issued by this cell's device
//!   CA and name the configured application URI, or the daemon does not start;
//! - a client application connects only with a certificate that the device CA issued **and** an
//!   officer listed in `opcua.trusted_clients` (exact certificates: a CA alone admits no one);
//! - users log in with a station user name and PIN through the same path as every console (PIN
//!   pepper in the HSM, Argon2id, lock-out, audit); anonymous sessions are refused;
//! - every method runs as a station command under that user's session, so the permission table
//!   decides, and the engine audits what it does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use opcua::crypto::{CertificateStore, SecurityPolicy, X509};
use opcua::server::address_space::{
    AddressSpace, BaseEventType, Event as UaEvent, EventNotifier, MethodBuilder, ObjectBuilder,
    ObjectTypeBuilder, VariableBuilder, add_namespaces,
};
use opcua::server::authenticator::{
    AuthManager, Password, UserToken, user_pass_security_policy_id, user_pass_security_policy_uri,
};
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{
    InMemoryNodeManager, InMemoryNodeManagerBuilder, InMemoryNodeManagerImpl,
    InMemoryNodeManagerImplBuilder,
};
use opcua::server::node_manager::{MethodCall, RequestContext, ServerContext};
use opcua::server::{ServerBuilder, ServerEndpoint, ServerHandle};
use opcua::sync::RwLock;
use opcua::types::{
    Argument, BuildInfo, DataTypeId, DataValue, DateTime, LocalizedText, MessageSecurityMode,
    NodeId, ObjectId, ObjectTypeId, QualifiedName, StatusCode, UAString, UserTokenPolicy,
    UserTokenType, VariableTypeId, Variant,
};
use tokio::sync::watch;

use crate::config::OpcUaSettings;
use crate::engine::{BatchSpec, Command, Engine, Event, LineView, NestState, NestView, Session};

/// This station's namespace.
pub const CELL_NS: &str = "urn:smart-meter-cell:station";
/// OPC 40001-1 Machinery.
pub const MACHINERY_NS: &str = "http://opcfoundation.org/UA/Machinery/";
/// OPC 10000-100 Devices (the identification properties' browse names).
pub const DI_NS: &str = "http://opcfoundation.org/UA/DI/";

/// The `Machines` folder's numeric id in the Machinery namespace.
const MACHINES_FOLDER: u32 = 1001;
/// OPC UA sessions at once (the server's limit; the station sessions behind them are
/// remembered for as many).
const MAX_SESSIONS: usize = 64;
/// How often subscriptions are served, and the shortest publishing interval granted, ms.
const PUBLISH_MS: u64 = 10;

/// An alarm of the cell, as an OPC UA event (a subtype of BaseEventType).
#[derive(opcua::Event)]
#[opcua(
    identifier = "s=CellAlarmEventType",
    namespace = "urn:smart-meter-cell:station"
)]
struct CellAlarmEvent {
    base: BaseEventType,
    own_namespace_index: u16,
    /// The alarm's id (what acknowledges it).
    alarm_id: i64,
    /// The technical kind, e.g. `security.firmware_mismatch`.
    kind: UAString,
    /// The nest, 0 for the cell.
    nest: u32,
}

/// The running server.
#[derive(Debug)]
pub struct OpcUaServer {
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Starts the server; it stops when `stop` turns true.
pub async fn start(
    engine: Engine,
    settings: &OpcUaSettings,
    pki_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> Result<OpcUaServer> {
    let ca = engine.keys().device_ca.clone();
    let own = check_own_certificate(settings, &ca)?;
    prepare_pki(&pki_dir, &settings.trusted_clients, &ca, &own)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen for OPC UA on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let url = format!("opc.tcp://{}:{}/", addr.ip(), addr.port());
    let cfg = engine.config().clone();
    let nests = u32::try_from(cfg.nests.len()).unwrap_or(u32::MAX);
    let ident = Identification {
        manufacturer: cfg.manufacturer.name.clone(),
        station: cfg.station_id.clone(),
        uri: settings.application_uri.clone(),
    };
    let auth = Arc::new(StationAuth {
        engine: engine.clone(),
        sessions: Mutex::new(Sessions::default()),
    });
    // Nest states reach subscribers within a few tens of milliseconds: subscriptions are served
    // every 10 ms and may publish that often (the library's default is 100 ms for both).
    let mut limits = opcua::server::Limits::default();
    limits.subscriptions.min_publishing_interval_ms = PUBLISH_MS as f64;
    limits.subscriptions.min_sampling_interval_ms = PUBLISH_MS as f64;
    limits.max_sessions = MAX_SESSIONS;
    let (server, handle) = ServerBuilder::new()
        .limits(limits)
        .subscription_poll_interval_ms(PUBLISH_MS)
        .build_info(BuildInfo {
            product_uri: "urn:smart-meter-cell".into(),
            manufacturer_name: ident.manufacturer.as_str().into(),
            product_name: "Trust provisioning cell".into(),
            software_version: env!("CARGO_PKG_VERSION").into(),
            build_number: env!("CARGO_PKG_VERSION").into(),
            build_date: DateTime::now(),
        })
        .application_name(format!("stationd {}", ident.station))
        .application_uri(settings.application_uri.as_str())
        .product_uri("urn:smart-meter-cell")
        .host(addr.ip().to_string())
        .port(addr.port())
        .discovery_urls(vec![url])
        .pki_dir(&pki_dir)
        .certificate_path(pki_dir.join("own").join("cert.der"))
        .private_key_path(&settings.key)
        .create_sample_keypair(false)
        .add_endpoint(
            "basic256sha256",
            ServerEndpoint::new(
                "/",
                SecurityPolicy::Basic256Sha256,
                MessageSecurityMode::SignAndEncrypt,
                &[],
            ),
        )
        .add_endpoint(
            "aes256sha256rsapss",
            ServerEndpoint::new(
                "/",
                SecurityPolicy::Aes256Sha256RsaPss,
                MessageSecurityMode::SignAndEncrypt,
                &[],
            ),
        )
        .with_authenticator(auth.clone())
        .with_node_manager(InMemoryNodeManagerBuilder::new(CellNodesBuilder {
            nests,
            ident,
            auth,
        }))
        .build()
        .map_err(|e| anyhow!("the OPC UA server cannot be set up: {e}"))?;
    // A certificate or key the server could not load is only a warning inside the library.
    if handle.info().server_certificate.is_none() || handle.info().server_pkey.is_none() {
        bail!(
            "the OPC UA server cannot use its certificate {} or key {} (the key must be an RSA key in PEM)",
            settings.certificate.display(),
            settings.key.display()
        );
    }
    let nm = handle
        .node_managers()
        .get_of_type::<InMemoryNodeManager<CellNodes>>()
        .ok_or_else(|| anyhow!("the cell's OPC UA node manager is missing"))?;
    tokio::spawn(follow(engine, handle.clone(), nm, stop.clone()));
    tokio::spawn(prune_rejected(pki_dir.join("rejected"), stop.clone()));
    let h2 = handle.clone();
    tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
        h2.cancel();
    });
    tokio::spawn(async move {
        if let Err(e) = server.run_with(listener).await {
            tracing::error!(error = %e, "the OPC UA server stopped");
        }
    });
    tracing::info!(%addr, "serving OPC UA");
    Ok(OpcUaServer { addr })
}

/// The server's own certificate, checked: issued by the device CA, an RSA key, valid now, and
/// naming the application URI. Returns it (DER).
fn check_own_certificate(s: &OpcUaSettings, ca: &hsm::Issuer) -> Result<Vec<u8>> {
    let der = read_certificate(&s.certificate)?;
    hsm::cert::verify_issued_by(&der, ca).map_err(|_| {
        anyhow!(
            "the OPC UA certificate {} was not issued by this cell's device CA; issue one with `station pki opcua-cert --usage server`",
            s.certificate.display()
        )
    })?;
    let x = X509::from_der(&der).map_err(|e| {
        anyhow!(
            "the OPC UA certificate {} cannot be read: {e}",
            s.certificate.display()
        )
    })?;
    if !valid_now(&der) {
        bail!(
            "the OPC UA certificate {} is not valid now",
            s.certificate.display()
        );
    }
    x.is_application_uri_valid(&s.application_uri).map_err(|_| {
        anyhow!(
            "the OPC UA certificate {} does not name the application URI {} (opcua.application_uri)",
            s.certificate.display(),
            s.application_uri
        )
    })?;
    if x.key_length().unwrap_or(0) < 2048 {
        bail!(
            "the OPC UA certificate {} needs an RSA key of at least 2048 bits",
            s.certificate.display()
        );
    }
    let meta = std::fs::metadata(&s.key)
        .with_context(|| format!("cannot read the OPC UA key {}", s.key.display()))?;
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
        bail!(
            "the OPC UA key {} can be read by others; `chmod 600` it",
            s.key.display()
        );
    }
    Ok(der)
}

/// Whether a certificate's validity period covers now.
fn valid_now(der: &[u8]) -> bool {
    use der::Decode;
    let Ok(c) = x509_cert::Certificate::from_der(der) else {
        return false;
    };
    let v = &c.tbs_certificate().validity();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    v.not_before.to_unix_duration() <= now && now <= v.not_after.to_unix_duration()
}

/// A certificate file, PEM (the first certificate in it) or DER.
fn read_certificate(path: &Path) -> Result<Vec<u8>> {
    use der::{DecodePem, Encode};
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the certificate {}", path.display()))?;
    if bytes.starts_with(b"-----BEGIN") {
        let text = String::from_utf8_lossy(&bytes);
        let end = "-----END CERTIFICATE-----";
        let first = text.find(end).map_or(&text[..], |i| &text[..i + end.len()]);
        let c = x509_cert::Certificate::from_pem(first.as_bytes())
            .map_err(|e| anyhow!("{} is not a PEM certificate: {e}", path.display()))?;
        c.to_der()
            .map_err(|e| anyhow!("{} cannot be encoded: {e}", path.display()))
    } else {
        Ok(bytes)
    }
}

/// The library's certificate store, made anew from configuration at every start: the server's
/// own certificate, and in `trusted/` exactly the listed client certificates — each checked to
/// have been issued by the device CA (a file that was not stops the start, naming it).
fn prepare_pki(pki: &Path, clients: &Path, ca: &hsm::Issuer, own: &[u8]) -> Result<()> {
    crate::daemon::private_dir(pki)?;
    let trusted = pki.join("trusted");
    if trusted.exists() {
        std::fs::remove_dir_all(&trusted)
            .with_context(|| format!("cannot clear {}", trusted.display()))?;
    }
    for d in ["trusted", "rejected", "own"] {
        crate::daemon::private_dir(&pki.join(d))?;
    }
    std::fs::write(pki.join("own").join("cert.der"), own)?;
    let entries = std::fs::read_dir(clients).with_context(|| {
        format!(
            "cannot read opcua.trusted_clients {} (a directory of client certificates)",
            clients.display()
        )
    })?;
    let mut n = 0;
    for e in entries {
        let path = e?.path();
        if !path.is_file() {
            continue;
        }
        let der = read_certificate(&path)?;
        hsm::cert::verify_issued_by(&der, ca).map_err(|_| {
            anyhow!(
                "the OPC UA client certificate {} was not issued by this cell's device CA; issue one with `station pki opcua-cert --usage client`",
                path.display()
            )
        })?;
        let x = X509::from_der(&der).map_err(|e| {
            anyhow!(
                "the client certificate {} cannot be read: {e}",
                path.display()
            )
        })?;
        std::fs::write(trusted.join(CertificateStore::cert_file_name(&x)), &der)?;
        n += 1;
    }
    tracing::info!(clients = n, "OPC UA client applications trusted");
    Ok(())
}

/// The library keeps every certificate it refused in `rejected/` for an officer to look at; any
/// client on the network can present a new one at every attempt. At most this many are kept, the
/// newest, so that refused connections cannot fill the disk the journal lives on.
pub const REJECTED_KEPT: usize = 32;

/// Keeps `rejected/` to [`REJECTED_KEPT`] files, looking every second.
async fn prune_rejected(dir: PathBuf, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let d = dir.clone();
        let _ = tokio::task::spawn_blocking(move || prune(&d, REJECTED_KEPT)).await;
    }
}

/// Removes all but the `keep` newest files of `dir`; returns how many it removed.
fn prune(dir: &Path, keep: usize) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let m = e.metadata().ok()?;
            m.is_file()
                .then(|| (m.modified().unwrap_or(std::time::UNIX_EPOCH), e.path()))
        })
        .collect();
    if files.len() <= keep {
        return 0;
    }
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    let mut removed = 0;
    for (_, p) in files.into_iter().skip(keep) {
        if std::fs::remove_file(&p).is_ok() {
            removed += 1;
        }
    }
    tracing::warn!(removed, "refused OPC UA client certificates pruned");
    removed
}

/// Station sessions of the OPC UA sessions: the token the library hands back with every request
/// is an opaque key into this map, never the station's session token.
#[derive(Default)]
struct Sessions {
    by_key: HashMap<String, Session>,
    order: std::collections::VecDeque<String>,
}

struct StationAuth {
    engine: Engine,
    sessions: Mutex<Sessions>,
}

impl StationAuth {
    fn session(&self, key: &str) -> Option<Session> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_key
            .get(key)
            .cloned()
    }
}

#[async_trait]
impl AuthManager for StationAuth {
    // Anonymous tokens: the trait's default refuses them.

    async fn authenticate_username_identity_token(
        &self,
        _endpoint: &ServerEndpoint,
        username: &str,
        password: &Password,
    ) -> Result<UserToken, opcua::types::Error> {
        let pin = zeroize::Zeroizing::new(password.get().to_string());
        let origin = serde_json::json!({"transport": "opc-ua"});
        let s = self
            .engine
            .login_from(username, &pin, origin)
            .await
            .map_err(|e| {
                opcua::types::Error::new(StatusCode::BadUserAccessDenied, e.to_string())
            })?;
        let mut raw = [0u8; 16];
        rand_core::Rng::fill_bytes(&mut line_protocol::io::system_rng(), &mut raw);
        let key = format!("{}#{}", s.user, hex::encode(raw));
        let mut m = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while m.order.len() >= MAX_SESSIONS {
            if let Some(old) = m.order.pop_front() {
                m.by_key.remove(&old);
            }
        }
        m.order.push_back(key.clone());
        m.by_key.insert(key.clone(), s);
        Ok(UserToken(key))
    }

    fn user_token_policies(&self, endpoint: &ServerEndpoint) -> Vec<UserTokenPolicy> {
        vec![UserTokenPolicy {
            policy_id: user_pass_security_policy_id(endpoint),
            token_type: UserTokenType::UserName,
            issued_token_type: UAString::null(),
            issuer_endpoint_url: UAString::null(),
            security_policy_uri: user_pass_security_policy_uri(endpoint),
        }]
    }
}

struct Identification {
    manufacturer: String,
    station: String,
    uri: String,
}

/// Makes [`CellNodes`] when the server is built.
struct CellNodesBuilder {
    nests: u32,
    ident: Identification,
    auth: Arc<StationAuth>,
}

impl InMemoryNodeManagerImplBuilder for CellNodesBuilder {
    type Impl = CellNodes;

    fn build(self, context: ServerContext, space: &mut AddressSpace) -> CellNodes {
        CellNodes::new(context, space, self.nests, self.ident, self.auth)
    }
}

/// The cell's nodes.
struct CellNodes {
    ns: u16,
    machinery: u16,
    di: u16,
    nests: u32,
    auth: Arc<StationAuth>,
}

/// The variables of one nest, in the order [`nest_values`] gives them.
const NEST_VARS: [(&str, DataTypeId); 10] = [
    ("State", DataTypeId::String),
    ("Step", DataTypeId::String),
    ("Progress", DataTypeId::Double),
    ("Serial", DataTypeId::String),
    ("Uid", DataTypeId::String),
    ("Message", DataTypeId::String),
    ("LastResult", DataTypeId::String),
    ("LastReason", DataTypeId::String),
    ("Passed", DataTypeId::UInt32),
    ("Failed", DataTypeId::UInt32),
];

/// The open batch's variables.
const BATCH_VARS: [(&str, DataTypeId); 6] = [
    ("WorkOrder", DataTypeId::String),
    ("Model", DataTypeId::String),
    ("Quantity", DataTypeId::Int64),
    ("Done", DataTypeId::Int64),
    ("Failed", DataTypeId::Int64),
    ("State", DataTypeId::String),
];

/// A method's arguments: (name, type).
type Arguments = &'static [(&'static str, DataTypeId)];

/// The methods: (browse name, inputs, outputs).
const METHODS: [(&str, Arguments, Arguments); 4] = [
    (
        "OpenBatch",
        &[
            ("WorkOrder", DataTypeId::String),
            ("Model", DataTypeId::String),
            ("Firmware", DataTypeId::String),
            ("Customer", DataTypeId::String),
            ("Quantity", DataTypeId::Int64),
            ("SerialPrefix", DataTypeId::String),
            ("SerialFirst", DataTypeId::Int64),
            ("SerialLast", DataTypeId::Int64),
        ],
        &[("BatchId", DataTypeId::Int64)],
    ),
    ("StartBatch", &[], &[]),
    ("StopBatch", &[], &[]),
    ("CloseBatch", &[], &[("Done", DataTypeId::Int64)]),
];

impl CellNodes {
    fn new(
        ctx: ServerContext,
        space: &mut AddressSpace,
        nests: u32,
        ident: Identification,
        auth: Arc<StationAuth>,
    ) -> CellNodes {
        let idx = add_namespaces(&ctx, space, &[CELL_NS, MACHINERY_NS, DI_NS]);
        let nodes = CellNodes {
            ns: idx[0],
            machinery: idx[1],
            di: idx[2],
            nests,
            auth,
        };
        nodes.populate(space, &ident, idx[2]);
        nodes
    }

    fn id(&self, s: &str) -> NodeId {
        NodeId::new(self.ns, s)
    }

    fn qn(&self, s: &str) -> QualifiedName {
        QualifiedName::new(self.ns, s)
    }

    fn populate(&self, space: &mut AddressSpace, ident: &Identification, di: u16) {
        let machines = NodeId::new(self.machinery, MACHINES_FOLDER);
        ObjectBuilder::new(
            &machines,
            QualifiedName::new(self.machinery, "Machines"),
            "Machines",
        )
        .is_folder()
        .organized_by(ObjectId::ObjectsFolder)
        .insert(space);
        let cell = self.id("Cell");
        ObjectBuilder::new(&cell, self.qn(&ident.station), ident.station.as_str())
            .organized_by(machines)
            .has_type_definition(ObjectTypeId::BaseObjectType)
            .event_notifier(EventNotifier::SUBSCRIBE_TO_EVENTS)
            .insert(space);
        // Identification (OPC 40001-1 §8: MachineIdentificationType's properties, DI names).
        let ident_id = self.id("Cell.Identification");
        ObjectBuilder::new(
            &ident_id,
            QualifiedName::new(di, "Identification"),
            "Identification",
        )
        .component_of(cell.clone())
        .has_type_definition(ObjectTypeId::BaseObjectType)
        .insert(space);
        for (name, ns, v) in [
            (
                "Manufacturer",
                di,
                Variant::from(LocalizedText::new("", &ident.manufacturer)),
            ),
            (
                "Model",
                di,
                Variant::from(LocalizedText::new("", "Trust provisioning cell")),
            ),
            ("SerialNumber", di, Variant::from(ident.station.as_str())),
            ("ProductInstanceUri", di, Variant::from(ident.uri.as_str())),
            (
                "SoftwareRevision",
                di,
                Variant::from(env!("CARGO_PKG_VERSION")),
            ),
        ] {
            let dt = match &v {
                Variant::LocalizedText(_) => DataTypeId::LocalizedText,
                _ => DataTypeId::String,
            };
            VariableBuilder::new(
                &self.id(&format!("Cell.Identification.{name}")),
                QualifiedName::new(ns, name),
                name,
            )
            .property_of(ident_id.clone())
            .has_type_definition(VariableTypeId::PropertyType)
            .data_type(dt)
            .value(v)
            .insert(space);
        }
        // MachineryItemState and MachineryOperationMode: their CurrentState (OPC 40001-1 §11).
        for (obj, initial) in [
            ("MachineryItemState", "NotAvailable"),
            ("MachineryOperationMode", "None"),
        ] {
            let o = self.id(&format!("Cell.{obj}"));
            ObjectBuilder::new(&o, QualifiedName::new(self.machinery, obj), obj)
                .component_of(cell.clone())
                .has_type_definition(ObjectTypeId::BaseObjectType)
                .insert(space);
            VariableBuilder::new(
                &self.id(&format!("Cell.{obj}.CurrentState")),
                QualifiedName::new(0, "CurrentState"),
                "CurrentState",
            )
            .component_of(o)
            .has_type_definition(VariableTypeId::BaseDataVariableType)
            .data_type(DataTypeId::LocalizedText)
            .value(LocalizedText::new("en", initial))
            .insert(space);
        }
        self.variable(
            space,
            &cell,
            "Cell",
            "LineRunning",
            DataTypeId::Boolean,
            false.into(),
        );
        self.variable(
            space,
            &cell,
            "Cell",
            "Halted",
            DataTypeId::String,
            "".into(),
        );
        self.variable(
            space,
            &cell,
            "Cell",
            "OpenAlarms",
            DataTypeId::UInt32,
            0u32.into(),
        );
        // The nests.
        let nests = self.id("Cell.Nests");
        ObjectBuilder::new(&nests, self.qn("Nests"), "Nests")
            .is_folder()
            .component_of(cell.clone())
            .insert(space);
        for n in 1..=self.nests {
            let name = format!("Nest{n}");
            let nest = self.id(&name);
            ObjectBuilder::new(&nest, self.qn(&name), format!("Nest {n}").as_str())
                .organized_by(nests.clone())
                .has_type_definition(ObjectTypeId::BaseObjectType)
                .insert(space);
            for (var, dt) in NEST_VARS {
                let v = default_of(dt);
                self.variable(space, &nest, &name, var, dt, v);
            }
        }
        // The open batch.
        let batch = self.id("Cell.Batch");
        ObjectBuilder::new(&batch, self.qn("Batch"), "Batch")
            .component_of(cell.clone())
            .has_type_definition(ObjectTypeId::BaseObjectType)
            .insert(space);
        for (var, dt) in BATCH_VARS {
            let v = default_of(dt);
            self.variable(space, &batch, "Cell.Batch", var, dt, v);
        }
        // The methods.
        let arg = |(name, dt): &(&str, DataTypeId)| Argument {
            name: (*name).into(),
            data_type: (*dt).into(),
            value_rank: -1,
            array_dimensions: None,
            description: LocalizedText::null(),
        };
        for (m, inputs, outputs) in METHODS {
            let id = self.id(&format!("Cell.{m}"));
            let mut b = MethodBuilder::new(&id, self.qn(m), m)
                .component_of(cell.clone())
                .executable(true)
                .user_executable(true);
            if !inputs.is_empty() {
                let a: Vec<Argument> = inputs.iter().map(arg).collect();
                b = b.input_args(space, &self.id(&format!("Cell.{m}.InputArguments")), &a);
            }
            if !outputs.is_empty() {
                let a: Vec<Argument> = outputs.iter().map(arg).collect();
                b = b.output_args(space, &self.id(&format!("Cell.{m}.OutputArguments")), &a);
            }
            b.insert(space);
        }
        // The alarm event type.
        let et = self.id("CellAlarmEventType");
        ObjectTypeBuilder::new(&et, self.qn("CellAlarmEventType"), "CellAlarmEventType")
            .subtype_of(ObjectTypeId::BaseEventType)
            .insert(space);
        for (f, dt) in [
            ("AlarmId", DataTypeId::Int64),
            ("Kind", DataTypeId::String),
            ("Nest", DataTypeId::UInt32),
        ] {
            VariableBuilder::new(&self.id(&format!("CellAlarmEventType.{f}")), self.qn(f), f)
                .property_of(et.clone())
                .has_type_definition(VariableTypeId::PropertyType)
                .has_modelling_rule(ObjectId::ModellingRule_Mandatory)
                .data_type(dt)
                .insert(space);
        }
    }

    fn variable(
        &self,
        space: &mut AddressSpace,
        parent: &NodeId,
        prefix: &str,
        name: &str,
        dt: DataTypeId,
        v: Variant,
    ) {
        VariableBuilder::new(&self.id(&format!("{prefix}.{name}")), self.qn(name), name)
            .component_of(parent.clone())
            .has_type_definition(VariableTypeId::BaseDataVariableType)
            .data_type(dt)
            .value(v)
            .insert(space);
    }

    /// Runs one method as a station command of the calling user.
    async fn run(&self, context: &RequestContext, call: &mut MethodCall) {
        let Some(session) = self.auth.session(&context.user_token().0) else {
            call.set_status(StatusCode::BadIdentityTokenInvalid);
            return;
        };
        let name = match &call.method_id().identifier {
            opcua::types::Identifier::String(s) if call.method_id().namespace == self.ns => {
                s.as_ref().strip_prefix("Cell.").map(str::to_string)
            }
            _ => None,
        };
        let args = call.arguments().to_vec();
        let cmd = match name.as_deref() {
            Some("OpenBatch") => match open_batch_spec(&args) {
                Ok(spec) => Command::OpenBatch(spec),
                Err(status) => {
                    call.set_status(status);
                    return;
                }
            },
            Some("StartBatch") => Command::StartLine,
            Some("StopBatch") => Command::StopLine,
            Some("CloseBatch") => match self.auth.engine.snapshot().batch {
                Some(b) => Command::CloseBatch { id: b.id },
                None => {
                    call.set_status(StatusCode::BadInvalidState);
                    return;
                }
            },
            _ => {
                call.set_status(StatusCode::BadMethodInvalid);
                return;
            }
        };
        match self.auth.engine.execute(&session, cmd).await {
            Ok(reply) => {
                let outputs = match reply {
                    crate::Reply::Batch(b) if name.as_deref() == Some("OpenBatch") => {
                        vec![Variant::from(b.id)]
                    }
                    crate::Reply::Batch(b) => vec![Variant::from(b.done)],
                    _ => Vec::new(),
                };
                call.set_outputs(outputs);
                call.set_status(StatusCode::Good);
            }
            Err(e) => {
                tracing::info!(user = %session.user, error = %e, "an OPC UA method was refused");
                call.set_status(status_of(&e));
            }
        }
    }
}

fn default_of(dt: DataTypeId) -> Variant {
    match dt {
        DataTypeId::Double => 0.0f64.into(),
        DataTypeId::UInt32 => 0u32.into(),
        DataTypeId::Int64 => 0i64.into(),
        DataTypeId::Boolean => false.into(),
        _ => "".into(),
    }
}

/// An engine error as the status a client sees (the reason is in the station's log and audit).
fn status_of(e: &crate::engine::Error) -> StatusCode {
    use crate::engine::Error;
    match e {
        Error::Auth(crate::auth::AuthError::Forbidden { .. }) => StatusCode::BadUserAccessDenied,
        Error::Auth(_) => StatusCode::BadIdentityTokenInvalid,
        Error::Invalid(_) => StatusCode::BadInvalidArgument,
        Error::NotFound(_) => StatusCode::BadNotFound,
        Error::Conflict(_) => StatusCode::BadInvalidState,
        _ => StatusCode::BadInternalError,
    }
}

fn open_batch_spec(args: &[Variant]) -> Result<BatchSpec, StatusCode> {
    let s = |i: usize| match args.get(i) {
        Some(Variant::String(v)) => Ok(v.as_ref().to_string()),
        _ => Err(StatusCode::BadTypeMismatch),
    };
    let n = |i: usize| match args.get(i) {
        Some(Variant::Int64(v)) => Ok(*v),
        Some(Variant::Int32(v)) => Ok(i64::from(*v)),
        Some(Variant::UInt32(v)) => Ok(i64::from(*v)),
        _ => Err(StatusCode::BadTypeMismatch),
    };
    if args.len() != 8 {
        return Err(StatusCode::BadArgumentsMissing);
    }
    Ok(BatchSpec {
        work_order: s(0)?,
        model: s(1)?,
        firmware: s(2)?,
        customer: s(3)?,
        quantity: n(4)?,
        serial_prefix: s(5)?,
        serial_first: n(6)?,
        serial_last: n(7)?,
    })
}

#[async_trait]
impl InMemoryNodeManagerImpl for CellNodes {
    async fn init(&self, _space: &mut AddressSpace, _ctx: ServerContext) {}

    fn name(&self) -> &str {
        "cell"
    }

    fn namespaces(&self) -> Vec<NamespaceMetadata> {
        [
            (CELL_NS, self.ns),
            (MACHINERY_NS, self.machinery),
            (DI_NS, self.di),
        ]
        .into_iter()
        .map(|(uri, idx)| NamespaceMetadata {
            namespace_uri: uri.to_owned(),
            namespace_index: idx,
            ..Default::default()
        })
        .collect()
    }

    async fn call(
        &self,
        context: &RequestContext,
        _space: &RwLock<AddressSpace>,
        methods: &mut [&mut &mut MethodCall],
    ) -> Result<(), StatusCode> {
        for call in methods {
            self.run(context, call).await;
        }
        Ok(())
    }
}

/// The values of a nest's variables, in [`NEST_VARS`] order (counters are the caller's).
fn nest_values(n: &NestView) -> [Variant; 6] {
    [
        Variant::from(nest_state(n.state)),
        Variant::from(n.step.map(|s| s.word()).unwrap_or("")),
        Variant::from(f64::from(n.progress.unwrap_or(0.0)) * 100.0),
        Variant::from(n.serial.clone().unwrap_or_default()),
        Variant::from(n.uid.clone().unwrap_or_default()),
        Variant::from(n.message.clone().unwrap_or_default()),
    ]
}

fn nest_state(s: NestState) -> &'static str {
    match s {
        NestState::Idle => "Idle",
        NestState::Busy => "Busy",
        NestState::Pass => "Pass",
        NestState::Fail => "Fail",
        NestState::Stopped => "Stopped",
        NestState::Offline => "Offline",
    }
}

/// Keeps the address space in step with the engine: every nest change, the batch, the line's
/// state, and every new alarm as an event.
async fn follow(
    engine: Engine,
    handle: ServerHandle,
    nm: Arc<InMemoryNodeManager<CellNodes>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut events = engine.subscribe();
    let ns = nm.inner().ns;
    let id = |s: String| NodeId::new(ns, s);
    let mut counters: HashMap<u32, (u32, u32)> = HashMap::new();
    let set = |values: Vec<(NodeId, Variant)>| {
        let now = DateTime::now();
        let dvs: Vec<(NodeId, DataValue)> = values
            .into_iter()
            .map(|(n, v)| {
                (
                    n,
                    DataValue {
                        value: Some(v),
                        status: Some(StatusCode::Good),
                        source_timestamp: Some(now),
                        server_timestamp: Some(now),
                        ..Default::default()
                    },
                )
            })
            .collect();
        if let Err(e) = nm.set_values(
            handle.subscriptions(),
            dvs.iter().map(|(n, dv)| (n, None, dv.clone())),
        ) {
            tracing::warn!(error = %e, "an OPC UA value could not be set");
        }
    };
    let line_values = |l: &LineView| -> Vec<(NodeId, Variant)> {
        let busy = l.nests.iter().any(|n| n.state == NestState::Busy);
        let item = if !l.health.hsm || !l.health.database {
            "NotAvailable"
        } else if l.halted.is_some() {
            "OutOfService"
        } else if l.running && busy {
            "Executing"
        } else {
            "NotExecuting"
        };
        let mode = if l.running { "Processing" } else { "None" };
        vec![
            (
                id("Cell.MachineryItemState.CurrentState".into()),
                LocalizedText::new("en", item).into(),
            ),
            (
                id("Cell.MachineryOperationMode.CurrentState".into()),
                LocalizedText::new("en", mode).into(),
            ),
            (id("Cell.LineRunning".into()), l.running.into()),
            (
                id("Cell.Halted".into()),
                l.halted.clone().unwrap_or_default().into(),
            ),
            (
                id("Cell.OpenAlarms".into()),
                u32::try_from(l.alarms.len()).unwrap_or(u32::MAX).into(),
            ),
        ]
    };
    let batch_values = |b: Option<&crate::records::BatchRow>| -> Vec<(NodeId, Variant)> {
        let v: [Variant; 6] = match b {
            Some(b) => [
                b.work_order.clone().into(),
                b.model.clone().into(),
                b.quantity.into(),
                b.done.into(),
                b.failed.into(),
                b.state.clone().into(),
            ],
            None => [
                "".into(),
                "".into(),
                0i64.into(),
                0i64.into(),
                0i64.into(),
                "".into(),
            ],
        };
        BATCH_VARS
            .iter()
            .zip(v)
            .map(|((name, _), v)| (id(format!("Cell.Batch.{name}")), v))
            .collect()
    };
    let nest_update = |n: &NestView| -> Vec<(NodeId, Variant)> {
        NEST_VARS
            .iter()
            .zip(nest_values(n))
            .map(|((name, _), v)| (id(format!("Nest{}.{name}", n.nest)), v))
            .collect()
    };
    let mut line = engine.snapshot();
    let mut all = line_values(&line);
    all.extend(batch_values(line.batch.as_ref()));
    for n in &line.nests {
        all.extend(nest_update(n));
    }
    set(all);
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = stop.wait_for(|s| *s) => return,
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // Behind: take the whole picture again.
                line = engine.snapshot();
                let mut all = line_values(&line);
                all.extend(batch_values(line.batch.as_ref()));
                for n in &line.nests {
                    all.extend(nest_update(n));
                }
                set(all);
                continue;
            }
            Err(_) => return,
        };
        match ev {
            Event::Nest(n) => {
                let changed_busy = line
                    .nests
                    .iter()
                    .find(|x| x.nest == n.nest)
                    .is_none_or(|x| (x.state == NestState::Busy) != (n.state == NestState::Busy));
                let mut v = nest_update(&n);
                if let Some(slot) = line.nests.iter_mut().find(|x| x.nest == n.nest) {
                    *slot = n;
                }
                if changed_busy {
                    v.extend(line_values(&line));
                }
                set(v);
            }
            Event::MeterFinished {
                nest, ok, reason, ..
            } => {
                let c = counters.entry(nest).or_default();
                if ok {
                    c.0 += 1;
                } else {
                    c.1 += 1;
                }
                set(vec![
                    (
                        id(format!("Nest{nest}.LastResult")),
                        (if ok { "Pass" } else { "Fail" }).into(),
                    ),
                    (
                        id(format!("Nest{nest}.LastReason")),
                        reason.unwrap_or_default().into(),
                    ),
                    (id(format!("Nest{nest}.Passed")), c.0.into()),
                    (id(format!("Nest{nest}.Failed")), c.1.into()),
                ]);
            }
            Event::Batch(b) => {
                line.batch = b;
                set(batch_values(line.batch.as_ref()));
            }
            Event::Line { running, halted } => {
                line.running = running;
                line.halted = halted;
                set(line_values(&line));
            }
            Event::Health(h) => {
                line.health = h;
                set(line_values(&line));
            }
            Event::Alarm(a) => {
                if !line.alarms.iter().any(|x| x.id == a.id) {
                    line.alarms.push(a.clone());
                }
                set(line_values(&line));
                raise(&handle, ns, &a);
            }
            Event::AlarmAcked { id: acked, .. } => {
                line.alarms.retain(|x| x.id != acked);
                set(line_values(&line));
            }
        }
    }
}

/// An alarm as an event of the cell object (and so of the Server object too).
fn raise(handle: &ServerHandle, ns: u16, a: &crate::audit::Alarm) {
    let cell = NodeId::new(ns, "Cell");
    let mut raw = [0u8; 16];
    rand_core::Rng::fill_bytes(&mut line_protocol::io::system_rng(), &mut raw);
    let mut ev = {
        let tt = handle.type_tree().read();
        let nss = tt.namespaces();
        CellAlarmEvent::new_event_now(
            CellAlarmEvent::event_type_id(nss),
            opcua::types::ByteString::from(raw.to_vec()),
            a.in_words(),
            nss,
        )
    };
    ev.base.source_node = cell.clone();
    ev.base.source_name = a
        .nest
        .map(|n| format!("Nest {n}"))
        .unwrap_or_else(|| "Cell".into())
        .into();
    ev.base.severity = if a.kind.starts_with("security.") || a.kind.starts_with("hsm.") {
        900
    } else {
        600
    };
    ev.alarm_id = a.id;
    ev.kind = a.kind.as_str().into();
    ev.nest = a.nest.unwrap_or(0);
    handle
        .subscriptions()
        .notify_events([(&ev as &dyn UaEvent, &cell)].into_iter());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_newest_refused_certificates() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..40 {
            let p = d.path().join(format!("c{i:02}.der"));
            std::fs::write(&p, [i as u8]).unwrap();
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i);
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        assert_eq!(prune(d.path(), 32), 8);
        assert_eq!(prune(d.path(), 32), 0);
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left.first().map(String::as_str), Some("c08.der"));
        assert_eq!(left.len(), 32);
    }
}
