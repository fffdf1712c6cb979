//! What only the `async` model (tokio tasks) is tested for; tests/models.rs holds what it
//! shares with every model (exact echo, many clients, half-close, resets, shutdown,
//! `--max-conns`, `--idle-timeout`, admission, close lines) and tests/in_process.rs its
//! counters.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{assert_same, connect, ServerBuilder};
use multiecho::payload;

const MODEL: &str = "async";

/// Sends `message` and reads exactly its echo back.
fn echo_once(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut echoed = vec![0; message.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert_same(&echoed, message, "echo");
}

/// A task reads into its worker thread's buffer and stops reading while its echo is stuck, so
/// a client that never reads costs a bounded amount of memory, not what it sends.
#[test]
fn a_client_that_never_reads_is_not_buffered_without_bound() {
    let server = ServerBuilder::new(MODEL).args(&["--workers", "1"]).start();
    let rss_before = common::rss_kib(server.pid());
    let mut hog = connect(server.addr);
    hog.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // Send until the server stops reading (its echo is stuck, so it must stop taking more).
    let chunk = payload::bytes(5, 256 * 1024);
    let mut sent = 0usize;
    loop {
        match hog.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("never-reading client: {e}"),
        }
        assert!(
            sent < 256 << 20,
            "the server kept reading 256 MiB it cannot echo"
        );
    }
    let grown = common::rss_kib(server.pid()).saturating_sub(rss_before);
    assert!(
        grown < 8 * 1024,
        "the server grew by {grown} KiB holding a stuck echo ({sent} bytes sent)"
    );
    // Others are served meanwhile.
    let mut other = connect(server.addr);
    echo_once(&mut other, b"not blocked by the hog");
    drop((hog, other));
    assert!(server.stop().success());
}
