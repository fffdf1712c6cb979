//! `multiecho compare` end to end: short sweeps against real servers, then the report files
//! are read back and checked for structure and plausible figures.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use common::{ALL_MODELS, BIN};

/// A fresh output directory for one test.
fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("compare-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn compare(args: &[&str], out: &Path) -> Output {
    Command::new(BIN)
        .arg("compare")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run multiecho compare")
}

fn read_report(out: &Path) -> (Value, String) {
    let json = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
    let md = std::fs::read_to_string(out.join("report.md")).expect("report.md written");
    (
        serde_json::from_str(&json).expect("report.json is JSON"),
        md,
    )
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Checks a server entry that ran: every point has positive figures.
fn check_ran(server: &Value, conns: &[u64], context: &str) {
    let name = server["name"].as_str().unwrap();
    assert_eq!(server["stop"]["clean"], true, "{name} stop: {context}");
    let points = server["points"].as_array().unwrap();
    assert_eq!(points.len(), conns.len(), "{name}: {context}");
    let mut cpu_seen = false;
    for (point, &c) in points.iter().zip(conns) {
        assert_eq!(point["conns"], c, "{name}");
        assert_eq!(point["size"], 64, "{name}");
        let median = &point["median"];
        assert!(
            median.is_object(),
            "{name} at {c} conns has no figures: {context}"
        );
        for key in [
            "round_trips_per_sec",
            "bytes_per_sec",
            "mb_per_sec",
            "requests",
        ] {
            assert!(
                median[key].as_f64().unwrap() > 0.0,
                "{name} {key}: {context}"
            );
        }
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(
                median["latency_us"][key].as_f64().unwrap() > 0.0,
                "{name} {key}"
            );
        }
        assert!(median["peak_rss_kib"].as_f64().unwrap() > 0.0, "{name} rss");
        let cpu = median["server_cpu_us_per_round_trip"].as_f64().unwrap();
        assert!(cpu >= 0.0, "{name} cpu");
        cpu_seen |= cpu > 0.0;
        assert_eq!(point["runs"].as_array().unwrap().len(), 1, "{name}");
    }
    assert!(
        cpu_seen,
        "{name}: no server CPU time measured at any point: {context}"
    );
}

#[test]
fn short_sweep_of_two_models() {
    let out = out_dir("two");
    let output = compare(
        &[
            "--models",
            "thread,pool",
            "--conns",
            "1,4",
            "--size",
            "64",
            "--duration",
            "0.5",
            "--warmup",
            "0",
            // Closed-loop clients: the pool needs a worker per connection.
            "--workers",
            "4",
        ],
        &out,
    );
    let context = text(&output);
    assert!(output.status.success(), "{context}");
    let (report, md) = read_report(&out);

    let env = &report["environment"];
    assert!(
        env["kernel"].as_str().unwrap().starts_with("Linux"),
        "{env}"
    );
    assert!(env["cores"].as_u64().unwrap() >= 1);
    assert!(env["date"].as_str().unwrap().ends_with('Z'));
    assert!(!env["cpu_model"].as_str().unwrap().is_empty());
    assert!(env["command_line"].as_array().unwrap().len() > 5);
    assert_eq!(report["settings"]["conns"], serde_json::json!([1, 4]));
    assert_eq!(report["settings"]["workers"], 4);
    // Traceable: the commit the binary was built from (the tests run in a git checkout) and
    // whether its sources had uncommitted changes; where it ran and the machine's load.
    let commit = env["commit"]
        .as_str()
        .unwrap_or_else(|| panic!("no commit: {env}"));
    assert!(
        commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()),
        "{env}"
    );
    assert!(env["tree_dirty"].is_boolean(), "{env}");
    assert!(env["working_directory"].is_string(), "{env}");
    assert!(env["load_average"].is_string(), "{env}");
    assert!(md.contains(&format!("commit {commit}")), "{md}");
    // Unpinned, one round: the report and stderr say so.
    assert!(
        md.contains("**Warning:** the servers and the load generator were not both pinned"),
        "{md}"
    );
    assert!(md.contains("**Warning:** each point ran once"), "{md}");
    assert!(
        context.contains("compare: warning: each point ran once"),
        "{context}"
    );
    assert!(report["noise"].is_null(), "one run per point: {report}");

    let servers = report["servers"].as_array().unwrap();
    let names: Vec<&str> = servers
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["thread", "pool"]);
    for server in servers {
        assert!(server["skipped"].is_null(), "{server}");
        check_ran(server, &[1, 4], &context);
    }

    assert!(md.contains("## 64 B messages"), "{md}");
    assert!(md.contains("| server | 1 conn | 4 conns |"), "{md}");
    assert!(md.contains("| thread |") && md.contains("| pool |"), "{md}");
    for chart in [
        "round_trips",
        "p99_latency",
        "cpu_per_round_trip",
        "peak_rss",
    ] {
        let file = format!("{chart}_64B.svg");
        let svg = std::fs::read_to_string(out.join(&file)).unwrap_or_else(|_| panic!("{file}"));
        assert!(svg.starts_with("<svg") && svg.contains("thread") && svg.contains("pool"));
        assert!(md.contains(&format!("]({file})")), "{md}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn every_model_is_listed_ran_or_skipped_with_a_reason() {
    let out = out_dir("all");
    // One connection: the iterative model serves one client at a time, so with more the
    // others would wait out bench's drain timeout (a failed point, seconds lost).
    let output = compare(
        &[
            "--conns",
            "1",
            "--size",
            "64",
            "--duration",
            "0.3",
            "--warmup",
            "0",
        ],
        &out,
    );
    let context = text(&output);
    // A failed point (or unclean stop) makes compare exit non-zero, but only after writing
    // the report, which is what this test reads.
    if !output.status.success() {
        assert!(context.contains("report written to"), "{context}");
    }
    let (report, md) = read_report(&out);
    let servers = report["servers"].as_array().unwrap();
    let names: Vec<&str> = servers
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ALL_MODELS);
    let mut ran = 0;
    for server in servers {
        let name = server["name"].as_str().unwrap();
        assert!(
            md.contains(&format!("| {name} |")),
            "{name} missing from report.md\n{md}"
        );
        match server["skipped"].as_str() {
            Some(reason) => {
                assert!(!reason.trim().is_empty(), "{name} skipped without a reason");
                assert!(md.contains(&format!("- {name}: skipped: ")), "{md}");
                assert!(server["points"].as_array().unwrap().is_empty());
            }
            None => {
                ran += 1;
                let point = &server["points"][0];
                if point["failed"] == true {
                    assert!(!point["failures"][0].as_str().unwrap().is_empty());
                    assert!(md.contains(&format!("- {name} at 1 conn,")), "{md}");
                } else {
                    check_ran(server, &[1], &context);
                }
            }
        }
    }
    // The thread and pool models are always there.
    assert!(ran >= 2, "{context}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_options_get_one_clear_line() {
    let out = out_dir("bad");
    for (args, expected) in [
        (&["--server-cpus", "3-1"][..], "invalid CPU list"),
        (&["--external", "nowhere"][..], "invalid external server"),
        (&["--size", "0"][..], "at least 1 byte"),
        (&["--models", "fork"][..], "invalid value 'fork'"),
    ] {
        let output = compare(args, &out);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(!out.exists(), "nothing written for bad options");
}

/// compare loads every point with bench, so a value bench refuses must stop compare before
/// it starts a server, with the same error, instead of failing every run of the sweep.
#[test]
fn refuses_what_bench_refuses() {
    let out = out_dir("bench-refuses");
    for (flag, value) in [
        ("--conns", "1000000"),
        ("--size", "2GiB"),
        ("--threads", "1025"),
    ] {
        let bench = Command::new(BIN)
            .args(["bench", "127.0.0.1:9", flag, value])
            .output()
            .expect("run multiecho bench");
        let compare = compare(&["--models", "thread", flag, value], &out);
        assert!(!bench.status.success(), "bench {flag} {value}");
        assert!(!compare.status.success(), "compare {flag} {value}");
        // clap's line: "error: invalid value 'V' for '--flag <NAME>': REASON". The same
        // parser gives the same reason; only the value's name may differ.
        let reason = |output: &Output| {
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            let line = stderr.lines().next().unwrap_or_default().to_string();
            line.split_once(" for '")
                .and_then(|(_, rest)| rest.split_once("': "))
                .map_or(line.clone(), |(_, reason)| reason.to_string())
        };
        assert_eq!(reason(&bench), reason(&compare), "{flag} {value}");
        assert!(reason(&bench).contains(value), "{}", text(&bench));
    }
    assert!(!out.exists(), "nothing written for bad options");
}

#[test]
fn external_servers_and_pinning() {
    let external = common::ServerBuilder::new("thread").start();
    let with_pid = format!("mine={}@{}", external.addr, external.pid());
    let without_pid = format!("anon={}", external.addr);
    let out = out_dir("external");
    let output = compare(
        &[
            "--models",
            "thread",
            "--conns",
            "2",
            "--size",
            "4k",
            "--duration",
            "0.3",
            "--warmup",
            "0",
            "--external",
            &with_pid,
            "--external",
            &without_pid,
            "--server-cpus",
            "0",
            "--client-cpus",
            "0",
        ],
        &out,
    );
    let context = text(&output);
    assert!(output.status.success(), "{context}");
    let (report, md) = read_report(&out);
    assert_eq!(report["settings"]["server_cpus"], "0");
    assert_eq!(report["settings"]["client_cpus"], "0");
    assert!(md.contains("server 0, load generator 0"), "{md}");
    let servers = report["servers"].as_array().unwrap();
    let names: Vec<&str> = servers
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["thread", "mine", "anon"]);
    for server in &servers[1..] {
        assert_eq!(server["kind"], "external");
        assert!(
            server["stop"].is_null(),
            "compare does not stop what it did not start"
        );
        let median = &server["points"][0]["median"];
        assert_eq!(server["points"][0]["size"], 4096);
        assert!(
            median["round_trips_per_sec"].as_f64().unwrap() > 0.0,
            "{context}"
        );
    }
    // Only with a PID can compare read what the server costs.
    assert!(
        servers[1]["points"][0]["median"]["peak_rss_kib"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(servers[2]["points"][0]["median"]["peak_rss_kib"].is_null());
    assert!(servers[2]["points"][0]["median"]["server_cpu_us_per_round_trip"].is_null());
    assert!(
        external.stop().success(),
        "the external server is left running for its owner"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// The runs in the order compare made them, from its progress lines on stderr
/// (`compare: [3/12] epoll: 1 conn, 64 B (run 2/2): ...`): `epoll: 1 conn, 64 B (run 2/2)`.
fn runs_in_order(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|line| line.strip_prefix("compare: ["))
        .filter_map(|line| line.split_once("] "))
        .filter_map(|(_, run)| run.find(')').map(|end| run[..=end].to_string()))
        .collect()
}

#[test]
fn servers_take_turns_at_each_point() {
    let external = common::ServerBuilder::new("thread").start();
    let ext = format!("ext={}", external.addr);
    let out = out_dir("interleave");
    let output = compare(
        &[
            "--models",
            "thread,epoll",
            "--external",
            &ext,
            "--conns",
            "1,2",
            "--size",
            "64",
            "--duration",
            "0.2",
            "--warmup",
            "0",
            "--repeat",
            "2",
        ],
        &out,
    );
    let context = text(&output);
    assert!(output.status.success(), "{context}");
    // Point by point; within a point, round by round; within a round, every server once.
    let mut expected = Vec::new();
    for conns in ["1 conn", "2 conns"] {
        for round in 1..=2 {
            for server in ["thread", "epoll", "ext"] {
                expected.push(format!("{server}: {conns}, 64 B (run {round}/2)"));
            }
        }
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(runs_in_order(&stderr), expected, "{context}");

    let (report, md) = read_report(&out);
    let servers = report["servers"].as_array().unwrap();
    let names: Vec<&str> = servers
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["thread", "epoll", "ext"]);
    for server in servers {
        let points = server["points"].as_array().unwrap();
        assert_eq!(points.len(), 2, "{server}");
        for point in points {
            assert_eq!(point["runs"].as_array().unwrap().len(), 2, "{point}");
            assert_eq!(point["failed"], false, "{point}");
        }
    }
    assert_eq!(servers[0]["stop"]["clean"], true);
    assert_eq!(servers[1]["stop"]["clean"], true);
    assert!(md.contains("median of 2 runs; runs interleaved"), "{md}");
    assert!(external.stop().success());
    let _ = std::fs::remove_dir_all(&out);
}

/// An echo server that flips one bit of everything it sends back.
fn start_liar() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    buf[0] ^= 1;
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn wrong_bytes_fail_the_comparison_after_the_report() {
    let liar = format!("liar={}", start_liar());
    let out = out_dir("liar");
    let output = compare(
        &[
            "--models",
            "thread",
            "--external",
            &liar,
            "--conns",
            "1",
            "--size",
            "64",
            "--duration",
            "0.3",
            "--warmup",
            "0",
        ],
        &out,
    );
    let context = text(&output);
    assert!(!output.status.success(), "{context}");
    assert!(
        context.contains("wrong bytes came back from liar"),
        "{context}"
    );
    let (report, md) = read_report(&out);
    let liar = &report["servers"][1];
    assert_eq!(liar["name"], "liar");
    let point = &liar["points"][0];
    assert_eq!(point["failed"], true, "{point}");
    assert!(
        point["median"]["mismatches"].as_f64().unwrap() > 0.0,
        "{point}"
    );
    assert!(md.contains("| liar |") && md.contains(" ✗ |"), "{md}");
    assert!(md.contains("- liar at 1 conn, 64 B: "), "{md}");
    assert!(md.contains("mismatches"), "{md}");
    // The honest server beside it is unaffected.
    assert_eq!(report["servers"][0]["points"][0]["failed"], false);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_udp_sweep_of_the_models_that_serve_it_and_an_external_udp_server() {
    let external = common::Server::start(
        "epoll",
        &["--listen", "udp://127.0.0.1:0", "--udp-rate", "0"],
    );
    let udp = external.listener("udp");
    let named = format!("ext={udp}@{}", external.pid());
    let out = out_dir("udp");
    let output = compare(
        &[
            "--udp",
            "--models",
            "thread,epoll,uring",
            "--conns",
            "2",
            "--size",
            "64",
            "--pipeline",
            "2",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--external",
            &named,
        ],
        &out,
    );
    let context = text(&output);
    assert!(output.status.success(), "{context}");
    let (report, md) = read_report(&out);
    assert_eq!(report["settings"]["udp"], true);
    let servers = report["servers"].as_array().unwrap();
    let thread = &servers[0];
    assert!(
        thread["skipped"].as_str().unwrap().contains("udp://"),
        "the thread model serves no UDP: {context}"
    );
    for server in &servers[1..] {
        let name = server["name"].as_str().unwrap();
        if name == "uring" && server["skipped"].is_string() {
            common::skip_unless_ci(&format!("uring did not run: {}", server["skipped"]));
            continue;
        }
        let median = &server["points"][0]["median"];
        assert!(
            median["round_trips_per_sec"].as_f64().unwrap() > 0.0,
            "{name}: {context}"
        );
        // Measured (a short window at low load may round to no CPU tick at all).
        assert!(
            median["server_cpu_us_per_round_trip"].as_f64().unwrap() >= 0.0,
            "{name}: {context}"
        );
        for key in ["lost_percent", "duplicates", "reordered"] {
            assert!(median[key].as_f64().is_some(), "{name} {key}: {context}");
        }
        assert_eq!(
            median["duplicates"], 0.0,
            "{name}: an echo server duplicates nothing"
        );
    }
    for heading in [
        "UDP echo",
        "Datagrams lost",
        "Duplicated datagrams",
        "Reordered",
    ] {
        assert!(md.contains(heading), "{heading}: {md}");
    }
    assert!(out.join("lost_64B.svg").exists(), "the loss chart");
    assert!(external.stop().success());
    let _ = std::fs::remove_dir_all(&out);
}
