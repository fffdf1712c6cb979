//! The one connection lifecycle every model calls, so that a model file holds only what makes
//! the model different.
//!
//! For every stream a model accepts, in this order:
//! 1. a [`limit::Permit`] under `--max-conns`, taken *before* `accept()` (beyond the limit,
//!    clients wait in the backlog);
//! 2. [`Lifecycle::configure`]: the socket options every accepted stream gets;
//! 3. on a `+proxy` listener, [`Lifecycle::check_proxy_peer`] and then the PROXY header
//!    ([`proxy`]), whose address becomes the connection's peer;
//! 4. [`Lifecycle::admit`]: allow/deny, per-source and rate rules on the peer, decided before
//!    the model spends anything more on it; a refusal is counted and logged (at most once per
//!    source per [`REFUSAL_LOG_INTERVAL`]) and the model just drops the stream;
//! 5. echo, counting bytes as they flow ([`Lifecycle::received`] after each read,
//!    [`Lifecycle::sent`] after each write: a scrape during a long connection sees them; each
//!    count is a relaxed add to the thread's own counter block, see [`crate::stats`]); then
//!    [`Lifecycle::close`] with the [`End`]: the per-connection log line, the counters, the
//!    per-source slot given back.
//!
//! For every datagram on a UDP listener: [`Lifecycle::admit_datagram`] (counted as received;
//! the loop guard, the same allow/deny rules, the per-source `--udp-rate`; see `datagram`),
//! then [`Lifecycle::datagram_echoed`] or [`Lifecycle::datagram_send_failed`]. Every datagram
//! count is in the shared counters too, so the fork models' workers count where the parent and
//! the metrics process read.
//!
//! Around them: [`Lifecycle::accept_error`] (one classification and one rate-limited warning for
//! running out of descriptors), [`Lifecycle::log_draining`] and [`Lifecycle::log_deadline`] (the
//! shutdown lines, once per server). Per-source state lives in memory mapped shared before any
//! fork, so the fork models obey the same rules (`sources`).

pub mod admission;
pub mod datagram;
pub mod limit;
pub mod proxy;
pub(crate) mod shared_mem;
pub mod sources;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::net::{classify_accept_error, AcceptError};
use crate::stats::{EndKind, Stats};
use admission::{Admission, AdmissionConfig, Refusal};
use sources::Slot;

/// A refused source is logged at most once per this interval, so a scanner cannot flood the log.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// After a warning that accept ran out of descriptors or memory, the next one waits this long.
pub const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Why a connection ended: the `end` field of every model's close line.
#[derive(Debug)]
pub enum End {
    /// The client closed (or half-closed) and got every byte back.
    ClientClosed,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// Still open when the server closed it (the shutdown deadline, or a server error).
    Shutdown,
    /// The connection failed (for example reset by the client).
    Failed(io::Error),
    /// TLS: the client closed the TCP connection without a close_notify first, so it cannot
    /// be told apart from an attacker cutting the stream (everything received was echoed).
    Truncated,
    /// TLS: the handshake failed; nothing was echoed.
    Handshake(crate::tls::HandshakeError),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client closed"),
            End::IdleTimeout => f.write_str("idle timeout"),
            End::Shutdown => f.write_str("closed at shutdown"),
            End::Failed(e) => write!(f, "error: {e}"),
            End::Truncated => f.write_str("truncated (TCP closed without TLS close_notify)"),
            End::Handshake(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Failed(e)
    }
}

/// A connection that was admitted: who it is for, since when, and its per-source slot.
#[derive(Debug)]
pub struct Admitted {
    pub peer: SocketAddr,
    pub started: Instant,
    slot: Option<Slot>,
}

impl Admitted {
    /// Splits off the per-source slot, for a model whose connection is served by another
    /// process (process): the accepting parent keeps the slot and gives it back when the
    /// child is reaped, however the child ended.
    pub fn take_slot(&mut self) -> Option<Slot> {
        self.slot.take()
    }
}

/// The lifecycle policy of one server, shared by all its workers (and, through memory mapped
/// before the fork, by its processes).
#[derive(Debug)]
pub struct Lifecycle {
    admission: Admission,
    stats: Arc<Stats>,
    proxy_timeout: Duration,
    epoch: Instant,
    /// When accept last warned about exhaustion, in ms since `epoch` plus one (0: never).
    accept_warned_at: AtomicU64,
    draining_logged: AtomicBool,
    /// Set when the shutdown deadline closes the connections still live: their ends are the
    /// server's doing, whatever the echo loop saw (a blocked read returns end of stream).
    deadline_passed: Arc<AtomicBool>,
    /// The datagram rules (`None`: no UDP listener).
    udp: Option<datagram::UdpPolicy>,
}

impl Lifecycle {
    /// The policy for `config`, counting into `stats`.
    pub fn new(config: &AdmissionConfig, stats: Arc<Stats>) -> io::Result<Self> {
        Ok(Lifecycle {
            admission: Admission::new(config)?,
            stats,
            proxy_timeout: config.proxy_timeout,
            epoch: Instant::now(),
            accept_warned_at: AtomicU64::new(0),
            draining_logged: AtomicBool::new(false),
            deadline_passed: Arc::new(AtomicBool::new(false)),
            udp: config.udp,
        })
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// How long a PROXY listener waits for a connection's header.
    pub fn proxy_timeout(&self) -> Duration {
        self.proxy_timeout
    }

    /// The options every accepted stream gets: no Nagle delay, so small echoes go out at once.
    pub fn configure(&self, stream: &impl AsFd, peer: SocketAddr) {
        if let Err(e) = SockRef::from(stream).set_nodelay(true) {
            tracing::debug!(%peer, "cannot set TCP_NODELAY: {e}");
        }
    }

    /// Serve or refuse a new connection from `peer` (for a PROXY listener: the header's
    /// client) that arrived on listener number `listener` (its index in `--listen` order). On
    /// success the connection is counted as open; on refusal it is counted and logged, and the
    /// caller closes it without an echo.
    pub fn admit(&self, listener: usize, peer: SocketAddr) -> Result<Admitted, Refusal> {
        match self.admission.admit(canonical_ip(peer)) {
            Ok(slot) => {
                self.stats.connection_opened(listener);
                tracing::debug!(%peer, "connection accepted");
                Ok(Admitted {
                    peer,
                    started: Instant::now(),
                    slot,
                })
            }
            Err(reason) => {
                self.refuse(peer, reason);
                Err(reason)
            }
        }
    }

    /// Counts and (rate-limited) logs a refusal decided outside [`Lifecycle::admit`] (a bad
    /// PROXY header, an untrusted proxy).
    pub fn refuse(&self, peer: SocketAddr, reason: Refusal) {
        self.refuse_because(peer, reason, None);
    }

    /// [`Lifecycle::refuse`] with the detail that explains it (a PROXY header fault).
    pub fn refuse_because(
        &self,
        peer: SocketAddr,
        reason: Refusal,
        detail: Option<&dyn fmt::Display>,
    ) {
        // A header wait that the deadline cut short: the blocking models read their own
        // shutdown of the socket as the proxy's end of stream; say what it was, as the event
        // models do.
        let at_shutdown = format_args!("{} before the PROXY header", End::Shutdown);
        let detail =
            if reason == Refusal::ProxyHeader && self.deadline_passed.load(Ordering::SeqCst) {
                Some(&at_shutdown as &dyn fmt::Display)
            } else {
                detail
            };
        self.stats.connection_refused(reason);
        if self
            .admission
            .should_log(canonical_ip(peer), REFUSAL_LOG_INTERVAL)
        {
            match detail {
                Some(detail) => {
                    // A detail is prose (a parser's error); `?` of its text quotes it.
                    tracing::info!(%peer, reason = %reason, detail = ?detail.to_string(), "connection refused")
                }
                None => tracing::info!(%peer, reason = %reason, "connection refused"),
            }
        }
    }

    /// A `+proxy` connection's header arrived: its client (or, for `LOCAL` and `UNKNOWN`
    /// headers, the proxy itself) is admitted as the connection's peer.
    pub fn admit_proxied(
        &self,
        listener: usize,
        proxy: SocketAddr,
        header: &proxy::ProxyHeader,
    ) -> Result<Admitted, Refusal> {
        self.admit(listener, header.source.unwrap_or(proxy))
    }

    /// On a `+proxy` listener: whether the TCP peer may send a PROXY header; an untrusted one is
    /// refused (counted, logged) and must be closed.
    pub fn check_proxy_peer(&self, peer: SocketAddr) -> Result<(), Refusal> {
        if self.admission.is_trusted_proxy(canonical_ip(peer)) {
            Ok(())
        } else {
            self.refuse(peer, Refusal::UntrustedProxy);
            Err(Refusal::UntrustedProxy)
        }
    }

    /// Counts `n` bytes just read from a connection.
    #[inline]
    pub fn received(&self, n: usize) {
        self.stats.bytes_received(n as u64);
    }

    /// Counts `n` bytes of echo the kernel just took for a connection.
    #[inline]
    pub fn sent(&self, n: usize) {
        self.stats.bytes_sent(n as u64);
    }

    /// Counts `n` bytes just read from a connection and written back in full.
    #[inline]
    pub fn echoed(&self, n: usize) {
        self.stats.bytes_echoed(n as u64);
    }

    /// The end of an admitted connection that echoed `bytes` (for its log line: the counters
    /// were fed as the bytes flowed): its one info line, the counters, its slot back.
    pub fn close(&self, admitted: Admitted, bytes: u64, end: &End) {
        // A connection that ended after the deadline shut it down was closed by the server; a
        // handshake it cut short is not the client's failure either.
        let end = match end {
            End::ClientClosed
            | End::Failed(_)
            | End::Truncated
            | End::IdleTimeout
            | End::Handshake(_)
                if self.deadline_passed.load(Ordering::SeqCst) =>
            {
                &End::Shutdown
            }
            end => end,
        };
        if let End::Handshake(e) = end {
            self.stats.tls_handshake_failed(e.reason);
        }
        if let Some(slot) = admitted.slot {
            self.admission.release(slot);
        }
        self.stats.connection_closed(EndKind::of(end));
        tracing::info!(
            peer = %admitted.peer,
            bytes,
            duration = ?admitted.started.elapsed(),
            // Debug of the text quotes it: `end="client closed"` stays one key=value.
            end = ?end.to_string(),
            "connection closed"
        );
    }

    /// A TLS handshake completed (a failed one is counted by closing the connection with
    /// [`End::Handshake`]).
    pub fn handshake_completed(&self, peer: SocketAddr) {
        self.stats.tls_handshake_completed();
        tracing::debug!(%peer, "TLS handshake completed");
    }

    /// Gives back a slot split off with [`Admitted::take_slot`].
    pub fn release_slot(&self, slot: Slot) {
        self.admission.release(slot);
    }

    /// Open connections counted for `ip` by the per-source rules.
    pub fn active_from(&self, ip: IpAddr) -> u32 {
        self.admission.active(ip)
    }

    /// Classifies an `accept()` error by the rules every model follows, and warns when accept
    /// runs out of descriptors or memory: once, and again only after
    /// [`ACCEPT_WARNING_INTERVAL`], however many workers see it.
    pub fn accept_error(&self, err: &io::Error) -> AcceptError {
        let kind = classify_accept_error(err);
        self.stats.accept_error(kind);
        if kind == AcceptError::Exhausted {
            let now = self.epoch.elapsed().as_millis() as u64 + 1;
            let last = self.accept_warned_at.load(Ordering::Relaxed);
            let quiet = ACCEPT_WARNING_INTERVAL.as_millis() as u64;
            if (last == 0 || now.saturating_sub(last) >= quiet)
                && self
                    .accept_warned_at
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    "accept failed: {err}; backing off for {:?} and retrying",
                    crate::net::ACCEPT_BACKOFF
                );
            }
        }
        kind
    }

    /// The line a server logs when it notices shutdown: once per server, whichever worker
    /// notices first.
    pub fn log_draining(&self, live: usize, timeout: Duration) {
        if !self.draining_logged.swap(true, Ordering::Relaxed) {
            tracing::info!(
                live,
                timeout = ?timeout,
                "shutting down: stopped accepting, letting live connections finish"
            );
        }
    }

    /// The line for connections still open at the shutdown deadline.
    /// Call before closing the connections still live at the shutdown deadline, so that their
    /// close lines say the server closed them (`end="closed at shutdown"`), not the client.
    pub fn mark_deadline_passed(&self) {
        self.deadline_passed.store(true, Ordering::SeqCst);
    }

    /// The flag [`Lifecycle::mark_deadline_passed`] sets, for a signal handler to set (a fork
    /// model's child, whose deadline is a timer): storing to an atomic is async-signal-safe.
    pub fn deadline_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.deadline_passed)
    }

    pub fn log_deadline(&self, closed: usize) {
        if closed > 0 {
            tracing::info!(
                closed,
                "shutdown timeout reached; closed remaining connections"
            );
        }
    }
}

/// The address rules see: an IPv4-mapped IPv6 peer is its IPv4 address.
fn canonical_ip(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}
