//! The line's PLC or handler robot drives the nests over Modbus TCP (schemas/plc-modbus.md): the
//! START / BUSY / PASS / FAIL handshake per nest that production programmers use, a READY bit,
//! and the nests' states and counters as input registers.
//!
//! The table is shared by the nest tasks (which wait for START and set the outputs) and the
//! Modbus server (which serves the PLC's reads and its START writes). Modbus has no
//! authentication: connections are taken only from the addresses the configuration allows, and
//! nothing here can open, close or change a batch — the PLC decides when a nest may start, and
//! reads what happened.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};

use tokio::sync::Notify;
use tokio_modbus::prelude::{ExceptionCode, Request, Response};

use crate::engine::NestState;

/// The version of the register map in input register 0.
pub const MAP_VERSION: u16 = 1;
/// Input register where the nests' blocks start.
pub const NEST_REGISTERS: u16 = 16;
/// Input registers per nest.
pub const REGISTERS_PER_NEST: u16 = 4;
/// Discrete inputs per nest: READY, BUSY, PASS, FAIL.
pub const BITS_PER_NEST: u16 = 4;

/// One nest's side of the handshake.
#[derive(Debug, Default)]
struct NestIo {
    start: AtomicBool,
    busy: AtomicBool,
    pass: AtomicBool,
    fail: AtomicBool,
    state: AtomicU8,
    progress: AtomicU8,
    done: AtomicU32,
    failed: AtomicU32,
}

/// The handshake of every nest.
#[derive(Debug)]
pub struct PlcTable {
    nests: Vec<NestIo>,
    running: AtomicBool,
    /// Wakes the nests when the PLC writes a START.
    changed: Notify,
}

/// What a nest's outputs say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Waiting for START.
    Ready,
    /// START seen: a meter is being provisioned.
    Busy,
    /// Finished: PASS or FAIL shown until the PLC drops START.
    Result {
        /// Passed.
        pass: bool,
    },
}

impl PlcTable {
    /// A table for `nests` nests.
    pub fn new(nests: usize) -> PlcTable {
        PlcTable {
            nests: (0..nests).map(|_| NestIo::default()).collect(),
            running: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn nest(&self, i: usize) -> Option<&NestIo> {
        self.nests.get(i)
    }

    /// Does the PLC hold nest `i`'s START?
    pub fn start(&self, i: usize) -> bool {
        self.nest(i).is_some_and(|n| n.start.load(Ordering::SeqCst))
    }

    /// Waits until the PLC writes a START (any nest).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Sets nest `i`'s outputs.
    pub fn set(&self, i: usize, h: Handshake) {
        let Some(n) = self.nest(i) else { return };
        let (busy, pass, fail) = match h {
            Handshake::Ready => (false, false, false),
            Handshake::Busy => (true, false, false),
            Handshake::Result { pass } => (false, pass, !pass),
        };
        n.busy.store(busy, Ordering::SeqCst);
        n.pass.store(pass, Ordering::SeqCst);
        n.fail.store(fail, Ordering::SeqCst);
        if let Handshake::Result { pass } = h {
            let c = if pass { &n.done } else { &n.failed };
            c.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// What nest `i`'s outputs say now.
    pub fn handshake(&self, i: usize) -> Handshake {
        match self.nest(i) {
            Some(n) if n.busy.load(Ordering::SeqCst) => Handshake::Busy,
            Some(n) if n.pass.load(Ordering::SeqCst) => Handshake::Result { pass: true },
            Some(n) if n.fail.load(Ordering::SeqCst) => Handshake::Result { pass: false },
            _ => Handshake::Ready,
        }
    }

    /// Mirrors a nest's state and progress into its input registers.
    pub fn show(&self, i: usize, state: &NestState, progress: Option<f32>) {
        let Some(n) = self.nest(i) else { return };
        n.state.store(state_code(state), Ordering::SeqCst);
        let p = progress.map(|p| (p.clamp(0.0, 1.0) * 100.0).round() as u8);
        n.progress.store(p.unwrap_or(0), Ordering::SeqCst);
    }

    /// Whether the line runs (input register 2, and READY).
    pub fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::SeqCst);
    }

    fn bit(&self, addr: u16) -> Option<bool> {
        let n = self.nest(usize::from(addr / BITS_PER_NEST))?;
        let ready = self.running.load(Ordering::SeqCst)
            && !n.busy.load(Ordering::SeqCst)
            && !n.pass.load(Ordering::SeqCst)
            && !n.fail.load(Ordering::SeqCst)
            && !matches!(n.state.load(Ordering::SeqCst), 0 | 5);
        Some(match addr % BITS_PER_NEST {
            0 => ready,
            1 => n.busy.load(Ordering::SeqCst),
            2 => n.pass.load(Ordering::SeqCst),
            _ => n.fail.load(Ordering::SeqCst),
        })
    }

    fn register(&self, addr: u16) -> Option<u16> {
        match addr {
            0 => Some(MAP_VERSION),
            1 => u16::try_from(self.nests.len()).ok(),
            2 => Some(u16::from(self.running.load(Ordering::SeqCst))),
            3..NEST_REGISTERS => Some(0),
            _ => {
                let k = addr - NEST_REGISTERS;
                let n = self.nest(usize::from(k / REGISTERS_PER_NEST))?;
                Some(match k % REGISTERS_PER_NEST {
                    0 => u16::from(n.state.load(Ordering::SeqCst)),
                    1 => u16::from(n.progress.load(Ordering::SeqCst)),
                    2 => (n.done.load(Ordering::SeqCst) & 0xFFFF) as u16,
                    _ => (n.failed.load(Ordering::SeqCst) & 0xFFFF) as u16,
                })
            }
        }
    }

    /// Answers one Modbus request.
    pub fn answer(&self, req: Request<'_>) -> Result<Response, ExceptionCode> {
        let range =
            |addr: u16, count: u16, max: usize| -> Result<std::ops::Range<u16>, ExceptionCode> {
                let end = usize::from(addr) + usize::from(count);
                if count == 0 || end > max {
                    return Err(ExceptionCode::IllegalDataAddress);
                }
                Ok(addr..addr + count)
            };
        let nests = self.nests.len();
        match req {
            Request::ReadCoils(addr, count) => {
                let r = range(addr, count, nests)?;
                Ok(Response::ReadCoils(
                    r.map(|a| self.start(usize::from(a))).collect(),
                ))
            }
            Request::WriteSingleCoil(addr, on) => {
                range(addr, 1, nests)?;
                self.write_start(usize::from(addr), on);
                Ok(Response::WriteSingleCoil(addr, on))
            }
            Request::WriteMultipleCoils(addr, ref bits) => {
                let count =
                    u16::try_from(bits.len()).map_err(|_| ExceptionCode::IllegalDataValue)?;
                let r = range(addr, count, nests)?;
                for (a, on) in r.zip(bits.iter()) {
                    self.write_start(usize::from(a), *on);
                }
                Ok(Response::WriteMultipleCoils(addr, count))
            }
            Request::ReadDiscreteInputs(addr, count) => {
                let r = range(addr, count, nests * usize::from(BITS_PER_NEST))?;
                r.map(|a| self.bit(a).ok_or(ExceptionCode::IllegalDataAddress))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Response::ReadDiscreteInputs)
            }
            Request::ReadInputRegisters(addr, count) => {
                let max = usize::from(NEST_REGISTERS) + nests * usize::from(REGISTERS_PER_NEST);
                let r = range(addr, count, max)?;
                r.map(|a| self.register(a).ok_or(ExceptionCode::IllegalDataAddress))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Response::ReadInputRegisters)
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }

    fn write_start(&self, i: usize, on: bool) {
        if let Some(n) = self.nest(i) {
            n.start.store(on, Ordering::SeqCst);
            self.changed.notify_waiters();
        }
    }
}

/// A nest state as input register: 0 stopped, 1 idle, 2 busy, 3 passed, 4 failed, 5 offline.
pub fn state_code(s: &NestState) -> u8 {
    match s {
        NestState::Stopped => 0,
        NestState::Idle => 1,
        NestState::Busy => 2,
        NestState::Pass => 3,
        NestState::Fail => 4,
        NestState::Offline => 5,
    }
}

/// The Modbus service of one connection.
struct Service(Arc<PlcTable>);

impl tokio_modbus::server::Service for Service {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        std::future::ready(self.0.answer(req))
    }
}

/// Serves the table on `listener` until `stop`; a connection from an address not in `allow` is
/// closed at once and reported through `refused`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    table: Arc<PlcTable>,
    allow: Vec<std::net::IpAddr>,
    refused: impl Fn(SocketAddr) + Send + Sync + 'static,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) -> std::io::Result<()> {
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let on_connected = move |stream: tokio::net::TcpStream, addr: SocketAddr| {
        let ok = allow.contains(&addr.ip());
        if !ok {
            refused(addr);
        }
        let table = Arc::clone(&table);
        async move { Ok(ok.then_some((Service(table), stream))) }
    };
    let on_error = |e: std::io::Error| tracing::debug!(error = %e, "a PLC connection ended");
    server
        .serve_until(&on_connected, on_error, stop)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_answers_the_handshake_and_refuses_what_is_not_there() {
        let t = PlcTable::new(2);
        t.set_running(true);
        t.show(0, &NestState::Idle, None);
        t.show(1, &NestState::Offline, None);
        let bits = |t: &PlcTable| match t.answer(Request::ReadDiscreteInputs(0, 8)).unwrap() {
            Response::ReadDiscreteInputs(b) => b,
            other => panic!("{other:?}"),
        };
        // Nest 1 ready, nest 2 offline: not ready.
        assert_eq!(
            bits(&t)[..],
            [true, false, false, false, false, false, false, false]
        );
        t.answer(Request::WriteSingleCoil(0, true)).unwrap();
        assert!(t.start(0) && !t.start(1));
        t.set(0, Handshake::Busy);
        assert_eq!(bits(&t)[..4], [false, true, false, false]);
        t.set(0, Handshake::Result { pass: false });
        assert_eq!(bits(&t)[..4], [false, false, false, true]);
        assert_eq!(t.handshake(0), Handshake::Result { pass: false });
        match t.answer(Request::ReadInputRegisters(0, 20)).unwrap() {
            Response::ReadInputRegisters(r) => {
                assert_eq!(r[..3], [MAP_VERSION, 2, 1]);
                assert_eq!(r[16..20], [1, 0, 0, 1], "state idle, failed 1");
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            Request::WriteSingleCoil(2, true),
            Request::ReadCoils(1, 2),
            Request::ReadDiscreteInputs(0, 9),
            Request::ReadInputRegisters(20, 5),
            Request::ReadCoils(0, 0),
        ] {
            assert_eq!(t.answer(bad), Err(ExceptionCode::IllegalDataAddress));
        }
        assert_eq!(
            t.answer(Request::WriteSingleRegister(0, 1)),
            Err(ExceptionCode::IllegalFunction)
        );
    }
}
