//! Checks of many connections: distinct payloads on up to `--max-conns` connections at once
//! (crossed streams are detected and named), one connection's reset not disturbing the
//! others, and connect/close storms after which the server still serves.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::exchange::{self, bytes, End, Plan};
use super::{Check, Context, Evidence, Finding};

/// Connections of the `concurrent` check (fewer if `--max-conns` says so), and the bytes
/// each sends.
const CONCURRENT: usize = 500;
const CONCURRENT_BYTES: usize = 1024;
/// How long a connection of `concurrent` may wait for its first echo: a server that serves
/// one connection at a time (iterative) serves the last one only after all the others.
const CONCURRENT_STALL: Duration = Duration::from_secs(15);
/// Once every other connection is done, how long one that got nothing may wait before it
/// counts as never served (a one-at-a-time server would serve it at once by then).
const STARVED_AFTER: Duration = Duration::from_secs(5);
/// Connections opened and closed at once, and opened, used and closed, in `connect_storm`.
const STORM_BARE: usize = 200;
const STORM_USED: usize = 200;
const STORM_THREADS: usize = 8;

pub fn checks() -> Vec<Check> {
    vec![
        Check {
            name: "concurrent",
            about: "500 connections (--max-conns) at once, distinct payloads; crossed streams are named",
            run: concurrent,
        },
        Check {
            name: "reset_isolation",
            about: "a connection reset mid-echo does not disturb another one, or new ones",
            run: reset_isolation,
        },
        Check {
            name: "connect_storm",
            about: "hundreds of connections opened and closed at once; the server still serves",
            run: connect_storm,
        },
    ]
}

/// The payload of connection `i`: a label naming it, then fill of its own.
fn labelled_payload(i: usize, len: usize) -> Vec<u8> {
    let mut payload = crate::payload::bytes(0xc0_0000 + i as u64, len);
    let label = format!("connection {i:05} ");
    let n = label.len().min(len);
    payload[..n].copy_from_slice(&label.as_bytes()[..n]);
    payload
}

fn concurrent(ctx: &Context) -> Finding {
    let n = CONCURRENT.min(ctx.max_conns);
    let payloads: Vec<Vec<u8>> = (0..n)
        .map(|i| labelled_payload(i, CONCURRENT_BYTES))
        .collect();
    let sent = format!(
        "{n} connections opened together, each sending {} that starts 'connection NNNNN ' \
         with its own number",
        bytes(CONCURRENT_BYTES as u64)
    );
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        match exchange::connect(ctx.target) {
            Ok(s) => streams.push(s),
            Err(e) => {
                return Finding::fail(
                    format!("connection {i} of {n} could not connect: {e}"),
                    Evidence {
                        sent,
                        received: format!("{i} connections opened, then: {e}"),
                        first_difference: None,
                    },
                )
            }
        }
    }
    let clones: Vec<TcpStream> = streams.iter().filter_map(|s| s.try_clone().ok()).collect();
    let aborted = AtomicBool::new(false);
    let first_failure: Mutex<Option<(usize, exchange::Outcome, Instant)>> = Mutex::new(None);
    let done: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
    let starved = AtomicBool::new(false);
    let finished_before_starving = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let (done, starved, aborted, clones) = (&done, &starved, &aborted, &clones);
        let finished = &finished_before_starving;
        scope.spawn(move || {
            let count = watch_for_starvation(done, starved, aborted, clones);
            finished.store(count, Ordering::SeqCst);
        });
        for (i, stream) in streams.into_iter().enumerate() {
            let (payload, first_failure) = (&payloads[i], &first_failure);
            let spawned = std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || {
                    let plan = Plan {
                        stall: CONCURRENT_STALL,
                        deadline: ctx.bound(CONCURRENT_STALL * 2),
                        excess_wait: Duration::ZERO,
                        ..Plan::new(payload)
                    };
                    let outcome = exchange::run(stream, plan);
                    done[i].store(true, Ordering::SeqCst);
                    if outcome.ok() || aborted.swap(true, Ordering::SeqCst) {
                        return; // passed, or failed only because another one failed first
                    }
                    *first_failure.lock().unwrap() = Some((i, outcome, Instant::now()));
                    // One failure is the verdict: end the others now instead of waiting.
                    for other in clones {
                        let _ = other.shutdown(Shutdown::Both);
                    }
                });
            if spawned.is_err() {
                aborted.store(true, Ordering::SeqCst);
                for other in clones.iter() {
                    let _ = other.shutdown(Shutdown::Both);
                }
                break;
            }
        }
    });
    let Some((i, outcome, _)) = first_failure.into_inner().unwrap() else {
        if aborted.load(Ordering::SeqCst) {
            return Finding::fail(
                "could not start a thread per connection (try a smaller --max-conns)",
                Evidence {
                    sent,
                    received: "nothing: the check did not run".into(),
                    first_difference: None,
                },
            );
        }
        return Finding::pass(
            format!("{n} connections echoed their own bytes"),
            Evidence {
                sent,
                received: format!(
                    "every connection got exactly its own bytes back, {:.2}s in all",
                    started.elapsed().as_secs_f64()
                ),
                first_difference: None,
            },
        );
    };
    let expected = CONCURRENT_BYTES as u64;
    if starved.load(Ordering::SeqCst) {
        let waiting = n - finished_before_starving.load(Ordering::SeqCst);
        return Finding::fail(
            format!(
                "connection {i} was never served: nothing came back {}s after every other \
                 connection was done",
                STARVED_AFTER.as_secs()
            ),
            Evidence {
                sent,
                received: format!(
                    "connection {i}: {} of {}; {waiting} of {n} connections were still waiting \
                     (the others got their own bytes back)",
                    bytes(outcome.received),
                    bytes(expected),
                ),
                first_difference: None,
            },
        );
    }
    let origin = outcome.difference.as_ref().and_then(|d| {
        let at = d.offset as usize;
        (0..n).find(|&j| j != i && payloads[j][at..].starts_with(&d.got))
    });
    let summary = match (&outcome.end, origin) {
        (_, Some(j)) => format!(
            "crossed streams: connection {i} got connection {j}'s bytes at offset {}",
            outcome.difference.as_ref().map_or(0, |d| d.offset)
        ),
        (End::Excess(extra), None) => {
            format!("connection {i} got {extra} bytes more than it sent (another connection's?)")
        }
        (_, None) => format!("connection {i}: {}", outcome.summary(expected)),
    };
    Finding::fail(
        summary,
        Evidence {
            sent,
            received: format!("connection {i}: {}", outcome.describe(expected)),
            first_difference: outcome.difference.as_ref().map(|d| match origin {
                Some(j) => format!("{d} (connection {j}'s bytes at that offset)"),
                None => d.to_string(),
            }),
        },
    )
}

/// Ends the `concurrent` check when the only connections left have waited [`STARVED_AFTER`]
/// since the last one finished: they are not being served at all. Returns how many had
/// finished.
fn watch_for_starvation(
    done: &[AtomicBool],
    starved: &AtomicBool,
    aborted: &AtomicBool,
    clones: &[TcpStream],
) -> usize {
    let (mut finished, mut since) = (0, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now_finished = done.iter().filter(|d| d.load(Ordering::SeqCst)).count();
        if now_finished == done.len() || aborted.load(Ordering::SeqCst) {
            return now_finished;
        }
        if now_finished != finished {
            (finished, since) = (now_finished, Instant::now());
        } else if since.elapsed() >= STARVED_AFTER {
            starved.store(true, Ordering::SeqCst);
            for other in clones {
                let _ = other.shutdown(Shutdown::Both);
            }
            return now_finished;
        }
    }
}

/// Sends `message` and expects exactly its echo back.
fn echo_on(stream: TcpStream, message: &[u8]) -> exchange::Outcome {
    exchange::run(
        stream,
        Plan {
            excess_wait: Duration::ZERO,
            ..Plan::new(message)
        },
    )
}

fn reset_isolation(ctx: &Context) -> Finding {
    let sent = "connection A: 'alpha one'; connection B: as much as it takes without reading, \
                then reset (SO_LINGER 0); A: 'alpha two'; A closed; a new connection C: \
                'charlie'"
        .to_string();
    let fail = |summary: String, received: String| Finding::fail_exchange(&sent, summary, received);
    let mut a = match exchange::connect(ctx.target) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot connect A: {e}"), e.to_string()),
    };
    if let Err(e) = echo_exact(&mut a, b"alpha one") {
        return fail(format!("A not served at first: {e}"), e);
    }
    let b = match exchange::connect(ctx.target) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot connect B: {e}"), e.to_string()),
    };
    let pushed = push_then_reset(b);
    if let Err(e) = echo_exact(&mut a, b"alpha two") {
        return fail(
            format!("A disturbed by B's reset: {e}"),
            format!(
                "A's first echo, B reset after {}, then A: {e}",
                bytes(pushed)
            ),
        );
    }
    drop(a);
    let c = match exchange::connect(ctx.target) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                format!("cannot connect C after the reset: {e}"),
                e.to_string(),
            )
        }
    };
    let outcome = echo_on(c, b"charlie");
    if !outcome.ok() {
        return fail(
            format!("a new connection after the reset: {}", outcome.summary(7)),
            format!("A served; C: {}", outcome.describe(7)),
        );
    }
    Finding::pass(
        "a reset connection disturbed neither a live one nor a new one",
        Evidence {
            sent: sent.clone(),
            received: format!(
                "A's both echoes, B reset after {} unread, C's echo",
                bytes(pushed)
            ),
            first_difference: None,
        },
    )
}

/// Writes to `stream` without reading until the kernel takes no more (or 4 MiB), then resets
/// it. Returns the bytes written.
fn push_then_reset(stream: TcpStream) -> u64 {
    let chunk = crate::payload::bytes(0xb, 64 * 1024);
    let mut pushed = 0u64;
    if stream.set_nonblocking(true).is_ok() {
        let mut writer = &stream;
        while pushed < 4 << 20 {
            match writer.write(&chunk) {
                Ok(n) => pushed += n as u64,
                Err(_) => break, // full (EAGAIN) or already gone
            }
        }
    }
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream); // SO_LINGER 0: close sends RST
    pushed
}

/// Sends `message` on a connection that stays open and reads exactly its echo.
fn echo_exact(stream: &mut TcpStream, message: &[u8]) -> Result<(), String> {
    use std::io::Read;
    stream
        .write_all(message)
        .map_err(|e| format!("sending failed: {e}"))?;
    let mut got = vec![0u8; message.len()];
    let mut at = 0;
    while at < got.len() {
        match stream.read(&mut got[at..]) {
            Ok(0) => return Err(format!("{at} B of the echo, then EOF")),
            Ok(n) => at += n,
            Err(e) if exchange::is_timeout(&e) => {
                return Err(format!("{at} B of the echo, then nothing"))
            }
            Err(e) => return Err(format!("{at} B of the echo, then {e}")),
        }
    }
    if got != message {
        return Err(format!("wrong echo: {}", exchange::hex(&got)));
    }
    Ok(())
}

fn connect_storm(ctx: &Context) -> Finding {
    let threads = STORM_THREADS.min(ctx.max_conns);
    let sent = format!(
        "{STORM_BARE} connections opened and closed at once (half of them with a reset), then \
         {STORM_USED} more from {threads} threads, each sending 32 B, reading the echo and \
         closing; then one more connection"
    );
    let fail = |summary: String, received: String| Finding::fail_exchange(&sent, summary, received);
    let started = Instant::now();
    for i in 0..STORM_BARE {
        match exchange::connect(ctx.target) {
            Ok(stream) if i % 2 == 1 => {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
            Ok(_) => {}
            Err(e) => {
                return fail(
                    format!("bare connection {i} could not connect: {e}"),
                    format!("{i} connections opened and closed, then: {e}"),
                )
            }
        }
    }
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let failure = &failure;
            scope.spawn(move || {
                for i in (t..STORM_USED).step_by(threads) {
                    if failure.lock().unwrap().is_some() {
                        return;
                    }
                    let message = labelled_payload(i, 32);
                    let outcome = match exchange::connect(ctx.target) {
                        Ok(stream) => echo_on(stream, &message),
                        Err(e) => {
                            *failure.lock().unwrap() = Some(format!("connection {i}: {e}"));
                            return;
                        }
                    };
                    if !outcome.ok() {
                        let mut failure = failure.lock().unwrap();
                        failure.get_or_insert(format!("connection {i}: {}", outcome.describe(32)));
                        return;
                    }
                }
            });
        }
    });
    if let Some(why) = failure.into_inner().unwrap() {
        return fail(format!("during the storm: {why}"), why);
    }
    let after = match exchange::connect(ctx.target) {
        Ok(stream) => echo_on(stream, b"after the storm"),
        Err(e) => return fail(format!("no connection after the storm: {e}"), e.to_string()),
    };
    if !after.ok() {
        return fail(
            format!("after the storm: {}", after.summary(15)),
            after.describe(15),
        );
    }
    Finding::pass(
        format!(
            "{} connections in {:.2}s; still serving",
            STORM_BARE + STORM_USED + 1,
            started.elapsed().as_secs_f64()
        ),
        Evidence {
            sent: sent.clone(),
            received: "every echo intact, and the last connection served".into(),
            first_difference: None,
        },
    )
}
