//! The one shutdown signal every model obeys.
//!
//! `Shutdown::on_signals` turns SIGINT and SIGTERM into a flag plus a readable descriptor, in
//! the style of mini-redis's `Shutdown`, but usable from blocking, event-loop, async and
//! io_uring code alike: blocking code checks [`Shutdown::is_triggered`], event loops watch
//! [`Shutdown::as_fd`], which stays readable once triggered. Installing the handlers starts no
//! thread, so fork-based models can still fork safely afterwards. A second SIGINT while
//! draining exits at once with status 130, as users of servers expect from a second Ctrl-C.
//!
//! The listeners stop listening the moment shutdown starts, in every model: the trigger (the
//! signal handler itself, or [`Shutdown::trigger`]) calls `shutdown(2)` on them, which is
//! async-signal-safe and acts on the socket, so every duplicate in every worker and process
//! stops too. New clients are refused (ECONNREFUSED) and clients still in the backlog are reset,
//! instead of completing a handshake into a backlog that nobody will accept from.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::wake::{poll_readable, Wake};

/// A cloneable handle on the server's shutdown state.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    flag: Arc<AtomicBool>,
    wake: Wake,
    /// Duplicates of the listeners to shut down at the trigger (set once, before serving).
    listeners: Arc<OnceLock<Box<[OwnedFd]>>>,
}

impl Shutdown {
    /// A shutdown that only [`Shutdown::trigger`] sets (for tests and embedding).
    pub fn new() -> io::Result<Self> {
        Ok(Shutdown {
            inner: Arc::new(Inner {
                flag: Arc::new(AtomicBool::new(false)),
                wake: Wake::new()?,
                listeners: Arc::new(OnceLock::new()),
            }),
        })
    }

    /// A shutdown triggered by SIGINT or SIGTERM (or [`Shutdown::trigger`]).
    pub fn on_signals() -> io::Result<Self> {
        let shutdown = Self::new()?;
        for signal in [SIGINT, SIGTERM] {
            if signal == SIGINT {
                // Registered first so it sees the flag as it was before this signal.
                signal_hook::flag::register_conditional_shutdown(
                    signal,
                    130,
                    Arc::clone(&shutdown.inner.flag),
                )?;
            }
            signal_hook::flag::register(signal, Arc::clone(&shutdown.inner.flag))?;
            let listeners = Arc::clone(&shutdown.inner.listeners);
            // SAFETY: the action only reads a set-once slice (an atomic load and plain reads)
            // and calls shutdown(2), which is async-signal-safe; it allocates nothing.
            unsafe {
                signal_hook::low_level::register(signal, move || stop_listening(&listeners))?;
            }
            signal_hook::low_level::pipe::register(signal, shutdown.inner.wake.writer_clone()?)?;
        }
        Ok(shutdown)
    }

    /// Starts the shutdown, as a signal would.
    pub fn trigger(&self) {
        self.inner.flag.store(true, Ordering::SeqCst);
        stop_listening(&self.inner.listeners);
        self.inner.wake.wake();
    }

    /// Makes the trigger stop `listeners` listening (see the module doc). Call once, before
    /// serving; a shutdown that already started stops them at once.
    pub fn stop_listening_on_trigger(&self, listeners: &[TcpListener]) -> io::Result<()> {
        let fds = listeners
            .iter()
            .map(|l| l.as_fd().try_clone_to_owned())
            .collect::<io::Result<Box<[OwnedFd]>>>()?;
        if self.inner.listeners.set(fds).is_err() {
            return Err(io::Error::other("the listeners were already set"));
        }
        if self.is_triggered() {
            stop_listening(&self.inner.listeners);
        }
        Ok(())
    }

    /// The descriptors this shutdown holds for its listeners (a forked child closes them).
    pub fn listener_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.inner
            .listeners
            .get()
            .map(|fds| fds.iter().map(|fd| fd.as_fd()).collect())
            .unwrap_or_default()
    }

    /// Whether shutdown has started.
    pub fn is_triggered(&self) -> bool {
        self.inner.flag.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for shutdown; returns whether it started.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        if self.is_triggered() {
            return true;
        }
        let _ = poll_readable(&[self.as_fd()], Some(timeout));
        self.is_triggered()
    }

    /// Blocks until shutdown starts.
    pub fn wait(&self) {
        while !self.is_triggered() {
            let _ = poll_readable(&[self.as_fd()], None);
        }
    }
}

impl AsFd for Shutdown {
    /// Readable once shutdown has started, and from then on (it is never drained).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.wake.as_fd()
    }
}

/// Stops the listeners listening: `shutdown(2)` on a listening socket closes its backlog and
/// refuses new connections, for every descriptor of it. Async-signal-safe.
fn stop_listening(listeners: &OnceLock<Box<[OwnedFd]>>) {
    if let Some(fds) = listeners.get() {
        for fd in fds.iter() {
            // SAFETY: the descriptor is owned by the slice, which lives as long as the shutdown
            // and its handlers; shutdown(2) does not close it.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RD) };
        }
    }
}

/// The line every model logs when it notices shutdown (operators and tests look for it).
pub fn log_draining(live: usize, timeout: Duration) {
    tracing::info!(
        live,
        timeout = ?timeout,
        "shutting down: stopped accepting, letting live connections finish"
    );
}
