//! The accept loop of the blocking models: wait on every listener and on the shutdown signal
//! at once (`poll`), honour the connection limit before accepting, and apply the accept-error
//! rules (retry on aborted connections, back off on descriptor exhaustion, never spin).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};

use crate::limits::Connections;
use crate::net::{classify_accept_error, configure_connection, AcceptError, ACCEPT_BACKOFF};
use crate::shutdown::Shutdown;
use crate::wake::poll_readable;

/// What [`Acceptor::next`] saw.
#[derive(Debug)]
pub enum Accepted {
    /// A new connection (blocking mode, TCP_NODELAY set).
    Connection(TcpStream, SocketAddr),
    /// The extra descriptor the caller watches became readable.
    Woken,
    /// Shutdown has started: stop accepting.
    Shutdown,
}

/// Accepts from several listeners, watching the shutdown signal.
#[derive(Debug)]
pub struct Acceptor<'a> {
    listeners: &'a [TcpListener],
    shutdown: &'a Shutdown,
    next_listener: usize,
    exhausted: bool,
}

impl<'a> Acceptor<'a> {
    /// Puts the listeners in non-blocking mode (so a listener another process or thread
    /// emptied first never blocks this one) and returns an acceptor over them.
    pub fn new(listeners: &'a [TcpListener], shutdown: &'a Shutdown) -> io::Result<Self> {
        for listener in listeners {
            listener.set_nonblocking(true)?;
        }
        Ok(Acceptor {
            listeners,
            shutdown,
            next_listener: 0,
            exhausted: false,
        })
    }

    /// Waits for the next event. With `accepting` false only the shutdown signal and `watch`
    /// are waited on (the connections wait in the backlog).
    pub fn next(&mut self, accepting: bool, watch: Option<BorrowedFd<'_>>) -> io::Result<Accepted> {
        loop {
            if self.shutdown.is_triggered() {
                return Ok(Accepted::Shutdown);
            }
            let mut fds = vec![self.shutdown.as_fd()];
            fds.extend(watch);
            let first_listener = fds.len();
            if accepting {
                fds.extend(self.listeners.iter().map(|l| l.as_fd()));
            }
            let ready = poll_readable(&fds, None)?;
            if self.shutdown.is_triggered() {
                return Ok(Accepted::Shutdown);
            }
            if watch.is_some() && ready[1] {
                return Ok(Accepted::Woken);
            }
            if !accepting {
                continue;
            }
            // Start at a different listener each time so a busy one cannot starve the others.
            let count = self.listeners.len();
            for i in 0..count {
                let index = (self.next_listener + i) % count;
                if !ready[first_listener + index] {
                    continue;
                }
                self.next_listener = (index + 1) % count;
                if let Some((stream, peer)) = self.try_accept(&self.listeners[index])? {
                    return Ok(Accepted::Connection(stream, peer));
                }
            }
        }
    }

    /// Accepts the next connection while `connections` has room; `None` once shutdown starts.
    pub fn accept_within(
        &mut self,
        connections: &Connections,
    ) -> io::Result<Option<(TcpStream, SocketAddr)>> {
        loop {
            match self.next(connections.has_room(), Some(connections.room_fd()))? {
                Accepted::Connection(stream, peer) => return Ok(Some((stream, peer))),
                Accepted::Woken => connections.clear_room_signal(),
                Accepted::Shutdown => return Ok(None),
            }
        }
    }

    fn try_accept(
        &mut self,
        listener: &TcpListener,
    ) -> io::Result<Option<(TcpStream, SocketAddr)>> {
        match listener.accept() {
            Ok((stream, peer)) => {
                self.exhausted = false;
                // Accepted sockets do not inherit O_NONBLOCK on Linux; make sure anyway.
                stream.set_nonblocking(false)?;
                if let Err(e) = configure_connection(&stream) {
                    tracing::debug!(%peer, "cannot set socket options: {e}");
                }
                Ok(Some((stream, peer)))
            }
            Err(e) => match classify_accept_error(&e) {
                AcceptError::WouldBlock | AcceptError::Retry => Ok(None),
                AcceptError::Exhausted => {
                    if !self.exhausted {
                        tracing::warn!("accept failed: {e}; backing off and retrying");
                        self.exhausted = true;
                    }
                    self.shutdown.wait_timeout(ACCEPT_BACKOFF);
                    Ok(None)
                }
                AcceptError::Fatal => Err(e),
            },
        }
    }
}
