//! `async`: a tokio task per connection, on one current-thread tokio runtime per worker
//! (`--workers` threads), each runtime with its own accept loop on every listener.
//!
//! How it works: the model builds its runtimes itself (not `#[tokio::main]`, so that `main`
//! stays single-threaded for the fork-based models). Each worker thread runs a current-thread
//! runtime with an accept task per listener (all workers accept from the same listening
//! socket; the kernel hands each connection to one of them), and each accepted connection
//! gets a task on that worker's runtime. A task waits for the socket to become readable, reads
//! into a buffer owned by the worker *thread* (not the task; borrowed only within one poll),
//! and writes the echo back at once with `try_write`. Only when the kernel takes less than all
//! of it is the remainder copied into a task-owned `Vec` and awaited before the next read, so
//! a client that does not read its echo stops being read (backpressure) and pins at most one
//! read's worth.
//!
//! Why a runtime per worker rather than one multi-thread runtime: tokio's multi-thread
//! scheduler keeps a bounded run queue per thread and moves the overflow to a global queue
//! that a worker looks at only now and then, so with a thousand connections ready at once the
//! tasks that overflowed wait many turns: their round trips made the tail (BENCHMARKS.md,
//! "async's tail"). A current-thread runtime's run queue is unbounded and served in order, like
//! an epoll loop's ready list, and a connection never moves between threads.
//!
//! What it costs: an idle connection is a parked task plus its socket; no thread, stack or
//! buffer. Its future is under 500 bytes; with tokio's task and I/O registration it comes to
//! about 1.2 KiB (BENCHMARKS.md has the measured figure). A round trip costs a read and a
//! write, plus a share of an `epoll_wait` and of tokio's scheduling: about the CPU time of a
//! hand-written epoll loop.
//!
//! Limits: `--max-conns` is the lifecycle's `Limit`, shared by the workers; an accept task
//! takes a permit *before* accepting, so clients beyond the limit wait in the listen backlog
//! (connected, not reset) until a connection closes. `--idle-timeout` is one `tokio::time`
//! timer per connection, pushed back by every read and every partial write. Running out of
//! descriptors on accept (EMFILE, ENFILE...) warns once and backs off for
//! [`crate::net::ACCEPT_BACKOFF`] instead of spinning; an aborted handshake is skipped; any
//! other accept error drains and ends the server.
//!
//! Shutdown: the first worker's thread also runs the coordinator, which watches the server's
//! shutdown descriptor through [`AsyncFd`]. Then every accept task stops, the [`TaskTracker`]
//! of connections (shared by all runtimes) is closed and connections may finish for
//! `--shutdown-timeout`; then each runtime is shut down, dropping the tasks still running.
//! Each connection's [`CloseRecord`] writes its close line when its task ends or is dropped,
//! so a connection task waits on its socket alone rather than also polling a shutdown signal
//! (a lock on a shared cache line) at every wake-up.
//!
//! UDP (`udp.rs`): each worker's runtime has a task per `udp://` socket, all sharing the one
//! socket; each waits for readability, receives in batches (`recvmmsg` through `try_io`) until
//! `WouldBlock`, and sends each batch's admitted echoes with one `sendmmsg` (awaiting
//! writability if the send buffer is full). Cost: a `recvmmsg` and a `sendmmsg` per batch of
//! up to 64 plus tokio's readiness bookkeeping and a share of `epoll_wait`; a batch of 64
//! slots of 64 KiB per task (touched as far as datagrams fill them). At shutdown
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
use std::sync::{Arc, Mutex};
use std::task::{ready, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
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

/// How long a runtime's end waits for threads of its blocking pool: the model starts none, so
/// this only bounds what a dependency might have started.
const BLOCKING_POOL_WAIT: Duration = Duration::from_secs(1);

thread_local! {
    static READ_BUFFER: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; READ_BUFFER_SIZE].into_boxed_slice());
}

/// Runs the async model.
pub fn serve(server: &Server) -> crate::Result<()> {
    let limit = Limit::new(server.config.max_conns)
        .map_err(|e| crate::Error::io("cannot create the connection limit", e))?;
    let tls = server.tls.clone().map(tls::AsyncTls::new);
    let shared = Arc::new(TaskContext {
        config: server.config.clone(),
        lifecycle: Arc::clone(&server.conn),
        limit,
        stop_accepting: CancellationToken::new(),
        connections: TaskTracker::new(),
        drained: CancellationToken::new(),
        failure: Mutex::new(None),
        tls,
    });
    // Every runtime, registration and descriptor is made before any worker accepts, so that
    // running out of descriptors later (which accept survives) cannot stop a worker starting.
    let mut workers = (0..server.config.workers.max(1))
        .map(|_| RuntimeWorker::prepare(server, &shared))
        .collect::<crate::Result<Vec<_>>>()?;
    let first = workers.remove(0);
    let acceptors = TaskTracker::new();
    std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for (id, worker) in workers.into_iter().enumerate() {
            let (shared, acceptors) = (Arc::clone(&shared), acceptors.clone());
            let shutdown = server.shutdown.clone();
            let thread = std::thread::Builder::new()
                .name(format!("async-worker-{}", id + 1))
                .spawn_scoped(scope, move || {
                    worker.run(&shared, &acceptors, &shutdown, false)
                })
                .map_err(|e| crate::Error::io("cannot start an async worker thread", e))?;
            threads.push(thread);
        }
        first.run(&shared, &acceptors, &server.shutdown, true);
        for thread in threads {
            // A worker that panicked has already printed why; the others drained.
            let _ = thread.join();
        }
        Ok::<(), crate::Error>(())
    })?;
    let failure = shared
        .failure
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    failure.map_or(Ok(()), Err)
}

/// What every worker and connection task needs.
struct TaskContext {
    config: ServerConfig,
    lifecycle: Arc<Lifecycle>,
    limit: Arc<Limit>,
    /// Cancelled once shutdown has started: the accept tasks stop.
    stop_accepting: CancellationToken,
    /// Every connection task, on whichever runtime it runs.
    connections: TaskTracker,
    /// Cancelled once the connections have drained (or were given up on): the runtimes end.
    drained: CancellationToken,
    /// The first error that ends the server (a fatal accept error, a runtime that would not
    /// start), returned by [`serve`].
    failure: Mutex<Option<crate::Error>>,
    /// For `tls://` and `tls+proxy://` listeners.
    tls: Option<tls::AsyncTls>,
}

impl TaskContext {
    /// Records why the server must end, and ends it.
    fn fail(&self, error: crate::Error, shutdown: &Shutdown) {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(error);
        shutdown.trigger();
    }
}

/// One worker: a current-thread runtime with its accept loops (one per listener, each with
/// its watch on the limit's room) and its UDP tasks, all registered with that runtime.
struct RuntimeWorker {
    runtime: tokio::runtime::Runtime,
    listeners: Vec<(TcpListener, (usize, ListenerKind), AsyncFd<OwnedFd>)>,
    udp_tasks: Vec<tokio::task::JoinHandle<()>>,
    shutdown_watch: ShutdownWatch,
}

impl RuntimeWorker {
    /// Builds the runtime and registers duplicates of the server's sockets with it.
    fn prepare(server: &Server, shared: &TaskContext) -> crate::Result<RuntimeWorker> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| crate::Error::io("cannot start a tokio runtime", e))?;
        let _entered = runtime.enter();
        let mut listeners = Vec::new();
        for (index, (listener, kind)) in server.listeners.iter().zip(&server.kinds).enumerate() {
            let registered = listener
                .try_clone()
                .and_then(|listener| {
                    // The server keeps its listener; the runtime gets a non-blocking duplicate.
                    listener.set_nonblocking(true)?;
                    TcpListener::from_std(listener)
                })
                .map_err(|e| crate::Error::io("cannot register a listener", e))?;
            let room = watch_readable(shared.limit.room_fd())
                .map_err(|e| crate::Error::io("cannot watch the connection limit", e))?;
            listeners.push((registered, (index, *kind), room));
        }
        let udp_tasks = udp::spawn(server)?;
        let shutdown_watch = ShutdownWatch::new(&server.shutdown)
            .map_err(|e| crate::Error::io("cannot watch the shutdown signal", e))?;
        Ok(RuntimeWorker {
            runtime,
            listeners,
            udp_tasks,
            shutdown_watch,
        })
    }

    /// Accepts until shutdown, then runs this runtime's connections until they have drained.
    /// The worker that `coordinates` also watches for shutdown and drains every runtime.
    fn run(
        self,
        shared: &Arc<TaskContext>,
        acceptors: &TaskTracker,
        shutdown: &Shutdown,
        coordinates: bool,
    ) {
        let RuntimeWorker {
            runtime,
            listeners,
            udp_tasks,
            shutdown_watch,
        } = self;
        runtime.block_on(async {
            for (listener, which, room) in listeners {
                let (shared, shutdown) = (Arc::clone(shared), shutdown.clone());
                acceptors.spawn(async move {
                    if let Err(e) = accept_loop(listener, which, room, &shared).await {
                        shared.fail(crate::Error::io("accept failed", e), &shutdown);
                    }
                });
            }
            if coordinates {
                coordinate_shutdown(&shutdown_watch, shutdown, shared, acceptors).await;
            }
            for task in udp_tasks {
                let _ = task.await;
            }
            // Connection tasks of this runtime run until the coordinator says they have drained.
            shared.drained.cancelled().await;
        });
        // Connection tasks still running now outlived the shutdown deadline: they are dropped
        // here, each writing its close record ([`CloseRecord`]) as closed by shutdown.
        runtime.shutdown_timeout(BLOCKING_POOL_WAIT);
    }
}

/// Waits for shutdown, stops every accept task, then drains the connections of every runtime.
async fn coordinate_shutdown(
    watch: &ShutdownWatch,
    shutdown: &Shutdown,
    shared: &TaskContext,
    acceptors: &TaskTracker,
) {
    if let Err(e) = watch.requested().await {
        shared.fail(
            crate::Error::io("cannot watch the shutdown signal", e),
            shutdown,
        );
    }
    shared.stop_accepting.cancel();
    // Every worker spawned its accept tasks when it started; one that has not started yet
    // sees `stop_accepting` cancelled and its tasks end at once.
    acceptors.close();
    acceptors.wait().await;

    let connections = &shared.connections;
    connections.close();
    shared
        .lifecycle
        .log_draining(connections.len(), shared.config.shutdown_timeout);
    if tokio::time::timeout(shared.config.shutdown_timeout, connections.wait())
        .await
        .is_err()
    {
        // The runtimes drop the tasks still running when they end; each one's close record
        // then says the server closed it.
        shared.lifecycle.log_deadline(connections.len());
    }
    shared.drained.cancel();
}

/// The shutdown descriptor, duplicated and registered with a runtime before anything is served:
/// made later, the duplicate could fail while the server is out of descriptors.
struct ShutdownWatch {
    watched: AsyncFd<OwnedFd>,
    shutdown: Shutdown,
}

impl ShutdownWatch {
    /// Must be called within the runtime that will await it.
    fn new(shutdown: &Shutdown) -> io::Result<ShutdownWatch> {
        Ok(ShutdownWatch {
            watched: watch_readable(shutdown.as_fd())?,
            shutdown: shutdown.clone(),
        })
    }

    /// Resolves once shutdown has been triggered. The shutdown descriptor stays readable from
    /// then on, so the watch needs no draining and sees a trigger that came earlier.
    async fn requested(&self) -> io::Result<()> {
        while !self.shutdown.is_triggered() {
            let _ready = self.watched.readable().await?;
            if !self.shutdown.is_triggered() {
                // Readable but the flag is not set yet: the signal handler is between its two
                // steps. Look again shortly rather than spin on the still-readable descriptor.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }
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

/// Accepts connections on one listener until accepting stops; a task per connection.
async fn accept_loop(
    listener: TcpListener,
    // Which listener (its index in `--listen` order) and what it expects.
    (index, kind): (usize, ListenerKind),
    room: AsyncFd<OwnedFd>,
    shared: &Arc<TaskContext>,
) -> io::Result<()> {
    let (limit, stop, connections) = (&shared.limit, &shared.stop_accepting, &shared.connections);
    loop {
        // Take a permit before accepting: beyond the limit, clients wait in the backlog.
        let permit = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            permit = acquire(limit, &room) => permit?,
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
                    Arc::clone(shared),
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
                Arc::clone(shared),
            ));
            continue;
        }
        connections.spawn(serve_connection(
            stream,
            admitted,
            Vec::new(),
            permit,
            Arc::clone(shared),
        ));
    }
}

/// Serves one connection to its end, logs one line about it, then frees its permit.
async fn serve_connection(
    mut stream: TcpStream,
    admitted: Admitted,
    leftover: Vec<u8>,
    _permit: Permit,
    shared: Arc<TaskContext>,
) {
    let mut record = CloseRecord::new(&shared.lifecycle, admitted);
    let ended = async {
        // What came with the PROXY header is the start of the stream: echoed first.
        shared.lifecycle.received(leftover.len());
        stream.write_all(&leftover).await.map_err(End::Failed)?;
        shared.lifecycle.sent(leftover.len());
        record.echoed += leftover.len() as u64;
        echo_until_end(
            &mut stream,
            &mut record.echoed,
            shared.config.idle_timeout,
            &shared.lifecycle,
        )
        .await
    }
    .await;
    drop(stream);
    record.close(ended);
}

/// The one close record of a connection. Its task writes it when the connection ends; a task
/// still running at the shutdown deadline is dropped with its runtime instead, and the record
/// then says the server closed it. So a connection task waits on its socket alone: no
/// shutdown signal is polled (and its lock taken) at every wake-up.
pub(super) struct CloseRecord<'a> {
    lifecycle: &'a Lifecycle,
    /// Taken when the record is written.
    admitted: Option<Admitted>,
    /// Bytes echoed so far.
    pub(super) echoed: u64,
}

impl<'a> CloseRecord<'a> {
    pub(super) fn new(lifecycle: &'a Lifecycle, admitted: Admitted) -> Self {
        CloseRecord {
            lifecycle,
            admitted: Some(admitted),
            echoed: 0,
        }
    }

    /// Writes the record: the connection's serving ended this way (`Ok`: the client closed).
    pub(super) fn close(mut self, ended: Result<(), End>) {
        if let Some(admitted) = self.admitted.take() {
            let end = ended.err().unwrap_or(End::ClientClosed);
            self.lifecycle.close(admitted, self.echoed, &end);
        }
    }
}

impl Drop for CloseRecord<'_> {
    fn drop(&mut self) {
        // Not written by its task: the runtime dropped the task at the shutdown deadline.
        if let Some(admitted) = self.admitted.take() {
            self.lifecycle.close(admitted, self.echoed, &End::Shutdown);
        }
    }
}

/// A `+proxy` connection: reads its PROXY header within `--proxy-timeout`, admits the client
/// it names and serves it; a missing, bad or late header closes it (counted and logged).
async fn serve_proxied(
    mut stream: TcpStream,
    (listener, kind): (usize, ListenerKind),
    proxy: SocketAddr,
    permit: Permit,
    shared: Arc<TaskContext>,
) {
    let mut wait = HeaderWait {
        lifecycle: &shared.lifecycle,
        proxy,
        reader: Some(HeaderReader::new()),
    };
    let Some((header, leftover)) = wait.read(&mut stream).await else {
        return;
    };
    drop(wait);
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

/// The wait for a `+proxy` connection's header, within `--proxy-timeout`. A task dropped
/// while it waits (at the shutdown deadline) still records the refusal.
struct HeaderWait<'a> {
    lifecycle: &'a Lifecycle,
    proxy: SocketAddr,
    /// Taken once the wait has an outcome.
    reader: Option<HeaderReader>,
}

impl HeaderWait<'_> {
    /// The header and what followed it; `None` once a missing, bad or late header has been
    /// refused (counted and logged).
    async fn read(&mut self, stream: &mut TcpStream) -> Option<(ProxyHeader, Vec<u8>)> {
        let reader = self.reader.as_mut()?;
        let read =
            tokio::time::timeout(self.lifecycle.proxy_timeout(), read_header(stream, reader))
                .await
                .unwrap_or_else(|_elapsed| Err(reader.timed_out()));
        self.reader = None;
        match read {
            Ok(read) => Some(read),
            Err(e) => {
                self.lifecycle
                    .refuse_because(self.proxy, Refusal::ProxyHeader, Some(&e));
                None
            }
        }
    }
}

impl Drop for HeaderWait<'_> {
    fn drop(&mut self) {
        if self.reader.take().is_some() {
            // As the other event models word it.
            let why = format_args!("{} before the PROXY header", End::Shutdown);
            self.lifecycle
                .refuse_because(self.proxy, Refusal::ProxyHeader, Some(&why));
        }
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
/// timeout. Counts echoed bytes in `echoed` as they go, so a cancelled echo still reports them,
/// and in `lifecycle`'s counters.
///
/// This future is what an idle connection costs, so whatever only some connections need (the
/// idle timer, a pending echo) is boxed rather than stored in it.
async fn echo_until_end(
    stream: &mut TcpStream,
    echoed: &mut u64,
    idle: Option<Duration>,
    lifecycle: &Lifecycle,
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
            Ok(Step::Echoed(n)) => {
                lifecycle.echoed(n);
                *echoed += n as u64;
            }
            Ok(Step::Pending { read, rest }) => {
                lifecycle.received(read);
                lifecycle.sent(read - rest.len());
                Box::pin(write_rest(stream, &rest, &mut timer, lifecycle)).await?;
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
async fn write_rest(
    stream: &TcpStream,
    mut rest: &[u8],
    timer: &mut IdleTimer,
    lifecycle: &Lifecycle,
) -> Result<(), End> {
    while !rest.is_empty() {
        tokio::select! {
            biased;
            writable = stream.writable() => writable?,
            () = timer.expired() => return Err(End::IdleTimeout),
        }
        match stream.try_write(rest) {
            Ok(n) => {
                lifecycle.sent(n);
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
