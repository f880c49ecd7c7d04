//! Traffic checks between namespaces: ping, a verified TCP transfer and
//! verified UDP datagrams.

use std::io::{ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::netns::NsRef;

/// Connect, accept and per-read/write timeout of [`tcp_transfer`].
pub const TCP_TIMEOUT: Duration = Duration::from_secs(30);

/// Seed of the byte pattern sent by [`tcp_transfer`].
const PATTERN_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Outcome of one `ping` run.
#[derive(Clone, Debug)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
    /// ping's stdout and stderr, for messages.
    pub output: String,
}

impl PingStats {
    pub fn all_received(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }
}

/// Runs `ping -c COUNT -W 1 -i 0.2 IP` inside `from`.
pub fn ping_stats(from: &NsRef, ip: impl Into<IpAddr>, count: u32) -> PingStats {
    run_ping(from, ip.into(), count, &[])
}

/// [`ping_stats`] with `size` bytes of ICMP payload (`ping -s SIZE`).
pub fn ping_stats_sized(from: &NsRef, ip: impl Into<IpAddr>, count: u32, size: usize) -> PingStats {
    run_ping(from, ip.into(), count, &["-s", &size.to_string()])
}

fn run_ping(from: &NsRef, ip: IpAddr, count: u32, extra: &[&str]) -> PingStats {
    let count = count.to_string();
    let mut args = vec!["-c", &count, "-W", "1", "-i", "0.2"];
    args.extend(extra);
    ping_args(from, &args, ip)
}

/// Runs `ping -n ARGS… IP` inside `from` and returns its summary and output.
pub fn ping_args(from: &NsRef, args: &[&str], ip: impl Into<IpAddr>) -> PingStats {
    let ip = ip.into().to_string();
    let mut argv = vec!["ping", "-n"];
    argv.extend_from_slice(args);
    argv.push(&ip);
    let out = from.exec(&argv);
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (transmitted, received) = parse_ping_summary(&output).unwrap_or((0, 0));
    PingStats {
        transmitted,
        received,
        output,
    }
}

/// Whether every one of `count` pings from `from` to `ip` is answered.
pub fn ping(from: &NsRef, ip: impl Into<IpAddr>, count: u32) -> bool {
    ping_stats(from, ip, count).all_received()
}

/// Asserts that `count` pings from `from` to `to` are all answered, trying
/// again until `timeout` (once when it is zero): a fresh path may still be
/// converging. `what` names the path in the panic message.
pub fn assert_ping(from: &NsRef, to: Ipv4Addr, count: u32, timeout: Duration, what: &str) {
    let mut last: Option<PingStats> = None;
    let ok = crate::poll_until(timeout, || {
        let stats = ping_stats(from, to, count);
        let ok = stats.all_received();
        last = Some(stats);
        ok
    });
    assert!(
        ok,
        "{what}: no full ping to {to} within {timeout:?}; last ping:\n{}",
        last.map(|s| s.output).unwrap_or_default()
    );
}

/// Extracts "N packets transmitted, M received" from ping's output.
pub(crate) fn parse_ping_summary(output: &str) -> Option<(u32, u32)> {
    let line = output.lines().find(|l| l.contains("packets transmitted"))?;
    let mut fields = line.split(',').map(|f| f.split_whitespace().next());
    let transmitted = fields.next()??.parse().ok()?;
    let received = fields.next()??.parse().ok()?;
    Some((transmitted, received))
}

/// A deterministic pseudo-random byte stream (xorshift64*).
#[derive(Clone, Debug)]
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed.max(1),
            word: [0; 8],
            used: 8,
        }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.advance();
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }

    fn advance(&mut self) {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        self.used = 0;
    }
}

/// The receiver stopped waiting because the sender failed.
#[derive(Debug)]
struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sender gave up before connecting")
    }
}

impl std::error::Error for Cancelled {}

/// Result of a successful [`tcp_transfer`].
#[derive(Clone, Debug)]
pub struct Transfer {
    pub bytes: usize,
    /// From connect until the receiver saw EOF.
    pub elapsed: Duration,
}

/// Sends `len` pattern bytes over TCP from a socket in `from` to a listener
/// on `dst`'s port in `to`, and checks that exactly those bytes arrive.
///
/// Both ends run on threads of this process that `setns` into their
/// namespace. The listener binds the unspecified address, so `dst`'s IP
/// only selects the path.
pub fn tcp_transfer(from: &NsRef, to: &NsRef, dst: SocketAddr, len: usize) -> Result<Transfer> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let receiver = {
        let cancel = cancel.clone();
        to.spawn_thread(move || receive(dst, len, ready_tx, &cancel))
    };
    match ready_rx.recv_timeout(TCP_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.context(format!("listen in {}", to.name()))),
        Err(_) => bail!("listener in {} never became ready", to.name()),
    }
    let start = Instant::now();
    let sent = from.spawn_thread(move || send(dst, len)).join();
    if !matches!(sent, Ok(Ok(()))) {
        // Don't let the receiver wait for a connection that will not come.
        cancel.store(true, Ordering::Relaxed);
    }
    let received = receiver.join();
    let sent = sent.map_err(|_| anyhow!("sender thread panicked"))?;
    let received = received.map_err(|_| anyhow!("receiver thread panicked"))?;
    let receive_ctx = || format!("receive on {dst} in {}", to.name());
    let send_ctx = || format!("send from {} to {dst}", from.name());
    // The receiver's view (corruption, short read) is the informative one,
    // unless it only gave up because the sender never connected.
    let bytes = match (sent, received) {
        (Err(e), Err(r)) if r.is::<Cancelled>() => return Err(e.context(send_ctx())),
        (_, Err(e)) => return Err(e.context(receive_ctx())),
        (Err(e), Ok(_)) => return Err(e.context(send_ctx())),
        (Ok(()), Ok(bytes)) => bytes,
    };
    Ok(Transfer {
        bytes,
        elapsed: start.elapsed(),
    })
}

fn send(dst: SocketAddr, len: usize) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&dst, TCP_TIMEOUT).context("connect")?;
    stream.set_write_timeout(Some(TCP_TIMEOUT))?;
    stream.set_read_timeout(Some(TCP_TIMEOUT))?;
    let mut pattern = Pattern::new(PATTERN_SEED);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let chunk = &mut buf[..left.min(64 * 1024)];
        pattern.fill(chunk);
        stream
            .write_all(chunk)
            .with_context(|| format!("write after {} bytes", len - left))?;
        left -= chunk.len();
    }
    stream.shutdown(Shutdown::Write)?;
    // Wait for the receiver to close, so "sent" means "delivered".
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .context("wait for receiver close")?;
    Ok(())
}

fn receive(
    dst: SocketAddr,
    len: usize,
    ready: mpsc::Sender<Result<()>>,
    cancel: &AtomicBool,
) -> Result<usize> {
    let listener = match listen(dst.port(), dst.is_ipv6()) {
        Ok(l) => l,
        Err(e) => {
            let msg = format!("{e:#}");
            let _ = ready.send(Err(e));
            bail!(msg);
        }
    };
    let _ = ready.send(Ok(()));
    let mut stream = accept(&listener, cancel)?;
    let count = verify_stream(&mut stream, len)?;
    ensure!(count == len, "received {count} of {len} bytes before EOF");
    Ok(count)
}

fn listen(port: u16, ipv6: bool) -> Result<TcpListener> {
    let any: IpAddr = if ipv6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let listener = TcpListener::bind((any, port)).with_context(|| format!("bind port {port}"))?;
    // Non-blocking accept lets us give up after TCP_TIMEOUT.
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn accept(listener: &TcpListener, cancel: &AtomicBool) -> Result<TcpStream> {
    let deadline = Instant::now() + TCP_TIMEOUT;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(Cancelled.into());
        }
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(TCP_TIMEOUT))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                bail!("no connection within {TCP_TIMEOUT:?}")
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}

/// Reads to EOF comparing against the pattern; returns the byte count.
fn verify_stream(stream: &mut impl Read, len: usize) -> Result<usize> {
    let mut pattern = Pattern::new(PATTERN_SEED);
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut count = 0;
    loop {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("read after {count} of {len} bytes"))?;
        if n == 0 {
            return Ok(count);
        }
        ensure!(count + n <= len, "received more than the {len} bytes sent");
        pattern.fill(&mut want[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != want[i]) {
            bail!("corrupted data at offset {}", count + i);
        }
        count += n;
    }
}

/// How long [`udp_echo`] waits for each datagram and its echo.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one datagram of each size in `sizes` (pattern bytes) from a socket
/// in `from` to `dst` in `to`, where an echo server checks it byte for byte
/// and sends it back; the echo is checked too. So every datagram crosses
/// the path both ways, whole. No retries: a lost datagram is a failure.
pub fn udp_echo(from: &NsRef, to: &NsRef, dst: SocketAddr, sizes: &[usize]) -> Result<()> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let expected: Vec<usize> = sizes.to_vec();
    let server = to.spawn_thread(move || echo_server(dst.port(), &expected, ready_tx));
    match ready_rx.recv_timeout(UDP_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.context(format!("UDP bind in {}", to.name()))),
        Err(_) => bail!("UDP echo server in {} never became ready", to.name()),
    }
    let sizes: Vec<usize> = sizes.to_vec();
    let sent = from
        .spawn_thread(move || echo_client(dst, &sizes))
        .join()
        .map_err(|_| anyhow!("UDP client thread panicked"))?;
    let served = server
        .join()
        .map_err(|_| anyhow!("UDP echo server thread panicked"))?;
    served.with_context(|| format!("UDP echo server on {dst} in {}", to.name()))?;
    sent.with_context(|| format!("UDP client in {} to {dst}", from.name()))
}

/// Datagram `i` of `len` bytes: the pattern seeded by its index and length.
fn datagram(i: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    Pattern::new(PATTERN_SEED ^ ((i as u64) << 32 | len as u64)).fill(&mut buf);
    buf
}

fn echo_server(port: u16, sizes: &[usize], ready: mpsc::Sender<Result<()>>) -> Result<()> {
    let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("bind port {port}: {e}");
            let _ = ready.send(Err(anyhow!(msg.clone())));
            bail!(msg);
        }
    };
    socket.set_read_timeout(Some(UDP_TIMEOUT))?;
    let _ = ready.send(Ok(()));
    let mut buf = vec![0u8; 65536];
    for (i, &len) in sizes.iter().enumerate() {
        let (n, peer) = socket
            .recv_from(&mut buf)
            .with_context(|| format!("datagram {i} ({len} bytes) never arrived"))?;
        ensure!(n == len, "datagram {i}: {n} bytes arrived, {len} sent");
        ensure!(
            buf[..n] == datagram(i, len)[..],
            "datagram {i} ({len} bytes) corrupted"
        );
        socket.send_to(&buf[..n], peer).context("echo")?;
    }
    Ok(())
}

fn echo_client(dst: SocketAddr, sizes: &[usize]) -> Result<()> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("bind")?;
    socket.set_read_timeout(Some(UDP_TIMEOUT))?;
    let mut buf = vec![0u8; 65536];
    for (i, &len) in sizes.iter().enumerate() {
        let data = datagram(i, len);
        socket
            .send_to(&data, dst)
            .with_context(|| format!("send datagram {i} ({len} bytes)"))?;
        let (n, _) = socket
            .recv_from(&mut buf)
            .with_context(|| format!("no echo of datagram {i} ({len} bytes)"))?;
        ensure!(
            buf[..n] == data[..],
            "echo of datagram {i} ({len} bytes): {n} bytes, not the ones sent"
        );
    }
    Ok(())
}

/// Datagrams waiting on `sock`, reading until it stays quiet for `quiet`.
pub fn udp_drain(sock: &UdpSocket, quiet: Duration) -> Vec<Vec<u8>> {
    sock.set_read_timeout(Some(quiet))
        .expect("set read timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(buf[..n].to_vec());
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_chunking_independent() {
        let mut whole = vec![0u8; 1000];
        Pattern::new(7).fill(&mut whole);
        let mut p = Pattern::new(7);
        let mut pieces = Vec::new();
        for size in [1, 3, 8, 13, 975] {
            let mut chunk = vec![0u8; size];
            p.fill(&mut chunk);
            pieces.extend(chunk);
        }
        assert_eq!(whole, pieces);
        assert!(
            whole.iter().any(|&b| b != whole[0]),
            "pattern is not constant"
        );
    }

    #[test]
    fn verify_detects_corruption_and_accepts_exact_data() {
        let mut data = vec![0u8; 5000];
        Pattern::new(PATTERN_SEED).fill(&mut data);
        assert_eq!(verify_stream(&mut &data[..], 5000).unwrap(), 5000);
        data[4321] ^= 1;
        let err = verify_stream(&mut &data[..], 5000).unwrap_err();
        assert!(err.to_string().contains("offset 4321"), "{err}");
    }

    #[test]
    fn parses_ping_summary() {
        let out = "--- 10.0.0.1 ping statistics ---\n\
                   3 packets transmitted, 2 received, 33.3333% packet loss, time 404ms\n";
        assert_eq!(parse_ping_summary(out), Some((3, 2)));
        let errs = "3 packets transmitted, 0 received, +3 errors, 100% packet loss";
        assert_eq!(parse_ping_summary(errs), Some((3, 0)));
        assert_eq!(parse_ping_summary("connect: Network is unreachable"), None);
    }
}
