//! A long-running TCP connection between namespaces carrying a paced byte
//! pattern that the receiver verifies, for checking that a fault or a
//! restart leaves an open connection intact.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::netns::NsRef;
use crate::traffic::Pattern;

/// Seed of the byte pattern a [`Stream`] carries.
const STREAM_SEED: u64 = 0x5eed_f417_0000_0001;
/// Per-read/write and connect timeout of the stream: a stall this long is a
/// failure (a reset fails at once).
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes handed to the socket per write.
const CHUNK: usize = 32 * 1024;

/// One TCP connection across hosts carrying a paced, verified byte stream
/// until [`Stream::finish`].
pub struct Stream {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    sender: JoinHandle<Result<u64>>,
    receiver: JoinHandle<Result<u64>>,
}

impl Stream {
    /// Connects from `from` to a listener on `dst` in `to` and sends about
    /// `rate` bytes per second until told to stop.
    pub fn start(from: &NsRef, to: &NsRef, dst: SocketAddr, rate: u64) -> Self {
        let received = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let receiver = {
            let received = received.clone();
            to.spawn_thread(move || receive(dst.port(), ready_tx, &received))
        };
        ready_rx
            .recv_timeout(STREAM_TIMEOUT)
            .expect("stream listener never became ready")
            .expect("stream listener");
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let stop = stop.clone();
            from.spawn_thread(move || send(dst, rate, &stop))
        };
        Stream {
            stop,
            received,
            sender,
            receiver,
        }
    }

    /// Verified bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops sending, waits for the receiver to see EOF; returns the bytes
    /// sent and received (verified against the pattern), or the error
    /// either side hit (a reset, a stall, corruption).
    pub fn finish(self) -> Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.join().map_err(|_| anyhow!("sender panicked"))?;
        let received = self
            .receiver
            .join()
            .map_err(|_| anyhow!("receiver panicked"))?;
        let received = received.context("receiver")?;
        let sent = sent.context("sender")?;
        Ok((sent, received))
    }
}

fn send(dst: SocketAddr, rate: u64, stop: &AtomicBool) -> Result<u64> {
    let mut stream = TcpStream::connect_timeout(&dst, STREAM_TIMEOUT).context("connect")?;
    stream.set_write_timeout(Some(STREAM_TIMEOUT))?;
    stream.set_read_timeout(Some(STREAM_TIMEOUT))?;
    let mut pattern = Pattern::new(STREAM_SEED);
    let mut buf = vec![0u8; CHUNK];
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        pattern.fill(&mut buf);
        stream
            .write_all(&buf)
            .with_context(|| format!("write after {sent} bytes"))?;
        sent += buf.len() as u64;
        // Paced: ahead of `rate`, sleep the difference.
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            thread::sleep(ahead);
        }
    }
    stream.shutdown(Shutdown::Write).context("shutdown")?;
    // The receiver closes once it has read everything.
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .context("wait for receiver close")?;
    Ok(sent)
}

fn receive(port: u16, ready: mpsc::Sender<Result<()>>, received: &AtomicU64) -> Result<u64> {
    let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(anyhow!("bind port {port}: {e}")));
            bail!("bind port {port}: {e}");
        }
    };
    listener.set_nonblocking(true)?;
    let _ = ready.send(Ok(()));
    let deadline = Instant::now() + STREAM_TIMEOUT;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(e).context("accept"),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(STREAM_TIMEOUT))?;
    let mut pattern = Pattern::new(STREAM_SEED);
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut count = 0u64;
    loop {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("read after {count} bytes"))?;
        if n == 0 {
            return Ok(count);
        }
        pattern.fill(&mut want[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
            bail!("corrupted data at offset {}", count + i as u64);
        }
        count += n as u64;
        received.store(count, Ordering::Relaxed);
    }
}
