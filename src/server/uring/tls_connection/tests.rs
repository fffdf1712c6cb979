//! The TLS state machine without a ring: a small simulated kernel (a pool of provided buffers,
//! a recv and a send in flight, the socket's bytes in each direction) between it and a real
//! rustls client, checking every action against what the kernel would allow, and that every
//! pool buffer goes back exactly once, in the step that received it.

use std::collections::{BTreeSet, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConnection;

use super::*;
use crate::payload::{self, Rng};
use crate::server::conn::proxy::HeaderError;
use crate::server::uring::BUFFER_SIZE;
use crate::tls::session::tests::{server_config, tls13};
use crate::tls::session::{OUTPUT_LIMIT, SCRATCH_SIZE};

struct Pool {
    data: Vec<Vec<u8>>,
    free: VecDeque<u16>,
    held: BTreeSet<u16>,
}

impl Buffers for Pool {
    fn bytes(&self, bid: u16) -> &[u8] {
        assert!(self.held.contains(&bid), "read of buffer {bid}, not held");
        &self.data[usize::from(bid)]
    }
}

struct Sim {
    conn: TlsConnection,
    pool: Pool,
    scratch: Vec<u8>,
    client: ClientConnection,
    multishot: bool,
    recv_armed: bool,
    cancel_pending: bool,
    waiting: bool,
    /// The bytes of the send in flight.
    send: Option<Vec<u8>>,
    shut_down: bool,
    closed: Option<bool>,
    /// Client ciphertext in the server's socket, not received yet.
    to_server: Vec<u8>,
    /// The client's TCP end of stream follows `to_server`.
    client_eof: bool,
    /// Whether the client takes what the server sends.
    client_reads: bool,
    echoed: Vec<u8>,
    client_saw_close: bool,
    rng: Rng,
    now: Instant,
    /// What admission decides on the client a PROXY header names.
    admit: bool,
}

impl Sim {
    fn new(seed: u64, multishot: bool, slot: bool) -> Sim {
        Sim::with_header(seed, multishot, slot, None)
    }

    /// A simulation whose connection first reads a PROXY header due by `header_deadline`.
    fn with_header(
        seed: u64,
        multishot: bool,
        slot: bool,
        header_deadline: Option<Instant>,
    ) -> Sim {
        let now = Instant::now();
        let mut scratch = vec![0; SCRATCH_SIZE];
        let mut out = Vec::new();
        let session = TlsSession::new(server_config()).unwrap();
        let conn = TlsConnection::start(
            session,
            now,
            Duration::from_secs(10),
            header_deadline,
            slot,
            &mut scratch,
            &mut out,
        );
        let name = ServerName::try_from("localhost").unwrap();
        let mut sim = Sim {
            conn,
            pool: Pool {
                data: vec![vec![0; BUFFER_SIZE]; 8],
                free: (0..8).collect(),
                held: BTreeSet::new(),
            },
            scratch,
            client: ClientConnection::new(tls13(), name).unwrap(),
            multishot,
            recv_armed: false,
            cancel_pending: false,
            waiting: false,
            send: None,
            shut_down: false,
            closed: None,
            to_server: Vec::new(),
            client_eof: false,
            client_reads: true,
            echoed: Vec::new(),
            client_saw_close: false,
            rng: Rng::new(seed),
            now,
            admit: true,
        };
        sim.apply(out);
        sim
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            assert!(self.closed.is_none(), "{action:?} after Close");
            match action {
                Action::Recv => {
                    assert!(!self.recv_armed, "a second recv armed");
                    self.waiting = false;
                    self.recv_armed = true;
                    self.cancel_pending = false;
                }
                Action::CancelRecv => {
                    assert!(self.recv_armed, "cancel without a recv");
                    self.cancel_pending = true;
                }
                Action::SendPool { .. } => panic!("TLS echo sent from the pool"),
                Action::SendOwn => {
                    assert!(self.send.is_none(), "a second send in flight");
                    let bytes = self.conn.own_unsent().to_vec();
                    assert!(!bytes.is_empty(), "an empty send");
                    self.send = Some(bytes);
                }
                Action::GiveBack(bid) => {
                    assert!(self.pool.held.remove(&bid), "buffer {bid} given back twice");
                    self.pool.free.push_back(bid);
                }
                Action::WaitForBuffer => self.waiting = true,
                Action::UseSingleRecv => self.multishot = false,
                Action::ShutdownSocket => self.shut_down = true,
                Action::Close { half_close } => {
                    assert!(!self.conn.in_flight(), "closed with an operation in flight");
                    self.closed = Some(half_close);
                }
            }
        }
        assert!(
            self.pool.held.is_empty(),
            "a pool buffer kept past its completion"
        );
    }

    /// The client queues its output into the socket.
    fn client_sends(&mut self) {
        while self.client.wants_write() {
            self.client.write_tls(&mut self.to_server).unwrap();
        }
    }

    /// One thing the kernel does; false when nothing can happen.
    fn step(&mut self) -> bool {
        if self.closed.is_some() {
            return false;
        }
        let mut out = Vec::new();
        if self.cancel_pending {
            self.cancel_pending = false;
            self.recv_armed = false;
            let recv = RecvResult {
                result: -libc::ECANCELED,
                bid: None,
                more: false,
            };
            self.conn.received(
                recv,
                self.multishot,
                &self.pool,
                &mut self.scratch,
                self.now,
                &mut out,
                |_| self.admit,
            );
        } else if self.send.is_some() && (self.client_reads || self.shut_down) {
            let bytes = self.send.take().unwrap();
            let result = if self.shut_down {
                -libc::EPIPE
            } else {
                // The socket takes a random part of it.
                let n = self.rng.range(1, bytes.len() as u64) as usize;
                let mut rest = &bytes[..n];
                while !rest.is_empty() {
                    self.client.read_tls(&mut rest).unwrap();
                    self.client.process_new_packets().unwrap();
                    self.client_reads_plaintext();
                }
                n as i32
            };
            self.conn
                .sent(result, &mut self.scratch, self.now, &mut out);
        } else if self.recv_armed
            && (self.shut_down || self.client_eof && self.to_server.is_empty())
        {
            self.recv_armed = false;
            let recv = RecvResult {
                result: 0,
                bid: None,
                more: false,
            };
            self.conn.received(
                recv,
                self.multishot,
                &self.pool,
                &mut self.scratch,
                self.now,
                &mut out,
                |_| self.admit,
            );
        } else if self.recv_armed && !self.to_server.is_empty() {
            let more = self.multishot && self.rng.range(0, 1) == 1;
            let recv = match self.pool.free.pop_front() {
                Some(bid) => {
                    let n =
                        (self.rng.range(1, BUFFER_SIZE as u64) as usize).min(self.to_server.len());
                    self.pool.data[usize::from(bid)][..n].copy_from_slice(&self.to_server[..n]);
                    self.to_server.drain(..n);
                    self.pool.held.insert(bid);
                    RecvResult {
                        result: n as i32,
                        bid: Some(bid),
                        more,
                    }
                }
                None => RecvResult {
                    result: -libc::ENOBUFS,
                    bid: None,
                    more: false,
                },
            };
            if !recv.more {
                self.recv_armed = false;
            }
            self.conn.received(
                recv,
                self.multishot,
                &self.pool,
                &mut self.scratch,
                self.now,
                &mut out,
                |_| self.admit,
            );
        } else if self.waiting {
            self.waiting = false;
            self.conn.buffer_available(&mut self.scratch, &mut out);
        } else {
            return false;
        }
        self.apply(out);
        true
    }

    fn client_reads_plaintext(&mut self) {
        let mut buf = [0; 4096];
        loop {
            match self.client.reader().read(&mut buf) {
                Ok(0) => {
                    self.client_saw_close = true;
                    return;
                }
                Ok(n) => self.echoed.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => panic!("client read failed: {e}"),
            }
        }
    }

    /// Runs the kernel until nothing more can happen (bounded).
    fn settle(&mut self) {
        for _ in 0..1_000_000 {
            self.client_sends();
            if !self.step() {
                return;
            }
        }
        panic!("no rest: {:?}", self.conn);
    }

    fn handshake(&mut self) {
        self.settle();
        assert!(!self.client.is_handshaking(), "{:?}", self.conn);
        assert!(self.conn.handshake_permit_freed(), "the slot goes back");
    }

    /// The connection's close record (after [`Action::Close`]).
    fn end(&mut self) -> End {
        match self.conn.take_end() {
            Ended::End(end) => end,
            other => panic!("not an end of an admitted connection: {other:?}"),
        }
    }

    fn echo(&mut self, data: &[u8]) {
        let start = self.echoed.len();
        let mut written = 0;
        for _ in 0..1_000_000 {
            if written < data.len() {
                written += self.client.writer().write(&data[written..]).unwrap();
            }
            self.client_sends();
            if !self.step() && written == data.len() && !self.client.wants_write() {
                break;
            }
        }
        assert!(
            self.echoed[start..] == *data,
            "echo of {} bytes",
            data.len()
        );
    }
}

/// Payloads up to 1 MiB come back byte-exact through recvs of random sizes and short sends,
/// with multishot and single recvs, and every pool buffer goes back in its own step.
#[test]
fn payloads_are_echoed_byte_exact() {
    for multishot in [true, false] {
        let mut sim = Sim::new(11, multishot, true);
        sim.handshake();
        for (i, size) in [1, 1000, 16 * 1024 + 3, 200_000, 1 << 20]
            .into_iter()
            .enumerate()
        {
            sim.echo(&payload::bytes(i as u64, size));
        }
        assert!(sim.conn.active_at().is_some());
        assert!(sim.conn.out.is_empty() && sim.conn.out.capacity() == 0);
    }
}

/// A client that stops reading: its sends stay in flight, the recv is cancelled, and what the
/// connection holds stays bounded while the client keeps sending; once it reads again, all of
/// it comes back.
#[test]
fn a_client_that_does_not_read_is_not_read_either() {
    let mut sim = Sim::new(12, true, true);
    sim.handshake();
    sim.client_reads = false;
    let data = payload::bytes(12, 4 << 20);
    let mut written = 0;
    while written < data.len() {
        written += sim.client.writer().write(&data[written..]).unwrap();
        sim.client_sends();
    }
    sim.settle();
    assert!(!sim.recv_armed, "still reading a client that does not read");
    assert!(sim.send.is_some(), "the echo waits in flight");
    let held = sim.conn.out.len() + sim.conn.session.buffered();
    let bound = OUTPUT_LIMIT + 2 * SCRATCH_SIZE + 2 * BUFFER_SIZE + 1024;
    assert!(held <= bound, "{held} bytes held, bound {bound}");
    assert!(
        sim.to_server.len() > data.len() / 2,
        "most of it waits in the client's socket"
    );
    sim.client_reads = true;
    sim.settle();
    assert!(sim.echoed == data);
}

/// close_notify then the end of stream: everything echoed, our close_notify, then a
/// half-close.
#[test]
fn close_notify_closes_cleanly() {
    let mut sim = Sim::new(13, true, true);
    sim.handshake();
    let data = payload::bytes(13, 50_000);
    sim.client.writer().write_all(&data).unwrap();
    sim.client.send_close_notify();
    sim.client_sends();
    sim.client_eof = true;
    sim.settle();
    assert_eq!(sim.closed, Some(true), "{:?}", sim.conn);
    assert!(sim.echoed == data);
    assert!(sim.client_saw_close);
    assert!(matches!(sim.end(), End::ClientClosed));
}

/// The end of stream without close_notify ends the connection as truncated.
#[test]
fn end_of_stream_without_close_notify_is_truncated() {
    let mut sim = Sim::new(14, false, true);
    sim.handshake();
    sim.echo(b"hello");
    sim.client_eof = true;
    sim.settle();
    assert_eq!(sim.closed, Some(false));
    let end = sim.end().to_string();
    assert!(end.contains("truncated"), "{end}");
}

/// Plaintext to a TLS port: the handshake fails with the reason, and the connection closes.
#[test]
fn plaintext_fails_the_handshake() {
    let mut sim = Sim::new(15, true, true);
    sim.to_server
        .extend_from_slice(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    // The rustls client stays silent: only the plaintext is on the wire.
    for _ in 0..1000 {
        if !sim.step() {
            break;
        }
    }
    assert_eq!(sim.closed, Some(false));
    assert!(sim.conn.handshake_permit_freed());
    let end = sim.end().to_string();
    assert!(end.contains("TLS handshake failed"), "{end}");
}

/// A queued connection arms nothing until it gets a slot; a late handshake ends with its
/// reason, after its recv is cancelled.
#[test]
fn queued_connections_wait_and_late_handshakes_end() {
    let mut sim = Sim::new(16, true, false);
    assert!(!sim.recv_armed, "a queued connection is not read");
    assert!(sim.conn.handshake_deadline().is_some());
    let mut out = Vec::new();
    assert!(sim.conn.begin_handshake(&mut sim.scratch, &mut out));
    sim.apply(out);
    assert!(sim.recv_armed);
    let mut out = Vec::new();
    let late = sim.now + Duration::from_secs(11);
    sim.conn.sweep(late, None, &mut sim.scratch, &mut out);
    sim.apply(out);
    assert!(sim.shut_down && sim.cancel_pending);
    sim.settle();
    assert_eq!(sim.closed, Some(false));
    let end = sim.end();
    assert!(
        matches!(&end, End::Handshake(e) if e.reason == crate::tls::HandshakeFailure::Timeout),
        "{end}"
    );
}

const PROXY_HEADER: &[u8] = b"PROXY TCP4 192.0.2.1 198.51.100.1 5000 443\r\n";

/// tls+proxy: the PROXY header first, then the handshake, whose time starts again once the
/// header admitted the client; the echo goes on as on a plain TLS connection.
#[test]
fn a_proxy_header_comes_first_and_restarts_the_handshake_timeout() {
    let start = Instant::now();
    let mut sim = Sim::with_header(17, true, true, Some(start + Duration::from_secs(5)));
    assert!(sim.recv_armed, "the header is read");
    assert!(sim.conn.active_at().is_none());
    sim.now = start + Duration::from_secs(3);
    sim.to_server.extend_from_slice(PROXY_HEADER);
    sim.settle();
    assert_eq!(
        sim.conn.handshake_deadline(),
        Some(sim.now + Duration::from_secs(10)),
        "the handshake's time runs from the header"
    );
    sim.handshake();
    sim.echo(&payload::bytes(17, 100_000));
    assert_eq!(sim.conn.bytes(), 100_000);
}

/// The header and the ClientHello in one segment: the rest of that buffer goes to the session.
#[test]
fn what_follows_the_header_in_the_same_buffer_goes_to_the_session() {
    let start = Instant::now();
    let mut sim = Sim::with_header(18, false, true, Some(start + Duration::from_secs(5)));
    sim.to_server.extend_from_slice(PROXY_HEADER);
    sim.client_sends();
    // One recv takes all of it (the simulated recv takes a random amount up to a buffer).
    for _ in 0..10_000 {
        if !sim.client.is_handshaking() {
            break;
        }
        sim.client_sends();
        if !sim.step() {
            break;
        }
    }
    sim.handshake();
    sim.echo(b"after the header");
}

/// A bad header, a refused client and a late header each close the connection with their
/// reason, nothing handed to the session.
#[test]
fn bad_refused_and_late_headers_close_the_connection() {
    let start = Instant::now();
    let mut sim = Sim::with_header(19, true, true, Some(start + Duration::from_secs(5)));
    sim.to_server.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    sim.settle();
    assert_eq!(sim.closed, Some(false));
    assert!(matches!(
        sim.conn.take_end(),
        Ended::Header(HeaderError::NotProxy(_))
    ));

    let mut sim = Sim::with_header(20, true, true, Some(start + Duration::from_secs(5)));
    sim.admit = false;
    sim.to_server.extend_from_slice(PROXY_HEADER);
    sim.client_sends();
    sim.settle();
    assert_eq!(sim.closed, Some(false));
    assert!(matches!(sim.conn.take_end(), Ended::Refused));

    let mut sim = Sim::with_header(21, true, true, Some(start + Duration::from_secs(5)));
    sim.to_server.extend_from_slice(&PROXY_HEADER[..10]);
    // The rustls client stays silent: only part of a header is on the wire.
    while sim.step() {}
    let mut out = Vec::new();
    sim.conn.sweep(
        start + Duration::from_secs(4),
        None,
        &mut sim.scratch,
        &mut out,
    );
    assert!(out.is_empty(), "not late yet: {out:?}");
    sim.conn.sweep(
        start + Duration::from_secs(5),
        None,
        &mut sim.scratch,
        &mut out,
    );
    sim.apply(out);
    while sim.step() {}
    assert_eq!(sim.closed, Some(false));
    let end = sim.conn.take_end();
    assert!(
        matches!(end, Ended::Header(HeaderError::Timeout { received: 10 })),
        "{end:?}"
    );
}

/// A queued tls+proxy connection reads nothing, not even its header, until it gets a permit.
#[test]
fn a_queued_proxy_connection_waits_unread() {
    let start = Instant::now();
    let mut sim = Sim::with_header(22, true, false, Some(start + Duration::from_secs(5)));
    assert!(!sim.recv_armed);
    assert!(sim.conn.is_queued());
    let mut out = Vec::new();
    assert!(sim.conn.begin_handshake(&mut sim.scratch, &mut out));
    sim.apply(out);
    assert!(sim.recv_armed);
    sim.to_server.extend_from_slice(PROXY_HEADER);
    sim.handshake();
    sim.echo(b"queued, then served");
}
