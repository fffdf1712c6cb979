//! `multiecho bench udp://` against test servers that misbehave as networks do: one that
//! drops, duplicates and reorders datagrams (reported, exit 0), and one that flips a byte
//! (a mismatch naming the flow and sequence number, non-zero exit).

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use multiecho::payload::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_multiecho");

/// A UDP echo server in a thread, running `behave` on each datagram; stops on drop.
struct TestServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(mut behave: impl FnMut(&UdpSocket, &[u8], SocketAddr) + Send + 'static) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stopping.load(Ordering::Relaxed) {
                match socket.recv_from(&mut buf) {
                    Ok((n, from)) => behave(&socket, &buf[..n], from),
                    // A quiet moment: `behave` sees an empty datagram from port 0 (flush).
                    Err(_) => behave(&socket, &[], SocketAddr::from(([0, 0, 0, 0], 0))),
                }
            }
        });
        TestServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn bench(addr: SocketAddr, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("bench")
        .arg(format!("udp://{addr}"))
        .args(extra)
        .output()
        .expect("run multiecho bench")
}

/// The JSON report of a bench run that must have succeeded.
fn json_report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).expect("one JSON object")
}

#[test]
fn loss_duplicates_and_reordering_are_measured_not_failures() {
    let mut rng = Rng::new(42);
    let mut held: Option<(Vec<u8>, SocketAddr)> = None;
    let server = TestServer::start(move |socket, data, from| {
        if from.port() == 0 {
            if let Some((late, to)) = held.take() {
                let _ = socket.send_to(&late, to);
            }
            return;
        }
        let roll = rng.range(0, 999);
        if roll < 50 {
            return; // dropped: 5%
        }
        if roll < 60 {
            let _ = socket.send_to(data, from); // duplicated: 1%
        }
        if roll < 90 && held.is_none() {
            held = Some((data.to_vec(), from)); // reordered: sent after the next one
            return;
        }
        let _ = socket.send_to(data, from);
        if let Some((late, to)) = held.take() {
            let _ = socket.send_to(&late, to);
        }
    });
    let out = bench(
        server.addr,
        &[
            "--conns",
            "4",
            "--pipeline",
            "4",
            "--requests",
            "4000",
            "--json",
        ],
    );
    let report = json_report(&out);
    let sent = report["sent"].as_f64().unwrap();
    let lost = report["lost"].as_f64().unwrap();
    assert_eq!(sent, 4000.0, "{report}");
    let loss = 100.0 * lost / sent;
    assert!((3.0..=8.0).contains(&loss), "loss {loss:.2}%: {report}");
    assert!(report["duplicates"].as_u64().unwrap() > 0, "{report}");
    assert!(report["reordered"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["mismatches"].as_u64(), Some(0), "{report}");

    // The same loss with a lower bar fails.
    let out = bench(
        server.addr,
        &["--conns", "2", "--requests", "1000", "--max-loss", "1"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("more than --max-loss 1%"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_flipped_byte_is_a_mismatch_naming_flow_and_sequence() {
    let mut count = 0u64;
    let server = TestServer::start(move |socket, data, from| {
        if from.port() == 0 {
            return;
        }
        count += 1;
        let mut echo = data.to_vec();
        if count == 100 {
            let last = echo.len() - 1;
            echo[last] ^= 0x20;
        }
        let _ = socket.send_to(&echo, from);
    });
    let out = bench(server.addr, &["--conns", "1", "--requests", "300"]);
    assert!(!out.status.success(), "a corrupted echo fails the run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("flow 0 sequence 99: byte 511"),
        "names the flow, sequence number and byte: {stderr}"
    );
}

#[test]
fn a_truncated_echo_is_a_mismatch() {
    let server = TestServer::start(move |socket, data, from| {
        if from.port() != 0 {
            let _ = socket.send_to(&data[..data.len() / 2], from);
        }
    });
    let out = bench(server.addr, &["--conns", "1", "--requests", "10"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("truncated"), "{stderr}");
}

#[test]
fn warm_up_datagrams_are_echoed_and_checked_but_not_counted() {
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&seen);
    let server = TestServer::start(move |socket, data, from| {
        if from.port() != 0 {
            counter.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(data, from);
        }
    });
    let out = bench(
        server.addr,
        &[
            "--conns",
            "1",
            "--warmup",
            "0.4",
            "--duration",
            "0.4",
            "--json",
        ],
    );
    let report = json_report(&out);
    let secs = report["duration_secs"].as_f64().unwrap();
    assert!(
        (0.35..0.7).contains(&secs),
        "the measured window only: {report}"
    );
    let sent = report["sent"].as_u64().unwrap();
    let echoed = report["requests"].as_u64().unwrap();
    assert!(echoed > 0 && echoed <= sent, "{report}");
    assert_eq!(report["lost"].as_u64(), Some(0), "{report}");
    drop(server);
    let seen = seen.load(Ordering::Relaxed);
    assert!(
        // Loaded machines make the two windows' rates differ, so no ratio is asserted.
        seen > sent,
        "the server saw the warm-up too: {seen} datagrams, {sent} counted"
    );
}

/// `--udp-gso 8` in the open loop against a server that receives one datagram at a time
/// (the kernel splits each train): every datagram is sent, echoed and checked on its own.
#[test]
fn trains_on_a_schedule_are_checked_datagram_by_datagram() {
    let server = TestServer::start(move |socket, data, from| {
        if from.port() != 0 {
            let _ = socket.send_to(data, from);
        }
    });
    let out = bench(
        server.addr,
        &[
            "--conns",
            "2",
            "--rate",
            "4000",
            "--udp-gso",
            "8",
            "--size",
            "100",
            "--requests",
            "2000",
            "--udp-timeout",
            "5s",
            "--json",
        ],
    );
    let report = json_report(&out);
    assert_eq!(report["sent"].as_u64(), Some(2000), "{report}");
    assert_eq!(report["requests"].as_u64(), Some(2000), "{report}");
    assert_eq!(report["mismatches"].as_u64(), Some(0), "{report}");
    assert_eq!(report["config"]["udp_gso"].as_u64(), Some(8), "{report}");
}

/// A train that cannot be sent is refused before any datagram goes out, in one line.
#[test]
fn udp_gso_values_that_cannot_work_fail_in_one_line() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    for (args, expected) in [
        (&["--udp-gso", "0"][..], "--udp-gso must be 1 to 64"),
        (&["--udp-gso", "65"], "--udp-gso must be 1 to 64"),
        (
            &["--udp-gso", "2", "--size", "32754"],
            "does not fit one UDP send",
        ),
        (
            &["--udp-gso", "64", "--size", "1024"],
            "at most 63 datagrams of this size",
        ),
    ] {
        let out = bench(addr, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
    let out = Command::new(BIN)
        .args(["bench", &addr.to_string(), "--udp-gso", "8"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--udp-gso is for udp:// targets"),
        "{stderr}"
    );
    silent.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    assert!(silent.recv(&mut buf).is_err(), "nothing was sent");
}
