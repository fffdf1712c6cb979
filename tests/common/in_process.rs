//! An in-process server for the models that do not fork (iterative, thread, pool, epoll,
//! async, uring), as tokio's mini-redis tests start theirs: [`multiecho::server::Server::new`]
//! on a port-0 loopback listener, run by [`Model::serve`] on a thread of the test, stopped
//! with [`Shutdown::trigger`], and watched through its [`Stats`]: typed counters instead of
//! log lines. The fork models never run here (they would fork the multi-threaded test
//! harness); they run as subprocesses ([`super::ServerBuilder`]).

use std::net::SocketAddr;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use multiecho::server::{Model, Server, ServerConfig};
use multiecho::stats::Stats;
use multiecho::Shutdown;

use super::{skip_unless_ci, PATIENCE};

/// A model serving on a thread of the test; shut down (and waited for) on drop.
pub struct InProcess {
    /// The listener's address (127.0.0.1, a free port).
    pub addr: SocketAddr,
    /// The server's counters, live.
    pub stats: Arc<Stats>,
    shutdown: Shutdown,
    /// What `Model::serve` returned, once it has.
    returned: mpsc::Receiver<multiecho::Result<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl InProcess {
    /// Serves `model` with `config` on a new thread, or returns `None` (after
    /// [`skip_unless_ci`] says why) where the model cannot run here (io_uring unavailable).
    /// Panics for a fork model or any other failure to set up.
    pub fn start(model: Model, config: ServerConfig) -> Option<InProcess> {
        assert!(
            !matches!(model, Model::Process | Model::Prefork),
            "{model} forks: run it as a subprocess, never inside the test harness"
        );
        if model == Model::Uring {
            // On a thread of its own: the ring the probe makes and drops leaves the kernel
            // task work for the thread that made it, which makes that thread's socket reads
            // with a timeout (every test client's) fail with EINTR once.
            let probed = thread::spawn(multiecho::server::uring::probe)
                .join()
                .expect("the io_uring probe");
            if let Err(e) = probed {
                skip_unless_ci(&format!("io_uring is not available here: {e}"));
                return None;
            }
        }
        let listener = multiecho::net::bind("127.0.0.1:0".parse().unwrap(), config.backlog)
            .expect("bind a loopback listener");
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new().expect("create a shutdown");
        // As `serve` does: the trigger stops the listener listening at once.
        shutdown
            .stop_listening_on_trigger(std::slice::from_ref(&listener))
            .expect("hand the listener to the shutdown");
        let server = Server::new(vec![listener], config, shutdown.clone()).expect("set up");
        let stats = Arc::clone(&server.stats);
        let (tx, returned) = mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("{model} server"))
            .spawn(move || {
                let _ = tx.send(model.serve(&server));
            })
            .expect("start the server thread");
        Some(InProcess {
            addr,
            stats,
            shutdown,
            returned,
            thread: Some(thread),
        })
    }

    /// Starts the shutdown, as SIGTERM would.
    pub fn trigger(&self) {
        self.shutdown.trigger();
    }

    /// What `Model::serve` returned within `timeout`, or `None` if it is still serving.
    pub fn returned_within(&mut self, timeout: Duration) -> Option<multiecho::Result<()>> {
        let result = match self.returned.recv_timeout(timeout) {
            Ok(result) => Some(result),
            Err(mpsc::RecvTimeoutError::Timeout) => return None,
            // The thread ended without a result: it panicked, and the join says so.
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
        };
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        result
    }

    /// Triggers the shutdown and returns what `Model::serve` returned; panics if it has not
    /// within [`PATIENCE`].
    pub fn stop(mut self) -> multiecho::Result<()> {
        self.trigger();
        self.returned_within(PATIENCE)
            .expect("the server did not return within the patience after the trigger")
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if self.thread.is_some() && !thread::panicking() {
            assert!(
                self.returned_within(PATIENCE).is_some(),
                "the server did not return within the patience after the trigger"
            );
        }
    }
}
