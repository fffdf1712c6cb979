//! The quick rows of the fault matrix (`scripts/fault-matrix.py` runs the full one): signals in
//! every model (SIGHUP drains like SIGTERM, SIGUSR1 logs a status line and changes nothing,
//! SIGUSR2 is ignored), no child of `process` or `prefork` outliving its parent however the
//! parent ends (SIGKILL, the forced second SIGINT, SIGTERM, SIGHUP, a SIGHUP to the whole
//! process group), a restart on the same port right after, and the values the command line
//! must refuse before anything starts. Servers run as the built binary in a subprocess.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use common::{connect, expect_echo, round_trip, Server, ServerBuilder, BIN, PATIENCE};
use multiecho::payload;

/// A connection that has had one echo, so a process, thread or task is serving it.
fn talking_client(server: &Server) -> TcpStream {
    let mut stream = connect(server.addr);
    stream.write_all(b"hello").unwrap();
    expect_echo(&mut stream, b"hello", "first echo");
    stream
}

/// One more exact round trip on a live connection.
fn still_echoes(stream: &mut TcpStream, seed: u64, what: &str) {
    let data = payload::bytes(seed, 2000);
    stream.write_all(&data).unwrap();
    expect_echo(stream, &data, what);
}

/// Waits until none of `pids` runs; returns how long that took, or `None` after `within`.
fn all_gone_within(pids: &[u32], within: Duration) -> Option<Duration> {
    let started = Instant::now();
    common::wait_until(within, || !pids.iter().any(|&pid| common::alive(pid)))
        .then(|| started.elapsed())
}

/// Whether another server can listen on `port` now (the real binary, so the same socket
/// options as the one before it).
fn port_is_free_for_a_restart(model: &str, port: u16) -> bool {
    let listen = format!("127.0.0.1:{port}");
    match ServerBuilder::new(model)
        .args(&["--listen", &listen])
        .try_start()
    {
        Ok(server) => {
            let status = server.stop();
            assert!(status.success(), "the restarted server exited {status}");
            true
        }
        Err(log) => {
            assert!(
                log.contains("in use"),
                "the restart failed for another reason:\n{log}"
            );
            false
        }
    }
}

// ---- signals, every model ----------------------------------------------------------------

/// SIGHUP (the terminal went away) drains like SIGTERM: new clients are refused, the live one
/// is served until it leaves, and the server exits 0.
fn sighup_drains(model: &str) {
    let Some(mut server) = ServerBuilder::new(model)
        .args(&["--shutdown-timeout", "10s", "--workers", "2"])
        .start_or_skip()
    else {
        return;
    };
    let mut stream = talking_client(&server);
    common::signal(server.pid(), libc::SIGHUP);
    server.wait_for_log("the drain", |log| log.contains("shutting down"));
    assert!(
        TcpStream::connect(server.addr).is_err(),
        "{model}: a new client was accepted after SIGHUP"
    );
    still_echoes(&mut stream, 1, "after SIGHUP");
    let last = payload::bytes(2, 50_000);
    common::assert_same(&round_trip(stream, &last), &last, "the last message");
    let status = server
        .wait_timeout(Duration::from_secs(8))
        .unwrap_or_else(|| panic!("{model}: no exit after the client left:\n{}", server.log()));
    assert!(status.success(), "{model}: exit status {status}");
}

/// SIGUSR1 logs one status line and changes nothing; SIGUSR2 is ignored. A burst of each (they
/// coalesce) is as harmless as one.
fn sigusr1_reports_and_sigusr2_is_ignored(model: &str) {
    let Some(mut server) = ServerBuilder::new(model)
        .args(&["--workers", "2"])
        .start_or_skip()
    else {
        return;
    };
    let mut stream = talking_client(&server);
    for _ in 0..20 {
        common::signal(server.pid(), libc::SIGUSR1);
        common::signal(server.pid(), libc::SIGUSR2);
    }
    server.wait_for_log("the status line", |log| log.contains("status (SIGUSR1)"));
    still_echoes(&mut stream, 3, "after SIGUSR1 and SIGUSR2");
    drop(stream);
    let data = payload::bytes(4, 10_000);
    common::assert_same(
        &round_trip(connect(server.addr), &data),
        &data,
        "a new client after the signals",
    );
    assert!(
        server.wait_timeout(Duration::from_millis(100)).is_none(),
        "{model}: exited after SIGUSR1/SIGUSR2:\n{}",
        server.log()
    );
    assert!(!server.log().contains("shutting down"), "{model}: drained");
    assert!(server.stop().success());
}

macro_rules! every_model {
    ($($model:ident),* $(,)?) => {$(
        mod $model {
            fn name() -> &'static str {
                stringify!($model).trim_start_matches("r#")
            }
            #[test]
            fn sighup_drains() { super::sighup_drains(name()) }
            #[test]
            fn sigusr1_reports_and_sigusr2_is_ignored() {
                super::sigusr1_reports_and_sigusr2_is_ignored(name())
            }
        }
    )*};
}

every_model!(iterative, process, prefork, thread, pool, epoll, r#async, uring);

// ---- no orphans: process and prefork ------------------------------------------------------

/// How the parent ends in an orphan test.
#[derive(Clone, Copy, Debug)]
enum ParentExit {
    /// SIGKILL: no handler runs, nothing is told.
    Kill,
    /// SIGINT twice: the forced exit, status 130.
    ForcedInterrupt,
    /// SIGTERM: the ordinary drain.
    Terminate,
    /// SIGHUP: drains like SIGTERM.
    Hangup,
}

const DRAIN: Duration = Duration::from_secs(3);

/// With a client busy on a child, the parent ends by `exit`: the port is free for a restart at
/// once, the children are gone within the shutdown timeout and a grace (at once after the
/// forced exit), and none of them outlives that.
fn no_child_outlives_its_parent(model: &str, exit: ParentExit) {
    let mut server = ServerBuilder::new(model)
        .args(&["--shutdown-timeout", "3s", "--workers", "2"])
        .start();
    let port = server.addr.port();
    let mut busy = talking_client(&server);
    let children = common::live_children(server.pid());
    assert!(!children.is_empty(), "{model}: no child serves the client");
    let pid = server.pid();
    match exit {
        ParentExit::Kill => common::signal(pid, libc::SIGKILL),
        ParentExit::ForcedInterrupt => {
            common::signal(pid, libc::SIGINT);
            server.wait_for_log("the drain", |log| log.contains("shutting down"));
            common::signal(pid, libc::SIGINT);
        }
        ParentExit::Terminate => common::signal(pid, libc::SIGTERM),
        ParentExit::Hangup => common::signal(pid, libc::SIGHUP),
    }
    let started = Instant::now();
    if matches!(exit, ParentExit::Kill) {
        // The parent is gone at once; its busy child still serves its client, for a while.
        server.wait_timeout(PATIENCE).expect("the killed parent");
        still_echoes(&mut busy, 5, "the orphaned child's client, while it drains");
    }
    // Stopped accepting at once: a restart on the same port works well before the drain ends.
    let deadline = Instant::now() + Duration::from_secs(1);
    while !port_is_free_for_a_restart(model, port) {
        assert!(
            Instant::now() < deadline,
            "{model} {exit:?}: port {port} still held 1 s after the parent's end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let limit = match exit {
        ParentExit::ForcedInterrupt => Duration::from_millis(1500),
        _ => DRAIN + Duration::from_millis(2500),
    };
    let gone = all_gone_within(&children, limit).unwrap_or_else(|| {
        panic!(
            "{model} {exit:?}: children {children:?} still run {limit:?} after the parent's end:\n{}",
            server.log()
        )
    });
    eprintln!("{model} {exit:?}: children gone {gone:?} after the signal");
    if !matches!(exit, ParentExit::ForcedInterrupt) {
        assert!(
            started.elapsed() >= DRAIN - Duration::from_millis(500),
            "{model} {exit:?}: the busy client was cut off before the shutdown timeout"
        );
    }
    if let Some(status) = server.wait_timeout(PATIENCE) {
        match exit {
            ParentExit::ForcedInterrupt => assert_eq!(status.code(), Some(130)),
            ParentExit::Terminate | ParentExit::Hangup => assert!(status.success()),
            ParentExit::Kill => {}
        }
    }
}

macro_rules! orphan_rows {
    ($($name:ident: $model:expr, $exit:expr;)*) => {$(
        #[test]
        fn $name() { no_child_outlives_its_parent($model, $exit) }
    )*};
}

orphan_rows! {
    process_sigkill_leaves_no_orphan: "process", ParentExit::Kill;
    process_forced_sigint_takes_the_children: "process", ParentExit::ForcedInterrupt;
    process_sigterm_leaves_no_orphan: "process", ParentExit::Terminate;
    process_sighup_leaves_no_orphan: "process", ParentExit::Hangup;
    prefork_sigkill_leaves_no_orphan: "prefork", ParentExit::Kill;
    prefork_forced_sigint_takes_the_children: "prefork", ParentExit::ForcedInterrupt;
    prefork_sigterm_leaves_no_orphan: "prefork", ParentExit::Terminate;
    prefork_sighup_leaves_no_orphan: "prefork", ParentExit::Hangup;
}

/// A terminal that goes away sends SIGHUP to the whole process group: the children must not
/// die from it (they ignore it), but drain as their parent tells them. The server runs in a
/// process group of its own so the signal reaches nothing else.
fn sighup_to_the_process_group_drains(model: &str) {
    let mut child = Command::new(BIN)
        .args(["serve", "--model", model, "--listen", "127.0.0.1:0"])
        .args(["--shutdown-timeout", "10s", "--workers", "2"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn multiecho serve");
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the server's log ended").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let mut stream = connect(addr);
    stream.write_all(b"hello").unwrap();
    expect_echo(&mut stream, b"hello", "first echo");
    let children = common::live_children(pid);
    assert!(!children.is_empty());
    // SAFETY: kill(2) on the server's own process group.
    unsafe { libc::kill(-(pid as i32), libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    still_echoes(&mut stream, 6, "after a SIGHUP to the process group");
    // (The echo above shows the busy child lives; an idle prefork worker may already be done.)
    assert!(
        children.iter().any(|&c| common::alive(c)),
        "{model}: the children died of the group's SIGHUP instead of draining"
    );
    drop(stream);
    let status = common::wait_child(&mut child, Duration::from_secs(8)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("{model}: no exit after the client left")
    });
    let log = rest.join().unwrap().join("\n");
    assert!(status.success(), "{model}: exit status {status}:\n{log}");
    assert!(
        all_gone_within(&children, Duration::from_secs(1)).is_some(),
        "{model}: children outlived their parent"
    );
}

#[test]
fn process_sighup_to_the_process_group_drains() {
    sighup_to_the_process_group_drains("process");
}

#[test]
fn prefork_sighup_to_the_process_group_drains() {
    sighup_to_the_process_group_drains("prefork");
}

// ---- values refused before anything starts ------------------------------------------------

#[test]
fn values_that_cannot_work_are_refused_before_anything_starts() {
    let cases: &[&[&str]] = &[
        &["serve", "--idle-timeout", "0"],
        &["serve", "--idle-timeout", "1ns"],
        &["serve", "--thread-stack", "18446744073709551615"],
        &["bench", "--rate", "1e-19", "127.0.0.1:9"],
        &["compare", "--models", "epoll", "--client-cpus", "4095"],
        &["compare", "--models", "epoll", "--server-cpus", "4095"],
        &[
            "compare",
            "--models",
            "epoll",
            "--external",
            "x=127.0.0.1:9@2147483647",
        ],
    ];
    let out_dir = std::env::temp_dir().join(format!("multiecho-refused-{}", std::process::id()));
    for args in cases {
        let output = Command::new(BIN)
            .args(*args)
            .args(if args[0] == "compare" {
                vec!["--out".to_string(), out_dir.display().to_string()]
            } else {
                vec![]
            })
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{args:?}: not one error line:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
        assert!(
            !stderr.contains("listening on") && !stderr.contains("starting"),
            "{args:?} started something before refusing:\n{stderr}"
        );
    }
    assert!(
        !out_dir.exists(),
        "compare wrote a report before refusing its flags"
    );
}
