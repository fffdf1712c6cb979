//! Checks of what one connection carries: payload sizes from 1 B to 64 MiB, every byte
//! value, a client that sends in 1-byte pieces, and pipelining (many messages sent without
//! waiting for their echoes).

use std::time::Duration;

use super::exchange::{self, bytes, Plan};
use super::{Check, Context, Evidence, Finding};

/// Messages in the `pipelining` check, and the size of each.
const PIPELINED: usize = 1000;
const PIPELINED_SIZE: usize = 64;
/// Bytes sent one per write in `one_byte_pieces`.
const PIECES: usize = 2000;

pub fn checks() -> Vec<Check> {
    vec![
        Check {
            name: "byte_values",
            about: "all 256 byte values, in three orders, come back unchanged",
            run: byte_values,
        },
        Check {
            name: "one_byte_pieces",
            about: "2,000 bytes sent one byte per write come back in order",
            run: one_byte_pieces,
        },
        Check {
            name: "pipelining",
            about: "1,000 messages sent without waiting for echoes all come back, in order",
            run: pipelining,
        },
        Check {
            name: "sizes",
            about: "payloads from 1 B to 64 MiB (--max-size), one connection each, echo intact",
            run: sizes,
        },
    ]
}

/// Runs one exchange of `plan` on a new connection; a failed connect is a failure too.
pub fn exchange_once(ctx: &Context, plan: Plan<'_>) -> Result<exchange::Outcome, Finding> {
    let stream = exchange::connect(ctx.target).map_err(|e| {
        Finding::fail(
            format!("cannot connect: {e}"),
            Evidence {
                sent: "nothing (connect failed)".into(),
                received: e.to_string(),
                first_difference: None,
            },
        )
    })?;
    let plan = Plan {
        deadline: ctx.bound(plan.deadline),
        ..plan
    };
    Ok(exchange::run(stream, plan))
}

/// The finding of a single exchange; `locate` may add what the offset means.
fn judge(plan: Plan<'_>, outcome: &exchange::Outcome, locate: impl Fn(u64) -> String) -> Finding {
    let expected = plan.payload.len() as u64;
    let evidence = Evidence {
        sent: plan.describe(),
        received: outcome.describe(expected),
        first_difference: outcome
            .difference
            .as_ref()
            .map(|d| format!("{d}{}", locate(d.offset))),
    };
    if outcome.ok() {
        Finding::pass(outcome.summary(expected), evidence)
    } else {
        let mut summary = outcome.summary(expected);
        match &outcome.difference {
            Some(d) => summary += &locate(d.offset),
            None if outcome.received < expected => summary += &locate(outcome.received),
            None => {}
        }
        Finding::fail(summary, evidence)
    }
}

fn byte_values(ctx: &Context) -> Finding {
    let mut payload: Vec<u8> = (0..=255u8).collect();
    payload.extend((0..=255u8).rev());
    // A scrambled order, so no byte always follows the same neighbour.
    payload.extend((0..=255u8).map(|b| b.wrapping_mul(167).wrapping_add(13)));
    let plan = Plan::new(&payload);
    match exchange_once(ctx, plan) {
        Ok(outcome) => judge(plan, &outcome, |offset| {
            format!(" (byte value 0x{:02x})", payload[offset.min(767) as usize])
        }),
        Err(finding) => finding,
    }
}

fn one_byte_pieces(ctx: &Context) -> Finding {
    let payload = crate::payload::bytes(0x0b1e, PIECES);
    let plan = Plan {
        piece: 1,
        ..Plan::new(&payload)
    };
    match exchange_once(ctx, plan) {
        Ok(outcome) => judge(plan, &outcome, |_| String::new()),
        Err(finding) => finding,
    }
}

/// Message `i` of the pipelining check: its number in ASCII, then pseudo-random fill.
fn pipelined_messages() -> Vec<u8> {
    let mut payload = crate::payload::bytes(0x919e, PIPELINED * PIPELINED_SIZE);
    for (i, message) in payload.chunks_mut(PIPELINED_SIZE).enumerate() {
        let label = format!("message {i:04} ");
        message[..label.len()].copy_from_slice(label.as_bytes());
    }
    payload
}

fn pipelining(ctx: &Context) -> Finding {
    let payload = pipelined_messages();
    let plan = Plan {
        piece: PIPELINED_SIZE,
        ..Plan::new(&payload)
    };
    match exchange_once(ctx, plan) {
        Ok(outcome) => judge(plan, &outcome, |offset| {
            let message = offset as usize / PIPELINED_SIZE;
            format!(
                " (message {message} of {PIPELINED}, byte {})",
                offset as usize % PIPELINED_SIZE
            )
        }),
        Err(finding) => finding,
    }
}

/// The payload sizes `sizes` tries, up to `max`.
fn size_ladder(max: usize) -> Vec<usize> {
    let mut ladder: Vec<usize> = [1, 100, 1 << 10, (64 << 10) + 1, 1 << 20, 16 << 20, 64 << 20]
        .into_iter()
        .filter(|&n| n <= max)
        .collect();
    if ladder.last() != Some(&max) {
        ladder.push(max);
    }
    ladder
}

fn sizes(ctx: &Context) -> Finding {
    let ladder = size_ladder(ctx.max_size);
    let names: Vec<String> = ladder.iter().map(|&n| bytes(n as u64)).collect();
    let mut total = Duration::ZERO;
    for &size in &ladder {
        let payload = crate::payload::bytes(size as u64, size);
        let plan = Plan {
            deadline: Duration::from_secs(30),
            ..Plan::new(&payload)
        };
        let outcome = match exchange_once(ctx, plan) {
            Ok(outcome) => outcome,
            Err(finding) => return finding,
        };
        total += Duration::from_secs_f64(outcome.secs);
        if !outcome.ok() {
            let mut finding = judge(plan, &outcome, |_| String::new());
            finding.summary = format!("{}: {}", bytes(size as u64), finding.summary);
            return finding;
        }
    }
    Finding::pass(
        format!(
            "{} payloads up to {} echoed intact",
            ladder.len(),
            names.last().unwrap()
        ),
        Evidence {
            sent: format!("payloads of {}, one connection each", names.join(", ")),
            received: format!("each echoed intact, {:.2}s in all", total.as_secs_f64()),
            first_difference: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_ends_at_the_maximum() {
        assert_eq!(size_ladder(1), vec![1]);
        assert_eq!(size_ladder(5000), vec![1, 100, 1024, 5000]);
        assert_eq!(*size_ladder(64 << 20).last().unwrap(), 64 << 20);
    }

    #[test]
    fn pipelined_messages_are_numbered() {
        let payload = pipelined_messages();
        assert_eq!(payload.len(), PIPELINED * PIPELINED_SIZE);
        assert!(payload[PIPELINED_SIZE * 7..].starts_with(b"message 0007 "));
    }
}
