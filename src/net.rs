//! Sockets: binding listeners, the options every accepted connection gets, the open-files
//! limit, and how accept errors are classified (the same rules for every model).

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

use socket2::{Domain, Protocol, Socket, Type};

/// The default listen address: the seeds' port, on loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4000";

/// Parses a listen or connect address: `HOST:PORT`, `[V6]:PORT`, or a bare `PORT` (which
/// means 127.0.0.1). Host names are resolved (for example `localhost`).
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if !text.contains(':') {
        return Err(format!(
            "invalid address '{text}': expected HOST:PORT, for example 127.0.0.1:4000"
        ));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("address '{text}' resolved to nothing")),
        Err(e) => Err(format!(
            "invalid address '{text}': {e} (expected HOST:PORT, for example 127.0.0.1:4000)"
        )),
    }
}

/// Binds a listening TCP socket with SO_REUSEADDR (so a restarted server does not wait out
/// TIME_WAIT) and the given backlog. IPv6 listeners are IPv6-only, so `[::]` and `0.0.0.0`
/// can be listened on together. No SO_REUSEPORT: a second server on a busy port must fail.
pub fn bind(addr: SocketAddr, backlog: u32) -> crate::Result<TcpListener> {
    let context = || format!("cannot listen on {addr}");
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| crate::Error::io(context(), e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| crate::Error::io(context(), e))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(|e| crate::Error::io(context(), e))?;
    }
    socket
        .bind(&addr.into())
        .map_err(|e| crate::Error::io(context(), e))?;
    let backlog = backlog.min(i32::MAX as u32) as i32;
    socket
        .listen(backlog)
        .map_err(|e| crate::Error::io(context(), e))?;
    Ok(socket.into())
}

/// Raises the soft limit on open files to the hard limit; returns the new soft limit.
pub fn raise_open_files_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// What a model should do about an error from `accept()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// Nothing to accept right now (non-blocking listener).
    WouldBlock,
    /// The connection went away before it was accepted, or a signal interrupted: try again.
    Retry,
    /// Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): back off, keep serving.
    Exhausted,
    /// The listener no longer listens (EINVAL: shutdown stopped it): stop accepting from it.
    Closed,
    /// Anything else ends the server.
    Fatal,
}

/// Classifies an `accept()` error by the rules every model follows.
pub fn classify_accept_error(err: &io::Error) -> AcceptError {
    if err.kind() == io::ErrorKind::WouldBlock {
        return AcceptError::WouldBlock;
    }
    match err.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Exhausted,
        Some(libc::EINVAL) => AcceptError::Closed,
        Some(
            libc::ECONNABORTED
            | libc::EINTR
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::ETIMEDOUT,
        ) => AcceptError::Retry,
        _ => AcceptError::Fatal,
    }
}

/// How long a model pauses accepting after running out of descriptors or memory.
pub const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            parse_addr("4000").unwrap(),
            "127.0.0.1:4000".parse().unwrap()
        );
        assert_eq!(parse_addr("[::1]:5").unwrap(), "[::1]:5".parse().unwrap());
        assert_eq!(
            parse_addr("localhost:4000").unwrap().port(),
            4000,
            "host names resolve"
        );
        assert!(parse_addr("nonsense").is_err());
        assert!(parse_addr("1.2.3.4:99999").is_err());
    }

    #[test]
    fn classifies_accept_errors() {
        let err = |code| io::Error::from_raw_os_error(code);
        assert_eq!(
            classify_accept_error(&err(libc::EMFILE)),
            AcceptError::Exhausted
        );
        assert_eq!(
            classify_accept_error(&err(libc::ECONNABORTED)),
            AcceptError::Retry
        );
        assert_eq!(
            classify_accept_error(&err(libc::EAGAIN)),
            AcceptError::WouldBlock
        );
        assert_eq!(classify_accept_error(&err(libc::EBADF)), AcceptError::Fatal);
    }
}
