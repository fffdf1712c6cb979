//! The conformance suite: the behaviour every model shares, tested for each model by name:
//! exact echo, many clients at once, half-close, resets, SIGTERM drain and deadline, listeners
//! closed at shutdown, `--max-conns`, `--idle-timeout`, recovery from running out of
//! descriptors, admission control (`--allow`/`--deny`, `--max-per-source`, `--max-conn-rate`)
//! by source address, and one close line per connection saying how it ended. Servers run as
//! the built binary in a subprocess (fork-based models must never fork the test harness);
//! tests/in_process.rs checks the models that do not fork through their counters, and each
//! model's own file (async_model.rs, uring_model.rs, fork_models.rs) only what is its own.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use std::time::{Duration, Instant};

use common::{
    assert_same, connect, connect_from, expect_echo, receives_within, refused_without_echo,
    round_trip, ServerBuilder,
};
use multiecho::payload;

/// Reads until EOF or an error; returns whether the server closed the connection in `within`.
fn closed_by_server_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            // A signal (the harness's SIGCHLD handler) interrupted the wait: not an answer.
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true, // reset: also closed
        }
    }
}

fn exact_random_payloads(model: &str) {
    let Some(server) = ServerBuilder::new(model).start_or_skip() else {
        return;
    };
    let mut rng = payload::Rng::new(1);
    // Around 16 KiB: the uring model's buffer size, where an echo spans two buffers.
    let mut sizes = vec![
        1,
        2,
        7,
        100,
        1460,
        4096,
        16_383,
        16_384,
        16_385,
        65_536,
        65_537,
        1 << 20,
    ];
    sizes.extend((0..6).map(|_| rng.range(1, 1 << 20) as usize));
    for (seed, size) in sizes.into_iter().enumerate() {
        let data = payload::bytes(seed as u64, size);
        let echoed = round_trip(connect(server.addr), &data);
        assert_same(&echoed, &data, &format!("{model}: payload of {size} bytes"));
    }
    assert!(server.stop().success());
}

fn many_clients_at_once(model: &str) {
    let Some(server) = ServerBuilder::new(model).start_or_skip() else {
        return;
    };
    let addr = server.addr;
    let clients: Vec<_> = (0..200u64)
        .map(|id| {
            std::thread::spawn(move || {
                let size = payload::Rng::new(id).range(1, 16 * 1024) as usize;
                let data = payload::bytes(1000 + id, size);
                let echoed = round_trip(connect(addr), &data);
                assert_same(&echoed, &data, &format!("client {id}"));
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client failed");
    }
    // The server logs each close after the client saw it, so wait for the lines.
    server.wait_for_log("200 close lines", |log| {
        log.matches("connection closed").count() >= 200
    });
    let closed = server.log().matches("connection closed").count();
    assert!(server.stop().success());
    assert_eq!(closed, 200, "{model}: one close line per connection");
}

fn half_close_echoes_everything_then_closes(model: &str) {
    let Some(server) = ServerBuilder::new(model).start_or_skip() else {
        return;
    };
    let mut stream = connect(server.addr);
    let data = payload::bytes(5, 10_000);
    stream.write_all(&data).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).expect("EOF after the echo");
    assert_same(&echoed, &data, "half-closed client");
    server.wait_for_log("the close line", |log| log.contains("client closed"));
    assert!(server.stop().success());
}

fn reset_affects_only_that_client(model: &str) {
    let Some(server) = ServerBuilder::new(model).start_or_skip() else {
        return;
    };
    let mut steady = connect(server.addr);
    steady.write_all(b"before").unwrap();
    expect_echo(&mut steady, b"before", "steady client before the reset");
    for _ in 0..5 {
        let rude = connect(server.addr);
        (&rude).write_all(&payload::bytes(9, 200_000)).unwrap_or(());
        // Linger 0 turns close into a reset, with echo still in flight.
        socket2::SockRef::from(&rude)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(rude);
    }
    steady.write_all(b"after").unwrap();
    expect_echo(&mut steady, b"after", "steady client after the resets");
    drop(steady);
    let fresh = payload::bytes(10, 3000);
    assert_same(
        &round_trip(connect(server.addr), &fresh),
        &fresh,
        "new client",
    );
    // The steady client, the five reset ones and the new one: a close line each. (The uring
    // model takes the peer from getpeername(2), which fails for a connection reset before it
    // is served, and drops such a connection unrecorded: fewer lines there.)
    let want = if model == "uring" { 2 } else { 7 };
    server.wait_for_log("the close lines", |log| {
        log.matches("connection closed").count() >= want
    });
    let closed = server.log().matches("connection closed").count();
    assert!(server.stop().success());
    if model != "uring" {
        assert_eq!(closed, 7, "{model}: one close line per connection");
    }
}

fn sigterm_lets_a_live_connection_finish(model: &str) {
    let Some(mut server) = ServerBuilder::new(model)
        .args(&["--shutdown-timeout", "20s"])
        .start_or_skip()
    else {
        return;
    };
    let mut stream = connect(server.addr);
    stream.write_all(b"one").unwrap();
    expect_echo(&mut stream, b"one", "before SIGTERM");
    server.terminate();
    server.wait_for_log("shutdown to start", |log| log.contains("shutting down"));
    // Still served while draining.
    for round in 0..3 {
        let msg = format!("draining {round}");
        stream.write_all(msg.as_bytes()).unwrap();
        expect_echo(&mut stream, msg.as_bytes(), "while draining");
    }
    assert!(
        server.wait_timeout(Duration::from_millis(200)).is_none(),
        "{model}: the server exited while a client was still connected"
    );
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let status = server
        .wait_timeout(Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "{model}: no exit after the last client left; log:\n{}",
                server.log()
            )
        });
    assert!(status.success(), "{model}: exit status {status}");
}

fn sigterm_closes_idle_connections_at_the_deadline(model: &str) {
    let Some(mut server) = ServerBuilder::new(model)
        .args(&["--shutdown-timeout", "1s"])
        .start_or_skip()
    else {
        return;
    };
    let mut idle = connect(server.addr);
    idle.write_all(b"x").unwrap();
    expect_echo(&mut idle, b"x", "before SIGTERM");
    let started = Instant::now();
    server.terminate();
    let status = server
        .wait_timeout(Duration::from_secs(8))
        .unwrap_or_else(|| {
            panic!(
                "{model}: still running 8 s after SIGTERM; log:\n{}",
                server.log()
            )
        });
    assert!(status.success(), "{model}: exit status {status}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{model}: exited before the shutdown timeout while a client was connected"
    );
    assert!(
        closed_by_server_within(&mut idle, Duration::from_secs(5)),
        "{model}: the idle client was not closed"
    );
    // Every model says the server closed it, the blocking ones included (their deadline shuts
    // the socket down, which their echo loop reads as end of stream).
    assert!(
        server.log().contains("closed at shutdown"),
        "{model}: no close line for the shutdown; log:\n{}",
        server.log()
    );
    assert!(
        !server.log().contains("client closed"),
        "{model}: the deadline's close logged as the client's; log:\n{}",
        server.log()
    );
}

fn max_conns_makes_extra_clients_wait(model: &str) {
    let Some(server) = ServerBuilder::new(model)
        .args(&["--max-conns", "2", "--workers", "2"])
        .start_or_skip()
    else {
        return;
    };
    let mut first = connect(server.addr);
    let mut second = connect(server.addr);
    first.write_all(b"1").unwrap();
    second.write_all(b"2").unwrap();
    expect_echo(&mut first, b"1", "first client");
    expect_echo(&mut second, b"2", "second client");
    // The third connects (the kernel completes the handshake into the backlog) but waits.
    let mut third = connect(server.addr);
    third.write_all(b"3").unwrap();
    assert!(
        !receives_within(&mut third, Duration::from_millis(400)),
        "{model}: a third client was served despite --max-conns 2"
    );
    second.write_all(b"still served").unwrap();
    expect_echo(&mut second, b"still served", "second client, at the limit");
    drop(first);
    expect_echo(&mut third, b"3", "third client, after the first left");
    third.write_all(b"and more").unwrap();
    expect_echo(&mut third, b"and more", "third client, served on");
    drop((second, third));
    assert!(server.stop().success());
}

fn idle_timeout_closes_silent_clients_only(model: &str) {
    let Some(server) = ServerBuilder::new(model)
        .args(&["--idle-timeout", "300ms"])
        .start_or_skip()
    else {
        return;
    };
    let mut silent = connect(server.addr);
    silent.write_all(b"hello").unwrap();
    expect_echo(&mut silent, b"hello", "before going silent");
    // A client that keeps talking meanwhile outlives the timeout (the iterative model serves
    // one client at a time, so it has none beside the silent one).
    let chatty = (model != "iterative").then(|| {
        let mut chatty = connect(server.addr);
        std::thread::spawn(move || {
            for i in 0..8 {
                let msg = format!("tick {i}");
                chatty.write_all(msg.as_bytes()).unwrap();
                expect_echo(&mut chatty, msg.as_bytes(), "chatty client");
                std::thread::sleep(Duration::from_millis(100));
            }
            chatty
        })
    });
    let waited = Instant::now();
    assert!(
        closed_by_server_within(&mut silent, Duration::from_secs(5)),
        "{model}: a silent client was not closed by --idle-timeout 300ms"
    );
    assert!(
        waited.elapsed() >= Duration::from_millis(250),
        "{model}: closed too early"
    );
    if let Some(chatty) = chatty {
        let mut chatty = chatty
            .join()
            .expect("the chatty client was served throughout");
        chatty.write_all(b"still here").unwrap();
        expect_echo(
            &mut chatty,
            b"still here",
            "chatty client, after the silent one left",
        );
    }
    server.wait_for_log("the idle close line", |log| log.contains("idle timeout"));
    assert!(server.stop().success());
}

fn recovers_from_running_out_of_descriptors(model: &str) {
    // 64 descriptors: enough to start, not enough for 100 clients at once.
    let Some(server) = ServerBuilder::new(model).nofile(64).start_or_skip() else {
        return;
    };
    let mut clients: Vec<TcpStream> = (0..100).map(|_| connect(server.addr)).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        let _ = client.write_all(format!("c{i:03}").as_bytes());
    }
    // Let the server hit the limit, then measure that it is not spinning on accept().
    std::thread::sleep(Duration::from_millis(300));
    let before = common::cpu_ticks(server.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = common::cpu_ticks(server.pid()) - before;
    assert!(
        used < 50,
        "{model}: {used} ticks of CPU in 1 s while out of descriptors: spinning"
    );
    drop(clients);
    // Served again once descriptors are free (the closed clients' sockets drain first).
    let data = payload::bytes(64, 5000);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut stream = connect(server.addr);
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream.write_all(&data).unwrap();
        let mut got = vec![0u8; data.len()];
        match stream.read_exact(&mut got) {
            Ok(()) => {
                assert_same(&got, &data, "client after recovery");
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "{model}: not serving again after descriptors were freed: {e}; log:\n{}",
                server.log()
            ),
        }
    }
    assert!(server.stop().success());
}

fn loopback(last: u8) -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, last])
}

/// A client from `source` that sends `msg` and must get it back.
fn served_from(source: u8, addr: std::net::SocketAddr, msg: &[u8], what: &str) -> TcpStream {
    let mut stream = connect_from(loopback(source), addr);
    stream.write_all(msg).unwrap();
    expect_echo(&mut stream, msg, what);
    stream
}

fn shutdown_refuses_new_clients_at_once(model: &str) {
    let Some(mut server) = ServerBuilder::new(model)
        .args(&["--shutdown-timeout", "20s"])
        .start_or_skip()
    else {
        return;
    };
    let mut live = connect(server.addr);
    live.write_all(b"before").unwrap();
    expect_echo(&mut live, b"before", "before SIGTERM");
    let signalled = Instant::now();
    server.terminate();
    let refused_after = loop {
        match TcpStream::connect(server.addr) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break signalled.elapsed(),
            // A handshake that raced the listener's close is reset with the backlog.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{model}: connect after SIGTERM: {e}"),
            Ok(_) => {
                assert!(
                    signalled.elapsed() < Duration::from_secs(5),
                    "{model}: still accepting connections 5 s after SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    assert!(
        refused_after <= Duration::from_millis(100),
        "{model}: new clients refused only {refused_after:?} after SIGTERM"
    );
    for round in 0..3 {
        let msg = format!("draining {round}");
        live.write_all(msg.as_bytes()).unwrap();
        expect_echo(
            &mut live,
            msg.as_bytes(),
            "the live connection while draining",
        );
    }
    drop(live);
    let status = server.wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{model}: no clean exit after the last client left: {status:?}"
    );
}

/// Clients that waited in the backlog, never accepted, when shutdown starts: the listener
/// closes, so they are told at once (reset), while the client being served finishes.
fn shutdown_resets_clients_waiting_in_the_backlog(model: &str) {
    let Some(mut server) = ServerBuilder::new(model)
        .args(&[
            "--shutdown-timeout",
            "20s",
            "--workers",
            "1",
            "--max-conns",
            "1",
        ])
        .start_or_skip()
    else {
        return;
    };
    let mut busy = connect(server.addr);
    busy.write_all(b"busy").unwrap();
    expect_echo(&mut busy, b"busy", "the client being served");
    let mut queued: Vec<TcpStream> = (0..3).map(|_| connect(server.addr)).collect();
    for client in &mut queued {
        client.write_all(b"waiting").unwrap();
        assert!(
            !receives_within(client, Duration::from_millis(100)),
            "{model}: served beyond the limit"
        );
    }
    let signalled = Instant::now();
    server.terminate();
    for client in &mut queued {
        assert!(
            closed_by_server_within(client, Duration::from_secs(2)),
            "{model}: a client waiting in the backlog was left hanging after SIGTERM"
        );
    }
    assert!(signalled.elapsed() < Duration::from_secs(3));
    busy.write_all(b"still").unwrap();
    expect_echo(&mut busy, b"still", "the served client while draining");
    drop(busy);
    let status = server.wait_timeout(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{model}: {status:?}");
}

fn allow_and_deny_by_source(model: &str) {
    let rules = [
        "--allow",
        "127.0.0.0/8",
        "--deny",
        "127.0.0.2",
        "--deny",
        "127.0.3.0/24",
    ];
    let Some(server) = ServerBuilder::new(model).args(&rules).start_or_skip() else {
        return;
    };
    drop(served_from(1, server.addr, b"allowed", "an allowed source"));
    for denied in [loopback(2), std::net::IpAddr::from([127, 0, 3, 9])] {
        let mut stream = connect_from(denied, server.addr);
        assert!(
            refused_without_echo(&mut stream),
            "{model}: a denied source {denied} was served"
        );
    }
    drop(served_from(
        3,
        server.addr,
        b"still allowed",
        "an allowed source after refusals",
    ));
    server.wait_for_log("the refusal line", |log| {
        log.contains("connection refused") && log.contains("denied")
    });
    // A source outside --allow.
    let Some(server) = ServerBuilder::new(model)
        .args(&["--allow", "127.0.0.8/29"])
        .start_or_skip()
    else {
        return;
    };
    let mut stream = connect_from(loopback(1), server.addr);
    assert!(
        refused_without_echo(&mut stream),
        "{model}: not-allowed source served"
    );
    drop(served_from(
        9,
        server.addr,
        b"in 127.0.0.8/29",
        "a source inside --allow",
    ));
    server.wait_for_log("the refusal line", |log| log.contains("not-allowed"));
    assert!(server.stop().success());
}

fn max_per_source_refuses_the_next_one(model: &str) {
    let Some(server) = ServerBuilder::new(model)
        .args(&["--max-per-source", "2", "--workers", "4"])
        .start_or_skip()
    else {
        return;
    };
    let first = served_from(5, server.addr, b"a", "first from .5");
    let _second = served_from(5, server.addr, b"b", "second from .5");
    let mut third = connect_from(loopback(5), server.addr);
    assert!(
        refused_without_echo(&mut third),
        "{model}: a third connection from one source was served"
    );
    let _other = served_from(6, server.addr, b"c", "another source is unaffected");
    drop(first);
    // The slot frees when the server has seen the close; until then a retry is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = connect_from(loopback(5), server.addr);
        again.write_all(b"again").unwrap();
        let mut got = [0u8; 5];
        if again.read_exact(&mut got).is_ok() {
            assert_eq!(&got, b"again");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{model}: the freed slot was never reusable"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server.wait_for_log("the refusal line", |log| log.contains("per-source-limit"));
}

fn max_conn_rate_is_temporary(model: &str) {
    let Some(server) = ServerBuilder::new(model)
        .args(&["--max-conn-rate", "5"])
        .start_or_skip()
    else {
        return;
    };
    let (mut served, mut refused) = (0, 0);
    for _ in 0..15 {
        let mut stream = connect_from(loopback(7), server.addr);
        stream.write_all(b"r").unwrap();
        let mut got = [0u8; 1];
        match stream.read(&mut got) {
            Ok(1) => served += 1,
            _ => refused += 1,
        }
    }
    assert!(
        served >= 5,
        "{model}: only {served} of the burst of 5 served"
    );
    assert!(refused >= 1, "{model}: 15 quick connections, none refused");
    drop(served_from(
        8,
        server.addr,
        b"other",
        "another source is unaffected",
    ));
    std::thread::sleep(Duration::from_millis(1100));
    drop(served_from(
        7,
        server.addr,
        b"later",
        "the source, once its rate dropped",
    ));
    server.wait_for_log("the refusal line", |log| log.contains("rate-limit"));
}

/// Issue 9 item 2, for the event models: clients that fill their connections and never read
/// must not stop a well-behaved client's echoes (the blocking models stop by design, issue 9
/// item 6).
fn never_reading_clients_do_not_starve_others(model: &str) {
    let Some(mut server) = ServerBuilder::new(model)
        .args(&["--workers", "1"])
        .start_or_skip()
    else {
        return;
    };
    common::well_behaved_client_beside_never_reading_ones(server.addr, 40);
    server.terminate();
    assert!(server
        .wait_timeout(common::PATIENCE)
        .expect("exit")
        .success());
}

#[test]
fn epoll_never_reading_clients_do_not_starve_others() {
    never_reading_clients_do_not_starve_others("epoll");
}

#[test]
fn async_never_reading_clients_do_not_starve_others() {
    never_reading_clients_do_not_starve_others("async");
}

#[test]
fn uring_never_reading_clients_do_not_starve_others() {
    never_reading_clients_do_not_starve_others("uring");
}

macro_rules! suite {
    ($($model:ident),* $(,)?) => {$(
        mod $model {
            fn name() -> &'static str {
                stringify!($model).trim_start_matches("r#")
            }
            #[test]
            fn exact_random_payloads() { super::exact_random_payloads(name()) }
            #[test]
            fn half_close_echoes_everything_then_closes() {
                super::half_close_echoes_everything_then_closes(name())
            }
            #[test]
            fn reset_affects_only_that_client() {
                if name() != "iterative" { super::reset_affects_only_that_client(name()) }
            }
            #[test]
            fn many_clients_at_once() {
                if name() != "iterative" { super::many_clients_at_once(name()) }
            }
            #[test]
            fn sigterm_lets_a_live_connection_finish() {
                super::sigterm_lets_a_live_connection_finish(name())
            }
            #[test]
            fn sigterm_closes_idle_connections_at_the_deadline() {
                super::sigterm_closes_idle_connections_at_the_deadline(name())
            }
            #[test]
            fn max_conns_makes_extra_clients_wait() {
                if name() != "iterative" { super::max_conns_makes_extra_clients_wait(name()) }
            }
            #[test]
            fn idle_timeout_closes_silent_clients_only() {
                super::idle_timeout_closes_silent_clients_only(name())
            }
            #[test]
            fn recovers_from_running_out_of_descriptors() {
                super::recovers_from_running_out_of_descriptors(name())
            }
            #[test]
            fn shutdown_refuses_new_clients_at_once() {
                super::shutdown_refuses_new_clients_at_once(name())
            }
            #[test]
            fn shutdown_resets_clients_waiting_in_the_backlog() {
                super::shutdown_resets_clients_waiting_in_the_backlog(name())
            }
            #[test]
            fn allow_and_deny_by_source() { super::allow_and_deny_by_source(name()) }
            #[test]
            fn max_per_source_refuses_the_next_one() {
                // One client at a time: a second one from the source waits, it is not refused.
                if name() != "iterative" { super::max_per_source_refuses_the_next_one(name()) }
            }
            #[test]
            fn max_conn_rate_is_temporary() { super::max_conn_rate_is_temporary(name()) }
        }
    )*};
}

suite!(iterative, process, prefork, thread, pool, epoll, r#async, uring);

/// The problem the other models solve: a second client is served only after the first left.
#[test]
fn iterative_serves_the_second_client_only_after_the_first() {
    let server = ServerBuilder::new("iterative").start();
    let mut first = connect(server.addr);
    first.write_all(b"first").unwrap();
    expect_echo(&mut first, b"first", "first client");
    let mut second = connect(server.addr);
    second.write_all(b"second").unwrap();
    assert!(
        !receives_within(&mut second, Duration::from_millis(400)),
        "iterative served two clients at once"
    );
    drop(first);
    expect_echo(&mut second, b"second", "second client after the first left");
    assert!(server.stop().success());
}

/// The pool bounds its threads: with two workers, a third client waits until one frees up.
#[test]
fn pool_serves_extra_clients_once_a_worker_frees_up() {
    let server = ServerBuilder::new("pool").args(&["--workers", "2"]).start();
    let mut busy: Vec<TcpStream> = (0..2).map(|_| connect(server.addr)).collect();
    for (i, client) in busy.iter_mut().enumerate() {
        let msg = format!("worker {i}");
        client.write_all(msg.as_bytes()).unwrap();
        expect_echo(client, msg.as_bytes(), "a client holding a worker");
    }
    let mut waiting = connect(server.addr);
    waiting.write_all(b"my turn?").unwrap();
    assert!(
        !receives_within(&mut waiting, Duration::from_millis(400)),
        "pool with 2 workers served a third client at once"
    );
    drop(busy.pop());
    expect_echo(
        &mut waiting,
        b"my turn?",
        "the waiting client once a worker freed up",
    );
    drop((busy, waiting));
    assert!(server.stop().success());
}
