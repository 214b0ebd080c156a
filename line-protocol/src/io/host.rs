//! The async host driver: one type that owns a nest's transport, its writer task, the host
//! session and the deadlines.
//!
//! Reads happen in the caller's task; writes go through a dedicated task so that a frame being
//! clocked out never blocks the reading of acknowledgements. Deadlines come from
//! [`LinkTiming`]: they scale with the payload and the baud rate.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Transport, system_rng};
use crate::Violation;
use crate::firmware::{FirmwareSender, SenderStats, TransferPlan};
use crate::frame::FrameStats;
use crate::host::{HostConfig, HostError, HostSession, Inbound};
use crate::msg::{ErrorCode, HelloAck, Message, ty};
use crate::timing::LinkTiming;

/// Signs the channel transcript with the station identity key (the HSM implements it).
pub trait TranscriptSigner {
    /// A DER ECDSA P-256/SHA-256 signature over `message`.
    fn sign(&self, message: &[u8]) -> impl Future<Output = Result<Vec<u8>, String>> + Send;
}

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Reading or writing the port failed.
    #[error("link i/o error: {0}; check the cable, the adapter and the port name")]
    Io(#[from] std::io::Error),
    /// The other end closed the link.
    #[error("the link closed; check that the meter is seated and the port is still present")]
    Closed,
    /// No answer in time.
    #[error("meter did not answer {what} within {ms} ms")]
    Timeout {
        /// The request.
        what: &'static str,
        /// The deadline.
        ms: u64,
    },
    /// The meter refused a request.
    #[error("meter refused {what}: {code}{}", if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    Refused {
        /// The request.
        what: &'static str,
        /// The code.
        code: ErrorCode,
        /// The meter's detail.
        detail: String,
    },
    /// The meter no longer has the channel (it rebooted or dropped it); reconnect to resume.
    #[error("meter dropped the secure channel: {code}")]
    ChannelLost {
        /// Why, as the meter said.
        code: ErrorCode,
    },
    /// A security violation: the session is over and an alarm is due.
    #[error("security violation on the line: {0}")]
    Security(Violation),
    /// The meter answered with something that does not fit the request.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The session refused the operation.
    #[error(transparent)]
    Session(#[from] HostError),
    /// The transcript could not be signed.
    #[error("station could not sign the channel transcript: {0}")]
    Signer(String),
}

/// Counters of one link, for health reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes written.
    pub bytes_out: u64,
    /// Requests retried after a timeout.
    pub retries: u64,
    /// Frames that were ignored as stale or unexpected.
    pub ignored: u64,
    /// Frames whose payload did not decode.
    pub undecodable: u64,
    /// Firmware transfer counters (last transfer).
    pub firmware: SenderStats,
}

/// A nest's link to its meter.
pub struct HostLink {
    reader: ReadHalf<Transport>,
    tx: mpsc::Sender<Vec<u8>>,
    writer: JoinHandle<std::io::Result<()>>,
    session: HostSession,
    timing: LinkTiming,
    inbox: VecDeque<Inbound>,
    rbuf: Vec<u8>,
    epoch: Instant,
    stats: LinkStats,
    closed: bool,
    writer_awaited: bool,
}

impl std::fmt::Debug for HostLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLink")
            .field("phase", &self.session.phase())
            .field("timing", &self.timing)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// How many times an unanswered request is sent in all.
const ATTEMPTS: u32 = 3;

fn max_response(msg_type: u8) -> usize {
    match msg_type {
        ty::KEYGEN => 2100,
        ty::ATTEST => 1200,
        ty::STATUS => 64,
        _ => 140,
    }
}

impl HostLink {
    /// Wraps a transport. Must be called inside a tokio runtime.
    pub fn new(transport: Transport, cfg: HostConfig, timing: LinkTiming) -> HostLink {
        let (reader, mut writer) = tokio::io::split(transport);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        let writer = tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                writer.write_all(&bytes).await?;
                writer.flush().await?;
            }
            Ok(())
        });
        HostLink {
            reader,
            tx,
            writer,
            session: HostSession::new(cfg),
            timing,
            inbox: VecDeque::new(),
            rbuf: vec![0u8; 16 * 1024],
            epoch: Instant::now(),
            stats: LinkStats::default(),
            closed: false,
            writer_awaited: false,
        }
    }

    /// The session (phase, negotiation, transcript hash, meter hello).
    pub fn session(&self) -> &HostSession {
        &self.session
    }

    /// The link's timing.
    pub fn timing(&self) -> LinkTiming {
        self.timing
    }

    /// Has the transport closed or failed (reopen the port before using this link again)?
    pub fn is_closed(&self) -> bool {
        self.closed || self.writer.is_finished()
    }

    /// Counters.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Line counters of the decoder.
    pub fn frame_stats(&self) -> FrameStats {
        self.session.frame_stats()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn send(&mut self, bytes: Vec<u8>) -> Result<(), LinkError> {
        self.stats.bytes_out += bytes.len() as u64;
        if self.tx.send(bytes).await.is_err() {
            self.closed = true;
            return Err(self.writer_error().await);
        }
        Ok(())
    }

    async fn writer_error(&mut self) -> LinkError {
        // A JoinHandle may be awaited once; later failures just report the link closed.
        if std::mem::replace(&mut self.writer_awaited, true) {
            return LinkError::Closed;
        }
        match (&mut self.writer).await {
            Ok(Err(e)) => LinkError::Io(e),
            _ => LinkError::Closed,
        }
    }

    /// Reads until something arrives or `deadline` passes. False on deadline.
    async fn pump(&mut self, deadline: Instant) -> Result<bool, LinkError> {
        let read = tokio::time::timeout_at(deadline, self.reader.read(&mut self.rbuf)).await;
        match read {
            Err(_) => Ok(false),
            Ok(Err(e)) => {
                self.closed = true;
                Err(LinkError::Io(e))
            }
            Ok(Ok(0)) => {
                self.closed = true;
                Err(LinkError::Closed)
            }
            Ok(Ok(n)) => {
                let events = self.session.receive(&self.rbuf[..n]);
                self.inbox.extend(events);
                Ok(true)
            }
        }
    }

    /// Takes the next event that concerns the caller, counting and skipping noise.
    fn next_event(&mut self) -> Option<Result<(u32, Message), LinkError>> {
        while let Some(ev) = self.inbox.pop_front() {
            match ev {
                Inbound::Message { reference, msg, .. } => return Some(Ok((reference, msg))),
                Inbound::ChannelLost { code, .. } => {
                    return Some(Err(LinkError::ChannelLost { code }));
                }
                Inbound::Violation(v) => return Some(Err(LinkError::Security(v))),
                Inbound::Dropped(_) => {}
                Inbound::Ignored { .. } => self.stats.ignored += 1,
                Inbound::Undecodable { .. } => self.stats.undecodable += 1,
            }
        }
        None
    }

    /// Waits for the response to one of `refs` until `deadline`.
    async fn await_response(
        &mut self,
        refs: &[u32],
        deadline: Instant,
    ) -> Result<Option<Message>, LinkError> {
        Ok(self
            .await_response_ref(refs, deadline)
            .await?
            .map(|(_, msg)| msg))
    }

    /// As [`HostLink::await_response`], with the reference the response answers.
    async fn await_response_ref(
        &mut self,
        refs: &[u32],
        deadline: Instant,
    ) -> Result<Option<(u32, Message)>, LinkError> {
        loop {
            while let Some(ev) = self.next_event() {
                let (reference, msg) = ev?;
                if refs.contains(&reference) {
                    return Ok(Some((reference, msg)));
                }
                self.stats.ignored += 1;
            }
            if !self.pump(deadline).await? {
                return Ok(None);
            }
        }
    }

    /// A session ended by a violation refuses everything after it, naming the violation.
    fn check_alive(&self) -> Result<(), LinkError> {
        match self.session.violation() {
            Some(v) => Err(LinkError::Security(v)),
            None => Ok(()),
        }
    }

    /// Discards whatever is queued (before starting a new session on the same line).
    fn flush_inbox(&mut self) {
        self.inbox.clear();
    }

    /// HELLO, retried; returns the meter's identity and capabilities.
    pub async fn hello(&mut self) -> Result<HelloAck, LinkError> {
        self.hello_attempts(ATTEMPTS).await
    }

    /// HELLO with at most `attempts` tries (1 to probe an empty nest quickly).
    pub async fn hello_attempts(&mut self, attempts: u32) -> Result<HelloAck, LinkError> {
        self.flush_inbox();
        let attempts = attempts.max(1);
        let ms = self.timing.request_timeout_ms(ty::HELLO, 32, 200, 0);
        let mut refs = Vec::new();
        for attempt in 0..attempts {
            let mut nonce = [0u8; 16];
            rand_core::Rng::fill_bytes(&mut system_rng(), &mut nonce);
            refs.push(self.session.next_seq());
            // A leading delimiter ends whatever partial frame an earlier connection left on the
            // line, so that the meter hears this HELLO whole.
            let mut bytes = vec![crate::frame::DELIMITER];
            bytes.extend(self.session.hello(nonce));
            self.send(bytes).await?;
            let deadline = Instant::now() + Duration::from_millis(ms);
            // Only the latest HELLO's answer counts; the session ignores earlier ones.
            match self
                .await_response(&refs[attempt as usize..], deadline)
                .await?
            {
                Some(Message::HelloAck(ack)) => return Ok(ack),
                Some(Message::Error { code, detail }) => {
                    return Err(LinkError::Refused {
                        what: "HELLO",
                        code,
                        detail,
                    });
                }
                Some(other) => {
                    return Err(LinkError::Protocol(format!(
                        "{} in answer to HELLO",
                        other.name()
                    )));
                }
                None => {
                    if attempt + 1 < attempts {
                        self.stats.retries += 1;
                    }
                }
            }
        }
        Err(LinkError::Timeout { what: "HELLO", ms })
    }

    /// Opens the secure channel after [`HostLink::hello`]: a fresh ephemeral key, the HSM's
    /// key-transport public key, the station chain (leaf first), signed by `signer`.
    pub async fn open_channel(
        &mut self,
        kt_pub: [u8; 65],
        chain: Vec<Vec<u8>>,
        signer: &impl TranscriptSigner,
    ) -> Result<[u8; 32], LinkError> {
        let draft = self
            .session
            .prepare_open(&mut system_rng(), kt_pub, chain)?;
        let signature = signer
            .sign(&draft.to_sign)
            .await
            .map_err(LinkError::Signer)?;
        let seq = self.session.next_seq();
        let bytes = self.session.finish_open(signature)?;
        let size = bytes.len();
        let ms = self
            .timing
            .request_timeout_ms(ty::CHANNEL_OPEN, size, 64, 0);
        // A lost CHANNEL_OPEN or CHANNEL_READY: the identical frame again (spec 4.3); the meter
        // answers a repeat with the same CHANNEL_READY.
        let mut answer = None;
        for _ in 0..ATTEMPTS {
            self.send(bytes.clone()).await?;
            let deadline = Instant::now() + Duration::from_millis(ms);
            answer = self.await_response(&[seq], deadline).await?;
            if answer.is_some() {
                break;
            }
        }
        match answer {
            Some(Message::ChannelReady { .. }) => Ok(draft.th),
            Some(Message::Error { code, detail }) => Err(LinkError::Refused {
                what: "CHANNEL_OPEN",
                code,
                detail,
            }),
            Some(other) => Err(LinkError::Protocol(format!(
                "{} in answer to CHANNEL_OPEN",
                other.name()
            ))),
            None => Err(LinkError::Timeout {
                what: "CHANNEL_OPEN",
                ms,
            }),
        }
    }

    /// Sends a request on the channel and returns its response; retried on timeout (every request
    /// of the protocol is idempotent within a session). An ERROR answer becomes
    /// [`LinkError::Refused`].
    pub async fn call(&mut self, msg: &Message) -> Result<Message, LinkError> {
        self.call_sized(msg, 0).await
    }

    /// As [`HostLink::call`], with the image size that scales FW_END's deadline.
    pub async fn call_sized(&mut self, msg: &Message, size: u32) -> Result<Message, LinkError> {
        self.check_alive()?;
        let what = msg.name();
        let mut refs = Vec::new();
        let mut ms = 0;
        for attempt in 0..ATTEMPTS {
            let (seq, bytes) = self.session.request(msg)?;
            ms = self.timing.request_timeout_ms(
                msg.msg_type(),
                bytes.len(),
                max_response(msg.msg_type()),
                size,
            );
            refs.push(seq);
            self.send(bytes).await?;
            let deadline = Instant::now() + Duration::from_millis(ms);
            match self.await_response(&refs, deadline).await? {
                Some(Message::Error { code, detail }) => {
                    return Err(LinkError::Refused { what, code, detail });
                }
                Some(rsp) => return Ok(rsp),
                None => {
                    if attempt + 1 < ATTEMPTS {
                        self.stats.retries += 1;
                    }
                }
            }
        }
        Err(LinkError::Timeout { what, ms })
    }

    /// Sends independent requests back to back and returns their responses in the same order.
    ///
    /// The meter handles them in order while the rest are still on the wire, so a run of small
    /// requests costs one turnaround instead of one each — at most the negotiated `window` of
    /// them in flight at once (spec 4.2: a meter sizes its receive buffer by its window).
    /// Unanswered requests are sent again (every request is idempotent within a session), so only
    /// requests that do not depend on an earlier one of the same call may share it. The first
    /// ERROR answer becomes [`LinkError::Refused`].
    pub async fn call_many(&mut self, msgs: &[Message]) -> Result<Vec<Message>, LinkError> {
        let window = self
            .session
            .negotiated()
            .map(|n| n.window.max(1))
            .unwrap_or(1);
        let mut answers = Vec::with_capacity(msgs.len());
        for group in msgs.chunks(window) {
            answers.extend(self.call_window(group).await?);
        }
        Ok(answers)
    }

    /// [`HostLink::call_many`] for at most one window of requests.
    async fn call_window(&mut self, msgs: &[Message]) -> Result<Vec<Message>, LinkError> {
        self.check_alive()?;
        let mut answers: Vec<Option<Message>> = vec![None; msgs.len()];
        // Every sequence number sent so far, with the request it carried.
        let mut sent: Vec<(u32, usize)> = Vec::new();
        // Each request's own allowance: the meter handles them in order, so a queued request's
        // clock starts when the one before it is answered (spec 6.3), not when it was sent.
        let mut own = vec![0u64; msgs.len()];
        let mut ms = 0;
        for attempt in 0..ATTEMPTS {
            let mut bytes = Vec::new();
            for (i, msg) in msgs.iter().enumerate() {
                if answers[i].is_some() {
                    continue;
                }
                let (seq, b) = self.session.request(msg)?;
                own[i] = self.timing.request_timeout_ms(
                    msg.msg_type(),
                    b.len(),
                    max_response(msg.msg_type()),
                    0,
                );
                sent.push((seq, i));
                bytes.extend_from_slice(&b);
            }
            self.send(bytes).await?;
            let mut last = Instant::now();
            loop {
                let refs: Vec<u32> = sent
                    .iter()
                    .filter(|(_, i)| answers[*i].is_none())
                    .map(|(s, _)| *s)
                    .collect();
                let Some(next) = answers.iter().position(Option::is_none) else {
                    return Ok(answers.into_iter().flatten().collect());
                };
                ms = own[next];
                let deadline = last + Duration::from_millis(ms);
                let Some((reference, rsp)) = self.await_response_ref(&refs, deadline).await? else {
                    break;
                };
                last = Instant::now();
                let i = sent
                    .iter()
                    .find(|(s, _)| *s == reference)
                    .map(|(_, i)| *i)
                    .unwrap_or_default();
                if let Message::Error { code, detail } = rsp {
                    return Err(LinkError::Refused {
                        what: msgs[i].name(),
                        code,
                        detail,
                    });
                }
                answers[i] = Some(rsp);
            }
            if attempt + 1 < ATTEMPTS {
                self.stats.retries += 1;
            }
        }
        let what = answers
            .iter()
            .position(Option::is_none)
            .map(|i| msgs[i].name())
            .unwrap_or("a request");
        Err(LinkError::Timeout { what, ms })
    }

    /// Streams the image blocks of `plan` not yet held (`have` from FW_BEGIN_RSP) with the
    /// negotiated window, until every block is acknowledged. `progress(acked, total)` is called
    /// as acknowledgements arrive. FW_END is the caller's next step.
    pub async fn send_firmware(
        &mut self,
        plan: Arc<TransferPlan>,
        have: u32,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<SenderStats, LinkError> {
        self.check_alive()?;
        let neg = self
            .session
            .negotiated()
            .ok_or(LinkError::Session(HostError::WrongPhase("no negotiation")))?;
        let mut plan = plan;
        let mut rto = self.timing.rto_ms(neg.window, plan.params.max_payload);
        let mut tx = FirmwareSender::new(plan.clone(), have, neg.window, rto);
        let total = u64::from(plan.size);
        progress(tx.acked_bytes(), total);
        // Give up when nothing is acknowledged across several retransmission timeouts (bytes that
        // arrive but acknowledge nothing — idle fill, noise, a babbling meter — are no progress),
        // and in any case when the whole transfer takes far longer than the wire needs.
        let mut last_progress = self.now_ms();
        let overall_ms = overall_transfer_ms(&self.timing, total);
        let give_up_at = last_progress + overall_ms;
        let mut last_acked = tx.acked_bytes();
        let mut batch = Vec::with_capacity(64 * 1024);
        let mut totals = SenderStats::default();
        let mut window_mark = SenderStats::default();
        while !tx.is_complete() {
            let now = self.now_ms();
            tx.on_timer(now);
            // A lossy line: cut the rest of the image into shorter frames.
            let st = tx.stats();
            let sent = st.frames_sent - window_mark.frames_sent;
            if sent >= LOSS_WINDOW {
                let lost = (st.fast_retransmits + st.timeout_retransmits)
                    - (window_mark.fast_retransmits + window_mark.timeout_retransmits);
                window_mark = st;
                let payload = plan.params.max_payload;
                if lost * 4 > sent && payload / 2 >= MIN_ADAPTIVE_PAYLOAD {
                    let resume = tx.contiguous_acked();
                    totals = add_stats(totals, st);
                    plan = plan.replan(payload / 2);
                    rto = self.timing.rto_ms(neg.window, plan.params.max_payload);
                    tx = FirmwareSender::new(plan.clone(), resume, neg.window, rto);
                    window_mark = SenderStats::default();
                    tracing::debug!(
                        payload = payload / 2,
                        lost,
                        sent,
                        "lossy line: shorter frames"
                    );
                }
            }
            batch.clear();
            while let Some(i) = tx.next_to_send() {
                let seq = self.session.encode_block(&plan.blocks[i], &mut batch)?;
                tx.sent(i, seq, now);
            }
            if !batch.is_empty() {
                let bytes = std::mem::replace(&mut batch, Vec::with_capacity(64 * 1024));
                self.send(bytes).await?;
            }
            let stall_ms = rto * 4;
            let wake = tx
                .next_deadline()
                .unwrap_or(now + rto)
                .min(last_progress + stall_ms)
                .min(give_up_at);
            let deadline = self.epoch + Duration::from_millis(wake.max(now + 1));
            self.pump(deadline).await?;
            while let Some(ev) = self.next_event() {
                match ev? {
                    (reference, Message::FwAck(ack)) => tx.on_ack(&ack, reference),
                    (_, Message::Error { code, detail }) => {
                        return Err(LinkError::Refused {
                            what: "FW_DATA",
                            code,
                            detail,
                        });
                    }
                    (_, other) => {
                        return Err(LinkError::Protocol(format!(
                            "{} during the firmware transfer",
                            other.name()
                        )));
                    }
                }
            }
            if tx.acked_bytes() != last_acked {
                last_acked = tx.acked_bytes();
                last_progress = self.now_ms();
                progress(last_acked, total);
            } else if self.now_ms() >= last_progress + stall_ms {
                return Err(LinkError::Timeout {
                    what: "FW_DATA",
                    ms: stall_ms,
                });
            }
            if !tx.is_complete() && self.now_ms() >= give_up_at {
                return Err(LinkError::Timeout {
                    what: "the firmware transfer",
                    ms: overall_ms,
                });
            }
        }
        let totals = add_stats(totals, tx.stats());
        self.stats.firmware = totals;
        Ok(totals)
    }
}

/// The longest a whole firmware transfer of `size` bytes may take: eight times its wire time
/// (room for a lossy line's retransmissions and shorter frames, a slow flash, resumes within the
/// transfer) and a minute more.
fn overall_transfer_ms(timing: &LinkTiming, size: u64) -> u64 {
    let wire = timing.wire_ms(usize::try_from(size).unwrap_or(usize::MAX));
    wire.saturating_mul(8).saturating_add(60_000)
}

/// Frames between two looks at the loss rate.
const LOSS_WINDOW: u64 = 16;
/// Frames are never cut below this payload.
const MIN_ADAPTIVE_PAYLOAD: usize = 1024;

fn add_stats(a: SenderStats, b: SenderStats) -> SenderStats {
    SenderStats {
        frames_sent: a.frames_sent + b.frames_sent,
        fast_retransmits: a.fast_retransmits + b.fast_retransmits,
        timeout_retransmits: a.timeout_retransmits + b.timeout_retransmits,
    }
}
