//! One meter through the steps of the design: identify, secure channel, check, assign, keys,
//! trust anchors, firmware, seal, attest. The journal leads the meter: the assignment and every
//! certificate *intent* (with its serial) are committed before any key exists, the utility's
//! copies of the secret keys before the meter gets its own, and the meter is *done* only in the
//! transaction that records its verified receipt. Progress markers (keyed, flashed, sealed) are
//! written while the link carries the next step: whatever the state of a meter found in flight,
//! start-up recovery fails it whole.
//!
//! Secret keys are generated in the HSM and leave it only wrapped: under the channel's
//! key-transport key for the meter, under the batch transport key for the utility. Every
//! session object made for the meter is destroyed when it is done, whatever the outcome.
//!
//! Any failure ends the meter as *failed* with a reason a person can act on: its certificates
//! are voided and its wrapped keys deleted in the same transaction as the audit entry.

use std::sync::Arc;
use std::time::Instant;

use hsm::{AesKeySize, KeyHandle, KeyRole, MeterKeyUsage, MeterProfile};
use line_protocol::Violation;
use line_protocol::crypto::{
    KtkMethod, kcv_ec_public, ktk_derivation_data, ktk_x963_shared_info, sha256,
};
use line_protocol::firmware::PlanParams;
use line_protocol::io::{HostLink, LinkError, TranscriptSigner};
use line_protocol::msg::{
    AnchorKind, CertSlot, Curve, ErrorCode, FEATURE_REWORK, HelloAck, Identity, KeyId, KeyType,
    Lifecycle, Message, PutKey, ResetMode, WrapAlg, iface,
};
use line_protocol::receipt::Receipt;
use line_protocol::rework::ReworkToken;
use rusqlite::{OptionalExtension as _, params};

use super::{Inner, Step, nest};
use crate::audit::{NewEvent, Severity};
use crate::config::{Keygen, ModelSettings};
use crate::db::now_ms;
use crate::records::{self, BatchRow, MeterRow};

fn reused_key(why: &str) -> Failure {
    Failure::new(
        "security.reused_key",
        Severity::Critical,
        format!(
            "{why}: its random generator is broken or it is a clone; take it out of production"
        ),
    )
}

/// The start of the reason when the next serial number is already another batch's.
const NUMBER_TAKEN: &str = "the batch's next number is taken";
/// How long a nest waits for its meter's nameplate to be scanned.
const SCAN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a scanned serial's check against the factory registry may take.
const REGISTRY_CHECK: std::time::Duration = std::time::Duration::from_secs(3);
/// The start of the reason the line stops when the station's leased numbers are used up.
const LEASES_USED_UP: &str = "no leased number is left";

/// How a meter left the nest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Provisioned, attested, released.
    Done {
        /// Serial.
        serial: String,
        /// Cycle time.
        cycle_ms: u64,
    },
    /// Failed (journalled, voided, audited).
    Failed {
        /// Serial, if one was assigned.
        serial: Option<String>,
        /// Why.
        reason: String,
    },
    /// Not taken into the batch (no record): wrong model, already provisioned, unknown state.
    Refused {
        /// Why.
        reason: String,
    },
    /// Returned to blank for rework (RESET 2, or a signed REWORK for a sealed meter): the same
    /// meter, still in its nest, is provisioned again from its next HELLO.
    Reworked {
        /// What was done.
        reason: String,
    },
    /// The batch has all its meters (or no batch is open).
    NoRoom {
        /// Why.
        reason: String,
    },
}

/// The kind of a run that returned its meter to blank for rework.
const REWORKED: &str = "meter.reworked";

/// Why the run stopped.
#[derive(Debug)]
struct Failure {
    reason: String,
    kind: &'static str,
    severity: Severity,
    /// The channel is still up: release the meter so the operator removes it.
    release: bool,
    /// The meter went quiet or lost the channel: ask the nest who is there before blaming it
    /// (it may have been taken out, and the retries reached the next meter).
    probe: bool,
}

impl Failure {
    fn new(kind: &'static str, severity: Severity, reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            kind,
            severity,
            release: true,
            probe: false,
        }
    }

    fn quiet(mut self) -> Failure {
        self.release = false;
        self
    }

    fn probe(mut self) -> Failure {
        self.probe = true;
        self
    }
}

fn link_failure(step: Step, e: LinkError) -> Failure {
    let at = step.word();
    match e {
        LinkError::Timeout { what, ms } => Failure::new(
            "meter.failed",
            Severity::Warning,
            format!("meter stopped answering during {at} ({what} unanswered after {ms} ms)"),
        )
        .quiet()
        .probe(),
        LinkError::Refused { what, code, detail } => {
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            };
            Failure::new(
                "meter.failed",
                Severity::Warning,
                format!(
                    "meter refused {what} during {at}: {}{detail}",
                    code.describe()
                ),
            )
        }
        LinkError::ChannelLost { code } => Failure::new(
            "meter.failed",
            Severity::Warning,
            format!(
                "meter dropped the secure channel during {at} ({})",
                code.describe()
            ),
        )
        .quiet()
        .probe(),
        LinkError::Security(v) => {
            let kind = match v {
                Violation::Replay { .. } => "security.replay",
                Violation::Downgrade { .. } => "security.downgrade",
                _ => "security.tamper",
            };
            Failure::new(
                kind,
                Severity::Critical,
                format!("security violation during {at}: {v}"),
            )
            .quiet()
        }
        LinkError::Io(e) => Failure::new(
            "nest.link_lost",
            Severity::Warning,
            format!("link to the nest lost during {at}: {e}"),
        )
        .quiet(),
        LinkError::Closed => Failure::new(
            "nest.link_lost",
            Severity::Warning,
            format!("link to the nest closed during {at}"),
        )
        .quiet(),
        LinkError::Signer(s) => Failure::new(
            "hsm.error",
            Severity::Critical,
            format!("the HSM could not sign the channel transcript: {s}"),
        )
        .quiet(),
        other => Failure::new(
            "meter.failed",
            Severity::Warning,
            format!("protocol error during {at}: {other}"),
        ),
    }
}

fn hsm_failure(step: Step, e: hsm::Error) -> Failure {
    Failure::new(
        "hsm.error",
        Severity::Critical,
        format!("HSM error during {}: {e}", step.word()),
    )
    .quiet()
}

fn db_failure(step: Step, e: impl std::fmt::Display) -> Failure {
    Failure::new(
        "station.error",
        Severity::Critical,
        format!("journal error during {}: {e}", step.word()),
    )
    .quiet()
}

/// Meter id, serial, serial number, system title and logical device name, or why not.
type Assigned = (i64, String, i64, [u8; 8], String);

/// What the nest task hands to one run.
pub(super) struct Ctx<'a> {
    pub inner: &'a Arc<Inner>,
    pub nest: usize,
    pub operator: String,
}

/// State of one run.
struct Run {
    uid: String,
    batch: BatchRow,
    model: ModelSettings,
    /// What the batch pinned when it opened: its anchors and the interfaces to disable.
    pins: Arc<super::Pinned>,
    meter_id: Option<i64>,
    serial: Option<String>,
    identity: Option<Identity>,
    step: Step,
    /// Session objects to destroy at the end.
    scratch: Vec<KeyHandle>,
    ktk: Option<KeyHandle>,
    /// How the key-transport key was derived (line protocol section 5.3).
    ktk_method: Option<KtkMethod>,
    certs: Vec<IssuedCert>,
    /// The attestation challenge, drawn by the HSM.
    nonce: [u8; 16],
    /// The channel's transcript hash (a rework token is bound to it).
    th: [u8; 32],
    started: Instant,
}

/// The interfaces of a line-protocol `iface` mask, by name.
pub(crate) fn iface_names(mask: u16) -> String {
    let names: Vec<&str> = [
        (iface::PROVISIONING, "provisioning"),
        (iface::DEBUG, "debug"),
        (iface::OPTICAL, "optical"),
    ]
    .into_iter()
    .filter(|(bit, _)| mask & bit != 0)
    .map(|(_, n)| n)
    .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// (slot, certificate DER, subject key point) of an issued certificate.
type IssuedCert = (CertSlot, Vec<u8>, Vec<u8>);

/// A certificate intent: committed with its serial before the HSM signs.
struct Intent {
    id: i64,
    serial: [u8; 16],
    slot: CertSlot,
    usage: MeterKeyUsage,
}

/// The certificate slots a model's meters get.
fn cert_slots(model: &ModelSettings) -> Vec<(CertSlot, MeterKeyUsage)> {
    let mut slots = vec![(CertSlot::Sign, MeterKeyUsage::DigitalSignature)];
    if model.key_agreement {
        slots.push((CertSlot::KeyAgreement, MeterKeyUsage::KeyAgreement));
    }
    slots
}

fn slot_name(slot: CertSlot) -> &'static str {
    if slot == CertSlot::Sign { "sign" } else { "ka" }
}

fn hsm_curve(curve: Curve) -> hsm::Curve {
    match curve {
        Curve::P256 => hsm::Curve::P256,
        Curve::P384 => hsm::Curve::P384,
    }
}

impl Ctx<'_> {
    fn step(&self, run: &mut Run, step: Step) {
        run.step = step;
        let serial = run.serial.clone();
        self.inner.update_nest(self.nest, |n| {
            n.step = Some(step);
            n.progress = None;
            n.serial = serial;
        });
    }

    /// Runs one meter that answered HELLO with `ack`.
    pub(super) async fn provision(&self, link: &mut HostLink, ack: HelloAck) -> Outcome {
        let uid = hex::encode(&ack.uid);
        let (batch, model, pins) = match self.batch_and_model().await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let mut run = Run {
            uid: uid.clone(),
            batch,
            model,
            pins,
            meter_id: None,
            serial: None,
            identity: None,
            step: Step::Hello,
            scratch: Vec::new(),
            ktk: None,
            ktk_method: None,
            certs: Vec::new(),
            nonce: [0; 16],
            th: [0; 32],
            started: Instant::now(),
        };
        self.inner.update_nest(self.nest, |n| {
            n.uid = Some(uid.clone());
            n.serial = None;
            n.message = None;
        });
        let result = self.steps(link, &ack, &mut run).await;
        let outcome = match result {
            Ok(serial) => Outcome::Done {
                serial,
                cycle_ms: run.started.elapsed().as_millis() as u64,
            },
            Err(f) if run.meter_id.is_none() && f.kind == REWORKED => {
                self.refuse(&run, &f).await;
                Outcome::Reworked { reason: f.reason }
            }
            Err(f) if run.meter_id.is_none() && f.kind == "meter.refused" => {
                self.refuse(&run, &f).await;
                if f.release {
                    let _ = link
                        .call(&Message::Reset {
                            mode: ResetMode::Release,
                        })
                        .await;
                }
                Outcome::Refused { reason: f.reason }
            }
            Err(mut f) => {
                if f.probe {
                    self.swapped(link, &ack.uid, run.step, &mut f).await;
                }
                let reason = f.reason.clone();
                self.fail(&run, &f).await;
                // The cell's own faults: the next meter would fail the same way.
                if matches!(f.kind, "station.error" | "hsm.error") {
                    self.inner.halt(&reason).await;
                }
                if f.release {
                    let _ = link
                        .call(&Message::Reset {
                            mode: ResetMode::Release,
                        })
                        .await;
                }
                Outcome::Failed {
                    serial: run.serial.clone(),
                    reason,
                }
            }
        };
        self.cleanup(&mut run).await;
        outcome
    }

    /// A meter that went quiet or lost its channel may have been taken out, the station's
    /// retries reaching the next meter (which knows no channel): one HELLO says who is in the
    /// nest. Another UID means the meter was removed, and the failure says so, blaming neither
    /// meter; the next one is started from the nest's next HELLO.
    async fn swapped(&self, link: &mut HostLink, uid: &[u8], step: Step, f: &mut Failure) {
        if let Ok(now) = link.hello_attempts(1).await
            && now.uid != uid
        {
            f.reason = format!(
                "meter taken out of the nest during {} (another meter, UID {}, answers now)",
                step.word(),
                hex::encode(&now.uid)
            );
        }
    }

    async fn batch_and_model(
        &self,
    ) -> Result<(BatchRow, ModelSettings, Arc<super::Pinned>), Outcome> {
        let batch = self
            .inner
            .db
            .call(|c| records::open_batch(c).map_err(super::Error::from))
            .await
            .ok()
            .flatten()
            .ok_or_else(|| Outcome::NoRoom {
                reason: "no batch is open".into(),
            })?;
        if batch.done + batch.in_flight >= batch.quantity {
            return Err(Outcome::NoRoom {
                reason: if batch.done >= batch.quantity {
                    "the batch has all its meters".into()
                } else {
                    "the last meters of the batch are in progress".into()
                },
            });
        }
        let model = self
            .inner
            .cfg
            .model(&batch.model)
            .cloned()
            .ok_or_else(|| Outcome::NoRoom {
                reason: format!("model {} of the open batch is not configured", batch.model),
            })?;
        // A meter gets what the batch pinned when it opened, or nothing at all.
        let pins = match self.inner.pinned(&batch).await {
            Ok(p) => p,
            Err(reason) => {
                self.inner.halt(&reason).await;
                return Err(Outcome::NoRoom { reason });
            }
        };
        Ok((batch, model, pins))
    }

    /// The steps after HELLO. Work that does not depend on the meter's next answer (HSM
    /// operations, journal commits) runs while the link waits, and independent requests share
    /// one turnaround, so the cycle stays close to the wire time plus the meter's own work.
    async fn steps(
        &self,
        link: &mut HostLink,
        ack: &HelloAck,
        run: &mut Run,
    ) -> Result<String, Failure> {
        // 2. Secure channel, while the journal is searched for this UID.
        self.step(run, Step::Channel);
        let (channel, history) = tokio::join!(self.open_channel(link, ack, run), self.history(ack));
        channel?;
        let history = history?;

        // 3. Check, while the HSM draws the certificate serials and the attestation challenge.
        self.step(run, Step::Check);
        let slots = cert_slots(&run.model);
        let n = slots.len();
        let (checked, drawn) = tokio::join!(
            self.check(link, ack, run, history),
            self.inner.hsm.run(move |s| {
                let serials = (0..n)
                    .map(|_| hsm::cert::random_serial(s))
                    .collect::<hsm::Result<Vec<_>>>()?;
                Ok((serials, s.random(16)?))
            })
        );
        checked?;
        let (serials, nonce) = drawn.map_err(|e| hsm_failure(Step::Check, e))?;
        run.nonce.copy_from_slice(&nonce);

        // 4. Assign: serial, system title, logical device name and the certificate intents, with
        //    their serials, committed before any key exists.
        self.step(run, Step::Assign);
        let intents = self.assign(run, &slots, serials).await?;

        // 5. Keys: the meter makes its key pairs while the HSM makes the secret keys.
        self.step(run, Step::Keys);
        let (subjects, secrets) = self.keys(link, ack, run, &slots).await?;

        // 6. Secret keys and trust anchors go out, then the firmware, while the HSM signs the
        //    certificates and the journal records them.
        self.step(run, Step::Anchors);
        let mut deliveries: Vec<Message> = secrets.into_iter().map(Message::PutKey).collect();
        deliveries.extend(self.anchors(run)?);
        let issue = self.issue(run, subjects, intents);
        let deliver = async {
            link.call_many(&deliveries)
                .await
                .map_err(|e| link_failure(Step::Anchors, e))?;
            self.step(run, Step::Firmware);
            self.firmware(link, run).await
        };
        let (certs, fw_sha) = tokio::try_join!(issue, deliver)?;

        // 7. Certificates, while the journal records the firmware.
        self.step(run, Step::Seal);
        let puts: Vec<Message> = certs
            .iter()
            .map(|(slot, der, _)| Message::PutCert {
                slot: *slot,
                der: der.clone(),
            })
            .collect();
        run.certs = certs;
        let (put, flashed) = tokio::join!(link.call_many(&puts), self.flashed(run, fw_sha));
        put.map_err(|e| link_failure(Step::Seal, e))?;
        flashed?;

        // 8. Seal, with the interfaces the batch requires disabled. The journal first records
        // that SEAL is being sent: from here on recovery knows the meter may be sealed.
        let required = run.pins.disable | iface::PROVISIONING;
        self.seal_sent(run).await?;
        let answer = match link.call(&Message::Seal { disable: required }).await {
            // A meter that answers a repeated SEAL (its first SEAL_RSP lost) with LOCKED, as
            // older bootloaders do: it was blank when this session began, so it sealed now. The
            // receipt, signed with the key just certified, says how (lifecycle, interfaces).
            Err(LinkError::Refused {
                code: ErrorCode::Locked,
                ..
            }) => None,
            answer => Some(answer.map_err(|e| link_failure(Step::Seal, e))?),
        };
        crate::failpoint("provision.sealed");
        match answer {
            Some(Message::SealRsp {
                lifecycle: Lifecycle::Sealed,
                disabled,
            }) if disabled & required != required => {
                return Err(Failure::new(
                    "meter.failed",
                    Severity::Warning,
                    format!(
                        "the meter sealed with interfaces still enabled: {}",
                        iface_names(required & !disabled)
                    ),
                ));
            }
            None
            | Some(Message::SealRsp {
                lifecycle: Lifecycle::Sealed,
                ..
            }) => {}
            Some(other) => {
                return Err(Failure::new(
                    "meter.failed",
                    Severity::Warning,
                    format!("meter did not seal (answered {})", other.name()),
                ));
            }
        }

        // 9. Attest, while the journal records the seal.
        self.step(run, Step::Attest);
        let (attested, sealed) =
            tokio::join!(self.attest(link, run), self.set_state(run, "sealed"));
        sealed?;
        let (receipt, receipt_bytes, signature) = attested?;
        let serial = run.serial.clone().unwrap_or_default();
        self.done(run, &receipt, receipt_bytes, signature).await?;

        self.step(run, Step::Release);
        let _ = link
            .call(&Message::Reset {
                mode: ResetMode::Release,
            })
            .await;
        Ok(serial)
    }
    async fn open_channel(
        &self,
        link: &mut HostLink,
        ack: &HelloAck,
        run: &mut Run,
    ) -> Result<(), Failure> {
        let hsm = self.inner.hsm.clone();
        // The key transport both sides offer (the host offers X9.63 only where its HSM does it):
        // a meter that knows only the AES-ECB one cannot be given keys by an HSM without it.
        let method = link.session().ktk_method().unwrap_or(KtkMethod::AesEcb);
        if method == KtkMethod::AesEcb && !hsm.mechanisms().ktk_aes_ecb {
            return Err(Failure::new(
                "meter.refused",
                Severity::Warning,
                format!(
                    "the meter offers only the AES-ECB key transport, which this HSM cannot derive ({}); provision meters whose bootloader offers the X9.63 key transport (line protocol 5.3, feature bit 3)",
                    hsm.mechanisms().chosen_ktk()
                ),
            ));
        }
        let (kt, kt_pub) = hsm
            .run(|s| s.generate_kt_keypair())
            .await
            .map_err(|e| hsm_failure(Step::Channel, e))?;
        run.scratch.push(kt.clone());
        let signer = self.inner.keys.transcript_signer(&hsm);
        let chain = self.inner.keys.station_chain.clone();
        let th = match link.open_channel(kt_pub, chain, &signer).await {
            Ok(th) => th,
            Err(LinkError::Refused {
                code: ErrorCode::BadCertChain | ErrorCode::BadSignature,
                detail,
                ..
            }) => {
                return Err(Failure::new(
                    "meter.refused",
                    Severity::Warning,
                    format!("the meter's bootloader does not trust this station ({detail}); check the provisioning root of this model"),
                )
                .quiet());
            }
            Err(e) => return Err(link_failure(Step::Channel, e)),
        };
        let eph = ack.eph_pub;
        let ktk = match method {
            KtkMethod::AesEcb => {
                let data = ktk_derivation_data(&th);
                hsm.run(move |s| s.derive_ktk(&kt, &eph, &data)).await
            }
            KtkMethod::X963 => {
                let info = ktk_x963_shared_info(&th);
                hsm.run(move |s| s.derive_ktk_x963(&kt, &eph, &info)).await
            }
        }
        .map_err(|e| hsm_failure(Step::Channel, e))?;
        run.scratch.push(ktk.clone());
        run.ktk = Some(ktk);
        run.th = th;
        run.ktk_method = Some(method);
        Ok(())
    }

    /// This UID's earlier records, and whether a supervisor approved a rework of it.
    async fn history(&self, ack: &HelloAck) -> Result<(Vec<MeterRow>, bool), Failure> {
        let uid = hex::encode(&ack.uid);
        self.inner
            .db
            .call(move |c| -> super::Result<(Vec<MeterRow>, bool)> {
                let rows = records::meters_by_uid(c, &uid)?;
                let rework = c.query_row(
                    "SELECT count(*) FROM reworks WHERE uid = ?1 AND used_at IS NULL",
                    [&uid],
                    |r| r.get::<_, i64>(0),
                )? > 0;
                Ok((rows, rework))
            })
            .await
            .map_err(|e| db_failure(Step::Check, e))
    }

    async fn check(
        &self,
        link: &mut HostLink,
        ack: &HelloAck,
        run: &Run,
        (history, rework): (Vec<MeterRow>, bool),
    ) -> Result<(), Failure> {
        if ack.model != run.batch.model {
            return Err(Failure::new(
                "meter.refused",
                Severity::Notice,
                format!(
                    "meter model {} does not match batch {} (model {})",
                    ack.model, run.batch.work_order, run.batch.model
                ),
            ));
        }
        // The release must fit the meter's slot: found now, before any key is made for it.
        let fw_id = run.batch.firmware_id;
        let size: i64 = self
            .inner
            .db
            .call(move |c| -> super::Result<i64> {
                Ok(
                    c.query_row("SELECT size FROM firmware WHERE id = ?1", [fw_id], |r| {
                        r.get(0)
                    })?,
                )
            })
            .await
            .map_err(|e| db_failure(Step::Check, e))?;
        if size > i64::from(ack.slot_size) {
            return Err(Failure::new(
                "meter.refused",
                Severity::Warning,
                format!(
                    "the firmware release ({size} bytes) does not fit the meter's slot ({} bytes); this meter cannot take batch {}'s release",
                    ack.slot_size, run.batch.work_order
                ),
            ));
        }
        if let Some(live) = history.iter().find(|m| m.state != "failed") {
            return Err(Failure::new(
                "meter.duplicate_uid",
                Severity::Critical,
                format!(
                    "UID {} is already provisioned (serial {}, batch {}); this meter is a duplicate — quarantine it",
                    run.uid,
                    live.serial.clone().unwrap_or_default(),
                    live.batch_id
                ),
            ));
        }
        if ack.lifecycle != Lifecycle::Blank {
            if history.is_empty() {
                return Err(Failure::new(
                    "meter.unknown_lifecycle",
                    Severity::Critical,
                    format!(
                        "meter reports lifecycle {} but this cell never provisioned UID {}; quarantine it",
                        ack.lifecycle.name(),
                        run.uid
                    ),
                ));
            }
            if !rework {
                return Err(Failure::new(
                    "meter.refused",
                    Severity::Notice,
                    format!(
                        "meter failed earlier ({}); a supervisor must approve a rework first",
                        history
                            .last()
                            .and_then(|m| m.failure.clone())
                            .unwrap_or_default()
                    ),
                ));
            }
            if ack.lifecycle == Lifecycle::Sealed {
                return self.rework_sealed(link, ack, run).await;
            }
            link.call(&Message::Reset {
                mode: ResetMode::FactoryWipe,
            })
            .await
            .map_err(|e| link_failure(Step::Check, e))?;
            return Err(Failure::new(
                REWORKED,
                Severity::Notice,
                "meter wiped for rework (RESET 2); provisioning it again",
            )
            .quiet());
        }
        // A blank meter must also be empty.
        let status = match link
            .call(&Message::Status)
            .await
            .map_err(|e| link_failure(Step::Check, e))?
        {
            Message::StatusRsp(s) => s,
            other => {
                return Err(Failure::new(
                    "meter.failed",
                    Severity::Warning,
                    format!("STATUS answered with {}", other.name()),
                ));
            }
        };
        if status.lifecycle != Lifecycle::Blank as u8
            || status.identity != 0
            || status.certs != 0
            || status.keys != 0
        {
            return Err(Failure::new(
                "meter.unknown_lifecycle",
                Severity::Critical,
                format!(
                    "meter claims to be blank but holds data (status lifecycle {}, identity {}, certificates {:#04b}); quarantine it",
                    status.lifecycle, status.identity, status.certs
                ),
            ));
        }
        if rework {
            let uid = run.uid.clone();
            let _ = self
                .inner
                .db
                .call(move |c| -> super::Result<()> {
                    c.execute(
                        "UPDATE reworks SET used_at = ?1 WHERE uid = ?2 AND used_at IS NULL",
                        params![now_ms(), uid],
                    )?;
                    Ok(())
                })
                .await;
        }
        Ok(())
    }

    /// A sealed meter whose rework a supervisor approved: the station signs, in the HSM, a token
    /// bound to the meter's UID, this channel and the signing certificate the cell issued to it
    /// (line protocol 4.16); the meter checks it and returns to blank. The journal leads: the
    /// approval is used and the token is in the audit log before REWORK goes out.
    async fn rework_sealed(
        &self,
        link: &mut HostLink,
        ack: &HelloAck,
        run: &Run,
    ) -> Result<(), Failure> {
        if ack.features & FEATURE_REWORK == 0 {
            return Err(Failure::new(
                "meter.refused",
                Severity::Notice,
                "this sealed meter's bootloader cannot be reworked over the jig (it does not offer REWORK, line protocol 4.16); send it to the rework bench",
            ));
        }
        let uid = run.uid.clone();
        let issued: Option<Vec<u8>> = self
            .inner
            .db
            .call(move |c| -> super::Result<Option<Vec<u8>>> {
                Ok(rusqlite::OptionalExtension::optional(c.query_row(
                    "SELECT c.der FROM certificates c JOIN meters m ON m.id = c.meter_id
                     WHERE m.uid = ?1 AND c.slot = 'sign' AND c.der IS NOT NULL
                     ORDER BY c.id DESC LIMIT 1",
                    [&uid],
                    |r| r.get(0),
                ))?)
            })
            .await
            .map_err(|e| db_failure(Step::Check, e))?;
        let token = ReworkToken {
            uid: ack.uid.clone(),
            session: run.th,
            cert_sha256: issued.as_deref().map(sha256).unwrap_or([0; 32]),
        }
        .encode();
        let signer = self.inner.keys.transcript_signer(&self.inner.hsm);
        let signature = signer.sign(&token).await.map_err(|e| {
            Failure::new(
                "hsm.error",
                Severity::Critical,
                format!("the HSM could not sign the rework token: {e}"),
            )
        })?;
        let (token_hex, sig_hex) = (hex::encode(&token), hex::encode(&signature));
        let uid = run.uid.clone();
        let audit = self.inner.audit.clone();
        let source = format!("nest {}", self.nest + 1);
        let operator = self.operator.clone();
        let details = serde_json::json!({
            "uid": run.uid, "token": token_hex, "signature": sig_hex,
            "certificate_sha256": issued.as_deref().map(|d| hex::encode(sha256(d))),
        });
        self.inner
            .db
            .call(move |c| -> super::Result<()> {
                let tx = c.transaction()?;
                let n = tx.execute(
                    "UPDATE reworks SET used_at = ?1 WHERE uid = ?2 AND used_at IS NULL",
                    params![now_ms(), uid],
                )?;
                records::guarded(n.min(1), &format!("the rework approval of {uid}"), "unused")?;
                audit.append(
                    &tx,
                    &NewEvent::new(
                        &source,
                        "meter.rework_sent",
                        Severity::Notice,
                        &operator,
                        details,
                    ),
                )?;
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(|e| db_failure(Step::Check, e))?;
        match link.call(&Message::Rework { token, signature }).await {
            Ok(Message::Ack) => Err(Failure::new(
                REWORKED,
                Severity::Notice,
                "sealed meter returned to blank by a signed rework token; provisioning it again",
            )
            .quiet()),
            Ok(other) => Err(Failure::new(
                "meter.failed",
                Severity::Warning,
                format!("REWORK answered with {}", other.name()),
            )),
            Err(LinkError::Refused {
                code: ErrorCode::ReworkRefused,
                detail,
                ..
            }) => Err(Failure::new(
                "security.rework_refused",
                Severity::Critical,
                format!(
                    "the meter refused the rework token ({detail}): it does not hold the certificate this cell issued to UID {}; quarantine it",
                    run.uid
                ),
            )
            .quiet()),
            Err(e) => Err(link_failure(Step::Check, e)),
        }
    }

    /// The code the nest's scanner reads off the meter's nameplate: the next one it read, waiting
    /// up to [`SCAN_WAIT`] for it.
    async fn nameplate(&self, run: &Run) -> Result<String, Failure> {
        let refused = |why: String| Failure::new("meter.refused", Severity::Notice, why);
        let Some(slot) = self.inner.scans.get(self.nest) else {
            return Err(refused("this nest has no scanner for nameplates".into()));
        };
        let mut slot = slot.lock().await;
        let Some(rx) = slot.as_mut() else {
            return Err(refused(
                "this nest has no scanner for nameplates (scanner = ... in its [[nests]])".into(),
            ));
        };
        self.inner.update_nest(self.nest, |n| {
            n.message = Some("scan the meter's nameplate".into())
        });
        match tokio::time::timeout(SCAN_WAIT, rx.recv()).await {
            Ok(Some(code)) => {
                self.inner.update_nest(self.nest, |n| n.message = None);
                Ok(code)
            }
            Ok(None) => Err(refused("the nest's scanner is gone".into())),
            Err(_) => Err(refused(format!(
                "no nameplate was scanned within {} s for meter {}: scan it when the meter is in the nest",
                SCAN_WAIT.as_secs(),
                run.uid
            ))),
        }
    }

    /// With a factory registry, a scanned serial must not have been provisioned at any station
    /// (two nameplates printed with one number, or a meter taken to a second cell). A registry
    /// that does not answer within [`REGISTRY_CHECK`] does not stop the line (a WAN outage never
    /// does): the meter goes on, `fleet.scan_unchecked` is audited, and the registry's own
    /// duplicate-number alarm is the check when the record arrives.
    async fn registry_check(&self, code: &str) -> Result<(), Failure> {
        let Some(f) = self.inner.cfg.fleet.as_ref() else {
            return Ok(());
        };
        let ep = crate::fleet::Endpoint::station(&self.inner.cfg.station_id, f);
        let code2 = code.to_string();
        let found = tokio::time::timeout(REGISTRY_CHECK, async move {
            let client = crate::fleet::connect(&ep).await?;
            crate::fleet::find(&client, &code2).await
        })
        .await;
        match found {
            Ok(Ok(found)) => {
                if let Some(m) = found
                    .iter()
                    .find(|m| m.state == "done" && m.serial.as_deref() == Some(code))
                {
                    return Err(Failure::new(
                        "meter.refused",
                        Severity::Notice,
                        format!(
                            "the scanned serial {code} was already provisioned at station {} (work order {}, meter {}) according to the factory registry: two nameplates carry the same number — keep this meter apart",
                            m.station,
                            m.work_order.as_deref().unwrap_or("-"),
                            m.uid
                        ),
                    ));
                }
                Ok(())
            }
            Ok(Err(e)) => {
                self.scan_unchecked(code, &e.to_string()).await;
                Ok(())
            }
            Err(_) => {
                self.scan_unchecked(
                    code,
                    &format!("no answer within {} s", REGISTRY_CHECK.as_secs()),
                )
                .await;
                Ok(())
            }
        }
    }

    async fn scan_unchecked(&self, code: &str, why: &str) {
        self.inner
            .record_or_keep(NewEvent {
                nest: Some(self.nest as u32 + 1),
                ..NewEvent::new(
                    &self.inner.source,
                    "fleet.scan_unchecked",
                    Severity::Warning,
                    &self.operator,
                    serde_json::json!({"message": format!("the scanned serial {code} could not be checked against the factory registry ({why}); the registry checks it when the record arrives"), "serial": code}),
                )
            })
            .await;
    }

    /// Commits the meter's record with its identity and one certificate intent per slot (with
    /// the serial drawn for it); returns the intents' ids.
    async fn assign(
        &self,
        run: &mut Run,
        slots: &[(CertSlot, MeterKeyUsage)],
        serials: Vec<[u8; 16]>,
    ) -> Result<Vec<Intent>, Failure> {
        let (batch_id, quantity) = (run.batch.id, run.batch.quantity);
        let uid = run.uid.clone();
        let nest = self.nest as i64 + 1;
        let operator = self.operator.clone();
        let flag = self.inner.cfg.manufacturer.flag_id.clone();
        let leased = self.inner.cfg.fleet.is_some();
        // A nameplate printed before the cell: its scanned code is the serial number.
        let scanned = if run.model.serial_source == crate::config::SerialSource::Scan {
            let code = self.nameplate(run).await?;
            self.registry_check(&code).await?;
            Some(code)
        } else {
            None
        };
        let planned: Vec<(&'static str, String)> = slots
            .iter()
            .zip(&serials)
            .map(|((slot, _), serial)| (slot_name(*slot), hex::encode(serial)))
            .collect();
        let r = self
            .inner
            .db
            .call(move |c| -> super::Result<Result<(Assigned, Vec<i64>), String>> {
                let tx = c.transaction()?;
                let (live, next, last, prefix): (i64, i64, i64, String) = tx.query_row(
                    "SELECT (SELECT count(*) FROM meters WHERE batch_id = b.id AND state <> 'failed'), next_serial, serial_last, serial_prefix
                     FROM batches b WHERE id = ?1 AND state = 'open'",
                    [batch_id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )?;
                if live >= quantity {
                    return Ok(Err("the batch has all its meters".into()));
                }
                // A scanned nameplate: its number, if it is one of this batch's and unused.
                let next = if let Some(code) = &scanned {
                    let (first, serial_last): (i64, i64) = tx.query_row(
                        "SELECT serial_first, serial_last FROM batches WHERE id = ?1",
                        [batch_id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )?;
                    let number = code
                        .strip_prefix(prefix.as_str())
                        .filter(|d| d.len() == 9 && d.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|d| d.parse::<i64>().ok());
                    let Some(number) = number else {
                        return Ok(Err(format!(
                            "the scanned code {code:?} is not a serial number of this batch (\"{prefix}\" and nine digits): scan the meter's nameplate again"
                        )));
                    };
                    if number < first || number > serial_last {
                        return Ok(Err(format!(
                            "the scanned serial {code} is outside this batch's range {prefix}{first:09} to {prefix}{serial_last:09}: is the meter in the right batch?"
                        )));
                    }
                    let holder: Option<String> = tx
                        .query_row(
                            "SELECT uid FROM meters WHERE serial = ?1",
                            [code],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if let Some(other) = holder {
                        return Ok(Err(format!(
                            "the scanned serial {code} is already on meter {other}: two nameplates carry the same number — keep this meter apart"
                        )));
                    }
                    number
                } else if leased {
                    match crate::fleet::draw(&tx)? {
                        Some(n) => n,
                        None => return Ok(Err(format!(
                            "{LEASES_USED_UP}: the station has used every number the factory registry leased to it and has no new block (is the registry reachable? see Health); the line stops before a meter gets a number outside a lease"
                        ))),
                    }
                } else {
                    if next > last {
                        return Ok(Err(format!("the batch has used its whole serial range (last {last}); open a new batch")));
                    }
                    next
                };
                let serial = format!("{prefix}{next:09}");
                let mut title = [0u8; 8];
                title[..3].copy_from_slice(flag.as_bytes());
                title[3..].copy_from_slice(&(next as u64).to_be_bytes()[3..]);
                let ldn = format!("{flag}{next:013}");
                let now = now_ms();
                let inserted = tx.execute(
                    "INSERT INTO meters (batch_id, uid, nest, state, serial, serial_no, system_title, ldn, operator, started_at)
                     VALUES (?1, ?2, ?3, 'assigned', ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![batch_id, uid, nest, serial, next, hex::encode(title), ldn, operator, now],
                );
                match inserted {
                    Ok(_) => {}
                    Err(e) => {
                        let e = crate::db::DbError::from(e);
                        if let crate::db::DbError::Constraint(what) = &e {
                            // Which of the unique columns: the meter's UID (another nest has
                            // it), or the number (another batch used it).
                            if what.contains("meters.uid") {
                                return Ok(Err(format!("UID {uid} is being provisioned in another nest")));
                            }
                            return Ok(Err(format!(
                                "{NUMBER_TAKEN}: serial number {next} (system title {}) is already used by another batch's meter; the batch's serial range must not overlap another batch's numbers",
                                hex::encode_upper(title)
                            )));
                        }
                        return Err(e.into());
                    }
                }
                let id = tx.last_insert_rowid();
                let mut intents = Vec::with_capacity(planned.len());
                for (slot, serial) in &planned {
                    tx.execute(
                        "INSERT INTO certificates (meter_id, slot, state, serial, created_at, updated_at) VALUES (?1, ?2, 'intent', ?3, ?4, ?4)",
                        params![id, slot, serial, now],
                    )?;
                    intents.push(tx.last_insert_rowid());
                }
                if !leased && scanned.is_none() {
                    tx.execute("UPDATE batches SET next_serial = next_serial + 1 WHERE id = ?1", [batch_id])?;
                }
                tx.commit()?;
                Ok(Ok(((id, serial, next, title, ldn), intents)))
            })
            .await
            .map_err(|e| db_failure(Step::Assign, e))?;
        let ((id, serial, _no, title, ldn), ids) = r.map_err(|reason| {
            let (kind, sev) = if reason.contains("another nest") {
                ("meter.duplicate_uid", Severity::Critical)
            } else if reason.starts_with(NUMBER_TAKEN) || reason.starts_with(LEASES_USED_UP) {
                // Every following meter would draw the same number: the cell's fault, not the
                // meter's; the line stops with the reason.
                ("station.error", Severity::Critical)
            } else {
                ("meter.refused", Severity::Notice)
            };
            Failure::new(kind, sev, reason)
        })?;
        if self.inner.cfg.fleet.is_some() {
            self.inner.fleet_wake.notify_one();
        }
        run.meter_id = Some(id);
        run.serial = Some(serial.clone());
        run.identity = Some(Identity {
            serial,
            system_title: title,
            ldn,
        });
        let serial = run.serial.clone();
        self.inner.update_nest(self.nest, |n| n.serial = serial);
        self.inner.publish_batch().await;
        Ok(ids
            .into_iter()
            .zip(serials)
            .zip(slots)
            .map(|((id, serial), (slot, usage))| Intent {
                id,
                serial,
                slot: *slot,
                usage: *usage,
            })
            .collect())
    }

    async fn set_state(&self, run: &Run, state: &'static str) -> Result<(), Failure> {
        let Some(id) = run.meter_id else {
            return Ok(());
        };
        let step = run.step;
        self.inner
            .db
            .call(move |c| -> super::Result<()> {
                let expected = records::previous_state(state);
                let n = c.execute(
                    "UPDATE meters SET state = ?1 WHERE id = ?2 AND state = ?3",
                    params![state, id, expected],
                )?;
                records::guarded(n, &format!("meter {id}"), expected)?;
                Ok(())
            })
            .await
            .map_err(|e| db_failure(step, e))
    }

    /// Records the image the meter verified and activated.
    async fn flashed(&self, run: &Run, sha: [u8; 32]) -> Result<(), Failure> {
        let id = run
            .meter_id
            .ok_or_else(|| db_failure(Step::Firmware, "no meter record"))?;
        let sha = hex::encode(sha);
        self.inner
            .db
            .call(move |c| -> super::Result<()> {
                let n = c.execute(
                    "UPDATE meters SET state = 'flashed', fw_sha256 = ?1 WHERE id = ?2 AND state = 'assigned'",
                    params![sha, id],
                )?;
                records::guarded(n, &format!("meter {id}"), "assigned")?;
                Ok(())
            })
            .await
            .map_err(|e| db_failure(Step::Firmware, e))
    }

    /// Identity and key pairs: returns the certificate subjects (one per intent) and the
    /// meter's secret keys wrapped for it, already journalled wrapped for the utility.
    async fn keys(
        &self,
        link: &mut HostLink,
        ack: &HelloAck,
        run: &mut Run,
        slots: &[(CertSlot, MeterKeyUsage)],
    ) -> Result<(Vec<hsm::cert::Subject>, Vec<PutKey>), Failure> {
        let curve = run.model.curve();
        let onchip = match curve {
            Curve::P256 => ack.features & line_protocol::msg::FEATURE_KEYGEN_P256 != 0,
            Curve::P384 => ack.features & line_protocol::msg::FEATURE_KEYGEN_P384 != 0,
        };
        if run.model.keygen == Keygen::Meter && !onchip {
            return Err(Failure::new(
                "meter.failed",
                Severity::Warning,
                format!(
                    "model {} is configured for on-meter key generation but this meter cannot generate {curve:?} keys",
                    run.model.name
                ),
            ));
        }
        let hcurve = hsm_curve(curve);
        let identity = run
            .identity
            .clone()
            .ok_or_else(|| db_failure(Step::Keys, "no identity"))?;
        let ktk = run
            .ktk
            .clone()
            .ok_or_else(|| db_failure(Step::Keys, "no key-transport key"))?;
        let mut requests = vec![Message::Identity(identity)];
        let mut subjects = Vec::with_capacity(slots.len());
        match run.model.keygen {
            Keygen::Meter => {
                requests.extend(
                    slots
                        .iter()
                        .map(|(slot, _)| Message::KeyGen { slot: *slot, curve }),
                );
            }
            Keygen::Hsm => {
                // Pairs made here leave the HSM only wrapped under the channel's key.
                let n = slots.len();
                let k = ktk.clone();
                let pairs = self
                    .inner
                    .hsm
                    .run(move |s| {
                        let mut out = Vec::with_capacity(n);
                        for _ in 0..n {
                            let pair =
                                s.generate_ec_keypair(KeyRole::MeterKeyPair, hcurve, None)?;
                            let wrapped = s.wrap(&k, &pair.private, hsm::WrapAlg::AesKwPad)?;
                            out.push((pair, wrapped));
                        }
                        Ok(out)
                    })
                    .await
                    .map_err(|e| hsm_failure(Step::Keys, e))?;
                for ((slot, _), (pair, wrapped)) in slots.iter().zip(pairs) {
                    run.scratch.push(pair.private.clone());
                    run.scratch.push(pair.public.clone());
                    let key_id = if *slot == CertSlot::Sign {
                        KeyId::SignPrivate
                    } else {
                        KeyId::KaPrivate
                    };
                    let key_type = if curve == Curve::P256 {
                        KeyType::EcP256
                    } else {
                        KeyType::EcP384
                    };
                    requests.push(Message::PutKey(PutKey {
                        key_id,
                        key_type,
                        wrap: WrapAlg::AesKwp,
                        kcv: kcv_ec_public(&pair.point),
                        wrapped,
                    }));
                    subjects.push(hsm::cert::Subject::Key {
                        curve: hcurve,
                        point: pair.point.clone(),
                    });
                }
            }
        }
        let (answers, secrets) = tokio::try_join!(
            async {
                link.call_many(&requests)
                    .await
                    .map_err(|e| link_failure(Step::Keys, e))
            },
            self.secret_keys(run, ktk)
        )?;
        if run.model.keygen == Keygen::Meter {
            let mut points: Vec<String> = Vec::new();
            for (answer, (asked, _)) in answers.into_iter().skip(1).zip(slots) {
                let (slot, csr) = match answer {
                    Message::KeyGenRsp { slot, csr } => (slot, csr),
                    other => {
                        return Err(Failure::new(
                            "meter.failed",
                            Severity::Warning,
                            format!("KEYGEN answered with {}", other.name()),
                        ));
                    }
                };
                if slot != *asked {
                    return Err(Failure::new(
                        "security.protocol_violation",
                        Severity::Critical,
                        format!(
                            "the meter answered KEYGEN for slot {} with a key for slot {}",
                            slot_name(*asked),
                            slot_name(slot)
                        ),
                    ));
                }
                let point = hsm::cert::check_csr(&csr, hcurve).map_err(|e| {
                    Failure::new(
                        "security.bad_certificate_request",
                        Severity::Critical,
                        format!("the meter's certificate request was refused: {e}"),
                    )
                })?;
                points.push(hex::encode(sha256(&point)));
                subjects.push(hsm::cert::Subject::Csr(csr));
            }
            self.refuse_reused_keys(points).await?;
        }
        Ok((subjects, secrets))
    }

    /// A meter's new public keys must be new: one certified before — for another meter, or for
    /// this one's other slot — means its random generator is broken (or it is a clone), and its
    /// keys protect nothing.
    async fn refuse_reused_keys(&self, hashes: Vec<String>) -> Result<(), Failure> {
        let mut seen = std::collections::HashSet::new();
        if hashes.iter().any(|h| !seen.insert(h.clone())) {
            return Err(reused_key(
                "the meter generated the same key pair for both slots",
            ));
        }
        let before = self
            .inner
            .db
            .call(move |c| -> super::Result<Option<String>> {
                for h in &hashes {
                    let who: Option<String> = rusqlite::OptionalExtension::optional(c.query_row(
                        "SELECT COALESCE(m.serial, m.uid) FROM certificates c JOIN meters m ON m.id = c.meter_id WHERE c.key_sha256 = ?1",
                        [h],
                        |r| r.get(0),
                    ))?;
                    if who.is_some() {
                        return Ok(who);
                    }
                }
                Ok(None)
            })
            .await
            .map_err(|e| db_failure(Step::Keys, e))?;
        match before {
            Some(other) => Err(reused_key(&format!(
                "the meter's new public key was certified before, for meter {other}"
            ))),
            None => Ok(()),
        }
    }

    /// The meter's secret keys, made in the HSM: each wrapped under the channel's key for the
    /// meter and under the batch transport key for the utility. The utility's copies are
    /// journalled before this returns; the meter's come back as PUT_KEY requests.
    async fn secret_keys(&self, run: &Run, ktk: KeyHandle) -> Result<Vec<PutKey>, Failure> {
        let label = run.batch.transport_key.clone();
        let size = if run.model.aes_bytes() == 32 {
            AesKeySize::Aes256
        } else {
            AesKeySize::Aes128
        };
        let (key_type, type_name) = if size == AesKeySize::Aes256 {
            (KeyType::Aes256, "aes-256")
        } else {
            (KeyType::Aes128, "aes-128")
        };
        let title = run
            .identity
            .as_ref()
            .map(|i| i.system_title)
            .ok_or_else(|| db_failure(Step::Keys, "no system title assigned"))?;
        let keys = self
            .inner
            .hsm
            .run(move |s| {
                let btk = s.find_key(hsm::KeyKind::Aes(32), &label)?.ok_or_else(|| {
                    hsm::Error::ObjectNotFound {
                        what: "batch transport key",
                        label: label.clone(),
                    }
                })?;
                let mut out = Vec::new();
                for (role, id) in [
                    (KeyRole::MeterGuek, KeyId::Guek),
                    (KeyRole::MeterGbek, KeyId::Gbek),
                    (KeyRole::MeterAk, KeyId::Ak),
                    (KeyRole::MeterKek, KeyId::Kek),
                ] {
                    let k = s.generate_aes_key(role, size, None)?;
                    let r = (|| -> hsm::Result<_> {
                        let for_meter = s.wrap(&ktk, &k, hsm::WrapAlg::AesKw)?;
                        let for_utility = s.wrap(&btk, &k, hsm::WrapAlg::AesKw)?;
                        let kcv = s.kcv(&k)?;
                        let prefix = crate::manifest::model::key_binding_prefix(&title, id.name());
                        let binding = s.digest_key_sha256(&prefix, &k)?;
                        Ok((id, for_meter, for_utility, kcv, hex::encode(&binding[..16])))
                    })();
                    let d = s.destroy(&k);
                    out.push(r?);
                    d?;
                }
                Ok(out)
            })
            .await
            .map_err(|e| hsm_failure(Step::Keys, e))?;
        let meter_id = run
            .meter_id
            .ok_or_else(|| db_failure(Step::Keys, "no meter record"))?;
        let rows: Vec<(&'static str, Vec<u8>, String, String)> = keys
            .iter()
            .map(|(id, _, u, kcv, b)| (id.name(), u.clone(), hex::encode(kcv), b.clone()))
            .collect();
        self.inner
            .db
            .call(move |c| -> super::Result<()> {
                let tx = c.transaction()?;
                let now = now_ms();
                for (id, wrapped, kcv, binding) in rows {
                    tx.execute(
                        "INSERT INTO wrapped_keys (meter_id, key_id, key_type, wrap_alg, wrapped, kcv, binding, created_at) VALUES (?1, ?2, ?3, 'aes-kw', ?4, ?5, ?6, ?7)",
                        params![meter_id, id, type_name, wrapped, kcv, binding, now],
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(|e| db_failure(Step::Keys, e))?;
        Ok(keys
            .into_iter()
            .map(|(key_id, wrapped, _, kcv, _)| PutKey {
                key_id,
                key_type,
                wrap: WrapAlg::AesKw,
                kcv,
                wrapped,
            })
            .collect())
    }

    /// The anchors pinned when the batch opened: the device CA, the firmware-verification
    /// certificate and the model's utility anchors, byte for byte.
    fn anchors(&self, run: &Run) -> Result<Vec<Message>, Failure> {
        run.pins
            .anchors
            .iter()
            .map(|a| {
                let der = a.der.clone();
                Ok(match a.kind.as_str() {
                    "device-ca" => Message::PutCert {
                        slot: CertSlot::DeviceCa,
                        der,
                    },
                    kind => Message::PutAnchor {
                        kind: match kind {
                            "firmware-verification" => AnchorKind::FirmwareVerification,
                            "utility-ca" => AnchorKind::UtilityCa,
                            "utility-client" => AnchorKind::UtilityClient,
                            other => {
                                return Err(Failure::new(
                                    "station.error",
                                    Severity::Critical,
                                    format!("the batch pins an anchor of unknown kind {other:?}"),
                                ));
                            }
                        },
                        index: a.index,
                        der,
                    },
                })
            })
            .collect()
    }

    /// Signs one certificate per intent, with the intent's serial, and journals them as issued.
    /// Returns (slot, certificate, subject key point) per certificate.
    fn issue(
        &self,
        run: &Run,
        subjects: Vec<hsm::cert::Subject>,
        intents: Vec<Intent>,
    ) -> impl Future<Output = Result<Vec<IssuedCert>, Failure>> + use<> {
        let inner = Arc::clone(self.inner);
        let identity = run.identity.clone();
        let hcurve = hsm_curve(run.model.curve());
        let not_after = run.model.not_after.as_deref().and_then(|s| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        });
        async move {
            let identity = identity.ok_or_else(|| db_failure(Step::Keys, "no identity"))?;
            let jobs: Vec<(MeterProfile, [u8; 16])> = intents
                .iter()
                .map(|i| {
                    (
                        MeterProfile {
                            system_title: identity.system_title,
                            meter_serial: identity.serial.clone(),
                            manufacturer: inner.cfg.manufacturer.name.clone(),
                            usage: i.usage,
                            curve: hcurve,
                            not_after,
                        },
                        i.serial,
                    )
                })
                .collect();
            let ca = inner.keys.device_ca.clone();
            let issued = inner
                .hsm
                .run(move |s| {
                    subjects
                        .iter()
                        .zip(&jobs)
                        .map(|(subject, (profile, serial))| {
                            hsm::cert::issue_with_serial(s, &ca, subject, profile, serial)
                        })
                        .collect::<hsm::Result<Vec<_>>>()
                })
                .await
                .map_err(|e| match e {
                    hsm::Error::Csr(c) => Failure::new(
                        "security.bad_certificate_request",
                        Severity::Critical,
                        format!("the meter's certificate request was refused: {c}"),
                    ),
                    other => hsm_failure(Step::Keys, other),
                })?;
            let mut rows = Vec::with_capacity(issued.len());
            let mut out = Vec::with_capacity(issued.len());
            for (cert, intent) in issued.iter().zip(&intents) {
                let committed = hex::encode(intent.serial);
                let got = hex::encode(&cert.serial);
                if got != committed && got != committed.trim_start_matches("00") {
                    return Err(Failure::new(
                        "station.error",
                        Severity::Critical,
                        "the issued certificate does not carry the serial committed as its intent",
                    )
                    .quiet());
                }
                let point =
                    hsm::cert::subject_point(&cert.der).map_err(|e| hsm_failure(Step::Keys, e))?;
                rows.push((
                    intent.id,
                    cert.der.clone(),
                    cert.fingerprint_hex(),
                    hex::encode(sha256(&point)),
                ));
                out.push((intent.slot, cert.der.clone(), point));
            }
            inner
                .db
                .call(move |c| -> super::Result<()> {
                    let tx = c.transaction()?;
                    let now = now_ms();
                    for (id, der, fp, key) in &rows {
                        let n = tx.execute(
                            "UPDATE certificates SET state = 'issued', der = ?1, fingerprint = ?2, key_sha256 = ?3, updated_at = ?4 WHERE id = ?5 AND state = 'intent'",
                            params![der, fp, key, now, id],
                        )?;
                        records::guarded(n, &format!("certificate {id}"), "intent")?;
                    }
                    tx.commit()?;
                    Ok(())
                })
                .await
                .map_err(|e| match &e {
                    // Two nests certified one key at the same moment: the journal's unique key
                    // index refuses the second.
                    super::Error::Db(crate::db::DbError::Constraint(what))
                        if what.contains("key_sha256") =>
                    {
                        reused_key("the meter's new public key was certified for another meter at the same moment")
                    }
                    _ => db_failure(Step::Keys, e),
                })?;
            Ok(out)
        }
    }
    /// FW_BEGIN, the image, FW_END; resumes a broken transfer. Returns the verified image hash.
    async fn firmware(&self, link: &mut HostLink, run: &mut Run) -> Result<[u8; 32], Failure> {
        let fw_id = run.batch.firmware_id;
        let sha = run.batch.firmware_sha256.clone();
        let mut resumes = 0;
        loop {
            let neg = link
                .session()
                .negotiated()
                .ok_or_else(|| db_failure(Step::Firmware, "no negotiation"))?;
            let params = PlanParams {
                max_payload: neg.max_payload,
                max_block: neg.max_block,
                compress: neg.compression,
            };
            let db = self.inner.db.clone();
            let plan = self
                .inner
                .plan(
                    &sha,
                    move || {
                        db.with(|c| records::firmware_image(c, fw_id))
                            .map_err(super::Error::from)
                    },
                    params,
                )
                .map_err(|e| db_failure(Step::Firmware, e))?;
            let attempt = async {
                let have = match link
                    .call(&Message::FwBegin {
                        size: plan.size,
                        sha256: plan.sha256,
                        compression: u8::from(neg.compression),
                    })
                    .await?
                {
                    Message::FwBeginRsp { have } => have,
                    other => {
                        return Err(LinkError::Protocol(format!(
                            "{} in answer to FW_BEGIN",
                            other.name()
                        )));
                    }
                };
                let inner = Arc::clone(self.inner);
                let nest = self.nest;
                let mut progress = move |done: u64, total: u64| {
                    inner.update_nest(nest, |n| {
                        n.progress = Some(done as f32 / total.max(1) as f32)
                    });
                };
                link.send_firmware(Arc::clone(&plan), have, &mut progress)
                    .await?;
                link.call_sized(&Message::FwEnd, plan.size).await
            }
            .await;
            match attempt {
                Ok(Message::FwResult(r)) => {
                    if r.status != 0 {
                        let code = ErrorCode::from_code(r.status);
                        self.firmware_rejected(
                            run,
                            &format!("meter rejected the firmware: {}", code.describe()),
                        )
                        .await;
                        return Err(Failure::new(
                            "meter.failed",
                            Severity::Warning,
                            format!("meter rejected the firmware: {code}"),
                        ));
                    }
                    if r.sha256 != plan.sha256 {
                        // One event, one alarm: the security failure says it all (a separate
                        // `firmware.rejected` would raise a second alarm for the same meter).
                        return Err(Failure::new(
                            "security.firmware_mismatch",
                            Severity::Critical,
                            format!(
                                "meter reported image hash {} but was sent {}",
                                hex::encode(&r.sha256[..8]),
                                hex::encode(&plan.sha256[..8])
                            ),
                        ));
                    }
                    // The version the meter read from the header is the header's.
                    let version = line_protocol::image::parse(&plan.image)
                        .map(|i| i.version)
                        .map_err(|e| db_failure(Step::Firmware, e))?;
                    if r.version != version.to_bytes() {
                        self.firmware_rejected(run, "meter reported another image version")
                            .await;
                        return Err(Failure::new(
                            "meter.failed",
                            Severity::Warning,
                            format!(
                                "meter reported image version {} but the image header says {version}",
                                hex::encode(r.version)
                            ),
                        ));
                    }
                    self.inner
                        .update_nest(self.nest, |n| n.progress = Some(1.0));
                    return Ok(plan.sha256);
                }
                Ok(other) => {
                    return Err(Failure::new(
                        "meter.failed",
                        Severity::Warning,
                        format!("FW_END answered with {}", other.name()),
                    ));
                }
                Err(
                    e @ (LinkError::ChannelLost { .. }
                    | LinkError::Timeout {
                        what: "FW_DATA" | "FW_BEGIN" | "FW_END",
                        ..
                    }
                    | LinkError::Io(_)
                    | LinkError::Closed),
                ) if resumes < 3 => {
                    resumes += 1;
                    tracing::info!(nest = self.nest + 1, uid = %run.uid, error = %e, "firmware transfer interrupted; resuming");
                    self.resume(link, run).await?;
                }
                Err(e) => return Err(link_failure(Step::Firmware, e)),
            }
        }
    }

    /// After a dropped link or a rebooted meter: a new session with the same meter.
    async fn resume(&self, link: &mut HostLink, run: &mut Run) -> Result<(), Failure> {
        if let Err(e) = nest::reconnect_if_closed(self.inner, self.nest, link).await {
            return Err(Failure::new(
                "nest.link_lost",
                Severity::Warning,
                format!("cannot reopen the nest port to resume: {e}"),
            )
            .quiet());
        }
        let ack = link
            .hello()
            .await
            .map_err(|e| link_failure(Step::Firmware, e))?;
        if hex::encode(&ack.uid) != run.uid {
            return Err(Failure::new(
                "meter.failed",
                Severity::Warning,
                format!(
                    "meter taken out of the nest during firmware (another meter, UID {}, answers now)",
                    hex::encode(&ack.uid)
                ),
            )
            .quiet());
        }
        self.open_channel(link, &ack, run).await
    }

    async fn firmware_rejected(&self, run: &Run, reason: &str) {
        let _ = self
            .inner
            .record(NewEvent {
                nest: Some(self.nest as u32 + 1),
                ..NewEvent::new(
                    &format!("nest {}", self.nest + 1),
                    "firmware.rejected",
                    Severity::Warning,
                    &self.operator,
                    serde_json::json!({"message": reason, "uid": run.uid, "serial": run.serial, "firmware": run.batch.firmware_sha256}),
                )
            })
            .await;
    }

    /// ATTEST with the challenge drawn at the check; verifies the signed receipt.
    async fn attest(
        &self,
        link: &mut HostLink,
        run: &Run,
    ) -> Result<(Receipt, Vec<u8>, Vec<u8>), Failure> {
        let nonce = run.nonce;
        let (receipt, signature) = match link
            .call(&Message::Attest { nonce })
            .await
            .map_err(|e| link_failure(Step::Attest, e))?
        {
            Message::AttestRsp { receipt, signature } => (receipt, signature),
            other => {
                return Err(Failure::new(
                    "meter.failed",
                    Severity::Warning,
                    format!("ATTEST answered with {}", other.name()),
                ));
            }
        };
        let bad = |why: String| {
            Failure::new(
                "security.attestation_failed",
                Severity::Critical,
                format!("attestation failed: {why}"),
            )
        };
        let (_, sign_der, sign_point) = run
            .certs
            .iter()
            .find(|(s, _, _)| *s == CertSlot::Sign)
            .cloned()
            .ok_or_else(|| bad("no signing certificate was issued".into()))?;
        let verified = match run.model.curve() {
            Curve::P256 => {
                use p256::ecdsa::signature::Verifier;
                let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&sign_point)
                    .map_err(|_| bad("certificate key".into()))?;
                p256::ecdsa::Signature::from_der(&signature)
                    .map(|s| key.verify(&receipt, &s).is_ok())
                    .unwrap_or(false)
            }
            Curve::P384 => {
                use p384::ecdsa::signature::Verifier;
                let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(&sign_point)
                    .map_err(|_| bad("certificate key".into()))?;
                p384::ecdsa::Signature::from_der(&signature)
                    .map(|s| key.verify(&receipt, &s).is_ok())
                    .unwrap_or(false)
            }
        };
        if !verified {
            return Err(bad(
                "the receipt signature does not verify with the meter's certificate".into(),
            ));
        }
        let r = Receipt::decode(&receipt).ok_or_else(|| bad("the receipt is malformed".into()))?;
        let id = run
            .identity
            .clone()
            .ok_or_else(|| bad("no identity".into()))?;
        if hex::encode(&r.uid) != run.uid {
            return Err(bad("the receipt names another UID".into()));
        }
        if r.serial != id.serial || r.system_title != id.system_title || r.ldn != id.ldn {
            return Err(bad("the receipt names another identity".into()));
        }
        if r.nonce != nonce {
            return Err(bad("the receipt answers another challenge".into()));
        }
        if r.lifecycle != Lifecycle::Sealed {
            return Err(bad(format!(
                "the receipt says lifecycle {}, not sealed",
                r.lifecycle.name()
            )));
        }
        if hex::encode(r.fw_sha256) != run.batch.firmware_sha256 {
            return Err(bad("the receipt names another firmware image".into()));
        }
        let required = run.pins.disable | iface::PROVISIONING;
        if r.disabled & required != required {
            return Err(bad(format!(
                "the receipt says interfaces are still enabled: {}",
                iface_names(required & !r.disabled)
            )));
        }
        // Exactly the certificates the meter was given — those issued for it and the device
        // CA's (slot 3) — each once, in ascending slot (spec 4.14).
        let mut given: Vec<(u8, [u8; 32])> = run
            .certs
            .iter()
            .map(|(slot, der, _)| (*slot as u8, sha256(der)))
            .chain(
                run.pins
                    .anchors
                    .iter()
                    .filter(|a| a.kind == "device-ca")
                    .map(|a| (CertSlot::DeviceCa as u8, sha256(&a.der))),
            )
            .collect();
        given.sort_unstable();
        if r.certs != given {
            return Err(bad(format!(
                "the receipt lists {} certificates (slots {:?}), the meter was given {} (slots {:?})",
                r.certs.len(),
                r.certs.iter().map(|c| c.0).collect::<Vec<_>>(),
                given.len(),
                given.iter().map(|c| c.0).collect::<Vec<_>>()
            )));
        }
        for (slot, der, _) in &run.certs {
            if !r
                .certs
                .iter()
                .any(|(s, fp)| *s == *slot as u8 && *fp == sha256(der))
            {
                return Err(bad(format!(
                    "the receipt does not list the {slot:?} certificate"
                )));
            }
        }
        let _ = sign_der;
        Ok((r, receipt, signature))
    }

    /// Records, before SEAL goes on the line, that it is being sent.
    async fn seal_sent(&self, run: &Run) -> Result<(), Failure> {
        let Some(id) = run.meter_id else {
            return Err(db_failure(Step::Seal, "no meter record"));
        };
        self.inner
            .db
            .call(move |c| -> super::Result<()> {
                let n = c.execute(
                    "UPDATE meters SET seal_sent_at = ?1 WHERE id = ?2 AND state = 'flashed'",
                    rusqlite::params![now_ms(), id],
                )?;
                records::guarded(n, &format!("meter {id}"), "flashed")?;
                Ok(())
            })
            .await
            .map_err(|e| db_failure(Step::Seal, e))
    }

    async fn done(
        &self,
        run: &Run,
        receipt: &Receipt,
        receipt_bytes: Vec<u8>,
        sig: Vec<u8>,
    ) -> Result<(), Failure> {
        let Some(id) = run.meter_id else {
            return Err(db_failure(Step::Attest, "no meter record"));
        };
        let audit = self.inner.audit.clone();
        let source = format!("nest {}", self.nest + 1);
        let operator = self.operator.clone();
        let cycle_ms = run.started.elapsed().as_millis() as u64;
        let details = serde_json::json!({
            "uid": run.uid,
            "serial": run.serial,
            "system_title": receipt.system_title.iter().map(|b| format!("{b:02X}")).collect::<String>(),
            "batch": run.batch.work_order,
            "firmware": run.batch.firmware_sha256,
            "certificates": run.certs.iter().map(|(s, der, _)| serde_json::json!({"slot": format!("{s:?}"), "sha256": hex::encode(sha256(der))})).collect::<Vec<_>>(),
            "keys": ["guek", "gbek", "ak", "kek"],
            "key_transport": run.ktk_method.map(KtkMethod::name),
            "nest": self.nest + 1,
            "cycle_ms": cycle_ms,
        });
        self.inner
            .db
            .call(move |c| -> super::Result<()> {
                let tx = c.transaction()?;
                let now = now_ms();
                let n = tx.execute(
                    "UPDATE meters SET state = 'done', receipt = ?1, receipt_sig = ?2, finished_at = ?3 WHERE id = ?4 AND state = 'sealed'",
                    params![receipt_bytes, sig, now, id],
                )?;
                records::guarded(n, &format!("meter {id}"), "sealed")?;
                tx.execute("UPDATE certificates SET state = 'delivered', updated_at = ?1 WHERE meter_id = ?2 AND state = 'issued'", params![now, id])?;
                audit.append(&tx, &NewEvent::new(&source, "meter.provisioned", Severity::Info, &operator, details))?;
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(|e| db_failure(Step::Attest, e))?;
        Ok(())
    }

    async fn refuse(&self, run: &Run, f: &Failure) {
        let _ = self
            .inner
            .record(NewEvent {
                nest: Some(self.nest as u32 + 1),
                ..NewEvent::new(
                    &format!("nest {}", self.nest + 1),
                    f.kind,
                    f.severity,
                    &self.operator,
                    serde_json::json!({"message": f.reason, "uid": run.uid, "batch": run.batch.work_order}),
                )
            })
            .await;
    }

    async fn fail(&self, run: &Run, f: &Failure) {
        let audit = self.inner.audit.clone();
        let source = format!("nest {}", self.nest + 1);
        let operator = self.operator.clone();
        let nest = self.nest as u32 + 1;
        let (id, uid, serial, step, reason, kind, severity) = (
            run.meter_id,
            run.uid.clone(),
            run.serial.clone(),
            run.step,
            f.reason.clone(),
            f.kind,
            f.severity,
        );
        let batch = run.batch.work_order.clone();
        let r = self
            .inner
            .db
            .call(move |c| -> super::Result<Option<i64>> {
                let tx = c.transaction()?;
                let (voided, keys) = match id {
                    Some(id) => records::fail_meter(&tx, id, &reason, Some(step.word()), now_ms())?,
                    None => (0, 0),
                };
                let details = serde_json::json!({
                    "message": reason, "uid": uid, "serial": serial, "step": step, "batch": batch,
                    "certificates_voided": voided, "wrapped_keys_deleted": keys,
                });
                let mut alarm = None;
                if kind != "meter.failed" {
                    alarm = audit
                        .append(
                            &tx,
                            &NewEvent {
                                nest: Some(nest),
                                ..NewEvent::new(&source, kind, severity, &operator, details.clone())
                            },
                        )?
                        .alarm;
                }
                let a = audit.append(
                    &tx,
                    &NewEvent {
                        nest: Some(nest),
                        ..NewEvent::new(
                            &source,
                            "meter.failed",
                            Severity::Warning,
                            &operator,
                            details,
                        )
                    },
                )?;
                tx.commit()?;
                Ok(alarm.or(a.alarm))
            })
            .await;
        match r {
            Ok(Some(alarm)) => self.inner.publish_alarm(alarm).await,
            Ok(None) => {}
            Err(e) => {
                tracing::error!(nest, error = %e, "could not journal a failed meter; it is failed before the line starts again");
                if let Some(id) = id {
                    self.inner.add_orphan(id);
                }
            }
        }
        self.inner.publish_batch().await;
    }

    async fn cleanup(&self, run: &mut Run) {
        let scratch = std::mem::take(&mut run.scratch);
        if scratch.is_empty() {
            return;
        }
        let r = self
            .inner
            .hsm
            .run(move |s| {
                for k in &scratch {
                    let _ = s.destroy(k);
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not destroy session keys; they end with the HSM session");
        }
    }
}
