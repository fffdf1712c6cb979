//! The value parsers: text from the command line to a typed value, or one clear error line.
//!
//! A flag that two subcommands share is parsed by one function here, so `compare` accepts
//! exactly the connection counts, message sizes and thread counts its `bench` runs accept.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use clap::builder::RangedU64ValueParser;

use crate::compare::{parse_cpu_list, CpuList, External};

/// The shortest `--idle-timeout`: below it, ordinary scheduling delays would close clients that
/// are not idle at all.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_millis(100);

/// `--thread-stack` bounds: below 16 KiB a thread cannot even format a log line; above 256 MiB
/// a few hundred connections would reserve more address space than most machines have.
pub const THREAD_STACK_RANGE: RangeInclusive<u64> = (16 << 10)..=(256 << 20);

/// `bench --rate` bounds, in requests per second: below the minimum the schedule's interval
/// stops being a time anyone would wait for.
pub const RATE_RANGE: RangeInclusive<f64> = 0.001..=1e9;

/// `bench --conns` and `compare --conns` bounds: a million connections is past what one
/// load generator's descriptors and ephemeral ports allow.
pub const CONNS_RANGE: RangeInclusive<u64> = 1..=999_999;

/// `bench --size` and `compare --size` bounds: a message is held whole in memory per
/// connection, so more than 1 GiB would only exhaust it.
pub const MESSAGE_SIZE_RANGE: RangeInclusive<u64> = 1..=(1 << 30);

/// `bench --threads` and `compare --threads` bounds: more event loops than this only
/// contend for the same cores.
pub const THREADS_RANGE: RangeInclusive<u64> = 1..=1024;

/// `--workers` bounds (serve and compare).
pub const WORKERS_RANGE: RangeInclusive<u64> = 1..=4096;

/// Parses a connection count within [`CONNS_RANGE`].
pub fn conns() -> RangedU64ValueParser<u64> {
    RangedU64ValueParser::new().range(CONNS_RANGE)
}

/// Parses a load-generator thread count within [`THREADS_RANGE`].
pub fn threads() -> RangedU64ValueParser<u64> {
    RangedU64ValueParser::new().range(THREADS_RANGE)
}

/// Parses a worker count within [`WORKERS_RANGE`].
pub fn workers() -> RangedU64ValueParser<u64> {
    RangedU64ValueParser::new().range(WORKERS_RANGE)
}

/// Parses `--idle-timeout`: a duration of at least [`MIN_IDLE_TIMEOUT`].
pub fn parse_idle_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if timeout < MIN_IDLE_TIMEOUT {
        return Err(format!(
            "invalid idle timeout '{text}': must be at least {MIN_IDLE_TIMEOUT:?}"
        ));
    }
    Ok(timeout)
}

/// Parses `--thread-stack`: a size within [`THREAD_STACK_RANGE`].
pub fn parse_thread_stack(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if !THREAD_STACK_RANGE.contains(&size) {
        return Err(format!(
            "invalid thread stack '{text}': must be from 16KiB to 256MiB"
        ));
    }
    Ok(size)
}

/// Parses `bench --rate`: requests per second within [`RATE_RANGE`].
pub fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if RATE_RANGE.contains(&rate) => Ok(rate),
        _ => Err(format!(
            "invalid rate '{text}': expected requests per second, from {} to {}",
            RATE_RANGE.start(),
            RATE_RANGE.end()
        )),
    }
}

/// Parses a message size (`bench --size`, `compare --size`) within [`MESSAGE_SIZE_RANGE`]: a
/// size of zero measures nothing.
pub fn parse_message_size(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err(format!(
            "invalid size '{text}': a message is at least 1 byte"
        )),
        n if n > *MESSAGE_SIZE_RANGE.end() => {
            Err(format!("invalid size '{text}': at most 1GiB per message"))
        }
        n => Ok(n),
    }
}

/// Parses `check --max-size`: at most 64 MiB (the `sizes` check holds it several times).
pub fn parse_max_payload(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err("the largest payload is at least 1 byte".into()),
        n if n > 64 << 20 => Err(format!("invalid size '{text}': at most 64MiB")),
        n => Ok(n),
    }
}

/// Parses `bench --interval`: at least 10 ms (shorter intervals hold too few round trips).
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d < Duration::from_millis(10) => {
            Err(format!("invalid interval '{text}': at least 10ms"))
        }
        d => Ok(d),
    }
}

/// Parses a percentage from 0 to 100, with or without `%`.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    match text.trim().trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("invalid percentage '{text}': expected 0 to 100")),
    }
}

/// Parses a CPU list (see [`crate::compare::parse_cpu_list`]) whose every CPU this
/// process may run on, so a pinned child cannot fail later.
pub fn parse_usable_cpu_list(text: &str) -> Result<CpuList, String> {
    let list = parse_cpu_list(text)?;
    // The kernel's own list of the CPUs this process may run on, in the same syntax.
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read the CPUs this process may use: {e}"))?;
    let usable = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .and_then(|allowed| parse_cpu_list(allowed.trim()).ok())
        .ok_or("cannot read the CPUs this process may use from /proc/self/status")?;
    if let Some(cpu) = list.cpus().iter().find(|cpu| !usable.cpus().contains(cpu)) {
        return Err(format!(
            "invalid CPU list '{text}': CPU {cpu} is not available here (available: {usable})"
        ));
    }
    Ok(list)
}

/// Parses `NAME=ADDR` or `NAME=ADDR@PID`.
pub fn parse_external(text: &str) -> Result<External, String> {
    let (name, rest) = text
        .split_once('=')
        .filter(|(name, _)| !name.trim().is_empty())
        .ok_or_else(|| format!("invalid external server '{text}': expected NAME=ADDR[@PID]"))?;
    let (addr, pid) = match rest.rsplit_once('@') {
        Some((addr, pid)) => {
            let pid = pid
                .parse::<i32>()
                .ok()
                .filter(|pid| *pid > 0)
                .ok_or_else(|| format!("invalid external server '{text}': bad PID '{pid}'"))?;
            (addr, Some(pid))
        }
        None => (rest, None),
    };
    let spec =
        crate::listen::parse(addr).map_err(|e| format!("invalid external server '{text}': {e}"))?;
    let tls = match spec.kind {
        crate::listen::ListenerKind::Tcp => false,
        crate::listen::ListenerKind::Tls => true,
        kind => {
            return Err(format!(
                "invalid external server '{text}': compare loads tcp:// and tls://, not {kind}://"
            ))
        }
    };
    Ok(External {
        name: name.trim().to_string(),
        addr: spec.addr,
        pid,
        tls,
    })
}

/// Parses `compare --external NAME=ADDR[@PID]` (see [`parse_external`]); a PID must name a
/// running process.
pub fn parse_running_external(text: &str) -> Result<External, String> {
    let external = parse_external(text)?;
    if let Some(pid) = external.pid {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(format!(
                "invalid external server '{text}': no process has PID {pid}"
            ));
        }
    }
    Ok(external)
}

/// Parses an address for clap (see [`crate::net::parse_addr`]).
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    crate::net::parse_addr(text)
}

/// Parses a duration: `30s`, `500ms`, `2m`, or a bare number of seconds (`1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| {
            format!("invalid duration '{text}': must be a non-negative number of seconds")
        });
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration '{text}': {e} (examples: 30s, 500ms, 2m)"))
}

/// Parses a byte size: `512`, `4k`, `4KiB`, `1m`, `1MiB`, `2GiB` (binary multiples; `kb`/`KB`
/// are taken as KiB too, as most echo tools do).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size '{text}': expected a number such as 512, 4k or 1MiB"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size '{text}': unknown unit '{unit}' (use k, KiB, m, MiB, g or GiB)"
            ))
        }
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("invalid size '{text}': too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn message_sizes() {
        assert_eq!(parse_message_size("4k"), Ok(4096));
        assert_eq!(parse_message_size("1GiB"), Ok(1 << 30));
        assert!(parse_message_size("0").is_err());
        assert!(parse_message_size("2GiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn refuses_values_that_cannot_work() {
        assert!(parse_idle_timeout("0").is_err());
        assert!(parse_idle_timeout("1ns").is_err());
        assert_eq!(
            parse_idle_timeout("100ms").unwrap(),
            Duration::from_millis(100)
        );
        assert!(parse_thread_stack("18446744073709551615").is_err());
        assert!(parse_thread_stack("1k").is_err());
        assert_eq!(parse_thread_stack("128KiB").unwrap(), 128 << 10);
        assert_eq!(parse_rate("2500"), Ok(2500.0));
        for bad in ["1e-19", "0", "-5", "fast", "NaN", "inf", "2e9"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert!(parse_usable_cpu_list("0").is_ok());
        assert!(parse_usable_cpu_list("1000").is_err());
        let me = format!("me=127.0.0.1:1@{}", std::process::id());
        assert!(parse_running_external(&me).is_ok());
        assert!(parse_running_external("x=127.0.0.1:1@2147483647").is_err());
    }

    #[test]
    fn external_servers() {
        let plain = parse_external("c-epoll=127.0.0.1:7000").unwrap();
        assert_eq!(plain.name, "c-epoll");
        assert_eq!(plain.addr, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(plain.pid, None);
        let with_pid = parse_external("socat=[::1]:9@4321").unwrap();
        assert_eq!(with_pid.addr, "[::1]:9".parse().unwrap());
        assert_eq!(with_pid.pid, Some(4321));
        assert!(!with_pid.tls);
        let tls = parse_external("ncat=tls://127.0.0.1:7001@99").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.addr, "127.0.0.1:7001".parse().unwrap());
        for bad in [
            "127.0.0.1:7000",
            "=127.0.0.1:1",
            "x=nowhere",
            "x=127.0.0.1:1@pid",
        ] {
            assert!(parse_external(bad).is_err(), "{bad}");
        }
    }
}
