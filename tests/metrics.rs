//! `serve --metrics`: scraped over HTTP, validated by `promtool check metrics` (Debian's
//! prometheus package), reconciled exactly with what `bench` verified for every model, and
//! `/healthz` turning from 200 to 503 when shutdown starts.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, BIN, PATIENCE};

/// Starts `model` with `--metrics 127.0.0.1:0` and returns it with the metrics address it
/// logged; `None` where the model cannot run here (uring without io_uring, said loudly).
fn start(model: &str, extra: &[&str]) -> Option<(Server, SocketAddr)> {
    let mut args = vec!["--metrics", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let server = common::start_or_skip(model, &args)?;
    server.wait_for_log("the metrics address", |log| {
        log.contains("serving metrics on http://")
    });
    let log = server.log();
    let addr = log
        .split("serving metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"));
    Some((server, addr))
}

/// One HTTP/1.0 GET (the server closes after answering): the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

/// Sample values by metric name, summed over their label sets.
fn totals(text: &str) -> HashMap<String, f64> {
    let mut totals = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let name = series.split('{').next().unwrap().to_string();
        *totals.entry(name).or_insert(0.0) += value.parse::<f64>().expect("a number");
    }
    totals
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
    let output = Command::new(BIN)
        .arg("bench")
        .arg(addr.to_string())
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
