//! A worker: one thread driving one ring. It owns the connection table, the accepts, the
//! timers and the buffer pool, and carries out what each connection's state machine
//! ([`super::connection`]) asks for. The lifecycle hooks each have one call site: the slot
//! under `--max-conns` (a [`Permit`]) is taken when an accept completes, the first decision
//! (admission, or on a `+proxy` listener the trusted-proxy check) is in
//! [`RingWorker::start_connection`] (right after accept or hand-over), admission of the client a
//! PROXY header names in [`RingWorker::received`], the byte counts in `received` and `sent` (each
//! completion), and the close record (or the header's refusal) in [`RingWorker::finish`].
//!
//! TLS connections (`tls://`, `tls+proxy://`) run [`super::tls_connection`] instead: the worker
//! holds a permit under the server's handshake cap for each one that handshakes (taken in
//! [`RingWorker::start_tls`], or later, oldest first, in
//! [`RingWorker::admit_queued_handshakes`]), gives it back as soon as the handshake ends
//! ([`RingWorker::check_handshake`], which also counts completed handshakes), and counts a
//! TLS connection's plaintext when it ends.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown as Direction, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::types::Timespec;
use io_uring::{cqueue, squeue, IoUring};

use super::buffers::BufferPool;
use super::connection::{Action, Connection, Ended, RecvResult, ServerEnd};
use super::echo::Echo;
use super::setup::Ring;
use super::sqe::{self, token, untoken, Kind};
use super::tls_connection::TlsConnection;
use super::{Incoming, RingDirectory, BUFFER_GROUP, RECV_LIMIT, RING_ENTRIES, SINGLE_RECV_ENV};
use crate::net::{AcceptError, ACCEPT_BACKOFF};
use crate::server::conn::admission::Refusal;
use crate::server::conn::limit::Permit;
use crate::server::conn::{Admitted, End};
use crate::server::Server;
use crate::tls::session::{TlsSession, SCRATCH_SIZE};
use crate::tls::{HandshakePermit, TlsServer};

/// A served connection: its socket, who it is for, its slot under `--max-conns`, and its
/// echo's state.
struct Live {
    stream: TcpStream,
    peer: Peer,
    permit: Permit,
    connection: Echo,
    /// A TLS connection's permit under the handshake cap, while its handshake runs.
    handshake_permit: Option<HandshakePermit>,
}

/// What a worker needs for its TLS connections.
struct WorkerTls {
    server: Arc<TlsServer>,
    /// This worker's connections waiting for a handshake permit, oldest first (stale entries
    /// are skipped).
    queued: VecDeque<(u32, u32)>,
}

/// Who a connection is for.
enum Peer {
    /// Admitted: being echoed.
    Admitted(Admitted),
    /// On a `+proxy` listener, from trusted `proxy`: its PROXY header will name the client.
    AwaitingHeader { proxy: SocketAddr, listener: usize },
}

#[derive(Default)]
struct Slot {
    generation: u32,
    live: Option<Live>,
}

struct Listener {
    fd: RawFd,
    generation: u32,
    in_flight: bool,
    cancel_sent: bool,
}

pub struct RingWorker<'a> {
    // Declared before `pool`, so it is dropped first: the kernel stops using the buffers
    // before they are freed.
    ring: IoUring,
    pool: BufferPool,
    server: &'a Server,
    shared: &'a RingDirectory,
    id: usize,
    slots: Vec<Slot>,
    free: Vec<u32>,
    active: usize,
    /// Connections whose recv found no buffer, in order (stale entries are skipped).
    waiting: VecDeque<(u32, u32)>,
    /// Accepted while the server was full; served when there is room.
    parked: VecDeque<Incoming>,
    listeners: Vec<Listener>,
    backing_off: bool,
    stopping: bool,
    /// Buffers the kernel gave us (received data) that we have not given back yet.
    buffers_held: usize,
    /// Whether recvs are multishot with a byte limit (false once the kernel refused one).
    multishot: bool,
    /// How often a recv found the pool empty (reported at debug level when the worker ends).
    buffer_waits: u64,
    /// Sends from a connection's own buffer: echoes that stalled, moved out of the pool.
    own_sends: u64,
    /// Connections this worker served.
    served: u64,
    /// Entries that did not fit in the submission queue yet.
    backlog: VecDeque<squeue::Entry>,
    completions: Vec<(u64, i32, u32)>,
    /// The actions of the connection being moved on (reused to save allocations).
    actions: Vec<Action>,
    /// When the current batch of completions was reaped (one clock read per batch).
    now: Instant,
    /// For TLS listeners: the configuration and the handshake cap.
    tls: Option<WorkerTls>,
    /// Plaintext scratch lent to TLS connections (empty without TLS).
    scratch: Box<[u8]>,
    // Timeouts read their timespec when submitted; boxed so the addresses stay put.
    /// How often idle connections and late PROXY headers are looked for (only with
    /// `--idle-timeout` or a `+proxy` listener).
    sweep_interval: Option<Box<Timespec>>,
    backoff: Box<Timespec>,
    deadline: Box<Timespec>,
}

impl<'a> RingWorker<'a> {
    /// A worker on `ring`; must run on the thread that will drive the ring.
    pub fn new(
        server: &'a Server,
        shared: &'a RingDirectory,
        id: usize,
        ring: Ring,
    ) -> crate::Result<Self> {
        let Ring {
            ring,
            pool,
            disabled,
        } = ring;
        if disabled {
            // A single-issuer ring belongs to the thread that enables it.
            ring.submitter()
                .register_enable_rings()
                .map_err(|e| crate::Error::io("cannot enable the io_uring", e))?;
        }
        let multishot = std::env::var_os(SINGLE_RECV_ENV).is_none();
        tracing::debug!(
            worker = id,
            single_issuer = disabled,
            buffers = pool.count(),
            multishot_recv = multishot,
            "ring ready"
        );
        let sweep_interval = server
            .sweep_every()
            .map(|interval| Box::new(Timespec::from(interval)));
        let tls = server.tls.as_ref().map(|tls| WorkerTls {
            server: Arc::clone(tls),
            queued: VecDeque::new(),
        });
        let scratch = match tls {
            Some(_) => vec![0; SCRATCH_SIZE].into_boxed_slice(),
            None => Box::default(),
        };
        Ok(RingWorker {
            tls,
            scratch,
            ring,
            pool,
            server,
            shared,
            id,
            slots: Vec::new(),
            free: Vec::new(),
            active: 0,
            waiting: VecDeque::new(),
            parked: VecDeque::new(),
            listeners: server
                .listeners
                .iter()
                .map(|l| Listener {
                    fd: l.as_raw_fd(),
                    generation: 0,
                    in_flight: false,
                    cancel_sent: false,
                })
                .collect(),
            backing_off: false,
            stopping: false,
            buffers_held: 0,
            multishot,
            buffer_waits: 0,
            own_sends: 0,
            served: 0,
            backlog: VecDeque::new(),
            now: Instant::now(),
            completions: Vec::with_capacity(RING_ENTRIES as usize * 4),
            actions: Vec::new(),
            sweep_interval,
            backoff: Box::new(Timespec::from(ACCEPT_BACKOFF)),
            deadline: Box::new(Timespec::from(server.config.shutdown_timeout)),
        })
    }

    pub fn run(&mut self) -> crate::Result<()> {
        let shutdown_fd = self.server.shutdown.as_fd().as_raw_fd();
        self.push(sqe::poll_in(shutdown_fd).user_data(token(Kind::ShutdownSignal, 0, 0)));
        self.arm_wake();
        self.arm_room();
        self.arm_handshake_room();
        self.arm_sweep();
        loop {
            self.sync_accepting();
            if self.stopping && self.active == 0 {
                break;
            }
            self.flush_backlog();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(crate::Error::io("io_uring enter failed", e)),
            }
            self.now = Instant::now();
            let mut completions = std::mem::take(&mut self.completions);
            completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(user_data, result, flags) in &completions {
                self.complete(user_data, result, flags)?;
            }
            completions.clear();
            self.completions = completions;
            self.resume_waiting();
            if self.tls.as_ref().is_some_and(|tls| !tls.queued.is_empty()) {
                // The cap's room signal may have gone to another worker: try every turn too.
                self.admit_queued_handshakes();
            }
        }
        // Nothing of ours uses the buffers any more; stop the kernel from using them too.
        let _ = self.ring.submitter().unregister_buf_ring(BUFFER_GROUP);
        tracing::debug!(
            worker = self.id,
            buffers = self.pool.count(),
            buffer_waits = self.buffer_waits,
            own_sends = self.own_sends,
            served = self.served,
            "worker stopped"
        );
        Ok(())
    }

    /// Queues a submission: into the submission queue, submitting it when full, or into the
    /// backlog when the kernel cannot take more right now.
    fn push(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty() && sqe::push(&mut self.ring, &entry) {
            return;
        }
        self.backlog.push_back(entry);
    }

    fn flush_backlog(&mut self) {
        while let Some(entry) = self.backlog.pop_front() {
            if !sqe::push(&mut self.ring, &entry) {
                self.backlog.push_front(entry);
                break;
            }
        }
    }

    fn complete(&mut self, user_data: u64, result: i32, flags: u32) -> crate::Result<()> {
        let (kind, index, generation) = untoken(user_data);
        let Some(kind) = kind else {
            // Every submission carries a token made by `sqe::token`; anything else is a bug.
            debug_assert!(false, "completion with an unknown user_data {user_data:#x}");
            tracing::warn!(user_data, "completion with an unknown token ignored");
            return Ok(());
        };
        match kind {
            Kind::Accept => self.accepted(index, generation, result, flags)?,
            Kind::Room => {
                // A connection ended in a full server; the next loop turn accepts again if
                // there is room still.
                self.shared.limit.clear_room_signal();
                if !cqueue::more(flags) {
                    self.arm_room();
                }
            }
            Kind::Recv => self.received(index, generation, result, flags),
            Kind::Send => self.sent(index, generation, result),
            Kind::ShutdownSignal => self.begin_shutdown(),
            Kind::Wake => {
                self.shared.workers[self.id].wake.drain();
                self.take_handed_over();
                self.arm_wake();
            }
            Kind::Sweep => {
                self.sweep();
                self.arm_sweep();
            }
            Kind::HandshakeRoom => {
                if let Some(tls) = &self.tls {
                    tls.server.handshakes().clear_room_signal();
                }
                self.admit_queued_handshakes();
                if !cqueue::more(flags) {
                    self.arm_handshake_room();
                }
            }
            Kind::AcceptBackoff => self.backing_off = false,
            Kind::Deadline => self.close_all_at_deadline(),
            // The cancelled operation's own completion carries its outcome.
            Kind::Cancel => {}
        }
        Ok(())
    }

    // ---- accepting ----

    /// Arms or cancels the accepts as the state requires; serves parked connections when
    /// there is room.
    fn sync_accepting(&mut self) {
        while !self.stopping && !self.parked.is_empty() {
            let Some(permit) = self.shared.limit.try_acquire() else {
                break;
            };
            let incoming = self.parked.pop_front().expect("not empty");
            self.assign(incoming, permit);
        }
        let full = !self.parked.is_empty() || !self.shared.limit.has_room();
        let accepting = !self.stopping && !self.backing_off && !full;
        for index in 0..self.listeners.len() {
            let listener = &mut self.listeners[index];
            if accepting && !listener.in_flight {
                listener.generation = listener.generation.wrapping_add(1);
                listener.in_flight = true;
                listener.cancel_sent = false;
                let entry = sqe::accept_multi(listener.fd).user_data(token(
                    Kind::Accept,
                    index as u32,
                    listener.generation,
                ));
                self.push(entry);
            } else if !accepting && listener.in_flight && !listener.cancel_sent {
                listener.cancel_sent = true;
                let target = token(Kind::Accept, index as u32, listener.generation);
                self.push(sqe::cancel(target));
            }
        }
    }

    fn accepted(
        &mut self,
        index: u32,
        generation: u32,
        result: i32,
        flags: u32,
    ) -> crate::Result<()> {
        let Some(listener) = self.listeners.get_mut(index as usize) else {
            return Ok(());
        };
        if listener.generation & 0xFF_FFFF == generation && !cqueue::more(flags) {
            listener.in_flight = false;
        }
        if result >= 0 {
            let incoming = Incoming {
                stream: sqe::accepted_stream(result),
                listener: index as usize,
            };
            if self.stopping {
                return Ok(()); // Closed unserved: the server no longer accepts.
            }
            // Parked connections go first, in order.
            match self
                .parked
                .is_empty()
                .then(|| self.shared.limit.try_acquire())
                .flatten()
            {
                Some(permit) => self.assign(incoming, permit),
                None => self.parked.push_back(incoming),
            }
            return Ok(());
        }
        if result == -libc::ECANCELED {
            return Ok(());
        }
        let err = io::Error::from_raw_os_error(-result);
        match self.server.conn.accept_error(&err) {
            AcceptError::Exhausted => {
                if !self.backing_off {
                    self.backing_off = true;
                    let entry = sqe::timeout(&self.backoff);
                    self.push(entry.user_data(token(Kind::AcceptBackoff, 0, 0)));
                }
            }
            AcceptError::Retry | AcceptError::WouldBlock => {
                tracing::debug!("accept failed: {err}; retrying");
            }
            // Shutdown stopped the listener.
            AcceptError::Closed => {}
            AcceptError::Fatal if self.stopping => {}
            AcceptError::Fatal => return Err(crate::Error::io("accept failed", err)),
        }
        Ok(())
    }

    /// Serves a connection that has its slot here, or hands it over to a less loaded worker.
    fn assign(&mut self, incoming: Incoming, permit: Permit) {
        let target = self.shared.assign(self.id);
        if target == self.id {
            self.start_connection(incoming, permit);
            return;
        }
        let mailbox = &self.shared.workers[target];
        mailbox
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((incoming, permit));
        mailbox.wake.wake();
    }

    /// Serves the connections other workers handed over.
    fn take_handed_over(&mut self) {
        let streams = std::mem::take(
            &mut *self.shared.workers[self.id]
                .inbox
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (incoming, permit) in streams {
            if self.stopping {
                // Closed unserved; dropping the permit frees its slot.
                drop(incoming);
                drop(permit);
                self.shared.unload(self.id);
            } else {
                self.start_connection(incoming, permit);
            }
        }
    }

    fn arm_wake(&mut self) {
        let fd = self.shared.workers[self.id].wake.as_fd().as_raw_fd();
        self.push(sqe::poll_in(fd).user_data(token(Kind::Wake, 0, 0)));
    }

    /// Watches the limit's room descriptor for as long as the ring runs: every ring learns
    /// that a full server has room again, whichever ring drains the descriptor first.
    fn arm_room(&mut self) {
        let fd = self.shared.limit.room_fd().as_raw_fd();
        self.push(sqe::poll_in_multi(fd).user_data(token(Kind::Room, 0, 0)));
    }

    /// Serves a connection counted for this worker: the lifecycle's first decision (admission
    /// by its peer, or on a `+proxy` listener whether the peer is a trusted proxy), then its
    /// state machine starts. A refused stream is dropped, which closes it without an echo,
    /// and so is its permit, which frees its slot.
    fn start_connection(&mut self, incoming: Incoming, permit: Permit) {
        let Incoming { stream, listener } = incoming;
        let lifecycle = &self.server.conn;
        let peer = match stream.peer_addr() {
            Ok(peer) => peer,
            Err(e) => {
                tracing::debug!("connection gone before it was served: {e}");
                self.shared.unload(self.id);
                return;
            }
        };
        lifecycle.configure(&stream, peer);
        let stream_peer = peer;
        let peer = if self.server.kind(listener).expects_proxy_header() {
            lifecycle
                .check_proxy_peer(peer)
                .ok()
                .map(|()| Peer::AwaitingHeader {
                    proxy: peer,
                    listener,
                })
        } else {
            lifecycle.admit(listener, peer).ok().map(Peer::Admitted)
        };
        let Some(peer) = peer else {
            self.shared.unload(self.id);
            return;
        };
        self.served += 1;
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        let mut actions = std::mem::take(&mut self.actions);
        let now = Instant::now();
        let header_deadline = match peer {
            Peer::Admitted(_) => None,
            Peer::AwaitingHeader { .. } => Some(now + lifecycle.proxy_timeout()),
        };
        let mut handshake_permit = None;
        let connection = if self.server.kind(listener).is_tls() {
            match self.start_tls(
                index,
                now,
                header_deadline,
                &mut handshake_permit,
                &mut actions,
            ) {
                Ok(connection) => connection,
                Err(e) => {
                    tracing::warn!(peer = %stream_peer, "cannot start a TLS session: {e}; closed it");
                    if let Peer::Admitted(admitted) = peer {
                        self.server.conn.close(admitted, 0, &End::Failed(e));
                    }
                    self.free.push(index);
                    self.actions = actions;
                    self.shared.unload(self.id);
                    return;
                }
            }
        } else {
            Echo::Plain(match header_deadline {
                None => Connection::start(now, &mut actions),
                Some(deadline) => Connection::start_awaiting_header(now, deadline, &mut actions),
            })
        };
        self.slots[index as usize].live = Some(Live {
            stream,
            peer,
            permit,
            connection,
            handshake_permit,
        });
        self.active += 1;
        self.apply(index, actions);
    }

    /// The TLS state machine for a connection about to live in slot `index`: with a
    /// handshake permit (into `permit`) if the cap has room and nobody here waits for one,
    /// else queued for one (unread, its timeouts running).
    fn start_tls(
        &mut self,
        index: u32,
        now: Instant,
        header_deadline: Option<Instant>,
        permit: &mut Option<HandshakePermit>,
        actions: &mut Vec<Action>,
    ) -> io::Result<Echo> {
        let Some(tls) = self.tls.as_mut() else {
            return Err(io::Error::other("the server has no TLS configuration"));
        };
        let session = TlsSession::new(Arc::clone(tls.server.config())).map_err(io::Error::other)?;
        // Behind connections already waiting: first come, first served.
        if tls.queued.is_empty() {
            *permit = tls.server.handshakes().try_acquire();
        }
        if permit.is_none() {
            let generation = self.slots[index as usize].generation & 0xFF_FFFF;
            tls.queued.push_back((index, generation));
        }
        let connection = TlsConnection::start(
            session,
            now,
            tls.server.handshake_timeout(),
            header_deadline,
            permit.is_some(),
            &mut self.scratch,
            actions,
        );
        Ok(Echo::Tls(Box::new(connection)))
    }

    /// After connection `index` moved: if its handshake just ended (done, failed, or the
    /// connection is closing), its permit goes back, to the connections waiting longest, and
    /// a completed handshake is counted.
    fn check_handshake(&mut self, index: u32) {
        let Some(live) = self.slots[index as usize].live.as_mut() else {
            return;
        };
        let Some(tls) = live.connection.tls() else {
            return;
        };
        if !tls.handshake_permit_freed() {
            return;
        }
        let completed = tls.handshake_done();
        live.handshake_permit = None;
        if let (true, Peer::Admitted(admitted)) = (completed, &live.peer) {
            self.server.conn.handshake_completed(admitted.peer);
        }
        self.admit_queued_handshakes();
    }

    /// Gives handshake permits, while the cap has room, to this worker's connections that
    /// have waited longest; they start reading at once.
    fn admit_queued_handshakes(&mut self) {
        loop {
            let Some(tls) = self.tls.as_mut() else {
                return;
            };
            let Some(&(index, generation)) = tls.queued.front() else {
                return;
            };
            let waiting = self
                .slots
                .get_mut(index as usize)
                .filter(|slot| slot.generation & 0xFF_FFFF == generation)
                .and_then(|slot| slot.live.as_mut())
                .filter(|live| matches!(&live.connection, Echo::Tls(tls) if tls.is_queued()));
            let Some(live) = waiting else {
                tls.queued.pop_front(); // closed, or its slot reused since
                continue;
            };
            let Some(permit) = tls.server.handshakes().try_acquire() else {
                return;
            };
            tls.queued.pop_front();
            live.handshake_permit = Some(permit);
            let mut actions = std::mem::take(&mut self.actions);
            if let Some(connection) = live.connection.tls() {
                connection.begin_handshake(&mut self.scratch, &mut actions);
            }
            self.apply(index, actions);
        }
    }

    /// Watches the handshake cap's room descriptor (with TLS listeners), as `arm_room` does
    /// the connection limit's.
    fn arm_handshake_room(&mut self) {
        if let Some(tls) = &self.tls {
            let fd = tls.server.handshakes().room_fd().as_raw_fd();
            self.push(sqe::poll_in_multi(fd).user_data(token(Kind::HandshakeRoom, 0, 0)));
        }
    }

    // ---- echoing ----

    fn received(&mut self, index: u32, generation: u32, result: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        if bid.is_some() {
            self.buffers_held += 1;
        }
        let recv = RecvResult {
            result,
            bid,
            more: cqueue::more(flags),
        };
        let mut actions = std::mem::take(&mut self.actions);
        let (now, multishot, lifecycle) = (self.now, self.multishot, &self.server.conn);
        match self
            .slots
            .get_mut(index as usize)
            .filter(|slot| slot.generation & 0xFF_FFFF == generation)
            .and_then(|slot| slot.live.as_mut())
        {
            Some(Live {
                peer, connection, ..
            }) => {
                let payload = connection.received(
                    recv,
                    multishot,
                    &self.pool,
                    &mut self.scratch,
                    now,
                    &mut actions,
                    |header| {
                        // The header is complete: admission decides on the client it names (a
                        // refusal is counted and logged there).
                        let Peer::AwaitingHeader { proxy, listener } = *peer else {
                            return false;
                        };
                        match lifecycle.admit_proxied(listener, proxy, header) {
                            Ok(admitted) => {
                                *peer = Peer::Admitted(admitted);
                                true
                            }
                            Err(_) => false,
                        }
                    },
                );
                if payload > 0 {
                    lifecycle.received(payload);
                }
            }
            // Cannot happen (a slot is freed only with no operation in flight), but a buffer
            // must never be lost.
            None => actions.extend(bid.map(Action::GiveBack)),
        }
        self.apply(index, actions);
    }

    fn sent(&mut self, index: u32, generation: u32, result: i32) {
        let mut actions = std::mem::take(&mut self.actions);
        let now = self.now;
        if let Some(live) = self
            .slots
            .get_mut(index as usize)
            .filter(|slot| slot.generation & 0xFF_FFFF == generation)
            .and_then(|slot| slot.live.as_mut())
        {
            let sent =
                live.connection
                    .sent(result, &self.pool, &mut self.scratch, now, &mut actions);
            if sent > 0 {
                self.server.conn.sent(sent);
            }
        }
        self.apply(index, actions);
    }

    /// Carries out connection `index`'s actions, in order.
    fn apply(&mut self, index: u32, mut actions: Vec<Action>) {
        let generation = self.slots[index as usize].generation;
        for action in actions.drain(..) {
            let fd = match &self.slots[index as usize].live {
                Some(live) => live.stream.as_raw_fd(),
                None => -1,
            };
            match action {
                Action::Recv => {
                    self.push(sqe::recv(fd, self.multishot, RECV_LIMIT).user_data(token(
                        Kind::Recv,
                        index,
                        generation,
                    )))
                }
                Action::CancelRecv => self.push(sqe::cancel(token(Kind::Recv, index, generation))),
                Action::SendPool { bid, offset, len } => {
                    let data = self.pool.send_ptr(bid, offset, len);
                    self.push(sqe::send(fd, data, len, true).user_data(token(
                        Kind::Send,
                        index,
                        generation,
                    )));
                }
                Action::SendOwn => {
                    let live = self.slots[index as usize].live.as_ref().expect("live slot");
                    let data = live.connection.own_unsent();
                    let entry = sqe::send(fd, data.as_ptr(), data.len() as u32, false)
                        .user_data(token(Kind::Send, index, generation));
                    self.own_sends += 1;
                    self.push(entry);
                }
                Action::GiveBack(bid) => {
                    self.pool.give_back(bid);
                    self.buffers_held -= 1;
                }
                Action::WaitForBuffer => {
                    self.waiting.push_back((index, generation));
                    self.buffer_waits += 1;
                }
                Action::UseSingleRecv => {
                    if self.multishot {
                        tracing::debug!(
                            worker = self.id,
                            "no capped multishot recv; using single recvs"
                        );
                        self.multishot = false;
                    }
                }
                Action::ShutdownSocket => {
                    if let Some(live) = &self.slots[index as usize].live {
                        let _ = live.stream.shutdown(Direction::Both);
                    }
                }
                Action::Close { half_close } => self.finish(index, half_close),
            }
        }
        self.actions = actions;
        if self.tls.is_some() {
            self.check_handshake(index);
        }
    }

    /// After a batch of completions: as many connections waiting for a buffer as there are
    /// free buffers arm their recv again. Done per batch, not per returned buffer, so a
    /// buffer returned in the same batch as (before) an ENOBUFS completion is not missed.
    fn resume_waiting(&mut self) {
        let mut free = usize::from(self.pool.count()) - self.buffers_held;
        while free > 0 {
            let Some((index, generation)) = self.waiting.pop_front() else {
                break;
            };
            let mut actions = std::mem::take(&mut self.actions);
            let took = self
                .slots
                .get_mut(index as usize)
                .filter(|slot| slot.generation & 0xFF_FFFF == generation)
                .and_then(|slot| slot.live.as_mut())
                .is_some_and(|live| {
                    live.connection
                        .buffer_available(&mut self.scratch, &mut actions)
                });
            self.apply(index, actions);
            if took {
                free -= 1;
            }
        }
    }

    /// Closes a connection that has nothing in flight, records its end (or, for one that
    /// never got past its PROXY header, the refusal), and frees its slots: the one place a
    /// connection ends.
    fn finish(&mut self, index: u32, half_close: bool) {
        let slot = &mut self.slots[index as usize];
        let Some(live) = slot.live.take() else {
            return;
        };
        let Live {
            stream,
            peer,
            permit,
            mut connection,
            handshake_permit,
        } = live;
        let tls = matches!(connection, Echo::Tls(_));
        debug_assert!(!connection.in_flight() && connection.pool_held() == 0);
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index);
        self.active -= 1;
        if half_close {
            // The client half-closed and has had every byte back: close our side too.
            let _ = stream.shutdown(Direction::Write);
        }
        drop(stream);
        let lifecycle = &self.server.conn;
        let bytes = connection.bytes();
        match (peer, connection.take_end()) {
            (Peer::Admitted(admitted), Ended::End(end)) => {
                if tls {
                    // A TLS connection's plaintext is counted when it ends (as in epoll).
                    lifecycle.echoed(bytes as usize);
                }
                lifecycle.close(admitted, bytes, &end)
            }
            // Cannot happen: the header phase is over once the client is admitted.
            (Peer::Admitted(admitted), Ended::Header(_) | Ended::Refused) => {
                lifecycle.close(admitted, bytes, &End::Shutdown)
            }
            // Admission counted and logged it.
            (Peer::AwaitingHeader { .. }, Ended::Refused) => {}
            (Peer::AwaitingHeader { proxy, .. }, Ended::Header(e)) => {
                lifecycle.refuse_because(proxy, Refusal::ProxyHeader, Some(&e))
            }
            (Peer::AwaitingHeader { proxy, .. }, Ended::End(end)) => lifecycle.refuse_because(
                proxy,
                Refusal::ProxyHeader,
                Some(&format_args!("{end} before the PROXY header")),
            ),
        }
        // A full server has room again: every ring's room poll fires.
        drop(permit);
        self.shared.unload(self.id);
        if handshake_permit.is_some() {
            drop(handshake_permit);
            self.admit_queued_handshakes();
        }
    }

    /// Ends a connection at the server's initiative: shutting the socket down completes its
    /// pending operations, whose completions then close it.
    fn end_connection(&mut self, index: u32, why: ServerEnd) {
        let mut actions = std::mem::take(&mut self.actions);
        if let Some(live) = self.slots[index as usize].live.as_mut() {
            live.connection.end(why, &mut self.scratch, &mut actions);
        }
        self.apply(index, actions);
    }

    // ---- timers and shutdown ----

    fn arm_sweep(&mut self) {
        if let Some(interval) = &self.sweep_interval {
            let entry = sqe::timeout(interval).user_data(token(Kind::Sweep, 0, 0));
            self.push(entry);
        }
    }

    /// Closes the connections whose PROXY header or TLS handshake is late and ends the idle
    /// ones.
    fn sweep(&mut self) {
        let idle = self.server.config.idle_timeout;
        let now = Instant::now();
        for index in 0..self.slots.len() as u32 {
            let mut actions = std::mem::take(&mut self.actions);
            if let Some(live) = self.slots[index as usize].live.as_mut() {
                live.connection
                    .sweep(now, idle, &mut self.scratch, &mut actions);
            }
            self.apply(index, actions);
        }
    }

    fn begin_shutdown(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        // Accepted while full, never admitted nor served: close them.
        self.parked.clear();
        self.server.conn.log_draining(
            self.shared.limit.live(),
            self.server.config.shutdown_timeout,
        );
        if self.active > 0 {
            let entry = sqe::timeout(&self.deadline).user_data(token(Kind::Deadline, 0, 0));
            self.push(entry);
        }
    }

    fn close_all_at_deadline(&mut self) {
        if self.active == 0 {
            return;
        }
        self.server.conn.log_deadline(self.active);
        for index in 0..self.slots.len() as u32 {
            self.end_connection(index, ServerEnd::Shutdown);
        }
    }
}

/// Errors of `io_uring_enter` after which reaping completions and trying again is right.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}
