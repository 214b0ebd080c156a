//! Thin tokio adapters: the transports a nest can use, and the async drivers that run the sans-IO
//! sessions over them.
//!
//! A nest port is named by a stable path (`/dev/serial/by-path/...`, a pseudo-terminal) or by
//! `tcp://host:port` (a serial device server). Everything here moves bytes and keeps time;
//! everything the bytes mean is decided in the core.

mod host;
mod meter;

use std::fmt;
use std::io;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

pub use host::{HostLink, LinkError, LinkStats, TranscriptSigner};
pub use meter::serve_meter;
/// The slave side of a pseudo-terminal made by [`pty_pair`], kept open by its creator.
pub use tokio_serial::SerialStream as PtySlave;

/// A bidirectional byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A boxed transport.
pub type Transport = Pin<Box<dyn Stream>>;

/// Where a nest's meter is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortAddr {
    /// A serial device (or pseudo-terminal) path.
    Serial(String),
    /// A serial device server, `host:port`.
    Tcp(String),
}

/// A port name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid port {given:?}: {why}; use a device path such as /dev/serial/by-path/... or tcp://host:port"
)]
pub struct BadPort {
    given: String,
    why: &'static str,
}

impl PortAddr {
    /// Parses `tcp://host:port` or an absolute device path.
    pub fn parse(s: &str) -> Result<PortAddr, BadPort> {
        let bad = |why| BadPort {
            given: s.to_string(),
            why,
        };
        if let Some(rest) = s.strip_prefix("tcp://") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing :port"))?;
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            port.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("port must be 1..65535"))?;
            return Ok(PortAddr::Tcp(rest.to_string()));
        }
        if s.contains("://") {
            return Err(bad("only tcp:// is supported"));
        }
        if !s.starts_with('/') {
            return Err(bad("device paths must be absolute"));
        }
        Ok(PortAddr::Serial(s.to_string()))
    }
}

impl fmt::Display for PortAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortAddr::Serial(p) => f.write_str(p),
            PortAddr::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// Opens a port at `baud` (ignored for TCP: the device server owns the line settings).
pub async fn open(addr: &PortAddr, baud: u32) -> io::Result<Transport> {
    match addr {
        PortAddr::Serial(path) => {
            let builder = tokio_serial::new(path, baud);
            let stream = tokio_serial::SerialStream::open(&builder)
                .map_err(|e| io::Error::other(format!("cannot open serial port {path}: {e}")))?;
            Ok(Box::pin(stream))
        }
        PortAddr::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a.as_str()).await?;
            s.set_nodelay(true)?;
            Ok(Box::pin(s))
        }
    }
}

/// Two transports joined in memory (for unit tests of everything above the wire).
pub fn memory_pair(buffer: usize) -> (Transport, Transport) {
    let (a, b) = tokio::io::duplex(buffer);
    (Box::pin(a), Box::pin(b))
}

/// A pseudo-terminal pair: the master side as a transport, and the path of the slave side that a
/// station opens as if it were a serial port. The slave is returned too: keep it open so that the
/// terminal survives the station closing and re-opening it.
pub fn pty_pair() -> io::Result<(Transport, PtySlave, String)> {
    use tokio_serial::SerialPort;
    let (master, slave) = tokio_serial::SerialStream::pair()
        .map_err(|e| io::Error::other(format!("cannot create a pseudo-terminal: {e}")))?;
    let name = slave
        .name()
        .ok_or_else(|| io::Error::other("pseudo-terminal has no name"))?;
    Ok((Box::pin(master), slave, name))
}

/// The system's cryptographic RNG.
pub fn system_rng() -> rand_core::UnwrapErr<getrandom::SysRng> {
    rand_core::UnwrapErr(getrandom::SysRng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names() {
        assert_eq!(
            PortAddr::parse("tcp://10.0.0.5:4001"),
            Ok(PortAddr::Tcp("10.0.0.5:4001".into()))
        );
        assert!(PortAddr::parse("tcp://host").is_err());
        assert!(PortAddr::parse("tcp://:80").is_err());
        assert!(PortAddr::parse("tcp://h:0").is_err());
        assert!(PortAddr::parse("udp://h:1").is_err());
        assert!(PortAddr::parse("ttyUSB0").is_err());
        assert_eq!(
            PortAddr::parse("/dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0"),
            Ok(PortAddr::Serial(
                "/dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0".into()
            ))
        );
    }
}
