//! `iterative`: accept one client, echo until it leaves, then accept the next.
//!
//! This is the seeds' "synchronous blocking I/O" starting point, kept on purpose: it shows the
//! problem every other model solves. While one client is served, the next waits in the listen
//! backlog (its connect succeeds, but nothing is echoed). Cost: none beyond one buffer; the
//! limit is one client, so one slow or never-reading client stops everyone, by design (`serve`
//! warns when this model listens on a non-loopback address). Shutdown: stop accepting, let the current client finish for up to the
//! shutdown timeout, then close it (a watchdog thread enforces the deadline, since the main
//! thread is inside the blocking echo loop).
//!
//! UDP (like inetd's `wait` UDP services): one blocking loop answers every `udp://` socket,
//! in batches (`poll`, then `recvmmsg` of up to 64 datagrams, the policy check of each,
//! `sendmmsg` of the admitted ones); it runs on a thread of its own beside the TCP loop, so a
//! TCP client being served does not stop datagrams. Cost: two system calls per batch plus a
//! `poll` per burst and an empty `recvmmsg` at its end; 64 slots of 64 KiB per socket (4 MiB,
//! touched only as far as datagrams fill them); one core at most. At shutdown the UDP loop
//! stops at once.

use crate::limits::Connections;
use crate::server::accept::Acceptor;
use crate::server::{echo, Server};

/// Runs the iterative model.
pub fn serve(server: &Server) -> crate::Result<()> {
    let connections = Connections::new(1)
        .map_err(|e| crate::Error::io("cannot create the connection registry", e))?;
    let watchdog = connections.close_at_deadline(
        &server.shutdown,
        server.config.shutdown_timeout,
        &server.conn,
    );
    let result = std::thread::scope(|scope| {
        crate::server::udp::spawn_blocking(scope, 1, &server.udp, &server.conn, &server.shutdown)?;
        let result = serve_one_at_a_time(server, &connections);
        // On a fatal accept error the watchdog and the UDP loop must still end.
        server.shutdown.trigger();
        result
    });
    server.shutdown.trigger();
    let _ = watchdog.join();
    result
}

/// Accepts and serves connections one after the other until shutdown. Prefork workers run
/// this same loop, each in its own process.
pub fn serve_one_at_a_time(server: &Server, connections: &Connections) -> crate::Result<()> {
    let mut acceptor =
        Acceptor::new(server).map_err(|e| crate::Error::io("cannot prepare the listeners", e))?;
    while let Some((incoming, permit)) = acceptor
        .accept_within(connections)
        .map_err(|e| crate::Error::io("accept failed", e))?
    {
        let Some((stream, screened)) = incoming.screen(&server.conn) else {
            continue;
        };
        let mut conn = connections.track(stream, permit);
        echo::serve_connection(
            &mut conn,
            screened,
            &server.config,
            &server.conn,
            server.tls.as_deref(),
        );
    }
    Ok(())
}
