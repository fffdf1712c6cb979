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
//! Both end the same way. At end of input (a last line without a newline is still sent), or
//! on a line `q`/`Q` typed at a terminal in the split client, the client half-closes the
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

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Context};

/// The most bytes of one line the line client sends before reading their echo back: well
/// under what the two ends' socket buffers hold, so neither side blocks writing for good.
pub const MAX_IN_FLIGHT: usize = 64 * 1024;

/// `multiecho client`.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// Server address: HOST:PORT, [V6]:PORT or PORT (loopback).
    #[arg(value_parser = crate::cli::parse_addr, default_value = crate::net::DEFAULT_LISTEN)]
    pub addr: SocketAddr,
    /// Send and receive at the same time (the seeds' echo_mpclient): lines go out without
    /// waiting for their echo. At a terminal, a line `q` or `Q` ends the input.
    #[arg(long)]
    pub split: bool,
    /// Give up connecting after this long, e.g. 5s (default: the system's own timeout).
    #[arg(long, value_name = "DURATION", value_parser = crate::cli::parse_duration)]
    pub timeout: Option<Duration>,
}

/// Runs the client: connects, then runs the line or the split client over stdin and stdout.
///
/// Errors from stdout are returned as plain `io::Error` (so the caller can treat a broken
/// pipe as a normal end); errors on the connection are described, never bare.
pub fn run(args: &ClientArgs) -> anyhow::Result<()> {
    let stream = connect(args.addr, args.timeout)?;
    let interactive = io::stdin().is_terminal();
    if interactive {
        let how_to_end = if args.split {
            "type q or Ctrl-D to finish"
        } else {
            "press Ctrl-D to finish"
        };
        eprintln!("multiecho: connected to {}; {how_to_end}", args.addr);
    }
    if args.split {
        // The sender thread needs an owned reader (a stdin lock cannot move threads).
        let input = io::BufReader::new(io::stdin());
        split_client(stream, args.addr, input, io::stdout(), interactive)
    } else {
        line_client(stream, args.addr, io::stdin().lock(), io::stdout().lock())
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
    mut stream: TcpStream,
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
                let _ = socket2::SockRef::from(&stream).set_quickack(true);
            }
        }
        output.flush()?;
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| connection_error(addr, "cannot half-close the connection to", e))?;
    copy_until_closed(&mut stream, addr, &mut output, &mut buf)?;
    Ok(())
}

/// Prints everything the server sends until it closes; returns the byte count.
fn copy_until_closed(
    stream: &mut TcpStream,
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
            Err(e) => return Err(connection_error(addr, "cannot receive from", e)),
        }
    }
}

/// The split client: one thread sends stdin, this one prints what comes back, concurrently.
/// End of input (or `q`/`Q` when `end_on_q`) half-closes; the client ends when the server
/// closes, and checks that every byte sent came back. A server that closes while input is
/// still coming is an error, and the client does not wait for the sender (which may be
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
    let sender = {
        let input_ended = Arc::clone(&input_ended);
        thread::Builder::new()
            .name("sender".into())
            .spawn(move || send_lines(writer, addr, input, end_on_q, &input_ended))
            .context("cannot start the sender thread")?
    };

    let mut reader = stream;
    let mut buf = vec![0u8; MAX_IN_FLIGHT];
    let received = copy_until_closed(&mut reader, addr, &mut output, &mut buf)?;

    if !input_ended.load(Ordering::Acquire) {
        // The server closed while input was still coming: the sender may be blocked on a
        // terminal forever, so do not wait for it (the process exits without it).
        anyhow::bail!("{addr} closed the connection before the input ended");
    }
    let sent = sender
        .join()
        .map_err(|_| anyhow!("the sender thread panicked"))??;
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
fn is_quit(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line == b"q" || line == b"Q"
}

/// The next buffered bytes of standard input (empty at its end), retrying interrupted reads.
fn fill(input: &mut impl BufRead) -> anyhow::Result<&[u8]> {
    loop {
        match input.fill_buf() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot read standard input"),
            // Borrowing the buffer across loop turns is not allowed; asking again returns
            // what is already buffered, without another read.
            Ok(_) => break,
        }
    }
    input.fill_buf().context("cannot read standard input")
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
}
