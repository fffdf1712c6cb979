//! The one verified exchange every check is built on: send a payload on one connection (in
//! pieces of a chosen size, optionally half-closing afterwards, optionally not reading for a
//! while), read the echo concurrently, and compare every byte as it arrives.
//!
//! Reads may be short and writes partial, so nothing here assumes one read is one message;
//! every socket has a timeout, so a server that stops answering is a verdict, not a hang.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// How long one connect, read or write may wait before the server counts as stalled.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// After a complete echo, how long to wait for bytes that should not come.
const EXCESS_WAIT: Duration = Duration::from_millis(50);

/// Where the checks connect, and how each connection begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// `tcp+proxy://`: every connection first sends a PROXY protocol v1 header naming its
    /// own two ends, as HAProxy in front would, and the checks run on what follows.
    pub proxy_header: bool,
}

/// Connects with [`IO_TIMEOUT`] on the connect and on every later read and write, and sends
/// the PROXY header if the target wants one.
pub fn connect(target: Target) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&target.addr, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    if target.proxy_header {
        let header = proxy_v1_header(stream.local_addr()?, stream.peer_addr()?);
        stream.write_all(header.as_bytes())?;
    }
    Ok(stream)
}

/// A PROXY protocol v1 line (HAProxy's proxy-protocol.txt, section 2.1) for a connection from
/// `source` to `destination`.
pub fn proxy_v1_header(source: SocketAddr, destination: SocketAddr) -> String {
    let family = match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
        (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
        // A socket's two ends are of one family.
        _ => return "PROXY UNKNOWN\r\n".to_string(),
    };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
}

/// How to send a payload.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    pub payload: &'a [u8],
    /// Bytes per write(2).
    pub piece: usize,
    /// Shut the write side after the last byte, and expect EOF after the whole echo.
    pub half_close: bool,
    /// Read nothing for this long after starting to send.
    pub read_after: Duration,
    /// The whole exchange must end by then.
    pub deadline: Duration,
    /// How long one read may wait for the next bytes.
    pub stall: Duration,
    /// After a complete echo (no half-close), how long to watch for bytes that should not
    /// come; zero closes at once.
    pub excess_wait: Duration,
}

impl<'a> Plan<'a> {
    /// The payload in writes of up to 64 KiB, no half-close, reading at once, 30 s at most.
    pub fn new(payload: &'a [u8]) -> Self {
        Plan {
            payload,
            piece: 64 * 1024,
            half_close: false,
            read_after: Duration::ZERO,
            deadline: Duration::from_secs(30),
            stall: IO_TIMEOUT,
            excess_wait: EXCESS_WAIT,
        }
    }

    /// What was sent, in words.
    pub fn describe(&self) -> String {
        let len = self.payload.len();
        let writes = len.div_ceil(self.piece.max(1));
        let mut text = format!(
            "{} in {writes} writes of up to {} B",
            bytes(len as u64),
            self.piece
        );
        if !self.read_after.is_zero() {
            text += &format!(", reading nothing for the first {:?}", self.read_after);
        }
        if self.half_close {
            text += ", then shut the write side (half-close)";
        }
        text
    }
}

/// How the echo ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every byte came back (and, after a half-close, then EOF).
    Complete,
    /// Every byte came back, but no EOF followed the half-close.
    NoEof,
    /// A byte differed from what was sent.
    Mismatch,
    /// The server closed the connection before the whole echo came back.
    EarlyEof,
    /// More bytes came back than were sent.
    Excess(u64),
    /// Nothing arrived for [`IO_TIMEOUT`], or the deadline passed.
    Stalled,
    /// A read failed (a reset, usually).
    Error(String),
}

/// The first byte that differed, with a few bytes of context from there on.
#[derive(Debug, Clone)]
pub struct Difference {
    pub offset: u64,
    pub got: Vec<u8>,
    pub want: Vec<u8>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "at byte {}: got {}, expected {}",
            self.offset,
            hex(&self.got),
            hex(&self.want)
        )
    }
}

/// What came back.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub sent: u64,
    pub write_error: Option<String>,
    pub received: u64,
    pub difference: Option<Difference>,
    pub end: End,
    pub secs: f64,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.end == End::Complete
    }

    /// What came back, in words.
    pub fn describe(&self, expected: u64) -> String {
        let got = if self.received == expected {
            format!("all {}", bytes(expected))
        } else {
            format!("{} of {}", bytes(self.received), bytes(expected))
        };
        let then = match &self.end {
            End::Complete => format!("in {:.2}s", self.secs),
            End::NoEof => format!("then no EOF within {}s of the echo", IO_TIMEOUT.as_secs()),
            End::Mismatch => "then a wrong byte".to_string(),
            End::EarlyEof => "then the server closed the connection (EOF)".to_string(),
            End::Excess(n) => format!("then {n} more bytes than were sent"),
            End::Stalled => format!("then nothing more (waited {:.1}s)", self.secs),
            End::Error(e) => format!("then a read failed: {e}"),
        };
        let mut text = format!("{got}, {then}");
        if let Some(e) = &self.write_error {
            text += &format!(" (sending failed after {}: {e})", bytes(self.sent));
        }
        text
    }

    /// One line for the table.
    pub fn summary(&self, expected: u64) -> String {
        match &self.end {
            End::Complete => format!("{} echoed intact", bytes(expected)),
            End::Mismatch => match &self.difference {
                Some(d) => format!("wrong byte at offset {}", d.offset),
                None => "wrong byte".into(),
            },
            _ => self.describe(expected),
        }
    }
}

/// Sends `plan.payload` on `stream` from a second thread while reading and checking the
/// echo on this one.
pub fn run(stream: TcpStream, plan: Plan<'_>) -> Outcome {
    let started = Instant::now();
    let deadline = started + plan.deadline;
    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            return Outcome {
                sent: 0,
                write_error: Some(e.to_string()),
                received: 0,
                difference: None,
                end: End::Error(format!("cannot clone the socket: {e}")),
                secs: 0.0,
            }
        }
    };
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || send(writer, plan));
        if !plan.read_after.is_zero() {
            std::thread::sleep(plan.read_after);
        }
        let (received, difference, end) = receive(&stream, plan, deadline);
        // Unblocks the sender if the server stopped reading.
        let _ = stream.shutdown(Shutdown::Both);
        let (sent, write_error) = sender
            .join()
            .unwrap_or((0, Some("the sender panicked".into())));
        Outcome {
            sent,
            write_error,
            received,
            difference,
            end,
            secs: started.elapsed().as_secs_f64(),
        }
    })
}

fn send(mut stream: TcpStream, plan: Plan<'_>) -> (u64, Option<String>) {
    let mut sent = 0u64;
    for piece in plan.payload.chunks(plan.piece.max(1)) {
        if let Err(e) = stream.write_all(piece) {
            return (sent, Some(e.to_string()));
        }
        sent += piece.len() as u64;
    }
    if plan.half_close {
        if let Err(e) = stream.shutdown(Shutdown::Write) {
            return (sent, Some(format!("shutdown(SHUT_WR): {e}")));
        }
    }
    (sent, None)
}

fn receive(
    mut stream: &TcpStream,
    plan: Plan<'_>,
    deadline: Instant,
) -> (u64, Option<Difference>, End) {
    let want = plan.payload;
    let _ = stream.set_read_timeout(Some(plan.stall));
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0usize;
    while at < want.len() {
        if Instant::now() >= deadline {
            return (at as u64, None, End::Stalled);
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return (at as u64, None, End::EarlyEof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return (at as u64, None, End::Stalled),
            Err(e) => return (at as u64, None, End::Error(e.to_string())),
        };
        let expected = &want[at..(at + n).min(want.len())];
        let got = &buf[..n];
        if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
            let offset = at + i;
            let difference = Difference {
                offset: offset as u64,
                got: got[i..(i + 16).min(n)].to_vec(),
                want: want[offset..(offset + 16).min(want.len())].to_vec(),
            };
            return ((at + i) as u64, Some(difference), End::Mismatch);
        }
        if n > expected.len() {
            return (
                want.len() as u64,
                None,
                End::Excess((n - expected.len()) as u64),
            );
        }
        at += n;
    }
    // Everything came back: after a half-close EOF must follow, otherwise nothing may.
    let wait = if plan.half_close {
        IO_TIMEOUT
    } else {
        plan.excess_wait
    };
    if wait.is_zero() {
        return (at as u64, None, End::Complete);
    }
    let _ = stream.set_read_timeout(Some(wait));
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) if plan.half_close => break End::Complete,
            Ok(0) => break End::Complete,
            Ok(n) => break End::Excess(n as u64),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) && plan.half_close => break End::NoEof,
            Err(e) if is_timeout(&e) => break End::Complete,
            Err(e) => break End::Error(e.to_string()),
        }
    };
    (at as u64, None, end)
}

/// Whether a read or write gave up because its timeout ran out.
pub fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// `n` bytes, with a binary unit when that is shorter.
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// Bytes as hex pairs.
pub fn hex(data: &[u8]) -> String {
    if data.is_empty() {
        return "nothing".into();
    }
    data.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_v1_headers_name_both_ends() {
        let v4 = |text: &str| text.parse::<SocketAddr>().unwrap();
        assert_eq!(
            proxy_v1_header(v4("127.0.0.1:40000"), v4("127.0.0.2:7")),
            "PROXY TCP4 127.0.0.1 127.0.0.2 40000 7\r\n"
        );
        assert_eq!(
            proxy_v1_header(v4("[::1]:40000"), v4("[::1]:7")),
            "PROXY TCP6 ::1 ::1 40000 7\r\n"
        );
    }

    #[test]
    fn names_sizes() {
        assert_eq!(bytes(1), "1 B");
        assert_eq!(bytes(1000), "1000 B");
        assert_eq!(bytes(64 << 10), "64 KiB");
        assert_eq!(bytes(64 << 20), "64 MiB");
    }
}
