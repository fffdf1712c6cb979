//! `uring`: io_uring submission and completion rings, one per worker thread (and one more per
//! worker for UDP).
//!
//! # How it works
//! Each of the `--workers` threads owns one ring and one pool of receive buffers, and runs a
//! loop of "submit everything queued, wait for at least one completion, handle all
//! completions". Every socket operation is a ring operation:
//! - **accept**: one multishot accept per listener and ring (all rings share the listening
//!   sockets), which keeps posting a completion per new connection. The kernel hands every
//!   connection to the first armed accept, so a worker serving a few (`BALANCE_SLACK`) more
//!   connections than the least loaded one hands the new one over (a mailbox plus a wake-up
//!   descriptor each ring polls);
//! - **recv**: one multishot recv per connection with *buffer select*: the kernel picks a
//!   buffer from this worker's registered buffer ring only when data arrives, so an idle
//!   connection holds no buffer at all, and keeps posting a completion per arrival without a
//!   new submission. Each recv ends after [`RECV_LIMIT`] bytes and is armed again (Linux
//!   6.16 caps it; older kernels refuse the cap, and the worker falls back to one recv per
//!   message that waits for data before trying);
//! - **send**: the received buffer is sent back with "don't wait", so the send completes at
//!   once. Whole, the buffer goes back to the kernel. Short (or EAGAIN), the client is not
//!   reading as fast as it sends: the echo is *stalled*, and what is left of it, and of any
//!   buffer queued behind it, is copied into the connection's own buffer; the pool buffers go
//!   back at once, and the rest goes out from there with a send that waits for room, resuming
//!   at exactly the first unsent byte. Data that arrives while a send is in flight waits
//!   behind it, and the connection's recv is cancelled at once; it is armed again only when
//!   everything is out (backpressure: a client that does not read its echo stops being read).
//!   So a connection holds pool buffers only for echoes that go out at once, and a client
//!   that never reads holds none, only its own buffer (at most one recv's [`RECV_LIMIT`]
//!   plus the echo it interrupted), freed when it catches up.
//! - timers (the sweep for idle connections and late PROXY headers, accept back-off, shutdown
//!   deadline) are Timeout operations, and a PollAdd on the shutdown descriptor tells every
//!   ring when SIGINT/SIGTERM arrives.
//!
//! Every submission carries a `user_data` token of (operation kind, connection slot,
//! generation); a completion whose generation does not match its slot is stale and touches
//! nothing. A recv that finds the pool empty completes with ENOBUFS: the connection waits in
//! a queue and its recv is posted again once buffers are free (checked after every batch of
//! completions, as many as there are free buffers). A full submission queue is
//! submitted and retried (and entries the kernel cannot take yet wait in a backlog); completion
//! overflow is left to the kernel (FEAT_NODROP) and reaped on the next enter.
//!
//! # Costs
//! Per worker: a ring (about 130 KiB of mapped queues) and a buffer pool of [`BUFFER_SIZE`]
//! buffers; the workers share [`POOL_BYTES`] of them, resident only once used (the
//! environment variable [`BUFFERS_ENV`] overrides the number per worker). Per
//! connection: a socket and a slot of a couple of hundred bytes; no buffer while idle
//! (measured: 7.4 MiB total RSS with 10,000 idle connections). Submissions are batched: one
//! `io_uring_enter` per loop turn both submits everything queued and waits, and a send
//! usually completes inline. Under load a turn handles dozens of round trips (measured: 20 to
//! 40 per `io_uring_enter` at 50 connections).
//!
//! # Limits and connection handling
//! `--max-conns` is the lifecycle's [`Limit`], shared by the workers: an accepted connection
//! takes a [`Permit`] as its completion is handled, and at the limit a worker cancels its
//! accepts (clients wait in the listen backlog) and re-arms them when a connection ends
//! anywhere (every ring keeps a multishot poll on the limit's room descriptor). Connections a
//! multishot accept delivered just before its cancellation took effect are parked unserved,
//! with no permit, until there is room. Accept errors follow
//! [`crate::net::classify_accept_error`]: out of descriptors or memory warns once and re-arms
//! after [`crate::net::ACCEPT_BACKOFF`]. `--idle-timeout` is a periodic sweep that shuts idle
//! sockets down, which completes their pending operation so the connection closes. When the
//! client half-closes, the server finishes echoing what it queued, then shuts its write side
//! and closes.
//! Clients that never read cannot take the pool from the others: their stalled echoes wait in
//! their own buffers (see **send** above).
//!
//! # The PROXY protocol
//! On a `tcp+proxy://` listener a connection from a trusted proxy starts in a header phase
//! (see `connection`): its receives go to the lifecycle's sans-I/O header parser and each
//! buffer goes back at once, so a connection still sending its header holds no pool buffer
//! (only the parser's copy of a header split over receives, at most 4 KiB). Once the header is
//! complete the client it names is admitted, and what followed the header in the same buffer
//! is echoed from that buffer. A bad, truncated or late header (`--proxy-timeout`, enforced by
//! the sweep) closes that connection alone with one refusal line, as in every model. A refused
//! header costs a ring slot, a permit and a couple of receives, nothing more.
//!
//! # TLS
//! On `tls://` and `tls+proxy://` listeners a connection runs `tls_connection` instead: every
//! received pool buffer goes to its rustls session (which processes it or copies what the echo
//! does not let it take yet) and back to the kernel in the same step, and ciphertext goes out
//! from the connection's own buffer; the recv is armed only while the session wants input. A
//! connection handshakes only with a permit under the server's handshake cap; without one it
//! waits unread and takes one, oldest first, when the cap's room descriptor (polled by every
//! ring) fires. On `tls+proxy://` the PROXY header is read first (with a permit), then the rest
//! of that buffer goes to the session and the handshake timeout starts again. The sweep ends
//! late handshakes; plaintext bytes are counted when the connection ends.
//!
//! # Shutdown
//! On SIGINT/SIGTERM each ring cancels its accepts, lets live connections finish for
//! `--shutdown-timeout`, then shuts the remaining sockets down, waits for their operations to
//! complete, and returns.
//!
//! # UDP
//! `udp://` sockets (and datagram sockets passed by socket activation) are served by
//! `--workers` more rings, each on its own thread beside the TCP rings (see `udp`): one
//! multishot `recvmsg` per socket and ring with buffer select, from a pool of [`UDP_BUFFERS`]
//! buffers of 64 KiB per ring (room for the largest datagram; `MSG_TRUNC` is checked for every
//! completion), every datagram through the one UDP policy, and a `sendmsg` of the echo from the
//! buffer it arrived in, to the address the kernel wrote beside it. A buffer goes back to the pool
//! only when its send has completed. Where the kernel refuses multishot `recvmsg`, single
//! `recvmsg` operations take its place. Cost: a thread, a ring and a pool (resident only as far as
//! datagrams fill it) per UDP ring; per datagram one completion and one submission, batched with
//! everything else in one `io_uring_enter` per turn; every ring is woken by each datagram. At
//! shutdown the UDP rings cancel what is in flight and stop at once while the TCP rings drain.
//!
//! # Kernel features
//! Linux 6.0 or later: multishot accept and registered buffer rings (both 5.19) and
//! multishot recv (6.0); the probe checks the opcodes and registers a test buffer ring. Where io_uring is missing or disabled
//! (ENOSYS, EPERM from seccomp or `kernel.io_uring_disabled`), [`serve`] returns
//! [`crate::Error::Unsupported`] before serving. On 6.1+ rings use single-issuer and deferred
//! task running, which saves interrupts and context switches. Every ring is created before
//! any worker serves, so a failure is reported at start.
//!
//! Measured on loopback against the C epoll reference (`--workers 1`, both pinned to one
//! core, runs interleaved): round trips per second and server CPU per round trip on par
//! (see BENCHMARKS.md); most of that CPU is the TCP stack, common to both.

//!
//! # Layout
//! `setup` (probe, rings, buffer counts), `buffers` (the provided buffer ring), `sqe` (tokens,
//! entries, submission), `connection` (one connection's echo as a sans-I/O state machine,
//! tested without a ring), `tls_connection` (the same for TLS, also tested without a ring),
//! `echo` (plain or TLS, as the worker holds them), `worker` (the loop that drives a ring) and
//! `udp` (the UDP rings, with their buffer layout and message headers in `udp/messages`). All
//! of the model's `unsafe` is in `buffers`, `sqe` and `udp/messages`.

mod buffers;
mod connection;
mod echo;
mod setup;
mod sqe;
mod tls_connection;
mod udp;
mod worker;

use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::server::conn::limit::{Limit, Permit};
use crate::server::Server;
use crate::wake::Wake;
use setup::Ring;
use worker::RingWorker;

pub use setup::probe;
pub use udp::{UDP_BUFFERS, UDP_BUFFERS_ENV};

/// The size of one receive buffer.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// Buffer memory of all workers together (each worker gets a power-of-two share).
pub const POOL_BYTES: usize = 4 * 1024 * 1024;

/// Overrides the number of buffers per worker (a power of two), for tests that need the pool
/// to run dry and for tuning.
pub const BUFFERS_ENV: &str = "MULTIECHO_URING_BUFFERS";

/// Makes every worker use one recv per message, as on kernels without capped multishot recv
/// (before 6.16), and every UDP ring single `recvmsg`s, as where multishot `recvmsg` is
/// refused, so tests and comparisons can run those paths anywhere.
pub const SINGLE_RECV_ENV: &str = "MULTIECHO_URING_SINGLE_RECV";

/// Submission queue entries per ring; the completion queue has four times as many.
const RING_ENTRIES: u32 = 1024;

/// A worker that accepts a connection while serving this many more than the least loaded
/// worker hands it over to that one. Needed because a multishot accept would otherwise take
/// them all: the kernel wakes the first waiter on the listener, and that one stays armed.
const BALANCE_SLACK: usize = 4;

/// What one multishot recv may take in total before it ends and is armed again: one buffer's
/// worth, so a connection whose echo is stuck holds few buffers (it is also cancelled as soon
/// as a second buffer arrives before the first is sent).
const RECV_LIMIT: u32 = BUFFER_SIZE as u32;

/// The buffer group id of every worker's (only) buffer ring.
const BUFFER_GROUP: u16 = 0;

/// Runs the uring model.
pub fn serve(server: &Server) -> crate::Result<()> {
    probe()?;
    let workers = server.config.workers.max(1);
    let shared = RingDirectory {
        limit: Limit::new(server.config.max_conns)
            .map_err(|e| crate::Error::io("cannot create the connection limit", e))?,
        workers: (0..workers)
            .map(|_| {
                Ok(Mailbox {
                    wake: Wake::new()?,
                    load: AtomicUsize::new(0),
                    inbox: Mutex::new(Vec::new()),
                })
            })
            .collect::<io::Result<_>>()
            .map_err(|e| crate::Error::io("cannot create wake-up descriptors", e))?,
    };
    let buffers = setup::buffer_count(workers)?;
    // Every ring and pool is made here, before any worker serves: made later, a worker could
    // find the descriptors used up by the connections others have accepted meanwhile.
    let rings = (0..workers)
        .map(|_| Ring::new(buffers))
        .collect::<crate::Result<Vec<_>>>()?;
    let udp_rings = udp::rings(server)?;
    std::thread::scope(|scope| {
        if let Err(e) = udp::spawn(scope, server, udp_rings) {
            // The rings already started stop with the shutdown.
            server.shutdown.trigger();
            return Err(e);
        }
        let handles = rings
            .into_iter()
            .enumerate()
            .map(|(id, ring)| {
                let shared = &shared;
                std::thread::Builder::new()
                    .name(format!("uring-{id}"))
                    .spawn_scoped(scope, move || {
                        let result = RingWorker::new(server, shared, id, ring)
                            .and_then(|mut worker| worker.run());
                        if result.is_err() {
                            // Bring the other workers down too: the server has failed.
                            server.shutdown.trigger();
                        }
                        result
                    })
                    .map_err(|e| crate::Error::io("cannot start a worker thread", e))
            })
            .collect::<Vec<_>>();
        let mut first_error = None;
        for handle in handles {
            let result = match handle {
                Ok(handle) => handle.join().unwrap_or_else(|_| {
                    Err(crate::Error::io(
                        "a worker panicked",
                        io::Error::other("panic"),
                    ))
                }),
                Err(e) => {
                    server.shutdown.trigger();
                    Err(e)
                }
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}

/// What the workers share: the connection limit and each worker's mailbox.
struct RingDirectory {
    /// `--max-conns`; every ring polls its room descriptor, so that a worker that stopped
    /// accepting at the limit starts again when a connection ends anywhere.
    limit: Arc<Limit>,
    workers: Vec<Mailbox>,
}

/// A connection as accepted: its stream and the index of the listener it came from (which
/// says whether it begins with a PROXY header).
struct Incoming {
    stream: TcpStream,
    listener: usize,
}

/// How other workers reach one worker: connections handed over to it (each with its slot
/// under the limit), its load, and a wake-up descriptor its ring always polls (written for a
/// hand-over).
struct Mailbox {
    wake: Wake,
    load: AtomicUsize,
    inbox: Mutex<Vec<(Incoming, Permit)>>,
}

impl RingDirectory {
    /// A connection counted for worker `id` by [`RingDirectory::assign`] ended (or was refused).
    fn unload(&self, id: usize) {
        self.workers[id].load.fetch_sub(1, Ordering::Relaxed);
    }

    /// The worker that should serve a connection accepted by worker `id`: itself, unless it
    /// serves [`BALANCE_SLACK`] more than the least loaded one. Counts the connection there.
    fn assign(&self, id: usize) -> usize {
        let load = |w: usize| self.workers[w].load.load(Ordering::Relaxed);
        let least = (0..self.workers.len())
            .min_by_key(|&w| load(w))
            .unwrap_or(id);
        let target = if load(id) > load(least) + BALANCE_SLACK {
            least
        } else {
            id
        };
        self.workers[target].load.fetch_add(1, Ordering::Relaxed);
        target
    }
}
