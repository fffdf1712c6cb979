//! The one shutdown signal every model obeys, and what the server does with each signal.
//!
//! | signal | effect |
//! |---|---|
//! | SIGINT, SIGTERM, SIGHUP | drain: stop accepting, let live connections finish for up to `--shutdown-timeout` |
//! | second SIGINT while draining | exit at once with status 130, taking the fork models' children with it |
//! | SIGUSR1 | log one line with the counters; nothing else changes |
//! | SIGUSR2 | ignored |
//!
//! SIGHUP drains because it means the terminal went away. In the fork models the children
//! install none of these handlers (see `server/children.rs`): they ignore SIGINT, SIGHUP,
//! SIGUSR1 and SIGUSR2, which a terminal or `kill -SIG -PGID` delivers to the whole process
//! group, and take SIGTERM from the parent, which decides.
//!
//! `Shutdown::on_signals` turns the drain signals into a flag plus a readable descriptor, in
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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use std::sync::atomic::AtomicPtr;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};

use crate::stats::Stats;
use crate::wake::{poll_readable, Wake};

/// A cloneable handle on the server's shutdown state (and its SIGUSR1 report requests).
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
    /// Set by SIGUSR1, cleared by [`Shutdown::take_report_request`].
    report: Arc<AtomicBool>,
    /// Readable after SIGUSR1, until [`Shutdown::take_report_request`].
    report_wake: Wake,
}

impl Shutdown {
    /// A shutdown that only [`Shutdown::trigger`] sets (for tests and embedding).
    pub fn new() -> io::Result<Self> {
        Ok(Shutdown {
            inner: Arc::new(Inner {
                flag: Arc::new(AtomicBool::new(false)),
                wake: Wake::new()?,
                listeners: Arc::new(OnceLock::new()),
                report: Arc::new(AtomicBool::new(false)),
                report_wake: Wake::new()?,
            }),
        })
    }

    /// A shutdown triggered by SIGINT, SIGTERM or SIGHUP (or [`Shutdown::trigger`]), with
    /// SIGUSR1 requesting a report and SIGUSR2 ignored (see the module doc). Starts no thread.
    pub fn on_signals() -> io::Result<Self> {
        let shutdown = Self::new()?;
        let forced = ForcedExit::map()?;
        for signal in [SIGINT, SIGTERM, SIGHUP] {
            if signal == SIGINT {
                // Registered first so it sees the flag as it was before this signal.
                let draining = Arc::clone(&shutdown.inner.flag);
                // SAFETY: the action reads an atomic, writes one in shared memory and calls
                // _exit(2): all async-signal-safe, nothing allocated or locked.
                unsafe {
                    signal_hook::low_level::register(signal, move || {
                        if draining.load(Ordering::SeqCst) {
                            forced.exit(130);
                        }
                    })?;
                }
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
        signal_hook::flag::register(SIGUSR1, Arc::clone(&shutdown.inner.report))?;
        signal_hook::low_level::pipe::register(
            SIGUSR1,
            shutdown.inner.report_wake.writer_clone()?,
        )?;
        ignore(SIGUSR2)?;
        Ok(shutdown)
    }

    /// Readable after SIGUSR1, until [`Shutdown::take_report_request`] consumes it.
    pub fn report_fd(&self) -> BorrowedFd<'_> {
        self.inner.report_wake.as_fd()
    }

    /// Whether SIGUSR1 asked for a report since the last call (signals coalesce: several
    /// SIGUSR1 in a row may give one report).
    pub fn take_report_request(&self) -> bool {
        self.inner.report_wake.drain();
        self.inner.report.swap(false, Ordering::SeqCst)
    }

    /// Starts a thread that logs [`log_report`] for each SIGUSR1, for the models that may run
    /// threads (never the fork models' parents: they call [`Shutdown::take_report_request`]
    /// from their own loop). It ends with the process.
    pub fn report_on_request(&self, stats: Arc<Stats>) -> io::Result<()> {
        let shutdown = self.clone();
        std::thread::Builder::new()
            .name("report".into())
            .spawn(move || loop {
                let _ = poll_readable(&[shutdown.report_fd()], None);
                if shutdown.take_report_request() {
                    log_report(&stats, None);
                }
            })
            .map(drop)
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
            // rustix makes the system call itself: no allocation, and errno is left alone.
            let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Read);
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

/// The one line SIGUSR1 logs: the counters of this process and, in a fork model's parent, how
/// many children it has. A fork model's parent counts the connections it accepted and refused;
/// their bytes are counted in the children, which log a line each when a connection ends.
pub fn log_report(stats: &Stats, children: Option<usize>) {
    let refused: u64 = crate::server::conn::admission::Refusal::ALL
        .iter()
        .map(|&reason| stats.refused(reason))
        .sum();
    let accepted = stats.accepted();
    let closed = stats.closed();
    match children {
        None => tracing::info!(
            accepted,
            live = accepted.saturating_sub(closed),
            closed,
            bytes = stats.bytes(),
            refused,
            "status (SIGUSR1)"
        ),
        Some(children) => tracing::info!(
            accepted,
            refused,
            children,
            "status (SIGUSR1); bytes are counted by the children"
        ),
    }
}

/// Sets `signal` to be ignored (a disposition, not a handler: nothing runs).
fn ignore(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler code.
    let previous = unsafe { libc::signal(signal, libc::SIG_IGN) };
    if previous == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where the forced exit (a second SIGINT) leaves word for the fork models' children: one
/// flag in an anonymous shared mapping made before any fork, so a child whose parent died can
/// tell a forced exit (close its connection at once) from any other death (drain).
static FORCED_EXIT: AtomicPtr<AtomicBool> = AtomicPtr::new(std::ptr::null_mut());

/// A handle on the [`FORCED_EXIT`] flag.
#[derive(Clone, Copy, Debug)]
struct ForcedExit(&'static AtomicBool);

impl ForcedExit {
    /// The flag, mapped on first use (the mapping lives as long as the process).
    fn map() -> io::Result<Self> {
        let existing = FORCED_EXIT.load(Ordering::SeqCst);
        if !existing.is_null() {
            // SAFETY: a non-null pointer was stored below from a live, never-unmapped mapping.
            return Ok(ForcedExit(unsafe { &*existing }));
        }
        let size = std::mem::size_of::<AtomicBool>();
        let mapped = crate::server::conn::shared_mem::map_shared_zeroed(size)?;
        let flag = mapped.as_ptr().cast::<AtomicBool>();
        match FORCED_EXIT.compare_exchange(
            std::ptr::null_mut(),
            flag,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            // SAFETY: the mapping is page-aligned, zero-filled (false) and never unmapped.
            Ok(_) => Ok(ForcedExit(unsafe { &*flag })),
            Err(winner) => {
                // SAFETY: our own mapping, unused; the winner's lives on.
                unsafe { libc::munmap(mapped.as_ptr().cast(), size) };
                // SAFETY: as for `existing` above.
                Ok(ForcedExit(unsafe { &*winner }))
            }
        }
    }

    /// Marks the exit as forced and exits with `status` at once. Async-signal-safe.
    fn exit(self, status: i32) -> ! {
        self.0.store(true, Ordering::SeqCst);
        signal_hook::low_level::exit(status)
    }
}

/// Whether this process's parent (or this process) left through the forced exit of a second
/// SIGINT. Async-signal-safe, so a child's SIGTERM handler may ask.
pub(crate) fn forced_exit_started() -> bool {
    let flag = FORCED_EXIT.load(Ordering::SeqCst);
    // SAFETY: non-null only once it points into a live, never-unmapped mapping.
    !flag.is_null() && unsafe { &*flag }.load(Ordering::SeqCst)
}
