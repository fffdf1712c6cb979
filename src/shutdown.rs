//! The one shutdown signal every model obeys.
//!
//! `Shutdown::on_signals` turns SIGINT and SIGTERM into a flag plus a readable descriptor, in
//! the style of mini-redis's `Shutdown`, but usable from blocking, event-loop, async and
//! io_uring code alike: blocking code checks [`Shutdown::is_triggered`], event loops watch
//! [`Shutdown::as_fd`], which stays readable once triggered. Installing the handlers starts no
//! thread, so fork-based models can still fork safely afterwards. A second SIGINT while
//! draining exits at once with status 130, as users of servers expect from a second Ctrl-C.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
}

impl Shutdown {
    /// A shutdown that only [`Shutdown::trigger`] sets (for tests and embedding).
    pub fn new() -> io::Result<Self> {
        Ok(Shutdown {
            inner: Arc::new(Inner {
                flag: Arc::new(AtomicBool::new(false)),
                wake: Wake::new()?,
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
            signal_hook::low_level::pipe::register(signal, shutdown.inner.wake.writer_clone()?)?;
        }
        Ok(shutdown)
    }

    /// Starts the shutdown, as a signal would.
    pub fn trigger(&self) {
        self.inner.flag.store(true, Ordering::SeqCst);
        self.inner.wake.wake();
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

/// The line every model logs when it notices shutdown (operators and tests look for it).
pub fn log_draining(live: usize, timeout: Duration) {
    tracing::info!(
        live,
        timeout = ?timeout,
        "shutting down: stopped accepting, letting live connections finish"
    );
}
