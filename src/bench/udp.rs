//! `multiecho bench udp://HOST:PORT`: the verifying load generator for UDP echo.
//!
//! `--conns N` flows, each on its own socket (so its own source port). Every datagram is
//! `--size` bytes: its flow and sequence number (8 bytes each, little-endian), then a fill
//! regenerated from the run's seed, the flow and the sequence number, so every byte of every
//! echo is checked without keeping a copy. Closed loop: `--pipeline` datagrams in flight per
//! flow, a datagram not back within `--udp-timeout` counts as lost and frees its place. Open
//! loop (`--rate`): datagrams go out on a fixed schedule whatever comes back; latency runs
//! from the scheduled time.
//!
//! Networks lose, duplicate and reorder datagrams, so those are counted (`lost`,
//! `duplicates`, `reordered`: an echo whose sequence number is below the highest already
//! received on its flow), not failures, unless `--max-loss` is exceeded. A datagram that is
//! corrupted, truncated or names a flow or sequence number never sent is a mismatch, reported
//! with its flow and sequence number, and the exit status is non-zero.
//!
//! `--udp-gso N`: a flow sends up to N datagrams at once as a segment train, one `sendmsg`
//! with a `UDP_SEGMENT` control message of `--size`, which the kernel sends as N datagrams
//! (each with its own flow, sequence number and fill, so nothing above changes). Closed loop:
//! a flow waits until a whole train fits in `--pipeline` (or the quota's rest); open loop: the
//! datagrams due go together, up to N. The bench's sockets do not set `UDP_GRO`, so echoes
//! arrive one datagram per receive, and each is checked as before.
//!
//! `--warmup`: the load runs that long before the measured window; echoes of datagrams sent
//! during it are still checked byte by byte but not counted (nor are those lost), so every
//! figure is of the window alone.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};

use super::report::Latency;
use super::BenchPlan;
use crate::payload::Rng;

/// Flow and sequence number.
pub const HEADER: usize = 16;
/// The largest datagram over IPv4.
pub const MAX_SIZE: usize = 65_507;
/// Datagrams one `UDP_SEGMENT` send may carry (the kernel's `UDP_MAX_SEGMENTS` before 6.x
/// raised it; the same figure as its GRO limit).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Sequence numbers remembered per flow, to tell a duplicate from a late echo.
const WINDOW: usize = 1 << 16;

/// The bytes of datagram `seq` of `flow`.
pub fn datagram(seed: u64, flow: u64, seq: u64, size: usize, buf: &mut Vec<u8>) {
    buf.clear();
    buf.resize(size, 0);
    buf[..8].copy_from_slice(&flow.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    let mix = seed ^ flow.rotate_left(40) ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    Rng::new(mix).fill(&mut buf[HEADER..]);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    InFlight(Instant),
    Back,
    Lost,
}

/// One flow: its socket and what it has sent.
struct Flow {
    id: u64,
    socket: mio::net::UdpSocket,
    /// States of sequence numbers `base..next`.
    states: VecDeque<State>,
    base: u64,
    next: u64,
    in_flight: usize,
    /// Sequence numbers below this were checked for expiry.
    expired_to: u64,
    highest_back: Option<u64>,
    /// Open loop: when the next datagram is due.
    due: Instant,
    interval: Duration,
    /// The first sequence number sent in the measured window (the earlier ones are warm-up).
    first_measured: u64,
}

/// What the run found (summed over threads).
#[derive(Default)]
struct Tally {
    sent: u64,
    back: u64,
    bytes: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    late: u64,
    mismatches: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Option<Histogram<u64>>,
}

impl Tally {
    fn fail(&mut self, mismatch: bool, what: String) {
        if mismatch {
            self.mismatches += 1;
        } else {
            self.errors += 1;
        }
        self.first_error.get_or_insert(what);
    }

    /// Forgets what the warm-up counted (mismatches and errors are kept: they always fail).
    fn start_measuring(&mut self) {
        *self = Tally {
            mismatches: self.mismatches,
            errors: self.errors,
            first_error: self.first_error.take(),
            latency: self.latency.take().map(|mut hist| {
                hist.reset();
                hist
            }),
            ..Tally::default()
        };
    }

    fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        self.back += other.back;
        self.bytes += other.bytes;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.reordered += other.reordered;
        self.late += other.late;
        self.mismatches += other.mismatches;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        match (&mut self.latency, other.latency) {
            (Some(mine), Some(theirs)) => {
                let _ = mine.add(&theirs);
            }
            (mine @ None, theirs) => *mine = theirs,
            _ => {}
        }
    }
}

/// The UDP report: the usual figures plus what the network did.
#[derive(Debug, Serialize, Deserialize)]
pub struct UdpReport {
    /// Echoes received back intact in the run.
    pub requests: u64,
    pub sent: u64,
    pub duration_secs: f64,
    pub requests_per_sec: f64,
    pub bytes_per_sec: f64,
    pub latency_us: Latency,
    pub lost: u64,
    pub loss_percent: f64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Echoes that came back after they were counted as lost.
    pub late: u64,
    pub mismatches: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub interrupted: bool,
    pub config: UdpConfig,
}

/// How the UDP run was set up.
#[derive(Debug, Serialize, Deserialize)]
pub struct UdpConfig {
    pub addr: String,
    pub flows: usize,
    pub size: usize,
    pub pipeline: usize,
    pub rate: Option<f64>,
    pub udp_timeout_ms: f64,
    pub threads: usize,
    /// Datagrams per send (`--udp-gso`; 1: one send each).
    #[serde(default = "one")]
    pub udp_gso: usize,
}

fn one() -> usize {
    1
}

struct Plan {
    addr: SocketAddr,
    seed: u64,
    size: usize,
    pipeline: usize,
    /// Datagrams per send, at most.
    gso: usize,
    timeout: Duration,
    /// The end of the warm-up: counting starts here.
    measure_from: Instant,
    end: Option<Instant>,
    /// Datagrams this thread sends in all (with `--requests`).
    quota: Option<u64>,
}

/// Runs the UDP bench; prints the report; fails on a mismatch or too much loss. The plan's
/// flags were checked against UDP (datagram size, no warm-up, no churn) when it was made.
pub fn run(plan: &BenchPlan, addr: SocketAddr) -> anyhow::Result<()> {
    let size = plan.size;
    let flows = plan.conns;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = plan.threads.unwrap_or(cores).clamp(1, flows);
    let duration = plan.duration;
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_default(signal, Arc::clone(&interrupted))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&interrupted)))
            .context("cannot install the signal handlers")?;
    }
    let seed = super::seed();
    if plan.announce_start {
        eprintln!("{}", super::generator::LOAD_STARTED);
    }
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let results: Vec<anyhow::Result<Tally>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<u64> = (0..flows as u64)
                    .filter(|f| *f as usize % threads == t)
                    .collect();
                let thread_plan = Plan {
                    addr,
                    seed,
                    size,
                    pipeline: plan.pipeline,
                    gso: plan.udp_gso.max(1),
                    timeout: plan.udp_timeout,
                    measure_from,
                    end: duration.map(|d| measure_from + d),
                    quota: plan
                        .requests
                        .map(|n| n / threads as u64 + u64::from((t as u64) < n % threads as u64)),
                };
                let rate = plan.rate.map(|r| r * mine.len() as f64 / flows as f64);
                let interrupted = &interrupted;
                scope.spawn(move || run_thread(&thread_plan, &mine, rate, interrupted))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a bench thread panicked"))
            })
            .collect()
    });
    let mut tally = Tally::default();
    for result in results {
        tally.merge(result?);
    }
    let elapsed = measure_from.elapsed().as_secs_f64().max(1e-9);
    let latency_us = latency(tally.latency.as_ref());
    let loss_percent = if tally.sent == 0 {
        0.0
    } else {
        100.0 * tally.lost as f64 / tally.sent as f64
    };
    let report = UdpReport {
        requests: tally.back,
        sent: tally.sent,
        duration_secs: elapsed,
        requests_per_sec: tally.back as f64 / elapsed,
        bytes_per_sec: tally.bytes as f64 / elapsed,
        latency_us,
        lost: tally.lost,
        loss_percent,
        duplicates: tally.duplicates,
        reordered: tally.reordered,
        late: tally.late,
        mismatches: tally.mismatches,
        errors: tally.errors,
        first_error: tally.first_error.clone(),
        interrupted: interrupted.load(Ordering::Relaxed),
        config: UdpConfig {
            addr: format!("udp://{addr}"),
            flows,
            size,
            pipeline: plan.pipeline,
            rate: plan.rate,
            udp_timeout_ms: plan.udp_timeout.as_secs_f64() * 1e3,
            threads,
            udp_gso: plan.udp_gso.max(1),
        },
    };
    let text = if plan.json {
        serde_json::to_string(&report).context("cannot encode the report")? + "\n"
    } else {
        to_text(&report)
    };
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write the report")?;
    if report.mismatches > 0 || report.errors > 0 {
        bail!(
            "{} mismatches and {} errors; first: {}",
            report.mismatches,
            report.errors,
            report.first_error.as_deref().unwrap_or("unknown")
        );
    }
    if let Some(max) = plan.max_loss {
        if loss_percent > max {
            bail!("{loss_percent:.2}% of the datagrams were lost, more than --max-loss {max}%");
        }
    }
    Ok(())
}

fn latency(hist: Option<&Histogram<u64>>) -> Latency {
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
    match hist.filter(|h| !h.is_empty()) {
        None => Latency {
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            p999: 0.0,
            max: 0.0,
            mean: 0.0,
        },
        Some(h) => Latency {
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: (h.mean() / 100.0).round() / 10.0,
        },
    }
}

fn to_text(r: &UdpReport) -> String {
    format!(
        "udp bench of {addr}: {flows} flows, {size} B datagrams, {mode}\n\
         echoes:      {requests} of {sent} sent in {secs:.2}s ({rps:.0}/s, {mbps:.2} MB/s)\n\
         latency us:  p50 {p50} p90 {p90} p99 {p99} p99.9 {p999} max {max}\n\
         lost:        {lost} ({loss:.2}%), late {late}\n\
         duplicates:  {dups}\n\
         reordered:   {reordered}\n\
         mismatches:  {mismatches}, errors {errors}{first}\n",
        addr = r.config.addr,
        flows = r.config.flows,
        size = r.config.size,
        mode = match r.config.rate {
            Some(rate) => format!("open loop at {rate}/s"),
            None => format!("{} in flight per flow", r.config.pipeline),
        } + &if r.config.udp_gso > 1 {
            format!(", trains of up to {} (UDP_SEGMENT)", r.config.udp_gso)
        } else {
            String::new()
        },
        requests = r.requests,
        sent = r.sent,
        secs = r.duration_secs,
        rps = r.requests_per_sec,
        mbps = r.bytes_per_sec / 1e6,
        p50 = r.latency_us.p50,
        p90 = r.latency_us.p90,
        p99 = r.latency_us.p99,
        p999 = r.latency_us.p999,
        max = r.latency_us.max,
        lost = r.lost,
        loss = r.loss_percent,
        late = r.late,
        dups = r.duplicates,
        reordered = r.reordered,
        mismatches = r.mismatches,
        errors = r.errors,
        first = r
            .first_error
            .as_ref()
            .map(|e| format!("; first: {e}"))
            .unwrap_or_default(),
    )
}

fn run_thread(
    plan: &Plan,
    ids: &[u64],
    rate: Option<f64>,
    interrupted: &AtomicBool,
) -> anyhow::Result<Tally> {
    let mut poll = Poll::new().context("cannot create a poll")?;
    let now = Instant::now();
    let per_flow = rate.map(|r| r / ids.len().max(1) as f64);
    let mut flows = Vec::with_capacity(ids.len());
    for (index, &id) in ids.iter().enumerate() {
        let local: SocketAddr = if plan.addr.is_ipv6() {
            "[::]:0".parse().expect("valid")
        } else {
            "0.0.0.0:0".parse().expect("valid")
        };
        let socket = UdpSocket::bind(local).context("cannot open a UDP socket")?;
        socket
            .connect(plan.addr)
            .with_context(|| format!("cannot send to udp://{}", plan.addr))?;
        socket.set_nonblocking(true)?;
        let mut socket = mio::net::UdpSocket::from_std(socket);
        poll.registry()
            .register(&mut socket, Token(index), Interest::READABLE)?;
        let interval = per_flow.map_or(Duration::ZERO, |r| Duration::from_secs_f64(1.0 / r));
        flows.push(Flow {
            id,
            socket,
            states: VecDeque::new(),
            base: 0,
            next: 0,
            in_flight: 0,
            expired_to: 0,
            highest_back: None,
            // Spread the flows' schedules over one interval.
            due: now + interval.mul_f64(index as f64 / ids.len().max(1) as f64),
            interval,
            first_measured: 0,
        });
    }
    let mut tally = Tally {
        latency: Some(Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds")),
        ..Tally::default()
    };
    let mut events = Events::with_capacity(256);
    let mut out = Vec::with_capacity(plan.size);
    let mut train = Vec::with_capacity(plan.size * plan.gso);
    let mut expect = Vec::with_capacity(plan.size);
    let mut buf = vec![0u8; 64 * 1024];
    let mut quota = plan.quota;
    let mut measuring = false;
    loop {
        let now = Instant::now();
        if !measuring && now >= plan.measure_from {
            measuring = true;
            tally.start_measuring();
            for flow in &mut flows {
                flow.first_measured = flow.next;
            }
        }
        let stopping = interrupted.load(Ordering::Relaxed)
            || plan.end.is_some_and(|end| now >= end)
            || quota == Some(0);
        // Send.
        if !stopping {
            for flow in &mut flows {
                while quota != Some(0) {
                    let left =
                        quota.map_or(usize::MAX, |q| usize::try_from(q).unwrap_or(usize::MAX));
                    let count = if rate.is_some() {
                        // The datagrams due now, up to a train.
                        let mut due = 0;
                        while due < plan.gso.min(left)
                            && flow.due + flow.interval * due as u32 <= now
                        {
                            due += 1;
                        }
                        due
                    } else {
                        let free = plan.pipeline.saturating_sub(flow.in_flight);
                        let count = free.min(plan.gso).min(left);
                        // Closed loop: a whole train (or the quota's rest) or nothing.
                        if count < plan.gso.min(plan.pipeline).min(left) {
                            0
                        } else {
                            count
                        }
                    };
                    if count == 0 {
                        break;
                    }
                    let bytes = if count == 1 {
                        datagram(plan.seed, flow.id, flow.next, plan.size, &mut out);
                        &out
                    } else {
                        train.clear();
                        for i in 0..count as u64 {
                            datagram(plan.seed, flow.id, flow.next + i, plan.size, &mut out);
                            train.extend_from_slice(&out);
                        }
                        &train
                    };
                    match send_train(&flow.socket, bytes, plan.size, count) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            let what = if count > 1 {
                                format!(
                                    "flow {}: cannot send a train of {count} datagrams \
                                     (UDP_SEGMENT): {e}",
                                    flow.id
                                )
                            } else {
                                format!("flow {}: cannot send: {e}", flow.id)
                            };
                            tally.fail(false, what);
                            return Ok(tally);
                        }
                    }
                    for _ in 0..count {
                        let sent_at = if rate.is_some() { flow.due } else { now };
                        flow.states.push_back(State::InFlight(sent_at));
                        flow.next += 1;
                        flow.in_flight += 1;
                        flow.due += flow.interval;
                        if measuring {
                            tally.sent += 1;
                            if let Some(q) = &mut quota {
                                *q -= 1;
                            }
                        }
                    }
                }
            }
        }
        // Expire.
        let mut next_deadline: Option<Instant> = None;
        for flow in &mut flows {
            while flow.expired_to < flow.next {
                let index = (flow.expired_to - flow.base) as usize;
                match flow.states[index] {
                    State::InFlight(at) if at + plan.timeout <= now => {
                        flow.states[index] = State::Lost;
                        flow.in_flight -= 1;
                        if flow.expired_to >= flow.first_measured {
                            tally.lost += 1;
                        }
                    }
                    State::InFlight(at) => {
                        let deadline = at + plan.timeout;
                        next_deadline = Some(next_deadline.map_or(deadline, |d| d.min(deadline)));
                        break;
                    }
                    _ => {}
                }
                flow.expired_to += 1;
            }
            while flow.states.len() > WINDOW
                && !matches!(flow.states.front(), Some(State::InFlight(_)))
            {
                flow.states.pop_front();
                flow.base += 1;
            }
            if rate.is_some() && !stopping {
                next_deadline = Some(next_deadline.map_or(flow.due, |d| d.min(flow.due)));
            }
        }
        let outstanding: usize = flows.iter().map(|f| f.in_flight).sum();
        if stopping && outstanding == 0 {
            return Ok(tally);
        }
        let timeout = next_deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match poll.poll(&mut events, timeout.or(Some(Duration::from_millis(100)))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("poll failed"),
        }
        for event in events.iter() {
            let flow = &mut flows[event.token().0];
            loop {
                let n = match flow.socket.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tally.fail(false, format!("flow {}: cannot receive: {e}", flow.id));
                        return Ok(tally);
                    }
                };
                check(plan, flow, &buf[..n], &mut expect, &mut tally);
            }
        }
    }
}

/// Sends `count` datagrams of `size` bytes, back to back in `train`: one plain send for one,
/// one `sendmsg` with `UDP_SEGMENT` for more (all or nothing: the kernel takes the whole train
/// or returns an error).
fn send_train(
    socket: &mio::net::UdpSocket,
    train: &[u8],
    size: usize,
    count: usize,
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    if count <= 1 {
        return socket.send(train).map(drop);
    }
    // --size is checked to fit 65,507 bytes, so a u16.
    let segment = u16::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        match sendmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
            &[io::IoSlice::new(train)],
            &[ControlMessage::UdpGsoSegments(&segment)],
            MsgFlags::empty(),
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Verifies one echo on `flow` and counts it.
fn check(plan: &Plan, flow: &mut Flow, got: &[u8], expect: &mut Vec<u8>, tally: &mut Tally) {
    let now = Instant::now();
    if got.len() < HEADER {
        let what = format!(
            "flow {}: a {}-byte datagram, shorter than its header (truncated)",
            flow.id,
            got.len()
        );
        tally.fail(true, what);
        return;
    }
    let named_flow = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(got[8..16].try_into().expect("8 bytes"));
    if named_flow != flow.id || seq >= flow.next {
        let what = format!(
            "flow {}: a datagram naming flow {named_flow} sequence {seq}, which this flow never sent (corrupted header)",
            flow.id
        );
        tally.fail(true, what);
        return;
    }
    datagram(plan.seed, flow.id, seq, plan.size, expect);
    // Checked like any other, but an echo of a warm-up datagram is not counted.
    let counted = seq >= flow.first_measured;
    if got.len() != expect.len() {
        let what = format!(
            "flow {} sequence {seq}: {} bytes back for {} sent (truncated or padded)",
            flow.id,
            got.len(),
            expect.len()
        );
        tally.fail(true, what);
        return;
    }
    if let Some(offset) = got.iter().zip(expect.iter()).position(|(a, b)| a != b) {
        let what = format!(
            "flow {} sequence {seq}: byte {offset} is {:#04x}, sent {:#04x}",
            flow.id, got[offset], expect[offset]
        );
        tally.fail(true, what);
        return;
    }
    if seq < flow.base {
        // Older than the window: it was answered or given up on long ago.
        tally.duplicates += u64::from(counted);
        return;
    }
    let index = (seq - flow.base) as usize;
    match flow.states[index] {
        State::InFlight(_) if !counted => {
            flow.states[index] = State::Back;
            flow.in_flight -= 1;
        }
        State::InFlight(at) => {
            flow.states[index] = State::Back;
            flow.in_flight -= 1;
            tally.back += 1;
            tally.bytes += got.len() as u64;
            if let Some(hist) = &mut tally.latency {
                let _ = hist.record((now.saturating_duration_since(at).as_nanos() as u64).max(1));
            }
            if flow.highest_back.is_some_and(|high| seq < high) {
                tally.reordered += 1;
            }
            flow.highest_back = Some(flow.highest_back.map_or(seq, |h| h.max(seq)));
        }
        State::Back => tally.duplicates += u64::from(counted),
        State::Lost => {
            tally.late += u64::from(counted);
            flow.states[index] = State::Back;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_carry_flow_sequence_and_a_seeded_fill() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        datagram(7, 3, 9, 100, &mut a);
        datagram(7, 3, 9, 100, &mut b);
        assert_eq!(a, b, "regenerated alike");
        assert_eq!(u64::from_le_bytes(a[..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(a[8..16].try_into().unwrap()), 9);
        datagram(7, 3, 10, 100, &mut b);
        assert_ne!(a[HEADER..], b[HEADER..], "each datagram its own fill");
    }
}
