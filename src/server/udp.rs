//! UDP sockets for `udp://` listeners, and what every model's UDP loop shares: binding, the
//! batch that receives with `recvmmsg` and echoes with `sendmmsg` ([`Batch`], in `batch.rs`),
//! and the blocking loop of iterative, prefork and pool.
//!
//! Every datagram goes back to its sender byte-exact: each receive slot ([`BUFFER_SIZE`])
//! holds the largest datagram there is (65,507 bytes over IPv4, 65,527 over IPv6), and the
//! kernel's `MSG_TRUNC` flag is checked for every message anyway, so a datagram is echoed whole
//! or not at all. A zero-length datagram is echoed as zero bytes. Before the echo every
//! datagram goes through the one UDP policy, [`Lifecycle::admit_datagram`] (loop guard,
//! allow/deny, `--udp-rate`), one message at a time even when they arrive in one batch.
//!
//! Shutdown: every UDP loop watches the shutdown descriptor and stops at once when it fires
//! (datagrams have no drain); the TCP side of the same server drains as usual.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use nix::sys::socket::{MsgFlags, SockaddrStorage};
use socket2::{Domain, Protocol, Socket, Type};

use crate::server::conn::Lifecycle;
use crate::shutdown::Shutdown;
use crate::wake::poll_readable;

/// A receive buffer larger than any UDP datagram (the IPv6 maximum is 65,527 bytes).
pub const BUFFER_SIZE: usize = 64 * 1024;
/// The receive buffer the kernel is asked for: enough for dozens of the largest datagrams, so
/// bursts from several senders are not dropped before the server reads them.
const SOCKET_RECEIVE_BUFFER: usize = 4 << 20;
/// Datagrams a loop takes from one socket before it looks at the others (and at shutdown
/// and, in the event loops, at their other events): a few batches.
pub const RECEIVE_BUDGET: usize = 4 * BATCH_SLOTS;

mod batch;
pub use batch::{enable_gro, Batch, BATCH_SLOTS};

/// One received datagram, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub source: SocketAddr,
    /// The datagram was longer than its buffer (`MSG_TRUNC`): it must not be echoed.
    pub truncated: bool,
}

/// Binds a UDP socket for `addr`. No SO_REUSEADDR (on UDP it would let a second server share
/// the port); IPv6 sockets are IPv6-only, as for TCP listeners.
pub fn bind(addr: SocketAddr) -> crate::Result<UdpSocket> {
    let context = || format!("cannot listen on udp://{addr}");
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| crate::Error::io(context(), e))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(|e| crate::Error::io(context(), e))?;
    }
    // Beyond net.core.rmem_max only root may ask (SO_RCVBUFFORCE); a smaller buffer still works.
    if nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::RcvBufForce,
        &SOCKET_RECEIVE_BUFFER,
    )
    .is_err()
    {
        let _ = socket.set_recv_buffer_size(SOCKET_RECEIVE_BUFFER);
    }
    socket
        .bind(&addr.into())
        .map_err(|e| crate::Error::io(context(), e))?;
    Ok(socket.into())
}

fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
    } else {
        addr.as_sockaddr_in6()
            .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
    }
}

/// Whether a receive error is one the loop survives: an ICMP error queued from an earlier
/// echo (the peer's port was closed), or a transient shortage. Anything else ends the loop.
pub fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EINTR
        )
    ) || err.kind() == io::ErrorKind::InvalidData
}

/// The blocking UDP loop of iterative, prefork and pool: waits on every socket and the
/// shutdown descriptor (`poll`), then serves each readable socket in batches until its queue
/// is empty or [`RECEIVE_BUDGET`] datagrams have been taken. The sockets are blocking, so
/// `sendmmsg` waits for room in a full send buffer, as TCP's `write_all` does. Several threads
/// or processes may run it on the same sockets: the kernel gives each datagram to one of
/// them; the others find the queue empty. Returns at shutdown, or with the error that ended it.
pub fn serve_blocking(
    sockets: &[UdpSocket],
    lifecycle: &Lifecycle,
    shutdown: &Shutdown,
) -> io::Result<()> {
    let mut batches: Vec<Batch> = sockets.iter().map(|_| Batch::default()).collect();
    loop {
        if shutdown.is_triggered() {
            return Ok(());
        }
        let mut fds = vec![shutdown.as_fd()];
        fds.extend(sockets.iter().map(|s| s.as_fd()));
        let ready = poll_readable(&fds, None)?;
        let readable = sockets.iter().zip(&mut batches).zip(&ready[1..]);
        for ((socket, batch), _) in readable.filter(|(_, r)| **r) {
            let mut budget = RECEIVE_BUDGET;
            while budget > 0 {
                if shutdown.is_triggered() {
                    return Ok(());
                }
                let drained = match batch.receive(socket.as_fd(), lifecycle) {
                    Ok(received) => {
                        budget = budget.saturating_sub(received.max(1));
                        received < batch.slots()
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if is_transient(&e) => {
                        budget -= 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                // Blocking: `WouldBlock` cannot come back, so any error ends the loop.
                batch.send(socket.as_fd(), MsgFlags::empty(), lifecycle)?;
                if drained {
                    // The queue was empty: `poll` says when more comes, without the
                    // `recvmmsg` that would only find it empty.
                    break;
                }
            }
        }
    }
}

/// Runs [`serve_blocking`] on `threads` threads of `scope` (none without UDP sockets). A loop
/// that fails logs why and triggers the shutdown, as a fatal accept error does.
pub fn spawn_blocking<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    threads: usize,
    sockets: &'scope [UdpSocket],
    lifecycle: &'scope Lifecycle,
    shutdown: &'scope Shutdown,
) -> crate::Result<()> {
    if sockets.is_empty() {
        return Ok(());
    }
    for id in 0..threads.max(1) {
        std::thread::Builder::new()
            .name(format!("udp-{id}"))
            .spawn_scoped(scope, move || {
                if let Err(e) = serve_blocking(sockets, lifecycle, shutdown) {
                    tracing::error!("the UDP loop failed: {e}");
                    shutdown.trigger();
                }
            })
            .map_err(|e| crate::Error::io("cannot start a UDP thread", e))?;
    }
    Ok(())
}
