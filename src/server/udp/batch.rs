//! Datagrams received together (`recvmmsg`) and their echoes sent together (`sendmmsg`), with
//! nix's safe wrappers: one system call each way per batch instead of one per datagram.
//!
//! What batching must not change, and how this module keeps it:
//! - No datagram is echoed cut short: every slot holds the largest datagram there is
//!   ([`super::BUFFER_SIZE`]), and each message's own `MSG_TRUNC` flag is checked anyway.
//! - The one UDP policy ([`Lifecycle::admit_datagram`]: truncation, loop guard, allow/deny,
//!   `--udp-rate`) decides for every message of a batch on its own; only the admitted ones are
//!   queued as echoes, in the order they arrived.
//! - `sendmmsg` may send fewer than it was given (a full send buffer, a signal, or an error on
//!   message *k*, which the kernel reports as "k sent" and then, on the next call, as the
//!   error). [`Batch::send`] resumes from the first unsent echo; an echo that fails on its
//!   own is counted as not sent and skipped, as a single `sendto` error was before.
//!
//! A batch belongs to one socket: the kernel rewrites each header's address length on receive,
//! so headers shared between an IPv4 and an IPv6 socket could cut an IPv6 source short.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};

use super::{socket_addr, Received, BUFFER_SIZE};
use crate::server::conn::Lifecycle;

/// Datagrams one `recvmmsg` takes at most (the C batching prototype's figure). The slots are
/// allocated zeroed and so untouched until used: a batch of small datagrams costs a page each.
pub const BATCH_SLOTS: usize = 64;

/// An echo waiting to be sent: which slot holds it, how long it is, where it goes.
#[derive(Debug, Clone, Copy)]
struct Echo {
    slot: usize,
    len: usize,
}

/// The receive slots, the message headers of both directions and the echoes not yet sent.
pub struct Batch {
    slot_len: usize,
    buffers: Vec<u8>,
    /// Headers for `recvmmsg`. Separate from `send_headers`: `sendmmsg` points its headers'
    /// addresses at the caller's array, which a later receive must never write through.
    recv_headers: MultiHeaders<SockaddrStorage>,
    send_headers: MultiHeaders<SockaddrStorage>,
    /// The admitted datagrams of the last receive, in arrival order...
    echoes: Vec<Echo>,
    /// ...and their destinations (a separate array: `sendmmsg` takes a slice of them).
    destinations: Vec<Option<SockaddrStorage>>,
    /// How many of `echoes` are done (sent, or failed and counted).
    done: usize,
}

// SAFETY: the raw pointers inside nix's `MultiHeaders` point only into allocations the batch
// owns (its address arrays) or into buffers borrowed for the duration of one recvmmsg or
// sendmmsg call made through `&mut self`; between calls nothing dereferences them. Nothing is
// shared, so the batch may move to another thread (a tokio task does, between polls).
unsafe impl Send for Batch {}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("slots", &self.slots())
            .field("slot_len", &self.slot_len)
            .field("pending", &self.pending())
            .finish()
    }
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new(BATCH_SLOTS, BUFFER_SIZE)
    }
}

impl Batch {
    /// A batch of `slots` datagrams of at most `slot_len` bytes each. Servers use
    /// [`Batch::default`]; a smaller `slot_len` lets a test see truncation really happen.
    pub fn new(slots: usize, slot_len: usize) -> Batch {
        let slots = slots.max(1);
        Batch {
            slot_len,
            buffers: vec![0u8; slots * slot_len],
            recv_headers: MultiHeaders::preallocate(slots, None),
            send_headers: MultiHeaders::preallocate(slots, None),
            echoes: Vec::with_capacity(slots),
            destinations: Vec::with_capacity(slots),
            done: 0,
        }
    }

    /// How many datagrams one receive takes at most. A receive that took fewer found the
    /// queue empty (`recvmmsg` stops at the first `EAGAIN`).
    pub fn slots(&self) -> usize {
        self.buffers.len() / self.slot_len.max(1)
    }

    /// Echoes received but not yet sent (a full send buffer left them).
    pub fn pending(&self) -> usize {
        self.echoes.len() - self.done
    }

    /// Receives what is queued on `socket` (up to the batch's slots, without blocking) and
    /// runs every datagram through the policy, queueing the admitted ones as echoes. Returns
    /// how many datagrams were received; `WouldBlock` when none was queued, `Interrupted` when
    /// a signal came first. Call only when nothing is pending: the slots are reused.
    pub fn receive(&mut self, socket: BorrowedFd<'_>, lifecycle: &Lifecycle) -> io::Result<usize> {
        debug_assert_eq!(self.pending(), 0, "receive over unsent echoes");
        self.echoes.clear();
        self.destinations.clear();
        self.done = 0;
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .buffers
            .chunks_mut(self.slot_len.max(1))
            .map(|slot| [IoSliceMut::new(slot)])
            .collect();
        // EINTR comes back as `Interrupted`, which the loops treat as transient and retry.
        let received = recvmmsg(
            socket.as_raw_fd(),
            &mut self.recv_headers,
            &mut iovs,
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        let mut count = 0;
        for (slot, message) in received.enumerate() {
            count += 1;
            let Some((raw, source)) = message
                .address
                .and_then(|raw| socket_addr(&raw).map(|source| (raw, source)))
            else {
                continue; // a UDP socket always names the source; nothing to answer otherwise
            };
            let truncated = message.flags.contains(MsgFlags::MSG_TRUNC);
            let received = Received {
                len: message.bytes,
                source,
                truncated,
            };
            if lifecycle.admit_datagram(&received) {
                self.echoes.push(Echo {
                    slot,
                    len: message.bytes,
                });
                self.destinations.push(Some(raw));
            }
        }
        Ok(count)
    }

    /// Sends the pending echoes, as many system calls as it takes, resuming after a partial
    /// send. Each echo sent is counted; one the kernel refuses on its own (for example an
    /// unreachable destination) is counted as not sent and skipped. Returns `Ok` when nothing
    /// is pending, `WouldBlock` (on a non-blocking socket or with `MSG_DONTWAIT` in `flags`)
    /// when the send buffer is full: call again when the socket is writable.
    pub fn send(
        &mut self,
        socket: BorrowedFd<'_>,
        flags: MsgFlags,
        lifecycle: &Lifecycle,
    ) -> io::Result<()> {
        while self.done < self.echoes.len() {
            let slot_len = self.slot_len;
            let iovs: Vec<[IoSlice<'_>; 1]> = self.echoes[self.done..]
                .iter()
                .map(|echo| {
                    let start = echo.slot * slot_len;
                    [IoSlice::new(&self.buffers[start..start + echo.len])]
                })
                .collect();
            let no_control: [ControlMessage<'_>; 0] = [];
            let outcome = sendmmsg(
                socket.as_raw_fd(),
                &mut self.send_headers,
                &iovs,
                &self.destinations[self.done..],
                no_control,
                flags,
            )
            // Counting the results walks nix's per-message view; a send fills no address.
            .map(|results| results.count());
            match outcome {
                Ok(sent) => {
                    for echo in &self.echoes[self.done..self.done + sent] {
                        lifecycle.datagram_echoed(echo.len);
                    }
                    self.done += sent;
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(e) => {
                    // The first unsent echo failed on its own: count it and go on with the rest.
                    if let Some(Some(dest)) = self.destinations.get(self.done) {
                        let dest = socket_addr(dest).unwrap_or(SocketAddr::from(([0; 4], 0)));
                        lifecycle.datagram_send_failed(dest, &io::Error::from(e));
                    }
                    self.done += 1;
                }
            }
        }
        Ok(())
    }

    /// Queues `data` as an echo to `dest`, as if it had been received and admitted (tests use
    /// it to put a destination the kernel refuses in the middle of a batch).
    #[cfg(test)]
    fn queue(&mut self, data: &[u8], dest: SocketAddr) {
        let slot = self.echoes.len();
        let start = slot * self.slot_len;
        self.buffers[start..start + data.len()].copy_from_slice(data);
        self.echoes.push(Echo {
            slot,
            len: data.len(),
        });
        self.destinations.push(Some(SockaddrStorage::from(dest)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::conn::admission::{AdmissionConfig, Refusal};
    use crate::server::conn::datagram::UdpPolicy;
    use crate::stats::Stats;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::sync::Arc;
    use std::time::Duration;

    fn lifecycle(config: AdmissionConfig) -> Lifecycle {
        Lifecycle::new(&config, Arc::new(Stats::new().unwrap())).unwrap()
    }

    fn no_limits() -> Lifecycle {
        lifecycle(AdmissionConfig {
            udp: Some(UdpPolicy {
                rate: None,
                any_port: false,
            }),
            ..AdmissionConfig::default()
        })
    }

    fn socket(ip: &str) -> UdpSocket {
        let socket = UdpSocket::bind((ip, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        socket
    }

    /// Everything `socket` receives until it has been quiet for the read timeout.
    fn drain(socket: &UdpSocket) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; BUFFER_SIZE];
        while let Ok(n) = socket.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    /// Waits until `count` datagrams are queued on `server`, so that one receive takes them
    /// all (loopback delivers at once, but the sender may run on another CPU).
    fn receive_all(batch: &mut Batch, server: &UdpSocket, life: &Lifecycle, count: usize) {
        let mut got = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while got < count && std::time::Instant::now() < deadline {
            crate::wake::poll_readable(&[server.as_fd()], Some(Duration::from_millis(100)))
                .unwrap();
            // Each receive reuses the slots, so send what one took before the next.
            match batch.receive(server.as_fd(), life) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("receive: {e}"),
            }
            batch.send(server.as_fd(), MsgFlags::empty(), life).unwrap();
        }
        assert_eq!(got, count, "datagrams received");
    }

    #[test]
    fn a_truncated_datagram_is_refused_and_its_neighbours_are_echoed() {
        let server = socket("127.0.0.1");
        let client = socket("127.0.0.1");
        let life = no_limits();
        // Slots of 100 bytes: the kernel really truncates the 200-byte datagram.
        let mut batch = Batch::new(8, 100);
        let sent: [&[u8]; 3] = [&[1; 50], &[2; 200], &[3; 100]];
        for datagram in sent {
            client
                .send_to(datagram, server.local_addr().unwrap())
                .unwrap();
        }
        receive_all(&mut batch, &server, &life, 3);
        assert_eq!(drain(&client), vec![vec![1; 50], vec![3; 100]]);
        assert_eq!(
            life.stats().datagrams_refused(Refusal::DatagramTruncated),
            1
        );
        assert_eq!(life.stats().datagrams_echoed(), 2);
    }

    #[test]
    fn the_policy_decides_for_every_message_of_a_batch() {
        // 127.0.0.2 is denied; 127.0.0.1 may have 3 echoes (the bucket's burst).
        let life = lifecycle(AdmissionConfig {
            deny: vec!["127.0.0.2/32".parse().unwrap()],
            udp: Some(UdpPolicy {
                rate: Some(3),
                any_port: false,
            }),
            ..AdmissionConfig::default()
        });
        let server = socket("127.0.0.1");
        let allowed = socket("127.0.0.1");
        let denied = socket("127.0.0.2");
        let to = server.local_addr().unwrap();
        for seq in 0..5u8 {
            allowed.send_to(&[b'a', seq], to).unwrap();
            denied.send_to(&[b'd', seq], to).unwrap();
        }
        let mut batch = Batch::new(16, BUFFER_SIZE);
        // Loopback delivers a datagram into the receiver's queue during the sender's
        // send_to, so all ten are queued now and one receive takes them together.
        assert_eq!(
            batch.receive(server.as_fd(), &life).unwrap(),
            10,
            "one batch"
        );
        batch
            .send(server.as_fd(), MsgFlags::empty(), &life)
            .unwrap();
        let echoes = drain(&allowed);
        assert_eq!(echoes, vec![vec![b'a', 0], vec![b'a', 1], vec![b'a', 2]]);
        assert!(drain(&denied).is_empty(), "the denied source got a reply");
        assert_eq!(life.stats().datagrams_refused(Refusal::Denied), 5);
        assert_eq!(life.stats().datagrams_refused(Refusal::DatagramRate), 2);
    }

    #[test]
    fn a_partial_send_resumes_after_the_echo_the_kernel_refused() {
        let server = socket("127.0.0.1");
        let client = socket("127.0.0.1");
        let life = no_limits();
        let mut batch = Batch::new(8, 1024);
        let to = client.local_addr().unwrap();
        // Port 0 is no destination (EINVAL): sendmmsg sends the first two, reports "2", and
        // the next call fails on the third.
        batch.queue(b"one", to);
        batch.queue(b"two", to);
        batch.queue(b"nowhere", SocketAddr::from(([127, 0, 0, 1], 0)));
        batch.queue(b"three", to);
        batch.queue(b"four", to);
        batch
            .send(server.as_fd(), MsgFlags::empty(), &life)
            .unwrap();
        assert_eq!(batch.pending(), 0);
        let got = drain(&client);
        assert_eq!(
            got,
            [&b"one"[..], b"two", b"three", b"four"].map(<[u8]>::to_vec)
        );
        assert_eq!(life.stats().datagrams_echoed(), 4);
        assert_eq!(life.stats().datagram_send_errors(), 1);
    }
}
