//! `multiecho check TARGET`: a conformance battery for any echo server, or a proxy in front
//! of one.
//!
//! Every class of echo bug has shipped in a tool people use: data dropped on half-close,
//! the unwritten rest of a short write thrown away, one read taken for one message, crossed
//! connections, idle connections closed early. Each check here provokes one of them and
//! gives a verdict with evidence: what was sent, what came back, and where it first
//! differed. The checks live in groups: [`payload`] (sizes, byte values, pieces,
//! pipelining), [`stream`] (half-close, a slow reader, an idle pause) and [`conns`] (many
//! connections at once, a reset among them, connect/close storms). [`exchange`] is the one
//! verified send-and-read every check is built on.
//!
//! Time and load are bounded: every socket operation has a timeout, each check a deadline,
//! the battery a time limit (`--time-limit`, 60 s by default), and no check opens more than
//! `--max-conns` connections at once.

pub mod conns;
pub mod exchange;
pub mod payload;
pub mod stream;

use std::io::{IsTerminal, Write};
use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;

/// What `multiecho check` does, validated from its command line by `cli`.
#[derive(Debug, Clone)]
pub struct CheckPlan {
    /// The server to check: HOST:PORT or tcp://HOST:PORT (see [`parse_target`]).
    pub target: String,
    /// One JSON object on stdout instead of the table.
    pub json: bool,
    /// Run only these checks (all when empty).
    pub only: Vec<String>,
    /// Do not run these checks.
    pub skip: Vec<String>,
    /// List the checks instead of running them.
    pub list: bool,
    /// At most this many connections open at once.
    pub max_conns: usize,
    /// The largest payload of the `sizes` check.
    pub max_size: usize,
    /// How long the `idle` check leaves a connection silent.
    pub idle_pause: Duration,
    /// The whole battery's time limit.
    pub time_limit: Duration,
}

/// Where a check's sockets go and the bounds they keep to.
#[derive(Debug, Clone)]
pub struct Context {
    pub target: exchange::Target,
    pub max_conns: usize,
    pub max_size: usize,
    pub idle_pause: Duration,
    /// When the battery's time limit runs out: no exchange waits past it.
    pub deadline: Instant,
}

impl Context {
    /// `wanted`, or less if the time limit is nearer.
    pub fn bound(&self, wanted: Duration) -> Duration {
        wanted.min(self.deadline.saturating_duration_since(Instant::now()))
    }
}

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    /// Not run: the battery's time limit ran out first.
    NotRun,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::NotRun => "not run",
        })
    }
}

/// What a check sent, what came back, and where the two first differed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Evidence {
    pub sent: String,
    pub received: String,
    /// Where the echo first differed from what was sent (absent when it did not).
    pub first_difference: Option<String>,
}

/// The finding of one check.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub verdict: Verdict,
    /// One line: what was found.
    pub summary: String,
    pub evidence: Evidence,
}

impl Finding {
    pub fn pass(summary: impl Into<String>, evidence: Evidence) -> Self {
        Finding {
            verdict: Verdict::Pass,
            summary: summary.into(),
            evidence,
        }
    }

    pub fn fail(summary: impl Into<String>, evidence: Evidence) -> Self {
        Finding {
            verdict: Verdict::Fail,
            summary: summary.into(),
            evidence,
        }
    }

    /// A failure of an exchange described by `sent`, where what came back (or the error) is
    /// `received` and no byte-level difference applies.
    pub fn fail_exchange(sent: &str, summary: String, received: String) -> Self {
        Finding::fail(
            summary,
            Evidence {
                sent: sent.to_string(),
                received,
                first_difference: None,
            },
        )
    }
}

/// A named check.
pub struct Check {
    pub name: &'static str,
    /// What it does, for `--list` and the report.
    pub about: &'static str,
    pub run: fn(&Context) -> Finding,
}

/// Every check, in the order they run (cheap ones first).
pub fn battery() -> Vec<Check> {
    let mut checks = payload::checks();
    checks.extend(stream::checks());
    checks.extend(conns::checks());
    checks
}

/// One check's result in the report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub about: &'static str,
    pub verdict: Verdict,
    pub summary: String,
    pub secs: f64,
    pub evidence: Evidence,
}

/// The battery's report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub target: String,
    pub passed: bool,
    pub checks: Vec<CheckResult>,
}

/// Parses TARGET: `HOST:PORT`, `tcp://HOST:PORT` or `tcp+proxy://HOST:PORT` (every
/// connection begins with a PROXY protocol v1 header); other schemes are refused by name.
pub fn parse_target(text: &str) -> anyhow::Result<exchange::Target> {
    let (rest, proxy_header) = match text.split_once("://") {
        None => (text, false),
        Some(("tcp", rest)) => (rest, false),
        Some(("tcp+proxy", rest)) => (rest, true),
        Some((scheme, _)) => bail!(
            "check does not speak {scheme}:// (its checks need a plain TCP stream): give \
             HOST:PORT, tcp://HOST:PORT or tcp+proxy://HOST:PORT"
        ),
    };
    let addr = rest
        .to_socket_addrs()
        .with_context(|| format!("invalid target '{text}': expected HOST:PORT or tcp://HOST:PORT"))?
        .next()
        .with_context(|| format!("'{text}' resolves to no address"))?;
    Ok(exchange::Target { addr, proxy_header })
}

/// Chooses the checks `--only` and `--skip` leave, refusing unknown names.
fn select(plan: &CheckPlan) -> anyhow::Result<Vec<Check>> {
    let checks = battery();
    for name in plan.only.iter().chain(&plan.skip) {
        if !checks.iter().any(|c| c.name == name) {
            let known: Vec<&str> = checks.iter().map(|c| c.name).collect();
            bail!("no check named '{name}' (the checks: {})", known.join(", "));
        }
    }
    Ok(checks
        .into_iter()
        .filter(|c| plan.only.is_empty() || plan.only.iter().any(|n| n == c.name))
        .filter(|c| !plan.skip.iter().any(|n| n == c.name))
        .collect())
}

/// Runs the checks `plan` selects against its target.
pub fn run_battery(plan: &CheckPlan) -> anyhow::Result<CheckReport> {
    let target = parse_target(&plan.target)?;
    let addr = target.addr;
    let checks = select(plan)?;
    let open_files = crate::net::raise_open_files_limit().context("cannot raise RLIMIT_NOFILE")?;
    if plan.max_conns as u64 + 64 > open_files {
        bail!(
            "--max-conns {} needs more open files than the limit allows ({open_files})",
            plan.max_conns
        );
    }
    let context = Context {
        target,
        max_conns: plan.max_conns,
        max_size: plan.max_size,
        idle_pause: plan.idle_pause,
        deadline: Instant::now() + plan.time_limit,
    };
    // One connect first, so an unreachable target is one clear error, not a table of failures.
    exchange::connect(target).with_context(|| format!("cannot connect to {addr}"))?;
    let started = Instant::now();
    let mut results = Vec::new();
    for check in checks {
        let (finding, secs) = if started.elapsed() >= plan.time_limit {
            let finding = Finding {
                verdict: Verdict::NotRun,
                summary: format!("the time limit ({:?}) ran out first", plan.time_limit),
                evidence: Evidence::default(),
            };
            (finding, 0.0)
        } else {
            let at = Instant::now();
            let finding = (check.run)(&context);
            (finding, at.elapsed().as_secs_f64())
        };
        results.push(CheckResult {
            name: check.name,
            about: check.about,
            verdict: finding.verdict,
            summary: finding.summary,
            secs,
            evidence: finding.evidence,
        });
    }
    Ok(CheckReport {
        target: addr.to_string(),
        passed: results.iter().all(|r| r.verdict == Verdict::Pass),
        checks: results,
    })
}

impl CheckReport {
    /// The table, then the evidence of every check that did not pass.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let _ = writeln!(out, "multiecho check {}", self.target);
        let _ = writeln!(
            out,
            "  {:width$}  {:7}  {:>6}  finding",
            "check", "verdict", "time"
        );
        for c in &self.checks {
            let _ = writeln!(
                out,
                "  {:width$}  {:7}  {:>5.1}s  {}",
                c.name,
                c.verdict.to_string(),
                c.secs,
                c.summary
            );
        }
        for c in self.checks.iter().filter(|c| c.verdict == Verdict::Fail) {
            let _ = writeln!(out, "\n{} ({}):", c.name, c.about);
            let _ = writeln!(out, "  sent:     {}", c.evidence.sent);
            let _ = writeln!(out, "  received: {}", c.evidence.received);
            if let Some(diff) = &c.evidence.first_difference {
                let _ = writeln!(out, "  differed: {diff}");
            }
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.verdict != Verdict::Pass)
            .count();
        let _ = writeln!(
            out,
            "\n{} of {} checks passed",
            self.checks.len() - failed,
            self.checks.len()
        );
        out
    }
}

/// Runs `multiecho check`: prints the report; fails unless every check passed.
pub fn run(plan: &CheckPlan) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if plan.list {
        for check in battery() {
            writeln!(stdout, "{:16} {}", check.name, check.about)?;
        }
        return Ok(());
    }
    let report = run_battery(plan)?;
    let text = if plan.json {
        serde_json::to_string_pretty(&report).expect("a report always serializes") + "\n"
    } else {
        report.to_text()
    };
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    if !report.passed {
        let failed: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| c.verdict != Verdict::Pass)
            .map(|c| c.name)
            .collect();
        if !plan.json && std::io::stdout().is_terminal() {
            // The table already said it; keep the error line short.
            bail!("{} checks failed", failed.len());
        }
        bail!("checks failed: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let plain = parse_target("127.0.0.1:7").unwrap();
        assert_eq!((plain.addr.port(), plain.proxy_header), (7, false));
        assert_eq!(parse_target("tcp://127.0.0.1:7").unwrap(), plain);
        let proxied = parse_target("tcp+proxy://127.0.0.1:7").unwrap();
        assert_eq!((proxied.addr, proxied.proxy_header), (plain.addr, true));
        let err = parse_target("udp://127.0.0.1:7").unwrap_err().to_string();
        assert!(err.contains("check does not speak udp://"), "{err}");
        assert!(parse_target("tls://127.0.0.1:7").is_err());
        assert!(parse_target("127.0.0.1").is_err());
    }

    #[test]
    fn check_names_are_unique() {
        let mut names: Vec<&str> = battery().iter().map(|c| c.name).collect();
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count);
    }
}
