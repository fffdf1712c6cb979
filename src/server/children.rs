//! The child processes of the fork-based models (process, prefork): forking from the
//! single-threaded parent, learning of exits through SIGCHLD, reaping *every* exited child on
//! each wake-up (signals coalesce: one SIGCHLD may stand for many exits, the seeds' defect),
//! and stopping the children at shutdown.
//!
//! No child outlives its parent. Signals around `fork()`: the parent blocks the signals it
//! handles (SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2) across the call, so one arriving before
//! the child has set its own dispositions waits, instead of running the parent's handler in the
//! child (which would write to the parent's descriptors). In the child, SIGINT, SIGHUP, SIGUSR1
//! and SIGUSR2 are ignored (a terminal or `kill -SIG -PGID` reaches the whole process group;
//! the parent decides and tells its children with SIGTERM), SIGCHLD gets its default action,
//! the parent's descriptors the child does not use are closed, and `PR_SET_PDEATHSIG` asks for
//! SIGTERM if the parent dies however it dies (SIGKILL included), so the children of a dead
//! parent drain within their own deadline. What SIGTERM does in a child is the model's choice
//! (it is still blocked when the model's code starts), with three rules every model follows:
//! stop accepting at once ([`release_listeners`]), give the connection at most
//! `--shutdown-timeout`, or nothing when the parent left through the forced exit of a second
//! Ctrl-C ([`drain_time`]), and arm the child's own hard deadline ([`arm_backstop`]): a SIGKILL
//! [`STRAGGLER_GRACE`] after the drain, since a dead parent cannot send it.
//!
//! SIGPIPE stays ignored (Rust's runtime ignores it at start and children inherit that).

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getpid, getppid, ForkResult, Pid};
use signal_hook::consts::SIGCHLD;
use signal_hook::SigId;
use Signal::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};

use crate::wake::poll_readable;

/// How long children still running at their shutdown deadline get before SIGKILL. Their own
/// deadline already closed their connections, so this only catches a stuck child.
pub(crate) const STRAGGLER_GRACE: Duration = Duration::from_secs(1);

/// The live children of this process and a descriptor that wakes up when one exits.
#[derive(Debug)]
pub(crate) struct Children {
    live: HashMap<Pid, Instant>,
    exits: ExitSignal,
}

/// SIGCHLD, turned into a readable socket by signal-hook's async-signal-safe handler. SIGUSR1
/// (a report request, see `shutdown.rs`) writes to the same socket, so the parent, which may
/// start no thread, wakes up for it too.
#[derive(Debug)]
struct ExitSignal {
    reader: UnixStream,
    /// The writing ends, owned by the signal handlers' registrations (children close them).
    writers: [RawFd; 2],
    ids: [SigId; 2],
}

impl Drop for ExitSignal {
    fn drop(&mut self) {
        // Removes the handlers, which closes the writing ends.
        for id in self.ids {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// A child that exited and was reaped.
#[derive(Debug)]
pub(crate) struct Exited {
    pub pid: Pid,
    pub status: WaitStatus,
    /// How long it ran (zero if it was not one of ours).
    pub lived: Duration,
}

impl Exited {
    /// Whether it ended by itself with status 0.
    pub fn is_clean(&self) -> bool {
        matches!(self.status, WaitStatus::Exited(_, 0))
    }

    /// How it ended, in words ("exited with 3", "killed by SIGKILL, core dumped"), for a log
    /// field: logged through `?` it is quoted, so a reader's parser sees one value.
    pub fn describe(&self) -> String {
        match self.status {
            WaitStatus::Exited(_, code) => format!("exited with {code}"),
            WaitStatus::Signaled(_, signal, true) => format!("killed by {signal}, core dumped"),
            WaitStatus::Signaled(_, signal, false) => format!("killed by {signal}"),
            other => format!("{other:?}"),
        }
    }
}

impl Children {
    /// Starts watching SIGCHLD (and SIGUSR1, see [`ExitSignal`]). Starts no thread.
    pub fn new() -> io::Result<Self> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        let for_reports = writer.try_clone()?;
        let writers = [writer.as_raw_fd(), for_reports.as_raw_fd()];
        let exits = signal_hook::low_level::pipe::register(SIGCHLD, writer)?;
        let reports = match signal_hook::low_level::pipe::register(libc::SIGUSR1, for_reports) {
            Ok(id) => id,
            Err(e) => {
                signal_hook::low_level::unregister(exits);
                return Err(e);
            }
        };
        Ok(Children {
            live: HashMap::new(),
            exits: ExitSignal {
                reader,
                writers,
                ids: [exits, reports],
            },
        })
    }

    /// How many children are alive (not yet reaped).
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Readable after a child exited (or SIGUSR1); [`Children::reap`] consumes it.
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        self.exits.reader.as_fd()
    }

    /// Forks a child that closes `inherited` (the parent's descriptors it does not use, on top
    /// of this registry's own), then runs `child` and exits with the status it returns: the
    /// child never comes back into the parent's code. `child` starts with SIGTERM blocked.
    ///
    /// The caller must be single-threaded.
    pub fn spawn(
        &mut self,
        inherited: &[BorrowedFd<'_>],
        child: impl FnOnce() -> i32,
    ) -> io::Result<Pid> {
        let parent = getpid();
        let previous = parent_signals().thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
        // SAFETY: the fork-based models run in a single-threaded parent (no runtime, no
        // logging thread, and Shutdown::on_signals starts none), so no other thread can hold a
        // lock or be midway through an allocation that the child's copy of memory would freeze.
        let forked = unsafe { fork() };
        match forked {
            Ok(ForkResult::Child) => {
                let mut unused: Vec<RawFd> = inherited.iter().map(|fd| fd.as_raw_fd()).collect();
                unused.push(self.exits.reader.as_raw_fd());
                unused.extend(self.exits.writers);
                become_child(parent, &unused);
                // A panic must not unwind into the parent's code path (the accept loop).
                let status = panic::catch_unwind(AssertUnwindSafe(child)).unwrap_or(101);
                std::process::exit(status)
            }
            Ok(ForkResult::Parent { child }) => {
                let _ = previous.thread_set_mask();
                self.live.insert(child, Instant::now());
                Ok(child)
            }
            Err(e) => {
                let _ = previous.thread_set_mask();
                Err(e.into())
            }
        }
    }

    /// Reaps every child that has exited, without blocking. Call it whenever
    /// [`Children::exit_fd`] is readable.
    pub fn reap(&mut self) -> Vec<Exited> {
        // Consume the wake-ups first: an exit after the loop below makes the socket readable
        // again, so none is missed.
        let mut buf = [0u8; 64];
        while matches!((&self.exits.reader).read(&mut buf), Ok(n) if n > 0) {}
        let mut exited = Vec::new();
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    let started = self.live.remove(&pid);
                    exited.push(Exited {
                        pid,
                        status,
                        lived: started.map_or(Duration::ZERO, |s| s.elapsed()),
                    });
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => {
                    // No child is left, whatever the registry thought.
                    self.live.clear();
                    break;
                }
                Err(e) => {
                    tracing::warn!("waitpid failed: {e}");
                    break;
                }
            }
        }
        exited
    }

    /// Reaps children until none is left or `deadline` passes; returns whether none is left.
    /// Exits are logged (abnormal ones as warnings).
    pub fn wait_until(&mut self, deadline: Instant) -> bool {
        loop {
            for exit in self.reap() {
                log_exit(&exit, "child");
            }
            if self.live.is_empty() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let _ = poll_readable(&[self.exit_fd()], Some(deadline - now));
        }
    }

    /// Sends `signal` to every live child.
    pub fn signal_all(&self, signal: Signal) {
        for &pid in self.live.keys() {
            if let Err(e) = signal::kill(pid, signal) {
                if e != Errno::ESRCH {
                    tracing::warn!(%pid, "cannot send {signal}: {e}");
                }
            }
        }
    }

    /// The shutdown of the children: SIGTERM tells each to stop and close its connections
    /// within `timeout` by itself; whoever still runs `timeout` + [`STRAGGLER_GRACE`] later is
    /// killed. Returns once every child is reaped, with how many had to be killed.
    pub fn stop(&mut self, timeout: Duration) -> usize {
        self.signal_all(Signal::SIGTERM);
        if self.wait_until(Instant::now() + timeout + STRAGGLER_GRACE) {
            return 0;
        }
        let stragglers = self.live.len();
        tracing::warn!(
            stragglers,
            "children still running after the deadline; killing them"
        );
        self.signal_all(Signal::SIGKILL);
        let pids: Vec<Pid> = self.live.keys().copied().collect();
        for pid in pids {
            while let Err(Errno::EINTR) = waitpid(pid, None) {}
            self.live.remove(&pid);
        }
        stragglers
    }
}

/// Logs how a child ended: debug when it exited cleanly, a warning otherwise.
pub(crate) fn log_exit(exit: &Exited, what: &str) {
    if exit.is_clean() {
        tracing::debug!(pid = %exit.pid, "{what} exited");
    } else {
        tracing::warn!(pid = %exit.pid, status = ?exit.describe(), "{what} ended abnormally");
    }
}

/// The signals the parent handles, blocked across `fork()`.
fn parent_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2] {
        set.add(signal);
    }
    set
}

/// The child's side of `spawn`: dispositions, descriptors, parent-death signal, backstop timer.
fn become_child(parent: Pid, unused: &[RawFd]) {
    // SAFETY: SIG_IGN and SIG_DFL install no handler code. This replaces signal-hook's
    // handlers in the child only; the parent's are untouched.
    unsafe {
        for ignored in [SIGINT, SIGHUP, SIGUSR1, SIGUSR2] {
            let _ = signal::signal(ignored, SigHandler::SigIgn);
        }
        let _ = signal::signal(Signal::SIGCHLD, SigHandler::SigDfl);
    }
    // Ignored now, so pending ones are discarded; SIGTERM stays blocked for the model.
    let mut ignored = parent_signals();
    ignored.remove(SIGTERM);
    let _ = ignored.thread_unblock();
    for &fd in unused {
        // SAFETY: these descriptors belong to objects of the parent's code path (listeners,
        // wake-up sockets) that the child never uses and never drops: it leaves through
        // `std::process::exit`, which runs no destructors, so nothing closes them twice or
        // touches a reused number.
        unsafe { libc::close(fd) };
    }
    if let Err(e) = create_backstop() {
        tracing::warn!("cannot create the shutdown backstop timer: {e}");
    }
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM) {
        tracing::warn!("cannot set the parent-death signal: {e}");
    }
    if getppid() != parent {
        // The parent died before the line above: act as if the death signal had come.
        let _ = signal::kill(getpid(), Signal::SIGTERM);
    }
}

/// How long a child draining its connection may take: `timeout`, or nothing when its parent
/// left through the forced exit of a second SIGINT. Async-signal-safe.
pub(crate) fn drain_time(timeout: Duration) -> Duration {
    if crate::shutdown::forced_exit_started() {
        Duration::ZERO
    } else {
        timeout
    }
}

/// The child's hard deadline: a POSIX timer that delivers SIGKILL (which nothing can block or
/// handle), created at the fork, armed by [`arm_backstop`].
static BACKSTOP: AtomicPtr<libc::c_void> = AtomicPtr::new(std::ptr::null_mut());
static BACKSTOP_CREATED: AtomicBool = AtomicBool::new(false);

fn create_backstop() -> io::Result<()> {
    // SAFETY: a zeroed sigevent is valid; the fields set make it "deliver SIGKILL".
    let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
    event.sigev_notify = libc::SIGEV_SIGNAL;
    event.sigev_signo = libc::SIGKILL;
    let mut timer: libc::timer_t = std::ptr::null_mut();
    // SAFETY: `event` and `timer` are valid for the call; the timer belongs to this process.
    if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
        return Err(io::Error::last_os_error());
    }
    BACKSTOP.store(timer, Ordering::SeqCst);
    BACKSTOP_CREATED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Arms the child's SIGKILL for `drain` + [`STRAGGLER_GRACE`] from now (a child's shutdown
/// calls it once; later calls move it). Async-signal-safe: timer_settime(2) only.
pub(crate) fn arm_backstop(drain: Duration) {
    if !BACKSTOP_CREATED.load(Ordering::SeqCst) {
        return;
    }
    let after = drain.saturating_add(STRAGGLER_GRACE);
    let value = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: after.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_nsec: after.subsec_nanos() as libc::c_long,
        },
    };
    let saved = Errno::last_raw();
    // SAFETY: the timer was created by `create_backstop` in this process and never deleted;
    // `value` is a valid itimerspec and the old value is not asked for.
    unsafe {
        libc::timer_settime(
            BACKSTOP.load(Ordering::SeqCst),
            0,
            &value,
            std::ptr::null_mut(),
        )
    };
    Errno::set_raw(saved);
}

/// Stops this process accepting on `listeners` at once without closing their descriptors
/// (another thread may be polling them, and a closed number could be reused): each is replaced,
/// with dup2(2), by a fresh socket that never listens, so `accept()` on it fails with EINVAL
/// (the acceptor's "stopped listening"). Once every process has done so the listening socket is
/// gone and its port free, while the other workers of a live parent keep theirs.
pub(crate) fn release_listeners(listeners: &[RawFd]) {
    for &fd in listeners {
        // SAFETY: socket(2) and dup2(2) on descriptors this process owns; dup2 atomically
        // replaces what `fd` refers to and keeps the number valid for its owner, which closes it.
        unsafe {
            let dead = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if dead >= 0 {
                libc::dup2(dead, fd);
                libc::close(dead);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    fn exited(status: WaitStatus) -> Exited {
        Exited {
            pid: Pid::from_raw(42),
            status,
            lived: Duration::ZERO,
        }
    }

    #[test]
    fn an_exit_is_described_in_words_a_log_parser_keeps_as_one_value() {
        let pid = Pid::from_raw(42);
        assert_eq!(
            exited(WaitStatus::Exited(pid, 3)).describe(),
            "exited with 3"
        );
        assert_eq!(
            exited(WaitStatus::Signaled(pid, Signal::SIGKILL, false)).describe(),
            "killed by SIGKILL"
        );
        assert_eq!(
            exited(WaitStatus::Signaled(pid, Signal::SIGSEGV, true)).describe(),
            "killed by SIGSEGV, core dumped"
        );
    }
}
