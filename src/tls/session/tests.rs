//! The session against a real rustls client in memory (no sockets): a certificate made by
//! rcgen, ciphertext carried between the two in pieces of chosen sizes.

use std::io::{ErrorKind, Read, Write};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::*;
use crate::payload::{self, Rng};
use crate::tls::HandshakeFailure;

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One self-signed certificate for `localhost`, made once for every test.
pub(crate) fn certificate() -> &'static (CertificateDer<'static>, Vec<u8>) {
    static CERT: OnceLock<(CertificateDer<'static>, Vec<u8>)> = OnceLock::new();
    CERT.get_or_init(|| {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("rcgen makes a certificate");
        (made.cert.der().clone(), made.signing_key.serialize_der())
    })
}

pub(crate) fn server_config() -> Arc<ServerConfig> {
    let (cert, key) = certificate();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone()));
    Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap(),
    )
}

pub(crate) fn client_config(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(certificate().0.clone()).unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

pub(crate) fn tls13() -> Arc<ClientConfig> {
    client_config(&[&rustls::version::TLS13])
}

/// A server session and a rustls client, with the ciphertext in transit between them.
struct Pair {
    server: TlsSession,
    client: ClientConnection,
    scratch: Vec<u8>,
    /// Ciphertext the client wrote that the server has not been given yet.
    to_server: Vec<u8>,
    /// Plaintext the client has read back.
    echoed: Vec<u8>,
    /// The client saw the server's close_notify.
    client_saw_close: bool,
}

impl Pair {
    fn new(client: Arc<ClientConfig>) -> Pair {
        let name = ServerName::try_from("localhost").unwrap();
        Pair {
            server: TlsSession::new(server_config()).unwrap(),
            client: ClientConnection::new(client, name).unwrap(),
            scratch: vec![0; SCRATCH_SIZE],
            to_server: Vec::new(),
            echoed: Vec::new(),
            client_saw_close: false,
        }
    }

    /// Takes what the client queued, then gives the server up to `chunk` bytes at a time for
    /// as long as it wants input. Returns the bytes given.
    fn client_to_server(&mut self, chunk: usize) -> usize {
        while self.client.wants_write() {
            self.client.write_tls(&mut self.to_server).unwrap();
        }
        let mut given = 0;
        while !self.to_server.is_empty() && self.server.wants_input() {
            let n = chunk.min(self.to_server.len());
            let data: Vec<u8> = self.to_server.drain(..n).collect();
            self.server.receive(&data, &mut self.scratch);
            given += n;
        }
        given
    }

    /// Takes everything the server queued to the client, who reads it. Returns the bytes.
    fn server_to_client(&mut self) -> usize {
        let mut moved = 0;
        while self.server.wants_write() {
            let mut out = Vec::new();
            self.server.write_tls(&mut out).unwrap();
            self.server.progress(&mut self.scratch);
            moved += out.len();
            let mut rest = &out[..];
            while !rest.is_empty() {
                self.client.read_tls(&mut rest).unwrap();
                self.client.process_new_packets().unwrap();
                self.client_reads();
            }
        }
        moved
    }

    fn client_reads(&mut self) {
        let mut buf = [0; 4096];
        loop {
            match self.client.reader().read(&mut buf) {
                Ok(0) => {
                    self.client_saw_close = true;
                    return;
                }
                Ok(n) => self.echoed.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => panic!("client read failed: {e}"),
            }
        }
    }

    /// Runs the handshake to completion, `chunk` bytes at a time.
    fn handshake(&mut self, chunk: usize) {
        for _ in 0..10_000 {
            if !self.client.is_handshaking() && !self.server.is_handshaking() {
                // The server's session tickets (TLS 1.3) follow its Finished.
                self.server_to_client();
                return;
            }
            let moved = self.client_to_server(chunk) + self.server_to_client();
            assert!(
                moved > 0 || self.client.wants_write(),
                "handshake stuck: {:?}",
                self.server
            );
        }
        panic!("handshake did not finish");
    }

    /// The client sends `data` while reading its echo, the network carrying pieces of random
    /// sizes up to `max_chunk`; returns once every byte came back.
    fn echo(&mut self, data: &[u8], max_chunk: usize, rng: &mut Rng) {
        let start = self.echoed.len();
        let mut written = 0;
        let mut idle_rounds = 0;
        while self.echoed.len() - start < data.len() {
            if written < data.len() {
                written += self.client.writer().write(&data[written..]).unwrap();
            }
            let chunk = rng.range(1, max_chunk as u64) as usize;
            let moved = self.client_to_server(chunk) + self.server_to_client();
            if moved == 0 && written == data.len() {
                idle_rounds += 1;
                assert!(idle_rounds < 3, "echo stuck: {:?}", self.server);
            }
        }
        assert!(
            self.echoed[start..] == *data,
            "echo of {} bytes differs",
            data.len()
        );
    }
}

/// Random payloads from 1 byte to 1 MiB come back byte for byte, over TLS 1.3 and 1.2, the
/// network cutting them into pieces of random sizes (single bytes included).
#[test]
fn random_payloads_are_echoed_byte_exact() {
    let sizes = [
        1,
        2,
        100,
        4095,
        16 * 1024,
        16 * 1024 + 1,
        64 * 1024 + 7,
        300_000,
        1 << 20,
    ];
    for (versions, name) in [
        (&[&rustls::version::TLS13][..], "TLS 1.3"),
        (&[&rustls::version::TLS12][..], "TLS 1.2"),
    ] {
        let mut rng = Rng::new(0x7153_0001);
        let mut pair = Pair::new(client_config(versions));
        pair.handshake(rng.range(1, 600) as usize);
        for (i, &size) in sizes.iter().enumerate() {
            let data = payload::bytes(i as u64 + 1, size);
            let max_chunk = if size < 10_000 { 64 } else { 64 * 1024 };
            pair.echo(&data, max_chunk, &mut rng);
        }
        assert_eq!(
            pair.server.echoed(),
            sizes.iter().sum::<usize>() as u64,
            "{name}"
        );
        assert_eq!(
            pair.server.buffered(),
            0,
            "{name}: an idle session holds nothing"
        );
        assert!(pair.server.wants_input(), "{name}");
    }
}

/// The handshake and an echo work when every byte arrives on its own.
#[test]
fn byte_by_byte_delivery_works() {
    let mut rng = Rng::new(2);
    let mut pair = Pair::new(tls13());
    pair.handshake(1);
    pair.echo(b"one byte at a time", 1, &mut rng);
}

/// While the driver does not take the output, the session takes no more input after the echo
/// that filled it, and what it keeps is bounded: rustls's writer stops at `OUTPUT_LIMIT` and
/// the rest of what it was handed waits, unprocessed, in the session.
#[test]
fn output_not_taken_stops_input_and_bounds_memory() {
    let mut rng = Rng::new(3);
    let mut pair = Pair::new(tls13());
    pair.handshake(4096);
    let data = payload::bytes(3, 1 << 20);
    let mut written = 0;
    while written < data.len() {
        written += pair.client.writer().write(&data[written..]).unwrap();
        while pair.client.wants_write() {
            pair.client.write_tls(&mut pair.to_server).unwrap();
        }
    }
    // Readings of 64 KiB, as epoll's: the first one's echo fills the output; no second one.
    let given = pair.client_to_server(64 * 1024);
    assert_eq!(given, 64 * 1024, "one read, then backpressure");
    assert!(!pair.server.wants_input());
    assert!(pair.server.wants_write());

    // A driver that hands over more anyway (a recv already in flight): held, not processed.
    let extra: Vec<u8> = pair.to_server.drain(..200 * 1024).collect();
    pair.server.receive(&extra, &mut pair.scratch);
    assert!(pair.server.buffered() <= 64 * 1024 + extra.len());
    let mut queued = Vec::new();
    while pair.server.wants_write() {
        pair.server.write_tls(&mut queued).unwrap();
    }
    // Each record carries at most 16 KiB and costs 22 bytes of framing and tag (TLS 1.3).
    let overhead = (OUTPUT_LIMIT / (16 * 1024) + 2) * 22;
    assert!(
        queued.len() <= OUTPUT_LIMIT + overhead,
        "{} bytes of output queued at once",
        queued.len()
    );
    let mut rest = &queued[..];
    while !rest.is_empty() {
        pair.client.read_tls(&mut rest).unwrap();
        pair.client.process_new_packets().unwrap();
        pair.client_reads();
    }

    // Taken out, the session moves on and the whole megabyte comes back intact.
    pair.server.progress(&mut pair.scratch);
    let mut rounds = 0;
    while pair.echoed.len() < data.len() {
        let chunk = rng.range(1, 64 * 1024) as usize;
        pair.client_to_server(chunk);
        pair.server_to_client();
        rounds += 1;
        assert!(rounds < 10_000, "echo stuck: {:?}", pair.server);
    }
    assert!(pair.echoed == data);
    assert_eq!(pair.server.buffered(), 0);
}

/// The client's close_notify is its half-close: everything before it is echoed, then the
/// server's close_notify follows; bytes after it are ignored.
#[test]
fn close_notify_echoes_everything_then_closes() {
    let mut rng = Rng::new(4);
    let mut pair = Pair::new(tls13());
    pair.handshake(512);
    let data = payload::bytes(4, 100_000);
    pair.client.writer().write_all(&data[..60_000]).unwrap();
    pair.client_to_server(usize::MAX);
    pair.client.writer().write_all(&data[60_000..]).unwrap();
    pair.client.send_close_notify();
    while pair.client.wants_write() {
        pair.client.write_tls(&mut pair.to_server).unwrap();
    }
    // Garbage after the close_notify, which must be ignored.
    pair.to_server
        .extend_from_slice(b"\x17\x03\x03\x00\x05hello");
    let mut rounds = 0;
    while !pair.client_saw_close {
        pair.client_to_server(rng.range(1, 20_000) as usize);
        pair.server_to_client();
        rounds += 1;
        assert!(rounds < 1000, "no close_notify: {:?}", pair.server);
    }
    assert!(
        pair.echoed == data,
        "everything before close_notify came back"
    );
    assert!(matches!(pair.server.finished(), Some(Outcome::Closed)));
    assert!(!pair.server.wants_input());
    assert!(matches!(pair.server.take_outcome(), Some(Outcome::Closed)));
}

/// A TCP end without close_notify is a truncation once the handshake is done, a failed
/// handshake before.
#[test]
fn end_of_stream_without_close_notify_is_truncation() {
    let mut rng = Rng::new(5);
    let mut pair = Pair::new(tls13());
    pair.handshake(1000);
    pair.echo(b"hello", 100, &mut rng);
    pair.server.eof();
    assert!(matches!(pair.server.finished(), Some(Outcome::Truncated)));
    assert!(!pair.server.wants_input());
    let end = pair.server.take_outcome().unwrap().to_string();
    assert!(end.contains("truncated"), "{end}");

    let mut early = Pair::new(tls13());
    early.client_to_server(usize::MAX); // the ClientHello
    assert!(early.server.is_handshaking());
    early.server.eof();
    assert!(matches!(
        early.server.finished(),
        Some(Outcome::Failed(Failure::Handshake(HandshakeError {
            reason: HandshakeFailure::ClientClosed,
            ..
        })))
    ));
}

/// Plaintext to a TLS port fails the handshake with rustls's reason, and nothing is echoed.
#[test]
fn plaintext_client_fails_the_handshake_with_a_reason() {
    let mut session = TlsSession::new(server_config()).unwrap();
    let mut scratch = vec![0; SCRATCH_SIZE];
    session.receive(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", &mut scratch);
    let Some(Outcome::Failed(Failure::Handshake(e))) = session.finished() else {
        panic!("not a handshake failure: {session:?}");
    };
    assert_eq!(e.reason, HandshakeFailure::NotTls, "{e}");
    let reason = session.finished().unwrap().to_string();
    assert!(reason.starts_with("TLS handshake failed: "), "{reason}");
    assert_eq!(session.echoed(), 0);
    assert!(!session.wants_input());
    // More input is ignored, not processed.
    session.receive(b"more", &mut scratch);
    assert_eq!(session.buffered(), 0);
}

/// Random garbage, in any amount, never panics and never echoes: it fails the handshake at
/// once, or at the end of stream if it looked like the start of a record.
#[test]
fn random_garbage_fails_without_echo() {
    let mut rng = Rng::new(6);
    let mut scratch = vec![0; SCRATCH_SIZE];
    for round in 0..200 {
        let len = rng.range(1, 40_000) as usize;
        let mut garbage = payload::bytes(round, len);
        if round % 2 == 0 {
            // A plausible record header: handshake content, TLS 1.2, a random length.
            garbage[0] = 22;
            if len > 2 {
                garbage[1..3].copy_from_slice(&[3, 3]);
            }
        }
        let mut session = TlsSession::new(server_config()).unwrap();
        let mut rest = &garbage[..];
        while !rest.is_empty() && session.wants_input() {
            let n = (rng.range(1, 5000) as usize).min(rest.len());
            session.receive(&rest[..n], &mut scratch);
            rest = &rest[n..];
            let mut sink = Vec::new();
            while session.wants_write() {
                session.write_tls(&mut sink).unwrap();
            }
            session.progress(&mut scratch);
        }
        session.eof();
        assert!(
            matches!(session.finished(), Some(Outcome::Failed(_))),
            "round {round}: {session:?}"
        );
        assert_eq!(session.echoed(), 0);
    }
}

/// A record altered after the handshake is a protocol error, not a handshake failure.
#[test]
fn a_forged_record_after_the_handshake_fails_the_session() {
    let mut rng = Rng::new(7);
    let mut pair = Pair::new(tls13());
    pair.handshake(4096);
    pair.echo(b"before", 100, &mut rng);
    pair.client.writer().write_all(b"tampered with").unwrap();
    while pair.client.wants_write() {
        pair.client.write_tls(&mut pair.to_server).unwrap();
    }
    let last = pair.to_server.len() - 1;
    pair.to_server[last] ^= 1;
    pair.client_to_server(usize::MAX);
    assert!(
        matches!(
            pair.server.finished(),
            Some(Outcome::Failed(Failure::Protocol(_)))
        ),
        "{:?}",
        pair.server
    );
    assert!(
        pair.server.wants_write(),
        "rustls queued an alert for the client"
    );
}

/// A client that does not trust the certificate aborts the handshake; the server's session
/// fails with the alert the client sent as its reason.
#[test]
fn an_untrusting_client_fails_the_handshake() {
    let untrusting = Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    );
    let mut pair = Pair::new(untrusting);
    pair.client_to_server(usize::MAX);
    // The client rejects the server's certificate and queues an alert.
    let mut out = Vec::new();
    while pair.server.wants_write() {
        pair.server.write_tls(&mut out).unwrap();
    }
    let mut rest = &out[..];
    let mut rejected = false;
    while !rest.is_empty() {
        pair.client.read_tls(&mut rest).unwrap();
        rejected |= pair.client.process_new_packets().is_err();
    }
    assert!(rejected, "the client accepted an unknown certificate");
    pair.client_to_server(usize::MAX);
    let Some(Outcome::Failed(Failure::Handshake(e))) = pair.server.finished() else {
        panic!("not a handshake failure: {:?}", pair.server);
    };
    assert!(
        e.detail.contains("received fatal alert"),
        "the client's alert is the reason: {e}"
    );
}

/// A session that timed out is finished with that reason, whatever it was doing.
#[test]
fn handshake_timeout_finishes_the_session() {
    let mut pair = Pair::new(tls13());
    pair.client_to_server(usize::MAX);
    pair.server.handshake_timed_out(false);
    assert!(!pair.server.wants_input());
    let Some(Outcome::Failed(Failure::Handshake(e))) = pair.server.take_outcome() else {
        panic!("not a handshake failure");
    };
    assert_eq!(e.reason, HandshakeFailure::Timeout);
}
