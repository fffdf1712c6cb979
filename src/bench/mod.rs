//! `multiecho bench`: the verifying load generator.
//!
//! Other echo benchmarks count bytes; this one checks them. Every message carries its
//! connection id and sequence number and a pseudo-random fill that can be regenerated, and
//! every echoed byte is compared with what was sent, however the server cuts the echo up
//! ([`verify`]). Connections run on one mio event loop per thread ([`generator`], with a
//! timerfd for the open loop's schedule); each thread's figures and failures ([`outcome`])
//! are merged and reported as text or one JSON object ([`report`]). A wrong byte, an early
//! EOF or a reset is counted, reported with its connection and byte offset, and makes the
//! exit status non-zero. SIGINT/SIGTERM end a run early, with a report.

pub mod generator;
pub mod histogram;
pub mod merge;
pub mod outcome;
pub mod report;
mod timer;
pub mod udp;
pub mod verify;

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use generator::{Outcome, Plan, RunControl, Share};
use report::{Config, Report};
use verify::Messages;

/// How long the first, probing connect may take before the server counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Measured time when neither `--duration` nor `--requests` is given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// One run of `multiecho bench`, validated from its command line by `cli`.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    /// The server: `tcp://`, `udp://` or `tls://`.
    pub target: crate::listen::ListenSpec,
    /// The target as the user wrote it: a `tls://` target's host name is checked against it.
    pub target_text: String,
    /// Connections to open (for UDP, flows: a socket each).
    pub conns: usize,
    /// Bytes per message (for UDP, per datagram).
    pub size: usize,
    /// The measured window; `None`: until `requests` round trips are done.
    pub duration: Option<Duration>,
    /// Round trips to measure in total, instead of a duration.
    pub requests: Option<u64>,
    /// Load before the measured window, not counted.
    pub warmup: Duration,
    /// Messages in flight per connection.
    pub pipeline: usize,
    /// Open loop: requests per second in total, on a fixed schedule.
    pub rate: Option<f64>,
    /// Event-loop threads; `None`: one per core.
    pub threads: Option<usize>,
    /// Also report figures per interval of this length.
    pub interval: Option<Duration>,
    /// Churn: round trips per connection before it is closed and a new one opened.
    pub requests_per_conn: Option<u64>,
    /// UDP: a datagram whose echo is not back within this long counts as lost.
    pub udp_timeout: Duration,
    /// UDP: fail if more than this percentage of the datagrams were lost.
    pub max_loss: Option<f64>,
    /// UDP: datagrams per send, as a `UDP_SEGMENT` train (1: one send per datagram).
    pub udp_gso: usize,
    /// One JSON object ([`Report`]) on stdout instead of the text report.
    pub json: bool,
    /// Write [`generator::LOAD_STARTED`] to stderr when the load starts (for `compare`).
    pub announce_start: bool,
    /// `--tls-ca`, `--insecure`, `--sni` and the client certificate, for `tls://`.
    pub tls: crate::tls::client::TlsClientOptions,
}

/// Runs `multiecho bench`: prints the report, then fails if any byte was wrong or missing.
pub fn run(plan: &BenchPlan) -> anyhow::Result<()> {
    use crate::listen::ListenerKind;
    use crate::tls::client::{self as tls_client, Resumption};
    let addr = plan.target.addr;
    if plan.target.kind != ListenerKind::Tls {
        plan.tls.refuse_for_plain_target(&plan.target_text)?;
    }
    let tls = match plan.target.kind {
        ListenerKind::Tcp => None,
        ListenerKind::Tls => Some(plan.tls.target(&plan.target_text, Resumption::Disabled)?),
        ListenerKind::Udp => return udp::run(plan, addr),
        kind => bail!("bench speaks tcp://, udp:// and tls://, not {kind}://"),
    };
    let (conns, size, pipeline) = (plan.conns, plan.size, plan.pipeline);

    let open_files = crate::net::raise_open_files_limit().context("cannot raise RLIMIT_NOFILE")?;
    if conns as u64 + 64 > open_files {
        bail!(
            "--conns {conns} needs more open files than the limit allows ({open_files}); \
             use fewer connections"
        );
    }
    // One blocking connect (and handshake) first, so an unreachable server or a refused
    // certificate is one clear error.
    match &tls {
        None => drop(
            TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
                .with_context(|| format!("cannot connect to {}", addr))?,
        ),
        Some(target) => tls_client::close(tls_client::connect(addr, Some(PROBE_TIMEOUT), target)?),
    }

    let sources = source_addresses(addr, conns);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = plan.threads.unwrap_or(cores).min(conns);
    let duration = plan.duration;
    if let Some(requests) = plan.requests {
        threads = threads.min(usize::try_from(requests).unwrap_or(usize::MAX));
    }
    let threads = threads.max(1);
    let seed = seed();
    let requests_per_conn = plan.requests_per_conn;
    let generator_plan = Plan {
        addr,
        messages: Messages::new(seed, size),
        pipeline,
        warmup: plan.warmup,
        duration,
        sources: sources.clone(),
        announce_start: plan.announce_start,
        interval: plan.interval,
        requests_per_conn,
        id_stride: conns as u64,
        tls: tls.clone(),
    };
    let shares = split(conns, plan.requests, plan.rate, threads);
    let config = Config {
        addr: match tls {
            Some(_) => format!("tls://{addr}"),
            None => addr.to_string(),
        },
        conns,
        size,
        pipeline,
        threads,
        warmup_secs: plan.warmup.as_secs_f64(),
        duration_secs: duration.map(|d| d.as_secs_f64()),
        requests: plan.requests,
        rate: plan.rate,
        source_addrs: sources.len().max(1),
        requests_per_conn,
        interval_secs: plan.interval.map(|d| d.as_secs_f64()),
        tls: tls.is_some(),
    };

    let shared = RunControl::new(threads);
    // The first Ctrl-C ends the run early with a report; a second one kills it.
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_default(signal, Arc::clone(&shared.interrupted))
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&shared.interrupted)))
            .context("cannot install the signal handlers")?;
    }
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .enumerate()
            .map(|(i, share)| {
                let (plan, shared) = (&generator_plan, &shared);
                std::thread::Builder::new()
                    .name(format!("bench-{i}"))
                    .spawn_scoped(scope, move || generator::run_thread(plan, share, shared))
            })
            .collect();
        if handles.iter().any(|h| h.is_err()) {
            // The threads that did start must not wait for the ones that did not.
            shared.abort();
            bail!("cannot start the benchmark threads");
        }
        let handles: Vec<_> = handles.into_iter().flatten().collect();
        show_progress(plan, conns, &shared, &handles);
        let mut results = Vec::new();
        for handle in handles {
            match handle.join() {
                Ok(result) => results.push(result),
                Err(_) => bail!("a benchmark thread panicked"),
            }
        }
        Ok(results)
    })?;

    let finished = Instant::now();
    let mut outcome = Outcome::new();
    for result in results {
        outcome.merge(result.context("the benchmark's event loop failed")?);
    }
    if outcome.opened == 0 {
        bail!(
            "could not open any of {conns} connections to {}: {}",
            addr,
            outcome
                .first_connect_error
                .as_deref()
                .unwrap_or("unknown error")
        );
    }
    let start = shared.start.get().copied().unwrap_or_else(Instant::now);
    let measure_start = start + plan.warmup;
    let duration_secs = match duration {
        // Shorter than asked when interrupted or when every connection failed early.
        Some(d) => d
            .min(finished.saturating_duration_since(measure_start))
            .as_secs_f64(),
        None => outcome.last_completion.map_or(0.0, |t| {
            t.saturating_duration_since(measure_start).as_secs_f64()
        }),
    };
    // The measured window's start on the wall clock, so that `merge` can line reports up.
    let window_start_unix = (std::time::SystemTime::now() - finished.elapsed())
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
        - finished
            .saturating_duration_since(measure_start)
            .as_secs_f64();
    let mut report = Report::new(&outcome, duration_secs, window_start_unix, config);
    report.interrupted = shared.interrupted.load(Ordering::Relaxed);
    let text = if plan.json {
        report.to_json() + "\n"
    } else {
        report.to_text()
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write the report")?;
    if !report.is_clean() {
        bail!(
            "{} mismatches and {} errors; first: {}",
            report.mismatches,
            report.errors,
            report.first_error.as_deref().unwrap_or("unknown")
        );
    }
    Ok(())
}

/// Splits connections, the request quota and the rate over the threads.
fn split(
    total_conns: usize,
    requests: Option<u64>,
    rate: Option<f64>,
    threads: usize,
) -> Vec<Share> {
    let mut first_conn = 0u64;
    (0..threads)
        .map(|i| {
            let share_conns = total_conns / threads + usize::from(i < total_conns % threads);
            let quota = requests.map(|n| {
                let t = threads as u64;
                n / t + u64::from((i as u64) < n % t)
            });
            let share = Share {
                first_conn,
                conns: share_conns,
                quota,
                // Each thread's rate is proportional to its connections.
                rate: rate.map(|r| r * share_conns as f64 / total_conns as f64),
            };
            first_conn += share_conns as u64;
            share
        })
        .collect()
}

/// Source addresses to bind before connecting: when there are more connections than one
/// source address has ephemeral ports and the target is IPv4 loopback, spread them over
/// 127.0.0.1, 127.0.0.2, ...; otherwise let the kernel choose.
fn source_addresses(target: SocketAddr, conns: usize) -> Vec<IpAddr> {
    let ports = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(|n| n.parse::<usize>());
            match (it.next(), it.next()) {
                (Some(Ok(low)), Some(Ok(high))) if high >= low => Some(high - low + 1),
                _ => None,
            }
        })
        .unwrap_or(28_232);
    // Leave room for ports still in TIME_WAIT from earlier runs.
    let per_address = (ports / 2).max(1);
    if conns <= per_address {
        return Vec::new();
    }
    let IpAddr::V4(ip) = target.ip() else {
        tracing::warn!("{conns} connections may exceed the ephemeral ports of one address");
        return Vec::new();
    };
    if !ip.is_loopback() {
        tracing::warn!("{conns} connections may exceed the ephemeral ports of one address");
        return Vec::new();
    }
    let count = conns.div_ceil(per_address).min(254);
    (1..=count as u8)
        .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        .collect()
}

/// A seed that differs from run to run, so a server cannot pass by replaying old data.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    crate::payload::Rng::new(nanos ^ u64::from(std::process::id()) << 32).next_u64()
}

/// Shows a progress bar on a terminal until every thread finished; plain output otherwise.
fn show_progress<T>(
    plan: &BenchPlan,
    conns: usize,
    shared: &RunControl,
    handles: &[std::thread::ScopedJoinHandle<'_, T>],
) {
    if !std::io::stderr().is_terminal() {
        return; // Plain output: the report says it all.
    }
    let all_done = || handles.iter().all(|h| h.is_finished());
    let bar = match plan.requests {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new(
            (plan.warmup + plan.duration.unwrap_or(DEFAULT_DURATION)).as_millis() as u64,
        ),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    while !all_done() {
        let completed = shared.completed.load(Ordering::Relaxed);
        let opened = shared.opened.load(Ordering::Relaxed);
        let phase = match shared.start.get() {
            None => "connecting",
            Some(start) => {
                match plan.requests {
                    Some(_) => bar.set_position(completed),
                    None => bar.set_position(start.elapsed().as_millis() as u64),
                }
                if start.elapsed() < plan.warmup {
                    "warming up"
                } else {
                    "measuring"
                }
            }
        };
        bar.set_message(format!(
            "{phase}: {completed} round trips, {opened} of {conns} connections open"
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_shares_connections_requests_and_rate() {
        let shares = split(10, Some(7), Some(1000.0), 3);
        let conns: Vec<usize> = shares.iter().map(|s| s.conns).collect();
        assert_eq!(conns, [4, 3, 3]);
        let firsts: Vec<u64> = shares.iter().map(|s| s.first_conn).collect();
        assert_eq!(firsts, [0, 4, 7]);
        assert_eq!(shares.iter().map(|s| s.quota.unwrap()).sum::<u64>(), 7);
        let rate: f64 = shares.iter().map(|s| s.rate.unwrap()).sum();
        assert!((rate - 1000.0).abs() < 1e-6);
        assert_eq!(shares[0].rate, Some(400.0));
    }

    #[test]
    fn spreads_over_loopback_sources_only_when_ports_run_out() {
        let loopback: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert!(source_addresses(loopback, 100).is_empty());
        let many = source_addresses(loopback, 200_000);
        assert!(many.len() > 1);
        assert_eq!(many[0], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert!(many.iter().all(|ip| ip.is_loopback()));
        let remote: SocketAddr = "[::1]:4000".parse().unwrap();
        assert!(source_addresses(remote, 200_000).is_empty());
    }
}
