//! Mergeable bench reports and the figures added with them: `multiecho merge` sums counts
//! and adds histograms (its percentiles are those of one histogram holding every run's
//! samples) and refuses reports of different settings; `--interval` splits the window;
//! open loop reports corrected and uncorrected latency; `--churn` reports connections per
//! second and connect latency, and loses no byte.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};

use multiecho::bench::histogram;
use multiecho::bench::report::Latency;
use serde_json::Value;

fn bench(addr: SocketAddr, extra: &[&str]) -> Value {
    let output = Command::new(common::BIN)
        .arg("bench")
        .arg(addr.to_string())
        .args(["--json", "--threads", "2"])
        .args(extra)
        .output()
        .expect("run multiecho bench");
    json(&output, "bench")
}

fn json(output: &Output, what: &str) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{what} failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{what}: no JSON ({e}): {stdout}"))
}

/// Writes `report` to a file of its own and returns the path.
fn save(report: &Value, name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("merge-{}-{name}.json", std::process::id()));
    std::fs::write(&path, report.to_string()).unwrap();
    path
}

fn merge(files: &[&PathBuf]) -> Output {
    Command::new(common::BIN)
        .arg("merge")
        .args(files)
        .arg("--json")
        .output()
        .expect("run multiecho merge")
}

fn latency(value: &Value) -> Latency {
    serde_json::from_value(value.clone()).expect("latency percentiles")
}

#[test]
fn merge_sums_counts_and_adds_histograms() {
    let server = common::ServerBuilder::new("epoll").start();
    // Two runs of the same benchmark, one after the other, as two generators would make.
    let one = bench(server.addr, &["-c", "4", "-d", "500ms", "--size", "128"]);
    let two = bench(server.addr, &["-c", "4", "-d", "500ms", "--size", "128"]);
    let total = one["requests"].as_u64().unwrap() + two["requests"].as_u64().unwrap();
    let (a, b) = (save(&one, "one"), save(&two, "two"));
    let merged = json(&merge(&[&a, &b]), "merge");

    for field in ["requests", "bytes", "connections", "errors", "mismatches"] {
        assert_eq!(
            merged[field].as_u64().unwrap(),
            one[field].as_u64().unwrap() + two[field].as_u64().unwrap(),
            "{field}"
        );
    }
    assert_eq!(merged["merged_reports"], 2);

    // One histogram holding both runs' samples, recorded value by value.
    let mut both = histogram::new_latency();
    for report in [&one, &two] {
        let hist = histogram::decode(report["latency_histogram"].as_str().unwrap()).unwrap();
        for value in hist.iter_recorded() {
            both.record_n(value.value_iterated_to(), value.count_at_value())
                .unwrap();
        }
    }
    assert_eq!(both.len(), total);
    assert_eq!(latency(&merged["latency_us"]), Latency::of(&both));
    let merged_hist = histogram::decode(merged["latency_histogram"].as_str().unwrap()).unwrap();
    assert_eq!(merged_hist.len(), total);

    // Rates over the window both runs cover, which includes the gap between them.
    let start = one["window_start_unix"].as_f64().unwrap();
    let end = two["window_end_unix"].as_f64().unwrap();
    let window = merged["duration_secs"].as_f64().unwrap();
    assert!(
        (window - (end - start)).abs() < 1e-6,
        "{window} vs {}",
        end - start
    );
    let rate = merged["requests_per_sec"].as_f64().unwrap();
    assert!((rate - total as f64 / window).abs() < 1e-6 * rate.max(1.0));
}

#[test]
fn merge_refuses_reports_of_different_settings() {
    let server = common::ServerBuilder::new("epoll").start();
    let small = save(
        &bench(server.addr, &["-c", "2", "-n", "200", "--size", "64"]),
        "small",
    );
    let large = save(
        &bench(server.addr, &["-c", "2", "-n", "200", "--size", "128"]),
        "large",
    );
    let output = merge(&[&small, &large]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("different settings"), "{stderr}");
    assert!(stderr.contains("size: 64 vs 128"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let junk = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("merge-junk.json");
    std::fs::write(&junk, "{\"requests\": 1}").unwrap();
    let output = merge(&[&small, &junk]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("is not a `multiecho bench --json` report"),
        "{stderr}"
    );
}

#[test]
fn intervals_split_the_measured_window() {
    let server = common::ServerBuilder::new("epoll").start();
    let report = bench(server.addr, &["-c", "4", "-d", "1s", "--interval", "250ms"]);
    let intervals = report["intervals"].as_array().unwrap();
    assert!((4..=5).contains(&intervals.len()), "{intervals:#?}");
    let sum: u64 = intervals
        .iter()
        .map(|i| i["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, report["requests"].as_u64().unwrap());
    for (i, interval) in intervals.iter().enumerate() {
        assert_eq!(interval["start_secs"].as_f64().unwrap(), i as f64 * 0.25);
        assert!(interval["requests"].as_u64().unwrap() > 0, "{interval:#}");
        assert!(interval["latency_us"]["p50"].as_f64().unwrap() > 0.0);
    }
    // Closed loop: there is no schedule to correct for.
    assert!(report["uncorrected_latency_us"].is_null());
}

#[test]
fn open_loop_reports_corrected_and_uncorrected_latency() {
    let server = common::ServerBuilder::new("epoll").start();
    let report = bench(server.addr, &["-c", "4", "-d", "1s", "--rate", "2000"]);
    let corrected = latency(&report["latency_us"]);
    let uncorrected = latency(&report["uncorrected_latency_us"]);
    // Every sample's corrected latency starts at or before its uncorrected one.
    for (c, u) in [
        (corrected.p50, uncorrected.p50),
        (corrected.p99, uncorrected.p99),
        (corrected.max, uncorrected.max),
    ] {
        assert!(
            c >= u && u > 0.0,
            "corrected {corrected:?}, uncorrected {uncorrected:?}"
        );
    }
}

#[test]
fn churn_opens_a_connection_per_request_and_loses_no_byte() {
    let server = common::ServerBuilder::new("epoll").start();
    let report = bench(
        server.addr,
        &["-c", "4", "-n", "600", "--size", "100", "--churn"],
    );
    assert_eq!(report["requests"], 600);
    assert_eq!(report["bytes"], 600 * 100);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["mismatches"], 0);
    // The first 4 connections, then a new one for every request but the last 4.
    let connections = report["connections"].as_u64().unwrap();
    assert!((600..=604).contains(&connections), "{connections}");
    assert!(report["connections_per_sec"].as_f64().unwrap() > 0.0);
    let connect = latency(&report["connect_latency_us"]);
    assert!(
        connect.p50 > 0.0 && connect.max >= connect.p99,
        "{connect:?}"
    );

    let report = bench(
        server.addr,
        &[
            "-c",
            "2",
            "-n",
            "200",
            "--requests-per-conn",
            "10",
            "--pipeline",
            "3",
        ],
    );
    assert_eq!(report["requests"], 200);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["mismatches"], 0);
    let connections = report["connections"].as_u64().unwrap();
    assert!((20..=22).contains(&connections), "{connections}");
    assert_eq!(report["config"]["requests_per_conn"], 10);
}

#[test]
fn compare_sweeps_churn_and_reports_connections_per_second() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("merge-compare-churn");
    let _ = std::fs::remove_dir_all(&out);
    let output = Command::new(common::BIN)
        .args([
            "compare",
            "--models",
            "thread,epoll",
            "--conns",
            "2",
            "--size",
            "64",
        ])
        .args(["--duration", "0.3", "--warmup", "0", "--churn", "--out"])
        .arg(&out)
        .output()
        .expect("run multiecho compare");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["settings"]["requests_per_conn"], 1);
    for server in report["servers"].as_array().unwrap() {
        let figures = &server["points"][0]["median"];
        let cps = figures["connections_per_sec"].as_f64().unwrap_or(0.0);
        assert!(cps > 0.0, "{server:#}");
        // One connection per round trip: the two rates are the same count over one window.
        let rps = figures["round_trips_per_sec"].as_f64().unwrap();
        assert!((cps - rps).abs() <= 0.05 * rps + 20.0, "{cps} vs {rps}");
        assert!(
            figures["connect_p99_us"].as_f64().unwrap() > 0.0,
            "{figures:#}"
        );
        assert_eq!(figures["errors"], 0.0);
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("- Churn: a new connection every 1 round trip,"),
        "{md}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
