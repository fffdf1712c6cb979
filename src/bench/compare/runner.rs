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
use super::{describe, last_line, procfs, CompareArgs};
use crate::bench::generator::LOAD_STARTED;

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

/// What `multiecho bench --json` prints (the keys compare relies on).
#[derive(Debug, serde::Deserialize)]
struct BenchOutput {
    requests: f64,
    duration_secs: f64,
    requests_per_sec: f64,
    bytes_per_sec: f64,
    latency_us: Latency,
    /// Not in a UDP bench's output (its flows are in `config`).
    #[serde(default)]
    connections: f64,
    errors: f64,
    mismatches: f64,
    /// The first failure in words (not every load generator says).
    #[serde(default)]
    first_error: Option<String>,
    #[serde(default)]
    connections_per_sec: Option<f64>,
    #[serde(default)]
    connect_latency_us: Option<Latency>,
    /// What the network did to the datagrams (UDP only).
    #[serde(default)]
    loss_percent: Option<f64>,
    #[serde(default)]
    duplicates: Option<f64>,
    #[serde(default)]
    reordered: Option<f64>,
}

/// Finds bench's JSON object in its stdout.
fn parse_bench_output(stdout: &str) -> Result<BenchOutput, String> {
    let whole = serde_json::from_str::<BenchOutput>(stdout.trim());
    whole.or_else(|e| {
        stdout
            .lines()
            .rev()
            .filter(|line| line.trim_start().starts_with('{'))
            .find_map(|line| serde_json::from_str(line).ok())
            .ok_or_else(|| format!("cannot read bench's JSON output: {e}"))
    })
}

/// One run of `multiecho bench` against one point, with the server's CPU time and peak
/// memory around it.
pub(super) fn run_bench(
    exe: &Path,
    target: &Target,
    conns: usize,
    size: u64,
    args: &CompareArgs,
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
        None if args.udp => command.arg(format!("udp://{}", target.addr)),
        None => command.arg(target.addr.to_string()),
    };
    command
        .args(["--conns", &conns.to_string(), "--size", &size.to_string()])
        .args(["--duration", &args.duration.as_secs_f64().to_string()])
        .args(["--warmup", &args.warmup.as_secs_f64().to_string()])
        .arg("--json")
        .arg("--announce-start")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(threads) = args.threads {
        command.args(["--threads", &threads.to_string()]);
    }
    if let Some(n) = args.pipeline {
        command.args(["--pipeline", &n.to_string()]);
    }
    if let Some(n) = args.requests_per_conn() {
        command.args(["--requests-per-conn", &n.to_string()]);
    }
    if let Some(cpus) = &args.client_cpus {
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
            .map(|&at: &Instant| (at + args.warmup, at + args.warmup + args.duration))
    };
    let mut cpu_before: Option<(Instant, f64)> = None;
    let mut cpu_after: Option<(Instant, f64)> = None;
    let mut peak_rss: Option<u64> = None;
    let cpu_now = |pid: Option<i32>| {
        pid.and_then(procfs::cpu_seconds)
            .map(|s| (Instant::now(), s))
    };
    // Bench gives up on connecting by itself; this only catches one that hangs.
    let give_up = started + args.warmup + args.duration + BENCH_GRACE;
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
            }
            if cpu_after.is_none() && now >= window_end {
                cpu_after = cpu_now(target.pid);
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

    let output = match parse_bench_output(&stdout) {
        Ok(output) => output,
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
        requests: output.requests,
        duration_secs: output.duration_secs,
        round_trips_per_sec: output.requests_per_sec,
        bytes_per_sec: output.bytes_per_sec,
        mb_per_sec: output.bytes_per_sec / 1e6,
        server_cpu_us_per_round_trip: cpu
            .filter(|_| output.requests_per_sec > 0.0)
            .map(|cores| cores / output.requests_per_sec * 1e6),
        server_cpu_cores: cpu,
        peak_rss_kib: peak_rss.map(|kib| kib as f64),
        latency_us: output.latency_us,
        connections: output.connections,
        errors: output.errors,
        mismatches: output.mismatches,
        connections_per_sec: output.connections_per_sec,
        connect_p99_us: output.connect_latency_us.map(|l| l.p99),
        lost_percent: output.loss_percent,
        duplicates: output.duplicates,
        reordered: output.reordered,
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

    #[test]
    fn reads_bench_output() {
        let json = r#"{"requests": 10, "duration_secs": 0.5, "requests_per_sec": 20.0,
            "bytes_per_sec": 1280, "latency_us": {"p50": 1, "p90": 2, "p99": 3, "p999": 4,
            "max": 5}, "connections": 1, "errors": 0, "mismatches": 0, "extra": "ignored"}"#;
        let output = parse_bench_output(json).unwrap();
        assert_eq!(output.requests_per_sec, 20.0);
        assert_eq!(output.latency_us.p99, 3.0);
        let noisy = format!("warming up\n{}\n", json.replace('\n', " "));
        assert_eq!(parse_bench_output(&noisy).unwrap().requests, 10.0);
        assert!(parse_bench_output("oops").is_err());
    }
}
