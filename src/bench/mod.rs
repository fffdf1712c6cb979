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

pub mod compare;
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

use generator::{Outcome, Plan, Share, Shared};
use report::{Config, Report};
use verify::Messages;

/// How long the first, probing connect may take before the server counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Measured time when neither `--duration` nor `--requests` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// `multiecho bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Server address: HOST:PORT, [V6]:PORT or PORT (loopback), udp://HOST:PORT for UDP
    /// echo (then --conns is the number of flows, each with its own source port), or
    /// tls://HOST:PORT for TLS (see --tls-ca): every connection makes a full handshake (no
    /// session resumption), and the report adds handshake latency and, with --churn,
    /// handshakes per second.
    #[arg(value_parser = parse_target, default_value = crate::net::DEFAULT_LISTEN)]
    pub target: Target,
    /// Connections to open.
    #[arg(short, long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..1_000_000))]
    pub conns: u64,
    /// Bytes per message, e.g. 512, 4k, 1MiB.
    #[arg(short, long, value_name = "BYTES", default_value = "512", value_parser = parse_message_size)]
    pub size: u64,
    /// Measure for this long, e.g. 10s (default 10s unless --requests is given).
    #[arg(short, long, value_name = "DURATION", value_parser = crate::cli::parse_duration,
          conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Measure this many round trips in total instead of a duration.
    #[arg(short = 'n', long, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Load the server this long before measuring; warm-up round trips are not counted.
    #[arg(long, value_name = "DURATION", default_value = "0s",
          value_parser = crate::cli::parse_duration)]
    pub warmup: Duration,
    /// Messages in flight per connection.
    #[arg(short, long, value_name = "DEPTH", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub pipeline: u64,
    /// Open loop: send R requests per second in total on a fixed schedule; latency runs from
    /// the scheduled time, so queueing is not hidden.
    #[arg(short, long, value_name = "R", value_parser = crate::cli::parse_rate)]
    pub rate: Option<f64>,
    /// Event-loop threads (default: one per core).
    #[arg(short, long, value_name = "T", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub threads: Option<u64>,
    /// Report throughput and latency percentiles for every interval of this length too,
    /// e.g. 1s, so drift during a run shows.
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    pub interval: Option<Duration>,
    /// Connection churn: a new connection for every round trip (--requests-per-conn 1).
    #[arg(long, conflicts_with = "requests_per_conn")]
    pub churn: bool,
    /// Connection churn: close each connection after N round trips and open a new one;
    /// reports connections per second and connect latency.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub requests_per_conn: Option<u64>,
    /// udp://: a datagram whose echo is not back within this long counts as lost.
    #[arg(long, value_name = "DURATION", default_value = "200ms",
          value_parser = crate::cli::parse_duration)]
    pub udp_timeout: Duration,
    /// udp://: fail (non-zero exit) if more than this percentage of the datagrams were lost.
    /// Without it loss, duplicates and reordering are reported, not failures.
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub max_loss: Option<f64>,
    /// Print one JSON object on stdout instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Write a line to stderr when the load starts (for `compare`'s CPU window).
    #[arg(long, hide = true)]
    pub announce_start: bool,
    #[command(flatten)]
    pub tls: crate::tls::client::TlsClientArgs,
}

/// What bench loads: the parsed address and, for TLS, the text it was written as (whose
/// host is the server name to verify).
#[derive(Clone, Debug)]
pub struct Target {
    pub spec: crate::listen::ListenSpec,
    pub text: String,
}

fn parse_target(text: &str) -> Result<Target, String> {
    Ok(Target {
        spec: crate::listen::parse(text)?,
        text: text.trim().to_string(),
    })
}

fn parse_message_size(text: &str) -> Result<u64, String> {
    match crate::cli::parse_size(text)? {
        0 => Err("a message is at least 1 byte".into()),
        n if n > 1 << 30 => Err(format!("invalid size '{text}': at most 1GiB per message")),
        n => Ok(n),
    }
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    match crate::cli::parse_duration(text)? {
        d if d < Duration::from_millis(10) => {
            Err(format!("invalid interval '{text}': at least 10ms"))
        }
        d => Ok(d),
    }
}

fn parse_percent(text: &str) -> Result<f64, String> {
    match text.trim().trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("invalid percentage '{text}': expected 0 to 100")),
    }
}

/// Runs `multiecho bench`: prints the report, then fails if any byte was wrong or missing.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    use crate::listen::ListenerKind;
    use crate::tls::client::{self as tls_client, Resumption};
    let addr = args.target.spec.addr;
    if args.target.spec.kind != ListenerKind::Tls {
        args.tls.refuse_for_plain_target(&args.target.text)?;
    }
    let tls = match args.target.spec.kind {
        ListenerKind::Tcp => None,
        ListenerKind::Tls => Some(args.tls.target(&args.target.text, Resumption::Disabled)?),
        ListenerKind::Udp => return udp::run(args, addr),
        kind => bail!("bench speaks tcp://, udp:// and tls://, not {kind}://"),
    };
    let conns = usize::try_from(args.conns).context("--conns is too large")?;
    let size = usize::try_from(args.size).context("--size is too large")?;
    let pipeline = args.pipeline as usize;

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
    let mut threads = args.threads.map_or(cores, |t| t as usize).min(conns);
    let duration = match (args.duration, args.requests) {
        (None, None) => Some(DEFAULT_DURATION),
        (duration, _) => duration,
    };
    if let Some(requests) = args.requests {
        threads = threads.min(usize::try_from(requests).unwrap_or(usize::MAX));
    }
    let threads = threads.max(1);
    let seed = seed();
    let requests_per_conn = match (args.churn, args.requests_per_conn) {
        (true, _) => Some(1),
        (false, n) => n,
    };
    let plan = Plan {
        addr,
        messages: Messages::new(seed, size),
        pipeline,
        warmup: args.warmup,
        duration,
        sources: sources.clone(),
        announce_start: args.announce_start,
        interval: args.interval,
        requests_per_conn,
        id_stride: conns as u64,
        tls: tls.clone(),
    };
    let shares = split(conns, args.requests, args.rate, threads);
    let config = Config {
        addr: match tls {
            Some(_) => format!("tls://{addr}"),
            None => addr.to_string(),
        },
        conns,
        size,
        pipeline,
        threads,
        warmup_secs: args.warmup.as_secs_f64(),
        duration_secs: duration.map(|d| d.as_secs_f64()),
        requests: args.requests,
        rate: args.rate,
        source_addrs: sources.len().max(1),
        requests_per_conn,
        interval_secs: args.interval.map(|d| d.as_secs_f64()),
        tls: tls.is_some(),
    };

    let shared = Shared::new(threads);
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
                let (plan, shared) = (&plan, &shared);
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
        show_progress(args, conns, &shared, &handles);
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
    let mut outcome = Outcome::empty();
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
    let measure_start = start + args.warmup;
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
    let text = if args.json {
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
    args: &BenchArgs,
    conns: usize,
    shared: &Shared,
    handles: &[std::thread::ScopedJoinHandle<'_, T>],
) {
    if !std::io::stderr().is_terminal() {
        return; // Plain output: the report says it all.
    }
    let all_done = || handles.iter().all(|h| h.is_finished());
    let bar = match args.requests {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new(
            (args.warmup + args.duration.unwrap_or(DEFAULT_DURATION)).as_millis() as u64,
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
                match args.requests {
                    Some(_) => bar.set_position(completed),
                    None => bar.set_position(start.elapsed().as_millis() as u64),
                }
                if start.elapsed() < args.warmup {
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

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(parse_message_size("4k"), Ok(4096));
        assert!(parse_message_size("0").is_err());
        assert!(parse_message_size("2GiB").is_err());
    }
}
