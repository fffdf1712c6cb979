//! `serve --inetd`: serve exactly one connection, already accepted, on standard input (fd 0),
//! then exit: for inetd and xinetd `nowait` services and systemd `Accept=yes` sockets, which
//! start one process per connection. `--inetd=tcp+proxy` expects the connection to begin with
//! a PROXY protocol header (v1 or v2), as from HAProxy's `send-proxy` in front of such a
//! socket; `--inetd=tls` (and `tls+proxy`) speaks TLS on it, with the certificate of
//! `--tls-cert`/`--tls-key` or a self-signed one made at start. The connection goes through the same lifecycle as in any model (the trusted-proxy
//! check, the header within `--proxy-timeout`, admission, socket options, its close line and
//! counters) and the blocking models' connection code; logs go to stderr, never to the socket.

use std::io::IsTerminal;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use crate::listen::ListenerKind;
use crate::server::accept::Incoming;
use crate::server::conn::Lifecycle;
use crate::server::echo;
use crate::server::ServerConfig;
use crate::stats::Stats;
use crate::tls::TlsServer;
use crate::Error;

/// The kinds of connection `--inetd` serves: plain TCP or TLS, either of them after a PROXY
/// header.
pub const KINDS: [ListenerKind; 4] = [
    ListenerKind::Tcp,
    ListenerKind::TcpProxy,
    ListenerKind::Tls,
    ListenerKind::TlsProxy,
];

/// Parses `--inetd`'s value: `tcp`, `tcp+proxy`, `tls` or `tls+proxy`.
pub fn parse_kind(text: &str) -> Result<ListenerKind, String> {
    KINDS
        .into_iter()
        .find(|kind| kind.scheme().eq_ignore_ascii_case(text.trim()))
        .ok_or_else(|| {
            format!("invalid inetd connection kind '{text}': use tcp (the default), tcp+proxy, tls or tls+proxy")
        })
}

/// Serves the connection on standard input, of `kind`, to its end.
pub fn serve(kind: ListenerKind, config: &ServerConfig) -> crate::Result<()> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(Error::Unsupported(
            "--inetd serves the connection on standard input, which is a terminal here: \
             start it from inetd, xinetd or a systemd Accept=yes socket"
                .into(),
        ));
    }
    let stat = nix::sys::stat::fstat(libc::STDIN_FILENO)
        .map_err(|e| Error::io("cannot inspect standard input", e.into()))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(Error::Unsupported(
            "--inetd needs a TCP connection on standard input, and it is not a socket".into(),
        ));
    }
    // Certificates are loaded (or made) before the connection is touched: a bad file is one
    // line and exit 1, and the client sees its connection closed.
    let tls = if kind.is_tls() {
        let host = stream_local_ip(&stdin);
        Some(TlsServer::new(&config.tls, &host)?)
    } else {
        None
    };
    let fd = stdin
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Error::io("cannot take standard input", e))?;
    let stream = TcpStream::from(fd);
    let peer = stream
        .peer_addr()
        .map_err(|e| Error::io("--inetd needs a connected TCP socket on standard input", e))?;
    let stats = Stats::new().map_err(|e| Error::io("cannot set up the counters", e))?;
    let lifecycle = Lifecycle::new(&config.admission, Arc::new(stats))
        .map_err(|e| Error::io("cannot set up admission control", e))?;
    lifecycle.configure(&stream, peer);
    // The one connection is listener 0's, in the counters.
    let incoming = Incoming {
        stream,
        peer,
        kind,
        listener: 0,
    };
    // Refused (counted and logged): closing the socket is the answer.
    if let Some((mut stream, screened)) = incoming.screen(&lifecycle) {
        echo::serve_connection(&mut stream, screened, config, &lifecycle, tls.as_ref());
    }
    Ok(())
}

/// The local address of the connection on `stdin`, to name in a self-signed certificate.
fn stream_local_ip(stdin: &std::io::Stdin) -> Vec<std::net::IpAddr> {
    nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(stdin.as_raw_fd())
        .ok()
        .and_then(|addr| {
            addr.as_sockaddr_in()
                .map(|v4| std::net::IpAddr::V4(v4.ip()))
                .or_else(|| {
                    addr.as_sockaddr_in6()
                        .map(|v6| std::net::IpAddr::V6(v6.ip()))
                })
        })
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_tcp_and_tcp_proxy() {
        assert_eq!(parse_kind("tcp"), Ok(ListenerKind::Tcp));
        assert_eq!(parse_kind("TCP+proxy"), Ok(ListenerKind::TcpProxy));
        assert_eq!(parse_kind("tls"), Ok(ListenerKind::Tls));
        assert_eq!(parse_kind("tls+proxy"), Ok(ListenerKind::TlsProxy));
        let err = parse_kind("udp").unwrap_err();
        assert!(
            err.contains("use tcp (the default), tcp+proxy, tls or tls+proxy"),
            "{err}"
        );
    }
}
