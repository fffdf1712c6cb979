//! `serve --metrics`: scraped over HTTP, validated by `promtool check metrics` (Debian's
//! prometheus package), reconciled exactly with what `bench` verified for every model, and
//! `/healthz` turning from 200 to 503 when shutdown starts.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::metrics::{get, scrape_until, totals};
use common::{Server, ALL_MODELS, BIN, PATIENCE};

/// Starts `model` with `--metrics 127.0.0.1:0` and returns it with the metrics address it
/// logged; `None` where the model cannot run here (uring without io_uring, said loudly).
fn start(model: &str, extra: &[&str]) -> Option<(Server, SocketAddr)> {
    let mut args = vec!["--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let server = common::start_or_skip(model, &args)?;
    // `--ready-fd`'s last line names the metrics endpoint, bound and accepting.
    let addr = server.listener("metrics");
    Some((server, addr))
}

fn promtool_check(text: &str) {
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            common::skip_unless_ci(&format!("promtool is not installed ({e})"));
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\non:\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `multiecho bench --json` and returns its report.
fn bench(addr: SocketAddr, args: &[&str]) -> serde_json::Value {
    common::bench_json(&addr.to_string(), args)
}

/// Connections `bench` opens besides those its report counts.
const BENCH_PROBES: u64 = 1;

/// After a bench run, the server's counters equal what the bench verified: every connection it
/// opened accepted and closed by the client, every byte it sent received and sent back.
fn reconciles_with_bench(model: &str) {
    let Some((server, metrics)) = start(model, &["--workers", "2"]) else {
        return;
    };
    let size = 700u64;
    // The iterative model serves one connection at a time: a second would wait for the first.
    let conns = if model == "iterative" { "1" } else { "3" };
    let report = bench(
        server.addr,
        &["--conns", conns, "--requests", "150", "--size", "700"],
    );
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["mismatches"], 0, "{report}");
    let requests = report["requests"].as_u64().unwrap();
    // Plus the probe: bench first opens (and closes) one connection that sends nothing, so an
    // unreachable server is one clear error (src/bench/mod.rs); its report does not count it.
    let connections = report["connections"].as_u64().unwrap() + BENCH_PROBES;
    assert_eq!(requests, 150, "{report}");

    // The bench has closed its connections; the server counts each close when it notices.
    let deadline = Instant::now() + PATIENCE;
    let text = loop {
        let (status, text) = get(metrics, "/metrics");
        assert_eq!(status, 200, "{text}");
        let t = totals(&text);
        if t["multiecho_connections_closed_total"] >= connections as f64 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "{model}: the closes never showed:\n{text}\nserver log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    promtool_check(&text);
    let t = totals(&text);
    let bytes = (requests * size) as f64;
    let what = format!("{model}: {report}\n{text}");
    assert_eq!(
        t["multiecho_connections_accepted_total"], connections as f64,
        "{what}"
    );
    assert_eq!(
        t["multiecho_connections_closed_total"], connections as f64,
        "{what}"
    );
    assert!(
        text.contains(&format!(
            "multiecho_connections_closed_total{{end=\"client_closed\"}} {connections}"
        )),
        "{what}"
    );
    assert!(
        text.contains(&format!(
            "multiecho_connections_accepted_total{{listener=\"tcp://{}\"}} {connections}",
            server.addr
        )),
        "{what}"
    );
    assert_eq!(t["multiecho_connections_active"], 0.0, "{what}");
    assert_eq!(t["multiecho_bytes_received_total"], bytes, "{what}");
    assert_eq!(t["multiecho_bytes_sent_total"], bytes, "{what}");
    assert_eq!(t["multiecho_connections_refused_total"], 0.0, "{what}");
    assert_eq!(t["multiecho_accept_errors_total"], 0.0, "{what}");
    assert!(
        text.contains(&format!(
            "multiecho_build_info{{version=\"{}\",model=\"{model}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{what}"
    );
    let status = server.stop();
    assert!(status.success(), "{model} exited with {status}");
}

#[test]
fn iterative_reconciles_with_bench() {
    reconciles_with_bench("iterative");
}

#[test]
fn process_reconciles_with_bench() {
    reconciles_with_bench("process");
}

#[test]
fn prefork_reconciles_with_bench() {
    reconciles_with_bench("prefork");
}

#[test]
fn thread_reconciles_with_bench() {
    reconciles_with_bench("thread");
}

#[test]
fn pool_reconciles_with_bench() {
    reconciles_with_bench("pool");
}

#[test]
fn epoll_reconciles_with_bench() {
    reconciles_with_bench("epoll");
}

#[test]
fn async_reconciles_with_bench() {
    reconciles_with_bench("async");
}

#[test]
fn uring_reconciles_with_bench() {
    reconciles_with_bench("uring");
}

/// Connections are counted under the listener they arrived on, in the models that know it
/// from their accept loop and in uring, which finds it by the connection's local address.
#[test]
fn connections_are_counted_per_listener() {
    for model in ["thread", "epoll", "async", "uring"] {
        let Some((server, metrics)) = start(model, &["--listen", "127.0.0.1:0"]) else {
            continue;
        };
        server.wait_for_log("the second listener", |log| {
            log.matches("listening on ").count() == 2
        });
        let addrs: Vec<SocketAddr> = server
            .log()
            .split("listening on ")
            .skip(1)
            .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(addrs[0], server.addr);
        for (connections, addr) in [(1, addrs[0]), (2, addrs[1])] {
            for _ in 0..connections {
                let echoed = common::round_trip(common::connect(addr), b"which listener?\n");
                assert_eq!(echoed, b"which listener?\n");
            }
        }
        let deadline = Instant::now() + PATIENCE;
        let text = loop {
            let (_, text) = get(metrics, "/metrics");
            if totals(&text)["multiecho_connections_closed_total"] == 3.0 {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "{model}: closes missing:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        for (connections, addr) in [(1, addrs[0]), (2, addrs[1])] {
            let line = format!(
                "multiecho_connections_accepted_total{{listener=\"tcp://{addr}\"}} {connections}"
            );
            assert!(text.contains(&line), "{model}: no {line:?} in\n{text}");
        }
        server.stop();
    }
}

#[test]
fn refusals_are_counted_by_reason() {
    let Some((server, metrics)) = start("epoll", &["--deny", "127.0.0.1"]) else {
        return;
    };
    let mut stream = TcpStream::connect(server.addr).unwrap();
    assert!(common::refused_without_echo(&mut stream));
    let (_, text) = get(metrics, "/metrics");
    assert!(
        text.contains("multiecho_connections_refused_total{reason=\"denied\"} 1"),
        "{text}"
    );
    assert_eq!(totals(&text)["multiecho_connections_accepted_total"], 0.0);
}

#[test]
fn healthz_is_200_while_serving_and_503_once_shutdown_starts() {
    for model in ["process", "prefork", "epoll"] {
        let Some((server, metrics)) = start(model, &["--shutdown-timeout", "30s"]) else {
            return;
        };
        assert_eq!(get(metrics, "/healthz"), (200, "ok\n".into()), "{model}");
        assert_eq!(get(metrics, "/nowhere").0, 404);
        // A live connection keeps the server draining (and the endpoint up) after SIGTERM.
        let mut live = common::connect(server.addr);
        live.write_all(b"hold\n").unwrap();
        common::expect_echo(&mut live, b"hold\n", "before shutdown");
        server.terminate();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (status, body) = get(metrics, "/healthz");
            if status == 503 {
                assert_eq!(body, "shutting down\n");
                break;
            }
            assert_eq!(status, 200, "{model}: {body}");
            assert!(
                Instant::now() < deadline,
                "{model}: /healthz never said 503"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (status, text) = get(metrics, "/metrics");
        assert_eq!(status, 200);
        assert_eq!(totals(&text)["multiecho_connections_active"], 1.0, "{text}");
        drop(live);
        let status = server.stop();
        assert!(status.success(), "{model} exited with {status}");
        assert!(
            TcpStream::connect(metrics).is_err(),
            "{model}: the metrics endpoint outlived the server"
        );
    }
}

#[test]
fn metrics_on_a_port_in_use_is_one_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for model in ["process", "epoll"] {
        let output = Command::new(BIN)
            .args(["serve", "--model", model, "--listen", "127.0.0.1:0"])
            .args(["--metrics", &addr])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{model}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{model}: {stderr}");
        assert!(
            errors[0].contains(&format!("cannot serve metrics on {addr}"))
                && errors[0].contains("in use"),
            "{model}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Bytes are counted as they flow: scraped while a connection is still open, the byte
/// counters equal what has gone through it so far (never more), before and after a second
/// round of data; then the close is counted.
fn counts_bytes_live(model: &str) {
    let Some((server, metrics)) = start(model, &["--workers", "2"]) else {
        return;
    };
    let mut stream = common::connect(server.addr);
    let mut so_far = 0f64;
    for (round, size) in [(1u64, 10_000usize), (2, 70_000)] {
        let data = multiecho::payload::bytes(round, size);
        stream.write_all(&data).unwrap();
        common::expect_echo(&mut stream, &data, &format!("{model}: round {round}"));
        so_far += size as f64;
        let text = scrape_until(metrics, &format!("{model}: {so_far} bytes"), |t| {
            assert!(
                t["multiecho_bytes_received_total"] <= so_far
                    && t["multiecho_bytes_sent_total"] <= so_far,
                "{model}: counted more than was sent: {t:?}"
            );
            t["multiecho_bytes_received_total"] == so_far
                && t["multiecho_bytes_sent_total"] == so_far
        });
        let t = totals(&text);
        assert_eq!(t["multiecho_connections_active"], 1.0, "{model}: {text}");
        assert_eq!(
            t["multiecho_connections_closed_total"], 0.0,
            "{model}: {text}"
        );
    }
    drop(stream);
    let text = scrape_until(metrics, &format!("{model}: the close"), |t| {
        t["multiecho_connections_closed_total"] == 1.0
    });
    // The close adds no bytes: they were all counted already.
    assert_eq!(
        totals(&text)["multiecho_bytes_sent_total"],
        so_far,
        "{text}"
    );
    let status = server.stop();
    assert!(status.success(), "{model} exited with {status}");
}

#[test]
fn bytes_are_counted_during_a_connection_in_every_model() {
    for model in ALL_MODELS {
        counts_bytes_live(model);
    }
}

/// Starts `model` with a `udp://` listener too; returns it, its metrics address and the UDP
/// address it announced.
fn start_udp(model: &str, extra: &[&str]) -> Option<(Server, SocketAddr, SocketAddr)> {
    let mut args = vec!["--listen", "udp://127.0.0.1:0", "--workers", "2"];
    args.extend_from_slice(extra);
    let (server, metrics) = start(model, &args)?;
    let udp = server.listener("udp");
    Some((server, metrics, udp))
}

/// After a `bench udp://` run the datagram counters equal what the bench verified: every
/// datagram it sent received and echoed, with its bytes; nothing refused or lost; and the TCP
/// counters untouched.
fn udp_reconciles_with_bench(model: &str) {
    udp_reconciles_with(model, &[], 300, &["--pipeline", "2"]);
}

/// [`udp_reconciles_with_bench`] with `server` flags for the server and `bench` flags (and
/// datagrams of `size` bytes) for the bench.
fn udp_reconciles_with(model: &str, server: &[&str], size: u64, bench: &[&str]) {
    let mut args = vec!["--udp-rate", "0"];
    args.extend_from_slice(server);
    let Some((server, metrics, udp)) = start_udp(model, &args) else {
        return;
    };
    let output = Command::new(BIN)
        .args(["bench", &format!("udp://{udp}")])
        .args(["--conns", "2", "--requests", "600"])
        .args(bench)
        .args(["--size", &size.to_string()])
        // A datagram not back within 10 s is really lost, not late on a loaded machine.
        .args(["--udp-timeout", "10s", "--json", "-q"])
        .output()
        .expect("run bench");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    assert!(output.status.success(), "{model}: {report}");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    let sent = report["sent"].as_u64().unwrap();
    assert_eq!(sent, 600, "{report}");
    assert_eq!(report["requests"].as_u64(), Some(sent), "{report}");
    let sent = sent as f64;
    let text = scrape_until(metrics, &format!("{model}: {sent} datagrams echoed"), |t| {
        t["multiecho_datagrams_echoed_total"] >= sent
    });
    promtool_check(&text);
    let t = totals(&text);
    let what = format!("{model}: {report}\n{text}");
    let bytes = sent * size as f64;
    assert_eq!(t["multiecho_datagrams_received_total"], sent, "{what}");
    assert_eq!(t["multiecho_datagrams_echoed_total"], sent, "{what}");
    assert_eq!(
        t["multiecho_datagram_bytes_received_total"], bytes,
        "{what}"
    );
    assert_eq!(t["multiecho_datagram_bytes_sent_total"], bytes, "{what}");
    assert_eq!(t["multiecho_datagrams_refused_total"], 0.0, "{what}");
    assert_eq!(t["multiecho_datagram_send_errors_total"], 0.0, "{what}");
    assert_eq!(t["multiecho_bytes_received_total"], 0.0, "{what}");
    assert_eq!(t["multiecho_connections_refused_total"], 0.0, "{what}");
    let status = server.stop();
    assert!(status.success(), "{model} exited with {status}");
}

#[test]
fn iterative_udp_reconciles_with_bench() {
    udp_reconciles_with_bench("iterative");
}

#[test]
fn prefork_udp_reconciles_with_bench() {
    udp_reconciles_with_bench("prefork");
}

#[test]
fn pool_udp_reconciles_with_bench() {
    udp_reconciles_with_bench("pool");
}

#[test]
fn epoll_udp_reconciles_with_bench() {
    udp_reconciles_with_bench("epoll");
}

#[test]
fn async_udp_reconciles_with_bench() {
    udp_reconciles_with_bench("async");
}

#[test]
fn uring_udp_reconciles_with_bench() {
    udp_reconciles_with_bench("uring");
}

/// Segment trains (`bench --udp-gso 8`): the counters count every datagram of every train,
/// with its exact bytes, whether the server takes the trains whole (epoll with `--udp-gro
/// on`) or, like every other model, one datagram at a time; sizes from the smallest bench
/// datagram to the largest of which 8 fit one send.
#[test]
fn udp_trains_reconcile_with_bench_in_every_model() {
    let trains = ["--udp-gso", "8", "--pipeline", "16"];
    for size in [16, 1472] {
        udp_reconciles_with("epoll", &["--udp-gro", "on"], size, &trains);
    }
    // One train in flight: 16 echoes of 8 KiB overflow the bench socket's default receive
    // buffer (212,992 bytes), with or without trains.
    let one_train = ["--udp-gso", "8", "--pipeline", "8"];
    udp_reconciles_with("epoll", &["--udp-gro", "on"], 8188, &one_train);
    for model in ["iterative", "prefork", "pool", "epoll", "async", "uring"] {
        udp_reconciles_with(model, &[], 1472, &trains);
    }
}

/// Replies `socket` gets until none comes for `quiet`.
fn replies(socket: &std::net::UdpSocket, quiet: Duration) -> u64 {
    socket.set_read_timeout(Some(quiet)).unwrap();
    let mut buf = [0u8; 64];
    let mut count = 0;
    while socket.recv_from(&mut buf).is_ok() {
        count += 1;
    }
    count
}

/// Refused datagrams are counted by reason, apart from connection refusals: `--deny`, the
/// per-source `--udp-rate` and (as root, who may bind port 7) the loop guard; every datagram
/// received is echoed or refused, and the echoes counted are the replies that arrived.
#[test]
fn datagram_refusals_are_counted_by_reason() {
    for model in ["prefork", "epoll", "uring"] {
        let Some((server, metrics, udp)) =
            start_udp(model, &["--udp-rate", "5", "--deny", "127.0.0.2"])
        else {
            continue;
        };
        let denied = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        for _ in 0..3 {
            denied.send_to(b"denied", udp).unwrap();
        }
        let fast = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..40 {
            fast.send_to(b"too fast", udp).unwrap();
        }
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let guarded = if root {
            let echo_port = std::net::UdpSocket::bind("127.0.0.1:7").expect("bind port 7");
            echo_port.send_to(b"from echo", udp).unwrap();
            1.0
        } else {
            common::skip_unless_ci("binding port 7 for the loop guard needs root");
            0.0
        };
        let received = 43.0 + guarded;
        // Every datagram received, and each echoed or refused.
        let text = scrape_until(metrics, &format!("{model}: {received} datagrams"), |t| {
            t["multiecho_datagrams_received_total"] == received
                && t["multiecho_datagrams_echoed_total"] + t["multiecho_datagrams_refused_total"]
                    == received
        });
        let echoed_back = replies(&fast, Duration::from_millis(500));
        let line = |reason: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!(
                        "multiecho_datagrams_refused_total{{reason=\"{reason}\"}} "
                    ))
                })
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{model}: no {reason} refusals in\n{text}"))
        };
        let t = totals(&text);
        let what = format!("{model}:\n{text}");
        assert_eq!(line("denied"), 3.0, "{what}");
        assert_eq!(line("udp-reflection-port"), guarded, "{what}");
        let rate = line("udp-rate");
        // A burst of 5 is always echoed; the bucket refills at 5 per second meanwhile.
        assert!((1.0..=35.0).contains(&rate), "{what}");
        assert_eq!(t["multiecho_datagrams_echoed_total"], 40.0 - rate, "{what}");
        assert_eq!(echoed_back as f64, 40.0 - rate, "{what}");
        assert_eq!(replies(&denied, Duration::from_millis(50)), 0, "{what}");
        assert_eq!(t["multiecho_connections_refused_total"], 0.0, "{what}");
        promtool_check(&text);
        assert!(server.stop().success(), "{model}");
    }
}
