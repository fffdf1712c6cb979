//! The epoll model's UDP side: `--workers` event loops (mio, edge-triggered), each owning a
//! duplicate of every `udp://` socket registered in its own `Poll`, beside the TCP workers.
//!
//! A loop receives until `WouldBlock` (at most [`RECEIVE_BUDGET`] datagrams per socket per
//! turn, then it looks at its other sockets and polls with a zero timeout), runs each datagram
//! through the policy and sends the echo at once with a non-blocking `sendto`. If the kernel's
//! send buffer is full the echo is kept (one per socket) and that socket is not read again until
//! a writable edge lets it go out: backpressure, as on TCP, instead of dropping it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use mio::net::UdpSocket;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::server::conn::Lifecycle;
use crate::server::udp::{is_transient, recv, BUFFER_SIZE, RECEIVE_BUDGET};
use crate::server::Server;
use crate::shutdown::Shutdown;

const SHUTDOWN: Token = Token(usize::MAX);

/// One UDP socket of one loop.
struct Endpoint {
    socket: UdpSocket,
    /// The last edge said readable and the queue has not been seen empty since.
    readable: bool,
    /// An echo the send buffer had no room for.
    pending: Option<(Vec<u8>, SocketAddr)>,
}

/// Starts the UDP loops on `scope` (none without UDP sockets).
pub(super) fn spawn<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    server: &'scope Server,
) -> crate::Result<()> {
    if server.udp.is_empty() {
        return Ok(());
    }
    for id in 0..server.config.workers.max(1) {
        let (poll, endpoints) = prepare(server)?;
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

fn prepare(server: &Server) -> crate::Result<(Poll, Vec<Endpoint>)> {
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
            pending: None,
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
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        if shutdown.is_triggered() {
            return Ok(());
        }
        let busy = endpoints.iter().any(|e| e.readable && e.pending.is_none());
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
            serve_some(endpoint, &mut buf, lifecycle)?;
        }
    }
}

/// Receives and echoes up to the budget, until the queue is empty or an echo must wait.
fn serve_some(endpoint: &mut Endpoint, buf: &mut [u8], lifecycle: &Lifecycle) -> io::Result<()> {
    for _ in 0..RECEIVE_BUDGET {
        if !endpoint.readable || endpoint.pending.is_some() {
            return Ok(());
        }
        let received = match recv(endpoint.socket.as_fd(), buf) {
            Ok(received) => received,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                endpoint.readable = false;
                return Ok(());
            }
            Err(e) if is_transient(&e) => continue,
            Err(e) => return Err(e),
        };
        if !lifecycle.admit_datagram(&received) {
            continue;
        }
        let data = &buf[..received.len];
        match endpoint.socket.send_to(data, received.source) {
            Ok(_) => lifecycle.datagram_echoed(data.len()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                endpoint.pending = Some((data.to_vec(), received.source));
            }
            Err(e) => lifecycle.datagram_send_failed(received.source, &e),
        }
    }
    Ok(())
}

/// Sends the echo that waited for room, if any.
fn flush(endpoint: &mut Endpoint, lifecycle: &Lifecycle) {
    let Some((data, dest)) = &endpoint.pending else {
        return;
    };
    match endpoint.socket.send_to(data, *dest) {
        Ok(_) => lifecycle.datagram_echoed(data.len()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
        Err(e) => lifecycle.datagram_send_failed(*dest, &e),
    }
    endpoint.pending = None;
}
