//! The PROXY protocol header (HAProxy's `doc/proxy-protocol.txt`, text v1 and binary v2) as a
//! sans-I/O step: a connection accepted on a `tcp+proxy://` listener begins with one header that
//! names the real client; every model feeds the first bytes it reads to [`HeaderReader`] (event
//! models) or calls [`read_header`] (blocking models), learns the real peer, and echoes whatever
//! followed the header first.
//!
//! The version is detected from the first byte (`P` for v1, `\r` for v2), and a prefix that
//! cannot start either signature fails at once, so a client that is not a proxy is closed on its
//! first bytes. The header itself is decoded by the `proxy-header` crate; this module adds the
//! size caps, the early checks with a reason for the log line, TLV validation and the streaming
//! and blocking drivers.
//!
//! Addresses are returned in canonical form: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
//! what a dual-stack proxy sends for an IPv4 client) becomes the IPv4 address, so logs and
//! admission rules see the client as it is.

use std::fmt;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use proxy_header::ParseConfig;

/// The longest v1 header, CRLF included (the spec's limit: 107 bytes).
pub const V1_MAX_LEN: usize = 107;

/// The longest header accepted, either version. A v2 header is 16 fixed bytes, up to 216
/// bytes of addresses (AF_UNIX; 36 for IPv6) and its TLVs. HAProxy's usual TLVs (ALPN,
/// authority up to 255 bytes, unique id up to 128, CRC32C, netns, and the SSL block with
/// version, CN, cipher, signature and key algorithms) add well under 1 KiB, so 4096 leaves room
/// for custom TLVs (`set-proxy-v2-tlv-fmt`) and matches nginx's limit for the same header. A v2
/// header whose length field says more is refused as soon as its 16 fixed bytes arrive.
pub const MAX_HEADER_LEN: usize = 4096;

const V1_SIGNATURE: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family and transport, length.
const V2_FIXED_LEN: usize = 16;

const V1_ONLY: ParseConfig = ParseConfig {
    include_tlvs: false,
    allow_v1: true,
    allow_v2: false,
};
const V2_ONLY: ParseConfig = ParseConfig {
    include_tlvs: true,
    allow_v1: false,
    allow_v2: true,
};

/// What a PROXY header says about the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The real client. `None` for a v2 `LOCAL` header (the proxy's own connection, such as a
    /// health check), a v1 `UNKNOWN` header, and v2 headers with unspecified or AF_UNIX
    /// addresses: the connection is then served as coming from the proxy itself.
    pub source: Option<SocketAddr>,
    /// The address the client connected to on the proxy; `None` exactly when `source` is.
    pub destination: Option<SocketAddr>,
    /// 1 or 2.
    pub version: u8,
    /// A v2 `LOCAL` command.
    pub local: bool,
}

impl ProxyHeader {
    /// The peer to serve the connection as: the header's source, or `proxy` (the connection's
    /// own peer) when the header names none.
    pub fn peer_or(&self, proxy: SocketAddr) -> SocketAddr {
        self.source.unwrap_or(proxy)
    }
}

/// Why a connection's PROXY header was refused; its `Display` is a short reason for the one
/// log line that closes the connection.
#[derive(Debug)]
pub enum HeaderError {
    /// The first bytes match neither signature (a client that is not a proxy).
    NotProxy(Prefix),
    /// The header is structurally wrong.
    Malformed { version: u8, reason: &'static str },
    /// The header is longer than the cap for its version ([`V1_MAX_LEN`], [`MAX_HEADER_LEN`]).
    Oversized { version: u8, len: usize },
    /// A well-formed header this server does not serve (another version, command or transport).
    Unsupported(&'static str),
    /// The header did not arrive in time.
    Timeout { received: usize },
    /// The peer closed (or half-closed) the connection before the header was complete.
    Truncated { received: usize },
    /// Reading the socket failed.
    Io(io::Error),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::NotProxy(prefix) => {
                write!(f, "no PROXY header: the connection began with \"{prefix}\"")
            }
            HeaderError::Malformed { version, reason } => {
                write!(f, "malformed PROXY v{version} header: {reason}")
            }
            HeaderError::Oversized { version: 1, .. } => {
                write!(
                    f,
                    "PROXY v1 header has no line end within {V1_MAX_LEN} bytes"
                )
            }
            HeaderError::Oversized { version, len } => write!(
                f,
                "PROXY v{version} header of {len} bytes exceeds the {MAX_HEADER_LEN}-byte limit"
            ),
            HeaderError::Unsupported(reason) => write!(f, "unsupported PROXY header: {reason}"),
            HeaderError::Timeout { received } => write!(
                f,
                "no complete PROXY header within the proxy timeout ({received} bytes received)"
            ),
            HeaderError::Truncated { received: 0 } => {
                write!(f, "connection closed before a PROXY header")
            }
            HeaderError::Truncated { received } => write!(
                f,
                "connection closed after {received} bytes of an incomplete PROXY header"
            ),
            HeaderError::Io(error) => write!(f, "reading the PROXY header failed: {error}"),
        }
    }
}

impl std::error::Error for HeaderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HeaderError::Io(error) => Some(error),
            _ => None,
        }
    }
}

/// The first few bytes of a connection that is not a proxy, kept to be shown escaped in the
/// log line (a scanner's `GET / HT` tells the operator what reached the port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    bytes: [u8; Prefix::CAP],
    len: usize,
}

impl Prefix {
    const CAP: usize = 8;

    fn of(buf: &[u8]) -> Prefix {
        let len = buf.len().min(Prefix::CAP);
        let mut bytes = [0; Prefix::CAP];
        bytes[..len].copy_from_slice(&buf[..len]);
        Prefix { bytes, len }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes[..self.len].escape_ascii())
    }
}

/// Parses a PROXY header at the start of `buf`.
///
/// `Ok(None)`: every byte so far is a valid beginning of a header; read more. `Ok(Some((header,
/// consumed)))`: the header took `consumed` bytes; what follows is the client's data. An error
/// is final: more bytes would not change it. An incomplete result is only ever returned for
/// fewer than [`MAX_HEADER_LEN`] bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, HeaderError> {
    match buf.first() {
        None => Ok(None),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(HeaderError::NotProxy(Prefix::of(buf))),
    }
}

/// Whether `buf` starts like `signature` for as many bytes as it has.
fn matches_signature(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, HeaderError> {
    if !matches_signature(buf, V1_SIGNATURE) {
        return Err(HeaderError::NotProxy(Prefix::of(buf)));
    }
    // The crate never looks past the line end; giving it at most the longest legal line keeps
    // the cost of a garbage line bounded whatever the caller's buffer holds.
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    match proxy_header::ProxyHeader::parse(window, V1_ONLY) {
        Ok((header, consumed)) => {
            let (source, destination) = match header.proxied_address() {
                Some(addresses) => (
                    Some(canonical(addresses.source)),
                    Some(canonical(addresses.destination)),
                ),
                None => (None, None),
            };
            let header = ProxyHeader {
                source,
                destination,
                version: 1,
                local: false,
            };
            Ok(Some((header, consumed)))
        }
        Err(proxy_header::Error::BufferTooShort) if window.len() < V1_MAX_LEN => Ok(None),
        Err(_) if window.len() == V1_MAX_LEN && !window.contains(&b'\n') => {
            Err(HeaderError::Oversized {
                version: 1,
                len: buf.len(),
            })
        }
        Err(_) => Err(HeaderError::Malformed {
            version: 1,
            reason: "expected TCP4 or TCP6 with two addresses and two ports, or UNKNOWN, then CRLF",
        }),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, HeaderError> {
    if !matches_signature(buf, V2_SIGNATURE) {
        return Err(HeaderError::NotProxy(Prefix::of(buf)));
    }
    if buf.len() < V2_FIXED_LEN {
        return Ok(None);
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(HeaderError::Unsupported(
            "v2 signature with a version other than 2",
        ));
    }
    let local = match version_command & 0x0f {
        0x0 => true,
        0x1 => false,
        _ => {
            return Err(HeaderError::Unsupported(
                "v2 command other than LOCAL or PROXY",
            ))
        }
    };
    let len = V2_FIXED_LEN + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::Oversized { version: 2, len });
    }
    match buf[13] {
        // UNSPEC, or TCP over IPv4, IPv6, AF_UNIX.
        0x00 | 0x11 | 0x21 | 0x31 => {}
        // A LOCAL header's addresses are ignored, so its transport does not matter.
        0x12 | 0x22 | 0x32 if local => {}
        0x12 | 0x22 | 0x32 => {
            return Err(HeaderError::Unsupported(
                "v2 header for a datagram (UDP) connection on a stream listener",
            ))
        }
        _ => {
            return Err(HeaderError::Malformed {
                version: 2,
                reason: "unknown address family or transport",
            })
        }
    }
    if buf.len() < len {
        return Ok(None);
    }
    let malformed = |reason| HeaderError::Malformed { version: 2, reason };
    let (header, consumed) = proxy_header::ProxyHeader::parse(&buf[..len], V2_ONLY)
        .map_err(|_| malformed("length too short for the address family"))?;
    debug_assert_eq!(consumed, len);
    // The spec lets a receiver ignore TLVs, but one that overruns the header or carries an
    // invalid value means the sender and we disagree about the bytes: refuse rather than guess.
    for tlv in header.tlvs() {
        tlv.map_err(|_| malformed("a TLV overruns the header or holds an invalid value"))?;
    }
    let (source, destination) = match header.proxied_address() {
        Some(addresses) if !local => (
            Some(canonical(addresses.source)),
            Some(canonical(addresses.destination)),
        ),
        _ => (None, None),
    };
    let header = ProxyHeader {
        source,
        destination,
        version: 2,
        local,
    };
    Ok(Some((header, len)))
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Accumulates a connection's first bytes until its PROXY header is complete, for models that
/// do their own reads (epoll, async, uring). It never holds more than [`MAX_HEADER_LEN`]
/// bytes, and copies nothing when the header arrives in one read (the usual case: proxies send
/// it in one segment).
#[derive(Debug, Default)]
pub struct HeaderReader {
    /// The bytes of an incomplete header, empty until a read ends mid-header.
    pending: Vec<u8>,
}

impl HeaderReader {
    pub fn new() -> HeaderReader {
        HeaderReader::default()
    }

    /// How many bytes of an incomplete header are held.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Feeds the bytes just read. `Ok(None)`: the header is still incomplete. `Ok(Some((header,
    /// leftover)))`: the header is complete; `leftover` is the part of `data` after it, the
    /// client's first bytes, to be echoed before anything read later. After a header or an
    /// error the reader is spent: the caller drops it.
    pub fn feed<'d>(
        &mut self,
        data: &'d [u8],
    ) -> Result<Option<(ProxyHeader, &'d [u8])>, HeaderError> {
        if self.pending.is_empty() {
            return match parse(data)? {
                Some((header, consumed)) => Ok(Some((header, &data[consumed..]))),
                None => {
                    // An incomplete result means fewer than MAX_HEADER_LEN bytes.
                    self.pending.extend_from_slice(data);
                    Ok(None)
                }
            };
        }
        let before = self.pending.len();
        let taken = data.len().min(MAX_HEADER_LEN - before);
        self.pending.extend_from_slice(&data[..taken]);
        match parse(&self.pending)? {
            Some((header, consumed)) => {
                // `pending[..before]` alone was incomplete, so the header ends inside `data`.
                debug_assert!(consumed > before);
                self.pending = Vec::new();
                Ok(Some((header, &data[consumed - before..])))
            }
            None => {
                debug_assert_eq!(taken, data.len());
                Ok(None)
            }
        }
    }

    /// The error for a peer that closed before the header was complete.
    pub fn end_of_stream(&self) -> HeaderError {
        HeaderError::Truncated {
            received: self.buffered(),
        }
    }

    /// The error for a header that did not complete before the deadline.
    pub fn timed_out(&self) -> HeaderError {
        HeaderError::Timeout {
            received: self.buffered(),
        }
    }
}

/// A blocking stream whose read timeout can be set, so [`read_header`] can hold a deadline.
pub trait TimedRead: Read {
    fn read_timeout(&self) -> io::Result<Option<Duration>>;
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedRead for TcpStream {
    fn read_timeout(&self) -> io::Result<Option<Duration>> {
        TcpStream::read_timeout(self)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

impl TimedRead for UnixStream {
    fn read_timeout(&self) -> io::Result<Option<Duration>> {
        UnixStream::read_timeout(self)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

/// Reads a PROXY header from a blocking stream, for the blocking models: the whole header must
/// arrive within `timeout` (`--proxy-timeout`), however it is split, so a peer that trickles
/// bytes cannot hold the connection longer. Returns the header and the bytes read after it, to
/// be echoed first. The stream's read timeout is restored before returning.
pub fn read_header<S: TimedRead>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(ProxyHeader, Vec<u8>), HeaderError> {
    let saved = stream.read_timeout().map_err(HeaderError::Io)?;
    let result = read_header_by(stream, Instant::now() + timeout);
    let restored = stream.set_read_timeout(saved);
    let got = result?;
    restored.map_err(HeaderError::Io)?;
    Ok(got)
}

fn read_header_by<S: TimedRead>(
    stream: &mut S,
    deadline: Instant,
) -> Result<(ProxyHeader, Vec<u8>), HeaderError> {
    let mut reader = HeaderReader::new();
    let mut chunk = [0u8; MAX_HEADER_LEN];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(reader.timed_out());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(HeaderError::Io)?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(reader.end_of_stream()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(reader.timed_out())
            }
            Err(e) => return Err(HeaderError::Io(e)),
        };
        if let Some((header, leftover)) = reader.feed(&chunk[..n])? {
            return Ok((header, leftover.to_vec()));
        }
    }
}

#[cfg(test)]
mod tests;
