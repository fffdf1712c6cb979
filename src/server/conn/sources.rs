//! Per-source state: how many connections each source address has open, its token buckets for
//! `--max-conn-rate` (new connections) and `--udp-rate` (datagrams echoed), and when a refusal
//! of it was last logged.
//!
//! The state has a fixed size, whatever the number of sources: a set-associative table of
//! [`SETS`] × [`WAYS`] entries ([`CAPACITY`] sources, [`TABLE_BYTES`] bytes), in memory mapped
//! shared before any fork (so prefork's workers count together). A source's set is chosen by a
//! hash with a per-server random key, so nobody can aim many sources at one set. A new source
//! takes a free entry of its set, or else evicts the entry with the oldest activity among those
//! with no open connection and a full bucket (forgetting such a source changes nothing). A
//! source with open connections is never evicted; only if all eight entries of its set hold
//! open connections is a new source refused (`source-table-full`).

use std::hash::BuildHasher;
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::shared_mem::SharedMutex;

/// Entries per set.
pub const WAYS: usize = 8;
/// Sets in the table.
pub const SETS: usize = 8192;
/// Sources the table holds at once.
pub const CAPACITY: usize = SETS * WAYS;
/// The table's size in bytes (its memory bound).
pub const TABLE_BYTES: usize = std::mem::size_of::<Table>();

/// A source address as a 128-bit key: IPv4 (and IPv4-mapped IPv6) as `::ffff:a.b.c.d`.
pub fn source_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Entry {
    key: u128,
    /// Nanoseconds since the table's epoch when the bucket was last refilled (0: never used).
    refilled_at: u64,
    /// When a refusal of this source was last logged (0: never).
    logged_at: u64,
    tokens: f64,
    active: u32,
    used: u32,
    /// The `--udp-rate` bucket: when it was last refilled, and its tokens.
    datagrams_refilled_at: u64,
    datagram_tokens: f64,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Table {
    sets: [[Entry; WAYS]; SETS],
}

// SAFETY: all-zero bytes are an empty table (`used == 0` everywhere; 0.0 is all-zero bits) and
// it holds no pointers.
unsafe impl super::shared_mem::Zeroable for Table {}

/// What the table decided about one new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted as open; call [`Sources::release`] with the slot when it closes.
    Admitted(Slot),
    /// The source already has `--max-per-source` connections open.
    PerSourceLimit,
    /// The source used up its `--max-conn-rate` burst.
    RateLimit,
    /// Every entry of the source's set holds open connections.
    TableFull,
}

/// What the table decided about one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramVerdict {
    /// Within the source's `--udp-rate`: echo it.
    Admitted,
    /// The source used up its `--udp-rate` burst.
    RateLimit,
    /// Every entry of the source's set holds open connections.
    TableFull,
}

/// Where an admitted source's count lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    index: u32,
    /// The source's key, as bytes: a `u128` would align the slot (and every connection that
    /// holds one) to 16 bytes.
    key: [u8; 16],
}

/// The limits one source is held to.
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceLimits {
    pub max_per_source: Option<u32>,
    /// New connections per second, with a burst of the same size.
    pub max_rate: Option<u32>,
    /// Datagrams echoed per second, with a burst of the same size.
    pub udp_rate: Option<u32>,
}

/// The shared per-source table.
pub struct Sources {
    table: SharedMutex<Table>,
    hasher: std::collections::hash_map::RandomState,
    epoch: Instant,
    limits: SourceLimits,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Sources {
    /// Maps the table (before any fork). Its pages are touched only as sources arrive.
    pub fn new(limits: SourceLimits) -> io::Result<Self> {
        Ok(Sources {
            table: SharedMutex::new_zeroed()?,
            hasher: std::collections::hash_map::RandomState::new(),
            epoch: Instant::now(),
            limits,
        })
    }

    fn now(&self) -> u64 {
        // Starts at 1, so 0 can mean "never".
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX) | 1
    }

    fn set_of(&self, key: u128) -> usize {
        (self.hasher.hash_one(key) as usize) % SETS
    }

    /// Counts a new connection from `ip`, if its limits allow.
    pub fn admit(&self, ip: IpAddr) -> Verdict {
        let key = source_key(ip);
        let set = self.set_of(key);
        let now = self.now();
        let mut table = self.table.lock();
        let ways = &mut table.sets[set];
        let Some(way) = find_or_claim(ways, key, now, self.limits) else {
            return Verdict::TableFull;
        };
        let entry = &mut ways[way];
        if let Some(rate) = self.limits.max_rate {
            refill(entry, now, rate);
            if entry.tokens < 1.0 {
                return Verdict::RateLimit;
            }
            if self
                .limits
                .max_per_source
                .is_some_and(|max| entry.active >= max)
            {
                return Verdict::PerSourceLimit;
            }
            entry.tokens -= 1.0;
        } else if self
            .limits
            .max_per_source
            .is_some_and(|max| entry.active >= max)
        {
            return Verdict::PerSourceLimit;
        }
        entry.active += 1;
        Verdict::Admitted(Slot {
            index: (set * WAYS + way) as u32,
            key: key.to_ne_bytes(),
        })
    }

    /// Takes one of `ip`'s `--udp-rate` tokens, if it has one left (always, without a rate).
    pub fn admit_datagram(&self, ip: IpAddr) -> DatagramVerdict {
        let Some(rate) = self.limits.udp_rate else {
            return DatagramVerdict::Admitted;
        };
        let key = source_key(ip);
        let set = self.set_of(key);
        let now = self.now();
        let mut table = self.table.lock();
        let ways = &mut table.sets[set];
        let Some(way) = find_or_claim(ways, key, now, self.limits) else {
            return DatagramVerdict::TableFull;
        };
        let entry = &mut ways[way];
        let burst = f64::from(rate);
        let elapsed = now.saturating_sub(entry.datagrams_refilled_at) as f64 / 1e9;
        entry.datagram_tokens = (entry.datagram_tokens + elapsed * burst).min(burst);
        entry.datagrams_refilled_at = now;
        if entry.datagram_tokens < 1.0 {
            return DatagramVerdict::RateLimit;
        }
        entry.datagram_tokens -= 1.0;
        DatagramVerdict::Admitted
    }

    /// Counts the end of a connection admitted with `slot`.
    pub fn release(&self, slot: Slot) {
        let (set, way) = (slot.index as usize / WAYS, slot.index as usize % WAYS);
        let mut table = self.table.lock();
        let entry = &mut table.sets[set][way];
        // An entry with open connections is never evicted, so it still holds this source.
        if entry.used != 0 && entry.key.to_ne_bytes() == slot.key && entry.active > 0 {
            entry.active -= 1;
        }
    }

    /// Whether a refusal of `ip` should be logged now: at most once per `interval` per source.
    /// A source with no entry (its set is full) is logged.
    pub fn should_log(&self, ip: IpAddr, interval: Duration) -> bool {
        let key = source_key(ip);
        let set = self.set_of(key);
        let now = self.now();
        let interval = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
        let mut table = self.table.lock();
        let ways = &mut table.sets[set];
        let Some(way) = find_or_claim(ways, key, now, self.limits) else {
            return true;
        };
        let entry = &mut ways[way];
        if entry.logged_at != 0 && now.saturating_sub(entry.logged_at) < interval {
            return false;
        }
        entry.logged_at = now;
        true
    }

    /// Open connections counted for `ip` (for tests and diagnostics).
    pub fn active(&self, ip: IpAddr) -> u32 {
        let key = source_key(ip);
        let table = self.table.lock();
        table.sets[self.set_of(key)]
            .iter()
            .find(|e| e.used != 0 && e.key == key)
            .map_or(0, |e| e.active)
    }
}

/// The way holding `key`, or a way claimed for it (free, or evicted), or `None` if every way
/// holds a source that must be remembered.
fn find_or_claim(
    ways: &mut [Entry; WAYS],
    key: u128,
    now: u64,
    limits: SourceLimits,
) -> Option<usize> {
    if let Some(way) = ways.iter().position(|e| e.used != 0 && e.key == key) {
        return Some(way);
    }
    let way = ways.iter().position(|e| e.used == 0).or_else(|| {
        ways.iter()
            .enumerate()
            .filter(|(_, e)| e.active == 0 && bucket_full(e, now, limits))
            .min_by_key(|(_, e)| e.refilled_at.max(e.logged_at).max(e.datagrams_refilled_at))
            .map(|(way, _)| way)
    })?;
    ways[way] = Entry {
        key,
        refilled_at: now,
        logged_at: 0,
        tokens: f64::from(limits.max_rate.unwrap_or(0)),
        active: 0,
        used: 1,
        datagrams_refilled_at: now,
        datagram_tokens: f64::from(limits.udp_rate.unwrap_or(0)),
    };
    Some(way)
}

/// Tops the bucket up for the time since its last refill (burst = rate).
fn refill(entry: &mut Entry, now: u64, rate: u32) {
    let elapsed = now.saturating_sub(entry.refilled_at) as f64 / 1e9;
    let burst = f64::from(rate);
    entry.tokens = (entry.tokens + elapsed * burst).min(burst);
    entry.refilled_at = now;
}

/// Whether forgetting this entry loses nothing: its buckets would be full by now.
fn bucket_full(entry: &Entry, now: u64, limits: SourceLimits) -> bool {
    let full = |rate: Option<u32>, tokens: f64, refilled_at: u64| {
        rate.is_none_or(|rate| {
            let elapsed = now.saturating_sub(refilled_at) as f64 / 1e9;
            tokens + elapsed * f64::from(rate) >= f64::from(rate)
        })
    };
    full(limits.max_rate, entry.tokens, entry.refilled_at)
        && full(
            limits.udp_rate,
            entry.datagram_tokens,
            entry.datagrams_refilled_at,
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | n))
    }

    #[test]
    fn per_source_limit_and_reuse() {
        let sources = Sources::new(SourceLimits {
            max_per_source: Some(2),
            max_rate: None,
            udp_rate: None,
        })
        .unwrap();
        let Verdict::Admitted(a) = sources.admit(ip(1)) else {
            panic!()
        };
        assert!(matches!(sources.admit(ip(1)), Verdict::Admitted(_)));
        assert_eq!(sources.admit(ip(1)), Verdict::PerSourceLimit);
        assert!(
            matches!(sources.admit(ip(2)), Verdict::Admitted(_)),
            "other sources unaffected"
        );
        sources.release(a);
        assert_eq!(sources.active(ip(1)), 1);
        assert!(
            matches!(sources.admit(ip(1)), Verdict::Admitted(_)),
            "a freed slot is reusable"
        );
    }

    #[test]
    fn ipv4_mapped_is_the_same_source() {
        let sources = Sources::new(SourceLimits {
            max_per_source: Some(1),
            max_rate: None,
            udp_rate: None,
        })
        .unwrap();
        assert!(matches!(sources.admit(ip(7)), Verdict::Admitted(_)));
        let mapped = IpAddr::V6(Ipv4Addr::from(0x7f00_0007).to_ipv6_mapped());
        assert_eq!(sources.admit(mapped), Verdict::PerSourceLimit);
    }

    #[test]
    fn rate_limit_is_a_token_bucket() {
        let sources = Sources::new(SourceLimits {
            max_per_source: None,
            max_rate: Some(5),
            udp_rate: None,
        })
        .unwrap();
        for _ in 0..5 {
            assert!(matches!(sources.admit(ip(3)), Verdict::Admitted(_)));
        }
        assert_eq!(sources.admit(ip(3)), Verdict::RateLimit, "burst spent");
        assert!(matches!(sources.admit(ip(4)), Verdict::Admitted(_)));
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            matches!(sources.admit(ip(3)), Verdict::Admitted(_)),
            "the bucket refills: the limit is temporary"
        );
    }

    #[test]
    fn bounded_whatever_the_number_of_sources() {
        let sources = Sources::new(SourceLimits {
            max_per_source: Some(1),
            max_rate: None,
            udp_rate: None,
        })
        .unwrap();
        // Sources that close again are forgotten as needed: far more than the capacity fit.
        for n in 0..(CAPACITY as u32 * 2) {
            let Verdict::Admitted(slot) = sources.admit(ip(n)) else {
                panic!("source {n} refused")
            };
            sources.release(slot);
        }
        const _: () = assert!(TABLE_BYTES <= 4 << 20, "the documented bound");
    }

    #[test]
    fn datagram_budget_is_a_token_bucket() {
        let sources = Sources::new(SourceLimits {
            udp_rate: Some(100),
            ..SourceLimits::default()
        })
        .unwrap();
        for _ in 0..100 {
            assert_eq!(sources.admit_datagram(ip(5)), DatagramVerdict::Admitted);
        }
        assert_eq!(sources.admit_datagram(ip(5)), DatagramVerdict::RateLimit);
        assert_eq!(sources.admit_datagram(ip(6)), DatagramVerdict::Admitted);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            sources.admit_datagram(ip(5)),
            DatagramVerdict::Admitted,
            "the bucket refills at the rate"
        );
    }

    #[test]
    fn logs_once_per_interval() {
        let sources = Sources::new(SourceLimits::default()).unwrap();
        assert!(sources.should_log(ip(9), Duration::from_secs(60)));
        assert!(!sources.should_log(ip(9), Duration::from_secs(60)));
        assert!(sources.should_log(ip(10), Duration::from_secs(60)));
    }
}
