//! The async model's TLS connections (`tls://`, `tls+proxy://`), with tokio-rustls.
//!
//! How: the connection task takes a permit of the server's handshake cap (while the cap is
//! full it looks again every few milliseconds: the runtimes are one per worker, and a
//! descriptor registered with one of them would tie every waiter to it), runs tokio-rustls's `accept` within the
//! handshake timeout, gives the permit back, then echoes: read a chunk of plaintext, write it
//! back and flush before the next read (backpressure, as for plain echo). The client's
//! close_notify is the half-close: tokio-rustls's `shutdown` then sends ours and shuts TCP's
//! write side. A TCP end of stream without close_notify is an `UnexpectedEof` from rustls,
//! logged as truncated. Bytes that arrived with a PROXY header are read first ([`Rewind`]).
//!
//! Cost: unlike plain echo, which borrows the worker thread's buffer, a TLS connection owns a
//! 16 KiB buffer (a record's worth of plaintext) besides rustls's state and buffers, as a
//! tokio-rustls server written the usual way does; an idle TLS connection costs that much more.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::{CloseRecord, IdleTimer, TaskContext};
use crate::server::conn::limit::Permit;
use crate::server::conn::{Admitted, End, Lifecycle};
use crate::tls::{HandshakeCap, HandshakeError, HandshakePermit, TlsServer};

/// The plaintext buffer of a TLS connection: the largest record's payload.
const TLS_BUFFER_SIZE: usize = 16 * 1024;

/// How often a task waiting for a handshake slot looks again while the cap is full. Only a
/// flood pays for it: the cap is far above what the cores compute at once.
const CAP_RECHECK: Duration = Duration::from_millis(10);

/// What the async model needs for TLS: the server's configuration and its acceptor.
pub(super) struct AsyncTls {
    server: Arc<TlsServer>,
    acceptor: TlsAcceptor,
}

impl AsyncTls {
    pub(super) fn new(server: Arc<TlsServer>) -> AsyncTls {
        AsyncTls {
            acceptor: TlsAcceptor::from(Arc::clone(server.config())),
            server,
        }
    }
}

/// Serves one admitted TLS connection to its end, logs its line, then frees its permit.
pub(super) async fn serve(
    stream: TcpStream,
    admitted: Admitted,
    early: Vec<u8>,
    _permit: Permit,
    shared: Arc<TaskContext>,
) {
    let Some(tls) = &shared.tls else {
        let end = End::Failed(io::Error::other("no TLS configuration"));
        shared.lifecycle.close(admitted, 0, &end);
        return;
    };
    let peer = admitted.peer;
    let mut record = CloseRecord::new(&shared.lifecycle, admitted);
    let ended = async {
        let mut stream = handshake(stream, early, tls)
            .await
            .map_err(End::Handshake)?;
        shared.lifecycle.handshake_completed(peer);
        echo(
            &mut stream,
            &mut record.echoed,
            shared.config.idle_timeout,
            &shared.lifecycle,
        )
        .await
    }
    .await;
    record.close(ended);
}

/// The handshake, under the cap and within the handshake timeout.
async fn handshake(
    stream: TcpStream,
    early: Vec<u8>,
    tls: &AsyncTls,
) -> Result<TlsStream<Rewind>, HandshakeError> {
    let timeout = tls.server.handshake_timeout();
    let deadline = tokio::time::Instant::now() + timeout;
    let cap = tls.server.handshakes();
    let Ok(permit) = tokio::time::timeout_at(deadline, acquire(cap)).await else {
        return Err(HandshakeError::timeout(format!(
            "waited {timeout:?} for one of the {} handshake slots (--tls-max-handshakes)",
            cap.max()
        )));
    };
    let accepted = tokio::time::timeout_at(
        deadline,
        tls.acceptor.accept(Rewind {
            early,
            inner: stream,
        }),
    )
    .await;
    drop(permit);
    match accepted {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(HandshakeError::from_io(&e)),
        Err(_elapsed) => Err(HandshakeError::timeout(format!("{timeout:?} passed"))),
    }
}

/// A handshake permit, looking again every [`CAP_RECHECK`] while the cap is full.
async fn acquire(cap: &Arc<HandshakeCap>) -> HandshakePermit {
    loop {
        if let Some(permit) = cap.try_acquire() {
            return permit;
        }
        tokio::time::sleep(CAP_RECHECK).await;
    }
}

/// Echoes plaintext until the client's close_notify (then sends ours), an error, truncation
/// or the idle timeout; counts echoed bytes in `echoed` as they go.
async fn echo(
    stream: &mut TlsStream<Rewind>,
    echoed: &mut u64,
    idle: Option<Duration>,
    lifecycle: &Lifecycle,
) -> Result<(), End> {
    let mut timer = IdleTimer::new(idle);
    let mut buf = vec![0u8; TLS_BUFFER_SIZE];
    loop {
        let read = tokio::select! {
            biased;
            read = stream.read(&mut buf) => read,
            () = timer.expired() => return Err(End::IdleTimeout),
        };
        timer.restart();
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(End::Truncated),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(End::Failed(e)),
        };
        let written = tokio::select! {
            biased;
            written = async {
                stream.write_all(&buf[..n]).await?;
                stream.flush().await
            } => written,
            () = timer.expired() => return Err(End::IdleTimeout),
        };
        written.map_err(End::Failed)?;
        timer.restart();
        *echoed += n as u64;
        // Plaintext bytes, counted as they flow like plain echo's.
        lifecycle.echoed(n);
    }
    // The client's close_notify, everything before it echoed: ours, then TCP's write side.
    let _ = stream.shutdown().await;
    Ok(())
}

/// A TCP stream that first yields bytes already read from it (what followed a PROXY header).
pub(super) struct Rewind {
    early: Vec<u8>,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early[..n]);
            this.early.drain(..n);
            if this.early.is_empty() {
                this.early = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
