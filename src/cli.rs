//! The command line: clap derive structs for each subcommand, and the parsers for sizes,
//! durations and addresses that turn text into configuration with one clear error line.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use ipnet::IpNet;

use crate::listen::ListenSpec;
use crate::server::conn::admission::{default_trusted_proxies, parse_prefix, AdmissionConfig};
use crate::server::conn::datagram::UdpPolicy;
use crate::server::{Model, ServerConfig};

/// A TCP echo server with every classic concurrency model, its clients, and a verifying
/// load generator.
#[derive(Debug, Parser)]
#[command(name = "multiecho", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log less (warnings and errors only). Repeat for errors only.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    /// Log more (-v debug, -vv trace). RUST_LOG overrides both.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// How log lines are written to stderr: text for people (coloured only on a terminal,
    /// unless NO_COLOR is set) or json, one object per line, for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The format of log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the echo server.
    Serve(ServeArgs),
    /// Talk to an echo server from the terminal (the seeds' clients).
    Client(crate::client::ClientArgs),
    /// Load an echo server and verify every byte it sends back.
    Bench(crate::bench::BenchArgs),
    /// Start the models, benchmark them taking turns, and write a side-by-side report with
    /// charts.
    Compare(crate::bench::compare::CompareArgs),
    /// Check any echo server (or a proxy in front of one) for the classic echo bugs.
    Check(crate::check::CheckArgs),
    /// Merge `bench --json` reports from several load generators into one.
    Merge(crate::bench::merge::MergeArgs),
    /// Print a shell completion script: multiecho completions bash > /etc/bash_completion.d/multiecho
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) of multiecho, or of one subcommand: multiecho man serve | man -l -
    Man {
        /// The subcommand whose page to print (its page is multiecho-SUBCOMMAND(1)).
        #[arg(conflicts_with = "out_dir")]
        subcommand: Option<String>,
        /// Write every page instead, as DIR/multiecho.1 and DIR/multiecho-SUBCOMMAND.1 (for
        /// packaging).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
}

/// `multiecho serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen: HOST:PORT, [V6]:PORT or PORT (loopback) for plain TCP, or a URL:
    /// tcp://HOST:PORT, or tcp+proxy://HOST:PORT, where every connection must begin with a
    /// PROXY protocol v1 or v2 header (from HAProxy or another load balancer) naming the real
    /// client, or udp://HOST:PORT for UDP echo (models iterative, prefork, pool, epoll, async),
    /// or tls://HOST:PORT for TLS echo (plaintext echoed; see the TLS flags), or
    /// tls+proxy://HOST:PORT, a PROXY header and then TLS.
    /// Repeat to listen on several, TCP and UDP together; use 0.0.0.0:4000 or [::]:4000 to
    /// accept connections from other machines.
    #[arg(short, long = "listen", value_name = "ADDR", value_parser = crate::listen::parse,
          default_value = crate::net::DEFAULT_LISTEN)]
    pub listen: Vec<ListenSpec>,
    /// How to serve many clients at once. The default, epoll, is on par with a C epoll server,
    /// uses the least memory and needs no special kernel feature (BENCHMARKS.md).
    #[arg(short, long, value_enum, default_value_t = Model::Epoll)]
    pub model: Model,
    /// Listen backlog: finished handshakes waiting to be accepted.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub backlog: u32,
    /// Serve at most N connections at once; more wait in the backlog (they are not reset).
    /// Does not apply to UDP: a datagram is not a connection.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_conns: u64,
    /// Close a connection that sends nothing (or accepts no echo) for this long, e.g. 30s (at
    /// least 100ms). Does not apply to UDP.
    #[arg(long, value_name = "DURATION", value_parser = parse_idle_timeout)]
    pub idle_timeout: Option<Duration>,
    /// On SIGINT, SIGTERM or SIGHUP, let live connections finish for up to this long, then close them.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Worker processes or threads (prefork, pool, epoll, async, uring). Default: one per core.
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..4097))]
    pub workers: Option<u64>,
    /// Stack size of connection threads (thread model), e.g. 128KiB (from 16KiB to 256MiB).
    #[arg(long, value_name = "BYTES", default_value = "128KiB", value_parser = parse_thread_stack)]
    pub thread_stack: u64,
    /// Once every listener accepts, write one line per listener to descriptor N ("tcp
    /// 127.0.0.1:4000", "tcp+proxy [::1]:4001": kind and bound address), then close it: for
    /// programs that start multiecho and need the port it got (--listen 127.0.0.1:0).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(3..))]
    pub ready_fd: Option<i32>,
    /// Serve exactly one connection, already accepted, on standard input, then exit: for
    /// inetd, xinetd (nowait) and systemd Accept=yes sockets. Logs go to stderr. --model and
    /// --listen do not apply. --inetd=tcp+proxy: the connection begins with a PROXY protocol
    /// v1 or v2 header (from HAProxy or another load balancer, a --trusted-proxy) naming the
    /// real client, as on a tcp+proxy:// listener.
    #[arg(long, value_name = "KIND", num_args = 0..=1, require_equals = true,
          default_missing_value = "tcp", value_parser = crate::server::inetd::parse_kind,
          conflicts_with = "ready_fd")]
    pub inetd: Option<crate::listen::ListenerKind>,
    /// Serve Prometheus metrics at http://ADDR/metrics and a health check at /healthz (200
    /// while serving, 503 once shutdown has started), e.g. 127.0.0.1:9100.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub admission: AdmissionArgs,
    #[command(flatten)]
    pub udp: UdpArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How udp:// listeners answer: `serve`'s UDP flags.
#[derive(Debug, Args)]
#[command(next_help_heading = "UDP")]
pub struct UdpArgs {
    /// Answer datagrams from any source port. By default datagrams from port 0 and from the
    /// ports of services that answer unsolicited datagrams (7 echo, 13, 17, 19 chargen, 37,
    /// 53 DNS, 69, 111, 123 NTP, 137, 161, 389, 1900, 5353, 11211) get no reply, so a spoofed
    /// datagram cannot start a loop between this server and such a service.
    #[arg(long)]
    pub udp_any_port: bool,
    /// Echo at most N datagrams per second to one source address (a token bucket with a burst
    /// of N); beyond it datagrams are dropped and counted. 0: no limit. The default, 10000,
    /// is more than latency and loss probes or a lab's bench runs at modest rates need, and
    /// keeps one spoofed source's reflected traffic to about 118 Mbit/s at 1,472 B per
    /// datagram, well below a lab link. Throughput benchmarks from one address pass 0.
    #[arg(long, value_name = "N", default_value_t = crate::server::conn::datagram::DEFAULT_UDP_RATE)]
    pub udp_rate: u32,
}

impl UdpArgs {
    /// The datagram rules these flags describe.
    pub fn policy(&self) -> UdpPolicy {
        UdpPolicy {
            rate: (self.udp_rate > 0).then_some(self.udp_rate),
            any_port: self.udp_any_port,
        }
    }
}

/// Who is served: `serve`'s admission-control flags.
#[derive(Debug, Args)]
#[command(next_help_heading = "Admission control")]
pub struct AdmissionArgs {
    /// Serve only sources in this prefix (CIDR such as 10.0.0.0/8, or an address). Repeatable;
    /// without it every source may connect. IPv4 rules also match IPv4-mapped IPv6 peers.
    #[arg(long, value_name = "CIDR", value_parser = parse_prefix)]
    pub allow: Vec<IpNet>,
    /// Never serve sources in this prefix; deny wins over allow. Repeatable.
    #[arg(long, value_name = "CIDR", value_parser = parse_prefix)]
    pub deny: Vec<IpNet>,
    /// At most N connections open at once from one source address; the next one is closed at
    /// once, without an echo. Does not apply to UDP (see --udp-rate).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_per_source: Option<u32>,
    /// At most N new connections per second from one source (a token bucket with a burst of
    /// N); beyond it, closed at once. The source is served again as soon as its rate drops.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_conn_rate: Option<u32>,
    /// Peers allowed to send PROXY headers on tcp+proxy:// listeners (CIDR or address).
    /// Repeatable; default: loopback only. A connection from any other peer is closed.
    #[arg(long, value_name = "CIDR", value_parser = parse_prefix)]
    pub trusted_proxy: Vec<IpNet>,
    /// How long a tcp+proxy:// listener waits for a connection's PROXY header before closing
    /// it.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub proxy_timeout: Duration,
}

impl AdmissionArgs {
    /// The admission configuration these flags describe.
    pub fn config(&self) -> AdmissionConfig {
        AdmissionConfig {
            allow: self.allow.clone(),
            deny: self.deny.clone(),
            max_per_source: self.max_per_source,
            max_conn_rate: self.max_conn_rate,
            trusted_proxies: if self.trusted_proxy.is_empty() {
                default_trusted_proxies()
            } else {
                self.trusted_proxy.clone()
            },
            proxy_timeout: self.proxy_timeout,
            udp: None,
        }
    }
}

impl ServeArgs {
    /// The server configuration these flags describe.
    pub fn config(&self) -> ServerConfig {
        let defaults = ServerConfig::default();
        ServerConfig {
            backlog: self.backlog,
            max_conns: usize::try_from(self.max_conns).unwrap_or(usize::MAX),
            idle_timeout: self.idle_timeout,
            shutdown_timeout: self.shutdown_timeout,
            workers: self.workers.map_or(defaults.workers, |w| w as usize),
            // Within THREAD_STACK_RANGE, so it fits a usize.
            thread_stack: usize::try_from(self.thread_stack).unwrap_or(usize::MAX),
            admission: AdmissionConfig {
                udp: Some(self.udp.policy()),
                ..self.admission.config()
            },
            metrics: self.metrics,
            tls: self.tls.options(),
        }
    }
}

/// The shortest `--idle-timeout`: below it, ordinary scheduling delays would close clients that
/// are not idle at all.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_millis(100);

/// `--thread-stack` bounds: below 16 KiB a thread cannot even format a log line; above 256 MiB
/// a few hundred connections would reserve more address space than most machines have.
pub const THREAD_STACK_RANGE: std::ops::RangeInclusive<u64> = (16 << 10)..=(256 << 20);

/// `bench --rate` bounds, in requests per second: below the minimum the schedule's interval
/// stops being a time anyone would wait for.
pub const RATE_RANGE: std::ops::RangeInclusive<f64> = 0.001..=1e9;

/// Parses `--idle-timeout`: a duration of at least [`MIN_IDLE_TIMEOUT`].
pub fn parse_idle_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if timeout < MIN_IDLE_TIMEOUT {
        return Err(format!(
            "invalid idle timeout '{text}': must be at least {MIN_IDLE_TIMEOUT:?}"
        ));
    }
    Ok(timeout)
}

/// Parses `--thread-stack`: a size within [`THREAD_STACK_RANGE`].
pub fn parse_thread_stack(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if !THREAD_STACK_RANGE.contains(&size) {
        return Err(format!(
            "invalid thread stack '{text}': must be from 16KiB to 256MiB"
        ));
    }
    Ok(size)
}

/// Parses `bench --rate`: requests per second within [`RATE_RANGE`].
pub fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if RATE_RANGE.contains(&rate) => Ok(rate),
        _ => Err(format!(
            "invalid rate '{text}': expected requests per second, from {} to {}",
            RATE_RANGE.start(),
            RATE_RANGE.end()
        )),
    }
}

/// Parses a CPU list (see [`crate::bench::compare::parse_cpu_list`]) whose every CPU this
/// process may run on, so a pinned child cannot fail later.
pub fn parse_usable_cpu_list(text: &str) -> Result<crate::bench::compare::CpuList, String> {
    let list = crate::bench::compare::parse_cpu_list(text)?;
    // The kernel's own list of the CPUs this process may run on, in the same syntax.
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read the CPUs this process may use: {e}"))?;
    let usable = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .and_then(|allowed| crate::bench::compare::parse_cpu_list(allowed.trim()).ok())
        .ok_or("cannot read the CPUs this process may use from /proc/self/status")?;
    if let Some(cpu) = list.cpus().iter().find(|cpu| !usable.cpus().contains(cpu)) {
        return Err(format!(
            "invalid CPU list '{text}': CPU {cpu} is not available here (available: {usable})"
        ));
    }
    Ok(list)
}

/// Parses `compare --external NAME=ADDR[@PID]` (see [`crate::bench::compare::parse_external`]);
/// a PID must name a running process.
pub fn parse_running_external(text: &str) -> Result<crate::bench::compare::External, String> {
    let external = crate::bench::compare::parse_external(text)?;
    if let Some(pid) = external.pid {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(format!(
                "invalid external server '{text}': no process has PID {pid}"
            ));
        }
    }
    Ok(external)
}

/// Parses an address for clap (see [`crate::net::parse_addr`]).
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    crate::net::parse_addr(text)
}

/// Parses a duration: `30s`, `500ms`, `2m`, or a bare number of seconds (`1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| {
            format!("invalid duration '{text}': must be a non-negative number of seconds")
        });
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration '{text}': {e} (examples: 30s, 500ms, 2m)"))
}

/// Parses a byte size: `512`, `4k`, `4KiB`, `1m`, `1MiB`, `2GiB` (binary multiples; `kb`/`KB`
/// are taken as KiB too, as most echo tools do).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size '{text}': expected a number such as 512, 4k or 1MiB"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size '{text}': unknown unit '{unit}' (use k, KiB, m, MiB, g or GiB)"
            ))
        }
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("invalid size '{text}': too large"))
}

/// `serve`'s TLS flags, for tls:// and tls+proxy:// listeners.
#[derive(Debug, Args)]
#[command(next_help_heading = "TLS")]
pub struct TlsArgs {
    /// The certificate chain to serve on tls:// listeners (PEM, leaf first). Without it, a
    /// self-signed certificate for localhost, 127.0.0.1, ::1 and the listen addresses is made
    /// at start and its SHA-256 fingerprint logged.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, RSA or EC; not encrypted).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Mutual TLS: require a client certificate issued by a CA in this PEM file.
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Close a connection whose TLS handshake has not finished this long after it was
    /// admitted (after its PROXY header, on tls+proxy://).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// At most N TLS handshakes in progress at once; further connections wait for one to
    /// finish (within their handshake timeout), so a flood of handshakes cannot take every
    /// core from established connections.
    #[arg(long, value_name = "N", default_value_t = crate::tls::server::DEFAULT_MAX_HANDSHAKES as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tls_max_handshakes: u64,
}

impl TlsArgs {
    /// The TLS options these flags describe.
    pub fn options(&self) -> crate::tls::TlsOptions {
        crate::tls::TlsOptions {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: self.tls_client_ca.clone(),
            handshake_timeout: self.tls_handshake_timeout,
            max_handshakes: usize::try_from(self.tls_max_handshakes).unwrap_or(usize::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn refuses_values_that_cannot_work() {
        assert!(parse_idle_timeout("0").is_err());
        assert!(parse_idle_timeout("1ns").is_err());
        assert_eq!(
            parse_idle_timeout("100ms").unwrap(),
            Duration::from_millis(100)
        );
        assert!(parse_thread_stack("18446744073709551615").is_err());
        assert!(parse_thread_stack("1k").is_err());
        assert_eq!(parse_thread_stack("128KiB").unwrap(), 128 << 10);
        assert_eq!(parse_rate("2500"), Ok(2500.0));
        for bad in ["1e-19", "0", "-5", "fast", "NaN", "inf", "2e9"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert!(parse_usable_cpu_list("0").is_ok());
        assert!(parse_usable_cpu_list("1000").is_err());
        let me = format!("me=127.0.0.1:1@{}", std::process::id());
        assert!(parse_running_external(&me).is_ok());
        assert!(parse_running_external("x=127.0.0.1:1@2147483647").is_err());
    }

    #[test]
    fn serve_defaults() {
        let cli = Cli::try_parse_from(["multiecho", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.model, Model::Epoll);
        assert_eq!(
            args.listen,
            vec![ListenSpec::tcp(
                crate::net::parse_addr("127.0.0.1:4000").unwrap()
            )]
        );
        let config = args.config();
        assert_eq!(config.backlog, 1024);
        assert_eq!(config.idle_timeout, None);
    }

    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
