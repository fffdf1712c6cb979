//! Flag groups that several subcommands take (`#[command(flatten)]`), each written once so
//! the subcommands cannot drift apart in what they accept: the target (client, bench), the
//! worker count (serve, compare), connection churn (bench, compare) and CPU pinning
//! (compare).

use anyhow::anyhow;
use clap::Args;

use crate::compare::CpuList;
use crate::listen::ListenSpec;

/// The echo server to talk to: `client` and `bench`.
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Server address: HOST:PORT, [V6]:PORT or PORT (loopback), udp://HOST:PORT for UDP
    /// echo (client: a datagram per line), or tls://HOST:PORT for TLS (see --tls-ca).
    #[arg(value_name = "ADDR", default_value = crate::net::DEFAULT_LISTEN)]
    pub addr: String,
    /// A port given as a second argument, nc style (`client HOST PORT`): caught only to
    /// point at HOST:PORT. (Parsing ADDR after clap lets the hint see both.)
    #[arg(hide = true)]
    pub nc_style_port: Option<String>,
}

impl TargetArgs {
    /// The server's address; `HOST PORT` as two arguments gets a pointer to `HOST:PORT` for
    /// `multiecho SUBCOMMAND`.
    pub fn spec(&self, subcommand: &str) -> anyhow::Result<ListenSpec> {
        if let Some(port) = &self.nc_style_port {
            let host = self.addr.trim();
            // An IPv6 address needs brackets before its port.
            let joined = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            anyhow::bail!(
                "the address is one argument, HOST:PORT, not HOST PORT: try \
                 `multiecho {subcommand} {joined}`"
            );
        }
        crate::listen::parse(&self.addr).map_err(|e| anyhow!(e))
    }
}

/// `--workers`: `serve` and `compare`.
#[derive(Debug, Args)]
pub struct WorkersArgs {
    /// Worker processes or threads, for the models that take them (prefork, pool, epoll,
    /// async, uring). Default: one per core.
    #[arg(short, long, value_name = "N", value_parser = super::parse::workers())]
    pub workers: Option<u64>,
}

impl WorkersArgs {
    /// The count asked for; within `WORKERS_RANGE`, so it fits a `usize`.
    pub fn count(&self) -> Option<usize> {
        self.workers.map(|w| w as usize)
    }
}

/// Connection churn: `bench` and `compare`.
#[derive(Debug, Args)]
pub struct ChurnArgs {
    /// Connection churn: a new connection for every round trip (--requests-per-conn 1), so
    /// the report shows what a connection costs (a fork, a thread, a task...).
    #[arg(long, conflicts_with = "requests_per_conn")]
    pub churn: bool,
    /// Connection churn: close each connection after N round trips and open a new one;
    /// reports connections per second and connect latency.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub requests_per_conn: Option<u64>,
}

impl ChurnArgs {
    /// Round trips per connection before it is replaced (`--churn` is 1); `None`: no churn.
    pub fn requests_per_conn(&self) -> Option<u64> {
        if self.churn {
            Some(1)
        } else {
            self.requests_per_conn
        }
    }
}

/// Pinning the servers and the load generator to CPUs: `compare`.
#[derive(Debug, Args)]
pub struct PinningArgs {
    /// Pin the servers to these CPUs, e.g. 0 or 0-1.
    #[arg(long, value_name = "CPUS", value_parser = super::parse::parse_usable_cpu_list)]
    pub server_cpus: Option<CpuList>,
    /// Pin the load generator to these CPUs, e.g. 1 or 2,3.
    #[arg(long, value_name = "CPUS", value_parser = super::parse::parse_usable_cpu_list)]
    pub client_cpus: Option<CpuList>,
}
