//! The connection state machine without a ring: a small simulated kernel (a pool of provided
//! buffers, a recv and a send in flight, a client that may stop reading) drives it, and checks
//! every action against what the kernel would allow.

use std::collections::{BTreeSet, VecDeque};

use proptest::prelude::*;

use super::*;
use crate::server::uring::BUFFER_SIZE;

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
    /// Everything the client sent that the server received, in order.
    received: Vec<u8>,
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
        let now = Instant::now();
        let mut out = Vec::new();
        let conn = Connection::start(now, &mut out);
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
            received: Vec::new(),
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

    fn recv_completes(&mut self, result: i32, bid: Option<u16>, more: bool) {
        assert!(self.recv_armed);
        if !more {
            self.recv_armed = false;
        }
        let mut out = std::mem::take(&mut self.out);
        self.conn.received(
            RecvResult { result, bid, more },
            self.multishot,
            &self.pool,
            self.now,
            &mut out,
        );
        self.apply(out);
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
                    let bytes: Vec<u8> = (start..start + len).map(|i| (i % 251) as u8).collect();
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
    #[test]
    fn buffers_come_back_once_and_echoes_are_exact(
        buffers in prop_oneof![Just(1u16), Just(2), Just(4), Just(16)],
        multishot in any::<bool>(),
        events in proptest::collection::vec(event(), 0..200),
    ) {
        let mut sim = Sim::new(buffers, multishot);
        let mut clean = true;
        for event in events {
            clean &= !matches!(event, Event::RecvFails | Event::SendFails | Event::ServerEnds(_));
            sim.step(event);
        }
        sim.drain();
        prop_assert!(sim.pool.held.is_empty(), "buffers never given back: {:?}", sim.pool.held);
        prop_assert_eq!(sim.pool.free.len(), usize::from(buffers));
        prop_assert!(sim.received.starts_with(&sim.echoed), "echo differs from what was received");
        if clean {
            prop_assert_eq!(sim.echoed.len(), sim.received.len(), "bytes lost");
            prop_assert_eq!(sim.closed, Some(true), "a clean end half-closes");
            prop_assert!(matches!(sim.conn.take_end(), End::ClientClosed));
        }
        prop_assert_eq!(sim.conn.bytes(), sim.echoed.len() as u64);
    }
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
    assert!(matches!(sim.conn.take_end(), End::IdleTimeout));
    assert!(sim.pool.held.is_empty());
}
