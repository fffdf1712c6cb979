//! The registry of live connections of the blocking models (iterative, thread, pool, and
//! prefork's workers), on top of the one connection limit ([`crate::server::conn::limit`]).
//!
//! The registry remembers each live socket so that, at the shutdown deadline, the server can
//! shut them down, which wakes threads blocked in `read()`.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use slab::Slab;

use crate::server::conn::limit::{Limit, Permit};
use crate::server::conn::Lifecycle;

/// Live connections of one server process, with a limit on how many there may be.
#[derive(Clone, Debug)]
pub struct Connections {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: Arc<Limit>,
    live: Mutex<Slab<RawFd>>,
    changed: Condvar,
}

impl Connections {
    /// A registry that admits at most `max` connections at once.
    pub fn new(max: usize) -> io::Result<Self> {
        Ok(Connections {
            inner: Arc::new(Inner {
                limit: Limit::new(max)?,
                live: Mutex::new(Slab::new()),
                changed: Condvar::new(),
            }),
        })
    }

    /// How many connections are live (for the draining log line).
    fn len(&self) -> usize {
        self.lock().len()
    }

    /// A slot under the limit, to take before accepting; `None` while full.
    pub fn try_reserve(&self) -> Option<Permit> {
        self.inner.limit.try_acquire()
    }

    /// A descriptor that becomes readable when a full server frees a slot; call
    /// [`Connections::clear_room_signal`] before trying [`Connections::try_reserve`] again.
    pub fn room_fd(&self) -> BorrowedFd<'_> {
        self.inner.limit.room_fd()
    }

    /// Consumes the room signal.
    pub fn clear_room_signal(&self) {
        self.inner.limit.clear_room_signal();
    }

    /// Registers a live connection in the slot `permit` reserved; it counts until the returned
    /// [`Tracked`] is dropped.
    pub fn track(&self, stream: TcpStream, permit: Permit) -> Tracked {
        let key = self.lock().insert(stream.as_raw_fd());
        Tracked {
            _guard: ConnectionGuard {
                connections: self.clone(),
                key,
                _permit: permit,
            },
            stream,
        }
    }

    /// Waits until no connection is live or `timeout` passes; returns whether none is live.
    pub fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut live = self.lock();
        while !live.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            live = match self.inner.changed.wait_timeout(live, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// Shuts every live connection down in both directions, which makes blocked reads and
    /// writes on them return, so their owners close them.
    pub fn close_all(&self) -> usize {
        let live = self.lock();
        for (_, &fd) in live.iter() {
            // The descriptor is open: a connection's guard removes it from the registry, under
            // this lock, before the connection's socket is closed.
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
        }
        live.len()
    }

    /// The graceful end of a blocking model: let live connections finish for up to
    /// `timeout`, then close the rest and wait briefly for their owners to notice.
    /// Returns how many connections had to be closed.
    pub fn drain(&self, timeout: Duration, lifecycle: &Lifecycle) -> usize {
        lifecycle.log_draining(self.len(), timeout);
        if self.wait_empty(timeout) {
            return 0;
        }
        lifecycle.mark_deadline_passed();
        let closed = self.close_all();
        lifecycle.log_deadline(closed);
        self.wait_empty(Duration::from_secs(2));
        closed
    }

    /// Starts a thread that, once shutdown begins, gives live connections `timeout` to finish
    /// and then closes them. For models whose own thread is busy serving (iterative).
    pub fn close_at_deadline(
        &self,
        shutdown: &crate::shutdown::Shutdown,
        timeout: Duration,
        lifecycle: &Arc<Lifecycle>,
    ) -> std::thread::JoinHandle<()> {
        let connections = self.clone();
        let shutdown = shutdown.clone();
        let lifecycle = Arc::clone(lifecycle);
        std::thread::spawn(move || {
            shutdown.wait();
            connections.drain(timeout, &lifecycle);
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slab<RawFd>> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A live connection's socket together with its place in [`Connections`]. Fields drop in
/// declaration order, so the place is freed before the socket is closed and the registry
/// never holds a descriptor number that was reused.
#[derive(Debug)]
pub struct Tracked {
    _guard: ConnectionGuard,
    stream: TcpStream,
}

impl std::ops::Deref for Tracked {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

impl std::ops::DerefMut for Tracked {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

#[derive(Debug)]
struct ConnectionGuard {
    connections: Connections,
    key: usize,
    /// Freed after the registry entry (fields drop in order), which wakes a full acceptor.
    _permit: Permit,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut live = self.connections.lock();
        live.remove(self.key);
        drop(live);
        self.connections.inner.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn limit_and_registry() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let b = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let conns = Connections::new(2).unwrap();
        let ga = conns.track(a, conns.try_reserve().unwrap());
        let gb = conns.track(b, conns.try_reserve().unwrap());
        assert!(conns.try_reserve().is_none(), "the limit holds");
        assert!(!conns.wait_empty(Duration::from_millis(10)));
        drop(ga);
        assert!(
            conns.try_reserve().is_some(),
            "a closed connection frees its slot"
        );
        assert_eq!(conns.close_all(), 1);
        drop(gb);
        assert!(conns.wait_empty(Duration::ZERO));
    }
}
