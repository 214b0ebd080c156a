//! A plain async meter loop: bytes from the transport into a [`MeterSession`], its output back.
//! Enough for tests of the host driver; the emulator in `meter-sim` runs its own loop with fault
//! injection and flash persistence.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Transport, system_rng};
use crate::meter::{MeterApp, MeterEvent, MeterSession};
use crate::msg::ResetMode;

/// Serves one meter until the transport closes or the meter is released.
pub async fn serve_meter(
    mut transport: Transport,
    session: &mut MeterSession,
    app: &mut (dyn MeterApp + Send),
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut rng = system_rng();
    loop {
        let n = transport.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        let out = session.receive(&buf[..n], app, &mut rng);
        if !out.bytes.is_empty() {
            transport.write_all(&out.bytes).await?;
            transport.flush().await?;
        }
        if out.events.contains(&MeterEvent::Reset(ResetMode::Release)) {
            return Ok(());
        }
    }
}
