//! Admission control: which sources are served (`--allow`, `--deny`), how many connections one
//! source may hold (`--max-per-source`) and open per second (`--max-conn-rate`), and which
//! peers may speak the PROXY protocol (`--trusted-proxy`).
//!
//! Prefix rules are merged into sorted, disjoint ranges of 128-bit addresses (IPv4 as
//! `::ffff:a.b.c.d`, so an IPv4-mapped IPv6 peer matches IPv4 rules), so a lookup is a binary
//! search whatever the number of rules.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::datagram::UdpPolicy;
use super::sources::{source_key, DatagramVerdict, Slot, SourceLimits, Sources, Verdict};

/// A set of address prefixes with a logarithmic lookup.
#[derive(Debug, Clone, Default)]
pub struct PrefixSet {
    /// Disjoint, sorted, inclusive ranges.
    ranges: Vec<(u128, u128)>,
}

impl PrefixSet {
    /// The set of addresses in any of `nets`.
    pub fn new(nets: &[IpNet]) -> Self {
        let mut ranges: Vec<(u128, u128)> = nets.iter().map(|net| range_of(*net)).collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        PrefixSet { ranges: merged }
    }

    /// Whether no prefix was given.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `ip` is in the set.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let key = source_key(ip);
        let after = self.ranges.partition_point(|&(start, _)| start <= key);
        after > 0 && self.ranges[after - 1].1 >= key
    }
}

fn range_of(net: IpNet) -> (u128, u128) {
    let (base, len) = match net {
        IpNet::V4(v4) => (
            u128::from(v4.network().to_ipv6_mapped()),
            96 + u32::from(v4.prefix_len()),
        ),
        IpNet::V6(v6) => (u128::from(v6.network()), u32::from(v6.prefix_len())),
    };
    let host_bits = 128 - len;
    let span = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    (base, base | span)
}

/// Parses `--allow`/`--deny`/`--trusted-proxy` values: a prefix (`10.0.0.0/8`, `2001:db8::/32`)
/// or a plain address (a /32 or /128).
pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        format!("invalid address prefix '{text}': expected CIDR such as 10.0.0.0/8 or an address")
    })
}

/// What a server's admission control was configured with.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
    pub max_per_source: Option<u32>,
    pub max_conn_rate: Option<u32>,
    /// Peers whose PROXY headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// How long a PROXY listener waits for the header.
    pub proxy_timeout: Duration,
    /// The datagram rules, when the server has UDP listeners (`None`: it has none).
    pub udp: Option<UdpPolicy>,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            allow: Vec::new(),
            deny: Vec::new(),
            max_per_source: None,
            max_conn_rate: None,
            trusted_proxies: default_trusted_proxies(),
            proxy_timeout: Duration::from_secs(5),
            udp: None,
        }
    }
}

/// Loopback only: a proxy on this machine.
pub fn default_trusted_proxies() -> Vec<IpNet> {
    vec![
        "127.0.0.0/8".parse().expect("valid prefix"),
        "::1/128".parse().expect("valid prefix"),
    ]
}

/// Why a connection was not served. Every refusal is counted under [`Refusal::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The source matches a `--deny` prefix.
    Denied,
    /// `--allow` was given and the source matches none of its prefixes.
    NotAllowed,
    /// The source already holds `--max-per-source` connections.
    PerSource,
    /// The source opened more than `--max-conn-rate` connections in the last second.
    Rate,
    /// The per-source table had no room for a new source (see `sources`).
    SourceTableFull,
    /// A PROXY listener's peer is not a `--trusted-proxy`.
    UntrustedProxy,
    /// A PROXY listener's connection sent no valid header in time.
    ProxyHeader,
    /// A datagram from source port 0, which no real sender uses (the loop guard).
    DatagramPortZero,
    /// A datagram from the port of a service that answers unsolicited datagrams (echo,
    /// chargen, DNS...): answering could start a loop between two services (the loop guard).
    DatagramReflectionPort,
    /// The source sent more than `--udp-rate` datagrams per second.
    DatagramRate,
    /// A datagram longer than the receive buffer (never echoed cut short).
    DatagramTruncated,
}

impl Refusal {
    /// Every reason, for counters.
    pub const ALL: [Refusal; 11] = [
        Refusal::Denied,
        Refusal::NotAllowed,
        Refusal::PerSource,
        Refusal::Rate,
        Refusal::SourceTableFull,
        Refusal::UntrustedProxy,
        Refusal::ProxyHeader,
        Refusal::DatagramPortZero,
        Refusal::DatagramReflectionPort,
        Refusal::DatagramRate,
        Refusal::DatagramTruncated,
    ];

    /// The reasons a connection can be refused for (its counter's label values).
    pub const CONNECTION: [Refusal; 7] = [
        Refusal::Denied,
        Refusal::NotAllowed,
        Refusal::PerSource,
        Refusal::Rate,
        Refusal::SourceTableFull,
        Refusal::UntrustedProxy,
        Refusal::ProxyHeader,
    ];

    /// The reasons a datagram can be refused for (the UDP policy's, in `datagram`).
    pub const DATAGRAM: [Refusal; 7] = [
        Refusal::Denied,
        Refusal::NotAllowed,
        Refusal::SourceTableFull,
        Refusal::DatagramPortZero,
        Refusal::DatagramReflectionPort,
        Refusal::DatagramRate,
        Refusal::DatagramTruncated,
    ];

    /// The reason's name in logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Denied => "denied",
            Refusal::NotAllowed => "not-allowed",
            Refusal::PerSource => "per-source-limit",
            Refusal::Rate => "rate-limit",
            Refusal::SourceTableFull => "source-table-full",
            Refusal::UntrustedProxy => "untrusted-proxy",
            Refusal::ProxyHeader => "proxy-header",
            Refusal::DatagramPortZero => "udp-source-port-zero",
            Refusal::DatagramReflectionPort => "udp-reflection-port",
            Refusal::DatagramRate => "udp-rate",
            Refusal::DatagramTruncated => "udp-truncated",
        }
    }

    /// Its index in [`Refusal::ALL`].
    pub fn index(self) -> usize {
        Refusal::ALL
            .iter()
            .position(|r| *r == self)
            .expect("listed")
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decision procedure: rules, plus the shared per-source table when a per-source rule is
/// on.
#[derive(Debug)]
pub struct Admission {
    allow: PrefixSet,
    deny: PrefixSet,
    trusted_proxies: PrefixSet,
    /// Present when any rule is on: counts, buckets and the per-source log limit.
    sources: Option<Sources>,
    counts_sources: bool,
}

impl Admission {
    /// Builds the rules; maps the per-source table (before any fork) when a rule needs it.
    pub fn new(config: &AdmissionConfig) -> std::io::Result<Self> {
        let limits = SourceLimits {
            max_per_source: config.max_per_source,
            max_rate: config.max_conn_rate,
            udp_rate: config.udp.and_then(|udp| udp.rate),
        };
        let counts_sources = limits.max_per_source.is_some() || limits.max_rate.is_some();
        // A UDP listener needs the table even without a rate: it limits the refusal log.
        let any_rule = counts_sources
            || config.udp.is_some()
            || !config.allow.is_empty()
            || !config.deny.is_empty();
        Ok(Admission {
            allow: PrefixSet::new(&config.allow),
            deny: PrefixSet::new(&config.deny),
            trusted_proxies: PrefixSet::new(&config.trusted_proxies),
            sources: if any_rule {
                Some(Sources::new(limits)?)
            } else {
                None
            },
            counts_sources,
        })
    }

    /// Decides about a new connection from `source`. The returned slot, if any, must be given
    /// back with [`Admission::release`] when the connection ends.
    pub fn admit(&self, source: IpAddr) -> Result<Option<Slot>, Refusal> {
        let Some(sources) = &self.sources else {
            return Ok(None);
        };
        if self.deny.contains(source) {
            return Err(Refusal::Denied);
        }
        if !self.allow.is_empty() && !self.allow.contains(source) {
            return Err(Refusal::NotAllowed);
        }
        if !self.counts_sources {
            return Ok(None);
        }
        match sources.admit(source) {
            Verdict::Admitted(slot) => Ok(Some(slot)),
            Verdict::PerSourceLimit => Err(Refusal::PerSource),
            Verdict::RateLimit => Err(Refusal::Rate),
            Verdict::TableFull => Err(Refusal::SourceTableFull),
        }
    }

    /// Decides about one datagram from `source`: the same allow/deny rules as a connection,
    /// then the source's `--udp-rate` bucket (in the same per-source table). Nothing is held
    /// afterwards: a datagram has no end to count.
    pub fn admit_datagram(&self, source: IpAddr) -> Result<(), Refusal> {
        let Some(sources) = &self.sources else {
            return Ok(());
        };
        if self.deny.contains(source) {
            return Err(Refusal::Denied);
        }
        if !self.allow.is_empty() && !self.allow.contains(source) {
            return Err(Refusal::NotAllowed);
        }
        match sources.admit_datagram(source) {
            DatagramVerdict::Admitted => Ok(()),
            DatagramVerdict::RateLimit => Err(Refusal::DatagramRate),
            DatagramVerdict::TableFull => Err(Refusal::SourceTableFull),
        }
    }

    /// Counts the end of a connection that [`Admission::admit`] gave `slot`.
    pub fn release(&self, slot: Slot) {
        if let Some(sources) = &self.sources {
            sources.release(slot);
        }
    }

    /// Whether `peer` may send a PROXY header.
    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.contains(peer)
    }

    /// Whether a refusal of `source` should be logged now (once per `interval` per source).
    pub fn should_log(&self, source: IpAddr, interval: Duration) -> bool {
        match &self.sources {
            Some(sources) => sources.should_log(source, interval),
            None => true,
        }
    }

    /// Open connections counted for `source`.
    pub fn active(&self, source: IpAddr) -> u32 {
        self.sources.as_ref().map_or(0, |s| s.active(source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| parse_prefix(s).unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefix_sets() {
        let set = PrefixSet::new(&nets(&[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.168.1.7",
            "2001:db8::/32",
        ]));
        assert!(set.contains(ip("10.200.3.4")));
        assert!(set.contains(ip("192.168.1.7")));
        assert!(!set.contains(ip("192.168.1.8")));
        assert!(set.contains(ip("2001:db8::1")));
        assert!(!set.contains(ip("2001:db9::1")));
        assert!(
            set.contains(ip("::ffff:10.0.0.1")),
            "IPv4-mapped matches IPv4 rules"
        );
        assert!(!set.contains(ip("11.0.0.0")));
        assert!(PrefixSet::new(&nets(&["::/0"])).contains(ip("1.2.3.4")));
        assert!(PrefixSet::new(&nets(&["0.0.0.0/0"])).contains(ip("255.255.255.255")));
        assert!(!PrefixSet::new(&nets(&["0.0.0.0/0"])).contains(ip("::1")));
    }

    #[test]
    fn ten_thousand_rules() {
        let many: Vec<IpNet> = (0..10_000u32)
            .map(|n| IpNet::from(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n * 4))))
            .collect();
        let set = PrefixSet::new(&many);
        assert!(set.contains(ip("10.0.0.4")));
        assert!(!set.contains(ip("10.0.0.5")));
    }

    #[test]
    fn deny_wins_over_allow() {
        let admission = Admission::new(&AdmissionConfig {
            allow: nets(&["127.0.0.0/8"]),
            deny: nets(&["127.0.0.2"]),
            ..AdmissionConfig::default()
        })
        .unwrap();
        assert_eq!(admission.admit(ip("127.0.0.1")), Ok(None));
        assert_eq!(admission.admit(ip("127.0.0.2")), Err(Refusal::Denied));
        assert_eq!(admission.admit(ip("::1")), Err(Refusal::NotAllowed));
        assert_eq!(admission.admit_datagram(ip("127.0.0.1")), Ok(()));
        assert_eq!(
            admission.admit_datagram(ip("127.0.0.2")),
            Err(Refusal::Denied),
            "the rules apply to every datagram"
        );
        assert_eq!(
            admission.admit_datagram(ip("::1")),
            Err(Refusal::NotAllowed)
        );
    }

    #[test]
    fn datagram_rate_is_per_source() {
        let admission = Admission::new(&AdmissionConfig {
            udp: Some(UdpPolicy {
                rate: Some(3),
                any_port: false,
            }),
            ..AdmissionConfig::default()
        })
        .unwrap();
        for _ in 0..3 {
            assert_eq!(admission.admit_datagram(ip("127.0.0.1")), Ok(()));
        }
        assert_eq!(
            admission.admit_datagram(ip("127.0.0.1")),
            Err(Refusal::DatagramRate)
        );
        assert_eq!(admission.admit_datagram(ip("127.0.0.3")), Ok(()));
        assert_eq!(
            admission.admit(ip("127.0.0.1")),
            Ok(None),
            "the datagram budget does not limit connections"
        );
    }

    #[test]
    fn no_rules_no_state() {
        let admission = Admission::new(&AdmissionConfig::default()).unwrap();
        assert!(admission.sources.is_none());
        assert_eq!(admission.admit(ip("8.8.8.8")), Ok(None));
        assert!(admission.is_trusted_proxy(ip("127.9.9.9")));
        assert!(!admission.is_trusted_proxy(ip("10.0.0.1")));
    }

    #[test]
    fn prefixes_parse() {
        assert_eq!(
            parse_prefix("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(parse_prefix("::1").unwrap().to_string(), "::1/128");
        assert!(parse_prefix("10.0.0.0/33").is_err());
        assert!(parse_prefix("nonsense").is_err());
    }
}
