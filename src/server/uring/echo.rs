//! A connection's echo state machine as the worker sees it: plain ([`Connection`]) or through
//! TLS ([`TlsConnection`], boxed so a plain slot stays small). Both take the same completions
//! and return the same [`Action`]s; this enum only dispatches.

use std::time::{Duration, Instant};

use super::buffers::Buffers;
use super::connection::{Action, Connection, Ended, RecvResult, ServerEnd};
use super::tls_connection::TlsConnection;
use crate::server::conn::proxy::ProxyHeader;

#[derive(Debug)]
pub enum Echo {
    Plain(Connection),
    Tls(Box<TlsConnection>),
}

impl Echo {
    /// A recv completed; returns how many of the client's bytes to count as they arrive (a TLS
    /// connection counts its plaintext when it ends). `admit`: see [`Connection::received`].
    #[allow(clippy::too_many_arguments)]
    pub fn received(
        &mut self,
        recv: RecvResult,
        multishot: bool,
        buffers: &impl Buffers,
        scratch: &mut [u8],
        now: Instant,
        out: &mut Vec<Action>,
        admit: impl FnOnce(&ProxyHeader) -> bool,
    ) -> usize {
        match self {
            Echo::Plain(c) => c.received(recv, multishot, buffers, now, out, admit),
            Echo::Tls(c) => {
                c.received(recv, multishot, buffers, scratch, now, out, admit);
                0
            }
        }
    }

    /// A send completed; returns how many bytes to count as sent now (see `received`).
    pub fn sent(
        &mut self,
        result: i32,
        buffers: &impl Buffers,
        scratch: &mut [u8],
        now: Instant,
        out: &mut Vec<Action>,
    ) -> usize {
        match self {
            Echo::Plain(c) => {
                c.sent(result, buffers, now, out);
                result.max(0) as usize
            }
            Echo::Tls(c) => {
                c.sent(result, scratch, now, out);
                0
            }
        }
    }

    pub fn buffer_available(&mut self, scratch: &mut [u8], out: &mut Vec<Action>) -> bool {
        match self {
            Echo::Plain(c) => c.buffer_available(out),
            Echo::Tls(c) => c.buffer_available(scratch, out),
        }
    }

    pub fn end(&mut self, why: ServerEnd, scratch: &mut [u8], out: &mut Vec<Action>) {
        match self {
            Echo::Plain(c) => c.end(why, out),
            Echo::Tls(c) => c.end(why, scratch, out),
        }
    }

    pub fn sweep(
        &mut self,
        now: Instant,
        idle: Option<Duration>,
        scratch: &mut [u8],
        out: &mut Vec<Action>,
    ) {
        match self {
            Echo::Plain(c) => c.sweep(now, idle, out),
            Echo::Tls(c) => c.sweep(now, idle, scratch, out),
        }
    }

    pub fn own_unsent(&self) -> &[u8] {
        match self {
            Echo::Plain(c) => c.own_unsent(),
            Echo::Tls(c) => c.own_unsent(),
        }
    }

    pub fn take_end(&mut self) -> Ended {
        match self {
            Echo::Plain(c) => c.take_end(),
            Echo::Tls(c) => c.take_end(),
        }
    }

    /// Bytes echoed: plaintext for a TLS connection.
    pub fn bytes(&self) -> u64 {
        match self {
            Echo::Plain(c) => c.bytes(),
            Echo::Tls(c) => c.bytes(),
        }
    }

    pub fn in_flight(&self) -> bool {
        match self {
            Echo::Plain(c) => c.in_flight(),
            Echo::Tls(c) => c.in_flight(),
        }
    }

    /// Pool buffers held between completions.
    pub fn pool_held(&self) -> usize {
        match self {
            Echo::Plain(c) => c.pool_held(),
            // A TLS connection gives every buffer back in the step that received it.
            Echo::Tls(_) => 0,
        }
    }

    pub fn tls(&mut self) -> Option<&mut TlsConnection> {
        match self {
            Echo::Plain(_) => None,
            Echo::Tls(c) => Some(c),
        }
    }
}
