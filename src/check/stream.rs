//! Checks of a connection over time: half-close (every byte, then EOF), a slow reader (the
//! client stops reading while it sends; nothing may be lost), and an idle pause (the
//! connection is still served afterwards).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::exchange::{self, bytes, hex, Plan, IO_TIMEOUT};
use super::payload::exchange_once;
use super::{Check, Context, Evidence, Finding};

/// Sent before the half-close.
const HALF_CLOSE_BYTES: usize = 256 * 1024;
/// Sent while the client does not read, and for how long it does not.
const SLOW_READER_BYTES: usize = 8 << 20;
const SLOW_READER_PAUSE: Duration = Duration::from_secs(2);

pub fn checks() -> Vec<Check> {
    vec![
        Check {
            name: "half_close",
            about: "after the client shuts its write side, every byte comes back, then EOF",
            run: half_close,
        },
        Check {
            name: "slow_reader",
            about: "8 MiB sent while the client reads nothing for 2 s all comes back",
            run: slow_reader,
        },
        Check {
            name: "idle",
            about: "a connection left silent for --idle-pause is still served",
            run: idle,
        },
    ]
}

fn judge(plan: Plan<'_>, outcome: &exchange::Outcome) -> Finding {
    let expected = plan.payload.len() as u64;
    let evidence = Evidence {
        sent: plan.describe(),
        received: outcome.describe(expected),
        first_difference: outcome.difference.as_ref().map(|d| d.to_string()),
    };
    if outcome.ok() {
        Finding::pass(outcome.summary(expected), evidence)
    } else {
        Finding::fail(outcome.summary(expected), evidence)
    }
}

fn half_close(ctx: &Context) -> Finding {
    let payload = crate::payload::bytes(0x4a1f, HALF_CLOSE_BYTES);
    let plan = Plan {
        half_close: true,
        ..Plan::new(&payload)
    };
    match exchange_once(ctx, plan) {
        Ok(outcome) => {
            let mut finding = judge(plan, &outcome);
            if outcome.ok() {
                finding.summary += ", then EOF";
            }
            finding
        }
        Err(finding) => finding,
    }
}

fn slow_reader(ctx: &Context) -> Finding {
    let payload = crate::payload::bytes(0x510e, SLOW_READER_BYTES);
    let plan = Plan {
        read_after: SLOW_READER_PAUSE,
        deadline: Duration::from_secs(30),
        ..Plan::new(&payload)
    };
    match exchange_once(ctx, plan) {
        Ok(outcome) => judge(plan, &outcome),
        Err(finding) => finding,
    }
}

fn idle(ctx: &Context) -> Finding {
    let pause = ctx.idle_pause;
    let sent = format!(
        "'before the pause' (17 B), waited for its echo, stayed silent for {pause:?}, \
         then 'after the pause' (16 B)"
    );
    let fail = |summary: String, received: String| Finding::fail_exchange(&sent, summary, received);
    let mut stream = match exchange::connect(ctx.target) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot connect: {e}"), e.to_string()),
    };
    if let Err(received) = echo(&mut stream, b"before the pause") {
        return fail(format!("not served before the pause: {received}"), received);
    }
    std::thread::sleep(pause);
    let after = Instant::now();
    match echo(&mut stream, b"after the pause") {
        Ok(()) => Finding::pass(
            format!("served after {pause:?} of silence"),
            Evidence {
                sent: sent.clone(),
                received: format!(
                    "both echoed; the second in {:.1} ms",
                    after.elapsed().as_secs_f64() * 1000.0
                ),
                first_difference: None,
            },
        ),
        Err(received) => fail(
            format!("not served after {pause:?} of silence: {received}"),
            format!("the first echo, then: {received}"),
        ),
    }
}

/// Sends `message` and reads exactly its echo; `Err` says what came instead.
fn echo(stream: &mut std::net::TcpStream, message: &[u8]) -> Result<(), String> {
    if let Err(e) = stream.write_all(message) {
        return Err(format!("sending failed: {e}"));
    }
    let mut got = Vec::with_capacity(message.len());
    let mut buf = [0u8; 256];
    while got.len() < message.len() {
        match stream.read(&mut buf) {
            Ok(0) => {
                return Err(format!(
                    "{} then EOF (the server closed the connection)",
                    bytes(got.len() as u64)
                ))
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if exchange::is_timeout(&e) => {
                return Err(format!(
                    "{}, then nothing for {}s",
                    bytes(got.len() as u64),
                    IO_TIMEOUT.as_secs()
                ))
            }
            Err(e) => return Err(format!("{}, then {e}", bytes(got.len() as u64))),
        }
    }
    if got != message {
        return Err(format!("wrong echo: {}", hex(&got)));
    }
    Ok(())
}
