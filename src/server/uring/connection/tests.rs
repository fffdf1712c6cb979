//! The connection state machine without a ring: a small simulated kernel (a pool of provided
//! buffers, a recv and a send in flight, a client that may stop reading, and on a PROXY
//! listener a client whose first bytes are a header) drives it, and checks every action against
//! what the kernel would allow.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::server::uring::BUFFER_SIZE;

/// The header deadline of the simulated PROXY connections, from their start.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool of provided buffers, as the kernel and the worker see it together.
struct Pool {
    data: Vec<Vec<u8>>,
    free: VecDeque<u16>,
    /// Given to the connection and not given back yet.
    held: BTreeSet<u16>,
}

impl Pool {
    fn new(count: u16) -> Pool {
        Pool {
            data: vec![vec![0; BUFFER_SIZE]; usize::from(count)],
            free: (0..count).collect(),
            held: BTreeSet::new(),
        }
    }
}

impl Buffers for Pool {
    fn bytes(&self, bid: u16) -> &[u8] {
        assert!(self.held.contains(&bid), "read of buffer {bid}, not held");
        &self.data[usize::from(bid)]
    }
}

/// What a send in flight carries: its bytes as they were when it was submitted, and for a
/// send of the own buffer, where they were.
struct InFlightSend {
    bytes: Vec<u8>,
    own_at: Option<*const u8>,
    from_pool: Option<u16>,
}

/// The simulated kernel and client around one connection.
struct Sim {
    conn: Connection,
    pool: Pool,
    now: Instant,
    multishot: bool,
    recv_armed: bool,
    cancel_pending: bool,
    waiting: bool,
    send: Option<InFlightSend>,
    shut_down: bool,
    closed: Option<bool>,
    /// What the client sends before its payload: a PROXY header (or garbage), or nothing.
    header: Vec<u8>,
    /// The verdict of admission on the header's client.
    admit: bool,
    /// The headers the connection asked admission about.
    headers: Vec<ProxyHeader>,
    /// Everything the client sent that the server received, in order (header included).
    received: Vec<u8>,
    /// What `received` reported as the client's bytes (for the counters).
    counted: usize,
    /// Everything the server sent back, in order.
    echoed: Vec<u8>,
    out: Vec<Action>,
}

/// One thing that can happen next.
#[derive(Clone, Debug)]
enum Event {
    /// Data arrives for the armed recv; `more` keeps a multishot recv armed.
    Arrive {
        len: usize,
        more: bool,
    },
    /// The send in flight completes: whole, with `part` per mille of it, or EAGAIN.
    SendDone {
        part: u16,
    },
    SendAgain,
    /// The cancellation of the recv takes effect.
    CancelDone,
    ClientCloses,
    RecvFails,
    SendFails,
    /// A buffer frees up for a connection waiting for one.
    BufferFree,
    ServerEnds(bool),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (1usize..=BUFFER_SIZE, any::<bool>()).prop_map(|(len, more)| Event::Arrive { len, more }),
        6 => (0u16..=1000).prop_map(|part| Event::SendDone { part }),
        2 => Just(Event::SendAgain),
        2 => Just(Event::CancelDone),
        2 => Just(Event::BufferFree),
        1 => Just(Event::ClientCloses),
        1 => Just(Event::RecvFails),
        1 => Just(Event::SendFails),
        1 => any::<bool>().prop_map(Event::ServerEnds),
    ]
}

impl Sim {
    fn new(buffers: u16, multishot: bool) -> Sim {
        Sim::starting(buffers, multishot, None)
    }

    /// A connection on a PROXY listener whose client begins with `header`.
    fn proxied(buffers: u16, multishot: bool, header: &[u8]) -> Sim {
        Sim::starting(buffers, multishot, Some(header))
    }

    fn starting(buffers: u16, multishot: bool, header: Option<&[u8]>) -> Sim {
        let now = Instant::now();
        let mut out = Vec::new();
        let conn = match header {
            Some(_) => Connection::start_awaiting_header(now, now + HEADER_TIMEOUT, &mut out),
            None => Connection::start(now, &mut out),
        };
        let mut sim = Sim {
            conn,
            pool: Pool::new(buffers),
            now,
            multishot,
            recv_armed: false,
            cancel_pending: false,
            waiting: false,
            send: None,
            shut_down: false,
            closed: None,
            header: header.unwrap_or_default().to_vec(),
            admit: true,
            headers: Vec::new(),
            received: Vec::new(),
            counted: 0,
            echoed: Vec::new(),
            out: Vec::new(),
        };
        sim.apply(out);
        sim
    }

    fn apply(&mut self, mut actions: Vec<Action>) {
        for action in actions.drain(..) {
            assert!(self.closed.is_none(), "{action:?} after Close");
            match action {
                Action::Recv => {
                    assert!(!self.recv_armed, "a second recv armed");
                    // A wait the connection gave up (it stalled, or ended): the worker's entry
                    // for it is stale and skipped.
                    self.waiting = false;
                    self.recv_armed = true;
                    self.cancel_pending = false;
                }
                Action::CancelRecv => {
                    assert!(self.recv_armed, "cancel without a recv");
                    self.cancel_pending = true;
                }
                Action::SendPool { bid, offset, len } => {
                    assert!(self.send.is_none(), "a second send in flight");
                    assert!(
                        self.pool.held.contains(&bid),
                        "send from buffer {bid}, not held"
                    );
                    let (offset, len) = (offset as usize, len as usize);
                    assert!(len > 0 && offset + len <= BUFFER_SIZE);
                    self.send = Some(InFlightSend {
                        bytes: self.pool.data[usize::from(bid)][offset..offset + len].to_vec(),
                        own_at: None,
                        from_pool: Some(bid),
                    });
                }
                Action::SendOwn => {
                    assert!(self.send.is_none(), "a second send in flight");
                    let data = self.conn.own_unsent();
                    assert!(!data.is_empty(), "empty send");
                    self.send = Some(InFlightSend {
                        bytes: data.to_vec(),
                        own_at: Some(data.as_ptr()),
                        from_pool: None,
                    });
                }
                Action::GiveBack(bid) => {
                    assert!(self.pool.held.remove(&bid), "buffer {bid} given back twice");
                    if let Some(send) = &self.send {
                        assert_ne!(
                            send.from_pool,
                            Some(bid),
                            "buffer {bid} given back mid-send"
                        );
                    }
                    self.pool.free.push_back(bid);
                }
                Action::WaitForBuffer => {
                    assert!(!self.recv_armed);
                    self.waiting = true;
                }
                Action::UseSingleRecv => self.multishot = false,
                Action::ShutdownSocket => self.shut_down = true,
                Action::Close { half_close } => {
                    assert!(
                        !self.recv_armed && self.send.is_none(),
                        "closed with I/O in flight"
                    );
                    self.closed = Some(half_close);
                }
            }
        }
        self.out = actions;
    }

    fn invariants(&self) {
        assert_eq!(
            self.pool.held.len(),
            self.conn.pool_held(),
            "buffer accounting"
        );
        if matches!(
            self.send,
            Some(InFlightSend {
                own_at: Some(_),
                ..
            })
        ) {
            assert!(
                self.pool.held.is_empty(),
                "a stalled echo holds pool buffers"
            );
            assert!(
                self.conn.own_held() <= 3 * BUFFER_SIZE,
                "own buffer unbounded: {}",
                self.conn.own_held()
            );
        }
    }

    /// The client's byte at position `i` of what it sends: its header, then the payload.
    fn client_byte(&self, i: usize) -> u8 {
        match self.header.get(i) {
            Some(&byte) => byte,
            None => ((i - self.header.len()) % 251) as u8,
        }
    }

    /// What the server received after the header: what it must echo.
    fn payload_received(&self) -> &[u8] {
        &self.received[self.header.len().min(self.received.len())..]
    }

    fn recv_completes(&mut self, result: i32, bid: Option<u16>, more: bool) {
        assert!(self.recv_armed);
        if !more {
            self.recv_armed = false;
        }
        let mut out = std::mem::take(&mut self.out);
        let (headers, admit) = (&mut self.headers, self.admit);
        self.counted += self.conn.received(
            RecvResult { result, bid, more },
            self.multishot,
            &self.pool,
            self.now,
            &mut out,
            |header| {
                headers.push(*header);
                admit
            },
        );
        self.apply(out);
    }

    /// The periodic sweep, `after` the connection started.
    fn sweep(&mut self, after: Duration, idle: Option<Duration>) {
        let mut out = std::mem::take(&mut self.out);
        self.conn.sweep(self.now + after, idle, &mut out);
        self.apply(out);
        self.invariants();
    }

    fn send_completes(&mut self, result: i32) {
        let send = self.send.take().expect("a send in flight");
        if let Some(at) = send.own_at {
            // The kernel read the own buffer while the send was in flight: it must not have
            // moved or changed.
            let now = self.conn.own_unsent();
            assert_eq!(now.as_ptr(), at, "own buffer moved during its send");
            assert_eq!(now, &send.bytes[..], "own buffer changed during its send");
        }
        if result > 0 {
            self.echoed
                .extend_from_slice(&send.bytes[..result as usize]);
        }
        let mut out = std::mem::take(&mut self.out);
        self.conn.sent(result, &self.pool, self.now, &mut out);
        self.apply(out);
    }

    fn step(&mut self, event: Event) {
        if self.closed.is_some() {
            return;
        }
        match event {
            Event::Arrive { len, more } if self.recv_armed => {
                if self.shut_down {
                    self.recv_completes(0, None, false);
                } else if let Some(bid) = self.pool.free.pop_front() {
                    let start = self.received.len();
                    let bytes: Vec<u8> =
                        (start..start + len).map(|i| self.client_byte(i)).collect();
                    self.pool.data[usize::from(bid)][..len].copy_from_slice(&bytes);
                    self.received.extend_from_slice(&bytes);
                    self.pool.held.insert(bid);
                    let more = more && self.multishot && !self.cancel_pending;
                    self.recv_completes(len as i32, Some(bid), more);
                } else {
                    self.recv_completes(-libc::ENOBUFS, None, false);
                }
            }
            Event::SendDone { part } if self.send.is_some() => {
                let len = self.send.as_ref().unwrap().bytes.len();
                let n = if self.shut_down {
                    -libc::EPIPE
                } else {
                    (len * usize::from(part) / 1000).max(1) as i32
                };
                self.send_completes(n);
            }
            Event::SendAgain if self.send.is_some() => self.send_completes(-libc::EAGAIN),
            Event::SendFails if self.send.is_some() => self.send_completes(-libc::ECONNRESET),
            Event::CancelDone if self.recv_armed && self.cancel_pending => {
                self.recv_completes(-libc::ECANCELED, None, false)
            }
            Event::ClientCloses if self.recv_armed => self.recv_completes(0, None, false),
            Event::RecvFails if self.recv_armed => {
                self.recv_completes(-libc::ECONNRESET, None, false)
            }
            Event::BufferFree if self.waiting && !self.pool.free.is_empty() => {
                self.waiting = false;
                let mut out = std::mem::take(&mut self.out);
                // False for a stale wait (the connection stopped waiting meanwhile).
                self.conn.buffer_available(&mut out);
                self.apply(out);
            }
            Event::ServerEnds(idle) => {
                let why = if idle {
                    ServerEnd::IdleTimeout
                } else {
                    ServerEnd::Shutdown
                };
                let mut out = std::mem::take(&mut self.out);
                self.conn.end(why, &mut out);
                self.apply(out);
            }
            _ => {}
        }
        self.invariants();
    }

    /// Lets everything in flight finish and the client close, as a patient kernel would.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            if self.closed.is_some() {
                return;
            }
            if self.send.is_some() {
                self.step(Event::SendDone { part: 1000 });
            } else if self.cancel_pending && self.recv_armed {
                self.step(Event::CancelDone);
            } else if self.waiting {
                self.step(Event::BufferFree);
            } else if self.recv_armed {
                self.step(Event::ClientCloses);
            } else {
                panic!("stuck: nothing in flight, not closed: {:?}", self.conn);
            }
        }
        panic!("did not close");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever happens, in any order: every buffer the kernel provided is given back exactly
    /// once (never twice, never while its send is in flight, never lost), a stalled echo holds
    /// no pool buffer, and what goes out is exactly what came in, in order, each partial send
    /// resuming at the right offset. With no failure and no server end, all of it goes out.
    /// On a plain listener, or on a PROXY one behind a v1 or v2 header.
    #[test]
    fn buffers_come_back_once_and_echoes_are_exact(
        buffers in prop_oneof![Just(1u16), Just(2), Just(4), Just(16)],
        multishot in any::<bool>(),
        header in prop_oneof![Just(None), Just(Some(v1())), Just(Some(v2(0x1)))],
        events in proptest::collection::vec(event(), 0..200),
    ) {
        let mut sim = match &header {
            Some(header) => Sim::proxied(buffers, multishot, header),
            None => Sim::new(buffers, multishot),
        };
        let mut clean = true;
        for event in events {
            clean &= !matches!(event, Event::RecvFails | Event::SendFails | Event::ServerEnds(_));
            sim.step(event);
        }
        sim.drain();
        prop_assert!(sim.pool.held.is_empty(), "buffers never given back: {:?}", sim.pool.held);
        prop_assert_eq!(sim.pool.free.len(), usize::from(buffers));
        prop_assert!(
            sim.payload_received().starts_with(&sim.echoed),
            "echo differs from what was received after the header"
        );
        let header_complete = sim.received.len() >= sim.header.len();
        prop_assert!(sim.headers.len() <= 1, "admission asked twice");
        if clean {
            prop_assert_eq!(sim.headers.len(), usize::from(header.is_some() && header_complete));
        }
        if clean && header_complete {
            prop_assert_eq!(sim.echoed.len(), sim.payload_received().len(), "bytes lost");
            prop_assert_eq!(sim.closed, Some(true), "a clean end half-closes");
            prop_assert!(matches!(sim.conn.take_end(), Ended::End(End::ClientClosed)));
        } else if clean {
            // The client closed before its header was complete.
            prop_assert!(sim.echoed.is_empty());
            prop_assert_eq!(sim.closed, Some(false));
            let truncated = matches!(sim.conn.take_end(), Ended::Header(HeaderError::Truncated { .. }));
            prop_assert!(truncated, "a header cut short by the client's close");
        }
        prop_assert_eq!(sim.conn.bytes(), sim.echoed.len() as u64);
    }

    /// However a PROXY header and what follows it are cut into receives, the header is read
    /// once, nothing is echoed before it is complete, and every byte after it comes back.
    #[test]
    fn a_header_cut_anywhere_is_read_and_what_follows_echoed(
        version in 1u8..=2,
        multishot in any::<bool>(),
        cuts in proptest::collection::vec(1usize..=40, 1..40),
        payload_len in 0usize..300,
    ) {
        let header = if version == 1 { v1() } else { v2(0x1) };
        let mut sim = Sim::proxied(4, multishot, &header);
        let total = header.len() + payload_len;
        for len in cuts.iter().cycle() {
            let left = total - sim.received.len();
            if left == 0 {
                break;
            }
            if sim.received.len() < header.len() {
                prop_assert!(sim.echoed.is_empty() && sim.send.is_none(), "echo before the header");
                prop_assert!(sim.pool.held.is_empty(), "a header byte holds a pool buffer");
            }
            while sim.send.is_some() || (sim.cancel_pending && sim.recv_armed) {
                sim.step(if sim.send.is_some() { Event::SendDone { part: 1000 } } else { Event::CancelDone });
            }
            prop_assert!(sim.recv_armed, "not reading");
            sim.step(Event::Arrive { len: (*len).min(left), more: true });
        }
        sim.drain();
        prop_assert_eq!(sim.headers.len(), 1);
        prop_assert_eq!(sim.headers[0].source, Some(client()));
        prop_assert_eq!(sim.headers[0].version, version);
        prop_assert_eq!(&sim.echoed[..], sim.payload_received());
        prop_assert_eq!(sim.echoed.len(), payload_len);
        prop_assert_eq!(sim.counted, payload_len, "header bytes counted as the client's");
        prop_assert_eq!(sim.closed, Some(true));
    }
}

/// The client the test headers name.
fn client() -> SocketAddr {
    "198.51.100.7:40001".parse().unwrap()
}

fn proxy_destination() -> SocketAddr {
    "192.0.2.1:4001".parse().unwrap()
}

/// A PROXY v1 header naming [`client`].
fn v1() -> Vec<u8> {
    let (c, s) = (client(), proxy_destination());
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        c.ip(),
        s.ip(),
        c.port(),
        s.port()
    )
    .into_bytes()
}

/// A PROXY v2 header naming [`client`]: `command` 0x1 for PROXY, 0x0 for LOCAL.
fn v2(command: u8) -> Vec<u8> {
    let (SocketAddr::V4(c), SocketAddr::V4(s)) = (client(), proxy_destination()) else {
        unreachable!("IPv4 addresses");
    };
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x20 | command, 0x11, 0, 12]);
    out.extend_from_slice(&c.ip().octets());
    out.extend_from_slice(&s.ip().octets());
    out.extend_from_slice(&c.port().to_be_bytes());
    out.extend_from_slice(&s.port().to_be_bytes());
    out
}

#[test]
fn a_short_send_resumes_at_the_first_unsent_byte() {
    let mut sim = Sim::new(4, true);
    sim.step(Event::Arrive {
        len: 1000,
        more: true,
    });
    sim.step(Event::SendDone { part: 300 });
    // Stalled: the rest moved out of the pool; the multishot recv stays armed.
    assert!(sim.pool.held.is_empty());
    assert_eq!(sim.conn.own_unsent(), &sim.received[300..]);
    assert!(sim.recv_armed && !sim.cancel_pending);
    sim.step(Event::SendDone { part: 500 });
    assert_eq!(sim.conn.own_unsent(), &sim.received[650..]);
    sim.step(Event::SendDone { part: 1000 });
    assert_eq!(sim.echoed, sim.received);
    // Caught up: the own memory is gone, and the next echo comes from the pool again.
    assert_eq!(sim.conn.own_held(), 0);
    assert!(sim.recv_armed, "still reading once the echo is out");
    sim.step(Event::Arrive {
        len: 10,
        more: true,
    });
    assert!(matches!(
        sim.send,
        Some(InFlightSend {
            from_pool: Some(_),
            ..
        })
    ));
}

#[test]
fn data_arriving_while_stalled_is_copied_and_its_buffer_given_back() {
    let mut sim = Sim::new(2, true);
    sim.step(Event::Arrive {
        len: 100,
        more: true,
    });
    sim.step(Event::SendAgain);
    assert!(sim.pool.held.is_empty(), "EAGAIN stalls the echo");
    // The armed recv brings more: copied, and the recv is cancelled.
    sim.step(Event::Arrive {
        len: 50,
        more: true,
    });
    assert!(sim.pool.held.is_empty(), "copied, not held");
    assert!(sim.cancel_pending, "no more reading while stalled");
    sim.step(Event::SendDone { part: 1000 });
    sim.step(Event::SendDone { part: 1000 });
    assert_eq!(sim.echoed, sim.received);
}

#[test]
fn an_empty_pool_waits_for_a_buffer_then_reads_again() {
    let mut sim = Sim::new(1, false);
    sim.step(Event::Arrive {
        len: 10,
        more: false,
    });
    // The pool's only buffer is in the send; the re-armed recv finds none.
    assert!(!sim.recv_armed, "single recv: not re-armed during the send");
    sim.step(Event::SendDone { part: 1000 });
    assert!(sim.recv_armed);
    let bid = sim.pool.free.pop_front().unwrap();
    sim.step(Event::Arrive {
        len: 10,
        more: false,
    });
    assert!(sim.waiting, "ENOBUFS makes it wait");
    sim.pool.free.push_back(bid);
    sim.step(Event::BufferFree);
    assert!(sim.recv_armed);
}

#[test]
fn a_refused_multishot_recv_switches_to_single_recvs() {
    let mut sim = Sim::new(2, true);
    sim.recv_completes(-libc::EINVAL, None, false);
    assert!(!sim.multishot);
    assert!(sim.recv_armed, "armed again");
    sim.recv_completes(-libc::EINVAL, None, false);
    assert!(
        matches!(sim.closed, Some(false)),
        "EINVAL of a single recv is a failure"
    );
}

#[test]
fn ending_with_a_send_in_flight_shuts_the_socket_and_closes_after_it() {
    let mut sim = Sim::new(2, true);
    sim.step(Event::Arrive {
        len: 100,
        more: true,
    });
    sim.step(Event::ServerEnds(true));
    assert!(sim.shut_down);
    assert!(
        sim.closed.is_none(),
        "not while the kernel has its operations"
    );
    sim.drain();
    assert_eq!(sim.closed, Some(false));
    assert!(matches!(sim.conn.take_end(), Ended::End(End::IdleTimeout)));
    assert!(sim.pool.held.is_empty());
}

// ---- the header phase (a `tcp+proxy://` listener) ----

/// The client's next `len` bytes arrive in one receive.
fn arrive(sim: &mut Sim, len: usize) {
    assert!(sim.recv_armed, "no recv armed");
    sim.step(Event::Arrive { len, more: true });
}

#[test]
fn a_header_split_over_several_completions_is_read_then_what_follows_echoed() {
    for (header, version) in [(v1(), 1), (v2(0x1), 2)] {
        for multishot in [true, false] {
            let mut sim = Sim::proxied(4, multishot, &header);
            let hlen = header.len();
            // One byte, then five, then all but the last three.
            for len in [1, 5, hlen - 9] {
                arrive(&mut sim, len);
                assert!(
                    sim.headers.is_empty(),
                    "v{version}: admitted on a partial header"
                );
                assert!(
                    sim.send.is_none() && sim.echoed.is_empty(),
                    "v{version}: echoed early"
                );
                assert!(
                    sim.pool.held.is_empty(),
                    "v{version}: a partial header holds a buffer"
                );
                assert!(sim.recv_armed, "v{version}: not reading on");
            }
            // The header's last three bytes and the client's first ten in one receive.
            arrive(&mut sim, 3 + 10);
            assert_eq!(sim.headers.len(), 1);
            assert_eq!(sim.headers[0].source, Some(client()), "v{version}");
            assert_eq!(sim.headers[0].destination, Some(proxy_destination()));
            assert_eq!(sim.headers[0].version, version);
            assert!(!sim.headers[0].local);
            sim.step(Event::SendDone { part: 1000 });
            assert_eq!(sim.echoed, sim.payload_received(), "v{version}");
            assert_eq!(sim.echoed.len(), 10);
            // Echoing as on a plain listener from now on.
            sim.drain();
            assert_eq!(sim.closed, Some(true));
            assert!(matches!(sim.conn.take_end(), Ended::End(End::ClientClosed)));
            assert_eq!(sim.conn.bytes(), 10, "the header is not counted as echoed");
        }
    }
}

#[test]
fn header_and_payload_in_one_buffer_are_echoed_from_where_the_header_ends() {
    for header in [v1(), v2(0x1)] {
        let mut sim = Sim::proxied(4, true, &header);
        arrive(&mut sim, header.len() + 100);
        assert_eq!(sim.headers.len(), 1);
        // Straight from the pool buffer, without a copy.
        let send = sim.send.as_ref().expect("the first bytes are being echoed");
        assert!(send.from_pool.is_some() && send.own_at.is_none());
        assert_eq!(send.bytes, sim.payload_received());
        assert_eq!(sim.conn.own_held(), 0);
        // A short send stalls as any echo does and resumes at the right byte.
        sim.step(Event::SendDone { part: 400 });
        sim.step(Event::SendDone { part: 1000 });
        assert_eq!(sim.echoed, sim.payload_received());
        sim.drain();
        assert_eq!(sim.echoed.len(), 100);
        assert_eq!(sim.closed, Some(true));
    }
}

#[test]
fn a_header_alone_in_its_buffer_gives_the_buffer_back_and_reads_on() {
    let header = v2(0x1);
    let mut sim = Sim::proxied(1, false, &header);
    arrive(&mut sim, header.len());
    assert_eq!(sim.headers.len(), 1);
    assert!(sim.pool.held.is_empty() && sim.send.is_none());
    assert!(sim.recv_armed, "reading the client's data");
    arrive(&mut sim, 20);
    sim.step(Event::SendDone { part: 1000 });
    assert_eq!(sim.echoed.len(), 20);
}

#[test]
fn a_local_header_is_admitted_without_a_client_address() {
    let header = v2(0x0);
    let mut sim = Sim::proxied(2, true, &header);
    arrive(&mut sim, header.len() + 7);
    assert_eq!(sim.headers.len(), 1);
    assert!(sim.headers[0].local);
    assert_eq!(sim.headers[0].source, None, "served as from the proxy");
    sim.drain();
    assert_eq!(sim.echoed.len(), 7);
}

#[test]
fn garbage_instead_of_a_header_closes_without_an_echo() {
    /// Whether the error is the one the bytes deserve.
    type Expected = fn(&HeaderError) -> bool;
    let cases: [(&[u8], Expected); 3] = [
        (b"GET / HTTP/1.1\r\n\r\n", |e| {
            matches!(e, HeaderError::NotProxy(_))
        }),
        (b"PROXY TCP4 not an address at all\r\nx\n", |e| {
            matches!(e, HeaderError::Malformed { version: 1, .. })
        }),
        // A v2 signature with version 3.
        (b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c", |e| {
            matches!(e, HeaderError::Unsupported(_))
        }),
    ];
    for (garbage, expected) in cases {
        for multishot in [true, false] {
            let mut sim = Sim::proxied(2, multishot, garbage);
            arrive(&mut sim, garbage.len());
            // A multishot recv still armed is cancelled first.
            sim.drain();
            assert_eq!(sim.closed, Some(false), "{}", garbage.escape_ascii());
            assert!(sim.echoed.is_empty() && sim.headers.is_empty());
            assert!(sim.pool.held.is_empty());
            match sim.conn.take_end() {
                Ended::Header(e) => assert!(expected(&e), "{}: {e}", garbage.escape_ascii()),
                other => panic!("{}: ended {other:?}", garbage.escape_ascii()),
            }
        }
    }
}

#[test]
fn a_header_still_incomplete_at_its_deadline_closes_the_connection() {
    let header = v1();
    let mut sim = Sim::proxied(2, true, &header);
    arrive(&mut sim, 5);
    // The idle timeout does not apply to the header phase; only the header's deadline does.
    sim.sweep(
        HEADER_TIMEOUT - Duration::from_millis(1),
        Some(Duration::from_millis(1)),
    );
    assert!(
        sim.closed.is_none() && !sim.cancel_pending,
        "closed before the deadline"
    );
    sim.sweep(HEADER_TIMEOUT, None);
    assert!(
        sim.cancel_pending,
        "the armed recv is cancelled at the deadline"
    );
    sim.step(Event::CancelDone);
    assert_eq!(sim.closed, Some(false));
    assert!(sim.echoed.is_empty() && sim.headers.is_empty());
    assert!(matches!(
        sim.conn.take_end(),
        Ended::Header(HeaderError::Timeout { received: 5 })
    ));
}

#[test]
fn a_late_header_waiting_for_a_buffer_closes_at_its_deadline() {
    let header = v1();
    let mut sim = Sim::proxied(1, false, &header);
    // The only buffer is taken elsewhere.
    let _taken = sim.pool.free.pop_front().unwrap();
    arrive(&mut sim, 3);
    assert!(
        sim.waiting,
        "ENOBUFS in the header phase waits for a buffer"
    );
    sim.sweep(HEADER_TIMEOUT, None);
    assert_eq!(sim.closed, Some(false), "nothing in flight: closed at once");
    assert!(matches!(
        sim.conn.take_end(),
        Ended::Header(HeaderError::Timeout { .. })
    ));
    assert!(sim.pool.held.is_empty());
}

#[test]
fn a_client_closing_mid_header_is_a_truncated_header() {
    let header = v2(0x1);
    let mut sim = Sim::proxied(2, true, &header);
    arrive(&mut sim, 20);
    sim.step(Event::ClientCloses);
    assert_eq!(sim.closed, Some(false));
    assert!(matches!(
        sim.conn.take_end(),
        Ended::Header(HeaderError::Truncated { received: 20 })
    ));
}

#[test]
fn a_client_refused_by_admission_is_closed_without_an_echo() {
    let header = v1();
    let mut sim = Sim::proxied(2, true, &header);
    sim.admit = false;
    arrive(&mut sim, header.len() + 50);
    assert_eq!(
        sim.headers.len(),
        1,
        "admission was asked about the header's client"
    );
    sim.drain();
    assert_eq!(sim.closed, Some(false));
    assert!(sim.echoed.is_empty() && sim.pool.held.is_empty());
    assert!(matches!(sim.conn.take_end(), Ended::Refused));
}

#[test]
fn shutdown_while_awaiting_the_header_closes_it() {
    let header = v1();
    let mut sim = Sim::proxied(2, true, &header);
    arrive(&mut sim, 4);
    sim.step(Event::ServerEnds(false));
    assert!(sim.shut_down);
    sim.drain();
    assert_eq!(sim.closed, Some(false));
    assert!(matches!(sim.conn.take_end(), Ended::End(End::Shutdown)));
}

#[test]
fn the_idle_timeout_applies_once_the_header_is_in() {
    let header = v1();
    let mut sim = Sim::proxied(2, true, &header);
    arrive(&mut sim, header.len() + 3);
    sim.step(Event::SendDone { part: 1000 });
    sim.sweep(Duration::from_secs(1), Some(Duration::from_secs(2)));
    assert!(sim.closed.is_none() && !sim.shut_down);
    sim.sweep(Duration::from_secs(2), Some(Duration::from_secs(2)));
    assert!(sim.shut_down, "idle: the socket is shut down");
    sim.drain();
    assert!(matches!(sim.conn.take_end(), Ended::End(End::IdleTimeout)));
}
