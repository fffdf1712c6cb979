//! The blocking echo loop shared by the iterative, process, prefork, thread and pool models.
//!
//! TCP is a byte stream: each read may return any part of what the client sent, so the loop
//! writes back exactly what each read returned, with `write_all` (a partial write never loses
//! bytes). When the client half-closes, everything already read has been echoed; the server
//! then closes its side. The idle timeout is the socket's receive and send timeout, so a client
//! that neither sends nor accepts its echo is closed after that long.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown as Direction, SocketAddr, TcpStream};

use crate::server::accept::Screened;
use crate::server::conn::admission::Refusal;
use crate::server::conn::proxy;
use crate::server::conn::{Admitted, Lifecycle};
use crate::server::ServerConfig;

pub use crate::server::conn::End;

/// The read buffer of a blocking connection.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// Echoes until end of stream, an error or the idle timeout, counting the bytes in
/// `lifecycle` as they flow; returns the bytes echoed and how it ended.
pub fn echo(stream: &mut TcpStream, buf: &mut [u8], lifecycle: &Lifecycle) -> (u64, End) {
    let mut total = 0u64;
    loop {
        let n = match stream.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return (total, classify(e)),
        };
        lifecycle.received(n);
        if let Err(e) = stream.write_all(&buf[..n]) {
            // How much of this echo went out before the failure is unknown: none is counted.
            return (total, classify(e));
        }
        lifecycle.sent(n);
        total += n as u64;
    }
    // The client half-closed and has had every byte back: close our side as well.
    let _ = stream.shutdown(Direction::Write);
    (total, End::ClientClosed)
}

fn classify(e: io::Error) -> End {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => End::IdleTimeout,
        _ => End::Failed(e),
    }
}

/// Serves one screened connection to its end (after its PROXY header, if its listener expects
/// one) and records its close.
pub fn serve_connection(
    stream: &mut TcpStream,
    screened: Screened,
    config: &ServerConfig,
    lifecycle: &Lifecycle,
) {
    let Screened {
        peer,
        admitted,
        listener,
        ..
    } = screened;
    if let Some(idle) = config.idle_timeout {
        let set = stream
            .set_read_timeout(Some(idle))
            .and_then(|()| stream.set_write_timeout(Some(idle)));
        if let Err(e) = set {
            tracing::warn!(%peer, "cannot set the idle timeout: {e}");
        }
    }
    let (admitted, leftover) = match admitted {
        Some(admitted) => (admitted, Vec::new()),
        None => match read_proxy_header(stream, listener, peer, lifecycle) {
            Some(admitted) => admitted,
            None => return,
        },
    };
    // What arrived with the header is the start of the stream: echoed first.
    lifecycle.received(leftover.len());
    if let Err(e) = stream.write_all(&leftover) {
        lifecycle.close(admitted, 0, &classify(e));
        return;
    }
    lifecycle.sent(leftover.len());
    let mut buf = vec![0u8; BUFFER_SIZE];
    let (echoed, end) = echo(stream, &mut buf, lifecycle);
    lifecycle.close(admitted, leftover.len() as u64 + echoed, &end);
}

/// Reads a `+proxy` connection's PROXY header within `--proxy-timeout` (one deadline for the
/// whole header, however slowly it trickles in), then admits the client it names. Returns the
/// admission and the bytes that came after the header; `None` when the connection was refused
/// (counted and logged with the reason): the caller drops it.
fn read_proxy_header(
    stream: &mut TcpStream,
    listener: usize,
    peer: SocketAddr,
    lifecycle: &Lifecycle,
) -> Option<(Admitted, Vec<u8>)> {
    match proxy::read_header(stream, lifecycle.proxy_timeout()) {
        Ok((header, rest)) => lifecycle
            .admit_proxied(listener, peer, &header)
            .ok()
            .map(|admitted| (admitted, rest)),
        Err(e) => {
            lifecycle.refuse_because(peer, Refusal::ProxyHeader, Some(&e));
            None
        }
    }
}
