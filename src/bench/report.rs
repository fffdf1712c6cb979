//! The figures of a run, as one JSON object (`--json`, read by `multiecho compare`) or as
//! a short text report.

use std::fmt::Write as _;

use serde::Serialize;

use super::generator::{Failure, Outcome};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// How the run was set up.
#[derive(Debug, Clone, Serialize)]
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
}

/// Everything a run measured. The first eight fields are the contract with `compare`.
#[derive(Debug, Clone, Serialize)]
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
}

impl Report {
    /// The report of a run that measured `outcome` over `duration_secs`.
    pub fn new(outcome: &Outcome, duration_secs: f64, config: Config) -> Self {
        let hist = &outcome.latency_ns;
        let us = |ns: u64| (ns as f64 / 1000.0 * 10.0).round() / 10.0;
        let latency_us = if hist.is_empty() {
            Latency {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                mean: 0.0,
            }
        } else {
            Latency {
                p50: us(hist.value_at_quantile(0.50)),
                p90: us(hist.value_at_quantile(0.90)),
                p99: us(hist.value_at_quantile(0.99)),
                p999: us(hist.value_at_quantile(0.999)),
                max: us(hist.max()),
                mean: (hist.mean() / 100.0).round() / 10.0,
            }
        };
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
        Report {
            requests: outcome.requests,
            duration_secs,
            requests_per_sec: per_sec(outcome.requests),
            bytes_per_sec: per_sec(outcome.bytes),
            latency_us,
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
        let l = &self.latency_us;
        let _ = writeln!(
            out,
            "  latency (us)  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        let _ = writeln!(
            out,
            "  connections   {} opened, {} failed to connect",
            self.connections, self.connect_failures
        );
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
