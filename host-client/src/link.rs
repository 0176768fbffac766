//! A link emulator for benches and tests: a TCP proxy on loopback that gives every connection
//! through it a round-trip time and a rate, as a network between the Pi and the server would.
//!
//! The kernels we run on have no netem, so the proxy does it in user space. [`Link::start`]
//! listens on `127.0.0.1:0` and connects each client it accepts to the upstream server. In each
//! direction, a reader thread timestamps what it reads and queues it; a writer thread delivers it
//! on schedule: a byte read at time `t` is delivered at `max(t + rtt/2, previous delivery +
//! size/rate)` (with a rate, bytes go out in packets of at most [`PACKET_BYTES`], each delivered
//! when its last byte has crossed; without one, as read). Delivery times come from that
//! schedule, not from when the writer woke, so a late wake-up is caught up rather than added.
//!
//! Memory is bounded: at most [`QUEUE_BYTES`] wait in each direction; beyond that the reader
//! stops reading and TCP's flow control holds the sender back, as a full router queue would.
//! That bound must exceed the bandwidth-delay product of the emulated link (30 ms at 50 Mbit/s
//! holds about 94 KB one way), or the emulated link is slower than asked.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest piece the paced writer delivers at once: about one Ethernet frame's payload, so a big
/// reply arrives progressively rather than as a single burst at its end.
pub const PACKET_BYTES: usize = 1500;

/// Most bytes read but not yet delivered, per direction of a connection.
pub const QUEUE_BYTES: usize = 4 << 20;

/// Largest single read from a socket (a queued chunk).
const READ_BYTES: usize = 64 << 10;

/// Why a link cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The round-trip time is negative, not a number, or too large.
    #[error("the link's round-trip time must be a finite number of milliseconds ≥ 0, not {0}")]
    Rtt(f64),
    /// The rate is not positive or not a number.
    #[error("the link's rate must be a positive, finite number of Mbit/s, not {0}")]
    Rate(f64),
    /// No loopback listener could be opened.
    #[error("cannot listen on loopback for the link emulator: {0}")]
    Listen(std::io::Error),
}

/// The emulated link's character.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// Round-trip time: each direction delays by half of it.
    pub rtt: Duration,
    /// Rate in bytes per second, the same in each direction; `None`: unlimited.
    pub bytes_per_sec: Option<f64>,
}

impl LinkParams {
    /// A link of `rtt_ms` milliseconds round trip and `mbit` Mbit/s (10^6 bits per second) each
    /// way, unlimited without it.
    pub fn new(rtt_ms: f64, mbit: Option<f64>) -> Result<Self, LinkError> {
        let rtt = Duration::try_from_secs_f64(rtt_ms / 1e3).map_err(|_| LinkError::Rtt(rtt_ms))?;
        let bytes_per_sec = match mbit {
            None => None,
            Some(m) if m.is_finite() && m > 0.0 => Some(m * 1e6 / 8.0),
            Some(m) => return Err(LinkError::Rate(m)),
        };
        Ok(LinkParams { rtt, bytes_per_sec })
    }

    /// The time `bytes` take to cross at the rate (zero when unlimited).
    fn serialisation(&self, bytes: usize) -> Duration {
        self.bytes_per_sec.map_or(Duration::ZERO, |r| {
            Duration::from_secs_f64(bytes as f64 / r)
        })
    }
}

/// What crossed a link so far, over all its connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes delivered from the clients to the server.
    pub bytes_up: u64,
    /// Bytes delivered from the server to the clients.
    pub bytes_down: u64,
    /// Client connections accepted and connected upstream.
    pub connections: u64,
    /// Client connections dropped because the upstream server could not be reached.
    pub upstream_failures: u64,
}

#[derive(Debug, Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    connections: AtomicU64,
    upstream_failures: AtomicU64,
}

/// A running link emulator. Dropping it stops accepting; connections already through it run on
/// until either end closes (their threads are detached).
#[derive(Debug)]
pub struct Link {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Link {
    /// Listens on an OS-chosen loopback port and forwards every connection to `upstream` through
    /// a link of `params`.
    pub fn start(upstream: SocketAddr, params: LinkParams) -> Result<Link, LinkError> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(LinkError::Listen)?;
        let addr = listener.local_addr().map_err(LinkError::Listen)?;
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (counters, stop) = (Arc::clone(&counters), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("link-accept".into())
                .spawn(move || accept_loop(listener, upstream, params, &counters, &stop))
                .map_err(LinkError::Listen)?
        };
        Ok(Link {
            addr,
            counters,
            stop,
            accept: Some(accept),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Traffic so far.
    pub fn stats(&self) -> LinkStats {
        let c = &self.counters;
        LinkStats {
            bytes_up: c.up.load(Ordering::Relaxed),
            bytes_down: c.down.load(Ordering::Relaxed),
            connections: c.connections.load(Ordering::Relaxed),
            upstream_failures: c.upstream_failures.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; it sees the flag and returns. If this connect fails the
        // listener is already gone and so is the thread.
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok() {
            if let Some(t) = self.accept.take() {
                let _ = t.join();
            }
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    params: LinkParams,
    counters: &Arc<Counters>,
    stop: &AtomicBool,
) {
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else {
            // Out of descriptors, typically: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        // The connect itself is not delayed: the bench's and tests' round trips are counted
        // from the hello on.
        let server = match TcpStream::connect(upstream) {
            Ok(s) => s,
            Err(_) => {
                // A refused connection on the far side reads as one to the client too.
                counters.upstream_failures.fetch_add(1, Ordering::Relaxed);
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
        };
        counters.connections.fetch_add(1, Ordering::Relaxed);
        // The protocol is many small round trips: Nagle would hold each frame for an ACK.
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let up = Direction {
            params,
            delivered: Arc::clone(counters),
            up: true,
        };
        let down = Direction {
            up: false,
            ..up.clone()
        };
        for (dir, src, dst) in [(up, &client, &server), (down, &server, &client)] {
            if dir.spawn(src, dst).is_err() {
                // No thread for this connection: close it, as a broken path would.
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                break;
            }
        }
    }
}

/// One direction of one connection.
#[derive(Debug, Clone)]
struct Direction {
    params: LinkParams,
    delivered: Arc<Counters>,
    /// Client to server.
    up: bool,
}

/// What the reader hands the writer, stamped with when it was read.
enum Segment {
    Data(Instant, Vec<u8>),
    /// The sender closed its side cleanly: deliver the end of stream on schedule.
    End(Instant),
    /// The read failed (reset): tear the connection down.
    Broken,
}

impl Direction {
    /// Starts this direction's reader and writer threads, from `src` to `dst`.
    fn spawn(self, src: &TcpStream, dst: &TcpStream) -> std::io::Result<()> {
        let queue = Arc::new(Queue::default());
        let (read_src, read_dst) = (src.try_clone()?, dst.try_clone()?);
        let (write_src, write_dst) = (src.try_clone()?, dst.try_clone()?);
        let name = if self.up { "link-up" } else { "link-down" };
        let q = Arc::clone(&queue);
        std::thread::Builder::new()
            .name(format!("{name}-read"))
            .spawn(move || read_side(read_src, read_dst, &q))?;
        std::thread::Builder::new()
            .name(format!("{name}-write"))
            .spawn(move || self.write_side(write_src, write_dst, &queue))?;
        Ok(())
    }

    /// Delivers queued segments on schedule. On a failed write, closes both sockets so that the
    /// reader and the other direction stop too.
    fn write_side(&self, src: TcpStream, mut dst: TcpStream, queue: &Queue) {
        let half = self.params.rtt / 2;
        let counter = if self.up {
            &self.delivered.up
        } else {
            &self.delivered.down
        };
        // When the link last finished delivering: the next byte cannot arrive before.
        let mut free_at = Instant::now();
        let ok = loop {
            match queue.pop() {
                Segment::Data(t, bytes) => {
                    let pieces = match self.params.bytes_per_sec {
                        Some(_) => PACKET_BYTES,
                        None => bytes.len().max(1),
                    };
                    let mut failed = false;
                    for piece in bytes.chunks(pieces) {
                        let at = (t + half).max(free_at) + self.params.serialisation(piece.len());
                        sleep_until(at);
                        if dst.write_all(piece).is_err() {
                            failed = true;
                            break;
                        }
                        free_at = at;
                        counter.fetch_add(piece.len() as u64, Ordering::Relaxed);
                    }
                    if failed {
                        break false;
                    }
                }
                Segment::End(t) => {
                    sleep_until((t + half).max(free_at));
                    break dst.shutdown(Shutdown::Write).is_ok();
                }
                Segment::Broken => break false,
            }
        };
        queue.close();
        if !ok {
            let _ = src.shutdown(Shutdown::Both);
            let _ = dst.shutdown(Shutdown::Both);
        }
    }
}

/// Reads `src` into the queue until end of stream, a failed read, or a writer that gave up.
fn read_side(mut src: TcpStream, dst: TcpStream, queue: &Queue) {
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        let seg = match src.read(&mut buf) {
            Ok(0) => Segment::End(Instant::now()),
            Ok(n) => Segment::Data(Instant::now(), buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => Segment::Broken,
        };
        let last = !matches!(seg, Segment::Data(..));
        if queue.push(seg).is_err() {
            // The writer failed and closed both sockets already.
            let _ = dst.shutdown(Shutdown::Both);
            return;
        }
        if last {
            return;
        }
    }
}

/// A byte-bounded queue of segments between one direction's reader and writer (a channel with
/// a cap in entries would bound memory only by the largest read times the cap).
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

#[derive(Default)]
struct QueueState {
    segments: VecDeque<Segment>,
    bytes: usize,
    /// The writer stopped: pushes fail.
    closed: bool,
}

/// The writer is gone.
struct Closed;

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Neither side panics while holding the lock; if one did, the state is still whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `seg`, waiting while the queue is full (a segment always fits an empty queue).
    fn push(&self, seg: Segment) -> Result<(), Closed> {
        let n = match &seg {
            Segment::Data(_, b) => b.len(),
            _ => 0,
        };
        let mut s = self.lock();
        while !s.closed && !s.segments.is_empty() && s.bytes + n > QUEUE_BYTES {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.closed {
            return Err(Closed);
        }
        s.bytes += n;
        s.segments.push_back(seg);
        self.changed.notify_all();
        Ok(())
    }

    /// The oldest segment, waiting for one. The reader's last push is always an end or a
    /// break, so the writer never waits on a queue nobody will fill.
    fn pop(&self) -> Segment {
        let mut s = self.lock();
        loop {
            if let Some(seg) = s.segments.pop_front() {
                if let Segment::Data(_, b) = &seg {
                    s.bytes -= b.len();
                }
                self.changed.notify_all();
                return seg;
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_refuse_nonsense() {
        assert!(matches!(
            LinkParams::new(-1.0, None),
            Err(LinkError::Rtt(_))
        ));
        assert!(matches!(
            LinkParams::new(f64::NAN, None),
            Err(LinkError::Rtt(_))
        ));
        assert!(matches!(
            LinkParams::new(1.0, Some(0.0)),
            Err(LinkError::Rate(_))
        ));
        let p = LinkParams::new(30.0, Some(8.0)).unwrap();
        assert_eq!(p.rtt, Duration::from_millis(30));
        assert_eq!(p.serialisation(1_000_000), Duration::from_secs(1));
    }
}
