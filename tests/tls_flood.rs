//! A handshake flood against the event-driven models: 1,000 TLS handshakes started at once
//! while 50 established TLS connections keep echoing. The handshake cap keeps the flood from
//! starving the established connections: their round trips during the flood must stay within
//! a stated bound at the 99th percentile, and every flooding handshake must still complete.
//!
//! The bound is generous on purpose ([`P99_BOUND`]): the suite runs on a shared, loaded
//! 2-core machine, with debug builds of the server and of this test's rustls client. What it
//! guards against is starvation (an event loop that serves a whole flood of handshakes before
//! it echoes again stalls established connections for seconds), not a speed figure; speed is
//! measured by `multiecho bench`.

mod common;

use std::io::ErrorKind;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use common::PATIENCE;

/// Established connections that keep echoing during the flood.
const ESTABLISHED: usize = 50;
/// Handshakes started at once.
const FLOOD: usize = 1000;
/// The echo size of the established connections.
const MESSAGE: usize = 512;
/// The stated bound on the established connections' round trip at the 99th percentile while
/// the flood is handshaking.
const P99_BOUND: Duration = Duration::from_millis(1500);

/// A certificate for `localhost`, written where the server can read it.
struct Certificate {
    der: CertificateDer<'static>,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
}

impl Certificate {
    fn make(tag: &str) -> Certificate {
        let made = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        let dir =
            std::env::temp_dir().join(format!("multiecho-tls-flood-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, made.cert.pem()).unwrap();
        std::fs::write(&key_path, made.signing_key.serialize_pem()).unwrap();
        Certificate {
            der: made.cert.der().clone(),
            cert_path,
            key_path,
        }
    }

    fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        Arc::new(
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl Drop for Certificate {
    fn drop(&mut self) {
        if let Some(dir) = self.cert_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn client(config: &Arc<ClientConfig>) -> ClientConnection {
    ClientConnection::new(
        Arc::clone(config),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap()
}

fn tls_addr(server: &common::Server) -> SocketAddr {
    server.listener("tls")
}

/// Connects and completes a handshake, blocking.
fn established(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> StreamOwned<ClientConnection, TcpStream> {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut stream = StreamOwned::new(client(config), tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}

/// Opens [`FLOOD`] connections at once and drives all their handshakes from one event loop, so
/// they are truly simultaneous (none waits for another's turn); returns how many completed
/// (all of them, or the test fails with the reason).
fn flood(addr: SocketAddr, config: &Arc<ClientConfig>) -> Result<usize, String> {
    use mio::{Events, Interest, Poll, Token};
    let mut poll = Poll::new().unwrap();
    let mut flood: Vec<(mio::net::TcpStream, ClientConnection, bool)> = (0..FLOOD)
        .map(|i| {
            let mut tcp = mio::net::TcpStream::connect(addr).unwrap();
            poll.registry()
                .register(&mut tcp, Token(i), Interest::READABLE | Interest::WRITABLE)
                .unwrap();
            (tcp, client(config), false)
        })
        .collect();
    let mut events = Events::with_capacity(1024);
    let mut done = 0;
    let deadline = Instant::now() + PATIENCE;
    let started = Instant::now();
    while done < FLOOD {
        if Instant::now() >= deadline {
            return Err(format!(
                "only {done} of {FLOOD} flooding handshakes completed in {PATIENCE:?}"
            ));
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for event in events.iter() {
            let (tcp, conn, finished) = &mut flood[event.token().0];
            if *finished {
                continue;
            }
            // Edge-triggered: write what is queued, read until the socket is drained.
            loop {
                while conn.wants_write() {
                    match conn.write_tls(tcp) {
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock | ErrorKind::NotConnected
                            ) =>
                        {
                            break
                        }
                        Err(e) => {
                            return Err(format!(
                                "a flooding handshake's write failed after {:?} ({done} done): {e}",
                                started.elapsed()
                            ))
                        }
                    }
                }
                match conn.read_tls(tcp) {
                    Ok(0) => {
                        return Err(format!(
                            "the server closed a flooding handshake after {:?} ({done} done)",
                            started.elapsed()
                        ))
                    }
                    Ok(_) => {
                        if let Err(e) = conn.process_new_packets() {
                            return Err(format!("a flooding handshake failed: {e}"));
                        }
                    }
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected) =>
                    {
                        break
                    }
                    Err(e) => {
                        return Err(format!(
                            "a flooding handshake's read failed after {:?} ({done} done): {e}",
                            started.elapsed()
                        ))
                    }
                }
            }
            if !conn.is_handshaking() && !conn.wants_write() {
                *finished = true;
                done += 1;
            }
        }
    }
    // Held open until now, so the flood stayed simultaneous; closed together.
    drop(flood);
    Ok(done)
}

fn flood_survives(model: &str) {
    let certificate = Certificate::make(model);
    let cert = certificate.cert_path.to_str().unwrap();
    let key = certificate.key_path.to_str().unwrap();
    let Some(server) = common::start_or_skip(
        model,
        &[
            "--listen",
            "tls://127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--workers",
            "2",
            // The flood's last handshakes wait their turn under the cap for seconds on a
            // loaded machine; what is tested is the established connections, not this timeout.
            "--tls-handshake-timeout",
            "60s",
        ],
    ) else {
        return;
    };
    let addr = tls_addr(&server);
    let config = certificate.client_config();

    let streams: Vec<_> = (0..ESTABLISHED)
        .map(|_| established(addr, &config))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    // Round trips, as (finished at, took), from every established connection.
    let samples = Arc::new(Mutex::new(Vec::new()));
    let ready = Arc::new(Barrier::new(ESTABLISHED + 1));
    let echoers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut stream)| {
            let (stop, samples, ready) = (stop.clone(), samples.clone(), ready.clone());
            thread::spawn(move || {
                let message = multiecho::payload::bytes(i as u64, MESSAGE);
                let mut back = vec![0; MESSAGE];
                let mut mine = Vec::new();
                ready.wait();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    stream.write_all(&message).unwrap();
                    stream.read_exact(&mut back).unwrap();
                    assert!(back == message, "echo {i} differs");
                    let now = Instant::now();
                    mine.push((now, now - start));
                }
                samples.lock().unwrap().extend(mine);
            })
        })
        .collect();
    ready.wait();
    // Let the echo settle into its stride before the flood.
    thread::sleep(Duration::from_millis(200));

    let flood_start = Instant::now();
    let handshakes = flood(addr, &config).unwrap_or_else(|e| {
        let log = server.log();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        panic!(
            "{model}: {e}; the server's last log lines:\n{}",
            tail.join("\n")
        )
    });
    let flood_end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    for echoer in echoers {
        echoer.join().expect("an established connection failed");
    }

    let mut during: Vec<Duration> = samples
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at >= flood_start && *at <= flood_end)
        .map(|(_, took)| *took)
        .collect();
    during.sort();
    assert!(
        during.len() >= ESTABLISHED,
        "{model}: only {} round trips during the flood",
        during.len()
    );
    let p99 = during[during.len() * 99 / 100];
    eprintln!(
        "{model}: {handshakes} handshakes in {:?}; {} round trips meanwhile, p50 {:?}, p99 {p99:?}, max {:?} (load: {})",
        flood_end - flood_start,
        during.len(),
        during[during.len() / 2],
        during[during.len() - 1],
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    );
    assert_eq!(
        handshakes, FLOOD,
        "{model}: every flooding handshake completed"
    );
    assert!(
        p99 <= P99_BOUND,
        "{model}: round trips during the flood: p99 {p99:?} > {P99_BOUND:?}"
    );
    drop(server);
}

/// One test for both event-driven models, run one after the other: two floods at once on a
/// 2-core machine would measure each other.
#[test]
fn established_connections_are_served_through_a_handshake_flood() {
    flood_survives("epoll");
    flood_survives("uring");
}
