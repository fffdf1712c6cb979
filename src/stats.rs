//! Counters that every model updates cheaply and that the server reports (its stop line, the
//! `--metrics` endpoint): connections, the bytes they carry (counted as they flow, so a scrape
//! during a long connection sees them), refusals, accept errors, and the UDP side's datagrams.
//!
//! The counters live in memory mapped shared (`MAP_SHARED | MAP_ANONYMOUS`) when the server is
//! set up, before any fork, so the children of the process and prefork models count into the
//! same memory their parent (and the metrics process) reads. To keep the echo path free of
//! locks and of shared cache lines, the mapping holds [`SLOTS`] counter blocks, each on its own
//! cache lines: every thread (and every forked process) counts into one block of its own with
//! relaxed atomic adds, and a reader sums the blocks. A thread takes its block on first use;
//! a forked child gives up its parent's block (a `pthread_atfork` handler) and takes the next.
//! With more than [`SLOTS`] counting threads or processes, blocks are shared (still exact:
//! every update is an atomic add). This file holds all of the counters' `unsafe`.

use std::cell::Cell;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use crate::net::AcceptError;
use crate::server::conn::admission::Refusal;
use crate::server::conn::End;
use crate::tls::HandshakeFailure;

/// Counter blocks in one mapping: more than the threads or processes that count at once in
/// any model's default configuration on a large machine.
pub const SLOTS: usize = 256;
/// Listeners counted separately; connections on further listeners count under the last one.
pub const MAX_LISTENERS: usize = 32;

/// Why a connection ended, as a counter label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndKind {
    ClientClosed,
    IdleTimeout,
    Shutdown,
    Error,
    /// TLS: TCP closed without close_notify.
    Truncated,
    /// TLS: the handshake failed.
    TlsHandshake,
}

impl EndKind {
    /// Every kind, in counter order.
    pub const ALL: [EndKind; 6] = [
        EndKind::ClientClosed,
        EndKind::IdleTimeout,
        EndKind::Shutdown,
        EndKind::Error,
        EndKind::Truncated,
        EndKind::TlsHandshake,
    ];

    /// The kind of `end`.
    pub fn of(end: &End) -> Self {
        match end {
            End::ClientClosed => EndKind::ClientClosed,
            End::IdleTimeout => EndKind::IdleTimeout,
            End::Shutdown => EndKind::Shutdown,
            End::Failed(_) => EndKind::Error,
            End::Truncated => EndKind::Truncated,
            End::Handshake(_) => EndKind::TlsHandshake,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            EndKind::ClientClosed => "client_closed",
            EndKind::IdleTimeout => "idle_timeout",
            EndKind::Shutdown => "shutdown",
            EndKind::Error => "error",
            EndKind::Truncated => "truncated",
            EndKind::TlsHandshake => "tls_handshake_failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The `accept()` errors that are counted (a would-block is not an error, and a listener
/// closed by shutdown is the normal way out).
pub const ACCEPT_ERROR_KINDS: [AcceptError; 3] = [
    AcceptError::Retry,
    AcceptError::Exhausted,
    AcceptError::Fatal,
];

/// The label of a counted accept error kind.
pub fn accept_error_label(kind: AcceptError) -> &'static str {
    match kind {
        AcceptError::Retry => "retry",
        AcceptError::Exhausted => "exhausted",
        AcceptError::Fatal => "fatal",
        AcceptError::WouldBlock => "would_block",
        AcceptError::Closed => "closed",
    }
}

fn accept_error_index(kind: AcceptError) -> Option<usize> {
    ACCEPT_ERROR_KINDS.iter().position(|k| *k == kind)
}

/// One thread's (or process's) counters, on cache lines of its own.
#[repr(C, align(128))]
struct Block {
    accepted: [AtomicU64; MAX_LISTENERS],
    closed: [AtomicU64; EndKind::ALL.len()],
    received: AtomicU64,
    sent: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    accept_errors: [AtomicU64; ACCEPT_ERROR_KINDS.len()],
    datagrams_received: AtomicU64,
    datagram_bytes_received: AtomicU64,
    datagrams_echoed: AtomicU64,
    datagram_bytes_sent: AtomicU64,
    datagram_send_errors: AtomicU64,
    /// By [`Refusal::index`]; only [`Refusal::DATAGRAM`]'s reasons are ever counted.
    datagrams_refused: [AtomicU64; Refusal::ALL.len()],
    tls_handshakes: AtomicU64,
    tls_failed: [AtomicU64; HandshakeFailure::ALL.len()],
}

#[repr(C)]
struct Region {
    blocks: [Block; SLOTS],
    /// The next block handed out (modulo [`SLOTS`]); read and written only on first use.
    next_block: AtomicU64,
}

thread_local! {
    /// This thread's block index, or `usize::MAX` before its first count (and after a fork).
    static BLOCK: Cell<usize> = const { Cell::new(usize::MAX) };
}

static AT_FORK: Once = Once::new();

extern "C" fn forget_block_after_fork() {
    // The child's only thread is the one that forked: it counts into a block of its own.
    BLOCK.with(|b| b.set(usize::MAX));
}

/// Connection and byte counters of one server, shared by its threads and processes.
pub struct Stats {
    region: NonNull<Region>,
}

// SAFETY: the region is only reached through atomics, and lives until `Stats` is dropped.
unsafe impl Send for Stats {}
// SAFETY: as above.
unsafe impl Sync for Stats {}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("accepted", &self.accepted())
            .field("closed", &self.closed())
            .finish_non_exhaustive()
    }
}

impl Stats {
    /// Zeroed counters in a fresh shared mapping.
    pub fn new() -> io::Result<Self> {
        AT_FORK.call_once(|| {
            // SAFETY: registers a child handler that only writes this thread's `Cell`
            // (const-initialised, no destructor: no allocation, no lock).
            unsafe {
                libc::pthread_atfork(None, None, Some(forget_block_after_fork));
            }
        });
        // A fresh anonymous mapping is zero-filled and page-aligned: all-zero atomics are
        // valid zero counters, and a page is aligned for `Region`.
        let region =
            crate::server::conn::shared_mem::map_shared_zeroed(std::mem::size_of::<Region>())?
                .cast::<Region>();
        Ok(Stats { region })
    }

    fn region(&self) -> &Region {
        // SAFETY: the mapping is valid for the life of `self` and only holds atomics.
        unsafe { self.region.as_ref() }
    }

    /// This thread's block.
    fn mine(&self) -> &Block {
        let region = self.region();
        let index = BLOCK.with(|b| {
            if b.get() == usize::MAX {
                let next = region.next_block.fetch_add(1, Ordering::Relaxed) as usize;
                b.set(next % SLOTS);
            }
            b.get()
        });
        &region.blocks[index]
    }

    fn sum(&self, field: impl Fn(&Block) -> &AtomicU64) -> u64 {
        self.region()
            .blocks
            .iter()
            .map(|b| field(b).load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }

    /// Counts an admitted connection on listener `listener`.
    pub fn connection_opened(&self, listener: usize) {
        self.mine().accepted[listener.min(MAX_LISTENERS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts bytes as they arrive from a client (every model, after each read).
    #[inline]
    pub fn bytes_received(&self, n: u64) {
        self.mine().received.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts bytes as the kernel takes them for a client (every model, after each write).
    #[inline]
    pub fn bytes_sent(&self, n: u64) {
        self.mine().sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` bytes read and written back in full (one block look-up for both counts).
    #[inline]
    pub fn bytes_echoed(&self, n: u64) {
        let block = self.mine();
        block.received.fetch_add(n, Ordering::Relaxed);
        block.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a finished connection by how it ended (its bytes were counted as they flowed).
    pub fn connection_closed(&self, end: EndKind) {
        self.mine().closed[end.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a datagram received on a UDP listener (whatever the policy then decides).
    pub fn datagram_received(&self, len: u64) {
        let block = self.mine();
        block.datagrams_received.fetch_add(1, Ordering::Relaxed);
        block
            .datagram_bytes_received
            .fetch_add(len, Ordering::Relaxed);
    }

    /// Counts a datagram echoed in full.
    pub fn datagram_echoed(&self, len: u64) {
        let block = self.mine();
        block.datagrams_echoed.fetch_add(1, Ordering::Relaxed);
        block.datagram_bytes_sent.fetch_add(len, Ordering::Relaxed);
    }

    /// Counts an echo the kernel would not send.
    pub fn datagram_send_failed(&self) {
        self.mine()
            .datagram_send_errors
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a datagram the UDP policy refused, by reason.
    pub fn datagram_refused(&self, reason: Refusal) {
        self.mine().datagrams_refused[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Datagrams received so far (echoed, refused or not sent).
    pub fn datagrams_received(&self) -> u64 {
        self.sum(|b| &b.datagrams_received)
    }

    /// Bytes of the datagrams received so far.
    pub fn datagram_bytes_received(&self) -> u64 {
        self.sum(|b| &b.datagram_bytes_received)
    }

    /// Datagrams echoed in full so far.
    pub fn datagrams_echoed(&self) -> u64 {
        self.sum(|b| &b.datagrams_echoed)
    }

    /// Bytes of the datagrams echoed so far.
    pub fn datagram_bytes_sent(&self) -> u64 {
        self.sum(|b| &b.datagram_bytes_sent)
    }

    /// Echoes the kernel would not send.
    pub fn datagram_send_errors(&self) -> u64 {
        self.sum(|b| &b.datagram_send_errors)
    }

    /// Datagrams refused so far for `reason`.
    pub fn datagrams_refused(&self, reason: Refusal) -> u64 {
        self.sum(|b| &b.datagrams_refused[reason.index()])
    }

    /// Counts a connection that was not served, by reason.
    pub fn connection_refused(&self, reason: Refusal) {
        self.mine().refused[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an `accept()` error of `kind` (would-block and closed listeners are not counted).
    pub fn accept_error(&self, kind: AcceptError) {
        if let Some(i) = accept_error_index(kind) {
            self.mine().accept_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a completed TLS handshake.
    pub fn tls_handshake_completed(&self) {
        self.mine().tls_handshakes.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed TLS handshake, by reason.
    pub fn tls_handshake_failed(&self, reason: HandshakeFailure) {
        self.mine().tls_failed[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// TLS handshakes completed so far.
    pub fn tls_handshakes_completed(&self) -> u64 {
        self.sum(|b| &b.tls_handshakes)
    }

    /// TLS handshakes failed so far for `reason`.
    pub fn tls_handshakes_failed(&self, reason: HandshakeFailure) -> u64 {
        self.sum(|b| &b.tls_failed[reason.index()])
    }

    /// Connections (not datagrams) refused so far for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.sum(|b| &b.refused[reason.index()])
    }

    /// Connections admitted so far on listener `listener`.
    pub fn accepted_on(&self, listener: usize) -> u64 {
        self.sum(|b| &b.accepted[listener.min(MAX_LISTENERS - 1)])
    }

    /// Connections admitted so far, on every listener.
    pub fn accepted(&self) -> u64 {
        (0..MAX_LISTENERS).map(|l| self.accepted_on(l)).sum()
    }

    /// Connections that ended so far with `end`.
    pub fn closed_with(&self, end: EndKind) -> u64 {
        self.sum(|b| &b.closed[end.index()])
    }

    /// Connections that ended so far.
    pub fn closed(&self) -> u64 {
        EndKind::ALL.iter().map(|e| self.closed_with(*e)).sum()
    }

    /// Connections admitted and not yet ended.
    pub fn active(&self) -> u64 {
        // Blocks are read one after another: an open counted after its close was read would
        // show as negative for a moment.
        self.accepted().saturating_sub(self.closed())
    }

    /// `accept()` errors of `kind` so far.
    pub fn accept_errors(&self, kind: AcceptError) -> u64 {
        accept_error_index(kind).map_or(0, |i| self.sum(|b| &b.accept_errors[i]))
    }

    /// Bytes received from clients.
    pub fn received(&self) -> u64 {
        self.sum(|b| &b.received)
    }

    /// Bytes sent back to clients.
    pub fn sent(&self) -> u64 {
        self.sum(|b| &b.sent)
    }

    /// Bytes echoed (sent back) so far.
    pub fn bytes(&self) -> u64 {
        self.sent()
    }
}

impl Drop for Stats {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this size and nothing borrows it past
        // `self` (other processes hold their own mappings of it).
        unsafe {
            libc::munmap(self.region.as_ptr().cast(), std::mem::size_of::<Region>());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_sit_on_separate_cache_lines() {
        assert_eq!(std::mem::size_of::<Block>() % 128, 0);
        assert_eq!(std::mem::align_of::<Block>(), 128);
    }

    #[test]
    fn threads_count_into_their_own_blocks_and_sums_are_exact() {
        let stats = std::sync::Arc::new(Stats::new().unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let stats = std::sync::Arc::clone(&stats);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        stats.connection_opened(t % 2);
                        stats.bytes_received(3);
                        stats.bytes_sent(2);
                        stats.connection_closed(EndKind::ClientClosed);
                        stats.datagram_received(4);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(stats.accepted(), 4000);
        assert_eq!(stats.accepted_on(0), 2000);
        assert_eq!(stats.closed_with(EndKind::ClientClosed), 4000);
        assert_eq!(stats.received(), 12_000);
        assert_eq!(stats.sent(), 8000);
        assert_eq!(stats.active(), 0);
        assert_eq!(stats.datagrams_received(), 4000);
        assert_eq!(stats.datagram_bytes_received(), 16_000);
    }

    #[test]
    fn a_forked_child_counts_into_the_parents_mapping() {
        let stats = Stats::new().unwrap();
        stats.connection_opened(0);
        // SAFETY: the child only does atomic adds and `_exit`s.
        match unsafe { libc::fork() } {
            0 => {
                stats.bytes_sent(5);
                stats.datagram_echoed(9);
                stats.connection_closed(EndKind::IdleTimeout);
                // SAFETY: ends the child without running the test harness's teardown.
                unsafe { libc::_exit(0) }
            }
            pid if pid > 0 => {
                let mut status = 0;
                // SAFETY: waits for the child just forked.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert_eq!(stats.closed_with(EndKind::IdleTimeout), 1);
                assert_eq!(stats.sent(), 5);
                assert_eq!(stats.datagrams_echoed(), 1);
                assert_eq!(stats.datagram_bytes_sent(), 9);
            }
            _ => panic!("fork failed"),
        }
    }
}
