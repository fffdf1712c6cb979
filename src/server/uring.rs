//! `uring`: io_uring submission and completion rings, one per worker thread.
//!
//! # How it works
//! Each of the `--workers` threads owns one ring and one pool of receive buffers, and runs a
//! loop of "submit everything queued, wait for at least one completion, handle all
//! completions". Every socket operation is a ring operation:
//! - **accept**: one multishot accept per listener and ring (all rings share the listening
//!   sockets), which keeps posting a completion per new connection. The kernel hands every
//!   connection to the first armed accept, so a worker serving a few (`BALANCE_SLACK`) more
//!   connections than the least loaded one hands the new one over (a mailbox plus a wake-up
//!   descriptor each ring polls);
//! - **recv**: one multishot recv per connection with *buffer select*: the kernel picks a
//!   buffer from this worker's registered buffer ring only when data arrives, so an idle
//!   connection holds no buffer at all, and keeps posting a completion per arrival without a
//!   new submission. Each recv ends after [`RECV_LIMIT`] bytes and is armed again (Linux
//!   6.16 caps it; older kernels refuse the cap, and the worker falls back to one recv per
//!   message that waits for data before trying);
//! - **send**: the received buffer is sent back; a partial send is resubmitted with exactly the
//!   bytes not yet sent. The buffer goes back to the kernel only after *all* its bytes were
//!   sent. Data that arrives while a send is in flight waits in the connection's queue, and
//!   its recv is cancelled at once; it is armed again only when the queue is empty
//!   (backpressure: a client that does not read its echo stops being read, holding a couple
//!   of buffers at most).
//! - timers (idle sweep, accept back-off, shutdown deadline) are Timeout operations, and a
//!   PollAdd on the shutdown descriptor tells every ring when SIGINT/SIGTERM arrives.
//!
//! Every submission carries a `user_data` token of (operation kind, connection slot,
//! generation); a completion whose generation does not match its slot is stale and touches
//! nothing. A recv that finds the pool empty completes with ENOBUFS: the connection waits in
//! a queue and its recv is posted again once buffers are free (checked after every batch of
//! completions, as many as there are free buffers). A full submission queue is
//! submitted and retried (and entries the kernel cannot take yet wait in a backlog); completion
//! overflow is left to the kernel (FEAT_NODROP) and reaped on the next enter.
//!
//! # Costs
//! Per worker: a ring (about 130 KiB of mapped queues) and a buffer pool of [`BUFFER_SIZE`]
//! buffers; the workers share [`POOL_BYTES`] of them, resident only once used (the
//! environment variable [`BUFFERS_ENV`] overrides the number per worker). Per
//! connection: a socket and a slot of a couple of hundred bytes; no buffer while idle
//! (measured: 7.4 MiB total RSS with 10,000 idle connections). Submissions are batched: one
//! `io_uring_enter` per loop turn both submits everything queued and waits, and a send
//! usually completes inline. Under load a turn handles dozens of round trips (measured: 20 to
//! 40 per `io_uring_enter` at 50 connections).
//!
//! # Limits and connection handling
//! `--max-conns` is a counter shared by the workers: at the limit a worker cancels its accepts
//! (clients wait in the listen backlog) and re-arms them when a connection ends anywhere (each
//! worker watches a wake-up descriptor). Connections a multishot accept delivered just before
//! its cancellation took effect are parked unserved until there is room. Accept errors follow
//! [`crate::net::classify_accept_error`]: out of descriptors or memory warns once and re-arms
//! after [`crate::net::ACCEPT_BACKOFF`]. `--idle-timeout` is a periodic sweep that shuts idle
//! sockets down, which completes their pending operation so the connection closes. When the
//! client half-closes, the server finishes echoing what it queued, then shuts its write side
//! and closes.
//! A worker with many clients that never read can run out of buffers; its other connections
//! then wait for a buffer until those clients read or hit the idle timeout.
//!
//! # Shutdown
//! On SIGINT/SIGTERM each ring cancels its accepts, lets live connections finish for
//! `--shutdown-timeout`, then shuts the remaining sockets down, waits for their operations to
//! complete, and returns.
//!
//! # Kernel features
//! Linux 6.0 or later: multishot accept and registered buffer rings (both 5.19) and
//! multishot recv (6.0); the probe checks the opcodes and registers a test buffer ring. Where io_uring is missing or disabled
//! (ENOSYS, EPERM from seccomp or `kernel.io_uring_disabled`), [`serve`] returns
//! [`crate::Error::Unsupported`] before serving. On 6.1+ rings use single-issuer and deferred
//! task running, which saves interrupts and context switches. Every ring is created before
//! any worker serves, so a failure is reported at start.
//!
//! Measured on loopback against the C epoll reference (`--workers 1`, both pinned to one
//! core, runs interleaved): round trips per second and server CPU per round trip on par
//! (see BENCHMARKS.md); most of that CPU is the TCP stack, common to both.

use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown as Direction, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, Fd, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};

use crate::net::{AcceptError, ACCEPT_BACKOFF};
use crate::server::conn::Admitted;
use crate::server::echo::End;
use crate::server::Server;
use crate::wake::Wake;

/// The size of one receive buffer.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// Buffer memory of all workers together (each worker gets a power-of-two share).
pub const POOL_BYTES: usize = 4 * 1024 * 1024;

/// Overrides the number of buffers per worker (a power of two), for tests that need the pool
/// to run dry and for tuning.
pub const BUFFERS_ENV: &str = "MULTIECHO_URING_BUFFERS";

/// Makes every worker use one recv per message, as on kernels without capped multishot recv
/// (before 6.16), so tests and comparisons can run that path anywhere.
pub const SINGLE_RECV_ENV: &str = "MULTIECHO_URING_SINGLE_RECV";

/// Submission queue entries per ring; the completion queue has four times as many.
const RING_ENTRIES: u32 = 1024;

/// A worker that accepts a connection while serving this many more than the least loaded
/// worker hands it over to that one. Needed because a multishot accept would otherwise take
/// them all: the kernel wakes the first waiter on the listener, and that one stays armed.
const BALANCE_SLACK: usize = 4;

/// What one multishot recv may take in total before it ends and is armed again: one buffer's
/// worth, so a connection whose echo is stuck holds few buffers (it is also cancelled as soon
/// as a second buffer arrives before the first is sent).
const RECV_LIMIT: u32 = BUFFER_SIZE as u32;

/// IORING_RECVSEND_POLL_FIRST: wait for data before trying the receive. The next message of
/// an echo client arrives after its echo, so trying at once would fail nearly every time.
const RECV_POLL_FIRST: u16 = 1;

/// The buffer group id of every worker's (only) buffer ring.
const BUFFER_GROUP: u16 = 0;

/// Runs the uring model.
pub fn serve(server: &Server) -> crate::Result<()> {
    probe()?;
    let workers = server.config.workers.max(1);
    let shared = Shared {
        live: AtomicUsize::new(0),
        max: server.config.max_conns.max(1),
        workers: (0..workers)
            .map(|_| {
                Ok(Mailbox {
                    wake: Wake::new()?,
                    load: AtomicUsize::new(0),
                    inbox: Mutex::new(Vec::new()),
                })
            })
            .collect::<io::Result<_>>()
            .map_err(|e| crate::Error::io("cannot create wake-up descriptors", e))?,
    };
    let buffers = match std::env::var(BUFFERS_ENV) {
        Ok(text) => text
            .parse::<u16>()
            .ok()
            .filter(|n| n.is_power_of_two() && *n <= 32768)
            .ok_or_else(|| {
                crate::Error::io(
                    format!("invalid {BUFFERS_ENV}={text}"),
                    io::Error::other("expected a power of two from 1 to 32768"),
                )
            })?,
        Err(_) => buffers_per_worker(workers),
    };
    // Every ring and pool is made here, before any worker serves: made later, a worker could
    // find the descriptors used up by the connections others have accepted meanwhile.
    let rings = (0..workers)
        .map(|_| Ring::new(buffers))
        .collect::<crate::Result<Vec<_>>>()?;
    std::thread::scope(|scope| {
        let handles = rings
            .into_iter()
            .enumerate()
            .map(|(id, ring)| {
                let shared = &shared;
                std::thread::Builder::new()
                    .name(format!("uring-{id}"))
                    .spawn_scoped(scope, move || {
                        let result = Worker::new(server, shared, id, ring)
                            .and_then(|mut worker| worker.run());
                        if result.is_err() {
                            // Bring the other workers down too: the server has failed.
                            server.shutdown.trigger();
                        }
                        result
                    })
                    .map_err(|e| crate::Error::io("cannot start a worker thread", e))
            })
            .collect::<Vec<_>>();
        let mut first_error = None;
        for handle in handles {
            let result = match handle {
                Ok(handle) => handle.join().unwrap_or_else(|_| {
                    Err(crate::Error::io(
                        "a worker panicked",
                        io::Error::other("panic"),
                    ))
                }),
                Err(e) => {
                    server.shutdown.trigger();
                    Err(e)
                }
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    })
}

/// Each worker's buffer count: its share of [`POOL_BYTES`], a power of two in 32..=256.
fn buffers_per_worker(workers: usize) -> u16 {
    let share = (POOL_BYTES / BUFFER_SIZE / workers).max(1);
    let power = 1usize << (usize::BITS - 1 - share.leading_zeros());
    power.clamp(32, 256) as u16
}

/// Checks that io_uring and the features this model needs are available: an
/// [`crate::Error::Unsupported`] saying why if not. [`serve`] calls it first; `run` calls it
/// before binding, so the error comes before any "listening on" line.
pub fn probe() -> crate::Result<()> {
    let ring = IoUring::new(8).map_err(unavailable)?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(unavailable)?;
    let needed = [
        (opcode::Accept::CODE, "accept"),
        (opcode::Recv::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::PollAdd::CODE, "poll"),
        (opcode::Timeout::CODE, "timeout"),
        (opcode::AsyncCancel::CODE, "cancel"),
        // The probe has no bit for multishot accept or recv; IORING_OP_SEND_ZC came in the
        // release that completed them (6.0), so it stands for them.
        (
            opcode::SendZc::CODE,
            "multishot accept and recv (Linux 6.0)",
        ),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(crate::Error::Unsupported(format!(
                "io_uring is not available on this system: the kernel lacks the {name} operation"
            )));
        }
    }
    let mut pool =
        BufferPool::new(1).map_err(|e| crate::Error::io("cannot allocate buffers", e))?;
    pool.register(&ring).map_err(|e| {
        crate::Error::Unsupported(format!(
            "io_uring is not available on this system: no provided buffer rings ({e})"
        ))
    })?;
    drop(ring);
    Ok(())
}

/// The error for a ring that cannot be created.
fn unavailable(e: io::Error) -> crate::Error {
    let reason = match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring (io_uring_setup: ENOSYS)".to_string(),
        Some(code @ (libc::EPERM | libc::EACCES)) => format!(
            "io_uring_setup was refused ({}; blocked by seccomp or sysctl kernel.io_uring_disabled)",
            if code == libc::EPERM { "EPERM" } else { "EACCES" }
        ),
        _ => return crate::Error::io("cannot create an io_uring instance", e),
    };
    crate::Error::Unsupported(format!(
        "io_uring is not available on this system: {reason}"
    ))
}

/// What the workers share: the connection count against `--max-conns`, and each worker's
/// mailbox.
struct Shared {
    live: AtomicUsize,
    max: usize,
    workers: Vec<Mailbox>,
}

/// How other workers reach one worker: connections handed over to it, its load, and a
/// wake-up descriptor its ring always polls (written for a hand-over, and when a connection
/// ends while the server was full).
struct Mailbox {
    wake: Wake,
    load: AtomicUsize,
    inbox: Mutex<Vec<TcpStream>>,
}

impl Shared {
    /// Reserves room for one connection; false at the limit.
    fn try_admit(&self) -> bool {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn has_room(&self) -> bool {
        self.live.load(Ordering::Acquire) < self.max
    }

    /// Gives back the room of worker `id`'s connection; wakes every worker if the server was
    /// full, so those that stopped accepting start again.
    fn release(&self, id: usize) {
        self.workers[id].load.fetch_sub(1, Ordering::Relaxed);
        if self.live.fetch_sub(1, Ordering::AcqRel) >= self.max {
            for worker in &self.workers {
                worker.wake.wake();
            }
        }
    }

    /// The worker that should serve a connection accepted by worker `id`: itself, unless it
    /// serves [`BALANCE_SLACK`] more than the least loaded one. Counts the connection there.
    fn assign(&self, id: usize) -> usize {
        let load = |w: usize| self.workers[w].load.load(Ordering::Relaxed);
        let least = (0..self.workers.len())
            .min_by_key(|&w| load(w))
            .unwrap_or(id);
        let target = if load(id) > load(least) + BALANCE_SLACK {
            least
        } else {
            id
        };
        self.workers[target].load.fetch_add(1, Ordering::Relaxed);
        target
    }
}

/// What a submission was for; the top byte of its `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Accept = 1,
    Recv,
    Send,
    ShutdownSignal,
    Wake,
    IdleSweep,
    AcceptBackoff,
    Deadline,
    Cancel,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Kind> {
        use Kind::*;
        [
            Accept,
            Recv,
            Send,
            ShutdownSignal,
            Wake,
            IdleSweep,
            AcceptBackoff,
            Deadline,
            Cancel,
        ]
        .into_iter()
        .find(|k| *k as u8 == value)
    }
}

/// `user_data`: kind (8 bits), generation (24 bits), slot or listener index (32 bits).
fn token(kind: Kind, index: u32, generation: u32) -> u64 {
    (kind as u64) << 56 | u64::from(generation & 0xFF_FFFF) << 32 | u64::from(index)
}

fn untoken(user_data: u64) -> (Option<Kind>, u32, u32) {
    (
        Kind::from_u8((user_data >> 56) as u8),
        user_data as u32,
        (user_data >> 32) as u32 & 0xFF_FFFF,
    )
}

/// A registered ring of provided buffers: `count` buffers of [`BUFFER_SIZE`] bytes that the
/// kernel picks from for buffer-select receives, and that we hand back once sent.
struct BufferPool {
    ring: NonNull<BufRingEntry>,
    ring_layout: Layout,
    memory: NonNull<u8>,
    memory_layout: Layout,
    count: u16,
    tail: u16,
}

impl BufferPool {
    fn new(count: u16) -> io::Result<Self> {
        assert!(count.is_power_of_two());
        let ring_layout = Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // Small alignment on purpose: a large zeroed allocation with it comes from calloc,
        // which maps fresh pages and does not write them, so buffers never used cost no
        // resident memory. (Over-aligned zeroed allocations are memset, touching them all.)
        let memory_layout = Layout::from_size_align(usize::from(count) * BUFFER_SIZE, 16)
            .map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size. A new buffer ring must be zeroed (its
        // tail starts at 0).
        let (ring, memory) = unsafe {
            (
                alloc::alloc_zeroed(ring_layout).cast::<BufRingEntry>(),
                alloc::alloc_zeroed(memory_layout),
            )
        };
        let (Some(ring), Some(memory)) = (NonNull::new(ring), NonNull::new(memory)) else {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        };
        Ok(BufferPool {
            ring,
            ring_layout,
            memory,
            memory_layout,
            count,
            tail: 0,
        })
    }

    /// Registers the ring with `uring` as [`BUFFER_GROUP`] and provides every buffer.
    fn register(&mut self, uring: &IoUring) -> io::Result<()> {
        // SAFETY: the ring memory is page-aligned, `count` entries long, and lives until the
        // pool is dropped, which happens only after the io_uring is dropped (or after
        // `unregister`): the worker declares its ring before its pool, and `probe` drops
        // its ring first.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                self.ring.as_ptr() as u64,
                self.count,
                BUFFER_GROUP,
                0,
            )?;
        }
        for bid in 0..self.count {
            self.give_back(bid);
        }
        Ok(())
    }

    /// Returns buffer `bid` to the kernel.
    fn give_back(&mut self, bid: u16) {
        let mask = self.count - 1;
        // SAFETY: `tail & mask` < `count`, inside the ring allocation; the kernel only reads
        // entries between its head and the tail we publish below, and this one is not yet
        // published.
        unsafe {
            let entry = &mut *self.ring.as_ptr().add(usize::from(self.tail & mask));
            entry.set_addr(self.buffer(bid) as u64);
            entry.set_len(BUFFER_SIZE as u32);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lives in the first entry of the ring allocation, is 2-byte
        // aligned, and the kernel reads it concurrently, hence the atomic release store.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The start of buffer `bid`.
    fn buffer(&self, bid: u16) -> *const u8 {
        assert!(bid < self.count, "buffer id out of range");
        // SAFETY: `bid < count`, so the offset is inside the allocation.
        unsafe { self.memory.as_ptr().add(usize::from(bid) * BUFFER_SIZE) }
    }
}

// SAFETY: the pool exclusively owns its two allocations (no aliasing handles exist), so
// moving it to the worker thread that uses it is sound.
unsafe impl Send for BufferPool {}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; the kernel no longer uses them (see
        // `register`).
        unsafe {
            alloc::dealloc(self.ring.as_ptr().cast(), self.ring_layout);
            alloc::dealloc(self.memory.as_ptr(), self.memory_layout);
        }
    }
}

/// Why the server ended a connection (when it was not the client).
#[derive(Clone, Copy, Debug)]
enum ServerEnd {
    IdleTimeout,
    Shutdown,
}

impl From<ServerEnd> for End {
    fn from(end: ServerEnd) -> End {
        match end {
            ServerEnd::IdleTimeout => End::IdleTimeout,
            ServerEnd::Shutdown => End::Shutdown,
        }
    }
}

/// The send in flight: buffer `bid` holds `len` received bytes, `sent` of them already out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sending {
    bid: u16,
    len: u32,
    sent: u32,
}

struct Connection {
    stream: TcpStream,
    admitted: Admitted,
    last_active: Instant,
    bytes: u64,
    /// Its multishot recv is armed: the completion without "more" has not arrived yet.
    receiving: bool,
    /// A cancellation of the armed recv was submitted (backpressure or an error).
    recv_cancelled: bool,
    /// The last recv found no free buffer; the connection waits in `Worker::waiting`.
    waiting_for_buffer: bool,
    sending: Option<Sending>,
    /// Buffers received while a send was in flight, in order; they go out after it.
    queued: VecDeque<(u16, u32)>,
    /// The client half-closed: close once everything received is echoed.
    client_done: bool,
    /// A recv or send failed; the connection closes once its operations have completed.
    failed: Option<io::Error>,
    /// Set when the server decided to close it; the pending operations' completions close it.
    ending: Option<ServerEnd>,
}

impl Connection {
    /// Whether the kernel still has an operation of this connection (its socket must stay
    /// open and its slot reserved).
    fn in_flight(&self) -> bool {
        self.receiving || self.sending.is_some()
    }
}

#[derive(Default)]
struct Slot {
    generation: u32,
    connection: Option<Connection>,
}

struct Listener {
    fd: RawFd,
    generation: u32,
    in_flight: bool,
    cancel_sent: bool,
}

struct Worker<'a> {
    // Declared before `pool`, so it is dropped first: the kernel stops using the buffers
    // before they are freed.
    ring: IoUring,
    pool: BufferPool,
    server: &'a Server,
    shared: &'a Shared,
    id: usize,
    slots: Vec<Slot>,
    free: Vec<u32>,
    active: usize,
    /// Connections whose recv found no buffer, in order (stale entries are skipped).
    waiting: VecDeque<(u32, u32)>,
    /// Accepted while the server was full; served when there is room.
    parked: VecDeque<TcpStream>,
    listeners: Vec<Listener>,
    backing_off: bool,
    stopping: bool,
    /// Buffers the kernel gave us (received data) that we have not given back yet.
    buffers_held: usize,
    /// Whether recvs are multishot with a byte limit (false once the kernel refused one).
    multishot: bool,
    /// How often a recv found the pool empty (reported at debug level when the worker ends).
    buffer_waits: u64,
    /// Connections this worker served.
    served: u64,
    /// Entries that did not fit in the submission queue yet.
    backlog: VecDeque<squeue::Entry>,
    completions: Vec<(u64, i32, u32)>,
    /// When the current batch of completions was reaped (one clock read per batch).
    now: Instant,
    // Timeouts read their timespec when submitted; boxed so the addresses stay put.
    idle_interval: Option<Box<Timespec>>,
    backoff: Box<Timespec>,
    deadline: Box<Timespec>,
}

impl<'a> Worker<'a> {
    /// A worker on `ring`; must run on the thread that will drive the ring.
    fn new(server: &'a Server, shared: &'a Shared, id: usize, ring: Ring) -> crate::Result<Self> {
        let Ring {
            ring,
            pool,
            disabled,
        } = ring;
        if disabled {
            // A single-issuer ring belongs to the thread that enables it.
            ring.submitter()
                .register_enable_rings()
                .map_err(|e| crate::Error::io("cannot enable the io_uring", e))?;
        }
        let multishot = std::env::var_os(SINGLE_RECV_ENV).is_none();
        tracing::debug!(
            worker = id,
            single_issuer = disabled,
            buffers = pool.count,
            multishot_recv = multishot,
            "ring ready"
        );
        let idle_interval = server.config.idle_timeout.map(|idle| {
            let interval = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
            Box::new(Timespec::from(interval))
        });
        Ok(Worker {
            ring,
            pool,
            server,
            shared,
            id,
            slots: Vec::new(),
            free: Vec::new(),
            active: 0,
            waiting: VecDeque::new(),
            parked: VecDeque::new(),
            listeners: server
                .listeners
                .iter()
                .map(|l| Listener {
                    fd: l.as_raw_fd(),
                    generation: 0,
                    in_flight: false,
                    cancel_sent: false,
                })
                .collect(),
            backing_off: false,
            stopping: false,
            buffers_held: 0,
            multishot,
            buffer_waits: 0,
            served: 0,
            backlog: VecDeque::new(),
            now: Instant::now(),
            completions: Vec::with_capacity(RING_ENTRIES as usize * 4),
            idle_interval,
            backoff: Box::new(Timespec::from(ACCEPT_BACKOFF)),
            deadline: Box::new(Timespec::from(server.config.shutdown_timeout)),
        })
    }

    fn run(&mut self) -> crate::Result<()> {
        let shutdown_fd = self.server.shutdown.as_fd().as_raw_fd();
        self.push(
            opcode::PollAdd::new(Fd(shutdown_fd), libc::POLLIN as u32)
                .build()
                .user_data(token(Kind::ShutdownSignal, 0, 0)),
        );
        self.arm_wake();
        self.arm_idle_sweep();
        loop {
            self.sync_accepting();
            if self.stopping && self.active == 0 {
                break;
            }
            self.flush_backlog();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(crate::Error::io("io_uring enter failed", e)),
            }
            self.now = Instant::now();
            let mut completions = std::mem::take(&mut self.completions);
            completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(user_data, result, flags) in &completions {
                self.complete(user_data, result, flags)?;
            }
            completions.clear();
            self.completions = completions;
            self.resume_waiting();
        }
        // Nothing of ours uses the buffers any more; stop the kernel from using them too.
        let _ = self.ring.submitter().unregister_buf_ring(BUFFER_GROUP);
        tracing::debug!(
            worker = self.id,
            buffers = self.pool.count,
            buffer_waits = self.buffer_waits,
            served = self.served,
            "worker stopped"
        );
        Ok(())
    }

    /// Queues a submission: into the submission queue, submitting it when full, or into the
    /// backlog when the kernel cannot take more right now.
    fn push(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty() && self.try_push(&entry) {
            return;
        }
        self.backlog.push_back(entry);
    }

    fn try_push(&mut self, entry: &squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: every entry built here refers only to memory that outlives the
            // operation: buffers of the pool (alive as long as the ring), boxed timespecs of
            // this worker (read at submission), and descriptors that stay open until the
            // operation completes (a connection's socket is closed only when it has no
            // operation in flight; listeners and the shutdown descriptor outlive `serve`).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return true;
            }
            if self.ring.submit().is_err() {
                return false;
            }
        }
        false
    }

    fn flush_backlog(&mut self) {
        while let Some(entry) = self.backlog.pop_front() {
            if !self.try_push(&entry) {
                self.backlog.push_front(entry);
                break;
            }
        }
    }

    fn complete(&mut self, user_data: u64, result: i32, flags: u32) -> crate::Result<()> {
        let (kind, index, generation) = untoken(user_data);
        match kind {
            Some(Kind::Accept) => self.accepted(index, generation, result, flags)?,
            Some(Kind::Recv) => self.received(index, generation, result, flags),
            Some(Kind::Send) => self.sent(index, generation, result),
            Some(Kind::ShutdownSignal) => self.begin_shutdown(),
            Some(Kind::Wake) => {
                self.shared.workers[self.id].wake.drain();
                self.take_handed_over();
                self.arm_wake();
            }
            Some(Kind::IdleSweep) => {
                self.sweep_idle();
                self.arm_idle_sweep();
            }
            Some(Kind::AcceptBackoff) => self.backing_off = false,
            Some(Kind::Deadline) => self.close_all_at_deadline(),
            Some(Kind::Cancel) | None => {}
        }
        Ok(())
    }

    // ---- accepting ----

    /// Arms or cancels the accepts as the state requires; serves parked connections when
    /// there is room.
    fn sync_accepting(&mut self) {
        while !self.stopping && !self.parked.is_empty() && self.shared.try_admit() {
            let stream = self.parked.pop_front().expect("not empty");
            self.assign(stream);
        }
        let full = !self.parked.is_empty() || !self.shared.has_room();
        let accepting = !self.stopping && !self.backing_off && !full;
        for index in 0..self.listeners.len() {
            let listener = &mut self.listeners[index];
            if accepting && !listener.in_flight {
                listener.generation = listener.generation.wrapping_add(1);
                listener.in_flight = true;
                listener.cancel_sent = false;
                let entry = opcode::AcceptMulti::new(Fd(listener.fd))
                    .flags(libc::SOCK_CLOEXEC)
                    .build()
                    .user_data(token(Kind::Accept, index as u32, listener.generation));
                self.push(entry);
            } else if !accepting && listener.in_flight && !listener.cancel_sent {
                listener.cancel_sent = true;
                let target = token(Kind::Accept, index as u32, listener.generation);
                self.push(opcode::AsyncCancel::new(target).build().user_data(token(
                    Kind::Cancel,
                    0,
                    0,
                )));
            }
        }
    }

    fn accepted(
        &mut self,
        index: u32,
        generation: u32,
        result: i32,
        flags: u32,
    ) -> crate::Result<()> {
        let Some(listener) = self.listeners.get_mut(index as usize) else {
            return Ok(());
        };
        if listener.generation & 0xFF_FFFF == generation && !cqueue::more(flags) {
            listener.in_flight = false;
        }
        if result >= 0 {
            // SAFETY: a successful accept returns a new descriptor that nothing else owns.
            let stream = unsafe { TcpStream::from_raw_fd(result) };
            if self.stopping {
                return Ok(()); // Closed unserved: the server no longer accepts.
            }
            if self.parked.is_empty() && self.shared.try_admit() {
                self.assign(stream);
            } else {
                self.parked.push_back(stream);
            }
            return Ok(());
        }
        if result == -libc::ECANCELED {
            return Ok(());
        }
        let err = io::Error::from_raw_os_error(-result);
        match self.server.conn.accept_error(&err) {
            AcceptError::Exhausted => {
                if !self.backing_off {
                    self.backing_off = true;
                    let timespec: *const Timespec = &*self.backoff;
                    self.push(opcode::Timeout::new(timespec).build().user_data(token(
                        Kind::AcceptBackoff,
                        0,
                        0,
                    )));
                }
            }
            AcceptError::Retry | AcceptError::WouldBlock => {
                tracing::debug!("accept failed: {err}; retrying");
            }
            // Shutdown stopped the listener.
            AcceptError::Closed => {}
            AcceptError::Fatal if self.stopping => {}
            AcceptError::Fatal => return Err(crate::Error::io("accept failed", err)),
        }
        Ok(())
    }

    /// Serves an admitted connection here, or hands it over to a less loaded worker.
    fn assign(&mut self, stream: TcpStream) {
        let target = self.shared.assign(self.id);
        if target == self.id {
            self.start_connection(stream);
            return;
        }
        let mailbox = &self.shared.workers[target];
        mailbox
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stream);
        mailbox.wake.wake();
    }

    /// Serves the connections other workers handed over.
    fn take_handed_over(&mut self) {
        let streams = std::mem::take(
            &mut *self.shared.workers[self.id]
                .inbox
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for stream in streams {
            if self.stopping {
                drop(stream);
                self.shared.release(self.id);
            } else {
                self.start_connection(stream);
            }
        }
    }

    fn arm_wake(&mut self) {
        let fd = self.shared.workers[self.id].wake.as_fd().as_raw_fd();
        self.push(
            opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
                .build()
                .user_data(token(Kind::Wake, 0, 0)),
        );
    }

    /// Serves a connection admitted and counted for this worker.
    fn start_connection(&mut self, stream: TcpStream) {
        let peer = match stream.peer_addr() {
            Ok(peer) => peer,
            Err(e) => {
                tracing::debug!("connection gone before it was served: {e}");
                self.shared.release(self.id);
                return;
            }
        };
        self.server.conn.configure(&stream, peer);
        let Ok(admitted) = self.server.conn.admit(peer) else {
            // Refused: closed without an echo.
            drop(stream);
            self.shared.release(self.id);
            return;
        };
        self.served += 1;
        let now = Instant::now();
        let connection = Connection {
            stream,
            admitted,
            last_active: now,
            bytes: 0,
            receiving: false,
            recv_cancelled: false,
            waiting_for_buffer: false,
            sending: None,
            queued: VecDeque::new(),
            client_done: false,
            failed: None,
            ending: None,
        };
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[index as usize].connection = Some(connection);
        self.active += 1;
        self.advance(index);
    }

    // ---- echoing ----

    fn connection(&mut self, index: u32, generation: u32) -> Option<&mut Connection> {
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation & 0xFF_FFFF != generation {
            return None;
        }
        slot.connection.as_mut()
    }

    fn generation(&self, index: u32) -> u32 {
        self.slots[index as usize].generation
    }

    /// Moves connection `index` on after a completion (or when it starts): closes it when it
    /// is done and nothing of it is in flight, echoes the next queued buffer, or arms its
    /// recv when it has nothing left to echo.
    fn advance(&mut self, index: u32) {
        let generation = self.generation(index);
        let Some(connection) = self.slots[index as usize].connection.as_mut() else {
            return;
        };
        if connection.ending.is_some() || connection.failed.is_some() {
            // Nothing more goes out: the queued data is dropped with the connection.
            let queued = std::mem::take(&mut connection.queued);
            let cancel = connection.receiving && !connection.recv_cancelled;
            connection.recv_cancelled |= cancel;
            let done = !connection.in_flight();
            for (bid, _) in queued {
                self.give_back(bid);
            }
            if done {
                self.finish(index, false);
            } else if cancel {
                self.cancel_recv(index, generation);
            }
            return;
        }
        if connection.sending.is_none() {
            if let Some((bid, len)) = connection.queued.pop_front() {
                connection.sending = Some(Sending { bid, len, sent: 0 });
                self.post_send(index);
                return;
            }
            if connection.client_done {
                if !connection.receiving {
                    self.finish(index, true);
                }
                return;
            }
            if !connection.receiving && !connection.waiting_for_buffer {
                self.post_recv(index);
            }
        }
    }

    /// Arms the connection's recv with buffer select: the kernel picks a buffer only when
    /// data arrives. Where the kernel can cap it (Linux 6.16+), a multishot recv that keeps
    /// posting completions, without a submission per message, until [`RECV_LIMIT`] bytes,
    /// a cancellation, the client's close or an empty pool ends it; otherwise one recv per
    /// message that waits for data before trying (poll first).
    fn post_recv(&mut self, index: u32) {
        let generation = self.generation(index);
        let connection = self.slots[index as usize]
            .connection
            .as_mut()
            .expect("live slot");
        connection.receiving = true;
        connection.recv_cancelled = false;
        let fd = Fd(connection.stream.as_raw_fd());
        let entry = if self.multishot {
            with_total_limit(opcode::RecvMulti::new(fd, BUFFER_GROUP).build(), RECV_LIMIT)
        } else {
            opcode::Recv::new(fd, std::ptr::null_mut(), BUFFER_SIZE as u32)
                .buf_group(BUFFER_GROUP)
                .ioprio(RECV_POLL_FIRST)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        };
        self.push(entry.user_data(token(Kind::Recv, index, generation)));
    }

    /// Stops the connection's armed recv; its last completion (without "more") follows.
    fn cancel_recv(&mut self, index: u32, generation: u32) {
        let target = token(Kind::Recv, index, generation);
        self.push(
            opcode::AsyncCancel::new(target)
                .build()
                .user_data(token(Kind::Cancel, 0, 0)),
        );
    }

    fn post_send(&mut self, index: u32) {
        let generation = self.generation(index);
        let connection = self.slots[index as usize]
            .connection
            .as_ref()
            .expect("live slot");
        let Sending { bid, len, sent } = connection.sending.expect("a send to post");
        // SAFETY: pointer arithmetic within buffer `bid`: `sent < len <= BUFFER_SIZE`.
        let data = unsafe { self.pool.buffer(bid).add(sent as usize) };
        let entry = opcode::Send::new(Fd(connection.stream.as_raw_fd()), data, len - sent)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token(Kind::Send, index, generation));
        self.push(entry);
    }

    fn received(&mut self, index: u32, generation: u32, result: i32, flags: u32) {
        let buffer = cqueue::buffer_select(flags);
        if buffer.is_some() {
            self.buffers_held += 1;
        }
        let now = self.now;
        let multishot = self.multishot;
        let Some(connection) = self.connection(index, generation) else {
            // Cannot happen (a slot is freed only with no operation in flight), but a buffer
            // must never be lost.
            if let Some(bid) = buffer {
                self.give_back(bid);
            }
            return;
        };
        if !cqueue::more(flags) {
            connection.receiving = false;
        }
        let mut cancel = false;
        let mut discard = None;
        let mut refused_multishot = false;
        match (result, buffer) {
            (n, Some(bid)) if n > 0 => {
                connection.last_active = now;
                if connection.ending.is_some() || connection.failed.is_some() {
                    discard = Some(bid);
                } else if connection.sending.is_none() && connection.queued.is_empty() {
                    connection.sending = Some(Sending {
                        bid,
                        len: n as u32,
                        sent: 0,
                    });
                    self.post_send(index);
                    return;
                } else {
                    // The echo before it is still going out: keep this one for after it,
                    // and stop reading until the client has taken what it was sent.
                    connection.queued.push_back((bid, n as u32));
                    cancel = connection.receiving && !connection.recv_cancelled;
                    connection.recv_cancelled |= cancel;
                }
            }
            (0, buffer) => {
                discard = buffer;
                connection.client_done = true;
            }
            (e, None) if e == -libc::EINVAL && multishot && !connection.receiving => {
                // A kernel before 6.16: no byte limit for multishot recv. Without it a fast
                // sender could take the whole pool in one turn, so use single recvs.
                refused_multishot = true;
            }
            (e, None) if e == -libc::ENOBUFS && !connection.receiving => {
                connection.last_active = now;
                connection.waiting_for_buffer = true;
                self.waiting.push_back((index, generation));
                self.buffer_waits += 1;
            }
            (e, None)
                if e == -libc::ECANCELED
                    || e == -libc::EINTR
                    || e == -libc::EAGAIN
                    || e == -libc::ENOBUFS => {}
            (e, buffer) => {
                discard = buffer;
                connection.failed = Some(if e < 0 {
                    io::Error::from_raw_os_error(-e)
                } else {
                    io::Error::other("recv completed without a buffer")
                });
            }
        }
        if let Some(bid) = discard {
            self.give_back(bid);
        }
        if cancel {
            self.cancel_recv(index, generation);
        }
        if refused_multishot {
            tracing::debug!(
                worker = self.id,
                "no capped multishot recv; using single recvs"
            );
            self.multishot = false;
        }
        self.advance(index);
    }

    fn sent(&mut self, index: u32, generation: u32, result: i32) {
        let now = self.now;
        let Some(connection) = self.connection(index, generation) else {
            return;
        };
        let Some(Sending { bid, len, sent }) = connection.sending else {
            return;
        };
        if result == -libc::EINTR || result == -libc::EAGAIN {
            self.post_send(index);
            return;
        }
        if result <= 0 {
            connection.sending = None;
            connection.failed.get_or_insert_with(|| {
                if result < 0 {
                    io::Error::from_raw_os_error(-result)
                } else {
                    io::Error::from(io::ErrorKind::WriteZero)
                }
            });
            self.give_back(bid);
            self.advance(index);
            return;
        }
        let sent = sent + result as u32;
        connection.bytes += result as u64;
        connection.last_active = now;
        if sent < len {
            connection.sending = Some(Sending { bid, len, sent });
            self.post_send(index);
            return;
        }
        // Every byte of this buffer is out: only now may the kernel reuse it.
        connection.sending = None;
        self.give_back(bid);
        self.advance(index);
    }

    /// Returns a buffer to the kernel.
    fn give_back(&mut self, bid: u16) {
        self.pool.give_back(bid);
        self.buffers_held -= 1;
    }

    /// After a batch of completions: as many connections waiting for a buffer as there are
    /// free buffers arm their recv again. Done per batch, not per returned buffer, so a
    /// buffer returned in the same batch as (before) an ENOBUFS completion is not missed.
    fn resume_waiting(&mut self) {
        let mut free = usize::from(self.pool.count) - self.buffers_held;
        while free > 0 {
            let Some((index, generation)) = self.waiting.pop_front() else {
                break;
            };
            let Some(connection) = self.connection(index, generation) else {
                continue;
            };
            if connection.waiting_for_buffer {
                connection.waiting_for_buffer = false;
                self.advance(index);
                free -= 1;
            }
        }
    }

    /// Closes a connection that has no operation in flight, logs it, and frees its slot.
    fn finish(&mut self, index: u32, client_closed: bool) {
        let slot = &mut self.slots[index as usize];
        let Some(connection) = slot.connection.take() else {
            return;
        };
        debug_assert!(!connection.in_flight() && connection.queued.is_empty());
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index);
        self.active -= 1;
        let end = match (connection.ending, connection.failed) {
            (Some(ending), _) => End::from(ending),
            (None, Some(e)) => End::Failed(e),
            (None, None) => {
                if client_closed {
                    // The client half-closed and has had every byte back: close our side too.
                    let _ = connection.stream.shutdown(Direction::Write);
                }
                End::ClientClosed
            }
        };
        drop(connection.stream);
        self.server
            .conn
            .close(connection.admitted, connection.bytes, &end);
        self.shared.release(self.id);
    }

    /// Ends a connection at the server's initiative: shutting the socket down completes its
    /// pending operations, whose completions then close it.
    fn end_connection(&mut self, index: u32, why: ServerEnd) {
        let Some(connection) = self.slots[index as usize].connection.as_mut() else {
            return;
        };
        if connection.ending.is_some() {
            return;
        }
        connection.ending = Some(why);
        if connection.in_flight() {
            let _ = connection.stream.shutdown(Direction::Both);
        }
        self.advance(index);
    }

    // ---- timers and shutdown ----

    fn arm_idle_sweep(&mut self) {
        if let Some(interval) = &self.idle_interval {
            let timespec: *const Timespec = &**interval;
            self.push(opcode::Timeout::new(timespec).build().user_data(token(
                Kind::IdleSweep,
                0,
                0,
            )));
        }
    }

    fn sweep_idle(&mut self) {
        let Some(idle) = self.server.config.idle_timeout else {
            return;
        };
        let now = Instant::now();
        for index in 0..self.slots.len() as u32 {
            let idle_for = match &self.slots[index as usize].connection {
                Some(c) if c.ending.is_none() => now.saturating_duration_since(c.last_active),
                _ => continue,
            };
            if idle_for >= idle {
                self.end_connection(index, ServerEnd::IdleTimeout);
            }
        }
    }

    fn begin_shutdown(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        // Accepted while full, never admitted nor served: close them.
        self.parked.clear();
        self.server.conn.log_draining(
            self.shared.live.load(Ordering::Acquire),
            self.server.config.shutdown_timeout,
        );
        if self.active > 0 {
            let timespec: *const Timespec = &*self.deadline;
            self.push(opcode::Timeout::new(timespec).build().user_data(token(
                Kind::Deadline,
                0,
                0,
            )));
        }
    }

    fn close_all_at_deadline(&mut self) {
        if self.active == 0 {
            return;
        }
        self.server.conn.log_deadline(self.active);
        for index in 0..self.slots.len() as u32 {
            self.end_connection(index, ServerEnd::Shutdown);
        }
    }
}

/// Sets a multishot recv's total byte limit, after which it ends (`sqe->optlen` with
/// IORING_OP_RECV, Linux 6.16; older kernels fail it with EINVAL). The io-uring crate does
/// not expose the field.
fn with_total_limit(entry: squeue::Entry, limit: u32) -> squeue::Entry {
    /// Where `optlen` is in `struct io_uring_sqe` (the kernel's ABI).
    const OPTLEN_OFFSET: usize = 44;
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around `struct io_uring_sqe`, 64 bytes of plain
    // integers (transmute checks the size), so any bytes make a valid value either way.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(entry) };
    raw[OPTLEN_OFFSET..OPTLEN_OFFSET + 4].copy_from_slice(&limit.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

/// Errors of `io_uring_enter` after which reaping completions and trying again is right.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

/// A worker's ring and buffer pool, made before the worker thread starts.
struct Ring {
    // Declared before `pool`: dropped first, so the kernel stops using the buffers before
    // they are freed.
    ring: IoUring,
    pool: BufferPool,
    /// Created disabled (single issuer): the worker thread enables it.
    disabled: bool,
}

impl Ring {
    /// Single issuer with deferred task running where the kernel has them (6.1+), created
    /// disabled so that the worker thread, not this one, becomes its issuer; a plain ring
    /// otherwise.
    fn new(buffers: u16) -> crate::Result<Ring> {
        let cq_entries = RING_ENTRIES * 4;
        let (ring, disabled) = match IoUring::builder()
            .setup_cqsize(cq_entries)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled()
            .build(RING_ENTRIES)
        {
            Ok(ring) => (ring, true),
            Err(_) => {
                let ring = IoUring::builder()
                    .setup_cqsize(cq_entries)
                    .build(RING_ENTRIES)
                    .map_err(unavailable)?;
                (ring, false)
            }
        };
        let mut pool =
            BufferPool::new(buffers).map_err(|e| crate::Error::io("cannot allocate buffers", e))?;
        pool.register(&ring)
            .map_err(|e| crate::Error::io("cannot register the buffer ring", e))?;
        Ok(Ring {
            ring,
            pool,
            disabled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let user_data = token(Kind::Send, 123_456, 0x1_23_45_67);
        assert_eq!(
            untoken(user_data),
            (Some(Kind::Send), 123_456, 0x23_45_67),
            "generations keep their low 24 bits"
        );
        assert_eq!(untoken(0).0, None);
        for kind in [Kind::Accept, Kind::Cancel, Kind::Wake] {
            assert_eq!(untoken(token(kind, u32::MAX, 0)), (Some(kind), u32::MAX, 0));
        }
    }

    #[test]
    fn buffer_pool_shares() {
        assert_eq!(buffers_per_worker(1), 256);
        assert_eq!(buffers_per_worker(2), 128);
        assert_eq!(buffers_per_worker(3), 64);
        assert_eq!(buffers_per_worker(64), 32);
        for workers in 1..=64 {
            assert!(buffers_per_worker(workers).is_power_of_two());
        }
    }
}
