//! The seeds' two clients, done right: `multiecho client` talks to an echo server from the
//! terminal or from a pipe, and its stdout carries exactly the bytes the server sent back.
//!
//! - The **line client** (the seeds' `7_client`) sends one line, waits for its whole echo,
//!   prints it, and repeats. TCP is a byte stream, so the echo may arrive in any number of
//!   pieces: the client counts bytes (the echo of a line is exactly as long as the line) instead
//!   of assuming one `read()` returns it. Lines longer than the stdin buffer go out in pieces
//!   of at most [`MAX_IN_FLIGHT`] bytes, each waited for before the next, so a line of any
//!   length neither overflows a buffer nor deadlocks (client and server both blocked writing).
//! - The **split client** (`--split`, the seeds' `echo_mpclient`) sends and receives on two
//!   threads, so lines go out without waiting for their echo (which pays on slow links and is
//!   the only way through a server that answers in batches).
//!
//! Both end the same way. At end of input (a last line without a newline is still sent; at a
//! terminal, one Ctrl-D, even after a partial line: [`TerminalInput`]), or on a line `q`/`Q`
//! typed at a terminal in the split client, the client half-closes the
//! connection (`shutdown(Write)`): the server sees end of stream, echoes what is left and
//! closes. The client prints everything until then and exits 0; if fewer bytes came back than
//! were sent, it says how many are missing and exits non-zero. A refused connection or a bad
//! address is one error line. A closed stdout (`multiecho client | head -1`) is a clean exit.
//!
//! What the seeds got wrong and these clients do not: both assumed one `read()` returns the
//! whole echo (against `echo_mpserv`, whose buffer is 30 bytes, a longer line comes back in
//! pieces); `7_client` read words with `scanf("%s")` into a fixed 1 KiB buffer (longer input
//! writes past it) and looped forever re-sending its last word once stdin ended;
//! `echo_mpclient` never checked `fgets()` for end of input (so it, too, re-sent its last
//! line forever unless it saw `q`), wrote one byte past its buffer when a read filled it, and
//! left its writer process running after the server closed.
//!
//! A `udp://HOST:PORT` target runs the UDP line client instead (`udp`): a datagram per line.
//! A `tls://HOST:PORT` target runs the same line client over a TLS session, whose half-close
//! is close_notify, and a split client of its own (see [`crate::tls::client`]).

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Context};

use crate::listen::{ListenSpec, ListenerKind};

mod udp;

/// The most bytes of one line the line client sends before reading their echo back: well
/// under what the two ends' socket buffers hold, so neither side blocks writing for good.
pub const MAX_IN_FLIGHT: usize = 64 * 1024;

/// How long the split client waits for its sender to reach end of input after the server
/// closed first (see [`split_client`]): ample for a thread that is a read away from it.
const SENDER_GRACE: Duration = Duration::from_secs(1);

/// What `multiecho client` does (validated from its command line by `cli`).
#[derive(Debug)]
pub struct ClientConfig {
    /// The server: `tcp://` (the line or split client), `udp://` (a datagram per line) or
    /// `tls://`.
    pub target: ListenSpec,
    /// The address as the user wrote it: a `tls://` target's host name is checked against it.
    pub addr_text: String,
    /// The split client (`--split`, TCP and TLS) instead of the line client.
    pub split: bool,
    /// How long connecting may take (TCP), or each echo (UDP).
    pub timeout: Option<Duration>,
    /// `--tls-ca`, `--insecure`, `--sni` and the client certificate.
    pub tls: crate::tls::client::TlsClientOptions,
}

/// Runs the client: connects, then runs the line or the split client over stdin and stdout.
///
/// Errors from stdout are returned as plain `io::Error` (so the caller can treat a broken
/// pipe as a normal end); errors on the connection are described, never bare.
pub fn run(args: &ClientConfig) -> anyhow::Result<()> {
    let target = args.target;
    let addr = target.addr;
    if target.kind != ListenerKind::Tls {
        args.tls.refuse_for_plain_target(&args.addr_text)?;
    }
    match target.kind {
        ListenerKind::Tcp => {}
        ListenerKind::Tls => return run_tls(args, addr),
        ListenerKind::Udp => {
            if args.split {
                anyhow::bail!("--split is for TCP; a udp:// target gets a datagram per line");
            }
            let timeout = args.timeout.unwrap_or(udp::DEFAULT_TIMEOUT);
            return udp::line_client(addr, timeout, io::stdin().lock(), io::stdout().lock());
        }
        kind => anyhow::bail!("the client speaks tcp://, udp:// and tls://, not {kind}://"),
    }
    let stream = connect(addr, args.timeout)?;
    let interactive = greet(args, addr);
    let input = stdin_input();
    if args.split {
        split_client(stream, addr, input, io::stdout(), interactive)
    } else {
        line_client(stream, addr, input, io::stdout().lock())
    }
}

/// `client tls://...`: the handshake, then the line client or the TLS split client.
fn run_tls(args: &ClientConfig, addr: SocketAddr) -> anyhow::Result<()> {
    use crate::tls::client::{self as tls, Resumption};
    let target = args.tls.target(&args.addr_text, Resumption::Allowed)?;
    let stream = tls::connect(addr, args.timeout, &target)?;
    let interactive = greet(args, addr);
    let input = stdin_input();
    if args.split {
        let stdin = io::stdin();
        tls::split_client(
            stream,
            addr,
            stdin.as_fd(),
            input,
            io::stdout(),
            interactive,
        )
    } else {
        line_client(stream, addr, input, io::stdout().lock())
    }
}

/// At a terminal, says how to end; returns whether stdin is one.
fn greet(args: &ClientConfig, addr: SocketAddr) -> bool {
    let interactive = io::stdin().is_terminal();
    if interactive {
        let how_to_end = if args.split {
            "type q or Ctrl-D to finish"
        } else {
            "press Ctrl-D to finish"
        };
        eprintln!("multiecho: connected to {addr}; {how_to_end}");
    }
    interactive
}

/// Standard input, read so that one Ctrl-D ends it at a terminal. Owned, because the sender
/// thread needs it (a stdin lock cannot move threads).
fn stdin_input() -> Box<dyn BufRead + Send> {
    match TerminalInput::for_terminal(io::stdin(), io::stdin()) {
        Some(terminal) => Box::new(io::BufReader::new(terminal)),
        None => Box::new(io::BufReader::new(io::stdin())),
    }
}

/// A connection the line client talks over: plain TCP, or a TLS session.
pub trait EchoStream: Read + Write {
    /// Ends the sending direction: TCP's FIN, TLS's close_notify.
    fn half_close(&mut self) -> io::Result<()>;
    /// Acknowledges what arrived at once (see [`line_client`]).
    fn ack_now(&self);
}

impl EchoStream for TcpStream {
    fn half_close(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }

    fn ack_now(&self) {
        let _ = socket2::SockRef::from(self).set_quickack(true);
    }
}

/// Connects to `addr`, within `timeout` if one is given.
fn connect(addr: SocketAddr, timeout: Option<Duration>) -> anyhow::Result<TcpStream> {
    let stream = match timeout {
        Some(timeout) => TcpStream::connect_timeout(&addr, timeout),
        None => TcpStream::connect(addr),
    };
    let stream = stream.map_err(|e| anyhow!("cannot connect to {addr}: {e}"))?;
    // Lines are small and each is waited for: Nagle would only add delay.
    stream
        .set_nodelay(true)
        .map_err(|e| anyhow!("cannot configure the connection to {addr}: {e}"))?;
    Ok(stream)
}

/// Describes an error on the connection. The message is flattened into a string on purpose:
/// a peer that went away gives EPIPE, which must not pass for a closed stdout.
fn connection_error(addr: SocketAddr, doing: &str, err: io::Error) -> anyhow::Error {
    anyhow!("{doing} {addr}: {err}")
}

/// The line client: send a line, print its whole echo, repeat; then half-close and print
/// whatever else the server sends before it closes.
pub fn line_client(
    mut stream: impl EchoStream,
    addr: SocketAddr,
    mut input: impl BufRead,
    mut output: impl Write,
) -> anyhow::Result<()> {
    let mut piece = Vec::with_capacity(MAX_IN_FLIGHT);
    let mut buf = vec![0u8; MAX_IN_FLIGHT];
    loop {
        piece.clear();
        {
            let available = fill(&mut input)?;
            if available.is_empty() {
                break;
            }
            let line_end = available
                .iter()
                .position(|&b| b == b'\n')
                .map_or(available.len(), |i| i + 1);
            piece.extend_from_slice(&available[..line_end.min(MAX_IN_FLIGHT)]);
        }
        input.consume(piece.len());

        stream
            .write_all(&piece)
            .map_err(|e| connection_error(addr, "cannot send to", e))?;
        // Count bytes: the echo may come back in any number of pieces.
        let mut missing = piece.len();
        while missing > 0 {
            let want = missing.min(buf.len());
            let n = match stream.read(&mut buf[..want]) {
                Ok(0) => anyhow::bail!(
                    "{addr} closed the connection with {missing} of the {} bytes just sent \
                     not echoed",
                    piece.len()
                ),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(connection_error(addr, "cannot receive from", e)),
            };
            output.write_all(&buf[..n])?;
            missing -= n;
            if missing > 0 {
                // A server that writes the echo in small pieces without TCP_NODELAY (the
                // seeds) holds each piece until the previous one is acknowledged, and we
                // have nothing to send that would carry the ACK: acknowledge at once rather
                // than after the delayed-ACK timer (up to 40 ms a piece).
                stream.ack_now();
            }
        }
        output.flush()?;
    }
    stream
        .half_close()
        .map_err(|e| connection_error(addr, "cannot half-close the connection to", e))?;
    copy_until_closed(&mut stream, addr, &mut output, &mut buf)?;
    Ok(())
}

/// Prints everything the server sends until it closes; returns the byte count. (A TLS
/// session that ends without close_notify is an end too, with a warning: every byte is
/// counted, so a truncated echo is caught all the same.)
fn copy_until_closed(
    stream: &mut impl Read,
    addr: SocketAddr,
    output: &mut impl Write,
    buf: &mut [u8],
) -> anyhow::Result<u64> {
    let mut total = 0u64;
    loop {
        match stream.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                output.write_all(&buf[..n])?;
                output.flush()?;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                eprintln!("multiecho: warning: {addr} closed the connection without close_notify");
                return Ok(total);
            }
            Err(e) => return Err(connection_error(addr, "cannot receive from", e)),
        }
    }
}

/// The split client: one thread sends stdin, this one prints what comes back, concurrently.
/// End of input (or `q`/`Q` when `end_on_q`) half-closes; the client ends when the server
/// closes, and checks that every byte sent came back. A server that closes while input is
/// still coming is an error, and the client does not wait long for the sender (which may be
/// blocked reading a terminal): returning ends the process.
pub fn split_client(
    stream: TcpStream,
    addr: SocketAddr,
    input: impl BufRead + Send + 'static,
    mut output: impl Write,
    end_on_q: bool,
) -> anyhow::Result<()> {
    let writer = stream
        .try_clone()
        .map_err(|e| connection_error(addr, "cannot share the connection to", e))?;
    // Set by the sender just before it half-closes: from then on the server may close.
    let input_ended = Arc::new(AtomicBool::new(false));
    // The sender's result: the bytes it sent, or why it stopped. Dropped unsent if it panics.
    let (sender_done, sender_result) = mpsc::channel();
    {
        let input_ended = Arc::clone(&input_ended);
        thread::Builder::new()
            .name("sender".into())
            .spawn(move || {
                let _ = sender_done.send(send_lines(writer, addr, input, end_on_q, &input_ended));
            })
            .context("cannot start the sender thread")?;
    }

    let mut reader = stream;
    let mut buf = vec![0u8; MAX_IN_FLIGHT];
    let received = copy_until_closed(&mut reader, addr, &mut output, &mut buf)?;

    // `None`: the sender panicked (its end of the channel was dropped without a result).
    let outcome = if input_ended.load(Ordering::Acquire) {
        sender_result.recv().ok()
    } else {
        // The server closed first. That may be a race, not an early close: a server that
        // closes once it has echoed the last line can beat the sender to reading end of
        // input. So give the sender a moment to finish. One still reading after it (at a
        // terminal, or from a pipe with nothing written) really has more input to come; do
        // not wait for it: returning ends the process.
        match sender_result.recv_timeout(SENDER_GRACE) {
            Ok(Ok(sent)) => Some(Ok(sent)),
            // Err: it could not send the rest, the connection was gone before input ended.
            Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Timeout) => {
                anyhow::bail!("{addr} closed the connection before the input ended")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
        }
    };
    let sent = outcome.ok_or_else(|| anyhow!("the sender thread panicked"))??;
    if received < sent {
        anyhow::bail!(
            "{addr} closed the connection with {} of the {sent} bytes sent not echoed",
            sent - received
        );
    }
    Ok(())
}

/// Sends stdin until end of input (or a `q`/`Q` line when `end_on_q`), then half-closes.
/// Returns the number of bytes sent. Input goes out as it is read, a buffer at a time (a line
/// at a time when `q` must be recognised), so a long line never has to fit in memory.
fn send_lines(
    mut stream: TcpStream,
    addr: SocketAddr,
    mut input: impl BufRead,
    end_on_q: bool,
    input_ended: &AtomicBool,
) -> anyhow::Result<u64> {
    let mut sent = 0u64;
    let mut at_line_start = true;
    loop {
        let available = fill(&mut input)?;
        if available.is_empty() {
            break;
        }
        let piece = if end_on_q {
            let line_end = available.iter().position(|&b| b == b'\n');
            &available[..line_end.map_or(available.len(), |i| i + 1)]
        } else {
            available
        };
        if end_on_q && at_line_start && is_quit(piece) {
            break;
        }
        stream
            .write_all(piece)
            .map_err(|e| connection_error(addr, "cannot send to", e))?;
        at_line_start = piece.ends_with(b"\n");
        let n = piece.len();
        input.consume(n);
        sent += n as u64;
    }
    input_ended.store(true, Ordering::Release);
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| connection_error(addr, "cannot half-close the connection to", e))?;
    Ok(sent)
}

/// Whether a line typed at the terminal asks to finish: `q` or `Q`, alone on the line.
pub(crate) fn is_quit(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line == b"q" || line == b"Q"
}

/// The next buffered bytes of standard input (empty at its end), retrying interrupted reads.
pub(crate) fn fill(input: &mut impl BufRead) -> anyhow::Result<&[u8]> {
    loop {
        match input.fill_buf() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot read standard input"),
            // End of input: say so now. Asking `fill_buf` again would read again, and at a
            // terminal that waits for a second Ctrl-D.
            Ok([]) => return Ok(&[]),
            // Borrowing the buffer across loop turns is not allowed; asking again returns
            // what is already buffered, without another read.
            Ok(_) => break,
        }
    }
    input.fill_buf().context("cannot read standard input")
}

/// Standard input read from a terminal in canonical (line) mode, where one Ctrl-D ends the
/// input even after a partial line.
///
/// The terminal hands a typed line over at its end of line; Ctrl-D hands over what is typed
/// so far without one, and only a Ctrl-D at the start of a line reads as end of input. `cat`
/// therefore needs Ctrl-D twice after a partial line; the clients promise once. So a read that
/// returns bytes without a line end (and did not fill the caller's buffer, which is larger
/// than a terminal line) is taken as the last: what it returned is sent, then input ends.
pub struct TerminalInput<R> {
    inner: R,
    /// Besides `\n`, the terminal's extra end-of-line characters (VEOL, VEOL2) if set.
    line_ends: Vec<u8>,
    ended: bool,
}

impl<R: Read> TerminalInput<R> {
    /// Wraps `inner` if `terminal` is a terminal in canonical mode; otherwise `None` (a pipe,
    /// a file, or a raw-mode terminal, whose reads say nothing about Ctrl-D).
    pub fn for_terminal(inner: R, terminal: impl std::os::fd::AsFd) -> Option<Self> {
        use nix::sys::termios::{tcgetattr, LocalFlags, SpecialCharacterIndices};
        let termios = tcgetattr(terminal).ok()?;
        if !termios.local_flags.contains(LocalFlags::ICANON) {
            return None;
        }
        let mut line_ends = vec![b'\n'];
        for index in [
            SpecialCharacterIndices::VEOL,
            SpecialCharacterIndices::VEOL2,
        ] {
            // 0 (and 0xff, _POSIX_VDISABLE on some systems) mean the character is unset.
            let c = termios.control_chars[index as usize];
            if c != 0 && c != 0xff {
                line_ends.push(c);
            }
        }
        Some(Self::with_line_ends(inner, line_ends))
    }

    /// Wraps `inner`, treating `line_ends` as the bytes that end a line.
    pub fn with_line_ends(inner: R, line_ends: Vec<u8>) -> Self {
        TerminalInput {
            inner,
            line_ends,
            ended: false,
        }
    }
}

impl<R: Read> Read for TerminalInput<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended || buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        let ends_line = n > 0 && self.line_ends.contains(&buf[n - 1]);
        if n == 0 || (n < buf.len() && !ends_line) {
            self.ended = true;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quit_lines() {
        assert!(is_quit(b"q\n"));
        assert!(is_quit(b"Q\r\n"));
        assert!(is_quit(b"q"));
        assert!(!is_quit(b"quit\n"));
        assert!(!is_quit(b" q\n"));
        assert!(!is_quit(b"\n"));
    }

    /// Hands out one scripted read result per call, as a terminal hands out one line.
    struct Reads(std::collections::VecDeque<&'static [u8]>);

    impl Read for Reads {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let next = self.0.pop_front().expect("read after the input ended");
            buf[..next.len()].copy_from_slice(next);
            Ok(next.len())
        }
    }

    fn lines_until_end(reads: &[&'static [u8]]) -> Vec<Vec<u8>> {
        let mut input = io::BufReader::new(TerminalInput::with_line_ends(
            Reads(reads.iter().copied().collect()),
            vec![b'\n'],
        ));
        let mut got = Vec::new();
        loop {
            let available = fill(&mut input).unwrap().to_vec();
            if available.is_empty() {
                return got;
            }
            input.consume(available.len());
            got.push(available);
        }
    }

    #[test]
    fn ctrl_d_at_the_start_of_a_line_ends_input_without_another_read() {
        // `Reads` panics if asked again after the empty read.
        assert_eq!(lines_until_end(&[b"one\n", b""]), [b"one\n".to_vec()]);
    }

    #[test]
    fn ctrl_d_after_a_partial_line_ends_input_after_sending_it() {
        assert_eq!(
            lines_until_end(&[b"one\n", b"two"]),
            [b"one\n".to_vec(), b"two".to_vec()]
        );
    }

    #[test]
    fn fill_asks_a_plain_reader_once_at_end_of_input() {
        // Without the terminal wrapper too: one empty read is the end.
        let mut input = io::BufReader::new(Reads([&b"x\n"[..], b""].into_iter().collect()));
        assert_eq!(fill(&mut input).unwrap(), b"x\n");
        input.consume(2);
        assert!(fill(&mut input).unwrap().is_empty());
    }
}
