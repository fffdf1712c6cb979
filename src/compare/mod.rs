//! `multiecho compare`: start every model (or use servers already running), load each with
//! `multiecho bench` at every point of a sweep over connections and message sizes, and
//! write a side-by-side report: `report.json` (every figure), `report.md` (tables to paste
//! into an issue) and SVG charts.
//!
//! All servers run for the whole sweep, each on its own port, and take turns: for each
//! point, every round of `--repeat` gives each server one run in turn (A B C A B C), so a
//! drift in the machine's speed over the minutes of a sweep hits all servers alike instead
//! of whichever happened to run last. The report is rewritten after every point, so an
//! interrupted sweep still leaves the figures so far.
//!
//! Both the servers and the load generator run as child processes of this one (the running
//! binary, `serve` and `bench`), so each can be pinned to its own CPUs and a server's cost
//! can be read from /proc without counting the load generator. While a run goes on, the
//! loaded server's resident memory (its descendants included) is sampled every 100 ms; its
//! CPU time is read when the warm-up ends and when the measured window ends.
//!
//! `--tls` runs every model a second time behind `tls://` (named `MODEL+tls`), beside the
//! plain one, so the report shows what TLS costs each; a model that does not serve TLS (its
//! server refuses to start) is listed as skipped with its reason. The TLS servers present one
//! certificate (`--tls-cert`, or one made at start and written into the report directory),
//! and bench trusts exactly it.
//!
//! A model that cannot start here is listed as skipped with the server's last log line as
//! the reason; a point whose load generator saw errors or mismatched bytes is kept, marked
//! failed. After the report is written, compare exits non-zero if any server sent back wrong
//! bytes or did not exit 0 on SIGTERM; other errors (often a model's designed limit, such as
//! the iterative model's one client at a time) are reported but not fatal.

mod charts;
mod cpus;
mod procfs;
mod progress;
mod report;
mod runner;
mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context;

pub use cpus::{parse_cpu_list, CpuList};
pub use report::{Figures, Latency, Point, Report, Run, ServerResult, StopOutcome};

use crate::server::Model;
use progress::Progress;
use runner::{run_bench, Target};
use server::ServerProcess;

/// A comparison, validated from its command line by `cli`: every list without repeats, in
/// the order given.
#[derive(Clone, Debug)]
pub struct ComparePlan {
    /// The models to start and compare.
    pub models: Vec<Model>,
    /// Connection counts to sweep.
    pub conns: Vec<usize>,
    /// Message sizes to sweep, in bytes.
    pub sizes: Vec<u64>,
    /// Measured time per run.
    pub duration: Duration,
    /// Unmeasured warm-up before each run's measured time.
    pub warmup: Duration,
    /// Runs per point and server; the report gives their medians.
    pub repeat: u32,
    /// bench's `--threads`; `None`: bench's default.
    pub threads: Option<usize>,
    /// `--workers` for the models that take them; `None`: their default.
    pub workers: Option<u64>,
    /// CPUs the servers are pinned to.
    pub server_cpus: Option<CpuList>,
    /// CPUs the load generator is pinned to.
    pub client_cpus: Option<CpuList>,
    /// Servers already running, compared too.
    pub external: Vec<External>,
    /// Churn: bench opens a new connection every this many round trips.
    pub requests_per_conn: Option<u64>,
    /// Compare UDP echo (`--udp`): the models that serve `udp://` listen on one too, the
    /// others are skipped, and externals are UDP echo servers.
    pub udp: bool,
    /// bench's `--pipeline`; `None`: bench's default.
    pub pipeline: Option<u64>,
    /// Which transports `--tls` sweeps; `None`: plain TCP only.
    pub tls: Option<TlsSweep>,
    /// `--tls-cert` and `--tls-key`: the certificate the TLS servers present.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Where report.json, report.md and the charts go.
    pub out: PathBuf,
    /// Measure nothing: redraw the report in this directory from its report.json.
    pub redraw: Option<PathBuf>,
}

/// Which transports `--tls` sweeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsSweep {
    /// Plain TCP and TLS, side by side.
    Both,
    /// TLS alone.
    Only,
}

/// The certificate and key the TLS servers of a comparison present.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ComparePlan {
    /// Whether any contender speaks TLS.
    fn uses_tls(&self) -> bool {
        self.tls.is_some() || self.external.iter().any(|e| e.tls)
    }

    /// The transports each model is started on: plain, TLS, or both.
    fn transports(&self) -> Vec<bool> {
        match self.tls {
            None => vec![false],
            Some(TlsSweep::Both) => vec![false, true],
            Some(TlsSweep::Only) => vec![true],
        }
    }
}

/// An echo server compare does not start: `NAME=ADDR[@PID]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct External {
    pub name: String,
    pub addr: SocketAddr,
    pub pid: Option<i32>,
    /// Named with tls://ADDR.
    pub tls: bool,
}

/// Whether the model takes `--workers`.
fn takes_workers(model: Model) -> bool {
    matches!(
        model,
        Model::Prefork | Model::Pool | Model::Epoll | Model::Async | Model::Uring
    )
}

/// Runs `multiecho compare`.
pub fn run(plan: &ComparePlan) -> anyhow::Result<()> {
    if let Some(dir) = &plan.redraw {
        for file in redraw(dir)? {
            println!("{}", file.display());
        }
        return Ok(());
    }
    let exe = std::env::current_exe().context("cannot find the multiecho executable")?;
    std::fs::create_dir_all(&plan.out)
        .with_context(|| format!("cannot create {}", plan.out.display()))?;

    let settings = report::Settings {
        conns: plan.conns.clone(),
        sizes: plan.sizes.clone(),
        duration_secs: plan.duration.as_secs_f64(),
        warmup_secs: plan.warmup.as_secs_f64(),
        repeat: plan.repeat,
        bench_threads: plan.threads,
        workers: plan.workers,
        server_cpus: plan.server_cpus.as_ref().map(ToString::to_string),
        client_cpus: plan.client_cpus.as_ref().map(ToString::to_string),
        requests_per_conn: plan.requests_per_conn,
        udp: plan.udp,
        pipeline: plan.pipeline,
    };
    let models = &plan.models;

    let runs_per_server = (settings.conns.len() * settings.sizes.len()) as u64 * plan.repeat as u64;
    let servers = (models.len() * plan.transports().len() + plan.external.len()) as u64;
    let progress = Progress::new(servers * runs_per_server);
    let tls = if plan.uses_tls() {
        Some(tls_files(plan)?)
    } else {
        None
    };
    // If one fails to start, dropping the others kills them.
    let mut contenders = start_all(&exe, models, plan, tls.as_ref(), &progress, runs_per_server)?;
    let mut report = Report {
        environment: environment(),
        settings,
        servers: Vec::new(),
        noise: None,
        steal: None,
    };
    let swept = sweep(&exe, plan, &mut contenders, &mut report, &progress);
    // Stopped even when the sweep failed (a report it could not write, say).
    for contender in &mut contenders {
        contender.stop(&progress);
    }
    progress.finish();
    swept?;
    report.servers = contenders.into_iter().map(|c| c.result).collect();
    let files = write_report(&report, &plan.out)?;
    for file in files {
        println!("{}", file.display());
    }
    for warning in report::warnings(&report) {
        eprintln!("compare: warning: {warning}");
    }
    let points = || report.servers.iter().flat_map(|s| &s.points);
    let failed_points = points().filter(|p| p.failed).count();
    let corrupted: Vec<&str> = report
        .servers
        .iter()
        .filter(|s| s.points.iter().any(Point::saw_mismatches))
        .map(|s| s.name.as_str())
        .collect();
    let unclean: Vec<&str> = report
        .servers
        .iter()
        .filter(|s| s.stop.as_ref().is_some_and(|stop| !stop.clean))
        .map(|s| s.name.as_str())
        .collect();
    if !corrupted.is_empty() || !unclean.is_empty() {
        let mut problems = Vec::new();
        if !corrupted.is_empty() {
            problems.push(format!(
                "wrong bytes came back from {}",
                corrupted.join(", ")
            ));
        }
        if !unclean.is_empty() {
            problems.push(format!("did not stop cleanly: {}", unclean.join(", ")));
        }
        anyhow::bail!(
            "report written to {}, but {} (see report.md)",
            plan.out.display(),
            problems.join("; ")
        );
    }
    if failed_points > 0 {
        // Errors without wrong bytes are often a model's designed limit (more clients than
        // it serves at once), so they are reported, not fatal.
        let points = if failed_points == 1 {
            "point"
        } else {
            "points"
        };
        eprintln!(
            "compare: {failed_points} {points} saw errors; see Problems in {}",
            plan.out.join("report.md").display()
        );
    }
    Ok(())
}

/// The TLS servers' certificate and key: `--tls-cert`/`--tls-key`, or a self-signed pair
/// for localhost and 127.0.0.1 made now (rcgen) and written into the report directory.
fn tls_files(plan: &ComparePlan) -> anyhow::Result<TlsFiles> {
    if let (Some(cert), Some(key)) = (&plan.tls_cert, &plan.tls_key) {
        return Ok(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        });
    }
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("cannot make a TLS certificate")?;
    let files = TlsFiles {
        cert: plan.out.join("tls-cert.pem"),
        key: plan.out.join("tls-key.pem"),
    };
    std::fs::write(&files.cert, made.cert.pem())
        .with_context(|| format!("cannot write {}", files.cert.display()))?;
    std::fs::write(&files.key, made.signing_key.serialize_pem())
        .with_context(|| format!("cannot write {}", files.key.display()))?;
    Ok(files)
}

/// Makes `command`'s process get SIGTERM if compare dies first (killed, say), so no server
/// or load generator is left running behind it.
fn end_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes the prctl
    // system call (async-signal-safe, no allocation, no locks).
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
}

/// Writes report.json, the charts and report.md into `dir`; returns their paths.
fn write_report(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let report = &Report {
        noise: report::Noise::of(&report.servers),
        steal: report::Steal::of(&report.servers),
        ..report.clone()
    };
    let json = serde_json::to_string_pretty(report)?;
    let json_path = dir.join("report.json");
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    let charts = charts::write_all(report, dir)
        .with_context(|| format!("cannot write the charts into {}", dir.display()))?;
    let md_path = dir.join("report.md");
    std::fs::write(&md_path, report::markdown(report, &charts))
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    let mut files = vec![json_path, md_path];
    files.extend(charts.iter().map(|chart| dir.join(chart)));
    Ok(files)
}

/// Rewrites the charts and report.md in `dir` from its report.json (left as it is); returns
/// the paths written.
pub fn redraw(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let json_path = dir.join("report.json");
    let json = std::fs::read_to_string(&json_path)
        .with_context(|| format!("cannot read {}", json_path.display()))?;
    let report: Report = serde_json::from_str(&json)
        .with_context(|| format!("{} is not a compare report", json_path.display()))?;
    let charts = charts::write_all(&report, dir)
        .with_context(|| format!("cannot write the charts into {}", dir.display()))?;
    let md_path = dir.join("report.md");
    std::fs::write(&md_path, report::markdown(&report, &charts))
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    let mut files = vec![md_path];
    files.extend(charts.iter().map(|chart| dir.join(chart)));
    Ok(files)
}

/// One server of the comparison: its part of the report and, unless it was skipped, where
/// to load it. Dropping it kills the server compare started, if still running.
struct Contender {
    result: ServerResult,
    /// Where it listens and its process; `None` when it was skipped.
    target: Option<Target>,
    /// The server compare started and stops (`None` for an external one).
    process: Option<ServerProcess>,
    /// The runs of the point being measured, so far.
    runs: Vec<Run>,
}

impl Contender {
    /// A contender not yet measured, not yet given a target.
    fn new(name: String, kind: &str) -> Contender {
        Contender {
            result: ServerResult {
                name,
                kind: kind.into(),
                address: None,
                skipped: None,
                stop: None,
                points: Vec::new(),
            },
            target: None,
            process: None,
            runs: Vec::new(),
        }
    }

    /// Starts `model`. A model that cannot start here is a skipped contender with the
    /// reason, its `runs_per_server` runs counted as done.
    fn start_model(
        exe: &Path,
        model: Model,
        plan: &ComparePlan,
        tls: Option<&TlsFiles>,
        progress: &Progress,
        runs_per_server: u64,
    ) -> anyhow::Result<Contender> {
        let name = match tls {
            Some(_) => format!("{}+tls", model.name()),
            None => model.name().to_string(),
        };
        let mut contender = Contender::new(name.clone(), "model");
        if plan.udp && !model.serves_udp() {
            let reason = format!("no udp:// (these models serve it: {})", Model::udp_models());
            progress.skip(runs_per_server);
            contender.result.skipped = Some(reason);
            return Ok(contender);
        }
        progress.say(&format!("starting the {name} server"));
        match ServerProcess::start(exe, model, plan, tls)? {
            Ok(server) => {
                let scheme = if tls.is_some() { "tls://" } else { "" };
                contender.result.address = Some(format!("{scheme}{}", server.addr));
                contender.target = Some(Target {
                    addr: server.addr,
                    pid: Some(server.child.id() as i32),
                    tls_ca: tls.map(|files| files.cert.clone()),
                });
                contender.process = Some(server);
            }
            Err(reason) => {
                progress.say(&format!("{name}: skipped: {reason}"));
                progress.skip(runs_per_server);
                contender.result.skipped = Some(reason);
            }
        }
        Ok(contender)
    }

    /// A server that is already running.
    fn external(external: &External, tls: Option<&TlsFiles>) -> Contender {
        let mut contender = Contender::new(external.name.clone(), "external");
        let scheme = if external.tls { "tls://" } else { "" };
        contender.result.address = Some(format!("{scheme}{}", external.addr));
        contender.target = Some(Target {
            addr: external.addr,
            pid: external.pid,
            tls_ca: tls.filter(|_| external.tls).map(|files| files.cert.clone()),
        });
        contender
    }

    /// One run of bench at `conns` connections and `size`-byte messages, kept for the
    /// point's medians; a failed run without bench if the server has died. Nothing for a
    /// skipped contender.
    fn run_once(
        &mut self,
        exe: &Path,
        plan: &ComparePlan,
        (conns, size): (usize, u64),
        round: u32,
        progress: &Progress,
    ) {
        let Some(target) = self.target.clone() else {
            return;
        };
        let name = &self.result.name;
        progress.start_run(name, conns, size, round, plan.repeat);
        let run = match self.process.as_mut().and_then(ServerProcess::exit_reason) {
            Some(reason) => Run {
                figures: None,
                failure: Some(reason),
            },
            None => run_bench(exe, &target, conns, size, plan),
        };
        progress.finish_run(name, conns, size, round, plan.repeat, &run);
        self.runs.push(run);
    }

    /// Makes the runs so far the point at `conns` connections and `size`-byte messages.
    fn finish_point(&mut self, (conns, size): (usize, u64)) {
        if self.target.is_some() {
            let runs = std::mem::take(&mut self.runs);
            self.result.points.push(Point::from_runs(conns, size, runs));
        }
    }

    /// Stops the server compare started, if any, and records how it stopped.
    fn stop(&mut self, progress: &Progress) {
        let Some(server) = self.process.take() else {
            return;
        };
        let stop = server.stop();
        if !stop.clean {
            let name = &self.result.name;
            progress.say(&format!("{name}: did not stop cleanly: {}", stop.detail));
        }
        self.result.stop = Some(stop);
    }
}

/// Starts every model, each on its own port, then adds the external servers: the
/// contenders in report order.
fn start_all(
    exe: &Path,
    models: &[Model],
    plan: &ComparePlan,
    tls: Option<&TlsFiles>,
    progress: &Progress,
    runs_per_server: u64,
) -> anyhow::Result<Vec<Contender>> {
    let mut contenders = Vec::new();
    for &model in models {
        for over_tls in plan.transports() {
            let files = tls.filter(|_| over_tls);
            let contender =
                Contender::start_model(exe, model, plan, files, progress, runs_per_server)?;
            contenders.push(contender);
        }
    }
    contenders.extend(
        plan.external
            .iter()
            .map(|external| Contender::external(external, tls)),
    );
    Ok(contenders)
}

/// Measures every point of the sweep on every contender, writing the report so far after
/// each point.
fn sweep(
    exe: &Path,
    plan: &ComparePlan,
    contenders: &mut [Contender],
    report: &mut Report,
    progress: &Progress,
) -> anyhow::Result<()> {
    for &size in &report.settings.sizes {
        for &conns in &report.settings.conns {
            measure_point(exe, plan, contenders, (conns, size), progress);
            // A long sweep interrupted later still leaves the figures so far.
            report.servers = contenders.iter().map(|c| c.result.clone()).collect();
            write_report(report, &plan.out)?;
        }
    }
    Ok(())
}

/// Measures one point (connections, message size) `repeat` times on every contender,
/// round-robin: each round gives every server one run in turn, so a drift in the machine's
/// speed over the minutes of a sweep hits all servers alike instead of whichever ran last.
fn measure_point(
    exe: &Path,
    plan: &ComparePlan,
    contenders: &mut [Contender],
    point: (usize, u64),
    progress: &Progress,
) {
    for round in 1..=plan.repeat {
        for contender in contenders.iter_mut() {
            contender.run_once(exe, plan, point, round, progress);
        }
    }
    for contender in contenders {
        contender.finish_point(point);
    }
}

/// The last non-empty line of `text`.
fn last_line(text: &str) -> Option<String> {
    text.lines()
        .rfind(|line| !line.trim().is_empty())
        .map(|line| line.trim().to_string())
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

/// The machine: kernel, CPU, cores, load; the date, the command line and the commit.
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
        commit: option_env!("MULTIECHO_COMMIT").map(str::to_string),
        tree_dirty: option_env!("MULTIECHO_TREE_DIRTY").map(|dirty| dirty == "true"),
        working_directory: std::env::current_dir()
            .ok()
            .map(|dir| dir.display().to_string()),
        load_average: Some(read("/proc/loadavg")).filter(|load| !load.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--redraw` rewrites report.md and the charts from report.json alone, and leaves
    /// report.json as it was.
    #[test]
    fn redraws_from_report_json() {
        let dir = std::env::temp_dir().join(format!("multiecho-redraw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = serde_json::to_string_pretty(&report::tests::synthetic()).unwrap();
        std::fs::write(dir.join("report.json"), &json).unwrap();
        let files = redraw(&dir).unwrap();
        assert_eq!(files.len(), 5, "{files:?}");
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(md.contains("| pool | 24,691 | 10 ✗ |"), "{md}");
        assert!(
            md.contains("![round_trips_64B.svg](round_trips_64B.svg)"),
            "{md}"
        );
        assert!(dir.join("peak_rss_64B.svg").exists());
        assert_eq!(
            std::fs::read_to_string(dir.join("report.json")).unwrap(),
            json
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
