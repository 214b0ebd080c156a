//! The async host driver against the plain meter loop, over an in-memory pipe and over a real
//! pseudo-terminal opened through tokio-serial.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

use std::sync::Arc;

use line_protocol::crypto;
use line_protocol::firmware::{PlanParams, TransferPlan};
use line_protocol::host::HostConfig;
use line_protocol::io::{self, HostLink, LinkError, PortAddr, TranscriptSigner};
use line_protocol::meter::MeterSession;
use line_protocol::msg::{Identity, Message};
use line_protocol::testkit::{MemMeter, STATION_DER, SeededRng, station_sign};
use line_protocol::timing::LinkTiming;
use p256::elliptic_curve::Generate;

struct SoftSigner;

impl TranscriptSigner for SoftSigner {
    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        Ok(station_sign(message))
    }
}

fn image(n: usize) -> Vec<u8> {
    let mut rng = SeededRng::new(7);
    let mut v = vec![0u8; n];
    rand_core::Rng::fill_bytes(&mut rng, &mut v);
    v
}

async fn provision(link: &mut HostLink, img: &[u8]) -> MeterSummary {
    let ack = link.hello().await.unwrap();
    let kt = p256::SecretKey::generate_from_rng(&mut SeededRng::new(1));
    let mut kt_pub = [0u8; 65];
    kt_pub.copy_from_slice(&kt.public_key().to_sec1_bytes());
    link.open_channel(kt_pub, vec![STATION_DER.to_vec()], &SoftSigner)
        .await
        .unwrap();
    let id = Identity {
        serial: "S1".into(),
        system_title: [1; 8],
        ldn: "L1".into(),
    };
    assert_eq!(
        link.call(&Message::Identity(id)).await.unwrap(),
        Message::Ack
    );
    let neg = link.session().negotiated().unwrap();
    let plan = TransferPlan::new(
        img,
        PlanParams {
            max_payload: neg.max_payload,
            max_block: neg.max_block,
            compress: neg.compression,
        },
    );
    let have = match link
        .call(&Message::FwBegin {
            size: plan.size,
            sha256: plan.sha256,
            compression: u8::from(neg.compression),
        })
        .await
        .unwrap()
    {
        Message::FwBeginRsp { have } => have,
        other => panic!("{other:?}"),
    };
    let mut last = 0;
    link.send_firmware(Arc::clone(&plan), have, &mut |done, _| last = done)
        .await
        .unwrap();
    assert_eq!(last, img.len() as u64, "progress reaches the whole image");
    let result = match link.call_sized(&Message::FwEnd, plan.size).await.unwrap() {
        Message::FwResult(r) => r,
        other => panic!("{other:?}"),
    };
    MeterSummary {
        uid: ack.uid,
        status: result.status,
        sha: result.sha256,
    }
}

struct MeterSummary {
    uid: Vec<u8>,
    status: u16,
    sha: [u8; 32],
}

#[tokio::test]
async fn host_link_over_memory() {
    let (a, b) = io::memory_pair(64 * 1024);
    let meter = tokio::spawn(async move {
        let mut session = MeterSession::new(8192);
        let mut app = MemMeter::new(&[9; 8]);
        io::serve_meter(b, &mut session, &mut app).await.unwrap();
        app
    });
    let mut link = HostLink::new(
        a,
        HostConfig::default(),
        LinkTiming {
            baud: 921_600,
            latency_ms: 0,
        },
    );
    let img = image(256 * 1024);
    let s = provision(&mut link, &img).await;
    assert_eq!(s.uid, vec![9; 8]);
    assert_eq!(s.status, 0);
    assert_eq!(s.sha, crypto::sha256(&img));
    drop(link);
    let app = meter.await.unwrap();
    assert_eq!(app.staging, img);
}

#[tokio::test]
async fn host_link_over_a_pseudo_terminal() {
    let (master, _slave, path) = io::pty_pair().unwrap();
    let meter = tokio::spawn(async move {
        let mut session = MeterSession::new(8192);
        let mut app = MemMeter::new(&[7; 8]);
        let _ = io::serve_meter(master, &mut session, &mut app).await;
        app
    });
    let port = io::open(&PortAddr::parse(&path).unwrap(), 115_200)
        .await
        .unwrap();
    let mut link = HostLink::new(
        port,
        HostConfig::default(),
        LinkTiming {
            baud: 115_200,
            latency_ms: 4,
        },
    );
    let img = image(64 * 1024);
    let s = provision(&mut link, &img).await;
    assert_eq!(s.status, 0);
    assert_eq!(s.sha, crypto::sha256(&img));
    assert_eq!(link.frame_stats().dropped(), 0);
    meter.abort();
}

#[tokio::test]
async fn silent_meter_times_out_with_the_request_named() {
    let (a, _b) = io::memory_pair(1024);
    let mut link = HostLink::new(
        a,
        HostConfig::default(),
        LinkTiming {
            baud: 921_600,
            latency_ms: 0,
        },
    );
    tokio::time::pause();
    match link.hello().await {
        Err(LinkError::Timeout { what: "HELLO", .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(link.stats().retries, 2);
}

async fn open_session(link: &mut HostLink) {
    link.hello().await.unwrap();
    let kt = p256::SecretKey::generate_from_rng(&mut SeededRng::new(1));
    let mut kt_pub = [0u8; 65];
    kt_pub.copy_from_slice(&kt.public_key().to_sec1_bytes());
    link.open_channel(kt_pub, vec![STATION_DER.to_vec()], &SoftSigner)
        .await
        .unwrap();
}

fn fast_timing() -> LinkTiming {
    LinkTiming {
        baud: 921_600,
        latency_ms: 0,
    }
}

fn identity(serial: &str) -> Identity {
    Identity {
        serial: serial.into(),
        system_title: [1; 8],
        ldn: "L1".into(),
    }
}

#[tokio::test]
async fn call_many_answers_in_order_and_resends_what_was_lost() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, mut b) = io::memory_pair(64 * 1024);
    // A meter whose answers to its third read (the first batch of requests) are lost on the line.
    let meter = tokio::spawn(async move {
        let mut session = MeterSession::new(8192);
        let mut app = MemMeter::new(&[5; 8]);
        let mut rng = SeededRng::new(3);
        let mut buf = vec![0u8; 16 * 1024];
        let mut reads = 0;
        let mut lost = 0;
        loop {
            let n = b.read(&mut buf).await.unwrap();
            if n == 0 {
                return lost;
            }
            reads += 1;
            let out = session.receive(&buf[..n], &mut app, &mut rng);
            if reads == 3 {
                lost += out.bytes.len();
                continue;
            }
            b.write_all(&out.bytes).await.unwrap();
        }
    });
    let mut link = HostLink::new(a, HostConfig::default(), fast_timing());
    open_session(&mut link).await;
    let answers = link
        .call_many(&[
            Message::Identity(identity("S1")),
            Message::PutAnchor {
                kind: line_protocol::msg::AnchorKind::FirmwareVerification,
                index: 0,
                der: STATION_DER.to_vec(),
            },
            Message::Status,
        ])
        .await
        .unwrap();
    assert_eq!(answers.len(), 3);
    assert_eq!(answers[0], Message::Ack);
    assert_eq!(answers[1], Message::Ack);
    match &answers[2] {
        Message::StatusRsp(s) => {
            assert_eq!(s.identity, 1, "STATUS ran after IDENTITY");
            assert_eq!(s.anchors, 1, "STATUS ran after PUT_ANCHOR");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        link.stats().retries >= 1,
        "the lost answers were asked again"
    );
    drop(link);
    assert!(
        meter.await.unwrap() > 0,
        "the meter's first answers were lost"
    );
}

#[tokio::test]
async fn call_many_names_the_refused_request() {
    let (a, b) = io::memory_pair(64 * 1024);
    let meter = tokio::spawn(async move {
        let mut session = MeterSession::new(8192);
        let mut app = MemMeter::new(&[6; 8]);
        let _ = io::serve_meter(b, &mut session, &mut app).await;
    });
    let mut link = HostLink::new(a, HostConfig::default(), fast_timing());
    open_session(&mut link).await;
    match link
        .call_many(&[
            Message::Identity(identity("S1")),
            Message::Identity(identity("S2")),
        ])
        .await
    {
        Err(LinkError::Refused {
            what: "IDENTITY",
            code: line_protocol::msg::ErrorCode::IdentityMismatch,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    meter.abort();
}

/// A meter that answers FW_BEGIN and then only babbles — bytes that are no frame and
/// acknowledge nothing, as idle fill or a noisy line would look — never holds the host: the
/// transfer gives up on acknowledged progress, not on bytes received.
#[tokio::test]
async fn a_babbling_meter_does_not_hold_the_firmware_transfer() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host_side, mut relay_host) = io::memory_pair(64 * 1024);
    let (mut relay_meter, meter_side) = io::memory_pair(64 * 1024);
    let meter = tokio::spawn(async move {
        let mut session = MeterSession::new(8192);
        let mut app = MemMeter::new(&[3; 8]);
        let _ = io::serve_meter(meter_side, &mut session, &mut app).await;
    });
    let babble = Arc::new(AtomicBool::new(false));
    let b2 = Arc::clone(&babble);
    let relay = tokio::spawn(async move {
        let (mut hb, mut mb) = ([0u8; 4096], [0u8; 4096]);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(2));
        loop {
            tokio::select! {
                n = relay_host.read(&mut hb) => {
                    let Ok(n) = n else { return };
                    if n == 0 { return }
                    // Once babbling, the meter hears nothing more: no FW_DATA is acknowledged.
                    if !b2.load(Ordering::SeqCst) && relay_meter.write_all(&hb[..n]).await.is_err() {
                        return;
                    }
                }
                n = relay_meter.read(&mut mb) => {
                    let Ok(n) = n else { return };
                    if n == 0 { return }
                    if relay_host.write_all(&mb[..n]).await.is_err() { return }
                }
                _ = tick.tick() => {
                    if b2.load(Ordering::SeqCst) && relay_host.write_all(&[0x5A; 16]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut link = HostLink::new(host_side, HostConfig::default(), fast_timing());
    open_session(&mut link).await;
    let neg = link.session().negotiated().unwrap();
    let plan = TransferPlan::new(
        &image(128 * 1024),
        PlanParams {
            max_payload: neg.max_payload,
            max_block: neg.max_block,
            compress: neg.compression,
        },
    );
    let have = match link
        .call(&Message::FwBegin {
            size: plan.size,
            sha256: plan.sha256,
            compression: u8::from(neg.compression),
        })
        .await
        .unwrap()
    {
        Message::FwBeginRsp { have } => have,
        other => panic!("{other:?}"),
    };
    babble.store(true, Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        link.send_firmware(Arc::clone(&plan), have, &mut |_, _| {}),
    )
    .await
    .expect("the transfer gave up on its own, babble or not");
    match r {
        Err(LinkError::Timeout {
            what: "FW_DATA", ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t0.elapsed()
    );
    relay.abort();
    meter.abort();
}

/// A meter that advertised a window of one never has more than one request in flight, even when
/// the station has several independent ones (`call_many`), over a real pseudo-terminal.
#[tokio::test]
async fn call_many_keeps_to_the_meters_window() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut master, _slave, path) = io::pty_pair().unwrap();
    // The most requests handled from one read: requests that were in flight together.
    let most = Arc::new(AtomicUsize::new(0));
    let seen = most.clone();
    let meter = tokio::spawn(async move {
        let mut session = MeterSession::new(8192);
        let mut app = MemMeter::new(&[6; 8]);
        app.info.window = 1;
        let mut rng = SeededRng::new(4);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match master.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let out = session.receive(&buf[..n], &mut app, &mut rng);
            let handled = out
                .events
                .iter()
                .filter(|e| matches!(e, line_protocol::meter::MeterEvent::Handled { .. }))
                .count();
            seen.fetch_max(handled, Ordering::SeqCst);
            if session.is_secure() {
                // A meter that takes its time: the next request would pile up behind.
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
            if master.write_all(&out.bytes).await.is_err() {
                return;
            }
        }
    });
    let port = io::open(&PortAddr::parse(&path).unwrap(), 921_600)
        .await
        .unwrap();
    let mut link = HostLink::new(port, HostConfig::default(), fast_timing());
    open_session(&mut link).await;
    assert_eq!(link.session().negotiated().unwrap().window, 1);
    let answers = link
        .call_many(&[
            Message::Identity(identity("W1")),
            Message::Status,
            Message::Status,
            Message::Status,
        ])
        .await
        .unwrap();
    assert_eq!(answers.len(), 4);
    assert_eq!(link.stats().retries, 0);
    meter.abort();
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "requests in flight together"
    );
}

/// A queued request's clock starts when the one before it is answered (spec 6.3): when a whole
/// burst of answers is lost, the host asks again after one request's allowance, not after the
/// sum of the burst's (in virtual time, so the figure is exact).
#[tokio::test]
async fn a_lost_burst_is_asked_again_after_one_allowance() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (a, mut b) = io::memory_pair(64 * 1024);
    let meter = tokio::spawn(async move {
        let mut session = MeterSession::new(8192);
        let mut app = MemMeter::new(&[8; 8]);
        let mut rng = SeededRng::new(5);
        let mut buf = vec![0u8; 16 * 1024];
        let mut reads = 0;
        loop {
            let n = b.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            reads += 1;
            let out = session.receive(&buf[..n], &mut app, &mut rng);
            if reads == 3 {
                continue; // the first burst's answers are lost
            }
            b.write_all(&out.bytes).await.unwrap();
        }
    });
    let mut link = HostLink::new(a, HostConfig::default(), fast_timing());
    open_session(&mut link).await;
    tokio::time::pause();
    let burst = [
        Message::Status,
        Message::Status,
        Message::Status,
        Message::Status,
    ];
    let one = fast_timing().request_timeout_ms(line_protocol::msg::ty::STATUS, 64, 256, 0);
    let t0 = tokio::time::Instant::now();
    let answers = link.call_many(&burst).await.unwrap();
    let waited = t0.elapsed().as_millis() as u64;
    assert_eq!(answers.len(), 4);
    assert_eq!(link.stats().retries, 1);
    assert!(
        waited > one / 2 && waited < 2 * one,
        "asked again after {waited} ms; one STATUS allowance is {one} ms"
    );
    meter.abort();
}
