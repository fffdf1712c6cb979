//! The blocking echo loop shared by the iterative, process, prefork, thread and pool models.
//!
//! TCP is a byte stream: each read may return any part of what the client sent, so the loop
//! writes back exactly what each read returned, with `write_all` (a partial write never loses
//! bytes). When the client half-closes, everything already read has been echoed; the server
//! then closes its side. The idle timeout is the socket's receive and send timeout, so a client
//! that neither sends nor accepts its echo is closed after that long.
//!
//! TLS (`tls://`, `tls+proxy://`): rustls's `ServerConnection` on the blocking socket. The
//! handshake takes a permit of the server's handshake cap first and must end within the
//! handshake timeout (the socket's timeouts follow one deadline, so a client trickling bytes
//! cannot stretch it); a failure closes the connection with its reason. Then the same rule as
//! plain echo: every plaintext byte rustls decrypts is encrypted back and written out before
//! the next read. The client's close_notify is its half-close: everything before it has been
//! echoed, so the server sends its own close_notify and closes; a TCP end of stream without
//! one is logged as truncated. Memory per connection: the 16 KiB buffer and rustls's own
//! buffers (a record or two each way, as the echo is flushed before the next read).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown as Direction, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustls::ServerConnection;

use crate::listen::ListenerKind;
use crate::server::accept::Screened;
use crate::server::conn::admission::Refusal;
use crate::server::conn::proxy;
use crate::server::conn::{Admitted, Lifecycle};
use crate::server::ServerConfig;
use crate::tls::{HandshakeError, TlsServer};

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
/// one; over TLS, if its listener is a TLS one) and records its close.
pub fn serve_connection(
    stream: &mut TcpStream,
    screened: Screened,
    config: &ServerConfig,
    lifecycle: &Lifecycle,
    tls: Option<&TlsServer>,
) {
    let Screened {
        peer,
        admitted,
        listener,
        kind,
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
    if matches!(kind, ListenerKind::Tls | ListenerKind::TlsProxy) {
        let (received, sent, end) = match tls {
            // What arrived with the PROXY header is the start of the TLS stream.
            Some(tls) => serve_tls(stream, &leftover, config, tls, lifecycle, admitted.peer),
            None => (0, 0, End::Failed(io::Error::other("no TLS configuration"))),
        };
        // Counted when the connection ends, not as the bytes flow as for plain echo.
        lifecycle.received(received as usize);
        lifecycle.sent(sent as usize);
        lifecycle.close(admitted, sent, &end);
        return;
    }
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

/// A TLS connection: the handshake (under the cap, within the timeout), then the echo.
/// `early` holds bytes already read from the socket (after a PROXY header).
fn serve_tls(
    stream: &mut TcpStream,
    early: &[u8],
    config: &ServerConfig,
    tls: &TlsServer,
    lifecycle: &Lifecycle,
    peer: SocketAddr,
) -> (u64, u64, End) {
    let mut conn = match tls.connection() {
        Ok(conn) => conn,
        Err(e) => return (0, 0, End::Failed(io::Error::other(e))),
    };
    let timeout = tls.handshake_timeout();
    let deadline = Instant::now() + timeout;
    let cap = tls.handshakes();
    let handshake = match cap.acquire_until(deadline) {
        Some(_permit) => handshake(&mut conn, stream, early, deadline, timeout),
        None => Err(HandshakeError::timeout(format!(
            "waited {timeout:?} for one of the {} handshake slots (--tls-max-handshakes)",
            cap.max()
        ))),
    };
    if let Err(e) = handshake {
        return (0, 0, End::Handshake(e));
    }
    lifecycle.handshake_completed(peer);
    // The idle timeout (or none) again, instead of the handshake's deadline.
    let set = stream
        .set_read_timeout(config.idle_timeout)
        .and_then(|()| stream.set_write_timeout(config.idle_timeout));
    if let Err(e) = set {
        return (0, 0, End::Failed(e));
    }
    let mut buf = vec![0u8; BUFFER_SIZE];
    echo_tls(&mut conn, stream, &mut buf)
}

/// Runs the handshake until it completes, fails, or `deadline` passes.
fn handshake(
    conn: &mut ServerConnection,
    stream: &mut TcpStream,
    mut early: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<(), HandshakeError> {
    let timed_out = || HandshakeError::timeout(format!("{timeout:?} passed"));
    loop {
        // Every socket wait ends at the one deadline, however slowly the bytes trickle in.
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or_else(timed_out)?;
        stream
            .set_read_timeout(Some(left))
            .and_then(|()| stream.set_write_timeout(Some(left)))
            .map_err(|e| HandshakeError::from_io(&e))?;
        // Send what rustls has for the client: its next flight.
        flush_tls(conn, stream).map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => timed_out(),
            _ => HandshakeError::from_io(&e),
        })?;
        if !conn.is_handshaking() {
            return Ok(());
        }
        let read = if early.is_empty() {
            conn.read_tls(stream)
        } else {
            conn.read_tls(&mut early)
        };
        match read {
            Ok(0) => return Err(HandshakeError::client_closed()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(timed_out())
            }
            Err(e) => return Err(HandshakeError::from_io(&e)),
        }
        if let Err(e) = conn.process_new_packets() {
            // rustls queued an alert that tells the client why: a last-gasp write.
            let _ = flush_tls(conn, stream);
            return Err(HandshakeError::from_tls(&e));
        }
    }
}

/// The TLS echo loop: see the module doc. Returns the plaintext bytes received and echoed.
fn echo_tls(
    conn: &mut ServerConnection,
    stream: &mut TcpStream,
    buf: &mut [u8],
) -> (u64, u64, End) {
    let mut received = 0u64;
    let mut sent = 0u64;
    loop {
        // Echo every plaintext byte rustls holds before reading more ciphertext.
        loop {
            match conn.reader().read(buf) {
                Ok(0) => {
                    // close_notify, and everything before it echoed: answer with ours, close.
                    conn.send_close_notify();
                    let _ = flush_tls(conn, stream);
                    let _ = stream.shutdown(Direction::Write);
                    return (received, sent, End::ClientClosed);
                }
                Ok(n) => {
                    received += n as u64;
                    if let Err(e) = write_plaintext(conn, stream, &buf[..n]) {
                        return (received, sent, classify(e));
                    }
                    sent += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    return (received, sent, End::Truncated)
                }
                Err(e) => return (received, sent, classify(e)),
            }
        }
        match conn.read_tls(stream) {
            // End of stream: the reader says next whether a close_notify came first.
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return (received, sent, classify(e)),
        }
        if let Err(e) = conn.process_new_packets() {
            let _ = flush_tls(conn, stream);
            return (
                received,
                sent,
                End::Failed(io::Error::new(ErrorKind::InvalidData, e)),
            );
        }
        // rustls may have something of its own to send (a key update's answer).
        if let Err(e) = flush_tls(conn, stream) {
            return (received, sent, classify(e));
        }
    }
}

/// Encrypts `data` and writes it out in full (a record at a time, within rustls's buffer).
fn write_plaintext(
    conn: &mut ServerConnection,
    stream: &mut TcpStream,
    mut data: &[u8],
) -> io::Result<()> {
    while !data.is_empty() {
        let taken = conn.writer().write(data)?;
        if taken == 0 && !conn.wants_write() {
            return Err(ErrorKind::WriteZero.into());
        }
        data = &data[taken..];
        flush_tls(conn, stream)?;
    }
    Ok(())
}

/// Writes out every TLS record rustls has queued.
fn flush_tls(conn: &mut ServerConnection, stream: &mut TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
