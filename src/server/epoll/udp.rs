//! The epoll model's UDP side: `--workers` event loops (mio, edge-triggered), each owning a
//! duplicate of every `udp://` socket registered in its own `Poll`, beside the TCP workers.
//!
//! A loop receives in batches (`recvmmsg`, see `server/udp/batch.rs`) until it finds the queue
//! empty (a batch short of its slots, or `WouldBlock`), at most [`RECEIVE_BUDGET`] datagrams
//! per socket per turn (then it looks at its other sockets and polls with a zero timeout). It
//! runs each datagram through the policy and sends the batch's echoes at once with one
//! non-blocking `sendmmsg`. If the kernel's send buffer is full the unsent echoes stay in the
//! socket's batch and that socket is not read again until a writable edge lets them go out:
//! backpressure, as on TCP, instead of dropping them.
//!
//! Segment trains (`--udp-gro on`; off by default): each socket gets `UDP_GRO` before the
//! loops start, so a sender's train of equal datagrams (sent with one `UDP_SEGMENT` call, or
//! coalesced by the kernel on the way in) arrives as one message of a batch. The batch splits
//! it by the segment size the kernel gives, runs every datagram through the policy and the
//! counters on its own, and sends the admitted ones back as one `UDP_SEGMENT` message, which
//! the kernel cuts into the same datagrams again: one pass through the stack per train each
//! way instead of one per datagram. An ordinary client's datagrams arrive one per message as
//! before, at the cost of fresh receive headers for each batch that held one (nix keeps the
//! kernel's shortened control lengths otherwise). A kernel that refuses `UDP_GRO` leaves the
//! socket as it was (one warning); one that refuses a `UDP_SEGMENT` send gets the train's
//! datagrams one by one.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use mio::net::UdpSocket;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::socket::MsgFlags;

use crate::server::conn::Lifecycle;
use crate::server::udp::{enable_gro, is_transient, Batch, RECEIVE_BUDGET};
use crate::server::{Server, UdpGroMode};
use crate::shutdown::Shutdown;

const SHUTDOWN: Token = Token(usize::MAX);

/// One UDP socket of one loop.
struct Endpoint {
    socket: UdpSocket,
    /// The last edge said readable and the queue has not been seen empty since.
    readable: bool,
    /// The socket's batch, holding the echoes the send buffer had no room for.
    batch: Batch,
}

/// Sets `UDP_GRO` on every UDP socket with `--udp-gro on`: called before readiness is
/// announced, since a train queued before it is set arrives split (still exact, not whole).
/// A kernel that refuses it leaves the socket as it was, with one warning.
pub(crate) fn request_gro(server: &Server) {
    if server.config.udp_gro != UdpGroMode::On {
        return;
    }
    for socket in &server.udp {
        if let Err(e) = enable_gro(socket) {
            tracing::warn!("the kernel refused UDP_GRO ({e}); receiving one datagram per message");
        }
    }
}

/// Starts the UDP loops on `scope` (none without UDP sockets).
pub(super) fn spawn<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    server: &'scope Server,
) -> crate::Result<()> {
    if server.udp.is_empty() {
        return Ok(());
    }
    // Whatever set it (`request_gro`, before readiness), a socket with UDP_GRO delivers
    // trains, so its batches must split them.
    let gro: Vec<bool> = server
        .udp
        .iter()
        .map(|socket| {
            nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::UdpGroSegment)
                .unwrap_or(false)
        })
        .collect();
    for id in 0..server.config.workers.max(1) {
        let (poll, endpoints) = prepare(server, &gro)?;
        std::thread::Builder::new()
            .name(format!("epoll-udp-{id}"))
            .spawn_scoped(scope, move || {
                if let Err(e) = run(poll, endpoints, &server.conn, &server.shutdown) {
                    tracing::error!("the UDP loop failed: {e}");
                    server.shutdown.trigger();
                }
            })
            .map_err(|e| crate::Error::io("cannot start a UDP loop", e))?;
    }
    Ok(())
}

fn prepare(server: &Server, gro: &[bool]) -> crate::Result<(Poll, Vec<Endpoint>)> {
    let context = |e| crate::Error::io("cannot prepare the UDP sockets", e);
    let poll = Poll::new().map_err(context)?;
    let shutdown_fd = server.shutdown.as_fd().as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&shutdown_fd), SHUTDOWN, Interest::READABLE)
        .map_err(context)?;
    let mut endpoints = Vec::new();
    for (index, socket) in server.udp.iter().enumerate() {
        let socket = socket.try_clone().map_err(context)?;
        socket.set_nonblocking(true).map_err(context)?;
        let mut socket = UdpSocket::from_std(socket);
        poll.registry()
            .register(
                &mut socket,
                Token(index),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(context)?;
        endpoints.push(Endpoint {
            socket,
            // Datagrams may have queued before registration raised any edge.
            readable: true,
            batch: if gro[index] {
                Batch::default().with_gro()
            } else {
                Batch::default()
            },
        });
    }
    Ok((poll, endpoints))
}

fn run(
    mut poll: Poll,
    mut endpoints: Vec<Endpoint>,
    lifecycle: &Lifecycle,
    shutdown: &Shutdown,
) -> io::Result<()> {
    let mut events = Events::with_capacity(64);
    loop {
        if shutdown.is_triggered() {
            return Ok(());
        }
        let busy = endpoints
            .iter()
            .any(|e| e.readable && e.batch.pending() == 0);
        let timeout = busy.then_some(Duration::ZERO);
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let Some(endpoint) = endpoints.get_mut(event.token().0) else {
                continue; // the shutdown descriptor: checked at the top
            };
            if event.is_readable() || event.is_error() {
                endpoint.readable = true;
            }
            if event.is_writable() {
                flush(endpoint, lifecycle);
            }
        }
        if shutdown.is_triggered() {
            return Ok(());
        }
        for endpoint in &mut endpoints {
            serve_some(endpoint, lifecycle)?;
        }
    }
}

/// Receives and echoes up to the budget, until the queue is empty or echoes must wait.
fn serve_some(endpoint: &mut Endpoint, lifecycle: &Lifecycle) -> io::Result<()> {
    let mut budget = RECEIVE_BUDGET;
    while budget > 0 && endpoint.readable && endpoint.batch.pending() == 0 {
        match endpoint.batch.receive(endpoint.socket.as_fd(), lifecycle) {
            Ok(received) => {
                budget = budget.saturating_sub(received.max(1));
                // A short batch found the queue empty; a datagram arriving since raises a new
                // edge, so there is no need for a receive that would only find it empty.
                if received < endpoint.batch.slots() {
                    endpoint.readable = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                endpoint.readable = false;
                return Ok(());
            }
            Err(e) if is_transient(&e) => {
                budget -= 1;
                continue;
            }
            Err(e) => return Err(e),
        }
        flush(endpoint, lifecycle);
    }
    Ok(())
}

/// Sends the echoes not sent yet; what the send buffer has no room for waits for a writable
/// edge.
fn flush(endpoint: &mut Endpoint, lifecycle: &Lifecycle) {
    // Only `WouldBlock` comes back (an echo that fails on its own is counted and skipped).
    let _ = endpoint
        .batch
        .send(endpoint.socket.as_fd(), MsgFlags::MSG_DONTWAIT, lifecycle);
}
