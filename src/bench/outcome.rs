//! What a run found: the figures one thread measured (merged across threads afterwards), and
//! the failures, each with the connection and the byte offset in its echo stream where
//! things went wrong.

use std::time::Instant;

use hdrhistogram::Histogram;

/// Why a connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// An echoed byte differs from what was sent.
    Mismatch,
    /// The server sent more bytes than were sent to it.
    Excess,
    /// The server closed the connection while echoes were owed.
    Eof,
    /// The connection was reset.
    Reset,
    /// Another I/O error.
    Io,
    /// Echoes stopped coming back.
    Timeout,
}

/// One failed connection, with where in its echo stream things went wrong.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub connection: u64,
    /// Offset in the connection's echo stream of the first wrong or missing byte.
    pub offset: u64,
    /// Sequence number of the message that offset belongs to.
    pub message: u64,
    /// Offset of that byte in its message.
    pub message_offset: usize,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connection {} at byte offset {} (message {}, offset {}): {}",
            self.connection, self.offset, self.message, self.message_offset, self.detail
        )
    }
}

/// What one `--interval` of the measured window saw.
pub struct IntervalOutcome {
    pub requests: u64,
    pub bytes: u64,
    pub latency_ns: Histogram<u64>,
}

impl IntervalOutcome {
    fn new() -> Self {
        IntervalOutcome {
            requests: 0,
            bytes: 0,
            // Auto-resizing: most intervals see a narrow range, and there may be many.
            latency_ns: Histogram::new(3).expect("valid histogram precision"),
        }
    }
}

/// What one thread measured.
pub struct Outcome {
    /// Latency of each measured round trip; in the open loop from when it was due.
    pub latency_ns: Histogram<u64>,
    /// Open loop: latency from when each request was actually sent (what coordinated
    /// omission would report). In the closed loop the same as `latency_ns`.
    pub uncorrected_ns: Histogram<u64>,
    /// How long each successful connect took.
    pub connect_ns: Histogram<u64>,
    /// Connections opened during the measured window (churn).
    pub opened_measured: u64,
    /// Per `--interval` figures, by interval index.
    pub intervals: Vec<IntervalOutcome>,
    pub requests: u64,
    pub bytes: u64,
    pub opened: u64,
    pub connect_failures: u64,
    pub first_connect_error: Option<String>,
    pub errors: u64,
    pub mismatches: u64,
    pub failures: Vec<Failure>,
    /// When the last measured round trip completed.
    pub last_completion: Option<Instant>,
    /// Open loop: requests that fell due but were never sent because every connection
    /// still waited for its echoes (the server could not keep up with the rate).
    pub backlog: u64,
    /// tls:// targets: the handshakes.
    pub tls: Option<TlsOutcome>,
}

/// The TLS handshakes one thread completed.
pub struct TlsOutcome {
    /// From the TCP connection being established to the handshake being complete.
    pub handshake_ns: Histogram<u64>,
    pub handshakes: u64,
    /// Handshakes completed in the measured window.
    pub handshakes_measured: u64,
}

impl TlsOutcome {
    pub fn new() -> Self {
        TlsOutcome {
            handshake_ns: super::histogram::new_latency(),
            handshakes: 0,
            handshakes_measured: 0,
        }
    }
}

impl Default for TlsOutcome {
    fn default() -> Self {
        Self::new()
    }
}

impl Outcome {
    /// Nothing measured yet: what a thread starts from, and what threads merge into.
    pub(crate) fn new() -> Self {
        Outcome {
            latency_ns: super::histogram::new_latency(),
            uncorrected_ns: super::histogram::new_latency(),
            connect_ns: super::histogram::new_latency(),
            opened_measured: 0,
            intervals: Vec::new(),
            requests: 0,
            bytes: 0,
            opened: 0,
            connect_failures: 0,
            first_connect_error: None,
            errors: 0,
            mismatches: 0,
            failures: Vec::new(),
            last_completion: None,
            backlog: 0,
            tls: None,
        }
    }

    /// Adds another thread's figures to these.
    pub fn merge(&mut self, other: Outcome) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency_ns.add(&other.latency_ns);
        let _ = self.uncorrected_ns.add(&other.uncorrected_ns);
        let _ = self.connect_ns.add(&other.connect_ns);
        self.opened_measured += other.opened_measured;
        for (i, interval) in other.intervals.into_iter().enumerate() {
            let mine = self.interval(i);
            mine.requests += interval.requests;
            mine.bytes += interval.bytes;
            let _ = mine.latency_ns.add(&interval.latency_ns);
        }
        self.requests += other.requests;
        self.bytes += other.bytes;
        self.opened += other.opened;
        self.connect_failures += other.connect_failures;
        if self.first_connect_error.is_none() {
            self.first_connect_error = other.first_connect_error;
        }
        self.errors += other.errors;
        self.mismatches += other.mismatches;
        self.failures.extend(other.failures);
        self.last_completion = self.last_completion.max(other.last_completion);
        self.backlog += other.backlog;
        if let Some(theirs) = other.tls {
            let mine = self.tls.get_or_insert_with(TlsOutcome::new);
            let _ = mine.handshake_ns.add(&theirs.handshake_ns);
            mine.handshakes += theirs.handshakes;
            mine.handshakes_measured += theirs.handshakes_measured;
        }
    }

    /// The figures of interval `index`, created (with those before it) if need be.
    pub fn interval(&mut self, index: usize) -> &mut IntervalOutcome {
        while self.intervals.len() <= index {
            self.intervals.push(IntervalOutcome::new());
        }
        &mut self.intervals[index]
    }
}
