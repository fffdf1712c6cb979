//! The accept loop of the blocking models: wait on every listener and on the shutdown signal
//! at once (`poll`), take a slot under the connection limit before accepting, and apply the
//! lifecycle's accept-error rules (retry on aborted connections, back off on descriptor
//! exhaustion, never spin).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};

use crate::limits::Connections;
use crate::listen::ListenerKind;
use crate::net::{AcceptError, ACCEPT_BACKOFF};
use crate::server::conn::limit::Permit;
use crate::server::conn::{Admitted, Lifecycle};
use crate::server::Server;
use crate::shutdown::Shutdown;
use crate::wake::poll_readable;

/// A freshly accepted stream (blocking mode, socket options set), not yet admitted.
#[derive(Debug)]
pub struct Incoming {
    pub stream: TcpStream,
    /// The TCP peer (on a PROXY listener, the proxy).
    pub peer: SocketAddr,
    /// What the listener it came from expects.
    pub kind: ListenerKind,
    /// The index of that listener.
    pub listener: usize,
}

/// A connection that passed the lifecycle's first decision: a plain one is admitted; a PROXY
/// one comes from a trusted proxy and is admitted once its header names the client.
#[derive(Debug)]
pub struct Screened {
    pub peer: SocketAddr,
    pub kind: ListenerKind,
    pub listener: usize,
    pub admitted: Option<Admitted>,
}

impl Incoming {
    /// The decision a blocking model takes before it spends a thread, a process or a queue
    /// slot on the connection; `None` means refused (counted and logged): the stream is
    /// dropped, which closes it without an echo.
    pub fn screen(self, lifecycle: &Lifecycle) -> Option<(TcpStream, Screened)> {
        let admitted = if self.kind.expects_proxy_header() {
            lifecycle.check_proxy_peer(self.peer).ok()?;
            None
        } else {
            Some(lifecycle.admit(self.listener, self.peer).ok()?)
        };
        Some((
            self.stream,
            Screened {
                peer: self.peer,
                kind: self.kind,
                listener: self.listener,
                admitted,
            },
        ))
    }
}

/// What [`Acceptor::next`] saw.
#[derive(Debug)]
pub enum Accepted {
    /// A new connection.
    Connection(Incoming),
    /// The extra descriptor the caller watches became readable.
    Woken,
    /// Shutdown has started: stop accepting.
    Shutdown,
}

/// Accepts from several listeners, watching the shutdown signal.
#[derive(Debug)]
pub struct Acceptor<'a> {
    listeners: &'a [TcpListener],
    kinds: &'a [ListenerKind],
    /// Listeners that stopped listening (EINVAL); never polled again.
    closed: Vec<bool>,
    shutdown: &'a Shutdown,
    lifecycle: &'a Lifecycle,
    next_listener: usize,
}

impl<'a> Acceptor<'a> {
    /// Puts the server's listeners in non-blocking mode (so a listener another process or
    /// thread emptied first never blocks this one) and returns an acceptor over them.
    pub fn new(server: &'a Server) -> io::Result<Self> {
        for listener in &server.listeners {
            listener.set_nonblocking(true)?;
        }
        Ok(Acceptor {
            listeners: &server.listeners,
            kinds: &server.kinds,
            closed: vec![false; server.listeners.len()],
            shutdown: &server.shutdown,
            lifecycle: &server.conn,
            next_listener: 0,
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
            let mut polled = Vec::new();
            if accepting {
                for (index, listener) in self.listeners.iter().enumerate() {
                    if !self.closed[index] {
                        fds.push(listener.as_fd());
                        polled.push(index);
                    }
                }
            }
            let ready = poll_readable(&fds, None)?;
            if self.shutdown.is_triggered() {
                return Ok(Accepted::Shutdown);
            }
            if watch.is_some() && ready[1] {
                return Ok(Accepted::Woken);
            }
            if polled.is_empty() {
                continue;
            }
            // Start at a different listener each time so a busy one cannot starve the others.
            let count = polled.len();
            for i in 0..count {
                let slot = (self.next_listener + i) % count;
                if !ready[first_listener + slot] {
                    continue;
                }
                self.next_listener = (slot + 1) % count;
                if let Some(incoming) = self.try_accept(polled[slot])? {
                    return Ok(Accepted::Connection(incoming));
                }
            }
        }
    }

    /// Accepts the next connection in a slot of `connections`; `None` once shutdown starts.
    pub fn accept_within(
        &mut self,
        connections: &Connections,
    ) -> io::Result<Option<(Incoming, Permit)>> {
        loop {
            let Some(permit) = connections.try_reserve() else {
                match self.next(false, Some(connections.room_fd()))? {
                    Accepted::Shutdown => return Ok(None),
                    _ => connections.clear_room_signal(),
                }
                continue;
            };
            match self.next(true, None)? {
                Accepted::Connection(incoming) => return Ok(Some((incoming, permit))),
                Accepted::Woken => {}
                Accepted::Shutdown => return Ok(None),
            }
        }
    }

    fn try_accept(&mut self, index: usize) -> io::Result<Option<Incoming>> {
        match self.listeners[index].accept() {
            Ok((stream, peer)) => {
                // Accepted sockets do not inherit O_NONBLOCK on Linux; make sure anyway.
                stream.set_nonblocking(false)?;
                self.lifecycle.configure(&stream, peer);
                Ok(Some(Incoming {
                    stream,
                    peer,
                    kind: self.kinds[index],
                    listener: index,
                }))
            }
            Err(e) => match self.lifecycle.accept_error(&e) {
                AcceptError::WouldBlock | AcceptError::Retry => Ok(None),
                AcceptError::Exhausted => {
                    self.shutdown.wait_timeout(ACCEPT_BACKOFF);
                    Ok(None)
                }
                AcceptError::Closed => {
                    self.closed[index] = true;
                    Ok(None)
                }
                AcceptError::Fatal => Err(e),
            },
        }
    }
}
