//! The `multiecho serve` child of a comparison: started on a free loopback port (and, with
//! `--udp`, a UDP one: its address is the server's), its stderr drained on a thread (so it
//! never blocks) into its last lines, probed with one round trip, and stopped with SIGTERM (it
//! must exit 0).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{describe, takes_workers, ComparePlan, StopOutcome, TlsFiles};
use crate::activation::{parse_ready_lines, ReadyPipe};
use crate::listen::ListenerKind;
use crate::server::Model;

/// How long a model may take to say where it listens.
const START_PATIENCE: Duration = Duration::from_secs(30);
/// How many of a server's last log lines are kept (for reasons).
const LOG_LINES_KEPT: usize = 20;

/// A `multiecho serve` child, its stderr drained on a thread into its last lines. Killed on
/// drop if it was not stopped.
pub(super) struct ServerProcess {
    pub(super) child: Child,
    pub(super) addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
    log_reader: thread::JoinHandle<()>,
    stopped: bool,
    /// Why the server ended, when it was found dead during the sweep.
    died: Option<String>,
}

impl ServerProcess {
    /// Starts `model` on a free loopback port and waits until it says where it listens.
    /// `Ok(Err(reason))`: the model cannot run here (reason: its last log line).
    pub(super) fn start(
        exe: &Path,
        model: Model,
        plan: &ComparePlan,
        tls: Option<&TlsFiles>,
    ) -> anyhow::Result<Result<ServerProcess, String>> {
        let mut command = Command::new(exe);
        command.args(["serve", "--model", model.name(), "--listen"]);
        match tls {
            Some(files) => command
                .arg("tls://127.0.0.1:0")
                .arg("--tls-cert")
                .arg(&files.cert)
                .arg("--tls-key")
                .arg(&files.key),
            None => command.arg("127.0.0.1:0"),
        };
        command
            // The readiness line is at info level; more would slow the server down.
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if plan.udp {
            command.args(["--listen", "udp://127.0.0.1:0", "--udp-rate", "0"]);
        }
        if let Some(workers) = plan.workers.filter(|_| takes_workers(model)) {
            command.args(["--workers", &workers.to_string()]);
        }
        if let Some(cpus) = &plan.server_cpus {
            cpus.pin(&mut command);
        }
        super::end_with_parent(&mut command);
        let ready = ReadyPipe::new().context("cannot create the readiness pipe")?;
        ready.pass_to(&mut command);
        let mut child = command.spawn().with_context(|| {
            let pinned = plan
                .server_cpus
                .as_ref()
                .map(|cpus| format!(" pinned to CPUs {cpus}"))
                .unwrap_or_default();
            format!("cannot start the {model} server{pinned}")
        })?;
        let ready = ready.into_reader();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let kind = if plan.udp {
            ListenerKind::Udp
        } else if tls.is_some() {
            ListenerKind::Tls
        } else {
            ListenerKind::Tcp
        };
        thread::spawn(move || read_ready_fd(ready, kind, ready_tx));
        let stderr = child.stderr.take().expect("stderr is piped");
        let log_reader = {
            let log = Arc::clone(&log);
            thread::spawn(move || drain_log(stderr, &log))
        };
        let mut server = ServerProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            log_reader,
            stopped: false,
            died: None,
        };
        match ready_rx.recv_timeout(START_PATIENCE) {
            Ok(addr) => {
                server.addr = addr;
                // A model that cannot run may still bind and log its address before it
                // fails, so only a round trip shows it really serves.
                let probed = if plan.udp {
                    probe_udp(addr)
                } else {
                    probe(addr, tls)
                };
                match probed {
                    Ok(()) => Ok(Ok(server)),
                    Err(e) => Ok(Err(server.not_serving(&e))),
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Its --ready-fd closed before it listened: it exited.
                let status = server.child.wait();
                server.wait_for_log_end(Duration::from_secs(5));
                server.stopped = true;
                let status = status.map_or_else(|e| e.to_string(), describe);
                Ok(Err(server.last_log_line().unwrap_or_else(|| {
                    format!("the server {status} without a word")
                })))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let last = server.last_log_line().unwrap_or_default();
                Ok(Err(format!(
                    "did not say where it listens within {} s (last line: {last})",
                    START_PATIENCE.as_secs()
                )))
            }
        }
    }

    /// Why a server that said where it listens does not echo: its last log line if it
    /// exited (it is given a moment to), else the probe's error (and it is killed).
    fn not_serving(&mut self, probe_error: &std::io::Error) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.stopped = true;
                self.wait_for_log_end(Duration::from_secs(1));
                return self
                    .last_log_line()
                    .unwrap_or_else(|| format!("the server {}", describe(status)));
            }
            thread::sleep(Duration::from_millis(10));
        }
        format!("it does not echo: {probe_error}")
    }

    /// Waits (a bounded time: children may hold stderr open) until the log thread has read
    /// everything the server wrote.
    fn wait_for_log_end(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        while !self.log_reader.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The server's last log line, without the `multiecho: error: ` every error line has.
    fn last_log_line(&self) -> Option<String> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let line = log.back()?;
        Some(
            line.strip_prefix("multiecho: error: ")
                .unwrap_or(line)
                .to_string(),
        )
    }

    /// Why the server is no longer running, or `None` while it runs.
    pub(super) fn exit_reason(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => {
                self.stopped = true;
                self.wait_for_log_end(Duration::from_secs(1));
                let last = self.last_log_line().unwrap_or_default();
                let reason = format!("the server {} during the sweep: {last}", describe(status));
                self.died = Some(reason.clone());
                Some(reason)
            }
            Err(e) => Some(format!("cannot check on the server: {e}")),
        }
    }

    /// SIGTERM, then wait for it to exit (it must exit 0); killed if it takes too long.
    pub(super) fn stop(mut self) -> StopOutcome {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if self.stopped {
            return StopOutcome {
                clean: false,
                detail: self
                    .died
                    .clone()
                    .unwrap_or_else(|| "it had already exited".into()),
            };
        }
        self.stopped = true;
        let pid = Pid::from_raw(self.child.id() as i32);
        if let Err(e) = kill(pid, Signal::SIGTERM) {
            return StopOutcome {
                clean: false,
                detail: format!("cannot send SIGTERM: {e}"),
            };
        }
        // Its own shutdown timeout defaults to 5 s; all bench connections are closed already.
        let patience = Duration::from_secs(20);
        let deadline = Instant::now() + patience;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => break None,
            }
        };
        match status {
            Some(status) if status.success() => StopOutcome {
                clean: true,
                detail: "exited 0 on SIGTERM".into(),
            },
            Some(status) => StopOutcome {
                clean: false,
                detail: format!(
                    "{} on SIGTERM: {}",
                    describe(status),
                    self.last_log_line().unwrap_or_default()
                ),
            },
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                StopOutcome {
                    clean: false,
                    detail: format!(
                        "still running {} s after SIGTERM; killed",
                        patience.as_secs()
                    ),
                }
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One small round trip to `addr` (over TLS, trusting `tls`'s certificate, if given): does
/// something there echo?
fn probe(addr: SocketAddr, tls: Option<&TlsFiles>) -> std::io::Result<()> {
    let patience = Duration::from_secs(10);
    let Some(files) = tls else {
        let stream = std::net::TcpStream::connect_timeout(&addr, patience)?;
        stream.set_read_timeout(Some(patience))?;
        stream.set_write_timeout(Some(patience))?;
        return round_trip(stream);
    };
    use crate::tls::client::{self as tls_client, Resumption, TlsClientOptions};
    let args = TlsClientOptions {
        tls_ca: Some(files.cert.clone()),
        ..TlsClientOptions::default()
    };
    let mut stream = args
        .target(&addr.to_string(), Resumption::Allowed)
        .and_then(|target| tls_client::connect(addr, Some(patience), &target))
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    stream.sock.set_read_timeout(Some(patience))?;
    stream.sock.set_write_timeout(Some(patience))?;
    round_trip(&mut stream)?;
    tls_client::close(stream);
    Ok(())
}

/// Sends a line and reads its echo back.
fn round_trip(mut stream: impl std::io::Read + std::io::Write) -> std::io::Result<()> {
    let hello = b"multiecho compare probe\n";
    stream.write_all(hello)?;
    stream.flush()?;
    let mut back = [0; 24];
    stream.read_exact(&mut back)?;
    if &back[..] != hello {
        return Err(std::io::Error::other("it sent back different bytes"));
    }
    Ok(())
}

/// One datagram to `addr`: does something there echo it?
fn probe_udp(addr: SocketAddr) -> std::io::Result<()> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_secs(10)))?;
    let hello = b"multiecho compare probe";
    socket.send(hello)?;
    let mut back = [0; 64];
    let n = socket.recv(&mut back)?;
    if &back[..n] != hello {
        return Err(std::io::Error::other("it sent back different bytes"));
    }
    Ok(())
}

/// Keeps the server's last log lines.
fn drain_log(stderr: impl Read, log: &Mutex<VecDeque<String>>) {
    let mut reader = BufReader::new(stderr);
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        match reader.read_until(b'\n', &mut bytes) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&bytes).trim_end().to_string();
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == LOG_LINES_KEPT {
            log.pop_front();
        }
        log.push_back(line);
    }
}

/// Reports the first `kind` listener's address from the server's `--ready-fd`, which it closes
/// once every listener accepts; sends nothing (drops the sender) if it closed it without one.
fn read_ready_fd(ready: std::fs::File, kind: ListenerKind, tx: mpsc::Sender<SocketAddr>) {
    let mut text = String::new();
    if BufReader::new(ready).read_to_string(&mut text).is_err() {
        return;
    }
    let listeners = parse_ready_lines(&text).unwrap_or_default();
    if let Some(&(_, addr)) = listeners.iter().find(|(k, _)| *k == kind) {
        let _ = tx.send(addr);
    }
}
