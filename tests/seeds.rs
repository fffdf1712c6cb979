//! Interoperation with the seeds' C programs (`../shared/seeds/c/` beside the repository):
//! our clients against their servers, their clients against our servers.
//!
//! The seeds are compiled into Cargo's per-test temporary directory. Two small, mechanical
//! changes are made to copies of the sources: the hard-coded port 4000 comes from the
//! `SEED_PORT` environment variable, and the servers bind loopback instead of every interface
//! (and `7_client` connects to 127.0.0.1 rather than 0.0.0.0). That lets these tests run in
//! parallel on free ports and never listen beyond this machine; nothing else changes, defects
//! included. If the seeds or a C/C++ compiler are missing, each test prints why and passes.
//!
//! The seeds' clients are defective (see the seeds' README): they loop forever once stdin
//! ends, so they are bounded by a deadline and killed, and the tests assert only on what they
//! print correctly.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_same, Server, ServerBuilder, BIN, PATIENCE};

/// The seeds' programs, each with the compiler it needs.
const SEEDS: [(&str, &str); 5] = [
    ("echo_mpserv.c", "cc"),
    ("echo_mpclient.c", "cc"),
    ("7_server.cc", "c++"),
    ("8_server.cc", "c++"),
    ("7_client.cc", "c++"),
];

/// `../shared/seeds/c` from the repository root (CI clones `shared/` beside the repository),
/// or `$MULTIECHO_SEEDS_DIR` when set.
fn seeds_source_dir() -> PathBuf {
    match std::env::var_os("MULTIECHO_SEEDS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/seeds/c"),
    }
}

/// Compiles the seeds once per test run; `None` (after saying why) if that is not possible.
fn seed_binaries() -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build_seeds) {
        Ok(dir) => Some(dir),
        Err(why) => {
            common::skip_unless_ci(&format!("the seeds interoperation test: {why}"));
            None
        }
    }
}

fn build_seeds() -> Result<PathBuf, String> {
    let sources = seeds_source_dir();
    if !sources.is_dir() {
        return Err(format!("no seeds directory at {}", sources.display()));
    }
    for compiler in ["cc", "c++"] {
        let found = Command::new(compiler)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!("no C/C++ compiler '{compiler}' on PATH"));
        }
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("seeds");
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    for (file, compiler) in SEEDS {
        let original = std::fs::read_to_string(sources.join(file))
            .map_err(|e| format!("cannot read {file}: {e}"))?;
        let patched_path = out.join(file);
        std::fs::write(&patched_path, patch_seed(file, &original))
            .map_err(|e| format!("cannot write {}: {e}", patched_path.display()))?;
        let binary = out.join(seed_name(file));
        let mut command = Command::new(compiler);
        command.arg("-w").arg("-o").arg(&binary).arg(&patched_path);
        if compiler == "c++" {
            command.arg("-lpthread");
        }
        let result = command
            .output()
            .map_err(|e| format!("cannot run {compiler}: {e}"))?;
        if !result.status.success() {
            // A compiler that exists but cannot build them is a real failure, not a skip.
            panic!(
                "{compiler} failed on {file}:\n{}",
                String::from_utf8_lossy(&result.stderr)
            );
        }
    }
    Ok(out)
}

/// `7_server.cc` -> `7_server`.
fn seed_name(file: &str) -> &str {
    file.split('.').next().unwrap()
}

/// Port from `$SEED_PORT` instead of 4000; loopback instead of every interface.
fn patch_seed(file: &str, source: &str) -> String {
    let mut patched = format!("#include <stdlib.h>\n{source}");
    let replacements = [
        ("htons(4000)", "htons(atoi(getenv(\"SEED_PORT\")))"),
        ("htonl(INADDR_ANY)", "htonl(INADDR_LOOPBACK)"),
        ("s_addr = INADDR_ANY;", "s_addr = htonl(INADDR_LOOPBACK);"),
        ("inet_addr(\"0.0.0.0\")", "inet_addr(\"127.0.0.1\")"),
    ];
    for (from, to) in replacements {
        patched = patched.replace(from, to);
    }
    assert!(
        !patched.contains("INADDR_ANY") && !patched.contains("0.0.0.0"),
        "{file}: a seed still binds or connects beyond loopback; update patch_seed"
    );
    patched
}

/// A seed program in its own process group, killed (group and all) on drop: the seeds fork.
struct SeedProcess {
    child: Child,
}

impl SeedProcess {
    fn spawn(mut command: Command) -> SeedProcess {
        command.process_group(0);
        let child = command.spawn().expect("spawn a seed program");
        SeedProcess { child }
    }

    /// Whether it exited (and reaped it).
    fn has_exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_some()
    }

    /// Waits up to `timeout` for it to exit.
    fn exits_within(&mut self, timeout: Duration) -> bool {
        common::wait_child(&mut self.child, timeout).is_some()
    }
}

impl Drop for SeedProcess {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // The process group this test created for the seed holds only its processes.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// Starts a seed server on a free loopback port and waits until it listens.
fn start_seed_server(dir: &Path, name: &str) -> (SeedProcess, u16) {
    for _attempt in 0..3 {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let mut command = Command::new(dir.join(name));
        // echo_mpserv takes the port as an argument; the others read the patched SEED_PORT.
        command
            .arg(port.to_string())
            .env("SEED_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut server = SeedProcess::spawn(command);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if is_listening(port) {
                return (server, port);
            }
            if server.has_exited() || Instant::now() >= deadline {
                break; // most likely the port was taken in between: try another
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
    panic!("the seed {name} did not start listening");
}

/// Whether something listens on 127.0.0.1:`port`, from /proc/net/tcp. Connecting to find
/// out would itself be served, and 8_server mishandles a second connection.
fn is_listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let wanted = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1] == wanted && fields[3] == "0A"
    })
}

/// Runs `multiecho client EXTRA 127.0.0.1:PORT` with `input`; returns (success, stdout, stderr).
fn run_our_client(port: u16, extra: &[&str], input: &[u8]) -> (bool, Vec<u8>, String) {
    let mut child = Command::new(BIN)
        .arg("client")
        .args(extra)
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn multiecho client");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&input);
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        let _ = tx.send(bytes);
    });
    let Ok(output) = rx.recv_timeout(PATIENCE) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("multiecho client did not finish within {PATIENCE:?}");
    };
    let status = child.wait().unwrap();
    feeder.join().unwrap();
    (status.success(), output, err_reader.join().unwrap())
}

/// Lines of 1 byte to 3 KiB: longer than echo_mpserv's 30-byte buffer and the other
/// servers' 1 KiB, so echoes come back in pieces. Random bytes, newlines only at line ends.
fn long_lines() -> Vec<u8> {
    let mut rng = multiecho::payload::Rng::new(4000);
    let mut input = Vec::new();
    for _ in 0..120 {
        let len = rng.range(1, 3 * 1024) as usize;
        let mut line = vec![0u8; len];
        rng.fill(&mut line);
        for byte in &mut line {
            if *byte == b'\n' {
                *byte = b' ';
            }
        }
        input.extend_from_slice(&line);
        input.push(b'\n');
    }
    input
}

fn our_clients_against(seed_server: &str) {
    let Some(dir) = seed_binaries() else { return };
    let (_server, port) = start_seed_server(dir, seed_server);
    let input = long_lines();
    for extra in [&[][..], &["--split"][..]] {
        let (ok, output, stderr) = run_our_client(port, extra, &input);
        assert!(
            ok,
            "multiecho client {extra:?} against {seed_server}: {stderr}"
        );
        assert_same(
            &output,
            &input,
            &format!("multiecho client {extra:?} against {seed_server}"),
        );
    }
}

#[test]
fn our_clients_against_echo_mpserv() {
    // Its 30-byte buffer returns every longer line in pieces.
    our_clients_against("echo_mpserv");
}

#[test]
fn our_clients_against_7_server() {
    our_clients_against("7_server");
}

#[test]
fn our_clients_against_8_server() {
    // Its accept race needs two connections arriving together; one client is served fine.
    our_clients_against("8_server");
}

/// Starts our server with `model` and checks that it echoes.
fn start_our_server(model: &str) -> Option<Server> {
    let server = ServerBuilder::new(model).start();
    assert!(
        echoes_one_byte(&server),
        "the {model} server does not echo; its log:\n{}",
        server.log()
    );
    Some(server)
}

fn echoes_one_byte(server: &Server) -> bool {
    use std::io::Write;
    let Ok(mut stream) = std::net::TcpStream::connect(server.addr) else {
        return false;
    };
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut byte = [0u8; 1];
    stream.write_all(b"?").is_ok() && stream.read_exact(&mut byte).is_ok() && byte == *b"?"
}

/// Collects a seed client's stdout until `enough(output)` holds or the deadline passes.
fn read_until(
    stdout: impl Read + Send + 'static,
    deadline: Duration,
    enough: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut stdout = stdout;
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => return,
                // Keep draining after the test stops listening: closing the pipe would kill
                // the client with SIGPIPE, and the test wants to see whether it ends by itself.
                Ok(n) => {
                    let _ = tx.send(buf[..n].to_vec());
                }
            }
        }
    });
    let until = Instant::now() + deadline;
    let mut output = Vec::new();
    while !enough(&output) {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(piece) => output.extend(piece),
            Err(_) => break, // deadline, or the client closed its stdout
        }
    }
    output
}

/// Starts a seed client connecting to our server on `port` with `input` on stdin (then end of
/// input); returns it and its stdout.
fn spawn_seed_client(
    dir: &Path,
    name: &str,
    port: u16,
    input: &[u8],
) -> (SeedProcess, ChildStdout) {
    let mut command = Command::new(dir.join(name));
    // echo_mpclient takes IP and port as arguments; 7_client reads the patched SEED_PORT.
    command
        .args(["127.0.0.1", &port.to_string()])
        .env("SEED_PORT", port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut client = SeedProcess::spawn(command);
    let mut stdin = client.child.stdin.take().unwrap();
    let input = input.to_vec();
    thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&input);
        // Dropping stdin here is the end of input.
    });
    let stdout = client.child.stdout.take().unwrap();
    (client, stdout)
}

/// echo_mpclient's output without its "Message from server: " prefixes, which it prints at
/// whatever boundaries its 30-byte reads happen to fall.
fn strip_mpclient_prefixes(output: &[u8]) -> String {
    String::from_utf8_lossy(output).replace("Message from server: ", "")
}

/// Text lines, some longer than echo_mpclient's fgets() buffer (29 characters).
fn seed_client_lines() -> String {
    let mut text = String::new();
    for i in 0..30 {
        text.push_str(&format!("line {i} {}\n", "echo ".repeat(i % 9)));
    }
    text
}

fn echo_mpclient_against(model: &str) {
    let Some(dir) = seed_binaries() else { return };
    let Some(server) = start_our_server(model) else {
        return;
    };
    let text = seed_client_lines();
    // It ends only on a `q` line: it never checks fgets() for the end of input.
    let input = format!("{text}q\n");
    let (mut client, stdout) =
        spawn_seed_client(dir, "echo_mpclient", server.addr.port(), input.as_bytes());
    // Its reader prints until our server closes after the half-close, then both halves exit.
    let output = read_until(stdout, PATIENCE, |_| false);
    assert!(
        client.exits_within(PATIENCE),
        "echo_mpclient did not end after its q line"
    );
    assert_eq!(
        strip_mpclient_prefixes(&output),
        text,
        "echo_mpclient against {model}"
    );
}

#[test]
fn echo_mpclient_against_our_thread_model() {
    echo_mpclient_against("thread");
}

#[test]
fn echo_mpclient_against_our_process_model() {
    echo_mpclient_against("process");
}

/// Without a `q` line, echo_mpclient does not end: it never checks fgets() for the end of
/// input, so it re-sends its last line forever, and our server echoes each copy. The test
/// asserts on the echo of the real input only, says what it saw after, and kills the client.
#[test]
fn echo_mpclient_without_a_q_line() {
    let Some(dir) = seed_binaries() else { return };
    let Some(server) = start_our_server("thread") else {
        return;
    };
    let (mut client, stdout) =
        spawn_seed_client(dir, "echo_mpclient", server.addr.port(), b"first\nlast\n");
    let repeated = "first\nlast\nlast\nlast\n";
    let output = read_until(stdout, Duration::from_secs(5), |out| {
        strip_mpclient_prefixes(out).len() >= repeated.len()
    });
    let printed = strip_mpclient_prefixes(&output);
    assert!(
        printed.starts_with("first\nlast\n"),
        "what it printed: {printed:?}"
    );
    eprintln!(
        "echo_mpclient after the end of its input: {}",
        if client.has_exited() {
            "exited"
        } else {
            "still running (seed defect 4); killed"
        }
    );
    eprintln!(
        "it printed {:?}...",
        printed.chars().take(40).collect::<String>()
    );
}

/// 7_client sends words (scanf "%s"), prints each echo with write(2) and the newline with
/// buffered putchar(), and loops once stdin ends. Assert only on the words it echoed.
fn seven_client_against(model: &str) {
    let Some(dir) = seed_binaries() else { return };
    let Some(server) = start_our_server(model) else {
        return;
    };
    let words = ["alpha", "beta", "gamma", "delta"];
    let input = format!("{} {}\n{}\n{}\n", words[0], words[1], words[2], words[3]);
    let expected: String = words.concat();
    let (mut client, stdout) =
        spawn_seed_client(dir, "7_client", server.addr.port(), input.as_bytes());
    let without_newlines =
        |out: &[u8]| -> String { String::from_utf8_lossy(out).replace('\n', "") };
    let output = read_until(stdout, Duration::from_secs(5), |out| {
        without_newlines(out).len() >= expected.len() + 3 * words[3].len()
    });
    let printed = without_newlines(&output);
    assert!(
        printed.starts_with(&expected),
        "7_client against {model} printed {printed:?}"
    );
    let ended = client.exits_within(Duration::from_millis(200));
    eprintln!(
        "7_client against {model} after the end of its input: {}; it printed {:?}...",
        if ended {
            "exited"
        } else {
            "still running (seed defect 4: loops at EOF); killed"
        },
        printed.chars().take(60).collect::<String>()
    );
}

#[test]
fn seven_client_against_our_thread_model() {
    seven_client_against("thread");
}

#[test]
fn seven_client_against_our_process_model() {
    seven_client_against("process");
}

/// Runs `multiecho check` against a seed server; returns each check's verdict by name.
/// Small bounds: 4 connections at once (the seeds' backlog is 5; more simultaneous connects
/// would wait seconds for SYN retries), payloads up to 1 MiB, a 300 ms idle pause.
fn check_seed(seed_server: &str, extra: &[&str]) -> Option<Vec<(String, String)>> {
    let dir = seed_binaries()?;
    let (_server, port) = start_seed_server(dir, seed_server);
    let output = Command::new(BIN)
        .args(["check", "--json", &format!("127.0.0.1:{port}")])
        .args([
            "--max-conns",
            "4",
            "--max-size",
            "1MiB",
            "--idle-pause",
            "300ms",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run multiecho check");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "check against {seed_server} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let verdicts: Vec<(String, String)> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().into(),
                c["verdict"].as_str().unwrap().into(),
            )
        })
        .collect();
    let all_passed = verdicts.iter().all(|(_, v)| v == "pass");
    assert_eq!(output.status.success(), all_passed, "{report:#}");
    eprintln!("{seed_server}: {report:#}");
    Some(verdicts)
}

fn expect_verdicts(got: Vec<(String, String)>, failing: &[&str], what: &str) {
    let failed: Vec<&str> = got
        .iter()
        .filter(|(_, v)| v != "pass")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(failed, failing, "{what}: the checks that did not pass");
    let _ = what;
}

#[test]
fn check_passes_the_fork_per_connection_seeds() {
    // echo_mpserv and 7_server ignore write()'s result, but a blocking write to a blocking
    // socket completes unless a signal interrupts it, and a child has no children to send it
    // SIGCHLD; a reset peer's SIGPIPE kills only that connection's child. echo_mpserv's
    // 30-byte buffer only cuts the echo into pieces. So, within these bounds, both pass.
    // `connect_storm` is skipped: it passes too, but their listen backlog of 5 overflows
    // while each connection waits for a fork, and the SYN retries take 20 s or more.
    for seed in ["echo_mpserv", "7_server"] {
        if let Some(verdicts) = check_seed(seed, &["--skip", "connect_storm"]) {
            assert_eq!(
                verdicts.len(),
                9,
                "{seed}: every check but connect_storm ran"
            );
            expect_verdicts(verdicts, &[], seed);
        }
    }
}

#[test]
fn check_fails_8_server_on_concurrency_and_resets() {
    // One connection at a time it is a fine echo server. With 4 connections arriving
    // together, the `&csock` race can hand two threads one socket and leave another socket
    // unserved: `concurrent` then fails ("connection N was never served"). The race needs
    // the next accept() to overwrite csock before the new thread reads it: observed in most
    // runs, not all, so either verdict is accepted for it. Writing to the connection
    // `reset_isolation` resets raises SIGPIPE, which kills the whole process: sometimes
    // before that check is over (it fails: its other connections are reset too), sometimes
    // just after (it passes), but always before `connect_storm`, which then finds nothing
    // listening. Every other check passes.
    let Some(verdicts) = check_seed("8_server", &[]) else {
        return;
    };
    assert_eq!(verdicts.len(), 10, "8_server: every check ran");
    let failed: Vec<&str> = verdicts
        .iter()
        .filter(|(_, v)| v != "pass")
        .map(|(n, _)| n.as_str())
        .collect();
    let allowed = ["concurrent", "reset_isolation", "connect_storm"];
    assert!(
        failed.iter().all(|name| allowed.contains(name)) && failed.last() == Some(&"connect_storm"),
        "8_server: failed {failed:?}"
    );
}
