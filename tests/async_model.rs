//! Behaviour of the `async` model (tokio tasks): exact echo, many clients, half-close, resets,
//! graceful shutdown, `--max-conns` and `--idle-timeout`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_same, connect, round_trip, Server, PATIENCE};
use multiecho::payload;

const MODEL: &str = "async";

/// Sends `message` and reads exactly its echo back.
fn echo_once(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut echoed = vec![0; message.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert_same(&echoed, message, "echo");
}

/// Reads until end of stream (or a reset, which also means the server closed); panics if the
/// server sends data or does not close within the patience.
fn expect_closed(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: expected a close, got {n} bytes"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected a close, got {e}"),
    }
}

#[test]
fn echoes_random_payloads_exactly() {
    let server = Server::start(MODEL, &["--workers", "2"]);
    for (seed, len) in [1, 2, 1_000, 65_535, 65_536, 65_537, 300_001, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let sent = payload::bytes(seed as u64, len);
        let echoed = round_trip(connect(server.addr), &sent);
        assert_same(&echoed, &sent, &format!("payload of {len} bytes"));
    }
    assert!(server.stop().success());
}

#[test]
fn serves_200_clients_at_once() {
    let server = Server::start(MODEL, &["--workers", "2"]);
    let clients: Vec<_> = (0..200u64)
        .map(|seed| {
            let addr = server.addr;
            thread::spawn(move || {
                let sent = payload::bytes(1000 + seed, 1 + (seed as usize * 997) % 20_000);
                let echoed = round_trip(connect(addr), &sent);
                assert_same(&echoed, &sent, &format!("client {seed}"));
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread");
    }
    // The server logs each close after the client saw it, so wait for the lines.
    server.wait_for_log("200 close lines", |log| {
        log.matches("connection closed").count() >= 200
    });
    let closed = server.log().matches("connection closed").count();
    assert!(server.stop().success());
    assert_eq!(closed, 200, "one log line per connection");
}

#[test]
fn half_close_gets_everything_then_close() {
    let server = Server::start(MODEL, &[]);
    let mut stream = connect(server.addr);
    let sent = payload::bytes(7, 200_000);
    // Everything is written before the echo is read, then the write side is shut: the server
    // must keep echoing what it already has, then close.
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let sent = sent.clone();
        thread::spawn(move || {
            stream.write_all(&sent).unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).unwrap();
    writer.join().unwrap();
    assert_same(&echoed, &sent, "echo after half-close");
    server.wait_for_log("the close line", |log| log.contains("client closed"));
    assert!(server.stop().success());
}

#[test]
fn a_reset_affects_only_its_connection() {
    let server = Server::start(MODEL, &["--workers", "1"]);
    let mut survivor = connect(server.addr);
    echo_once(&mut survivor, b"before");
    for _ in 0..5 {
        let mut doomed = connect(server.addr);
        doomed.write_all(&payload::bytes(3, 100_000)).unwrap();
        // SO_LINGER 0: close sends a reset instead of a FIN.
        socket2::SockRef::from(&doomed)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(doomed);
    }
    echo_once(&mut survivor, b"after the resets");
    drop(survivor);
    server.wait_for_log("six close lines", |log| {
        log.matches("connection closed").count() == 6
    });
    assert!(server.stop().success());
}

#[test]
fn sigterm_closes_idle_connection_at_the_deadline_and_exits_0() {
    let mut server = Server::start(MODEL, &["--shutdown-timeout", "1s"]);
    let mut idle = connect(server.addr);
    echo_once(&mut idle, b"hello");
    let signalled = Instant::now();
    server.terminate();
    let status = server
        .wait_timeout(Duration::from_secs(1) + Duration::from_secs(4))
        .unwrap_or_else(|| panic!("no exit after the shutdown timeout; log:\n{}", server.log()));
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "the idle connection was given its shutdown timeout"
    );
    expect_closed(&mut idle, "idle connection at shutdown");
    assert!(server.log().contains("closed at shutdown"));
}

#[test]
fn talking_client_finishes_during_shutdown() {
    let mut server = Server::start(MODEL, &["--shutdown-timeout", "20s"]);
    let mut talker = connect(server.addr);
    echo_once(&mut talker, b"first");
    server.terminate();
    server.wait_for_log("the drain", |log| log.contains("shutting down"));
    // The live connection keeps being served in full, and its leaving ends the server.
    let rest = payload::bytes(11, 500_000);
    let echoed = round_trip(talker, &rest);
    assert_same(&echoed, &rest, "echo while draining");
    let status = server
        .wait_timeout(Duration::from_secs(10))
        .expect("the server exits once its last connection leaves, before the timeout");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn max_conns_keeps_extra_clients_waiting_in_the_backlog() {
    let server = Server::start(MODEL, &["--max-conns", "2"]);
    let mut first = connect(server.addr);
    let mut second = connect(server.addr);
    echo_once(&mut first, b"one");
    echo_once(&mut second, b"two");

    // The third connects (the kernel completes the handshake) but is not served yet.
    let mut third = connect(server.addr);
    third.write_all(b"three").unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 5];
    match third.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("third client served beyond --max-conns 2: {other:?}"),
    }
    echo_once(&mut second, b"still served");

    // When one of the first two leaves, the third is accepted and gets its echo.
    drop(first);
    third.set_read_timeout(Some(PATIENCE)).unwrap();
    third.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"three");
    echo_once(&mut third, b"and more");
    drop((second, third));
    assert!(server.stop().success());
}

#[test]
fn idle_timeout_closes_only_the_idle_client() {
    let server = Server::start(MODEL, &["--idle-timeout", "300ms"]);
    let mut idle = connect(server.addr);
    let mut active = connect(server.addr);
    echo_once(&mut idle, b"then silence");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(900) {
        echo_once(&mut active, b"tick");
        thread::sleep(Duration::from_millis(50));
    }
    expect_closed(&mut idle, "idle client");
    echo_once(&mut active, b"still here");
    server.wait_for_log("the idle close line", |log| log.contains("idle timeout"));
    drop(active);
    assert!(server.stop().success());
}

#[test]
fn a_client_that_never_reads_is_not_buffered_without_bound() {
    let server = Server::start(MODEL, &["--workers", "1"]);
    let rss_before = common::rss_kib(server.pid());
    let mut hog = connect(server.addr);
    hog.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // Send until the server stops reading (its echo is stuck, so it must stop taking more).
    let chunk = payload::bytes(5, 256 * 1024);
    let mut sent = 0usize;
    loop {
        match hog.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("never-reading client: {e}"),
        }
        assert!(
            sent < 256 << 20,
            "the server kept reading 256 MiB it cannot echo"
        );
    }
    let grown = common::rss_kib(server.pid()).saturating_sub(rss_before);
    assert!(
        grown < 8 * 1024,
        "the server grew by {grown} KiB holding a stuck echo ({sent} bytes sent)"
    );
    // Others are served meanwhile.
    let mut other = connect(server.addr);
    echo_once(&mut other, b"not blocked by the hog");
    drop((hog, other));
    assert!(server.stop().success());
}
