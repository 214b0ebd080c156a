//! The link emulator: joins two byte streams as a serial line would.
//!
//! Each direction is paced at the baud rate (10 wire bits per byte: 8N1), delivered after a fixed
//! one-way latency (USB adapter latency timers, device servers), optionally with random bit
//! errors and dropped bytes from a seeded generator so that a run can be repeated. Bytes are
//! released in 1 ms slices, so the receiver sees a stream, not bursts of whole frames. A bounded
//! buffer (like a UART driver's) stops reading from the sender when the wire is behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use line_protocol::io::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::task::JoinHandle;

use crate::rng::NoiseRng;

/// Line parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// Baud rate.
    pub baud: u32,
    /// One-way latency added to every byte.
    pub latency: Duration,
    /// Probability that any one data bit is flipped.
    pub ber: f64,
    /// Probability that any one byte is lost.
    pub drop_rate: f64,
    /// Seed of the noise generator.
    pub seed: u64,
    /// Bytes buffered per direction before the sender is held back.
    pub buffer: usize,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            baud: 115_200,
            latency: Duration::from_millis(4),
            ber: 0.0,
            drop_rate: 0.0,
            seed: 1,
            buffer: 4096,
        }
    }
}

/// What crossed the link.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Bytes carried from A to B.
    pub a_to_b: AtomicU64,
    /// Bytes carried from B to A.
    pub b_to_a: AtomicU64,
    /// Bits flipped.
    pub flipped_bits: AtomicU64,
    /// Bytes dropped.
    pub dropped_bytes: AtomicU64,
}

impl LinkCounters {
    /// A snapshot: (a→b, b→a, flipped bits, dropped bytes).
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.a_to_b.load(Ordering::Relaxed),
            self.b_to_a.load(Ordering::Relaxed),
            self.flipped_bits.load(Ordering::Relaxed),
            self.dropped_bytes.load(Ordering::Relaxed),
        )
    }
}

/// Joins `a` and `b`; the task ends when either side closes.
pub fn spawn(
    a: Transport,
    b: Transport,
    params: LinkParams,
) -> (JoinHandle<()>, Arc<LinkCounters>) {
    let counters = Arc::new(LinkCounters::default());
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let c1 = Arc::clone(&counters);
    let c2 = Arc::clone(&counters);
    let handle = tokio::spawn(async move {
        let ab = tokio::spawn(pump(ar, bw, params, NoiseRng::new(params.seed), c1, true));
        let ba = tokio::spawn(pump(
            br,
            aw,
            params,
            NoiseRng::new(params.seed.rotate_left(17) ^ 0xA5A5),
            c2,
            false,
        ));
        tokio::select! {
            _ = ab => {}
            _ = ba => {}
        }
    });
    (handle, counters)
}

/// One direction of the line.
///
/// The reader task clocks bytes onto the emulated wire as they arrive (at the baud rate, in
/// slices of about a millisecond of wire time, with noise applied) and hands each slice, with the
/// instant it reaches the far end, to a timing thread. That thread sleeps until the instant with
/// the operating system's resolution (tens of microseconds; the async timer's is a millisecond)
/// and passes the slice to the writer task. The reader holds back while `buffer` bytes are on
/// the wire, as a UART driver's buffer would.
async fn pump(
    mut src: ReadHalf<Transport>,
    mut dst: WriteHalf<Transport>,
    p: LinkParams,
    mut rng: NoiseRng,
    counters: Arc<LinkCounters>,
    forward: bool,
) {
    use std::sync::atomic::AtomicUsize;
    let byte_time = Duration::from_nanos(10_000_000_000 / u64::from(p.baud.max(1)));
    let slice = (p.baud as usize / 10 / 1000).max(1);
    let queued = Arc::new(AtomicUsize::new(0));
    let room = Arc::new(tokio::sync::Notify::new());
    let (to_timer, timer_rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
    let (to_writer, mut writer_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let timer = std::thread::Builder::new()
        .name("linksim-timer".into())
        .spawn(move || {
            while let Ok((at, mut bytes)) = timer_rx.recv() {
                let now = std::time::Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                // Everything else already due goes out in the same write.
                while let Ok((next, more)) = timer_rx.try_recv() {
                    if next > std::time::Instant::now() {
                        if to_writer.send(std::mem::take(&mut bytes)).is_err() {
                            return;
                        }
                        let now = std::time::Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                    }
                    bytes.extend_from_slice(&more);
                }
                if to_writer.send(bytes).is_err() {
                    return;
                }
            }
        });
    if timer.is_err() {
        return;
    }
    let writer = {
        let queued = Arc::clone(&queued);
        let room = Arc::clone(&room);
        let counters = Arc::clone(&counters);
        async move {
            let carried = if forward {
                &counters.a_to_b
            } else {
                &counters.b_to_a
            };
            while let Some(bytes) = writer_rx.recv().await {
                if dst.write_all(&bytes).await.is_err() || dst.flush().await.is_err() {
                    return;
                }
                carried.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                queued.fetch_sub(bytes.len(), Ordering::Relaxed);
                room.notify_one();
            }
            let _ = dst.shutdown().await;
        }
    };
    let reader = async move {
        let mut wire_free = std::time::Instant::now();
        let mut buf = vec![0u8; 8192];
        let mut to_next_error = rng.geometric(p.ber);
        loop {
            while queued.load(Ordering::Relaxed) >= p.buffer {
                room.notified().await;
            }
            let n = match src.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = std::time::Instant::now();
            let mut start = wire_free.max(now);
            for chunk in buf[..n].chunks(slice) {
                let end = start + byte_time * chunk.len() as u32;
                start = end;
                let mut out = Vec::with_capacity(chunk.len());
                for &byte in chunk {
                    let mut b = byte;
                    if to_next_error < 8 {
                        let mut bit = to_next_error;
                        loop {
                            b ^= 1 << bit;
                            counters.flipped_bits.fetch_add(1, Ordering::Relaxed);
                            let skip = rng.geometric(p.ber);
                            match bit.checked_add(1).and_then(|x| x.checked_add(skip)) {
                                Some(next) if next < 8 => bit = next,
                                Some(next) => {
                                    to_next_error = next - 8;
                                    break;
                                }
                                None => {
                                    to_next_error = u64::MAX;
                                    break;
                                }
                            }
                        }
                    } else if to_next_error != u64::MAX {
                        to_next_error -= 8;
                    }
                    if rng.chance(p.drop_rate) {
                        counters.dropped_bytes.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    out.push(b);
                }
                if out.is_empty() {
                    continue;
                }
                queued.fetch_add(out.len(), Ordering::Relaxed);
                if to_timer.send((end + p.latency, out)).is_err() {
                    return;
                }
            }
            wire_free = start;
        }
        // Dropping `to_timer` ends the timing thread, which ends the writer.
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use line_protocol::io::memory_pair;
    use std::time::Instant;

    #[tokio::test]
    async fn paces_at_the_baud_rate_and_adds_latency() {
        let (host, link_a) = memory_pair(1 << 16);
        let (link_b, mut meter) = memory_pair(1 << 16);
        let params = LinkParams {
            baud: 96_000, // 9600 bytes/s: 960 bytes take 100 ms
            latency: Duration::from_millis(20),
            ..LinkParams::default()
        };
        let (_h, counters) = spawn(link_a, link_b, params);
        let (_, mut w) = tokio::io::split(host);
        let t0 = Instant::now();
        w.write_all(&[0x55; 960]).await.unwrap();
        let mut got = vec![0u8; 960];
        meter.read_exact(&mut got).await.unwrap();
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(118), "too fast: {took:?}");
        assert!(took < Duration::from_millis(400), "too slow: {took:?}");
        assert_eq!(got, vec![0x55; 960]);
        assert_eq!(counters.snapshot().0, 960);
    }

    #[tokio::test]
    async fn bit_errors_follow_the_rate_and_the_seed() {
        async fn run(seed: u64) -> (Vec<u8>, u64) {
            let (host, link_a) = memory_pair(1 << 20);
            let (link_b, mut meter) = memory_pair(1 << 20);
            let params = LinkParams {
                baud: 100_000_000,
                latency: Duration::ZERO,
                ber: 1e-3,
                seed,
                buffer: 1 << 20,
                ..LinkParams::default()
            };
            let (_h, counters) = spawn(link_a, link_b, params);
            let (_, mut w) = tokio::io::split(host);
            w.write_all(&vec![0u8; 100_000]).await.unwrap();
            let mut got = vec![0u8; 100_000];
            meter.read_exact(&mut got).await.unwrap();
            (got, counters.snapshot().2)
        }
        let (a, flips) = run(7).await;
        let (b, _) = run(7).await;
        let (c, _) = run(8).await;
        assert_eq!(a, b, "same seed, same errors");
        assert_ne!(a, c, "another seed, other errors");
        // 800 000 bits at 1e-3: 800 expected.
        assert!((600..1000).contains(&flips), "{flips} flipped bits");
        let ones: u32 = a.iter().map(|b| b.count_ones()).sum();
        assert_eq!(u64::from(ones), flips);
    }
}
