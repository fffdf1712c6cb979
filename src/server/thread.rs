//! `thread`: a thread per connection, as in the seeds' 8_server, without its defects.
//!
//! The accepted socket is *moved* into its thread (the seed passed the address of a loop
//! variable, so the next accept could overwrite it before the thread read it). Threads get a
//! small stack (`--thread-stack`) so thousands fit. Cost: a thread creation per connection and
//! a stack each; the kernel schedules them. If a thread cannot be created, that connection is
//! closed and the server keeps serving. Shutdown: stop accepting, wait for live connections up
//! to the shutdown timeout, then shut their sockets down so the threads return.

use std::sync::Arc;
use std::thread;

use crate::limits::Connections;
use crate::server::accept::Acceptor;
use crate::server::{echo, Server};

/// Runs the thread-per-connection model.
pub fn serve(server: &Server) -> crate::Result<()> {
    let config = &server.config;
    let connections = Connections::new(config.max_conns)
        .map_err(|e| crate::Error::io("cannot create the connection registry", e))?;
    let mut acceptor =
        Acceptor::new(server).map_err(|e| crate::Error::io("cannot prepare the listeners", e))?;
    while let Some((incoming, permit)) = acceptor
        .accept_within(&connections)
        .map_err(|e| crate::Error::io("accept failed", e))?
    {
        let Some((stream, screened)) = incoming.screen(&server.conn) else {
            continue;
        };
        let peer = screened.peer;
        let mut conn = connections.track(stream, permit);
        let config = config.clone();
        let lifecycle = Arc::clone(&server.conn);
        let tls = server.tls.clone();
        let spawned = thread::Builder::new()
            .name("connection".into())
            .stack_size(config.thread_stack)
            .spawn(move || {
                echo::serve_connection(&mut conn, screened, &config, &lifecycle, tls.as_deref())
            });
        if let Err(e) = spawned {
            // The closure, and with it the connection, was dropped: the client sees a close. (Its
            // close line is not logged and a per-source slot, if any, stays counted: rare.)
            tracing::warn!(%peer, "cannot start a thread: {e}; closed the connection");
            server.shutdown.wait_timeout(crate::net::ACCEPT_BACKOFF);
        }
    }
    connections.drain(config.shutdown_timeout, &server.conn);
    Ok(())
}
