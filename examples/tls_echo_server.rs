//! The baseline of the TLS benchmarks: a minimal tokio-rustls echo server written the way its
//! users write it (tokio-rustls's own `examples/server.rs`: accept, spawn a task, handshake,
//! split, `tokio::io::copy`), nothing tuned. `scripts/tls-bench.sh` and `tests/tls_client.rs`
//! run it.
//!
//! ```text
//! cargo run --release --example tls_echo_server -- 127.0.0.1:4433 cert.pem key.pem
//! ```
//!
//! Prints `listening on ADDR` once it accepts (port 0 picks a free port), then serves until
//! killed. At the client's close_notify the copy ends, the rest has been echoed, and
//! `shutdown` sends the server's close_notify.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{copy, split, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(cert), Some(key)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: tls_echo_server ADDR CERT.pem KEY.pem");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse()?;
    let certs = CertificateDer::pem_file_iter(&cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&key)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let listener = TcpListener::bind(addr).await?;
    println!("listening on {}", listener.local_addr()?);

    loop {
        let (stream, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let echo = async move {
                stream.set_nodelay(true)?;
                let stream = acceptor.accept(stream).await?;
                let (mut reader, mut writer) = split(stream);
                copy(&mut reader, &mut writer).await?;
                writer.shutdown().await?;
                Ok::<(), std::io::Error>(())
            };
            if let Err(e) = echo.await {
                eprintln!("{peer}: {e}");
            }
        });
    }
}
