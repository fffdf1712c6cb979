//! `serve --metrics HOST:PORT`: the server's counters ([`crate::stats`]: connections, bytes,
//! refusals, accept errors, datagrams) as Prometheus text (OpenMetrics) at `/metrics`, and
//! `/healthz` (200 while serving, 503 once shutdown started).
//!
//! The endpoint runs in a process of its own, forked from the still single-threaded server
//! before the model starts. Why a process: the fork-based models need a single-threaded
//! parent for as long as they run (the process model forks per connection), so an HTTP thread
//! in the server process is impossible there; a process of its own serves every model the
//! same way, and its HTTP threads (tiny_http's) can never be forked. It reads the counters
//! from the shared mapping every worker, thread or child process counts into, summing their
//! blocks at scrape time, and learns of shutdown from the shutdown descriptor it inherited
//! (readable from the moment SIGINT/SIGTERM reaches the server). It dies with the server: the
//! kernel kills it when its parent exits (`PR_SET_PDEATHSIG`), and the server kills and reaps
//! it when the model returns.
//!
//! HTTP is tiny_http's (a small, synchronous, well-kept server: no hand-written parser, and no
//! async runtime to build); the exposition format is prometheus-client's.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::server::conn::admission::Refusal;
use crate::server::Model;
use crate::shutdown::Shutdown;
use crate::stats::{accept_error_label, EndKind, Stats, ACCEPT_ERROR_KINDS, MAX_LISTENERS};
use crate::tls::HandshakeFailure;

/// The content type of the exposition prometheus-client writes, served to scrapers that ask
/// for it (Prometheus does).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, served to everyone else (curl, `promtool check
/// metrics`, older scrapers).
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

type Labels = Vec<(String, String)>;

/// What the endpoint reports on.
#[derive(Debug)]
pub struct Exposition {
    /// The counters.
    pub stats: Arc<Stats>,
    /// A label per listener, in `--listen` order (their URLs).
    pub listeners: Vec<String>,
    /// The model serving.
    pub model: Model,
}

impl Exposition {
    /// The counters now, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let stats = &self.stats;
        let mut registry = Registry::with_prefix("multiecho");

        let accepted = Family::<Labels, Counter>::default();
        for (index, listener) in self.listeners.iter().enumerate().take(MAX_LISTENERS) {
            accepted
                .get_or_create(&vec![("listener".into(), listener.clone())])
                .inc_by(stats.accepted_on(index));
        }
        registry.register(
            "connections_accepted",
            "Connections admitted, by listener (refused ones are counted apart)",
            accepted,
        );

        let active = Gauge::<i64>::default();
        active.set(i64::try_from(stats.active()).unwrap_or(i64::MAX));
        registry.register(
            "connections_active",
            "Connections admitted and not yet closed",
            active,
        );

        let closed = Family::<Labels, Counter>::default();
        for end in EndKind::ALL {
            closed
                .get_or_create(&vec![("end".into(), end.as_str().into())])
                .inc_by(stats.closed_with(end));
        }
        registry.register(
            "connections_closed",
            "Admitted connections that ended, by how they ended",
            closed,
        );

        let refused = Family::<Labels, Counter>::default();
        for reason in Refusal::CONNECTION {
            refused
                .get_or_create(&vec![("reason".into(), reason.as_str().into())])
                .inc_by(stats.refused(reason));
        }
        registry.register(
            "connections_refused",
            "Connections closed without an echo, by reason",
            refused,
        );

        let received = Counter::<u64>::default();
        received.inc_by(stats.received());
        registry.register(
            "bytes_received",
            "Bytes received from clients on TCP connections, counted as they arrive",
            received,
        );
        let sent = Counter::<u64>::default();
        sent.inc_by(stats.sent());
        registry.register(
            "bytes_sent",
            "Bytes echoed back to clients on TCP connections, counted as the kernel takes them",
            sent,
        );

        let accept_errors = Family::<Labels, Counter>::default();
        for kind in ACCEPT_ERROR_KINDS {
            accept_errors
                .get_or_create(&vec![("kind".into(), accept_error_label(kind).into())])
                .inc_by(stats.accept_errors(kind));
        }
        registry.register(
            "accept_errors",
            "accept() failures, by kind: retry (the client went away), exhausted (out of descriptors or memory), fatal",
            accept_errors,
        );

        register_datagram_counters(&mut registry, stats);
        let handshakes = Counter::<u64>::default();
        handshakes.inc_by(stats.tls_handshakes_completed());
        registry.register(
            "tls_handshakes_completed",
            "TLS handshakes completed",
            handshakes,
        );
        let handshakes_failed = Family::<Labels, Counter>::default();
        for reason in HandshakeFailure::ALL {
            handshakes_failed
                .get_or_create(&vec![("reason".into(), reason.as_str().into())])
                .inc_by(stats.tls_handshakes_failed(reason));
        }
        registry.register(
            "tls_handshakes_failed",
            "TLS handshakes that failed (the connection was closed), by reason",
            handshakes_failed,
        );

        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&vec![
                ("version".into(), env!("CARGO_PKG_VERSION").into()),
                ("model".into(), self.model.name().into()),
            ])
            .set(1);
        registry.register(
            "build_info",
            "The version and the concurrency model serving",
            build_info,
        );

        let mut text = String::new();
        encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }
}

/// The UDP side's counters (zero without a `udp://` listener).
fn register_datagram_counters(registry: &mut Registry, stats: &Stats) {
    let counter = |value: u64| {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        counter
    };
    registry.register(
        "datagrams_received",
        "Datagrams received on udp:// listeners, echoed or refused",
        counter(stats.datagrams_received()),
    );
    registry.register(
        "datagram_bytes_received",
        "Bytes of the datagrams received on udp:// listeners",
        counter(stats.datagram_bytes_received()),
    );
    registry.register(
        "datagrams_echoed",
        "Datagrams echoed back in full",
        counter(stats.datagrams_echoed()),
    );
    registry.register(
        "datagram_bytes_sent",
        "Bytes of the datagrams echoed back",
        counter(stats.datagram_bytes_sent()),
    );
    let refused = Family::<Labels, Counter>::default();
    for reason in Refusal::DATAGRAM {
        refused
            .get_or_create(&vec![("reason".into(), reason.as_str().into())])
            .inc_by(stats.datagrams_refused(reason));
    }
    registry.register(
        "datagrams_refused",
        "Datagrams dropped without an echo, by reason: the loop guard (udp-source-port-zero, udp-reflection-port), --udp-rate, --allow/--deny, a full source table, truncation",
        refused,
    );
    registry.register(
        "datagram_send_errors",
        "Echoes the kernel would not send (the datagram is lost, as on a network)",
        counter(stats.datagram_send_errors()),
    );
}

/// The classic Prometheus text format of an OpenMetrics text: the two differ, for what this
/// endpoint exports, only in that a counter's HELP and TYPE lines name its samples (`_total`)
/// and in the closing `# EOF`.
pub fn classic_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Binds the metrics endpoint's address (before serving, so a port in use is one clear error).
pub fn bind(addr: SocketAddr) -> crate::Result<TcpListener> {
    TcpListener::bind(addr)
        .map_err(|e| crate::Error::io(format!("cannot serve metrics on {addr}"), e))
}

/// The metrics process; dropping it kills and reaps it.
#[derive(Debug)]
pub struct MetricsProcess {
    pid: Pid,
}

impl Drop for MetricsProcess {
    fn drop(&mut self) {
        let _ = kill(self.pid, Signal::SIGKILL);
        while let Err(nix::errno::Errno::EINTR) = waitpid(self.pid, None) {}
    }
}

/// Forks the metrics process, serving `exposition` on `listener` until the server exits.
///
/// Must be called while this process has a single thread (before the model starts).
pub fn spawn(
    listener: TcpListener,
    exposition: Exposition,
    shutdown: &Shutdown,
) -> crate::Result<MetricsProcess> {
    let parent = nix::unistd::getpid();
    // SAFETY: the caller guarantees a single-threaded process, so the child has no lock held
    // by a thread that does not exist in it.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            drop(listener);
            Ok(MetricsProcess { pid: child })
        }
        Ok(ForkResult::Child) => {
            let code = match run_child(parent, listener, &exposition, shutdown) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("metrics endpoint failed: {e}");
                    1
                }
            };
            // SAFETY: ends the child without unwinding into the server's code or running its
            // destructors (they belong to the parent).
            unsafe { libc::_exit(code) }
        }
        Err(e) => Err(crate::Error::io(
            "cannot start the metrics process",
            e.into(),
        )),
    }
}

fn run_child(
    parent: Pid,
    listener: TcpListener,
    exposition: &Exposition,
    shutdown: &Shutdown,
) -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if nix::unistd::getppid() != parent {
        // The server exited before the death signal was armed.
        return Ok(());
    }
    let addr = listener.local_addr()?;
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tracing::info!("serving metrics on http://{addr}/metrics");
    for request in server.incoming_requests() {
        let openmetrics = request.headers().iter().any(|h| {
            h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text")
        });
        let response = respond(
            request.method(),
            request.url(),
            openmetrics,
            exposition,
            shutdown,
        );
        if let Err(e) = request.respond(response) {
            tracing::debug!("metrics client went away: {e}");
        }
    }
    Ok(())
}

fn respond(
    method: &tiny_http::Method,
    url: &str,
    openmetrics: bool,
    exposition: &Exposition,
    shutdown: &Shutdown,
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    use tiny_http::{Header, Method, Response};
    let text = |status: u16, body: &str| {
        Response::from_string(body)
            .with_status_code(status)
            .with_header(Header::from_bytes("Content-Type", "text/plain; charset=utf-8").unwrap())
    };
    if !matches!(method, Method::Get | Method::Head) {
        return text(405, "only GET and HEAD\n");
    }
    match url.split('?').next().unwrap_or("") {
        "/metrics" if openmetrics => Response::from_string(exposition.render())
            .with_header(Header::from_bytes("Content-Type", OPENMETRICS).unwrap()),
        "/metrics" => Response::from_string(classic_text(&exposition.render()))
            .with_header(Header::from_bytes("Content-Type", CLASSIC).unwrap()),
        "/healthz" if shutting_down(shutdown) => text(503, "shutting down\n"),
        "/healthz" => text(200, "ok\n"),
        _ => text(404, "not found: try /metrics or /healthz\n"),
    }
}

/// Whether the server's shutdown has started: its shutdown descriptor, shared across the
/// fork, is readable from then on.
fn shutting_down(shutdown: &Shutdown) -> bool {
    crate::wake::poll_readable(&[shutdown.as_fd()], Some(Duration::ZERO))
        .map(|ready| ready[0])
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_reach_the_exposition_and_the_classic_text_names_their_samples() {
        let stats = Arc::new(Stats::new().unwrap());
        stats.connection_opened(1);
        stats.bytes_received(10);
        stats.bytes_sent(7);
        stats.connection_closed(EndKind::IdleTimeout);
        stats.connection_refused(Refusal::Rate);
        stats.datagram_received(30);
        stats.datagram_received(12);
        stats.datagram_echoed(30);
        stats.datagram_refused(Refusal::DatagramReflectionPort);
        stats.tls_handshake_completed();
        stats.tls_handshake_failed(HandshakeFailure::NotTls);
        let exposition = Exposition {
            stats,
            listeners: vec!["tcp://127.0.0.1:1".into(), "tcp+proxy://127.0.0.1:2".into()],
            model: Model::Pool,
        };
        let open = exposition.render();
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(
            open.contains("# TYPE multiecho_bytes_sent counter\n"),
            "{open}"
        );
        let classic = classic_text(&open);
        for want in [
            "# TYPE multiecho_bytes_sent_total counter\n",
            "# HELP multiecho_bytes_received_total ",
            "multiecho_bytes_received_total 10\n",
            "multiecho_bytes_sent_total 7\n",
            "multiecho_connections_accepted_total{listener=\"tcp+proxy://127.0.0.1:2\"} 1\n",
            "multiecho_connections_accepted_total{listener=\"tcp://127.0.0.1:1\"} 0\n",
            "multiecho_connections_closed_total{end=\"idle_timeout\"} 1\n",
            "multiecho_connections_refused_total{reason=\"rate-limit\"} 1\n",
            "# TYPE multiecho_connections_active gauge\n",
            "multiecho_connections_active 0\n",
            "multiecho_datagrams_received_total 2\n",
            "multiecho_datagram_bytes_received_total 42\n",
            "multiecho_datagrams_echoed_total 1\n",
            "multiecho_datagram_bytes_sent_total 30\n",
            "multiecho_datagrams_refused_total{reason=\"udp-reflection-port\"} 1\n",
            "multiecho_datagrams_refused_total{reason=\"denied\"} 0\n",
            "multiecho_datagram_send_errors_total 0\n",
            "multiecho_tls_handshakes_completed_total 1\n",
            "multiecho_tls_handshakes_failed_total{reason=\"not_tls\"} 1\n",
            "multiecho_tls_handshakes_failed_total{reason=\"timeout\"} 0\n",
        ] {
            assert!(classic.contains(want), "no {want:?} in\n{classic}");
        }
        let build_info = format!(
            "multiecho_build_info{{version=\"{}\",model=\"pool\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(classic.contains(&build_info), "{classic}");
        assert!(!classic.contains("# EOF"), "{classic}");
        // Datagram refusals are not connection refusals.
        assert!(
            !classic.contains("multiecho_connections_refused_total{reason=\"udp-"),
            "{classic}"
        );
    }
}
