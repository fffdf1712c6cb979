//! The figures of a run, as one JSON object (`--json`, read by `multiecho compare`) or as
//! a short text report.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::generator::{Failure, Outcome};
use super::histogram;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// The percentiles of a histogram of nanoseconds, in microseconds to 0.1.
    pub fn of(hist: &Histogram<u64>) -> Latency {
        let us = |ns: u64| (ns as f64 / 1000.0 * 10.0).round() / 10.0;
        if hist.is_empty() {
            return Latency {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        Latency {
            p50: us(hist.value_at_quantile(0.50)),
            p90: us(hist.value_at_quantile(0.90)),
            p99: us(hist.value_at_quantile(0.99)),
            p999: us(hist.value_at_quantile(0.999)),
            max: us(hist.max()),
            mean: (hist.mean() / 100.0).round() / 10.0,
        }
    }
}

/// One `--interval` of the measured window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Interval {
    /// Seconds from the start of the measured window.
    pub start_secs: f64,
    pub secs: f64,
    pub requests: u64,
    pub requests_per_sec: f64,
    pub bytes_per_sec: f64,
    pub latency_us: Latency,
    /// The interval's latency histogram (see [`histogram`]), for `merge`.
    pub latency_histogram: String,
}

/// How the run was set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub addr: String,
    pub conns: usize,
    pub size: usize,
    pub pipeline: usize,
    pub threads: usize,
    pub warmup_secs: f64,
    pub duration_secs: Option<f64>,
    pub requests: Option<u64>,
    pub rate: Option<f64>,
    pub source_addrs: usize,
    /// Churn: round trips per connection before it is closed and a new one opened.
    #[serde(default)]
    pub requests_per_conn: Option<u64>,
    /// Length of the per-interval figures, if asked for.
    #[serde(default)]
    pub interval_secs: Option<f64>,
    /// The target was tls://.
    #[serde(default)]
    pub tls: bool,
}

impl Config {
    /// The settings that must agree for reports to be merged: everything but what is local
    /// to one load generator (its threads and source addresses).
    pub fn merge_key(&self) -> Config {
        Config {
            threads: 0,
            source_addrs: 0,
            ..self.clone()
        }
    }
}

/// Everything a run measured. `compare` reads it back from `bench --json` through this same
/// type, so a change here that compare cannot read fails to compile or its tests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Round trips completed in the measured window (warm-up excluded).
    pub requests: u64,
    pub duration_secs: f64,
    pub requests_per_sec: f64,
    /// Echoed payload bytes per second (one direction).
    pub bytes_per_sec: f64,
    pub latency_us: Latency,
    /// Connections opened.
    pub connections: u64,
    /// Failed connections other than mismatches: connect failures, EOF, resets, timeouts.
    pub errors: u64,
    /// Connections that got a wrong byte back.
    pub mismatches: u64,
    pub connect_failures: u64,
    pub first_connect_error: Option<String>,
    /// The first failure, in words.
    pub first_error: Option<String>,
    /// The first few failures with where they happened.
    pub failures: Vec<Failure>,
    /// Open loop: requests that fell due but were never sent, because every connection was
    /// still waiting for echoes (the server could not keep up with `--rate`).
    pub backlog: u64,
    /// The run was cut short by SIGINT/SIGTERM.
    pub interrupted: bool,
    pub config: Config,
    /// Echoed payload bytes in the measured window.
    pub bytes: u64,
    /// The measured window, in seconds since the Unix epoch (for `merge`).
    pub window_start_unix: f64,
    pub window_end_unix: f64,
    /// `latency_us`'s histogram: HdrHistogram V2, deflate-compressed, base64.
    pub latency_histogram: String,
    /// Open loop: latency from the actual send, not the schedule (what a closed-loop tool
    /// that suffers coordinated omission would report).
    pub uncorrected_latency_us: Option<Latency>,
    pub uncorrected_latency_histogram: Option<String>,
    /// How long connects took, and how many connections opened per second of the measured
    /// window (the figure that matters with `--churn`).
    pub connect_latency_us: Latency,
    pub connect_latency_histogram: String,
    pub connections_per_sec: f64,
    /// Per-interval figures (`--interval`).
    pub intervals: Vec<Interval>,
    /// How many reports `merge` combined into this one (1 for a single run).
    #[serde(default = "one")]
    pub merged_reports: usize,
    /// tls:// targets: the handshakes.
    #[serde(default)]
    pub tls: Option<TlsFigures>,
}

/// The TLS handshakes of a run (all full handshakes: bench does not resume sessions).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsFigures {
    /// Handshakes completed, warm-up and connecting included.
    pub handshakes: u64,
    /// Handshakes completed in the measured window, per second (the figure with `--churn`;
    /// without it every handshake happens before the window).
    pub handshakes_per_sec: f64,
    /// From the TCP connection being established to the handshake being complete.
    pub handshake_latency_us: Latency,
    pub handshake_latency_histogram: String,
}

fn one() -> usize {
    1
}

impl Report {
    /// The report of a run that measured `outcome` over `duration_secs` from
    /// `window_start_unix`.
    pub fn new(
        outcome: &Outcome,
        duration_secs: f64,
        window_start_unix: f64,
        config: Config,
    ) -> Self {
        let per_sec = |n: u64| {
            if duration_secs > 0.0 {
                n as f64 / duration_secs
            } else {
                0.0
            }
        };
        let mut failures = outcome.failures.clone();
        failures.sort_by_key(|f| f.connection);
        failures.truncate(super::generator::MAX_FAILURES);
        let first_error = failures
            .first()
            .map(|f| f.to_string())
            .or_else(|| outcome.first_connect_error.clone());
        let open_loop = config.rate.is_some();
        let intervals = config
            .interval_secs
            .map(|len| intervals(outcome, len, duration_secs))
            .unwrap_or_default();
        Report {
            requests: outcome.requests,
            duration_secs,
            requests_per_sec: per_sec(outcome.requests),
            bytes_per_sec: per_sec(outcome.bytes),
            latency_us: Latency::of(&outcome.latency_ns),
            connections: outcome.opened,
            errors: outcome.errors,
            mismatches: outcome.mismatches,
            connect_failures: outcome.connect_failures,
            first_connect_error: outcome.first_connect_error.clone(),
            first_error,
            failures,
            backlog: outcome.backlog,
            interrupted: false,
            config,
            bytes: outcome.bytes,
            window_start_unix,
            window_end_unix: window_start_unix + duration_secs,
            latency_histogram: histogram::encode(&outcome.latency_ns),
            uncorrected_latency_us: open_loop.then(|| Latency::of(&outcome.uncorrected_ns)),
            uncorrected_latency_histogram: open_loop
                .then(|| histogram::encode(&outcome.uncorrected_ns)),
            connect_latency_us: Latency::of(&outcome.connect_ns),
            connect_latency_histogram: histogram::encode(&outcome.connect_ns),
            connections_per_sec: per_sec(outcome.opened_measured),
            intervals,
            merged_reports: 1,
            tls: outcome.tls.as_ref().map(|tls| TlsFigures {
                handshakes: tls.handshakes,
                handshakes_per_sec: per_sec(tls.handshakes_measured),
                handshake_latency_us: Latency::of(&tls.handshake_ns),
                handshake_latency_histogram: histogram::encode(&tls.handshake_ns),
            }),
        }
    }

    /// True when every byte came back right on every connection.
    pub fn is_clean(&self) -> bool {
        self.errors == 0 && self.mismatches == 0
    }

    /// One JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let c = &self.config;
        let mut out = String::new();
        let mode = match (c.rate, c.requests) {
            (Some(rate), _) => format!("open loop at {rate} req/s"),
            (None, _) => format!("pipeline {}", c.pipeline),
        };
        let _ = writeln!(
            out,
            "multiecho bench {}: {}, {} B messages, {mode}, {}",
            c.addr,
            counted(c.conns as u64, "connection"),
            c.size,
            counted(c.threads as u64, "thread")
        );
        let _ = writeln!(
            out,
            "  round trips   {} in {:.2}s = {:.0}/s",
            self.requests, self.duration_secs, self.requests_per_sec
        );
        let _ = writeln!(
            out,
            "  throughput    {:.2} MB/s each way",
            self.bytes_per_sec / 1e6
        );
        let line = |l: &Latency| {
            format!(
                "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
                l.p50, l.p90, l.p99, l.p999, l.max
            )
        };
        match &self.uncorrected_latency_us {
            Some(uncorrected) => {
                let _ = writeln!(
                    out,
                    "  latency (us)  {}   (corrected: from the scheduled send)",
                    line(&self.latency_us)
                );
                let _ = writeln!(
                    out,
                    "  uncorrected   {}   (from the actual send: what coordinated omission shows)",
                    line(uncorrected)
                );
            }
            None => {
                let _ = writeln!(out, "  latency (us)  {}", line(&self.latency_us));
            }
        }
        let _ = writeln!(
            out,
            "  connections   {} opened, {} failed to connect",
            self.connections, self.connect_failures
        );
        if c.requests_per_conn.is_some() {
            let _ = writeln!(
                out,
                "  churn         {:.0} connections/s, {} round trips each",
                self.connections_per_sec,
                c.requests_per_conn.unwrap_or(1)
            );
        }
        let _ = writeln!(out, "  connect (us)  {}", line(&self.connect_latency_us));
        if let Some(tls) = &self.tls {
            let rate = if c.requests_per_conn.is_some() {
                format!(", {:.0}/s in the measured window", tls.handshakes_per_sec)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  tls           {} full handshakes{rate}",
                tls.handshakes
            );
            let _ = writeln!(out, "  handshake (us) {}", line(&tls.handshake_latency_us));
        }
        if self.merged_reports > 1 {
            let _ = writeln!(
                out,
                "  merged        {} reports, rates over their common window",
                self.merged_reports
            );
        }
        if !self.intervals.is_empty() {
            let _ = writeln!(
                out,
                "  intervals     start      req/s      MB/s    p50 us    p99 us    max us"
            );
            for i in &self.intervals {
                let _ = writeln!(
                    out,
                    "                {:>5.1}s {:>10.0} {:>9.2} {:>9.1} {:>9.1} {:>9.1}",
                    i.start_secs,
                    i.requests_per_sec,
                    i.bytes_per_sec / 1e6,
                    i.latency_us.p50,
                    i.latency_us.p99,
                    i.latency_us.max
                );
            }
        }
        if self.backlog > 0 {
            let _ = writeln!(
                out,
                "  backlog       {} requests fell due but were never sent: the server could not keep up",
                self.backlog
            );
        }
        if self.interrupted {
            let _ = writeln!(out, "  interrupted   the run was cut short");
        }
        let _ = writeln!(out, "  errors        {}", self.errors);
        let _ = writeln!(out, "  mismatches    {}", self.mismatches);
        if let Some(e) = &self.first_connect_error {
            let _ = writeln!(out, "  first connect error: {e}");
        }
        for failure in &self.failures {
            let _ = writeln!(out, "  {:?}: {failure}", failure.kind);
        }
        let shown = self.failures.len() as u64;
        let total = self.errors + self.mismatches - self.connect_failures;
        if total > shown {
            let _ = writeln!(out, "  ... and {} more failed connections", total - shown);
        }
        out
    }
}

/// The per-interval figures of `outcome`, intervals of `len` seconds over `duration_secs`.
fn intervals(outcome: &Outcome, len: f64, duration_secs: f64) -> Vec<Interval> {
    outcome
        .intervals
        .iter()
        .enumerate()
        .map(|(i, interval)| {
            let start_secs = i as f64 * len;
            // The last interval may be cut short by the end of the window.
            let secs = (duration_secs - start_secs).clamp(0.0, len);
            let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
            Interval {
                start_secs,
                secs,
                requests: interval.requests,
                requests_per_sec: per_sec(interval.requests),
                bytes_per_sec: per_sec(interval.bytes),
                latency_us: Latency::of(&interval.latency_ns),
                latency_histogram: histogram::encode(&interval.latency_ns),
            }
        })
        .collect()
}

/// `1 connection`, `50 connections`.
fn counted(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::counted;

    #[test]
    fn counts_agree_with_their_noun() {
        assert_eq!(counted(1, "connection"), "1 connection");
        assert_eq!(counted(0, "thread"), "0 threads");
        assert_eq!(counted(50, "connection"), "50 connections");
    }
}
