//! Reading `serve --metrics` from tests: one HTTP GET, the samples summed by metric name, and
//! polling until the counters show what a test waits for.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::PATIENCE;

/// One HTTP/1.0 GET (the server closes after answering): the status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

/// Sample values by metric name, summed over their label sets.
pub fn totals(text: &str) -> HashMap<String, f64> {
    let mut totals = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let name = series.split('{').next().unwrap().to_string();
        *totals.entry(name).or_insert(0.0) += value.parse::<f64>().expect("a number");
    }
    totals
}

/// Polls `/metrics` until `done` holds for its totals (the server counts a byte or a datagram
/// just after the kernel took it, so a peer can see it a moment before the counters do);
/// returns that exposition. Fails after [`PATIENCE`] with `what` and the last one.
pub fn scrape_until(
    metrics: SocketAddr,
    what: &str,
    done: impl Fn(&HashMap<String, f64>) -> bool,
) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, text) = get(metrics, "/metrics");
        assert_eq!(status, 200, "{text}");
        if done(&totals(&text)) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}: never showed in\n{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
