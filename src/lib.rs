//! multiecho: a TCP echo server that offers every classic way to serve many clients at once,
//! the clients from the seed study notes, and a load generator that verifies every byte.
//!
//! The binary (`src/main.rs`) is a thin shell over this library: it parses the command line
//! and validates it into a plan ([`cli`]), sets up logging and calls into the modules below
//! with that plan. Tests drive the same calls.
//!
//! # Layout
//! - [`cli`]: the command line as one layer: every clap type and value parser, the flag groups
//!   subcommands share, and the validation of each subcommand's flags into the typed plan
//!   the modules below run ([`ServerConfig`], [`client::ClientConfig`], [`bench::BenchPlan`],
//!   [`compare::ComparePlan`], [`check::CheckPlan`]). Only `main.rs` imports from it.
//! - [`listen`]: listener specs (`HOST:PORT` or `tcp://`, `tcp+proxy://`, `udp://`, `tls://`,
//!   `tls+proxy://` URLs) and the kind each bound socket carries.
//! - [`activation`]: sockets passed by a service manager (`LISTEN_FDS`), and readiness
//!   (`--ready-fd`, `sd_notify`).
//! - [`net`]: binding listeners (backlog, address reuse), per-connection socket options,
//!   the open-files limit, and the accept-error classification every model shares.
//! - [`shutdown`]: the one shutdown signal (SIGINT, SIGTERM, SIGHUP or a programmatic
//!   trigger) that every model obeys, and the SIGUSR1 status line.
//! - [`limits`]: the connection limit and the registry of live connections that lets a
//!   blocking model wait for them to finish and then close them at the shutdown deadline.
//! - [`stats`]: cheap counters of connections and bytes, in memory shared across forks, a
//!   block per counting thread or process.
//! - [`metrics`]: `serve --metrics`: `/metrics` (Prometheus) and `/healthz`, served by a
//!   process of its own.
//! - [`server`]: `enum Model` and one module per concurrency model (`server/<model>.rs`); the
//!   one connection lifecycle every model calls (`server/conn/`: the connection limit,
//!   admission control, socket options, open/close records, the shared warnings); and what the
//!   blocking models share: the accept loop (`server/accept.rs`) and the echo loop
//!   (`server/echo.rs`).
//! - [`client`]: the seeds' line client and split-I/O client.
//! - [`payload`]: deterministic pseudo-random content for load generation and tests.
//! - [`bench`]: the verifying load generator, its JSON report, and `merge`.
//! - [`compare`]: starts servers and bench runs as child processes, takes turns between them,
//!   and writes the side-by-side report and charts; it reads bench's JSON through bench's own
//!   [`bench::report::Report`].
//! - [`check`]: the conformance battery for any echo server or proxy.
//! - [`tls`]: TLS with rustls: the server's certificates and configuration, the handshake cap,
//!   the handshake failure reasons every model reports; the client side's verification (a
//!   pinned certificate accepted as its own CA) and the TLS split client.

// The models rely on Linux's epoll edge semantics, io_uring, accept4, SO_* options and
// /proc, as tokio gates the same assumptions: say so at build time rather than fail oddly.
#[cfg(not(target_os = "linux"))]
compile_error!("multiecho runs on Linux only (epoll, io_uring, prctl and /proc are assumed)");

pub mod activation;
pub mod bench;
pub mod check;
pub mod cli;
pub mod client;
pub mod compare;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod net;
pub mod payload;
pub mod server;
pub mod shutdown;
pub mod stats;
pub mod tls;
mod wake;

pub use server::{Model, ServerConfig};
pub use shutdown::Shutdown;

/// Errors from setting a server up. Hot paths use plain `io::Result`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed; `context` says what was being done.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The requested model cannot run on this machine (for example io_uring is unavailable).
    #[error("{0}")]
    Unsupported(String),
    /// The TLS set-up cannot work (a certificate or key file that does not load).
    #[error("{0}")]
    Tls(String),
}

impl Error {
    /// Wraps an I/O error with a description of what was being attempted.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The library's result type for setup operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
