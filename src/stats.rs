//! Counters that every model updates cheaply (relaxed atomics) and that the server reports
//! when it stops.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::server::conn::admission::Refusal;

/// Connection and byte counters for one server process.
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    closed: AtomicU64,
    bytes: AtomicU64,
    /// Refused connections, by [`Refusal::index`].
    refused: [AtomicU64; Refusal::ALL.len()],
}

impl Stats {
    /// Counts an accepted connection.
    pub fn connection_opened(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a finished connection and the bytes it echoed.
    pub fn connection_closed(&self, bytes: u64) {
        self.closed.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts a connection that was not served, by reason.
    pub fn connection_refused(&self, reason: Refusal) {
        self.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections refused so far for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()].load(Ordering::Relaxed)
    }

    /// Connections finished so far.
    pub fn closed(&self) -> u64 {
        self.closed.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Bytes echoed by finished connections.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}
