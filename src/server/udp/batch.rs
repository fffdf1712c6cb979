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
//!
//! Segment trains (UDP GRO, [`Batch::with_gro`]): on a socket with `UDP_GRO` set, one message
//! may hold several datagrams of one sender back to back, all `gso_size` bytes (from the
//! `UDP_GRO` control message) but the last, which may be shorter. Each segment is one datagram
//! to the policy and the counters, exactly as if it had come alone; a run of consecutive
//! admitted segments of one message goes back as one message with a `UDP_SEGMENT` control
//! message of the same size, which the kernel cuts into the same datagrams again (the sender,
//! without `UDP_GRO`, receives them one by one). Never merged: a message whose control data
//! was cut short (`MSG_CTRUNC`) has lost its segment size, so it is refused, not echoed. If the
//! kernel refuses a `UDP_SEGMENT` send, the train is split into single datagrams and the batch
//! sends single datagrams from then on.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, RecvMsg,
    SockaddrStorage,
};

use super::{socket_addr, Received, BUFFER_SIZE};
use crate::server::conn::Lifecycle;

/// Datagrams one `recvmmsg` takes at most (the C batching prototype's figure). The slots are
/// allocated zeroed and so untouched until used: a batch of small datagrams costs a page each.
pub const BATCH_SLOTS: usize = 64;

/// An echo waiting to be sent: where its bytes start in the slots, how long it is, and whether
/// it is a train of datagrams.
#[derive(Debug, Clone, Copy)]
struct Echo {
    start: usize,
    len: usize,
    /// A train: `len` bytes of datagrams of this size (the last may be shorter), sent with
    /// `UDP_SEGMENT`. `None`: one datagram.
    segment: Option<u16>,
}

impl Echo {
    /// The datagrams this echo carries, as (start, length).
    fn datagrams(self) -> impl Iterator<Item = (usize, usize)> {
        let step = self.segment.map_or(self.len, usize::from).max(1);
        let end = self.start + self.len;
        // A zero-length datagram is still one datagram.
        let count = self.len.div_ceil(step).max(1);
        (0..count).map(move |i| {
            let at = self.start + i * step;
            (at, step.min(end - at))
        })
    }
}

/// The one warning that this kernel refused a `UDP_SEGMENT` send (per process).
static GSO_REFUSED: AtomicBool = AtomicBool::new(false);

/// The receive slots, the message headers of both directions and the echoes not yet sent.
pub struct Batch {
    slot_len: usize,
    buffers: Vec<u8>,
    /// Headers for `recvmmsg`. Separate from `send_headers`: `sendmmsg` points its headers'
    /// addresses at the caller's array, which a later receive must never write through.
    recv_headers: MultiHeaders<SockaddrStorage>,
    send_headers: MultiHeaders<SockaddrStorage>,
    /// Headers with room for one `UDP_SEGMENT` control message, for trains (with GRO only):
    /// plain echoes go through `send_headers`, whose messages carry no control data.
    gso_headers: Option<MultiHeaders<SockaddrStorage>>,
    /// The socket has `UDP_GRO` set: messages may be trains, each with its segment size.
    gro: bool,
    /// A receive wrote a header's control length down to what it used (0 without a
    /// `UDP_GRO` message), and nix's headers keep it (nix#2813): they must be made afresh
    /// before the next receive, or a train would lose its segment size.
    recv_headers_spent: bool,
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
            .field("gro", &self.gro)
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
            gso_headers: None,
            gro: false,
            recv_headers_spent: false,
            echoes: Vec::with_capacity(slots),
            destinations: Vec::with_capacity(slots),
            done: 0,
        }
    }

    /// The same batch for a socket with `UDP_GRO` set (see [`enable_gro`]): receives take the
    /// segment size of each message and split trains into their datagrams; echoes of trains
    /// go back with `UDP_SEGMENT`.
    pub fn with_gro(mut self) -> Batch {
        let slots = self.slots();
        self.gro = true;
        self.recv_headers = MultiHeaders::preallocate(slots, Some(nix::cmsg_space!(i32)));
        self.gso_headers = Some(MultiHeaders::preallocate(
            slots,
            Some(nix::cmsg_space!(u16)),
        ));
        self
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
    /// how many messages were received (a train is one); `WouldBlock` when none was queued,
    /// `Interrupted` when a signal came first. Call only when nothing is pending: the slots
    /// are reused.
    pub fn receive(&mut self, socket: BorrowedFd<'_>, lifecycle: &Lifecycle) -> io::Result<usize> {
        debug_assert_eq!(self.pending(), 0, "receive over unsent echoes");
        self.echoes.clear();
        self.destinations.clear();
        self.done = 0;
        if self.recv_headers_spent {
            self.recv_headers =
                MultiHeaders::preallocate(self.slots(), Some(nix::cmsg_space!(i32)));
            self.recv_headers_spent = false;
        }
        let slot_len = self.slot_len.max(1);
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .buffers
            .chunks_mut(slot_len)
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
        let mut spent = false;
        for (slot, message) in received.enumerate() {
            count += 1;
            // Without GRO every message is one datagram; with it, the control data says.
            let segment = if self.gro {
                match gro_segment(&message) {
                    Ok(Some(size)) => Some(size),
                    Ok(None) => {
                        spent = true;
                        None
                    }
                    Err(()) => {
                        spent = true;
                        // The segment size was lost: never echo the message as one datagram.
                        if let Some(source) = message.address.as_ref().and_then(socket_addr) {
                            lifecycle.admit_datagram(&Received {
                                len: message.bytes,
                                source,
                                truncated: true,
                            });
                        }
                        continue;
                    }
                }
            } else {
                None
            };
            let Some((raw, source)) = message
                .address
                .and_then(|raw| socket_addr(&raw).map(|source| (raw, source)))
            else {
                continue; // a UDP socket always names the source; nothing to answer otherwise
            };
            let truncated = message.flags.contains(MsgFlags::MSG_TRUNC);
            let whole = Echo {
                start: slot * slot_len,
                len: message.bytes,
                segment: segment.filter(|&size| usize::from(size) < message.bytes),
            };
            // Each datagram is decided on its own; consecutive admitted ones of a train stay
            // together, as one train (or one datagram, if only one is left).
            let mut run: Option<Echo> = None;
            for (start, len) in whole.datagrams() {
                let admitted = lifecycle.admit_datagram(&Received {
                    len,
                    source,
                    truncated,
                });
                match (&mut run, admitted) {
                    (Some(echo), true) => echo.len += len,
                    (None, true) => {
                        run = Some(Echo {
                            start,
                            len,
                            segment: whole.segment,
                        })
                    }
                    (_, false) => {
                        if let Some(echo) = run.take() {
                            push(&mut self.echoes, &mut self.destinations, echo, raw);
                        }
                    }
                }
            }
            if let Some(echo) = run {
                push(&mut self.echoes, &mut self.destinations, echo, raw);
            }
        }
        self.recv_headers_spent = spent;
        Ok(count)
    }

    /// Sends the pending echoes, as many system calls as it takes, resuming after a partial
    /// send. Each echo sent is counted (a train as its datagrams); one the kernel refuses on
    /// its own (for example an unreachable destination) is counted as not sent and skipped.
    /// Returns `Ok` when nothing is pending, `WouldBlock` (on a non-blocking socket or with
    /// `MSG_DONTWAIT` in `flags`) when the send buffer is full: call again when the socket is
    /// writable.
    pub fn send(
        &mut self,
        socket: BorrowedFd<'_>,
        flags: MsgFlags,
        lifecycle: &Lifecycle,
    ) -> io::Result<()> {
        while self.done < self.echoes.len() {
            // One call per run of echoes alike: single datagrams, or trains of one segment
            // size (`sendmmsg` gives every message the same control data).
            let segment = self.echoes[self.done].segment;
            if segment.is_some() && self.gso_headers.is_none() {
                self.split(self.done);
                continue;
            }
            let run = self.echoes[self.done..]
                .iter()
                .take_while(|echo| echo.segment == segment)
                .count();
            let end = self.done + run;
            let iovs: Vec<[IoSlice<'_>; 1]> = self.echoes[self.done..end]
                .iter()
                .map(|echo| {
                    [IoSlice::new(
                        &self.buffers[echo.start..echo.start + echo.len],
                    )]
                })
                .collect();
            let destinations = &self.destinations[self.done..end];
            let outcome = match (segment, &mut self.gso_headers) {
                (Some(size), Some(headers)) => {
                    let control = [ControlMessage::UdpGsoSegments(&size)];
                    sendmmsg(
                        socket.as_raw_fd(),
                        headers,
                        &iovs,
                        destinations,
                        control,
                        flags,
                    )
                    .map(|results| results.count())
                }
                _ => {
                    let no_control: [ControlMessage<'_>; 0] = [];
                    sendmmsg(
                        socket.as_raw_fd(),
                        &mut self.send_headers,
                        &iovs,
                        destinations,
                        no_control,
                        flags,
                    )
                    // Counting the results walks nix's per-message view; a send fills no
                    // address.
                    .map(|results| results.count())
                }
            };
            match outcome {
                Ok(sent) => {
                    for echo in &self.echoes[self.done..self.done + sent] {
                        for (_, len) in echo.datagrams() {
                            lifecycle.datagram_echoed(len);
                        }
                    }
                    self.done += sent;
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(e) if segment.is_some() => {
                    // The train failed: send its datagrams one by one (each then succeeds or
                    // fails on its own). A kernel or device that cannot segment (EIO without
                    // checksum offload, EINVAL for a segment beyond the path's MTU) gets
                    // single datagrams from this batch from now on.
                    if matches!(e, Errno::EIO | Errno::EINVAL | Errno::EOPNOTSUPP) {
                        self.gso_headers = None;
                        if !GSO_REFUSED.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                "the kernel refused a UDP_SEGMENT echo ({e}); sending segment \
                                 trains as single datagrams"
                            );
                        }
                    }
                    self.split(self.done);
                }
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

    /// Replaces the train at `index` by its datagrams, each a plain echo to the same place.
    fn split(&mut self, index: usize) {
        let train = self.echoes[index];
        let dest = self.destinations[index];
        let singles: Vec<Echo> = train
            .datagrams()
            .map(|(start, len)| Echo {
                start,
                len,
                segment: None,
            })
            .collect();
        let count = singles.len();
        self.echoes.splice(index..=index, singles);
        self.destinations
            .splice(index..=index, std::iter::repeat_n(dest, count));
    }

    /// Queues `data` as an echo to `dest`, as if it had been received and admitted (tests use
    /// it to put a destination the kernel refuses in the middle of a batch).
    #[cfg(test)]
    fn queue(&mut self, data: &[u8], dest: SocketAddr) {
        let slot = self.echoes.len();
        let start = slot * self.slot_len;
        self.buffers[start..start + data.len()].copy_from_slice(data);
        self.echoes.push(Echo {
            start,
            len: data.len(),
            segment: None,
        });
        self.destinations.push(Some(SockaddrStorage::from(dest)));
    }
}

/// Queues `echo` to `dest` (the batch's two arrays, borrowed apart from its slots); a train of
/// one datagram is sent as a plain datagram.
fn push(
    echoes: &mut Vec<Echo>,
    destinations: &mut Vec<Option<SockaddrStorage>>,
    mut echo: Echo,
    dest: SockaddrStorage,
) {
    if echo
        .segment
        .is_some_and(|size| usize::from(size) >= echo.len)
    {
        echo.segment = None;
    }
    echoes.push(echo);
    destinations.push(Some(dest));
}

/// The segment size of a message received with `UDP_GRO` set: `Some` for a train, `None` for
/// a single datagram, `Err` when the control data was cut short (or names no usable size), so
/// that where one datagram ends is unknown.
fn gro_segment(message: &RecvMsg<'_, '_, SockaddrStorage>) -> Result<Option<u16>, ()> {
    for control in message.cmsgs().map_err(|_| ())? {
        if let ControlMessageOwned::UdpGroSegments(size) = control {
            return match u16::try_from(size) {
                Ok(size) if size > 0 => Ok(Some(size)),
                _ => Err(()),
            };
        }
    }
    Ok(None)
}

/// Asks the kernel to hand `socket`'s datagrams over as segment trains where it can (`UDP_GRO`:
/// a sender's train of equal datagrams, sent with `UDP_SEGMENT` or coalesced on the way in,
/// arrives as one message). Its batches must then be [`Batch::with_gro`].
pub fn enable_gro(socket: &impl std::os::fd::AsFd) -> io::Result<()> {
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::UdpGroSegment, &true)
        .map_err(io::Error::from)
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

    /// Sends `datagrams` (all but the last of one size) to `to` as one `UDP_SEGMENT` train.
    fn send_train(socket: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) {
        use nix::sys::socket::sendmsg;
        let segment = u16::try_from(datagrams[0].len()).unwrap();
        let train = datagrams.concat();
        sendmsg(
            socket.as_raw_fd(),
            &[IoSlice::new(&train)],
            &[ControlMessage::UdpGsoSegments(&segment)],
            MsgFlags::empty(),
            Some(&SockaddrStorage::from(to)),
        )
        .unwrap();
    }

    /// Receives once `server` is readable.
    fn receive_when_ready(batch: &mut Batch, server: &UdpSocket, life: &Lifecycle) -> usize {
        crate::wake::poll_readable(&[server.as_fd()], Some(Duration::from_secs(3))).unwrap();
        batch.receive(server.as_fd(), life).unwrap()
    }

    fn train(count: usize, segment: usize, last: usize, tag: u8) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| {
                let len = if i == count - 1 { last } else { segment };
                let mut datagram = vec![tag; len];
                datagram[0] = i as u8;
                datagram
            })
            .collect()
    }

    #[test]
    fn a_gro_train_arrives_as_one_message_and_goes_back_as_its_datagrams() {
        let server = socket("127.0.0.1");
        if let Err(e) = enable_gro(&server) {
            eprintln!("SKIPPED: this kernel refuses UDP_GRO: {e}");
            return;
        }
        let client = socket("127.0.0.1");
        let life = no_limits();
        let mut batch = Batch::default().with_gro();
        let to = server.local_addr().unwrap();
        // A train, then a single datagram (its slot's control length comes back 0), then a
        // train again: the second must still carry its segment size (nix#2813).
        let first = train(9, 100, 40, 1);
        let single = vec![vec![7u8; 300]];
        let second = train(4, 1000, 1000, 2);
        for datagrams in [&first, &single, &second] {
            send_train(&client, to, datagrams);
            assert_eq!(
                receive_when_ready(&mut batch, &server, &life),
                1,
                "one message"
            );
            assert_eq!(batch.pending(), 1, "one echo");
            batch
                .send(server.as_fd(), MsgFlags::empty(), &life)
                .unwrap();
            assert_eq!(&drain(&client), datagrams, "the same datagrams, in order");
        }
        let stats = life.stats();
        assert_eq!(stats.datagrams_received(), 14);
        assert_eq!(stats.datagrams_echoed(), 14);
        let bytes = (8 * 100 + 40 + 300 + 4000) as u64;
        assert_eq!(stats.datagram_bytes_received(), bytes);
        assert_eq!(stats.datagram_bytes_sent(), bytes);
    }

    #[test]
    fn the_policy_decides_for_every_datagram_of_a_train() {
        let server = socket("127.0.0.1");
        if let Err(e) = enable_gro(&server) {
            eprintln!("SKIPPED: this kernel refuses UDP_GRO: {e}");
            return;
        }
        // A bucket of 3: of a train of 8, the first 3 are echoed (as a train of 3).
        let life = lifecycle(AdmissionConfig {
            udp: Some(UdpPolicy {
                rate: Some(3),
                any_port: false,
            }),
            ..AdmissionConfig::default()
        });
        let client = socket("127.0.0.1");
        let mut batch = Batch::default().with_gro();
        let sent = train(8, 50, 50, 3);
        send_train(&client, server.local_addr().unwrap(), &sent);
        assert_eq!(receive_when_ready(&mut batch, &server, &life), 1);
        batch
            .send(server.as_fd(), MsgFlags::empty(), &life)
            .unwrap();
        assert_eq!(drain(&client), sent[..3].to_vec());
        assert_eq!(life.stats().datagrams_received(), 8);
        assert_eq!(life.stats().datagrams_echoed(), 3);
        assert_eq!(life.stats().datagrams_refused(Refusal::DatagramRate), 5);
    }

    #[test]
    fn a_train_the_kernel_will_not_segment_goes_back_one_datagram_at_a_time() {
        // Port 0 makes the train's send fail (EINVAL), as a kernel without UDP_SEGMENT
        // would: its datagrams are then tried one by one, each failing on its own, and the
        // train to the good destination after it goes out as single datagrams.
        let server = socket("127.0.0.1");
        let client = socket("127.0.0.1");
        let life = no_limits();
        let mut batch = Batch::new(8, 4096).with_gro();
        let to = client.local_addr().unwrap();
        for (start, dest) in [(0, SocketAddr::from(([127, 0, 0, 1], 0))), (4096, to)] {
            batch.buffers[start..start + 30].fill(9);
            batch.echoes.push(Echo {
                start,
                len: 30,
                segment: Some(10),
            });
            batch.destinations.push(Some(SockaddrStorage::from(dest)));
        }
        batch
            .send(server.as_fd(), MsgFlags::empty(), &life)
            .unwrap();
        assert_eq!(batch.pending(), 0);
        assert_eq!(drain(&client), vec![vec![9u8; 10]; 3]);
        assert_eq!(life.stats().datagrams_echoed(), 3);
        assert_eq!(life.stats().datagram_send_errors(), 3);
    }
}
