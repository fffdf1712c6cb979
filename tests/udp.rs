//! UDP echo (`--listen udp://`), for every model that serves it: exact echoes at every size,
//! zero-length datagrams, real peers (socat, nc -u), the loop guard, the per-source rate,
//! segment trains (`UDP_SEGMENT` senders; epoll's `--udp-gro on` takes them whole), shutdown,
//! and the models and inputs that must be refused.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{Server, ServerBuilder, BIN};
use multiecho::payload::Rng;
use multiecho::server::uring::{SINGLE_RECV_ENV, UDP_BUFFERS_ENV};

const UDP_MODELS: [&str; 6] = ["iterative", "prefork", "pool", "epoll", "async", "uring"];
/// The largest UDP payload over IPv4.
const MAX_V4: usize = 65_507;

/// A server with a TCP listener (the harness's) and one `udp://` listener; returns it and the
/// UDP address it announced on `--ready-fd`, or `None` (said loudly) where the model cannot
/// run here (uring without io_uring).
fn start(model: &str, extra: &[&str]) -> Option<(Server, SocketAddr)> {
    start_with_env(model, extra, &[])
}

/// [`start`] with environment variables for the server.
fn start_with_env(
    model: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Option<(Server, SocketAddr)> {
    let mut args = vec!["--listen", "udp://127.0.0.1:0", "--workers", "2"];
    args.extend_from_slice(extra);
    let server = ServerBuilder::new(model)
        .args(&args)
        .envs(envs)
        .start_or_skip()?;
    let addr = udp_listener(&server);
    Some((server, addr))
}

/// The server's first `udp` listener, as announced on `--ready-fd`.
fn udp_listener(server: &Server) -> SocketAddr {
    server.listener("udp")
}

fn client_socket() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    socket
}

/// Receives one datagram, or `None` within `wait`.
fn recv_within(socket: &UdpSocket, wait: Duration, buf: &mut [u8]) -> Option<usize> {
    socket.set_read_timeout(Some(wait)).unwrap();
    match socket.recv_from(buf) {
        Ok((n, _)) => Some(n),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv failed: {e}"),
    }
}

/// 2,000 datagrams of random sizes (1 to 65,507 bytes) from 8 sources, one in flight per
/// source: each comes back byte-exact and once; then zero-length datagrams come back empty.
fn exact_echoes(model: &'static str) {
    exact_echoes_with_env(model, &[]);
}

fn exact_echoes_with_env(model: &'static str, envs: &[(&str, &str)]) {
    let Some((server, addr)) = start_with_env(model, &["--udp-rate", "0"], envs) else {
        return;
    };
    let senders: Vec<_> = (0..8u64)
        .map(|source| {
            thread::spawn(move || {
                let socket = client_socket();
                socket.connect(addr).unwrap();
                let mut rng = Rng::new(0x5eed + source);
                let mut buf = vec![0u8; 70_000];
                for seq in 0..250u64 {
                    let len = rng.range(1, MAX_V4 as u64) as usize;
                    let mut datagram = vec![0u8; len];
                    rng.fill(&mut datagram);
                    // The first bytes name the datagram, so a stray one is recognised.
                    let tag = (source << 32 | seq).to_le_bytes();
                    let n = tag.len().min(len);
                    datagram[..n].copy_from_slice(&tag[..n]);
                    socket.send(&datagram).unwrap();
                    let got = socket
                        .recv(&mut buf)
                        .unwrap_or_else(|e| panic!("{model}: source {source} seq {seq}: {e}"));
                    assert!(
                        buf[..got] == datagram[..],
                        "{model}: source {source} seq {seq}: {got} bytes back for {len}, or different bytes"
                    );
                }
                // Anything more is a duplicate.
                assert_eq!(
                    recv_within(&socket, Duration::from_millis(200), &mut buf),
                    None,
                    "{model}: source {source} got a duplicate"
                );
                for _ in 0..3 {
                    socket.send(&[]).unwrap();
                    assert_eq!(socket.recv(&mut buf).unwrap(), 0, "{model}: zero-length echo");
                }
            })
        })
        .collect();
    for sender in senders {
        sender.join().unwrap();
    }
    assert!(server.stop().success());
}

#[test]
fn iterative_echoes_every_datagram_exactly() {
    exact_echoes("iterative");
}

#[test]
fn prefork_echoes_every_datagram_exactly() {
    exact_echoes("prefork");
}

#[test]
fn pool_echoes_every_datagram_exactly() {
    exact_echoes("pool");
}

#[test]
fn epoll_echoes_every_datagram_exactly() {
    exact_echoes("epoll");
}

#[test]
fn async_echoes_every_datagram_exactly() {
    exact_echoes("async");
}

#[test]
fn uring_echoes_every_datagram_exactly() {
    exact_echoes("uring");
}

/// The same with single `recvmsg`s, the fallback where multishot `recvmsg` is refused.
#[test]
fn uring_echoes_every_datagram_exactly_with_single_receives() {
    exact_echoes_with_env("uring", &[(SINGLE_RECV_ENV, "1")]);
}

/// The same with one buffer per UDP ring: every receive runs the pool dry, and the buffer
/// comes back only once its echo is sent (a buffer recycled too early would corrupt echoes).
#[test]
fn uring_echoes_every_datagram_exactly_from_a_pool_of_one_buffer() {
    exact_echoes_with_env("uring", &[(UDP_BUFFERS_ENV, "1")]);
    exact_echoes_with_env("uring", &[(UDP_BUFFERS_ENV, "1"), (SINGLE_RECV_ENV, "1")]);
}

/// A receive buffer for `socket` large enough for a whole burst of echoes (as root, beyond
/// `net.core.rmem_max`; CI runs as root).
fn room_for_a_burst(socket: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let bytes: usize = 8 << 20;
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &bytes);
    }
}

/// One burst, sent before any echo is read, of 40 datagrams of distinct sizes from 1 to
/// 65,507 bytes, which the server takes in batches (`recvmmsg`) and answers in batches
/// (`sendmmsg`): each comes back byte-exact and once. The sizes are distinct, so the length of
/// an echo names the datagram it answers (with two workers, echoes may come back reordered).
fn burst_echoes(model: &'static str, envs: &[(&str, &str)]) {
    let Some((server, addr)) = start_with_env(model, &["--udp-rate", "0"], envs) else {
        return;
    };
    let socket = client_socket();
    room_for_a_burst(&socket);
    socket.connect(addr).unwrap();
    let mut rng = Rng::new(0xb0257);
    let mut sizes = vec![1, 2, 63, 64, 65, 1472, 1473, 8192, 65_506, MAX_V4];
    while sizes.len() < 40 {
        let len = rng.range(1, MAX_V4 as u64) as usize;
        if !sizes.contains(&len) {
            sizes.push(len);
        }
    }
    let sent: std::collections::HashMap<usize, Vec<u8>> = sizes
        .iter()
        .map(|&len| {
            let mut datagram = vec![0u8; len];
            rng.fill(&mut datagram);
            (len, datagram)
        })
        .collect();
    for len in &sizes {
        socket.send(&sent[len]).unwrap();
    }
    let mut buf = vec![0u8; 70_000];
    let mut seen = std::collections::HashSet::new();
    while seen.len() < sizes.len() {
        let n = socket.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "{model}: {} of {} echoes back, then {e}",
                seen.len(),
                sizes.len()
            )
        });
        let expected = sent
            .get(&n)
            .unwrap_or_else(|| panic!("{model}: an echo of {n} bytes, a size never sent"));
        assert!(
            buf[..n] == expected[..],
            "{model}: the {n}-byte echo differs"
        );
        assert!(
            seen.insert(n),
            "{model}: the {n}-byte datagram came back twice"
        );
    }
    assert_eq!(
        recv_within(&socket, Duration::from_millis(200), &mut buf),
        None,
        "{model}: a duplicate after the burst"
    );
    assert!(server.stop().success());
}

#[test]
fn every_udp_model_echoes_a_burst_of_every_size_exactly() {
    for model in UDP_MODELS {
        burst_echoes(model, &[]);
    }
}

/// A burst that needs many times the pool: the uring rings' receives find it empty over and
/// over, and resume when echoes give buffers back.
#[test]
fn uring_echoes_a_burst_through_a_small_pool() {
    burst_echoes("uring", &[(UDP_BUFFERS_ENV, "2")]);
    burst_echoes("uring", &[(UDP_BUFFERS_ENV, "2"), (SINGLE_RECV_ENV, "1")]);
}

/// Denied and admitted sources interleaved in one burst (so in the server's batches): the
/// admitted source gets every echo, the denied one none.
#[test]
fn a_burst_mixing_denied_and_admitted_sources_is_decided_per_datagram() {
    for model in UDP_MODELS {
        let Some((server, addr)) = start(model, &["--deny", "127.0.0.2", "--udp-rate", "0"]) else {
            continue;
        };
        let admitted = client_socket();
        let denied = UdpSocket::bind("127.0.0.2:0").unwrap();
        for seq in 0..32u8 {
            admitted.send_to(&[b'a', seq], addr).unwrap();
            denied.send_to(&[b'd', seq], addr).unwrap();
        }
        let mut buf = [0u8; 16];
        let mut got = Vec::new();
        while got.len() < 32 {
            match recv_within(&admitted, Duration::from_secs(3), &mut buf) {
                Some(n) => got.push(buf[..n].to_vec()),
                None => panic!("{model}: {} of 32 echoes to the admitted source", got.len()),
            }
        }
        got.sort();
        let expected: Vec<Vec<u8>> = (0..32u8).map(|seq| vec![b'a', seq]).collect();
        assert_eq!(got, expected, "{model}");
        assert_eq!(
            recv_within(&denied, Duration::from_millis(200), &mut buf),
            None,
            "{model}: the denied source got a reply"
        );
        assert!(server.stop().success());
    }
}

#[test]
fn ipv6_datagrams_up_to_the_maximum() {
    if UdpSocket::bind("[::1]:0").is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must have IPv6 loopback for this test"
        );
        eprintln!("SKIPPED: no IPv6 loopback here");
        return;
    }
    for model in ["epoll", "uring"] {
        let Some(server) = common::start_or_skip(model, &["--listen", "udp://[::1]:0"]) else {
            continue;
        };
        let addr = udp_listener(&server);
        let socket = UdpSocket::bind("[::1]:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut buf = vec![0u8; 70_000];
        for len in [0, 1, 1452, 65_507, 65_527] {
            let datagram = multiecho::payload::bytes(len as u64, len);
            socket.send_to(&datagram, addr).unwrap();
            let (n, _) = socket.recv_from(&mut buf).unwrap();
            assert!(buf[..n] == datagram[..], "{model}: {len} bytes over IPv6");
        }
        assert!(server.stop().success());
    }
}

/// Runs a shell pipeline and returns its stdout.
fn shell(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "CI must install {tool} (.ci/run)"
        );
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

#[test]
fn socat_and_nc_get_their_lines_back() {
    if !have("socat") || !have("nc") {
        return;
    }
    for model in UDP_MODELS {
        let Some((server, addr)) = start(model, &[]) else {
            continue;
        };
        let port = addr.port();
        // socat sends what each read of stdin returns as one datagram; one line at a time here.
        let got = shell(&format!(
            "(echo one; sleep 0.2; echo two) | socat -t 0.5 - UDP:127.0.0.1:{port}"
        ));
        assert_eq!(got, "one\ntwo\n", "{model}: socat");
        let got = shell(&format!("echo 'via nc' | nc -u -w 1 127.0.0.1 {port}"));
        assert_eq!(got, "via nc\n", "{model}: nc -u");
        assert!(server.stop().success());
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn the_loop_guard_ignores_service_ports() {
    if !is_root() {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs as root: binding ports 7 and 19 must work there"
        );
        eprintln!("SKIPPED: binding 127.0.0.1:7 and :19 needs root");
        return;
    }
    for model in UDP_MODELS {
        let Some((server, addr)) = start(model, &[]) else {
            continue;
        };
        let mut buf = [0u8; 64];
        let echo = UdpSocket::bind("127.0.0.1:7").expect("bind port 7 (echo)");
        let chargen = UdpSocket::bind("127.0.0.1:19").expect("bind port 19 (chargen)");
        echo.send_to(b"from echo", addr).unwrap();
        chargen.send_to(b"from chargen", addr).unwrap();
        let ephemeral = client_socket();
        ephemeral.send_to(b"from an ephemeral port", addr).unwrap();
        assert_eq!(
            recv_within(&ephemeral, Duration::from_secs(3), &mut buf),
            Some(22),
            "{model}: an ephemeral port is answered"
        );
        // The guarded datagrams were sent first, so they were decided first.
        assert_eq!(
            recv_within(&echo, Duration::from_millis(200), &mut buf),
            None,
            "{model}: no reply to port 7"
        );
        assert_eq!(
            recv_within(&chargen, Duration::from_millis(50), &mut buf),
            None,
            "{model}: no reply to port 19"
        );
        drop((echo, chargen));
        let mut server = server;
        server.terminate();
        let status = server.wait_timeout(common::PATIENCE).expect("exits");
        assert!(status.success());
        if model != "prefork" {
            // The fork model's workers count for themselves; the others report at stop.
            server.wait_for_log("the refusal counters", |log| {
                log.contains("2 datagrams refused: udp-reflection-port")
            });
        }
    }
}

#[test]
fn any_port_turns_the_guard_off() {
    if !is_root() {
        assert!(std::env::var("CI").is_err(), "CI runs as root");
        eprintln!("SKIPPED: binding 127.0.0.1:7 needs root");
        return;
    }
    let (server, addr) = start("epoll", &["--udp-any-port"]).expect("epoll runs anywhere");
    let echo = UdpSocket::bind("127.0.0.1:7").expect("bind port 7");
    echo.send_to(b"loop?", addr).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        recv_within(&echo, Duration::from_secs(3), &mut buf),
        Some(5)
    );
    assert!(server.stop().success());
}

/// A source sending 1,000 datagrams per second against `--udp-rate 100` gets about the
/// bucket's burst plus 100 per second back.
fn rate_limited(model: &'static str) {
    let rate = 100.0;
    let Some((server, addr)) = start(model, &["--udp-rate", "100"]) else {
        return;
    };
    let socket = client_socket();
    socket.connect(addr).unwrap();
    let receiver = socket.try_clone().unwrap();
    let counter = thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut got = 0u32;
        while recv_within(&receiver, Duration::from_millis(500), &mut buf).is_some() {
            got += 1;
        }
        got
    });
    let started = Instant::now();
    for i in 0..1500u32 {
        socket.send(&i.to_le_bytes()).unwrap();
        // Paced at about 1,000 per second.
        let due = started + Duration::from_millis(u64::from(i));
        thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let got = f64::from(counter.join().unwrap());
    let expected = rate + rate * elapsed;
    assert!(
        (expected * 0.75..=expected * 1.25).contains(&got),
        "{model}: {got} replies in {elapsed:.2}s at --udp-rate 100 (expected about {expected:.0})"
    );
    let mut server = server;
    server.terminate();
    assert!(server.wait_timeout(common::PATIENCE).unwrap().success());
    if model != "prefork" {
        server.wait_for_log("the rate counter", |log| {
            log.contains("datagrams refused: udp-rate")
        });
    }
}

#[test]
fn a_fast_source_gets_replies_at_the_rate_epoll() {
    rate_limited("epoll");
}

#[test]
fn a_fast_source_gets_replies_at_the_rate_uring() {
    rate_limited("uring");
}

#[test]
fn a_fast_source_gets_replies_at_the_rate_prefork() {
    // The workers share the per-source table, so the budget is the server's, not a worker's.
    rate_limited("prefork");
}

#[test]
fn deny_applies_to_every_datagram() {
    let (server, addr) = start("async", &["--deny", "127.0.0.1"]).expect("async runs anywhere");
    let socket = client_socket();
    socket.send_to(b"denied", addr).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        recv_within(&socket, Duration::from_millis(300), &mut buf),
        None
    );
    assert!(server.stop().success());
}

#[test]
fn sigterm_stops_udp_at_once_and_tcp_drains() {
    use std::io::{Read, Write};
    for model in ["epoll", "async", "iterative", "uring"] {
        let Some((mut server, addr)) = start(model, &["--shutdown-timeout", "20s"]) else {
            continue;
        };
        let mut tcp = common::connect(server.addr);
        tcp.write_all(b"before").unwrap();
        let mut six = [0u8; 6];
        tcp.read_exact(&mut six).unwrap();
        let socket = client_socket();
        let mut buf = [0u8; 16];
        socket.send_to(b"up", addr).unwrap();
        assert_eq!(
            recv_within(&socket, Duration::from_secs(3), &mut buf),
            Some(2)
        );
        server.terminate();
        server.wait_for_log("draining", |log| log.contains("shutting down"));
        // The UDP side answers no more, while the TCP connection is still served.
        thread::sleep(Duration::from_millis(100));
        socket.send_to(b"after", addr).unwrap();
        assert_eq!(
            recv_within(&socket, Duration::from_millis(300), &mut buf),
            None,
            "{model}: UDP stopped at SIGTERM"
        );
        tcp.write_all(b"during").unwrap();
        tcp.read_exact(&mut six).unwrap();
        assert_eq!(&six, b"during", "{model}: TCP drains");
        drop(tcp);
        let status = server.wait_timeout(common::PATIENCE).expect("exits");
        assert!(status.success(), "{model}: exit 0 after the drain");
    }
}

/// Runs `multiecho serve ARGS` and expects it to fail at start; returns its stderr.
fn fails_to_start(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("serve")
        .args(args)
        .output()
        .expect("run multiecho");
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn models_without_udp_refuse_it_naming_those_that_serve_it() {
    for model in ["process", "thread"] {
        let err = fails_to_start(&["--model", model, "--listen", "udp://127.0.0.1:0"]);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{model}: one line: {err}");
        assert!(
            err.contains("does not serve udp://")
                && err.contains("iterative, prefork, pool, epoll, async, uring"),
            "{model}: {err}"
        );
    }
}

#[test]
fn udp_gro_on_is_refused_by_models_other_than_epoll() {
    for model in ["iterative", "async", "uring"] {
        let err = fails_to_start(&[
            "--model",
            model,
            "--udp-gro",
            "on",
            "--listen",
            "udp://127.0.0.1:0",
        ]);
        assert!(
            err.contains(&format!(
                "--udp-gro on is served by the epoll model only, not by {model}"
            )) && err.lines().count() == 1,
            "{model}: {err}"
        );
    }
}

#[test]
fn a_udp_port_in_use_and_malformed_urls_are_refused() {
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let spec = format!("udp://{}", taken.local_addr().unwrap());
    let err = fails_to_start(&["--model", "epoll", "--listen", &spec]);
    assert!(
        err.contains(&format!("cannot listen on {spec}")) && err.lines().count() == 1,
        "{err}"
    );
    for bad in [
        "udp://nonsense",
        "udp://127.0.0.1",
        "udp://127.0.0.1:70000",
        "udp://",
    ] {
        let err = fails_to_start(&["--listen", bad]);
        assert!(err.contains("invalid"), "{bad}: {err}");
    }
}

/// Runs `multiecho client ARGS` with `input` on stdin.
fn run_client(args: &[&str], input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(BIN)
        .arg("client")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn multiecho client");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_udp_client_prints_each_lines_echo() {
    let (server, addr) = start("epoll", &[]).expect("epoll runs anywhere");
    let target = format!("udp://{addr}");
    let out = run_client(&[&target], b"first\n\nthird without newline");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"first\n\nthird without newline");
    assert!(server.stop().success());
}

#[test]
fn the_udp_client_reports_lost_datagrams_and_fails() {
    // A peer that takes datagrams and never answers: every one is lost.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = format!("udp://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let out = run_client(&["--timeout", "200ms", &target], b"a\nb\n");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no echo of line 1") && stderr.contains("no echo of line 2"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 of 2 datagrams were not echoed"),
        "{stderr}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "waited out each timeout"
    );
    let mut buf = [0u8; 8];
    assert_eq!(
        silent.recv(&mut buf).unwrap(),
        2,
        "the lines went out as datagrams"
    );
}

/// Sends `datagrams` (all but the last of one size) to `to` as one segment train: one
/// `sendmsg` with a `UDP_SEGMENT` control message, which the kernel sends as these datagrams.
fn send_train(socket: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let segment = u16::try_from(datagrams[0].len()).unwrap();
    let train = datagrams.concat();
    let sent = sendmsg(
        socket.as_raw_fd(),
        &[std::io::IoSlice::new(&train)],
        &[ControlMessage::UdpGsoSegments(&segment)],
        MsgFlags::empty(),
        Some(&SockaddrStorage::from(to)),
    )
    .expect("send a UDP_SEGMENT train");
    assert_eq!(sent, train.len());
}

/// The models and flags the segment-train tests run: epoll taking trains whole, and every
/// model receiving them as the kernel splits them.
const TRAIN_SERVERS: [(&str, &[&str]); 7] = [
    ("epoll", &["--udp-gro", "on"]),
    ("epoll", &[]),
    ("iterative", &[]),
    ("prefork", &[]),
    ("pool", &[]),
    ("async", &[]),
    ("uring", &[]),
];

/// One train from a plain socket (not bench): every datagram comes back on its own, with its
/// own size and bytes, and nothing more: never merged into one, never cut. Trains of 64
/// one-byte datagrams, of 8 × 1,000 bytes with a shorter last one, and of 8 × 8,188 (the
/// largest of which 8 fit one send).
#[test]
fn a_segment_train_comes_back_datagram_by_datagram() {
    for (model, extra) in TRAIN_SERVERS {
        let mut args = vec!["--udp-rate", "0"];
        args.extend_from_slice(extra);
        let Some((server, addr)) = start(model, &args) else {
            continue;
        };
        let what = format!("{model} {extra:?}");
        let socket = client_socket();
        room_for_a_burst(&socket);
        let mut buf = vec![0u8; 70_000];
        for (seed, (segment, count, last)) in [(1, 64, 1), (1000, 8, 500), (8188, 8, 8188)]
            .into_iter()
            .enumerate()
        {
            let mut sent: Vec<Vec<u8>> = (0..count)
                .map(|i| {
                    let len = if i == count - 1 { last } else { segment };
                    let mut datagram = multiecho::payload::bytes((seed * 100 + i) as u64, len);
                    datagram[0] = i as u8; // distinct, even one byte long
                    datagram
                })
                .collect();
            send_train(&socket, addr, &sent);
            let mut got = Vec::new();
            while got.len() < count {
                let n =
                    recv_within(&socket, Duration::from_secs(3), &mut buf).unwrap_or_else(|| {
                        panic!("{what}: {} of {count} echoes of the train", got.len())
                    });
                got.push(buf[..n].to_vec());
            }
            // Two workers may answer a train's datagrams in either order: those without GRO
            // always get them one by one, and even with it the kernel sometimes delivers a
            // 64 KiB train split under load (seen 1 run in 2 beside the other tests). That a
            // train arrives whole and goes back in order is the batch's unit test.
            got.sort();
            sent.sort();
            assert!(
                got == sent,
                "{what}: a train of {count} × {segment} B came back as {:?} (lengths, first \
                 bytes; sent in order {:?})",
                got.iter().map(|d| (d.len(), d[0])).collect::<Vec<_>>(),
                sent.iter().map(|d| d[0]).collect::<Vec<_>>()
            );
            assert_eq!(
                recv_within(&socket, Duration::from_millis(200), &mut buf),
                None,
                "{what}: more echoes than datagrams"
            );
        }
        assert!(server.stop().success(), "{what}");
    }
}

/// `--udp-rate` counts every datagram of a train: four trains of 8 from one source against a
/// budget of 4 per second get about 4 echoes, not 4 trains' worth.
#[test]
fn the_rate_limit_counts_every_datagram_of_a_train() {
    for (model, extra) in [TRAIN_SERVERS[0], TRAIN_SERVERS[1]] {
        let mut args = vec!["--udp-rate", "4"];
        args.extend_from_slice(extra);
        let Some((server, addr)) = start(model, &args) else {
            continue;
        };
        let socket = client_socket();
        let started = Instant::now();
        for train in 0..4u8 {
            let datagrams: Vec<Vec<u8>> = (0..8u8).map(|i| vec![train, i, 0, 0]).collect();
            send_train(&socket, addr, &datagrams);
        }
        let mut buf = [0u8; 64];
        let mut got = 0u32;
        let mut last = Instant::now();
        while recv_within(&socket, Duration::from_millis(500), &mut buf).is_some() {
            got += 1;
            last = Instant::now();
        }
        // The burst of 4, plus what the bucket refilled (4 per second) until the last echo.
        let refilled = (4.0 * (last - started).as_secs_f64()).ceil() as u32;
        assert!(
            (4..=4 + refilled).contains(&got),
            "{model} {extra:?}: {got} echoes of 32 datagrams at --udp-rate 4"
        );
        assert!(server.stop().success());
    }
}
