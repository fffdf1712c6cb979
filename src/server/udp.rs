//! UDP sockets for `udp://` listeners, and what every model's UDP loop shares: binding, the
//! receive that never truncates silently, and the blocking loop of iterative, prefork and pool.
//!
//! Every datagram goes back to its sender byte-exact: the receive buffer ([`BUFFER_SIZE`])
//! holds the largest datagram there is (65,507 bytes over IPv4, 65,527 over IPv6), and the
//! kernel's `MSG_TRUNC` flag is checked anyway, so a datagram is echoed whole or not at all.
//! A zero-length datagram is echoed as zero bytes. Before the echo every datagram goes through
//! the one UDP policy, [`Lifecycle::admit_datagram`] (loop guard, allow/deny, `--udp-rate`).
//!
//! Shutdown: every UDP loop watches the shutdown descriptor and stops at once when it fires
//! (datagrams have no drain); the TCP side of the same server drains as usual.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::sys::socket::{recvmsg, MsgFlags, SockaddrStorage};
use socket2::{Domain, Protocol, Socket, Type};

use crate::server::conn::Lifecycle;
use crate::shutdown::Shutdown;
use crate::wake::poll_readable;

/// A receive buffer larger than any UDP datagram (the IPv6 maximum is 65,527 bytes).
pub const BUFFER_SIZE: usize = 64 * 1024;
/// The receive buffer the kernel is asked for: enough for dozens of the largest datagrams, so
/// bursts from several senders are not dropped before the server reads them.
const SOCKET_RECEIVE_BUFFER: usize = 4 << 20;
/// Datagrams a loop takes from one socket before it looks at the others (and at shutdown).
pub const RECEIVE_BUDGET: usize = 64;

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

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub len: usize,
    pub source: SocketAddr,
    /// The datagram was longer than the buffer (`MSG_TRUNC`): it must not be echoed.
    pub truncated: bool,
}

/// Receives one datagram into `buf` (at least [`BUFFER_SIZE`] long) without blocking;
/// `WouldBlock` when none is queued.
pub fn recv(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
            &mut iov,
            None,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let source = msg.address.as_ref().and_then(socket_addr).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "a datagram without a source")
        })?;
        return Ok(Received {
            len: msg.bytes,
            source,
            truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        });
    }
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
/// shutdown descriptor (`poll`), then drains each readable socket up to [`RECEIVE_BUDGET`]
/// datagrams, echoing each one that the policy admits with a blocking `sendto` (a full send
/// buffer waits, as TCP's `write_all` does). Several threads or processes may run it on the
/// same sockets: the kernel gives each datagram to one of them; the others find the queue
/// empty. Returns at shutdown, or with the error that ended it.
pub fn serve_blocking(
    sockets: &[UdpSocket],
    lifecycle: &Lifecycle,
    shutdown: &Shutdown,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        if shutdown.is_triggered() {
            return Ok(());
        }
        let mut fds = vec![shutdown.as_fd()];
        fds.extend(sockets.iter().map(|s| s.as_fd()));
        let ready = poll_readable(&fds, None)?;
        for (socket, _) in sockets.iter().zip(&ready[1..]).filter(|(_, r)| **r) {
            for _ in 0..RECEIVE_BUDGET {
                if shutdown.is_triggered() {
                    return Ok(());
                }
                let received = match recv(socket.as_fd(), &mut buf) {
                    Ok(received) => received,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if is_transient(&e) => continue,
                    Err(e) => return Err(e),
                };
                if lifecycle.admit_datagram(&received) {
                    echo(socket, &buf[..received.len], received.source, lifecycle);
                }
            }
        }
    }
}

/// Sends `data` back to `dest` on a blocking socket and counts it.
fn echo(socket: &UdpSocket, data: &[u8], dest: SocketAddr, lifecycle: &Lifecycle) {
    match socket.send_to(data, dest) {
        Ok(n) if n == data.len() => lifecycle.datagram_echoed(n),
        Ok(n) => lifecycle.datagram_send_failed(
            dest,
            &io::Error::other(format!("sent {n} of {} bytes", data.len())),
        ),
        Err(e) => lifecycle.datagram_send_failed(dest, &e),
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
