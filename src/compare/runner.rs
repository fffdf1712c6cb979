//! One run of `multiecho bench` against one sweep point, as a child process (optionally
//! pinned), with the server's CPU time and peak memory read from /proc around it.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::report::{Figures, Latency, Run};
use super::{describe, last_line, procfs, ComparePlan};
use crate::bench::generator::LOAD_STARTED;
use crate::bench::report::{self as bench_report, Report};
use crate::bench::udp::UdpReport;

/// How often peak memory is sampled during a point.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long bench may run past its measured window (connecting, draining) before it is
/// killed, so a stuck server cannot stall the whole comparison.
const BENCH_GRACE: Duration = Duration::from_secs(60);

/// A server to load: where it listens and, if known, its process.
#[derive(Clone, Debug)]
pub(super) struct Target {
    pub(super) addr: SocketAddr,
    pub(super) pid: Option<i32>,
    /// Over TLS: the certificate bench trusts (`--tls-ca`).
    pub(super) tls_ca: Option<std::path::PathBuf>,
}

/// What `bench --json` printed, read back through the very types bench writes (so the two
/// cannot disagree on a field): its report for a TCP or TLS target, or for a udp:// one.
enum BenchOutput {
    Stream(Box<Report>),
    Datagram(Box<UdpReport>),
}

/// Finds bench's JSON object in its stdout: `udp` says which report to expect.
fn parse_bench_output(stdout: &str, udp: bool) -> Result<BenchOutput, String> {
    if udp {
        parse_json(stdout).map(|report| BenchOutput::Datagram(Box::new(report)))
    } else {
        parse_json(stdout).map(|report| BenchOutput::Stream(Box::new(report)))
    }
}

/// The whole of `stdout` as one `T`, or else its last line that is one.
fn parse_json<T: serde::de::DeserializeOwned>(stdout: &str) -> Result<T, String> {
    let whole = serde_json::from_str::<T>(stdout.trim());
    whole.or_else(|e| {
        stdout
            .lines()
            .rev()
            .filter(|line| line.trim_start().starts_with('{'))
            .find_map(|line| serde_json::from_str(line).ok())
            .ok_or_else(|| format!("cannot read bench's JSON output: {e}"))
    })
}

/// The figures compare takes from either report, in its own units.
struct Output {
    requests: u64,
    duration_secs: f64,
    requests_per_sec: f64,
    bytes_per_sec: f64,
    latency_us: bench_report::Latency,
    connections: f64,
    errors: f64,
    mismatches: f64,
    connections_per_sec: Option<f64>,
    connect_p99_us: Option<f64>,
    lost_percent: Option<f64>,
    duplicates: Option<f64>,
    reordered: Option<f64>,
    first_error: Option<String>,
}

impl From<BenchOutput> for Output {
    fn from(output: BenchOutput) -> Output {
        match output {
            BenchOutput::Stream(r) => Output {
                requests: r.requests,
                duration_secs: r.duration_secs,
                requests_per_sec: r.requests_per_sec,
                bytes_per_sec: r.bytes_per_sec,
                latency_us: r.latency_us,
                connections: r.connections as f64,
                errors: r.errors as f64,
                mismatches: r.mismatches as f64,
                connections_per_sec: Some(r.connections_per_sec),
                connect_p99_us: Some(r.connect_latency_us.p99),
                lost_percent: None,
                duplicates: None,
                reordered: None,
                first_error: r.first_error,
            },
            BenchOutput::Datagram(r) => Output {
                requests: r.requests,
                duration_secs: r.duration_secs,
                requests_per_sec: r.requests_per_sec,
                bytes_per_sec: r.bytes_per_sec,
                latency_us: r.latency_us,
                // A UDP run has flows, not connections.
                connections: 0.0,
                errors: r.errors as f64,
                mismatches: r.mismatches as f64,
                connections_per_sec: None,
                connect_p99_us: None,
                lost_percent: Some(r.loss_percent),
                duplicates: Some(r.duplicates as f64),
                reordered: Some(r.reordered as f64),
                first_error: r.first_error,
            },
        }
    }
}

/// One run of `multiecho bench` against one point, with the server's CPU time and peak
/// memory around it.
pub(super) fn run_bench(
    exe: &Path,
    target: &Target,
    conns: usize,
    size: u64,
    plan: &ComparePlan,
) -> Run {
    let failed = |failure: String| Run {
        figures: None,
        failure: Some(failure),
    };
    let mut command = Command::new(exe);
    command.arg("bench");
    match &target.tls_ca {
        Some(ca) => command
            .arg(format!("tls://{}", target.addr))
            .arg("--tls-ca")
            .arg(ca),
        None if plan.udp => command.arg(format!("udp://{}", target.addr)),
        None => command.arg(target.addr.to_string()),
    };
    command
        .args(["--conns", &conns.to_string(), "--size", &size.to_string()])
        .args(["--duration", &plan.duration.as_secs_f64().to_string()])
        .args(["--warmup", &plan.warmup.as_secs_f64().to_string()])
        .arg("--json")
        .arg("--announce-start")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(threads) = plan.threads {
        command.args(["--threads", &threads.to_string()]);
    }
    if let Some(n) = plan.pipeline {
        command.args(["--pipeline", &n.to_string()]);
    }
    if let Some(n) = plan.requests_per_conn {
        command.args(["--requests-per-conn", &n.to_string()]);
    }
    if let Some(cpus) = &plan.client_cpus {
        cpus.pin(&mut command);
    }
    super::end_with_parent(&mut command);
    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return failed(format!("cannot start bench: {e}")),
    };
    let stdout = read_all_in_background(child.stdout.take());
    // Connecting can take a while (a fork per connection, say): the window is timed from
    // the moment bench says its load started, not from its start.
    let load_started = Arc::new(OnceLock::new());
    let stderr = read_stderr_in_background(child.stderr.take(), Arc::clone(&load_started));
    let window = || {
        load_started
            .get()
            .map(|&at: &Instant| (at + plan.warmup, at + plan.warmup + plan.duration))
    };
    let mut cpu_before: Option<(Instant, f64)> = None;
    let mut cpu_after: Option<(Instant, f64)> = None;
    let mut peak_rss: Option<u64> = None;
    // The whole machine's steal over the same window: time the hypervisor gave to other guests.
    let mut machine_before = None;
    let mut machine_after = None;
    let cpu_now = |pid: Option<i32>| {
        pid.and_then(procfs::cpu_seconds)
            .map(|s| (Instant::now(), s))
    };
    // Bench gives up on connecting by itself; this only catches one that hangs.
    let give_up = started + plan.warmup + plan.duration + BENCH_GRACE;
    let status = loop {
        if let Some(pid) = target.pid {
            if let Some(rss) = procfs::rss_kib(pid) {
                peak_rss = Some(peak_rss.map_or(rss, |peak| peak.max(rss)));
            }
        }
        let now = Instant::now();
        let edges = window();
        if let Some((window_start, window_end)) = edges {
            if cpu_before.is_none() && now >= window_start {
                cpu_before = cpu_now(target.pid);
                machine_before = procfs::machine_time();
            }
            if cpu_after.is_none() && now >= window_end {
                cpu_after = cpu_now(target.pid);
                machine_after = procfs::machine_time();
            }
        }
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if now >= give_up => {
                break Err(std::io::Error::other(format!(
                    "it was still running {} s after its measured window; killed",
                    BENCH_GRACE.as_secs()
                )))
            }
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        // Wake at the next sample, or exactly at a window edge still to come.
        let mut wake = Instant::now() + SAMPLE_EVERY;
        for edge in edges.into_iter().flat_map(|(start, end)| [start, end]) {
            if edge > now && edge < wake {
                wake = edge;
            }
        }
        thread::sleep(wake.saturating_duration_since(Instant::now()));
    };
    if cpu_after.is_none() {
        cpu_after = cpu_now(target.pid);
        machine_after = procfs::machine_time();
    }
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return failed(format!("bench: {e}"));
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let last_err_line = last_line(&stderr);

    let output = match parse_bench_output(&stdout, plan.udp) {
        Ok(output) => Output::from(output),
        Err(e) => {
            let why = last_err_line.unwrap_or(e);
            return failed(format!("bench {}: {why}", describe(status)));
        }
    };
    let cpu = match (cpu_before, cpu_after) {
        (Some((t0, c0)), Some((t1, c1))) if t1 > t0 => {
            let cores = (c1 - c0).max(0.0) / (t1 - t0).as_secs_f64();
            Some(cores)
        }
        _ => None,
    };
    let figures = Figures {
        requests: output.requests as f64,
        duration_secs: output.duration_secs,
        round_trips_per_sec: output.requests_per_sec,
        bytes_per_sec: output.bytes_per_sec,
        mb_per_sec: output.bytes_per_sec / 1e6,
        server_cpu_us_per_round_trip: cpu
            .filter(|_| output.requests_per_sec > 0.0)
            .map(|cores| cores / output.requests_per_sec * 1e6),
        server_cpu_cores: cpu,
        peak_rss_kib: peak_rss.map(|kib| kib as f64),
        latency_us: latency(&output.latency_us),
        connections: output.connections,
        errors: output.errors,
        mismatches: output.mismatches,
        connections_per_sec: output.connections_per_sec,
        connect_p99_us: output.connect_p99_us,
        lost_percent: output.lost_percent,
        duplicates: output.duplicates,
        reordered: output.reordered,
        steal_percent: machine_before
            .zip(machine_after)
            .and_then(|(before, after)| procfs::steal_percent(before, after)),
    };
    let mut problems = Vec::new();
    if !status.success() {
        problems.push(format!("bench {}", describe(status)));
    }
    if figures.requests <= 0.0 {
        problems.push("no round trip completed".to_string());
    }
    if figures.errors > 0.0 {
        problems.push(format!("{} errors", figures.errors));
    }
    if figures.mismatches > 0.0 {
        problems.push(format!("{} mismatches", figures.mismatches));
    }
    let failure = (!problems.is_empty()).then(|| {
        let mut text = problems.join(", ");
        let why = output
            .first_error
            .or(last_err_line.filter(|_| !status.success()));
        if let Some(line) = why {
            text.push_str(": ");
            text.push_str(&line);
        }
        text
    });
    Run {
        figures: Some(figures),
        failure,
    }
}

/// The percentiles compare reports, from bench's.
fn latency(bench: &bench_report::Latency) -> Latency {
    Latency {
        p50: bench.p50,
        p90: bench.p90,
        p99: bench.p99,
        p999: bench.p999,
        max: bench.max,
    }
}

/// Reads a pipe to the end on its own thread, so the child never blocks writing to it.
/// Collects bench's stderr, noting when it announces that its load started.
fn read_stderr_in_background(
    pipe: Option<impl Read + Send + 'static>,
    load_started: Arc<OnceLock<Instant>>,
) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let Some(pipe) = pipe else { return text };
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if line == LOAD_STARTED {
                let _ = load_started.set(Instant::now());
            } else {
                text.push_str(&line);
                text.push('\n');
            }
        }
        text
    })
}

fn read_all_in_background(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// compare reads bench's report through the type bench writes it with.
    #[test]
    fn reads_what_bench_writes() {
        let mut outcome = crate::bench::generator::Outcome::new();
        outcome.requests = 10;
        outcome.bytes = 640;
        outcome.opened = 1;
        outcome.latency_ns.record(3_000).unwrap();
        let config = bench_report::Config {
            addr: "127.0.0.1:4000".into(),
            conns: 1,
            size: 64,
            pipeline: 1,
            threads: 1,
            warmup_secs: 0.0,
            duration_secs: Some(0.5),
            requests: None,
            rate: None,
            source_addrs: 1,
            requests_per_conn: None,
            interval_secs: None,
            tls: false,
        };
        let written = Report::new(&outcome, 0.5, 0.0, config);
        let output = Output::from(parse_bench_output(&written.to_json(), false).unwrap());
        assert_eq!(output.requests, 10);
        assert_eq!(output.requests_per_sec, 20.0);
        assert_eq!(output.latency_us, written.latency_us);
        let one_line = serde_json::to_string(&written).unwrap();
        let noisy = format!("warming up\n{one_line}\n");
        let output = Output::from(parse_bench_output(&noisy, false).unwrap());
        assert_eq!(output.requests, 10);
        assert!(parse_bench_output("oops", false).is_err());
        // A TCP report is not a UDP one: the expected type is checked.
        assert!(parse_bench_output(&written.to_json(), true).is_err());
    }
}
