//! TLS with rustls: what every model shares, whatever drives its I/O.
//!
//! - [`client`]: the client side, the configuration that `client`, `bench` and `compare`
//!   build from their flags (`--tls-ca`, `--insecure`, `--sni`, client certificates).
//! - [`server`]: the server's side set up once at start: certificates (`--tls-cert`/`--tls-key`
//!   or a self-signed one), client verification (`--tls-client-ca`), the rustls
//!   `ServerConfig`, the handshake timeout and the cap on handshakes in progress.
//! - [`HandshakeError`] here: why a handshake failed, as one short reason (a counter label and
//!   the close line's text) every model reports the same way.
//!
//! The crypto provider is *ring*: it builds with a C compiler alone (aws-lc-rs needs cmake and
//! more), and it is what the tokio-rustls server we measure against uses, so the comparison
//! measures the models rather than two cryptographic libraries.
//!
//! How each model drives rustls: the blocking models through `server/echo.rs` (rustls's
//! connection with blocking reads and writes), async through tokio-rustls
//! (`server/tokio_rt.rs`), epoll and uring through [`session`], a sans-I/O echo session over
//! rustls's buffer API that their event loops feed (uring's through `uring/tls_connection.rs`).

pub mod client;
pub mod server;
pub mod session;
mod validity;

use std::fmt;
use std::io;

pub use server::{HandshakeCap, HandshakePermit, TlsOptions, TlsServer};

/// Why a TLS handshake failed, as a counter label (`/metrics`) and a short phrase (logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// No handshake within `--tls-handshake-timeout` (waiting for a handshake slot included).
    Timeout,
    /// The client closed (or reset) the connection before the handshake finished.
    ClientClosed,
    /// The first bytes are not a TLS record: plaintext (or garbage) sent to a TLS port.
    NotTls,
    /// The client refused our certificate (it sent an alert such as `unknown_ca` or
    /// `bad_certificate`): a self-signed certificate it was not told to trust, a wrong name.
    CertificateRejected,
    /// Mutual TLS: the client presented no certificate.
    NoClientCertificate,
    /// Mutual TLS: the client's certificate is not issued by a `--tls-client-ca` authority.
    UnknownCa,
    /// Mutual TLS: the client's certificate is invalid otherwise (expired, wrong usage, bad
    /// signature...).
    BadClientCertificate,
    /// Nothing in common: TLS version, cipher suite, key exchange group or signature scheme.
    NoSharedCipher,
    /// The client sent another fatal alert.
    Alert,
    /// Any other protocol violation.
    Protocol,
    /// A socket error during the handshake.
    Io,
}

impl HandshakeFailure {
    /// Every reason, in counter order.
    pub const ALL: [HandshakeFailure; 11] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::ClientClosed,
        HandshakeFailure::NotTls,
        HandshakeFailure::CertificateRejected,
        HandshakeFailure::NoClientCertificate,
        HandshakeFailure::UnknownCa,
        HandshakeFailure::BadClientCertificate,
        HandshakeFailure::NoSharedCipher,
        HandshakeFailure::Alert,
        HandshakeFailure::Protocol,
        HandshakeFailure::Io,
    ];

    /// The counter label.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::ClientClosed => "client_closed",
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::CertificateRejected => "certificate_rejected",
            HandshakeFailure::NoClientCertificate => "no_client_certificate",
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::BadClientCertificate => "bad_client_certificate",
            HandshakeFailure::NoSharedCipher => "no_shared_cipher",
            HandshakeFailure::Alert => "alert",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Io => "io",
        }
    }

    /// A short phrase for people.
    pub fn describe(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "no handshake within the timeout",
            HandshakeFailure::ClientClosed => "the client closed during the handshake",
            HandshakeFailure::NotTls => "not TLS (plaintext to a TLS port?)",
            HandshakeFailure::CertificateRejected => "the client rejected our certificate",
            HandshakeFailure::NoClientCertificate => "the client sent no certificate",
            HandshakeFailure::UnknownCa => "the client certificate is from an unknown CA",
            HandshakeFailure::BadClientCertificate => "the client certificate is invalid",
            HandshakeFailure::NoSharedCipher => {
                "no shared TLS version, cipher suite, group or signature scheme"
            }
            HandshakeFailure::Alert => "the client sent an alert",
            HandshakeFailure::Protocol => "TLS protocol error",
            HandshakeFailure::Io => "socket error",
        }
    }

    /// Its index in [`HandshakeFailure::ALL`].
    pub fn index(self) -> usize {
        HandshakeFailure::ALL
            .iter()
            .position(|r| *r == self)
            .expect("every reason is in ALL")
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A failed handshake: the reason, and what rustls or the socket said.
#[derive(Debug)]
pub struct HandshakeError {
    pub reason: HandshakeFailure,
    pub detail: String,
}

impl HandshakeError {
    /// A failure with this reason and detail.
    pub fn new(reason: HandshakeFailure, detail: impl Into<String>) -> Self {
        HandshakeError {
            reason,
            detail: detail.into(),
        }
    }

    /// The handshake timed out; `detail` says while doing what.
    pub fn timeout(detail: impl Into<String>) -> Self {
        HandshakeError::new(HandshakeFailure::Timeout, detail)
    }

    /// The client closed the connection mid-handshake.
    pub fn client_closed() -> Self {
        HandshakeError::new(HandshakeFailure::ClientClosed, "end of stream")
    }

    /// Classifies what rustls reported.
    pub fn from_tls(error: &rustls::Error) -> Self {
        use rustls::{AlertDescription as A, CertificateError, Error as E};
        let reason = match error {
            E::InvalidMessage(_) => HandshakeFailure::NotTls,
            E::NoCertificatesPresented => HandshakeFailure::NoClientCertificate,
            E::InvalidCertificate(CertificateError::UnknownIssuer) => HandshakeFailure::UnknownCa,
            E::InvalidCertificate(_) => HandshakeFailure::BadClientCertificate,
            E::PeerIncompatible(_) => HandshakeFailure::NoSharedCipher,
            E::AlertReceived(
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::UnsupportedCertificate
                | A::AccessDenied,
            ) => HandshakeFailure::CertificateRejected,
            E::AlertReceived(
                A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity,
            ) => HandshakeFailure::NoSharedCipher,
            E::AlertReceived(_) => HandshakeFailure::Alert,
            _ => HandshakeFailure::Protocol,
        };
        HandshakeError::new(reason, error.to_string())
    }

    /// Classifies a socket error during the handshake (for a driver that sees rustls errors
    /// wrapped in `io::Error`, as tokio-rustls reports them, those are unwrapped first).
    pub fn from_io(error: &io::Error) -> Self {
        if let Some(tls) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return HandshakeError::from_tls(tls);
        }
        match error.kind() {
            io::ErrorKind::UnexpectedEof => HandshakeError::client_closed(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                HandshakeError::timeout("the client went quiet")
            }
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                HandshakeError::new(HandshakeFailure::ClientClosed, error.to_string())
            }
            _ => HandshakeError::new(HandshakeFailure::Io, error.to_string()),
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS handshake failed: {} ({})", self.reason, self.detail)
    }
}

impl std::error::Error for HandshakeError {}

/// The SHA-256 fingerprint of a DER certificate as OpenSSL prints it
/// (`openssl x509 -noout -fingerprint -sha256`): upper-case hex pairs joined by colons.
pub fn sha256_fingerprint(der: &[u8]) -> String {
    // rustls's own SHA-256 (ring's), reached through a cipher suite's hash: no other crate.
    let hash = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("a TLS 1.3 suite")
        .common
        .hash_provider
        .hash(der);
    hash.as_ref()
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_have_distinct_labels_and_indexes() {
        let labels: std::collections::HashSet<_> =
            HandshakeFailure::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), HandshakeFailure::ALL.len());
        for (i, reason) in HandshakeFailure::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
    }

    #[test]
    fn rustls_errors_are_classified() {
        use rustls::{AlertDescription, CertificateError, Error, PeerIncompatible};
        let reason = |e: Error| HandshakeError::from_tls(&e).reason;
        assert_eq!(
            reason(Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            )),
            HandshakeFailure::NotTls
        );
        assert_eq!(
            reason(Error::AlertReceived(AlertDescription::UnknownCA)),
            HandshakeFailure::CertificateRejected
        );
        assert_eq!(
            reason(Error::InvalidCertificate(CertificateError::UnknownIssuer)),
            HandshakeFailure::UnknownCa
        );
        assert_eq!(
            reason(Error::NoCertificatesPresented),
            HandshakeFailure::NoClientCertificate
        );
        assert_eq!(
            reason(Error::PeerIncompatible(
                PeerIncompatible::NoCipherSuitesInCommon
            )),
            HandshakeFailure::NoSharedCipher
        );
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            Error::InvalidCertificate(CertificateError::Expired),
        );
        assert_eq!(
            HandshakeError::from_io(&wrapped).reason,
            HandshakeFailure::BadClientCertificate
        );
        assert_eq!(
            HandshakeError::from_io(&io::ErrorKind::UnexpectedEof.into()).reason,
            HandshakeFailure::ClientClosed
        );
    }

    #[test]
    fn fingerprints_look_like_openssl_s() {
        let print = sha256_fingerprint(b"");
        // SHA-256 of nothing.
        assert!(print.starts_with("E3:B0:C4:42:98:FC:1C:14"), "{print}");
        assert_eq!(print.len(), 32 * 3 - 1);
    }
}
