//! A real HAProxy in front of a backend, for the PROXY protocol tests: `haproxy -db -f CFG`
//! from a config rendered on free 127.0.0.1 ports, ready once its stats socket lists the
//! frontend open, killed on drop.
//!
//! Readiness and health are read from the stats socket's `show stat` CSV (typed columns:
//! `pxname`, `svname`, `status`, `check_status`), never from log wording. HAProxy cannot bind
//! port 0 and report the port, and a port picked free and released could be taken meanwhile
//! (HAProxy binds with SO_REUSEPORT, so two instances on one port would both start and share
//! the clients): the harness binds the frontend's socket itself and hands it over
//! (`bind fd@3`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::PATIENCE;

/// The PROXY header HAProxy sends to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendProxy {
    /// No header: plain TCP.
    Off,
    /// `send-proxy` (text v1).
    V1,
    /// `send-proxy-v2` (binary v2).
    V2,
}

/// What [`Haproxy::start`] puts in the generated config.
#[derive(Clone, Debug)]
pub struct HaproxyConfig {
    pub send_proxy: SendProxy,
    /// The server HAProxy forwards to (a multiecho `tcp+proxy://` listener).
    pub backend: SocketAddr,
    /// A `tcp-check` every 100 ms that sends [`HEALTH_LINE`] and expects it echoed; the health
    /// check connections carry the PROXY header too (LOCAL in v2; in v1 a TCP4 line naming the
    /// check connection itself, HAProxy to the server).
    pub health_check: bool,
}

/// The line the generated health check sends and expects back.
pub const HEALTH_LINE: &str = "multiecho-health-check";

/// The names in the generated config.
pub const FRONTEND: &str = "echo_in";
pub const BACKEND: &str = "echo_servers";
pub const SERVER: &str = "echo1";

/// The frontend's `bind` address in a config started by [`Haproxy::start_with`]: the socket
/// the harness bound, inherited as descriptor 3.
pub const FRONTEND_BIND: &str = "fd@3";

/// One row of `show stat`: a frontend, a backend or a server.
#[derive(Clone, Debug)]
pub struct StatRow {
    fields: HashMap<String, String>,
}

impl StatRow {
    /// A column by its CSV name (`status`, `check_status`, `scur`, ...); empty if absent.
    pub fn get(&self, column: &str) -> &str {
        self.fields.get(column).map(String::as_str).unwrap_or("")
    }
    pub fn proxy(&self) -> &str {
        self.get("pxname")
    }
    pub fn name(&self) -> &str {
        self.get("svname")
    }
    /// `OPEN` for a frontend; `UP`, `DOWN`, `no check`, `UP 1/2` (going down)... for a server.
    pub fn status(&self) -> &str {
        self.get("status")
    }
    /// The last check's result, such as `L7OK` (the expected reply came back) or `L7TOUT`.
    pub fn check_status(&self) -> &str {
        self.get("check_status")
    }
}

/// A running `haproxy -db`. Killed on drop; its temporary directory removed.
pub struct Haproxy {
    child: Child,
    frontend: SocketAddr,
    stats_socket: PathBuf,
    dir: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Haproxy {
    /// Starts HAProxy with a config generated from `config`, and waits until its frontend is
    /// open. With a health check, also waits until the server is UP (see [`Haproxy::wait_up`]).
    pub fn start(config: HaproxyConfig) -> Haproxy {
        let haproxy = Haproxy::start_with(|bind, stats_socket| render(&config, bind, stats_socket));
        if config.health_check {
            haproxy.wait_up(SERVER);
        }
        haproxy
    }

    /// Starts HAProxy with the config text `render(bind, stats_socket)` returns (for
    /// example an existing file with its addresses replaced), and waits until every frontend is
    /// open. `bind` is what the frontend's `bind` line must say: [`FRONTEND_BIND`], a
    /// socket this harness bound on a free 127.0.0.1 port and hands to HAProxy as descriptor 3.
    /// `stats_socket` is a path in a temporary directory.
    pub fn start_with(render: impl Fn(&str, &Path) -> String) -> Haproxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the frontend's port");
        let frontend = listener.local_addr().unwrap();
        let dir = temp_dir();
        let stats_socket = dir.join("stats.sock");
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, render(FRONTEND_BIND, &stats_socket)).expect("write haproxy.cfg");
        let mut command = Command::new("haproxy");
        command
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let fd = listener.as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe and touch no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                // dup2 leaves the copy without close-on-exec; if the socket already is 3, clear
                // the flag on it instead.
                let result = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if result < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!("spawn haproxy (is it installed? .ci/run installs it): {e}")
        });
        // HAProxy has its own copy now.
        drop(listener);
        let log = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().unwrap(), &log);
        collect(child.stderr.take().unwrap(), &log);
        let haproxy = Haproxy {
            child,
            frontend,
            stats_socket,
            dir,
            log,
        };
        if let Err(log) = haproxy.wait_open() {
            panic!("haproxy did not start; its output:\n{log}");
        }
        haproxy
    }

    /// The address clients connect to.
    pub fn frontend(&self) -> SocketAddr {
        self.frontend
    }

    /// What HAProxy printed so far (alerts and warnings).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends one command to the stats socket and returns the reply.
    pub fn command(&self, command: &str) -> std::io::Result<String> {
        let mut socket = UnixStream::connect(&self.stats_socket)?;
        socket.set_read_timeout(Some(PATIENCE))?;
        socket.write_all(command.as_bytes())?;
        socket.write_all(b"\n")?;
        let mut reply = String::new();
        socket.read_to_string(&mut reply)?;
        Ok(reply)
    }

    /// Every row of `show stat`.
    pub fn stats(&self) -> std::io::Result<Vec<StatRow>> {
        Ok(parse_show_stat(&self.command("show stat")?))
    }

    /// The `show stat` row of the server (or frontend, or `BACKEND`) named `name`.
    pub fn row(&self, name: &str) -> Option<StatRow> {
        self.stats()
            .ok()?
            .into_iter()
            .find(|row| row.name() == name)
    }

    /// Waits until the server `name` is UP after a passing check (`check_status` L4OK or L7OK,
    /// so not merely the state a server starts in), or panics after [`PATIENCE`] with its row.
    pub fn wait_up(&self, name: &str) {
        let passed = |row: &StatRow| row.status() == "UP" && row.check_status().ends_with("OK");
        self.wait_for_row(name, "UP after a passing check", passed);
    }

    /// Waits until the `show stat` row `name` satisfies `check`, or panics after [`PATIENCE`].
    pub fn wait_for_row(&self, name: &str, what: &str, check: impl Fn(&StatRow) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let row = self.row(name);
            if row.as_ref().is_some_and(&check) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy's {name} is not {what}: {row:?}; haproxy's output:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the stats socket lists every frontend OPEN (listeners bound); on failure
    /// returns HAProxy's output.
    fn wait_open(&self) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(rows) = self.stats() {
                let frontends: Vec<_> = rows.iter().filter(|r| r.name() == "FRONTEND").collect();
                if !frontends.is_empty() && frontends.iter().all(|r| r.status() == "OPEN") {
                    return Ok(());
                }
            }
            let exited = match self.child_exited() {
                true => true,
                false => Instant::now() >= deadline,
            };
            if exited {
                // Let the output readers catch the last lines.
                thread::sleep(Duration::from_millis(100));
                return Err(self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn child_exited(&self) -> bool {
        // try_wait needs &mut; /proc tells whether the process is gone or a zombie.
        !super::alive(self.child.id())
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The generated config: one frontend, one backend with one server.
fn render(config: &HaproxyConfig, bind: &str, stats_socket: &Path) -> String {
    let send_proxy = match config.send_proxy {
        SendProxy::Off => "",
        SendProxy::V1 => " send-proxy",
        SendProxy::V2 => " send-proxy-v2",
    };
    let (check_rules, check) = if config.health_check {
        (
            format!(
                "    option tcp-check\n\
                 \x20   tcp-check send \"{HEALTH_LINE}\\n\"\n\
                 \x20   tcp-check expect string {HEALTH_LINE}\n"
            ),
            " check inter 100ms rise 1 fall 1",
        )
    } else {
        (String::new(), "")
    };
    format!(
        "global\n\
         \x20   stats socket {socket} mode 600 level admin\n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 60s\n\
         \x20   timeout server 60s\n\
         frontend {FRONTEND}\n\
         \x20   bind {bind}\n\
         \x20   default_backend {BACKEND}\n\
         backend {BACKEND}\n\
         {check_rules}\
         \x20   server {SERVER} {backend}{send_proxy}{check}\n",
        socket = stats_socket.display(),
        backend = config.backend,
    )
}

/// Parses `show stat`'s CSV: a `# name,name,...` header line, then one row per line.
fn parse_show_stat(reply: &str) -> Vec<StatRow> {
    let mut lines = reply.lines();
    let Some(header) = lines.next().and_then(|h| h.strip_prefix("# ")) else {
        return Vec::new();
    };
    let columns: Vec<&str> = header.split(',').collect();
    lines
        .filter(|line| !line.is_empty())
        .map(|line| StatRow {
            fields: columns
                .iter()
                .zip(line.split(','))
                .map(|(c, v)| (c.to_string(), v.to_string()))
                .collect(),
        })
        .collect()
}

fn temp_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "multiecho-haproxy-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create haproxy's temporary directory");
    dir
}

fn collect(output: impl Read + Send + 'static, log: &Arc<Mutex<String>>) {
    let log = Arc::clone(log);
    thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
}
