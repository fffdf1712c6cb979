//! `multiecho bench`: it reports plausible figures against a correct server, catches a
//! server that corrupts bytes (naming the connection and offset), does not cry wolf when the
//! echo arrives in tiny pieces, holds an open-loop rate, and fails clearly on a closed port.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::thread;

use serde_json::Value;

fn bench(addr: SocketAddr, extra: &[&str]) -> Output {
    Command::new(common::BIN)
        .arg("bench")
        .arg(addr.to_string())
        .args(extra)
        .output()
        .expect("run multiecho bench")
}

fn json(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "bench did not print one JSON object ({e}); stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// A test server: one thread per connection, each echoing through `echo`.
fn test_server(echo: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            stream.set_nodelay(true).unwrap();
            thread::spawn(move || echo(stream));
        }
    });
    addr
}

/// Echoes faithfully except that byte 5000 of every 7919 bytes of each stream is flipped.
fn flipping_echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    let mut offset = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for byte in &mut buf[..n] {
            if offset % 7919 == 5000 {
                *byte ^= 0x40;
            }
            offset += 1;
        }
        if stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Echoes faithfully in pieces of 1 to 7 bytes, each sent on its own.
fn dribbling_echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    let mut piece = 0usize;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            piece = piece % 7 + 1;
            let (now, later) = rest.split_at(piece.min(rest.len()));
            if stream.write_all(now).and_then(|()| stream.flush()).is_err() {
                return;
            }
            rest = later;
        }
    }
}

#[test]
fn reports_plausible_figures_against_a_correct_server() {
    let server = common::ServerBuilder::new("thread").start();
    let output = bench(
        server.addr,
        &[
            "--conns",
            "8",
            "--size",
            "1k",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--json",
        ],
    );
    assert!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = json(&output);
    for key in [
        "requests",
        "duration_secs",
        "requests_per_sec",
        "bytes_per_sec",
        "latency_us",
        "connections",
        "errors",
        "mismatches",
    ] {
        assert!(report.get(key).is_some(), "missing key {key} in {report}");
    }
    let requests = report["requests"].as_u64().unwrap();
    assert!(requests > 0, "{report}");
    assert_eq!(report["connections"], 8);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["mismatches"], 0);
    let duration = report["duration_secs"].as_f64().unwrap();
    assert!((0.9..1.5).contains(&duration), "{report}");
    let rps = report["requests_per_sec"].as_f64().unwrap();
    assert!((rps - requests as f64 / duration).abs() < 1.0, "{report}");
    let bps = report["bytes_per_sec"].as_f64().unwrap();
    assert!((bps - rps * 1024.0).abs() < 1024.0, "{report}");
    let latency = &report["latency_us"];
    let p = |key: &str| {
        latency[key]
            .as_f64()
            .unwrap_or_else(|| panic!("latency_us.{key} in {report}"))
    };
    assert!(p("p50") > 0.0);
    assert!(p("p50") <= p("p90") && p("p90") <= p("p99"));
    assert!(p("p99") <= p("p999") && p("p999") <= p("max"));
    server.stop();
}

#[test]
fn counts_a_fixed_number_of_requests() {
    let server = common::ServerBuilder::new("thread").start();
    let output = bench(
        server.addr,
        &[
            "--conns",
            "3",
            "--requests",
            "500",
            "--pipeline",
            "4",
            "--json",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = json(&output);
    assert_eq!(report["requests"], 500, "{report}");
    assert_eq!(report["mismatches"], 0);
    server.stop();
}

#[test]
fn catches_a_server_that_flips_bytes() {
    let addr = test_server(flipping_echo);
    let output = bench(addr, &["--conns", "4", "--duration", "1", "--json"]);
    assert!(
        !output.status.success(),
        "a corrupting server must fail the run"
    );
    let report = json(&output);
    assert!(report["mismatches"].as_u64().unwrap() > 0, "{report}");
    // The first flip is byte 5000 of some connection's stream: message 9, offset 392.
    let failure = &report["failures"][0];
    assert_eq!(failure["kind"], "mismatch", "{report}");
    assert_eq!(failure["offset"], 5000, "{report}");
    assert_eq!(failure["message"], 9, "{report}");
    assert_eq!(failure["message_offset"], 392, "{report}");
    assert!(failure["connection"].as_u64().unwrap() < 4, "{report}");
    let first = report["first_error"].as_str().unwrap();
    assert!(
        first.contains("connection") && first.contains("offset 5000"),
        "{first}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("mismatch"), "{stderr}");
}

#[test]
fn tiny_pieces_are_not_mismatches() {
    let addr = test_server(dribbling_echo);
    let output = bench(
        addr,
        &[
            "--conns",
            "4",
            "--size",
            "333",
            "--pipeline",
            "3",
            "--duration",
            "1",
            "--json",
        ],
    );
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report = json(&output);
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["requests"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn open_loop_holds_the_rate() {
    let server = common::ServerBuilder::new("thread").start();
    let output = bench(
        server.addr,
        &[
            "--conns",
            "10",
            "--rate",
            "2000",
            "--duration",
            "2",
            "--json",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = json(&output);
    let rps = report["requests_per_sec"].as_f64().unwrap();
    assert!(
        (1900.0..=2100.0).contains(&rps),
        "asked for 2000/s: {report}"
    );
    server.stop();
}

#[test]
fn closed_port_is_one_clear_error() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let output = bench(addr, &["--duration", "1"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot connect") && stderr.contains(&addr.to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_options_are_rejected() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for args in [&["--conns", "0"][..], &["--size", "0"], &["--rate", "-5"]] {
        let output = bench(addr, args);
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
    }
}

#[test]
fn warm_up_round_trips_are_not_counted() {
    let server = common::ServerBuilder::new("thread").start();
    let output = bench(
        server.addr,
        &[
            "--conns",
            "2",
            "--requests",
            "300",
            "--warmup",
            "0.3",
            "--json",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = json(&output);
    assert_eq!(report["requests"], 300, "{report}");
    assert_eq!(report["connections"], 2, "{report}");
    server.stop();
}

/// Pairs up the connections that send data and echoes each one's bytes to the other: the
/// crossed streams of a server that lets two threads serve one socket.
fn crossing_server() -> SocketAddr {
    use std::sync::{Arc, Mutex};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    type Waiting = Arc<Mutex<Option<(TcpStream, Vec<u8>)>>>;
    let waiting: Waiting = Arc::default();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let waiting = Arc::clone(&waiting);
            thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                // bench's probe connection sends nothing and is not paired.
                let n = match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let partner = {
                    let mut waiting = waiting.lock().unwrap();
                    match waiting.take() {
                        Some(partner) => partner,
                        None => {
                            *waiting = Some((stream, buf[..n].to_vec()));
                            return;
                        }
                    }
                };
                let (mut other, first) = partner;
                let _ = other.write_all(&buf[..n]);
                let _ = stream.write_all(&first);
                let mut other_reader = other.try_clone().unwrap();
                let mut this_writer = stream.try_clone().unwrap();
                thread::spawn(move || std::io::copy(&mut other_reader, &mut this_writer));
                let _ = std::io::copy(&mut stream, &mut other);
            });
        }
    });
    addr
}

#[test]
fn crossed_streams_name_where_the_bytes_came_from() {
    let addr = crossing_server();
    let output = bench(addr, &["--conns", "2", "--duration", "0.5", "--json"]);
    assert!(!output.status.success());
    let report = json(&output);
    assert_eq!(report["mismatches"], 2, "{report}");
    for failure in report["failures"].as_array().unwrap() {
        let me = failure["connection"].as_u64().unwrap();
        let detail = failure["detail"].as_str().unwrap();
        assert_eq!(failure["offset"], 0, "{report}");
        assert!(
            detail.contains(&format!("message 0 of connection {}", 1 - me)),
            "{detail}"
        );
    }
}
