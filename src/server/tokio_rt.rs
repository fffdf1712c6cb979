//! `async`: a tokio task per connection on a multi-thread runtime of `--workers` threads.
//!
//! How it works: the model builds its own runtime (not `#[tokio::main]`, so that `main` stays
//! single-threaded for the fork-based models). Each listener gets an accept task; each accepted
//! connection gets a task that waits for the socket to become readable, reads into a buffer
//! owned by the worker *thread* (not the task; borrowed only within one poll), and writes the
//! echo back at once with `try_write`. Only when the kernel takes less than all of it is the
//! remainder copied into a task-owned `Vec` and awaited before the next read, so a client that
//! does not read its echo stops being read (backpressure) and pins at most one read's worth.
//!
//! What it costs: an idle connection is a parked task plus its socket; no thread, stack or
//! buffer. Its future is under 500 bytes; with tokio's task and I/O registration it comes to
//! about 1.2 KiB, so 10,000 idle connections add about 12 MiB (a bare tokio task waiting on a
//! socket costs about 1 KiB). A round trip costs a read and a write, plus a share of an
//! `epoll_wait` and of tokio's scheduling: about the CPU time of a hand-written epoll loop.
//!
//! Limits: `--max-conns` is the lifecycle's `Limit`; an accept task takes a permit *before* accepting,
//! so clients beyond the limit wait in the listen backlog (connected, not reset) until a
//! connection closes. `--idle-timeout` is one `tokio::time` timer per connection, pushed back
//! by every read and every partial write. Running out of descriptors on accept (EMFILE,
//! ENFILE...) warns once and backs off for [`crate::net::ACCEPT_BACKOFF`] instead of spinning;
//! an aborted handshake is skipped; any other accept error drains and ends the server.
//!
//! Shutdown: the server's shutdown descriptor is watched through [`AsyncFd`]. Then the accept
//! tasks stop, the [`TaskTracker`] is closed and connections may finish for
//! `--shutdown-timeout`; those still open are told to close through a [`CancellationToken`],
//! and the runtime is shut down.
//!
//! UDP (`udp.rs`): `--workers` tasks per `udp://` socket share one tokio `UdpSocket`; each
//! waits for readability, receives with `try_io` until `WouldBlock`, and awaits `send_to` for
//! each admitted datagram's echo. Cost: a `recvmsg` and a `sendto` per datagram plus tokio's
//! readiness bookkeeping and a share of `epoll_wait`; one 64 KiB buffer per task. At shutdown
//! the UDP tasks end at once while the TCP connections drain.
//!
//! TLS (`tls.rs`): a `tls://` connection's task runs tokio-rustls's handshake under the
//! server's handshake cap and timeout, then echoes plaintext with a buffer of its own.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::listen::ListenerKind;
use crate::net::{AcceptError, ACCEPT_BACKOFF};
use crate::server::conn::admission::Refusal;
use crate::server::conn::limit::{Limit, Permit};
use crate::server::conn::proxy::{HeaderError, HeaderReader, ProxyHeader};
use crate::server::conn::{Admitted, End, Lifecycle};
use crate::server::{Server, ServerConfig};
use crate::shutdown::Shutdown;

mod tls;
mod udp;

/// The read buffer each worker thread lends to the connection it is running.
const READ_BUFFER_SIZE: usize = 64 * 1024;

/// How long connections closed at the shutdown deadline get to finish logging.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

thread_local! {
    static READ_BUFFER: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; READ_BUFFER_SIZE].into_boxed_slice());
}

/// Runs the async model.
pub fn serve(server: &Server) -> crate::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(server.config.workers.max(1))
        .thread_name("async-worker")
        .enable_all()
        .build()
        .map_err(|e| crate::Error::io("cannot start the tokio runtime", e))?;
    // The server keeps its listeners; the runtime gets non-blocking duplicates.
    let listeners = server
        .listeners
        .iter()
        .map(|listener| {
            let listener = listener.try_clone()?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| crate::Error::io("cannot prepare the listeners", e))?;
    let tls = {
        // Registering the handshake cap's descriptor needs the runtime.
        let _runtime = runtime.enter();
        server
            .tls
            .clone()
            .map(tls::AsyncTls::new)
            .transpose()
            .map_err(|e| crate::Error::io("cannot watch the TLS handshake cap", e))?
    };
    let shared = Arc::new(Shared {
        config: server.config.clone(),
        lifecycle: Arc::clone(&server.conn),
        close_connections: CancellationToken::new(),
        tls,
    });
    let listeners = listeners
        .into_iter()
        .zip(server.kinds.iter().copied())
        .collect();
    let udp_tasks = udp::spawn(&runtime, server)?;
    let result = runtime.block_on(async {
        let result = run(listeners, server.shutdown.clone(), shared).await;
        // They end at the shutdown signal; a TCP failure triggered it too.
        server.shutdown.trigger();
        for task in udp_tasks {
            let _ = task.await;
        }
        result
    });
    // Connection tasks have ended by now (or been given up on after the grace period); any
    // task left is dropped here.
    runtime.shutdown_timeout(CLOSE_GRACE);
    result
}

/// What every connection task needs.
struct Shared {
    config: ServerConfig,
    lifecycle: Arc<Lifecycle>,
    /// Cancelled at the shutdown deadline: connection tasks then close their sockets.
    close_connections: CancellationToken,
    /// For `tls://` and `tls+proxy://` listeners.
    tls: Option<tls::AsyncTls>,
}

/// Accepts until shutdown (or a fatal accept error), then drains the connections.
async fn run(
    listeners: Vec<(std::net::TcpListener, ListenerKind)>,
    shutdown: Shutdown,
    shared: Arc<Shared>,
) -> crate::Result<()> {
    let limit = Limit::new(shared.config.max_conns)
        .map_err(|e| crate::Error::io("cannot create the connection limit", e))?;
    let stop_accepting = CancellationToken::new();
    let connections = TaskTracker::new();

    let mut acceptors = JoinSet::new();
    for (index, (listener, kind)) in listeners.into_iter().enumerate() {
        let listener = TcpListener::from_std(listener)
            .map_err(|e| crate::Error::io("cannot register a listener", e))?;
        let room = watch_readable(limit.room_fd())
            .map_err(|e| crate::Error::io("cannot watch the connection limit", e))?;
        acceptors.spawn(accept_loop(
            listener,
            (index, kind),
            Arc::clone(&limit),
            room,
            stop_accepting.clone(),
            connections.clone(),
            Arc::clone(&shared),
        ));
    }

    let outcome = tokio::select! {
        watched = shutdown_requested(&shutdown) => {
            watched.map_err(|e| crate::Error::io("cannot watch the shutdown signal", e))
        }
        Some(ended) = acceptors.join_next() => match ended {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(crate::Error::io("accept failed", e)),
            Err(e) => Err(crate::Error::io("an accept task failed", io::Error::other(e))),
        },
    };
    stop_accepting.cancel();
    while acceptors.join_next().await.is_some() {}

    connections.close();
    shared
        .lifecycle
        .log_draining(connections.len(), shared.config.shutdown_timeout);
    if tokio::time::timeout(shared.config.shutdown_timeout, connections.wait())
        .await
        .is_err()
    {
        shared.lifecycle.log_deadline(connections.len());
        shared.close_connections.cancel();
        if tokio::time::timeout(CLOSE_GRACE, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                live = connections.len(),
                "connections did not close in time"
            );
        }
    }
    outcome
}

/// Resolves once shutdown has been triggered. The shutdown descriptor stays readable from then
/// on, so watching a duplicate of it needs no draining and sees a trigger that came earlier.
async fn shutdown_requested(shutdown: &Shutdown) -> io::Result<()> {
    let watched = watch_readable(shutdown.as_fd())?;
    while !shutdown.is_triggered() {
        let _ready = watched.readable().await?;
        if !shutdown.is_triggered() {
            // Readable but the flag is not set yet: the signal handler is between its two
            // steps. Look again shortly rather than spin on the still-readable descriptor.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// A duplicate of `fd`, registered with the runtime for readability. Must be called within
/// the runtime.
fn watch_readable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<AsyncFd<OwnedFd>> {
    let watched: OwnedFd = fd.try_clone_to_owned()?;
    // SAFETY: `watched` is an `OwnedFd` moved into the `AsyncFd`: it is open, nothing else can
    // close or replace it, and `as_raw_fd` returns the same descriptor until the `AsyncFd` drops.
    unsafe { AsyncFd::register_with_interest(watched, Interest::READABLE) }.map_err(io::Error::from)
}

/// A slot under the limit, waiting (on the limit's room descriptor) while the server is full.
async fn acquire(limit: &Arc<Limit>, room: &AsyncFd<OwnedFd>) -> io::Result<Permit> {
    loop {
        if let Some(permit) = limit.try_acquire() {
            return Ok(permit);
        }
        let mut ready = room.readable().await?;
        limit.clear_room_signal();
        ready.clear_ready();
    }
}

/// Accepts connections on one listener until `stop` is cancelled; a task per connection.
async fn accept_loop(
    listener: TcpListener,
    // Which listener (its index in `--listen` order) and what it expects.
    (index, kind): (usize, ListenerKind),
    limit: Arc<Limit>,
    room: AsyncFd<OwnedFd>,
    stop: CancellationToken,
    connections: TaskTracker,
    shared: Arc<Shared>,
) -> io::Result<()> {
    loop {
        // Take a permit before accepting: beyond the limit, clients wait in the backlog.
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            permit = acquire(&limit, &room) => permit?,
        };
        let (stream, peer) = loop {
            let accepted = tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(()),
                accepted = listener.accept() => accepted,
            };
            let err = match accepted {
                Ok(connection) => break connection,
                Err(e) => e,
            };
            match shared.lifecycle.accept_error(&err) {
                AcceptError::WouldBlock | AcceptError::Retry => {
                    tracing::debug!("accept: {err}; retrying");
                }
                // Shutdown stopped the listener.
                AcceptError::Closed => return Ok(()),
                AcceptError::Exhausted => {
                    tokio::select! {
                        biased;
                        () = stop.cancelled() => return Ok(()),
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
                AcceptError::Fatal => return Err(err),
            }
        };
        shared.lifecycle.configure(&stream, peer);
        // Refused: dropping the stream closes it without an echo; the permit frees its slot.
        if kind.expects_proxy_header() {
            if shared.lifecycle.check_proxy_peer(peer).is_ok() {
                connections.spawn(serve_proxied(
                    stream,
                    (index, kind),
                    peer,
                    permit,
                    Arc::clone(&shared),
                ));
            }
            continue;
        }
        let Ok(admitted) = shared.lifecycle.admit(index, peer) else {
            continue;
        };
        if kind == ListenerKind::Tls {
            connections.spawn(tls::serve(
                stream,
                admitted,
                Vec::new(),
                permit,
                Arc::clone(&shared),
            ));
            continue;
        }
        connections.spawn(serve_connection(
            stream,
            admitted,
            Vec::new(),
            permit,
            Arc::clone(&shared),
        ));
    }
}

/// Serves one connection to its end, logs one line about it, then frees its permit.
async fn serve_connection(
    mut stream: TcpStream,
    admitted: Admitted,
    leftover: Vec<u8>,
    _permit: Permit,
    shared: Arc<Shared>,
) {
    let mut bytes = 0u64;
    let end = tokio::select! {
        biased;
        () = shared.close_connections.cancelled() => End::Shutdown,
        ended = async {
            // What came with the PROXY header is the start of the stream: echoed first.
            stream.write_all(&leftover).await.map_err(End::Failed)?;
            bytes += leftover.len() as u64;
            echo_until_end(&mut stream, &mut bytes, shared.config.idle_timeout).await
        } => {
            match ended {
                Ok(()) => End::ClientClosed,
                Err(end) => end,
            }
        }
    };
    drop(stream);
    shared.lifecycle.close(admitted, bytes, &end);
}

/// A `+proxy` connection: reads its PROXY header within `--proxy-timeout`, admits the client
/// it names and serves it; a missing, bad or late header closes it (counted and logged).
async fn serve_proxied(
    mut stream: TcpStream,
    (listener, kind): (usize, ListenerKind),
    proxy: SocketAddr,
    permit: Permit,
    shared: Arc<Shared>,
) {
    let mut reader = HeaderReader::new();
    let read = tokio::select! {
        biased;
        () = shared.close_connections.cancelled() => Err(HeaderError::Truncated { received: reader.buffered() }),
        read = tokio::time::timeout(shared.lifecycle.proxy_timeout(), read_header(&mut stream, &mut reader)) => {
            read.unwrap_or_else(|_elapsed| Err(reader.timed_out()))
        }
    };
    let (header, leftover) = match read {
        Ok(read) => read,
        Err(e) => {
            shared
                .lifecycle
                .refuse_because(proxy, Refusal::ProxyHeader, Some(&e));
            return;
        }
    };
    let Ok(admitted) = shared.lifecycle.admit_proxied(listener, proxy, &header) else {
        return;
    };
    if kind == ListenerKind::TlsProxy {
        // What followed the header is the start of the TLS stream.
        tls::serve(stream, admitted, leftover, permit, shared).await;
    } else {
        serve_connection(stream, admitted, leftover, permit, shared).await;
    }
}

/// Reads until the PROXY header is complete; returns it and the bytes that followed it.
async fn read_header(
    stream: &mut TcpStream,
    reader: &mut HeaderReader,
) -> Result<(ProxyHeader, Vec<u8>), HeaderError> {
    let mut buf = [0u8; 512];
    loop {
        let read = stream.read(&mut buf).await.map_err(HeaderError::Io)?;
        if read == 0 {
            return Err(reader.end_of_stream());
        }
        if let Some((header, rest)) = reader.feed(&buf[..read])? {
            return Ok((header, rest.to_vec()));
        }
    }
}

/// Echoes until the client half-closes (then closes our side too), an error, or the idle
/// timeout. Counts echoed bytes in `echoed` as they go, so a cancelled echo still reports them.
///
/// This future is what an idle connection costs, so whatever only some connections need (the
/// idle timer, a pending echo) is boxed rather than stored in it.
async fn echo_until_end(
    stream: &mut TcpStream,
    echoed: &mut u64,
    idle: Option<Duration>,
) -> Result<(), End> {
    let mut timer = IdleTimer::new(idle);
    loop {
        let step = tokio::select! {
            biased;
            step = read_and_echo(stream) => step,
            () = timer.expired() => return Err(End::IdleTimeout),
        };
        timer.restart();
        match step {
            Ok(Step::Ended) => break,
            Ok(Step::Echoed(n)) => *echoed += n as u64,
            Ok(Step::Pending { read, rest }) => {
                Box::pin(write_rest(stream, &rest, &mut timer)).await?;
                *echoed += read as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(End::Failed(e)),
        }
    }
    // The client half-closed and has had every byte back: close our side as well. If it has
    // gone entirely, the shutdown fails (ENOTCONN), which changes nothing: it got everything.
    let _ = stream.shutdown().await;
    Ok(())
}

/// The `--idle-timeout` of one connection: a single boxed timer, pushed back on activity.
struct IdleTimer {
    sleep: Option<(Pin<Box<Sleep>>, Duration)>,
}

impl IdleTimer {
    fn new(idle: Option<Duration>) -> Self {
        IdleTimer {
            sleep: idle.map(|idle| (Box::pin(tokio::time::sleep(idle)), idle)),
        }
    }

    /// Something moved: the connection gets a whole idle timeout again.
    fn restart(&mut self) {
        if let Some((sleep, idle)) = &mut self.sleep {
            sleep.as_mut().reset(tokio::time::Instant::now() + *idle);
        }
    }

    /// Resolves when the connection has been idle for the timeout; never without one.
    async fn expired(&mut self) {
        match &mut self.sleep {
            Some((sleep, _)) => sleep.as_mut().await,
            None => std::future::pending().await,
        }
    }
}

/// What one read and the synchronous part of its echo did.
enum Step {
    /// The client sent end of stream.
    Ended,
    /// Read and echoed this many bytes in full.
    Echoed(usize),
    /// Read `read` bytes; the kernel took only part of the echo and `rest` is still to send.
    Pending { read: usize, rest: Vec<u8> },
}

/// Waits until the socket is readable, reads once into the worker thread's buffer and writes
/// as much of it back as the socket takes right now.
///
/// The buffer is borrowed only within one poll, never across an await, so it can belong to the
/// thread rather than the connection. Reading through `poll_read` rather than `readable` and
/// `try_read` lets tokio note that a short read emptied the socket, which saves the read that
/// would otherwise only return `WouldBlock` on every round trip.
fn read_and_echo(stream: &mut TcpStream) -> impl Future<Output = io::Result<Step>> + '_ {
    std::future::poll_fn(move |cx| {
        READ_BUFFER.with_borrow_mut(|buf| {
            let mut unfilled = ReadBuf::new(buf);
            ready!(Pin::new(&mut *stream).poll_read(cx, &mut unfilled))?;
            let read = unfilled.filled().len();
            Poll::Ready(echo_now(stream, &buf[..read]))
        })
    })
}

/// Writes as much of `data` (just read) as the socket takes without waiting.
fn echo_now(stream: &TcpStream, data: &[u8]) -> io::Result<Step> {
    let read = data.len();
    if read == 0 {
        return Ok(Step::Ended);
    }
    let mut written = 0;
    while written < read {
        match stream.try_write(&data[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    if written == read {
        Ok(Step::Echoed(read))
    } else {
        Ok(Step::Pending {
            read,
            rest: data[written..].to_vec(),
        })
    }
}

/// Writes `rest` in full, waiting for the socket to become writable; any progress restarts the
/// idle timer.
async fn write_rest(stream: &TcpStream, mut rest: &[u8], timer: &mut IdleTimer) -> Result<(), End> {
    while !rest.is_empty() {
        tokio::select! {
            biased;
            writable = stream.writable() => writable?,
            () = timer.expired() => return Err(End::IdleTimeout),
        }
        match stream.try_write(rest) {
            Ok(n) => {
                rest = &rest[n..];
                timer.restart();
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(End::Failed(e)),
        }
    }
    Ok(())
}
