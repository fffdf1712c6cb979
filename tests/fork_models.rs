//! What only the fork-based models (process, prefork) must show: every child reaped under
//! load, many child processes at once, children stopped at shutdown (and none left behind),
//! `--max-conns` in processes, prefork's fixed workers and their replacement, and the process
//! parent's back-off when it runs out of descriptors. The server runs as the built binary in
//! a subprocess: the test harness itself never forks.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    assert_same, connect, expect_echo, receives_within, round_trip, Server, ServerBuilder, PATIENCE,
};
use multiecho::payload;

/// Polls `condition` every 10 ms until it holds; panics with `what` after `within`.
fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A connection that has had one echo, so a process is serving it.
fn connected_client(server: &Server) -> TcpStream {
    let mut stream = connect(server.addr);
    stream.write_all(b"hello").unwrap();
    expect_echo(&mut stream, b"hello", "before SIGTERM");
    stream
}

#[test]
fn process_reaps_every_child_under_load() {
    let server = ServerBuilder::new("process").start();
    for i in 0..300u64 {
        let data = payload::bytes(i, 32);
        let mut stream = connect(server.addr);
        stream.write_all(&data).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).unwrap();
        assert_same(&echoed, &data, "sequential client");
    }
    // A burst whose children exit together, so their SIGCHLDs coalesce.
    let burst: Vec<_> = (0..50u64)
        .map(|i| {
            let stream = connect(server.addr);
            thread::spawn(move || {
                let data = payload::bytes(1000 + i, 64);
                assert_same(&round_trip(stream, &data), &data, "burst client");
            })
        })
        .collect();
    for client in burst {
        client.join().unwrap();
    }
    let pid = server.pid();
    eventually("every child to be reaped", Duration::from_secs(10), || {
        common::children_states(pid).is_empty()
    });
    assert_eq!(common::zombie_children(pid), 0);
    assert!(server.stop().success());
}

#[test]
fn process_serves_200_clients_at_once() {
    let server = ServerBuilder::new("process").start();
    // All connected before any talks, so 200 children are alive together.
    let streams: Vec<TcpStream> = (0..200).map(|_| connect(server.addr)).collect();
    let clients: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, stream)| {
            thread::spawn(move || {
                let seed = 7_000 + i as u64;
                let len = payload::Rng::new(seed).range(1, 64 * 1024) as usize;
                let data = payload::bytes(seed, len);
                assert_same(&round_trip(stream, &data), &data, &format!("client {i}"));
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread");
    }
    let pid = server.pid();
    eventually("every child to be reaped", Duration::from_secs(10), || {
        common::children_states(pid).is_empty()
    });
    assert!(server.stop().success());
}

/// SIGTERM while a client is connected and silent: the server closes it at the deadline,
/// reaps every child and exits 0; none of its processes is left.
fn sigterm_closes_an_idle_client_at_the_deadline(model: &str) {
    let mut server = ServerBuilder::new(model)
        .args(&["--shutdown-timeout", "1s", "--workers", "2"])
        .start();
    let mut idle = connected_client(&server);
    let children = common::live_children(server.pid());
    assert!(
        !children.is_empty(),
        "{model}: no child process serves the client"
    );
    let started = Instant::now();
    server.terminate();
    let status = server
        .wait_timeout(Duration::from_secs(4))
        .unwrap_or_else(|| {
            panic!(
                "{model}: still running 4 s after SIGTERM:\n{}",
                server.log()
            )
        });
    assert!(status.success(), "{model}: exit status {status}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{model}: the idle client was cut off before the 1 s shutdown timeout"
    );
    idle.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut rest = Vec::new();
    match idle.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "{model}: unexpected bytes after SIGTERM"),
        Err(e) => assert_ne!(
            e.kind(),
            ErrorKind::WouldBlock,
            "{model}: client not closed"
        ),
    }
    for child in children {
        assert!(
            !Path::new(&format!("/proc/{child}")).exists(),
            "{model}: child {child} outlived its parent"
        );
    }
}

/// SIGTERM while a client keeps talking: it is served until it closes, well before the
/// deadline, and the server then exits 0 without waiting out the timeout.
fn sigterm_lets_a_talking_client_finish(model: &str) {
    let mut server = ServerBuilder::new(model)
        .args(&["--shutdown-timeout", "10s", "--workers", "2"])
        .start();
    let mut stream = connected_client(&server);
    server.terminate();
    server.wait_for_log("shutdown to start", |log| log.contains("shutting down"));
    let started = Instant::now();
    for round in 0..5u64 {
        let data = payload::bytes(round, 3000);
        stream.write_all(&data).unwrap();
        expect_echo(&mut stream, &data, "while draining");
        thread::sleep(Duration::from_millis(50));
    }
    let last = payload::bytes(99, 100_000);
    assert_same(
        &round_trip(stream, &last),
        &last,
        "last message, then half-close",
    );
    let status = server
        .wait_timeout(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{model}: no exit after the client left:\n{}", server.log()));
    assert!(status.success(), "{model}: exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{model}: waited for the shutdown timeout although the client had left"
    );
}

#[test]
fn process_sigterm_closes_an_idle_client_at_the_deadline() {
    sigterm_closes_an_idle_client_at_the_deadline("process");
}

#[test]
fn prefork_sigterm_closes_an_idle_client_at_the_deadline() {
    sigterm_closes_an_idle_client_at_the_deadline("prefork");
}

#[test]
fn process_sigterm_lets_a_talking_client_finish() {
    sigterm_lets_a_talking_client_finish("process");
}

#[test]
fn prefork_sigterm_lets_a_talking_client_finish() {
    sigterm_lets_a_talking_client_finish("prefork");
}

#[test]
fn process_max_conns_keeps_the_third_client_waiting_in_the_backlog() {
    let server = ServerBuilder::new("process")
        .args(&["--max-conns", "2"])
        .start();
    let first = connected_client(&server);
    let mut second = connected_client(&server);
    let mut third = connect(server.addr);
    third.write_all(b"3").unwrap();
    assert!(
        !receives_within(&mut third, Duration::from_millis(400)),
        "a third client was served despite --max-conns 2"
    );
    assert_eq!(common::live_children(server.pid()).len(), 2);
    drop(first);
    // Not reset: its bytes waited in the socket, and now they come back.
    expect_echo(&mut third, b"3", "third client, after the first left");
    third.write_all(b"more").unwrap();
    expect_echo(&mut third, b"more", "third client");
    second.write_all(b"2").unwrap();
    expect_echo(&mut second, b"2", "second client, still served");
    assert!(server.stop().success());
}

#[test]
fn prefork_serves_extra_clients_when_a_worker_frees_up_and_replaces_dead_workers() {
    let server = ServerBuilder::new("prefork")
        .args(&["--workers", "2"])
        .start();
    let pid = server.pid();
    let first = connected_client(&server);
    let second = connected_client(&server);
    let mut waiting: Vec<TcpStream> = (0..2).map(|_| connect(server.addr)).collect();
    for client in &mut waiting {
        client.write_all(b"w").unwrap();
    }
    for client in &mut waiting {
        assert!(
            !receives_within(client, Duration::from_millis(300)),
            "a third client was served with 2 workers busy"
        );
    }
    // One worker frees up: exactly one of the waiting clients is served.
    drop(first);
    let deadline = Instant::now() + PATIENCE;
    let served = loop {
        if let Some(i) =
            (0..2).find(|&i| receives_within(&mut waiting[i], Duration::from_millis(50)))
        {
            break i;
        }
        assert!(Instant::now() < deadline, "no waiting client was served");
    };
    let other = 1 - served;
    assert!(
        !receives_within(&mut waiting[other], Duration::from_millis(300)),
        "both waiting clients were served while only one worker was free"
    );
    drop(second);
    assert!(
        receives_within(&mut waiting[other], PATIENCE),
        "the last client was not served after the second worker freed up"
    );
    drop(waiting);

    // Kill a worker: the parent starts a replacement, so 2 clients are again served at once.
    let workers = common::live_children(pid);
    assert_eq!(workers.len(), 2, "workers: {workers:?}");
    common::signal(workers[0], libc::SIGKILL);
    server.wait_for_log("the worker's replacement", |log| {
        log.contains("starting a replacement")
    });
    eventually("a replacement worker", Duration::from_secs(10), || {
        let now = common::live_children(pid);
        now.len() == 2 && !now.contains(&workers[0])
    });
    let mut a = connect(server.addr);
    let mut b = connect(server.addr);
    a.write_all(b"a").unwrap();
    b.write_all(b"b").unwrap();
    expect_echo(&mut a, b"a", "first client after the replacement");
    expect_echo(
        &mut b,
        b"b",
        "second concurrent client after the replacement",
    );
    drop((a, b));
    assert!(server.stop().success());
}

/// The process parent holds the same few descriptors whatever the load (each connection's is
/// closed right after the fork), so clients alone cannot exhaust them. Instead the test lowers
/// the running server's soft limit to the descriptors it already has (prlimit(2), no fork),
/// which makes every accept() fail with EMFILE, then restores it.
#[test]
fn process_backs_off_without_spinning_when_out_of_descriptors() {
    let server = ServerBuilder::new("process").start();
    let pid = server.pid();
    // The model logs this once its own descriptors (the SIGCHLD socket) are open.
    server.wait_for_log("the model to start", |log| log.contains("forking a child"));
    let lowest_free = {
        let open: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
            .collect();
        (0..).find(|fd| !open.contains(fd)).unwrap()
    };
    let original = set_soft_open_files_limit(pid, lowest_free);

    let mut clients: Vec<TcpStream> = (0..20).map(|_| connect(server.addr)).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client.write_all(format!("c{i:02}").as_bytes()).unwrap();
    }
    server.wait_for_log("the back-off warning", |log| {
        log.contains("Too many open files") && log.contains("backing off")
    });
    let before = common::cpu_ticks(pid);
    thread::sleep(Duration::from_secs(1));
    let used = common::cpu_ticks(pid) - before;
    eprintln!("CPU while out of descriptors: {used} ticks (1/100 s) in 1 s");
    assert!(
        used < 20,
        "{used} ticks of CPU in 1 s while out of descriptors: spinning"
    );
    assert!(
        !receives_within(&mut clients[0], Duration::from_millis(50)),
        "served while out of descriptors?"
    );

    set_soft_open_files_limit(pid, original);
    // The clients waited in the backlog, not reset: each now gets its echo.
    for (i, client) in clients.iter_mut().enumerate() {
        expect_echo(
            client,
            format!("c{i:02}").as_bytes(),
            "client after recovery",
        );
    }
    drop(clients);
    assert!(server.stop().success());
}

/// Sets `pid`'s soft RLIMIT_NOFILE (the hard limit stays); returns the previous soft limit.
fn set_soft_open_files_limit(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the current limits into `old`, a valid rlimit; changes nothing.
    let got = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(got, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: `new` is a valid rlimit; prlimit(2) only changes the other process's limits.
    let set = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());
    old.rlim_cur
}
