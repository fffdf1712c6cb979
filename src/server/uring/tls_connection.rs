//! One TLS connection's echo as a sans-I/O state machine, beside the plain one
//! ([`super::connection`]): the worker feeds it the same completions and carries out the same
//! [`Action`]s, so the ring, the buffer pool and the token scheme are shared.
//!
//! What differs from plain echo: the echo is not the received bytes, so nothing is sent from
//! the pool. Each received buffer is handed to the connection's [`TlsSession`] (which processes
//! it or copies what it cannot take yet) and given back in the same step, so a TLS connection
//! never holds a pool buffer between completions. Ciphertext goes out from the connection's own
//! buffer (`out`), filled from rustls's queue whenever no send is in flight; the kernel reads it
//! while the send is in flight, and nothing touches it until that send completes.
//!
//! Backpressure, plain echo's rule: the recv is armed only while the session wants input (no
//! echo pending, no output queued beyond what `out` holds in flight) and cancelled as soon as it
//! does not. What one armed recv may still bring is bounded by [`super::RECV_LIMIT`], and the
//! session holds it. So a client that does not read costs `out` (at most what rustls had queued:
//! [`crate::tls::session::OUTPUT_LIMIT`] plus a record) and the session's own bound; an idle
//! connection holds no buffer of ours (`out` is freed once sent).
//!
//! Handshakes: a connection starts [`Handshake::Queued`] when the server's handshake cap is
//! full: nothing is armed for it until [`TlsConnection::begin_handshake`]. Either way the
//! worker's sweep ([`TlsConnection::sweep`]) ends it if its handshake is not done by the
//! deadline.
//!
//! `tls+proxy://`: a connection from a trusted proxy starts with a PROXY header phase (once it
//! may handshake): its receives go to the lifecycle's sans-I/O [`HeaderReader`], each buffer
//! back at once. When the header is complete and its client admitted, the rest of that buffer
//! goes to the session and the handshake timeout starts again; a bad, truncated or late header
//! closes the connection with the header's reason, as on a `tcp+proxy://` listener.

use std::io;
use std::mem;
use std::time::{Duration, Instant};

use super::buffers::Buffers;
use super::connection::{Action, Ended, RecvFailure, RecvResult, RecvState, ServerEnd};
use crate::server::conn::proxy::{HeaderError, HeaderReader, ProxyHeader};
use crate::server::conn::End;
use crate::tls::session::{Outcome, TlsSession, OUTPUT_LIMIT};

/// Where a connection's handshake stands, for the server's handshake cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// Waiting for a permit: not read at all yet.
    Queued { deadline: Instant },
    /// Holding a permit.
    Running { deadline: Instant },
    /// Completed, or the connection is ending; the permit was given back.
    Done,
}

impl Handshake {
    fn deadline_mut(&mut self) -> Option<&mut Instant> {
        match self {
            Handshake::Queued { deadline } | Handshake::Running { deadline } => Some(deadline),
            Handshake::Done => None,
        }
    }
}

/// A `tls+proxy://` connection's PROXY header as far as it has arrived, and its deadline.
#[derive(Debug)]
struct AwaitingHeader {
    reader: HeaderReader,
    deadline: Instant,
}

#[derive(Debug)]
enum Phase {
    /// Reading the PROXY header (`tls+proxy://`); nothing goes to the session yet.
    Header(Box<AwaitingHeader>),
    /// Handshaking, echoing, or sending the last of it (the session may be finished).
    Serving,
    /// Closing, for this reason: nothing more goes out; closes once nothing is in flight.
    Ending(Ended),
    /// [`Action::Close`] was returned.
    Closed,
}

#[derive(Debug)]
pub struct TlsConnection {
    phase: Phase,
    session: TlsSession,
    recv: RecvState,
    /// Ciphertext being sent; `out[sent..]` is in flight while `sending`.
    out: Vec<u8>,
    sent: usize,
    sending: bool,
    handshake: Handshake,
    /// The handshake timeout, which starts again once a PROXY header admits the client.
    handshake_timeout: Duration,
    last_active: Instant,
}

impl TlsConnection {
    /// A connection that was just admitted (or, with `header_deadline`, one from a trusted
    /// proxy that must send its PROXY header by then), its handshake due within `timeout`;
    /// `permit`: whether it holds a handshake permit (else it waits, queued). Returns its
    /// first actions in `out`.
    pub fn start(
        session: TlsSession,
        now: Instant,
        timeout: Duration,
        header_deadline: Option<Instant>,
        permit: bool,
        scratch: &mut [u8],
        out: &mut Vec<Action>,
    ) -> TlsConnection {
        let deadline = now + timeout;
        let phase = match header_deadline {
            Some(deadline) => Phase::Header(Box::new(AwaitingHeader {
                reader: HeaderReader::new(),
                deadline,
            })),
            None => Phase::Serving,
        };
        let mut connection = TlsConnection {
            phase,
            session,
            recv: RecvState::Idle,
            out: Vec::new(),
            sent: 0,
            sending: false,
            handshake: if permit {
                Handshake::Running { deadline }
            } else {
                Handshake::Queued { deadline }
            },
            handshake_timeout: timeout,
            last_active: now,
        };
        connection.advance(scratch, out);
        connection
    }

    /// A queued connection got a handshake permit: it starts reading. False (and the permit
    /// is not needed) if it was not waiting for one.
    pub fn begin_handshake(&mut self, scratch: &mut [u8], out: &mut Vec<Action>) -> bool {
        if !self.is_queued() {
            return false;
        }
        let Handshake::Queued { deadline } = self.handshake else {
            return false;
        };
        self.handshake = Handshake::Running { deadline };
        self.advance(scratch, out);
        true
    }

    /// Whether the connection just gave its handshake permit back (its handshake completed,
    /// or it is ending); true once.
    pub fn handshake_permit_freed(&mut self) -> bool {
        if !matches!(self.handshake, Handshake::Running { .. }) {
            return false;
        }
        let ending = !self.is_open() || self.session.finished().is_some();
        if self.session.is_handshaking() && !ending {
            return false;
        }
        self.handshake = Handshake::Done;
        true
    }

    /// Whether it waits for a handshake permit.
    pub fn is_queued(&self) -> bool {
        matches!(self.handshake, Handshake::Queued { .. }) && self.is_open()
    }

    /// Whether the handshake completed (not failed).
    pub fn handshake_done(&self) -> bool {
        !self.session.is_handshaking()
    }

    /// When the handshake must be done, while it is not.
    pub fn handshake_deadline(&self) -> Option<Instant> {
        match self.handshake {
            Handshake::Queued { deadline } | Handshake::Running { deadline } => {
                self.is_open().then_some(deadline)
            }
            Handshake::Done => None,
        }
    }

    /// Plaintext bytes echoed so far.
    pub fn bytes(&self) -> u64 {
        self.session.echoed()
    }

    /// When data last moved; `None` once closing or still handshaking (the handshake has its
    /// own deadline, and so has a PROXY header).
    pub fn active_at(&self) -> Option<Instant> {
        (matches!(self.phase, Phase::Serving) && self.handshake == Handshake::Done)
            .then_some(self.last_active)
    }

    /// Whether the kernel still has an operation of this connection.
    pub fn in_flight(&self) -> bool {
        matches!(self.recv, RecvState::Armed | RecvState::Cancelling) || self.sending
    }

    /// What [`Action::SendOwn`] sends.
    pub fn own_unsent(&self) -> &[u8] {
        if self.sending {
            &self.out[self.sent..]
        } else {
            &[]
        }
    }

    /// How the connection ended, once [`Action::Close`] was returned.
    pub fn take_end(&mut self) -> Ended {
        match mem::replace(&mut self.phase, Phase::Closed) {
            Phase::Ending(ended) => ended,
            Phase::Header(_) | Phase::Serving | Phase::Closed => Ended::End(
                self.session
                    .take_outcome()
                    .map_or(End::ClientClosed, End::from),
            ),
        }
    }

    /// A recv completed: its bytes go to the PROXY header reader or the session, and its
    /// buffer straight back. `admit` is called once, on a `tls+proxy://` connection, when
    /// the header is complete: whether the client it names is served.
    #[allow(clippy::too_many_arguments)]
    pub fn received(
        &mut self,
        recv: RecvResult,
        multishot: bool,
        buffers: &impl Buffers,
        scratch: &mut [u8],
        now: Instant,
        out: &mut Vec<Action>,
        admit: impl FnOnce(&ProxyHeader) -> bool,
    ) {
        if matches!(self.phase, Phase::Closed) {
            out.extend(recv.bid.map(Action::GiveBack));
            return;
        }
        if !recv.more {
            self.recv = RecvState::Idle;
        }
        match (recv.result, recv.bid) {
            (n, Some(bid)) if n > 0 => {
                self.last_active = now;
                // Copied (or processed) out of the pool buffer before it goes back.
                let data = &buffers.bytes(bid)[..n as usize];
                match self.phase {
                    Phase::Header(_) => self.header_arrived(data, scratch, now, admit),
                    Phase::Serving => self.session.receive(data, scratch),
                    Phase::Ending(_) | Phase::Closed => {}
                }
                out.push(Action::GiveBack(bid));
            }
            (0, bid) => {
                out.extend(bid.map(Action::GiveBack));
                match &self.phase {
                    Phase::Header(waiting) => {
                        let truncated = waiting.reader.end_of_stream();
                        self.phase = Phase::Ending(Ended::Header(truncated));
                    }
                    _ => self.session.eof(),
                }
            }
            (e, bid) => match RecvFailure::of(e, bid, multishot, recv.more) {
                RecvFailure::MultishotUnsupported => out.push(Action::UseSingleRecv),
                RecvFailure::OutOfBuffers => {
                    if self.is_open() {
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
        self.advance(scratch, out);
    }

    /// Bytes arrived during the PROXY header phase. Once the header is complete and its client
    /// admitted, what followed it goes to the session and the handshake's time starts again.
    fn header_arrived(
        &mut self,
        data: &[u8],
        scratch: &mut [u8],
        now: Instant,
        admit: impl FnOnce(&ProxyHeader) -> bool,
    ) {
        let Phase::Header(waiting) = &mut self.phase else {
            return;
        };
        match waiting.reader.feed(data) {
            Ok(None) => {}
            Ok(Some((header, rest))) => {
                if !admit(&header) {
                    self.phase = Phase::Ending(Ended::Refused);
                    return;
                }
                self.phase = Phase::Serving;
                if let Some(deadline) = self.handshake.deadline_mut() {
                    *deadline = now + self.handshake_timeout;
                }
                self.session.receive(rest, scratch);
            }
            Err(e) => self.phase = Phase::Ending(Ended::Header(e)),
        }
    }

    /// A send of `out` completed.
    pub fn sent(&mut self, result: i32, scratch: &mut [u8], now: Instant, out: &mut Vec<Action>) {
        if !self.sending {
            return;
        }
        self.sending = false;
        let serving = matches!(self.phase, Phase::Serving);
        if result == -libc::EINTR || result == -libc::EAGAIN {
            if serving {
                self.sending = true;
                out.push(Action::SendOwn);
                return;
            }
        } else if result > 0 {
            self.sent += result as usize;
            self.last_active = now;
            if self.sent < self.out.len() && serving {
                self.sending = true;
                out.push(Action::SendOwn);
                return;
            }
        } else {
            self.fail(if result < 0 {
                io::Error::from_raw_os_error(-result)
            } else {
                io::Error::from(io::ErrorKind::WriteZero)
            });
        }
        // All out (or nothing more goes): the memory goes, so an idle connection holds none.
        self.out = Vec::new();
        self.sent = 0;
        self.advance(scratch, out);
    }

    /// A pool buffer is free again after [`Action::WaitForBuffer`]; whether this connection
    /// was waiting for it.
    pub fn buffer_available(&mut self, scratch: &mut [u8], out: &mut Vec<Action>) -> bool {
        if self.recv != RecvState::WaitingForBuffer {
            return false;
        }
        self.recv = RecvState::Idle;
        self.advance(scratch, out);
        true
    }

    /// The server ends the connection (idle timeout, shutdown deadline).
    pub fn end(&mut self, why: ServerEnd, scratch: &mut [u8], out: &mut Vec<Action>) {
        if matches!(
            self.phase,
            Phase::Closed | Phase::Ending(Ended::End(End::IdleTimeout | End::Shutdown))
        ) {
            return;
        }
        self.phase = Phase::Ending(Ended::End(match why {
            ServerEnd::IdleTimeout => End::IdleTimeout,
            ServerEnd::Shutdown => End::Shutdown,
        }));
        if self.in_flight() {
            out.push(Action::ShutdownSocket);
        }
        self.advance(scratch, out);
    }

    /// The worker's periodic sweep: a PROXY header or a handshake not done by its deadline
    /// ends the connection with that reason; a served connection on which nothing moved for
    /// `idle` (the idle timeout, if any) is ended.
    pub fn sweep(
        &mut self,
        now: Instant,
        idle: Option<Duration>,
        scratch: &mut [u8],
        out: &mut Vec<Action>,
    ) {
        if let Phase::Header(waiting) = &self.phase {
            if now >= waiting.deadline {
                self.phase = Phase::Ending(Ended::Header(waiting.reader.timed_out()));
                self.advance(scratch, out);
            }
            return;
        }
        if self.handshake_deadline().is_some_and(|at| now >= at) {
            self.handshake_timed_out(scratch, out);
        } else if let (Some(idle), Some(at)) = (idle, self.active_at()) {
            if now.saturating_duration_since(at) >= idle {
                self.end(ServerEnd::IdleTimeout, scratch, out);
            }
        }
    }

    /// The handshake deadline passed: the connection ends with that reason.
    fn handshake_timed_out(&mut self, scratch: &mut [u8], out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Serving) {
            return;
        }
        let waiting = matches!(self.handshake, Handshake::Queued { .. });
        self.session.handshake_timed_out(waiting);
        self.finish_session();
        if self.in_flight() {
            // A send waiting for room completes only so.
            out.push(Action::ShutdownSocket);
        }
        self.advance(scratch, out);
    }

    /// Still reading its header or serving (not closing).
    fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Header(_) | Phase::Serving)
    }

    fn fail(&mut self, e: io::Error) {
        match self.phase {
            Phase::Serving => self.phase = Phase::Ending(Ended::End(End::Failed(e))),
            Phase::Header(_) => self.phase = Phase::Ending(Ended::Header(HeaderError::Io(e))),
            Phase::Ending(_) | Phase::Closed => {}
        }
    }

    /// The session finished without a clean close: the connection ends with its outcome.
    fn finish_session(&mut self) {
        if let Some(outcome) = self.session.take_outcome() {
            self.phase = Phase::Ending(Ended::End(End::from(outcome)));
        }
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

    fn arm_recv(&mut self, out: &mut Vec<Action>) {
        if self.recv == RecvState::Idle {
            self.recv = RecvState::Armed;
            out.push(Action::Recv);
        }
    }

    /// Moves the connection on: sends what the session queued, closes when it is done and
    /// nothing is in flight, and arms or cancels the recv as the session wants input or not.
    fn advance(&mut self, scratch: &mut [u8], out: &mut Vec<Action>) {
        match self.phase {
            Phase::Closed => return,
            Phase::Ending(_) => {
                self.close_when_idle(false, out);
                return;
            }
            Phase::Header(_) | Phase::Serving => {}
        }
        if matches!(self.handshake, Handshake::Queued { .. }) {
            return;
        }
        if matches!(self.phase, Phase::Header(_)) {
            // Nothing goes out before the header is complete: only read.
            self.arm_recv(out);
            return;
        }
        if !self.sending {
            // What rustls queued, and what taking it let the session process, up to about
            // one output limit's worth.
            while self.session.wants_write() && self.out.len() < OUTPUT_LIMIT {
                if self.session.write_tls(&mut self.out).is_err() {
                    break; // Writing to a Vec does not fail.
                }
                self.session.progress(scratch);
            }
            if !self.out.is_empty() {
                self.sending = true;
                self.sent = 0;
                out.push(Action::SendOwn);
            }
        }
        match self.session.finished() {
            None => {
                if self.session.wants_input() {
                    self.arm_recv(out);
                } else {
                    self.cancel_recv(out);
                }
            }
            Some(Outcome::Closed) => {
                // Our close_notify is queued or in flight: close once it is out.
                if !self.sending {
                    self.close_when_idle(true, out);
                } else {
                    self.cancel_recv(out);
                }
            }
            Some(_) => {
                // Truncated or failed: the alert (if any) is in flight; nothing more goes.
                self.finish_session();
                self.close_when_idle(false, out);
            }
        }
    }

    /// Cancels the recv, and closes once nothing is in flight.
    fn close_when_idle(&mut self, half_close: bool, out: &mut Vec<Action>) {
        self.cancel_recv(out);
        if !self.in_flight() {
            // The phase turns Closed in `take_end`, which the worker calls on Close.
            self.out = Vec::new();
            out.push(Action::Close { half_close });
        }
    }
}

#[cfg(test)]
mod tests;
