//! The uring model's UDP side: `--workers` more rings, each on its own thread beside the TCP
//! rings, each receiving from every `udp://` socket (they share the sockets; the kernel gives
//! each datagram to one ring) and echoing with ring operations only.
//!
//! - **receive**: one multishot `recvmsg` per socket and ring with *buffer select*: the
//!   kernel keeps posting a completion per datagram, each in a buffer it picks from the ring's
//!   own pool of [`UDP_BUFFERS`] buffers ([`messages::BUFFER_LEN`] bytes each: room for the
//!   largest datagram, its source address and the kernel's header). A completion without
//!   "more" (a zero-length datagram ends a multishot receive, as does an empty pool) is
//!   armed again; an empty pool (ENOBUFS) waits until a send gives a buffer back. Where the
//!   kernel refuses multishot `recvmsg` (EINVAL), or with [`super::SINGLE_RECV_ENV`] set, the
//!   ring falls back to a few single `recvmsg` per socket, each into a buffer of its own.
//! - **policy**: every datagram goes through [`crate::server::conn::Lifecycle::admit_datagram`]
//!   (truncation, loop guard, allow/deny, `--udp-rate`), as in every model.
//! - **echo**: a `sendmsg` from the buffer the datagram arrived in, to the address the kernel
//!   wrote beside it. The buffer goes back to the pool (or to the next receive) only when
//!   that send has completed, so no buffer is ever reused while the kernel may still read it.
//!   A send waits for room in the socket's send buffer; meanwhile its buffer is held, and once
//!   every buffer is held the receives stop and datagrams wait in the kernel's queue (or are
//!   dropped there, as UDP allows): memory is bounded by the pool.
//! - **shutdown**: each ring polls the shutdown descriptor; when it fires the ring stops
//!   echoing at once, cancels everything in flight (an echo cancelled is counted as not
//!   sent), waits for every operation to complete and returns, while the TCP rings drain.
//!
//! Cost per ring: a thread, a ring, and a pool of [`UDP_BUFFERS`] buffers of 64 KiB (resident
//! only as far as datagrams fill them); per datagram one receive completion (no submission
//! while the multishot receive stays armed) and one `sendmsg` submission, submitted together
//! with everything else queued in one `io_uring_enter` per loop turn. Every ring's receive
//! is woken by each datagram, and one of them takes it.

mod messages;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::thread::Scope;

use io_uring::{cqueue, squeue, IoUring};

use super::buffers::BufferPool;
use super::setup::{self, Ring};
use super::sqe::{self, token, untoken, Kind};
use super::{BUFFER_GROUP, RING_ENTRIES, SINGLE_RECV_ENV};
use crate::server::udp::{is_transient, Received};
use crate::server::Server;
use messages::{Datagram, Messages, BUFFER_LEN};

/// Buffers per UDP ring: as many datagrams as one ring holds at once (in receives not yet
/// handled and echoes not yet sent).
pub const UDP_BUFFERS: u16 = 64;

/// Overrides [`UDP_BUFFERS`] (a power of two), for tests that need the pool to run dry.
pub const UDP_BUFFERS_ENV: &str = "MULTIECHO_URING_UDP_BUFFERS";

/// Single receives in flight per socket in the fallback: a few, since every datagram wakes
/// all of them.
const SINGLE_RECVS: usize = 8;

/// The `generation` of a receive's token: which mode posted it (its index is the socket's
/// for a multishot receive, the buffer's for a single one).
const MULTISHOT: u32 = 0;
const SINGLE: u32 = 1;

/// The number of buffers per UDP ring ([`UDP_BUFFERS_ENV`] or [`UDP_BUFFERS`]).
pub fn buffer_count() -> crate::Result<u16> {
    setup::count_from_env(UDP_BUFFERS_ENV, UDP_BUFFERS)
}

/// Makes the UDP rings, one per worker (none without `udp://` sockets), before any thread
/// serves, like the TCP rings.
pub fn rings(server: &Server) -> crate::Result<Vec<Ring>> {
    if server.udp.is_empty() {
        return Ok(Vec::new());
    }
    // The fallback gives every socket a buffer at least.
    let sockets = u16::try_from(server.udp.len().next_power_of_two()).unwrap_or(32768);
    let count = buffer_count()?.max(sockets);
    (0..server.config.workers.max(1))
        .map(|_| Ring::with_buffers(BufferPool::with_size(count, BUFFER_LEN)))
        .collect()
}

/// Runs each of `rings` on a thread of `scope`. A ring that fails logs why and triggers the
/// shutdown, as in the other models' UDP loops.
pub fn spawn<'scope>(
    scope: &'scope Scope<'scope, '_>,
    server: &'scope Server,
    rings: Vec<Ring>,
) -> crate::Result<()> {
    for (id, ring) in rings.into_iter().enumerate() {
        std::thread::Builder::new()
            .name(format!("uring-udp-{id}"))
            .spawn_scoped(scope, move || {
                let outcome = UdpRing::new(server, id, ring).and_then(|mut udp| udp.run());
                if let Err(e) = outcome {
                    tracing::error!("the UDP loop failed: {e}");
                    server.shutdown.trigger();
                }
            })
            .map_err(|e| crate::Error::io("cannot start a UDP ring", e))?;
    }
    Ok(())
}

/// How the ring receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A multishot receive per socket, into buffers the kernel picks.
    Multishot,
    /// A few single receives per socket, each into a buffer of its own.
    Single,
}

/// One `udp://` socket, as this ring serves it.
struct Endpoint {
    fd: RawFd,
    /// Multishot: its receive is armed.
    armed: bool,
    /// Multishot: its receive found the pool empty; armed again once a buffer is back.
    starved: bool,
    /// Single: its receives in flight.
    receiving: usize,
}

/// What a buffer is doing, as far as this ring is concerned.
#[derive(Debug, Clone, Copy)]
enum Use {
    /// Multishot: in the kernel's pool (or being handled). Single: free.
    Idle,
    /// Single: a receive on socket `socket` is writing it.
    Receiving { socket: usize },
    /// An echo of `len` bytes to `dest` is being sent from it.
    Sending { len: usize, dest: SocketAddr },
}

pub struct UdpRing<'a> {
    // Declared before `pool`, so it is dropped first: the kernel stops using the buffers
    // before they are freed.
    ring: IoUring,
    pool: BufferPool,
    messages: Messages,
    server: &'a Server,
    id: usize,
    mode: Mode,
    /// Multishot refused (EINVAL): switch to single receives once no multishot one is armed.
    fallback: bool,
    endpoints: Vec<Endpoint>,
    buffers: Vec<Use>,
    /// Multishot: buffers taken from the kernel's pool and not yet given back.
    held: usize,
    /// Single: buffers free for a receive.
    free: Vec<u16>,
    /// Operations submitted (or queued) whose last completion has not come yet.
    in_flight: usize,
    stopping: bool,
    /// The error that ended the ring (reported once everything in flight has completed).
    failure: Option<io::Error>,
    backlog: VecDeque<squeue::Entry>,
    completions: Vec<(u64, i32, u32)>,
    /// How often a receive found the pool empty (reported at debug level at the end).
    buffer_waits: u64,
}

impl<'a> UdpRing<'a> {
    /// A UDP ring on `ring`; must run on the thread that will drive it.
    fn new(server: &'a Server, id: usize, ring: Ring) -> io::Result<Self> {
        let Ring {
            ring,
            pool,
            disabled,
        } = ring;
        if disabled {
            // A single-issuer ring belongs to the thread that enables it.
            ring.submitter().register_enable_rings().map_err(|e| {
                io::Error::new(e.kind(), format!("cannot enable the io_uring: {e}"))
            })?;
        }
        let count = pool.count();
        let mode = if std::env::var_os(SINGLE_RECV_ENV).is_some() {
            Mode::Single
        } else {
            Mode::Multishot
        };
        tracing::debug!(worker = id, buffers = count, ?mode, "UDP ring ready");
        Ok(UdpRing {
            ring,
            pool,
            messages: Messages::new(count),
            server,
            id,
            mode,
            fallback: false,
            endpoints: server
                .udp
                .iter()
                .map(|socket| Endpoint {
                    fd: socket.as_raw_fd(),
                    armed: false,
                    starved: false,
                    receiving: 0,
                })
                .collect(),
            buffers: vec![Use::Idle; usize::from(count)],
            held: 0,
            free: Vec::new(),
            in_flight: 0,
            stopping: false,
            failure: None,
            backlog: VecDeque::new(),
            completions: Vec::with_capacity(RING_ENTRIES as usize * 4),
            buffer_waits: 0,
        })
    }

    /// Serves until the shutdown, or until a receive fails for good; returns once nothing is
    /// in flight.
    fn run(&mut self) -> io::Result<()> {
        let shutdown_fd = self.server.shutdown.as_fd().as_raw_fd();
        self.submit(sqe::poll_in(shutdown_fd).user_data(token(Kind::ShutdownSignal, 0, 0)));
        match self.mode {
            Mode::Multishot => (0..self.endpoints.len()).for_each(|socket| self.arm(socket)),
            Mode::Single => self.start_single(),
        }
        loop {
            if self.stopping && self.in_flight == 0 {
                break;
            }
            self.flush_backlog();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if is_transient_enter(&e) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("io_uring enter failed: {e}"),
                    ))
                }
            }
            let mut completions = std::mem::take(&mut self.completions);
            completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(user_data, result, flags) in &completions {
                self.complete(user_data, result, flags);
            }
            completions.clear();
            self.completions = completions;
            self.resume();
        }
        // Nothing of ours uses the buffers any more; stop the kernel from using them too.
        let _ = self.ring.submitter().unregister_buf_ring(BUFFER_GROUP);
        tracing::debug!(
            worker = self.id,
            mode = ?self.mode,
            buffer_waits = self.buffer_waits,
            "UDP ring stopped"
        );
        self.failure.take().map_or(Ok(()), Err)
    }

    /// Queues a submission that will complete (counted in flight until it has).
    fn submit(&mut self, entry: squeue::Entry) {
        self.in_flight += 1;
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

    fn complete(&mut self, user_data: u64, result: i32, flags: u32) {
        let (kind, index, generation) = untoken(user_data);
        match kind {
            Some(Kind::Recv) if generation == MULTISHOT => {
                self.received_multishot(index as usize, result, flags)
            }
            Some(Kind::Recv) => self.received_single(index as u16, result),
            Some(Kind::Send) => self.sent(index as u16, result),
            Some(Kind::ShutdownSignal) => {
                self.in_flight -= 1;
                if result != -libc::ECANCELED {
                    self.stop();
                }
            }
            Some(Kind::Cancel) => self.in_flight -= 1,
            _ => {
                debug_assert!(false, "UDP completion with token {user_data:#x}");
                tracing::warn!(user_data, "UDP completion with an unknown token ignored");
            }
        }
    }

    /// Stops at once: no more echoes, everything in flight cancelled.
    fn stop(&mut self) {
        if !self.stopping {
            self.stopping = true;
            self.submit(messages::cancel_all());
        }
    }

    /// Ends the ring with `err` once everything in flight has completed.
    fn fail(&mut self, err: io::Error) {
        self.failure.get_or_insert(err);
        self.stop();
    }

    // ---- receiving ----

    fn arm(&mut self, socket: usize) {
        let endpoint = &mut self.endpoints[socket];
        endpoint.armed = true;
        endpoint.starved = false;
        let entry = self
            .messages
            .recv_multishot(endpoint.fd, token(Kind::Recv, socket as u32, MULTISHOT));
        self.submit(entry);
    }

    fn received_multishot(&mut self, socket: usize, result: i32, flags: u32) {
        let Some(endpoint) = self.endpoints.get_mut(socket) else {
            return;
        };
        let more = cqueue::more(flags);
        if !more {
            endpoint.armed = false;
            self.in_flight -= 1;
        }
        if let Some(bid) = cqueue::buffer_select(flags) {
            self.held += 1;
            let datagram = self
                .messages
                .parse_multishot(&self.pool, bid, result.max(0) as usize);
            self.serve(socket, bid, datagram);
        } else if result < 0 {
            self.receive_error(socket, -result);
        }
        let endpoint = &self.endpoints[socket];
        if !more && !self.stopping && !self.fallback && !endpoint.starved {
            self.arm(socket);
        }
    }

    fn received_single(&mut self, bid: u16, result: i32) {
        self.in_flight -= 1;
        let Some(&Use::Receiving { socket }) = self.buffers.get(usize::from(bid)) else {
            debug_assert!(
                false,
                "a receive completed into buffer {bid}, not receiving"
            );
            return;
        };
        self.buffers[usize::from(bid)] = Use::Idle;
        self.endpoints[socket].receiving -= 1;
        if result < 0 {
            self.free.push(bid);
            self.receive_error(socket, -result);
            return;
        }
        let datagram = self.messages.parse_single(&self.pool, bid, result as usize);
        self.serve(socket, bid, datagram);
    }

    fn receive_error(&mut self, socket: usize, errno: i32) {
        match errno {
            libc::ENOBUFS if self.mode == Mode::Multishot => {
                self.endpoints[socket].starved = true;
                self.buffer_waits += 1;
            }
            libc::ECANCELED => {}
            libc::EINVAL if self.mode == Mode::Multishot => {
                if !self.fallback {
                    tracing::debug!(worker = self.id, "no multishot recvmsg; using single ones");
                    self.fallback = true;
                }
            }
            _ => {
                let err = io::Error::from_raw_os_error(errno);
                if is_transient(&err) {
                    tracing::debug!("UDP receive failed: {err}; retrying");
                } else {
                    self.fail(err);
                }
            }
        }
    }

    /// After a batch of completions: starved receives are armed again if a buffer is back;
    /// the fallback starts once no multishot receive is armed; single receives are topped up.
    fn resume(&mut self) {
        if self.stopping {
            return;
        }
        if self.mode == Mode::Multishot {
            if !self.fallback {
                if self.held < usize::from(self.pool.count()) {
                    for socket in 0..self.endpoints.len() {
                        if self.endpoints[socket].starved {
                            self.arm(socket);
                        }
                    }
                }
                return;
            }
            if self.endpoints.iter().any(|e| e.armed) {
                return;
            }
            self.start_single();
            return;
        }
        self.fill_single();
    }

    /// Switches to single receives: every buffer not being sent from is free (the kernel's
    /// pool is not used again, since no receive selects from it any more).
    fn start_single(&mut self) {
        self.mode = Mode::Single;
        self.free = (0..self.pool.count())
            .filter(|&bid| matches!(self.buffers[usize::from(bid)], Use::Idle))
            .rev()
            .collect();
        self.fill_single();
    }

    /// Posts single receives, in turn over the sockets, up to each one's share.
    fn fill_single(&mut self) {
        let share =
            (usize::from(self.pool.count()) / self.endpoints.len().max(1)).clamp(1, SINGLE_RECVS);
        loop {
            let mut posted = false;
            for socket in 0..self.endpoints.len() {
                if self.endpoints[socket].receiving >= share {
                    continue;
                }
                let Some(bid) = self.free.pop() else {
                    return;
                };
                self.buffers[usize::from(bid)] = Use::Receiving { socket };
                self.endpoints[socket].receiving += 1;
                let fd = self.endpoints[socket].fd;
                let entry = self.messages.recv_single(
                    fd,
                    &self.pool,
                    bid,
                    token(Kind::Recv, u32::from(bid), SINGLE),
                );
                self.submit(entry);
                posted = true;
            }
            if !posted {
                return;
            }
        }
    }

    // ---- echoing ----

    /// Runs the datagram buffer `bid` holds through the policy and echoes it from there, or
    /// lets the buffer go.
    fn serve(&mut self, socket: usize, bid: u16, datagram: Option<Datagram>) {
        let Some(datagram) = datagram.filter(|_| !self.stopping) else {
            // After the shutdown, or nothing to answer (no address a UDP socket reports).
            self.release(bid);
            return;
        };
        let received = Received {
            len: datagram.len,
            source: datagram.source,
            truncated: datagram.truncated,
        };
        if !self.server.conn.admit_datagram(&received) {
            self.release(bid);
            return;
        }
        self.buffers[usize::from(bid)] = Use::Sending {
            len: datagram.len,
            dest: datagram.source,
        };
        let fd = self.endpoints[socket].fd;
        let entry = self.messages.echo(
            fd,
            &self.pool,
            bid,
            &datagram,
            token(Kind::Send, u32::from(bid), 0),
        );
        self.submit(entry);
    }

    fn sent(&mut self, bid: u16, result: i32) {
        self.in_flight -= 1;
        let Some(&Use::Sending { len, dest }) = self.buffers.get(usize::from(bid)) else {
            debug_assert!(false, "a send completed from buffer {bid}, not sending");
            return;
        };
        self.buffers[usize::from(bid)] = Use::Idle;
        let lifecycle = &self.server.conn;
        match usize::try_from(result) {
            Ok(sent) if sent == len => lifecycle.datagram_echoed(len),
            Ok(sent) => lifecycle.datagram_send_failed(
                dest,
                &io::Error::other(format!("sent {sent} of {len} bytes")),
            ),
            Err(_) => lifecycle.datagram_send_failed(dest, &io::Error::from_raw_os_error(-result)),
        }
        self.release(bid);
    }

    /// Buffer `bid` is done with: back to the kernel's pool, or free for a single receive.
    fn release(&mut self, bid: u16) {
        self.buffers[usize::from(bid)] = Use::Idle;
        match self.mode {
            Mode::Multishot => {
                self.pool.give_back(bid);
                self.held -= 1;
            }
            Mode::Single => self.free.push(bid),
        }
    }
}

/// Errors of `io_uring_enter` after which reaping completions and trying again is right.
fn is_transient_enter(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}
