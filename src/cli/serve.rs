//! `multiecho serve`'s flags, and their validation into the [`ServerConfig`] every model
//! obeys.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;

use super::groups::WorkersArgs;
use super::parse::{parse_duration, parse_idle_timeout, parse_thread_stack};
use crate::listen::ListenSpec;
use crate::server::conn::admission::{default_trusted_proxies, parse_prefix, AdmissionConfig};
use crate::server::conn::datagram::UdpPolicy;
use crate::server::{Model, ServerConfig, SpliceMode, UdpGroMode};

/// `multiecho serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen: HOST:PORT, [V6]:PORT or PORT (loopback) for plain TCP, or a URL:
    /// tcp://HOST:PORT, or tcp+proxy://HOST:PORT, where every connection must begin with a
    /// PROXY protocol v1 or v2 header (from HAProxy or another load balancer) naming the real
    /// client, or udp://HOST:PORT for UDP echo (models iterative, prefork, pool, epoll, async
    /// and uring), or tls://HOST:PORT for TLS echo (plaintext echoed; see the TLS flags), or
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
    #[command(flatten)]
    pub workers: WorkersArgs,
    /// Stack size of connection threads (thread model), e.g. 128KiB (from 16KiB to 256MiB).
    #[arg(long, value_name = "BYTES", default_value = "128KiB", value_parser = parse_thread_stack)]
    pub thread_stack: u64,
    /// Once every listener accepts, write one line per listener to descriptor N ("tcp
    /// 127.0.0.1:4000", "tcp+proxy [::1]:4001": kind and bound address), and with --metrics a
    /// last line "metrics 127.0.0.1:9100", then close it: for programs that start multiecho and
    /// need the port it got (--listen 127.0.0.1:0).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(3..))]
    pub ready_fd: Option<i32>,
    /// Serve exactly one connection, already accepted, on standard input, then exit: for
    /// inetd, xinetd (nowait) and systemd Accept=yes sockets. Logs go to stderr. --model and
    /// --listen do not apply. --inetd=tcp+proxy: the connection begins with a PROXY protocol
    /// v1 or v2 header (from HAProxy or another load balancer, a --trusted-proxy) naming the
    /// real client, as on a tcp+proxy:// listener. --inetd=tls (or tls+proxy): TLS on it, with
    /// the --tls-* options.
    #[arg(long, value_name = "KIND", num_args = 0..=1, require_equals = true,
          default_missing_value = "tcp", value_parser = crate::server::inetd::parse_kind,
          conflicts_with = "ready_fd")]
    pub inetd: Option<crate::listen::ListenerKind>,
    /// Serve Prometheus metrics at http://ADDR/metrics and a health check at /healthz (200
    /// while serving, 503 once shutdown has started), e.g. 127.0.0.1:9100.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Echo bulk transfers with splice(2), socket to pipe to the same socket, with no copy
    /// through user space (epoll model, plain TCP and tcp+proxy:// only; the other models
    /// and TLS ignore it). auto: a connection splices once a read fills the whole 64 KiB
    /// buffer, and goes back to read/write after 4 small splices in a row; off: never.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SpliceMode::Auto)]
    pub splice: SpliceMode,
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
    /// UDP GRO (epoll model only; the others refuse on). on: the kernel hands over a sender's
    /// train of equal datagrams (sent with UDP_SEGMENT, or coalesced on the way in) as one
    /// message; each of its datagrams still goes through the loop guard, --allow/--deny and
    /// --udp-rate and is counted on its own, and the admitted ones go back as the same
    /// datagrams with one UDP_SEGMENT send. Fewer system calls for clients that send trains;
    /// nothing gained for ordinary ones. off: one message per datagram.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = UdpGroMode::Off)]
    pub udp_gro: UdpGroMode,
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
            workers: self.workers.count().unwrap_or(defaults.workers),
            // Within THREAD_STACK_RANGE, so it fits a usize.
            thread_stack: usize::try_from(self.thread_stack).unwrap_or(usize::MAX),
            admission: AdmissionConfig {
                udp: Some(self.udp.policy()),
                ..self.admission.config()
            },
            metrics: self.metrics,
            tls: self.tls.options(),
            splice: self.splice,
            udp_gro: self.udp.udp_gro,
        }
    }
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
    /// core from established connections (at most 4096).
    #[arg(long, value_name = "N", default_value_t = crate::tls::server::DEFAULT_MAX_HANDSHAKES as u64,
          value_parser = clap::value_parser!(u64)
              .range(1..=crate::tls::server::MAX_HANDSHAKES_LIMIT as u64))]
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
