//! Listener specs: what `--listen` (and a client's or bench's target) names.
//!
//! A spec is `HOST:PORT`, `[V6]:PORT` or a bare `PORT` (plain TCP, loopback for a bare port), or
//! a URL whose scheme says what runs on the socket: `tcp://`, `tcp+proxy://` (every connection
//! starts with a PROXY protocol v1 or v2 header), `udp://`, `tls://`, `tls+proxy://`. The kind
//! travels with the bound socket, so a model asks the server what a listener expects rather than
//! re-parsing anything.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// What a listener's connections (or datagrams) carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// Plain TCP echo.
    Tcp,
    /// TCP whose connections each begin with a PROXY protocol header naming the real client.
    TcpProxy,
    /// UDP datagram echo.
    Udp,
    /// TLS over TCP; the plaintext is echoed.
    Tls,
    /// A PROXY protocol header, then TLS.
    TlsProxy,
}

impl ListenerKind {
    /// Every kind, in the order the docs present them.
    pub const ALL: [ListenerKind; 5] = [
        ListenerKind::Tcp,
        ListenerKind::TcpProxy,
        ListenerKind::Udp,
        ListenerKind::Tls,
        ListenerKind::TlsProxy,
    ];

    /// The URL scheme that names this kind.
    pub fn scheme(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::TcpProxy => "tcp+proxy",
            ListenerKind::Udp => "udp",
            ListenerKind::Tls => "tls",
            ListenerKind::TlsProxy => "tls+proxy",
        }
    }

    /// Whether connections on this kind begin with a PROXY protocol header.
    pub fn expects_proxy_header(self) -> bool {
        matches!(self, ListenerKind::TcpProxy | ListenerKind::TlsProxy)
    }

    /// Whether connections on this kind speak TLS (after the PROXY header, if any).
    pub fn is_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::TlsProxy)
    }

    /// Whether this kind is a stream (TCP) socket.
    pub fn is_stream(self) -> bool {
        self != ListenerKind::Udp
    }

    fn from_scheme(scheme: &str) -> Option<ListenerKind> {
        ListenerKind::ALL
            .into_iter()
            .find(|kind| kind.scheme().eq_ignore_ascii_case(scheme))
    }
}

impl fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme())
    }
}

/// A listener (or target) as the user wrote it: a kind and an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenSpec {
    pub kind: ListenerKind,
    pub addr: SocketAddr,
}

impl ListenSpec {
    /// A plain TCP spec.
    pub fn tcp(addr: SocketAddr) -> Self {
        ListenSpec {
            kind: ListenerKind::Tcp,
            addr,
        }
    }

    /// The same spec on another address (for example the port the kernel chose for port 0).
    pub fn with_addr(self, addr: SocketAddr) -> Self {
        ListenSpec { addr, ..self }
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.kind, self.addr)
    }
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse(text)
    }
}

/// Parses `HOST:PORT`, `[V6]:PORT`, `PORT` or `SCHEME://HOST:PORT` (see the module doc).
pub fn parse(text: &str) -> Result<ListenSpec, String> {
    let text = text.trim();
    let Some((scheme, rest)) = text.split_once("://") else {
        return crate::net::parse_addr(text).map(ListenSpec::tcp);
    };
    let kind = ListenerKind::from_scheme(scheme).ok_or_else(|| {
        let known: Vec<String> = ListenerKind::ALL
            .iter()
            .map(|k| format!("{k}://"))
            .collect();
        format!(
            "invalid address '{text}': unknown scheme '{scheme}://' (use HOST:PORT or one of {})",
            known.join(", ")
        )
    })?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains('/') || rest.contains('?') {
        return Err(format!(
            "invalid address '{text}': expected {scheme}://HOST:PORT, for example {scheme}://127.0.0.1:4000"
        ));
    }
    let addr = crate::net::parse_addr(rest)?;
    Ok(ListenSpec { kind, addr })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> ListenSpec {
        parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn plain_addresses_are_tcp() {
        assert_eq!(spec("127.0.0.1:4000").kind, ListenerKind::Tcp);
        assert_eq!(spec("4000").addr, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(spec("[::1]:7").addr, "[::1]:7".parse().unwrap());
    }

    #[test]
    fn urls_carry_their_kind() {
        for kind in ListenerKind::ALL {
            let parsed = spec(&format!("{kind}://127.0.0.1:9"));
            assert_eq!(parsed.kind, kind);
            assert_eq!(parsed.addr, "127.0.0.1:9".parse().unwrap());
            assert_eq!(spec(&parsed.to_string()), parsed, "display round-trips");
        }
        assert_eq!(spec("TCP+PROXY://[::1]:80/").kind, ListenerKind::TcpProxy);
        assert!(spec("tcp+proxy://1.2.3.4:5").kind.expects_proxy_header());
    }

    #[test]
    fn bad_specs_say_why() {
        let err = parse("http://127.0.0.1:80").unwrap_err();
        assert!(err.contains("unknown scheme 'http://'"), "{err}");
        assert!(err.contains("tcp+proxy://"), "{err}");
        assert!(parse("tcp://").is_err());
        assert!(parse("tcp://127.0.0.1:80/path").is_err());
        assert!(parse("udp://nonsense").is_err());
        assert!(parse("tls://127.0.0.1:99999").is_err());
    }
}
