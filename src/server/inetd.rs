//! `serve --inetd`: serve exactly one connection, already accepted, on standard input (fd 0),
//! then exit: for inetd and xinetd `nowait` services and systemd `Accept=yes` sockets, which
//! start one process per connection. The connection goes through the same lifecycle as in any
//! model (admission, socket options, its close line and counters) and the blocking echo loop;
//! logs go to stderr, never to the socket.

use std::io::IsTerminal;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::server::conn::Lifecycle;
use crate::server::echo;
use crate::server::ServerConfig;
use crate::stats::Stats;
use crate::Error;

/// Serves the connection on standard input to its end.
pub fn serve(config: &ServerConfig) -> crate::Result<()> {
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
    let mut stream = TcpStream::from(fd);
    let peer = stream
        .peer_addr()
        .map_err(|e| Error::io("--inetd needs a connected TCP socket on standard input", e))?;
    let stats = Stats::new().map_err(|e| Error::io("cannot set up the counters", e))?;
    let lifecycle = Lifecycle::new(&config.admission, Arc::new(stats))
        .map_err(|e| Error::io("cannot set up admission control", e))?;
    lifecycle.configure(&stream, peer);
    // The one connection is listener 0's, in the counters.
    let Ok(admitted) = lifecycle.admit(0, peer) else {
        // Refused (counted and logged): closing the socket is the answer.
        return Ok(());
    };
    if let Some(idle) = config.idle_timeout {
        let set = stream
            .set_read_timeout(Some(idle))
            .and_then(|()| stream.set_write_timeout(Some(idle)));
        if let Err(e) = set {
            tracing::warn!(%peer, "cannot set the idle timeout: {e}");
        }
    }
    let mut buf = vec![0u8; echo::BUFFER_SIZE];
    let (echoed, end) = echo::echo(&mut stream, &mut buf, &lifecycle);
    lifecycle.close(admitted, echoed, &end);
    Ok(())
}
