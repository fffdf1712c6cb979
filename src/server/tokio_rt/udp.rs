//! The async model's UDP side: on each worker's runtime, a task per `udp://` socket; the
//! workers' tasks share the socket (each runtime registers its own duplicate).
//!
//! A task waits for the socket to be readable, then receives in batches (`recvmmsg`, see
//! `server/udp/batch.rs`) with `try_io` (so readiness is cleared only on `WouldBlock`) up to
//! [`RECEIVE_BUDGET`] datagrams, runs each through the policy and sends each batch's echoes
//! with one `sendmmsg`, also through `try_io`; a full send buffer suspends the task until the
//! socket is writable, not the thread. Each task watches the shutdown and ends at once when it
//! fires.

use std::io;
use std::sync::Arc;

use nix::sys::socket::MsgFlags;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::ShutdownWatch;
use crate::server::conn::Lifecycle;
use crate::server::udp::{is_transient, Batch, RECEIVE_BUDGET};
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
    let mut batch = Batch::default();
    loop {
        socket.readable().await?;
        let mut budget = RECEIVE_BUDGET;
        while budget > 0 {
            let fd = socket_fd(socket);
            match socket.try_io(Interest::READABLE, || batch.receive(fd, lifecycle)) {
                Ok(received) => budget = budget.saturating_sub(received.max(1)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if is_transient(&e) => {
                    budget -= 1;
                    continue;
                }
                Err(e) => return Err(e),
            }
            while batch.pending() > 0 {
                let sent = socket.try_io(Interest::WRITABLE, || {
                    batch.send(fd, MsgFlags::MSG_DONTWAIT, lifecycle)
                });
                match sent {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.writable().await?,
                    Err(e) => return Err(e),
                }
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
