//! A level-triggered wake-up descriptor: once woken it stays readable until drained, so any
//! number of `poll`/`epoll`/`io_uring` waiters can watch it. Built on a Unix socket pair so
//! that it needs no unsafe code and can be handed to signal handlers (signal-hook writes a
//! byte to it from the handler, which is async-signal-safe).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

#[derive(Debug)]
pub(crate) struct Wake {
    reader: UnixStream,
    writer: UnixStream,
}

impl Wake {
    pub(crate) fn new() -> io::Result<Self> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        Ok(Wake { reader, writer })
    }

    /// Makes the descriptor readable. A full buffer means it is readable already.
    pub(crate) fn wake(&self) {
        let _ = (&self.writer).write(&[1]);
    }

    /// Consumes pending wake-ups, so the descriptor blocks again.
    pub(crate) fn drain(&self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = (&self.reader).read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }

    /// A second handle on the writing end, for signal handlers.
    pub(crate) fn writer_clone(&self) -> io::Result<UnixStream> {
        self.writer.try_clone()
    }
}

impl AsFd for Wake {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.reader.as_fd()
    }
}

/// Waits until one of `fds` is readable or `timeout` passes (`None`: no limit). Returns which
/// were readable (or in error/hang-up, which a reader must also handle). EINTR counts as a
/// wake-up with nothing ready, so callers re-check their state.
pub(crate) fn poll_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<std::time::Duration>,
) -> io::Result<Vec<bool>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut pollfds: Vec<PollFd> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(d) => {
            let ms = d.as_millis().min(i32::MAX as u128) as i32;
            // Round up so a sub-millisecond wait does not become a busy loop.
            let ms = if ms == 0 && !d.is_zero() { 1 } else { ms };
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    };
    match poll(&mut pollfds, timeout) {
        Ok(_) => Ok(pollfds
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect()),
        Err(nix::errno::Errno::EINTR) => Ok(vec![false; fds.len()]),
        Err(e) => Err(e.into()),
    }
}
