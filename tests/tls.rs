//! TLS serving (issue 15), against real peers: Debian's `openssl s_client` and Python's `ssl`
//! module (`tests/common/tls_client.py`, OpenSSL underneath), for every model in
//! [`TLS_MODELS`]: random payloads byte-exact, the close_notify half-close (everything sent
//! before it echoed, then the server's close_notify and end of stream), a TCP close without
//! close_notify logged as truncated, a certificate made with `openssl req -x509` served from
//! `--tls-cert`/`--tls-key` and verified with the host name, mutual TLS (no certificate or
//! one from another CA refused, a good one served), plaintext to a TLS port, a client that
//! stops mid-handshake closed at `--tls-handshake-timeout`, and `tls+proxy://` (a PROXY header
//! sent in the same segment as the ClientHello). Once, for any model: bad certificate or key
//! files at start (exit 1, one line), an expired certificate (a warning, served), and the
//! self-signed certificate's logged fingerprint matching what `openssl` computes.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{connect, Server, BIN, PATIENCE};
use multiecho::payload;

/// The models that serve `tls://` listeners: every one.
const TLS_MODELS: &[&str] = &[
    "iterative",
    "process",
    "prefork",
    "thread",
    "pool",
    "epoll",
    "async",
    "uring",
];

/// Whether `model` can run here: uring needs io_uring (probed once; a skip says so loudly,
/// and is a failure on CI).
fn runs_here(model: &str) -> bool {
    static URING: OnceLock<bool> = OnceLock::new();
    if model != "uring" {
        return true;
    }
    *URING.get_or_init(|| match common::start_or_skip("uring", &[]) {
        Some(server) => {
            assert!(server.stop().success());
            true
        }
        None => false,
    })
}

/// Files made once per test run with `openssl`: a server certificate the way most users make
/// one, a CA, a client certificate it issued, and a client certificate from another CA.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("multiecho-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The server's certificate, as issue 15 says most users make it (CA:TRUE on Debian).
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ],
        );
        std::fs::write(
            dir.join("client.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        for ca in ["ca", "other-ca"] {
            openssl(
                &dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN={ca}"),
                ],
            );
            let client = format!("client-of-{ca}");
            openssl(
                &dir,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &format!("{client}.key"),
                    "-out",
                    &format!("{client}.csr"),
                    "-subj",
                    "/CN=client",
                ],
            );
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{client}.csr"),
                    "-CA",
                    &format!("{ca}.pem"),
                    "-CAkey",
                    &format!("{ca}.key"),
                    "-CAcreateserial",
                    "-out",
                    &format!("{client}.pem"),
                    "-days",
                    "2",
                    "-extfile",
                    "client.ext",
                ],
            );
        }
        Pki { dir }
    })
}

/// Starts `model` with a `tls://` listener (and `extra` flags); returns it and the TLS address.
fn start_tls(model: &str, scheme: &str, extra: &[&str]) -> (Server, SocketAddr) {
    let listen = format!("{scheme}://127.0.0.1:0");
    let mut args = vec!["--listen", listen.as_str()];
    args.extend_from_slice(extra);
    let server = Server::start(model, &args);
    let addr = server.listener(scheme);
    (server, addr)
}

/// What `tls_client.py` reported.
#[derive(Debug)]
enum PyOutcome {
    /// Bytes echoed, their SHA-256 (hex) and the TLS version.
    Echo(usize, String, String),
    /// The refusal the client saw.
    Refused(String),
}

/// Runs the Python client with `data` on its standard input.
fn python(addr: SocketAddr, data: &[u8], args: &[&str]) -> PyOutcome {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/tls_client.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .args([addr.ip().to_string(), addr.port().to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait for python3");
    writer.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "tls_client.py {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let words: Vec<&str> = stdout.split_whitespace().collect();
    match words.as_slice() {
        ["echo", len, sha, version] => {
            PyOutcome::Echo(len.parse().unwrap(), sha.to_string(), version.to_string())
        }
        ["refused", ..] => PyOutcome::Refused(stdout),
        _ => panic!("unexpected output from tls_client.py: {stdout}"),
    }
}

/// The lower-case hex SHA-256 of `data`, as Python's hashlib prints it.
fn sha256_hex(data: &[u8]) -> String {
    multiecho::tls::sha256_fingerprint(data)
        .replace(':', "")
        .to_ascii_lowercase()
}

fn expect_echo_of(outcome: PyOutcome, data: &[u8], what: &str) -> String {
    match outcome {
        PyOutcome::Echo(len, sha, version) => {
            assert_eq!(len, data.len(), "{what}: echoed length");
            assert_eq!(sha, sha256_hex(data), "{what}: echoed bytes differ");
            version
        }
        PyOutcome::Refused(why) => panic!("{what}: refused: {why}"),
    }
}

/// Waits until the server has logged a close line containing every one of `parts`.
fn wait_for_close_line(server: &Server, parts: &[&str]) {
    server.wait_for_log(&format!("a close line with {parts:?}"), |log| {
        log.lines().any(|line| {
            line.contains("connection closed") && parts.iter().all(|p| line.contains(p))
        })
    });
}

fn python_echoes_and_half_closes(model: &str) {
    let pki = pki();
    let (server, addr) = start_tls(
        model,
        "tls",
        &[
            "--tls-cert",
            &pki.arg("server.pem"),
            "--tls-key",
            &pki.arg("server.key"),
        ],
    );
    let mut rng = payload::Rng::new(15);
    let mut sizes = vec![1, 1000, 16 * 1024, 16 * 1024 + 1, 1 << 20];
    sizes.push(rng.range(1, 300_000) as usize);
    for (seed, size) in sizes.into_iter().enumerate() {
        let data = payload::bytes(1500 + seed as u64, size);
        // Verified against the openssl-made certificate, with the host name.
        let version = expect_echo_of(
            python(addr, &data, &["--ca", &pki.arg("server.pem")]),
            &data,
            &format!("{model}: {size} bytes, close_notify right after them"),
        );
        assert!(version == "TLSv1.3", "{model}: {version}");
        wait_for_close_line(
            &server,
            &[&format!("bytes={size} "), "end=\"client closed\""],
        );
    }
    // TLS 1.2 too.
    let data = payload::bytes(77, 100_000);
    let version = expect_echo_of(
        python(addr, &data, &["--max-version", "1.2"]),
        &data,
        &format!("{model}: TLS 1.2"),
    );
    assert_eq!(version, "TLSv1.2", "{model}");
    assert!(server.stop().success());
}

fn python_truncated_close_is_logged(model: &str) {
    let (server, addr) = start_tls(model, "tls", &[]);
    let data = payload::bytes(99, 54_321);
    expect_echo_of(
        python(addr, &data, &["--end", "truncate"]),
        &data,
        &format!("{model}: truncated"),
    );
    wait_for_close_line(&server, &["bytes=54321 ", "end=\"truncated"]);
    assert!(server.stop().success());
}

fn s_client_echoes_random_payloads(model: &str) {
    let (server, addr) = start_tls(model, "tls", &[]);
    for (seed, size) in [1usize, 4096, 65_537, 700_000].into_iter().enumerate() {
        let data = payload::bytes(2500 + seed as u64, size);
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr.to_string(),
                "-quiet",
                "-no_ign_eof",
            ])
            .arg("-nocommands")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run openssl s_client");
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let to_send = data.clone();
        let writer = std::thread::spawn(move || {
            stdin.write_all(&to_send).unwrap();
            stdin
        });
        let mut echoed = vec![0u8; size];
        stdout
            .read_exact(&mut echoed)
            .unwrap_or_else(|e| panic!("{model}: s_client echo of {size} bytes: {e}"));
        common::assert_same(&echoed, &data, &format!("{model}: s_client, {size} bytes"));
        // End of input: s_client sends close_notify and closes.
        drop(writer.join().unwrap());
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest).unwrap();
        assert!(
            rest.is_empty(),
            "{model}: {} bytes more than sent",
            rest.len()
        );
        let status = child.wait().unwrap();
        assert!(status.success(), "{model}: s_client exited with {status}");
        wait_for_close_line(
            &server,
            &[&format!("bytes={size} "), "end=\"client closed\""],
        );
    }
    assert!(server.stop().success());
}

fn mutual_tls(model: &str) {
    let pki = pki();
    let (server, addr) = start_tls(model, "tls", &["--tls-client-ca", &pki.arg("ca.pem")]);
    match python(addr, b"", &["--end", "refused"]) {
        PyOutcome::Refused(_) => {}
        other => panic!("{model}: no client certificate, yet {other:?}"),
    }
    server.wait_for_log("the refusal without a certificate", |log| {
        log.contains("the client sent no certificate")
    });
    let other = [
        "--end",
        "refused",
        "--cert",
        &pki.arg("client-of-other-ca.pem"),
    ];
    let other_key = pki.arg("client-of-other-ca.key");
    match python(addr, b"", &[&other[..], &["--key", &other_key]].concat()) {
        PyOutcome::Refused(_) => {}
        other => panic!("{model}: a certificate from another CA, yet {other:?}"),
    }
    server.wait_for_log("the refusal of another CA's certificate", |log| {
        log.contains("the client certificate is from an unknown CA")
    });
    let data = payload::bytes(5, 40_000);
    expect_echo_of(
        python(
            addr,
            &data,
            &[
                "--cert",
                &pki.arg("client-of-ca.pem"),
                "--key",
                &pki.arg("client-of-ca.key"),
            ],
        ),
        &data,
        &format!("{model}: mutual TLS with a good certificate"),
    );
    assert!(server.stop().success());
}

fn a_client_that_rejects_the_certificate(model: &str) {
    let pki = pki();
    let (server, addr) = start_tls(model, "tls", &[]);
    // The self-signed certificate is not from this CA: OpenSSL refuses it with an alert.
    match python(addr, b"", &["--end", "refused", "--ca", &pki.arg("ca.pem")]) {
        PyOutcome::Refused(why) => assert!(why.contains("CERTIFICATE_VERIFY_FAILED"), "{why}"),
        other => panic!("{model}: an untrusted certificate, yet {other:?}"),
    }
    server.wait_for_log("the rejection's close line", |log| {
        log.contains("TLS handshake failed: the client rejected our certificate")
    });
    assert!(server.stop().success());
}

fn plaintext_to_a_tls_port(model: &str) {
    let (server, addr) = start_tls(model, "tls", &[]);
    let mut stream = connect(addr);
    stream.write_all(b"hello, this is not TLS\r\n").unwrap();
    let mut got = Vec::new();
    // An alert record perhaps, then end of stream; never the echo.
    let _ = stream.read_to_end(&mut got);
    assert!(
        !got.windows(5).any(|w| w == b"hello"),
        "{model}: plaintext echoed on a TLS port"
    );
    server.wait_for_log("the plaintext's close line", |log| {
        log.contains("TLS handshake failed: not TLS")
    });
    // Only that connection was closed.
    let data = payload::bytes(6, 3000);
    expect_echo_of(
        python(addr, &data, &[]),
        &data,
        &format!("{model}: after plaintext"),
    );
    assert!(server.stop().success());
}

fn stalled_handshake_is_closed_at_the_timeout(model: &str) {
    let (server, addr) = start_tls(model, "tls", &["--tls-handshake-timeout", "1s"]);
    let mut stream = connect(addr);
    // The first bytes of a handshake record, then nothing.
    stream.write_all(&[0x16, 0x03, 0x01, 0x02]).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break started.elapsed(),
            Ok(_) => continue,
        }
    };
    assert!(
        closed >= Duration::from_millis(900) && closed < PATIENCE,
        "{model}: closed after {closed:?}, want about 1s"
    );
    server.wait_for_log("the timeout's close line", |log| {
        log.contains("no handshake within the timeout")
    });
    assert!(server.stop().success());
}

fn tls_behind_a_proxy_header(model: &str) {
    let (server, addr) = start_tls(model, "tls+proxy", &[]);
    let data = payload::bytes(8, 20_000);
    expect_echo_of(
        python(
            addr,
            &data,
            &["--proxy-header", "PROXY TCP4 10.1.2.3 127.0.0.1 5555 80"],
        ),
        &data,
        &format!("{model}: tls+proxy"),
    );
    wait_for_close_line(&server, &["peer=10.1.2.3:5555", "bytes=20000 "]);
    assert!(server.stop().success());
}

macro_rules! suite {
    ($($model:ident),* $(,)?) => {$(
        mod $model {
            fn name() -> &'static str {
                let name = stringify!($model);
                assert!(super::TLS_MODELS.contains(&name), "{name} is not in TLS_MODELS");
                name
            }
            /// Runs `test` for this model, unless the model cannot run here.
            fn run(test: fn(&str)) {
                if super::runs_here(name()) {
                    test(name())
                }
            }
            #[test]
            fn python_echoes_and_half_closes() { run(super::python_echoes_and_half_closes) }
            #[test]
            fn python_truncated_close_is_logged() { run(super::python_truncated_close_is_logged) }
            #[test]
            fn s_client_echoes_random_payloads() { run(super::s_client_echoes_random_payloads) }
            #[test]
            fn mutual_tls() { run(super::mutual_tls) }
            #[test]
            fn plaintext_to_a_tls_port() { run(super::plaintext_to_a_tls_port) }
            #[test]
            fn a_client_that_rejects_the_certificate() {
                run(super::a_client_that_rejects_the_certificate)
            }
            #[test]
            fn stalled_handshake_is_closed_at_the_timeout() {
                run(super::stalled_handshake_is_closed_at_the_timeout)
            }
            #[test]
            fn tls_behind_a_proxy_header() { run(super::tls_behind_a_proxy_header) }
        }
    )*};
}

suite!(iterative, process, prefork, thread, pool, epoll, uring);
mod async_model {
    // `async` is a keyword: the suite's functions, for the async model.
    #[test]
    fn python_echoes_and_half_closes() {
        super::python_echoes_and_half_closes("async")
    }
    #[test]
    fn python_truncated_close_is_logged() {
        super::python_truncated_close_is_logged("async")
    }
    #[test]
    fn s_client_echoes_random_payloads() {
        super::s_client_echoes_random_payloads("async")
    }
    #[test]
    fn mutual_tls() {
        super::mutual_tls("async")
    }
    #[test]
    fn plaintext_to_a_tls_port() {
        super::plaintext_to_a_tls_port("async")
    }
    #[test]
    fn a_client_that_rejects_the_certificate() {
        super::a_client_that_rejects_the_certificate("async")
    }
    #[test]
    fn stalled_handshake_is_closed_at_the_timeout() {
        super::stalled_handshake_is_closed_at_the_timeout("async")
    }
    #[test]
    fn tls_behind_a_proxy_header() {
        super::tls_behind_a_proxy_header("async")
    }
}

/// The bytes the kernel holds unread on the server's end of a loopback connection: the
/// `rx_queue` of the /proc/net/tcp line from `server` to `client`.
fn unread_on_server_side(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port_of = |field: &str| u16::from_str_radix(field.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, queues) = (fields.get(1)?, fields.get(2)?, fields.get(4)?);
        (port_of(local)? == server.port() && port_of(remote)? == client.port())
            .then(|| u64::from_str_radix(queues.split(':').nth(1)?, 16).ok())?
    })
}

/// A handshake still unfinished at the shutdown deadline is closed and its close line says
/// shutdown closed it, not the client (the blocking models' read sees an end of stream once
/// their deadline shuts the socket down); the server exits 0.
fn handshake_cut_short_by_the_shutdown_deadline(model: &str) {
    if !runs_here(model) {
        return;
    }
    let (mut server, addr) = start_tls(
        model,
        "tls",
        &[
            "--tls-handshake-timeout",
            "30s",
            "--shutdown-timeout",
            "500ms",
        ],
    );
    let mut stream = connect(addr);
    let me = stream.local_addr().unwrap();
    // The first bytes of a handshake record, then nothing.
    stream.write_all(&[0x16, 0x03, 0x01, 0x02]).unwrap();
    // Read by the server: accepted and in its handshake.
    assert!(
        common::wait_until(PATIENCE, || unread_on_server_side(addr, me) == Some(0)),
        "{model}: the server never read the handshake's first bytes"
    );
    let status = server.terminate_and_wait();
    assert!(status.success(), "{model}: exit status {status}");
    let mut buf = [0u8; 64];
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    assert!(
        matches!(stream.read(&mut buf), Ok(0) | Err(_)),
        "{model}: the connection is still open"
    );
    let log = server.log();
    let wanted = format!("peer={me} ");
    let close = log
        .lines()
        .find(|line| line.contains("connection closed") && line.contains(&wanted))
        .unwrap_or_else(|| panic!("{model}: no close line for {me}; log:\n{log}"));
    assert!(
        close.contains("closed at shutdown"),
        "{model}: close line {close:?} does not say shutdown closed it"
    );
}

#[test]
fn thread_handshake_cut_short_by_the_shutdown_deadline() {
    handshake_cut_short_by_the_shutdown_deadline("thread");
}

#[test]
fn process_handshake_cut_short_by_the_shutdown_deadline() {
    handshake_cut_short_by_the_shutdown_deadline("process");
}

#[test]
fn epoll_handshake_cut_short_by_the_shutdown_deadline() {
    handshake_cut_short_by_the_shutdown_deadline("epoll");
}

#[test]
fn async_handshake_cut_short_by_the_shutdown_deadline() {
    handshake_cut_short_by_the_shutdown_deadline("async");
}

#[test]
fn uring_handshake_cut_short_by_the_shutdown_deadline() {
    handshake_cut_short_by_the_shutdown_deadline("uring");
}

/// A process-model child killed (SIGKILL, as by the OOM killer) in the middle of a handshake
/// never gives its permit back itself; with `--tls-max-handshakes 1` that permit is the only
/// one. The cap takes it back from the dead process, so the next client is served at once, not
/// after the stalled handshake's timeout.
#[test]
fn a_child_killed_mid_handshake_gives_its_permit_back() {
    let (server, addr) = start_tls(
        "process",
        "tls",
        &[
            "--tls-max-handshakes",
            "1",
            "--tls-handshake-timeout",
            "60s",
        ],
    );
    let mut stalled = connect(addr);
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02]).unwrap();
    let client = stalled.local_addr().unwrap();
    // Its child has the permit once it has read those bytes (it reads only after taking one).
    let deadline = Instant::now() + PATIENCE;
    while unread_on_server_side(addr, client) != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the child never read the handshake's first bytes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let children = common::live_children(server.pid());
    assert_eq!(children.len(), 1, "one child per connection: {children:?}");
    common::signal(children[0], libc::SIGKILL);
    let started = Instant::now();
    let data = payload::bytes(12, 10_000);
    expect_echo_of(python(addr, &data, &[]), &data, "the client after the kill");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "served only after {:?}: the dead child's permit was not taken back",
        started.elapsed()
    );
    server.wait_for_log("the reclaim warning", |log| {
        log.contains("took back TLS handshake permits")
    });
    drop(stalled);
    assert!(server.stop().success());
}

#[test]
fn every_listed_model_has_a_suite() {
    // The suites above must cover TLS_MODELS; a model added to the list gets its suite line.
    let covered = [
        "iterative",
        "process",
        "prefork",
        "thread",
        "pool",
        "epoll",
        "async",
        "uring",
    ];
    for model in TLS_MODELS {
        assert!(covered.contains(model), "{model} has no suite line");
    }
}

/// `serve` with these flags must exit 1 with one line on stderr containing `want`.
fn refuses_to_start(flags: &[&str], want: &str) {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--model",
            "thread",
            "--listen",
            "tls://127.0.0.1:0",
        ])
        .args(flags)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run multiecho serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{flags:?}: one line, got:\n{stderr}"
    );
    assert!(stderr.contains(want), "{flags:?}: no {want:?} in {stderr}");
}

#[test]
fn bad_certificate_and_key_files_stop_the_start() {
    let pki = pki();
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = pki.arg("missing.pem");
    let (cert, key) = (pki.arg("server.pem"), pki.arg("server.key"));
    let other_key = pki.arg("ca.key");
    let garbage = garbage.to_string_lossy().into_owned();
    refuses_to_start(&["--tls-cert", &missing, "--tls-key", &key], "missing.pem");
    refuses_to_start(
        &["--tls-cert", &cert, "--tls-key", &other_key],
        "does not belong to the certificate",
    );
    refuses_to_start(
        &["--tls-cert", &garbage, "--tls-key", &key],
        "no certificate in",
    );
    refuses_to_start(
        &["--tls-cert", &cert, "--tls-key", &garbage],
        "no private key in",
    );
    refuses_to_start(&["--tls-client-ca", &garbage], "no certificate in");
}

#[test]
fn an_expired_certificate_is_served_with_a_warning() {
    let pki = pki();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2001, 1, 1);
    params.not_after = rcgen::date_time_ymd(2002, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (pki.path("expired.pem"), pki.path("expired.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let (server, addr) = start_tls(
        "thread",
        "tls",
        &[
            "--tls-cert",
            &cert_path.to_string_lossy(),
            "--tls-key",
            &key_path.to_string_lossy(),
        ],
    );
    // Ready means listening; the log reader may still be behind the warning.
    server.wait_for_log("the expiry warning", |log| {
        log.contains("expired on 2002-01-01")
    });
    let data = payload::bytes(3, 1000);
    expect_echo_of(python(addr, &data, &[]), &data, "expired certificate");
    assert!(server.stop().success());
}

#[test]
fn the_self_signed_certificate_s_fingerprint_is_logged() {
    let (server, addr) = start_tls("async", "tls", &["--listen", "tls://127.0.0.5:0"]);
    // Ready means listening; the log reader may still be behind the certificate line.
    server.wait_for_log("the fingerprint", |log| log.contains("sha256="));
    let log = server.log();
    let logged = log
        .split("sha256=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no fingerprint in the log:\n{log}"))
        .to_string();
    assert!(
        log.contains("self-signed certificate for localhost, 127.0.0.1, ::1, 127.0.0.5"),
        "the listen host is named:\n{log}"
    );
    let shown = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), "-showcerts"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let pem = String::from_utf8_lossy(&shown.stdout);
    let begin = pem
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = pem.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    x509.stdin
        .take()
        .unwrap()
        .write_all(pem[begin..end].as_bytes())
        .unwrap();
    let out = x509.wait_with_output().unwrap();
    let computed = String::from_utf8_lossy(&out.stdout);
    assert!(
        computed.trim().ends_with(&logged),
        "openssl says {computed}, the log says {logged}"
    );
    assert!(server.stop().success());
}
