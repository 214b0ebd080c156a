//! Between the engine's types and the API's messages, both ways: the daemon sends what the
//! engine says; clients turn it back into the same types, so the command line and the console
//! show a line the same way whether it is local or remote.
//!
//! Going back, a value the contract allows but this version does not know (an enum number from a
//! newer daemon) becomes the closest safe reading (an unknown nest state shows as offline); it
//! never fails the whole message.

use super::pb;
use crate::audit::{Alarm, Entry, Verification};
use crate::auth::{Role, User};
use crate::engine::{Event, ExportOutcome, Health, LineView, NestState, NestView, Step};
use crate::records::{BatchRow, CustomerRow, FirmwareRow};

impl From<BatchRow> for pb::Batch {
    fn from(b: BatchRow) -> Self {
        pb::Batch {
            id: b.id,
            work_order: b.work_order,
            model: b.model,
            firmware_id: b.firmware_id,
            firmware_version: b.firmware_version,
            firmware_sha256: b.firmware_sha256,
            customer_id: b.customer_id,
            customer: b.customer,
            quantity: b.quantity,
            serial_prefix: b.serial_prefix,
            serial_first: b.serial_first,
            serial_last: b.serial_last,
            next_serial: b.next_serial,
            state: b.state,
            transport_key: b.transport_key,
            oaep_hash: b.oaep_hash,
            done: b.done,
            failed: b.failed,
            in_flight: b.in_flight,
            opened_at: b.opened_at,
            opened_by: b.opened_by,
            closed_at: b.closed_at,
            closed_by: b.closed_by,
            exported_at: b.exported_at,
            keys_deleted_at: b.keys_deleted_at,
        }
    }
}

impl From<pb::Batch> for BatchRow {
    fn from(b: pb::Batch) -> Self {
        BatchRow {
            id: b.id,
            work_order: b.work_order,
            model: b.model,
            firmware_id: b.firmware_id,
            firmware_version: b.firmware_version,
            firmware_sha256: b.firmware_sha256,
            customer_id: b.customer_id,
            customer: b.customer,
            quantity: b.quantity,
            serial_prefix: b.serial_prefix,
            serial_first: b.serial_first,
            serial_last: b.serial_last,
            next_serial: b.next_serial,
            state: b.state,
            transport_key: b.transport_key,
            oaep_hash: b.oaep_hash,
            done: b.done,
            failed: b.failed,
            in_flight: b.in_flight,
            opened_at: b.opened_at,
            opened_by: b.opened_by,
            closed_at: b.closed_at,
            closed_by: b.closed_by,
            exported_at: b.exported_at,
            keys_deleted_at: b.keys_deleted_at,
        }
    }
}

impl From<FirmwareRow> for pb::Firmware {
    fn from(f: FirmwareRow) -> Self {
        pb::Firmware {
            id: f.id,
            sha256: f.sha256,
            version: f.version,
            size: f.size,
            signer_key_hash: f.signer_key_hash,
            imported_at: f.imported_at,
            imported_by: f.imported_by,
        }
    }
}

impl From<pb::Firmware> for FirmwareRow {
    fn from(f: pb::Firmware) -> Self {
        FirmwareRow {
            id: f.id,
            sha256: f.sha256,
            version: f.version,
            size: f.size,
            signer_key_hash: f.signer_key_hash,
            imported_at: f.imported_at,
            imported_by: f.imported_by,
        }
    }
}

impl From<CustomerRow> for pb::Customer {
    fn from(c: CustomerRow) -> Self {
        pb::Customer {
            id: c.id,
            name: c.name,
            fingerprint: c.fingerprint,
            imported_at: c.imported_at,
            imported_by: c.imported_by,
        }
    }
}

impl From<pb::Customer> for CustomerRow {
    fn from(c: pb::Customer) -> Self {
        CustomerRow {
            id: c.id,
            name: c.name,
            fingerprint: c.fingerprint,
            imported_at: c.imported_at,
            imported_by: c.imported_by,
        }
    }
}

impl From<User> for pb::User {
    fn from(u: User) -> Self {
        pb::User {
            id: u.id,
            name: u.name,
            role: u.role.as_str().into(),
            disabled: u.disabled,
            locked_until: u.locked_until,
        }
    }
}

impl From<pb::User> for User {
    fn from(u: pb::User) -> Self {
        User {
            id: u.id,
            name: u.name,
            // The least privileged reading of a role this client does not know.
            role: Role::parse(&u.role).unwrap_or(Role::Operator),
            disabled: u.disabled,
            locked_until: u.locked_until,
        }
    }
}

impl From<Alarm> for pb::Alarm {
    fn from(a: Alarm) -> Self {
        pb::Alarm {
            id: a.id,
            audit_seq: a.audit_seq,
            kind: a.kind,
            message: a.message,
            nest: a.nest,
            raised_at: a.raised_at,
        }
    }
}

impl From<pb::Alarm> for Alarm {
    fn from(a: pb::Alarm) -> Self {
        Alarm {
            id: a.id,
            audit_seq: a.audit_seq,
            kind: a.kind,
            message: a.message,
            nest: a.nest,
            raised_at: a.raised_at,
        }
    }
}

impl From<Entry> for pb::AuditEntry {
    fn from(e: Entry) -> Self {
        pb::AuditEntry {
            seq: e.seq,
            time: e.time,
            ts: e.ts,
            source: e.source,
            kind: e.kind,
            severity: e.severity,
            actor: e.actor,
            details_json: e.details.to_string(),
        }
    }
}

impl From<pb::AuditEntry> for Entry {
    fn from(e: pb::AuditEntry) -> Self {
        Entry {
            seq: e.seq,
            time: e.time,
            ts: e.ts,
            source: e.source,
            kind: e.kind,
            severity: e.severity,
            actor: e.actor,
            details: serde_json::from_str(&e.details_json)
                .unwrap_or(serde_json::Value::String(e.details_json)),
        }
    }
}

impl From<Verification> for pb::Verification {
    fn from(v: Verification) -> Self {
        let (seq, reason) = match v.first_bad {
            Some((s, r)) => (Some(s), Some(r)),
            None => (None, None),
        };
        pb::Verification {
            entries: v.entries,
            checkpoints: v.checkpoints,
            first_bad_seq: seq,
            first_bad_reason: reason,
            signatures_checked: v.signatures_checked,
        }
    }
}

impl From<pb::Verification> for Verification {
    fn from(v: pb::Verification) -> Self {
        Verification {
            entries: v.entries,
            checkpoints: v.checkpoints,
            first_bad: v
                .first_bad_seq
                .map(|s| (s, v.first_bad_reason.unwrap_or_default())),
            signatures_checked: v.signatures_checked,
        }
    }
}

fn nest_state(s: NestState) -> pb::NestState {
    match s {
        NestState::Offline => pb::NestState::Offline,
        NestState::Idle => pb::NestState::Idle,
        NestState::Busy => pb::NestState::Busy,
        NestState::Pass => pb::NestState::Pass,
        NestState::Fail => pb::NestState::Fail,
        NestState::Stopped => pb::NestState::Stopped,
    }
}

fn nest_state_back(s: i32) -> NestState {
    match pb::NestState::try_from(s) {
        Ok(pb::NestState::Idle) => NestState::Idle,
        Ok(pb::NestState::Busy) => NestState::Busy,
        Ok(pb::NestState::Pass) => NestState::Pass,
        Ok(pb::NestState::Fail) => NestState::Fail,
        Ok(pb::NestState::Stopped) => NestState::Stopped,
        Ok(pb::NestState::Offline | pb::NestState::Unspecified) | Err(_) => NestState::Offline,
    }
}

fn step(s: Option<Step>) -> pb::Step {
    match s {
        None => pb::Step::Unspecified,
        Some(Step::Hello) => pb::Step::Hello,
        Some(Step::Channel) => pb::Step::Channel,
        Some(Step::Check) => pb::Step::Check,
        Some(Step::Assign) => pb::Step::Assign,
        Some(Step::Keys) => pb::Step::Keys,
        Some(Step::Anchors) => pb::Step::Anchors,
        Some(Step::Firmware) => pb::Step::Firmware,
        Some(Step::Seal) => pb::Step::Seal,
        Some(Step::Attest) => pb::Step::Attest,
        Some(Step::Release) => pb::Step::Release,
    }
}

fn step_back(s: i32) -> Option<Step> {
    Some(match pb::Step::try_from(s).ok()? {
        pb::Step::Unspecified => return None,
        pb::Step::Hello => Step::Hello,
        pb::Step::Channel => Step::Channel,
        pb::Step::Check => Step::Check,
        pb::Step::Assign => Step::Assign,
        pb::Step::Keys => Step::Keys,
        pb::Step::Anchors => Step::Anchors,
        pb::Step::Firmware => Step::Firmware,
        pb::Step::Seal => Step::Seal,
        pb::Step::Attest => Step::Attest,
        pb::Step::Release => Step::Release,
    })
}

impl From<NestView> for pb::Nest {
    fn from(n: NestView) -> Self {
        pb::Nest {
            nest: n.nest,
            name: n.name,
            port: n.port,
            enabled: n.enabled,
            state: nest_state(n.state) as i32,
            uid: n.uid,
            serial: n.serial,
            step: step(n.step) as i32,
            progress: n.progress,
            message: n.message,
            port_open: n.port_open,
            last_cycle_ms: n.last_cycle_ms,
        }
    }
}

impl From<pb::Nest> for NestView {
    fn from(n: pb::Nest) -> Self {
        NestView {
            nest: n.nest,
            name: n.name,
            port: n.port,
            enabled: n.enabled,
            state: nest_state_back(n.state),
            uid: n.uid,
            serial: n.serial,
            step: step_back(n.step),
            progress: n.progress,
            message: n.message,
            port_open: n.port_open,
            last_cycle_ms: n.last_cycle_ms,
        }
    }
}

impl From<Health> for pb::Health {
    fn from(h: Health) -> Self {
        pb::Health {
            hsm: h.hsm,
            hsm_detail: h.hsm_detail,
            database: h.database,
            fleet: h.fleet.map(|f| pb::FleetHealth {
                reachable: f.reachable,
                backlog: f.backlog,
                oldest_unsent_s: f.oldest_unsent_s,
                leased_left: f.leased_left,
                problem: f.problem,
            }),
        }
    }
}

impl From<pb::Health> for Health {
    fn from(h: pb::Health) -> Self {
        Health {
            hsm: h.hsm,
            hsm_detail: h.hsm_detail,
            database: h.database,
            fleet: h.fleet.map(|f| crate::engine::FleetHealth {
                reachable: f.reachable,
                backlog: f.backlog,
                oldest_unsent_s: f.oldest_unsent_s,
                leased_left: f.leased_left,
                problem: f.problem,
            }),
        }
    }
}

impl From<crate::fleet::FleetView> for pb::FleetViewReply {
    fn from(v: crate::fleet::FleetView) -> Self {
        pb::FleetViewReply {
            batches: v
                .batches
                .into_iter()
                .map(|(work_order, station, done, failed)| pb::FleetBatch {
                    work_order,
                    station,
                    done,
                    failed,
                })
                .collect(),
            yields: v
                .yields
                .into_iter()
                .map(|(station, nest, done, failed)| pb::FleetYield {
                    station,
                    nest,
                    done,
                    failed,
                })
                .collect(),
            found: v
                .found
                .into_iter()
                .map(|f| pb::FleetMeter {
                    station: f.station,
                    work_order: f.work_order,
                    nest: f.nest,
                    uid: f.uid,
                    state: f.state,
                    serial: f.serial,
                    system_title: f.system_title,
                    operator: f.operator,
                    finished_at: f.finished_at,
                    failure: f.failure,
                })
                .collect(),
        }
    }
}

impl From<pb::FleetViewReply> for crate::fleet::FleetView {
    fn from(v: pb::FleetViewReply) -> Self {
        crate::fleet::FleetView {
            batches: v
                .batches
                .into_iter()
                .map(|b| (b.work_order, b.station, b.done, b.failed))
                .collect(),
            yields: v
                .yields
                .into_iter()
                .map(|y| (y.station, y.nest, y.done, y.failed))
                .collect(),
            found: v
                .found
                .into_iter()
                .map(|f| crate::fleet::Found {
                    station: f.station,
                    work_order: f.work_order,
                    nest: f.nest,
                    uid: f.uid,
                    state: f.state,
                    serial: f.serial,
                    system_title: f.system_title,
                    operator: f.operator,
                    finished_at: f.finished_at,
                    failure: f.failure,
                })
                .collect(),
        }
    }
}

impl From<crate::shift::ShiftView> for pb::ShiftViewReply {
    fn from(v: crate::shift::ShiftView) -> Self {
        pb::ShiftViewReply {
            since_ms: v.since_ms,
            until_ms: v.until_ms,
            bin_ms: v.bin_ms,
            steps: v.steps,
            nests: v
                .nests
                .into_iter()
                .map(|n| pb::ShiftNest {
                    nest: n.nest,
                    done: n.done,
                    failed: n.failed,
                    failed_at: n.failed_at,
                    done_per_bin: n.bins.iter().map(|b| b.0).collect(),
                    failed_per_bin: n.bins.iter().map(|b| b.1).collect(),
                    flag: n.flag,
                })
                .collect(),
            causes: v
                .causes
                .into_iter()
                .map(|(cause, meters)| pb::ShiftCause { cause, meters })
                .collect(),
            cycle: v
                .cycle
                .into_iter()
                .map(|c| pb::ShiftCycle {
                    at_ms: c.at_ms,
                    meters: c.meters,
                    min_ms: c.min_ms,
                    median_ms: c.median_ms,
                    p90_ms: c.p90_ms,
                })
                .collect(),
            floor_ms: v.floor_ms,
        }
    }
}

/// The console draws what arrives: a nest's per-step and per-bin lists are cut or padded to the
/// reply's own steps and bins, so that a malformed reply cannot index out of range.
impl From<pb::ShiftViewReply> for crate::shift::ShiftView {
    fn from(v: pb::ShiftViewReply) -> Self {
        let bins = v
            .nests
            .iter()
            .map(|n| n.done_per_bin.len())
            .max()
            .unwrap_or(0)
            .min(crate::shift::MAX_BINS);
        let steps = v.steps.len().min(crate::shift::MAX_BINS);
        let fit = |mut l: Vec<u32>, n: usize| {
            l.resize(n, 0);
            l
        };
        crate::shift::ShiftView {
            since_ms: v.since_ms,
            until_ms: v.until_ms,
            bin_ms: v.bin_ms,
            steps: v.steps.into_iter().take(steps).collect(),
            nests: v
                .nests
                .into_iter()
                .map(|n| crate::shift::NestShift {
                    nest: n.nest,
                    done: n.done,
                    failed: n.failed,
                    failed_at: fit(n.failed_at, steps),
                    bins: fit(n.done_per_bin, bins)
                        .into_iter()
                        .zip(fit(n.failed_per_bin, bins))
                        .collect(),
                    flag: n.flag,
                })
                .collect(),
            causes: v.causes.into_iter().map(|c| (c.cause, c.meters)).collect(),
            cycle: v
                .cycle
                .into_iter()
                .map(|c| crate::shift::CycleBin {
                    at_ms: c.at_ms,
                    meters: c.meters,
                    min_ms: c.min_ms,
                    median_ms: c.median_ms,
                    p90_ms: c.p90_ms,
                })
                .collect(),
            floor_ms: v.floor_ms,
        }
    }
}

impl From<LineView> for pb::LineView {
    fn from(l: LineView) -> Self {
        pb::LineView {
            station: l.station,
            running: l.running,
            halted: l.halted,
            operator: l.operator,
            batch: l.batch.map(Into::into),
            nests: l.nests.into_iter().map(Into::into).collect(),
            alarms: l.alarms.into_iter().map(Into::into).collect(),
            health: Some(l.health.into()),
            last_cycle_ms: l.last_cycle_ms,
            avg_cycle_ms: l.avg_cycle_ms,
        }
    }
}

impl From<pb::LineView> for LineView {
    fn from(l: pb::LineView) -> Self {
        LineView {
            station: l.station,
            running: l.running,
            halted: l.halted,
            operator: l.operator,
            batch: l.batch.map(Into::into),
            nests: l.nests.into_iter().map(Into::into).collect(),
            alarms: l.alarms.into_iter().map(Into::into).collect(),
            health: l.health.map(Into::into).unwrap_or_default(),
            last_cycle_ms: l.last_cycle_ms,
            avg_cycle_ms: l.avg_cycle_ms,
        }
    }
}

impl From<Event> for pb::Event {
    fn from(e: Event) -> Self {
        use pb::event::Event as E;
        let event = match e {
            Event::Nest(n) => E::Nest(n.into()),
            Event::Batch(b) => E::Batch(pb::BatchChanged {
                batch: b.map(Into::into),
            }),
            Event::Alarm(a) => E::Alarm(a.into()),
            Event::AlarmAcked { id, by } => E::AlarmAcked(pb::AlarmAcked { id, by }),
            Event::Line { running, halted } => E::Line(pb::LineChanged { running, halted }),
            Event::Health(h) => E::Health(h.into()),
            Event::MeterFinished {
                nest,
                uid,
                serial,
                ok,
                reason,
                cycle_ms,
            } => E::MeterFinished(pb::MeterFinished {
                nest,
                uid,
                serial,
                ok,
                reason,
                cycle_ms,
            }),
        };
        pb::Event { event: Some(event) }
    }
}

/// One message of the event stream, as a client reads it.
// A snapshot comes once per stream (and after a client fell behind): boxing it would save
// nothing worth an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The whole line (first, and after the client fell behind).
    Snapshot(LineView),
    /// An engine event.
    Event(Event),
}

impl From<LineView> for pb::Event {
    fn from(l: LineView) -> Self {
        pb::Event {
            event: Some(pb::event::Event::Snapshot(l.into())),
        }
    }
}

/// A stream message as a client reads it; `None` for an empty message (a newer daemon's kind
/// this client does not know).
pub fn update(e: pb::Event) -> Option<Update> {
    use pb::event::Event as E;
    Some(match e.event? {
        E::Snapshot(l) => Update::Snapshot(l.into()),
        E::Nest(n) => Update::Event(Event::Nest(n.into())),
        E::Batch(b) => Update::Event(Event::Batch(b.batch.map(Into::into))),
        E::Alarm(a) => Update::Event(Event::Alarm(a.into())),
        E::AlarmAcked(a) => Update::Event(Event::AlarmAcked { id: a.id, by: a.by }),
        E::Line(l) => Update::Event(Event::Line {
            running: l.running,
            halted: l.halted,
        }),
        E::Health(h) => Update::Event(Event::Health(h.into())),
        E::MeterFinished(m) => Update::Event(Event::MeterFinished {
            nest: m.nest,
            uid: m.uid,
            serial: m.serial,
            ok: m.ok,
            reason: m.reason,
            cycle_ms: m.cycle_ms,
        }),
    })
}

impl From<&ExportOutcome> for pb::ExportReply {
    fn from(e: &ExportOutcome) -> Self {
        pb::ExportReply {
            out_dir: e.out_dir.display().to_string(),
            meters: e.meters as u64,
            voided: e.voided as u64,
            manifest_sha256: e.manifest_sha256.clone(),
            checkpoint_seq: e.checkpoint_seq,
            files: super::EXPORT_FILES.iter().map(|f| f.to_string()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nest() -> NestView {
        NestView {
            nest: 3,
            name: "N3".into(),
            port: "/dev/pts/9".into(),
            enabled: true,
            state: NestState::Busy,
            uid: Some("0011".into()),
            serial: None,
            step: Some(Step::Firmware),
            progress: Some(0.5),
            message: None,
            port_open: true,
            last_cycle_ms: Some(1234),
        }
    }

    #[test]
    fn events_survive_the_round_trip() {
        let events = [
            Event::Nest(nest()),
            Event::Batch(None),
            Event::AlarmAcked {
                id: 4,
                by: "super".into(),
            },
            Event::Line {
                running: false,
                halted: Some("the HSM does not answer".into()),
            },
            Event::Health(Health {
                hsm: false,
                hsm_detail: "cell".into(),
                database: true,
                fleet: Some(crate::engine::FleetHealth {
                    reachable: false,
                    backlog: 12,
                    oldest_unsent_s: Some(75),
                    leased_left: 900,
                    problem: Some("the registry at db:5432/registry cannot be reached".into()),
                }),
            }),
            Event::MeterFinished {
                nest: 2,
                uid: "aa".into(),
                serial: Some("E2E000001001".into()),
                ok: false,
                reason: Some("wrong hash".into()),
                cycle_ms: 99,
            },
        ];
        for e in events {
            let wire = pb::Event::from(e.clone());
            let bytes = prost::Message::encode_to_vec(&wire);
            let back: pb::Event = prost::Message::decode(bytes.as_slice()).unwrap();
            assert_eq!(update(back), Some(Update::Event(e)));
        }
    }

    #[test]
    fn unknown_enum_values_read_safely() {
        let mut n = pb::Nest::from(nest());
        n.state = 77;
        n.step = 77;
        let back = NestView::from(n);
        assert_eq!(back.state, NestState::Offline);
        assert_eq!(back.step, None);
        let u = User::from(pb::User {
            role: "root".into(),
            ..pb::User::default()
        });
        assert_eq!(u.role, Role::Operator);
        assert_eq!(update(pb::Event { event: None }), None);
    }
}
