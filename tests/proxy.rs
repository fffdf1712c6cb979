//! The PROXY protocol with a real HAProxy (issue 8).
//!
//! Two parts. First, HAProxy against this crate's header parser, through a small in-test
//! backend that reads the header with `server::conn::proxy::read_header` and echoes: the
//! headers HAProxy really sends (`send-proxy`, `send-proxy-v2`, and the health checks' own: a
//! v1 TCP4 line or a v2 LOCAL) parse to the right clients, the `tcp-check` marks the server
//! UP, and the config in `docs/scale-out/haproxy.cfg` runs as written. Second, `multiecho serve
//! --listen tcp+proxy://...` for every model: behind HAProxy with `send-proxy` and
//! `send-proxy-v2` (clients from distinct 127.0.0.x sources, byte-exact random echoes with
//! half-close, the close line naming the client), LOCAL served as from the proxy, header faults
//! (none, garbage, truncated v2, slower than `--proxy-timeout`, one byte at a time) each
//! closing only its own connection, `--trusted-proxy`, admission rules applied to the real
//! client through HAProxy, and the scale-out config in front of three instances. One module
//! per model runs them (as in tests/models.rs).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::haproxy::{Haproxy, HaproxyConfig, SendProxy, SERVER};
use common::{assert_same, connect, connect_from, round_trip, start_or_skip, Server, PATIENCE};
use multiecho::payload;
use multiecho::server::conn::proxy::{read_header, ProxyHeader};

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A backend that reads each connection's PROXY header with this crate's parser, records it,
/// and echoes (or, with `echo == false`, closes after the header).
struct ParserBackend {
    addr: SocketAddr,
    headers: Arc<Mutex<Vec<Result<ProxyHeader, String>>>>,
}

impl ParserBackend {
    fn start(echo: bool) -> ParserBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let headers = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&headers);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || serve(stream, echo, &seen));
            }
        });
        ParserBackend { addr, headers }
    }

    fn headers(&self) -> Vec<Result<ProxyHeader, String>> {
        self.headers.lock().unwrap().clone()
    }

    /// Waits until a recorded header satisfies `check`.
    fn wait_for_header(&self, what: &str, check: impl Fn(&ProxyHeader) -> bool) -> ProxyHeader {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = self.headers().into_iter().flatten().find(|h| check(h));
            if let Some(header) = found {
                return header;
            }
            assert!(
                Instant::now() < deadline,
                "no header {what}; seen: {:?}",
                self.headers()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn serve(mut stream: TcpStream, echo: bool, seen: &Mutex<Vec<Result<ProxyHeader, String>>>) {
    let (header, leftover) = match read_header(&mut stream, Duration::from_secs(5)) {
        Ok(got) => got,
        Err(e) => {
            seen.lock().unwrap().push(Err(e.to_string()));
            return;
        }
    };
    seen.lock().unwrap().push(Ok(header));
    if !echo {
        return;
    }
    if stream.write_all(&leftover).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// Clients from distinct loopback sources, each a byte-exact random round trip with
/// half-close; returns each client's address as HAProxy saw it.
fn clients_through(frontend: SocketAddr, sources: &[u8], seed: u64) -> Vec<SocketAddr> {
    sources
        .iter()
        .enumerate()
        .map(|(i, &last)| {
            let stream = connect_from(loopback(last), frontend);
            let client = stream.local_addr().unwrap();
            let data = payload::bytes(seed + i as u64, 48 * 1024 + i * 1000);
            let echoed = round_trip(stream, &data);
            assert_same(
                &echoed,
                &data,
                &format!("echo through haproxy for {client}"),
            );
            client
        })
        .collect()
}

#[test]
fn haproxy_headers_name_each_client_v1_and_v2() {
    for (send_proxy, version) in [(SendProxy::V1, 1), (SendProxy::V2, 2)] {
        let backend = ParserBackend::start(true);
        let haproxy = Haproxy::start(HaproxyConfig {
            send_proxy,
            backend: backend.addr,
            health_check: false,
        });
        let clients = clients_through(haproxy.frontend(), &[11, 12, 13], 80);
        for client in clients {
            let header =
                backend.wait_for_header(&format!("naming {client}"), |h| h.source == Some(client));
            assert_eq!(header.version, version, "{send_proxy:?}");
            assert!(!header.local);
            assert_eq!(header.destination, Some(haproxy.frontend()));
        }
        assert!(
            backend.headers().iter().all(Result::is_ok),
            "{send_proxy:?}: {:?}",
            backend.headers()
        );
    }
}

#[test]
fn haproxy_health_check_carries_a_header_and_marks_the_server_up() {
    for (send_proxy, version) in [(SendProxy::V1, 1), (SendProxy::V2, 2)] {
        let backend = ParserBackend::start(true);
        // start() returns once the server is UP after a passing tcp-check: the check's line
        // came back through the parser backend's echo.
        let haproxy = Haproxy::start(HaproxyConfig {
            send_proxy,
            backend: backend.addr,
            health_check: true,
        });
        // HAProxy's checks carry a header too (check-send-proxy is implied). As HAProxy 2.6
        // sends them: v2 says LOCAL (served as from the proxy); v1, which has no LOCAL, names
        // the check's own connection, from HAProxy to the server.
        let header = if version == 2 {
            backend.wait_for_header("LOCAL from a v2 health check", |h| h.local)
        } else {
            backend.wait_for_header("from a v1 health check", |h| {
                h.destination == Some(backend.addr)
            })
        };
        assert_eq!(header.version, version);
        if version == 2 {
            assert_eq!((header.source, header.destination), (None, None));
        } else {
            assert_eq!(header.source.unwrap().ip(), loopback(1));
        }
        assert_eq!(haproxy.row(SERVER).unwrap().check_status(), "L7OK");
    }
}

#[test]
fn haproxy_health_check_fails_against_a_backend_that_does_not_echo() {
    // The same tcp-check as the generated config's, against a backend that reads the header
    // and closes: the check is real, not the state a server starts in.
    let backend = ParserBackend::start(false);
    let haproxy = Haproxy::start_with(|bind, socket| {
        format!(
            "global\n    stats socket {}\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
             timeout client 60s\n    timeout server 60s\nfrontend f\n    bind {bind}\n    \
             default_backend b\nbackend b\n    option tcp-check\n    tcp-check send \"x\\n\"\n    \
             tcp-check expect string x\n    server {SERVER} {} send-proxy-v2 check inter 100ms \
             rise 1 fall 1\n",
            socket.display(),
            backend.addr
        )
    });
    haproxy.wait_for_row(SERVER, "DOWN", |row| row.status() == "DOWN");
}

/// The shipped config with its addresses and stats socket replaced: the frontend's
/// `127.0.0.1:4000` by the harness's socket, backend N (`127.0.0.1:400N`) by `backends[N - 1]`,
/// the stats socket by a temporary one. Nothing else changes.
fn render_scale_out(bind: &str, socket: &Path, backends: &[SocketAddr]) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/scale-out/haproxy.cfg");
    let cfg = std::fs::read_to_string(path).expect("docs/scale-out/haproxy.cfg");
    let mut replacements = vec![
        ("127.0.0.1:4000".to_string(), bind.to_string()),
        (
            "/tmp/multiecho-haproxy.sock".to_string(),
            socket.display().to_string(),
        ),
    ];
    for (i, backend) in backends.iter().enumerate() {
        replacements.push((format!("127.0.0.1:400{}", i + 1), backend.to_string()));
    }
    // Whole words only, in one pass: a port the harness got (say 40012) must not be rewritten
    // again by a later placeholder (127.0.0.1:4001).
    let mut found = vec![false; replacements.len()];
    let rendered: Vec<String> = cfg
        .lines()
        .map(|line| {
            line.split(' ')
                .map(
                    |word| match replacements.iter().position(|(from, _)| from == word) {
                        Some(i) => {
                            found[i] = true;
                            replacements[i].1.as_str()
                        }
                        None => word,
                    },
                )
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    for ((from, _), found) in replacements.iter().zip(found) {
        assert!(found, "the doc's config has no {from}");
    }
    rendered.join("\n") + "\n"
}

const SCALE_OUT_SERVERS: [&str; 3] = ["echo1", "echo2", "echo3"];

#[test]
fn scale_out_doc_config_runs_against_parser_backends() {
    let backends: Vec<ParserBackend> = (0..3).map(|_| ParserBackend::start(true)).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let haproxy = Haproxy::start_with(|bind, socket| render_scale_out(bind, socket, &addrs));
    for server in SCALE_OUT_SERVERS {
        haproxy.wait_up(server);
    }
    let clients = clients_through(haproxy.frontend(), &[31, 32, 33, 34, 35, 36], 90);
    for client in clients {
        let deadline = Instant::now() + PATIENCE;
        while !backends.iter().any(|b| {
            b.headers()
                .iter()
                .any(|h| matches!(h, Ok(h) if h.source == Some(client) && h.version == 2))
        }) {
            assert!(Instant::now() < deadline, "no backend saw {client}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

// ---- multiecho serve --listen tcp+proxy://... (the server side, every model) ----

/// Starts `model` with a plain listener (the harness's) and a `tcp+proxy://` one; returns the
/// server and the PROXY listener's address, or `None` when the model cannot run here.
fn start_proxy_server(model: &str, extra: &[&str]) -> Option<(Server, SocketAddr)> {
    let mut args = vec!["--listen", "tcp+proxy://127.0.0.1:0"];
    args.extend_from_slice(extra);
    let server = start_or_skip(model, &args)?;
    // The listeners as the server announced them on --ready-fd: the harness's plain one first.
    let addr = server.listener("tcp+proxy");
    Some((server, addr))
}

/// Whether `log` has the per-connection close line naming `peer`.
fn has_close_line(log: &str, peer: SocketAddr) -> bool {
    let wanted = format!("peer={peer} ");
    log.lines()
        .any(|line| line.contains("connection closed") && line.contains(&wanted))
}

/// Waits for the per-connection close line naming `peer`.
fn wait_close_line(server: &Server, model: &str, peer: SocketAddr) {
    server.wait_for_log(&format!("{model}: the close line for {peer}"), |log| {
        has_close_line(log, peer)
    });
}

/// Reads until end of stream or reset; returns what arrived before it (panics if the server
/// keeps the connection open past `within`).
fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server kept the connection open for {within:?}")
            }
            Err(_) => return got,
        }
    }
}

fn v1_line(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        client.ip(),
        server.ip(),
        client.port(),
        server.port()
    )
    .into_bytes()
}

fn v2_header(command: u8, client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(c), SocketAddr::V4(s)) = (client, server) else {
        panic!("IPv4 only");
    };
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x20 | command, 0x11, 0, 12]);
    out.extend_from_slice(&c.ip().octets());
    out.extend_from_slice(&s.ip().octets());
    out.extend_from_slice(&c.port().to_be_bytes());
    out.extend_from_slice(&s.port().to_be_bytes());
    out
}

fn behind_haproxy_v1_and_v2(model: &str) {
    for send_proxy in [SendProxy::V1, SendProxy::V2] {
        let Some((server, proxy_addr)) = start_proxy_server(model, &[]) else {
            continue;
        };
        // The health check (a v2 LOCAL or a v1 TCP4 header, then a line echoed) marks the
        // server UP.
        let haproxy = Haproxy::start(HaproxyConfig {
            send_proxy,
            backend: proxy_addr,
            health_check: true,
        });
        let clients = clients_through(haproxy.frontend(), &[21, 22, 23], 100);
        for client in clients {
            wait_close_line(&server, model, client);
        }
        // The plain listener in the same process still serves plain TCP.
        let data = payload::bytes(7, 10_000);
        let echoed = round_trip(connect(server.addr), &data);
        assert_same(&echoed, &data, &format!("{model}: plain listener"));
    }
}

fn local_header_is_served_as_from_the_proxy(model: &str) {
    let Some((server, proxy_addr)) = start_proxy_server(model, &[]) else {
        return;
    };
    let mut stream = connect(proxy_addr);
    let me = stream.local_addr().unwrap();
    let mut first = v2_header(0x0, "10.9.9.9:999".parse().unwrap(), proxy_addr);
    first.extend_from_slice(b"health\n");
    stream.write_all(&first).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let echoed = read_until_closed(&mut stream, PATIENCE);
    assert_same(&echoed, b"health\n", &format!("{model}: LOCAL echo"));
    // Served as coming from the proxy, the TCP peer: the addresses in a LOCAL header are
    // ignored.
    wait_close_line(&server, model, me);
    assert!(
        !server.log().contains("10.9.9.9"),
        "{model}: {}",
        server.log()
    );
}

fn header_faults_close_only_their_own_connection(model: &str) {
    let timeout = Duration::from_millis(600);
    let Some((server, proxy_addr)) = start_proxy_server(model, &["--proxy-timeout", "600ms"])
    else {
        return;
    };
    // The iterative model serves one connection at a time, so a live connection would hold
    // back the faulty ones; for it the faults run alone and a good client comes after.
    let concurrent = model != "iterative";
    let mut live = concurrent.then(|| {
        let mut stream = connect_from(loopback(41), proxy_addr);
        let me = stream.local_addr().unwrap();
        stream.write_all(&v1_line(me, proxy_addr)).unwrap();
        stream.write_all(b"before\n").unwrap();
        common::expect_echo(&mut stream, b"before\n", &format!("{model}: live before"));
        stream
    });

    // No header: plain data is not a header; nothing is echoed.
    let mut none = connect_from(loopback(42), proxy_addr);
    none.write_all(b"hello there\n").unwrap();
    assert!(
        read_until_closed(&mut none, PATIENCE).is_empty(),
        "{model}: no header"
    );

    // Garbage that starts like a v1 header.
    let mut garbage = connect_from(loopback(43), proxy_addr);
    garbage
        .write_all(b"PROXY TCP4 not an address at all\r\nx\n")
        .unwrap();
    assert!(
        read_until_closed(&mut garbage, PATIENCE).is_empty(),
        "{model}: garbage"
    );

    // A v2 header cut short, then half-close.
    let mut truncated = connect_from(loopback(44), proxy_addr);
    let header = v2_header(0x1, "127.0.0.44:4444".parse().unwrap(), proxy_addr);
    truncated.write_all(&header[..20]).unwrap();
    truncated.shutdown(Shutdown::Write).unwrap();
    assert!(
        read_until_closed(&mut truncated, PATIENCE).is_empty(),
        "{model}: truncated"
    );

    // A header trickled slower than --proxy-timeout: closed, nothing echoed.
    let mut slow = connect_from(loopback(45), proxy_addr);
    let me = slow.local_addr().unwrap();
    let started = Instant::now();
    let line = v1_line(me, proxy_addr);
    let trickler = {
        let mut writer = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            for byte in line {
                if writer.write_all(&[byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = writer.write_all(b"late\n");
        })
    };
    assert!(
        read_until_closed(&mut slow, PATIENCE).is_empty(),
        "{model}: slow header"
    );
    assert!(
        started.elapsed() >= timeout - Duration::from_millis(50),
        "{model}: closed early"
    );
    trickler.join().unwrap();

    // A header one byte at a time, within the timeout: accepted, and the client's address
    // is the header's.
    let mut bytewise = connect_from(loopback(46), proxy_addr);
    bytewise.set_nodelay(true).unwrap();
    let me = bytewise.local_addr().unwrap();
    let mut bytes = v2_header(0x1, me, proxy_addr);
    bytes.extend_from_slice(b"bytewise\n");
    for byte in &bytes {
        bytewise.write_all(std::slice::from_ref(byte)).unwrap();
        bytewise.flush().unwrap();
    }
    bytewise.shutdown(Shutdown::Write).unwrap();
    let echoed = read_until_closed(&mut bytewise, PATIENCE);
    assert_same(
        &echoed,
        b"bytewise\n",
        &format!("{model}: one byte at a time"),
    );
    wait_close_line(&server, model, me);

    // The live connection was not disturbed (or, for iterative, a new one is served).
    let mut live = live.take().unwrap_or_else(|| {
        let mut stream = connect_from(loopback(41), proxy_addr);
        let me = stream.local_addr().unwrap();
        stream.write_all(&v1_line(me, proxy_addr)).unwrap();
        stream
    });
    live.write_all(b"after\n").unwrap();
    common::expect_echo(
        &mut live,
        b"after\n",
        &format!("{model}: live after the faults"),
    );
    server.wait_for_log(
        &format!("{model}: the refusals of the faulty headers"),
        |log| log.contains("reason=proxy-header"),
    );
}

/// At the shutdown deadline a connection still waiting for its header is closed and refused
/// (counted, logged), and a served one beside it is closed and logged as closed at shutdown;
/// the server exits 0 once the deadline passed. For the models that serve connections side by
/// side (iterative, prefork and pool with one worker would hold the second client back).
fn shutdown_deadline_closes_connections_with_and_without_their_header(model: &str) {
    let Some((mut server, proxy_addr)) = start_proxy_server(
        model,
        &[
            "--workers",
            "1",
            "--proxy-timeout",
            "30s",
            "--shutdown-timeout",
            "500ms",
        ],
    ) else {
        return;
    };
    // One worker accepts in order: once the second connection's echo is back, the first,
    // with its ten bytes of a header, has been accepted too and is waiting for the rest.
    let mut waiting = connect_from(loopback(52), proxy_addr);
    let waiting_peer = waiting.local_addr().unwrap();
    waiting
        .write_all(&v1_line(waiting_peer, proxy_addr)[..10])
        .unwrap();
    let mut served = connect_from(loopback(51), proxy_addr);
    let served_peer = served.local_addr().unwrap();
    served.write_all(&v1_line(served_peer, proxy_addr)).unwrap();
    served.write_all(b"served\n").unwrap();
    common::expect_echo(&mut served, b"served\n", &format!("{model}: served"));
    let status = server.terminate_and_wait();
    assert!(status.success(), "{model}: exit status {status}");
    for (stream, what) in [(&mut waiting, "half-header"), (&mut served, "served")] {
        assert!(
            read_until_closed(stream, PATIENCE).is_empty(),
            "{model}: the {what} connection got bytes at the deadline"
        );
    }
    let log = server.log();
    let line_of = |what: &str, peer: SocketAddr| {
        let wanted = format!("peer={peer} ");
        log.lines()
            .find(|line| line.contains(what) && line.contains(&wanted))
            .unwrap_or_else(|| panic!("{model}: no '{what}' line for {peer}; log:\n{log}"))
    };
    let refusal = line_of("connection refused", waiting_peer);
    let why = "closed at shutdown before the PROXY header";
    assert!(
        refusal.contains("reason=proxy-header") && refusal.contains(why),
        "{model}: refusal line {refusal:?} does not say {why:?}"
    );
    let close = line_of("connection closed", served_peer);
    assert!(
        close.contains("closed at shutdown"),
        "{model}: close line {close:?} does not say shutdown closed it"
    );
}

/// Sends `line` through `stream`, half-closes and reads until the server closes; returns the
/// echo. A refused connection may be reset before the write or the half-close: that is not an
/// error here, the (empty) echo tells.
fn exchange(mut stream: TcpStream, line: &[u8]) -> Vec<u8> {
    let _ = stream.write_all(line);
    let _ = stream.shutdown(Shutdown::Write);
    read_until_closed(&mut stream, PATIENCE)
}

fn admission_through_haproxy_applies_to_the_real_client(model: &str) {
    let extra = ["--deny", "127.0.0.72/32", "--max-per-source", "1"];
    let Some((server, proxy_addr)) = start_proxy_server(model, &extra) else {
        return;
    };
    let haproxy = Haproxy::start(HaproxyConfig {
        send_proxy: SendProxy::V2,
        backend: proxy_addr,
        health_check: false,
    });
    let frontend = haproxy.frontend();
    // Every connection reaches multiecho from HAProxy's 127.0.0.1; the rules see the client.
    let denied = exchange(connect_from(loopback(72), frontend), b"denied?\n");
    assert_same(
        &denied,
        b"",
        &format!("{model}: denied client through haproxy"),
    );
    let served = exchange(connect_from(loopback(71), frontend), b"served\n");
    assert_same(
        &served,
        b"served\n",
        &format!("{model}: allowed client through haproxy"),
    );
    if model == "iterative" {
        // It serves one connection at a time, so a held connection would keep the next one
        // from even being accepted; the per-source limit is not observable through it.
        return;
    }
    let mut first = connect_from(loopback(73), frontend);
    let first_addr = first.local_addr().unwrap();
    first.write_all(b"one\n").unwrap();
    common::expect_echo(&mut first, b"one\n", &format!("{model}: first from .73"));
    let second = exchange(connect_from(loopback(73), frontend), b"two\n");
    assert_same(
        &second,
        b"",
        &format!("{model}: second from .73 beyond --max-per-source 1"),
    );
    let other = exchange(connect_from(loopback(74), frontend), b"other\n");
    assert_same(&other, b"other\n", &format!("{model}: another source"));
    drop(first);
    wait_close_line(&server, model, first_addr);
    let again = exchange(connect_from(loopback(73), frontend), b"again\n");
    assert_same(&again, b"again\n", &format!("{model}: the freed slot"));
}

fn trusted_proxy_decides_who_may_send_a_header(model: &str) {
    // Default: loopback only, so any 127.x peer may send a header.
    let Some((server, proxy_addr)) = start_proxy_server(model, &[]) else {
        return;
    };
    let stream = connect_from(loopback(51), proxy_addr);
    let me = stream.local_addr().unwrap();
    let echoed = exchange(
        stream,
        &[v1_line(me, proxy_addr), b"trusted\n".to_vec()].concat(),
    );
    assert_same(
        &echoed,
        b"trusted\n",
        &format!("{model}: default trusted loopback"),
    );
    drop(server);

    let Some((server, proxy_addr)) =
        start_proxy_server(model, &["--trusted-proxy", "127.0.0.52/32"])
    else {
        return;
    };
    for (last, trusted) in [(53, false), (52, true)] {
        let stream = connect_from(loopback(last), proxy_addr);
        let me = stream.local_addr().unwrap();
        let echoed = exchange(
            stream,
            &[v1_line(me, proxy_addr), b"who\n".to_vec()].concat(),
        );
        let want: &[u8] = if trusted { b"who\n" } else { b"" };
        assert_same(&echoed, want, &format!("{model}: peer 127.0.0.{last}"));
    }
    // The refusal's line may come a moment after the client saw the close.
    server.wait_for_log(&format!("{model}: the untrusted-proxy refusal"), |log| {
        log.contains("reason=untrusted-proxy")
    });
}

#[test]
fn scale_out_doc_config_runs_against_multiecho() {
    let servers: Vec<(Server, SocketAddr)> = (0..3)
        .map(|_| start_proxy_server("epoll", &[]).expect("epoll runs everywhere"))
        .collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|(_, addr)| *addr).collect();
    let haproxy = Haproxy::start_with(|bind, socket| render_scale_out(bind, socket, &addrs));
    for server in SCALE_OUT_SERVERS {
        haproxy.wait_up(server);
    }
    let clients = clients_through(haproxy.frontend(), &[61, 62, 63, 64, 65, 66], 110);
    for client in clients {
        let deadline = Instant::now() + PATIENCE;
        while !servers
            .iter()
            .any(|(s, _)| has_close_line(&s.log(), client))
        {
            assert!(Instant::now() < deadline, "no instance logged {client}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The per-model tests, one module per model (as in tests/models.rs); attributes given before
/// a model apply to each of its tests.
macro_rules! suite {
    ($($(#[$attr:meta])* $model:ident),* $(,)?) => {$(
        mod $model {
            fn name() -> &'static str {
                stringify!($model).trim_start_matches("r#")
            }
            #[test]
            $(#[$attr])*
            fn behind_haproxy_v1_and_v2() {
                super::behind_haproxy_v1_and_v2(name())
            }
            #[test]
            $(#[$attr])*
            fn local_header_is_served_as_from_the_proxy() {
                super::local_header_is_served_as_from_the_proxy(name())
            }
            #[test]
            $(#[$attr])*
            fn header_faults_close_only_their_own_connection() {
                super::header_faults_close_only_their_own_connection(name())
            }
            #[test]
            $(#[$attr])*
            fn admission_through_haproxy_applies_to_the_real_client() {
                super::admission_through_haproxy_applies_to_the_real_client(name())
            }
            #[test]
            $(#[$attr])*
            fn trusted_proxy_decides_who_may_send_a_header() {
                super::trusted_proxy_decides_who_may_send_a_header(name())
            }
        }
    )*};
}

suite!(iterative, process, prefork, thread, pool, epoll, r#async, uring);

#[test]
fn thread_shutdown_deadline_closes_connections_with_and_without_their_header() {
    shutdown_deadline_closes_connections_with_and_without_their_header("thread");
}

#[test]
fn process_shutdown_deadline_closes_connections_with_and_without_their_header() {
    shutdown_deadline_closes_connections_with_and_without_their_header("process");
}

#[test]
fn epoll_shutdown_deadline_closes_connections_with_and_without_their_header() {
    shutdown_deadline_closes_connections_with_and_without_their_header("epoll");
}

#[test]
fn async_shutdown_deadline_closes_connections_with_and_without_their_header() {
    shutdown_deadline_closes_connections_with_and_without_their_header("async");
}

#[test]
#[cfg_attr(not(target_os = "linux"), ignore = "io_uring is Linux only")]
fn uring_shutdown_deadline_closes_connections_with_and_without_their_header() {
    shutdown_deadline_closes_connections_with_and_without_their_header("uring");
}
