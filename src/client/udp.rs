//! The UDP line client (`multiecho client udp://HOST:PORT`): each input line (with its
//! newline) goes out as one datagram, and its echo is printed. A datagram whose echo does not
//! come back within the timeout is reported on stderr as lost, and the client goes on with the
//! next line; at the end of input it exits non-zero if any were lost. A datagram that arrives
//! but is not the echo of the line just sent (a late echo of a lost one, a stray) is reported
//! and not printed, so stdout carries exactly the echoes of the lines, in order.

use std::io::{self, BufRead, Write};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// The largest datagram over IPv4 (a line must fit in one).
pub const MAX_DATAGRAM: usize = 65_507;
/// How long an echo may take when `--timeout` is not given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends each line of `input` to `addr` as one datagram and prints its echo on `output`.
pub fn line_client(
    addr: SocketAddr,
    timeout: Duration,
    mut input: impl BufRead,
    mut output: impl Write,
) -> anyhow::Result<()> {
    let local: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("valid")
    } else {
        "0.0.0.0:0".parse().expect("valid")
    };
    let socket = UdpSocket::bind(local).context("cannot open a UDP socket")?;
    // Connected: only the server's datagrams are received, and a closed port is reported.
    socket
        .connect(addr)
        .map_err(|e| anyhow!("cannot send to udp://{addr}: {e}"))?;
    let mut line = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut sent, mut lost) = (0u64, 0u64);
    loop {
        line.clear();
        if input
            .read_until(b'\n', &mut line)
            .context("cannot read standard input")?
            == 0
        {
            break;
        }
        if line.len() > MAX_DATAGRAM {
            bail!(
                "line {} is {} bytes, more than one datagram holds ({MAX_DATAGRAM})",
                sent + 1,
                line.len()
            );
        }
        sent += 1;
        socket
            .send(&line)
            .map_err(|e| anyhow!("cannot send to udp://{addr}: {e}"))?;
        if wait_for_echo(&socket, addr, &line, timeout, &mut buf)? {
            output.write_all(&line)?;
            output.flush()?;
        } else {
            lost += 1;
            eprintln!(
                "multiecho: no echo of line {sent} ({} bytes) from udp://{addr} within {timeout:?}: lost",
                line.len()
            );
        }
    }
    if lost > 0 {
        bail!("{lost} of {sent} datagrams were not echoed within {timeout:?}");
    }
    Ok(())
}

/// Waits up to `timeout` for the echo of `sent`; other datagrams are reported and skipped.
fn wait_for_echo(
    socket: &UdpSocket,
    addr: SocketAddr,
    sent: &[u8],
    timeout: Duration,
    buf: &mut [u8],
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        socket
            .set_read_timeout(Some(left))
            .context("cannot set the receive timeout")?;
        match socket.recv(buf) {
            Ok(n) if buf[..n] == *sent => return Ok(true),
            Ok(n) => eprintln!(
                "multiecho: a datagram of {n} bytes from udp://{addr} is not the echo of the line just sent; skipped"
            ),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                bail!("udp://{addr} refused the datagram: nothing listens there")
            }
            Err(e) => bail!("cannot receive from udp://{addr}: {e}"),
        }
    }
}
