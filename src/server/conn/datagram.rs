//! The one UDP policy every model calls for every datagram, before it echoes anything.
//!
//! UDP echo (RFC 862) is a classic weapon: a spoofed datagram between two services that answer
//! unsolicited datagrams (echo, chargen, DNS, NTP...) loops forever (CERT CA-1996-01,
//! CVE-1999-0103). So, in this order, a datagram from `source` is refused (counted per reason,
//! logged at most once per source per [`super::REFUSAL_LOG_INTERVAL`], and dropped without a
//! reply) when:
//! 1. truncated: it did not fit the receive buffer (never echoed cut short);
//! 2. the loop guard, unless `--udp-any-port`: its source port is 0, or one of
//!    [`REFLECTION_PORTS`] (FreeBSD inetd's `check_loop` idea, with today's list of UDP
//!    services that answer anyone);
//! 3. `--allow`/`--deny`, the same prefix rules as for connections;
//! 4. `--udp-rate`: a token bucket per source address (burst = rate) in the shared per-source
//!    table (`sources`), so one spoofed source cannot turn the server into a flood, and a
//!    loop that slips past the guard is slowed to the rate.
//!
//! A datagram has no lifetime, so `--max-conns`, `--idle-timeout` and `--max-per-source` do
//! not apply; nothing is held after the decision.
//!
//! Every datagram is counted here, in the server's shared counters ([`crate::stats`]): as
//! received (with its bytes) when it reaches the policy, then as refused (by reason), echoed
//! (with its bytes) or not sent. So `received = echoed + refused + not sent` once the loops
//! are idle, in every model, the fork models' workers included.

use std::io;
use std::net::SocketAddr;

use super::admission::Refusal;
use super::{canonical_ip, Lifecycle, REFUSAL_LOG_INTERVAL};
use crate::server::udp::Received;

/// Source ports of services that answer unsolicited datagrams; replying to one could start a
/// loop or reflect a flood: echo, daytime, qotd, chargen, time, DNS, TFTP, portmap, NTP,
/// NetBIOS name, SNMP, CLDAP, SSDP, mDNS, memcached.
pub const REFLECTION_PORTS: [u16; 15] = [
    7, 13, 17, 19, 37, 53, 69, 111, 123, 137, 161, 389, 1900, 5353, 11211,
];

/// The default `--udp-rate`, datagrams per second per source (see the CLI's help for why).
pub const DEFAULT_UDP_RATE: u32 = 10_000;

/// The datagram rules of a server with UDP listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPolicy {
    /// Datagrams per second echoed to one source (`None`: no limit).
    pub rate: Option<u32>,
    /// `--udp-any-port`: no loop guard.
    pub any_port: bool,
}

impl Default for UdpPolicy {
    fn default() -> Self {
        UdpPolicy {
            rate: Some(DEFAULT_UDP_RATE),
            any_port: false,
        }
    }
}

/// The loop guard's verdict on a source port.
pub fn guard(port: u16) -> Option<Refusal> {
    if port == 0 {
        Some(Refusal::DatagramPortZero)
    } else if REFLECTION_PORTS.contains(&port) {
        Some(Refusal::DatagramReflectionPort)
    } else {
        None
    }
}

impl Lifecycle {
    /// Whether `received` (a datagram just received) is echoed. It is counted as received; a
    /// refusal is counted by reason and logged at most once per source per interval.
    pub fn admit_datagram(&self, received: &Received) -> bool {
        let Received {
            len,
            source,
            truncated,
        } = *received;
        self.stats.datagram_received(len as u64);
        let policy = self.udp.unwrap_or_default();
        let verdict = if truncated {
            Err(Refusal::DatagramTruncated)
        } else if let Some(reason) = guard(source.port()).filter(|_| !policy.any_port) {
            Err(reason)
        } else {
            self.admission.admit_datagram(canonical_ip(source))
        };
        match verdict {
            Ok(()) => true,
            Err(reason) => {
                self.stats.datagram_refused(reason);
                if self
                    .admission
                    .should_log(canonical_ip(source), REFUSAL_LOG_INTERVAL)
                {
                    tracing::info!(%source, reason = %reason, "datagram refused");
                }
                false
            }
        }
    }

    /// Counts a datagram echoed in full.
    pub fn datagram_echoed(&self, len: usize) {
        self.stats.datagram_echoed(len as u64);
    }

    /// Counts an echo the kernel would not send (for example an ICMP error from an earlier
    /// datagram to that peer, or no buffer space); the datagram is lost, as on a network.
    pub fn datagram_send_failed(&self, dest: SocketAddr, err: &io::Error) {
        self.stats.datagram_send_failed();
        tracing::debug!(%dest, "cannot send an echo: {err}");
    }

    /// One line per reason datagrams were refused for (at stop), and the echoes not sent.
    pub fn log_datagram_refusals(&self) {
        for reason in Refusal::DATAGRAM {
            let count = self.stats.datagrams_refused(reason);
            if count > 0 {
                tracing::info!("{count} datagrams refused: {reason}");
            }
        }
        let failed = self.stats.datagram_send_errors();
        if failed > 0 {
            tracing::info!("{failed} echoes could not be sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::conn::admission::AdmissionConfig;
    use crate::stats::Stats;
    use std::sync::Arc;

    fn lifecycle(policy: UdpPolicy) -> Lifecycle {
        let config = AdmissionConfig {
            udp: Some(policy),
            ..AdmissionConfig::default()
        };
        Lifecycle::new(&config, Arc::new(Stats::new().unwrap())).unwrap()
    }

    fn from(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A datagram of 5 bytes from `source`.
    fn datagram(source: SocketAddr, truncated: bool) -> Received {
        Received {
            len: 5,
            source,
            truncated,
        }
    }

    #[test]
    fn the_guard_refuses_service_ports_and_port_zero() {
        let life = lifecycle(UdpPolicy::default());
        for port in REFLECTION_PORTS.into_iter().chain([0]) {
            assert!(
                !life.admit_datagram(&datagram(from(port), false)),
                "port {port}"
            );
        }
        assert!(life.admit_datagram(&datagram(from(40_000), false)));
        assert_eq!(life.stats().datagrams_refused(Refusal::DatagramPortZero), 1);
        assert_eq!(
            life.stats()
                .datagrams_refused(Refusal::DatagramReflectionPort),
            REFLECTION_PORTS.len() as u64
        );
        assert!(
            !life.admit_datagram(&datagram(from(40_000), true)),
            "truncated"
        );
        assert_eq!(
            life.stats().datagrams_refused(Refusal::DatagramTruncated),
            1
        );
    }

    #[test]
    fn any_port_turns_the_guard_off() {
        let life = lifecycle(UdpPolicy {
            rate: None,
            any_port: true,
        });
        assert!(life.admit_datagram(&datagram(from(7), false)));
        assert!(life.admit_datagram(&datagram(from(0), false)));
    }

    #[test]
    fn the_rate_is_per_source() {
        let life = lifecycle(UdpPolicy {
            rate: Some(2),
            any_port: false,
        });
        assert!(life.admit_datagram(&datagram(from(40_000), false)));
        assert!(
            life.admit_datagram(&datagram(from(40_001), false)),
            "same address"
        );
        assert!(!life.admit_datagram(&datagram(from(40_002), false)));
        let other = SocketAddr::from(([127, 0, 0, 2], 40_000));
        assert!(life.admit_datagram(&datagram(other, false)));
        assert_eq!(life.stats().datagrams_refused(Refusal::DatagramRate), 1);
        // Every datagram the policy saw is counted as received, refused or not; refusals are
        // datagram counts, not connection ones.
        assert_eq!(life.stats().datagrams_received(), 4);
        assert_eq!(life.stats().datagram_bytes_received(), 20);
        assert_eq!(life.stats().refused(Refusal::DatagramRate), 0);
    }

    #[test]
    fn deny_is_counted_as_a_datagram_refusal() {
        let config = AdmissionConfig {
            udp: Some(UdpPolicy::default()),
            deny: vec!["127.0.0.0/8".parse().unwrap()],
            ..AdmissionConfig::default()
        };
        let life = Lifecycle::new(&config, Arc::new(Stats::new().unwrap())).unwrap();
        assert!(!life.admit_datagram(&datagram(from(40_000), false)));
        assert_eq!(life.stats().datagrams_refused(Refusal::Denied), 1);
        assert_eq!(life.stats().refused(Refusal::Denied), 0);
    }
}
