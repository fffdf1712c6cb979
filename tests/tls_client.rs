//! The TLS client side against real TLS peers: `multiecho client` and `bench` over tls://
//! against Debian's `ncat --ssl --exec /bin/cat`, `openssl s_server -Verify` (mutual TLS) and
//! the tokio-rustls echo server of `examples/tls_echo_server.rs`, with certificates made by
//! `openssl req` the way most users make them (CA:TRUE with Debian's openssl.cnf, so they
//! are accepted as pinned certificates).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use common::{assert_same, BIN, PATIENCE};

/// Certificates made once per test run by `openssl req`.
struct Certs {
    /// The server's: CN=localhost, SAN DNS:localhost, IP:127.0.0.1 (the recipe).
    server: (PathBuf, PathBuf),
    /// Another self-signed one, trusted by nobody here.
    other: (PathBuf, PathBuf),
    /// A client's, for mutual TLS.
    client: (PathBuf, PathBuf),
    /// A CA (CA:TRUE) and a server certificate it signed (CA:FALSE, SAN localhost and
    /// 127.0.0.1): the ordinary chain, verified by webpki itself.
    ca: PathBuf,
    leaf: (PathBuf, PathBuf),
}

/// `None` (after a loud skip) without openssl.
fn certs() -> Option<&'static Certs> {
    static CERTS: OnceLock<Option<Certs>> = OnceLock::new();
    CERTS
        .get_or_init(|| {
            if Command::new("openssl").arg("version").output().is_err() {
                return None;
            }
            let dir =
                std::env::temp_dir().join(format!("multiecho-tls-client-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let make = |name: &str, cn: &str, san: &str| {
                let cert = dir.join(format!("{name}-cert.pem"));
                let key = dir.join(format!("{name}-key.pem"));
                let status = Command::new("openssl")
                    .args([
                        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    ])
                    .args(["-subj", &format!("/CN={cn}"), "-addext", san])
                    .arg("-keyout")
                    .arg(&key)
                    .arg("-out")
                    .arg(&cert)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .expect("run openssl req");
                assert!(status.success(), "openssl req failed");
                (cert, key)
            };
            let localhost = "subjectAltName=DNS:localhost,IP:127.0.0.1";
            let (ca, ca_key) = make(
                "ca",
                "multiecho test CA",
                "basicConstraints=critical,CA:TRUE",
            );
            let leaf = (dir.join("leaf-cert.pem"), dir.join("leaf-key.pem"));
            let csr = dir.join("leaf.csr");
            let ext = dir.join("leaf.ext");
            std::fs::write(&ext, format!("{localhost}\nbasicConstraints=CA:FALSE\n")).unwrap();
            let openssl = |args: &[&std::ffi::OsStr]| {
                let status = Command::new("openssl")
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .expect("run openssl");
                assert!(status.success(), "openssl {args:?} failed");
            };
            let os = |s: &'static str| std::ffi::OsStr::new(s);
            openssl(&[
                os("req"),
                os("-newkey"),
                os("rsa:2048"),
                os("-nodes"),
                os("-subj"),
                os("/CN=localhost"),
                os("-keyout"),
                leaf.1.as_os_str(),
                os("-out"),
                csr.as_os_str(),
            ]);
            openssl(&[
                os("x509"),
                os("-req"),
                os("-in"),
                csr.as_os_str(),
                os("-CA"),
                ca.as_os_str(),
                os("-CAkey"),
                ca_key.as_os_str(),
                os("-CAcreateserial"),
                os("-days"),
                os("2"),
                os("-extfile"),
                ext.as_os_str(),
                os("-out"),
                leaf.0.as_os_str(),
            ]);
            Some(Certs {
                server: make("server", "localhost", localhost),
                other: make("other", "localhost", localhost),
                client: make("client", "client", "subjectAltName=DNS:client"),
                ca,
                leaf,
            })
        })
        .as_ref()
}

/// The certificates, or a loud skip.
fn certs_or_skip() -> Option<&'static Certs> {
    let certs = certs();
    if certs.is_none() {
        common::skip_unless_ci(
            "no openssl on this machine (apt-get install openssl; .ci/run does)",
        );
    }
    certs
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A peer process, killed when dropped.
struct Peer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `child` itself listens on 127.0.0.1:`port` (a listening socket in
/// /proc/net/tcp whose inode is one of the child's descriptors); `false` if it exited first
/// (its bind failed: the free port was taken meanwhile by another test). A probing connect
/// cannot tell: it succeeds against whichever process took the port.
fn wait_listening(port: u16, child: &mut Child, what: &str) -> bool {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if listens_on(child.id(), port) {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        assert!(Instant::now() < deadline, "{what} did not start listening");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port`.
fn listens_on(pid: u32, port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let wanted = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(9)?;
            (fields.get(1) == Some(&wanted.as_str()) && fields.get(3) == Some(&"0A"))
                .then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|inode| target.to_str() == Some(inode)))
    })
}

/// Debian's ncat with TLS and its echo recipe: `ncat --ssl -l --keep-open --exec /bin/cat`,
/// presenting the server certificate. `None` (after a loud skip) without ncat.
fn ncat_ssl(certs: &Certs) -> Option<Peer> {
    ncat_ssl_with(&certs.server)
}

/// [`ncat_ssl`] presenting `cert_and_key`.
fn ncat_ssl_with((cert, key): &(PathBuf, PathBuf)) -> Option<Peer> {
    if Command::new("ncat").arg("--version").output().is_err() {
        common::skip_unless_ci("no ncat on this machine (apt-get install ncat; .ci/run does)");
        return None;
    }
    // A free port can be taken by another test before ncat binds it: then try another.
    for _ in 0..5 {
        let port = free_port();
        let mut child = Command::new("ncat")
            .args(["--ssl", "--ssl-cert"])
            .arg(cert)
            .arg("--ssl-key")
            .arg(key)
            .args(["-l", "--keep-open", "--exec", "/bin/cat", "127.0.0.1"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ncat");
        if wait_listening(port, &mut child, "ncat --ssl") {
            return Some(Peer {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            });
        }
    }
    panic!("ncat --ssl exited before listening, five times");
}

/// `openssl s_server -Verify 1` trusting the client certificate: mutual TLS. With `-rev` it
/// sends each line back reversed.
fn openssl_mutual_tls(certs: &Certs) -> Peer {
    let port = free_port();
    let mut child = Command::new("openssl")
        .args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(&certs.server.0)
        .arg("-key")
        .arg(&certs.server.1)
        .args(["-Verify", "1", "-verify_return_error", "-rev", "-CAfile"])
        .arg(&certs.client.0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start openssl s_server");
    // It says ACCEPT once it listens; its stdout is drained after that so it never blocks.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = stdout.read_line(&mut line).unwrap_or(0);
        assert!(n > 0, "openssl s_server ended before listening");
        if line.trim() == "ACCEPT" {
            break;
        }
    }
    thread::spawn(move || {
        let _ = std::io::copy(&mut stdout, &mut std::io::sink());
    });
    Peer {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

/// The tokio-rustls baseline of examples/tls_echo_server.rs (built by `cargo test`, beside
/// this test's binary). `None` (after a loud skip) if it was not built.
fn tokio_rustls_server(certs: &Certs) -> Option<Peer> {
    let exe = std::env::current_exe().unwrap();
    let example: PathBuf = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("examples").join("tls_echo_server"))
        .unwrap();
    if !example.exists() {
        common::skip_unless_ci(&format!(
            "{} is not built (plain `cargo test` builds it; `cargo build --example \
             tls_echo_server` does too)",
            example.display()
        ));
        return None;
    }
    let mut child = Command::new(&example)
        .arg("127.0.0.1:0")
        .arg(&certs.server.0)
        .arg(&certs.server.1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the tokio-rustls echo server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the tokio-rustls server said {line:?}"));
    Some(Peer { child, addr })
}

/// Runs multiecho with `args`, `input` on its stdin; killed (and the test failed) if it takes
/// longer than [`PATIENCE`].
fn multiecho(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn multiecho");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("multiecho {args:?} still running after {PATIENCE:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    writer.join().unwrap();
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Random printable lines, `count` of them.
fn lines(count: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..count {
        let payload = common::payload_for(i as u64);
        let text: String = payload
            .iter()
            .take(20 + i % 200)
            .map(|b| char::from(b'a' + b % 26))
            .collect();
        out.extend_from_slice(text.as_bytes());
        out.push(b'\n');
    }
    out
}

#[test]
fn line_client_verifies_an_openssl_req_certificate_by_host_name_and_by_ip() {
    let Some(certs) = certs_or_skip() else { return };
    let Some(ncat) = ncat_ssl(certs) else { return };
    let target = format!("tls://{}", ncat.addr);
    let input = lines(50);
    // The default server name is the target's host, 127.0.0.1 (the IP address SAN) ...
    let by_ip = multiecho(
        &["client", &target, "--tls-ca", path(&certs.server.0)],
        &input,
    );
    assert!(by_ip.status.success(), "{}", stderr_of(&by_ip));
    assert_same(&by_ip.stdout, &input, "line client over TLS to ncat, by IP");
    // ... and --sni localhost checks the DNS name SAN.
    let by_name = multiecho(
        &[
            "client",
            &target,
            "--tls-ca",
            path(&certs.server.0),
            "--sni",
            "localhost",
        ],
        &input,
    );
    assert!(by_name.status.success(), "{}", stderr_of(&by_name));
    assert_same(
        &by_name.stdout,
        &input,
        "line client over TLS to ncat, by name",
    );
}

#[test]
fn a_wrong_ca_or_a_wrong_name_is_a_verification_error() {
    let Some(certs) = certs_or_skip() else { return };
    let Some(ncat) = ncat_ssl(certs) else { return };
    let target = format!("tls://{}", ncat.addr);
    let wrong_ca = multiecho(
        &["client", &target, "--tls-ca", path(&certs.other.0)],
        b"hi\n",
    );
    assert!(!wrong_ca.status.success());
    assert!(wrong_ca.stdout.is_empty());
    let err = stderr_of(&wrong_ca);
    assert!(err.contains("invalid peer certificate"), "{err}");
    // webpki refuses a CA:TRUE server certificate before it looks for its issuer.
    assert!(
        err.contains("not one of the --tls-ca certificates"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    // The pinned certificate's host name is still checked.
    let wrong_name = multiecho(
        &[
            "client",
            &target,
            "--tls-ca",
            path(&certs.server.0),
            "--sni",
            "example.com",
        ],
        b"hi\n",
    );
    assert!(!wrong_name.status.success());
    let err = stderr_of(&wrong_name);
    assert!(err.contains("invalid peer certificate"), "{err}");
    assert!(err.contains("see --sni"), "{err}");

    // Without --tls-ca or --insecure there is nothing to trust.
    let nothing = multiecho(&["client", &target], b"hi\n");
    assert!(!nothing.status.success());
    let err = stderr_of(&nothing);
    assert!(err.contains("needs --tls-ca FILE"), "{err}");
}

#[test]
fn a_certificate_signed_by_the_ca_verifies_and_an_unknown_ca_is_refused() {
    let Some(certs) = certs_or_skip() else { return };
    let Some(ncat) = ncat_ssl_with(&certs.leaf) else {
        return;
    };
    let target = format!("tls://{}", ncat.addr);
    let input = lines(10);
    let output = multiecho(
        &[
            "client",
            &target,
            "--tls-ca",
            path(&certs.ca),
            "--sni",
            "localhost",
        ],
        &input,
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_same(
        &output.stdout,
        &input,
        "client verifying a CA-signed certificate",
    );

    let unknown = multiecho(
        &["client", &target, "--tls-ca", path(&certs.server.0)],
        b"hi\n",
    );
    assert!(!unknown.status.success());
    let err = stderr_of(&unknown);
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(
        err.contains("give --tls-ca the server's certificate or the CA"),
        "{err}"
    );
}

#[test]
fn insecure_works_and_warns() {
    let Some(certs) = certs_or_skip() else { return };
    let Some(ncat) = ncat_ssl(certs) else { return };
    let input = lines(5);
    let output = multiecho(
        &["client", &format!("tls://{}", ncat.addr), "--insecure"],
        &input,
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_same(&output.stdout, &input, "insecure client");
    let err = stderr_of(&output);
    assert!(err.contains("warning: --insecure"), "{err}");
}

#[test]
fn mutual_tls_against_openssl_s_server() {
    let Some(certs) = certs_or_skip() else { return };
    let server = openssl_mutual_tls(certs);
    let target = format!("tls://{}", server.addr);
    let ca = path(&certs.server.0);
    let with_cert = multiecho(
        &[
            "client",
            &target,
            "--tls-ca",
            ca,
            "--tls-cert",
            path(&certs.client.0),
            "--tls-key",
            path(&certs.client.1),
        ],
        b"olleh\n",
    );
    assert!(with_cert.status.success(), "{}", stderr_of(&with_cert));
    // s_server -rev sends each line back reversed.
    assert_eq!(with_cert.stdout, b"hello\n");

    let without = multiecho(&["client", &target, "--tls-ca", ca], b"olleh\n");
    assert!(
        !without.status.success(),
        "served without a client certificate"
    );
    assert!(without.stdout.is_empty());
}

#[test]
fn split_client_sends_a_mebibyte_and_gets_it_back_at_close_notify() {
    let Some(certs) = certs_or_skip() else { return };
    let Some(server) = tokio_rustls_server(certs) else {
        return;
    };
    let target = format!("tls://{}", server.addr);
    // More than the socket buffers and rustls's buffer hold, so sending and receiving must
    // overlap; binary, with no line structure.
    let input: Vec<u8> = (0..16)
        .flat_map(common::payload_for)
        .cycle()
        .take(1 << 20)
        .collect();
    let output = multiecho(
        &[
            "client",
            "--split",
            &target,
            "--tls-ca",
            path(&certs.server.0),
        ],
        &input,
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_same(&output.stdout, &input, "split client over TLS");
    assert!(
        !stderr_of(&output).contains("close_notify"),
        "{}",
        stderr_of(&output)
    );
    // The line client too, through the same server.
    let input = lines(100);
    let output = multiecho(
        &["client", &target, "--tls-ca", path(&certs.server.0)],
        &input,
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_same(&output.stdout, &input, "line client over TLS");
}

/// Runs `bench --json` and returns its report.
fn bench(args: &[&str]) -> (Output, serde_json::Value) {
    let mut all = vec!["bench", "--json"];
    all.extend_from_slice(args);
    let output = multiecho(&all, b"");
    let report = serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    (output, report)
}

#[test]
fn bench_verifies_every_byte_against_ncat_ssl() {
    let Some(certs) = certs_or_skip() else { return };
    let Some(ncat) = ncat_ssl(certs) else { return };
    let target = format!("tls://{}", ncat.addr);
    let (output, report) = bench(&[
        target.as_str(),
        "--tls-ca",
        path(&certs.server.0),
        "--sni",
        "localhost",
        "--conns",
        "4",
        "--requests",
        "400",
    ]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(report["requests"], 400, "{report:#}");
    assert_eq!(report["errors"], 0, "{report:#}");
    assert_eq!(report["mismatches"], 0, "{report:#}");
    assert_eq!(report["tls"]["handshakes"], 4, "{report:#}");
    assert!(
        report["tls"]["handshake_latency_us"]["p50"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    let (output, _) = bench(&[
        target.as_str(),
        "--tls-ca",
        path(&certs.other.0),
        "--requests",
        "10",
    ]);
    assert!(!output.status.success());
    let err = stderr_of(&output);
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(
        err.contains("not one of the --tls-ca certificates"),
        "{err}"
    );
}

#[test]
fn bench_is_byte_exact_against_tokio_rustls_and_counts_handshakes() {
    let Some(certs) = certs_or_skip() else { return };
    let Some(server) = tokio_rustls_server(certs) else {
        return;
    };
    let target = format!("tls://{}", server.addr);
    let ca = path(&certs.server.0);
    // Messages larger than a TLS record (16 KiB), pipelined, over several threads.
    let (output, report) = bench(&[
        target.as_str(),
        "--tls-ca",
        ca,
        "--conns",
        "8",
        "--size",
        "40000",
        "--pipeline",
        "3",
        "--requests",
        "600",
        "--threads",
        "2",
    ]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(report["requests"], 600, "{report:#}");
    assert_eq!(report["errors"], 0, "{report:#}");
    assert_eq!(report["mismatches"], 0, "{report:#}");
    assert_eq!(report["config"]["tls"], true, "{report:#}");

    // Churn: a full handshake per round trip, and handshakes per second in the report.
    let (output, report) = bench(&[
        target.as_str(),
        "--tls-ca",
        ca,
        "--conns",
        "4",
        "--churn",
        "--duration",
        "1s",
    ]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(report["errors"], 0, "{report:#}");
    let requests = report["requests"].as_u64().unwrap();
    let handshakes = report["tls"]["handshakes"].as_u64().unwrap();
    assert!(requests > 0, "{report:#}");
    assert!(handshakes >= requests, "{report:#}");
    assert!(
        report["tls"]["handshakes_per_sec"].as_f64().unwrap() > 0.0,
        "{report:#}"
    );

    // Text report.
    let output = multiecho(&["bench", &target, "--tls-ca", ca, "--requests", "20"], b"");
    assert!(output.status.success(), "{}", stderr_of(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("full handshakes"), "{text}");
    assert!(text.contains("handshake (us)"), "{text}");
}

#[test]
fn tls_flags_need_a_tls_target() {
    let output = multiecho(&["client", "127.0.0.1:9", "--insecure"], b"");
    assert!(!output.status.success());
    assert!(
        stderr_of(&output).contains("need a tls:// target"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
/// epoll and uring behind tls:// beside their plain selves and an external TLS server: every
/// point of each passes.
fn compare_sweeps_tls_for_the_event_driven_models_and_an_external_server() {
    let Some(certs) = certs_or_skip() else { return };
    let Some(server) = tokio_rustls_server(certs) else {
        return;
    };
    let out = std::env::temp_dir().join(format!("multiecho-tls-compare-{}", std::process::id()));
    let external = format!("tokio-rustls=tls://{}", server.addr);
    let output = multiecho(
        &[
            "compare",
            "--tls",
            "--models",
            "epoll,uring",
            "--conns",
            "2",
            "--size",
            "64,20000",
            "--duration",
            "0.3",
            "--warmup",
            "0",
            "--tls-cert",
            path(&certs.server.0),
            "--tls-key",
            path(&certs.server.1),
            "--external",
            &external,
            "--out",
            path(&out),
        ],
        b"",
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        output.status.success(),
        "{}\n{report:#}",
        stderr_of(&output)
    );
    let servers = report["servers"].as_array().unwrap();
    let names: Vec<&str> = servers
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["epoll", "epoll+tls", "uring", "uring+tls", "tokio-rustls"],
        "{report:#}"
    );
    for server in servers {
        if let Some(reason) = server["skipped"].as_str() {
            // Only a machine without io_uring may skip a model, and it says so loudly.
            assert!(
                server["name"].as_str().unwrap().starts_with("uring")
                    && reason.contains("io_uring is not available"),
                "{report:#}"
            );
            common::skip_unless_ci(&format!("compare skipped {}: {reason}", server["name"]));
            continue;
        }
        let points = server["points"].as_array().unwrap();
        assert_eq!(points.len(), 2, "{report:#}");
        for point in points {
            assert_eq!(point["failed"], false, "{report:#}");
        }
    }
    assert_eq!(servers[4]["address"], format!("tls://{}", server.addr));
}
