//! What only the io_uring model is tested for: many concurrent connections whose echoes
//! share a small buffer pool (the buffer-recycling corruption case), partial sends, a pool
//! run dry, clients that never read, the buffer-count setting, refusing to start where
//! io_uring is blocked, and connections shared between the rings. What it shares with every
//! model is in tests/models.rs, its counters in tests/in_process.rs. Each test is skipped,
//! with a message, where the server reports that io_uring is unavailable; any other failure
//! to start fails the test.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::Duration;

use common::{assert_same, connect, round_trip, Server, ServerBuilder, PATIENCE};
use multiecho::payload;
use multiecho::server::uring::{BUFFERS_ENV, SINGLE_RECV_ENV};

/// 1,000 connections at once, each sending a distinct payload of a few KiB in several
/// writes: far more data in flight than a worker's buffer pool holds, so buffers are recycled
/// all the time and receives run out of buffers. Every byte must come back on its own
/// connection, in order.
#[test]
fn thousand_concurrent_connections_are_echoed_byte_exact() {
    thousand_concurrent_connections(&[]);
}

/// The same with one recv per message, the path kernels before 6.16 take.
#[test]
fn thousand_concurrent_connections_with_single_recvs() {
    thousand_concurrent_connections(&[(SINGLE_RECV_ENV, "1")]);
}

fn thousand_concurrent_connections(envs: &[(&str, &str)]) {
    multiecho::net::raise_open_files_limit().expect("raise the open files limit");
    let Some(server) = start_with_env(&["--workers", "1", "--backlog", "2048"], envs) else {
        return;
    };
    const CONNECTIONS: usize = 1000;
    const THREADS: usize = 10;
    let addr = server.addr;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                let ids: Vec<usize> = (t..CONNECTIONS).step_by(THREADS).collect();
                let mut streams: Vec<_> = ids.iter().map(|_| connect(addr)).collect();
                let payloads: Vec<Vec<u8>> = ids
                    .iter()
                    .map(|&id| {
                        let len = 2048 + (id * 37) % 6144;
                        payload::bytes(1000 + id as u64, len)
                    })
                    .collect();
                // Interleave the writes: every connection has its first chunk in flight
                // before any sends its second.
                const CHUNKS: usize = 4;
                for chunk in 0..CHUNKS {
                    for (stream, data) in streams.iter_mut().zip(&payloads) {
                        let step = data.len().div_ceil(CHUNKS);
                        let start = (chunk * step).min(data.len());
                        let end = ((chunk + 1) * step).min(data.len());
                        stream.write_all(&data[start..end]).unwrap();
                    }
                }
                for stream in &streams {
                    stream.shutdown(Shutdown::Write).unwrap();
                }
                expect_echoes(&mut streams, &payloads, &ids);
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("client thread");
    }
    server.wait_for_log("all connections logged", |log| {
        log.matches("connection closed").count() >= CONNECTIONS
    });
    assert!(server.stop().success());
}

/// A client that reads its echo late makes the server's sends partial (its socket buffers
/// fill up); each partial send must be continued from exactly the first unsent byte.
#[test]
fn a_late_reader_gets_every_byte_after_partial_sends() {
    let Some(server) = ServerBuilder::new("uring")
        .args(&["--workers", "1"])
        .start_or_skip()
    else {
        return;
    };
    let stream = connect(server.addr);
    let mut writer = stream.try_clone().unwrap();
    let data = payload::bytes(11, 4 << 20);
    let sent = data.clone();
    let sender = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    thread::sleep(Duration::from_millis(300));
    let mut reader = stream;
    let mut echoed = Vec::with_capacity(data.len());
    // Read in small pieces, so the server keeps meeting a nearly full socket.
    let mut piece = [0u8; 3000];
    loop {
        let n = reader.read(&mut piece).expect("read the echo");
        if n == 0 {
            break;
        }
        echoed.extend_from_slice(&piece[..n]);
    }
    sender.join().unwrap();
    assert_same(&echoed, &data, "4 MiB read late");
    assert!(server.stop().success());
}

/// Where io_uring is blocked (here by a seccomp filter that fails io_uring_setup with EPERM,
/// as container runtimes do), the server refuses to start, before it listens, with one clear
/// line and a non-zero exit status.
#[cfg(target_arch = "x86_64")]
#[test]
fn refuses_to_start_with_one_clear_line_where_io_uring_is_blocked() {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut command = Command::new(common::BIN);
    command
        .args(["serve", "--model", "uring", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the hook only calls prctl(2) on data on its own stack, which is allowed between
    // fork and exec.
    unsafe { command.pre_exec(block_io_uring_setup) };
    let mut child = command.spawn().expect("spawn multiecho serve");
    let status = common::wait_or_kill(&mut child, "a server whose io_uring_setup fails");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    assert!(
        lines[0].contains("io_uring is not available on this system"),
        "{stderr}"
    );
}

/// Installs a seccomp filter failing io_uring_setup (425 on x86_64) with EPERM.
#[cfg(target_arch = "x86_64")]
fn block_io_uring_setup() -> std::io::Result<()> {
    const IO_URING_SETUP: u32 = 425;
    let statement = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let mut filter = [
        // Load the system call number (offset 0 of struct seccomp_data).
        statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        statement(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            IO_URING_SETUP,
            0,
            1,
        ),
        statement(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            0,
            0,
        ),
        statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW, 0, 0),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: prctl with these options reads only `program`, which outlives the calls.
    let failed = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ) != 0
    };
    if failed {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// With a pool of only 4 buffers, 200 clients sending at once keep running the pool dry:
/// receives fail with ENOBUFS and must be re-armed when buffers come back, never dropped, and
/// every echo must still be exact.
#[test]
fn a_dry_buffer_pool_delays_receives_but_loses_nothing() {
    let Some(mut server) = start_with_env(&["--workers", "1"], &[(BUFFERS_ENV, "4")]) else {
        return;
    };
    const CONNECTIONS: usize = 200;
    let addr = server.addr;
    let handles: Vec<_> = (0..4)
        .map(|t| {
            thread::spawn(move || {
                let ids: Vec<usize> = (t..CONNECTIONS).step_by(4).collect();
                let mut streams: Vec<_> = ids.iter().map(|_| connect(addr)).collect();
                let payloads: Vec<Vec<u8>> = ids
                    .iter()
                    .map(|&id| payload::bytes(5000 + id as u64, 20_000 + id * 101))
                    .collect();
                for (stream, data) in streams.iter_mut().zip(&payloads) {
                    stream.write_all(data).unwrap();
                    stream.shutdown(Shutdown::Write).unwrap();
                }
                expect_echoes(&mut streams, &payloads, &ids);
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("client thread");
    }
    server.terminate();
    assert!(server.wait_timeout(PATIENCE).expect("exit").success());
    let log = server.log();
    let waits: u64 = worker_summaries(&log, "buffer_waits").iter().sum();
    assert!(
        waits > 0,
        "the pool never ran dry, so this tested nothing; log:\n{log}"
    );
}

/// A connection's multishot recv keeps taking buffers while its echo is stuck; it must be
/// stopped at once, so that clients that never read hold only a couple of buffers each and
/// cannot drain the pool for everyone. Six such clients with a pool of 16 buffers: a new
/// client is still echoed.
#[test]
fn clients_that_never_read_cannot_drain_the_buffer_pool() {
    clients_that_never_read(&[]);
}

/// The same with one recv per message, the path kernels before 6.16 take.
#[test]
fn clients_that_never_read_cannot_drain_the_pool_with_single_recvs() {
    clients_that_never_read(&[(SINGLE_RECV_ENV, "1")]);
}

fn clients_that_never_read(envs: &[(&str, &str)]) {
    let mut envs = envs.to_vec();
    envs.push((BUFFERS_ENV, "16"));
    let Some(mut server) = start_with_env(&["--workers", "1"], &envs) else {
        return;
    };
    let stalled: Vec<_> = (0..6)
        .map(|_| {
            let stream = connect(server.addr);
            common::push_until_blocked(&stream);
            stream
        })
        .collect();
    let data = payload::bytes(77, 256 * 1024);
    assert_same(
        &round_trip(connect(server.addr), &data),
        &data,
        "a client beside six stalled ones",
    );
    drop(stalled);
    server.terminate();
    assert!(server.wait_timeout(PATIENCE).expect("exit").success());
}

/// Issue 9 item 2 at a small scale: with 8 buffers and 40 clients that fill their
/// connections and never read, a well-behaved client still gets every echo promptly. Each
/// stalled echo used to keep a pool buffer inside a send waiting for room, until none was
/// left for anyone; now it moves into the connection's own buffer (counted as `own_sends`).
#[test]
fn never_reading_clients_cannot_starve_a_well_behaved_one() {
    never_reading_clients_beside_a_good_one(&[]);
}

/// The same with one recv per message, the path kernels before 6.16 take.
#[test]
fn never_reading_clients_cannot_starve_a_well_behaved_one_with_single_recvs() {
    never_reading_clients_beside_a_good_one(&[(SINGLE_RECV_ENV, "1")]);
}

fn never_reading_clients_beside_a_good_one(envs: &[(&str, &str)]) {
    let mut envs = envs.to_vec();
    envs.push((BUFFERS_ENV, "8"));
    let Some(mut server) = start_with_env(&["--workers", "1"], &envs) else {
        return;
    };
    common::well_behaved_client_beside_never_reading_ones(server.addr, 40);
    server.terminate();
    assert!(server.wait_timeout(PATIENCE).expect("exit").success());
    let log = server.log();
    let own_sends: u64 = worker_summaries(&log, "own_sends").iter().sum();
    assert!(
        own_sends > 0,
        "the stalled echoes did not move out of the pool, so this tested nothing; log:\n{log}"
    );
}

/// An invalid buffer count is refused with one clear line before the server listens.
#[test]
fn an_invalid_buffer_count_is_refused_before_listening() {
    for bad in ["0", "3", "65536", "many"] {
        let output = std::process::Command::new(common::BIN)
            .args(["serve", "--model", "uring", "--listen", "127.0.0.1:0"])
            .env(BUFFERS_ENV, bad)
            .output()
            .expect("run the server");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if common::uring_unavailable(&stderr) {
            common::skip_unless_ci(&format!(
                "io_uring is unavailable here; the server said:\n{stderr}"
            ));
            return;
        }
        assert!(!output.status.success(), "{BUFFERS_ENV}={bad} was accepted");
        assert!(
            !stderr.contains("listening on"),
            "{BUFFERS_ENV}={bad}: listened before refusing:\n{stderr}"
        );
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one error line expected:\n{stderr}");
        assert!(
            lines[0].contains(&format!("invalid {BUFFERS_ENV}={bad}")),
            "the line names the value: {}",
            lines[0]
        );
    }
}

/// The kernel gives every new connection to the first armed multishot accept, so without
/// hand-over one ring would serve them all. With two workers, 100 clients connected at once
/// must be shared between them.
#[test]
fn connections_are_shared_between_the_rings() {
    let Some(mut server) = start_with_env(&["--workers", "2"], &[]) else {
        return;
    };
    let clients: Vec<_> = (0..100).map(|_| connect(server.addr)).collect();
    for (i, client) in clients.into_iter().enumerate() {
        let data = payload::bytes(900 + i as u64, 100);
        assert_same(&round_trip(client, &data), &data, "echo");
    }
    server.terminate();
    assert!(server.wait_timeout(PATIENCE).expect("exit").success());
    let log = server.log();
    let served = worker_summaries(&log, "served");
    assert_eq!(
        served.len(),
        2,
        "two worker summaries expected; log:\n{log}"
    );
    assert_eq!(served.iter().sum::<u64>(), 100);
    assert!(
        served.iter().all(|&n| n >= 30),
        "connections were not shared: {served:?}"
    );
}

/// Starts a uring server with extra environment variables and debug logging for the uring
/// module (its per-worker summary counts buffer waits), or returns `None` (after saying so)
/// where io_uring is unavailable.
fn start_with_env(extra: &[&str], envs: &[(&str, &str)]) -> Option<Server> {
    ServerBuilder::new("uring")
        .args(extra)
        .envs(envs)
        .env("RUST_LOG", "info,multiecho::server::uring=debug")
        .start_or_skip()
}

/// Reads each stream to its end and checks it echoed its payload (`ids` name them).
fn expect_echoes(streams: &mut [TcpStream], payloads: &[Vec<u8>], ids: &[usize]) {
    for ((stream, data), id) in streams.iter_mut().zip(payloads).zip(ids) {
        let mut echoed = Vec::with_capacity(data.len());
        stream.read_to_end(&mut echoed).expect("read the echo");
        assert_same(&echoed, data, &format!("connection {id}"));
    }
}

/// `field` of every "worker stopped" debug line in `log` (one per worker).
fn worker_summaries(log: &str, field: &str) -> Vec<u64> {
    let prefix = format!("{field}=");
    log.lines()
        .filter(|l| l.contains("worker stopped"))
        .filter_map(|l| l.split(prefix.as_str()).nth(1))
        .filter_map(|v| {
            v.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .collect()
}

/// A client beyond `--max-conns` may have been taken by another ring's multishot accept than
/// the ring whose connection ends (it waits parked there); it is served all the same, because
/// every ring watches the limit's room descriptor. Clients that connect one after another,
/// each echoed before the next connects, make that the usual case: the first ring serves both
/// and cancels its accept at the limit, and the other ring's accept, still armed, takes the
/// third.
#[test]
fn a_freed_slot_reaches_a_client_parked_by_another_ring() {
    let Some(server) = ServerBuilder::new("uring")
        .args(&["--max-conns", "2", "--workers", "2"])
        .start_or_skip()
    else {
        return;
    };
    let mut served = Vec::new();
    for byte in [b"1", b"2"] {
        let mut stream = connect(server.addr);
        stream.write_all(byte).unwrap();
        common::expect_echo(&mut stream, byte, "a client within the limit");
        served.push(stream);
    }
    let mut third = connect(server.addr);
    third.write_all(b"3").unwrap();
    assert!(
        !common::receives_within(&mut third, Duration::from_millis(300)),
        "a third client was served despite --max-conns 2"
    );
    drop(served.remove(0));
    common::expect_echo(&mut third, b"3", "the third client, once a slot freed");
    // And the slot the second frees is used again.
    drop(served.remove(0));
    let mut fourth = connect(server.addr);
    fourth.write_all(b"4").unwrap();
    common::expect_echo(&mut fourth, b"4", "a fourth client");
    drop((third, fourth));
    assert!(server.stop().success());
}
