//! One connection's echo as a sans-I/O state machine: it does no I/O and knows no ring. The
//! worker feeds it completions (a recv, a send, a free buffer, the server's decision to end
//! it) and carries out the [`Action`]s it returns, in order.
//!
//! Its state is three enums: the [`Phase`] of the connection, what its receive side is doing
//! ([`RecvState`]) and what its send side is doing ([`SendState`]); every legal combination is
//! reached only through the methods below.
//!
//! # The shared pool and clients that do not read
//! Received data arrives in buffers of the worker's shared pool. An echo is first sent from
//! that buffer with "don't wait", so the send completes at once: whole (the buffer goes back),
//! or short or EAGAIN because the client is not reading. Then the echo is *stalled*: what is
//! left of it, and of anything queued behind it, is copied into the connection's own buffer,
//! every pool buffer is given back, and the rest is sent from the own buffer with a send that
//! waits for room. While stalled the connection is not read (backpressure), so a connection
//! whose client never reads holds no pool buffer at all, only its own buffer, which is bounded
//! by what one armed recv may take ([`super::RECV_LIMIT`]) plus the echo it interrupted.
//!
//! # Where the lifecycle hooks go
//! A connection on a plain listener is made after admission (the worker's single call site);
//! one on a `tcp+proxy://` listener is made after the trusted-proxy check and starts in the
//! *header phase* ([`Connection::start_awaiting_header`]): [`Connection::received`], the one
//! place that sees received bytes, feeds them to the sans-I/O [`HeaderReader`] and gives each
//! buffer back at once (the reader keeps a copy only of a header split over several
//! receives). When the header is complete the worker's admission decides on the client it names;
//! admitted, the client's first bytes (what came after the header in the same buffer) are
//! echoed straight from that pool buffer, from where the header ended. A bad or truncated
//! header, or one still incomplete at its deadline ([`Connection::sweep`]), closes the
//! connection without an echo. Every connection reports its end once, as [`Action::Close`],
//! and then [`Connection::take_end`] says how it ended ([`Ended`]).

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::time::{Duration, Instant};

use super::buffers::Buffers;
use crate::server::conn::proxy::{HeaderError, HeaderReader, ProxyHeader};
use crate::server::conn::End;

/// What the worker must do for a connection, in the order given.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Arm a recv (multishot or single, as the worker currently does them).
    Recv,
    /// Cancel the armed recv; its final completion follows.
    CancelRecv,
    /// Send `len` bytes of pool buffer `bid` from `offset`, without waiting for room.
    SendPool { bid: u16, offset: u32, len: u32 },
    /// Send [`Connection::own_unsent`], waiting for room.
    SendOwn,
    /// Give pool buffer `bid` back to the kernel.
    GiveBack(u16),
    /// The pool was empty: call [`Connection::buffer_available`] once there is a buffer.
    WaitForBuffer,
    /// The kernel refused a capped multishot recv: use single recvs from now on.
    UseSingleRecv,
    /// Shut the socket down both ways, so that pending operations complete.
    ShutdownSocket,
    /// Nothing is in flight any more: close the socket and record the end.
    /// `half_close`: shut our write side first (the client half-closed and has everything).
    Close { half_close: bool },
}

/// Why the server ended a connection (when it was not the client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerEnd {
    IdleTimeout,
    Shutdown,
}

/// Where the connection is in its life.
#[derive(Debug)]
pub enum Phase {
    /// On a `tcp+proxy://` listener: receiving the PROXY header; nothing is echoed yet.
    Header(Box<AwaitingHeader>),
    /// Receiving and echoing.
    Echoing,
    /// The client half-closed: echo what was received, then close.
    ClientDone,
    /// Closing: nothing more goes out; the connection closes once nothing is in flight.
    Ending(Ending),
    /// Closed: [`Action::Close`] was returned; the connection takes no more completions.
    Closed,
}

/// A connection's PROXY header as far as it has arrived, and when it must be complete.
#[derive(Debug)]
pub struct AwaitingHeader {
    reader: HeaderReader,
    deadline: Instant,
}

/// Why a connection is closing.
#[derive(Debug)]
pub enum Ending {
    Server(ServerEnd),
    Failed(io::Error),
    /// The PROXY header was bad, truncated, or late.
    Header(HeaderError),
    /// Admission refused the client the header named.
    Refused,
}

/// How a connection ended, once [`Action::Close`] was returned.
#[derive(Debug)]
pub enum Ended {
    /// It ended so: the close record of an admitted connection (for one still awaiting its
    /// PROXY header, the reason it never got one).
    End(End),
    /// Its PROXY header was bad, truncated, or late: the detail of its refusal.
    Header(HeaderError),
    /// Admission refused the client its header named (already counted and logged).
    Refused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvState {
    /// No recv in flight.
    Idle,
    /// A recv is in flight.
    Armed,
    /// A recv is in flight and its cancellation was submitted.
    Cancelling,
    /// The last recv found the pool empty; waiting for [`Connection::buffer_available`].
    WaitingForBuffer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendState {
    Idle,
    /// A send from pool buffer `bid` (`len` bytes received, `sent` of them out) is in flight.
    Pool {
        bid: u16,
        len: u32,
        sent: u32,
    },
    /// A send of the own buffer from `sent` is in flight.
    Own {
        sent: usize,
    },
}

/// What a recv completion that brought no bytes means (plain and TLS connections alike).
#[derive(Debug)]
pub enum RecvFailure {
    /// A kernel before 6.16: no byte limit for multishot recv. Without it a fast sender could
    /// take the whole pool in one turn, so use single recvs.
    MultishotUnsupported,
    /// The buffer pool was empty: wait for a buffer to come back.
    OutOfBuffers,
    /// Nothing to do (cancelled, interrupted, or a multishot recv that stays armed).
    Transient,
    /// The connection failed.
    Failed(io::Error),
}

impl RecvFailure {
    /// Classifies a recv result `e` (zero or a negated errno) that came with no data.
    pub fn of(e: i32, bid: Option<u16>, multishot: bool, more: bool) -> RecvFailure {
        match (e, bid) {
            (e, None) if e == -libc::EINVAL && multishot && !more => {
                RecvFailure::MultishotUnsupported
            }
            (e, None) if e == -libc::ENOBUFS && !more => RecvFailure::OutOfBuffers,
            (e, None)
                if e == -libc::ECANCELED
                    || e == -libc::EINTR
                    || e == -libc::EAGAIN
                    || e == -libc::ENOBUFS =>
            {
                RecvFailure::Transient
            }
            (e, _) if e < 0 => RecvFailure::Failed(io::Error::from_raw_os_error(-e)),
            _ => RecvFailure::Failed(io::Error::other("recv completed without a buffer")),
        }
    }
}

/// A completed recv, as the kernel reported it.
#[derive(Clone, Copy, Debug)]
pub struct RecvResult {
    /// Bytes received, or a negated errno.
    pub result: i32,
    /// The pool buffer holding them, if the kernel picked one.
    pub bid: Option<u16>,
    /// A multishot recv stays armed ("more" flag).
    pub more: bool,
}

#[derive(Debug)]
pub struct Connection {
    phase: Phase,
    recv: RecvState,
    send: SendState,
    /// Pool buffers received while a send from the pool was in flight, in order.
    queued: VecDeque<(u16, u32)>,
    /// The stalled echo being sent from our own memory; not touched while a send of it is in
    /// flight (the kernel reads it).
    own: Vec<u8>,
    /// What arrived while `own` is being sent; goes out after it.
    own_next: Vec<u8>,
    bytes: u64,
    last_active: Instant,
}

impl Connection {
    /// A connection that was just admitted; returns its first actions in `out`.
    pub fn start(now: Instant, out: &mut Vec<Action>) -> Connection {
        Connection::starting_in(Phase::Echoing, now, out)
    }

    /// A connection on a `tcp+proxy://` listener, from a trusted proxy: it reads the PROXY
    /// header, which must be complete by `deadline`, before anything is echoed.
    pub fn start_awaiting_header(
        now: Instant,
        deadline: Instant,
        out: &mut Vec<Action>,
    ) -> Connection {
        let header = AwaitingHeader {
            reader: HeaderReader::new(),
            deadline,
        };
        Connection::starting_in(Phase::Header(Box::new(header)), now, out)
    }

    fn starting_in(phase: Phase, now: Instant, out: &mut Vec<Action>) -> Connection {
        let mut connection = Connection {
            phase,
            recv: RecvState::Idle,
            send: SendState::Idle,
            queued: VecDeque::new(),
            own: Vec::new(),
            own_next: Vec::new(),
            bytes: 0,
            last_active: now,
        };
        connection.advance(out);
        connection
    }

    /// Bytes echoed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The worker's periodic sweep: a PROXY header still incomplete at its deadline closes
    /// the connection; an echoing connection on which nothing moved for `idle` (the idle
    /// timeout, if any) is ended.
    pub fn sweep(&mut self, now: Instant, idle: Option<Duration>, out: &mut Vec<Action>) {
        match &self.phase {
            Phase::Header(waiting) if now >= waiting.deadline => {
                self.phase = Phase::Ending(Ending::Header(waiting.reader.timed_out()));
                // Cancelling the recv completes it; then the connection closes.
                self.advance(out);
            }
            Phase::Echoing | Phase::ClientDone
                if idle.is_some_and(|idle| {
                    now.saturating_duration_since(self.last_active) >= idle
                }) =>
            {
                self.end(ServerEnd::IdleTimeout, out);
            }
            _ => {}
        }
    }

    /// Whether the kernel still has an operation of this connection (its socket must stay
    /// open and its slot reserved).
    pub fn in_flight(&self) -> bool {
        matches!(self.recv, RecvState::Armed | RecvState::Cancelling)
            || self.send != SendState::Idle
    }

    /// The part of the own buffer not yet sent (what [`Action::SendOwn`] sends).
    pub fn own_unsent(&self) -> &[u8] {
        match self.send {
            SendState::Own { sent } => &self.own[sent..],
            _ => &[],
        }
    }

    /// Bytes held in the connection's own buffers.
    #[cfg(test)]
    pub fn own_held(&self) -> usize {
        self.own.len() + self.own_next.len()
    }

    /// Pool buffers this connection holds (queued or being sent).
    pub fn pool_held(&self) -> usize {
        self.queued.len() + usize::from(matches!(self.send, SendState::Pool { .. }))
    }

    /// How the connection ended, once [`Action::Close`] was returned.
    pub fn take_end(&mut self) -> Ended {
        match mem::replace(&mut self.phase, Phase::Closed) {
            Phase::Ending(Ending::Server(ServerEnd::IdleTimeout)) => Ended::End(End::IdleTimeout),
            Phase::Ending(Ending::Server(ServerEnd::Shutdown)) => Ended::End(End::Shutdown),
            Phase::Ending(Ending::Failed(e)) => Ended::End(End::Failed(e)),
            Phase::Ending(Ending::Header(e)) => Ended::Header(e),
            Phase::Ending(Ending::Refused) => Ended::Refused,
            Phase::Header(_) | Phase::Echoing | Phase::ClientDone | Phase::Closed => {
                Ended::End(End::ClientClosed)
            }
        }
    }

    /// A recv completed. `multishot`: whether the worker arms multishot recvs. `admit` is
    /// called once, in the header phase, when the PROXY header is complete: whether the client
    /// it names is served (a refusal is the caller's to count and log). Returns how many of the
    /// client's bytes arrived (PROXY header bytes are not the client's), for the counters.
    pub fn received(
        &mut self,
        recv: RecvResult,
        multishot: bool,
        buffers: &impl Buffers,
        now: Instant,
        out: &mut Vec<Action>,
        admit: impl FnOnce(&ProxyHeader) -> bool,
    ) -> usize {
        if matches!(self.phase, Phase::Closed) {
            // Cannot happen (a slot is freed only with nothing in flight), but a buffer must
            // never be lost.
            out.extend(recv.bid.map(Action::GiveBack));
            return 0;
        }
        let mut payload = 0;
        if !recv.more {
            self.recv = RecvState::Idle;
        }
        match (recv.result, recv.bid) {
            (n, Some(bid)) if n > 0 => {
                self.last_active = now;
                if matches!(self.phase, Phase::Header(_)) {
                    payload = self.header_arrived(bid, n as u32, buffers, admit, out);
                } else {
                    payload = n as usize;
                    self.echo(bid, n as u32, buffers, out);
                }
            }
            (0, bid) => {
                out.extend(bid.map(Action::GiveBack));
                match &self.phase {
                    Phase::Echoing => self.phase = Phase::ClientDone,
                    Phase::Header(waiting) => {
                        let truncated = waiting.reader.end_of_stream();
                        self.phase = Phase::Ending(Ending::Header(truncated));
                    }
                    _ => {}
                }
            }
            (e, bid) => match RecvFailure::of(e, bid, multishot, recv.more) {
                RecvFailure::MultishotUnsupported => out.push(Action::UseSingleRecv),
                RecvFailure::OutOfBuffers => {
                    self.last_active = now;
                    if matches!(self.phase, Phase::Echoing | Phase::Header(_)) {
                        self.recv = RecvState::WaitingForBuffer;
                        out.push(Action::WaitForBuffer);
                    }
                }
                RecvFailure::Transient => {}
                RecvFailure::Failed(e) => {
                    out.extend(bid.map(Action::GiveBack));
                    self.fail(e);
                }
            },
        }
        self.advance(out);
        payload
    }

    /// `n` bytes arrived in pool buffer `bid` during the header phase: they go to the header
    /// reader. Once the header is complete and its client admitted, what followed it in this
    /// buffer is echoed from here; the buffer goes back at once otherwise. Returns how many
    /// of the bytes are the client's (after the header).
    fn header_arrived(
        &mut self,
        bid: u16,
        n: u32,
        buffers: &impl Buffers,
        admit: impl FnOnce(&ProxyHeader) -> bool,
        out: &mut Vec<Action>,
    ) -> usize {
        let Phase::Header(waiting) = &mut self.phase else {
            return 0;
        };
        // The leftover is always the end of the bytes just fed: where it starts is all we keep.
        let fed = waiting
            .reader
            .feed(&buffers.bytes(bid)[..n as usize])
            .map(|done| done.map(|(header, leftover)| (header, n - leftover.len() as u32)));
        match fed {
            Ok(None) => {
                out.push(Action::GiveBack(bid));
                0
            }
            Ok(Some((header, header_end))) => {
                if !admit(&header) {
                    out.push(Action::GiveBack(bid));
                    self.phase = Phase::Ending(Ending::Refused);
                    return 0;
                }
                self.phase = Phase::Echoing;
                if header_end < n {
                    // The client's first bytes came with the header (a proxy forwards them in
                    // the same segment when it can): echo them without a copy.
                    self.send = SendState::Pool {
                        bid,
                        len: n,
                        sent: header_end,
                    };
                    out.push(Action::SendPool {
                        bid,
                        offset: header_end,
                        len: n - header_end,
                    });
                } else {
                    out.push(Action::GiveBack(bid));
                }
                (n - header_end) as usize
            }
            Err(e) => {
                out.push(Action::GiveBack(bid));
                self.phase = Phase::Ending(Ending::Header(e));
                0
            }
        }
    }

    /// `n` bytes arrived in pool buffer `bid`: echo them, or queue them behind the echo in
    /// progress.
    fn echo(&mut self, bid: u16, n: u32, buffers: &impl Buffers, out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Echoing | Phase::ClientDone) {
            out.push(Action::GiveBack(bid));
            return;
        }
        match self.send {
            SendState::Idle if self.queued.is_empty() => {
                self.send = SendState::Pool {
                    bid,
                    len: n,
                    sent: 0,
                };
                out.push(Action::SendPool {
                    bid,
                    offset: 0,
                    len: n,
                });
                return;
            }
            SendState::Own { .. } => {
                // Stalled: keep the bytes, not the pool buffer.
                self.own_next
                    .extend_from_slice(&buffers.bytes(bid)[..n as usize]);
                out.push(Action::GiveBack(bid));
            }
            SendState::Idle | SendState::Pool { .. } => self.queued.push_back((bid, n)),
        }
        // The echo before it is still going out: stop reading until the client has taken
        // what it was sent.
        self.cancel_recv(out);
    }

    /// A send completed.
    pub fn sent(
        &mut self,
        result: i32,
        buffers: &impl Buffers,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if !self.is_echoing() {
            // Closing: whatever this send did, nothing more goes out.
            self.count_sent(result, now);
            if let SendState::Pool { bid, .. } = self.send {
                out.push(Action::GiveBack(bid));
            }
            self.send = SendState::Idle;
            self.advance(out);
            return;
        }
        match self.send {
            SendState::Idle => return,
            SendState::Pool { bid, len, sent } => {
                if result == -libc::EINTR {
                    self.resend(out);
                    return;
                }
                if result > 0 || result == -libc::EAGAIN {
                    let sent = sent + result.max(0) as u32;
                    self.count_sent(result, now);
                    if sent < len {
                        // The client is not taking its echo as fast as it sends.
                        self.stall(bid, sent, len, buffers, out);
                        return;
                    }
                    // Every byte of this buffer is out: only now may the kernel reuse it.
                    self.send = SendState::Idle;
                    out.push(Action::GiveBack(bid));
                } else {
                    self.send = SendState::Idle;
                    out.push(Action::GiveBack(bid));
                    self.fail(send_error(result));
                }
            }
            SendState::Own { sent } => {
                if result == -libc::EINTR || result == -libc::EAGAIN {
                    self.resend(out);
                    return;
                }
                if result > 0 {
                    let sent = sent + result as usize;
                    self.count_sent(result, now);
                    if sent < self.own.len() {
                        self.send = SendState::Own { sent };
                        out.push(Action::SendOwn);
                        return;
                    }
                    self.own.clear();
                    mem::swap(&mut self.own, &mut self.own_next);
                    if !self.own.is_empty() && self.is_echoing() {
                        self.send = SendState::Own { sent: 0 };
                        out.push(Action::SendOwn);
                        return;
                    }
                    // Caught up: the own memory goes, and the pool serves it again.
                    self.send = SendState::Idle;
                    self.own = Vec::new();
                    self.own_next = Vec::new();
                } else {
                    self.send = SendState::Idle;
                    self.fail(send_error(result));
                }
            }
        }
        self.advance(out);
    }

    /// The echo from pool buffer `bid` stopped at `sent` of `len`: copy the rest, and every
    /// queued buffer, into the own buffer, give the pool buffers back, and send from there.
    fn stall(
        &mut self,
        bid: u16,
        sent: u32,
        len: u32,
        buffers: &impl Buffers,
        out: &mut Vec<Action>,
    ) {
        debug_assert!(self.own.is_empty() && self.own_next.is_empty());
        self.own
            .extend_from_slice(&buffers.bytes(bid)[sent as usize..len as usize]);
        out.push(Action::GiveBack(bid));
        for (bid, n) in mem::take(&mut self.queued) {
            self.own
                .extend_from_slice(&buffers.bytes(bid)[..n as usize]);
            out.push(Action::GiveBack(bid));
        }
        self.send = SendState::Own { sent: 0 };
        out.push(Action::SendOwn);
        // An armed recv stays armed: what it brings is copied and stops it (see `echo`), so
        // a client that reads slowly costs no cancellation per short send.
    }

    fn resend(&mut self, out: &mut Vec<Action>) {
        match self.send {
            SendState::Pool { bid, len, sent } => out.push(Action::SendPool {
                bid,
                offset: sent,
                len: len - sent,
            }),
            SendState::Own { .. } => out.push(Action::SendOwn),
            SendState::Idle => {}
        }
    }

    fn count_sent(&mut self, result: i32, now: Instant) {
        if result > 0 {
            self.bytes += result as u64;
            self.last_active = now;
        }
    }

    /// A pool buffer is free again, after [`Action::WaitForBuffer`]; returns whether the
    /// connection was waiting for it (and so took it).
    pub fn buffer_available(&mut self, out: &mut Vec<Action>) -> bool {
        if self.recv != RecvState::WaitingForBuffer {
            return false;
        }
        self.recv = RecvState::Idle;
        self.advance(out);
        true
    }

    /// The server ends the connection (idle timeout, shutdown deadline).
    pub fn end(&mut self, why: ServerEnd, out: &mut Vec<Action>) {
        if !matches!(
            self.phase,
            Phase::Header(_)
                | Phase::Echoing
                | Phase::ClientDone
                | Phase::Ending(Ending::Failed(_))
        ) {
            return;
        }
        self.phase = Phase::Ending(Ending::Server(why));
        if self.in_flight() {
            out.push(Action::ShutdownSocket);
        }
        self.advance(out);
    }

    fn fail(&mut self, e: io::Error) {
        match self.phase {
            Phase::Echoing | Phase::ClientDone => self.phase = Phase::Ending(Ending::Failed(e)),
            Phase::Header(_) => self.phase = Phase::Ending(Ending::Header(HeaderError::Io(e))),
            Phase::Ending(_) | Phase::Closed => {}
        }
    }

    fn is_echoing(&self) -> bool {
        matches!(self.phase, Phase::Echoing | Phase::ClientDone)
    }

    fn cancel_recv(&mut self, out: &mut Vec<Action>) {
        match self.recv {
            RecvState::Armed => {
                self.recv = RecvState::Cancelling;
                out.push(Action::CancelRecv);
            }
            RecvState::WaitingForBuffer => self.recv = RecvState::Idle,
            RecvState::Idle | RecvState::Cancelling => {}
        }
    }

    /// Moves the connection on after a completion (or when it starts): closes it when it is
    /// done and nothing of it is in flight, echoes the next queued buffer, or arms its recv
    /// when it has nothing left to echo.
    fn advance(&mut self, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Closed => {}
            Phase::Header(_) => {
                // Nothing goes out before the header is complete: only read.
                if self.recv == RecvState::Idle {
                    self.recv = RecvState::Armed;
                    out.push(Action::Recv);
                }
            }
            Phase::Ending(_) => {
                // Nothing more goes out: the queued data is dropped.
                for (bid, _) in mem::take(&mut self.queued) {
                    out.push(Action::GiveBack(bid));
                }
                self.own_next.clear();
                self.cancel_recv(out);
                if !self.in_flight() {
                    self.own = Vec::new();
                    self.own_next = Vec::new();
                    out.push(Action::Close { half_close: false });
                }
            }
            Phase::Echoing | Phase::ClientDone => {
                if self.send != SendState::Idle {
                    return;
                }
                if let Some((bid, len)) = self.queued.pop_front() {
                    self.send = SendState::Pool { bid, len, sent: 0 };
                    out.push(Action::SendPool {
                        bid,
                        offset: 0,
                        len,
                    });
                    return;
                }
                if matches!(self.phase, Phase::ClientDone) {
                    if !self.in_flight() {
                        self.recv = RecvState::Idle;
                        out.push(Action::Close { half_close: true });
                    }
                    return;
                }
                if self.recv == RecvState::Idle {
                    self.recv = RecvState::Armed;
                    out.push(Action::Recv);
                }
            }
        }
    }
}

fn send_error(result: i32) -> io::Error {
    if result < 0 {
        io::Error::from_raw_os_error(-result)
    } else {
        io::Error::from(io::ErrorKind::WriteZero)
    }
}

#[cfg(test)]
mod tests;
