//! The blocking echo loop shared by the iterative, process, prefork, thread and pool models.
//!
//! TCP is a byte stream: each read may return any part of what the client sent, so the loop
//! writes back exactly what each read returned, with `write_all` (a partial write never loses
//! bytes). When the client half-closes, everything already read has been echoed; the server
//! then closes its side. The idle timeout is the socket's receive and send timeout, so a client
//! that neither sends nor accepts its echo is closed after that long.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown as Direction, SocketAddr, TcpStream};
use std::time::Instant;

use crate::server::ServerConfig;
use crate::stats::Stats;

/// The read buffer of a blocking connection.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// Why a connection ended: the `end` field of every model's close line.
#[derive(Debug)]
pub enum End {
    /// The client closed (or half-closed) and got every byte back.
    ClientClosed,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// Still open when the server closed it (the shutdown deadline, or a server error).
    Shutdown,
    /// The connection failed (for example reset by the client).
    Failed(io::Error),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client closed"),
            End::IdleTimeout => f.write_str("idle timeout"),
            End::Shutdown => f.write_str("closed at shutdown"),
            End::Failed(e) => write!(f, "error: {e}"),
        }
    }
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Failed(e)
    }
}

/// Echoes until end of stream, an error or the idle timeout; returns the bytes echoed.
pub fn echo(stream: &mut TcpStream, buf: &mut [u8]) -> (u64, End) {
    let mut total = 0u64;
    loop {
        let n = match stream.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return (total, classify(e)),
        };
        if let Err(e) = stream.write_all(&buf[..n]) {
            return (total, classify(e));
        }
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

/// Serves one connection to its end and logs one line about it.
pub fn serve_connection(
    stream: &mut TcpStream,
    peer: SocketAddr,
    config: &ServerConfig,
    stats: &Stats,
) {
    let started = Instant::now();
    stats.connection_opened();
    tracing::debug!(%peer, "connection accepted");
    if let Some(idle) = config.idle_timeout {
        let set = stream
            .set_read_timeout(Some(idle))
            .and_then(|()| stream.set_write_timeout(Some(idle)));
        if let Err(e) = set {
            tracing::warn!(%peer, "cannot set the idle timeout: {e}");
        }
    }
    let mut buf = vec![0u8; BUFFER_SIZE];
    let (bytes, end) = echo(stream, &mut buf);
    record_close(stats, peer, bytes, started, &end);
}

/// The end of a connection, for every model: counts it in the server's stats and logs its one
/// info line.
pub fn record_close(stats: &Stats, peer: SocketAddr, bytes: u64, started: Instant, end: &End) {
    stats.connection_closed(bytes);
    tracing::info!(
        %peer,
        bytes,
        duration = ?started.elapsed(),
        end = %end,
        "connection closed"
    );
}
