//! `multiecho compare`: start each model in turn (or use servers already running), load it
//! with `multiecho bench` at every point of a sweep over connections and message sizes, and
//! write a side-by-side report: `report.json` (every figure), `report.md` (tables to paste
//! into an issue) and SVG charts.
//!
//! Both the server and the load generator run as child processes of this one (the running
//! binary, `serve` and `bench`), so each can be pinned to its own CPUs and the server's cost
//! can be read from /proc without counting the load generator. While a point runs, the
//! server's resident memory (its descendants included) is sampled every 100 ms; its CPU time
//! is read when the warm-up ends and when the measured window ends.
//!
//! A model that cannot start here is listed as skipped with the server's last log line as
//! the reason; a point whose load generator saw errors or mismatched bytes is kept, marked
//! failed. After the report is written, compare exits non-zero if any point failed or any
//! server did not exit 0 on SIGTERM.

mod charts;
mod cpus;
mod procfs;
mod report;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

pub use cpus::{parse_cpu_list, CpuList};
pub use report::{Figures, Latency, Point, Report, Run, ServerResult, StopOutcome};

use crate::server::Model;

/// How long a model may take to say where it listens.
const START_PATIENCE: Duration = Duration::from_secs(30);
/// How often peak memory is sampled during a point.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How many of a server's last log lines are kept (for reasons).
const LOG_LINES_KEPT: usize = 20;

/// `multiecho compare`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Models to compare, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Model::ALL)]
    pub models: Vec<Model>,
    /// Connection counts to sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,50,500",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub conns: Vec<u32>,
    /// Message sizes to sweep, comma-separated (e.g. 64,4k,16KiB).
    #[arg(long, value_delimiter = ',', default_value = "64,512,16384",
          value_parser = parse_message_size)]
    pub size: Vec<u64>,
    /// Measured time per point, e.g. 5, 500ms, 10s.
    #[arg(long, value_name = "DURATION", default_value = "5",
          value_parser = crate::cli::parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before each point's measured time.
    #[arg(long, value_name = "DURATION", default_value = "1",
          value_parser = crate::cli::parse_duration)]
    pub warmup: Duration,
    /// Run each point N times and report the median of each figure.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..1001))]
    pub repeat: u32,
    /// Load-generator threads (passed to bench as --threads).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
    /// Worker processes or threads for the models that take them (prefork, pool, epoll,
    /// async, uring).
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..4097))]
    pub workers: Option<u64>,
    /// Pin the servers to these CPUs, e.g. 0 or 0-1.
    #[arg(long, value_name = "CPUS", value_parser = parse_cpu_list)]
    pub server_cpus: Option<CpuList>,
    /// Pin the load generator to these CPUs, e.g. 1 or 2,3.
    #[arg(long, value_name = "CPUS", value_parser = parse_cpu_list)]
    pub client_cpus: Option<CpuList>,
    /// Also compare an echo server that is already running: NAME=ADDR, or NAME=ADDR@PID to
    /// measure its CPU time and memory too. Repeatable.
    #[arg(long, value_name = "NAME=ADDR[@PID]", value_parser = parse_external)]
    pub external: Vec<External>,
    /// Directory to write report.json, report.md and the charts into.
    #[arg(long, value_name = "DIR", default_value = "compare-report")]
    pub out: PathBuf,
}

/// An echo server compare does not start: `NAME=ADDR[@PID]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct External {
    pub name: String,
    pub addr: SocketAddr,
    pub pid: Option<i32>,
}

/// Parses `NAME=ADDR` or `NAME=ADDR@PID`.
pub fn parse_external(text: &str) -> Result<External, String> {
    let (name, rest) = text
        .split_once('=')
        .filter(|(name, _)| !name.trim().is_empty())
        .ok_or_else(|| format!("invalid external server '{text}': expected NAME=ADDR[@PID]"))?;
    let (addr, pid) = match rest.rsplit_once('@') {
        Some((addr, pid)) => {
            let pid = pid
                .parse::<i32>()
                .ok()
                .filter(|pid| *pid > 0)
                .ok_or_else(|| format!("invalid external server '{text}': bad PID '{pid}'"))?;
            (addr, Some(pid))
        }
        None => (rest, None),
    };
    let addr = crate::net::parse_addr(addr)
        .map_err(|e| format!("invalid external server '{text}': {e}"))?;
    Ok(External {
        name: name.trim().to_string(),
        addr,
        pid,
    })
}

/// Parses a message size; a size of zero measures nothing.
fn parse_message_size(text: &str) -> Result<u64, String> {
    match crate::cli::parse_size(text)? {
        0 => Err(format!("invalid size '{text}': must be at least 1 byte")),
        size => Ok(size),
    }
}

/// Whether the model takes `--workers`.
fn takes_workers(model: Model) -> bool {
    matches!(
        model,
        Model::Prefork | Model::Pool | Model::Epoll | Model::Async | Model::Uring
    )
}

/// Runs `multiecho compare`.
pub fn run(args: &CompareArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the multiecho executable")?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let conns: Vec<usize> = args.conns.iter().map(|&c| c as usize).collect();
    let mut settings = report::Settings {
        conns: conns.clone(),
        sizes: args.size.clone(),
        duration_secs: args.duration.as_secs_f64(),
        warmup_secs: args.warmup.as_secs_f64(),
        repeat: args.repeat,
        bench_threads: args.threads.map(|t| t as usize),
        workers: args.workers,
        server_cpus: args.server_cpus.as_ref().map(ToString::to_string),
        client_cpus: args.client_cpus.as_ref().map(ToString::to_string),
    };
    settings.conns.dedup();
    settings.sizes.dedup();

    let servers = args.models.len() + args.external.len();
    let total = (servers * settings.conns.len() * settings.sizes.len()) as u64 * args.repeat as u64;
    let progress = Progress::new(total);
    let mut results = Vec::new();
    for &model in &args.models {
        results.push(compare_model(&exe, model, args, &settings, &progress)?);
    }
    for external in &args.external {
        let target = Target {
            name: &external.name,
            addr: external.addr,
            pid: external.pid,
        };
        let points = sweep(&exe, &target, args, &settings, &progress, None);
        results.push(ServerResult {
            name: external.name.clone(),
            kind: "external".into(),
            address: Some(external.addr.to_string()),
            skipped: None,
            stop: None,
            points,
        });
    }
    progress.finish();

    let report = Report {
        environment: environment(),
        settings,
        servers: results,
    };
    write_report(&report, &args.out)?;
    let failed_points: usize = report
        .servers
        .iter()
        .map(|s| s.points.iter().filter(|p| p.failed).count())
        .sum();
    let unclean: Vec<&str> = report
        .servers
        .iter()
        .filter(|s| s.stop.as_ref().is_some_and(|stop| !stop.clean))
        .map(|s| s.name.as_str())
        .collect();
    if failed_points > 0 || !unclean.is_empty() {
        anyhow::bail!(
            "report written to {}, but {failed_points} point(s) failed and {} server(s) did \
             not stop cleanly{} (see report.md)",
            args.out.display(),
            unclean.len(),
            if unclean.is_empty() {
                String::new()
            } else {
                format!(": {}", unclean.join(", "))
            }
        );
    }
    Ok(())
}

/// Writes report.json, the charts and report.md into `dir`, and says where on stdout.
fn write_report(report: &Report, dir: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    let json_path = dir.join("report.json");
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    let charts = charts::write_all(report, dir)
        .with_context(|| format!("cannot write the charts into {}", dir.display()))?;
    let md_path = dir.join("report.md");
    std::fs::write(&md_path, report::markdown(report, &charts))
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    println!("{}", json_path.display());
    println!("{}", md_path.display());
    for chart in &charts {
        println!("{}", dir.join(chart).display());
    }
    Ok(())
}

/// Starts `model`, sweeps it, stops it.
fn compare_model(
    exe: &Path,
    model: Model,
    args: &CompareArgs,
    settings: &report::Settings,
    progress: &Progress,
) -> anyhow::Result<ServerResult> {
    let points_per_server =
        (settings.conns.len() * settings.sizes.len()) as u64 * args.repeat as u64;
    let mut result = ServerResult {
        name: model.name().to_string(),
        kind: "model".into(),
        address: None,
        skipped: None,
        stop: None,
        points: Vec::new(),
    };
    progress.say(&format!("starting the {model} server"));
    let mut server = match ServerProcess::start(exe, model, args)? {
        Ok(server) => server,
        Err(reason) => {
            progress.say(&format!("{model}: skipped: {reason}"));
            progress.skip(points_per_server);
            result.skipped = Some(reason);
            return Ok(result);
        }
    };
    result.address = Some(server.addr.to_string());
    let target = Target {
        name: model.name(),
        addr: server.addr,
        pid: Some(server.child.id() as i32),
    };
    result.points = sweep(exe, &target, args, settings, progress, Some(&mut server));
    let stop = server.stop();
    if !stop.clean {
        progress.say(&format!("{model}: did not stop cleanly: {}", stop.detail));
    }
    result.stop = Some(stop);
    Ok(result)
}

/// A server to load: where it listens and, if known, its process.
struct Target<'a> {
    name: &'a str,
    addr: SocketAddr,
    pid: Option<i32>,
}

/// Runs every point of the sweep against `target`, `repeat` times each.
fn sweep(
    exe: &Path,
    target: &Target<'_>,
    args: &CompareArgs,
    settings: &report::Settings,
    progress: &Progress,
    mut server: Option<&mut ServerProcess>,
) -> Vec<Point> {
    let mut points = Vec::new();
    for &size in &settings.sizes {
        for &conns in &settings.conns {
            let mut runs = Vec::new();
            for round in 1..=args.repeat {
                progress.start_run(target.name, conns, size, round, args.repeat);
                let dead = server.as_mut().and_then(|s| s.exit_reason());
                let run = match dead {
                    Some(reason) => Run {
                        figures: None,
                        failure: Some(reason),
                    },
                    None => run_bench(exe, target, conns, size, args),
                };
                progress.finish_run(target.name, conns, size, &run);
                runs.push(run);
            }
            points.push(Point::from_runs(conns, size, runs));
        }
    }
    points
}

/// What `multiecho bench --json` prints (the keys compare relies on).
#[derive(Debug, serde::Deserialize)]
struct BenchOutput {
    requests: f64,
    duration_secs: f64,
    requests_per_sec: f64,
    bytes_per_sec: f64,
    latency_us: Latency,
    connections: f64,
    errors: f64,
    mismatches: f64,
    /// The first failure in words (not every load generator says).
    #[serde(default)]
    first_error: Option<String>,
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
fn run_bench(exe: &Path, target: &Target<'_>, conns: usize, size: u64, args: &CompareArgs) -> Run {
    let failed = |failure: String| Run {
        figures: None,
        failure: Some(failure),
    };
    let mut command = Command::new(exe);
    command
        .arg("bench")
        .arg(target.addr.to_string())
        .args(["--conns", &conns.to_string(), "--size", &size.to_string()])
        .args(["--duration", &args.duration.as_secs_f64().to_string()])
        .args(["--warmup", &args.warmup.as_secs_f64().to_string()])
        .arg("--json")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(threads) = args.threads {
        command.args(["--threads", &threads.to_string()]);
    }
    if let Some(cpus) = &args.client_cpus {
        cpus.pin(&mut command);
    }
    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return failed(format!("cannot start bench: {e}")),
    };
    let stdout = read_all_in_background(child.stdout.take());
    let stderr = read_all_in_background(child.stderr.take());

    let window_start = started + args.warmup;
    let window_end = window_start + args.duration;
    let mut cpu_before: Option<(Instant, f64)> = None;
    let mut cpu_after: Option<(Instant, f64)> = None;
    let mut peak_rss: Option<u64> = None;
    let cpu_now = |pid: Option<i32>| {
        pid.and_then(procfs::cpu_seconds)
            .map(|s| (Instant::now(), s))
    };
    let status = loop {
        if let Some(pid) = target.pid {
            if let Some(rss) = procfs::rss_kib(pid) {
                peak_rss = Some(peak_rss.map_or(rss, |peak| peak.max(rss)));
            }
        }
        let now = Instant::now();
        if cpu_before.is_none() && now >= window_start {
            cpu_before = cpu_now(target.pid);
        }
        if cpu_after.is_none() && now >= window_end {
            cpu_after = cpu_now(target.pid);
        }
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        // Wake at the next sample, or exactly at a window edge still to come.
        let mut wake = Instant::now() + SAMPLE_EVERY;
        for edge in [window_start, window_end] {
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
            return failed(format!("cannot wait for bench: {e}"));
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
    };
    let mut problems = Vec::new();
    if !status.success() {
        problems.push(format!("bench {}", describe(status)));
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
fn read_all_in_background(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The last non-empty line of `text`, without terminal colours.
fn last_line(text: &str) -> Option<String> {
    text.lines()
        .map(strip_ansi)
        .rfind(|line| !line.trim().is_empty())
        .map(|line| line.trim().to_string())
}

/// `text` without ANSI escape sequences (log lines may be coloured).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (0x40..=0x7e).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// "exited with status 1", "was killed by signal 9".
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => format!("ended with {status}"),
    }
}

/// A `multiecho serve` child, its stderr drained on a thread into its last lines. Killed on
/// drop if it was not stopped.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
    log_reader: thread::JoinHandle<()>,
    stopped: bool,
    /// Why the server ended, when it was found dead during the sweep.
    died: Option<String>,
}

impl ServerProcess {
    /// Starts `model` on a free loopback port and waits until it says where it listens.
    /// `Ok(Err(reason))`: the model cannot run here (reason: its last log line).
    fn start(
        exe: &Path,
        model: Model,
        args: &CompareArgs,
    ) -> anyhow::Result<Result<ServerProcess, String>> {
        let mut command = Command::new(exe);
        command
            .args(["serve", "--model", model.name(), "--listen", "127.0.0.1:0"])
            // The readiness line is at info level; more would slow the server down.
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(workers) = args.workers.filter(|_| takes_workers(model)) {
            command.args(["--workers", &workers.to_string()]);
        }
        if let Some(cpus) = &args.server_cpus {
            cpus.pin(&mut command);
        }
        let mut child = command.spawn().with_context(|| {
            let pinned = args
                .server_cpus
                .as_ref()
                .map(|cpus| format!(" pinned to CPUs {cpus}"))
                .unwrap_or_default();
            format!("cannot start the {model} server{pinned}")
        })?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr is piped");
        let log_reader = {
            let log = Arc::clone(&log);
            thread::spawn(move || drain_log(stderr, &log, ready_tx))
        };
        let mut server = ServerProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            log_reader,
            stopped: false,
            died: None,
        };
        match ready_rx.recv_timeout(START_PATIENCE) {
            Ok(addr) => {
                server.addr = addr;
                // A model that cannot run may still bind and log its address before it
                // fails, so only a round trip shows it really serves.
                match probe(addr) {
                    Ok(()) => Ok(Ok(server)),
                    Err(e) => Ok(Err(server.not_serving(&e))),
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Its stderr closed before it listened: it exited.
                let status = server.child.wait();
                server.stopped = true;
                let status = status.map_or_else(|e| e.to_string(), describe);
                Ok(Err(server.last_log_line().unwrap_or_else(|| {
                    format!("the server {status} without a word")
                })))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let last = server.last_log_line().unwrap_or_default();
                Ok(Err(format!(
                    "did not say where it listens within {} s (last line: {last})",
                    START_PATIENCE.as_secs()
                )))
            }
        }
    }

    /// Why a server that said where it listens does not echo: its last log line if it
    /// exited (it is given a moment to), else the probe's error (and it is killed).
    fn not_serving(&mut self, probe_error: &std::io::Error) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.stopped = true;
                self.wait_for_log_end(Duration::from_secs(1));
                return self
                    .last_log_line()
                    .unwrap_or_else(|| format!("the server {}", describe(status)));
            }
            thread::sleep(Duration::from_millis(10));
        }
        format!("it does not echo: {probe_error}")
    }

    /// Waits (a bounded time: children may hold stderr open) until the log thread has read
    /// everything the server wrote.
    fn wait_for_log_end(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        while !self.log_reader.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The server's last log line, without the `multiecho: error: ` every error line has.
    fn last_log_line(&self) -> Option<String> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let line = log.back()?;
        Some(
            line.strip_prefix("multiecho: error: ")
                .unwrap_or(line)
                .to_string(),
        )
    }

    /// Why the server is no longer running, or `None` while it runs.
    fn exit_reason(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => {
                self.stopped = true;
                self.wait_for_log_end(Duration::from_secs(1));
                let last = self.last_log_line().unwrap_or_default();
                let reason = format!("the server {} during the sweep: {last}", describe(status));
                self.died = Some(reason.clone());
                Some(reason)
            }
            Err(e) => Some(format!("cannot check on the server: {e}")),
        }
    }

    /// SIGTERM, then wait for it to exit (it must exit 0); killed if it takes too long.
    fn stop(mut self) -> StopOutcome {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if self.stopped {
            return StopOutcome {
                clean: false,
                detail: self
                    .died
                    .clone()
                    .unwrap_or_else(|| "it had already exited".into()),
            };
        }
        self.stopped = true;
        let pid = Pid::from_raw(self.child.id() as i32);
        if let Err(e) = kill(pid, Signal::SIGTERM) {
            return StopOutcome {
                clean: false,
                detail: format!("cannot send SIGTERM: {e}"),
            };
        }
        // Its own shutdown timeout defaults to 5 s; all bench connections are closed already.
        let patience = Duration::from_secs(20);
        let deadline = Instant::now() + patience;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                _ => break None,
            }
        };
        match status {
            Some(status) if status.success() => StopOutcome {
                clean: true,
                detail: "exited 0 on SIGTERM".into(),
            },
            Some(status) => StopOutcome {
                clean: false,
                detail: format!(
                    "{} on SIGTERM: {}",
                    describe(status),
                    self.last_log_line().unwrap_or_default()
                ),
            },
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                StopOutcome {
                    clean: false,
                    detail: format!(
                        "still running {} s after SIGTERM; killed",
                        patience.as_secs()
                    ),
                }
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One small round trip to `addr`: does something there echo?
fn probe(addr: SocketAddr) -> std::io::Result<()> {
    use std::io::Write;
    let patience = Duration::from_secs(10);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, patience)?;
    stream.set_read_timeout(Some(patience))?;
    stream.set_write_timeout(Some(patience))?;
    let hello = b"multiecho compare probe\n";
    stream.write_all(hello)?;
    let mut back = [0; 24];
    stream.read_exact(&mut back)?;
    if &back[..] != hello {
        return Err(std::io::Error::other("it sent back different bytes"));
    }
    Ok(())
}

/// Keeps the server's last log lines and reports the address from its
/// `listening on ADDR with the M model` line.
fn drain_log(stderr: impl Read, log: &Mutex<VecDeque<String>>, ready: mpsc::Sender<SocketAddr>) {
    let mut ready = Some(ready);
    let mut reader = BufReader::new(stderr);
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        match reader.read_until(b'\n', &mut bytes) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = strip_ansi(String::from_utf8_lossy(&bytes).trim_end());
        if let Some(addr) = listening_addr(&line) {
            if let Some(ready) = ready.take() {
                let _ = ready.send(addr);
            }
        }
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == LOG_LINES_KEPT {
            log.pop_front();
        }
        log.push_back(line);
    }
}

/// The address in a `listening on ADDR with the M model` line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("listening on ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Progress over the whole sweep: a bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: Mutex<u64>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} (eta {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            total,
            done: Mutex::new(0),
        }
    }

    fn say(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("compare: {text}")),
            None => eprintln!("compare: {text}"),
        }
    }

    fn start_run(&self, name: &str, conns: usize, size: u64, round: u32, repeat: u32) {
        if let Some(bar) = &self.bar {
            let of = if repeat > 1 {
                format!(" (run {round}/{repeat})")
            } else {
                String::new()
            };
            bar.set_message(format!(
                "{name}: {conns} conns, {}{of}",
                report::size_label(size)
            ));
        }
    }

    fn finish_run(&self, name: &str, conns: usize, size: u64, run: &Run) {
        let done = {
            let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
            *done += 1;
            *done
        };
        let mut text = format!(
            "[{done}/{}] {name}: {conns} conns, {}:",
            self.total,
            report::size_label(size)
        );
        if let Some(f) = &run.figures {
            text.push_str(&format!(
                " {:.0} round trips/s, p99 {:.0} µs",
                f.round_trips_per_sec, f.latency_us.p99
            ));
        }
        if let Some(failure) = &run.failure {
            text.push_str(&format!(" FAILED: {failure}"));
        }
        match &self.bar {
            Some(bar) => {
                bar.println(format!("compare: {text}"));
                bar.inc(1);
            }
            None => eprintln!("compare: {text}"),
        }
    }

    fn skip(&self, runs: u64) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) += runs;
        if let Some(bar) = &self.bar {
            bar.inc(runs);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The machine: kernel, CPU, cores; the date and the command line.
fn environment() -> report::Environment {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let kernel = format!(
        "{} {} {}",
        read("/proc/sys/kernel/ostype"),
        read("/proc/sys/kernel/osrelease"),
        std::env::consts::ARCH
    );
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name") || line.starts_with("Model"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    report::Environment {
        kernel,
        cpu_model,
        cores: crate::server::default_workers(),
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        command_line: std::env::args().collect(),
        multiecho_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_servers() {
        let plain = parse_external("c-epoll=127.0.0.1:7000").unwrap();
        assert_eq!(plain.name, "c-epoll");
        assert_eq!(plain.addr, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(plain.pid, None);
        let with_pid = parse_external("socat=[::1]:9@4321").unwrap();
        assert_eq!(with_pid.addr, "[::1]:9".parse().unwrap());
        assert_eq!(with_pid.pid, Some(4321));
        for bad in [
            "127.0.0.1:7000",
            "=127.0.0.1:1",
            "x=nowhere",
            "x=127.0.0.1:1@pid",
        ] {
            assert!(parse_external(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_the_listening_line() {
        let line = "\u{1b}[2m2026-01-01T00:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \
                    listening on 127.0.0.1:40123 with the thread model";
        assert!(!strip_ansi(line).contains('\u{1b}'));
        assert_eq!(
            listening_addr(&strip_ansi(line)),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(listening_addr("nothing here"), None);
    }

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
