//! A TLS echo session without I/O, for the event-driven models (epoll, uring): ciphertext in,
//! the plaintext it carries echoed back as ciphertext out, over a [`rustls::ServerConnection`]
//! driven through its buffer API (`read_tls`, `process_new_packets`, `reader`, `writer`,
//! `write_tls`), as rustls's own mio server example drives it.
//!
//! The driver owns the socket. It hands the session what it received ([`TlsSession::receive`],
//! any amount: a session never refuses bytes, it holds what it cannot take yet), writes out what
//! the session has queued ([`TlsSession::wants_write`], [`TlsSession::write_tls`]) and then lets
//! it move on ([`TlsSession::progress`]), reports the TCP end of stream ([`TlsSession::eof`]),
//! and reads the socket again only while [`TlsSession::wants_input`] says so.
//!
//! # Backpressure and memory
//! Plain echo's rule holds: nothing more is read while an echo is pending. rustls's writer takes
//! plaintext only while its queue of unsent records is below [`OUTPUT_LIMIT`]; what it refuses
//! waits in the session (`echo`) and whatever ciphertext arrives meanwhile waits unprocessed
//! (`held`), and [`TlsSession::wants_input`] stays false until both are empty and every queued
//! record has been taken by the driver. So a client that does not read its echo costs at most:
//! the unsent records ([`OUTPUT_LIMIT`] plus one record), one record of plaintext refused by the
//! writer, rustls's receive buffers (one record of ciphertext and one of plaintext), and the
//! last read the driver handed over (the driver's read size). An idle session holds none of
//! that: the buffers it allocated are given back once empty.
//!
//! # Ends
//! The client's close_notify is the TLS half-close: everything received before it is echoed,
//! then our close_notify is queued and the session is finished ([`Outcome::Closed`]; the driver
//! sends what is queued, shuts its write side and closes). Bytes after the close_notify are
//! ignored (RFC 8446, 6.1). A TCP end of stream without close_notify is [`Outcome::Truncated`]
//! once the handshake is done, a handshake failure before. A rustls error (a plaintext client, a
//! bad certificate, no shared cipher, a forged record) ends the session with its reason
//! ([`Failure`]); rustls queues the alert for the client, which the driver sends if the socket
//! takes it at once.

use std::fmt;
use std::io::{self, Read, Write};
use std::mem;
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};

use crate::server::conn::End;
use crate::tls::HandshakeError;

/// The unsent ciphertext at which rustls's writer stops taking plaintext: the bound on echo
/// waiting for a client that does not read (rustls's own default, stated here because the
/// memory bound of a connection depends on it).
pub const OUTPUT_LIMIT: usize = 64 * 1024;

/// The size of the plaintext scratch buffer a driver lends a session: one TLS record's
/// plaintext, the most rustls decrypts at a time.
pub const SCRATCH_SIZE: usize = 16 * 1024;

/// Why a session failed.
#[derive(Debug)]
pub enum Failure {
    /// The handshake failed, classified (a plaintext client, an unknown CA, a missing or bad
    /// client certificate, no shared cipher, the client closing, the timeout...).
    Handshake(HandshakeError),
    /// After the handshake: the client sent something rustls rejects (a record that does not
    /// decrypt, a fatal alert).
    Protocol(rustls::Error),
    /// After the handshake: rustls refused the bytes themselves (a record beyond the size TLS
    /// allows).
    Input(io::Error),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Handshake(e) => e.fmt(f),
            Failure::Protocol(e) => write!(f, "TLS error: {e}"),
            Failure::Input(e) => write!(f, "TLS error: {e}"),
        }
    }
}

impl std::error::Error for Failure {}

/// How a session ended.
#[derive(Debug)]
pub enum Outcome {
    /// The client sent close_notify and got every byte before it back; our close_notify is
    /// queued.
    Closed,
    /// The TCP connection ended without close_notify, after the handshake.
    Truncated,
    /// The session failed; rustls may have queued an alert for the client.
    Failed(Failure),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Closed => f.write_str("client closed (close_notify)"),
            Outcome::Truncated => f.write_str("truncated: TCP closed without close_notify"),
            Outcome::Failed(failure) => failure.fmt(f),
        }
    }
}

impl From<Outcome> for End {
    fn from(outcome: Outcome) -> End {
        match outcome {
            Outcome::Closed => End::ClientClosed,
            Outcome::Truncated => End::Truncated,
            Outcome::Failed(Failure::Handshake(e)) => End::Handshake(e),
            Outcome::Failed(Failure::Protocol(e)) => End::Failed(io::Error::other(e)),
            Outcome::Failed(Failure::Input(e)) => End::Failed(e),
        }
    }
}

#[derive(Debug)]
enum Phase {
    /// Handshaking or echoing.
    Open,
    /// The client's close_notify arrived: echoing what came before it.
    PeerClosed,
    /// Nothing more will be read or echoed; what is queued is the last output.
    Done(Outcome),
}

/// One TLS connection's echo, without its socket.
pub struct TlsSession {
    conn: ServerConnection,
    phase: Phase,
    /// Plaintext the writer refused (its output queue was at [`OUTPUT_LIMIT`]), from
    /// `echo_sent` on.
    echo: Vec<u8>,
    echo_sent: usize,
    /// Ciphertext received while an echo was pending, not given to rustls yet, from `held_at`
    /// on.
    held: Vec<u8>,
    held_at: usize,
    /// Plaintext bytes handed to the writer: echoed (or queued to be).
    echoed: u64,
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("phase", &self.phase)
            .field("handshaking", &self.conn.is_handshaking())
            .field("echo", &(self.echo.len() - self.echo_sent))
            .field("held", &(self.held.len() - self.held_at))
            .field("echoed", &self.echoed)
            .finish()
    }
}

impl TlsSession {
    /// A session for a connection just accepted; it waits for the ClientHello.
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        let mut conn = ServerConnection::new(config)?;
        conn.set_buffer_limit(Some(OUTPUT_LIMIT));
        Ok(TlsSession {
            conn,
            phase: Phase::Open,
            echo: Vec::new(),
            echo_sent: 0,
            held: Vec::new(),
            held_at: 0,
            echoed: 0,
        })
    }

    /// Whether the handshake is still going on (true until it completes, and after it fails).
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Plaintext bytes echoed (handed to rustls to be sent back).
    pub fn echoed(&self) -> u64 {
        self.echoed
    }

    /// Whether the driver should read more from the socket: the session is open and has
    /// nothing pending, neither output nor input it could not take yet.
    pub fn wants_input(&self) -> bool {
        matches!(self.phase, Phase::Open)
            && self.echo.is_empty()
            && self.held.is_empty()
            && !self.conn.wants_write()
    }

    /// Whether ciphertext is queued for the client.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Writes queued ciphertext to `out` (one `write_vectored` call; a short write keeps the
    /// rest queued). Call [`TlsSession::progress`] after it.
    pub fn write_tls(&mut self, out: &mut dyn Write) -> io::Result<usize> {
        self.conn.write_tls(out)
    }

    /// How the session ended, once it has: the driver sends what is queued
    /// ([`TlsSession::wants_write`]) and closes.
    pub fn finished(&self) -> Option<&Outcome> {
        match &self.phase {
            Phase::Done(outcome) => Some(outcome),
            Phase::Open | Phase::PeerClosed => None,
        }
    }

    /// Takes the outcome out (for the connection's close record); `None` if not finished.
    pub fn take_outcome(&mut self) -> Option<Outcome> {
        match mem::replace(&mut self.phase, Phase::Done(Outcome::Closed)) {
            Phase::Done(outcome) => Some(outcome),
            phase => {
                self.phase = phase;
                None
            }
        }
    }

    /// Bytes waiting in the session's own buffers (not rustls's): plaintext the writer refused
    /// and ciphertext not yet processed.
    pub fn buffered(&self) -> usize {
        (self.echo.len() - self.echo_sent) + (self.held.len() - self.held_at)
    }

    /// Ciphertext received from the client. Processed at once as far as the echo allows; the
    /// rest is held (copied) until [`TlsSession::progress`] can take it, so the caller may
    /// reuse or give back its buffer right away. Ignored once the session no longer reads.
    pub fn receive(&mut self, mut data: &[u8], scratch: &mut [u8]) {
        if !matches!(self.phase, Phase::Open) || data.is_empty() {
            return;
        }
        if self.held.is_empty() && self.echo.is_empty() {
            self.feed(&mut data, scratch);
        }
        if !data.is_empty() && matches!(self.phase, Phase::Open) {
            self.held.extend_from_slice(data);
        }
    }

    /// Moves on after the driver took output: plaintext the writer refused goes in now, then
    /// what rustls has decrypted, then the ciphertext held back.
    pub fn progress(&mut self, scratch: &mut [u8]) {
        if matches!(self.phase, Phase::Done(_)) {
            return;
        }
        self.echo_plaintext(scratch);
        if !self.echo.is_empty() || self.held.is_empty() {
            return;
        }
        let held = mem::take(&mut self.held);
        let mut rest = &held[self.held_at..];
        self.feed(&mut rest, scratch);
        if rest.is_empty() || !matches!(self.phase, Phase::Open) {
            // Everything taken (or nothing more will be): the memory goes.
            self.held_at = 0;
        } else {
            self.held_at = held.len() - rest.len();
            self.held = held;
        }
    }

    /// The client's TCP stream ended. After its close_notify this changes nothing (the echo
    /// goes on); without one the session is finished: truncated, or a failed handshake.
    pub fn eof(&mut self) {
        if !matches!(self.phase, Phase::Open) {
            return;
        }
        self.held = Vec::new();
        self.held_at = 0;
        self.phase = Phase::Done(if self.conn.is_handshaking() {
            Outcome::Failed(Failure::Handshake(HandshakeError::client_closed()))
        } else {
            Outcome::Truncated
        });
    }

    /// Ends the session because its handshake took too long (the driver keeps the clock);
    /// `waiting`: it never got a handshake slot.
    pub fn handshake_timed_out(&mut self, waiting: bool) {
        if !matches!(self.phase, Phase::Done(_)) {
            let detail = match waiting {
                true => "waiting for a handshake slot",
                false => "the client went quiet mid-handshake",
            };
            self.phase = Phase::Done(Outcome::Failed(Failure::Handshake(
                HandshakeError::timeout(detail),
            )));
        }
    }

    /// Gives rustls ciphertext from `data` until it is used up, the echo stalls, or the
    /// session stops reading; `data` is left at what was not taken.
    fn feed(&mut self, data: &mut &[u8], scratch: &mut [u8]) {
        while !data.is_empty() && matches!(self.phase, Phase::Open) && self.echo.is_empty() {
            match self.conn.read_tls(data) {
                // Only after a close_notify (the slice is not empty): the rest is ignored.
                Ok(0) => *data = &[],
                Ok(_) => {}
                Err(e) => {
                    self.fail(if self.conn.is_handshaking() {
                        Failure::Handshake(HandshakeError::from_io(&e))
                    } else {
                        Failure::Input(e)
                    });
                    return;
                }
            }
            self.process(scratch);
        }
    }

    /// Decrypts what rustls has received and echoes the plaintext.
    fn process(&mut self, scratch: &mut [u8]) {
        match self.conn.process_new_packets() {
            Ok(state) => {
                if state.peer_has_closed() && matches!(self.phase, Phase::Open) {
                    self.phase = Phase::PeerClosed;
                }
            }
            Err(e) => {
                self.fail(if self.conn.is_handshaking() {
                    Failure::Handshake(HandshakeError::from_tls(&e))
                } else {
                    Failure::Protocol(e)
                });
                return;
            }
        }
        self.echo_plaintext(scratch);
    }

    /// Hands the plaintext rustls holds to its writer, keeping what it refuses; after the
    /// client's close_notify, once all of it is in, queues ours and finishes.
    fn echo_plaintext(&mut self, scratch: &mut [u8]) {
        if !self.echo.is_empty() {
            let accepted = self.write_plaintext_from_echo();
            self.echo_sent += accepted;
            if self.echo_sent < self.echo.len() {
                return;
            }
            self.echo = Vec::new();
            self.echo_sent = 0;
        }
        loop {
            let read = match self.conn.reader().read(scratch) {
                Ok(0) => break, // close_notify, and everything before it read
                Ok(n) => n,
                // WouldBlock: nothing decrypted is left. (UnexpectedEof cannot come: the
                // session never gives rustls an end of stream.)
                Err(_) => break,
            };
            let accepted = self.conn.writer().write(&scratch[..read]).unwrap_or(0);
            self.echoed += accepted as u64;
            if accepted < read {
                // The output queue is full: the rest waits, and nothing more is read.
                self.echo.extend_from_slice(&scratch[accepted..read]);
                return;
            }
        }
        if matches!(self.phase, Phase::PeerClosed) {
            self.conn.send_close_notify();
            self.phase = Phase::Done(Outcome::Closed);
        }
    }

    fn write_plaintext_from_echo(&mut self) -> usize {
        let accepted = self
            .conn
            .writer()
            .write(&self.echo[self.echo_sent..])
            .unwrap_or(0);
        self.echoed += accepted as u64;
        accepted
    }

    fn fail(&mut self, failure: Failure) {
        self.echo = Vec::new();
        self.echo_sent = 0;
        self.held = Vec::new();
        self.held_at = 0;
        self.phase = Phase::Done(Outcome::Failed(failure));
    }
}

#[cfg(test)]
pub(crate) mod tests;
