//! The epoll model's splice(2) bulk path (`serve --splice auto`, issue 14): byte-exact echo
//! at the sizes around the 64 KiB switch and on a 64 MiB stream, a slow reader (the pipe keeps
//! what the socket did not take), half-close, a never-reading client beside a served one with
//! the pipe pool run dry, the idle timeout, a tcp+proxy:// listener, `--splice off`, the way
//! back to read/write for small messages, and the byte counters against `bench`.
//!
//! Every test that must exercise the splice path proves it did from the server's debug lines
//! (`RUST_LOG=...epoll=debug`): "splice path: ..." when a connection switches, and "connection
//! spliced peer=... spliced=N waits=W" when a connection that echoed N bytes through a pipe
//! closes (W: times its socket left bytes in the pipe). A test never passes silently on the
//! copy path.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use common::metrics::{scrape_until, totals};
use common::{
    assert_same, connect, cpu_ticks, push_until_blocked, round_trip, Server, ServerBuilder,
    PATIENCE,
};
use multiecho::payload;

/// The server's epoll debug lines on top of the usual info lines.
const DEBUG_EPOLL: &str = "info,multiecho::server::epoll=debug";

/// An epoll server on one worker (so the pipe pool is one pool) logging the splice path.
fn splicing(args: &[&str]) -> ServerBuilder {
    ServerBuilder::new("epoll")
        .args(&["--workers", "1"])
        .args(args)
        .env("RUST_LOG", DEBUG_EPOLL)
}

/// The close line of the connection from `peer`, once the server has logged it.
fn close_line(server: &Server, peer: SocketAddr) -> String {
    let needle = format!("connection closed peer={peer} ");
    server.wait_for_log(&format!("the close line of {peer}"), |log| {
        log.contains(&needle)
    });
    let log = server.log();
    log.lines()
        .find(|line| line.contains(&needle))
        .expect("found above")
        .to_string()
}

/// What the "connection spliced" line says of `peer`: (spliced bytes, pipe waits), or `None`
/// if nothing of that connection went through a pipe. Call after [`close_line`]: the debug
/// line comes just before the close line.
fn spliced(server: &Server, peer: SocketAddr) -> Option<(u64, u64)> {
    let needle = format!("connection spliced peer={peer} ");
    let log = server.log();
    let line = log.lines().find(|line| line.contains(&needle))?;
    Some((field(line, "spliced"), field(line, "waits")))
}

/// The number after `name=` in a log line.
fn field(line: &str, name: &str) -> u64 {
    let start = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        + name.len()
        + 2;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {name}= in {line:?}"))
}

/// Waits until the server has switched the connection from `peer` to the splice path.
fn wait_switched(server: &Server, peer: SocketAddr) {
    server.wait_for_log(&format!("{peer} switching to splice"), |_| {
        switched(server, peer)
    });
}

/// Whether the server switched the connection from `peer` to the splice path.
fn switched(server: &Server, peer: SocketAddr) -> bool {
    server
        .log()
        .lines()
        .any(|line| line.contains("splice path:") && line.contains(&format!("peer={peer}")))
}

#[test]
fn echoes_every_size_byte_exact() {
    let server = splicing(&[]).start();
    for (seed, size) in [1, 65_535, 65_536, 256 * 1024, 1 << 20, 4 << 20]
        .into_iter()
        .enumerate()
    {
        let data = payload::bytes(100 + seed as u64, size);
        let stream = connect(server.addr);
        let peer = stream.local_addr().unwrap();
        let echoed = round_trip(stream, &data);
        assert_same(&echoed, &data, &format!("payload of {size} bytes"));
        let close = close_line(&server, peer);
        assert!(close.contains(&format!("bytes={size} ")), "{close}");
        assert!(close.contains("end=\"client closed\""), "{close}");
        let spliced = spliced(&server, peer);
        if size < 65_536 {
            // A read smaller than the buffer never switches.
            assert!(!switched(&server, peer), "{size} bytes switched to splice");
            assert_eq!(spliced, None, "{size} bytes");
        }
        if size >= 1 << 20 {
            let (bytes, _) = spliced
                .unwrap_or_else(|| panic!("{size} bytes never spliced; log:\n{}", server.log()));
            assert!(bytes > 0 && bytes <= size as u64, "{size}: spliced {bytes}");
        }
    }
    assert!(server.stop().success());
}

#[test]
fn a_64_mib_stream_goes_through_the_pipe() {
    let server = splicing(&[]).start();
    let size = 64 << 20;
    let data = payload::bytes(7, size);
    let stream = connect(server.addr);
    let peer = stream.local_addr().unwrap();
    let echoed = round_trip(stream, &data);
    assert_same(&echoed, &data, "64 MiB stream");
    close_line(&server, peer);
    let (bytes, _) = spliced(&server, peer).expect("the stream spliced");
    // All but the first reads, give or take a few that ran out of pipe.
    assert!(bytes > size as u64 / 2, "spliced only {bytes} of {size}");
    assert!(server.stop().success());
}

#[test]
fn a_slow_reader_gets_every_byte_from_the_pipe() {
    let server = splicing(&[]).start();
    let size = 8 << 20;
    let data = payload::bytes(8, size);
    let stream = connect(server.addr);
    let peer = stream.local_addr().unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sent = data.clone();
    let sender = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    // Small reads with pauses: the server's splices out are partial, the pipe keeps the
    // rest and the client's sends back up.
    let mut reader = stream;
    let mut echoed = Vec::with_capacity(size);
    let mut chunk = vec![0u8; 16 * 1024];
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "the slow read took too long");
        let n = reader.read(&mut chunk).expect("read the echo");
        if n == 0 {
            break;
        }
        echoed.extend_from_slice(&chunk[..n]);
        if echoed.len() % (256 * 1024) < n {
            thread::sleep(Duration::from_millis(5));
        }
    }
    sender.join().unwrap();
    assert_same(&echoed, &data, "slow reader");
    close_line(&server, peer);
    let (bytes, waits) = spliced(&server, peer).expect("the transfer spliced");
    assert!(bytes > 0);
    assert!(
        waits > 0,
        "the socket always took the whole pipe: no partial splice out tested"
    );
    assert!(server.stop().success());
}

#[test]
fn half_close_echoes_everything_then_closes() {
    let server = splicing(&[]).start();
    let data = payload::bytes(9, 3 << 20);
    let mut stream = connect(server.addr);
    let peer = stream.local_addr().unwrap();
    // Everything first (a thread, since the echo fills the buffers), then the FIN.
    let mut writer = stream.try_clone().unwrap();
    let sent = data.clone();
    let sender = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).expect("EOF after the echo");
    sender.join().unwrap();
    assert_same(&echoed, &data, "half-closed client");
    let close = close_line(&server, peer);
    assert!(close.contains("end=\"client closed\""), "{close}");
    assert!(spliced(&server, peer).is_some(), "never spliced");
    assert!(server.stop().success());
}

#[test]
fn a_never_reading_client_holds_its_pipe_and_another_is_still_served() {
    // One pipe, which the client that never reads keeps (full of its echo): the next bulk
    // client finds the pool dry and is served by read/write.
    let server = splicing(&[]).env("MULTIECHO_SPLICE_PIPES", "1").start();
    let stalled = connect(server.addr);
    let stalled_peer = stalled.local_addr().unwrap();
    push_until_blocked(&stalled);
    wait_switched(&server, stalled_peer);

    // It does not make the server spin.
    let before = cpu_ticks(server.pid());
    thread::sleep(Duration::from_millis(500));
    let spent = cpu_ticks(server.pid()) - before;
    assert!(
        spent <= 10,
        "the server used {spent} ticks in 0.5 s beside a stalled client"
    );

    let data = payload::bytes(10, 4 << 20);
    let stream = connect(server.addr);
    let peer = stream.local_addr().unwrap();
    let echoed = round_trip(stream, &data);
    assert_same(&echoed, &data, "the well-behaved client");
    close_line(&server, peer);
    assert!(
        switched(&server, peer),
        "the well-behaved client never tried to splice"
    );
    assert_eq!(
        spliced(&server, peer),
        None,
        "the pool had no pipe to lend, yet it spliced"
    );

    drop(stalled);
    close_line(&server, stalled_peer);
    let (_, waits) = spliced(&server, stalled_peer).expect("the stalled client spliced");
    assert!(waits > 0, "its pipe never held unsent echo");
    // Its pipe held bytes when it went, so it was closed: the next bulk client gets a new one.
    let data = payload::bytes(11, 2 << 20);
    let stream = connect(server.addr);
    let peer = stream.local_addr().unwrap();
    assert_same(
        &round_trip(stream, &data),
        &data,
        "after the stalled client",
    );
    close_line(&server, peer);
    assert!(spliced(&server, peer).is_some(), "the pipe never came back");
    let opened = server.log().matches("splice pipe opened").count();
    assert_eq!(
        opened, 2,
        "a pipe with leftover bytes was pooled, not closed"
    );
    assert!(server.stop().success());
}

#[test]
fn idle_timeout_closes_a_connection_stuck_on_the_splice_path() {
    let server = splicing(&["--idle-timeout", "300ms"])
        .env("MULTIECHO_SPLICE_PIPES", "1")
        .start();
    let stalled = connect(server.addr);
    let peer = stalled.local_addr().unwrap();
    let started = Instant::now();
    push_until_blocked(&stalled);
    let close = close_line(&server, peer);
    assert!(close.contains("end=\"idle timeout\""), "{close}");
    assert!(started.elapsed() < PATIENCE);
    let (_, waits) = spliced(&server, peer).expect("the stalled client spliced");
    assert!(waits > 0, "its pipe never held unsent echo");
    drop(stalled);
    assert!(server.stop().success());
}

#[test]
fn a_proxy_header_is_parsed_before_any_splice() {
    let server = splicing(&["--listen", "tcp+proxy://127.0.0.1:0"]).start();
    let addr = server.listener("tcp+proxy");
    let data = payload::bytes(12, 3 << 20);
    let mut first = b"PROXY TCP4 10.1.2.3 10.1.2.4 4321 80\r\n".to_vec();
    // The first write also carries the start of the bulk data, after the header.
    first.extend_from_slice(&data[..100_000]);
    let stream = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    let sent = data.clone();
    let sender = thread::spawn(move || {
        writer.write_all(&first).unwrap();
        writer.write_all(&sent[100_000..]).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = stream;
    let mut echoed = Vec::new();
    reader.read_to_end(&mut echoed).expect("the echo until EOF");
    sender.join().unwrap();
    assert_same(
        &echoed,
        &data,
        "bulk data after a PROXY header (not echoed)",
    );
    let client: SocketAddr = "10.1.2.3:4321".parse().unwrap();
    let close = close_line(&server, client);
    assert!(close.contains(&format!("bytes={} ", data.len())), "{close}");
    assert!(spliced(&server, client).is_some(), "never spliced");
    assert!(server.stop().success());
}

#[test]
fn splice_off_reads_and_writes() {
    let server = splicing(&["--splice", "off"]).start();
    let data = payload::bytes(13, 4 << 20);
    let stream = connect(server.addr);
    let peer = stream.local_addr().unwrap();
    assert_same(&round_trip(stream, &data), &data, "--splice off");
    close_line(&server, peer);
    let log = server.log();
    assert!(!log.contains("splice"), "--splice off spliced:\n{log}");
    assert!(server.stop().success());
}

#[test]
fn small_messages_go_back_to_read_and_write() {
    let server = splicing(&[]).start();
    let mut stream = connect(server.addr);
    let peer = stream.local_addr().unwrap();
    // Bulk first, in one piece per round trip so the next message is not mixed into it.
    for round in 0..8u64 {
        let bulk = payload::bytes(14 + round, 512 * 1024);
        let mut writer = stream.try_clone().unwrap();
        let sent = bulk.clone();
        let sender = thread::spawn(move || writer.write_all(&sent).unwrap());
        common::expect_echo(&mut stream, &bulk, "bulk");
        sender.join().unwrap();
        if switched(&server, peer) {
            break;
        }
    }
    wait_switched(&server, peer);
    for round in 0..10u64 {
        let small = payload::bytes(50 + round, 100);
        stream.write_all(&small).unwrap();
        common::expect_echo(&mut stream, &small, "small message");
    }
    server.wait_for_log("the switch back", |log| {
        log.lines().any(|l| {
            l.contains("copy path: small messages again") && l.contains(&format!("peer={peer}"))
        })
    });
    drop(stream);
    close_line(&server, peer);
    assert!(server.stop().success());
}

/// After a bench run at `size`, the byte counters equal what the bench verified, with the
/// bench's connections spliced.
fn reconciles_with_bench(size: u64) {
    let server = splicing(&["--metrics", "127.0.0.1:0"]).start();
    let metrics = server.listener("metrics");
    let size_arg = size.to_string();
    let report = common::bench_json(
        &server.addr.to_string(),
        &[
            "--conns",
            "2",
            "--requests",
            "200",
            "--threads",
            "1",
            "--size",
            &size_arg,
        ],
    );
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["mismatches"], 0, "{report}");
    let requests = report["requests"].as_u64().unwrap();
    assert_eq!(requests, 200, "{report}");
    // Its connections and the probe it opens first.
    let connections = report["connections"].as_u64().unwrap() + 1;
    let t = totals(&scrape_until(metrics, "the bench's closes", |t| {
        t["multiecho_connections_closed_total"] >= connections as f64
    }));
    let bytes = (requests * size) as f64;
    assert_eq!(
        t["multiecho_bytes_received_total"], bytes,
        "{size}: {report}"
    );
    assert_eq!(t["multiecho_bytes_sent_total"], bytes, "{size}: {report}");
    let log = server.log();
    let spliced: u64 = log
        .lines()
        .filter(|l| l.contains("connection spliced"))
        .map(|l| field(l, "spliced"))
        .sum();
    assert!(
        spliced > 0,
        "{size}: bench's connections never spliced:\n{log}"
    );
    assert!(server.stop().success());
}

#[test]
fn metrics_reconcile_with_bench_at_64_kib() {
    reconciles_with_bench(64 * 1024);
}

#[test]
fn metrics_reconcile_with_bench_at_256_kib() {
    reconciles_with_bench(256 * 1024);
}

#[test]
fn tls_connections_never_splice() {
    let server = splicing(&["--listen", "tls://127.0.0.1:0"]).start();
    let addr = server.listener("tls");
    let report = common::bench_json(
        &format!("tls://{addr}"),
        &[
            "--insecure",
            "--conns",
            "1",
            "--requests",
            "20",
            "--threads",
            "1",
            "--size",
            "262144",
        ],
    );
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["requests"], 20, "{report}");
    server.wait_for_log("the TLS close lines", |log| {
        log.matches("connection closed").count() >= 2
    });
    let log = server.log();
    assert!(!log.contains("splice"), "a TLS connection spliced:\n{log}");
    assert!(server.stop().success());
}

#[test]
fn the_shutdown_deadline_closes_a_connection_stuck_on_the_splice_path() {
    let mut server = splicing(&["--shutdown-timeout", "300ms"]).start();
    let stalled = connect(server.addr);
    let peer = stalled.local_addr().unwrap();
    push_until_blocked(&stalled);
    wait_switched(&server, peer);
    server.terminate();
    let status = server
        .wait_timeout(PATIENCE)
        .expect("the server exits at the deadline");
    assert!(status.success(), "{status}");
    let close = close_line(&server, peer);
    assert!(close.contains("end=\"closed at shutdown\""), "{close}");
    let (_, waits) = spliced(&server, peer).expect("the stalled client spliced");
    assert!(waits > 0, "its pipe never held unsent echo");
    drop(stalled);
}
