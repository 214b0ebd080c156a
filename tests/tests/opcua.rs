//! The OPC UA server (schemas/opcua.md), checked by a client we did not write: Python's
//! `asyncua`, over a real socket to the daemon. It connects with a certificate the cell's device
//! CA issued for its own key, browses the machine after OPC 40001-1 and its nests, subscribes to
//! the nests' state and the cell's alarm events, opens a batch, starts and stops it; and it is
//! refused without credentials, without a secure channel, with a certificate the CA did not
//! issue or one it issued that no officer listed, and as an operator calling a supervisor's
//! method.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use e2e::{Cell, CellOptions};

const CLIENT: &str = r#"
import asyncio, json, sys, time
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256, SecurityPolicyAes256Sha256RsaPss
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
import datetime

CELL_NS = "urn:smart-meter-cell:station"
MACHINERY_NS = "http://opcfoundation.org/UA/Machinery/"
DI_NS = "http://opcfoundation.org/UA/DI/"
SAE = ua.MessageSecurityMode.SignAndEncrypt

def pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

def self_signed(key, cn):
    # A certificate for the MES's application URI that no one but its holder vouches for.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:test:mes")]), critical=False)
        .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)

def keygen(d):
    # The client application's own key (the cell never sees it) and a self-signed certificate
    # for the same URI: what a rogue application would present.
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    open(f"{d}/mes-key.pem", "wb").write(pem_key(key))
    open(f"{d}/mes-pub.pem", "wb").write(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    open(f"{d}/rogue.pem", "wb").write(self_signed(key, "mes"))

async def connect(url, d, user=None, pin=None, cert="mes.pem", key="mes-key.pem", secure=True, policy=SecurityPolicyBasic256Sha256):
    c = Client(url, timeout=10)
    c.application_uri = "urn:test:mes"
    if user:
        c.set_user(user)
        c.set_password(pin)
    if secure:
        await c.set_security(policy, f"{d}/{cert}", f"{d}/{key}", server_certificate=f"{d}/server.pem", mode=SAE)
    await c.connect()
    return c

async def refused(coro):
    try:
        c = await coro
    except Exception as e:
        return type(e).__name__
    await c.disconnect()
    return None

class Seen:
    def __init__(self, names):
        self.names, self.changes, self.events = names, [], []
    def datachange_notification(self, node, val, data):
        self.changes.append([self.names.get(node.nodeid.to_string(), "?"), val, time.time()])
    def event_notification(self, ev):
        self.events.append({"message": str(ev.Message.Text), "severity": ev.Severity,
                            "source": str(ev.SourceName)})

async def run(url, d, pins, firmware, quantity):
    out = {}
    sup = await connect(url, d, "super", pins["super"])
    ns = await sup.get_namespace_index(CELL_NS)
    mi = await sup.get_namespace_index(MACHINERY_NS)
    di = await sup.get_namespace_index(DI_NS)
    machines = await sup.nodes.objects.get_child([f"{mi}:Machines"])
    cells = await machines.get_children()
    cell = cells[0]
    out["machines"] = [(await c.read_browse_name()).Name for c in cells]
    ident = {}
    for p in ["Manufacturer", "Model", "SerialNumber", "ProductInstanceUri", "SoftwareRevision"]:
        v = await (await cell.get_child([f"{di}:Identification", f"{di}:{p}"])).read_value()
        ident[p] = v.Text if hasattr(v, "Text") else v
    out["identification"] = ident
    item = await cell.get_child([f"{mi}:MachineryItemState", "0:CurrentState"])
    out["item_state_before"] = (await item.read_value()).Text
    # Browse order is the server's to choose: sort the nests by number.
    named = [((await n.read_browse_name()).Name, n) for n in await (await cell.get_child([f"{ns}:Nests"])).get_children()]
    named.sort(key=lambda x: int(x[0][len("Nest"):]))
    nests = [n for _, n in named]
    out["nests"] = [name for name, _ in named]
    states = [await n.get_child([f"{ns}:State"]) for n in nests]
    seen = Seen({s.nodeid.to_string(): i + 1 for i, s in enumerate(states)})
    sub = await sup.create_subscription(20, seen)
    await sub.subscribe_data_change(states, queuesize=200)
    await sub.subscribe_events(cell)

    # An operator may start and stop the line but not open a batch.
    oper = await connect(url, d, "oper", pins["oper"])
    ocell = (await (await oper.nodes.objects.get_child([f"{mi}:Machines"])).get_children())[0]
    args = [ua.Variant("WO-OPCUA-1", ua.VariantType.String), ua.Variant("EM-300", ua.VariantType.String),
            ua.Variant(firmware, ua.VariantType.String), ua.Variant("utility", ua.VariantType.String),
            ua.Variant(quantity, ua.VariantType.Int64), ua.Variant("OPC", ua.VariantType.String),
            ua.Variant(1000, ua.VariantType.Int64), ua.Variant(1100, ua.VariantType.Int64)]
    try:
        await ocell.call_method(f"{ns}:OpenBatch", *args)
        out["oper_open"] = None
    except Exception as e:
        out["oper_open"] = type(e).__name__
    await oper.disconnect()

    out["batch_id"] = await cell.call_method(f"{ns}:OpenBatch", *args)
    await cell.call_method(f"{ns}:StartBatch")
    running = await cell.get_child([f"{ns}:LineRunning"])
    out["running_after_start"] = await running.read_value()
    done = await cell.get_child([f"{ns}:Batch", f"{ns}:Done"])
    deadline = time.time() + 180
    while time.time() < deadline and await done.read_value() < quantity:
        await asyncio.sleep(0.2)
    out["done"] = await done.read_value()
    out["work_order"] = await (await cell.get_child([f"{ns}:Batch", f"{ns}:WorkOrder"])).read_value()
    out["passed"] = [await (await n.get_child([f"{ns}:Passed"])).read_value() for n in nests]
    out["failed"] = [await (await n.get_child([f"{ns}:Failed"])).read_value() for n in nests]
    out["last_reason_2"] = await (await nests[1].get_child([f"{ns}:LastReason"])).read_value()
    await cell.call_method(f"{ns}:StopBatch")
    await asyncio.sleep(0.5)
    out["running_after_stop"] = await running.read_value()
    out["changes"] = seen.changes
    out["events"] = seen.events
    await sup.disconnect()

    # Refused: no credentials, a wrong PIN, no secure channel, a certificate the device CA did
    # not issue, one it issued that no officer listed.
    out["anonymous"] = await refused(connect(url, d))
    out["wrong_pin"] = await refused(connect(url, d, "super", "000000"))
    out["insecure"] = await refused(connect(url, d, "super", pins["super"], secure=False))
    out["rogue_cert"] = await refused(connect(url, d, "super", pins["super"], cert="rogue.pem"))
    out["unlisted_cert"] = await refused(connect(url, d, "super", pins["super"], cert="other.pem", key="other-key.pem"))
    # The other policy works too.
    c = await connect(url, d, "oper", pins["oper"], policy=SecurityPolicyAes256Sha256RsaPss)
    out["pss"] = (await (await c.nodes.objects.get_child([f"{mi}:Machines"])).get_children()) != []
    await c.disconnect()
    print(json.dumps(out))

async def flood(url, d, n):
    # A stranger on the network presenting a new self-signed certificate at every attempt.
    refused = 0
    for i in range(n):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        open(f"{d}/s.pem", "wb").write(self_signed(key, f"stranger-{i}"))
        open(f"{d}/s-key.pem", "wb").write(pem_key(key))
        if await refused_(connect(url, d, cert="s.pem", key="s-key.pem")):
            refused += 1
    print(json.dumps({"refused": refused}))

async def refused_(coro):
    return await refused(coro) is not None

if sys.argv[1] == "keygen":
    keygen(sys.argv[2])
elif sys.argv[1] == "flood":
    asyncio.run(flood(sys.argv[2], sys.argv[3], int(sys.argv[4])))
else:
    asyncio.run(run(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5], int(sys.argv[6])))
"#;

fn python(args: &[&str], script: &Path) -> String {
    let python = std::env::var("CELL_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the asyncua client failed (asyncua missing? run through `cargo xtask test`): {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_opc_ua_client_browses_subscribes_and_runs_a_batch_and_is_refused_where_it_must_be() {
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 4,
        firmware_kib: 8,
        open_batch: false,
        faults: vec![(2, "wrong-hash".into())],
        ..CellOptions::default()
    })
    .await;
    let d = cell.path("opcua-client");
    std::fs::create_dir_all(&d).unwrap();
    let script = cell.path("opcua_client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let ds = d.to_str().unwrap().to_string();
    python(&["keygen", &ds], &script);

    // The officer has the device CA issue the server's certificate (a key made by the station
    // tool), the MES's (for the MES's own key), and one more that is not listed.
    let pubkey = d.join("mes-pub.pem");
    e2e::enable_opcua(
        &cell,
        &d,
        &[("mes", Some(&pubkey), true), ("other", None, false)],
    )
    .await;
    let station_uri = "urn:smart-meter-cell:e2e-cell";
    let clients = cell.path("opcua-clients");
    let daemon = cell.daemon().await;
    let addr = daemon.opcua_addr().expect("the OPC UA server listens");
    let url = format!("opc.tcp://127.0.0.1:{}/", addr.port());
    let pins =
        serde_json::json!({"super": cell.pins["super"], "oper": cell.pins["oper"]}).to_string();
    let fw = cell.firmware_sha.clone();
    let (s2, d2) = (script.clone(), ds.clone());
    let out =
        tokio::task::spawn_blocking(move || python(&["run", &url, &d2, &pins, &fw, "4"], &s2))
            .await
            .unwrap();
    let seen: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    // A certificate is not a public key; a P-256 key is refused for OPC UA.
    let (code, _, err) = cell.run(
        Some("officer"),
        &[
            "pki",
            "opcua-cert",
            "--usage",
            "client",
            "--name",
            "x",
            "--uri",
            "urn:x",
            "--public-key",
            &format!("{ds}/rogue.pem"),
            "--out",
            &ds,
        ],
    );
    assert_ne!(code, 0, "{err}");
    // An independent verifier: openssl checks the server's certificate against the device CA.
    let out = std::process::Command::new("openssl")
        .args(["verify", "-partial_chain", "-CAfile"])
        .arg(cell.path("opcua/ca.pem"))
        .arg(d.join("server.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(d.join("server.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    for want in [
        "URI:urn:smart-meter-cell:e2e-cell",
        "IP Address:127.0.0.1",
        "rsaEncryption",
        "Digital Signature, Non Repudiation, Key Encipherment, Data Encipherment",
        "TLS Web Server Authentication, TLS Web Client Authentication",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }

    // The machine after OPC 40001-1: in Machines, identified, its nests.
    assert_eq!(seen["machines"], serde_json::json!(["e2e-cell"]), "{seen}");
    assert_eq!(seen["identification"]["SerialNumber"], "e2e-cell");
    assert_eq!(seen["identification"]["ProductInstanceUri"], station_uri);
    assert_eq!(seen["nests"], serde_json::json!(["Nest1", "Nest2"]));
    assert_eq!(seen["item_state_before"], "NotExecuting");
    // An operator calling a supervisor's method is refused; the supervisor's batch runs.
    assert_eq!(seen["oper_open"], "BadUserAccessDenied", "{seen}");
    assert!(seen["batch_id"].as_i64().is_some_and(|b| b > 0), "{seen}");
    assert_eq!(seen["running_after_start"], true);
    assert_eq!(seen["done"], 4, "{seen}");
    assert_eq!(seen["work_order"], "WO-OPCUA-1");
    assert_eq!(seen["running_after_stop"], false);
    // The subscription saw each nest go busy and come back with a result.
    for nest in [1, 2] {
        let states: Vec<&str> = seen["changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c[0] == nest)
            .map(|c| c[1].as_str().unwrap())
            .collect();
        assert!(states.contains(&"Busy"), "nest {nest}: {states:?}");
        assert!(
            states.contains(&"Pass") || states.contains(&"Idle"),
            "nest {nest}: {states:?}"
        );
    }
    // Nest 2's first meter reported the wrong firmware: one alarm event, in words.
    let firmware_events: Vec<&serde_json::Value> = seen["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .contains("firmware check failed")
        })
        .collect();
    assert_eq!(firmware_events.len(), 1, "{seen}");
    assert_eq!(firmware_events[0]["source"], "Nest 2");
    assert_eq!(firmware_events[0]["severity"], 900);
    assert_eq!(seen["failed"][1], 1, "{seen}");
    assert!(
        seen["last_reason_2"]
            .as_str()
            .is_some_and(|r| r.is_empty() || r.contains("image hash")),
        "{seen}"
    );
    // Refused where it must be.
    for k in [
        "anonymous",
        "wrong_pin",
        "insecure",
        "rogue_cert",
        "unlisted_cert",
    ] {
        assert!(seen[k].is_string(), "{k} was let in: {seen}");
    }
    assert_eq!(seen["pss"], true);

    // What the client did is the journal's and the audit log's: the batch it opened is done,
    // its log-ins came over OPC UA, the wrong PIN is recorded.
    let db = cell.db();
    let q = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        q(
            "SELECT count(*) FROM meters m JOIN batches b ON b.id = m.batch_id WHERE b.work_order = 'WO-OPCUA-1' AND m.state = 'done'"
        ),
        4
    );
    assert!(
        q("SELECT count(*) FROM audit WHERE kind = 'auth.success' AND details LIKE '%opc-ua%'")
            >= 2
    );
    assert_eq!(
        q("SELECT count(*) FROM audit WHERE kind = 'batch.opened' AND actor = 'super'"),
        1
    );
    assert!(
        q("SELECT count(*) FROM audit WHERE kind = 'auth.failure' AND details LIKE '%opc-ua%'")
            >= 1
    );
    assert!(q("SELECT count(*) FROM audit WHERE kind = 'auth.forbidden' AND actor = 'oper'") >= 1);
    daemon.stop().await.unwrap();

    // Refused certificates are kept for the officer, but only the newest few: a stranger
    // presenting a new certificate at every attempt cannot fill the journal's disk.
    let rejected = cell.path("opcua-pki/rejected");
    let daemon = cell.daemon().await;
    let addr = daemon.opcua_addr().unwrap();
    let url = format!("opc.tcp://127.0.0.1:{}/", addr.port());
    let (s3, d3) = (script.clone(), ds.clone());
    let n = station::opcua::REJECTED_KEPT + 8;
    let out =
        tokio::task::spawn_blocking(move || python(&["flood", &url, &d3, &n.to_string()], &s3))
            .await
            .unwrap();
    assert!(out.contains(&format!("\"refused\": {n}")), "{out}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let kept = std::fs::read_dir(&rejected).unwrap().count();
    assert!(
        (1..=station::opcua::REJECTED_KEPT).contains(&kept),
        "{kept} refused certificates kept"
    );
    daemon.stop().await.unwrap();

    // A client certificate the device CA did not issue, listed by mistake: the daemon does not
    // start, and says which file.
    std::fs::copy(d.join("rogue.pem"), clients.join("rogue.pem")).unwrap();
    let err = station::daemon::Daemon::start(
        station::config::Config::load(&cell.config).unwrap(),
        "stationd",
    )
    .await
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(
        err.contains("rogue.pem") && err.contains("device CA"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}
