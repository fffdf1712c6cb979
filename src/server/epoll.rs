//! `epoll`: non-blocking event loops on epoll (through mio), one per worker thread
//! (`--workers`), in the spirit of the mio examples and the C reference server.
//!
//! How it works: every worker owns a mio `Poll`, a `Slab` of small connection structs and one
//! 64 KiB read buffer. The listeners are shared: each worker registers its own `try_clone()` of
//! each listener (no SO_REUSEPORT, so a second server on a busy port still fails to bind), and
//! whichever worker wins `accept()` owns the connection for its whole life. mio registers
//! everything edge-triggered, so the loop follows the edge rules: it accepts until WouldBlock
//! (up to a batch, then comes back), and reads until WouldBlock or until a read returns less
//! than the buffer holds (the socket was drained at that moment, and any later arrival raises a
//! fresh edge; tokio relies on the same fact), except once an event has reported the peer's
//! FIN or an error: that edge is spent, so reads go on until they return it. A connection is
//! registered once for both readable and writable and never re-registered (no `epoll_ctl` on
//! the hot path). Each read is written straight back; if the socket takes only part of it, the
//! rest is copied into that connection's backlog and the connection stops reading
//! (backpressure) until a writable edge lets it flush; then it reads again, since the edge
//! that announced new data was already spent. A connection that keeps its socket full is read
//! at most `READ_BUDGET` times per turn and then put at the back of the queue, so one fast
//! client cannot starve the others.
//!
//! Bulk path (`--splice auto`, `splice.rs`): a plain connection whose read filled the whole
//! 64 KiB buffer is moving bulk data, and is echoed with splice(2) from then on: socket into
//! a pipe borrowed from the worker's bounded pool, pipe back into the same socket, no copy
//! through user space. It keeps the copy path's rules: a pipe the socket did not empty stays
//! with the connection, which reads nothing more until a writable edge has flushed it; a
//! splice in may be short for want of pipe slots, so only `WouldBlock` (or the end of the
//! stream, once the pipe is empty) ends a turn; the counters, the idle time and the close
//! record follow the bytes exactly as they follow reads and writes. After 4 small splices in a
//! row (under 16 KiB each) it goes back to read/write; with every pipe lent out it reads and
//! writes meanwhile. A PROXY header is always read (and what follows it echoed from the
//! backlog) before the first splice; TLS connections never splice. Its cost: per splice
//! echo, two splices instead of a read and a write, plus one splice that finds the socket
//! empty; per worker, at most 64 pipes (128 descriptors, up to 256 KiB of kernel memory each)
//! opened as needed and kept.
//!
//! Costs: one thread per worker, two syscalls per echoed message (read, write) plus the shared
//! `epoll_wait`, no allocation on the hot path. An idle connection costs its slab entry
//! (136 bytes on x86-64, and a unit test keeps it at most 144: the backlog and the splice
//! path's state are boxed, allocated only for the connections that need them) and its kernel socket
//! buffers: nothing else of its own in user space, and no pipe. A connection whose client does not
//! read holds at most one read's worth (64 KiB) of pending echo, or on the splice path one
//! pipe's worth (256 KiB, kernel memory), and the kernel stops the client once that
//! connection's receive buffer is full.
//!
//! TLS (`tls://`, `tls+proxy://`): the connection carries a [`TlsSession`] (boxed, so plain
//! connections stay as small as before and their path gains one branch). The socket is read
//! into the same 64 KiB buffer and handed to the session, which decrypts, echoes into rustls's
//! writer and queues ciphertext; the queue is written straight from rustls's buffers with one
//! `writev`. The session wants no input while any output is unsent (plain echo's rule), and a
//! writable edge flushes it as it flushes a plain backlog. A TLS connection costs one plaintext
//! scratch buffer per worker (16 KiB) plus its session: a few KiB while idle, at most about
//! 200 KiB for a client that stops reading (see `tls::session`). Handshakes: a connection
//! handshakes only with a permit under the server's cap on handshakes in progress; without one
//! it waits unread (a slab entry and a session, no CPU) and takes a permit when one comes back,
//! oldest first (the cap's room descriptor wakes every worker, and a worker with waiting
//! connections also retries every `HANDSHAKE_RETRY`). The sweep closes a connection whose
//! handshake (waiting or running) is not done within the handshake timeout.
//!
//! Limits: `--max-conns` is a counter shared by the workers; at the limit they stop accepting
//! (clients wait in the backlog) and retry every `FULL_RETRY`, and a worker that frees a slot
//! retries at once. Accept errors follow `crate::net::classify_accept_error`: running out of
//! descriptors or memory logs one warning and pauses accepting for `ACCEPT_BACKOFF`, never
//! spinning. `--idle-timeout` is a last-activity instant per connection checked by a periodic
//! sweep (a poll timeout).
//!
//! Shutdown: each worker also watches the shutdown descriptor. When it fires, the worker
//! deregisters its listeners and keeps serving its live connections until none are left or
//! `--shutdown-timeout` passes, then closes the rest and exits; `serve` joins the workers.
//! A worker that fails fatally triggers the shutdown so that the others stop too.
//!
//! UDP (`udp.rs`): `--workers` more event loops, each with its own `Poll` and a duplicate of
//! every `udp://` socket, receive in batches (`recvmmsg`) until `WouldBlock` and echo each
//! batch's admitted datagrams with one `sendmmsg` (a full send buffer holds the unsent echoes
//! and pauses reading that socket). Cost: a `recvmmsg` and a `sendmmsg` per batch of up to 64
//! plus a share of `epoll_wait`, a batch of 64 slots of 64 KiB per socket per loop (touched as
//! far as datagrams fill them), no copy when the send buffer is full; every loop wakes on a
//! burst. With `--udp-gro on` (off by default) the sockets get `UDP_GRO` before readiness:
//! a sender's train of equal datagrams (one `UDP_SEGMENT` send, or coalesced on the way in)
//! arrives as one message, each of its datagrams is admitted and counted on its own, and the
//! admitted ones go back as one `UDP_SEGMENT` message that the kernel cuts into the same
//! datagrams; it pays for clients that send trains, and costs ordinary clients fresh receive
//! headers per batch. At shutdown the UDP loops stop at once while the TCP workers drain.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown as Direction, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::listen::ListenerKind;
use crate::net::{AcceptError, ACCEPT_BACKOFF};
use crate::server::conn::admission::Refusal;
use crate::server::conn::limit::{Limit, Permit};
use crate::server::conn::proxy::HeaderReader;
use crate::server::conn::{Admitted, End, Lifecycle};
use crate::server::{Server, ServerConfig};
use crate::shutdown::Shutdown;
use crate::tls::session::{Outcome, TlsSession, SCRATCH_SIZE};
use crate::tls::{HandshakePermit, TlsServer};

mod splice;
mod udp;
pub(crate) use udp::request_gro;

use splice::{HeldPipe, PipePool, SMALL_SPLICE, SMALL_SPLICES_TO_LEAVE};

/// The read buffer each worker shares among its connections.
const READ_BUFFER: usize = 64 * 1024;
/// Events taken from one `epoll_wait`.
const EVENT_CAPACITY: usize = 1024;
/// Reads a connection gets per turn before others are served (64 KiB each).
const READ_BUDGET: usize = 16;
/// Connections a worker accepts per turn before it serves its events again.
const ACCEPT_BUDGET: usize = 256;
/// How often a worker retries accepting while the server is at `--max-conns`.
const FULL_RETRY: Duration = Duration::from_millis(10);
/// The shutdown descriptor's token; listeners count down from below the next one.
const SHUTDOWN: Token = Token(usize::MAX);
/// The handshake cap's room descriptor (with TLS listeners).
const HANDSHAKE_ROOM: Token = Token(usize::MAX - 1);
/// How often a worker with connections waiting for a handshake permit tries again, should the
/// room signal have gone to another worker that took the room.
const HANDSHAKE_RETRY: Duration = Duration::from_millis(50);

fn listener_token(index: usize) -> Token {
    Token(usize::MAX - 2 - index)
}

/// Runs the epoll model.
pub fn serve(server: &Server) -> crate::Result<()> {
    let limit = Limit::new(server.config.max_conns)
        .map_err(|e| crate::Error::io("cannot create the connection limit", e))?;
    let workers = (0..server.config.workers.max(1))
        .map(|_| EventLoop::new(server, &limit))
        .collect::<crate::Result<Vec<_>>>()?;
    tracing::debug!(workers = workers.len(), "epoll workers started");

    let results = thread::scope(|scope| {
        if let Err(e) = udp::spawn(scope, server) {
            server.shutdown.trigger();
            return vec![Err(e)];
        }
        let mut workers = workers.into_iter().enumerate();
        let (_, first) = workers.next().expect("at least one worker");
        let mut handles = Vec::new();
        for (id, worker) in workers {
            let spawned = thread::Builder::new()
                .name(format!("epoll-{id}"))
                .spawn_scoped(scope, move || worker.run());
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    // The workers already running serve on; this one's share goes to them.
                    tracing::warn!("cannot start epoll worker {id}: {e}");
                }
            }
        }
        // The calling thread is a worker too.
        let mut results = vec![first.run()];
        for handle in handles {
            results.push(handle.join().unwrap_or_else(|_| {
                server.shutdown.trigger();
                Err(crate::Error::Unsupported("an epoll worker panicked".into()))
            }));
        }
        results
    });
    results.into_iter().collect()
}

/// One client, as small as it can be while idle.
struct Connection {
    stream: TcpStream,
    peer: Peer,
    /// Its slot under `--max-conns`.
    permit: Permit,
    last_active: Instant,
    bytes: u64,
    /// Echo the socket has not taken yet; `None` (no allocation) when caught up.
    backlog: Option<Box<Backlog>>,
    /// An event reported the peer's FIN or an error: that edge is spent, so reads must go on
    /// until they see it (a short read no longer proves there is nothing left).
    peer_closing: bool,
    /// On a `tls://` or `tls+proxy://` listener: the TLS session (boxed, so a plain
    /// connection stays small).
    tls: Option<Box<TlsConn>>,
    /// On the splice path (`--splice auto`, a plain connection moving bulk data).
    splicing: bool,
    /// What the splice path keeps, from the first switch to it on (boxed: most connections
    /// never splice).
    splice: Option<Box<SpliceState>>,
}

/// Echo the socket did not take at once, kept until it does.
struct Backlog {
    data: Vec<u8>,
    /// How much of `data` has been written.
    sent: usize,
}

impl Backlog {
    fn new(data: &[u8]) -> Option<Box<Backlog>> {
        Some(Box::new(Backlog {
            data: data.to_vec(),
            sent: 0,
        }))
    }
}

/// A connection's splice-path state.
#[derive(Default)]
struct SpliceState {
    /// Small splices in a row.
    small_splices: u8,
    /// The pipe lent to it while the pipe holds echo the socket has not taken.
    pipe: Option<HeldPipe>,
    /// Bytes echoed through a pipe (a part of `bytes`), for the debug log.
    spliced: u64,
    /// Times the socket left echo in the pipe (backpressure), for the debug log.
    pipe_waits: u32,
}

/// What one splice in and out left to do.
enum Spliced {
    /// Echoed; read on.
    Again,
    /// No pipe to lend: read and write this time.
    NoPipe,
    Done(Next),
}

/// A TLS connection's session and where its handshake stands.
struct TlsConn {
    session: TlsSession,
    handshake: Handshake,
    /// The handshake timeout, which starts again once a PROXY header admits the client.
    timeout: Duration,
}

/// Where a TLS connection's handshake stands, for the handshake cap and timeout.
#[derive(Debug)]
enum Handshake {
    /// Waiting for a permit under the server's handshake cap: not read at all yet.
    Queued {
        deadline: Instant,
    },
    /// Holding a permit (given back on drop) until the handshake completes or fails.
    Running {
        deadline: Instant,
        _permit: HandshakePermit,
    },
    Done,
}

impl Handshake {
    /// The handshake's time runs from `now` (the client was just admitted).
    fn restart(&mut self, now: Instant, timeout: Duration) {
        match self {
            Handshake::Queued { deadline } | Handshake::Running { deadline, .. } => {
                *deadline = now + timeout;
            }
            Handshake::Done => {}
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self {
            Handshake::Queued { deadline } | Handshake::Running { deadline, .. } => Some(*deadline),
            Handshake::Done => None,
        }
    }
}

/// Who a connection is for.
enum Peer {
    /// Admitted: being echoed.
    Admitted(Admitted),
    /// On a `+proxy` listener, still reading the PROXY header that names the client.
    AwaitingHeader(Box<AwaitingHeader>),
}

struct AwaitingHeader {
    proxy: SocketAddr,
    /// The index of the listener it came on.
    listener: usize,
    reader: HeaderReader,
    deadline: Instant,
}

/// What a connection needs after it has been driven.
enum Next {
    /// Waiting for its next edge.
    Wait,
    /// Out of budget with data possibly left to read: drive it again soon.
    Defer,
    /// Finished; the reason goes to the log.
    Close(End),
    /// Refused before it was admitted (already counted and logged): just drop it.
    Drop,
}

impl Connection {
    /// Does everything the socket allows now: reads the PROXY header if one is due, flushes
    /// pending echo, then reads and echoes until the socket is drained, full, or the budget is
    /// spent.
    fn drive(
        &mut self,
        buffer: &mut [u8],
        scratch: &mut [u8],
        pipes: &mut PipePool,
        now: Instant,
        lifecycle: &Lifecycle,
    ) -> Next {
        if self.tls.is_some() {
            return self.drive_tls(buffer, scratch, now, lifecycle);
        }
        if let Peer::AwaitingHeader(_) = self.peer {
            if let Some(next) = self.read_header(buffer, scratch, lifecycle) {
                return next;
            }
        }
        if self.backlog.is_some() {
            match self.flush(now, lifecycle) {
                Ok(true) => {}
                Ok(false) => return Next::Wait,
                Err(e) => return Next::Close(End::Failed(e)),
            }
        }
        if self.holds_pipe() {
            match self.flush_pipe(pipes, now, lifecycle) {
                Ok(true) => {}
                Ok(false) => return Next::Wait,
                Err(e) => return Next::Close(End::Failed(e)),
            }
        }
        for _ in 0..READ_BUDGET {
            if self.splicing {
                match self.splice_once(pipes, now, lifecycle) {
                    Spliced::Again => continue,
                    Spliced::Done(next) => return next,
                    Spliced::NoPipe => {}
                }
            }
            let read = match (&self.stream).read(buffer) {
                Ok(0) => {
                    // The client half-closed and every byte it sent has been written back.
                    let _ = self.stream.shutdown(Direction::Write);
                    return Next::Close(End::ClientClosed);
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Wait,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Next::Close(End::Failed(e)),
            };
            self.last_active = now;
            lifecycle.received(read);
            let written = match write_some(&self.stream, &buffer[..read]) {
                Ok(written) => written,
                Err(e) => return Next::Close(End::Failed(e)),
            };
            lifecycle.sent(written);
            self.bytes += written as u64;
            if written < read {
                // Backpressure: keep the rest and stop reading until it is flushed.
                self.backlog = Backlog::new(&buffer[written..read]);
                return Next::Wait;
            }
            if read == buffer.len() && !self.splicing && pipes.enabled() {
                // A bulk transfer: from now on the kernel moves it without a copy.
                self.splicing = true;
                self.splice.get_or_insert_default().small_splices = 0;
                self.log_switch("splice path: a read filled the buffer");
            }
            if read < buffer.len() && !self.peer_closing {
                // A short read drained the socket; new data or a FIN will raise a new edge.
                return Next::Wait;
            }
        }
        Next::Defer
    }

    /// [`Connection::drive`] for a TLS connection: once it holds a handshake slot, reads the
    /// PROXY header if one is due, then sends what the session has queued, and reads and hands
    /// the session ciphertext while it wants input, until the socket is drained or full, the
    /// session finishes, or the budget is spent.
    fn drive_tls(
        &mut self,
        buffer: &mut [u8],
        scratch: &mut [u8],
        now: Instant,
        lifecycle: &Lifecycle,
    ) -> Next {
        if matches!(
            self.tls.as_deref(),
            Some(TlsConn {
                handshake: Handshake::Queued { .. },
                ..
            })
        ) {
            // Driven again when it gets a slot.
            return Next::Wait;
        }
        if let Peer::AwaitingHeader(_) = self.peer {
            if let Some(next) = self.read_header(buffer, scratch, lifecycle) {
                return next;
            }
        }
        let tls = self.tls.as_deref_mut().expect("a TLS connection");
        let mut drained = false;
        for _ in 0..READ_BUDGET {
            // Queued output goes first: nothing more is read while any of it is unsent.
            while tls.session.wants_write() {
                match tls.session.write_tls(&mut &self.stream) {
                    Ok(0) => return Next::Close(End::Failed(ErrorKind::WriteZero.into())),
                    Ok(_) => {
                        self.last_active = now;
                        tls.session.progress(scratch);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        return match tls.session.finished() {
                            // The last echo and our close_notify wait for room.
                            None | Some(Outcome::Closed) => Next::Wait,
                            // A failure's alert goes out only if it fits at once.
                            Some(_) => Next::Close(tls_end(&mut tls.session)),
                        };
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Next::Close(End::Failed(e)),
                }
            }
            if let Some(outcome) = tls.session.finished() {
                if matches!(outcome, Outcome::Closed) {
                    // Everything and our close_notify are out: the TLS half-close done, ours.
                    let _ = self.stream.shutdown(Direction::Write);
                }
                return Next::Close(tls_end(&mut tls.session));
            }
            if drained || !tls.session.wants_input() {
                return Next::Wait;
            }
            let read = match (&self.stream).read(buffer) {
                Ok(0) => {
                    tls.session.eof();
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Wait,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Next::Close(End::Failed(e)),
            };
            self.last_active = now;
            tls.session.receive(&buffer[..read], scratch);
            // A short read drained the socket (see `drive`): send the echo, then wait.
            drained = read < buffer.len() && !self.peer_closing;
        }
        Next::Defer
    }

    /// When its TLS handshake must be done, while it is not.
    fn handshake_deadline(&self) -> Option<Instant> {
        self.tls.as_ref().and_then(|tls| tls.handshake.deadline())
    }

    /// One splice from the socket into a pipe and from the pipe back to the socket. A pipe
    /// the socket did not empty stays with the connection, which stops reading until a
    /// writable edge lets [`Connection::flush_pipe`] send the rest (the copy path's
    /// backpressure). A splice in may be short because the pipe ran out of slots rather
    /// than because the socket is drained, so only `WouldBlock` ends the turn.
    fn splice_once(
        &mut self,
        pipes: &mut PipePool,
        now: Instant,
        lifecycle: &Lifecycle,
    ) -> Spliced {
        let Some(mut held) = pipes.take(now) else {
            return Spliced::NoPipe;
        };
        let moved = match held.fill(self.stream.as_fd()) {
            Ok(0) => {
                // The client half-closed and every byte it sent has been written back.
                pipes.give_back(held);
                let _ = self.stream.shutdown(Direction::Write);
                return Spliced::Done(Next::Close(End::ClientClosed));
            }
            Ok(n) => n,
            Err(e) => {
                pipes.give_back(held);
                return match e.kind() {
                    ErrorKind::WouldBlock => Spliced::Done(Next::Wait),
                    ErrorKind::Interrupted => Spliced::Again,
                    _ if splice::unsupported(&e) => {
                        pipes.disable(&e);
                        self.splicing = false;
                        Spliced::NoPipe
                    }
                    _ => Spliced::Done(Next::Close(End::Failed(e))),
                };
            }
        };
        self.last_active = now;
        lifecycle.received(moved);
        let sent = held.drain(self.stream.as_fd());
        // On a failure the pipe goes back unflushed, so the pool closes it.
        let sent = match sent {
            Ok(sent) => sent,
            Err(e) => {
                pipes.give_back(held);
                return Spliced::Done(Next::Close(End::Failed(e)));
            }
        };
        self.count_spliced(sent, lifecycle);
        let state = self.splice.get_or_insert_default();
        if held.queued() > 0 {
            // Backpressure: keep the rest in the pipe and stop reading until it is out.
            state.pipe = Some(held);
            state.pipe_waits = state.pipe_waits.saturating_add(1);
            return Spliced::Done(Next::Wait);
        }
        pipes.give_back(held);
        if moved < SMALL_SPLICE {
            state.small_splices += 1;
            if state.small_splices >= SMALL_SPLICES_TO_LEAVE {
                state.small_splices = 0;
                self.splicing = false;
                self.log_switch("copy path: small messages again");
            }
        } else {
            state.small_splices = 0;
        }
        Spliced::Again
    }

    /// Sends what the connection's pipe holds; returns whether all of it is out (and the
    /// pipe back in the pool).
    fn flush_pipe(
        &mut self,
        pipes: &mut PipePool,
        now: Instant,
        lifecycle: &Lifecycle,
    ) -> io::Result<bool> {
        let state = self.splice.as_mut().expect("splice state with a pipe");
        let held = state.pipe.as_mut().expect("a pipe with echo in it");
        // On a failure the pipe stays with the connection, and closes with it.
        let sent = held.drain(self.stream.as_fd())?;
        let empty = held.queued() == 0;
        if empty {
            pipes.give_back(state.pipe.take().expect("the pipe"));
        }
        if sent > 0 {
            self.last_active = now;
            self.count_spliced(sent, lifecycle);
        }
        Ok(empty)
    }

    fn count_spliced(&mut self, sent: usize, lifecycle: &Lifecycle) {
        lifecycle.sent(sent);
        self.bytes += sent as u64;
        self.splice.get_or_insert_default().spliced += sent as u64;
    }

    /// A debug line saying the connection changed paths (only admitted ones ever do).
    fn log_switch(&self, what: &str) {
        if let Peer::Admitted(admitted) = &self.peer {
            tracing::debug!(peer = %admitted.peer, "{what}");
        }
    }

    /// Whether a pipe with echo in it is lent to this connection.
    fn holds_pipe(&self) -> bool {
        self.splice
            .as_ref()
            .is_some_and(|state| state.pipe.is_some())
    }

    /// Whether echo is waiting for the socket to take it (plain, spliced or TLS).
    fn output_pending(&self) -> bool {
        self.backlog.is_some()
            || self.holds_pipe()
            || self
                .tls
                .as_ref()
                .is_some_and(|tls| tls.session.wants_write())
    }

    /// The bytes echoed: plaintext for a TLS connection.
    fn echoed(&self) -> u64 {
        match &self.tls {
            Some(tls) => tls.session.echoed(),
            None => self.bytes,
        }
    }

    /// Reads and parses the PROXY header; `None` once it is complete and the client admitted
    /// (what came after it waits in `pending`, to be echoed first, or goes to the TLS
    /// session).
    fn read_header(
        &mut self,
        buffer: &mut [u8],
        scratch: &mut [u8],
        lifecycle: &Lifecycle,
    ) -> Option<Next> {
        let Peer::AwaitingHeader(waiting) = &mut self.peer else {
            return None;
        };
        let proxy = waiting.proxy;
        let listener = waiting.listener;
        let refuse = |detail: &dyn std::fmt::Display| {
            lifecycle.refuse_because(proxy, Refusal::ProxyHeader, Some(detail));
            Some(Next::Drop)
        };
        loop {
            let read = match (&self.stream).read(buffer) {
                Ok(0) => return refuse(&waiting.reader.end_of_stream()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(Next::Wait),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return refuse(&e),
            };
            match waiting.reader.feed(&buffer[..read]) {
                Ok(None) => continue,
                Ok(Some((header, rest))) => {
                    match self.tls.as_deref_mut() {
                        Some(tls) => {
                            tls.handshake.restart(Instant::now(), tls.timeout);
                            tls.session.receive(rest, scratch);
                        }
                        None if !rest.is_empty() => self.backlog = Backlog::new(rest),
                        None => {}
                    }
                    let Ok(admitted) = lifecycle.admit_proxied(listener, proxy, &header) else {
                        return Some(Next::Drop);
                    };
                    lifecycle.received(self.backlog.as_ref().map_or(0, |b| b.data.len()));
                    self.peer = Peer::Admitted(admitted);
                    return None;
                }
                Err(e) => return refuse(&e),
            }
        }
    }

    /// Writes pending echo; returns whether all of it is out.
    fn flush(&mut self, now: Instant, lifecycle: &Lifecycle) -> io::Result<bool> {
        let backlog = self.backlog.as_mut().expect("a backlog to flush");
        let written = write_some(&self.stream, &backlog.data[backlog.sent..])?;
        if written > 0 {
            lifecycle.sent(written);
            self.last_active = now;
            self.bytes += written as u64;
            backlog.sent += written;
        }
        if backlog.sent < backlog.data.len() {
            return Ok(false);
        }
        // Give the memory back: an idle connection holds no buffer.
        self.backlog = None;
        Ok(true)
    }
}

/// The end to record for a finished TLS session.
fn tls_end(session: &mut TlsSession) -> End {
    session.take_outcome().map_or(End::ClientClosed, End::from)
}

/// Writes as much of `data` as the socket takes now.
fn write_some(mut stream: &TcpStream, data: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < data.len() {
        match stream.write(&data[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// One event loop and the connections it owns.
struct EventLoop<'a> {
    poll: Poll,
    listeners: Vec<TcpListener>,
    connections: Slab<Connection>,
    buffer: Box<[u8]>,
    limit: &'a Arc<Limit>,
    lifecycle: &'a Lifecycle,
    kinds: &'a [ListenerKind],
    config: &'a ServerConfig,
    shutdown: &'a Shutdown,
    /// The listeners may have connections waiting (their edge was not drained).
    accept_ready: bool,
    /// Accepting is paused until then (descriptors or memory ran out).
    accept_paused_until: Option<Instant>,
    /// Connections that ran out of read budget, to drive again.
    deferred: Vec<usize>,
    /// How often idle connections and late PROXY headers are looked for (only with
    /// `--idle-timeout` or a `+proxy` listener).
    sweep_every: Option<Duration>,
    /// When the next sweep is due.
    next_sweep: Option<Instant>,
    /// Set once shutdown has begun: when the remaining connections get closed.
    drain_deadline: Option<Instant>,
    /// For TLS listeners: the configuration, the handshake rules, and the slots.
    tls: Option<WorkerTls>,
    /// Plaintext scratch lent to TLS sessions (empty without TLS listeners).
    scratch: Box<[u8]>,
    /// The pipes lent to connections on the splice path (none with `--splice off`).
    pipes: PipePool,
}

/// What a worker needs for its TLS connections.
struct WorkerTls {
    server: Arc<TlsServer>,
    /// This worker's connections waiting for a handshake permit, oldest first (stale keys
    /// are skipped).
    queued: VecDeque<usize>,
}

impl<'a> EventLoop<'a> {
    fn new(server: &'a Server, limit: &'a Arc<Limit>) -> crate::Result<Self> {
        let poll =
            Poll::new().map_err(|e| crate::Error::io("cannot create an epoll instance", e))?;
        let mut listeners = Vec::with_capacity(server.listeners.len());
        for (index, listener) in server.listeners.iter().enumerate() {
            let context = "cannot prepare a listener for epoll";
            let clone = listener
                .try_clone()
                .and_then(|clone| clone.set_nonblocking(true).map(|()| clone))
                .map_err(|e| crate::Error::io(context, e))?;
            let mut clone = TcpListener::from_std(clone);
            poll.registry()
                .register(&mut clone, listener_token(index), Interest::READABLE)
                .map_err(|e| crate::Error::io(context, e))?;
            listeners.push(clone);
        }
        // The shutdown descriptor stays readable once triggered, so its edge fires even if
        // the signal came before this registration.
        let shutdown_fd = server.shutdown.as_fd().as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&shutdown_fd), SHUTDOWN, Interest::READABLE)
            .map_err(|e| crate::Error::io("cannot watch the shutdown signal", e))?;
        let tls = server.tls.as_ref().map(|tls| WorkerTls {
            server: Arc::clone(tls),
            queued: VecDeque::new(),
        });
        if let Some(tls) = &tls {
            // Readable when a full handshake cap has room again (edge-triggered: every
            // worker's epoll sees the edge, whichever drains it).
            let room = tls.server.handshakes().room_fd().as_raw_fd();
            poll.registry()
                .register(&mut SourceFd(&room), HANDSHAKE_ROOM, Interest::READABLE)
                .map_err(|e| crate::Error::io("cannot watch the TLS handshake cap", e))?;
        }
        let scratch = match tls {
            Some(_) => vec![0; SCRATCH_SIZE].into_boxed_slice(),
            None => Box::default(),
        };
        let pipes = PipePool::new(PipePool::size_for(server.config.splice)?);
        Ok(EventLoop {
            tls,
            scratch,
            pipes,
            poll,
            listeners,
            connections: Slab::new(),
            buffer: vec![0; READ_BUFFER].into_boxed_slice(),
            limit,
            lifecycle: &server.conn,
            kinds: &server.kinds,
            config: &server.config,
            shutdown: &server.shutdown,
            accept_ready: true,
            accept_paused_until: None,
            deferred: Vec::new(),
            sweep_every: server.sweep_every(),
            next_sweep: server.sweep_every().map(|period| Instant::now() + period),
            drain_deadline: None,
        })
    }

    /// Serves until shutdown has drained this worker's connections.
    fn run(mut self) -> crate::Result<()> {
        let result = self.serve();
        if result.is_err() {
            // Let the other workers stop too, so `serve` can return the error.
            self.shutdown.trigger();
            self.close_all();
        }
        result
    }

    fn serve(&mut self) -> crate::Result<()> {
        let mut events = Events::with_capacity(EVENT_CAPACITY);
        let mut deferred = Vec::new();
        let mut now = Instant::now();
        loop {
            let timeout = self.poll_timeout(now);
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(crate::Error::io("epoll_wait failed", e)),
            }
            now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    SHUTDOWN => {}
                    HANDSHAKE_ROOM => {
                        if let Some(tls) = &self.tls {
                            tls.server.handshakes().clear_room_signal();
                        }
                    }
                    Token(key) if key > listener_token(self.listeners.len()).0 => {
                        self.accept_ready = true;
                    }
                    Token(key) => {
                        let Some(conn) = self.connections.get_mut(key) else {
                            // Closed earlier in this turn.
                            continue;
                        };
                        if event.is_read_closed() || event.is_error() {
                            conn.peer_closing = true;
                        }
                        // Skip what cannot make progress: a writable edge with nothing to
                        // flush, or a readable edge while the echo is stuck (it is not read
                        // before the writable edge comes anyway).
                        let useless = if !conn.output_pending() {
                            event.is_writable() && !event.is_readable() && !conn.peer_closing
                        } else {
                            !event.is_writable() && !conn.peer_closing
                        };
                        if !useless {
                            self.drive(key, now);
                        }
                    }
                }
            }
            if self.tls.as_ref().is_some_and(|tls| !tls.queued.is_empty()) {
                self.admit_queued_handshakes();
            }
            std::mem::swap(&mut deferred, &mut self.deferred);
            for key in deferred.drain(..) {
                self.drive(key, now);
            }

            // The event wakes the worker; the flag (one load) is what decides.
            if self.drain_deadline.is_none() && self.shutdown.is_triggered() {
                self.begin_shutdown(now);
            }
            if self.accept_ready && self.drain_deadline.is_none() {
                self.accept_batch(now)?;
            }
            if let (Some(period), Some(due)) = (self.sweep_every, self.next_sweep) {
                if now >= due {
                    self.sweep(now);
                    self.next_sweep = Some(now + period);
                }
            }
            if let Some(deadline) = self.drain_deadline {
                if self.connections.is_empty() {
                    return Ok(());
                }
                if now >= deadline {
                    self.lifecycle.log_deadline(self.connections.len());
                    self.close_all();
                    return Ok(());
                }
            }
        }
    }

    /// How long the next `epoll_wait` may sleep: until the soonest timer, or not at all if
    /// there is work left over.
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.deferred.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut wake_at: Option<Instant> = None;
        let mut wake_by = |at: Instant| wake_at = Some(wake_at.map_or(at, |t| t.min(at)));
        if self.accept_ready && self.drain_deadline.is_none() {
            match self.accept_paused_until {
                Some(at) => wake_by(at),
                None if self.limit.has_room() => return Some(Duration::ZERO),
                None => wake_by(now + FULL_RETRY),
            }
        }
        if let Some(at) = self.next_sweep {
            wake_by(at);
        }
        if self.tls.as_ref().is_some_and(|tls| !tls.queued.is_empty()) {
            wake_by(now + HANDSHAKE_RETRY);
        }
        if let Some(at) = self.drain_deadline {
            wake_by(at);
        }
        wake_at.map(|at| at.saturating_duration_since(now))
    }

    fn drive(&mut self, key: usize, now: Instant) {
        // A stale key (a deferred connection closed since) has no connection: nothing to do.
        let Some(conn) = self.connections.get_mut(key) else {
            return;
        };
        let next = conn.drive(
            &mut self.buffer,
            &mut self.scratch,
            &mut self.pipes,
            now,
            self.lifecycle,
        );
        if let Some(tls) = conn.tls.as_deref_mut() {
            if matches!(tls.handshake, Handshake::Running { .. }) && !tls.session.is_handshaking() {
                // Its permit goes back: a waiting connection may take it.
                tls.handshake = Handshake::Done;
                if let Peer::Admitted(admitted) = &conn.peer {
                    self.lifecycle.handshake_completed(admitted.peer);
                }
                self.admit_queued_handshakes();
            }
        }
        match next {
            Next::Wait => {}
            Next::Defer => self.deferred.push(key),
            Next::Close(end) => self.close(key, end),
            Next::Drop => self.drop_refused(key),
        }
    }

    /// Accepts up to a batch of connections from the listeners, within the limits.
    fn accept_batch(&mut self, now: Instant) -> crate::Result<()> {
        if let Some(until) = self.accept_paused_until {
            if now < until {
                return Ok(());
            }
            self.accept_paused_until = None;
        }
        let mut accepted = 0;
        for index in 0..self.listeners.len() {
            loop {
                if accepted == ACCEPT_BUDGET {
                    return Ok(());
                }
                let Some(permit) = self.limit.try_acquire() else {
                    // Still ready: the next turn (or the retry timer) comes back here.
                    return Ok(());
                };
                match self.listeners[index].accept() {
                    Ok((stream, peer)) => {
                        accepted += 1;
                        self.admit(stream, peer, index, permit, now);
                    }
                    Err(e) => match self.lifecycle.accept_error(&e) {
                        AcceptError::WouldBlock | AcceptError::Closed => break,
                        AcceptError::Retry => continue,
                        AcceptError::Exhausted => {
                            self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                            return Ok(());
                        }
                        AcceptError::Fatal => {
                            return Err(crate::Error::io("accept failed", e));
                        }
                    },
                }
            }
        }
        // Every listener said WouldBlock: wait for the next edge.
        self.accept_ready = false;
        Ok(())
    }

    /// Takes an accepted connection (its slot already reserved) into this worker, if the
    /// lifecycle admits it.
    fn admit(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        listener: usize,
        permit: Permit,
        now: Instant,
    ) {
        let kind = self.kinds[listener];
        self.lifecycle.configure(&stream, peer);
        // Dropping a refused stream closes it without an echo; dropping the permit frees its
        // slot.
        let peer_state = if kind.expects_proxy_header() {
            if self.lifecycle.check_proxy_peer(peer).is_err() {
                return;
            }
            Peer::AwaitingHeader(Box::new(AwaitingHeader {
                proxy: peer,
                listener,
                reader: HeaderReader::new(),
                deadline: now + self.lifecycle.proxy_timeout(),
            }))
        } else {
            match self.lifecycle.admit(listener, peer) {
                Ok(admitted) => Peer::Admitted(admitted),
                Err(_) => return,
            }
        };
        let key = self.connections.vacant_key();
        let tls = if kind.is_tls() {
            match self.start_tls(key, now) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    tracing::warn!(%peer, "cannot start a TLS session: {e}; closed it");
                    if let Peer::Admitted(admitted) = peer_state {
                        self.lifecycle.close(admitted, 0, &End::Failed(e));
                    }
                    return;
                }
            }
        } else {
            None
        };
        // Registered once for both directions and never changed: edges cost no epoll_ctl.
        // Data that arrived before this registration is reported by it.
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(key), interest)
        {
            tracing::warn!(%peer, "cannot watch a new connection: {e}; closed it");
            if let Peer::Admitted(admitted) = peer_state {
                self.lifecycle.close(admitted, 0, &End::Failed(e));
            }
            if tls.is_some_and(|tls| matches!(tls.handshake, Handshake::Running { .. })) {
                // Its permit went back with it.
                self.admit_queued_handshakes();
            }
            return;
        }
        self.connections.insert(Connection {
            stream,
            peer: peer_state,
            permit,
            last_active: now,
            bytes: 0,
            backlog: None,
            peer_closing: false,
            tls,
            splicing: false,
            splice: None,
        });
    }

    /// A TLS session for the connection about to take slab entry `key`, with a handshake
    /// permit if the cap has room, else queued for one (unread, its timeout running).
    fn start_tls(&mut self, key: usize, now: Instant) -> io::Result<Box<TlsConn>> {
        let Some(tls) = self.tls.as_mut() else {
            return Err(io::Error::other("the server has no TLS configuration"));
        };
        let session = TlsSession::new(Arc::clone(tls.server.config())).map_err(io::Error::other)?;
        let deadline = now + tls.server.handshake_timeout();
        // Behind connections already waiting: first come, first served.
        let permit = match tls.queued.is_empty() {
            true => tls.server.handshakes().try_acquire(),
            false => None,
        };
        let handshake = match permit {
            Some(permit) => Handshake::Running {
                deadline,
                _permit: permit,
            },
            None => {
                tls.queued.push_back(key);
                Handshake::Queued { deadline }
            }
        };
        Ok(Box::new(TlsConn {
            session,
            handshake,
            timeout: tls.server.handshake_timeout(),
        }))
    }

    /// Gives handshake permits, while the cap has room, to this worker's connections that
    /// have waited longest; they are driven at once.
    fn admit_queued_handshakes(&mut self) {
        let Some(tls) = self.tls.as_mut() else {
            return;
        };
        while let Some(&key) = tls.queued.front() {
            let waiting = self
                .connections
                .get_mut(key)
                .and_then(|conn| conn.tls.as_deref_mut())
                .filter(|waiting| matches!(waiting.handshake, Handshake::Queued { .. }));
            let Some(waiting) = waiting else {
                tls.queued.pop_front(); // closed, or its slab entry reused since
                continue;
            };
            let Some(permit) = tls.server.handshakes().try_acquire() else {
                return;
            };
            tls.queued.pop_front();
            let deadline = waiting.handshake.deadline().expect("queued");
            waiting.handshake = Handshake::Running {
                deadline,
                _permit: permit,
            };
            self.deferred.push(key);
        }
    }

    /// Closes a connection, logs it and frees its slot.
    fn close(&mut self, key: usize, end: End) {
        let tls = self.connections[key].tls.is_some();
        let (spliced, waits) = self.connections[key]
            .splice
            .as_ref()
            .map_or((0, 0), |state| (state.spliced, state.pipe_waits));
        let (peer, bytes) = self.remove(key);
        match peer {
            Peer::Admitted(admitted) => {
                if spliced > 0 {
                    tracing::debug!(peer = %admitted.peer, spliced, waits, "connection spliced");
                }
                if tls {
                    // A TLS session's plaintext is counted when it ends; plain echo counts as
                    // the bytes flow.
                    self.lifecycle.echoed(bytes as usize);
                }
                self.lifecycle.close(admitted, bytes, &end)
            }
            Peer::AwaitingHeader(waiting) => self.lifecycle.refuse_because(
                waiting.proxy,
                Refusal::ProxyHeader,
                Some(&format_args!("{end} before the PROXY header")),
            ),
        }
    }

    /// Drops a connection refused before it was admitted (already counted and logged).
    fn drop_refused(&mut self, key: usize) {
        self.remove(key);
    }

    /// Takes a connection out: its socket closes and its slot is free. Returns who it was for
    /// and the bytes it echoed.
    fn remove(&mut self, key: usize) -> (Peer, u64) {
        let conn = self.connections.remove(key);
        let bytes = conn.echoed();
        let Connection {
            stream,
            peer,
            permit,
            tls,
            splice,
            ..
        } = conn;
        if let Some(pipe) = splice.and_then(|state| state.pipe) {
            // Echo the client never took: the pool closes the pipe with it.
            self.pipes.give_back(pipe);
        }
        if tls.is_some_and(|tls| matches!(tls.handshake, Handshake::Running { .. })) {
            // The permit went back with it.
            self.admit_queued_handshakes();
        }
        // Dropping the stream closes the socket, which also removes it from epoll (it is
        // never duplicated), so no deregister call is needed.
        drop(stream);
        if permit.release() && self.drain_deadline.is_none() {
            // The server was full: this worker takes the next waiting client right away.
            self.accept_ready = true;
        }
        (peer, bytes)
    }

    /// Closes idle connections, those whose PROXY header is late and those whose TLS
    /// handshake is.
    fn sweep(&mut self, now: Instant) {
        let idle = self.config.idle_timeout;
        let expired: Vec<(usize, Expired)> = self
            .connections
            .iter()
            .filter_map(|(key, conn)| match &conn.peer {
                Peer::AwaitingHeader(waiting) => {
                    (now >= waiting.deadline).then_some((key, Expired::Header))
                }
                Peer::Admitted(_) => {
                    if let Some(deadline) = conn.handshake_deadline() {
                        (now >= deadline).then_some((key, Expired::Handshake))
                    } else {
                        idle.is_some_and(|idle| {
                            now.saturating_duration_since(conn.last_active) >= idle
                        })
                        .then_some((key, Expired::Idle))
                    }
                }
            })
            .collect();
        for (key, expired) in expired {
            if expired == Expired::Handshake {
                let Some(tls) = self.connections[key].tls.as_deref_mut() else {
                    continue;
                };
                let waiting = matches!(tls.handshake, Handshake::Queued { .. });
                tls.session.handshake_timed_out(waiting);
                let end = tls_end(&mut tls.session);
                self.close(key, end);
            } else if expired == Expired::Header {
                if let (Peer::AwaitingHeader(waiting), _) = self.remove(key) {
                    self.lifecycle.refuse_because(
                        waiting.proxy,
                        Refusal::ProxyHeader,
                        Some(&waiting.reader.timed_out()),
                    );
                }
            } else {
                self.close(key, End::IdleTimeout);
            }
        }
    }

    /// Closes every connection (shutdown deadline or a server error).
    fn close_all(&mut self) {
        let keys: Vec<usize> = self.connections.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(key, End::Shutdown);
        }
    }

    /// Stops accepting; live connections go on until they finish or the deadline.
    fn begin_shutdown(&mut self, now: Instant) {
        for listener in &mut self.listeners {
            let _ = self.poll.registry().deregister(listener);
        }
        self.accept_ready = false;
        self.accept_paused_until = None;
        self.drain_deadline = Some(now + self.config.shutdown_timeout);
        self.lifecycle
            .log_draining(self.limit.live(), self.config.shutdown_timeout);
        tracing::debug!(live = self.connections.len(), "epoll worker draining");
    }
}

/// What the sweep found late.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expired {
    Header,
    Handshake,
    Idle,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_tokens_stay_clear_of_connections_and_shutdown() {
        assert_ne!(listener_token(0), SHUTDOWN);
        assert_ne!(listener_token(0), HANDSHAKE_ROOM);
        assert!(listener_token(1).0 < listener_token(0).0);
        assert!(listener_token(16).0 > 1 << 40);
    }

    /// An idle connection is its slab entry: what the 10,000-idle-connections figure in
    /// BENCHMARKS.md is made of.
    #[test]
    fn an_idle_connection_stays_small() {
        let entry = std::mem::size_of::<Connection>();
        // mio's sockets carry a selector id in debug builds (its registration checks).
        let bound = if cfg!(debug_assertions) { 160 } else { 144 };
        assert!(entry <= bound, "Connection is {entry} bytes");
    }
}
