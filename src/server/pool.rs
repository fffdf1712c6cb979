//! `pool`: N worker threads (`--workers`) take accepted connections from a bounded queue and
//! serve each with blocking I/O, one at a time.
//!
//! The acceptor admits at most `workers + queue` connections (and never more than
//! `--max-conns`); beyond that it stops accepting, so further clients wait in the listen
//! backlog. A queued or backlogged client connects at once but is echoed only when a worker
//! frees up: the pool bounds threads and memory, at the price of waiting, and one slow or
//! never-reading client per worker stops everyone, by design (`serve` warns when this model
//! listens on a non-loopback address). Shutdown: stop
//! accepting, let queued and live connections finish up to the shutdown timeout, then close
//! them; the workers then see the queue end and exit.
//!
//! UDP: `--workers` more threads run the blocking UDP loop on the shared `udp://` sockets
//! (the kernel hands each datagram to one of them); no queue, since a datagram is served in
//! one step, in batches (`recvmmsg`, `sendmmsg`). Cost: a thread and a batch per socket each
//! (64 slots of 64 KiB, touched as far as datagrams fill them), two system calls per batch
//! plus a `poll` per burst; the threads all wake on each burst and those that find the queue empty
//! go back to sleep. At shutdown they stop at once.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use crate::limits::{Connections, Tracked};
use crate::server::accept::{Acceptor, Screened};
use crate::server::{echo, Server};

/// Runs the thread-pool model.
pub fn serve(server: &Server) -> crate::Result<()> {
    thread::scope(|scope| {
        let udp = crate::server::udp::spawn_blocking(
            scope,
            server.config.workers,
            &server.udp,
            &server.conn,
            &server.shutdown,
        );
        let result = udp.and_then(|()| serve_tcp(server));
        // The UDP threads end with the shutdown (or with a TCP failure).
        server.shutdown.trigger();
        result
    })
}

/// The TCP side: the acceptor, the queue and the worker threads.
fn serve_tcp(server: &Server) -> crate::Result<()> {
    let config = &server.config;
    let workers = config.workers.max(1);
    let queue = workers;
    let connections = Connections::new(config.max_conns.min(workers + queue))
        .map_err(|e| crate::Error::io("cannot create the connection registry", e))?;
    let (sender, receiver) = mpsc::sync_channel::<(Tracked, Screened)>(queue);
    let receiver = Arc::new(Mutex::new(receiver));
    let mut handles = Vec::with_capacity(workers);
    for id in 0..workers {
        let receiver = Arc::clone(&receiver);
        let config = config.clone();
        let lifecycle = Arc::clone(&server.conn);
        let tls = server.tls.clone();
        let handle = thread::Builder::new()
            .name(format!("pool-{id}"))
            .spawn(move || loop {
                // Hold the lock only while taking the next connection.
                let next = receiver.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok((mut conn, screened)) = next else {
                    break;
                };
                echo::serve_connection(&mut conn, screened, &config, &lifecycle, tls.as_deref());
            })
            .map_err(|e| crate::Error::io("cannot start a pool thread", e))?;
        handles.push(handle);
    }
    tracing::debug!(workers, queue, "pool started");

    let mut acceptor =
        Acceptor::new(server).map_err(|e| crate::Error::io("cannot prepare the listeners", e))?;
    let accepted = loop {
        match acceptor.accept_within(&connections) {
            Ok(Some((incoming, permit))) => {
                let Some((stream, screened)) = incoming.screen(&server.conn) else {
                    continue;
                };
                let conn = connections.track(stream, permit);
                if sender.send((conn, screened)).is_err() {
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(crate::Error::io("accept failed", e)),
        }
    };
    drop(sender);
    connections.drain(config.shutdown_timeout, &server.conn);
    for handle in handles {
        let _ = handle.join();
    }
    accepted
}
