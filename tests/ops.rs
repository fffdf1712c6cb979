//! Running multiecho as a service: log formats, readiness (`--ready-fd`, `NOTIFY_SOCKET`),
//! socket activation (`LISTEN_FDS`, through the real `systemd-socket-activate`), `--inetd`,
//! shell completions and the man page.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// A server's log in a pipe (as in a log file or the journal) carries no terminal colour codes.
#[test]
fn logs_in_a_pipe_have_no_colour() {
    let server = Server::start("thread", &[]);
    let echoed = round_trip(connect(server.addr), b"plain\n");
    assert_same(&echoed, b"plain\n", "echo");
    let mut server = server;
    server.terminate();
    server.wait_timeout(PATIENCE).expect("server exits");
    let log = server.log();
    assert!(log.contains("connection closed"), "log:\n{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a piped log:\n{log:?}"
    );
}

/// `--log-format json` writes one JSON object per line, with the event's fields at the top.
#[test]
fn json_logs_are_one_object_per_line() {
    let server = Server::start("epoll", &["--log-format", "json"]);
    let echoed = round_trip(connect(server.addr), b"json\n");
    assert_same(&echoed, b"json\n", "echo");
    let mut server = server;
    server.terminate();
    server.wait_timeout(PATIENCE).expect("server exits");
    let log = server.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    let closed = events
        .iter()
        .find(|event| event["message"] == "connection closed")
        .unwrap_or_else(|| panic!("no close event in:\n{log}"));
    assert_eq!(closed["bytes"], 5, "{closed}");
    assert_eq!(closed["level"], "INFO");
    assert!(events.iter().all(|e| e["timestamp"].is_string()));
}

/// An unknown log format is one clear error.
#[test]
fn unknown_log_format_is_refused() {
    let out = Command::new(BIN)
        .args(["serve", "--log-format", "xml"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid value 'xml'"), "{err}");
}
