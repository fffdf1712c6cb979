//! The server: [`Model`] names each concurrency model, [`ServerConfig`] holds what every
//! model obeys (backlog, connection limit, idle timeout, shutdown timeout, workers), and
//! [`run`] binds the listeners, installs the shutdown signal and hands over to the model.
//!
//! Each model lives in its own file and only holds what makes it different. The blocking
//! models (iterative, process, prefork, thread, pool) share the accept loop in `accept.rs`
//! and the echo loop in `echo.rs`; the connection limit and live-connection registry live in
//! [`crate::limits`]. The fork-based models (process, prefork) share their handling of child
//! processes (fork, reaping on SIGCHLD, stopping at shutdown) in `children.rs`.

pub mod accept;
mod children;
pub mod conn;
pub mod echo;
pub mod epoll;
pub mod inetd;
pub mod iterative;
pub mod pool;
pub mod prefork;
pub mod process;
pub mod thread;
pub mod tokio_rt;
pub mod udp;
pub mod uring;

use std::fmt;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use crate::activation::Readiness;
use crate::listen::{ListenSpec, ListenerKind};
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::tls::{TlsOptions, TlsServer};
use conn::admission::AdmissionConfig;
use conn::Lifecycle;

/// A way of serving many clients at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Model {
    /// One client at a time: accept, echo until it leaves, repeat (the problem the others solve).
    Iterative,
    /// A forked child process per connection (the seeds' 7_server and echo_mpserv).
    Process,
    /// N worker processes forked at start, each serving one connection at a time.
    Prefork,
    /// A thread per connection (the seeds' 8_server, without its races).
    Thread,
    /// N threads taking accepted connections from a bounded queue.
    Pool,
    /// Non-blocking event loops on epoll (mio), one per worker.
    Epoll,
    /// Tokio tasks on a current-thread runtime per worker, each with its own accept loop.
    Async,
    /// io_uring submission and completion rings, one per worker thread.
    Uring,
}

impl Model {
    /// Every model, in the order the docs present them.
    pub const ALL: [Model; 8] = [
        Model::Iterative,
        Model::Process,
        Model::Prefork,
        Model::Thread,
        Model::Pool,
        Model::Epoll,
        Model::Async,
        Model::Uring,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Model::Iterative => "iterative",
            Model::Process => "process",
            Model::Prefork => "prefork",
            Model::Thread => "thread",
            Model::Pool => "pool",
            Model::Epoll => "epoll",
            Model::Async => "async",
            Model::Uring => "uring",
        }
    }

    /// Whether the model forks processes (so its parent must stay single-threaded).
    pub fn forks(self) -> bool {
        matches!(self, Model::Process | Model::Prefork)
    }

    /// Whether the model serves `udp://` listeners.
    pub fn serves_udp(self) -> bool {
        matches!(
            self,
            Model::Iterative
                | Model::Prefork
                | Model::Pool
                | Model::Epoll
                | Model::Async
                | Model::Uring
        )
    }

    /// The models that serve `udp://` listeners, for error messages.
    pub fn udp_models() -> String {
        let names: Vec<&str> = Model::ALL
            .iter()
            .filter(|m| m.serves_udp())
            .map(|m| m.name())
            .collect();
        names.join(", ")
    }

    /// Serves on `server`'s listeners until its shutdown signal, then drains and returns.
    pub fn serve(self, server: &Server) -> crate::Result<()> {
        match self {
            Model::Iterative => iterative::serve(server),
            Model::Process => process::serve(server),
            Model::Prefork => prefork::serve(server),
            Model::Thread => thread::serve(server),
            Model::Pool => pool::serve(server),
            Model::Epoll => epoll::serve(server),
            Model::Async => tokio_rt::serve(server),
            Model::Uring => uring::serve(server),
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What every model obeys.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The listen backlog: how many finished handshakes wait for `accept()`.
    pub backlog: u32,
    /// At most this many connections are served at once; more wait in the backlog.
    pub max_conns: usize,
    /// A connection that sends nothing (or accepts no echo) for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// After SIGINT, SIGTERM or SIGHUP, live connections may finish for this long, then are closed.
    pub shutdown_timeout: Duration,
    /// Worker processes or threads, for the models that have a fixed number of them.
    pub workers: usize,
    /// The stack size of connection threads (thread model).
    pub thread_stack: usize,
    /// Who is served, and which peers may send PROXY headers.
    pub admission: AdmissionConfig,
    /// Where to serve `/metrics` and `/healthz` (`--metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Certificates and handshake limits for `tls://` and `tls+proxy://` listeners.
    pub tls: TlsOptions,
    /// Whether the epoll model may echo bulk transfers with splice(2) (other models ignore it).
    pub splice: SpliceMode,
    /// Whether the epoll model takes UDP segment trains whole (`UDP_GRO`; others ignore it).
    pub udp_gro: UdpGroMode,
}

/// Whether the epoll model sets `UDP_GRO` on its `udp://` sockets (`serve --udp-gro`): a
/// sender's train of equal datagrams then arrives as one message, is decided datagram by
/// datagram, and goes back as one `UDP_SEGMENT` send that the kernel cuts into the same
/// datagrams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UdpGroMode {
    /// One message per datagram, as every model receives them.
    #[default]
    Off,
    /// Trains whole, where the kernel allows it (it falls back to `off` with a warning).
    On,
}

/// Whether the epoll model echoes bulk transfers with splice(2), socket to pipe to the same
/// socket, without copying them through user space (`serve --splice`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SpliceMode {
    /// Splice a plain TCP connection while it moves bulk data (a read filled the whole 64 KiB
    /// buffer); back to read/write once its messages are small again.
    #[default]
    Auto,
    /// Always read and write through user space.
    Off,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            backlog: 1024,
            max_conns: 10_000,
            idle_timeout: None,
            shutdown_timeout: Duration::from_secs(5),
            workers: default_workers(),
            thread_stack: 128 * 1024,
            admission: AdmissionConfig::default(),
            metrics: None,
            tls: TlsOptions::default(),
            splice: SpliceMode::default(),
            udp_gro: UdpGroMode::default(),
        }
    }
}

/// The number of cores this process may run on.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A bound server, ready for a model to run it.
#[derive(Debug)]
pub struct Server {
    /// Bound, listening sockets (blocking mode; a model changes that if it wants).
    pub listeners: Vec<TcpListener>,
    /// What each listener (same index) expects of its connections.
    pub kinds: Vec<ListenerKind>,
    /// Bound `udp://` sockets (blocking mode), served beside the TCP listeners.
    pub udp: Vec<UdpSocket>,
    /// What the model obeys.
    pub config: ServerConfig,
    /// Triggered by SIGINT, SIGTERM or SIGHUP (or a test).
    pub shutdown: Shutdown,
    /// Counters the model updates.
    pub stats: Arc<Stats>,
    /// The connection lifecycle every model calls: admission, records, shared warnings.
    pub conn: Arc<Lifecycle>,
    /// The TLS configuration, when a listener is `tls://` or `tls+proxy://`.
    pub tls: Option<Arc<TlsServer>>,
}

impl Server {
    /// A server on already-bound plain TCP listeners.
    pub fn new(
        listeners: Vec<TcpListener>,
        config: ServerConfig,
        shutdown: Shutdown,
    ) -> crate::Result<Self> {
        let kinds = vec![ListenerKind::Tcp; listeners.len()];
        Server::with_kinds(listeners, kinds, config, shutdown)
    }

    /// A server on already-bound listeners of the given kinds.
    pub fn with_kinds(
        listeners: Vec<TcpListener>,
        kinds: Vec<ListenerKind>,
        config: ServerConfig,
        shutdown: Shutdown,
    ) -> crate::Result<Self> {
        assert_eq!(listeners.len(), kinds.len(), "a kind per listener");
        let stats = Arc::new(
            Stats::new().map_err(|e| crate::Error::io("cannot map the shared counters", e))?,
        );
        let conn = Lifecycle::new(&config.admission, Arc::clone(&stats))
            .map_err(|e| crate::Error::io("cannot set up admission control", e))?;
        Ok(Server {
            listeners,
            kinds,
            udp: Vec::new(),
            config,
            shutdown,
            stats,
            conn: Arc::new(conn),
            tls: None,
        })
    }

    /// The same server with this TLS configuration for its TLS listeners.
    pub fn with_tls(self, tls: Option<Arc<TlsServer>>) -> Server {
        Server { tls, ..self }
    }

    /// The same server with these UDP sockets to serve too.
    pub fn with_udp(self, udp: Vec<UdpSocket>) -> Server {
        Server { udp, ..self }
    }

    /// The same server with its own listeners and shutdown (a prefork worker), sharing the
    /// parent's lifecycle (its per-source state is in memory shared across the fork).
    pub fn worker(&self, listeners: Vec<TcpListener>, shutdown: Shutdown) -> Server {
        Server {
            listeners,
            kinds: self.kinds.clone(),
            udp: Vec::new(),
            config: self.config.clone(),
            shutdown,
            stats: Arc::clone(&self.stats),
            conn: Arc::clone(&self.conn),
            tls: self.tls.clone(),
        }
    }

    /// What connections on listener `index` start with.
    pub fn kind(&self, index: usize) -> ListenerKind {
        self.kinds[index]
    }

    /// How often a model that sweeps its connections (epoll, uring) looks for idle ones and
    /// for late PROXY headers: often enough that one is closed within a quarter of its timeout
    /// after it expires. `None` without an idle timeout and without a `+proxy` listener.
    pub fn sweep_every(&self) -> Option<Duration> {
        let idle = self.config.idle_timeout.map(sweep_period);
        let header = self
            .kinds
            .iter()
            .any(|kind| kind.expects_proxy_header())
            .then(|| sweep_period(self.config.admission.proxy_timeout));
        let handshake = self
            .tls
            .as_ref()
            .filter(|_| self.kinds.iter().any(|kind| kind.is_tls()))
            .map(|tls| sweep_period(tls.handshake_timeout()));
        idle.into_iter().chain(header).chain(handshake).min()
    }
}

/// A quarter of `timeout`, between 5 ms and 1 s.
fn sweep_period(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

/// In the models that serve one connection per worker (iterative, prefork, pool), one slow or
/// never-reading client per worker stops everyone, by design: fine on loopback, a risk where
/// other machines can connect, so `serve` says so at start.
fn warn_if_one_client_can_stall(model: Model, listen: &[ListenSpec]) {
    if !matches!(model, Model::Iterative | Model::Prefork | Model::Pool) {
        return;
    }
    for spec in listen.iter().filter(|spec| !spec.addr.ip().is_loopback()) {
        tracing::warn!(
            "{model} serves one connection per worker: on {}, one slow or never-reading client per worker stops every other client; prefer epoll, async or uring where others can connect",
            spec.addr
        );
    }
}

/// Binds `listen`, installs the SIGINT/SIGTERM handlers, logs where it listens and runs
/// `model` until shutdown. Starts no thread before the model runs (fork-based models need a
/// single-threaded parent).
pub fn run(model: Model, listen: &[ListenSpec], config: ServerConfig) -> crate::Result<()> {
    run_with(model, listen, config, Readiness::default())
}

/// [`run`] that serves on the sockets a service manager passed (`LISTEN_FDS`) instead of
/// binding `listen` when there are any, and tells `readiness` once every listener accepts.
pub fn run_with(
    model: Model,
    listen: &[ListenSpec],
    mut config: ServerConfig,
    mut readiness: Readiness,
) -> crate::Result<()> {
    let passed = crate::activation::passed_listeners()?;
    // Passed sockets replace every --listen.
    let listen = if passed.is_some() { &[][..] } else { listen };
    let kinds: Vec<ListenerKind> = match &passed {
        Some(passed) => passed.stream.iter().map(|(_, kind)| *kind).collect(),
        None => listen.iter().map(|spec| spec.kind).collect(),
    };
    // Every model serves TLS.
    let serves_tls = kinds.iter().any(|kind| kind.is_tls());
    // Certificates are loaded (or made) before anything is bound: a bad file is one line.
    let tls = if serves_tls {
        // The hosts a self-signed certificate names: those of --listen, or of the passed sockets.
        let hosts: Vec<std::net::IpAddr> = match &passed {
            Some(passed) => passed
                .stream
                .iter()
                .filter_map(|(listener, _)| listener.local_addr().ok())
                .map(|addr| addr.ip())
                .collect(),
            None => listen.iter().map(|spec| spec.addr.ip()).collect(),
        };
        Some(Arc::new(TlsServer::new(&config.tls, &hosts)?))
    } else {
        None
    };
    let (udp_specs, tcp_specs): (Vec<ListenSpec>, Vec<ListenSpec>) = listen
        .iter()
        .partition(|spec| spec.kind == ListenerKind::Udp);
    // A passed datagram socket is a udp:// listener like one in --listen.
    let first_udp = match &passed {
        Some(passed) => passed
            .datagram
            .first()
            .map(|socket| match socket.local_addr() {
                Ok(addr) => format!("udp://{addr}, passed in LISTEN_FDS"),
                Err(_) => "a UDP socket passed in LISTEN_FDS".to_string(),
            }),
        None => udp_specs.first().map(ToString::to_string),
    };
    if let Some(first_udp) = first_udp.as_ref().filter(|_| !model.serves_udp()) {
        return Err(crate::Error::Unsupported(format!(
            "the {model} model does not serve udp:// listeners ({first_udp}); these models do: {}",
            Model::udp_models()
        )));
    }
    if config.udp_gro == UdpGroMode::On && model != Model::Epoll {
        return Err(crate::Error::Unsupported(format!(
            "--udp-gro on is served by the epoll model only, not by {model}"
        )));
    }
    if first_udp.is_none() {
        // No UDP listener: no datagram rules (and no per-source table kept for them).
        config.admission.udp = None;
    }
    let listen = &tcp_specs[..];
    // A model that cannot run on this machine says so before it claims to listen.
    if model == Model::Uring {
        uring::probe()?;
    }
    match crate::net::raise_open_files_limit() {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
    let metrics_listener = config.metrics.map(crate::metrics::bind).transpose()?;
    let (listeners, kinds, udp): (Vec<TcpListener>, Vec<ListenerKind>, Vec<UdpSocket>) =
        match passed {
            Some(passed) => {
                let (listeners, kinds) = passed.stream.into_iter().unzip();
                (listeners, kinds, passed.datagram)
            }
            None => (
                listen
                    .iter()
                    .map(|spec| crate::net::bind(spec.addr, config.backlog))
                    .collect::<crate::Result<Vec<_>>>()?,
                listen.iter().map(|spec| spec.kind).collect(),
                udp_specs
                    .iter()
                    .map(|spec| udp::bind(spec.addr))
                    .collect::<crate::Result<Vec<_>>>()?,
            ),
        };
    let shutdown = Shutdown::on_signals()
        .map_err(|e| crate::Error::io("cannot install signal handlers", e))?;
    readiness
        .notify_stopping_on_signals()
        .map_err(|e| crate::Error::io("cannot install signal handlers", e))?;
    // Whatever their origin, the listeners stop listening the moment shutdown starts.
    shutdown
        .stop_listening_on_trigger(&listeners)
        .map_err(|e| crate::Error::io("cannot prepare the listeners for shutdown", e))?;
    let mut bound = Vec::with_capacity(listeners.len() + udp.len());
    for (listener, &kind) in listeners.iter().zip(&kinds) {
        let addr = listener
            .local_addr()
            .map_err(|e| crate::Error::io("cannot read the bound address", e))?;
        match kind {
            ListenerKind::Tcp => tracing::info!("listening on {addr} with the {model} model"),
            kind => tracing::info!("listening on {addr} ({kind}://) with the {model} model"),
        }
        bound.push((kind, addr));
    }
    for socket in &udp {
        let addr = socket
            .local_addr()
            .map_err(|e| crate::Error::io("cannot read the bound address", e))?;
        tracing::info!("listening on {addr} (udp://) with the {model} model");
        bound.push((ListenerKind::Udp, addr));
    }
    warn_if_one_client_can_stall(model, listen);
    let server = Server::with_kinds(listeners, kinds, config, shutdown)?
        .with_udp(udp)
        .with_tls(tls);
    if model == Model::Epoll {
        epoll::request_gro(&server);
    }
    // Listening sockets complete handshakes (and UDP sockets queue datagrams) from now on,
    // before the model first accepts. Announced and closed before the metrics process is
    // forked, so that no child holds the ready descriptor open (its reader waits for EOF).
    let metrics_addr = metrics_listener
        .as_ref()
        .map(|listener| listener.local_addr())
        .transpose()
        .map_err(|e| crate::Error::io("cannot read the metrics address", e))?;
    readiness.announce(&bound, metrics_addr);
    drop(readiness);
    // Forked while this process still has one thread (see `metrics`).
    let _metrics = match metrics_listener {
        Some(listener) => Some(crate::metrics::spawn(
            listener,
            crate::metrics::Exposition {
                stats: Arc::clone(&server.stats),
                listeners: server
                    .listeners
                    .iter()
                    .zip(&server.kinds)
                    .map(|(listener, kind)| match listener.local_addr() {
                        Ok(addr) => format!("{kind}://{addr}"),
                        Err(_) => kind.to_string(),
                    })
                    .collect(),
                model,
            },
            &server.shutdown,
        )?),
        None => None,
    };
    if !model.forks() {
        // The fork models' parents must stay single-threaded: they report from their loop.
        // (Started after the metrics process is forked, for the same reason.)
        server
            .shutdown
            .report_on_request(Arc::clone(&server.stats))
            .map_err(|e| crate::Error::io("cannot start the SIGUSR1 reporter", e))?;
    }
    model.serve(&server)?;
    if server.udp.is_empty() {
        tracing::info!(
            connections = server.stats.accepted(),
            bytes = server.stats.bytes(),
            "server stopped"
        );
    } else {
        tracing::info!(
            connections = server.stats.accepted(),
            bytes = server.stats.bytes(),
            datagrams = server.stats.datagrams_echoed(),
            datagram_bytes = server.stats.datagram_bytes_sent(),
            "server stopped"
        );
        server.conn.log_datagram_refusals();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_period_is_a_fraction_of_the_timeout() {
        assert_eq!(
            sweep_period(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
        assert_eq!(
            sweep_period(Duration::from_millis(1)),
            Duration::from_millis(5)
        );
        assert_eq!(
            sweep_period(Duration::from_secs(60)),
            Duration::from_secs(1)
        );
    }
}
