//! `process`: a child process per connection, as in the seeds' 7_server and echo_mpserv,
//! without their defects.
//!
//! How it works: the single-threaded parent accepts; for each connection it forks a child
//! that serves it with the shared blocking echo loop and exits. The parent closes its copy of
//! the socket; the child closes the listeners and the parent's wake-up descriptors. SIGCHLD
//! wakes the accept loop, and on every wake-up the parent reaps *all* exited children
//! (`waitpid(-1, WNOHANG)` until none), since signals coalesce: no zombie survives.
//!
//! Cost: a `fork()` per connection (copying page tables, then copy-on-write faults) and a
//! process per live connection for the kernel to schedule. Separate address spaces make it
//! robust: a crash loses one connection. The parent's counters only see accepted connections;
//! bytes are counted in the children (each logs its own line).
//!
//! Admission: the parent decides before it forks, so a refused plain connection costs an
//! `accept` and a `close`, no process. On a `tcp+proxy://` listener the client's address is in
//! the PROXY header, which the child reads (the parent never blocks on a client): there a
//! refusal costs a fork. Per-source counts live in memory shared before the first fork; the
//! parent gives a child's slot back when it reaps it, however the child ended.
//!
//! Limits: `--max-conns` caps live children; while full the parent does not accept, so
//! clients wait in the backlog. If `fork()` fails the connection is closed, the parent backs
//! off briefly and keeps serving.
//!
//! Shutdown: the parent stops accepting and forwards SIGTERM to its children. A child ignores
//! SIGINT (Ctrl-C reaches the whole process group; the parent decides); on SIGTERM it arms a
//! timer for `--shutdown-timeout`, lets its client finish meanwhile, and when the timer fires
//! shuts its socket down, which ends the echo loop (one log line) and the child. The parent
//! reaps them, SIGKILLs any still running a second after the deadline, and exits 0. A child
//! whose parent dies, however it dies, gets SIGTERM (`PR_SET_PDEATHSIG`) and so ends within its
//! own deadline, or at once after the forced exit of a second Ctrl-C; its own SIGKILL timer
//! backs that up, since a dead parent sends none (`children.rs`). SIGUSR1 makes the parent log
//! a status line; children ignore SIGHUP, SIGUSR1 and SIGUSR2 (`shutdown.rs`).

use std::collections::HashMap;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

use nix::unistd::Pid;

use crate::server::accept::{Accepted, Acceptor, Screened};
use crate::server::children::{self, log_exit, Children};
use crate::server::conn::limit::{Limit, Permit};
use crate::server::conn::sources::Slot;
use crate::server::{echo, Server};

/// Runs the process-per-connection model.
pub fn serve(server: &Server) -> crate::Result<()> {
    let config = &server.config;
    let mut children =
        Children::new().map_err(|e| crate::Error::io("cannot watch for exiting children", e))?;
    let mut acceptor =
        Acceptor::new(server).map_err(|e| crate::Error::io("cannot prepare the listeners", e))?;
    let limit = Limit::new(config.max_conns)
        .map_err(|e| crate::Error::io("cannot create the connection limit", e))?;
    // What each live child holds: its slot under --max-conns and its per-source slot, given
    // back when it is reaped, however it ended.
    let mut held: HashMap<Pid, (Permit, Option<Slot>)> = HashMap::new();
    tracing::info!(
        max_conns = config.max_conns,
        "process model: forking a child process per connection"
    );
    let result = loop {
        let permit = limit.try_acquire();
        match acceptor.next(permit.is_some(), Some(children.exit_fd())) {
            Ok(Accepted::Connection(incoming)) => {
                let Some((stream, mut screened)) = incoming.screen(&server.conn) else {
                    continue;
                };
                let slot = screened.admitted.as_mut().and_then(|a| a.take_slot());
                let permit = permit.expect("accepting only with a slot");
                match fork_connection(server, &mut children, stream, screened) {
                    Some(pid) => {
                        held.insert(pid, (permit, slot));
                    }
                    None => {
                        if let Some(slot) = slot {
                            server.conn.release_slot(slot);
                        }
                    }
                }
            }
            Ok(Accepted::Woken) => {
                if server.shutdown.take_report_request() {
                    crate::shutdown::log_report(&server.stats, Some(children.len()));
                }
                for exit in children.reap() {
                    log_exit(&exit, "connection process");
                    if let Some((_permit, Some(slot))) = held.remove(&exit.pid) {
                        server.conn.release_slot(slot);
                    }
                }
            }
            Ok(Accepted::Shutdown) => break Ok(()),
            Err(e) => break Err(crate::Error::io("accept failed", e)),
        }
    };
    server
        .conn
        .log_draining(children.len(), config.shutdown_timeout);
    let killed = children.stop(config.shutdown_timeout);
    if killed > 0 {
        tracing::warn!(
            killed,
            "killed children that outlived the shutdown deadline"
        );
    }
    result
}

/// Forks a child to serve `stream`. On failure the connection is closed and the parent backs
/// off, so a process table that is full does not turn into a busy loop.
fn fork_connection(
    server: &Server,
    children: &mut Children,
    stream: TcpStream,
    screened: Screened,
) -> Option<Pid> {
    let peer = screened.peer;
    let inherited: Vec<BorrowedFd<'_>> = server
        .listeners
        .iter()
        .map(|listener| listener.as_fd())
        .chain(server.shutdown.listener_fds())
        .chain([server.shutdown.as_fd(), server.shutdown.report_fd()])
        .collect();
    // In the parent the closure is dropped, and the parent's copy of the socket with it.
    let spawned = children.spawn(&inherited, move || serve_in_child(stream, screened, server));
    match spawned {
        Ok(pid) => Some(pid),
        Err(e) => {
            tracing::warn!(%peer, "cannot fork: {e}; closed the connection");
            server.shutdown.wait_timeout(crate::net::ACCEPT_BACKOFF);
            None
        }
    }
}

/// The child: serve the one connection, then exit.
fn serve_in_child(mut stream: TcpStream, screened: Screened, server: &Server) -> i32 {
    let _ = DEADLINE_PASSED.set(server.conn.deadline_flag());
    if let Err(e) = close_after_deadline_on_sigterm(&stream, server.config.shutdown_timeout) {
        // The parent's SIGKILL after the deadline still bounds the shutdown.
        tracing::warn!(peer = %screened.peer, "cannot install the shutdown handlers: {e}");
    }
    echo::serve_connection(
        &mut stream,
        screened,
        &server.config,
        &server.conn,
        server.tls.as_deref(),
    );
    0
}

// What the child's signal handlers need, set before they are installed. Atomics (lock-free)
// are safe to read in a signal handler.
static CONNECTION_FD: AtomicI32 = AtomicI32::new(-1);
static DRAIN_MICROS: AtomicU64 = AtomicU64::new(0);
static DRAINING: AtomicBool = AtomicBool::new(false);
/// The child's [`Lifecycle`](crate::server::conn::Lifecycle) deadline flag, so that the
/// connection's close line says the server closed it.
static DEADLINE_PASSED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// In the child: SIGTERM arms a one-shot timer of `timeout` (SIGALRM), whose handler shuts the
/// connection down. Then SIGTERM (blocked since the fork) is unblocked.
fn close_after_deadline_on_sigterm(stream: &TcpStream, timeout: Duration) -> nix::Result<()> {
    CONNECTION_FD.store(stream.as_raw_fd(), Ordering::SeqCst);
    DRAIN_MICROS.store(
        u64::try_from(timeout.as_micros()).unwrap_or(u64::MAX),
        Ordering::SeqCst,
    );
    let restart = SaFlags::SA_RESTART;
    let close = SigAction::new(
        SigHandler::Handler(close_connection),
        restart,
        SigSet::empty(),
    );
    let drain = SigAction::new(SigHandler::Handler(start_drain), restart, SigSet::empty());
    // SAFETY: both handlers only touch lock-free atomics, errno and async-signal-safe system
    // calls (setitimer, as alarm(2) is in libc; shutdown). They replace, in this child only,
    // the parent's handlers (which would write to the parent's shutdown socket).
    unsafe {
        signal::sigaction(Signal::SIGALRM, &close)?;
        signal::sigaction(Signal::SIGTERM, &drain)?;
    }
    SigSet::from(Signal::SIGTERM).thread_unblock()
}

/// SIGTERM in a child: the connection may go on until the deadline (the first SIGTERM counts;
/// none after the forced exit), and the child's SIGKILL backstop is armed.
extern "C" fn start_drain(_: libc::c_int) {
    if DRAINING.swap(true, Ordering::SeqCst) {
        // A later SIGTERM (the parent's death signal after its forced exit) cuts it short.
        if children::drain_time(Duration::MAX).is_zero() {
            children::arm_backstop(Duration::ZERO);
            close_connection(0);
        }
        return;
    }
    let saved = Errno::last_raw();
    let allowed = Duration::from_micros(DRAIN_MICROS.load(Ordering::SeqCst));
    let micros = children::drain_time(allowed).as_micros() as u64;
    children::arm_backstop(Duration::from_micros(micros));
    if micros == 0 {
        close_connection(0);
    } else {
        let seconds = (micros / 1_000_000).min(libc::time_t::MAX as u64) as libc::time_t;
        let timer = libc::itimerval {
            it_interval: libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            it_value: libc::timeval {
                tv_sec: seconds,
                tv_usec: (micros % 1_000_000) as libc::suseconds_t,
            },
        };
        // SAFETY: `timer` is a valid itimerval; the old value is not asked for.
        unsafe { libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()) };
    }
    Errno::set_raw(saved);
}

/// The deadline in a child: shutting the socket down makes the blocked read return (or the
/// blocked write fail), so the echo loop ends, logs its line, and the child exits.
extern "C" fn close_connection(_: libc::c_int) {
    let saved = Errno::last_raw();
    let fd = CONNECTION_FD.load(Ordering::SeqCst);
    if let Some(flag) = DEADLINE_PASSED.get() {
        flag.store(true, Ordering::SeqCst);
    }
    if fd >= 0 {
        // The connection's descriptor stays open for the child's whole life (the child exits
        // right after the echo loop); shutdown(2) does not close it.
        let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
    }
    Errno::set_raw(saved);
}
