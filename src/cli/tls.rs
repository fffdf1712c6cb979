//! The TLS flags of `client` and `bench`, turned into [`TlsClientOptions`].

use std::path::PathBuf;

use clap::Args;

use crate::tls::client::TlsClientOptions;

/// The TLS flags of `client`, `bench` (and the certificate flags `compare` passes on).
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "TLS (tls:// targets)")]
pub struct TlsClientArgs {
    /// Trust these certificates (PEM): the CA that signed the server's certificate, or the
    /// server's certificate itself. A server certificate that is one of these is accepted
    /// even when marked CA:TRUE (as `openssl req -x509` makes it), so `serve --tls-cert
    /// cert.pem` then `client --tls-ca cert.pem` just works; its host name is still checked.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub tls_ca: Option<PathBuf>,
    /// Do not verify the server's certificate (a warning says so on stderr). Anyone on the
    /// path can then read and change the traffic: for tests only.
    #[arg(long)]
    pub insecure: bool,
    /// The server name to send (SNI) and to verify the certificate against (default: the
    /// host of the target, a name or an IP address).
    #[arg(long, value_name = "NAME")]
    pub sni: Option<String>,
    /// A client certificate (PEM, a chain is allowed), for servers that require one (mutual
    /// TLS). Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, RSA or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsClientArgs {
    /// The options these flags describe.
    pub fn options(&self) -> TlsClientOptions {
        TlsClientOptions {
            tls_ca: self.tls_ca.clone(),
            insecure: self.insecure,
            sni: self.sni.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
        }
    }
}
