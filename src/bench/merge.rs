//! `multiecho merge FILE...`: one report from the `bench --json` reports of several load
//! generators that loaded one server at the same time.
//!
//! Counts are summed and latency histograms added, never percentiles averaged (an average
//! of p99s is no p99 of anything). Rates are taken over the common window, from the earliest
//! start of any report's measured window to the latest end, so a generator that started
//! late cannot make the total look faster than it was. Reports whose settings differ (other
//! than each generator's own threads and source addresses) are refused: they measured
//! different things.

use std::path::PathBuf;

use anyhow::{bail, Context};

use super::histogram;
use super::report::{Interval, Latency, Report, TlsFigures};

/// Runs `multiecho merge` on `files`: prints the merged report (as JSON with `json`); fails
/// if any run had errors.
pub fn run(files: &[PathBuf], json: bool) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let report: Report = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a `multiecho bench --json` report",
                file.display()
            )
        })?;
        reports.push((file.display().to_string(), report));
    }
    let merged = merge(&reports)?;
    let text = if json {
        merged.to_json() + "\n"
    } else {
        merged.to_text()
    };
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    if !merged.is_clean() {
        bail!(
            "{} mismatches and {} errors in the merged runs",
            merged.mismatches,
            merged.errors
        );
    }
    Ok(())
}

/// Merges named reports; refuses reports whose settings differ.
pub fn merge(reports: &[(String, Report)]) -> anyhow::Result<Report> {
    let Some((first_name, first)) = reports.first() else {
        bail!("nothing to merge");
    };
    let key = first.config.merge_key();
    for (name, report) in &reports[1..] {
        if report.config.merge_key() != key {
            bail!(
                "{name} and {first_name} were run with different settings ({}); \
                 only runs of the same benchmark can be merged",
                differences(&first.config, &report.config)
            );
        }
    }
    let add = |pick: fn(&Report) -> Option<&String>| -> anyhow::Result<Option<_>> {
        let mut total = histogram::new_latency();
        for (name, report) in reports {
            let Some(text) = pick(report) else {
                return Ok(None);
            };
            let hist =
                histogram::decode(text).with_context(|| format!("{name}: a bad histogram"))?;
            total
                .add(&hist)
                .map_err(|e| anyhow::anyhow!("{name}: cannot add its histogram: {e:?}"))?;
        }
        Ok(Some(total))
    };
    let latency = add(|r| Some(&r.latency_histogram))?.expect("every report has one");
    let uncorrected = add(|r| r.uncorrected_latency_histogram.as_ref())?;
    let connect = add(|r| Some(&r.connect_latency_histogram))?.expect("every report has one");
    let handshake = add(|r| r.tls.as_ref().map(|t| &t.handshake_latency_histogram))?;

    let start = reports
        .iter()
        .map(|(_, r)| r.window_start_unix)
        .fold(f64::INFINITY, f64::min);
    let end = reports
        .iter()
        .map(|(_, r)| r.window_end_unix)
        .fold(f64::NEG_INFINITY, f64::max);
    let window = (end - start).max(0.0);
    let per_sec = |n: f64| if window > 0.0 { n / window } else { 0.0 };
    let sum = |f: fn(&Report) -> u64| reports.iter().map(|(_, r)| f(r)).sum::<u64>();
    let requests = sum(|r| r.requests);
    let bytes = sum(|r| r.bytes);
    // Connections opened in the measured windows: each report's rate times its window.
    let opened_measured: f64 = reports
        .iter()
        .map(|(_, r)| r.connections_per_sec * r.duration_secs)
        .sum();
    let mut failures: Vec<_> = reports
        .iter()
        .flat_map(|(_, r)| r.failures.clone())
        .collect();
    failures.truncate(super::generator::MAX_FAILURES);
    Ok(Report {
        requests,
        duration_secs: window,
        requests_per_sec: per_sec(requests as f64),
        bytes_per_sec: per_sec(bytes as f64),
        latency_us: Latency::of(&latency),
        connections: sum(|r| r.connections),
        errors: sum(|r| r.errors),
        mismatches: sum(|r| r.mismatches),
        connect_failures: sum(|r| r.connect_failures),
        first_connect_error: reports
            .iter()
            .find_map(|(_, r)| r.first_connect_error.clone()),
        first_error: reports.iter().find_map(|(_, r)| r.first_error.clone()),
        failures,
        backlog: sum(|r| r.backlog),
        interrupted: reports.iter().any(|(_, r)| r.interrupted),
        config: first.config.clone(),
        bytes,
        window_start_unix: start,
        window_end_unix: end,
        latency_histogram: histogram::encode(&latency),
        uncorrected_latency_us: uncorrected.as_ref().map(Latency::of),
        uncorrected_latency_histogram: uncorrected.as_ref().map(histogram::encode),
        connect_latency_us: Latency::of(&connect),
        connect_latency_histogram: histogram::encode(&connect),
        connections_per_sec: per_sec(opened_measured),
        intervals: merge_intervals(reports)?,
        merged_reports: reports.iter().map(|(_, r)| r.merged_reports).sum(),
        tls: handshake.map(|handshake| TlsFigures {
            handshakes: reports
                .iter()
                .filter_map(|(_, r)| r.tls.as_ref())
                .map(|t| t.handshakes)
                .sum(),
            // Handshakes in the measured windows: each report's rate times its window.
            handshakes_per_sec: per_sec(
                reports
                    .iter()
                    .filter_map(|(_, r)| Some(r.tls.as_ref()?.handshakes_per_sec * r.duration_secs))
                    .sum(),
            ),
            handshake_latency_us: Latency::of(&handshake),
            handshake_latency_histogram: histogram::encode(&handshake),
        }),
    })
}

/// Interval `i` of the merged report adds interval `i` of every report: the generators'
/// windows start within moments of each other when they were started together.
fn merge_intervals(reports: &[(String, Report)]) -> anyhow::Result<Vec<Interval>> {
    let count = reports
        .iter()
        .map(|(_, r)| r.intervals.len())
        .max()
        .unwrap_or(0);
    let mut merged = Vec::with_capacity(count);
    for i in 0..count {
        let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("valid precision");
        let (mut requests, mut bytes_per_sec, mut secs, mut start_secs) = (0, 0.0, 0.0f64, 0.0);
        for (name, report) in reports {
            let Some(interval) = report.intervals.get(i) else {
                continue;
            };
            let part = histogram::decode(&interval.latency_histogram)
                .with_context(|| format!("{name}: interval {i} has a bad histogram"))?;
            hist.add(&part)
                .map_err(|e| anyhow::anyhow!("{name}: interval {i}: {e:?}"))?;
            requests += interval.requests;
            bytes_per_sec += interval.bytes_per_sec;
            secs = secs.max(interval.secs);
            start_secs = interval.start_secs;
        }
        merged.push(Interval {
            start_secs,
            secs,
            requests,
            requests_per_sec: if secs > 0.0 {
                requests as f64 / secs
            } else {
                0.0
            },
            bytes_per_sec,
            latency_us: Latency::of(&hist),
            latency_histogram: histogram::encode(&hist),
        });
    }
    Ok(merged)
}

/// The settings that differ, named, for the refusal.
fn differences(a: &super::report::Config, b: &super::report::Config) -> String {
    let (a, b) = (
        serde_json::to_value(a.merge_key()).unwrap_or_default(),
        serde_json::to_value(b.merge_key()).unwrap_or_default(),
    );
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return "unknown".into();
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: {v} vs {}", b.get(k).cloned().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(", ")
}
