//! The async model's UDP side: on each worker's runtime, a task per `udp://` socket; the
//! workers' tasks share the socket (each runtime registers its own duplicate).
//!
//! A task waits for the socket to be readable, then receives with `try_io` (so readiness is
//! cleared only on `WouldBlock`) up to [`RECEIVE_BUDGET`] datagrams, runs each through the
//! policy and awaits `send_to` for its echo (a full send buffer suspends the task, not the
//! thread). Each task watches the shutdown and ends at once when it fires.

use std::io;
use std::sync::Arc;

use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::ShutdownWatch;
use crate::server::conn::Lifecycle;
use crate::server::udp::{is_transient, recv, BUFFER_SIZE, RECEIVE_BUDGET};
use crate::server::Server;

/// Spawns this worker's UDP tasks on the current runtime (none without UDP sockets); must be
/// called within it.
pub(super) fn spawn(server: &Server) -> crate::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for socket in &server.udp {
        let context = |e| crate::Error::io("cannot register a UDP socket", e);
        let socket = socket.try_clone().map_err(context)?;
        socket.set_nonblocking(true).map_err(context)?;
        let socket = UdpSocket::from_std(socket).map_err(context)?;
        let lifecycle = Arc::clone(&server.conn);
        let shutdown = server.shutdown.clone();
        let watch = ShutdownWatch::new(&shutdown)
            .map_err(|e| crate::Error::io("cannot watch the shutdown signal", e))?;
        tasks.push(tokio::spawn(async move {
            let outcome = tokio::select! {
                outcome = serve(&socket, &lifecycle) => outcome,
                _ = watch.requested() => Ok(()),
            };
            if let Err(e) = outcome {
                tracing::error!("the UDP loop failed: {e}");
                shutdown.trigger();
            }
        }));
    }
    Ok(tasks)
}

async fn serve(socket: &UdpSocket, lifecycle: &Lifecycle) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        socket.readable().await?;
        for _ in 0..RECEIVE_BUDGET {
            let received =
                match socket.try_io(Interest::READABLE, || recv(socket_fd(socket), &mut buf)) {
                    Ok(received) => received,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if is_transient(&e) => continue,
                    Err(e) => return Err(e),
                };
            if !lifecycle.admit_datagram(&received) {
                continue;
            }
            let data = &buf[..received.len];
            match socket.send_to(data, received.source).await {
                Ok(_) => lifecycle.datagram_echoed(data.len()),
                Err(e) => lifecycle.datagram_send_failed(received.source, &e),
            }
        }
        // Let the other tasks on this thread run between bursts.
        tokio::task::yield_now().await;
    }
}

fn socket_fd(socket: &UdpSocket) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsFd;
    socket.as_fd()
}
