//! `prefork`: N worker processes forked at start, all accepting on the shared listeners, each
//! serving one connection at a time (Apache's prefork).
//!
//! How it works: the single-threaded parent forks `--workers` processes (never more than
//! `--max-conns`) and then only supervises. Each worker runs the iterative model's loop
//! (`serve_one_at_a_time`) on the inherited listeners; the kernel hands each connection to
//! one of the workers waiting in `poll`/`accept`. A worker that dies (crash, killed) is
//! replaced; if workers keep dying young the replacements are delayed more and more (up to
//! a few seconds), so a crash loop does not spin.
//!
//! Cost: N processes exist all the time, and no fork happens per connection, so it is cheap
//! per connection; but at most N clients are served at once, and the others wait in the
//! backlog. One slow or never-reading client per worker stops everyone, by design (`serve`
//! warns when this model listens on a non-loopback address). The parent's counters do not see
//! the workers' connections (each logs its own line).
//!
//! Admission: each worker decides for the connections it accepts, against per-source counts in
//! memory the parent mapped shared before forking, so the workers count together. A refusal
//! costs an `accept` and a `close` (on a `tcp+proxy://` listener, also the header read), and
//! the worker is free for the next client at once.
//!
//! Shutdown: the parent forwards SIGTERM to every worker (workers ignore SIGINT: Ctrl-C reaches
//! the whole process group, and the parent decides). A worker takes SIGTERM with `sigwait` on
//! a thread of its own, which triggers the worker's shutdown: it stops accepting, lets its
//! current client finish for up to `--shutdown-timeout`, then shuts that socket down and exits.
//! The parent reaps them all, SIGKILLs any still running a second after the deadline, and
//! exits 0. On SIGTERM a worker first releases its copies of the listeners (`children.rs`), so
//! once every worker has, the port is free again even when the parent died without stopping
//! them. A worker whose parent dies, however it dies, gets SIGTERM (`PR_SET_PDEATHSIG`) and
//! shuts down the same way (at once after the forced exit of a second Ctrl-C), with its own
//! SIGKILL timer as the backstop. SIGUSR1 makes the parent log a status line; workers ignore
//! SIGHUP, SIGUSR1 and SIGUSR2 (`shutdown.rs`).
//!
//! UDP: each worker also runs the blocking UDP loop on its inherited `udp://` sockets, on a
//! thread of its own, so N processes share each socket (the kernel hands each datagram to one
//! of them), in batches (`recvmmsg`, `sendmmsg`). Cost: that thread and its batch per worker
//! and socket (64 slots of 64 KiB, touched as far as datagrams fill them), two system calls
//! per batch plus a `poll` per burst, and every worker wakes on a burst. The policy's per-source
//! `--udp-rate` buckets are in the shared table, so the workers count together. At shutdown
//! each worker's UDP loop stops when it gets its SIGTERM.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

use crate::limits::Connections;
use crate::server::children::{self, Children, Exited};
use crate::server::iterative::serve_one_at_a_time;
use crate::server::Server;
use crate::shutdown::Shutdown;
use crate::wake::poll_readable;

/// A worker that dies younger than this counts as a crash loop: its replacement is delayed.
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(1);
/// The first and the longest delay before replacing workers that keep dying young.
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(100);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(5);

/// Runs the prefork model.
pub fn serve(server: &Server) -> crate::Result<()> {
    let config = &server.config;
    let workers = config.workers.min(config.max_conns).max(1);
    let mut children =
        Children::new().map_err(|e| crate::Error::io("cannot watch for exiting workers", e))?;
    tracing::info!(
        workers,
        "prefork model: {workers} worker processes share the listener, each serving one connection at a time"
    );
    let mut restarts = Restarts::default();
    let result = loop {
        if server.shutdown.is_triggered() {
            break Ok(());
        }
        while children.len() < workers && restarts.due() {
            // A worker keeps only the listeners it accepts on (it releases them at its shutdown).
            let inherited: Vec<_> = server
                .shutdown
                .listener_fds()
                .into_iter()
                .chain([server.shutdown.as_fd(), server.shutdown.report_fd()])
                .collect();
            match children.spawn(&inherited, || run_worker(server)) {
                Ok(pid) => tracing::debug!(%pid, "worker started"),
                Err(e) => {
                    tracing::warn!("cannot fork a worker: {e}; retrying");
                    restarts.delay();
                }
            }
        }
        let timeout = (children.len() < workers).then(|| restarts.until_due());
        let ready = match poll_readable(&[server.shutdown.as_fd(), children.exit_fd()], timeout) {
            Ok(ready) => ready,
            Err(e) => break Err(crate::Error::io("cannot wait for workers", e)),
        };
        if ready[1] {
            if server.shutdown.take_report_request() {
                crate::shutdown::log_report(&server.stats, Some(children.len()));
            }
            for exit in children.reap() {
                replace(&exit, &mut restarts, &server.shutdown);
            }
        }
    };
    // Each worker logs its own draining line.
    tracing::info!(workers = children.len(), "stopping the workers");
    let killed = children.stop(config.shutdown_timeout);
    if killed > 0 {
        tracing::warn!(killed, "killed workers that outlived the shutdown deadline");
    }
    result
}

/// Logs a worker's death and schedules its replacement.
fn replace(exit: &Exited, restarts: &mut Restarts, shutdown: &Shutdown) {
    if shutdown.is_triggered() {
        tracing::debug!(pid = %exit.pid, "worker exited during shutdown");
        return;
    }
    tracing::warn!(
        pid = %exit.pid,
        status = ?exit.describe(),
        "worker ended; starting a replacement"
    );
    if exit.lived < CRASH_LOOP_WINDOW {
        restarts.delay();
    } else {
        restarts.reset();
    }
}

/// When the next worker may be forked: at once, unless workers keep dying young.
#[derive(Debug)]
struct Restarts {
    delay: Duration,
    next: Instant,
}

impl Default for Restarts {
    fn default() -> Self {
        Restarts {
            delay: Duration::ZERO,
            next: Instant::now(),
        }
    }
}

impl Restarts {
    fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    fn until_due(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }

    /// Doubles the delay (up to the maximum) and waits that long before the next fork.
    fn delay(&mut self) {
        self.delay = (self.delay * 2).clamp(FIRST_RESTART_DELAY, MAX_RESTART_DELAY);
        self.next = Instant::now() + self.delay;
        tracing::debug!(delay = ?self.delay, "delaying the next worker");
    }

    fn reset(&mut self) {
        self.delay = Duration::ZERO;
        self.next = Instant::now();
    }
}

/// A worker process: its exit status.
fn run_worker(parent: &Server) -> i32 {
    match worker(parent) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("worker failed: {e}");
            1
        }
    }
}

/// Serves one connection at a time on duplicates of the parent's listeners, with a shutdown
/// of its own that SIGTERM triggers.
fn worker(parent: &Server) -> crate::Result<()> {
    let shutdown =
        Shutdown::new().map_err(|e| crate::Error::io("cannot create the shutdown signal", e))?;
    let listeners = parent
        .listeners
        .iter()
        .map(|listener| listener.try_clone())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| crate::Error::io("cannot share the listeners", e))?;
    let udp = parent
        .udp
        .iter()
        .map(|socket| socket.try_clone())
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| crate::Error::io("cannot share the UDP sockets", e))?;
    let connections = Connections::new(1)
        .map_err(|e| crate::Error::io("cannot create the connection registry", e))?;
    // Every descriptor of the listening sockets in this process: the parent's (unused here,
    // never dropped in a child) and this worker's duplicates.
    let listening: Vec<RawFd> = parent
        .listeners
        .iter()
        .chain(&listeners)
        .map(|listener| listener.as_raw_fd())
        .collect();
    // SIGTERM is still blocked from the fork, in this thread and so in every thread it starts;
    // this thread takes it with sigwait (no handler runs), which is fork- and thread-safe.
    let on_signal = shutdown.clone();
    let live = connections.clone();
    let timeout = parent.config.shutdown_timeout;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sigterm = SigSet::from(Signal::SIGTERM);
            while sigterm.wait() != Ok(Signal::SIGTERM) {}
            // Stop accepting at once, even if the parent died without stopping the listeners.
            children::release_listeners(&listening);
            let mut drain = children::drain_time(timeout);
            children::arm_backstop(drain);
            on_signal.trigger();
            // Later SIGTERMs (the parent's death signal after its forced exit) cut it short.
            loop {
                if drain.is_zero() {
                    live.close_all();
                }
                while sigterm.wait() != Ok(Signal::SIGTERM) {}
                if !drain.is_zero() && children::drain_time(timeout).is_zero() {
                    drain = Duration::ZERO;
                    children::arm_backstop(drain);
                }
            }
        })
        .map_err(|e| crate::Error::io("cannot start the signal thread", e))?;
    let server = parent.worker(listeners, shutdown).with_udp(udp);
    let watchdog = connections.close_at_deadline(
        &server.shutdown,
        server.config.shutdown_timeout,
        &server.conn,
    );
    let result = thread::scope(|scope| {
        crate::server::udp::spawn_blocking(scope, 1, &server.udp, &server.conn, &server.shutdown)?;
        let result = serve_one_at_a_time(&server, &connections);
        // On a fatal accept error the watchdog and the UDP loop must still end.
        server.shutdown.trigger();
        result
    });
    server.shutdown.trigger();
    let _ = watchdog.join();
    result
}
