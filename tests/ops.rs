//! Running multiecho as a service: log formats, readiness (`--ready-fd`, `NOTIFY_SOCKET`),
//! socket activation (`LISTEN_FDS`, through the real `systemd-socket-activate`), `--inetd`,
//! shell completions and the man page.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A server's log in a pipe (as in a log file or the journal) carries no terminal colour codes.
#[test]
fn logs_in_a_pipe_have_no_colour() {
    let server = ServerBuilder::new("thread").start();
    let echoed = round_trip(connect(server.addr), b"plain\n");
    assert_same(&echoed, b"plain\n", "echo");
    server.wait_for_log("the close line", |log| log.contains("connection closed"));
    let log = server.log();
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a piped log:\n{log:?}"
    );
}

/// `--log-format json` writes one JSON object per line, with the event's fields at the top.
#[test]
fn json_logs_are_one_object_per_line() {
    let server = ServerBuilder::new("epoll")
        .args(&["--log-format", "json"])
        .start();
    let echoed = round_trip(connect(server.addr), b"json\n");
    assert_same(&echoed, b"json\n", "echo");
    server.wait_for_log("the close event", |log| log.contains("connection closed"));
    let log = server.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    let closed = events
        .iter()
        .find(|event| event["message"] == "connection closed")
        .unwrap_or_else(|| panic!("no close event in:\n{log}"));
    assert_eq!(closed["bytes"], 5, "{closed}");
    assert_eq!(closed["level"], "INFO");
    assert!(events.iter().all(|e| e["timestamp"].is_string()));
}

/// An unknown log format is one clear error.
#[test]
fn unknown_log_format_is_refused() {
    let out = Command::new(BIN)
        .args(["serve", "--log-format", "xml"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid value 'xml'"), "{err}");
}

/// A port that was free a moment ago, for tools that cannot bind port 0 themselves
/// (systemd-socket-activate).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects to `addr`, retrying while nothing listens there yet (a tool still starting),
/// up to [`PATIENCE`].
fn connect_when_listening(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match TcpStream::connect(addr) {
            Ok(stream) => {
                stream.set_read_timeout(Some(PATIENCE)).unwrap();
                stream.set_write_timeout(Some(PATIENCE)).unwrap();
                return stream;
            }
            Err(e) if Instant::now() < deadline => {
                assert_eq!(
                    e.kind(),
                    ErrorKind::ConnectionRefused,
                    "connect {addr}: {e}"
                );
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("nothing listens on {addr}: {e}"),
        }
    }
}

const SOCKET_ACTIVATE: &str = "systemd-socket-activate";

/// `systemd-socket-activate ARGS... multiecho serve SERVE_ARGS...`, its output captured.
fn socket_activate(args: &[&str], serve_args: &[&str]) -> Child {
    Command::new(SOCKET_ACTIVATE)
        .args(args)
        .arg(BIN)
        .arg("serve")
        .args(serve_args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {SOCKET_ACTIVATE} (Debian's systemd): {e}"))
}

/// Stops a socket-activated server (SIGTERM reaches multiecho: systemd-socket-activate execs
/// it) and returns its stderr.
fn stop_activated(mut child: Child) -> String {
    signal(child.id(), libc::SIGTERM);
    let out = wait_with_timeout(&mut child);
    assert!(
        out.0.success(),
        "exit status {:?}; stderr:\n{}",
        out.0,
        out.1
    );
    out.1
}

/// Waits up to [`PATIENCE`] for `child` to exit; its status and stderr.
fn wait_with_timeout(child: &mut Child) -> (ExitStatus, String) {
    let status = common::wait_or_kill(child, "the process");
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    (status, err)
}

/// Every model serves on the TCP socket systemd-socket-activate passes it (LISTEN_FDS), not on
/// --listen: byte-exact echoes with half-close from several clients.
#[test]
fn every_model_serves_a_socket_passed_by_systemd_socket_activate() {
    for model in ALL_MODELS {
        if model == "uring" && ServerBuilder::new("uring").start_or_skip().is_none() {
            skip_or_fail("io_uring is not available here");
            continue;
        }
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // --listen names a port it must not bind: the passed socket wins.
        let child = socket_activate(
            &["-l", &addr.to_string()],
            &["--model", model, "--listen", "127.0.0.1:1"],
        );
        // systemd-socket-activate starts multiecho on the first connection.
        let first = connect_when_listening(addr);
        let payload = multiecho::payload::bytes(7, 200_000);
        let echoed = round_trip(first, &payload);
        assert_same(&echoed, &payload, &format!("{model}: first client"));
        for i in 0..3u8 {
            let data = vec![b'a' + i; 10_000 + usize::from(i)];
            let echoed = round_trip(connect(addr), &data);
            assert_same(&echoed, &data, &format!("{model}: client {i}"));
        }
        let log = stop_activated(child);
        assert!(log.contains("connection closed"), "{model}: log:\n{log}");
    }
}

/// An expected skip: loud, and a failure under CI.
fn skip_or_fail(why: &str) {
    assert!(std::env::var_os("CI").is_none(), "CI must not skip: {why}");
    eprintln!("SKIPPED: {why}");
}

/// LISTEN_FDNAMES `proxy` (systemd's FileDescriptorName=proxy) makes the passed socket a
/// tcp+proxy listener: a PROXY v1 header is required and consumed, the rest echoed.
#[test]
fn a_passed_socket_named_proxy_expects_proxy_headers() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = socket_activate(
        &["-l", &addr.to_string(), "--fdname=proxy"],
        &["--model", "thread"],
    );
    let mut stream = connect_when_listening(addr);
    stream
        .write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 80\r\nhello\n")
        .unwrap();
    expect_echo(&mut stream, b"hello\n", "after the PROXY header");
    drop(stream);
    let log = stop_activated(child);
    assert!(
        log.contains("192.0.2.7"),
        "the header's client is the peer; log:\n{log}"
    );
}

/// `--inetd` under `systemd-socket-activate --inetd -a` (Accept=yes: one process per
/// connection, the connection on stdin/stdout): byte-exact echoes with half-close, and each
/// process logs its one connection to stderr.
#[test]
fn inetd_mode_serves_one_connection_per_process() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = socket_activate(&["-l", &addr.to_string(), "-a", "--inetd"], &["--inetd"]);
    let payload = multiecho::payload::bytes(3, 300_000);
    let echoed = round_trip(connect_when_listening(addr), &payload);
    assert_same(&echoed, &payload, "first connection");
    let clients: Vec<_> = (0..3u8)
        .map(|i| {
            thread::spawn(move || {
                let data = vec![b'0' + i; 5_000];
                let echoed = round_trip(connect(addr), &data);
                assert_same(&echoed, &data, "concurrent inetd client");
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    // In accept mode systemd-socket-activate does not exec multiecho: SIGTERM just ends it.
    // SIGTERM ends its children too, so first wait for each to finish its connection.
    assert!(
        wait_until(PATIENCE, || live_children(child.id()).is_empty()),
        "inetd children did not exit"
    );
    let mut child = child;
    signal(child.id(), libc::SIGTERM);
    let (_, log) = wait_with_timeout(&mut child);
    assert_eq!(log.matches("connection closed").count(), 4, "log:\n{log}");
    assert!(log.contains("bytes=300000"), "log:\n{log}");
}

/// Python's ssl module (OpenSSL, tests/common/tls_client.py) sends `len` random bytes over TLS
/// to `addr`, ends with close_notify, and must get them back byte-exact.
fn python_tls_round_trip(addr: SocketAddr, len: usize) {
    let payload = multiecho::payload::bytes(11, len);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/tls_client.py");
    let mut client = Command::new("python3")
        .arg(&script)
        .args([addr.ip().to_string(), addr.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut stdin = client.stdin.take().unwrap();
    let data = payload.clone();
    let writer = thread::spawn(move || stdin.write_all(&data));
    let out = client.wait_with_output().expect("wait for python3");
    writer.join().unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = multiecho::tls::sha256_fingerprint(&payload)
        .replace(':', "")
        .to_ascii_lowercase();
    assert!(
        out.status.success() && stdout.starts_with(&format!("echo {len} {want} ")),
        "tls_client.py: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// LISTEN_FDNAMES `tls` makes the passed socket a tls:// listener (a self-signed certificate
/// for its address): Python's ssl module gets its payload back through it.
#[test]
fn a_passed_socket_named_tls_serves_tls() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = socket_activate(
        &["-l", &addr.to_string(), "--fdname=tls"],
        &["--model", "epoll"],
    );
    drop(connect_when_listening(addr));
    python_tls_round_trip(addr, 100_000);
    let log = stop_activated(child);
    assert!(log.contains("bytes=100000"), "log:\n{log}");
}

/// `--inetd=tls` under `systemd-socket-activate --inetd -a`: each process speaks TLS on its
/// one connection (a self-signed certificate made at start), and Python's ssl module (OpenSSL)
/// gets a random payload back byte-exact, ending with close_notify (the TLS half-close).
#[test]
fn inetd_mode_serves_tls() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = socket_activate(
        &["-l", &addr.to_string(), "-a", "--inetd"],
        &["--inetd=tls"],
    );
    // A probe connection (one process that sees no handshake) shows the socket is bound.
    drop(connect_when_listening(addr));
    python_tls_round_trip(addr, 200_000);
    assert!(
        wait_until(PATIENCE, || live_children(child.id()).is_empty()),
        "inetd children did not exit"
    );
    let mut child = child;
    signal(child.id(), libc::SIGTERM);
    let (_, log) = wait_with_timeout(&mut child);
    assert!(log.contains("bytes=200000"), "log:\n{log}");
}

/// `--inetd` with a terminal on stdin is one clear error, not a hang or an echo.
#[test]
fn inetd_mode_refuses_a_terminal() {
    // SAFETY: plain libc calls on a descriptor this test owns; ptsname's buffer is copied at
    // once (this is the only test that calls it).
    let (master, slave) = unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(master >= 0, "posix_openpt");
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let name = std::ffi::CStr::from_ptr(libc::ptsname(master)).to_owned();
        (master, name)
    };
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(slave.to_str().unwrap())
        .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--inetd"])
        .stdin(tty)
        .output()
        .unwrap();
    // SAFETY: the master descriptor is ours and closed once.
    unsafe { libc::close(master) };
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("standard input, which is a terminal"), "{err}");
}

/// `LISTEN_PID` naming another process: the variables are not for us, a warning says so, and
/// --listen is bound instead.
#[test]
fn listen_pid_of_another_process_is_ignored_with_a_warning() {
    let server = ServerBuilder::new("epoll")
        .envs(&[("LISTEN_PID", "1"), ("LISTEN_FDS", "1")])
        .try_start()
        .unwrap_or_else(|log| panic!("did not start: {log}"));
    let echoed = round_trip(connect(server.addr), b"own socket\n");
    assert_same(&echoed, b"own socket\n", "echo on --listen");
    server.wait_for_log("the LISTEN_PID warning", |log| {
        log.contains("WARN") && log.contains("LISTEN_PID=1 is not this process")
    });
}

/// LISTEN_FDS naming a descriptor that is not a socket (a file): one clear error, exit 1.
#[test]
fn listen_fds_naming_a_file_is_one_clear_error() {
    // The shell's own pid is the one multiecho gets after exec, as with a service manager.
    let script = format!("LISTEN_PID=$$ LISTEN_FDS=1 exec {BIN} serve 3<{BIN}");
    let out = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("LISTEN_FDS descriptor 3") && err.contains("is not a socket"),
        "{err}"
    );
}

/// Passed sockets a model cannot serve are refused with one clear line: a datagram socket in
/// the models without UDP and a datagram socket named for TCP (`proxy`).
#[test]
fn passed_sockets_a_model_cannot_serve_are_refused() {
    for (model, args, want) in [
        (
            "thread",
            vec!["-d"],
            "the thread model does not serve udp:// listeners (udp://127.0.0.1:",
        ),
        (
            "epoll",
            vec!["-d", "--fdname=proxy"],
            "is a UDP socket: the name 'proxy' is for TCP sockets",
        ),
    ] {
        let datagram = args.contains(&"-d");
        let addr = if datagram {
            format!("127.0.0.1:{}", free_udp_port())
        } else {
            format!("127.0.0.1:{}", free_port())
        };
        let mut sa_args = vec!["-l", addr.as_str()];
        sa_args.extend(args);
        let mut child = socket_activate(&sa_args, &["--model", model]);
        // It starts multiecho on the first datagram or connection.
        if datagram {
            // A datagram sent before it listens is lost, so send until multiecho has exited.
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let deadline = Instant::now() + PATIENCE;
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                let _ = udp.send_to(b"x", &addr);
                thread::sleep(Duration::from_millis(20));
            }
        } else {
            let _ = connect_when_listening(addr.parse().unwrap());
        }
        let (status, err) = wait_with_timeout(&mut child);
        assert_eq!(status.code(), Some(1), "{model}: {err}");
        let ours: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("multiecho:"))
            .collect();
        assert_eq!(ours.len(), 1, "{model}: {err}");
        assert!(ours[0].contains(want), "{model}: {err}");
    }
}

/// A UDP port that was free a moment ago (systemd-socket-activate binds it itself).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `tool` is installed; a missing one is a loud skip, and a failure under CI.
fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skip_or_fail(&format!("{tool} is not installed"));
    }
    found
}

/// Runs a shell pipeline and returns its stdout.
fn shell(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every model that serves UDP serves the datagram socket `systemd-socket-activate --datagram`
/// passes it (LISTEN_FDS), as a udp:// listener and not --listen: the datagram that started it
/// is echoed, then socat's and `nc -u`'s lines and the largest IPv4 datagram, byte-exact.
#[test]
fn udp_models_serve_a_datagram_socket_passed_by_systemd_socket_activate() {
    if !have("socat") || !have("nc") {
        return;
    }
    for model in ["iterative", "prefork", "pool", "epoll", "async", "uring"] {
        if model == "uring" && ServerBuilder::new("uring").start_or_skip().is_none() {
            skip_or_fail("io_uring is not available here");
            continue;
        }
        let port = free_udp_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = socket_activate(
            &["-l", &addr.to_string(), "--datagram"],
            &[
                "--model",
                model,
                "--workers",
                "2",
                "--listen",
                "udp://127.0.0.1:1",
            ],
        );
        // systemd-socket-activate starts multiecho on the first datagram, which waits in the
        // socket's queue for it; one sent before systemd-socket-activate binds is lost, so
        // send again until the echo comes (the extra copies are echoed to this socket only).
        let first = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        first
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = vec![0u8; 65_536];
        let deadline = Instant::now() + PATIENCE;
        let (n, from) = loop {
            first.send_to(b"the first datagram", addr).unwrap();
            match first.recv_from(&mut buf) {
                Ok(got) => break got,
                Err(e) => assert!(Instant::now() < deadline, "{model}: no echo: {e}"),
            }
        };
        assert_eq!(&buf[..n], b"the first datagram", "{model}");
        assert_eq!(from, addr, "{model}");
        let got = shell(&format!(
            "(echo one; sleep 0.2; echo two) | socat -t 0.5 - UDP:127.0.0.1:{port}"
        ));
        assert_eq!(got, "one\ntwo\n", "{model}: socat");
        let got = shell(&format!("echo 'via nc' | nc -u -w 1 127.0.0.1 {port}"));
        assert_eq!(got, "via nc\n", "{model}: nc -u");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let largest = multiecho::payload::bytes(5, 65_507);
        client.send_to(&largest, addr).unwrap();
        let (n, _) = client
            .recv_from(&mut buf)
            .expect("the largest datagram's echo");
        assert_same(&buf[..n], &largest, &format!("{model}: 65,507 bytes"));
        let log = stop_activated(child);
        assert!(
            log.contains(&format!("listening on {addr} (udp://)")),
            "{model}: log:\n{log}"
        );
        assert!(
            !log.contains("127.0.0.1:1 "),
            "{model}: bound --listen:\n{log}"
        );
    }
}

/// `--inetd=tcp+proxy` under `systemd-socket-activate --inetd -a`: each connection's PROXY
/// header (v1 and v2 written by hand, and v2 from a real HAProxy with `send-proxy-v2`) is
/// consumed and its client becomes the peer; the rest is echoed byte-exact with half-close. A
/// connection without a header is closed without an echo, with one refusal line.
#[test]
fn inetd_mode_reads_proxy_headers() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = socket_activate(
        &["-l", &addr.to_string(), "-a", "--inetd"],
        &["--inetd=tcp+proxy"],
    );
    let mut v1 = connect_when_listening(addr);
    v1.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 80\r\n")
        .unwrap();
    let payload = multiecho::payload::bytes(9, 100_000);
    assert_same(&round_trip(v1, &payload), &payload, "after a v1 header");

    // v2: signature, version 2 PROXY, TCP over IPv4, 12 address bytes: 198.51.100.9:4444 to
    // 127.0.0.1:80.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[198, 51, 100, 9, 127, 0, 0, 1]);
    v2.extend_from_slice(&4444u16.to_be_bytes());
    v2.extend_from_slice(&80u16.to_be_bytes());
    v2.extend_from_slice(b"after a v2 header\n");
    assert_same(
        &round_trip(connect(addr), &v2),
        b"after a v2 header\n",
        "after a v2 header",
    );

    let mut bare = connect(addr);
    bare.write_all(b"no header here\r\n").unwrap();
    assert!(
        refused_without_echo(&mut bare),
        "a connection without a header"
    );
    drop(bare);

    let mut via_haproxy_port = None;
    if have("haproxy") {
        let haproxy = common::haproxy::Haproxy::start(common::haproxy::HaproxyConfig {
            send_proxy: common::haproxy::SendProxy::V2,
            backend: addr,
            health_check: false,
        });
        let client = connect(haproxy.frontend());
        via_haproxy_port = Some(client.local_addr().unwrap().port());
        let payload = multiecho::payload::bytes(10, 50_000);
        assert_same(&round_trip(client, &payload), &payload, "through HAProxy");
    }

    let deadline = Instant::now() + PATIENCE;
    while !live_children(child.id()).is_empty() {
        assert!(Instant::now() < deadline, "inetd children did not exit");
        thread::sleep(Duration::from_millis(10));
    }
    let mut child = child;
    signal(child.id(), libc::SIGTERM);
    let (_, log) = wait_with_timeout(&mut child);
    for peer in ["peer=192.0.2.7:5555", "peer=198.51.100.9:4444"] {
        assert!(log.contains(peer), "no {peer} in the log:\n{log}");
    }
    if let Some(port) = via_haproxy_port {
        // HAProxy's header names the test's client, not HAProxy's own connection.
        let peer = format!("peer=127.0.0.1:{port}");
        assert!(log.contains(&peer), "no {peer} in the log:\n{log}");
    }
    let served = 2 + usize::from(via_haproxy_port.is_some());
    assert_eq!(
        log.matches("connection closed").count(),
        served,
        "log:\n{log}"
    );
    assert_eq!(log.matches("connection refused").count(), 1, "log:\n{log}");
    assert!(log.contains("proxy-header"), "log:\n{log}");
    assert!(log.contains("bytes=100000"), "log:\n{log}");
}

/// `--inetd` takes tcp, tcp+proxy, tls or tls+proxy, nothing else: one clear error.
#[test]
fn inetd_mode_refuses_other_kinds() {
    let out = Command::new(BIN)
        .args(["serve", "--inetd=udp"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "invalid inetd connection kind 'udp': use tcp (the default), tcp+proxy, tls or tls+proxy"
        ),
        "{err}"
    );
}

/// `--ready-fd` gets one `KIND ADDR` line per listener, with the ports the kernel chose, and
/// each of them accepts as soon as the line is read.
#[test]
fn ready_fd_names_every_listener() {
    let server = ServerBuilder::new("async")
        .args(&["--listen", "tcp+proxy://127.0.0.1:0", "--listen", "[::1]:0"])
        .start();
    let kinds: Vec<&str> = server.listeners.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["tcp", "tcp+proxy", "tcp"]);
    assert!(server.listeners.iter().all(|(_, a)| a.port() != 0));
    assert!(server.listeners[2].1.is_ipv6());
    for (kind, addr) in &server.listeners {
        let mut stream = connect(*addr);
        if kind == "tcp+proxy" {
            stream.write_all(b"PROXY UNKNOWN\r\n").unwrap();
        }
        stream.write_all(b"ready\n").unwrap();
        expect_echo(&mut stream, b"ready\n", kind);
    }
}

/// `--ready-fd` naming a descriptor that is not open is one clear error.
#[test]
fn ready_fd_must_be_open() {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--ready-fd", "57"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--ready-fd 57: descriptor 57 is not open"),
        "{err}"
    );
}

/// With NOTIFY_SOCKET set, READY=1 arrives once the port accepts (a connection made right
/// after it is echoed), and STOPPING=1 after SIGTERM.
#[test]
fn sd_notify_ready_then_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = std::env::temp_dir().join(format!("multiecho-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let notify = UnixDatagram::bind(&path).unwrap();
    notify.set_read_timeout(Some(PATIENCE)).unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--model",
            "prefork",
            "--workers",
            "2",
            "--listen",
            &addr.to_string(),
        ])
        .env("NOTIFY_SOCKET", &path)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 within the patience");
    assert_eq!(&buf[..n], b"READY=1\n");
    let echoed = round_trip(connect(addr), b"notified\n");
    assert_same(&echoed, b"notified\n", "echo right after READY=1");
    signal(child.id(), libc::SIGTERM);
    let n = notify.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    let (status, err) = wait_with_timeout(&mut child);
    assert!(status.success(), "{err}");
    // Only the main process notifies: the workers got SIGTERM too, and said nothing.
    notify.set_nonblocking(true).unwrap();
    assert!(
        notify.recv(&mut buf).is_err(),
        "a second message: {:?}",
        &buf[..]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Completion scripts come from the clap definitions: the bash one is valid bash and knows
/// serve's flags; zsh and fish scripts are produced too.
#[test]
fn completions_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(
            script.contains("ready-fd") && script.contains("inetd"),
            "{shell}"
        );
    }
    let out = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let mut bash = Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    bash.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    assert!(bash.wait().unwrap().success(), "bash -n rejects the script");
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The man pages (multiecho(1) and one per subcommand) are roff from the same definitions; an
/// unknown subcommand is one clear error.
#[test]
fn man_pages() {
    let out = Command::new(BIN).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH multiecho 1"), "{page}");
    let out = Command::new(BIN).args(["man", "serve"]).output().unwrap();
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(
        page.contains(".TH multiecho\\-serve 1") || page.contains(".TH multiecho-serve 1"),
        "{page}"
    );
    assert!(page.contains("ready\\-fd"), "{page}");
    let out = Command::new(BIN).args(["man", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "multiecho: error: no subcommand 'nope' (see multiecho --help)"
    );
}

/// contrib/systemd's units pass `systemd-analyze verify` (with ExecStart= pointed at the built
/// binary, the socket's UDP example enabled, and without checking the man pages, which are
/// only installed by the package; CI verifies the installed units with them too). The service
/// units keep their hardening.
#[test]
fn systemd_units_verify() {
    let contrib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let dir = std::env::temp_dir().join(format!("multiecho-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let units = [
        "multiecho.socket",
        "multiecho.service",
        "multiecho-inetd.socket",
        "multiecho-inetd@.service",
    ];
    for unit in units {
        let text = std::fs::read_to_string(contrib.join(unit)).unwrap();
        if unit.ends_with(".service") {
            for setting in [
                "DynamicUser=yes",
                "ProtectSystem=strict",
                "PrivateTmp=yes",
                "NoNewPrivileges=yes",
                "RestrictAddressFamilies=",
                "\nCapabilityBoundingSet=\n",
            ] {
                assert!(text.contains(setting), "{unit} lacks {setting:?}");
            }
        }
        // The socket's commented UDP example is verified as if enabled.
        let text = if unit == "multiecho.socket" {
            assert!(
                text.contains("\n#ListenDatagram="),
                "{unit} lacks its UDP example"
            );
            text.replace("\n#ListenDatagram=", "\nListenDatagram=")
                .replace("\n#ReceiveBuffer=", "\nReceiveBuffer=")
        } else {
            text
        };
        std::fs::write(dir.join(unit), text.replace("/usr/bin/multiecho", BIN)).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units.iter().map(|unit| dir.join(unit)))
        .output()
        .expect("systemd-analyze (Debian's systemd) is needed");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
