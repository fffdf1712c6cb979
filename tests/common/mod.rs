//! Shared test helpers: start the built `multiecho` binary as a subprocess on a free loopback
//! port ([`ServerBuilder`]), wait for it to announce where it listens on `--ready-fd` (no
//! sleeping, no log parsing), talk to it, wait for child processes with a deadline
//! ([`wait_child`]) and read their state from /proc (`procfs`). [`in_process`] runs the
//! models that do not fork inside the test instead, watched through their `Stats`.
#![allow(dead_code)]

pub mod haproxy;
pub mod in_process;
pub mod metrics;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_multiecho");

/// Every concurrency model, in `--help`'s order: the list a test walks when every model must
/// behave alike.
pub const ALL_MODELS: [&str; 8] = [
    "iterative",
    "process",
    "prefork",
    "thread",
    "pool",
    "epoll",
    "async",
    "uring",
];

/// How long any single wait in a test may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A `multiecho serve` subprocess. Killed on drop. Started by a [`ServerBuilder`].
pub struct Server {
    child: Child,
    /// The first listener's address.
    pub addr: SocketAddr,
    /// Every listener, as the server announced it on `--ready-fd`: kind (`tcp`, `tcp+proxy`)
    /// and address.
    pub listeners: Vec<(String, SocketAddr)>,
    log: Arc<Mutex<String>>,
    /// Says when the log reader reached the end of the server's stderr.
    log_complete: std::sync::mpsc::Receiver<()>,
}

/// How to start a `multiecho serve` subprocess: `multiecho serve --model MODEL --listen
/// 127.0.0.1:0 ARGS... --ready-fd 3`, with `RUST_LOG=info` and no service manager's
/// variables, waiting until it announces its listeners on `--ready-fd` (a pipe). The one way
/// tests start a server:
///
/// ```ignore
/// let server = ServerBuilder::new("epoll").args(&["--workers", "1"]).nofile(64).start();
/// ```
#[derive(Clone, Debug)]
pub struct ServerBuilder {
    model: String,
    args: Vec<String>,
    nofile: Option<u64>,
    envs: Vec<(String, String)>,
}

impl ServerBuilder {
    /// A server of `model` on a free loopback port.
    pub fn new(model: &str) -> ServerBuilder {
        ServerBuilder {
            model: model.to_string(),
            args: Vec::new(),
            nofile: None,
            envs: Vec::new(),
        }
    }

    /// More command-line arguments (after `--listen 127.0.0.1:0`).
    pub fn args(mut self, args: &[&str]) -> ServerBuilder {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Sets the server's open-files limit (soft and hard) to `limit` before it runs, so it
    /// cannot raise it.
    pub fn nofile(mut self, limit: u64) -> ServerBuilder {
        self.nofile = Some(limit);
        self
    }

    /// An environment variable for the server (it may override `RUST_LOG`).
    pub fn env(mut self, key: &str, value: &str) -> ServerBuilder {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Several environment variables, as [`ServerBuilder::env`].
    pub fn envs(self, envs: &[(&str, &str)]) -> ServerBuilder {
        envs.iter().fold(self, |b, (k, v)| b.env(k, v))
    }

    /// Starts the server; `Err` with its log when it refused to start.
    pub fn try_start(self) -> Result<Server, String> {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--model", &self.model, "--listen", "127.0.0.1:0"])
            .args(&self.args)
            .args(["--ready-fd", &READY_FD.to_string()])
            .env("RUST_LOG", "info")
            // A service manager's variables in the test's own environment are not for it.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(limit) = self.nofile {
            // SAFETY: setrlimit(2) is async-signal-safe and touches no memory of the parent.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        limit,
                        limit,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        let ready = ReadyPipe::new();
        ready.pass_to(&mut command);
        let mut child = command.spawn().expect("spawn multiecho serve");
        // Only the child holds the write end now, so its exit ends the pipe too.
        let ready = ready.into_reader();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (log_done, log_complete) = std::sync::mpsc::channel();
        let log_reader = {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
                let _ = log_done.send(());
            })
        };
        match read_ready_lines(ready) {
            Some(listeners) => Ok(Server {
                child,
                addr: listeners[0].1,
                listeners,
                log,
                log_complete,
            }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                // It exited, so its stderr ends and the reader thread has every line.
                let _ = log_reader.join();
                let log = log.lock().unwrap().clone();
                Err(log)
            }
        }
    }

    /// Starts the server, or panics with its log if it did not start.
    pub fn start(self) -> Server {
        let model = self.model.clone();
        self.try_start()
            .unwrap_or_else(|log| panic!("{model} server did not start; its log:\n{log}"))
    }

    /// Starts the server, or returns `None` (after [`skip_unless_ci`] says why) when the model
    /// is `uring` and the machine has no io_uring: that is a skip, not a failure. Any other
    /// failure to start panics with the server's log.
    pub fn start_or_skip(self) -> Option<Server> {
        let model = self.model.clone();
        match self.try_start() {
            Ok(server) => Some(server),
            Err(log) if model == "uring" && uring_unavailable(&log) => {
                skip_unless_ci(&format!("io_uring is not available here: {log}"));
                None
            }
            Err(log) => panic!("{model} server did not start; its log:\n{log}"),
        }
    }
}

impl Server {
    /// The address of the first listener of `kind` (`tcp+proxy`, `udp`, `tls`, `metrics`) the
    /// server announced on `--ready-fd`.
    pub fn listener(&self, kind: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, addr)| *addr)
            .unwrap_or_else(|| panic!("no {kind} listener in {:?}", self.listeners))
    }

    /// `ServerBuilder::new(model).args(extra).try_start()`.
    pub fn try_start(model: &str, extra: &[&str]) -> Result<Server, String> {
        ServerBuilder::new(model).args(extra).try_start()
    }

    /// [`Server::try_start`] with an open-files limit ([`ServerBuilder::nofile`]).
    pub fn try_start_limited(
        model: &str,
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Result<Server, String> {
        Server::try_start_with(model, extra, nofile, &[])
    }

    /// [`Server::try_start_limited`] with environment variables ([`ServerBuilder::envs`]).
    pub fn try_start_with(
        model: &str,
        extra: &[&str],
        nofile: Option<u64>,
        envs: &[(&str, &str)],
    ) -> Result<Server, String> {
        let builder = ServerBuilder::new(model).args(extra).envs(envs);
        match nofile {
            Some(limit) => builder.nofile(limit),
            None => builder,
        }
        .try_start()
    }

    /// `ServerBuilder::new(model).args(extra).start()`.
    pub fn start(model: &str, extra: &[&str]) -> Server {
        ServerBuilder::new(model).args(extra).start()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        signal(self.pid(), libc::SIGTERM);
    }

    /// Waits for the server to exit, up to `timeout`; `None` if it is still running. Once it
    /// has exited, [`Server::log`] holds its last lines too: this waits (briefly, in case a
    /// leftover child still holds the pipe) for the log reader to reach the end of stderr.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = wait_child(&mut self.child, timeout)?;
        let _ = self.log_complete.recv_timeout(Duration::from_secs(2));
        Some(status)
    }

    /// SIGTERM, then wait; panics if the server does not exit in time.
    pub fn stop(mut self) -> ExitStatus {
        self.terminate_and_wait()
    }

    /// SIGTERM, then wait, keeping the server's log to read; panics if it does not exit in
    /// time.
    pub fn terminate_and_wait(&mut self) -> ExitStatus {
        self.terminate();
        self.wait_timeout(PATIENCE)
            .unwrap_or_else(|| panic!("server did not exit after SIGTERM; log:\n{}", self.log()))
    }

    /// Waits until `check(log)` holds, or panics after [`PATIENCE`].
    pub fn wait_for_log(&self, what: &str, check: impl Fn(&str) -> bool) {
        if !wait_until(PATIENCE, || check(&self.log())) {
            panic!("timed out waiting for {what}; log:\n{}", self.log());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The descriptor number the server's `--ready-fd` pipe gets in the child.
pub const READY_FD: i32 = 3;

/// A pipe for a child's `--ready-fd`: both ends close-on-exec in this (multi-threaded) test
/// process, so no other child inherits them; the write end becomes [`READY_FD`] in the child.
pub struct ReadyPipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
}

impl ReadyPipe {
    pub fn new() -> ReadyPipe {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
        ReadyPipe { read, write }
    }

    /// Makes `command`'s child get the write end as [`READY_FD`].
    pub fn pass_to(&self, command: &mut Command) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let write = self.write.as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe and touch no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                // dup2 onto another number clears close-on-exec; onto itself it does not.
                let rc = if write == READY_FD {
                    libc::fcntl(write, libc::F_SETFD, 0)
                } else {
                    libc::dup2(write, READY_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Closes this process's write end (call after spawning) and returns the read end.
    pub fn into_reader(self) -> std::fs::File {
        drop(self.write);
        std::fs::File::from(self.read)
    }
}

/// Reads `KIND ADDR` lines from a `--ready-fd` pipe until the server closes it, within
/// [`PATIENCE`]; `None` if it closed with no line (the server failed to start) or took too long.
pub fn read_ready_lines(ready: std::fs::File) -> Option<Vec<(String, SocketAddr)>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(ready).read_to_string(&mut text);
        let _ = tx.send(text);
    });
    let text = rx.recv_timeout(PATIENCE).ok()?;
    let listeners: Vec<(String, SocketAddr)> = text
        .lines()
        .map(|line| {
            let (kind, addr) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad --ready-fd line {line:?}"));
            let addr = addr
                .parse()
                .unwrap_or_else(|e| panic!("bad address in --ready-fd line {line:?}: {e}"));
            (kind.to_string(), addr)
        })
        .collect();
    (!listeners.is_empty()).then_some(listeners)
}

/// Sends `sig` to `pid` (a process the test started; one gone already is no error).
pub fn signal(pid: u32, sig: i32) {
    let sig = nix::sys::signal::Signal::try_from(sig).expect("a known signal");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Waits up to `timeout` for `child` to exit (and reaps it); `None` if it is still running.
/// The one "wait with a deadline" for child processes: `wait-timeout` blocks until the child
/// exits or the time is up, instead of polling `try_wait`. (It installs a SIGCHLD handler in
/// the test process, with SA_RESTART; a socket read with a timeout can still return
/// `Interrupted`, which the read helpers here retry.)
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    use wait_timeout::ChildExt;
    child
        .wait_timeout(timeout)
        .expect("wait for a child process")
}

/// Waits up to [`PATIENCE`] for `child` to exit; kills it and panics (naming `what`) if it
/// does not.
pub fn wait_or_kill(child: &mut Child, what: &str) -> ExitStatus {
    wait_child(child, PATIENCE).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not exit within {PATIENCE:?}")
    })
}

/// Polls `condition` every few milliseconds until it holds (`true`) or `timeout` passes
/// (`false`): for states no descriptor or child exit announces (a log line, a counter).
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Connects with the test patience as read/write timeout, so a broken server fails the test
/// instead of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// Connects from `source` (a loopback address such as 127.0.0.7, bound before connecting), so
/// one test can act as many clients; with the test patience as read/write timeout.
pub fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    socket
        .connect(&addr.into())
        .unwrap_or_else(|e| panic!("connect {addr} from {source}: {e}"));
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// Whether the server closed `stream` without echoing: a byte sent gets end of stream or a
/// reset back, never data.
pub fn refused_without_echo(stream: &mut TcpStream) -> bool {
    let _ = stream.write_all(b"?");
    let mut buf = [0u8; 16];
    loop {
        return match stream.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            // A signal (wait-timeout's SIGCHLD handler) interrupted the read: read again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("waiting for a refused connection to close: {e}"),
        };
    }
}

/// Writes to `stream` (switched to non-blocking) without ever reading, until the kernel takes
/// nothing more for a while: the server has stopped reading it (its echo cannot be written),
/// so every buffer on the way is full. Returns the bytes pushed; panics after 10 s.
pub fn push_until_blocked(stream: &TcpStream) -> usize {
    let chunk = vec![0x5a_u8; 64 * 1024];
    stream.set_nonblocking(true).unwrap();
    let mut pushed = 0usize;
    let mut quiet_rounds = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while quiet_rounds < 5 {
        assert!(Instant::now() < deadline, "the client could push forever");
        let mut progressed = false;
        loop {
            match (&*stream).write(&chunk) {
                Ok(n) => {
                    pushed += n;
                    progressed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("stalled client write failed: {e}"),
            }
        }
        quiet_rounds = if progressed { 0 } else { quiet_rounds + 1 };
        thread::sleep(Duration::from_millis(20));
    }
    pushed
}

/// Sends `payload` from one thread while reading the echo on this one, then half-closes and
/// expects end of stream after exactly `payload.len()` bytes. Returns what came back.
pub fn round_trip(stream: TcpStream, payload: &[u8]) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let data = payload.to_vec();
    let sender = thread::spawn(move || {
        writer.write_all(&data).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = stream;
    let mut echoed = Vec::with_capacity(payload.len());
    reader
        .read_to_end(&mut echoed)
        .expect("read the echo until EOF");
    sender.join().expect("sender thread");
    echoed
}

/// Asserts two byte strings are equal, naming the first difference instead of dumping them.
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes, want {}; first difference at {:?}",
            got.len(),
            want.len(),
            first
        );
    }
}

/// The /proc stat lines of `pid`'s children (zombies included).
fn children_of(pid: u32) -> Vec<procfs::process::Stat> {
    let Ok(processes) = procfs::process::all_processes() else {
        return Vec::new();
    };
    processes
        .flatten()
        .filter_map(|process| process.stat().ok())
        .filter(|stat| stat.ppid == pid as i32)
        .collect()
}

/// Number of zombie children of `pid` (state Z in /proc).
pub fn zombie_children(pid: u32) -> usize {
    children_states(pid).iter().filter(|s| *s == "Z").count()
}

/// The states of `pid`'s children, from /proc.
pub fn children_states(pid: u32) -> Vec<String> {
    children_of(pid)
        .iter()
        .map(|stat| stat.state.to_string())
        .collect()
}

/// The process ids of `pid`'s live (not zombie) children, from /proc.
pub fn live_children(pid: u32) -> Vec<u32> {
    children_of(pid)
        .iter()
        .filter(|stat| stat.state != 'Z')
        .map(|stat| stat.pid as u32)
        .collect()
}

/// Whether `pid` runs: a zombie (reaped by nobody yet) counts as gone, as it runs no code and
/// holds no socket.
pub fn alive(pid: u32) -> bool {
    procfs::process::Process::new(pid as i32)
        .and_then(|process| process.stat())
        .is_ok_and(|stat| stat.state != 'Z')
}

/// Resident memory of a process in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> u64 {
    procfs::process::Process::new(pid as i32)
        .and_then(|process| process.status())
        .ok()
        .and_then(|status| status.vmrss)
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used so far, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> u64 {
    procfs::process::Process::new(pid as i32)
        .and_then(|process| process.stat())
        .map_or(0, |stat| stat.utime + stat.stime)
}

/// A test that cannot run here says so loudly; on CI (`CI=true`), where everything it needs is
/// installed, an expected skip is a failure instead.
pub fn skip_unless_ci(why: &str) {
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("CI=true, so this skip is a failure: {why}");
    }
    eprintln!("SKIPPED (not run): {why}");
}

/// Whether io_uring is unavailable according to a server's start-up log.
pub fn uring_unavailable(log: &str) -> bool {
    log.contains("io_uring is not available")
}

/// `ServerBuilder::new(model).args(extra).start_or_skip()`.
pub fn start_or_skip(model: &str, extra: &[&str]) -> Option<Server> {
    ServerBuilder::new(model).args(extra).start_or_skip()
}

/// [`start_or_skip`] with an open-files limit for the server ([`ServerBuilder::nofile`]).
pub fn start_limited_or_skip(model: &str, extra: &[&str], nofile: Option<u64>) -> Option<Server> {
    let builder = ServerBuilder::new(model).args(extra);
    match nofile {
        Some(limit) => builder.nofile(limit),
        None => builder,
    }
    .start_or_skip()
}

/// Reads exactly `want.len()` bytes and checks them.
pub fn expect_echo(stream: &mut TcpStream, want: &[u8], what: &str) {
    let mut got = vec![0u8; want.len()];
    stream
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{what}: reading the echo failed: {e}"));
    assert_same(&got, want, what);
}

/// Whether a byte arrives on `stream` within `wait` (it is consumed).
pub fn receives_within(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut byte = [0u8; 1];
    let got = loop {
        break match stream.read(&mut byte) {
            Ok(n) => n > 0,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            // A signal (wait-timeout's SIGCHLD handler) interrupted the wait: wait again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("unexpected read error: {e}"),
        };
    };
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    got
}

/// Issue 9's starvation case at a small scale: `stalled` clients each push data until their
/// connection is full both ways and never read their echo; then a well-behaved client must
/// still get every one of its echoes, each within [`PROMPT`] (behaviour, not speed: an
/// unloaded server answers in well under a millisecond, a starved one never).
pub fn well_behaved_client_beside_never_reading_ones(addr: SocketAddr, stalled: usize) {
    let clients: Vec<TcpStream> = thread::scope(|scope| {
        let pushers: Vec<_> = (0..stalled)
            .map(|_| {
                scope.spawn(move || {
                    let stream = connect(addr);
                    push_until_blocked(&stream);
                    stream
                })
            })
            .collect();
        pushers
            .into_iter()
            .map(|p| p.join().expect("a never-reading client"))
            .collect()
    });
    let mut client = connect(addr);
    client.set_read_timeout(Some(PROMPT)).unwrap();
    for round in 0..50u64 {
        let message = payload_for(round);
        client.write_all(&message).unwrap();
        let mut echoed = vec![0u8; message.len()];
        client.read_exact(&mut echoed).unwrap_or_else(|e| {
            panic!("round {round}: no echo within {PROMPT:?} beside {stalled} never-reading clients: {e}")
        });
        assert_same(&echoed, &message, &format!("round {round}"));
    }
    drop(clients);
}

/// How long a well-behaved client may wait for one small echo beside misbehaving clients.
pub const PROMPT: Duration = Duration::from_secs(5);

/// A distinct message of a few KiB for round `round`.
pub fn payload_for(round: u64) -> Vec<u8> {
    multiecho::payload::bytes(4242 + round, 1000 + (round as usize * 97) % 7000)
}

/// Runs `multiecho bench TARGET ARGS --json -q` and returns its report; panics with bench's
/// stderr if it failed.
pub fn bench_json(target: &str, args: &[&str]) -> serde_json::Value {
    let output = Command::new(BIN)
        .arg("bench")
        .arg(target)
        .args(args)
        .args(["--json", "-q"])
        .output()
        .expect("run bench");
    assert!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("bench prints one JSON object")
}
