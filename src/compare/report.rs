//! The comparison's results as data (serialized to `report.json`), the median over repeated
//! runs, and the Markdown tables a reader can paste into an issue (`report.md`).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Everything a comparison measured, and where.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub environment: Environment,
    pub settings: Settings,
    /// One entry per model (in the order asked for), then per external server.
    pub servers: Vec<ServerResult>,
    /// How much the repeated runs of a point disagreed (`None`: one run per point).
    #[serde(default)]
    pub noise: Option<Noise>,
    /// CPU time the host took for other guests during the runs (`None`: not measured).
    #[serde(default)]
    pub steal: Option<Steal>,
}

/// The noise the sweep measured: how far apart the runs of one point are, in round trips
/// per second, as (highest − lowest) ÷ median over the runs of each point that ran more than
/// once without failing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Noise {
    /// How many points the spreads come from.
    pub points: usize,
    /// The median of the points' spreads (0.1 = 10%).
    pub median_spread: f64,
    /// The widest spread, and where: "server at N conns, S".
    pub widest_spread: f64,
    pub widest_at: String,
}

/// Stolen CPU time above which a run is called disturbed in the report.
pub const STEAL_LIMIT_PERCENT: f64 = 5.0;

/// CPU time the host took from this (virtual) machine for other guests during the runs'
/// windows: a benchmark on a busy host measures the host as well as the servers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Steal {
    /// Runs whose window was measured.
    pub runs: usize,
    /// The most stolen in any one run, in percent of the machine's CPU time.
    pub worst_percent: f64,
    /// Runs with more than [`STEAL_LIMIT_PERCENT`] stolen.
    pub runs_over_limit: usize,
}

impl Steal {
    /// The steal of `servers`' runs; `None` where none was measured (no /proc/stat, or a
    /// report from before compare measured it).
    pub fn of(servers: &[ServerResult]) -> Option<Steal> {
        let steals: Vec<f64> = servers
            .iter()
            .flat_map(|server| &server.points)
            .flat_map(|point| &point.runs)
            .filter_map(|run| run.figures.as_ref()?.steal_percent)
            .collect();
        Some(Steal {
            runs: steals.len(),
            worst_percent: steals.iter().copied().reduce(f64::max)?,
            runs_over_limit: steals.iter().filter(|&&s| s > STEAL_LIMIT_PERCENT).count(),
        })
    }
}

impl Noise {
    /// The noise of `servers`' points.
    pub fn of(servers: &[ServerResult]) -> Option<Noise> {
        let mut spreads: Vec<(f64, String)> = Vec::new();
        for server in servers {
            for point in server.points.iter().filter(|p| !p.failed) {
                let rates: Vec<f64> = point
                    .runs
                    .iter()
                    .filter_map(|run| run.figures.as_ref().map(|f| f.round_trips_per_sec))
                    .collect();
                let Some(middle) = median(rates.iter().copied()).filter(|m| *m > 0.0) else {
                    continue;
                };
                if rates.len() < 2 {
                    continue;
                }
                let high = rates.iter().copied().fold(f64::MIN, f64::max);
                let low = rates.iter().copied().fold(f64::MAX, f64::min);
                let at = format!(
                    "{} at {}, {}",
                    server.name,
                    conns_label(point.conns),
                    size_label(point.size)
                );
                spreads.push(((high - low) / middle, at));
            }
        }
        let median_spread = median(spreads.iter().map(|(spread, _)| *spread))?;
        let (widest_spread, widest_at) =
            spreads.iter().max_by(|a, b| a.0.total_cmp(&b.0)).cloned()?;
        Some(Noise {
            points: spreads.len(),
            median_spread,
            widest_spread,
            widest_at,
        })
    }
}

/// The machine and the moment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Environment {
    /// Like `uname -srm`.
    pub kernel: String,
    pub cpu_model: String,
    /// CPUs this process may run on.
    pub cores: usize,
    /// UTC, RFC 3339.
    pub date: String,
    pub command_line: Vec<String>,
    pub multiecho_version: String,
    /// The git commit the binary was built from (`None`: not built from a git checkout, or
    /// a report from before compare recorded it).
    #[serde(default)]
    pub commit: Option<String>,
    /// Whether the built sources (src/, Cargo.toml, Cargo.lock, build.rs) had changes not
    /// committed when the binary was built.
    #[serde(default)]
    pub tree_dirty: Option<bool>,
    /// The working directory the command ran in (relative paths in it are from there).
    #[serde(default)]
    pub working_directory: Option<String>,
    /// `/proc/loadavg` when the sweep started: other work on the machine.
    #[serde(default)]
    pub load_average: Option<String>,
}

/// What was asked for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub conns: Vec<usize>,
    pub sizes: Vec<u64>,
    pub duration_secs: f64,
    pub warmup_secs: f64,
    pub repeat: u32,
    pub bench_threads: Option<usize>,
    pub workers: Option<u64>,
    /// CPUs the servers were pinned to (`None`: not pinned).
    pub server_cpus: Option<String>,
    /// CPUs the load generator was pinned to (`None`: not pinned).
    pub client_cpus: Option<String>,
    /// Churn: bench opened a new connection every this many round trips.
    #[serde(default)]
    pub requests_per_conn: Option<u64>,
    /// UDP echo (`--udp`): a round trip is a datagram echoed, a connection a flow.
    #[serde(default)]
    pub udp: bool,
    /// Messages in flight per connection (`--pipeline`; `None`: bench's default).
    #[serde(default)]
    pub pipeline: Option<u64>,
}

/// One server's part of the comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerResult {
    pub name: String,
    /// `model` (started by compare) or `external` (already running).
    pub kind: String,
    pub address: Option<String>,
    /// Why this server was not measured (it could not start, for example).
    pub skipped: Option<String>,
    /// How a started model stopped after SIGTERM.
    pub stop: Option<StopOutcome>,
    pub points: Vec<Point>,
}

impl ServerResult {
    /// The point measured at `conns` connections and `size`-byte messages.
    pub fn point(&self, conns: usize, size: u64) -> Option<&Point> {
        self.points
            .iter()
            .find(|p| p.conns == conns && p.size == size)
    }
}

/// How a server ended after SIGTERM: it must exit 0.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StopOutcome {
    pub clean: bool,
    pub detail: String,
}

/// One sweep point: a number of connections and a message size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Point {
    pub conns: usize,
    pub size: u64,
    /// A run saw errors or mismatches, or produced no figures.
    pub failed: bool,
    pub failures: Vec<String>,
    /// The median of each figure over the runs that produced figures.
    pub median: Option<Figures>,
    pub runs: Vec<Run>,
}

impl Point {
    /// A point from its runs: medians, and failed if any run failed.
    pub fn from_runs(conns: usize, size: u64, runs: Vec<Run>) -> Point {
        let failures: Vec<String> = runs.iter().filter_map(|r| r.failure.clone()).collect();
        let figures: Vec<Figures> = runs.iter().filter_map(|r| r.figures.clone()).collect();
        Point {
            conns,
            size,
            failed: !failures.is_empty(),
            failures,
            median: Figures::median(&figures),
            runs,
        }
    }
}

impl Point {
    /// Whether any run got wrong bytes back.
    pub fn saw_mismatches(&self) -> bool {
        self.runs
            .iter()
            .filter_map(|run| run.figures.as_ref())
            .any(|figures| figures.mismatches > 0.0)
    }
}

/// One run of the load generator against one point.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub figures: Option<Figures>,
    pub failure: Option<String>,
}

/// What one run (or the median of several) measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub requests: f64,
    pub duration_secs: f64,
    pub round_trips_per_sec: f64,
    pub bytes_per_sec: f64,
    pub mb_per_sec: f64,
    pub latency_us: Latency,
    pub connections: f64,
    pub errors: f64,
    pub mismatches: f64,
    /// Server CPU time (user+system, descendants included) per round trip, in µs.
    pub server_cpu_us_per_round_trip: Option<f64>,
    /// Server CPU time per second of wall time over the measured window (1.0 = one core).
    pub server_cpu_cores: Option<f64>,
    /// The largest resident memory of the server and its descendants together while the run
    /// went on (sampled every 100 ms), in KiB.
    pub peak_rss_kib: Option<f64>,
    /// Connections opened per second of the measured window (what churn measures).
    #[serde(default)]
    pub connections_per_sec: Option<f64>,
    /// p99 of the time a connect took, in µs.
    #[serde(default)]
    pub connect_p99_us: Option<f64>,
    /// UDP: datagrams sent and not echoed within bench's --udp-timeout, in % of those sent.
    #[serde(default)]
    pub lost_percent: Option<f64>,
    /// UDP: echoes that came back more than once.
    #[serde(default)]
    pub duplicates: Option<f64>,
    /// UDP: echoes that came back after a later one of their flow.
    #[serde(default)]
    pub reordered: Option<f64>,
    /// The share of the whole machine's CPU time that the hypervisor gave to other guests
    /// during the measured window (steal in /proc/stat), in percent: a run with much of it
    /// measured the host's other work as well as the server.
    #[serde(default)]
    pub steal_percent: Option<f64>,
}

/// Round-trip latency percentiles, in µs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// The median of `values`, or `None` when there are none.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

impl Figures {
    /// The median of each figure separately over `runs`; `None` when there are no runs.
    pub fn median(runs: &[Figures]) -> Option<Figures> {
        if runs.is_empty() {
            return None;
        }
        let of = |get: fn(&Figures) -> f64| median(runs.iter().map(get)).unwrap_or(0.0);
        let of_some = |get: fn(&Figures) -> Option<f64>| median(runs.iter().filter_map(get));
        Some(Figures {
            requests: of(|f| f.requests),
            duration_secs: of(|f| f.duration_secs),
            round_trips_per_sec: of(|f| f.round_trips_per_sec),
            bytes_per_sec: of(|f| f.bytes_per_sec),
            mb_per_sec: of(|f| f.mb_per_sec),
            latency_us: Latency {
                p50: of(|f| f.latency_us.p50),
                p90: of(|f| f.latency_us.p90),
                p99: of(|f| f.latency_us.p99),
                p999: of(|f| f.latency_us.p999),
                max: of(|f| f.latency_us.max),
            },
            connections: of(|f| f.connections),
            errors: of(|f| f.errors),
            mismatches: of(|f| f.mismatches),
            server_cpu_us_per_round_trip: of_some(|f| f.server_cpu_us_per_round_trip),
            server_cpu_cores: of_some(|f| f.server_cpu_cores),
            peak_rss_kib: of_some(|f| f.peak_rss_kib),
            connections_per_sec: of_some(|f| f.connections_per_sec),
            connect_p99_us: of_some(|f| f.connect_p99_us),
            lost_percent: of_some(|f| f.lost_percent),
            duplicates: of_some(|f| f.duplicates),
            reordered: of_some(|f| f.reordered),
            steal_percent: of_some(|f| f.steal_percent),
        })
    }
}

/// A figure the report tabulates and charts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    RoundTripsPerSec,
    P99Latency,
    CpuPerRoundTrip,
    PeakRss,
    Lost,
    Duplicates,
    Reordered,
}

impl Metric {
    pub const ALL: [Metric; 7] = [
        Metric::RoundTripsPerSec,
        Metric::P99Latency,
        Metric::CpuPerRoundTrip,
        Metric::PeakRss,
        Metric::Lost,
        Metric::Duplicates,
        Metric::Reordered,
    ];

    /// The metrics a report shows: what the network did to datagrams only over UDP.
    pub fn shown(settings: &Settings) -> impl Iterator<Item = Metric> {
        let udp = settings.udp;
        Metric::ALL.into_iter().filter(move |m| {
            udp || !matches!(m, Metric::Lost | Metric::Duplicates | Metric::Reordered)
        })
    }

    /// A title for tables and charts.
    pub fn title(self) -> &'static str {
        match self {
            Metric::RoundTripsPerSec => "Round trips per second",
            Metric::P99Latency => "p99 round-trip latency (µs)",
            Metric::CpuPerRoundTrip => "Server CPU time per round trip (µs)",
            Metric::PeakRss => "Peak server RSS (MiB)",
            Metric::Lost => "Datagrams lost (% of those sent)",
            Metric::Duplicates => "Duplicated datagrams (per run)",
            Metric::Reordered => "Reordered datagrams (per run)",
        }
    }

    /// The unit of the value axis.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::RoundTripsPerSec => "round trips/s",
            Metric::P99Latency => "p99 latency (µs)",
            Metric::CpuPerRoundTrip => "CPU µs per round trip",
            Metric::PeakRss => "peak RSS (MiB)",
            Metric::Lost => "lost (%)",
            Metric::Duplicates => "duplicates",
            Metric::Reordered => "reordered",
        }
    }

    /// A short name for files.
    pub fn slug(self) -> &'static str {
        match self {
            Metric::RoundTripsPerSec => "round_trips",
            Metric::P99Latency => "p99_latency",
            Metric::CpuPerRoundTrip => "cpu_per_round_trip",
            Metric::PeakRss => "peak_rss",
            Metric::Lost => "lost",
            Metric::Duplicates => "duplicates",
            Metric::Reordered => "reordered",
        }
    }

    /// This metric's value in `figures`, if measured.
    pub fn value(self, figures: &Figures) -> Option<f64> {
        match self {
            Metric::RoundTripsPerSec => Some(figures.round_trips_per_sec),
            Metric::P99Latency => Some(figures.latency_us.p99),
            Metric::CpuPerRoundTrip => figures.server_cpu_us_per_round_trip,
            Metric::PeakRss => figures.peak_rss_kib.map(|kib| kib / 1024.0),
            Metric::Lost => figures.lost_percent,
            Metric::Duplicates => figures.duplicates,
            Metric::Reordered => figures.reordered,
        }
    }

    fn format(self, value: f64) -> String {
        match self {
            Metric::RoundTripsPerSec | Metric::Duplicates | Metric::Reordered => {
                thousands(value.round() as u64)
            }
            Metric::P99Latency if value >= 100.0 => thousands(value.round() as u64),
            Metric::P99Latency | Metric::CpuPerRoundTrip | Metric::PeakRss | Metric::Lost => {
                if value >= 100.0 {
                    format!("{value:.0}")
                } else if value >= 10.0 {
                    format!("{value:.1}")
                } else {
                    format!("{value:.2}")
                }
            }
        }
    }
}

/// `1234567` as `1,234,567`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A message size for headings: `64 B`, `16 KiB`.
pub fn size_label(size: u64) -> String {
    if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{} MiB", size >> 20)
    } else if size >= 1 << 10 && size.is_multiple_of(1 << 10) {
        format!("{} KiB", size >> 10)
    } else {
        format!("{size} B")
    }
}

/// `1 conn`, `50 conns`.
pub fn conns_label(conns: usize) -> String {
    format!("{conns} conn{}", if conns == 1 { "" } else { "s" })
}

/// Text safe inside a Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// One table: rows = servers, columns = connection counts.
fn table(report: &Report, size: u64, metric: Metric) -> String {
    let conns = &report.settings.conns;
    let mut out = String::new();
    let _ = write!(out, "| server |");
    for c in conns {
        let _ = write!(out, " {} |", conns_label(*c));
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(conns.len()));
    out.push('\n');
    for server in &report.servers {
        let _ = write!(out, "| {} |", cell(&server.name));
        for &c in conns {
            let text = if server.skipped.is_some() {
                "skipped".to_string()
            } else {
                match server.point(c, size) {
                    None => "–".to_string(),
                    Some(point) => {
                        let value = point.median.as_ref().and_then(|f| metric.value(f));
                        let mut text = value.map_or("–".to_string(), |v| metric.format(v));
                        if point.failed {
                            text.push_str(" ✗");
                        }
                        text
                    }
                }
            };
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
    out
}

/// What a reader of the report must know before trusting its figures: an unpinned run, a
/// single round, a binary built from uncommitted or unknown source.
pub fn warnings(report: &Report) -> Vec<String> {
    let settings = &report.settings;
    let mut warnings = Vec::new();
    if settings.server_cpus.is_none() || settings.client_cpus.is_none() {
        warnings.push(
            "the servers and the load generator were not both pinned (--server-cpus, \
             --client-cpus), so they competed for the same CPUs: the figures mix their costs \
             and vary more from run to run."
                .to_string(),
        );
    }
    if settings.repeat < 2 {
        warnings.push(
            "each point ran once (--repeat 1): nothing measures the noise, and on a busy \
             machine runs seconds apart can differ by tens of percent. Compare with \
             --repeat 3 or more."
                .to_string(),
        );
    }
    if let Some(steal) = Steal::of(&report.servers).filter(|s| s.runs_over_limit > 0) {
        warnings.push(format!(
            "in {} of {} runs the host gave more than {STEAL_LIMIT_PERCENT}% of this \
             machine's CPU time to other guests (at most {:.1}%): those runs measured the \
             host's other work as well as the servers, and their ratios are not to be trusted.",
            steal.runs_over_limit, steal.runs, steal.worst_percent
        ));
    }
    match report.environment.tree_dirty {
        Some(true) => warnings.push(
            "the binary was built from uncommitted changes: the commit below does not \
             hold the code that was measured."
                .to_string(),
        ),
        Some(false) => {}
        None => warnings.push(
            "the commit the binary was built from is not recorded: the code measured cannot \
             be traced."
                .to_string(),
        ),
    }
    warnings
}

/// `commit 0123abcd…`, with whether the tree was dirty.
fn describe_commit(env: &Environment) -> String {
    match (&env.commit, env.tree_dirty) {
        (Some(commit), Some(true)) => format!("commit {commit}, with uncommitted changes"),
        (Some(commit), Some(false)) => format!("commit {commit}, clean tree"),
        (Some(commit), None) => format!("commit {commit}"),
        (None, _) => "commit not recorded".to_string(),
    }
}

/// A command line as a shell would take it back: words with spaces or quotes are quoted.
fn shell_words(words: &[String]) -> String {
    let quote = |word: &String| {
        let plain = !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
        if plain {
            word.clone()
        } else {
            format!("'{}'", word.replace('\'', r"'\''"))
        }
    };
    words.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// The whole `report.md`: the setting, a table per size and metric, the charts, and every
/// skipped server, failed point and unclean stop with its reason.
pub fn markdown(report: &Report, charts: &[String]) -> String {
    let env = &report.environment;
    let settings = &report.settings;
    let mut out = String::new();
    let _ = writeln!(out, "# multiecho compare\n");
    for warning in warnings(report) {
        let _ = writeln!(out, "> **Warning:** {warning}\n");
    }
    let _ = writeln!(out, "- Date: {}", env.date);
    let _ = writeln!(out, "- Kernel: {}", env.kernel);
    let _ = writeln!(out, "- CPU: {} ({} cores usable)", env.cpu_model, env.cores);
    if let Some(load) = &env.load_average {
        let _ = writeln!(out, "- Load average at the start (/proc/loadavg): {load}");
    }
    let pinning = |cpus: &Option<String>| cpus.clone().unwrap_or_else(|| "not pinned".into());
    let _ = writeln!(
        out,
        "- Pinning: server {}, load generator {}",
        pinning(&settings.server_cpus),
        pinning(&settings.client_cpus)
    );
    let _ = writeln!(
        out,
        "- Each point: {} s measured after {} s warm-up; median of {} run{}; runs \
         interleaved (round-robin across the servers for each point, so machine drift hits \
         them alike)",
        settings.duration_secs,
        settings.warmup_secs,
        settings.repeat,
        if settings.repeat == 1 { "" } else { "s" }
    );
    if let Some(workers) = settings.workers {
        let _ = writeln!(out, "- Workers: {workers}");
    }
    if settings.udp {
        let _ =
            writeln!(
            out,
            "- UDP echo: a connection is a flow (its own source port), a round trip a datagram \
             echoed; {} datagram(s) in flight per flow",
            settings.pipeline.map_or("bench's default number of".into(), |n| n.to_string())
        );
    }
    if let Some(n) = settings.requests_per_conn {
        let _ = writeln!(
            out,
            "- Churn: a new connection every {n} round trip{}, so each figure includes what \
             opening and closing a connection costs the server (connections per second and \
             connect p99 are in report.json)",
            if n == 1 { "" } else { "s" }
        );
    }
    match Noise::of(&report.servers) {
        Some(noise) => {
            let _ = writeln!(
                out,
                "- Noise: the runs of a point differ by a median of {:.0}% in round trips/s \
                 (highest − lowest ÷ median, over {} points); the widest, {:.0}%, at {}",
                noise.median_spread * 100.0,
                noise.points,
                noise.widest_spread * 100.0,
                noise.widest_at
            );
        }
        None => {
            let _ = writeln!(out, "- Noise: not measured (no point ran more than once)");
        }
    }
    if let Some(steal) = Steal::of(&report.servers) {
        let _ = writeln!(
            out,
            "- Steal: the host gave other guests at most {:.1}% of this machine's CPU time in \
             a run's window ({} of {} runs over {STEAL_LIMIT_PERCENT}%)",
            steal.worst_percent, steal.runs_over_limit, steal.runs
        );
    }
    let _ = writeln!(out, "- Command: `{}`", shell_words(&env.command_line));
    if let Some(dir) = &env.working_directory {
        let _ = writeln!(out, "- Run in: `{dir}`");
    }
    let _ = writeln!(
        out,
        "- multiecho {}, {}",
        env.multiecho_version,
        describe_commit(env)
    );
    out.push_str(
        "\nServer CPU time is user+system time of the server and all its processes \
         (reaped children included) over the measured window, divided by the round trips. \
         ✗ marks a point where the load generator saw errors or mismatched bytes (see \
         Problems below). The models that serve a fixed number of connections at once \
         (iterative: one; pool and prefork: one per worker) leave the other clients waiting \
         in the backlog, so with more connections than that their waiting clients time out: \
         a ✗ there shows the model's limit, not lost data.\n",
    );
    for &size in &settings.sizes {
        let _ = writeln!(out, "\n## {} messages\n", size_label(size));
        for metric in Metric::shown(settings) {
            let _ = writeln!(out, "### {}\n", metric.title());
            out.push_str(&table(report, size, metric));
            out.push('\n');
        }
    }
    if !charts.is_empty() {
        out.push_str("## Charts\n\n");
        for chart in charts {
            let _ = writeln!(out, "![{chart}]({chart})");
        }
        out.push('\n');
    }
    let mut problems = Vec::new();
    for server in &report.servers {
        if let Some(reason) = &server.skipped {
            problems.push(format!("{}: skipped: {reason}", server.name));
        }
        for point in server.points.iter().filter(|p| p.failed) {
            // Repeated runs often fail alike: say each failure once, with how often.
            let mut distinct: Vec<(&str, usize)> = Vec::new();
            for failure in &point.failures {
                match distinct
                    .iter_mut()
                    .find(|(text, _)| *text == failure.as_str())
                {
                    Some((_, count)) => *count += 1,
                    None => distinct.push((failure, 1)),
                }
            }
            for (failure, count) in distinct {
                let runs = point.runs.len();
                let often = if runs > 1 {
                    format!(" (in {count} of {runs} runs)")
                } else {
                    String::new()
                };
                problems.push(format!(
                    "{} at {}, {}: {failure}{often}",
                    server.name,
                    conns_label(point.conns),
                    size_label(point.size)
                ));
            }
        }
        if let Some(stop) = server.stop.as_ref().filter(|s| !s.clean) {
            problems.push(format!(
                "{}: did not stop cleanly: {}",
                server.name, stop.detail
            ));
        }
    }
    out.push_str("## Problems\n\n");
    if problems.is_empty() {
        out.push_str("None: every server ran, every byte came back, every server exited 0.\n");
    }
    for problem in problems {
        let _ = writeln!(out, "- {}", problem.replace('\n', " "));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report with made-up figures: two servers that ran (one with a failed point) and one
    /// skipped.
    pub(crate) fn synthetic() -> Report {
        let figures = |rps: f64, p99: f64, cpu: f64| Figures {
            requests: rps,
            duration_secs: 1.0,
            round_trips_per_sec: rps,
            bytes_per_sec: rps * 64.0,
            mb_per_sec: rps * 64.0 / 1e6,
            latency_us: Latency {
                p50: p99 / 2.0,
                p90: p99 / 1.5,
                p99,
                p999: p99 * 2.0,
                max: p99 * 3.0,
            },
            connections: 1.0,
            errors: 0.0,
            mismatches: 0.0,
            server_cpu_us_per_round_trip: Some(cpu),
            server_cpu_cores: Some(0.5),
            peak_rss_kib: Some(4096.0),
            connections_per_sec: None,
            connect_p99_us: None,
            lost_percent: None,
            duplicates: None,
            steal_percent: None,
            reordered: None,
        };
        let ran = |name: &str, scale: f64| ServerResult {
            name: name.into(),
            kind: "model".into(),
            address: Some("127.0.0.1:1".into()),
            skipped: None,
            stop: Some(StopOutcome {
                clean: true,
                detail: "exited 0".into(),
            }),
            points: [1, 50]
                .iter()
                .map(|&conns| {
                    let f = figures(12345.6 * scale * conns as f64, 80.0 * conns as f64, 7.25);
                    Point::from_runs(
                        conns,
                        64,
                        vec![Run {
                            figures: Some(f),
                            failure: None,
                        }],
                    )
                })
                .collect(),
        };
        let mut failing = ran("pool", 2.0);
        failing.points[1] = Point::from_runs(
            50,
            64,
            vec![Run {
                figures: Some(figures(10.0, 5.0, 1.0)),
                failure: Some("bench exited with status 1: 3 mismatches".into()),
            }],
        );
        Report {
            environment: Environment {
                kernel: "Linux 6.1.0 x86_64".into(),
                cpu_model: "Test CPU".into(),
                cores: 2,
                date: "2026-01-01T00:00:00Z".into(),
                command_line: vec!["multiecho".into(), "compare".into()],
                multiecho_version: "0.1.0".into(),
                commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
                tree_dirty: Some(false),
                working_directory: Some("/src/multiecho".into()),
                load_average: Some("0.50 0.40 0.30 1/100 1234".into()),
            },
            settings: Settings {
                conns: vec![1, 50],
                sizes: vec![64],
                duration_secs: 1.0,
                warmup_secs: 0.0,
                repeat: 1,
                bench_threads: None,
                workers: None,
                server_cpus: Some("0".into()),
                client_cpus: None,
                requests_per_conn: None,
                udp: false,
                pipeline: None,
            },
            noise: None,
            steal: None,
            servers: vec![
                ran("thread", 1.0),
                failing,
                ServerResult {
                    name: "uring".into(),
                    kind: "model".into(),
                    address: None,
                    skipped: Some("io_uring is unavailable".into()),
                    stop: None,
                    points: Vec::new(),
                },
            ],
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median([]), None);
        let a = Figures {
            round_trips_per_sec: 1.0,
            server_cpu_us_per_round_trip: None,
            ..Figures::default()
        };
        let b = Figures {
            round_trips_per_sec: 5.0,
            server_cpu_us_per_round_trip: Some(2.0),
            ..Figures::default()
        };
        let c = Figures {
            round_trips_per_sec: 3.0,
            ..b.clone()
        };
        let m = Figures::median(&[a, b, c]).unwrap();
        assert_eq!(m.round_trips_per_sec, 3.0);
        assert_eq!(m.server_cpu_us_per_round_trip, Some(2.0));
        assert!(Figures::median(&[]).is_none());
    }

    #[test]
    fn markdown_tables() {
        let md = markdown(&synthetic(), &["round_trips_64B.svg".into()]);
        assert!(md.contains("## 64 B messages"), "{md}");
        let expected = "\
| server | 1 conn | 50 conns |
|---|---:|---:|
| thread | 12,346 | 617,280 |
| pool | 24,691 | 10 ✗ |
| uring | skipped | skipped |
";
        assert!(md.contains(expected), "{md}");
        assert!(md.contains("| thread | 80.0 | 4,000 |"), "{md}");
        assert!(md.contains("| thread | 7.25 | 7.25 |"), "{md}");
        assert!(md.contains("| thread | 4.00 | 4.00 |"), "{md}");
        assert!(
            md.contains("- uring: skipped: io_uring is unavailable"),
            "{md}"
        );
        assert!(
            md.contains("pool at 50 conns, 64 B: bench exited with status 1"),
            "{md}"
        );
        assert!(
            md.contains("![round_trips_64B.svg](round_trips_64B.svg)"),
            "{md}"
        );
        assert!(md.contains("server 0, load generator not pinned"), "{md}");
        assert!(
            md.contains("commit 0123456789abcdef0123456789abcdef01234567, clean tree"),
            "{md}"
        );
        assert!(md.contains("- Noise: not measured"), "{md}");
        assert!(md.contains("- Load average at the start"), "{md}");
    }

    #[test]
    fn warns_of_an_unpinned_run_with_one_round() {
        let mut report = synthetic();
        let md = markdown(&report, &[]);
        assert!(
            md.contains("> **Warning:** the servers and the load generator were not both pinned"),
            "{md}"
        );
        assert!(md.contains("> **Warning:** each point ran once"), "{md}");
        report.settings.client_cpus = Some("1".into());
        report.settings.repeat = 3;
        report.environment.tree_dirty = Some(true);
        let warnings = warnings(&report);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("uncommitted changes"), "{warnings:?}");
        report.environment.tree_dirty = Some(false);
        assert!(super::warnings(&report).is_empty());
    }

    #[test]
    fn noise_is_the_spread_of_the_runs_of_a_point() {
        let mut report = synthetic();
        let run = |rps: f64| Run {
            figures: Some(Figures {
                round_trips_per_sec: rps,
                ..Figures::default()
            }),
            failure: None,
        };
        report.servers[0].points[0] =
            Point::from_runs(1, 64, vec![run(90.0), run(100.0), run(110.0)]);
        report.servers[0].points[1] =
            Point::from_runs(50, 64, vec![run(100.0), run(150.0), run(200.0)]);
        let noise = Noise::of(&report.servers).unwrap();
        assert_eq!(noise.points, 2);
        // Spreads of 20% and 67%: their median is their mean.
        assert!(
            (noise.median_spread - (0.2 + 2.0 / 3.0) / 2.0).abs() < 1e-9,
            "{noise:?}"
        );
        assert!((noise.widest_spread - 2.0 / 3.0).abs() < 1e-9, "{noise:?}");
        assert_eq!(noise.widest_at, "thread at 50 conns, 64 B");
        let md = markdown(&report, &[]);
        assert!(md.contains("differ by a median of 43%"), "{md}");
    }

    #[test]
    fn stolen_cpu_time_is_reported_and_warned_of_over_the_limit() {
        let mut report = synthetic();
        report.settings.client_cpus = Some("1".into());
        report.settings.repeat = 3;
        report.environment.tree_dirty = Some(false);
        let run = |steal: Option<f64>| Run {
            figures: Some(Figures {
                round_trips_per_sec: 100.0,
                steal_percent: steal,
                ..Figures::default()
            }),
            failure: None,
        };
        report.servers[0].points[0] = Point::from_runs(1, 64, vec![run(None), run(None)]);
        report.servers[0].points[1] = Point::from_runs(50, 64, vec![run(None)]);
        assert_eq!(Steal::of(&report.servers), None, "not measured");
        assert!(!markdown(&report, &[]).contains("- Steal:"));
        report.servers[0].points[0] = Point::from_runs(1, 64, vec![run(Some(0.5)), run(Some(2.0))]);
        let md = markdown(&report, &[]);
        assert!(
            md.contains(
                "- Steal: the host gave other guests at most 2.0% of this machine's CPU \
                         time in a run's window (0 of 2 runs over 5%)"
            ),
            "{md}"
        );
        assert!(warnings(&report).is_empty(), "{:?}", warnings(&report));
        report.servers[0].points[1] = Point::from_runs(50, 64, vec![run(Some(31.25))]);
        let steal = Steal::of(&report.servers).unwrap();
        assert_eq!((steal.runs, steal.runs_over_limit), (3, 1));
        let warnings = warnings(&report);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with(
                "in 1 of 3 runs the host gave more than 5% of this machine's \
                                     CPU time to other guests (at most 31.2%)"
            ),
            "{warnings:?}"
        );
    }

    #[test]
    fn commands_are_quoted_as_a_shell_takes_them() {
        let words = ["multiecho", "compare", "--out", "my report", "it's"].map(String::from);
        assert_eq!(
            shell_words(&words),
            r"multiecho compare --out 'my report' 'it'\''s'"
        );
    }

    #[test]
    fn repeated_failures_are_said_once() {
        let mut report = synthetic();
        let run = |failure: &str| Run {
            figures: None,
            failure: Some(failure.into()),
        };
        report.servers[0].points[0] =
            Point::from_runs(1, 64, vec![run("reset"), run("timeout"), run("reset")]);
        let md = markdown(&report, &[]);
        assert!(
            md.contains("- thread at 1 conn, 64 B: reset (in 2 of 3 runs)\n"),
            "{md}"
        );
        assert!(
            md.contains("- thread at 1 conn, 64 B: timeout (in 1 of 3 runs)\n"),
            "{md}"
        );
        assert!(md.contains("| thread | – ✗ |"), "{md}");
    }

    #[test]
    fn labels() {
        assert_eq!(size_label(64), "64 B");
        assert_eq!(size_label(16384), "16 KiB");
        assert_eq!(size_label(1 << 20), "1 MiB");
        assert_eq!(size_label(1500), "1500 B");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
