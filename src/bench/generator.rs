//! The load generator's event loop: one mio poll per thread driving many non-blocking
//! connections, so the generator is not the bottleneck.
//!
//! Each thread first opens its connections (a bounded number of connects in flight, each
//! with a deadline), then waits for the other threads so that every thread measures the same
//! window. In the closed loop each connection keeps `pipeline` messages in flight and sends
//! the next one as soon as one comes back; in the open loop (`--rate`) requests are due on a
//! fixed schedule, go to whichever connection has room, and their latency runs from the
//! scheduled time, so queueing in front of a slow server shows up instead of being hidden.
//!
//! The hot path allocates nothing: messages are generated straight into one write buffer per
//! thread, and echoes are compared in place with the bytes they should be (see
//! [`super::verify`]). The closed loop makes no system calls but `epoll_wait`, `sendto` and
//! `recvfrom` (through syscall(2), not libc's cancellable wrappers: see `send` below): with
//! pipeline 1, one `sendto` and one `recvfrom` per round trip. Sockets are edge-triggered
//! and never re-registered; a read that brings back everything written so far ends the read
//! loop without the extra EAGAIN read.
//! A wrong byte, an early EOF, a reset or a stall ends that connection only and is recorded
//! with its connection id and stream offset.
//!
//! Over TLS (`tls://`) each connection also carries a rustls session, driven through its
//! buffer API on the same non-blocking socket: after the TCP connect the handshake (a
//! connection counts as connecting, within the same bound and timeout, until it is done),
//! then plaintext goes into rustls a buffer at a time and its records out to the socket,
//! and what arrives is decrypted and verified as for plain TCP. A connection is closed with
//! close_notify. The TLS paths allocate nothing per message either.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::ClientConnection;
use socket2::{Domain, Protocol, Socket, Type};

pub use super::outcome::{Failure, FailureKind, Outcome, TlsOutcome};
use super::timer::Timer;
use super::verify::{self, Messages, HEADER_LEN};

/// Connects in flight per thread: enough to open thousands of connections in well under a
/// second, few enough not to overflow the server's listen backlog.
const MAX_CONNECTING: usize = 64;
/// How long one connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After sending stops, how long echoes still in flight may take to come back.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// With echoes outstanding and nothing arriving for this long, a thread gives up on them.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a thread publishes its progress counters.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);
/// Size of the per-thread read and write buffers.
const BUF_LEN: usize = 64 * 1024;
/// The open loop's schedule timer (connections use their index as token).
const TIMER: Token = Token(usize::MAX);
/// Failures kept with full detail per thread (all of them are counted).
pub const MAX_FAILURES: usize = 10;

/// What every thread does: the target, the message content, and when to stop.
#[derive(Debug)]
pub struct Plan {
    pub addr: SocketAddr,
    pub messages: Messages,
    pub pipeline: usize,
    pub warmup: Duration,
    /// Measure for this long after the warm-up; `None`: until each thread's quota is done.
    pub duration: Option<Duration>,
    /// Source addresses to spread connections over (empty: let the kernel choose).
    pub sources: Vec<IpAddr>,
    /// Write [`LOAD_STARTED`] to stderr the moment the load (warm-up first) starts.
    pub announce_start: bool,
    /// Keep per-interval figures for intervals of this length.
    pub interval: Option<Duration>,
    /// Churn: after this many round trips close the connection and open a new one.
    pub requests_per_conn: Option<u64>,
    /// Connection ids of a slot's successive connections are this far apart (the number of
    /// connections of the run), so every connection of a run has its own id.
    pub id_stride: u64,
    /// tls:// targets: the configuration and the server name.
    pub tls: Option<crate::tls::client::TlsTarget>,
}

/// The line `--announce-start` writes, so that a caller measuring the server (`compare`)
/// can line its window up with the measured one: connecting may take a while.
pub const LOAD_STARTED: &str = "bench: load started";

/// One thread's share of the work.
#[derive(Debug, Clone)]
pub struct Share {
    /// Global id of this thread's first connection.
    pub first_conn: u64,
    pub conns: usize,
    /// Requests to measure (requests mode).
    pub quota: Option<u64>,
    /// Requests per second on a fixed schedule (open loop).
    pub rate: Option<f64>,
}

/// What the threads share while running.
pub struct RunControl {
    threads: usize,
    /// Threads that finished connecting; they all start loading together.
    arrived: AtomicUsize,
    /// Set when the run is called off before it started (a thread failed to spawn).
    aborted: AtomicBool,
    /// The moment the run (warm-up included) started; set by the first thread past the barrier.
    pub start: OnceLock<Instant>,
    /// Measured round trips so far, published now and then (for the progress bar).
    pub completed: AtomicU64,
    /// Connections opened so far.
    pub opened: AtomicU64,
    /// Set by SIGINT/SIGTERM: stop sending, collect the echoes in flight, report.
    pub interrupted: Arc<AtomicBool>,
}

impl RunControl {
    pub fn new(threads: usize) -> Self {
        RunControl {
            threads,
            arrived: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
            start: OnceLock::new(),
            completed: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            interrupted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Calls the run off: threads waiting for the others give up.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
    }

    /// Waits until every thread finished connecting; false if the run was called off.
    fn arrive_and_wait(&self) -> bool {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        // Connecting takes milliseconds to seconds, so a 1ms nap costs nothing here.
        while self.arrived.load(Ordering::SeqCst) < self.threads {
            if self.aborted.load(Ordering::SeqCst) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        !self.aborted.load(Ordering::SeqCst)
    }
}

/// A message sent (or being sent) whose echo has not fully come back.
#[derive(Clone, Copy)]
struct Sent {
    /// When it was sent, or in the open loop when it was due.
    at: Instant,
    /// When it was actually committed to the socket (the open loop's uncorrected start).
    sent_at: Instant,
    /// Sent after the warm-up, so it counts.
    measured: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Connecting(Instant),
    /// TLS: connected, the handshake under way since then.
    Handshaking(Instant),
    Open,
    Closed,
}

struct Conn {
    id: u64,
    /// The id of this slot's first connection; churn opens new ones with new ids.
    base_id: u64,
    generation: u64,
    stream: Option<TcpStream>,
    /// tls:// targets: the session over `stream`.
    tls: Option<Box<ClientConnection>>,
    state: State,
    /// The message being written and how much of it is written.
    send_seq: u64,
    send_off: usize,
    /// Messages committed but not fully written.
    unsent: usize,
    /// The message being received and how much of it came back.
    recv_seq: u64,
    recv_off: usize,
    written: u64,
    read: u64,
    in_flight: VecDeque<Sent>,
}

impl Conn {
    /// Whether the connection is being opened (TCP connect or TLS handshake).
    fn is_connecting(&self) -> bool {
        matches!(self.state, State::Connecting(_) | State::Handshaking(_))
    }

    /// Generates the next bytes to send into `buf`; returns how many.
    fn next_chunk(&self, messages: &Messages, buf: &mut [u8]) -> usize {
        chunk(
            messages,
            self.id,
            self.send_seq,
            self.send_off,
            self.unsent,
            buf,
        )
    }

    /// Accounts for `written` bytes having gone out (messages are `size` bytes).
    fn sent(&mut self, size: usize, written: usize) {
        self.written += written as u64;
        let mut rest = written;
        while rest > 0 {
            let n = (size - self.send_off).min(rest);
            self.send_off += n;
            rest -= n;
            if self.send_off == size {
                self.send_seq += 1;
                self.send_off = 0;
                self.unsent -= 1;
            }
        }
    }
}

/// Generates into `buf` the bytes of connection `id`'s `unsent` queued messages from message
/// `seq`, offset `off`, as many as fit; returns how many.
fn chunk(
    messages: &Messages,
    id: u64,
    mut seq: u64,
    mut off: usize,
    mut left: usize,
    buf: &mut [u8],
) -> usize {
    let size = messages.size();
    let mut len = 0;
    while left > 0 && len < buf.len() {
        let n = (size - off).min(buf.len() - len);
        messages.write_range(id, seq, off, &mut buf[len..len + n]);
        len += n;
        off += n;
        if off == size {
            seq += 1;
            off = 0;
            left -= 1;
        }
    }
    len
}

/// Writes TLS records until rustls has none left (true) or the socket is full (false).
fn write_tls(tls: &mut ClientConnection, stream: &mut TcpStream) -> io::Result<bool> {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Nanoseconds from `since` to `now`, at least 1 (a histogram records no zero).
fn nanos_between(since: Instant, now: Instant) -> u64 {
    u64::try_from(now.duration_since(since).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Runs one thread: connect, wait for the others, load, drain. Always arrives once, so a
/// failing thread cannot leave the others waiting.
pub fn run_thread(plan: &Plan, share: Share, shared: &RunControl) -> io::Result<Outcome> {
    let mut worker = match LoadThread::new(plan, share) {
        Ok(worker) => worker,
        Err(e) => {
            shared.abort();
            shared.arrive_and_wait();
            return Err(e);
        }
    };
    worker.connect_all(shared);
    if !shared.arrive_and_wait() {
        return Ok(worker.outcome);
    }
    let start = *shared.start.get_or_init(|| {
        if plan.announce_start {
            eprintln!("{LOAD_STARTED}");
        }
        Instant::now()
    });
    worker.load(start, shared)?;
    Ok(worker.outcome)
}

struct LoadThread<'a> {
    plan: &'a Plan,
    share: Share,
    poll: Poll,
    conns: Vec<Conn>,
    write_buf: Vec<u8>,
    read_buf: Vec<u8>,
    /// Open loop: one entry per free pipeline slot of a connection.
    ready: VecDeque<usize>,
    outcome: Outcome,
    measure_start: Instant,
    end: Option<Instant>,
    sending: bool,
    in_flight_total: usize,
    measured_committed: u64,
    live: usize,
    last_progress: Instant,
    unpublished: u64,
    /// Churn: new connections being opened during the load.
    connecting: usize,
    /// Set once the load started (connects after it count as churn).
    loading: bool,
}

impl<'a> LoadThread<'a> {
    fn new(plan: &'a Plan, share: Share) -> io::Result<Self> {
        let conns = (0..share.conns)
            .map(|i| Conn {
                id: share.first_conn + i as u64,
                base_id: share.first_conn + i as u64,
                generation: 0,
                stream: None,
                tls: None,
                state: State::Idle,
                send_seq: 0,
                send_off: 0,
                unsent: 0,
                recv_seq: 0,
                recv_off: 0,
                written: 0,
                read: 0,
                in_flight: VecDeque::with_capacity(plan.pipeline),
            })
            .collect();
        let now = Instant::now();
        Ok(LoadThread {
            plan,
            ready: VecDeque::with_capacity(if share.rate.is_some() {
                share.conns * plan.pipeline
            } else {
                0
            }),
            share,
            poll: Poll::new()?,
            conns,
            write_buf: vec![0; BUF_LEN],
            read_buf: vec![0; BUF_LEN],
            outcome: Outcome {
                tls: plan.tls.as_ref().map(|_| TlsOutcome::new()),
                ..Outcome::new()
            },
            measure_start: now,
            end: None,
            sending: true,
            in_flight_total: 0,
            measured_committed: 0,
            live: 0,
            last_progress: now,
            unpublished: 0,
            connecting: 0,
            loading: false,
        })
    }

    /// Opens every connection, at most [`MAX_CONNECTING`] at a time.
    fn connect_all(&mut self, shared: &RunControl) {
        let mut events = Events::with_capacity(1024);
        let mut next = 0;
        let mut connecting = 0;
        while next < self.conns.len() || connecting > 0 {
            while connecting < MAX_CONNECTING && next < self.conns.len() {
                match self.start_connect(next) {
                    Ok(()) => connecting += 1,
                    Err(e) => self.connect_failed(next, &e),
                }
                next += 1;
            }
            if connecting == 0 {
                continue;
            }
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(100)))
            {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // A broken poll cannot finish these connects: fail them all.
                for idx in 0..self.conns.len() {
                    if matches!(self.conns[idx].state, State::Connecting(_) | State::Idle) {
                        self.connect_failed(idx, &e);
                    }
                }
                return;
            }
            for event in events.iter() {
                let idx = event.token().0;
                if !self.conns[idx].is_connecting() {
                    continue;
                }
                match self.advance_connect(idx) {
                    Ok(true) => {
                        connecting -= 1;
                        self.opened(idx, shared);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        connecting -= 1;
                        self.connect_failed(idx, &e);
                    }
                }
            }
            let now = Instant::now();
            for idx in 0..next {
                let (since, why) = match self.conns[idx].state {
                    State::Connecting(since) => (since, "no answer"),
                    State::Handshaking(since) => (since, "no TLS handshake"),
                    _ => continue,
                };
                if now.duration_since(since) > CONNECT_TIMEOUT {
                    connecting -= 1;
                    let why = format!("{why} within {}s", CONNECT_TIMEOUT.as_secs());
                    self.connect_failed(idx, &io::Error::new(io::ErrorKind::TimedOut, why));
                }
            }
        }
    }

    fn start_connect(&mut self, idx: usize) -> io::Result<()> {
        let addr = self.plan.addr;
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket.set_nodelay(true)?;
        let conn = &mut self.conns[idx];
        if !self.plan.sources.is_empty() {
            let source = self.plan.sources[(conn.id % self.plan.sources.len() as u64) as usize];
            socket.bind(&SocketAddr::new(source, 0).into())?;
        }
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(socket.into());
        self.poll.registry().register(
            &mut stream,
            Token(idx),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        conn.stream = Some(stream);
        conn.state = State::Connecting(Instant::now());
        Ok(())
    }

    /// `Ok(true)` once connected, `Ok(false)` while still in progress.
    fn finish_connect(&mut self, idx: usize) -> io::Result<bool> {
        let Some(stream) = self.conns[idx].stream.as_ref() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
        match stream.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Advances a connection that is not open yet: the TCP connect, then for TLS the
    /// handshake. `Ok(true)` once it is open, `Ok(false)` while still in progress.
    fn advance_connect(&mut self, idx: usize) -> io::Result<bool> {
        if let State::Connecting(since) = self.conns[idx].state {
            if !self.finish_connect(idx)? {
                return Ok(false);
            }
            let Some(tls) = &self.plan.tls else {
                return Ok(true);
            };
            let now = Instant::now();
            self.outcome
                .connect_ns
                .saturating_record(nanos_between(since, now));
            let session = ClientConnection::new(Arc::clone(&tls.config), tls.name.clone())
                .map_err(io::Error::other)?;
            let conn = &mut self.conns[idx];
            conn.tls = Some(Box::new(session));
            conn.state = State::Handshaking(now);
        }
        self.handshake(idx)
    }

    /// Drives connection `idx`'s TLS handshake as far as the socket allows; `Ok(true)` once
    /// it is complete (rustls may still hold its last flight, which `flush` sends).
    fn handshake(&mut self, idx: usize) -> io::Result<bool> {
        let conn = &mut self.conns[idx];
        let (Some(stream), Some(tls)) = (conn.stream.as_mut(), conn.tls.as_mut()) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        loop {
            write_tls(tls, stream)?;
            if !tls.is_handshaking() {
                return Ok(true);
            }
            match tls.read_tls(stream) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection during the TLS handshake",
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = tls.process_new_packets() {
                // The alert tells the server why.
                let _ = write_tls(tls, stream);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("TLS handshake failed: {e}"),
                ));
            }
        }
    }

    /// A connect (and handshake) finished: the connection is open, and its connect (or
    /// handshake) time recorded.
    fn opened(&mut self, idx: usize, shared: &RunControl) {
        let now = Instant::now();
        let in_window =
            self.loading && now >= self.measure_start && self.end.is_none_or(|end| now <= end);
        match self.conns[idx].state {
            State::Connecting(since) => {
                self.outcome
                    .connect_ns
                    .saturating_record(nanos_between(since, now));
            }
            State::Handshaking(since) => {
                if let Some(tls) = self.outcome.tls.as_mut() {
                    tls.handshake_ns
                        .saturating_record(nanos_between(since, now));
                    tls.handshakes += 1;
                    tls.handshakes_measured += u64::from(in_window);
                }
            }
            _ => {}
        }
        self.conns[idx].state = State::Open;
        self.live += 1;
        self.outcome.opened += 1;
        if in_window {
            self.outcome.opened_measured += 1;
        }
        shared.opened.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether connection `idx` may take another message: with churn, a connection carries
    /// only `requests_per_conn` of them.
    fn has_room(&self, idx: usize) -> bool {
        let conn = &self.conns[idx];
        self.plan
            .requests_per_conn
            .is_none_or(|n| conn.recv_seq + (conn.in_flight.len() as u64) < n)
    }

    /// Churn: closes connection `idx` (its last echo is in) and opens the slot's next one.
    fn recycle(&mut self, idx: usize) {
        self.close(idx);
        let conn = &mut self.conns[idx];
        conn.generation += 1;
        conn.id = conn.base_id + conn.generation * self.plan.id_stride;
        conn.send_seq = 0;
        conn.send_off = 0;
        conn.recv_seq = 0;
        conn.recv_off = 0;
        conn.written = 0;
        conn.read = 0;
        match self.start_connect(idx) {
            Ok(()) => self.connecting += 1,
            Err(e) => self.connect_failed(idx, &e),
        }
    }

    /// Puts a freshly opened connection to work: the closed loop fills its pipeline, the
    /// open loop offers its slots to the schedule.
    fn begin(&mut self, idx: usize) {
        let now = Instant::now();
        for _ in 0..self.plan.pipeline {
            if self.share.rate.is_some() {
                self.ready.push_back(idx);
            } else if self.may_commit(now) && self.has_room(idx) {
                self.commit(idx, now);
            }
        }
        self.flush(idx);
    }

    fn connect_failed(&mut self, idx: usize, err: &io::Error) {
        self.close(idx);
        self.outcome.connect_failures += 1;
        self.outcome.errors += 1;
        if self.outcome.first_connect_error.is_none() {
            self.outcome.first_connect_error = Some(format!(
                "connection {} to {}: {err}",
                self.conns[idx].id, self.plan.addr
            ));
        }
    }

    fn close(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        let tls = conn.tls.take();
        if let Some(mut stream) = conn.stream.take() {
            if let Some(mut tls) = tls {
                // So the server sees an orderly end, not a truncated stream (best effort:
                // the socket is not waited for).
                tls.send_close_notify();
                let _ = write_tls(&mut tls, &mut stream);
            }
            let _ = self.poll.registry().deregister(&mut stream);
        }
        if conn.state == State::Open {
            self.live -= 1;
        }
        conn.state = State::Closed;
        self.in_flight_total -= conn.in_flight.len();
        conn.in_flight.clear();
        conn.unsent = 0;
    }

    /// Records a failed connection and closes it.
    fn fail(&mut self, idx: usize, kind: FailureKind, detail: String) {
        let conn = &self.conns[idx];
        let failure = Failure {
            kind,
            connection: conn.id,
            offset: conn.read,
            message: conn.recv_seq,
            message_offset: conn.recv_off,
            detail,
        };
        self.record_failure(failure);
        self.close(idx);
    }

    fn record_failure(&mut self, failure: Failure) {
        if failure.kind == FailureKind::Mismatch {
            self.outcome.mismatches += 1;
        } else {
            self.outcome.errors += 1;
        }
        if self.outcome.failures.len() < MAX_FAILURES {
            self.outcome.failures.push(failure);
        }
    }

    /// The measuring run: warm-up, measured window, then draining the echoes in flight.
    fn load(&mut self, start: Instant, shared: &RunControl) -> io::Result<()> {
        self.measure_start = start + self.plan.warmup;
        self.end = self.plan.duration.map(|d| self.measure_start + d);
        self.last_progress = start;
        self.loading = true;
        if self.share.quota == Some(0) {
            self.sending = false;
        }
        let open: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].state == State::Open)
            .collect();
        if let Some(_rate) = self.share.rate {
            for _ in 0..self.plan.pipeline {
                self.ready.extend(open.iter().copied());
            }
        } else {
            let now = Instant::now();
            for &idx in &open {
                for _ in 0..self.plan.pipeline {
                    if self.may_commit(now) && self.has_room(idx) {
                        self.commit(idx, now);
                    }
                }
                self.flush(idx);
            }
        }

        let mut events = Events::with_capacity(1024);
        let mut scheduled: u64 = 0;
        let interval = self.share.rate.map(|r| Duration::from_secs_f64(1.0 / r));
        let mut timer = match interval {
            Some(_) => Some(Timer::new(self.poll.registry(), TIMER)?),
            None => None,
        };
        let mut armed_for: Option<Instant> = None;
        let mut drain_deadline: Option<Instant> = None;
        let mut stopped_at: Option<Instant> = None;
        let mut last_publish = start;
        loop {
            let now = Instant::now();
            let mut next_due = None;
            if let Some(interval) = interval {
                while self.sending {
                    let due = start + interval.mul_f64(scheduled as f64);
                    if due > now {
                        next_due = Some(due);
                        break;
                    }
                    if !self.may_commit(due) {
                        self.sending = false;
                        break;
                    }
                    let Some(idx) = self.next_ready() else { break };
                    self.commit(idx, due);
                    scheduled += 1;
                    self.flush(idx);
                }
            }
            // Requests due before the end go out first, even when the loop woke late.
            if self.sending
                && (self.end.is_some_and(|end| now >= end)
                    || shared.interrupted.load(Ordering::Relaxed))
            {
                self.sending = false;
            }
            if !self.sending && stopped_at.is_none() {
                stopped_at = Some(now);
            }
            if self.live + self.connecting == 0 || (!self.sending && self.in_flight_total == 0) {
                break;
            }
            if !self.sending {
                let deadline = *drain_deadline.get_or_insert(now + DRAIN_TIMEOUT);
                if now >= deadline {
                    self.time_out_in_flight("still owed when the drain timeout ran out");
                    break;
                }
            }
            if self.in_flight_total > 0 && now.duration_since(self.last_progress) > STALL_TIMEOUT {
                self.time_out_in_flight("no echo arrived for 10s");
            }
            if now.duration_since(last_publish) >= PUBLISH_EVERY {
                shared
                    .completed
                    .fetch_add(std::mem::take(&mut self.unpublished), Ordering::Relaxed);
                last_publish = now;
            }

            let mut timeout = PUBLISH_EVERY;
            if let (true, Some(end)) = (self.sending, self.end) {
                timeout = timeout.min(end.saturating_duration_since(now));
            }
            if let (Some(due), Some(timer)) = (next_due, timer.as_ref()) {
                // epoll's timeout has millisecond resolution; the timer is exact.
                if armed_for != Some(due) {
                    timer.arm(due.saturating_duration_since(now))?;
                    armed_for = Some(due);
                }
            }
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                if event.token() == TIMER {
                    if let Some(timer) = timer.as_mut() {
                        timer.clear();
                    }
                    armed_for = None;
                    continue;
                }
                let idx = event.token().0;
                if self.conns[idx].is_connecting() {
                    match self.advance_connect(idx) {
                        Ok(true) => {
                            self.connecting -= 1;
                            self.opened(idx, shared);
                            self.begin(idx);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            self.connecting -= 1;
                            self.connect_failed(idx, &e);
                        }
                    }
                    continue;
                }
                if self.conns[idx].state != State::Open {
                    continue;
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.on_readable(idx);
                }
                if event.is_writable() {
                    self.flush(idx);
                }
            }
        }
        if let (Some(interval), Some(stopped), None) = (interval, stopped_at, self.share.quota) {
            let stopped = self.end.map_or(stopped, |end| stopped.min(end));
            let window = stopped.saturating_duration_since(start).as_secs_f64();
            let due = (window / interval.as_secs_f64()).ceil() as u64;
            self.outcome.backlog = due.saturating_sub(scheduled);
        }
        shared
            .completed
            .fetch_add(std::mem::take(&mut self.unpublished), Ordering::Relaxed);
        for idx in 0..self.conns.len() {
            self.close(idx);
        }
        Ok(())
    }

    /// Whether a message sent (or due) at `at` may still be sent.
    fn may_commit(&self, at: Instant) -> bool {
        if !self.sending || self.end.is_some_and(|end| at >= end) {
            return false;
        }
        match self.share.quota {
            Some(quota) => at < self.measure_start || self.measured_committed < quota,
            None => true,
        }
    }

    /// Open loop: a connection with a free pipeline slot, if any.
    fn next_ready(&mut self) -> Option<usize> {
        while let Some(idx) = self.ready.pop_front() {
            let conn = &self.conns[idx];
            if conn.state == State::Open
                && conn.in_flight.len() < self.plan.pipeline
                && self.has_room(idx)
            {
                return Some(idx);
            }
        }
        None
    }

    /// Queues the next message on connection `idx`, sent (or due) at `at`.
    fn commit(&mut self, idx: usize, at: Instant) {
        let measured = at >= self.measure_start;
        if measured {
            self.measured_committed += 1;
            if self.share.quota == Some(self.measured_committed) {
                // The last one: stop sending once it is out.
                self.sending = false;
            }
        }
        let conn = &mut self.conns[idx];
        conn.in_flight.push_back(Sent {
            at,
            sent_at: Instant::now(),
            measured,
        });
        conn.unsent += 1;
        self.in_flight_total += 1;
    }

    /// Writes as much of the queued messages as the socket takes.
    fn flush(&mut self, idx: usize) {
        let mut buf = std::mem::take(&mut self.write_buf);
        let result = if self.conns[idx].tls.is_some() {
            self.flush_tls(idx, &mut buf)
        } else {
            self.flush_plain(idx, &mut buf)
        };
        self.write_buf = buf;
        if let Err(e) = result {
            self.io_failed(idx, "write", e);
        }
    }

    fn flush_plain(&mut self, idx: usize, buf: &mut [u8]) -> io::Result<()> {
        let messages = &self.plan.messages;
        loop {
            let conn = &mut self.conns[idx];
            if conn.unsent == 0 {
                return Ok(());
            }
            let len = conn.next_chunk(messages, buf);
            let Some(stream) = conn.stream.as_ref() else {
                return Ok(());
            };
            match send(stream, &buf[..len]) {
                Ok(written) => conn.sent(messages.size(), written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// TLS: hands the queued messages to rustls a buffer at a time, each once the records
    /// before it are on the socket, so rustls never holds more than one buffer's worth.
    fn flush_tls(&mut self, idx: usize, buf: &mut [u8]) -> io::Result<()> {
        let messages = &self.plan.messages;
        loop {
            let conn = &mut self.conns[idx];
            let (Some(stream), Some(tls)) = (conn.stream.as_mut(), conn.tls.as_mut()) else {
                return Ok(());
            };
            if !write_tls(tls, stream)? || conn.unsent == 0 {
                // The socket is full (its WRITABLE event resumes), or nothing is queued.
                return Ok(());
            }
            let len = chunk(
                messages,
                conn.id,
                conn.send_seq,
                conn.send_off,
                conn.unsent,
                buf,
            );
            let accepted = tls.writer().write(&buf[..len])?;
            if accepted == 0 {
                return Ok(());
            }
            conn.sent(messages.size(), accepted);
        }
    }

    fn io_failed(&mut self, idx: usize, what: &str, err: io::Error) {
        let kind = match err.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => FailureKind::Reset,
            _ => FailureKind::Io,
        };
        self.fail(idx, kind, format!("{what} failed: {err}"));
    }

    /// Reads and checks everything that arrived, then sends what completions allow.
    fn on_readable(&mut self, idx: usize) {
        let mut buf = std::mem::take(&mut self.read_buf);
        if self.conns[idx].tls.is_some() {
            self.read_tls(idx, &mut buf);
        } else {
            self.read_plain(idx, &mut buf);
        }
        self.read_buf = buf;
        self.flush(idx);
    }

    fn read_plain(&mut self, idx: usize, buf: &mut [u8]) {
        loop {
            let conn = &mut self.conns[idx];
            let Some(stream) = conn.stream.as_mut() else {
                break;
            };
            match recv(stream, buf) {
                Ok(0) => {
                    self.server_closed(idx, "");
                    break;
                }
                Ok(n) => {
                    let now = Instant::now();
                    self.last_progress = now;
                    if !self.check_echo(idx, &buf[..n], now) {
                        break;
                    }
                    let conn = &self.conns[idx];
                    if conn.read == conn.written {
                        // Everything written came back: nothing more can be waiting.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.io_failed(idx, "read", e);
                    break;
                }
            }
        }
    }

    /// TLS: reads records until the socket is drained (edge-triggered), decrypting and
    /// checking the plaintext as it comes.
    fn read_tls(&mut self, idx: usize, buf: &mut [u8]) {
        loop {
            let conn = &mut self.conns[idx];
            let (Some(stream), Some(tls)) = (conn.stream.as_mut(), conn.tls.as_mut()) else {
                return;
            };
            let eof = match tls.read_tls(stream) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.io_failed(idx, "read", e),
            };
            if let Err(e) = tls.process_new_packets() {
                let _ = write_tls(tls, stream);
                return self.fail(idx, FailureKind::Io, format!("TLS error: {e}"));
            }
            loop {
                let Some(tls) = self.conns[idx].tls.as_mut() else {
                    return;
                };
                match tls.reader().read(buf) {
                    Ok(0) => return self.server_closed(idx, ""),
                    Ok(n) => {
                        let now = Instant::now();
                        self.last_progress = now;
                        if !self.check_echo(idx, &buf[..n], now) {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return self.server_closed(idx, " (without close_notify)")
                    }
                    Err(e) => return self.io_failed(idx, "read", e),
                }
            }
            if eof {
                return self.server_closed(idx, " (without close_notify)");
            }
        }
    }

    /// The server closed connection `idx` (`how`: a note on the manner): the end, if
    /// nothing was owed and sending is over; a failure otherwise.
    fn server_closed(&mut self, idx: usize, how: &str) {
        let conn = &self.conns[idx];
        if conn.in_flight.is_empty() && !self.sending {
            self.close(idx);
        } else {
            let owed = conn.written - conn.read;
            self.fail(
                idx,
                FailureKind::Eof,
                format!(
                    "the server closed the connection{how} with {owed} echoed bytes still owed"
                ),
            );
        }
    }

    /// Checks echoed bytes against what was sent and completes the messages they finish.
    /// Returns false when the connection failed.
    fn check_echo(&mut self, idx: usize, mut data: &[u8], now: Instant) -> bool {
        let messages = &self.plan.messages;
        let size = messages.size();
        while !data.is_empty() {
            let conn = &mut self.conns[idx];
            let owed = conn.written - conn.read;
            if owed == 0 {
                let extra = data.len();
                self.fail(
                    idx,
                    FailureKind::Excess,
                    format!("the server sent {extra} bytes more than it was sent"),
                );
                return false;
            }
            let take = (size - conn.recv_off)
                .min(data.len())
                .min(usize::try_from(owed).unwrap_or(usize::MAX));
            let (piece, rest) = data.split_at(take);
            if let Some((at, want)) = messages.check(conn.id, conn.recv_seq, conn.recv_off, piece) {
                conn.read += at as u64;
                conn.recv_off += at;
                let got = piece[at];
                // A whole foreign header says where the bytes came from (crossed streams).
                let origin = match (conn.recv_off - at, piece.get(..HEADER_LEN)) {
                    (0, Some(header)) if at < HEADER_LEN => verify::parse_header(header)
                        .map(|(c, q)| format!(" (they look like message {q} of connection {c})"))
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                self.fail(
                    idx,
                    FailureKind::Mismatch,
                    format!("got byte 0x{got:02x}, expected 0x{want:02x}{origin}"),
                );
                return false;
            }
            conn.read += take as u64;
            conn.recv_off += take;
            data = rest;
            if conn.recv_off == size {
                conn.recv_off = 0;
                conn.recv_seq += 1;
                let sent = conn.in_flight.pop_front();
                self.in_flight_total -= 1;
                if let Some(sent) = sent {
                    self.completed(sent, now);
                }
                let conn = &self.conns[idx];
                if self.plan.requests_per_conn == Some(conn.recv_seq) {
                    if !rest.is_empty() {
                        let extra = rest.len();
                        self.fail(
                            idx,
                            FailureKind::Excess,
                            format!("the server sent {extra} bytes more than it was sent"),
                        );
                    } else if self.sending {
                        self.recycle(idx);
                    } else {
                        self.close(idx);
                    }
                    // This connection is done; its successor has a new socket.
                    return false;
                }
                if self.share.rate.is_some() {
                    self.ready.push_back(idx);
                } else if self.may_commit(now) && self.has_room(idx) {
                    self.commit(idx, now);
                }
            }
        }
        true
    }

    fn completed(&mut self, sent: Sent, now: Instant) {
        if !sent.measured || self.end.is_some_and(|end| now > end) {
            return;
        }
        let nanos_since = |at: Instant| {
            let nanos = now.saturating_duration_since(at).as_nanos();
            u64::try_from(nanos).unwrap_or(u64::MAX).max(1)
        };
        let nanos = nanos_since(sent.at);
        self.outcome.latency_ns.saturating_record(nanos);
        self.outcome
            .uncorrected_ns
            .saturating_record(nanos_since(sent.sent_at));
        self.outcome.requests += 1;
        let size = self.plan.messages.size() as u64;
        self.outcome.bytes += size;
        if let Some(len) = self.plan.interval {
            let index = now.saturating_duration_since(self.measure_start).as_nanos()
                / len.as_nanos().max(1);
            let interval = self.outcome.interval(index as usize);
            interval.requests += 1;
            interval.bytes += size;
            // record, not saturating_record: only record grows an auto-resizing histogram.
            let _ = interval.latency_ns.record(nanos);
        }
        self.outcome.last_completion = Some(now);
        self.unpublished += 1;
    }

    /// Gives up on every connection that still owes echoes.
    fn time_out_in_flight(&mut self, why: &str) {
        for idx in 0..self.conns.len() {
            let conn = &self.conns[idx];
            if conn.state == State::Open && !conn.in_flight.is_empty() {
                let owed = conn.written - conn.read;
                self.fail(
                    idx,
                    FailureKind::Timeout,
                    format!("{owed} echoed bytes {why}"),
                );
            }
        }
    }
}

// The hot path's two system calls, made by rustix as raw system calls rather than through
// libc's `send` and `recv`: those are pthread cancellation points, and in a process with more
// than one thread (bench always has two) glibc brackets each call with enabling and disabling
// asynchronous cancellation, about 1% of the generator's CPU. Nothing here is ever cancelled,
// so the bracket buys nothing. This also skips the mio and std wrapper layers per message.

/// `send(fd, buf, MSG_NOSIGNAL)`: MSG_NOSIGNAL as std does, so a reset peer is an error, not
/// a SIGPIPE.
fn send(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(
        stream,
        buf,
        rustix::net::SendFlags::NOSIGNAL,
    )?)
}

/// `recv(fd, buf, 0)`.
fn recv(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let (received, _) = rustix::net::recv(stream, buf, rustix::net::RecvFlags::empty())?;
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_the_source_address_before_connecting() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let plan = Plan {
            addr: listener.local_addr().unwrap(),
            messages: Messages::new(1, 16),
            pipeline: 1,
            warmup: Duration::ZERO,
            duration: Some(Duration::from_millis(10)),
            sources: vec![IpAddr::from([127, 0, 0, 2]), IpAddr::from([127, 0, 0, 3])],
            announce_start: false,
            interval: None,
            requests_per_conn: None,
            id_stride: 2,
            tls: None,
        };
        let share = Share {
            first_conn: 0,
            conns: 2,
            quota: None,
            rate: None,
        };
        let shared = RunControl::new(1);
        let mut worker = LoadThread::new(&plan, share).unwrap();
        worker.connect_all(&shared);
        assert_eq!(
            worker.outcome.opened, 2,
            "{:?}",
            worker.outcome.first_connect_error
        );
        let mut peers: Vec<IpAddr> = (0..2).map(|_| listener.accept().unwrap().1.ip()).collect();
        peers.sort();
        assert_eq!(peers, plan.sources);
    }
}
