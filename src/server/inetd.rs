//! `serve --inetd`: serve exactly one connection, already accepted, on standard input (fd 0),
//! then exit: for inetd and xinetd `nowait` services and systemd `Accept=yes` sockets, which
//! start one process per connection. `--inetd=tcp+proxy` expects the connection to begin with
//! a PROXY protocol header (v1 or v2), as from HAProxy's `send-proxy` in front of such a
//! socket. The connection goes through the same lifecycle as in any model (the trusted-proxy
//! check, the header within `--proxy-timeout`, admission, socket options, its close line and
//! counters) and the blocking models' connection code; logs go to stderr, never to the socket.

use std::io::IsTerminal;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::listen::ListenerKind;
use crate::server::accept::Incoming;
use crate::server::conn::Lifecycle;
use crate::server::echo;
use crate::server::ServerConfig;
use crate::stats::Stats;
use crate::Error;

/// The kinds of connection `--inetd` serves: plain TCP, or TCP that starts with a PROXY header.
pub const KINDS: [ListenerKind; 2] = [ListenerKind::Tcp, ListenerKind::TcpProxy];

/// Parses `--inetd`'s value: `tcp` or `tcp+proxy`.
pub fn parse_kind(text: &str) -> Result<ListenerKind, String> {
    KINDS
        .into_iter()
        .find(|kind| kind.scheme().eq_ignore_ascii_case(text.trim()))
        .ok_or_else(|| {
            format!("invalid inetd connection kind '{text}': use tcp (the default) or tcp+proxy")
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
        // inetd mode serves tcp and tcp+proxy, never TLS.
        echo::serve_connection(&mut stream, screened, config, &lifecycle, None);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_tcp_and_tcp_proxy() {
        assert_eq!(parse_kind("tcp"), Ok(ListenerKind::Tcp));
        assert_eq!(parse_kind("TCP+proxy"), Ok(ListenerKind::TcpProxy));
        let err = parse_kind("udp").unwrap_err();
        assert!(err.contains("use tcp (the default) or tcp+proxy"), "{err}");
    }
}
