//! One meter through the steps of the design: identify, secure channel, check, assign, keys,
//! trust anchors, firmware, seal, attest. Each step is committed to the journal before the next
//! begins; a certificate *intent* (with its serial) is committed before the HSM signs it.
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
use line_protocol::crypto::{kcv_ec_public, ktk_derivation_data, sha256};
use line_protocol::firmware::PlanParams;
use line_protocol::io::{HostLink, LinkError};
use line_protocol::msg::{
    AnchorKind, CertSlot, Curve, ErrorCode, HelloAck, Identity, KeyId, KeyType, Lifecycle, Message,
    PutKey, ResetMode, WrapAlg, iface,
};
use line_protocol::receipt::Receipt;
use rusqlite::params;

use super::{Inner, Step, nest};
use crate::audit::{NewEvent, Severity};
use crate::config::{Keygen, ModelSettings};
use crate::db::now_ms;
use crate::records::{self, BatchRow};

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
    /// The batch has all its meters (or no batch is open).
    NoRoom {
        /// Why.
        reason: String,
    },
}

/// Why the run stopped.
#[derive(Debug)]
struct Failure {
    reason: String,
    kind: &'static str,
    severity: Severity,
    /// The channel is still up: release the meter so the operator removes it.
    release: bool,
}

impl Failure {
    fn new(kind: &'static str, severity: Severity, reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            kind,
            severity,
            release: true,
        }
    }

    fn quiet(mut self) -> Failure {
        self.release = false;
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
        .quiet(),
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
        .quiet(),
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
    meter_id: Option<i64>,
    serial: Option<String>,
    identity: Option<Identity>,
    step: Step,
    /// Session objects to destroy at the end.
    scratch: Vec<KeyHandle>,
    ktk: Option<KeyHandle>,
    /// (slot, certificate DER, key point) of issued certificates.
    certs: Vec<(CertSlot, Vec<u8>, Vec<u8>)>,
    started: Instant,
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
        let (batch, model) = match self.batch_and_model().await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let mut run = Run {
            uid: uid.clone(),
            batch,
            model,
            meter_id: None,
            serial: None,
            identity: None,
            step: Step::Hello,
            scratch: Vec::new(),
            ktk: None,
            certs: Vec::new(),
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
            Err(f) => {
                let reason = f.reason.clone();
                self.fail(&run, &f).await;
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

    async fn batch_and_model(&self) -> Result<(BatchRow, ModelSettings), Outcome> {
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
        Ok((batch, model))
    }

    async fn steps(
        &self,
        link: &mut HostLink,
        ack: &HelloAck,
        run: &mut Run,
    ) -> Result<String, Failure> {
        // 2. Secure channel.
        self.step(run, Step::Channel);
        self.open_channel(link, ack, run).await?;

        // 3. Check.
        self.step(run, Step::Check);
        self.check(link, ack, run).await?;

        // 4. Assign: serial, system title, logical device name — committed before any key exists.
        self.step(run, Step::Assign);
        self.assign(run).await?;
        let identity = run
            .identity
            .clone()
            .ok_or_else(|| db_failure(Step::Assign, "no identity"))?;
        link.call(&Message::Identity(identity))
            .await
            .map_err(|e| link_failure(Step::Assign, e))?;

        // 5. Keys.
        self.step(run, Step::Keys);
        self.key_pairs(link, ack, run).await?;
        self.secret_keys(link, run).await?;
        self.set_state(run, "keyed").await?;

        // 6. Trust anchors.
        self.step(run, Step::Anchors);
        let ca = self.inner.keys.device_ca.cert_der.clone();
        link.call(&Message::PutCert {
            slot: CertSlot::DeviceCa,
            der: ca,
        })
        .await
        .map_err(|e| link_failure(Step::Anchors, e))?;
        let fw = self.inner.keys.firmware_cert.clone();
        link.call(&Message::PutAnchor {
            kind: AnchorKind::FirmwareVerification,
            index: 0,
            der: fw,
        })
        .await
        .map_err(|e| link_failure(Step::Anchors, e))?;
        for (i, path) in run.model.anchors.clone().iter().enumerate() {
            let bytes = std::fs::read(path).map_err(|e| {
                Failure::new(
                    "station.error",
                    Severity::Warning,
                    format!("cannot read trust anchor {}: {e}", path.display()),
                )
                .quiet()
            })?;
            let (cert, der) = super::keys::parse_cert(&bytes).map_err(|e| {
                Failure::new(
                    "station.error",
                    Severity::Warning,
                    format!("trust anchor {}: {e}", path.display()),
                )
                .quiet()
            })?;
            let is_ca = matches!(cert.tbs_certificate().get_extension::<x509_cert::ext::pkix::BasicConstraints>(), Ok(Some((_, bc))) if bc.ca);
            let kind = if is_ca {
                AnchorKind::UtilityCa
            } else {
                AnchorKind::UtilityClient
            };
            link.call(&Message::PutAnchor {
                kind,
                index: i as u8,
                der,
            })
            .await
            .map_err(|e| link_failure(Step::Anchors, e))?;
        }

        // 7. Firmware.
        self.step(run, Step::Firmware);
        self.firmware(link, run).await?;
        self.set_state(run, "flashed").await?;

        // 8. Seal.
        self.step(run, Step::Seal);
        match link
            .call(&Message::Seal {
                disable: iface::PROVISIONING | iface::DEBUG | iface::OPTICAL,
            })
            .await
            .map_err(|e| link_failure(Step::Seal, e))?
        {
            Message::SealRsp {
                lifecycle: Lifecycle::Sealed,
                ..
            } => {}
            other => {
                return Err(Failure::new(
                    "meter.failed",
                    Severity::Warning,
                    format!("meter did not seal (answered {})", other.name()),
                ));
            }
        }
        self.set_state(run, "sealed").await?;

        // 9. Attest.
        self.step(run, Step::Attest);
        let (receipt, receipt_bytes, signature) = self.attest(link, run).await?;
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
        let data = ktk_derivation_data(&th);
        let ktk = hsm
            .run(move |s| s.derive_ktk(&kt, &eph, &data))
            .await
            .map_err(|e| hsm_failure(Step::Channel, e))?;
        run.scratch.push(ktk.clone());
        run.ktk = Some(ktk);
        Ok(())
    }

    async fn check(
        &self,
        link: &mut HostLink,
        ack: &HelloAck,
        run: &mut Run,
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
        let uid = run.uid.clone();
        let history = self
            .inner
            .db
            .call(move |c| records::meters_by_uid(c, &uid).map_err(super::Error::from))
            .await
            .map_err(|e| db_failure(Step::Check, e))?;
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
        let rework = self.rework_approved(&run.uid).await;
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
                return Err(Failure::new(
                    "meter.refused",
                    Severity::Notice,
                    "a sealed meter cannot be reworked over the jig; send it to the rework bench",
                ));
            }
            link.call(&Message::Reset {
                mode: ResetMode::FactoryWipe,
            })
            .await
            .map_err(|e| link_failure(Step::Check, e))?;
            return Err(Failure::new(
                "meter.refused",
                Severity::Info,
                "meter wiped for rework; it will be provisioned on its next insertion",
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

    async fn rework_approved(&self, uid: &str) -> bool {
        let uid = uid.to_string();
        self.inner
            .db
            .call(move |c| -> super::Result<bool> {
                Ok(c.query_row(
                    "SELECT count(*) FROM reworks WHERE uid = ?1 AND used_at IS NULL",
                    [uid],
                    |r| r.get::<_, i64>(0),
                )? > 0)
            })
            .await
            .unwrap_or(false)
    }

    async fn assign(&self, run: &mut Run) -> Result<(), Failure> {
        let (batch_id, quantity) = (run.batch.id, run.batch.quantity);
        let uid = run.uid.clone();
        let nest = self.nest as i64 + 1;
        let operator = self.operator.clone();
        let flag = self.inner.cfg.manufacturer.flag_id.clone();
        let r = self
            .inner
            .db
            .call(move |c| -> super::Result<Result<Assigned, String>> {
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
                if next > last {
                    return Ok(Err(format!("the batch has used its whole serial range (last {last}); open a new batch")));
                }
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
                        if matches!(e, crate::db::DbError::Constraint(_)) {
                            return Ok(Err(format!("UID {uid} is being provisioned in another nest")));
                        }
                        return Err(e.into());
                    }
                }
                let id = tx.last_insert_rowid();
                tx.execute("UPDATE batches SET next_serial = next_serial + 1 WHERE id = ?1", [batch_id])?;
                tx.commit()?;
                Ok(Ok((id, serial, next, title, ldn)))
            })
            .await
            .map_err(|e| db_failure(Step::Assign, e))?;
        let (id, serial, _no, title, ldn) = r.map_err(|reason| {
            let kind = if reason.contains("another nest") {
                "meter.duplicate_uid"
            } else {
                "meter.refused"
            };
            let sev = if kind == "meter.duplicate_uid" {
                Severity::Critical
            } else {
                Severity::Notice
            };
            Failure::new(kind, sev, reason)
        })?;
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
        Ok(())
    }

    async fn set_state(&self, run: &Run, state: &'static str) -> Result<(), Failure> {
        let Some(id) = run.meter_id else {
            return Ok(());
        };
        let step = run.step;
        self.inner
            .db
            .call(move |c| -> super::Result<()> {
                c.execute(
                    "UPDATE meters SET state = ?1 WHERE id = ?2",
                    params![state, id],
                )?;
                Ok(())
            })
            .await
            .map_err(|e| db_failure(step, e))
    }

    async fn key_pairs(
        &self,
        link: &mut HostLink,
        ack: &HelloAck,
        run: &mut Run,
    ) -> Result<(), Failure> {
        let curve = run.model.curve();
        let mut slots = vec![(CertSlot::Sign, MeterKeyUsage::DigitalSignature)];
        if run.model.key_agreement {
            slots.push((CertSlot::KeyAgreement, MeterKeyUsage::KeyAgreement));
        }
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
        let hcurve = match curve {
            Curve::P256 => hsm::Curve::P256,
            Curve::P384 => hsm::Curve::P384,
        };
        let identity = run
            .identity
            .clone()
            .ok_or_else(|| db_failure(Step::Keys, "no identity"))?;
        let not_after = run.model.not_after.as_deref().and_then(|s| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        });
        for (slot, usage) in slots {
            // The subject key: a request from the meter, or a pair made here.
            let subject = match run.model.keygen {
                Keygen::Meter => {
                    let csr = match link
                        .call(&Message::KeyGen { slot, curve })
                        .await
                        .map_err(|e| link_failure(Step::Keys, e))?
                    {
                        Message::KeyGenRsp { csr, .. } => csr,
                        other => {
                            return Err(Failure::new(
                                "meter.failed",
                                Severity::Warning,
                                format!("KEYGEN answered with {}", other.name()),
                            ));
                        }
                    };
                    hsm::cert::check_csr(&csr, hcurve).map_err(|e| {
                        Failure::new(
                            "security.bad_certificate_request",
                            Severity::Critical,
                            format!("the meter's certificate request was refused: {e}"),
                        )
                    })?;
                    hsm::cert::Subject::Csr(csr)
                }
                Keygen::Hsm => {
                    let pair = self
                        .inner
                        .hsm
                        .run(move |s| s.generate_ec_keypair(KeyRole::MeterKeyPair, hcurve, None))
                        .await
                        .map_err(|e| hsm_failure(Step::Keys, e))?;
                    run.scratch.push(pair.private.clone());
                    run.scratch.push(pair.public.clone());
                    let ktk = run
                        .ktk
                        .clone()
                        .ok_or_else(|| db_failure(Step::Keys, "no key-transport key"))?;
                    let private = pair.private.clone();
                    let wrapped = self
                        .inner
                        .hsm
                        .run(move |s| s.wrap(&ktk, &private, hsm::WrapAlg::AesKwPad))
                        .await
                        .map_err(|e| hsm_failure(Step::Keys, e))?;
                    let (key_id, key_type) = match (slot, curve) {
                        (CertSlot::Sign, Curve::P256) => (KeyId::SignPrivate, KeyType::EcP256),
                        (CertSlot::Sign, Curve::P384) => (KeyId::SignPrivate, KeyType::EcP384),
                        (_, Curve::P256) => (KeyId::KaPrivate, KeyType::EcP256),
                        (_, Curve::P384) => (KeyId::KaPrivate, KeyType::EcP384),
                    };
                    link.call(&Message::PutKey(PutKey {
                        key_id,
                        key_type,
                        wrap: WrapAlg::AesKwp,
                        kcv: kcv_ec_public(&pair.point),
                        wrapped,
                    }))
                    .await
                    .map_err(|e| link_failure(Step::Keys, e))?;
                    hsm::cert::Subject::Key {
                        curve: hcurve,
                        point: pair.point.clone(),
                    }
                }
            };
            // Certificate intent, with its serial, committed before the HSM signs.
            let serial = self
                .inner
                .hsm
                .run(hsm::cert::random_serial)
                .await
                .map_err(|e| hsm_failure(Step::Keys, e))?;
            let meter_id = run
                .meter_id
                .ok_or_else(|| db_failure(Step::Keys, "no meter record"))?;
            let slot_name = if slot == CertSlot::Sign { "sign" } else { "ka" };
            let serial_hex = hex::encode(serial);
            let sh = serial_hex.clone();
            let cert_id = self
                .inner
                .db
                .call(move |c| -> super::Result<i64> {
                    let now = now_ms();
                    c.execute(
                        "INSERT INTO certificates (meter_id, slot, state, serial, created_at, updated_at) VALUES (?1, ?2, 'intent', ?3, ?4, ?4)",
                        params![meter_id, slot_name, sh, now],
                    )?;
                    Ok(c.last_insert_rowid())
                })
                .await
                .map_err(|e| db_failure(Step::Keys, e))?;
            let profile = MeterProfile {
                system_title: identity.system_title,
                meter_serial: identity.serial.clone(),
                manufacturer: self.inner.cfg.manufacturer.name.clone(),
                usage,
                curve: hcurve,
                not_after,
            };
            let ca = self.inner.keys.device_ca.clone();
            let issued = self
                .inner
                .hsm
                .run(move |s| hsm::cert::issue_with_serial(s, &ca, &subject, &profile, &serial))
                .await
                .map_err(|e| match e {
                    hsm::Error::Csr(c) => Failure::new(
                        "security.bad_certificate_request",
                        Severity::Critical,
                        format!("the meter's certificate request was refused: {c}"),
                    ),
                    other => hsm_failure(Step::Keys, other),
                })?;
            if hex::encode(&issued.serial) != serial_hex.trim_start_matches("00")
                && hex::encode(&issued.serial) != serial_hex
            {
                return Err(Failure::new(
                    "station.error",
                    Severity::Critical,
                    "the issued certificate does not carry the serial committed as its intent",
                )
                .quiet());
            }
            let der = issued.der.clone();
            let fp = issued.fingerprint_hex();
            self.inner
                .db
                .call(move |c| -> super::Result<()> {
                    c.execute(
                        "UPDATE certificates SET state = 'issued', der = ?1, fingerprint = ?2, updated_at = ?3 WHERE id = ?4",
                        params![der, fp, now_ms(), cert_id],
                    )?;
                    Ok(())
                })
                .await
                .map_err(|e| db_failure(Step::Keys, e))?;
            let point =
                hsm::cert::subject_point(&issued.der).map_err(|e| hsm_failure(Step::Keys, e))?;
            link.call(&Message::PutCert {
                slot,
                der: issued.der.clone(),
            })
            .await
            .map_err(|e| link_failure(Step::Keys, e))?;
            run.certs.push((slot, issued.der, point));
        }
        Ok(())
    }

    async fn secret_keys(&self, link: &mut HostLink, run: &mut Run) -> Result<(), Failure> {
        let ktk = run
            .ktk
            .clone()
            .ok_or_else(|| db_failure(Step::Keys, "no key-transport key"))?;
        let label = run.batch.transport_key.clone();
        let size = if run.model.aes_bytes() == 32 {
            AesKeySize::Aes256
        } else {
            AesKeySize::Aes128
        };
        let key_type = if size == AesKeySize::Aes256 {
            KeyType::Aes256
        } else {
            KeyType::Aes128
        };
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
                        Ok((id, for_meter, for_utility, kcv))
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
        let rows: Vec<(String, String, Vec<u8>, String)> = keys
            .iter()
            .map(|(id, _, u, kcv)| {
                (
                    id.name().to_string(),
                    if key_type == KeyType::Aes256 {
                        "aes-256"
                    } else {
                        "aes-128"
                    }
                    .to_string(),
                    u.clone(),
                    hex::encode(kcv),
                )
            })
            .collect();
        self.inner
            .db
            .call(move |c| -> super::Result<()> {
                let tx = c.transaction()?;
                let now = now_ms();
                for (id, ty, wrapped, kcv) in rows {
                    tx.execute(
                        "INSERT INTO wrapped_keys (meter_id, key_id, key_type, wrap_alg, wrapped, kcv, created_at) VALUES (?1, ?2, ?3, 'aes-kw', ?4, ?5, ?6)",
                        params![meter_id, id, ty, wrapped, kcv, now],
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(|e| db_failure(Step::Keys, e))?;
        for (key_id, for_meter, _, kcv) in keys {
            link.call(&Message::PutKey(PutKey {
                key_id,
                key_type,
                wrap: WrapAlg::AesKw,
                kcv,
                wrapped: for_meter,
            }))
            .await
            .map_err(|e| link_failure(Step::Keys, e))?;
        }
        Ok(())
    }

    async fn firmware(&self, link: &mut HostLink, run: &mut Run) -> Result<(), Failure> {
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
                        self.firmware_rejected(run, "meter reported another image hash")
                            .await;
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
                    self.inner
                        .update_nest(self.nest, |n| n.progress = Some(1.0));
                    let id = run.meter_id;
                    let sha = hex::encode(plan.sha256);
                    if let Some(id) = id {
                        self.inner
                            .db
                            .call(move |c| -> super::Result<()> {
                                c.execute(
                                    "UPDATE meters SET fw_sha256 = ?1 WHERE id = ?2",
                                    params![sha, id],
                                )?;
                                Ok(())
                            })
                            .await
                            .map_err(|e| db_failure(Step::Firmware, e))?;
                    }
                    return Ok(());
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
                "another meter answered after the link came back",
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

    async fn attest(
        &self,
        link: &mut HostLink,
        run: &mut Run,
    ) -> Result<(Receipt, Vec<u8>, Vec<u8>), Failure> {
        let nonce_v = self
            .inner
            .hsm
            .run(|s| s.random(16))
            .await
            .map_err(|e| hsm_failure(Step::Attest, e))?;
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&nonce_v);
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
            "nest": self.nest + 1,
            "cycle_ms": cycle_ms,
        });
        self.inner
            .db
            .call(move |c| -> super::Result<()> {
                let tx = c.transaction()?;
                let now = now_ms();
                tx.execute(
                    "UPDATE meters SET state = 'done', receipt = ?1, receipt_sig = ?2, finished_at = ?3 WHERE id = ?4",
                    params![receipt_bytes, sig, now, id],
                )?;
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
                    Some(id) => records::fail_meter(&tx, id, &reason, now_ms())?,
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
                tracing::error!(nest, error = %e, "could not journal a failed meter; start-up recovery will fail it")
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
