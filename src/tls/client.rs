//! The client side of TLS: the rustls configuration `client`, `bench` and `compare` build
//! from their flags, the blocking handshake, and the TLS split client.
//!
//! Verification. `--tls-ca FILE` names the certificates to trust (PEM): a CA's, or the
//! server's own. rustls's verifier (webpki) refuses a server certificate marked CA:TRUE as an
//! end entity (`CaUsedAsEndEntity`), and that is exactly what `openssl req -x509` makes with
//! Debian's openssl.cnf, where curl and OpenSSL accept it when it is the trusted certificate
//! itself. So when webpki refuses the presented certificate for that reason alone and it is
//! byte for byte one of the `--tls-ca` certificates (a pinned certificate), it is accepted;
//! the host name is still checked, and its validity period already was (webpki checks it
//! before the basic constraints). `--insecure` skips verification and says so on stderr; the
//! handshake signature is still checked, so the server at least holds the key of the
//! certificate it sent. There are no system roots: `tls://` needs one of the two.
//!
//! The split client. Plain TCP's split client sends and receives on two threads over two
//! handles of one socket; a TLS session is one state machine for both directions, so the TLS
//! split client is one thread polling standard input and the socket together. It reads input
//! only once rustls has handed everything before it to the socket (memory stays bounded and a
//! server that does not read holds the input back, as TCP's send buffer does); at the end of
//! input it sends close_notify, TLS's half-close, and prints until the server closes.

use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore};
use rustls::{SignatureScheme, StreamOwned};

use crate::client::{fill, is_quit, EchoStream, MAX_IN_FLIGHT};

/// A TLS connection with its blocking socket, handshake done.
pub type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// How a client verifies a TLS server and proves itself: what `client`'s and `bench`'s TLS
/// flags say (`cli` turns them into this).
#[derive(Debug, Clone, Default)]
pub struct TlsClientOptions {
    /// Trust these certificates (PEM): the CA that signed the server's certificate, or the
    /// server's certificate itself. A server certificate that is one of these is accepted
    /// even when marked CA:TRUE (as `openssl req -x509` makes it), so `serve --tls-cert
    /// cert.pem` then `client --tls-ca cert.pem` just works; its host name is still checked.
    pub tls_ca: Option<PathBuf>,
    /// Do not verify the server's certificate (a warning says so on stderr). Anyone on the
    /// path can then read and change the traffic: for tests only.
    pub insecure: bool,
    /// The server name to send (SNI) and to verify the certificate against (default: the
    /// host of the target, a name or an IP address).
    pub sni: Option<String>,
    /// A client certificate (PEM, a chain is allowed), for servers that require one (mutual
    /// TLS). Needs --tls-key.
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, RSA or SEC1).
    pub tls_key: Option<PathBuf>,
}

/// What a TLS connection needs besides its address: the configuration and the name to verify.
#[derive(Clone, Debug)]
pub struct TlsTarget {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

/// Session resumption: bench measures full handshakes, so it turns it off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resumption {
    Allowed,
    Disabled,
}

impl TlsClientOptions {
    /// Whether any TLS flag was given (they mean nothing for a plain target).
    pub fn any_given(&self) -> bool {
        self.tls_ca.is_some()
            || self.insecure
            || self.sni.is_some()
            || self.tls_cert.is_some()
            || self.tls_key.is_some()
    }

    /// Fails if TLS flags were given for a target that is not `tls://`.
    pub fn refuse_for_plain_target(&self, target: &str) -> anyhow::Result<()> {
        if self.any_given() {
            bail!("the TLS flags (--tls-ca, --insecure, --sni, --tls-cert) need a tls:// target, not {target}");
        }
        Ok(())
    }

    /// The configuration and server name for a `tls://` target written as `target`.
    pub fn target(&self, target: &str, resumption: Resumption) -> anyhow::Result<TlsTarget> {
        let name = match &self.sni {
            Some(name) => name.clone(),
            None => host_of(target),
        };
        let name = ServerName::try_from(name.clone())
            .map_err(|_| anyhow!("invalid server name '{name}' (for --sni)"))?;
        Ok(TlsTarget {
            config: self.config(resumption)?,
            name,
        })
    }

    /// The rustls client configuration these flags describe.
    pub fn config(&self, resumption: Resumption) -> anyhow::Result<Arc<ClientConfig>> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .context("the TLS provider supports no protocol version")?
            .dangerous();
        let builder = if self.insecure {
            eprintln!(
                "multiecho: warning: --insecure: the server's certificate is not verified; \
                 anyone on the path can read and change this traffic"
            );
            builder.with_custom_certificate_verifier(Arc::new(NoVerification(
                provider.signature_verification_algorithms,
            )))
        } else {
            let Some(ca) = &self.tls_ca else {
                bail!(
                    "tls:// needs --tls-ca FILE (the server's certificate or its CA, PEM) or \
                     --insecure"
                );
            };
            builder.with_custom_certificate_verifier(Arc::new(PinningVerifier::new(ca, &provider)?))
        };
        let mut config = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let chain = load_certs(cert)?;
                let key = load_key(key)?;
                builder.with_client_auth_cert(chain, key).with_context(|| {
                    format!("cannot use the client certificate {}", cert.display())
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        if resumption == Resumption::Disabled {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Arc::new(config))
    }
}

/// The crypto provider: ring, which builds with a C compiler alone (aws-lc-rs needs CMake
/// and, for some targets, NASM) and is what rustls's own examples and tests use.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The host part of a target as the user wrote it (`tls://localhost:4433` -> `localhost`,
/// `tls://[::1]:4433` -> `::1`; a bare port means 127.0.0.1).
pub fn host_of(target: &str) -> String {
    let text = target.trim();
    let text = text.split_once("://").map_or(text, |(_, rest)| rest);
    let text = text.strip_suffix('/').unwrap_or(text);
    if text.parse::<u16>().is_ok() {
        return "127.0.0.1".into();
    }
    let host = text.rsplit_once(':').map_or(text, |(host, _)| host);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// Reads every certificate of a PEM file (at least one).
pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{} holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, RSA or SEC1).
pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| anyhow!("cannot read a private key from {}: {e}", path.display()))
}

/// webpki's verification, plus pinned certificates: a presented certificate refused only
/// because it is a CA certificate is accepted when it is one of the trusted ones.
#[derive(Debug)]
struct PinningVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    trusted: Vec<CertificateDer<'static>>,
}

impl PinningVerifier {
    fn new(ca: &Path, provider: &Arc<CryptoProvider>) -> anyhow::Result<Self> {
        let trusted = load_certs(ca)?;
        let mut roots = RootCertStore::empty();
        for cert in &trusted {
            roots
                .add(cert.clone())
                .map_err(|e| anyhow!("{}: a certificate cannot be trusted: {e}", ca.display()))?;
        }
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
                .build()
                .map_err(|e| anyhow!("cannot trust the certificates of {}: {e}", ca.display()))?;
        Ok(PinningVerifier { webpki, trusted })
    }

    fn is_pinned(&self, cert: &CertificateDer<'_>) -> bool {
        self.trusted.iter().any(|t| t.as_ref() == cert.as_ref())
    }
}

/// Whether webpki refused a certificate only for being a CA's (it checks the validity period
/// first, so the certificate is current).
fn is_ca_used_as_end_entity(err: &rustls::Error) -> bool {
    match err {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => matches!(
            other.0.downcast_ref::<webpki::Error>(),
            Some(webpki::Error::CaUsedAsEndEntity)
        ),
        _ => false,
    }
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(e) if is_ca_used_as_end_entity(&e) && self.is_pinned(end_entity) => {
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            result => result,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `--insecure`: any certificate, but the handshake signature must match it.
#[derive(Debug)]
struct NoVerification(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Connects to `addr` and completes the TLS handshake, each within `timeout` if one is given.
pub fn connect(
    addr: SocketAddr,
    timeout: Option<Duration>,
    target: &TlsTarget,
) -> anyhow::Result<TlsStream> {
    let tcp = match timeout {
        Some(timeout) => TcpStream::connect_timeout(&addr, timeout),
        None => TcpStream::connect(addr),
    }
    .map_err(|e| anyhow!("cannot connect to {addr}: {e}"))?;
    tcp.set_nodelay(true)
        .map_err(|e| anyhow!("cannot configure the connection to {addr}: {e}"))?;
    handshake(tcp, addr, timeout, target)
}

/// Completes the client handshake on `tcp`; a refused certificate is one clear error.
pub fn handshake(
    mut tcp: TcpStream,
    addr: SocketAddr,
    timeout: Option<Duration>,
    target: &TlsTarget,
) -> anyhow::Result<TlsStream> {
    let mut session = ClientConnection::new(Arc::clone(&target.config), target.name.clone())
        .context("cannot start a TLS session")?;
    let set_timeouts = |tcp: &TcpStream, t| {
        tcp.set_read_timeout(t)
            .and_then(|()| tcp.set_write_timeout(t))
            .map_err(|e| anyhow!("cannot configure the connection to {addr}: {e}"))
    };
    set_timeouts(&tcp, timeout)?;
    while session.is_handshaking() {
        if let Err(e) = session.complete_io(&mut tcp) {
            return Err(handshake_error(addr, &target.name, &e));
        }
    }
    set_timeouts(&tcp, None)?;
    Ok(StreamOwned::new(session, tcp))
}

/// "TLS handshake with ADDR (NAME) failed: WHY", with a hint for the usual causes.
fn handshake_error(addr: SocketAddr, name: &ServerName<'_>, err: &io::Error) -> anyhow::Error {
    let name = name.to_str();
    let tls_error = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    if tls_error.is_some_and(is_ca_used_as_end_entity) {
        // webpki checks this before the issuer, whatever the trusted certificates are.
        return anyhow!(
            "TLS handshake with {addr} ({name}) failed: invalid peer certificate: a CA \
             certificate (CA:TRUE) that is not one of the --tls-ca certificates (one that is \
             would be accepted as pinned)"
        );
    }
    let hint = match tls_error {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
            " (give --tls-ca the server's certificate or the CA that signed it)"
        }
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        )) => " (the certificate is for another name: see --sni)",
        _ if err.kind() == io::ErrorKind::UnexpectedEof => {
            " (the server closed the connection: does it speak TLS there?)"
        }
        _ => "",
    };
    anyhow!("TLS handshake with {addr} ({name}) failed: {err}{hint}")
}

/// Sends close_notify and closes, without waiting for the server's (best effort: for a
/// connection being dropped, so the server does not log it as truncated).
pub fn close(mut stream: TlsStream) {
    stream.conn.send_close_notify();
    while stream.conn.wants_write() {
        if stream.conn.write_tls(&mut stream.sock).is_err() {
            break;
        }
    }
}

impl EchoStream for TlsStream {
    fn half_close(&mut self) -> io::Result<()> {
        self.conn.send_close_notify();
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock)?;
        }
        Ok(())
    }

    fn ack_now(&self) {
        let _ = socket2::SockRef::from(&self.sock).set_quickack(true);
    }
}

/// How long the split client waits for the end of input after the server closed first.
const INPUT_GRACE: Duration = Duration::from_secs(1);

/// The split client over TLS (see the module doc): sends `input` (read from `input_fd`) as it
/// comes, prints what comes back, sends close_notify at the end of input (or at a `q`/`Q`
/// line when `end_on_q`), and checks that every byte sent came back before the server closed.
pub fn split_client(
    stream: TlsStream,
    addr: SocketAddr,
    input_fd: BorrowedFd<'_>,
    mut input: impl BufRead,
    mut output: impl Write,
    end_on_q: bool,
) -> anyhow::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let StreamOwned {
        conn: mut session,
        sock: mut tcp,
    } = stream;
    tcp.set_nonblocking(true)
        .map_err(|e| anyhow!("cannot configure the connection to {addr}: {e}"))?;
    let mut buf = vec![0u8; MAX_IN_FLIGHT];
    let (mut sent, mut received) = (0u64, 0u64);
    let mut input_open = true;
    // Input already read into `input`'s buffer, which polling the descriptor would not show.
    let mut input_buffered = false;
    let mut at_line_start = true;
    let clean_close = loop {
        // Whatever rustls could not hand over yet waits for POLLOUT, and input waits for it.
        flush_tls(&mut session, &mut tcp).map_err(|e| anyhow!("cannot send to {addr}: {e}"))?;
        let want_input = input_open && !session.wants_write();
        let mut socket_events = PollFlags::POLLIN;
        if session.wants_write() {
            socket_events |= PollFlags::POLLOUT;
        }
        let mut fds = vec![PollFd::new(tcp.as_fd(), socket_events)];
        if want_input && !input_buffered {
            fds.push(PollFd::new(input_fd, PollFlags::POLLIN));
        }
        let timeout = if want_input && input_buffered {
            PollTimeout::ZERO
        } else {
            PollTimeout::NONE
        };
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("cannot wait for input or the connection: {e}"),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        let socket_ready = ready(&fds[0]);
        let input_ready = want_input && (input_buffered || fds.get(1).is_some_and(ready));
        drop(fds);

        if socket_ready {
            if let Some(clean) = receive(
                &mut session,
                &mut tcp,
                addr,
                &mut output,
                &mut buf,
                &mut received,
            )? {
                break clean;
            }
        }
        if input_ready {
            let available = fill(&mut input)?;
            if available.is_empty() {
                input_open = false;
                session.send_close_notify();
                continue;
            }
            let piece = if end_on_q {
                let line_end = available.iter().position(|&b| b == b'\n');
                &available[..line_end.map_or(available.len(), |i| i + 1)]
            } else {
                available
            };
            if end_on_q && at_line_start && is_quit(piece) {
                input_open = false;
                session.send_close_notify();
                continue;
            }
            let n = session
                .writer()
                .write(piece)
                .map_err(|e| anyhow!("cannot send to {addr}: {e}"))?;
            if n > 0 {
                at_line_start = piece[..n].ends_with(b"\n");
            }
            input_buffered = n < available.len();
            input.consume(n);
            sent += n as u64;
        }
    };

    if input_open {
        // The server closed first. A server that closes once it has echoed the last line
        // can beat us to reading the end of input, so give the input a moment to end.
        let mut fds = [PollFd::new(input_fd, PollFlags::POLLIN)];
        let grace = PollTimeout::try_from(INPUT_GRACE).unwrap_or(PollTimeout::MAX);
        let ended = !input_buffered
            && matches!(poll(&mut fds, grace), Ok(n) if n > 0)
            && fill(&mut input)?.is_empty();
        if !ended {
            bail!("{addr} closed the connection before the input ended");
        }
    }
    if received < sent {
        let truncated = if clean_close {
            ""
        } else {
            " (without close_notify)"
        };
        bail!(
            "{addr} closed the connection{truncated} with {} of the {sent} bytes sent not echoed",
            sent - received
        );
    }
    if !clean_close {
        eprintln!("multiecho: warning: {addr} closed the connection without close_notify");
    }
    Ok(())
}

/// Writes what rustls has for the socket: true when all of it went, false when it is full.
fn flush_tls(session: &mut ClientConnection, tcp: &mut TcpStream) -> io::Result<bool> {
    while session.wants_write() {
        match session.write_tls(tcp) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads what the (non-blocking) socket has, prints the plaintext; `Some(clean)` once the
/// server closed (clean: with close_notify).
fn receive(
    session: &mut ClientConnection,
    tcp: &mut TcpStream,
    addr: SocketAddr,
    output: &mut impl Write,
    buf: &mut [u8],
    received: &mut u64,
) -> anyhow::Result<Option<bool>> {
    loop {
        let eof = match session.read_tls(tcp) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => bail!("cannot receive from {addr}: {e}"),
        };
        if let Err(e) = session.process_new_packets() {
            // Tell the server why (the alert), then give up.
            let _ = flush_tls(session, tcp);
            bail!("TLS error on the connection to {addr}: {e}");
        }
        loop {
            match session.reader().read(buf) {
                Ok(0) => return Ok(Some(true)),
                Ok(n) => {
                    output.write_all(&buf[..n])?;
                    *received += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Some(false)),
                Err(e) => bail!("cannot receive from {addr}: {e}"),
            }
        }
        output.flush()?;
        if eof {
            return Ok(Some(false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_targets() {
        assert_eq!(host_of("tls://localhost:4433"), "localhost");
        assert_eq!(host_of("tls://127.0.0.1:4433/"), "127.0.0.1");
        assert_eq!(host_of("tls://[::1]:4433"), "::1");
        assert_eq!(host_of("4433"), "127.0.0.1");
        assert_eq!(host_of("example.com:443"), "example.com");
    }

    #[test]
    fn a_tls_target_needs_a_ca_or_insecure() {
        let err = TlsClientOptions::default()
            .config(Resumption::Allowed)
            .unwrap_err();
        assert!(err.to_string().contains("--tls-ca FILE"), "{err}");
    }
}
