//! Tests of the PROXY header parser: hand-built headers of every kind (the bytes written out
//! here, not produced by the crate under test), faults, the streaming and blocking drivers, and
//! property tests that random, mutated and split input never panics and parses consistently.

use super::*;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::thread;

use proptest::prelude::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A v2 header: signature, version 2 with `command` (0 LOCAL, 1 PROXY), `family`, length, then
/// the address block and the TLVs.
fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x20 | command);
    out.push(family);
    let len = u16::try_from(addresses.len() + tlvs.len()).unwrap();
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(addresses);
    out.extend_from_slice(tlvs);
    out
}

fn v4_block(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (source, destination) else {
        panic!("v4_block takes IPv4 addresses");
    };
    let mut out = Vec::new();
    out.extend_from_slice(&s.ip().octets());
    out.extend_from_slice(&d.ip().octets());
    out.extend_from_slice(&s.port().to_be_bytes());
    out.extend_from_slice(&d.port().to_be_bytes());
    out
}

fn v6_block(source: Ipv6Addr, sport: u16, destination: Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&source.octets());
    out.extend_from_slice(&destination.octets());
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// TLVs of the kinds HAProxy sends: ALPN, authority (SNI), unique id, an SSL block with a
/// version sub-TLV, and a NOOP padding TLV.
fn haproxy_tlvs() -> Vec<u8> {
    let mut ssl = vec![0x01, 0, 0, 0, 0];
    ssl.extend(tlv(0x21, b"TLSv1.3"));
    [
        tlv(0x01, b"h2"),
        tlv(0x02, b"echo.example"),
        tlv(0x05, b"4f2a-unique-id"),
        tlv(0x20, &ssl),
        tlv(0x04, &[0; 5]),
    ]
    .concat()
}

fn parsed(buf: &[u8]) -> (ProxyHeader, usize) {
    match parse(buf) {
        Ok(Some(got)) => got,
        other => panic!(
            "expected a header from {:?}, got {other:?}",
            buf.escape_ascii()
        ),
    }
}

fn proxied(version: u8, source: &str, destination: &str) -> ProxyHeader {
    ProxyHeader {
        source: Some(addr(source)),
        destination: Some(addr(destination)),
        version,
        local: false,
    }
}

#[test]
fn v1_tcp4() {
    let line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 4001\r\n";
    assert_eq!(
        parsed(line),
        (
            proxied(1, "192.0.2.7:56324", "198.51.100.1:4001"),
            line.len()
        )
    );
}

#[test]
fn v1_tcp6() {
    let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 4001\r\n";
    assert_eq!(
        parsed(line),
        (
            proxied(1, "[2001:db8::7]:56324", "[2001:db8::1]:4001"),
            line.len()
        )
    );
}

#[test]
fn v1_longest_tcp6_line_fits() {
    let max = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    let line = format!("PROXY TCP6 {max} {max} 65535 65535\r\n");
    let (header, consumed) = parsed(line.as_bytes());
    assert_eq!(consumed, line.len());
    assert_eq!(header.source.unwrap().port(), 65535);
}

#[test]
fn v1_unknown_is_served_as_from_the_proxy() {
    let unknown = ProxyHeader {
        source: None,
        destination: None,
        version: 1,
        local: false,
    };
    assert_eq!(parsed(b"PROXY UNKNOWN\r\n"), (unknown, 15));
    // The spec lets a sender put anything between UNKNOWN and CRLF.
    let line = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
    assert_eq!(parsed(line), (unknown, line.len()));
    let proxy = addr("127.0.0.1:40000");
    assert_eq!(unknown.peer_or(proxy), proxy);
}

#[test]
fn v1_at_the_107_byte_limit_and_beyond() {
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(V1_MAX_LEN - 2, b'x');
    line.extend_from_slice(b"\r\n");
    assert_eq!(parsed(&line).1, V1_MAX_LEN);

    let mut long = b"PROXY UNKNOWN ".to_vec();
    long.resize(V1_MAX_LEN + 10, b'x');
    assert!(matches!(
        parse(&long),
        Err(HeaderError::Oversized { version: 1, .. })
    ));
    // One byte short of the limit without a line end is still only incomplete.
    assert!(matches!(parse(&long[..V1_MAX_LEN - 1]), Ok(None)));
    assert!(matches!(
        parse(&long[..V1_MAX_LEN]),
        Err(HeaderError::Oversized { version: 1, .. })
    ));
}

#[test]
fn v1_malformed_lines() {
    for line in [
        &b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"[..],
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
        b"PROXY TCP4 2001:db8::1 2001:db8::2 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n",
    ] {
        let got = parse(line);
        assert!(
            matches!(got, Err(HeaderError::Malformed { version: 1, .. })),
            "{:?}: {got:?}",
            line.escape_ascii()
        );
    }
}

#[test]
fn v2_proxy_ipv4_with_haproxy_tlvs() {
    let source = addr("192.0.2.7:56324");
    let destination = addr("198.51.100.1:4001");
    let header = v2(0x1, 0x11, &v4_block(source, destination), &haproxy_tlvs());
    let mut buf = header.clone();
    buf.extend_from_slice(b"first bytes");
    assert_eq!(
        parsed(&buf),
        (
            proxied(2, "192.0.2.7:56324", "198.51.100.1:4001"),
            header.len()
        )
    );
}

#[test]
fn v2_proxy_ipv6() {
    let source: Ipv6Addr = "2001:db8::7".parse().unwrap();
    let destination: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let header = v2(0x1, 0x21, &v6_block(source, 56324, destination, 4001), &[]);
    assert_eq!(
        parsed(&header),
        (
            proxied(2, "[2001:db8::7]:56324", "[2001:db8::1]:4001"),
            header.len()
        )
    );
}

#[test]
fn v2_local_with_tlvs_is_served_as_from_the_proxy() {
    let local = ProxyHeader {
        source: None,
        destination: None,
        version: 2,
        local: true,
    };
    // HAProxy's health checks send LOCAL with an unspecified family and no addresses.
    let bare = v2(0x0, 0x00, &[], &[]);
    assert_eq!(parsed(&bare), (local, 16));
    // A LOCAL header may still carry addresses and TLVs: they are ignored.
    let block = v4_block(addr("10.0.0.1:1"), addr("10.0.0.2:2"));
    let with_tlvs = v2(0x0, 0x11, &block, &haproxy_tlvs());
    assert_eq!(parsed(&with_tlvs), (local, with_tlvs.len()));
}

#[test]
fn v2_proxy_with_unspecified_or_unix_addresses_names_no_source() {
    let unspecified = v2(0x1, 0x00, &[], &tlv(0x04, &[0; 3]));
    let (header, _) = parsed(&unspecified);
    assert_eq!((header.source, header.local), (None, false));
    let unix = v2(0x1, 0x31, &[0; 216], &[]);
    let (header, consumed) = parsed(&unix);
    assert_eq!((header.source, consumed), (None, 16 + 216));
}

#[test]
fn ipv4_mapped_sources_become_ipv4() {
    let line = b"PROXY TCP6 ::ffff:127.0.0.5 ::ffff:127.0.0.1 40001 4001\r\n";
    let (header, _) = parsed(line);
    assert_eq!(header.source, Some(addr("127.0.0.5:40001")));
    assert_eq!(header.destination, Some(addr("127.0.0.1:4001")));

    let mapped = Ipv4Addr::new(127, 0, 0, 6).to_ipv6_mapped();
    let buf = v2(0x1, 0x21, &v6_block(mapped, 40002, mapped, 4001), &[]);
    let (header, _) = parsed(&buf);
    assert_eq!(
        header.source.unwrap().ip(),
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))
    );
}

#[test]
fn v2_faults() {
    let block = v4_block(addr("10.0.0.1:1"), addr("10.0.0.2:2"));
    type Expected = fn(&HeaderError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Expected)> = vec![
        (
            "version 1 in a v2 signature",
            {
                let mut b = v2(0x1, 0x11, &block, &[]);
                b[12] = 0x11;
                b
            },
            |e| matches!(e, HeaderError::Unsupported(_)),
        ),
        (
            "command 2",
            {
                let mut b = v2(0x1, 0x11, &block, &[]);
                b[12] = 0x22;
                b
            },
            |e| matches!(e, HeaderError::Unsupported(_)),
        ),
        ("UDP over IPv4", v2(0x1, 0x12, &block, &[]), |e| {
            matches!(e, HeaderError::Unsupported(_))
        }),
        ("family 4", v2(0x1, 0x41, &block, &[]), |e| {
            matches!(e, HeaderError::Malformed { version: 2, .. })
        }),
        (
            "IPv4 block too short",
            v2(0x1, 0x11, &block[..8], &[]),
            |e| matches!(e, HeaderError::Malformed { version: 2, .. }),
        ),
        (
            "TLV overrunning the header",
            v2(0x1, 0x11, &block, &[0x05, 0x00, 0x09, b'x']),
            |e| matches!(e, HeaderError::Malformed { version: 2, .. }),
        ),
        (
            "authority that is not UTF-8",
            v2(0x1, 0x11, &block, &tlv(0x02, &[0xff, 0xfe])),
            |e| matches!(e, HeaderError::Malformed { version: 2, .. }),
        ),
    ];
    for (what, buf, expected) in cases {
        match parse(&buf) {
            Err(e) if expected(&e) => {}
            other => panic!("{what}: got {other:?}"),
        }
    }
}

#[test]
fn oversized_v2_is_refused_on_its_fixed_bytes() {
    let mut fixed = V2_SIGNATURE.to_vec();
    fixed.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    assert!(matches!(
        parse(&fixed),
        Err(HeaderError::Oversized {
            version: 2,
            len: 65551
        })
    ));
    let block = v4_block(addr("10.0.0.1:1"), addr("10.0.0.2:2"));
    let room = MAX_HEADER_LEN - 16 - block.len() - 3;
    let at_cap = v2(0x1, 0x11, &block, &tlv(0xe0, &vec![7; room]));
    assert_eq!(at_cap.len(), MAX_HEADER_LEN);
    assert_eq!(parsed(&at_cap).1, MAX_HEADER_LEN);
    let over = v2(0x1, 0x11, &block, &tlv(0xe0, &vec![7; room + 1]));
    assert!(matches!(
        parse(&over[..16]),
        Err(HeaderError::Oversized { version: 2, .. })
    ));
}

#[test]
fn garbage_fails_on_the_first_byte_that_cannot_start_a_signature() {
    let mut reader = HeaderReader::new();
    let err = reader.feed(b"G").unwrap_err();
    assert!(matches!(err, HeaderError::NotProxy(_)), "{err:?}");

    let mut reader = HeaderReader::new();
    assert!(matches!(reader.feed(b"PR"), Ok(None)));
    assert!(matches!(reader.feed(b"X"), Err(HeaderError::NotProxy(_))));

    // A TLS ClientHello, a common mistake when a proxy is not configured.
    assert!(matches!(
        parse(&[0x16, 0x03, 0x01, 0x02, 0x00]),
        Err(HeaderError::NotProxy(_))
    ));
    // The v2 signature broken at its sixth byte.
    assert!(matches!(
        parse(b"\r\n\r\n\0X"),
        Err(HeaderError::NotProxy(_))
    ));
    // "PROXY" must be followed by a space.
    assert!(matches!(
        parse(b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
        Err(HeaderError::NotProxy(_))
    ));
    let line = HeaderError::NotProxy(Prefix::of(b"GET / HTTP/1.1\r\n")).to_string();
    assert_eq!(
        line,
        "no PROXY header: the connection began with \"GET / HT\""
    );
}

#[test]
fn fed_one_byte_at_a_time_with_leftover_preserved() {
    let v2_header = v2(
        0x1,
        0x11,
        &v4_block(addr("127.0.0.9:40009"), addr("127.0.0.1:4001")),
        &haproxy_tlvs(),
    );
    for header in [
        b"PROXY TCP4 127.0.0.9 127.0.0.1 40009 4001\r\n".to_vec(),
        v2_header,
    ] {
        let mut reader = HeaderReader::new();
        for (i, byte) in header[..header.len() - 1].iter().enumerate() {
            assert!(
                matches!(reader.feed(std::slice::from_ref(byte)), Ok(None)),
                "byte {i}"
            );
            assert_eq!(reader.buffered(), i + 1);
        }
        let mut last = vec![*header.last().unwrap()];
        last.extend_from_slice(b"hello\n");
        let (got, leftover) = reader.feed(&last).unwrap().unwrap();
        assert_eq!(got.source, Some(addr("127.0.0.9:40009")));
        assert_eq!(leftover, b"hello\n");

        // In one read, the leftover is a slice of what was fed: nothing was copied.
        let mut reader = HeaderReader::new();
        let mut whole = header.clone();
        whole.extend_from_slice(b"hello\n");
        let (_, leftover) = reader.feed(&whole).unwrap().unwrap();
        assert_eq!(leftover, b"hello\n");
        assert_eq!(reader.buffered(), 0);
    }
}

#[test]
fn truncated_v2_reports_what_arrived() {
    let header = v2(
        0x1,
        0x11,
        &v4_block(addr("10.0.0.1:1"), addr("10.0.0.2:2")),
        &[],
    );
    let mut reader = HeaderReader::new();
    assert!(matches!(reader.feed(&header[..20]), Ok(None)));
    let err = reader.end_of_stream();
    assert!(matches!(err, HeaderError::Truncated { received: 20 }));
    assert_eq!(
        err.to_string(),
        "connection closed after 20 bytes of an incomplete PROXY header"
    );
}

#[test]
fn every_error_is_one_short_line() {
    let errors = [
        HeaderError::NotProxy(Prefix::of(b"\x16\x03\x01\n")),
        HeaderError::Malformed {
            version: 2,
            reason: "x",
        },
        HeaderError::Oversized {
            version: 1,
            len: 200,
        },
        HeaderError::Oversized {
            version: 2,
            len: 70000,
        },
        HeaderError::Unsupported("x"),
        HeaderError::Timeout { received: 3 },
        HeaderError::Truncated { received: 0 },
        HeaderError::Io(io::Error::from(io::ErrorKind::ConnectionReset)),
    ];
    for error in errors {
        let line = error.to_string();
        assert!(
            !line.is_empty() && line.len() < 120 && !line.contains('\n'),
            "{line:?}"
        );
    }
}

#[test]
fn read_header_returns_the_leftover_and_restores_the_timeout() {
    let (mut server, mut client) = UnixStream::pair().unwrap();
    let idle = Some(Duration::from_secs(77));
    server.set_read_timeout(idle).unwrap();
    let writer = thread::spawn(move || {
        // Split inside the header, then the header's end with the client's first bytes.
        client
            .write_all(b"PROXY TCP4 127.0.0.3 127.0.0.1 ")
            .unwrap();
        thread::sleep(Duration::from_millis(20));
        client.write_all(b"40003 4001\r\nping\n").unwrap();
        client
    });
    let (header, leftover) = read_header(&mut server, Duration::from_secs(10)).unwrap();
    assert_eq!(header.source, Some(addr("127.0.0.3:40003")));
    assert_eq!(leftover, b"ping\n");
    assert_eq!(server.read_timeout().unwrap(), idle);
    drop(writer.join().unwrap());
}

#[test]
fn read_header_deadline_covers_the_whole_header() {
    // A peer that sends a byte every 20 ms never makes one read wait long, but the header as a
    // whole is late: the deadline is for all of it.
    let (mut server, mut client) = UnixStream::pair().unwrap();
    let writer = thread::spawn(move || {
        for byte in b"PROXY TCP4 127.0.0.3 127.0.0.1 40003 4001\r\n" {
            if client.write_all(std::slice::from_ref(byte)).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    let err = read_header(&mut server, Duration::from_millis(200)).unwrap_err();
    assert!(
        matches!(err, HeaderError::Timeout { received } if received > 0),
        "{err:?}"
    );
    drop(server);
    writer.join().unwrap();
}

#[test]
fn read_header_on_a_closed_or_silent_peer() {
    let (mut server, mut client) = UnixStream::pair().unwrap();
    client.write_all(b"\r\n\r\n\0\r\nQUIT\n\x21").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let err = read_header(&mut server, Duration::from_secs(10)).unwrap_err();
    assert!(
        matches!(err, HeaderError::Truncated { received: 13 }),
        "{err:?}"
    );

    let (mut server, _client) = UnixStream::pair().unwrap();
    let err = read_header(&mut server, Duration::from_millis(50)).unwrap_err();
    assert!(
        matches!(err, HeaderError::Timeout { received: 0 }),
        "{err:?}"
    );
}

/// Any valid header this module accepts, with what it must parse to.
fn any_header() -> impl Strategy<Value = (Vec<u8>, ProxyHeader)> {
    let tlvs = proptest::collection::vec(
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..8).prop_map(|v| tlv(0x01, &v)),
            "[a-z.]{0,40}".prop_map(|s| tlv(0x02, s.as_bytes())),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| tlv(0x04, &v)),
            proptest::collection::vec(any::<u8>(), 0..128).prop_map(|v| tlv(0x05, &v)),
            proptest::collection::vec(any::<u8>(), 0..60).prop_map(|v| tlv(0xe1, &v)),
        ],
        0..5,
    )
    .prop_map(|t| t.concat());
    let v4 = (any::<Ipv4Addr>(), any::<u16>());
    let v6 = (any::<Ipv6Addr>(), any::<u16>());
    let canonical_v6 = |ip: Ipv6Addr, port| canonical(SocketAddr::new(IpAddr::V6(ip), port));
    prop_oneof![
        (v4.clone(), v4.clone()).prop_map(|((s, sp), (d, dp))| {
            let line = format!("PROXY TCP4 {s} {d} {sp} {dp}\r\n");
            let h = ProxyHeader {
                source: Some(SocketAddr::new(s.into(), sp)),
                destination: Some(SocketAddr::new(d.into(), dp)),
                version: 1,
                local: false,
            };
            (line.into_bytes(), h)
        }),
        (v6.clone(), v6.clone()).prop_map(move |((s, sp), (d, dp))| {
            let line = format!("PROXY TCP6 {s} {d} {sp} {dp}\r\n");
            let h = ProxyHeader {
                source: Some(canonical_v6(s, sp)),
                destination: Some(canonical_v6(d, dp)),
                version: 1,
                local: false,
            };
            (line.into_bytes(), h)
        }),
        "[ -~]{0,80}".prop_map(|junk| {
            let line = format!("PROXY UNKNOWN {junk}\r\n");
            let h = ProxyHeader {
                source: None,
                destination: None,
                version: 1,
                local: false,
            };
            (line.into_bytes(), h)
        }),
        (v4.clone(), v4, tlvs.clone()).prop_map(|((s, sp), (d, dp), tlvs)| {
            let (s, d) = (SocketAddr::new(s.into(), sp), SocketAddr::new(d.into(), dp));
            (v2(0x1, 0x11, &v4_block(s, d), &tlvs), proxied_v2(s, d))
        }),
        (v6.clone(), v6, tlvs.clone()).prop_map(move |((s, sp), (d, dp), tlvs)| {
            let h = proxied_v2(canonical_v6(s, sp), canonical_v6(d, dp));
            (v2(0x1, 0x21, &v6_block(s, sp, d, dp), &tlvs), h)
        }),
        tlvs.prop_map(|tlvs| {
            let h = ProxyHeader {
                source: None,
                destination: None,
                version: 2,
                local: true,
            };
            (v2(0x0, 0x00, &[], &tlvs), h)
        }),
    ]
}

fn proxied_v2(source: SocketAddr, destination: SocketAddr) -> ProxyHeader {
    ProxyHeader {
        source: Some(source),
        destination: Some(destination),
        version: 2,
        local: false,
    }
}

/// Bytes that look like the start of a header often enough to reach the deeper checks.
fn header_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    let tail = proptest::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        tail.clone(),
        tail.clone()
            .prop_map(|t| [b"PROXY ".as_slice(), &t].concat()),
        tail.clone()
            .prop_map(|t| [b"PROXY TCP4 ".as_slice(), &t].concat()),
        tail.clone().prop_map(|t| [V2_SIGNATURE, &t].concat()),
        tail.prop_map(|t| [V2_SIGNATURE, &[0x21, 0x11], &t].concat()),
    ]
}

/// Feeds `buf` in two pieces split at `at`, and returns the outcome as (header, leftover).
fn feed_split(buf: &[u8], at: usize) -> Result<Option<(ProxyHeader, Vec<u8>)>, HeaderError> {
    let mut reader = HeaderReader::new();
    if let Some((header, leftover)) = reader.feed(&buf[..at])? {
        return Ok(Some((header, [leftover, &buf[at..]].concat())));
    }
    Ok(reader
        .feed(&buf[at..])?
        .map(|(header, leftover)| (header, leftover.to_vec())))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn valid_headers_split_anywhere_parse_the_same(
        (header, expected) in any_header(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        split in any::<prop::sample::Index>(),
    ) {
        let buf = [header.as_slice(), &payload].concat();
        prop_assert_eq!(parsed(&buf), (expected, header.len()));
        for prefix in 0..header.len() {
            prop_assert!(matches!(parse(&buf[..prefix]), Ok(None)), "prefix {}", prefix);
        }
        let at = split.index(buf.len() + 1);
        let got = feed_split(&buf, at).unwrap();
        prop_assert_eq!(got, Some((expected, payload)));
    }

    #[test]
    fn random_input_never_panics_and_splitting_does_not_change_the_outcome(
        buf in header_like_bytes(),
        split in any::<prop::sample::Index>(),
    ) {
        let whole = parse(&buf);
        match &whole {
            Ok(Some((_, consumed))) => prop_assert!(*consumed <= buf.len()),
            Ok(None) => prop_assert!(buf.len() < MAX_HEADER_LEN),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        let at = split.index(buf.len() + 1);
        match (whole, feed_split(&buf, at)) {
            (Ok(Some((h, n))), Ok(Some((g, leftover)))) => {
                prop_assert_eq!(h, g);
                prop_assert_eq!(&buf[n..], leftover.as_slice());
            }
            (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
            (whole, split) => prop_assert!(false, "whole {:?}, split {:?}", whole, split),
        }
    }

    #[test]
    fn mutated_and_truncated_headers_never_panic(
        (header, _) in any_header(),
        position in any::<prop::sample::Index>(),
        value in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut buf = header;
        let i = position.index(buf.len());
        buf[i] = value;
        buf.truncate(cut.index(buf.len() + 1));
        let _ = parse(&buf);
        let mut reader = HeaderReader::new();
        for chunk in buf.chunks(7) {
            match reader.feed(chunk) {
                Ok(None) => {}
                _ => break,
            }
        }
    }
}
